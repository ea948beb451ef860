//! The one JSON view of the engine's reports and events (issue #16): the serde and utoipa
//! types of instance reports (R6.1), events (R2.6, R6.2, R9.3), live translations (R6.3), port
//! blocks (R2.4) and the per-instance metrics, with the single conversion from the engine's
//! types ([`InstanceReport`], [`Event`], [`FlowView`], [`InboundFlowView`]).
//!
//! Every consumer uses these: the REST API (`api`, whose OpenAPI document derives from them),
//! `/metrics` (`metrics`, through [`crate::MetricsSnapshot`]), the stats file of `snatgw run
//! --stats-file` (`snatgw_runtime::stats`, which adds only its own engine, data-plane, I/O and
//! lock counters) and the CLI (`snatgw ports|flows|events|stats`). So a field has one name
//! everywhere: `connections_ok`, `connections_failed`, `protocol`, `destination`.
//!
//! Reading older documents: the stats file used other names until the view was shared
//! (`conn_ok`, `conn_fail`, `proto`, `dst`) and lacked a few fields; the renamed fields accept
//! their old names (serde aliases) and the missing ones default, so `snatgw stats --file` still
//! reads an old file. The OpenAPI document still marks every field the server sends as
//! required.
//!
//! This module does not read the engine (callers copy its reports out, with bounded work under
//! the data-path lock: `backend`) and does not render text (the CLI does).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use snatgw_core::engine::InboundFlowView;
use snatgw_core::{DropReason, Event, EventKind, FlowView, InstanceReport, InstanceStats, L4};

/// An IPv4 address (engine `u32`) as text.
pub fn ip(a: u32) -> String {
    Ipv4Addr::from(a).to_string()
}

/// An `ip:port` endpoint as text.
pub fn endpoint(a: u32, port: u16) -> String {
    format!("{}:{port}", Ipv4Addr::from(a))
}

/// The non-zero drop counters by reason label (the stats file's and the API's drop maps).
pub fn drop_map(drops: &[u64; DropReason::COUNT]) -> BTreeMap<String, u64> {
    drop_list(drops).into_iter().collect()
}

/// The non-zero drop counters by reason label, in [`DropReason::ALL`] order (`/metrics`).
pub fn drop_list(drops: &[u64; DropReason::COUNT]) -> Vec<(String, u64)> {
    DropReason::ALL
        .iter()
        .filter(|r| drops[**r as usize] > 0)
        .map(|r| (r.label().to_string(), drops[*r as usize]))
        .collect()
}

/// Per-protocol pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PerProtocol {
    /// TCP.
    pub tcp: u64,
    /// UDP.
    pub udp: u64,
}

impl PerProtocol {
    /// One counter of an instance's `[tcp, udp, other]` statistics, for TCP and UDP.
    pub fn of(stats: &[InstanceStats; 3], f: impl Fn(&InstanceStats) -> u64) -> PerProtocol {
        PerProtocol {
            tcp: f(&stats[L4::Tcp as usize]),
            udp: f(&stats[L4::Udp as usize]),
        }
    }

    /// A `[tcp, udp]` pair of the engine's.
    pub fn pair(v: [u32; 2]) -> PerProtocol {
        PerProtocol {
            tcp: v[0].into(),
            udp: v[1].into(),
        }
    }
}

/// An inclusive range of SNAT ports of a block (R2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

