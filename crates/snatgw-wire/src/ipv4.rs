//! IPv4 header view (RFC 791) with RFC 1624 incremental header-checksum maintenance.
//!
//! What it does: validates the header once ([`Ipv4Packet::new_checked`]), reads every header
//! field, exposes the options and the payload (`header_len..total_len`), and rewrites the
//! addresses and TTL while keeping the header checksum valid incrementally.
//!
//! What it does not do: it does not interpret options (they are opaque bytes, preserved as
//! they are; source-route options are not rewritten), does not reassemble fragments, does not
//! touch the transport checksum when an address changes (the pseudo-header lives in the
//! transport layer: use [`rewrite_src`](crate::rewrite_src) /
//! [`rewrite_dst`](crate::rewrite_dst) for that), and ignores bytes after `total_len`.

use crate::checksum;
use crate::field::ipv4;
use crate::field::{get_u16, get_u32, set_u16, set_u32};
use crate::WireError;

/// Validate an IPv4 header at the start of `b` (see [`Ipv4Packet::check_len`]); returns the
/// fixed 20-byte header, the header length and the total length.
#[inline(always)]
pub(crate) fn check_header(
    b: &[u8],
) -> Result<(&[u8; ipv4::MIN_HEADER_LEN], usize, usize), WireError> {
    let Some(h) = b.first_chunk::<{ ipv4::MIN_HEADER_LEN }>() else {
        return Err(WireError::Ipv4TooShort { len: b.len() });
    };
    let version = ipv4::version(h[ipv4::VER_IHL]);
    if version != ipv4::VERSION {
        return Err(WireError::BadVersion(version));
    }
    let ihl = ipv4::ihl(h[ipv4::VER_IHL]);
    if ihl < ipv4::MIN_IHL {
        return Err(WireError::BadIhl(ihl));
    }
    let header_len = ipv4::header_len(h[ipv4::VER_IHL]);
    let total_len = usize::from(get_u16(h, ipv4::TOTAL_LEN));
    if header_len > total_len {
        return Err(WireError::HeaderLenExceedsTotalLen {
            header_len,
            total_len,
        });
    }
    if total_len > b.len() {
        return Err(WireError::TotalLenExceedsBuffer {
            total_len,
            buffer_len: b.len(),
        });
    }
    Ok((h, header_len, total_len))
}

