//! TCP flow state: FIN and RST tracking and the close times they set (SPEC R3.1–R3.3).
//!
//! A flow's `state` holds three bits: FIN seen outbound, FIN seen inbound, RST seen. FIN in
//! both directions sets the close time `fin_timeout` later (R3.2), a RST `rst_timeout` later
//! (R3.3), whichever is earlier; an outbound SYN on a closing flow starts it over (the client
//! reused its port, R3.1). This module only records state and close times and queues the
//! close-time timer entry; the wheel (`timers`) removes the flow when it comes due. Whether an
//! unmatched TCP packet may start a flow (R3.1) is decided in `translate`.

use super::events::EndCause;
use super::Engine;
use crate::packet::{tcp_flags, Direction};
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
    /// Applies a TCP packet's SYN/FIN/RST `flags`, seen in direction `dir`, to flow `fi`.
    pub(super) fn tcp_event(&mut self, fi: u32, flags: u8, dir: Direction) {
        let now = self.now;
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
