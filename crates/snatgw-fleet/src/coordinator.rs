//! Membership and ownership (R10.1, R10.2): the [`Coordinator`] trait, the names it uses, and
//! [`LocalView`], what a node consults before translating for a block.
//!
//! The protocol, the same for every implementation:
//! - **Membership.** [`Coordinator::join`] takes a lease and writes the node's key bound to it;
//!   [`Coordinator::renew`] keeps it alive; when the lease ends (expiry or
//!   [`Coordinator::leave`]) the store deletes the node key *and every grant the node holds*,
//!   since grants are bound to the holder's lease too. [`Coordinator::live_nodes`] lists the
//!   node keys.
//! - **Ownership.** Who *should* own an instance is [`crate::rendezvous::owner`] over the live
//!   nodes. Who *does* is a grant: a key per instance or public-IP port block ([`Resource`])
//!   naming the holder and its lease. [`Coordinator::grant`] writes it in one transaction that
//!   succeeds only if the key's revision is still the one the caller read (the revision is
//!   the fencing token: it only grows, so an older holder's token is always smaller) and the
//!   grantee's node key is bound to the grantee's current lease (its lease is live). A grant
//!   held by another live lease is never overwritten: its holder releases it
//!   ([`Coordinator::release`], after it stopped using it) or its lease ends.
//! - **Self-fencing.** A node may translate for a block only while it holds the grant *and* its
//!   [`crate::LocalLease`] is valid ([`LocalView::may_translate`]). The store ends the lease no
//!   earlier than the local view does, so by the time the store frees the grants the holder has
//!   stopped: never two at once (R10.2).
//!
//! This module defines the protocol and the local view; it does no I/O (the implementations
//! are [`crate::mem`] and [`crate::etcd`]) and it does not move flows (R10.4 is `replica` and the binary).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::FleetError;
use crate::lease::{LeaseConfig, LeaseId, LocalLease};
use crate::rendezvous;

/// A node's name in the fleet: 1–64 characters of `A-Za-z0-9._-` (it is part of store keys).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// Checks and wraps a node id.
    pub fn new(id: impl Into<String>) -> Result<NodeId, FleetError> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(NodeId(id))
        } else {
            Err(FleetError::BadNodeId(id))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = FleetError;
    fn try_from(s: String) -> Result<NodeId, FleetError> {
        NodeId::new(s)
    }
}

impl From<NodeId> for String {
    fn from(n: NodeId) -> String {
        n.0
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a grant is for: an instance (and with it its SNAT port blocks), or one public-IP port
/// block on its own.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Resource {
    /// An instance, by name.
    Instance(String),
    /// The port block of a public IP starting at `first_port`.
    Block {
        /// The public IP.
        ip: Ipv4Addr,
        /// The first port of the block.
        first_port: u16,
    },
}

impl Resource {
    /// The grant's key below the fleet's grant prefix (`instance/NAME`, `block/IP/PORT`).
    pub fn key(&self) -> String {
        match self {
            Resource::Instance(name) => format!("instance/{name}"),
            Resource::Block { ip, first_port } => format!("block/{ip}/{first_port}"),
        }
    }

    /// The key rendezvous hashing uses for this resource.
    pub fn rendezvous_key(&self) -> String {
        self.key()
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// A store revision: the fencing token of a grant. 0 means "the key does not exist" (etcd
/// compares a missing key's revision as 0).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Revision(pub i64);

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who holds a grant: a node *and* the lease it held it under (a restarted node has a new
/// lease and does not inherit its previous incarnation's grants).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Holder {
    /// The node.
    pub node: NodeId,
    /// Its lease when it took the grant.
    pub lease: LeaseId,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (lease {})", self.node, self.lease)
    }
}

/// A grant key as read: its holder, if any, and its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRead {
    /// What the grant is for.
    pub resource: Resource,
    /// The holder, `None` when the key does not exist.
    pub holder: Option<Holder>,
    /// The key's modification revision (0 when it does not exist).
    pub revision: Revision,
}

/// A grant this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// What the grant is for.
    pub resource: Resource,
    /// This node and its lease.
    pub holder: Holder,
    /// The revision the grant was written at: its fencing token.
    pub revision: Revision,
}

