//! The control plane's NSG and inbound-LB resources end to end (SPEC §4, §5): the real
//! server on 127.0.0.1:0 with a `GatewayBackend` over a real `Gateway`, driven through the
//! blocking `Client`. The same write path as every resource: validate → engine check → save
//! → apply; refused writes change nothing.

use std::sync::{Arc, Mutex};

use snatgw_control::{Client, MemoryStore, ServerHandle, Store};
use snatgw_core::config::{InstanceCfg, LoadBalancerCfg, NsgCfg};
use snatgw_core::{Direction, DropReason, Packet, Verdict};
use snatgw_dataplane::Gateway;

mod common;
use common::{api_err, ip, Plane};

const TOPOLOGY: &str = r#"
[gateway]
seed = 1
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100"]

[[public_ip]]
name = "pip-fe"
address = "203.0.113.20"

[[instance]]
name = "web1"
private_ip = "10.0.2.10"
[[instance]]
name = "web2"
private_ip = "10.0.2.11"
[[instance]]
name = "vm"
private_ip = "10.0.3.10"

[[load_balancer]]
name = "lb"
frontends = [ { name = "fe", public_ip = "pip-fe" } ]
backend_pools = [ { name = "web", members = ["web1", "web2"] } ]
probes = [ { name = "hp", protocol = "tcp", port = 8080, interval_secs = 5, unhealthy_threshold = 2 } ]
rules = [ { name = "http", frontend = "fe", protocol = "tcp", frontend_port = 80, backend_pool = "web", backend_port = 8080, probe = "hp" } ]
"#;

struct Env {
    server: Option<ServerHandle>,
    client: Client,
    gateway: Arc<Mutex<Gateway>>,
    store: Arc<dyn Store>,
}

impl Env {
    fn start() -> Env {
        let plane = Plane::seed(TOPOLOGY, Arc::new(MemoryStore::default()));
        let server = plane.serve(Arc::new(plane.backend()), None);
        let client = Client::new(&format!("http://{}", server.local_addr()), None);
        Env {
            server: Some(server),
            client,
            gateway: plane.gateway,
            store: plane.store,
        }
    }
    fn generation(&self) -> u64 {
        self.store.load().unwrap().unwrap().generation
    }
    fn process(&self, dir: Direction, p: Packet) -> Verdict {
        self.gateway
            .lock()
            .unwrap()
            .engine_mut()
            .process(1, dir, &p)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().expect("clean shutdown");
        }
    }
}

fn nsg(json: &str) -> NsgCfg {
    serde_json::from_str(json).expect("nsg json")
}

