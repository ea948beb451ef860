//! SNAT ports: the allocator, the per-destination release history, and blocks of chunks.
//!
//! - [`Engine::alloc`] chooses the port for a new flow (SPEC R2.3 preference, R2.6 exhaustion)
//!   from the instance's [`PortBlock`](super::block::PortBlock), the ports busy for the
//!   destination (from the flow table) and the [`ReleaseHistory`]: releases per destination
//!   within `port_reuse_history_secs`, so a port is not handed straight back to a server that
//!   may still hold TIME_WAIT for it.
//! - A public IP's SNAT range 1024–65535 (R2.4 decision) is cut into [`CHUNKS`] chunks of
//!   [`CHUNK`] ports; [`PipRt`] records which instance owns each chunk (blocks never overlap,
//!   R2.4) and the tier in force. [`Engine::grow_block`] hands out chunks up to the tier size
//!   (R2.4, R2.10); [`Engine::revoke_chunks`] takes chunks away and drops the flows on them
//!   (R1.4, R2.9).
//!
//! It does not decide tiers or which instances lose chunks (that is `plan`), and does not
//! index flows (that is `flows`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use hashbrown::HashTable;

use super::events::{EndCause, EventKind, ReclaimReason};
use super::fence::NoPort;
use super::flows::dest_hash;
use super::{Engine, NONE};
use crate::bits::Bits;
use crate::chunked::ChunkQueue;
use crate::hash::KeyedHash;
use crate::units::{Time, PORT_BASE};

/// Ports per chunk, the unit in which blocks are handed out (the smallest tier).
pub const CHUNK: u16 = 32;
/// Chunks in a public IP's range 1024–65535.
pub const CHUNKS: usize = (65536 - PORT_BASE as usize) / CHUNK as usize;
/// Chunk slots of one instance's block (1024 ports, the largest tier).
pub(super) const SLOTS: usize = 32;

/// Port state of one public IP used for PAT.
pub(super) struct PipRt {
    /// Owner instance slot per chunk (NONE = free).
    pub(super) owner: Vec<u32>,
    /// Pool size deciding the tier (effective, R2.11).
    pub(super) pool_size: u32,
    /// Ports per instance (the tier, R2.8).
    pub(super) ports: u16,
    pub(super) default_snat: bool,
}

/// Releases of one block's ports for one destination, oldest first: (local port, when).
pub(super) struct Hist {
    block: u32,
    dst: u32,
    dport: u16,
    q: VecDeque<(u16, Time)>,
}

impl Hist {
    /// Forgets releases at or beyond the horizon.
    fn forget_old(&mut self, now: Time, horizon: u32) {
        while self
            .q
            .front()
            .is_some_and(|&(_, t)| t.saturating_add(horizon) <= now)
        {
            self.q.pop_front();
        }
    }
}

/// Shards of the release history's table.
const HIST_SHARDS: usize = 64;

/// Upper bounds (exclusive) of each shard's share of the 32-bit space of a key's hash.
/// Shard `k` gets a share proportional to 2^(k/64): the shards' sizes are spread evenly over
/// one octave, so as the history grows they reach their (power-of-two) growth points one
/// after another instead of all rehashing in the same few calls (R9.4).
fn shard_bounds() -> [u64; HIST_SHARDS] {
    let w: Vec<f64> = (0..HIST_SHARDS)
        .map(|k| (k as f64 / HIST_SHARDS as f64).exp2())
        .collect();
    let total: f64 = w.iter().sum();
    let mut acc = 0.0;
    let mut b = [0u64; HIST_SHARDS];
    for (k, wk) in w.iter().enumerate() {
        acc += wk;
        b[k] = ((acc / total) * 4_294_967_296.0) as u64;
    }
    b[HIST_SHARDS - 1] = 1 << 32;
    b
}

/// Per-destination history of port releases within `port_reuse_history_secs` (R2.3 decision).
///
/// It holds at most `cap` releases (the gateway's flow limit, R9.2): churn to ever new
/// destinations cannot grow it without bound. When full, the oldest release is forgotten
/// first (its port then counts as never used for that destination, the order R2.3's
/// decision falls back to).
pub(super) struct ReleaseHistory {
    hasher: KeyedHash,
    /// Histories by destination, in [`HIST_SHARDS`] tables chosen by the key's hash: a table
    /// grows (rehashes) all at once, and a mass expiry records hundreds of thousands of new
    /// histories inside bounded timer steps (R9.4); sharded, one growth moves 1/64 of them.
    hists: Vec<HashTable<Hist>>,
    bounds: [u64; HIST_SHARDS],
    /// (when it falls out of the horizon, block, destination, port), in time order.
    /// Chunked, so growing never copies it inside one call (R9.4).
    expiry: ChunkQueue<(Time, u32, u32, u16)>,
    cap: usize,
}

