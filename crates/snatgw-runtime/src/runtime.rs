//! The gateway's runtime: worker threads over any [`PacketIo`], the housekeeping tick, the
//! stats snapshot, and an orderly shutdown.
//!
//! **Direction is decided by the queue a packet arrives on (SPEC R9.1)**: every packet read
//! from a private-side queue is outbound, every packet read from a public-side queue is
//! inbound; its addresses never decide it. Each packet is decided and rewritten in place by
//! [`Gateway::process`], then written back into the queue it came from (translated and passed
//! packets; dropped ones are not written).
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
use snatgw_core::{Direction, Engine, EXPIRY_BUDGET};
use snatgw_dataplane::{Gateway, Outcome};
use snatgw_io::{IoStats, PacketIo};

use crate::fastpath::{FastPath, Feed, OffloadSink, TcpEventSource};
use crate::logcap::{Admit, LogCap};
use crate::record::Recorder;
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

    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
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

/// A running gateway: its workers, and what the housekeeping tick needs.
pub struct Runtime {
    sh: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    prober: Option<JoinHandle<()>>,
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
        Self::start_inner(parts, None, None, private, public, opts)
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
        Self::start_inner(parts, Some(offload), None, private, public, opts)
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
            Some(offload),
            Some((events, None)),
            private,
            public,
            opts,
        )
    }

    fn start_inner<P: PacketIo + 'static>(
        mut parts: Parts,
        offload: Option<Box<dyn OffloadSink>>,
        events: Option<(Box<dyn TcpEventSource>, Option<Instant>)>,
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
        let queues = private.len();
        parts.engine.set_expiry_budget(PACKET_EXPIRY_BUDGET);
        let offload = offload.or_else(|| parts.fast_path.as_mut().and_then(FastPath::take_offload));
        let events = events.or_else(|| parts.fast_path.as_mut().and_then(FastPath::take_events));
        let feed = Feed::new(offload, events, parts.recorder.is_some(), &mut parts.engine);
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
        });
        let mut rt = Runtime {
            sh: sh.clone(),
            workers: Vec::new(),
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
            ..Default::default()
        };
        {
            let g = sh.gw.lock().unwrap_or_else(|p| p.into_inner());
            stats::fill_from_engine(&mut s, g.engine(), g.stats());
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

fn worker<P: PacketIo>(idx: usize, side: Side, mut io: P, batch_size: usize, sh: &Shared) {
    let mut batch = io.new_batch(batch_size);
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
        let n = match io.recv_batch(&mut batch, RECV_TIMEOUT) {
            Ok(n) => n,
            Err(e) => {
                publish(&io, batches);
                return sh.fail(format!("{label} queue {q}: receive: {e}"));
            }
        };
        if n > 0 {
            batches += 1;
            let now = sh.now();
            {
                let mut g = sh.lock_gw();
                let t = Instant::now();
                // The kernel's FIN/RST events first: every event the kernel wrote before these
                // packets reached the queue is applied before they are decided.
                sh.apply_events(&mut g);
                for i in 0..n {
                    // The whole slot, so a refusal can be answered in place (R9.5): the
                    // answer goes back into the queue the packet came from, and the kernel
                    // routes it to the instance.
                    let len = batch.packet(i).len();
                    match g.process_in(now, batch.slot_mut(i), len, dir) {
                        Outcome::Forward(_) => {}
                        Outcome::Drop(_) => batch.drop_packet(i),
                        Outcome::Answer { len, .. } => batch.set_packet_len(i, len),
                    }
                }
                // The batch's flow changes reach the kernel before the lock is released, so
                // before any of its packets is sent (R2.2, crate::fastpath).
                sh.flush(&mut g);
                let held = t.elapsed().as_nanos() as u64;
                sh.lock.held_ns.fetch_add(held, Ordering::Relaxed);
                sh.lock.batch_max_ns.fetch_max(held, Ordering::Relaxed);
            }
            if let Err(e) = io.send_batch(&mut batch) {
                publish(&io, batches);
                return sh.fail(format!("{label} queue {q}: send: {e}"));
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
