//! Full verification of every checksum in a packet, for fuzzing, tests and diagnostics.
//!
//! What it does: recomputes the IPv4 header checksum and, where the bytes allow, the
//! TCP/UDP/ICMP checksum and an ICMP error's quoted header and segment (RFC 791, 793, 768,
//! 792), and names the first one that is wrong. What it does not do: run on the data path
//! (translation keeps checksums valid incrementally, RFC 1624, and never needs a full recompute).

use crate::field::icmp;
use crate::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

/// Check every checksum that can be checked: the IPv4 header; TCP/UDP/ICMP of an unfragmented
/// packet (a fragment's transport checksum covers bytes it does not hold); for an ICMP error,
/// the quoted IPv4 header and, when the whole quoted datagram is present, its TCP/UDP/ICMP
/// checksum. Returns which check failed.
pub fn verify_checksums(buf: &[u8]) -> Result<(), &'static str> {
    let s = crate::parse(buf).map_err(|e| e.reason())?;
    let ip = crate::Ipv4Packet::new_checked(buf).map_err(|e| e.reason())?;
    if !ip.verify_checksum() {
        return Err("ipv4 header checksum");
    }
    if s.frag != crate::Frag::None {
        return Ok(());
    }
    verify_l4(s.proto, s.src, s.dst, ip.payload(), "tcp", "udp", "icmp")?;
    if let Some(crate::IcmpKind::Error { .. }) = s.icmp {
        let q = &ip.payload()[icmp::HEADER_LEN..];
        let inner = crate::Ipv4Packet::new_unchecked(q);
        if !inner.verify_checksum() {
            return Err("inner ipv4 header checksum");
        }
        let tl = usize::from(inner.total_len());
        if tl <= q.len() && !inner.is_fragment() && tl >= usize::from(inner.header_len()) {
            let seg = &q[usize::from(inner.header_len())..tl];
            let (p, a, b) = (inner.protocol(), inner.src_addr(), inner.dst_addr());
            verify_l4(p, a, b, seg, "inner tcp", "inner udp", "inner icmp")?;
        }
    }
    Ok(())
}

fn verify_l4(
    proto: u8,
    src: u32,
    dst: u32,
    seg: &[u8],
    tcp: &'static str,
    udp: &'static str,
    icmp: &'static str,
) -> Result<(), &'static str> {
    let ok = match proto {
        PROTO_TCP => crate::TcpPacket::new_unchecked(seg).verify_checksum(src, dst),
        PROTO_UDP => crate::UdpPacket::new_checked(seg)
            .map(|u| u.verify_checksum(src, dst))
            .unwrap_or(false),
        PROTO_ICMP => crate::IcmpPacket::new_unchecked(seg).verify_checksum(),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(match proto {
            PROTO_TCP => tcp,
            PROTO_UDP => udp,
            _ => icmp,
        })
    }
}