impl ReleaseHistory {
    pub(super) fn new(hasher: KeyedHash) -> ReleaseHistory {
        ReleaseHistory {
            hasher,
            hists: (0..HIST_SHARDS).map(|_| HashTable::new()).collect(),
            bounds: shard_bounds(),
            expiry: ChunkQueue::new(),
            cap: usize::MAX,
        }
    }

    /// The shard of a key's hash, by bits 24–55: hashbrown takes the bucket from the low
    /// bits and the control tag from the top 7, which must stay spread within a shard.
    #[inline]
    fn shard(&self, dh: u64) -> usize {
        let x = (dh >> 24) & 0xffff_ffff;
        self.bounds.partition_point(|&b| b <= x)
    }

    /// Sets the most releases kept.
    pub(super) fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
    }

    /// Forgets the oldest release (the history is full).
    fn forget_oldest(&mut self) {
        let Some((_, block, dst, dport)) = self.expiry.pop_front() else {
            return;
        };
        let dh = dest_hash(&self.hasher, block, dst, dport);
        let sh = self.shard(dh);
        if let Ok(mut e) =
            self.hists[sh].find_entry(dh, |e| e.block == block && e.dst == dst && e.dport == dport)
        {
            let hh = e.get_mut();
            hh.q.pop_front();
            if hh.q.is_empty() {
                e.remove();
            }
        }
    }

    /// The history of `block` for (`dst`, `dport`), if it has one. `dh` is the key's hash
    /// ([`super::flows::FlowTable::dest_hash`]: the engine gives both tables the same key).
    #[inline]
    fn get_mut(&mut self, dh: u64, block: u32, dst: u32, dport: u16) -> Option<&mut Hist> {
        debug_assert_eq!(dh, dest_hash(&self.hasher, block, dst, dport));
        let sh = self.shard(dh);
        self.hists[sh].find_mut(dh, |e| e.block == block && e.dst == dst && e.dport == dport)
    }

    /// Records that local port `idx` of `block` was released for (`dst`, `dport`) at `at`.
    #[inline]
    pub(super) fn record(
        &mut self,
        block: u32,
        dst: u32,
        dport: u16,
        idx: u16,
        at: Time,
        horizon: u32,
    ) {
        if self.expiry.len() >= self.cap {
            self.forget_oldest();
        }
        let h = self.hasher;
        let dh = dest_hash(&h, block, dst, dport);
        let sh = self.shard(dh);
        match self.hists[sh].find_mut(dh, |e| e.block == block && e.dst == dst && e.dport == dport)
        {
            Some(hh) => hh.q.push_back((idx, at)),
            None => {
                let mut q = VecDeque::with_capacity(1);
                q.push_back((idx, at));
                self.hists[sh].insert_unique(
                    dh,
                    Hist {
                        block,
                        dst,
                        dport,
                        q,
                    },
                    |e| dest_hash(&h, e.block, e.dst, e.dport),
                );
            }
        }
        self.expiry
            .push_back((at.saturating_add(horizon), block, dst, dport));
    }

    /// Puts back a release of local port `idx` of `block` for (`dst`, `dport`) at `at` that
    /// the allocator had taken out (a stashed port given back unused, `stash`): in time order
    /// among the destination's releases, so the R2.3 order is the one it would have been.
    pub(super) fn restore(
        &mut self,
        block: u32,
        dst: u32,
        dport: u16,
        idx: u16,
        at: Time,
        horizon: u32,
    ) {
        if self.expiry.len() >= self.cap {
            self.forget_oldest();
        }
        let h = self.hasher;
        let dh = dest_hash(&h, block, dst, dport);
        let sh = self.shard(dh);
        match self.hists[sh].find_mut(dh, |e| e.block == block && e.dst == dst && e.dport == dport)
        {
            Some(hh) => {
                if hh.q.iter().any(|&(i, _)| i == idx) {
                    return;
                }
                let pos = hh.q.partition_point(|&(_, t)| t <= at);
                hh.q.insert(pos, (idx, at));
            }
            None => {
                self.hists[sh].insert_unique(
                    dh,
                    Hist {
                        block,
                        dst,
                        dport,
                        q: VecDeque::from([(idx, at)]),
                    },
                    |e| dest_hash(&h, e.block, e.dst, e.dport),
                );
            }
        }
        // Maybe out of time order in the expiry queue: then forgotten late, which never changes
        // a verdict (the allocator forgets a destination's old releases itself).
        self.expiry
            .push_back((at.saturating_add(horizon), block, dst, dport));
    }

    /// Takes the release of local port `idx` of `block` for (`dst`, `dport`) out of the
    /// history, if there is one (a port a fast path used without the allocator, `stash`: as
    /// the allocator does when it gives a port from the history).
    pub(super) fn take(&mut self, block: u32, dst: u32, dport: u16, idx: u16) {
        let dh = dest_hash(&self.hasher, block, dst, dport);
        let sh = self.shard(dh);
        if let Ok(mut e) =
            self.hists[sh].find_entry(dh, |e| e.block == block && e.dst == dst && e.dport == dport)
        {
            let hh = e.get_mut();
            if let Some(pos) = hh.q.iter().position(|&(i, _)| i == idx) {
                hh.q.remove(pos);
            }
            if hh.q.is_empty() {
                e.remove();
            }
        }
    }

    /// Forgets releases that fell out of the horizon by `now`, at most `budget` of them;
    /// drops emptied histories. Returns the budget left. Lagging here never changes a verdict:
    /// the allocator forgets a destination's old releases itself before using them.
    #[inline]
    pub(super) fn expire(&mut self, now: Time, horizon: u32, mut budget: u32) -> u32 {
        while let Some(&(at, block, dst, dport)) = self.expiry.front() {
            if at > now || budget == 0 {
                break;
            }
            budget -= 1;
            self.expiry.pop_front();
            let h = self.hasher;
            let dh = dest_hash(&h, block, dst, dport);
            let sh = self.shard(dh);
            if let Ok(mut e) = self.hists[sh]
                .find_entry(dh, |e| e.block == block && e.dst == dst && e.dport == dport)
            {
                let hh = e.get_mut();
                hh.forget_old(now, horizon);
                if hh.q.is_empty() {
                    e.remove();
                }
            }
        }
        budget
    }

    /// Number of shards (export works shard by shard, `persist`).
    pub(super) fn shards(&self) -> usize {
        self.hists.len()
    }

    /// The releases of shard `sh`: (block, destination, port, local port, when).
    pub(super) fn shard_entries(
        &self,
        sh: usize,
    ) -> impl Iterator<Item = (u32, u32, u16, u16, Time)> + '_ {
        self.hists[sh].iter().flat_map(|h| {
            h.q.iter()
                .map(move |&(i, at)| (h.block, h.dst, h.dport, i, at))
        })
    }

    /// Whether releases due to be forgotten by `now` are still queued.
    pub(super) fn behind(&self, now: Time) -> bool {
        self.expiry.front().is_some_and(|&(at, ..)| at <= now)
    }

    /// When the next release falls out of the horizon.
    pub(super) fn next_deadline(&self) -> Option<Time> {
        self.expiry.front().map(|&(at, ..)| at)
    }
}

