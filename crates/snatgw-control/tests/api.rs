//! End-to-end tests of the control plane: the real server on 127.0.0.1:0 with a
//! `GatewayBackend` over a real `Gateway`, driven only through the blocking `Client`.
//! Expected numbers come from the SPEC (tier table R2.8, port sharing R2.3, exhaustion R2.6),
//! not from the code.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snatgw_control::api::etag_of;
use snatgw_control::{
    serve, Client, ClientError, ControlError, EventLog, FlowQuery, GatewayBackend, MemoryStore,
    RedbStore, ResourceKind, SeedSource, ServerHandle, Store, Stored,
};
use snatgw_core::config::{
    AvailabilitySetCfg, DeploymentCfg, GatewayCfg, InstanceCfg, LoadBalancerCfg, PublicIpCfg,
};
use snatgw_core::{ConfigFile, Direction, Event, EventKind, InstanceKind, Model};
use snatgw_dataplane::Gateway;
use snatgw_wire::testutil;

mod common;
use common::{api_err, ip, Plane};

const TOKEN: &str = "s3cret-token";
const ROLES: u32 = 26;

/// The test topology: an ILPIP VM, a load-balanced VM, an availability set `as1` with one
/// VM, a Classic deployment `cs1` of 26 web/worker roles, three default-SNAT addresses.
fn topology_toml() -> String {
    let mut t = String::from(
        r#"
[gateway]
seed = 1
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100", "192.0.2.101", "192.0.2.102"]
max_flows = 100000

[[public_ip]]
name = "pip-ilpip"
address = "203.0.113.10"
[[public_ip]]
name = "pip-fe"
address = "203.0.113.20"
[[public_ip]]
name = "pip-spare"
address = "203.0.113.30"

[[availability_set]]
name = "as1"

[[deployment]]
name = "cs1"

[[instance]]
name = "vm-ilpip"
private_ip = "10.0.1.10"
public_ip = "pip-ilpip"

[[instance]]
name = "vm-lb1"
private_ip = "10.0.2.10"

[[instance]]
name = "vm-as-0"
private_ip = "10.0.3.10"
availability_set = "as1"
"#,
    );
    for i in 0..ROLES {
        t.push_str(&format!(
            "\n[[instance]]\nname = \"role-{i}\"\nkind = \"web_worker_role\"\nmodel = \"classic\"\ndeployment = \"cs1\"\nprivate_ip = \"10.0.4.{}\"\n",
            10 + i
        ));
    }
    t.push_str(
        r#"
[[load_balancer]]
name = "lb"
frontends = [ { name = "fe", public_ip = "pip-fe" } ]
backend_pools = [ { name = "web", members = ["vm-lb1"] } ]
rules = [ { name = "http", frontend = "fe", protocol = "tcp", frontend_port = 80, backend_pool = "web", backend_port = 80 } ]
"#,
    );
    t
}

struct Env {
    server: Option<ServerHandle>,
    client: Client,
    gateway: Arc<Mutex<Gateway>>,
    log: Arc<EventLog>,
    backend: Arc<GatewayBackend>,
    store: Arc<dyn Store>,
    now: Arc<AtomicU32>,
}

impl Env {
    fn start(token: Option<&str>, store: Arc<dyn Store>) -> Env {
        let plane = Plane::seed(&topology_toml(), store);
        let backend = Arc::new(plane.backend());
        let server = plane.serve(backend.clone(), token);
        let client = Client::new(
            &format!("http://{}", server.local_addr()),
            token.map(str::to_string),
        );
        Env {
            server: Some(server),
            client,
            gateway: plane.gateway,
            log: plane.log,
            backend,
            store: plane.store,
            now: plane.now,
        }
    }

    fn memory() -> Env {
        Env::start(Some(TOKEN), Arc::new(MemoryStore::new()))
    }

    /// Sends one packet from the private side at the current time.
    fn outbound(&self, pkt: &mut [u8]) -> snatgw_core::Verdict {
        let now = self.now.load(Ordering::SeqCst);
        self.gateway
            .lock()
            .expect("lock")
            .process(now, pkt, Direction::Outbound)
    }

    fn generation(&self) -> u64 {
        self.store.load().expect("load").expect("stored").generation
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().expect("clean shutdown");
        }
    }
}

fn as_vm(i: u32) -> InstanceCfg {
    InstanceCfg {
        name: format!("vm-as-{i}"),
        kind: InstanceKind::Vm,
        model: Model::Arm,
        private_ip: format!("10.0.3.{}", 10 + i),
        public_ip: None,
        availability_set: Some("as1".into()),
        deployment: None,
        max_flows: None,
    }
}

fn block_size(p: &snatgw_control::InstancePorts) -> u32 {
    p.block
        .iter()
        .map(|r| u32::from(r.last) - u32::from(r.first) + 1)
        .sum()
}

