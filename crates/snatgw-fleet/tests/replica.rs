//! SPEC R10.4 "takeover keeps flows": the flow-state replication stream between fleet nodes
//! (`snatgw_fleet::replica`), over loopback TCP.
//!
//! Expected values come from the sending side, never from the store under test: the origin
//! engine (the ports its SYNs got, its live flows, its journal) or, in the property test, the
//! test's own model of the sender's live set. Races are built deterministically: the test
//! chooses what the snapshot holds and which changes are numbered after its cut.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use snatgw_core::engine::persist::{FlowRecord, FlowState};
use snatgw_core::{tcp_flags, Direction, Engine, FlowChange, FlowKey, Packet, Topology, Verdict};
use snatgw_fleet::replica::{Message, MAX_FRAME, MAX_RESERVE_PORTS, PROTOCOL_VERSION};
use snatgw_fleet::{NodeId, PortReserve, ReplicaServer, ReplicaStore, Replicator};

const IDLE: u32 = 240;
const RST_SECS: u32 = 15;
const WAIT: Duration = Duration::from_secs(15);

const TOPOLOGY: &str = r#"
[gateway]
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.1"]
idle_timeout_secs = 240
rst_timeout_secs = 15
port_reuse_history_secs = 240

[[availability_set]]
name = "big"

[[instance]]
name = "vm-0"
private_ip = "10.0.1.1"
availability_set = "big"

[[instance]]
name = "vm-1"
private_ip = "10.0.1.2"
availability_set = "big"

[[instance]]
name = "vm-2"
private_ip = "10.0.1.3"
availability_set = "big"

[[instance]]
name = "vm-3"
private_ip = "10.0.1.4"
availability_set = "big"
"#;

/// A flow as a sortable tuple: (proto, src, sport, dst, dport, public, pport).
type K = (u8, u32, u16, u32, u16, u32, u16);

fn k(f: &FlowKey) -> K {
    (f.proto, f.src, f.sport, f.dst, f.dport, f.public, f.pport)
}

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<Ipv4Addr>().expect("address"))
}

/// The private address of `vm-i`.
fn vm(i: usize) -> u32 {
    ip("10.0.1.1") + i as u32
}

fn set(ips: &[u32]) -> HashSet<u32> {
    ips.iter().copied().collect()
}

fn all() -> HashSet<u32> {
    set(&[vm(0), vm(1), vm(2), vm(3)])
}

fn node(s: &str) -> NodeId {
    NodeId::new(s).expect("id")
}

fn engine(now: u32, hash_key: u64) -> Engine {
    let mut e = Engine::with_hash_key(
        Topology::from_toml(TOPOLOGY).expect("topology"),
        now,
        hash_key,
    )
    .expect("engine");
    e.set_journal(true);
    e
}

fn server() -> (ReplicaServer, ReplicaStore) {
    let store = ReplicaStore::new();
    let srv =
        ReplicaServer::bind("127.0.0.1:0".parse().expect("addr"), store.clone()).expect("bind");
    (srv, store)
}

fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The flows a store holds for `ips` (without taking them).
fn stored(store: &ReplicaStore, ips: &HashSet<u32>) -> BTreeSet<K> {
    store.peek(ips).flows.iter().map(|f| k(&f.key)).collect()
}

/// A sending node: an engine running the whole topology and its replicator.
struct Origin {
    e: Engine,
    r: Replicator,
    /// Every change offered, in order.
    log: Vec<FlowChange>,
}

impl Origin {
    fn new(name: &str, incarnation: u64) -> Origin {
        Origin {
            e: engine(0, 42),
            r: Replicator::new(node(name), incarnation),
            log: Vec::new(),
        }
    }

    /// Hands the journal to the replicator, as the gateway does after every batch.
    fn pump(&mut self) {
        let mut j = Vec::new();
        self.e.drain_journal(&mut j);
        self.r.offer(&j);
        self.log.extend(j);
    }

    /// What the caller does when `needs_snapshot` says so.
    fn snapshot(&mut self) {
        let s = self.r.seq();
        let st = self.e.export_state();
        self.r.offer_snapshot(&st, s);
    }

    fn connect(&mut self, targets: HashMap<u32, SocketAddr>) {
        self.r.set_targets(targets);
        assert!(
            eventually(WAIT, || self.r.needs_snapshot()),
            "never connected: {:?}",
            self.r.stats()
        );
        self.snapshot();
        assert!(!self.r.needs_snapshot());
    }

    fn syn(&mut self, now: u32, src: u32, sport: u16, dst: u32, dport: u16) -> (u32, u16) {
        match self.e.process(
            now,
            Direction::Outbound,
            &Packet::tcp(src, sport, dst, dport, tcp_flags::SYN),
        ) {
            Verdict::Translate { addr, port } => (addr, port),
            v => panic!("SYN not translated: {v:?}"),
        }
    }

    fn send(&mut self, now: u32, src: u32, sport: u16, dst: u32, dport: u16, flags: u8) {
        let v = self.e.process(
            now,
            Direction::Outbound,
            &Packet::tcp(src, sport, dst, dport, flags),
        );
        assert!(matches!(v, Verdict::Translate { .. }), "{v:?}");
    }

    /// The origin's live flows of `ips`: the oracle.
    fn live(&self, ips: &HashSet<u32>) -> BTreeSet<K> {
        self.e
            .live_flow_keys()
            .filter(|(_, f)| ips.contains(&f.src))
            .map(|(_, f)| k(&f))
            .collect()
    }
}

/// Dropping a replicator whose target is stalled does not wait for it (under 3 s).
fn drops_promptly(r: Replicator) {
    let t = Instant::now();
    drop(r);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "drop took {:?}",
        t.elapsed()
    );
}

fn targets(ips: &[u32], to: SocketAddr) -> HashMap<u32, SocketAddr> {
    ips.iter().map(|&i| (i, to)).collect()
}

#[test]
fn r10_4_opens_and_closes_arrive_in_order_over_loopback() {
    let (srv, store) = server();
    let mut o = Origin::new("gw-a", 1);
    o.connect(targets(&[vm(0), vm(1), vm(2), vm(3)], srv.local_addr()));
    let d = ip("198.51.100.7");
    for i in 0..4 {
        for sp in 0..25u16 {
            o.syn(1, vm(i), 10_000 + sp, d, 443);
        }
        o.pump();
    }
    // Every third flow is reset at 2 and released 15 s later; then the same private 5-tuples
    // open again, and a few flows open and close within one batch: applied out of order, a
    // close before its open would leave a flow the origin no longer has.
    for i in 0..4 {
        for sp in (0..25u16).step_by(3) {
            o.send(2, vm(i), 10_000 + sp, d, 443, tcp_flags::RST);
        }
    }
    o.e.advance(2 + RST_SECS);
    o.pump();
    for i in 0..4 {
        for sp in (0..25u16).step_by(3) {
            o.syn(20, vm(i), 10_000 + sp, d, 443);
        }
        o.syn(20, vm(i), 20_000, d, 80);
        o.send(20, vm(i), 20_000, d, 80, tcp_flags::RST);
    }
    o.e.advance(20 + RST_SECS);
    o.pump();
    assert!(o.r.flush(WAIT));
    let want = o.live(&all());
    assert_eq!(want.len(), 100);
    assert!(
        eventually(WAIT, || stored(&store, &all()) == want),
        "store {:?}\norigin {:?}",
        stored(&store, &all()).len(),
        want.len()
    );
    // Every release the origin journaled is in the reuse history, with its time (R2.3).
    let closed: BTreeSet<(u32, u8, u32, u16, u16, u32)> = o
        .log
        .iter()
        .filter_map(|c| match c {
            FlowChange::Closed { key, at, .. } => {
                Some((key.src, key.proto, key.dst, key.dport, key.pport, *at))
            }
            _ => None,
        })
        .collect();
    let released: BTreeSet<(u32, u8, u32, u16, u16, u32)> = store
        .peek(&all())
        .releases
        .iter()
        .map(|r| (r.private_ip, r.proto, r.dst, r.dport, r.pport, r.at))
        .collect();
    assert_eq!(closed.len(), 4 * 9 + 4);
    assert_eq!(released, closed);
    let st = store.stats();
    assert_eq!(st.malformed, 0, "{st:?}");
    assert_eq!(st.opened, (4 * 25 + 4 * 9 + 4) as u64, "{st:?}");
    assert_eq!(st.closed, closed.len() as u64, "{st:?}");
    let rs = o.r.stats();
    assert!(
        rs.written_inline > 0,
        "offer's own write is the common case: {rs:?}"
    );
    assert_eq!(rs.overflows, 0);
    assert_eq!(rs.records, st.opened + st.closed);
}

