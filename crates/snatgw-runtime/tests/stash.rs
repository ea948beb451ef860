//! Port stashes through the runtime (issue #17), on in-memory queues with a fake kernel: the
//! runtime's real workers, stash thread, `Feed` and keeper; a fake fast path that holds the
//! rings, opens flows from them as the tc program does (pop a port, make both map entries,
//! write an `Opened` record), and reports FIN/RST records.
//!
//! Expected values come from the SPEC: R2.3 (a stash holds the ports the allocator would give
//! that destination's next flows, in that order: checked against a second engine that is given
//! the same flows as SYNs), R2.2 (the map holds exactly the engine's flows; no port is used
//! twice), R3.3 (the RST timer runs from the kernel's second), R9.2 (limits), not from the
//! code under test.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snatgw_control::EventLog;
use snatgw_core::engine::stash::StashKey;
use snatgw_core::{
    proto, tcp_flags, ActivitySource, Direction, Engine, FlowKey, Packet, Time, Topology, Verdict,
};
use snatgw_io::{MemIo, MemIoHandle};
use snatgw_runtime::fastpath::{KernelEventKind, KernelTcpEvent, OffloadSink, TcpEventSource};
use snatgw_runtime::stash::{StashSink, RETIRE_GRACE, STASH_PORTS};
use snatgw_runtime::{Clock, Parts, Runtime, RuntimeOptions, Wake};
use snatgw_wire::testutil;

const VM: &str = "10.0.1.10";
const SNAT: &str = "192.0.2.100";
const SERVER: &str = "198.51.100.7";
const IDLE: u32 = 30;
const RST: u32 = 15;

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
rst_timeout_secs = {RST}

[[availability_set]]
name = "as1"

[[instance]]
name = "vm1"
private_ip = "{VM}"
availability_set = "as1"
"#
    ))
    .expect("test topology")
}

/// `(proto, source, source port, destination, destination port, outbound?)`.
type MapKey = (u8, u32, u16, u32, u16, bool);

fn map_entries(k: &FlowKey) -> [(MapKey, (u32, u16)); 2] {
    [
        (
            (k.proto, k.src, k.sport, k.dst, k.dport, true),
            (k.public, k.pport),
        ),
        (
            (k.proto, k.dst, k.dport, k.public, k.pport, false),
            (k.src, k.sport),
        ),
    ]
}

#[derive(Default)]
struct Ring {
    key: Option<StashKey>,
    public: u32,
    ports: VecDeque<u16>,
    taken: u32,
}

/// The fake kernel: flow map, rings, EVENTS records.
#[derive(Default)]
struct Kernel {
    map: BTreeMap<MapKey, (u32, u16)>,
    rings: Vec<Ring>,
    events: Vec<KernelTcpEvent>,
    /// Every port any ring handed out, with its destination, for the R2.2 check.
    popped: Vec<(StashKey, u16)>,
    /// Installs the runtime made (flows the engine decided itself).
    installs: usize,
}

type K = Arc<Mutex<Kernel>>;

impl Kernel {
    /// The tc program's SYN path: `Some(public port)` if a ring opened the flow, `None` if the
    /// SYN would go up (an entry exists, no ring, or the ring is empty).
    fn syn(&mut self, at: Time, src: u32, sport: u16, dst: u32, dport: u16) -> Option<u16> {
        if self
            .map
            .contains_key(&(proto::TCP, src, sport, dst, dport, true))
        {
            return None;
        }
        let want = StashKey { src, dst, dport };
        let r = self.rings.iter_mut().find(|r| r.key == Some(want))?;
        let port = r.ports.pop_front()?;
        r.taken += 1;
        let key = FlowKey {
            proto: proto::TCP,
            src,
            sport,
            dst,
            dport,
            public: r.public,
            pport: port,
        };
        for (k, v) in map_entries(&key) {
            self.map.insert(k, v);
        }
        self.popped.push((want, port));
        self.events.push(KernelTcpEvent {
            kind: KernelEventKind::Opened,
            at,
            key,
            flags: 0x02,
            dir: Direction::Outbound,
        });
        Some(port)
    }
}

