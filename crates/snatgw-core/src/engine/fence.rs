//! Port fences and port holds: new flows of a fleet node's instance only on public ports its
//! runner-up has acknowledged, and after a takeover no such port for anyone until the FIN
//! timeout (SPEC R10.4, R3.2, R2.3, R2.6; issue #19).
//!
//! A fleet node replicates its instances' flows to the node that would take each instance
//! over (its runner-up, R10.4). A flow whose replication record is lost when the owner dies is
//! unknown to the taker, yet its remote peer may still hold the connection: giving its public
//! IP:port to a new flow toward that peer before the FIN timeout (R3.2) would show the peer a
//! reused 5-tuple. The takeover holds (`takeover`) catch such flows by their peer's traffic;
//! fences and port holds catch them by construction, without any traffic: the owner opens new
//! flows only on a small *port reserve* of the instance's block that its runner-up has
//! acknowledged, and the runner-up, taking over, holds every port of the last two reserves it
//! received. The fleet glue chooses, replicates and acknowledges the reserves; this module is
//! the engine's side.
//!
//! **What it does.**
//! - [`Engine::set_port_fence`] sets (or replaces, or with `None` lifts) the *fence* of one
//!   PAT instance: a public address and a set of its ports. While it is set, the allocator
//!   (`Engine::alloc`, new flows only, TCP and UDP alike) takes only ports of the instance's
//!   block that are in the fence; a fence naming another public address than the instance's
//!   allows nothing. Ports of the fence outside the block are ignored; the fence is kept as
//!   public ports and matched against the block as it is at each allocation (a block that
//!   loses chunks, R2.9, or moves, R1.4, never maps a fenced local port onto a port the fence
//!   does not name). Flows already open are not touched. Within the fence the allocator's
//!   rules are unchanged: flows to different destinations share ports (R2.3) and the
//!   preferences of R2.3 apply among the fenced ports (so a port new to the instance may be
//!   taken while a port it already uses outside the fence is free for the destination).
//! - A new flow that finds no port when some port of the block outside the fence would have
//!   been free for its destination (under the same rules and holds) is refused as
//!   [`DropReason::PortReserve`](crate::DropReason::PortReserve): dropped, counted
//!   ([`PortFenceStats::refusals`]) and journaled, but it is not an exhaustion (R2.6): no
//!   exhaustion event, not a failed SNAT connection, and never answered (R9.5), since the
//!   client's retransmission is served once the next reserve is acknowledged. A new flow
//!   that would have found no port without the fence either is exhausted exactly as before.
//! - [`Engine::hold_ports`] holds ports of a PAT instance's block against new flows toward
//!   *every* destination and both protocols until `now + secs` (the fleet calls it at a
//!   takeover with the last two reserves and the FIN timeout). A later call extends a hold,
//!   never shortens it. A hold ends exactly at its end second, as R3.2 releases a port: held
//!   at `end - 1`, usable at `end`. Holds are keyed by public address and port, like the
//!   takeover holds, so a hold applies to whichever instance owns the port when it allocates.
//! - [`Engine::port_fence_stats`] and [`TakeoverHoldStats::ports_held`](super::TakeoverHoldStats::ports_held)
//!   give the counters; [`Engine::pat_ports`] lists a block's public ports (from which the
//!   fleet draws reserves).
//!
//! **Bounds.** A port hold is one entry per public address and port, and ports are held only
//! while they lie in a PAT instance's block (at most 1024 per instance, R2.8): a port held
//! twice is one entry with the later end. A fence keeps its ports (at most the 64 512 of a
//! public address) and one 1024-bit set, for instances this node is told to fence.
//!
//! **Cost.** Nothing on an established flow's packet. A new flow of an instance pays two
//! `is_empty` checks while no fence and no port hold exist anywhere (a node without a fleet,
//! R10.6); else one hash lookup of its instance's fence and, while port holds exist, up to
//! one hash lookup per chunk of its block. Port holds are expired in the engine's bounded
//! timer step ([`Engine::advance_bounded`], one unit of the budget each, R9.4), in the order
//! of their ends, and their memory returned; verdicts never depend on that step having run
//! (the allocator compares each hold's end with the engine's time).
//!
//! **What it does not do.** It does not choose reserves, replicate or acknowledge them, nor
//! decide when to fence (the fleet glue does). Fences and port holds are not exported
//! ([`Engine::export_state`]): they do not survive a restart, and a node importing a replica
//! starts without them until its fleet glue sets them. A fence does not limit ILPIP instances
//! (R1.1: no block, no ports to reuse), inbound load-balancing flows, or flows restored by an
//! import. The fence is dropped with its instance; port holds stay with the public port.

