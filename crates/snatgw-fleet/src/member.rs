//! One node's coordination loop, sans-IO: [`Member::tick`] renews (or joins), then, while the
//! lease is valid, gives up what rendezvous hashing no longer gives this node and takes what
//! it does (R10.1), with fenced grants (R10.2). [`Member::may_translate`] is the question the
//! data path asks per block.
//!
//! The order inside a tick is what keeps "never twice": a resource that moves away is dropped
//! from the local view (the node stops translating for it) *before* its grant is released,
//! and a resource is added to the view only after its grant was written. A node whose lease
//! ended at the store clears its view and joins again with a new lease on the next tick.
//!
//! The caller drives time (`now`, read before the tick's first request: an early `now` only
//! makes the local deadline earlier) and calls [`Member::tick`] about every
//! [`crate::LeaseConfig::renew_interval`]. This module does not move flows (R10.4) or steer
//! packets (R10.3); [`TickReport`] says what was gained and lost so the caller can.

use std::time::Duration;

use crate::coordinator::{Coordinator, LocalView, NodeId, Resource};
use crate::error::FleetError;
use crate::rendezvous;

/// What one tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Resources granted to this node in this tick (it may translate for them now).
    pub gained: Vec<Resource>,
    /// Resources this node stopped translating for (moved away by rendezvous, or the lease
    /// ended), in this tick.
    pub lost: Vec<Resource>,
    /// Whether the lease is valid after the tick.
    pub valid: bool,
    /// The first store error met, if any (`Unreachable`: etcd down or cut, R10.5).
    pub error: Option<FleetError>,
}

/// A node of the fleet: its coordinator handle and what it believes.
#[derive(Debug)]
pub struct Member<C: Coordinator> {
    coord: C,
    view: LocalView,
}

impl<C: Coordinator> Member<C> {
    /// A member that has not joined yet (the first tick joins).
    pub fn new(coord: C) -> Member<C> {
        Member {
            coord,
            view: LocalView::new(),
        }
    }

    /// This node.
    pub fn node(&self) -> &NodeId {
        self.coord.node()
    }

    /// The coordinator handle.
    pub fn coordinator(&self) -> &C {
        &self.coord
    }

    /// What this node believes.
    pub fn view(&self) -> &LocalView {
        &self.view
    }

    /// Whether this node may translate for `res` at `now` (R10.2).
    pub fn may_translate(&self, res: &Resource, now: Duration) -> bool {
        self.view.may_translate(res, now)
    }

    /// One round: renew or join, then reconcile `resources` against the rendezvous owners.
    pub fn tick(&mut self, now: Duration, resources: &[Resource]) -> TickReport {
        self.tick_with(now, resources, |_| {})
    }

    /// [`Member::tick`], calling `stop_using(resource)` for every resource this node stops
    /// translating for, at the moment it is dropped from the local view and *before* its
    /// grant is released (or, when the lease ended at the store, before the tick returns):
    /// the data path's own copy of the view must drop it there, or it would go on opening
    /// flows for a resource another node may already hold (R10.2). A handover of the
    /// resource's flows to its next owner (R10.4) also belongs there.
    pub fn tick_with(
        &mut self,
        now: Duration,
        resources: &[Resource],
        mut stop_using: impl FnMut(&Resource),
    ) -> TickReport {
        let mut rep = TickReport::default();
        let had: Vec<Resource> = self.view.grants().map(|g| g.resource.clone()).collect();
        let r = if self.view.lease().is_none() {
            self.coord.join(now)
        } else {
            self.coord.renew(now)
        };
        match r {
            Ok(l) => self.view.set_lease(l),
            Err(e @ (FleetError::LeaseExpired(_) | FleetError::NotJoined(_))) => {
                // Already fenced by the local deadline; forget the old lease and its grants.
                self.view.clear();
                for r in &had {
                    stop_using(r);
                }
                rep.lost = had;
                rep.error = Some(e);
                return rep;
            }
            Err(e) => rep.error = Some(e),
        }
        rep.valid = self.view.is_valid(now);
        if !rep.valid {
            return rep;
        }
        let live = match self.coord.live_nodes(now) {
            Ok(l) => l,
            Err(e) => {
                rep.error.get_or_insert(e);
                return rep;
            }
        };
        for res in resources {
            let owner = rendezvous::owner(&res.rendezvous_key(), &live);
            if owner != Some(self.coord.node()) {
                // Stop using it first, then give it back (a failed release leaves it to end
                // with the lease; nobody else can take it before that anyway).
                if let Some(g) = self.view.drop_grant(res) {
                    stop_using(res);
                    rep.lost.push(res.clone());
                    if let Err(e) = self.coord.release(&g, now) {
                        rep.error.get_or_insert(e);
                    }
                }
                continue;
            }
            if self.view.grant(res).is_some() {
                continue;
            }
            let granted = self
                .coord
                .read_grant(res, now)
                .and_then(|read| self.coord.grant(&read, now));
            match granted {
                Ok(g) => {
                    self.view.add_grant(g);
                    rep.gained.push(res.clone());
                }
                // Held by a lease still live, or changed under us: try again next tick.
                Err(FleetError::Held { .. } | FleetError::Conflict { .. }) => {}
                Err(e) => {
                    rep.error.get_or_insert(e);
                }
            }
        }
        rep
    }

    /// Leaves the fleet: stops translating for everything, then ends the lease (the store
    /// frees every grant at once).
    pub fn leave(&mut self, now: Duration) -> Result<(), FleetError> {
        self.view.clear();
        self.coord.leave(now)
    }
}
