//! Takeover holds (SPEC R10.4 with R3.2 and R3.8; issue #19): after a fleet node takes an
//! instance over, an unsolicited inbound packet to the instance's block is the evidence of a
//! flow whose state did not arrive; its public port is not given to a new flow toward the
//! packet's sender before the FIN timeout (240 s, R3.2), counted from the packet's second.
//! Expected values come from the SPEC: a port released "240 s later" at second t is usable at
//! t + 240 and not at t + 239 (the convention of `r3_2_fin_both_ways_releases_the_port_240_s_later`
//! in tests/rules.rs).

mod common;

use std::collections::HashMap;

use common::*;
use proptest::prelude::*;
use snatgw_core::{
    proto, DropReason, Engine, Packet, Topology, Verdict, L4, TAKEOVER_HOLDS_PER_PORT,
};

/// R3.2's FIN timeout, the default (`gateway.fin_timeout_secs`).
const FIN: u32 = 240;

/// The public address and the lowest port of an instance's block (R2.4).
fn block_start(e: &Engine, name: &str) -> (u32, u16) {
    let r = e.instance(name).expect("instance");
    let lo = r.block.iter().map(|&(lo, _)| lo).min().expect("block");
    (r.scenario.addr(), lo)
}

fn in_block(e: &Engine, name: &str, port: u16) -> bool {
    e.instance(name)
        .expect("instance")
        .block
        .iter()
        .any(|&(lo, hi)| (lo..=hi).contains(&port))
}

fn unsolicited(e: &mut Engine, now: u32, p: Packet) {
    assert_eq!(
        inb(e, now, p),
        Verdict::Drop(DropReason::UnsolicitedInbound),
        "R3.8: matches no flow and no rule"
    );
}

fn unsolicited_count(e: &Engine) -> u64 {
    e.global_stats().drops[DropReason::UnsolicitedInbound as usize]
}

const R: &str = "198.51.100.7";
const R2: &str = "198.51.100.8";

/// Opens TCP flows from `src` to `dst`:443 at `now` until every port of the 1024-port block
/// but `skip` is busy for that destination; none may get `skip`.
fn fill_all_but(e: &mut Engine, now: u32, src: u32, dst: u32, skip: u16, sport0: u16) {
    let busy = e
        .flows(Some("vm-0"))
        .iter()
        .filter(|f| f.l4 == L4::Tcp && f.remote == (dst, 443))
        .count() as u16;
    for k in 0..(1023 - busy) {
        let (_, port) = syn(e, now, src, sport0 + k, dst, 443);
        assert_ne!(port, skip, "held port given toward its remote");
    }
}

