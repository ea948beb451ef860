//! A fleet node's runtime hooks on in-memory queues (`MemIo`), without root: steering refused
//! packets to another node (SPEC R10.3), injecting the packets another node steered here, the
//! flow journal tap and the periodic flow-state export a node replicates (R10.4).
//!
//! Expected values come from the SPEC and the hooks' contracts: a packet for an instance this
//! node may not open flows for (`not_owned`, R10.2) or for a public port it has no flow on
//! (`unsolicited_inbound`) goes to the node `Steer::target` names, unchanged, and not out of
//! the queue; an injected packet is decided like a received one and leaves on the queue of
//! its side; an injected packet refused here is dropped, never steered again (no ping-pong).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use snatgw_control::EventLog;
use snatgw_core::engine::persist::FlowState;
use snatgw_core::{
    ActivitySource, Direction, DropReason, EndCause, Engine, FlowChange, FlowKey, Packet, Time,
    Topology, Verdict,
};
use snatgw_dataplane::Gateway;
use snatgw_io::{MemIo, MemIoHandle};
use snatgw_runtime::persist::{SavedState, Snapshotter, StateFile};
use snatgw_runtime::{
    Clock, FleetHooks, FleetSnap, Parts, Runtime, RuntimeOptions, Steer, Wake, INBOX_CAP,
};
use snatgw_wire::testutil;

/// Refused by the admission (another node owns it).
const VM1: &str = "10.0.1.10";
/// Admitted.
const VM2: &str = "10.0.1.11";
const SNAT: &str = "192.0.2.100";
const SERVER: &str = "198.51.100.7";
const IDLE: u32 = 30;
const WAIT: Duration = Duration::from_secs(10);
const BATCH: usize = 64;

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<Ipv4Addr>().expect("ip"))
}

fn topology() -> Topology {
    Topology::from_toml(&format!(
        r#"
[gateway]
seed = 7
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["{SNAT}"]
idle_timeout_secs = {IDLE}

[[availability_set]]
name = "as1"

[[instance]]
name = "vm1"
private_ip = "{VM1}"
availability_set = "as1"

[[instance]]
name = "vm2"
private_ip = "{VM2}"
availability_set = "as1"
"#
    ))
    .expect("test topology")
}

/// (source, source port, destination, destination port) of an IPv4 UDP or TCP packet.
fn addrs(p: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    (
        Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        u16::from_be_bytes([p[ihl], p[ihl + 1]]),
        Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]),
    )
}

fn addr(s: &str) -> Ipv4Addr {
    s.parse().expect("address")
}

/// A steering that records what it was asked and sent, and answers `answer(reason)`.
struct RecordingSteer {
    answer: fn(DropReason) -> Option<u32>,
    asked: Mutex<Vec<(Direction, DropReason)>>,
    sent: Mutex<Vec<(u32, Direction, Vec<u8>)>>,
    /// Whether the gateway lock was free at each `send` (it is never held by the worker).
    lock_free_at_send: Mutex<Vec<bool>>,
    gw: OnceLock<Arc<Mutex<Gateway>>>,
}

impl RecordingSteer {
    fn new(answer: fn(DropReason) -> Option<u32>) -> Arc<RecordingSteer> {
        Arc::new(RecordingSteer {
            answer,
            asked: Mutex::new(Vec::new()),
            sent: Mutex::new(Vec::new()),
            lock_free_at_send: Mutex::new(Vec::new()),
            gw: OnceLock::new(),
        })
    }

    fn sent(&self) -> Vec<(u32, Direction, Vec<u8>)> {
        self.sent.lock().expect("sent").clone()
    }

    fn asked(&self) -> Vec<(Direction, DropReason)> {
        self.asked.lock().expect("asked").clone()
    }
}

impl Steer for RecordingSteer {
    fn target(
        &self,
        _engine: &Engine,
        dir: Direction,
        reason: DropReason,
        _pkt: &[u8],
    ) -> Option<u32> {
        self.asked.lock().expect("asked").push((dir, reason));
        (self.answer)(reason)
    }

