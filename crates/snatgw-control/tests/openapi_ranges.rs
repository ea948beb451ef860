//! The OpenAPI document is the contract (issue #20): every numeric property of a request body
//! states the range the server enforces, and the server enforces exactly that range.
//!
//! For each numeric property of the schemas reachable from a request body, [`FIELDS`] gives a
//! setter on a valid topology. The boundaries come from the document (`minimum`, `maximum`),
//! the verdicts from the server's write path as far as it does not need a running gateway:
//! the body decoding ([`snatgw_control::body::strict_object`], then serde), validation
//! ([`Topology::from_config`]) and the engine's check ([`Engine::check`]). The value is
//! accepted at `minimum` and `maximum` and refused at `minimum - 1` and `maximum + 1` when the
//! field's Rust type can hold them (serde refuses the others before validation).
//! A numeric property without an entry fails the test, so a new field must be added here.
//!
//! Likewise for strings: every string property and string array item of those schemas has a
//! `pattern` or a `format`; the ones that are parsed (addresses, prefixes, port ranges, NSG
//! addresses, a probe's path, an NSG rule's name) have an entry in [`STRINGS`] whose values
//! are accepted exactly when they match, apart from the refusals JSON Schema cannot state
//! (host bits, low > high, an address inside or outside the virtual network: the values
//! marked [`Verdict::Semantic`]), which docs/API.md lists as the schemathesis exclusions.

use std::collections::BTreeSet;

use regex::Regex;
use serde_json::Value;
use snatgw_core::config::{DeploymentCfg, InstanceCfg, LoadBalancerCfg, NsgRuleCfg, ProbeProtocol};
use snatgw_core::{ConfigFile, Engine, Topology};

/// Sets a field to a value, or `None` when its Rust type cannot hold the value.
type Setter = fn(&mut ConfigFile, i128) -> Option<()>;

/// `v` as the field's type, if it fits.
fn num<T: TryFrom<i128>>(v: i128) -> Option<T> {
    T::try_from(v).ok()
}

/// What the tested topology adds to `examples/reference.toml`: a deployment without
/// instances (R2.11: 0 is then a valid reported size), a load balancer whose frontend no
/// instance uses for outbound PAT (its only member has an ILPIP, so every frontend port is
/// allowed, R2.4) with a probed rule, and an NSG with one rule.
const EXTRA: &str = r#"
[[public_ip]]
name = "pip-in"
address = "203.0.113.30"

[[deployment]]
name = "cs-empty"

[[load_balancer]]
name = "lb-in"
frontends = [ { name = "fe", public_ip = "pip-in" } ]
backend_pools = [ { name = "pool", members = ["vm-ilpip"] } ]
rules = [ { name = "r", frontend = "fe", protocol = "tcp", frontend_port = 8080, backend_pool = "pool", backend_port = 8080, probe = "p" } ]
probes = [ { name = "p", protocol = "tcp", port = 8080 } ]

[[nsg]]
name = "nsg"
nics = ["vm-ilpip"]
rules = [ { name = "allow-web", priority = 200, direction = "inbound", access = "allow", protocol = "tcp", destination_ports = ["8080"] } ]
"#;

fn base() -> ConfigFile {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/reference.toml"
    ))
    .expect("examples/reference.toml");
    let mut cfg = ConfigFile::from_toml(&text).expect("reference.toml parses");
    let extra = ConfigFile::from_toml(EXTRA).expect("EXTRA parses");
    cfg.public_ip.extend(extra.public_ip);
    cfg.deployment.extend(extra.deployment);
    cfg.load_balancer.extend(extra.load_balancer);
    cfg.nsg.extend(extra.nsg);
    cfg
}

fn lb_in(c: &mut ConfigFile) -> &mut LoadBalancerCfg {
    c.load_balancer
        .iter_mut()
        .find(|l| l.name == "lb-in")
        .expect("lb-in")
}

fn nsg_rule(c: &mut ConfigFile) -> &mut NsgRuleCfg {
    &mut c.nsg[0].rules[0]
}

fn empty_deployment(c: &mut ConfigFile) -> &mut DeploymentCfg {
    c.deployment
        .iter_mut()
        .find(|d| d.name == "cs-empty")
        .expect("cs-empty")
}

