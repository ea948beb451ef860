//! A FIFO queue in fixed-size chunks, for queues that can hold millions of entries.
//!
//! What it does: `push_back` / `pop_front` / `front` in O(1) worst case. A `VecDeque`
//! doubles and copies its whole buffer when it grows, which for a million entries takes
//! milliseconds inside whichever call happens to push (SPEC R9.4); here growing allocates one
//! chunk of [`CHUNK_LEN`] entries and never moves existing ones. What it does not do: random
//! access or iteration (the engine's time-ordered queues need neither).

use std::collections::VecDeque;

/// Entries per chunk.
pub const CHUNK_LEN: usize = 4096;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct ChunkQueue<T> {
    chunks: VecDeque<Vec<T>>,
    /// Index of the front entry in the first chunk.
    head: usize,
    len: usize,
}

impl<T: Copy> Default for ChunkQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy> ChunkQueue<T> {
    /// An empty queue (allocates nothing).
    pub fn new() -> Self {
        ChunkQueue {
            chunks: VecDeque::new(),
            head: 0,
            len: 0,
        }
    }

    /// Entries queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `x`.
    #[inline]
    pub fn push_back(&mut self, x: T) {
        match self.chunks.back_mut() {
            Some(c) if c.len() < CHUNK_LEN => c.push(x),
            _ => {
                let mut c = Vec::with_capacity(CHUNK_LEN);
                c.push(x);
                self.chunks.push_back(c);
            }
        }
        self.len += 1;
    }

    /// The oldest entry.
    #[inline]
    pub fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(|c| c.get(self.head))
    }

    /// Removes and returns the oldest entry.
    #[inline]
    pub fn pop_front(&mut self) -> Option<T> {
        let c = self.chunks.front()?;
        let x = *c.get(self.head)?;
        self.head += 1;
        self.len -= 1;
        if self.head == c.len() && (c.len() == CHUNK_LEN || self.len == 0) {
            self.chunks.pop_front();
            self.head = 0;
        }
        Some(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Behaves like a `VecDeque` under any mix of pushes and pops.
        #[test]
        fn same_as_vecdeque(ops in proptest::collection::vec(any::<Option<u16>>(), 0..20_000)) {
            let (mut q, mut m) = (ChunkQueue::new(), VecDeque::new());
            for op in ops {
                match op {
                    Some(x) => { q.push_back(x); m.push_back(x); }
                    None => prop_assert_eq!(q.pop_front(), m.pop_front()),
                }
                prop_assert_eq!(q.front(), m.front());
                prop_assert_eq!(q.len(), m.len());
            }
        }
    }
}
