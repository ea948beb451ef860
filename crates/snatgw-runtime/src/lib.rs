//! snatgw-runtime: the gateway's runtime as a library (issue #16), generic over
//! [`snatgw_io::PacketIo`], so the same code runs on TUN queues in `snatgw run` and on
//! [`snatgw_io::MemIo`] in tests without root.
//!
//! - [`runtime`]: [`Runtime`], one worker thread per queue (direction by the side a queue is
//!   on, SPEC R9.1), the housekeeping tick (timers in bounded steps, R9.4; events, R6.2, under
//!   a log rate cap, R9.3), the stats snapshot, an orderly shutdown; [`Clock`];
//! - [`fastpath`]: the kernel fast path joined to the engine (issue #9);
//! - [`probe`]: the health prober (SPEC R5.2);
//! - [`record`]: the flow recorder (`snatgw run --record`, the planner's trace format);
//! - [`stats`]: the stats snapshot (`--stats-file`) and its rendering (`snatgw stats`);
//! - [`logcap`]: the event log's rate cap (R9.3);
//! - [`persist`]: the state file a restart restores flows from (SPEC R11.1);
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
pub mod stats;

pub use runtime::{
    Clock, Parts, Runtime, RuntimeError, RuntimeOptions, StopHandle, Wake, PACKET_EXPIRY_BUDGET,
    TICK,
};