#[test]
fn r10_4_snapshot_and_concurrent_deltas_merge_by_the_fuzzy_cut() {
    let (srv, store) = server();
    let mut o = Origin::new("gw-a", 1);
    o.connect(targets(&[vm(0), vm(1), vm(2), vm(3)], srv.local_addr()));
    let d = ip("198.51.100.9");
    let (src, other) = (vm(0), vm(1));
    // A stale flow the receiver holds from this sender (numbered before any cut): the
    // snapshot must remove it. Sent on a second connection of the same sender incarnation.
    let stale = FlowKey {
        proto: 6,
        src,
        sport: 9,
        dst: d,
        dport: 9,
        public: ip("192.0.2.1"),
        pport: 60_000,
    };
    let mut raw = RawSender::connect(srv.local_addr(), "gw-a", 1);
    raw.send(&Message::Opened {
        seq: o.r.seq() + 1,
        key: stale,
        at: 1,
    });
    o.syn(1, src, 1, d, 443); // A: in the cut, closed after it
    o.syn(1, src, 2, d, 443); // B: in the cut, stays
    o.syn(1, other, 4, d, 443); // D: before the cut, closed after the cut, before the export
    o.pump();
    assert!(o.r.flush(WAIT));
    assert!(eventually(WAIT, || stored(&store, &all()).len() == 4));

    o.r.request_snapshot();
    assert!(o.r.needs_snapshot());
    let s = o.r.seq();
    o.send(2, other, 4, d, 443, tcp_flags::RST);
    o.e.advance(2 + RST_SECS);
    o.pump();
    o.syn(18, other, 3, d, 443); // C: after the cut, in the export
    o.pump();
    let st = o.e.export_state();
    o.send(18, src, 1, d, 443, tcp_flags::RST); // A closes after the export
    o.e.advance(18 + RST_SECS);
    o.pump();
    o.syn(33, src, 5, d, 443); // E: after the export
    o.pump();
    // The race as built: the snapshot holds A (closed since), B and C, not D (closed before
    // the export reached it) nor E.
    let sports: BTreeSet<u16> = st.flows.iter().map(|f| f.key.sport).collect();
    assert_eq!(sports, BTreeSet::from([1, 2, 3]));
    // Every delta numbered after the cut is already on the wire, ahead of the snapshot.
    o.r.offer_snapshot(&st, s);
    assert!(!o.r.needs_snapshot());
    assert!(o.r.flush(WAIT));
    let want = o.live(&all());
    let got_sports = |store: &ReplicaStore| -> BTreeSet<u16> {
        store
            .peek(&all())
            .flows
            .iter()
            .map(|f| f.key.sport)
            .collect()
    };
    assert!(
        eventually(WAIT, || stored(&store, &all()) == want),
        "store {:?}, origin {want:?}",
        got_sports(&store)
    );
    assert_eq!(got_sports(&store), BTreeSet::from([2, 3, 5]));
    assert_eq!(store.stats().merge_gaps, 0);
    drop(raw);
}

#[test]
fn r10_4_fuzzy_cut_merge_on_the_wire_and_incarnations() {
    let (srv, store) = server();
    let inst = vm(0);
    let key = |sport: u16| FlowKey {
        proto: 6,
        src: inst,
        sport,
        dst: ip("198.51.100.1"),
        dport: 443,
        public: ip("192.0.2.1"),
        pport: 2000 + sport,
    };
    let rec = |sport: u16| FlowRecord {
        key: key(sport),
        last_seen: 1,
        close_at: 0,
        tcp_state: 0,
        born: 1,
    };
    let mut a = RawSender::connect(srv.local_addr(), "gw-a", 1);
    a.send(&Message::Opened {
        seq: 1,
        key: key(1),
        at: 1,
    });
    a.send(&Message::Opened {
        seq: 2,
        key: key(2),
        at: 1,
    });
    // Numbered after the cut at 2, arriving before the snapshot.
    a.send(&Message::Closed {
        seq: 3,
        key: key(1),
        at: 2,
    });
    a.send(&Message::Opened {
        seq: 4,
        key: key(3),
        at: 2,
    });
    // The export still saw 1 (closed since), missed 3.
    a.send(&Message::Snapshot {
        seq_at_start: 2,
        instances: vec![inst],
        state: FlowState {
            time: 2,
            flows: vec![rec(1), rec(2)],
            ..FlowState::default()
        },
    });
    a.send(&Message::Opened {
        seq: 5,
        key: key(4),
        at: 3,
    });
    let sports = || -> BTreeSet<u16> {
        store
            .peek(&set(&[inst]))
            .flows
            .iter()
            .map(|f| f.key.sport)
            .collect()
    };
    assert!(
        eventually(WAIT, || sports() == BTreeSet::from([2, 3, 4])),
        "{:?}",
        sports()
    );
    // An older connection of the same incarnation delivering changes the snapshot already
    // reflects: ignored.
    let mut late = RawSender::connect(srv.local_addr(), "gw-a", 1);
    late.send(&Message::Closed {
        seq: 1,
        key: key(2),
        at: 1,
    });
    late.send(&Message::Opened {
        seq: 2,
        key: key(9),
        at: 1,
    });
    // So is an older snapshot, and a `Forget` numbered before what the store now holds
    // (the instance left this receiver and came back over a newer connection) drops nothing
    // newer.
    late.send(&Message::Snapshot {
        seq_at_start: 1,
        instances: vec![inst],
        state: FlowState {
            flows: vec![rec(8)],
            ..FlowState::default()
        },
    });
    late.send(&Message::Forget {
        seq: 2,
        instances: vec![inst],
    });
    assert!(
        eventually(WAIT, || store.stats().forgets == 1),
        "{:?}",
        store.stats()
    );
    assert_eq!(store.stats().superseded, 3);
    assert_eq!(sports(), BTreeSet::from([2, 3, 4]));
    // A connection from an older incarnation of the node (a paused earlier process) is refused.
    let mut old = RawSender::connect(srv.local_addr(), "gw-a", 0);
    old.send(&Message::Opened {
        seq: 1,
        key: key(7),
        at: 1,
    });
    assert!(
        eventually(WAIT, || store.stats().refused == 1),
        "{:?}",
        store.stats()
    );
    assert_eq!(sports(), BTreeSet::from([2, 3, 4]));
    // A newer incarnation's snapshot replaces what older ones sent, also for instances it
    // does not cover.
    let mut b = RawSender::connect(srv.local_addr(), "gw-a", 2);
    b.send(&Message::Snapshot {
        seq_at_start: 0,
        instances: vec![vm(1)],
        state: FlowState::default(),
    });
    assert!(eventually(WAIT, || store.stats().snapshots == 3));
    assert!(sports().is_empty(), "{:?}", sports());
    // And the first connection, now of an older incarnation, is closed at its next frame.
    a.send(&Message::Opened {
        seq: 6,
        key: key(5),
        at: 3,
    });
    assert!(
        eventually(WAIT, || store.stats().refused == 2),
        "{:?}",
        store.stats()
    );
    assert!(sports().is_empty());
    let st = store.stats();
    assert_eq!(st.malformed, 0, "{st:?}");
    drop((a, late, old, b));
}

