//! The fleet on etcd: [`EtcdCoordinator`] (the [`Coordinator`] protocol, R10.1/R10.2) and
//! [`EtcdStore`] (the control plane's `Store` of the desired topology, watched by every node).
//!
//! Keys, below a prefix (default `/snatgw`):
//! - `PREFIX/fleet/nodes/NODE`: `{"node":..,"lease":..,"link":..}`, put with the node's lease,
//!   so it disappears when the lease ends; the live node set is the keys under `fleet/nodes/`.
//!   `link` (optional, absent in records of earlier versions) is the node's fleet-link
//!   address, where it receives replicated flow state ([`crate::replica`], R10.4);
//!   [`EtcdCoordinator::links`] reads them.
//! - `PREFIX/fleet/grants/instance/NAME`, `PREFIX/fleet/grants/block/IP/PORT`: the holder
//!   (`{"node":..,"lease":..}`), put with the holder's lease, in a `Txn` that compares the
//!   grant key's `mod_revision` with the one read (0 for a missing key) and the grantee's node
//!   key's lease with the grantee's lease (a missing key compares as lease 0, so a dead lease
//!   fails). The `Txn`'s revision is the grant's fencing token.
//! - `PREFIX/fleet/takeovers/NODE`: the node's last takeover ([`Takeover`]), put with its
//!   lease; read with the rest by [`fleet_status`] (`snatgw fleet`).
//! - `PREFIX/topology`: the JSON `Stored` record, written by a `Txn` on its `mod_revision`
//!   with a generation check, so two nodes saving at once cannot both win and generations
//!   only grow.
//!
//! Renewal opens a fresh keep-alive stream per call: an answer on a reused stream could be
//! the late answer of an earlier request and would make the local deadline too late. Every
//! call is bounded by [`EtcdOptions::rpc_timeout`] and fails with
//! [`FleetError::Unreachable`] when etcd does not answer (R10.5: the caller keeps translating
//! within what it holds while its [`crate::LocalLease`] is valid, and refuses topology
//! changes).
//!
//! This module does not decide when to renew or what to grant (the node's loop does, with
//! [`crate::rendezvous`]) and does not apply topologies (it hands them out through
//! [`EtcdStore::subscribe`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use snatgw_control::{Store, StoreError, Stored};

use crate::bridge::Bridge;
use crate::coordinator::{Coordinator, Grant, GrantRead, Holder, NodeId, Resource, Revision};
use crate::error::FleetError;
use crate::lease::{LeaseConfig, LeaseId, LocalLease};

/// Where etcd is and how the fleet uses it.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs, such as `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of this fleet (default `/snatgw`).
    pub prefix: String,
    /// Lease settings.
    pub lease: LeaseConfig,
    /// Upper bound of every call to etcd (default 1 s).
    pub rpc_timeout: Duration,
}

impl EtcdOptions {
    /// Options for `endpoints` with the defaults.
    pub fn new(endpoints: Vec<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            prefix: "/snatgw".into(),
            lease: LeaseConfig::default(),
            rpc_timeout: Duration::from_secs(1),
        }
    }

    fn node_prefix(&self) -> String {
        format!("{}/fleet/nodes/", self.prefix)
    }

    fn node_key(&self, node: &NodeId) -> String {
        format!("{}{node}", self.node_prefix())
    }

    fn grant_key(&self, res: &Resource) -> String {
        format!("{}/fleet/grants/{}", self.prefix, res.key())
    }

    fn topology_key(&self) -> String {
        format!("{}/topology", self.prefix)
    }

    fn takeover_prefix(&self) -> String {
        format!("{}/fleet/takeovers/", self.prefix)
    }
}

/// The last time a node took grants (`snatgw fleet`'s "last takeover"): kept under
/// `PREFIX/fleet/takeovers/NODE`, bound to the node's lease, written by the node after a tick
/// that gained instances ([`EtcdCoordinator::record_takeover`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Takeover {
    /// Wall-clock time of the tick, Unix milliseconds (the writer's clock; for people only).
    pub at_unix_ms: u64,
    /// The instances granted in that tick.
    pub instances: Vec<String>,
}

/// One node as `snatgw fleet` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub node: NodeId,
    /// Its lease.
    pub lease: LeaseId,
    /// Seconds etcd keeps the lease without another renewal (-1: already gone).
    pub ttl_left_secs: i64,
    /// Instances whose grant it holds under this lease, sorted.
    pub instances: Vec<String>,
    /// Its last takeover, if it recorded one under this lease.
    pub last_takeover: Option<Takeover>,
}

