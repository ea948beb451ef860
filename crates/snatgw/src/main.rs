//! `snatgw`: the command line. Subcommands:
//! - `show --config FILE`: what the engine makes of a configuration (scenario, public IP,
//!   preallocated ports and block per instance, and the SPEC rule that decided it);
//! - `run`, `stats`, `lab`, `race`: the data plane and its lab (docs/RUNNING.md);
//! - `get`, `apply`, `put`, `delete`, `redeploy`, `settle`, `ports`, `flows`, `events`:
//!   clients of a running gateway's management API (docs/API.md, [`api_cli`]).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Huge pages for the flow tables (see `snatgw_io::HugePageAlloc`): a million flows are tens
/// of MiB touched at random, and 4 KiB pages make nearly every lookup a TLB miss too.
#[global_allocator]
static ALLOC: snatgw_io::HugePageAlloc = snatgw_io::HugePageAlloc;

mod api_cli;
mod api_render;
mod lab;
mod logcap;
mod race;
mod run;
mod show;
mod stats;

/// snatgw: outbound connectivity (SNAT/PAT) for private instances.
#[derive(Parser, Debug)]
#[command(name = "snatgw", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show, per instance, the scenario, public IP, preallocated ports and deciding rule.
    Show {
        /// Configuration file (TOML, see docs/CONFIG.md).
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the data plane on two TUN devices until SIGINT/SIGTERM (see docs/RUNNING.md).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Private-side TUN to create: every packet read from it is outbound (SPEC R9.1).
        #[arg(long, default_value = "snat-priv")]
        tun_private: String,
        /// Public-side TUN to create: every packet read from it is inbound (SPEC R9.1).
        #[arg(long, default_value = "snat-pub")]
        tun_public: String,
        /// Queues per TUN, one worker thread each.
        #[arg(long, default_value_t = 1)]
        queues: usize,
        /// Enable virtio-net offload (GSO/GRO) on the TUN.
        #[arg(long)]
        offload: bool,
        /// Packets per batch.
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Write a JSON counters snapshot here (atomically) every --stats-interval-ms.
        #[arg(long)]
        stats_file: Option<PathBuf>,
        /// Period of the stats snapshot.
        #[arg(long, default_value_t = 1000)]
        stats_interval_ms: u64,
        /// TUN transmit queue length.
        #[arg(long)]
        tx_queue_len: Option<u32>,
        /// Log JSON lines instead of text.
        #[arg(long)]
        log_json: bool,
        /// At most this many event log lines per second (0: no cap); the rest are counted (R9.3).
        #[arg(long, default_value_t = 20)]
        log_rate: u32,
        /// Burst of event log lines allowed above --log-rate.
        #[arg(long, default_value_t = 100)]
        log_burst: u32,
        /// Management API address (REST, /metrics, /openapi.json), or `off`.
        #[arg(long, default_value = "127.0.0.1:7070")]
        api: String,
        /// File holding the API's bearer token (required to listen on a non-loopback address).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Directory of the embedded store: the topology survives restarts there.
        #[arg(long, default_value = "/var/lib/snatgw")]
        state_dir: PathBuf,
    },
    /// Print the counters snapshot a running gateway writes (--stats-file).
    Stats {
        /// The snapshot file.
        #[arg(long, short)]
        file: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// The reference lab in network namespaces (needs root).
    #[command(subcommand)]
    Lab(lab::LabCmd),
    /// Benchmark snatgw against the kernel's nftables masquerade in the same lab (needs root).
    Race(race::RaceArgs),
    /// Clients of a running gateway's management API (see docs/API.md).
    #[command(flatten)]
    Api(api_cli::ApiCmd),
}

/// `--api`: an address, or `off`.
fn parse_api(s: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| format!("--api: `{s}` is neither an address like 127.0.0.1:7070 nor `off`"))
}

fn main() -> ExitCode {
    // Hidden: `snatgw lab-server serve|client ...` runs the lab's servers and clients.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "lab-server") {
        args.remove(1);
        return snatgw_lab::cli::main_with_args(args);
    }
    let cli = Cli::parse_from(args);
    let result = match cli.cmd {
        Cmd::Show { config, json } => show::run(&config, json),
        Cmd::Run {
            config,
            tun_private,
            tun_public,
            queues,
            offload,
            batch,
            stats_file,
            stats_interval_ms,
            tx_queue_len,
            log_json,
            log_rate,
            log_burst,
            api,
            token_file,
            state_dir,
        } => parse_api(&api).and_then(|api| {
            run::run(&run::RunArgs {
                config,
                tun_private,
                tun_public,
                queues,
                offload,
                batch,
                stats_file,
                stats_interval: std::time::Duration::from_millis(stats_interval_ms.max(100)),
                tx_queue_len,
                log_json,
                log_rate,
                log_burst,
                api,
                token_file,
                state_dir,
            })
        }),
        Cmd::Stats { file, json } => stats::run(&file, json),
        Cmd::Lab(c) => lab::run(c),
        Cmd::Race(a) => race::run(&a),
        // Prints its own `error: ...` (the server's message, field and SPEC rule).
        Cmd::Api(c) => return api_cli::main(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snatgw: {e}");
            ExitCode::FAILURE
        }
    }
}
