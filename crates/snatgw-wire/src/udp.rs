//! UDP header view (RFC 768) with incremental checksum maintenance (RFC 1624).
//!
//! What it does: validates the header and the length field, reads ports, length and checksum,
//! verifies or fills the checksum given the IPv4 pseudo-header addresses, and rewrites ports
//! incrementally. RFC 768 rules are kept: a checksum of 0 means "no checksum" and stays 0 on
//! every rewrite; a computed checksum of 0 is transmitted as 0xffff.
//!
//! What it does not do: it does not know the IP addresses (see
//! [`adjust_checksum_for_addr`](UdpPacket::adjust_checksum_for_addr) and
//! [`rewrite_src`](crate::rewrite_src)) and does not handle datagrams split over IPv4
//! fragments (use [`parse`](crate::parse), which accepts first fragments).
//!
//! The view's buffer is the UDP datagram, possibly followed by bytes beyond the UDP length,
//! which are ignored.

use crate::checksum::{self, Delta};
use crate::field::udp;
use crate::field::{get_u16, set_u16};
use crate::{WireError, PROTO_UDP};

/// Apply `delta` to a UDP checksum keeping RFC 768's rules: 0 (no checksum) stays 0 and a
/// result of 0 becomes 0xffff.
#[inline(always)]
pub(crate) fn update_udp_checksum(check: u16, delta: Delta) -> u16 {
    if check == 0 {
        return 0;
    }
    match delta.apply(check) {
        0 => 0xffff,
        c => c,
    }
}

