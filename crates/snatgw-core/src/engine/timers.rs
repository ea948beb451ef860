//! Flow timers: a one-second wheel spanning the longest timeout (SPEC R3.2–R3.5).
//!
//! Each live flow has one entry at its deadline, `min(last_seen + idle, close_at)`; a packet
//! only updates `last_seen`, and an entry that comes due re-checks the real deadline and is
//! re-queued if the flow was active since (lazy re-check). A FIN-both or RST adds an entry at
//! the close time (`tcp`). Expiry therefore costs in proportion to what comes due, never a scan
//! of all flows. Entries carry the slot's generation, so entries of removed flows are skipped.
//!
//! **Bounded work (SPEC R9.4).** Expiry is done in steps of at most a budget of entries
//! ([`EXPIRY_BUDGET`] by default, about 1 ms): when a million flows come due in the same
//! second, [`Engine::process`] does one step and returns, and the caller works the backlog off
//! with [`Engine::advance_bounded`] between packets. Verdicts stay exact to the second while
//! the engine is behind: a flow found for a packet is first checked against its deadline and
//! removed if due ([`Engine::reap_if_due`]), the allocator removes the due flows of the
//! destination it allocates for before deciding exhaustion (R2.6, R2.7), and ICMP-error
//! lookups and listings skip due flows. A due flow is removed with its real deadline as the
//! release time, so release history and counters do not depend on when it was reaped.
//!
//! This module does not decide close times (that is `tcp`) and does not release ports itself
//! ([`Engine::remove_flow`] does); the release history's own expiry is `ports`'.

use super::events::EndCause;
use super::flows::Flow;
use super::{tcp, Engine, NONE};
use crate::topology::Params;
use crate::units::Time;

/// Timer entries one bounded call examines by default (SPEC R9.4). Removing an expired flow
/// and recording its release costs up to about 1.5 µs when the tables are far larger than
/// the caches (1M flows; `benches/mass_expiry.rs`, docs/PERFORMANCE.md), so 512 entries keep
/// a call under about 1 ms.
pub const EXPIRY_BUDGET: u32 = 512;

/// The timer wheel: one slot per second, entries (flow slot, generation).
pub(super) struct Wheel {
    pub(super) slots: Vec<Vec<(u32, u32)>>,
    pub(super) mask: u32,
    /// The first second not yet fully expired. `next <= now` means the engine is behind:
    /// entries of seconds up to `now` are still to be examined (R9.4 backlog).
    pub(super) next: Time,
    /// Entries of second `next` taken out of its slot and not yet examined.
    pending: Vec<(u32, u32)>,
}

impl Wheel {
    pub(super) fn new(span: u32, now: Time) -> Wheel {
        let len = (span as usize + 2).next_power_of_two();
        Wheel {
            slots: (0..len).map(|_| Vec::new()).collect(),
            mask: len as u32 - 1,
            next: now.saturating_add(1),
            pending: Vec::new(),
        }
    }
    /// Queues an entry for second `at` (never before `next`: a slot already passed would only
    /// be seen a revolution later).
    #[inline]
    pub(super) fn push(&mut self, at: Time, flow: u32, gen: u32) {
        let at = at.max(self.next);
        self.slots[(at & self.mask) as usize].push((flow, gen));
    }
    pub(super) fn len(&self) -> u32 {
        self.mask + 1
    }
    /// The first second from `next` whose slot holds an entry (maybe early: entries are
    /// re-checked when they come due), within one revolution.
    fn first_busy(&self) -> Option<Time> {
        if !self.pending.is_empty() {
            return Some(self.next);
        }
        (0..self.len())
            .map(|k| self.next.saturating_add(k))
            .find(|&t| !self.slots[(t & self.mask) as usize].is_empty())
    }
}

/// Seconds the wheel must span: the longest timeout.
pub(super) fn span(params: &Params) -> u32 {
    params
        .idle_timeout
        .max(params.fin_timeout)
        .max(params.rst_timeout)
}

/// When flow `f` ends if nothing else happens, and why: `min(last_seen + idle, close_at)`.
#[inline]
pub(super) fn deadline(f: &Flow, idle: u32) -> (Time, EndCause) {
    let idle_at = f.last_seen.saturating_add(idle);
    if f.close_at != 0 && f.close_at <= idle_at {
        (f.close_at, tcp::close_cause(f.state))
    } else {
        (idle_at, EndCause::Idle)
    }
}

