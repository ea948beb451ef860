//! `snatgw run --fast-path`: the kernel fast path joined to the engine (issue #9).
//!
//! What it does: sets up `snatgw-io`'s tc program on the interfaces the operator names
//! (`--private-if`, `--public-if`: where the instances' and the internet's packets arrive,
//! SPEC R9.1), and carries the engine's flow changes to the kernel: every flow the engine
//! opens is installed as two map entries (outbound by private 5-tuple, inbound by public
//! 5-tuple), every flow it ends is removed. Before the engine removes a flow as idle it asks the
//! map ([`TcActivity`], the engine's `ActivitySource`) when the flow's last packet went through
//! the kernel, so keepalives that never leave the fast path keep it alive to the second (R3.4,
//! R3.5). A SYN without ACK always goes up to the engine (R3.1); the SYN-ACK, FIN and RST of an
//! installed flow are translated in the kernel and FIN/RST reported as events (below), so
//! R3.2–R3.3 stay the engine's, timed by the kernel's clock. Packet counts
//! the kernel made are credited per instance and protocol every second ([`FastPath::harvest`],
//! R6.1).
//!
//! # One channel, applied before the lock is released (issue #16)
//!
//! The engine does not call the kernel. It records opens and closes, in its order, in its
//! journal (`Engine::drain_journal`, the same queue the flow recorder reads); the runtime
//! drains it with a `Feed` after each batch of packets and each timer step, *before it
//! releases the gateway lock*, and hands it to an [`OffloadSink`] (here [`TcOffload`]): each
//! run of consecutive opens is one `BPF_MAP_UPDATE_BATCH`, each run of consecutive closes one
//! `BPF_MAP_DELETE_BATCH` (per-entry calls on kernels that refuse batches on hash maps). Runs
//! are never reordered, so a close is in the kernel before any later open, in particular the
//! open of the flow that got the released port. What that guarantees (R2.2):
//! - **No kernel entry outlives its port for a new owner.** A released port can get a new
//!   owner only in `Engine::process`, which only workers call; the worker applies the queue
//!   (the old owner's removal first) before it releases the lock, so before the new owner's
//!   first packet is even sent, and the kernel never holds both owners' translations.
//! - **Closes made under the lock by other holders** (the API's configuration change and its
//!   expiry steps, R2.9 reclaims) are queued like any other and applied by the next batch or
//!   timer step of the runtime, at most one housekeeping tick (100 ms) later; until then the
//!   kernel may still carry the ended flow's own packets (nobody else can have its port: the
//!   new owner's open is queued after the close).
//! - **Loss.** The queue holds `JOURNAL_CAP` changes; the runtime drains it after every batch,
//!   so only one enormous change (an instance with over a million flows reclaimed at once) can
//!   overflow it. The `Feed` sees `Engine::journal_lost` grow and resynchronises under the same
//!   lock: it empties the map and installs `Engine::live_flow_keys`, discarding the queued
//!   changes (older than that set) for the kernel; the recorder still gets them and counts the
//!   loss.
//!
//! # FIN and RST from the kernel (issue #17)
//!
//! Only the packet that needs a decision goes up: a flow's first packet (which takes a port)
//! and a SYN without ACK (R3.1: a client reusing the 5-tuple). A FIN or RST of an installed flow
//! is translated by the program, which also writes a record to its EVENTS ring buffer: the
//! flow's outbound 5-tuple and public side, flags, direction and the `bpf_ktime_get_ns()` it
//! also stores as the entry's `last_seen`. [`TcEvents`] converts the time to engine seconds with
//! the origin [`TcActivity`] uses (`start_ns`, the runtime clock's), and the `Feed` applies each
//! record with `Engine::tcp_event_at`, which starts the FIN (R3.2) or RST (R3.3) timer at that
//! second, not at the second the record is read. What makes that exact:
//! - **When they are read.** Under the gateway lock, before every worker batch is decided and
//!   before every housekeeping timer step (at least every [`crate::TICK`], 100 ms, when no packet
//!   reaches the workers at all), and in the API's after-change hook. Reading an empty ring is a
//!   load of its producer position from shared memory, no system call, so the workers do it on
//!   every batch; the program submits without waking anyone (nothing sleeps on the ring's fd:
//!   the tick bounds the delay, and the delay does not move any timer since the time travels
//!   with the record). A close time already past when a record is read (only possible if
//!   reading stalled for longer than `rst_timeout`) releases the port at once, with that close
//!   time as its release time.
//! - **Before idle expiry.** A flow could end by idle before its FIN/RST is applied only if the
//!   engine found it idle-due, but the packet that carried the FIN/RST set the map entry's
//!   `last_seen` to the record's time, which the engine reads ([`TcActivity`]) before removing
//!   any flow as idle: the flow lives at least `idle_timeout` (seconds) past the record's time,
//!   and records are read every tick. Applying the record moves `last_seen` there too.
//! - **In order.** Records leave the ring in the order the program reserved them, and a batch
//!   applies every record written before its packets were read from the queue, so a FIN/RST
//!   the kernel translated is applied before a later packet of the same flow that went up (a
//!   client's new SYN on the 5-tuple, R3.1). A record for a flow that has ended, or whose
//!   5-tuple has a new flow with another public port, matches nothing and is counted
//!   (`tcp_events_unknown`).
//! - **Never lost.** The program reserves the record before it touches the packet; if the ring
//!   is full it does not translate but passes the packet up (`event_full` in the stats), and
//!   the engine decides the FIN/RST from the packet, at its own second, as before. So every
//!   FIN/RST reaches the engine, as a record or as a packet: a port is never held forever nor
//!   released early because the ring overflowed. The ring is 1 MiB by default (32 768 records;
//!   `--fast-path-event-ring-bytes`).
//!
//! Modes: `off` (TUN only), `tc` (fast path or fail to start), `auto` (fast path when
//! possible, else the TUN path with one warning saying why). Flows that do not fit the map
//! (`--fast-path-flows`) or whose instance slot has no counters stay on the TUN path, counted.
//!
//! What it does not do: ILPIP traffic (stateless, R1.1) and ICMP stay on the TUN path; the
//! first packets of a UDP flow go up while its entry is written, so the first datagram can be
//! overtaken by the second (UDP permits reordering; TCP's first packets carry SYN and go up).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use snatgw_core::{
    proto, ActivitySource, Direction, Engine, FlowChange, FlowKey, Time, JOURNAL_CAP,
};

