//! Port stashes (issue #17): ports the engine chooses ahead for one instance's new TCP flows to
//! one destination, which a kernel fast path then opens itself. Expected values come from the
//! SPEC and the test's own arithmetic, not from the code: the allocator's order (R2.3) is
//! checked against a twin engine given the same flows as SYNs; blocks hold 1024 ports up to 50
//! instances and 32 from 801 (R2.8); a RST releases the port 15 s later (R3.3) and an idle flow
//! after the idle timeout (R3.4), both counted from the second the fast path saw the packet;
//! stashed ports count toward the flow limits (R9.2); a take leaves `max(8, block / 8)` ports
//! free for the destination (the stash's rule, so a SYN reaching the engine finds one, R2.6).

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};

use common::*;
use proptest::prelude::*;
use snatgw_core::engine::RETAKE_AFTER;
use snatgw_core::{
    proto, Direction, DropReason, EndCause, Engine, EventKind, FlowChange, FlowKey, Packet,
    StashKey, StashOpen, Topology, Verdict,
};

/// R3.3: a RST releases the port 15 s later (the default).
const RST_DELAY: u32 = 15;
/// R2.3 decision: releases count as recent for 240 s (the default `port_reuse_history_secs`).
const HISTORY: u32 = 240;

const A: &str = "198.51.100.7";
const B: &str = "198.51.100.8";
const C: &str = "198.51.100.9";
const D: &str = "198.51.100.10";

fn skey(src: u32, dst: u32, dport: u16) -> StashKey {
    StashKey { src, dst, dport }
}

/// The outbound TCP flow `src:sport -> dst:dport` on `public:pport`.
fn fkey(src: u32, sport: u16, dst: u32, dport: u16, public: u32, pport: u16) -> FlowKey {
    FlowKey {
        proto: proto::TCP,
        src,
        sport,
        dst,
        dport,
        public,
        pport,
    }
}

/// The flow the fast path opens from `k`'s stash on `pport`.
fn kflow(k: StashKey, sport: u16, public: u32, pport: u16) -> FlowKey {
    fkey(k.src, sport, k.dst, k.dport, public, pport)
}

fn journal(e: &mut Engine) -> Vec<FlowChange> {
    let mut v = Vec::new();
    e.drain_journal(&mut v);
    v
}

/// The instance's public address and its block's ports, from the instance report (R2.4).
fn block(e: &Engine, name: &str) -> (u32, BTreeSet<u16>) {
    let r = e.instance(name).expect("instance");
    let ports = r.block.iter().flat_map(|&(lo, hi)| lo..=hi).collect();
    (r.scenario.addr(), ports)
}

fn tcp_syn(e: &mut Engine, now: u32, vm: u32, sport: u16, dst: u32, dport: u16) -> Verdict {
    out(e, now, Packet::tcp(vm, sport, dst, dport, SYN))
}

fn exhaustion_events(e: &mut Engine) -> usize {
    e.drain_events()
        .iter()
        .filter(|ev| matches!(ev.kind, EventKind::Exhaustion { .. }))
        .count()
}

/// Public ports of the live TCP flows from `src` to `dst`:`dport`.
fn ports_toward(e: &Engine, src: u32, dst: u32, dport: u16) -> Vec<u16> {
    e.flows(None)
        .iter()
        .filter(|f| f.private.0 == src && f.remote == (dst, dport))
        .map(|f| f.public.1)
        .collect()
}

fn is_live(e: &Engine, k: &FlowKey) -> bool {
    e.live_flow_keys().any(|(_, f)| f == *k)
}

/// Releases toward (`dst`, 443) the engine would carry over a restart (R2.3 decision).
fn releases_toward(e: &Engine, dst: u32) -> Vec<(u16, u32)> {
    let mut v: Vec<(u16, u32)> = e
        .export_state()
        .releases
        .iter()
        .filter(|r| r.dst == dst && r.dport == 443 && r.proto == proto::TCP)
        .map(|r| (r.pport, r.at))
        .collect();
    v.sort_unstable();
    v
}

fn pool_with(n: usize, f: impl FnOnce(&mut snatgw_core::ConfigFile)) -> Engine {
    let mut c = pool_config_long_idle(n);
    f(&mut c);
    Engine::new(Topology::from_config(c).expect("valid"), 0).expect("engine")
}

