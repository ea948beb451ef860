//! Takeover holds: public ports of flows whose state did not arrive at a takeover (SPEC R10.4,
//! R3.2, R3.8; issue #19).
//!
//! When a fleet node takes over a dead node's instances it imports the flows that node
//! replicated ([`Engine::import_state`], R10.4). A flow whose replication record was lost is
//! unknown here, but its remote peer may still hold the connection: handing its public
//! IP:port to a new flow toward the same remote endpoint before the FIN timeout (R3.2, 240 s
//! by default) would show that endpoint a reused 5-tuple too soon. The evidence of such a flow
//! is the remote side's own traffic: an inbound packet to the taken instance's block that
//! matches no flow and no rule, which is dropped as unsolicited (R3.8).
//!
//! **What it does.**
//! - [`Engine::hold_after_takeover`] opens a *window* for one PAT instance, until `now + secs`
//!   (the fleet calls it with 240 right after importing the replica of an instance it took
//!   over). Calling it again replaces the window's end (0 s closes it).
//! - While an instance's window is open, an inbound TCP or UDP packet that is dropped as
//!   [`DropReason::UnsolicitedInbound`](crate::DropReason::UnsolicitedInbound) (R3.8, counted
//!   exactly as before) and whose destination public address:port lies in that instance's
//!   block records a *hold* on (public address, public port, protocol, remote address, remote
//!   port) until the packet's second plus the FIN timeout (`gateway.fin_timeout_secs`, R3.2).
//!   A later such packet extends it (the later of the two ends).
//! - The allocator (`Engine::alloc`, new flows only) treats a held port as in use for that
//!   remote endpoint: a new flow of the instance toward it gets another port, or is refused as
//!   exhausted (R2.6) when no other port is free for it. Flows to other destinations may still
//!   share the port (R2.3). A hold ends exactly at its end second, as R3.2 releases a port:
//!   held at `end - 1`, usable at `end`. Holds are keyed by public address and port, not by
//!   instance, so a hold also applies to whichever instance owns the port when it allocates.
//! - An outbound TCP segment that is not a SYN and matches no flow (dropped as `tcp_not_syn`,
//!   R3.1) from an instance in its window is counted as a lost flow's packet (its public port
//!   is unknown, so nothing is held).
//! - [`Engine::takeover_hold_stats`] gives the counters for metrics ([`TakeoverHoldStats`]).
//!
//! **Bounds.** An instance has at most [`TAKEOVER_HOLDS_PER_PORT`] × its block's ports holds
//! attributed to it (the instance whose block held the port when the hold was made): 4096 for
//! a 1024-port block. At the cap, a new hold is refused and counted
//! ([`TakeoverHoldStats::holds_refused_at_cap`]); the packet is still dropped and counted as
//! unsolicited, and existing holds are still extended (that takes no memory). A flood of
//! spoofed packets therefore cannot grow memory without bound, nor push out the holds made
//! earlier; at worst it makes new flows to the spoofed remote endpoints pick other ports.
//! Holds end at most `fin_timeout` after their window ends.
//!
//! **Cost.** Nothing on an established flow's packet. A new flow pays one `is_empty` check
//! while no hold exists, else one hash lookup of its destination; an unsolicited inbound
//! packet one `is_empty` check while no window is open. Windows and holds are expired in the
//! engine's bounded timer step ([`Engine::advance_bounded`], one unit of the budget each,
//! R9.4) and their memory returned; verdicts never depend on that step having run (the
//! allocator compares each hold's end with the engine's time). Holds are queued in the order
//! they are made, which is the order of their ends while `fin_timeout_secs` is unchanged; after
//! it is lowered, a newer hold's memory may wait for an older one's end.
//!
//! **What it does not do.** A lost flow whose peer stays silent through the window is not
//! detected, and its port may be given to a new flow toward that peer. Holds and windows are
//! not exported ([`Engine::export_state`]): they do not survive a restart of the taker. The
//! window does not itself refuse anything, and packets that are not TCP or UDP make no holds.

use std::collections::{BTreeSet, VecDeque};

use super::ports::CHUNK;
use super::{Engine, NONE};
use crate::bits::Bits;
use crate::error::InvariantError;
use crate::packet::{proto, Packet};
use crate::units::{Time, PORT_BASE};

/// Holds an instance may have per port of its block (see the module documentation).
pub const TAKEOVER_HOLDS_PER_PORT: u32 = 4;

