//! The fleet of gateways (issue #19, SPEC §10): several `snatgw run` nodes on one topology and
//! one set of public IPs, coordinated through etcd.
//!
//! What this crate does:
//! - [`lease`]: lease settings (TTL default 10 s, minimum 2 s) and a node's *local* view of its
//!   own validity, "renewal sent at t, valid until t + TTL − margin", after which the node must
//!   stop translating (self-fencing, R10.2).
//! - [`rendezvous`]: which live node owns each instance (highest random weight hashing), a
//!   deterministic function of the live node set that moves only what it must (R10.1).
//! - [`coordinator`]: the [`Coordinator`] trait (join, renew, leave, live nodes, fenced grants
//!   of instances and public-IP port blocks, R10.1/R10.2) and [`LocalView`], the state a node
//!   consults before translating for a block.
//! - [`member`]: [`Member`], one node's loop (renew, then give up and take grants by
//!   rendezvous) and the per-block question the data path asks.
//! - [`mem`]: [`MemFleet`]/[`MemCoordinator`], an in-memory implementation with an injectable
//!   clock and fault injection (partitions, store down) for unit and property tests.
//! - [`etcd`]: [`EtcdCoordinator`] (the same protocol on etcd: node key under a lease, grants by
//!   `Txn`) and [`EtcdStore`] (the control plane's `Store` on etcd, with a watch so every node
//!   sees a change made through any node).
//! - [`replica`]: the flow-state replication stream (R10.4): [`Replicator`] streams each owned
//!   instance's opens and closes (and snapshots) to its rendezvous runner-up over the fleet
//!   link; [`ReplicaServer`] receives them into a [`ReplicaStore`], from which the node taking
//!   an instance over takes its flows for `Engine::import_state`.
//!
//! `snatgw run --fleet` (the `snatgw` binary's `fleet` module) runs a [`Member`] on a thread,
//! uses [`EtcdStore`] as its topology store and turns the member's view into the gateway's
//! admission of new flows (self-fencing, R10.2); `snatgw fleet` prints [`fleet_status`].
//!
//! What it does not do: steer packets to their owner (R10.3), or decide where each instance's
//! flows are replicated and when to import them (R10.4): the `snatgw` binary does, from the
//! rendezvous runner-ups, [`EtcdCoordinator::links`] and the member's grants. See
//! docs/FLEET.md.

#![forbid(unsafe_code)]

pub mod bridge;
pub mod coordinator;
pub mod error;
pub mod etcd;
pub mod lease;
pub mod mem;
pub mod member;
pub mod rendezvous;
pub mod replica;

pub use coordinator::{
    Coordinator, Grant, GrantRead, Holder, LocalView, NodeId, Resource, Revision,
};
pub use error::FleetError;
pub use etcd::{
    fleet_status, EtcdCoordinator, EtcdOptions, EtcdStore, FleetStatus, NodeStatus, Takeover,
};
pub use lease::{LeaseConfig, LeaseId, LocalLease, MonotonicClock};
pub use mem::{Link, MemCoordinator, MemFleet};
pub use member::{Member, TickReport};
pub use replica::{
    InstanceReplica, Message, PortReserve, ReplicaError, ReplicaServer, ReplicaStats, ReplicaStore,
    Replicator, ReplicatorStats, ReserveTicket, WireError,
};
