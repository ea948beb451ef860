//! Tables for the API client subcommands (`snatgw get|ports|flows|events`, see [`crate::api_cli`]).
//!
//! Pure functions from the control plane's JSON types (`snatgw_core::config::*Cfg`, and
//! `snatgw_control::view`'s `InstancePorts`, `FlowRecord`, `EventRecord`) to text: one row per
//! resource, columns left-aligned and separated by two spaces, `-` for an empty cell.
//! Nothing here talks to the server or prints: the caller writes the strings.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use snatgw_control::{EventRecord, FlowRecord, InstancePorts};
use snatgw_core::config::{
    AvailabilitySetCfg, DeploymentCfg, GatewayCfg, InstanceCfg, LoadBalancerCfg, NsgCfg,
    PublicIpCfg,
};
use snatgw_core::ConfigFile;

/// A text table: a header and rows of cells, rendered with aligned columns.
#[derive(Debug, Clone, Default)]
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(head: &[&str]) -> Table {
        Table {
            head: head.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells are empty, extra cells are kept).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table, each line prefixed with `indent`; the last column is not padded.
    pub fn render_indented(&self, indent: &str) -> String {
        let cols = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.head.len()])
            .max()
            .unwrap_or(0);
        let mut w = vec![0usize; cols];
        for r in std::iter::once(&self.head).chain(&self.rows) {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.head).chain(&self.rows) {
            let mut line = String::from(indent);
            for (i, c) in r.iter().enumerate() {
                let cell = if c.is_empty() { "-" } else { c.as_str() };
                if i + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ", width = w[i].max(1));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// The table.
    pub fn render(&self) -> String {
        self.render_indented("")
    }
}

/// A resource kind shown one row per resource.
pub trait Rows {
    /// Column headers.
    const HEAD: &'static [&'static str];
    /// The row of one resource.
    fn row(&self) -> Vec<String>;
}

/// The table of `items`.
pub fn table<R: Rows>(items: &[R]) -> Table {
    let mut t = Table::new(R::HEAD);
    for i in items {
        t.row(i.row());
    }
    t
}

fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_default()
}

impl Rows for PublicIpCfg {
    const HEAD: &'static [&'static str] = &["NAME", "ADDRESS"];
    fn row(&self) -> Vec<String> {
        vec![self.name.clone(), self.address.clone()]
    }
}

impl Rows for AvailabilitySetCfg {
    const HEAD: &'static [&'static str] = &["NAME"];
    fn row(&self) -> Vec<String> {
        vec![self.name.clone()]
    }
}

impl Rows for DeploymentCfg {
    const HEAD: &'static [&'static str] = &["NAME", "STATE", "REPORTED POOL (R2.11)"];
    fn row(&self) -> Vec<String> {
        match self.redeploy_reported_instances {
            Some(n) => vec![self.name.clone(), "redeploying".into(), n.to_string()],
            None => vec![self.name.clone(), "settled".into(), String::new()],
        }
    }
}

impl Rows for InstanceCfg {
    const HEAD: &'static [&'static str] = &[
        "NAME",
        "KIND",
        "MODEL",
        "PRIVATE IP",
        "PUBLIC IP",
        "AVAILABILITY SET",
        "DEPLOYMENT",
        "MAX FLOWS",
    ];
    fn row(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.kind.label().into(),
            self.model.label().into(),
            self.private_ip.clone(),
            opt(&self.public_ip),
            opt(&self.availability_set),
            opt(&self.deployment),
            self.max_flows.map(|n| n.to_string()).unwrap_or_default(),
        ]
    }
}

