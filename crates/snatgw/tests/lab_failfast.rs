//! Fail fast (SPEC R9.5) with real sockets: an availability set of 801 instances (only one
//! gets a namespace) gives 32 ports per instance (R2.8); the instance holds 32 connections
//! (and 32 UDP flows) to one destination, so its next new flow there is refused (R2.6).
//! With `gateway.on_exhaustion = "reset"` the application learns it at once: `connect()`
//! fails with ECONNREFUSED (the gateway's RST) and a connected UDP socket gets EHOSTUNREACH
//! (its ICMP destination unreachable, code 13), each in well under 50 ms. Switched live to
//! `drop` (the default), the same `connect()` gets no answer and times out. Root only.

mod common;

use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use snatgw_core::config::OnExhaustion;

const POOL_IP: &str = "192.0.2.20";
/// The lab's hold server (it greets every connection and keeps it open).
const HOLD_PORT: u16 = 9000;
/// A UDP port of the server; the flows only need to exist, not to be answered.
const UDP_PORT: u16 = 9999;
/// How fast a refused attempt must fail with `reset`.
const FAST: Duration = Duration::from_millis(50);
/// The connect timeout of the `drop` attempt: it must run out.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn config(on_exhaustion: &str) -> String {
    let mut c = format!(
        "[gateway]\nseed = 1\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"{POOL_IP}\"]\n\
         idle_timeout_secs = 60\nfin_timeout_secs = 2\nrst_timeout_secs = 2\nport_reuse_history_secs = 2\n\
         on_exhaustion = \"{on_exhaustion}\"\n\n\
         [[availability_set]]\nname = \"big\"\n"
    );
    for i in 0..801u32 {
        let _ = write!(
            c,
            "\n[[instance]]\nname = \"b{i}\"\nprivate_ip = \"10.0.{}.{}\"\navailability_set = \"big\"\n",
            10 + i / 200,
            10 + i % 200
        );
    }
    c
}

/// A TCP `connect()` from inside `instance`: its error kind (or `Ok`) and how long it took.
fn timed_connect(g: &GwLab, instance: &str, dst: SocketAddr) -> (Result<(), ErrorKind>, Duration) {
    g.in_instance(instance, move || {
        let t = Instant::now();
        let r = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT);
        (r.map(drop).map_err(|e| e.kind()), t.elapsed())
    })
}

#[test]
fn r9_5_connect_fails_fast_with_reset_and_times_out_with_drop() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start("ff", &config("reset"), Some(&["b0"]));
    let b0 = g.inst("b0");
    assert_eq!(u(&b0["allocated"]), 32, "R2.8: 801 instances -> 32 ports");
    let tcp_dst = SocketAddr::from((SERVER_A, HOLD_PORT));
    let udp_dst = SocketAddr::from((SERVER_A, UDP_PORT));

    // Exhaust b0's ports for the destination: 32 held connections (R2.6) ...
    let (held, failed) = g.hold_conns("b0", tcp_dst, 32, Duration::from_secs(5));
    assert_eq!(
        (held.len(), failed),
        (32, 0),
        "exactly the preallocation connects"
    );
    // ... and 32 UDP flows (separate port space, R2.5).
    let udp_held: Vec<UdpSocket> = g.in_instance("b0", move || {
        (0..32)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                s.send_to(b"hold", udp_dst).expect("send");
                s
            })
            .collect()
    });
    assert!(
        g.wait(Duration::from_secs(3), |s| {
            let i = inst_of(s, "b0");
            u(&i["used"]["tcp"]) == 32 && u(&i["used"]["udp"]) == 32
        }),
        "b0 holds all its ports: {}",
        g.inst("b0")
    );

    // reset: a new connection fails at once with "connection refused" (the gateway's RST),
    // however often the application retries (far below the rate limit of 100/s).
    for attempt in 0..5 {
        let (r, took) = timed_connect(&g, "b0", tcp_dst);
        assert_eq!(r, Err(ErrorKind::ConnectionRefused), "attempt {attempt}");
        eprintln!("reset attempt {attempt}: {r:?} after {took:?}");
        assert!(took < FAST, "attempt {attempt}: refused after {took:?}");
    }
    // A connected UDP socket learns it from the ICMP answer (code 13: EHOSTUNREACH).
    let (r, took) = g.in_instance("b0", move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.connect(udp_dst).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let t = Instant::now();
        s.send(b"query").expect("send");
        let r = s
            .recv(&mut [0u8; 64])
            .map(drop)
            .map_err(|e| e.raw_os_error());
        (r, t.elapsed())
    });
    assert_eq!(
        r,
        Err(Some(nix::libc::EHOSTUNREACH)),
        "ICMP administratively prohibited"
    );
    eprintln!("udp: {r:?} after {took:?}");
    assert!(took < FAST, "UDP refused after {took:?}");

    // Counted as the refusals they are (R2.6, R6.1), with the exhaustion event.
    assert!(
        g.wait(Duration::from_secs(3), |s| {
            let i = inst_of(s, "b0");
            u(&i["connections_failed"]["tcp"]) >= 5
                && u(&i["connections_failed"]["udp"]) >= 1
                && u(&i["drops"]["ports_exhausted"]) >= 6
        }),
        "{}",
        g.inst("b0")
    );
    assert!(g.wait(Duration::from_secs(3), |s| {
        s["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "exhaustion" && e["instance"] == "b0" && e["protocol"] == "tcp")
    }));

    // drop (the default), switched live through the API: the same attempt gets no answer
    // and runs into the connect timeout.
    let mut gw = g.api(|c| c.gateway()).expect("GET /gateway").value;
    assert_eq!(gw.on_exhaustion, OnExhaustion::Reset);
    gw.on_exhaustion = OnExhaustion::Drop;
    g.api(move |c| c.put_gateway(&gw, None))
        .expect("PUT /gateway");
    let (r, took) = timed_connect(&g, "b0", tcp_dst);
    eprintln!("drop: {r:?} after {took:?}");
    assert_eq!(r, Err(ErrorKind::TimedOut), "dropped, not answered");
    assert!(
        took >= CONNECT_TIMEOUT - Duration::from_millis(100),
        "gave up after {took:?}"
    );
    assert!(
        g.wait(Duration::from_secs(3), |s| u(
            &inst_of(s, "b0")["connections_failed"]["tcp"]
        ) >= 6),
        "{}",
        g.inst("b0")
    );

    drop(held);
    drop(udp_held);
    g.finish();
}