/// Membership and fenced ownership, as seen by one node (R10.1, R10.2).
///
/// Every method takes `now`, the node's own monotonic time; it is used for the node's local
/// view of its lease ("renewal sent at `now`"), never to decide anything at the store.
pub trait Coordinator: Send + Sync {
    /// This node.
    fn node(&self) -> &NodeId;

    /// The lease settings.
    fn config(&self) -> LeaseConfig;

    /// Takes a new lease and writes this node's key under it. A previous lease of this node is
    /// not revoked (a paused earlier incarnation may still believe in it until its own
    /// deadline); its grants stay its own until it ends.
    fn join(&self, now: Duration) -> Result<LocalLease, FleetError>;

    /// Renews the lease; `now` must be read before the request is sent. On
    /// [`FleetError::LeaseExpired`] the node must drop its grants and join again.
    fn renew(&self, now: Duration) -> Result<LocalLease, FleetError>;

    /// Ends the lease: the node key and every grant of this node go at once. The caller must
    /// have stopped translating first.
    fn leave(&self, now: Duration) -> Result<(), FleetError>;

    /// The nodes with a live node key, sorted.
    fn live_nodes(&self, now: Duration) -> Result<Vec<NodeId>, FleetError>;

    /// Who should own `res` now: the rendezvous owner among the live nodes.
    fn owner_of(&self, res: &Resource, now: Duration) -> Result<Option<NodeId>, FleetError> {
        let nodes = self.live_nodes(now)?;
        Ok(rendezvous::owner(&res.rendezvous_key(), &nodes).cloned())
    }

    /// Reads a grant key.
    fn read_grant(&self, res: &Resource, now: Duration) -> Result<GrantRead, FleetError>;

    /// Grants `read.resource` to this node, fenced: refused with [`FleetError::Held`] if `read`
    /// shows another holder, with [`FleetError::Conflict`] if the key's revision is no longer
    /// `read.revision`, with [`FleetError::NotLive`] if this node's lease is not live at the
    /// store. The grant is bound to this node's lease.
    fn grant(&self, read: &GrantRead, now: Duration) -> Result<Grant, FleetError>;

    /// Gives a grant back, if its revision is still `grant.revision` ([`FleetError::Conflict`]
    /// otherwise). The caller must have stopped using it first.
    fn release(&self, grant: &Grant, now: Duration) -> Result<(), FleetError>;
}

/// A shared handle is a handle (several tasks of one node may hold one coordinator).
impl<C: Coordinator + ?Sized> Coordinator for std::sync::Arc<C> {
    fn node(&self) -> &NodeId {
        (**self).node()
    }
    fn config(&self) -> LeaseConfig {
        (**self).config()
    }
    fn join(&self, now: Duration) -> Result<LocalLease, FleetError> {
        (**self).join(now)
    }
    fn renew(&self, now: Duration) -> Result<LocalLease, FleetError> {
        (**self).renew(now)
    }
    fn leave(&self, now: Duration) -> Result<(), FleetError> {
        (**self).leave(now)
    }
    fn live_nodes(&self, now: Duration) -> Result<Vec<NodeId>, FleetError> {
        (**self).live_nodes(now)
    }
    fn owner_of(&self, res: &Resource, now: Duration) -> Result<Option<NodeId>, FleetError> {
        (**self).owner_of(res, now)
    }
    fn read_grant(&self, res: &Resource, now: Duration) -> Result<GrantRead, FleetError> {
        (**self).read_grant(res, now)
    }
    fn grant(&self, read: &GrantRead, now: Duration) -> Result<Grant, FleetError> {
        (**self).grant(read, now)
    }
    fn release(&self, grant: &Grant, now: Duration) -> Result<(), FleetError> {
        (**self).release(grant, now)
    }
}

/// What one node believes: its lease as it last renewed it and the grants it holds. The data
/// path asks [`LocalView::may_translate`] before translating for a block.
#[derive(Debug, Clone, Default)]
pub struct LocalView {
    lease: Option<LocalLease>,
    grants: BTreeMap<Resource, Grant>,
}

