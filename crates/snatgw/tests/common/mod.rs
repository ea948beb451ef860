//! Shared harness of the lab tests: a lab derived from a configuration, the lab's servers
//! and `snatgw run` in the gateway namespace, torn down on drop (also when an assertion
//! fails: `Lab`'s drop kills every process in the lab's namespaces, the gateway included,
//! and deletes them).
//!
//! For the control plane (issue #8): [`GwLab::api`] runs a [`Client`] of the gateway's API
//! on a thread inside the gateway namespace (the API listens on that namespace's loopback),
//! [`GwLab::restart`] starts the gateway again on the same state directory, and
//! [`GwLab::hold_conns`] / [`probe`] / [`close_confirmed`] hold real TCP connections in the
//! test process and tell which of them the gateway still translates.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use snatgw_control::backend::PortRange;
use snatgw_control::Client;
use snatgw_lab::gateway::{spec_from_config, start_gateway, stop_gateway, GatewayOptions};
use snatgw_lab::{ClientReport, Lab, LabChild};

pub const BIN: &str = env!("CARGO_BIN_EXE_snatgw");

/// The lab tool, `snatgw-lab` (crate `snatgw-lab`, issue #16): the lab's servers and clients
/// are `snatgw-lab lab-server serve|client ...`. Another package's binary has no
/// `CARGO_BIN_EXE_*` here, so it is taken beside [`BIN`], in the same target directory and
/// profile: `cargo test --workspace` (and `--all-targets --no-run`, as scripts/test-all.sh
/// runs first) builds it there, as a binary of a package with integration tests. Panics,
/// saying how to build it, when it is not there (`cargo test -p snatgw` alone does not).
pub fn lab_bin() -> &'static str {
    static LAB_BIN: OnceLock<String> = OnceLock::new();
    LAB_BIN.get_or_init(|| {
        let p = Path::new(BIN).with_file_name("snatgw-lab");
        assert!(
            p.is_file(),
            "the lab tool {} is missing (the lab tests run their servers and clients with it): \
             build it into the same target directory first, e.g. `cargo test --workspace \
             --all-targets --no-run` or `cargo build --profile test -p snatgw-lab`",
            p.display()
        );
        p.to_string_lossy().into_owned()
    })
}

pub const SERVER_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
pub const SERVER_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 101);
pub const SERVER_DNS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
pub const T: Duration = Duration::from_secs(60);

/// Whether the test can run (root); fails instead of skipping when `SNATGW_REQUIRE_ROOT=1`.
pub fn root_or_skip() -> bool {
    snatgw_lab::root_or_skip()
}

pub fn lab_toml() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/lab.toml");
    std::fs::read_to_string(p).expect("examples/lab.toml")
}

pub struct GwLab {
    pub lab: Lab,
    pub gw: LabChild,
    pub dir: PathBuf,
    pub stats: PathBuf,
    pub config: PathBuf,
    /// How the gateway was started (kept for [`GwLab::restart`]).
    pub opts: GatewayOptions,
    /// Bearer token [`GwLab::api`] sends: the gateway's (its `--token-file`, else the one it
    /// generated in its state directory), read after every start.
    pub token: Option<String>,
    /// Gateway starts so far (1 after [`GwLab::start`]).
    pub starts: u32,
}

impl GwLab {
    /// Lab with prefix `sg<tag><pid>-`, instances of `config` (or those in `only`).
    pub fn start(tag: &str, config: &str, only: Option<&[&str]>) -> GwLab {
        GwLab::start_with(tag, config, only, |_, _| {})
    }

