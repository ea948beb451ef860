//! The fleet lab of issue #19 (SPEC §10): several `snatgw run --fleet` nodes on one etcd, with
//! ECMP on both sides, real sockets and recording servers. Used by `tests/lab_fleet.rs`
//! (included there with `#[path]`; the other lab tests' `common` module is not touched).
//!
//! Topology (every namespace is `<prefix><name>`, created here and removed on drop, also when
//! a test panics; nothing outside them is changed):
//!
//! ```text
//!  i0..iN (instances)        lan              gw1..gwG                 inet (router)      srv
//!  eth0 10.0.1.x/16 ──── br0 (bridge) ──── br-priv 10.0.0.k/16
//!   default: ECMP                           gw-inet 198.51.100.(4k+2)/30 ── r-gwk .(4k+1)
//!   via 10.0.0.1..G                         fleet0 10.9.0.k/24 ─┐          203.0.113.0/27:    eth0 203.0.113.250/30
//!   (hash policy 1)                                             │          ECMP via the gws   lo 203.0.113.100, .101
//!                                         mgmt: br-fleet 10.9.0.254/24     (hash policy 1)    (recording servers,
//!                                               etcd on 10.9.0.254:2379                        in this process)
//! ```
//!
//! - The instances reach the internet through an ECMP default route over the started gateways
//!   (`net.ipv4.fib_multipath_hash_policy=1`, so flows hash by L4); the router reaches the shared
//!   public IPs (203.0.113.10, .11 in 203.0.113.0/27) through an ECMP route over the same
//!   gateways. A test removes a node's next hop from both right after killing it, as a
//!   router's health check would.
//! - Each gateway namespace runs `snatgw run --fleet etcd://10.9.0.254:2379 --node-id gwK
//!   --fleet-link 10.9.0.K:7946` with the same configuration file, and its routing is
//!   `scripts/gateway-routing.sh up` for one gateway (`snatgw_lab::gateway_routing_up`: the
//!   private side `br-priv`, the public side `gw-inet`).
//! - etcd runs in `mgmt`, on the fleet bridge, reachable from the gateway namespaces only
//!   (instances, router and servers have no route to 10.9.0.0/24). The fleet bridge and its
//!   veths have MTU 9000 (a fabric with room for encapsulated steered packets).
//! - The router marks every packet it receives from gateway K with DSCP K; the server
//!   namespace has `net.ipv4.tcp_reflect_tos=1`, so an accepted socket's `IP_TOS` is the SYN's:
//!   the servers' records say which node translated each connection's SYN ([`SrvRecord::via`]).
//! - Counters (nftables, inside the lab's namespaces): packets to each gateway from the
//!   instances (`lan`), from/to each gateway at the router, resets to/from the servers, and
//!   packets between gateways over the fleet bridge.
//!
//! Addresses: private 10.0.0.0/16 (the VNet) and 10.9.0.0/24 (the fleet's management network,
//! as in docs/FLEET.md); public 198.51.100.0/24 and 203.0.113.0/24 (documentation ranges).
//! Offloads are off on every veth, `rp_filter` 0 and forwarding set explicitly everywhere.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use snatgw_control::Client;
use snatgw_fleet::{rendezvous, NodeId, Resource};

/// The `snatgw` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_snatgw");
/// The recording servers (on `lo` of the server namespace), all on [`SRV_PORT`].
pub const SERVERS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 100),
    Ipv4Addr::new(203, 0, 113, 101),
];
/// The recording servers' port.
pub const SRV_PORT: u16 = 9000;
/// The fleet's shared public IPs (the default SNAT pool), inside [`PUBLIC_ROUTE`].
pub const PUBLIC_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 10),
    Ipv4Addr::new(203, 0, 113, 11),
];
/// What the router sends through the gateways (ECMP).
pub const PUBLIC_ROUTE: &str = "203.0.113.0/27";
/// etcd's client address (on the fleet bridge, in `mgmt`).
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 254);
pub const ETCD_PORT: u16 = 2379;
/// The port of every node's `--fleet-link`.
pub const FLEET_LINK_PORT: u16 = 7946;
/// Instances in the lab.
pub const INSTANCES: usize = 6;
/// The API inside every gateway namespace.
const API: &str = "127.0.0.1:7070";
const TUN_PRIVATE: &str = "snat-priv";
const TUN_PUBLIC: &str = "snat-pub";

/// A gateway's address on the private side (the instances' next hop).
pub fn gw_private_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, k as u8)
}

/// A gateway's address on its link to the router (a /30 per gateway).
pub fn gw_public_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, (4 * k + 2) as u8)
}

/// The router's address on its link to gateway `k`.
pub fn router_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, (4 * k + 1) as u8)
}

/// A gateway's address on the fleet bridge (its `--fleet-link`).
pub fn gw_fleet_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 9, 0, k as u8)
}

// ---- namespaces and commands ---------------------------------------------------------------

/// Runs `f` on a new thread inside network namespace `ns` (`setns(2)` on that thread only;
/// threads it spawns inherit the namespace).
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    let (tx, rx) = mpsc::channel();
    let h = std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            let r = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET);
            let ok = r.is_ok();
            let _ = tx.send(r);
            // Never run `f` in the wrong namespace.
            assert!(ok, "setns failed");
            f()
        })
        .expect("thread");
    rx.recv()
        .expect("setns answer")
        .unwrap_or_else(|e| panic!("setns {ns}: {e}"));
    h
}

/// [`spawn_in`] and join (a panic inside is resumed here).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in(ns, f)
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn run(argv: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", argv.join(" ")));
    if let Some(text) = stdin {
        let mut i = child.stdin.take().expect("stdin");
        i.write_all(text.as_bytes()).expect("write stdin");
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{}: {e}", argv.join(" ")))
}

fn run_ok(argv: &[&str], stdin: Option<&str>) -> Output {
    let o = run(argv, stdin);
    assert!(
        o.status.success(),
        "`{}` failed ({}): {}{}",
        argv.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stderr),
        stdin.map(|s| format!("\ninput:\n{s}")).unwrap_or_default()
    );
    o
}

// ---- processes -------------------------------------------------------------------------------

/// A process started in a lab namespace (`ip netns exec`, which execs in place: the PID is
/// the command's). Killed (SIGKILL, by its PID, then reaped) on drop.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
    lines: Mutex<Receiver<String>>,
    pub started: Instant,
}

impl Proc {
    fn spawn(ns: &str, argv: &[&str], log: &Path, stdout_to_log: bool) -> Proc {
        let logf = std::fs::File::create(log).expect("log file");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stderr(logf.try_clone().expect("log"));
        if stdout_to_log {
            c.stdout(logf);
        } else {
            c.stdout(Stdio::piped());
        }
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", argv.join(" ")));
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            // Drains stdout for the process's whole life (a full pipe would block it).
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
        }
        Proc {
            child,
            log: log.to_path_buf(),
            lines: Mutex::new(rx),
            started: Instant::now(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line containing `needle`, within `timeout`.
    fn wait_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let rx = lock(&self.lines);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL (our own child, by PID) and reap.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---- the lab ---------------------------------------------------------------------------------

/// How to build a [`FleetLab`].
#[derive(Debug, Clone)]
pub struct Opts {
    /// Short test tag (a-z), part of the namespace prefix.
    pub tag: &'static str,
    /// `--fleet-ttl-secs`.
    pub ttl_secs: u64,
    /// Gateway namespaces to build (nodes `gw1..=gateways`).
    pub gateways: usize,
    /// Nodes started (and put into both ECMP routes) by [`FleetLab::up`]: `gw1..=start`.
    pub start: usize,
    /// Pass `--fleet-link` (steering and flow replication, R10.3/R10.4).
    pub fleet_link: bool,
    /// The topology's `fin_timeout_secs` (R3.2; also how long a takeover holds ports, R10.4).
    pub fin_timeout_secs: u32,
}

/// One instance: a namespace with one address on the private bridge.
#[derive(Debug, Clone)]
pub struct Inst {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: String,
}

/// The lab; see the module docs. Dropping it kills every process it started (by PID) and
/// removes its namespaces.
pub struct FleetLab {
    pub prefix: String,
    pub dir: PathBuf,
    pub opts: Opts,
    pub ttl: Duration,
    pub insts: Vec<Inst>,
    pub config: PathBuf,
    token: String,
    token_file: PathBuf,
    nodes: Vec<Option<Proc>>,
    starts: Vec<u32>,
    etcd: Option<Proc>,
    etcd_starts: u32,
    etcd_data: PathBuf,
    /// Nodes in both ECMP routes.
    pub ecmp: BTreeSet<usize>,
    pub server: Option<RecServer>,
    /// The lab's time zero (for reports).
    pub t0: Instant,
    down: bool,
}

/// `snatgw run --help` mentions `--fleet-link` (steering, R10.3, is built).
pub fn binary_has_fleet_link() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let o = run(&[BIN, "run", "--help"], None);
        String::from_utf8_lossy(&o.stdout).contains("--fleet-link")
    })
}

