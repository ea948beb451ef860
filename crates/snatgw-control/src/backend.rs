//! The running gateway as the API sees it: the [`Backend`] trait, the JSON types it returns,
//! the shared [`EventLog`], and [`GatewayBackend`], the real implementation over a
//! `Mutex<snatgw_dataplane::Gateway>`.
//!
//! What the API needs from a running gateway: whether a topology would apply (`check`: the
//! engine's plan without commit, SPEC R1.3 designation room and R2.8 pool sizes), applying it
//! live (`apply`: R1.4 rescoping, R2.9/R2.10 tier changes, R2.11 redeploys), per-instance
//! reports (R6.1), pages of live translations (R6.3), events (R2.6, R6.2, R9.3) and metrics
//! (R6.1). Every hold of the data-path lock is bounded: flows are listed at most
//! [`FLOW_SCAN_PER_LOCK`] table slots per acquisition (the lock is released between chunks),
//! and metrics copy the per-instance reports and the five busiest destinations out under the
//! lock and are formatted outside it.
//!
//! Events: the engine queues them and one consumer drains them
//! ([`snatgw_core::Engine::drain_events`]); whoever drains (the gateway's housekeeping loop,
//! or [`GatewayBackend::pump_events`]) pushes them into the [`EventLog`], a bounded log
//! ([`EVENT_LOG_CAP`]) with sequence numbers that the API pages through and long-polls.
//!
//! This module does not validate configuration files (that is
//! [`snatgw_core::Topology::from_config`]), persist anything (`store`) or speak HTTP (`api`).

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snatgw_core::engine::FlowFilter;
use snatgw_core::topology::SnatGroup;
use snatgw_core::{
    ApplyReport, ConfigError, DropReason, Event, EventKind, InstanceReport, Topology, L4,
};
use snatgw_dataplane::Gateway;
use tokio::sync::watch;

use crate::error::ApiError;

/// Most records the [`EventLog`] keeps; older ones are forgotten first.
pub const EVENT_LOG_CAP: usize = 10_000;
/// Flow-table slots examined per acquisition of the gateway lock when listing flows (R6.3).
pub const FLOW_SCAN_PER_LOCK: u32 = 16_384;
/// Busiest destinations reported per instance in metrics (bounded label cardinality).
pub const BUSIEST_PER_INSTANCE: usize = 5;
/// Largest page of flows or events one request may ask for.
pub const MAX_PAGE: usize = 1000;
/// Page size when a request does not say.
pub const DEFAULT_PAGE: usize = 100;

/// The running gateway, as the control plane sees it.
pub trait Backend: Send + Sync + 'static {
    /// Would `topo` apply? (engine plan without commit; R1.3 designation room, R2.8 pool
    /// sizes.) Returns the default-SNAT designations the apply will leave, for the store.
    fn check(&self, topo: &Topology) -> Result<Vec<(SnatGroup, u32)>, ConfigError>;
    /// Applies `topo` to the running engine (live: R1.4, R2.9, R2.10, R2.11).
    fn apply(&self, topo: Topology) -> Result<ApplyReport, ConfigError>;
    /// Per-instance reports (scenario, rule, public IP, allocated/used ports, block, flows, counters).
    fn instances(&self) -> Vec<InstanceReport>;
    /// One instance's report (default: found among [`Backend::instances`]).
    fn instance(&self, name: &str) -> Option<InstanceReport> {
        self.instances().into_iter().find(|r| &*r.name == name)
    }
    /// One page of live translations (R6.3); bounded work under the data-path lock.
    fn flows(&self, q: &FlowQuery) -> FlowPage;
    /// One page (at most `limit`, from `cursor`) of load balancer `lb`'s live inbound flows
    /// (R5.1, R6.3); bounded work under the data-path lock.
    fn inbound_flows(&self, lb: &str, cursor: u64, limit: usize) -> InboundFlowPage;
    /// Events with sequence number > `after`, oldest first, at most `limit` (R6.2).
    fn events(&self, after: u64, limit: usize) -> Vec<EventRecord>;
    /// A channel holding the newest event sequence number, for long-polls. `None` (the
    /// default): the API re-asks [`Backend::events`] periodically instead.
    fn event_waiter(&self) -> Option<watch::Receiver<u64>> {
        None
    }
    /// Everything /metrics needs, copied out with bounded work under the lock.
    fn metrics(&self) -> MetricsSnapshot;
}

