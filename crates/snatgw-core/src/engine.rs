//! The SNAT engine: scenario resolution, preallocation, PAT, flow table and timers.
//!
//! [`Engine`] decides for every packet which public address and port it leaves with
//! (SPEC §1–§3) and when a port comes free again. It is sans-IO: time is an argument (whole
//! seconds, monotonic), randomness is seeded, nothing here reads a clock, opens a socket or
//! spawns a thread. It does not parse packet bytes (that is `snatgw-wire` / the data plane) and
//! does not implement NSGs (SPEC §4) or inbound load balancing (§5).
//!
//! Structure, for speed and memory:
//! - flows live in a slab of 48-byte records; three keyed hash tables of `u32` slab indices find
//!   them by private 5-tuple (outbound), by public 5-tuple (inbound, R2.2) and by
//!   (instance, protocol, destination endpoint) — the head of a doubly linked chain of that
//!   destination's flows, which gives the ports in use for it (R2.3);
//! - each flow has one entry in a one-second timer wheel at its deadline; a packet only updates
//!   `last_seen`, and an expiring entry re-checks the real deadline (lazy re-check), so expiry
//!   costs are proportional to what expires, never a scan of all flows;
//! - ports: [`crate::pool::PortPool`] bitsets per (instance, protocol) plus a per-destination
//!   history of releases within `port_reuse_history_secs`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use hashbrown::HashTable;

use crate::bits::Bits;
use crate::config::{InstanceKind, Model};
use crate::error::ConfigError;
use crate::hash::KeyedHash;
use crate::packet::{proto, tcp_flags, Direction, DropReason, Packet, Verdict, L4};
use crate::pool::PortPool;
use crate::topology::{SnatGroup, Topology, MAX_POOL};

/// Engine time: whole seconds since an arbitrary epoch, never decreasing.
pub type Time = u32;

/// First port of every public IP's SNAT range (SPEC R2.4 decision).
pub const PORT_BASE: u16 = 1024;
/// Ports per chunk, the unit in which blocks are handed out (the smallest tier).
pub const CHUNK: u16 = 32;
/// Chunks in a public IP's range 1024–65535.
pub const CHUNKS: usize = (65536 - PORT_BASE as usize) / CHUNK as usize;
const SLOTS: usize = 32;
const NONE: u32 = u32::MAX;

const ST_FIN_OUT: u8 = 1;
const ST_FIN_IN: u8 = 2;
const ST_RST: u8 = 4;

/// SNAT ports per instance for a pool of `n` instances (SPEC R2.8). Pools above 1000 (only
/// reachable through a redeploy report, R2.11) get the last tier.
pub fn tier_ports(n: u32) -> u16 {
    match n {
        0..=50 => 1024,
        51..=100 => 512,
        101..=200 => 256,
        201..=400 => 128,
        401..=800 => 64,
        _ => 32,
    }
}

#[derive(Clone, Copy, Debug)]
struct Flow {
    src: u32,
    dst: u32,
    public: u32,
    pool: u32,
    gen: u32,
    prev: u32,
    next: u32,
    last_seen: Time,
    close_at: Time,
    sport: u16,
    dport: u16,
    pport: u16,
    idx: u16,
    proto: u8,
    state: u8,
}

impl Flow {
    const FREE: Flow = Flow {
        src: 0,
        dst: 0,
        public: 0,
        pool: NONE,
        gen: 0,
        prev: NONE,
        next: NONE,
        last_seen: 0,
        close_at: 0,
        sport: 0,
        dport: 0,
        pport: 0,
        idx: 0,
        proto: 0,
        state: 0,
    };
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndCause {
    /// No packet for the idle timeout (R3.4, R3.5).
    Idle,
    /// FIN seen both ways, then the FIN delay (R3.2).
    Fin,
    /// RST, then the RST delay (R3.3).
    Rst,
    /// Its port was reclaimed: tier change (R2.9), scenario change (R1.4) or instance removed.
    Reclaimed,
}

/// An event for operators (SPEC R2.6, R6.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When.
    pub time: Time,
    /// What.
    pub kind: EventKind,
}

/// Kinds of [`Event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A new flow found no free port for its destination (R2.6).
    Exhaustion {
        /// Instance.
        instance: Arc<str>,
        /// Its public IP.
        public_ip: u32,
        /// Protocol.
        l4: L4,
        /// Destination address.
        dst: u32,
        /// Destination port.
        dst_port: u16,
        /// The instance's preallocated ports.
        allocated: u32,
    },
    /// Ports were taken from an instance and the flows on them dropped (R1.4, R2.9).
    PortsReclaimed {
        /// Instance.
        instance: Arc<str>,
        /// Public IP the ports belonged to.
        public_ip: u32,
        /// Ports taken.
        ports: u32,
        /// Flows dropped.
        flows: u32,
        /// Why: `tier_up`, `scenario_change` or `instance_removed`.
        reason: &'static str,
    },
    /// The ports per instance on a public IP changed (R2.9, R2.10, R2.11).
    TierChanged {
        /// Public IP.
        public_ip: u32,
        /// Pool size that decides the tier (as reported, R2.11).
        pool_size: u32,
        /// Previous ports per instance.
        from: u16,
        /// New ports per instance.
        to: u16,
    },
    /// An instance's outbound scenario changed (R1.4).
    ScenarioChanged {
        /// Instance.
        instance: Arc<str>,
        /// Old scenario (`none` for a new instance).
        from: String,
        /// New scenario.
        to: String,
    },
}

/// Counters of one instance for one protocol (SPEC R6.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceStats {
    /// SNAT connections (new flows) that got a port.
    pub conn_ok: u64,
    /// New flows that failed for want of a port (R2.6).
    pub conn_fail: u64,
    /// Packets translated outbound.
    pub packets_out: u64,
    /// Packets translated inbound.
    pub packets_in: u64,
    /// Flows ended, by cause: idle, fin, rst, reclaimed.
    pub ended: [u64; 4],
    /// Dropped packets by [`DropReason`] (index = reason as usize).
    pub drops: [u64; DropReason::COUNT],
}

/// Which rule decided an instance's outbound address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scenario {
    /// R1.1: instance-level public IP, stateless 1:1.
    Ilpip {
        /// The ILPIP.
        addr: u32,
    },
    /// R1.2: PAT on a load balancer frontend.
    LoadBalanced {
        /// LB name.
        lb: String,
        /// Chosen frontend address (R1.6).
        addr: u32,
        /// Number of candidate frontends.
        candidates: usize,
    },
    /// R1.3: PAT on a designated default-SNAT address.
    DefaultSnat {
        /// The sharing group.
        group: SnatGroup,
        /// Designated address.
        addr: u32,
    },
}

impl Scenario {
    /// The public address.
    pub fn addr(&self) -> u32 {
        match self {
            Scenario::Ilpip { addr }
            | Scenario::LoadBalanced { addr, .. }
            | Scenario::DefaultSnat { addr, .. } => *addr,
        }
    }
    /// The SPEC rule id.
    pub fn rule(&self) -> &'static str {
        match self {
            Scenario::Ilpip { .. } => "R1.1",
            Scenario::LoadBalanced { .. } => "R1.2",
            Scenario::DefaultSnat { .. } => "R1.3",
        }
    }
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Ilpip { .. } => "ilpip",
            Scenario::LoadBalanced { .. } => "load_balanced",
            Scenario::DefaultSnat { .. } => "default_snat",
        }
    }
    fn is_pat(&self) -> bool {
        !matches!(self, Scenario::Ilpip { .. })
    }
    fn describe(&self) -> String {
        match self {
            Scenario::Ilpip { addr } => format!("ilpip {}", crate::packet::ip(*addr)),
            Scenario::LoadBalanced { lb, addr, .. } => {
                format!("load_balanced {lb} {}", crate::packet::ip(*addr))
            }
            Scenario::DefaultSnat { group, addr } => {
                format!("default_snat ({group}) {}", crate::packet::ip(*addr))
            }
        }
    }
}

struct InstRt {
    name: Arc<str>,
    kind: InstanceKind,
    model: Model,
    private_ip: u32,
    scenario: Scenario,
    /// Chunk base ports by slot (0 = empty), for PAT scenarios.
    chunks: [u16; SLOTS],
    stats: [InstanceStats; 3],
}