/// Whether the lab can run (root, etcd); panics instead of skipping with
/// `SNATGW_REQUIRE_ROOT=1`.
pub fn lab_or_skip() -> bool {
    if !snatgw_lab::root_or_skip() {
        return false;
    }
    let etcd = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()));
    if etcd {
        return true;
    }
    if std::env::var(snatgw_lab::REQUIRE_ROOT_ENV).is_ok_and(|v| v == "1") {
        panic!("the fleet lab needs the etcd binary (Debian etcd-server) and SNATGW_REQUIRE_ROOT=1 is set: refusing to skip");
    }
    eprintln!("skipped: no etcd binary (apt-get install etcd-server)");
    false
}

/// The instance names: six of `vm0..vm199` chosen (by the fleet's own rendezvous hash) so that
/// with nodes gw1..gw3 each owns exactly two, and with gw4 joined gw4 owns at least one and
/// gw2 at least one (the partition test cuts gw2 in the four-node fleet).
pub fn instance_names() -> Vec<String> {
    let cands: Vec<String> = (0..200).map(|i| format!("vm{i}")).collect();
    let mut by_owner: BTreeMap<usize, Vec<&String>> = BTreeMap::new();
    for c in &cands {
        by_owner.entry(owner_of(c, &[1, 2, 3])).or_default().push(c);
    }
    let pairs = |k: usize| -> Vec<(&String, &String)> {
        let v = &by_owner[&k];
        let mut out = Vec::new();
        for (i, a) in v.iter().enumerate().take(12) {
            for b in v.iter().skip(i + 1).take(12) {
                out.push((*a, *b));
            }
        }
        out
    };
    for p1 in pairs(1) {
        for p2 in pairs(2) {
            for p3 in pairs(3) {
                let names = [p1.0, p1.1, p2.0, p2.1, p3.0, p3.1];
                let o4: Vec<usize> = names.iter().map(|n| owner_of(n, &[1, 2, 3, 4])).collect();
                if o4.contains(&4) && o4.contains(&2) {
                    return names.iter().map(|s| s.to_string()).collect();
                }
            }
        }
    }
    panic!("no instance names fit the fleet lab's ownership plan");
}

/// The rendezvous owner (R10.1) of instance `name` among nodes `gwK` for K in `live`.
pub fn owner_of(name: &str, live: &[usize]) -> usize {
    let ids: Vec<NodeId> = live
        .iter()
        .map(|k| NodeId::new(format!("gw{k}")).expect("node id"))
        .collect();
    let key = Resource::Instance(name.into()).key();
    let o = rendezvous::owner(&key, &ids).expect("a live node");
    o.as_str()[2..].parse().expect("gwK")
}

/// The lab's topology file (the same on every node).
pub fn config_toml(names: &[String], fin_timeout_secs: u32) -> String {
    let mut s = format!(
        "[gateway]\nseed = 19\nvnet_prefixes = [\"10.0.0.0/16\"]\n\
         default_snat_pool = [\"203.0.113.10\", \"203.0.113.11\"]\n\
         fin_timeout_secs = {fin_timeout_secs}\nrst_timeout_secs = 5\n",
    );
    for (i, n) in names.iter().enumerate() {
        s.push_str(&format!(
            "\n[[instance]]\nname = \"{n}\"\nprivate_ip = \"{}\"\n",
            inst_ip(i)
        ));
    }
    s
}

fn inst_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, 10 + i as u8)
}

