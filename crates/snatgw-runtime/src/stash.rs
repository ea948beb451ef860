//! Port stashes: the kernel opens new TCP flows itself, on ports the engine chose ahead
//! (issue #17).
//!
//! What it does: keeps, for each hot destination of an instance (a private address sending
//! SYNs to one remote address and port), a small ring of public ports in the fast path's
//! `STASH` map that the engine took for exactly that destination (`Engine::stash_take`: the
//! port the allocator would give a new flow there now, SPEC R2.3 order, held as in use for it,
//! counted toward the flow limits R9.2). The tc program pops a port for a SYN without ACK of no
//! installed flow, installs the flow's two entries, translates the SYN and reports the flow
//! in its EVENTS ring; the `Feed` applies that record with `Engine::stash_opened` at the
//! kernel's second. So a connection's SYN, like its SYN-ACK, FIN and RST, never crosses the
//! TUN, and the engine still decides every port and owns every timer.
//!
//! The [`StashKeeper`] runs under the gateway lock (the runtime's stash thread, every
//! [`STASH_PERIOD`]), after the ring's records were applied:
//! - **Demand.** Destinations whose SYNs reached the engine (`Engine::stash_demand`) at least
//!   [`HOT_SYNS`] times within [`HOT_WINDOW`] get a ring, while a ring is free.
//! - **Refill.** A ring with fewer than half of [`STASH_PORTS`] ports queued is topped up from
//!   the engine. A destination whose ports the engine cannot spare any more (exhaustion near,
//!   a flow limit near) simply gets none: its SYNs go up, and the engine decides them (R2.6).
//! - **Retire.** A ring the kernel took nothing from for [`IDLE_RETIRE`], or whose ports the
//!   engine took back (`Engine::stash_voided`: instance gone, scenario change R1.4, reclaim
//!   R2.9; right after the change, in the same lock hold), is unbound (the program no longer
//!   finds it) and emptied at once with the compare-and-swap the program pops with, so each
//!   port is either taken back or was popped, never both; the untaken ports go back to the
//!   engine with no release history (never on the wire). The ring serves another destination
//!   only [`RETIRE_GRACE`] later.
//!
//! Why no port is used twice or lost (R2.2): a port is in a ring only while the engine holds it
//! for that destination; the program takes each port once (a compare-and-swap on the ring's
//! consumer count) and writes a record for every port it takes, reserved before it takes it
//! (ring full: nothing taken, the SYN goes up); a taken port either becomes a flow (its record
//! applied by `stash_opened`) or comes back (`EV_RETURNED`, `stash_return`); a retired ring's
//! untaken ports are claimed by the same compare-and-swap. The grace period before a ring
//! serves another destination covers a program that found the ring just before it was
//! unbound (it would pop the new destination's port for the old one): a tc program runs to
//! completion within one softirq, microseconds; the grace is 100 ms. What stays timing-bound:
//! a program that popped a port of a stash the engine voided, and has not yet made its
//! entries, while a worker gives the port to a new flow to the same destination (a window of
//! the program's few instructions between its swap and its map inserts; its record then
//! comes back refused).
//!
//! What it does not do: UDP (a UDP flow's first datagram still goes up), instances of a fleet
//! node (their ports are fenced to acknowledged reserves, R10.4: `snatgw run` turns stashes
//! off with `--fleet`), ILPIP instances (no ports to choose, R1.1). A restart starts with no
//! stash: the rings are cleared when the fast path is set up, and records of flows the kernel
//! opened while no gateway ran are adopted by the engine if their port is still free for
//! their destination, else removed (`Engine::stash_opened`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use snatgw_core::engine::stash::{StashGrant, StashKey};
use snatgw_core::Engine;

/// Ports a ring holds (the program's `STASH_PORTS`).
pub const STASH_PORTS: u32 = snatgw_io::fastpath::STASH_PORTS;
/// How often the runtime's stash thread runs the keeper.
pub const STASH_PERIOD: Duration = Duration::from_millis(5);
/// SYNs to one destination within [`HOT_WINDOW`] that make it worth a ring.
pub const HOT_SYNS: u32 = 4;
/// See [`HOT_SYNS`].
pub const HOT_WINDOW: Duration = Duration::from_secs(1);
/// A ring the kernel took nothing from for this long is retired.
pub const IDLE_RETIRE: Duration = Duration::from_secs(1);
/// Between unbinding a ring and emptying it (see the module documentation).
pub const RETIRE_GRACE: Duration = Duration::from_millis(100);
/// Destinations remembered as candidates at most.
const DEMAND_CAP: usize = 4096;