fn instance(c: &mut ConfigFile) -> &mut InstanceCfg {
    c.instance
        .iter_mut()
        .find(|i| i.name == "vm-ilpip")
        .expect("vm-ilpip")
}

/// Every numeric property of the request-body schemas: (schema, property, setter).
const FIELDS: &[(&str, &str, Setter)] = &[
    ("GatewayCfg", "seed", |c, v| {
        c.gateway.seed = num(v)?;
        Some(())
    }),
    ("GatewayCfg", "idle_timeout_secs", |c, v| {
        c.gateway.idle_timeout_secs = num(v)?;
        Some(())
    }),
    ("GatewayCfg", "fin_timeout_secs", |c, v| {
        c.gateway.fin_timeout_secs = num(v)?;
        Some(())
    }),
    ("GatewayCfg", "rst_timeout_secs", |c, v| {
        c.gateway.rst_timeout_secs = num(v)?;
        Some(())
    }),
    ("GatewayCfg", "port_reuse_history_secs", |c, v| {
        c.gateway.port_reuse_history_secs = num(v)?;
        Some(())
    }),
    ("GatewayCfg", "max_flows_per_instance", |c, v| {
        c.gateway.max_flows_per_instance = num(v)?;
        Some(())
    }),
    ("GatewayCfg", "max_flows", |c, v| {
        c.gateway.max_flows = Some(num(v)?);
        Some(())
    }),
    ("GatewayCfg", "flow_memory_mib", |c, v| {
        c.gateway.flow_memory_mib = num(v)?;
        Some(())
    }),
    ("GatewayCfg", "event_interval_secs", |c, v| {
        c.gateway.event_interval_secs = num(v)?;
        Some(())
    }),
    ("GatewayCfg", "inbound_idle_timeout_secs", |c, v| {
        c.gateway.inbound_idle_timeout_secs = Some(num(v)?);
        Some(())
    }),
    ("InstanceCfg", "max_flows", |c, v| {
        instance(c).max_flows = Some(num(v)?);
        Some(())
    }),
    ("DeploymentCfg", "redeploy_reported_instances", |c, v| {
        empty_deployment(c).redeploy_reported_instances = Some(num(v)?);
        Some(())
    }),
    // POST /deployments/{name}/redeploy sets `redeploy_reported_instances` to this value.
    ("RedeployRequest", "reported_instances", |c, v| {
        empty_deployment(c).redeploy_reported_instances = Some(num(v)?);
        Some(())
    }),
    ("LbRuleCfg", "frontend_port", |c, v| {
        lb_in(c).rules[0].frontend_port = num(v)?;
        Some(())
    }),
    ("LbRuleCfg", "backend_port", |c, v| {
        lb_in(c).rules[0].backend_port = num(v)?;
        Some(())
    }),
    ("LbRuleCfg", "idle_timeout_minutes", |c, v| {
        lb_in(c).rules[0].idle_timeout_minutes = num(v)?;
        Some(())
    }),
    ("ProbeCfg", "port", |c, v| {
        lb_in(c).probes[0].port = num(v)?;
        Some(())
    }),
    ("ProbeCfg", "interval_secs", |c, v| {
        lb_in(c).probes[0].interval_secs = num(v)?;
        Some(())
    }),
    ("ProbeCfg", "unhealthy_threshold", |c, v| {
        lb_in(c).probes[0].unhealthy_threshold = num(v)?;
        Some(())
    }),
    ("NsgRuleCfg", "priority", |c, v| {
        nsg_rule(c).priority = num(v)?;
        Some(())
    }),
];

/// Properties whose upper bound depends on other fields, so the schema states none (their
/// doc comment does): R2.11, the reported size is at most twice the deployment's instances.
const NO_STATIC_MAXIMUM: &[(&str, &str)] = &[
    ("DeploymentCfg", "redeploy_reported_instances"),
    ("RedeployRequest", "reported_instances"),
];