impl FleetLab {
    /// Builds the lab, starts etcd, the recording servers and nodes `gw1..=opts.start`, puts
    /// them into both ECMP routes and waits until the fleet has converged (every instance held
    /// by its rendezvous owner, every node's data path agreeing).
    pub fn up(opts: Opts) -> FleetLab {
        snatgw_lab::raise_nofile_limit();
        let prefix = format!("fl{}{}-", opts.tag, std::process::id() % 100_000);
        assert!(snatgw_lab::valid_prefix(&prefix), "{prefix}");
        snatgw_lab::down_prefix(&prefix).expect("remove a crashed run's namespaces");
        let dir =
            std::env::temp_dir().join(format!("snatgw-test-{}", prefix.trim_end_matches('-')));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let shm = Path::new("/dev/shm");
        let etcd_data = if shm.is_dir() { shm } else { dir.as_path() }
            .join(format!("snatgw-etcd-{}", prefix.trim_end_matches('-')));
        let _ = std::fs::remove_dir_all(&etcd_data);
        let names = instance_names();
        let insts: Vec<Inst> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Inst {
                name: n.clone(),
                ip: inst_ip(i),
                ns: format!("{prefix}i{i}"),
            })
            .collect();
        let config = dir.join("fleet.toml");
        std::fs::write(&config, config_toml(&names, opts.fin_timeout_secs)).expect("config");
        let token = "fleet-lab-token".to_string();
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{token}\n")).expect("token");
        let g = opts.gateways;
        // The lab exists (and is torn down on drop) from here on, also if building fails.
        let mut lab = FleetLab {
            prefix,
            dir,
            ttl: Duration::from_secs(opts.ttl_secs),
            opts,
            insts,
            config,
            token,
            token_file,
            nodes: (0..g).map(|_| None).collect(),
            starts: vec![0; g],
            etcd: None,
            etcd_starts: 0,
            etcd_data,
            ecmp: BTreeSet::new(),
            server: None,
            t0: Instant::now(),
            down: false,
        };
        lab.build();
        lab.etcd_start();
        let srv = lab.ns("srv");
        lab.server = Some(RecServer::start(&srv));
        let start = lab.opts.start;
        for k in 1..=start {
            lab.start_node(k);
        }
        lab.set_ecmp(&(1..=start).collect::<Vec<_>>());
        let live: Vec<usize> = (1..=start).collect();
        let took = lab.wait_converged(&live, lab.ttl * 3 + Duration::from_secs(10));
        eprintln!(
            "fleet lab {}: {} nodes up and converged {:.1} s after the last start ({:.1} s in all)",
            lab.prefix,
            start,
            took.as_secs_f64(),
            lab.t0.elapsed().as_secs_f64()
        );
        lab
    }

    /// Namespace `<prefix><name>`.
    pub fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn gw_ns(&self, k: usize) -> String {
        self.ns(&format!("gw{k}"))
    }

    fn check(&self, ns: &str) {
        assert!(
            ns.starts_with(&self.prefix) && ns.len() > self.prefix.len(),
            "{ns} is not a namespace of this lab"
        );
    }

    /// `ip -n NS args...` (a lab namespace only).
    pub fn ipn(&self, ns: &str, args: &[&str]) {
        self.check(ns);
        let mut argv = vec!["ip", "-n", ns];
        argv.extend_from_slice(args);
        run_ok(&argv, None);
    }

    /// `ip netns exec NS argv...` (a lab namespace only); the output, any status.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Output {
        self.exec_in(ns, argv, None)
    }

    fn exec_in(&self, ns: &str, argv: &[&str], stdin: Option<&str>) -> Output {
        self.check(ns);
        let mut a = vec!["ip", "netns", "exec", ns];
        a.extend_from_slice(argv);
        run(&a, stdin)
    }

    fn exec_ok(&self, ns: &str, argv: &[&str]) {
        self.check(ns);
        let mut a = vec!["ip", "netns", "exec", ns];
        a.extend_from_slice(argv);
        run_ok(&a, None);
    }

    /// Loads an nftables ruleset inside lab namespace `ns`.
    pub fn nft(&self, ns: &str, rules: &str) {
        self.check(ns);
        run_ok(&["ip", "netns", "exec", ns, "nft", "-f", "-"], Some(rules));
    }

    fn sysctl(&self, ns: &str, keys: &[&str]) {
        let mut argv = vec!["sysctl", "-q", "-w"];
        argv.extend_from_slice(keys);
        self.exec_ok(ns, &argv);
    }

    fn offload_off(&self, ns: &str, ifname: &str) {
        self.exec_ok(
            ns,
            &[
                "ethtool", "-K", ifname, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
            ],
        );
    }

    /// veth `a` in `ns_a` ↔ `b` in `ns_b`, offloads off on both ends.
    fn veth(&self, ns_a: &str, a: &str, ns_b: &str, b: &str) {
        self.ipn(
            ns_a,
            &[
                "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns_b,
            ],
        );
        self.offload_off(ns_a, a);
        self.offload_off(ns_b, b);
    }

    fn build(&mut self) {
        let g = self.opts.gateways;
        let (lan, inet, srv, mgmt) = (
            self.ns("lan"),
            self.ns("inet"),
            self.ns("srv"),
            self.ns("mgmt"),
        );
        let gws: Vec<String> = (1..=g).map(|k| self.gw_ns(k)).collect();
        let insts: Vec<Inst> = self.insts.clone();
        let mut all = vec![lan.clone(), inet.clone(), srv.clone(), mgmt.clone()];
        all.extend(gws.iter().cloned());
        all.extend(insts.iter().map(|i| i.ns.clone()));
        for ns in &all {
            self.check(ns);
            run_ok(&["ip", "netns", "add", ns], None);
            self.ipn(ns, &["link", "set", "lo", "up"]);
            let forward = if *ns == inet {
                "net.ipv4.ip_forward=1"
            } else {
                "net.ipv4.ip_forward=0"
            };
            self.sysctl(
                ns,
                &[
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    forward,
                ],
            );
        }
        for ns in gws.iter() {
            self.sysctl(
                ns,
                &[
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.default.send_redirects=0",
                ],
            );
        }
        // Flows hash by L4 at both ECMP points.
        for ns in insts.iter().map(|i| &i.ns).chain([&inet]) {
            self.sysctl(ns, &["net.ipv4.fib_multipath_hash_policy=1"]);
        }
        // The accepted socket's TOS is the SYN's: which gateway translated it (DSCP, below).
        self.sysctl(&srv, &["net.ipv4.tcp_reflect_tos=1"]);

        // Private side: one bridge, every instance and every gateway on it.
        self.ipn(
            &lan,
            &["link", "add", "br0", "type", "bridge", "stp_state", "0"],
        );
        self.ipn(&lan, &["link", "set", "br0", "up"]);
        for (k, gw) in gws.iter().enumerate().map(|(i, n)| (i + 1, n)) {
            let port = format!("l-gw{k}");
            self.veth(&lan, &port, gw, "br-priv");
            self.ipn(&lan, &["link", "set", &port, "master", "br0", "up"]);
            self.ipn(
                gw,
                &[
                    "addr",
                    "add",
                    &format!("{}/16", gw_private_ip(k)),
                    "dev",
                    "br-priv",
                ],
            );
            self.ipn(gw, &["link", "set", "br-priv", "up"]);
        }
        for (i, inst) in insts.iter().enumerate() {
            let port = format!("l-i{i}");
            self.veth(&lan, &port, &inst.ns, "eth0");
            self.ipn(&lan, &["link", "set", &port, "master", "br0", "up"]);
            self.ipn(
                &inst.ns,
                &["addr", "add", &format!("{}/16", inst.ip), "dev", "eth0"],
            );
            self.ipn(&inst.ns, &["link", "set", "eth0", "up"]);
        }

        // Public side: a /30 from the router to each gateway, the servers behind the router.
        for (k, gw) in gws.iter().enumerate().map(|(i, n)| (i + 1, n)) {
            let port = format!("r-gw{k}");
            self.veth(&inet, &port, gw, "gw-inet");
            self.ipn(
                &inet,
                &["addr", "add", &format!("{}/30", router_ip(k)), "dev", &port],
            );
            self.ipn(&inet, &["link", "set", &port, "up"]);
            self.ipn(
                gw,
                &[
                    "addr",
                    "add",
                    &format!("{}/30", gw_public_ip(k)),
                    "dev",
                    "gw-inet",
                ],
            );
            self.ipn(gw, &["link", "set", "gw-inet", "up"]);
            self.ipn(
                gw,
                &["route", "add", "default", "via", &router_ip(k).to_string()],
            );
        }
        self.veth(&inet, "r-srv", &srv, "eth0");
        self.ipn(&inet, &["addr", "add", "203.0.113.249/30", "dev", "r-srv"]);
        self.ipn(&inet, &["link", "set", "r-srv", "up"]);
        self.ipn(
            &inet,
            &["route", "add", "203.0.113.100/31", "via", "203.0.113.250"],
        );
        self.ipn(&srv, &["addr", "add", "203.0.113.250/30", "dev", "eth0"]);
        self.ipn(&srv, &["link", "set", "eth0", "up"]);
        for s in SERVERS {
            self.ipn(&srv, &["addr", "add", &format!("{s}/32"), "dev", "lo"]);
        }
        self.ipn(&srv, &["route", "add", "default", "via", "203.0.113.249"]);

        // Fleet/management bridge: etcd and the fleet links (MTU 9000).
        self.ipn(
            &mgmt,
            &[
                "link",
                "add",
                "br-fleet",
                "type",
                "bridge",
                "stp_state",
                "0",
            ],
        );
        self.ipn(&mgmt, &["link", "set", "br-fleet", "mtu", "9000", "up"]);
        self.ipn(
            &mgmt,
            &["addr", "add", &format!("{ETCD_IP}/24"), "dev", "br-fleet"],
        );
        for (k, gw) in gws.iter().enumerate().map(|(i, n)| (i + 1, n)) {
            let port = format!("m-gw{k}");
            self.veth(&mgmt, &port, gw, "fleet0");
            self.ipn(
                &mgmt,
                &[
                    "link", "set", &port, "mtu", "9000", "master", "br-fleet", "up",
                ],
            );
            self.ipn(gw, &["link", "set", "fleet0", "mtu", "9000", "up"]);
            self.ipn(
                gw,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", gw_fleet_ip(k)),
                    "dev",
                    "fleet0",
                ],
            );
        }

        // Counters, and the router's DSCP mark per gateway.
        let mut r = String::from("table ip flab {\n");
        for k in 1..=g {
            r.push_str(&format!(
                "  counter from_gw{k} {{ }}\n  counter to_gw{k} {{ }}\n"
            ));
        }
        r.push_str("  counter rst_from_srv { }\n  counter rst_to_srv { }\n");
        r.push_str("  chain labfwd {\n    type filter hook forward priority 0; policy accept;\n");
        for k in 1..=g {
            r.push_str(&format!(
                "    iifname \"r-gw{k}\" counter name \"from_gw{k}\" ip dscp set {k}\n    oifname \"r-gw{k}\" counter name \"to_gw{k}\"\n"
            ));
        }
        r.push_str("    iifname \"r-srv\" tcp flags & rst == rst counter name \"rst_from_srv\"\n");
        r.push_str(
            "    oifname \"r-srv\" tcp flags & rst == rst counter name \"rst_to_srv\"\n  }\n}\n",
        );
        self.nft(&inet, &r);
        let mut l = String::from("table bridge flab {\n");
        for k in 1..=g {
            l.push_str(&format!("  counter to_gw{k} {{ }}\n"));
        }
        l.push_str("  chain labfwd {\n    type filter hook forward priority 0; policy accept;\n");
        for k in 1..=g {
            l.push_str(&format!(
                "    oifname \"l-gw{k}\" ether type ip counter name \"to_gw{k}\"\n"
            ));
        }
        l.push_str("  }\n}\n");
        self.nft(&lan, &l);
        let mut m = String::from("table bridge flab {\n");
        for k in 1..=g {
            m.push_str(&format!("  counter link_from_gw{k} {{ }}\n"));
        }
        m.push_str("  chain labfwd {\n    type filter hook forward priority 0; policy accept;\n");
        for k in 1..=g {
            m.push_str(&format!(
                "    iifname \"m-gw{k}\" ether type ip counter name \"link_from_gw{k}\"\n"
            ));
        }
        m.push_str("  }\n}\n");
        self.nft(&mgmt, &m);
    }

    // ---- etcd --------------------------------------------------------------------------------

    /// Starts etcd in `mgmt` (its data directory kept across restarts) and waits until healthy.
    pub fn etcd_start(&mut self) {
        assert!(self.etcd.is_none(), "etcd runs already");
        self.etcd_starts += 1;
        let client = format!("http://{ETCD_IP}:{ETCD_PORT}");
        let data = format!("--data-dir={}", self.etcd_data.display());
        let lc = format!("--listen-client-urls={client}");
        let ac = format!("--advertise-client-urls={client}");
        let log = self.dir.join(format!("etcd-{}.log", self.etcd_starts));
        let p = Proc::spawn(
            &self.ns("mgmt"),
            &[
                "etcd",
                "--name=fleetlab",
                &data,
                &lc,
                &ac,
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=fleetlab=http://127.0.0.1:2380",
                "--log-level=warn",
            ],
            &log,
            true,
        );
        self.etcd = Some(p);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.etcd_healthy_from(&self.ns("mgmt")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "etcd did not become healthy within 15 s: {}",
            tail(&std::fs::read_to_string(&log).unwrap_or_default(), 30)
        );
    }

    /// Kills etcd (SIGKILL, by PID).
    pub fn etcd_kill(&mut self) {
        if let Some(mut p) = self.etcd.take() {
            p.kill();
        }
    }

    /// Whether etcd answers `GET /health` healthy, asked from inside `ns`.
    pub fn etcd_healthy_from(&self, ns: &str) -> bool {
        self.check(ns);
        in_ns(ns, || {
            let a = SocketAddr::from((ETCD_IP, ETCD_PORT));
            let Ok(mut c) = TcpStream::connect_timeout(&a, Duration::from_millis(500)) else {
                return false;
            };
            let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
            if c.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
                .is_err()
            {
                return false;
            }
            let mut body = String::new();
            let _ = c.read_to_string(&mut body);
            body.contains("\"health\":\"true\"")
        })
    }

    // ---- nodes -------------------------------------------------------------------------------

    /// Starts node `gwK` in its namespace (same state directory on a restart), waits for its
    /// ready line and applies `scripts/gateway-routing.sh up` there.
    pub fn start_node(&mut self, k: usize) {
        if let Some(p) = self.nodes[k - 1].as_mut() {
            assert!(p.exited(), "gw{k} runs already");
        }
        self.nodes[k - 1] = None;
        self.starts[k - 1] += 1;
        let n = self.starts[k - 1];
        let ns = self.gw_ns(k);
        let nd = self.dir.join(format!("gw{k}"));
        std::fs::create_dir_all(&nd).expect("node dir");
        let s = |p: PathBuf| p.to_string_lossy().into_owned();
        let (config, stats, state, token) = (
            s(self.config.clone()),
            s(nd.join("stats.json")),
            s(nd.join("state")),
            s(self.token_file.clone()),
        );
        let fleet = format!("etcd://{ETCD_IP}:{ETCD_PORT}");
        let id = format!("gw{k}");
        let ttl = self.opts.ttl_secs.to_string();
        let link = format!("{}:{FLEET_LINK_PORT}", gw_fleet_ip(k));
        let fast = snatgw_lab::gateway::fast_path_from_env();
        let mut argv = vec![
            BIN,
            "run",
            "--config",
            &config,
            "--tun-private",
            TUN_PRIVATE,
            "--tun-public",
            TUN_PUBLIC,
            "--queues",
            "1",
            "--stats-file",
            &stats,
            "--stats-interval-ms",
            "200",
            "--state-dir",
            &state,
            "--api",
            API,
            "--token-file",
            &token,
            "--fast-path",
            &fast,
            "--private-if",
            "br-priv",
            "--public-if",
            "gw-inet",
            "--bpf-pin-dir",
            "off",
            "--fleet",
            &fleet,
            "--node-id",
            &id,
            "--fleet-ttl-secs",
            &ttl,
        ];
        if self.opts.fleet_link {
            argv.extend(["--fleet-link", &link]);
        }
        let log = self.dir.join(format!("gw{k}-{n}.log"));
        let p = Proc::spawn(&ns, &argv, &log, false);
        if p.wait_line("\"ready\"", Duration::from_secs(30)).is_none() {
            let text = p.log_text();
            drop(p);
            panic!(
                "gw{k} (start {n}) did not get ready: `{}`\n--- its log ---\n{}",
                argv.join(" "),
                tail(&text, 40)
            );
        }
        self.nodes[k - 1] = Some(p);
        snatgw_lab::gateway_routing_up(&ns, TUN_PRIVATE, TUN_PUBLIC)
            .unwrap_or_else(|e| panic!("gateway routing in {ns}: {e}"));
    }

    /// `kill -9` node `gwK` (by PID) and reap it; returns when.
    pub fn kill_node(&mut self, k: usize) -> Instant {
        let p = self.nodes[k - 1].as_mut().expect("node started");
        let t = Instant::now();
        p.kill();
        t
    }

    /// The log of node `gwK`'s latest start.
    pub fn node_log(&self, k: usize) -> String {
        let n = self.starts[k - 1];
        std::fs::read_to_string(self.dir.join(format!("gw{k}-{n}.log"))).unwrap_or_default()
    }

    /// Nodes that are running.
    pub fn running(&mut self) -> Vec<usize> {
        let mut v = Vec::new();
        for (i, p) in self.nodes.iter_mut().enumerate() {
            if let Some(p) = p {
                if !p.exited() {
                    v.push(i + 1);
                }
            }
        }
        v
    }

    /// Puts exactly `nodes` into both ECMP routes: every instance's default route and the
    /// router's route to the public IPs.
    pub fn set_ecmp(&mut self, nodes: &[usize]) {
        assert!(!nodes.is_empty());
        let mut priv_args = vec!["route".to_string(), "replace".into(), "default".into()];
        let mut pub_args = vec!["route".to_string(), "replace".into(), PUBLIC_ROUTE.into()];
        for &k in nodes {
            priv_args.extend(
                [
                    "nexthop",
                    "via",
                    &gw_private_ip(k).to_string(),
                    "dev",
                    "eth0",
                ]
                .map(String::from),
            );
            pub_args.extend(
                [
                    "nexthop",
                    "via",
                    &gw_public_ip(k).to_string(),
                    "dev",
                    &format!("r-gw{k}"),
                ]
                .map(String::from),
            );
        }
        let pa: Vec<&str> = priv_args.iter().map(String::as_str).collect();
        for i in self.insts.clone() {
            self.ipn(&i.ns, &pa);
        }
        let ua: Vec<&str> = pub_args.iter().map(String::as_str).collect();
        self.ipn(&self.ns("inet"), &ua);
        self.ecmp = nodes.iter().copied().collect();
    }

    /// Takes `k` out of both ECMP routes (a router's health check).
    pub fn ecmp_remove(&mut self, k: usize) {
        let v: Vec<usize> = self.ecmp.iter().copied().filter(|&n| n != k).collect();
        self.set_ecmp(&v);
    }

    /// Adds `k` to both ECMP routes.
    pub fn ecmp_add(&mut self, k: usize) {
        let mut v: Vec<usize> = self.ecmp.iter().copied().collect();
        if !v.contains(&k) {
            v.push(k);
            v.sort_unstable();
        }
        self.set_ecmp(&v);
    }

    /// Cuts node `gwK` from etcd (nftables inside ITS namespace: packets to and from etcd's
    /// client port dropped); its other traffic, the fleet link included, still flows.
    pub fn partition(&self, k: usize) {
        self.nft(
            &self.gw_ns(k),
            &format!(
                "table inet flabcut {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    ip daddr {ETCD_IP} tcp dport {ETCD_PORT} drop\n  }}\n  chain in {{\n    type filter hook input priority 0; policy accept;\n    ip saddr {ETCD_IP} tcp sport {ETCD_PORT} drop\n  }}\n}}\n"
            ),
        );
    }

    /// Removes [`FleetLab::partition`]'s rules.
    pub fn heal(&self, k: usize) {
        self.exec_ok(
            &self.gw_ns(k),
            &["nft", "delete", "table", "inet", "flabcut"],
        );
    }

    // ---- fleet state -------------------------------------------------------------------------

    /// `snatgw fleet --json`, run in `mgmt` (None when etcd does not answer).
    pub fn fleet_status(&self) -> Option<Value> {
        let o = self.exec(
            &self.ns("mgmt"),
            &[
                BIN,
                "fleet",
                "--json",
                "--fleet",
                &format!("etcd://{ETCD_IP}:{ETCD_PORT}"),
            ],
        );
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// Instance → holding node (K of gwK), from a `snatgw fleet --json` answer.
    pub fn holders(st: &Value) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for n in st["nodes"].as_array().into_iter().flatten() {
            let k: usize = n["node"]
                .as_str()
                .and_then(|s| s.strip_prefix("gw"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            for i in n["instances"].as_array().into_iter().flatten() {
                if let Some(i) = i.as_str() {
                    m.insert(i.to_string(), k);
                }
            }
        }
        m
    }

    /// Live node ids in a `snatgw fleet --json` answer.
    pub fn live_nodes(st: &Value) -> BTreeSet<usize> {
        st["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["node"].as_str()?.strip_prefix("gw")?.parse().ok())
            .collect()
    }

    /// The rendezvous owner of every instance among `live`.
    pub fn expected_owners(&self, live: &[usize]) -> BTreeMap<String, usize> {
        self.insts
            .iter()
            .map(|i| (i.name.clone(), owner_of(&i.name, live)))
            .collect()
    }

    /// Waits (bounded) until etcd lists exactly `live`, each instance held by its rendezvous
    /// owner among them, and each of those nodes' `/metrics` counts the instances it owns;
    /// returns how long it took. Panics with the last state otherwise.
    pub fn wait_converged(&self, live: &[usize], timeout: Duration) -> Duration {
        let t = Instant::now();
        let want = self.expected_owners(live);
        let live_set: BTreeSet<usize> = live.iter().copied().collect();
        let mut last = None;
        while t.elapsed() < timeout {
            if let Some(st) = self.fleet_status() {
                if Self::live_nodes(&st) == live_set && Self::holders(&st) == want {
                    let metrics_ok = live.iter().all(|&k| {
                        let n = want.values().filter(|&&o| o == k).count();
                        self.metrics(k).lines().any(|l| {
                            l == format!("snatgw_fleet_instances_owned{{node=\"gw{k}\"}} {n}")
                        })
                    });
                    if metrics_ok {
                        return t.elapsed();
                    }
                }
                last = Some(st);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "the fleet did not converge on nodes {live:?} within {timeout:?}: want {want:?}, last `snatgw fleet --json`: {}",
            last.map(|v| v.to_string()).unwrap_or_else(|| "none (etcd unreachable)".into())
        );
    }

    /// A client of node `gwK`'s API, used on a thread inside its namespace.
    pub fn api<T: Send + 'static>(
        &self,
        k: usize,
        f: impl FnOnce(&Client) -> T + Send + 'static,
    ) -> T {
        let c = Client::new(&format!("http://{API}"), Some(self.token.clone()));
        in_ns(&self.gw_ns(k), move || f(&c))
    }

    /// Node `gwK`'s `/metrics` (empty when it does not answer).
    pub fn metrics(&self, k: usize) -> String {
        self.api(k, |c| c.metrics_text().unwrap_or_default())
    }

    /// Samples every `period` the self-fencing gauge of nodes `nodes`
    /// (`snatgw_fleet_lease_valid_seconds`, 0 once the node's lease view ended) until stopped.
    pub fn lease_sampler(&self, nodes: &[usize], period: Duration) -> LeaseSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let handles = nodes
            .iter()
            .map(|&k| {
                let (stop, samples) = (stop.clone(), samples.clone());
                let c = Client::new(&format!("http://{API}"), Some(self.token.clone()));
                spawn_in(&self.gw_ns(k), move || {
                    let name = format!("snatgw_fleet_lease_valid_seconds{{node=\"gw{k}\"}} ");
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let v = c.metrics_text().ok().and_then(|m| {
                            m.lines()
                                .find_map(|l| l.strip_prefix(&name)?.trim().parse::<f64>().ok())
                        });
                        if let Some(v) = v {
                            lock(&samples).push((k, t, v));
                        }
                        std::thread::sleep(period);
                    }
                })
            })
            .collect();
        LeaseSampler {
            stop,
            samples,
            handles,
        }
    }

    /// The named nftables counters of lab namespace `ns` (packets).
    pub fn counters(&self, ns: &str) -> BTreeMap<String, u64> {
        let o = self.exec(ns, &["nft", "-j", "list", "counters"]);
        assert!(
            o.status.success(),
            "nft list counters: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&o.stdout).expect("nft JSON");
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let c = e.get("counter")?;
                Some((c["name"].as_str()?.to_string(), c["packets"].as_u64()?))
            })
            .collect()
    }

    pub fn inst_index(&self, name: &str) -> usize {
        self.insts
            .iter()
            .position(|i| i.name == name)
            .expect("instance")
    }

    /// Seconds since the lab's start (for reports).
    pub fn secs(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.t0).as_secs_f64()
    }

    /// The servers' records so far.
    pub fn records(&self) -> Vec<SrvRecord> {
        self.server.as_ref().expect("servers").records()
    }

    fn teardown(&mut self) {
        if self.down {
            return;
        }
        self.down = true;
        let panicking = std::thread::panicking();
        if let Some(s) = self.server.take() {
            s.stop();
        }
        if panicking {
            for (i, p) in self.nodes.iter().enumerate() {
                if let Some(p) = p {
                    eprintln!(
                        "--- gw{} log (last lines) ---\n{}",
                        i + 1,
                        tail(&p.log_text(), 30)
                    );
                }
            }
        }
        for p in self.nodes.iter_mut().flatten() {
            p.kill();
        }
        self.nodes.clear();
        if let Some(mut e) = self.etcd.take() {
            if panicking {
                eprintln!("--- etcd log (last lines) ---\n{}", tail(&e.log_text(), 20));
            }
            e.kill();
        }
        if let Err(e) = snatgw_lab::down_prefix(&self.prefix) {
            eprintln!("fleet lab: tearing down {}*: {e}", self.prefix);
        }
        let _ = std::fs::remove_dir_all(&self.etcd_data);
        if panicking {
            eprintln!("fleet lab: logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for FleetLab {
    fn drop(&mut self) {
        self.teardown();
    }
}

// ---- recording servers -----------------------------------------------------------------------

/// How a server-side connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// The client's FIN (the server closed its side in return).
    Fin,
    /// A reset.
    Reset,
    /// Another error.
    Error(String),
    /// The servers were stopped with the connection open.
    Stopped,
}

/// What a server saw of one accepted connection.
#[derive(Debug, Clone)]
pub struct SrvRecord {
    /// The peer: the public IP and port the connection came from.
    pub peer: SocketAddrV4,
    /// The server's address and port.
    pub local: SocketAddrV4,
    /// The node whose public link the SYN came through (the router's DSCP mark, reflected
    /// into the accepted socket's TOS), if marked.
    pub via: Option<usize>,
    pub accepted: Instant,
    /// The client's connection id (first word of its first line).
    pub id: Option<u64>,
    /// Lines received (each answered with `<peer> <line>`).
    pub lines: u64,
    pub last_data: Option<Instant>,
    pub closed: Option<(Instant, Close)>,
}

/// The recording servers (threads of this process inside the server namespace) on every
/// [`SERVERS`] address, port [`SRV_PORT`]: each accepted connection gets the greeting
/// `<peer>\n`, then every line is answered `<peer> <line>\n`; the client's FIN is answered
/// with the server's. Every connection is recorded ([`SrvRecord`]).
pub struct RecServer {
    records: Arc<Mutex<Vec<SrvRecord>>>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    acceptors: Vec<JoinHandle<()>>,
    pub threads_failed: Arc<AtomicUsize>,
}

impl RecServer {
    pub fn start(ns: &str) -> RecServer {
        let records = Arc::new(Mutex::new(Vec::new()));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads_failed = Arc::new(AtomicUsize::new(0));
        let mut acceptors = Vec::new();
        for addr in SERVERS {
            let (records, streams, stop, tf) = (
                records.clone(),
                streams.clone(),
                stop.clone(),
                threads_failed.clone(),
            );
            let (tx, rx) = mpsc::channel();
            acceptors.push(spawn_in(ns, move || {
                let l = match TcpListener::bind((addr, SRV_PORT)) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                l.set_nonblocking(true).expect("nonblocking listener");
                let _ = tx.send(Ok(()));
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, SocketAddr::V4(peer))) => {
                            accept_one(s, peer, &records, &streams, &stop, &tf)
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
            rx.recv_timeout(Duration::from_secs(5))
                .expect("server bound")
                .unwrap_or_else(|e| panic!("bind {addr}:{SRV_PORT}: {e}"));
        }
        RecServer {
            records,
            streams,
            stop,
            acceptors,
            threads_failed,
        }
    }

    pub fn records(&self) -> Vec<SrvRecord> {
        lock(&self.records).clone()
    }

    /// Stops accepting and shuts every connection down (its record says `Stopped`).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in lock(&self.streams).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        for a in self.acceptors.drain(..) {
            let _ = a.join();
        }
    }
}

fn accept_one(
    s: TcpStream,
    peer: SocketAddrV4,
    records: &Arc<Mutex<Vec<SrvRecord>>>,
    streams: &Arc<Mutex<Vec<TcpStream>>>,
    stop: &Arc<AtomicBool>,
    threads_failed: &Arc<AtomicUsize>,
) {
    let accepted = Instant::now();
    let _ = s.set_nonblocking(false);
    let local = match s.local_addr() {
        Ok(SocketAddr::V4(a)) => a,
        _ => return,
    };
    let tos = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::Ipv4Tos).unwrap_or(0);
    let dscp = (tos >> 2) as usize;
    let via = (1..=16).contains(&dscp).then_some(dscp);
    let idx = {
        let mut r = lock(records);
        r.push(SrvRecord {
            peer,
            local,
            via,
            accepted,
            id: None,
            lines: 0,
            last_data: None,
            closed: None,
        });
        r.len() - 1
    };
    if let Ok(c) = s.try_clone() {
        lock(streams).push(c);
    }
    let (records2, stop2) = (records.clone(), stop.clone());
    let spawned = std::thread::Builder::new()
        .name("rec-conn".into())
        .stack_size(128 * 1024)
        .spawn(move || serve_conn(s, peer, idx, &records2, &stop2));
    if spawned.is_err() {
        threads_failed.fetch_add(1, Ordering::Relaxed);
        lock(records)[idx].closed = Some((Instant::now(), Close::Error("no thread".into())));
    }
}

