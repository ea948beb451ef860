//! The fleet in the binary (issue #19, SPEC §10): `snatgw run --fleet etcd://HOST:PORT[,...]
//! --node-id ID` and `snatgw fleet`.
//!
//! With `--fleet`, `snatgw run` ([`FleetRun`]) keeps the desired topology in etcd
//! (`snatgw_fleet::EtcdStore`, seeded from the configuration file when empty, as the redb
//! store is) and follows its watch, so a change made through any node's API is adopted by
//! every node's control plane and engine ([`snatgw_control::ControlPlane::follow`]); a write
//! while etcd is unreachable answers 503 (R10.5). The node joins under a lease and runs the
//! fleet's `Member` loop on a thread: rendezvous ownership of the instances (R10.1) through
//! fenced grants (R10.2), ownership changes logged, `/metrics` gauges.
//!
//! Self-fencing (R10.2) in the data path: the gateway gets an admission
//! ([`snatgw_dataplane::Gateway::set_admission`]) that lets a new outbound flow open only for
//! an instance whose grant this node holds, and only while its local lease view is valid
//! (checked against the clock at every new flow, so a node whose loop is stuck stops on time).
//! Flows already open go on. The engine keeps running the whole topology, so every node
//! computes the same port blocks for every instance (R2.8 pool sizes depend on group sizes).
//!
//! With `--fleet-link IP:PORT`: steering (R10.3, [`crate::fleet_link`]: packets of instances
//! another node owns go to it over the link) and flow replication (R10.4: each owned
//! instance's journal and periodic exports go to its rendezvous runner-up, in fleet seconds,
//! [`FleetTime`]; a node granted an instance imports what it holds for it before admitting
//! it; a planned move hands the instance's flows to the new owner before the grant is
//! released). With the kernel fast path running, the same route table also goes to the tc
//! program ([`kernel_table`], `snatgw_io::fastpath::FastPathSteer`): packets of instances and
//! port blocks another node owns are forwarded from the kernel, and only what it cannot send
//! (GSO, too big for the link) comes up to the TUN path's steering. Ports of flows whose
//! state did not arrive: takeover windows hold those whose remotes still send
//! ([`open_takeover_windows`]), and port reserves ([`crate::reserve`]) confine each owned
//! instance's new flows to ports its runner-up acknowledged, which the runner-up holds when
//! it takes the instance over ([`import_taken`]).
//!
//! Without `--fleet` none of this runs (R10.6).

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use snatgw_control::{ControlPlane, FleetGauges, FleetGaugesSource, Store};
use snatgw_core::engine::persist::FlowState;
use snatgw_core::FlowChange;
use snatgw_dataplane::Gateway;
use snatgw_fleet::{
    rendezvous, Coordinator, EtcdCoordinator, EtcdOptions, EtcdStore, LeaseConfig, Member,
    MonotonicClock, NodeId, Resource, Takeover,
};
use snatgw_fleet::{PortReserve, ReplicaServer, ReplicaStore, Replicator};
use snatgw_runtime::{FleetHooks, Injector};

use crate::fleet_link::Steering;
use crate::reserve::{ReserveKeeper, STEP_EVERY};
use snatgw_io::fastpath::{FastPathSteer, SteerTable};

/// Runs after the fleet changed the engine's flows outside a packet batch (an import on
/// takeover): hands the journal to the fast path and the replication before the lock is
/// released (`snatgw_runtime::Runtime::after_change_hook`).
pub type AfterChange = Box<dyn Fn(&mut Gateway) + Send + Sync>;

/// The fleet link of a node (`--fleet-link`): steering (R10.3) and flow replication (R10.4).
struct Link {
    addr: SocketAddr,
    steering: Arc<Steering>,
    store: ReplicaStore,
    server: ReplicaServer,
    replicator: Arc<Replicator>,
    /// This node's engine seconds against the fleet's (set with the runtime's hooks).
    time: FleetTime,
    /// The kernel fast path's steering maps (R10.3 in the kernel), when the fast path runs:
    /// refreshed with the userspace route table after every tick.
    kernel: Option<Mutex<FastPathSteer>>,
    /// The owned instances' port reserves (R10.4, [`crate::reserve`]). Locked after the
    /// gateway, never before it.
    keeper: Arc<Mutex<ReserveKeeper>>,
}

/// The etcd endpoints of `--fleet etcd://HOST:PORT[,HOST:PORT]`, as client URLs.
#[derive(Debug, Clone)]
pub struct FleetUrl(pub Vec<String>);

/// Parses `etcd://HOST:PORT[,HOST:PORT...]`.
pub fn parse_fleet_url(s: &str) -> Result<FleetUrl, String> {
    let rest = s
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("{s:?}: expected etcd://HOST:PORT[,HOST:PORT]"))?;
    let eps: Vec<String> = rest
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (h, p) = e
                .rsplit_once(':')
                .ok_or_else(|| format!("{e:?}: expected HOST:PORT"))?;
            p.parse::<u16>()
                .map_err(|_| format!("{e:?}: the port is not a number 1-65535"))?;
            if h.is_empty() {
                return Err(format!("{e:?}: no host"));
            }
            Ok(format!("http://{e}"))
        })
        .collect::<Result<_, String>>()?;
    if eps.is_empty() {
        return Err(format!("{s:?}: no endpoint"));
    }
    Ok(FleetUrl(eps))
}

fn options(url: &FleetUrl, ttl_secs: u64) -> Result<EtcdOptions, String> {
    let mut o = EtcdOptions::new(url.0.clone());
    o.lease = LeaseConfig::new(Duration::from_secs(ttl_secs))
        .map_err(|e| format!("--fleet-ttl-secs: {e}"))?;
    Ok(o)
}

/// What the data path and `/metrics` read of the node's view, written by its loop.
struct View {
    /// Private addresses of the instances whose grant the node holds.
    owned: HashSet<u32>,
    /// Their names, for the gauges.
    owned_names: usize,
    /// The local lease view's end (self-fencing deadline) on [`Shared::clock`].
    valid_until: Duration,
    nodes_live: u64,
}

struct Shared {
    node: NodeId,
    clock: MonotonicClock,
    view: RwLock<View>,
    /// Owned instances without an acknowledged port reserve (the reserve loop's count).
    reserve_waiting: std::sync::atomic::AtomicU64,
}

