//! Property tests: random operation sequences against a reference model of flow deadlines.
//!
//! Checked after every step: no public 5-tuple is held twice (R2.2), ports stay inside the
//! owner's block and used ports never exceed the preallocation (R2.4), counters add up, a
//! released port comes back exactly when its timer says (R3.2–R3.5), exhaustion happens only
//! when every port is busy for the destination (R2.6), and a port new to the instance is taken
//! only when no used port is free for the destination (R2.3).

mod common;

use std::collections::HashMap;

use common::*;
use proptest::prelude::*;
use snatgw_core::{DropReason, Engine, Packet, Topology, Verdict};

const IDLE: u32 = 40;
const FIN: u32 = 30;
const RSTT: u32 = 5;

#[derive(Debug, Clone)]
enum Op {
    Syn {
        inst: usize,
        sport: u16,
        dst: u32,
        dport: u16,
    },
    Udp {
        inst: usize,
        sport: u16,
        dst: u32,
        dport: u16,
    },
    Pkt {
        pick: usize,
        inbound: bool,
        flags: u8,
    },
    Advance(u32),
    Resize(usize),
    /// Export the engine's flow state, encode and decode it, and carry on with a new engine
    /// (another hash key) that imported it (SPEC R11.1).
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..2usize, 1000..1100u16, 0..2u32, prop::sample::select(vec![80u16, 443, 443, 443])).prop_map(|(inst, sport, dst, dport)| Op::Syn { inst, sport, dst, dport }),
        2 => (0..3usize, 1000..1040u16, 0..3u32, Just(53u16)).prop_map(|(inst, sport, dst, dport)| Op::Udp { inst, sport, dst, dport }),
        5 => (any::<usize>(), any::<bool>(), prop::sample::select(vec![ACK, FIN_ACK, RST, SYN])).prop_map(|(pick, inbound, flags)| Op::Pkt { pick, inbound, flags }),
        3 => (0..20u32).prop_map(Op::Advance),
        1 => prop::sample::select(vec![801usize, 700, 300]).prop_map(Op::Resize),
    ]
}

fn op_with_restarts() -> impl Strategy<Value = Op> {
    prop_oneof![19 => op(), 1 => Just(Op::Restart)]
}

/// Model of one live flow: what its deadline must be.
#[derive(Debug, Clone, Copy)]
struct M {
    last: u32,
    fin_out: bool,
    fin_in: bool,
    close: Option<u32>,
    rst: bool,
    public: (u32, u16),
}

impl M {
    fn deadline(&self) -> u32 {
        let idle = self.last + IDLE;
        self.close.map_or(idle, |c| c.min(idle))
    }
}

fn cfg(n: usize) -> Topology {
    let mut c = pool_config(n);
    c.gateway.idle_timeout_secs = IDLE;
    c.gateway.fin_timeout_secs = FIN;
    c.gateway.rst_timeout_secs = RSTT;
    Topology::from_config(c).expect("valid")
}

type Key = (u8, u32, u16, u32, u16);

