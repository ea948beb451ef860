//! The gateway's state file: what `snatgw run` needs to start again without dropping a flow
//! (SPEC R11.1, issue #18).
//!
//! What it does:
//! - [`StateFile::write`] writes a [`SavedState`] atomically: a temporary file in the same
//!   directory, `fsync`, `rename` over the old one, `fsync` of the directory. A crash at any
//!   point leaves either the old file or the new one, never a mix; [`StateFile::read`] also
//!   checks a checksum over the whole file, so a torn or corrupted file is refused, not
//!   half-read.
//! - A [`SavedState`] holds the engine's flow state ([`snatgw_core::engine::persist`]: block
//!   layouts, flows with their timers and TCP state, the reuse history), the topology and
//!   designations it was exported under, and the clock it ran on: the `CLOCK_MONOTONIC`
//!   origin of engine time 0 and the kernel's boot id. A restart on the same boot keeps the
//!   origin, so every `Time` in the state (and every fast-path timestamp) stays valid and
//!   timers run on to the second; a state from another boot is not used.
//! - [`Snapshotter`] writes one every `interval` from its own thread: the export runs in
//!   bounded steps, each under the gateway lock for a fraction of a millisecond (R9.4), and
//!   encoding and writing happen outside it. It spends at most a tenth of its time on it: when
//!   one snapshot takes longer than a tenth of `interval` (about 100 ms for 1M flows: 40 MB),
//!   the next waits ten times that long, and the log says so. [`Snapshotter::finish`] writes a last one after
//!   the workers stopped, so a clean stop (an upgrade) loses nothing.
//! - [`Snapshotter::builder`] makes the same thread serve a fleet node (R10.4): each export
//!   can be handed to a hook ([`SnapshotterBuilder::on_export`]) with or without a state file,
//!   with the kernel fast path's last-seen times merged in first ([`SnapshotterBuilder::seen`])
//!   and a mark read under the gateway lock before the first step
//!   ([`SnapshotterBuilder::mark`], joined with the runtime's journal tap). The hook and the
//!   merge count in the tenth-of-the-time bound.
//! - [`restore_engine`] builds the engine a restart starts with: the saved topology, the
//!   imported flows, then the desired topology applied as a live change (R1.4, R2.9, R2.10).
//!
//! What is lost on a crash (not on a clean stop) is bounded by the interval: flows opened
//! after the last complete snapshot are not in it, and FIN/RST seen after it are not either
//! (such flows end by their idle timer instead: later, never earlier). With the kernel fast
//! path, flows installed in its map are read back from the map as well (`merge_seen`).
//!
//! It does not open devices or the store, and does not decide when to restore: `snatgw run`
//! does.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snatgw_core::config::ConfigFile;
use snatgw_core::engine::persist::{ExportCursor, FlowState, ImportReport, StateError};
use snatgw_core::topology::SnatGroup;
use snatgw_core::{ActivitySource, ConfigError, Engine, Time, Topology};
use snatgw_dataplane::Gateway;

/// The state file's format version.
pub const STATE_FILE_VERSION: u16 = 1;
const MAGIC: [u8; 8] = *b"SNATGWST";

/// Why the state file could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a state file of a version this build reads, or is torn or corrupted.
    #[error("{path}: {why}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The flow state inside is not readable.
    #[error("{path}: {source}")]
    Flows {
        /// The file.
        path: PathBuf,
        /// The error.
        source: StateError,
    },
    /// The snapshot thread panicked (in an export hook): no last snapshot was made.
    #[error("the snapshot thread panicked; no last flow-state snapshot was made")]
    Panicked,
}

/// Why a saved state cannot be restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The topology saved with the flows is not valid any more (a newer build refuses it).
    #[error("the topology saved with the flows: {0}")]
    SavedTopology(ConfigError),
    /// The desired topology cannot be applied to the restored engine.
    #[error("applying the desired topology after the restore: {0}")]
    Desired(ConfigError),
}

