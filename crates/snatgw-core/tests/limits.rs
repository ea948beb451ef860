//! Operating limits and trust (SPEC §9) and issue #12, at engine level: direction by side
//! (R9.1), flow limits (R9.2), aggregated storm events (R9.3), bounded timer work with exact
//! verdicts (R9.4), and more than 65 535 flows on one SNAT port.
//! Expected values come from the SPEC rules (limits, tiers, timers), not from the engine.

mod common;

use common::*;
use snatgw_core::{DropReason, Engine, EventKind, Packet, Topology, Verdict, EXPIRY_BUDGET};

/// One availability set on 192.0.2.1 with `vm-a` (10.0.1.1) and `vm-b` (10.0.1.2): 1024
/// ports each (R2.8, pool of 2). `extra` is appended to `[gateway]`, `a_extra` to vm-a.
fn two_vms(gateway_extra: &str, a_extra: &str) -> Engine {
    engine(&format!(
        r#"
[gateway]
seed = 1
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.1"]
idle_timeout_secs = 60
fin_timeout_secs = 10
rst_timeout_secs = 5
port_reuse_history_secs = 0
{gateway_extra}

[[availability_set]]
name = "as"

[[instance]]
name = "vm-a"
private_ip = "10.0.1.1"
availability_set = "as"
{a_extra}

[[instance]]
name = "vm-b"
private_ip = "10.0.1.2"
availability_set = "as"
"#
    ))
}

const A: &str = "10.0.1.1";
const B: &str = "10.0.1.2";
const PUB: &str = "192.0.2.1";

/// The i-th of many distinct remote endpoints (never inside the VNet).
fn remote(i: u32) -> (u32, u16) {
    (
        ip("198.51.100.0") + (i / 50_000),
        1000 + (i % 50_000) as u16,
    )
}

#[test]
fn r9_1_public_side_vnet_source_is_dropped_and_creates_no_flow() {
    let mut e = two_vms("", "");
    // An internet host claiming vm-a's address, towards the gateway's public IP and towards
    // an internet address: inbound either way, never a flow.
    for dst in [ip(PUB), ip("203.0.113.9")] {
        let v = inb(&mut e, 1, Packet::tcp(ip(A), 40000, dst, 80, SYN));
        assert_eq!(v, Verdict::Drop(DropReason::VnetSourceFromPublic));
        let v = inb(&mut e, 1, Packet::udp(ip(A), 53, dst, 1024));
        assert_eq!(v, Verdict::Drop(DropReason::VnetSourceFromPublic));
    }
    assert_eq!(e.live_flows(), 0);
    assert_eq!(
        e.global_stats().drops[DropReason::VnetSourceFromPublic as usize],
        4
    );
    let a = e.instance("vm-a").unwrap();
    assert_eq!(a.used, [0, 0]);
    assert_eq!(a.stats[0].conn_ok + a.stats[1].conn_ok, 0);
}

#[test]
fn r9_1_private_side_source_that_is_no_instance_is_dropped() {
    let mut e = two_vms("", "");
    for dst in [ip("198.51.100.7"), ip(B)] {
        let v = out(&mut e, 1, Packet::udp(ip("10.0.9.9"), 53, dst, 53));
        assert_eq!(v, Verdict::Drop(DropReason::UnknownSource));
    }
    assert_eq!(e.live_flows(), 0);
    // An instance inside the VNet still passes untranslated (R1.7).
    assert_eq!(
        out(&mut e, 1, Packet::udp(ip(A), 53, ip(B), 53)),
        Verdict::Pass
    );
}

