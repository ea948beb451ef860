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
//! A fleet (`--fleet etcd://... --node-id ID`, issue #19, [`crate::fleet`]): the topology
//! lives in etcd instead of redb and every node applies every change; the node opens new flows
//! only for the instances it owns under a valid lease. Without `--fleet`, nothing of it runs.
//!
//! What it does not do: configure addresses or routes (the operator, or `snatgw lab`, points
//! routes at the TUN), or reload configuration.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use snatgw_io::{TunConfig, TunIo};

use snatgw_control::store::{
    event_seq_start, summarize_diff, topology_diff, DEFAULT_STATE_DIR, EVENT_SEQ_RESERVE,
    TOKEN_FILE,
};
use snatgw_control::{
    ControlPlane, EventLog, GatewayBackend, RedbStore, SeedSource, Store, Stored,
};
use snatgw_runtime::fastpath::{FastPath, FastPathMode, FastPathOptions};
use snatgw_runtime::persist::{restore_engine, SavedState, Snapshotter, StateFile};
use snatgw_runtime::{Clock, FleetHooks, Parts, Runtime, RuntimeOptions, Wake};

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
    #[arg(long, default_value = "auto", value_parser = parse_fast_path)]
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
    /// Size in bytes of the fast path's ring of FIN/RST events (32 bytes each; 0: 1 MiB). A
    /// FIN or RST that finds it full is passed up to the engine instead of translated.
    #[arg(long, default_value_t = 0)]
    pub fast_path_event_ring_bytes: u32,
    /// Whether the fast path opens new TCP connections itself, on ports the engine chose
    /// ahead for each busy destination (`on`, the default; `off`: every SYN goes up to the
    /// engine through the TUN). Always off with `--fleet` (ports there are fenced to
    /// acknowledged reserves, R10.4). See docs/RUNNING.md, "Port stashes".
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub fast_path_stash: String,
    /// Tests only: do not read the FIN/RST event ring for this many milliseconds after the
    /// start, so it fills (forces the `event_full` path).
    #[arg(long, hide = true)]
    pub fast_path_events_hold_ms: Option<u64>,
    /// Record every flow (opened, closed, refused) to this file in the planner's trace
    /// format, for `snatgw plan --trace` (docs/PLANNER.md).
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Period of the flow-state snapshot `<state-dir>/flow-state`, milliseconds (0: none).
    /// A restart on the same boot restores flows, ports and timers from it (SPEC R11.1); a
    /// crash loses at most what changed in the last period, a clean stop nothing.
    #[arg(long, default_value_t = 1000)]
    pub flow_state_interval_ms: u64,
    /// Start with no flows even when a flow state is saved (it is overwritten).
    #[arg(long)]
    pub fresh_flows: bool,
    /// Directory on a bpffs where the fast path's maps and program links are pinned, so
    /// installed flows keep being translated in the kernel while `snatgw run` is down (a
    /// crash, an upgrade) and the next start takes them over (SPEC R11.1). Default: `auto`,
    /// `/sys/fs/bpf/snatgw/<id of the state dir>` when /sys/fs/bpf is a bpffs, else no pins
    /// (said in a warning); `off`: never pin.
    #[arg(long, default_value = "auto")]
    pub bpf_pin_dir: String,
    /// On a clean stop (SIGINT/SIGTERM), detach the fast path and remove its pins: the gateway
    /// is meant to stay down, so the kernel must stop translating. Without it a clean stop
    /// leaves installed flows translated in the kernel for the next start (an upgrade).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Run as a node of a fleet (issue #19, SPEC §10): `etcd://HOST:PORT[,HOST:PORT]`. The
    /// topology lives in etcd (seeded from --config when empty) and every node applies every
    /// change; the node joins under a lease and opens new flows only for the instances it
    /// owns (docs/FLEET.md). Needs --node-id and the API. Without it: one node, redb (R10.6).
    #[arg(long, value_parser = crate::fleet::parse_fleet_url)]
    pub fleet: Option<crate::fleet::FleetUrl>,
    /// This node's id in the fleet (1-64 of A-Za-z0-9._-).
    #[arg(long, requires = "fleet")]
    pub node_id: Option<String>,
    /// The fleet lease TTL in seconds (at least 2): a dead node's instances are taken over
    /// within it plus 2 s; a node cut off from etcd stops opening flows before it ends.
    #[arg(long, default_value_t = 10)]
    pub fleet_ttl_secs: u64,
    /// This node's fleet link, `IP:PORT`: where the other nodes send it the packets of the
    /// instances it owns (UDP, R10.3) and the flow state of the instances it would take over
    /// (TCP, R10.4); advertised to them through etcd. Put it on the fleet's management
    /// network. Without it the node neither steers nor replicates.
    #[arg(long, requires = "fleet")]
    pub fleet_link: Option<std::net::SocketAddr>,
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