/// Which live translations to list (R6.3), and which page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FlowQuery {
    /// Only this instance's flows.
    pub instance: Option<String>,
    /// Only flows to this destination: `ip` or `ip:port`.
    pub destination: Option<String>,
    /// Only this protocol: `tcp` or `udp`.
    pub protocol: Option<String>,
    /// Only flows in this state: `open`, `fin_out`, `fin_in`, `closing` or `reset`.
    pub state: Option<String>,
    /// Where to continue (0: from the start; else a page's `next_cursor`; past the end of
    /// the table: an empty page, the end of the list).
    pub cursor: u64,
    /// Most flows in the page, 1..=1000 (default 100).
    pub limit: usize,
}

impl Default for FlowQuery {
    fn default() -> Self {
        FlowQuery {
            instance: None,
            destination: None,
            protocol: None,
            state: None,
            cursor: 0,
            limit: DEFAULT_PAGE,
        }
    }
}

/// Flow states [`FlowQuery::state`] accepts.
pub const FLOW_STATES: [&str; 5] = ["open", "fin_out", "fin_in", "closing", "reset"];

impl FlowQuery {
    /// The engine filter, or what is wrong with the query (naming the query parameter).
    /// A filter given empty (`?instance=`) is refused: a parameter left out is "no filter".
    /// A cursor past the end of the table is the end of the list (an empty last page).
    pub fn filter(&self) -> Result<FlowFilter, ApiError> {
        for (name, v) in [
            ("instance", &self.instance),
            ("destination", &self.destination),
            ("protocol", &self.protocol),
            ("state", &self.state),
        ] {
            if v.as_deref() == Some("") {
                return Err(ApiError::field(
                    format!(
                        "{name} is empty: give a value, or leave the parameter out for no filter"
                    ),
                    name,
                ));
            }
        }
        let l4 = match self.protocol.as_deref() {
            None => None,
            Some("tcp") => Some(L4::Tcp),
            Some("udp") => Some(L4::Udp),
            Some(p) => {
                return Err(ApiError::field(
                    format!("protocol `{p}`: expected tcp or udp"),
                    "protocol",
                ))
            }
        };
        let state = match self.state.as_deref() {
            None => None,
            Some(s) => Some(*FLOW_STATES.iter().find(|&&k| k == s).ok_or_else(|| {
                ApiError::field(
                    format!("state `{s}`: expected one of {}", FLOW_STATES.join(", ")),
                    "state",
                )
            })?),
        };
        let (dst, dport) = match self.destination.as_deref() {
            None => (None, None),
            Some(d) => {
                let bad = || {
                    ApiError::field(
                        format!("destination `{d}`: expected an IPv4 address or address:port"),
                        "destination",
                    )
                };
                // The port as the document's pattern writes it: decimal digits, no sign, no
                // leading zero.
                let port = |p: &str| {
                    let canonical = !p.is_empty()
                        && p.bytes().all(|b| b.is_ascii_digit())
                        && (p == "0" || !p.starts_with('0'));
                    canonical.then(|| p.parse::<u16>().ok()).flatten()
                };
                let (ip, port) = match d.split_once(':') {
                    Some((ip, p)) => (ip, Some(port(p).ok_or_else(bad)?)),
                    None => (d, None),
                };
                let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
                (Some(u32::from(ip)), port)
            }
        };
        if self.limit == 0 || self.limit > MAX_PAGE {
            return Err(ApiError::field(
                format!("limit {}: expected 1..={MAX_PAGE}", self.limit),
                "limit",
            ));
        }
        Ok(FlowFilter {
            instance: self.instance.clone(),
            l4,
            dst,
            dport,
            state,
        })
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

/// A page of live inbound load-balancing flows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InboundFlowPage {
    /// The flows, in table order.
    pub flows: Vec<InboundFlowRecord>,
    /// Cursor of the next page; `null` when the table has been listed to its end.
    pub next_cursor: Option<u64>,
}

/// One event for operators (R2.6, R6.2), with its sequence number in the [`EventLog`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventRecord {
    /// Sequence number, growing by one per event. `snatgw run` starts a run's numbers above
    /// the wall clock in microseconds and above every number an earlier run on the same
    /// state directory issued, so they never repeat across restarts (a bare [`EventLog`]
    /// starts from 1).
    pub seq: u64,
    /// Engine time (for a summary: when its interval closed).
    pub time: u32,
    /// `exhaustion`, `flow_limit`, `overflow`, `ports_reclaimed`, `tier_changed`, `scenario_changed`.
    pub kind: String,
    /// Instance, if any.
    pub instance: Option<String>,
    /// Public IP, if any.
    pub public_ip: Option<String>,
    /// Protocol, if any.
    pub protocol: Option<String>,
    /// Destination `ip:port`, if any.
    pub destination: Option<String>,
    /// Occurrences it stands for: 1, or for a summary the repeats counted (R9.3).
    pub count: u64,
    /// Whether this is an aggregated summary of repeats (R9.3).
    pub summary: bool,
    /// Everything else, as text.
    pub detail: String,
}