struct Sink(K);
impl StashSink for Sink {
    fn slots(&self) -> u32 {
        self.0.lock().expect("k").rings.len() as u32
    }
    fn bind(&mut self, slot: u32, key: StashKey, public: u32, _inst: u32) -> bool {
        let mut k = self.0.lock().expect("k");
        let r = &mut k.rings[slot as usize];
        assert!(r.ports.is_empty(), "bound a ring that is not empty");
        r.key = Some(key);
        r.public = public;
        true
    }
    fn push(&mut self, slot: u32, pports: &[u16]) -> usize {
        let mut k = self.0.lock().expect("k");
        let r = &mut k.rings[slot as usize];
        let room = STASH_PORTS as usize - r.ports.len();
        let n = room.min(pports.len());
        r.ports.extend(&pports[..n]);
        n
    }
    fn queued(&self, slot: u32) -> u32 {
        self.0.lock().expect("k").rings[slot as usize].ports.len() as u32
    }
    fn taken(&self, slot: u32) -> u32 {
        self.0.lock().expect("k").rings[slot as usize].taken
    }
    fn unbind(&mut self, key: StashKey) {
        let mut k = self.0.lock().expect("k");
        for r in k.rings.iter_mut().filter(|r| r.key == Some(key)) {
            r.key = None;
        }
    }
    fn reset(&mut self, slot: u32) -> Vec<u16> {
        let mut k = self.0.lock().expect("k");
        k.rings[slot as usize].ports.drain(..).collect()
    }
    fn clear(&mut self) {
        let mut k = self.0.lock().expect("k");
        for r in k.rings.iter_mut() {
            r.key = None;
            r.ports.clear();
        }
    }
}

struct Events(K);
impl TcpEventSource for Events {
    fn drain(&mut self, out: &mut Vec<KernelTcpEvent>) {
        out.append(&mut self.0.lock().expect("k").events);
    }
}

struct Offload(K);
impl OffloadSink for Offload {
    fn install(&mut self, flows: &[(u32, FlowKey)]) {
        let mut k = self.0.lock().expect("k");
        k.installs += flows.len();
        for (_, key) in flows {
            for (mk, v) in map_entries(key) {
                k.map.insert(mk, v);
            }
        }
    }
    fn remove(&mut self, flows: &[FlowKey]) {
        let mut k = self.0.lock().expect("k");
        for key in flows {
            for (mk, _) in map_entries(key) {
                k.map.remove(&mk);
            }
        }
    }
    fn clear(&mut self) {
        self.0.lock().expect("k").map.clear();
    }
}

struct NoActivity;
impl ActivitySource for NoActivity {
    fn last_seen(&mut self, _key: &FlowKey) -> Option<Time> {
        None
    }
}

struct Gw {
    rt: Option<Runtime>,
    private: MemIoHandle,
    _public: MemIoHandle,
    time: Arc<AtomicU32>,
    k: K,
}

impl Gw {
    fn start(rings: usize) -> Gw {
        let mut engine = Engine::new(topology(), 0).expect("engine");
        engine.set_offload(Some(Box::new(NoActivity)));
        let k: K = Arc::new(Mutex::new(Kernel {
            rings: (0..rings).map(|_| Ring::default()).collect(),
            ..Kernel::default()
        }));
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
        let opts = RuntimeOptions {
            batch: 64,
            probes: false,
            ..RuntimeOptions::default()
        };
        let rt = Runtime::start_with_stash(
            parts,
            Box::new(Offload(k.clone())),
            Box::new(Events(k.clone())),
            Box::new(Sink(k.clone())),
            vec![priv_io],
            vec![pub_io],
            opts,
        )
        .expect("runtime");
        Gw {
            rt: Some(rt),
            private,
            _public: public,
            time,
            k,
        }
    }

    fn rt(&mut self) -> &mut Runtime {
        self.rt.as_mut().expect("running")
    }

    fn with_engine<T>(&mut self, f: impl FnOnce(&Engine) -> T) -> T {
        let gw = self.rt().gateway().clone();
        let g = gw.lock().expect("gw");
        f(g.engine())
    }

    /// A SYN through the engine (the TUN path); returns its public port.
    fn syn_up(&mut self, sport: u16) -> u16 {
        self.private
            .inject(&testutil::tcp_syn(ip(VM), sport, ip(SERVER), 443));
        let out = self.private.wait_sent(1, Duration::from_secs(10));
        assert_eq!(out.len(), 1, "the SYN was not translated");
        let p = &out[0];
        u16::from_be_bytes([p[20], p[21]])
    }

