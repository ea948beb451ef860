//! The running gateway as the API sees it: the [`Backend`] trait, the shared [`EventLog`],
//! and [`GatewayBackend`], the real implementation over a `Mutex<snatgw_dataplane::Gateway>`.
//! The JSON types it returns are [`crate::view`]'s (re-exported here), shared with `/metrics`,
//! the stats file and the CLI.
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
use snatgw_core::{ApplyReport, ConfigError, DropReason, Event, InstanceReport, Topology, L4};
use snatgw_dataplane::Gateway;
use tokio::sync::watch;

use crate::error::ApiError;
use crate::view;
// The JSON types the API returns live in `view` (one view for the API, /metrics, the stats
// file and the CLI); their names stay reachable here.
pub use crate::view::{
    inbound_rule_metrics, nsg_rule_metrics, probe_metrics, DestinationUse, EventRecord, FlowPage,
    FlowRecord, InboundFlowPage, InboundFlowRecord, InboundRuleMetrics, InstanceMetrics,
    InstancePorts, NsgRuleMetrics, PerProtocol, PortRange, ProbeMetrics, ProtoMetrics,
};

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
    /// This node's view of its fleet (issue #19), when it runs in one
    /// ([`GatewayBackend::with_fleet_gauges`]).
    #[serde(default)]
    pub fleet: Option<FleetGauges>,
    /// The engine's takeover holds (issue #19, R10.4), shown with the fleet gauges.
    #[serde(default)]
    pub takeover: TakeoverHoldMetrics,
}

/// A fleet node's takeover windows and port holds (issue #19, R10.4,
/// `snatgw_core::TakeoverHoldStats`): after taking an instance over, the public ports that
/// unsolicited packets show a lost flow still uses are held against new flows toward that
/// remote for the FIN timeout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TakeoverHoldMetrics {
    /// Instances in their takeover window.
    pub windows_open: u64,
    /// Holds in force.
    pub holds_active: u64,
    /// Holds made since start.
    pub holds_total: u64,
    /// Holds refused because the instance had as many as it may (the packet was still dropped).
    pub holds_refused_at_cap: u64,
    /// Outbound TCP segments without a flow from instances in their window (a lost flow's
    /// client still sending; dropped, R3.1).
    pub lost_flow_packets: u64,
    /// Public ports held against every destination after a takeover: the ports of the last
    /// two port reserves the previous owner had acknowledged here (`Engine::hold_ports`).
    #[serde(default)]
    pub ports_held: u64,
}

/// One fleet node's gauges for `/metrics` (issue #19, SPEC §10): filled by the node's fleet
/// loop (this crate does not depend on the fleet crate).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FleetGauges {
    /// This node's id.
    pub node: String,
    /// Nodes with a live lease, as of the last successful listing.
    pub nodes_live: u64,
    /// Instances this node may translate for now (it holds their grants under a valid
    /// lease, R10.1/R10.2).
    pub instances_owned: u64,
    /// Seconds until this node's local lease view ends (its self-fencing deadline, R10.2);
    /// 0 when it has no valid lease.
    pub lease_valid_seconds: f64,
    /// Owned instances whose runner-up has acknowledged no port reserve of theirs now: their
    /// new flows are refused (drop reason `port_reserve`) until it does (R10.4).
    #[serde(default)]
    pub reserve_waiting_instances: u64,
}

/// Where the backend reads the fleet gauges at every scrape (outside the gateway lock).
pub type FleetGaugesSource = Arc<dyn Fn() -> FleetGauges + Send + Sync>;

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
    /// A fleet node's steering and replication counters (issue #19), when it has a fleet link.
    pub fleet_link: Option<FleetLinkCounters>,
    /// The flow-state snapshots a restart restores from (R11.1), when they are written.
    pub flow_state: Option<FlowStateCounters>,
}