use snatgw_core::engine::stash::StashKey;
use snatgw_io::fastpath::{
    counter_index, BpfFlowKey, BpfFlowVal, BpfStashKey, BpfTcpEvent, FastPathConfig,
    FastPathCounters, FastPathEvents, FastPathStash, FastPathSteer, FlowMap, FlowMapReader,
    StashParams, TcFastPath, DIR_IN, DIR_OUT, EV_OPENED, EV_RETURNED, STAT_NAMES,
};

use crate::stash::{StashCounters, StashKeeper, StashSink};

/// `--fast-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FastPathMode {
    /// The fast path when the kernel, the build and the options allow it, else the TUN path.
    Auto,
    /// The fast path, or refuse to start.
    Tc,
    /// The TUN path only.
    Off,
}

impl FastPathMode {
    /// The spellings `--fast-path` takes.
    pub const NAMES: [&'static str; 3] = ["auto", "tc", "off"];

    /// Its spelling.
    pub fn name(self) -> &'static str {
        match self {
            FastPathMode::Auto => "auto",
            FastPathMode::Tc => "tc",
            FastPathMode::Off => "off",
        }
    }
}

/// A `--fast-path` value that is not a mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}`: expected one of auto, tc, off")]
pub struct UnknownMode(pub String);

impl std::str::FromStr for FastPathMode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, UnknownMode> {
        match s {
            "auto" => Ok(FastPathMode::Auto),
            "tc" => Ok(FastPathMode::Tc),
            "off" => Ok(FastPathMode::Off),
            _ => Err(UnknownMode(s.into())),
        }
    }
}