/// Counters of takeover windows and holds ([`Engine::takeover_hold_stats`], SPEC R10.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TakeoverHoldStats {
    /// Instances whose takeover window is open now.
    pub windows_open: u32,
    /// Holds in force now (their end is after the engine's time).
    pub holds_active: u64,
    /// Holds made since the engine started (an extension is not a new hold).
    pub holds_total: u64,
    /// Holds refused because the instance had [`TAKEOVER_HOLDS_PER_PORT`] × its block's
    /// ports already (the packets were still dropped and counted as unsolicited, R3.8).
    pub holds_refused_at_cap: u64,
    /// Outbound TCP segments that were not a SYN and matched no flow (R3.1), from an instance
    /// in its takeover window: packets of flows whose state did not arrive.
    pub lost_flow_packets: u64,
    /// Public ports held against new flows toward every destination now
    /// ([`Engine::hold_ports`], the ports of a taken instance's last port reserves; `fence`).
    pub ports_held: u32,
}

/// A remote endpoint as seen from one public address: what the allocator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct DestKey {
    public: u32,
    remote: u32,
    rport: u16,
    proto: u8,
}

/// One held public port toward a [`DestKey`].
#[derive(Debug, Clone, Copy)]
struct Hold {
    pport: u16,
    /// First second the port is usable again.
    end: Time,
    /// The instance slot the hold counts against ([`NONE`] once that instance is gone).
    slot: u32,
}

/// The takeover state of the engine (see the module documentation).
#[derive(Default)]
pub(super) struct TakeoverRt {
    /// Open windows: instance slot -> first second the window is closed.
    windows: hashbrown::HashMap<u32, Time>,
    /// The same windows by end, for expiry.
    window_ends: BTreeSet<(Time, u32)>,
    /// Holds by remote endpoint, sorted by public port.
    holds: hashbrown::HashMap<DestKey, Vec<Hold>>,
    /// One entry per hold: (its end when queued, key, port); re-queued at its real end when
    /// it was extended since (lazy re-check).
    queue: VecDeque<(Time, DestKey, u16)>,
    /// Holds counted against each instance slot (for the cap).
    per_slot: hashbrown::HashMap<u32, u32>,
    holds_total: u64,
    refused: u64,
    lost_flow_packets: u64,
}

impl Engine {
    /// Opens (or replaces) the takeover window of the PAT instance at `private_ip` until
    /// `now + secs` (SPEC R10.4; see the module `takeover`): while it is open, unsolicited
    /// inbound TCP/UDP packets to the instance's block hold their public port against new
    /// flows toward their sender for the FIN timeout (R3.2, R3.8). `secs` = 0 closes the
    /// window. Returns false, changing nothing, if no instance has that address or it is not
    /// a PAT instance (an ILPIP has no block, R1.1).
    pub fn hold_after_takeover(&mut self, private_ip: u32, now: Time, secs: u32) -> bool {
        let Some(&slot) = self.by_private.get(&private_ip) else {
            return false;
        };
        match self.insts[slot as usize].as_ref() {
            Some(i) if i.scenario.is_pat() => {}
            _ => return false,
        }
        let end = now.saturating_add(secs);
        let t = &mut self.takeover;
        if let Some(old) = t.windows.remove(&slot) {
            t.window_ends.remove(&(old, slot));
        }
        if secs > 0 && end > self.now {
            t.windows.insert(slot, end);
            t.window_ends.insert((end, slot));
            // An instance in its takeover window gets no stash (`stash`).
            self.stash_void_instance(slot);
        }
        true
    }

    /// Counters of takeover windows and holds, and of port holds ([`Engine::hold_ports`]),
    /// for metrics (SPEC R10.4). Counting the holds in force scans them (at most
    /// [`TAKEOVER_HOLDS_PER_PORT`] × 1024 per instance, and one per held port); it is never
    /// on the packet path.
    pub fn takeover_hold_stats(&self) -> TakeoverHoldStats {
        let now = self.now;
        let t = &self.takeover;
        TakeoverHoldStats {
            windows_open: t.windows.values().filter(|&&end| end > now).count() as u32,
            holds_active: t.holds.values().flatten().filter(|h| h.end > now).count() as u64,
            holds_total: t.holds_total,
            holds_refused_at_cap: t.refused,
            lost_flow_packets: t.lost_flow_packets,
            ports_held: self.ports_held_now(),
        }
    }

    /// When the hold on public `pport` of `public` toward (`remote`, `rport`) for IP protocol
    /// `p` ends (the first second the port is usable for that endpoint again), if one is in
    /// force at the engine's time.
    pub fn takeover_hold_until(
        &self,
        p: u8,
        public: u32,
        pport: u16,
        remote: u32,
        rport: u16,
    ) -> Option<Time> {
        let key = DestKey {
            public,
            remote,
            rport,
            proto: p,
        };
        let v = self.takeover.holds.get(&key)?;
        let i = v.binary_search_by_key(&pport, |h| h.pport).ok()?;
        (v[i].end > self.now).then_some(v[i].end)
    }

