//! The flow journal and activity from outside the engine (a fast path): R3.2–R3.5 keep their
//! exact timing when packets bypass the engine, and every open, close and refusal is journaled.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::*;
use snatgw_core::{
    ActivitySource, Direction, DropReason, EndCause, Engine, FlowChange, FlowKey, Packet, Verdict,
};

const SERVER: &str = "198.51.100.7";

/// An activity source whose last-seen times the test sets, as a fast path's map would hold.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<FlowKey, u32>>>);

impl ActivitySource for Seen {
    fn last_seen(&mut self, key: &FlowKey) -> Option<u32> {
        self.0.lock().unwrap().get(key).copied()
    }
}

impl Seen {
    fn set(&self, k: FlowKey, t: u32) {
        self.0.lock().unwrap().insert(k, t);
    }
}

fn journal(e: &mut Engine) -> Vec<FlowChange> {
    let mut v = Vec::new();
    e.drain_journal(&mut v);
    v
}

fn opened_key(c: &[FlowChange]) -> FlowKey {
    match c {
        [FlowChange::Opened { key, .. }] => *key,
        other => panic!("expected one Opened, got {other:?}"),
    }
}

#[test]
fn r3_4_keepalives_seen_only_outside_the_engine_keep_the_flow_and_release_exactly() {
    let mut e = reference();
    e.set_journal(true);
    let seen = Seen::default();
    e.set_offload(Some(Box::new(seen.clone())));
    let (src, dst) = (ip("10.0.3.20"), ip(SERVER));
    let (pub_, pport) = translated(out(&mut e, 0, Packet::udp(src, 5000, dst, 53)));
    let key = opened_key(&journal(&mut e));
    assert_eq!(
        (key.src, key.sport, key.public, key.pport),
        (src, 5000, pub_, pport)
    );
    // Keepalives at 200 and 430 travel only through the fast path (the engine sees none).
    seen.set(key, 200);
    e.advance(239);
    e.advance(240); // the engine's own deadline (0 + 240): the outside says 200
    assert_eq!(
        e.live_flows(),
        1,
        "a fast-path keepalive at 200 keeps the flow past 240"
    );
    seen.set(key, 430);
    e.advance(439);
    e.advance(440);
    assert_eq!(e.live_flows(), 1, "and one at 430 past 440");
    e.advance(669);
    assert_eq!(e.live_flows(), 1, "alive one second before 430 + 240");
    e.advance(670);
    assert_eq!(e.live_flows(), 0, "gone at exactly 430 + 240 (R3.4)");
    match journal(&mut e).as_slice() {
        [FlowChange::Closed {
            at, key: k, cause, ..
        }] => {
            assert_eq!((*at, *k, *cause), (670, key, EndCause::Idle));
        }
        other => panic!("expected one Closed, got {other:?}"),
    }
    // Inbound return traffic to the released port is unsolicited now (R3.8).
    assert_eq!(
        inb(&mut e, 671, Packet::udp(dst, 53, pub_, pport)),
        Verdict::Drop(DropReason::UnsolicitedInbound)
    );
}

#[test]
fn r3_4_outside_activity_is_honoured_while_reaping_a_backlog() {
    // Behind on timers (R9.4), the allocator and lookups reap due flows: they ask too.
    let mut e = reference();
    let seen = Seen::default();
    e.set_offload(Some(Box::new(seen.clone())));
    e.set_journal(true);
    let (src, dst) = (ip("10.0.3.20"), ip(SERVER));
    out(&mut e, 0, Packet::udp(src, 5000, dst, 53));
    let key = opened_key(&journal(&mut e));
    seen.set(key, 100);
    // A decoy due in the same second, examined first (entries pop newest first), takes the
    // one unit of timer work the packet below may do, so the flow itself is reaped on lookup.
    out(&mut e, 0, Packet::udp(src, 5001, dst, 53));
    let decoy = opened_key(&journal(&mut e));
    e.set_expiry_budget(1);
    // A packet of the flow at 300 (> 0 + 240 but < 100 + 240): still the same translation.
    assert_eq!(
        out(&mut e, 300, Packet::udp(src, 5000, dst, 53)),
        Verdict::Translate {
            addr: key.public,
            port: key.pport
        }
    );
    assert!(e.behind(), "the lookup, not the timer, decided");
    match journal(&mut e).as_slice() {
        [FlowChange::Closed { key, at: 240, .. }] => assert_eq!(*key, decoy),
        other => panic!("only the decoy closes, got {other:?}"),
    }
}

