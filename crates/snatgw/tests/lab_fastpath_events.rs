//! Issue #17 with real sockets, fast path forced on (`--fast-path tc`): the kernel carries a
//! connection's SYN-ACK, FIN and RST, only its SYN goes up through the TUN, and the port is
//! released `fin_timeout` (3 s) after FIN both ways and `rst_timeout` (2 s) after a RST, timed
//! from the second the kernel saw the packet (its EVENTS record) and measured here from the
//! test's clock (R3.2, R3.3). With the ring forced full (one page, not read for 10 s) the FIN
//! and RST go up instead (`event_full`), their timers are the engine's own and still exact,
//! and the records held meanwhile are applied late at their own times. Root only.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::socket::{setsockopt, sockopt};
use serde_json::Value;

const CONFIG: &str = r#"
[gateway]
seed = 17
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.41"]
idle_timeout_secs = 30
fin_timeout_secs = 3
rst_timeout_secs = 2
port_reuse_history_secs = 1

[[instance]]
name = "e-fin"
private_ip = "10.0.7.10"
[[instance]]
name = "e-rst"
private_ip = "10.0.7.11"
[[instance]]
name = "e-fill"
private_ip = "10.0.7.12"
[[instance]]
name = "e-many"
private_ip = "10.0.7.13"
"#;

fn echo() -> SocketAddr {
    format!("{SERVER_A}:7").parse().unwrap()
}

fn fp_packets(s: &Value, what: &str) -> u64 {
    u(&s["fast_path"]["packets"][what])
}

fn used_tcp(s: &Value, name: &str) -> u64 {
    u(&inst_of(s, name)["used"]["tcp"])
}

/// A stats snapshot written after now (the file is rewritten every 200 ms).
fn fresh(g: &GwLab) -> Value {
    std::thread::sleep(Duration::from_millis(450));
    g.snapshot()
}

