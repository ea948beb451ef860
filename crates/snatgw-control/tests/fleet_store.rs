//! The control plane of a fleet (issue #19, SPEC R10.1, R10.5) over a shared store, here an
//! in-memory one with the fleet store's semantics (generations only grow, a save that loses
//! to another node's save of the same generation is a `Conflict`, a store that is down is
//! `Unreachable`, every save reaches every node's watch). The same planes over the real
//! `EtcdStore` are exercised by `snatgw`'s `fleet_etcd` test, with `snatgw run --fleet`.
//!
//! - a change made through one node's API applies on the other (its follower adopts it
//!   through validate, engine check, apply, publish);
//! - a store that is down answers writes 503 naming etcd, rule R10.5, and changes nothing;
//! - a save that lost to another node's write answers 409, rule R10.1, and once the other
//!   node's topology arrived, the next write goes through.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snatgw_control::{
    serve, Adopted, Client, ControlPlane, Follower, ServerHandle, Store, StoreError, Stored,
};
use snatgw_core::config::InstanceCfg;
use snatgw_core::ConfigFile;
use tokio::sync::watch;

mod common;
use common::{api_err, localhost, Plane};

const TOPOLOGY: &str = r#"
[gateway]
seed = 1
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100", "192.0.2.101"]

[[public_ip]]
name = "pip-a"
address = "203.0.113.10"
[[public_ip]]
name = "pip-b"
address = "203.0.113.11"

[[instance]]
name = "vm1"
private_ip = "10.0.1.10"

[[instance]]
name = "vm2"
private_ip = "10.0.1.11"
"#;

/// A store shared by the nodes of a test fleet, with a watch like `EtcdStore::subscribe`.
struct SharedStore {
    state: Mutex<Option<Stored>>,
    latest: watch::Sender<Option<Stored>>,
    down: AtomicBool,
}

impl SharedStore {
    fn new() -> Arc<SharedStore> {
        Arc::new(SharedStore {
            state: Mutex::new(None),
            latest: watch::channel(None).0,
            down: AtomicBool::new(false),
        })
    }

    /// A write made by another node, which nobody follows in the test yet.
    fn write_behind(&self, s: Stored) {
        *self.state.lock().expect("lock") = Some(s);
    }

    fn publish(&self) {
        let s = self.state.lock().expect("lock").clone();
        self.latest.send_replace(s);
    }
}

impl Store for SharedStore {
    fn load(&self) -> Result<Option<Stored>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(unreachable());
        }
        Ok(self.state.lock().expect("lock").clone())
    }

    fn save(&self, s: &Stored) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(unreachable());
        }
        {
            let mut cur = self.state.lock().expect("lock");
            if let Some(c) = cur.as_ref() {
                if c != s && c.generation >= s.generation {
                    return Err(StoreError::Conflict {
                        store: "etcd".into(),
                        stored: c.generation,
                        attempted: s.generation,
                    });
                }
            }
            *cur = Some(s.clone());
        }
        self.publish();
        Ok(())
    }
}

fn unreachable() -> StoreError {
    StoreError::Unreachable {
        store: "etcd".into(),
        message: "etcd did not answer within 1s".into(),
    }
}

/// One node: its gateway, plane, server and client.
struct Node {
    plane: ControlPlane,
    server: Option<ServerHandle>,
    client: Client,
    follower: Option<Follower>,
    adopted: Arc<Mutex<Vec<Result<Adopted, String>>>>,
}

impl Node {
    fn start(store: &Arc<SharedStore>) -> Node {
        let p = Plane::seed(TOPOLOGY, store.clone());
        let plane = p.control(Arc::new(p.backend()), None);
        let server = serve(localhost(), plane.clone()).expect("serve");
        let client = Client::new(&format!("http://{}", server.local_addr()), None);
        Node {
            plane,
            server: Some(server),
            client,
            follower: None,
            adopted: Arc::default(),
        }
    }

    fn follow(&mut self, store: &SharedStore) {
        let log = self.adopted.clone();
        self.follower = Some(
            self.plane
                .follow(store.latest.subscribe(), move |_, r| {
                    log.lock()
                        .expect("lock")
                        .push(r.clone().map_err(|e| e.to_string()));
                })
                .expect("follow"),
        );
    }