impl InstRt {
    fn port_of(&self, idx: u16) -> u16 {
        self.chunks[(idx / CHUNK) as usize] + idx % CHUNK
    }
    fn n_chunks(&self) -> usize {
        self.chunks.iter().filter(|&&c| c != 0).count()
    }
}

struct PipRt {
    /// Owner instance slot per chunk (NONE = free).
    owner: Vec<u32>,
    /// Pool size deciding the tier (effective, R2.11).
    pool_size: u32,
    ports: u16,
    default_snat: bool,
}

struct Hist {
    pool: u32,
    dst: u32,
    dport: u16,
    q: VecDeque<(u16, Time)>,
}

/// Ports busy for a destination with many flows from one instance: avoids walking a long
/// chain on every allocation (one hot destination would otherwise cost O(flows) per new flow).
struct HotDest {
    pool: u32,
    dst: u32,
    dport: u16,
    n: u32,
    active: Bits,
}

/// Chain length from which a destination's busy ports are kept as a bitset.
const HOT_MIN: u32 = 16;

struct Wheel {
    slots: Vec<Vec<(u32, u32)>>,
    mask: u32,
    next: Time,
}

impl Wheel {
    fn new(span: u32, now: Time) -> Wheel {
        let len = (span as usize + 2).next_power_of_two();
        Wheel {
            slots: (0..len).map(|_| Vec::new()).collect(),
            mask: len as u32 - 1,
            next: now.saturating_add(1),
        }
    }
    #[inline]
    fn push(&mut self, at: Time, flow: u32, gen: u32) {
        self.slots[(at & self.mask) as usize].push((flow, gen));
    }
    fn len(&self) -> u32 {
        self.mask + 1
    }
}

/// Global counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GlobalStats {
    /// Dropped packets by [`DropReason`].
    pub drops: [u64; DropReason::COUNT],
    /// Packets passed untranslated (R1.7).
    pub passed: u64,
    /// Packets translated statelessly for ILPIPs (R1.1).
    pub ilpip_packets: u64,
    /// Flows created.
    pub flows_created: u64,
    /// Flows ended, by cause: idle, fin, rst, reclaimed.
    pub flows_ended: [u64; 4],
    /// Events lost because the queue was full.
    pub events_lost: u64,
}

/// One live translation (SPEC R6.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowView {
    /// Instance name.
    pub instance: Arc<str>,
    /// Protocol.
    pub l4: L4,
    /// Private source address and port.
    pub private: (u32, u16),
    /// Public address and SNAT port.
    pub public: (u32, u16),
    /// Destination address and port.
    pub remote: (u32, u16),
    /// Last packet, either direction.
    pub last_seen: Time,
    /// When the port is released if nothing else happens.
    pub expires_at: Time,
    /// `open`, `fin_out`, `fin_in`, `closing` (FIN both ways) or `reset`.
    pub state: &'static str,
}

/// What the engine says about one instance (for `snatgw show` and the API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceReport {
    /// Name.
    pub name: Arc<str>,
    /// Kind.
    pub kind: InstanceKind,
    /// Model.
    pub model: Model,
    /// Private address.
    pub private_ip: u32,
    /// Scenario, with the deciding rule ([`Scenario::rule`]).
    pub scenario: Scenario,
    /// Preallocated SNAT ports per protocol (65535 for an ILPIP: all ports, no PAT).
    pub allocated: u32,
    /// The block as port ranges, inclusive (empty for an ILPIP).
    pub block: Vec<(u16, u16)>,
    /// Pool size deciding the tier (R2.8, as reported during a redeploy R2.11); 1 for an ILPIP.
    pub pool_size: u32,
    /// Used SNAT ports per protocol `[tcp, udp]` (R2.3).
    pub used: [u32; 2],
    /// Live flows per protocol `[tcp, udp]`.
    pub flows: [u32; 2],
    /// Counters `[tcp, udp, other]`.
    pub stats: [InstanceStats; 3],
}

/// Outcome of [`Engine::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Instances added.
    pub added: usize,
    /// Instances removed.
    pub removed: usize,
    /// Instances whose scenario changed.
    pub rescoped: usize,
    /// Flows dropped because their ports were reclaimed.
    pub flows_reclaimed: usize,
}

const EVENT_CAP: usize = 65_536;

/// The SNAT engine. See the module documentation.
pub struct Engine {
    topo: Topology,
    hasher: KeyedHash,
    now: Time,
    insts: Vec<Option<InstRt>>,
    inst_free: Vec<u32>,
    by_name: HashMap<Arc<str>, u32>,
    by_private: hashbrown::HashMap<u32, u32>,
    ilpips: hashbrown::HashMap<u32, u32>,
    pools: Vec<PortPool>,
    pips: hashbrown::HashMap<u32, PipRt>,
    designation: BTreeMap<SnatGroup, u32>,
    lb_choice: HashMap<Arc<str>, u32>,
    flows: Vec<Flow>,
    free_head: u32,
    live: u32,
    fwd: HashTable<u32>,
    rev: HashTable<u32>,
    dests: HashTable<u32>,
    hot: HashTable<HotDest>,
    hists: HashTable<Hist>,
    hist_q: VecDeque<(Time, u32, u32, u16)>,
    wheel: Wheel,
    events: VecDeque<Event>,
    global: GlobalStats,
}

#[inline]
fn fwd_hash(h: &KeyedHash, p: u8, src: u32, sport: u16, dst: u32, dport: u16) -> u64 {
    h.hash(
        ((src as u64) << 32) | dst as u64,
        ((sport as u64) << 24) | ((dport as u64) << 8) | p as u64,
    )
}
#[inline]
fn dest_hash(h: &KeyedHash, pool: u32, dst: u32, dport: u16) -> u64 {
    h.hash(
        ((pool as u64) << 32) | dst as u64,
        (dport as u64) | (1 << 40),
    )
}
#[inline]
fn fwd_of(h: &KeyedHash, f: &Flow) -> u64 {
    fwd_hash(h, f.proto, f.src, f.sport, f.dst, f.dport)
}
#[inline]
fn rev_of(h: &KeyedHash, f: &Flow) -> u64 {
    fwd_hash(h, f.proto, f.public, f.pport, f.dst, f.dport)
}
#[inline]
fn dest_of(h: &KeyedHash, f: &Flow) -> u64 {
    dest_hash(h, f.pool, f.dst, f.dport)
}

fn stats_bucket(p: u8) -> usize {
    match p {
        proto::TCP => 0,
        proto::UDP => 1,
        _ => 2,
    }
}

fn end_index(c: EndCause) -> usize {
    match c {
        EndCause::Idle => 0,
        EndCause::Fin => 1,
        EndCause::Rst => 2,
        EndCause::Reclaimed => 3,
    }
}

/// The planned outcome of a configuration, computed before anything changes.
struct Plan {
    scenarios: Vec<Scenario>,
    designation: BTreeMap<SnatGroup, u32>,
    lb_choice: HashMap<Arc<str>, u32>,
    /// Public address -> (pool size for the tier, default SNAT?)
    pip_sizes: BTreeMap<u32, (u32, bool)>,
}

impl Engine {
    /// A new engine running `topo` at time `now`; the hash key comes from the config seed.
    pub fn new(topo: Topology, now: Time) -> Result<Engine, ConfigError> {
        let key = topo.params.seed ^ 0x5a17_9e77_0000_0001;
        Self::with_hash_key(topo, now, key)
    }

    /// Like [`Engine::new`] with an explicit hash key (the data plane passes OS entropy so
    /// remote hosts cannot predict bucket collisions).
    pub fn with_hash_key(topo: Topology, now: Time, key: u64) -> Result<Engine, ConfigError> {
        let span = topo
            .params
            .idle_timeout
            .max(topo.params.fin_timeout)
            .max(topo.params.rst_timeout);
        let empty = Topology::from_config(Default::default())
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        let mut e = Engine {
            topo: empty,
            hasher: KeyedHash::new(key),
            now,
            insts: Vec::new(),
            inst_free: Vec::new(),
            by_name: HashMap::new(),
            by_private: hashbrown::HashMap::new(),
            ilpips: hashbrown::HashMap::new(),
            pools: Vec::new(),
            pips: hashbrown::HashMap::new(),
            designation: BTreeMap::new(),
            lb_choice: HashMap::new(),
            flows: Vec::new(),
            free_head: NONE,
            live: 0,
            fwd: HashTable::new(),
            rev: HashTable::new(),
            dests: HashTable::new(),
            hot: HashTable::new(),
            hists: HashTable::new(),
            hist_q: VecDeque::new(),
            wheel: Wheel::new(span, now),
            events: VecDeque::new(),
            global: GlobalStats::default(),
        };
        e.apply(now, topo)?;
        Ok(e)
    }

