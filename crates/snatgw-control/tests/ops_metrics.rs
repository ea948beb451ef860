//! Issue #21: every metric and label the Prometheus rules (`deploy/prometheus/snatgw-alerts.yml`),
//! their unit tests' input series (`snatgw-alerts.test.yml`) and the Grafana dashboard
//! (`deploy/grafana/snatgw-dashboard.json`) use is one the gateway really exports.
//!
//! The expected names come from the files (a small PromQL tokenizer over every alert `expr`,
//! every dashboard `expr` and template query, every test `series`); the truth comes from a
//! scrape of `/metrics` of the real server on 127.0.0.1:0 over a real `Gateway` (MemoryStore),
//! after packets that make the labelled series exist: an exhaustion (R2.6), a flow-limit drop
//! (R9.2), UDP flows, a probe marking a member down (R5.2) and an inbound LB flow (R5.1).
//!
//! Checked: each metric name is a sample name of the scrape (`_total` etc. as exported); each
//! label in a selector, `by (...)`/`without (...)`/`on (...)` and `$labels.x` of an annotation
//! is a label of that metric (`job` is added by Prometheus to every series; `instance` by
//! Prometheus to series without their own; `up` is Prometheus' own); each literal value of an
//! `=` matcher, and each `result`/`reason`/`protocol` of a test series, occurs in the scrape.
//! Also: every alert has `for:`, a severity and summary/description annotations, and its unit
//! tests expect it both to fire and not to fire.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use snatgw_control::backend::{FastPathCounters, RuntimeCounters};
use snatgw_control::{Client, MemoryStore, ServerHandle};
use snatgw_core::{Direction, DropReason, Verdict};
use snatgw_dataplane::Gateway;
use snatgw_wire::testutil;

mod common;
use common::Plane;

const TOKEN: &str = "ops-token";

const TOPOLOGY: &str = r#"
[gateway]
seed = 1
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100"]
max_flows = 100000

[[public_ip]]
name = "pip-fe"
address = "203.0.113.20"

[[instance]]
name = "vm"
private_ip = "10.0.3.10"
[[instance]]
name = "vm-small"
private_ip = "10.0.3.11"
max_flows = 4
[[instance]]
name = "web1"
private_ip = "10.0.2.10"
[[instance]]
name = "web2"
private_ip = "10.0.2.11"

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
}

impl Env {
    fn start() -> Env {
        let plane = Plane::seed(TOPOLOGY, Arc::new(MemoryStore::new()));
        plane.now.store(1, Ordering::SeqCst);
        // No runtime runs here: a fixed source stands in for `Runtime::counters_source`
        // (with a fast path), so the runtime's metrics appear in the scrape.
        let backend =
            Arc::new(
                plane
                    .backend()
                    .with_runtime_counters(Arc::new(|| RuntimeCounters {
                        private_rx_packets: 1000,
                        private_tx_packets: 990,
                        public_rx_packets: 800,
                        public_tx_packets: 790,
                        lock_acquisitions: 500,
                        lock_contended: 20,
                        lock_wait_ns: 3_000_000,
                        lock_held_ns: 40_000_000,
                        fast_path: Some(FastPathCounters {
                            installed: 30,
                            removed: 10,
                            install_failed: 2,
                            skipped: 1,
                            translated_out: 5000,
                            translated_in: 4500,
                            ..Default::default()
                        }),
                        fleet_link: None,
                        flow_state: Some(snatgw_control::backend::FlowStateCounters {
                            written: 40,
                            failed: 1,
                            last_flows: 30,
                            last_bytes: 4096,
                            last_micros: 800,
                        }),
                    })),
            );
        let server = plane.serve(backend, Some(TOKEN));
        let client = Client::new(
            &format!("http://{}", server.local_addr()),
            Some(TOKEN.into()),
        );
        Env {
            server: Some(server),
            client,
            gateway: plane.gateway,
        }
    }

    fn send(&self, dir: Direction, mut pkt: Vec<u8>) -> Verdict {
        self.gateway.lock().expect("lock").process(1, &mut pkt, dir)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().expect("clean shutdown");
        }
    }
}

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<std::net::Ipv4Addr>().expect("ip"))
}

