//! The management API under careless and hostile clients (issue #20): a write the client
//! cancels, bodies that are not objects, duplicate keys, padded strings, huge values that
//! must not be echoed, bad query parameters, and error statuses that must all carry the JSON
//! error body `{error, field, rule}`.
//!
//! The server is the real one on 127.0.0.1:0 over a real `Gateway`; requests that a
//! well-behaved client would not send go over a raw TCP socket.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snatgw_control::backend::{FlowPage, FlowQuery, InboundFlowPage, MetricsSnapshot};
use snatgw_control::{
    serve, ApiError, Backend, Client, ControlPlane, EventLog, EventRecord, GatewayBackend,
    MemoryStore, ServerHandle, Store,
};
use snatgw_core::topology::SnatGroup;
use snatgw_core::{ApplyReport, ConfigError, ConfigFile, Engine, InstanceReport, Topology};
use snatgw_dataplane::Gateway;
use tokio::sync::watch;

const TOKEN: &str = "hostile-test-token";

const TOPOLOGY: &str = r#"
[gateway]
seed = 1
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100", "192.0.2.101"]

[[public_ip]]
name = "pip1"
address = "203.0.113.10"

[[availability_set]]
name = "as1"

[[instance]]
name = "vm1"
private_ip = "10.0.1.10"
availability_set = "as1"
"#;

/// The real backend, with a pause in `apply` so that a client that hangs up after a
/// millisecond is gone while its write is between the save and the publish (as on a loaded
/// gateway, where the apply waits for the data-path lock).
struct SlowBackend {
    inner: GatewayBackend,
    pause: Duration,
}

impl Backend for SlowBackend {
    fn check(&self, topo: &Topology) -> Result<Vec<(SnatGroup, u32)>, ConfigError> {
        self.inner.check(topo)
    }
    fn apply(&self, topo: Topology) -> Result<ApplyReport, ConfigError> {
        std::thread::sleep(self.pause);
        self.inner.apply(topo)
    }
    fn instances(&self) -> Vec<InstanceReport> {
        self.inner.instances()
    }
    fn flows(&self, q: &FlowQuery) -> FlowPage {
        self.inner.flows(q)
    }
    fn inbound_flows(&self, lb: &str, cursor: u64, limit: usize) -> InboundFlowPage {
        self.inner.inbound_flows(lb, cursor, limit)
    }
    fn events(&self, after: u64, limit: usize) -> Vec<EventRecord> {
        self.inner.events(after, limit)
    }
    fn event_waiter(&self) -> Option<watch::Receiver<u64>> {
        self.inner.event_waiter()
    }
    fn metrics(&self) -> MetricsSnapshot {
        self.inner.metrics()
    }
}

struct Env {
    server: Option<ServerHandle>,
    addr: SocketAddr,
    client: Client,
    backend: Arc<SlowBackend>,
    store: Arc<MemoryStore>,
}

impl Env {
    fn start(pause: Duration) -> Env {
        let store = Arc::new(MemoryStore::new());
        let file = ConfigFile::from_toml(TOPOLOGY).expect("test topology parses");
        let seeded = snatgw_control::seed(&*store, &file).expect("seed");
        let topo = Topology::from_config(seeded.stored.config.clone()).expect("valid");
        let gateway = Arc::new(Mutex::new(Gateway::new(
            Engine::new(topo, 0).expect("engine"),
        )));
        let backend = Arc::new(SlowBackend {
            inner: GatewayBackend::new(gateway, Arc::new(EventLog::new()), || 0),
            pause,
        });
        let plane = ControlPlane::new(
            backend.clone(),
            store.clone(),
            Some(TOKEN.into()),
            seeded.stored,
        );
        let server = serve("127.0.0.1:0".parse().expect("addr"), plane).expect("serve");
        let addr = server.local_addr();
        Env {
            server: Some(server),
            addr,
            client: Client::new(&format!("http://{addr}"), Some(TOKEN.into())),
            backend,
            store,
        }
    }

    /// The stored topology and generation.
    fn stored(&self) -> (ConfigFile, u64) {
        let s = self.store.load().expect("load").expect("stored");
        (s.config, s.generation)
    }

