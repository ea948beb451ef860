//! In-place NAT rewriting with incremental checksums (RFC 1624; RFC 3022 section 4.2 for
//! what a NAPT must adjust, RFC 5508 section 4 for ICMP error translation).
//!
//! What it does: given the bytes and the [`Summary`] that [`parse`](crate::parse) produced
//! for them, rewrites the source or destination address (and port or ICMP echo identifier)
//! and updates every checksum the change touches: the IPv4 header checksum, the TCP/UDP
//! checksum (whose pseudo-header covers the addresses), and the ICMP checksum. For ICMP errors
//! it also rewrites the quoted packet (SPEC R3.6) and keeps the quoted IPv4 and transport
//! checksums and the outer ICMP checksum consistent.
//!
//! What it does not do: it does not look up or choose translations, does not verify
//! checksums (an incorrect checksum stays exactly as incorrect), does not rewrite IPv4 options
//! (source routes) or payloads (no ALGs), and never touches bytes after the IPv4 total length.
//!
//! Every function validates the summary against the bytes before writing anything: on `Err`
//! the buffer is unchanged, and no input makes them panic.

use crate::checksum::Delta;
use crate::field::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::field::{get_u16, get_u32, set_u16, set_u32};
use crate::field::{icmp, ipv4, tcp, udp};
use crate::udp::update_udp_checksum;
use crate::{Frag, IcmpKind, Summary, WireError};

/// Which end of a flow a rewrite applies to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
}

impl Side {
    #[inline(always)]
    const fn ip_off(self) -> usize {
        match self {
            Side::Src => ipv4::SRC,
            Side::Dst => ipv4::DST,
        }
    }

    /// Offset of the port in a TCP or UDP header (the same in both, see `field`).
    #[inline(always)]
    const fn port_off(self) -> usize {
        match self {
            Side::Src => udp::SRC_PORT,
            Side::Dst => udp::DST_PORT,
        }
    }
}

/// Check that `s` describes `buf`; returns (header_len, total_len).
#[inline(always)]
fn check_outer(buf: &[u8], s: &Summary) -> Result<(usize, usize), WireError> {
    let hl = usize::from(s.l3_len);
    let tl = usize::from(s.total_len);
    if hl < ipv4::MIN_HEADER_LEN
        || hl > tl
        || tl > buf.len()
        || buf[ipv4::VER_IHL] != ipv4::ver_ihl(hl)
        || hl % ipv4::IHL_UNIT != 0
        || usize::from(get_u16(buf, ipv4::TOTAL_LEN)) != tl
        || buf[ipv4::PROTOCOL] != s.proto
        || (get_u16(buf, ipv4::FLAGS_FRAG) & ipv4::FRAG_MASK != 0)
            != matches!(s.frag, Frag::NonFirst { .. })
    {
        return Err(WireError::SummaryMismatch);
    }
    Ok((hl, tl))
}

/// Rewrite the IPv4 address at `side` and fix the header checksum; returns the old address.
#[inline(always)]
fn rewrite_ip_addr(buf: &mut [u8], side: Side, addr: u32) -> u32 {
    let off = side.ip_off();
    let old = get_u32(buf, off);
    set_u32(buf, off, addr);
    let c = Delta::new()
        .u32(old, addr)
        .apply(get_u16(buf, ipv4::CHECKSUM));
    set_u16(buf, ipv4::CHECKSUM, c);
    old
}

/// What the transport part of a rewrite has to do.
#[derive(Clone, Copy)]
enum L4 {
    None,
    Tcp,
    Udp,
    IcmpEcho,
}