#[test]
fn r3_3_rst_close_time_ignores_outside_activity() {
    let mut e = reference();
    let seen = Seen::default();
    e.set_offload(Some(Box::new(seen.clone())));
    e.set_journal(true);
    let (src, dst) = (ip("10.0.3.20"), ip(SERVER));
    syn(&mut e, 0, src, 40000, dst, 443);
    let key = opened_key(&journal(&mut e));
    out(&mut e, 10, Packet::tcp(src, 40000, dst, 443, RST));
    seen.set(key, 24); // the fast path saw a packet after the RST
    e.advance(24);
    assert_eq!(e.live_flows(), 1);
    e.advance(25);
    assert_eq!(e.live_flows(), 0, "released 15 s after the RST (R3.3)");
    assert!(matches!(
        journal(&mut e).as_slice(),
        [FlowChange::Closed {
            at: 25,
            cause: EndCause::Rst,
            ..
        }]
    ));
}

#[test]
fn r2_6_refused_flows_are_journaled_with_their_reason() {
    // vm-alone on default SNAT alone in its set: 1024 ports (R2.8) for one destination.
    let mut e = reference();
    e.set_journal(true);
    let (src, dst) = (ip("10.0.3.20"), ip(SERVER));
    let allocated = e.instance("vm-alone").unwrap().allocated;
    for i in 0..allocated {
        syn(&mut e, 1, src, 10000 + i as u16, dst, 443);
    }
    assert_eq!(
        out(&mut e, 1, Packet::tcp(src, 9999, dst, 443, SYN)),
        Verdict::Drop(DropReason::PortsExhausted)
    );
    let j = journal(&mut e);
    assert_eq!(j.len(), allocated as usize + 1);
    assert!(j[..allocated as usize]
        .iter()
        .all(|c| matches!(c, FlowChange::Opened { instance, .. } if &**instance == "vm-alone")));
    match &j[allocated as usize] {
        FlowChange::Refused {
            at, key, reason, ..
        } => {
            assert_eq!((*at, key.sport, key.pport), (1, 9999, 0));
            assert_eq!(*reason, DropReason::PortsExhausted);
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    // Journal off: nothing is queued.
    e.set_journal(false);
    syn(&mut e, 2, src, 8000, ip("198.51.100.8"), 443);
    assert!(journal(&mut e).is_empty());
}

#[test]
fn r6_1_packets_credited_from_outside_count_for_the_instance() {
    let mut e = reference();
    e.set_journal(true);
    let (src, dst) = (ip("10.0.3.20"), ip(SERVER));
    out(&mut e, 0, Packet::udp(src, 5000, dst, 53));
    let slot = match journal(&mut e).as_slice() {
        [FlowChange::Opened { slot, .. }] => *slot,
        other => panic!("{other:?}"),
    };
    assert_eq!(e.instance_slot("vm-alone"), Some(slot));
    let before = e.instance("vm-alone").unwrap();
    e.credit_packets(slot, 17, 1000, 900);
    let after = e.instance("vm-alone").unwrap();
    assert_eq!(
        after.stats[1].packets_out,
        before.stats[1].packets_out + 1000
    );
    assert_eq!(after.stats[1].packets_in, before.stats[1].packets_in + 900);
    assert_eq!(after.stats[0].packets_out, before.stats[0].packets_out);
}

/// An activity source that has seen nothing (a fast path that carried no packet yet).
struct Quiet;

impl ActivitySource for Quiet {
    fn last_seen(&mut self, _key: &FlowKey) -> Option<u32> {
        None
    }
}

/// `(opened?, key)` of each Opened and Closed entry, in queue order.
fn opens_and_closes(j: &[FlowChange]) -> Vec<(bool, FlowKey)> {
    j.iter()
        .filter_map(|c| match c {
            FlowChange::Opened { key, .. } => Some((true, *key)),
            FlowChange::Closed { key, .. } => Some((false, *key)),
            FlowChange::Refused { .. } => None,
        })
        .collect()
}

#[test]
fn r2_2_an_offload_learns_of_every_open_and_close_in_order_from_the_journal() {
    let mut e = reference();
    let (src, dst) = (ip("10.0.3.20"), ip(SERVER));
    out(&mut e, 0, Packet::udp(src, 5000, dst, 53));
    assert_eq!(
        e.journal_pending(),
        0,
        "journal off, no offload: nothing kept"
    );
    e.set_offload(Some(Box::new(Quiet)));
    assert!(e.has_offload());
    // Attached to a running engine: the live flows are what it installs first.
    let live: Vec<_> = e.live_flow_keys().collect();
    assert_eq!(live.len(), 1);
    let (slot, first) = live[0];
    assert_eq!(e.instance_slot("vm-alone"), Some(slot));
    assert_eq!((first.src, first.sport, first.dst), (src, 5000, dst));
    // An offload keeps the journal on even when the recorder's switch is off.
    e.set_journal(false);
    out(&mut e, 10, Packet::udp(src, 5001, dst, 53));
    assert_eq!(e.journal_pending(), 1);
    // 240 s idle (R3.4): the first flow goes at 240, the second at 250, in that order.
    e.advance(240);
    e.advance(250);
    let t = opens_and_closes(&journal(&mut e));
    assert_eq!(t.len(), 3, "{t:?}");
    assert!(t[0].0 && t[0].1.sport == 5001);
    assert_eq!(t[1], (false, first));
    assert!(!t[2].0 && t[2].1.sport == 5001);
    assert_eq!(e.live_flows(), 0);
    assert_eq!(e.live_flow_keys().count(), 0);
    // Removing the offload (journal off) stops the queue.
    e.set_offload(None);
    out(&mut e, 300, Packet::udp(src, 5002, dst, 53));
    assert_eq!(e.journal_pending(), 0);
}

#[test]
fn r2_2_a_released_port_is_closed_in_the_journal_before_its_new_owner_opens() {
    // vm-alone's 1024 ports (R2.8) all held for one destination at t=0; at 240 (R3.4 idle)
    // one new flow to that destination gets a released port in the same call that reaps them
    // (R9.4: the allocator reaps the destination's due flows first). The queue must hold the
    // old owner's Closed before the new owner's Opened, so a consumer applying it in order
    // ends with the new owner's translation and none of the old one's.
    let mut e = reference();
    e.set_offload(Some(Box::new(Quiet)));
    let (src, dst) = (ip("10.0.3.20"), ip(SERVER));
    let allocated = e.instance("vm-alone").unwrap().allocated;
    for i in 0..allocated {
        out(&mut e, 0, Packet::udp(src, 10000 + i as u16, dst, 443));
    }
    journal(&mut e);
    let (_, port) = translated(out(&mut e, 240, Packet::udp(src, 9999, dst, 443)));
    let t = opens_and_closes(&journal(&mut e));
    let opened = t.iter().position(|(o, _)| *o).expect("the new flow opened");
    assert_eq!(opened, t.len() - 1, "the Opened comes last: {}", t.len());
    let old = t[..opened]
        .iter()
        .position(|(o, k)| !o && k.pport == port && k.dst == dst)
        .expect("the port's old owner closed");
    assert!(old < opened);
    assert_eq!(t[opened].1.pport, port);
    assert_eq!(t[opened].1.sport, 9999);
}

// ---- Issue #17: FIN and RST a fast path translated, applied at the kernel's time. ----

const FIN: u8 = snatgw_core::tcp_flags::FIN;

/// A TCP flow of vm-as1 (10.0.3.10:4000 -> SERVER:443) opened at `t`, with the journal on,
/// and its key (what a fast path's event carries).
fn tcp_flow(e: &mut Engine, t: u32) -> FlowKey {
    e.set_journal(true);
    syn(e, t, ip("10.0.3.10"), 4000, ip(SERVER), 443);
    opened_key(&journal(e))
}

fn closed(e: &mut Engine) -> Vec<(u32, EndCause)> {
    journal(e)
        .into_iter()
        .filter_map(|c| match c {
            FlowChange::Closed { at, cause, .. } => Some((at, cause)),
            _ => None,
        })
        .collect()
}

#[test]
fn r3_2_fin_events_close_at_the_kernel_time_of_the_second_fin_plus_240_s() {
    // FIN out seen by the kernel at 100 (applied at once), FIN in at 110, applied only at
    // 112: the port goes at 110 + 240, not 112 + 240.
    let mut e = reference();
    let key = tcp_flow(&mut e, 0);
    e.advance(100);
    assert!(e.tcp_event_at(100, &key, FIN_ACK, Direction::Outbound));
    assert_eq!(e.flows(Some("vm-as1"))[0].state, "fin_out");
    e.advance(112);
    assert!(e.tcp_event_at(110, &key, FIN | ACK, Direction::Inbound));
    assert_eq!(e.flows(Some("vm-as1"))[0].state, "closing");
    assert_eq!(e.flows(Some("vm-as1"))[0].expires_at, 350);
    e.advance(349);
    assert_eq!(e.live_flows(), 1, "held until 110 + 240");
    e.advance(350);
    assert_eq!(e.live_flows(), 0);
    assert_eq!(closed(&mut e), vec![(350, EndCause::Fin)]);
    assert_eq!(e.global_stats().tcp_events_applied, 2);
}

#[test]
fn r3_3_rst_event_closes_at_its_kernel_time_plus_15_s_however_late_applied() {
    for (applied_at, dir) in [
        (10, Direction::Outbound),
        (20, Direction::Inbound),
        (24, Direction::Outbound),
    ] {
        let mut e = reference();
        let key = tcp_flow(&mut e, 0);
        e.advance(applied_at);
        assert!(e.tcp_event_at(10, &key, RST, dir));
        assert_eq!(e.flows(Some("vm-as1"))[0].expires_at, 25);
        e.advance(24);
        assert_eq!(
            e.live_flows(),
            1,
            "applied at {applied_at}: held until 10 + 15"
        );
        e.advance(25);
        assert_eq!(e.live_flows(), 0, "applied at {applied_at}: released at 25");
        assert_eq!(closed(&mut e), vec![(25, EndCause::Rst)]);
    }
}

#[test]
fn r3_3_rst_event_applied_after_its_close_time_releases_at_once_with_the_close_time() {
    // The RST at 10 is applied at 30 (its close time 25 is past): the flow is gone before the
    // call returns, released as of 25, and no packet of it is translated any more.
    let mut e = reference();
    let key = tcp_flow(&mut e, 0);
    e.advance(30);
    assert!(e.tcp_event_at(10, &key, RST, Direction::Outbound));
    assert_eq!(e.live_flows(), 0);
    assert_eq!(closed(&mut e), vec![(25, EndCause::Rst)]);
    assert_eq!(e.instance("vm-as1").unwrap().used[0], 0);
    assert_eq!(
        out(
            &mut e,
            30,
            Packet::tcp(key.src, key.sport, key.dst, key.dport, ACK)
        ),
        Verdict::Drop(DropReason::TcpNotSyn)
    );
}

#[test]
fn r3_2_r3_3_rst_and_fin_events_take_the_earlier_close_time() {
    // FIN both ways at 50/51 (close 291), RST at 60 (close 75): the RST's is earlier.
    let mut e = reference();
    let key = tcp_flow(&mut e, 0);
    e.advance(61);
    e.tcp_event_at(50, &key, FIN_ACK, Direction::Outbound);
    e.tcp_event_at(51, &key, FIN_ACK, Direction::Inbound);
    assert_eq!(e.flows(Some("vm-as1"))[0].expires_at, 291);
    e.tcp_event_at(60, &key, RST, Direction::Inbound);
    assert_eq!(e.flows(Some("vm-as1"))[0].expires_at, 75);
    e.advance(75);
    assert_eq!(closed(&mut e), vec![(75, EndCause::Rst)]);
}

#[test]
fn r3_4_an_event_is_activity_one_fin_leaves_the_idle_timer_from_its_time() {
    // One FIN (no close time) at 200: the flow idles out 240 s after it, not after the SYN.
    let mut e = reference();
    let key = tcp_flow(&mut e, 0);
    e.advance(200);
    assert!(e.tcp_event_at(200, &key, FIN_ACK, Direction::Outbound));
    e.advance(439);
    assert_eq!(e.live_flows(), 1);
    e.advance(440);
    assert_eq!(closed(&mut e), vec![(440, EndCause::Idle)]);
}

#[test]
fn events_of_no_live_flow_are_ignored_and_counted() {
    let mut e = reference();
    let key = tcp_flow(&mut e, 0);
    // Another public port: an earlier flow of the same 5-tuple, not this one.
    let mut stale = key;
    stale.pport = stale.pport.wrapping_add(1);
    assert!(!e.tcp_event_at(5, &stale, RST, Direction::Outbound));
    let mut other = key;
    other.sport = 4001;
    assert!(!e.tcp_event_at(5, &other, RST, Direction::Inbound));
    assert_eq!(e.flows(Some("vm-as1"))[0].state, "open");
    assert_eq!(
        (
            e.global_stats().tcp_events_unknown,
            e.global_stats().tcp_events_applied
        ),
        (2, 0)
    );
    // After the flow ended, its late event is unknown too.
    assert!(e.tcp_event_at(10, &key, RST, Direction::Outbound));
    e.advance(25);
    assert!(!e.tcp_event_at(11, &key, RST, Direction::Outbound));
    assert_eq!(e.global_stats().tcp_events_unknown, 3);
}

#[test]
fn r3_1_a_syn_after_kernel_events_starts_the_flow_over() {
    // The kernel never reports a SYN without ACK (it passes it up): the engine sees the
    // client's reuse of the 5-tuple itself and the closing flow starts over.
    let mut e = reference();
    let key = tcp_flow(&mut e, 0);
    e.tcp_event_at(5, &key, FIN_ACK, Direction::Outbound);
    e.tcp_event_at(5, &key, FIN_ACK, Direction::Inbound);
    assert_eq!(e.flows(Some("vm-as1"))[0].state, "closing");
    out(
        &mut e,
        6,
        Packet::tcp(key.src, key.sport, key.dst, key.dport, SYN),
    );
    assert_eq!(e.flows(Some("vm-as1"))[0].state, "open");
}
