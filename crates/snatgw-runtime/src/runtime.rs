//! The gateway's runtime: worker threads over any [`PacketIo`], the housekeeping tick, the
//! stats snapshot, and an orderly shutdown.
//!
//! **Direction is decided by the queue a packet arrives on (SPEC R9.1)**: every packet read
//! from a private-side queue is outbound, every packet read from a public-side queue is
//! inbound; its addresses never decide it. Each packet is decided and rewritten in place by
//! [`Gateway::process`], then written back into the queue it came from (translated and passed
//! packets; dropped ones are not written, steered ones go to another node: below).
//!
//! **Which worker handles a flow.** A NAT flow's outbound and return packets have different
//! 5-tuples, so they may land on different queues. Every worker therefore shares one
//! `Gateway` behind one `Mutex`, taken once per received batch: the whole batch is decided
//! under the lock, then sent after unlocking. The cost (contention) is measured and published
//! in the stats snapshot (`lock`).
//!
//! **Time** is whole seconds from a [`Clock`]: `CLOCK_MONOTONIC` since start in a running
//! gateway (the clock the fast path stamps packets with, so R3.4 holds to the second), or a
//! clock the caller sets (tests). [`Runtime::housekeep`], called about every [`TICK`], advances
//! the engine's timers in bounded steps with the lock released between them (R9.4), drains
//! events (logged under a rate cap, R9.3, and pushed to the API's [`EventLog`], R6.2), feeds
//! the flow recorder, credits the kernel fast path's packet counts (R6.1), and writes the
//! stats snapshot when due.
//!
//! **Flow changes reach the fast path and the recorder through one channel**, the engine's
//! journal: whoever of the runtime holds the gateway lock (a worker after its batch, the tick
//! after each timer step) drains it before releasing the lock and applies it to the kernel's
//! flow map in the engine's order, in batches (`crate::fastpath::Feed`; what that guarantees
//! for R2.2 is in the [`crate::fastpath`] module doc); the same entries are kept for the
//! recorder, which the tick feeds outside the lock. Lock order: the gateway, then the feed
//! (the feed's mutex is only ever taken under the gateway lock, so it is never contended).
//!
//! **A fleet node's hooks (SPEC R10.3, R10.4)**, all off unless given
//! ([`Runtime::start_with_hooks`], [`Runtime::injector`]); a single node (R10.6) pays nothing
//! for them but a branch per refused packet:
//! - *Steering* ([`Steer`], [`FleetHooks::with_steer`]): for a packet a worker read from its
//!   queue and the gateway refused ([`Outcome::Drop`], e.g. `not_owned` for an instance whose
//!   grant another node holds, `unsolicited_inbound` for a public port with no flow here), the
//!   worker asks [`Steer::target`] under the gateway lock; if it names a node, the packet
//!   (unchanged: a refused packet is not rewritten) is handed to [`Steer::send`] after the
//!   lock is released and the batch's flow changes applied, and is not written to the queue.
//!   Counted per direction (`steered_out`, `steered_in`). A refusal the gateway answers
//!   (R9.5) is not steered.
//! - *Injection* ([`Injector::inject`]): packets another node steered here are queued in a
//!   bounded inbox per side ([`INBOX_CAP`]) for the worker of queue 0 of the side their
//!   direction names; it decides them exactly like packets it read (same direction, one lock
//!   hold per batch, flow changes applied before the lock is released) and writes them to its
//!   own queue, where the kernel routes them on like any translated packet. An injected packet
//!   the gateway refuses is dropped, never steered again (no ping-pong between nodes whose
//!   views of ownership differ for a moment). The queues' wakers are sticky (made for the
//!   stop), so once an injector exists queue 0's workers wait at most [`INJECT_POLL`] in
//!   `recv_batch` before looking at their inbox.
//! - *Journal tap* ([`FleetHooks::with_journal_tap`]): the engine's journal is turned on and
//!   every change the runtime drains from it is handed to the tap, in order, under the gateway
//!   lock, after the fast path's map applied it; [`Runtime::journal_mark`] counts them, so a
//!   flow-state export ([`crate::persist::SnapshotterBuilder`]) can be joined with the stream.
//!
//! What the hooks do not do: decide who owns what, talk to other nodes, or encode anything
//! (the caller's `Steer` and tap do, outside this crate); steer in the kernel fast path (a
//! packet the kernel translates never reaches a worker; one it passes up is steered here);
//! replay flows the engine had before the tap was given (the export covers them), or deliver
//! changes lost to a journal overflow (counted as `journal_lost`).
//!
//! What it does not do: open devices, parse arguments, serve the API, handle signals or
//! decide the topology (the `snatgw` binary does); it runs whatever [`PacketIo`] queues and
//! engine it is given, so the same code runs on TUN queues in production and on
//! [`snatgw_io::MemIo`] in tests without root.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snatgw_control::backend::{FastPathCounters, RuntimeCounters};
use snatgw_control::EventLog;
use snatgw_core::{ActivitySource, Direction, DropReason, Engine, FlowChange, EXPIRY_BUDGET};
use snatgw_dataplane::{Gateway, Outcome};
use snatgw_io::{IoStats, PacketBatch, PacketIo};

use crate::fastpath::{FastPath, Feed, JournalTap, OffloadSink, TapCounts, TcpEventSource};
use crate::logcap::{Admit, LogCap};
use crate::record::Recorder;
use crate::stash::StashSink;
use crate::stats::{self, Snapshot};

/// How often the owner of a [`Runtime`] should call [`Runtime::housekeep`].
pub const TICK: Duration = Duration::from_millis(100);

/// Timer entries one packet may make the engine examine (R9.4): a batch of up to `batch`
/// packets is decided under one lock, so per packet the share stays small; the housekeeping
/// tick works any backlog off in steps of [`EXPIRY_BUDGET`] with the lock released between.
pub const PACKET_EXPIRY_BUDGET: u32 = 8;
/// Steps of the housekeeping tick (about 1 ms each): a backlog of a million expired flows is
/// gone within about one second.
const MAX_TIMER_STEPS_PER_TICK: usize = 100;
/// How long a worker blocks in `recv_batch` before it looks at the stop flag again.
const RECV_TIMEOUT: Duration = Duration::from_millis(100);
/// How long queue 0's workers block in `recv_batch` once an [`Injector`] exists, so injected
/// packets wait at most about this long for their worker (the queues' wakers are sticky, made
/// for the stop: they cannot signal an injection).
pub const INJECT_POLL: Duration = Duration::from_millis(1);
/// Injected packets an inbox holds (per side); [`Injector::inject`] refuses more.
pub const INBOX_CAP: usize = 8192;
/// Bytes of injected packets an inbox holds (per side); [`Injector::inject`] refuses more.
pub const INBOX_BYTES: usize = 32 << 20;