impl Engine {
    /// Chooses a port of block `block_id` for a new flow to (`dst`, `dport`) — SPEC R2.3:
    /// a port the instance already uses (free for this destination) before a new one; within
    /// each group, a port with no release for this destination inside the history horizon
    /// first, else the one released for it longest ago. A port held toward the destination
    /// after a takeover (`takeover`, R10.4) counts as in use for it, a port held by
    /// [`Engine::hold_ports`] counts as in use for every destination, and a fenced instance
    /// takes only ports of its fence (`fence`, R10.4). A port stashed for the destination
    /// (`stash`) counts as in use for it. [`NoPort::Exhausted`] is exhaustion (R2.6);
    /// [`NoPort::Reserve`]: only the fence kept the flow from a port; [`NoPort::Stashed`]: no
    /// port, but the destination's stash holds some (a fast path may be opening flows on
    /// them; not an exhaustion).
    pub(super) fn alloc(&mut self, block_id: u32, dst: u32, dport: u16) -> Result<u16, NoPort> {
        self.alloc_inner(block_id, dst, dport, true).map(|(i, _)| i)
    }

    /// [`Engine::alloc`], also returning the release for the destination the port was taken
    /// from the history with, if it was (`stash` restores it when the port comes back).
    /// `reap`: reap the destination's due flows first ([`Engine::busy_toward`]); false only
    /// for a caller that just did (a stash taking many ports for one destination at once
    /// walks the destination's flows once, not once per port).
    #[inline(always)]
    pub(super) fn alloc_inner(
        &mut self,
        block_id: u32,
        dst: u32,
        dport: u16,
        reap: bool,
    ) -> Result<(u16, Option<Time>), NoPort> {
        let dh = self.flows.dest_hash(block_id, dst, dport);
        let active = if reap {
            self.busy_toward(dh, block_id, dst, dport)
        } else {
            self.flows.busy_ports(dh, block_id, dst, dport)
        };
        // After a takeover, ports held toward this remote endpoint count as in use for it
        // (`takeover`, R10.4); one `is_empty` check while no hold exists.
        let held = self.takeover_held(block_id, dst, dport);
        // Port holds (all destinations) and the instance's fence (`fence`, R10.4); two
        // `is_empty` checks while neither exists anywhere.
        let (port_held, fence) = self.fence_limits(block_id);
        // Ports stashed for this destination (`stash`); one `is_empty` check while no stash
        // exists.
        let stashed = self.stash_held(block_id, dst, dport);
        let stash_only = self.stash_only(block_id);
        let horizon = self.topo.params.reuse_history;
        let now = self.now;
        let mut hist = if horizon > 0 {
            self.history.get_mut(dh, block_id, dst, dport)
        } else {
            None
        };
        let mut recent = Bits::EMPTY;
        if let Some(hh) = hist.as_mut() {
            hh.forget_old(now, horizon);
            for &(i, _) in &hh.q {
                recent.set(i);
            }
        }
        let block = &mut self.blocks[block_id as usize];
        let from_hist = |set: &Bits, hist: &Option<&mut Hist>| -> Option<(u16, usize)> {
            let hh = hist.as_ref()?;
            hh.q.iter()
                .enumerate()
                .find(|(_, &(i, _))| set.get(i))
                .map(|(pos, &(i, _))| (i, pos))
        };
        // Ports not free for the destination: busy for it, held (either kind) or stashed for
        // it; then the fence. Without any hold, stash or fence (one node, R10.6) the sets are
        // computed as before the fence existed: no extra copies of the 128-byte sets on a new
        // flow's path.
        let limited = held.is_some() || port_held.is_some() || fence.is_some() || stashed.is_some();
        // Whether a port outside the fence would have been free (for `NoPort::Reserve`).
        let mut free_outside = false;
        let mut group_a = block.used.minus(&active);
        if limited {
            if let Some(h) = &held {
                group_a = group_a.minus(h);
            }
            if let Some(h) = &port_held {
                group_a = group_a.minus(h);
            }
            if let Some(h) = &stashed {
                group_a = group_a.minus(h);
            }
            if let Some(f) = &fence {
                free_outside |= group_a.any();
                group_a = group_a.and(f);
            }
        }
        // R2.3: ports a flow holds first; a port held only by stashes (for other
        // destinations) comes after them (`stash`; one `is_empty` check while none exists).
        if let Some(only) = &stash_only {
            let by_flows = group_a.minus(only);
            if by_flows.any() {
                group_a = by_flows;
            }
        }
        let (pick, hist_pos) = if group_a.any() {
            let fresh = group_a.minus(&recent);
            if let Some(i) = fresh.first_from(block.cursor) {
                block.cursor = i.wrapping_add(1) % crate::bits::CAPACITY as u16;
                (i, None)
            } else {
                let (i, pos) = from_hist(&group_a, &hist).ok_or(NoPort::Exhausted)?;
                (i, Some(pos))
            }
        } else {
            let mut group_b = block.owned.minus(&block.used);
            if limited {
                if let Some(h) = &held {
                    group_b = group_b.minus(h);
                }
                if let Some(h) = &port_held {
                    group_b = group_b.minus(h);
                }
                if let Some(h) = &stashed {
                    group_b = group_b.minus(h);
                }
                if let Some(f) = &fence {
                    free_outside |= group_b.any();
                    group_b = group_b.and(f);
                }
            }
            if !group_b.any() {
                // Refused because of the fence only if a port would have been free without it;
                // not exhausted while the destination's stash holds ports (`stash`).
                return Err(if free_outside {
                    NoPort::Reserve
                } else if stashed.is_some() {
                    NoPort::Stashed
                } else {
                    NoPort::Exhausted
                });
            }
            if group_b.minus(&recent).any() {
                (
                    block
                        .lru()
                        .find(|&i| !recent.get(i) && group_b.get(i))
                        .ok_or(NoPort::Exhausted)?,
                    None,
                )
            } else {
                let (i, pos) = from_hist(&group_b, &hist).ok_or(NoPort::Exhausted)?;
                (i, Some(pos))
            }
        };
        let released_at = match (hist_pos, hist.as_mut()) {
            (Some(pos), Some(hh)) => hh.q.remove(pos).map(|(_, at)| at),
            _ => None,
        };
        block.hold(pick);
        Ok((pick, released_at))
    }

