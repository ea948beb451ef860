//! Loading a configuration file into a topology, and the engine a running gateway uses.
//!
//! It does not decide between the file and the store (the binary does, with
//! `snatgw_control::seed`), and it does not print anything (`snatgw show` does).

use std::path::{Path, PathBuf};

use snatgw_core::topology::SnatGroup;
use snatgw_core::{ConfigError, Engine, Topology};

/// Why a configuration file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid configuration (the error names the field and the SPEC rule).
    #[error("{}: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What validation refused.
        source: ConfigError,
    },
}

/// Reads and validates a configuration file.
pub fn load_topology(path: &Path) -> Result<Topology, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Topology::from_toml(&text).map_err(|source| LoadError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads a configuration file into an engine at time 0 (hash key from the config's seed:
/// deterministic, for inspection; a running gateway uses [`engine_for_gateway`]).
pub fn load_engine(path: &Path) -> Result<Engine, LoadError> {
    Engine::new(load_topology(path)?, 0).map_err(|source| LoadError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// An engine for a running gateway on `topo`, its flow-table hash keyed with OS entropy, so
/// remote hosts, which choose part of every inbound key, cannot aim at one bucket.
/// `designations` are the default-SNAT designations a store kept (R1.3), so groups keep their
/// public IPs across restarts.
pub fn engine_for_gateway(
    topo: Topology,
    designations: &[(SnatGroup, u32)],
) -> Result<Engine, ConfigError> {
    use std::hash::BuildHasher;
    let key = std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64);
    Engine::with_designations(topo, 0, key, designations)
}
