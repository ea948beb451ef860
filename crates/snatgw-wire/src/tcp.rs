//! TCP header view (RFC 9293) with incremental checksum maintenance (RFC 1624).
//!
//! What it does: validates the fixed header and the data offset, reads the fields the NAT needs
//! (ports, sequence and acknowledgment numbers, flags, window, checksum), verifies or fills the
//! checksum given the IPv4 pseudo-header addresses, and rewrites ports incrementally.
//!
//! What it does not do: it does not interpret options, track connection state, or know the IP
//! addresses: when an address changes use
//! [`adjust_checksum_for_addr`](TcpPacket::adjust_checksum_for_addr) or the crate-level
//! [`rewrite_src`](crate::rewrite_src) / [`rewrite_dst`](crate::rewrite_dst).
//!
//! The view's buffer is the whole TCP segment (for example [`Ipv4Packet::payload`](crate::Ipv4Packet::payload)).

use crate::checksum::{self, Delta};
use crate::field::tcp;
use crate::field::{get_u16, get_u32, set_u16};
use crate::{WireError, PROTO_TCP};

/// Validate a TCP header at the start of `b` (see [`TcpPacket::check_len`]); returns the fixed
/// 20-byte header.
#[inline(always)]
pub(crate) fn check_header(b: &[u8]) -> Result<&[u8; tcp::MIN_HEADER_LEN], WireError> {
    let Some(t) = b.first_chunk::<{ tcp::MIN_HEADER_LEN }>() else {
        return Err(WireError::TcpTruncated);
    };
    let doff = tcp::data_off(t[tcp::DATA_OFF]);
    if doff < tcp::MIN_DATA_OFF {
        return Err(WireError::BadTcpDataOffset(doff));
    }
    if tcp::header_len(t[tcp::DATA_OFF]) > b.len() {
        return Err(WireError::TcpTruncated);
    }
    Ok(t)
}

/// The TCP control flags the NAT cares about, decoded from the flag byte.
///
/// ECE and CWR are not represented; [`to_byte`](Self::to_byte) leaves them clear.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcpFlags {
    /// FIN: no more data from the sender.
    pub fin: bool,
    /// SYN: synchronize sequence numbers.
    pub syn: bool,
    /// RST: reset the connection.
    pub rst: bool,
    /// PSH: push function.
    pub psh: bool,
    /// ACK: the acknowledgment number is significant.
    pub ack: bool,
    /// URG: the urgent pointer is significant.
    pub urg: bool,
}

impl TcpFlags {
    /// FIN bit in the raw flag byte.
    pub const FIN: u8 = tcp::FLAG_FIN;
    /// SYN bit in the raw flag byte.
    pub const SYN: u8 = tcp::FLAG_SYN;
    /// RST bit in the raw flag byte.
    pub const RST: u8 = tcp::FLAG_RST;
    /// PSH bit in the raw flag byte.
    pub const PSH: u8 = tcp::FLAG_PSH;
    /// ACK bit in the raw flag byte.
    pub const ACK: u8 = tcp::FLAG_ACK;
    /// URG bit in the raw flag byte.
    pub const URG: u8 = tcp::FLAG_URG;

    /// Decode the raw flag byte (byte 13 of the header, e.g. [`Summary::tcp_flags`](crate::Summary::tcp_flags)).
    #[inline]
    pub const fn from_byte(b: u8) -> Self {
        Self {
            fin: b & Self::FIN != 0,
            syn: b & Self::SYN != 0,
            rst: b & Self::RST != 0,
            psh: b & Self::PSH != 0,
            ack: b & Self::ACK != 0,
            urg: b & Self::URG != 0,
        }
    }

    /// Encode as a raw flag byte (ECE and CWR clear).
    #[inline]
    pub const fn to_byte(self) -> u8 {
        let mut b = 0;
        if self.fin {
            b |= Self::FIN;
        }
        if self.syn {
            b |= Self::SYN;
        }
        if self.rst {
            b |= Self::RST;
        }
        if self.psh {
            b |= Self::PSH;
        }
        if self.ack {
            b |= Self::ACK;
        }
        if self.urg {
            b |= Self::URG;
        }
        b
    }

    /// A connection request: SYN set, ACK and RST clear (SPEC R3.1's "SYN (no ACK)").
    #[inline]
    pub const fn is_connection_request(self) -> bool {
        self.syn && !self.ack && !self.rst
    }
}