fn serve_conn(
    s: TcpStream,
    peer: SocketAddrV4,
    idx: usize,
    records: &Mutex<Vec<SrvRecord>>,
    stop: &AtomicBool,
) {
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    let close = |c: Close| {
        let mut r = lock(records);
        if r[idx].closed.is_none() {
            r[idx].closed = Some((Instant::now(), c));
        }
    };
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(e) => return close(Close::Error(e.to_string())),
    };
    if let Err(e) = w.write_all(format!("{peer}\n").as_bytes()) {
        return close(io_close(&e));
    }
    let mut r = BufReader::new(s);
    let mut line = Vec::with_capacity(64);
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) => {
                if stop.load(Ordering::Relaxed) {
                    close(Close::Stopped);
                } else {
                    close(Close::Fin);
                }
                let _ = w.shutdown(Shutdown::Write);
                return;
            }
            Ok(_) => {
                let text = String::from_utf8_lossy(&line).trim().to_string();
                {
                    let mut recs = lock(records);
                    let rec = &mut recs[idx];
                    if rec.id.is_none() {
                        rec.id = text.split_whitespace().next().and_then(|t| t.parse().ok());
                    }
                    rec.lines += 1;
                    rec.last_data = Some(Instant::now());
                }
                if let Err(e) = w.write_all(format!("{peer} {text}\n").as_bytes()) {
                    return close(io_close(&e));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                if stop.load(Ordering::Relaxed) {
                    return close(Close::Stopped);
                }
                return close(io_close(&e));
            }
        }
    }
}

