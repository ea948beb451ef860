//! The coordination protocol in memory, for unit and property tests: [`MemFleet`] is the store
//! (what etcd is in production) with an injectable clock, [`MemCoordinator`] one node's handle
//! on it, implementing [`Coordinator`] exactly as [`crate::EtcdCoordinator`] does on etcd.
//!
//! The store keeps etcd's rules that the fencing argument rests on (R10.1, R10.2): one global
//! revision that every write increments; leases that expire TTL after the last renewal the
//! store *received* (on the store's clock, [`MemFleet::set_now`]); keys bound to a lease
//! deleted when it ends; a transaction's comparisons and writes applied atomically.
//! Faults are injected per node ([`Link`]: cut, or requests arriving with answers lost) and
//! for the whole store ([`MemFleet::set_down`], etcd down: R10.5).
//!
//! There is no wall clock here: the store's time moves only by [`MemFleet::set_now`], and each
//! node passes its own clock to the trait's methods. Not for production: nothing is durable.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::coordinator::{Coordinator, Grant, GrantRead, Holder, NodeId, Resource, Revision};
use crate::error::FleetError;
use crate::lease::{LeaseConfig, LeaseId, LocalLease};

/// How a node reaches the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Link {
    /// Requests and answers go through.
    Up,
    /// Nothing goes through (a partition): every call fails with `Unreachable`.
    Down,
    /// Requests reach the store and take effect, answers are lost: every call fails with
    /// `Unreachable` *after* its effect (the worst case for a node's view).
    AnswersLost,
}

#[derive(Debug)]
struct MemLease {
    expires_at: Duration,
}

#[derive(Debug, Default)]
struct State {
    now: Duration,
    revision: i64,
    next_lease: i64,
    down: bool,
    links: BTreeMap<NodeId, Link>,
    leases: BTreeMap<LeaseId, MemLease>,
    /// Node keys: node -> (lease it is bound to, mod revision).
    nodes: BTreeMap<NodeId, (LeaseId, i64)>,
    /// Grant keys: resource -> (holder, mod revision). Bound to the holder's lease.
    grants: BTreeMap<Resource, (Holder, i64)>,
}

impl State {
    fn expire(&mut self) {
        let now = self.now;
        let dead: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.end_lease(id);
        }
    }

    fn end_lease(&mut self, id: LeaseId) {
        self.leases.remove(&id);
        let nodes: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, (l, _))| *l == id)
            .map(|(n, _)| n.clone())
            .collect();
        for n in nodes {
            self.nodes.remove(&n);
            self.revision += 1;
        }
        let grants: Vec<Resource> = self
            .grants
            .iter()
            .filter(|(_, (h, _))| h.lease == id)
            .map(|(r, _)| r.clone())
            .collect();
        for r in grants {
            self.grants.remove(&r);
            self.revision += 1;
        }
    }

    fn lease_bound(&self, node: &NodeId, lease: LeaseId) -> bool {
        self.nodes.get(node).is_some_and(|(l, _)| *l == lease)
    }
}

/// The in-memory store shared by the nodes of a test fleet.
#[derive(Debug, Clone)]
pub struct MemFleet {
    state: Arc<Mutex<State>>,
    config: LeaseConfig,
}

