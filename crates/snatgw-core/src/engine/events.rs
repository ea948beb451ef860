//! Operator events and why flows end (SPEC R2.6, R6.2, R9.3).
//!
//! [`Event`]s (exhaustion, flow limit, reclaimed ports, tier and scenario changes, probe
//! state changes) are queued
//! with the engine's time, at most 65 536 of them; beyond that they are counted as lost
//! ([`super::GlobalStats::events_lost`]) until the caller drains the queue
//! ([`Engine::drain_events`]). Events that come in storms — exhaustion (R2.6) and flow limit
//! (R9.2), one per failed flow — go through an [`Aggregator`] keyed by the whole event (kind,
//! instance, public IP, protocol, destination): the first is queued at once, repeats within
//! `gateway.event_interval_secs` become one summary event with their count (R9.3); at most
//! [`AGGREGATE_KEYS`] keys are open, further ones share one [`EventKind::Overflow`] summary.
//! Counters are kept elsewhere and stay exact. [`EndCause`] is why a flow ended.
//! This module does not log or format events (the `snatgw` crate does) and does not decide
//! when they happen.

use std::sync::Arc;

use super::Engine;
use crate::aggregate::{Aggregator, Offer};
use crate::packet::L4;
use crate::units::Time;

/// Events kept in the queue before new ones are counted as lost.
const EVENT_CAP: usize = 65_536;
/// Keys the storm aggregator keeps open at once (R9.3).
pub const AGGREGATE_KEYS: usize = 1024;

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndCause {
    /// No packet for the idle timeout (R3.4, R3.5).
    Idle,
    /// FIN seen both ways, then the FIN delay (R3.2).
    Fin,
    /// RST, then the RST delay (R3.3).
    Rst,
    /// Its port was reclaimed: tier change (R2.9), scenario change (R1.4) or instance removed.
    Reclaimed,
}

impl EndCause {
    /// The label of logs, the API, the stats file and traces: `idle`, `fin`, `rst` or
    /// `reclaimed`.
    pub fn label(self) -> &'static str {
        match self {
            EndCause::Idle => "idle",
            EndCause::Fin => "fin",
            EndCause::Rst => "rst",
            EndCause::Reclaimed => "reclaimed",
        }
    }
}

/// An event for operators (SPEC R2.6, R6.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When (for a summary: when its interval closed).
    pub time: Time,
    /// What.
    pub kind: EventKind,
    /// Occurrences it stands for: 1 for an event recorded at once; for a summary (R9.3), the
    /// repeats counted in its interval.
    pub count: u64,
    /// For a summary, when its interval opened; otherwise equal to `time`.
    pub since: Time,
    /// Whether this is an aggregated summary of repeats (R9.3) rather than one occurrence.
    pub summary: bool,
}

/// Kinds of [`Event`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// A new flow found no free port for its destination (R2.6).
    Exhaustion {
        /// Instance.
        instance: Arc<str>,
        /// Its public IP.
        public_ip: u32,
        /// Protocol.
        l4: L4,
        /// Destination address.
        dst: u32,
        /// Destination port.
        dst_port: u16,
        /// The instance's preallocated ports.
        allocated: u32,
    },
    /// A new flow was refused because a flow limit was reached (R9.2).
    FlowLimit {
        /// Instance.
        instance: Arc<str>,
        /// Its public IP.
        public_ip: u32,
        /// Protocol.
        l4: L4,
        /// Destination address.
        dst: u32,
        /// Destination port.
        dst_port: u16,
        /// The limit reached.
        limit: u32,
        /// Whose limit: the instance's (`max_flows`) or the gateway's (`gateway.max_flows`).
        scope: LimitScope,
    },
    /// Repeats of events whose keys did not fit the aggregator (more than
    /// [`AGGREGATE_KEYS`] at once), summarised together (R9.3); `count` says how many.
    Overflow,
    /// Ports were taken from an instance and the flows on them dropped (R1.4, R2.9).
    PortsReclaimed {
        /// Instance.
        instance: Arc<str>,
        /// Public IP the ports belonged to.
        public_ip: u32,
        /// Ports taken.
        ports: u32,
        /// Flows dropped.
        flows: u32,
        /// Why the ports were taken.
        reason: ReclaimReason,
    },
    /// The ports per instance on a public IP changed (R2.9, R2.10, R2.11).
    TierChanged {
        /// Public IP.
        public_ip: u32,
        /// Pool size that decides the tier (as reported, R2.11).
        pool_size: u32,
        /// Previous ports per instance.
        from: u16,
        /// New ports per instance.
        to: u16,
    },
    /// A load-balancer member's health probe changed state (R5.2): down after
    /// `unhealthy_threshold` failures (no new inbound flows, R4.5), up after a success.
    ProbeChanged {
        /// Load balancer.
        lb: String,
        /// Probe.
        probe: String,
        /// Member instance.
        member: Arc<str>,
        /// New state.
        up: bool,
        /// Failed probes in a row when it changed.
        failures: u32,
    },
    /// An instance's outbound scenario changed (R1.4).
    ScenarioChanged {
        /// Instance.
        instance: Arc<str>,
        /// Old scenario (`none` for a new instance).
        from: String,
        /// New scenario.
        to: String,
    },
}

