//! `snatgw run`: the userspace data plane on a Linux TUN device.
//!
//! What it does: loads the configuration into a [`Gateway`], opens two TUN devices with
//! `--queues` queues each (`snatgw-io`, behind the [`PacketIo`] trait) and runs one worker
//! thread per queue. **Direction is decided by interface (SPEC R9.1)**: every packet read from
//! the private TUN (`--tun-private`, where the operator routes the instances' traffic) is
//! outbound, every packet read from the public TUN (`--tun-public`, where the internet side's
//! traffic is routed) is inbound; the packet's addresses never decide it, so a host on the
//! internet cannot pass itself off as an instance. Each packet is decided and rewritten in
//! place by [`Gateway::process`], then written back into the TUN it came from for the kernel
//! to route (translated and passed packets; dropped ones are not written).
//!
//! **Which worker handles a flow (the rule, see docs/RUNNING.md).** The kernel picks a TUN
//! queue per packet from its own hash; a NAT flow's outbound and return packets have
//! different 5-tuples, so they may land on different queues. Every worker therefore shares
//! one `Gateway` behind one `Mutex`, taken once per received batch: the whole batch is
//! decided under the lock, then sent after unlocking. Any worker can handle any packet of
//! any flow, with one consistent flow table. The cost (contention) is measured and published
//! in the stats snapshot (`lock`).
//!
//! Time: `now` is whole seconds since the gateway started (monotonic). A housekeeping loop
//! on the main thread ticks every 100 ms: it advances the engine's timers (so ports are
//! released without traffic), drains events (logged as structured `tracing` lines,
//! exhaustion as a warning), and writes the stats snapshot every `--stats-interval-ms`.
//!
//! Shutdown: SIGINT or SIGTERM set a flag and wake every queue; workers finish their batch
//! and exit, the final snapshot is written, the process exits 0. A worker whose device fails
//! stops the gateway too, and the process exits non-zero.
//!
//! On start-up, once the TUN exists and the workers run, one JSON line is printed on stdout:
//! `{"event":"ready","tun_private":...,"tun_public":...,"queues":...,"pid":...}`. Logs go to stderr.
//!
//! Start-up state (issue #20): the API always needs a bearer token (`--token-file`, else
//! `<state-dir>/api-token`, generated on first start with mode 0600 and reused); the store's
//! topology wins over the configuration file unless `--config-wins` (a file that differs is
//! named change by change in a warning); event sequence numbers start above the wall clock
//! in microseconds and above a floor kept in the store, so they never repeat across restarts.
//!
//! What it does not do: configure addresses or routes (the operator, or `snatgw lab`, points
//! routes at the TUN), or reload configuration.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use snatgw_core::topology::Params;
use snatgw_core::{Direction, FlowChange, Verdict, EXPIRY_BUDGET};
use snatgw_dataplane::Gateway;
use snatgw_io::{IoStats, PacketIo, TunConfig, TunIo, Waker};

use snatgw_control::store::{
    event_seq_start, summarize_diff, topology_diff, DEFAULT_STATE_DIR, EVENT_SEQ_RESERVE,
    TOKEN_FILE,
};
use snatgw_control::{
    ControlPlane, EventLog, GatewayBackend, RedbStore, SeedSource, Store, Stored,
};

use crate::fastpath::{FastPath, FastPathMode};
use crate::logcap::{Admit, LogCap};
use crate::stats::{self, Snapshot};