fn io_close(e: &std::io::Error) -> Close {
    if e.kind() == ErrorKind::ConnectionReset {
        Close::Reset
    } else {
        Close::Error(e.to_string())
    }
}

// ---- clients ---------------------------------------------------------------------------------

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// The server a connection with `id` goes to (alternating).
pub fn dst_of(id: u64) -> SocketAddrV4 {
    SocketAddrV4::new(SERVERS[(id % 2) as usize], SRV_PORT)
}

/// `TCP_USER_TIMEOUT` of held connections: long enough that data sent across a takeover is
/// retransmitted until the new owner translates it, rather than aborting the connection.
pub const HELD_USER_TIMEOUT_MS: u32 = 20_000;

/// A TCP connection held open by the test, from an instance to a recording server.
pub struct Conn {
    pub id: u64,
    pub inst: usize,
    pub stream: TcpStream,
    pub local: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// The public IP:port the server saw (its greeting).
    pub seen: SocketAddrV4,
    /// When `connect` was called.
    pub start: Instant,
    /// When it was closed (both FINs) or found failed.
    pub end: Option<Instant>,
    rbuf: Vec<u8>,
}

fn read_line(s: &mut TcpStream) -> Result<String, String> {
    let mut line = Vec::with_capacity(64);
    let mut b = [0u8; 1];
    while line.len() < 200 {
        match s.read(&mut b) {
            Ok(0) => return Err("closed".into()),
            Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(err_text(&e)),
        }
    }
    Err("line too long".into())
}