/// Engine seconds are each node's own (seconds since its gateway clock's origin); the
/// replication carries fleet seconds, Unix seconds, so a node taking flows over reads their
/// timers in its own engine's seconds (R10.4, R3.2–R3.4 to the second, give or take the
/// nodes' clock synchronisation and one second of rounding; `import_taken` rounds FIN/RST
/// timers up, so a taker never ends a flow before its sender). The offset is fixed at start:
/// a step of the wall clock later (not a slew) shifts it until the next start.
#[derive(Clone, Copy, Debug, Default)]
struct FleetTime {
    /// Unix second at this engine's second 0.
    offset: i64,
}

impl FleetTime {
    fn at(start_ns: u64) -> FleetTime {
        let since_origin = snatgw_io::fastpath::monotonic_ns().saturating_sub(start_ns);
        let unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let origin_unix_ns = unix_ns - since_origin as i128;
        FleetTime {
            offset: (origin_unix_ns / 1_000_000_000) as i64,
        }
    }

    fn shift(t: u32, by: i64) -> u32 {
        (i64::from(t) + by).clamp(0, i64::from(u32::MAX)) as u32
    }

    fn to_fleet(self, t: u32) -> u32 {
        Self::shift(t, self.offset)
    }

    /// A journal entry in fleet seconds (`Refused` is not replicated).
    fn change_to_fleet(self, c: &FlowChange) -> Option<FlowChange> {
        let mut c = c.clone();
        match &mut c {
            FlowChange::Opened { at, .. } | FlowChange::Closed { at, .. } => {
                *at = self.to_fleet(*at);
            }
            FlowChange::Refused { .. } => return None,
        }
        Some(c)
    }

    /// Every time of `st` moved by `by` seconds (`close_at` 0 means "not closing" and stays).
    fn move_state(st: &mut FlowState, by: i64) {
        st.time = Self::shift(st.time, by);
        for f in &mut st.flows {
            f.last_seen = Self::shift(f.last_seen, by);
            if f.close_at != 0 {
                f.close_at = Self::shift(f.close_at, by).max(1);
            }
            f.born = f.born.wrapping_add(by as u16);
        }
        for r in &mut st.releases {
            r.at = Self::shift(r.at, by);
        }
    }
}

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the node may open a new flow for the instance at `private` now (R10.2).
    fn admits(&self, private: u32) -> bool {
        let v = self.read();
        self.clock.now() < v.valid_until && v.owned.contains(&private)
    }

    fn gauges(&self) -> FleetGauges {
        let v = self.read();
        let left = v.valid_until.saturating_sub(self.clock.now());
        let valid = !left.is_zero();
        FleetGauges {
            node: self.node.to_string(),
            nodes_live: v.nodes_live,
            instances_owned: if valid { v.owned_names as u64 } else { 0 },
            lease_valid_seconds: left.as_secs_f64(),
            reserve_waiting_instances: self.reserve_waiting.load(Ordering::Relaxed),
        }
    }
}

/// A node of a fleet being started by `snatgw run --fleet`.
pub struct FleetRun {
    store: Arc<EtcdStore>,
    coord: Arc<EtcdCoordinator>,
    shared: Arc<Shared>,
    link: Option<Link>,
}

impl FleetRun {
    /// Connects to etcd (the store and the coordinator; no lease yet) and, with `link`, binds
    /// the fleet link (UDP for steered packets, TCP for the replication stream, same address;
    /// advertised to the other nodes in this node's record at join).
    pub fn connect(
        url: &FleetUrl,
        node_id: &str,
        ttl_secs: u64,
        link: Option<SocketAddr>,
    ) -> Result<FleetRun, String> {
        let node = NodeId::new(node_id).map_err(|e| format!("--node-id: {e}"))?;
        let opts = options(url, ttl_secs)?;
        let store = EtcdStore::connect(&opts).map_err(|e| format!("--fleet: {e}"))?;
        let coord =
            EtcdCoordinator::connect(node.clone(), opts).map_err(|e| format!("--fleet: {e}"))?;
        let link = match link {
            Some(addr) => {
                coord.set_link(addr);
                let steering =
                    Steering::bind(addr).map_err(|e| format!("--fleet-link {addr} (udp): {e}"))?;
                let store = ReplicaStore::new();
                let server = ReplicaServer::bind(addr, store.clone())
                    .map_err(|e| format!("--fleet-link {addr} (tcp): {e}"))?;
                let replicator = Arc::new(Replicator::new(node.clone(), incarnation()));
                Some(Link {
                    addr,
                    steering,
                    store,
                    server,
                    replicator,
                    time: FleetTime::default(),
                    kernel: None,
                    keeper: Arc::new(Mutex::new(ReserveKeeper::new())),
                })
            }
            None => None,
        };
        Ok(FleetRun {
            store: Arc::new(store),
            coord: Arc::new(coord),
            shared: Arc::new(Shared {
                node,
                clock: MonotonicClock::new(),
                view: RwLock::new(View {
                    owned: HashSet::new(),
                    owned_names: 0,
                    valid_until: Duration::ZERO,
                    nodes_live: 0,
                }),
                reserve_waiting: std::sync::atomic::AtomicU64::new(0),
            }),
            link,
        })
    }

    /// Whether the node has a fleet link (`--fleet-link`).
    pub fn has_link(&self) -> bool {
        self.link.is_some()
    }

    /// Hands the node the kernel fast path's steering maps: with a fleet link, packets of
    /// other nodes' instances and port blocks are then forwarded to them from tc, not
    /// through the TUN (R10.3 "in the kernel fast path where it can be"). Without a link,
    /// or with an IPv6 link address (the program wraps in IPv4), steering stays in userspace.
    pub fn set_kernel_steer(&mut self, steer: FastPathSteer) {
        if let Some(l) = &mut self.link {
            if l.addr.is_ipv4() {
                l.kernel = Some(Mutex::new(steer));
            }
        }
    }

    /// What the runtime needs for the fleet link: steering of refused packets (R10.3) and the
    /// journal tap that feeds the replication stream (R10.4). None without `--fleet-link`.
    /// `start_ns` is the gateway clock's origin (`CLOCK_MONOTONIC` at engine second 0).
    pub fn runtime_hooks(&mut self, start_ns: u64) -> FleetHooks {
        let Some(l) = &mut self.link else {
            return FleetHooks::new();
        };
        let shift = FleetTime::at(start_ns);
        l.time = shift;
        let r = l.replicator.clone();
        let mut buf: Vec<FlowChange> = Vec::new();
        FleetHooks::new()
            .with_steer(l.steering.clone())
            .with_journal_tap(move |changes| {
                buf.clear();
                buf.extend(changes.iter().filter_map(|c| shift.change_to_fleet(c)));
                if !buf.is_empty() {
                    r.offer(&buf);
                }
            })
    }