#[test]
fn every_collection_and_resource_can_be_read_with_etags() {
    let env = Env::memory();
    let c = &env.client;
    let topo = c.topology().expect("topology");
    let file = ConfigFile::from_toml(&topology_toml()).expect("parse");
    assert_eq!(topo.value, file);
    assert_eq!(topo.etag.as_deref(), Some(etag_of(&file).as_str()));
    assert_eq!(topo.generation, Some(1), "the seed is generation 1");

    let g = c.gateway().expect("gateway");
    assert_eq!(g.value, file.gateway);
    assert_eq!(g.etag.as_deref(), Some(etag_of(&file.gateway).as_str()));

    let pips = c.list::<PublicIpCfg>().expect("public ips");
    assert_eq!(pips.value, file.public_ip);
    assert_eq!(
        pips.etag.as_deref(),
        Some(etag_of(&file.public_ip).as_str())
    );
    let pip = c.get::<PublicIpCfg>("pip-fe").expect("pip-fe");
    assert_eq!(pip.value.address, "203.0.113.20");
    assert_eq!(pip.etag.as_deref(), Some(etag_of(&pip.value).as_str()));

    assert_eq!(
        c.list::<AvailabilitySetCfg>().expect("sets").value,
        file.availability_set
    );
    assert_eq!(
        c.get::<AvailabilitySetCfg>("as1").expect("as1").value.name,
        "as1"
    );
    assert_eq!(
        c.list::<DeploymentCfg>().expect("deps").value,
        file.deployment
    );
    assert_eq!(
        c.get::<DeploymentCfg>("cs1")
            .expect("cs1")
            .value
            .redeploy_reported_instances,
        None
    );
    let insts = c.list::<InstanceCfg>().expect("instances").value;
    assert_eq!(insts.len() as u32, 3 + ROLES);
    assert_eq!(
        c.get::<InstanceCfg>("vm-lb1")
            .expect("vm-lb1")
            .value
            .private_ip,
        "10.0.2.10"
    );
    assert_eq!(
        c.list::<LoadBalancerCfg>().expect("lbs").value,
        file.load_balancer
    );
    let lb = c.get::<LoadBalancerCfg>("lb").expect("lb").value;
    assert_eq!(lb.backend_pools[0].members, vec!["vm-lb1".to_string()]);

    // The same through the run-time kinds the CLI uses.
    for &k in ResourceKind::ALL {
        let v = c.get_json(k, None).expect("collection as JSON");
        assert!(v.etag.is_some(), "{k:?} has an ETag");
    }
    let v = c
        .get_json(ResourceKind::Instances, Some("vm-ilpip"))
        .expect("vm-ilpip");
    assert_eq!(v.value["public_ip"], "pip-ilpip");

    // Absent things are 404 with a JSON body.
    let (st, e) = api_err(c.get::<InstanceCfg>("nope"));
    assert_eq!(st, 404);
    assert!(e.error.contains("nope"), "{e:?}");
    let (st, _) = api_err(c.instance_ports("nope"));
    assert_eq!(st, 404);
    let (st, _) = api_err(c.delete::<PublicIpCfg>("nope", None));
    assert_eq!(st, 404);

    // Scenarios of the reference instances (R1.1, R1.2, R1.3).
    let p = c.instance_ports("vm-ilpip").expect("ports");
    assert_eq!((p.scenario.as_str(), p.rule.as_str()), ("ilpip", "R1.1"));
    assert_eq!((p.public_ip.as_str(), p.allocated), ("203.0.113.10", 65535));
    let p = c.instance_ports("vm-lb1").expect("ports");
    assert_eq!(
        (p.scenario.as_str(), p.rule.as_str()),
        ("load_balanced", "R1.2")
    );
    assert_eq!((p.public_ip.as_str(), p.allocated), ("203.0.113.20", 1024));
    let p = c.instance_ports("vm-as-0").expect("ports");
    assert_eq!(
        (p.scenario.as_str(), p.rule.as_str()),
        ("default_snat", "R1.3")
    );
    assert!(p.public_ip.starts_with("192.0.2.10"), "{}", p.public_ip);
    assert_eq!((p.allocated, p.pool_size, block_size(&p)), (1024, 1, 1024));
    assert_eq!(c.all_instance_ports().expect("all").len() as u32, 3 + ROLES);
    assert_eq!(c.healthz().expect("healthz"), "ok");
}

#[test]
fn put_instance_crosses_tiers_and_back() {
    let env = Env::memory();
    let c = &env.client;
    // A new instance, its name with slashes (ARM vm/nic/ipconfig), gets its block at once.
    let mut vm = as_vm(1);
    vm.name = "vm-as-1/nic0/ipconfig1".into();
    let put = c.put(&vm, None).expect("put");
    assert_eq!(put.value, vm);
    assert_eq!(put.etag.as_deref(), Some(etag_of(&vm).as_str()));
    assert_eq!(put.generation, Some(2));
    assert_eq!(env.generation(), 2);
    assert_eq!(
        c.get::<InstanceCfg>("vm-as-1/nic0/ipconfig1")
            .expect("get")
            .value,
        vm
    );
    let p = c.instance_ports("vm-as-1/nic0/ipconfig1").expect("ports");
    assert_eq!(
        (p.scenario.as_str(), p.allocated, p.pool_size),
        ("default_snat", 1024, 2)
    );
    assert_eq!(block_size(&p), 1024);
    assert!(
        p.block.iter().all(|r| r.first >= 1024),
        "R2.4: ports 1024-65535"
    );
    let first = c.instance_ports("vm-as-0").expect("ports");
    assert_eq!(
        p.public_ip, first.public_ip,
        "one default-SNAT IP per availability set (R1.3)"
    );
    let overlap = p.block.iter().any(|a| {
        first
            .block
            .iter()
            .any(|b| a.first <= b.last && b.first <= a.last)
    });
    assert!(!overlap, "blocks on one public IP never overlap (R2.4)");
    c.delete::<InstanceCfg>("vm-as-1/nic0/ipconfig1", None)
        .expect("delete");

    // Grow the set to 50 instances: still the first tier (R2.8: 1-50 -> 1024).
    for i in 1..50 {
        c.put(&as_vm(i), None).expect("put");
    }
    let p = c.instance_ports("vm-as-0").expect("ports");
    assert_eq!((p.allocated, p.pool_size), (1024, 50));
    // The 51st crosses into 51-100: every preallocation halves (R2.9).
    c.put(&as_vm(50), None).expect("put the 51st");
    for name in ["vm-as-0", "vm-as-25", "vm-as-50"] {
        let p = c.instance_ports(name).expect("ports");
        assert_eq!(
            (p.allocated, p.pool_size, block_size(&p)),
            (512, 51, 512),
            "{name}"
        );
    }
    // Back to 50: each grows to the new size (R2.10).
    c.delete::<InstanceCfg>("vm-as-50", None).expect("delete");
    let (st, _) = api_err(c.get::<InstanceCfg>("vm-as-50"));
    assert_eq!(st, 404);
    let (st, _) = api_err(c.instance_ports("vm-as-50"));
    assert_eq!(st, 404);
    for name in ["vm-as-0", "vm-as-49"] {
        let p = c.instance_ports(name).expect("ports");
        assert_eq!(
            (p.allocated, p.pool_size, block_size(&p)),
            (1024, 50, 1024),
            "{name}"
        );
    }
    // The tier changes were events (R6.2).
    env.backend.pump_events();
    let evs = c.events(0, 1000, 0).expect("events");
    let tiers: Vec<&str> = evs
        .iter()
        .filter(|e| e.kind == "tier_changed")
        .map(|e| e.detail.as_str())
        .collect();
    assert!(
        tiers.contains(&"pool 51: 1024 -> 512 ports per instance"),
        "{tiers:?}"
    );
    assert!(
        tiers.contains(&"pool 50: 512 -> 1024 ports per instance"),
        "{tiers:?}"
    );
    assert_eq!(env.generation(), 2 + 1 + 50 + 1);
}

