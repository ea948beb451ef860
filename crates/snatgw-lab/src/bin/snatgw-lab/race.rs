//! `snatgw-lab race` (run by users as `snatgw race`): the same lab (crates/snatgw-lab) through
//! snatgw with its kernel fast path (`--fast-path tc`), through snatgw on the TUN path alone (`--fast-path off`), through the
//! kernel's nftables masquerade, and through two floors: plain kernel routing without NAT, and
//! the fast path's program redirecting without lookup or rewrite (`--fast-path-floor`); veth
//! offloads off then on, measuring 64-byte UDP packets/s (trafgen), TCP bulk throughput
//! (iperf3) and new TCP connections/s, and the CPU spent. Prints the figures as
//! min / median / max over the rounds, the ratios snatgw / kernel and each side / floor, and
//! the CPU seconds per measurement (docs/PERFORMANCE.md, "Gateway vs kernel NAT").
//!
//! Order (ABBA): every round runs kernel, snatgw, floor, fast-path floor, snatgw-tun, snatgw,
//! kernel (odd rounds swap kernel and snatgw), one fresh lab per run; a round's figure for
//! snatgw and the kernel is the mean of their two runs, so a linear drift of the machine
//! during the round cancels for the headline ratio; the floors and the TUN path run once per
//! round, in the middle. At least 3 rounds.
//!
//! Same timers on both sides: snatgw's race configuration has idle 240 s (SPEC default),
//! FIN 2 s, RST 1 s (short so the connection test is never port-bound); the kernel side gets
//! the same values as conntrack timeouts inside the lab's gateway namespace only (conntrack
//! sysctls are per network namespace; the race checks the host's own value did not move):
//! `nf_conntrack_udp_timeout` and `_udp_timeout_stream` = idle, `_tcp_timeout_established` =
//! idle, `_tcp_timeout_fin_wait`, `_close_wait`, `_last_ack`, `_time_wait` = FIN,
//! `_tcp_timeout_close` (after a RST) = RST. The handshake timers (`_syn_sent`, `_syn_recv`)
//! keep the kernel's defaults: snatgw has no separate handshake timer, and every handshake in
//! the race completes.
//!
//! Workload, identical on every side:
//! - pps: `trafgen` in instance `c0` sends 64-byte frames (one UDP flow, fixed ports) to
//!   203.0.113.100:9 for `--secs`, where a socket that never reads discards them (so the
//!   internet side answers none with ICMP port unreachable); the figure is packets received
//!   on the internet side (`inet-gw` rx counter delta / seconds).
//! - bulk: `iperf3 -c 203.0.113.100 -t SECS` from `c0` (one TCP stream).
//! - conn/s: one thread per client instance (`c0..c3`) connects and immediately resets
//!   (SO_LINGER 0) connections to 64 accept-and-close listeners (203.0.113.100:10000-10063,
//!   one poll()-driven acceptor; 16 listeners each polled every 200 µs by its own thread
//!   before 2026-12-05, when faster gateways made 16 destinations port-bound: see
//!   docs/PERFORMANCE.md)
//!   for `--secs`; the figure is completed connects per second.
//!
//! A load generator that fails (trafgen, iperf3, the connection client or its listeners),
//! stops early or produces no number stops the race with an error naming the step; it is
//! never recorded as 0. More than 1 % failed connection attempts is such an error too.
//!
//! CPU per measurement, in seconds (ticks converted with `sysconf(_SC_CLK_TCK)`), each tick
//! counted once: `total` is the host-wide busy time of all CPUs (`/proc/stat` user + nice +
//! system + irq + softirq deltas), which holds everything below and any other load on the
//! host; `gw` is the snatgw process (`/proc/PID/stat` utime + stime, which already includes its
//! threads, so `/proc/PID/task/*` is not added); `gen` is the load generators: this process
//! (the connection client and listener threads) and its reaped children (trafgen, the iperf3
//! client: `cutime + cstime` of `/proc/self/stat`) plus the iperf3 server (its own stat);
//! `rest` = total − gw − gen is the kernel's forwarding/NAT work not charged to any of those
//! processes (softirq in ksoftirqd or on idle CPUs) plus other host load. `softirq` (host-wide)
//! is shown for information only: softirq work done in a process's context is also in that
//! process's stime, so it must not be added to the others.
//!
//! What it does not measure: traffic inbound to public load balancers; more than one UDP flow; a real NIC (everything is veth and TUN on one
//! host, so generators, servers and the NAT share the same CPUs).
//!
//! Needs root, `iperf3` and `trafgen` (Debian: `apt-get install -y iperf3 netsniff-ng`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use snatgw_lab::gateway::{start_gateway, GatewayOptions};
use snatgw_lab::{GatewayMode, KernelNat, Lab, LabSpec};

/// Options of `snatgw race`.
#[derive(Args, Debug, Clone)]
pub struct RaceArgs {
    /// Rounds (each: kernel, snatgw, floor, fast-floor, snatgw-tun, snatgw, kernel; at least 3).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    /// Gateway queues (worker threads).
    #[arg(long, default_value_t = 2)]
    pub queues: usize,
    /// Namespace prefix.
    #[arg(long, default_value = "sgrace-")]
    pub prefix: String,
    /// Only these offload settings (`off`, `on`); default both.
    #[arg(long, value_delimiter = ',')]
    pub offloads: Vec<String>,
    /// Write the markdown tables here too.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Only these workloads (`pps`, `bulk`, `cps`); default all. For profiling one of them:
    /// a figure not measured is not in the tables.
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Only these sides (`kernel`, `snatgw`, `floor`, `fast-floor`, `snatgw-tun`), kept in the
    /// rounds' ABBA order; default all. A ratio with a side not run is not printed.
    #[arg(long, value_delimiter = ',')]
    pub sides: Vec<String>,
}

