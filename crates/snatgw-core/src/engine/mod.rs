//! The SNAT engine: scenario resolution, preallocation, PAT, flow table and timers.
//!
//! [`Engine`] decides for every packet which public address and port it leaves with
//! (SPEC §1–§3) and when a port comes free again. It is sans-IO: time is an argument (whole
//! seconds, monotonic), randomness is seeded, nothing here reads a clock, opens a socket or
//! spawns a thread. It does not parse packet bytes (that is `snatgw-wire` / the data plane) and
//! does not perform health probes (it only keeps their results, `inbound`).
//!
//! This module holds the [`Engine`] state, its constructors, the public entry points
//! ([`Engine::process`], [`Engine::advance`], [`Engine::apply`]), the accessors, and the two
//! steps every flow goes through (`insert_flow`, `remove_flow`), which tie the concerns
//! together. Each concern has its own submodule:
//! - `translate`: the packet path — outbound and inbound verdicts, ICMP-error lookups (R1.1,
//!   R1.7, R2.1, R2.6, R3.1, R3.5, R3.6, R3.8);
//! - `flows`: flows live in a slab of 48-byte records; three keyed hash tables of `u32` slab
//!   indices find them by private 5-tuple (outbound), by public 5-tuple (inbound, R2.2) and by
//!   (instance, protocol, destination endpoint) — the head of a doubly linked chain of that
//!   destination's flows, which gives the ports in use for it (R2.3), with a cached bitset for
//!   hot destinations;
//! - `ports`: the allocator (R2.3 preference, R2.6), the per-destination history of releases
//!   within `port_reuse_history_secs`, chunks of public IPs handed to and taken from blocks
//!   (R2.4, R2.9, R2.10); `block`: the port state of one instance's block for one protocol —
//!   owned and used bitsets, reference counts, release order (R2.3–R2.5);
//! - `timers`: each flow has one entry in a one-second timer wheel at its deadline; a packet
//!   only updates `last_seen`, and an expiring entry re-checks the real deadline (lazy
//!   re-check), so expiry costs are proportional to what expires, never a scan of all flows
//!   (R3.2–R3.5); `tcp`: FIN/RST state and close times (R3.1–R3.3);
//! - `plan`: configuration changes — scenarios (R1.1–R1.6), designations and tiers
//!   (R2.8–R2.11), planned before anything changes, then committed; `instance`: the
//!   per-instance record and [`Scenario`];
//! - `nsg`: network security groups at run time — evaluation order, hit counters, stateful
//!   entries of ILPIP instances (SPEC §4); `inbound`: inbound load-balancing flows and
//!   health-probe state (R5.1, R5.2, R3.7, R4.5). Both are asked by `translate` only where a
//!   packet is not already a PAT flow's;
//! - `idle_reuse`: flows ended by idle timeout on which the instance later sent again, the
//!   symptom of missing keepalives (R3.4, R7.1), remembered in a bounded set and looked up
//!   only by packets that miss the flow table;
//! - `failfast`: whether a refused new flow is answered to its instance, with the
//!   per-instance rate limit (R9.5; the data plane writes the answer);
//! - `takeover`: after a fleet takeover, public ports of flows whose state did not arrive,
//!   held against new flows toward the remote endpoint that still sends to them for the FIN
//!   timeout ([`Engine::hold_after_takeover`], R10.4, R3.2, R3.8);
//! - `fence`: a fleet node's port fence (new flows only on the port reserve its runner-up
//!   acknowledged, [`Engine::set_port_fence`]) and port holds toward every destination after
//!   a takeover ([`Engine::hold_ports`]), R10.4, R3.2;
//! - `stash`: ports chosen ahead for one instance's new TCP flows to one destination, which
//!   a kernel fast path opens itself ([`Engine::stash_take`], [`Engine::stash_opened`],
//!   issue #17; R2.2, R2.3, R2.6, R9.2);
//! - `report`, `stats`, `events`: what operators see (R6.1–R6.3); `invariants`: the
//!   consistency check tests run; `journal`: flow changes for a fast path or recorder, and
//!   activity a fast path saw (R3.4 with packets the engine never sees).
//!
//! Names: a *block* is an instance's preallocation (R2.4), `block::PortBlock` its port state
//! for one protocol, and a block id (`Flow::block`) indexes `Engine::blocks` as instance slot ×
//! 2 + protocol (0 TCP, 1 UDP). *Pool* keeps only its SPEC meanings: a load balancer's backend
//! pool, the default-SNAT pool (R1.3), and the pool size that decides the tier (R2.8).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