#[test]
fn redeploy_and_settle_follow_the_reported_size() {
    let env = Env::memory();
    let c = &env.client;
    let p = c.instance_ports("role-0").expect("ports");
    assert_eq!((p.allocated, p.pool_size), (1024, ROLES));
    // R2.11: reported as twice the actual size (52 -> tier 51-100: 512 ports).
    let d = c.redeploy("cs1", 2 * ROLES, None).expect("redeploy");
    assert_eq!(d.value.redeploy_reported_instances, Some(2 * ROLES));
    assert_eq!(
        c.get::<DeploymentCfg>("cs1").expect("get").value,
        d.value,
        "the redeploy is part of the desired state"
    );
    for name in ["role-0", "role-25"] {
        let p = c.instance_ports(name).expect("ports");
        assert_eq!(
            (p.allocated, p.pool_size, block_size(&p)),
            (512, 2 * ROLES, 512)
        );
    }
    // More than twice is refused (R2.11), naming the field and the rule: 409, a conflict with
    // the deployment's current size.
    let before = c.topology().expect("topology");
    let (st, e) = api_err(c.redeploy("cs1", 2 * ROLES + 1, None));
    assert_eq!(st, 409);
    assert_eq!(e.rule.as_deref(), Some("R2.11"));
    assert_eq!(
        e.field.as_deref(),
        Some("deployment[cs1].redeploy_reported_instances")
    );
    assert_eq!(c.topology().expect("topology"), before);
    // Settled: tiers follow the actual size again (R2.10).
    let d = c.settle("cs1", d.etag.as_deref()).expect("settle");
    assert_eq!(d.value.redeploy_reported_instances, None);
    let p = c.instance_ports("role-0").expect("ports");
    assert_eq!(
        (p.allocated, p.pool_size, block_size(&p)),
        (1024, ROLES, 1024)
    );
    let (st, _) = api_err(c.settle("nope", None));
    assert_eq!(st, 404);
}

#[test]
fn an_ilpip_changes_the_scenario_and_back() {
    let env = Env::memory();
    let c = &env.client;
    let mut vm = c.get::<InstanceCfg>("vm-as-0").expect("get").value;
    vm.public_ip = Some("pip-spare".into());
    c.put(&vm, None).expect("put");
    // R1.4: re-evaluated at once; R1.1 wins over R1.3.
    let p = c.instance_ports("vm-as-0").expect("ports");
    assert_eq!((p.scenario.as_str(), p.rule.as_str()), ("ilpip", "R1.1"));
    assert_eq!((p.public_ip.as_str(), p.allocated), ("203.0.113.30", 65535));
    assert!(p.block.is_empty());
    vm.public_ip = None;
    c.put(&vm, None).expect("put");
    let p = c.instance_ports("vm-as-0").expect("ports");
    assert_eq!((p.scenario.as_str(), p.allocated), ("default_snat", 1024));
    env.backend.pump_events();
    let evs = c.events(0, 100, 0).expect("events");
    assert!(
        evs.iter()
            .any(|e| e.kind == "scenario_changed" && e.instance.as_deref() == Some("vm-as-0")),
        "{evs:?}"
    );
}

