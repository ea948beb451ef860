//! Running external commands with a time limit.
//!
//! What it does: spawns a command with piped stdout/stderr (and optional stdin), drains the
//! pipes on helper threads so the child never blocks on a full pipe, and kills the child
//! (by its handle) when the time limit passes.
//!
//! What it does not do: decide which namespace a command runs in (callers build
//! `ip -n NS ...` / `ip netns exec NS ...` command lines; see `lab.rs`).

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::LabError;

/// Default limit for one setup command (`ip`, `sysctl`, `nft`, `ethtool`).
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Human-readable command line, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion within `timeout`, feeding it `stdin` if given.
pub(crate) fn run(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, LabError> {
    let what = describe(cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
        cmd: what.clone(),
        source,
    })?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(std::thread::spawn(move || {
                // The child may exit without reading everything: ignore EPIPE.
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let out_reader = child.stdout.take().map(drain);
    let err_reader = child.stderr.take().map(drain);
    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LabError::Timeout { cmd: what, timeout });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LabError::Spawn { cmd: what, source });
            }
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out_reader.map(join_bytes).unwrap_or_default();
    let stderr = err_reader.map(join_bytes).unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Like [`run`], but a non-zero exit status is an error.
pub(crate) fn run_ok(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, LabError> {
    let out = run(cmd, stdin, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::CommandFailed {
            cmd: describe(cmd),
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn drain<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

fn join_bytes(h: std::thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    h.join().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_stdin_and_timeout() {
        let out = run(
            &mut Command::new("cat"),
            Some(b"hi"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(out.stdout, b"hi");
        let err = run_ok(&mut Command::new("false"), None, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, LabError::CommandFailed { .. }), "{err}");
        let t = Instant::now();
        let err = run(
            Command::new("sleep").arg("10"),
            None,
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(matches!(err, LabError::Timeout { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
