//! snatgw-control: the control plane of a running gateway (issue #8).
//!
//! - [`store`]: where the desired topology lives between runs ([`RedbStore`], one atomic
//!   write transaction per accepted change) and [`seed`] (the store wins over the config file);
//! - [`backend`]: the running gateway as the API sees it ([`Backend`], [`GatewayBackend`]
//!   over `Mutex<Gateway>`, the [`EventLog`]), with bounded work under the data-path lock
//!   (SPEC R9.4);
//! - [`metrics`]: Prometheus text (SPEC R6.1) from a [`MetricsSnapshot`];
//! - [`error`]: the error enums and the `{error, field, rule}` body of the API.
//!
//! The REST API and the client follow.
#![forbid(unsafe_code)]

pub mod backend;
pub mod error;
pub mod metrics;
pub mod store;

pub use backend::{
    Backend, EventLog, EventRecord, FlowPage, FlowQuery, FlowRecord, GatewayBackend,
    InstancePorts, MetricsSnapshot,
};
pub use error::{ApiError, ClientError, ControlError, StoreError};
pub use store::{seed, MemoryStore, RedbStore, SeedSource, Seeded, Store, Stored};
