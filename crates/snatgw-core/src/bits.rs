//! A fixed 1024-bit set: one bit per port of an instance's preallocated block.
//!
//! A block holds at most 1024 ports (SPEC R2.8's largest tier), so every per-block port set
//! (owned, used, active for a destination, recently released for it) is 16 machine words and
//! set algebra is a handful of instructions. Nothing here knows what a port means.

/// Bits in a set.
pub const CAPACITY: usize = 1024;
const WORDS: usize = CAPACITY / 64;

/// A set of local port indices `0..1024`.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Bits([u64; WORDS]);

impl std::fmt::Debug for Bits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl Bits {
    /// The empty set.
    pub const EMPTY: Bits = Bits([0; WORDS]);

    /// Adds `i`.
    #[inline]
    pub fn set(&mut self, i: u16) {
        self.0[(i as usize >> 6) & (WORDS - 1)] |= 1 << (i & 63);
    }
    /// Removes `i`.
    #[inline]
    pub fn clear(&mut self, i: u16) {
        self.0[(i as usize >> 6) & (WORDS - 1)] &= !(1 << (i & 63));
    }
    /// Whether `i` is in the set.
    #[inline]
    pub fn get(&self, i: u16) -> bool {
        self.0[(i as usize >> 6) & (WORDS - 1)] & (1 << (i & 63)) != 0
    }
    /// Number of members.
    #[inline]
    pub fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
    /// Whether the set has a member.
    #[inline]
    pub fn any(&self) -> bool {
        self.0.iter().any(|&w| w != 0)
    }
    /// `self \ other`.
    #[inline]
    pub fn minus(&self, other: &Bits) -> Bits {
        let mut r = *self;
        for (a, b) in r.0.iter_mut().zip(other.0.iter()) {
            *a &= !b;
        }
        r
    }
    /// `self ∩ other`.
    #[inline]
    pub fn and(&self, other: &Bits) -> Bits {
        let mut r = *self;
        for (a, b) in r.0.iter_mut().zip(other.0.iter()) {
            *a &= b;
        }
        r
    }
    /// The first member at or after `start`, wrapping around.
    #[inline]
    pub fn first_from(&self, start: u16) -> Option<u16> {
        let start = start as usize % CAPACITY;
        let (w0, b0) = (start >> 6, start & 63);
        let head = self.0[w0] & (u64::MAX << b0);
        if head != 0 {
            return Some((w0 * 64 + head.trailing_zeros() as usize) as u16);
        }
        for k in 1..=WORDS {
            let w = (w0 + k) % WORDS;
            let mut word = self.0[w];
            if k == WORDS {
                word &= !(u64::MAX << b0);
            }
            if word != 0 {
                return Some((w * 64 + word.trailing_zeros() as usize) as u16);
            }
        }
        None
    }
    /// Members in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            let mut x = word;
            std::iter::from_fn(move || {
                if x == 0 {
                    return None;
                }
                let t = x.trailing_zeros();
                x &= x - 1;
                Some((w * 64 + t as usize) as u16)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn first_from_matches_linear_scan(members in proptest::collection::btree_set(0u16..1024, 0..40), start in 0u16..1024) {
            let mut b = Bits::EMPTY;
            for &m in &members { b.set(m); }
            let expect = members.range(start..).next().or_else(|| members.iter().next()).copied();
            prop_assert_eq!(b.first_from(start), expect);
            prop_assert_eq!(b.count() as usize, members.len());
            prop_assert_eq!(b.iter().collect::<Vec<_>>(), members.iter().copied().collect::<Vec<_>>());
        }
    }
}