fn repo_file(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------------
// The scrape: sample name -> label name -> values seen.

type Exported = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn parse_exposition(text: &str) -> Exported {
    let mut out = Exported::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..name_end].to_string()).or_default();
        if line[name_end..].starts_with('{') {
            let mut chars = line[name_end + 1..].chars().peekable();
            loop {
                let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                let key = key.trim_start_matches(',').trim().to_string();
                if key.is_empty() || key.starts_with('}') {
                    break;
                }
                assert_eq!(chars.next(), Some('"'), "bad labels in `{line}`");
                let mut val = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => val.extend(chars.next()),
                        '"' => break,
                        c => val.push(c),
                    }
                }
                labels.entry(key).or_default().insert(val);
                if chars.peek() == Some(&'}') {
                    break;
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A PromQL tokenizer and the few structures the checks need.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    /// Numbers and durations.
    Num,
    /// A Grafana variable (`$job`, `${job}`, `$__rate_interval`).
    Var,
    Op(String),
}

fn lex(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '#' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let s = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            out.push(Tok::Ident(c[s..i].iter().collect()));
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
            out.push(Tok::Num);
        } else if ch == '$' {
            i += 1;
            if c.get(i) == Some(&'{') {
                while i < c.len() && c[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
            }
            out.push(Tok::Var);
        } else if ch == '"' || ch == '\'' || ch == '`' {
            let q = ch;
            i += 1;
            let mut s = String::new();
            while i < c.len() && c[i] != q {
                if c[i] == '\\' && q != '`' {
                    i += 1;
                }
                if let Some(&x) = c.get(i) {
                    s.push(x);
                }
                i += 1;
            }
            i += 1;
            out.push(Tok::Str(s));
        } else {
            let two: String = c[i..(i + 2).min(c.len())].iter().collect();
            if ["=~", "!~", "!=", "==", ">=", "<="].contains(&two.as_str()) {
                out.push(Tok::Op(two));
                i += 2;
            } else {
                out.push(Tok::Op(ch.to_string()));
                i += 1;
            }
        }
    }
    out
}

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "topk",
    "bottomk",
    "quantile",
    "stddev",
    "stdvar",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "atan2"];
const GROUPINGS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

#[derive(Debug)]
struct Selector {
    metric: String,
    /// (label, operator, value)
    matchers: Vec<(String, String, String)>,
}

#[derive(Debug)]
struct Grouping {
    keyword: String,
    labels: Vec<String>,
    /// The metrics the clause groups: the aggregation's argument for by/without, the whole
    /// expression for the vector-matching keywords.
    metrics: Vec<String>,
}

#[derive(Debug, Default)]
struct Parsed {
    selectors: Vec<Selector>,
    groupings: Vec<Grouping>,
    /// Identifiers in metric position that are neither `snatgw_*` nor `up`.
    unknown: Vec<String>,
}

fn is_op(t: Option<&Tok>, s: &str) -> bool {
    matches!(t, Some(Tok::Op(o)) if o == s)
}

/// Index of the token matching the bracket at `open` (or the end).
fn matching(toks: &[Tok], open: usize) -> usize {
    let (o, c) = match &toks[open] {
        Tok::Op(o) if o == "(" => ("(", ")"),
        Tok::Op(o) if o == "[" => ("[", "]"),
        Tok::Op(o) if o == "{" => ("{", "}"),
        t => panic!("no bracket at {open}: {t:?}"),
    };
    let mut depth = 0;
    for (j, t) in toks.iter().enumerate().skip(open) {
        if is_op(Some(t), o) {
            depth += 1;
        } else if is_op(Some(t), c) {
            depth -= 1;
            if depth == 0 {
                return j;
            }
        }
    }
    toks.len()
}

/// Index of the bracket opening the one that closes at `close`.
fn matching_back(toks: &[Tok], close: usize) -> usize {
    let mut depth = 0;
    for j in (0..=close).rev() {
        if is_op(toks.get(j), ")") {
            depth += 1;
        } else if is_op(toks.get(j), "(") {
            depth -= 1;
            if depth == 0 {
                return j;
            }
        }
    }
    0
}

