//! Restart without losing flows (SPEC R11.1, issue #18), with real sockets: 500 TCP
//! connections and 200 UDP flows held by this process cross `snatgw run`, which is killed with
//! SIGKILL (a crash), stopped with SIGTERM, or replaced by a copy of its binary at another
//! path (an upgrade), and started again on the same state directory.
//!
//! - Every held TCP connection must exchange data afterwards and close cleanly both ways: a
//!   connection whose public port changed would be answered with a reset by the server, or
//!   not at all, so [`probe`] and [`close_confirmed`] passing is the proof that the same public
//!   IP:port carries it.
//! - Every held UDP socket asks the lab's DNS responder which `ip:port` it sees (the R6.4
//!   TXT answer) before and after: the answer must not change. New flows are opened first
//!   after the restart, so a flow that was not restored would lose its port to them.
//! - With the kernel fast path pinned on a bpffs (`--bpf-pin-dir`), established TCP data and
//!   UDP answers keep flowing through the kernel while no gateway process runs (5 s).
//!
//! Root only (fails instead of skipping when `SNATGW_REQUIRE_ROOT=1`).

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use snatgw_lab::dns;

const HOLD_A: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(SERVER_A), 9000);
const DNS_A: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(SERVER_A), 53);
const CONNECT: Duration = Duration::from_secs(3);

const CONFIG: &str = r#"
[gateway]
seed = 5
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.40"]
idle_timeout_secs = 240

[[availability_set]]
name = "as1"

[[instance]]
name = "r0"
private_ip = "10.0.7.10"
availability_set = "as1"

[[instance]]
name = "r1"
private_ip = "10.0.7.11"
availability_set = "as1"
"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stop {
    /// SIGKILL, then the same binary.
    Kill,
    /// SIGTERM, then the same binary.
    Term,
    /// SIGTERM, then a copy of the binary at another path (an upgrade).
    Upgrade,
}

/// A bpffs mounted on a directory of the test, unmounted (pins removed first) on drop.
struct Bpffs(PathBuf);

impl Bpffs {
    fn mount(dir: &Path) -> Bpffs {
        std::fs::create_dir_all(dir).expect("dir");
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mounting a bpffs on {}", dir.display());
        Bpffs(dir.to_path_buf())
    }
}

impl Bpffs {
    /// The pin directory the gateway is given.
    fn pins(&self) -> PathBuf {
        self.0.join("pins")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = snatgw_io::pin::remove_all(&self.pins());
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A lab gateway with the fast path on (`tc`) and pinned on a bpffs mounted in the test's
/// directory, with `extra` arguments. Keep the [`Bpffs`] until the lab is down (bind it
/// first, so on a failure it is dropped after the lab).
fn start_pinned(tag: &str, config: &str, only: Option<&[&str]>, extra: &[&str]) -> (Bpffs, GwLab) {
    let mut bpffs = None;
    let g = GwLab::start_with(tag, config, only, |o, dir| {
        let fs = Bpffs::mount(&dir.join("bpf"));
        o.fast_path = "tc".into();
        o.extra
            .extend(["--bpf-pin-dir".into(), fs.pins().display().to_string()]);
        o.extra.extend(extra.iter().map(|a| a.to_string()));
        bpffs = Some(fs);
    });
    (bpffs.expect("mounted"), g)
}

/// Waits (bounded) until `instance` uses `n` `proto` ports, per the stats file.
fn wait_used(g: &GwLab, instance: &str, proto: &str, n: u64, limit: Duration) -> bool {
    g.wait(limit, |s| u(&inst_of(s, instance)["used"][proto]) == n)
}

/// A TCP connection from `instance` to the echo server, after one exchange of data.
fn echo_open(g: &GwLab, instance: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let echo: SocketAddr = format!("{SERVER_A}:7").parse().unwrap();
    g.in_instance(instance, move || {
        let mut s = std::net::TcpStream::connect_timeout(&echo, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"0123456789").unwrap();
        let mut b = [0u8; 10];
        s.read_exact(&mut b).unwrap();
        s
    })
}

/// FIN both ways: the client shuts its side down, the echo server closes too; returns once
/// the server's FIN arrived.
fn close_both_ways(mut s: std::net::TcpStream) {
    use std::io::Read;
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the server's FIN came back");
}

fn ports(conns: &[Held]) -> BTreeSet<(std::net::Ipv4Addr, u16)> {
    conns.iter().map(|h| (*h.seen.ip(), h.port())).collect()
}

/// `n` UDP sockets in `instance`, each connected to the DNS responder (a flow each).
fn udp_flows(g: &GwLab, instance: &str, n: usize) -> Vec<UdpSocket> {
    g.in_instance(instance, move || {
        (0..n)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                s.connect(DNS_A).expect("connect");
                s.set_read_timeout(Some(Duration::from_millis(700)))
                    .expect("timeout");
                s
            })
            .collect()
    })
}

