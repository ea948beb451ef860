//! Where the desired topology lives between runs: the [`Store`] trait, [`RedbStore`] (an
//! embedded redb database, the default) and [`MemoryStore`] (tests).
//!
//! The desired state is one record, [`Stored`]: the accepted `ConfigFile` and its generation
//! (how many writes were accepted; 1 for the seed). A save replaces the whole record in one
//! transaction, so after a crash the store holds the old record or the new one, never a mix
//! (`RedbStore`: one redb write transaction per save, JSON of `Stored` under one key of one
//! table, committed with immediate durability). [`seed`] decides at start whether the store or
//! the config file wins (the store, when it has a state); [`topology_diff`] names what a
//! configuration file changes against the stored topology, for the warning `snatgw run` logs
//! when the file is not the one running (and for `snatgw run --config-wins`).
//!
//! The state directory also holds the API's bearer token ([`TOKEN_FILE`], written by `snatgw
//! run`) and, in the same redb table, the event sequence floor
//! ([`RedbStore::event_seq_floor`], [`event_seq_start`]): event numbers never repeat across
//! restarts, even when the wall clock steps back.
//!
//! This module does not validate topologies (the API does, SPEC R1.x–R2.x, before it saves)
//! and does not apply them. A fleet's store (etcd, crate `snatgw-fleet`) implements the same
//! trait and reports what only a shared store can: `StoreError::Unreachable` and
//! `StoreError::Conflict` (another node saved first).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, TableDefinition, TableError};
use serde::{Deserialize, Serialize};
use snatgw_core::ConfigFile;

use std::net::Ipv4Addr;

use snatgw_core::topology::SnatGroup;

use crate::error::StoreError;

/// The state directory `snatgw run` and the API subcommands of the CLI use by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/snatgw";

/// The file in the state directory holding the API's bearer token when `snatgw run` is not
/// given `--token-file` (generated on first start, mode 0600, reused afterwards); the CLI
/// reads it from there by default.
pub const TOKEN_FILE: &str = "api-token";

/// The desired state as saved: the accepted topology and its generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// Accepted writes so far (1 for the seed); grows by one per accepted change.
    pub generation: u64,
    /// The desired topology.
    pub config: ConfigFile,
    /// The default-SNAT address designated to each sharing group when this topology was
    /// accepted (R1.3). Designations are kept across changes, so they depend on the order in
    /// which groups joined; a restart passes them back to the engine
    /// ([`snatgw_core::Engine::with_designations`]) so every group keeps its public IP.
    #[serde(default)]
    pub designations: Vec<(SnatGroup, Ipv4Addr)>,
}

impl Stored {
    /// The designations as the engine takes them.
    pub fn engine_designations(&self) -> Vec<(SnatGroup, u32)> {
        self.designations
            .iter()
            .map(|(g, a)| (g.clone(), u32::from(*a)))
            .collect()
    }

    /// Sets the designations from the engine's.
    pub fn set_designations(&mut self, d: &[(SnatGroup, u32)]) {
        self.designations = d
            .iter()
            .map(|(g, a)| (g.clone(), Ipv4Addr::from(*a)))
            .collect();
    }
}

/// A place that keeps the desired state.
pub trait Store: Send + Sync + 'static {
    /// The last saved state, if any.
    fn load(&self) -> Result<Option<Stored>, StoreError>;
    /// Replaces the state atomically (old or new after a crash, never a mix).
    fn save(&self, s: &Stored) -> Result<(), StoreError>;
}

/// The file name of the database inside the state directory.
pub const REDB_FILE: &str = "snatgw.redb";
const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const KEY: &str = "topology";
/// Key of the event sequence floor (8 bytes, little-endian) in the same table.
const EVENT_SEQ_KEY: &str = "event_seq_floor";

/// Sequence numbers `snatgw run` reserves ahead in the store: the persisted floor is kept at
/// least this far above the last number issued (renewed when half is used), so a run that
/// dies without a clean shutdown cannot have issued a number the next run gives again.
pub const EVENT_SEQ_RESERVE: u64 = 1_000_000;

/// The number a run's event log starts *after* (its first event gets this + 1): the wall
/// clock in microseconds, so numbers grow across restarts, but never below the persisted
/// `floor` (every number up to it may have been issued), so a clock stepped back cannot make
/// a run reuse numbers.
pub fn event_seq_start(wall_clock_us: u64, floor: u64) -> u64 {
    wall_clock_us.max(floor)
}

