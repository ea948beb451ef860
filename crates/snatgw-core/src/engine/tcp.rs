//! TCP flow state: FIN and RST tracking and the close times they set (SPEC R3.1–R3.3).
//!
//! A flow's `state` holds three bits: FIN seen outbound, FIN seen inbound, RST seen. FIN in
//! both directions sets the close time `fin_timeout` later (R3.2), a RST `rst_timeout` later
//! (R3.3), whichever is earlier; an outbound SYN on a closing flow starts it over (the client
//! reused its port, R3.1). This module only records state and close times and queues the
//! close-time timer entry; the wheel (`timers`) removes the flow when it comes due. Whether an
//! unmatched TCP packet may start a flow (R3.1) is decided in `translate`.

use super::events::EndCause;
use super::journal::FlowKey;
use super::Engine;
use crate::packet::{proto, tcp_flags, Direction};
use crate::units::Time;

const ST_FIN_OUT: u8 = 1;
const ST_FIN_IN: u8 = 2;
const ST_RST: u8 = 4;

/// Why a closing flow (one with a close time) ends.
pub(super) fn close_cause(state: u8) -> EndCause {
    if state & ST_RST != 0 {
        EndCause::Rst
    } else {
        EndCause::Fin
    }
}

/// The state's name in a [`super::FlowView`]: `open`, `fin_out`, `fin_in`, `closing` (FIN both
/// ways) or `reset`.
pub(super) fn state_name(state: u8) -> &'static str {
    match state {
        0 => "open",
        s if s & ST_RST != 0 => "reset",
        s if s & (ST_FIN_IN | ST_FIN_OUT) == ST_FIN_IN | ST_FIN_OUT => "closing",
        ST_FIN_OUT => "fin_out",
        _ => "fin_in",
    }
}

impl Engine {
    /// Applies a TCP packet's SYN/FIN/RST `flags`, seen in direction `dir` now, to flow `fi`.
    pub(super) fn tcp_event(&mut self, fi: u32, flags: u8, dir: Direction) {
        self.tcp_event_from(fi, flags, dir, self.now);
    }

    /// Applies a FIN or RST a fast path translated at time `at` (issue #17): the flow whose
    /// outbound 5-tuple and public side are `key` (TCP) gets the state change
    /// [`Engine::process`] would have made for the packet, with the FIN/RST timer started at
    /// `at` rather than now: FIN seen both ways closes it at `at + fin_timeout` (R3.2), a RST at
    /// `at + rst_timeout` (R3.3), exactly, however late the event is applied (a close time
    /// already past releases the port at the next timer step, with that close time as its
    /// release time). Its `last_seen` moves to `at` if later. Returns whether a flow was
    /// found: an event for no live flow, or for one with another public side (the 5-tuple's
    /// earlier flow), is ignored and counted in [`super::GlobalStats::tcp_events_unknown`].
    ///
    /// Events of one flow must be applied in the order they happened, and before the engine
    /// could end the flow by idle: a fast path's activity source reports the packet's time as
    /// the flow's last activity (its map entry records it too), so idle expiry waits at least
    /// `idle_timeout` after `at`.
    pub fn tcp_event_at(&mut self, at: Time, key: &FlowKey, flags: u8, dir: Direction) -> bool {
        let found = self
            .flows
            .find_fwd(proto::TCP, key.src, key.sport, key.dst, key.dport)
            .filter(|&fi| {
                let f = self.flows.get(fi);
                f.public == key.public && f.pport == key.pport
            })
            .filter(|&fi| !self.reap_if_due(fi));
        let Some(fi) = found else {
            self.global.tcp_events_unknown += 1;
            return false;
        };
        self.global.tcp_events_applied += 1;
        let f = self.flows.get_mut(fi);
        f.last_seen = f.last_seen.max(at);
        self.tcp_event_from(fi, flags, dir, at);
        // Applied after its close time (late): no verdict may use the flow any more.
        if let Some((at, cause)) = self.due(fi) {
            self.remove_flow(fi, at, cause);
        }
        true
    }

    /// [`Engine::tcp_event`] with the packet seen at `now`.
    fn tcp_event_from(&mut self, fi: u32, flags: u8, dir: Direction, now: Time) {
        let (fin_t, rst_t) = (self.topo.params.fin_timeout, self.topo.params.rst_timeout);
        let f = self.flows.get_mut(fi);
        if dir == Direction::Outbound
            && flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN
            && f.state != 0
        {
            // A new connection on the same 5-tuple (the client reused its port after closing):
            // the flow starts over.
            f.state = 0;
            f.close_at = 0;
            return;
        }
        let mut at = None;
        if flags & tcp_flags::RST != 0 && f.state & ST_RST == 0 {
            f.state |= ST_RST;
            at = Some(now.saturating_add(rst_t));
        }
        if flags & tcp_flags::FIN != 0 {
            let had_both = f.state & (ST_FIN_OUT | ST_FIN_IN) == ST_FIN_OUT | ST_FIN_IN;
            f.state |= if dir == Direction::Outbound {
                ST_FIN_OUT
            } else {
                ST_FIN_IN
            };
            let both = f.state & (ST_FIN_OUT | ST_FIN_IN) == ST_FIN_OUT | ST_FIN_IN;
            if both && !had_both {
                let t = now.saturating_add(fin_t);
                at = Some(at.map_or(t, |a: Time| a.min(t)));
            }
        }
        if let Some(t) = at {
            if f.close_at == 0 || t < f.close_at {
                f.close_at = t;
                let gen = f.gen;
                self.wheel.push(t, fi, gen);
            }
        }
    }
}
