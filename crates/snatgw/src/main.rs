//! `snatgw`: the command line. Subcommands:
//! - `show --config FILE`: what the engine makes of a configuration (scenario, public IP,
//!   preallocated ports and block per instance, and the SPEC rule that decided it);
//! - `run`, `stats`: the data plane (docs/RUNNING.md);
//! - `lab`, `race`: the lab tools, a separate binary (`snatgw-lab`, crate `snatgw-lab`) that
//!   these two exec with every argument, git-style ([`lab`]; issue #16);
//! - `plan`: the exhaustion planner (docs/PLANNER.md, [`plan`]);
//! - `fleet`: a fleet's nodes, leases and owned instances, from etcd (docs/FLEET.md, [`fleet`]);
//! - `keepalive-check`: do this host's TCP keepalives outlast the gateway's idle timeout
//!   (SPEC R7.1, docs/OPERATIONS.md, [`keepalive`]);
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
mod fleet;
mod fleet_link;
mod keepalive;
mod lab;
mod plan;
mod reserve;
mod run;
mod show;

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
    Run(Box<run::RunArgs>),
    /// Print the counters snapshot a running gateway writes (--stats-file).
    Stats {
        /// The snapshot file.
        #[arg(long, short)]
        file: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// The reference lab in network namespaces (needs root; runs `snatgw-lab lab ...`).
    #[command(disable_help_flag = true)]
    Lab(lab::ToolArgs),
    /// Benchmark snatgw against the kernel's nftables masquerade in the same lab (needs root;
    /// runs `snatgw-lab race ...`).
    #[command(disable_help_flag = true)]
    Race(lab::ToolArgs),
    /// Predict SNAT exhaustion of a workload and compare mitigations (see docs/PLANNER.md).
    Plan(plan::PlanArgs),
    /// Whether a connection held idle survives the gateway's idle timeout with this host's
    /// TCP keepalive settings, and the SPEC R7.1 fix (exit 0 survives, 1 not, 2 no verdict).
    KeepaliveCheck(keepalive::KeepaliveArgs),
    /// A fleet's nodes, their leases, the instances each owns and its last takeover, as etcd
    /// holds them (issue #19, docs/FLEET.md).
    Fleet(fleet::FleetArgs),
    /// Clients of a running gateway's management API (see docs/API.md).
    #[command(flatten)]
    Api(api_cli::ApiCmd),
}

fn main() -> ExitCode {
    // `snatgw help lab|race [...]` is the lab tool's help too, as `snatgw lab --help` is.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "help") {
        if let Some(sub @ ("lab" | "race")) = args.get(2).and_then(|a| a.to_str()) {
            let mut rest: Vec<std::ffi::OsString> = args[3..].to_vec();
            rest.push("--help".into());
            return lab::exec(sub, &lab::ToolArgs { args: rest });
        }
    }
    let cli = Cli::parse_from(args);
    let result = match cli.cmd {
        Cmd::Show { config, json } => show::run(&config, json),
        Cmd::Run(a) => run::run(&a),
        Cmd::Stats { file, json } => {
            snatgw_runtime::stats::run(&file, json).map_err(|e| e.to_string())
        }
        // Replace this process with the lab tool; returns only if that fails.
        Cmd::Lab(a) => return lab::exec("lab", &a),
        Cmd::Race(a) => return lab::exec("race", &a),
        Cmd::Plan(a) => plan::run(&a),
        Cmd::Fleet(a) => fleet::status(&a),
        // Exit 0 survives, 1 does not, 2 no verdict (docs/OPERATIONS.md).
        Cmd::KeepaliveCheck(a) => return keepalive::main(&a),
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
