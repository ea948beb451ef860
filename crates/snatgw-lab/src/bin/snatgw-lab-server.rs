//! `snatgw-lab-server`: the lab's destination servers (`serve`, run in the internet
//! namespace) and their clients (`client ...`, run in instance namespaces). Clients print
//! one JSON `ClientReport` line and exit 0 when nothing failed,
//! 1 otherwise; the server prints `{"event":"ready",...}` once it listens.
//! The command line itself lives in [`snatgw_lab::cli`].

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    snatgw_lab::cli::main_with_args(std::env::args_os())
}