/// An instance's live report (R6.1): `GET /api/v1/instances/{name}/ports`, `snatgw ports`,
/// and each of the stats file's `instances`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstancePorts {
    /// Name.
    pub name: String,
    /// `vm` or `web_worker_role`.
    #[serde(default)]
    #[schema(required = true)]
    pub kind: String,
    /// `arm` or `classic`.
    #[serde(default)]
    #[schema(required = true)]
    pub model: String,
    /// Private address.
    pub private_ip: String,
    /// `ilpip`, `load_balanced` or `default_snat`.
    pub scenario: String,
    /// The SPEC rule that decided the scenario (R1.1, R1.2, R1.3).
    pub rule: String,
    /// The public address its flows leave with.
    pub public_ip: String,
    /// Preallocated SNAT ports per protocol (R2.4, R2.8; 65535 for an ILPIP, R1.1).
    pub allocated: u32,
    /// The block as inclusive port ranges (empty for an ILPIP).
    #[serde(default)]
    #[schema(required = true)]
    pub block: Vec<PortRange>,
    /// Pool size that decides the tier (R2.8; as reported during a redeploy, R2.11).
    #[serde(default)]
    #[schema(required = true)]
    pub pool_size: u32,
    /// Used SNAT ports (R2.3).
    pub used: PerProtocol,
    /// Live flows.
    pub flows: PerProtocol,
    /// SNAT connections that got a port (the stats file called it `conn_ok`).
    #[serde(alias = "conn_ok")]
    pub connections_ok: PerProtocol,
    /// SNAT connections that failed for want of a port (R2.6; the stats file called it
    /// `conn_fail`).
    #[serde(alias = "conn_fail")]
    pub connections_failed: PerProtocol,
    /// Packets translated outbound (all protocols).
    #[serde(default)]
    #[schema(required = true)]
    pub packets_out: u64,
    /// Packets translated inbound (all protocols).
    #[serde(default)]
    #[schema(required = true)]
    pub packets_in: u64,
    /// Dropped packets by reason (all protocols), only non-zero ones.
    pub drops: BTreeMap<String, u64>,
    /// Flows ended by idle timeout on which the instance later sent again: the symptom of
    /// missing keepalives (SPEC R3.4, R7.1; `snatgw keepalive-check`).
    #[serde(default)]
    #[schema(required = true)]
    pub idle_ended_then_sent: PerProtocol,
    /// Refused new flows answered to the instance with a RST or ICMP 3/13 (SPEC R9.5).
    #[serde(default)]
    #[schema(required = true)]
    pub fail_fast_answered: PerProtocol,
    /// Refused new flows left unanswered by the per-instance rate limit (SPEC R9.5).
    #[serde(default)]
    #[schema(required = true)]
    pub fail_fast_suppressed: PerProtocol,
}

impl From<&InstanceReport> for InstancePorts {
    fn from(r: &InstanceReport) -> Self {
        let mut drops = [0u64; DropReason::COUNT];
        for st in &r.stats {
            for (d, x) in drops.iter_mut().zip(st.drops) {
                *d += x;
            }
        }
        InstancePorts {
            name: r.name.to_string(),
            kind: r.kind.label().into(),
            model: r.model.label().into(),
            private_ip: ip(r.private_ip),
            scenario: r.scenario.name().into(),
            rule: r.scenario.rule().into(),
            public_ip: ip(r.scenario.addr()),
            allocated: r.allocated,
            block: r
                .block
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect(),
            pool_size: r.pool_size,
            used: PerProtocol::pair(r.used),
            flows: PerProtocol::pair(r.flows),
            connections_ok: PerProtocol::of(&r.stats, |s| s.conn_ok),
            connections_failed: PerProtocol::of(&r.stats, |s| s.conn_fail),
            packets_out: r.stats.iter().map(|s| s.packets_out).sum(),
            packets_in: r.stats.iter().map(|s| s.packets_in).sum(),
            drops: drop_map(&drops),
            idle_ended_then_sent: PerProtocol::of(&r.stats, |s| s.idle_ended_then_sent),
            fail_fast_answered: PerProtocol::of(&r.stats, |s| s.fail_fast_answered),
            fail_fast_suppressed: PerProtocol::of(&r.stats, |s| s.fail_fast_suppressed),
        }
    }
}

fn one() -> u64 {
    1
}