#[test]
fn r9_2_instance_flow_limit_refuses_only_new_flows_of_that_instance() {
    let mut e = two_vms("", "max_flows = 10");
    let mut first = Vec::new();
    for i in 0..10 {
        let (d, dp) = remote(i);
        first.push(translated(out(&mut e, 0, Packet::udp(ip(A), 5000, d, dp))));
    }
    // The 11th flow is over the limit: dropped, counted, recorded; no port taken.
    let (d, dp) = remote(10);
    assert_eq!(
        out(&mut e, 1, Packet::udp(ip(A), 5000, d, dp)),
        Verdict::Drop(DropReason::FlowLimit)
    );
    let a = e.instance("vm-a").unwrap();
    assert_eq!(a.flows, [0, 10]);
    assert_eq!(a.stats[1].drops[DropReason::FlowLimit as usize], 1);
    assert_eq!(a.stats[1].conn_ok, 10);
    assert_eq!(a.stats[1].conn_fail, 0, "not a port failure (R2.6)");
    let ev = e.drain_events();
    assert!(ev.iter().any(|ev| matches!(
        &ev.kind,
        EventKind::FlowLimit { instance, limit: 10, scope: snatgw_core::LimitScope::Instance, .. } if &**instance == "vm-a"
    )));
    // Existing flows keep translating, both ways (R9.2: nothing else changes).
    let (d0, dp0) = remote(0);
    assert_eq!(
        translated(out(&mut e, 2, Packet::udp(ip(A), 5000, d0, dp0))),
        first[0]
    );
    let (pa, pp) = first[0];
    assert_eq!(
        translated(inb(&mut e, 2, Packet::udp(d0, dp0, pa, pp))),
        (ip(A), 5000)
    );
    // The neighbour is untouched.
    for i in 0..20 {
        let (d, dp) = remote(i);
        translated(out(&mut e, 2, Packet::udp(ip(B), 6000, d, dp)));
    }
    // Flows 1..9 were last seen at 0: idle at 60 (R3.4); flow 0 at 2. At 59 still full.
    assert_eq!(
        out(&mut e, 59, Packet::udp(ip(A), 5000, d, dp)),
        Verdict::Drop(DropReason::FlowLimit)
    );
    // At 60 nine flows are gone, so the new one fits, exactly on time.
    translated(out(&mut e, 60, Packet::udp(ip(A), 5000, d, dp)));
    e.check_invariants().unwrap();
}

#[test]
fn r9_2_gateway_flow_limit_is_shared_by_all_instances() {
    let mut e = two_vms("max_flows = 15", "");
    for i in 0..10 {
        let (d, dp) = remote(i);
        translated(out(&mut e, 0, Packet::udp(ip(A), 5000, d, dp)));
    }
    for i in 0..5 {
        let (d, dp) = remote(i);
        translated(out(&mut e, 0, Packet::udp(ip(B), 5000, d, dp)));
    }
    let (d, dp) = remote(99);
    assert_eq!(
        out(&mut e, 0, Packet::tcp(ip(B), 7000, d, dp, SYN)),
        Verdict::Drop(DropReason::FlowLimit)
    );
    assert!(e.drain_events().iter().any(|ev| matches!(
        ev.kind,
        EventKind::FlowLimit {
            scope: snatgw_core::LimitScope::Gateway,
            limit: 15,
            ..
        }
    )));
    assert_eq!(e.live_flows(), 15);
    e.check_invariants().unwrap();
}

#[test]
fn r9_3_exhaustion_storm_gives_one_event_then_summaries_with_exact_counts() {
    // 801 instances share the address: 32 ports each (R2.8). 32 flows to one destination
    // use them all; then 100 000 more SYNs to it in 10 s all fail (R2.6).
    let mut c = pool_config(801);
    c.gateway.event_interval_secs = 10;
    let mut e = Engine::new(Topology::from_config(c).unwrap(), 0).unwrap();
    let (vm, dst) = (private_u32(0), ip("203.0.113.100"));
    for sport in 0..32u16 {
        syn(&mut e, 0, vm, 10_000 + sport, dst, 443);
    }
    let mut failed = 0u64;
    for k in 0..100_000u32 {
        let now = k / 10_000; // seconds 0..9
        let sport = 20_000 + (k % 40_000) as u16;
        let v = out(&mut e, now, Packet::tcp(vm, sport, dst, 443, SYN));
        assert_eq!(v, Verdict::Drop(DropReason::PortsExhausted));
        failed += 1;
    }
    // The interval [0, 10) closes when the engine reaches 10.
    e.advance(10);
    let events: Vec<_> = e
        .drain_events()
        .into_iter()
        .filter(|ev| matches!(ev.kind, EventKind::Exhaustion { .. }))
        .collect();
    // One at once (at 0), one summary when the interval closes (at 10) with the rest.
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(!events[0].summary && events[0].count == 1 && events[0].time == 0);
    assert!(events[1].summary && events[1].since == 0 && events[1].time == 10);
    assert_eq!(events.iter().map(|ev| ev.count).sum::<u64>(), failed);
    // A quiet interval adds nothing.
    e.advance(30);
    assert!(!e
        .drain_events()
        .iter()
        .any(|ev| matches!(ev.kind, EventKind::Exhaustion { .. })));
    // Counters stay exact.
    let r = e.instance("vm-0").unwrap();
    assert_eq!(r.stats[0].conn_fail, failed);
    assert_eq!(
        r.stats[0].drops[DropReason::PortsExhausted as usize],
        failed
    );
}