impl Rows for LoadBalancerCfg {
    const HEAD: &'static [&'static str] = &["NAME", "MODEL", "FRONTENDS", "BACKEND POOLS", "RULES"];
    fn row(&self) -> Vec<String> {
        let frontends = self
            .frontends
            .iter()
            .map(|f| format!("{}={}", f.name, f.public_ip))
            .collect::<Vec<_>>()
            .join(", ");
        let pools = self
            .backend_pools
            .iter()
            .map(|p| format!("{}[{}]", p.name, p.members.join(",")))
            .collect::<Vec<_>>()
            .join(", ");
        let rules = self
            .rules
            .iter()
            .map(|r| {
                let probe = r
                    .probe
                    .as_ref()
                    .map(|p| format!(" probe={p}"))
                    .unwrap_or_default();
                format!(
                    "{} {} {}:{}->{}:{}{probe}",
                    r.name,
                    r.protocol.label(),
                    r.frontend,
                    r.frontend_port,
                    r.backend_pool,
                    r.backend_port
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        vec![
            self.name.clone(),
            self.model.label().into(),
            frontends,
            pools,
            rules,
        ]
    }
}

impl Rows for NsgCfg {
    const HEAD: &'static [&'static str] = &["NAME", "NICS", "SUBNETS", "RULES"];
    fn row(&self) -> Vec<String> {
        let rules = self
            .rules
            .iter()
            .map(|r| {
                format!(
                    "{} {} {:?} {:?} {:?} {}:{}->{}:{}",
                    r.priority,
                    r.name,
                    r.direction,
                    r.access,
                    r.protocol,
                    r.sources.join(","),
                    r.source_ports.join(","),
                    r.destinations.join(","),
                    r.destination_ports.join(",")
                )
                .to_lowercase()
            })
            .collect::<Vec<_>>()
            .join("; ");
        vec![
            self.name.clone(),
            self.nics.join(","),
            self.subnets.join(","),
            rules,
        ]
    }
}

/// One JSON value as a table cell: strings bare, arrays joined by `,`, `null` empty.
fn json_cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => a.iter().map(json_cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// The gateway settings, one row per setting (the config file's `[gateway]` keys).
pub fn gateway(g: &GatewayCfg) -> Table {
    let mut t = Table::new(&["SETTING", "VALUE"]);
    // Through JSON, so a setting added to `GatewayCfg` shows up without a change here.
    if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(g) {
        let sorted: BTreeMap<_, _> = m.into_iter().collect();
        for (k, v) in sorted {
            let mut cell = json_cell(&v);
            if k == "max_flows" && cell.is_empty() {
                cell = "(from flow_memory_mib)".into();
            }
            t.row(vec![k, cell]);
        }
    }
    t
}

/// The whole topology: every section with its count and table.
pub fn topology(c: &ConfigFile) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "gateway:");
    o.push_str(&gateway(&c.gateway).render_indented("  "));
    fn section<R: Rows>(o: &mut String, name: &str, items: &[R]) {
        let _ = writeln!(o, "{name}: {}", items.len());
        if !items.is_empty() {
            o.push_str(&table(items).render_indented("  "));
        }
    }
    section(&mut o, "public-ips", &c.public_ip);
    section(&mut o, "availability-sets", &c.availability_set);
    section(&mut o, "deployments", &c.deployment);
    section(&mut o, "instances", &c.instance);
    section(&mut o, "load-balancers", &c.load_balancer);
    o
}

/// `a/b` for a per-protocol pair.
fn pair(tcp: u64, udp: u64) -> String {
    format!("{tcp}/{udp}")
}

/// The block as `first-last` ranges, or what an ILPIP has instead.
pub fn block(p: &InstancePorts) -> String {
    if p.block.is_empty() {
        return if p.scenario == "ilpip" {
            "all (1:1, no PAT)".into()
        } else {
            String::new()
        };
    }
    p.block
        .iter()
        .map(|r| format!("{}-{}", r.first, r.last))
        .collect::<Vec<_>>()
        .join(",")
}

/// Free ports per protocol: allocated minus used (ports no flow holds).
pub fn free(p: &InstancePorts) -> (u64, u64) {
    let a = u64::from(p.allocated);
    (a.saturating_sub(p.used.tcp), a.saturating_sub(p.used.udp))
}

