//! snatgw-planner: predicts SNAT port exhaustion before deploying, and says which mitigation
//! fixes it (issue #11, SPEC §8).
//!
//! A workload — a recorded or written trace (`trace`, the format in docs/PLANNER.md), or a
//! generator of a classic pattern (`generate`) — is replayed in virtual time through the
//! gateway's own engine (`snatgw_core::Engine`, sans-IO) against a topology (`replay`), which
//! reports per instance and destination the peak used ports against the preallocation, the
//! first exhaustion, failed and broken flows and ports reclaimed by tier changes (`report`).
//! Mitigations (`mitigate`) transform the workload and/or the topology and are compared side
//! by side; `plot` draws used ports over time as SVG. `record` turns the engine's flow journal
//! into trace records (the gateway's `snatgw run --record`).
//!
//! This crate does no network I/O and reads no clock; files are read and written by the
//! caller (the `snatgw plan` command).
#![forbid(unsafe_code)]

pub mod error;
pub mod generate;
pub mod mitigate;
pub mod plot;
pub mod record;
pub mod replay;
pub mod report;
pub mod topo;
pub mod trace;

pub use error::{NotApplicable, PlanError, TopoError};
pub use generate::Generator;
pub use mitigate::{what_if, what_if_table, Mitigation, WhatIf};
pub use record::TraceRecorder;
pub use replay::{replay, Options};
pub use report::{DestResult, InstanceResult, Report, Timeline};
pub use trace::{Dest, End, EvKind, FlowSpec, Retry, Workload};
