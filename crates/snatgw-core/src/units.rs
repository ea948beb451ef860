//! Shared primitives of the model: engine time and the SNAT port range.
//!
//! What it does: defines the few types and constants that several modules of this crate
//! (`engine`, `aggregate`, `policy`) and its users all speak in, so that none of those modules
//! has to import another for them. It is a leaf: it imports nothing from this crate.
//!
//! What it does not do: any logic. How time advances is the engine's (`engine::timers`); how
//! the port range is cut into chunks and blocks is `engine::ports`'. The old paths
//! (`engine::Time`, `engine::PORT_BASE`, `snatgw_core::Time`) re-export these.

/// Engine time: whole seconds since an arbitrary epoch, never decreasing.
pub type Time = u32;

/// First port of every public IP's SNAT range 1024–65535 (SPEC R2.4 decision). Inbound
/// load-balancing rules on a public IP used for PAT take frontend ports below it (R2.2).
pub const PORT_BASE: u16 = 1024;
