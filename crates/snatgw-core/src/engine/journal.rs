//! The flow journal and activity seen outside the engine: what a fast path or a recorder needs.
//!
//! **Journal.** With [`Engine::set_journal`] on, every flow that starts, ends or is refused
//! leaves a [`FlowChange`] in a queue the caller drains after each call
//! ([`Engine::drain_journal`]). A kernel fast path (issue #9) installs a translation when a
//! flow opens and removes it when it closes, so it never translates with a port the engine has
//! released (R2.2); the planner's recorder (SPEC §8) writes the same records as a trace. The
//! journal is bounded ([`JOURNAL_CAP`]); changes past the cap are counted in
//! [`Engine::journal_lost`], and a consumer that sees the count grow must resynchronise from
//! [`Engine::flows_page`] (a fast path flushes its map).
//!
//! **Offload: a fast path outside the engine.** An [`Offload`] ([`Engine::set_offload`]) is
//! told synchronously of every flow that opens and closes (in the engine's order, inside the
//! call that decided it), so a kernel fast path installs and removes translations exactly when
//! the engine does. Packets it translates never reach [`Engine::process`], so the engine's
//! `last_seen` lags: the offload is asked, for a flow the engine finds idle-due, when its
//! last packet outside the engine was; a later time moves the flow's `last_seen` and re-queues
//! it, so keepalives that stay in the fast path keep the flow alive and the port is released
//! exactly `idle_timeout` seconds after the last packet in either path (R3.4, R3.5). Only
//! idle expiry asks: FIN and RST (R3.2, R3.3) always reach the engine (a fast path passes
//! packets with those flags up), so close times are the engine's own. The source is asked on
//! removal paths only (timer expiry, reaping while behind); read-only lookups (ICMP errors,
//! listings) during a timer backlog (R9.4) may treat such a flow as gone until it is
//! re-checked — at most the backlog's duration. Packet counts from outside are credited per
//! instance with [`Engine::credit_packets`] (R6.1).
//!
//! This module does not talk to a kernel or a file: the engine stays sans-IO, the caller's
//! source does the reading.

use std::collections::VecDeque;
use std::sync::Arc;

use super::events::EndCause;
use super::flows::Flow;
use super::stats::stats_bucket;
use super::Engine;
use crate::packet::DropReason;
use crate::units::Time;

/// Flow changes kept for the consumer before further ones are counted as lost.
pub const JOURNAL_CAP: usize = 1 << 20;

/// The addresses of one translation: the private 5-tuple and the public side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// Private source address.
    pub src: u32,
    /// Private source port.
    pub sport: u16,
    /// Remote address.
    pub dst: u32,
    /// Remote port.
    pub dport: u16,
    /// Public address the flow leaves with.
    pub public: u32,
    /// Public (SNAT) port.
    pub pport: u16,
}

impl FlowKey {
    pub(super) fn of(f: &Flow) -> FlowKey {
        FlowKey {
            proto: f.proto,
            src: f.src,
            sport: f.sport,
            dst: f.dst,
            dport: f.dport,
            public: f.public,
            pport: f.pport,
        }
    }
}

/// One entry of the flow journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowChange {
    /// A flow started and got its port (R2.1).
    Opened {
        /// When.
        at: Time,
        /// The instance.
        instance: Arc<str>,
        /// The instance's slot (stable while the instance exists; indexes per-instance
        /// counters a fast path keeps, see [`Engine::credit_packets`]).
        slot: u32,
        /// The translation.
        key: FlowKey,
    },
    /// A flow ended and its port was released (R3.2–R3.5, R2.9 reclaim).
    Closed {
        /// When the port was released (the flow's real deadline, also when reaped late).
        at: Time,
        /// The instance.
        instance: Arc<str>,
        /// The instance's slot.
        slot: u32,
        /// The translation.
        key: FlowKey,
        /// Why.
        cause: EndCause,
    },
    /// A new flow was refused (no port, R2.6; over a limit, R9.2). `key.public` is the address
    /// it would have used; `key.pport` is 0.
    Refused {
        /// When.
        at: Time,
        /// The instance.
        instance: Arc<str>,
        /// The instance's slot.
        slot: u32,
        /// What was asked for.
        key: FlowKey,
        /// Why.
        reason: DropReason,
    },
}

impl FlowChange {
    /// The translation the change is about.
    pub fn key(&self) -> &FlowKey {
        match self {
            FlowChange::Opened { key, .. }
            | FlowChange::Closed { key, .. }
            | FlowChange::Refused { key, .. } => key,
        }
    }
}

/// A place outside the engine that translates packets of the engine's flows (a kernel fast
/// path): told synchronously, in order, when a flow opens and when it closes, so it never holds
/// a translation the engine has released (R2.2), and asked for a flow's last activity before
/// the engine removes it as idle (R3.4). The engine stays the only authority: it decides every
/// flow's start, port and end; an offload only carries packets of flows it was given.
pub trait Offload: Send {
    /// Flow `key` of the instance at `slot` started: its packets may be translated outside the
    /// engine from now on.
    fn install(&mut self, slot: u32, key: &FlowKey);
    /// Flow `key` ended and its port is released: translate none of its packets any more.
    fn remove(&mut self, key: &FlowKey);
    /// The last time (engine seconds) a packet of `key`'s flow was seen outside the engine, in
    /// either direction, if any. Asked only for flows the engine finds idle-due.
    fn last_seen(&mut self, key: &FlowKey) -> Option<Time>;
}