impl Engine {
    /// Examines up to `budget` timer entries of the seconds from `wheel.next` through `now`,
    /// removing flows that are due and re-queueing entries of flows that were active since.
    /// Returns the budget left.
    pub(super) fn expire_due(&mut self, now: Time, mut budget: u32) -> u32 {
        let idle = self.topo.params.idle_timeout;
        loop {
            if self.wheel.pending.is_empty() {
                if self.wheel.next > now {
                    return budget;
                }
                // Far behind (a jump in time): every slot is due; visit each once, the last
                // one being `now`'s.
                let len = self.wheel.len();
                if now - self.wheel.next >= len {
                    self.wheel.next = now - (len - 1);
                }
                let s = (self.wheel.next & self.wheel.mask) as usize;
                std::mem::swap(&mut self.wheel.pending, &mut self.wheel.slots[s]);
            }
            while let Some((fi, gen)) = self.wheel.pending.pop() {
                if budget == 0 {
                    self.wheel.pending.push((fi, gen));
                    return 0;
                }
                budget -= 1;
                let f = self.flows.get(fi);
                if f.gen != gen || f.block == NONE {
                    continue;
                }
                let (mut at, mut cause) = deadline(f, idle);
                if at <= now && cause == EndCause::Idle && self.offload.is_some() {
                    (at, cause) = self.refresh_from_outside(fi);
                }
                if at <= now {
                    self.remove_flow(fi, at, cause);
                } else {
                    self.wheel.push(at, fi, gen);
                }
            }
            self.wheel.next += 1;
        }
    }

    /// Whether flow `fi` is due at the engine's time (only possible while the engine is
    /// behind, R9.4), and if so when and why it ended.
    #[inline]
    pub(super) fn due(&self, fi: u32) -> Option<(Time, EndCause)> {
        let d = deadline(self.flows.get(fi), self.topo.params.idle_timeout);
        (d.0 <= self.now).then_some(d)
    }

    /// While behind (R9.4): removes flow `fi` if it is due, so no verdict ever uses a flow
    /// past its deadline. Returns whether it was removed.
    #[inline]
    pub(super) fn reap_if_due(&mut self, fi: u32) -> bool {
        if self.wheel.next > self.now {
            return false;
        }
        let due = match self.due(fi) {
            Some((_, EndCause::Idle)) if self.offload.is_some() => {
                let d = self.refresh_from_outside(fi);
                (d.0 <= self.now).then_some(d)
            }
            d => d,
        };
        match due {
            Some((at, cause)) => {
                self.remove_flow(fi, at, cause);
                true
            }
            None => false,
        }
    }

    /// Whether timer work is still pending for the engine's current time: entries of past
    /// seconds not yet examined (after a mass expiry, R9.4). Verdicts are exact either way;
    /// call [`Engine::advance_bounded`] until this is false to release the memory and ports.
    pub fn behind(&self) -> bool {
        self.wheel.next <= self.now || self.history.behind(self.now)
    }

    /// When the engine next has timer work, in the style of quinn's `poll_timeout`: the
    /// engine's own time while it is behind, else the first second with a queued flow timer,
    /// release-history expiry or event-aggregation summary; `None` when nothing is queued.
    /// A caller that calls [`Engine::advance_bounded`] at that time (or later) releases every
    /// port on time; verdicts are exact whenever it calls.
    pub fn next_deadline(&self) -> Option<Time> {
        if self.behind() {
            return Some(self.now);
        }
        [
            self.wheel.first_busy(),
            self.history.next_deadline(),
            self.agg.next_deadline(),
            self.nsg_next_deadline(),
            self.inbound_next_deadline(),
            self.takeover_next_deadline(),
            self.fence_next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Replaces the wheel by one spanning `span` seconds, with one entry per live flow at its
    /// deadline (after a change of timeouts).
    pub(super) fn rebuild_wheel(&mut self, span: u32) {
        let mut w = Wheel::new(span, self.now);
        w.next = self.wheel.next;
        let idle = self.topo.params.idle_timeout;
        for (fi, f) in self.flows.iter_live() {
            w.push(deadline(f, idle).0, fi, f.gen);
        }
        self.wheel = w;
    }
}