#[test]
fn refused_changes_change_nothing() {
    let env = Env::memory();
    let c = &env.client;
    let before = c.topology().expect("topology");
    let ports_before = c.instance_ports("role-0").expect("ports");
    let unchanged = |what: &str| {
        let now = c.topology().expect("topology");
        assert_eq!(now.value, before.value, "{what}: topology changed");
        assert_eq!(now.etag, before.etag, "{what}: ETag changed");
        assert_eq!(env.generation(), 1, "{what}: the store changed");
        assert_eq!(
            c.instance_ports("role-0").expect("ports"),
            ports_before,
            "{what}: the running state changed"
        );
    };

    // R1.5: a web/worker role cannot have an ILPIP (400, field and rule named).
    let mut role = c.get::<InstanceCfg>("role-0").expect("role").value;
    role.public_ip = Some("pip-spare".into());
    let (st, e) = api_err(c.put(&role, None));
    assert_eq!(st, 400);
    assert_eq!(e.rule.as_deref(), Some("R1.5"));
    assert_eq!(e.field.as_deref(), Some("instance[role-0].public_ip"));
    unchanged("R1.5");

    // R2.8: more than 1000 instances sharing one address (409: conflicts with the topology).
    let mut big = before.value.clone();
    for i in 0..1000u32 {
        big.instance.push(InstanceCfg {
            name: format!("bulk-{i}"),
            private_ip: Ipv4Addr::from(ip("10.0.100.0") + i).to_string(),
            ..as_vm(0)
        });
    }
    let (st, e) = api_err(c.put_topology(&big, None));
    assert_eq!(st, 409);
    assert_eq!(e.rule.as_deref(), Some("R2.8"));
    assert!(e.field.is_some(), "{e:?}");
    unchanged("R2.8");

    // Deleting something still referenced (409 naming the referencing field).
    let (st, e) = api_err(c.delete::<PublicIpCfg>("pip-fe", None));
    assert_eq!(st, 409);
    assert_eq!(
        e.field.as_deref(),
        Some("load_balancer[lb].frontends[fe].public_ip")
    );
    let (st, e) = api_err(c.delete::<AvailabilitySetCfg>("as1", None));
    assert_eq!(st, 409);
    assert_eq!(
        e.field.as_deref(),
        Some("instance[vm-as-0].availability_set")
    );
    unchanged("referenced");

    // A bad address (400, field named).
    let (st, e) = api_err(c.put(
        &PublicIpCfg {
            name: "pip-bad".into(),
            address: "203.0.113".into(),
        },
        None,
    ));
    assert_eq!(st, 400);
    assert_eq!(e.field.as_deref(), Some("public_ip[pip-bad].address"));
    unchanged("address");

    // Body problems: a name that differs from the path, unknown fields, bad JSON.
    let body = serde_json::json!({"name": "other", "address": "203.0.113.99"});
    let (st, e) = api_err(c.put_json(ResourceKind::PublicIps, Some("pip-x"), &body, None));
    assert_eq!(st, 400);
    assert_eq!(e.field.as_deref(), Some("public_ip[pip-x].name"));
    let body = serde_json::json!({"address": "203.0.113.99", "colour": "red"});
    let (st, e) = api_err(c.put_json(ResourceKind::PublicIps, Some("pip-x"), &body, None));
    assert_eq!(st, 400);
    assert_eq!(e.field.as_deref(), Some("public_ip[pip-x].colour"));
    let body = serde_json::json!({"gateway": {"seed": "seven"}});
    let (st, _) = api_err(c.put_json(ResourceKind::Topology, None, &body, None));
    assert_eq!(st, 400);
    let body = serde_json::json!({"idle_timeout_secs": 0});
    let (st, e) = api_err(c.put_json(ResourceKind::Gateway, None, &body, None));
    assert_eq!(st, 400);
    assert_eq!(e.field.as_deref(), Some("gateway.idle_timeout_secs"));
    unchanged("bodies");

    // If-Match that does not match: 412, nothing written.
    let mut pip = c.get::<PublicIpCfg>("pip-spare").expect("pip");
    pip.value.address = "203.0.113.31".into();
    let (st, e) = api_err(c.put(&pip.value, Some("\"0000000000000000\"")));
    assert_eq!(st, 412);
    assert_eq!(e.field.as_deref(), Some("If-Match"));
    let (st, _) = api_err(c.delete::<PublicIpCfg>("pip-spare", Some("\"0000000000000000\"")));
    assert_eq!(st, 412);
    let (st, _) = api_err(c.put_topology(&before.value, Some("\"0000000000000000\"")));
    assert_eq!(st, 412);
    let (st, _) = api_err(c.redeploy("cs1", ROLES, Some("\"1\"")));
    assert_eq!(st, 412);
    unchanged("If-Match");

    // A store that fails to save: 500, and the change is not applied.
    let mem = Arc::new(MemoryStore::with(Stored {
        generation: 1,
        config: before.value.clone(),
        designations: Vec::new(),
    }));
    let env2 = Env::start(None, mem.clone());
    mem.fail_saves(true);
    let mut vm = env2.client.get::<InstanceCfg>("vm-as-0").expect("vm").value;
    vm.public_ip = Some("pip-spare".into());
    let (st, _) = api_err(env2.client.put(&vm, None));
    assert_eq!(st, 500);
    let p = env2.client.instance_ports("vm-as-0").expect("ports");
    assert_eq!(p.scenario, "default_snat", "a failed save applies nothing");
    assert_eq!(env2.client.topology().expect("t").value, before.value);

    // With the right ETag the write goes through and returns the new one.
    let put = c
        .put(&pip.value, pip.etag.as_deref())
        .expect("conditional put");
    assert_ne!(put.etag, pip.etag);
    assert_eq!(put.etag.as_deref(), Some(etag_of(&pip.value).as_str()));
    assert_eq!(env.generation(), 2);
    let t = c.topology().expect("topology");
    let gw = GatewayCfg {
        idle_timeout_secs: 300,
        ..t.value.gateway.clone()
    };
    let g = c.put_gateway(&gw, None).expect("gateway");
    assert_eq!(g.value.idle_timeout_secs, 300);
    let t2 = c.topology().expect("topology");
    let t3 = c
        .put_topology(&t2.value, t2.etag.as_deref())
        .expect("same topology");
    assert_eq!(
        t3.generation,
        Some(3),
        "an unchanged topology is no new generation"
    );
}

