//! snatgw-lab: the reference lab for snatgw, built in Linux network namespaces.
//!
//! What it does:
//! - [`LabSpec`] / [`Lab`]: instances (`<prefix>i-<name>`), a gateway (`<prefix>gw`) and an
//!   internet (`<prefix>inet`) namespace wired with veths and a bridge, in one of two
//!   gateway modes: [`GatewayMode::Snatgw`] (policy routing into a TUN the userspace gateway
//!   creates) or [`GatewayMode::Kernel`] (nftables NAT, the baseline). Everything is removed
//!   again by [`Lab::down`] or on drop.
//! - [`server`] and [`client`]: the destination servers (echo, "which IP am I" over HTTP and
//!   DNS, connection hold) and their clients, run by the `snatgw-lab-server` binary (and by
//!   `snatgw-lab lab-server`).
//!
//! Binaries of this crate: `snatgw-lab-server`, and `snatgw-lab`, snatgw's lab tools outside the
//! production binary (issue #16): `lab up|down|demo` and `race`, which `snatgw lab ...` and
//! `snatgw race ...` exec (`src/bin/snatgw-lab/`). Only that binary uses the gateway's crates
//! (`snatgw-runtime`, `snatgw-control`); this library uses `snatgw-core` alone.
//! - [`dns`]: the minimal DNS encoding they share.
//!
//! What it does not do: run the gateway itself, or touch anything outside its namespaces
//! (the host's interfaces, routes and firewall are never changed). Needs root and the
//! Debian packages `iproute2`, `nftables`, `ethtool` and `procps` (see the README).
//!
//! ```no_run
//! use std::net::Ipv4Addr;
//! use snatgw_lab::{GatewayMode, KernelNat, Lab, LabSpec};
//!
//! let spec = LabSpec::new("ex1-")
//!     .with_instance("a", Ipv4Addr::new(10, 0, 0, 2))
//!     .with_mode(GatewayMode::Kernel(KernelNat::Masquerade));
//! let lab = Lab::up(spec)?;
//! let out = lab.exec(&lab.ns_name("a"), &["ping", "-c1", "-W1", "203.0.113.100"])?;
//! # let _ = out;
//! drop(lab); // deletes every `ex1-*` namespace
//! # Ok::<(), snatgw_lab::LabError>(())
//! ```

#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
mod cmd;
pub mod dns;
pub mod gateway;
mod lab;
pub mod server;
mod spec;

use std::time::Duration;

pub use client::ClientReport;
pub use lab::{
    down_prefix, gateway_routing_up, list_namespaces, nft_ruleset, Lab, LabChild, EXEC_TIMEOUT,
    GATEWAY_ROUTING_SH,
};
pub use spec::*;

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// The spec (or a command given to the lab) is invalid.
    #[error("invalid lab spec: {0}")]
    InvalidSpec(String),
    /// A required program is not installed.
    #[error("{0} not found: install the Debian packages iproute2, nftables, ethtool, procps")]
    MissingTool(&'static str),
    /// A command could not be started.
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("`{cmd}` failed (exit code {code:?}): {stderr}")]
    CommandFailed {
        /// The command line.
        cmd: String,
        /// Exit code, if it exited normally.
        code: Option<i32>,
        /// Its standard error.
        stderr: String,
    },
    /// A command or wait did not finish in time (the command was killed).
    #[error("`{cmd}` did not finish within {timeout:?}")]
    Timeout {
        /// The command line or what was awaited.
        cmd: String,
        /// The limit.
        timeout: Duration,
    },
    /// A namespace that is not part of this lab was named.
    #[error("namespace {0} is not part of this lab")]
    NotInLab(String),
    /// An operation that needs the other gateway mode.
    #[error("wrong gateway mode: {0}")]
    WrongMode(&'static str),
    /// A program's output could not be understood.
    #[error("unexpected output from `{cmd}`: {reason}")]
    BadOutput {
        /// The command line.
        cmd: String,
        /// What was wrong.
        reason: String,
    },
    /// Namespaces with the lab's prefix are still present after tear-down.
    #[error("namespaces left after tear-down: {0}")]
    Cleanup(String),
}

/// Raises this process's soft open-files limit to its hard limit (for servers and clients
/// that hold thousands of connections). Best effort.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Whether this process runs as root (effective UID 0), as the lab requires.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Environment variable that turns a skipped root-only test into a failure (CI sets it).
pub const REQUIRE_ROOT_ENV: &str = "SNATGW_REQUIRE_ROOT";

/// For tests that need root (namespaces, TUN, raw sockets): `true` when running as root.
/// Otherwise prints a skip line and returns `false`, unless `SNATGW_REQUIRE_ROOT=1` is set,
/// in which case it panics, so a CI run without root fails instead of passing silently.
pub fn root_or_skip() -> bool {
    if is_root() {
        return true;
    }
    if std::env::var(REQUIRE_ROOT_ENV).is_ok_and(|v| v == "1") {
        panic!("this test needs root and {REQUIRE_ROOT_ENV}=1 is set: refusing to skip it");
    }
    eprintln!("skipped: needs root (set {REQUIRE_ROOT_ENV}=1 to make this a failure)");
    false
}
