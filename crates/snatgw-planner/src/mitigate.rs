//! Mitigations (SPEC §8, seeds' "Managing SNAT exhaustion", seed 002) as transformations of a
//! workload and/or a topology, and the what-if comparison.
//!
//! - `reuse`: HTTP/1.1-style connection reuse. Requests (TCP flows that end with FIN or RST)
//!   to one destination are served on an already open, idle connection of the same instance
//!   when there is one, else on a new connection; a connection the client has not used for
//!   [`CLIENT_IDLE_CLOSE_S`] seconds is closed with FIN (decision, docs/PLANNER.md).
//! - `pool:N`: connection pooling: as `reuse`, with at most N connections per destination; a
//!   request that finds them all busy waits for the first one free.
//! - `backoff`: every client retry policy becomes exponential (factor 2, same first delay).
//! - `ilpip`: every workload instance that may have one gets an instance-level public IP
//!   (R1.1; not web/worker roles, R1.5).
//! - `frontends:K`: the backend pool of each load-balanced workload instance is split over K
//!   frontends (K-1 new public IPs, pools and rule copies), so each frontend's pool — which
//!   decides the tier, R2.8 — is about 1/K of the instances.
//! - `smaller-pool:N`: the pool sharing each workload instance's public IP has N instances
//!   (others, never workload instances, are removed), R2.8.
//! - `keepalive:K`: TCP keepalives after K idle seconds, then every K seconds (seed 002 / R7.1:
//!   `tcp_keepalive_time = 120`, `KeepAliveTime = 120`): while the peer answers, each probe
//!   refreshes the idle timer (R3.4). The interval (30 s) and probe count (8) matter only
//!   when the peer is gone, which a trace does not show.
//!
//! Nothing here replays; [`what_if`] calls `replay` once per variant.

use std::collections::HashMap;
use std::fmt;

use snatgw_core::config::ConfigFile;
use snatgw_core::{Engine, Topology, L4};

use crate::error::{NotApplicable, PlanError, TopoError};
use crate::replay::{replay, Options};
use crate::report::{fmt_time, render, Report};
use crate::topo;
use crate::trace::{End, EvKind, FlowSpec, Workload};

/// Seconds after which a reusing client closes a connection it has not used (decision).
pub const CLIENT_IDLE_CLOSE_S: u64 = 60;

/// A mitigation (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mitigation {
    /// Connection reuse.
    Reuse,
    /// Connection pooling with at most N connections per destination.
    Pool(u32),
    /// Exponential retry backoff.
    Backoff,
    /// An ILPIP per instance.
    Ilpip,
    /// K frontends sharing the backend pool.
    Frontends(u32),
    /// A pool of N instances.
    SmallerPool(u32),
    /// TCP keepalive after K idle seconds.
    Keepalive(u32),
}

impl fmt::Display for Mitigation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mitigation::Reuse => write!(f, "reuse"),
            Mitigation::Pool(n) => write!(f, "pool:{n}"),
            Mitigation::Backoff => write!(f, "backoff"),
            Mitigation::Ilpip => write!(f, "ilpip"),
            Mitigation::Frontends(k) => write!(f, "frontends:{k}"),
            Mitigation::SmallerPool(n) => write!(f, "smaller-pool:{n}"),
            Mitigation::Keepalive(k) => write!(f, "keepalive:{k}"),
        }
    }
}

impl Mitigation {
    /// Every mitigation with its default parameter.
    pub const ALL: [Mitigation; 7] = [
        Mitigation::Reuse,
        Mitigation::Pool(16),
        Mitigation::Backoff,
        Mitigation::Ilpip,
        Mitigation::Frontends(2),
        Mitigation::SmallerPool(50),
        Mitigation::Keepalive(120),
    ];

