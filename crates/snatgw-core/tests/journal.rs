//! The flow journal and activity from outside the engine (a fast path): R3.2–R3.5 keep their
//! exact timing when packets bypass the engine, and every open, close and refusal is journaled.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::*;
use snatgw_core::{
    ActivitySource, DropReason, EndCause, Engine, FlowChange, FlowKey, Packet, Verdict,
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
