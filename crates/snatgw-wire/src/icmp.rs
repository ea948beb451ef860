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
use crate::field::{get_u16, get_u32, set_u16};
use crate::WireError;

/// Length of the ICMP header (type, code, checksum, 4 bytes of rest-of-header).
pub const ICMP_HEADER_LEN: usize = 8;

/// ICMP type: echo reply.
pub const ICMP_ECHO_REPLY: u8 = 0;
/// ICMP type: destination unreachable.
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
/// ICMP type: source quench (deprecated by RFC 6633, still classified as an error).
pub const ICMP_SOURCE_QUENCH: u8 = 4;
/// ICMP type: echo request.
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP type: time exceeded.
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMP type: parameter problem.
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Destination-unreachable code: port unreachable.
pub const ICMP_CODE_PORT_UNREACHABLE: u8 = 3;
/// Destination-unreachable code: fragmentation needed and DF set (RFC 1191).
pub const ICMP_CODE_FRAG_NEEDED: u8 = 4;

pub(crate) mod off {
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: usize = 2;
    pub const ECHO_ID: usize = 4;
    pub const ECHO_SEQ: usize = 6;
    pub const MTU: usize = 6;
}

/// True for the ICMP types that carry a quoted packet: 3, 4, 11, 12.
#[inline(always)]
pub(crate) const fn is_error_type(t: u8) -> bool {
    matches!(
        t,
        ICMP_DEST_UNREACHABLE | ICMP_SOURCE_QUENCH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    )
}

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
        if self.buffer.as_ref().len() < ICMP_HEADER_LEN {
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
        self.buffer.as_ref()[off::TYPE]
    }

    /// The message code.
    #[inline]
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[off::CODE]
    }

    /// The checksum field (covers the whole message).
    #[inline]
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), off::CHECKSUM)
    }

    /// Bytes 4..8 of the header as one big-endian word.
    #[inline]
    pub fn rest_of_header(&self) -> u32 {
        get_u32(self.buffer.as_ref(), off::ECHO_ID)
    }

    /// The echo identifier (bytes 4..6; meaningful for echo request/reply).
    #[inline]
    pub fn echo_identifier(&self) -> u16 {
        get_u16(self.buffer.as_ref(), off::ECHO_ID)
    }

    /// The echo sequence number (bytes 6..8; meaningful for echo request/reply).
    #[inline]
    pub fn echo_sequence(&self) -> u16 {
        get_u16(self.buffer.as_ref(), off::ECHO_SEQ)
    }

    /// True for error messages that quote a packet: destination unreachable (3), source
    /// quench (4), time exceeded (11), parameter problem (12).
    #[inline]
    pub fn is_error(&self) -> bool {
        is_error_type(self.msg_type())
    }

    /// True for an echo request (type 8).
    #[inline]
    pub fn is_echo_request(&self) -> bool {
        self.msg_type() == ICMP_ECHO_REQUEST
    }

    /// True for an echo reply (type 0).
    #[inline]
    pub fn is_echo_reply(&self) -> bool {
        self.msg_type() == ICMP_ECHO_REPLY
    }

    /// The next-hop MTU of a "fragmentation needed" message (type 3 code 4, RFC 1191);
    /// `None` for other messages. A value of 0 comes from a pre-RFC 1191 router.
    #[inline]
    pub fn next_hop_mtu(&self) -> Option<u16> {
        (self.msg_type() == ICMP_DEST_UNREACHABLE && self.code() == ICMP_CODE_FRAG_NEEDED)
            .then(|| get_u16(self.buffer.as_ref(), off::MTU))
    }

    /// Bytes after the 8-byte header: for an error message, the quoted packet (its IPv4 header
    /// and at least the first 8 bytes of its payload when well formed; possibly truncated).
    #[inline]
    pub fn inner(&self) -> &[u8] {
        &self.buffer.as_ref()[ICMP_HEADER_LEN..]
    }

    /// True when the checksum over the whole message is valid.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(self.buffer.as_ref(), 0)) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IcmpPacket<T> {
    /// Set the echo identifier and update the checksum incrementally.
    #[inline]
    pub fn set_echo_identifier(&mut self, id: u16) {
        let old = self.echo_identifier();
        let b = self.buffer.as_mut();
        set_u16(b, off::ECHO_ID, id);
        let c = Delta::new().u16(old, id).apply(get_u16(b, off::CHECKSUM));
        set_u16(b, off::CHECKSUM, c);
    }

    /// Set the echo sequence number and update the checksum incrementally.
    #[inline]
    pub fn set_echo_sequence(&mut self, seq: u16) {
        let old = self.echo_sequence();
        let b = self.buffer.as_mut();
        set_u16(b, off::ECHO_SEQ, seq);
        let c = Delta::new().u16(old, seq).apply(get_u16(b, off::CHECKSUM));
        set_u16(b, off::CHECKSUM, c);
    }

    /// Write the checksum field as is (no computation).
    #[inline]
    pub fn set_checksum(&mut self, check: u16) {
        set_u16(self.buffer.as_mut(), off::CHECKSUM, check);
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
        &mut self.buffer.as_mut()[ICMP_HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, Ipv4Spec};

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
