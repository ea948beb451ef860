//! Flow timers: a one-second wheel spanning the longest timeout (SPEC R3.2–R3.5).
//!
//! Each live flow has one entry at its deadline, `min(last_seen + idle, close_at)`; a packet
//! only updates `last_seen`, and an entry that comes due re-checks the real deadline and is
//! re-queued if the flow was active since (lazy re-check). A FIN-both or RST adds an entry at
//! the close time (`tcp`). Expiry therefore costs in proportion to what comes due, never a scan
//! of all flows. Entries carry the slot's generation, so entries of removed flows are skipped.
//!
//! This module does not decide close times (that is `tcp`) and does not release ports itself
//! ([`Engine::remove_flow`] does); the release history's own expiry is `ports`'.

use super::events::EndCause;
use super::{tcp, Engine, Time, NONE};
use crate::topology::Params;

/// The timer wheel: one slot per second, entries (flow slot, generation).
pub(super) struct Wheel {
    pub(super) slots: Vec<Vec<(u32, u32)>>,
    pub(super) mask: u32,
    /// The first second not yet expired.
    pub(super) next: Time,
}

impl Wheel {
    pub(super) fn new(span: u32, now: Time) -> Wheel {
        let len = (span as usize + 2).next_power_of_two();
        Wheel {
            slots: (0..len).map(|_| Vec::new()).collect(),
            mask: len as u32 - 1,
            next: now.saturating_add(1),
        }
    }
    #[inline]
    pub(super) fn push(&mut self, at: Time, flow: u32, gen: u32) {
        self.slots[(at & self.mask) as usize].push((flow, gen));
    }
    pub(super) fn len(&self) -> u32 {
        self.mask + 1
    }
}

/// Seconds the wheel must span: the longest timeout.
pub(super) fn span(params: &Params) -> u32 {
    params
        .idle_timeout
        .max(params.fin_timeout)
        .max(params.rst_timeout)
}

impl Engine {
    /// Removes every flow whose deadline is at or before `now` (the wheel's seconds from
    /// `wheel.next` through `now`), re-queueing entries of flows that were active since.
    pub(super) fn expire_due(&mut self, now: Time) {
        let len = self.wheel.len();
        let sweep_all = now - self.wheel.next >= len;
        let (first, last) = if sweep_all {
            (0, len - 1)
        } else {
            (self.wheel.next, now)
        };
        let mut t = first;
        loop {
            let s = (t & self.wheel.mask) as usize;
            let mut entries = std::mem::take(&mut self.wheel.slots[s]);
            for &(fi, gen) in &entries {
                let f = self.flows.get(fi);
                if f.gen != gen || f.block == NONE {
                    continue;
                }
                let idle_at = f.last_seen.saturating_add(self.topo.params.idle_timeout);
                let (deadline, cause) = if f.close_at != 0 && f.close_at <= idle_at {
                    (f.close_at, tcp::close_cause(f.state))
                } else {
                    (idle_at, EndCause::Idle)
                };
                if deadline <= now {
                    self.remove_flow(fi, deadline, cause);
                } else {
                    self.wheel.push(deadline, fi, gen);
                }
            }
            entries.clear();
            if self.wheel.slots[s].is_empty() {
                self.wheel.slots[s] = entries;
            }
            if t == last {
                break;
            }
            t += 1;
        }
        self.wheel.next = now + 1;
    }

    /// Replaces the wheel by one spanning `span` seconds, with one entry per live flow at its
    /// deadline (after a change of timeouts).
    pub(super) fn rebuild_wheel(&mut self, span: u32) {
        let mut w = Wheel::new(span, self.now);
        w.next = self.wheel.next;
        let idle = self.topo.params.idle_timeout;
        for (fi, f) in self.flows.iter_live() {
            let mut d = f.last_seen.saturating_add(idle);
            if f.close_at != 0 {
                d = d.min(f.close_at);
            }
            w.push(d.max(w.next), fi, f.gen);
        }
        self.wheel = w;
    }
}