/// The fleet as etcd holds it: live nodes with their leases and grants, and grants whose
/// holder is no live node key's lease (an earlier incarnation's, until its lease ends).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// Live nodes, by id.
    pub nodes: Vec<NodeStatus>,
    /// Instance grants held by a lease no live node key has: (instance, holder).
    pub other_grants: Vec<(String, Holder)>,
}

/// Reads the fleet's nodes, leases, grants and last takeovers (for `snatgw fleet`); a
/// client of its own, no lease.
pub fn fleet_status(opts: &EtcdOptions) -> Result<FleetStatus, FleetError> {
    let bridge = Bridge::new()?;
    let mut c = connect(&bridge, opts)?;
    let t = opts.rpc_timeout;
    let (nodes_p, takeovers_p) = (opts.node_prefix(), opts.takeover_prefix());
    let grants_p = format!("{}/fleet/grants/instance/", opts.prefix);
    bridge.run(async move {
        let prefixed = || Some(GetOptions::new().with_prefix());
        let nodes = bounded(t, c.get(nodes_p.clone(), prefixed())).await?;
        let grants = bounded(t, c.get(grants_p.clone(), prefixed())).await?;
        let takeovers = bounded(t, c.get(takeovers_p.clone(), prefixed())).await?;
        let mut out = FleetStatus::default();
        for kv in nodes.kvs() {
            let k = kv.key_str().map_err(|e| corrupt(&nodes_p, e))?.to_string();
            let rec: NodeRecord = serde_json::from_slice(kv.value()).map_err(|e| corrupt(&k, e))?;
            let ttl = bounded(t, c.lease_time_to_live(rec.lease.0, None))
                .await?
                .ttl();
            let last_takeover = takeovers.kvs().iter().find_map(|tk| {
                let name = tk.key_str().ok()?.strip_prefix(takeovers_p.as_str())?;
                (name == rec.node.as_str() && tk.lease() == rec.lease.0)
                    .then(|| serde_json::from_slice(tk.value()).ok())
                    .flatten()
            });
            out.nodes.push(NodeStatus {
                node: rec.node,
                lease: rec.lease,
                ttl_left_secs: ttl,
                instances: Vec::new(),
                last_takeover,
            });
        }
        for kv in grants.kvs() {
            let k = kv.key_str().map_err(|e| corrupt(&grants_p, e))?;
            let inst = k.strip_prefix(grants_p.as_str()).unwrap_or(k).to_string();
            let h: Holder = serde_json::from_slice(kv.value()).map_err(|e| corrupt(k, e))?;
            match out
                .nodes
                .iter_mut()
                .find(|n| n.node == h.node && n.lease == h.lease)
            {
                Some(n) => n.instances.push(inst),
                None => out.other_grants.push((inst, h)),
            }
        }
        out.nodes.sort_by(|a, b| a.node.cmp(&b.node));
        for n in &mut out.nodes {
            n.instances.sort();
        }
        Ok(out)
    })
}

#[derive(Serialize, Deserialize)]
struct NodeRecord {
    node: NodeId,
    lease: LeaseId,
    /// The node's fleet-link address (R10.4 replication); absent in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    link: Option<String>,
}

/// Sorts etcd-client's errors into "etcd did not answer" (R10.5: keep translating, refuse
/// changes) and "etcd answered no". A broken connection shows up as a transport or I/O error,
/// as a gRPC status `Unavailable`/`DeadlineExceeded`/`Cancelled`, or as `Unknown` with a
/// transport error inside (seen when etcd is killed mid-stream), or as a closed keep-alive or
/// watch stream.
fn classify(e: etcd_client::Error) -> FleetError {
    use etcd_client::Error as E;
    match e {
        E::TransportError(e) => FleetError::Unreachable(e.to_string()),
        E::IoError(e) => FleetError::Unreachable(e.to_string()),
        E::LeaseKeepAliveError(m) | E::WatchError(m) => FleetError::Unreachable(m),
        E::GRpcStatus(s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
            ) =>
        {
            FleetError::Unreachable(s.message().to_string())
        }
        other => FleetError::Store(other.to_string()),
    }
}

fn is_lease_gone(e: &etcd_client::Error) -> bool {
    e.to_string().contains("lease not found")
}