use std::collections::BTreeSet;

use super::instance::InstRt;
use super::ports::{CHUNK, CHUNKS};
use super::Engine;
use crate::bits::Bits;
use crate::error::InvariantError;
use crate::units::{Time, PORT_BASE};

/// Counters of one PAT instance's port fence ([`Engine::port_fence_stats`], SPEC R10.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PortFenceStats {
    /// Whether a fence is set now.
    pub fenced: bool,
    /// New flows (TCP and UDP) that got a port since the instance was added: its `conn_ok`
    /// counters (R6.1), fenced or not.
    pub allocations: u64,
    /// New flows refused because of the fence ([`DropReason::PortReserve`](crate::DropReason::PortReserve))
    /// since the instance was added.
    pub refusals: u64,
    /// The instance's PAT address.
    pub public: u32,
    /// Ports in its block now (the same for TCP and UDP, R2.4, R2.5).
    pub block_ports: u32,
}

/// Why the allocator found no port for a new flow (`Engine::alloc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NoPort {
    /// Every port of the block is busy or held for the destination (R2.6).
    Exhausted,
    /// Only the fence kept the flow from a port (R10.4, `port_reserve`).
    Reserve,
    /// No port, but the destination's port stash holds some (`stash`): a fast path may be
    /// opening flows on them; dropped as `port_reserve`, not an exhaustion (R2.6).
    Stashed,
}

/// One instance's fence.
struct Fence {
    /// The public address the fence names.
    public: u32,
    /// Its ports from [`PORT_BASE`] on, ascending, without repeats.
    ports: Box<[u16]>,
    /// Those of them in the instance's block, as local ports (chunk slot × 32 + offset);
    /// recomputed whenever the block's chunks change ([`Engine::fence_block_changed`]).
    allowed: Bits,
}

/// Ends of the holds on one chunk's ports, by offset (0: no hold).
type ChunkEnds = [Time; CHUNK as usize];

/// Fences and port holds of the engine (see the module documentation).
#[derive(Default)]
pub(super) struct FenceRt {
    /// Fences by instance slot.
    fences: hashbrown::HashMap<u32, Fence>,
    /// Refusals because of the fence, by instance slot (kept when the fence is lifted).
    refusals: hashbrown::HashMap<u32, u64>,
    /// Port holds: public address -> chunk index of its range -> ends.
    holds: hashbrown::HashMap<u32, hashbrown::HashMap<u16, ChunkEnds>>,
    /// One entry per hold: (end, public address, port), for expiry in order of ends.
    queue: BTreeSet<(Time, u32, u16)>,
}

/// The ports of `ports` (ascending) that lie in `inst`'s block on `public`, as local ports.
fn local_ports(inst: &InstRt, public: u32, ports: &[u16]) -> Bits {
    let mut b = Bits::EMPTY;
    if !inst.scenario.is_pat() || inst.scenario.addr() != public {
        return b;
    }
    for (s, &base) in inst.chunks.iter().enumerate() {
        if base == 0 {
            continue;
        }
        let lo = ports.partition_point(|&p| p < base);
        let end = u32::from(base) + u32::from(CHUNK);
        for &p in ports[lo..].iter().take_while(|&&p| u32::from(p) < end) {
            b.set(s as u16 * CHUNK + (p - base));
        }
    }
    b
}

impl Engine {
    /// The PAT instance at `private_ip`: its slot and record.
    fn pat_instance(&self, private_ip: u32) -> Option<(u32, &InstRt)> {
        let &slot = self.by_private.get(&private_ip)?;
        let inst = self.insts[slot as usize].as_ref()?;
        inst.scenario.is_pat().then_some((slot, inst))
    }