#[test]
fn auth_is_required_except_for_healthz() {
    let env = Env::memory();
    let base = env.client.base_url().to_string();
    let anon = Client::new(&base, None);
    let (st, e) = api_err(anon.topology());
    assert_eq!(st, 401);
    assert!(e.error.contains("Bearer"), "{e:?}");
    let (st, _) = api_err(anon.metrics_text());
    assert_eq!(st, 401);
    let (st, _) = api_err(anon.openapi());
    assert_eq!(st, 401);
    let wrong = Client::new(&base, Some("s3cret-tokem".into()));
    let (st, e) = api_err(wrong.list::<InstanceCfg>());
    assert_eq!(st, 401);
    assert!(e.error.contains("wrong"), "{e:?}");
    let (st, _) = api_err(Client::new(&base, Some("s3cret-token-and-more".into())).topology());
    assert_eq!(st, 401);
    assert_eq!(anon.healthz().expect("healthz is open"), "ok");
    assert!(env.client.topology().is_ok());
}

#[test]
fn non_loopback_without_token_is_refused() {
    let seeded = Plane::seed(&topology_toml(), Arc::new(MemoryStore::new()));
    assert_eq!(seeded.source, SeedSource::ConfigFile);
    let plane = seeded.control(Arc::new(seeded.backend()), None);
    match serve("0.0.0.0:0".parse().expect("addr"), plane.clone()) {
        Err(e @ ControlError::InsecureBind(_)) => {
            assert!(e.to_string().contains("token"), "{e}");
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("served 0.0.0.0 without a token"),
    }
    assert!(matches!(
        serve("192.0.2.1:7070".parse().expect("addr"), plane.clone()),
        Err(ControlError::InsecureBind(_))
    ));
    // Loopback without a token is fine, and a busy port is an error at start.
    let s = serve("127.0.0.1:0".parse().expect("addr"), plane.clone()).expect("loopback");
    let busy = serve(s.local_addr(), plane);
    assert!(
        matches!(busy, Err(ControlError::Bind { .. })),
        "{:?}",
        busy.err()
    );
    let c = Client::new(&format!("http://{}", s.local_addr()), None);
    assert_eq!(c.healthz().expect("up"), "ok");
    s.shutdown().expect("shutdown");
    assert!(matches!(c.healthz(), Err(ClientError::Transport(_))));
}

/// Parses `name{labels} value` lines.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|l| {
        let (head, value) = l.rsplit_once(' ')?;
        let (n, rest) = head.split_once('{').unwrap_or((head, "}"));
        if n != name {
            return None;
        }
        let body = rest.strip_suffix('}')?;
        let got: BTreeSet<(String, String)> = body
            .split("\",")
            .filter(|s| !s.is_empty())
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.trim_matches('"').to_string()))
            })
            .collect();
        let want: BTreeSet<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        (got == want).then(|| value.parse().ok())?
    })
}