/// One event for operators (R2.6, R6.2): `GET /api/v1/events`, `snatgw events`, and the stats
/// file's `events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventRecord {
    /// Sequence number in the API's event log, growing by one per event. `snatgw run` starts
    /// a run's numbers above the wall clock in microseconds and above every number an earlier
    /// run on the same state directory issued, so they never repeat across restarts (a bare
    /// `EventLog` starts from 1). 0 in stats files written before the view was shared.
    #[serde(default)]
    #[schema(required = true)]
    pub seq: u64,
    /// Engine time (for a summary: when its interval closed).
    pub time: u32,
    /// `exhaustion`, `flow_limit`, `overflow`, `ports_reclaimed`, `tier_changed`,
    /// `probe_up`, `probe_down`, `scenario_changed` (`other` for a kind this version does not
    /// know).
    pub kind: String,
    /// Instance, if any.
    pub instance: Option<String>,
    /// Public IP, if any.
    pub public_ip: Option<String>,
    /// Protocol, if any (the stats file called it `proto`).
    #[serde(alias = "proto")]
    pub protocol: Option<String>,
    /// Destination `ip:port`, if any (the stats file called it `dst`).
    #[serde(alias = "dst")]
    pub destination: Option<String>,
    /// Occurrences it stands for: 1, or for a summary the repeats counted (R9.3).
    #[serde(default = "one")]
    #[schema(required = true)]
    pub count: u64,
    /// For a summary, engine time when its interval opened; otherwise equal to `time` (R9.3).
    #[serde(default)]
    #[schema(required = true)]
    pub since: u32,
    /// Whether this is an aggregated summary of repeats (R9.3).
    #[serde(default)]
    #[schema(required = true)]
    pub summary: bool,
    /// Everything else, as text.
    pub detail: String,
}

/// The text of a probe state change (R5.2).
pub fn probe_detail(lb: &str, probe: &str, up: bool, failures: u32) -> String {
    if up {
        format!("load balancer {lb}, probe {probe}: up, gets new inbound flows")
    } else {
        format!("load balancer {lb}, probe {probe}: down after {failures} failed probes in a row; no new inbound flows (outbound unaffected)")
    }
}

impl EventRecord {
    /// Converts an engine event, with sequence number `seq` (0 where it has none).
    pub fn from_event(seq: u64, e: &Event) -> EventRecord {
        let mut r = EventRecord {
            seq,
            time: e.time,
            kind: String::new(),
            instance: None,
            public_ip: None,
            protocol: None,
            destination: None,
            count: e.count,
            since: e.since,
            summary: e.summary,
            detail: String::new(),
        };
        match &e.kind {
            EventKind::Exhaustion {
                instance,
                public_ip,
                l4,
                dst,
                dst_port,
                allocated,
            } => {
                r.kind = "exhaustion".into();
                r.instance = Some(instance.to_string());
                r.public_ip = Some(ip(*public_ip));
                r.protocol = Some(l4.label().into());
                r.destination = Some(endpoint(*dst, *dst_port));
                r.detail =
                    format!("all {allocated} preallocated ports in use for this destination");
            }
            EventKind::FlowLimit {
                instance,
                public_ip,
                l4,
                dst,
                dst_port,
                limit,
                scope,
            } => {
                r.kind = "flow_limit".into();
                r.instance = Some(instance.to_string());
                r.public_ip = Some(ip(*public_ip));
                r.protocol = Some(l4.label().into());
                r.destination = Some(endpoint(*dst, *dst_port));
                r.detail = format!("{scope} flow limit of {limit} live flows reached (R9.2)");
            }
            EventKind::Overflow => {
                r.kind = "overflow".into();
                r.detail =
                    "events of further (instance, destination) keys, aggregated together".into();
            }
            EventKind::PortsReclaimed {
                instance,
                public_ip,
                ports,
                flows,
                reason,
            } => {
                r.kind = "ports_reclaimed".into();
                r.instance = Some(instance.to_string());
                r.public_ip = Some(ip(*public_ip));
                r.detail = format!("{ports} ports, {flows} flows dropped ({reason})");
            }
            EventKind::TierChanged {
                public_ip,
                pool_size,
                from,
                to,
            } => {
                r.kind = "tier_changed".into();
                r.public_ip = Some(ip(*public_ip));
                r.detail = format!("pool {pool_size}: {from} -> {to} ports per instance");
            }
            EventKind::ProbeChanged {
                lb,
                probe,
                member,
                up,
                failures,
            } => {
                r.kind = if *up { "probe_up" } else { "probe_down" }.into();
                r.instance = Some(member.to_string());
                r.detail = probe_detail(lb, probe, *up, *failures);
            }
            EventKind::ScenarioChanged { instance, from, to } => {
                r.kind = "scenario_changed".into();
                r.instance = Some(instance.to_string());
                r.detail = format!("{from} -> {to}");
            }
            // EventKind is non_exhaustive: a kind added to the engine before this view knows
            // it still reaches operators, in the engine's own words.
            other => {
                r.kind = "other".into();
                r.detail = format!("{other:?}");
            }
        }
        if e.summary {
            r.detail = format!(
                "{} more in {} s (summary, R9.3): {}",
                e.count,
                e.time.saturating_sub(e.since),
                r.detail
            );
        }
        r
    }
}

