//! snatgw-control: the control plane of a running gateway (issue #8).
//!
//! - [`store`]: where the desired topology lives between runs ([`RedbStore`], one atomic
//!   write transaction per accepted change) and [`seed`] (the store wins over the config file);
//! - [`error`]: the error enums and the `{error, field, rule}` body of the API.
//!
//! The REST API, the backend over the running gateway, metrics and the client follow.
#![forbid(unsafe_code)]

pub mod error;
pub mod store;

pub use error::{ApiError, ClientError, ControlError, StoreError};
pub use store::{seed, MemoryStore, RedbStore, SeedSource, Seeded, Store, Stored};
