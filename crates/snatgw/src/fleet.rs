//! The fleet in the binary (issue #19, SPEC §10): `snatgw run --fleet etcd://HOST:PORT[,...]
//! --node-id ID` and `snatgw fleet`.
//!
//! With `--fleet`, `snatgw run` ([`FleetRun`]) keeps the desired topology in etcd
//! (`snatgw_fleet::EtcdStore`, seeded from the configuration file when empty, as the redb
//! store is) and follows its watch, so a change made through any node's API is adopted by
//! every node's control plane and engine ([`snatgw_control::ControlPlane::follow`]); a write
//! while etcd is unreachable answers 503 (R10.5). The node joins under a lease and runs the
//! fleet's `Member` loop on a thread: rendezvous ownership of the instances (R10.1) through
//! fenced grants (R10.2), ownership changes logged, `/metrics` gauges.
//!
//! Self-fencing (R10.2) in the data path: the gateway gets an admission
//! ([`snatgw_dataplane::Gateway::set_admission`]) that lets a new outbound flow open only for
//! an instance whose grant this node holds, and only while its local lease view is valid
//! (checked against the clock at every new flow, so a node whose loop is stuck stops on time).
//! Flows already open go on. The engine keeps running the whole topology, so every node
//! computes the same port blocks for every instance (R2.8 pool sizes depend on group sizes).
//!
//! Not built: steering (R10.3). A node translates new flows only for the instances it owns;
//! new flows of other instances that reach it are dropped (`not_owned`). Flow takeover (R10.4) is not built either.
//!
//! Without `--fleet` none of this runs (R10.6).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use snatgw_control::{ControlPlane, FleetGauges, FleetGaugesSource, Store};
use snatgw_dataplane::Gateway;
use snatgw_fleet::{
    Coordinator, EtcdCoordinator, EtcdOptions, EtcdStore, LeaseConfig, Member, MonotonicClock,
    NodeId, Resource, Takeover,
};

/// The etcd endpoints of `--fleet etcd://HOST:PORT[,HOST:PORT]`, as client URLs.
#[derive(Debug, Clone)]
pub struct FleetUrl(pub Vec<String>);

/// Parses `etcd://HOST:PORT[,HOST:PORT...]`.
pub fn parse_fleet_url(s: &str) -> Result<FleetUrl, String> {
    let rest = s
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("{s:?}: expected etcd://HOST:PORT[,HOST:PORT]"))?;
    let eps: Vec<String> = rest
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (h, p) = e
                .rsplit_once(':')
                .ok_or_else(|| format!("{e:?}: expected HOST:PORT"))?;
            p.parse::<u16>()
                .map_err(|_| format!("{e:?}: the port is not a number 1-65535"))?;
            if h.is_empty() {
                return Err(format!("{e:?}: no host"));
            }
            Ok(format!("http://{e}"))
        })
        .collect::<Result<_, String>>()?;
    if eps.is_empty() {
        return Err(format!("{s:?}: no endpoint"));
    }
    Ok(FleetUrl(eps))
}

fn options(url: &FleetUrl, ttl_secs: u64) -> Result<EtcdOptions, String> {
    let mut o = EtcdOptions::new(url.0.clone());
    o.lease = LeaseConfig::new(Duration::from_secs(ttl_secs))
        .map_err(|e| format!("--fleet-ttl-secs: {e}"))?;
    Ok(o)
}

/// What the data path and `/metrics` read of the node's view, written by its loop.
struct View {
    /// Private addresses of the instances whose grant the node holds.
    owned: HashSet<u32>,
    /// Their names, for the gauges.
    owned_names: usize,
    /// The local lease view's end (self-fencing deadline) on [`Shared::clock`].
    valid_until: Duration,
    nodes_live: u64,
}