/// One live translation (R6.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FlowRecord {
    /// Instance name.
    pub instance: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Private source `ip:port`.
    pub private: String,
    /// Public `ip:port` (SNAT port).
    pub public: String,
    /// Destination `ip:port`.
    pub remote: String,
    /// Engine time of the last packet, either direction.
    pub last_seen: u32,
    /// Engine time the port is released if nothing else happens.
    pub expires_at: u32,
    /// `open`, `fin_out`, `fin_in`, `closing` or `reset`.
    pub state: String,
}

impl From<&FlowView> for FlowRecord {
    fn from(v: &FlowView) -> Self {
        FlowRecord {
            instance: v.instance.to_string(),
            protocol: v.l4.label().into(),
            private: endpoint(v.private.0, v.private.1),
            public: endpoint(v.public.0, v.public.1),
            remote: endpoint(v.remote.0, v.remote.1),
            last_seen: v.last_seen,
            expires_at: v.expires_at,
            state: v.state.into(),
        }
    }
}

/// A page of live translations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FlowPage {
    /// The flows, in table order.
    pub flows: Vec<FlowRecord>,
    /// Cursor of the next page; `null` when the table has been listed to its end.
    pub next_cursor: Option<u64>,
}

/// One live inbound load-balancing flow (R5.1, R6.3): client → frontend, sent to a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InboundFlowRecord {
    /// Load balancer.
    pub lb: String,
    /// Inbound rule.
    pub rule: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Client `ip:port` on the internet.
    pub client: String,
    /// Frontend `ip:port` the client connected to.
    pub frontend: String,
    /// Member private `ip:port` the flow sticks to.
    pub member: String,
    /// Seconds since the flow's last packet (its rule's idle timeout ends it, R3.7).
    pub idle_secs: u32,
}

impl From<InboundFlowView> for InboundFlowRecord {
    fn from(v: InboundFlowView) -> Self {
        InboundFlowRecord {
            lb: v.lb,
            rule: v.rule,
            protocol: if v.proto == snatgw_core::proto::TCP {
                "tcp"
            } else {
                "udp"
            }
            .into(),
            client: endpoint(v.client.0, v.client.1),
            frontend: endpoint(v.frontend.0, v.frontend.1),
            member: endpoint(v.member.0, v.member.1),
            idle_secs: v.idle,
        }
    }
}

/// A page of live inbound load-balancing flows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InboundFlowPage {
    /// The flows, in table order.
    pub flows: Vec<InboundFlowRecord>,
    /// Cursor of the next page; `null` when the table has been listed to its end.
    pub next_cursor: Option<u64>,
}

/// Ports one instance uses for one destination endpoint (R2.3).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DestinationUse {
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Destination `ip:port`.
    pub destination: String,
    /// Ports of the block held by flows to it.
    pub ports_used: u32,
    /// The block's size (the most it can use).
    pub allocated: u32,
}

/// One instance's metrics (R6.1), as `/metrics` shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceMetrics {
    /// Instance name.
    pub instance: String,
    /// Its public IP.
    pub public_ip: String,
    /// Its scenario (`ilpip`, `load_balanced`, `default_snat`).
    pub scenario: String,
    /// TCP and UDP.
    pub per_protocol: Vec<ProtoMetrics>,
    /// Drops of packets that are neither TCP nor UDP (ICMP, ESP...), by reason.
    #[serde(default)]
    pub other_protocol_drops: Vec<(String, u64)>,
    /// The busiest destinations by ports used, at most 5, busiest first.
    pub busiest: Vec<DestinationUse>,
}