#[test]
fn r10_4_unsolicited_inbound_in_window_holds_port_for_its_remote_until_fin_timeout() {
    let mut e = pool_long_idle(1);
    let (vm, r, r2) = (private_u32(0), ip(R), ip(R2));
    let (public, p) = block_start(&e, "vm-0");
    assert!(e.hold_after_takeover(vm, 0, 240));
    assert_eq!(e.takeover_hold_stats().windows_open, 1);

    // The remote side of a flow whose state did not arrive: dropped and counted as before.
    unsolicited(&mut e, 10, Packet::tcp(r, 443, public, p, ACK));
    assert_eq!(unsolicited_count(&e), 1);
    let st = e.takeover_hold_stats();
    assert_eq!((st.holds_active, st.holds_total), (1, 1));
    assert_eq!(
        e.takeover_hold_until(proto::TCP, public, p, r, 443),
        Some(10 + FIN)
    );

    // Another destination may get P: it is the port the allocator takes first (R2.3:
    // never used, lowest).
    assert_eq!(syn(&mut e, 11, vm, 40000, r2, 443), (public, p));
    // Toward R:443, P would be shared (R2.3: a used port free for it) but is held: another.
    let (_, q) = syn(&mut e, 11, vm, 40001, r, 443);
    assert_ne!(q, p);
    assert!(in_block(&e, "vm-0", q));

    // Every other port busy for R:443: the new flow is refused as exhausted (R2.6) rather
    // than given P, up to the last second of the hold ...
    fill_all_but(&mut e, 12, vm, r, p, 41000);
    assert_eq!(
        out(&mut e, 10 + FIN - 1, Packet::tcp(vm, 50000, r, 443, SYN)),
        Verdict::Drop(DropReason::PortsExhausted)
    );
    assert_eq!(e.instance("vm-0").expect("vm").stats[0].conn_fail, 1);
    // ... and P is usable at 10 + 240 exactly.
    assert_eq!(
        out(&mut e, 10 + FIN, Packet::tcp(vm, 50001, r, 443, SYN)),
        Verdict::Translate {
            addr: public,
            port: p
        }
    );
    let st = e.takeover_hold_stats();
    assert_eq!((st.holds_active, st.holds_total), (0, 1));
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_a_later_unsolicited_packet_extends_the_hold() {
    let mut e = pool_long_idle(1);
    let (vm, r) = (private_u32(0), ip(R));
    let (public, p) = block_start(&e, "vm-0");
    assert!(e.hold_after_takeover(vm, 0, 240));
    unsolicited(&mut e, 10, Packet::tcp(r, 443, public, p, ACK));
    unsolicited(&mut e, 100, Packet::tcp(r, 443, public, p, ACK));
    // An earlier packet after a later one does not shorten it (the later of the two ends).
    unsolicited(&mut e, 100, Packet::tcp(r, 443, public, p, FIN_ACK));
    assert_eq!(unsolicited_count(&e), 3);
    let st = e.takeover_hold_stats();
    assert_eq!(
        (st.holds_active, st.holds_total),
        (1, 1),
        "one hold, extended"
    );
    fill_all_but(&mut e, 101, vm, r, p, 41000);
    assert_eq!(
        out(&mut e, 100 + FIN - 1, Packet::tcp(vm, 50000, r, 443, SYN)),
        Verdict::Drop(DropReason::PortsExhausted)
    );
    assert_eq!(
        translated(out(&mut e, 100 + FIN, Packet::tcp(vm, 50001, r, 443, SYN))),
        (public, p)
    );
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_hold_is_per_remote_endpoint_and_protocol() {
    let mut e = pool_long_idle(1);
    let (vm, r) = (private_u32(0), ip(R));
    let (public, p) = block_start(&e, "vm-0");
    assert!(e.hold_after_takeover(vm, 0, 240));
    // A UDP datagram from R:443 holds P for UDP toward R:443 only (R2.5: separate spaces).
    unsolicited(&mut e, 10, Packet::udp(r, 443, public, p));
    // Another remote port of the same host is another endpoint.
    assert_eq!(syn(&mut e, 11, vm, 40000, r, 80), (public, p));
    assert_eq!(syn(&mut e, 11, vm, 40001, r, 443), (public, p));
    let q = translated(out(&mut e, 11, Packet::udp(vm, 40002, r, 443)));
    assert_ne!(q, (public, p));
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_no_hold_for_an_instance_outside_its_window() {
    // Without any window: the port the allocator prefers is given toward the sender.
    let mut e = pool_long_idle(2);
    let (vm0, vm1, r) = (private_u32(0), private_u32(1), ip(R));
    let (public, p0) = block_start(&e, "vm-0");
    unsolicited(&mut e, 10, Packet::tcp(r, 443, public, p0, ACK));
    assert_eq!(syn(&mut e, 11, vm0, 40000, r, 443), (public, p0));

    // A window for vm-0 only: a packet to vm-1's block holds nothing.
    let mut e = pool_long_idle(2);
    let (_, p1) = block_start(&e, "vm-1");
    assert!(e.hold_after_takeover(vm0, 0, 240));
    unsolicited(&mut e, 10, Packet::tcp(r, 443, public, p1, ACK));
    assert_eq!(unsolicited_count(&e), 1);
    assert_eq!(e.takeover_hold_stats().holds_total, 0);
    assert_eq!(e.takeover_hold_until(proto::TCP, public, p1, r, 443), None);
    assert_eq!(syn(&mut e, 11, vm1, 40000, r, 443), (public, p1));
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_window_ends_at_its_time_and_can_be_replaced() {
    let mut e = pool_long_idle(1);
    let (vm, r) = (private_u32(0), ip(R));
    let (public, p) = block_start(&e, "vm-0");
    assert!(e.hold_after_takeover(vm, 0, 100));
    // Open through second 99: a hold.
    unsolicited(&mut e, 99, Packet::tcp(r, 443, public, p + 5, ACK));
    assert_eq!(e.takeover_hold_stats().holds_total, 1);
    // Closed at 100: no hold, the allocator gives P toward R.
    unsolicited(&mut e, 100, Packet::tcp(r, 443, public, p, ACK));
    assert_eq!(e.takeover_hold_stats().holds_total, 1);
    assert_eq!(e.takeover_hold_stats().windows_open, 0);
    assert_eq!(syn(&mut e, 101, vm, 40000, r, 443), (public, p));

    // Called again, the window is replaced: open until 150 + 240.
    assert!(e.hold_after_takeover(vm, 150, 240));
    assert!(
        e.hold_after_takeover(vm, 150, 240),
        "a second call replaces it"
    );
    unsolicited(&mut e, 389, Packet::tcp(r, 443, public, p + 1, ACK));
    assert_eq!(e.takeover_hold_stats().holds_total, 2);
    unsolicited(&mut e, 390, Packet::tcp(r, 443, public, p + 2, ACK));
    assert_eq!(e.takeover_hold_stats().holds_total, 2);

    // 0 s closes it at once.
    assert!(e.hold_after_takeover(vm, 400, 600));
    assert_eq!(e.takeover_hold_stats().windows_open, 1);
    assert!(e.hold_after_takeover(vm, 400, 0));
    assert_eq!(e.takeover_hold_stats().windows_open, 0);
    unsolicited(&mut e, 401, Packet::tcp(r, 443, public, p + 3, ACK));
    assert_eq!(e.takeover_hold_stats().holds_total, 2);
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_hold_after_takeover_of_unknown_or_ilpip_instance_is_a_no_op() {
    let mut e = reference();
    assert!(
        !e.hold_after_takeover(ip("10.0.9.9"), 0, 240),
        "unknown address"
    );
    assert!(
        !e.hold_after_takeover(ip("10.0.1.10"), 0, 240),
        "ILPIP: no block (R1.1)"
    );
    assert_eq!(e.takeover_hold_stats().windows_open, 0);
    assert!(
        e.hold_after_takeover(ip("10.0.3.10"), 0, 240),
        "default SNAT"
    );
    assert!(
        e.hold_after_takeover(ip("10.0.2.10"), 0, 240),
        "load-balanced"
    );
    assert_eq!(e.takeover_hold_stats().windows_open, 2);
    // Traffic to the ILPIP is its own (R1.1), never a hold.
    inb(
        &mut e,
        5,
        Packet::tcp(ip(R), 443, ip("203.0.113.10"), 5000, ACK),
    );
    assert_eq!(e.takeover_hold_stats().holds_total, 0);
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_outbound_non_syn_without_flow_in_window_counts_as_lost_flow() {
    let mut e = pool_long_idle(2);
    let (vm0, vm1, r) = (private_u32(0), private_u32(1), ip(R));
    assert!(e.hold_after_takeover(vm0, 0, 240));
    // R3.1: dropped as before; from vm-0 (in its window) also counted as a lost flow's packet.
    for (vm, t) in [(vm0, 10), (vm0, 239), (vm1, 10), (vm0, 240)] {
        assert_eq!(
            out(&mut e, t, Packet::tcp(vm, 40000, r, 443, ACK)),
            Verdict::Drop(DropReason::TcpNotSyn)
        );
    }
    let st = e.takeover_hold_stats();
    assert_eq!(st.lost_flow_packets, 2);
    assert_eq!(
        st.holds_total, 0,
        "its public port is unknown: nothing is held"
    );
    assert_eq!(
        e.global_stats().drops[DropReason::TcpNotSyn as usize],
        4,
        "counted exactly as before"
    );
}

#[test]
fn r10_4_holds_are_capped_per_instance_and_expire() {
    let mut e = pool_long_idle(2);
    let (vm0, vm1, r) = (private_u32(0), private_u32(1), ip(R));
    let (public, p0) = block_start(&e, "vm-0");
    let (_, p1) = block_start(&e, "vm-1");
    assert!(e.hold_after_takeover(vm0, 0, 240));
    assert!(e.hold_after_takeover(vm1, 0, 240));
    let cap = TAKEOVER_HOLDS_PER_PORT as u64 * 1024;
    // A flood of spoofed packets to vm-0's block from ever new remote endpoints.
    let mut n = 0u64;
    'flood: for rport in 1..=u16::MAX {
        for off in 0..2u16 {
            if n == cap + 100 {
                break 'flood;
            }
            unsolicited(&mut e, 10, Packet::tcp(r, rport, public, p0 + off, ACK));
            n += 1;
        }
    }
    let st = e.takeover_hold_stats();
    assert_eq!(
        unsolicited_count(&e),
        cap + 100,
        "every packet still counted (R3.8)"
    );
    assert_eq!(st.holds_total, cap);
    assert_eq!(st.holds_active, cap);
    assert_eq!(st.holds_refused_at_cap, 100);
    // At the cap an existing hold is still extended (it takes no memory) ...
    unsolicited(&mut e, 20, Packet::tcp(r, 1, public, p0, ACK));
    assert_eq!(
        e.takeover_hold_until(proto::TCP, public, p0, r, 1),
        Some(20 + FIN)
    );
    // ... and another instance's holds are not affected by vm-0's cap.
    unsolicited(&mut e, 20, Packet::tcp(r, 1, public, p1, ACK));
    assert_eq!(e.takeover_hold_stats().holds_total, cap + 1);
    e.check_invariants().expect("invariants");

    // At 10 + 240 all but the two extended holds end; their memory is returned.
    e.advance(10 + FIN);
    let st = e.takeover_hold_stats();
    assert_eq!(st.holds_active, 2);
    assert_eq!(st.windows_open, 0, "the windows ended at 240");
    e.check_invariants().expect("invariants");
    assert_eq!(e.next_deadline(), Some(20 + FIN));
    e.advance(20 + FIN);
    assert_eq!(e.takeover_hold_stats().holds_active, 0);
    assert_eq!(e.next_deadline(), None, "nothing left queued");
    // With the cap freed, a new window holds again.
    assert!(e.hold_after_takeover(vm0, 300, 240));
    unsolicited(&mut e, 300, Packet::tcp(r, 443, public, p0, ACK));
    assert_eq!(e.takeover_hold_stats().holds_active, 1);
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_removed_instance_loses_its_window_and_its_holds_stay() {
    let mut e = pool_long_idle(2);
    let (vm0, r) = (private_u32(0), ip(R));
    let (public, p0) = block_start(&e, "vm-0");
    assert!(e.hold_after_takeover(vm0, 0, 240));
    unsolicited(&mut e, 10, Packet::tcp(r, 443, public, p0, ACK));
    let mut c = pool_config_long_idle(2);
    c.instance.remove(0);
    e.apply(20, Topology::from_config(c).expect("valid"))
        .expect("apply");
    assert!(!e.hold_after_takeover(vm0, 20, 240), "gone");
    let st = e.takeover_hold_stats();
    assert_eq!((st.windows_open, st.holds_active), (0, 1));
    // The hold concerns the public 5-tuple, whoever owns the port next.
    assert_eq!(
        e.takeover_hold_until(proto::TCP, public, p0, r, 443),
        Some(10 + FIN)
    );
    e.check_invariants().expect("invariants");
}

// ---- property test ----

#[derive(Debug, Clone)]
enum Op {
    Advance(u32),
    /// An inbound packet from remote `remote` to port `off` of vm-0's block.
    Inbound {
        off: u16,
        remote: usize,
        udp: bool,
    },
    /// A new outbound flow from vm-0 toward remote `remote`.
    New {
        remote: usize,
        udp: bool,
    },
    /// Closes a live TCP flow: FIN both ways or a RST.
    Close {
        pick: usize,
        rst: bool,
    },
}

/// Remote endpoints: a few hosts and ports.
const REMOTES: [(&str, u16); 4] = [
    ("198.51.100.1", 443),
    ("198.51.100.1", 80),
    ("198.51.100.2", 443),
    ("203.0.113.9", 53),
];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..60u32).prop_map(Op::Advance),
        6 => (0..34u16, 0..REMOTES.len(), prop::bool::weighted(0.2))
            .prop_map(|(off, remote, udp)| Op::Inbound { off, remote, udp }),
        8 => (0..REMOTES.len(), prop::bool::weighted(0.2))
            .prop_map(|(remote, udp)| Op::New { remote, udp }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, rst)| Op::Close { pick, rst }),
    ]
}

/// (protocol, public port, remote address, remote port).
type HoldKey = (u8, u16, u32, u16);

/// Delivers inbound packet `p` and updates the model: a packet dropped as unsolicited (R3.8)
/// while the window is open, to a port of vm-0's block (`lo`..`lo + 32`), holds (or extends)
/// its port toward its sender until its second + the FIN timeout (R3.2); any other packet
/// makes no hold.
fn inbound(
    e: &mut Engine,
    now: u32,
    p: Packet,
    window: u32,
    lo: u16,
    holds: &mut HashMap<HoldKey, u32>,
) -> Result<(), TestCaseError> {
    let before = e.takeover_hold_stats().holds_total;
    let v = inb(e, now, p);
    if v == Verdict::Drop(DropReason::UnsolicitedInbound)
        && now < window
        && (lo..lo + 32).contains(&p.dst_port)
    {
        let end = holds
            .entry((p.proto, p.dst_port, p.src, p.src_port))
            .or_insert(0);
        *end = (*end).max(now + FIN);
    } else {
        prop_assert_eq!(e.takeover_hold_stats().holds_total, before);
    }
    Ok(())
}

fn run(window: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
    // 801 instances: R2.8 gives each 32 ports, so exhaustion is reached quickly.
    let mut c = pool_config(801);
    c.gateway.idle_timeout_secs = 300;
    let mut e = Engine::new(Topology::from_config(c).expect("valid"), 0).expect("engine");
    let vm = private_u32(0);
    let (public, lo) = block_start(&e, "vm-0");
    let block = e.instance("vm-0").expect("vm").block;
    prop_assert_eq!(block.len(), 1);
    prop_assert!(e.hold_after_takeover(vm, 0, window));
    let remotes: Vec<(u32, u16)> = REMOTES.iter().map(|&(a, p)| (ip(a), p)).collect();
    // The model: holds and their ends, from the SPEC (packet second + FIN timeout, the later
    // of two ends), made only while the window is open and only by a packet dropped as
    // unsolicited (R3.8).
    let mut holds: HashMap<HoldKey, u32> = HashMap::new();
    let mut now = 0u32;
    let mut sport = 20000u16;
    let mut tcp_flows: Vec<(u16, u32, u16, u16)> = Vec::new(); // (sport, remote, rport, pport)
    for op in ops {
        match op {
            Op::Advance(d) => {
                now += d;
                e.advance(now);
            }
            Op::Inbound { off, remote, udp } => {
                let (ra, rp) = remotes[remote];
                let port = lo + off; // 32 and 33 are outside the block
                let p = if udp {
                    Packet::udp(ra, rp, public, port)
                } else {
                    Packet::tcp(ra, rp, public, port, ACK)
                };
                inbound(&mut e, now, p, window, lo, &mut holds)?;
            }
            Op::New { remote, udp } => {
                let (ra, rp) = remotes[remote];
                sport = sport.wrapping_add(1).max(20000);
                let (p, pr) = if udp {
                    (Packet::udp(vm, sport, ra, rp), proto::UDP)
                } else {
                    (Packet::tcp(vm, sport, ra, rp, SYN), proto::TCP)
                };
                let l4 = if udp { L4::Udp } else { L4::Tcp };
                let v = out(&mut e, now, p);
                match v {
                    Verdict::Translate { addr, port } => {
                        prop_assert_eq!(addr, public);
                        prop_assert!(
                            (lo..lo + 32).contains(&port),
                            "port {} outside the block",
                            port
                        );
                        let h = holds.get(&(pr, port, ra, rp)).copied();
                        prop_assert!(
                            h.is_none_or(|end| end <= now),
                            "new flow at {} on {}:{} toward {:?}, held until {:?}",
                            now,
                            public,
                            port,
                            (ra, rp),
                            h
                        );
                        if !udp {
                            tcp_flows.push((sport, ra, rp, port));
                        }
                    }
                    Verdict::Drop(DropReason::PortsExhausted) => {
                        // R2.6 with holds: every port is busy for the endpoint or held toward it.
                        let busy: Vec<u16> = e
                            .flows(Some("vm-0"))
                            .iter()
                            .filter(|f| f.l4 == l4 && f.remote == (ra, rp))
                            .map(|f| f.public.1)
                            .collect();
                        for port in lo..lo + 32 {
                            let held = holds.get(&(pr, port, ra, rp)).is_some_and(|&end| end > now);
                            prop_assert!(
                                held || busy.contains(&port),
                                "exhausted at {} with port {} free toward {:?}",
                                now,
                                port,
                                (ra, rp)
                            );
                        }
                    }
                    v => prop_assert!(false, "unexpected {:?}", v),
                }
            }
            Op::Close { pick, rst } => {
                if tcp_flows.is_empty() {
                    continue;
                }
                let (sp, ra, rp, pp) = tcp_flows.swap_remove(pick % tcp_flows.len());
                if rst {
                    out(&mut e, now, Packet::tcp(vm, sp, ra, rp, RST));
                } else {
                    out(&mut e, now, Packet::tcp(vm, sp, ra, rp, FIN_ACK));
                    // If the flow ended meanwhile, this FIN is unsolicited: maybe a hold.
                    let p = Packet::tcp(ra, rp, public, pp, FIN_ACK);
                    inbound(&mut e, now, p, window, lo, &mut holds)?;
                }
            }
        }
        // The engine's holds are the model's, to the second.
        holds.retain(|_, &mut end| end > now);
        for (&(pr, port, ra, rp), &end) in &holds {
            prop_assert_eq!(e.takeover_hold_until(pr, public, port, ra, rp), Some(end));
        }
        prop_assert_eq!(e.takeover_hold_stats().holds_active, holds.len() as u64);
        prop_assert_eq!(
            e.takeover_hold_stats().windows_open,
            u32::from(now < window)
        );
        e.check_invariants()
            .map_err(|err| TestCaseError::fail(err.to_string()))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Random sequences of time steps, unsolicited inbound packets to vm-0's block from a few
    /// remotes, new flows toward them and closes: no new flow is ever given a (public, port,
    /// remote) with an active hold, every allocation stays inside the block (R2.4), and
    /// exhaustion happens only when every port is busy or held for the endpoint (R2.6).
    #[test]
    fn r10_4_no_new_flow_gets_a_held_port(window in 0..400u32, ops in prop::collection::vec(op(), 1..300)) {
        run(window, ops)?;
    }
}