/// The desired state in an embedded redb database, `DIR/snatgw.redb`.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) `dir/snatgw.redb`, creating `dir` if needed. A database left by a
    /// crash is recovered by redb to its last committed transaction.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        let path = dir.join(REDB_FILE);
        let db = Database::create(&path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(RedbStore { db, path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The event sequence floor: every event number up to it may have been issued by an
    /// earlier run (0 when none was saved). See [`event_seq_start`].
    pub fn event_seq_floor(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(db_err(e)),
        };
        let Some(v) = table.get(EVENT_SEQ_KEY).map_err(db_err)? else {
            return Ok(0);
        };
        let bytes: [u8; 8] = v.value().try_into().map_err(|_| {
            StoreError::Corrupt(format!(
                "{EVENT_SEQ_KEY}: {} bytes, expected 8",
                v.value().len()
            ))
        })?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Saves the event sequence floor (one durable write transaction; the topology record
    /// is untouched).
    pub fn save_event_seq_floor(&self, floor: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(TABLE).map_err(db_err)?;
            table
                .insert(EVENT_SEQ_KEY, floor.to_le_bytes().as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Option<Stored>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db_err(e)),
        };
        let Some(v) = table.get(KEY).map_err(db_err)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    fn save(&self, s: &Stored) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(s).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        // One write transaction: the old record stays until commit makes the new one durable.
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(TABLE).map_err(db_err)?;
            table.insert(KEY, bytes.as_slice()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }
}

/// The desired state in memory (tests; lost when dropped).
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<Option<Stored>>,
    fail_saves: std::sync::atomic::AtomicBool,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// A store holding `s`.
    pub fn with(s: Stored) -> MemoryStore {
        MemoryStore {
            state: Mutex::new(Some(s)),
            fail_saves: Default::default(),
        }
    }

    /// Makes every later save fail (to test that a failed save changes nothing).
    pub fn fail_saves(&self, fail: bool) {
        self.fail_saves
            .store(fail, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Option<Stored>, StoreError> {
        Ok(self.state.lock().map_err(db_err)?.clone())
    }

    fn save(&self, s: &Stored) -> Result<(), StoreError> {
        if self.fail_saves.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Database("save refused (test)".into()));
        }
        *self.state.lock().map_err(db_err)? = Some(s.clone());
        Ok(())
    }
}

/// Where the state the gateway starts with came from (see [`seed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SeedSource {
    /// The store held a state: it wins and the config file is ignored.
    Store,
    /// The store was empty: the config file became generation 1 and was saved.
    ConfigFile,
}

/// The state to start with, and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Seeded {
    /// The state.
    pub stored: Stored,
    /// Where it came from (the caller logs that the config file is ignored for `Store`).
    pub source: SeedSource,
}

/// The state the gateway starts with: the store's, if it holds one (the config file is then
/// only a seed and is ignored); else `config_file` as generation 1, saved.
pub fn seed(store: &dyn Store, config_file: &ConfigFile) -> Result<Seeded, StoreError> {
    if let Some(stored) = store.load()? {
        return Ok(Seeded {
            stored,
            source: SeedSource::Store,
        });
    }
    let stored = Stored {
        generation: 1,
        config: config_file.clone(),
        designations: Vec::new(),
    };
    store.save(&stored)?;
    Ok(Seeded {
        stored,
        source: SeedSource::ConfigFile,
    })
}

/// What `file` changes against the `stored` topology, one entry per difference, for people:
/// gateway settings by field (`gateway.idle_timeout_secs changed`), then every collection in
/// the config file's order (`public_ip`, `availability_set`, `deployment`, `instance`,
/// `load_balancer`, `nsg`) by resource name: `instance[vm3] changed` or `removed` (in the
/// stored order), then `public_ip[p9] added` (in the file's order). Empty when they are equal;
/// `order of resources changed` when only the order differs.
pub fn topology_diff(stored: &ConfigFile, file: &ConfigFile) -> Vec<String> {
    let mut out = Vec::new();
    if stored.gateway != file.gateway {
        let fields = |g: &snatgw_core::config::GatewayCfg| match serde_json::to_value(g) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let (a, b) = (fields(&stored.gateway), fields(&file.gateway));
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let before = out.len();
        for k in keys {
            if a.get(k) != b.get(k) {
                out.push(format!("gateway.{k} changed"));
            }
        }
        if out.len() == before {
            out.push("gateway settings changed".into());
        }
    }
    named_diff(
        &mut out,
        "public_ip",
        &stored.public_ip,
        &file.public_ip,
        |r| &r.name,
    );
    named_diff(
        &mut out,
        "availability_set",
        &stored.availability_set,
        &file.availability_set,
        |r| &r.name,
    );
    named_diff(
        &mut out,
        "deployment",
        &stored.deployment,
        &file.deployment,
        |r| &r.name,
    );
    named_diff(
        &mut out,
        "instance",
        &stored.instance,
        &file.instance,
        |r| &r.name,
    );
    named_diff(
        &mut out,
        "load_balancer",
        &stored.load_balancer,
        &file.load_balancer,
        |r| &r.name,
    );
    named_diff(&mut out, "nsg", &stored.nsg, &file.nsg, |r| &r.name);
    if out.is_empty() && stored != file {
        out.push("order of resources changed".into());
    }
    out
}

