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
use snatgw_core::{ConfigError, Engine, Time, Topology};
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
    /// Time the last snapshot took from first step to durable file, microseconds.
    pub last_us: AtomicU64,
}

/// Writes the state file every `interval` from its own thread (see the module docs).
pub struct Snapshotter {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    gw: Arc<Mutex<Gateway>>,
    file: StateFile,
    origin_ns: u64,
    boot_id: String,
    counters: Arc<SnapshotCounters>,
}

/// Exports the engine's state in bounded steps, each under the lock.
fn export(gw: &Mutex<Gateway>, origin_ns: u64, boot_id: &str, c: &SnapshotCounters) -> SavedState {
    let (config, designations) = {
        let g = gw.lock().unwrap_or_else(|p| p.into_inner());
        let e = g.engine();
        (e.topology().source.clone(), e.designations())
    };
    let mut cur = ExportCursor::default();
    let mut flows = FlowState::default();
    loop {
        let t = Instant::now();
        let done = {
            let g = gw.lock().unwrap_or_else(|p| p.into_inner());
            g.engine().export_step(&mut cur, &mut flows)
        };
        c.step_max_ns
            .fetch_max(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if done {
            break;
        }
        std::thread::yield_now();
    }
    SavedState {
        boot_id: boot_id.to_string(),
        origin_ns,
        config,
        designations,
        flows,
    }
}

fn snapshot_once(
    gw: &Mutex<Gateway>,
    file: &StateFile,
    origin_ns: u64,
    boot_id: &str,
    c: &SnapshotCounters,
) -> Result<(), PersistError> {
    let t = Instant::now();
    let s = export(gw, origin_ns, boot_id, c);
    let bytes = s.encode();
    let r = file.write_bytes(&bytes);
    match &r {
        Ok(()) => {
            c.written.fetch_add(1, Ordering::Relaxed);
            c.last_flows
                .store(s.flows.flows.len() as u64, Ordering::Relaxed);
            c.last_bytes.store(bytes.len() as u64, Ordering::Relaxed);
            c.last_us
                .store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        Err(_) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    r
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
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(SnapshotCounters::default());
        let boot = boot_id();
        let handle = {
            let (stop, gw, file, counters, boot) = (
                stop.clone(),
                gw.clone(),
                file.clone(),
                counters.clone(),
                boot.clone(),
            );
            std::thread::Builder::new()
                .name("snapshot".into())
                .spawn(move || {
                    let mut failing = false;
                    let mut slowed = false;
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        match snapshot_once(&gw, &file, origin_ns, &boot, &counters) {
                            Ok(()) if failing => {
                                failing = false;
                                tracing::info!(path = %file.path().display(), "flow state written again");
                            }
                            Ok(()) => {}
                            Err(e) if !failing => {
                                failing = true;
                                tracing::error!(error = %e, "writing the flow state failed: a crash now loses the flows opened since the last good one (R11.1)");
                            }
                            Err(_) => {}
                        }
                        // At most a tenth of the time spent snapshotting: a table so large
                        // that one snapshot takes longer than a tenth of the interval is
                        // written less often (the loss bound grows with it, and the log
                        // says so once).
                        let took = t.elapsed();
                        let wait = interval.max(took * 10);
                        if wait > interval && !slowed {
                            slowed = true;
                            tracing::warn!(
                                snapshot_ms = took.as_millis() as u64,
                                every_ms = wait.as_millis() as u64,
                                "the flow state is written less often than --flow-state-interval-ms: one snapshot takes over a tenth of it"
                            );
                        }
                        while !stop.load(Ordering::Relaxed) && t.elapsed() < wait {
                            std::thread::sleep(Duration::from_millis(20).min(interval));
                        }
                    }
                })
                .expect("spawning the snapshot thread")
        };
        Snapshotter {
            stop,
            handle: Some(handle),
            gw,
            file,
            origin_ns,
            boot_id: boot,
            counters,
        }
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<SnapshotCounters> {
        self.counters.clone()
    }

    /// Stops the thread and writes a last snapshot (call it after the workers stopped, so it
    /// holds every flow: a clean stop loses nothing).
    pub fn finish(mut self) -> Result<(), PersistError> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        snapshot_once(
            &self.gw,
            &self.file,
            self.origin_ns,
            &self.boot_id,
            &self.counters,
        )
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
