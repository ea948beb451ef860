//! The Internet checksum: full computation (RFC 1071) and incremental update (RFC 1624).
//!
//! What it does: one's-complement sums over byte slices (big-endian 16-bit words, an odd
//! trailing byte padded with zero), folding, the TCP/UDP-over-IPv4 pseudo-header sum, and the
//! RFC 1624 eqn. 3 update `HC' = ~(~HC + ~m + m')` for 16- and 32-bit field changes, alone or
//! accumulated with [`Delta`] when several fields change under one checksum.
//!
//! What it does not do: it knows nothing about where checksum fields live (see the packet
//! views), and nothing about UDP's "0 means no checksum" rule (see
//! [`UdpPacket`](crate::UdpPacket) and the rewrite functions).
//!
//! Incremental updates of a checksum that was computed correctly give exactly the value a full
//! recomputation gives (both yield a non-negative-zero sum, RFC 1624 section 3). An update
//! whose old and new values are equal leaves the checksum untouched.

/// Bytes summed before the 64-bit accumulators are folded back (keeps them far from overflow).
const BLOCK: usize = 1 << 20;

/// RFC 1071 one's-complement sum of `data` added to `initial` (not folded, not inverted).
///
/// `data` is read as big-endian 16-bit words; an odd trailing byte is the high byte of a last
/// word whose low byte is zero. The result is congruent (mod 0xffff) to the 16-bit
/// one's-complement sum and is only zero when `initial` is zero and `data` is all zeros.
#[inline]
pub fn sum(data: &[u8], initial: u32) -> u32 {
    let mut acc = u64::from(initial);
    for block in data.chunks(BLOCK) {
        acc = u64::from(fold64(acc + sum_block(block)));
    }
    fold64(acc)
}

/// Sum of one block of at most [`BLOCK`] bytes, as 32-bit big-endian words in a u64.
#[inline(always)]
fn sum_block(block: &[u8]) -> u64 {
    let (words, rest) = block.as_chunks::<8>();
    let (mut a, mut b) = (0u64, 0u64);
    for w in words {
        a += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
        b += u64::from(u32::from_be_bytes([w[4], w[5], w[6], w[7]]));
    }
    let mut acc = a + b;
    let (pairs, odd) = rest.as_chunks::<2>();
    for p in pairs {
        acc += u64::from(u16::from_be_bytes(*p));
    }
    if let Some(&last) = odd.first() {
        acc += u64::from(last) << 8;
    }
    acc
}