fn metrics_in(toks: &[Tok]) -> Vec<String> {
    parse_promql_toks(toks, false)
        .selectors
        .into_iter()
        .map(|s| s.metric)
        .collect()
}

fn parse_promql(expr: &str) -> Parsed {
    parse_promql_toks(&lex(expr), true)
}

fn parse_promql_toks(toks: &[Tok], with_groupings: bool) -> Parsed {
    let mut p = Parsed::default();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Op(o) if o == "[" => i = matching(toks, i) + 1,
            Tok::Op(o) if o == "{" => panic!("a selector without a metric name in {toks:?}"),
            Tok::Ident(id) if GROUPINGS.contains(&id.as_str()) => {
                let mut labels = Vec::new();
                let mut j = i + 1;
                if is_op(toks.get(j), "(") {
                    let end = matching(toks, j);
                    for t in &toks[j + 1..end] {
                        if let Tok::Ident(l) = t {
                            labels.push(l.clone());
                        }
                    }
                    j = end + 1;
                }
                if with_groupings {
                    let metrics = if id == "by" || id == "without" {
                        let prev_is_agg = matches!(
                            i.checked_sub(1).and_then(|k| toks.get(k)),
                            Some(Tok::Ident(a)) if AGGREGATIONS.contains(&a.as_str())
                        );
                        if prev_is_agg && is_op(toks.get(j), "(") {
                            metrics_in(&toks[j..=matching(toks, j)])
                        } else if i > 0 && is_op(toks.get(i - 1), ")") {
                            metrics_in(&toks[matching_back(toks, i - 1)..i])
                        } else {
                            panic!("cannot tell what `{id}` groups in {toks:?}")
                        }
                    } else {
                        metrics_in(toks)
                    };
                    p.groupings.push(Grouping {
                        keyword: id.clone(),
                        labels,
                        metrics,
                    });
                }
                i = j;
            }
            // A function or an aggregation (`sum (...)`, `sum by (...) (...)`): its
            // arguments follow.
            Tok::Ident(id)
                if is_op(toks.get(i + 1), "(")
                    || (AGGREGATIONS.contains(&id.as_str())
                        && matches!(toks.get(i + 1), Some(Tok::Ident(k)) if k == "by" || k == "without")) =>
            {
                i += 1;
            }
            Tok::Ident(id) if KEYWORDS.contains(&id.as_str()) => i += 1,
            Tok::Ident(id) => {
                if !(id.starts_with("snatgw_") || id == "up") {
                    p.unknown.push(id.clone());
                }
                let mut matchers = Vec::new();
                let mut j = i + 1;
                if is_op(toks.get(j), "{") {
                    let end = matching(toks, j);
                    let mut k = j + 1;
                    while k < end {
                        match (&toks[k], toks.get(k + 1), toks.get(k + 2)) {
                            (Tok::Ident(l), Some(Tok::Op(op)), Some(v)) => {
                                let v = match v {
                                    Tok::Str(s) => s.clone(),
                                    other => panic!("matcher value {other:?} in {toks:?}"),
                                };
                                matchers.push((l.clone(), op.clone(), v));
                                k += 3;
                            }
                            (Tok::Op(c), _, _) if c == "," => k += 1,
                            other => panic!("bad matcher {other:?} in {toks:?}"),
                        }
                    }
                    j = end + 1;
                }
                p.selectors.push(Selector {
                    metric: id.clone(),
                    matchers,
                });
                i = j;
            }
            _ => i += 1,
        }
    }
    p
}

// ---------------------------------------------------------------------------------------------
// The files.

#[derive(Debug, Default)]
struct Rule {
    alert: String,
    expr: String,
    text: String,
    has_for: bool,
    severity: Option<String>,
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start().len()
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    let b = v.as_bytes();
    if v.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[v.len() - 1] == b[0] {
        v[1..v.len() - 1].to_string()
    } else {
        v.to_string()
    }
}

