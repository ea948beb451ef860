//! Counters (SPEC R6.1): per instance and protocol, and for the whole engine.
//!
//! Plain counter records, bumped where things happen (`translate`, `Engine::remove_flow`,
//! `events`, `idle_reuse`) and read through [`super::InstanceReport::stats`] and
//! [`super::Engine::global_stats`]. Nothing here decides anything; the invariant check
//! (`invariants`) verifies that they add up.

use crate::packet::{proto, DropReason};

/// Counters of one instance for one protocol (SPEC R6.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceStats {
    /// SNAT connections (new flows) that got a port.
    pub conn_ok: u64,
    /// New flows that failed for want of a port (R2.6).
    pub conn_fail: u64,
    /// Packets translated outbound.
    pub packets_out: u64,
    /// Packets translated inbound.
    pub packets_in: u64,
    /// Flows ended, by cause: idle, fin, rst, reclaimed.
    pub ended: [u64; 4],
    /// Dropped packets by [`DropReason`] (index = reason as usize).
    pub drops: [u64; DropReason::COUNT],
    /// Refused new flows answered to the instance (SPEC R9.5, `on_exhaustion = "reset"`):
    /// TCP RSTs in the TCP counters, ICMP administratively prohibited in the UDP ones. Each
    /// is also counted in `drops` under its refusal (`ports_exhausted`, `flow_limit`).
    pub fail_fast_answered: u64,
    /// Refused new flows left unanswered by the per-instance rate limit (R9.5).
    pub fail_fast_suppressed: u64,
    /// Flows ended by idle timeout on which the instance later sent again (a TCP segment
    /// that is not a SYN, dropped as `tcp_not_syn`; a UDP datagram, which starts a new flow):
    /// the symptom of missing keepalives (SPEC R3.4, R7.1), counted once per flow
    /// (`engine::idle_reuse`).
    pub idle_ended_then_sent: u64,
    /// Flows restored from an exported flow state (a restart, SPEC R11.1; a takeover,
    /// R10.4): they hold ports as `conn_ok` flows do, without having been opened here.
    pub restored: u64,
}

/// Global counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GlobalStats {
    /// Dropped packets by [`DropReason`].
    pub drops: [u64; DropReason::COUNT],
    /// Packets passed untranslated (R1.7).
    pub passed: u64,
    /// Packets translated statelessly for ILPIPs (R1.1).
    pub ilpip_packets: u64,
    /// Flows created.
    pub flows_created: u64,
    /// Flows restored from an exported flow state (SPEC R11.1, R10.4).
    pub flows_restored: u64,
    /// Flows ended, by cause: idle, fin, rst, reclaimed.
    pub flows_ended: [u64; 4],
    /// Events lost because the queue was full.
    pub events_lost: u64,
    /// Refused TCP SYNs answered with a RST (SPEC R9.5).
    pub fail_fast_rst: u64,
    /// Refused UDP flows answered with ICMP administratively prohibited (SPEC R9.5).
    pub fail_fast_icmp: u64,
    /// Answers left out by the per-instance rate limit (SPEC R9.5).
    pub fail_fast_suppressed: u64,
    /// FIN/RST a fast path translated, applied to their flows ([`super::Engine::tcp_event_at`],
    /// issue #17).
    pub tcp_events_applied: u64,
    /// Such events for no live flow (it ended meanwhile), ignored.
    pub tcp_events_unknown: u64,
}

/// Index of the counters for IP protocol `p`: TCP, UDP, other.
pub(super) fn stats_bucket(p: u8) -> usize {
    match p {
        proto::TCP => 0,
        proto::UDP => 1,
        _ => 2,
    }
}