/// Where the rings live (the kernel's `STASH` maps; a fake in tests). Called under the gateway
/// lock by the [`StashKeeper`].
pub trait StashSink: Send {
    /// Rings there are.
    fn slots(&self) -> u32;
    /// Points `key` at ring `slot` (empty), whose flows translate to `public` and count for
    /// instance slot `inst`. False if the kernel refused (the ring stays free).
    fn bind(&mut self, slot: u32, key: StashKey, public: u32, inst: u32) -> bool;
    /// Appends public ports to the ring; returns how many fitted.
    fn push(&mut self, slot: u32, pports: &[u16]) -> usize;
    /// Ports queued and not taken yet.
    fn queued(&self, slot: u32) -> u32;
    /// Ports the kernel took from the ring since it was bound (a running count).
    fn taken(&self, slot: u32) -> u32;
    /// The program stops finding `key`.
    fn unbind(&mut self, key: StashKey);
    /// Empties ring `slot` and returns the ports never taken.
    fn reset(&mut self, slot: u32) -> Vec<u16>;
    /// Unbinds every key and empties every ring (at start: leftovers of an earlier run).
    fn clear(&mut self);
}

/// What the keeper counts (the stats snapshot's `stash` part).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StashCounters {
    /// Rings bound now.
    pub bound: u32,
    /// Rings unbound and waiting for their grace period.
    pub retiring: u32,
    /// Ports pushed to rings since start.
    pub pushed: u64,
    /// Ports given back to the engine untaken since start.
    pub returned: u64,
    /// Rings bound since start.
    pub binds: u64,
    /// Rings retired since start.
    pub retired: u64,
    /// Destinations that wanted a ring when none was free.
    pub no_free_ring: u64,
    /// Ports the engine holds in stashes now (`Engine::stash_stats`).
    #[serde(default)]
    pub ports_stashed: u32,
    /// Flows the kernel opened from a stash, made by the engine, since start.
    #[serde(default)]
    pub opened: u64,
    /// Flows the kernel opened on a port no longer stashed that the engine could still give
    /// it (a restart), since start.
    #[serde(default)]
    pub adopted: u64,
    /// Flows the kernel opened that the engine refused (their entries removed), since start.
    #[serde(default)]
    pub refused: u64,
}

struct Bound {
    slot: u32,
    taken: u32,
    last_taken: Instant,
}

/// The rings of hot destinations, kept under the gateway lock (module documentation).
pub struct StashKeeper {
    sink: Box<dyn StashSink>,
    bound: HashMap<StashKey, Bound>,
    retiring: Vec<(StashKey, u32, Instant)>,
    free: Vec<u32>,
    demand: HashMap<StashKey, (u32, Instant)>,
    counters: StashCounters,
    /// Set by [`StashKeeper::retire_all`]: no ring is bound or refilled any more.
    stopping: bool,
}

impl StashKeeper {
    /// A keeper of `sink`'s rings; empties them first and turns the engine's demand tracking on.
    pub fn new(mut sink: Box<dyn StashSink>, engine: &mut Engine) -> StashKeeper {
        sink.clear();
        engine.set_stash_enabled(true);
        let free = (0..sink.slots()).rev().collect();
        StashKeeper {
            sink,
            bound: HashMap::new(),
            retiring: Vec::new(),
            free,
            demand: HashMap::new(),
            counters: StashCounters::default(),
            stopping: false,
        }
    }

    /// The counters now.
    pub fn counters(&self) -> StashCounters {
        StashCounters {
            bound: self.bound.len() as u32,
            retiring: self.retiring.len() as u32,
            ..self.counters
        }
    }