    fn send(&self, target: u32, dir: Direction, pkt: &[u8]) {
        if let Some(gw) = self.gw.get() {
            let free = !matches!(gw.try_lock(), Err(TryLockError::WouldBlock));
            self.lock_free_at_send.lock().expect("lock").push(free);
        }
        self.sent
            .lock()
            .expect("sent")
            .push((target, dir, pkt.to_vec()));
    }
}

/// What the journal tap saw.
#[derive(Default)]
struct Tapped {
    changes: Mutex<Vec<FlowChange>>,
    empty_calls: AtomicU64,
    /// Calls made while the gateway lock was free (the tap runs under it: must stay 0).
    unlocked_calls: AtomicU64,
    gw: OnceLock<Arc<Mutex<Gateway>>>,
}

struct Node {
    rt: Option<Runtime>,
    private: MemIoHandle,
    public: MemIoHandle,
    time: Arc<AtomicU32>,
}

impl Node {
    /// A runtime on MemIo whose engine admits new flows of VM2 only (VM1 belongs to another
    /// node), with `steer` and a journal tap into `tapped` when given.
    fn start(steer: Option<Arc<RecordingSteer>>, tapped: Option<Arc<Tapped>>) -> Node {
        let mut engine = Engine::new(topology(), 0).expect("engine");
        let vm1 = ip(VM1);
        engine.set_admission(Some(Arc::new(move |private| private != vm1)));
        let (priv_io, private) = MemIo::new();
        let (pub_io, public) = MemIo::new();
        let time = Arc::new(AtomicU32::new(0));
        let wakers: Vec<Wake> = [private.clone(), public.clone()]
            .into_iter()
            .map(|h| Box::new(move || h.wake()) as Wake)
            .collect();
        let parts = Parts {
            engine,
            clock: Clock::Manual(time.clone()),
            events: Arc::new(EventLog::new()),
            fast_path: None,
            recorder: None,
            wakers,
        };
        let mut hooks = FleetHooks::new();
        if let Some(s) = &steer {
            hooks = hooks.with_steer(s.clone());
        }
        if let Some(t) = &tapped {
            let t = t.clone();
            hooks = hooks.with_journal_tap(move |changes| {
                if changes.is_empty() {
                    t.empty_calls.fetch_add(1, Ordering::SeqCst);
                }
                if let Some(gw) = t.gw.get() {
                    if !matches!(gw.try_lock(), Err(TryLockError::WouldBlock)) {
                        t.unlocked_calls.fetch_add(1, Ordering::SeqCst);
                    }
                }
                t.changes.lock().expect("tap").extend_from_slice(changes);
            });
        }
        let opts = RuntimeOptions {
            batch: BATCH,
            probes: false,
            ..RuntimeOptions::default()
        };
        let rt = Runtime::start_with_hooks(parts, hooks, vec![priv_io], vec![pub_io], opts)
            .expect("runtime");
        if let Some(s) = &steer {
            let _ = s.gw.set(rt.gateway().clone());
        }
        if let Some(t) = &tapped {
            let _ = t.gw.set(rt.gateway().clone());
        }
        Node {
            rt: Some(rt),
            private,
            public,
            time,
        }
    }

    fn rt(&mut self) -> &mut Runtime {
        self.rt.as_mut().expect("running")
    }