    /// Parses `reuse`, `pool:N`, `backoff`, `ilpip`, `frontends:K`, `smaller-pool:N`,
    /// `keepalive:K` (the number is optional: defaults as in [`Mitigation::ALL`]).
    pub fn parse(s: &str) -> Result<Mitigation, PlanError> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let num = |def: u32, min: u32, max: u32| -> Result<u32, PlanError> {
            match arg {
                None => Ok(def),
                Some(a) => a
                    .parse::<u32>()
                    .ok()
                    .filter(|v| (min..=max).contains(v))
                    .ok_or_else(|| {
                        PlanError::Mitigation(format!("`{s}`: `{a}` is not a number {min}..={max}"))
                    }),
            }
        };
        let no_arg = |m: Mitigation| match arg {
            None => Ok(m),
            Some(_) => Err(PlanError::Mitigation(format!("`{s}` takes no parameter"))),
        };
        match name {
            "reuse" => no_arg(Mitigation::Reuse),
            "pool" => Ok(Mitigation::Pool(num(16, 1, 65535)?)),
            "backoff" => no_arg(Mitigation::Backoff),
            "ilpip" => no_arg(Mitigation::Ilpip),
            "frontends" => Ok(Mitigation::Frontends(num(2, 2, 64)?)),
            "smaller-pool" => Ok(Mitigation::SmallerPool(num(50, 1, 1000)?)),
            "keepalive" => Ok(Mitigation::Keepalive(num(120, 1, 86_400)?)),
            _ => Err(PlanError::Mitigation(format!(
                "`{s}` is not a mitigation (reuse, pool:N, backoff, ilpip, frontends:K, smaller-pool:N, keepalive:K)"
            ))),
        }
    }

    /// A comma-separated list, or `all`.
    pub fn parse_list(s: &str) -> Result<Vec<Mitigation>, PlanError> {
        if s.trim() == "all" {
            return Ok(Mitigation::ALL.to_vec());
        }
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| Mitigation::parse(p.trim()))
            .collect()
    }

    /// The topology and workload with this mitigation, or why it does not apply.
    pub fn apply(
        &self,
        cfg: &ConfigFile,
        w: &Workload,
    ) -> Result<(ConfigFile, Workload), NotApplicable> {
        let avoid: Vec<u32> = w.dests.iter().map(|d| d.ip).collect();
        match *self {
            Mitigation::Reuse => {
                let (out, n) = reuse(w, None);
                if n == 0 {
                    return Err(NotApplicable::NoRequestFlows);
                }
                Ok((cfg.clone(), out))
            }
            Mitigation::Pool(cap) => {
                let (out, n) = reuse(w, Some(cap));
                if n == 0 {
                    return Err(NotApplicable::NoRequestFlows);
                }
                Ok((cfg.clone(), out))
            }
            Mitigation::Backoff => {
                let mut out = w.clone();
                let mut n = 0;
                for f in &mut out.flows {
                    if let Some(r) = f.retry.as_mut() {
                        r.factor = r.factor.max(2.0);
                        n += 1;
                    }
                }
                if n == 0 {
                    return Err(NotApplicable::NoRetries);
                }
                Ok((cfg.clone(), out))
            }
            Mitigation::Ilpip => {
                let (out, done) = topo::add_ilpips(cfg, &w.instances, &avoid);
                if done.is_empty() {
                    return Err(NotApplicable::NoIlpipCandidate);
                }
                Ok((out, w.clone()))
            }
            Mitigation::Frontends(k) => {
                let engine = engine_of(cfg)?;
                let (out, split) = topo::split_frontends(cfg, &engine, &w.instances, k, &avoid);
                if split.is_empty() {
                    return Err(NotApplicable::NoLoadBalanced);
                }
                Ok((out, w.clone()))
            }
            Mitigation::SmallerPool(n) => {
                let mut out = cfg.clone();
                let mut any = false;
                for name in &w.instances {
                    let engine = engine_of(&out)?;
                    match topo::resize_pool(&out, &engine, name, n, &w.instances) {
                        Ok(c) => {
                            out = c;
                            any = true;
                        }
                        Err(TopoError::Ilpip(_) | TopoError::OwnPool(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                if !any {
                    return Err(NotApplicable::NoSharedPool);
                }
                Ok((out, w.clone()))
            }
            Mitigation::Keepalive(k) => Ok((cfg.clone(), add_keepalives(w, u64::from(k) * 1000))),
        }
    }
}

fn engine_of(cfg: &ConfigFile) -> Result<Engine, NotApplicable> {
    let t = Topology::from_config(cfg.clone())?;
    Ok(Engine::new(t, 0)?)
}

/// Per flow, its events in order.
fn by_flow(w: &Workload) -> Vec<Vec<(u64, EvKind)>> {
    let mut v: Vec<Vec<(u64, EvKind)>> = vec![Vec::new(); w.flows.len()];
    for e in &w.events {
        if !matches!(e.kind, EvKind::Scale(_)) {
            v[e.flow as usize].push((e.t_ms, e.kind));
        }
    }
    v
}

/// A copy of `w` without flows and events (same instances and destinations).
fn skeleton(w: &Workload) -> Workload {
    let mut out = Workload::new();
    for i in &w.instances {
        out.instance(i);
    }
    for d in &w.dests {
        out.dest(*d);
    }
    for e in &w.events {
        if let EvKind::Scale(_) = e.kind {
            out.push(e.t_ms, e.flow, e.kind);
        }
    }
    out
}

/// `w` with keepalives every `k_ms` of silence on each TCP flow until it closes (or, for a
/// flow the client leaves open, until the workload ends).
pub fn add_keepalives(w: &Workload, k_ms: u64) -> Workload {
    let horizon = w.end_ms();
    let mut out = skeleton(w);
    let k_ms = k_ms.max(1);
    for (f, evs) in by_flow(w).into_iter().enumerate() {
        let spec = w.flows[f];
        let nf = out.flow(spec);
        let tcp = w.dests[spec.dest as usize].l4 == L4::Tcp;
        let mut last: Option<u64> = None;
        let mut closed = false;
        for (t, k) in evs {
            if let (true, Some(l)) = (tcp && !closed, last) {
                let mut p = l + k_ms;
                while p < t {
                    out.push(p, nf, EvKind::Data);
                    p += k_ms;
                }
            }
            match k {
                // The socket stays open: the OS keeps probing.
                EvKind::Close(End::Idle) if tcp => out.push(t, nf, EvKind::Data),
                EvKind::Close(_) => {
                    closed = true;
                    out.push(t, nf, k);
                }
                _ => out.push(t, nf, k),
            }
            last = Some(t);
        }
        if let (true, false, Some(l)) = (tcp, closed, last) {
            let mut p = l + k_ms;
            while p <= horizon {
                out.push(p, nf, EvKind::Data);
                p += k_ms;
            }
        }
    }
    out.sort();
    out
}

struct Conn {
    flow: u32,
    busy_until: u64,
    last_use: u64,
}

/// `w` with its request flows served over reused connections (at most `cap` per instance and
/// destination). Returns the workload and the number of requests moved.
fn reuse(w: &Workload, cap: Option<u32>) -> (Workload, usize) {
    let idle_ms = CLIENT_IDLE_CLOSE_S * 1000;
    let per = by_flow(w);
    let mut out = skeleton(w);
    let mut groups: HashMap<(u32, u32), Vec<Conn>> = HashMap::new();
    let mut moved = 0;
    // Requests in order of their opens.
    let mut order: Vec<usize> = (0..w.flows.len()).collect();
    order.sort_by_key(|&f| per[f].first().map_or(u64::MAX, |e| e.0));
    for f in order {
        let evs = &per[f];
        let spec = w.flows[f];
        let is_req = w.dests[spec.dest as usize].l4 == L4::Tcp
            && evs.first().is_some_and(|e| e.1 == EvKind::Open)
            && matches!(
                evs.last(),
                Some((_, EvKind::Close(End::Fin))) | Some((_, EvKind::Close(End::Rst)))
            );
        if !is_req {
            let nf = out.flow(spec);
            for &(t, k) in evs {
                out.push(t, nf, k);
            }
            continue;
        }
        moved += 1;
        let (o, c) = (evs[0].0, evs[evs.len() - 1].0);
        let conns = groups.entry((spec.inst, spec.dest)).or_default();
        // Connections the client closed for idleness before this request.
        conns.retain(|cn| {
            let gone = cn.busy_until <= o && o.saturating_sub(cn.last_use) > idle_ms;
            if gone {
                out.push(cn.last_use + idle_ms, cn.flow, EvKind::Close(End::Fin));
            }
            !gone
        });
        let free = conns
            .iter()
            .enumerate()
            .filter(|(_, cn)| cn.busy_until <= o)
            .max_by_key(|(_, cn)| cn.last_use)
            .map(|(i, _)| i);
        let (ci, start) = match free {
            Some(i) => (i, o),
            None if cap.is_none_or(|n| (conns.len() as u32) < n) => {
                let nf = out.flow(FlowSpec {
                    sport: None,
                    retry: None,
                    refused: false,
                    ..spec
                });
                out.push(o, nf, EvKind::Open);
                conns.push(Conn {
                    flow: nf,
                    busy_until: o,
                    last_use: o,
                });
                (conns.len() - 1, o)
            }
            None => {
                let i = (0..conns.len())
                    .min_by_key(|&i| conns[i].busy_until)
                    .expect("cap >= 1");
                (i, conns[i].busy_until)
            }
        };
        let conn = &mut conns[ci];
        for &(t, k) in evs {
            let at = start + (t - o);
            if k == EvKind::Data || k == EvKind::Open || matches!(k, EvKind::Close(_)) {
                out.push(at, conn.flow, EvKind::Data);
            }
        }
        conn.busy_until = start + (c - o);
        conn.last_use = conn.busy_until;
    }
    for conns in groups.into_values() {
        for cn in conns {
            out.push(cn.last_use + idle_ms, cn.flow, EvKind::Close(End::Fin));
        }
    }
    out.sort();
    (out, moved)
}

/// One row of a what-if comparison.
#[derive(Debug, Clone)]
pub struct WhatIf {
    /// `baseline` or the mitigation.
    pub label: String,
    /// The replay's report, or why the mitigation does not apply
    /// ([`PlanError::NotApplicable`]) or its replay failed.
    pub outcome: Result<Report, PlanError>,
}

/// Replays `w` on `cfg` as it is and under each of `ms`.
pub fn what_if(
    cfg: &ConfigFile,
    w: &Workload,
    ms: &[Mitigation],
    opts: &Options,
) -> Result<Vec<WhatIf>, PlanError> {
    let mut rows = vec![WhatIf {
        label: "baseline".into(),
        outcome: Ok(replay(cfg, w, opts)?),
    }];
    for m in ms {
        let outcome = match m.apply(cfg, w) {
            // The same horizon for every variant when one is given; otherwise each runs to its
            // own end (a reusing client closes its connections later).
            Ok((c, w2)) => replay(&c, &w2, opts),
            Err(e) => Err(e.into()),
        };
        rows.push(WhatIf {
            label: m.to_string(),
            outcome,
        });
    }
    Ok(rows)
}

/// Whether a report shows trouble: flows that never got through (refused without a retry,
/// or given up) or were broken by the idle timeout. Refused attempts that a later retry got
/// through are not trouble by themselves (they are shown).
pub fn troubled(r: &Report) -> bool {
    r.lost() > 0 || r.broken() > 0
}

/// The what-if table: one row per variant.
pub fn what_if_table(rows: &[WhatIf]) -> String {
    let base_trouble = rows
        .first()
        .and_then(|r| r.outcome.as_ref().ok())
        .is_some_and(troubled);
    let mut t = vec![[
        "scenario".to_string(),
        "failed".to_string(),
        "first exhaustion".to_string(),
        "peak used / allocated".to_string(),
        "lost".to_string(),
        "broken".to_string(),
        "reclaimed".to_string(),
        "verdict".to_string(),
    ]];
    for (k, row) in rows.iter().enumerate() {
        match &row.outcome {
            Ok(r) => {
                let peak = r.busiest().map_or("-".to_string(), |i| {
                    let p = i.peak_used[0].max(i.peak_used[1]);
                    if i.scenario == "ilpip" {
                        "0 / 65535 (ILPIP, no PAT)".to_string()
                    } else {
                        format!("{p} / {}", i.allocated_min.min(i.allocated).max(1))
                    }
                });
                let verdict = match (k, troubled(r)) {
                    (0, true) => "exhausts",
                    (0, false) => "ok",
                    (_, false) if base_trouble => "fixes it",
                    (_, false) => "ok",
                    (_, true) => "still fails",
                };
                t.push([
                    row.label.clone(),
                    r.failed().to_string(),
                    fmt_time(r.first_exhaustion_s()),
                    peak,
                    r.lost().to_string(),
                    r.broken().to_string(),
                    r.reclaimed_ports().to_string(),
                    verdict.to_string(),
                ]);
            }
            Err(e) => t.push([
                row.label.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("not applicable: {e}"),
            ]),
        }
    }
    render(&t)
}
