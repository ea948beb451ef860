//! Counters of a running gateway: the JSON snapshot `snatgw run --stats-file` writes every
//! second (atomically: temporary file, then rename), and `snatgw stats --file`, which prints it.
//!
//! What it holds (SPEC R6.1, R6.2): the engine's and the data plane's global counters, per
//! queue I/O counters, the shared-lock contention figures, per instance the scenario,
//! public IP, allocated and used SNAT ports, flows, SNAT connections (ok/failed) and drops by
//! reason, and the last events (exhaustion, tier changes...).
//!
//! Instances and events are [`snatgw_control::view`]'s records, the same the REST API returns
//! (`connections_ok`, `connections_failed`, `protocol`, `destination`...); this module adds only
//! the stats file's own counters (engine, data plane, I/O, lock). Files written before the view
//! was shared (`conn_ok`, `conn_fail`, `proto`, `dst`) still read.
//!
//! What it does not do: list individual translations (R6.3 is `snatgw show`'s and the
//! engine's `flows()`).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use snatgw_control::view::{drop_map, EventRecord, InstancePorts};
use snatgw_core::Engine;
use snatgw_dataplane::DataplaneStats;
use snatgw_io::IoStats;

/// What can go wrong reading or printing a stats file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatsError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a stats snapshot (not JSON, or not this shape).
    #[error("{}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The snapshot could not be printed as JSON.
    #[error("printing the snapshot as JSON: {0}")]
    Print(#[source] serde_json::Error),
}

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
    /// Per instance: the API's report (`GET /api/v1/instances/{name}/ports`).
    pub instances: Vec<InstancePorts>,
    /// Most recent events, oldest first (at most [`EVENTS_KEPT`]), as the API lists them
    /// (with their sequence numbers in its event log).
    pub events: Vec<EventRecord>,
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
    /// A fleet node's steering, injection and journal tap (SPEC R10.3, R10.4), when any of
    /// them is on (`crate::runtime::FleetHooks`, `Runtime::injector`).
    #[serde(default)]
    pub fleet: Option<FleetSnap>,
    /// The kernel's port stashes (issue #17): the keeper's rings, when they are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stash: Option<crate::stash::StashCounters>,
}

/// A fleet node's runtime counters (SPEC R10.3, R10.4): the same record `/metrics` is built
/// from.
pub type FleetSnap = snatgw_control::backend::FleetLinkCounters;

/// The probe state of one member (R5.2): the same record `/metrics` is built from.
pub type ProbeSnap = snatgw_control::view::ProbeMetrics;

/// One NSG rule's hit counter (R4.1): the same record `/metrics` is built from.
pub type NsgHitSnap = snatgw_control::view::NsgRuleMetrics;

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
    /// FIN/RST the kernel fast path translated, applied to their flows at the kernel's time
    /// (issue #17).
    #[serde(default)]
    pub tcp_events_applied: u64,
    /// Such events for flows that had ended meanwhile (ignored).
    #[serde(default)]
    pub tcp_events_unknown: u64,
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