    /// Reserves room for `n` flows (avoids rehashing during a burst; used by benchmarks).
    pub fn reserve_flows(&mut self, n: usize) {
        let h = self.hasher;
        self.flows.reserve(n);
        let flows = &self.flows;
        self.fwd.reserve(n, |&i| fwd_of(&h, &flows[i as usize]));
        self.rev.reserve(n, |&i| rev_of(&h, &flows[i as usize]));
        self.dests.reserve(n, |&i| dest_of(&h, &flows[i as usize]));
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
        self.live as usize
    }

    /// Global counters.
    pub fn global_stats(&self) -> &GlobalStats {
        &self.global
    }

    /// Takes the queued events (at most 65 536 are kept; the rest are counted as lost).
    pub fn drain_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    fn event(&mut self, kind: EventKind) {
        if self.events.len() >= EVENT_CAP {
            self.global.events_lost += 1;
        } else {
            self.events.push_back(Event {
                time: self.now,
                kind,
            });
        }
    }

    // ------------------------------------------------------------------ packets

    /// Decides a packet at time `now` (seconds; a smaller value than before counts as the
    /// last one seen). Expired flows are released first, so a verdict is always exact to the second.
    #[inline]
    pub fn process(&mut self, now: Time, dir: Direction, p: &Packet) -> Verdict {
        if now >= self.wheel.next {
            self.advance(now);
        }
        match dir {
            Direction::Outbound => self.outbound(p),
            Direction::Inbound => self.inbound(p),
        }
    }

    /// Looks up the flow an ICMP error refers to (R3.6) without creating or refreshing it.
    /// `inner` is the embedded packet as the instance sent it after translation (outbound flow):
    /// its source is (public, SNAT port), its destination the remote. Returns the private
    /// (address, port) to restore.
    pub fn lookup_inbound(
        &self,
        inner_proto: u8,
        public: u32,
        pport: u16,
        remote: u32,
        rport: u16,
    ) -> Option<(u32, u16)> {
        self.find_rev(inner_proto, public, pport, remote, rport)
            .map(|fi| (self.flows[fi as usize].src, self.flows[fi as usize].sport))
            .or_else(|| self.ilpip_private(public).map(|a| (a, pport)))
    }

    /// Whether `private` is a configured instance's address (R9.1).
    pub fn is_instance(&self, private: u32) -> bool {
        self.by_private.contains_key(&private)
    }

    /// The private address behind an ILPIP (R1.1), if `public` is one.
    pub fn ilpip_private(&self, public: u32) -> Option<u32> {
        let &s = self.ilpips.get(&public)?;
        Some(self.insts[s as usize].as_ref()?.private_ip)
    }

    /// The ILPIP of the instance at `private`, if it has one (R1.1).
    pub fn ilpip_public(&self, private: u32) -> Option<u32> {
        let &s = self.by_private.get(&private)?;
        match self.insts[s as usize].as_ref()?.scenario {
            Scenario::Ilpip { addr } => Some(addr),
            _ => None,
        }
    }

    /// Looks up the public side of an instance's existing flow or ILPIP without creating
    /// or refreshing anything (used for ICMP errors an instance sends, R3.6).
    pub fn lookup_outbound(
        &self,
        p: u8,
        src: u32,
        sport: u16,
        dst: u32,
        dport: u16,
    ) -> Option<(u32, u16)> {
        self.find_fwd(p, src, sport, dst, dport)
            .map(|fi| {
                (
                    self.flows[fi as usize].public,
                    self.flows[fi as usize].pport,
                )
            })
            .or_else(|| self.ilpip_public(src).map(|a| (a, sport)))
    }

    /// The flow with this private 5-tuple (outbound key), if any.
    #[inline]
    fn find_fwd(&self, p: u8, src: u32, sport: u16, dst: u32, dport: u16) -> Option<u32> {
        let flows = &self.flows;
        self.fwd
            .find(fwd_hash(&self.hasher, p, src, sport, dst, dport), |&i| {
                let f = &flows[i as usize];
                f.src == src && f.sport == sport && f.dst == dst && f.dport == dport && f.proto == p
            })
            .copied()
    }

    /// The flow with this public 5-tuple (public address, SNAT port, remote), if any (R2.2).
    #[inline]
    fn find_rev(&self, p: u8, public: u32, pport: u16, remote: u32, rport: u16) -> Option<u32> {
        let flows = &self.flows;
        self.rev
            .find(
                fwd_hash(&self.hasher, p, public, pport, remote, rport),
                |&i| {
                    let f = &flows[i as usize];
                    f.public == public
                        && f.pport == pport
                        && f.dst == remote
                        && f.dport == rport
                        && f.proto == p
                },
            )
            .copied()
    }

    fn drop_global(&mut self, r: DropReason) -> Verdict {
        self.global.drops[r as usize] += 1;
        Verdict::Drop(r)
    }

    fn drop_inst(&mut self, slot: u32, p: u8, r: DropReason) -> Verdict {
        if let Some(i) = self.insts[slot as usize].as_mut() {
            i.stats[stats_bucket(p)].drops[r as usize] += 1;
        }
        self.drop_global(r)
    }

    #[inline]
    fn outbound(&mut self, p: &Packet) -> Verdict {
        let now = self.now;
        if p.proto == proto::TCP || p.proto == proto::UDP {
            if let Some(fi) = self.find_fwd(p.proto, p.src, p.src_port, p.dst, p.dst_port) {
                let f = &mut self.flows[fi as usize];
                f.last_seen = now;
                if p.proto == proto::TCP
                    && p.flags & (tcp_flags::FIN | tcp_flags::RST | tcp_flags::SYN) != 0
                {
                    self.tcp_event(fi, p.flags, Direction::Outbound);
                }
                let f = &self.flows[fi as usize];
                let v = Verdict::Translate {
                    addr: f.public,
                    port: f.pport,
                };
                let slot = (f.pool >> 1) as usize;
                if let Some(i) = self.insts[slot].as_mut() {
                    i.stats[stats_bucket(p.proto)].packets_out += 1;
                }
                return v;
            }
        }
        self.outbound_new(p)
    }