/// The `ip:port` the responder sees from each socket (3 tries each), `None` where no answer.
fn seen(socks: &[UdpSocket], round: u16) -> Vec<Option<String>> {
    let mut q = Vec::new();
    let mut buf = [0u8; 1500];
    socks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            for t in 0..3u16 {
                let id = round.wrapping_mul(1000).wrapping_add(i as u16 * 3 + t);
                dns::build_query(id, "myip.snatgw.test", dns::TYPE_TXT, &mut q).expect("query");
                if s.send(&q).is_err() {
                    continue;
                }
                while let Ok(n) = s.recv(&mut buf) {
                    if let Ok(r) = dns::parse_response(&buf[..n]) {
                        if r.id == id {
                            for rec in r.records {
                                if let dns::RData::Txt(t) = rec {
                                    return Some(t);
                                }
                            }
                        }
                    }
                }
            }
            None
        })
        .collect()
}

fn restart_keeps_flows(tag: &str, stop: Stop, fast: bool) {
    if !root_or_skip() {
        return;
    }
    snatgw_lab::raise_nofile_limit();
    let (bpffs, mut g) = if fast {
        let (fs, g) = start_pinned(tag, CONFIG, None, &[]);
        (Some(fs), g)
    } else {
        (None, GwLab::start(tag, CONFIG, None))
    };
    let mut held = Vec::new();
    for inst in ["r0", "r1"] {
        let (c, failed) = g.hold_conns(inst, HOLD_A, 250, CONNECT);
        assert_eq!(
            (c.len(), failed),
            (250, 0),
            "{inst}: connections before the restart"
        );
        held.extend(c);
    }
    assert_eq!(
        ports(&held).len(),
        500,
        "R2.3: one public port per connection"
    );
    let mut udp = udp_flows(&g, "r0", 100);
    udp.extend(udp_flows(&g, "r1", 100));
    let before = seen(&udp, 1);
    assert!(
        before.iter().all(Option::is_some),
        "UDP flows before the restart"
    );
    let distinct: BTreeSet<_> = before.iter().flatten().collect();
    assert_eq!(distinct.len(), 200);
    match stop {
        Stop::Kill => {
            // Let a periodic snapshot (every second by default) include every flow.
            std::thread::sleep(Duration::from_millis(2500));
            g.gw.kill().expect("SIGKILL");
        }
        Stop::Term | Stop::Upgrade => {
            // A clean stop writes a last snapshot: connections opened just before it are kept
            // too, whatever the period.
            let (c, failed) = g.hold_conns("r0", HOLD_A, 20, CONNECT);
            assert_eq!((c.len(), failed), (20, 0));
            held.extend(c);
            assert!(
                snatgw_lab::gateway::stop_gateway(&g.gw, Duration::from_secs(10)),
                "gateway did not exit cleanly on SIGTERM"
            );
        }
    }
    let _ = g.gw.wait_timeout(Duration::from_secs(10));
    if fast {
        // No gateway process runs: the pinned programs carry established flows (R11.1).
        let dead = probe(&held, &BTreeSet::new());
        assert!(
            dead.is_empty(),
            "{} of {} held connections got no answer while the gateway was down",
            dead.len(),
            held.len()
        );
        let down = seen(&udp, 2);
        assert_eq!(down, before, "UDP answers while the gateway was down");
    } else {
        std::thread::sleep(Duration::from_secs(1));
    }
    if stop == Stop::Upgrade {
        // The "new version": the same build copied to another path.
        let new_bin = g.dir.join("snatgw-new");
        std::fs::copy(&g.opts.bin, &new_bin).expect("copy the binary");
        g.opts.bin = new_bin;
    }
    g.restart();
    let log = g.log();
    assert!(
        log.contains("restored the flow state"),
        "the restart did not restore flows:\n{log}"
    );
    // New flows first: a held flow that was not restored would lose its port to them.
    let (more, failed) = g.hold_conns("r1", HOLD_A, 50, CONNECT);
    assert_eq!((more.len(), failed), (50, 0));
    let mut fresh = udp_flows(&g, "r0", 20);
    fresh.extend(udp_flows(&g, "r1", 20));
    let fresh_seen = seen(&fresh, 3);
    assert!(fresh_seen.iter().all(Option::is_some));
    let dead = probe(&held, &BTreeSet::new());
    assert!(
        dead.is_empty(),
        "{} of {} held connections broken by the restart: {:?}",
        dead.len(),
        held.len(),
        dead.iter().take(10).collect::<Vec<_>>()
    );
    let after = seen(&udp, 4);
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert_eq!(
        moved, 0,
        "UDP flows answered from another ip:port after the restart"
    );
    // R2.2: new flows never share a public port with a restored one to the same server.
    let all: BTreeSet<_> = ports(&held).union(&ports(&more)).copied().collect();
    assert_eq!(
        all.len(),
        held.len() + 50,
        "a new connection reused a held one's port"
    );
    let udp_all: BTreeSet<_> = after.iter().chain(&fresh_seen).flatten().collect();
    assert_eq!(
        udp_all.len(),
        240,
        "a new UDP flow reused a restored one's port"
    );
    let n = held.len();
    assert_eq!(
        close_confirmed(held),
        n,
        "held connections closing both ways"
    );
    assert_eq!(close_confirmed(more), 50);
    if fast {
        // The restart took the pinned maps over.
        assert!(
            log.contains("taken over from the previous run's pins"),
            "{log}"
        );
    }
    g.finish();
    drop(bpffs);
}

