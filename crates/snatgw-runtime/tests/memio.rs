//! Whole-gateway scenarios on in-memory queues (`MemIo`), without root (issue #16): the
//! runtime's real workers, housekeeping tick, stats snapshot, event log and offload calls (a
//! fake kernel map fed from the engine's journal, as the real one is), with packets built by
//! `snatgw-wire`'s test utilities and a clock the test sets.
//!
//! Expected values come from the SPEC (direction by queue R9.1, idle timeout R3.4, RST
//! R3.3, the 1024-port preallocation of a small pool R2.8, exhaustion R2.6), not from the
//! code under test.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snatgw_control::EventLog;
use snatgw_core::{ActivitySource, Engine, FlowKey, Time, Topology};
use snatgw_io::{IoStats, MemIo, MemIoHandle, PacketBatch, PacketIo};
use snatgw_runtime::fastpath::OffloadSink;
use snatgw_runtime::record::Recorder;
use snatgw_runtime::stats::Snapshot;
use snatgw_runtime::{Clock, Parts, Runtime, RuntimeError, RuntimeOptions, Wake};
use snatgw_wire::testutil;

const VM: &str = "10.0.1.10";
const SNAT: &str = "192.0.2.100";
const SERVER: &str = "198.51.100.7";
/// The idle timeout of the test topology, seconds (R3.4: the operator may set another value).
const IDLE: u32 = 30;
/// The RST timeout (R3.3).
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

/// A key of the fake kernel map, as the real program's: `(proto, source, source port,
/// destination, destination port, outbound?)`.
type MapKey = (u8, u32, u16, u32, u16, bool);

/// What a fake offload was told, and what it answers for last-seen.
#[derive(Default)]
struct OffloadLog {
    installed: Vec<(u32, FlowKey)>,
    removed: Vec<FlowKey>,
    /// Each call in order: (install?, flows in the call).
    calls: Vec<(bool, usize)>,
    /// The map a kernel would hold after those calls, entry by entry as the real one (two
    /// keys per flow; installing replaces, removing deletes whatever is under the key): a
    /// remove applied after the install of a flow that reuses its public port would delete
    /// the new flow's inbound entry here too.
    map: BTreeMap<MapKey, (u32, u16)>,
    last_seen: Option<Time>,
}

/// The two map entries of a flow: outbound by private 5-tuple (→ public endpoint), inbound by
/// the remote's packet to the public endpoint (→ private endpoint).
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

struct FakeOffload(Arc<Mutex<OffloadLog>>);

impl OffloadSink for FakeOffload {
    fn install(&mut self, flows: &[(u32, FlowKey)]) {
        let mut l = self.0.lock().expect("log");
        l.calls.push((true, flows.len()));
        for (slot, key) in flows {
            l.installed.push((*slot, *key));
            for (k, v) in map_entries(key) {
                l.map.insert(k, v);
            }
        }
    }
    fn remove(&mut self, flows: &[FlowKey]) {
        let mut l = self.0.lock().expect("log");
        l.calls.push((false, flows.len()));
        for key in flows {
            l.removed.push(*key);
            for (k, _) in map_entries(key) {
                l.map.remove(&k);
            }
        }
    }
    fn clear(&mut self) {
        self.0.lock().expect("log").map.clear();
    }
}

struct FakeActivity(Arc<Mutex<OffloadLog>>);

impl ActivitySource for FakeActivity {
    fn last_seen(&mut self, _key: &FlowKey) -> Option<Time> {
        self.0.lock().expect("log").last_seen
    }
}

struct Gw {
    rt: Option<Runtime>,
    private: MemIoHandle,
    public: MemIoHandle,
    time: Arc<AtomicU32>,
    events: Arc<EventLog>,
    dir: tempfile::TempDir,
}

impl Gw {
    fn start(offload: Option<Arc<Mutex<OffloadLog>>>) -> Gw {
        Self::start_with(offload, None)
    }