/// The workloads of a race: which figures are measured.
#[derive(Debug, Clone, Copy)]
struct Workloads {
    pps: bool,
    bulk: bool,
    cps: bool,
}

impl Workloads {
    fn parse(names: &[String]) -> Result<Workloads, String> {
        if names.is_empty() {
            return Ok(Workloads {
                pps: true,
                bulk: true,
                cps: true,
            });
        }
        let mut w = Workloads {
            pps: false,
            bulk: false,
            cps: false,
        };
        for n in names {
            match n.as_str() {
                "pps" => w.pps = true,
                "bulk" => w.bulk = true,
                "cps" => w.cps = true,
                other => return Err(format!("--workloads: {other:?} is none of pps, bulk, cps")),
            }
        }
        Ok(w)
    }

    fn has(self, row: usize) -> bool {
        [self.pps, self.bulk, self.cps][row]
    }
}

fn parse_sides(names: &[String]) -> Result<Vec<Side>, String> {
    if names.is_empty() {
        return Ok(Side::ALL.to_vec());
    }
    names
        .iter()
        .map(|n| {
            Side::ALL
                .into_iter()
                .find(|s| s.name() == n)
                .ok_or_else(|| {
                    format!(
                        "--sides: {n:?} is none of kernel, snatgw, floor, fast-floor, snatgw-tun"
                    )
                })
        })
        .collect()
}

const CLIENTS: usize = 4;
const LISTEN_PORTS: u16 = 64;
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
const POOL_IP: &str = "192.0.2.10";
/// Largest share of failed connection attempts accepted in the conn/s test.
const MAX_CONNECT_FAILURES: f64 = 0.01;

/// The flow timers of the race, the same on both sides (see the module docs).
const IDLE_SECS: u32 = 240;
const FIN_SECS: u32 = 2;
const RST_SECS: u32 = 1;

/// The kernel's conntrack timeouts set in the kernel side's gateway namespace.
fn conntrack_timeouts() -> [(&'static str, u32); 8] {
    [
        ("net.netfilter.nf_conntrack_udp_timeout", IDLE_SECS),
        ("net.netfilter.nf_conntrack_udp_timeout_stream", IDLE_SECS),
        (
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            IDLE_SECS,
        ),
        ("net.netfilter.nf_conntrack_tcp_timeout_fin_wait", FIN_SECS),
        (
            "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
            FIN_SECS,
        ),
        ("net.netfilter.nf_conntrack_tcp_timeout_last_ack", FIN_SECS),
        ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", FIN_SECS),
        ("net.netfilter.nf_conntrack_tcp_timeout_close", RST_SECS),
    ]
}

fn client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, 10 + i as u8)
}

fn config() -> String {
    let mut c = format!(
        "[gateway]\nseed = 1\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"{POOL_IP}\"]\n\
         idle_timeout_secs = {IDLE_SECS}\nrst_timeout_secs = {RST_SECS}\nfin_timeout_secs = {FIN_SECS}\n\
         port_reuse_history_secs = 1\n"
    );
    for i in 0..CLIENTS {
        let _ = write!(
            c,
            "\n[[instance]]\nname = \"c{i}\"\nprivate_ip = \"{}\"\n",
            client_ip(i)
        );
    }
    c
}

/// What the gateway namespace does in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The kernel's nftables masquerade, conntrack timers = snatgw's.
    Kernel,
    /// `snatgw run --fast-path tc`: established flows in the kernel, the rest via the TUNs.
    Snatgw,
    /// `snatgw run --fast-path off`: every packet through the TUNs.
    SnatgwTun,
    /// Kernel routing without NAT (no nftables rules, no conntrack): the floor.
    Floor,
    /// The fast path's program redirecting every packet between the interfaces, no lookup,
    /// no rewrite, no NAT (`--fast-path-floor`): the fast path's own floor.
    FastFloor,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Kernel => "kernel",
            Side::Snatgw => "snatgw",
            Side::SnatgwTun => "snatgw-tun",
            Side::Floor => "floor",
            Side::FastFloor => "fast-floor",
        }
    }

    const ALL: [Side; 5] = [
        Side::Snatgw,
        Side::SnatgwTun,
        Side::Kernel,
        Side::Floor,
        Side::FastFloor,
    ];
}

/// The runs of round `round` (0-based): ABBA of snatgw and the kernel around the floors and
/// the TUN path, alternating the first side.
fn round_order(round: usize) -> [Side; 7] {
    let (a, b) = if round.is_multiple_of(2) {
        (Side::Kernel, Side::Snatgw)
    } else {
        (Side::Snatgw, Side::Kernel)
    };
    [a, b, Side::Floor, Side::FastFloor, Side::SnatgwTun, b, a]
}