#[test]
fn r4_1_nsg_resource_is_validated_stored_and_applied() {
    let env = Env::start();
    let c = &env.client;
    let before = c.topology().unwrap();
    // A priority outside 100-4096: 400 naming field and rule; nothing changes.
    let bad = nsg(
        r#"{"name":"n","nics":["vm"],"rules":[{"name":"r","priority":4097,"direction":"outbound","access":"deny","protocol":"tcp"}]}"#,
    );
    let (st, e) = api_err(c.put(&bad, None));
    assert_eq!(st, 400);
    assert_eq!(e.field.as_deref(), Some("nsg[n].rules[r].priority"));
    assert_eq!(e.rule.as_deref(), Some("R4.1"));
    assert_eq!(c.topology().unwrap().etag, before.etag);
    assert_eq!(env.generation(), 1);
    // An unknown NIC.
    let (st, e) = api_err(c.put(&nsg(r#"{"name":"n","nics":["nobody"]}"#), None));
    assert!(st == 400 || st == 409, "{st}");
    assert_eq!(e.field.as_deref(), Some("nsg[n].nics"));

    // A valid NSG: stored, applied to the running engine.
    let good = nsg(
        r#"{"name":"n","nics":["vm"],"rules":[{"name":"no-server","priority":100,"direction":"outbound","access":"deny","protocol":"any","destinations":["198.51.100.7"]}]}"#,
    );
    let put = c.put(&good, None).expect("put nsg");
    assert_eq!(put.value, good);
    assert_eq!(env.generation(), 2);
    assert_eq!(c.get::<NsgCfg>("n").unwrap().value, good);
    assert_eq!(c.list::<NsgCfg>().unwrap().value, vec![good.clone()]);
    assert_eq!(
        env.process(
            Direction::Outbound,
            Packet::tcp(ip("10.0.3.10"), 4000, ip("198.51.100.7"), 443, 0x02)
        ),
        Verdict::Drop(DropReason::NsgDenied)
    );
    let hits = c.nsg_hits("n").expect("hits");
    let h = hits.iter().find(|h| h.rule == "no-server").expect("rule");
    assert_eq!((h.hits, h.priority, h.access.as_str()), (1, 100, "deny"));
    assert_eq!(
        hits.len(),
        7,
        "one user rule and the six default rules (R4.2)"
    );
    let text = c.metrics_text().unwrap();
    for want in [
        "snatgw_nsg_rule_hits_total{nsg=\"n\",rule=\"no-server\",direction=\"outbound\",access=\"deny\",priority=\"100\"} 1",
        "snatgw_dropped_packets_total{instance=\"vm\",public_ip=\"192.0.2.100\",protocol=\"tcp\",reason=\"nsg_denied\"} 1",
    ] {
        assert!(text.lines().any(|l| l == want), "missing `{want}` in\n{text}");
    }

    // Deleting the instance it names is refused while the NSG references it.
    let (st, e) = api_err(c.delete::<InstanceCfg>("vm", None));
    assert_eq!(st, 409);
    assert_eq!(e.field.as_deref(), Some("nsg[n].nics"));
    // Deleting the NSG lifts the denial.
    c.delete::<NsgCfg>("n", None).expect("delete nsg");
    assert!(matches!(
        env.process(
            Direction::Outbound,
            Packet::tcp(ip("10.0.3.10"), 4001, ip("198.51.100.7"), 443, 0x02)
        ),
        Verdict::Translate { .. }
    ));
    let (st, _) = api_err(c.nsg_hits("n"));
    assert_eq!(st, 404);
}

#[test]
fn r5_2_probe_state_through_the_api_and_metrics_and_lb_rules_are_validated() {
    let env = Env::start();
    let c = &env.client;
    {
        let mut g = env.gateway.lock().unwrap();
        let e = g.engine_mut();
        e.probe_result(1, "lb", "hp", "web2", false);
        assert_eq!(e.probe_result(2, "lb", "hp", "web2", false), Some(false));
    }
    let p = c.lb_probes("lb").expect("probes");
    assert_eq!(p.len(), 2);
    let w2 = p.iter().find(|p| p.member == "web2").unwrap();
    assert!(!w2.up && w2.consecutive_failures == 2 && w2.failures == 2);
    assert!(p.iter().find(|p| p.member == "web1").unwrap().up);
    let text = c.metrics_text().unwrap();
    for want in [
        "snatgw_lb_probe_up{lb=\"lb\",probe=\"hp\",member=\"web2\"} 0",
        "snatgw_lb_probe_up{lb=\"lb\",probe=\"hp\",member=\"web1\"} 1",
        "snatgw_lb_probe_consecutive_failures{lb=\"lb\",probe=\"hp\",member=\"web2\"} 2",
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "missing `{want}` in\n{text}"
        );
    }
    let (st, _) = api_err(c.lb_probes("nope"));
    assert_eq!(st, 404);
    // An inbound flow, then its counters.
    let v = env.process(
        Direction::Inbound,
        Packet::tcp(ip("198.51.100.50"), 5000, ip("203.0.113.20"), 80, 0x02),
    );
    assert_eq!(
        v,
        Verdict::Translate {
            addr: ip("10.0.2.10"),
            port: 8080
        },
        "web2 is down"
    );
    let text = c.metrics_text().unwrap();
    assert!(
        text.lines().any(|l| l == "snatgw_inbound_flows 1"),
        "{text}"
    );
    assert!(text.lines().any(
        |l| l == "snatgw_lb_inbound_flows_total{lb=\"lb\",rule=\"http\",result=\"created\"} 1"
    ));

    // R3.7 and R5.2 through PUT: refused with field and rule, nothing changes.
    let mut lb = c.get::<LoadBalancerCfg>("lb").unwrap().value;
    lb.rules[0].idle_timeout_minutes = 31;
    let (st, e) = api_err(c.put(&lb, None));
    assert_eq!(st, 400);
    assert_eq!(
        e.field.as_deref(),
        Some("load_balancer[lb].rules[http].idle_timeout_minutes")
    );
    assert_eq!(e.rule.as_deref(), Some("R3.7"));
    let mut lb = c.get::<LoadBalancerCfg>("lb").unwrap().value;
    lb.probes[0].unhealthy_threshold = 0;
    let (_, e) = api_err(c.put(&lb, None));
    assert_eq!(
        e.field.as_deref(),
        Some("load_balancer[lb].probes[hp].unhealthy_threshold")
    );
    assert_eq!(e.rule.as_deref(), Some("R5.2"));
    let mut lb = c.get::<LoadBalancerCfg>("lb").unwrap().value;
    lb.rules[0].frontend_port = 2000;
    let (_, e) = api_err(c.put(&lb, None));
    assert_eq!(
        e.field.as_deref(),
        Some("load_balancer[lb].rules[http].frontend_port")
    );
    assert_eq!(e.rule.as_deref(), Some("R2.4"));
    assert_eq!(env.generation(), 1);
    // Probe state survived (nothing was applied).
    assert!(
        !c.lb_probes("lb")
            .unwrap()
            .iter()
            .find(|p| p.member == "web2")
            .unwrap()
            .up
    );
}

/// `GET /api/v1/loadBalancers/{name}/inboundFlows` (R5.1, R6.3): every live inbound flow with
/// the member it sticks to, over several pages; an unknown LB is 404.
#[test]
fn r5_1_inbound_flows_are_listed_page_by_page() {
    let env = Env::start();
    let c = &env.client;
    let mut members = std::collections::BTreeMap::new();
    for i in 0..1500u16 {
        let v = env.process(
            Direction::Inbound,
            Packet::tcp(ip("198.51.100.50"), 10000 + i, ip("203.0.113.20"), 80, 0x02),
        );
        let Verdict::Translate { addr, port } = v else {
            panic!("{v:?}")
        };
        assert_eq!(port, 8080);
        members.insert(format!("198.51.100.50:{}", 10000 + i), addr);
    }
    // More than one page of 1000: the client follows the cursor.
    let flows = c.lb_inbound_flows("lb").expect("inbound flows");
    assert_eq!(flows.len(), 1500);
    for f in &flows {
        assert_eq!((f.lb.as_str(), f.rule.as_str()), ("lb", "http"));
        assert_eq!(
            (f.protocol.as_str(), f.frontend.as_str()),
            ("tcp", "203.0.113.20:80")
        );
        let want = members.get(&f.client).expect("a client that connected");
        assert_eq!(
            f.member,
            format!("{}:8080", std::net::Ipv4Addr::from(*want)),
            "listed with the member the engine chose"
        );
    }
    // Both members got flows (hash spread, R5.1).
    let on_web1 = flows
        .iter()
        .filter(|f| f.member == "10.0.2.10:8080")
        .count();
    assert!(on_web1 > 0 && on_web1 < 1500, "{on_web1} of 1500 on web1");
    let (st, _) = api_err(c.lb_inbound_flows("nope"));
    assert_eq!(st, 404);
}
