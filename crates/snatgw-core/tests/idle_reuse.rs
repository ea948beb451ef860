//! The symptom of missing keepalives (SPEC R3.4, R7.1): flows ended by idle timeout on which
//! the instance later sent again, counted per instance and protocol
//! (`InstanceStats::idle_ended_then_sent`), once per flow, within a bounded memory.

mod common;

use common::*;
use snatgw_core::engine::IDLE_RECENT_CAP;
use snatgw_core::{DropReason, Engine, Packet, Verdict};

const IDLE: u32 = 10;

const CONFIG: &str = r#"
[gateway]
seed = 5
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100", "192.0.2.101"]
idle_timeout_secs = 10
fin_timeout_secs = 3
rst_timeout_secs = 2

[[instance]]
name = "a"
private_ip = "10.0.3.10"

[[instance]]
name = "b"
private_ip = "10.0.3.11"
"#;

const A: &str = "10.0.3.10";
const SERVER: &str = "198.51.100.7";

/// `[tcp, udp]` counts of `name`.
fn counted(e: &Engine, name: &str) -> [u64; 2] {
    let r = e.instance(name).expect("instance");
    [
        r.stats[0].idle_ended_then_sent,
        r.stats[1].idle_ended_then_sent,
    ]
}

#[test]
fn r7_1_tcp_flow_ended_idle_then_data_is_counted_once() {
    let mut e = engine(CONFIG);
    let (src, dst) = (ip(A), ip(SERVER));
    let (pa, pp) = syn(&mut e, 1, src, 40000, dst, 5432);
    // The reply and some data: an established connection, then the application goes quiet.
    assert!(matches!(
        inb(&mut e, 1, Packet::tcp(dst, 5432, pa, pp, SYN | ACK)),
        Verdict::Translate { .. }
    ));
    translated(out(&mut e, 2, Packet::tcp(src, 40000, dst, 5432, ACK)));
    // Still there one second before the idle timeout.
    translated(out(
        &mut e,
        2 + IDLE - 1,
        Packet::tcp(src, 40000, dst, 5432, ACK),
    ));
    let last = 2 + IDLE - 1;
    // Past it (R3.4): removed; the next data segment is not a SYN and matches nothing (R3.1).
    e.advance(last + IDLE);
    assert_eq!(e.live_flows(), 0);
    assert_eq!(counted(&e, "a"), [0, 0], "an idle end alone is no symptom");
    for t in 0..4 {
        // The data segment and its retransmissions: counted once.
        assert_eq!(
            out(
                &mut e,
                last + IDLE + 5 + t,
                Packet::tcp(src, 40000, dst, 5432, ACK)
            ),
            Verdict::Drop(DropReason::TcpNotSyn)
        );
    }
    assert_eq!(counted(&e, "a"), [1, 0]);
    assert_eq!(counted(&e, "b"), [0, 0]);
    let r = e.instance("a").expect("a");
    assert_eq!(r.stats[0].drops[DropReason::TcpNotSyn as usize], 4);
    assert_eq!(e.idle_recent_len(), [0, 0], "the entry is used up");
    e.check_invariants().expect("invariants");
}

#[test]
fn r7_1_udp_flow_ended_idle_then_datagram_is_counted() {
    let mut e = engine(CONFIG);
    let (src, dst) = (ip(A), ip(SERVER));
    // An association: datagrams in two different seconds (a VPN, SIP, a game...).
    translated(out(&mut e, 1, Packet::udp(src, 5000, dst, 5060)));
    translated(out(&mut e, 3, Packet::udp(src, 5000, dst, 5060)));
    e.advance(3 + IDLE);
    assert_eq!(e.live_flows(), 0);
    assert_eq!(e.idle_recent_len(), [0, 1]);
    // The application sends again on the same socket: a new flow (R3.5), and the symptom.
    translated(out(&mut e, 40, Packet::udp(src, 5000, dst, 5060)));
    translated(out(&mut e, 41, Packet::udp(src, 5000, dst, 5060)));
    assert_eq!(counted(&e, "a"), [0, 1]);
    // That new flow idles out too and is used again: one more.
    e.advance(41 + IDLE);
    translated(out(&mut e, 60, Packet::udp(src, 5000, dst, 5060)));
    assert_eq!(counted(&e, "a"), [0, 2]);

    // A single request and its answer within one second (a DNS query) is no association:
    // not remembered, so a later query that picks the same source port is not counted.
    translated(out(&mut e, 70, Packet::udp(src, 33000, dst, 53)));
    let (pa, pp) = e.lookup_outbound(17, src, 33000, dst, 53).expect("flow");
    translated(inb(&mut e, 70, Packet::udp(dst, 53, pa, pp)));
    e.advance(70 + IDLE);
    translated(out(&mut e, 90, Packet::udp(src, 33000, dst, 53)));
    assert_eq!(counted(&e, "a"), [0, 2]);
    e.check_invariants().expect("invariants");
}