impl std::fmt::Display for FastPathMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why `--fast-path tc` cannot run (with `auto` the same reasons are logged and the TUN
/// path is used instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The interfaces to attach to were not named.
    #[error("--fast-path tc: --private-if and --public-if name the interfaces the fast path attaches to")]
    NoInterfaces,
    /// The program could not be built, loaded or attached.
    #[error("--fast-path tc: {0}")]
    Load(#[from] snatgw_io::fastpath::FastPathError),
}

/// Instance slots with fast-path counters; flows of instances in higher slots stay on the
/// TUN path (counted as `skipped`).
pub const COUNTER_SLOTS: u32 = 16_384;

/// What the offload counts (shared with the stats snapshot).
#[derive(Default)]
pub struct OffloadCounters {
    installed: AtomicU64,
    removed: AtomicU64,
    install_failed: AtomicU64,
    skipped: AtomicU64,
    syscalls: AtomicU64,
}

/// Where the engine's flow changes are carried out (a kernel flow map; a fake in tests). Called
/// by the runtime's `Feed` under the gateway lock, in the engine's order, one call per run of
/// consecutive changes of one kind: the calls are never reordered, so everything removed by a
/// call is gone before anything a later call installs.
pub trait OffloadSink: Send {
    /// These flows opened (instance slot, translation), in order: their packets may be
    /// translated outside the engine from now on.
    fn install(&mut self, flows: &[(u32, FlowKey)]);
    /// These flows ended and their ports are released, in order: translate none of their
    /// packets any more. A flow never installed (refused, skipped) may be among them.
    fn remove(&mut self, flows: &[FlowKey]);
    /// Forget every flow (resynchronisation after the journal lost changes; the live flows are
    /// installed right after, under the same lock).
    fn clear(&mut self);
}

/// Flows per call when the live flows are installed at once (attach, resynchronisation).
const INSTALL_CHUNK: usize = 4096;

/// The journal's consumer in the runtime (module doc): drains the engine's one queue of flow
/// changes under the gateway lock, applies opens and closes to the offload in runs, and keeps
/// every change for the recorder (if any) until the housekeeping tick takes them.
pub(crate) struct Feed {
    offload: Option<Box<dyn OffloadSink>>,
    /// The fleet's journal tap (`crate::runtime::FleetHooks::with_journal_tap`): given every
    /// drained change, in order, after the offload applied them.
    tap: Option<JournalTap>,
    /// Changes handed to the tap so far, and `Engine::journal_lost` as of the last flush
    /// (read by the runtime's counters and journal mark without the gateway lock).
    tap_counts: Arc<TapCounts>,
    /// `Engine::journal_lost` when the feed started (the tap counts losses from there).
    lost_base: u64,
    /// The fast path's FIN/RST events (issue #17), applied before anything else under the lock.
    events: Option<Box<dyn TcpEventSource>>,
    /// Events are not read before this (a test knob that forces the kernel's ring full).
    events_hold: Option<std::time::Instant>,
    ev_buf: Vec<KernelTcpEvent>,
    /// The port stashes the kernel opens flows from (issue #17, `crate::stash`), if any.
    stash: Option<StashKeeper>,
    record: bool,
    /// Changes for the recorder, oldest first.
    recorded: Vec<FlowChange>,
    /// Changes the recorder will not see (its buffer was full).
    record_lost: u64,
    /// `Engine::journal_lost` when last drained.
    lost_seen: u64,
    scratch: Vec<FlowChange>,
    installs: Vec<(u32, FlowKey)>,
    removes: Vec<FlowKey>,
}

impl Feed {
    /// A feed for `offload` and/or a recorder; `engine` is the one it will drain: its journal is
    /// turned on if anything consumes it, and an offload is given every live flow first.
    pub(crate) fn new(
        offload: Option<Box<dyn OffloadSink>>,
        events: Option<(Box<dyn TcpEventSource>, Option<std::time::Instant>)>,
        record: bool,
        tap: Option<JournalTap>,
        engine: &mut Engine,
    ) -> Feed {
        let (events, events_hold) = match events {
            Some((e, hold)) => (Some(e), hold),
            None => (None, None),
        };
        let mut f = Feed {
            offload,
            tap,
            tap_counts: Arc::new(TapCounts::default()),
            lost_base: engine.journal_lost(),
            events,
            events_hold,
            ev_buf: Vec::new(),
            stash: None,
            record,
            recorded: Vec::new(),
            record_lost: 0,
            lost_seen: engine.journal_lost(),
            scratch: Vec::new(),
            installs: Vec::new(),
            removes: Vec::new(),
        };
        if f.offload.is_some() || record || f.tap.is_some() {
            engine.set_journal(true);
        }
        if let Some(o) = f.offload.as_mut() {
            install_live(o.as_mut(), &mut f.installs, engine);
        }
        f
    }

    /// Drains `engine`'s journal and applies it (call under the gateway lock, after every
    /// engine call that may open or close flows, before the lock is released). Nothing to do
    /// costs two loads.
    pub(crate) fn flush(&mut self, engine: &mut Engine) {
        let lost = engine.journal_lost();
        if engine.journal_pending() == 0 && lost == self.lost_seen {
            return;
        }
        engine.drain_journal(&mut self.scratch);
        if let Some(o) = self.offload.as_mut() {
            if lost != self.lost_seen {
                // Changes were lost: the map cannot be patched, rebuild it from the engine's
                // flows (the queued changes are older than them and are not applied).
                tracing::warn!(
                    lost = lost - self.lost_seen,
                    "flow journal overflowed: fast path map resynchronised from the flow table"
                );
                o.clear();
                install_live(o.as_mut(), &mut self.installs, engine);
            } else {
                apply_in_runs(
                    o.as_mut(),
                    &self.scratch,
                    &mut self.installs,
                    &mut self.removes,
                );
            }
        }
        self.lost_seen = lost;
        if let Some(tap) = self.tap.as_mut() {
            self.tap_counts
                .journal_lost
                .store(lost.saturating_sub(self.lost_base), Ordering::Relaxed);
            if !self.scratch.is_empty() {
                tap(&self.scratch);
                self.tap_counts
                    .tapped
                    .fetch_add(self.scratch.len() as u64, Ordering::Relaxed);
            }
        }
        if self.record {
            let room = JOURNAL_CAP.saturating_sub(self.recorded.len());
            let n = self.scratch.len();
            self.record_lost += n.saturating_sub(room) as u64;
            self.recorded.extend(self.scratch.drain(..n.min(room)));
        }
        self.scratch.clear();
    }

    /// Applies the fast path's FIN/RST events to `engine` at their kernel times (call under
    /// the gateway lock, before the engine decides anything else: before a batch, before a
    /// timer step; then [`Feed::flush`] carries any flow this ended to the kernel). Returns
    /// how many. Nothing waiting costs a read of the ring's producer position.
    pub(crate) fn apply_events(&mut self, engine: &mut Engine) -> usize {
        let Some(src) = self.events.as_mut() else {
            return 0;
        };
        if let Some(t) = self.events_hold {
            if std::time::Instant::now() < t {
                return 0;
            }
            self.events_hold = None;
        }
        self.ev_buf.clear();
        src.drain(&mut self.ev_buf);
        for e in &self.ev_buf {
            match e.kind {
                KernelEventKind::Tcp => {
                    engine.tcp_event_at(e.at, &e.key, e.flags, e.dir);
                }
                // A flow the kernel opened from a stash (crate::stash): the engine makes it
                // at the kernel's second, or removes its entries if it cannot own it.
                KernelEventKind::Opened => {
                    engine.stash_opened(e.at, &e.key);
                }
                // A port the kernel took from a stash and did not use: back to the engine.
                KernelEventKind::Returned => engine.stash_return(
                    StashKey {
                        src: e.key.src,
                        dst: e.key.dst,
                        dport: e.key.dport,
                    },
                    &[e.key.pport],
                ),
            }
        }
        self.ev_buf.len()
    }

    /// Gives the feed the kernel's port stashes (issue #17); their keeper runs in
    /// [`Feed::stash_step`].
    pub(crate) fn set_stash(&mut self, sink: Box<dyn StashSink>, engine: &mut Engine) {
        self.stash = Some(StashKeeper::new(sink, engine));
    }

    /// Whether the kernel's port stashes are kept.
    pub(crate) fn has_stash(&self) -> bool {
        self.stash.is_some()
    }

    /// One round of the stash keeper (under the gateway lock): the kernel's records first,
    /// then the rings, then the journal (`crate::stash`).
    pub(crate) fn stash_step(&mut self, engine: &mut Engine, now: std::time::Instant) {
        if self.stash.is_none() {
            return;
        }
        self.apply_events(engine);
        if let Some(k) = self.stash.as_mut() {
            k.step(engine, now);
        }
        self.flush(engine);
    }

    /// Unbinds the rings the engine voided (after a configuration change, under the same
    /// lock hold: `crate::stash::StashKeeper::retire_voided`).
    pub(crate) fn stash_retire_voided(&mut self, engine: &mut Engine) {
        if let Some(k) = self.stash.as_mut() {
            k.retire_voided(engine, std::time::Instant::now());
        }
    }

    /// Retires every ring and binds no more (at a stop): their untaken ports are the
    /// engine's again; then applies the kernel's last records and the journal.
    pub(crate) fn stash_stop(&mut self, engine: &mut Engine) {
        self.apply_events(engine);
        if let Some(k) = self.stash.as_mut() {
            k.retire_all(engine, std::time::Instant::now());
        }
        self.stash_step(engine, std::time::Instant::now());
    }

    /// The stash keeper's counters, if stashes are kept.
    pub(crate) fn stash_counters(&self) -> Option<StashCounters> {
        self.stash.as_ref().map(StashKeeper::counters)
    }

    /// The tap's counters (shared with the runtime).
    pub(crate) fn tap_counts(&self) -> Arc<TapCounts> {
        self.tap_counts.clone()
    }

    /// Takes the changes kept for the recorder (oldest first).
    pub(crate) fn take_recorded(&mut self) -> Vec<FlowChange> {
        std::mem::take(&mut self.recorded)
    }

    /// Changes the recorder did not get because they were not taken in time.
    pub(crate) fn record_lost(&self) -> u64 {
        self.record_lost
    }
}

/// The fleet's journal tap: called under the gateway lock with each run of drained flow
/// changes, in the engine's order, never with an empty slice (see
/// `crate::runtime::FleetHooks::with_journal_tap`).
pub type JournalTap = Box<dyn FnMut(&[FlowChange]) + Send>;

/// What the [`Feed`] counts for the journal tap (atomics: read without the gateway lock).
#[derive(Default)]
pub(crate) struct TapCounts {
    /// Changes handed to the tap since start.
    pub(crate) tapped: AtomicU64,
    /// `Engine::journal_lost` at the last flush: changes the tap never saw.
    pub(crate) journal_lost: AtomicU64,
}

/// Gives `o` every live flow of `engine`, in chunks.
fn install_live(o: &mut dyn OffloadSink, buf: &mut Vec<(u32, FlowKey)>, engine: &Engine) {
    buf.clear();
    for f in engine.live_flow_keys() {
        buf.push(f);
        if buf.len() == INSTALL_CHUNK {
            o.install(buf);
            buf.clear();
        }
    }
    if !buf.is_empty() {
        o.install(buf);
        buf.clear();
    }
}

/// Applies `changes` to `o` in order, one call per run of opens or closes (refusals touch no
/// translation and are skipped, so they do not split a run).
fn apply_in_runs(
    o: &mut dyn OffloadSink,
    changes: &[FlowChange],
    installs: &mut Vec<(u32, FlowKey)>,
    removes: &mut Vec<FlowKey>,
) {
    installs.clear();
    removes.clear();
    for c in changes {
        match c {
            // The kernel made this flow's entries itself (a stash, crate::stash).
            FlowChange::Opened {
                by_fast_path: true, ..
            } => {}
            FlowChange::Opened { slot, key, .. } => {
                if !removes.is_empty() {
                    o.remove(removes);
                    removes.clear();
                }
                installs.push((*slot, *key));
            }
            FlowChange::Closed { key, .. } => {
                if !installs.is_empty() {
                    o.install(installs);
                    installs.clear();
                }
                removes.push(*key);
            }
            FlowChange::Refused { .. } => {}
        }
    }
    if !removes.is_empty() {
        o.remove(removes);
        removes.clear();
    }
    if !installs.is_empty() {
        o.install(installs);
        installs.clear();
    }
}

/// What a record of the fast path's EVENTS ring reports (issue #17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEventKind {
    /// A FIN or RST it translated.
    Tcp,
    /// A flow it opened from a port stash (`crate::stash`): `key` is the flow.
    Opened,
    /// A port it took from a stash and did not use: `key.src`, `key.dst`, `key.dport` are the
    /// stash's, `key.pport` the port.
    Returned,
}