fn err_text(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused => format!("reset ({e})"),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!("timeout ({e})"),
        _ => e.to_string(),
    }
}

/// Whether a failure text is a reset.
pub fn is_reset(e: &str) -> bool {
    e.starts_with("reset")
}

/// Checks a reply `<peer> <id> <round>`; returns the peer.
fn parse_reply(line: &str, id: u64, round: u32) -> Result<SocketAddrV4, String> {
    let mut it = line.split_whitespace();
    let peer: SocketAddrV4 = it
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("bad reply {line:?}"))?;
    if it.next() != Some(&id.to_string()) || it.next() != Some(&round.to_string()) {
        return Err(format!(
            "reply to another line: {line:?} (id {id}, round {round})"
        ));
    }
    Ok(peer)
}

/// Connects (within `connect_timeout`), reads the greeting, exchanges round 0; the caller's
/// thread must be in the instance's namespace.
fn open_conn(
    id: u64,
    inst: usize,
    dst: SocketAddrV4,
    connect_timeout: Duration,
    user_timeout_ms: u32,
) -> Result<Conn, (Instant, Option<SocketAddrV4>, String)> {
    let start = Instant::now();
    let fail = |seen, e: String| (start, seen, e);
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(dst), connect_timeout)
        .map_err(|e| fail(None, format!("connect: {}", err_text(&e))))?;
    let _ = s.set_nodelay(true);
    let _ = nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::TcpUserTimeout,
        &user_timeout_ms,
    );
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let local = match s.local_addr() {
        Ok(SocketAddr::V4(a)) => a,
        _ => return Err(fail(None, "no local address".into())),
    };
    let greeting = read_line(&mut s).map_err(|e| fail(None, format!("greeting: {e}")))?;
    let seen: SocketAddrV4 = greeting
        .trim()
        .parse()
        .map_err(|_| fail(None, format!("bad greeting {greeting:?}")))?;
    s.write_all(format!("{id} 0\n").as_bytes())
        .map_err(|e| fail(Some(seen), format!("write: {}", err_text(&e))))?;
    let reply = read_line(&mut s).map_err(|e| fail(Some(seen), format!("reply: {e}")))?;
    let now = parse_reply(&reply, id, 0).map_err(|e| fail(Some(seen), e))?;
    if now != seen {
        return Err(fail(
            Some(seen),
            format!("the server saw {now}, greeted {seen}"),
        ));
    }
    Ok(Conn {
        id,
        inst,
        stream: s,
        local,
        dst,
        seen,
        start,
        end: None,
        rbuf: Vec::new(),
    })
}

