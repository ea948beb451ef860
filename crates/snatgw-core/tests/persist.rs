//! Flow-state export and import (SPEC R11.1; the same format serves a fleet takeover, R10.4).
//!
//! Expected values come from the SPEC's timers (R3.2 FIN, R3.3 RST, R3.4 idle) applied to the
//! times the test chose, not from the engine: a flow idle since `t` ends at `t + idle`, after
//! a restart as without one.

mod common;

use common::*;
use snatgw_core::config::ConfigFile;
use snatgw_core::engine::persist::{FlowState, StateError, FLOW_STATE_VERSION};
use snatgw_core::{EndCause, Engine, FlowChange, FlowKey, Packet, Topology};

const IDLE: u32 = 240;
const FIN: u32 = 240;
const RSTT: u32 = 15;

fn topo(c: ConfigFile) -> Topology {
    let mut c = c;
    c.gateway.idle_timeout_secs = IDLE;
    c.gateway.fin_timeout_secs = FIN;
    c.gateway.rst_timeout_secs = RSTT;
    Topology::from_config(c).expect("valid")
}

fn restore(e: &Engine, t: Topology, now: u32) -> Engine {
    let mut b = Vec::new();
    e.export_state().encode(&mut b);
    let st = FlowState::decode(&b).expect("decode");
    let mut e2 = Engine::with_hash_key(t, now, 42).expect("engine");
    e2.set_journal(true);
    let rep = e2.import_state(&st);
    assert_eq!(rep.flows as usize, st.flows.len(), "{rep:?}");
    e2
}

/// Closed flows the engine reported: (source port, release time, cause).
fn closed(e: &mut Engine) -> Vec<(u16, u32, EndCause)> {
    let mut j = Vec::new();
    e.drain_journal(&mut j);
    j.into_iter()
        .filter_map(|c| match c {
            FlowChange::Closed { key, at, cause, .. } => Some((key.sport, at, cause)),
            _ => None,
        })
        .collect()
}

#[test]
fn r11_1_timers_run_on_after_a_restart_to_the_second() {
    let mut e = Engine::new(topo(pool_config(4)), 0).expect("engine");
    let (src, d) = (private_u32(0), ip("198.51.100.1"));
    // In time order: a FIN-both at 5 whose timer runs out while nobody runs (5 + 240 = 245,
    // before the restart's clock reaches 300); idle since 10; FIN both ways at 20; RST at 30.
    let p4 = syn(&mut e, 3, src, 1004, d, 80);
    out(&mut e, 5, Packet::tcp(src, 1004, d, 80, FIN_ACK));
    inb(&mut e, 5, Packet::tcp(d, 80, p4.0, p4.1, FIN_ACK));
    let p_idle = syn(&mut e, 10, src, 1001, d, 80);
    let p_fin = syn(&mut e, 12, src, 1002, d, 80);
    let p_rst = syn(&mut e, 14, src, 1003, d, 80);
    out(&mut e, 20, Packet::tcp(src, 1002, d, 80, FIN_ACK));
    inb(&mut e, 20, Packet::tcp(d, 80, p_fin.0, p_fin.1, FIN_ACK));
    out(&mut e, 30, Packet::tcp(src, 1003, d, 80, RST));
    // Export at 31 (before any deadline), restore at 300.
    e.advance(31);
    assert_eq!(e.live_flows(), 4);
    let mut r = restore(&e, topo(pool_config(4)), 31);
    assert_eq!(r.live_flows(), 4);
    let flows: Vec<_> = r.flows(None);
    let of = |sp: u16| flows.iter().find(|f| f.private.1 == sp).expect("restored");
    assert_eq!(of(1001).public, p_idle);
    assert_eq!(of(1001).expires_at, 10 + IDLE);
    assert_eq!(of(1002).expires_at, 20 + FIN);
    assert_eq!(of(1002).state, "closing");
    assert_eq!(of(1003).public, p_rst);
    assert_eq!(of(1003).expires_at, 30 + RSTT);
    assert_eq!(of(1004).expires_at, 5 + FIN);
    // RST + 15 s = 45: gone at 45, not at 44.
    r.advance(44);
    assert!(closed(&mut r).is_empty());
    r.advance(45);
    assert_eq!(closed(&mut r), vec![(1003, 45, EndCause::Rst)]);
    // A long stop: everything due by then is released at once, each at its own deadline.
    r.advance(300);
    let mut c = closed(&mut r);
    c.sort_by_key(|x| (x.0, x.1));
    assert_eq!(
        c,
        vec![
            (1001, 10 + IDLE, EndCause::Idle),
            (1002, 20 + FIN, EndCause::Fin),
            (1004, 5 + FIN, EndCause::Fin),
        ]
    );
    assert_eq!(r.live_flows(), 0);
    r.check_invariants().expect("invariants");
}