fn sync(e: &Engine, model: &mut HashMap<Key, M>, now: u32) -> Result<(), TestCaseError> {
    let live: HashMap<Key, (u32, u16)> = e
        .flows(None)
        .into_iter()
        .map(|f| {
            (
                (f.l4 as u8, f.private.0, f.private.1, f.remote.0, f.remote.1),
                f.public,
            )
        })
        .collect();
    for (k, m) in model.iter() {
        let due = m.deadline() <= now;
        prop_assert_eq!(
            live.contains_key(k),
            !due,
            "flow {:?} (deadline {}) at {}",
            k,
            m.deadline(),
            now
        );
        if let Some(p) = live.get(k) {
            prop_assert_eq!(*p, m.public);
        }
    }
    model.retain(|_, m| m.deadline() > now);
    prop_assert_eq!(live.len(), model.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn engine_invariants_hold_under_random_operations(ops in prop::collection::vec(op(), 1..500)) {
        run(ops)?;
    }

    /// The same reference model, with the engine replaced at random points by one restored
    /// from its exported state: deadlines to the second, public 5-tuples, R2.3 and R2.6 hold
    /// across every restart as if there had been none.
    #[test]
    fn r11_1_restored_engine_keeps_every_invariant(ops in prop::collection::vec(op_with_restarts(), 1..500)) {
        run(ops)?;
    }
}

/// A new engine with the topology of `n` instances at `now`, restored from `e`'s exported
/// state (through its binary encoding), with another hash key.
fn restart(e: &Engine, n: usize, now: u32, round: u64) -> Engine {
    use snatgw_core::engine::persist::FlowState;
    let st = e.export_state();
    let mut bytes = Vec::new();
    st.encode(&mut bytes);
    let back = FlowState::decode(&bytes).expect("decode");
    assert_eq!(back, st);
    let mut e2 = Engine::with_hash_key(cfg(n), now, 0x9e37_79b9_7f4a_7c15 ^ round).expect("engine");
    let rep = e2.import_state(&back);
    assert_eq!(rep.flows as usize, st.flows.len(), "{rep:?}");
    assert_eq!(
        rep.skipped_conflict + rep.skipped_port + rep.skipped_instance,
        0,
        "{rep:?}"
    );
    e2
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    {
        let mut e = Engine::new(cfg(801), 0).expect("engine");
        let mut n = 801usize;
        let mut restarts = 0u64;
        let mut model: HashMap<Key, M> = HashMap::new();
        let mut now = 0u32;
        let dsts = [ip("198.51.100.1"), ip("198.51.100.2"), ip("203.0.113.9")];
        for op in ops {
            match op {
                Op::Syn {
                    inst,
                    sport,
                    dst,
                    dport,
                }
                | Op::Udp {
                    inst,
                    sport,
                    dst,
                    dport,
                } => {
                    let is_tcp = matches!(op, Op::Syn { .. });
                    let (src, d) = (private_u32(inst), dsts[dst as usize]);
                    let p = if is_tcp {
                        Packet::tcp(src, sport, d, dport, SYN)
                    } else {
                        Packet::udp(src, sport, d, dport)
                    };
                    let key: Key = (if is_tcp { 0 } else { 1 }, src, sport, d, dport);
                    let name = format!("vm-{inst}");
                    let before = e.instance(&name).expect("vm");
                    let l = if is_tcp { 0 } else { 1 };
                    let to_d = e
                        .flows(Some(&name))
                        .iter()
                        .filter(|f| f.l4 as usize == l && f.remote == (d, dport))
                        .count() as u32;
                    let existed = model.contains_key(&key);
                    let v = out(&mut e, now, p);
                    let after = e.instance(&name).expect("vm");
                    match v {
                        Verdict::Translate { addr, port } => {
                            if !existed {
                                // R2.3: a port new to the instance only when no used port is free for d.
                                if after.used[l] > before.used[l] {
                                    prop_assert_eq!(
                                        to_d,
                                        before.used[l],
                                        "took a new port while a used one was free"
                                    );
                                }
                                prop_assert!(after
                                    .block
                                    .iter()
                                    .any(|&(lo, hi)| (lo..=hi).contains(&port)));
                                model.insert(
                                    key,
                                    M {
                                        last: now,
                                        fin_out: false,
                                        fin_in: false,
                                        close: None,
                                        rst: false,
                                        public: (addr, port),
                                    },
                                );
                            } else {
                                let m = model.get_mut(&key).expect("model");
                                prop_assert_eq!((addr, port), m.public);
                                m.last = now;
                                if is_tcp && (m.close.is_some() || m.fin_out || m.fin_in || m.rst) {
                                    // SYN on a closing flow starts it over.
                                    *m = M {
                                        last: now,
                                        fin_out: false,
                                        fin_in: false,
                                        close: None,
                                        rst: false,
                                        public: m.public,
                                    };
                                }
                            }
                        }
                        Verdict::Drop(DropReason::PortsExhausted) => {
                            prop_assert!(!existed);
                            prop_assert_eq!(to_d, after.allocated, "exhaustion with a free port");
                        }
                        v => prop_assert!(false, "unexpected {:?}", v),
                    }
                }
                Op::Pkt {
                    pick,
                    inbound,
                    flags,
                } => {
                    if model.is_empty() {
                        continue;
                    }
                    let mut keys: Vec<Key> = model.keys().copied().collect();
                    keys.sort_unstable();
                    let k = keys[pick % keys.len()];
                    let m = model[&k];
                    let is_tcp = k.0 == 0;
                    let v = if inbound {
                        let p = if is_tcp {
                            Packet::tcp(k.3, k.4, m.public.0, m.public.1, flags)
                        } else {
                            Packet::udp(k.3, k.4, m.public.0, m.public.1)
                        };
                        inb(&mut e, now, p)
                    } else {
                        let p = if is_tcp {
                            Packet::tcp(k.1, k.2, k.3, k.4, flags)
                        } else {
                            Packet::udp(k.1, k.2, k.3, k.4)
                        };
                        out(&mut e, now, p)
                    };
                    let expect_addr = if inbound { (k.1, k.2) } else { m.public };
                    prop_assert_eq!(translated(v), expect_addr);
                    let m = model.get_mut(&k).expect("model");
                    m.last = now;
                    if is_tcp {
                        if !inbound && flags == SYN {
                            if m.close.is_some() || m.fin_out || m.fin_in || m.rst {
                                *m = M {
                                    last: now,
                                    fin_out: false,
                                    fin_in: false,
                                    close: None,
                                    rst: false,
                                    public: m.public,
                                };
                            }
                        } else {
                            if flags & RST != 0 && !m.rst {
                                m.rst = true;
                                let t = now + RSTT;
                                m.close = Some(m.close.map_or(t, |c| c.min(t)));
                            }
                            if flags & snatgw_core::tcp_flags::FIN != 0 {
                                let had = m.fin_out && m.fin_in;
                                if inbound {
                                    m.fin_in = true
                                } else {
                                    m.fin_out = true
                                }
                                if m.fin_out && m.fin_in && !had {
                                    let t = now + FIN;
                                    m.close = Some(m.close.map_or(t, |c| c.min(t)));
                                }
                            }
                        }
                    }
                }
                Op::Advance(dt) => {
                    now += dt;
                    e.advance(now);
                }
                Op::Restart => {
                    restarts += 1;
                    e = restart(&e, n, now, restarts);
                }
                Op::Resize(to) => {
                    n = to;
                    let rep = e.apply(now, cfg(n)).expect("apply");
                    // Flows on reclaimed ports are gone (R2.9): drop them from the model too.
                    let live: std::collections::HashSet<Key> = e
                        .flows(None)
                        .into_iter()
                        .map(|f| (f.l4 as u8, f.private.0, f.private.1, f.remote.0, f.remote.1))
                        .collect();
                    let before = model.len();
                    model.retain(|k, m| m.deadline() <= now || live.contains(k));
                    let due = model.values().filter(|m| m.deadline() <= now).count();
                    prop_assert_eq!(before - model.len(), rep.flows_reclaimed);
                    let _ = due;
                }
            }
            sync(&e, &mut model, now)?;
            if let Err(msg) = e.check_invariants() {
                prop_assert!(false, "{}", msg);
            }
        }
    }
    Ok(())
}