#[inline(always)]
fn rewrite_addr_port(
    buf: &mut [u8],
    s: &Summary,
    side: Side,
    addr: u32,
    port: Option<u16>,
) -> Result<(), WireError> {
    let (hl, tl) = check_outer(buf, s)?;
    let l4_present = !matches!(s.frag, Frag::NonFirst { .. });
    let l4 = match s.proto {
        PROTO_TCP if l4_present => L4::Tcp,
        PROTO_UDP if l4_present => L4::Udp,
        PROTO_ICMP if l4_present && matches!(s.icmp, Some(IcmpKind::Echo { .. })) => L4::IcmpEcho,
        _ => L4::None,
    };
    let need = match l4 {
        L4::None => 0,
        L4::Tcp => tcp::MIN_HEADER_LEN,
        L4::Udp => udp::HEADER_LEN,
        L4::IcmpEcho => icmp::HEADER_LEN,
    };
    if tl - hl < need || (matches!(l4, L4::IcmpEcho) && !icmp::is_echo_type(buf[hl + icmp::TYPE])) {
        return Err(WireError::SummaryMismatch);
    }
    let old_addr = rewrite_ip_addr(buf, side, addr);
    match l4 {
        L4::None => {}
        L4::Tcp | L4::Udp => {
            let mut delta = Delta::new().u32(old_addr, addr);
            if let Some(p) = port {
                let off = hl + side.port_off();
                delta = delta.u16(get_u16(buf, off), p);
                set_u16(buf, off, p);
            }
            if let L4::Tcp = l4 {
                let off = hl + tcp::CHECKSUM;
                set_u16(buf, off, delta.apply(get_u16(buf, off)));
            } else {
                let off = hl + udp::CHECKSUM;
                set_u16(buf, off, update_udp_checksum(get_u16(buf, off), delta));
            }
        }
        L4::IcmpEcho => {
            // ICMP has no pseudo-header: only the identifier change matters.
            if let Some(id) = port {
                let off = hl + icmp::ECHO_ID;
                let delta = Delta::new().u16(get_u16(buf, off), id);
                set_u16(buf, off, id);
                let c = hl + icmp::CHECKSUM;
                set_u16(buf, c, delta.apply(get_u16(buf, c)));
            }
        }
    }
    Ok(())
}

/// Rewrite the source address (and the source port when `port` is `Some` and the packet
/// carries ports: TCP/UDP, unfragmented or first fragment; for an ICMP echo, the identifier).
///
/// Updates the IPv4 header checksum, the TCP/UDP checksum (its pseudo-header includes the
/// address, so an address change alone also updates it; a UDP checksum of 0 stays 0, a result
/// of 0 is written 0xffff), and the ICMP checksum for an identifier change. Non-first
/// fragments: only the IPv4 header changes. `port` is ignored for packets without ports.
///
/// `s` must come from [`parse`](crate::parse) of these bytes; a summary that does not match
/// gives [`WireError::SummaryMismatch`] and leaves the buffer unchanged.
#[inline]
pub fn rewrite_src(
    buf: &mut [u8],
    s: &Summary,
    addr: u32,
    port: Option<u16>,
) -> Result<(), WireError> {
    rewrite_addr_port(buf, s, Side::Src, addr, port)
}

/// Rewrite the destination address (and port / ICMP echo identifier); the mirror image of
/// [`rewrite_src`], with the same checksum rules.
#[inline]
pub fn rewrite_dst(
    buf: &mut [u8],
    s: &Summary,
    addr: u32,
    port: Option<u16>,
) -> Result<(), WireError> {
    rewrite_addr_port(buf, s, Side::Dst, addr, port)
}

/// For an ICMP error travelling towards the private side (inbound, SPEC R3.6): the outer
/// destination becomes `outer_dst` (the private address; outer header checksum updated), and
/// the quoted packet, which was sent by the instance after translation, has its SOURCE address
/// (and port, or echo identifier, when `inner_src_port` is `Some` and the quoted packet has
/// ports) rewritten back to `inner_src` / `inner_src_port`.
///
/// Checksums: the quoted IPv4 header checksum is updated incrementally; the quoted TCP/UDP
/// checksum only if its bytes are present (a quoted UDP checksum of 0 stays 0; a quoted TCP
/// checksum needs 18 bytes of TCP and is otherwise left alone); a quoted ICMP echo checksum for
/// the identifier; and the outer ICMP checksum for every 16-bit word changed inside the ICMP
/// message, checksum fields included (RFC 1624, RFC 5508 section 4.2).
#[inline]
pub fn rewrite_icmp_error_inbound(
    buf: &mut [u8],
    s: &Summary,
    outer_dst: u32,
    inner_src: u32,
    inner_src_port: Option<u16>,
) -> Result<(), WireError> {
    rewrite_icmp_error(
        buf,
        s,
        Side::Dst,
        outer_dst,
        Side::Src,
        inner_src,
        inner_src_port,
    )
}