/// A connection attempt that failed while opening a held connection.
#[derive(Debug, Clone)]
pub struct OpenFailure {
    pub id: u64,
    pub inst: usize,
    pub start: Instant,
    pub seen: Option<SocketAddrV4>,
    pub error: String,
}

impl FleetLab {
    /// Opens held connections from instance `inst` to `dst`, `parallel` connecting at once,
    /// each within `connect_timeout`, until `n` were tried or `stop_after` attempts in a row
    /// failed.
    pub fn hold_to(
        &self,
        inst: usize,
        dst: SocketAddrV4,
        n: usize,
        parallel: usize,
        connect_timeout: Duration,
        stop_after: usize,
    ) -> (Vec<Conn>, Vec<OpenFailure>) {
        let ns = self.insts[inst].ns.clone();
        let (mut conns, fails) = spawn_in(&ns, move || {
            // (tried, failures in a row)
            let state = Mutex::new((0usize, 0usize));
            let out = Mutex::new((Vec::new(), Vec::new()));
            std::thread::scope(|sc| {
                for _ in 0..parallel.max(1) {
                    sc.spawn(|| loop {
                        {
                            let mut st = lock(&state);
                            if st.0 >= n || st.1 >= stop_after {
                                return;
                            }
                            st.0 += 1;
                        }
                        let id = next_id();
                        let r = open_conn(id, inst, dst, connect_timeout, HELD_USER_TIMEOUT_MS);
                        let failed = r.is_err();
                        {
                            let mut st = lock(&state);
                            st.1 = if failed { st.1 + 1 } else { 0 };
                        }
                        let mut o = lock(&out);
                        match r {
                            Ok(c) => o.0.push(c),
                            Err((start, seen, error)) => o.1.push(OpenFailure {
                                id,
                                inst,
                                start,
                                seen,
                                error,
                            }),
                        }
                    });
                }
            });
            out.into_inner().unwrap_or_else(|e| e.into_inner())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
        conns.sort_by_key(|c: &Conn| c.id);
        (conns, fails)
    }

    /// Opens `counts[i]` held connections from instance `i` (alternating servers), at most 8
    /// connecting at once per instance, each within `connect_timeout`.
    pub fn hold(
        &self,
        counts: &[usize],
        connect_timeout: Duration,
    ) -> (Vec<Conn>, Vec<OpenFailure>) {
        let mut handles = Vec::new();
        for (i, &n) in counts.iter().enumerate() {
            let ns = self.insts[i].ns.clone();
            handles.push(spawn_in(&ns, move || {
                let next = Mutex::new(0usize);
                let out = Mutex::new((Vec::new(), Vec::new()));
                std::thread::scope(|sc| {
                    for _ in 0..n.clamp(1, 8) {
                        sc.spawn(|| loop {
                            {
                                let mut k = lock(&next);
                                if *k >= n {
                                    return;
                                }
                                *k += 1;
                            }
                            let id = next_id();
                            let r =
                                open_conn(id, i, dst_of(id), connect_timeout, HELD_USER_TIMEOUT_MS);
                            let mut o = lock(&out);
                            match r {
                                Ok(c) => o.0.push(c),
                                Err((start, seen, error)) => o.1.push(OpenFailure {
                                    id,
                                    inst: i,
                                    start,
                                    seen,
                                    error,
                                }),
                            }
                        });
                    }
                });
                out.into_inner().unwrap_or_else(|e| e.into_inner())
            }));
        }
        let (mut conns, mut fails) = (Vec::new(), Vec::new());
        for h in handles {
            let (c, f) = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            conns.extend(c);
            fails.extend(f);
        }
        conns.sort_by_key(|c| c.id);
        (conns, fails)
    }
}

/// Sends `<id> <round>` on every connection and waits (bounded by `timeout`) for each reply;
/// per connection: the public IP:port the server saw on this exchange, or why not.
pub fn exchange(
    conns: &mut [Conn],
    round: u32,
    timeout: Duration,
) -> Vec<Result<SocketAddrV4, String>> {
    let mut res: Vec<Option<Result<SocketAddrV4, String>>> = vec![None; conns.len()];
    for (i, c) in conns.iter_mut().enumerate() {
        c.rbuf.clear();
        let _ = c.stream.set_nonblocking(false);
        let _ = c.stream.set_write_timeout(Some(Duration::from_secs(2)));
        if let Err(e) = (&c.stream).write_all(format!("{} {round}\n", c.id).as_bytes()) {
            res[i] = Some(Err(format!("write: {}", err_text(&e))));
        }
        let _ = c.stream.set_nonblocking(true);
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        let mut pending = 0;
        for (i, c) in conns.iter_mut().enumerate() {
            if res[i].is_some() {
                continue;
            }
            loop {
                match (&c.stream).read(&mut buf) {
                    Ok(0) => {
                        res[i] = Some(Err("closed by the server".into()));
                        break;
                    }
                    Ok(n) => {
                        c.rbuf.extend_from_slice(&buf[..n]);
                        if let Some(p) = c.rbuf.iter().position(|&b| b == b'\n') {
                            let line = String::from_utf8_lossy(&c.rbuf[..p]).into_owned();
                            res[i] = Some(parse_reply(&line, c.id, round));
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        pending += 1;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        res[i] = Some(Err(err_text(&e)));
                        break;
                    }
                }
            }
        }
        if pending == 0 || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in conns.iter() {
        let _ = c.stream.set_nonblocking(false);
    }
    res.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(format!("timeout (no reply within {timeout:?})"))))
        .collect()
}

/// Half-closes every connection and waits (bounded) for the server's FIN; sets each
/// connection's end. Returns per connection whether the close was confirmed both ways.
pub fn close_all(conns: &mut [Conn], timeout: Duration) -> Vec<Result<(), String>> {
    let mut res: Vec<Option<Result<(), String>>> = vec![None; conns.len()];
    for (i, c) in conns.iter_mut().enumerate() {
        if let Err(e) = c.stream.shutdown(Shutdown::Write) {
            res[i] = Some(Err(format!("shutdown: {}", err_text(&e))));
            c.end = Some(Instant::now());
        }
        let _ = c.stream.set_nonblocking(true);
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        let mut pending = 0;
        for (i, c) in conns.iter_mut().enumerate() {
            if res[i].is_some() {
                continue;
            }
            loop {
                match (&c.stream).read(&mut buf) {
                    Ok(0) => {
                        res[i] = Some(Ok(()));
                        c.end = Some(Instant::now());
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        pending += 1;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        res[i] = Some(Err(err_text(&e)));
                        c.end = Some(Instant::now());
                        break;
                    }
                }
            }
        }
        if pending == 0 || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let now = Instant::now();
    res.into_iter()
        .zip(conns.iter_mut())
        .map(|(r, c)| {
            r.unwrap_or_else(|| {
                c.end.get_or_insert(now);
                Err("timeout (no FIN from the server)".into())
            })
        })
        .collect()
}

// ---- a bounded stream of new connections -----------------------------------------------------

/// One short connection of the stream: connect, greeting, one exchange, FIN both ways.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: u64,
    pub inst: usize,
    pub dst: SocketAddrV4,
    pub start: Instant,
    pub connected: Option<Instant>,
    pub end: Instant,
    pub seen: Option<SocketAddrV4>,
    /// `Ok` or why not (a reset starts with `reset`).
    pub outcome: Result<(), String>,
}

/// Connect timeout of the stream's connections: below the first SYN retransmission (1 s), so
/// every SYN the servers see is a new flow's only SYN.
pub const CHURN_CONNECT: Duration = Duration::from_millis(900);

fn attempt(inst: usize) -> Attempt {
    let id = next_id();
    let dst = dst_of(id);
    match open_conn(id, inst, dst, CHURN_CONNECT, 5000) {
        Err((start, seen, e)) => Attempt {
            id,
            inst,
            dst,
            start,
            connected: None,
            end: Instant::now(),
            seen,
            outcome: Err(e),
        },
        Ok(mut c) => {
            let connected = Some(Instant::now());
            let mut outcome = Ok(());
            if let Err(e) = c.stream.shutdown(Shutdown::Write) {
                outcome = Err(format!("shutdown: {}", err_text(&e)));
            } else {
                let mut rest = Vec::new();
                if let Err(e) = c.stream.read_to_end(&mut rest) {
                    outcome = Err(format!("close: {}", err_text(&e)));
                }
            }
            Attempt {
                id,
                inst,
                dst,
                start: c.start,
                connected,
                end: Instant::now(),
                seen: Some(c.seen),
                outcome,
            }
        }
    }
}

/// One connection of the stream's kind from a thread in namespace `ns` (`inst` is only
/// recorded).
pub fn attempt_from(ns: &str, inst: usize) -> Attempt {
    in_ns(ns, move || attempt(inst))
}

/// New connections from every instance, `workers` loops per instance, each pausing `pause`
/// between attempts, until stopped, `max_time` passed or `max_per_worker` attempts were made.
pub struct Churn {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Attempt>>>,
    handles: Vec<JoinHandle<()>>,
}

impl Churn {
    pub fn start(
        lab: &FleetLab,
        workers: usize,
        pause: Duration,
        max_per_worker: usize,
        max_time: Duration,
    ) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let end = Instant::now() + max_time;
        let mut handles = Vec::new();
        for (i, inst) in lab.insts.iter().enumerate() {
            for w in 0..workers {
                let (stop, log) = (stop.clone(), log.clone());
                handles.push(spawn_in(&inst.ns, move || {
                    // Staggered, so the workers of one instance do not move in step.
                    std::thread::sleep(pause.mul_f64(w as f64 / workers as f64));
                    for _ in 0..max_per_worker {
                        if stop.load(Ordering::Relaxed) || Instant::now() >= end {
                            break;
                        }
                        let a = attempt(i);
                        lock(&log).push(a);
                        std::thread::sleep(pause);
                    }
                }));
            }
        }
        Churn { stop, log, handles }
    }

    /// Attempts so far.
    pub fn snapshot(&self) -> Vec<Attempt> {
        lock(&self.log).clone()
    }

    /// Stops (waits for the attempts under way) and returns every attempt.
    pub fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        for h in std::mem::take(&mut self.handles) {
            let _ = h.join();
        }
        let mut v = lock(&self.log).clone();
        v.sort_by_key(|a| a.start);
        v
    }
}