    fn wait_generation(&self, g: u64, within: Duration) -> Duration {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if self.plane.current().generation >= g {
                return t0.elapsed();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!(
            "generation {g} not adopted within {within:?} (at {}): {:?}",
            self.plane.current().generation,
            self.adopted.lock().expect("lock")
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(f) = self.follower.take() {
            f.stop();
        }
        if let Some(s) = self.server.take() {
            let _ = s.shutdown();
        }
    }
}

fn vm(name: &str, ip: &str, public_ip: Option<&str>) -> InstanceCfg {
    let mut t = ConfigFile::from_toml(TOPOLOGY).expect("topology");
    let mut i = t.instance.remove(0);
    i.name = name.into();
    i.private_ip = ip.into();
    i.public_ip = public_ip.map(str::to_string);
    i
}

#[test]
fn r10_1_a_change_through_any_node_applies_on_every_node() {
    let store = SharedStore::new();
    let mut a = Node::start(&store);
    let mut b = Node::start(&store);
    a.follow(&store);
    b.follow(&store);
    assert_eq!(
        b.plane.current().generation,
        1,
        "b seeded from the store a seeded"
    );
    // An ILPIP for vm1 through a's API (R1.4): b runs it too, through its own engine.
    let put = a
        .client
        .put(&vm("vm1", "10.0.1.10", Some("pip-a")), None)
        .expect("put on a");
    assert_eq!(put.generation, Some(2));
    let took = b.wait_generation(2, Duration::from_secs(1));
    eprintln!("b adopted generation 2 after {took:?}");
    let ports = b.client.instance_ports("vm1").expect("ports on b");
    assert_eq!(ports.scenario, "ilpip", "b's engine runs the change");
    assert_eq!(
        b.client.topology().expect("topology on b").value,
        a.client.topology().expect("topology on a").value
    );
    // And the other way round: a new instance through b reaches a's engine.
    b.client
        .put(&vm("vm3", "10.0.1.12", None), None)
        .expect("put on b");
    a.wait_generation(3, Duration::from_secs(1));
    assert_eq!(
        a.client.instance_ports("vm3").expect("vm3 on a").scenario,
        "default_snat"
    );
    // Each node's own save comes back through the watch and changes nothing.
    let log = a.adopted.lock().expect("lock").clone();
    assert!(
        log.iter()
            .any(|r| matches!(r, Ok(Adopted::Current { generation: 2 }))),
        "{log:?}"
    );
    assert!(
        log.iter().any(|r| matches!(
            r,
            Ok(Adopted::Applied {
                generation: 3,
                designations_differ: false
            })
        )),
        "{log:?}"
    );
}

#[test]
fn r10_5_store_unreachable_answers_503_naming_etcd_and_changes_nothing() {
    let store = SharedStore::new();
    let a = Node::start(&store);
    let before = a.client.topology().expect("topology").value;
    let mut reseeded = before.clone();
    reseeded.gateway.seed = 9;
    store.down.store(true, Ordering::SeqCst);
    for r in [
        api_err(a.client.put(&vm("vm1", "10.0.1.10", Some("pip-a")), None)),
        api_err(a.client.put_topology(&reseeded, None)),
        api_err(a.client.delete::<InstanceCfg>("vm2", None)),
    ] {
        let (status, body) = r;
        assert_eq!(status, 503, "{body:?}");
        assert_eq!(body.rule.as_deref(), Some("R10.5"), "{body:?}");
        assert!(body.error.contains("etcd unreachable"), "{body:?}");
        assert!(body.error.contains("not saved or applied"), "{body:?}");
    }
    assert_eq!(a.client.topology().expect("topology").value, before);
    assert_eq!(
        a.client.instance_ports("vm1").expect("ports").scenario,
        "default_snat",
        "nothing applied while the store is down"
    );
    assert_eq!(a.plane.current().generation, 1);
    store.down.store(false, Ordering::SeqCst);
    let put = a
        .client
        .put(&vm("vm1", "10.0.1.10", Some("pip-a")), None)
        .expect("put after the store is back");
    assert_eq!(put.generation, Some(2));
    assert_eq!(
        a.client.instance_ports("vm1").expect("ports").scenario,
        "ilpip"
    );
}

#[test]
fn r10_1_a_save_lost_to_another_node_answers_409_then_the_winner_is_adopted() {
    let store = SharedStore::new();
    let mut a = Node::start(&store);
    // Another node saved generation 2 (vm2 gets an ILPIP); a has not seen it yet.
    let mut theirs = a.plane.current();
    theirs.generation = 2;
    theirs
        .config
        .instance
        .iter_mut()
        .filter(|i| i.name == "vm2")
        .for_each(|i| i.public_ip = Some("pip-b".into()));
    store.write_behind(theirs.clone());
    let (status, body) = api_err(a.client.put(&vm("vm1", "10.0.1.10", Some("pip-a")), None));
    assert_eq!(status, 409, "{body:?}");
    assert_eq!(body.rule.as_deref(), Some("R10.1"), "{body:?}");
    assert!(
        body.error.contains("generation 2") && body.error.contains("another node"),
        "{body:?}"
    );
    assert_eq!(
        a.client.instance_ports("vm1").expect("ports").scenario,
        "default_snat",
        "the lost change is not applied"
    );
    // The winner's record arrives by the watch; a adopts it, then writes on top of it.
    a.follow(&store);
    store.publish();
    a.wait_generation(2, Duration::from_secs(1));
    assert_eq!(
        a.client.instance_ports("vm2").expect("ports").scenario,
        "ilpip"
    );
    let put = a
        .client
        .put(&vm("vm1", "10.0.1.10", Some("pip-a")), None)
        .expect("retry after adopting");
    assert_eq!(put.generation, Some(3));
    assert_eq!(a.plane.current().config.instance.len(), 2);
}

#[test]
fn r10_1_a_topology_this_engine_refuses_is_not_adopted() {
    let store = SharedStore::new();
    let mut a = Node::start(&store);
    a.follow(&store);
    let mut bad = a.plane.current();
    bad.generation = 2;
    bad.config.instance[0].public_ip = Some("no-such-ip".into());
    store.write_behind(bad);
    store.publish();
    let t0 = Instant::now();
    while a.adopted.lock().expect("lock").iter().all(|r| r.is_ok()) {
        assert!(t0.elapsed() < Duration::from_secs(2), "no refusal reported");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        a.plane.current().generation,
        1,
        "the node keeps what it ran"
    );
    let err = a
        .adopted
        .lock()
        .expect("lock")
        .iter()
        .find_map(|r| r.clone().err())
        .expect("an error");
    assert!(err.contains("no-such-ip"), "{err}");
}