/// The flow-state snapshot thread's counters (SPEC R11.1: what a restart restores from).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FlowStateCounters {
    /// Snapshots written (durably: temp file, fsync, rename).
    pub written: u64,
    /// Snapshots that failed to write (a crash now loses the flows opened since the last one).
    pub failed: u64,
    /// Flows in the last snapshot written.
    pub last_flows: u64,
    /// Bytes of the last snapshot written.
    pub last_bytes: u64,
    /// Microseconds the last snapshot took, first export step to durable file.
    pub last_micros: u64,
}

/// A fleet node's runtime counters for the fleet link (SPEC R10.3, R10.4): what its workers
/// steered to other nodes, what other nodes injected into it, and the journal tap. The same
/// record is the stats file's `fleet` part (`snatgw_runtime::stats::FleetSnap`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FleetLinkCounters {
    /// Outbound packets (private side) refused here and sent to the node that owns them.
    pub steered_out: u64,
    /// Inbound packets (public side) refused here and sent to the node that owns them.
    pub steered_in: u64,
    /// Packets other nodes steered here, queued for a worker.
    pub injected: u64,
    /// Steered packets this node could not take: its inbox was full, the packet was larger
    /// than a batch slot, or the runtime had stopped.
    pub injected_dropped: u64,
    /// Injected packets this node's engine refused (dropped, never steered again: no
    /// ping-pong).
    pub injected_refused: u64,
    /// Flow changes handed to the journal tap (the replication, R10.4).
    pub journal_tapped: u64,
    /// Flow changes the tap never saw because the engine's journal overflowed (the next
    /// flow-state export is the consumer's resynchronisation point).
    pub journal_lost: u64,
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
    /// Packets of another fleet node's instances the kernel sent to it over the fleet link
    /// (issue #19, R10.3), outbound (by instance) and inbound (by public port block).
    #[serde(default)]
    pub steered_out: u64,
    /// See `steered_out`.
    #[serde(default)]
    pub steered_in: u64,
    /// Packets of another node's the kernel could not send it (GSO, too big for the link
    /// once wrapped) and passed up to the engine, which steered them from the TUN.
    #[serde(default)]
    pub steer_passed_up: u64,
    /// Packets other fleet nodes steered here that the kernel unwrapped and translated (a flow
    /// installed here), without a userspace pass.
    #[serde(default)]
    pub link_translated: u64,
    /// Steered packets the kernel left to the link's socket (a flow's first packet, no flow
    /// here, not from a live node): userspace injects them.
    #[serde(default)]
    pub link_passed_up: u64,
    /// Steered packets unwrapped, then not translatable after all (ring full, TTL, MTU):
    /// dropped.
    #[serde(default)]
    pub link_dropped: u64,
}

/// Where a [`GatewayBackend`] gets the runtime's counters from.
pub type RuntimeCountersSource = Arc<dyn Fn() -> RuntimeCounters + Send + Sync>;

/// Copies the NSG, probe and inbound-LB state out of the engine into `m`.
pub fn fill_policy_metrics(m: &mut MetricsSnapshot, e: &snatgw_core::Engine) {
    m.inbound_flows = e.inbound_flow_count() as u64;
    m.probes = probe_metrics(e);
    m.nsg_rules = nsg_rule_metrics(e);
    m.inbound_rules = inbound_rule_metrics(e);
    let t = e.takeover_hold_stats();
    m.takeover = TakeoverHoldMetrics {
        windows_open: u64::from(t.windows_open),
        holds_active: t.holds_active,
        holds_total: t.holds_total,
        holds_refused_at_cap: t.holds_refused_at_cap,
        lost_flow_packets: t.lost_flow_packets,
        ports_held: u64::from(t.ports_held),
    };
}