    /// Whether instance `slot`'s takeover window is open at the engine's time.
    #[inline]
    pub(super) fn takeover_window_open(&self, slot: u32) -> bool {
        self.takeover
            .windows
            .get(&slot)
            .is_some_and(|&end| end > self.now)
    }

    /// An inbound packet about to be dropped as unsolicited (R3.8, from `inbound`): records
    /// or extends a hold if its destination port lies in the block of an instance in its
    /// window. Costs one `is_empty` check while no window is open.
    #[inline]
    pub(super) fn takeover_unsolicited(&mut self, p: &Packet) {
        if self.takeover.windows.is_empty() || (p.proto != proto::TCP && p.proto != proto::UDP) {
            return;
        }
        self.takeover_record(p);
    }

    fn takeover_record(&mut self, p: &Packet) {
        if p.dst_port < PORT_BASE {
            return;
        }
        let Some(pip) = self.pips.get(&p.dst) else {
            return;
        };
        let Some(&slot) = pip.owner.get(((p.dst_port - PORT_BASE) / CHUNK) as usize) else {
            return;
        };
        if slot == NONE || !self.takeover_window_open(slot) {
            return;
        }
        let now = self.now;
        let end = now.saturating_add(self.topo.params.fin_timeout);
        let key = DestKey {
            public: p.dst,
            remote: p.src,
            rport: p.src_port,
            proto: p.proto,
        };
        let cap = TAKEOVER_HOLDS_PER_PORT * self.blocks[slot as usize * 2].owned.count();
        let t = &mut self.takeover;
        let v = t.holds.entry(key).or_default();
        let pos = match v.binary_search_by_key(&p.dst_port, |h| h.pport) {
            Ok(i) => {
                // Already held (maybe ended and not yet expired: then a new hold, counted).
                if v[i].end <= now {
                    t.holds_total += 1;
                }
                v[i].end = v[i].end.max(end);
                return;
            }
            Err(pos) => pos,
        };
        let n = t.per_slot.entry(slot).or_default();
        if *n >= cap {
            t.refused += 1;
            if v.is_empty() {
                t.holds.remove(&key);
            }
            if t.per_slot.get(&slot) == Some(&0) {
                t.per_slot.remove(&slot);
            }
            return;
        }
        *n += 1;
        v.insert(
            pos,
            Hold {
                pport: p.dst_port,
                end,
                slot,
            },
        );
        t.queue.push_back((end, key, p.dst_port));
        t.holds_total += 1;
    }

    /// An outbound TCP segment that is not a SYN and matches no flow (R3.1, from
    /// `outbound_new`): counted if its instance is in its takeover window.
    #[inline]
    pub(super) fn takeover_not_syn(&mut self, slot: u32) {
        if !self.takeover.windows.is_empty() && self.takeover_window_open(slot) {
            self.takeover.lost_flow_packets += 1;
        }
    }

    /// The local ports of block `block_id` held toward (`dst`, `dport`) at the engine's
    /// time, if any hold exists at all (the allocator's check, new flows only). Costs one
    /// `is_empty` check while no hold exists.
    #[inline]
    pub(super) fn takeover_held(&self, block_id: u32, dst: u32, dport: u16) -> Option<Bits> {
        if self.takeover.holds.is_empty() {
            return None;
        }
        self.takeover_held_slow(block_id, dst, dport)
    }

    fn takeover_held_slow(&self, block_id: u32, dst: u32, dport: u16) -> Option<Bits> {
        let slot = block_id >> 1;
        let inst = self.insts[slot as usize].as_ref()?;
        let public = inst.scenario.addr();
        let key = DestKey {
            public,
            remote: dst,
            rport: dport,
            proto: if block_id & 1 == 0 {
                proto::TCP
            } else {
                proto::UDP
            },
        };
        let v = self.takeover.holds.get(&key)?;
        let pip = self.pips.get(&public)?;
        let now = self.now;
        let mut held = Bits::EMPTY;
        // Holds are sorted by port: consecutive ones in one chunk share the lookup.
        let mut last: Option<(u16, Option<u16>)> = None;
        for h in v.iter().filter(|h| h.end > now) {
            let off = h.pport - PORT_BASE;
            let base = h.pport - off % CHUNK;
            let s = match last {
                Some((b, s)) if b == base => s,
                _ => {
                    let mine = pip.owner.get((off / CHUNK) as usize) == Some(&slot);
                    let s = mine
                        .then(|| inst.chunks.iter().position(|&c| c == base))
                        .flatten()
                        .map(|s| s as u16);
                    last = Some((base, s));
                    s
                }
            };
            if let Some(s) = s {
                held.set(s * CHUNK + off % CHUNK);
            }
        }
        held.any().then_some(held)
    }