/// See [`FleetLab::lease_sampler`].
pub struct LeaseSampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(usize, Instant, f64)>>>,
    handles: Vec<JoinHandle<()>>,
}

impl LeaseSampler {
    /// Stops and returns the samples: (node, when, seconds of lease view left).
    pub fn stop(mut self) -> Vec<(usize, Instant, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        for h in std::mem::take(&mut self.handles) {
            let _ = h.join();
        }
        let mut v = lock(&self.samples).clone();
        v.sort_by_key(|x| x.1);
        v
    }
}

impl Drop for LeaseSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Churn {
    /// A test that fails with the stream running: its loops stop after their attempt under way.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---- checks ----------------------------------------------------------------------------------

/// One connection's life for the never-twice check.
#[derive(Debug, Clone)]
pub struct Life {
    /// (public IP:port, server IP:port).
    pub key: (SocketAddrV4, SocketAddrV4),
    pub from: Instant,
    pub to: Instant,
    pub what: String,
}

/// Every connection the servers saw, with its life from the client's `connect` (or the
/// accept) to the later of the server's close and the client's end (still open: `now`).
pub fn lives(
    records: &[SrvRecord],
    attempts: &[Attempt],
    conns: &[Conn],
    now: Instant,
    t0: Instant,
) -> Vec<Life> {
    let mut client: HashMap<u64, (Instant, Instant, String)> = HashMap::new();
    for a in attempts {
        client.insert(
            a.id,
            (
                a.start,
                a.end,
                format!("stream conn {} of i{} ({:?})", a.id, a.inst, a.outcome),
            ),
        );
    }
    for c in conns {
        client.insert(
            c.id,
            (
                c.start,
                c.end.unwrap_or(now),
                format!("held conn {} of i{}", c.id, c.inst),
            ),
        );
    }
    records
        .iter()
        .map(|r| {
            let srv_end = r.closed.as_ref().map_or(now, |c| c.0);
            let srv = format!(
                "server: SYN via {:?}, accepted {:.3} s, {} lines, closed {}",
                r.via.map(|k| format!("gw{k}")),
                r.accepted.saturating_duration_since(t0).as_secs_f64(),
                r.lines,
                r.closed.as_ref().map_or("no".into(), |(t, c)| format!(
                    "{:.3} s ({c:?})",
                    t.saturating_duration_since(t0).as_secs_f64()
                ))
            );
            let (from, to, what) = match r.id.and_then(|id| client.get(&id)) {
                Some((s, e, w)) => (
                    (*s).min(r.accepted),
                    (*e).max(srv_end),
                    format!("{w}; {srv}"),
                ),
                None => (
                    r.accepted,
                    srv_end,
                    format!("server record without id; {srv}"),
                ),
            };
            Life {
                key: (r.peer, r.local),
                from,
                to,
                what,
            }
        })
        .collect()
}

/// R10.2 / R2.2: pairs of connections that shared (public IP, port, server) while both were
/// live.
pub fn overlaps(mut lives: Vec<Life>, t0: Instant) -> Vec<String> {
    lives.sort_by(|a, b| a.key.cmp(&b.key).then(a.from.cmp(&b.from)));
    let mut out = Vec::new();
    let s = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    for w in lives.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if a.key == b.key && b.from < a.to {
            out.push(format!(
                "{} -> {}: [{:.3}, {:.3}] {} and [{:.3}, {:.3}] {}",
                a.key.0,
                a.key.1,
                s(a.from),
                s(a.to),
                a.what,
                s(b.from),
                s(b.to),
                b.what
            ));
        }
    }
    out
}

/// Server records with an id, by id.
pub fn records_by_id(records: &[SrvRecord]) -> HashMap<u64, Vec<&SrvRecord>> {
    let mut m: HashMap<u64, Vec<&SrvRecord>> = HashMap::new();
    for r in records {
        if let Some(id) = r.id {
            m.entry(id).or_default().push(r);
        }
    }
    m
}

/// Whether `seq` is a subsequence of `of`.
pub fn is_subsequence(seq: &[usize], of: &[usize]) -> bool {
    let mut it = of.iter();
    seq.iter().all(|x| it.any(|y| y == x))
}

/// Consecutive duplicates removed.
pub fn dedup(v: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for x in v {
        if out.last() != Some(&x) {
            out.push(x);
        }
    }
    out
}
