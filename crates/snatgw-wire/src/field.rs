//! Header layouts: one table per header, and big-endian field access (internal).
//!
//! What it does: names every offset, length, mask, flag bit and field value of the headers
//! this crate reads or writes, one submodule per header ([`ipv4`], [`tcp`], [`udp`], [`icmp`],
//! [`esp`]), in the style of smoltcp's `mod field`, plus the tiny decoders of packed fields
//! (version/IHL, TCP data offset). The views (`Ipv4Packet`, ...), [`parse`](crate::parse), the
//! rewrite functions, `verify_checksums` and `testutil` all take their offsets from here, so a
//! header layout is written down once. The crate's public constants (`PROTO_TCP`,
//! `IPV4_MIN_HEADER_LEN`, `ICMP_ECHO_REQUEST`, `TcpFlags::SYN`, ...) are re-exports of these.
//!
//! What it does not do: check bounds. The accessors index directly and panic when out of
//! bounds, which the checked constructors and `parse` rule out before calling them.

#[inline(always)]
pub(crate) fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

#[inline(always)]
pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// [`get_u32`] for a fixed-size header (`&[u8; N]`, as `first_chunk` gives) at a constant
/// offset: the indices stay constants, so the compiler checks them when it compiles and the
/// code has no bounds checks to fold. `parse` reads the addresses this way: through the slice
/// helper, the established-packet hot path takes one more instruction (callgrind,
/// docs/PERFORMANCE.md).
macro_rules! be_u32 {
    ($h:expr, $off:expr) => {
        u32::from_be_bytes([$h[$off], $h[$off + 1], $h[$off + 2], $h[$off + 3]])
    };
}
pub(crate) use be_u32;

#[inline(always)]
pub(crate) fn set_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline(always)]
pub(crate) fn set_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// The IPv4 header (RFC 791 section 3.1).
pub(crate) mod ipv4 {
    /// Byte offset: version (high nibble) and IHL (low nibble).
    pub const VER_IHL: usize = 0;
    /// Byte offset: type of service (DSCP and ECN).
    pub const TOS: usize = 1;
    /// Byte offset: total length, 16 bits.
    pub const TOTAL_LEN: usize = 2;
    /// Byte offset: identification, 16 bits.
    pub const IDENT: usize = 4;
    /// Byte offset: flags (3 bits) and fragment offset (13 bits), 16 bits.
    pub const FLAGS_FRAG: usize = 6;
    /// Byte offset: time to live.
    pub const TTL: usize = 8;
    /// Byte offset: protocol.
    pub const PROTOCOL: usize = 9;
    /// Byte offset: header checksum, 16 bits.
    pub const CHECKSUM: usize = 10;
    /// Byte offset: source address, 32 bits.
    pub const SRC: usize = 12;
    /// Byte offset: destination address, 32 bits.
    pub const DST: usize = 16;

    /// Length of an IPv4 header without options (also where the options start).
    pub const MIN_HEADER_LEN: usize = 20;
    /// Length of an IPv4 header with 40 bytes of options (IHL 15).
    pub const MAX_HEADER_LEN: usize = 60;
    /// The version field's value for IPv4.
    pub const VERSION: u8 = 4;
    /// The smallest valid IHL (a 20-byte header).
    pub const MIN_IHL: u8 = 5;
    /// Bytes per unit of the IHL field (32-bit words).
    pub const IHL_UNIT: usize = 4;
    /// Mask of the IHL in the [`VER_IHL`] byte.
    pub const IHL_MASK: u8 = 0x0f;
    /// Shift of the version in the [`VER_IHL`] byte.
    pub const VERSION_SHIFT: u32 = 4;

    /// Don't-fragment flag in the [`FLAGS_FRAG`] word.
    pub const FLAG_DF: u16 = 0x4000;
    /// More-fragments flag in the [`FLAGS_FRAG`] word.
    pub const FLAG_MF: u16 = 0x2000;
    /// Fragment offset in the [`FLAGS_FRAG`] word, in units of [`FRAG_UNIT`] bytes.
    pub const FRAG_MASK: u16 = 0x1fff;
    /// Bytes per unit of the fragment offset.
    pub const FRAG_UNIT: u16 = 8;