/// Fold a 64-bit one's-complement accumulator to 32 bits (end-around carry).
#[inline(always)]
fn fold64(acc: u64) -> u32 {
    let s = (acc & 0xffff_ffff) + (acc >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    // `s` <= 0xffff_ffff here: the first step leaves at most 2^33 - 2.
    s as u32
}

/// Fold a 32-bit sum to 16 bits (end-around carry).
#[inline(always)]
pub fn fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Full Internet checksum of data (= `!fold(sum(data, 0))`).
#[inline]
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` for one 16-bit word change from `old` (m) to
/// `new` (m'). Returns `check` unchanged when `old == new`.
#[inline(always)]
pub fn update_u16(check: u16, old: u16, new: u16) -> u16 {
    Delta::new().u16(old, new).apply(check)
}

/// Same as [`update_u16`] for a 32-bit field (two words), e.g. an IPv4 address.
#[inline(always)]
pub fn update_u32(check: u16, old: u32, new: u32) -> u16 {
    Delta::new().u32(old, new).apply(check)
}

/// Pseudo-header sum for TCP/UDP over IPv4 (src, dst, proto, l4 length); not folded.
///
/// Add the segment with [`sum`]`(segment, pseudo_header_sum(..))`.
#[inline(always)]
pub fn pseudo_header_sum(src: u32, dst: u32, proto: u8, len: u16) -> u32 {
    (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + u32::from(proto) + u32::from(len)
}

/// Accumulated RFC 1624 changes (`~m + m'` terms) to apply to one checksum at once.
///
/// ```
/// use snatgw_wire::checksum::Delta;
/// let d = Delta::new().u32(0x0a00_0001, 0xc633_6401).u16(40000, 1024);
/// let check = d.apply(0x1234);
/// # let _ = check;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta(u32);

impl Delta {
    /// No change.
    #[inline(always)]
    pub const fn new() -> Self {
        Self(0)
    }

    /// Record a 16-bit word changing from `old` to `new` (ignored when equal).
    #[inline(always)]
    #[must_use]
    pub const fn u16(self, old: u16, new: u16) -> Self {
        if old == new {
            return self;
        }
        let s = self.0 + (!old) as u32 + new as u32;
        Self((s & 0xffff) + (s >> 16))
    }

    /// Record a 32-bit field (two words) changing from `old` to `new`.
    #[inline(always)]
    #[must_use]
    pub const fn u32(self, old: u32, new: u32) -> Self {
        self.u16((old >> 16) as u16, (new >> 16) as u16)
            .u16(old as u16, new as u16)
    }

    /// True when no change was recorded (or all recorded changes were no-ops).
    #[inline(always)]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Apply the recorded changes to the checksum `check` (RFC 1624 eqn. 3).
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        if self.0 == 0 {
            return check;
        }
        !fold(u32::from(!check) + self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Word-by-word reference used only in these unit tests.
    fn naive_sum(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from(c[0]) << 8
            };
            s += u32::from(w);
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example: 00 01 f2 03 f4 f5 f6 f7 -> sum ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        assert_eq!(internet_checksum(&data), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // Classic example header (Wikipedia "IPv4 header checksum"), checksum b861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0xb861);
        h[10] = 0xb8;
        h[11] = 0x61;
        assert_eq!(fold(sum(&h, 0)), 0xffff);
    }

    #[test]
    fn odd_lengths_and_initial() {
        for len in 0..40usize {
            let data: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(37) ^ 0xa5)
                .collect();
            assert_eq!(fold(sum(&data, 0)), naive_sum(&data), "len {len}");
            let init = 0x0001_2345;
            assert_eq!(
                fold(sum(&data, init)),
                fold(u32::from(naive_sum(&data)) + fold(init) as u32)
            );
        }
        assert_eq!(sum(&[], 0), 0);
        assert_eq!(fold(sum(&[0xff], 0)), 0xff00);
    }

    #[test]
    fn fold_end_around_carry() {
        assert_eq!(fold(0), 0);
        assert_eq!(fold(0xffff), 0xffff);
        assert_eq!(fold(0x1_0000), 1);
        assert_eq!(fold(0x1_fffe), 0xffff);
        assert_eq!(fold(u32::MAX), 0xffff);
    }

    #[test]
    fn large_input_uses_several_blocks() {
        let data = vec![0xffu8; BLOCK * 2 + 4];
        assert_eq!(fold(sum(&data, 0)), 0xffff);
        let data = vec![0xffu8; BLOCK * 2 + 3];
        assert_eq!(fold(sum(&data, 0)), 0xff00);
        let data: Vec<u8> = (0..(BLOCK + 10)).map(|i| i as u8).collect();
        assert_eq!(fold(sum(&data, 0)), naive_sum(&data));
    }

    #[test]
    fn rfc1624_example() {
        // RFC 1624 section 4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285, HC' = 0x0000.
        assert_eq!(update_u16(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    #[test]
    fn update_noop_is_identity() {
        assert_eq!(update_u16(0xffff, 7, 7), 0xffff);
        assert_eq!(update_u32(0x1234, 0xdead_beef, 0xdead_beef), 0x1234);
        assert!(Delta::new().u16(3, 3).is_empty());
    }

    #[test]
    fn pseudo_header() {
        let s = pseudo_header_sum(0xc0a8_0001, 0x0a00_0002, 6, 20);
        assert_eq!(s, 0xc0a8 + 0x0001 + 0x0a00 + 0x0002 + 6 + 20);
    }
}