#[test]
fn r9_4_mass_expiry_is_done_in_bounded_steps_with_exact_verdicts() {
    // 100 000 UDP flows of vm-a, all created at second 0 (idle 60 s), plus vm-b's 1024 flows
    // to one destination D using every port of its block (R2.4).
    // vm-b's flows come first, so the bounded steps at 60 reach them last.
    let mut e = two_vms("", "");
    let d = ip("203.0.113.50");
    let mut b_ports = Vec::new();
    for sport in 0..1024u16 {
        b_ports.push(translated(out(
            &mut e,
            0,
            Packet::udp(ip(B), 10_000 + sport, d, 53),
        )));
    }
    let n = 100_000u32;
    let mut first = None;
    for i in 0..n {
        let (d, dp) = remote(i);
        let t = translated(out(&mut e, 0, Packet::udp(ip(A), 5000, d, dp)));
        first.get_or_insert(t);
    }
    let (pub0, port0) = first.unwrap();
    assert_eq!(pub0, ip(PUB));
    assert_eq!(
        out(&mut e, 59, Packet::udp(ip(B), 30_000, d, 53)),
        Verdict::Drop(DropReason::PortsExhausted),
        "all 1024 ports busy for D at 59"
    );
    assert_eq!(e.next_deadline(), Some(60));
    let live = e.live_flows();

    // Second 60: everything is due. One packet does at most one step of timer work.
    let (d0, dp0) = remote(0);
    assert_eq!(
        inb(&mut e, 60, Packet::udp(d0, dp0, pub0, port0)),
        Verdict::Drop(DropReason::UnsolicitedInbound),
        "return traffic of a flow due at 60 is not translated (R3.4, R3.8)"
    );
    let removed = live - e.live_flows();
    assert!(
        removed <= EXPIRY_BUDGET as usize + 1,
        "one call removed {removed} flows"
    );
    assert!(e.behind());
    assert_eq!(e.next_deadline(), Some(60), "still work to do at 60");

    // While behind, a new flow to D gets a port: D's due flows are reaped first (R2.7).
    let before = e.live_flows();
    let v = translated(out(&mut e, 60, Packet::udp(ip(B), 30_000, d, 53)));
    assert!(b_ports.contains(&v), "a port of vm-b's block");
    assert!(
        before - e.live_flows() <= EXPIRY_BUDGET as usize + 1024,
        "bounded by the budget and D's chain"
    );
    // An outbound packet of a due flow starts a new flow rather than reviving the old one.
    let (d1, dp1) = remote(1);
    translated(out(&mut e, 60, Packet::udp(ip(A), 5000, d1, dp1)));
    let listed = e.flows(Some("vm-a")).len();
    assert_eq!(listed, 1, "due flows are not listed");
    e.check_invariants().unwrap();

    // Working the backlog off takes many bounded steps, then the engine is caught up.
    let mut steps = 0;
    while !e.advance_bounded(60, EXPIRY_BUDGET) {
        steps += 1;
        assert!(steps < 10_000);
    }
    // 101 024 entries less the few budgets' worth already done, EXPIRY_BUDGET per step.
    let expected = (n as usize + 1024) / EXPIRY_BUDGET as usize;
    assert!(
        steps + 10 >= expected && steps <= expected,
        "{steps} steps, about {expected} expected"
    );
    assert!(!e.behind());
    assert_eq!(e.live_flows(), 2, "the two flows made at 60");
    let ended: u64 = e.global_stats().flows_ended.iter().sum();
    assert_eq!(ended, u64::from(n) + 1024);
    assert!(
        e.next_deadline().is_some_and(|t| t > 60 && t <= 120),
        "next work after 60, at the latest when the flows made at 60 idle out (120): {:?}",
        e.next_deadline()
    );
    e.check_invariants().unwrap();
}

