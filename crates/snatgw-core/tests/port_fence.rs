//! Port fences and port holds (SPEC R10.4 with R2.3, R2.6 and R3.2; issue #19): a fleet node's
//! instance opens new flows only on the port reserve its runner-up acknowledged, and a node
//! that takes an instance over holds the ports of its last reserves against every
//! destination for the FIN timeout. Expected values come from the SPEC and the test's own
//! arithmetic: blocks of 1024 ports up to 50 instances and 32 from 801 (R2.8), a port held
//! "until now + secs" is held at now + secs - 1 and usable at now + secs (R3.2's convention,
//! `r3_2_fin_both_ways_releases_the_port_240_s_later` in tests/rules.rs), a RST releases the
//! port 15 s later (R3.3).

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};

use common::*;
use proptest::prelude::*;
use snatgw_core::{DropReason, Engine, EventKind, FlowChange, Packet, Topology, Verdict};

/// R3.2's FIN timeout, the default (`gateway.fin_timeout_secs`).
const FIN: u32 = 240;
/// R3.3: a RST releases the port 15 s later (the default).
const RST_DELAY: u32 = 15;

const A: &str = "198.51.100.7";
const B: &str = "198.51.100.8";

/// The instance's public address and its block's ports, from the instance report (R2.4).
fn block(e: &Engine, name: &str) -> (u32, BTreeSet<u16>) {
    let r = e.instance(name).expect("instance");
    let ports = r.block.iter().flat_map(|&(lo, hi)| lo..=hi).collect();
    (r.scenario.addr(), ports)
}

fn tcp_syn(e: &mut Engine, now: u32, vm: u32, sport: u16, dst: u32, dport: u16) -> Verdict {
    out(e, now, Packet::tcp(vm, sport, dst, dport, SYN))
}

fn drops(e: &Engine, name: &str, r: DropReason) -> u64 {
    e.instance(name)
        .expect("instance")
        .stats
        .iter()
        .map(|s| s.drops[r as usize])
        .sum()
}

fn conn_fail(e: &Engine, name: &str) -> u64 {
    let st = e.instance(name).expect("instance").stats;
    st[0].conn_fail + st[1].conn_fail
}

fn exhaustion_events(e: &mut Engine) -> usize {
    e.drain_events()
        .iter()
        .filter(|ev| matches!(ev.kind, EventKind::Exhaustion { .. }))
        .count()
}