fn ip(a: u32) -> String {
    Ipv4Addr::from(a).to_string()
}

fn endpoint(a: u32, port: u16) -> String {
    format!("{}:{port}", Ipv4Addr::from(a))
}

impl EventRecord {
    /// Converts an engine event (as `snatgw stats` shows it), with sequence number `seq`.
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
                r.detail = if *up {
                    format!("load balancer {lb}, probe {probe}: up, gets new inbound flows")
                } else {
                    format!("load balancer {lb}, probe {probe}: down after {failures} failed probes in a row; no new inbound flows (outbound unaffected)")
                };
            }
            EventKind::ScenarioChanged { instance, from, to } => {
                r.kind = "scenario_changed".into();
                r.instance = Some(instance.to_string());
                r.detail = format!("{from} -> {to}");
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

/// Per-protocol pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PerProtocol {
    /// TCP.
    pub tcp: u64,
    /// UDP.
    pub udp: u64,
}

/// An inclusive range of SNAT ports of a block (R2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

/// An instance's live report (`GET /api/v1/instances/{name}/ports`, R6.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstancePorts {
    /// Name.
    pub name: String,
    /// `vm` or `web_worker_role`.
    pub kind: String,
    /// `arm` or `classic`.
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
    pub block: Vec<PortRange>,
    /// Pool size that decides the tier (R2.8; as reported during a redeploy, R2.11).
    pub pool_size: u32,
    /// Used SNAT ports (R2.3).
    pub used: PerProtocol,
    /// Live flows.
    pub flows: PerProtocol,
    /// SNAT connections that got a port.
    pub connections_ok: PerProtocol,
    /// SNAT connections that failed for want of a port (R2.6).
    pub connections_failed: PerProtocol,
    /// Dropped packets by reason (all protocols), only non-zero ones.
    pub drops: BTreeMap<String, u64>,
    /// Flows ended by idle timeout on which the instance later sent again: the symptom of
    /// missing keepalives (SPEC R3.4, R7.1; `snatgw keepalive-check`).
    #[serde(default)]
    pub idle_ended_then_sent: PerProtocol,
}

fn kind_label(k: snatgw_core::InstanceKind) -> &'static str {
    match k {
        snatgw_core::InstanceKind::Vm => "vm",
        snatgw_core::InstanceKind::WebWorkerRole => "web_worker_role",
    }
}

fn model_label(m: snatgw_core::Model) -> &'static str {
    match m {
        snatgw_core::Model::Arm => "arm",
        snatgw_core::Model::Classic => "classic",
    }
}

fn drops_of(drops: &[u64; DropReason::COUNT]) -> Vec<(String, u64)> {
    DropReason::ALL
        .iter()
        .filter(|r| drops[**r as usize] > 0)
        .map(|r| (r.label().to_string(), drops[*r as usize]))
        .collect()
}