    /// [`GwLab::start`], with `customize(options, dir)` adjusting the gateway's options
    /// before its first start (`dir` is the test's directory, e.g. for a token file).
    pub fn start_with(
        tag: &str,
        config: &str,
        only: Option<&[&str]>,
        customize: impl FnOnce(&mut GatewayOptions, &Path),
    ) -> GwLab {
        let lab_bin = lab_bin();
        let prefix = format!("sg{tag}{}-", std::process::id() % 100_000);
        let dir =
            std::env::temp_dir().join(format!("snatgw-test-{}", prefix.trim_end_matches('-')));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg_path = dir.join("gw.toml");
        std::fs::write(&cfg_path, config).unwrap();
        let cfg = snatgw_core::ConfigFile::from_toml(config).expect("config parses");
        let spec = spec_from_config(&prefix, &cfg, only).expect("spec");
        let mut lab = Lab::up(spec).expect("lab up");
        lab.set_server_subcommand(Some("lab-server"));
        lab.start_servers(Path::new(lab_bin), "snatgw.test")
            .expect("servers");
        let stats = dir.join("stats.json");
        let _ = std::fs::remove_file(&stats);
        let mut opts = GatewayOptions {
            extra: vec!["--stats-interval-ms".into(), "200".into()],
            ..GatewayOptions::new(BIN.into(), cfg_path.clone(), 2, stats.clone())
        };
        customize(&mut opts, &dir);
        let gw = start_gateway(&lab, &opts).expect("gateway started");
        let token = opts.api_token();
        GwLab {
            lab,
            gw,
            dir,
            stats,
            config: cfg_path,
            opts,
            token,
            starts: 1,
        }
    }

    /// The gateway's log of its latest start.
    pub fn log(&self) -> String {
        self.opts
            .log_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Starts the gateway again, on the same state directory (`fresh_state: false`) and the
    /// same configuration file path (a test may rewrite it, or add flags to `opts.extra`),
    /// after it stopped or was killed. Its log goes to
    /// `gateway-<n>.log`; the stats file is removed first so snapshots are the new run's.
    pub fn restart(&mut self) {
        assert!(
            self.gw.try_wait().expect("wait").is_some(),
            "stop or kill the gateway before restarting it"
        );
        self.starts += 1;
        self.opts.fresh_state = false;
        self.opts.log_file = Some(self.dir.join(format!("gateway-{}.log", self.starts)));
        let _ = std::fs::remove_file(&self.stats);
        self.gw = start_gateway(&self.lab, &self.opts).expect("gateway restarted");
        self.token = self.opts.api_token();
    }

    /// The API's base URL (inside the gateway namespace).
    pub fn api_url(&self) -> String {
        format!("http://{}", self.opts.api)
    }

    /// Runs `f` with an API client (sending [`GwLab::token`]) on a thread inside the gateway
    /// namespace, where the API listens, and returns its result.
    pub fn api<T: Send + 'static>(&self, f: impl FnOnce(&Client) -> T + Send + 'static) -> T {
        self.api_as(self.token.clone(), f)
    }