/// `--fast-path`: `auto`, `tc` or `off`.
pub fn parse_fast_path(s: &str) -> Result<FastPathMode, String> {
    s.parse()
        .map_err(|e: snatgw_runtime::fastpath::UnknownMode| e.to_string())
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
    let file = snatgw_runtime::config::load_topology(&a.config)
        .map_err(|e| e.to_string())?
        .source;
    let store = Arc::new(
        RedbStore::open(&a.state_dir)
            .map_err(|e| format!("opening the store in {}: {e}", a.state_dir.display()))?,
    );
    // In a fleet the topology lives in etcd (the redb store keeps the event sequence floor).
    let mut fleet = fleet_start(a)?;
    let topo_store: Arc<dyn Store> = match &fleet {
        Some(f) => f.store(),
        None => store.clone(),
    };
    let seeded = snatgw_control::seed(&*topo_store, &file).map_err(|e| format!("store: {e}"))?;
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
    // A flow state saved by an earlier run on this boot (SPEC R11.1): engine time keeps its
    // origin, so saved timers and fast-path timestamps stay valid; the flows are imported
    // under the topology they ran with, then this run's topology is applied as a live change.
    let state_file = StateFile::in_dir(&a.state_dir);
    let mut saved = restorable_state(a, &state_file);
    let pin_dir = bpf_pin_dir(a);
    if let (Some(s), Some(dir)) = (saved.as_mut(), pin_dir.as_deref()) {
        // What the kernel kept translating since the last snapshot: later last-seen times,
        // and flows opened after it (R11.1).
        let now = Clock::Monotonic {
            start_ns: s.origin_ns,
        }
        .now();
        match snatgw_runtime::fastpath::pinned_flows_seen(dir, s.origin_ns, now) {
            Ok(Some(seen)) => {
                let n = seen.len();
                s.flows.merge_seen(seen, now);
                tracing::info!(flows = n, dir = %dir.display(), "read the pinned fast-path map");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "not reading the pinned fast-path map"),
        }
    }
    let start_ns = saved
        .as_ref()
        .map_or_else(snatgw_io::fastpath::monotonic_ns, |s| s.origin_ns);
    let clock = Clock::Monotonic { start_ns };
    // A saved state that cannot be restored (a topology a newer build refuses, one the desired
    // topology cannot be applied to) is not a reason to stay down: the gateway starts with no
    // flows, as without a saved state, and says why.
    let restored = saved.as_ref().and_then(|s| {
        use std::hash::BuildHasher;
        let key = std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64);
        let t = std::time::Instant::now();
        let now = clock.now();
        match restore_engine(s, topo.clone(), now, key) {
            Ok((e, rep)) => {
                tracing::info!(
                    flows = rep.flows,
                    skipped = rep.skipped_instance + rep.skipped_port + rep.skipped_conflict,
                    releases = rep.releases,
                    saved_at = s.flows.time,
                    now,
                    ms = t.elapsed().as_millis() as u64,
                    "restored the flow state of the previous run (R11.1)"
                );
                Some(e)
            }
            Err(e) => {
                tracing::warn!(error = %e, "not restoring flows: the saved flow state cannot be restored; starting with none");
                None
            }
        }
    });
    let mut engine = match restored {
        Some(e) => e,
        None => {
            snatgw_runtime::config::engine_for_gateway(topo, &start_state.engine_designations())
                .map_err(|e| format!("{what}: {e}"))?
        }
    };
    // Keep the designations the engine made (all of them on a fresh seed) with the topology.
    let mut stored = start_state;
    stored.set_designations(&engine.designations());
    if stored != seeded.stored {
        match topo_store.save(&stored) {
            Ok(()) => {}
            // A fleet's store takes a generation once (generations only grow across nodes):
            // the same generation with the designations filled in is refused. The topology is
            // the one stored and its designations the same function of it on every node; the
            // next change through the API stores them.
            Err(snatgw_control::StoreError::Conflict { .. })
                if a.fleet.is_some() && stored.generation == seeded.stored.generation =>
            {
                tracing::debug!(
                    generation = stored.generation,
                    "fleet: starting designations not stored"
                );
            }
            Err(e) => return Err(format!("saving the starting topology: {e}")),
        }
        if stored.generation != seeded.stored.generation {
            tracing::info!(
                generation = stored.generation,
                "saved the configuration file as the stored topology (--config-wins)"
            );
        }
    }
    let recorder = match &a.record {
        Some(p) => {
            engine.set_journal(true);
            Some(snatgw_runtime::record::Recorder::start(p).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let n_inst = engine.instances().len();
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
    let wakers: Vec<Wake> = [&private, &public]
        .iter()
        .map(|qs| {
            let w = qs.first().map(TunIo::waker).ok_or("no TUN queue opened")?;
            Ok(Box::new(move || {
                let _ = w.wake();
            }) as Wake)
        })
        .collect::<Result<_, String>>()?;
    let token = api_token(a)?;
    // Event sequence numbers start from the wall clock (µs), so they keep growing across
    // restarts (the log itself is not persisted), and above the floor an earlier run left in
    // the store, so a clock stepped back cannot reuse them.
    let mut seq_floor = SeqFloor::start(store.clone())?;
    let events = Arc::new(EventLog::starting_after(
        seq_floor.start_after,
        snatgw_control::backend::EVENT_LOG_CAP,
    ));
    let fast_path = FastPath::setup(
        &FastPathOptions {
            mode: a.fast_path,
            private_if: a.private_if.clone(),
            public_if: a.public_if.clone(),
            max_flows: a.fast_path_flows,
            floor: a.fast_path_floor,
            start_ns,
            pin_dir: pin_dir.clone(),
            event_ring_bytes: a.fast_path_event_ring_bytes,
            events_hold: a.fast_path_events_hold_ms.map(Duration::from_millis),
            // A fleet node's link: steered packets of flows installed here are translated in
            // the kernel (issue #19, R10.3); the interface is the one holding the address.
            link_if: fleet_link_if(a),
            stash: a.fast_path_stash == "on" && a.fleet.is_none(),
        },
        &mut engine,
    )
    .map_err(|e| e.to_string())?;
    let opts = RuntimeOptions {
        batch: a.batch,
        stats_file: a.stats_file.clone(),
        stats_interval: a.stats_interval(),
        log_rate: a.log_rate,
        log_burst: a.log_burst,
        private_name: a.tun_private.clone(),
        public_name: a.tun_public.clone(),
        offload: a.offload,
        probes: true,
    };
    let parts = Parts {
        engine,
        clock: clock.clone(),
        events: events.clone(),
        fast_path,
        recorder,
        wakers,
    };
    let hooks = fleet
        .as_mut()
        .map_or_else(FleetHooks::new, |f| f.runtime_hooks(start_ns));
    let mut rt = Runtime::start_with_hooks(parts, hooks, private, public, opts)
        .map_err(|e| e.to_string())?;
    // Each snapshot carries the kernel's last-seen times (the engine asks the map only when a
    // flow looks idle-due, so a flow the kernel carries is up to an idle timeout older there):
    // a restart without pins of this ABI (none, or an upgrade's) then never finds an active
    // flow idle (R11.1).
    let seen = rt.take_fast_path_seen();
    let snapshotter = (a.flow_state_interval_ms > 0).then(|| {
        let b = Snapshotter::builder(
            rt.gateway().clone(),
            start_ns,
            Duration::from_millis(a.flow_state_interval_ms.max(100)),
        )
        .file(state_file.clone());
        match seen {
            Some(s) => b.seen(s),
            None => b,
        }
        .start()
    });

    let mut fleet_node = None;
    let api = match a.api.0 {
        Some(addr) => {
            let clock = clock.clone();
            // The runtime's counters, plus the flow-state snapshots' (R11.1) when they run.
            let runtime_counters = rt.counters_source();
            let snaps = snapshotter.as_ref().map(Snapshotter::counters);
            let counters = move || {
                let mut c = runtime_counters();
                c.flow_state = snaps.as_ref().map(|s| s.read());
                c
            };
            let backend = GatewayBackend::new(rt.gateway().clone(), events, move || clock.now())
                .with_runtime_counters(Arc::new(counters))
                .with_after_change(Box::new(rt.after_change_hook()));
            let backend = Arc::new(match &fleet {
                Some(f) => backend.with_fleet_gauges(f.gauges()),
                None => backend,
            });
            let plane = ControlPlane::new(backend, topo_store.clone(), token, stored);
            if let Some(mut f) = fleet.take() {
                // The injector makes queue 0's workers poll for steered packets every
                // millisecond: only with a fleet link.
                let injector = f.has_link().then(|| rt.injector());
                if let Some(s) = f.has_link().then(|| rt.take_fast_path_steer()).flatten() {
                    f.set_kernel_steer(s);
                }
                fleet_node = Some(f.start(
                    plane.clone(),
                    rt.gateway(),
                    Box::new(rt.after_change_hook()),
                    injector,
                )?);
            }
            let h = snatgw_control::serve(addr, plane)
                .map_err(|e| format!("management API on {addr}: {e}"))?;
            tracing::info!(api = %h.local_addr(), "management API listening");
            Some(h)
        }
        None => None,
    };

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("installing signal handlers: {e}"))?;
    let sig_handle = signals.handle();
    let sig_thread = {
        let stop = rt.stop_handle();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!(signal = sig, "stop requested");
                    stop.stop();
                }
            })
            .map_err(|e| format!("spawning the signal thread: {e}"))?
    };
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
            rt.has_fast_path(),
            api.as_ref()
                .map_or("null".to_string(), |h| format!("\"{}\"", h.local_addr())),
            std::process::id()
        );
        let _ = out.flush();
    }

    let log = rt.events_log();
    rt.run_until_stopped(|_| seq_floor.renew(log.last_seq()));
    if let Some(f) = fleet_node {
        // Leave first: the other nodes take this node's instances at their next tick.
        f.stop();
    }
    let finished = rt.shutdown();
    if a.detach_on_exit {
        if let Some(dir) = &pin_dir {
            match snatgw_io::pin::remove_all(dir) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "fast path detached and its pins removed (--detach-on-exit)")
                }
                Err(e) => tracing::error!(error = %e, "removing the fast path's pins"),
            }
        }
    }
    // The workers have stopped: a last snapshot holds every flow, so a restart after a clean
    // stop (an upgrade) loses none.
    if let Some(snap) = snapshotter {
        match snap.finish() {
            Ok(()) => {
                tracing::info!(path = %state_file.path().display(), "flow state saved for the next start")
            }
            Err(e) => tracing::error!(error = %e, "saving the flow state at shutdown failed"),
        }
    }
    // Every event is in the log now (the API pushes none): the floor is the last one issued.
    seq_floor.finish(log.last_seq());
    sig_handle.close();
    let _ = sig_thread.join();
    if let Some(h) = api {
        if let Err(e) = h.shutdown() {
            tracing::warn!(error = %e, "stopping the management API");
        }
    }
    match finished {
        Ok(s) => {
            tracing::info!(
                translated = s.dataplane.translated,
                flows_created = s.engine.flows_created,
                lock_contended = s.lock.contended,
                "gateway stopped"
            );
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The interface of `--fleet-link`'s address, when this is a fleet node with an IPv4 link.
fn fleet_link_if(a: &RunArgs) -> Option<String> {
    let l = a.fleet_link.filter(|_| a.fleet.is_some())?;
    let std::net::IpAddr::V4(ip) = l.ip() else {
        return None;
    };
    match snatgw_io::fastpath::ifname_of_addr(ip) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, link = %l, "fleet: no interface holds the link address; steered packets are translated in userspace only");
            None
        }
    }
}

