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

use std::collections::BTreeSet;

use serde_json::Value;
use snatgw_core::config::{DeploymentCfg, InstanceCfg, LoadBalancerCfg, NsgRuleCfg};
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

/// The schema whose properties `s` repeats: `XBody` (a PUT body, where `name` may be left
/// out) is checked through the entries of `X` when its properties are exactly those of `X`.
fn same_as<'a>(doc: &Value, s: &'a str) -> &'a str {
    let schemas = &doc["components"]["schemas"];
    match s.strip_suffix("Body") {
        Some(base) if schemas[base]["properties"] == schemas[s]["properties"] => base,
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