/// CPU seconds of one measurement; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    /// Host-wide busy seconds, all CPUs.
    total: f64,
    /// The snatgw process (0 on the other sides).
    gw: f64,
    /// The load generators and servers.
    gen: f64,
    /// Host-wide softirq seconds (overlaps the others; information only).
    softirq: f64,
}

impl Cpu {
    fn rest(&self) -> f64 {
        self.total - self.gw - self.gen
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    pps: f64,
    gbps: f64,
    cps: f64,
    cpu_pps: Cpu,
    cpu_bulk: Cpu,
    cpu_cps: Cpu,
}

fn clk_tck() -> Result<f64, String> {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => Ok(t as f64),
        other => Err(format!("sysconf(_SC_CLK_TCK): {other:?}")),
    }
}

/// (busy, softirq) ticks of all CPUs from the `cpu` line of /proc/stat.
fn host_ticks() -> Result<(u64, u64), String> {
    let s = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or("/proc/stat: no cpu line")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("/proc/stat: {e}"))?;
    if v.len() < 7 {
        return Err(format!("/proc/stat: short cpu line {line:?}"));
    }
    // user nice system idle iowait irq softirq [steal guest guest_nice]; guest time is
    // already inside user, steal is not this host's work.
    Ok((v[0] + v[1] + v[2] + v[5] + v[6], v[6]))
}

/// Fields of /proc/PID/stat after the command name; `f[0]` is field 3 (state).
fn stat_fields(path: &str) -> Result<Vec<u64>, String> {
    let s = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let rest = s
        .rsplit_once(')')
        .map(|x| x.1)
        .ok_or_else(|| format!("{path}: no command name"))?;
    // Fields 14..=17 (utime stime cutime cstime) are indexes 11..=14 here; the state (index
    // 0) is a letter, so parse lazily.
    let f: Vec<&str> = rest.split_whitespace().collect();
    (11..=14)
        .map(|i| {
            f.get(i)
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| format!("{path}: field {} missing", i + 3))
        })
        .collect()
}

/// utime + stime ticks of process `pid` (its threads included).
fn proc_ticks(pid: u32) -> Result<u64, String> {
    let f = stat_fields(&format!("/proc/{pid}/stat"))?;
    Ok(f[0] + f[1])
}

/// utime + stime + cutime + cstime ticks of this process (its threads and reaped children).
fn self_ticks() -> Result<u64, String> {
    let f = stat_fields("/proc/self/stat")?;
    Ok(f[0] + f[1] + f[2] + f[3])
}

struct Snapshot {
    host: (u64, u64),
    gw: u64,
    gen: u64,
}

fn snapshot(gw: Option<u32>, servers: &[u32]) -> Result<Snapshot, String> {
    let mut gen = self_ticks()?;
    for &p in servers {
        gen += proc_ticks(p)?;
    }
    Ok(Snapshot {
        host: host_ticks()?,
        gw: gw.map(proc_ticks).transpose()?.unwrap_or(0),
        gen,
    })
}

/// Measures the CPU used while `f` runs; `gw` is the snatgw process, `servers` the load
/// generator processes that are not this process's reaped children (the iperf3 server).
fn with_cpu<T>(
    gw: Option<u32>,
    servers: &[u32],
    f: impl FnOnce() -> Result<T, String>,
) -> Result<(T, Cpu), String> {
    let t = clk_tck()?;
    let a = snapshot(gw, servers)?;
    let r = f()?;
    let b = snapshot(gw, servers)?;
    let d = |x: u64, y: u64| y.saturating_sub(x) as f64 / t;
    Ok((
        r,
        Cpu {
            total: d(a.host.0, b.host.0),
            softirq: d(a.host.1, b.host.1),
            gw: d(a.gw, b.gw),
            gen: d(a.gen, b.gen),
        },
    ))
}