/// A view of a TCP segment (header + payload) in a byte buffer.
///
/// Built with [`new_checked`](Self::new_checked) every accessor is in bounds. Built with
/// [`new_unchecked`](Self::new_unchecked) accessors may panic on a malformed buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
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

    /// Validate: buffer >= 20 bytes, data offset >= 5 and the header fits in the buffer.
    #[inline]
    pub fn check_len(&self) -> Result<(), WireError> {
        check_header(self.buffer.as_ref()).map(|_| ())
    }

    /// The underlying buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The source port.
    #[inline]
    pub fn src_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), tcp::SRC_PORT)
    }

    /// The destination port.
    #[inline]
    pub fn dst_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), tcp::DST_PORT)
    }

    /// The sequence number.
    #[inline]
    pub fn seq(&self) -> u32 {
        get_u32(self.buffer.as_ref(), tcp::SEQ)
    }

    /// The acknowledgment number.
    #[inline]
    pub fn ack(&self) -> u32 {
        get_u32(self.buffer.as_ref(), tcp::ACK)
    }

    /// Header length in bytes (data offset * 4).
    #[inline]
    pub fn header_len(&self) -> u8 {
        tcp::header_len(self.buffer.as_ref()[tcp::DATA_OFF]) as u8
    }

    /// The raw flag byte (CWR ECE URG ACK PSH RST SYN FIN).
    #[inline]
    pub fn raw_flags(&self) -> u8 {
        self.buffer.as_ref()[tcp::FLAGS]
    }

    /// The decoded flags.
    #[inline]
    pub fn flags(&self) -> TcpFlags {
        TcpFlags::from_byte(self.raw_flags())
    }

    /// The window field.
    #[inline]
    pub fn window(&self) -> u16 {
        get_u16(self.buffer.as_ref(), tcp::WINDOW)
    }

    /// The checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), tcp::CHECKSUM)
    }

    /// The urgent pointer.
    #[inline]
    pub fn urgent(&self) -> u16 {
        get_u16(self.buffer.as_ref(), tcp::URGENT)
    }

    /// The options bytes (`20..header_len`).
    #[inline]
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[tcp::MIN_HEADER_LEN..usize::from(self.header_len())]
    }

    /// The payload (`header_len..` end of buffer).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[usize::from(self.header_len())..]
    }

    /// True when the checksum is valid for a segment between `src` and `dst` (the whole
    /// buffer is the segment).
    #[inline]
    pub fn verify_checksum(&self, src: u32, dst: u32) -> bool {
        let b = self.buffer.as_ref();
        let Ok(len) = u16::try_from(b.len()) else {
            return false;
        };
        let ph = checksum::pseudo_header_sum(src, dst, PROTO_TCP, len);
        checksum::fold(checksum::sum(b, ph)) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    #[inline(always)]
    fn update_checksum(&mut self, delta: Delta) {
        let b = self.buffer.as_mut();
        let c = delta.apply(get_u16(b, tcp::CHECKSUM));
        set_u16(b, tcp::CHECKSUM, c);
    }

    /// Set the source port and update the checksum incrementally.
    #[inline]
    pub fn set_src_port(&mut self, port: u16) {
        let old = self.src_port();
        set_u16(self.buffer.as_mut(), tcp::SRC_PORT, port);
        self.update_checksum(Delta::new().u16(old, port));
    }

    /// Set the destination port and update the checksum incrementally.
    #[inline]
    pub fn set_dst_port(&mut self, port: u16) {
        let old = self.dst_port();
        set_u16(self.buffer.as_mut(), tcp::DST_PORT, port);
        self.update_checksum(Delta::new().u16(old, port));
    }

    /// Update the checksum for a pseudo-header address change (the IP header is not touched).
    #[inline]
    pub fn adjust_checksum_for_addr(&mut self, old: u32, new: u32) {
        self.update_checksum(Delta::new().u32(old, new));
    }

    /// Write the checksum field as is (no computation).
    #[inline]
    pub fn set_checksum(&mut self, check: u16) {
        set_u16(self.buffer.as_mut(), tcp::CHECKSUM, check);
    }

    /// Recompute the checksum from scratch for a segment between `src` and `dst`.
    /// A segment longer than 65535 bytes gets checksum 0 (it cannot be carried by IPv4).
    #[inline]
    pub fn fill_checksum(&mut self, src: u32, dst: u32) {
        self.set_checksum(0);
        let b = self.buffer.as_ref();
        let c = match u16::try_from(b.len()) {
            Ok(len) => !checksum::fold(checksum::sum(
                b,
                checksum::pseudo_header_sum(src, dst, PROTO_TCP, len),
            )),
            Err(_) => 0,
        };
        self.set_checksum(c);
    }

    /// The payload, mutable (`header_len..` end of buffer).
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let hl = usize::from(self.header_len());
        &mut self.buffer.as_mut()[hl..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, Ipv4Spec, TcpSpec};
    use crate::Ipv4Packet;
    use crate::IPV4_MIN_HEADER_LEN;

    const SRC: u32 = 0x0a00_0004;
    const DST: u32 = 0x5db8_d822;

    fn sample() -> Vec<u8> {
        let ip = Ipv4Spec::between(SRC, DST);
        let tcp = TcpSpec {
            src_port: 40000,
            dst_port: 443,
            seq: 0x0102_0304,
            ack: 0x0a0b_0c0d,
            flags: TcpFlags::ACK | TcpFlags::PSH,
            window: 29200,
            urgent: 7,
            options: vec![1, 1, 1, 1],
        };
        testutil::build_tcp(&ip, &tcp, b"hello")
    }

    #[test]
    fn accessors() {
        let bytes = sample();
        let ip = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(t.src_port(), 40000);
        assert_eq!(t.dst_port(), 443);
        assert_eq!(t.seq(), 0x0102_0304);
        assert_eq!(t.ack(), 0x0a0b_0c0d);
        assert_eq!(t.header_len(), 24);
        assert_eq!(t.raw_flags(), 0x18);
        assert_eq!(
            t.flags(),
            TcpFlags {
                psh: true,
                ack: true,
                ..TcpFlags::default()
            }
        );
        assert_eq!(t.window(), 29200);
        assert_eq!(t.urgent(), 7);
        assert_eq!(t.options(), &[1, 1, 1, 1]);
        assert_eq!(t.payload(), b"hello");
        assert!(t.verify_checksum(SRC, DST));
        assert!(!t.verify_checksum(SRC + 1, DST));
        assert_eq!(t.checksum(), get_u16(ip.payload(), tcp::CHECKSUM));
    }

    #[test]
    fn flags_roundtrip() {
        for b in 0..=0x3fu8 {
            assert_eq!(TcpFlags::from_byte(b).to_byte(), b);
        }
        assert_eq!(TcpFlags::from_byte(0xc0).to_byte(), 0);
        assert!(TcpFlags::from_byte(TcpFlags::SYN).is_connection_request());
        assert!(!TcpFlags::from_byte(TcpFlags::SYN | TcpFlags::ACK).is_connection_request());
        assert!(!TcpFlags::from_byte(TcpFlags::SYN | TcpFlags::RST).is_connection_request());
    }

    #[test]
    fn setters_keep_checksum_valid() {
        let mut bytes = sample();
        let hl = IPV4_MIN_HEADER_LEN;
        let mut t = TcpPacket::new_checked(&mut bytes[hl..]).unwrap();
        t.set_src_port(1024);
        t.set_dst_port(8443);
        assert!(t.verify_checksum(SRC, DST));
        t.adjust_checksum_for_addr(SRC, 0xc633_6401);
        assert!(t.verify_checksum(0xc633_6401, DST));
        let inc = t.checksum();
        t.fill_checksum(0xc633_6401, DST);
        assert_eq!(t.checksum(), inc);
        t.payload_mut()[0] = b'j';
        assert!(!t.verify_checksum(0xc633_6401, DST));
        t.set_checksum(0);
        assert_eq!(t.checksum(), 0);
    }

    #[test]
    fn error_truncated_header() {
        let bytes = sample();
        assert_eq!(
            TcpPacket::new_checked(&bytes[20..39]),
            Err(WireError::TcpTruncated)
        );
        // Data offset 6 (24 bytes) but only 22 bytes.
        assert_eq!(
            TcpPacket::new_checked(&bytes[20..42]),
            Err(WireError::TcpTruncated)
        );
    }

    #[test]
    fn error_bad_data_offset() {
        let mut bytes = sample();
        bytes[IPV4_MIN_HEADER_LEN + tcp::DATA_OFF] = tcp::data_off_byte(16);
        assert_eq!(
            TcpPacket::new_checked(&bytes[20..]),
            Err(WireError::BadTcpDataOffset(4))
        );
    }
}