/// One instance's metrics for one protocol.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProtoMetrics {
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Preallocated SNAT ports (R2.4).
    pub allocated_ports: u32,
    /// Used SNAT ports (R2.3).
    pub used_ports: u32,
    /// Live flows.
    pub flows: u64,
    /// SNAT connections that got a port.
    pub connections_ok: u64,
    /// SNAT connections that failed for want of a port (R2.6).
    pub connections_failed: u64,
    /// Dropped packets by reason.
    pub drops: Vec<(String, u64)>,
    /// Flows ended by idle timeout on which the instance later sent again (R3.4, R7.1).
    #[serde(default)]
    pub idle_ended_then_sent: u64,
    /// Refused new flows answered to the instance (RST or ICMP 3/13, R9.5 `reset`).
    #[serde(default)]
    pub fail_fast_answered: u64,
    /// Refused new flows not answered because of the per-instance rate limit (R9.5).
    #[serde(default)]
    pub fail_fast_suppressed: u64,
}

impl InstanceMetrics {
    /// One instance's metrics from its report and its busiest destinations.
    pub fn from_report(r: &InstanceReport, busiest: Vec<DestinationUse>) -> InstanceMetrics {
        InstanceMetrics {
            instance: r.name.to_string(),
            public_ip: ip(r.scenario.addr()),
            scenario: r.scenario.name().into(),
            per_protocol: [L4::Tcp, L4::Udp]
                .iter()
                .map(|&l| {
                    let i = l as usize;
                    let s = &r.stats[i];
                    ProtoMetrics {
                        protocol: l.label().into(),
                        allocated_ports: r.allocated,
                        used_ports: r.used[i],
                        flows: r.flows[i].into(),
                        connections_ok: s.conn_ok,
                        connections_failed: s.conn_fail,
                        drops: drop_list(&s.drops),
                        idle_ended_then_sent: s.idle_ended_then_sent,
                        fail_fast_answered: s.fail_fast_answered,
                        fail_fast_suppressed: s.fail_fast_suppressed,
                    }
                })
                .collect(),
            other_protocol_drops: drop_list(&r.stats[2].drops),
            busiest,
        }
    }
}

/// The busiest destinations per instance, at most `per_instance` each, from the engine's
/// `(instance, protocol, destination, port, ports used)` list (busiest first); `allocated`
/// gives each instance's block size.
pub fn destination_uses(
    busiest: &[(Arc<str>, L4, u32, u16, u32)],
    allocated: impl Fn(&str) -> u32,
    per_instance: usize,
) -> BTreeMap<&str, Vec<DestinationUse>> {
    let mut by_name: BTreeMap<&str, Vec<DestinationUse>> = BTreeMap::new();
    for (inst, l4, dst, dport, n) in busiest {
        let v = by_name.entry(&**inst).or_default();
        if v.len() < per_instance {
            v.push(DestinationUse {
                protocol: l4.label().into(),
                destination: endpoint(*dst, *dport),
                ports_used: *n,
                allocated: allocated(inst),
            });
        }
    }
    by_name
}

/// One member's state for one health probe (R5.2, R4.5): `/metrics`, `GET
/// /api/v1/loadBalancers/{name}/probes` and the stats file's `probes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProbeMetrics {
    /// Load balancer.
    pub lb: String,
    /// Probe.
    pub probe: String,
    /// Member instance.
    pub member: String,
    /// Whether it gets new inbound flows.
    pub up: bool,
    /// Failed probes in a row.
    pub consecutive_failures: u32,
    /// Probe results so far.
    pub probes: u64,
    /// Failed ones (blocked by the NSG included).
    pub failures: u64,
}

/// One NSG rule's hits (what flow logs give, R4.1): `/metrics`, `GET
/// /api/v1/networkSecurityGroups/{name}/hits` and the stats file's `nsg_hits`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NsgRuleMetrics {
    /// NSG.
    pub nsg: String,
    /// Rule.
    pub rule: String,
    /// Priority.
    pub priority: u32,
    /// `inbound` / `outbound`.
    pub direction: String,
    /// `allow` / `deny`.
    pub access: String,
    /// Whether it is a default rule (R4.2).
    pub default: bool,
    /// Packets it decided.
    pub hits: u64,
}