/// A FIN or RST a fast path translated, or a flow it opened (issue #17), in the engine's
/// terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelTcpEvent {
    /// What the record reports.
    pub kind: KernelEventKind,
    /// When the fast path saw the packet (engine seconds, the clock origin of [`TcActivity`]).
    pub at: Time,
    /// The flow: outbound 5-tuple and public side.
    pub key: FlowKey,
    /// The TCP flags byte.
    pub flags: u8,
    /// Which way the packet travelled.
    pub dir: Direction,
}

/// Where the fast path's FIN/RST events come from (the kernel's EVENTS ring; a fake in
/// tests). Drained by the runtime's `Feed` under the gateway lock.
pub trait TcpEventSource: Send {
    /// Appends every event waiting, oldest first, to `out`.
    fn drain(&mut self, out: &mut Vec<KernelTcpEvent>);
}

/// The kernel's EVENTS ring as a [`TcpEventSource`].
pub struct TcEvents {
    ring: FastPathEvents,
    /// `CLOCK_MONOTONIC` nanoseconds at engine time 0.
    start_ns: u64,
    raw: Vec<BpfTcpEvent>,
}

impl TcEvents {
    /// The engine's view of one record of the ring.
    fn convert(e: &BpfTcpEvent, start_ns: u64) -> KernelTcpEvent {
        // Same conversion as TcActivity's last-seen times (the entry's last_seen is this
        // record's ts): whole seconds since the origin.
        let at = u32::try_from(e.ts.saturating_sub(start_ns) / 1_000_000_000).unwrap_or(u32::MAX);
        KernelTcpEvent {
            kind: match e.kind {
                EV_OPENED => KernelEventKind::Opened,
                EV_RETURNED => KernelEventKind::Returned,
                _ => KernelEventKind::Tcp,
            },
            at,
            key: FlowKey {
                proto: proto::TCP,
                src: u32::from_be(e.src),
                sport: u16::from_be(e.sport),
                dst: u32::from_be(e.dst),
                dport: u16::from_be(e.dport),
                public: u32::from_be(e.public),
                pport: u16::from_be(e.pport),
            },
            flags: e.flags,
            dir: if e.dir == DIR_IN {
                Direction::Inbound
            } else {
                Direction::Outbound
            },
        }
    }
}

impl TcpEventSource for TcEvents {
    fn drain(&mut self, out: &mut Vec<KernelTcpEvent>) {
        self.raw.clear();
        self.ring.drain(&mut self.raw);
        let start = self.start_ns;
        out.extend(self.raw.iter().map(|e| Self::convert(e, start)));
    }
}

/// The kernel's port stashes ([`StashSink`], issue #17).
pub struct TcStash {
    stash: FastPathStash,
    private_ifindex: u32,
    public_ifindex: u32,
    counter_slots: u32,
}

fn stash_key(k: StashKey) -> BpfStashKey {
    BpfStashKey {
        src: k.src.to_be(),
        dst: k.dst.to_be(),
        dport: k.dport.to_be(),
        pad: 0,
    }
}

impl StashSink for TcStash {
    fn slots(&self) -> u32 {
        self.stash.slots()
    }

    fn bind(&mut self, slot: u32, key: StashKey, public: u32, inst: u32) -> bool {
        if inst >= self.counter_slots {
            return false;
        }
        let params = StashParams {
            public: public.to_be(),
            out_ifindex: self.public_ifindex,
            in_ifindex: self.private_ifindex,
            counter_out: counter_index(inst, false, DIR_OUT),
            counter_in: counter_index(inst, false, DIR_IN),
        };
        match self.stash.bind(slot, stash_key(key), params) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "fast path: binding a port stash failed");
                false
            }
        }
    }

    fn push(&mut self, slot: u32, pports: &[u16]) -> usize {
        let net: Vec<u16> = pports.iter().map(|p| p.to_be()).collect();
        self.stash.push(slot, &net)
    }

    fn queued(&self, slot: u32) -> u32 {
        self.stash.queued(slot)
    }

    fn taken(&self, slot: u32) -> u32 {
        self.stash.taken(slot)
    }

    fn unbind(&mut self, key: StashKey) {
        if let Err(e) = self.stash.unbind(stash_key(key)) {
            tracing::warn!(error = %e, "fast path: unbinding a port stash failed");
        }
    }

    fn reset(&mut self, slot: u32) -> Vec<u16> {
        self.stash
            .reset(slot)
            .into_iter()
            .map(u16::from_be)
            .collect()
    }

    fn clear(&mut self) {
        let n = self.stash.clear();
        if n > 0 {
            tracing::info!(
                stashes = n,
                "fast path: port stashes of an earlier run cleared"
            );
        }
    }
}