mod block;
mod events;
mod failfast;
mod fence;
mod flows;
mod idle_reuse;
mod inbound;
mod instance;
mod invariants;
mod journal;
mod nsg;
pub mod persist;
mod plan;
mod ports;
mod report;
pub mod stash;
mod stats;
mod takeover;
mod tcp;
mod timers;
mod translate;

pub use events::{EndCause, Event, EventKind, LimitScope, ReclaimReason, AGGREGATE_KEYS};
pub use failfast::{FAIL_FAST_BURST, FAIL_FAST_PER_SEC};
pub use fence::PortFenceStats;
pub use idle_reuse::IDLE_RECENT_CAP;
pub use inbound::{InboundFlowView, InboundRuleStats, ProbeTarget, ProbeView};
pub use instance::Scenario;
pub use journal::{ActivitySource, FlowChange, FlowKey, JOURNAL_CAP};
pub use nsg::NsgHit;
pub use plan::tier_ports;
pub use ports::{CHUNK, CHUNKS};
pub use report::{ApplyReport, FlowFilter, FlowView, InstanceReport};
pub use stash::{StashGrant, StashKey, StashOpen, StashStats, RETAKE_AFTER, STASH_DEMAND_CAP};
pub use stats::{GlobalStats, InstanceStats};
pub use takeover::{TakeoverHoldStats, TAKEOVER_HOLDS_PER_PORT};
// Their home is `crate::units`, a leaf module; re-exported here for existing users.
pub use crate::units::{Time, PORT_BASE};

use block::PortBlock;
use flows::{Flow, FlowTable};
use instance::InstRt;
use ports::{PipRt, ReleaseHistory};
use stats::stats_bucket;
use timers::Wheel;
pub use timers::EXPIRY_BUDGET;

use crate::error::ConfigError;
use crate::hash::KeyedHash;
use crate::packet::{Direction, Packet, Verdict};
use crate::topology::{SnatGroup, Topology};

/// "No flow" / "no owner": the end of a chain or free list, a free slab slot's block, a free chunk.
const NONE: u32 = u32::MAX;

/// The SNAT engine. See the module documentation.
pub struct Engine {
    topo: Topology,
    now: Time,
    /// Instances by slot (`None` = free slot, listed in `inst_free`).
    insts: Vec<Option<InstRt>>,
    inst_free: Vec<u32>,
    by_name: HashMap<Arc<str>, u32>,
    by_private: hashbrown::HashMap<u32, u32>,
    ilpips: hashbrown::HashMap<u32, u32>,
    /// Port state per (instance slot, protocol): index slot × 2 + protocol (0 TCP, 1 UDP).
    blocks: Vec<PortBlock>,
    /// Per public IP used for PAT: chunk owners and tier.
    pips: hashbrown::HashMap<u32, PipRt>,
    /// Default-SNAT address per sharing group (R1.3).
    designation: BTreeMap<SnatGroup, u32>,
    /// LB frontend chosen per instance (R1.6).
    lb_choice: HashMap<Arc<str>, u32>,
    flows: FlowTable,
    history: ReleaseHistory,
    wheel: Wheel,
    events: VecDeque<Event>,
    /// Storm events in aggregation (R9.3).
    agg: crate::aggregate::Aggregator<EventKind>,
    /// Timer entries `process` may examine per call (R9.4).
    expiry_budget: u32,
    global: GlobalStats,
    /// Flow changes for a fast path or recorder (`journal`).
    journal: journal::Journal,
    /// The activity source of a fast path that learns of flows from the journal (`journal`):
    /// set means an offload runs (the journal is then kept).
    offload: Option<Box<dyn ActivitySource>>,
    /// NSG state (SPEC §4).
    nsg: nsg::NsgRt,
    /// Inbound load balancing and probe state (SPEC §5).
    inb: inbound::InboundRt,
    /// Flows recently ended by idle timeout (`idle_reuse`, R7.1 symptom).
    idle_recent: idle_reuse::IdleRecent,
    /// Who may open new PAT flows ([`Engine::set_admission`], a fleet node's ownership,
    /// R10.2); `None`: every instance.
    admission: Option<Admission>,
    /// Takeover windows and port holds (`takeover`, R10.4).
    takeover: takeover::TakeoverRt,
    /// Port fences and port holds of all destinations (`fence`, R10.4).
    fence: fence::FenceRt,
    /// Port stashes of a kernel fast path (`stash`, issue #17).
    stash: stash::StashRt,
}

