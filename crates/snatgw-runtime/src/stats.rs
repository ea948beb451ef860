//! Counters of a running gateway: the JSON snapshot `snatgw run --stats-file` writes every
//! second (atomically: temporary file, then rename), and `snatgw stats --file`, which prints it.
//!
//! What it holds (SPEC R6.1, R6.2): the engine's and the data plane's global counters, per
//! queue I/O counters, the shared-lock contention figures, per instance the scenario,
//! public IP, allocated and used SNAT ports, flows, SNAT connections (ok/failed) and drops by
//! reason, and the last events (exhaustion, tier changes...).
//!
//! What it does not do: list individual translations (R6.3 is `snatgw show`'s and the
//! engine's `flows()`).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use snatgw_core::{DropReason, Engine, Event, EventKind};
use snatgw_dataplane::DataplaneStats;
use snatgw_io::IoStats;

/// How many recent events a snapshot keeps.
pub const EVENTS_KEPT: usize = 64;

/// One snapshot of a running gateway.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Gateway time: whole seconds since it started (the engine's clock).
    pub time: u32,
    /// Milliseconds since it started.
    pub uptime_ms: u64,
    /// Private-side TUN device (packets read from it are outbound, R9.1).
    pub tun_private: String,
    /// Public-side TUN device (packets read from it are inbound, R9.1).
    pub tun_public: String,
    /// Queues per TUN (one worker thread each).
    pub queues: usize,
    /// Virtio-net offload on the TUN.
    pub offload: bool,
    /// Whether this is the final snapshot, written at shutdown.
    pub final_snapshot: bool,
    /// Flows in the table.
    pub live_flows: usize,
    /// Engine counters.
    pub engine: EngineSnap,
    /// Data-plane counters.
    pub dataplane: DataplaneSnap,
    /// Per-queue I/O counters.
    pub io: Vec<IoSnap>,
    /// Contention on the shared gateway lock.
    pub lock: LockSnap,
    /// Per instance.
    pub instances: Vec<InstanceSnap>,
    /// Most recent events, oldest first (at most [`EVENTS_KEPT`]).
    pub events: Vec<EventSnap>,
    /// Event log lines not written because of the log rate cap (R9.3).
    #[serde(default)]
    pub log_lines_suppressed: u64,
    /// The kernel fast path, when it runs (issue #9).
    #[serde(default)]
    pub fast_path: Option<crate::fastpath::FastPathSnap>,
    /// Live inbound load-balancing flows (R5.1).
    #[serde(default)]
    pub inbound_flows: usize,
    /// Health-probe state per (load balancer, probe, member) (R5.2).
    #[serde(default)]
    pub probes: Vec<ProbeSnap>,
    /// Hits per NSG rule, default rules included (R4.1, R4.2).
    #[serde(default)]
    pub nsg_hits: Vec<NsgHitSnap>,
}

/// The probe state of one member (R5.2): the same record `/metrics` is built from.
pub type ProbeSnap = snatgw_control::backend::ProbeMetrics;

/// One NSG rule's hit counter (R4.1): the same record `/metrics` is built from.
pub type NsgHitSnap = snatgw_control::backend::NsgRuleMetrics;

/// Engine-wide counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineSnap {
    /// Packets passed untranslated (R1.7).
    pub passed: u64,
    /// Packets translated through an ILPIP.
    pub ilpip_packets: u64,
    /// Flows created.
    pub flows_created: u64,
    /// Flows ended by cause (`idle`, `fin`, `rst`, `reclaimed`).
    pub flows_ended: BTreeMap<String, u64>,
    /// Drops by reason label (engine decisions only).
    pub drops: BTreeMap<String, u64>,
    /// Events dropped because nobody drained them.
    pub events_lost: u64,
}

/// Data-plane counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataplaneSnap {
    /// Packets translated.
    pub translated: u64,
    /// Packets passed.
    pub passed: u64,
    /// Drops by reason label (all reasons).
    pub drops: BTreeMap<String, u64>,
    /// Malformed packets by parse error.
    pub malformed: BTreeMap<String, u64>,
    /// ICMP errors translated (R3.6).
    pub icmp_errors: u64,
    /// Later fragments translated.
    pub fragments: u64,
}

/// I/O counters of one queue.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IoSnap {
    /// `private` or `public`: which TUN the queue belongs to.
    pub side: String,
    /// Queue index within its TUN.
    pub queue: usize,
    /// The backend's counters (same JSON field names, flattened).
    #[serde(flatten)]
    pub io: IoStats,
    /// Batches received (non-empty).
    pub batches: u64,
}

