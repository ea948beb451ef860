//! The flow table: the slab of flow records and the indexes that find them.
//!
//! Flows live in a slab of 48-byte [`Flow`] records (free slots are chained into a free list
//! through `next`; a generation number, bumped on every removal, lets the timer wheel recognise
//! entries of a slot that has been reused). Three keyed hash tables of `u32` slab indices find
//! them:
//! - by private 5-tuple (outbound lookups);
//! - by public 5-tuple (inbound lookups; at most one flow per public 5-tuple, SPEC R2.2);
//! - by (block, destination endpoint): the head of a doubly linked chain (`prev`/`next`) of that
//!   destination's flows, which gives the ports busy for it (R2.3: a flow needs a port no other
//!   flow to the same destination holds). A destination with [`HOT_MIN`] or more flows from one
//!   block also gets a cached bitset of its busy ports ([`HotDest`]), kept in step on insert and
//!   remove, so allocating for a hot destination does not walk a long chain.
//!
//! The hash is keyed ([`KeyedHash`]) because inbound keys are partly chosen by remote hosts.
//! This module does not choose ports, hold port reference counts, run timers or count anything
//! but live flows: the engine pairs every insert and remove here with the port, timer and
//! counter updates (`Engine::insert_flow`, `Engine::remove_flow`).
//!
//! `find_fwd` and `find_rev` are the per-packet probes and are `#[inline]`. So are `insert`,
//! `remove` and `busy_ports`, though not per-packet: each has one caller in another module, and
//! with several codegen units a non-inline function is not inlined into another module's code,
//! which made every new flow pay extra calls (measured with callgrind after the engine split).

use hashbrown::HashTable;

use super::NONE;
use crate::bits::Bits;
use crate::hash::KeyedHash;
use crate::units::Time;

/// One live translation (or a free slab slot when `block` is [`NONE`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Flow {
    /// Private source address.
    pub(super) src: u32,
    /// Destination (remote) address.
    pub(super) dst: u32,
    /// Public address the flow leaves with.
    pub(super) public: u32,
    /// Index of the [`super::block::PortBlock`] the port is taken from (instance slot × 2 +
    /// protocol, see [`Flow::slot`]); [`NONE`] marks a free slot.
    pub(super) block: u32,
    /// Generation of the slot, bumped when the flow is removed (stale timer entries).
    pub(super) gen: u32,
    /// Previous flow in the destination chain ([`NONE`] at the head).
    pub(super) prev: u32,
    /// Next flow in the destination chain; in a free slot, the next free slot.
    pub(super) next: u32,
    /// Last packet, either direction.
    pub(super) last_seen: Time,
    /// When a FIN-both or RST closes the flow (0 = not closing), R3.2, R3.3.
    pub(super) close_at: Time,
    /// Private source port.
    pub(super) sport: u16,
    /// Destination port.
    pub(super) dport: u16,
    /// Public (SNAT) port.
    pub(super) pport: u16,
    /// Local index of the port in the instance's block.
    pub(super) idx: u16,
    /// IP protocol number.
    pub(super) proto: u8,
    /// TCP state bits (see `tcp`).
    pub(super) state: u8,
    /// The low 16 bits of the second the flow started (set by `Engine::insert_flow`; it
    /// fills what was padding): whether a UDP flow ending by idle timeout carried packets in
    /// more than one second (`idle_reuse`).
    pub(super) born: u16,
}

// The record stays 48 bytes (`born` took the padding).
const _: () = assert!(std::mem::size_of::<Flow>() == 48);

impl Flow {
    pub(super) const FREE: Flow = Flow {
        src: 0,
        dst: 0,
        public: 0,
        block: NONE,
        gen: 0,
        prev: NONE,
        next: NONE,
        last_seen: 0,
        close_at: 0,
        sport: 0,
        dport: 0,
        pport: 0,
        idx: 0,
        proto: 0,
        state: 0,
        born: 0,
    };

