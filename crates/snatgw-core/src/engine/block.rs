//! Port state of one instance's block for one protocol (SPEC R2.3–R2.5).
//!
//! An instance's block (R2.4) is up to 32 chunks of 32 consecutive ports (local index = chunk
//! slot × 32 + offset); TCP and UDP consume it separately (R2.5), so every instance has two
//! [`PortBlock`]s over the same chunks. This module tracks which local ports the instance owns,
//! how many flows hold each port ("used SNAT ports", R2.3), and the order in which unused ports
//! were released (least recently released first; never-used ports count as oldest).
//!
//! It does not know destinations, flows or public port numbers: which chunks a block holds is
//! `ports`' business (`grow_block`, `revoke_chunks`), and the allocator there combines this
//! state with the per-destination view to choose a port.

use crate::bits::{Bits, CAPACITY};

const NIL: u16 = u16::MAX;

/// Port state of one (instance, protocol).
#[derive(Clone)]
pub(crate) struct PortBlock {
    /// Local ports the instance owns (its preallocation).
    pub owned: Bits,
    /// Local ports held by at least one flow ("used SNAT ports", R2.3).
    pub used: Bits,
    /// Flows per port. `u32`: flows to different destinations share a port (R2.3), so one
    /// port can carry far more than 65 535 flows (issue #12: a `u16` here wrapped, unlinked
    /// a port that was not free and emptied the free list). The gateway-wide flow limit
    /// (`MAX_FLOWS_LIMIT` = 2^31, R9.2) bounds it, so it cannot overflow.
    refcnt: Vec<u32>,
    prev: Vec<u16>,
    next: Vec<u16>,
    head: u16,
    tail: u16,
    /// Rotating start for picking among used ports.
    pub cursor: u16,
}

impl PortBlock {
    pub fn new() -> Self {
        PortBlock {
            owned: Bits::EMPTY,
            used: Bits::EMPTY,
            refcnt: vec![0; CAPACITY],
            prev: vec![NIL; CAPACITY],
            next: vec![NIL; CAPACITY],
            head: NIL,
            tail: NIL,
            cursor: 0,
        }
    }

    fn unlink(&mut self, i: u16) {
        let (p, n) = (self.prev[i as usize], self.next[i as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i as usize] = NIL;
        self.next[i as usize] = NIL;
    }

    fn push_back(&mut self, i: u16) {
        self.prev[i as usize] = self.tail;
        self.next[i as usize] = NIL;
        if self.tail == NIL {
            self.head = i;
        } else {
            self.next[self.tail as usize] = i;
        }
        self.tail = i;
    }

    fn push_front(&mut self, i: u16) {
        self.next[i as usize] = self.head;
        self.prev[i as usize] = NIL;
        if self.head == NIL {
            self.tail = i;
        } else {
            self.prev[self.head as usize] = i;
        }
        self.head = i;
    }

    /// Adds newly preallocated ports: never used, so they count as oldest.
    pub fn grant(&mut self, i: u16) {
        debug_assert!(!self.owned.get(i));
        self.owned.set(i);
        self.refcnt[i as usize] = 0;
        self.push_front(i);
    }

    /// Takes a port away from the block (R2.9). Flows on it must be removed by the caller.
    pub fn revoke(&mut self, i: u16) {
        if !self.owned.get(i) {
            return;
        }
        self.owned.clear(i);
        if !self.used.get(i) {
            self.unlink(i);
        }
    }

    /// A flow takes port `i`.
    pub fn hold(&mut self, i: u16) {
        if self.refcnt[i as usize] == 0 {
            self.used.set(i);
            self.unlink(i);
        }
        self.refcnt[i as usize] += 1;
    }

    /// A flow lets go of port `i`.
    pub fn release(&mut self, i: u16) {
        let c = &mut self.refcnt[i as usize];
        debug_assert!(*c > 0);
        *c -= 1;
        if *c == 0 {
            self.used.clear(i);
            if self.owned.get(i) {
                self.push_back(i);
            }
        }
    }

    /// Moves an owned, unused port to the most recently released end of the free order
    /// (restoring the order of releases, `persist`).
    pub fn requeue_released(&mut self, i: u16) {
        if self.owned.get(i) && !self.used.get(i) {
            self.unlink(i);
            self.push_back(i);
        }
    }

    /// Flows holding port `i`.
    pub fn holders(&self, i: u16) -> u32 {
        self.refcnt[i as usize]
    }

    /// Flows holding any port of this block.
    pub fn flows(&self) -> u64 {
        self.used.iter().map(|i| u64::from(self.holders(i))).sum()
    }

    /// Unused owned ports, least recently released first.
    pub fn lru(&self) -> impl Iterator<Item = u16> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let i = cur;
            cur = self.next[i as usize];
            Some(i)
        })
    }

    /// Forgets everything (the instance left or changed scenario).
    pub fn reset(&mut self) {
        *self = PortBlock::new();
    }
}