/// Contention on the one `Mutex<Gateway>` the workers share (see docs/RUNNING.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LockSnap {
    /// Times the lock was taken (workers once per batch, housekeeping once per tick).
    pub acquisitions: u64,
    /// Times it was already held by another thread.
    pub contended: u64,
    /// Total nanoseconds spent waiting for it.
    pub wait_ns: u64,
    /// Total nanoseconds it was held by workers.
    pub held_ns: u64,
    /// Bounded timer steps the housekeeping thread ran (R9.4).
    #[serde(default)]
    pub timer_steps: u64,
    /// Longest single timer step under the lock, nanoseconds (R9.4 target: about 1 ms).
    #[serde(default)]
    pub timer_max_ns: u64,
    /// Longest time a worker held the lock for one batch, nanoseconds.
    #[serde(default)]
    pub batch_max_ns: u64,
}

/// Per-protocol pair.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PerProto {
    /// TCP.
    pub tcp: u64,
    /// UDP.
    pub udp: u64,
}

/// One instance (SPEC R6.1).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InstanceSnap {
    /// Name.
    pub name: String,
    /// Private IP.
    pub private_ip: String,
    /// Scenario (`ilpip`, `load_balanced`, `default_snat`).
    pub scenario: String,
    /// The SPEC rule that decided it.
    pub rule: String,
    /// Public IP.
    pub public_ip: String,
    /// Preallocated SNAT ports (per protocol; 65535 for an ILPIP).
    pub allocated: u32,
    /// Used SNAT ports (distinct ports held by a flow).
    pub used: PerProto,
    /// Flows.
    pub flows: PerProto,
    /// SNAT connections that got a port.
    pub conn_ok: PerProto,
    /// SNAT connections that failed for want of a port (R2.6).
    pub conn_fail: PerProto,
    /// Packets translated out / in (all protocols).
    pub packets_out: u64,
    /// Packets translated in.
    pub packets_in: u64,
    /// Drops by reason label (all protocols), only non-zero ones.
    pub drops: BTreeMap<String, u64>,
    /// Flows ended by idle timeout on which the instance later sent again: keepalives
    /// missing (SPEC R3.4, R7.1).
    #[serde(default)]
    pub idle_ended_then_sent: PerProto,
    /// Refused new flows answered to the instance with a RST or ICMP 3/13 (SPEC R9.5).
    #[serde(default)]
    pub fail_fast_answered: PerProto,
    /// Refused new flows left unanswered by the per-instance rate limit (SPEC R9.5).
    #[serde(default)]
    pub fail_fast_suppressed: PerProto,
}

/// One event (SPEC R6.2).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventSnap {
    /// Gateway time (for a summary: when its interval closed).
    pub time: u32,
    /// `exhaustion`, `flow_limit`, `overflow`, `ports_reclaimed`, `tier_changed`,
    /// `scenario_changed`.
    pub kind: String,
    /// Occurrences this record stands for: 1, or for a summary the repeats counted (R9.3).
    #[serde(default = "one")]
    pub count: u64,
    /// For a summary, when its interval opened.
    #[serde(default)]
    pub since: u32,
    /// Whether this is an aggregated summary of repeats (R9.3).
    #[serde(default)]
    pub summary: bool,
    /// Instance, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Public IP, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<String>,
    /// Protocol, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// Destination `ip:port`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    /// Everything else, as text.
    pub detail: String,
}

fn one() -> u64 {
    1
}

fn drop_map(drops: &[u64; DropReason::COUNT]) -> BTreeMap<String, u64> {
    DropReason::ALL
        .iter()
        .filter(|r| drops[**r as usize] > 0)
        .map(|r| (r.label().to_string(), drops[*r as usize]))
        .collect()
}

/// Converts an engine event.
pub fn event_snap(e: &Event) -> EventSnap {
    let mut snap = event_snap_kind(e);
    snap.count = e.count;
    snap.since = e.since;
    snap.summary = e.summary;
    if e.summary {
        snap.detail = format!(
            "{} more in {} s (summary, R9.3): {}",
            e.count,
            e.time.saturating_sub(e.since),
            snap.detail
        );
    }
    snap
}