fn drops(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The ports table of `snatgw ports` (SPEC R6.1): one row per instance.
pub fn ports(list: &[InstancePorts]) -> Table {
    let mut t = Table::new(&[
        "INSTANCE",
        "SCENARIO",
        "RULE",
        "PUBLIC IP",
        "POOL",
        "ALLOCATED",
        "BLOCK",
        "USED T/U",
        "FREE T/U",
        "FLOWS T/U",
        "CONN OK T/U",
        "CONN FAILED T/U",
        "DROPS",
    ]);
    for p in list {
        let (ft, fu) = free(p);
        t.row(vec![
            p.name.clone(),
            p.scenario.clone(),
            p.rule.clone(),
            p.public_ip.clone(),
            p.pool_size.to_string(),
            p.allocated.to_string(),
            block(p),
            pair(p.used.tcp, p.used.udp),
            pair(ft, fu),
            pair(p.flows.tcp, p.flows.udp),
            pair(p.connections_ok.tcp, p.connections_ok.udp),
            pair(p.connections_failed.tcp, p.connections_failed.udp),
            drops(&p.drops),
        ]);
    }
    t
}

/// The flows table of `snatgw flows` (SPEC R6.3).
pub fn flows(list: &[FlowRecord]) -> Table {
    let mut t = Table::new(&[
        "INSTANCE",
        "PROTO",
        "PRIVATE",
        "PUBLIC",
        "REMOTE",
        "STATE",
        "LAST SEEN",
        "EXPIRES AT",
    ]);
    for f in list {
        t.row(vec![
            f.instance.clone(),
            f.protocol.clone(),
            f.private.clone(),
            f.public.clone(),
            f.remote.clone(),
            f.state.clone(),
            f.last_seen.to_string(),
            f.expires_at.to_string(),
        ]);
    }
    t
}

/// The header line of the events listing (see [`event_line`]).
pub fn event_header() -> String {
    event_cells(
        "SEQ",
        "TIME",
        "KIND",
        "INSTANCE",
        "PUBLIC IP",
        "PROTO",
        "DESTINATION",
        "COUNT",
        "DETAIL",
    )
}

#[allow(clippy::too_many_arguments)]
fn event_cells(
    seq: &str,
    time: &str,
    kind: &str,
    instance: &str,
    public_ip: &str,
    proto: &str,
    dst: &str,
    count: &str,
    detail: &str,
) -> String {
    // Fixed widths: `--follow` prints lines as they come and cannot align on later ones.
    format!(
        "{seq:>6}  {time:>6}  {kind:<16}  {instance:<20}  {public_ip:<15}  {proto:<5}  {dst:<21}  {count:>5}  {detail}"
    )
    .trim_end()
    .to_string()
}

/// One event as a line of the events listing (fixed-width columns).
pub fn event_line(e: &EventRecord) -> String {
    let d = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    event_cells(
        &e.seq.to_string(),
        &e.time.to_string(),
        &e.kind,
        &d(&e.instance),
        &d(&e.public_ip),
        &d(&e.protocol),
        &d(&e.destination),
        &e.count.to_string(),
        &e.detail,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use snatgw_control::{PerProtocol, PortRange};

    #[test]
    fn table_aligns_columns_and_marks_empty_cells() {
        let mut t = Table::new(&["A", "LONG HEADER", "Z"]);
        t.row(vec!["xyz".into(), String::new(), "last".into()]);
        t.row(vec!["q".into(), "v".into(), "end".into()]);
        assert_eq!(
            t.render(),
            "A    LONG HEADER  Z\nxyz  -            last\nq    v            end\n"
        );
    }

    fn report() -> InstancePorts {
        InstancePorts {
            name: "vm1".into(),
            kind: "vm".into(),
            model: "arm".into(),
            private_ip: "10.0.3.10".into(),
            scenario: "default_snat".into(),
            rule: "R1.3".into(),
            public_ip: "192.0.2.100".into(),
            allocated: 1024,
            block: vec![PortRange {
                first: 1024,
                last: 2047,
            }],
            pool_size: 2,
            used: PerProtocol { tcp: 24, udp: 0 },
            flows: PerProtocol { tcp: 30, udp: 1 },
            connections_ok: PerProtocol { tcp: 31, udp: 1 },
            connections_failed: PerProtocol { tcp: 2, udp: 0 },
            drops: [("exhaustion".to_string(), 2u64)].into_iter().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn ports_row_shows_free_as_allocated_minus_used() {
        let text = ports(&[report()]).render();
        let row = text.lines().nth(1).expect("row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "vm1",
                "default_snat",
                "R1.3",
                "192.0.2.100",
                "2",
                "1024",
                "1024-2047",
                "24/0",
                "1000/1024",
                "30/1",
                "31/1",
                "2/0",
                "exhaustion=2"
            ]
        );
        let mut ilpip = report();
        ilpip.scenario = "ilpip".into();
        ilpip.block.clear();
        assert_eq!(block(&ilpip), "all (1:1, no PAT)");
        ilpip.used.tcp = 70_000;
        assert_eq!(free(&ilpip).0, 0, "never negative");
    }

    #[test]
    fn gateway_lists_every_setting() {
        let t = gateway(&GatewayCfg::default()).render();
        for key in [
            "seed",
            "idle_timeout_secs",
            "vnet_prefixes",
            "default_snat_pool",
            "max_flows_per_instance",
            "event_interval_secs",
        ] {
            assert!(t.lines().any(|l| l.starts_with(key)), "{key} missing:\n{t}");
        }
        assert!(t.contains("10.0.0.0/8,172.16.0.0/12,192.168.0.0/16"));
        assert!(t.contains("(from flow_memory_mib)"));
    }

    #[test]
    fn event_line_has_fixed_columns() {
        let e = EventRecord {
            seq: 3,
            time: 70,
            kind: "exhaustion".into(),
            instance: Some("vm1".into()),
            public_ip: Some("192.0.2.100".into()),
            protocol: Some("tcp".into()),
            destination: Some("198.51.100.7:443".into()),
            count: 1,
            since: 70,
            summary: false,
            detail: "all 1024 preallocated ports in use for this destination".into(),
        };
        let l = event_line(&e);
        assert!(
            l.starts_with("     3      70  exhaustion        vm1 "),
            "{l}"
        );
        assert!(l.ends_with("for this destination"));
        assert_eq!(
            event_header().find("DETAIL"),
            l.find("all 1024"),
            "detail column aligned with its header"
        );
    }
}
