//! ICMPv4 message view (RFC 792, RFC 1191 for the next-hop MTU) with incremental checksum
//! maintenance (RFC 1624).
//!
//! What it does: validates the 8-byte header, reads type, code, checksum, the echo identifier
//! and sequence number, the next-hop MTU of "fragmentation needed", classifies error messages
//! (destination unreachable, source quench, time exceeded, parameter problem), exposes the
//! quoted packet of an error message, and rewrites the echo identifier incrementally.
//!
//! What it does not do: it does not parse the quoted packet (see [`parse`](crate::parse) and
//! [`InnerSummary`](crate::InnerSummary)), does not handle timestamp, redirect or other
//! informational messages beyond reading their header, and has no pseudo-header (ICMPv4 has
//! none, so address changes never affect its checksum).
//!
//! The view's buffer is the whole ICMP message (for example
//! [`Ipv4Packet::payload`](crate::Ipv4Packet::payload)).

use crate::checksum::{self, Delta};
use crate::field::icmp;
use crate::field::{get_u16, get_u32, set_u16};
use crate::WireError;

/// A view of an ICMPv4 message in a byte buffer.
///
/// Built with [`new_checked`](Self::new_checked) every accessor is in bounds. Built with
/// [`new_unchecked`](Self::new_unchecked) accessors may panic on a malformed buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> IcmpPacket<T> {
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

    /// Validate: buffer >= 8 bytes. The quoted packet of an error is not validated here.
    #[inline]
    pub fn check_len(&self) -> Result<(), WireError> {
        if self.buffer.as_ref().len() < icmp::HEADER_LEN {
            return Err(WireError::IcmpTruncated);
        }
        Ok(())
    }

    /// The underlying buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The message type.
    #[inline]
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[icmp::TYPE]
    }

    /// The message code.
    #[inline]
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[icmp::CODE]
    }

    /// The checksum field (covers the whole message).
    #[inline]
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), icmp::CHECKSUM)
    }

    /// Bytes 4..8 of the header as one big-endian word.
    #[inline]
    pub fn rest_of_header(&self) -> u32 {
        get_u32(self.buffer.as_ref(), icmp::REST)
    }

    /// The echo identifier (bytes 4..6; meaningful for echo request/reply).
    #[inline]
    pub fn echo_identifier(&self) -> u16 {
        get_u16(self.buffer.as_ref(), icmp::ECHO_ID)
    }

    /// The echo sequence number (bytes 6..8; meaningful for echo request/reply).
    #[inline]
    pub fn echo_sequence(&self) -> u16 {
        get_u16(self.buffer.as_ref(), icmp::ECHO_SEQ)
    }

    /// True for error messages that quote a packet: destination unreachable (3), source
    /// quench (4), time exceeded (11), parameter problem (12).
    #[inline]
    pub fn is_error(&self) -> bool {
        icmp::is_error_type(self.msg_type())
    }

    /// True for an echo request (type 8).
    #[inline]
    pub fn is_echo_request(&self) -> bool {
        self.msg_type() == icmp::ECHO_REQUEST
    }

    /// True for an echo reply (type 0).
    #[inline]
    pub fn is_echo_reply(&self) -> bool {
        self.msg_type() == icmp::ECHO_REPLY
    }

    /// The next-hop MTU of a "fragmentation needed" message (type 3 code 4, RFC 1191);
    /// `None` for other messages. A value of 0 comes from a pre-RFC 1191 router.
    #[inline]
    pub fn next_hop_mtu(&self) -> Option<u16> {
        (self.msg_type() == icmp::DEST_UNREACHABLE && self.code() == icmp::CODE_FRAG_NEEDED)
            .then(|| get_u16(self.buffer.as_ref(), icmp::MTU))
    }

    /// Bytes after the 8-byte header: for an error message, the quoted packet (its IPv4 header
    /// and at least the first 8 bytes of its payload when well formed; possibly truncated).
    #[inline]
    pub fn inner(&self) -> &[u8] {
        &self.buffer.as_ref()[icmp::HEADER_LEN..]
    }

    /// True when the checksum over the whole message is valid.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(self.buffer.as_ref(), 0)) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IcmpPacket<T> {
    /// Set the 16-bit field at `off` and update the checksum incrementally.
    #[inline(always)]
    fn set_field(&mut self, off: usize, value: u16) {
        let b = self.buffer.as_mut();
        let old = get_u16(b, off);
        set_u16(b, off, value);
        let c = Delta::new()
            .u16(old, value)
            .apply(get_u16(b, icmp::CHECKSUM));
        set_u16(b, icmp::CHECKSUM, c);
    }

    /// Set the echo identifier and update the checksum incrementally.
    #[inline]
    pub fn set_echo_identifier(&mut self, id: u16) {
        self.set_field(icmp::ECHO_ID, id);
    }

    /// Set the echo sequence number and update the checksum incrementally.
    #[inline]
    pub fn set_echo_sequence(&mut self, seq: u16) {
        self.set_field(icmp::ECHO_SEQ, seq);
    }

    /// Write the checksum field as is (no computation).
    #[inline]
    pub fn set_checksum(&mut self, check: u16) {
        set_u16(self.buffer.as_mut(), icmp::CHECKSUM, check);
    }

    /// Recompute the checksum over the whole message from scratch.
    #[inline]
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::internet_checksum(self.buffer.as_ref());
        self.set_checksum(c);
    }

    /// The bytes after the 8-byte header, mutable. Changing them invalidates the checksum.
    #[inline]
    pub fn inner_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[icmp::HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, Ipv4Spec};
    use crate::ICMP_ECHO_REQUEST;

    #[test]
    fn echo_accessors_and_setters() {
        let bytes = testutil::build_icmp_echo(&Ipv4Spec::default(), true, 0x1234, 7, b"ping");
        let mut msg = bytes[20..].to_vec();
        let mut p = IcmpPacket::new_checked(&mut msg[..]).unwrap();
        assert_eq!(p.msg_type(), ICMP_ECHO_REQUEST);
        assert_eq!(p.code(), 0);
        assert!(p.is_echo_request() && !p.is_echo_reply() && !p.is_error());
        assert_eq!(p.echo_identifier(), 0x1234);
        assert_eq!(p.echo_sequence(), 7);
        assert_eq!(p.rest_of_header(), 0x1234_0007);
        assert_eq!(p.next_hop_mtu(), None);
        assert_eq!(p.inner(), b"ping");
        assert!(p.verify_checksum());
        p.set_echo_identifier(0xfffe);
        p.set_echo_sequence(8);
        assert!(p.verify_checksum());
        let inc = p.checksum();
        p.fill_checksum();
        assert_eq!(p.checksum(), inc);
        p.inner_mut()[0] = b'P';
        assert!(!p.verify_checksum());
        p.set_checksum(0);
        assert_eq!(p.checksum(), 0);

        let reply = testutil::build_icmp_echo(&Ipv4Spec::default(), false, 1, 1, b"");
        let p = IcmpPacket::new_checked(&reply[20..]).unwrap();
        assert!(p.is_echo_reply() && !p.is_echo_request());
    }

    #[test]
    fn error_classification_and_mtu() {
        let inner = testutil::build_udp(&Ipv4Spec::default(), 1, 2, &[0; 16]);
        let ip = Ipv4Spec::default();
        let fn_ = testutil::build_icmp_frag_needed(&ip, 1400, &inner, 28);
        let p = IcmpPacket::new_checked(&fn_[20..]).unwrap();
        assert!(p.is_error());
        assert_eq!(p.next_hop_mtu(), Some(1400));
        assert_eq!(p.inner(), &inner[..28]);
        assert!(p.verify_checksum());
        for t in 0..=255u8 {
            let mut m = [0u8; 8];
            m[0] = t;
            let p = IcmpPacket::new_checked(&m[..]).unwrap();
            assert_eq!(p.is_error(), matches!(t, 3 | 4 | 11 | 12), "type {t}");
        }
        let te = testutil::build_icmp_time_exceeded(&ip, &inner, 28);
        let p = IcmpPacket::new_checked(&te[20..]).unwrap();
        assert!(p.is_error());
        assert_eq!(p.next_hop_mtu(), None);
    }

    #[test]
    fn error_truncated() {
        assert_eq!(
            IcmpPacket::new_checked(&[8u8, 0, 0, 0, 0, 0, 0][..]),
            Err(WireError::IcmpTruncated)
        );
    }
}