    /// The topology and generation `GET /api/v1/topology` shows.
    fn shown(&self) -> (ConfigFile, u64) {
        let r = raw(self.addr, "GET", "/api/v1/topology", &[], b"");
        assert_eq!(r.status, 200, "{}", r.body);
        let g = r
            .header("x-generation")
            .and_then(|g| g.parse().ok())
            .expect("X-Generation");
        (serde_json::from_str(&r.body).expect("topology JSON"), g)
    }

    /// Whether the running engine has an instance named `name`.
    fn running(&self, name: &str) -> bool {
        self.backend.instances().iter().any(|r| &*r.name == name)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.shutdown();
        }
    }
}

/// One HTTP answer.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The JSON error body every error status must carry.
    fn error(&self) -> ApiError {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "status {} head:\n{}\nbody: {}",
            self.status,
            self.head,
            self.body
        );
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("status {}: not the error body ({e}): {}", self.status, self.body))
    }
}

/// Sends one request (with the token unless `headers` has an Authorization) on a fresh
/// connection and reads the whole answer.
fn raw(addr: SocketAddr, method: &str, target: &str, headers: &[&str], body: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("authorization:")) {
        req.push_str(&format!("Authorization: Bearer {TOKEN}\r\n"));
    }
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).expect("send head");
    // The server may answer (413, 415) before it has read a large body.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer to {method} {target}: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Issue #20 item 1: a client that hangs up 1 ms into a write. Whatever point the write had
