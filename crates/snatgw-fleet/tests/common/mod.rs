//! A real etcd server for tests: `etcd` (Debian `etcd-server` 3.4) on random free loopback
//! ports with a fresh data directory, killed and removed when the guard drops, also when the
//! test fails. Without the binary a test is skipped, unless `SNATGW_REQUIRE_ROOT=1` is set
//! (CI), which makes it a failure, as the lab tests' `root_or_skip` does.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set to `1` to make a missing etcd (or missing root for the lab) a test failure.
pub const REQUIRE_ENV: &str = "SNATGW_REQUIRE_ROOT";

pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub client_port: u16,
    pub peer_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn etcd_binary() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("etcd"))
            .find(|f| f.is_file())
    })
}

/// Whether etcd tests can run here; panics instead of skipping when `SNATGW_REQUIRE_ROOT=1`.
pub fn etcd_or_skip() -> bool {
    if etcd_binary().is_some() {
        return true;
    }
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("this test needs the etcd binary (Debian etcd-server) and {REQUIRE_ENV}=1 is set: refusing to skip it");
    }
    eprintln!("skipped: no etcd binary (apt-get install etcd-server; set {REQUIRE_ENV}=1 to make this a failure)");
    false
}

impl EtcdServer {
    /// Starts a fresh single-member etcd and waits until it answers (None: skipped).
    pub fn start() -> Option<EtcdServer> {
        if !etcd_or_skip() {
            return None;
        }
        // On tmpfs when there is one: etcd fsyncs every write, and a disk shared with parallel
        // builds can stall an fsync for seconds (the test would see etcd as down).
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("temp dir");
        let mut s = EtcdServer {
            child: None,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
        };
        s.spawn();
        Some(s)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("log file");
        let child = Command::new(etcd_binary().expect("etcd"))
            .arg("--name=t")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t={peer}"))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Whether etcd answers `GET /health` with `"health":"true"` (it has a raft leader).
    fn healthy(&self) -> bool {
        let Ok(mut c) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
        if c.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = c.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.healthy() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        panic!("etcd did not become healthy within 15 s; its log:\n{log}");
    }

    /// Kills etcd (SIGKILL), keeping its data directory.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same data and ports.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("etcd log (last lines, newest first):\n{}", tail.join("\n"));
        }
        // The TempDir removes the data directory after this.
    }
}