/// The value of a YAML key on line `i` (`key: value` or a `|`/`>` block scalar below it).
fn yaml_value(lines: &[&str], i: usize, key: &str) -> String {
    let l = lines[i];
    let at = l.find(&format!("{key}:")).expect("key on its line");
    let rest = l[at + key.len() + 1..].trim();
    if rest.starts_with('|') || rest.starts_with('>') {
        let base = indent(l);
        lines[i + 1..]
            .iter()
            .take_while(|x| x.trim().is_empty() || indent(x) > base)
            .map(|x| x.trim())
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        unquote(rest)
    }
}

fn alert_rules(yaml: &str) -> Vec<Rule> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut rules: Vec<Rule> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            rules.push(Rule {
                alert: name.trim().to_string(),
                ..Rule::default()
            });
            continue;
        }
        if t.starts_with("- name:") || t.starts_with("- record:") {
            assert!(
                !t.starts_with("- record:"),
                "recording rules are not checked yet: {t}"
            );
            continue;
        }
        let Some(r) = rules.last_mut() else { continue };
        r.text.push_str(l);
        r.text.push('\n');
        if t.starts_with("expr:") {
            r.expr = yaml_value(&lines, i, "expr");
        } else if t.starts_with("for:") {
            r.has_for = true;
        } else if t.starts_with("severity:") {
            r.severity = Some(yaml_value(&lines, i, "severity"));
        }
    }
    rules
}

/// Every `expr` of the dashboard's panels and every template variable's query.
fn dashboard_queries(json: &serde_json::Value) -> (Vec<String>, Vec<String>) {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(&json["panels"], &mut exprs);
    let mut vars = Vec::new();
    for v in json["templating"]["list"]
        .as_array()
        .expect("templating.list")
    {
        let q = &v["query"];
        let q = q.get("query").unwrap_or(q);
        if let Some(q) = q.as_str() {
            vars.push(q.to_string());
        }
        if let Some(d) = v["definition"].as_str() {
            vars.push(d.to_string());
        }
    }
    (exprs, vars)
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// Labels Prometheus adds at scrape time (the scrape config uses `honor_labels: true`, so an
/// exported `instance` wins and series without one get the target's).
const TARGET_LABELS: &[&str] = &["job", "instance"];

struct Checker<'a> {
    exported: &'a Exported,
    errors: Vec<String>,
    used: BTreeSet<String>,
}