impl MemFleet {
    /// An empty store whose nodes use `config`, its clock at zero.
    pub fn new(config: LeaseConfig) -> MemFleet {
        MemFleet {
            state: Arc::new(Mutex::new(State {
                next_lease: 1,
                ..State::default()
            })),
            config,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread poisons the lock; the state is still consistent (every
        // change is made under it in full), so carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the store's clock to `now` (never back) and expires what ran out.
    pub fn set_now(&self, now: Duration) {
        let mut s = self.lock();
        s.now = s.now.max(now);
        s.expire();
    }

    /// The store's clock.
    pub fn now(&self) -> Duration {
        self.lock().now
    }

    /// Takes the whole store down (every call fails with `Unreachable`; leases keep their
    /// expiry times, as etcd's leader keeps them while clients cannot reach it) or brings
    /// it back.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Sets how `node` reaches the store.
    pub fn set_link(&self, node: &NodeId, link: Link) {
        self.lock().links.insert(node.clone(), link);
    }

    /// The node handle for `node`.
    pub fn coordinator(&self, node: NodeId) -> MemCoordinator {
        MemCoordinator {
            fleet: self.clone(),
            node,
            lease: Arc::new(Mutex::new(None)),
        }
    }

    /// Store-side truth for checks: whether `node`'s lease `lease` is live at the store's now.
    pub fn lease_live(&self, lease: LeaseId) -> bool {
        let mut s = self.lock();
        s.expire();
        s.leases.contains_key(&lease)
    }

    /// Store-side truth for checks: the holder of `res`.
    pub fn holder(&self, res: &Resource) -> Option<Holder> {
        let mut s = self.lock();
        s.expire();
        s.grants.get(res).map(|(h, _)| h.clone())
    }

    /// The store's current revision.
    pub fn revision(&self) -> Revision {
        Revision(self.lock().revision)
    }
}

/// One node's handle on a [`MemFleet`].
#[derive(Debug, Clone)]
pub struct MemCoordinator {
    fleet: MemFleet,
    node: NodeId,
    lease: Arc<Mutex<Option<LeaseId>>>,
}

impl MemCoordinator {
    /// The lease this handle last joined with.
    pub fn lease_id(&self) -> Option<LeaseId> {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_lease_id(&self, id: Option<LeaseId>) {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = id;
    }

    fn my_lease(&self) -> Result<LeaseId, FleetError> {
        self.lease_id()
            .ok_or_else(|| FleetError::NotJoined(self.node.clone()))
    }

    /// Runs `f` at the store if the link lets the request through, then applies the answer
    /// rule of the link.
    fn call<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, FleetError>,
    ) -> Result<T, FleetError> {
        let mut s = self.fleet.lock();
        let link = s.links.get(&self.node).copied().unwrap_or(Link::Up);
        if s.down {
            return Err(FleetError::Unreachable("store down (test)".into()));
        }
        if link == Link::Down {
            return Err(FleetError::Unreachable(format!(
                "{} cut from the store (test)",
                self.node
            )));
        }
        s.expire();
        let r = f(&mut s);
        if link == Link::AnswersLost {
            return Err(FleetError::Unreachable(format!(
                "answer to {} lost (test)",
                self.node
            )));
        }
        r
    }
}

impl Coordinator for MemCoordinator {
    fn node(&self) -> &NodeId {
        &self.node
    }

    fn config(&self) -> LeaseConfig {
        self.fleet.config
    }

    fn join(&self, now: Duration) -> Result<LocalLease, FleetError> {
        let cfg = self.fleet.config;
        let node = self.node.clone();
        let r = self.call(|s| {
            let id = LeaseId(s.next_lease);
            s.next_lease += 1;
            let expires_at = s.now + cfg.ttl();
            s.leases.insert(id, MemLease { expires_at });
            s.revision += 1;
            let rev = s.revision;
            s.nodes.insert(node, (id, rev));
            Ok(id)
        });
        // Even when the answer is lost the store made the lease; the handle does not know it.
        let id = r?;
        self.set_lease_id(Some(id));
        Ok(cfg.local_lease(id, now, cfg.ttl()))
    }

    fn renew(&self, now: Duration) -> Result<LocalLease, FleetError> {
        let cfg = self.fleet.config;
        let id = self.my_lease()?;
        let node = self.node.clone();
        let r = self.call(|s| match s.leases.get_mut(&id) {
            Some(l) => {
                l.expires_at = s.now + cfg.ttl();
                Ok(())
            }
            None => Err(FleetError::LeaseExpired(node)),
        });
        match r {
            Ok(()) => Ok(cfg.local_lease(id, now, cfg.ttl())),
            Err(FleetError::LeaseExpired(n)) => {
                self.set_lease_id(None);
                Err(FleetError::LeaseExpired(n))
            }
            Err(e) => Err(e),
        }
    }

    fn leave(&self, _now: Duration) -> Result<(), FleetError> {
        let id = self.my_lease()?;
        self.call(|s| {
            s.end_lease(id);
            Ok(())
        })?;
        self.set_lease_id(None);
        Ok(())
    }

    fn live_nodes(&self, _now: Duration) -> Result<Vec<NodeId>, FleetError> {
        self.call(|s| Ok(s.nodes.keys().cloned().collect()))
    }

    fn read_grant(&self, res: &Resource, _now: Duration) -> Result<GrantRead, FleetError> {
        self.call(|s| {
            let (holder, revision) = match s.grants.get(res) {
                Some((h, rev)) => (Some(h.clone()), Revision(*rev)),
                None => (None, Revision(0)),
            };
            Ok(GrantRead {
                resource: res.clone(),
                holder,
                revision,
            })
        })
    }

    fn grant(&self, read: &GrantRead, _now: Duration) -> Result<Grant, FleetError> {
        let lease = self.my_lease()?;
        let me = Holder {
            node: self.node.clone(),
            lease,
        };
        if let Some(h) = &read.holder {
            if *h != me {
                return Err(FleetError::Held {
                    resource: read.resource.key(),
                    holder: h.clone(),
                });
            }
        }
        let res = read.resource.clone();
        self.call(|s| {
            // The transaction: compare the key's revision and the grantee's lease-bound node
            // key, then write the grant bound to the grantee's lease.
            let found = Revision(s.grants.get(&res).map_or(0, |(_, r)| *r));
            if found != read.revision {
                return Err(FleetError::Conflict {
                    resource: res.key(),
                    expected: read.revision,
                    found,
                });
            }
            if !s.lease_bound(&me.node, me.lease) {
                return Err(FleetError::NotLive(me.node.clone()));
            }
            s.revision += 1;
            let rev = s.revision;
            s.grants.insert(res.clone(), (me.clone(), rev));
            Ok(Grant {
                resource: res.clone(),
                holder: me.clone(),
                revision: Revision(rev),
            })
        })
    }

    fn release(&self, grant: &Grant, _now: Duration) -> Result<(), FleetError> {
        self.call(|s| {
            let found = Revision(s.grants.get(&grant.resource).map_or(0, |(_, r)| *r));
            if found != grant.revision {
                return Err(FleetError::Conflict {
                    resource: grant.resource.key(),
                    expected: grant.revision,
                    found,
                });
            }
            s.grants.remove(&grant.resource);
            s.revision += 1;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn id(s: &str) -> NodeId {
        NodeId::new(s).expect("id")
    }

    #[test]
    fn r10_1_join_renew_leave_and_live_nodes() {
        let f = MemFleet::new(LeaseConfig::default());
        let a = f.coordinator(id("a"));
        let b = f.coordinator(id("b"));
        assert!(matches!(a.renew(secs(0)), Err(FleetError::NotJoined(_))));
        a.join(secs(0)).expect("join");
        b.join(secs(0)).expect("join");
        assert_eq!(
            a.live_nodes(secs(0)).expect("nodes"),
            vec![id("a"), id("b")]
        );
        f.set_now(secs(6));
        let l = a.renew(secs(6)).expect("renew");
        assert_eq!(l.valid_until, secs(14));
        f.set_now(secs(10));
        // b did not renew: gone at the store at 0 + TTL.
        assert_eq!(a.live_nodes(secs(10)).expect("nodes"), vec![id("a")]);
        assert!(matches!(
            b.renew(secs(10)),
            Err(FleetError::LeaseExpired(_))
        ));
        a.leave(secs(10)).expect("leave");
        assert!(a.live_nodes(secs(10)).expect("nodes").is_empty());
    }

    #[test]
    fn r10_2_grant_is_fenced_by_revision_and_lease() {
        let f = MemFleet::new(LeaseConfig::default());
        let a = f.coordinator(id("a"));
        let b = f.coordinator(id("b"));
        a.join(secs(0)).expect("join");
        b.join(secs(0)).expect("join");
        let res = Resource::Instance("vm1".into());
        let read = a.read_grant(&res, secs(0)).expect("read");
        assert_eq!(read.revision, Revision(0));
        let stale = b.read_grant(&res, secs(0)).expect("read");
        let g = a.grant(&read, secs(0)).expect("grant");
        // b read before a wrote: its revision is stale, refused.
        assert!(matches!(
            b.grant(&stale, secs(0)),
            Err(FleetError::Conflict { .. })
        ));
        // b reads again: held by a live lease, refused.
        let now_read = b.read_grant(&res, secs(0)).expect("read");
        assert!(matches!(
            b.grant(&now_read, secs(0)),
            Err(FleetError::Held { .. })
        ));
        // a releases; b takes it, at a higher revision (the fencing token grows).
        a.release(&g, secs(1)).expect("release");
        let r2 = b.read_grant(&res, secs(1)).expect("read");
        let g2 = b.grant(&r2, secs(1)).expect("grant");
        assert!(g2.revision > g.revision);
        // a's release of the old grant no longer matches.
        assert!(matches!(
            a.release(&g, secs(1)),
            Err(FleetError::Conflict { .. })
        ));
    }

    #[test]
    fn r10_2_grants_end_with_the_lease_and_dead_grantee_is_refused() {
        let f = MemFleet::new(LeaseConfig::default());
        let a = f.coordinator(id("a"));
        let b = f.coordinator(id("b"));
        a.join(secs(0)).expect("join");
        b.join(secs(0)).expect("join");
        let res = Resource::Block {
            ip: "198.51.100.1".parse().expect("ip"),
            first_port: 1024,
        };
        a.grant(&a.read_grant(&res, secs(0)).expect("read"), secs(0))
            .expect("grant");
        f.set_now(secs(5));
        b.renew(secs(5)).expect("renew");
        let r = b.read_grant(&res, secs(5)).expect("read");
        f.set_now(secs(10)); // a's lease ends at the store; its grant goes with it
        assert_eq!(f.holder(&res), None);
        // A read from before shows the old holder: refused without asking the store.
        assert!(matches!(
            b.grant(&r, secs(10)),
            Err(FleetError::Held { .. })
        ));
        let r = b.read_grant(&res, secs(10)).expect("read");
        assert!(r.holder.is_none());
        b.grant(&r, secs(10))
            .expect("grant after the holder's lease ended");
        // A node whose lease ended cannot grant itself anything.
        f.set_now(secs(20));
        let r = a
            .read_grant(&Resource::Instance("x".into()), secs(20))
            .expect("read");
        assert!(matches!(a.grant(&r, secs(20)), Err(FleetError::NotLive(_))));
    }

    #[test]
    fn r10_5_store_down_or_cut_is_unreachable_and_lease_still_runs_out() {
        let f = MemFleet::new(LeaseConfig::default());
        let a = f.coordinator(id("a"));
        a.join(secs(0)).expect("join");
        f.set_down(true);
        assert!(matches!(a.renew(secs(1)), Err(FleetError::Unreachable(_))));
        f.set_down(false);
        f.set_link(&id("a"), Link::AnswersLost);
        f.set_now(secs(2));
        // The renewal took effect at the store but a does not know: its view stays at 0 + 8 s.
        assert!(matches!(a.renew(secs(2)), Err(FleetError::Unreachable(_))));
        f.set_link(&id("a"), Link::Up);
        f.set_now(secs(11));
        assert_eq!(a.live_nodes(secs(11)).expect("nodes"), vec![id("a")]);
        f.set_now(secs(12));
        assert!(a.live_nodes(secs(12)).expect("nodes").is_empty());
    }
}