/// `--fleet`: connects to etcd (issue #19). Checked before anything is opened: the fleet
/// needs the management API (a change reaches the other nodes through the store it saves to).
fn fleet_start(a: &RunArgs) -> Result<Option<crate::fleet::FleetRun>, String> {
    let Some(url) = &a.fleet else {
        return Ok(None);
    };
    let node = a.node_id.as_deref().ok_or("--fleet needs --node-id")?;
    if a.api.0.is_none() {
        return Err("--fleet needs the management API (--api ADDR, not off)".into());
    }
    crate::fleet::FleetRun::connect(url, node, a.fleet_ttl_secs, a.fleet_link).map(Some)
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
/// Where the fast path pins its maps and links (`--bpf-pin-dir`), if anywhere.
fn bpf_pin_dir(a: &RunArgs) -> Option<PathBuf> {
    match a.bpf_pin_dir.as_str() {
        "off" => None,
        "auto" => {
            if a.fast_path == FastPathMode::Off || a.private_if.is_none() {
                return None;
            }
            let root = Path::new("/sys/fs/bpf");
            if !snatgw_io::pin::is_bpffs(root) {
                tracing::warn!("/sys/fs/bpf is not a bpffs: the fast path is not pinned, and a restart interrupts translation in the kernel (mount one, or pass --bpf-pin-dir)");
                return None;
            }
            let id = std::fs::canonicalize(&a.state_dir).unwrap_or_else(|_| a.state_dir.clone());
            let h = snatgw_core::hash::fnv1a64(id.to_string_lossy().as_bytes());
            Some(root.join("snatgw").join(format!("{h:016x}")))
        }
        dir => Some(PathBuf::from(dir)),
    }
}

/// The flow state to restore, if there is one this run may use: written on this boot (engine
/// times are `CLOCK_MONOTONIC` seconds, which a reboot resets), readable, and not refused by
/// `--fresh-flows` or `--flow-state-interval-ms 0`. Every reason not to restore is logged.
fn restorable_state(a: &RunArgs, file: &StateFile) -> Option<SavedState> {
    if a.fresh_flows || a.flow_state_interval_ms == 0 {
        return None;
    }
    let s = match file.read() {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "not restoring flows: the saved flow state is unreadable");
            return None;
        }
    };
    let boot = snatgw_runtime::persist::boot_id();
    if boot.is_empty() || s.boot_id != boot {
        tracing::warn!(
            saved_boot = %s.boot_id,
            boot = %boot,
            "not restoring flows: the flow state is from another boot (its clock and the kernel's maps are gone)"
        );
        return None;
    }
    if snatgw_io::fastpath::monotonic_ns() < s.origin_ns {
        tracing::warn!("not restoring flows: the saved clock origin is in the future");
        return None;
    }
    Some(s)
}

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