/// Whether this engine may open new PAT flows for the instance at a private address
/// ([`Engine::set_admission`]).
pub type Admission = Arc<dyn Fn(u32) -> bool + Send + Sync>;

impl Engine {
    /// A new engine running `topo` at time `now`; the hash key comes from the config seed.
    pub fn new(topo: Topology, now: Time) -> Result<Engine, ConfigError> {
        let key = topo.params.seed ^ 0x5a17_9e77_0000_0001;
        Self::with_hash_key(topo, now, key)
    }

    /// Like [`Engine::new`] with an explicit hash key (the data plane passes OS entropy so
    /// remote hosts cannot predict bucket collisions).
    pub fn with_hash_key(topo: Topology, now: Time, key: u64) -> Result<Engine, ConfigError> {
        let span = timers::span(&topo.params);
        let empty = Topology::from_config(Default::default())
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        let hasher = KeyedHash::new(key);
        let mut e = Engine {
            topo: empty,
            now,
            insts: Vec::new(),
            inst_free: Vec::new(),
            by_name: HashMap::new(),
            by_private: hashbrown::HashMap::new(),
            ilpips: hashbrown::HashMap::new(),
            blocks: Vec::new(),
            pips: hashbrown::HashMap::new(),
            designation: BTreeMap::new(),
            lb_choice: HashMap::new(),
            flows: FlowTable::new(hasher),
            history: ReleaseHistory::new(hasher),
            wheel: Wheel::new(span, now),
            events: VecDeque::new(),
            agg: events::aggregator(topo.params.event_interval),
            expiry_budget: EXPIRY_BUDGET,
            global: GlobalStats::default(),
            journal: journal::Journal::default(),
            offload: None,
            nsg: Default::default(),
            inb: Default::default(),
            idle_recent: Default::default(),
            admission: None,
            takeover: Default::default(),
            fence: Default::default(),
            stash: Default::default(),
        };
        e.apply(now, topo)?;
        Ok(e)
    }

    /// Reserves room for `n` flows, so inserting them never grows (rehashes, copies) the
    /// flow tables; growing a table of a million entries takes several milliseconds.
    pub fn reserve_flows(&mut self, n: usize) {
        self.flows.reserve(n);
    }

    /// The running topology.
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// The engine's current time (the largest `now` seen).
    pub fn now(&self) -> Time {
        self.now
    }

    /// Number of live flows.
    pub fn live_flows(&self) -> usize {
        self.flows.live() as usize
    }

    /// Global counters.
    pub fn global_stats(&self) -> &GlobalStats {
        &self.global
    }

