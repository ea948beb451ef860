//! The flow journal and activity seen outside the engine: what a fast path or a recorder needs.
//!
//! **Journal: the one channel of flow changes.** With [`Engine::set_journal`] on (or an offload
//! set, [`Engine::set_offload`]), every flow that starts, ends or is refused leaves a
//! [`FlowChange`] in one queue, in the order the engine decided them; the caller drains it
//! ([`Engine::drain_journal`]). Every consumer reads the same entries in the same order: a
//! kernel fast path (issue #9) installs a translation for each `Opened` and removes it for each
//! `Closed`; the planner's recorder (SPEC §8) writes the same records as a trace. A runtime
//! with both drains the queue once and hands each consumer every entry (`snatgw-runtime`
//! applies them to the kernel under the gateway lock and forwards them to the recorder).
//!
//! **R2.2 through the journal.** The engine never calls out while it decides: a fast path
//! learns of a flow's end from the `Closed` entry, queued *before* any `Opened` of a flow that
//! gets the released port, in the same queue. A consumer that applies entries in queue order
//! (batching consecutive entries of the same kind at most, never moving an entry past one of
//! the other kind) therefore never holds a released port's translation next to its new owner's;
//! one that applies them before the lock it decided them under is released (before any packet
//! of the new owner leaves) never translates with a port the engine has given to another flow.
//!
//! **Loss and resynchronisation.** The journal is bounded ([`JOURNAL_CAP`]); changes past the
//! cap are counted in [`Engine::journal_lost`] and not queued. A consumer that sees the count
//! grow has missed changes and must resynchronise: a fast path flushes its map and reinstalls
//! [`Engine::live_flow_keys`] (what is still queued then is older than that set and must not be
//! applied on top of it); a recorder counts the loss.
//!
//! **Activity outside the engine.** Packets a fast path translates never reach
//! [`Engine::process`], so the engine's `last_seen` lags: the offload's [`ActivitySource`] is
//! asked, synchronously (a read-only question), for a flow the engine finds idle-due, when its
//! last packet outside the engine was; a later time moves the flow's `last_seen` and re-queues
//! it, so keepalives that stay in the fast path keep the flow alive and the port is released
//! exactly `idle_timeout` seconds after the last packet in either path (R3.4, R3.5). Only
//! idle expiry asks. FIN and RST (R3.2, R3.3) a fast path translated itself reach the engine
//! as events ([`Engine::tcp_event_at`], issue #17) carrying the second the fast path saw the
//! packet, which starts the close timer, so close times are exact however late the event is
//! applied. A SYN without ACK reaches the engine as a packet (R3.1), or, when the fast path
//! opened its flow itself on a port the engine stashed for it (`stash`), as a record
//! ([`Engine::stash_opened`], applied at the fast path's second; its `Opened` says
//! `by_fast_path`). The source is asked on
//! removal paths only (timer expiry, reaping while behind); read-only lookups (ICMP errors,
//! listings) during a timer backlog (R9.4) may treat such a flow as gone until it is
//! re-checked — at most the backlog's duration. Packet counts from outside are credited per
//! instance with [`Engine::credit_packets`] (R6.1).
//!
//! This module does not talk to a kernel or a file: the engine stays sans-IO, the caller
//! applies the journal and the caller's source does the reading.

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
        /// When (for a flow a fast path opened, the second it saw the SYN).
        at: Time,
        /// The instance.
        instance: Arc<str>,
        /// The instance's slot (stable while the instance exists; indexes per-instance
        /// counters a fast path keeps, see [`Engine::credit_packets`]).
        slot: u32,
        /// The translation.
        key: FlowKey,
        /// The fast path opened the flow itself from a port stash and holds its entries
        /// already ([`Engine::stash_opened`], issue #17): nothing to install. False for every
        /// flow the engine opened (or restored) itself.
        by_fast_path: bool,
    },
    /// A flow ended and its port was released (R3.2–R3.5, R2.9 reclaim). Also journaled,
    /// with cause `reclaimed` and no `Opened` before it, for a flow a fast path opened from a
    /// port stash that the engine refused ([`Engine::stash_opened`]): its entries must go.
    /// `instance` is then empty and `slot` `u32::MAX` if no instance has `key.src`.
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