/// One connection to the echo server: a round trip, then FIN both ways (the client shuts
/// down its side, the server closes). Returns when the server's FIN has arrived.
fn fin_conn() {
    let mut s = TcpStream::connect_timeout(&echo(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"0123456789").unwrap();
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
}

/// One connection closed by a RST from the client (SO_LINGER 0).
fn rst_conn(round_trip: bool) {
    let mut s = TcpStream::connect_timeout(&echo(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if round_trip {
        s.write_all(b"0123456789").unwrap();
        let mut b = [0u8; 10];
        s.read_exact(&mut b).unwrap();
    }
    setsockopt(
        &s,
        sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .unwrap();
    drop(s);
}

/// Waits until `name` holds no TCP port; returns how long after `since` that was seen.
fn released_after(g: &GwLab, name: &str, since: Instant, limit: Duration) -> Duration {
    let ok = g.wait(limit, |s| used_tcp(s, name) == 0);
    let after = since.elapsed();
    eprintln!("{name}: released {after:?} after the close");
    assert!(ok, "{name}: the port was never released: {}", g.inst(name));
    after
}

/// R3.3 on the engine's whole-second clock: `e-rst`'s port is released 1-2 s after its RST
/// (rst_timeout 2 s), plus up to ~0.7 s of tick, stats file and polling. `what` says which
/// path carried the RST.
fn assert_rst_timed(g: &GwLab, t_rst: Instant, what: &str) {
    let after = released_after(g, "e-rst", t_rst, Duration::from_secs(5));
    assert!(
        after >= Duration::from_millis(900) && after <= Duration::from_millis(2700),
        "RST ({what}): released {after:?} after it (rst_timeout 2 s)"
    );
}

/// R3.2 likewise: `e-fin`'s port is released 2-3 s after the second FIN (fin_timeout 3 s).
fn assert_fin_timed(g: &GwLab, t_fin: Instant, what: &str) {
    let after = released_after(g, "e-fin", t_fin, Duration::from_secs(6));
    assert!(
        after >= Duration::from_millis(1900) && after <= Duration::from_millis(3700),
        "FIN ({what}): released {after:?} after the second FIN (fin_timeout 3 s)"
    );
}

#[test]
fn r3_2_r3_3_kernel_carries_syn_ack_fin_rst_and_ports_go_on_the_kernels_time() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start_with("ev", CONFIG, None, |o, _| {
        o.fast_path = "tc".into();
        o.offload = true;
    });
    let s0 = fresh(&g);
    assert_eq!(
        s0["fast_path"]["mode"],
        "tc",
        "fast path not running: {}",
        g.log()
    );

    // FIN both ways (R3.2).
    g.in_instance("e-fin", fin_conn);
    let t_fin = Instant::now();
    // RST (R3.3), after a round trip.
    g.in_instance("e-rst", || rst_conn(true));
    let t_rst = Instant::now();

    let s1 = fresh(&g);
    assert_eq!(used_tcp(&s1, "e-fin"), 1, "held during the FIN delay");
    assert_eq!(used_tcp(&s1, "e-rst"), 1, "held during the RST delay");
    // Only the two SYNs went up: the SYN-ACKs, the data, both FINs, the RST and every ACK
    // were the kernel's.
    let tun = u(&s1["dataplane"]["translated"]) - u(&s0["dataplane"]["translated"]);
    assert_eq!(tun, 2, "the TUN saw the two SYNs only: {}", s1["fast_path"]);
    assert_eq!(
        fp_packets(&s1, "control") - fp_packets(&s0, "control"),
        2,
        "only the SYNs were passed up as control: {}",
        s1["fast_path"]
    );
    assert_eq!(
        fp_packets(&s1, "events") - fp_packets(&s0, "events"),
        3,
        "two FINs and a RST reported: {}",
        s1["fast_path"]
    );
    assert_eq!(fp_packets(&s1, "event_full"), 0);
    let kernel = |s: &Value| fp_packets(s, "translated_out") + fp_packets(s, "translated_in");
    assert!(
        kernel(&s1) - kernel(&s0) >= 10,
        "the kernel carried the rest: {}",
        s1["fast_path"]
    );
    assert_eq!(
        u(&s1["engine"]["tcp_events_applied"]),
        3,
        "{}",
        s1["engine"]
    );

    // Released on the kernel's time: the engine's whole-second clock puts the release 1-2 s
    // (RST) or 2-3 s (FIN) after the packet, plus up to ~0.5 s of tick, stats file and polling.
    assert_rst_timed(&g, t_rst, "kernel");
    assert_fin_timed(&g, t_fin, "kernel");
    let s2 = g.snapshot();
    let ended = &s2["engine"]["flows_ended"];
    assert!(u(&ended["fin"]) >= 1 && u(&ended["rst"]) >= 1, "{ended}");
    assert_eq!(u(&s2["engine"]["tcp_events_unknown"]), 0);
    g.finish();
}

#[test]
fn r3_2_r3_3_a_full_event_ring_passes_fin_and_rst_up_and_timers_stay_exact() {
    if !root_or_skip() {
        return;
    }
    // One page of ring (102 records of 40 bytes), not read for the first 10 s. No port
    // stashes: this test counts the ring's FIN/RST records (a kernel-opened SYN writes one
    // too; the stash test below covers those).
    let g = GwLab::start_with("ef", CONFIG, None, |o, _| {
        o.fast_path = "tc".into();
        o.offload = true;
        o.extra.extend(
            [
                "--fast-path-event-ring-bytes",
                "4096",
                "--fast-path-events-hold-ms",
                "10000",
                "--fast-path-stash",
                "off",
            ]
            .map(String::from),
        );
    });
    let t_start = Instant::now();
    let s0 = fresh(&g);
    assert_eq!(
        s0["fast_path"]["mode"],
        "tc",
        "fast path not running: {}",
        g.log()
    );

    // 130 connections reset by their client fill the ring.
    let fill = 130u64;
    g.in_instance("e-fill", move || {
        for _ in 0..fill {
            rst_conn(false);
        }
    });
    let s1 = fresh(&g);
    let held = fp_packets(&s1, "events") - fp_packets(&s0, "events");
    let full0 = fp_packets(&s1, "event_full");
    eprintln!("ring full: {held} records held, {full0} RSTs passed up");
    assert!(
        held > 50 && full0 > 0 && held + full0 == fill,
        "the ring filled: {held} held, {full0} passed up: {}",
        s1["fast_path"]
    );
    assert!(
        t_start.elapsed() < Duration::from_secs(8),
        "filling took too long for the 10 s hold; the test cannot show a full ring"
    );
    // The RSTs that went up were the engine's own; the held ones are not applied yet.
    assert_eq!(u(&s1["engine"]["tcp_events_applied"]), 0);

    // With the ring full, FIN both ways and a RST go up and are timed by the engine.
    g.in_instance("e-fin", fin_conn);
    let t_fin = Instant::now();
    g.in_instance("e-rst", || rst_conn(true));
    let t_rst = Instant::now();
    let s2 = fresh(&g);
    assert_eq!(
        fp_packets(&s2, "event_full") - full0,
        3,
        "two FINs and a RST passed up: {}",
        s2["fast_path"]
    );
    assert_eq!(fp_packets(&s2, "events"), fp_packets(&s1, "events"));
    assert_rst_timed(&g, t_rst, "passed up");
    assert_fin_timed(&g, t_fin, "passed up");

    // The filler flows whose RSTs went up are gone 2 s after theirs; those whose records
    // wait in the ring hold their ports (their idle timer runs from the RST: 30 s) until the
    // records are read, then go at once, as of RST + 2 s.
    let s3 = g.snapshot();
    assert_eq!(used_tcp(&s3, "e-fill"), held, "{}", inst_of(&s3, "e-fill"));
    let gone = g.wait(Duration::from_secs(12), |s| used_tcp(s, "e-fill") == 0);
    let s4 = g.snapshot();
    assert!(gone, "held records were applied: {}", s4["engine"]);
    assert!(
        t_start.elapsed() >= Duration::from_secs(8),
        "not before the hold ended"
    );
    assert_eq!(
        u(&s4["engine"]["tcp_events_applied"]),
        held,
        "{}",
        s4["engine"]
    );
    assert_eq!(u(&s4["engine"]["tcp_events_unknown"]), 0);
    assert!(u(&s4["engine"]["flows_ended"]["rst"]) > fill);

    // Read again, the ring has room: the next RST is the kernel's, timed by its record.
    g.in_instance("e-rst", || rst_conn(true));
    let t_rst = Instant::now();
    let s5 = fresh(&g);
    assert_eq!(fp_packets(&s5, "events") - fp_packets(&s4, "events"), 1);
    assert_eq!(fp_packets(&s5, "event_full"), fp_packets(&s4, "event_full"));
    assert_rst_timed(&g, t_rst, "kernel");
    g.finish();
}

/// Issue #17, port stashes: after a few SYNs to one destination went up, the runtime gives the
/// kernel a ring of ports the engine chose for it, and the kernel opens the next connections
/// itself: none of their packets crosses the TUN (SYN included), the engine has every flow
/// (made at the kernel's second from its EVENTS record), the instance's used ports are its
/// flows' (R2.3: a stashed port is held by no flow), and the ports of kernel-opened flows are
/// released `rst_timeout` after their RSTs, timed by the kernel (R3.3).
#[test]
fn r3_3_kernel_opens_connections_from_a_port_stash_and_ports_go_on_the_kernels_time() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start_with("es", CONFIG, None, |o, _| {
        o.fast_path = "tc".into();
        o.offload = true;
    });
    let s0 = fresh(&g);
    assert_eq!(
        s0["fast_path"]["mode"],
        "tc",
        "fast path not running: {}",
        g.log()
    );
    assert!(s0["stash"].is_object(), "stashes kept: {s0}");
    // Four SYNs to the echo server go up and make it a hot destination (HOT_SYNS).
    g.in_instance("e-many", || {
        for _ in 0..4 {
            rst_conn(false);
        }
    });
    let bound = g.wait(Duration::from_secs(5), |s| u(&s["stash"]["bound"]) >= 1);
    let s1 = g.snapshot();
    assert!(bound, "no ring was bound: {}", s1["stash"]);
    // Forty more: every one opened by the kernel.
    let n = 40u64;
    g.in_instance("e-many", move || {
        for _ in 0..n {
            rst_conn(false);
        }
    });
    let t_rst = Instant::now();
    let s2 = fresh(&g);
    eprintln!("stash: {}", s2["stash"]);
    assert_eq!(
        fp_packets(&s2, "stash_opened") - fp_packets(&s1, "stash_opened"),
        n,
        "the kernel opened them: {}",
        s2["fast_path"]
    );
    assert_eq!(
        u(&s2["dataplane"]["translated"]),
        u(&s1["dataplane"]["translated"]),
        "no packet of theirs crossed the TUN: {}",
        s2["dataplane"]
    );
    assert_eq!(
        fp_packets(&s2, "control"),
        fp_packets(&s1, "control"),
        "no SYN went up"
    );
    assert_eq!(u(&s2["stash"]["opened"]), n, "{}", s2["stash"]);
    assert_eq!(u(&s2["stash"]["refused"]), 0, "{}", s2["stash"]);
    let inst = inst_of(&s2, "e-many");
    assert_eq!(
        u(&inst["connections_ok"]["tcp"]),
        n + 4,
        "every connection is the engine's: {inst}"
    );
    assert!(
        u(&s2["stash"]["ports_stashed"]) > 0,
        "the ring still holds ports: {}",
        s2["stash"]
    );
    assert_eq!(
        u(&inst["used"]["tcp"]),
        u(&inst["flows"]["tcp"]),
        "R2.3: used ports are the flows' ports, stashed ones not counted: {inst}"
    );
    // R3.3 on the kernel's time: the last RSTs' ports go 1-2 s after them (whole seconds).
    let after = released_after(&g, "e-many", t_rst, Duration::from_secs(5));
    assert!(
        after <= Duration::from_millis(2700),
        "RST (kernel-opened flows): released {after:?} after the last (rst_timeout 2 s)"
    );
    let s3 = g.snapshot();
    assert_eq!(
        u(&s3["engine"]["tcp_events_unknown"]),
        0,
        "{}",
        s3["engine"]
    );
    assert!(u(&s3["engine"]["flows_ended"]["rst"]) >= n + 4);
    g.finish();
}