/// Whether the server accepts `cfg` as a topology: the body as the API decodes it, then
/// validation and the engine's check (what a write does before saving).
fn server_verdict(engine: &Engine, cfg: &ConfigFile) -> Result<(), String> {
    let body = serde_json::to_vec(cfg).map_err(|e| e.to_string())?;
    let obj = snatgw_control::body::strict_object(&body, "").map_err(|e| e.message)?;
    let decoded: ConfigFile =
        serde_json::from_value(Value::Object(obj)).map_err(|e| e.to_string())?;
    let topo = Topology::from_config(decoded).map_err(|e| e.to_string())?;
    engine.check(&topo).map(|_| ()).map_err(|e| e.to_string())
}

/// The component names a `$ref` anywhere under `v` points to.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                if let Some(name) = r.strip_prefix("#/components/schemas/") {
                    out.push(name.to_string());
                }
            }
            m.values().for_each(|x| refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

/// Schemas reachable from any operation's request body.
fn request_schemas(doc: &Value) -> BTreeSet<String> {
    let mut todo = Vec::new();
    for item in doc["paths"].as_object().expect("paths").values() {
        for op in item.as_object().expect("path item").values() {
            refs(&op["requestBody"], &mut todo);
        }
    }
    let mut seen = BTreeSet::new();
    while let Some(n) = todo.pop() {
        if seen.insert(n.clone()) {
            refs(&doc["components"]["schemas"][&n], &mut todo);
        }
    }
    seen
}

/// The schema whose properties `s` repeats: `XBody` (a PUT body, where `name` is read-only
/// and may be left out) is checked through the entries of `X` when its properties are
/// exactly those of `X` but for `name`'s `readOnly`.
fn same_as<'a>(doc: &Value, s: &'a str) -> &'a str {
    let schemas = &doc["components"]["schemas"];
    let without_read_only = |n: &str| {
        let mut props = schemas[n]["properties"].clone();
        if let Some(name) = props.get_mut("name").and_then(Value::as_object_mut) {
            name.remove("readOnly");
        }
        props
    };
    match s.strip_suffix("Body") {
        Some(base) if without_read_only(base) == without_read_only(s) => base,
        _ => s,
    }
}

fn is_numeric(prop: &Value) -> bool {
    let numeric = |t: &Value| matches!(t.as_str(), Some("integer" | "number"));
    match &prop["type"] {
        Value::Array(ts) => ts.iter().any(numeric),
        t => numeric(t),
    }
}

fn bound(prop: &Value, key: &str) -> Option<i128> {
    let b = &prop[key];
    b.as_i64()
        .map(i128::from)
        .or_else(|| b.as_u64().map(i128::from))
        .or_else(|| {
            assert!(b.is_null(), "{key} {b} is not a whole number");
            None
        })
}

#[test]
fn every_numeric_request_field_has_an_entry() {
    let doc = serde_json::to_value(snatgw_control::openapi()).expect("document as JSON");
    let table: BTreeSet<(&str, &str)> = FIELDS.iter().map(|&(s, p, _)| (s, p)).collect();
    assert_eq!(table.len(), FIELDS.len(), "a field is listed twice");
    let schemas = request_schemas(&doc);
    assert!(schemas.contains("ConfigFile") && schemas.contains("NsgRuleCfg"));
    let mut numeric = BTreeSet::new();
    for s in &schemas {
        let props = doc["components"]["schemas"][s]["properties"].as_object();
        for (p, v) in props.into_iter().flatten() {
            if is_numeric(v) {
                numeric.insert((same_as(&doc, s), p.as_str()));
            }
        }
    }
    let missing: Vec<_> = numeric.difference(&table).collect();
    assert!(
        missing.is_empty(),
        "numeric properties without an entry in FIELDS: {missing:?}"
    );
    let stale: Vec<_> = table.difference(&numeric).collect();
    assert!(
        stale.is_empty(),
        "FIELDS entries that are not numeric request properties: {stale:?}"
    );
}