struct Shared {
    node: NodeId,
    clock: MonotonicClock,
    view: RwLock<View>,
}

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the node may open a new flow for the instance at `private` now (R10.2).
    fn admits(&self, private: u32) -> bool {
        let v = self.read();
        self.clock.now() < v.valid_until && v.owned.contains(&private)
    }

    fn gauges(&self) -> FleetGauges {
        let v = self.read();
        let left = v.valid_until.saturating_sub(self.clock.now());
        let valid = !left.is_zero();
        FleetGauges {
            node: self.node.to_string(),
            nodes_live: v.nodes_live,
            instances_owned: if valid { v.owned_names as u64 } else { 0 },
            lease_valid_seconds: left.as_secs_f64(),
        }
    }
}

/// A node of a fleet being started by `snatgw run --fleet`.
pub struct FleetRun {
    store: Arc<EtcdStore>,
    coord: Arc<EtcdCoordinator>,
    shared: Arc<Shared>,
}

impl FleetRun {
    /// Connects to etcd (the store and the coordinator; no lease yet).
    pub fn connect(url: &FleetUrl, node_id: &str, ttl_secs: u64) -> Result<FleetRun, String> {
        let node = NodeId::new(node_id).map_err(|e| format!("--node-id: {e}"))?;
        let opts = options(url, ttl_secs)?;
        let store = EtcdStore::connect(&opts).map_err(|e| format!("--fleet: {e}"))?;
        let coord =
            EtcdCoordinator::connect(node.clone(), opts).map_err(|e| format!("--fleet: {e}"))?;
        Ok(FleetRun {
            store: Arc::new(store),
            coord: Arc::new(coord),
            shared: Arc::new(Shared {
                node,
                clock: MonotonicClock::new(),
                view: RwLock::new(View {
                    owned: HashSet::new(),
                    owned_names: 0,
                    valid_until: Duration::ZERO,
                    nodes_live: 0,
                }),
            }),
        })
    }

    /// The topology store (etcd).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// This node's gauges for `/metrics`.
    pub fn gauges(&self) -> FleetGaugesSource {
        let s = self.shared.clone();
        Arc::new(move || s.gauges())
    }