#[test]
fn r11_1_restored_flow_keeps_its_port_and_new_flows_avoid_it() {
    let mut c = pool_config(1);
    c.gateway.port_reuse_history_secs = 120;
    let mut e = Engine::new(topo(c.clone()), 0).expect("engine");
    let (src, d) = (private_u32(0), ip("198.51.100.1"));
    let held = syn(&mut e, 1, src, 2000, d, 443);
    // A port released to `d` recently: R2.3's decision keeps it away from `d` for 120 s.
    let gone = syn(&mut e, 1, src, 2001, d, 443);
    out(&mut e, 2, Packet::tcp(src, 2001, d, 443, RST));
    e.advance(2 + RSTT);
    assert_eq!(e.live_flows(), 1);
    let mut r = restore(&e, topo(c), 20);
    // The held flow still translates both ways with the same public port.
    assert_eq!(
        translated(out(&mut r, 21, Packet::tcp(src, 2000, d, 443, ACK))),
        held
    );
    assert_eq!(
        translated(inb(&mut r, 21, Packet::tcp(d, 443, held.0, held.1, ACK))),
        (src, 2000)
    );
    // New flows to `d` take neither the held port (R2.2) nor, while another is free, the one
    // released to `d` 18 s ago (the restored release history).
    for sp in 3000..3020 {
        let p = syn(&mut r, 22, src, sp, d, 443);
        assert_ne!(p, held);
        assert_ne!(
            p, gone,
            "port released to this destination reused within the history"
        );
    }
    r.check_invariants().expect("invariants");
}

#[test]
fn r11_1_block_layout_is_restored_even_when_a_fresh_plan_differs() {
    // vm-0, vm-1, vm-2 get chunks in that order; removing vm-0 and adding vm-3 gives vm-3
    // vm-0's chunks. A fresh plan of {vm-1, vm-2, vm-3} lays them out differently.
    let mut c = pool_config(3);
    let mut e = Engine::new(topo(c.clone()), 0).expect("engine");
    c.instance.remove(0);
    c.instance.push(vm(3, Some("big")));
    e.apply(1, topo(c.clone())).expect("apply");
    let d = ip("203.0.113.7");
    let mut held = Vec::new();
    for i in 1..4 {
        for sp in 0..5 {
            let p = syn(&mut e, 2, private_u32(i), 4000 + sp, d, 80);
            held.push((i, 4000 + sp, p));
        }
    }
    let fresh = Engine::new(topo(c.clone()), 0).expect("engine");
    assert_ne!(
        fresh.instance("vm-3").expect("vm").block,
        e.instance("vm-3").expect("vm").block,
        "the test needs a layout a fresh plan does not reproduce"
    );
    let mut r = restore(&e, topo(c), 3);
    for i in 1..4 {
        let name = format!("vm-{i}");
        assert_eq!(
            r.instance(&name).expect("vm").block,
            e.instance(&name).expect("vm").block
        );
    }
    for (i, sp, p) in held {
        assert_eq!(
            translated(out(&mut r, 4, Packet::tcp(private_u32(i), sp, d, 80, ACK))),
            p
        );
    }
    r.check_invariants().expect("invariants");
}