impl From<&InstanceReport> for InstancePorts {
    fn from(r: &InstanceReport) -> Self {
        let mut drops = BTreeMap::new();
        for st in &r.stats {
            for (k, v) in drops_of(&st.drops) {
                *drops.entry(k).or_insert(0) += v;
            }
        }
        InstancePorts {
            name: r.name.to_string(),
            kind: kind_label(r.kind).into(),
            model: model_label(r.model).into(),
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
            used: PerProtocol {
                tcp: r.used[0].into(),
                udp: r.used[1].into(),
            },
            flows: PerProtocol {
                tcp: r.flows[0].into(),
                udp: r.flows[1].into(),
            },
            connections_ok: PerProtocol {
                tcp: r.stats[0].conn_ok,
                udp: r.stats[1].conn_ok,
            },
            connections_failed: PerProtocol {
                tcp: r.stats[0].conn_fail,
                udp: r.stats[1].conn_fail,
            },
            drops,
            idle_ended_then_sent: PerProtocol {
                tcp: r.stats[0].idle_ended_then_sent,
                udp: r.stats[1].idle_ended_then_sent,
            },
        }
    }
}

/// Everything `/metrics` shows, copied out of the engine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MetricsSnapshot {
    /// Per instance.
    pub instances: Vec<InstanceMetrics>,
    /// Gateway-wide dropped packets by reason (all reasons, engine's and data plane's).
    pub drops: Vec<(String, u64)>,
    /// Flows in the table.
    pub live_flows: u64,
    /// Flows the gateway may hold (R9.2).
    pub max_flows: u64,
    /// Live inbound load-balancing flows (R5.1).
    #[serde(default)]
    pub inbound_flows: u64,
    /// Health-probe state per (load balancer, probe, member) (R5.2).
    #[serde(default)]
    pub probes: Vec<ProbeMetrics>,
    /// Hits per NSG rule, default rules included (R4.1, R4.2).
    #[serde(default)]
    pub nsg_rules: Vec<NsgRuleMetrics>,
    /// Counters per inbound load-balancing rule (R5.1).
    #[serde(default)]
    pub inbound_rules: Vec<InboundRuleMetrics>,
    /// The runtime's counters (packets per side, the gateway lock, the fast path), when the
    /// backend has a source for them ([`GatewayBackend::with_runtime_counters`]).
    #[serde(default)]
    pub runtime: Option<RuntimeCounters>,
}

/// The runtime's counters for `/metrics` (issue #21): what the stats file holds besides the
/// engine's counters. Filled by the runtime (this crate does not depend on it) from its shared
/// atomics, never under the gateway lock.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuntimeCounters {
    /// Packets received from the private side (outbound, R9.1), summed over its queues.
    pub private_rx_packets: u64,
    /// Packets sent on the private side (translated inbound packets, answers), summed over
    /// its queues.
    pub private_tx_packets: u64,
    /// Packets received from the public side (inbound, R9.1), summed over its queues.
    pub public_rx_packets: u64,
    /// Packets sent on the public side, summed over its queues.
    pub public_tx_packets: u64,
    /// Acquisitions of the gateway lock (workers, housekeeping).
    pub lock_acquisitions: u64,
    /// Acquisitions that found the lock held and waited.
    pub lock_contended: u64,
    /// Nanoseconds spent waiting for the lock.
    pub lock_wait_ns: u64,
    /// Nanoseconds workers held the lock deciding batches.
    pub lock_held_ns: u64,
    /// The kernel fast path's counters, when it runs.
    pub fast_path: Option<FastPathCounters>,
}

/// The kernel fast path's counters, as of the runtime's last harvest (about once a second).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FastPathCounters {
    /// Flows installed in the kernel's flow map.
    pub installed: u64,
    /// Flows removed from the map.
    pub removed: u64,
    /// Flows the map had no room for (they stay on the TUN path).
    pub install_failed: u64,
    /// Flows of instance slots without kernel counters (they stay on the TUN path).
    pub skipped: u64,
    /// Packets the kernel translated outbound (private to public).
    pub translated_out: u64,
    /// Packets the kernel translated inbound (public to private).
    pub translated_in: u64,
}

/// Where a [`GatewayBackend`] gets the runtime's counters from.
pub type RuntimeCountersSource = Arc<dyn Fn() -> RuntimeCounters + Send + Sync>;

/// One member's state for one health probe (R5.2, R4.5).
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

/// One NSG rule's hits (what flow logs give, R4.1).
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

