//! `snatgw show`: loads a configuration into a fresh engine and prints what it decided.
//!
//! Read-only: it starts no data plane and changes nothing. A file the engine refuses makes it
//! exit non-zero with the error, which names the field and the SPEC rule.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use snatgw_core::{Engine, InstanceReport, Scenario};

/// Loads a configuration file into an engine at time 0 (see
/// [`snatgw_runtime::config::load_engine`]).
pub fn load(path: &Path) -> Result<Engine, String> {
    snatgw_runtime::config::load_engine(path).map_err(|e| e.to_string())
}

fn detail(r: &InstanceReport) -> String {
    match &r.scenario {
        Scenario::Ilpip { .. } => "instance-level public IP, stateless 1:1".into(),
        Scenario::LoadBalanced { lb, candidates, .. } => {
            format!("load balancer {lb}, frontend chosen from {candidates}")
        }
        Scenario::DefaultSnat { group, .. } => format!("default SNAT for {group}"),
        other => format!("{other:?}"),
    }
}

fn block(r: &InstanceReport) -> String {
    if r.block.is_empty() {
        return "all ports (no PAT)".into();
    }
    r.block
        .iter()
        .map(|(a, b)| format!("{a}-{b}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Renders the table.
pub fn table(e: &Engine) -> String {
    let reports = e.instances();
    let p = e.topology().params;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} instance(s); timers: idle {} s, FIN {} s, RST {} s",
        reports.len(),
        p.idle_timeout,
        p.fin_timeout,
        p.rst_timeout
    );
    let rows: Vec<[String; 11]> = reports
        .iter()
        .map(|r| {
            [
                r.name.to_string(),
                format!("{:?}", r.kind)
                    .to_lowercase()
                    .replace("webworkerrole", "web_worker_role"),
                format!("{:?}", r.model).to_lowercase(),
                Ipv4Addr::from(r.private_ip).to_string(),
                r.scenario.name().into(),
                r.scenario.rule().into(),
                Ipv4Addr::from(r.scenario.addr()).to_string(),
                r.pool_size.to_string(),
                format!("{}/{}", r.allocated, r.allocated),
                block(r),
                detail(r),
            ]
        })
        .collect();
    let head = [
        "INSTANCE",
        "KIND",
        "MODEL",
        "PRIVATE IP",
        "SCENARIO",
        "RULE",
        "PUBLIC IP",
        "POOL",
        "TCP/UDP PORTS",
        "BLOCK",
        "WHY",
    ];
    let mut w = head.map(|h| h.len());
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: &[String]| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{:<width$}  ", c, width = w[i]);
            }
        }
        s.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(&head.map(String::from)));
    for r in &rows {
        let _ = writeln!(out, "{}", line(r));
    }
    policy(&mut out, &e.topology().source);
    out
}

/// NSGs (SPEC §4) and inbound rules with their probes (§5, R3.7), one line each.
fn policy(out: &mut String, cfg: &snatgw_core::ConfigFile) {
    for n in &cfg.nsg {
        let on = |v: &[String]| {
            if v.is_empty() {
                "-".into()
            } else {
                v.join(",")
            }
        };
        let _ = writeln!(
            out,
            "nsg {}: nics {}, subnets {}; {} rule(s) + 6 default (R4.1, R4.2)",
            n.name,
            on(&n.nics),
            on(&n.subnets),
            n.rules.len()
        );
    }
    for lb in &cfg.load_balancer {
        for r in &lb.rules {
            let fe = lb
                .frontends
                .iter()
                .find(|f| f.name == r.frontend)
                .and_then(|f| cfg.public_ip.iter().find(|p| p.name == f.public_ip))
                .map_or("?".to_string(), |p| p.address.clone());
            let probe = r
                .probe
                .as_deref()
                .and_then(|n| lb.probes.iter().find(|p| p.name == n))
                .map_or("no probe: every member healthy".to_string(), |p| {
                    format!(
                        "probe {} {:?} port {} every {} s, down after {} (R5.2)",
                        p.name, p.protocol, p.port, p.interval_secs, p.unhealthy_threshold
                    )
                    .to_lowercase()
                });
            let _ = writeln!(
                out,
                "inbound rule {}/{}: {} {}:{} -> pool {} port {}, idle {} min (R5.1, R3.7); {}",
                lb.name,
                r.name,
                format!("{:?}", r.protocol).to_lowercase(),
                fe,
                r.frontend_port,
                r.backend_pool,
                r.backend_port,
                r.idle_timeout_minutes,
                probe
            );
        }
    }
}

/// JSON rendering (one object per instance).
pub fn json(e: &Engine) -> serde_json::Value {
    let items: Vec<serde_json::Value> = e
        .instances()
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": &*r.name,
                "kind": format!("{:?}", r.kind),
                "model": format!("{:?}", r.model),
                "private_ip": Ipv4Addr::from(r.private_ip).to_string(),
                "scenario": r.scenario.name(),
                "rule": r.scenario.rule(),
                "public_ip": Ipv4Addr::from(r.scenario.addr()).to_string(),
                "pool_size": r.pool_size,
                "ports": { "tcp": r.allocated, "udp": r.allocated },
                "block": r.block.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
                "why": detail(r),
            })
        })
        .collect();
    serde_json::json!({ "instances": items })
}

/// `snatgw show`.
pub fn run(path: &Path, as_json: bool) -> Result<(), String> {
    let e = load(path)?;
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json(&e)).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", table(&e));
    }
    Ok(())
}