#[test]
fn r10_4_target_change_needs_snapshot_and_the_new_target_ends_with_the_full_set() {
    let (s1, store1) = server();
    let (s2, store2) = server();
    let mut o = Origin::new("gw-a", 7);
    o.connect(targets(&[vm(0), vm(1), vm(2), vm(3)], s1.local_addr()));
    let d = ip("198.51.100.20");
    for i in 0..4 {
        for sp in 0..10u16 {
            o.syn(1, vm(i), 100 + sp, d, 443);
        }
    }
    o.pump();
    assert!(o.r.flush(WAIT));
    assert!(eventually(WAIT, || stored(&store1, &all()).len() == 40));

    // vm-0 and vm-1 get another runner-up.
    let moved = set(&[vm(0), vm(1)]);
    let stay = set(&[vm(2), vm(3)]);
    let mut t = targets(&[vm(0), vm(1)], s2.local_addr());
    t.extend(targets(&[vm(2), vm(3)], s1.local_addr()));
    o.r.set_targets(t);
    assert!(
        eventually(WAIT, || o.r.needs_snapshot()),
        "{:?}",
        o.r.stats()
    );
    // Changes before the export, during it and after it.
    o.syn(2, vm(0), 200, d, 443);
    o.pump();
    let s = o.r.seq();
    o.syn(2, vm(1), 201, d, 443);
    o.pump();
    let st = o.e.export_state();
    o.send(3, vm(0), 100, d, 443, tcp_flags::RST);
    o.syn(3, vm(1), 202, d, 443);
    o.syn(3, vm(2), 203, d, 443);
    o.e.advance(3 + RST_SECS);
    o.pump();
    o.r.offer_snapshot(&st, s);
    assert!(!o.r.needs_snapshot());
    o.syn(20, vm(0), 204, d, 443);
    o.pump();
    assert!(o.r.flush(WAIT));
    let (want_moved, want_stay) = (o.live(&moved), o.live(&stay));
    assert_eq!(want_moved.len(), 11 + 12);
    assert!(
        eventually(WAIT, || stored(&store2, &moved) == want_moved
            && stored(&store1, &stay) == want_stay
            && stored(&store1, &moved).is_empty()
            && stored(&store2, &stay).is_empty()),
        "new target {} of {}, old target still {}",
        stored(&store2, &moved).len(),
        want_moved.len(),
        stored(&store1, &moved).len()
    );
    // The old target forgot the moved instances altogether (Forget).
    let listed: Vec<u32> = store1.instances().iter().map(|r| r.private_ip).collect();
    assert_eq!(listed, vec![vm(2), vm(3)]);
    let rs = o.r.stats();
    assert_eq!((rs.targets, rs.connected, rs.pending), (2, 2, 0), "{rs:?}");
}

#[test]
fn r10_4_sender_dropped_mid_stream_the_receiver_keeps_what_arrived() {
    let (srv, store) = server();
    // A replicator dropped (its process gone) after its records were written.
    let mut o = Origin::new("gw-a", 1);
    o.connect(targets(&[vm(0), vm(1)], srv.local_addr()));
    let d = ip("198.51.100.30");
    for sp in 0..50u16 {
        o.syn(1, vm(0), 1000 + sp, d, 443);
        o.syn(1, vm(1), 1000 + sp, d, 443);
        o.pump();
    }
    let want = o.live(&all());
    assert!(eventually(WAIT, || stored(&store, &all()) == want));
    let Origin { r, .. } = o;
    drop(r);
    assert!(eventually(WAIT, || store.stats().connections == 0));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(stored(&store, &all()), want);

    // A sender cut off inside a frame: the complete frames before it are kept.
    let inst = vm(2);
    let key = |sport: u16| FlowKey {
        proto: 17,
        src: inst,
        sport,
        dst: d,
        dport: 53,
        public: ip("192.0.2.1"),
        pport: 5000 + sport,
    };
    let mut raw = RawSender::connect(srv.local_addr(), "gw-b", 1);
    for i in 1..=3u16 {
        raw.send(&Message::Opened {
            seq: u64::from(i),
            key: key(i),
            at: 5,
        });
    }
    let mut b = Vec::new();
    Message::Opened {
        seq: 4,
        key: key(4),
        at: 5,
    }
    .encode(&mut b);
    raw.write(&b[..b.len() / 2]);
    drop(raw);
    assert!(
        eventually(WAIT, || store.stats().io_errors == 1),
        "{:?}",
        store.stats()
    );
    let sports: BTreeSet<u16> = store
        .peek(&set(&[inst]))
        .flows
        .iter()
        .map(|f| f.key.sport)
        .collect();
    assert_eq!(sports, BTreeSet::from([1, 2, 3]));
    let st = store.stats();
    assert!(
        st.last_error
            .as_deref()
            .unwrap_or("")
            .contains("inside a frame"),
        "{st:?}"
    );
    assert_eq!(stored(&store, &set(&[vm(0), vm(1)])), want);
}

#[test]
fn r10_4_a_restarted_receiver_gets_a_fresh_snapshot_after_the_reconnect() {
    let (mut srv, store) = server();
    let addr = srv.local_addr();
    let mut o = Origin::new("gw-a", 1);
    o.connect(targets(&[vm(0), vm(1)], addr));
    let d = ip("198.51.100.60");
    for sp in 0..10u16 {
        o.syn(1, vm(0), 100 + sp, d, 443);
        o.syn(1, vm(1), 100 + sp, d, 443);
    }
    o.pump();
    let want = o.live(&all());
    assert!(eventually(WAIT, || stored(&store, &all()) == want));
    // The receiver's process restarts (empty) on the same address, with no traffic meanwhile:
    // the sender notices the closed connection while idle and reconnects with backoff.
    srv.stop();
    drop(srv);
    let store2 = ReplicaStore::new();
    let srv2 = ReplicaServer::bind(addr, store2.clone()).expect("bind the same address again");
    assert!(
        eventually(WAIT, || o.r.needs_snapshot()),
        "no reconnect: {:?}",
        o.r.stats()
    );
    o.syn(2, vm(1), 200, d, 443);
    o.pump();
    o.snapshot();
    o.syn(3, vm(0), 201, d, 443);
    o.pump();
    let want = o.live(&all());
    assert!(
        eventually(WAIT, || stored(&store2, &all()) == want),
        "{} of {}",
        stored(&store2, &all()).len(),
        want.len()
    );
    let rs = o.r.stats();
    assert!(rs.reconnects >= 1 && rs.write_errors >= 1, "{rs:?}");
    assert_eq!(rs.pending, 0);
    drop(srv2);
}

#[test]
fn r10_4_a_stalled_target_overflows_its_buffer_and_needs_a_snapshot() {
    // A receiver that accepts and never reads.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let r = Replicator::new(node("gw-a"), 1);
    r.set_targets(targets(&[vm(0)], l.local_addr().expect("addr")));
    let (_held, _) = l.accept().expect("accept");
    assert!(eventually(WAIT, || r.needs_snapshot()));
    r.offer_snapshot(&FlowState::default(), r.seq());
    assert!(!r.needs_snapshot());
    let batch: Vec<FlowChange> = (0..10_000u32)
        .map(|i| FlowChange::Opened {
            at: 1,
            instance: "vm-0".into(),
            slot: 0,
            by_fast_path: false,
            key: FlowKey {
                proto: 17,
                src: vm(0),
                sport: i as u16,
                dst: ip("198.51.100.70") + i / 65_536,
                dport: 53,
                public: ip("192.0.2.1"),
                pport: 1024,
            },
        })
        .collect();
    let mut slowest = Duration::ZERO;
    let mut offered = 0;
    while r.stats().overflows == 0 && offered < 400 {
        let t = Instant::now();
        r.offer(&batch);
        slowest = slowest.max(t.elapsed());
        offered += 1;
    }
    let rs = r.stats();
    assert!(rs.overflows >= 1, "{rs:?}");
    // The buffer is bounded: what was queued is dropped, and the instance needs a snapshot.
    assert!(r.needs_snapshot(), "{rs:?}");
    // `offer` never waited for the stalled receiver (its sender thread is blocked writing).
    assert!(
        slowest < Duration::from_secs(1),
        "an offer took {slowest:?}"
    );
    drops_promptly(r);
}