fn exec_ok(lab: &Lab, ns: &str, argv: &[&str], timeout: Duration) -> Result<String, String> {
    let out = lab
        .exec_timeout(ns, argv, timeout)
        .map_err(|e| format!("{argv:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{argv:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read_counter(lab: &Lab, ns: &str, ifname: &str, what: &str) -> Result<u64, String> {
    let p = format!("/sys/class/net/{ifname}/statistics/{what}");
    // /sys is per network namespace only when mounted inside `ip netns exec`.
    let s = exec_ok(lab, ns, &["cat", &p], Duration::from_secs(5))?;
    s.trim()
        .parse()
        .map_err(|_| format!("bad counter {p}: {s}"))
}

fn mac(lab: &Lab, ns: &str, ifname: &str) -> Result<String, String> {
    let s = exec_ok(
        lab,
        ns,
        &["cat", &format!("/sys/class/net/{ifname}/address")],
        Duration::from_secs(5),
    )?;
    Ok(s.trim().to_string())
}

fn mac_bytes(m: &str) -> String {
    m.split(':')
        .map(|b| format!("0x{b}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// 64-byte UDP frames (60 without FCS) with trafgen for `secs`; packets/s received by the
/// internet namespace.
fn measure_pps(lab: &Lab, dir: &Path, secs: u64) -> Result<f64, String> {
    // A discard sink (RFC 863) on the target port that never reads: the receiver drops each
    // datagram at the full socket instead of answering it with an ICMP port unreachable, whose
    // generation (route lookups per datagram) was the largest single cost of the old
    // workload, common to every side, and whose rate-limited replies came back through the
    // gateway (snatgw's TUN path, the kernel's conntrack).
    let stop = Arc::new(AtomicBool::new(false));
    let sink = lab
        .spawn_thread_in(&lab.inet_ns(), {
            let stop = stop.clone();
            move || -> Result<(), String> {
                let s = std::net::UdpSocket::bind((SERVER, 9)).map_err(|e| format!("sink: {e}"))?;
                nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBuf, &4096)
                    .map_err(|e| format!("sink: SO_RCVBUF: {e}"))?;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(())
            }
        })
        .map_err(|e| format!("sink: {e}"))?;
    let r = measure_pps_into_sink(lab, dir, secs);
    stop.store(true, Ordering::Relaxed);
    sink.join()
        .map_err(|_| "sink: thread panicked".to_string())??;
    r
}

fn measure_pps_into_sink(lab: &Lab, dir: &Path, secs: u64) -> Result<f64, String> {
    let ns = lab.ns_name("c0");
    let src = mac(lab, &ns, "eth0")?;
    let dst = mac(lab, &lab.gw_ns(), "br-priv")?;
    let conf = format!(
        "{{\n  {},\n  {},\n  0x08, 0x00,\n  0x45, 0x00, const16(46), 0x00, 0x00, 0x40, 0x00, 64, 17, csumip(14, 33),\n  {}, {},\n  const16(4000), const16(9), const16(26), csumudp(14, 34),\n  fill(0x00, 18),\n}}\n",
        mac_bytes(&dst),
        mac_bytes(&src),
        client_ip(0).octets().map(|b| b.to_string()).join(", "),
        SERVER.octets().map(|b| b.to_string()).join(", "),
    );
    let path = dir.join("trafgen.cfg");
    std::fs::write(&path, conf).map_err(|e| format!("write {}: {e}", path.display()))?;
    // Warm the flow (snatgw needs the first packet to create it; the kernel its conntrack).
    let cfg = path.to_string_lossy().into_owned();
    exec_ok(
        lab,
        &ns,
        &[
            "trafgen",
            "-o",
            "eth0",
            "-i",
            &cfg,
            "-n",
            "10",
            "-q",
            "--no-sock-mem",
        ],
        Duration::from_secs(10),
    )
    .map_err(|e| format!("trafgen warm-up: {e}"))?;
    std::thread::sleep(Duration::from_millis(200));
    let before = read_counter(lab, &lab.inet_ns(), "inet-gw", "rx_packets")?;
    let t = Instant::now();
    let secs_s = secs.to_string();
    let out = lab
        .exec_timeout(
            &ns,
            &[
                "timeout",
                "-s",
                "INT",
                &secs_s,
                "trafgen",
                "-o",
                "eth0",
                "-i",
                &cfg,
                "-q",
                "-P",
                "1",
                "--no-sock-mem",
            ],
            Duration::from_secs(secs + 10),
        )
        .map_err(|e| format!("trafgen: {e}"))?;
    let el = t.elapsed().as_secs_f64();
    // `timeout` exits 124 when it stopped trafgen at the deadline (the normal end); anything
    // else is trafgen's own exit status, i.e. it failed or ended on its own.
    if out.status.code() != Some(124) {
        return Err(format!(
            "trafgen: ended with {} after {el:.1} s instead of being stopped at {secs} s: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = read_counter(lab, &lab.inet_ns(), "inet-gw", "rx_packets")?;
    let n = after.saturating_sub(before);
    if n == 0 {
        return Err("trafgen: no packet reached the internet namespace".into());
    }
    Ok(n as f64 / el.max(0.1))
}

fn measure_bulk(lab: &Lab, secs: u64) -> Result<f64, String> {
    let out = exec_ok(
        lab,
        &lab.ns_name("c0"),
        &[
            "iperf3",
            "-c",
            &SERVER.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ],
        Duration::from_secs(secs + 20),
    )
    .map_err(|e| format!("iperf3 client: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("iperf3 client: bad JSON: {e}"))?;
    if let Some(err) = v["error"].as_str() {
        return Err(format!("iperf3 client: {err}"));
    }
    match v["end"]["sum_received"]["bits_per_second"].as_f64() {
        Some(b) if b > 0.0 => Ok(b / 1e9),
        Some(_) => Err("iperf3 client: 0 bits/s received".into()),
        None => Err("iperf3 client: no end.sum_received.bits_per_second in its report".into()),
    }
}

fn measure_cps(lab: &Lab, secs: u64) -> Result<f64, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    // Accept-and-close listeners in the internet namespace.
    let listeners = lab
        .spawn_thread_in(&lab.inet_ns(), {
            let stop = stop.clone();
            move || -> Result<(), String> {
                let mut ls = Vec::new();
                for p in 0..LISTEN_PORTS {
                    let bound = TcpListener::bind((SERVER, 10_000 + p))
                        .and_then(|l| l.set_nonblocking(true).map(|_| l));
                    match bound {
                        Ok(l) => ls.push(l),
                        Err(e) => {
                            let m = format!("listener {SERVER}:{}: {e}", 10_000 + p);
                            let _ = ready_tx.send(Err(m.clone()));
                            return Err(m);
                        }
                    }
                }
                let _ = ready_tx.send(Ok(()));
                // One acceptor for all listeners, as an event-driven server is written: it
                // sleeps in poll() until connections are pending, then accepts (and closes)
                // every one of them; no polling that costs CPU whatever the connection rate.
                // Before 2026-12-05: one thread per listener, sleeping 200 µs between
                // non-blocking accepts (docs/PERFORMANCE.md).
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                use std::os::fd::AsFd;
                while !stop.load(Ordering::Relaxed) {
                    let mut fds: Vec<PollFd> = ls
                        .iter()
                        .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
                        .collect();
                    match poll(&mut fds, PollTimeout::from(10u16)) {
                        Ok(0) => continue,
                        Ok(_) => {}
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(e) => return Err(format!("poll: {e}")),
                    }
                    let ready: Vec<bool> = fds
                        .iter()
                        .map(|f| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
                        .collect();
                    drop(fds);
                    for (l, _) in ls.iter().zip(ready).filter(|(_, r)| *r) {
                        while let Ok((s, _)) = l.accept() {
                            drop(s);
                        }
                    }
                }
                Ok(())
            }
        })
        .map_err(|e| format!("conn/s listeners: {e}"))?;
    let stop_listeners = |stop: &AtomicBool| {
        stop.store(true, Ordering::Relaxed);
    };
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = listeners.join();
            return Err(format!("conn/s listeners: {e}"));
        }
        Err(_) => {
            stop_listeners(&stop);
            let _ = listeners.join();
            return Err("conn/s listeners: not ready after 5 s".into());
        }
    }
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut clients = Vec::new();
    let mut spawn_err = None;
    for i in 0..CLIENTS {
        let (done, failed) = (done.clone(), failed.clone());
        let h = lab.spawn_thread_in(&lab.ns_name(&format!("c{i}")), move || {
            let mut k = i as u16;
            // Bounded by time; each attempt by its own 500 ms timeout.
            while Instant::now() < deadline {
                let dst = SocketAddr::from((SERVER, 10_000 + k % LISTEN_PORTS));
                k = k.wrapping_add(1);
                match TcpStream::connect_timeout(&dst, Duration::from_millis(500)) {
                    Ok(s) => {
                        let _ = nix::sys::socket::setsockopt(
                            &s,
                            nix::sys::socket::sockopt::Linger,
                            &nix::libc::linger {
                                l_onoff: 1,
                                l_linger: 0,
                            },
                        );
                        drop(s);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        match h {
            Ok(h) => clients.push(h),
            Err(e) => {
                spawn_err = Some(format!("conn/s client c{i}: {e}"));
                break;
            }
        }
    }
    let t = Instant::now();
    let mut dead = 0;
    for h in clients {
        if h.join().is_err() {
            dead += 1;
        }
    }
    let el = t.elapsed().as_secs_f64();
    stop_listeners(&stop);
    let lres = listeners
        .join()
        .map_err(|_| "conn/s listeners: thread panicked".to_string())
        .and_then(|r| r.map_err(|e| format!("conn/s listeners: {e}")));
    if let Some(e) = spawn_err {
        return Err(e);
    }
    lres?;
    if dead > 0 {
        return Err(format!("conn/s client: {dead} client thread(s) panicked"));
    }
    let n = done.load(Ordering::Relaxed);
    let f = failed.load(Ordering::Relaxed);
    if n == 0 {
        return Err(format!(
            "conn/s client: no connection completed ({f} attempts failed)"
        ));
    }
    if f as f64 > MAX_CONNECT_FAILURES * (n + f) as f64 {
        return Err(format!(
            "conn/s client: {f} of {} connection attempts failed (more than {:.0} %)",
            n + f,
            MAX_CONNECT_FAILURES * 100.0
        ));
    }
    if f > 0 {
        eprintln!("  conn/s: {f} of {} connection attempts failed", n + f);
    }
    Ok(n as f64 / el.max(0.1))
}

/// Sets the kernel side's conntrack timeouts inside the gateway namespace and checks they
/// took there and left the host's own values alone.
fn set_conntrack_timers(lab: &Lab) -> Result<(), String> {
    let gw = lab.gw_ns();
    let host_path = |k: &str| format!("/proc/sys/{}", k.replace('.', "/"));
    let read_host = |k: &str| -> Result<String, String> {
        std::fs::read_to_string(host_path(k))
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("host {k}: {e}"))
    };
    let host_before: Vec<String> = conntrack_timeouts()
        .iter()
        .map(|(k, _)| read_host(k))
        .collect::<Result<_, _>>()?;
    let assigns: Vec<String> = conntrack_timeouts()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut argv = vec!["sysctl", "-q", "-w"];
    argv.extend(assigns.iter().map(String::as_str));
    exec_ok(lab, &gw, &argv, Duration::from_secs(10))
        .map_err(|e| format!("conntrack timeouts in {gw}: {e}"))?;
    for ((k, v), before) in conntrack_timeouts().iter().zip(&host_before) {
        let now = exec_ok(lab, &gw, &["sysctl", "-n", k], Duration::from_secs(5))?;
        if now.trim() != v.to_string() {
            return Err(format!("{gw}: {k} reads {} after setting {v}", now.trim()));
        }
        let host_now = read_host(k)?;
        if &host_now != before {
            // Only reached on a kernel whose conntrack sysctls are not per namespace: put the
            // host's value back and refuse to race.
            let _ = std::fs::write(host_path(k), before);
            return Err(format!(
                "{k} is not per network namespace on this kernel (the host's value moved from \
                 {before} to {host_now}; restored)"
            ));
        }
    }
    Ok(())
}

/// Routes the private range (untranslated) from the internet namespace back to the gateway:
/// what both floors need, as nothing is translated.
fn route_private_back(lab: &Lab) -> Result<(), String> {
    exec_ok(
        lab,
        &lab.inet_ns(),
        &[
            "ip",
            "route",
            "add",
            "10.0.0.0/16",
            "via",
            "198.51.100.1",
            "dev",
            "inet-gw",
        ],
        Duration::from_secs(10),
    )
    .map_err(|e| format!("floor: {e}"))?;
    Ok(())
}

/// Turns the kernel-NAT lab into the floor: no nftables rules in the gateway namespace and the
/// private range routed (untranslated) from the internet namespace back to the gateway.
fn make_floor(lab: &Lab) -> Result<(), String> {
    let gw = lab.gw_ns();
    exec_ok(
        lab,
        &gw,
        &["nft", "delete", "table", "ip", "snatgw_lab"],
        Duration::from_secs(10),
    )
    .map_err(|e| format!("floor: {e}"))?;
    let rules = exec_ok(
        lab,
        &gw,
        &["nft", "list", "ruleset"],
        Duration::from_secs(10),
    )?;
    if !rules.trim().is_empty() {
        return Err(format!("floor: {gw} still has nftables rules: {rules}"));
    }
    route_private_back(lab)
}

/// Live conntrack entries in the gateway namespace (`None` if conntrack is not loaded).
fn conntrack_count(lab: &Lab) -> Option<u64> {
    exec_ok(
        lab,
        &lab.gw_ns(),
        &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"],
        Duration::from_secs(5),
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
}

fn one_side(a: &RaceArgs, side: Side, offloads: bool, dir: &Path) -> Result<Figures, String> {
    let mut spec = LabSpec::new(&a.prefix).with_offloads(offloads);
    for i in 0..CLIENTS {
        spec = spec.with_instance(format!("c{i}"), client_ip(i));
    }
    spec.public_ips = vec![POOL_IP.parse().map_err(|_| "bad ip")?];
    let gateway = matches!(side, Side::Snatgw | Side::SnatgwTun | Side::FastFloor);
    spec = spec.with_mode(if gateway {
        GatewayMode::snatgw()
    } else {
        GatewayMode::Kernel(KernelNat::Masquerade)
    });
    let mut lab = Lab::up(spec).map_err(|e| format!("lab up: {e}"))?;
    let res = (|| -> Result<Figures, String> {
        if offloads {
            // With TUN offload on, the gateway hands the kernel UDP-GSO super-packets (tun-rs
            // coalesces a flow's datagrams), and veth passes them whole: `rx_packets` on the far
            // side would count one per super-packet. Segmenting on the gateway's egress keeps
            // the pps figure a count of real 64-byte packets (the segmentation cost stays on
            // the gateway's side), while TCP keeps TSO. Done on every side alike.
            exec_ok(
                &lab,
                &lab.gw_ns(),
                &["ethtool", "-K", "gw-inet", "tx-udp-segmentation", "off"],
                Duration::from_secs(10),
            )?;
        }
        match side {
            Side::Kernel => set_conntrack_timers(&lab)?,
            Side::Floor => make_floor(&lab)?,
            Side::FastFloor => route_private_back(&lab)?,
            Side::Snatgw | Side::SnatgwTun => {}
        }
        let iperf = lab
            .spawn_with(
                &lab.inet_ns(),
                &["iperf3", "-s", "-B", &SERVER.to_string()],
                std::process::Stdio::null(),
                std::process::Stdio::null(),
            )
            .map_err(|e| format!("iperf3 server: {e}"))?;
        let mut gw_pid = None;
        let mut gw_child = None;
        if gateway {
            let exe = crate::gateway_bin()?;
            let cfg = dir.join("race.toml");
            std::fs::write(&cfg, config()).map_err(|e| e.to_string())?;
            let mut extra = vec!["--tx-queue-len".into(), "10000".into()];
            if side == Side::FastFloor {
                extra.push("--fast-path-floor".into());
            }
            let gw = start_gateway(
                &lab,
                &GatewayOptions {
                    offload: offloads,
                    fast_path: if side == Side::SnatgwTun { "off" } else { "tc" }.into(),
                    extra,
                    ..GatewayOptions::new(exe, cfg, a.queues, dir.join("stats.json"))
                },
            )
            .map_err(|e| format!("snatgw run: {e}"))?;
            gw_pid = Some(gw.id());
            gw_child = Some(gw);
        }
        std::thread::sleep(Duration::from_millis(500));
        if let Ok(Some(st)) = iperf.try_wait() {
            return Err(format!("iperf3 server: exited early with {st}"));
        }
        let servers = [iperf.id()];
        let w = Workloads::parse(&a.workloads)?;
        let skipped = (f64::NAN, Cpu::default());
        let (pps, cpu_pps) = if w.pps {
            with_cpu(gw_pid, &servers, || measure_pps(&lab, dir, a.secs))?
        } else {
            skipped
        };
        let (gbps, cpu_bulk) = if w.bulk {
            with_cpu(gw_pid, &servers, || measure_bulk(&lab, a.secs))?
        } else {
            skipped
        };
        let (cps, cpu_cps) = if w.cps {
            with_cpu(gw_pid, &servers, || measure_cps(&lab, a.secs))?
        } else {
            skipped
        };
        if matches!(side, Side::Snatgw | Side::FastFloor) {
            // The fast path must have carried the load, or this is no fast-path figure.
            let st = read_fast_path_stats(&dir.join("stats.json"))?;
            let worked = if side == Side::Snatgw {
                st.0 + st.1
            } else {
                st.2
            };
            if worked == 0 {
                return Err(format!(
                    "{}: the fast path carried nothing ({st:?})",
                    side.name()
                ));
            }
        }
        drop(gw_child);
        if matches!(side, Side::Floor | Side::FastFloor) {
            if let Some(n) = conntrack_count(&lab).filter(|&n| n > 0) {
                return Err(format!(
                    "floor: {n} conntrack entries in the gateway namespace (it should track nothing)"
                ));
            }
        }
        Ok(Figures {
            pps,
            gbps,
            cps,
            cpu_pps,
            cpu_bulk,
            cpu_cps,
        })
    })();
    let down = lab.down().map_err(|e| format!("lab down: {e}"));
    let f = res?;
    down?;
    Ok(f)
}

/// (translated out, translated in, floor redirects) of the fast path, from a stats snapshot.
fn read_fast_path_stats(path: &Path) -> Result<(u64, u64, u64), String> {
    // The snapshot is written every second; wait for one taken after the measurements.
    std::thread::sleep(Duration::from_millis(1200));
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let p = &v["fast_path"]["packets"];
    let g = |k: &str| p[k].as_u64().unwrap_or(0);
    Ok((g("translated_out"), g("translated_in"), g("floor")))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if !n.is_multiple_of(2) {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn fmt_fig(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.2}")
    }
}

fn mmm(v: &[f64]) -> String {
    if v.iter().all(|x| x.is_nan()) {
        return "–".into();
    }
    let (lo, hi) = min_max(v);
    format!("{} / {} / {}", fmt_fig(lo), fmt_fig(median(v)), fmt_fig(hi))
}

/// One figure: its name and how to pick its value and CPU from a run.
struct Row {
    what: &'static str,
    pick: fn(&Figures) -> f64,
    cpu: fn(&Figures) -> Cpu,
}

const ROWS: [Row; 3] = [
    Row {
        what: "64-byte UDP pps",
        pick: |f| f.pps,
        cpu: |f| f.cpu_pps,
    },
    Row {
        what: "TCP bulk Gb/s",
        pick: |f| f.gbps,
        cpu: |f| f.cpu_bulk,
    },
    Row {
        what: "new TCP conn/s",
        pick: |f| f.cps,
        cpu: |f| f.cpu_cps,
    },
];

/// The runs of one offload setting: `runs[round]` holds (side, figures) in run order.
type Runs = Vec<Vec<(Side, Figures)>>;

/// Per-round value of `side` for `pick`: the mean of that side's runs in the round.
fn per_round(runs: &Runs, side: Side, pick: impl Fn(&Figures) -> f64) -> Vec<f64> {
    runs.iter()
        .map(|r| {
            let v: Vec<f64> = r
                .iter()
                .filter(|(s, _)| *s == side)
                .map(|(_, f)| pick(f))
                .collect();
            mean(&v)
        })
        .collect()
}

fn tables(
    label: &str,
    runs: &Runs,
    work: Workloads,
    sides: &[Side],
    figs: &mut String,
    cpus: &mut String,
) {
    for (ri, row) in ROWS.iter().enumerate() {
        if !work.has(ri) {
            continue;
        }
        let per = |side| per_round(runs, side, row.pick);
        let (s, t, k, fl, ff) = (
            per(Side::Snatgw),
            per(Side::SnatgwTun),
            per(Side::Kernel),
            per(Side::Floor),
            per(Side::FastFloor),
        );
        let (sm, tm, km, fm, ffm) = (median(&s), median(&t), median(&k), median(&fl), median(&ff));
        let ratios: Vec<f64> = s.iter().zip(&k).map(|(a, b)| a / b).collect();
        let (rlo, rhi) = min_max(&ratios);
        let _ = writeln!(
            figs,
            "| {label} | {} | {} | {} | {} | {} | {} | **{:.2}x** ({rlo:.2}–{rhi:.2}) | {:.2} | {:.2} | {:.2} |",
            row.what,
            mmm(&s),
            mmm(&t),
            mmm(&k),
            mmm(&fl),
            mmm(&ff),
            sm / km,
            tm / km,
            sm / ffm,
            km / fm,
        );
        for side in Side::ALL.into_iter().filter(|s| sides.contains(s)) {
            let cpu = |p: fn(&Cpu) -> f64| -> String {
                let v = per_round(runs, side, |f| p(&(row.cpu)(f)));
                format!("{:.2}", median(&v))
            };
            let _ = writeln!(
                cpus,
                "| {label} | {} | {} | {} | {} | {} | {} | {} |",
                row.what,
                side.name(),
                cpu(|c| c.total),
                cpu(|c| c.gw),
                cpu(|c| c.gen),
                cpu(|c| c.rest()),
                cpu(|c| c.softirq),
            );
        }
    }
}

/// `snatgw-lab race` (`snatgw race`).
pub fn run(a: &RaceArgs) -> Result<(), String> {
    if !snatgw_lab::is_root() {
        return Err("the race needs root (network namespaces)".into());
    }
    if a.rounds < 3 {
        return Err(format!(
            "--rounds {}: at least 3 rounds, so min / median / max mean something",
            a.rounds
        ));
    }
    if a.secs == 0 || a.secs > 600 {
        return Err(format!("--secs {}: between 1 and 600", a.secs));
    }
    for tool in ["iperf3", "trafgen", "nft", "ethtool", "sysctl", "timeout"] {
        let found = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file());
        if !found {
            return Err(format!(
                "{tool} not found (Debian: apt-get install -y iperf3 netsniff-ng nftables ethtool procps)"
            ));
        }
    }
    let work = Workloads::parse(&a.workloads)?;
    let sides = parse_sides(&a.sides)?;
    let mut settings = Vec::new();
    for s in &a.offloads {
        match s.as_str() {
            "off" => settings.push(false),
            "on" => settings.push(true),
            other => return Err(format!("--offloads: {other:?} is neither off nor on")),
        }
    }
    if settings.is_empty() {
        settings = vec![false, true];
    }
    let dir = std::env::temp_dir().join(format!("snatgw-race-{}", a.prefix.trim_end_matches('-')));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    println!(
        "timers on both sides: idle {IDLE_SECS} s, FIN {FIN_SECS} s, RST {RST_SECS} s (snatgw \
         configuration; the kernel side's conntrack timeouts in its gateway namespace):"
    );
    for (k, v) in conntrack_timeouts() {
        println!("  {k} = {v}");
    }
    let t0 = Instant::now();
    let mut figs = String::from(
        "| offloads | figure | snatgw (fast path) min / median / max | snatgw-tun | kernel | floor | fast-floor | snatgw / kernel (per-round min–max) | snatgw-tun / kernel | snatgw / fast-floor | kernel / floor |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut cpus = String::from(
        "| offloads | figure | side | total | gw | gen | rest | softirq (overlaps) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for &off in &settings {
        let label = if off { "on" } else { "off" };
        let mut runs: Runs = Vec::new();
        for round in 0..a.rounds {
            let mut this = Vec::new();
            for side in round_order(round).into_iter().filter(|s| sides.contains(s)) {
                print!("offloads {label}, round {}, {}: ", round + 1, side.name());
                let _ = std::io::stdout().flush();
                let f = one_side(a, side, off, &dir).map_err(|e| {
                    format!(
                        "offloads {label}, round {}, {}: {e}",
                        round + 1,
                        side.name()
                    )
                })?;
                println!(
                    "{:.0} pps, {:.2} Gb/s, {:.0} conn/s; CPU s total/gw/gen {:.1}/{:.1}/{:.1}, {:.1}/{:.1}/{:.1}, {:.1}/{:.1}/{:.1}",
                    f.pps,
                    f.gbps,
                    f.cps,
                    f.cpu_pps.total,
                    f.cpu_pps.gw,
                    f.cpu_pps.gen,
                    f.cpu_bulk.total,
                    f.cpu_bulk.gw,
                    f.cpu_bulk.gen,
                    f.cpu_cps.total,
                    f.cpu_cps.gw,
                    f.cpu_cps.gen,
                );
                this.push((side, f));
            }
            runs.push(this);
        }
        tables(label, &runs, work, &sides, &mut figs, &mut cpus);
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{} rounds (kernel, snatgw, floor, fast-floor, snatgw-tun, snatgw, kernel; odd rounds swap \
         kernel and snatgw), {} s per measurement, {:.0} s in all. Per side and round the mean of \
         its runs; min / median / max over the rounds; ratios of the medians.\n",
        a.rounds,
        a.secs,
        t0.elapsed().as_secs_f64()
    );
    md.push_str(&figs);
    let _ = writeln!(
        md,
        "\nCPU seconds per measurement (median over the rounds): total = host busy, all CPUs; gw = \
         snatgw process; gen = load generators and servers; rest = total − gw − gen.\n"
    );
    md.push_str(&cpus);
    println!();
    print!("{md}");
    if let Some(p) = &a.markdown {
        std::fs::write(p, &md).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_abba_and_alternate() {
        use Side::*;
        assert_eq!(
            round_order(0),
            [Kernel, Snatgw, Floor, FastFloor, SnatgwTun, Snatgw, Kernel]
        );
        assert_eq!(
            round_order(1),
            [Snatgw, Kernel, Floor, FastFloor, SnatgwTun, Kernel, Snatgw]
        );
    }

    #[test]
    fn statistics() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(min_max(&[3.0, 1.0, 2.0]), (1.0, 3.0));
    }

    #[test]
    fn race_config_has_the_timers_the_kernel_gets() {
        let c = snatgw_core::ConfigFile::from_toml(&config()).unwrap();
        assert_eq!(c.gateway.idle_timeout_secs, IDLE_SECS);
        assert_eq!(c.gateway.fin_timeout_secs, FIN_SECS);
        assert_eq!(c.gateway.rst_timeout_secs, RST_SECS);
    }

    #[test]
    fn self_stat_parses() {
        assert!(self_ticks().is_ok());
        assert!(clk_tck().unwrap() > 0.0);
    }
}