    /// IP protocol number of ICMP (RFC 792).
    pub const PROTO_ICMP: u8 = 1;
    /// IP protocol number of TCP (RFC 9293).
    pub const PROTO_TCP: u8 = 6;
    /// IP protocol number of UDP (RFC 768).
    pub const PROTO_UDP: u8 = 17;
    /// IP protocol number of ESP (RFC 4303).
    pub const PROTO_ESP: u8 = 50;

    /// The version nibble of a [`VER_IHL`] byte.
    #[inline(always)]
    pub const fn version(ver_ihl: u8) -> u8 {
        ver_ihl >> VERSION_SHIFT
    }

    /// The IHL nibble of a [`VER_IHL`] byte (32-bit words).
    #[inline(always)]
    pub const fn ihl(ver_ihl: u8) -> u8 {
        ver_ihl & IHL_MASK
    }

    /// The header length in bytes of a [`VER_IHL`] byte (IHL * 4).
    #[inline(always)]
    pub const fn header_len(ver_ihl: u8) -> usize {
        ihl(ver_ihl) as usize * IHL_UNIT
    }

    /// The [`VER_IHL`] byte of an IPv4 header `header_len` bytes long (a multiple of 4, at
    /// most [`MAX_HEADER_LEN`]; larger values wrap like the `as u8` they are).
    #[inline(always)]
    pub const fn ver_ihl(header_len: usize) -> u8 {
        (VERSION << VERSION_SHIFT) | (header_len / IHL_UNIT) as u8
    }
}

/// The TCP header (RFC 9293 section 3.1).
pub(crate) mod tcp {
    /// Byte offset: source port, 16 bits.
    pub const SRC_PORT: usize = 0;
    /// Byte offset: destination port, 16 bits.
    pub const DST_PORT: usize = 2;
    /// Byte offset: sequence number, 32 bits.
    pub const SEQ: usize = 4;
    /// Byte offset: acknowledgment number, 32 bits.
    pub const ACK: usize = 8;
    /// Byte offset: data offset (high nibble).
    pub const DATA_OFF: usize = 12;
    /// Byte offset: the flag byte (CWR ECE URG ACK PSH RST SYN FIN).
    pub const FLAGS: usize = 13;
    /// Byte offset: window, 16 bits.
    pub const WINDOW: usize = 14;
    /// Byte offset: checksum, 16 bits.
    pub const CHECKSUM: usize = 16;
    /// Byte offset: urgent pointer, 16 bits.
    pub const URGENT: usize = 18;

    /// Length of a TCP header without options (also where the options start).
    pub const MIN_HEADER_LEN: usize = 20;
    /// The smallest valid data offset (a 20-byte header).
    pub const MIN_DATA_OFF: u8 = 5;
    /// Bytes per unit of the data offset (32-bit words).
    pub const DATA_OFF_UNIT: usize = 4;
    /// Shift of the data offset in the [`DATA_OFF`] byte.
    pub const DATA_OFF_SHIFT: u32 = 4;

    /// FIN bit of the [`FLAGS`] byte.
    pub const FLAG_FIN: u8 = 0x01;
    /// SYN bit of the [`FLAGS`] byte.
    pub const FLAG_SYN: u8 = 0x02;
    /// RST bit of the [`FLAGS`] byte.
    pub const FLAG_RST: u8 = 0x04;
    /// PSH bit of the [`FLAGS`] byte.
    pub const FLAG_PSH: u8 = 0x08;
    /// ACK bit of the [`FLAGS`] byte.
    pub const FLAG_ACK: u8 = 0x10;
    /// URG bit of the [`FLAGS`] byte.
    pub const FLAG_URG: u8 = 0x20;

    /// The data offset (32-bit words) of a [`DATA_OFF`] byte.
    #[inline(always)]
    pub const fn data_off(byte: u8) -> u8 {
        byte >> DATA_OFF_SHIFT
    }

    /// The header length in bytes of a [`DATA_OFF`] byte (data offset * 4).
    #[inline(always)]
    pub const fn header_len(byte: u8) -> usize {
        data_off(byte) as usize * DATA_OFF_UNIT
    }