    /// Port fence (SPEC R10.4, issue #19; see the module `fence`): while set, new flows (TCP
    /// and UDP) of the PAT instance at `private_ip` may take only public ports in `allowed`
    /// (on public address `public`); ports of `allowed` outside the instance's block are
    /// ignored; if `public` is not the instance's PAT address nothing is allowed. A new flow
    /// the fence alone keeps from a port is dropped as
    /// [`DropReason::PortReserve`](crate::DropReason::PortReserve). Setting a fence replaces
    /// the previous one; `None` lifts it. Returns false, changing nothing, if no PAT instance
    /// has that address (none at all, or an ILPIP, R1.1). Flows already open are not touched.
    /// The fence is dropped with the instance.
    pub fn set_port_fence(&mut self, private_ip: u32, fence: Option<(u32, &[u16])>) -> bool {
        let Some((slot, inst)) = self.pat_instance(private_ip) else {
            return false;
        };
        match fence {
            None => {
                self.fence.fences.remove(&slot);
            }
            Some((public, allowed)) => {
                let mut ports: Vec<u16> = allowed
                    .iter()
                    .copied()
                    .filter(|&p| p >= PORT_BASE)
                    .collect();
                ports.sort_unstable();
                ports.dedup();
                let allowed = local_ports(inst, public, &ports);
                self.fence.fences.insert(
                    slot,
                    Fence {
                        public,
                        ports: ports.into_boxed_slice(),
                        allowed,
                    },
                );
                // New flows of a fenced instance only on acknowledged ports: no stash.
                self.stash_void_instance(slot);
            }
        }
        true
    }

    /// Counters of the port fence of the PAT instance at `private_ip` (SPEC R10.4); `None` if
    /// no PAT instance has that address.
    pub fn port_fence_stats(&self, private_ip: u32) -> Option<PortFenceStats> {
        let (slot, inst) = self.pat_instance(private_ip)?;
        Some(PortFenceStats {
            fenced: self.fence.fences.contains_key(&slot),
            allocations: inst.stats[0].conn_ok + inst.stats[1].conn_ok,
            refusals: self.fence.refusals.get(&slot).copied().unwrap_or(0),
            public: inst.scenario.addr(),
            block_ports: self.blocks[slot as usize * 2].owned.count(),
        })
    }

    /// The PAT instance's public address and its block's public ports in ascending order
    /// (the same ports for TCP and UDP, R2.4, R2.5); `None` if no PAT instance has that
    /// address.
    pub fn pat_ports(&self, private_ip: u32) -> Option<(u32, Vec<u16>)> {
        let (_, inst) = self.pat_instance(private_ip)?;
        let mut bases: Vec<u16> = inst.chunks.iter().copied().filter(|&c| c != 0).collect();
        bases.sort_unstable();
        let ports = bases
            .into_iter()
            .flat_map(|base| (0..CHUNK).map(move |off| base + off))
            .collect();
        Some((inst.scenario.addr(), ports))
    }