    /// Fences the gateway by ownership, follows the store's watch with `plane`, and starts
    /// the membership loop.
    pub fn start(
        self,
        plane: ControlPlane,
        gateway: &Arc<Mutex<Gateway>>,
    ) -> Result<FleetNode, String> {
        let s = self.shared.clone();
        gateway
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_admission(Some(Arc::new(move |src| s.admits(src))));
        let follower = plane
            .follow(self.store.subscribe(), |stored, r| match r {
                Ok(snatgw_control::Adopted::Applied {
                    generation,
                    designations_differ,
                }) => {
                    tracing::info!(generation, "fleet: applied a topology saved through another node");
                    if *designations_differ {
                        tracing::warn!(generation, "fleet: this engine's default-SNAT designations differ from the stored ones (R1.3); a restart takes the stored ones");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::error!(
                    generation = stored.generation,
                    error = %e,
                    "fleet: a topology saved through another node was refused here; this node keeps running the previous one"
                ),
            })
            .map_err(|e| format!("following the fleet's topology: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, shared, coord) = (stop.clone(), self.shared.clone(), self.coord.clone());
            std::thread::Builder::new()
                .name("snatgw-fleet-member".into())
                .spawn(move || member_loop(&coord, &shared, &plane, &stop))
                .map_err(|e| format!("spawning the fleet thread: {e}"))?
        };
        tracing::info!(
            node = %self.shared.node,
            ttl_secs = self.coord.config().ttl().as_secs(),
            "fleet: joining; this node translates new flows only for the instances it owns (rendezvous, R10.1); steering (R10.3) is not built: new flows of other instances that reach this node are dropped"
        );
        Ok(FleetNode {
            stop,
            thread: Some(thread),
            _follower: follower,
        })
    }
}

/// A running fleet node: its membership loop and topology follower.
pub struct FleetNode {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _follower: snatgw_control::Follower,
}

impl FleetNode {
    /// Stops translating new flows for everything, leaves the fleet (the lease is revoked, so
    /// the other nodes take the instances over at their next tick), stops following.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn private_ips(cfg: &snatgw_core::ConfigFile, names: &[String]) -> HashSet<u32> {
    cfg.instance
        .iter()
        .filter(|i| names.contains(&i.name))
        .filter_map(|i| i.private_ip.parse::<Ipv4Addr>().ok().map(u32::from))
        .collect()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn member_loop(
    coord: &Arc<EtcdCoordinator>,
    shared: &Shared,
    plane: &ControlPlane,
    stop: &AtomicBool,
) {
    let mut member = Member::new(coord.clone());
    let every = coord.config().renew_interval();
    let mut last_error: Option<String> = None;
    let mut was_valid = false;
    while !stop.load(Ordering::SeqCst) {
        let cfg = plane.current().config;
        let resources: Vec<Resource> = cfg
            .instance
            .iter()
            .map(|i| Resource::Instance(i.name.clone()))
            .collect();
        let now = shared.clock.now();
        let rep = member.tick(now, &resources);
        let owned: Vec<String> = member
            .view()
            .grants()
            .filter_map(|g| match &g.resource {
                Resource::Instance(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        let valid_until = member
            .view()
            .lease()
            .map_or(Duration::ZERO, |l| l.valid_until);
        let live = coord.live_nodes(shared.clock.now()).ok();
        {
            let mut v = shared.view.write().unwrap_or_else(|p| p.into_inner());
            v.owned = private_ips(&cfg, &owned);
            v.owned_names = owned.len();
            v.valid_until = valid_until;
            if let Some(l) = &live {
                v.nodes_live = l.len() as u64;
            }
        }
        if !rep.gained.is_empty() || !rep.lost.is_empty() {
            let names = |r: &[Resource]| {
                r.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            tracing::info!(
                node = %shared.node,
                gained = %names(&rep.gained),
                lost = %names(&rep.lost),
                owned = owned.len(),
                nodes = live.as_ref().map_or(0, Vec::len),
                "fleet: ownership changed (steering, R10.3, is not built: this node opens new flows only for the instances it owns)"
            );
        }
        if !rep.gained.is_empty() {
            let t = Takeover {
                at_unix_ms: unix_ms(),
                instances: rep
                    .gained
                    .iter()
                    .filter_map(|r| match r {
                        Resource::Instance(n) => Some(n.clone()),
                        _ => None,
                    })
                    .collect(),
            };
            if let Err(e) = coord.record_takeover(&t) {
                tracing::debug!(error = %e, "fleet: recording the takeover");
            }
        }
        let err = rep.error.as_ref().map(ToString::to_string);
        if err != last_error {
            match &err {
                Some(e) => tracing::warn!(
                    node = %shared.node,
                    error = %e,
                    valid_for_ms = valid_until.saturating_sub(shared.clock.now()).as_millis() as u64,
                    "fleet: etcd call failed; translating goes on within owned instances while the lease view is valid (R10.5), topology changes are refused"
                ),
                None => tracing::info!(node = %shared.node, "fleet: etcd answers again"),
            }
            last_error = err;
        }
        if was_valid && !rep.valid {
            tracing::warn!(node = %shared.node, "fleet: lease view ended: no new flows for any instance until the node holds grants again (self-fencing, R10.2)");
        }
        was_valid = rep.valid;
        let until = shared.clock.now() + every;
        while !stop.load(Ordering::SeqCst) && shared.clock.now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    {
        let mut v = shared.view.write().unwrap_or_else(|p| p.into_inner());
        v.owned.clear();
        v.owned_names = 0;
        v.valid_until = Duration::ZERO;
    }
    match member.leave(shared.clock.now()) {
        Ok(()) => tracing::info!(node = %shared.node, "fleet: left (lease revoked)"),
        Err(e) => {
            tracing::warn!(node = %shared.node, error = %e, "fleet: leaving failed; the lease ends by itself")
        }
    }
}

/// `snatgw fleet`: the fleet as etcd holds it.
#[derive(clap::Args, Debug)]
pub struct FleetArgs {
    /// The fleet's etcd: `etcd://HOST:PORT[,HOST:PORT]`.
    #[arg(long, default_value = "etcd://127.0.0.1:2379", value_parser = parse_fleet_url)]
    pub fleet: FleetUrl,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `snatgw fleet`.
pub fn status(a: &FleetArgs) -> Result<(), String> {
    let opts = options(&a.fleet, 10)?;
    let st = snatgw_fleet::fleet_status(&opts).map_err(|e| e.to_string())?;
    if a.json {
        let s = serde_json::to_string_pretty(&st).map_err(|e| e.to_string())?;
        println!("{s}");
        return Ok(());
    }
    let now = unix_ms();
    println!(
        "{:<16} {:<18} {:>9} {:>9}  {:<28} instances",
        "node", "lease", "ttl left", "owned", "last takeover"
    );
    for n in &st.nodes {
        let last = n.last_takeover.as_ref().map_or("-".to_string(), |t| {
            format!(
                "{} s ago ({})",
                now.saturating_sub(t.at_unix_ms) / 1000,
                t.instances.len()
            )
        });
        println!(
            "{:<16} {:<18} {:>7} s {:>9}  {:<28} {}",
            n.node.as_str(),
            n.lease.to_string(),
            n.ttl_left_secs,
            n.instances.len(),
            last,
            if n.instances.is_empty() {
                "-".to_string()
            } else {
                n.instances.join(",")
            }
        );
    }
    if st.nodes.is_empty() {
        println!("(no live node)");
    }
    for (inst, h) in &st.other_grants {
        println!(
            "grant of {inst} held by {h}, whose lease is no live node's (it ends with that lease)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// R10.2: the data path's question (a new flow for the instance at this address?) is
    /// answered from the owned set *and* the clock, so the node stops at its lease view's end
    /// even if its loop is stuck in an etcd call.
    #[test]
    fn r10_2_admission_needs_ownership_and_a_valid_lease_view() {
        let s = Shared {
            node: NodeId::new("gw1").expect("id"),
            clock: MonotonicClock::new(),
            view: RwLock::new(View {
                owned: [u32::from(Ipv4Addr::new(10, 0, 1, 10))]
                    .into_iter()
                    .collect(),
                owned_names: 1,
                valid_until: Duration::from_secs(3600),
                nodes_live: 2,
            }),
        };
        let (mine, other) = (
            u32::from(Ipv4Addr::new(10, 0, 1, 10)),
            u32::from(Ipv4Addr::new(10, 0, 1, 11)),
        );
        assert!(s.admits(mine));
        assert!(!s.admits(other));
        let g = s.gauges();
        assert_eq!((g.nodes_live, g.instances_owned), (2, 1));
        assert!(g.lease_valid_seconds > 3000.0);
        // The lease view ended (no renewal got through): nothing is admitted, gauges say so.
        s.view.write().expect("lock").valid_until = s.clock.now();
        assert!(!s.admits(mine));
        let g = s.gauges();
        assert_eq!((g.instances_owned, g.lease_valid_seconds), (0, 0.0));
    }

    #[test]
    fn fleet_urls_parse() {
        assert_eq!(
            parse_fleet_url("etcd://127.0.0.1:2379,10.0.0.2:2379")
                .expect("ok")
                .0,
            vec!["http://127.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        for bad in [
            "http://x:1",
            "etcd://",
            "etcd://host",
            "etcd://h:99999",
            "etcd://:1",
        ] {
            assert!(parse_fleet_url(bad).is_err(), "{bad}");
        }
    }
}