fn event_snap_kind(e: &Event) -> EventSnap {
    let ip = |a: u32| Some(Ipv4Addr::from(a).to_string());
    match &e.kind {
        EventKind::Exhaustion {
            instance,
            public_ip,
            l4,
            dst,
            dst_port,
            allocated,
        } => EventSnap {
            time: e.time,
            kind: "exhaustion".into(),
            instance: Some(instance.to_string()),
            public_ip: ip(*public_ip),
            proto: Some(l4.label().into()),
            dst: Some(format!("{}:{dst_port}", Ipv4Addr::from(*dst))),
            detail: format!("all {allocated} preallocated ports in use for this destination"),
            ..Default::default()
        },
        EventKind::FlowLimit {
            instance,
            public_ip,
            l4,
            dst,
            dst_port,
            limit,
            scope,
        } => EventSnap {
            time: e.time,
            kind: "flow_limit".into(),
            instance: Some(instance.to_string()),
            public_ip: ip(*public_ip),
            proto: Some(l4.label().into()),
            dst: Some(format!("{}:{dst_port}", Ipv4Addr::from(*dst))),
            detail: format!("{scope} flow limit of {limit} live flows reached (R9.2)"),
            ..Default::default()
        },
        EventKind::Overflow => EventSnap {
            time: e.time,
            kind: "overflow".into(),
            detail: "events of further (instance, destination) keys, aggregated together".into(),
            ..Default::default()
        },
        EventKind::PortsReclaimed {
            instance,
            public_ip,
            ports,
            flows,
            reason,
        } => EventSnap {
            time: e.time,
            kind: "ports_reclaimed".into(),
            instance: Some(instance.to_string()),
            public_ip: ip(*public_ip),
            detail: format!("{ports} ports, {flows} flows dropped ({reason})"),
            ..Default::default()
        },
        EventKind::TierChanged {
            public_ip,
            pool_size,
            from,
            to,
        } => EventSnap {
            time: e.time,
            kind: "tier_changed".into(),
            public_ip: ip(*public_ip),
            detail: format!("pool {pool_size}: {from} -> {to} ports per instance"),
            ..Default::default()
        },
        EventKind::ProbeChanged {
            lb,
            probe,
            member,
            up,
            failures,
        } => EventSnap {
            time: e.time,
            kind: if *up { "probe_up" } else { "probe_down" }.into(),
            instance: Some(member.to_string()),
            detail: probe_detail(lb, probe, *up, *failures),
            ..Default::default()
        },
        EventKind::ScenarioChanged { instance, from, to } => EventSnap {
            time: e.time,
            kind: "scenario_changed".into(),
            instance: Some(instance.to_string()),
            detail: format!("{from} -> {to}"),
            ..Default::default()
        },
    }
}

/// The text of a probe state change (R5.2).
pub fn probe_detail(lb: &str, probe: &str, up: bool, failures: u32) -> String {
    if up {
        format!("load balancer {lb}, probe {probe}: up, gets new inbound flows")
    } else {
        format!("load balancer {lb}, probe {probe}: down after {failures} failed probes in a row; no new inbound flows (outbound unaffected)")
    }
}

/// Logs an event as a structured `tracing` line (exhaustion as a warning).
pub fn log_event(e: &EventSnap) {
    let instance = e.instance.as_deref().unwrap_or("");
    let public_ip = e.public_ip.as_deref().unwrap_or("");
    let message = match e.kind.as_str() {
        "exhaustion" => Some("SNAT port exhaustion (R2.6)"),
        "flow_limit" => Some("flow limit reached (R9.2)"),
        "overflow" => Some("repeated events aggregated (R9.3)"),
        "probe_down" => Some("load-balancer member down: no new inbound flows (R5.2, R4.5)"),
        _ => None,
    };
    if let Some(message) = message {
        tracing::warn!(
            event = %e.kind,
            time = e.time,
            count = e.count,
            summary = e.summary,
            instance,
            public_ip,
            proto = e.proto.as_deref().unwrap_or(""),
            dst = e.dst.as_deref().unwrap_or(""),
            detail = %e.detail,
            "{message}"
        );
    } else {
        tracing::info!(
            event = %e.kind,
            time = e.time,
            instance,
            public_ip,
            detail = %e.detail,
            "gateway event"
        );
    }
}