impl EndCause {
    /// Index into the `ended` counters: idle, fin, rst, reclaimed.
    pub(super) fn index(self) -> usize {
        match self {
            EndCause::Idle => 0,
            EndCause::Fin => 1,
            EndCause::Rst => 2,
            EndCause::Reclaimed => 3,
        }
    }
}

/// The aggregator for storm events.
pub(super) fn aggregator(interval: Time) -> Aggregator<EventKind> {
    Aggregator::new(interval, AGGREGATE_KEYS)
}

impl Engine {
    /// Queues an event at the engine's current time, or counts it as lost if the queue is full.
    pub(super) fn event(&mut self, kind: EventKind) {
        let now = self.now;
        self.push_event(Event {
            time: now,
            kind,
            count: 1,
            since: now,
            summary: false,
        });
    }

    fn push_event(&mut self, e: Event) {
        if self.events.len() >= EVENT_CAP {
            self.global.events_lost += 1;
        } else {
            self.events.push_back(e);
        }
    }

    /// Queues a storm event (exhaustion, flow limit) through the aggregator (R9.3).
    pub(super) fn event_aggregated(&mut self, kind: EventKind) {
        let now = self.now;
        self.flush_aggregated(now);
        if self.agg.offer(now, &kind) == Offer::Report {
            self.event(kind);
        }
    }

    /// Queues the summaries of aggregation intervals that closed by `now`.
    pub(super) fn flush_aggregated(&mut self, now: Time) {
        if self.agg.next_deadline().is_none_or(|t| t > now) {
            return;
        }
        for s in self.agg.due(now) {
            self.push_event(Event {
                time: s.until,
                kind: s.key.unwrap_or(EventKind::Overflow),
                count: s.count,
                since: s.since,
                summary: true,
            });
        }
    }
}

/// Whose flow limit refused a new flow (SPEC R9.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitScope {
    /// The instance's `max_flows`.
    Instance,
    /// The gateway's `gateway.max_flows`.
    Gateway,
}

impl LimitScope {
    /// The label logs, the API and the stats file use: `instance` or `gateway`.
    pub fn label(self) -> &'static str {
        match self {
            LimitScope::Instance => "instance",
            LimitScope::Gateway => "gateway",
        }
    }
}

impl std::fmt::Display for LimitScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Why ports were taken from an instance (R1.4, R2.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReclaimReason {
    /// Its public IP's tier went up: the block shrinks to the new tier's size (R2.9).
    TierUp,
    /// Its scenario changed, so its public IP did (R1.4).
    ScenarioChange,
    /// It was removed from the topology.
    InstanceRemoved,
}

impl ReclaimReason {
    /// The label logs, the API and the stats file use: `tier_up`, `scenario_change`,
    /// `instance_removed`.
    pub fn label(self) -> &'static str {
        match self {
            ReclaimReason::TierUp => "tier_up",
            ReclaimReason::ScenarioChange => "scenario_change",
            ReclaimReason::InstanceRemoved => "instance_removed",
        }
    }
}

impl std::fmt::Display for ReclaimReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}