#[test]
fn i12_more_than_65535_flows_on_one_port_then_a_second_port() {
    // One UDP socket (vm-a:5000) talks to 70 000 distinct endpoints: flows to different
    // destinations share ports (R2.3), so all 70 000 sit on the one port it uses.
    let mut e = two_vms("", "");
    let n = 70_000u32;
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..n {
        let (d, dp) = remote(i);
        ports.insert(translated(out(&mut e, 0, Packet::udp(ip(A), 5000, d, dp))).1);
    }
    assert_eq!(ports.len(), 1, "R2.3: one port serves every destination");
    let a = e.instance("vm-a").unwrap();
    assert_eq!(a.used[1], 1);
    assert_eq!(a.flows[1], n, "no wrap at 65 536");
    assert_eq!(a.stats[1].conn_ok, u64::from(n));
    e.check_invariants().unwrap();
    // Four sockets to one echo server need four ports: the used one and three more.
    let echo = ip("203.0.113.101");
    let mut four = std::collections::BTreeSet::new();
    for s in 0..4u16 {
        four.insert(translated(out(&mut e, 1, Packet::udp(ip(A), 6000 + s, echo, 7))).1);
    }
    assert_eq!(four.len(), 4);
    assert_eq!(e.instance("vm-a").unwrap().used[1], 4);
    // Everything idles out at 60/61 (R3.4), and the block is whole again.
    e.advance(61);
    let a = e.instance("vm-a").unwrap();
    assert_eq!((a.used[1], a.flows[1]), (0, 0));
    let mut again = std::collections::BTreeSet::new();
    for s in 0..1024u16 {
        again.insert(translated(out(&mut e, 62, Packet::udp(ip(A), 7000 + s, echo, 7))).1);
    }
    assert_eq!(again.len(), 1024, "every port of the block is free again");
    e.check_invariants().unwrap();
}

#[test]
fn r6_3_flows_are_listed_in_bounded_pages_with_filters() {
    let mut e = two_vms("", "");
    for i in 0..300 {
        let (d, dp) = remote(i);
        translated(out(&mut e, 0, Packet::udp(ip(A), 5000, d, dp)));
    }
    for s in 0..20u16 {
        syn(&mut e, 0, ip(B), 7000 + s, ip("203.0.113.7"), 443);
    }
    // Pages of at most 64 slots each walk the whole table exactly once.
    let all = snatgw_core::FlowFilter::default();
    let (mut seen, mut cursor, mut pages) = (0, Some(0), 0);
    while let Some(c) = cursor {
        let (page, next) = e.flows_page(&all, c, 64, usize::MAX);
        assert!(page.len() <= 64);
        seen += page.len();
        cursor = next;
        pages += 1;
    }
    assert_eq!((seen, pages), (320, 5));
    // Filters: instance, protocol, destination, state; and a limit.
    let f = snatgw_core::FlowFilter {
        instance: Some("vm-b".into()),
        l4: Some(snatgw_core::L4::Tcp),
        dst: Some(ip("203.0.113.7")),
        dport: Some(443),
        state: Some("open"),
    };
    let (page, _) = e.flows_page(&f, 0, u32::MAX, 5);
    assert_eq!(page.len(), 5);
    assert!(page
        .iter()
        .all(|v| &*v.instance == "vm-b" && v.remote.1 == 443));
    assert_eq!(e.flows_page(&f, 0, u32::MAX, usize::MAX).0.len(), 20);
    let none = snatgw_core::FlowFilter {
        state: Some("closing"),
        ..f
    };
    assert!(e.flows_page(&none, 0, u32::MAX, usize::MAX).0.is_empty());
    // The busiest destinations: vm-b's 20 flows to one destination hold 20 ports.
    let busy = e.busiest_destinations(5);
    assert_eq!(busy.len(), 1, "{busy:?}");
    assert_eq!(
        (&*busy[0].0, busy[0].2, busy[0].3, busy[0].4),
        ("vm-b", ip("203.0.113.7"), 443, 20)
    );
}