#[test]
fn r11_1_changed_topology_after_restore_reclaims_like_a_live_change() {
    // Restore under the old topology, then apply the new one: R2.9 reclaims exactly what a
    // live change would have reclaimed.
    let old = topo(pool_config(100));
    let new = topo(pool_config(300)); // tier down: blocks shrink, flows on lost ports end
    let mut live = Engine::new(old.clone(), 0).expect("engine");
    let d = ip("198.51.100.9");
    for i in 0..100 {
        for sp in 0..200 {
            syn(&mut live, 1, private_u32(i), 5000 + sp, d, 80);
        }
    }
    let mut restored = restore(&live, old, 2);
    let a = live.apply(2, new.clone()).expect("apply");
    let b = restored.apply(2, new).expect("apply");
    assert!(a.flows_reclaimed > 0);
    assert_eq!(a.flows_reclaimed, b.flows_reclaimed);
    assert_eq!(live.live_flows(), restored.live_flows());
    let key = |e: &Engine| {
        let mut v: Vec<_> = e
            .flows(None)
            .into_iter()
            .map(|f| (f.private, f.public, f.remote))
            .collect();
        v.sort();
        v
    };
    assert_eq!(key(&live), key(&restored));
    restored.check_invariants().expect("invariants");
}

#[test]
fn r11_1_torn_or_corrupt_state_is_refused_never_half_read() {
    let mut e = Engine::new(topo(pool_config(2)), 0).expect("engine");
    for sp in 0..50 {
        syn(&mut e, 1, private_u32(0), 6000 + sp, ip("198.51.100.1"), 80);
    }
    let mut b = Vec::new();
    e.export_state().encode(&mut b);
    assert!(FlowState::decode(&b).is_ok());
    for cut in [0, 7, 20, 36, b.len() / 2, b.len() - 1] {
        assert!(FlowState::decode(&b[..cut]).is_err(), "cut at {cut}");
    }
    let mut longer = b.clone();
    longer.push(0);
    assert!(matches!(
        FlowState::decode(&longer),
        Err(StateError::Length(..))
    ));
    for pos in [40, b.len() / 2, b.len() - 9] {
        let mut flipped = b.clone();
        flipped[pos] ^= 0x10;
        assert_eq!(
            FlowState::decode(&flipped),
            Err(StateError::Checksum),
            "flip at {pos}"
        );
    }
    let mut v2 = b.clone();
    v2[8..10].copy_from_slice(&(FLOW_STATE_VERSION + 1).to_le_bytes());
    assert_eq!(
        FlowState::decode(&v2),
        Err(StateError::Version(FLOW_STATE_VERSION + 1))
    );
}

#[test]
fn r11_1_map_activity_moves_last_seen_and_adds_flows_opened_after_the_state() {
    let mut e = Engine::new(topo(pool_config(1)), 0).expect("engine");
    let (src, d) = (private_u32(0), ip("198.51.100.1"));
    let p = syn(&mut e, 1, src, 7000, d, 80);
    let mut st = e.export_state();
    // After the state was written: the flow kept sending through the kernel until 50, and
    // another flow was opened and installed there.
    let k1 = FlowKey {
        proto: 6,
        src,
        sport: 7000,
        dst: d,
        dport: 80,
        public: p.0,
        pport: p.1,
    };
    let k2 = FlowKey {
        sport: 7001,
        pport: p.1 + 1,
        ..k1
    };
    st.merge_seen([(k1, Some(50)), (k2, Some(40))], 60);
    let mut r = Engine::with_hash_key(topo(pool_config(1)), 60, 7).expect("engine");
    let rep = r.import_state(&st);
    assert_eq!(rep.flows, 2);
    let f: Vec<_> = r.flows(None);
    let of = |sp: u16| f.iter().find(|x| x.private.1 == sp).expect("flow");
    assert_eq!(of(7000).expires_at, 50 + IDLE);
    assert_eq!(of(7001).public, (p.0, p.1 + 1));
    assert_eq!(of(7001).expires_at, 40 + IDLE);
    // A record whose public 5-tuple is taken is skipped, never forced (R2.2).
    let mut clash = st.clone();
    clash.flows[1].key.pport = p.1;
    let mut r2 = Engine::with_hash_key(topo(pool_config(1)), 60, 8).expect("engine");
    let rep = r2.import_state(&clash);
    assert_eq!((rep.flows, rep.skipped_conflict), (1, 1));
    r2.check_invariants().expect("invariants");
}