    fn outbound_new(&mut self, p: &Packet) -> Verdict {
        // R9.1: only an instance speaks from the private side, inside the VNet too.
        let Some(&slot) = self.by_private.get(&p.src) else {
            return self.drop_global(DropReason::UnknownSource);
        };
        if self.topo.in_vnet(p.dst) {
            self.global.passed += 1;
            return Verdict::Pass;
        }
        let inst = self.insts[slot as usize]
            .as_ref()
            .expect("indexed instance exists");
        let public = match inst.scenario {
            Scenario::Ilpip { addr } => {
                self.global.ilpip_packets += 1;
                if let Some(i) = self.insts[slot as usize].as_mut() {
                    i.stats[stats_bucket(p.proto)].packets_out += 1;
                }
                return Verdict::Translate {
                    addr,
                    port: p.src_port,
                };
            }
            ref s => s.addr(),
        };
        let Some(l4) = L4::from_proto(p.proto) else {
            // R3.6 decision: ICMP echo is not translated through PAT (the seeds list TCP and
            // UDP only); it is counted apart so a tenant asking "why does ping fail" gets an answer.
            let r = if p.proto == proto::ICMP && p.flags == 8 {
                DropReason::IcmpEchoViaPat
            } else {
                DropReason::ProtocolNotTranslated
            };
            return self.drop_inst(slot, p.proto, r);
        };
        if l4 == L4::Tcp
            && p.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) != tcp_flags::SYN
        {
            return self.drop_inst(slot, p.proto, DropReason::TcpNotSyn);
        }
        let pool_id = slot * 2 + l4 as u32;
        match self.alloc(pool_id, p.dst, p.dst_port) {
            Some(idx) => {
                let inst = self.insts[slot as usize].as_mut().expect("instance");
                let pport = inst.port_of(idx);
                let st = &mut inst.stats[l4 as usize];
                st.conn_ok += 1;
                st.packets_out += 1;
                let fi = self.insert_flow(Flow {
                    src: p.src,
                    dst: p.dst,
                    public,
                    pool: pool_id,
                    gen: 0,
                    prev: NONE,
                    next: NONE,
                    last_seen: self.now,
                    close_at: 0,
                    sport: p.src_port,
                    dport: p.dst_port,
                    pport,
                    idx,
                    proto: p.proto,
                    state: 0,
                });
                if l4 == L4::Tcp && p.flags & tcp_flags::FIN != 0 {
                    self.tcp_event(fi, p.flags, Direction::Outbound);
                }
                Verdict::Translate {
                    addr: public,
                    port: pport,
                }
            }
            None => {
                let inst = self.insts[slot as usize].as_mut().expect("instance");
                inst.stats[l4 as usize].conn_fail += 1;
                let kind = EventKind::Exhaustion {
                    instance: inst.name.clone(),
                    public_ip: public,
                    l4,
                    dst: p.dst,
                    dst_port: p.dst_port,
                    allocated: self.pools[pool_id as usize].owned.count(),
                };
                self.event(kind);
                self.drop_inst(slot, p.proto, DropReason::PortsExhausted)
            }
        }
    }

    #[inline]
    fn inbound(&mut self, p: &Packet) -> Verdict {
        if p.proto == proto::TCP || p.proto == proto::UDP {
            // Public 5-tuple: (proto, public ip, SNAT port, remote ip, remote port).
            if let Some(fi) = self.find_rev(p.proto, p.dst, p.dst_port, p.src, p.src_port) {
                let now = self.now;
                let f = &mut self.flows[fi as usize];
                f.last_seen = now;
                if p.proto == proto::TCP && p.flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
                    self.tcp_event(fi, p.flags, Direction::Inbound);
                }
                let f = &self.flows[fi as usize];
                let v = Verdict::Translate {
                    addr: f.src,
                    port: f.sport,
                };
                if let Some(i) = self.insts[(f.pool >> 1) as usize].as_mut() {
                    i.stats[stats_bucket(p.proto)].packets_in += 1;
                }
                return v;
            }
        }
        if let Some(&slot) = self.ilpips.get(&p.dst) {
            let inst = self.insts[slot as usize].as_mut().expect("instance");
            inst.stats[stats_bucket(p.proto)].packets_in += 1;
            self.global.ilpip_packets += 1;
            return Verdict::Translate {
                addr: inst.private_ip,
                port: p.dst_port,
            };
        }
        if self.pips.contains_key(&p.dst) {
            return self.drop_global(DropReason::UnsolicitedInbound);
        }
        self.drop_global(DropReason::NotOurAddress)
    }

    fn tcp_event(&mut self, fi: u32, flags: u8, dir: Direction) {
        let now = self.now;
        let (fin_t, rst_t) = (self.topo.params.fin_timeout, self.topo.params.rst_timeout);
        let f = &mut self.flows[fi as usize];
        if dir == Direction::Outbound
            && flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN
            && f.state != 0
        {
            // A new connection on the same 5-tuple (the client reused its port after closing):
            // the flow starts over.
            f.state = 0;
            f.close_at = 0;
            return;
        }
        let mut at = None;
        if flags & tcp_flags::RST != 0 && f.state & ST_RST == 0 {
            f.state |= ST_RST;
            at = Some(now.saturating_add(rst_t));
        }
        if flags & tcp_flags::FIN != 0 {
            let had_both = f.state & (ST_FIN_OUT | ST_FIN_IN) == ST_FIN_OUT | ST_FIN_IN;
            f.state |= if dir == Direction::Outbound {
                ST_FIN_OUT
            } else {
                ST_FIN_IN
            };
            let both = f.state & (ST_FIN_OUT | ST_FIN_IN) == ST_FIN_OUT | ST_FIN_IN;
            if both && !had_both {
                let t = now.saturating_add(fin_t);
                at = Some(at.map_or(t, |a: Time| a.min(t)));
            }
        }
        if let Some(t) = at {
            if f.close_at == 0 || t < f.close_at {
                f.close_at = t;
                let gen = f.gen;
                self.wheel.push(t, fi, gen);
            }
        }
    }

    // ------------------------------------------------------------------ ports

    /// Chooses a port of pool `pool_id` for a new flow to (`dst`, `dport`) — SPEC R2.3:
    /// a port the instance already uses (free for this destination) before a new one; within
    /// each group, a port with no release for this destination inside the history horizon
    /// first, else the one released for it longest ago. `None` is exhaustion (R2.6).
    fn alloc(&mut self, pool_id: u32, dst: u32, dport: u16) -> Option<u16> {
        let h = self.hasher;
        let dh = dest_hash(&h, pool_id, dst, dport);
        let flows = &self.flows;
        let mut active = Bits::EMPTY;
        let hot = if self.hot.is_empty() {
            None
        } else {
            self.hot.find(dh, |e| {
                e.pool == pool_id && e.dst == dst && e.dport == dport
            })
        };
        if let Some(hd) = hot {
            active = hd.active;
        } else if let Some(&head) = self.dests.find(dh, |&i| {
            let f = &flows[i as usize];
            f.pool == pool_id && f.dst == dst && f.dport == dport
        }) {
            let mut cur = head;
            let mut n = 0;
            while cur != NONE {
                let f = &flows[cur as usize];
                active.set(f.idx);
                cur = f.next;
                n += 1;
            }
            if n >= HOT_MIN {
                let hd = HotDest {
                    pool: pool_id,
                    dst,
                    dport,
                    n,
                    active,
                };
                self.hot
                    .insert_unique(dh, hd, |e| dest_hash(&h, e.pool, e.dst, e.dport));
            }
        }
        let horizon = self.topo.params.reuse_history;
        let now = self.now;
        let mut hist = if horizon > 0 {
            self.hists.find_mut(dh, |e| {
                e.pool == pool_id && e.dst == dst && e.dport == dport
            })
        } else {
            None
        };
        let mut recent = Bits::EMPTY;
        if let Some(hh) = hist.as_mut() {
            while hh
                .q
                .front()
                .is_some_and(|&(_, t)| t.saturating_add(horizon) <= now)
            {
                hh.q.pop_front();
            }
            for &(i, _) in &hh.q {
                recent.set(i);
            }
        }
        let pool = &mut self.pools[pool_id as usize];
        let from_hist = |set: &Bits, hist: &Option<&mut Hist>| -> Option<(u16, usize)> {
            let hh = hist.as_ref()?;
            hh.q.iter()
                .enumerate()
                .find(|(_, &(i, _))| set.get(i))
                .map(|(pos, &(i, _))| (i, pos))
        };
        let group_a = pool.used.minus(&active);
        let (pick, hist_pos) = if group_a.any() {
            let fresh = group_a.minus(&recent);
            if let Some(i) = fresh.first_from(pool.cursor) {
                pool.cursor = i.wrapping_add(1) % crate::bits::CAPACITY as u16;
                (i, None)
            } else {
                let (i, pos) = from_hist(&group_a, &hist)?;
                (i, Some(pos))
            }
        } else {
            let group_b = pool.owned.minus(&pool.used);
            if !group_b.any() {
                return None;
            }
            if group_b.minus(&recent).any() {
                (pool.lru().find(|&i| !recent.get(i))?, None)
            } else {
                let (i, pos) = from_hist(&group_b, &hist)?;
                (i, Some(pos))
            }
        };
        if let (Some(pos), Some(hh)) = (hist_pos, hist.as_mut()) {
            hh.q.remove(pos);
        }
        pool.hold(pick);
        Some(pick)
    }

    fn insert_flow(&mut self, mut f: Flow) -> u32 {
        let h = self.hasher;
        let fi = if self.free_head != NONE {
            let fi = self.free_head;
            self.free_head = self.flows[fi as usize].next;
            f.gen = self.flows[fi as usize].gen;
            fi
        } else {
            self.flows.push(Flow::FREE);
            (self.flows.len() - 1) as u32
        };
        // Chain into the destination's list, at the head.
        let dh = dest_of(&h, &f);
        let flows = &self.flows;
        let head = self.dests.find_mut(dh, |&i| {
            let g = &flows[i as usize];
            g.pool == f.pool && g.dst == f.dst && g.dport == f.dport
        });
        let old_head = match head {
            Some(slot) => {
                let old = *slot;
                *slot = fi;
                old
            }
            None => NONE,
        };
        f.prev = NONE;
        f.next = old_head;
        self.flows[fi as usize] = f;
        if old_head == NONE {
            let flows = &self.flows;
            self.dests
                .insert_unique(dh, fi, |&i| dest_of(&h, &flows[i as usize]));
        } else {
            self.flows[old_head as usize].prev = fi;
            if !self.hot.is_empty() {
                let same = |e: &HotDest| e.pool == f.pool && e.dst == f.dst && e.dport == f.dport;
                if let Some(hd) = self.hot.find_mut(dh, same) {
                    hd.active.set(f.idx);
                    hd.n += 1;
                }
            }
        }
        let flows = &self.flows;
        self.fwd
            .insert_unique(fwd_of(&h, &f), fi, |&i| fwd_of(&h, &flows[i as usize]));
        self.rev
            .insert_unique(rev_of(&h, &f), fi, |&i| rev_of(&h, &flows[i as usize]));
        let deadline = self.now.saturating_add(self.topo.params.idle_timeout);
        self.wheel.push(deadline, fi, f.gen);
        self.live += 1;
        self.global.flows_created += 1;
        fi
    }

    /// Removes flow `fi`, releasing its port at `release_time`.
    fn remove_flow(&mut self, fi: u32, release_time: Time, cause: EndCause) {
        let h = self.hasher;
        let f = self.flows[fi as usize];
        debug_assert!(f.pool != NONE);
        if let Ok(e) = self.fwd.find_entry(fwd_of(&h, &f), |&i| i == fi) {
            e.remove();
        }
        if let Ok(e) = self.rev.find_entry(rev_of(&h, &f), |&i| i == fi) {
            e.remove();
        }
        if f.prev != NONE {
            self.flows[f.prev as usize].next = f.next;
        } else if let Ok(e) = self.dests.find_entry(dest_of(&h, &f), |&i| i == fi) {
            if f.next != NONE {
                *e.into_mut() = f.next;
            } else {
                e.remove();
            }
        }
        if f.next != NONE {
            self.flows[f.next as usize].prev = f.prev;
        }
        if !self.hot.is_empty() {
            let same = |e: &HotDest| e.pool == f.pool && e.dst == f.dst && e.dport == f.dport;
            if let Ok(mut e) = self.hot.find_entry(dest_of(&h, &f), same) {
                let hd = e.get_mut();
                hd.active.clear(f.idx);
                hd.n -= 1;
                if hd.n < HOT_MIN / 2 {
                    e.remove();
                }
            }
        }
        let pool = &mut self.pools[f.pool as usize];
        let owned = pool.owned.get(f.idx);
        pool.release(f.idx);
        let horizon = self.topo.params.reuse_history;
        if owned && horizon > 0 && cause != EndCause::Reclaimed {
            let dh = dest_of(&h, &f);
            match self.hists.find_mut(dh, |e| {
                e.pool == f.pool && e.dst == f.dst && e.dport == f.dport
            }) {
                Some(hh) => hh.q.push_back((f.idx, release_time)),
                None => {
                    let mut q = VecDeque::with_capacity(1);
                    q.push_back((f.idx, release_time));
                    self.hists.insert_unique(
                        dh,
                        Hist {
                            pool: f.pool,
                            dst: f.dst,
                            dport: f.dport,
                            q,
                        },
                        |e| dest_hash(&h, e.pool, e.dst, e.dport),
                    );
                }
            }
            self.hist_q
                .push_back((release_time.saturating_add(horizon), f.pool, f.dst, f.dport));
        }
        if let Some(i) = self.insts[(f.pool >> 1) as usize].as_mut() {
            i.stats[stats_bucket(f.proto)].ended[end_index(cause)] += 1;
        }
        self.global.flows_ended[end_index(cause)] += 1;
        let slot = &mut self.flows[fi as usize];
        slot.gen = slot.gen.wrapping_add(1);
        slot.pool = NONE;
        slot.next = self.free_head;
        self.free_head = fi;
        self.live -= 1;
    }

    /// Releases everything due at or before `now`. Called by [`Engine::process`]; a data plane
    /// may also call it on a timer so ports come back while no packets arrive.
    pub fn advance(&mut self, now: Time) {
        if now < self.now {
            return;
        }
        self.now = now;
        if now < self.wheel.next {
            return;
        }
        let len = self.wheel.len();
        let sweep_all = now - self.wheel.next >= len;
        let (first, last) = if sweep_all {
            (0, len - 1)
        } else {
            (self.wheel.next, now)
        };
        let mut t = first;
        loop {
            let s = (t & self.wheel.mask) as usize;
            let mut entries = std::mem::take(&mut self.wheel.slots[s]);
            for &(fi, gen) in &entries {
                let f = &self.flows[fi as usize];
                if f.gen != gen || f.pool == NONE {
                    continue;
                }
                let idle_at = f.last_seen.saturating_add(self.topo.params.idle_timeout);
                let (deadline, cause) = if f.close_at != 0 && f.close_at <= idle_at {
                    (
                        f.close_at,
                        if f.state & ST_RST != 0 {
                            EndCause::Rst
                        } else {
                            EndCause::Fin
                        },
                    )
                } else {
                    (idle_at, EndCause::Idle)
                };
                if deadline <= now {
                    self.remove_flow(fi, deadline, cause);
                } else {
                    self.wheel.push(deadline, fi, gen);
                }
            }
            entries.clear();
            if self.wheel.slots[s].is_empty() {
                self.wheel.slots[s] = entries;
            }
            if t == last {
                break;
            }
            t += 1;
        }
        self.wheel.next = now + 1;
        let horizon = self.topo.params.reuse_history;
        while let Some(&(at, pool, dst, dport)) = self.hist_q.front() {
            if at > now {
                break;
            }
            self.hist_q.pop_front();
            let h = self.hasher;
            let dh = dest_hash(&h, pool, dst, dport);
            if let Ok(mut e) = self
                .hists
                .find_entry(dh, |e| e.pool == pool && e.dst == dst && e.dport == dport)
            {
                let hh = e.get_mut();
                while hh
                    .q
                    .front()
                    .is_some_and(|&(_, t)| t.saturating_add(horizon) <= now)
                {
                    hh.q.pop_front();
                }
                if hh.q.is_empty() {
                    e.remove();
                }
            }
        }
    }

    // ------------------------------------------------------------------ configuration

    /// Applies a new configuration at time `now` (SPEC R1.4: scenarios are re-evaluated).
    /// On error nothing changes.
    pub fn apply(&mut self, now: Time, topo: Topology) -> Result<ApplyReport, ConfigError> {
        self.advance(now);
        let plan = self.plan(&topo)?;
        Ok(self.commit(topo, plan))
    }

    fn plan(&self, topo: &Topology) -> Result<Plan, ConfigError> {
        // Default-SNAT designation (R1.3): keep earlier designations; new groups go to the
        // least-loaded pool address that stays within 1000 instances (R2.8).
        let mut group_size: BTreeMap<SnatGroup, u32> = BTreeMap::new();
        let mut lb_choice = HashMap::new();
        let mut pre: Vec<Option<Scenario>> = Vec::with_capacity(topo.instances.len());
        for inst in &topo.instances {
            if let Some(addr) = inst.ilpip {
                pre.push(Some(Scenario::Ilpip { addr }));
                continue;
            }
            if let Some(m) = inst.lb.as_ref().filter(|m| !m.candidates.is_empty()) {
                let addr = match self.lb_choice.get(&inst.name) {
                    Some(a) if m.candidates.contains(a) => *a,
                    _ => {
                        // R1.6: one candidate at random, seeded from the config (reproducible).
                        let mut s = topo.params.seed ^ name_hash(&inst.name);
                        let r = crate::hash::splitmix64(&mut s);
                        m.candidates[(r % m.candidates.len() as u64) as usize]
                    }
                };
                lb_choice.insert(inst.name.clone(), addr);
                pre.push(Some(Scenario::LoadBalanced {
                    lb: m.lb.clone(),
                    addr,
                    candidates: m.candidates.len(),
                }));
                continue;
            }
            *group_size.entry(inst.group.clone()).or_default() += 1;
            pre.push(None);
        }
        let mut designation = BTreeMap::new();
        let mut load: BTreeMap<u32, u32> = topo.default_pool.iter().map(|&a| (a, 0)).collect();
        for (g, n) in &group_size {
            if let Some(&a) = self.designation.get(g) {
                if let Some(l) = load.get_mut(&a) {
                    *l += n;
                    designation.insert(g.clone(), a);
                }
            }
        }
        for (g, n) in &group_size {
            if designation.contains_key(g) {
                continue;
            }
            let best = topo
                .default_pool
                .iter()
                .map(|a| (load[a], *a))
                .filter(|(l, _)| (*l + n) as usize <= MAX_POOL)
                .min();
            let Some((_, a)) = best else {
                return Err(ConfigError::PoolTooLarge {
                    field: "gateway.default_snat_pool".into(),
                    address: format!("(no default-SNAT address has room for {g})"),
                    size: *n as usize,
                });
            };
            *load.get_mut(&a).expect("pool address") += n;
            designation.insert(g.clone(), a);
        }
        for (a, l) in &load {
            if *l as usize > MAX_POOL {
                return Err(ConfigError::PoolTooLarge {
                    field: "gateway.default_snat_pool".into(),
                    address: crate::packet::ip(*a).to_string(),
                    size: *l as usize,
                });
            }
        }
        let scenarios: Vec<Scenario> = topo
            .instances
            .iter()
            .zip(pre)
            .map(|(inst, s)| {
                s.unwrap_or_else(|| Scenario::DefaultSnat {
                    group: inst.group.clone(),
                    addr: designation[&inst.group],
                })
            })
            .collect();

        // Pool sizes per PAT address, inflated by redeploy reports (R2.11).
        let redeploy: HashMap<&str, (u32, u32)> = topo
            .deployments
            .iter()
            .filter_map(|d| d.reported.map(|r| (d.name.as_str(), (d.actual.max(1), r))))
            .collect();
        let mut per: BTreeMap<u32, (BTreeMap<Option<&str>, u32>, bool)> = BTreeMap::new();
        for (inst, s) in topo.instances.iter().zip(&scenarios) {
            let dep = match &inst.group {
                SnatGroup::Deployment(d) => Some(d.as_str()),
                _ => None,
            };
            match s {
                Scenario::Ilpip { .. } => {}
                Scenario::DefaultSnat { addr, .. } => {
                    let e = per.entry(*addr).or_insert_with(|| (BTreeMap::new(), true));
                    *e.0.entry(dep).or_default() += 1;
                }
                Scenario::LoadBalanced { .. } => {
                    // Every instance for which a frontend is a candidate counts in its pool.
                    for &a in &inst.lb.as_ref().expect("lb").candidates {
                        let e = per.entry(a).or_insert_with(|| (BTreeMap::new(), false));
                        *e.0.entry(dep).or_default() += 1;
                    }
                }
            }
        }
        let pip_sizes = per
            .into_iter()
            .map(|(a, (by_dep, def))| {
                let n: u32 = by_dep
                    .iter()
                    .map(|(d, &m)| match d.and_then(|d| redeploy.get(d)) {
                        Some(&(actual, reported)) => {
                            (m as u64 * reported as u64).div_ceil(actual as u64) as u32
                        }
                        None => m,
                    })
                    .sum();
                (a, (n, def))
            })
            .collect();
        Ok(Plan {
            scenarios,
            designation,
            lb_choice,
            pip_sizes,
        })
    }

    fn commit(&mut self, topo: Topology, plan: Plan) -> ApplyReport {
        let mut report = ApplyReport::default();
        let new_names: HashMap<&str, usize> = topo
            .instances
            .iter()
            .enumerate()
            .map(|(i, x)| (&*x.name, i))
            .collect();
        // Which PAT instances lose their whole block, and which chunk slots others lose.
        let mut revoke: Vec<(u32, [bool; SLOTS], &'static str)> = Vec::new();
        let mut remove_slots = Vec::new();
        for slot in 0..self.insts.len() as u32 {
            let Some(inst) = self.insts[slot as usize].as_ref() else {
                continue;
            };
            let keep = new_names
                .get(&*inst.name)
                .map(|&i| (&topo.instances[i], &plan.scenarios[i]));
            match keep {
                Some((ni, ns))
                    if ni.private_ip == inst.private_ip
                        && ni.kind == inst.kind
                        && ni.model == inst.model =>
                {
                    if *ns != inst.scenario
                        && (ns.addr() != inst.scenario.addr()
                            || !ns.is_pat()
                            || !inst.scenario.is_pat())
                    {
                        if inst.scenario.is_pat() {
                            revoke.push((slot, [true; SLOTS], "scenario_change"));
                        }
                        report.rescoped += 1;
                    }
                }
                _ => {
                    if inst.scenario.is_pat() {
                        revoke.push((slot, [true; SLOTS], "instance_removed"));
                    }
                    remove_slots.push(slot);
                    report.removed += 1;
                }
            }
        }
        // Tier-up shrink (R2.9): keep the lowest-port chunks up to the new size.
        for slot in 0..self.insts.len() as u32 {
            let Some(inst) = self.insts[slot as usize].as_ref() else {
                continue;
            };
            if !inst.scenario.is_pat() || revoke.iter().any(|r| r.0 == slot) {
                continue;
            }
            let Some(&(n, _)) = plan.pip_sizes.get(&inst.scenario.addr()) else {
                continue;
            };
            let want = (tier_ports(n) / CHUNK) as usize;
            if inst.n_chunks() > want {
                let mut slots: Vec<usize> = (0..SLOTS).filter(|&s| inst.chunks[s] != 0).collect();
                slots.sort_by_key(|&s| inst.chunks[s]);
                let mut mask = [false; SLOTS];
                for &s in &slots[want..] {
                    mask[s] = true;
                }
                revoke.push((slot, mask, "tier_up"));
            }
        }
        report.flows_reclaimed = self.revoke_chunks(&revoke);
        for slot in remove_slots {
            self.remove_instance(slot);
        }

        // Timers: the wheel must span the longest timeout.
        let old_params = self.topo.params;
        let span = topo
            .params
            .idle_timeout
            .max(topo.params.fin_timeout)
            .max(topo.params.rst_timeout);
        self.topo = topo;
        self.designation = plan.designation;
        self.lb_choice = plan.lb_choice;
        if span + 1 >= self.wheel.len() || old_params != self.topo.params {
            self.rebuild_wheel(span);
        }

        // Tiers per public IP.
        let mut tier_events = Vec::new();
        for (&addr, &(n, def)) in &plan.pip_sizes {
            let ports = tier_ports(n);
            let pip = self.pips.entry(addr).or_insert_with(|| PipRt {
                owner: vec![NONE; CHUNKS],
                pool_size: 0,
                ports,
                default_snat: def,
            });
            if pip.ports != ports {
                tier_events.push(EventKind::TierChanged {
                    public_ip: addr,
                    pool_size: n,
                    from: pip.ports,
                    to: ports,
                });
            }
            pip.pool_size = n;
            pip.ports = ports;
            pip.default_snat = def;
        }
        for k in tier_events {
            self.event(k);
        }

        // Instances: update kept ones, add new ones, then grow blocks (R2.4, R2.10).
        let topo_instances = self.topo.instances.clone();
        for (i, ni) in topo_instances.iter().enumerate() {
            let scen = plan.scenarios[i].clone();
            let slot = match self.by_name.get(&ni.name) {
                Some(&s) => s,
                None => {
                    report.added += 1;
                    let s = self.add_instance(ni, scen.clone());
                    self.event(EventKind::ScenarioChanged {
                        instance: ni.name.clone(),
                        from: "none".into(),
                        to: scen.describe(),
                    });
                    s
                }
            };
            let inst = self.insts[slot as usize].as_mut().expect("instance");
            if inst.scenario != scen {
                let from = inst.scenario.describe();
                if let Scenario::Ilpip { addr } = inst.scenario {
                    self.ilpips.remove(&addr);
                }
                inst.scenario = scen.clone();
                if let Scenario::Ilpip { addr } = scen {
                    self.ilpips.insert(addr, slot);
                }
                let to = scen.describe();
                if from != to {
                    self.event(EventKind::ScenarioChanged {
                        instance: ni.name.clone(),
                        from,
                        to,
                    });
                }
            }
            if scen.is_pat() {
                self.grow_block(slot);
            }
        }
        // Public IPs nobody uses any more.
        let used: std::collections::HashSet<u32> = plan.pip_sizes.keys().copied().collect();
        self.pips.retain(|a, _| used.contains(a));
        report
    }

    fn add_instance(&mut self, ni: &crate::topology::Instance, scen: Scenario) -> u32 {
        let slot = match self.inst_free.pop() {
            Some(s) => s,
            None => {
                self.insts.push(None);
                self.pools.push(PortPool::new());
                self.pools.push(PortPool::new());
                (self.insts.len() - 1) as u32
            }
        };
        if let Scenario::Ilpip { addr } = scen {
            self.ilpips.insert(addr, slot);
        }
        self.insts[slot as usize] = Some(InstRt {
            name: ni.name.clone(),
            kind: ni.kind,
            model: ni.model,
            private_ip: ni.private_ip,
            scenario: scen,
            chunks: [0; SLOTS],
            stats: Default::default(),
        });
        self.by_name.insert(ni.name.clone(), slot);
        self.by_private.insert(ni.private_ip, slot);
        slot
    }

    fn remove_instance(&mut self, slot: u32) {
        let Some(inst) = self.insts[slot as usize].take() else {
            return;
        };
        self.by_name.remove(&inst.name);
        self.by_private.remove(&inst.private_ip);
        if let Scenario::Ilpip { addr } = inst.scenario {
            self.ilpips.remove(&addr);
        }
        self.pools[slot as usize * 2].reset();
        self.pools[slot as usize * 2 + 1].reset();
        self.inst_free.push(slot);
    }

    /// Takes chunk slots away from instances and drops the flows on their ports (R1.4, R2.9).
    fn revoke_chunks(&mut self, revoke: &[(u32, [bool; SLOTS], &'static str)]) -> usize {
        if revoke.is_empty() {
            return 0;
        }
        // Take the chunks away first, then drop the flows on them in one pass over the slab
        // (a tier change on a large fleet must not scan all flows once per instance).
        let mut masks: HashMap<u32, [bool; SLOTS]> = HashMap::new();
        let mut reclaimed: Vec<(u32, Arc<str>, u32, u32, &'static str)> = Vec::new();
        for (slot, mask, reason) in revoke {
            let inst = self.insts[*slot as usize].as_mut().expect("instance");
            let addr = inst.scenario.addr();
            let mut ports = 0;
            for (s, &m) in mask.iter().enumerate() {
                if m && inst.chunks[s] != 0 {
                    let base = inst.chunks[s];
                    if let Some(pip) = self.pips.get_mut(&addr) {
                        pip.owner[((base - PORT_BASE) / CHUNK) as usize] = NONE;
                    }
                    inst.chunks[s] = 0;
                    for off in 0..CHUNK {
                        let idx = s as u16 * CHUNK + off;
                        self.pools[*slot as usize * 2].revoke(idx);
                        self.pools[*slot as usize * 2 + 1].revoke(idx);
                    }
                    ports += CHUNK as u32;
                }
            }
            let m = masks.entry(*slot).or_insert([false; SLOTS]);
            for (acc, &x) in m.iter_mut().zip(mask.iter()) {
                *acc |= x;
            }
            if ports > 0 {
                reclaimed.push((*slot, inst.name.clone(), addr, ports, reason));
            }
        }
        let now = self.now;
        let mut per_slot: HashMap<u32, u32> = HashMap::new();
        for fi in 0..self.flows.len() as u32 {
            let f = self.flows[fi as usize];
            if f.pool == NONE {
                continue;
            }
            if masks
                .get(&(f.pool >> 1))
                .is_some_and(|m| m[(f.idx / CHUNK) as usize])
            {
                self.remove_flow(fi, now, EndCause::Reclaimed);
                *per_slot.entry(f.pool >> 1).or_default() += 1;
            }
        }
        for (slot, instance, public_ip, ports, reason) in reclaimed {
            let flows = per_slot.get(&slot).copied().unwrap_or(0);
            self.event(EventKind::PortsReclaimed {
                instance,
                public_ip,
                ports,
                flows,
                reason,
            });
        }
        per_slot.values().map(|&n| n as usize).sum()
    }

    /// Grows an instance's block to its public IP's tier size (R2.4, R2.10): free chunks,
    /// a contiguous run when one exists; never moves existing ports.
    fn grow_block(&mut self, slot: u32) {
        let inst = self.insts[slot as usize].as_mut().expect("instance");
        let addr = inst.scenario.addr();
        let pip = self.pips.get_mut(&addr).expect("public ip planned");
        let want = (pip.ports / CHUNK) as usize;
        let have = inst.n_chunks();
        if have >= want {
            return;
        }
        let need = want - have;
        // Prefer a contiguous run of `need` free chunks; else the lowest free chunks.
        let mut run_start = None;
        let mut run = 0;
        for c in 0..CHUNKS {
            if pip.owner[c] == NONE {
                run += 1;
                if run == need {
                    run_start = Some(c + 1 - need);
                    break;
                }
            } else {
                run = 0;
            }
        }
        let picks: Vec<usize> = match run_start {
            Some(s) => (s..s + need).collect(),
            None => (0..CHUNKS)
                .filter(|&c| pip.owner[c] == NONE)
                .take(need)
                .collect(),
        };
        debug_assert_eq!(picks.len(), need, "tiers guarantee room (R2.8)");
        let free_slots: Vec<usize> = (0..SLOTS).filter(|&s| inst.chunks[s] == 0).collect();
        let mut granted = Vec::with_capacity(need * CHUNK as usize);
        for (c, s) in picks.into_iter().zip(free_slots) {
            pip.owner[c] = slot;
            let base = PORT_BASE + c as u16 * CHUNK;
            inst.chunks[s] = base;
            granted.extend((0..CHUNK).map(|off| (base + off, s as u16 * CHUNK + off)));
        }
        // Never-used ports go to the front of the free order; granting the highest port first
        // leaves them in ascending port order there.
        granted.sort_unstable_by(|a, b| b.cmp(a));
        for (_, idx) in granted {
            self.pools[slot as usize * 2].grant(idx);
            self.pools[slot as usize * 2 + 1].grant(idx);
        }
    }

    fn rebuild_wheel(&mut self, span: u32) {
        let mut w = Wheel::new(span, self.now);
        w.next = self.wheel.next;
        let idle = self.topo.params.idle_timeout;
        for (fi, f) in self.flows.iter().enumerate() {
            if f.pool == NONE {
                continue;
            }
            let mut d = f.last_seen.saturating_add(idle);
            if f.close_at != 0 {
                d = d.min(f.close_at);
            }
            w.push(d.max(w.next), fi as u32, f.gen);
        }
        self.wheel = w;
    }

    // ------------------------------------------------------------------ observation

    /// One instance's report, by name.
    pub fn instance(&self, name: &str) -> Option<InstanceReport> {
        let &slot = self.by_name.get(name)?;
        Some(self.report(slot))
    }

    /// Reports for every instance, in configuration order.
    pub fn instances(&self) -> Vec<InstanceReport> {
        self.topo
            .instances
            .iter()
            .filter_map(|i| self.instance(&i.name))
            .collect()
    }

    fn report(&self, slot: u32) -> InstanceReport {
        let inst = self.insts[slot as usize].as_ref().expect("instance");
        let (allocated, block, pool_size) = if inst.scenario.is_pat() {
            let mut bases: Vec<u16> = inst.chunks.iter().copied().filter(|&c| c != 0).collect();
            bases.sort_unstable();
            let mut ranges: Vec<(u16, u16)> = Vec::new();
            for b in bases {
                match ranges.last_mut() {
                    Some(r) if r.1.wrapping_add(1) == b => r.1 = b + CHUNK - 1,
                    _ => ranges.push((b, b + CHUNK - 1)),
                }
            }
            let n = self
                .pips
                .get(&inst.scenario.addr())
                .map_or(0, |p| p.pool_size);
            (inst.n_chunks() as u32 * CHUNK as u32, ranges, n)
        } else {
            (65535, Vec::new(), 1)
        };
        let (tp, up) = (
            &self.pools[slot as usize * 2],
            &self.pools[slot as usize * 2 + 1],
        );
        let mut flows = [0u32; 2];
        for (l, pool) in [tp, up].iter().enumerate() {
            flows[l] = pool.flows();
        }
        InstanceReport {
            name: inst.name.clone(),
            kind: inst.kind,
            model: inst.model,
            private_ip: inst.private_ip,
            scenario: inst.scenario.clone(),
            allocated,
            block,
            pool_size,
            used: [tp.used.count(), up.used.count()],
            flows,
            stats: inst.stats,
        }
    }

    /// Live translations, optionally only one instance's (SPEC R6.3).
    pub fn flows(&self, instance: Option<&str>) -> Vec<FlowView> {
        let only = instance.and_then(|n| self.by_name.get(n).copied());
        if instance.is_some() && only.is_none() {
            return Vec::new();
        }
        let idle = self.topo.params.idle_timeout;
        self.flows
            .iter()
            .filter(|f| f.pool != NONE && only.is_none_or(|s| f.pool >> 1 == s))
            .map(|f| {
                let inst = self.insts[(f.pool >> 1) as usize]
                    .as_ref()
                    .expect("instance");
                let mut exp = f.last_seen.saturating_add(idle);
                if f.close_at != 0 {
                    exp = exp.min(f.close_at);
                }
                FlowView {
                    instance: inst.name.clone(),
                    l4: if f.proto == proto::TCP {
                        L4::Tcp
                    } else {
                        L4::Udp
                    },
                    private: (f.src, f.sport),
                    public: (f.public, f.pport),
                    remote: (f.dst, f.dport),
                    last_seen: f.last_seen,
                    expires_at: exp,
                    state: match f.state {
                        0 => "open",
                        s if s & ST_RST != 0 => "reset",
                        s if s & (ST_FIN_IN | ST_FIN_OUT) == ST_FIN_IN | ST_FIN_OUT => "closing",
                        ST_FIN_OUT => "fin_out",
                        _ => "fin_in",
                    },
                }
            })
            .collect()
    }

    /// Checks internal invariants (for tests and the soak): uniqueness of public 5-tuples
    /// (R2.2), ports inside the owner's block (R2.4), used-port counts within the
    /// preallocation, disjoint blocks, and that counters add up. Returns the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut public = std::collections::HashSet::new();
        let mut live = 0u32;
        let mut per_pool: HashMap<u32, HashMap<u16, u16>> = HashMap::new();
        for f in self.flows.iter().filter(|f| f.pool != NONE) {
            live += 1;
            if !public.insert((f.proto, f.public, f.pport, f.dst, f.dport)) {
                return Err(format!("public 5-tuple held twice: {:?}", f));
            }
            let inst = self.insts[(f.pool >> 1) as usize]
                .as_ref()
                .ok_or("flow of a removed instance")?;
            if inst.scenario.addr() != f.public {
                return Err(format!(
                    "flow on {} but instance {} uses {}",
                    f.public,
                    inst.name,
                    inst.scenario.addr()
                ));
            }
            let base = inst.chunks[(f.idx / CHUNK) as usize];
            if base == 0 || base + f.idx % CHUNK != f.pport {
                return Err(format!(
                    "port {} of {} outside its block",
                    f.pport, inst.name
                ));
            }
            if !self.pools[f.pool as usize].owned.get(f.idx) {
                return Err(format!("port {} of {} not owned", f.pport, inst.name));
            }
            *per_pool
                .entry(f.pool)
                .or_default()
                .entry(f.idx)
                .or_default() += 1;
        }
        if live != self.live {
            return Err(format!("live count {} but {} flows", self.live, live));
        }
        for (pid, pool) in self.pools.iter().enumerate() {
            let counts = per_pool.remove(&(pid as u32)).unwrap_or_default();
            if pool.used.count() as usize != counts.len() {
                return Err(format!(
                    "pool {pid}: used {} != distinct ports {}",
                    pool.used.count(),
                    counts.len()
                ));
            }
            for (&i, &c) in &counts {
                if pool.holders(i) != c {
                    return Err(format!(
                        "pool {pid}: port idx {i} refcount {} != {c}",
                        pool.holders(i)
                    ));
                }
            }
            if pool.used.count() > pool.owned.count() && pool.used.minus(&pool.owned).any() {
                return Err(format!("pool {pid}: used ports outside the preallocation"));
            }
            let lru: Vec<u16> = pool.lru().collect();
            let unused = pool.owned.minus(&pool.used);
            if lru.len() != unused.count() as usize || lru.iter().any(|&i| !unused.get(i)) {
                return Err(format!(
                    "pool {pid}: free list does not match unused owned ports"
                ));
            }
        }
        // Disjoint blocks and owner maps.
        let mut owner: HashMap<(u32, u16), u32> = HashMap::new();
        for (slot, inst) in self.insts.iter().enumerate() {
            let Some(inst) = inst else { continue };
            if !inst.scenario.is_pat() {
                continue;
            }
            let pip = self
                .pips
                .get(&inst.scenario.addr())
                .ok_or("PAT instance without public IP state")?;
            if inst.n_chunks() as u16 * CHUNK > pip.ports && pip.ports >= CHUNK {
                return Err(format!(
                    "{} holds {} ports, tier is {}",
                    inst.name,
                    inst.n_chunks() as u16 * CHUNK,
                    pip.ports
                ));
            }
            for &b in inst.chunks.iter().filter(|&&b| b != 0) {
                if let Some(o) = owner.insert((inst.scenario.addr(), b), slot as u32) {
                    return Err(format!("chunk {b} owned by {o} and {slot}"));
                }
                if pip.owner[((b - PORT_BASE) / CHUNK) as usize] != slot as u32 {
                    return Err(format!("owner map disagrees for chunk {b}"));
                }
            }
        }
        // Per instance: connections made minus flows ended equals live flows, per protocol.
        for (slot, inst) in self.insts.iter().enumerate() {
            let Some(inst) = inst else { continue };
            for l in 0..2 {
                let st = &inst.stats[l];
                let ended: u64 = st.ended.iter().sum();
                let live = self.pools[slot * 2 + l].flows() as u64;
                if st.conn_ok < ended || st.conn_ok - ended != live {
                    return Err(format!(
                        "{} {l}: conn_ok {} - ended {ended} != live {live}",
                        inst.name, st.conn_ok
                    ));
                }
            }
        }
        // Cached busy-port sets of hot destinations equal their chains.
        for hd in self.hot.iter() {
            let mut chain = Bits::EMPTY;
            let mut n = 0;
            let same = |f: &&Flow| f.pool == hd.pool && f.dst == hd.dst && f.dport == hd.dport;
            for f in self.flows.iter().filter(same) {
                chain.set(f.idx);
                n += 1;
            }
            if chain != hd.active || n != hd.n {
                return Err(format!(
                    "hot destination cache out of date: {n} flows, cache {}",
                    hd.n
                ));
            }
        }
        let created = self.global.flows_created;
        let ended: u64 = self.global.flows_ended.iter().sum();
        if created - ended != self.live as u64 {
            return Err(format!(
                "created {created} - ended {ended} != live {}",
                self.live
            ));
        }
        Ok(())
    }
}

fn name_hash(s: &str) -> u64 {
    // FNV-1a: stable across runs and platforms (R1.6 reproducibility).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    #[test]
    fn flow_record_stays_small() {
        // The memory target (≤ 96 bytes per live flow) depends on it.
        assert_eq!(std::mem::size_of::<super::Flow>(), 48);
    }
}