    /// Waits until `cond` holds of the kernel (the stash thread runs every few ms).
    fn wait(&self, what: &str, cond: impl Fn(&Kernel) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond(&self.k.lock().expect("k")) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// R2.2: the fake map holds exactly the engine's live flows' entries.
    fn assert_map_is_the_engines(&mut self) {
        let want: BTreeMap<MapKey, (u32, u16)> = self.with_engine(|e| {
            e.live_flow_keys()
                .flat_map(|(_, k)| map_entries(&k))
                .collect()
        });
        let k = self.k.lock().expect("k");
        assert!(k.map == want, "the map differs from the engine's flows");
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            let _ = rt.shutdown();
        }
    }
}

fn key() -> StashKey {
    StashKey {
        src: ip(VM),
        dst: ip(SERVER),
        dport: 443,
    }
}

/// R2.3: after a few SYNs to one destination go up, the runtime gives the kernel a ring of
/// ports for it, and those are the ports the engine would have given the next SYNs itself, in
/// that order (a second engine decides the same SYNs as packets). The kernel then opens flows
/// from it; the engine has them within milliseconds, the map holds exactly the engine's flows
/// (the engine did not install the kernel's flows a second time), and each port was used once.
#[test]
fn r2_3_the_kernel_opens_flows_on_the_ports_the_engine_would_have_chosen() {
    let mut g = Gw::start(8);
    let mut twin = Engine::new(topology(), 0).expect("twin");
    let mut up = Vec::new();
    for s in 0..4u16 {
        up.push(g.syn_up(40_000 + s));
    }
    g.wait("a ring for the hot destination", |k| {
        k.rings
            .iter()
            .any(|r| r.key == Some(key()) && r.ports.len() == STASH_PORTS as usize)
    });
    let ring: Vec<u16> = {
        let k = g.k.lock().expect("k");
        let r = k.rings.iter().find(|r| r.key == Some(key())).expect("ring");
        assert_eq!(r.public, ip(SNAT), "R1.3: the default SNAT address");
        r.ports.iter().copied().collect()
    };
    // The twin decides the same four SYNs, then STASH_PORTS more to the same destination.
    let mut twin_ports = Vec::new();
    for s in 0..(4 + STASH_PORTS as u16) {
        let syn = Packet::tcp(ip(VM), 40_000 + s, ip(SERVER), 443, tcp_flags::SYN);
        match twin.process(0, Direction::Outbound, &syn) {
            Verdict::Translate { port, .. } => twin_ports.push(port),
            v => panic!("the twin refused a SYN: {v:?}"),
        }
    }
    assert_eq!(up, twin_ports[..4], "the engine-decided SYNs");
    assert_eq!(
        ring,
        twin_ports[4..],
        "R2.3: the ring is the allocator's next choices for that destination"
    );

    // The kernel opens 10 flows at second 3.
    g.time.store(3, Ordering::SeqCst);
    let mut opened = Vec::new();
    for s in 100..110u16 {
        let p =
            g.k.lock()
                .expect("k")
                .syn(3, ip(VM), 40_000 + s, ip(SERVER), 443)
                .expect("opened from the ring");
        opened.push(p);
    }
    assert_eq!(opened, twin_ports[4..14]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.with_engine(|e| e.live_flows()) < 14 {
        assert!(Instant::now() < deadline, "the engine never took the flows");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        g.k.lock().expect("k").installs,
        4,
        "only the engine-decided flows were installed by the runtime"
    );
    g.assert_map_is_the_engines();
    let ports: BTreeSet<u16> =
        g.with_engine(|e| e.live_flow_keys().map(|(_, k)| k.pport).collect());
    assert_eq!(
        ports.len(),
        14,
        "R2.2: one port per flow to one destination"
    );
}

/// R3.3: a flow the kernel opened and then saw a RST for at second 5 releases its port at
/// 5 + 15, to the second, and its entries leave the map then.
#[test]
fn r3_3_a_kernel_opened_flow_rst_timer_runs_from_the_kernels_second() {
    let mut g = Gw::start(4);
    for s in 0..4u16 {
        g.syn_up(41_000 + s);
    }
    g.wait("a ring", |k| {
        k.rings
            .iter()
            .any(|r| r.key == Some(key()) && !r.ports.is_empty())
    });
    g.time.store(2, Ordering::SeqCst);
    let port =
        g.k.lock()
            .expect("k")
            .syn(2, ip(VM), 41_500, ip(SERVER), 443)
            .expect("opened");
    let flow = FlowKey {
        proto: proto::TCP,
        src: ip(VM),
        sport: 41_500,
        dst: ip(SERVER),
        dport: 443,
        public: ip(SNAT),
        pport: port,
    };
    g.k.lock().expect("k").events.push(KernelTcpEvent {
        kind: KernelEventKind::Tcp,
        at: 5,
        key: flow,
        flags: 0x04,
        dir: Direction::Inbound,
    });
    let live = |g: &mut Gw| g.with_engine(|e| e.live_flow_keys().any(|(_, k)| k == flow));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !live(&mut g) {
        assert!(
            Instant::now() < deadline,
            "the flow never reached the engine"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(30)); // the RST record is applied too
    g.time.store(5 + RST - 1, Ordering::SeqCst);
    g.rt().housekeep();
    assert!(
        live(&mut g),
        "R3.3: still held one second before the RST timeout"
    );
    g.time.store(5 + RST, Ordering::SeqCst);
    g.rt().housekeep();
    assert!(!live(&mut g), "R3.3: released at RST + {RST} s");
    g.assert_map_is_the_engines();
}

/// A ring the kernel takes nothing from is retired: unbound, and after the grace its ports go
/// back to the engine (no port stays stashed for a destination nobody calls); a shutdown gives
/// every port back too.
#[test]
fn idle_rings_give_their_ports_back() {
    let mut g = Gw::start(4);
    for s in 0..4u16 {
        g.syn_up(42_000 + s);
    }
    g.wait("a ring", |k| {
        k.rings
            .iter()
            .any(|r| r.key == Some(key()) && !r.ports.is_empty())
    });
    assert!(g.with_engine(|e| e.stash_stats().ports_stashed) > 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.with_engine(|e| e.stash_stats().ports_stashed) > 0 {
        assert!(
            Instant::now() < deadline,
            "the idle ring's ports never came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        g.k.lock().expect("k").rings.iter().all(|r| r.key.is_none()),
        "the kernel no longer finds the ring"
    );
    let _ = RETIRE_GRACE;
}

/// At a stop, every ring is unbound and its ports go back to the engine before the last
/// snapshot.
#[test]
fn shutdown_returns_every_stashed_port() {
    let mut g = Gw::start(4);
    for s in 0..4u16 {
        g.syn_up(43_000 + s);
    }
    g.wait("a ring", |k| {
        k.rings
            .iter()
            .any(|r| r.key == Some(key()) && !r.ports.is_empty())
    });
    let rt = g.rt.take().expect("rt");
    let gw = rt.gateway().clone();
    rt.shutdown().expect("shutdown");
    let g2 = gw.lock().expect("gw");
    assert_eq!(g2.engine().stash_stats().ports_stashed, 0);
    assert!(g.k.lock().expect("k").rings.iter().all(|r| r.key.is_none()));
}

/// R1.4/R2.9 with stashes: a configuration change that takes an instance's ports away voids its
/// stashes, and the runtime's after-change hook (run under the same hold of the gateway lock
/// as the change) unbinds the kernel's ring before the lock is released, so no worker can give
/// a voided port to another flow while the kernel could still take it.
#[test]
fn r2_9_a_change_that_voids_a_stash_unbinds_its_ring_in_the_same_lock_hold() {
    let mut g = Gw::start(4);
    for s in 0..4u16 {
        g.syn_up(44_000 + s);
    }
    g.wait("a ring", |k| {
        k.rings
            .iter()
            .any(|r| r.key == Some(key()) && !r.ports.is_empty())
    });
    let hook = g.rt().after_change_hook();
    let gw = g.rt().gateway().clone();
    let mut gl = gw.lock().expect("gw");
    // The instance leaves (R1.4: its preallocation is reclaimed).
    let empty = Topology::from_toml(&format!(
        r#"
[gateway]
seed = 7
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["{SNAT}"]
idle_timeout_secs = {IDLE}
rst_timeout_secs = {RST}
"#
    ))
    .expect("topology");
    gl.engine_mut().apply(1, empty).expect("apply");
    hook(&mut gl);
    assert!(
        g.k.lock().expect("k").rings.iter().all(|r| r.key.is_none()),
        "the ring was unbound before the lock was released"
    );
    assert_eq!(gl.engine().stash_stats().ports_stashed, 0);
    drop(gl);
}