#[test]
fn r10_4_fenced_instance_allocates_only_inside_its_reserve() {
    let mut e = pool_long_idle(2);
    let (vm, a, b) = (private_u32(0), ip(A), ip(B));
    let (public, blk) = block(&e, "vm-0");
    let (_, blk1) = block(&e, "vm-1");
    assert_eq!(blk.len(), 1024, "R2.8: one to 50 instances get 1024 ports");
    let lo = *blk.first().expect("block");
    let reserve = [lo + 100, lo + 200, lo + 300];
    // Ports outside the block are ignored: below the range, another instance's, repeats.
    let other = *blk1.first().expect("vm-1's block");
    let fence: Vec<u16> = [&reserve[..], &[80, other, other + 1, lo + 200]].concat();
    assert!(e.set_port_fence(vm, Some((public, &fence))));
    let st = e.port_fence_stats(vm).expect("PAT instance");
    assert!(st.fenced);
    assert_eq!((st.allocations, st.refusals), (0, 0));

    // Toward A: the three ports of the reserve, each once (R2.3), then refused.
    let mut got = BTreeSet::new();
    for k in 0..3 {
        let (addr, port) = translated(tcp_syn(&mut e, 1, vm, 40000 + k, a, 443));
        assert_eq!(addr, public);
        got.insert(port);
    }
    assert_eq!(got, reserve.iter().copied().collect::<BTreeSet<_>>());
    assert_eq!(
        tcp_syn(&mut e, 1, vm, 40003, a, 443),
        Verdict::Drop(DropReason::PortReserve)
    );
    // Toward B the same three ports are shared (R2.3: ports to other destinations are shared).
    for k in 0..3 {
        let (_, port) = translated(tcp_syn(&mut e, 2, vm, 41000 + k, b, 443));
        assert!(reserve.contains(&port), "port {port} outside the reserve");
    }
    // UDP is fenced too (its own port space, R2.5, the same reserve).
    for k in 0..3 {
        let (_, port) = translated(out(&mut e, 3, Packet::udp(vm, 42000 + k, a, 53)));
        assert!(
            reserve.contains(&port),
            "UDP port {port} outside the reserve"
        );
    }
    assert_eq!(
        out(&mut e, 3, Packet::udp(vm, 42003, a, 53)),
        Verdict::Drop(DropReason::PortReserve)
    );
    // Another instance is not fenced.
    let (_, port) = syn(&mut e, 4, private_u32(1), 40000, a, 443);
    assert!(blk1.contains(&port));
    assert_eq!(
        e.port_fence_stats(private_u32(1)).map(|s| s.fenced),
        Some(false)
    );
    let st = e.port_fence_stats(vm).expect("PAT instance");
    assert_eq!((st.allocations, st.refusals), (9, 2));
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_fence_refusal_is_port_reserve_not_exhaustion() {
    // 801 instances: R2.8 gives each 32 ports.
    let mut e = pool_long_idle(801);
    let (vm, a) = (private_u32(0), ip(A));
    e.set_journal(true);
    let (public, blk) = block(&e, "vm-0");
    assert_eq!(blk.len(), 32);
    let lo = *blk.first().expect("block");
    assert!(e.set_port_fence(vm, Some((public, &[lo, lo + 1]))));
    for k in 0..2 {
        translated(tcp_syn(&mut e, 1, vm, 40000 + k, a, 443));
    }
    exhaustion_events(&mut e);
    let mut j = Vec::new();
    e.drain_journal(&mut j);

    // The reserve is used up toward A while 30 ports of the block are free for it.
    assert_eq!(
        tcp_syn(&mut e, 2, vm, 40002, a, 443),
        Verdict::Drop(DropReason::PortReserve)
    );
    assert_eq!(e.port_fence_stats(vm).expect("pat").refusals, 1);
    assert_eq!(
        conn_fail(&e, "vm-0"),
        0,
        "not a failed SNAT connection (R2.6)"
    );
    assert_eq!(drops(&e, "vm-0", DropReason::PortReserve), 1);
    assert_eq!(drops(&e, "vm-0", DropReason::PortsExhausted), 0);
    assert_eq!(e.global_stats().drops[DropReason::PortReserve as usize], 1);
    assert_eq!(exhaustion_events(&mut e), 0, "no exhaustion event");
    // Journaled as a refusal with its reason.
    let mut j = Vec::new();
    e.drain_journal(&mut j);
    assert!(
        matches!(
            j.as_slice(),
            [FlowChange::Refused {
                reason: DropReason::PortReserve,
                ..
            }]
        ),
        "{j:?}"
    );
    // Never answered (R9.5 answers exhaustion and flow limits only).
    assert_eq!(
        e.fail_fast(
            &Packet::tcp(vm, 40002, a, 443, SYN),
            DropReason::PortReserve
        ),
        None
    );
    // No summary event later either (R9.3 aggregation), within the flows' idle timeout.
    e.advance(1000);
    assert_eq!(exhaustion_events(&mut e), 0);

    // The whole block busy toward A: exhausted exactly as before, fence or not.
    assert!(e.set_port_fence(vm, None));
    for k in 0..30 {
        translated(tcp_syn(&mut e, 1001, vm, 41000 + k, a, 443));
    }
    assert!(e.set_port_fence(vm, Some((public, &[lo, lo + 1]))));
    assert_eq!(
        tcp_syn(&mut e, 1002, vm, 42000, a, 443),
        Verdict::Drop(DropReason::PortsExhausted)
    );
    assert_eq!(conn_fail(&e, "vm-0"), 1);
    assert_eq!(exhaustion_events(&mut e), 1);
    assert_eq!(
        e.port_fence_stats(vm).expect("pat").refusals,
        1,
        "unchanged"
    );
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_fence_refuses_only_when_a_port_outside_it_would_be_free() {
    // Ports outside the reserve held (after a takeover) or busy count as not free: the
    // fence is not the reason, the flow is exhausted (R2.6).
    let mut e = pool_long_idle(801);
    let (vm, a, b) = (private_u32(0), ip(A), ip(B));
    let (public, blk) = block(&e, "vm-0");
    let lo = *blk.first().expect("block");
    let outside: Vec<u16> = (lo + 2..lo + 32).collect();
    assert_eq!(e.hold_ports(vm, public, &outside, 0, 1000), 30);
    assert!(e.set_port_fence(vm, Some((public, &[lo, lo + 1]))));
    for k in 0..2 {
        translated(tcp_syn(&mut e, 1, vm, 40000 + k, a, 443));
    }
    assert_eq!(
        tcp_syn(&mut e, 1, vm, 40002, a, 443),
        Verdict::Drop(DropReason::PortsExhausted)
    );
    assert_eq!(e.port_fence_stats(vm).expect("pat").refusals, 0);
    assert_eq!(conn_fail(&e, "vm-0"), 1);
    // The holds end at 1000: then the free ports are outside the fence only.
    assert_eq!(
        tcp_syn(&mut e, 1000, vm, 40003, a, 443),
        Verdict::Drop(DropReason::PortReserve)
    );
    // Toward B the reserve is free (R2.3: shared between destinations).
    translated(tcp_syn(&mut e, 1000, vm, 40004, b, 443));
    assert_eq!(e.port_fence_stats(vm).expect("pat").refusals, 1);
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_lifting_the_fence_gives_back_the_whole_block() {
    let mut e = pool_long_idle(801);
    let (vm, a) = (private_u32(0), ip(A));
    let (public, blk) = block(&e, "vm-0");
    let lo = *blk.first().expect("block");
    assert!(e.set_port_fence(vm, Some((public, &[lo + 7]))));
    assert_eq!(
        translated(tcp_syn(&mut e, 1, vm, 40000, a, 443)),
        (public, lo + 7)
    );
    assert_eq!(
        tcp_syn(&mut e, 1, vm, 40001, a, 443),
        Verdict::Drop(DropReason::PortReserve)
    );
    assert!(e.set_port_fence(vm, None));
    assert!(!e.port_fence_stats(vm).expect("pat").fenced);
    // The other 31 ports of the block, each once, then exhausted.
    let mut got = BTreeSet::new();
    for k in 0..31 {
        got.insert(translated(tcp_syn(&mut e, 2, vm, 41000 + k, a, 443)).1);
    }
    let mut want = blk.clone();
    want.remove(&(lo + 7));
    assert_eq!(got, want);
    assert_eq!(
        tcp_syn(&mut e, 2, vm, 42000, a, 443),
        Verdict::Drop(DropReason::PortsExhausted)
    );
    // Lifting twice is harmless; refusals stay counted (monotonic).
    assert!(e.set_port_fence(vm, None));
    assert_eq!(e.port_fence_stats(vm).expect("pat").refusals, 1);
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_fence_on_another_public_address_allows_nothing() {
    let mut e = pool_long_idle(801);
    let (vm, a) = (private_u32(0), ip(A));
    let (public, blk) = block(&e, "vm-0");
    let ports: Vec<u16> = blk.iter().copied().collect();
    assert!(e.set_port_fence(vm, Some((public + 1, &ports))));
    assert_eq!(
        tcp_syn(&mut e, 1, vm, 40000, a, 443),
        Verdict::Drop(DropReason::PortReserve)
    );
    assert_eq!(
        out(&mut e, 1, Packet::udp(vm, 40000, a, 53)),
        Verdict::Drop(DropReason::PortReserve)
    );
    // The right address with the same ports: the whole block.
    assert!(e.set_port_fence(vm, Some((public, &ports))));
    assert_eq!(translated(tcp_syn(&mut e, 2, vm, 40001, a, 443)).0, public);
    assert_eq!(e.port_fence_stats(vm).expect("pat").refusals, 2);
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_set_port_fence_on_unknown_or_ilpip_instance_is_refused() {
    let mut e = reference();
    let (ilpip, unknown) = (ip("10.0.1.10"), ip("10.0.9.9"));
    let some: &[u16] = &[5000];
    for vm in [ilpip, unknown] {
        assert!(!e.set_port_fence(vm, Some((ip("203.0.113.10"), some))));
        assert!(!e.set_port_fence(vm, None));
        assert_eq!(e.port_fence_stats(vm), None);
        assert_eq!(e.pat_ports(vm), None);
        assert_eq!(e.hold_ports(vm, ip("203.0.113.10"), &[5000], 0, FIN), 0);
    }
    // The ILPIP keeps translating 1:1 (R1.1), ports kept.
    assert_eq!(
        translated(out(&mut e, 1, Packet::udp(ilpip, 5000, ip(A), 53))),
        (ip("203.0.113.10"), 5000)
    );
    // Default SNAT and load-balanced instances can be fenced.
    for vm in ["10.0.3.10", "10.0.2.10"] {
        let (public, ports) = e.pat_ports(ip(vm)).expect("PAT instance");
        assert!(e.set_port_fence(ip(vm), Some((public, &ports[..1]))));
    }
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_fence_is_dropped_with_its_instance() {
    let mut e = pool_long_idle(2);
    let vm = private_u32(0);
    let (public, blk) = block(&e, "vm-0");
    let lo = *blk.first().expect("block");
    assert!(e.set_port_fence(vm, Some((public, &[lo]))));
    let mut c = pool_config_long_idle(2);
    let keep = c.instance.clone();
    c.instance.remove(0);
    e.apply(1, Topology::from_config(c.clone()).expect("valid"))
        .expect("apply");
    assert_eq!(e.port_fence_stats(vm), None);
    e.check_invariants().expect("invariants");
    // Added again: a new instance, not fenced.
    c.instance = keep;
    e.apply(2, Topology::from_config(c).expect("valid"))
        .expect("apply");
    let st = e.port_fence_stats(vm).expect("pat");
    assert_eq!((st.fenced, st.allocations, st.refusals), (false, 0, 0));
    translated(tcp_syn(&mut e, 3, vm, 40000, ip(A), 443));
}

#[test]
fn r10_4_fence_follows_the_block_when_it_changes() {
    // A fence names public ports: when a tier change takes chunks away (R2.9) and gives
    // others back (R2.10), new flows take only ports the fence names that lie in the block
    // as it is then, never a port that merely sits where a fenced one was.
    let cfg = |names: &[usize]| {
        let mut c = pool_config_long_idle(0);
        c.instance = names.iter().map(|&i| vm(i, Some("big"))).collect();
        Topology::from_config(c).expect("valid")
    };
    let first: Vec<usize> = (0..50).collect();
    let mut e = Engine::new(cfg(&first), 0).expect("engine");
    let (vm0, a) = (private_u32(0), ip(A));
    let (public, before) = block(&e, "vm-0");
    let (_, before1) = block(&e, "vm-1");
    assert_eq!(before.len(), 1024, "R2.8: 50 instances, 1024 ports");
    // The fence: vm-0's upper half (R2.9 keeps the lowest-port chunks) and a quarter of
    // vm-1's block (ignored while it is vm-1's).
    let upper: Vec<u16> = before.iter().copied().skip(512).collect();
    let theirs: Vec<u16> = before1.iter().copied().take(256).collect();
    let fence = [&upper[..], &theirs[..]].concat();
    assert!(e.set_port_fence(vm0, Some((public, &fence))));
    let allowed_now = |e: &Engine| -> BTreeSet<u16> {
        let (_, now) = block(e, "vm-0");
        fence.iter().copied().filter(|p| now.contains(p)).collect()
    };
    // Takes every port it may toward A, checking each; then it must be refused.
    let drain = |e: &mut Engine, t: u32, allowed: &BTreeSet<u16>| {
        let mut got = BTreeSet::new();
        for k in 0..=1024u16 {
            match tcp_syn(e, t, vm0, 10000 + (t as u16 % 8) * 2000 + k, a, 443) {
                Verdict::Translate { port, .. } => {
                    assert!(
                        allowed.contains(&port),
                        "port {port} not named by the fence"
                    );
                    assert!(got.insert(port));
                }
                Verdict::Drop(DropReason::PortReserve) => break,
                v => panic!("unexpected {v:?}"),
            }
        }
        assert_eq!(&got, allowed);
    };
    drain(&mut e, 1, &upper.iter().copied().collect());
    // 51 instances: 512 ports each (R2.9); vm-0 keeps its lower half, its flows on the upper
    // half are dropped.
    let second: Vec<usize> = (0..51).collect();
    e.apply(2, cfg(&second)).expect("apply");
    assert_eq!(block(&e, "vm-0").1.len(), 512);
    assert!(allowed_now(&e).is_empty(), "the upper half was reclaimed");
    drain(&mut e, 3, &BTreeSet::new());
    // vm-1 leaves: 50 instances again, 1024 ports each (R2.10), vm-0 grows into free chunks.
    let third: Vec<usize> = (0..51).filter(|&i| i != 1).collect();
    e.apply(4, cfg(&third)).expect("apply");
    assert_eq!(block(&e, "vm-0").1.len(), 1024);
    let allowed = allowed_now(&e);
    // The test's precondition: vm-0 grew into other chunks than the ones it lost (the same
    // local ports now stand for other public ports), and some of them are fenced.
    let (_, after) = block(&e, "vm-0");
    assert!(
        !upper.iter().any(|p| after.contains(p)),
        "grew into other chunks"
    );
    assert!(!allowed.is_empty() && allowed.len() < 512, "{allowed:?}");
    drain(&mut e, 5, &allowed);
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_held_ports_are_refused_to_every_destination_and_both_protocols() {
    let mut e = pool_long_idle(801);
    let vm = private_u32(0);
    let (public, blk) = block(&e, "vm-0");
    let lo = *blk.first().expect("block");
    let held = [lo, lo + 5, lo + 31];
    assert_eq!(e.hold_ports(vm, public, &held, 10, FIN), 3);
    assert_eq!(e.takeover_hold_stats().ports_held, 3);
    // Toward each of several destinations, TCP and UDP: the 29 other ports, then exhausted
    // (R2.6: held ports count as in use).
    for (d, dst) in ["198.51.100.1", "198.51.100.2", "203.0.113.9"]
        .iter()
        .enumerate()
    {
        for udp in [false, true] {
            let mut got = BTreeSet::new();
            for k in 0..29u16 {
                let sport = 20000 + d as u16 * 100 + k;
                let p = if udp {
                    Packet::udp(vm, sport, ip(dst), 53)
                } else {
                    Packet::tcp(vm, sport, ip(dst), 443, SYN)
                };
                let (_, port) = translated(out(&mut e, 11, p));
                assert!(!held.contains(&port), "held port {port} given to {dst}");
                got.insert(port);
            }
            assert_eq!(got.len(), 29);
            let p = if udp {
                Packet::udp(vm, 30000, ip(dst), 53)
            } else {
                Packet::tcp(vm, 30000, ip(dst), 443, SYN)
            };
            assert_eq!(
                out(&mut e, 11, p),
                Verdict::Drop(DropReason::PortsExhausted)
            );
        }
    }
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_port_hold_ends_exactly_at_now_plus_secs() {
    let mut e = pool_long_idle(801);
    let (vm, a) = (private_u32(0), ip(A));
    let (public, blk) = block(&e, "vm-0");
    let lo = *blk.first().expect("block");
    let held = [lo, lo + 9];
    assert_eq!(e.hold_ports(vm, public, &held, 10, FIN), 2);
    // Every other port busy toward A.
    for k in 0..30 {
        let (_, port) = translated(tcp_syn(&mut e, 11, vm, 40000 + k, a, 443));
        assert!(!held.contains(&port));
    }
    assert_eq!(
        tcp_syn(&mut e, 10 + FIN - 1, vm, 41000, a, 443),
        Verdict::Drop(DropReason::PortsExhausted),
        "held at end - 1"
    );
    assert_eq!(e.takeover_hold_stats().ports_held, 2);
    // Usable at 10 + 240 exactly, whether or not the timer step has run: with a budget of
    // one unit per call (R9.4) the second hold is still queued when the second SYN comes.
    e.set_expiry_budget(1);
    let mut got = BTreeSet::new();
    for k in 0..2 {
        got.insert(translated(tcp_syn(&mut e, 10 + FIN, vm, 41001 + k, a, 443)).1);
    }
    assert_eq!(got, held.iter().copied().collect());
    assert_eq!(e.takeover_hold_stats().ports_held, 0);
    e.advance(10 + FIN);
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_port_hold_is_extended_never_shortened() {
    let mut e = pool_long_idle(801);
    let (vm, a) = (private_u32(0), ip(A));
    let (public, blk) = block(&e, "vm-0");
    let p = *blk.first().expect("block");
    assert_eq!(e.hold_ports(vm, public, &[p], 10, 100), 1); // until 110
    assert_eq!(e.hold_ports(vm, public, &[p], 20, 200), 1); // until 220
    assert_eq!(e.hold_ports(vm, public, &[p], 30, 10), 1); // until 40: no shorter
    assert_eq!(e.takeover_hold_stats().ports_held, 1, "one port, one hold");
    assert_eq!(e.next_deadline(), Some(220));
    for k in 0..31 {
        translated(tcp_syn(&mut e, 31, vm, 40000 + k, a, 443));
    }
    e.advance(110);
    assert_eq!(
        tcp_syn(&mut e, 219, vm, 41000, a, 443),
        Verdict::Drop(DropReason::PortsExhausted)
    );
    assert_eq!(
        translated(tcp_syn(&mut e, 220, vm, 41001, a, 443)),
        (public, p)
    );
    // A hold whose end is not after the engine's time holds nothing.
    assert_eq!(e.hold_ports(vm, public, &[p + 1], 200, 20), 0);
    assert_eq!(e.hold_ports(vm, public, &[p + 1], 220, 0), 0);
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_hold_ports_ignores_ports_outside_the_block() {
    let mut e = pool_long_idle(2);
    let (vm, vm1, a) = (private_u32(0), private_u32(1), ip(A));
    let (public, blk) = block(&e, "vm-0");
    let (_, blk1) = block(&e, "vm-1");
    let lo = *blk.first().expect("block");
    let other = *blk1.first().expect("vm-1's block");
    // Two ports of the block (one given twice), one below the range, two of vm-1's.
    let ports = [lo, lo + 1, lo, 80, other, other + 1];
    assert_eq!(e.hold_ports(vm, public, &ports, 0, FIN), 2);
    assert_eq!(e.takeover_hold_stats().ports_held, 2);
    // On another address: nothing.
    assert_eq!(e.hold_ports(vm, public + 1, &[lo + 2], 0, FIN), 0);
    assert_eq!(e.takeover_hold_stats().ports_held, 2);
    // vm-1's first port is not held: its first new flow gets it (R2.3: never used, lowest).
    assert_eq!(syn(&mut e, 1, vm1, 40000, a, 443), (public, other));
    // vm-0's first two ports are: its first flow gets the third.
    assert_eq!(syn(&mut e, 1, vm, 40000, a, 443), (public, lo + 2));
    e.check_invariants().expect("invariants");
}

#[test]
fn r10_4_port_holds_stay_with_the_public_port_when_the_instance_goes() {
    let mut e = pool_long_idle(2);
    let vm = private_u32(0);
    let (public, blk) = block(&e, "vm-0");
    let lo = *blk.first().expect("block");
    assert_eq!(e.hold_ports(vm, public, &[lo, lo + 1], 0, FIN), 2);
    let mut c = pool_config_long_idle(2);
    c.instance.remove(0);
    e.apply(1, Topology::from_config(c).expect("valid"))
        .expect("apply");
    assert_eq!(e.takeover_hold_stats().ports_held, 2);
    e.check_invariants().expect("invariants");
    e.advance(FIN);
    assert_eq!(e.takeover_hold_stats().ports_held, 0);
    assert_eq!(e.next_deadline(), None);
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_4_pat_ports_agree_with_pat_chunks() {
    // The reference topology (default SNAT, load-balanced, ILPIP) and a 51-instance pool
    // (R2.8: 512 ports, 16 chunks each).
    let mut engines = vec![reference(), pool_long_idle(51)];
    let mut c = pool_config(51);
    c.instance.truncate(3);
    engines.push(Engine::new(Topology::from_config(c).expect("valid"), 0).expect("engine"));
    for e in &engines {
        let chunks: HashSet<(u32, u16, u32)> = e.pat_chunks().into_iter().collect();
        let mut seen = 0;
        for r in e.instances() {
            let Some((public, ports)) = e.pat_ports(r.private_ip) else {
                assert_eq!(r.scenario.name(), "ilpip", "{}: no ports", r.name);
                continue;
            };
            assert_eq!(public, r.scenario.addr());
            assert_eq!(ports.len() as u32, r.allocated, "{}", r.name);
            assert!(ports.windows(2).all(|w| w[0] < w[1]), "ascending");
            for &p in &ports {
                let chunk = (p - 1024) / 32;
                assert!(
                    chunks.contains(&(public, chunk, r.private_ip)),
                    "{}: port {p}'s chunk {chunk} not listed",
                    r.name
                );
            }
            // Every chunk listed for it is wholly in its ports.
            let mine: Vec<u16> = chunks
                .iter()
                .filter(|&&(a, _, pr)| a == public && pr == r.private_ip)
                .map(|&(_, c, _)| c)
                .collect();
            assert_eq!(mine.len() * 32, ports.len());
            seen += mine.len();
        }
        assert_eq!(
            seen,
            chunks.len(),
            "every chunk belongs to a listed instance"
        );
    }
}

// ---- property test ----

#[derive(Debug, Clone)]
enum Op {
    Advance(u32),
    /// A new outbound flow of vm-0 toward destination `dest`.
    New {
        dest: usize,
        udp: bool,
    },
    /// A RST on a live TCP flow: its port is released 15 s later (R3.3).
    Reset {
        pick: usize,
    },
    /// A new fence: offsets of the block, plus ports outside it (another instance's, below
    /// the range); or the fence lifted.
    Fence(Option<(Vec<u16>, bool)>),
}

const DESTS: [(&str, u16); 3] = [
    ("198.51.100.1", 443),
    ("198.51.100.2", 443),
    ("203.0.113.9", 53),
];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..20u32).prop_map(Op::Advance),
        10 => (0..DESTS.len(), prop::bool::weighted(0.3))
            .prop_map(|(dest, udp)| Op::New { dest, udp }),
        3 => any::<usize>().prop_map(|pick| Op::Reset { pick }),
        1 => prop::option::weighted(
            0.8,
            (prop::collection::vec(0..40u16, 0..12), any::<bool>())
        )
        .prop_map(Op::Fence),
    ]
}

/// The model of one (protocol, destination): the ports of vm-0's flows toward it, and
/// when each is free again (None: still open).
type Busy = HashMap<(bool, usize), Vec<(u16, Option<u32>)>>;

fn run(first: (Vec<u16>, bool), ops: Vec<Op>) -> Result<(), TestCaseError> {
    // 801 instances: R2.8 gives each 32 ports, so the block is used up quickly. No flow ends
    // by idle timeout within a run.
    let mut c = pool_config(801);
    c.gateway.idle_timeout_secs = 86_400;
    let mut e = Engine::new(Topology::from_config(c).expect("valid"), 0).expect("engine");
    let vm = private_u32(0);
    let (public, blk) = block(&e, "vm-0");
    let (_, blk1) = block(&e, "vm-1");
    prop_assert_eq!(blk.len(), 32);
    let lo = *blk.first().expect("block");
    let other = *blk1.first().expect("vm-1's block");
    let dests: Vec<(u32, u16)> = DESTS.iter().map(|&(a, p)| (ip(a), p)).collect();
    // The model's fence: the ports of the block it allows (None: not fenced).
    let set_fence = |e: &mut Engine, f: Option<(Vec<u16>, bool)>| -> Option<BTreeSet<u16>> {
        match f {
            None => {
                assert!(e.set_port_fence(vm, None));
                None
            }
            Some((offs, wrong_address)) => {
                // Offsets 32..40 fall outside the block: vm-1's ports, or below the range.
                let ports: Vec<u16> = offs
                    .iter()
                    .map(|&o| {
                        if o < 32 {
                            lo + o
                        } else if o % 2 == 0 {
                            other + o - 32
                        } else {
                            o
                        }
                    })
                    .collect();
                let addr = if wrong_address { public ^ 1 } else { public };
                assert!(e.set_port_fence(vm, Some((addr, &ports))));
                Some(if wrong_address {
                    BTreeSet::new()
                } else {
                    ports.into_iter().filter(|p| blk.contains(p)).collect()
                })
            }
        }
    };
    let mut allowed = set_fence(&mut e, Some(first));
    let mut busy: Busy = HashMap::new();
    let mut tcp_flows: Vec<(u16, usize, u16)> = Vec::new(); // (sport, dest, port)
    let (mut now, mut sport) = (0u32, 20000u16);
    let (mut ok, mut refused, mut exhausted) = (0u64, 0u64, 0u64);
    for op in ops {
        match op {
            Op::Advance(d) => {
                now += d;
                e.advance(now);
            }
            Op::Fence(f) => allowed = set_fence(&mut e, f),
            Op::Reset { pick } => {
                if tcp_flows.is_empty() {
                    continue;
                }
                let (sp, d, port) = tcp_flows.swap_remove(pick % tcp_flows.len());
                let (da, dp) = dests[d];
                prop_assert_eq!(
                    out(&mut e, now, Packet::tcp(vm, sp, da, dp, RST)),
                    Verdict::Translate { addr: public, port }
                );
                // R2.2: the flow is the only one on its port toward its destination.
                let b = busy.get_mut(&(false, d)).expect("flow's destination");
                let f = b
                    .iter_mut()
                    .find(|(p, free_at)| *p == port && free_at.is_none())
                    .expect("the flow in the model");
                f.1 = Some(now + RST_DELAY);
            }
            Op::New { dest, udp } => {
                let (da, dp) = dests[dest];
                sport = sport.wrapping_add(1).max(20000);
                let p = if udp {
                    Packet::udp(vm, sport, da, dp)
                } else {
                    Packet::tcp(vm, sport, da, dp, SYN)
                };
                let b = busy.entry((udp, dest)).or_default();
                b.retain(|&(_, free_at)| free_at.is_none_or(|t| t > now));
                let taken: BTreeSet<u16> = b.iter().map(|&(p, _)| p).collect();
                let free: BTreeSet<u16> = blk.difference(&taken).copied().collect();
                match out(&mut e, now, p) {
                    Verdict::Translate { addr, port } => {
                        prop_assert_eq!(addr, public);
                        prop_assert!(
                            free.contains(&port),
                            "port {} busy toward {:?}",
                            port,
                            (da, dp)
                        );
                        if let Some(a) = &allowed {
                            prop_assert!(
                                a.contains(&port),
                                "port {} outside the fence {:?}",
                                port,
                                a
                            );
                        }
                        b.push((port, None));
                        if !udp {
                            tcp_flows.push((sport, dest, port));
                        }
                        ok += 1;
                    }
                    Verdict::Drop(DropReason::PortReserve) => {
                        let a = allowed.as_ref();
                        prop_assert!(a.is_some(), "port_reserve without a fence");
                        prop_assert!(
                            a.is_some_and(|a| a.is_disjoint(&free)) && !free.is_empty(),
                            "port_reserve with free {:?}, fence {:?}",
                            free,
                            a
                        );
                        refused += 1;
                    }
                    Verdict::Drop(DropReason::PortsExhausted) => {
                        prop_assert!(free.is_empty(), "exhausted with {:?} free", free);
                        exhausted += 1;
                    }
                    v => prop_assert!(false, "unexpected {:?}", v),
                }
            }
        }
        let st = e.port_fence_stats(vm).expect("PAT instance");
        prop_assert_eq!(st.fenced, allowed.is_some());
        prop_assert_eq!((st.allocations, st.refusals), (ok, refused));
        prop_assert_eq!(conn_fail(&e, "vm-0"), exhausted);
        e.check_invariants()
            .map_err(|err| TestCaseError::fail(err.to_string()))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Random fences (random ports of the block, ports outside it, a wrong address, lifted),
    /// new flows toward a few destinations, RSTs and time: every allocated port lies in the
    /// fence ∩ the block and is free for its destination (R2.2, R2.3); a refusal is
    /// `port_reserve` exactly when the block has a free port for the destination and the
    /// fence none, `ports_exhausted` exactly when the block has none (R2.6).
    #[test]
    fn r10_4_fenced_allocations_stay_in_fence_and_block(
        first in (prop::collection::vec(0..40u16, 0..12), any::<bool>()),
        ops in prop::collection::vec(op(), 1..300),
    ) {
        run(first, ops)?;
    }
}