/// One collection of [`topology_diff`].
fn named_diff<T: PartialEq>(
    out: &mut Vec<String>,
    label: &str,
    stored: &[T],
    file: &[T],
    name: impl Fn(&T) -> &String,
) {
    for s in stored {
        match file.iter().find(|f| name(f) == name(s)) {
            None => out.push(format!("{label}[{}] removed", name(s))),
            Some(f) if f != s => out.push(format!("{label}[{}] changed", name(s))),
            Some(_) => {}
        }
    }
    for f in file {
        if !stored.iter().any(|s| name(s) == name(f)) {
            out.push(format!("{label}[{}] added", name(f)));
        }
    }
}

/// The first `cap` entries of a [`topology_diff`] joined with `, `, and `and N more` for the
/// rest (at least one entry is shown).
pub fn summarize_diff(diff: &[String], cap: usize) -> String {
    let cap = cap.max(1);
    let mut s = diff
        .iter()
        .take(cap)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if diff.len() > cap {
        s.push_str(&format!(" and {} more", diff.len() - cap));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use snatgw_core::config::PublicIpCfg;

    fn state(g: u64) -> Stored {
        let mut config = ConfigFile::default();
        config.gateway.seed = g;
        config.public_ip.push(PublicIpCfg {
            name: format!("pip{g}"),
            address: "203.0.113.1".into(),
        });
        Stored {
            generation: g,
            config,
            designations: vec![(
                snatgw_core::topology::SnatGroup::AvailabilitySet(format!("as{g}")),
                Ipv4Addr::new(192, 0, 2, 1),
            )],
        }
    }

    #[test]
    fn redb_round_trip_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = RedbStore::open(dir.path()).expect("open");
            assert_eq!(s.load().expect("load"), None);
            s.save(&state(1)).expect("save");
            assert_eq!(s.load().expect("load"), Some(state(1)));
            s.save(&state(2)).expect("save");
            assert_eq!(s.load().expect("load"), Some(state(2)));
        }
        let s = RedbStore::open(dir.path()).expect("reopen");
        assert_eq!(s.load().expect("load"), Some(state(2)));
        assert!(s.path().ends_with(REDB_FILE));
    }

    #[test]
    fn memory_round_trip() {
        let s = MemoryStore::new();
        assert_eq!(s.load().expect("load"), None);
        s.save(&state(3)).expect("save");
        assert_eq!(s.load().expect("load"), Some(state(3)));
        s.fail_saves(true);
        assert!(s.save(&state(4)).is_err());
        assert_eq!(s.load().expect("load"), Some(state(3)));
    }

    #[test]
    fn seed_prefers_the_store() {
        let s = MemoryStore::new();
        let file = state(9).config;
        let first = seed(&s, &file).expect("seed");
        assert_eq!(first.source, SeedSource::ConfigFile);
        assert_eq!(first.stored.generation, 1);
        assert_eq!(s.load().expect("load"), Some(first.stored.clone()));
        s.save(&state(5)).expect("save");
        let again = seed(&s, &file).expect("seed");
        assert_eq!(again.source, SeedSource::Store);
        assert_eq!(again.stored, state(5));
    }

    fn toml(t: &str) -> ConfigFile {
        ConfigFile::from_toml(t).expect("toml")
    }

    const A: &str = r#"
[gateway]
seed = 1
default_snat_pool = ["192.0.2.10"]

[[public_ip]]
name = "p1"
address = "203.0.113.1"

[[public_ip]]
name = "p2"
address = "203.0.113.2"