/// Fills the engine-derived parts of a snapshot.
pub fn fill_from_engine(s: &mut Snapshot, engine: &Engine, dp: &DataplaneStats) {
    let g = engine.global_stats();
    const ENDED: [&str; 4] = ["idle", "fin", "rst", "reclaimed"];
    s.time = engine.now();
    s.live_flows = engine.live_flows();
    s.inbound_flows = engine.inbound_flow_count();
    s.probes = snatgw_control::backend::probe_metrics(engine);
    s.nsg_hits = snatgw_control::backend::nsg_rule_metrics(engine);
    s.engine = EngineSnap {
        passed: g.passed,
        ilpip_packets: g.ilpip_packets,
        flows_created: g.flows_created,
        flows_ended: ENDED
            .iter()
            .zip(g.flows_ended)
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        drops: drop_map(&g.drops),
        events_lost: g.events_lost,
    };
    s.dataplane = DataplaneSnap {
        translated: dp.translated,
        passed: dp.passed,
        drops: drop_map(&dp.drops),
        malformed: dp
            .malformed
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        icmp_errors: dp.icmp_errors,
        fragments: dp.fragments,
    };
    s.instances = engine
        .instances()
        .iter()
        .map(|r| {
            let mut drops = [0u64; DropReason::COUNT];
            for st in &r.stats {
                for (d, x) in drops.iter_mut().zip(st.drops) {
                    *d += x;
                }
            }
            InstanceSnap {
                name: r.name.to_string(),
                private_ip: Ipv4Addr::from(r.private_ip).to_string(),
                scenario: r.scenario.name().into(),
                rule: r.scenario.rule().into(),
                public_ip: Ipv4Addr::from(r.scenario.addr()).to_string(),
                allocated: r.allocated,
                used: PerProto {
                    tcp: r.used[0].into(),
                    udp: r.used[1].into(),
                },
                flows: PerProto {
                    tcp: r.flows[0].into(),
                    udp: r.flows[1].into(),
                },
                conn_ok: PerProto {
                    tcp: r.stats[0].conn_ok,
                    udp: r.stats[1].conn_ok,
                },
                conn_fail: PerProto {
                    tcp: r.stats[0].conn_fail,
                    udp: r.stats[1].conn_fail,
                },
                packets_out: r.stats.iter().map(|s| s.packets_out).sum(),
                packets_in: r.stats.iter().map(|s| s.packets_in).sum(),
                drops: drop_map(&drops),
                idle_ended_then_sent: PerProto {
                    tcp: r.stats[0].idle_ended_then_sent,
                    udp: r.stats[1].idle_ended_then_sent,
                },
                fail_fast_answered: PerProto {
                    tcp: r.stats[0].fail_fast_answered,
                    udp: r.stats[1].fail_fast_answered,
                },
                fail_fast_suppressed: PerProto {
                    tcp: r.stats[0].fail_fast_suppressed,
                    udp: r.stats[1].fail_fast_suppressed,
                },
            }
        })
        .collect();
}

/// The line saying that an instance used flows the gateway had ended by idle timeout (SPEC
/// R3.4, R7.1), for `snatgw stats`, `snatgw ports` and `snatgw keepalive-check`.
pub fn idle_then_sent_note(instance: &str, tcp: u64, udp: u64) -> String {
    format!(
        "instance {instance}: {} flow(s) ended idle and were used again (tcp {tcp}, udp {udp}): enable keepalives below the idle timeout (SPEC R7.1, `snatgw keepalive-check`)",
        tcp + udp
    )
}

/// Converts I/O counters.
pub fn io_snap(side: &str, queue: usize, st: &IoStats, batches: u64) -> IoSnap {
    IoSnap {
        side: side.into(),
        queue,
        io: *st,
        batches,
    }
}

/// Keeps the last [`EVENTS_KEPT`] events.
pub fn push_events(ring: &mut VecDeque<EventSnap>, new: impl IntoIterator<Item = EventSnap>) {
    for e in new {
        if ring.len() == EVENTS_KEPT {
            ring.pop_front();
        }
        ring.push_back(e);
    }
}