async fn bounded<T>(
    t: Duration,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, FleetError> {
    match tokio::time::timeout(t, fut).await {
        Ok(r) => r.map_err(classify),
        Err(_) => Err(FleetError::Unreachable(format!(
            "etcd did not answer within {t:?}"
        ))),
    }
}

fn connect(bridge: &Bridge, opts: &EtcdOptions) -> Result<Client, FleetError> {
    let endpoints = opts.endpoints.clone();
    let t = opts.rpc_timeout;
    bridge.run(async move {
        let co = ConnectOptions::new()
            .with_connect_timeout(t)
            .with_timeout(t);
        // The channel connects lazily: this succeeds with etcd down (R10.5), calls fail.
        bounded(t, Client::connect(endpoints, Some(co))).await
    })
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> FleetError {
    FleetError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    }
}

/// One node's membership and grants on etcd.
pub struct EtcdCoordinator {
    bridge: Bridge,
    client: Client,
    node: NodeId,
    opts: EtcdOptions,
    /// The lease joined with and the TTL etcd granted.
    lease: Mutex<Option<(LeaseId, Duration)>>,
    /// The fleet-link address written in the node record at join.
    link: Mutex<Option<SocketAddr>>,
}

impl std::fmt::Debug for EtcdCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCoordinator")
            .field("node", &self.node)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl EtcdCoordinator {
    /// A coordinator for `node` (no lease yet: [`Coordinator::join`]).
    pub fn connect(node: NodeId, opts: EtcdOptions) -> Result<EtcdCoordinator, FleetError> {
        let bridge = Bridge::new()?;
        let client = connect(&bridge, &opts)?;
        Ok(EtcdCoordinator {
            bridge,
            client,
            node,
            opts,
            lease: Mutex::new(None),
            link: Mutex::new(None),
        })
    }

    /// Sets this node's fleet-link address (where its [`crate::replica::ReplicaServer`]
    /// listens), written in its node record at the next [`Coordinator::join`]: call it
    /// before joining.
    pub fn set_link(&self, addr: SocketAddr) {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
    }

    /// The fleet-link addresses of the live nodes that published one (R10.4: where to
    /// replicate an instance's flows to its runner-up). A record whose address does not
    /// parse is left out.
    pub fn links(&self) -> Result<HashMap<NodeId, SocketAddr>, FleetError> {
        self.nodes().map(|(_, links)| links)
    }

    /// The live nodes (sorted, as [`Coordinator::live_nodes`]) and the fleet-link addresses
    /// of those that published one ([`EtcdCoordinator::links`]), from one read of the node
    /// records: what a member's tick needs after its own round, in one etcd call instead of two.
    pub fn nodes(&self) -> Result<(Vec<NodeId>, HashMap<NodeId, SocketAddr>), FleetError> {
        let mut c = self.client.clone();
        let t = self.opts.rpc_timeout;
        let prefix = self.opts.node_prefix();
        self.bridge.run(async move {
            let r = bounded(
                t,
                c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
            let mut out = HashMap::new();
            let mut nodes = Vec::with_capacity(r.kvs().len());
            for kv in r.kvs() {
                let k = kv.key_str().map_err(|e| corrupt(&prefix, e))?;
                let id = k.strip_prefix(prefix.as_str()).unwrap_or(k);
                nodes.push(NodeId::new(id).map_err(|e| corrupt(k, e))?);
                let rec: NodeRecord =
                    serde_json::from_slice(kv.value()).map_err(|e| corrupt(k, e))?;
                if let Some(addr) = rec.link.as_deref().and_then(|a| a.parse().ok()) {
                    out.insert(rec.node, addr);
                }
            }
            nodes.sort();
            Ok((nodes, out))
        })
    }

    /// The lease this node joined with, if any.
    pub fn lease_id(&self) -> Option<LeaseId> {
        self.lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|(l, _)| l)
    }

    fn joined(&self) -> Result<(LeaseId, Duration), FleetError> {
        self.lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ok_or_else(|| FleetError::NotJoined(self.node.clone()))
    }

    fn set_lease(&self, l: Option<(LeaseId, Duration)>) {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = l;
    }

    /// Records this node's last takeover ([`Takeover`], for `snatgw fleet`), bound to its
    /// lease so it goes with it.
    pub fn record_takeover(&self, t: &Takeover) -> Result<(), FleetError> {
        let (lease, _) = self.joined()?;
        let mut c = self.client.clone();
        let timeout = self.opts.rpc_timeout;
        let key = format!("{}{}", self.opts.takeover_prefix(), self.node);
        let value = serde_json::to_vec(t).map_err(|e| FleetError::Store(e.to_string()))?;
        self.bridge.run(async move {
            bounded(
                timeout,
                c.put(key, value, Some(PutOptions::new().with_lease(lease.0))),
            )
            .await?;
            Ok(())
        })
    }
}

impl Coordinator for EtcdCoordinator {
    fn node(&self) -> &NodeId {
        &self.node
    }

    fn config(&self) -> LeaseConfig {
        self.opts.lease
    }

    fn join(&self, now: Duration) -> Result<LocalLease, FleetError> {
        let mut c = self.client.clone();
        let t = self.opts.rpc_timeout;
        let ttl = self.opts.lease.ttl_secs();
        let key = self.opts.node_key(&self.node);
        let node = self.node.clone();
        let link = self
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|a| a.to_string());
        let (id, granted) = self.bridge.run(async move {
            let g = bounded(t, c.lease_grant(ttl, None)).await?;
            let id = g.id();
            let rec = serde_json::to_vec(&NodeRecord {
                node,
                lease: LeaseId(id),
                link,
            })
            .map_err(|e| FleetError::Store(e.to_string()))?;
            bounded(t, c.put(key, rec, Some(PutOptions::new().with_lease(id)))).await?;
            Ok((
                LeaseId(id),
                Duration::from_secs(g.ttl().max(0).unsigned_abs()),
            ))
        })?;
        self.set_lease(Some((id, granted)));
        Ok(self.opts.lease.local_lease(id, now, granted))
    }

    fn renew(&self, now: Duration) -> Result<LocalLease, FleetError> {
        let (id, granted) = self.joined()?;
        let mut c = self.client.clone();
        let t = self.opts.rpc_timeout;
        let node = self.node.clone();
        let r = self.bridge.run(async move {
            // A fresh stream per renewal: its one answer is the answer to this request.
            match tokio::time::timeout(t, c.lease_keep_alive(id.0)).await {
                Ok(Ok((_keeper, _stream))) => Ok(()),
                Ok(Err(e)) if is_lease_gone(&e) => Err(FleetError::LeaseExpired(node)),
                Ok(Err(e)) => Err(classify(e)),
                Err(_) => Err(FleetError::Unreachable(format!(
                    "etcd did not answer within {t:?}"
                ))),
            }
        });
        match r {
            Ok(()) => Ok(self.opts.lease.local_lease(id, now, granted)),
            Err(FleetError::LeaseExpired(n)) => {
                self.set_lease(None);
                Err(FleetError::LeaseExpired(n))
            }
            Err(e) => Err(e),
        }
    }

    fn leave(&self, _now: Duration) -> Result<(), FleetError> {
        let (id, _) = self.joined()?;
        let mut c = self.client.clone();
        let t = self.opts.rpc_timeout;
        self.bridge.run(async move {
            match tokio::time::timeout(t, c.lease_revoke(id.0)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) if is_lease_gone(&e) => Ok(()),
                Ok(Err(e)) => Err(classify(e)),
                Err(_) => Err(FleetError::Unreachable(format!(
                    "etcd did not answer within {t:?}"
                ))),
            }
        })?;
        self.set_lease(None);
        Ok(())
    }

    fn live_nodes(&self, _now: Duration) -> Result<Vec<NodeId>, FleetError> {
        let mut c = self.client.clone();
        let t = self.opts.rpc_timeout;
        let prefix = self.opts.node_prefix();
        self.bridge.run(async move {
            let r = bounded(
                t,
                c.get(
                    prefix.clone(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
            )
            .await?;
            let mut nodes = Vec::with_capacity(r.kvs().len());
            for kv in r.kvs() {
                let k = kv.key_str().map_err(|e| corrupt(&prefix, e))?;
                let id = k.strip_prefix(prefix.as_str()).unwrap_or(k);
                nodes.push(NodeId::new(id).map_err(|e| corrupt(k, e))?);
            }
            nodes.sort();
            Ok(nodes)
        })
    }

    fn read_grant(&self, res: &Resource, _now: Duration) -> Result<GrantRead, FleetError> {
        let mut c = self.client.clone();
        let t = self.opts.rpc_timeout;
        let key = self.opts.grant_key(res);
        let resource = res.clone();
        self.bridge.run(async move {
            let r = bounded(t, c.get(key.clone(), None)).await?;
            match r.kvs().first() {
                None => Ok(GrantRead {
                    resource,
                    holder: None,
                    revision: Revision(0),
                }),
                Some(kv) => {
                    let h: Holder =
                        serde_json::from_slice(kv.value()).map_err(|e| corrupt(&key, e))?;
                    Ok(GrantRead {
                        resource,
                        holder: Some(h),
                        revision: Revision(kv.mod_revision()),
                    })
                }
            }
        })
    }

    fn grant(&self, read: &GrantRead, _now: Duration) -> Result<Grant, FleetError> {
        let (lease, _) = self.joined()?;
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
        let mut c = self.client.clone();
        let t = self.opts.rpc_timeout;
        let gkey = self.opts.grant_key(&read.resource);
        let nkey = self.opts.node_key(&self.node);
        let read = read.clone();
        self.bridge.run(async move {
            let value = serde_json::to_vec(&me).map_err(|e| FleetError::Store(e.to_string()))?;
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(gkey.clone(), CompareOp::Equal, read.revision.0),
                    Compare::lease(nkey.clone(), CompareOp::Equal, lease.0),
                ])
                .and_then(vec![TxnOp::put(
                    gkey.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease.0)),
                )])
                .or_else(vec![
                    TxnOp::get(gkey.clone(), None),
                    TxnOp::get(nkey.clone(), None),
                ]);
            let r = bounded(t, c.txn(txn)).await?;
            if r.succeeded() {
                let rev = r.header().map_or(0, |h| h.revision());
                return Ok(Grant {
                    resource: read.resource,
                    holder: me,
                    revision: Revision(rev),
                });
            }
            let ops = r.op_responses();
            let found = match ops.first() {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().map_or(0, |kv| kv.mod_revision()),
                _ => 0,
            };
            if found != read.revision.0 {
                return Err(FleetError::Conflict {
                    resource: read.resource.key(),
                    expected: read.revision,
                    found: Revision(found),
                });
            }
            Err(FleetError::NotLive(me.node))
        })
    }

    fn release(&self, grant: &Grant, _now: Duration) -> Result<(), FleetError> {
        let mut c = self.client.clone();
        let t = self.opts.rpc_timeout;
        let gkey = self.opts.grant_key(&grant.resource);
        let grant = grant.clone();
        self.bridge.run(async move {
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    gkey.clone(),
                    CompareOp::Equal,
                    grant.revision.0,
                )])
                .and_then(vec![TxnOp::delete(gkey.clone(), None)])
                .or_else(vec![TxnOp::get(gkey.clone(), None)]);
            let r = bounded(t, c.txn(txn)).await?;
            if r.succeeded() {
                return Ok(());
            }
            let found = match r.op_responses().first() {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().map_or(0, |kv| kv.mod_revision()),
                _ => 0,
            };
            Err(FleetError::Conflict {
                resource: grant.resource.key(),
                expected: grant.revision,
                found: Revision(found),
            })
        })
    }
}