#[test]
fn r11_1_sigkill_and_restart_keeps_500_tcp_and_200_udp_flows_on_their_ports() {
    restart_keeps_flows("rk", Stop::Kill, false);
}

#[test]
fn r11_1_clean_stop_and_restart_keeps_every_flow() {
    restart_keeps_flows("rs", Stop::Term, false);
}

#[test]
fn r11_1_fast_path_carries_flows_while_the_gateway_is_killed_and_the_restart_takes_over() {
    restart_keeps_flows("rf", Stop::Kill, true);
}

#[test]
fn r11_1_upgrade_to_a_binary_at_another_path_keeps_every_flow_through_the_kernel() {
    restart_keeps_flows("ru", Stop::Upgrade, true);
}

/// Timers across a restart (R3.2, R3.4 with R11.1), with short test timers: a TCP flow closed
/// both ways (FIN) before a SIGKILL releases its port FIN + 6 s after the FIN, and a UDP flow
/// idle since before it releases its port at its last packet + 10 s, to the second, measured
/// from the test's own clock (the gateway's used ports, read from its stats file every
/// 200 ms). Engine seconds are whole: a deadline is met between 1 s early and on time, plus
/// the polling.
#[test]
fn r11_1_fin_and_idle_timers_run_on_across_a_sigkill_to_the_second() {
    use std::time::Instant;
    if !root_or_skip() {
        return;
    }
    const TIMERS: &str = r#"
[gateway]
seed = 6
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.41"]
idle_timeout_secs = 10
fin_timeout_secs = 6
rst_timeout_secs = 2

[[instance]]
name = "t-fin"
private_ip = "10.0.8.10"

[[instance]]
name = "t-udp"
private_ip = "10.0.8.11"
"#;
    let mut g = GwLab::start("rt", TIMERS, None);
    let echo: SocketAddr = format!("{SERVER_A}:7").parse().unwrap();
    let used = |g: &GwLab, name: &str, proto: &str| u(&g.inst(name)["used"][proto]);
    // UDP: one datagram and its echo, then nothing.
    g.in_instance("t-udp", move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(echo).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send(b"ping").unwrap();
        let mut b = [0u8; 16];
        assert_eq!(s.recv(&mut b).unwrap(), 4);
    });
    let t_udp = Instant::now();
    // TCP: data, then FIN both ways (the echo server closes when the client does).
    close_both_ways(echo_open(&g, "t-fin"));
    let t_fin = Instant::now();
    assert!(wait_used(&g, "t-fin", "tcp", 1, Duration::from_secs(3)));
    // A snapshot after the FIN (every second), then a crash and a start.
    std::thread::sleep(Duration::from_millis(2000));
    g.gw.kill().expect("SIGKILL");
    let _ = g.gw.wait_timeout(Duration::from_secs(10));
    g.restart();
    assert!(g.log().contains("restored the flow state"), "{}", g.log());
    assert_eq!(
        used(&g, "t-fin", "tcp"),
        1,
        "the closing flow was not restored"
    );
    assert_eq!(
        used(&g, "t-udp", "udp"),
        1,
        "the idle flow was not restored"
    );
    // FIN + 6 s (R3.2).
    assert!(wait_used(&g, "t-fin", "tcp", 0, Duration::from_secs(10)));
    let dt = t_fin.elapsed().as_secs_f64();
    assert!(
        (4.9..=7.6).contains(&dt),
        "FIN port released {dt:.2} s after the FIN (6 s)"
    );
    // Last packet + 10 s (R3.4/R3.5): still held a little before, gone on time.
    let before = Duration::from_millis(8_700);
    if let Some(wait) = before.checked_sub(t_udp.elapsed()) {
        std::thread::sleep(wait);
        assert_eq!(used(&g, "t-udp", "udp"), 1, "idle UDP port released early");
    }
    assert!(wait_used(&g, "t-udp", "udp", 0, Duration::from_secs(10)));
    let dt = t_udp.elapsed().as_secs_f64();
    assert!(
        (8.9..=11.6).contains(&dt),
        "idle UDP port released {dt:.2} s after its packet (10 s)"
    );
    g.finish();
}