/// The kernel's flow map as the runtime writes it ([`OffloadSink`]).
pub struct TcOffload {
    map: FlowMap,
    private_ifindex: u32,
    public_ifindex: u32,
    counter_slots: u32,
    counters: Arc<OffloadCounters>,
    keys: Vec<BpfFlowKey>,
    vals: Vec<BpfFlowVal>,
    failed: Vec<usize>,
}

/// The kernel's flow map as the engine asks it for flows' last packets ([`ActivitySource`]).
pub struct TcActivity {
    map: FlowMapReader,
    /// `CLOCK_MONOTONIC` nanoseconds at engine time 0.
    start_ns: u64,
}

/// The two keys of a flow, as the program reads them off the wire: outbound (private
/// 5-tuple), inbound (the remote's packet to the public address and SNAT port).
fn keys(k: &FlowKey) -> [BpfFlowKey; 2] {
    [
        BpfFlowKey {
            src: k.src.to_be(),
            dst: k.dst.to_be(),
            sport: k.sport.to_be(),
            dport: k.dport.to_be(),
            proto: k.proto,
            dir: DIR_OUT,
            pad: 0,
        },
        BpfFlowKey {
            src: k.dst.to_be(),
            dst: k.public.to_be(),
            sport: k.dport.to_be(),
            dport: k.pport.to_be(),
            proto: k.proto,
            dir: DIR_IN,
            pad: 0,
        },
    ]
}

/// A flow the kernel's map holds, with its last packet there (engine seconds), if any.
pub type SeenFlow = (FlowKey, Option<Time>);

/// What the kernel's pinned flow map under `pin_dir` kept translating while no gateway ran:
/// each flow's translation and its last packet in engine seconds (either direction; `None` if
/// the kernel saw no packet of it; never later than `now`), for
/// [`snatgw_core::engine::persist::FlowState::merge_seen`] before a restore (R11.1).
/// `origin_ns` is the `CLOCK_MONOTONIC` time of engine time 0. `None`: nothing pinned there.
pub fn pinned_flows_seen(
    pin_dir: &std::path::Path,
    origin_ns: u64,
    now: Time,
) -> Result<Option<Vec<SeenFlow>>, snatgw_io::fastpath::FastPathError> {
    let Some(entries) = snatgw_io::pin::read_pinned_flows(pin_dir)? else {
        return Ok(None);
    };
    let secs = |ns: u64| -> Option<Time> {
        (ns != 0 && ns >= origin_ns)
            .then(|| u32::try_from((ns - origin_ns) / 1_000_000_000).unwrap_or(u32::MAX))
    };
    let inbound: std::collections::HashMap<BpfFlowKey, u64> = entries
        .iter()
        .filter(|(k, _)| k.dir == DIR_IN)
        .map(|(k, v)| (*k, v.last_seen))
        .collect();
    let mut out = Vec::new();
    for (k, v) in entries.iter().filter(|(k, _)| k.dir == DIR_OUT) {
        let key = FlowKey {
            proto: k.proto,
            src: u32::from_be(k.src),
            sport: u16::from_be(k.sport),
            dst: u32::from_be(k.dst),
            dport: u16::from_be(k.dport),
            public: u32::from_be(v.addr),
            pport: u16::from_be(v.port),
        };
        let inb = keys(&key)[1];
        let ns = v.last_seen.max(inbound.get(&inb).copied().unwrap_or(0));
        out.push((key, secs(ns).map(|t| t.min(now))));
    }
    Ok(Some(out))
}

/// The two entries of a flow: (outbound key, value), (inbound key, value).
fn entries(
    slot: u32,
    k: &FlowKey,
    public_if: u32,
    private_if: u32,
) -> [(BpfFlowKey, BpfFlowVal); 2] {
    let udp = k.proto == proto::UDP;
    let [out, inb] = keys(k);
    [
        (
            out,
            BpfFlowVal {
                addr: k.public.to_be(),
                port: k.pport.to_be(),
                ifindex: public_if,
                counter: counter_index(slot, udp, DIR_OUT),
                ..Default::default()
            },
        ),
        (
            inb,
            BpfFlowVal {
                addr: k.src.to_be(),
                port: k.sport.to_be(),
                ifindex: private_if,
                counter: counter_index(slot, udp, DIR_IN),
                ..Default::default()
            },
        ),
    ]
}

impl TcOffload {
    fn note_syscalls(&self) {
        self.counters
            .syscalls
            .store(self.map.batch_syscalls(), Ordering::Relaxed);
    }
}