    /// With a fake offload (its activity source given to the engine, its map writer to the
    /// runtime) and/or a flow recorder writing to `record`.
    fn start_with(offload: Option<Arc<Mutex<OffloadLog>>>, record: Option<&str>) -> Gw {
        let mut engine = Engine::new(topology(), 0).expect("engine");
        if let Some(log) = &offload {
            engine.set_offload(Some(Box::new(FakeActivity(log.clone()))));
        }
        let (priv_io, private) = MemIo::new();
        let (pub_io, public) = MemIo::new();
        let time = Arc::new(AtomicU32::new(0));
        let events = Arc::new(EventLog::new());
        let dir = tempfile::tempdir().expect("tempdir");
        let recorder =
            record.map(|name| Recorder::start(&dir.path().join(name)).expect("recorder"));
        let wakers: Vec<Wake> = [private.clone(), public.clone()]
            .into_iter()
            .map(|h| Box::new(move || h.wake()) as Wake)
            .collect();
        let parts = Parts {
            engine,
            clock: Clock::Manual(time.clone()),
            events: events.clone(),
            fast_path: None,
            recorder,
            wakers,
        };
        let opts = RuntimeOptions {
            batch: 64,
            stats_file: Some(dir.path().join("stats.json")),
            stats_interval: Duration::ZERO,
            probes: false,
            ..RuntimeOptions::default()
        };
        let rt = match offload {
            Some(log) => Runtime::start_with_offload(
                parts,
                Box::new(FakeOffload(log)),
                vec![priv_io],
                vec![pub_io],
                opts,
            ),
            None => Runtime::start(parts, vec![priv_io], vec![pub_io], opts),
        }
        .expect("runtime");
        Gw {
            rt: Some(rt),
            private,
            public,
            time,
            events,
            dir,
        }
    }

    fn rt(&mut self) -> &mut Runtime {
        self.rt.as_mut().expect("running")
    }

    /// Sets the clock and runs one housekeeping tick.
    fn at(&mut self, t: u32) {
        self.time.store(t, Ordering::SeqCst);
        self.rt().housekeep();
    }

    fn live_flows(&mut self) -> usize {
        self.rt()
            .gateway()
            .lock()
            .expect("gw")
            .engine()
            .live_flows()
    }

    /// R2.2: the fake kernel map holds exactly the entries of the engine's live flows: none of
    /// a released port's old owner, all of every live flow's.
    fn assert_map_is_the_engines(&mut self, log: &Mutex<OffloadLog>) {
        let want: BTreeMap<MapKey, (u32, u16)> = {
            let gw = self.rt().gateway().clone();
            let g = gw.lock().expect("gw");
            g.engine()
                .live_flow_keys()
                .flat_map(|(_, k)| map_entries(&k))
                .collect()
        };
        let l = log.lock().expect("log");
        assert_eq!(
            l.map.len(),
            want.len(),
            "entries in the map vs the engine's"
        );
        assert!(l.map == want, "the map differs from the engine's flows");
    }

    /// The stats file as the housekeeping tick wrote it.
    fn stats_file(&self) -> Snapshot {
        snatgw_runtime::stats::read(&self.dir.path().join("stats.json")).expect("stats file")
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            let _ = rt.shutdown();
        }
    }
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

const WAIT: Duration = Duration::from_secs(10);