#[test]
fn schema_ranges_are_the_ranges_the_server_enforces() {
    let doc = serde_json::to_value(snatgw_control::openapi()).expect("document as JSON");
    let base_cfg = base();
    let engine = Engine::new(
        Topology::from_config(base_cfg.clone()).expect("the base topology is valid"),
        0,
    )
    .expect("engine");
    server_verdict(&engine, &base_cfg).expect("the server accepts the base topology");

    let mut failures = Vec::new();
    let mut checked = 0;
    for &(schema, prop, set) in FIELDS {
        let p = &doc["components"]["schemas"][schema]["properties"][prop];
        assert!(p.is_object(), "{schema}.{prop} is not in the document");
        let min = bound(p, "minimum");
        let max = bound(p, "maximum");
        let Some(min) = min else {
            failures.push(format!("{schema}.{prop}: no minimum in the schema"));
            continue;
        };
        if max.is_none() && !NO_STATIC_MAXIMUM.contains(&(schema, prop)) {
            failures.push(format!("{schema}.{prop}: no maximum in the schema"));
        }
        // The format must not contradict the range (an int32 cannot exceed 2^31 - 1).
        let (lo, hi) = match p["format"].as_str() {
            Some("int32") => (i128::from(i32::MIN), i128::from(i32::MAX)),
            _ => (i128::from(i64::MIN), i128::from(i64::MAX)),
        };
        for b in [Some(min), max].into_iter().flatten() {
            if b < lo || b > hi {
                failures.push(format!(
                    "{schema}.{prop}: bound {b} outside its format {}",
                    p["format"]
                ));
            }
        }
        let mut probe = |v: i128, accept: bool| {
            let mut cfg = base_cfg.clone();
            if set(&mut cfg, v).is_none() {
                // Not representable in the Rust type: serde refuses it before validation.
                return;
            }
            checked += 1;
            match (server_verdict(&engine, &cfg), accept) {
                (Ok(()), true) | (Err(_), false) => {}
                (Ok(()), false) => failures.push(format!(
                    "{schema}.{prop} = {v}: outside the schema's range but the server accepts it"
                )),
                (Err(e), true) => failures.push(format!(
                    "{schema}.{prop} = {v}: inside the schema's range but the server refuses it: {e}"
                )),
            }
        };
        probe(min, true);
        probe(min - 1, false);
        if let Some(max) = max {
            probe(max, true);
            probe(max + 1, false);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 2 * FIELDS.len(), "only {checked} values checked");
}

/// What the server does with a string value that the table below sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Accepted: the document's pattern (or format) matches it.
    Valid,
    /// Refused: the document's pattern (or format) does not match it.
    Invalid,
    /// Matches the document but refused for a reason JSON Schema cannot state (400 or 409).
    Semantic,
}

/// Sets a string field (or adds one item to a string list) to a value.
type StringSetter = fn(&mut ConfigFile, &str);

use Verdict::{Invalid, Semantic, Valid};

