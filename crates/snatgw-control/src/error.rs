//! Errors of the control plane, and the JSON error body of the API.
//!
//! [`StoreError`] is what a [`crate::store::Store`] returns, [`ControlError`] what starting the
//! server returns, [`ClientError`] what the blocking client returns, and [`ApiError`] the body
//! of every non-2xx answer: `{"error": "...", "field": "..." | null, "rule": "R2.8" | null}`.
//! [`config_error_body`] maps a [`ConfigError`] to that body and its HTTP status (400 for a bad
//! field of the request, 409 for a conflict with the rest of the topology, such as a
//! redeploy's reported size outside the deployment's actual size..twice it), naming the field
//! and the SPEC rule the error carries. This module does no I/O.

use serde::{Deserialize, Serialize};
use snatgw_core::{ConfigError, Rule};

/// Why the store could not load or save the desired state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store's directory or file could not be created or opened.
    #[error("store {path}: {message}")]
    Open {
        /// The file or directory.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The database refused a read or a write (I/O error, corruption, lock).
    #[error("store: {0}")]
    Database(String),
    /// The stored bytes are not a valid JSON `Stored` record.
    #[error("store: stored state is not valid: {0}")]
    Corrupt(String),
    /// A shared store (a fleet's etcd) did not answer: nothing was saved. The API answers
    /// 503 naming the store (SPEC R10.5: the data path goes on, topology changes wait).
    #[error("{store} unreachable: {message}")]
    Unreachable {
        /// Which store, for people (`etcd`).
        store: String,
        /// What the client saw (timeout, connection refused, ...).
        message: String,
    },
    /// Another node of the fleet saved a topology first: the store holds generation
    /// `stored`, this save was generation `attempted`, so it was not written (the API
    /// answers 409 Conflict; the other node's topology reaches this node by the store's
    /// watch, R10.1).
    #[error("{store} holds generation {stored}, written through another node; this change would have been generation {attempted}: read the topology again and retry")]
    Conflict {
        /// Which store (`etcd`).
        store: String,
        /// The generation the store holds.
        stored: u64,
        /// The generation this save carried.
        attempted: u64,
    },
}

/// Why the control plane could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Binding a non-loopback address without a token would expose the API to anyone.
    #[error("refusing to serve the API on {0} without a token: pass --token-file, or bind a loopback address such as 127.0.0.1")]
    InsecureBind(std::net::SocketAddr),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {message}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The OS error.
        message: String,
    },
    /// The token file could not be read or is empty.
    #[error("token file {path}: {message}")]
    Token {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The async runtime or the server thread could not be started.
    #[error("control plane runtime: {0}")]
    Runtime(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The JSON body of every error answer of the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiError {
    /// What went wrong, for people.
    pub error: String,
    /// Path of the offending field, such as `instance[vm1].public_ip`, if known.
    pub field: Option<String>,
    /// The SPEC rule that refused the change, such as `R2.8`, if any.
    pub rule: Option<String>,
}

impl ApiError {
    /// An error without field or rule.
    pub fn msg(error: impl Into<String>) -> ApiError {
        ApiError {
            error: error.into(),
            field: None,
            rule: None,
        }
    }

    /// An error naming a field.
    pub fn field(error: impl Into<String>, field: impl Into<String>) -> ApiError {
        ApiError {
            error: error.into(),
            field: Some(field.into()),
            rule: None,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)?;
        match (&self.field, &self.rule) {
            (Some(fl), Some(r)) => write!(f, " (field {fl}, rule {r})"),
            (Some(fl), None) => write!(f, " (field {fl})"),
            (None, Some(r)) => write!(f, " (rule {r})"),
            (None, None) => Ok(()),
        }
    }
}

/// Why a request of the blocking client failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with an error status and its JSON error body.
    #[error("HTTP {status}: {body}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The server's `{error, field, rule}`.
        body: ApiError,
    },
    /// The request did not reach the server or the answer did not arrive (connection, timeout).
    #[error("request failed: {0}")]
    Transport(String),
    /// The answer was not what the route returns.
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// The request could not be built (for example a body that does not serialise).
    #[error("bad request: {0}")]
    Request(String),
}