/// R9.1: the queue a packet arrives on decides its direction. The same instance-sourced
/// datagram is translated when it comes from the private side (and written back to that
/// side), and dropped as `vnet_source_from_public` when it comes from the public side.
#[test]
fn r9_1_direction_is_the_queue_a_packet_arrives_on() {
    let mut g = Gw::start(None);
    let pkt = testutil::udp(ip(VM), 5000, ip(SERVER), 53, b"q");
    g.private.inject(&pkt);
    let out = g.private.wait_sent(1, WAIT);
    assert_eq!(out.len(), 1, "the outbound datagram was not written back");
    let (src, sport, dst, dport) = addrs(&out[0]);
    assert_eq!(
        src,
        SNAT.parse::<Ipv4Addr>().expect("snat"),
        "R1.3: default SNAT address"
    );
    assert_eq!((dst, dport), (SERVER.parse().expect("server"), 53));
    assert_ne!(sport, 0);
    assert!(g.public.take_sent().is_empty(), "nothing crosses sides");

    // The same bytes from the internet side: an instance's address from outside (R9.1).
    g.public.inject(&pkt);
    // The answer to that must not come; wait for the worker to have read it.
    let deadline = Instant::now() + WAIT;
    loop {
        let s = g.rt().snapshot();
        let rx: u64 =
            s.io.iter()
                .filter(|q| q.side == "public")
                .map(|q| q.io.rx_packets)
                .sum();
        if rx >= 1 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    g.at(0);
    let s = g.rt().snapshot();
    assert_eq!(
        s.dataplane.drops.get("vnet_source_from_public"),
        Some(&1),
        "{:?}",
        s.dataplane.drops
    );
    assert!(g.public.take_sent().is_empty() && g.private.take_sent().is_empty());
    assert_eq!(g.live_flows(), 1, "the spoofed packet created no flow");
}

/// A reply to the public IP:port the flow got is translated back to the instance (R1.3's
/// translation, inbound), on the public side's queue.
#[test]
fn a_reply_is_translated_back_to_the_instance() {
    let g = Gw::start(None);
    g.private
        .inject(&testutil::udp(ip(VM), 5000, ip(SERVER), 53, b"q"));
    let out = g.private.wait_sent(1, WAIT);
    let (_, port, _, _) = addrs(&out[0]);
    g.public
        .inject(&testutil::udp(ip(SERVER), 53, ip(SNAT), port, b"a"));
    let back = g.public.wait_sent(1, WAIT);
    assert_eq!(back.len(), 1);
    let (src, sport, dst, dport) = addrs(&back[0]);
    assert_eq!((src, sport), (SERVER.parse().expect("server"), 53));
    assert_eq!((dst, dport), (VM.parse().expect("vm"), 5000));
}

/// Many packets in batches: every one is translated, each flow gets its own public port
/// (R2.1: one public 5-tuple per flow), and the snapshot counts them per queue.
#[test]
fn a_thousand_flows_in_batches_each_get_a_distinct_port() {
    let mut g = Gw::start(None);
    const N: u16 = 1000;
    for i in 0..N {
        g.private
            .inject(&testutil::udp(ip(VM), 10_000 + i, ip(SERVER), 443, b"x"));
    }
    let out = g.private.wait_sent(usize::from(N), WAIT);
    assert_eq!(out.len(), usize::from(N));
    let ports: BTreeSet<u16> = out.iter().map(|p| addrs(p).1).collect();
    assert_eq!(
        ports.len(),
        usize::from(N),
        "two flows shared a public port"
    );
    // Workers publish their queue counters when idle (within one receive timeout).
    let deadline = Instant::now() + WAIT;
    let s = loop {
        let s = g.rt().snapshot();
        let rx: u64 = s.io.iter().map(|q| q.io.rx_packets).sum();
        if rx >= u64::from(N) || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let private: Vec<_> = s.io.iter().filter(|q| q.side == "private").collect();
    assert_eq!(
        private.iter().map(|q| q.io.rx_packets).sum::<u64>(),
        u64::from(N)
    );
    assert_eq!(
        private.iter().map(|q| q.io.tx_packets).sum::<u64>(),
        u64::from(N)
    );
    assert!(private.iter().map(|q| q.batches).sum::<u64>() >= 1);
    assert_eq!(s.dataplane.translated, u64::from(N));
    assert_eq!(g.live_flows(), usize::from(N));
}

/// R3.4 through the runtime's housekeeping: a flow idle since t=0 is still there at
/// IDLE − 1 and gone at IDLE, with no packet needed to trigger the release.
#[test]
fn r3_4_idle_flow_released_by_housekeeping_to_the_second() {
    let mut g = Gw::start(None);
    g.private
        .inject(&testutil::udp(ip(VM), 5000, ip(SERVER), 53, b"q"));
    assert_eq!(g.private.wait_sent(1, WAIT).len(), 1);
    g.at(IDLE - 1);
    assert_eq!(g.live_flows(), 1, "released before the idle timeout");
    g.at(IDLE);
    assert_eq!(g.live_flows(), 0, "not released at the idle timeout");
    // The stats file written by that tick says the same.
    let s = g.stats_file();
    assert_eq!(s.live_flows, 0);
    assert_eq!(s.instances[0].flows.udp, 0);
}

/// The offload is told of a flow when it opens and when its port is released (R2.2: no
/// kernel entry outlives the port): a TCP flow reset at t=2 is removed at 2 + 15 (R3.3),
/// not before. Before removing an idle flow the engine asks the offload when the kernel last
/// saw it, so a flow kept alive only in the kernel stays (R3.4).
#[test]
fn offload_learns_of_opens_and_releases_and_keeps_kernel_busy_flows() {
    let log = Arc::new(Mutex::new(OffloadLog::default()));
    let mut g = Gw::start(Some(log.clone()));
    g.private
        .inject(&testutil::tcp_syn(ip(VM), 40_000, ip(SERVER), 443));
    let out = g.private.wait_sent(1, WAIT);
    let (_, port, _, _) = addrs(&out[0]);
    {
        let l = log.lock().expect("log");
        assert_eq!(
            l.installed.len(),
            1,
            "the SYN's flow was not offered to the offload"
        );
        assert!(l.removed.is_empty());
    }
    g.at(2);
    g.public
        .inject(&testutil::tcp_rst(ip(SERVER), 443, ip(SNAT), port));
    assert_eq!(
        g.public.wait_sent(1, WAIT).len(),
        1,
        "the RST is translated back"
    );
    g.at(2 + RST - 1);
    assert!(
        log.lock().expect("log").removed.is_empty(),
        "removed before R3.3's 15 s"
    );
    g.at(2 + RST);
    assert_eq!(
        log.lock().expect("log").removed.len(),
        1,
        "not removed at RST + 15 s"
    );
    assert_eq!(g.live_flows(), 0);

    // A UDP flow the kernel keeps busy: at the idle deadline the offload says it saw a
    // packet at t=40, so the flow lives until 40 + IDLE.
    g.at(20);
    g.private
        .inject(&testutil::udp(ip(VM), 5000, ip(SERVER), 53, b"q"));
    assert_eq!(g.private.wait_sent(1, WAIT).len(), 1);
    log.lock().expect("log").last_seen = Some(40);
    g.at(20 + IDLE);
    assert_eq!(
        g.live_flows(),
        1,
        "removed although the kernel saw it at 40"
    );
    g.at(40 + IDLE - 1);
    assert_eq!(g.live_flows(), 1);
    g.at(40 + IDLE);
    assert_eq!(
        g.live_flows(),
        0,
        "kept past the kernel's last-seen + idle timeout"
    );
    assert_eq!(log.lock().expect("log").removed.len(), 2);
    g.assert_map_is_the_engines(&log);
}

/// R2.2 through the one channel, in one batch: the instance's 1024 ports (R2.8) are all held
/// for one destination from t=0; at the idle timeout (R3.4) one packet of a new flow to that
/// destination makes the engine reap all 1024 (R9.4) and give the new flow one of their ports,
/// inside one worker batch. The offload gets the removals first, as one call, then the install,
/// so the map ends with the new flow's entries (its inbound key is the same bytes as the old
/// owner's, to the same destination and public port) and none of the old flows'; a reply to
/// that port reaches the new flow.
#[test]
fn r2_2_a_reused_port_ends_with_the_new_owner_in_the_map_and_no_entry_outlives_its_port() {
    let log = Arc::new(Mutex::new(OffloadLog::default()));
    let mut g = Gw::start(Some(log.clone()));
    for i in 0..1024u16 {
        g.private
            .inject(&testutil::udp(ip(VM), 20_000 + i, ip(SERVER), 443, b"x"));
    }
    assert_eq!(g.private.wait_sent(1024, WAIT).len(), 1024);
    g.assert_map_is_the_engines(&log);
    let installs_before = {
        let l = log.lock().expect("log");
        assert_eq!(l.map.len(), 2 * 1024);
        assert_eq!(l.installed.len(), 1024);
        assert!(l.calls.iter().all(|&(install, _)| install), "{:?}", l.calls);
        // Flows opened in one batch are installed with one call (64-packet batches).
        assert!(l.calls.len() < 1024, "one call per flow: {}", l.calls.len());
        l.calls.len()
    };
    // The clock moves without a housekeeping tick: the packet's own batch does the work.
    g.time.store(IDLE, Ordering::SeqCst);
    g.private
        .inject(&testutil::udp(ip(VM), 9999, ip(SERVER), 443, b"y"));
    let out = g.private.wait_sent(1, WAIT);
    assert_eq!(out.len(), 1);
    let (_, port, _, _) = addrs(&out[0]);
    assert_eq!(g.live_flows(), 1);
    {
        let l = log.lock().expect("log");
        assert_eq!(
            &l.calls[installs_before..],
            &[(false, 1024), (true, 1)],
            "the batch's removals, then its install, each as one call"
        );
        let old_owner = l
            .removed
            .iter()
            .find(|k| k.pport == port)
            .expect("the port had an owner for this destination");
        assert_eq!((old_owner.dst, old_owner.dport), (ip(SERVER), 443));
        let inbound = (17, ip(SERVER), 443, ip(SNAT), port, false);
        assert_eq!(
            l.map.get(&inbound),
            Some(&(ip(VM), 9999)),
            "the reused port's inbound entry is the new owner's"
        );
        assert_eq!(l.map.len(), 2);
    }
    g.assert_map_is_the_engines(&log);
    // The engine agrees: the reply goes to the new flow.
    g.public
        .inject(&testutil::udp(ip(SERVER), 443, ip(SNAT), port, b"z"));
    let back = g.public.wait_sent(1, WAIT);
    assert_eq!(addrs(&back[0]).2, VM.parse::<Ipv4Addr>().expect("vm"));
    assert_eq!(addrs(&back[0]).3, 9999);
    // And the housekeeping tick's releases leave the map with the ports.
    g.at(2 * IDLE);
    assert_eq!(g.live_flows(), 0);
    g.assert_map_is_the_engines(&log);
    assert!(log.lock().expect("log").map.is_empty());
}

/// Both consumers of the one channel see every change: with a fake offload and the flow
/// recorder (`--record`), each flow is installed and removed once, and the recording holds its
/// open and its close.
#[test]
fn the_offload_and_the_recorder_both_see_every_change() {
    let log = Arc::new(Mutex::new(OffloadLog::default()));
    let mut g = Gw::start_with(Some(log.clone()), Some("trace.jsonl"));
    for i in 0..3u16 {
        g.private
            .inject(&testutil::udp(ip(VM), 5000 + i, ip(SERVER), 53, b"q"));
    }
    assert_eq!(g.private.wait_sent(3, WAIT).len(), 3);
    g.at(1);
    g.at(IDLE);
    assert_eq!(g.live_flows(), 0);
    {
        let l = log.lock().expect("log");
        assert_eq!((l.installed.len(), l.removed.len()), (3, 3));
        assert!(l.map.is_empty());
    }
    let path = g.dir.path().join("trace.jsonl");
    let rt = g.rt.take().expect("running");
    rt.shutdown().expect("clean shutdown");
    let text = std::fs::read_to_string(&path).expect("trace");
    let w = snatgw_planner::Workload::from_trace_str(&text).expect("a trace the planner reads");
    assert_eq!(w.flows.len(), 3, "{text}");
    let closes = w
        .events
        .iter()
        .filter(|e| e.kind != snatgw_planner::EvKind::Open)
        .count();
    assert_eq!(closes, 3, "{text}");
}

/// R2.8 and R2.6: a single instance behind a small default pool gets 1024 ports; the 1025th
/// flow to one destination fails, the drop is counted as `ports_exhausted`, and the
/// exhaustion event reaches the API's event log and the stats file, naming the instance.
#[test]
fn r2_6_exhaustion_reaches_the_event_log_and_the_stats_file() {
    let mut g = Gw::start(None);
    for i in 0..1025u16 {
        g.private
            .inject(&testutil::udp(ip(VM), 20_000 + i, ip(SERVER), 443, b"x"));
    }
    let out = g.private.wait_sent(1024, WAIT);
    assert_eq!(out.len(), 1024);
    // Let the worker finish the last packet before looking.
    let deadline = Instant::now() + WAIT;
    while !g
        .rt()
        .snapshot()
        .dataplane
        .drops
        .contains_key("ports_exhausted")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    g.at(1);
    let s = g.stats_file();
    assert_eq!(s.dataplane.drops.get("ports_exhausted"), Some(&1));
    assert_eq!(
        s.instances[0].allocated, 1024,
        "R2.8: a pool of one gets 1024 ports"
    );
    assert_eq!(s.instances[0].connections_failed.udp, 1);
    assert!(
        s.events
            .iter()
            .any(|e| e.kind == "exhaustion" && e.instance.as_deref() == Some("vm1")),
        "{:?}",
        s.events
    );
    let api = g.events.after(0, 100);
    assert!(
        api.iter()
            .any(|e| e.kind == "exhaustion" && e.instance.as_deref() == Some("vm1")),
        "{api:?}"
    );
    // One view: the stats file's events are the API's records, sequence numbers included.
    for e in &s.events {
        assert!(api.contains(e), "{e:?} not in {api:?}");
    }
}

/// A queue whose device fails stops the gateway; shutdown says which queue and why, and the
/// final snapshot is still written.
#[test]
fn a_failing_queue_stops_the_gateway_and_shutdown_names_it() {
    struct Broken;
    impl PacketIo for Broken {
        fn recv_batch(&mut self, _: &mut PacketBatch, _: Duration) -> std::io::Result<usize> {
            Err(std::io::Error::other("device removed"))
        }
        fn send_batch(&mut self, _: &mut PacketBatch) -> std::io::Result<usize> {
            Ok(0)
        }
        fn stats(&self) -> IoStats {
            IoStats::default()
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let stats = dir.path().join("stats.json");
    let parts = Parts {
        engine: Engine::new(topology(), 0).expect("engine"),
        clock: Clock::Manual(Arc::new(AtomicU32::new(0))),
        events: Arc::new(EventLog::new()),
        fast_path: None,
        recorder: None,
        wakers: Vec::new(),
    };
    let opts = RuntimeOptions {
        stats_file: Some(stats.clone()),
        probes: false,
        ..RuntimeOptions::default()
    };
    let rt = Runtime::start(parts, vec![Broken], vec![Broken], opts).expect("runtime");
    let deadline = Instant::now() + WAIT;
    while !rt.stopped() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(rt.stopped(), "a failed queue did not stop the gateway");
    match rt.shutdown() {
        Err(RuntimeError::Queue(msg)) => {
            assert!(msg.contains("receive: device removed"), "{msg}")
        }
        other => panic!(
            "expected the queue's failure, got {:?}",
            other.map(|s| s.time)
        ),
    }
    let s = snatgw_runtime::stats::read(&stats).expect("final snapshot");
    assert!(s.final_snapshot);
}

/// Options the runtime cannot run with are refused before any thread starts.
#[test]
fn unusable_options_are_refused() {
    let parts = || Parts {
        engine: Engine::new(topology(), 0).expect("engine"),
        clock: Clock::Manual(Arc::new(AtomicU32::new(0))),
        events: Arc::new(EventLog::new()),
        fast_path: None,
        recorder: None,
        wakers: Vec::new(),
    };
    let opts = RuntimeOptions {
        batch: 0,
        probes: false,
        ..RuntimeOptions::default()
    };
    let (a, _ha) = MemIo::new();
    let (b, _hb) = MemIo::new();
    assert!(matches!(
        Runtime::start(parts(), vec![a], vec![b], opts),
        Err(RuntimeError::Options { field: "batch", .. })
    ));
    let (a, _ha) = MemIo::new();
    let opts = RuntimeOptions {
        probes: false,
        ..RuntimeOptions::default()
    };
    assert!(matches!(
        Runtime::start(parts(), vec![a], Vec::<MemIo>::new(), opts),
        Err(RuntimeError::Options {
            field: "queues",
            ..
        })
    ));
}

/// Issue #21: the counters `/metrics` gets from the runtime (`Runtime::counters_source`):
/// packets per side summed over the queues, the gateway lock's counters, no fast path here.
/// The source does not take the gateway lock (it answers while the lock is held).
#[test]
fn counters_source_counts_packets_per_side_without_the_gateway_lock() {
    let mut g = Gw::start(None);
    let source = g.rt().counters_source();
    for i in 0..3 {
        g.private
            .inject(&testutil::udp(ip(VM), 7000 + i, ip(SERVER), 53, b"q"));
    }
    let out = g.private.wait_sent(3, WAIT);
    assert_eq!(out.len(), 3);
    let (_, port, _, _) = addrs(&out[0]);
    g.public
        .inject(&testutil::udp(ip(SERVER), 53, ip(SNAT), port, b"a"));
    assert_eq!(g.public.wait_sent(1, WAIT).len(), 1);
    // Workers publish their queue counters when idle (within one receive timeout).
    let deadline = Instant::now() + WAIT;
    let c = loop {
        let c = source();
        if (c.private_tx_packets >= 3 && c.public_tx_packets >= 1) || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        (c.private_rx_packets, c.private_tx_packets),
        (3, 3),
        "{c:?}"
    );
    assert_eq!((c.public_rx_packets, c.public_tx_packets), (1, 1), "{c:?}");
    assert!(c.lock_acquisitions >= 2, "one per batch at least: {c:?}");
    assert!(c.lock_contended <= c.lock_acquisitions, "{c:?}");
    assert!(c.lock_held_ns > 0, "{c:?}");
    assert_eq!(c.fast_path, None, "no fast path runs");

    // With the gateway lock held, the source still answers.
    let gw = g.rt().gateway().clone();
    let held = gw.lock().expect("gw");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(source());
    });
    let again = rx
        .recv_timeout(WAIT)
        .expect("the source waited for the gateway lock");
    drop(held);
    assert!(again.private_rx_packets >= 3, "{again:?}");
}

/// R2.2 with R1.4/R2.9: a change the API applies (here the instance removed, R1.4) ends its
/// flows under the gateway lock, outside any worker batch; the backend's after-change hook
/// applies those ends to the fast path before the lock is released, not at the next
/// housekeeping tick.
#[test]
fn r2_2_an_api_change_reaches_the_fast_path_before_the_lock_is_released() {
    use snatgw_control::backend::{Backend, GatewayBackend};
    let log = Arc::new(Mutex::new(OffloadLog::default()));
    let mut g = Gw::start(Some(log.clone()));
    g.private
        .inject(&testutil::tcp_syn(ip(VM), 40_001, ip(SERVER), 443));
    assert_eq!(g.private.wait_sent(1, WAIT).len(), 1);
    assert_eq!(log.lock().expect("log").installed.len(), 1);
    let events = g.events.clone();
    let backend = {
        let rt = g.rt();
        GatewayBackend::new(rt.gateway().clone(), events, || 1)
            .with_after_change(Box::new(rt.after_change_hook()))
    };
    let mut cfg = topology().source;
    cfg.instance.clear();
    let rep = backend
        .apply(Topology::from_config(cfg).expect("topology"))
        .expect("apply");
    assert_eq!(rep.flows_reclaimed, 1);
    // No housekeeping tick ran since: the removal came through the hook.
    let l = log.lock().expect("log");
    assert_eq!(
        l.removed.len(),
        1,
        "the ended flow is still in the kernel map"
    );
    assert!(l.map.is_empty());
}