    /// Port holds after a takeover (SPEC R10.4, R3.2; see the module `fence`): every port of
    /// `ports` (on `public`) that lies in the block of the PAT instance at `private_ip` is
    /// held against new flows toward any destination, TCP and UDP, until `now + secs`
    /// (extending a hold that ends earlier, never shortening one): held at `now + secs - 1`,
    /// usable at `now + secs`. Returns how many distinct ports are held by this call (0 if no
    /// PAT instance has that address, `public` is not its address, or `now + secs` is not
    /// after the engine's time). Holds are keyed by public address and port: they apply to
    /// whichever instance owns the port when it allocates, and outlive the instance.
    pub fn hold_ports(
        &mut self,
        private_ip: u32,
        public: u32,
        ports: &[u16],
        now: Time,
        secs: u32,
    ) -> usize {
        let Some((slot, inst)) = self.pat_instance(private_ip) else {
            return 0;
        };
        let (addr, chunks) = (inst.scenario.addr(), inst.chunks);
        let end = now.saturating_add(secs);
        if addr != public || end <= self.now {
            return 0;
        }
        // A held instance gets no stash (`stash`).
        self.stash_void_instance(slot);
        let t = &mut self.fence;
        let mut seen = Bits::EMPTY;
        let mut n = 0;
        for &port in ports {
            if port < PORT_BASE {
                continue;
            }
            let off = port - PORT_BASE;
            let base = port - off % CHUNK;
            let Some(s) = chunks.iter().position(|&c| c == base) else {
                continue;
            };
            let idx = s as u16 * CHUNK + off % CHUNK;
            if seen.get(idx) {
                continue;
            }
            seen.set(idx);
            n += 1;
            let ends = t
                .holds
                .entry(public)
                .or_default()
                .entry(off / CHUNK)
                .or_insert([0; CHUNK as usize]);
            let e = &mut ends[(off % CHUNK) as usize];
            if *e < end {
                if *e != 0 {
                    t.queue.remove(&(*e, public, port));
                }
                *e = end;
                t.queue.insert((end, public, port));
            }
        }
        n
    }

    /// What fences and port holds take from block `block_id` for new flows (the allocator's
    /// check): the local ports held by [`Engine::hold_ports`] at the engine's time (all
    /// destinations), and the local ports the instance's fence allows, if it is fenced.
    /// Costs two `is_empty` checks while no fence and no port hold exist.
    #[inline]
    pub(super) fn fence_limits(&self, block_id: u32) -> (Option<Bits>, Option<Bits>) {
        if self.fence.fences.is_empty() && self.fence.holds.is_empty() {
            return (None, None);
        }
        self.fence_limits_slow(block_id)
    }

    fn fence_limits_slow(&self, block_id: u32) -> (Option<Bits>, Option<Bits>) {
        let slot = block_id >> 1;
        let allowed = self.fence.fences.get(&slot).map(|f| f.allowed);
        (self.ports_held_slow(slot), allowed)
    }

    /// Whether instance `slot` has a fence, or ports of its block are held by
    /// [`Engine::hold_ports`] now (no stash is granted then, `stash`).
    pub(super) fn fence_applies(&self, slot: u32) -> bool {
        self.fence.fences.contains_key(&slot) || self.ports_held_slow(slot).is_some()
    }

    /// The local ports of instance `slot`'s block held by [`Engine::hold_ports`] now.
    fn ports_held_slow(&self, slot: u32) -> Option<Bits> {
        if self.fence.holds.is_empty() {
            return None;
        }
        let inst = self.insts[slot as usize].as_ref()?;
        let chunks = self.fence.holds.get(&inst.scenario.addr())?;
        let now = self.now;
        let mut held = Bits::EMPTY;
        for (s, &base) in inst.chunks.iter().enumerate() {
            if base == 0 {
                continue;
            }
            let Some(ends) = chunks.get(&((base - PORT_BASE) / CHUNK)) else {
                continue;
            };
            for (off, &end) in ends.iter().enumerate() {
                if end > now {
                    held.set(s as u16 * CHUNK + off as u16);
                }
            }
        }
        held.any().then_some(held)
    }

    /// A new flow of instance `slot` refused because of its fence (from `translate`).
    pub(super) fn fence_refused(&mut self, slot: u32) {
        *self.fence.refusals.entry(slot).or_default() += 1;
    }

    /// Port holds in force at the engine's time (for [`Engine::takeover_hold_stats`]).
    pub(super) fn ports_held_now(&self) -> u32 {
        let now = self.now;
        self.fence
            .holds
            .values()
            .flat_map(|chunks| chunks.values())
            .flatten()
            .filter(|&&end| end > now)
            .count() as u32
    }

    /// Instance `slot`'s block gained or lost chunks, or changed address (from `ports`):
    /// its fence's local ports are matched against the block again.
    pub(super) fn fence_block_changed(&mut self, slot: u32) {
        if self.fence.fences.is_empty() {
            return;
        }
        let Some(f) = self.fence.fences.get_mut(&slot) else {
            return;
        };
        f.allowed = match self.insts[slot as usize].as_ref() {
            Some(inst) => local_ports(inst, f.public, &f.ports),
            None => Bits::EMPTY,
        };
    }