/// Where gateway time (whole seconds, the engine's `now`) comes from.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Clock {
    /// `CLOCK_MONOTONIC` seconds since `start_ns` (the fast path stamps packets with the same
    /// clock, so its last-seen times and `now` agree to the second).
    Monotonic {
        /// `CLOCK_MONOTONIC` nanoseconds at gateway time 0.
        start_ns: u64,
    },
    /// A clock the caller sets (tests, replays).
    Manual(Arc<AtomicU32>),
}

impl Clock {
    /// The current gateway time, in whole seconds.
    pub fn now(&self) -> u32 {
        match self {
            Clock::Monotonic { start_ns } => {
                let ns = snatgw_io::fastpath::monotonic_ns().saturating_sub(*start_ns);
                u32::try_from(ns / 1_000_000_000).unwrap_or(u32::MAX)
            }
            Clock::Manual(t) => t.load(Ordering::SeqCst),
        }
    }
}

/// Why the runtime could not start or did not end cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// A thread (worker, prober) could not be started.
    #[error("spawning {what}: {source}")]
    Spawn {
        /// Which thread.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The options are not usable.
    #[error("{field}: {message}")]
    Options {
        /// The option.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A queue failed while running (receive or send), which stopped the gateway.
    #[error("{0}")]
    Queue(String),
}

/// What the runtime does besides translating.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Packets per batch (1..=4096).
    pub batch: usize,
    /// Where the stats snapshot is written (atomically), if anywhere.
    pub stats_file: Option<PathBuf>,
    /// How often the snapshot is written.
    pub stats_interval: Duration,
    /// Event log lines per second (0: no cap), R9.3.
    pub log_rate: u32,
    /// Event log lines allowed above `log_rate` in a burst.
    pub log_burst: u32,
    /// Name of the private-side device, for the snapshot.
    pub private_name: String,
    /// Name of the public-side device, for the snapshot.
    pub public_name: String,
    /// Whether the devices use virtio-net offload, for the snapshot.
    pub offload: bool,
    /// Run the health prober (SPEC R5.2): real TCP/HTTP connections to LB members.
    pub probes: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            batch: snatgw_io::DEFAULT_BATCH,
            stats_file: None,
            stats_interval: Duration::from_secs(1),
            log_rate: 20,
            log_burst: 100,
            private_name: "private".into(),
            public_name: "public".into(),
            offload: false,
            probes: true,
        }
    }
}

/// Stand-ins for the kernel fast path's parts (tests); `None` takes the fast path's own.
#[derive(Default)]
struct Fakes {
    offload: Option<Box<dyn OffloadSink>>,
    events: Option<(Box<dyn TcpEventSource>, Option<Instant>)>,
    stash: Option<Box<dyn StashSink>>,
}

/// Lock statistics shared by the threads.
#[derive(Default)]
struct LockCounters {
    acquisitions: AtomicU64,
    contended: AtomicU64,
    wait_ns: AtomicU64,
    held_ns: AtomicU64,
    /// Bounded timer steps the housekeeping tick ran (R9.4).
    timer_steps: AtomicU64,
    /// Longest single timer step, nanoseconds.
    timer_max_ns: AtomicU64,
    /// Longest time a worker held the lock for one batch, nanoseconds.
    batch_max_ns: AtomicU64,
}

/// What one worker publishes for the stats snapshot.
#[derive(Default, Clone, Copy)]
struct WorkerStats {
    io: IoStats,
    batches: u64,
}

/// Which side a worker reads, and so which way its packets travel (R9.1).
#[derive(Clone, Copy)]
struct Side {
    dir: Direction,
    label: &'static str,
    queue: usize,
}

/// A function that wakes a queue blocked in `recv_batch`.
pub type Wake = Box<dyn Fn() + Send + Sync>;

struct Shared {
    gw: Arc<Mutex<Gateway>>,
    events: Arc<EventLog>,
    clock: Clock,
    stop: AtomicBool,
    start: Instant,
    lock: LockCounters,
    /// Private-side workers first, then public-side ones.
    workers: Vec<Mutex<WorkerStats>>,
    /// Queues per side.
    queues: usize,
    failure: Mutex<Option<String>>,
    wakers: Vec<Wake>,
    /// The fast path's counters as of the last harvest (about once a second), for `/metrics`:
    /// the API thread reads this, never the kernel's maps. `None` without a fast path.
    fast_path: Mutex<Option<FastPathCounters>>,
    /// The journal's consumer: taken only under the gateway lock ([`Shared::flush`]).
    feed: Mutex<Feed>,
    /// The journal tap's counters (the feed updates them under the gateway lock).
    tap_counts: Arc<TapCounts>,
    /// Whether a journal tap was given (for the snapshot's fleet part).
    tap_on: bool,
    /// Where refused packets go (R10.3), if anywhere.
    steer: Option<Arc<dyn Steer>>,
    /// What injectors share with the workers (only this: an [`Injector`] kept after the
    /// runtime ended holds no gateway, map or queue).
    inject: Arc<Inject>,
    steered_out: AtomicU64,
    steered_in: AtomicU64,
    /// Injected packets the gateway refused.
    injected_refused: AtomicU64,
}

/// The injection side of the runtime ([`Injector`]).
#[derive(Default)]
struct Inject {
    /// Injected packets waiting for queue 0's worker, with their bytes: private side
    /// (outbound) first, then public side (inbound).
    inbox: [Mutex<(VecDeque<Vec<u8>>, usize)>; 2],
    /// Set when the first [`Injector`] is made: queue 0's workers then poll their inbox
    /// every [`INJECT_POLL`].
    on: AtomicBool,
    /// Set when the runtime stops: nothing is queued any more.
    closed: AtomicBool,
    injected: AtomicU64,
    dropped: AtomicU64,
}