/// FIN both ways while no gateway runs (R3.2 with R11.1 and issue #17): with the fast path
/// pinned, the kernel translates both FINs of an installed flow and records them in the pinned
/// EVENTS ring; the restarted gateway reads the records and releases the port FIN + 6 s after
/// the kernel saw the FIN, not at the idle timeout (60 s) as it would without them.
#[test]
fn r11_1_fin_seen_by_the_kernel_while_down_times_the_port_after_the_restart() {
    use std::time::Instant;
    if !root_or_skip() {
        return;
    }
    const TIMERS: &str = r#"
[gateway]
seed = 7
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.42"]
idle_timeout_secs = 60
fin_timeout_secs = 6
rst_timeout_secs = 2

[[instance]]
name = "t-fin"
private_ip = "10.0.9.10"
"#;
    let (bpffs, mut g) = start_pinned("rw", TIMERS, None, &[]);
    let s = echo_open(&g, "t-fin");
    assert!(wait_used(&g, "t-fin", "tcp", 1, Duration::from_secs(3)));
    std::thread::sleep(Duration::from_millis(1500));
    g.gw.kill().expect("SIGKILL");
    let _ = g.gw.wait_timeout(Duration::from_secs(10));
    // No gateway runs: the FIN out, the echo server's FIN back, both through the kernel.
    close_both_ways(s);
    let t_fin = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    g.restart();
    assert!(g.log().contains("restored the flow state"), "{}", g.log());
    assert!(
        wait_used(&g, "t-fin", "tcp", 0, Duration::from_secs(15)),
        "the port was not released after the FIN timeout"
    );
    let dt = t_fin.elapsed().as_secs_f64();
    assert!(
        (4.9..=7.6).contains(&dt),
        "port released {dt:.2} s after the FIN (6 s)"
    );
    g.finish();
    drop(bpffs);
}

/// `--detach-on-exit` (R11.1's way to stop for good): a clean stop detaches the pinned fast
/// path and removes its pins, so the kernel stops translating the held connections at once.
#[test]
fn r11_1_detach_on_exit_removes_the_pins_and_the_kernel_stops_translating() {
    if !root_or_skip() {
        return;
    }
    let (bpffs, g) = start_pinned("rd", CONFIG, Some(&["r0"]), &["--detach-on-exit"]);
    let pins = bpffs.pins();
    let (held, failed) = g.hold_conns("r0", HOLD_A, 10, CONNECT);
    assert_eq!((held.len(), failed), (10, 0));
    assert!(snatgw_io::pin::read_pinned_flows(&pins)
        .expect("read")
        .is_some_and(|f| f.len() == 20));
    assert!(
        snatgw_lab::gateway::stop_gateway(&g.gw, Duration::from_secs(10)),
        "gateway did not exit cleanly on SIGTERM"
    );
    assert!(
        snatgw_io::pin::read_pinned_flows(&pins)
            .expect("read")
            .is_none(),
        "pins left after --detach-on-exit"
    );
    let all: BTreeSet<usize> = (0..held.len()).collect();
    assert_eq!(
        probe(&held, &all),
        all,
        "the kernel still translates after the stop"
    );
    assert!(g.log().contains("fast path detached"), "{}", g.log());
    g.finish();
    drop(bpffs);
}

/// A saved state that cannot be restored (here: its topology is one this build refuses) does
/// not keep the gateway down (R11.1): it starts with no flows and says why.
#[test]
fn r11_1_an_unrestorable_state_starts_the_gateway_without_flows() {
    use snatgw_runtime::persist::StateFile;
    if !root_or_skip() {
        return;
    }
    let mut g = GwLab::start("rx", CONFIG, Some(&["r0"]));
    let (held, failed) = g.hold_conns("r0", HOLD_A, 5, CONNECT);
    assert_eq!((held.len(), failed), (5, 0));
    assert!(
        snatgw_lab::gateway::stop_gateway(&g.gw, Duration::from_secs(10)),
        "gateway did not exit cleanly on SIGTERM"
    );
    let file = StateFile::in_dir(&g.opts.state_dir);
    let mut saved = file
        .read()
        .expect("read")
        .expect("a state was saved at the stop");
    assert_eq!(saved.flows.flows.len(), 5);
    saved.config.gateway.vnet_prefixes = vec!["not a prefix".into()];
    file.write(&saved).expect("write");
    g.restart();
    let log = g.log();
    assert!(log.contains("not restoring flows"), "{log}");
    assert!(!log.contains("restored the flow state"), "{log}");
    let (more, failed) = g.hold_conns("r0", HOLD_A, 5, CONNECT);
    assert_eq!(
        (more.len(), failed),
        (5, 0),
        "new connections after the start"
    );
    drop(held);
    g.finish();
}