impl OffloadSink for TcOffload {
    fn install(&mut self, flows: &[(u32, FlowKey)]) {
        self.keys.clear();
        self.vals.clear();
        for (slot, key) in flows {
            if *slot >= self.counter_slots {
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            for (k, v) in entries(*slot, key, self.public_ifindex, self.private_ifindex) {
                self.keys.push(k);
                self.vals.push(v);
            }
        }
        self.failed.clear();
        self.map
            .insert_batch(&self.keys, &self.vals, &mut self.failed);
        // A flow with a refused entry (the map full) stays on the TUN path: take out the
        // entry that went in. Keys of one run are distinct (no two live flows share one), so
        // this touches no other flow of the run.
        let mut failed_flows = 0u64;
        let mut last = usize::MAX;
        for &i in &self.failed {
            let flow = i / 2;
            if flow == last {
                continue;
            }
            last = flow;
            failed_flows += 1;
            let pair = [self.keys[2 * flow], self.keys[2 * flow + 1]];
            self.map.remove_batch(&pair);
        }
        let ok = (self.keys.len() / 2) as u64 - failed_flows;
        self.counters
            .install_failed
            .fetch_add(failed_flows, Ordering::Relaxed);
        self.counters.installed.fetch_add(ok, Ordering::Relaxed);
        self.note_syscalls();
    }

    fn remove(&mut self, flows: &[FlowKey]) {
        self.keys.clear();
        for key in flows {
            self.keys.extend(keys(key));
        }
        // Both entries of each, whatever happened at install: a missing entry is not an error.
        let errors = self.map.remove_batch(&self.keys);
        if errors > 0 {
            tracing::error!(errors, "fast path: removing flows' entries failed");
        }
        self.counters
            .removed
            .fetch_add(flows.len() as u64, Ordering::Relaxed);
        self.note_syscalls();
    }

    fn clear(&mut self) {
        let errors = self.map.clear();
        if errors > 0 {
            tracing::error!(errors, "fast path: emptying the flow map failed");
        }
        self.note_syscalls();
    }
}

impl ActivitySource for TcActivity {
    fn last_seen(&mut self, key: &FlowKey) -> Option<Time> {
        let ns = keys(key)
            .iter()
            .filter_map(|k| self.map.get(k))
            .map(|v| v.last_seen)
            .max()?;
        if ns == 0 || ns < self.start_ns {
            return None;
        }
        Some(u32::try_from((ns - self.start_ns) / 1_000_000_000).unwrap_or(u32::MAX))
    }
}

/// The running fast path: keeps the programs attached and reads their counters.
pub struct FastPath {
    _fp: TcFastPath,
    counters: FastPathCounters,
    offload: Arc<OffloadCounters>,
    /// The map writer, until the runtime takes it ([`FastPath::take_offload`]).
    sink: Option<TcOffload>,
    /// The EVENTS ring's reader, until the runtime takes it ([`FastPath::take_events`]).
    events: Option<TcEvents>,
    /// Events are not read before this ([`FastPathOptions::events_hold`]).
    events_hold: Option<std::time::Instant>,
    /// A second reader of the flow map, for a snapshotter's last-seen merge
    /// ([`FastPath::take_seen_source`]).
    seen: Option<TcActivity>,
    /// The fleet steering maps, until a fleet node takes them ([`FastPath::take_steer`]).
    steer: Option<FastPathSteer>,
    /// The port stashes, until the runtime takes them ([`FastPath::take_stash`]).
    stash: Option<TcStash>,
    /// Per-instance counter sums already credited to the engine.
    credited: Vec<u64>,
    floor: bool,
    private_if: String,
    public_if: String,
}

/// How `snatgw run` (or a test) wants the fast path ([`FastPath::setup`]).
#[derive(Debug, Clone)]
pub struct FastPathOptions {
    /// `--fast-path`.
    pub mode: FastPathMode,
    /// Interface the instances' packets arrive on (`--private-if`).
    pub private_if: Option<String>,
    /// Interface the internet's packets arrive on (`--public-if`).
    pub public_if: Option<String>,
    /// Flows the map holds (`--fast-path-flows`).
    pub max_flows: u32,
    /// Benchmark floor: redirect without NAT (`snatgw race` only).
    pub floor: bool,
    /// `CLOCK_MONOTONIC` nanoseconds at engine time 0.
    pub start_ns: u64,
    /// Where the maps and links are pinned, if anywhere (`--bpf-pin-dir`, SPEC R11.1).
    pub pin_dir: Option<std::path::PathBuf>,
    /// Size of the kernel's EVENTS ring in bytes (0: 1 MiB, 32 768 FIN/RST records; rounded
    /// up to a power of two of at least a page).
    pub event_ring_bytes: u32,
    /// Tests only: do not read the ring for this long after setup, so it fills and FIN/RST go
    /// up to the engine (`event_full`); what is in it then is applied late, at its own times.
    pub events_hold: Option<std::time::Duration>,
    /// A fleet node's link interface: the kernel translates the packets other nodes steer
    /// here for flows installed here (issue #19, `FastPathConfig::link_if`).
    pub link_if: Option<String>,
    /// Let the kernel open new TCP flows from port stashes the engine fills (issue #17,
    /// `crate::stash`; `--fast-path-stash`). Off on a fleet node (R10.4).
    pub stash: bool,
}

/// The interface `snat_link` goes on: the fleet link's, unless this is floor mode, or the link
/// shares an interface with the data path, where `snat_out`/`snat_in` come first and pass up
/// what they do not translate (the link's datagrams included), so the socket gets them all.
fn link_if(o: &FastPathOptions, floor: bool, private_if: &str, public_if: &str) -> Option<String> {
    let l = o.link_if.as_deref().filter(|_| !floor)?;
    if l == private_if || l == public_if {
        tracing::warn!(link_if = l, "fleet link on a data-path interface: packets steered here are translated in userspace only (give the link its own interface to have them translated in the kernel)");
        return None;
    }
    Some(l.to_string())
}

/// The fast path's part of the stats snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FastPathSnap {
    /// `tc`, or `floor` (redirect without NAT, benchmarks only).
    pub mode: String,
    /// Interface the program translating outbound packets is attached to.
    pub private_if: String,
    /// Interface the program translating inbound packets is attached to.
    pub public_if: String,
    /// Flows installed in the map.
    pub installed: u64,
    /// Flows removed from the map.
    pub removed: u64,
    /// Flows the map had no room for (they stay on the TUN path).
    pub install_failed: u64,
    /// Flows of instance slots without counters (they stay on the TUN path).
    pub skipped: u64,
    /// System calls made on the flow map to install and remove flows (one per run of opens or
    /// closes when the kernel takes batches).
    #[serde(default)]
    pub map_syscalls: u64,
    /// The program's counters: translated_out, translated_in, and why packets went up.
    pub packets: std::collections::BTreeMap<String, u64>,
}