/// The side index of a direction: where its packets arrive (R9.1).
fn side_of(dir: Direction) -> usize {
    match dir {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    }
}

impl Shared {
    fn now(&self) -> u32 {
        self.clock.now()
    }

    /// Takes the gateway lock, counting contention.
    fn lock_gw(&self) -> MutexGuard<'_, Gateway> {
        self.lock.acquisitions.fetch_add(1, Ordering::Relaxed);
        match self.gw.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.lock.contended.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let g = self.gw.lock().unwrap_or_else(|p| p.into_inner());
                self.lock
                    .wait_ns
                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                g
            }
        }
    }

    /// Applies the fast path's FIN/RST events (issue #17) to the engine. Call with the gateway
    /// lock held, before the engine decides anything (a batch, a timer step), and flush after.
    fn apply_events(&self, g: &mut Gateway) {
        self.feed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .apply_events(g.engine_mut());
    }

    /// Applies the engine's queued flow changes (to the fast path's map, and keeps them for
    /// the recorder). Call with the gateway lock held, before releasing it.
    fn flush(&self, g: &mut Gateway) {
        self.feed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush(g.engine_mut());
    }

    /// The fleet counters now (atomics only: no gateway lock).
    fn fleet_snap(&self) -> stats::FleetSnap {
        stats::FleetSnap {
            steered_out: self.steered_out.load(Ordering::Relaxed),
            steered_in: self.steered_in.load(Ordering::Relaxed),
            injected: self.inject.injected.load(Ordering::Relaxed),
            injected_dropped: self.inject.dropped.load(Ordering::Relaxed),
            injected_refused: self.injected_refused.load(Ordering::Relaxed),
            journal_tapped: self.tap_counts.tapped.load(Ordering::Relaxed),
            journal_lost: self.tap_counts.journal_lost.load(Ordering::Relaxed),
        }
    }

    /// Whether any fleet hook is on (the snapshot then has a fleet part).
    fn fleet_on(&self) -> bool {
        self.tap_on || self.steer.is_some() || self.inject.on.load(Ordering::Relaxed)
    }

    /// Moves waiting injected packets of side `k` into `b` (as many as fit); returns how many.
    fn take_injected(&self, k: usize, b: &mut PacketBatch) -> usize {
        b.clear();
        let mut q = self.inject.inbox[k]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while !b.is_full() {
            let Some(p) = q.0.pop_front() else { break };
            q.1 -= p.len();
            if !b.push(&p) {
                // Larger than this queue's slots (checked against 64 KiB when injected).
                self.inject.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        b.len()
    }

    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.inject.closed.store(true, Ordering::SeqCst);
        for w in &self.wakers {
            w();
        }
    }

    fn fail(&self, msg: String) {
        tracing::error!(error = %msg, "worker failed; stopping");
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(msg);
        self.request_stop();
    }
}

/// Stops a [`Runtime`] from another thread (a signal handler's, the API's).
#[derive(Clone)]
pub struct StopHandle(Arc<Shared>);

impl StopHandle {
    /// Asks every worker to stop after its batch and wakes the queues.
    pub fn stop(&self) {
        self.0.request_stop();
    }

    /// Whether a stop was requested (or a queue failed).
    pub fn stopped(&self) -> bool {
        self.0.stop.load(Ordering::SeqCst)
    }
}

/// The parts a runtime starts with besides its queues.
pub struct Parts {
    /// The engine, with its topology and (if any) offload already set.
    pub engine: Engine,
    /// Where time comes from.
    pub clock: Clock,
    /// The event log the API reads (R6.2).
    pub events: Arc<EventLog>,
    /// The kernel fast path, if it runs (its offload already given to `engine`).
    pub fast_path: Option<FastPath>,
    /// The flow recorder (`--record`), if any; the engine's journal must be on.
    pub recorder: Option<Recorder>,
    /// Functions that wake a queue blocked in `recv_batch` (optional: workers look at the stop
    /// flag at least every 100 ms anyway).
    pub wakers: Vec<Wake>,
}

/// Where a fleet node sends the packets it refuses (SPEC R10.3: any node may receive any
/// packet; one for an instance or a public port block another node owns goes there
/// unchanged). Given at start ([`FleetHooks::with_steer`]); shared by every worker.
pub trait Steer: Send + Sync {
    /// The node a packet the gateway refused with `reason` should go to, `None` to drop it as
    /// before. Called by a worker *under the gateway lock*, for every refused packet it read
    /// from its queue (never for injected ones): cheap lookups only (an ownership table, the
    /// engine's topology), no I/O. `pkt` is the packet as it arrived (a refused packet is not
    /// rewritten); `dir` is the side it arrived on (R9.1).
    fn target(
        &self,
        engine: &Engine,
        dir: Direction,
        reason: DropReason,
        pkt: &[u8],
    ) -> Option<u32>;
    /// Sends `pkt` (unchanged) to node `target`. Called by the worker after it released the
    /// gateway lock and after the batch's flow changes were applied (so never under the
    /// lock), once per packet `target` named a node for, in the batch's order. The packet is
    /// not written to the worker's queue.
    fn send(&self, target: u32, dir: Direction, pkt: &[u8]);
}

/// What a fleet node adds to a runtime ([`Runtime::start_with_hooks`]): a journal tap (flow
/// changes for replication, R10.4) and steering (R10.3). Both optional; the default is none,
/// which is [`Runtime::start`].
#[derive(Default)]
pub struct FleetHooks {
    journal_tap: Option<JournalTap>,
    steer: Option<Arc<dyn Steer>>,
}

impl FleetHooks {
    /// No hooks.
    pub fn new() -> FleetHooks {
        FleetHooks::default()
    }

    /// Turns the engine's flow journal on and hands `tap` every change the runtime drains
    /// from it: in the engine's order, under the gateway lock, right after the fast path's
    /// map (if any) applied them and before the lock is released (so before any packet of a
    /// new flow is sent); never with an empty slice. `tap` must be quick (copy the changes
    /// into a queue; no I/O under the lock). Flows the engine already had at start are not
    /// replayed (a flow-state export covers them), and changes lost to a journal overflow
    /// are counted ([`crate::stats::FleetSnap::journal_lost`]), not delivered.
    pub fn with_journal_tap(mut self, tap: impl FnMut(&[FlowChange]) + Send + 'static) -> Self {
        self.journal_tap = Some(Box::new(tap));
        self
    }