/// Logs an event as a structured `tracing` line (exhaustion as a warning).
pub fn log_event(e: &EventRecord) {
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
            protocol = e.protocol.as_deref().unwrap_or(""),
            destination = e.destination.as_deref().unwrap_or(""),
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
    s.probes = snatgw_control::view::probe_metrics(engine);
    s.nsg_hits = snatgw_control::view::nsg_rule_metrics(engine);
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
        tcp_events_applied: g.tcp_events_applied,
        tcp_events_unknown: g.tcp_events_unknown,
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
    s.instances = engine.instances().iter().map(InstancePorts::from).collect();
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
pub fn push_events(ring: &mut VecDeque<EventRecord>, new: impl IntoIterator<Item = EventRecord>) {
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

/// Reads a snapshot file (also one written before the view was shared: see the module
/// documentation).
pub fn read(path: &Path) -> Result<Snapshot, StatsError> {
    let text = std::fs::read(path).map_err(|source| StatsError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| StatsError::Parse {
        path: path.to_owned(),
        source,
    })
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
            .filter(|(k, v)| {
                !k.starts_with("translated")
                    && !k.starts_with("steered")
                    && *k != "link_in"
                    && **v > 0
            })
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let _ = writeln!(
            o,
            "fast path ({} on {} / {}): translated out {}, in {}; steered to fleet nodes out {}, in {}, from them {}; flows installed {}, removed {}, no room {}; passed up {}",
            f.mode,
            f.private_if,
            f.public_if,
            p("translated_out"),
            p("translated_in"),
            p("steered_out"),
            p("steered_in"),
            p("link_in"),
            f.installed,
            f.removed,
            f.install_failed,
            fmt_map(&up)
        );
    }
    if let Some(f) = &s.fleet {
        let _ = writeln!(
            o,
            "fleet: steered out {}, in {}; injected {} (not queued {}, refused {}); journal tapped {}, lost {}",
            f.steered_out,
            f.steered_in,
            f.injected,
            f.injected_dropped,
            f.injected_refused,
            f.journal_tapped,
            f.journal_lost
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
                format!("{}/{}", i.connections_ok.tcp, i.connections_ok.udp),
                format!("{}/{}", i.connections_failed.tcp, i.connections_failed.udp),
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
                e.protocol.as_deref().unwrap_or("-"),
                e.destination.as_deref().unwrap_or("-"),
                e.detail
            );
        }
    }
    o
}

/// `snatgw stats --file PATH [--json]`.
pub fn run(path: &Path, json: bool) -> Result<(), StatsError> {
    let s = read(path)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&s).map_err(StatsError::Print)?
        );
    } else {
        print!("{}", render(&s));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file as `snatgw run` wrote it before the view was shared (`conn_ok`, `proto`...).
    const OLD: &str = r#"{"time":3,"uptime_ms":3000,"tun_private":"p","tun_public":"q",
        "queues":1,"offload":false,"final_snapshot":false,"live_flows":0,
        "engine":{"passed":0,"ilpip_packets":0,"flows_created":1,"flows_ended":{},"drops":{},
                  "events_lost":0},
        "dataplane":{"translated":0,"passed":0,"drops":{},"malformed":{},"icmp_errors":0,
                     "fragments":0},
        "io":[],"lock":{"acquisitions":0,"contended":0,"wait_ns":0,"held_ns":0},
        "instances":[{"name":"vm1","private_ip":"10.0.3.10","scenario":"default_snat",
            "rule":"R1.3","public_ip":"192.0.2.100","allocated":1024,
            "used":{"tcp":1,"udp":0},"flows":{"tcp":1,"udp":0},
            "conn_ok":{"tcp":1,"udp":0},"conn_fail":{"tcp":4,"udp":0},
            "packets_out":2,"packets_in":1,"drops":{"ports_exhausted":4}}],
        "events":[{"time":3,"kind":"exhaustion","count":1,"since":3,"summary":false,
            "instance":"vm1","public_ip":"192.0.2.100","proto":"tcp",
            "dst":"198.51.100.7:443","detail":"all 1024 preallocated ports in use"}]}"#;

    #[test]
    fn an_old_stats_file_still_reads_and_prints_with_the_new_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stats.json");
        std::fs::write(&path, OLD).expect("write");
        let s = read(&path).expect("old file");
        assert_eq!(s.instances[0].connections_failed.tcp, 4);
        assert_eq!(s.events[0].destination.as_deref(), Some("198.51.100.7:443"));
        let text = render(&s);
        assert!(text.contains("1/0") && text.contains("4/0"), "{text}");
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["instances"][0]["connections_failed"]["tcp"], 4);
        assert_eq!(json["events"][0]["protocol"], "tcp");
        assert!(json["instances"][0].get("conn_fail").is_none());
    }

    #[test]
    fn read_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("none.json");
        let e = read(&missing).expect_err("missing");
        assert!(matches!(e, StatsError::Read { .. }), "{e:?}");
        assert!(e.to_string().starts_with(&missing.display().to_string()));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{").expect("write");
        assert!(matches!(read(&bad), Err(StatsError::Parse { .. })));
    }
}