/// Options of `snatgw run` (also its command line).
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Private-side TUN to create: every packet read from it is outbound (SPEC R9.1).
    #[arg(long, default_value = "snat-priv")]
    pub tun_private: String,
    /// Public-side TUN to create: every packet read from it is inbound (SPEC R9.1).
    #[arg(long, default_value = "snat-pub")]
    pub tun_public: String,
    /// Queues per TUN, one worker thread each.
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// Enable virtio-net offload (GSO/GRO) on the TUN.
    #[arg(long)]
    pub offload: bool,
    /// Packets per batch.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Write a JSON counters snapshot here (atomically) every --stats-interval-ms.
    #[arg(long)]
    pub stats_file: Option<PathBuf>,
    /// Period of the stats snapshot, milliseconds (at least 100).
    #[arg(long, default_value_t = 1000)]
    pub stats_interval_ms: u64,
    /// TUN transmit queue length.
    #[arg(long)]
    pub tx_queue_len: Option<u32>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// At most this many event log lines per second (0: no cap); the rest are counted (R9.3).
    #[arg(long, default_value_t = 20)]
    pub log_rate: u32,
    /// Burst of event log lines allowed above --log-rate.
    #[arg(long, default_value_t = 100)]
    pub log_burst: u32,
    /// Management API address (REST, /metrics, /openapi.json), or `off`.
    #[arg(long, default_value = "127.0.0.1:7070", value_parser = parse_api)]
    pub api: ApiAddr,
    /// File holding the API's bearer token. Without it the token is `<state-dir>/api-token`,
    /// generated on first start (mode 0600) and reused; the API always needs a token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Directory of the embedded store: the topology survives restarts there.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Let the configuration file win over the topology in the store: when they differ, the
    /// file is validated like any change and saved as the next generation. Without it the
    /// store's topology runs and a warning names what the file would change.
    #[arg(long)]
    pub config_wins: bool,
    /// Kernel fast path for established flows (tc/tcx eBPF): `auto` uses it when the kernel,
    /// the build and --private-if/--public-if allow, else the TUN path (logged); `tc` or fail.
    #[arg(long, value_enum, default_value = "auto")]
    pub fast_path: FastPathMode,
    /// Interface the instances' packets arrive on (the fast path's outbound attach point).
    #[arg(long)]
    pub private_if: Option<String>,
    /// Interface the internet's packets arrive on (the fast path's inbound attach point).
    #[arg(long)]
    pub public_if: Option<String>,
    /// Flows the fast path's map holds; further flows stay on the TUN path.
    #[arg(long, default_value_t = 262_144)]
    pub fast_path_flows: u32,
    /// Benchmark floor only: the fast path redirects every IPv4 packet between the two
    /// interfaces with no NAT at all (what `snatgw race` measures against).
    #[arg(long, hide = true)]
    pub fast_path_floor: bool,
    /// Record every flow (opened, closed, refused) to this file in the planner's trace
    /// format, for `snatgw plan --trace` (docs/PLANNER.md).
    #[arg(long)]
    pub record: Option<PathBuf>,
}

impl RunArgs {
    /// The snapshot period.
    fn stats_interval(&self) -> Duration {
        Duration::from_millis(self.stats_interval_ms.max(100))
    }
}

/// Where the management API listens; `None`: no API (`--api off`).
#[derive(Debug, Clone, Copy)]
pub struct ApiAddr(pub Option<std::net::SocketAddr>);

/// `--api`: an address, or `off`.
fn parse_api(s: &str) -> Result<ApiAddr, String> {
    if s == "off" {
        return Ok(ApiAddr(None));
    }
    s.parse()
        .map(|a| ApiAddr(Some(a)))
        .map_err(|_| format!("`{s}` is neither an address like 127.0.0.1:7070 nor `off`"))
}

/// Lock statistics shared by the threads.
#[derive(Default)]
struct LockCounters {
    acquisitions: AtomicU64,
    contended: AtomicU64,
    wait_ns: AtomicU64,
    held_ns: AtomicU64,
    /// Bounded timer steps the housekeeping thread ran (R9.4).
    timer_steps: AtomicU64,
    /// Longest single timer step, nanoseconds.
    timer_max_ns: AtomicU64,
    /// Longest time a worker held the lock for one batch, nanoseconds.
    batch_max_ns: AtomicU64,
}