#[test]
fn r2_3_stash_takes_ports_in_alloc_order() {
    let (a, b) = (ip(A), ip(B));
    let vm = private_u32(0);
    // The same history on both: flows to B (ports used for another destination, R2.3 group
    // of used ports) and to A, one of which is reset and released (R2.3 release history).
    let setup = |e: &mut Engine| {
        for k in 0..5 {
            syn(e, 1, vm, 1000 + k, b, 443);
        }
        for k in 0..3 {
            syn(e, 1, vm, 2000 + k, a, 443);
        }
        out(e, 2, Packet::tcp(vm, 2001, a, 443, RST));
        e.advance(2 + RST_DELAY);
    };
    let mut e = pool_long_idle(1);
    let mut twin = pool_long_idle(1);
    setup(&mut e);
    setup(&mut twin);
    let (public, blk) = block(&e, "vm-0");
    let now = 2 + RST_DELAY;

    let g = e.stash_take(skey(vm, a, 443), 20).expect("a grant");
    assert_eq!(g.public, public);
    assert_eq!(Some(g.slot), e.instance_slot("vm-0"));
    assert_eq!(g.pports.len(), 20);
    let twin_ports: Vec<u16> = (0..20)
        .map(|k| translated(tcp_syn(&mut twin, now, vm, 3000 + k, a, 443)).1)
        .collect();
    assert_eq!(
        g.pports, twin_ports,
        "R2.3: the ports the allocator gives the next new flows, in that order"
    );
    assert!(g.pports.iter().all(|p| blk.contains(p)), "R2.4");
    assert_eq!(e.stash_ports(skey(vm, a, 443)), g.pports);

    // More for the same stash: the twin's next ten.
    let g2 = e.stash_take(skey(vm, a, 443), 10).expect("more");
    let twin_more: Vec<u16> = (20..30)
        .map(|k| translated(tcp_syn(&mut twin, now, vm, 3000 + k, a, 443)).1)
        .collect();
    assert_eq!(g2.pports, twin_more);
    // And a SYN the engine decides itself gets what the twin's next SYN gets.
    let mine = translated(tcp_syn(&mut e, now, vm, 4000, a, 443));
    let theirs = translated(tcp_syn(&mut twin, now, vm, 4000, a, 443));
    assert_eq!(mine, theirs);
    let st = e.stash_stats();
    assert_eq!((st.stashes, st.ports_stashed, st.taken), (1, 30, 30));
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_2_stashed_port_never_given_to_another_flow_to_that_destination() {
    // 801 instances: 32 ports each (R2.8).
    let mut e = pool_long_idle(801);
    let (vm, a) = (private_u32(0), ip(A));
    let (_, blk) = block(&e, "vm-0");
    assert_eq!(blk.len(), 32);
    let g = e.stash_take(skey(vm, a, 443), 100).expect("a grant");
    // 32 ports, 8 left free for the destination: 24 stashed.
    assert_eq!(g.pports.len(), 24);
    let stashed: HashSet<u16> = g.pports.iter().copied().collect();
    let mut got = Vec::new();
    for k in 0..8 {
        let (_, port) = translated(tcp_syn(&mut e, 1, vm, 5000 + k, a, 443));
        assert!(
            !stashed.contains(&port),
            "R2.2: port {port} is stashed for this destination"
        );
        got.push(port);
    }
    let distinct: HashSet<u16> = got.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        8,
        "R2.3: one port per flow to one destination"
    );
    // Nothing is left for the destination outside the stash.
    assert_eq!(
        tcp_syn(&mut e, 1, vm, 5100, a, 443),
        Verdict::Drop(DropReason::PortReserve)
    );
    assert!(ports_toward(&e, vm, a, 443)
        .iter()
        .all(|p| !stashed.contains(p)));
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_3_stashed_port_shared_with_other_destinations() {
    let mut e = pool_long_idle(1);
    e.set_journal(true);
    let (vm, a, b, c) = (private_u32(0), ip(A), ip(B), ip(C));
    let (public, _) = block(&e, "vm-0");
    let ga = e.stash_take(skey(vm, a, 443), 10).expect("A");
    // R2.3: the stashed ports are used ports of the instance, free for B: B's stash takes
    // them before any port new to the instance.
    let gb = e.stash_take(skey(vm, b, 443), 10).expect("B");
    let sa: BTreeSet<u16> = ga.pports.iter().copied().collect();
    let sb: BTreeSet<u16> = gb.pports.iter().copied().collect();
    assert_eq!(sa, sb, "R2.3: flows to different destinations share ports");
    // And a flow to a third destination gets one of them too.
    let (_, pc) = translated(tcp_syn(&mut e, 1, vm, 6000, c, 443));
    assert!(sa.contains(&pc));
    let r = e.instance("vm-0").expect("vm-0");
    assert_eq!(
        r.used[0], 1,
        "R2.3: used ports = distinct ports held by at least one flow (stashed ports are not)"
    );
    assert_eq!(r.flows[0], 1, "stashed ports are not flows");
    // The fast path opens a flow to B on pc: it is B's, and stays in A's stash.
    let k = kflow(skey(vm, b, 443), 7000, public, pc);
    assert_eq!(e.stash_opened(1, &k), StashOpen::Opened);
    assert!(e.stash_ports(skey(vm, a, 443)).contains(&pc));
    assert!(!e.stash_ports(skey(vm, b, 443)).contains(&pc));
    // A SYN to B never gets a port B's flows or B's stash hold (R2.2).
    let (_, pb) = translated(tcp_syn(&mut e, 1, vm, 6001, b, 443));
    assert!(pb != pc && !e.stash_ports(skey(vm, b, 443)).contains(&pb));
    e.check_invariants().expect("invariants");
}

#[test]
fn r9_2_stashed_ports_count_toward_flow_limits() {
    let mut e = pool_with(2, |c| c.instance[0].max_flows = Some(20));
    let (vm, a, d) = (private_u32(0), ip(A), ip(D));
    let (public, _) = block(&e, "vm-0");
    for k in 0..5 {
        syn(&mut e, 1, vm, 1000 + k, d, 80);
    }
    let key = skey(vm, a, 443);
    let g = e.stash_take(key, 100).expect("a grant");
    assert_eq!(
        g.pports.len(),
        15,
        "R9.2: 5 live flows + 15 stashed = the limit 20"
    );
    assert_eq!(e.stash_take(key, 1), None, "no room left");
    assert_eq!(
        tcp_syn(&mut e, 1, vm, 2000, d, 80),
        Verdict::Drop(DropReason::FlowLimit),
        "R9.2: stashed ports count as flows"
    );
    // A flow from the stash keeps the sum: still at the limit.
    assert_eq!(
        e.stash_opened(1, &kflow(key, 3000, public, g.pports[0])),
        StashOpen::Opened
    );
    assert_eq!(
        tcp_syn(&mut e, 1, vm, 2001, d, 80),
        Verdict::Drop(DropReason::FlowLimit)
    );
    // Four ports given back: four more flows, then the limit again.
    e.stash_return(key, &g.pports[11..15]);
    for k in 0..4 {
        translated(tcp_syn(&mut e, 1, vm, 2100 + k, d, 80));
    }
    assert_eq!(
        tcp_syn(&mut e, 1, vm, 2200, d, 80),
        Verdict::Drop(DropReason::FlowLimit)
    );
    e.check_invariants().expect("invariants");

    // The gateway's limit: 12 flows in all.
    let mut e = pool_with(2, |c| c.gateway.max_flows = Some(12));
    let (vm0, vm1) = (private_u32(0), private_u32(1));
    syn(&mut e, 1, vm1, 1000, d, 80);
    syn(&mut e, 1, vm1, 1001, d, 80);
    let g = e.stash_take(skey(vm0, a, 443), 100).expect("a grant");
    assert_eq!(g.pports.len(), 10, "R9.2: 2 live + 10 stashed = 12");
    assert_eq!(
        tcp_syn(&mut e, 1, vm1, 1002, d, 80),
        Verdict::Drop(DropReason::FlowLimit)
    );
    e.check_invariants().expect("invariants");
}

#[test]
fn r9_2_fast_path_flow_over_a_limit_is_refused_and_a_lowered_limit_voids_stashes() {
    let mut c = pool_config_long_idle(1);
    c.instance[0].max_flows = Some(20);
    let mut e = Engine::new(Topology::from_config(c.clone()).expect("valid"), 0).expect("e");
    e.set_journal(true);
    let (vm, a, d) = (private_u32(0), ip(A), ip(D));
    let (public, blk) = block(&e, "vm-0");
    let lo = *blk.first().expect("block");
    for k in 0..5 {
        syn(&mut e, 1, vm, 1000 + k, d, 80);
    }
    let key = skey(vm, a, 443);
    assert_eq!(e.stash_take(key, 100).expect("grant").pports.len(), 15);
    // A lower limit (R9.2: live flows stay, new ones are refused): the stash would exceed it.
    c.instance[0].max_flows = Some(10);
    e.apply(2, Topology::from_config(c).expect("valid"))
        .expect("apply");
    assert_eq!(e.stash_voided(), vec![key]);
    for k in 0..5 {
        translated(tcp_syn(&mut e, 2, vm, 2000 + k, d, 80));
    }
    e.drain_events();
    journal(&mut e);
    // At the limit, a flow the fast path opened on a free port is refused and recorded.
    let f = kflow(key, 3000, public, lo + 500);
    assert_eq!(e.stash_opened(2, &f), StashOpen::Refused);
    assert!(!is_live(&e, &f));
    assert!(e
        .drain_events()
        .iter()
        .any(|ev| matches!(ev.kind, EventKind::FlowLimit { limit: 10, .. })));
    assert!(matches!(
        &journal(&mut e)[..],
        [FlowChange::Closed { key, cause: EndCause::Reclaimed, .. }] if *key == f
    ));
    e.check_invariants().expect("invariants");
}

#[test]
fn r3_3_stash_opened_flow_rst_timer_from_kernel_second() {
    let mut e = pool_long_idle(1);
    e.set_journal(true);
    let (vm, a) = (private_u32(0), ip(A));
    let (public, _) = block(&e, "vm-0");
    let t = 100;
    e.advance(t);
    let key = skey(vm, a, 443);
    let g = e.stash_take(key, 4).expect("a grant");
    let k = kflow(key, 40_000, public, g.pports[0]);
    assert_eq!(e.stash_opened(t, &k), StashOpen::Opened);
    // The engine runs on; the fast path's RST of t + 2 is applied at t + 10.
    e.advance(t + 10);
    assert!(e.tcp_event_at(t + 2, &k, RST, Direction::Inbound));
    e.advance(t + 2 + RST_DELAY - 1);
    assert!(is_live(&e, &k), "R3.3: held until 15 s after the RST");
    e.advance(t + 2 + RST_DELAY);
    assert!(!is_live(&e, &k), "R3.3: released 15 s after the RST");
    let j = journal(&mut e);
    assert_eq!(
        j,
        vec![
            FlowChange::Opened {
                at: t,
                instance: "vm-0".into(),
                slot: 0,
                key: k,
                by_fast_path: true,
            },
            FlowChange::Closed {
                at: t + 2 + RST_DELAY,
                instance: "vm-0".into(),
                slot: 0,
                key: k,
                cause: EndCause::Rst,
            },
        ]
    );
    let st = e.instance("vm-0").expect("vm-0").stats[0];
    // A connection; its SYN's packet is the fast path's to count (its per-instance counter,
    // credited with the others, R6.1), not the engine's.
    assert_eq!((st.conn_ok, st.packets_out), (1, 0));
    e.check_invariants().expect("invariants");
}

#[test]
fn r3_4_stash_opened_flow_idle_from_kernel_second() {
    const IDLE: u32 = 30;
    let mut e = pool_with(1, |c| c.gateway.idle_timeout_secs = IDLE);
    e.set_journal(true);
    let (vm, a) = (private_u32(0), ip(A));
    let (public, _) = block(&e, "vm-0");
    e.advance(50);
    let key = skey(vm, a, 443);
    let g = e.stash_take(key, 4).expect("a grant");
    // Opened at 55 by the fast path, applied at 60: idle from 55 (R3.4).
    e.advance(60);
    let k = kflow(key, 40_000, public, g.pports[0]);
    assert_eq!(e.stash_opened(55, &k), StashOpen::Opened);
    e.advance(55 + IDLE - 1);
    assert!(is_live(&e, &k), "R3.4: not idle for 30 s yet");
    e.advance(55 + IDLE);
    assert!(
        !is_live(&e, &k),
        "R3.4: released 30 s after its last packet"
    );
    let closed: Vec<(u32, EndCause)> = journal(&mut e)
        .iter()
        .filter_map(|c| match c {
            FlowChange::Closed { at, cause, .. } => Some((*at, *cause)),
            _ => None,
        })
        .collect();
    assert_eq!(closed, vec![(55 + IDLE, EndCause::Idle)]);

    // A record applied after its flow's idle deadline: made and ended at that deadline.
    let late = kflow(key, 40_001, public, g.pports[1]);
    let now = e.now();
    let at = now - IDLE - 5;
    assert_eq!(e.stash_opened(at, &late), StashOpen::Opened);
    assert!(!is_live(&e, &late));
    let j = journal(&mut e);
    assert!(matches!(
        &j[..],
        [
            FlowChange::Opened { key, by_fast_path: true, .. },
            FlowChange::Closed { at: closed, key: k2, cause: EndCause::Idle, .. },
        ] if *key == late && *k2 == late && *closed == at + IDLE
    ));
    assert!(!e.stash_ports(key).contains(&g.pports[1]));
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_6_no_exhaustion_event_while_stash_holds_ports() {
    let mut e = pool_long_idle(801);
    let (vm, a) = (private_u32(0), ip(A));
    let (public, _) = block(&e, "vm-0");
    let key = skey(vm, a, 443);
    let g = e.stash_take(key, 100).expect("a grant");
    assert_eq!(g.pports.len(), 24);
    for k in 0..8 {
        translated(tcp_syn(&mut e, 1, vm, 5000 + k, a, 443));
    }
    exhaustion_events(&mut e);
    // Every port is busy or stashed for A: the stash may be opening flows; not R2.6.
    assert_eq!(
        tcp_syn(&mut e, 1, vm, 5100, a, 443),
        Verdict::Drop(DropReason::PortReserve)
    );
    assert_eq!(exhaustion_events(&mut e), 0, "no exhaustion event");
    let st = e.instance("vm-0").expect("vm-0").stats[0];
    assert_eq!(st.conn_fail, 0, "not a failed SNAT connection");
    assert_eq!(
        e.port_fence_stats(vm).expect("PAT").refusals,
        0,
        "not a fence refusal"
    );
    // Once the stash is used up, a SYN that finds no port is an exhaustion (R2.6).
    for (k, &p) in g.pports.iter().enumerate() {
        let f = kflow(key, 6000 + k as u16, public, p);
        assert_eq!(e.stash_opened(1, &f), StashOpen::Opened);
    }
    assert_eq!(e.stash_stats().ports_stashed, 0);
    assert_eq!(
        tcp_syn(&mut e, 1, vm, 5101, a, 443),
        Verdict::Drop(DropReason::PortsExhausted)
    );
    assert_eq!(exhaustion_events(&mut e), 1);
    assert_eq!(e.instance("vm-0").expect("vm-0").stats[0].conn_fail, 1);
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_6_take_leaves_ports_free_for_the_destination() {
    // 1024 ports: at least 128 stay free for the destination.
    let mut e = pool_long_idle(1);
    let (vm, a) = (private_u32(0), ip(A));
    let key = skey(vm, a, 443);
    for k in 0..100 {
        syn(&mut e, 1, vm, 1000 + k, a, 443);
    }
    let g = e.stash_take(key, 2000).expect("a grant");
    assert_eq!(g.pports.len(), 1024 - 100 - 128);
    assert_eq!(e.stash_take(key, 1), None, "nothing more to spare");
    for k in 0..128 {
        translated(tcp_syn(&mut e, 1, vm, 2000 + k, a, 443));
    }
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_9_revoked_chunk_voids_stash() {
    let mut e = pool_long_idle(50);
    e.set_journal(true);
    let (vm, a, b) = (private_u32(0), ip(A), ip(B));
    let (public, blk) = block(&e, "vm-0");
    let lo = *blk.first().expect("block");
    let (ka, kb) = (skey(vm, a, 443), skey(vm, b, 443));
    let ga = e.stash_take(ka, 600).expect("A");
    assert_eq!(ga.pports.len(), 600);
    let gb = e.stash_take(kb, 10).expect("B");
    // R2.9: the tier halves to 512 ports, the block keeps its lowest chunks (`plan`).
    let kept = |p: u16| p < lo + 512;
    assert!(ga.pports.iter().any(|&p| !kept(p)));
    assert!(gb.pports.iter().all(|&p| kept(p)));
    e.apply(
        5,
        Topology::from_config(pool_config_long_idle(51)).expect("valid"),
    )
    .expect("apply");
    assert_eq!(block(&e, "vm-0").1.len(), 512);
    assert_eq!(e.stash_voided(), vec![ka], "A's stash lost ports");
    assert_eq!(e.stash_voided(), Vec::<StashKey>::new(), "reported once");
    assert!(e.stash_ports(ka).is_empty());
    assert_eq!(e.stash_ports(kb), gb.pports, "B's stash is untouched");
    let st = e.stash_stats();
    assert_eq!((st.stashes, st.ports_stashed, st.voided), (1, 10, 1));
    // A's ports left in the block are free again; B's 10 are stashed and held by no flow
    // (R2.3's used ports).
    assert_eq!(e.instance("vm-0").expect("vm-0").used[0], 0);
    e.check_invariants().expect("invariants");
    // The runtime hands the voided ports back late: ignored.
    e.stash_return(ka, &ga.pports);
    assert_eq!(e.stash_stats().returned, 0);
    // The fast path opened a flow on a revoked port before it stopped: refused, its entries go.
    journal(&mut e);
    let revoked = *ga.pports.iter().find(|&&p| !kept(p)).expect("revoked port");
    let f = kflow(ka, 9000, public, revoked);
    assert_eq!(e.stash_opened(5, &f), StashOpen::Refused);
    assert!(matches!(
        &journal(&mut e)[..],
        [FlowChange::Closed { key, cause: EndCause::Reclaimed, at: 5, .. }] if *key == f
    ));
    // Not granted again before RETAKE_AFTER seconds.
    assert_eq!(e.stash_take(ka, 5), None);
    e.advance(5 + RETAKE_AFTER);
    assert!(e.stash_take(ka, 5).is_some());
    e.check_invariants().expect("invariants");
}

#[test]
fn stash_voided_when_the_engine_takes_ports_back() {
    let (a, b) = (ip(A), ip(B));
    let (vm0, vm1) = (private_u32(0), private_u32(1));
    // Instance removed (R1.4).
    let mut e = pool_long_idle(2);
    e.stash_take(skey(vm1, a, 443), 5).expect("grant");
    e.apply(
        1,
        Topology::from_config(pool_config_long_idle(1)).expect("valid"),
    )
    .expect("apply");
    assert_eq!(e.stash_voided(), vec![skey(vm1, a, 443)]);
    e.check_invariants().expect("invariants");
    // A port fence (R10.4): only that instance's stashes.
    let mut e = pool_long_idle(2);
    e.stash_take(skey(vm0, a, 443), 5).expect("grant");
    e.stash_take(skey(vm1, a, 443), 5).expect("grant");
    let (public, blk) = block(&e, "vm-0");
    let lo = *blk.first().expect("block");
    assert!(e.set_port_fence(vm0, Some((public, &[lo]))));
    assert_eq!(e.stash_voided(), vec![skey(vm0, a, 443)]);
    assert_eq!(e.stash_take(skey(vm0, b, 443), 5), None, "fenced: no stash");
    e.check_invariants().expect("invariants");
    // Port holds and takeover windows (R10.4).
    let (p1, blk1) = block(&e, "vm-1");
    assert_eq!(
        e.hold_ports(vm1, p1, &[*blk1.first().expect("b")], 1, 240),
        1
    );
    assert_eq!(e.stash_voided(), vec![skey(vm1, a, 443)]);
    let mut e = pool_long_idle(2);
    e.stash_take(skey(vm0, a, 443), 5).expect("grant");
    assert!(e.hold_after_takeover(vm0, 1, 10));
    assert_eq!(e.stash_voided(), vec![skey(vm0, a, 443)]);
    e.check_invariants().expect("invariants");
    // A fleet admission hook (R10.2): every stash, and no new one.
    let mut e = pool_long_idle(2);
    e.stash_take(skey(vm0, a, 443), 5).expect("grant");
    e.stash_take(skey(vm1, b, 443), 5).expect("grant");
    e.set_admission(Some(std::sync::Arc::new(|_| true)));
    assert_eq!(e.stash_voided(), vec![skey(vm0, a, 443), skey(vm1, b, 443)]);
    assert_eq!(e.stash_stats().ports_stashed, 0);
    e.advance(10);
    assert_eq!(e.stash_take(skey(vm0, a, 443), 5), None);
    e.check_invariants().expect("invariants");
}

#[test]
fn r4_3_stash_only_where_the_nsg_allows_every_source_port() {
    let nsg = r#"
[[nsg]]
name = "n"
nics = ["vm-0"]
[[nsg.rules]]
name = "deny-c"
priority = 100
direction = "outbound"
access = "deny"
protocol = "tcp"
destinations = ["198.51.100.9/32"]
[[nsg.rules]]
name = "d-from-high-ports"
priority = 200
direction = "outbound"
access = "allow"
protocol = "tcp"
destinations = ["198.51.100.10/32"]
source_ports = ["1024-65535"]
[[nsg.rules]]
name = "deny-d"
priority = 300
direction = "outbound"
access = "deny"
protocol = "tcp"
destinations = ["198.51.100.10/32"]
"#;
    let mut c = pool_config_long_idle(1);
    let extra = snatgw_core::ConfigFile::from_toml(nsg).expect("nsg");
    c.nsg = extra.nsg;
    let mut e = Engine::new(Topology::from_config(c.clone()).expect("valid"), 0).expect("e");
    let vm = private_u32(0);
    let (a, cc, d) = (ip(A), ip(C), ip(D));
    assert!(e.stash_take(skey(vm, a, 443), 5).is_some(), "allowed");
    assert_eq!(e.stash_take(skey(vm, cc, 443), 5), None, "R4.3: denied");
    assert_eq!(
        e.stash_take(skey(vm, d, 443), 5),
        None,
        "allowed for some source ports only"
    );
    assert_eq!(e.stash_take(skey(vm, ip("10.0.9.9"), 443), 5), None, "R1.7");
    // A new policy denying A voids A's stash.
    let mut c2 = c.clone();
    c2.nsg[0].rules[0].destinations = vec!["198.51.100.7/32".into()];
    e.apply(1, Topology::from_config(c2).expect("valid"))
        .expect("apply");
    assert_eq!(e.stash_voided(), vec![skey(vm, a, 443)]);
    e.check_invariants().expect("invariants");
}

#[test]
fn r5_1_no_stash_toward_a_client_of_an_inbound_flow() {
    let mut e = reference();
    e.set_journal(true);
    let (client, fe1) = (ip("198.51.100.50"), ip("203.0.113.20"));
    // A client connects to fe1:80; the member answers from its port 80 through the frontend.
    let member = match inb(&mut e, 1, Packet::tcp(client, 5555, fe1, 80, SYN)) {
        Verdict::Translate { addr, port: 80 } => addr,
        v => panic!("R5.1: not balanced: {v:?}"),
    };
    assert_eq!(
        e.stash_take(skey(member, client, 5555), 4),
        None,
        "R5.1: a packet from port 80 to the client takes the inbound flow's way back"
    );
    // A stash toward a client port with no inbound flow yet; then that client port connects
    // to fe1:80 and lands on the member (tried port by port: the member is chosen by hash).
    let mut landed = None;
    for cport in 6000..6100 {
        let k = skey(member, client, cport);
        let g = e
            .stash_take(k, 4)
            .expect("no inbound flow from that port yet");
        match inb(&mut e, 1, Packet::tcp(client, cport, fe1, 80, SYN)) {
            Verdict::Translate { addr, .. } if addr == member => {
                landed = Some((k, g));
                break;
            }
            _ => e.stash_return(k, &g.pports),
        }
    }
    let (k, g) = landed.expect("some client port lands on the member");
    journal(&mut e);
    // The fast path reports a flow from port 80 to that client port: the inbound flow's
    // return path owns the 5-tuple; refused, and the port leaves the stash.
    let f = kflow(k, 80, g.public, g.pports[0]);
    assert_eq!(e.stash_opened(1, &f), StashOpen::Refused);
    assert!(!e.stash_ports(k).contains(&g.pports[0]));
    assert!(matches!(
        &journal(&mut e)[..],
        [FlowChange::Closed { key, cause: EndCause::Reclaimed, .. }] if *key == f
    ));
    // From another source port, the same destination is an ordinary flow.
    let f2 = kflow(k, 1000, g.public, g.pports[1]);
    assert_eq!(e.stash_opened(1, &f2), StashOpen::Opened);
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_3_returned_stash_ports_have_no_release_history() {
    let mut e = pool_long_idle(2);
    let (vm, a) = (private_u32(0), ip(A));
    let key = skey(vm, a, 443);
    let g = e.stash_take(key, 5).expect("a grant");
    let (_, other) = block(&e, "vm-1");
    let foreign = *other.first().expect("vm-1's block");
    e.stash_return(key, &[g.pports[1], g.pports[3], 80, g.pports[1], foreign]);
    assert_eq!(
        e.stash_ports(key),
        vec![g.pports[0], g.pports[2], g.pports[4]]
    );
    assert_eq!(e.stash_stats().returned, 2);
    assert_eq!(e.stash_stats().ports_stashed, 3);
    assert_eq!(
        e.instance("vm-0").expect("vm-0").used[0],
        0,
        "R2.3: stashed ports are held by no flow"
    );
    assert!(
        releases_toward(&e, a).is_empty(),
        "never on the wire: no release for the destination"
    );
    // Returned to another key: ignored.
    e.stash_return(skey(vm, ip(B), 443), &g.pports);
    assert_eq!(e.stash_stats().ports_stashed, 3);
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_3_returned_stash_ports_keep_the_release_history_they_were_taken_from() {
    // 32 ports (R2.8, 801 instances): every port is released toward A at 17 (RST at 2).
    let mut e = pool_long_idle(801);
    let (vm, a) = (private_u32(0), ip(A));
    for k in 0..32 {
        syn(&mut e, 1, vm, 1000 + k, a, 443);
    }
    for k in 0..32 {
        out(&mut e, 2, Packet::tcp(vm, 1000 + k, a, 443, RST));
    }
    e.advance(2 + RST_DELAY);
    let before = releases_toward(&e, a);
    assert_eq!(before.len(), 32);
    assert!(before.iter().all(|&(_, at)| at == 2 + RST_DELAY));
    let key = skey(vm, a, 443);
    let g = e.stash_take(key, 100).expect("a grant");
    assert_eq!(g.pports.len(), 24);
    // Exported: stashes are not, the releases their ports were taken from are.
    assert_eq!(releases_toward(&e, a), before);
    e.stash_return(key, &g.pports);
    assert_eq!(releases_toward(&e, a), before, "R2.3: the history is back");
    e.advance(2 + RST_DELAY + HISTORY);
    assert!(releases_toward(&e, a).is_empty());
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_2_restart_adopts_a_free_port_and_refuses_others() {
    // A fresh engine (as after a restart: no stash) gets the fast path's records.
    let mut e = pool_long_idle(2);
    e.set_journal(true);
    let (vm, a, b) = (private_u32(0), ip(A), ip(B));
    let (public, blk) = block(&e, "vm-0");
    let lo = *blk.first().expect("block");
    let (_, other) = block(&e, "vm-1");
    let ka = skey(vm, a, 443);

    // Free for A: adopted, journaled for the runtime to (re)install: the start's clean-up of
    // entries the engine did not know may have removed the kernel's.
    let f1 = kflow(ka, 100, public, lo + 100);
    assert_eq!(e.stash_opened(3, &f1), StashOpen::Adopted);
    assert!(is_live(&e, &f1));
    assert!(matches!(
        &journal(&mut e)[..],
        [FlowChange::Opened { key, by_fast_path: false, at: 3, .. }] if *key == f1
    ));
    // A repeated record of the same flow changes nothing and journals nothing.
    assert_eq!(e.stash_opened(3, &f1), StashOpen::Refused);
    assert!(journal(&mut e).is_empty());
    assert!(is_live(&e, &f1));

    // Busy for A: refused, its entries removed (a Closed without an Opened).
    let f2 = kflow(ka, 101, public, lo + 100);
    assert_eq!(e.stash_opened(3, &f2), StashOpen::Refused);
    assert!(!is_live(&e, &f2));
    assert_eq!(
        journal(&mut e),
        vec![FlowChange::Closed {
            at: 3,
            instance: "vm-0".into(),
            slot: 0,
            key: f2,
            cause: EndCause::Reclaimed,
        }]
    );
    // The same 5-tuple as a live flow, another port: refused.
    let f3 = kflow(ka, 100, public, lo + 101);
    assert_eq!(e.stash_opened(3, &f3), StashOpen::Refused);
    // Another instance's port (R2.4), a port below the range, another address: refused.
    let f4 = kflow(ka, 102, public, *other.first().expect("b"));
    assert_eq!(e.stash_opened(3, &f4), StashOpen::Refused);
    assert_eq!(
        e.stash_opened(3, &kflow(ka, 103, public, 80)),
        StashOpen::Refused
    );
    assert_eq!(
        e.stash_opened(3, &kflow(ka, 104, ip("192.0.2.99"), lo + 5)),
        StashOpen::Refused
    );
    // An unknown source: refused, journaled without an instance.
    let f5 = kflow(skey(ip("10.0.200.1"), a, 443), 105, public, lo + 6);
    assert_eq!(e.stash_opened(3, &f5), StashOpen::Refused);
    let j = journal(&mut e);
    assert!(matches!(
        j.last(),
        Some(FlowChange::Closed { slot: u32::MAX, instance, key, .. }) if instance.is_empty() && *key == f5
    ));
    // A port stashed for B is free for A: adopted, and stays in B's stash (R2.3 sharing).
    let gb = e.stash_take(skey(vm, b, 443), 3).expect("B");
    assert_eq!(
        gb.pports[0],
        lo + 100,
        "R2.3: B's stash takes the port A's flow uses first"
    );
    let shared = gb.pports[1];
    let f6 = kflow(ka, 106, public, shared);
    assert_eq!(e.stash_opened(3, &f6), StashOpen::Adopted);
    assert_eq!(e.stash_ports(skey(vm, b, 443)), gb.pports);
    // A SYN the engine decides for A never gets an adopted port.
    let (_, p) = translated(tcp_syn(&mut e, 3, vm, 200, a, 443));
    assert!(p != lo + 100 && p != shared);
    let st = e.stash_stats();
    assert_eq!((st.adopted, st.refused, st.opened), (2, 7, 0));
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_1_journal_marks_fast_path_flows() {
    let mut e = pool_long_idle(1);
    e.set_journal(true);
    let (vm, a) = (private_u32(0), ip(A));
    let (public, _) = block(&e, "vm-0");
    syn(&mut e, 1, vm, 1000, a, 443);
    let g = e.stash_take(skey(vm, a, 443), 2).expect("grant");
    let f = kflow(skey(vm, a, 443), 1001, public, g.pports[0]);
    assert_eq!(e.stash_opened(1, &f), StashOpen::Opened);
    let flags: Vec<bool> = journal(&mut e)
        .iter()
        .filter_map(|c| match c {
            FlowChange::Opened { by_fast_path, .. } => Some(*by_fast_path),
            _ => None,
        })
        .collect();
    assert_eq!(flags, vec![false, true]);
    // Restored flows are the engine's: not the fast path's.
    let st = e.export_state();
    let mut fresh = pool_long_idle(1);
    fresh.set_journal(true);
    assert_eq!(fresh.import_state(&st).flows, 2);
    assert!(journal(&mut fresh).iter().all(|c| matches!(
        c,
        FlowChange::Opened {
            by_fast_path: false,
            ..
        }
    )));
    assert_eq!(
        fresh.stash_stats().ports_stashed,
        0,
        "stashes are not exported"
    );
    fresh.check_invariants().expect("invariants");
}

#[test]
fn stash_demand_counts_engine_decided_tcp_flows_while_enabled() {
    let mut e = pool_long_idle(1);
    let (vm, a, b) = (private_u32(0), ip(A), ip(B));
    syn(&mut e, 1, vm, 1000, a, 443);
    assert!(e.stash_demand().is_empty(), "off by default");
    e.set_stash_enabled(true);
    for k in 0..3 {
        syn(&mut e, 1, vm, 1100 + k, a, 443);
    }
    syn(&mut e, 1, vm, 1200, b, 80);
    translated(out(&mut e, 1, Packet::udp(vm, 1300, b, 53)));
    // A retransmitted SYN is no new flow.
    syn(&mut e, 1, vm, 1200, b, 80);
    // A flow from a stash is not demand.
    let (public, _) = block(&e, "vm-0");
    let g = e.stash_take(skey(vm, a, 443), 1).expect("grant");
    e.stash_opened(1, &kflow(skey(vm, a, 443), 1400, public, g.pports[0]));
    assert_eq!(
        e.stash_demand(),
        vec![(skey(vm, a, 443), 3), (skey(vm, b, 80), 1)]
    );
    assert!(e.stash_demand().is_empty());
    // Bounded: at most STASH_DEMAND_CAP destinations between two calls.
    let cap = snatgw_core::engine::STASH_DEMAND_CAP;
    for k in 0..(cap as u32 + 10) {
        let dst = ip("203.0.113.0") + 100_000 + k;
        syn(&mut e, 2, vm, 7, dst, 443);
    }
    assert_eq!(e.stash_demand().len(), cap);
    assert_eq!(e.stash_stats().demand_dropped, 10);
}

// ---------------------------------------------------------------------------------------
// Random interleavings (R2.2, R2.4, invariants).

#[derive(Debug, Clone)]
enum Op {
    /// A SYN the engine decides: instance, destination, source port.
    Syn(u8, u8, u16),
    /// That many SYNs to one destination at once, from source ports counting up.
    Burst(u8, u8, u16, u8),
    /// `stash_take`: instance, destination, count.
    Take(u8, u8, u8),
    /// The fast path opens a flow from its ring: instance, destination, source port.
    Open(u8, u8, u16),
    /// A record for a port not from the ring (restart-like): instance, destination, source
    /// port, port offset in the block.
    Stray(u8, u8, u16, u16),
    /// The fast path gives back some ports of a ring: instance, destination, count.
    Return(u8, u8, u8),
    /// A RST for the n-th live flow, seen by the fast path at now - lag (or by the engine).
    Rst(u16, u8, bool),
    /// Time passes.
    Advance(u8),
    /// The pool grows (R2.9) or shrinks (R2.10).
    Tier(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..2u8, 0..3u8, 1000..1400u16).prop_map(|(i, d, s)| Op::Syn(i, d, s)),
        1 => (0..2u8, 0..3u8, 10_000..60_000u16, 1..90u8).prop_map(|(i, d, s, n)| Op::Burst(i, d, s, n)),
        3 => (0..2u8, 0..3u8, 1..60u8).prop_map(|(i, d, n)| Op::Take(i, d, n)),
        5 => (0..2u8, 0..3u8, 2000..2400u16).prop_map(|(i, d, s)| Op::Open(i, d, s)),
        2 => (0..2u8, 0..3u8, 3000..3050u16, 0..1024u16).prop_map(|(i, d, s, p)| Op::Stray(i, d, s, p)),
        2 => (0..2u8, 0..3u8, 1..10u8).prop_map(|(i, d, n)| Op::Return(i, d, n)),
        2 => (any::<u16>(), 0..3u8, any::<bool>()).prop_map(|(n, l, k)| Op::Rst(n, l, k)),
        2 => (0..20u8).prop_map(Op::Advance),
        1 => any::<bool>().prop_map(Op::Tier),
    ]
}

const DSTS: [&str; 3] = [A, B, C];

/// A SYN from vm-`i` to destination `d` through the engine: a port it gets is in the block
/// (R2.4) and in no ring of that destination (R2.2); with none, the destination's ports are
/// all busy or stashed (R2.6).
fn syn_checked(
    e: &mut Engine,
    rings: &HashMap<StashKey, Vec<u16>>,
    now: u32,
    i: u8,
    d: u8,
    sport: u16,
) -> Result<(), TestCaseError> {
    let vm = private_u32(i as usize);
    let dst = ip(DSTS[d as usize]);
    let k = skey(vm, dst, 443);
    let ring = rings.get(&k).map_or(&[][..], |r| &r[..]);
    match tcp_syn(e, now, vm, sport, dst, 443) {
        Verdict::Translate { port, .. } => {
            prop_assert!(block(e, &format!("vm-{i}")).1.contains(&port), "R2.4");
            prop_assert!(
                !ring.contains(&port),
                "R2.2: a SYN got a port of its destination's ring"
            );
        }
        Verdict::Drop(r) => {
            let busy = ports_toward(e, vm, dst, 443).len() + ring.len();
            prop_assert_eq!(
                busy,
                block(e, &format!("vm-{i}")).1.len(),
                "dropped as {:?}",
                r
            );
            // R2.6: an exhaustion only with an empty ring; else the stash may be opening.
            let want = if ring.is_empty() {
                DropReason::PortsExhausted
            } else {
                DropReason::PortReserve
            };
            prop_assert_eq!(r, want);
        }
        v => prop_assert!(false, "unexpected {:?}", v),
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let cfg = |n: usize| {
        let mut c = pool_config(n);
        c.gateway.idle_timeout_secs = 60;
        c.gateway.rst_timeout_secs = 5;
        Topology::from_config(c).expect("valid")
    };
    // 201 instances: 128 ports each; 401: 64 (R2.8). Small blocks, so destinations run out
    // of ports and stray records find busy ports.
    let mut e = Engine::new(cfg(201), 0).expect("engine");
    e.set_journal(true);
    let mut now = 0u32;
    // The fast path's rings: ports the engine granted, per key, in order.
    let mut rings: HashMap<StashKey, Vec<u16>> = HashMap::new();
    let mut grown = false;
    for op in ops {
        match op {
            Op::Syn(i, d, s) => syn_checked(&mut e, &rings, now, i, d, s)?,
            Op::Burst(i, d, s, n) => {
                for k in 0..u16::from(n) {
                    syn_checked(&mut e, &rings, now, i, d, s + k)?;
                }
            }
            Op::Take(i, d, n) => {
                let k = skey(private_u32(i as usize), ip(DSTS[d as usize]), 443);
                if let Some(g) = e.stash_take(k, u32::from(n)) {
                    prop_assert!(g.pports.len() <= n as usize && !g.pports.is_empty());
                    let blk = block(&e, &format!("vm-{i}")).1;
                    prop_assert!(g.pports.iter().all(|p| blk.contains(p)), "R2.4");
                    rings.entry(k).or_default().extend(g.pports);
                }
            }
            Op::Open(i, d, s) => {
                let k = skey(private_u32(i as usize), ip(DSTS[d as usize]), 443);
                let Some(r) = rings.get_mut(&k).filter(|r| !r.is_empty()) else {
                    continue;
                };
                let port = r.remove(0);
                let (public, _) = block(&e, &format!("vm-{i}"));
                let f = kflow(k, s, public, port);
                let res = e.stash_opened(now, &f);
                // Only a 5-tuple already live can keep a ring's port from its flow.
                if res != StashOpen::Opened {
                    prop_assert_eq!(res, StashOpen::Refused);
                }
            }
            Op::Stray(i, d, s, off) => {
                let k = skey(private_u32(i as usize), ip(DSTS[d as usize]), 443);
                let (public, blk) = block(&e, &format!("vm-{i}"));
                let port = *blk.iter().nth(off as usize % blk.len()).expect("port");
                // A port of the key's own ring is the kernel's to take.
                if let Some(r) = rings.get_mut(&k) {
                    r.retain(|&p| p != port);
                }
                let f = kflow(k, s, public, port);
                e.stash_opened(now, &f);
            }
            Op::Return(i, d, n) => {
                let k = skey(private_u32(i as usize), ip(DSTS[d as usize]), 443);
                let Some(r) = rings.get_mut(&k) else { continue };
                let n = (n as usize).min(r.len());
                let back: Vec<u16> = r.drain(r.len() - n..).collect();
                e.stash_return(k, &back);
            }
            Op::Rst(n, lag, kernel) => {
                let live: Vec<FlowKey> = e.live_flow_keys().map(|(_, k)| k).collect();
                if live.is_empty() {
                    continue;
                }
                let k = live[n as usize % live.len()];
                if kernel {
                    e.tcp_event_at(
                        now.saturating_sub(u32::from(lag)),
                        &k,
                        RST,
                        Direction::Inbound,
                    );
                } else {
                    out(
                        &mut e,
                        now,
                        Packet::tcp(k.src, k.sport, k.dst, k.dport, RST),
                    );
                }
            }
            Op::Advance(s) => {
                now += u32::from(s);
                e.advance(now);
            }
            Op::Tier(up) => {
                if up == grown {
                    continue;
                }
                grown = up;
                e.apply(now, cfg(if up { 401 } else { 201 }))
                    .expect("apply");
            }
        }
        // The runtime stops using voided rings; what it hands back later is ignored.
        for k in e.stash_voided() {
            if let Some(r) = rings.remove(&k) {
                e.stash_return(k, &r);
            }
        }
        // The rings are exactly the engine's stashes.
        for (k, r) in &rings {
            prop_assert_eq!(&e.stash_ports(*k), r);
        }
        let total: usize = rings.values().map(Vec::len).sum();
        prop_assert_eq!(e.stash_stats().ports_stashed as usize, total);
        // R2.2 on the wire: no public 5-tuple twice, no stashed port busy for its destination.
        let mut seen = HashSet::new();
        for (_, f) in e.live_flow_keys() {
            prop_assert!(seen.insert((f.public, f.pport, f.dst, f.dport)), "R2.2");
            let k = skey(f.src, f.dst, f.dport);
            prop_assert!(!rings.get(&k).is_some_and(|r| r.contains(&f.pport)), "R2.2");
        }
        if let Err(err) = e.check_invariants() {
            return Err(TestCaseError::fail(format!("invariants: {err}")));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Random interleavings of SYNs, takes, fast-path opens (from a ring or stray), returns,
    /// RSTs (in the engine or from the fast path, late), time and tier changes: public
    /// 5-tuples stay unique (R2.2), every port stays in its instance's block (R2.4), the
    /// fast path's rings stay the engine's stashes, and block reference counts match flows
    /// and stashes (the invariant check).
    #[test]
    fn r2_2_stash_interleavings_keep_ports_unique_and_counted(ops in prop::collection::vec(op(), 1..200)) {
        run(ops)?;
    }
}

/// R2.3 with a stash of another destination: "never a port new to the instance while one of its
/// ports is free for that destination". The instance's one flow holds Q (to C); A's stash takes
/// Q and then ports no flow holds; a SYN to B must get Q, which a flow holds and which is free
/// for B, not one of the ports only A's stash holds, and the used ports stay one.
#[test]
fn r2_3_a_port_a_flow_holds_comes_before_ports_only_a_stash_holds() {
    let mut e = pool_long_idle(2);
    let (vm, a, b, c) = (private_u32(0), ip(A), ip(B), ip(C));
    let (_, q) = translated(tcp_syn(&mut e, 1, vm, 5000, c, 443));
    let g = e.stash_take(skey(vm, a, 443), 16).expect("A's stash");
    assert_eq!(
        g.pports[0], q,
        "R2.3: A's stash starts with the port a flow holds"
    );
    let (_, pb) = translated(tcp_syn(&mut e, 1, vm, 5001, b, 443));
    assert_eq!(
        pb, q,
        "R2.3: B gets the port a flow holds, not one only A's stash holds"
    );
    assert_eq!(
        e.instance("vm-0").expect("vm-0").used[0],
        1,
        "R2.3: one port held by flows"
    );
    e.check_invariants().expect("invariants");
}
