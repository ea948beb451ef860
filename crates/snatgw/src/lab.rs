//! `snatgw lab ...` and `snatgw race ...`: external subcommands (issue #16). The lab, its demo,
//! the race and the lab's servers live in their own binary, `snatgw-lab` (crate `snatgw-lab`),
//! so the production binary links none of them; these two subcommands replace this process
//! with `snatgw-lab lab ARGS` / `snatgw-lab race ARGS`, git-style: every argument (`--help`
//! included), stdin/stdout/stderr and the exit status are the lab tool's.
//!
//! Where: `snatgw-lab` next to this binary (`std::env::current_exe()`'s directory, as cargo
//! builds both into the same `target/<profile>/`), else on PATH. The tool gets
//! `SNATGW_GATEWAY_BIN` = this binary, so the gateway it runs is the `snatgw` the user ran, and
//! argv[0] = ours, so its usage lines read `snatgw lab ...`.
//!
//! What it does not do: parse the arguments (the lab tool does).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use clap::Args;

/// The lab tool's binary.
pub const TOOL: &str = "snatgw-lab";

/// Everything after `snatgw lab` / `snatgw race`, passed on unparsed.
#[derive(Args, Debug)]
pub struct ToolArgs {
    /// Arguments of `snatgw-lab lab|race` (see `snatgw lab --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0.., value_name = "ARGS")]
    pub args: Vec<OsString>,
}

/// Execs `snatgw-lab <sub> <args>`; returns only if that fails (after printing why).
pub fn exec(sub: &str, a: &ToolArgs) -> ExitCode {
    let this = std::env::current_exe().ok();
    let beside = this
        .as_deref()
        .and_then(|e| e.parent())
        .map(|d| d.join(TOOL))
        .filter(|p| p.is_file());
    let mut cmd = match &beside {
        Some(p) => Command::new(p),
        // `Command` searches PATH for a bare name.
        None => Command::new(TOOL),
    };
    cmd.arg(sub).args(&a.args);
    if let Some(argv0) = std::env::args_os().next() {
        cmd.arg0(argv0);
    }
    if let Some(e) = &this {
        cmd.env("SNATGW_GATEWAY_BIN", e);
    }
    let err = cmd.exec();
    if err.kind() == std::io::ErrorKind::NotFound {
        let dir = this
            .as_deref()
            .and_then(|e| e.parent())
            .map_or_else(|| "this binary".into(), |d| d.display().to_string());
        eprintln!(
            "snatgw: the lab tools are not installed: `{TOOL}` is neither in {dir} nor on PATH; \
             build them with `cargo build -p snatgw-lab` (with `--release` for target/release)"
        );
        ExitCode::from(127)
    } else {
        let what = beside.map_or_else(|| TOOL.into(), |p| p.display().to_string());
        eprintln!("snatgw: cannot run {what}: {err}");
        ExitCode::from(126)
    }
}