    /// The instance slot owning the flow's block.
    #[inline]
    pub(super) fn slot(&self) -> u32 {
        self.block >> 1
    }
}

/// Chain length from which a destination's busy ports are kept as a bitset.
pub(super) const HOT_MIN: u32 = 16;

/// Ports busy for a destination with many flows from one block: avoids walking a long
/// chain on every allocation (one hot destination would otherwise cost O(flows) per new flow).
pub(super) struct HotDest {
    pub(super) block: u32,
    pub(super) dst: u32,
    pub(super) dport: u16,
    /// Flows in the chain.
    pub(super) n: u32,
    /// Local port indices the chain's flows hold.
    pub(super) active: Bits,
}

#[inline]
fn fwd_hash(h: &KeyedHash, p: u8, src: u32, sport: u16, dst: u32, dport: u16) -> u64 {
    h.hash(
        ((src as u64) << 32) | dst as u64,
        ((sport as u64) << 24) | ((dport as u64) << 8) | p as u64,
    )
}
/// Hash of a (block, destination endpoint) key: the destination chains, the hot-destination
/// cache and the release history (`ports`) use it.
#[inline]
pub(super) fn dest_hash(h: &KeyedHash, block: u32, dst: u32, dport: u16) -> u64 {
    h.hash(
        ((block as u64) << 32) | dst as u64,
        (dport as u64) | (1 << 40),
    )
}
#[inline]
fn fwd_of(h: &KeyedHash, f: &Flow) -> u64 {
    fwd_hash(h, f.proto, f.src, f.sport, f.dst, f.dport)
}
#[inline]
fn rev_of(h: &KeyedHash, f: &Flow) -> u64 {
    fwd_hash(h, f.proto, f.public, f.pport, f.dst, f.dport)
}
#[inline]
fn dest_of(h: &KeyedHash, f: &Flow) -> u64 {
    dest_hash(h, f.block, f.dst, f.dport)
}

/// The slab and its indexes. See the module documentation.
pub(super) struct FlowTable {
    hasher: KeyedHash,
    slab: Vec<Flow>,
    free_head: u32,
    live: u32,
    fwd: HashTable<u32>,
    rev: HashTable<u32>,
    dests: HashTable<u32>,
    hot: HashTable<HotDest>,
}

impl FlowTable {
    pub(super) fn new(hasher: KeyedHash) -> FlowTable {
        FlowTable {
            hasher,
            slab: Vec::new(),
            free_head: NONE,
            live: 0,
            fwd: HashTable::new(),
            rev: HashTable::new(),
            dests: HashTable::new(),
            hot: HashTable::new(),
        }
    }

    /// Reserves room for `n` flows (avoids rehashing during a burst).
    pub(super) fn reserve(&mut self, n: usize) {
        let h = self.hasher;
        self.slab.reserve(n);
        let flows = &self.slab;
        self.fwd.reserve(n, |&i| fwd_of(&h, &flows[i as usize]));
        self.rev.reserve(n, |&i| rev_of(&h, &flows[i as usize]));
        self.dests.reserve(n, |&i| dest_of(&h, &flows[i as usize]));
    }

    /// Number of live flows.
    pub(super) fn live(&self) -> u32 {
        self.live
    }

    /// The record in slot `fi` (live or free).
    #[inline]
    pub(super) fn get(&self, fi: u32) -> &Flow {
        &self.slab[fi as usize]
    }

    /// The record in slot `fi`, to update `last_seen` or TCP state. Key fields must not change.
    #[inline]
    pub(super) fn get_mut(&mut self, fi: u32) -> &mut Flow {
        &mut self.slab[fi as usize]
    }

    /// Slots in the slab, live or free (valid indices are `0..slab_len()`).
    pub(super) fn slab_len(&self) -> u32 {
        self.slab.len() as u32
    }

