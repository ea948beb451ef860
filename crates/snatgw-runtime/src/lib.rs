//! snatgw-runtime: the gateway's runtime as a library (issue #16), generic over
//! [`snatgw_io::PacketIo`], so the same code runs on TUN queues in `snatgw run` and on
//! [`snatgw_io::MemIo`] in tests without root.
//!
//! - [`runtime`]: [`Runtime`], one worker thread per queue (direction by the side a queue is
//!   on, SPEC R9.1), the housekeeping tick (timers in bounded steps, R9.4; events, R6.2, under
//!   a log rate cap, R9.3), the stats snapshot, an orderly shutdown; [`Clock`]; a fleet
//!   node's hooks (SPEC R10.3, R10.4): steering refused packets ([`Steer`]), injecting the
//!   packets other nodes steered here ([`Injector`]) and the flow journal tap ([`FleetHooks`]);
//! - [`fastpath`]: the kernel fast path joined to the engine (issue #9);
//! - [`stash`]: port stashes the kernel opens new TCP flows from (issue #17);
//! - [`probe`]: the health prober (SPEC R5.2);
//! - [`record`]: the flow recorder (`snatgw run --record`, the planner's trace format);
//! - [`stats`]: the stats snapshot (`--stats-file`) and its rendering (`snatgw stats`);
//! - [`logcap`]: the event log's rate cap (R9.3);
//! - [`persist`]: the state file a restart restores flows from (SPEC R11.1), and the periodic
//!   flow-state export a fleet node replicates (R10.4);
//! - [`config`]: loading a configuration file, and the engine a running gateway uses.
//!
//! What it does not do: parse arguments, open devices, seed the store, serve the API or
//! handle signals: the `snatgw` binary does, and hands this crate an engine and its queues.
#![forbid(unsafe_code)]

pub mod config;
pub mod fastpath;
pub mod logcap;
pub mod persist;
pub mod probe;
pub mod record;
pub mod runtime;
pub mod stash;
pub mod stats;

pub use fastpath::JournalTap;
pub use runtime::{
    Clock, FleetHooks, Injector, Parts, Runtime, RuntimeError, RuntimeOptions, Steer, StopHandle,
    Wake, INBOX_BYTES, INBOX_CAP, INJECT_POLL, PACKET_EXPIRY_BUDGET, TICK,
};
pub use stats::FleetSnap;