/// A view of a UDP datagram in a byte buffer.
///
/// Built with [`new_checked`](Self::new_checked) every accessor is in bounds. Built with
/// [`new_unchecked`](Self::new_unchecked) accessors may panic on a malformed buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
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

    /// Validate: buffer >= 8 bytes and `8 <= length field <= buffer length`.
    #[inline]
    pub fn check_len(&self) -> Result<(), WireError> {
        let b = self.buffer.as_ref();
        if b.len() < udp::HEADER_LEN {
            return Err(WireError::UdpTruncated);
        }
        let len = get_u16(b, udp::LEN);
        if usize::from(len) < udp::HEADER_LEN || usize::from(len) > b.len() {
            return Err(WireError::BadUdpLength {
                len,
                available: b.len(),
            });
        }
        Ok(())
    }

    /// The underlying buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The source port.
    #[inline]
    pub fn src_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), udp::SRC_PORT)
    }

    /// The destination port.
    #[inline]
    pub fn dst_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), udp::DST_PORT)
    }

    /// The length field (header + payload).
    #[inline]
    pub fn len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), udp::LEN)
    }

    /// True when the length field says the datagram has no payload.
    #[inline]
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) <= udp::HEADER_LEN
    }

    /// The checksum field (0: no checksum).
    #[inline]
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), udp::CHECKSUM)
    }

    /// The payload, `8..length`.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[udp::HEADER_LEN..usize::from(self.len())]
    }

    /// True when the checksum is 0 (not used) or valid for a datagram between `src` and `dst`.
    #[inline]
    pub fn verify_checksum(&self, src: u32, dst: u32) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let len = self.len();
        let datagram = &self.buffer.as_ref()[..usize::from(len)];
        let ph = checksum::pseudo_header_sum(src, dst, PROTO_UDP, len);
        checksum::fold(checksum::sum(datagram, ph)) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    #[inline(always)]
    fn update_checksum(&mut self, delta: Delta) {
        let b = self.buffer.as_mut();
        let c = update_udp_checksum(get_u16(b, udp::CHECKSUM), delta);
        set_u16(b, udp::CHECKSUM, c);
    }

    /// Set the source port and update the checksum incrementally (0 stays 0).
    #[inline]
    pub fn set_src_port(&mut self, port: u16) {
        let old = self.src_port();
        set_u16(self.buffer.as_mut(), udp::SRC_PORT, port);
        self.update_checksum(Delta::new().u16(old, port));
    }

    /// Set the destination port and update the checksum incrementally (0 stays 0).
    #[inline]
    pub fn set_dst_port(&mut self, port: u16) {
        let old = self.dst_port();
        set_u16(self.buffer.as_mut(), udp::DST_PORT, port);
        self.update_checksum(Delta::new().u16(old, port));
    }

    /// Update the checksum for a pseudo-header address change (0 stays 0).
    #[inline]
    pub fn adjust_checksum_for_addr(&mut self, old: u32, new: u32) {
        self.update_checksum(Delta::new().u32(old, new));
    }

    /// Write the checksum field as is (no computation); 0 disables the checksum.
    #[inline]
    pub fn set_checksum(&mut self, check: u16) {
        set_u16(self.buffer.as_mut(), udp::CHECKSUM, check);
    }

    /// Recompute the checksum from scratch for a datagram between `src` and `dst`
    /// (a computed 0 is written as 0xffff).
    #[inline]
    pub fn fill_checksum(&mut self, src: u32, dst: u32) {
        self.set_checksum(0);
        let len = self.len();
        let datagram = &self.buffer.as_ref()[..usize::from(len)];
        let ph = checksum::pseudo_header_sum(src, dst, PROTO_UDP, len);
        let c = match !checksum::fold(checksum::sum(datagram, ph)) {
            0 => 0xffff,
            c => c,
        };
        self.set_checksum(c);
    }

    /// The payload, mutable (`8..length`).
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let len = usize::from(self.len());
        &mut self.buffer.as_mut()[udp::HEADER_LEN..len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// Where the UDP header starts in the samples (no IPv4 options).
    const L4: usize = crate::IPV4_MIN_HEADER_LEN;
    use crate::testutil::{self, Ipv4Spec};

    const SRC: u32 = 0x0a00_0004;
    const DST: u32 = 0x0808_0808;

    fn sample() -> Vec<u8> {
        let ip = Ipv4Spec::between(SRC, DST);
        testutil::build_udp(&ip, 5353, 53, b"query")
    }

    #[test]
    fn accessors() {
        let bytes = sample();
        let u = UdpPacket::new_checked(&bytes[20..]).unwrap();
        assert_eq!(u.src_port(), 5353);
        assert_eq!(u.dst_port(), 53);
        assert_eq!(u.len(), 13);
        assert!(!u.is_empty());
        assert_eq!(u.payload(), b"query");
        assert_ne!(u.checksum(), 0);
        assert!(u.verify_checksum(SRC, DST));
        assert!(!u.verify_checksum(SRC, DST + 1));
    }

    #[test]
    fn trailing_bytes_beyond_udp_len_are_ignored() {
        let mut bytes = sample();
        bytes.extend_from_slice(&[0xaa, 0xbb]);
        let u = UdpPacket::new_checked(&bytes[20..]).unwrap();
        assert_eq!(u.payload(), b"query");
        assert!(u.verify_checksum(SRC, DST));
    }

    #[test]
    fn setters_keep_checksum_valid() {
        let mut bytes = sample();
        let mut u = UdpPacket::new_checked(&mut bytes[20..]).unwrap();
        u.set_src_port(1024);
        u.set_dst_port(5353);
        u.adjust_checksum_for_addr(SRC, 0xc633_6401);
        assert!(u.verify_checksum(0xc633_6401, DST));
        let inc = u.checksum();
        u.fill_checksum(0xc633_6401, DST);
        assert_eq!(u.checksum(), inc);
        u.payload_mut()[0] = b'Q';
        assert!(!u.verify_checksum(0xc633_6401, DST));
    }

    #[test]
    fn zero_checksum_stays_zero() {
        let ip = Ipv4Spec::between(SRC, DST);
        let mut bytes = testutil::build_udp_no_checksum(&ip, 5353, 53, b"query");
        let mut u = UdpPacket::new_checked(&mut bytes[20..]).unwrap();
        assert_eq!(u.checksum(), 0);
        u.set_src_port(1);
        u.set_dst_port(2);
        u.adjust_checksum_for_addr(SRC, 1);
        assert_eq!(u.checksum(), 0);
        assert!(u.verify_checksum(1, DST));
    }

    #[test]
    fn computed_zero_is_sent_as_ffff() {
        // Find a payload word that makes the checksum compute to zero, then check fill and
        // incremental update both produce 0xffff.
        let ip = Ipv4Spec::between(SRC, DST);
        let mut bytes = testutil::build_udp(&ip, 5353, 53, &[0, 0]);
        let c = get_u16(&bytes, L4 + udp::CHECKSUM);
        // Adding `c` to the payload word (one's complement) brings the sum to 0xffff.
        set_u16(&mut bytes, L4 + udp::HEADER_LEN, c);
        let mut u = UdpPacket::new_checked(&mut bytes[20..]).unwrap();
        u.fill_checksum(SRC, DST);
        assert_eq!(u.checksum(), 0xffff);
        assert!(u.verify_checksum(SRC, DST));
        // Incremental: a port change and back again must land on 0xffff again.
        u.set_src_port(5354);
        u.set_src_port(5353);
        assert_eq!(u.checksum(), 0xffff);
        assert_eq!(update_udp_checksum(0xffff, Delta::new().u16(1, 1)), 0xffff);
    }

    #[test]
    fn error_truncated() {
        let bytes = sample();
        assert_eq!(
            UdpPacket::new_checked(&bytes[20..27]),
            Err(WireError::UdpTruncated)
        );
    }

    #[test]
    fn error_length_mismatch() {
        let mut bytes = sample();
        set_u16(&mut bytes, L4 + udp::LEN, 14);
        assert_eq!(
            UdpPacket::new_checked(&bytes[20..]),
            Err(WireError::BadUdpLength {
                len: 14,
                available: 13
            })
        );
        set_u16(&mut bytes, L4 + udp::LEN, 7);
        assert_eq!(
            UdpPacket::new_checked(&bytes[20..]),
            Err(WireError::BadUdpLength {
                len: 7,
                available: 13
            })
        );
    }
}