/// Builds the metrics snapshot from what was copied out under the lock.
pub fn metrics_snapshot(
    reports: &[InstanceReport],
    busiest: &[(Arc<str>, L4, u32, u16, u32)],
    gateway_drops: &[u64; DropReason::COUNT],
    live_flows: u64,
    max_flows: u64,
) -> MetricsSnapshot {
    let allocated: BTreeMap<&str, u32> = reports.iter().map(|r| (&*r.name, r.allocated)).collect();
    let mut by_name = view::destination_uses(
        busiest,
        |i| allocated.get(i).copied().unwrap_or(0),
        BUSIEST_PER_INSTANCE,
    );
    let instances = reports
        .iter()
        .map(|r| InstanceMetrics::from_report(r, by_name.remove(&*r.name).unwrap_or_default()))
        .collect();
    MetricsSnapshot {
        instances,
        drops: view::drop_list(gateway_drops),
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
        self.append(e, |_| ())
    }

    /// Numbers `e`, appends its record, hands the record to `keep`; returns the number.
    fn append(&self, e: &Event, keep: impl FnOnce(&EventRecord)) -> u64 {
        let mut g = self.lock();
        let seq = g.next;
        g.next += 1;
        if g.records.len() >= self.cap {
            g.records.pop_front();
        }
        let r = EventRecord::from_event(seq, e);
        keep(&r);
        g.records.push_back(r);
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

    /// Appends several engine events and returns their records, sequence numbers included
    /// (for a consumer that keeps them too: the runtime's stats file).
    pub fn push_records<'a>(
        &self,
        events: impl IntoIterator<Item = &'a Event>,
    ) -> Vec<EventRecord> {
        let mut out = Vec::new();
        for e in events {
            self.append(e, |r| out.push(r.clone()));
        }
        out
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
    fleet: Option<FleetGaugesSource>,
    after_change: Option<AfterChange>,
}

/// Called under the gateway lock after the backend changed the engine (a configuration
/// applied, timers worked off before it): the runtime applies the flow changes to its fast
/// path there, so no kernel entry outlives its flow past the lock (R2.2, R2.9).
pub type AfterChange = Box<dyn Fn(&mut Gateway) + Send + Sync>;

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
            fleet: None,
            after_change: None,
        }
    }

    /// The same backend, calling `hook` under the gateway lock after every change it makes
    /// to the engine ([`AfterChange`]).
    pub fn with_after_change(mut self, hook: AfterChange) -> GatewayBackend {
        self.after_change = Some(hook);
        self
    }

    /// The same backend, with `source` giving the runtime's counters for `/metrics`
    /// ([`MetricsSnapshot::runtime`]). The source is called at every scrape, outside the
    /// gateway lock; it must not take it.
    pub fn with_runtime_counters(mut self, source: RuntimeCountersSource) -> GatewayBackend {
        self.runtime = Some(source);
        self
    }

    /// The same backend, with `source` giving this node's fleet gauges for `/metrics`
    /// ([`MetricsSnapshot::fleet`]); called at every scrape, outside the gateway lock.
    pub fn with_fleet_gauges(mut self, source: FleetGaugesSource) -> GatewayBackend {
        self.fleet = Some(source);
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
            let done = {
                let mut g = self.lock();
                let done = g
                    .engine_mut()
                    .advance_bounded(now, snatgw_core::EXPIRY_BUDGET);
                if let Some(h) = &self.after_change {
                    h(&mut g);
                }
                done
            };
            if done {
                break;
            }
            std::thread::yield_now();
        }
        let mut g = self.lock();
        let r = g.apply(now, topo);
        if let Some(h) = &self.after_change {
            h(&mut g);
        }
        r
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
            flows: views.iter().map(FlowRecord::from).collect(),
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
            flows: views.into_iter().map(InboundFlowRecord::from).collect(),
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
            takeover: policy.takeover,
            runtime: self.runtime.as_ref().map(|f| f()),
            fleet: self.fleet.as_ref().map(|f| f()),
            ..metrics_snapshot(&reports, &busiest, &drops, live, max)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snatgw_core::EventKind;

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