    /// Waits until `done(fleet counters)` holds.
    fn wait_counters(&mut self, what: &str, done: impl Fn(&FleetSnap) -> bool) -> FleetSnap {
        let deadline = Instant::now() + WAIT;
        loop {
            let c = self.rt().fleet_counters();
            if done(&c) {
                return c;
            }
            assert!(Instant::now() < deadline, "{what}: {c:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits until the data plane counted `n` drops as `reason`.
    fn wait_drops(&mut self, reason: &str, n: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.rt().snapshot();
            let got = s.dataplane.drops.get(reason).copied().unwrap_or(0);
            if got >= n {
                assert_eq!(got, n, "{reason}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{reason}: {got} of {n} ({:?})",
                s.dataplane.drops
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Opens a flow of VM2 through the private queue; returns its public port.
    fn open_vm2_flow(&self, sport: u16) -> u16 {
        self.private
            .inject(&testutil::udp(ip(VM2), sport, ip(SERVER), 53, b"q"));
        let out = self.private.wait_sent(1, WAIT);
        assert_eq!(out.len(), 1, "VM2's datagram was not translated");
        let (src, port, _, _) = addrs(&out[0]);
        assert_eq!(src, addr(SNAT));
        port
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            let _ = rt.shutdown();
        }
    }
}

fn steer_refusals(r: DropReason) -> Option<u32> {
    match r {
        DropReason::NotOwned => Some(7),
        DropReason::UnsolicitedInbound => Some(3),
        _ => None,
    }
}

/// R10.3: an outbound packet of an instance another node owns (refused here as `not_owned`)
/// goes to `Steer::send` byte for byte, with the node `target` named, after the gateway lock
/// was released, and is not written to the private queue; the packet after it on the same
/// queue is translated as usual.
#[test]
fn r10_3_a_not_owned_outbound_packet_is_steered_unchanged_and_not_sent() {
    let steer = RecordingSteer::new(steer_refusals);
    let mut n = Node::start(Some(steer.clone()), None);
    let pkt = testutil::udp(ip(VM1), 5000, ip(SERVER), 53, b"not mine");
    n.private.inject(&pkt);
    let c = n.wait_counters("steered_out", |c| c.steered_out == 1);
    assert_eq!((c.steered_in, c.injected), (0, 0));
    assert_eq!(steer.sent(), vec![(7, Direction::Outbound, pkt)]);
    assert_eq!(
        steer.asked(),
        vec![(Direction::Outbound, DropReason::NotOwned)]
    );
    assert_eq!(*steer.lock_free_at_send.lock().expect("lock"), vec![true]);
    // Same queue, after it: VM2's packet is the only one written back.
    n.open_vm2_flow(6000);
    let out = n.private.take_sent();
    assert!(out.is_empty(), "sent besides VM2's packet: {out:?}");
    assert!(n.public.take_sent().is_empty());
    n.wait_drops("not_owned", 1);
    let s = n.rt().snapshot();
    assert_eq!(s.fleet.map(|f| f.steered_out), Some(1), "{:?}", s.fleet);
}

/// R10.3: an inbound packet to a public port this node has no flow on
/// (`unsolicited_inbound`) goes to the node `target` names, unchanged, and nowhere else.
#[test]
fn r10_3_an_unsolicited_inbound_packet_is_steered_unchanged() {
    let steer = RecordingSteer::new(steer_refusals);
    let mut n = Node::start(Some(steer.clone()), None);
    let pkt = testutil::udp(ip(SERVER), 53, ip(SNAT), 1500, b"whose?");
    n.public.inject(&pkt);
    n.wait_counters("steered_in", |c| c.steered_in == 1);
    assert_eq!(steer.sent(), vec![(3, Direction::Inbound, pkt)]);
    assert_eq!(
        steer.asked(),
        vec![(Direction::Inbound, DropReason::UnsolicitedInbound)]
    );
    n.wait_drops("unsolicited_inbound", 1);
    assert!(n.public.take_sent().is_empty() && n.private.take_sent().is_empty());
}

/// Refused packets `target` names no node for are dropped as without steering: counted
/// under their reason, sent nowhere.
#[test]
fn packets_the_target_declines_are_dropped_as_before() {
    let steer = RecordingSteer::new(|_| None);
    let mut n = Node::start(Some(steer.clone()), None);
    n.private
        .inject(&testutil::udp(ip(VM1), 5000, ip(SERVER), 53, b"q"));
    n.public
        .inject(&testutil::udp(ip(SERVER), 53, ip(SNAT), 1500, b"a"));
    n.wait_drops("not_owned", 1);
    n.wait_drops("unsolicited_inbound", 1);
    let mut asked = steer.asked();
    asked.sort_by_key(|(d, _)| *d == Direction::Inbound);
    assert_eq!(
        asked,
        vec![
            (Direction::Outbound, DropReason::NotOwned),
            (Direction::Inbound, DropReason::UnsolicitedInbound)
        ]
    );
    assert!(steer.sent().is_empty());
    let c = n.rt().fleet_counters();
    assert_eq!((c.steered_out, c.steered_in), (0, 0));
    // The workers have sent nothing since: a later admitted packet is the only output.
    n.open_vm2_flow(6000);
    assert!(n.private.take_sent().is_empty() && n.public.take_sent().is_empty());
}

/// An injected outbound packet (another node steered it here) is translated by the
/// private-side worker and leaves on the private queue with the public source (R1.3); the
/// reply, injected inbound, leaves on the public queue translated back to the instance.
#[test]
fn r10_3_injected_packets_are_translated_on_their_sides_queue() {
    let steer = RecordingSteer::new(|_| Some(9));
    let mut n = Node::start(Some(steer.clone()), None);
    let inj = n.rt().injector();
    assert!(inj.inject(
        Direction::Outbound,
        &testutil::udp(ip(VM2), 5000, ip(SERVER), 53, b"q")
    ));
    let out = n.private.wait_sent(1, WAIT);
    assert_eq!(out.len(), 1, "the injected packet did not come out");
    let (src, port, dst, dport) = addrs(&out[0]);
    assert_eq!((src, dst, dport), (addr(SNAT), addr(SERVER), 53));
    assert!(port >= 1024, "a SNAT port: {port}");
    assert!(n.public.take_sent().is_empty(), "nothing crosses sides");

    let inj2 = inj.clone();
    assert!(inj2.inject(
        Direction::Inbound,
        &testutil::udp(ip(SERVER), 53, ip(SNAT), port, b"a")
    ));
    let back = n.public.wait_sent(1, WAIT);
    assert_eq!(back.len(), 1, "the injected reply did not come out");
    assert_eq!(addrs(&back[0]), (addr(SERVER), 53, addr(VM2), 5000));
    assert!(n.private.take_sent().is_empty());
    let c = n.rt().fleet_counters();
    assert_eq!(
        (c.injected, c.injected_dropped, c.injected_refused),
        (2, 0, 0)
    );
    assert!(steer.asked().is_empty() && steer.sent().is_empty());
}

/// An injected packet the gateway refuses is dropped and never steered again, even with a
/// steering that would send every refusal somewhere (no ping-pong between two nodes whose
/// views of ownership differ for a moment).
#[test]
fn r10_3_a_refused_injected_packet_is_dropped_not_steered() {
    let steer = RecordingSteer::new(|_| Some(5));
    let mut n = Node::start(Some(steer.clone()), None);
    let inj = n.rt().injector();
    assert!(inj.inject(
        Direction::Outbound,
        &testutil::udp(ip(VM1), 5000, ip(SERVER), 53, b"q")
    ));
    assert!(inj.inject(
        Direction::Inbound,
        &testutil::udp(ip(SERVER), 53, ip(SNAT), 1500, b"a")
    ));
    let c = n.wait_counters("injected_refused", |c| c.injected_refused == 2);
    assert_eq!((c.injected, c.steered_out, c.steered_in), (2, 0, 0));
    n.wait_drops("not_owned", 1);
    n.wait_drops("unsolicited_inbound", 1);
    assert!(steer.asked().is_empty(), "{:?}", steer.asked());
    assert!(steer.sent().is_empty());
    n.open_vm2_flow(6000);
    assert!(n.private.take_sent().is_empty() && n.public.take_sent().is_empty());
}

/// A side's inbox holds `INBOX_CAP` packets: while its worker cannot take any (the gateway
/// lock is held here), injections beyond that return false and are counted; the queued ones
/// are all decided once the lock is free.
#[test]
fn a_full_inbox_refuses_and_counts() {
    let mut n = Node::start(None, None);
    let inj = n.rt().injector();
    let gw = n.rt().gateway().clone();
    let total = INBOX_CAP + 200;
    let pkt = testutil::udp(ip(SERVER), 53, ip(SNAT), 1500, b"a");
    let (mut ok, mut refused) = (0u64, 0u64);
    {
        let _held = gw.lock().expect("gw");
        for _ in 0..total {
            if inj.inject(Direction::Inbound, &pkt) {
                ok += 1;
            } else {
                refused += 1;
            }
        }
    }
    // The worker may have taken one batch out before it blocked on the lock.
    assert!(
        refused >= (total - INBOX_CAP - BATCH) as u64,
        "{refused} refused"
    );
    assert_eq!(ok + refused, total as u64);
    let c = n.wait_counters("all decided", |c| c.injected_refused == ok);
    assert_eq!((c.injected, c.injected_dropped), (ok, refused));
    n.wait_drops("unsolicited_inbound", ok);
    // A stopped runtime takes nothing.
    n.rt().stop_handle().stop();
    assert!(!inj.inject(Direction::Inbound, &pkt));
    assert_eq!(n.rt().fleet_counters().injected_dropped, refused + 1);
}

/// R10.4: the journal tap sees a flow's open, then its close (idle, R3.4), in order, with
/// the same translation; it runs under the gateway lock and is never called empty.
#[test]
fn r10_4_the_journal_tap_sees_opened_then_closed_in_order() {
    let tapped = Arc::new(Tapped::default());
    let mut n = Node::start(None, Some(tapped.clone()));
    let port = n.open_vm2_flow(5000);
    n.time.store(IDLE + 1, Ordering::SeqCst);
    n.rt().housekeep();
    let changes = tapped.changes.lock().expect("tap").clone();
    let kinds: Vec<(&str, FlowKey)> = changes
        .iter()
        .map(|c| match c {
            FlowChange::Opened { key, .. } => ("opened", *key),
            FlowChange::Closed { key, cause, .. } => {
                assert_eq!(*cause, EndCause::Idle);
                ("closed", *key)
            }
            FlowChange::Refused { key, .. } => ("refused", *key),
        })
        .collect();
    let key = FlowKey {
        proto: 17,
        src: ip(VM2),
        sport: 5000,
        dst: ip(SERVER),
        dport: 53,
        public: ip(SNAT),
        pport: port,
    };
    assert_eq!(kinds, vec![("opened", key), ("closed", key)]);
    assert_eq!(tapped.empty_calls.load(Ordering::SeqCst), 0);
    assert_eq!(tapped.unlocked_calls.load(Ordering::SeqCst), 0);
    let c = n.rt().fleet_counters();
    assert_eq!((c.journal_tapped, c.journal_lost), (2, 0));
    assert_eq!(n.rt().journal_mark()(), 2);
}

fn open_flows(e: &mut Engine, now: u32, first_port: u16, n: u16) {
    for sp in first_port..first_port + n {
        let p = Packet::udp(ip(VM2), sp, ip(SERVER), 53);
        assert!(matches!(
            e.process(now, Direction::Outbound, &p),
            Verdict::Translate { .. }
        ));
    }
}

/// The kernel's map as a snapshotter reads it: a last packet for some flows.
struct FakeSeen(Vec<(FlowKey, Time)>);

impl ActivitySource for FakeSeen {
    fn last_seen(&mut self, key: &FlowKey) -> Option<Time> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, t)| *t)
    }
}

/// R10.4: a snapshotter without a state file hands each periodic export to its hook (the
/// engine's flows, the kernel's later last-seen times merged and capped at the export's
/// time, the mark read under the lock), and a last one at finish with the flows opened
/// since.
#[test]
fn r10_4_the_export_hook_gets_the_flows_without_a_file() {
    let mut e = Engine::new(topology(), 0).expect("engine");
    open_flows(&mut e, 1, 10_000, 20);
    e.advance(10);
    let keys: Vec<FlowKey> = e.live_flow_keys().map(|(_, k)| k).collect();
    let (k1, k2) = (keys[0], keys[1]);
    let gw = Arc::new(Mutex::new(Gateway::new(e)));
    let got: Arc<Mutex<Vec<(FlowState, u64)>>> = Arc::default();
    let mark = Arc::new(AtomicU64::new(42));
    let snap = {
        let (got, mark) = (got.clone(), mark.clone());
        Snapshotter::builder(gw.clone(), 123, Duration::from_millis(50))
            .seen(Box::new(FakeSeen(vec![(k1, 8), (k2, 500)])))
            .mark(move || mark.load(Ordering::SeqCst))
            .on_export(move |s: &SavedState, m| {
                assert_eq!(s.origin_ns, 123);
                got.lock().expect("got").push((s.flows.clone(), m));
            })
            .start()
    };
    let c = snap.counters();
    let t = Instant::now();
    while c.exported.load(Ordering::SeqCst) < 2 {
        assert!(t.elapsed() < WAIT, "no export");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(c.written.load(Ordering::SeqCst), 0, "no file to write");
    {
        let got = got.lock().expect("got");
        let (flows, m) = &got[0];
        assert_eq!(*m, 42);
        assert_eq!(flows.time, 10);
        assert_eq!(flows.flows.len(), 20);
        let last = |k: FlowKey| flows.flows.iter().find(|f| f.key == k).map(|f| f.last_seen);
        assert_eq!(last(k1), Some(8), "the kernel's later packet");
        assert_eq!(last(k2), Some(10), "capped at the export's time");
        assert_eq!(last(keys[2]), Some(1), "the engine's own");
    }
    open_flows(gw.lock().expect("gw").engine_mut(), 11, 20_000, 5);
    mark.store(43, Ordering::SeqCst);
    snap.finish().expect("last export");
    let got = got.lock().expect("got");
    let (flows, m) = got.last().expect("last");
    assert_eq!((flows.flows.len(), *m), (25, 43));
}

/// The mark a runtime gives a snapshotter (`Runtime::journal_mark`) counts the changes the
/// tap was handed; an export made after a flow opened carries it and the flow.
#[test]
fn r10_4_the_journal_mark_splits_the_tap_at_the_export() {
    let tapped = Arc::new(Tapped::default());
    let mut n = Node::start(None, Some(tapped.clone()));
    n.open_vm2_flow(5000);
    let got: Arc<Mutex<Vec<(usize, u64)>>> = Arc::default();
    let snap = {
        let got = got.clone();
        Snapshotter::builder(n.rt().gateway().clone(), 0, Duration::from_secs(60))
            .mark(n.rt().journal_mark())
            .on_export(move |s, m| got.lock().expect("got").push((s.flows.flows.len(), m)))
            .start()
    };
    snap.finish().expect("finish");
    let got = got.lock().expect("got");
    assert!(!got.is_empty());
    assert!(got.iter().all(|&g| g == (1, 1)), "{got:?}");
}

/// A snapshotter given neither a file nor a hook runs nothing; one with a file still
/// writes it (`Snapshotter::start` is the builder with a file).
#[test]
fn a_snapshotter_with_nowhere_to_export_runs_nothing() {
    let gw = Arc::new(Mutex::new(Gateway::new(
        Engine::new(topology(), 0).expect("engine"),
    )));
    let s = Snapshotter::builder(gw.clone(), 0, Duration::from_millis(10)).start();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.counters().exported.load(Ordering::SeqCst), 0);
    s.finish().expect("nothing to do");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = StateFile::in_dir(dir.path());
    Snapshotter::start(gw, file.clone(), 5, Duration::from_secs(60))
        .finish()
        .expect("written");
    assert_eq!(file.read().expect("read").expect("file").origin_ns, 5);
}