    /// Steers refused packets ([`Steer`]).
    pub fn with_steer(mut self, steer: Arc<dyn Steer>) -> Self {
        self.steer = Some(steer);
        self
    }
}

impl std::fmt::Debug for FleetHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetHooks")
            .field("journal_tap", &self.journal_tap.is_some())
            .field("steer", &self.steer.is_some())
            .finish()
    }
}

/// Hands packets another node steered here to this node's workers ([`Runtime::injector`]).
/// It holds only the inboxes: keeping one after the runtime ended keeps nothing else alive.
#[derive(Clone)]
pub struct Injector(Arc<Inject>);

impl Injector {
    /// Queues a copy of `pkt` for the worker of queue 0 on the side `dir` names
    /// ([`Direction::Outbound`]: the private side's, [`Direction::Inbound`]: the public
    /// side's). That worker decides it like a packet it read (same direction, under the
    /// gateway lock, flow changes applied before the lock is released) and writes the result
    /// to its own queue, where the kernel routes it on as any translated packet. A packet the
    /// gateway refuses is dropped and never steered again (no ping-pong between nodes).
    /// `false` (counted as `injected_dropped`) when the side's inbox holds [`INBOX_CAP`]
    /// packets or [`INBOX_BYTES`] bytes, the packet is empty or over 65 535 bytes, or the
    /// runtime stopped.
    pub fn inject(&self, dir: Direction, pkt: &[u8]) -> bool {
        let inj = &self.0;
        let refuse = || {
            inj.dropped.fetch_add(1, Ordering::Relaxed);
            false
        };
        if pkt.is_empty() || pkt.len() > usize::from(u16::MAX) {
            return refuse();
        }
        {
            let mut q = inj.inbox[side_of(dir)]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // Read under the inbox lock: the stop empties the inboxes under it, after setting
            // the flag, so nothing queued after the stop stays behind.
            if inj.closed.load(Ordering::SeqCst)
                || q.0.len() >= INBOX_CAP
                || q.1 + pkt.len() > INBOX_BYTES
            {
                drop(q);
                return refuse();
            }
            q.0.push_back(pkt.to_vec());
            q.1 += pkt.len();
        }
        inj.injected.fetch_add(1, Ordering::Relaxed);
        true
    }
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector").finish_non_exhaustive()
    }
}

/// A running gateway: its workers, and what the housekeeping tick needs.
pub struct Runtime {
    sh: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    prober: Option<JoinHandle<()>>,
    /// The stash thread, when the kernel keeps port stashes (issue #17).
    stasher: Option<JoinHandle<()>>,
    fast_path: Option<FastPath>,
    recorder: Option<Recorder>,
    ring: VecDeque<snatgw_control::EventRecord>,
    cap: LogCap,
    last_stats: Option<Instant>,
    last_harvest: Instant,
    opts: RuntimeOptions,
}