/// Copies the NSG, probe and inbound-LB state out of the engine into `m`.
pub fn fill_policy_metrics(m: &mut MetricsSnapshot, e: &snatgw_core::Engine) {
    m.inbound_flows = e.inbound_flow_count() as u64;
    m.probes = probe_metrics(e);
    m.nsg_rules = nsg_rule_metrics(e);
    m.inbound_rules = e
        .inbound_rule_stats()
        .into_iter()
        .map(|(lb, rule, s)| InboundRuleMetrics {
            lb,
            rule,
            flows: s.flows,
            no_healthy_backend: s.no_healthy,
            nsg_denied: s.nsg_denied,
        })
        .collect();
}

/// One instance's metrics (R6.1).
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

/// Builds the metrics snapshot from what was copied out under the lock.
pub fn metrics_snapshot(
    reports: &[InstanceReport],
    busiest: &[(Arc<str>, L4, u32, u16, u32)],
    gateway_drops: &[u64; DropReason::COUNT],
    live_flows: u64,
    max_flows: u64,
) -> MetricsSnapshot {
    let mut by_name: BTreeMap<&str, Vec<DestinationUse>> = BTreeMap::new();
    let allocated: BTreeMap<&str, u32> = reports.iter().map(|r| (&*r.name, r.allocated)).collect();
    for (inst, l4, dst, dport, n) in busiest {
        let v = by_name.entry(inst).or_default();
        if v.len() < BUSIEST_PER_INSTANCE {
            v.push(DestinationUse {
                protocol: l4.label().into(),
                destination: endpoint(*dst, *dport),
                ports_used: *n,
                allocated: allocated.get(&**inst).copied().unwrap_or(0),
            });
        }
    }
    let instances = reports
        .iter()
        .map(|r| InstanceMetrics {
            instance: r.name.to_string(),
            public_ip: ip(r.scenario.addr()),
            scenario: r.scenario.name().into(),
            per_protocol: [L4::Tcp, L4::Udp]
                .iter()
                .map(|&l| {
                    let i = l as usize;
                    ProtoMetrics {
                        protocol: l.label().into(),
                        allocated_ports: r.allocated,
                        used_ports: r.used[i],
                        flows: r.flows[i].into(),
                        connections_ok: r.stats[i].conn_ok,
                        connections_failed: r.stats[i].conn_fail,
                        drops: drops_of(&r.stats[i].drops),
                        idle_ended_then_sent: r.stats[i].idle_ended_then_sent,
                        fail_fast_answered: r.stats[i].fail_fast_answered,
                        fail_fast_suppressed: r.stats[i].fail_fast_suppressed,
                    }
                })
                .collect(),
            other_protocol_drops: drops_of(&r.stats[2].drops),
            busiest: by_name.remove(&*r.name).unwrap_or_default(),
        })
        .collect();
    MetricsSnapshot {
        instances,
        drops: drops_of(gateway_drops),
        live_flows,
        max_flows,
        ..Default::default()
    }
}

struct LogInner {
    records: VecDeque<EventRecord>,
    /// Sequence number the next record gets.
    next: u64,
}

/// A shared, bounded log of events with sequence numbers (R6.2), which the API pages through
/// and long-polls. Pushing never blocks on readers; the oldest records are forgotten first.
pub struct EventLog {
    inner: Mutex<LogInner>,
    cap: usize,
    newest: watch::Sender<u64>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::new()
    }
}

impl EventLog {
    /// An empty log keeping [`EVENT_LOG_CAP`] records.
    pub fn new() -> EventLog {
        EventLog::with_capacity(EVENT_LOG_CAP)
    }

    /// An empty log keeping `cap` records (at least 1).
    pub fn with_capacity(cap: usize) -> EventLog {
        EventLog::starting_after(0, cap)
    }