/// The parsed strings of the request schemas: (schema, property, setter, values and what the
/// server does with each). For a list, the setter adds the value as one more item.
#[allow(clippy::type_complexity)]
const STRINGS: &[(&str, &str, StringSetter, &[(&str, Verdict)])] = &[
    (
        "GatewayCfg",
        "vnet_prefixes",
        |c, v| c.gateway.vnet_prefixes.push(v.into()),
        &[
            ("172.16.0.0/12", Valid),
            ("100.64.0.0/10", Valid),
            ("192.168.4.0/24", Valid),
            ("192.168.4.4/32", Valid),
            ("192.168.4.1/24", Semantic), // host bits set
            ("192.168.4.0/33", Invalid),
            ("192.168.4.0", Invalid),
            ("192.168.04.0/24", Invalid),
            ("192.168.4.0/", Invalid),
            ("256.0.0.0/8", Invalid),
            ("", Invalid),
        ],
    ),
    (
        "GatewayCfg",
        "default_snat_pool",
        |c, v| c.gateway.default_snat_pool.push(v.into()),
        &[
            ("198.51.100.200", Valid),
            ("0.0.0.0", Valid),
            ("10.0.9.9", Semantic), // inside the virtual network: 409
            ("198.51.100.020", Invalid),
            ("198.51.100", Invalid),
            ("198.51.100.200/32", Invalid),
            ("::1", Invalid),
            ("", Invalid),
        ],
    ),
    (
        "PublicIpCfg",
        "address",
        |c, v| c.public_ip[0].address = v.into(),
        &[
            ("203.0.113.99", Valid),
            ("203.0.113.1o", Invalid),
            ("203.0.113.099", Invalid),
            ("", Invalid),
        ],
    ),
    (
        "InstanceCfg",
        "private_ip",
        |c, v| instance(c).private_ip = v.into(),
        &[
            ("10.0.200.1", Valid),
            ("10.9.0.1", Semantic), // outside gateway.vnet_prefixes (R1.7)
            ("10.0.200.01", Invalid),
            ("10.0.200.1/32", Invalid),
        ],
    ),
    (
        "NsgCfg",
        "subnets",
        |c, v| c.nsg[0].subnets.push(v.into()),
        &[
            ("10.0.128.0/17", Valid),
            ("10.0.200.0/24", Valid),
            ("10.0.128.1/17", Semantic), // host bits set
            ("10.9.0.0/24", Semantic),   // outside gateway.vnet_prefixes
            ("10.0.128.0/40", Invalid),
            ("10.0.128.0", Invalid),
        ],
    ),
    (
        "NsgRuleCfg",
        "sources",
        |c, v| nsg_rule(c).sources = vec![v.into()],
        ADDRESSES,
    ),
    (
        "NsgRuleCfg",
        "destinations",
        |c, v| nsg_rule(c).destinations = vec![v.into()],
        ADDRESSES,
    ),
    (
        "NsgRuleCfg",
        "source_ports",
        |c, v| nsg_rule(c).source_ports = vec![v.into()],
        PORTS,
    ),
    (
        "NsgRuleCfg",
        "destination_ports",
        |c, v| nsg_rule(c).destination_ports = vec![v.into()],
        PORTS,
    ),
    (
        "NsgRuleCfg",
        "name",
        |c, v| nsg_rule(c).name = v.into(),
        &[
            ("allow-web", Valid),
            ("AllowVnetInBound2", Valid),
            ("AllowVnetInBound", Invalid),
            ("allowvnetinbound", Invalid),
            ("DENYALLOUTBOUND", Invalid),
            ("", Invalid),
        ],
    ),
    (
        "ProbeCfg",
        "path",
        |c, v| {
            let p = &mut lb_in(c).probes[0];
            p.protocol = ProbeProtocol::Http;
            p.path = Some(v.into());
        },
        &[
            ("/", Valid),
            ("/healthz?full=1", Valid),
            ("/é", Valid),
            ("", Invalid),
            ("healthz", Invalid),
            ("/a b", Invalid),
            ("/a\u{a0}b", Invalid),
            ("/a\u{3000}", Invalid),
            ("/a\u{7f}", Invalid),
        ],
    ),
];

const ADDRESSES: &[(&str, Verdict)] = &[
    ("*", Valid),
    ("any", Valid),
    ("Any", Valid),
    ("VirtualNetwork", Valid),
    ("virtualnetwork", Valid),
    ("INTERNET", Valid),
    ("AzureLoadBalancer", Valid),
    ("198.51.100.7", Valid),
    ("198.51.100.0/24", Valid),
    ("0.0.0.0/0", Valid),
    ("198.51.100.7/24", Semantic), // host bits set
    ("", Invalid),
    ("**", Invalid),
    ("vnet", Invalid),
    ("Internet2", Invalid),
    ("198.51.100.7/33", Invalid),
    ("198.51.100.07", Invalid),
    ("198.51.100.0/", Invalid),
];

const PORTS: &[(&str, Verdict)] = &[
    ("*", Valid),
    ("80", Valid),
    ("1", Valid),
    ("65535", Valid),
    ("1000-2000", Valid),
    ("1-65535", Valid),
    ("443-443", Valid),
    ("2000-1000", Semantic), // low above high
    ("0", Invalid),
    ("65536", Invalid),
    ("0-80", Invalid),
    ("80-", Invalid),
    ("-80", Invalid),
    ("80-90-100", Invalid),
    ("x", Invalid),
    ("", Invalid),
];

/// The property schema of `schema.prop`, or its items' schema for a list.
fn string_schema<'a>(doc: &'a Value, schema: &str, prop: &str) -> &'a Value {
    let p = &doc["components"]["schemas"][schema]["properties"][prop];
    assert!(p.is_object(), "{schema}.{prop} is not in the document");
    if p["type"] == "array" {
        &p["items"]
    } else {
        p
    }
}