    /// Live flows with their slot, in slab order.
    pub(super) fn iter_live(&self) -> impl Iterator<Item = (u32, &Flow)> + '_ {
        self.slab
            .iter()
            .enumerate()
            .filter(|(_, f)| f.block != NONE)
            .map(|(fi, f)| (fi as u32, f))
    }

    /// Slots of the slab (live or free): the range of flow indices.
    pub(super) fn slots(&self) -> u32 {
        self.slab.len() as u32
    }

    /// The hot-destination caches (for the invariant check and the busiest destinations).
    pub(super) fn hot_dests(&self) -> impl Iterator<Item = &HotDest> + '_ {
        self.hot.iter()
    }

    /// The flow with this private 5-tuple (outbound key), if any.
    #[inline]
    pub(super) fn find_fwd(
        &self,
        p: u8,
        src: u32,
        sport: u16,
        dst: u32,
        dport: u16,
    ) -> Option<u32> {
        let flows = &self.slab;
        self.fwd
            .find(fwd_hash(&self.hasher, p, src, sport, dst, dport), |&i| {
                let f = &flows[i as usize];
                f.src == src && f.sport == sport && f.dst == dst && f.dport == dport && f.proto == p
            })
            .copied()
    }

    /// The flow with this public 5-tuple (public address, SNAT port, remote), if any (R2.2).
    #[inline]
    pub(super) fn find_rev(
        &self,
        p: u8,
        public: u32,
        pport: u16,
        remote: u32,
        rport: u16,
    ) -> Option<u32> {
        let flows = &self.slab;
        self.rev
            .find(
                fwd_hash(&self.hasher, p, public, pport, remote, rport),
                |&i| {
                    let f = &flows[i as usize];
                    f.public == public
                        && f.pport == pport
                        && f.dst == remote
                        && f.dport == rport
                        && f.proto == p
                },
            )
            .copied()
    }

    /// The hash of a (block, destination endpoint) key with this table's key.
    #[inline]
    pub(super) fn dest_hash(&self, block: u32, dst: u32, dport: u16) -> u64 {
        dest_hash(&self.hasher, block, dst, dport)
    }

    /// Local port indices of `block` held by flows to (`dst`, `dport`) (R2.3); `dh` is
    /// [`FlowTable::dest_hash`] of that key. Starts a hot-destination cache when the chain is
    /// [`HOT_MIN`] flows or longer.
    #[inline]
    pub(super) fn busy_ports(&mut self, dh: u64, block: u32, dst: u32, dport: u16) -> Bits {
        let h = self.hasher;
        debug_assert_eq!(dh, dest_hash(&h, block, dst, dport));
        let flows = &self.slab;
        let mut active = Bits::EMPTY;
        let hot = if self.hot.is_empty() {
            None
        } else {
            self.hot
                .find(dh, |e| e.block == block && e.dst == dst && e.dport == dport)
        };
        if let Some(hd) = hot {
            active = hd.active;
        } else if let Some(&head) = self.dests.find(dh, |&i| {
            let f = &flows[i as usize];
            f.block == block && f.dst == dst && f.dport == dport
        }) {
            let mut cur = head;
            let mut n = 0;
            while cur != NONE {
                let f = &flows[cur as usize];
                active.set(f.idx);
                cur = f.next;
                n += 1;
            }
            if n >= HOT_MIN {
                let hd = HotDest {
                    block,
                    dst,
                    dport,
                    n,
                    active,
                };
                self.hot
                    .insert_unique(dh, hd, |e| dest_hash(&h, e.block, e.dst, e.dport));
            }
        }
        active
    }

    /// The slots of the flows of `block` to (`dst`, `dport`), head first.
    pub(super) fn chain(&self, dh: u64, block: u32, dst: u32, dport: u16) -> Vec<u32> {
        let flows = &self.slab;
        let mut out = Vec::new();
        if let Some(&head) = self.dests.find(dh, |&i| {
            let f = &flows[i as usize];
            f.block == block && f.dst == dst && f.dport == dport
        }) {
            let mut cur = head;
            while cur != NONE {
                out.push(cur);
                cur = flows[cur as usize].next;
            }
        }
        out
    }

    /// Stores `f` (its `gen`, `prev` and `next` are set here) in a free slot and indexes it.
    /// Returns the slot and the flow's generation.
    #[inline]
    pub(super) fn insert(&mut self, mut f: Flow) -> (u32, u32) {
        let h = self.hasher;
        let fi = if self.free_head != NONE {
            let fi = self.free_head;
            self.free_head = self.slab[fi as usize].next;
            f.gen = self.slab[fi as usize].gen;
            fi
        } else {
            self.slab.push(Flow::FREE);
            (self.slab.len() - 1) as u32
        };
        // Chain into the destination's list, at the head.
        let dh = dest_of(&h, &f);
        let flows = &self.slab;
        let head = self.dests.find_mut(dh, |&i| {
            let g = &flows[i as usize];
            g.block == f.block && g.dst == f.dst && g.dport == f.dport
        });
        let old_head = match head {
            Some(slot) => {
                let old = *slot;
                *slot = fi;
                old
            }
            None => NONE,
        };
        f.prev = NONE;
        f.next = old_head;
        self.slab[fi as usize] = f;
        if old_head == NONE {
            let flows = &self.slab;
            self.dests
                .insert_unique(dh, fi, |&i| dest_of(&h, &flows[i as usize]));
        } else {
            self.slab[old_head as usize].prev = fi;
            if !self.hot.is_empty() {
                let same = |e: &HotDest| e.block == f.block && e.dst == f.dst && e.dport == f.dport;
                if let Some(hd) = self.hot.find_mut(dh, same) {
                    hd.active.set(f.idx);
                    hd.n += 1;
                }
            }
        }
        let flows = &self.slab;
        self.fwd
            .insert_unique(fwd_of(&h, &f), fi, |&i| fwd_of(&h, &flows[i as usize]));
        self.rev
            .insert_unique(rev_of(&h, &f), fi, |&i| rev_of(&h, &flows[i as usize]));
        self.live += 1;
        (fi, f.gen)
    }

    /// Unindexes live flow `fi` and frees its slot (bumping its generation). Returns the
    /// record as it was, for the caller to release its port.
    #[inline]
    pub(super) fn remove(&mut self, fi: u32) -> Flow {
        let h = self.hasher;
        let f = self.slab[fi as usize];
        debug_assert!(f.block != NONE);
        if let Ok(e) = self.fwd.find_entry(fwd_of(&h, &f), |&i| i == fi) {
            e.remove();
        }
        if let Ok(e) = self.rev.find_entry(rev_of(&h, &f), |&i| i == fi) {
            e.remove();
        }
        if f.prev != NONE {
            self.slab[f.prev as usize].next = f.next;
        } else if let Ok(e) = self.dests.find_entry(dest_of(&h, &f), |&i| i == fi) {
            if f.next != NONE {
                *e.into_mut() = f.next;
            } else {
                e.remove();
            }
        }
        if f.next != NONE {
            self.slab[f.next as usize].prev = f.prev;
        }
        if !self.hot.is_empty() {
            let same = |e: &HotDest| e.block == f.block && e.dst == f.dst && e.dport == f.dport;
            if let Ok(mut e) = self.hot.find_entry(dest_of(&h, &f), same) {
                let hd = e.get_mut();
                hd.active.clear(f.idx);
                hd.n -= 1;
                if hd.n < HOT_MIN / 2 {
                    e.remove();
                }
            }
        }
        let slot = &mut self.slab[fi as usize];
        slot.gen = slot.gen.wrapping_add(1);
        slot.block = NONE;
        slot.next = self.free_head;
        self.free_head = fi;
        self.live -= 1;
        f
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn flow_record_stays_small() {
        // The memory target (≤ 96 bytes per live flow) depends on it.
        assert_eq!(std::mem::size_of::<super::Flow>(), 48);
    }
}
