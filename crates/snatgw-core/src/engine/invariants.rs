//! The engine's internal invariants, checked on demand by tests and the soak.
//!
//! [`Engine::check_invariants`] recomputes from the flow slab what the indexes, port blocks,
//! chunk owner maps and counters claim, and reports the first disagreement: public 5-tuples
//! unique (SPEC R2.2), ports inside the owner's block (R2.4) and owned, used-port sets and
//! reference counts matching the flows (R2.3), blocks within the tier and disjoint (R2.4, R2.8),
//! hot-destination caches matching their chains, and counters adding up (R6.1). Ports stashed
//! for a fast path (`stash`) count in the reference counts, one per stash holding them, and
//! must lie in their block and carry no flow to their stash's destination. It is a full
//! scan and never runs on the packet path; it changes nothing.

use std::collections::HashMap;

use super::flows::Flow;
use super::ports::CHUNK;
use super::Engine;
use crate::bits::Bits;
use crate::error::InvariantError;
use crate::units::PORT_BASE;

impl Engine {
    /// Checks internal invariants (for tests and the soak): uniqueness of public 5-tuples
    /// (R2.2), ports inside the owner's block (R2.4), used-port counts within the
    /// preallocation, disjoint blocks, that counters add up, that the takeover windows
    /// and holds are consistent and within their cap (`takeover`, R10.4), and that port
    /// stashes are (`stash`: in their block, counted in the reference counts, no flow to
    /// their destination on a stashed port). Returns the first violation.
    pub fn check_invariants(&self) -> Result<(), InvariantError> {
        let mut public = std::collections::HashSet::new();
        let mut live = 0u32;
        let mut per_block: HashMap<u32, HashMap<u16, u32>> = HashMap::new();
        for (_, f) in self.flows.iter_live() {
            live += 1;
            if !public.insert((f.proto, f.public, f.pport, f.dst, f.dport)) {
                return Err(InvariantError::DuplicateTuple(format!("{:?}", f)));
            }
            let inst = self.insts[f.slot() as usize]
                .as_ref()
                .ok_or_else(|| InvariantError::FlowPort("flow of a removed instance".into()))?;
            if inst.scenario.addr() != f.public {
                return Err(InvariantError::FlowPort(format!(
                    "flow on {} but instance {} uses {}",
                    f.public,
                    inst.name,
                    inst.scenario.addr()
                )));
            }
            let base = inst.chunks[(f.idx / CHUNK) as usize];
            if base == 0 || base + f.idx % CHUNK != f.pport {
                return Err(InvariantError::FlowPort(format!(
                    "port {} of {} outside its block",
                    f.pport, inst.name
                )));
            }
            if !self.blocks[f.block as usize].owned.get(f.idx) {
                return Err(InvariantError::FlowPort(format!(
                    "port {} of {} not owned",
                    f.pport, inst.name
                )));
            }
            *per_block
                .entry(f.block)
                .or_default()
                .entry(f.idx)
                .or_default() += 1;
        }
        // Stashed ports hold their block's ports as flows do (`stash`).
        let stash_holds = self.stash_holds();
        let mut stashed_per_block: HashMap<u32, u64> = HashMap::new();
        for (&bid, ports) in &stash_holds {
            for (&idx, &n) in ports {
                *per_block.entry(bid).or_default().entry(idx).or_default() += n;
                *stashed_per_block.entry(bid).or_default() += u64::from(n);
            }
        }
        if live != self.flows.live() {
            return Err(InvariantError::Counter(format!(
                "live count {} but {} flows",
                self.flows.live(),
                live
            )));
        }
        for (bid, block) in self.blocks.iter().enumerate() {
            let counts = per_block.remove(&(bid as u32)).unwrap_or_default();
            if block.used.count() as usize != counts.len() {
                return Err(InvariantError::Block(format!(
                    "block {bid}: used {} != distinct ports {}",
                    block.used.count(),
                    counts.len()
                )));
            }
            for (&i, &c) in &counts {
                if block.holders(i) != c {
                    return Err(InvariantError::Block(format!(
                        "block {bid}: port idx {i} refcount {} != {c}",
                        block.holders(i)
                    )));
                }
            }
            if block.used.count() > block.owned.count() && block.used.minus(&block.owned).any() {
                return Err(InvariantError::Block(format!(
                    "block {bid}: used ports outside the preallocation"
                )));
            }
            let lru: Vec<u16> = block.lru().collect();
            let unused = block.owned.minus(&block.used);
            if lru.len() != unused.count() as usize || lru.iter().any(|&i| !unused.get(i)) {
                return Err(InvariantError::Block(format!(
                    "block {bid}: free list does not match unused owned ports"
                )));
            }
        }
        // Disjoint blocks and owner maps.
        let mut owner: HashMap<(u32, u16), u32> = HashMap::new();
        for (slot, inst) in self.insts.iter().enumerate() {
            let Some(inst) = inst else { continue };
            if !inst.scenario.is_pat() {
                continue;
            }
            let pip = self.pips.get(&inst.scenario.addr()).ok_or_else(|| {
                InvariantError::Tier("PAT instance without public IP state".into())
            })?;
            if inst.n_chunks() as u16 * CHUNK > pip.ports && pip.ports >= CHUNK {
                return Err(InvariantError::Tier(format!(
                    "{} holds {} ports, tier is {}",
                    inst.name,
                    inst.n_chunks() as u16 * CHUNK,
                    pip.ports
                )));
            }
            for &b in inst.chunks.iter().filter(|&&b| b != 0) {
                if let Some(o) = owner.insert((inst.scenario.addr(), b), slot as u32) {
                    return Err(InvariantError::Tier(format!(
                        "chunk {b} owned by {o} and {slot}"
                    )));
                }
                if pip.owner[((b - PORT_BASE) / CHUNK) as usize] != slot as u32 {
                    return Err(InvariantError::Tier(format!(
                        "owner map disagrees for chunk {b}"
                    )));
                }
            }
        }
        // Per instance: connections made (or restored) minus flows ended equals live flows, per
        // protocol.
        for (slot, inst) in self.insts.iter().enumerate() {
            let Some(inst) = inst else { continue };
            for l in 0..2 {
                let st = &inst.stats[l];
                let ended: u64 = st.ended.iter().sum();
                let bid = (slot * 2 + l) as u32;
                let stashed = stashed_per_block.get(&bid).copied().unwrap_or(0);
                let live = self.blocks[slot * 2 + l].flows().saturating_sub(stashed);
                let made = st.conn_ok + st.restored;
                if made < ended || made - ended != live {
                    return Err(InvariantError::Counter(format!(
                        "{} {l}: conn_ok {} + restored {} - ended {ended} != live {live}",
                        inst.name, st.conn_ok, st.restored
                    )));
                }
            }
        }
        // Cached busy-port sets of hot destinations equal their chains.
        for hd in self.flows.hot_dests() {
            let mut chain = Bits::EMPTY;
            let mut n = 0;
            let same = |f: &&Flow| f.block == hd.block && f.dst == hd.dst && f.dport == hd.dport;
            for (_, f) in self.flows.iter_live().filter(|(_, f)| same(f)) {
                chain.set(f.idx);
                n += 1;
            }
            if chain != hd.active || n != hd.n {
                return Err(InvariantError::Cache(format!(
                    "hot destination cache out of date: {n} flows, cache {}",
                    hd.n
                )));
            }
        }
        let created = self.global.flows_created + self.global.flows_restored;
        let ended: u64 = self.global.flows_ended.iter().sum();
        if created - ended != self.flows.live() as u64 {
            return Err(InvariantError::Counter(format!(
                "created {created} - ended {ended} != live {}",
                self.flows.live()
            )));
        }
        // The idle-ended sets (`idle_reuse`) stay within their bound.
        for (p, set) in ["tcp", "udp"].iter().zip(&self.idle_recent.sets) {
            if set.len() > set.ring_len() || set.ring_len() > super::IDLE_RECENT_CAP {
                return Err(InvariantError::Cache(format!(
                    "idle-ended {p} set: {} keys, {} ring entries, cap {}",
                    set.len(),
                    set.ring_len(),
                    super::IDLE_RECENT_CAP
                )));
            }
        }
        // Takeover windows and holds (`takeover`, R10.4).
        self.check_takeover()?;
        // Port fences and port holds (`fence`, R10.4).
        self.check_fence()?;
        // Port stashes (`stash`).
        self.check_stash()
    }
}