/// The desired topology on etcd: the control plane's [`Store`] for a fleet, plus a watch.
///
/// Same semantics as the redb store: one record, replaced atomically (one etcd `put` inside a
/// `Txn`). Across nodes, generations only grow: a save whose generation is not above the
/// stored one is refused (unless it is the very record stored), and the write is fenced on the
/// record's `mod_revision`, so of two nodes saving the same next generation exactly one wins.
pub struct EtcdStore {
    bridge: Bridge,
    client: Client,
    key: String,
    rpc_timeout: Duration,
    latest: Arc<tokio::sync::watch::Sender<Option<Stored>>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn store_err(e: FleetError) -> StoreError {
    match e {
        FleetError::Unreachable(message) => StoreError::Unreachable {
            store: "etcd".into(),
            message,
        },
        FleetError::Corrupt { message, .. } => StoreError::Corrupt(message),
        other => StoreError::Database(format!("etcd: {other}")),
    }
}

/// How many times a save retries when another node wrote between its read and its write.
const SAVE_RETRIES: usize = 5;

impl EtcdStore {
    /// Connects and starts watching the topology key (the watch reconnects by itself, so it
    /// resumes after etcd comes back).
    pub fn connect(opts: &EtcdOptions) -> Result<EtcdStore, FleetError> {
        let bridge = Bridge::new()?;
        let client = connect(&bridge, opts)?;
        let (tx, _) = tokio::sync::watch::channel(None);
        let latest = Arc::new(tx);
        let store = EtcdStore {
            client: client.clone(),
            key: opts.topology_key(),
            rpc_timeout: opts.rpc_timeout,
            latest: latest.clone(),
            bridge,
        };
        let key = store.key.clone();
        let t = opts.rpc_timeout;
        store.bridge.handle().spawn(async move {
            loop {
                // Any end of the stream (etcd restarted, compaction, connection lost) is
                // followed by a fresh read and a new watch from the revision after it.
                let _ = watch_once(client.clone(), &key, t, &latest).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ok(store)
    }

    /// The newest topology seen through the watch (`None` until one is stored). Every save,
    /// made through any node, shows up here; a receiver is woken when the generation grows.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<Stored>> {
        self.latest.subscribe()
    }

    async fn read(
        mut c: Client,
        key: String,
        t: Duration,
    ) -> Result<(Option<Stored>, i64), FleetError> {
        let r = bounded(t, c.get(key.clone(), None)).await?;
        match r.kvs().first() {
            None => Ok((None, 0)),
            Some(kv) => {
                let s: Stored = serde_json::from_slice(kv.value()).map_err(|e| corrupt(&key, e))?;
                Ok((Some(s), kv.mod_revision()))
            }
        }
    }
}

fn publish(latest: &tokio::sync::watch::Sender<Option<Stored>>, s: Stored) {
    latest.send_if_modified(|cur| {
        if cur.as_ref().is_none_or(|c| c.generation < s.generation) {
            *cur = Some(s);
            true
        } else {
            false
        }
    });
}

async fn watch_once(
    mut c: Client,
    key: &str,
    t: Duration,
    latest: &tokio::sync::watch::Sender<Option<Stored>>,
) -> Result<(), FleetError> {
    let r = bounded(t, c.get(key, None)).await?;
    let rev = r.header().map_or(0, |h| h.revision());
    if let Some(kv) = r.kvs().first() {
        if let Ok(s) = serde_json::from_slice::<Stored>(kv.value()) {
            publish(latest, s);
        }
    }
    let mut ws = bounded(
        t,
        c.watch(key, Some(WatchOptions::new().with_start_revision(rev + 1))),
    )
    .await?;
    while let Some(resp) = ws.message().await.map_err(classify)? {
        if resp.canceled() {
            return Err(FleetError::Store(format!(
                "watch canceled: {}",
                resp.cancel_reason()
            )));
        }
        for ev in resp.events() {
            if ev.event_type() != EventType::Put {
                continue;
            }
            if let Some(s) = ev
                .kv()
                .and_then(|kv| serde_json::from_slice::<Stored>(kv.value()).ok())
            {
                publish(latest, s);
            }
        }
    }
    Ok(())
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Option<Stored>, StoreError> {
        let (c, key, t) = (self.client.clone(), self.key.clone(), self.rpc_timeout);
        let (s, _) = self
            .bridge
            .run(EtcdStore::read(c, key, t))
            .map_err(store_err)?;
        if let Some(s) = &s {
            publish(&self.latest, s.clone());
        }
        Ok(s)
    }

    fn save(&self, s: &Stored) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(s).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        for _ in 0..SAVE_RETRIES {
            let (c, key, t) = (self.client.clone(), self.key.clone(), self.rpc_timeout);
            let (cur, rev) = self
                .bridge
                .run(EtcdStore::read(c.clone(), key.clone(), t))
                .map_err(store_err)?;
            if let Some(cur) = cur {
                if cur == *s {
                    return Ok(());
                }
                if cur.generation >= s.generation {
                    return Err(StoreError::Conflict {
                        store: "etcd".into(),
                        stored: cur.generation,
                        attempted: s.generation,
                    });
                }
            }
            let value = bytes.clone();
            let won = self
                .bridge
                .run(async move {
                    let mut c = c;
                    let txn = Txn::new()
                        .when(vec![Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            rev,
                        )])
                        .and_then(vec![TxnOp::put(key, value, None)]);
                    Ok(bounded(t, c.txn(txn)).await?.succeeded())
                })
                .map_err(store_err)?;
            if won {
                publish(&self.latest, s.clone());
                return Ok(());
            }
        }
        // Another node kept writing between our read and our write: we lost every time.
        let stored = self
            .bridge
            .run(EtcdStore::read(
                self.client.clone(),
                self.key.clone(),
                self.rpc_timeout,
            ))
            .map_err(store_err)?
            .0
            .map_or(0, |c| c.generation);
        Err(StoreError::Conflict {
            store: "etcd".into(),
            stored,
            attempted: s.generation,
        })
    }
}