    /// An empty log keeping `cap` records whose first event gets sequence number `last + 1`.
    /// `snatgw run` starts after [`crate::store::event_seq_start`]: the wall clock in
    /// microseconds, but never below the floor persisted in the store, so sequence numbers
    /// keep growing across restarts (also after the clock steps back) and a follower
    /// (`snatgw events --follow`) that saw the old run's numbers still sees the new run's
    /// events.
    pub fn starting_after(last: u64, cap: usize) -> EventLog {
        EventLog {
            inner: Mutex::new(LogInner {
                records: VecDeque::new(),
                next: last.saturating_add(1),
            }),
            cap: cap.max(1),
            // The newest *record*: none yet, so a waiter for anything after `n` sleeps until
            // the first push (not woken at once by the start number).
            newest: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an engine event; returns its sequence number.
    pub fn push(&self, e: &Event) -> u64 {
        let mut g = self.lock();
        let seq = g.next;
        g.next += 1;
        if g.records.len() >= self.cap {
            g.records.pop_front();
        }
        g.records.push_back(EventRecord::from_event(seq, e));
        drop(g);
        self.newest.send_replace(seq);
        seq
    }

    /// Appends several engine events.
    pub fn extend<'a>(&self, events: impl IntoIterator<Item = &'a Event>) {
        for e in events {
            self.push(e);
        }
    }

    /// Records with sequence number > `after`, oldest first, at most `limit`.
    pub fn after(&self, after: u64, limit: usize) -> Vec<EventRecord> {
        let g = self.lock();
        let first = g.records.front().map_or(g.next, |r| r.seq);
        let skip =
            usize::try_from(after.saturating_add(1).saturating_sub(first)).unwrap_or(usize::MAX);
        g.records.iter().skip(skip).take(limit).cloned().collect()
    }

    /// Sequence number of the newest record (0 if none yet).
    pub fn last_seq(&self) -> u64 {
        self.lock().next - 1
    }

    /// A channel holding the newest sequence number.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }

    /// Waits until a record with sequence number > `after` exists or `timeout` passes;
    /// returns whether one exists. For async code.
    pub async fn wait_after(&self, after: u64, timeout: Duration) -> bool {
        let mut rx = self.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|&s| s > after)).await;
        matches!(waited, Ok(Ok(_)))
    }
}

/// The real [`Backend`]: the running [`Gateway`] behind the mutex its workers share, the
/// event log, and the gateway's clock (engine seconds).
pub struct GatewayBackend {
    gateway: Arc<Mutex<Gateway>>,
    events: Arc<EventLog>,
    clock: Box<dyn Fn() -> u32 + Send + Sync>,
    runtime: Option<RuntimeCountersSource>,
}

impl GatewayBackend {
    /// A backend over `gateway`; `clock` returns the engine time to apply changes at.
    pub fn new(
        gateway: Arc<Mutex<Gateway>>,
        events: Arc<EventLog>,
        clock: impl Fn() -> u32 + Send + Sync + 'static,
    ) -> GatewayBackend {
        GatewayBackend {
            gateway,
            events,
            clock: Box::new(clock),
            runtime: None,
        }
    }

    /// The same backend, with `source` giving the runtime's counters for `/metrics`
    /// ([`MetricsSnapshot::runtime`]). The source is called at every scrape, outside the
    /// gateway lock; it must not take it.
    pub fn with_runtime_counters(mut self, source: RuntimeCountersSource) -> GatewayBackend {
        self.runtime = Some(source);
        self
    }

    /// The gateway.
    pub fn gateway(&self) -> &Arc<Mutex<Gateway>> {
        &self.gateway
    }

    /// The event log.
    pub fn event_log(&self) -> &Arc<EventLog> {
        &self.events
    }

    /// Drains the engine's queued events into the event log and returns them (for the
    /// caller to log). Use this or drain and push yourself: the engine has one queue.
    pub fn pump_events(&self) -> Vec<Event> {
        let evs = self.lock().engine_mut().drain_events();
        self.events.extend(&evs);
        evs
    }

