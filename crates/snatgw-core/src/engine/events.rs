//! Operator events and why flows end (SPEC R2.6, R6.2).
//!
//! [`Event`]s (exhaustion, reclaimed ports, tier and scenario changes) are queued with the
//! engine's time, at most 65 536 of them; beyond that they are counted as lost
//! ([`super::GlobalStats::events_lost`]) until the caller drains the queue
//! ([`Engine::drain_events`]). [`EndCause`] is why a flow ended, for the per-cause counters.
//! This module does not log or format events (the `snatgw` crate does) and does not decide
//! when they happen.

use std::sync::Arc;

use super::{Engine, Time};
use crate::packet::L4;

/// Events kept in the queue before new ones are counted as lost.
const EVENT_CAP: usize = 65_536;

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// An event for operators (SPEC R2.6, R6.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When.
    pub time: Time,
    /// What.
    pub kind: EventKind,
}

/// Kinds of [`Event`].
#[derive(Debug, Clone, PartialEq, Eq)]
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
        /// Why: `tier_up`, `scenario_change` or `instance_removed`.
        reason: &'static str,
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

impl Engine {
    /// Queues an event at the engine's current time, or counts it as lost if the queue is full.
    pub(super) fn event(&mut self, kind: EventKind) {
        if self.events.len() >= EVENT_CAP {
            self.global.events_lost += 1;
        } else {
            self.events.push_back(Event {
                time: self.now,
                kind,
            });
        }
    }
}