#[test]
fn r10_4_take_then_import_restores_flows_on_the_same_public_ports() {
    let (srv, store) = server();
    let mut o = Origin::new("gw-a", 1);
    o.connect(targets(&[vm(0), vm(1), vm(2), vm(3)], srv.local_addr()));
    let d = ip("198.51.100.40");
    // The oracle: the public side each flow got at the origin.
    let mut port_of: HashMap<(u32, u16), (u32, u16)> = HashMap::new();
    for i in 0..4 {
        for sp in 0..30u16 {
            port_of.insert((vm(i), 3000 + sp), o.syn(1, vm(i), 3000 + sp, d, 443));
        }
    }
    o.pump();
    // Keepalives at the origin (the replica sees none), resets whose releases stay in the
    // reuse history, and a flow of another instance at 300 (the sender's latest time).
    for i in 0..4 {
        for sp in 0..30u16 {
            o.send(200, vm(i), 3000 + sp, d, 443, tcp_flags::ACK);
        }
    }
    for i in 0..4 {
        for sp in (0..30u16).step_by(5) {
            o.send(280, vm(i), 3000 + sp, d, 443, tcp_flags::RST);
            port_of.remove(&(vm(i), 3000 + sp));
        }
    }
    o.e.advance(280 + RST_SECS);
    o.syn(300, vm(3), 9000, d, 443);
    o.pump();
    assert!(o.r.flush(WAIT));
    let want = o.live(&all());
    assert!(eventually(WAIT, || stored(&store, &all()) == want));

    // Node gw-a dies; this node is granted vm-0 and vm-1 and imports them before any packet.
    let taken = set(&[vm(0), vm(1)]);
    let st = store.take(&taken);
    assert!(stored(&store, &taken).is_empty(), "take removes");
    assert_eq!(stored(&store, &set(&[vm(2), vm(3)])).len(), 2 * 24 + 1);
    let mut e2 = engine(300, 7);
    let rep = e2.import_state(&st);
    assert_eq!(rep.flows, 2 * 24, "{rep:?}");
    assert_eq!(
        (rep.skipped_instance, rep.skipped_port, rep.skipped_conflict),
        (0, 0, 0),
        "{rep:?}"
    );
    assert_eq!(rep.releases, 2 * 6, "{rep:?}");
    // Timers: the replica saw no keepalive, so each flow's idle timer is dated to the
    // sender's latest time (300): never earlier than the origin's own deadline (200 + idle).
    let origin_expiry: HashMap<(u32, u16), u32> =
        o.e.flows(None)
            .iter()
            .map(|f| (f.private, f.expires_at))
            .collect();
    for f in &e2.flows(None) {
        assert!(f.expires_at >= origin_expiry[&f.private], "{f:?}");
        assert_eq!(f.expires_at, 300 + IDLE, "{f:?}");
    }
    // Same public IP:port both ways.
    for (&(src, sport), &(addr, port)) in port_of.iter().filter(|((s, _), _)| taken.contains(s)) {
        let v = e2.process(
            301,
            Direction::Outbound,
            &Packet::tcp(src, sport, d, 443, tcp_flags::ACK),
        );
        assert_eq!(v, Verdict::Translate { addr, port }, "{src:#x}:{sport}");
        let v = e2.process(
            301,
            Direction::Inbound,
            &Packet::tcp(d, 443, addr, port, tcp_flags::ACK),
        );
        assert_eq!(
            v,
            Verdict::Translate {
                addr: src,
                port: sport
            }
        );
    }
    // New flows of a taken instance avoid the held ports (R2.2) and, while others are free,
    // the ports released to that destination (R2.3, the imported history).
    let held: HashSet<(u32, u16)> = port_of
        .iter()
        .filter(|((s, _), _)| *s == vm(0))
        .map(|(_, &p)| p)
        .collect();
    let released: HashSet<u16> = o
        .log
        .iter()
        .filter_map(|c| match c {
            FlowChange::Closed { key, .. } if key.src == vm(0) => Some(key.pport),
            _ => None,
        })
        .collect();
    assert_eq!(released.len(), 6);
    for sp in 0..20u16 {
        let p = o2_syn(&mut e2, 302, vm(0), 7000 + sp, d, 443);
        assert!(
            !held.contains(&p),
            "R2.2: {p:?} is held by an imported flow"
        );
        assert!(
            !released.contains(&p.1),
            "R2.3: {p:?} was released to {d:#x} at 280"
        );
    }
    e2.check_invariants().expect("invariants");
    drop(srv);
}

fn o2_syn(e: &mut Engine, now: u32, src: u32, sport: u16, dst: u32, dport: u16) -> (u32, u16) {
    match e.process(
        now,
        Direction::Outbound,
        &Packet::tcp(src, sport, dst, dport, tcp_flags::SYN),
    ) {
        Verdict::Translate { addr, port } => (addr, port),
        v => panic!("SYN not translated: {v:?}"),
    }
}

/// A hand-driven sender speaking the protocol (or not).
struct RawSender(TcpStream);

impl RawSender {
    fn connect(addr: SocketAddr, name: &str, incarnation: u64) -> RawSender {
        let mut s = RawSender(TcpStream::connect(addr).expect("connect"));
        s.send(&Message::Hello {
            node: node(name),
            incarnation,
        });
        s
    }

    fn send(&mut self, m: &Message) {
        let mut b = Vec::new();
        m.encode(&mut b);
        self.write(&b);
    }

    fn write(&mut self, b: &[u8]) {
        // The server may have closed already (that is what some tests check).
        let _ = self.0.write_all(b);
    }

    /// The next frame the receiver wrote back (length field included); None at its close.
    fn read_frame(&mut self) -> Option<Vec<u8>> {
        self.0.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut len = [0u8; 4];
        self.0.read_exact(&mut len).ok()?;
        let mut b = vec![0u8; u32::from_le_bytes(len) as usize];
        self.0.read_exact(&mut b).ok()?;
        Some([&len[..], &b].concat())
    }