impl FastPath {
    /// Sets the fast path up per `o.mode` and, when it runs, gives `engine` its offload's
    /// activity source (which turns the engine's journal on; the runtime applies the journal to
    /// the map, `FastPath::take_offload`). Returns `None` for the TUN path (mode `off`, or
    /// `auto` when it cannot run, logged); `Err` only in mode `tc`.
    ///
    /// With [`FastPathOptions::pin_dir`] (a bpffs directory, SPEC R11.1) the programs stay
    /// attached while no gateway runs, and a start that finds the pins takes the maps over.
    /// The map is then made the engine's: entries of flows the engine does not have (ended, or
    /// not restored) are removed, the engine's flows are (re)installed by the runtime, and the
    /// kernel's packet counters count from now.
    pub fn setup(o: &FastPathOptions, engine: &mut Engine) -> Result<Option<FastPath>, SetupError> {
        let (mode, max_flows, floor, start_ns) = (o.mode, o.max_flows, o.floor, o.start_ns);
        if mode == FastPathMode::Off {
            tracing::info!("fast path off (--fast-path off): every packet goes through the TUN");
            return Ok(None);
        }
        let (Some(private_if), Some(public_if)) = (o.private_if.as_deref(), o.public_if.as_deref())
        else {
            let why = "--private-if and --public-if name the interfaces the fast path attaches to";
            if mode == FastPathMode::Tc {
                return Err(SetupError::NoInterfaces);
            }
            tracing::warn!("fast path not used, every packet goes through the TUN: {why}");
            return Ok(None);
        };
        let cfg = FastPathConfig {
            private_if: private_if.into(),
            public_if: public_if.into(),
            max_flows,
            counter_slots: COUNTER_SLOTS,
            floor,
            pin_dir: o.pin_dir.clone(),
            event_ring_bytes: o.event_ring_bytes,
            link_if: link_if(o, floor, private_if, public_if),
        };
        let (mut fp, mut map, counters) = match TcFastPath::load(&cfg) {
            Ok(x) => x,
            Err(e) if mode == FastPathMode::Tc => return Err(SetupError::Load(e)),
            Err(e) => {
                tracing::warn!(error = %e, "fast path unavailable, falling back to the TUN path for every packet");
                return Ok(None);
            }
        };
        // Stashes an earlier run pinned (issue #17) are cleared first, so the kernel opens no
        // more flows from them while this start cleans the map up; records of flows it opened
        // meanwhile are adopted or refused by the engine (crate::stash).
        let mut stash_maps = if floor { None } else { fp.take_stash() };
        if let Some(s) = stash_maps.as_mut() {
            let n = s.clear();
            if n > 0 {
                tracing::info!(
                    stashes = n,
                    "fast path: port stashes of an earlier run cleared"
                );
            }
        }
        let mut credited = Vec::new();
        if fp.reused {
            // Taken over from an earlier run (R11.1): keep exactly the engine's flows.
            let live: std::collections::HashSet<BpfFlowKey> = engine
                .live_flow_keys()
                .flat_map(|(_, k)| keys(&k))
                .collect();
            let stale: Vec<BpfFlowKey> = map
                .keys()
                .into_iter()
                .filter(|k| floor || !live.contains(k))
                .collect();
            let failed = map.remove_batch(&stale);
            credited = counters.instance_counters(COUNTER_SLOTS);
            tracing::info!(
                entries_kept = live.len(),
                stale_removed = stale.len() - failed,
                "fast path taken over from the previous run's pins: installed flows kept translating in the kernel meanwhile (R11.1)"
            );
        }
        let offload = Arc::new(OffloadCounters::default());
        let mut seen = None;
        let sink = if floor {
            None
        } else {
            let reader = match map.reader() {
                Ok(r) => r,
                Err(e) if mode == FastPathMode::Tc => return Err(SetupError::Load(e)),
                Err(e) => {
                    tracing::warn!(error = %e, "fast path unavailable, falling back to the TUN path for every packet");
                    return Ok(None);
                }
            };
            engine.set_offload(Some(Box::new(TcActivity {
                map: reader,
                start_ns,
            })));
            seen = match map.reader() {
                Ok(map) => Some(TcActivity { map, start_ns }),
                Err(e) => {
                    tracing::warn!(error = %e, "fast path: no second reader of the flow map; flow-state exports carry the engine's last-seen times only");
                    None
                }
            };
            Some(TcOffload {
                map,
                private_ifindex: fp.private_ifindex,
                public_ifindex: fp.public_ifindex,
                counter_slots: COUNTER_SLOTS,
                counters: offload.clone(),
                keys: Vec::new(),
                vals: Vec::new(),
                failed: Vec::new(),
            })
        };
        let events = if floor {
            None
        } else {
            match fp.take_events() {
                Some(ring) => Some(TcEvents {
                    ring,
                    start_ns,
                    raw: Vec::new(),
                }),
                None => {
                    // Without the reader the ring fills and every FIN/RST goes up: correct,
                    // only slower.
                    tracing::warn!("fast path: no EVENTS ring reader; FIN and RST will reach the engine through the TUN");
                    None
                }
            }
        };
        // Steering stays off (epoch 0) unless a fleet node takes the maps and applies a table.
        let steer = if floor { None } else { fp.take_steer() };
        let stash = if floor || !o.stash || events.is_none() {
            None
        } else {
            match stash_maps {
                Some(stash) => Some(TcStash {
                    stash,
                    private_ifindex: fp.private_ifindex,
                    public_ifindex: fp.public_ifindex,
                    counter_slots: COUNTER_SLOTS,
                }),
                None => {
                    tracing::warn!(
                        "fast path: no port stash maps; new connections go through the TUN"
                    );
                    None
                }
            }
        };
        tracing::info!(
            private_if,
            public_if,
            max_flows,
            floor,
            "fast path attached at tc ingress: established flows are translated in the kernel"
        );
        Ok(Some(FastPath {
            _fp: fp,
            counters,
            offload,
            sink,
            events,
            events_hold: o.events_hold.map(|d| std::time::Instant::now() + d),
            seen,
            steer,
            stash,
            credited,
            floor,
            private_if: private_if.into(),
            public_if: public_if.into(),
        }))
    }

    /// The writer of the kernel's flow map, for the runtime's `Feed` (once; `None` in floor
    /// mode, where nothing is translated).
    pub(crate) fn take_offload(&mut self) -> Option<Box<dyn OffloadSink>> {
        self.sink
            .take()
            .map(|s| Box::new(s) as Box<dyn OffloadSink>)
    }

    /// The EVENTS ring's reader, for the runtime's `Feed` (once; `None` in floor mode), with the
    /// instant before which it must not be read ([`FastPathOptions::events_hold`]).
    pub(crate) fn take_events(
        &mut self,
    ) -> Option<(Box<dyn TcpEventSource>, Option<std::time::Instant>)> {
        let hold = self.events_hold;
        self.events
            .take()
            .map(|e| (Box::new(e) as Box<dyn TcpEventSource>, hold))
    }

    /// The kernel's port stashes, for the runtime's `Feed` (once; `None` in floor mode, with
    /// `stash` off, or without the EVENTS ring).
    pub(crate) fn take_stash(&mut self) -> Option<Box<dyn StashSink>> {
        self.stash.take().map(|s| Box::new(s) as Box<dyn StashSink>)
    }

    /// The fleet steering maps (issue #19, R10.3), for a fleet node to fill from its view;
    /// steering stays off until it does. Once; `None` in floor mode.
    pub fn take_steer(&mut self) -> Option<FastPathSteer> {
        self.steer.take()
    }

    /// A reader of the kernel's flow map answering each flow's last packet there (engine
    /// seconds), for [`crate::persist::SnapshotterBuilder::seen`]: flows the kernel carries
    /// have an older `last_seen` in the engine (it asks the map only when a flow looks
    /// idle-due), and an export for another node (R10.4) or a restart should carry the
    /// kernel's. Once; `None` in floor mode or if the map could not be opened twice.
    pub fn take_seen_source(&mut self) -> Option<Box<dyn ActivitySource>> {
        self.seen
            .take()
            .map(|s| Box::new(s) as Box<dyn ActivitySource>)
    }