/// What a state file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedState {
    /// The kernel's boot id when it was written (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// `CLOCK_MONOTONIC` nanoseconds at engine time 0.
    pub origin_ns: u64,
    /// The topology the flows were exported under.
    pub config: ConfigFile,
    /// Its default-SNAT designations (R1.3).
    pub designations: Vec<(SnatGroup, u32)>,
    /// The engine's flow state.
    pub flows: FlowState,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    boot_id: String,
    origin_ns: u64,
    config: ConfigFile,
    designations: Vec<(SnatGroup, u32)>,
}

/// The kernel's boot id (empty if unreadable: then no saved state is ever trusted).
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl SavedState {
    /// The bytes of the state file: magic, version, metadata (JSON), flow state (its own
    /// format, [`FlowState::encode`]), checksum of everything before it.
    pub fn encode(&self) -> Vec<u8> {
        let meta = Meta {
            boot_id: self.boot_id.clone(),
            origin_ns: self.origin_ns,
            config: self.config.clone(),
            designations: self.designations.clone(),
        };
        let meta = serde_json::to_vec(&meta).expect("metadata serializes");
        let mut out = Vec::with_capacity(64 + meta.len() + 40 * self.flows.flows.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&STATE_FILE_VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta);
        let at = out.len();
        out.extend_from_slice(&0u64.to_le_bytes());
        self.flows.encode(&mut out);
        let n = (out.len() - at - 8) as u64;
        out[at..at + 8].copy_from_slice(&n.to_le_bytes());
        let sum = snatgw_core::hash::checksum64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads what [`SavedState::encode`] wrote; `path` names the file in errors.
    pub fn decode(b: &[u8], path: &Path) -> Result<SavedState, PersistError> {
        let bad = |why: String| PersistError::Format {
            path: path.to_path_buf(),
            why,
        };
        if b.len() < 16 + 8 || b[..8] != MAGIC {
            return Err(bad("not a snatgw state file".into()));
        }
        let (body, sum) = b.split_at(b.len() - 8);
        if snatgw_core::hash::checksum64(body)
            != u64::from_le_bytes(sum.try_into().expect("8 bytes"))
        {
            return Err(bad("checksum mismatch (torn or corrupted)".into()));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != STATE_FILE_VERSION {
            return Err(bad(format!(
                "state file version {version} (this build reads {STATE_FILE_VERSION})"
            )));
        }
        let ml = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")) as usize;
        let rest = &body[16..];
        if rest.len() < ml + 8 {
            return Err(bad("truncated metadata".into()));
        }
        let meta: Meta =
            serde_json::from_slice(&rest[..ml]).map_err(|e| bad(format!("metadata: {e}")))?;
        let fl = u64::from_le_bytes(rest[ml..ml + 8].try_into().expect("8 bytes")) as usize;
        let fb = &rest[ml + 8..];
        if fb.len() != fl {
            return Err(bad(format!(
                "flow state of {} bytes, header says {fl}",
                fb.len()
            )));
        }
        let flows = FlowState::decode(fb).map_err(|source| PersistError::Flows {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(SavedState {
            boot_id: meta.boot_id,
            origin_ns: meta.origin_ns,
            config: meta.config,
            designations: meta.designations,
            flows,
        })
    }
}

/// The state file of a state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

/// The file name in the state directory.
pub const STATE_FILE_NAME: &str = "flow-state";

impl StateFile {
    /// The state file `flow-state` in `state_dir`.
    pub fn in_dir(state_dir: &Path) -> StateFile {
        StateFile {
            path: state_dir.join(STATE_FILE_NAME),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes` (an encoded [`SavedState`]) atomically; returns once it is durable.
    pub fn write_bytes(&self, bytes: &[u8]) -> Result<(), PersistError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| PersistError::Io { what, path, source }
        };
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        let mut f = File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(bytes).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(io("renaming over", &self.path))?;
        if let Some(dir) = self.path.parent() {
            let d = File::open(dir).map_err(io("opening", dir))?;
            d.sync_all().map_err(io("syncing", dir))?;
        }
        Ok(())
    }

    /// Writes `s` atomically.
    pub fn write(&self, s: &SavedState) -> Result<(), PersistError> {
        self.write_bytes(&s.encode())
    }

    /// The saved state, `None` if there is no file. Leftover temporary files of a crashed
    /// writer are removed.
    pub fn read(&self) -> Result<Option<SavedState>, PersistError> {
        if let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) {
            let prefix = format!("{}.tmp.", name.to_string_lossy());
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&prefix) {
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
        }
        let b = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PersistError::Io {
                    what: "reading",
                    path: self.path.clone(),
                    source,
                })
            }
        };
        SavedState::decode(&b, &self.path).map(Some)
    }
}

/// The engine a restart starts with: built under the saved topology at time `now` (engine
/// seconds since the saved origin), the saved flows imported, then `desired` applied as a
/// live change when it differs. `key` is the flow tables' hash key.
pub fn restore_engine(
    saved: &SavedState,
    desired: Topology,
    now: Time,
    key: u64,
) -> Result<(Engine, ImportReport), RestoreError> {
    let old = Topology::from_config(saved.config.clone()).map_err(RestoreError::SavedTopology)?;
    let mut e = Engine::with_designations(old, now, key, &saved.designations)
        .map_err(RestoreError::SavedTopology)?;
    e.advance(now);
    let rep = e.import_state(&saved.flows);
    if desired.source != saved.config {
        e.apply(now, desired).map_err(RestoreError::Desired)?;
    }
    Ok((e, rep))
}

/// What the snapshotter did, for the stats file and logs.
#[derive(Debug, Default)]
pub struct SnapshotCounters {
    /// Snapshots written.
    pub written: AtomicU64,
    /// Snapshots that failed to write.
    pub failed: AtomicU64,
    /// Flows in the last one.
    pub last_flows: AtomicU64,
    /// Bytes of the last one.
    pub last_bytes: AtomicU64,
    /// Longest single export step under the gateway lock, nanoseconds.
    pub step_max_ns: AtomicU64,
    /// Time the last snapshot took from first step to durable file (and export hook),
    /// microseconds.
    pub last_us: AtomicU64,
    /// Exports made (with or without a file; each one handed to the export hook, if any).
    pub exported: AtomicU64,
}

impl SnapshotCounters {
    /// The counters now, as `/metrics` shows them (atomics only: no lock).
    pub fn read(&self) -> snatgw_control::backend::FlowStateCounters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        snatgw_control::backend::FlowStateCounters {
            written: get(&self.written),
            failed: get(&self.failed),
            last_flows: get(&self.last_flows),
            last_bytes: get(&self.last_bytes),
            last_micros: get(&self.last_us),
        }
    }
}

/// What [`SnapshotterBuilder::on_export`] is given after each export: the state (its flows
/// with the kernel's last-seen times merged, [`SnapshotterBuilder::seen`]) and the mark read
/// under the gateway lock before the export's first step ([`SnapshotterBuilder::mark`]; 0
/// without one).
pub type ExportHook = Box<dyn FnMut(&SavedState, u64) + Send>;

/// A value read under the gateway lock before an export's first step
/// ([`SnapshotterBuilder::mark`]).
pub type ExportMark = Box<dyn Fn() -> u64 + Send>;

/// Exports the flow state every `interval` from its own thread, writes it to the state file
/// and/or hands it to a hook (see the module docs). Built with [`Snapshotter::start`] (a
/// file) or [`Snapshotter::builder`].
pub struct Snapshotter {
    stop: Arc<AtomicBool>,
    /// The thread, which gives its job back when it ends (for the last snapshot).
    handle: Option<JoinHandle<Job>>,
    counters: Arc<SnapshotCounters>,
}

/// How a [`Snapshotter`] is set up: [`Snapshotter::builder`], then any of
/// [`SnapshotterBuilder::file`], [`SnapshotterBuilder::on_export`],
/// [`SnapshotterBuilder::seen`], [`SnapshotterBuilder::mark`], then
/// [`SnapshotterBuilder::start`].
pub struct SnapshotterBuilder {
    job: Job,
    interval: Duration,
}

/// What one snapshot needs; owned by the snapshot thread while it runs.
struct Job {
    gw: Arc<Mutex<Gateway>>,
    file: Option<StateFile>,
    origin_ns: u64,
    boot_id: String,
    counters: Arc<SnapshotCounters>,
    seen: Option<Box<dyn ActivitySource>>,
    mark: Option<ExportMark>,
    on_export: Option<ExportHook>,
}

/// The engine's flow state, exported in bounded steps ([`snatgw_core::Engine::export_step`]),
/// each under the gateway lock, which is released between them (R9.4's latency bound holds
/// while a large table is exported); `on_step` is told how long each step held the lock. A
/// fuzzy cut: the engine runs between steps (see `snatgw_core::engine::persist`).
pub fn export_flows(gw: &Mutex<Gateway>, mut on_step: impl FnMut(Duration)) -> FlowState {
    let mut cur = ExportCursor::default();
    let mut flows = FlowState::default();
    loop {
        let t = Instant::now();
        let done = {
            let g = gw.lock().unwrap_or_else(|p| p.into_inner());
            g.engine().export_step(&mut cur, &mut flows)
        };
        on_step(t.elapsed());
        if done {
            return flows;
        }
        std::thread::yield_now();
    }
}

/// Exports the engine's state in bounded steps, each under the lock; returns it with the
/// mark read under the lock before the first step.
fn export(job: &Job) -> (SavedState, u64) {
    let (config, designations, mark) = {
        let g = job.gw.lock().unwrap_or_else(|p| p.into_inner());
        let e = g.engine();
        let mark = job.mark.as_ref().map_or(0, |m| m());
        (e.topology().source.clone(), e.designations(), mark)
    };
    let flows = export_flows(&job.gw, |step| {
        job.counters
            .step_max_ns
            .fetch_max(step.as_nanos() as u64, Ordering::Relaxed);
    });
    let state = SavedState {
        boot_id: job.boot_id.clone(),
        origin_ns: job.origin_ns,
        config,
        designations,
        flows,
    };
    (state, mark)
}

/// Moves each flow's `last_seen` up to the last packet `seen` (the kernel's map) reports for
/// it, never past the state's time. Outside the gateway lock: the map has its own reader.
fn merge_seen(flows: &mut FlowState, seen: &mut dyn ActivitySource) {
    let limit = flows.time;
    for f in &mut flows.flows {
        if let Some(t) = seen.last_seen(&f.key) {
            f.last_seen = f.last_seen.max(t.min(limit));
        }
    }
}

fn snapshot_once(job: &mut Job) -> Result<(), PersistError> {
    let t = Instant::now();
    let (mut s, mark) = export(job);
    if let Some(src) = job.seen.as_mut() {
        merge_seen(&mut s.flows, src.as_mut());
    }
    let c = job.counters.clone();
    c.exported.fetch_add(1, Ordering::Relaxed);
    c.last_flows
        .store(s.flows.flows.len() as u64, Ordering::Relaxed);
    if let Some(hook) = job.on_export.as_mut() {
        hook(&s, mark);
    }
    let mut r = Ok(());
    if let Some(file) = &job.file {
        let bytes = s.encode();
        r = file.write_bytes(&bytes);
        match &r {
            Ok(()) => {
                c.written.fetch_add(1, Ordering::Relaxed);
                c.last_bytes.store(bytes.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    c.last_us
        .store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
    r
}

/// The snapshot thread: a snapshot, then a wait of `interval` or ten times the snapshot's
/// time, whichever is longer, until `stop`. Gives the job back for the last snapshot.
fn run(mut job: Job, interval: Duration, stop: &AtomicBool) -> Job {
    let mut failing = false;
    let mut slowed = false;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        match snapshot_once(&mut job) {
            Ok(()) if failing => {
                failing = false;
                if let Some(f) = &job.file {
                    tracing::info!(path = %f.path().display(), "flow state written again");
                }
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "writing the flow state failed: a crash now loses the flows opened since the last good one (R11.1)");
            }
            Err(_) => {}
        }
        // At most a tenth of the time spent snapshotting (export, kernel merge, hook, file):
        // a table so large that one snapshot takes longer than a tenth of the interval is
        // exported less often (the loss bound grows with it, and the log says so once).
        let took = t.elapsed();
        let wait = interval.max(took * 10);
        if wait > interval && !slowed {
            slowed = true;
            tracing::warn!(
                snapshot_ms = took.as_millis() as u64,
                every_ms = wait.as_millis() as u64,
                "the flow state is exported less often than --flow-state-interval-ms: one snapshot takes over a tenth of it"
            );
        }
        while !stop.load(Ordering::Relaxed) && t.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(20).min(interval));
        }
    }
    job
}

impl Snapshotter {
    /// Starts writing `file` every `interval` (the first one at once). `origin_ns` is the
    /// clock origin of engine time 0.
    pub fn start(
        gw: Arc<Mutex<Gateway>>,
        file: StateFile,
        origin_ns: u64,
        interval: Duration,
    ) -> Snapshotter {
        Snapshotter::builder(gw, origin_ns, interval)
            .file(file)
            .start()
    }

    /// A snapshotter of `gw`'s flow state every `interval` (the first at once), to be told
    /// where the exports go. `origin_ns` is the clock origin of engine time 0.
    pub fn builder(
        gw: Arc<Mutex<Gateway>>,
        origin_ns: u64,
        interval: Duration,
    ) -> SnapshotterBuilder {
        SnapshotterBuilder {
            job: Job {
                gw,
                file: None,
                origin_ns,
                boot_id: boot_id(),
                counters: Arc::new(SnapshotCounters::default()),
                seen: None,
                mark: None,
                on_export: None,
            },
            interval,
        }
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<SnapshotCounters> {
        self.counters.clone()
    }

    /// Stops the thread and makes a last snapshot: written to the file and handed to the
    /// hook, if any (call it after the workers stopped, so it holds every flow: a clean stop
    /// loses nothing). `Err` if the file could not be written, or the thread panicked (in the
    /// export hook).
    pub fn finish(mut self) -> Result<(), PersistError> {
        self.stop.store(true, Ordering::Relaxed);
        let Some(h) = self.handle.take() else {
            return Ok(());
        };
        let mut job = h.join().map_err(|_| PersistError::Panicked)?;
        snapshot_once(&mut job)
    }
}

impl SnapshotterBuilder {
    /// Writes each export to `file` (atomically, [`StateFile::write`]).
    pub fn file(mut self, file: StateFile) -> Self {
        self.job.file = Some(file);
        self
    }

    /// Hands each export to `hook` on the snapshot thread, after the kernel's last-seen merge
    /// ([`SnapshotterBuilder::seen`]) and before the file is written: a fleet node replicating
    /// its flows without (or besides) a state file (R10.4). Its time counts in the duty
    /// bound (module docs), so a slow hook makes exports rarer, not the data path slower; it
    /// runs without the gateway lock. The `u64` is the mark ([`SnapshotterBuilder::mark`]).
    pub fn on_export(mut self, hook: impl FnMut(&SavedState, u64) + Send + 'static) -> Self {
        self.job.on_export = Some(Box::new(hook));
        self
    }

    /// Merges the kernel's last-seen times into each export (outside the gateway lock, two
    /// map lookups per flow): the engine asks the fast path's map only when a flow looks
    /// idle-due, so a flow the kernel carries has an older `last_seen` in the engine, up to
    /// the idle timeout. `seen` is [`crate::fastpath::FastPath::take_seen_source`]
    /// (`Runtime::take_fast_path_seen`). Times are capped at the export's time.
    pub fn seen(mut self, seen: Box<dyn ActivitySource>) -> Self {
        self.job.seen = Some(seen);
        self
    }

    /// Reads `mark` under the gateway lock before each export's first step and hands the
    /// value to the export hook: with `Runtime::journal_mark`, the journal tap's changes up to
    /// the mark are in the export, later ones may or may not be (a replica applies the export,
    /// then replays the changes after the mark).
    pub fn mark(mut self, mark: impl Fn() -> u64 + Send + 'static) -> Self {
        self.job.mark = Some(Box::new(mark));
        self
    }

    /// Starts the thread (the first snapshot at once). With neither a file nor an export hook
    /// there is nothing to export to: no thread runs and [`Snapshotter::finish`] does nothing.
    pub fn start(self) -> Snapshotter {
        let SnapshotterBuilder { job, interval } = self;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = job.counters.clone();
        if job.file.is_none() && job.on_export.is_none() {
            return Snapshotter {
                stop,
                handle: None,
                counters,
            };
        }
        let handle = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("snapshot".into())
                .spawn(move || run(job, interval, &stop))
                .expect("spawning the snapshot thread")
        };
        Snapshotter {
            stop,
            handle: Some(handle),
            counters,
        }
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