    fn lock(&self) -> MutexGuard<'_, Gateway> {
        // A worker that panicked leaves the lock poisoned; the control plane still reports.
        self.gateway.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for GatewayBackend {
    fn check(&self, topo: &Topology) -> Result<Vec<(SnatGroup, u32)>, ConfigError> {
        self.lock().engine().check(topo)
    }

    fn apply(&self, topo: Topology) -> Result<ApplyReport, ConfigError> {
        let now = (self.clock)();
        // `Engine::apply` first expires everything due, without a bound: work a backlog off
        // in bounded steps with the lock released between them (R9.4), so the apply itself
        // finds nothing left to expire.
        for _ in 0..100_000 {
            let done = self
                .lock()
                .engine_mut()
                .advance_bounded(now, snatgw_core::EXPIRY_BUDGET);
            if done {
                break;
            }
            std::thread::yield_now();
        }
        self.lock().apply(now, topo)
    }

    fn instances(&self) -> Vec<InstanceReport> {
        self.lock().engine().instances()
    }

    fn instance(&self, name: &str) -> Option<InstanceReport> {
        self.lock().engine().instance(name)
    }

    fn flows(&self, q: &FlowQuery) -> FlowPage {
        let Ok(filter) = q.filter() else {
            return FlowPage {
                flows: Vec::new(),
                next_cursor: None,
            };
        };
        let limit = q.limit.clamp(1, MAX_PAGE);
        // A cursor past the table (also one past u32) is its end: an empty last page.
        let mut cursor = u32::try_from(q.cursor).unwrap_or(u32::MAX);
        let mut views = Vec::new();
        let next = loop {
            // One bounded chunk per lock hold (R9.4); the lock is released in between.
            let (page, next) = self.lock().engine().flows_page(
                &filter,
                cursor,
                FLOW_SCAN_PER_LOCK,
                limit - views.len(),
            );
            views.extend(page);
            match next {
                None => break None,
                Some(n) if views.len() >= limit => break Some(n),
                Some(n) => cursor = n,
            }
        };
        FlowPage {
            flows: views
                .into_iter()
                .map(|v| FlowRecord {
                    instance: v.instance.to_string(),
                    protocol: v.l4.label().into(),
                    private: endpoint(v.private.0, v.private.1),
                    public: endpoint(v.public.0, v.public.1),
                    remote: endpoint(v.remote.0, v.remote.1),
                    last_seen: v.last_seen,
                    expires_at: v.expires_at,
                    state: v.state.into(),
                })
                .collect(),
            next_cursor: next.map(u64::from),
        }
    }

    fn inbound_flows(&self, lb: &str, cursor: u64, limit: usize) -> InboundFlowPage {
        let limit = limit.clamp(1, MAX_PAGE);
        // A cursor past the table (also one past u32) is its end: an empty last page.
        let mut cursor = u32::try_from(cursor).unwrap_or(u32::MAX);
        let mut views = Vec::new();
        let next = loop {
            // One bounded chunk per lock hold (R9.4), as for PAT flows.
            let (page, next) = self.lock().engine().inbound_flows_page(
                Some(lb),
                cursor,
                FLOW_SCAN_PER_LOCK,
                limit - views.len(),
            );
            views.extend(page);
            match next {
                None => break None,
                Some(n) if views.len() >= limit => break Some(n),
                Some(n) => cursor = n,
            }
        };
        InboundFlowPage {
            flows: views
                .into_iter()
                .map(|v| InboundFlowRecord {
                    lb: v.lb,
                    rule: v.rule,
                    protocol: if v.proto == 6 { "tcp" } else { "udp" }.into(),
                    client: endpoint(v.client.0, v.client.1),
                    frontend: endpoint(v.frontend.0, v.frontend.1),
                    member: endpoint(v.member.0, v.member.1),
                    idle_secs: v.idle,
                })
                .collect(),
            next_cursor: next.map(u64::from),
        }
    }

    fn events(&self, after: u64, limit: usize) -> Vec<EventRecord> {
        self.events.after(after, limit)
    }

    fn event_waiter(&self) -> Option<watch::Receiver<u64>> {
        Some(self.events.subscribe())
    }

    fn metrics(&self) -> MetricsSnapshot {
        let mut policy = MetricsSnapshot::default();
        let (reports, busiest, drops, live, max) = {
            let g = self.lock();
            let e = g.engine();
            fill_policy_metrics(&mut policy, e);
            (
                e.instances(),
                e.busiest_destinations(BUSIEST_PER_INSTANCE),
                g.stats().drops,
                e.live_flows() as u64,
                u64::from(e.topology().params.max_flows),
            )
        };
        MetricsSnapshot {
            inbound_flows: policy.inbound_flows,
            probes: policy.probes,
            nsg_rules: policy.nsg_rules,
            inbound_rules: policy.inbound_rules,
            runtime: self.runtime.as_ref().map(|f| f()),
            ..metrics_snapshot(&reports, &busiest, &drops, live, max)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: u32) -> Event {
        Event {
            time: t,
            kind: EventKind::TierChanged {
                public_ip: 0xc000_0264,
                pool_size: 51,
                from: 1024,
                to: 512,
            },
            count: 1,
            since: t,
            summary: false,
        }
    }

    #[test]
    fn event_log_pages_and_forgets_the_oldest() {
        let log = EventLog::with_capacity(3);
        assert!(log.after(0, 10).is_empty());
        for t in 1..=5 {
            assert_eq!(log.push(&ev(t)), u64::from(t));
        }
        let all = log.after(0, 10);
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(log.after(3, 10).len(), 2);
        assert_eq!(log.after(4, 1)[0].seq, 5);
        assert!(log.after(5, 10).is_empty());
        assert!(log.after(u64::MAX, 10).is_empty());
        assert_eq!(log.last_seq(), 5);
        let r = &all[0];
        assert_eq!(r.kind, "tier_changed");
        assert_eq!(r.public_ip.as_deref(), Some("192.0.2.100"));
        assert_eq!(r.detail, "pool 51: 1024 -> 512 ports per instance");
    }

    #[test]
    fn a_log_started_after_an_earlier_run_keeps_numbers_growing() {
        // The previous run's follower last saw 1_000; the new run starts after a larger base.
        let log = EventLog::starting_after(5_000, 10);
        assert_eq!(log.last_seq(), 5_000);
        assert!(log.after(1_000, 10).is_empty());
        assert_eq!(log.push(&ev(1)), 5_001);
        assert_eq!(
            log.after(1_000, 10).len(),
            1,
            "a follower of the old run sees it"
        );
    }

    #[test]
    fn summary_detail_says_so() {
        let mut e = ev(20);
        e.summary = true;
        e.count = 7;
        e.since = 10;
        let r = EventRecord::from_event(1, &e);
        assert!(r.summary);
        assert!(r.detail.starts_with("7 more in 10 s (summary, R9.3)"));
    }

    #[test]
    fn flow_query_validation() {
        let q = |f: fn(&mut FlowQuery)| {
            let mut q = FlowQuery::default();
            f(&mut q);
            q.filter()
        };
        assert!(q(|_| {}).is_ok());
        let f = q(|q| q.destination = Some("198.51.100.7:443".into())).expect("ok");
        assert_eq!((f.dst, f.dport), (Some(0xc633_6407), Some(443)));
        assert_eq!(
            q(|q| q.protocol = Some("icmp".into()))
                .expect_err("bad")
                .field
                .as_deref(),
            Some("protocol")
        );
        assert!(q(|q| q.state = Some("half".into())).is_err());
        assert!(q(|q| q.destination = Some("1.2.3:80".into())).is_err());
        assert!(q(|q| q.destination = Some("1.2.3.4:99999".into())).is_err());
        assert!(q(|q| q.limit = 0).is_err());
        assert!(q(|q| q.limit = 1001).is_err());
        assert!(q(|q| q.destination = Some("1.2.3.4:+80".into())).is_err());
        assert!(q(|q| q.destination = Some("1.2.3.4:080".into())).is_err());
        assert!(q(|q| q.destination = Some("1.2.3.4:".into())).is_err());
        assert!(q(|q| q.destination = Some("01.2.3.4".into())).is_err());
        assert!(q(|q| q.destination = Some("1.2.3.4:0".into())).is_ok());
        assert!(q(|q| q.destination = Some("1.2.3.4:65535".into())).is_ok());
        for empty in [
            |q: &mut FlowQuery| q.instance = Some(String::new()),
            |q: &mut FlowQuery| q.destination = Some(String::new()),
            |q: &mut FlowQuery| q.protocol = Some(String::new()),
            |q: &mut FlowQuery| q.state = Some(String::new()),
        ] {
            assert!(q(empty).is_err());
        }
        // A cursor past the table is its end, not an error (an empty last page).
        assert!(q(|q| q.cursor = 1 << 40).is_ok());
        assert!(q(|q| q.cursor = i64::MAX as u64).is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn wait_after_wakes_on_push() {
        let log = Arc::new(EventLog::new());
        assert!(!log.wait_after(0, Duration::from_millis(20)).await);
        let l2 = log.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            l2.push(&ev(1));
        });
        assert!(log.wait_after(0, Duration::from_secs(5)).await);
        t.join().expect("join");
        assert!(log.wait_after(0, Duration::from_millis(1)).await);
    }
}