/// Mirror image of [`rewrite_icmp_error_inbound`] for an ICMP error sent by an instance about
/// an inbound flow (SPEC R1.1 ILPIP): the outer source becomes `outer_src` (the public address)
/// and the quoted packet's DESTINATION address (and port / echo identifier) becomes
/// `inner_dst` / `inner_dst_port`. Same checksum rules.
#[inline]
pub fn rewrite_icmp_error_outbound(
    buf: &mut [u8],
    s: &Summary,
    outer_src: u32,
    inner_dst: u32,
    inner_dst_port: Option<u16>,
) -> Result<(), WireError> {
    rewrite_icmp_error(
        buf,
        s,
        Side::Src,
        outer_src,
        Side::Dst,
        inner_dst,
        inner_dst_port,
    )
}

/// Transport part of the quoted packet to rewrite.
#[derive(Clone, Copy)]
enum InnerL4 {
    None,
    Tcp,
    Udp,
    IcmpEcho,
}

fn rewrite_icmp_error(
    buf: &mut [u8],
    s: &Summary,
    outer_side: Side,
    outer_addr: u32,
    inner_side: Side,
    inner_addr: u32,
    inner_port: Option<u16>,
) -> Result<(), WireError> {
    let Some(IcmpKind::Error { inner, .. }) = s.icmp else {
        return Err(WireError::NotIcmpError);
    };
    let (hl, tl) = check_outer(buf, s)?;
    // Validate everything before the first write.
    let ii = usize::from(inner.inner_ip_offset);
    let il4 = usize::from(inner.inner_l4_offset);
    if s.proto != PROTO_ICMP
        || matches!(s.frag, Frag::NonFirst { .. })
        || ii != hl + icmp::HEADER_LEN
        || ii + ipv4::MIN_HEADER_LEN > tl
        || ipv4::version(buf[ii + ipv4::VER_IHL]) != ipv4::VERSION
        || il4 != ii + ipv4::header_len(buf[ii + ipv4::VER_IHL])
        || il4 < ii + ipv4::MIN_HEADER_LEN
        || il4 > tl
        || buf[ii + ipv4::PROTOCOL] != inner.proto
    {
        return Err(WireError::SummaryMismatch);
    }
    let l4 = if !inner.has_ports {
        InnerL4::None
    } else {
        if il4 + icmp::QUOTED_L4_LEN > tl {
            return Err(WireError::SummaryMismatch);
        }
        match inner.proto {
            PROTO_TCP => InnerL4::Tcp,
            PROTO_UDP => InnerL4::Udp,
            PROTO_ICMP if icmp::is_echo_type(buf[il4 + icmp::TYPE]) => InnerL4::IcmpEcho,
            _ => return Err(WireError::SummaryMismatch),
        }
    };

    // Outer header: address and header checksum. ICMP has no pseudo-header.
    rewrite_ip_addr(buf, outer_side, outer_addr);

    // Every word changed inside the ICMP message goes into `icmp_delta`.
    let mut icmp_delta = Delta::new();

    // Quoted IPv4 header: address and its header checksum.
    let a_off = ii + inner_side.ip_off();
    let old_addr = get_u32(buf, a_off);
    set_u32(buf, a_off, inner_addr);
    let addr_delta = Delta::new().u32(old_addr, inner_addr);
    let c_off = ii + ipv4::CHECKSUM;
    let old_c = get_u16(buf, c_off);
    let new_c = addr_delta.apply(old_c);
    set_u16(buf, c_off, new_c);
    icmp_delta = icmp_delta.u32(old_addr, inner_addr).u16(old_c, new_c);

    // Quoted transport header.
    match l4 {
        InnerL4::None => {}
        InnerL4::Tcp | InnerL4::Udp => {
            let mut l4_delta = addr_delta;
            if let Some(p) = inner_port {
                let off = il4 + inner_side.port_off();
                let old = get_u16(buf, off);
                set_u16(buf, off, p);
                l4_delta = l4_delta.u16(old, p);
                icmp_delta = icmp_delta.u16(old, p);
            }
            let (off, present) = match l4 {
                InnerL4::Tcp => {
                    let off = il4 + tcp::CHECKSUM;
                    (off, off + size_of::<u16>() <= tl)
                }
                _ => (il4 + udp::CHECKSUM, true),
            };
            if present {
                let old = get_u16(buf, off);
                let new = match l4 {
                    InnerL4::Tcp => l4_delta.apply(old),
                    _ => update_udp_checksum(old, l4_delta),
                };
                set_u16(buf, off, new);
                icmp_delta = icmp_delta.u16(old, new);
            }
        }
        InnerL4::IcmpEcho => {
            if let Some(id) = inner_port {
                let off = il4 + icmp::ECHO_ID;
                let old = get_u16(buf, off);
                set_u16(buf, off, id);
                let c_off = il4 + icmp::CHECKSUM;
                let old_c = get_u16(buf, c_off);
                let new_c = Delta::new().u16(old, id).apply(old_c);
                set_u16(buf, c_off, new_c);
                icmp_delta = icmp_delta.u16(old, id).u16(old_c, new_c);
            }
        }
    }

    let off = hl + icmp::CHECKSUM;
    set_u16(buf, off, icmp_delta.apply(get_u16(buf, off)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, Ipv4Spec, TcpSpec};
    use crate::{parse, IcmpPacket, Ipv4Packet, TcpPacket, UdpPacket};

    const PRIV: u32 = 0x0a00_0004;
    const PUB: u32 = 0xc633_6401;
    const REMOTE: u32 = 0x5db8_d822;
    const ROUTER: u32 = 0xcb00_7101;

    fn ip(src: u32, dst: u32) -> Ipv4Spec {
        Ipv4Spec::between(src, dst)
    }

    #[test]
    fn tcp_pat_roundtrip() {
        let orig = testutil::build_tcp(&ip(PRIV, REMOTE), &TcpSpec::default(), b"data");
        let mut b = orig.clone();
        let s = parse(&b).unwrap();
        rewrite_src(&mut b, &s, PUB, Some(1024)).unwrap();
        let expected = testutil::build_tcp(
            &ip(PUB, REMOTE),
            &TcpSpec {
                src_port: 1024,
                ..TcpSpec::default()
            },
            b"data",
        );
        assert_eq!(b, expected);
        let s2 = parse(&b).unwrap();
        rewrite_src(&mut b, &s2, PRIV, Some(TcpSpec::default().src_port)).unwrap();
        assert_eq!(b, orig);
    }

    #[test]
    fn dst_rewrite_udp_and_address_only() {
        let orig = testutil::build_udp(&ip(REMOTE, PUB), 53, 1024, b"answer");
        let mut b = orig.clone();
        let s = parse(&b).unwrap();
        rewrite_dst(&mut b, &s, PRIV, Some(5353)).unwrap();
        assert_eq!(
            b,
            testutil::build_udp(&ip(REMOTE, PRIV), 53, 5353, b"answer")
        );
        // Address only (ILPIP, R1.1): ports kept, L4 checksum still follows the address.
        let mut b = orig.clone();
        rewrite_dst(&mut b, &s, PRIV, None).unwrap();
        assert_eq!(
            b,
            testutil::build_udp(&ip(REMOTE, PRIV), 53, 1024, b"answer")
        );
        let u = UdpPacket::new_checked(&b[20..]).unwrap();
        assert!(u.verify_checksum(REMOTE, PRIV));
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        let mut b = testutil::build_udp_no_checksum(&ip(PRIV, REMOTE), 5000, 53, b"q");
        let s = parse(&b).unwrap();
        rewrite_src(&mut b, &s, PUB, Some(2000)).unwrap();
        assert_eq!(get_u16(&b, ipv4::MIN_HEADER_LEN + udp::CHECKSUM), 0);
        assert!(Ipv4Packet::new_checked(&b[..]).unwrap().verify_checksum());
    }

    #[test]
    fn icmp_echo_identifier() {
        let orig = testutil::build_icmp_echo(&ip(PRIV, REMOTE), true, 0x1111, 9, b"ping");
        let mut b = orig.clone();
        let s = parse(&b).unwrap();
        rewrite_src(&mut b, &s, PUB, Some(0x2222)).unwrap();
        assert_eq!(
            b,
            testutil::build_icmp_echo(&ip(PUB, REMOTE), true, 0x2222, 9, b"ping")
        );
        let reply = testutil::build_icmp_echo(&ip(REMOTE, PUB), false, 0x2222, 9, b"ping");
        let mut b = reply.clone();
        let s = parse(&b).unwrap();
        rewrite_dst(&mut b, &s, PRIV, Some(0x1111)).unwrap();
        assert_eq!(
            b,
            testutil::build_icmp_echo(&ip(REMOTE, PRIV), false, 0x1111, 9, b"ping")
        );
    }

    #[test]
    fn non_first_fragment_only_ip_header_changes() {
        let full = testutil::build_tcp(&ip(PRIV, REMOTE), &TcpSpec::default(), &[3; 80]);
        let frags = testutil::fragment(&full, 40);
        let expected_full = testutil::build_tcp(
            &ip(PUB, REMOTE),
            &TcpSpec {
                src_port: 1024,
                ..TcpSpec::default()
            },
            &[3; 80],
        );
        let expected = testutil::fragment(&expected_full, 40);
        for (f, e) in frags.iter().zip(&expected) {
            let mut b = f.clone();
            let s = parse(&b).unwrap();
            rewrite_src(&mut b, &s, PUB, Some(1024)).unwrap();
            assert_eq!(&b, e);
        }
    }

    #[test]
    fn trailing_bytes_untouched() {
        let mut b = testutil::tcp_syn(PRIV, 40000, REMOTE, 443);
        b.extend_from_slice(&[0xab; 4]);
        let s = parse(&b).unwrap();
        rewrite_src(&mut b, &s, PUB, Some(1)).unwrap();
        assert_eq!(&b[b.len() - 4..], &[0xab; 4]);
    }

    #[test]
    fn icmp_error_inbound_frag_needed_tcp() {
        // The instance PRIV:40000 -> REMOTE:443 was translated to PUB:1024.
        let sent = testutil::tcp_syn(PUB, 1024, REMOTE, 443);
        let orig = testutil::build_icmp_frag_needed(&ip(ROUTER, PUB), 1400, &sent, 48);
        let mut b = orig.clone();
        let s = parse(&b).unwrap();
        rewrite_icmp_error_inbound(&mut b, &s, PRIV, PRIV, Some(40000)).unwrap();
        let private_view = testutil::tcp_syn(PRIV, 40000, REMOTE, 443);
        let expected = testutil::build_icmp_frag_needed(&ip(ROUTER, PRIV), 1400, &private_view, 48);
        assert_eq!(b, expected);
        let icmp = IcmpPacket::new_checked(&b[20..]).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.next_hop_mtu(), Some(1400));
        let inner = Ipv4Packet::new_unchecked(icmp.inner());
        assert!(inner.verify_checksum());
        assert!(TcpPacket::new_checked(&icmp.inner()[20..])
            .unwrap()
            .verify_checksum(PRIV, REMOTE));
        // And back.
        let s = parse(&b).unwrap();
        rewrite_icmp_error_inbound(&mut b, &s, PUB, PUB, Some(1024)).unwrap();
        assert_eq!(b, orig);
    }

    #[test]
    fn icmp_error_inbound_truncated_tcp_checksum_left_alone() {
        let sent = testutil::tcp_syn(PUB, 1024, REMOTE, 443);
        for quote in [28usize, 36, 37] {
            let orig = testutil::build_icmp_time_exceeded(&ip(ROUTER, PUB), &sent, quote);
            let mut b = orig.clone();
            let s = parse(&b).unwrap();
            rewrite_icmp_error_inbound(&mut b, &s, PRIV, PRIV, Some(40000)).unwrap();
            let expected = testutil::build_icmp_time_exceeded(
                &ip(ROUTER, PRIV),
                &testutil::tcp_syn(PRIV, 40000, REMOTE, 443),
                quote,
            );
            if quote < 37 {
                assert_eq!(b, expected, "quote {quote}");
            } else {
                // Half a TCP checksum is quoted: that byte stays as it was.
                let last = b.len() - 1;
                assert_eq!(b[last], orig[last]);
                assert_eq!(b[..22], expected[..22]);
                assert_eq!(b[24..last], expected[24..last]);
                assert!(IcmpPacket::new_checked(&b[20..]).unwrap().verify_checksum());
            }
            assert_eq!(testutil::verify_checksums(&b), Ok(()));
        }
    }

    #[test]
    fn icmp_error_outbound_udp() {
        // Inbound flow REMOTE:53 -> PUB:5000 (ILPIP) was delivered as REMOTE:53 -> PRIV:5000;
        // the instance answers with port unreachable.
        let received = testutil::build_udp(&ip(REMOTE, PRIV), 53, 5000, b"dns");
        let orig = testutil::build_icmp_dest_unreachable(&ip(PRIV, REMOTE), 3, &received, 39);
        let mut b = orig.clone();
        let s = parse(&b).unwrap();
        rewrite_icmp_error_outbound(&mut b, &s, PUB, PUB, None).unwrap();
        let public_view = testutil::build_udp(&ip(REMOTE, PUB), 53, 5000, b"dns");
        let expected = testutil::build_icmp_dest_unreachable(&ip(PUB, REMOTE), 3, &public_view, 39);
        assert_eq!(b, expected);
    }

    #[test]
    fn icmp_error_inner_udp_zero_checksum_and_echo() {
        let sent = testutil::build_udp_no_checksum(&ip(PUB, REMOTE), 1024, 53, b"q");
        let mut b = testutil::build_icmp_dest_unreachable(&ip(REMOTE, PUB), 3, &sent, 29);
        let s = parse(&b).unwrap();
        rewrite_icmp_error_inbound(&mut b, &s, PRIV, PRIV, Some(5000)).unwrap();
        let exp_inner = testutil::build_udp_no_checksum(&ip(PRIV, REMOTE), 5000, 53, b"q");
        let exp = testutil::build_icmp_dest_unreachable(&ip(REMOTE, PRIV), 3, &exp_inner, 29);
        assert_eq!(b, exp);

        let ping = testutil::build_icmp_echo(&ip(PUB, REMOTE), true, 0x2222, 1, b"abcdef");
        let mut b = testutil::build_icmp_time_exceeded(&ip(ROUTER, PUB), &ping, 34);
        let s = parse(&b).unwrap();
        rewrite_icmp_error_inbound(&mut b, &s, PRIV, PRIV, Some(0x1111)).unwrap();
        let exp_ping = testutil::build_icmp_echo(&ip(PRIV, REMOTE), true, 0x1111, 1, b"abcdef");
        let exp = testutil::build_icmp_time_exceeded(&ip(ROUTER, PRIV), &exp_ping, 34);
        assert_eq!(b, exp);
    }

    #[test]
    fn errors_leave_buffer_unchanged() {
        let orig = testutil::tcp_syn(PRIV, 1, REMOTE, 2);
        let mut b = orig.clone();
        let s = parse(&b).unwrap();
        assert_eq!(
            rewrite_icmp_error_inbound(&mut b, &s, 1, 2, None),
            Err(WireError::NotIcmpError)
        );
        let mut bad = s;
        bad.proto = PROTO_UDP;
        assert_eq!(
            rewrite_src(&mut b, &bad, 1, None),
            Err(WireError::SummaryMismatch)
        );
        let mut bad = s;
        bad.total_len += 1;
        assert_eq!(
            rewrite_src(&mut b, &bad, 1, None),
            Err(WireError::SummaryMismatch)
        );
        let mut bad = s;
        bad.frag = Frag::NonFirst {
            ident: 0,
            offset: 8,
            more: false,
        };
        assert_eq!(
            rewrite_src(&mut b, &bad, 1, None),
            Err(WireError::SummaryMismatch)
        );
        let mut bad = s;
        bad.l3_len = 24;
        assert_eq!(
            rewrite_dst(&mut b, &bad, 1, None),
            Err(WireError::SummaryMismatch)
        );
        assert_eq!(
            rewrite_src(&mut b[..30], &s, 1, None),
            Err(WireError::SummaryMismatch)
        );
        assert_eq!(b, orig);
    }
}