/// Whether `v` satisfies the string schema `s` as far as this test reads one: `pattern`,
/// `not.pattern`, `minLength` and `format: ipv4` (read as Rust's `Ipv4Addr` parser, which
/// refuses leading zeros as the JSON Schema format does).
fn satisfies(s: &Value, v: &str) -> bool {
    let re = |p: &Value| Regex::new(p.as_str().expect("pattern")).expect("a Rust regex");
    if let Some(p) = s.get("pattern") {
        if !re(p).is_match(v) {
            return false;
        }
    }
    if let Some(p) = s.get("not").and_then(|n| n.get("pattern")) {
        if re(p).is_match(v) {
            return false;
        }
    }
    if s["minLength"]
        .as_u64()
        .is_some_and(|m| (v.chars().count() as u64) < m)
    {
        return false;
    }
    match s["format"].as_str() {
        None => true,
        Some("ipv4") => v.parse::<std::net::Ipv4Addr>().is_ok(),
        Some(f) => panic!("format {f} is not read by this test"),
    }
}

#[test]
fn string_patterns_are_the_formats_the_server_parses() {
    let doc = serde_json::to_value(snatgw_control::openapi()).expect("document as JSON");
    let base_cfg = base();
    let engine = Engine::new(
        Topology::from_config(base_cfg.clone()).expect("the base topology is valid"),
        0,
    )
    .expect("engine");
    let mut failures = Vec::new();
    for &(schema, prop, set, values) in STRINGS {
        let s = string_schema(&doc, schema, prop);
        for &(v, verdict) in values {
            let mut cfg = base_cfg.clone();
            set(&mut cfg, v);
            let server = server_verdict(&engine, &cfg);
            let document = satisfies(s, v);
            let at = format!("{schema}.{prop} = {v:?}");
            match (verdict, document, &server) {
                (Valid, true, Ok(())) | (Invalid, false, Err(_)) | (Semantic, true, Err(_)) => {}
                _ => failures.push(format!(
                    "{at}: expected {verdict:?}; the document {} it, the server {}",
                    if document { "allows" } else { "refuses" },
                    match &server {
                        Ok(()) => "accepts it".to_string(),
                        Err(e) => format!("refuses it ({e})"),
                    }
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every string a request body can carry is constrained in the document: a `pattern` or a
/// `format` (the API's string rule at least: no control character, no whitespace at either
/// end), and a name or a reference to one is never empty.
#[test]
fn every_request_string_has_a_pattern_or_format() {
    let doc = serde_json::to_value(snatgw_control::openapi()).expect("document as JSON");
    let rule = Regex::new(snatgw_control::body::STRING_PATTERN).expect("STRING_PATTERN");
    let mut missing = Vec::new();
    let mut checked = 0;
    for schema in request_schemas(&doc) {
        let props = doc["components"]["schemas"][&schema]["properties"].as_object();
        for (prop, p) in props.into_iter().flatten() {
            let s = if p["type"] == "array" { &p["items"] } else { p };
            let is_string = |t: &Value| t == "string";
            let string = match &s["type"] {
                Value::Array(ts) => ts.iter().any(is_string),
                t => is_string(t),
            };
            if !string {
                continue;
            }
            checked += 1;
            if s.get("pattern").is_none() && s.get("format").is_none() {
                missing.push(format!("{schema}.{prop}: no pattern or format"));
            }
            if let Some(pat) = s["pattern"].as_str() {
                let re = Regex::new(pat).unwrap_or_else(|e| panic!("{schema}.{prop}: {e}"));
                // No pattern allows what the string rule refuses.
                for bad in [" x", "x ", "x\u{1f}", "\u{a0}x", "x\u{3000}"] {
                    assert!(!re.is_match(bad), "{schema}.{prop} allows {bad:?}");
                }
                if pat == snatgw_control::body::STRING_PATTERN {
                    assert!(rule.is_match("x"));
                }
            }
            let names_something = prop == "name"
                || [
                    "public_ip",
                    "availability_set",
                    "deployment",
                    "frontend",
                    "backend_pool",
                    "probe",
                    "members",
                    "nics",
                ]
                .contains(&prop.as_str());
            if names_something && s["minLength"].as_u64() != Some(1) {
                missing.push(format!("{schema}.{prop}: a name without minLength 1"));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    assert!(checked >= 40, "only {checked} string properties");
}