    /// [`GwLab::api`] with the given token (or none).
    pub fn api_as<T: Send + 'static>(
        &self,
        token: Option<String>,
        f: impl FnOnce(&Client) -> T + Send + 'static,
    ) -> T {
        let c = Client::new(&self.api_url(), token);
        self.in_ns(&self.lab.gw_ns(), move || f(&c))
    }

    /// [`GwLab::api`] on a thread left running: join it before the lab goes down.
    pub fn spawn_api<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Client) -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let c = Client::new(&self.api_url(), self.token.clone());
        self.lab
            .spawn_thread_in(&self.lab.gw_ns(), move || f(&c))
            .expect("thread in the gateway namespace")
    }

    /// Opens `n` TCP connections from `instance` to the hold server at `dst` (at most 16
    /// connecting at once, each within `timeout`), reads each greeting (the `ip:port` the
    /// server saw) and keeps them open in this process. Returns the connections and the
    /// number of attempts that failed. Every connection gets `TCP_USER_TIMEOUT`
    /// [`USER_TIMEOUT_MS`], so data that is never acknowledged aborts it (see [`probe`]).
    pub fn hold_conns(
        &self,
        instance: &str,
        dst: SocketAddr,
        n: usize,
        timeout: Duration,
    ) -> (Vec<Held>, usize) {
        self.in_instance(instance, move || {
            let next = Mutex::new(0usize);
            let out: Mutex<(Vec<Held>, usize)> = Mutex::new((Vec::with_capacity(n), 0));
            std::thread::scope(|sc| {
                for _ in 0..n.clamp(1, 16) {
                    // Threads spawned here inherit this thread's network namespace.
                    sc.spawn(|| loop {
                        {
                            let mut k = next.lock().unwrap();
                            if *k >= n {
                                return;
                            }
                            *k += 1;
                        }
                        let r = Held::open(dst, timeout);
                        let mut o = out.lock().unwrap();
                        match r {
                            Ok(h) => o.0.push(h),
                            Err(_) => o.1 += 1,
                        }
                    });
                }
            });
            out.into_inner().unwrap()
        })
    }

    pub fn client(&self, instance: &str, args: &[&str]) -> ClientReport {
        self.lab
            .client(instance, Path::new(lab_bin()), args, T)
            .expect("client ran")
    }

    pub fn spawn_client(&self, instance: &str, args: &[&str]) -> LabChild {
        let mut argv = vec![lab_bin(), "lab-server", "client"];
        argv.extend_from_slice(args);
        self.lab
            .spawn(&self.lab.ns_name(instance), &argv)
            .expect("spawn client")
    }

    pub fn snapshot(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(t) = std::fs::read(&self.stats) {
                if let Ok(v) = serde_json::from_slice::<Value>(&t) {
                    return v;
                }
            }
            assert!(Instant::now() < deadline, "no stats file");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The instance's entry in the latest snapshot.
    pub fn inst(&self, name: &str) -> Value {
        inst_of(&self.snapshot(), name)
    }

    /// Waits (bounded) until `f(snapshot)`; returns whether it happened.
    pub fn wait(&self, timeout: Duration, f: impl Fn(&Value) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if f(&self.snapshot()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `f` on a thread inside instance `name`'s namespace and returns its result.
    pub fn in_instance<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        self.in_ns(&self.lab.ns_name(name), f)
    }

    pub fn in_ns<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.lab
            .spawn_thread_in(ns, f)
            .expect("thread in namespace")
            .join()
            .expect("namespace thread panicked")
    }

    /// Stops the gateway (SIGTERM), checks it exits 0 and wrote its final snapshot, and
    /// removes the lab.
    pub fn finish(mut self) {
        assert!(
            stop_gateway(&self.gw, Duration::from_secs(5)),
            "gateway did not exit cleanly on SIGTERM"
        );
        assert_eq!(self.snapshot()["final_snapshot"], true);
        let prefix = self.lab.spec().prefix.clone();
        self.lab.down().expect("lab down");
        assert!(snatgw_lab::list_namespaces(&prefix).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `TCP_USER_TIMEOUT` of the connections [`GwLab::hold_conns`] opens: data unacknowledged
/// this long aborts the connection (`ETIMEDOUT`).
pub const USER_TIMEOUT_MS: u32 = 2000;

/// A TCP connection to the lab's hold server, held open by the test.
pub struct Held {
    pub stream: TcpStream,
    /// Its private (instance-side) address.
    pub local: SocketAddrV4,
    /// The address the server saw: the public IP and SNAT port (or the ILPIP and own port).
    pub seen: SocketAddrV4,
}

impl Held {
    /// Connects (within `timeout`) and reads the greeting.
    pub fn open(dst: SocketAddr, timeout: Duration) -> std::io::Result<Held> {
        let mut s = TcpStream::connect_timeout(&dst, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        nix::sys::socket::setsockopt(
            &s,
            nix::sys::socket::sockopt::TcpUserTimeout,
            &USER_TIMEOUT_MS,
        )?;
        let local = match s.local_addr()? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => return Err(std::io::Error::other("IPv6")),
        };
        let mut line = Vec::with_capacity(32);
        let mut b = [0u8; 1];
        while line.len() < 64 {
            match s.read(&mut b)? {
                0 => return Err(std::io::Error::other("closed before the greeting")),
                _ if b[0] == b'\n' => break,
                _ => line.push(b[0]),
            }
        }
        let seen = String::from_utf8_lossy(&line)
            .trim()
            .parse()
            .map_err(|_| std::io::Error::other("bad greeting"))?;
        Ok(Held {
            stream: s,
            local,
            seen,
        })
    }

    /// The public port the server saw (the SNAT port under PAT).
    pub fn port(&self) -> u16 {
        self.seen.port()
    }

    /// Whether the connection has failed (error, reset, abort or closed), without
    /// consuming data.
    fn failed(&self) -> bool {
        if !matches!(self.stream.take_error(), Ok(None)) {
            return true;
        }
        if self.stream.set_nonblocking(true).is_err() {
            return true;
        }
        let r = self.stream.peek(&mut [0u8; 1]);
        let _ = self.stream.set_nonblocking(false);
        match r {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != ErrorKind::WouldBlock,
        }
    }
}

/// Sends one byte on every connection and returns the indices of those that failed. A
/// connection whose packets the gateway no longer translates gets no acknowledgement and
/// the kernel aborts it after [`USER_TIMEOUT_MS`] (or the server resets it). Waits (bounded,
/// 20 s) until every connection in `expect_failed` has failed, and in any case until the
/// user timeout plus 3 s have passed since the bytes were sent, so a connection whose byte
/// was not acknowledged cannot pass as working.
pub fn probe(conns: &[Held], expect_failed: &BTreeSet<usize>) -> BTreeSet<usize> {
    let mut failed = BTreeSet::new();
    for (i, h) in conns.iter().enumerate() {
        if (&h.stream).write_all(b"p").is_err() {
            failed.insert(i);
        }
    }
    let sent = Instant::now();
    let min = Duration::from_millis(u64::from(USER_TIMEOUT_MS)) + Duration::from_secs(3);
    let deadline = sent + Duration::from_secs(20);
    loop {
        for (i, h) in conns.iter().enumerate() {
            if !failed.contains(&i) && h.failed() {
                failed.insert(i);
            }
        }
        let now = Instant::now();
        if now >= deadline || (now >= sent + min && expect_failed.is_subset(&failed)) {
            return failed;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Half-closes every connection and counts those that see the server's FIN in return
/// (bounded, 10 s; the hold server closes when it reads the client's FIN): proof that each
/// still translates in both directions.
pub fn close_confirmed(conns: Vec<Held>) -> usize {
    let mut pending: Vec<Held> = Vec::with_capacity(conns.len());
    for h in conns {
        if h.stream.shutdown(Shutdown::Write).is_ok() && h.stream.set_nonblocking(true).is_ok() {
            pending.push(h);
        }
    }
    let mut confirmed = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 64];
    while !pending.is_empty() && Instant::now() < deadline {
        pending.retain_mut(|h| loop {
            match h.stream.read(&mut buf) {
                Ok(0) => {
                    confirmed += 1;
                    return false;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    confirmed
}

/// The ports of a block given as ranges.
pub fn block_ports(block: &[PortRange]) -> BTreeSet<u16> {
    block.iter().flat_map(|r| r.first..=r.last).collect()
}

/// The value of the Prometheus sample `name` whose labels are exactly `labels` (any order).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, mut got) = match series.split_once('{') {
            Some((n, rest)) => {
                let inner = rest.strip_suffix('}')?;
                let got: Vec<(String, String)> = inner
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once("=\"")?;
                        Some((k.to_string(), v.trim_end_matches('"').to_string()))
                    })
                    .collect::<Option<_>>()?;
                (n, got)
            }
            None => (series, Vec::new()),
        };
        got.sort();
        (n == name && got == want).then(|| value.parse().ok())?
    })
}

/// Instance `name`'s entry in snapshot `s`.
pub fn inst_of(s: &Value, name: &str) -> Value {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no instance {name} in stats"))
}

pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}