    /// The local ports of block `block_id` busy for (`dst`, `dport`) (`dh`: the key's hash),
    /// exactly: while behind (R9.4) the destination's due flows are removed first, so whether
    /// a port is free for it (R2.6, R2.7) never depends on the timer step. At most one flow
    /// per port: ≤ 1024.
    #[inline]
    pub(super) fn busy_toward(&mut self, dh: u64, block_id: u32, dst: u32, dport: u16) -> Bits {
        if self.wheel.next <= self.now {
            for fi in self.flows.chain(dh, block_id, dst, dport) {
                self.reap_if_due(fi);
            }
        }
        self.flows.busy_ports(dh, block_id, dst, dport)
    }

    /// Lets go of a removed flow's port at `release_time`, remembering the release for its
    /// destination unless the port was reclaimed (R2.3 decision, R2.9).
    pub(super) fn release_port(
        &mut self,
        block_id: u32,
        dst: u32,
        dport: u16,
        idx: u16,
        release_time: Time,
        cause: EndCause,
    ) {
        let block = &mut self.blocks[block_id as usize];
        let owned = block.owned.get(idx);
        block.release(idx);
        let horizon = self.topo.params.reuse_history;
        if owned && horizon > 0 && cause != EndCause::Reclaimed {
            self.history
                .record(block_id, dst, dport, idx, release_time, horizon);
        }
    }