#[test]
fn r7_1_flows_closed_by_fin_or_rst_then_reused_are_not_counted() {
    let mut e = engine(CONFIG);
    let (src, dst) = (ip(A), ip(SERVER));
    // FIN both ways (R3.2), released 3 s later; a late segment afterwards.
    let (pa, pp) = syn(&mut e, 1, src, 41000, dst, 443);
    translated(out(&mut e, 2, Packet::tcp(src, 41000, dst, 443, FIN_ACK)));
    translated(inb(&mut e, 2, Packet::tcp(dst, 443, pa, pp, FIN_ACK)));
    // RST (R3.3), released 2 s later.
    syn(&mut e, 1, src, 41001, dst, 443);
    translated(out(&mut e, 2, Packet::tcp(src, 41001, dst, 443, RST)));
    e.advance(30);
    assert_eq!(e.live_flows(), 0);
    for sport in [41000, 41001] {
        assert_eq!(
            out(&mut e, 31, Packet::tcp(src, sport, dst, 443, ACK)),
            Verdict::Drop(DropReason::TcpNotSyn)
        );
    }
    assert_eq!(counted(&e, "a"), [0, 0]);
    assert_eq!(e.idle_recent_len(), [0, 0]);

    // A SYN on an idle-ended 5-tuple is a new connection: it forgets the old one, so a stray
    // segment after that connection closed is not counted either.
    syn(&mut e, 40, src, 42000, dst, 443);
    e.advance(40 + IDLE);
    assert_eq!(e.idle_recent_len(), [1, 0]);
    let (pa, pp) = syn(&mut e, 60, src, 42000, dst, 443);
    assert_eq!(e.idle_recent_len(), [0, 0]);
    translated(out(&mut e, 61, Packet::tcp(src, 42000, dst, 443, FIN_ACK)));
    translated(inb(&mut e, 61, Packet::tcp(dst, 443, pa, pp, FIN_ACK)));
    e.advance(70);
    assert_eq!(
        out(&mut e, 71, Packet::tcp(src, 42000, dst, 443, ACK)),
        Verdict::Drop(DropReason::TcpNotSyn)
    );
    assert_eq!(counted(&e, "a"), [0, 0]);
    e.check_invariants().expect("invariants");
}

#[test]
fn r7_1_idle_ended_memory_is_bounded_oldest_forgotten_first() {
    let mut e = engine(CONFIG);
    let src = ip(A);
    let extra = 1000u32;
    let n = IDLE_RECENT_CAP as u32 + extra;
    // One flow per destination address (ports are shared across destinations, R2.3), opened
    // in order over three seconds so they also idle out in order.
    let dst = |i: u32| ip("198.51.0.0") + i;
    for i in 0..n {
        syn(&mut e, 1 + i * 3 / n, src, 50000, dst(i), 443);
    }
    assert_eq!(e.live_flows(), n as usize);
    e.advance(4 + IDLE);
    assert_eq!(e.live_flows(), 0);
    assert_eq!(
        e.idle_recent_len(),
        [IDLE_RECENT_CAP, 0],
        "no growth past the cap"
    );
    e.check_invariants().expect("invariants");
    // The oldest were forgotten: their late segments are not counted; the others are.
    for i in 0..n {
        assert_eq!(
            out(&mut e, 20, Packet::tcp(src, 50000, dst(i), 443, ACK)),
            Verdict::Drop(DropReason::TcpNotSyn)
        );
    }
    assert_eq!(counted(&e, "a")[0], IDLE_RECENT_CAP as u64);
    assert_eq!(e.idle_recent_len(), [0, 0]);
    // Later rounds reuse the memory: still bounded.
    for round in 0..3u32 {
        let t = 100 + round * 50;
        for i in 0..n {
            syn(&mut e, t, src, 51000 + round as u16, dst(i), 443);
        }
        e.advance(t + IDLE + 1);
        assert_eq!(e.idle_recent_len(), [IDLE_RECENT_CAP, 0]);
        e.check_invariants().expect("invariants");
    }
}
