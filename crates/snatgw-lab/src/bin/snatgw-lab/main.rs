//! `snatgw-lab`: snatgw's lab tools, kept out of the production `snatgw` binary (issue #16).
//! Subcommands:
//! - `lab up|down|demo`: the reference lab in network namespaces with the gateway running
//!   ([`lab`], [`lab_inbound`]; docs/RUNNING.md);
//! - `race`: snatgw against the kernel's nftables masquerade in the same lab ([`race`];
//!   docs/PERFORMANCE.md);
//! - hidden `lab-server serve|client ...`: the lab's servers and clients
//!   ([`snatgw_lab::cli`]), which the lab starts from this same binary.
//!
//! Users normally run it through `snatgw lab ...` and `snatgw race ...`, which exec this
//! binary with every argument (`snatgw-lab lab ...`, `snatgw-lab race ...`), found next to
//! `snatgw` or on PATH, and set `SNATGW_GATEWAY_BIN` to that `snatgw`. The gateway the lab runs
//! (`snatgw run`) is [`gateway_bin`]: `$SNATGW_GATEWAY_BIN`, else `snatgw` next to this
//! binary, else `snatgw` on PATH.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod lab;
mod lab_inbound;
mod race;

/// snatgw's lab tools: the reference lab in network namespaces and the race against kernel NAT
/// (usually run as `snatgw lab ...` and `snatgw race ...`).
#[derive(Parser, Debug)]
#[command(name = "snatgw-lab", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The reference lab in network namespaces (needs root).
    #[command(subcommand)]
    Lab(lab::LabCmd),
    /// Benchmark snatgw against the kernel's nftables masquerade in the same lab (needs root).
    Race(race::RaceArgs),
}

/// The variable naming the `snatgw` binary the lab runs as its gateway; `snatgw lab|race` set
/// it to themselves.
pub const GATEWAY_BIN_ENV: &str = "SNATGW_GATEWAY_BIN";

/// The `snatgw` binary the lab runs as its gateway (`snatgw run`): `$SNATGW_GATEWAY_BIN`, else
/// `snatgw` next to this binary, else `snatgw` on PATH.
pub fn gateway_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(GATEWAY_BIN_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "{GATEWAY_BIN_ENV}={}: no such file (the snatgw binary)",
                p.display()
            ))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating this binary: {e}"))?;
    if let Some(p) = exe
        .parent()
        .map(|d| d.join("snatgw"))
        .filter(|p| p.is_file())
    {
        return Ok(p);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("snatgw"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "the snatgw binary (the gateway) is neither next to {} nor on PATH: build it with \
                 `cargo build -p snatgw` (same profile), or set {GATEWAY_BIN_ENV}",
                exe.display()
            )
        })
}

/// This binary (its servers and clients are `<this> lab-server serve|client`).
pub fn this_bin() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("locating this binary: {e}"))
}

/// The program name for messages: `snatgw` when run as `snatgw lab|race` (which pass their
/// own name as argv[0]), else `snatgw-lab`.
fn prog_name(argv0: Option<&std::ffi::OsStr>) -> String {
    argv0
        .and_then(|a| Path::new(a).file_name())
        .map_or_else(|| "snatgw-lab".into(), |n| n.to_string_lossy().into_owned())
}

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Hidden: `snatgw-lab lab-server serve|client ...` runs the lab's servers and clients.
    if args.get(1).is_some_and(|a| a == "lab-server") {
        args.remove(1);
        return snatgw_lab::cli::main_with_args(args);
    }
    let prog = prog_name(args.first().map(|a| a.as_os_str()));
    let cli = Cli::parse_from(args);
    let result = match cli.cmd {
        Cmd::Lab(c) => lab::run(c),
        Cmd::Race(a) => race::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{prog}: {e}");
            ExitCode::FAILURE
        }
    }
}