    /// Takes chunk slots away from instances and drops the flows on their ports (R1.4, R2.9).
    pub(super) fn revoke_chunks(
        &mut self,
        revoke: &[(u32, [bool; SLOTS], ReclaimReason)],
    ) -> usize {
        if revoke.is_empty() {
            return 0;
        }
        // Take the chunks away first, then drop the flows on them in one pass over the slab
        // (a tier change on a large fleet must not scan all flows once per instance).
        let mut masks: HashMap<u32, [bool; SLOTS]> = HashMap::new();
        let mut reclaimed: Vec<(u32, Arc<str>, u32, u32, ReclaimReason)> = Vec::new();
        for (slot, mask, _) in revoke {
            // Stashes with a port on a revoked chunk are voided (`stash`).
            self.stash_void_chunks(*slot, mask);
        }
        for (slot, mask, reason) in revoke {
            let mut ports = 0;
            for (s, &m) in mask.iter().enumerate() {
                if m && self.free_chunk_slot(*slot, s) {
                    ports += CHUNK as u32;
                }
            }
            let m = masks.entry(*slot).or_insert([false; SLOTS]);
            for (acc, &x) in m.iter_mut().zip(mask.iter()) {
                *acc |= x;
            }
            if ports > 0 {
                let inst = self.insts[*slot as usize].as_ref().expect("instance");
                reclaimed.push((
                    *slot,
                    inst.name.clone(),
                    inst.scenario.addr(),
                    ports,
                    *reason,
                ));
            }
        }
        let now = self.now;
        let mut per_slot: HashMap<u32, u32> = HashMap::new();
        for fi in 0..self.flows.slab_len() {
            let f = *self.flows.get(fi);
            if f.block == NONE {
                continue;
            }
            if masks
                .get(&f.slot())
                .is_some_and(|m| m[(f.idx / CHUNK) as usize])
            {
                self.remove_flow(fi, now, EndCause::Reclaimed);
                *per_slot.entry(f.slot()).or_default() += 1;
            }
        }
        for (slot, instance, public_ip, ports, reason) in reclaimed {
            let flows = per_slot.get(&slot).copied().unwrap_or(0);
            self.event(EventKind::PortsReclaimed {
                instance,
                public_ip,
                ports,
                flows,
                reason,
            });
        }
        per_slot.values().map(|&n| n as usize).sum()
    }