#[test]
fn metrics_after_flows_and_one_exhaustion() {
    let env = Env::memory();
    let c = &env.client;
    let vm = ip("10.0.3.10");
    let dst = ip("198.51.100.1");
    // R2.8: alone in its set -> 1024 ports; R2.3: each flow to one destination needs its own.
    for sport in 0..1024u16 {
        let mut p = testutil::tcp_syn(vm, 20000 + sport, dst, 443);
        assert!(matches!(
            env.outbound(&mut p),
            snatgw_core::Verdict::Translate { .. }
        ));
    }
    // R2.6: the 1025th to the same destination fails.
    let mut p = testutil::tcp_syn(vm, 40000, dst, 443);
    assert_eq!(
        env.outbound(&mut p),
        snatgw_core::Verdict::Drop(snatgw_core::DropReason::PortsExhausted)
    );
    // R2.3: flows to different destinations share ports: 3 UDP flows, 1 port.
    let lb = ip("10.0.2.10");
    for d in 1..=3u32 {
        let mut p = testutil::udp(lb, 5353, ip("198.51.100.100") + d, 53, b"q");
        assert!(matches!(
            env.outbound(&mut p),
            snatgw_core::Verdict::Translate { .. }
        ));
    }
    let pub_ip = c.instance_ports("vm-as-0").expect("ports").public_ip;
    let text = c.metrics_text().expect("metrics");
    let tcp = [
        ("instance", "vm-as-0"),
        ("public_ip", pub_ip.as_str()),
        ("protocol", "tcp"),
    ];
    let with = |extra: (&'static str, &'static str)| {
        let mut l = tcp.to_vec();
        l.push(extra);
        l
    };
    let m = |name: &str, labels: &[(&str, &str)]| {
        metric(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    };
    assert_eq!(m("snatgw_allocated_snat_ports", &tcp), 1024.0);
    assert_eq!(m("snatgw_used_snat_ports", &tcp), 1024.0);
    assert_eq!(m("snatgw_flows", &tcp), 1024.0);
    assert_eq!(
        m(
            "snatgw_snat_connection_count_total",
            &with(("result", "successful"))
        ),
        1024.0
    );
    assert_eq!(
        m(
            "snatgw_snat_connection_count_total",
            &with(("result", "failed"))
        ),
        1.0
    );
    assert_eq!(
        m(
            "snatgw_dropped_packets_total",
            &with(("reason", "ports_exhausted"))
        ),
        1.0
    );
    let dest = with(("destination", "198.51.100.1:443"));
    assert_eq!(m("snatgw_destination_used_snat_ports", &dest), 1024.0);
    assert_eq!(m("snatgw_destination_used_snat_ports_ratio", &dest), 1.0);
    let udp = [
        ("instance", "vm-lb1"),
        ("public_ip", "203.0.113.20"),
        ("protocol", "udp"),
    ];
    assert_eq!(m("snatgw_allocated_snat_ports", &udp), 1024.0);
    assert_eq!(m("snatgw_used_snat_ports", &udp), 1.0);
    assert_eq!(m("snatgw_flows", &udp), 3.0);
    assert_eq!(
        m(
            "snatgw_gateway_dropped_packets_total",
            &[("reason", "ports_exhausted")]
        ),
        1.0
    );
    assert_eq!(m("snatgw_live_flows", &[]), 1027.0);
    assert_eq!(m("snatgw_max_flows", &[]), 100000.0);
    // Bounded cardinality: only destinations with many flows, at most 5 per instance.
    let dests = text
        .lines()
        .filter(|l| l.starts_with("snatgw_destination_used_snat_ports{"))
        .count();
    assert_eq!(dests, 1, "{text}");
    assert!(text.contains("# TYPE snatgw_snat_connection_count_total counter"));

    // The exhaustion is an event with its details (R2.6, R6.2).
    env.backend.pump_events();
    let evs = c.events(0, 100, 0).expect("events");
    let ex = evs
        .iter()
        .find(|e| e.kind == "exhaustion")
        .unwrap_or_else(|| panic!("no exhaustion in {evs:?}"));
    assert_eq!(ex.instance.as_deref(), Some("vm-as-0"));
    assert_eq!(ex.public_ip.as_deref(), Some(pub_ip.as_str()));
    assert_eq!(ex.protocol.as_deref(), Some("tcp"));
    assert_eq!(ex.destination.as_deref(), Some("198.51.100.1:443"));
    // And the ports report agrees (R6.1).
    let p = c.instance_ports("vm-as-0").expect("ports");
    assert_eq!((p.used.tcp, p.flows.tcp), (1024, 1024));
    assert_eq!((p.connections_ok.tcp, p.connections_failed.tcp), (1024, 1));
    assert_eq!(p.drops.get("ports_exhausted"), Some(&1));
}

#[test]
fn flows_are_paged_and_filtered() {
    let env = Env::memory();
    let c = &env.client;
    // 20 000 UDP flows first, so vm-as-0's flows sit beyond the first 16 384 table slots and
    // the backend must loop over several bounded chunks to fill a page.
    let lb = ip("10.0.2.10");
    for d in 0..20_000u32 {
        let mut p = testutil::udp(lb, 5353, ip("198.18.0.0") + d, 53, b"q");
        assert!(matches!(
            env.outbound(&mut p),
            snatgw_core::Verdict::Translate { .. }
        ));
    }
    let vm = ip("10.0.3.10");
    for sport in 0..300u16 {
        let mut p = testutil::tcp_syn(vm, 30000 + sport, ip("198.51.100.7"), 443);
        env.outbound(&mut p);
    }
    for sport in 0..5u16 {
        let mut p = testutil::tcp_syn(vm, 31000 + sport, ip("198.51.100.8"), 80);
        env.outbound(&mut p);
    }
    let q = FlowQuery {
        instance: Some("vm-as-0".into()),
        limit: 100,
        ..FlowQuery::default()
    };
    let page = c.flows(&q).expect("page");
    assert_eq!(page.flows.len(), 100, "the page is filled across chunks");
    assert!(page.next_cursor.is_some());
    // All of them, page by page: each flow once.
    let mut seen = BTreeSet::new();
    let mut q2 = q.clone();
    let mut pages = 0;
    loop {
        let page = c.flows(&q2).expect("page");
        assert!(page.flows.len() <= 100);
        pages += 1;
        for f in &page.flows {
            assert_eq!(f.instance, "vm-as-0");
            assert_eq!(f.protocol, "tcp");
            assert_eq!(f.state, "open");
            assert!(seen.insert(f.private.clone()), "listed twice: {f:?}");
        }
        match page.next_cursor {
            Some(n) => q2.cursor = n,
            None => break,
        }
    }
    assert_eq!(seen.len(), 305);
    assert!(pages >= 4);
    assert_eq!(c.all_flows(&q).expect("all").len(), 305);
    // Destination filters: ip:port, and ip alone.
    let q3 = FlowQuery {
        destination: Some("198.51.100.8:80".into()),
        limit: 1000,
        ..FlowQuery::default()
    };
    let f = c.all_flows(&q3).expect("flows");
    assert_eq!(f.len(), 5);
    assert!(f.iter().all(|x| x.remote == "198.51.100.8:80"));
    let public = &f[0].public;
    assert!(public.starts_with(&c.instance_ports("vm-as-0").expect("p").public_ip));
    let q4 = FlowQuery {
        destination: Some("198.51.100.7".into()),
        protocol: Some("tcp".into()),
        state: Some("open".into()),
        limit: 1000,
        ..FlowQuery::default()
    };
    assert_eq!(c.all_flows(&q4).expect("flows").len(), 300);
    let q5 = FlowQuery {
        instance: Some("vm-lb1".into()),
        protocol: Some("udp".into()),
        limit: 1000,
        ..FlowQuery::default()
    };
    let udp = c.all_flows(&q5).expect("flows");
    assert_eq!(udp.len(), 20_000);
    // R2.3: different destinations share the one port.
    let ports: BTreeSet<&str> = udp.iter().map(|f| f.public.as_str()).collect();
    assert_eq!(ports.len(), 1);
    let q6 = FlowQuery {
        state: Some("reset".into()),
        ..FlowQuery::default()
    };
    assert!(c.all_flows(&q6).expect("flows").is_empty());
    let none = FlowQuery {
        instance: Some("nobody".into()),
        ..FlowQuery::default()
    };
    let p = c.flows(&none).expect("flows");
    assert!(p.flows.is_empty() && p.next_cursor.is_none());
    // Bad filters are 400 naming the parameter.
    for (q, field) in [
        (
            FlowQuery {
                protocol: Some("icmp".into()),
                ..FlowQuery::default()
            },
            "protocol",
        ),
        (
            FlowQuery {
                destination: Some("nowhere".into()),
                ..FlowQuery::default()
            },
            "destination",
        ),
        (
            FlowQuery {
                limit: 5000,
                ..FlowQuery::default()
            },
            "limit",
        ),
        (
            FlowQuery {
                state: Some("half-open".into()),
                ..FlowQuery::default()
            },
            "state",
        ),
    ] {
        let (st, e) = api_err(c.flows(&q));
        assert_eq!(st, 400);
        assert_eq!(e.field.as_deref(), Some(field));
    }
}

#[test]
fn events_long_poll_returns_an_event_pushed_while_waiting() {
    let env = Env::memory();
    let c = env.client.clone();
    let last = env.log.last_seq();
    assert!(c.events(last, 10, 0).expect("no wait").is_empty());
    let (st, e) = api_err(c.events_raw_wait(31));
    assert_eq!((st, e.field.as_deref()), (400, Some("wait")));
    let log = env.log.clone();
    let pusher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        log.push(&Event {
            time: 7,
            kind: EventKind::Exhaustion {
                instance: "vm-as-0".into(),
                public_ip: ip("192.0.2.100"),
                l4: snatgw_core::L4::Udp,
                dst: ip("198.51.100.53"),
                dst_port: 53,
                allocated: 1024,
            },
            count: 1,
            since: 7,
            summary: false,
        });
    });
    let t0 = Instant::now();
    let evs = c.events(last, 10, 10).expect("long-poll");
    let took = t0.elapsed();
    pusher.join().expect("pusher");
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].seq, last + 1);
    assert_eq!(evs[0].kind, "exhaustion");
    assert_eq!(evs[0].destination.as_deref(), Some("198.51.100.53:53"));
    assert!(
        took >= Duration::from_millis(300),
        "returned before the push: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "woke late: {took:?}");
    // A wait that sees nothing returns an empty list after it.
    let t0 = Instant::now();
    assert!(c.events(last + 1, 10, 1).expect("poll").is_empty());
    assert!(t0.elapsed() >= Duration::from_millis(900));
    // Paging with after/limit.
    for _ in 0..5 {
        env.log.push(&Event {
            time: 8,
            kind: EventKind::Overflow,
            count: 3,
            since: 0,
            summary: true,
        });
    }
    let two = c.events(last + 1, 2, 0).expect("page");
    assert_eq!(
        two.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![last + 2, last + 3]
    );
    assert!(two[0].summary && two[0].count == 3);
}

