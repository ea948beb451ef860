//! [`FleetError`], what every fleet operation returns when it fails.
//!
//! The variants separate what a caller must do differently: [`FleetError::Unreachable`] means
//! "keep translating within the blocks you hold while your lease is valid, refuse topology
//! changes" (R10.5); [`FleetError::LeaseExpired`] means "your lease is gone at the store: you
//! already self-fenced, join again" (R10.2); [`FleetError::Held`] and
//! [`FleetError::Conflict`] mean "someone else holds or changed the grant: read again".
//! This module does no I/O.

use crate::coordinator::{Holder, NodeId, Revision};
use std::time::Duration;

/// Why a fleet operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The lease TTL asked for is below the minimum (R10.2: too short a lease makes every
    /// scheduling hiccup a takeover).
    #[error("lease TTL {ttl:?} is below the minimum {min:?}")]
    LeaseTooShort {
        /// The TTL asked for.
        ttl: Duration,
        /// The smallest TTL accepted.
        min: Duration,
    },
    /// The self-fencing margin is zero or leaves no validity (it must be below the TTL).
    #[error("self-fencing margin {margin:?} must be above zero and below the lease TTL {ttl:?}")]
    BadMargin {
        /// The margin asked for.
        margin: Duration,
        /// The lease TTL.
        ttl: Duration,
    },
    /// A node id is empty, too long, or has characters other than `A-Za-z0-9._-`.
    #[error("invalid node id {0:?}: 1 to 64 characters of A-Za-z0-9._-")]
    BadNodeId(String),
    /// The operation needs a lease and this node has not joined (or has left).
    #[error("node {0} has not joined the fleet")]
    NotJoined(NodeId),
    /// The store no longer knows this node's lease: it expired or was revoked. The node has
    /// already stopped translating by its local deadline; it must join again.
    #[error("the lease of node {0} has expired at the store; join again")]
    LeaseExpired(NodeId),
    /// A grant was refused because the grantee's lease is not live at the store (R10.2).
    #[error("grant refused: the lease of node {0} is not live")]
    NotLive(NodeId),
    /// The grant is held by another node (or another lease of this node).
    #[error("{resource} is held by {holder}")]
    Held {
        /// The grant's key.
        resource: String,
        /// Who holds it.
        holder: Holder,
    },
    /// The grant's revision is not the one read: someone wrote it in between (the revision is
    /// the fencing token, R10.2).
    #[error("{resource} changed: expected revision {expected}, found {found}")]
    Conflict {
        /// The grant's key.
        resource: String,
        /// The revision the caller read.
        expected: Revision,
        /// The revision the store holds now.
        found: Revision,
    },
    /// The store could not be reached in time (partition, store down). R10.5: translating
    /// within held blocks goes on while the local lease is valid; changes wait.
    #[error("fleet store unreachable: {0}")]
    Unreachable(String),
    /// A record in the store could not be read as what this crate writes there.
    #[error("fleet store record {key} is not valid: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The store answered with an error this crate has no better name for.
    #[error("fleet store: {0}")]
    Store(String),
}
