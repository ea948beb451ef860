//! Where the desired topology lives between runs: the [`Store`] trait, [`RedbStore`] (an
//! embedded redb database, the default) and [`MemoryStore`] (tests).
//!
//! The desired state is one record, [`Stored`]: the accepted `ConfigFile` and its generation
//! (how many writes were accepted; 1 for the seed). A save replaces the whole record in one
//! transaction, so after a crash the store holds the old record or the new one, never a mix
//! (`RedbStore`: one redb write transaction per save, JSON of `Stored` under one key of one
//! table, committed with immediate durability). [`seed`] decides at start whether the store or
//! the config file wins (the store, when it has a state).
//!
//! This module does not validate topologies (the API does, SPEC R1.x–R2.x, before it saves)
//! and does not apply them. A later issue adds etcd behind the same trait, so it stays small.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, TableDefinition, TableError};
use serde::{Deserialize, Serialize};
use snatgw_core::ConfigFile;

use std::net::Ipv4Addr;

use snatgw_core::topology::SnatGroup;

use crate::error::StoreError;

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
}