impl Runtime {
    /// Starts one worker per queue: `private` queues carry outbound packets, `public` queues
    /// inbound ones (R9.1). Both sides must have the same number of queues (at least one).
    /// The fast path in `parts` (if any) is told of flows through the engine's journal.
    pub fn start<P: PacketIo + 'static>(
        parts: Parts,
        private: Vec<P>,
        public: Vec<P>,
        opts: RuntimeOptions,
    ) -> Result<Runtime, RuntimeError> {
        Self::start_inner(
            parts,
            Fakes {
                offload: None,
                events: None,
                stash: None,
            },
            FleetHooks::default(),
            private,
            public,
            opts,
        )
    }

    /// Like [`Runtime::start`], with a fleet node's hooks: a journal tap and steering
    /// ([`FleetHooks`]). Injection ([`Runtime::injector`]) needs no hook.
    pub fn start_with_hooks<P: PacketIo + 'static>(
        parts: Parts,
        hooks: FleetHooks,
        private: Vec<P>,
        public: Vec<P>,
        opts: RuntimeOptions,
    ) -> Result<Runtime, RuntimeError> {
        Self::start_inner(
            parts,
            Fakes {
                offload: None,
                events: None,
                stash: None,
            },
            hooks,
            private,
            public,
            opts,
        )
    }

    /// Like [`Runtime::start`], with `offload` carrying out the engine's flow changes instead of
    /// a kernel fast path's map (tests: a fake map; give the engine its activity source with
    /// `Engine::set_offload`). Its calls come in the engine's order, under the gateway lock.
    pub fn start_with_offload<P: PacketIo + 'static>(
        parts: Parts,
        offload: Box<dyn OffloadSink>,
        private: Vec<P>,
        public: Vec<P>,
        opts: RuntimeOptions,
    ) -> Result<Runtime, RuntimeError> {
        Self::start_inner(
            parts,
            Fakes {
                offload: Some(offload),
                events: None,
                stash: None,
            },
            FleetHooks::default(),
            private,
            public,
            opts,
        )
    }

    /// Like [`Runtime::start_with_offload`], with `events` standing in for the kernel's EVENTS
    /// ring (tests: FIN/RST a fake fast path translated).
    pub fn start_with_offload_and_events<P: PacketIo + 'static>(
        parts: Parts,
        offload: Box<dyn OffloadSink>,
        events: Box<dyn TcpEventSource>,
        private: Vec<P>,
        public: Vec<P>,
        opts: RuntimeOptions,
    ) -> Result<Runtime, RuntimeError> {
        Self::start_inner(
            parts,
            Fakes {
                offload: Some(offload),
                events: Some((events, None)),
                stash: None,
            },
            FleetHooks::default(),
            private,
            public,
            opts,
        )
    }

    /// Like [`Runtime::start_with_offload_and_events`], with `stash` standing in for the
    /// kernel's port stashes (tests: a fake fast path that opens flows itself, issue #17).
    pub fn start_with_stash<P: PacketIo + 'static>(
        parts: Parts,
        offload: Box<dyn OffloadSink>,
        events: Box<dyn TcpEventSource>,
        stash: Box<dyn StashSink>,
        private: Vec<P>,
        public: Vec<P>,
        opts: RuntimeOptions,
    ) -> Result<Runtime, RuntimeError> {
        Self::start_inner(
            parts,
            Fakes {
                offload: Some(offload),
                events: Some((events, None)),
                stash: Some(stash),
            },
            FleetHooks::default(),
            private,
            public,
            opts,
        )
    }

    fn start_inner<P: PacketIo + 'static>(
        mut parts: Parts,
        fakes: Fakes,
        hooks: FleetHooks,
        private: Vec<P>,
        public: Vec<P>,
        opts: RuntimeOptions,
    ) -> Result<Runtime, RuntimeError> {
        if opts.batch == 0 || opts.batch > 4096 {
            return Err(RuntimeError::Options {
                field: "batch",
                message: format!("{} packets: expected 1..=4096", opts.batch),
            });
        }
        if private.is_empty() || private.len() != public.len() {
            return Err(RuntimeError::Options {
                field: "queues",
                message: format!(
                    "{} private and {} public queues: expected the same number, at least one",
                    private.len(),
                    public.len()
                ),
            });
        }
        let Fakes {
            offload,
            events,
            stash,
        } = fakes;
        let queues = private.len();
        parts.engine.set_expiry_budget(PACKET_EXPIRY_BUDGET);
        let offload = offload.or_else(|| parts.fast_path.as_mut().and_then(FastPath::take_offload));
        let events = events.or_else(|| parts.fast_path.as_mut().and_then(FastPath::take_events));
        let stash = stash.or_else(|| parts.fast_path.as_mut().and_then(FastPath::take_stash));
        let tap_on = hooks.journal_tap.is_some();
        let mut feed = Feed::new(
            offload,
            events,
            parts.recorder.is_some(),
            hooks.journal_tap,
            &mut parts.engine,
        );
        // Port stashes need the kernel's records and the map writer; not with a journal tap
        // (a fleet node's ports are fenced to reserves, R10.4).
        if let Some(sink) = stash.filter(|_| !tap_on) {
            feed.set_stash(sink, &mut parts.engine);
        }
        let stash_on = feed.has_stash();
        let tap_counts = feed.tap_counts();
        let sh = Arc::new(Shared {
            gw: Arc::new(Mutex::new(Gateway::new(parts.engine))),
            events: parts.events,
            clock: parts.clock,
            stop: AtomicBool::new(false),
            start: Instant::now(),
            lock: LockCounters::default(),
            workers: (0..2 * queues)
                .map(|_| Mutex::new(WorkerStats::default()))
                .collect(),
            queues,
            failure: Mutex::new(None),
            wakers: parts.wakers,
            fast_path: Mutex::new(
                parts
                    .fast_path
                    .as_ref()
                    .map(|_| FastPathCounters::default()),
            ),
            feed: Mutex::new(feed),
            tap_counts,
            tap_on,
            steer: hooks.steer,
            inject: Arc::default(),
            steered_out: AtomicU64::new(0),
            steered_in: AtomicU64::new(0),
            injected_refused: AtomicU64::new(0),
        });
        let mut rt = Runtime {
            sh: sh.clone(),
            workers: Vec::new(),
            stasher: None,
            prober: None,
            fast_path: parts.fast_path,
            recorder: parts.recorder,
            ring: VecDeque::new(),
            cap: LogCap::new(opts.log_rate, opts.log_burst, 1000),
            last_stats: None,
            last_harvest: Instant::now(),
            opts,
        };
        let sides = [
            (Direction::Outbound, "private", private),
            (Direction::Inbound, "public", public),
        ];
        for (k, (dir, label, qs)) in sides.into_iter().enumerate() {
            for (queue, io) in qs.into_iter().enumerate() {
                let sh = sh.clone();
                let batch = rt.opts.batch;
                let idx = k * queues + queue;
                let side = Side { dir, label, queue };
                let spawned = std::thread::Builder::new()
                    .name(format!("{label}-{queue}"))
                    .spawn(move || worker(idx, side, io, batch, &sh));
                match spawned {
                    Ok(h) => rt.workers.push(h),
                    Err(source) => {
                        rt.stop_and_join();
                        return Err(RuntimeError::Spawn {
                            what: format!("{label} worker {queue}"),
                            source,
                        });
                    }
                }
            }
        }
        if stash_on {
            let sh2 = sh.clone();
            let spawned = std::thread::Builder::new()
                .name("stash".into())
                .spawn(move || stash_loop(&sh2));
            match spawned {
                Ok(h) => rt.stasher = Some(h),
                Err(source) => {
                    rt.stop_and_join();
                    return Err(RuntimeError::Spawn {
                        what: "the stash keeper".into(),
                        source,
                    });
                }
            }
        }
        if rt.opts.probes {
            let (a, b) = (sh.clone(), sh.clone());
            match crate::probe::spawn(
                sh.gw.clone(),
                move || a.now(),
                move || b.stop.load(Ordering::Relaxed),
            ) {
                Ok(h) => rt.prober = Some(h),
                Err(source) => {
                    rt.stop_and_join();
                    return Err(RuntimeError::Spawn {
                        what: "the health prober".into(),
                        source,
                    });
                }
            }
        }
        Ok(rt)
    }

    /// The gateway the workers share (for the API's backend, and for tests).
    pub fn gateway(&self) -> &Arc<Mutex<Gateway>> {
        &self.sh.gw
    }

    /// The current gateway time.
    pub fn now(&self) -> u32 {
        self.sh.now()
    }

    /// A handle that stops the runtime from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.sh.clone())
    }

    /// Whether a stop was requested (or a queue failed).
    pub fn stopped(&self) -> bool {
        self.sh.stop.load(Ordering::SeqCst)
    }

    /// The event log the housekeeping tick fills (the API reads it).
    pub fn events_log(&self) -> Arc<EventLog> {
        self.sh.events.clone()
    }

    /// A source of the runtime's counters for `/metrics`
    /// (`GatewayBackend::with_runtime_counters`): packets per side summed over the queues (as
    /// the workers last published them), the gateway lock's counters, and the fast path's
    /// counters as of the housekeeping tick's last harvest. It reads shared atomics and the
    /// workers' stats, never the gateway lock nor the kernel's maps.
    pub fn counters_source(&self) -> impl Fn() -> RuntimeCounters + Send + Sync + 'static {
        let sh = self.sh.clone();
        move || {
            let mut c = RuntimeCounters {
                lock_acquisitions: sh.lock.acquisitions.load(Ordering::Relaxed),
                lock_contended: sh.lock.contended.load(Ordering::Relaxed),
                lock_wait_ns: sh.lock.wait_ns.load(Ordering::Relaxed),
                lock_held_ns: sh.lock.held_ns.load(Ordering::Relaxed),
                fast_path: sh
                    .fast_path
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
                fleet_link: sh.fleet_on().then(|| sh.fleet_snap()),
                ..Default::default()
            };
            for (i, w) in sh.workers.iter().enumerate() {
                let io = w.lock().unwrap_or_else(|p| p.into_inner()).io;
                let (rx, tx) = if i < sh.queues {
                    (&mut c.private_rx_packets, &mut c.private_tx_packets)
                } else {
                    (&mut c.public_rx_packets, &mut c.public_tx_packets)
                };
                *rx += io.rx_packets;
                *tx += io.tx_packets;
            }
            c
        }
    }

    /// A handle other threads inject packets with (a fleet node's link, R10.3: packets
    /// another node steered here). Making the first one makes queue 0's workers poll their
    /// inbox every [`INJECT_POLL`] (about a thousand wake-ups a second per side while idle;
    /// none without an injector); until a worker's current wait ends (at most 100 ms after
    /// the first injector is made) injected packets wait. Make it right after start.
    pub fn injector(&self) -> Injector {
        self.sh.inject.on.store(true, Ordering::Relaxed);
        Injector(self.sh.inject.clone())
    }

    /// The fleet counters now ([`crate::stats::FleetSnap`]), without the gateway lock.
    pub fn fleet_counters(&self) -> stats::FleetSnap {
        self.sh.fleet_snap()
    }

    /// The journal mark: how many flow changes the journal tap ([`FleetHooks::with_journal_tap`])
    /// has been handed since start. The tap runs under the gateway lock, so a mark read under
    /// that lock (as [`crate::persist::SnapshotterBuilder::mark`] does before an export's
    /// first step) splits the changes exactly: those before it are in the export; those
    /// after it may or may not be (the export is a fuzzy cut), so a replica that applies the
    /// export, then replays every change after the mark, ends with the engine's flows.
    pub fn journal_mark(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let c = self.sh.tap_counts.clone();
        move || c.tapped.load(Ordering::Relaxed)
    }

    /// The kernel fast path's last-seen reader for a snapshotter
    /// ([`FastPath::take_seen_source`]; `None` without a fast path, or once taken).
    pub fn take_fast_path_seen(&mut self) -> Option<Box<dyn ActivitySource>> {
        self.fast_path.as_mut().and_then(FastPath::take_seen_source)
    }

    /// The kernel fast path's fleet steering maps (issue #19, R10.3), for a fleet node
    /// ([`FastPath::take_steer`]; `None` without a fast path, in floor mode, or once taken).
    pub fn take_fast_path_steer(&mut self) -> Option<snatgw_io::fastpath::FastPathSteer> {
        self.fast_path.as_mut().and_then(FastPath::take_steer)
    }

    /// Whether the fast path runs.
    pub fn has_fast_path(&self) -> bool {
        self.fast_path.is_some()
    }

    /// One housekeeping tick (call it about every [`TICK`]): timers, events, the recorder,
    /// the fast path's counters (once a second), and the stats snapshot when due.
    pub fn housekeep(&mut self) {
        // The kernel's per-instance counters are read once a second (four reads per instance
        // slot), not every tick.
        let harvest = self.last_harvest.elapsed() >= Duration::from_secs(1);
        if harvest {
            self.last_harvest = Instant::now();
        }
        self.tick(harvest);
        self.feed_journal();
        if self
            .last_stats
            .is_none_or(|t| t.elapsed() >= self.opts.stats_interval)
        {
            self.last_stats = Some(Instant::now());
            let s = self.snapshot();
            self.write_stats(&s);
        }
    }

    /// Housekeeps every [`TICK`] until a stop is requested, calling `each` after every tick
    /// (the binary renews its event-sequence floor there).
    pub fn run_until_stopped(&mut self, mut each: impl FnMut(&Runtime)) {
        while !self.stopped() {
            self.housekeep();
            each(self);
            std::thread::sleep(TICK);
        }
    }

    /// A hook for code that changes the engine outside the workers (the API applying a
    /// configuration, R2.9 reclaims): called under the gateway lock after the change, it
    /// applies the flow changes to the fast path before the lock is released, as the workers
    /// do after each batch, so no kernel entry outlives its flow (R2.2).
    pub fn after_change_hook(&self) -> impl Fn(&mut Gateway) + Send + Sync + 'static {
        let sh = self.sh.clone();
        move |g: &mut Gateway| {
            let mut feed = sh.feed.lock().unwrap_or_else(|p| p.into_inner());
            feed.apply_events(g.engine_mut());
            // Port stashes the change voided leave the kernel's reach now (crate::stash).
            feed.stash_retire_voided(g.engine_mut());
            feed.flush(g.engine_mut());
        }
    }

    /// The counters now (what the stats file holds).
    pub fn snapshot(&self) -> Snapshot {
        let sh = &self.sh;
        let mut s = Snapshot {
            uptime_ms: sh.start.elapsed().as_millis() as u64,
            tun_private: self.opts.private_name.clone(),
            tun_public: self.opts.public_name.clone(),
            queues: sh.queues,
            offload: self.opts.offload,
            events: self.ring.iter().cloned().collect(),
            fast_path: self.fast_path.as_ref().map(FastPath::snap),
            log_lines_suppressed: self.cap.suppressed_total,
            fleet: sh.fleet_on().then(|| sh.fleet_snap()),
            ..Default::default()
        };
        {
            let g = sh.gw.lock().unwrap_or_else(|p| p.into_inner());
            stats::fill_from_engine(&mut s, g.engine(), g.stats());
            s.stash = sh
                .feed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .stash_counters()
                .map(|c| {
                    let e = g.engine().stash_stats();
                    crate::stash::StashCounters {
                        ports_stashed: e.ports_stashed,
                        opened: e.opened,
                        adopted: e.adopted,
                        refused: e.refused,
                        ..c
                    }
                });
        }
        s.io = sh
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let w = *w.lock().unwrap_or_else(|p| p.into_inner());
                let side = if i < sh.queues { "private" } else { "public" };
                stats::io_snap(side, i % sh.queues, &w.io, w.batches)
            })
            .collect();
        s.lock = stats::LockSnap {
            acquisitions: sh.lock.acquisitions.load(Ordering::Relaxed),
            contended: sh.lock.contended.load(Ordering::Relaxed),
            wait_ns: sh.lock.wait_ns.load(Ordering::Relaxed),
            held_ns: sh.lock.held_ns.load(Ordering::Relaxed),
            timer_steps: sh.lock.timer_steps.load(Ordering::Relaxed),
            timer_max_ns: sh.lock.timer_max_ns.load(Ordering::Relaxed),
            batch_max_ns: sh.lock.batch_max_ns.load(Ordering::Relaxed),
        };
        s
    }

    /// Stops the workers (if not yet), waits for them, runs a last tick, finishes the
    /// recording and writes the final snapshot, which it returns. `Err` if a queue failed
    /// while running (the snapshot was written all the same).
    pub fn shutdown(mut self) -> Result<Snapshot, RuntimeError> {
        self.stop_and_join();
        self.tick(true);
        self.feed_journal();
        if let Some(r) = self.recorder.take() {
            let journal_lost = self.sh.lock_gw().engine().journal_lost()
                + self
                    .sh
                    .feed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record_lost();
            match r.finish() {
                Ok(s) => tracing::info!(
                    records = s.records,
                    unmatched = s.unmatched,
                    lost = s.lost + journal_lost,
                    "flow recording written"
                ),
                Err(e) => tracing::error!(error = %e, "flow recording failed"),
            }
        }
        let mut s = self.snapshot();
        s.final_snapshot = true;
        self.write_stats(&s);
        let failure = self
            .sh
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match failure {
            Some(f) => Err(RuntimeError::Queue(f)),
            None => Ok(s),
        }
    }

    fn stop_and_join(&mut self) {
        self.sh.request_stop();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
        if let Some(p) = self.prober.take() {
            let _ = p.join();
        }
        if let Some(p) = self.stasher.take() {
            let _ = p.join();
            // Give the rings' ports back to the engine before the last tick and snapshot, and
            // bind none after (crate::stash).
            let mut g = self.sh.lock_gw();
            self.sh
                .feed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .stash_stop(g.engine_mut());
        }
        // Injected packets no worker will take (the injectors refuse new ones since the stop).
        for b in &self.sh.inject.inbox {
            *b.lock().unwrap_or_else(|p| p.into_inner()) = Default::default();
        }
    }

    fn write_stats(&self, s: &Snapshot) {
        if let Some(p) = &self.opts.stats_file {
            if let Err(e) = stats::write_atomic(p, s) {
                tracing::warn!(path = %p.display(), error = %e, "cannot write stats file");
            }
        }
    }

    /// Advances the engine's timers and drains its events (logged under the rate cap, R9.3;
    /// kept in the ring); with `harvest`, credits the fast path's packet counts first.
    fn tick(&mut self, harvest: bool) {
        let sh = &self.sh;
        if let Some(fp) = self.fast_path.as_mut().filter(|_| harvest) {
            // Packets the kernel translated count for their instances (R6.1): the kernel's
            // counters are read without the lock, then credited under it.
            let slots = sh.lock_gw().engine().instance_slots();
            let credits = fp.harvest(slots);
            // The counters `/metrics` shows (Runtime::counters_source), refreshed here so
            // the API thread never reads the kernel's maps.
            let snap = fp.snap();
            let packet = |n: &str| snap.packets.get(n).copied().unwrap_or(0);
            *sh.fast_path.lock().unwrap_or_else(|p| p.into_inner()) = Some(FastPathCounters {
                installed: snap.installed,
                removed: snap.removed,
                install_failed: snap.install_failed,
                skipped: snap.skipped,
                translated_out: packet("translated_out"),
                translated_in: packet("translated_in"),
                steered_out: packet("steered_out"),
                steered_in: packet("steered_in"),
                steer_passed_up: packet("steer_up"),
                link_translated: packet("link_in"),
                link_passed_up: packet("link_up"),
                link_dropped: packet("link_drop"),
            });
            if !credits.is_empty() {
                let mut g = sh.lock_gw();
                for (slot, p, out, inb) in credits {
                    g.engine_mut().credit_packets(slot, p, out, inb);
                }
            }
        }
        let now = sh.now();
        // Timer work in bounded steps (R9.4): the lock is released between steps, so after a
        // mass expiry the workers keep translating while the backlog is worked off.
        let mut events = Vec::new();
        for _ in 0..MAX_TIMER_STEPS_PER_TICK {
            let mut g = sh.lock_gw();
            // FIN/RST the kernel translated since the last holder, before any timer work: at
            // least every tick, whether or not packets reach the workers (fastpath module doc).
            sh.apply_events(&mut g);
            if g.engine().next_deadline().is_none_or(|d| d > now) {
                // Nothing due (the common case): no timer work under the lock. Changes other
                // lock holders made (the API's configuration changes) go to the kernel here at
                // the latest.
                sh.flush(&mut g);
                events.extend(g.engine_mut().drain_events());
                break;
            }
            let t = Instant::now();
            let done = g.engine_mut().advance_bounded(now, EXPIRY_BUDGET);
            // The flows this step ended leave the kernel before the lock is released (R2.2).
            sh.flush(&mut g);
            events.extend(g.engine_mut().drain_events());
            drop(g);
            sh.lock.timer_steps.fetch_add(1, Ordering::Relaxed);
            let held = t.elapsed().as_nanos() as u64;
            sh.lock.timer_max_ns.fetch_max(held, Ordering::Relaxed);
            if done {
                break;
            }
            std::thread::yield_now();
        }
        // One record per event, numbered by the API's log: the stats file keeps the same.
        let snaps = sh.events.push_records(&events);
        let ms = sh.start.elapsed().as_millis() as u64;
        for e in &snaps {
            if self.cap.admit(ms) == Admit::Write {
                stats::log_event(e);
            }
        }
        if let Some(n) = self.cap.report_due(ms) {
            tracing::warn!(
                suppressed = n,
                suppressed_total = self.cap.suppressed_total,
                "event log lines suppressed by the log rate cap (R9.3); counters and the stats file stay exact"
            );
        }
        stats::push_events(&mut self.ring, snaps);
    }

    /// Hands the flow changes kept since the last call to the recorder, outside the lock (the
    /// workers and timer steps drain the engine's journal; this drains what is left first).
    fn feed_journal(&mut self) {
        let Some(r) = self.recorder.as_mut() else {
            return;
        };
        let (changes, params) = {
            let mut g = self.sh.lock_gw();
            let mut feed = self.sh.feed.lock().unwrap_or_else(|p| p.into_inner());
            feed.flush(g.engine_mut());
            (feed.take_recorded(), g.engine().topology().params)
        };
        if !changes.is_empty() {
            r.offer(&changes, params);
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The stash thread (issue #17, `crate::stash`): every [`crate::stash::STASH_PERIOD`], under
/// the gateway lock, applies the kernel's records, keeps the port stashes and carries the
/// journal to the kernel; so a flow the kernel opened is the engine's within milliseconds even
/// when no packet reaches a worker.
fn stash_loop(sh: &Shared) {
    while !sh.stop.load(Ordering::Relaxed) {
        std::thread::sleep(crate::stash::STASH_PERIOD);
        let mut g = sh.lock_gw();
        let t = Instant::now();
        sh.feed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stash_step(g.engine_mut(), t);
        let held = t.elapsed().as_nanos() as u64;
        sh.lock.held_ns.fetch_add(held, Ordering::Relaxed);
    }
}

fn worker<P: PacketIo>(idx: usize, side: Side, mut io: P, batch_size: usize, sh: &Shared) {
    let mut batch = io.new_batch(batch_size);
    // Injected packets get their own batch, made on the first injection (queue 0 only).
    let mut injected: Option<PacketBatch> = None;
    let mut steered = Vec::new();
    let mut batches = 0u64;
    let mut since_publish = 0u32;
    let (dir, label, q) = (side.dir, side.label, side.queue);
    tracing::debug!(side = label, queue = q, "worker started");
    let publish = |io: &P, batches: u64| {
        *sh.workers[idx].lock().unwrap_or_else(|p| p.into_inner()) = WorkerStats {
            io: io.stats(),
            batches,
        };
    };
    while !sh.stop.load(Ordering::Relaxed) {
        let poll = q == 0 && sh.inject.on.load(Ordering::Relaxed);
        let timeout = if poll { INJECT_POLL } else { RECV_TIMEOUT };
        let n = match io.recv_batch(&mut batch, timeout) {
            Ok(n) => n,
            Err(e) => {
                publish(&io, batches);
                return sh.fail(format!("{label} queue {q}: receive: {e}"));
            }
        };
        if n > 0 {
            batches += 1;
            if let Err(e) = decide_and_send(&mut io, &mut batch, dir, false, sh, &mut steered) {
                publish(&io, batches);
                return sh.fail(format!("{label} queue {q}: send: {e}"));
            }
        }
        if poll {
            let b = injected.get_or_insert_with(|| io.new_batch(batch_size));
            if sh.take_injected(side_of(dir), b) > 0 {
                if let Err(e) = decide_and_send(&mut io, b, dir, true, sh, &mut steered) {
                    publish(&io, batches);
                    return sh.fail(format!("{label} queue {q}: send: {e}"));
                }
            }
        }
        since_publish += 1;
        if n == 0 || since_publish >= 64 {
            since_publish = 0;
            publish(&io, batches);
        }
    }
    publish(&io, batches);
    tracing::debug!(side = label, queue = q, batches, "worker stopped");
}

/// Decides every packet of `batch` (travelling `dir`) under one hold of the gateway lock,
/// applies the flow changes before releasing it, hands the packets [`Steer::target`] named a
/// node for to [`Steer::send`] (not for `injected` packets: those were steered here already),
/// and sends the rest on `io`.
fn decide_and_send<P: PacketIo>(
    io: &mut P,
    batch: &mut PacketBatch,
    dir: Direction,
    injected: bool,
    sh: &Shared,
    steered: &mut Vec<(usize, u32)>,
) -> std::io::Result<usize> {
    let n = batch.len();
    let steer = if injected { None } else { sh.steer.as_deref() };
    steered.clear();
    let mut refused = 0u64;
    let now = sh.now();
    {
        let mut g = sh.lock_gw();
        let t = Instant::now();
        // The kernel's FIN/RST events first: every event the kernel wrote before these
        // packets reached the queue is applied before they are decided.
        sh.apply_events(&mut g);
        for i in 0..n {
            // The whole slot, so a refusal can be answered in place (R9.5): the answer goes
            // back into the queue the packet came from, and the kernel routes it to the
            // instance.
            let len = batch.packet(i).len();
            match g.process_in(now, batch.slot_mut(i), len, dir) {
                Outcome::Forward(_) => {}
                Outcome::Drop(reason) => {
                    // A refused packet is left as it arrived: another node may own it.
                    match steer.and_then(|s| s.target(g.engine(), dir, reason, batch.packet(i))) {
                        Some(target) => steered.push((i, target)),
                        None => {
                            refused += u64::from(injected);
                            batch.drop_packet(i);
                        }
                    }
                }
                Outcome::Answer { len, .. } => batch.set_packet_len(i, len),
            }
        }
        // The batch's flow changes reach the kernel (and the journal tap) before the lock is
        // released, so before any of its packets is sent or steered (R2.2, crate::fastpath).
        sh.flush(&mut g);
        let held = t.elapsed().as_nanos() as u64;
        sh.lock.held_ns.fetch_add(held, Ordering::Relaxed);
        sh.lock.batch_max_ns.fetch_max(held, Ordering::Relaxed);
    }
    if refused > 0 {
        sh.injected_refused.fetch_add(refused, Ordering::Relaxed);
    }
    if let Some(s) = steer.filter(|_| !steered.is_empty()) {
        for &(i, target) in steered.iter() {
            s.send(target, dir, batch.packet(i));
            batch.drop_packet(i);
        }
        let c = match dir {
            Direction::Outbound => &sh.steered_out,
            Direction::Inbound => &sh.steered_in,
        };
        c.fetch_add(steered.len() as u64, Ordering::Relaxed);
    }
    io.send_batch(batch)
}