/// Timer entries one packet may make the engine examine (R9.4): a batch of up to `--batch`
/// packets is decided under one lock, so per packet the share stays small; the housekeeping
/// thread works any backlog off in steps of [`EXPIRY_BUDGET`] with the lock released between.
const PACKET_EXPIRY_BUDGET: u32 = 8;
/// Steps of the housekeeping thread per 100 ms tick (about 1 ms each): a backlog of a
/// million expired flows is gone within about one second.
const MAX_TIMER_STEPS_PER_TICK: usize = 100;

/// What one worker publishes for the stats snapshot.
#[derive(Default, Clone, Copy)]
struct WorkerStats {
    io: IoStats,
    batches: u64,
}

/// Which TUN a worker reads, and so which way its packets travel (R9.1).
#[derive(Clone, Copy)]
struct Side {
    dir: Direction,
    label: &'static str,
    queue: usize,
}

struct Shared {
    gw: Arc<Mutex<Gateway>>,
    /// Engine events for the API (`/api/v1/events`, R6.2), filled by the housekeeping loop.
    events: Arc<EventLog>,
    stop: AtomicBool,
    start: Instant,
    /// `CLOCK_MONOTONIC` nanoseconds at gateway time 0: the clock the fast path stamps
    /// packets with, so its last-seen times and `now` agree to the second (R3.4).
    start_ns: u64,
    lock: LockCounters,
    /// Private-side workers first, then public-side ones.
    workers: Vec<Mutex<WorkerStats>>,
    /// Queues per TUN.
    queues: usize,
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn now(&self) -> u32 {
        let ns = snatgw_io::fastpath::monotonic_ns().saturating_sub(self.start_ns);
        u32::try_from(ns / 1_000_000_000).unwrap_or(u32::MAX)
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

    fn fail(&self, msg: String) {
        tracing::error!(error = %msg, "worker failed; stopping");
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(msg);
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Initialises `tracing` (stderr; `RUST_LOG` filters, default `info`).
pub fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_thread_names(true);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

fn worker(idx: usize, side: Side, mut io: TunIo, batch_size: usize, sh: Arc<Shared>) {
    let mut batch = io.new_batch(batch_size);
    let mut batches = 0u64;
    let mut since_publish = 0u32;
    let (dir, label, q) = (side.dir, side.label, side.queue);
    tracing::debug!(side = label, queue = q, "worker started");
    while !sh.stop.load(Ordering::Relaxed) {
        let n = match io.recv_batch(&mut batch, Duration::from_millis(100)) {
            Ok(n) => n,
            Err(e) => return sh.fail(format!("{label} queue {q}: receive: {e}")),
        };
        if n > 0 {
            batches += 1;
            let now = sh.now();
            {
                let mut g = sh.lock_gw();
                let t = Instant::now();
                for i in 0..n {
                    let pkt = batch.packet_mut(i);
                    if let Verdict::Drop(_) = g.process(now, pkt, dir) {
                        batch.drop_packet(i);
                    }
                }
                let held = t.elapsed().as_nanos() as u64;
                sh.lock.held_ns.fetch_add(held, Ordering::Relaxed);
                sh.lock.batch_max_ns.fetch_max(held, Ordering::Relaxed);
            }
            if let Err(e) = io.send_batch(&mut batch) {
                return sh.fail(format!("{label} queue {q}: send: {e}"));
            }
        }
        since_publish += 1;
        if n == 0 || since_publish >= 64 {
            since_publish = 0;
            *sh.workers[idx].lock().unwrap_or_else(|p| p.into_inner()) = WorkerStats {
                io: io.stats(),
                batches,
            };
        }
    }
    *sh.workers[idx].lock().unwrap_or_else(|p| p.into_inner()) = WorkerStats {
        io: io.stats(),
        batches,
    };
    tracing::debug!(side = label, queue = q, batches, "worker stopped");
}

fn snapshot(
    a: &RunArgs,
    sh: &Shared,
    events: &VecDeque<stats::EventSnap>,
    fp: Option<&FastPath>,
) -> Snapshot {
    let mut s = Snapshot {
        uptime_ms: sh.start.elapsed().as_millis() as u64,
        tun_private: a.tun_private.clone(),
        tun_public: a.tun_public.clone(),
        queues: a.queues,
        offload: a.offload,
        events: events.iter().cloned().collect(),
        fast_path: fp.map(FastPath::snap),
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

fn write_stats(a: &RunArgs, s: &Snapshot) {
    if let Some(p) = &a.stats_file {
        if let Err(e) = stats::write_atomic(p, s) {
            tracing::warn!(path = %p.display(), error = %e, "cannot write stats file");
        }
    }
}

/// Advances the engine's timers and drains its events (logged under the rate cap, R9.3;
/// kept in `ring`).
fn tick(
    sh: &Shared,
    ring: &mut VecDeque<stats::EventSnap>,
    cap: &mut LogCap,
    fp: Option<&mut FastPath>,
) {
    if let Some(fp) = fp {
        // Packets the kernel translated count for their instances (R6.1): the kernel's
        // counters are read without the lock, then credited under it.
        let slots = sh.lock_gw().engine().instance_slots();
        let credits = fp.harvest(slots);
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
        if g.engine().next_deadline().is_none_or(|d| d > now) {
            // Nothing due (the common case): no timer work under the lock.
            events.extend(g.engine_mut().drain_events());
            break;
        }
        let t = Instant::now();
        let done = g.engine_mut().advance_bounded(now, EXPIRY_BUDGET);
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
    sh.events.extend(&events);
    let snaps: Vec<_> = events.iter().map(stats::event_snap).collect();
    let ms = sh.start.elapsed().as_millis() as u64;
    for e in &snaps {
        if cap.admit(ms) == Admit::Write {
            stats::log_event(e);
        }
    }
    if let Some(n) = cap.report_due(ms) {
        tracing::warn!(
            suppressed = n,
            suppressed_total = cap.suppressed_total,
            "event log lines suppressed by the log rate cap (R9.3); counters and the stats file stay exact"
        );
    }
    stats::push_events(ring, snaps);
}

/// Starts the health prober (SPEC R5.2, `crate::probe`); it stops with the gateway.
fn start_prober(sh: &Arc<Shared>) -> Result<std::thread::JoinHandle<()>, String> {
    let (a, b) = (sh.clone(), sh.clone());
    crate::probe::spawn(
        sh.gw.clone(),
        move || a.now(),
        move || b.stop.load(Ordering::Relaxed),
    )
    .map_err(|e| format!("spawning the prober: {e}"))
}

/// Takes the engine's flow journal (the changes since the last call) and the timers they
/// were made with, under the engine lock. The journal is on only when a consumer needs it.
fn drain_flow_journal(sh: &Shared) -> (Vec<FlowChange>, Params) {
    let mut out = Vec::new();
    let mut g = sh.lock_gw();
    g.engine_mut().drain_journal(&mut out);
    (out, g.engine().topology().params)
}

/// Drains the flow journal once and hands the same changes to every consumer (the recorder,
/// `--record`), outside the engine lock.
fn feed_journal(sh: &Shared, recorder: Option<&mut crate::record::Recorder>) {
    let (changes, params) = drain_flow_journal(sh);
    if changes.is_empty() {
        return;
    }
    if let Some(r) = recorder {
        r.offer(&changes, params);
    }
}

/// Stops the recorder and logs what it wrote.
fn finish_recording(r: crate::record::Recorder, sh: &Shared) {
    let journal_lost = sh.lock_gw().engine().journal_lost();
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

fn wake_all(wakers: &[Waker]) {
    for w in wakers {
        let _ = w.wake();
    }
}

/// `snatgw run`.
pub fn run(a: &RunArgs) -> Result<(), String> {
    init_tracing(a.log_json);
    if a.queues == 0 || a.queues > 64 {
        return Err("--queues must be 1..=64".into());
    }
    if a.batch == 0 || a.batch > 4096 {
        return Err("--batch must be 1..=4096".into());
    }
    // The desired topology: the store's if it holds one (it survives restarts), else the
    // configuration file's, saved as generation 1 (issue #8).
    let file = crate::show::load_topology(&a.config)?.source;
    let store = Arc::new(
        RedbStore::open(&a.state_dir)
            .map_err(|e| format!("opening the store in {}: {e}", a.state_dir.display()))?,
    );
    let seeded = snatgw_control::seed(&*store, &file).map_err(|e| format!("store: {e}"))?;
    let start_state = starting_state(a, &seeded.stored, seeded.source, &file);
    let what = if start_state.generation == seeded.stored.generation {
        "stored topology".to_string()
    } else {
        format!(
            "{} (--config-wins; nothing saved, the store still holds generation {})",
            a.config.display(),
            seeded.stored.generation
        )
    };
    let topo = snatgw_core::Topology::from_config(start_state.config.clone())
        .map_err(|e| format!("{what}: {e}"))?;
    // The engine's plan checks what validation cannot (R1.3 designation room, R2.8), as for
    // a change through the API; stored designations of groups that remain are kept.
    let mut engine = crate::show::engine_for_gateway(topo, &start_state.engine_designations())
        .map_err(|e| format!("{what}: {e}"))?;
    // Keep the designations the engine made (all of them on a fresh seed) with the topology.
    let mut stored = start_state;
    stored.set_designations(&engine.designations());
    if stored != seeded.stored {
        store
            .save(&stored)
            .map_err(|e| format!("saving the starting topology: {e}"))?;
        if stored.generation != seeded.stored.generation {
            tracing::info!(
                generation = stored.generation,
                "saved the configuration file as the stored topology (--config-wins)"
            );
        }
    }
    engine.set_expiry_budget(PACKET_EXPIRY_BUDGET);
    let mut recorder = match &a.record {
        Some(p) => {
            engine.set_journal(true);
            Some(crate::record::Recorder::start(p)?)
        }
        None => None,
    };
    let n_inst = engine.instances().len();
    // Engine time 0 is now: the fast path's timestamps are converted against the same reading.
    let (start, start_ns) = (Instant::now(), snatgw_io::fastpath::monotonic_ns());
    if a.tun_private == a.tun_public {
        return Err(format!(
            "--tun-private and --tun-public must name different devices (both are {:?}): the side a packet arrives on decides its direction (SPEC R9.1)",
            a.tun_private
        ));
    }
    let open = |name: &str| {
        let mut cfg = TunConfig::new(name.to_string());
        cfg.queues = a.queues;
        cfg.offload = a.offload;
        cfg.tx_queue_len = a.tx_queue_len;
        TunIo::open(&cfg).map_err(|e| format!("opening TUN {name}: {e}"))
    };
    let private = open(&a.tun_private)?;
    let public = open(&a.tun_public)?;
    let wakers: Vec<Waker> = [&private, &public]
        .iter()
        .map(|qs| qs.first().map(TunIo::waker).ok_or("no TUN queue opened"))
        .collect::<Result<_, _>>()?;
    let token = api_token(a)?;
    // Event sequence numbers start from the wall clock (µs), so they keep growing across
    // restarts (the log itself is not persisted), and above the floor an earlier run left in
    // the store, so a clock stepped back cannot reuse them.
    let mut seq_floor = SeqFloor::start(store.clone())?;
    let events = Arc::new(EventLog::starting_after(
        seq_floor.start_after,
        snatgw_control::backend::EVENT_LOG_CAP,
    ));
    let mut fast_path = FastPath::setup(
        a.fast_path,
        a.private_if.as_deref(),
        a.public_if.as_deref(),
        a.fast_path_flows,
        a.fast_path_floor,
        start_ns,
        &mut engine,
    )?;
    let sh = Arc::new(Shared {
        gw: Arc::new(Mutex::new(Gateway::new(engine))),
        events: events.clone(),
        stop: AtomicBool::new(false),
        start,
        start_ns,
        lock: LockCounters::default(),
        workers: (0..2 * a.queues)
            .map(|_| Mutex::new(WorkerStats::default()))
            .collect(),
        queues: a.queues,
        failure: Mutex::new(None),
    });

    let api = match a.api.0 {
        Some(addr) => {
            let clock = {
                let sh = sh.clone();
                move || sh.now()
            };
            let backend = Arc::new(GatewayBackend::new(sh.gw.clone(), events, clock));
            let plane = ControlPlane::new(backend, store.clone(), token, stored);
            let h = snatgw_control::serve(addr, plane)
                .map_err(|e| format!("management API on {addr}: {e}"))?;
            tracing::info!(api = %h.local_addr(), "management API listening");
            Some(h)
        }
        None => None,
    };

    let prober = start_prober(&sh)?;

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("installing signal handlers: {e}"))?;
    let sig_handle = signals.handle();
    let sig_thread = {
        let sh = sh.clone();
        let wakers = wakers.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!(signal = sig, "stop requested");
                    sh.stop.store(true, Ordering::SeqCst);
                    wake_all(&wakers);
                }
            })
            .map_err(|e| format!("spawning the signal thread: {e}"))?
    };

    let mut workers = Vec::new();
    let sides = [
        (Direction::Outbound, "private", private),
        (Direction::Inbound, "public", public),
    ];
    for (k, (dir, label, queues)) in sides.into_iter().enumerate() {
        for (q, io) in queues.into_iter().enumerate() {
            let sh = sh.clone();
            let batch = a.batch;
            let idx = k * a.queues + q;
            let side = Side {
                dir,
                label,
                queue: q,
            };
            let h = std::thread::Builder::new()
                .name(format!("{label}-{q}"))
                .spawn(move || worker(idx, side, io, batch, sh))
                .map_err(|e| format!("spawning {label} worker {q}: {e}"))?;
            workers.push(h);
        }
    }
    tracing::info!(
        tun_private = %a.tun_private,
        tun_public = %a.tun_public,
        queues = a.queues,
        offload = a.offload,
        instances = n_inst,
        config = %a.config.display(),
        "gateway running"
    );
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "{{\"event\":\"ready\",\"tun_private\":\"{}\",\"tun_public\":\"{}\",\"queues\":{},\"fast_path\":{},\"api\":{},\"pid\":{}}}",
            a.tun_private,
            a.tun_public,
            a.queues,
            fast_path.is_some(),
            api.as_ref()
                .map_or("null".to_string(), |h| format!("\"{}\"", h.local_addr())),
            std::process::id()
        );
        let _ = out.flush();
    }

    let mut ring = VecDeque::new();
    let mut cap = LogCap::new(a.log_rate, a.log_burst, 1000);
    let mut last_stats: Option<Instant> = None;
    let mut last_harvest = Instant::now();
    while !sh.stop.load(Ordering::SeqCst) {
        // The kernel's per-instance counters are read once a second (four reads per
        // instance slot), not every tick.
        let harvest = last_harvest.elapsed() >= Duration::from_secs(1);
        if harvest {
            last_harvest = Instant::now();
        }
        tick(
            &sh,
            &mut ring,
            &mut cap,
            fast_path.as_mut().filter(|_| harvest),
        );
        feed_journal(&sh, recorder.as_mut());
        seq_floor.renew(sh.events.last_seq());
        if last_stats.is_none_or(|t| t.elapsed() >= a.stats_interval()) {
            last_stats = Some(Instant::now());
            let mut s = snapshot(a, &sh, &ring, fast_path.as_ref());
            s.log_lines_suppressed = cap.suppressed_total;
            write_stats(a, &s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wake_all(&wakers);
    for h in workers {
        let _ = h.join();
    }
    let _ = prober.join();
    tick(&sh, &mut ring, &mut cap, fast_path.as_mut());
    feed_journal(&sh, recorder.as_mut());
    // Every event is in the log now (the API pushes none): the floor is the last one issued.
    seq_floor.finish(sh.events.last_seq());
    if let Some(r) = recorder.take() {
        finish_recording(r, &sh);
    }
    let mut s = snapshot(a, &sh, &ring, fast_path.as_ref());
    s.log_lines_suppressed = cap.suppressed_total;
    s.final_snapshot = true;
    write_stats(a, &s);
    sig_handle.close();
    let _ = sig_thread.join();
    if let Some(h) = api {
        if let Err(e) = h.shutdown() {
            tracing::warn!(error = %e, "stopping the management API");
        }
    }
    let failure = sh.failure.lock().unwrap_or_else(|p| p.into_inner()).take();
    tracing::info!(
        translated = s.dataplane.translated,
        flows_created = s.engine.flows_created,
        lock_contended = s.lock.contended,
        "gateway stopped"
    );
    match failure {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// The state the gateway starts with. A fresh store holds the file's topology already. When
/// the store holds one and the file differs: with `--config-wins` the file, as the next
/// generation (the stored designations go along: the engine keeps those of groups that
/// remain, as on the API's write path); without it the store's, and a warning naming what
/// the file would change and how to apply it.
fn starting_state(
    a: &RunArgs,
    stored: &Stored,
    source: SeedSource,
    file: &snatgw_core::ConfigFile,
) -> Stored {
    if source == SeedSource::ConfigFile {
        tracing::info!(
            state_dir = %a.state_dir.display(),
            "store was empty: seeded it with the configuration file (generation 1)"
        );
        return stored.clone();
    }
    let diff = topology_diff(&stored.config, file);
    if diff.is_empty() {
        tracing::info!(
            generation = stored.generation,
            state_dir = %a.state_dir.display(),
            "running the topology from the store; it equals the configuration file"
        );
        return stored.clone();
    }
    let changes = summarize_diff(&diff, DIFF_SHOWN);
    if a.config_wins {
        tracing::info!(
            stored_generation = stored.generation,
            config = %a.config.display(),
            "--config-wins: the configuration file replaces the stored topology: {changes}"
        );
        return Stored {
            generation: stored.generation + 1,
            config: file.clone(),
            designations: stored.designations.clone(),
        };
    }
    tracing::warn!(
        generation = stored.generation,
        state_dir = %a.state_dir.display(),
        config = %a.config.display(),
        "the configuration file differs from the stored topology, which runs (the store wins at start): {changes}; \
         to apply the file: `snatgw apply -f {}` while the gateway runs, or restart with --config-wins",
        a.config.display()
    );
    stored.clone()
}

/// Changes named in the start-up warning before `and N more`.
const DIFF_SHOWN: usize = 12;

/// The event sequence floor in the store (see [`snatgw_control::store::event_seq_start`]):
/// at start the run reserves [`EVENT_SEQ_RESERVE`] numbers above its start, renews the
/// reservation when half is used, and at a clean stop saves the last number it issued.
struct SeqFloor {
    store: Arc<RedbStore>,
    /// The log starts after this number.
    start_after: u64,
    /// The floor saved in the store.
    reserved: u64,
}

impl SeqFloor {
    fn start(store: Arc<RedbStore>) -> Result<SeqFloor, String> {
        let wall_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let floor = store
            .event_seq_floor()
            .map_err(|e| format!("store: event sequence floor: {e}"))?;
        let start_after = event_seq_start(wall_us, floor);
        if floor > wall_us {
            tracing::warn!(
                floor,
                wall_clock_us = wall_us,
                "the wall clock is behind event numbers an earlier run issued: numbering continues after them"
            );
        }
        let reserved = start_after.saturating_add(EVENT_SEQ_RESERVE);
        store
            .save_event_seq_floor(reserved)
            .map_err(|e| format!("store: saving the event sequence floor: {e}"))?;
        Ok(SeqFloor {
            store,
            start_after,
            reserved,
        })
    }

    /// Moves the reservation on when `issued` (the last number given) used half of it.
    fn renew(&mut self, issued: u64) {
        if issued.saturating_add(EVENT_SEQ_RESERVE / 2) < self.reserved {
            return;
        }
        let next = issued.saturating_add(EVENT_SEQ_RESERVE);
        match self.store.save_event_seq_floor(next) {
            Ok(()) => self.reserved = next,
            Err(e) => tracing::warn!(error = %e, "cannot save the event sequence floor"),
        }
    }

    /// A clean stop: the floor becomes the last number issued.
    fn finish(self, issued: u64) {
        if let Err(e) = self
            .store
            .save_event_seq_floor(issued.max(self.start_after))
        {
            tracing::warn!(error = %e, "cannot save the event sequence floor");
        }
    }
}

/// The API's bearer token (none with `--api off`): `--token-file`'s, else the one in
/// `<state-dir>/api-token`, generated there on first start. The API always needs a token.
fn api_token(a: &RunArgs) -> Result<Option<String>, String> {
    if a.api.0.is_none() {
        return Ok(None);
    }
    let (path, token) = match &a.token_file {
        Some(p) => {
            let t = snatgw_control::read_token_file(p).map_err(|e| e.to_string())?;
            tracing::info!(token_file = %p.display(), "API bearer token read from --token-file");
            (p.clone(), t)
        }
        None => {
            let p = a.state_dir.join(TOKEN_FILE);
            let (t, generated) = token_in_state_dir(&p)?;
            if generated {
                tracing::info!(token_file = %p.display(), "API bearer token generated (mode 0600); `snatgw get ...` on this host reads it from there");
            } else {
                tracing::info!(token_file = %p.display(), "API bearer token read from the state directory");
            }
            (p, t)
        }
    };
    if let Some(mode) = readable_by_others(&path) {
        tracing::warn!(
            token_file = %path.display(),
            mode = %format!("{mode:o}"),
            "the API token file is readable by group or others: anyone who can read it can change the topology (chmod 600 it)"
        );
    }
    Ok(Some(token))
}

/// The file's permission bits when group or others may read it.
fn readable_by_others(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then_some(mode)
}

/// The token at `path` if it holds one (trimmed, non-empty), else a new one written there;
/// returns it and whether it was generated.
fn token_in_state_dir(path: &Path) -> Result<(String, bool), String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_string(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading the API token {}: {e}", path.display())),
    }
    let token = generate_token()?;
    write_private(path, format!("{token}\n").as_bytes())
        .map_err(|e| format!("writing the API token {}: {e}", path.display()))?;
    Ok((token, true))
}

/// 32 bytes from the kernel's CSPRNG (getrandom(2)), as 64 hex digits.
fn generate_token() -> Result<String, String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| format!("generating the API token: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Writes `bytes` to `path` atomically with mode 0600: a temporary file created with that
/// mode in the same directory, synced, renamed over `path`, then the directory synced.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or("token".into(), |n| n.to_string_lossy());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_token_is_generated_once_with_mode_0600_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join(TOKEN_FILE);
        let (t, generated) = token_in_state_dir(&p).expect("generate");
        assert!(generated);
        assert_eq!(t.len(), 64, "32 bytes in hex");
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()), "{t}");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(readable_by_others(&p), None);
        assert_eq!(std::fs::read_to_string(&p).expect("read"), format!("{t}\n"));
        // Reused, not regenerated.
        assert_eq!(token_in_state_dir(&p).expect("reuse"), (t.clone(), false));
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(TOKEN_FILE)]);
        // An empty file is replaced by a new token; two tokens differ.
        std::fs::write(&p, " \n").expect("empty");
        let (t2, generated) = token_in_state_dir(&p).expect("regenerate");
        assert!(generated);
        assert_ne!(t2, t);
        // An operator's own token is kept as it is (trimmed).
        std::fs::write(&p, "  my-token\n").expect("own");
        assert_eq!(
            token_in_state_dir(&p).expect("own"),
            ("my-token".to_string(), false)
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(readable_by_others(&p), Some(0o640));
    }
}