/// One inbound rule's counters (R5.1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InboundRuleMetrics {
    /// Load balancer.
    pub lb: String,
    /// Rule.
    pub rule: String,
    /// Inbound flows created.
    pub flows: u64,
    /// New flows dropped: no healthy member.
    pub no_healthy_backend: u64,
    /// New flows dropped by the chosen member's NSG.
    pub nsg_denied: u64,
}

/// Every member's health-probe state (R5.2), as `/metrics` and the stats file show it.
pub fn probe_metrics(e: &snatgw_core::Engine) -> Vec<ProbeMetrics> {
    e.probe_states()
        .into_iter()
        .map(|p| ProbeMetrics {
            lb: p.lb,
            probe: p.probe,
            member: p.member.to_string(),
            up: p.up,
            consecutive_failures: p.consecutive_failures,
            probes: p.probes,
            failures: p.failures,
        })
        .collect()
}

/// Every NSG rule's hits, default rules included (R4.1, R4.2).
pub fn nsg_rule_metrics(e: &snatgw_core::Engine) -> Vec<NsgRuleMetrics> {
    e.nsg_hits()
        .into_iter()
        .map(|h| NsgRuleMetrics {
            nsg: h.nsg,
            rule: h.rule,
            priority: h.priority,
            direction: format!("{:?}", h.direction).to_lowercase(),
            access: format!("{:?}", h.access).to_lowercase(),
            default: h.default,
            hits: h.hits,
        })
        .collect()
}

/// Every inbound load-balancing rule's counters (R5.1).
pub fn inbound_rule_metrics(e: &snatgw_core::Engine) -> Vec<InboundRuleMetrics> {
    e.inbound_rule_stats()
        .into_iter()
        .map(|(lb, rule, s)| InboundRuleMetrics {
            lb,
            rule,
            flows: s.flows,
            no_healthy_backend: s.no_healthy,
            nsg_denied: s.nsg_denied,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_stats_file_names_still_read() {
        let old = r#"{"name":"vm1","private_ip":"10.0.3.10","scenario":"default_snat",
            "rule":"R1.3","public_ip":"192.0.2.100","allocated":1024,
            "used":{"tcp":1,"udp":0},"flows":{"tcp":1,"udp":0},
            "conn_ok":{"tcp":3,"udp":1},"conn_fail":{"tcp":2,"udp":0},
            "packets_out":9,"packets_in":8,"drops":{}}"#;
        let p: InstancePorts = serde_json::from_str(old).expect("old instance");
        assert_eq!(p.connections_ok, PerProtocol { tcp: 3, udp: 1 });
        assert_eq!(p.connections_failed.tcp, 2);
        assert_eq!((p.packets_out, p.packets_in), (9, 8));
        let old = r#"{"time":7,"kind":"exhaustion","instance":"vm1","proto":"tcp",
            "dst":"198.51.100.7:443","detail":"x"}"#;
        let e: EventRecord = serde_json::from_str(old).expect("old event");
        assert_eq!(e.protocol.as_deref(), Some("tcp"));
        assert_eq!(e.destination.as_deref(), Some("198.51.100.7:443"));
        assert_eq!((e.seq, e.count, e.summary), (0, 1, false));
    }

    #[test]
    fn the_document_requires_every_field_the_server_sends() {
        // serde(default), there for old stats files, must not loosen the API's contract.
        let doc = serde_json::to_value(crate::openapi()).expect("document");
        for name in ["InstancePorts", "EventRecord"] {
            let s = &doc["components"]["schemas"][name];
            let props: Vec<&String> = s["properties"].as_object().expect(name).keys().collect();
            let required: Vec<&str> = s["required"]
                .as_array()
                .expect(name)
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            for p in props {
                let optional = name == "EventRecord"
                    && ["instance", "public_ip", "protocol", "destination"].contains(&p.as_str());
                assert_eq!(required.contains(&p.as_str()), !optional, "{name}.{p}");
            }
        }
    }

    #[test]
    fn summary_carries_its_interval() {
        let e = Event {
            time: 20,
            kind: EventKind::Overflow,
            count: 7,
            since: 10,
            summary: true,
        };
        let r = EventRecord::from_event(4, &e);
        assert_eq!((r.seq, r.time, r.since, r.count), (4, 20, 10, 7));
        assert!(r.detail.starts_with("7 more in 10 s (summary, R9.3)"));
    }
}