/// reached, the store, the running engine and `GET` agree afterwards, and no generation is
/// given twice. The pause in the backend makes every round hang up in the middle.
#[test]
fn cancelled_writes_leave_store_engine_and_get_in_agreement() {
    let env = Env::start(Duration::from_millis(15));
    let mut last_generation = env.stored().1;
    for round in 0..30 {
        let name = format!("dc{round}");
        let body = format!(r#"{{"private_ip":"10.0.9.{}","availability_set":"as1"}}"#, round + 1);
        let req = format!(
            "PUT /api/v1/instances/{name} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect(env.addr).expect("connect");
        s.write_all(req.as_bytes()).expect("send");
        std::thread::sleep(Duration::from_millis(1));
        drop(s);
        // A write that changes nothing still waits for the writer lock: once it answers, the
        // cancelled write has finished (or never started).
        let gw = env.client.gateway().expect("GET gateway").value;
        env.client.put_gateway(&gw, None).expect("no-op write");

        let (stored, sg) = env.stored();
        let (shown, shown_g) = env.shown();
        assert_eq!(stored, shown, "round {round}: the store and GET disagree");
        assert_eq!(sg, shown_g, "round {round}: generations disagree");
        let in_store = stored.instance.iter().any(|i| i.name == name);
        assert_eq!(
            in_store,
            env.running(&name),
            "round {round}: the store and the engine disagree on {name}"
        );
        assert!(sg >= last_generation, "round {round}: generation went back");
        if in_store {
            assert!(sg > last_generation, "round {round}: a change reused a generation");
        }
        last_generation = sg;
    }
    // The client was gone before any answer, and still the writes it sent went through
    // whole (hyper had handed them over; the write task does not depend on the client).
    let (stored, _) = env.stored();
    let applied = (0..30)
        .filter(|r| stored.instance.iter().any(|i| i.name == format!("dc{r}")))
        .count();
    println!("{applied} of 30 cancelled writes were applied (all or nothing each)");
    assert!(applied > 0, "no cancelled write reached the server: the test tests nothing");
}

/// Issue #20 item 2: `[]` is not a topology. Refused with 400 and nothing changes; likewise
/// any non-object body where the schema says object.
#[test]
fn non_object_bodies_are_refused_and_change_nothing() {
    let env = Env::start(Duration::ZERO);
    let before = env.shown();
    for (method, target, body) in [
        ("PUT", "/api/v1/topology", "[]"),
        ("PUT", "/api/v1/topology", "null"),
        ("PUT", "/api/v1/topology", "[{}, {}]"),
        ("PUT", "/api/v1/gateway", "[1, [\"10.0.0.0/16\"]]"),
        ("PUT", "/api/v1/instances/vm1", "[\"vm1\", \"10.0.1.11\"]"),
        ("PUT", "/api/v1/availabilitySets/as2", "7"),
    ] {
        let r = raw(env.addr, method, target, &["Content-Type: application/json"], body.as_bytes());
        assert_eq!(r.status, 400, "{method} {target} {body}: {}", r.body);
        let e = r.error();
        assert!(e.error.contains("expected a JSON object"), "{e:?}");
    }
    assert_eq!(env.shown(), before, "a refused body changed the topology");
    assert_eq!(env.stored(), before);
    assert!(env.running("vm1"));
}

/// A key given twice is refused everywhere (serde would keep the last one), and so is a
/// string with surrounding whitespace; both name the field.
#[test]
fn duplicate_keys_and_padded_strings_are_refused_naming_the_field() {
    let env = Env::start(Duration::ZERO);
    let before = env.shown();
    let cases = [
        (
            "/api/v1/instances/vm2",
            r#"{"private_ip":"10.0.1.20","private_ip":"10.0.1.21"}"#,
            "instance[vm2].private_ip",
        ),
        (
            "/api/v1/gateway",
            r#"{"seed":1,"seed":2,"vnet_prefixes":["10.0.0.0/16"]}"#,
            "gateway.seed",
        ),
        (
            "/api/v1/instances/vm2",
            r#"{"private_ip":" 10.0.1.41 "}"#,
            "instance[vm2].private_ip",
        ),
        (
            "/api/v1/availabilitySets/as1%20",
            r#"{}"#,
            "name",
        ),
    ];
    for (target, body, field) in cases {
        let r = raw(env.addr, "PUT", target, &["Content-Type: application/json"], body.as_bytes());
        assert_eq!(r.status, 400, "{target} {body}: {}", r.body);
        assert_eq!(r.error().field.as_deref(), Some(field), "{target} {body}");
    }
    assert_eq!(env.shown(), before);
}

/// A 10 MB bad value is not echoed back: the error body stays small.
#[test]
fn errors_echo_only_a_bounded_part_of_the_value() {
    let env = Env::start(Duration::ZERO);
    let huge = "9".repeat(10 << 20);
    let body = format!(r#"{{"private_ip":"{huge}"}}"#);
    let r = raw(env.addr, "PUT", "/api/v1/instances/vm2", &["Content-Type: application/json"], body.as_bytes());
    assert!(r.status == 400 || r.status == 413, "{}", r.status);
    assert!(r.body.len() < 2048, "error body of {} bytes", r.body.len());
    r.error();
    let body = format!(r#"{{"seed":"{huge}"}}"#);
    let r = raw(env.addr, "PUT", "/api/v1/gateway", &[], body.as_bytes());
    assert!(r.body.len() < 2048, "error body of {} bytes", r.body.len());
    let r = raw(env.addr, "GET", &format!("/api/v1/flows?limit={}", "7".repeat(4000)), &[], b"");
    assert_eq!(r.status, 400);
    assert!(r.body.len() < 1024, "error body of {} bytes", r.body.len());
}

/// Every query parameter error names the parameter (docs/API.md).
#[test]
fn query_errors_name_their_parameter() {
    let env = Env::start(Duration::ZERO);
    for (target, field) in [
        ("/api/v1/flows?limit=abc", "limit"),
        ("/api/v1/flows?limit=0", "limit"),
        ("/api/v1/flows?limit=1001", "limit"),
        ("/api/v1/flows?cursor=-1", "cursor"),
        ("/api/v1/flows?cursor=9223372036854775808", "cursor"),
        ("/api/v1/flows?protocol=sctp", "protocol"),
        ("/api/v1/flows?instnace=vm1", "instnace"),
        ("/api/v1/flows?limit=1&limit=2", "limit"),
        ("/api/v1/events?wait=-1", "wait"),
        ("/api/v1/events?wait=31", "wait"),
        ("/api/v1/events?after=x", "after"),
        ("/api/v1/loadBalancers/lb/inboundFlows?cursor=-1", "cursor"),
    ] {
        let r = raw(env.addr, "GET", target, &[], b"");
        assert_eq!(r.status, 400, "{target}: {}", r.body);
        assert_eq!(r.error().field.as_deref(), Some(field), "{target}");
    }
    let r = raw(env.addr, "GET", "/api/v1/events?after=0&limit=1000&wait=0", &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Every error status the API can answer carries the JSON error body.
#[test]
fn every_error_status_has_the_json_error_body() {
    let env = Env::start(Duration::ZERO);
    let json = ["Content-Type: application/json"];
    // 400, 404, 405, 409, 412
    assert_eq!(raw(env.addr, "PUT", "/api/v1/topology", &json, b"{").error().rule, None);
    let r = raw(env.addr, "GET", "/api/v1/instances/nope", &[], b"");
    assert_eq!(r.status, 404);
    r.error();
    let r = raw(env.addr, "PATCH", "/api/v1/instances/vm1", &json, b"{}");
    assert_eq!(r.status, 405);
    r.error();
    let r = raw(env.addr, "PUT", "/api/v1/instances/vm2", &json, br#"{"private_ip":"10.0.1.10"}"#);
    assert_eq!(r.status, 409, "{}", r.body);
    r.error();
    let r = raw(env.addr, "PUT", "/api/v1/availabilitySets/as1", &["Content-Type: application/json", "If-Match: \"0000000000000000\""], b"{}");
    assert_eq!(r.status, 412);
    assert_eq!(r.error().field.as_deref(), Some("If-Match"));
    // 401
    let r = raw(env.addr, "GET", "/api/v1/topology", &["Authorization: Bearer wrong"], b"");
    assert_eq!(r.status, 401);
    r.error();
    // 413: a body over the limit
    let big = vec![b' '; snatgw_control::api::MAX_BODY + 1];
    let r = raw(env.addr, "PUT", "/api/v1/topology", &json, &big);
    assert_eq!(r.status, 413, "{}", r.body);
    r.error();
    // 414: a request target over the limit
    let long = format!("/api/v1/instances/{}", "a".repeat(snatgw_control::api::MAX_URI));
    let r = raw(env.addr, "GET", &long, &[], b"");
    assert_eq!(r.status, 414, "{}", r.body);
    r.error();
    // 415: a body that is not JSON
    let r = raw(env.addr, "PUT", "/api/v1/availabilitySets/as2", &["Content-Type: text/plain"], b"{}");
    assert_eq!(r.status, 415, "{}", r.body);
    assert_eq!(r.error().field.as_deref(), Some("Content-Type"));
    assert!(raw(env.addr, "GET", "/api/v1/availabilitySets/as2", &[], b"").status == 404);
}

/// The OpenAPI document states what the server does (issue #20): 401 on every route but
/// `/healthz`, 414 and 503 everywhere, 400/413/415 wherever a body is read, 400 wherever a
/// query is read, and a resource PUT's body may leave out `name`.
#[test]
fn openapi_states_every_status_and_an_optional_body_name() {
    let doc = serde_json::to_value(snatgw_control::openapi()).expect("document");
    let paths = doc["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            let codes: Vec<&str> = op["responses"]
                .as_object()
                .expect("responses")
                .keys()
                .map(String::as_str)
                .collect();
            let has = |c: &str| codes.contains(&c);
            let at = format!("{method} {path}: {codes:?}");
            assert!(has("414") && has("503"), "{at}");
            if path != "/healthz" {
                assert!(has("401"), "{at}");
            }
            if method == "put" || method == "post" {
                assert!(has("400") && has("413") && has("415"), "{at}");
            }
            let query = op["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"));
            if query {
                assert!(has("400"), "{at}");
            }
            if method == "put" && path.ends_with("/{name}") {
                let r = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                    .as_str()
                    .expect("body schema ref");
                let name = r.rsplit('/').next().expect("name");
                let schema = &doc["components"]["schemas"][name];
                let required: Vec<&str> = schema["required"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                    .unwrap_or_default();
                assert!(!required.contains(&"name"), "{at}: {name} requires name");
                assert!(schema["properties"]["name"].is_object(), "{at}: {name} lost name");
            }
            checked += 1;
        }
    }
    assert!(checked >= 39, "only {checked} operations");
}
