//! Keyed hashing of flow keys for the flow tables.
//!
//! Inbound lookups are keyed partly by what a remote host chooses (its address and port), so the
//! hash is keyed with secret material derived from the configuration seed and the caller's
//! entropy ([`crate::Engine::with_hash_key`]), to make collision flooding impractical. The mixer is a
//! folded 64×64→128-bit multiply (the construction used by foldhash). Not a cryptographic MAC.

/// A keyed hasher for two 64-bit words.
#[derive(Clone, Copy, Debug)]
pub struct KeyedHash {
    k0: u64,
    k1: u64,
    k2: u64,
}

#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = (a as u128).wrapping_mul(b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

/// SplitMix64 step: expands a seed into well-mixed key material.
pub fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl KeyedHash {
    /// A hasher keyed from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut s = seed;
        KeyedHash {
            k0: splitmix64(&mut s),
            k1: splitmix64(&mut s),
            k2: splitmix64(&mut s) | 1,
        }
    }

    /// Hashes two words.
    #[inline]
    pub fn hash(&self, a: u64, b: u64) -> u64 {
        fold_mul(fold_mul(a ^ self.k0, b ^ self.k1), self.k2)
    }
}

/// FNV-1a 64 of `bytes`: a stable hash across runs, builds and platforms (R1.6's frontend
/// choice, API entity tags, ids derived from paths). Not keyed: never for remote-chosen keys.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// FNV over 8-byte little-endian words with a shift fold: a fast check that file contents are
/// whole (a torn or corrupted write), about 8 times faster than [`fnv1a64`] on large state
/// files. Not a cryptographic checksum.
pub fn checksum64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = bytes.chunks_exact(8);
    for c in &mut words {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
    }
    for &x in words.remainder() {
        h = (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