impl Checker<'_> {
    fn labels_of(&self, metric: &str) -> BTreeSet<String> {
        let mut s: BTreeSet<String> = self
            .exported
            .get(metric)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        s.insert("job".into());
        if metric == "up" {
            s.insert("instance".into());
        }
        s
    }

    /// Checks one PromQL expression; `what` names it in errors. Returns the labels an alert's
    /// annotations may use.
    fn expr(&mut self, what: &str, expr: &str) -> BTreeSet<String> {
        let p = parse_promql(expr);
        for u in &p.unknown {
            self.errors.push(format!(
                "{what}: `{u}` is not a snatgw metric (in `{expr}`)"
            ));
        }
        let mut union = BTreeSet::new();
        for s in &p.selectors {
            if s.metric != "up" && !self.exported.contains_key(&s.metric) {
                self.errors.push(format!(
                    "{what}: metric `{}` is not exported by /metrics (in `{expr}`)",
                    s.metric
                ));
                continue;
            }
            self.used.insert(s.metric.clone());
            let labels = self.labels_of(&s.metric);
            union.extend(labels.iter().cloned());
            for (l, op, v) in &s.matchers {
                if !labels.contains(l) {
                    self.errors.push(format!(
                        "{what}: `{}` has no label `{l}` (has {labels:?})",
                        s.metric
                    ));
                } else if op == "=" && !v.contains('$') && s.metric != "up" && l != "job" {
                    let seen = &self.exported[&s.metric][l];
                    if !seen.contains(v) {
                        self.errors.push(format!(
                            "{what}: `{}{{{l}=\"{v}\"}}` never occurs in the scrape (values {seen:?})",
                            s.metric
                        ));
                    }
                }
            }
        }
        let mut result: Option<BTreeSet<String>> = None;
        for g in &p.groupings {
            for m in &g.metrics {
                if m != "up" && !self.exported.contains_key(m) {
                    continue; // reported above
                }
                let labels = self.labels_of(m);
                for l in &g.labels {
                    if !labels.contains(l) {
                        self.errors.push(format!(
                            "{what}: `{} ({l})` but `{m}` has no label `{l}` (has {labels:?})",
                            g.keyword
                        ));
                    }
                }
            }
            if g.keyword == "by" {
                let by: BTreeSet<String> = g.labels.iter().cloned().collect();
                result = Some(match result {
                    None => by,
                    Some(r) => r.intersection(&by).cloned().collect(),
                });
            }
        }
        let mut out = result.unwrap_or(union);
        // Series without an `instance` of their own carry the target's.
        out.extend(TARGET_LABELS.iter().map(|s| s.to_string()));
        if expr.trim_start().starts_with("absent(") {
            out = p
                .selectors
                .iter()
                .flat_map(|s| s.matchers.iter())
                .filter(|(_, op, _)| op == "=")
                .map(|(l, _, _)| l.clone())
                .collect();
        }
        out
    }

    /// A `label_values(selector, label)` template query.
    fn template(&mut self, q: &str) {
        let inner = q
            .trim()
            .strip_prefix("label_values(")
            .and_then(|x| x.strip_suffix(')'))
            .unwrap_or_else(|| panic!("template query `{q}` is not label_values(selector, label)"));
        let (sel, label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        self.expr(&format!("template `{q}`"), sel);
        let p = parse_promql(sel);
        let metric = &p.selectors.first().expect("a metric").metric;
        if !self.labels_of(metric).contains(label.trim()) {
            self.errors.push(format!(
                "template `{q}`: `{metric}` has no label `{}`",
                label.trim()
            ));
        }
    }

    /// An input series of the promtool tests: a real name, real labels, real values of the
    /// closed label sets.
    fn series(&mut self, s: &str) {
        let p = parse_promql(s);
        assert_eq!(p.selectors.len(), 1, "one series in `{s}`");
        let sel = &p.selectors[0];
        if sel.metric == "up" {
            return;
        }
        let Some(exp) = self.exported.get(&sel.metric) else {
            self.errors.push(format!(
                "test series `{s}`: `{}` is not exported",
                sel.metric
            ));
            return;
        };
        let exported_labels: BTreeSet<&String> = exp.keys().collect();
        let mut given = BTreeSet::new();
        for (l, _, v) in &sel.matchers {
            given.insert(l);
            if TARGET_LABELS.contains(&l.as_str()) && !exp.contains_key(l) {
                continue;
            }
            match exp.get(l) {
                None => self.errors.push(format!(
                    "test series `{s}`: `{}` has no label `{l}`",
                    sel.metric
                )),
                Some(vals) if ["result", "reason", "protocol"].contains(&l.as_str()) => {
                    if !vals.contains(v) {
                        self.errors.push(format!(
                            "test series `{s}`: {l}=\"{v}\" never occurs (values {vals:?})"
                        ));
                    }
                }
                Some(_) => {}
            }
        }
        for l in exported_labels {
            if !given.contains(l) {
                self.errors.push(format!(
                    "test series `{s}`: label `{l}` missing (the gateway always sets it)"
                ));
            }
        }
    }
}

