//! # snatgw-wire
//!
//! Checked, zero-copy views over IPv4 packet bytes, in-place NAT rewriting and
//! incremental Internet checksums for the snatgw data plane.
//!
//! The crate is organised like smoltcp's `wire` module:
//!
//! * `field` (internal): one table per header (IPv4, TCP, UDP, ICMP, ESP) with every offset,
//!   length, mask, flag bit and protocol number; everything below, and the public constants
//!   (`PROTO_TCP`, `IPV4_MIN_HEADER_LEN`, `ICMP_ECHO_REQUEST`, ...), come from it.
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
pub use esp::EspPacket;
pub use field::esp::HEADER_LEN as ESP_HEADER_LEN;
pub use field::icmp::{
    CODE_FRAG_NEEDED as ICMP_CODE_FRAG_NEEDED, CODE_PORT_UNREACHABLE as ICMP_CODE_PORT_UNREACHABLE,
    DEST_UNREACHABLE as ICMP_DEST_UNREACHABLE, ECHO_REPLY as ICMP_ECHO_REPLY,
    ECHO_REQUEST as ICMP_ECHO_REQUEST, HEADER_LEN as ICMP_HEADER_LEN,
    PARAMETER_PROBLEM as ICMP_PARAMETER_PROBLEM, SOURCE_QUENCH as ICMP_SOURCE_QUENCH,
    TIME_EXCEEDED as ICMP_TIME_EXCEEDED,
};
pub use field::ipv4::{
    MAX_HEADER_LEN as IPV4_MAX_HEADER_LEN, MIN_HEADER_LEN as IPV4_MIN_HEADER_LEN, PROTO_ESP,
    PROTO_ICMP, PROTO_TCP, PROTO_UDP,
};
pub use field::tcp::MIN_HEADER_LEN as TCP_MIN_HEADER_LEN;
pub use field::udp::HEADER_LEN as UDP_HEADER_LEN;
pub use icmp::IcmpPacket;
pub use ipv4::Ipv4Packet;
pub use rewrite::{
    rewrite_dst, rewrite_icmp_error_inbound, rewrite_icmp_error_outbound, rewrite_src,
};
pub use summary::{parse, Frag, IcmpKind, InnerSummary, Summary};
pub use tcp::{TcpFlags, TcpPacket};
pub use udp::UdpPacket;
pub use verify::verify_checksums;