impl LocalView {
    /// A view with no lease and no grants.
    pub fn new() -> LocalView {
        LocalView::default()
    }

    /// The lease as last renewed.
    pub fn lease(&self) -> Option<LocalLease> {
        self.lease
    }

    /// Records a successful join or renewal. A new lease id (a rejoin) drops every grant
    /// taken under the old one.
    pub fn set_lease(&mut self, l: LocalLease) {
        if self.lease.is_some_and(|old| old.id != l.id) {
            self.grants.clear();
        }
        // A renewal answered out of order must never move the deadline back or forward
        // beyond what the latest send allows: keep the later deadline of the same lease.
        match self.lease {
            Some(old) if old.id == l.id && old.valid_until > l.valid_until => {}
            _ => self.lease = Some(l),
        }
    }

    /// Forgets the lease and every grant (the lease expired at the store, or the node left).
    pub fn clear(&mut self) {
        self.lease = None;
        self.grants.clear();
    }

    /// Records a grant taken under the current lease (ignored otherwise).
    pub fn add_grant(&mut self, g: Grant) {
        if self.lease.is_some_and(|l| l.id == g.holder.lease) {
            self.grants.insert(g.resource.clone(), g);
        }
    }

    /// Stops using a grant (before releasing it); returns it.
    pub fn drop_grant(&mut self, res: &Resource) -> Option<Grant> {
        self.grants.remove(res)
    }

    /// The grants held, valid or not.
    pub fn grants(&self) -> impl Iterator<Item = &Grant> {
        self.grants.values()
    }

    /// The grant for `res`, if held.
    pub fn grant(&self, res: &Resource) -> Option<&Grant> {
        self.grants.get(res)
    }

    /// Whether the lease is still valid at `now` (false: the node has fenced itself).
    pub fn is_valid(&self, now: Duration) -> bool {
        self.lease.is_some_and(|l| l.is_valid(now))
    }

    /// Whether this node may translate for `res` at `now`: it holds the grant under its current
    /// lease and that lease's local validity has not passed (R10.2).
    pub fn may_translate(&self, res: &Resource, now: Duration) -> bool {
        match (self.lease, self.grants.get(res)) {
            (Some(l), Some(g)) => g.holder.lease == l.id && l.is_valid(now),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_checked_and_resource_keys_are_stable() {
        assert!(NodeId::new("gw-1.a_b").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(
                matches!(NodeId::new(bad), Err(FleetError::BadNodeId(_))),
                "{bad}"
            );
        }
        assert_eq!(Resource::Instance("vm1".into()).key(), "instance/vm1");
        let b = Resource::Block {
            ip: Ipv4Addr::new(203, 0, 113, 5),
            first_port: 1024,
        };
        assert_eq!(b.key(), "block/203.0.113.5/1024");
    }

    #[test]
    fn r10_2_local_view_fences_at_deadline_and_on_new_lease() {
        let cfg = LeaseConfig::default();
        let me = NodeId::new("a").expect("id");
        let res = Resource::Instance("vm1".into());
        let mut v = LocalView::new();
        let l1 = cfg.local_lease(LeaseId(1), Duration::ZERO, cfg.ttl());
        v.set_lease(l1);
        v.add_grant(Grant {
            resource: res.clone(),
            holder: Holder {
                node: me.clone(),
                lease: LeaseId(1),
            },
            revision: Revision(5),
        });
        assert!(v.may_translate(&res, Duration::from_secs(7)));
        assert!(
            !v.may_translate(&res, Duration::from_secs(8)),
            "self-fenced at TTL - margin"
        );
        // A grant under another lease is not taken into the view.
        v.add_grant(Grant {
            resource: Resource::Instance("vm2".into()),
            holder: Holder {
                node: me,
                lease: LeaseId(9),
            },
            revision: Revision(6),
        });
        assert!(v.grant(&Resource::Instance("vm2".into())).is_none());
        // A rejoin (new lease) drops the old grants.
        v.set_lease(cfg.local_lease(LeaseId(2), Duration::from_secs(9), cfg.ttl()));
        assert!(!v.may_translate(&res, Duration::from_secs(10)));
        assert_eq!(v.grants().count(), 0);
    }
}