    /// Expires windows and holds due by `now`, one budget unit each (from
    /// [`Engine::advance_bounded`]). Returns the budget left.
    pub(super) fn takeover_expire(&mut self, now: Time, mut budget: u32) -> u32 {
        let t = &mut self.takeover;
        while budget > 0 {
            let Some(&(end, slot)) = t.window_ends.first() else {
                break;
            };
            if end > now {
                break;
            }
            budget -= 1;
            t.window_ends.pop_first();
            t.windows.remove(&slot);
        }
        while budget > 0 {
            let Some(&(at, key, pport)) = t.queue.front() else {
                break;
            };
            if at > now {
                break;
            }
            budget -= 1;
            t.queue.pop_front();
            let Some(v) = t.holds.get_mut(&key) else {
                debug_assert!(false, "queued hold without an entry");
                continue;
            };
            let Ok(i) = v.binary_search_by_key(&pport, |h| h.pport) else {
                debug_assert!(false, "queued hold without an entry");
                continue;
            };
            let h = v[i];
            if h.end > now {
                t.queue.push_back((h.end, key, pport));
                continue;
            }
            v.remove(i);
            if v.is_empty() {
                t.holds.remove(&key);
            }
            if h.slot != NONE {
                if let Some(n) = t.per_slot.get_mut(&h.slot) {
                    *n -= 1;
                    if *n == 0 {
                        t.per_slot.remove(&h.slot);
                    }
                }
            }
        }
        // After a flood has expired, give the tables' memory back too (hash tables and
        // queues keep their capacity when emptied; freeing an empty one costs no rehash).
        if t.queue.is_empty() && t.queue.capacity() > 0 {
            t.queue = VecDeque::new();
            t.holds = Default::default();
            t.per_slot = Default::default();
        }
        budget
    }

    /// The first second with takeover expiry work, if any.
    pub(super) fn takeover_next_deadline(&self) -> Option<Time> {
        let t = &self.takeover;
        let w = t.window_ends.first().map(|&(end, _)| end);
        let h = t.queue.front().map(|&(at, ..)| at);
        w.into_iter().chain(h).min()
    }

    /// Instance `slot` is removed (from `plan`): its window closes; its holds stay in force
    /// (they concern the public 5-tuple, whoever owns the port next) but count against no
    /// instance, so a new instance in the slot starts with none.
    pub(super) fn takeover_forget_instance(&mut self, slot: u32) {
        let t = &mut self.takeover;
        if let Some(end) = t.windows.remove(&slot) {
            t.window_ends.remove(&(end, slot));
        }
        if t.per_slot.remove(&slot).is_some() {
            for h in t.holds.values_mut().flatten().filter(|h| h.slot == slot) {
                h.slot = NONE;
            }
        }
    }

    /// Checks the takeover state (from [`Engine::check_invariants`]): windows and their end
    /// index agree and belong to PAT instances, hold lists are sorted, unique and non-empty,
    /// every hold has one expiry entry, and per-instance counts match the holds and stay
    /// within the cap of the largest block.
    pub(super) fn check_takeover(&self) -> Result<(), InvariantError> {
        let t = &self.takeover;
        let err = |m: String| Err(InvariantError::Cache(format!("takeover: {m}")));
        if t.windows.len() != t.window_ends.len()
            || t.window_ends
                .iter()
                .any(|(end, slot)| t.windows.get(slot) != Some(end))
        {
            return err("window index disagrees with the windows".into());
        }
        for &slot in t.windows.keys() {
            match self.insts.get(slot as usize) {
                Some(Some(_)) => {}
                _ => return err(format!("window of free slot {slot}")),
            }
        }
        let mut counts: hashbrown::HashMap<u32, u32> = hashbrown::HashMap::new();
        let mut n = 0usize;
        for (k, v) in &t.holds {
            if v.is_empty() {
                return err("empty hold list".into());
            }
            if v.windows(2).any(|w| w[0].pport >= w[1].pport) {
                return err("hold list not sorted or not unique".into());
            }
            if k.proto != proto::TCP && k.proto != proto::UDP {
                return err(format!("hold for protocol {}", k.proto));
            }
            for h in v {
                if h.pport < PORT_BASE {
                    return err(format!("hold on port {}", h.pport));
                }
                if h.slot != NONE {
                    *counts.entry(h.slot).or_default() += 1;
                }
            }
            n += v.len();
        }
        if n != t.queue.len() {
            return err(format!("{n} holds, {} expiry entries", t.queue.len()));
        }
        if counts != t.per_slot {
            return err("per-instance hold counts disagree with the holds".into());
        }
        let max = TAKEOVER_HOLDS_PER_PORT * crate::bits::CAPACITY as u32;
        if let Some((slot, c)) = counts.iter().find(|(_, &c)| c > max) {
            return err(format!("slot {slot} has {c} holds, more than {max}"));
        }
        Ok(())
    }
}