/// A view of an IPv4 packet (header + payload) in a byte buffer.
///
/// Built with [`new_checked`](Self::new_checked) every accessor is in bounds. Built with
/// [`new_unchecked`](Self::new_unchecked) accessors may panic on a malformed buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wrap a buffer without any validation.
    #[inline]
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wrap a buffer after [`check_len`](Self::check_len).
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Validate: buffer >= 20 bytes, version 4, IHL >= 5,
    /// `header_len <= total_len <= buffer length`.
    #[inline]
    pub fn check_len(&self) -> Result<(), WireError> {
        check_header(self.buffer.as_ref()).map(|_| ())
    }

    /// The underlying buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The packet bytes, `0..total_len` (trailing bytes of the buffer excluded).
    #[inline]
    pub fn packet_bytes(&self) -> &[u8] {
        &self.buffer.as_ref()[..usize::from(self.total_len())]
    }

    /// The version field (4 for a checked packet).
    #[inline]
    pub fn version(&self) -> u8 {
        ipv4::version(self.buffer.as_ref()[ipv4::VER_IHL])
    }

    /// Header length in bytes (IHL * 4, 20..=60).
    #[inline]
    pub fn header_len(&self) -> u8 {
        ipv4::header_len(self.buffer.as_ref()[ipv4::VER_IHL]) as u8
    }

    /// The type-of-service byte (DSCP and ECN).
    #[inline]
    pub fn tos(&self) -> u8 {
        self.buffer.as_ref()[ipv4::TOS]
    }

    /// The total length field (header + payload).
    #[inline]
    pub fn total_len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), ipv4::TOTAL_LEN)
    }

    /// The identification field.
    #[inline]
    pub fn ident(&self) -> u16 {
        get_u16(self.buffer.as_ref(), ipv4::IDENT)
    }

    /// The don't-fragment flag.
    #[inline]
    pub fn dont_frag(&self) -> bool {
        get_u16(self.buffer.as_ref(), ipv4::FLAGS_FRAG) & ipv4::FLAG_DF != 0
    }

    /// The more-fragments flag.
    #[inline]
    pub fn more_frags(&self) -> bool {
        get_u16(self.buffer.as_ref(), ipv4::FLAGS_FRAG) & ipv4::FLAG_MF != 0
    }

    /// The fragment offset in bytes (field * 8).
    #[inline]
    pub fn frag_offset(&self) -> u16 {
        (get_u16(self.buffer.as_ref(), ipv4::FLAGS_FRAG) & ipv4::FRAG_MASK) * ipv4::FRAG_UNIT
    }

    /// True for any fragment (more-fragments set or non-zero offset).
    #[inline]
    pub fn is_fragment(&self) -> bool {
        get_u16(self.buffer.as_ref(), ipv4::FLAGS_FRAG) & (ipv4::FLAG_MF | ipv4::FRAG_MASK) != 0
    }

    /// True for the first fragment of a fragmented packet (offset 0, more-fragments set).
    #[inline]
    pub fn is_first_fragment(&self) -> bool {
        get_u16(self.buffer.as_ref(), ipv4::FLAGS_FRAG) & (ipv4::FLAG_MF | ipv4::FRAG_MASK)
            == ipv4::FLAG_MF
    }

    /// The time-to-live field.
    #[inline]
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[ipv4::TTL]
    }

    /// The protocol field (see [`PROTO_TCP`](crate::PROTO_TCP) and friends).
    #[inline]
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[ipv4::PROTOCOL]
    }

    /// The header checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), ipv4::CHECKSUM)
    }

    /// The source address, host byte order.
    #[inline]
    pub fn src_addr(&self) -> u32 {
        get_u32(self.buffer.as_ref(), ipv4::SRC)
    }

    /// The destination address, host byte order.
    #[inline]
    pub fn dst_addr(&self) -> u32 {
        get_u32(self.buffer.as_ref(), ipv4::DST)
    }

    /// The options bytes (`20..header_len`), empty without options.
    #[inline]
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[ipv4::MIN_HEADER_LEN..usize::from(self.header_len())]
    }

    /// The payload: bytes `header_len..total_len`. Bytes after `total_len` are not included.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[usize::from(self.header_len())..usize::from(self.total_len())]
    }

    /// True when the header checksum is valid.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        let header = &self.buffer.as_ref()[..usize::from(self.header_len())];
        checksum::fold(checksum::sum(header, 0)) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    #[inline(always)]
    fn update_checksum(&mut self, delta: checksum::Delta) {
        let b = self.buffer.as_mut();
        let c = delta.apply(get_u16(b, ipv4::CHECKSUM));
        set_u16(b, ipv4::CHECKSUM, c);
    }

    /// Set the source address and update the header checksum incrementally.
    /// The transport checksum is not touched.
    #[inline]
    pub fn set_src_addr(&mut self, addr: u32) {
        let old = self.src_addr();
        set_u32(self.buffer.as_mut(), ipv4::SRC, addr);
        self.update_checksum(checksum::Delta::new().u32(old, addr));
    }

    /// Set the destination address and update the header checksum incrementally.
    /// The transport checksum is not touched.
    #[inline]
    pub fn set_dst_addr(&mut self, addr: u32) {
        let old = self.dst_addr();
        set_u32(self.buffer.as_mut(), ipv4::DST, addr);
        self.update_checksum(checksum::Delta::new().u32(old, addr));
    }

    /// Set the TTL and update the header checksum incrementally.
    #[inline]
    pub fn set_ttl(&mut self, ttl: u8) {
        let b = self.buffer.as_mut();
        let old = get_u16(b, ipv4::TTL);
        b[ipv4::TTL] = ttl;
        let new = get_u16(b, ipv4::TTL);
        self.update_checksum(checksum::Delta::new().u16(old, new));
    }

    /// Set the identification field and update the header checksum incrementally.
    #[inline]
    pub fn set_ident(&mut self, ident: u16) {
        let old = self.ident();
        set_u16(self.buffer.as_mut(), ipv4::IDENT, ident);
        self.update_checksum(checksum::Delta::new().u16(old, ident));
    }

    /// Write the header checksum field as is (no computation).
    #[inline]
    pub fn set_checksum(&mut self, check: u16) {
        set_u16(self.buffer.as_mut(), ipv4::CHECKSUM, check);
    }

    /// Recompute the header checksum from scratch.
    #[inline]
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let hl = usize::from(self.header_len());
        let c = checksum::internet_checksum(&self.buffer.as_ref()[..hl]);
        self.set_checksum(c);
    }

    /// The payload, mutable (`header_len..total_len`).
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (hl, tl) = (
            usize::from(self.header_len()),
            usize::from(self.total_len()),
        );
        &mut self.buffer.as_mut()[hl..tl]
    }

    /// The options bytes, mutable. Changing them invalidates the header checksum
    /// (call [`fill_checksum`](Self::fill_checksum)).
    #[inline]
    pub fn options_mut(&mut self) -> &mut [u8] {
        let hl = usize::from(self.header_len());
        &mut self.buffer.as_mut()[ipv4::MIN_HEADER_LEN..hl]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, Ipv4Spec};

    fn sample() -> Vec<u8> {
        let ip = Ipv4Spec {
            src: 0x0a00_0004,
            dst: 0x5db8_d822,
            ttl: 64,
            ident: 0x1234,
            dont_frag: true,
            tos: 0x10,
            options: vec![0x01, 0x01, 0x01, 0x00],
        };
        testutil::build_ipv4(&ip, crate::PROTO_UDP, &[1, 2, 3, 4, 5, 6, 7, 8, 9])
    }

    #[test]
    fn accessors() {
        let mut bytes = sample();
        bytes.extend_from_slice(&[0xee; 6]); // link-layer padding
        let p = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.tos(), 0x10);
        assert_eq!(p.total_len(), 33);
        assert_eq!(p.ident(), 0x1234);
        assert!(p.dont_frag());
        assert!(!p.more_frags());
        assert_eq!(p.frag_offset(), 0);
        assert!(!p.is_fragment());
        assert!(!p.is_first_fragment());
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), crate::PROTO_UDP);
        assert_eq!(p.src_addr(), 0x0a00_0004);
        assert_eq!(p.dst_addr(), 0x5db8_d822);
        assert_eq!(p.options(), &[1, 1, 1, 0]);
        assert_eq!(p.payload(), &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(p.packet_bytes().len(), 33);
        assert!(p.verify_checksum());
        assert_eq!(
            p.checksum(),
            get_u16(&bytes, ipv4::CHECKSUM),
            "checksum accessor"
        );
    }

    #[test]
    fn fragment_flags() {
        let full = testutil::build_udp(&Ipv4Spec::default(), 1000, 53, &[7u8; 64]);
        let frags = testutil::fragment(&full, 32);
        assert_eq!(frags.len(), 3);
        let first = Ipv4Packet::new_checked(&frags[0][..]).unwrap();
        assert!(first.is_fragment() && first.is_first_fragment() && first.more_frags());
        assert_eq!(first.frag_offset(), 0);
        let mid = Ipv4Packet::new_checked(&frags[1][..]).unwrap();
        assert!(mid.is_fragment() && !mid.is_first_fragment() && mid.more_frags());
        assert_eq!(mid.frag_offset(), 32);
        let last = Ipv4Packet::new_checked(&frags[2][..]).unwrap();
        assert!(last.is_fragment() && !last.is_first_fragment() && !last.more_frags());
        assert_eq!(last.frag_offset(), 64);
        for f in &frags {
            assert!(Ipv4Packet::new_checked(&f[..]).unwrap().verify_checksum());
        }
    }

    #[test]
    fn setters_keep_checksum_valid() {
        let mut bytes = sample();
        let mut p = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
        p.set_src_addr(0xc633_6401);
        assert!(p.verify_checksum());
        p.set_dst_addr(0x0102_0304);
        assert!(p.verify_checksum());
        p.set_ttl(1);
        assert!(p.verify_checksum());
        p.set_ident(0xbeef);
        assert!(p.verify_checksum());
        assert_eq!(
            (p.src_addr(), p.dst_addr(), p.ttl(), p.ident()),
            (0xc633_6401, 0x0102_0304, 1, 0xbeef)
        );
        let incremental = p.checksum();
        p.fill_checksum();
        assert_eq!(p.checksum(), incremental);
        p.payload_mut()[0] = 0xaa;
        p.options_mut()[0] = 0x00;
        p.fill_checksum();
        assert!(p.verify_checksum());
        p.set_checksum(0);
        assert!(!p.verify_checksum());
    }

    #[test]
    fn error_too_short() {
        assert_eq!(
            Ipv4Packet::new_checked(&[0x45u8; 19][..]),
            Err(WireError::Ipv4TooShort { len: 19 })
        );
    }

    #[test]
    fn error_bad_version() {
        let mut b = sample();
        b[ipv4::VER_IHL] = 0x65;
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]),
            Err(WireError::BadVersion(6))
        );
    }

    #[test]
    fn error_ihl_below_5() {
        let mut b = sample();
        b[ipv4::VER_IHL] = 0x44;
        assert_eq!(Ipv4Packet::new_checked(&b[..]), Err(WireError::BadIhl(4)));
    }

    #[test]
    fn error_total_len_exceeds_buffer() {
        let b = sample();
        assert_eq!(
            Ipv4Packet::new_checked(&b[..32]),
            Err(WireError::TotalLenExceedsBuffer {
                total_len: 33,
                buffer_len: 32
            })
        );
    }

    #[test]
    fn error_header_len_exceeds_total_len() {
        let mut b = sample();
        set_u16(&mut b, ipv4::TOTAL_LEN, 22);
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]),
            Err(WireError::HeaderLenExceedsTotalLen {
                header_len: 24,
                total_len: 22
            })
        );
    }
}