fn drive_and_scrape() -> String {
    let env = Env::start();
    let vm = ip("10.0.3.10");
    let dst = ip("198.51.100.1");
    // R2.6: TCP flows to one destination until the block is exhausted (1024 ports, R2.8).
    let mut exhausted = false;
    for n in 0..5000u16 {
        match env.send(
            Direction::Outbound,
            testutil::tcp_syn(vm, 20000 + n, dst, 443),
        ) {
            Verdict::Drop(DropReason::PortsExhausted) => {
                exhausted = true;
                break;
            }
            Verdict::Translate { .. } => {}
            v => panic!("flow {n}: {v:?}"),
        }
    }
    assert!(
        exhausted,
        "no exhaustion after 5000 flows to one destination"
    );
    // UDP flows to several destinations (shared ports, R2.3).
    for d in 1..=3u32 {
        let v = env.send(
            Direction::Outbound,
            testutil::udp(vm, 5353, ip("198.51.100.100") + d, 53, b"q"),
        );
        assert!(matches!(v, Verdict::Translate { .. }), "{v:?}");
    }
    // R9.2: vm-small may hold 4 flows; the 5th is dropped as flow_limit.
    let small = ip("10.0.3.11");
    let verdicts: Vec<Verdict> = (0..5u32)
        .map(|d| {
            env.send(
                Direction::Outbound,
                testutil::tcp_syn(small, 30000, ip("198.51.100.200") + d, 443),
            )
        })
        .collect();
    assert_eq!(
        verdicts[4],
        Verdict::Drop(DropReason::FlowLimit),
        "{verdicts:?}"
    );
    // R5.2: web2's probe fails twice (unhealthy_threshold 2): down; an inbound flow to web1.
    {
        let mut g = env.gateway.lock().expect("lock");
        let e = g.engine_mut();
        e.probe_result(1, "lb", "hp", "web2", false);
        assert_eq!(e.probe_result(1, "lb", "hp", "web2", false), Some(false));
    }
    let v = env.send(
        Direction::Inbound,
        testutil::tcp_syn(ip("198.51.100.50"), 5000, ip("203.0.113.20"), 80),
    );
    assert!(matches!(v, Verdict::Translate { .. }), "{v:?}");
    env.client
        .metrics_text()
        .expect("GET /metrics with the bearer token")
}

#[test]
fn every_metric_and_label_in_the_rules_and_the_dashboard_is_exported() {
    let text = drive_and_scrape();
    let exported = parse_exposition(&text);
    // The scrape itself has what the checks rely on.
    for name in [
        "snatgw_destination_used_snat_ports_ratio",
        "snatgw_dropped_packets_total",
        "snatgw_gateway_dropped_packets_total",
        "snatgw_lb_probe_up",
        "snatgw_packets_received_total",
        "snatgw_lock_contended_total",
        "snatgw_fastpath_install_failures_total",
        "snatgw_fastpath_packets_total",
    ] {
        assert!(exported.contains_key(name), "no {name} in\n{text}");
    }
    let mut c = Checker {
        exported: &exported,
        errors: Vec::new(),
        used: BTreeSet::new(),
    };

    // The alerting rules.
    let rules = alert_rules(&repo_file("deploy/prometheus/snatgw-alerts.yml"));
    assert!(rules.len() >= 8, "alerts found: {rules:?}");
    for r in &rules {
        assert!(!r.expr.is_empty(), "{}: no expr", r.alert);
        let allowed = c.expr(&format!("alert {}", r.alert), &r.expr);
        for part in r.text.split("$labels.").skip(1) {
            let label: String = part
                .chars()
                .take_while(|ch| ch.is_ascii_alphanumeric() || *ch == '_')
                .collect();
            if !allowed.contains(&label) {
                c.errors.push(format!(
                    "alert {}: annotation uses $labels.{label}, not a label of its result {allowed:?}",
                    r.alert
                ));
            }
        }
        if !r.has_for {
            c.errors.push(format!("alert {}: no `for:`", r.alert));
        }
        match r.severity.as_deref() {
            Some("critical" | "warning" | "info") => {}
            s => c.errors.push(format!("alert {}: severity {s:?}", r.alert)),
        }
        for a in ["summary:", "description:"] {
            if !r.text.contains(a) {
                c.errors
                    .push(format!("alert {}: no {a} annotation", r.alert));
            }
        }
    }

    // The unit tests' input series.
    let tests = repo_file("deploy/prometheus/snatgw-alerts.test.yml");
    let lines: Vec<&str> = tests.lines().collect();
    let mut n_series = 0;
    for (i, l) in lines.iter().enumerate() {
        if l.trim_start().starts_with("- series:") {
            c.series(&yaml_value(&lines, i, "series"));
            n_series += 1;
        }
    }
    assert!(n_series > 10, "test series found: {n_series}");

    // The dashboard.
    let dash: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/snatgw-dashboard.json")).expect("JSON");
    let (exprs, vars) = dashboard_queries(&dash);
    assert!(exprs.len() >= 10, "dashboard queries: {exprs:?}");
    for e in &exprs {
        c.expr("dashboard", e);
    }
    for q in &vars {
        c.template(q);
    }

    assert!(
        c.errors.is_empty(),
        "{} problem(s):\n  {}\n\nscrape:\n{text}",
        c.errors.len(),
        c.errors.join("\n  ")
    );
    // Every per-instance metric of R6.1 appears somewhere (rules or dashboard).
    for m in [
        "snatgw_allocated_snat_ports",
        "snatgw_used_snat_ports",
        "snatgw_snat_connection_count_total",
        "snatgw_dropped_packets_total",
        "snatgw_destination_used_snat_ports_ratio",
        "snatgw_live_flows",
        "snatgw_max_flows",
        // The runtime's (issue #21: pps, lock, fast path).
        "snatgw_packets_received_total",
        "snatgw_packets_sent_total",
        "snatgw_lock_acquisitions_total",
        "snatgw_lock_contended_total",
        "snatgw_lock_wait_seconds_total",
        "snatgw_fastpath_flows_installed_total",
        "snatgw_fastpath_install_failures_total",
        "snatgw_fastpath_packets_total",
    ] {
        assert!(c.used.contains(m), "{m} is used nowhere: {:?}", c.used);
    }
}