impl ClientError {
    /// The HTTP status, for an error answer of the server.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Whether a refused configuration is the request's own fault (400) or a conflict with the
/// rest of the topology (409). A redeploy's reported size (R2.11) is a conflict: whether it
/// is allowed depends on how many instances the deployment has (between that and twice it).
pub fn config_error_status(e: &ConfigError) -> u16 {
    match e {
        _ if e.rule() == Some(Rule::new(2, 11)) => 409,
        ConfigError::Parse(_)
        | ConfigError::Invalid { .. }
        | ConfigError::WebWorkerRoleIlpip { .. }
        | ConfigError::Model { .. } => 400,
        ConfigError::DuplicateName { .. }
        | ConfigError::DuplicateAddress { .. }
        | ConfigError::UnknownReference { .. }
        | ConfigError::PoolTooLarge { .. }
        | ConfigError::EmptyDefaultPool { .. } => 409,
        _ => 400,
    }
}

/// The field path a [`ConfigError`] names, if any.
pub fn config_error_field(e: &ConfigError) -> Option<String> {
    match e {
        ConfigError::Parse(_) => None,
        ConfigError::Invalid { field, .. }
        | ConfigError::DuplicateName { field, .. }
        | ConfigError::DuplicateAddress { field, .. }
        | ConfigError::UnknownReference { field, .. }
        | ConfigError::WebWorkerRoleIlpip { field }
        | ConfigError::PoolTooLarge { field, .. }
        | ConfigError::Model { field, .. } => Some(field.clone()),
        ConfigError::EmptyDefaultPool { .. } => Some("gateway.default_snat_pool".into()),
        _ => None,
    }
}

/// The SPEC rule behind a [`ConfigError`], if any ([`ConfigError::rule`]: the error carries
/// it as a value, set where it was refused).
pub fn config_error_rule(e: &ConfigError) -> Option<String> {
    e.rule().map(|r| r.to_string())
}

/// The API's status and error body for a refused configuration.
pub fn config_error_body(e: &ConfigError) -> (u16, ApiError) {
    (
        config_error_status(e),
        ApiError {
            error: e.to_string(),
            field: config_error_field(e),
            rule: config_error_rule(e),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_map_to_status_field_and_rule() {
        let e = ConfigError::WebWorkerRoleIlpip {
            field: "instance[r].public_ip".into(),
        };
        let (s, b) = config_error_body(&e);
        assert_eq!(s, 400);
        assert_eq!(b.field.as_deref(), Some("instance[r].public_ip"));
        assert_eq!(b.rule.as_deref(), Some("R1.5"));
        let e = ConfigError::Invalid {
            field: "deployment[cs].redeploy_reported_instances".into(),
            value: "9".into(),
            reason: "while redeploying, the reported pool is between the actual size (1) and twice it (SPEC R2.11)".into(),
            rule: Some(Rule::new(2, 11)),
        };
        let (s, b) = config_error_body(&e);
        assert_eq!((s, b.rule.as_deref()), (409, Some("R2.11")));
        let e = ConfigError::Invalid {
            field: "gateway.vnet_prefixes[0]".into(),
            value: "10.0.0.1/16".into(),
            reason: "host bits are set".into(),
            rule: None,
        };
        assert_eq!(config_error_status(&e), 400);
        let e = ConfigError::UnknownReference {
            field: "instance[a].public_ip".into(),
            what: "public IP",
            name: "p".into(),
        };
        let (s, b) = config_error_body(&e);
        assert_eq!((s, b.rule), (409, None));
        let (s, b) = config_error_body(&ConfigError::EmptyDefaultPool {
            count: 1,
            example: "a".into(),
        });
        assert_eq!(
            (s, b.field.as_deref(), b.rule.as_deref()),
            (409, Some("gateway.default_snat_pool"), Some("R1.3"))
        );
    }
}