    /// Grows an instance's block to its public IP's tier size (R2.4, R2.10): free chunks,
    /// a contiguous run when one exists; never moves existing ports.
    pub(super) fn grow_block(&mut self, slot: u32) {
        let inst = self.insts[slot as usize].as_mut().expect("instance");
        let addr = inst.scenario.addr();
        let pip = self.pips.get_mut(&addr).expect("public ip planned");
        let want = (pip.ports / CHUNK) as usize;
        let have = inst.n_chunks();
        if have >= want {
            return;
        }
        let need = want - have;
        // Prefer a contiguous run of `need` free chunks; else the lowest free chunks.
        let mut run_start = None;
        let mut run = 0;
        for c in 0..CHUNKS {
            if pip.owner[c] == NONE {
                run += 1;
                if run == need {
                    run_start = Some(c + 1 - need);
                    break;
                }
            } else {
                run = 0;
            }
        }
        let picks: Vec<usize> = match run_start {
            Some(s) => (s..s + need).collect(),
            None => (0..CHUNKS)
                .filter(|&c| pip.owner[c] == NONE)
                .take(need)
                .collect(),
        };
        debug_assert_eq!(picks.len(), need, "tiers guarantee room (R2.8)");
        let free_slots: Vec<usize> = (0..SLOTS).filter(|&s| inst.chunks[s] == 0).collect();
        let grants: Vec<(usize, u16)> = free_slots
            .into_iter()
            .zip(picks)
            .map(|(s, c)| (s, PORT_BASE + c as u16 * CHUNK))
            .collect();
        self.grant_chunks(slot, &grants);
    }

    /// Gives chunk slot `s` of instance `slot`'s block back to its public IP; its ports leave
    /// both protocols' blocks (the caller removes flows on them, or has none). Returns whether
    /// the slot held a chunk.
    pub(super) fn free_chunk_slot(&mut self, slot: u32, s: usize) -> bool {
        let inst = self.insts[slot as usize].as_mut().expect("instance");
        let base = inst.chunks[s];
        if base == 0 {
            return false;
        }
        if let Some(pip) = self.pips.get_mut(&inst.scenario.addr()) {
            pip.owner[((base - PORT_BASE) / CHUNK) as usize] = NONE;
        }
        inst.chunks[s] = 0;
        for off in 0..CHUNK {
            let idx = s as u16 * CHUNK + off;
            self.blocks[slot as usize * 2].revoke(idx);
            self.blocks[slot as usize * 2 + 1].revoke(idx);
        }
        self.fence_block_changed(slot);
        true
    }

    /// Gives instance `slot` the chunks starting at port `base`, each into block slot `s`
    /// (`grants`: `(s, base)`, chunks free at its public IP). The ports join both protocols'
    /// blocks as never used, in ascending port order at the front of the free order.
    pub(super) fn grant_chunks(&mut self, slot: u32, grants: &[(usize, u16)]) {
        let inst = self.insts[slot as usize].as_mut().expect("instance");
        let pip = self
            .pips
            .get_mut(&inst.scenario.addr())
            .expect("public ip planned");
        let mut granted = Vec::with_capacity(grants.len() * CHUNK as usize);
        for &(s, base) in grants {
            pip.owner[((base - PORT_BASE) / CHUNK) as usize] = slot;
            inst.chunks[s] = base;
            granted.extend((0..CHUNK).map(|off| (base + off, s as u16 * CHUNK + off)));
        }
        // Never-used ports go to the front of the free order; granting the highest port first
        // leaves them in ascending port order there.
        granted.sort_unstable_by(|a, b| b.cmp(a));
        for (_, idx) in granted {
            self.blocks[slot as usize * 2].grant(idx);
            self.blocks[slot as usize * 2 + 1].grant(idx);
        }
        self.fence_block_changed(slot);
    }
}