    /// Instance `slot` is removed (from `plan`): its fence and refusal count go; port holds
    /// stay (they concern the public port, whoever owns it next).
    pub(super) fn fence_forget_instance(&mut self, slot: u32) {
        self.fence.fences.remove(&slot);
        self.fence.refusals.remove(&slot);
    }

    /// Expires port holds due by `now`, one budget unit each (from
    /// [`Engine::advance_bounded`]). Returns the budget left.
    pub(super) fn fence_expire(&mut self, now: Time, mut budget: u32) -> u32 {
        let t = &mut self.fence;
        while budget > 0 {
            let Some(&(end, public, port)) = t.queue.first() else {
                break;
            };
            if end > now {
                break;
            }
            budget -= 1;
            t.queue.pop_first();
            let off = port - PORT_BASE;
            let Some(chunks) = t.holds.get_mut(&public) else {
                debug_assert!(false, "queued port hold without an entry");
                continue;
            };
            if let Some(ends) = chunks.get_mut(&(off / CHUNK)) {
                ends[(off % CHUNK) as usize] = 0;
                if ends.iter().all(|&e| e == 0) {
                    chunks.remove(&(off / CHUNK));
                }
            }
            if chunks.is_empty() {
                t.holds.remove(&public);
            }
        }
        // Give the tables' memory back once every hold has expired.
        if t.queue.is_empty() && t.holds.capacity() > 0 {
            t.holds = Default::default();
        }
        budget
    }

    /// The first second with port-hold expiry work, if any.
    pub(super) fn fence_next_deadline(&self) -> Option<Time> {
        self.fence.queue.first().map(|&(end, ..)| end)
    }

    /// Checks fences and port holds (from [`Engine::check_invariants`]): fences belong to
    /// live instances and allow exactly their ports in the block as it is now, refusal counts
    /// belong to live instances, and every port hold has exactly one expiry entry at its end.
    pub(super) fn check_fence(&self) -> Result<(), InvariantError> {
        let t = &self.fence;
        let err = |m: String| Err(InvariantError::Cache(format!("fence: {m}")));
        for (&slot, f) in &t.fences {
            let Some(Some(inst)) = self.insts.get(slot as usize) else {
                return err(format!("fence of free slot {slot}"));
            };
            if f.ports.windows(2).any(|w| w[0] >= w[1])
                || f.ports.first().is_some_and(|&p| p < PORT_BASE)
            {
                return err(format!(
                    "fence of slot {slot}: ports not sorted or out of range"
                ));
            }
            if f.allowed != local_ports(inst, f.public, &f.ports) {
                return err(format!("fence of slot {slot} out of date with its block"));
            }
            if f.allowed.minus(&self.blocks[slot as usize * 2].owned).any() {
                return err(format!(
                    "fence of slot {slot} allows ports outside its block"
                ));
            }
        }
        for &slot in t.refusals.keys() {
            if !matches!(self.insts.get(slot as usize), Some(Some(_))) {
                return err(format!("refusal count of free slot {slot}"));
            }
        }
        let mut n = 0usize;
        for (&public, chunks) in &t.holds {
            if chunks.is_empty() {
                return err(format!("empty port-hold table for {public}"));
            }
            for (&c, ends) in chunks {
                if c as usize >= CHUNKS || ends.iter().all(|&e| e == 0) {
                    return err(format!(
                        "port-hold chunk {c} of {public} out of range or empty"
                    ));
                }
                for (off, &end) in ends.iter().enumerate() {
                    if end == 0 {
                        continue;
                    }
                    n += 1;
                    let port = PORT_BASE + c * CHUNK + off as u16;
                    if !t.queue.contains(&(end, public, port)) {
                        return err(format!(
                            "port hold {public}:{port} without its expiry entry"
                        ));
                    }
                }
            }
        }
        if n != t.queue.len() {
            return err(format!("{n} port holds, {} expiry entries", t.queue.len()));
        }
        Ok(())
    }
}
