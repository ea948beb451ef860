//! snatgw-control: the control plane of a running gateway (issue #8).
//!
//! - [`api`]: the REST API (`/api/v1/...`, ARM-style resource names, JSON, ETags, bearer
//!   auth, `/metrics`, `/openapi.json`, `/healthz`) and [`serve`], which runs it on its own
//!   thread and tokio runtime so the synchronous gateway can start it;
//! - [`store`]: where the desired topology lives between runs ([`RedbStore`], one atomic
//!   write transaction per accepted change) and [`seed`] (the store wins over the config file);
//! - [`backend`]: the running gateway as the API sees it ([`Backend`], [`GatewayBackend`]
//!   over `Mutex<Gateway>`, the [`EventLog`]), with bounded work under the data-path lock
//!   (SPEC R9.4);
//! - [`view`]: the one JSON view of the engine's instance reports, events, flows and ports
//!   ([`InstancePorts`], [`EventRecord`], [`FlowRecord`], ...), converted from the engine's
//!   types in one place and shared by the API, `/metrics`, the stats file and the CLI;
//! - [`metrics`]: Prometheus text (SPEC R6.1) from a [`MetricsSnapshot`];
//! - [`client`]: the blocking client the `snatgw` CLI uses;
//! - [`error`]: the error enums and the `{error, field, rule}` body.
//!
//! A change goes validate ([`snatgw_core::Topology::from_config`]) → engine check (R1.3,
//! R2.8) → save → apply (R1.4, R2.9–R2.11); a refused change changes nothing. This crate
//! does not touch packets: the data plane (`snatgw-dataplane`) does.
//!
//! Starting it from synchronous code:
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use snatgw_control::{seed, serve, ControlPlane, EventLog, GatewayBackend, RedbStore};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let file = snatgw_core::ConfigFile::default();
//! let store = Arc::new(RedbStore::open(std::path::Path::new("/var/lib/snatgw"))?);
//! let start = seed(&*store, &file)?; // the store wins if it holds a topology
//! let topo = snatgw_core::Topology::from_config(start.stored.config.clone())?;
//! let gw = snatgw_dataplane::Gateway::new(snatgw_core::Engine::new(topo, 0)?);
//! let gateway = Arc::new(Mutex::new(gw));
//! let events = Arc::new(EventLog::new()); // the housekeeping loop pushes drained events here
//! let backend = Arc::new(GatewayBackend::new(gateway.clone(), events.clone(), || 0));
//! let plane = ControlPlane::new(backend, store, None, start.stored);
//! let server = serve("127.0.0.1:7070".parse()?, plane)?;
//! // ... run the gateway ...
//! server.shutdown()?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod api;
pub mod backend;
pub mod body;
pub mod client;
pub mod error;
pub mod metrics;
pub mod server;
pub mod store;
pub mod view;

pub use api::{openapi, Adopted, ControlPlane, Follower, Resource};
pub use backend::{
    Backend, EventLog, FleetGauges, FleetGaugesSource, FlowQuery, GatewayBackend, MetricsSnapshot,
    TakeoverHoldMetrics,
};
pub use client::{Client, ResourceKind, Tagged};
pub use error::{ApiError, ClientError, ControlError, StoreError};
pub use server::{read_token_file, serve, serve_with, ServerHandle, ServerLimits};
pub use store::{seed, MemoryStore, RedbStore, SeedSource, Seeded, Store, Stored};
pub use view::{
    EventRecord, FlowPage, FlowRecord, InboundFlowPage, InboundFlowRecord, InstancePorts,
    PerProtocol, PortRange,
};
