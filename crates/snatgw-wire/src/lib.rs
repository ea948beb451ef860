//! # snatgw-wire
//!
//! Checked, zero-copy views over IPv4 packet bytes, in-place NAT rewriting and
//! incremental Internet checksums for the snatgw data plane.
//!
//! The crate is organised like smoltcp's `wire` module:
//!
//! * [`checksum`]: the Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//! * [`Ipv4Packet`], [`TcpPacket`], [`UdpPacket`], [`IcmpPacket`], [`EspPacket`]: typed views
//!   over a byte buffer (`T: AsRef<[u8]>`, mutable when `T: AsMut<[u8]>`). `new_checked`
//!   validates lengths once so the accessors cannot go out of bounds; `new_unchecked` skips
//!   validation and its accessors may panic on short buffers.
//! * [`parse`]: one pass over an IPv4 packet producing a [`Summary`]: the facts a NAT needs
//!   (5-tuple, TCP flags, fragmentation, ICMP echo identifier or the quoted packet of an ICMP
//!   error) plus the offsets used by the rewrite functions. `parse` never panics.
//! * [`rewrite_src`], [`rewrite_dst`], [`rewrite_icmp_error_inbound`],
//!   [`rewrite_icmp_error_outbound`]: in-place translation that keeps every checksum valid
//!   with incremental updates (SPEC R1.1 stateless 1:1 NAT, R2.1 PAT, R3.6 ICMP errors).
//!
//! What this crate does **not** do: it does not allocate, route, reassemble fragments, keep
//! state, verify checksums during [`parse`] (the views offer `verify_checksum`), interpret IPv4
//! or TCP options, or handle IPv6. Bytes after the IPv4 total length (link-layer padding) are
//! ignored and never modified.
//!
//! The `testutil` cargo feature (always on in this crate's tests) exposes `testutil`: builders
//! for valid packets with correct checksums, for other crates' tests and fuzz corpora.
#![forbid(unsafe_code)]

pub mod checksum;
mod error;
mod esp;
mod field;
mod icmp;
mod ipv4;
mod rewrite;
mod summary;
mod tcp;
mod udp;
mod verify;

#[cfg(any(test, feature = "testutil"))]
pub mod testutil;

#[cfg(test)]
mod proptests;

pub use error::WireError;
pub use esp::{EspPacket, ESP_HEADER_LEN};
pub use icmp::{
    IcmpPacket, ICMP_CODE_FRAG_NEEDED, ICMP_CODE_PORT_UNREACHABLE, ICMP_DEST_UNREACHABLE,
    ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_HEADER_LEN, ICMP_PARAMETER_PROBLEM,
    ICMP_SOURCE_QUENCH, ICMP_TIME_EXCEEDED,
};
pub use ipv4::{Ipv4Packet, IPV4_MAX_HEADER_LEN, IPV4_MIN_HEADER_LEN};
pub use rewrite::{
    rewrite_dst, rewrite_icmp_error_inbound, rewrite_icmp_error_outbound, rewrite_src,
};
pub use summary::{parse, Frag, IcmpKind, InnerSummary, Summary};
pub use tcp::{TcpFlags, TcpPacket, TCP_MIN_HEADER_LEN};
pub use udp::{UdpPacket, UDP_HEADER_LEN};
pub use verify::verify_checksums;

/// IP protocol number of ICMP (RFC 792).
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP (RFC 9293).
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP (RFC 768).
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ESP (RFC 4303).
pub const PROTO_ESP: u8 = 50;