#[test]
fn every_alert_has_unit_tests_that_expect_it_to_fire_and_not_to_fire() {
    let rules = alert_rules(&repo_file("deploy/prometheus/snatgw-alerts.yml"));
    let tests = repo_file("deploy/prometheus/snatgw-alerts.test.yml");
    let lines: Vec<&str> = tests.lines().collect();
    let mut fires: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(name) = l.trim_start().strip_prefix("alertname:") {
            let exp = lines[i + 1..]
                .iter()
                .find(|x| x.trim_start().starts_with("exp_alerts:"))
                .expect("exp_alerts after alertname");
            let e = fires.entry(name.trim().to_string()).or_default();
            if exp.trim_end().ends_with("[]") {
                e.1 += 1;
            } else {
                e.0 += 1;
            }
        }
    }
    for r in &rules {
        let (pos, neg) = fires.get(&r.alert).copied().unwrap_or_default();
        assert!(
            pos > 0 && neg > 0,
            "{}: {pos} test(s) expecting it to fire, {neg} expecting it not to",
            r.alert
        );
    }
    let names: BTreeSet<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
    for t in fires.keys() {
        assert!(
            names.contains(t.as_str()),
            "tests name an unknown alert {t}"
        );
    }
}

#[test]
fn the_tokenizer_sees_what_it_must() {
    let p = parse_promql(
        r#"sum by (instance, protocol) (rate(snatgw_x_total{result="failed", job=~"$job"}[$__rate_interval])) / on(instance) sum(snatgw_y) by (le) > 0.8 and snatgw_z"#,
    );
    let names: Vec<&str> = p.selectors.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(names, ["snatgw_x_total", "snatgw_y", "snatgw_z"]);
    assert_eq!(
        p.selectors[0].matchers,
        [
            ("result".to_string(), "=".to_string(), "failed".to_string()),
            ("job".to_string(), "=~".to_string(), "$job".to_string())
        ]
    );
    let g: Vec<(&str, Vec<&str>, Vec<&str>)> = p
        .groupings
        .iter()
        .map(|g| {
            (
                g.keyword.as_str(),
                g.labels.iter().map(String::as_str).collect(),
                g.metrics.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        g,
        [
            ("by", vec!["instance", "protocol"], vec!["snatgw_x_total"]),
            (
                "on",
                vec!["instance"],
                vec!["snatgw_x_total", "snatgw_y", "snatgw_z"]
            ),
            ("by", vec!["le"], vec!["snatgw_y"]),
        ]
    );
    assert!(p.unknown.is_empty());
    assert_eq!(
        parse_promql("snat_used_ports > 1").unknown,
        ["snat_used_ports"]
    );
    let e = parse_exposition("# TYPE a counter\na_total{x=\"1\",y=\"q\\\"z\"} 3\nb 4\n");
    assert_eq!(e["a_total"]["y"], BTreeSet::from(["q\"z".to_string()]));
    assert!(e["b"].is_empty());
}