    /// Whether the receiver closed the connection (EOF or reset) within the wait.
    fn closed(&mut self) -> bool {
        self.0.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut b = [0u8; 64];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

fn reserve(instance: u32, ports: &[u16]) -> PortReserve {
    PortReserve {
        instance,
        public: ip("192.0.2.1"),
        ports: ports.to_vec(),
    }
}

fn reserve_msg(seq: u64, r: &PortReserve) -> Message {
    Message::Reserve {
        seq,
        instance: r.instance,
        public: r.public,
        ports: r.ports.clone(),
    }
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut b = ((body.len() + 1) as u32).to_le_bytes().to_vec();
    b.push(kind);
    b.extend_from_slice(body);
    b
}

fn enc(m: &Message) -> Vec<u8> {
    let mut b = Vec::new();
    m.encode(&mut b);
    b
}

#[test]
fn r10_4_malformed_bytes_are_counted_and_do_not_panic() {
    let (srv, store) = server();
    let hello = enc(&Message::Hello {
        node: node("gw-x"),
        incarnation: 1,
    });
    let key = FlowKey {
        proto: 6,
        src: vm(0),
        sport: 1,
        dst: 2,
        dport: 3,
        public: 4,
        pport: 5,
    };
    let opened = |seq| enc(&Message::Opened { seq, key, at: 1 });
    let hello_body = |magic: &[u8], version: u16, id: &[u8]| {
        let mut b = magic.to_vec();
        b.extend_from_slice(&version.to_le_bytes());
        b.push(id.len() as u8);
        b.extend_from_slice(id);
        b.extend_from_slice(&1u64.to_le_bytes());
        frame(1, &b)
    };
    let mut snap = enc(&Message::Snapshot {
        seq_at_start: 0,
        instances: vec![vm(0)],
        state: FlowState {
            flows: vec![FlowRecord {
                key,
                last_seen: 1,
                close_at: 0,
                tcp_state: 0,
                born: 1,
            }],
            ..FlowState::default()
        },
    });
    let n = snap.len();
    snap[n - 20] ^= 0xff; // inside the flow state: its checksum fails
    let cat = |parts: &[&[u8]]| parts.concat();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("unknown kind first", frame(9, b"abcd")),
        ("zero length", vec![0, 0, 0, 0]),
        ("too long", (MAX_FRAME + 1).to_le_bytes().to_vec()),
        (
            "bad magic",
            hello_body(b"NOTMAGIC", PROTOCOL_VERSION, b"gw"),
        ),
        ("bad version", hello_body(b"SNATREPL", 99, b"gw")),
        ("version 1", hello_body(b"SNATREPL", 1, b"gw")),
        (
            "bad node id",
            hello_body(b"SNATREPL", PROTOCOL_VERSION, b"g w"),
        ),
        ("short hello", frame(1, b"SNATREPL\x01")),
        ("delta before hello", opened(1)),
        ("unknown kind", cat(&[&hello, &frame(77, b"")])),
        ("short delta", cat(&[&hello, &frame(2, &[0; 9])])),
        ("long delta", cat(&[&hello, &frame(3, &[0; 40])])),
        ("corrupt snapshot", cat(&[&hello, &snap])),
        (
            "sequence not increasing",
            cat(&[&hello, &opened(5), &opened(5)]),
        ),
        ("second hello", cat(&[&hello, &hello])),
        (
            "forget with a bad count",
            cat(&[
                &hello,
                &frame(5, &[0, 0, 0, 0, 0, 0, 0, 0, 0xe8, 3, 0, 0, 1, 2, 3, 4]),
            ]),
        ),
        (
            "snapshot with a bad count",
            cat(&[
                &hello,
                &frame(4, &[0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            ]),
        ),
        (
            "reserve with too many ports",
            cat(&[
                &hello,
                &enc(&reserve_msg(
                    1,
                    &reserve(vm(0), &vec![7; MAX_RESERVE_PORTS + 1]),
                )),
            ]),
        ),
        (
            "reserve with a count above its ports",
            cat(&[&hello, &{
                let mut b = enc(&reserve_msg(1, &reserve(vm(0), &[1, 2, 3])));
                b.truncate(b.len() - 2);
                let n = (b.len() - 4) as u32;
                b[..4].copy_from_slice(&n.to_le_bytes());
                b
            }]),
        ),
        (
            "reserve with bytes after its ports",
            cat(&[&hello, &{
                let mut b = enc(&reserve_msg(1, &reserve(vm(0), &[1, 2, 3])));
                b.extend_from_slice(&[0, 0]);
                let n = (b.len() - 4) as u32;
                b[..4].copy_from_slice(&n.to_le_bytes());
                b
            }]),
        ),
        ("short reserve", cat(&[&hello, &frame(6, &[0; 19])])),
        (
            "reserve numbered below a delta",
            cat(&[
                &hello,
                &opened(5),
                &enc(&reserve_msg(5, &reserve(vm(0), &[1]))),
            ]),
        ),
        (
            "an ack from a sender",
            cat(&[&hello, &enc(&Message::Ack { seq: 1 })]),
        ),
        (
            "reserve before hello",
            enc(&reserve_msg(1, &reserve(vm(0), &[1]))),
        ),
    ];
    for (i, (name, bytes)) in bad.iter().enumerate() {
        let mut s = TcpStream::connect(srv.local_addr()).expect("connect");
        let _ = s.write_all(bytes);
        assert!(
            eventually(WAIT, || store.stats().malformed == i as u64 + 1),
            "{name}: {:?}",
            store.stats()
        );
        drop(s);
    }
    // Random bytes, with and without a valid hello first: every connection ends (malformed,
    // cut short or a clean end), none takes the server down.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let fuzz = 200;
    for i in 0..fuzz {
        let len = (rnd() % 300) as usize;
        let mut b: Vec<u8> = if i % 2 == 0 {
            hello.clone()
        } else {
            Vec::new()
        };
        // Mostly small lengths, so frames complete and reach the decoder.
        let kind = (rnd() % 8) as u8;
        let body: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
        if i % 3 == 0 {
            b.extend_from_slice(&body);
        } else {
            b.extend(frame(kind, &body));
        }
        let mut s = TcpStream::connect(srv.local_addr()).expect("connect");
        let _ = s.write_all(&b);
        drop(s);
    }
    let total = (bad.len() + fuzz) as u64;
    assert!(
        eventually(WAIT, || {
            let st = store.stats();
            st.accepted == total && st.connections == 0
        }),
        "a connection thread did not end (a panic would leave it counted): {:?}",
        store.stats()
    );
    let st = store.stats();
    assert!(st.malformed > bad.len() as u64, "{st:?}");
    // The server still works.
    let mut o = Origin::new("gw-ok", 1);
    o.connect(targets(&[vm(1)], srv.local_addr()));
    o.syn(1, vm(1), 1, ip("198.51.100.50"), 443);
    o.pump();
    let want = o.live(&set(&[vm(1)]));
    assert!(eventually(WAIT, || stored(&store, &set(&[vm(1)])) == want));
    // No malformed reserve left anything behind.
    assert!(store.reserves(vm(0)).is_empty());
}

#[test]
fn r10_4_etcd_node_records_carry_the_fleet_link() {
    let Some(srv) = common::EtcdServer::start() else {
        return;
    };
    let mut opts = snatgw_fleet::EtcdOptions::new(vec![srv.endpoint()]);
    opts.prefix = "/replica-test".into();
    opts.rpc_timeout = Duration::from_secs(2);
    let a = snatgw_fleet::EtcdCoordinator::connect(node("gw-a"), opts.clone()).expect("a");
    let b = snatgw_fleet::EtcdCoordinator::connect(node("gw-b"), opts).expect("b");
    let addr: SocketAddr = "10.9.0.1:7400".parse().expect("addr");
    a.set_link(addr);
    use snatgw_fleet::Coordinator as _;
    let clock = snatgw_fleet::MonotonicClock::new();
    a.join(clock.now()).expect("join a");
    // b publishes no link (a record as earlier versions wrote it).
    b.join(clock.now()).expect("join b");
    assert_eq!(
        b.links().expect("links"),
        HashMap::from([(node("gw-a"), addr)])
    );
    assert_eq!(
        a.live_nodes(clock.now()).expect("nodes"),
        vec![node("gw-a"), node("gw-b")]
    );
    // One read for both: the live nodes, with or without a link, and the links.
    assert_eq!(
        b.nodes().expect("nodes and links"),
        (
            vec![node("gw-a"), node("gw-b")],
            HashMap::from([(node("gw-a"), addr)])
        )
    );
    let status = snatgw_fleet::fleet_status(&{
        let mut o = snatgw_fleet::EtcdOptions::new(vec![srv.endpoint()]);
        o.prefix = "/replica-test".into();
        o
    })
    .expect("status");
    assert_eq!(status.nodes.len(), 2);
    a.leave(clock.now()).expect("leave");
    assert!(b.links().expect("links").is_empty());
    assert_eq!(b.nodes().expect("nodes").0, vec![node("gw-b")]);
}

// ---------------------------------------------------------------------------------------------
// Port reserves (issue #19): acknowledged by the runner-up, kept there for a takeover.
// ---------------------------------------------------------------------------------------------

#[test]
fn r10_4_a_reserve_round_trip_is_acked_after_every_record_before_it() {
    let (srv, store) = server();
    let mut o = Origin::new("gw-a", 1);
    o.connect(targets(&[vm(0), vm(1)], srv.local_addr()));
    let d = ip("198.51.100.80");
    for sp in 0..40u16 {
        o.syn(1, vm(0), 100 + sp, d, 443);
        o.syn(1, vm(1), 100 + sp, d, 443);
    }
    o.pump();
    let r = reserve(vm(0), &[2000, 2001, 2002, 2003]);
    let t =
        o.r.reserve(&r)
            .expect("connected, snapshot queued: a ticket");
    assert_eq!(t.target, srv.local_addr());
    assert_eq!(
        t.seq,
        o.r.seq(),
        "the reserve takes the sender's next number"
    );
    assert!(
        eventually(WAIT, || o.r.is_acked(&t)),
        "never acked: {:?} / {:?}",
        o.r.stats(),
        store.stats()
    );
    // The ack vouches for the snapshot and every record queued before the reserve: they are
    // in the store when it arrives, no waiting.
    let want = o.live(&set(&[vm(0), vm(1)]));
    assert_eq!(want.len(), 80);
    assert_eq!(stored(&store, &set(&[vm(0), vm(1)])), want);
    assert_eq!(store.reserves(vm(0)), vec![r.clone()]);
    assert!(store.reserves(vm(1)).is_empty());
    // Acked stays acked on the same connection; an ack of a later reserve covers an earlier
    // one of the same connection.
    assert!(o.r.is_acked(&t));
    let r2 = reserve(vm(1), &[3000]);
    let r3 = reserve(vm(1), &[3001]);
    let t2 = o.r.reserve(&r2).expect("ticket");
    let t3 = o.r.reserve(&r3).expect("ticket");
    assert!(t2.seq < t3.seq && t2.conn == t.conn && t3.conn == t.conn);
    assert!(eventually(WAIT, || o.r.is_acked(&t3)));
    assert!(o.r.is_acked(&t2));
    assert_eq!(store.reserves(vm(1)), vec![r2, r3]);
    assert!(eventually(WAIT, || store.stats().acks_sent == 3));
    let (st, rs) = (store.stats(), o.r.stats());
    assert_eq!(
        (st.reserves_received, st.acks_sent, st.reserves),
        (3, 3, 3),
        "{st:?}"
    );
    assert_eq!(rs.reserves_queued, 3, "{rs:?}");
    assert!(rs.acks_received >= 1, "{rs:?}");
    assert_eq!((st.malformed, rs.write_errors), (0, 0), "{st:?} {rs:?}");
}

#[test]
fn r10_4_a_reserve_is_queued_only_after_the_instances_snapshot_on_a_live_connection() {
    let r = Replicator::new(node("gw-a"), 1);
    // No target.
    assert_eq!(r.reserve(&reserve(vm(0), &[1])), None);
    // A target with no connection (nothing listens there).
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    r.set_targets(targets(&[vm(0)], dead));
    assert!(
        eventually(WAIT, || r.stats().connect_failures >= 1),
        "{:?}",
        r.stats()
    );
    // (Never connected, so never synced either: a_reconnect_voids_earlier_reserve_tickets
    // checks a synced instance whose connection is down.)
    assert_eq!(r.reserve(&reserve(vm(0), &[1])), None);
    // Connected, but the instance's snapshot is not queued yet.
    let (srv, store) = server();
    r.set_targets(targets(&[vm(0)], srv.local_addr()));
    assert!(eventually(WAIT, || r.needs_snapshot()), "{:?}", r.stats());
    assert_eq!(r.reserve(&reserve(vm(0), &[1])), None);
    r.offer_snapshot(&FlowState::default(), r.seq());
    let t0 = r
        .reserve(&reserve(vm(0), &[1]))
        .expect("snapshot queued: a ticket");
    // An instance that gets this (connected) target later waits for its own snapshot.
    r.set_targets(targets(&[vm(0), vm(1)], srv.local_addr()));
    assert!(r.needs_snapshot());
    assert_eq!(r.reserve(&reserve(vm(1), &[2])), None);
    // A snapshot the caller asks for (a refresh) does not stop reserves of a synced instance.
    r.request_snapshot();
    let t1 = r
        .reserve(&reserve(vm(0), &[3]))
        .expect("a refresh does not stop reserves");
    r.offer_snapshot(&FlowState::default(), r.seq());
    let t2 = r
        .reserve(&reserve(vm(1), &[2]))
        .expect("its snapshot queued: a ticket");
    // Too many ports: refused, nothing queued.
    assert_eq!(
        r.reserve(&reserve(vm(0), &vec![9; MAX_RESERVE_PORTS + 1])),
        None
    );
    assert!(eventually(WAIT, || r.is_acked(&t2)));
    assert!(r.is_acked(&t0) && r.is_acked(&t1));
    assert_eq!(
        store.reserves(vm(0)),
        vec![reserve(vm(0), &[1]), reserve(vm(0), &[3])]
    );
    assert_eq!(store.reserves(vm(1)), vec![reserve(vm(1), &[2])]);
    assert_eq!(r.stats().reserves_queued, 3);
    // The instance moves to another target: its reserves wait for the snapshot there.
    let (srv2, _store2) = server();
    r.set_targets(targets(&[vm(0), vm(1)], srv2.local_addr()));
    assert_eq!(r.reserve(&reserve(vm(0), &[4])), None);
    drop((srv, srv2));
}

#[test]
fn r10_4_a_reconnect_voids_earlier_reserve_tickets() {
    let (mut srv, store) = server();
    let addr = srv.local_addr();
    let mut o = Origin::new("gw-a", 1);
    o.connect(targets(&[vm(0)], addr));
    let r1 = reserve(vm(0), &[1024, 1025]);
    let t1 = o.r.reserve(&r1).expect("ticket");
    assert!(eventually(WAIT, || o.r.is_acked(&t1)));
    assert_eq!(store.reserves(vm(0)), vec![r1]);
    // The receiver restarts (empty) on the same address: a new connection.
    srv.stop();
    drop(srv);
    assert!(
        eventually(WAIT, || !o.r.is_acked(&t1)),
        "an ack of a closed connection still counts: {:?}",
        o.r.stats()
    );
    // While the synced instance's target has no connection: no reserve.
    assert_eq!(o.r.stats().connected, 0, "{:?}", o.r.stats());
    assert_eq!(o.r.reserve(&reserve(vm(0), &[1027])), None);
    let store2 = ReplicaStore::new();
    let srv2 = ReplicaServer::bind(addr, store2.clone()).expect("bind the same address again");
    assert!(
        eventually(WAIT, || o.r.needs_snapshot()),
        "no reconnect: {:?}",
        o.r.stats()
    );
    let r2 = reserve(vm(0), &[1026]);
    assert_eq!(
        o.r.reserve(&r2),
        None,
        "before the new connection's snapshot"
    );
    o.snapshot();
    let t2 = o.r.reserve(&r2).expect("ticket");
    assert!(t2.conn > t1.conn, "{t1:?} {t2:?}");
    assert!(eventually(WAIT, || o.r.is_acked(&t2)));
    // The new connection acked a later number; the old ticket is still not acked.
    assert!(t2.seq > t1.seq);
    assert!(!o.r.is_acked(&t1));
    assert_eq!(store2.reserves(vm(0)), vec![r2]);
    drop(srv2);
}

#[test]
fn r10_4_an_overflow_voids_earlier_reserve_tickets() {
    // The test is the receiver: it accepts, never reads, and writes acks by hand.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let r = Replicator::new(node("gw-a"), 1);
    r.set_targets(targets(&[vm(0)], l.local_addr().expect("addr")));
    let (mut peer, _) = l.accept().expect("accept");
    assert!(eventually(WAIT, || r.needs_snapshot()));
    r.offer_snapshot(&FlowState::default(), r.seq());
    let t1 = r.reserve(&reserve(vm(0), &[1])).expect("ticket");
    let t2 = r.reserve(&reserve(vm(0), &[2])).expect("ticket");
    assert!(!r.is_acked(&t1), "acked before any ack");
    peer.write_all(&enc(&Message::Ack { seq: t1.seq }))
        .expect("ack");
    assert!(eventually(WAIT, || r.is_acked(&t1)));
    assert!(
        !r.is_acked(&t2),
        "an ack covers only its reserve and earlier ones"
    );
    // The buffer overflows (the receiver does not read): queued bytes are dropped.
    let batch: Vec<FlowChange> = (0..10_000u32)
        .map(|i| FlowChange::Opened {
            at: 1,
            instance: "vm-0".into(),
            slot: 0,
            by_fast_path: false,
            key: FlowKey {
                proto: 17,
                src: vm(0),
                sport: i as u16,
                dst: ip("198.51.100.90"),
                dport: 53,
                public: ip("192.0.2.1"),
                pport: 1024,
            },
        })
        .collect();
    let mut offered = 0;
    while r.stats().overflows == 0 && offered < 400 {
        r.offer(&batch);
        offered += 1;
    }
    let rs = r.stats();
    assert!(rs.overflows >= 1, "{rs:?}");
    assert_eq!(rs.connects, 1, "still the first connection: {rs:?}");
    assert!(
        !r.is_acked(&t1),
        "a ticket from before the overflow still counts"
    );
    // Even an ack of every number would not make it count again.
    let _ = peer.write_all(&enc(&Message::Ack { seq: u64::MAX }));
    std::thread::sleep(Duration::from_millis(50));
    assert!(!r.is_acked(&t1) && !r.is_acked(&t2));
    // The instance needs its snapshot again before a new reserve.
    assert!(r.needs_snapshot());
    assert_eq!(r.reserve(&reserve(vm(0), &[3])), None);
    r.offer_snapshot(&FlowState::default(), r.seq());
    let t3 = r.reserve(&reserve(vm(0), &[3])).expect("ticket");
    assert!(t3.conn > t1.conn, "{t1:?} {t3:?}");
    assert_eq!(r.stats().connects, 1, "{:?}", r.stats());
    drops_promptly(r);
}

#[test]
fn r10_4_the_receiver_acks_a_reserve_on_the_wire_after_applying_it() {
    let (srv, store) = server();
    let mut raw = RawSender::connect(srv.local_addr(), "gw-a", 1);
    let key = FlowKey {
        proto: 6,
        src: vm(0),
        sport: 1,
        dst: ip("198.51.100.1"),
        dport: 443,
        public: ip("192.0.2.1"),
        pport: 1500,
    };
    raw.send(&Message::Opened { seq: 1, key, at: 1 });
    let r = reserve(vm(0), &[1500, 1501]);
    raw.send(&reserve_msg(7, &r));
    let ack = raw.read_frame().expect("an ack");
    // u32 LE length 9, kind 7, the reserve's number as u64 LE.
    let mut want = vec![9, 0, 0, 0, 7];
    want.extend_from_slice(&7u64.to_le_bytes());
    assert_eq!(ack, want);
    assert_eq!(Message::decode(&ack[4..]), Ok(Message::Ack { seq: 7 }));
    // Applied before the ack was written: the delta before it and the reserve itself.
    assert_eq!(stored(&store, &set(&[vm(0)])), BTreeSet::from([k(&key)]));
    assert_eq!(store.reserves(vm(0)), vec![r]);
    // (The counter follows the ack's write.)
    assert!(eventually(WAIT, || store.stats().acks_sent == 1));
    assert_eq!(store.stats().reserves_received, 1);
    // Deltas, snapshots and forgets are not acknowledged.
    raw.send(&Message::Closed { seq: 8, key, at: 2 });
    raw.send(&Message::Forget {
        seq: 9,
        instances: vec![vm(1)],
    });
    raw.send(&reserve_msg(10, &reserve(vm(2), &[1])));
    let ack = raw.read_frame().expect("an ack");
    assert_eq!(Message::decode(&ack[4..]), Ok(Message::Ack { seq: 10 }));
}

#[test]
fn r10_4_a_malformed_reserve_closes_the_connection_and_is_counted() {
    let (srv, store) = server();
    let mut raw = RawSender::connect(srv.local_addr(), "gw-a", 1);
    let good = reserve(vm(0), &[1, 2]);
    raw.send(&reserve_msg(1, &good));
    assert!(raw.read_frame().is_some());
    raw.send(&reserve_msg(
        2,
        &reserve(vm(0), &vec![3; MAX_RESERVE_PORTS + 1]),
    ));
    assert!(raw.closed(), "the connection stays open");
    // (Counted just after the close.)
    assert!(
        eventually(WAIT, || store.stats().connections == 0),
        "{:?}",
        store.stats()
    );
    let st = store.stats();
    assert_eq!(st.malformed, 1, "{st:?}");
    assert!(
        st.last_error
            .as_deref()
            .unwrap_or("")
            .contains("1025 ports"),
        "{st:?}"
    );
    assert_eq!(store.reserves(vm(0)), vec![good]);
}

#[test]
fn r10_4_the_store_keeps_the_last_two_reserves_until_taken_or_forgotten() {
    let (srv, store) = server();
    let mut a = RawSender::connect(srv.local_addr(), "gw-a", 1);
    let r = |p: u16| reserve(vm(0), &[p, p + 1]);
    for (seq, p) in [(1, 10), (2, 20), (3, 30)] {
        a.send(&reserve_msg(seq, &r(p)));
        assert!(a.read_frame().is_some());
    }
    assert_eq!(store.reserves(vm(0)), vec![r(20), r(30)], "the last two");
    // A repeated reserve counts again.
    a.send(&reserve_msg(4, &r(30)));
    assert!(a.read_frame().is_some());
    assert_eq!(store.reserves(vm(0)), vec![r(30), r(30)]);
    a.send(&reserve_msg(5, &r(40)));
    assert!(a.read_frame().is_some());
    assert_eq!(store.reserves(vm(0)), vec![r(30), r(40)]);
    // Snapshots of the sender (with and without the instance's flows) and `take` leave them.
    a.send(&Message::Snapshot {
        seq_at_start: 5,
        instances: vec![vm(0), vm(1)],
        state: FlowState {
            flows: vec![FlowRecord {
                key: FlowKey {
                    proto: 6,
                    src: vm(0),
                    sport: 1,
                    dst: 2,
                    dport: 3,
                    public: ip("192.0.2.1"),
                    pport: 31,
                },
                last_seen: 1,
                close_at: 0,
                tcp_state: 0,
                born: 1,
            }],
            ..FlowState::default()
        },
    });
    assert!(eventually(WAIT, || store.stats().snapshots == 1));
    assert_eq!(store.reserves(vm(0)), vec![r(30), r(40)]);
    assert_eq!(store.take(&set(&[vm(0)])).flows.len(), 1);
    assert_eq!(store.reserves(vm(0)), vec![r(30), r(40)]);
    // Another sender's `Forget` leaves them; this sender's drops those numbered below it.
    let mut b = RawSender::connect(srv.local_addr(), "gw-b", 1);
    b.send(&Message::Forget {
        seq: 100,
        instances: vec![vm(0)],
    });
    assert!(eventually(WAIT, || store.stats().forgets == 1));
    assert_eq!(store.reserves(vm(0)), vec![r(30), r(40)]);
    a.send(&Message::Forget {
        seq: 5,
        instances: vec![vm(0)],
    });
    assert!(eventually(WAIT, || store.stats().forgets == 2));
    assert_eq!(
        store.reserves(vm(0)),
        vec![r(40)],
        "the one numbered 5 stays"
    );
    a.send(&Message::Forget {
        seq: 6,
        instances: vec![vm(0)],
    });
    assert!(eventually(WAIT, || store.stats().forgets == 3));
    assert!(store.reserves(vm(0)).is_empty());
    // A reserve arriving late (numbered below that `Forget`, from an older connection) is
    // acked but not kept.
    let mut late = RawSender::connect(srv.local_addr(), "gw-a", 1);
    late.send(&reserve_msg(4, &r(50)));
    assert!(late.read_frame().is_some());
    assert!(store.reserves(vm(0)).is_empty());
    // A newer incarnation's snapshot (which drops older incarnations' flows) leaves them.
    a.send(&reserve_msg(7, &r(60)));
    assert!(a.read_frame().is_some());
    b.send(&reserve_msg(1, &reserve(vm(1), &[70])));
    assert!(b.read_frame().is_some());
    let mut a2 = RawSender::connect(srv.local_addr(), "gw-a", 2);
    a2.send(&Message::Snapshot {
        seq_at_start: 0,
        instances: vec![vm(0)],
        state: FlowState::default(),
    });
    assert!(eventually(WAIT, || store.stats().snapshots == 2));
    assert_eq!(store.reserves(vm(0)), vec![r(60)]);
    // `take_reserves` removes and returns those of the instances asked for.
    assert_eq!(store.take_reserves(&set(&[vm(0), vm(3)])), vec![r(60)]);
    assert!(store.reserves(vm(0)).is_empty());
    assert!(store.take_reserves(&set(&[vm(0)])).is_empty());
    assert_eq!(store.reserves(vm(1)), vec![reserve(vm(1), &[70])]);
    let st = store.stats();
    assert_eq!(st.superseded, 1, "{st:?}");
    assert_eq!(st.reserves, 1, "{st:?}");
    drop((a, b, late, a2));
}

#[test]
fn r10_4_an_instance_with_only_a_reserve_is_listed() {
    let (srv, store) = server();
    let mut a = RawSender::connect(srv.local_addr(), "gw-a", 3);
    a.send(&reserve_msg(1, &reserve(vm(2), &[5000])));
    assert!(a.read_frame().is_some());
    let listed = store.instances();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let x = &listed[0];
    assert_eq!(
        (x.private_ip, x.flows, x.reserves, x.layout),
        (vm(2), 0, 1, false)
    );
    assert_eq!((x.origin.as_str(), x.incarnation), ("gw-a", 3));
    assert_eq!(store.stats().instances, 1);
    // With flows too: one entry, both counted.
    a.send(&Message::Opened {
        seq: 2,
        key: FlowKey {
            proto: 6,
            src: vm(2),
            sport: 1,
            dst: 2,
            dport: 3,
            public: ip("192.0.2.1"),
            pport: 5000,
        },
        at: 1,
    });
    assert!(eventually(WAIT, || store.stats().opened == 1));
    let listed = store.instances();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].flows, listed[0].reserves), (1, 1));
    // `take` leaves the reserve, and the instance listed; `take_reserves` ends it.
    assert_eq!(store.take(&set(&[vm(2)])).flows.len(), 1);
    let listed = store.instances();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].flows, listed[0].reserves), (0, 1));
    assert_eq!(store.take_reserves(&set(&[vm(2)])).len(), 1);
    assert!(store.instances().is_empty());
    assert_eq!(store.stats().instances, 0);
}