    /// The topology store (etcd).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// This node's gauges for `/metrics`.
    pub fn gauges(&self) -> FleetGaugesSource {
        let s = self.shared.clone();
        Arc::new(move || s.gauges())
    }

    /// Fences the gateway by ownership, follows the store's watch with `plane`, and starts
    /// the membership loop; with the fleet link, also the steering receiver (injecting into
    /// the runtime through `injector`) and the replication's snapshot thread.
    pub fn start(
        self,
        plane: ControlPlane,
        gateway: &Arc<Mutex<Gateway>>,
        after_change: AfterChange,
        injector: Option<Injector>,
    ) -> Result<FleetNode, String> {
        let s = self.shared.clone();
        gateway
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_admission(Some(Arc::new(move |src| s.admits(src))));
        let follower = plane
            .follow(self.store.subscribe(), |stored, r| match r {
                Ok(snatgw_control::Adopted::Applied {
                    generation,
                    designations_differ,
                }) => {
                    tracing::info!(generation, "fleet: applied a topology saved through another node");
                    if *designations_differ {
                        tracing::warn!(generation, "fleet: this engine's default-SNAT designations differ from the stored ones (R1.3); a restart takes the stored ones");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::error!(
                    generation = stored.generation,
                    error = %e,
                    "fleet: a topology saved through another node was refused here; this node keeps running the previous one"
                ),
            })
            .map_err(|e| format!("following the fleet's topology: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let link = match (self.link, injector) {
            (Some(l), Some(injector)) => {
                threads.push(
                    l.steering
                        .spawn_receiver(injector, stop.clone())
                        .map_err(|e| format!("spawning the fleet link's receiver: {e}"))?,
                );
                let (stop2, gw, r, time) =
                    (stop.clone(), gateway.clone(), l.replicator.clone(), l.time);
                threads.push(
                    std::thread::Builder::new()
                        .name("snatgw-fleet-snap".into())
                        .spawn(move || snapshot_loop(&gw, &r, &stop2, time))
                        .map_err(|e| format!("spawning the replication thread: {e}"))?,
                );
                let (stop, gw, r, keeper, shared) = (
                    stop.clone(),
                    gateway.clone(),
                    l.replicator.clone(),
                    l.keeper.clone(),
                    self.shared.clone(),
                );
                threads.push(
                    std::thread::Builder::new()
                        .name("snatgw-fleet-rsv".into())
                        .spawn(move || reserve_loop(&gw, &r, &keeper, &shared, &stop))
                        .map_err(|e| format!("spawning the port reserve thread: {e}"))?,
                );
                tracing::info!(link = %l.addr, "fleet: link up (steering R10.3, flow replication R10.4)");
                Some(l)
            }
            _ => {
                tracing::warn!("fleet: no --fleet-link: packets of instances other nodes own are dropped (no steering, R10.3) and this node's flows are not replicated (a takeover starts them afresh, R10.4)");
                None
            }
        };
        let thread = {
            let (stop, shared, coord, gw) = (
                stop.clone(),
                self.shared.clone(),
                self.coord.clone(),
                gateway.clone(),
            );
            std::thread::Builder::new()
                .name("snatgw-fleet-member".into())
                .spawn(move || {
                    member_loop(
                        &coord,
                        &shared,
                        &plane,
                        &stop,
                        link.as_ref(),
                        &gw,
                        &after_change,
                    );
                    if let Some(mut l) = link {
                        l.server.stop();
                    }
                })
                .map_err(|e| format!("spawning the fleet thread: {e}"))?
        };
        threads.push(thread);
        tracing::info!(
            node = %self.shared.node,
            ttl_secs = self.coord.config().ttl().as_secs(),
            "fleet: joining; this node opens new flows only for the instances it owns (rendezvous, R10.1) and forwards the others' packets to their owners over the fleet link (R10.3)"
        );
        Ok(FleetNode {
            stop,
            threads,
            _follower: follower,
        })
    }
}

/// This process's incarnation number for the replication: its start time in microseconds
/// since the Unix epoch. It must grow with every start of a node: a receiver refuses a
/// sender whose incarnation is older than one it has seen from that node (a paused earlier
/// process, `snatgw_fleet::replica`). (It was a hash of the time and the process id until
/// 2026-12-05: a restarted node's stream was then refused about every other restart, which
/// went unnoticed until port reserves needed the runner-up's acknowledgements.)
fn incarnation() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

/// Sends the replication a full export whenever it asks for one (a new target, a reconnect,
/// an overflow) and every 30 s anyway: the export refreshes what deltas cannot carry (FIN/RST
/// state; without it a taken flow that had seen its FIN is held until its idle timeout, later
/// than R3.2's 240 s, never earlier).
fn snapshot_loop(gw: &Mutex<Gateway>, r: &Replicator, stop: &AtomicBool, time: FleetTime) {
    const EVERY: Duration = Duration::from_secs(30);
    let mut last = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if last.elapsed() >= EVERY {
            r.request_snapshot();
        }
        if !r.needs_snapshot() {
            continue;
        }
        last = std::time::Instant::now();
        let seq = r.seq();
        let mut st = snatgw_runtime::persist::export_flows(gw, |_| {});
        FleetTime::move_state(&mut st, time.offset);
        r.offer_snapshot(&st, seq);
    }
}

/// Keeps the owned instances' port reserves (R10.4, [`crate::reserve`]): every
/// [`STEP_EVERY`], one pass under the gateway lock.
fn reserve_loop(
    gw: &Mutex<Gateway>,
    r: &Replicator,
    keeper: &Mutex<ReserveKeeper>,
    shared: &Shared,
    stop: &AtomicBool,
) {
    let mut last = std::time::Instant::now();
    // Since when some owned instance has had no usable reserve, and whether that was logged.
    let mut waiting_since: Option<(std::time::Instant, bool)> = None;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(STEP_EVERY);
        let owned = shared.read().owned.clone();
        let rep = {
            let mut g = gw.lock().unwrap_or_else(|p| p.into_inner());
            let mut k = keeper.lock().unwrap_or_else(|p| p.into_inner());
            k.step(g.engine_mut(), r, &owned, std::time::Instant::now())
        };
        if rep.resync > 0 {
            tracing::debug!(instances = rep.resync, "fleet: port reserves resync (new runner-up, reconnect or overflow): new flows keep to the newest reserve until the runner-up acknowledges it again (R10.4)");
        }
        let s = keeper.lock().unwrap_or_else(|p| p.into_inner()).stats();
        shared
            .reserve_waiting
            .store(s.waiting as u64, Ordering::Relaxed);
        match (&mut waiting_since, s.waiting) {
            (None, n) if n > 0 => waiting_since = Some((std::time::Instant::now(), false)),
            (Some(_), 0) => {
                if waiting_since.is_some_and(|(_, logged)| logged) {
                    tracing::info!("fleet: every owned instance has an acknowledged port reserve again (R10.4)");
                }
                waiting_since = None;
            }
            (Some((t, logged)), n) if !*logged && t.elapsed() >= Duration::from_secs(5) => {
                *logged = true;
                tracing::warn!(instances = n, "fleet: owned instances have had no port reserve acknowledged by their runner-up for 5 s: their new flows are refused (drop reason port_reserve) until it answers on the fleet link (R10.4)");
            }
            _ => {}
        }
        if last.elapsed() >= Duration::from_secs(10) {
            last = std::time::Instant::now();
            tracing::debug!(
                sent = s.sent,
                acked = s.acked,
                resyncs = s.resyncs,
                fenced = s.fenced,
                waiting = s.waiting,
                given_up = s.given_up,
                "fleet: port reserves"
            );
        }
    }
}

/// A running fleet node: its membership loop and topology follower.
pub struct FleetNode {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    _follower: snatgw_control::Follower,
}

impl FleetNode {
    /// Stops translating new flows for everything, leaves the fleet (the lease is revoked, so
    /// the other nodes take the instances over at their next tick), stops following.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn private_ips(cfg: &snatgw_core::ConfigFile, names: &[String]) -> HashSet<u32> {
    cfg.instance
        .iter()
        .filter(|i| names.contains(&i.name))
        .filter_map(|i| i.private_ip.parse::<Ipv4Addr>().ok().map(u32::from))
        .collect()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How soon the member loop tries again after an etcd call failed (R10.5).
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(500);

fn member_loop(
    coord: &Arc<EtcdCoordinator>,
    shared: &Shared,
    plane: &ControlPlane,
    stop: &AtomicBool,
    link: Option<&Link>,
    gw: &Mutex<Gateway>,
    after_change: &AfterChange,
) {
    let mut member = Member::new(coord.clone());
    let every = coord.config().renew_interval();
    let mut last_error: Option<String> = None;
    let mut was_valid = false;
    // Instances handed over to their new owner (a planned move: a node joined or this one's
    // rendezvous rank fell), still replicated there until the deadline (R10.4).
    let mut handed: HashMap<u32, (SocketAddr, std::time::Instant)> = HashMap::new();
    while !stop.load(Ordering::SeqCst) {
        let cfg = plane.current().config;
        let resources: Vec<Resource> = cfg
            .instance
            .iter()
            .map(|i| Resource::Instance(i.name.clone()))
            .collect();
        let now = shared.clock.now();
        // R10.2: an instance moving away leaves the data path's view the moment the member
        // drops it, before its grant is released.
        let mut live_before: Option<Vec<NodeId>> = None;
        let rep = member.tick_with(now, &resources, |res| {
            if let Resource::Instance(n) = res {
                let ips = private_ips(&cfg, std::slice::from_ref(n));
                shared
                    .view
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .owned
                    .retain(|ip| !ips.contains(ip));
                if let Some(l) = link {
                    let live = live_before.get_or_insert_with(|| {
                        coord.live_nodes(shared.clock.now()).unwrap_or_default()
                    });
                    hand_over(l, coord, gw, n, &ips, live, &shared.node, &mut handed);
                }
            }
        });
        handed.retain(|_, (_, until)| *until > std::time::Instant::now());
        let owned: Vec<String> = member
            .view()
            .grants()
            .filter_map(|g| match &g.resource {
                Resource::Instance(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        let valid_until = member
            .view()
            .lease()
            .map_or(Duration::ZERO, |l| l.valid_until);
        // The live nodes and their links, in one etcd read (the member's own round listed the
        // nodes too, before its grants changed).
        let (live, links) = match coord.nodes() {
            Ok((l, k)) => (Some(l), Some(k)),
            Err(e) => {
                tracing::debug!(error = %e, "fleet: reading the node records");
                (None, None)
            }
        };
        // R10.4: the flows of instances taken over go into the engine (and the fast path)
        // before the data path may open a flow for them, so new flows never take a port a
        // replicated flow holds.
        let gained: Vec<String> = rep
            .gained
            .iter()
            .filter_map(|r| match r {
                Resource::Instance(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        if !gained.is_empty() {
            let ips = private_ips(&cfg, &gained);
            open_takeover_windows(gw, &ips);
            if let Some(l) = link {
                // New flows of a gained instance wait for its runner-up's first reserve.
                let mut g = gw.lock().unwrap_or_else(|p| p.into_inner());
                let mut k = l.keeper.lock().unwrap_or_else(|p| p.into_inner());
                k.fence_gained(g.engine_mut(), &ips);
            }
        }
        // The private addresses of the instances this node holds grants for: what the
        // imports, the data path's view and the route tables below all ask about.
        let owned_ips = private_ips(&cfg, &owned);
        if let Some(l) = link {
            // What the store holds for instances this node owns: the replica of a dead
            // owner's flows (a takeover), or a hand-over that arrived after the grant.
            let ips: HashSet<u32> = l
                .store
                .instances()
                .into_iter()
                .map(|r| r.private_ip)
                .filter(|ip| owned_ips.contains(ip))
                .collect();
            if !ips.is_empty() {
                import_taken(l, gw, after_change, &ips, &shared.node);
            }
        }
        {
            let mut v = shared.view.write().unwrap_or_else(|p| p.into_inner());
            v.owned = owned_ips.clone();
            v.owned_names = owned.len();
            v.valid_until = valid_until;
            if let Some(l) = &live {
                v.nodes_live = l.len() as u64;
            }
        }
        if let (Some(l), Some(live), Some(links)) = (link, &live, &links) {
            route(l, links, &cfg, live, &owned_ips, &shared.node, &handed, gw);
            let c = l.steering.counters();
            tracing::debug!(
                steered_sent = c.sent.load(Ordering::Relaxed),
                steered_send_failed = c.send_failed.load(Ordering::Relaxed),
                steered_received = c.received.load(Ordering::Relaxed),
                steered_refused = c.refused.load(Ordering::Relaxed),
                replica = ?l.store.stats(),
                replicator = ?l.replicator.stats(),
                "fleet: link"
            );
        }
        if !rep.gained.is_empty() || !rep.lost.is_empty() {
            let names = |r: &[Resource]| {
                r.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            tracing::info!(
                node = %shared.node,
                gained = %names(&rep.gained),
                lost = %names(&rep.lost),
                owned = owned.len(),
                nodes = live.as_ref().map_or(0, Vec::len),
                "fleet: ownership changed"
            );
        }
        if !gained.is_empty() {
            let t = Takeover {
                at_unix_ms: unix_ms(),
                instances: gained,
            };
            if let Err(e) = coord.record_takeover(&t) {
                tracing::debug!(error = %e, "fleet: recording the takeover");
            }
        }
        let err = rep.error.as_ref().map(ToString::to_string);
        if err != last_error {
            match &err {
                Some(e) => tracing::warn!(
                    node = %shared.node,
                    error = %e,
                    valid_for_ms = valid_until.saturating_sub(shared.clock.now()).as_millis() as u64,
                    "fleet: etcd call failed; translating goes on within owned instances while the lease view is valid (R10.5), topology changes are refused"
                ),
                None => tracing::info!(node = %shared.node, "fleet: etcd answers again"),
            }
            last_error = err;
        }
        if was_valid && !rep.valid {
            tracing::warn!(node = %shared.node, "fleet: lease view ended: no new flows for any instance until the node holds grants again (self-fencing, R10.2)");
        }
        was_valid = rep.valid;
        // After a failed call, try again within a second rather than a renewal interval: a
        // node must renew as soon as etcd answers again, or an outage shorter than its lease
        // view (R10.5: TTL − margin) still fences it (the third interval after the last
        // renewal ends at the view's end).
        let wait = if rep.error.is_some() {
            every.min(RETRY_AFTER_ERROR)
        } else {
            every
        };
        let until = shared.clock.now() + wait;
        while !stop.load(Ordering::SeqCst) && shared.clock.now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    {
        let mut v = shared.view.write().unwrap_or_else(|p| p.into_inner());
        v.owned.clear();
        v.owned_names = 0;
        v.valid_until = Duration::ZERO;
    }
    if let Some(l) = link {
        // A clean stop: the runner-ups, which take the instances over once the lease is
        // revoked, get the last changes first.
        if !l.replicator.flush(Duration::from_secs(1)) {
            tracing::warn!("fleet: the replication did not drain within 1 s of the stop");
        }
    }
    match member.leave(shared.clock.now()) {
        Ok(()) => tracing::info!(node = %shared.node, "fleet: left (lease revoked)"),
        Err(e) => {
            tracing::warn!(node = %shared.node, error = %e, "fleet: leaving failed; the lease ends by itself")
        }
    }
}

/// R10.4: imports the replicated flows of the instances at `ips`, just granted to this node,
/// into the engine, then applies the journal (fast path, replication) before the lock is
/// released. A taken flow's idle timer restarts at the takeover: the replica cannot know the
/// last packet the dead node's kernel fast path carried, so a port is never released early
/// (R2.2), and an idle flow at most one idle timeout late.
fn import_taken(
    l: &Link,
    gw: &Mutex<Gateway>,
    after_change: &AfterChange,
    ips: &HashSet<u32>,
    node: &NodeId,
) {
    let mut st = l.store.take(ips);
    let reserves = l.store.take_reserves(ips);
    FleetTime::move_state(&mut st, -l.time.offset);
    let mut g = gw.lock().unwrap_or_else(|p| p.into_inner());
    let now = g.engine().now();
    for f in &mut st.flows {
        f.last_seen = f.last_seen.max(now);
        // Whole-second offsets (FleetTime) move a timer up to 1 s earlier here than on the
        // sender, whose engine may still hold the flow after a planned move (it keeps
        // translating its copies): a FIN or RST timer ends one second later here, never
        // earlier, so this node never reuses a port toward the same remote while the sender
        // still translates for it (R2.2, R3.2, R3.3).
        if f.close_at != 0 {
            f.close_at = f.close_at.saturating_add(1);
        }
    }
    let offered = st.flows.len();
    let rep = g.engine_mut().import_state(&st);
    // The ports of the last two reserves the previous owner had acknowledged here: a flow
    // whose record was lost lies on one of them (crate::reserve). Held against every
    // destination for the FIN timeout (R3.2), whether or not a flow is known on them.
    let fin = g.engine().topology().params.fin_timeout;
    let held: usize = reserves
        .iter()
        .map(|r| {
            g.engine_mut()
                .hold_ports(r.instance, r.public, &r.ports, now, fin)
        })
        .sum();
    after_change(&mut g);
    drop(g);
    tracing::info!(
        node = %node,
        instances = ips.len(),
        offered,
        restored = rep.flows,
        skipped_instance = rep.skipped_instance,
        skipped_port = rep.skipped_port,
        skipped_conflict = rep.skipped_conflict,
        releases = rep.releases,
        reserves = reserves.len(),
        ports_held = held,
        "fleet: took over instances with their replicated flows (R10.4)"
    );
}

/// Opens each gained instance's takeover window (R10.4, `Engine::hold_after_takeover`) for the
/// FIN timeout (240 s by default, R3.2), before the data path may admit the instance: a flow
/// of the previous owner whose state did not arrive here still has a remote that sends to its
/// public port; such a packet, unsolicited here, holds that port against new flows toward that
/// remote until the FIN timeout after it. Also for an instance this node gains at its first
/// join or after a restart: its flows may have been lost with the previous owner as well.
fn open_takeover_windows(gw: &Mutex<Gateway>, ips: &HashSet<u32>) {
    let mut g = gw.lock().unwrap_or_else(|p| p.into_inner());
    let e = g.engine_mut();
    let (now, secs) = (e.now(), e.topology().params.fin_timeout);
    let opened = ips
        .iter()
        .filter(|&&ip| e.hold_after_takeover(ip, now, secs))
        .count();
    drop(g);
    tracing::debug!(
        instances = opened,
        secs,
        "fleet: takeover windows open: ports of flows whose state did not arrive are held when their remotes send (R10.4)"
    );
}

/// A planned move (R10.4): the instance `name` at `ips` moved away from this node while it
/// is live (a node joined, or rendezvous ranks changed); before its grant is released, its
/// flows go to the new owner (the rendezvous owner among `live`): the replication target
/// becomes the new owner, a full export is offered and the link flushed (up to 500 ms). The
/// new owner imports what arrives for instances it owns at every tick, so a hand-over that
/// arrives after its grant is taken in at its next tick. The target stays for two lease TTLs
/// (closes of the old flows keep reaching the new owner).
#[allow(clippy::too_many_arguments)]
fn hand_over(
    l: &Link,
    coord: &EtcdCoordinator,
    gw: &Mutex<Gateway>,
    name: &str,
    ips: &HashSet<u32>,
    live: &[NodeId],
    me: &NodeId,
    handed: &mut HashMap<u32, (SocketAddr, std::time::Instant)>,
) {
    let key = Resource::Instance(name.to_string()).rendezvous_key();
    let Some(owner) = rendezvous::owner(&key, live).filter(|o| *o != me) else {
        return;
    };
    let Some(link) = coord.links().ok().and_then(|m| m.get(owner).copied()) else {
        return;
    };
    let until = std::time::Instant::now() + 2 * coord.config().ttl();
    let mut targets = l.replicator.targets();
    for &ip in ips {
        targets.insert(ip, link);
        handed.insert(ip, (link, until));
    }
    l.replicator.set_targets(targets);
    let seq = l.replicator.seq();
    let mut st = snatgw_runtime::persist::export_flows(gw, |_| {});
    FleetTime::move_state(&mut st, l.time.offset);
    l.replicator.offer_snapshot(&st, seq);
    let flushed = l.replicator.flush(Duration::from_millis(500));
    let confirmed = confirm_hand_over(l, gw, ips, Duration::from_millis(500));
    if confirmed {
        tracing::info!(instance = name, to = %owner, flushed, "fleet: handed an instance's flows over to its new owner, acknowledged (R10.4)");
    } else {
        tracing::warn!(instance = name, to = %owner, flushed, "fleet: an instance's hand-over was not acknowledged by its new owner within 500 ms; flows whose records do not arrive break, and only their talking peers' ports are held there (R10.4)");
    }
}

/// Waits (up to `within`) until the new owner acknowledges an empty port reserve of each
/// instance at `ips`, queued after the hand-over's snapshot (`Replicator::reserve`): the
/// acknowledgement means the snapshot and every record before it arrived. This node stopped
/// opening flows for the instances before it exported them, so the new owner then knows every
/// flow, and two empty reserves replace whatever reserves it held for them (nothing to hold).
fn confirm_hand_over(l: &Link, gw: &Mutex<Gateway>, ips: &HashSet<u32>, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    // Two empty reserves: the new owner keeps the last two it received, so both of whatever
    // it held for these instances are pushed out.
    let mut left: Vec<(PortReserve, Option<snatgw_fleet::ReserveTicket>)> = {
        let g = gw.lock().unwrap_or_else(|p| p.into_inner());
        ips.iter()
            .filter_map(|&ip| {
                let public = g.engine().port_fence_stats(ip)?.public;
                Some((
                    PortReserve {
                        instance: ip,
                        public,
                        ports: Vec::new(),
                    },
                    None,
                ))
            })
            .collect()
    };
    loop {
        left.retain_mut(|(r, t)| match t {
            Some(t) => !l.replicator.is_acked(t),
            None => {
                *t = l
                    .replicator
                    .reserve(r)
                    .and_then(|_| l.replicator.reserve(r));
                true
            }
        });
        if left.is_empty() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Refreshes where refused packets are steered (each instance another live node owns, by
/// rendezvous, R10.1/R10.3) and where this node's flows are replicated (each owned
/// instance's runner-up, R10.4), from the live nodes' link addresses.
#[allow(clippy::too_many_arguments)]
fn route(
    l: &Link,
    links: &HashMap<NodeId, SocketAddr>,
    cfg: &snatgw_core::ConfigFile,
    live: &[NodeId],
    owned: &HashSet<u32>,
    me: &NodeId,
    handed: &HashMap<u32, (SocketAddr, std::time::Instant)>,
    gw: &Mutex<Gateway>,
) {
    let mut steer: HashMap<u32, SocketAddr> = HashMap::new();
    let mut targets: HashMap<u32, SocketAddr> = HashMap::new();
    for i in &cfg.instance {
        let Ok(ip) = i.private_ip.parse::<Ipv4Addr>() else {
            continue;
        };
        let ip = u32::from(ip);
        let rank = rendezvous::ranking(&Resource::Instance(i.name.clone()).rendezvous_key(), live);
        match rank.first() {
            Some(o) if o != me => {
                if let Some(a) = links.get(o) {
                    steer.insert(ip, *a);
                }
            }
            Some(_) if owned.contains(&ip) => {
                if let Some(a) = rank.get(1).and_then(|n| links.get(n)) {
                    targets.insert(ip, *a);
                }
            }
            _ => {}
        }
    }
    let peers: Vec<SocketAddr> = links
        .iter()
        .filter(|(n, _)| *n != me && live.contains(n))
        .map(|(_, a)| *a)
        .collect();
    for (&ip, &(link, _)) in handed {
        targets.entry(ip).or_insert(link);
    }
    l.steering.set_routes(&steer, &peers);
    l.replicator.set_targets(targets);
    if let Some(k) = &l.kernel {
        // The kernel steers only what this node does not hold a grant for: an instance still
        // granted here (a move under way) is decided here, as the engine's admission does.
        let table = kernel_table(l.addr, &steer, &peers, owned, || {
            gw.lock()
                .unwrap_or_else(|p| p.into_inner())
                .engine()
                .pat_chunks()
        });
        let mut k = k.lock().unwrap_or_else(|p| p.into_inner());
        match k.apply(&table) {
            Ok(true) => tracing::info!(
                epoch = k.epoch(),
                instances = table.inst.len(),
                chunks = table.block.len(),
                "fleet: kernel steering table applied (R10.3)"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "fleet: kernel steering off until the next tick; the TUN path steers meanwhile (R10.3)")
            }
        }
    }
}

/// The kernel's steering table (R10.3): from `steer` (owner's link per instance another live
/// node owns, by rendezvous), the instances this node holds no grant for, and the port chunks
/// of their blocks (`chunks`: public address, chunk, private address, as
/// `Engine::pat_chunks`); `peers`, the other live nodes' links, are those the kernel takes
/// steered packets from. Owners with an IPv6 link are left to the TUN path.
fn kernel_table(
    link: SocketAddr,
    steer: &HashMap<u32, SocketAddr>,
    peers: &[SocketAddr],
    owned: &HashSet<u32>,
    chunks: impl FnOnce() -> Vec<(u32, u16, u32)>,
) -> SteerTable {
    let v4 = |a: &SocketAddr| match a {
        SocketAddr::V4(a) => Some(*a),
        SocketAddr::V6(_) => None,
    };
    let mut t = SteerTable {
        link: v4(&link),
        peers: peers.iter().filter_map(v4).collect(),
        ..SteerTable::default()
    };
    for (&ip, to) in steer {
        if !owned.contains(&ip) {
            if let Some(to) = v4(to) {
                t.inst.insert(Ipv4Addr::from(ip), to);
            }
        }
    }
    if !t.inst.is_empty() {
        for (public, chunk, ip) in chunks() {
            if let Some(to) = t.inst.get(&Ipv4Addr::from(ip)) {
                t.block.insert((Ipv4Addr::from(public), chunk), *to);
            }
        }
    }
    t
}

/// `snatgw fleet`: the fleet as etcd holds it.
#[derive(clap::Args, Debug)]
pub struct FleetArgs {
    /// The fleet's etcd: `etcd://HOST:PORT[,HOST:PORT]`.
    #[arg(long, default_value = "etcd://127.0.0.1:2379", value_parser = parse_fleet_url)]
    pub fleet: FleetUrl,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `snatgw fleet`.
pub fn status(a: &FleetArgs) -> Result<(), String> {
    let opts = options(&a.fleet, 10)?;
    let st = snatgw_fleet::fleet_status(&opts).map_err(|e| e.to_string())?;
    if a.json {
        let s = serde_json::to_string_pretty(&st).map_err(|e| e.to_string())?;
        println!("{s}");
        return Ok(());
    }
    let now = unix_ms();
    println!(
        "{:<16} {:<18} {:>9} {:>9}  {:<28} instances",
        "node", "lease", "ttl left", "owned", "last takeover"
    );
    for n in &st.nodes {
        let last = n.last_takeover.as_ref().map_or("-".to_string(), |t| {
            format!(
                "{} s ago ({})",
                now.saturating_sub(t.at_unix_ms) / 1000,
                t.instances.len()
            )
        });
        println!(
            "{:<16} {:<18} {:>7} s {:>9}  {:<28} {}",
            n.node.as_str(),
            n.lease.to_string(),
            n.ttl_left_secs,
            n.instances.len(),
            last,
            if n.instances.is_empty() {
                "-".to_string()
            } else {
                n.instances.join(",")
            }
        );
    }
    if st.nodes.is_empty() {
        println!("(no live node)");
    }
    for (inst, h) in &st.other_grants {
        println!(
            "grant of {inst} held by {h}, whose lease is no live node's (it ends with that lease)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// R10.3 in the kernel: the table holds the instances other nodes own and this node holds
    /// no grant for, each with the port chunks of its block; owners with an IPv6 link stay
    /// with the TUN path; without any instance to steer, the chunks are not even read.
    #[test]
    fn r10_3_kernel_table_is_the_route_table_minus_granted_instances() {
        use super::*;
        let ip = |s: &str| u32::from(s.parse::<Ipv4Addr>().expect("ip"));
        let (n2, n3, n6): (SocketAddr, SocketAddr, SocketAddr) = (
            "192.0.2.2:7000".parse().expect("a"),
            "192.0.2.3:7000".parse().expect("a"),
            "[2001:db8::6]:7000".parse().expect("a"),
        );
        let steer: HashMap<u32, SocketAddr> = [
            (ip("10.0.1.10"), n2),
            (ip("10.0.1.11"), n3),
            (ip("10.0.1.12"), n3),
            (ip("10.0.1.13"), n6),
        ]
        .into_iter()
        .collect();
        let granted: HashSet<u32> = [ip("10.0.1.12")].into_iter().collect();
        let pub_ = ip("203.0.113.5");
        let chunks = vec![
            (pub_, 0, ip("10.0.1.10")),
            (pub_, 1, ip("10.0.1.10")),
            (pub_, 2, ip("10.0.1.11")),
            (pub_, 3, ip("10.0.1.12")),
            (pub_, 4, ip("10.0.1.13")),
            (pub_, 5, ip("10.0.1.99")),
        ];
        let me: SocketAddr = "192.0.2.1:7000".parse().expect("a");
        let t = kernel_table(me, &steer, &[n2, n3, n6], &granted, || chunks.clone());
        let v4 = |a: SocketAddr| match a {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        assert_eq!(t.link, Some(v4(me)));
        let inst: Vec<(Ipv4Addr, std::net::SocketAddrV4)> =
            t.inst.iter().map(|(a, b)| (*a, *b)).collect();
        assert_eq!(
            inst,
            vec![
                ("10.0.1.10".parse().expect("ip"), v4(n2)),
                ("10.0.1.11".parse().expect("ip"), v4(n3)),
            ]
        );
        let block: Vec<(u16, std::net::SocketAddrV4)> =
            t.block.iter().map(|((_, c), to)| (*c, *to)).collect();
        assert_eq!(block, vec![(0, v4(n2)), (1, v4(n2)), (2, v4(n3))]);
        assert_eq!(
            t.peers.iter().copied().collect::<Vec<_>>(),
            vec![v4(n2), v4(n3)],
            "the live IPv4 links steered packets are taken from"
        );
        let empty = kernel_table(me, &HashMap::new(), &[], &granted, || {
            panic!("chunks read without anything to steer")
        });
        assert!(empty.inst.is_empty() && empty.block.is_empty());
    }

    use super::*;

    /// R10.2: the data path's question (a new flow for the instance at this address?) is
    /// answered from the owned set *and* the clock, so the node stops at its lease view's end
    /// even if its loop is stuck in an etcd call.
    #[test]
    fn r10_2_admission_needs_ownership_and_a_valid_lease_view() {
        let s = Shared {
            node: NodeId::new("gw1").expect("id"),
            clock: MonotonicClock::new(),
            view: RwLock::new(View {
                owned: [u32::from(Ipv4Addr::new(10, 0, 1, 10))]
                    .into_iter()
                    .collect(),
                owned_names: 1,
                valid_until: Duration::from_secs(3600),
                nodes_live: 2,
            }),
            reserve_waiting: std::sync::atomic::AtomicU64::new(0),
        };
        let (mine, other) = (
            u32::from(Ipv4Addr::new(10, 0, 1, 10)),
            u32::from(Ipv4Addr::new(10, 0, 1, 11)),
        );
        assert!(s.admits(mine));
        assert!(!s.admits(other));
        let g = s.gauges();
        assert_eq!((g.nodes_live, g.instances_owned), (2, 1));
        assert!(g.lease_valid_seconds > 3000.0);
        // The lease view ended (no renewal got through): nothing is admitted, gauges say so.
        s.view.write().expect("lock").valid_until = s.clock.now();
        assert!(!s.admits(mine));
        let g = s.gauges();
        assert_eq!((g.instances_owned, g.lease_valid_seconds), (0, 0.0));
    }

    /// R10.4: an instance this node gains is in its takeover window: a remote that keeps
    /// sending to ports of its block (a lost flow's peer) holds them, so a new flow toward
    /// that remote finds none free (R2.6) while other destinations are served; an instance
    /// not gained here gets no such holds.
    #[test]
    fn r10_4_gained_instances_hold_ports_their_lost_flows_peers_still_use() {
        use snatgw_core::{proto, tcp_flags, Direction, DropReason, Packet, Verdict};
        let engine = crate::fleet_link::tests::engine();
        let gw = Mutex::new(Gateway::new(engine));
        let ip = |s: &str| u32::from(s.parse::<Ipv4Addr>().expect("ip"));
        let (vm1, vm2, public) = (ip("10.0.1.10"), ip("10.0.1.11"), ip("192.0.2.100"));
        let (remote, other) = (ip("198.51.100.7"), ip("198.51.100.8"));
        open_takeover_windows(&gw, &[vm1].into_iter().collect());
        let mut g = gw.lock().expect("lock");
        let e = g.engine_mut();
        let block = |e: &snatgw_core::Engine, name: &str| -> Vec<u16> {
            e.instance(name)
                .expect("instance")
                .block
                .iter()
                .flat_map(|&(lo, hi)| lo..=hi)
                .collect()
        };
        // The remote sends to every port of both blocks: no flow, so unsolicited (R3.8).
        for name in ["vm1", "vm2"] {
            for port in block(e, name) {
                let v = e.process(
                    1,
                    Direction::Inbound,
                    &Packet {
                        proto: proto::TCP,
                        src: remote,
                        dst: public,
                        src_port: 443,
                        dst_port: port,
                        flags: tcp_flags::ACK,
                    },
                );
                assert_eq!(v, Verdict::Drop(DropReason::UnsolicitedInbound));
            }
        }
        let syn = |e: &mut snatgw_core::Engine, src: u32, dst: u32, sport: u16| {
            e.process(
                2,
                Direction::Outbound,
                &Packet {
                    proto: proto::TCP,
                    src,
                    dst,
                    src_port: sport,
                    dst_port: 443,
                    flags: tcp_flags::SYN,
                },
            )
        };
        assert_eq!(
            syn(e, vm1, remote, 40000),
            Verdict::Drop(DropReason::PortsExhausted),
            "every port of vm1's block is held for that remote"
        );
        assert!(matches!(
            syn(e, vm1, other, 40001),
            Verdict::Translate { .. }
        ));
        assert!(
            matches!(syn(e, vm2, remote, 40002), Verdict::Translate { .. }),
            "vm2 was not taken over: no holds"
        );
    }

    /// R10.4: replicated times are fleet (Unix) seconds, read back in the taking node's
    /// own engine seconds: a FIN timer due at the origin's engine second 300 is due at the
    /// same wall-clock second on a node whose engine started 1000 s later.
    #[test]
    fn r10_4_replicated_timers_keep_their_wall_clock_second_across_engine_origins() {
        use snatgw_core::engine::persist::FlowRecord;
        let origin = FleetTime {
            offset: 1_800_000_000,
        };
        let taker = FleetTime {
            offset: 1_800_001_000,
        };
        let key = snatgw_core::FlowKey {
            proto: 6,
            src: 1,
            sport: 2,
            dst: 3,
            dport: 4,
            public: 5,
            pport: 1024,
        };
        let mut st = FlowState {
            time: 1500,
            flows: vec![
                FlowRecord {
                    key,
                    last_seen: 1200,
                    close_at: 1300,
                    tcp_state: 3,
                    born: 1100,
                },
                FlowRecord {
                    key,
                    last_seen: 1200,
                    close_at: 0,
                    tcp_state: 0,
                    born: 1100,
                },
            ],
            ..FlowState::default()
        };
        FleetTime::move_state(&mut st, origin.offset);
        FleetTime::move_state(&mut st, -taker.offset);
        assert_eq!((st.flows[0].last_seen, st.flows[0].close_at), (200, 300));
        assert_eq!(st.flows[0].born, 100);
        // "Not closing" stays 0; a time before the taker's origin is its second 0.
        assert_eq!(st.flows[1].close_at, 0);
        let mut early = st.clone();
        FleetTime::move_state(&mut early, -5000);
        assert_eq!(early.flows[0].last_seen, 0);
        // Journal entries travel in fleet seconds; refusals do not travel.
        let c = FlowChange::Opened {
            at: 10,
            instance: "vm1".into(),
            slot: 0,
            by_fast_path: false,
            key,
        };
        match origin.change_to_fleet(&c) {
            Some(FlowChange::Opened { at, .. }) => assert_eq!(at, 1_800_000_010),
            other => panic!("{other:?}"),
        }
        let refused = FlowChange::Refused {
            at: 10,
            instance: "vm1".into(),
            slot: 0,
            key,
            reason: snatgw_core::DropReason::PortsExhausted,
        };
        assert!(origin.change_to_fleet(&refused).is_none());
    }

    #[test]
    fn fleet_urls_parse() {
        assert_eq!(
            parse_fleet_url("etcd://127.0.0.1:2379,10.0.0.2:2379")
                .expect("ok")
                .0,
            vec!["http://127.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        for bad in [
            "http://x:1",
            "etcd://",
            "etcd://host",
            "etcd://h:99999",
            "etcd://:1",
        ] {
            assert!(parse_fleet_url(bad).is_err(), "{bad}");
        }
    }
}