/// Journal state of an engine.
#[derive(Default)]
pub(super) struct Journal {
    pub(super) on: bool,
    pub(super) queue: VecDeque<FlowChange>,
    pub(super) lost: u64,
}

impl Journal {
    fn push(&mut self, c: FlowChange) {
        if self.queue.len() >= JOURNAL_CAP {
            self.lost += 1;
        } else {
            self.queue.push_back(c);
        }
    }
}

impl Engine {
    /// Turns the flow journal on or off (off by default; see the module documentation).
    /// Turning it off drops what is queued.
    pub fn set_journal(&mut self, on: bool) {
        self.journal.on = on;
        if !on {
            self.journal.queue.clear();
        }
    }

    /// Moves the queued flow changes, oldest first, to the end of `out`.
    pub fn drain_journal(&mut self, out: &mut Vec<FlowChange>) {
        out.extend(self.journal.queue.drain(..));
    }

    /// Flow changes not journaled because the queue was full ([`JOURNAL_CAP`]).
    pub fn journal_lost(&self) -> u64 {
        self.journal.lost
    }

    /// Sets (or with `None` removes) the [`Offload`] told of flows and asked for activity
    /// outside the engine before an idle flow is removed. A new offload is given every live
    /// flow first (so it can be attached to a running engine); the one replaced is told of
    /// nothing more (its owner clears it).
    pub fn set_offload(&mut self, offload: Option<Box<dyn Offload>>) {
        self.offload = offload;
        if let Some(o) = self.offload.as_mut() {
            for (_, f) in self.flows.iter_live() {
                o.install(f.slot(), &FlowKey::of(f));
            }
        }
    }

    /// Whether an [`Offload`] is set.
    pub fn has_offload(&self) -> bool {
        self.offload.is_some()
    }

    /// Credits packets translated outside the engine (a fast path) to the instance at `slot`,
    /// protocol `proto` (R6.1). A slot with no instance is ignored.
    pub fn credit_packets(&mut self, slot: u32, proto: u8, out: u64, inb: u64) {
        if let Some(Some(i)) = self.insts.get_mut(slot as usize) {
            let st = &mut i.stats[stats_bucket(proto)];
            st.packets_out += out;
            st.packets_in += inb;
        }
    }

    /// Instance slots in use or free (slots are `0..instance_slots()`): how far per-slot
    /// counters kept outside the engine reach.
    pub fn instance_slots(&self) -> u32 {
        self.insts.len() as u32
    }

    /// The slot of the instance named `name` (what [`FlowChange`] carries).
    pub fn instance_slot(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    pub(super) fn journal_opened(&mut self, fi: u32) {
        if let Some(o) = self.offload.as_mut() {
            let f = self.flows.get(fi);
            o.install(f.slot(), &FlowKey::of(f));
        }
        if !self.journal.on {
            return;
        }
        let f = *self.flows.get(fi);
        let slot = f.slot();
        let Some(inst) = self.insts[slot as usize].as_ref() else {
            return;
        };
        let c = FlowChange::Opened {
            at: self.now,
            instance: inst.name.clone(),
            slot,
            key: FlowKey::of(&f),
        };
        self.journal.push(c);
    }

    pub(super) fn journal_closed(&mut self, f: &Flow, at: Time, cause: EndCause) {
        if let Some(o) = self.offload.as_mut() {
            o.remove(&FlowKey::of(f));
        }
        if !self.journal.on {
            return;
        }
        let slot = f.slot();
        let Some(inst) = self.insts[slot as usize].as_ref() else {
            return;
        };
        let c = FlowChange::Closed {
            at,
            instance: inst.name.clone(),
            slot,
            key: FlowKey::of(f),
            cause,
        };
        self.journal.push(c);
    }

    pub(super) fn journal_refused(&mut self, slot: u32, key: FlowKey, reason: DropReason) {
        if !self.journal.on {
            return;
        }
        let Some(inst) = self.insts[slot as usize].as_ref() else {
            return;
        };
        let c = FlowChange::Refused {
            at: self.now,
            instance: inst.name.clone(),
            slot,
            key,
            reason,
        };
        self.journal.push(c);
    }

    /// For a flow found due by idle: asks the activity source whether it was seen later
    /// outside the engine and, if so, moves its `last_seen` (never past the engine's time).
    /// Returns the flow's deadline afterwards.
    pub(super) fn refresh_from_outside(&mut self, fi: u32) -> (Time, EndCause) {
        let idle = self.topo.params.idle_timeout;
        let d = super::timers::deadline(self.flows.get(fi), idle);
        if d.1 != EndCause::Idle {
            return d;
        }
        let Some(src) = self.offload.as_mut() else {
            return d;
        };
        let key = FlowKey::of(self.flows.get(fi));
        match src.last_seen(&key) {
            Some(t) if t > self.flows.get(fi).last_seen => {
                let now = self.now;
                let f = self.flows.get_mut(fi);
                f.last_seen = t.min(now);
                super::timers::deadline(f, idle)
            }
            _ => d,
        }
    }
}
