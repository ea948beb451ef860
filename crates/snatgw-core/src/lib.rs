//! snatgw-core: the sans-IO SNAT/PAT engine.
//!
//! Given a validated [`Topology`] and packet facts ([`Packet`]), the [`Engine`] returns a
//! [`Verdict`] for every packet and keeps the flow table, port preallocation and timers that
//! SPEC §1–§3 describe. It never reads a clock, opens a socket or spawns a thread; time is an
//! argument and randomness is seeded, so the gateway and the planner run the same code and
//! every timer is testable to the second. Packet bytes are `snatgw-wire`'s job.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod bits;
pub mod chunked;
pub mod config;
pub mod engine;
pub mod error;
pub mod hash;
pub mod packet;
pub mod policy;
pub mod topology;
pub mod units;

pub use config::{ConfigFile, InstanceKind, Model};
pub use engine::{
    tier_ports, ActivitySource, Admission, ApplyReport, EndCause, Engine, Event, EventKind,
    FlowChange, FlowFilter, FlowKey, FlowView, GlobalStats, InstanceReport, InstanceStats,
    LimitScope, PortFenceStats, ReclaimReason, Scenario, StashGrant, StashKey, StashOpen,
    StashStats, TakeoverHoldStats, Time, AGGREGATE_KEYS, EXPIRY_BUDGET, JOURNAL_CAP,
    TAKEOVER_HOLDS_PER_PORT,
};
pub use error::{ConfigError, InvariantError, Rule};
pub use packet::{proto, tcp_flags, Direction, DropReason, Packet, Verdict, L4};
pub use topology::Topology;
