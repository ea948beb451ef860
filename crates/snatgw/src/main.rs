//! `snatgw`: the command line. Subcommands:
//! - `show --config FILE`: what the engine makes of a configuration (scenario, public IP,
//!   preallocated ports and block per instance, and the SPEC rule that decided it).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Show { config, json } => show::run(&config, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snatgw: {e}");
            ExitCode::FAILURE
        }
    }
}