#[test]
fn openapi_lists_every_path() {
    let env = Env::memory();
    let doc = env.client.openapi().expect("openapi");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')));
    let paths = doc["paths"].as_object().expect("paths");
    let want: &[(&str, &[&str])] = &[
        ("/api/v1/topology", &["get", "put"]),
        ("/api/v1/gateway", &["get", "put"]),
        ("/api/v1/publicIPAddresses", &["get"]),
        (
            "/api/v1/publicIPAddresses/{name}",
            &["get", "put", "delete"],
        ),
        ("/api/v1/availabilitySets", &["get"]),
        ("/api/v1/availabilitySets/{name}", &["get", "put", "delete"]),
        ("/api/v1/deployments", &["get"]),
        ("/api/v1/deployments/{name}", &["get", "put", "delete"]),
        ("/api/v1/deployments/{name}/redeploy", &["post"]),
        ("/api/v1/deployments/{name}/settle", &["post"]),
        ("/api/v1/instances", &["get"]),
        ("/api/v1/instances/{name}", &["get", "put", "delete"]),
        ("/api/v1/instances/{name}/ports", &["get"]),
        ("/api/v1/loadBalancers", &["get"]),
        ("/api/v1/loadBalancers/{name}", &["get", "put", "delete"]),
        ("/api/v1/loadBalancers/{name}/probes", &["get"]),
        ("/api/v1/loadBalancers/{name}/inboundFlows", &["get"]),
        ("/api/v1/networkSecurityGroups", &["get"]),
        (
            "/api/v1/networkSecurityGroups/{name}",
            &["get", "put", "delete"],
        ),
        ("/api/v1/networkSecurityGroups/{name}/hits", &["get"]),
        ("/api/v1/flows", &["get"]),
        ("/api/v1/events", &["get"]),
        ("/metrics", &["get"]),
        ("/openapi.json", &["get"]),
        ("/healthz", &["get"]),
    ];
    for (p, methods) in want {
        let item = paths
            .get(*p)
            .unwrap_or_else(|| panic!("{p} missing from {:?}", paths.keys()));
        for m in *methods {
            assert!(item.get(*m).is_some(), "{m} {p} missing");
        }
    }
    assert_eq!(paths.len(), want.len(), "{:?}", paths.keys());
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for s in [
        "ConfigFile",
        "InstanceCfg",
        "LoadBalancerCfg",
        "ApiError",
        "FlowPage",
        "EventRecord",
        "InstancePorts",
        "RedeployRequest",
    ] {
        assert!(schemas.contains_key(s), "schema {s} missing");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let mut ids = BTreeSet::new();
    for (p, item) in paths {
        for (m, op) in item.as_object().expect("path item") {
            let id = op["operationId"].as_str().unwrap_or_default();
            assert!(
                ids.insert(id.to_string()),
                "operationId {id} of {m} {p} is not unique"
            );
        }
    }
    let params = doc["paths"]["/api/v1/flows"]["get"]["parameters"]
        .as_array()
        .expect("flow params");
    let names: BTreeSet<&str> = params.iter().filter_map(|p| p["name"].as_str()).collect();
    for n in [
        "instance",
        "destination",
        "protocol",
        "state",
        "cursor",
        "limit",
    ] {
        assert!(names.contains(n), "flows parameter {n} missing");
    }
}

#[test]
fn redb_store_keeps_the_state_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(RedbStore::open(dir.path()).expect("open"));
    let env = Env::start(Some(TOKEN), store);
    let put = env.client.put(&as_vm(7), None).expect("put");
    assert_eq!(put.generation, Some(2));
    let expected = env.client.topology().expect("topology").value;
    drop(env);
    // A restart: the store wins over the config file (which lacks vm-as-7).
    let store = RedbStore::open(dir.path()).expect("reopen");
    let file = ConfigFile::from_toml(&topology_toml()).expect("parse");
    let s = snatgw_control::seed(&store, &file).expect("seed");
    assert_eq!(s.source, SeedSource::Store);
    assert_eq!(s.stored.generation, 2);
    assert_eq!(s.stored.config, expected);
    drop(store);
    let env = Env::start(
        Some(TOKEN),
        Arc::new(RedbStore::open(dir.path()).expect("open")),
    );
    assert_eq!(
        env.client
            .get::<InstanceCfg>("vm-as-7")
            .expect("kept")
            .value,
        as_vm(7)
    );
    assert_eq!(
        env.client
            .instance_ports("vm-as-7")
            .expect("running")
            .allocated,
        1024
    );
}