    /// One round (call under the gateway lock, after the kernel's records were applied, and
    /// flush the journal after): retire, bind, refill.
    pub fn step(&mut self, engine: &mut Engine, now: Instant) {
        // Retired rings whose grace is over may serve another destination.
        let mut i = 0;
        while i < self.retiring.len() {
            let (_, slot, since) = self.retiring[i];
            if now.duration_since(since) < RETIRE_GRACE {
                i += 1;
                continue;
            }
            self.retiring.swap_remove(i);
            // Empty since its retirement (nothing is pushed to a retired ring); exact anyway.
            let _ = self.sink.reset(slot);
            self.free.push(slot);
        }
        self.retire_voided(engine, now);
        if self.stopping {
            // A stop: the kernel's last records were applied, nothing new is bound or pushed.
            return;
        }
        // Activity, refill, idle retirement.
        let keys: Vec<StashKey> = self.bound.keys().copied().collect();
        for key in keys {
            let Some(b) = self.bound.get_mut(&key) else {
                continue;
            };
            let taken = self.sink.taken(b.slot);
            if taken != b.taken {
                b.taken = taken;
                b.last_taken = now;
            } else if now.duration_since(b.last_taken) >= IDLE_RETIRE {
                self.retire(engine, key, now);
                continue;
            }
            let slot = b.slot;
            let queued = self.sink.queued(slot);
            if queued < STASH_PORTS / 2 {
                if let Some(g) = engine.stash_take(key, STASH_PORTS - queued) {
                    self.push(engine, key, slot, &g);
                }
            }
        }
        // New hot destinations.
        for (key, n) in engine.stash_demand() {
            if self.bound.contains_key(&key) {
                continue;
            }
            if self.demand.len() >= DEMAND_CAP && !self.demand.contains_key(&key) {
                continue;
            }
            let e = self.demand.entry(key).or_insert((0, now));
            if now.duration_since(e.1) > HOT_WINDOW {
                *e = (0, now);
            }
            e.0 = e.0.saturating_add(n);
        }
        let hot: Vec<StashKey> = self
            .demand
            .iter()
            .filter(|(_, &(n, _))| n >= HOT_SYNS)
            .map(|(k, _)| *k)
            .collect();
        for key in hot {
            self.demand.remove(&key);
            let Some(slot) = self.free.pop() else {
                self.counters.no_free_ring += 1;
                continue;
            };
            let Some(g) = engine.stash_take(key, STASH_PORTS) else {
                self.free.push(slot);
                continue;
            };
            if !self.sink.bind(slot, key, g.public, g.slot) {
                engine.stash_return(key, &g.pports);
                self.free.push(slot);
                continue;
            }
            self.counters.binds += 1;
            self.bound.insert(
                key,
                Bound {
                    slot,
                    taken: self.sink.taken(slot),
                    last_taken: now,
                },
            );
            self.push(engine, key, slot, &g);
        }
        self.demand
            .retain(|_, (_, since)| now.duration_since(*since) <= HOT_WINDOW);
    }

    /// Unbinds the rings whose ports the engine took back (`Engine::stash_voided`): called in
    /// every round, and right after a configuration change in the same hold of the gateway
    /// lock (the runtime's after-change hook), so a voided port leaves the kernel's reach
    /// before any worker can give it to another flow.
    pub fn retire_voided(&mut self, engine: &mut Engine, now: Instant) {
        for key in engine.stash_voided() {
            self.retire(engine, key, now);
        }
    }

    fn push(&mut self, engine: &mut Engine, key: StashKey, slot: u32, g: &StashGrant) {
        let n = self.sink.push(slot, &g.pports);
        self.counters.pushed += n as u64;
        if n < g.pports.len() {
            engine.stash_return(key, &g.pports[n..]);
        }
    }

    /// Unbinds `key`'s ring, takes back what the kernel did not take (exactly: the kernel
    /// pops with a compare-and-swap the reset also uses) and gives it to the engine at once
    /// (ports of a voided stash the engine already forgot are ignored there). The ring
    /// serves another destination only after [`RETIRE_GRACE`]: a program that found it just
    /// before the unbind must not pop another destination's port for this one.
    fn retire(&mut self, engine: &mut Engine, key: StashKey, now: Instant) {
        if let Some(b) = self.bound.remove(&key) {
            self.sink.unbind(key);
            let left = self.sink.reset(b.slot);
            if !left.is_empty() {
                self.counters.returned += left.len() as u64;
                engine.stash_return(key, &left);
            }
            self.retiring.push((key, b.slot, now));
            self.counters.retired += 1;
        }
    }

    /// Retires every ring and binds no more (at a stop): their untaken ports are the
    /// engine's again when this returns; flows the kernel opened meanwhile come as records.
    pub fn retire_all(&mut self, engine: &mut Engine, now: Instant) {
        self.stopping = true;
        let keys: Vec<StashKey> = self.bound.keys().copied().collect();
        for key in keys {
            self.retire(engine, key, now);
        }
    }

    /// Whether rings wait for their grace period.
    pub fn retiring(&self) -> bool {
        !self.retiring.is_empty()
    }
}