    /// Takes the queued events (at most 65 536 are kept; the rest are counted as lost).
    pub fn drain_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Decides a packet at time `now` (seconds; a smaller value than before counts as the
    /// last one seen). Verdicts are exact to the second: flows due at `now` never translate,
    /// and their ports count as free. Timer work done here is bounded (R9.4): at most
    /// [`Engine::expiry_budget`] entries; a backlog left after a mass expiry is worked off by
    /// later calls or by [`Engine::advance_bounded`].
    #[inline]
    pub fn process(&mut self, now: Time, dir: Direction, p: &Packet) -> Verdict {
        if now >= self.wheel.next {
            self.advance_bounded(now, self.expiry_budget);
        }
        match dir {
            Direction::Outbound => self.outbound(p),
            Direction::Inbound => self.inbound(p),
        }
    }

    /// Releases everything due at or before `now`, however much that is (for the planner,
    /// tests and configuration changes; a data plane calls [`Engine::advance_bounded`]).
    pub fn advance(&mut self, now: Time) {
        while !self.advance_bounded(now, u32::MAX) {}
    }

    /// Moves the engine's time to `now` (a smaller value is ignored) and does at most
    /// `budget` units of timer work: examining one flow-timer entry or forgetting one old
    /// port release is one unit (SPEC R9.4; [`EXPIRY_BUDGET`] units take about 1 ms). Returns
    /// whether all timer work due at `now` is done ([`Engine::behind`] is then false).
    pub fn advance_bounded(&mut self, now: Time, budget: u32) -> bool {
        self.now = self.now.max(now);
        let now = self.now;
        let mut left = budget;
        if now >= self.wheel.next {
            left = self.expire_due(now, left);
        }
        left = self.nsg_expire(now, left);
        left = self.inbound_expire(now, left);
        left = self.takeover_expire(now, left);
        left = self.fence_expire(now, left);
        self.history
            .expire(now, self.topo.params.reuse_history, left);
        self.flush_aggregated(now);
        !self.behind()
    }

    /// Timer entries [`Engine::process`] may examine per call (default [`EXPIRY_BUDGET`]).
    pub fn expiry_budget(&self) -> u32 {
        self.expiry_budget
    }

    /// Sets [`Engine::expiry_budget`] (at least 1). A data plane that decides packets in
    /// batches under one lock sets it so a whole batch stays within its latency target.
    pub fn set_expiry_budget(&mut self, budget: u32) {
        self.expiry_budget = budget.max(1);
    }

    /// Whether `topo` would apply (the plan of [`Engine::apply`] without committing it):
    /// default-SNAT designations with room (R1.3) and pool sizes (R2.8) checked against the
    /// running state. Returns the designations the apply would leave (what a store keeps so a
    /// restart designates the same addresses). Changes nothing.
    pub fn check(&self, topo: &Topology) -> Result<Vec<(SnatGroup, u32)>, ConfigError> {
        self.plan(topo).map(|p| p.designation.into_iter().collect())
    }

    /// The default-SNAT address designated to each sharing group (R1.3).
    pub fn designations(&self) -> Vec<(SnatGroup, u32)> {
        self.designation
            .iter()
            .map(|(g, &a)| (g.clone(), a))
            .collect()
    }

    /// Like [`Engine::with_hash_key`], keeping the default-SNAT `designations` an earlier run
    /// made (R1.3: designations are kept across changes, so they must survive a restart too;
    /// otherwise groups that joined in another order could come back on other addresses).
    /// A pinned address no longer in the pool, or without room, is designated afresh.
    pub fn with_designations(
        topo: Topology,
        now: Time,
        key: u64,
        designations: &[(SnatGroup, u32)],
    ) -> Result<Engine, ConfigError> {
        let empty = Topology::from_config(Default::default())
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        let mut e = Self::with_hash_key(empty, now, key)?;
        e.designation = designations.iter().cloned().collect();
        e.apply(now, topo)?;
        Ok(e)
    }

    /// Applies a new configuration at time `now` (SPEC R1.4: scenarios are re-evaluated).
    /// On error nothing changes.
    pub fn apply(&mut self, now: Time, topo: Topology) -> Result<ApplyReport, ConfigError> {
        self.advance(now);
        let plan = self.plan(&topo)?;
        let report = self.commit(topo, plan);
        self.nsg_rebuild();
        self.inbound_rebuild();
        // Stashes the new configuration would not grant are voided (`stash`, R1.4, R4.3, R9.2).
        self.stash_revalidate();
        Ok(report)
    }

    /// Stores a new flow, queues its idle timer (R3.4) and counts it; stamps its first
    /// second and settles an idle-ended flow of the same 5-tuple (`idle_reuse`). Returns its
    /// slot.
    fn insert_flow(&mut self, f: Flow) -> u32 {
        self.insert_flow_at(f, self.now, false)
    }

    /// [`Engine::insert_flow`] for a flow that started at `at` (its first second, and its
    /// idle timer from `at`); `by_fast_path`: a fast path opened it and holds its entries
    /// (`stash`), which the journal's `Opened` says.
    #[inline]
    fn insert_flow_at(&mut self, mut f: Flow, at: Time, by_fast_path: bool) -> u32 {
        f.born = at as u16;
        self.idle_recent_new_flow(&f);
        if let Some(i) = self.insts[f.slot() as usize].as_mut() {
            i.live += 1;
        }
        let (fi, gen) = self.flows.insert(f);
        let deadline = at.saturating_add(self.topo.params.idle_timeout);
        self.wheel.push(deadline, fi, gen);
        self.global.flows_created += 1;
        self.journal_opened(fi, at, by_fast_path);
        fi
    }

    /// Removes flow `fi`, releasing its port at `release_time`.
    fn remove_flow(&mut self, fi: u32, release_time: Time, cause: EndCause) {
        let f = self.flows.remove(fi);
        if cause == EndCause::Idle {
            self.idle_recent_remember(&f);
        }
        self.journal_closed(&f, release_time, cause);
        self.release_port(f.block, f.dst, f.dport, f.idx, release_time, cause);
        if let Some(i) = self.insts[f.slot() as usize].as_mut() {
            i.stats[stats_bucket(f.proto)].ended[cause.index()] += 1;
            i.live -= 1;
        }
        self.global.flows_ended[cause.index()] += 1;
    }
}