[[availability_set]]
name = "as1"

[[instance]]
name = "vm1"
private_ip = "10.0.1.1"
availability_set = "as1"

[[instance]]
name = "vm2"
private_ip = "10.0.1.2"

[[instance]]
name = "vm3"
private_ip = "10.0.1.3"
public_ip = "p1"
"#;

    #[test]
    fn topology_diff_names_each_change_by_collection_and_name() {
        let a = toml(A);
        assert_eq!(topology_diff(&a, &a), Vec::<String>::new());
        // B: seed and idle timeout changed, p2 removed, p9 added, vm3 changed (no ILPIP),
        // vm2 removed, vm4 added, a set added.
        let b = toml(
            r#"
[gateway]
seed = 2
idle_timeout_secs = 90
default_snat_pool = ["192.0.2.10"]

[[public_ip]]
name = "p1"
address = "203.0.113.1"

[[public_ip]]
name = "p9"
address = "203.0.113.9"

[[availability_set]]
name = "as1"

[[availability_set]]
name = "as2"

[[instance]]
name = "vm4"
private_ip = "10.0.1.4"

[[instance]]
name = "vm1"
private_ip = "10.0.1.1"
availability_set = "as1"

[[instance]]
name = "vm3"
private_ip = "10.0.1.3"
"#,
        );
        assert_eq!(
            topology_diff(&a, &b),
            vec![
                "gateway.idle_timeout_secs changed",
                "gateway.seed changed",
                "public_ip[p2] removed",
                "public_ip[p9] added",
                "availability_set[as2] added",
                "instance[vm2] removed",
                "instance[vm3] changed",
                "instance[vm4] added",
            ]
        );
        // The other way round: added and removed swap, the same changes.
        assert_eq!(
            topology_diff(&b, &a),
            vec![
                "gateway.idle_timeout_secs changed",
                "gateway.seed changed",
                "public_ip[p9] removed",
                "public_ip[p2] added",
                "availability_set[as2] removed",
                "instance[vm4] removed",
                "instance[vm3] changed",
                "instance[vm2] added",
            ]
        );
        // Only the order of two instances differs.
        let mut c = a.clone();
        c.instance.swap(0, 1);
        assert_eq!(topology_diff(&a, &c), vec!["order of resources changed"]);
        // An optional gateway field that is absent on one side.
        let mut d = a.clone();
        d.gateway.inbound_idle_timeout_secs = Some(30);
        assert_eq!(
            topology_diff(&a, &d),
            vec!["gateway.inbound_idle_timeout_secs changed"]
        );
    }

    #[test]
    fn summarize_diff_caps_the_list() {
        let d: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(summarize_diff(&d, 10), "a, b, c, d");
        assert_eq!(summarize_diff(&d, 4), "a, b, c, d");
        assert_eq!(summarize_diff(&d, 2), "a, b and 2 more");
        assert_eq!(summarize_diff(&d, 0), "a and 3 more");
        assert_eq!(summarize_diff(&[], 3), "");
    }

    #[test]
    fn event_seq_floor_persists_beside_the_topology() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = RedbStore::open(dir.path()).expect("open");
            assert_eq!(s.event_seq_floor().expect("floor"), 0);
            s.save(&state(1)).expect("save");
            s.save_event_seq_floor(1_700_000_000_000_123)
                .expect("save floor");
            assert_eq!(
                s.load().expect("load"),
                Some(state(1)),
                "topology untouched"
            );
        }
        let s = RedbStore::open(dir.path()).expect("reopen");
        assert_eq!(s.event_seq_floor().expect("floor"), 1_700_000_000_000_123);
        s.save_event_seq_floor(5).expect("lower");
        assert_eq!(s.event_seq_floor().expect("floor"), 5);
    }

    #[test]
    fn event_seq_start_never_goes_below_the_floor() {
        // A normal restart: the wall clock is ahead of everything issued.
        assert_eq!(event_seq_start(2_000_000, 1_500_000), 2_000_000);
        // The clock stepped back below numbers an earlier run issued: the floor wins.
        assert_eq!(event_seq_start(1_000_000, 1_500_000), 1_500_000);
        // No clock (before 1970) and no floor: from 1.
        assert_eq!(event_seq_start(0, 0), 0);
        let log = crate::EventLog::starting_after(event_seq_start(1_000_000, 1_500_000), 4);
        assert_eq!(log.last_seq(), 1_500_000);
    }
}