#[test]
fn unknown_routes_and_methods_are_json_errors() {
    let env = Env::memory();
    assert!(matches!(
        env.client.get_json(ResourceKind::Topology, Some("x")),
        Err(ClientError::Request(_))
    ));
    let raw = RawHttp::new(&env);
    let (st, body) = raw.request("GET", "/api/v1/widgets", None);
    assert_eq!(st, 404);
    assert!(body.contains("\"error\""), "{body}");
    let (st, body) = raw.request("PATCH", "/api/v1/topology", Some("{}"));
    assert_eq!(st, 405);
    assert!(body.contains("\"error\""), "{body}");
    let (st, body) = raw.request("PUT", "/api/v1/instances/vm-x", Some("{not json"));
    assert_eq!(st, 400);
    assert!(body.contains("request body"), "{body}");
    let (st, body) = raw.request("GET", "/api/v1/flows?limit=many", None);
    assert_eq!(st, 400);
    assert!(body.contains("\"error\""), "{body}");
    let (st, body) = raw.request("GET", "/api/v1/events?after=-1", None);
    assert_eq!(st, 400);
    assert!(body.contains("\"error\""), "{body}");
    let (st, body) = raw.request(
        "POST",
        "/api/v1/deployments/cs1/redeploy",
        Some("{\"n\": 1}"),
    );
    assert_eq!(st, 400);
    assert!(body.contains("reported_instances"), "{body}");
}

/// Minimal raw HTTP/1.1 over a TCP socket, for requests the typed client cannot make.
struct RawHttp {
    addr: std::net::SocketAddr,
}

impl RawHttp {
    fn new(env: &Env) -> RawHttp {
        RawHttp {
            addr: env.server.as_ref().expect("server").local_addr(),
        }
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
        (status, body)
    }
}

trait EventsRaw {
    fn events_raw_wait(&self, wait: u64) -> Result<Vec<snatgw_control::EventRecord>, ClientError>;
}

impl EventsRaw for Client {
    /// `events` clamps `wait` to 30; this asks the server for more to see it refused.
    fn events_raw_wait(&self, wait: u64) -> Result<Vec<snatgw_control::EventRecord>, ClientError> {
        let url = format!("{}/api/v1/events?wait={wait}", self.base_url());
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut r = agent
            .get(&url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .call()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = r.status().as_u16();
        let text = r
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if status >= 400 {
            let body =
                serde_json::from_str(&text).map_err(|e| ClientError::Decode(e.to_string()))?;
            return Err(ClientError::Api { status, body });
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

#[test]
fn concurrent_writers_are_serialised_and_lose_nothing() {
    let env = Env::memory();
    let threads: Vec<_> = (1..=8u32)
        .map(|t| {
            let c = env.client.clone();
            std::thread::spawn(move || {
                for k in 0..5u32 {
                    c.put(&as_vm(t * 5 + k), None).expect("put");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
    // 40 new instances: 40 accepted writes, all present in the store and running.
    assert_eq!(env.generation(), 1 + 40);
    let names: BTreeSet<String> = env
        .client
        .list::<InstanceCfg>()
        .expect("list")
        .value
        .into_iter()
        .map(|i| i.name)
        .collect();
    for i in 5..45u32 {
        assert!(names.contains(&format!("vm-as-{i}")), "vm-as-{i} lost");
    }
    // 41 in the set: still the first tier (R2.8).
    assert_eq!(
        env.client
            .instance_ports("vm-as-44")
            .expect("ports")
            .pool_size,
        41
    );
    let stored = env.store.load().expect("load").expect("stored");
    assert_eq!(
        stored.config,
        env.client.topology().expect("topology").value
    );
}