    /// The [`DATA_OFF`] byte of a TCP header `header_len` bytes long (a multiple of 4, at most
    /// 60). Only the packet builders write headers from scratch.
    #[cfg(any(test, feature = "testutil"))]
    #[inline(always)]
    pub const fn data_off_byte(header_len: usize) -> u8 {
        ((header_len / DATA_OFF_UNIT) as u8) << DATA_OFF_SHIFT
    }
}

// TCP and UDP both start with the source and destination ports: reading the ports of a
// quoted packet and rewriting a port (`parse`, the rewrites) rely on it.
const _: () = assert!(tcp::SRC_PORT == udp::SRC_PORT && tcp::DST_PORT == udp::DST_PORT);

/// The UDP header (RFC 768).
pub(crate) mod udp {
    /// Byte offset: source port, 16 bits.
    pub const SRC_PORT: usize = 0;
    /// Byte offset: destination port, 16 bits.
    pub const DST_PORT: usize = 2;
    /// Byte offset: length (header + payload), 16 bits.
    pub const LEN: usize = 4;
    /// Byte offset: checksum, 16 bits (0: no checksum).
    pub const CHECKSUM: usize = 6;
    /// Length of the UDP header.
    pub const HEADER_LEN: usize = 8;
}

/// The ICMPv4 header (RFC 792; RFC 1191 for the next-hop MTU).
pub(crate) mod icmp {
    /// Byte offset: message type.
    pub const TYPE: usize = 0;
    /// Byte offset: message code.
    pub const CODE: usize = 1;
    /// Byte offset: checksum over the whole message, 16 bits.
    pub const CHECKSUM: usize = 2;
    /// Byte offset: the 4 rest-of-header bytes.
    pub const REST: usize = 4;
    /// Byte offset: echo identifier, 16 bits (echo request and reply).
    pub const ECHO_ID: usize = 4;
    /// Byte offset: echo sequence number, 16 bits (echo request and reply).
    pub const ECHO_SEQ: usize = 6;
    /// Byte offset: next-hop MTU, 16 bits (fragmentation needed, RFC 1191).
    pub const MTU: usize = 6;
    /// Length of the ICMP header (type, code, checksum, rest of header); an error's quoted
    /// packet starts here.
    pub const HEADER_LEN: usize = 8;
    /// Bytes of the quoted datagram's payload an error message carries at least (RFC 792:
    /// "the first 64 bits"): the ports of TCP/UDP, an ICMP echo's identifier.
    pub const QUOTED_L4_LEN: usize = 8;

    /// ICMP type: echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// ICMP type: destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 3;
    /// ICMP type: source quench (deprecated by RFC 6633, still classified as an error).
    pub const SOURCE_QUENCH: u8 = 4;
    /// ICMP type: echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// ICMP type: time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
    /// ICMP type: parameter problem.
    pub const PARAMETER_PROBLEM: u8 = 12;
    /// Destination-unreachable code: port unreachable.
    pub const CODE_PORT_UNREACHABLE: u8 = 3;
    /// Destination-unreachable code: fragmentation needed and DF set (RFC 1191).
    pub const CODE_FRAG_NEEDED: u8 = 4;

    /// True for the ICMP types that carry a quoted packet: 3, 4, 11, 12.
    #[inline(always)]
    pub const fn is_error_type(t: u8) -> bool {
        matches!(
            t,
            DEST_UNREACHABLE | SOURCE_QUENCH | TIME_EXCEEDED | PARAMETER_PROBLEM
        )
    }

    /// True for echo request and echo reply.
    #[inline(always)]
    pub const fn is_echo_type(t: u8) -> bool {
        matches!(t, ECHO_REQUEST | ECHO_REPLY)
    }
}

/// The ESP header (RFC 4303 section 2).
pub(crate) mod esp {
    /// Byte offset: Security Parameters Index, 32 bits.
    pub const SPI: usize = 0;
    /// Byte offset: sequence number, 32 bits.
    pub const SEQ: usize = 4;
    /// Length of the ESP header (SPI + sequence number).
    pub const HEADER_LEN: usize = 8;
}