// ---------------------------------------------------------------------------------------------
// Property: after quiescence, every target's store equals the sender's live set.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// A flow of instance `.0` to destination `.1` opens.
    Open(u8, u8),
    /// The `.0`-th live flow (modulo) closes.
    Close(u16),
    /// A snapshot's cut: `request_snapshot`, then `seq()`.
    Begin,
    /// The export ends: a fuzzy cut chosen by the seed is sent.
    End(u64),
    /// Instance `.0` is replicated to server `.1` from now on.
    Retarget(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3u8, 0..3u8).prop_map(|(i, d)| Op::Open(i, d)),
        4 => any::<u16>().prop_map(Op::Close),
        1 => Just(Op::Begin),
        1 => any::<u64>().prop_map(Op::End),
        1 => (0..3u8, 0..2u8).prop_map(|(i, s)| Op::Retarget(i, s)),
    ]
}

struct Cut {
    s: u64,
    live0: HashSet<K>,
    opened: HashMap<K, FlowKey>,
    closed: HashSet<K>,
}

fn record(key: FlowKey) -> FlowRecord {
    FlowRecord {
        key,
        last_seen: 0,
        close_at: 0,
        tcp_state: 0,
        born: 0,
    }
}

fn coin(seed: u64, k: &K) -> bool {
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for v in [u64::from(k.1), u64::from(k.2), u64::from(k.6)] {
        h = (h ^ v).wrapping_mul(0x0100_0000_01b3);
        h ^= h >> 29;
    }
    h & 1 == 1
}