/// Writes `s` to `path` atomically (`path.tmp`, then rename).
pub fn write_atomic(path: &Path, s: &Snapshot) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let text = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Reads a snapshot file.
pub fn read(path: &Path) -> Result<Snapshot, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn fmt_map(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Renders a snapshot for people.
pub fn render(s: &Snapshot) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "gateway time {} s (uptime {:.1} s){}; tun {} (private) + {} (public) x{} queue(s), offload {}; {} live flow(s)",
        s.time,
        s.uptime_ms as f64 / 1000.0,
        if s.final_snapshot { ", final" } else { "" },
        s.tun_private,
        s.tun_public,
        s.queues,
        if s.offload { "on" } else { "off" },
        s.live_flows
    );
    let d = &s.dataplane;
    let _ = writeln!(
        o,
        "dataplane: translated {}, passed {}, icmp errors {}, fragments {}; drops {}",
        d.translated,
        d.passed,
        d.icmp_errors,
        d.fragments,
        fmt_map(&d.drops)
    );
    if let Some(f) = &s.fast_path {
        let p = |k: &str| f.packets.get(k).copied().unwrap_or(0);
        let up: std::collections::BTreeMap<String, u64> = f
            .packets
            .iter()
            .filter(|(k, v)| !k.starts_with("translated") && **v > 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let _ = writeln!(
            o,
            "fast path ({} on {} / {}): translated out {}, in {}; flows installed {}, removed {}, no room {}; passed up {}",
            f.mode,
            f.private_if,
            f.public_if,
            p("translated_out"),
            p("translated_in"),
            f.installed,
            f.removed,
            f.install_failed,
            fmt_map(&up)
        );
    }
    let e = &s.engine;
    let _ = writeln!(
        o,
        "engine: flows created {}, ended {}, events lost {}",
        e.flows_created,
        fmt_map(&e.flows_ended),
        e.events_lost
    );
    for q in &s.io {
        let _ = writeln!(
            o,
            "{} queue {}: rx {} pkts / {} B ({} errors, {} super), tx {} pkts / {} B ({} errors), {} batches",
            q.side, q.queue, q.io.rx_packets, q.io.rx_bytes, q.io.rx_errors, q.io.rx_super_packets, q.io.tx_packets, q.io.tx_bytes, q.io.tx_errors, q.batches
        );
    }
    let l = &s.lock;
    let _ = writeln!(
        o,
        "lock: {} acquisitions, {} contended ({:.2}%), waited {:.3} ms, held {:.3} ms; longest batch {:.3} ms; {} timer steps, longest {:.3} ms (R9.4)",
        l.acquisitions,
        l.contended,
        if l.acquisitions > 0 {
            100.0 * l.contended as f64 / l.acquisitions as f64
        } else {
            0.0
        },
        l.wait_ns as f64 / 1e6,
        l.held_ns as f64 / 1e6,
        l.batch_max_ns as f64 / 1e6,
        l.timer_steps,
        l.timer_max_ns as f64 / 1e6
    );
    let head = [
        "INSTANCE",
        "SCENARIO",
        "RULE",
        "PUBLIC IP",
        "ALLOC",
        "USED T/U",
        "FLOWS T/U",
        "CONN OK T/U",
        "FAIL T/U",
        "DROPS",
    ];
    let rows: Vec<[String; 10]> = s
        .instances
        .iter()
        .map(|i| {
            [
                i.name.clone(),
                i.scenario.clone(),
                i.rule.clone(),
                i.public_ip.clone(),
                i.allocated.to_string(),
                format!("{}/{}", i.used.tcp, i.used.udp),
                format!("{}/{}", i.flows.tcp, i.flows.udp),
                format!("{}/{}", i.conn_ok.tcp, i.conn_ok.udp),
                format!("{}/{}", i.conn_fail.tcp, i.conn_fail.udp),
                fmt_map(&i.drops),
            ]
        })
        .collect();
    let mut w = head.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(l, "{c:<width$}  ", width = w[i]);
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(o, "{}", line(head.to_vec()));
    for r in &rows {
        let _ = writeln!(o, "{}", line(r.iter().map(String::as_str).collect()));
    }
    for i in &s.instances {
        let n = &i.idle_ended_then_sent;
        if n.tcp + n.udp > 0 {
            let _ = writeln!(o, "{}", idle_then_sent_note(&i.name, n.tcp, n.udp));
        }
    }
    if !s.events.is_empty() {
        let _ = writeln!(o, "events (last {}):", s.events.len());
        for e in &s.events {
            let _ = writeln!(
                o,
                "  t={:>5} {:<16} {} {} {} {} {}",
                e.time,
                e.kind,
                e.instance.as_deref().unwrap_or("-"),
                e.public_ip.as_deref().unwrap_or("-"),
                e.proto.as_deref().unwrap_or("-"),
                e.dst.as_deref().unwrap_or("-"),
                e.detail
            );
        }
    }
    o
}

/// `snatgw stats --file PATH [--json]`.
pub fn run(path: &Path, json: bool) -> Result<(), String> {
    let s = read(path)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", render(&s));
    }
    Ok(())
}