    /// The packets the kernel translated since the last call, per instance slot and protocol,
    /// for the first `slots` slots: `(slot, protocol, out, in)`, to credit to the engine
    /// (`Engine::credit_packets`, R6.1). Reads the kernel's counters (four per slot), so the
    /// caller does it without holding the gateway lock.
    pub fn harvest(&mut self, slots: u32) -> Vec<(u32, u8, u64, u64)> {
        let now = self.counters.instance_counters(slots);
        if self.credited.len() < now.len() {
            self.credited.resize(now.len(), 0);
        }
        let mut out = Vec::new();
        for slot in 0..(now.len() / 4) as u32 {
            for (p, udp) in [(proto::TCP, false), (proto::UDP, true)] {
                let (o, i) = (
                    counter_index(slot, udp, DIR_OUT) as usize,
                    counter_index(slot, udp, DIR_IN) as usize,
                );
                let dout = now[o].saturating_sub(self.credited[o]);
                let din = now[i].saturating_sub(self.credited[i]);
                if dout + din > 0 {
                    out.push((slot, p, dout, din));
                }
                self.credited[o] = now[o];
                self.credited[i] = now[i];
            }
        }
        out
    }

    /// The stats snapshot's part.
    pub fn snap(&self) -> FastPathSnap {
        let o = &self.offload;
        FastPathSnap {
            mode: if self.floor { "floor" } else { "tc" }.into(),
            private_if: self.private_if.clone(),
            public_if: self.public_if.clone(),
            installed: o.installed.load(Ordering::Relaxed),
            removed: o.removed.load(Ordering::Relaxed),
            install_failed: o.install_failed.load(Ordering::Relaxed),
            skipped: o.skipped.load(Ordering::Relaxed),
            map_syscalls: o.syscalls.load(Ordering::Relaxed),
            packets: STAT_NAMES
                .iter()
                .zip(self.counters.stats())
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each call: (install?, source ports of its flows).
    #[derive(Default)]
    struct Calls(Vec<(bool, Vec<u16>)>);

    impl OffloadSink for Calls {
        fn install(&mut self, flows: &[(u32, FlowKey)]) {
            self.0
                .push((true, flows.iter().map(|(_, k)| k.sport).collect()));
        }
        fn remove(&mut self, flows: &[FlowKey]) {
            self.0
                .push((false, flows.iter().map(|k| k.sport).collect()));
        }
        fn clear(&mut self) {
            self.0.clear();
        }
    }

    #[test]
    fn runs_of_one_kind_are_batched_and_never_reordered() {
        let key = |sport: u16, pport: u16| FlowKey {
            proto: proto::UDP,
            src: 1,
            sport,
            dst: 2,
            dport: 53,
            public: 3,
            pport,
        };
        let opened = |k| FlowChange::Opened {
            at: 0,
            instance: "vm".into(),
            slot: 0,
            by_fast_path: false,
            key: k,
        };
        let closed = |k| FlowChange::Closed {
            at: 0,
            instance: "vm".into(),
            slot: 0,
            key: k,
            cause: snatgw_core::EndCause::Idle,
        };
        let refused = FlowChange::Refused {
            at: 0,
            instance: "vm".into(),
            slot: 0,
            key: key(9, 0),
            reason: snatgw_core::DropReason::PortsExhausted,
        };
        // Port 1024 goes from flow 1 to flow 3 between the close and the open.
        let changes = [
            opened(key(1, 1024)),
            opened(key(2, 1025)),
            refused.clone(),
            closed(key(1, 1024)),
            opened(key(3, 1024)),
            refused,
            opened(key(4, 1026)),
            closed(key(2, 1025)),
        ];
        let mut o = Calls::default();
        apply_in_runs(&mut o, &changes, &mut Vec::new(), &mut Vec::new());
        assert_eq!(
            o.0,
            vec![
                (true, vec![1, 2]),
                (false, vec![1]),
                (true, vec![3, 4]),
                (false, vec![2]),
            ]
        );
    }

    #[test]
    fn entries_are_the_wire_view_of_both_directions() {
        // 10.0.3.20:5000 -> 198.51.100.7:53 leaves as 192.0.2.100:1024 (UDP).
        let k = FlowKey {
            proto: proto::UDP,
            src: u32::from(std::net::Ipv4Addr::new(10, 0, 3, 20)),
            sport: 5000,
            dst: u32::from(std::net::Ipv4Addr::new(198, 51, 100, 7)),
            dport: 53,
            public: u32::from(std::net::Ipv4Addr::new(192, 0, 2, 100)),
            pport: 1024,
        };
        let [(ko, vo), (ki, vi)] = entries(3, &k, 7, 9);
        // Keys hold the bytes as they are on the wire.
        assert_eq!(ko.src.to_ne_bytes(), [10, 0, 3, 20]);
        assert_eq!(ko.dst.to_ne_bytes(), [198, 51, 100, 7]);
        assert_eq!(ko.sport.to_ne_bytes(), 5000u16.to_be_bytes());
        assert_eq!((ko.proto, ko.dir), (17, DIR_OUT));
        assert_eq!(vo.addr.to_ne_bytes(), [192, 0, 2, 100]);
        assert_eq!(vo.port.to_ne_bytes(), 1024u16.to_be_bytes());
        assert_eq!((vo.ifindex, vo.counter), (7, 3 * 4 + 2));
        // The reply: remote -> public:pport, rewritten to the private endpoint.
        assert_eq!(ki.src.to_ne_bytes(), [198, 51, 100, 7]);
        assert_eq!(ki.dst.to_ne_bytes(), [192, 0, 2, 100]);
        assert_eq!(ki.sport.to_ne_bytes(), 53u16.to_be_bytes());
        assert_eq!(ki.dport.to_ne_bytes(), 1024u16.to_be_bytes());
        assert_eq!(ki.dir, DIR_IN);
        assert_eq!(vi.addr.to_ne_bytes(), [10, 0, 3, 20]);
        assert_eq!(vi.port.to_ne_bytes(), 5000u16.to_be_bytes());
        assert_eq!((vi.ifindex, vi.counter), (9, 3 * 4 + 3));
    }
}