fn run_ops(ops: &[Op]) -> Result<(), TestCaseError> {
    let servers = [server(), server()];
    let addrs = [servers[0].0.local_addr(), servers[1].0.local_addr()];
    let insts = [vm(0), vm(1), vm(2)];
    let r = Replicator::new(node("gw-p"), 1);
    let mut to: HashMap<u32, usize> = insts.iter().enumerate().map(|(n, &i)| (i, n % 2)).collect();
    let tmap = |to: &HashMap<u32, usize>| -> HashMap<u32, SocketAddr> {
        to.iter().map(|(&i, &s)| (i, addrs[s])).collect()
    };
    r.set_targets(tmap(&to));
    prop_assert!(
        eventually(WAIT, || r.stats().connected == 2),
        "{:?}",
        r.stats()
    );
    let s0 = r.seq();
    r.offer_snapshot(&FlowState::default(), s0);
    prop_assert!(!r.needs_snapshot());

    let mut live: HashMap<K, FlowKey> = HashMap::new();
    let mut cut: Option<Cut> = None;
    let mut n: u16 = 0;
    let mut now: u32 = 1;
    let end_cut = |c: Cut, seed: u64, r: &Replicator| {
        let mut st = FlowState::default();
        let mut cands: Vec<(K, FlowKey)> = c.opened.iter().map(|(k, f)| (*k, *f)).collect();
        for k0 in &c.live0 {
            let f = FlowKey {
                proto: k0.0,
                src: k0.1,
                sport: k0.2,
                dst: k0.3,
                dport: k0.4,
                public: k0.5,
                pport: k0.6,
            };
            cands.push((*k0, f));
        }
        for (kk, f) in cands {
            let must = c.live0.contains(&kk) && !c.closed.contains(&kk);
            if must || coin(seed, &kk) {
                st.flows.push(record(f));
            }
        }
        r.offer_snapshot(&st, c.s);
    };
    for o in ops {
        now += 1;
        match *o {
            Op::Open(i, d) => {
                n += 1;
                let f = FlowKey {
                    proto: 6,
                    src: insts[i as usize],
                    sport: n,
                    dst: ip("198.51.100.1") + u32::from(d),
                    dport: 443,
                    public: ip("192.0.2.1"),
                    pport: 1024 + n,
                };
                live.insert(k(&f), f);
                if let Some(c) = cut.as_mut() {
                    c.opened.insert(k(&f), f);
                }
                r.offer(&[FlowChange::Opened {
                    at: now,
                    instance: "vm".into(),
                    slot: 0,
                    by_fast_path: false,
                    key: f,
                }]);
            }
            Op::Close(x) => {
                if live.is_empty() {
                    continue;
                }
                let mut ks: Vec<K> = live.keys().copied().collect();
                ks.sort_unstable();
                let kk = ks[x as usize % ks.len()];
                let f = live.remove(&kk).expect("live");
                if let Some(c) = cut.as_mut() {
                    c.closed.insert(kk);
                }
                r.offer(&[FlowChange::Closed {
                    at: now,
                    instance: "vm".into(),
                    slot: 0,
                    key: f,
                    cause: snatgw_core::EndCause::Rst,
                }]);
            }
            Op::Begin => {
                if cut.is_none() {
                    r.request_snapshot();
                    cut = Some(Cut {
                        s: r.seq(),
                        live0: live.keys().copied().collect(),
                        opened: HashMap::new(),
                        closed: HashSet::new(),
                    });
                }
            }
            Op::End(seed) => {
                if let Some(c) = cut.take() {
                    end_cut(c, seed, &r);
                }
            }
            Op::Retarget(i, s) => {
                to.insert(insts[i as usize], s as usize);
                r.set_targets(tmap(&to));
            }
        }
    }
    if let Some(c) = cut.take() {
        end_cut(c, 1, &r);
    }
    // Quiescence: answer needs_snapshot with the live set until the stores agree.
    let want = |i: u32| -> BTreeSet<K> {
        live.iter()
            .filter(|(_, f)| f.src == i)
            .map(|(kk, _)| *kk)
            .collect()
    };
    let full = FlowState {
        flows: live.values().map(|f| record(*f)).collect(),
        ..FlowState::default()
    };
    let ok = eventually(WAIT, || {
        if r.needs_snapshot() {
            let s = r.seq();
            r.offer_snapshot(&full, s);
        }
        r.flush(Duration::from_secs(1));
        insts.iter().all(|&i| {
            let t = to[&i];
            stored(&servers[t].1, &set(&[i])) == want(i)
                && stored(&servers[1 - t].1, &set(&[i])).is_empty()
        })
    });
    if !ok {
        let got: Vec<_> = insts
            .iter()
            .map(|&i| {
                (
                    i,
                    to[&i],
                    want(i).len(),
                    stored(&servers[0].1, &set(&[i])).len(),
                    stored(&servers[1].1, &set(&[i])).len(),
                )
            })
            .collect();
        return Err(TestCaseError::fail(format!(
            "stores differ from the live set after quiescence: (instance, target, live, on 0, on 1) {got:?}; sender {:?}; receivers {:?} / {:?}",
            r.stats(),
            servers[0].1.stats(),
            servers[1].1.stats()
        )));
    }
    for (_, st) in &servers {
        let s = st.stats();
        prop_assert_eq!(s.malformed, 0);
        prop_assert_eq!(s.merge_gaps, 0);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn r10_4_store_equals_the_senders_live_set_after_quiescence(ops in prop::collection::vec(op(), 1..120)) {
        run_ops(&ops)?;
    }
}