/// Where a fast path (a place outside the engine that translates packets of the engine's
/// flows) says when it last saw a flow: asked before the engine removes a flow as idle (R3.4).
/// A read-only question, answered synchronously. The fast path learns of flows from the
/// journal, not from here; the engine stays the only authority on every flow's start, port and
/// end.
pub trait ActivitySource: Send {
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
    /// Turning it off drops what is queued, unless an offload is set (an offload consumes the
    /// journal, so it stays on while one is set).
    pub fn set_journal(&mut self, on: bool) {
        self.journal.on = on;
        if !self.journaling() {
            self.journal.queue.clear();
        }
    }

    /// Whether flow changes are queued: the journal is on or an offload is set.
    fn journaling(&self) -> bool {
        self.journal.on || self.offload.is_some()
    }

    /// Moves the queued flow changes, oldest first, to the end of `out`.
    pub fn drain_journal(&mut self, out: &mut Vec<FlowChange>) {
        out.extend(self.journal.queue.drain(..));
    }

    /// Flow changes queued and not drained yet (a cheap check before draining).
    pub fn journal_pending(&self) -> usize {
        self.journal.queue.len()
    }

    /// Flow changes not journaled because the queue was full ([`JOURNAL_CAP`]).
    pub fn journal_lost(&self) -> u64 {
        self.journal.lost
    }

    /// Sets (or with `None` removes) an offload: a fast path outside the engine, which learns
    /// of flows from the journal (turned on while an offload is set) and is asked, through
    /// `activity`, for flows' last packets outside the engine before an idle flow is removed.
    /// Attaching to a running engine: the caller installs [`Engine::live_flow_keys`] first,
    /// then applies the journal from there (both under the same lock).
    pub fn set_offload(&mut self, activity: Option<Box<dyn ActivitySource>>) {
        self.offload = activity;
        if !self.journaling() {
            self.journal.queue.clear();
        }
    }

    /// Whether an offload is set.
    pub fn has_offload(&self) -> bool {
        self.offload.is_some()
    }

    /// Every live flow as the journal's `Opened` would carry it, `(instance slot, key)`: what a
    /// fast path installs when it attaches to a running engine or resynchronises after a loss
    /// ([`Engine::journal_lost`]). Walks the flow table.
    pub fn live_flow_keys(&self) -> impl Iterator<Item = (u32, FlowKey)> + '_ {
        self.flows
            .iter_live()
            .map(|(_, f)| (f.slot(), FlowKey::of(f)))
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

    pub(super) fn journal_opened(&mut self, fi: u32, at: Time, by_fast_path: bool) {
        if !self.journaling() {
            return;
        }
        let f = *self.flows.get(fi);
        let slot = f.slot();
        let Some(inst) = self.insts[slot as usize].as_ref() else {
            return;
        };
        let c = FlowChange::Opened {
            at,
            instance: inst.name.clone(),
            slot,
            key: FlowKey::of(&f),
            by_fast_path,
        };
        self.journal.push(c);
    }

    /// A `Closed` for a translation the engine has no flow of (a fast path's flow it refused,
    /// `stash`): `slot` may be free or `u32::MAX` (then `instance` is empty).
    pub(super) fn journal_closed_key(
        &mut self,
        at: Time,
        slot: u32,
        key: FlowKey,
        cause: EndCause,
    ) {
        if !self.journaling() {
            return;
        }
        let instance = match self.insts.get(slot as usize) {
            Some(Some(inst)) => inst.name.clone(),
            _ => Arc::from(""),
        };
        self.journal.push(FlowChange::Closed {
            at,
            instance,
            slot,
            key,
            cause,
        });
    }

    pub(super) fn journal_closed(&mut self, f: &Flow, at: Time, cause: EndCause) {
        if !self.journaling() {
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
        if !self.journaling() {
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
