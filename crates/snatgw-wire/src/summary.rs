//! One-pass parse of an IPv4 packet into the facts a NAT needs ([`Summary`]).
//!
//! What it does: validates every length once (IPv4 header and total length, the TCP header
//! with its data offset, the UDP header and length, the ICMP header, the ESP header, and for
//! ICMP errors (RFC 792, RFC 1812 section 4.3.2.3) the quoted IPv4 header with its IHL plus the
//! first 8 bytes of the quoted transport header), and extracts addresses, ports, TCP flags,
//! fragmentation and ICMP facts plus the offsets [`rewrite_src`](crate::rewrite_src) and
//! friends use. It never panics, on any input.
//!
//! What it does not do: it does not verify checksums (the views' `verify_checksum` do; an
//! incremental rewrite carries an existing checksum error through unchanged, RFC 1624), does not
//! interpret IPv4 or TCP options, does not reassemble fragments, and ignores bytes after the
//! IPv4 total length.
//!
//! Fragments (RFC 791): a non-first fragment (offset != 0) carries no transport header, so its
//! ports are 0 and nothing after the IPv4 header is looked at. A first fragment must hold the
//! whole transport header it starts (a TCP header cut by fragmentation is an error, the
//! RFC 1858 tiny-fragment case); its UDP length describes the whole datagram, so it is only
//! checked to be >= 8.

use crate::field::ipv4::{PROTO_ESP, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::field::{be_u32, get_u16, get_u32};
use crate::field::{esp, icmp, ipv4, tcp, udp};
use crate::WireError;

/// Fragmentation state of a packet (RFC 791).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Frag {
    /// Not a fragment (offset 0, more-fragments clear).
    None,
    /// First fragment (offset 0, more-fragments set): carries the transport header.
    First {
        /// IPv4 identification shared by all fragments of the datagram.
        ident: u16,
        /// More-fragments flag (always true for a first fragment).
        more: bool,
    },
    /// Later fragment: no transport header.
    NonFirst {
        /// IPv4 identification shared by all fragments of the datagram.
        ident: u16,
        /// Fragment offset in bytes.
        offset: u16,
        /// More-fragments flag (false for the last fragment).
        more: bool,
    },
}

/// What an ICMP message means to the NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IcmpKind {
    /// Echo request (type 8) or reply (type 0).
    Echo {
        /// True for a request, false for a reply.
        request: bool,
        /// The echo identifier (also in [`Summary::src_port`] and [`Summary::dst_port`]).
        id: u16,
    },
    /// An error message quoting a packet: destination unreachable (3), source quench (4),
    /// time exceeded (11) or parameter problem (12).
    Error {
        /// The ICMP type.
        icmp_type: u8,
        /// The ICMP code.
        code: u8,
        /// The quoted packet.
        inner: InnerSummary,
    },
}

/// The packet quoted by an ICMP error, as far as it is present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InnerSummary {
    /// Protocol of the quoted packet.
    pub proto: u8,
    /// Source address of the quoted packet (the sender of the packet that caused the error).
    pub src: u32,
    /// Destination address of the quoted packet.
    pub dst: u32,
    /// Quoted source port (TCP/UDP), echo identifier (ICMP echo), else 0.
    pub src_port: u16,
    /// Quoted destination port (TCP/UDP), echo identifier (ICMP echo), else 0.
    pub dst_port: u16,
    /// Offset of the quoted IPv4 header in the packet (outer header length + 8).
    pub inner_ip_offset: u16,
    /// Offset of the quoted transport header in the packet (`inner_ip_offset` + quoted IHL * 4).
    pub inner_l4_offset: u16,
    /// True when `src_port`/`dst_port` carry real values: the quoted packet is TCP, UDP or an
    /// ICMP echo, is not a non-first fragment, and its first 8 transport bytes are present.
    pub has_ports: bool,
}

/// The facts a NAT needs about one IPv4 packet, plus offsets for rewriting it.
///
/// ICMP echo: the identifier is in BOTH `src_port` and `dst_port`, so a flow key built from
/// either side finds it. ICMP errors: the ports are 0; the flow is in
/// [`IcmpKind::Error::inner`](IcmpKind::Error). ESP and other protocols: ports 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Summary {
    /// IP protocol number.
    pub proto: u8,
    /// Source address (host order).
    pub src: u32,
    /// Destination address (host order).
    pub dst: u32,
    /// TCP/UDP source port; ICMP echo identifier; else 0.
    pub src_port: u16,
    /// TCP/UDP destination port; ICMP echo identifier; else 0.
    pub dst_port: u16,
    /// Raw TCP flag byte (see [`TcpFlags`](crate::TcpFlags)); 0 for other protocols and
    /// non-first fragments.
    pub tcp_flags: u8,
    /// IPv4 header length (offset of the transport header).
    pub l3_len: u16,
    /// IPv4 total length (bytes after it in the buffer are not part of the packet).
    pub total_len: u16,
    /// Fragmentation state.
    pub frag: Frag,
    /// ICMP echo or error facts; `None` for other protocols, other ICMP types and non-first
    /// fragments.
    pub icmp: Option<IcmpKind>,
}

impl Summary {
    /// Offset of the transport header in the packet (= `l3_len`).
    #[inline]
    pub const fn l4_offset(&self) -> usize {
        self.l3_len as usize
    }

    /// Length of the IPv4 payload (`total_len - l3_len`).
    #[inline]
    pub const fn l4_len(&self) -> usize {
        self.total_len.saturating_sub(self.l3_len) as usize
    }

    /// True when `src_port`/`dst_port` carry real values: TCP or UDP, or an ICMP echo, in an
    /// unfragmented packet or a first fragment.
    #[inline]
    pub const fn has_ports(&self) -> bool {
        let first = !matches!(self.frag, Frag::NonFirst { .. });
        first
            && (self.proto == PROTO_TCP
                || self.proto == PROTO_UDP
                || matches!(self.icmp, Some(IcmpKind::Echo { .. })))
    }

    /// True for a fragment (first or not).
    #[inline]
    pub const fn is_fragment(&self) -> bool {
        !matches!(self.frag, Frag::None)
    }
}

/// Parse an IPv4 packet (starting at `buf[0]`; bytes after its total length are ignored).
///
/// Never panics. See the module documentation for what is validated.
#[inline]
pub fn parse(buf: &[u8]) -> Result<Summary, WireError> {
    let (h, hl, tl) = crate::ipv4::check_header(buf)?;
    let proto = h[ipv4::PROTOCOL];
    let flags_frag = get_u16(h, ipv4::FLAGS_FRAG);
    let more = flags_frag & ipv4::FLAG_MF != 0;
    let offset = (flags_frag & ipv4::FRAG_MASK) * ipv4::FRAG_UNIT;
    let ident = get_u16(h, ipv4::IDENT);
    let frag = match (offset, more) {
        (0, false) => Frag::None,
        (0, true) => Frag::First { ident, more },
        (offset, more) => Frag::NonFirst {
            ident,
            offset,
            more,
        },
    };
    let mut s = Summary {
        proto,
        src: be_u32!(h, ipv4::SRC),
        dst: be_u32!(h, ipv4::DST),
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        l3_len: hl as u16,
        total_len: tl as u16,
        frag,
        icmp: None,
    };
    if offset != 0 {
        return Ok(s);
    }
    let l4 = &buf[hl..tl];
    match proto {
        PROTO_TCP => {
            let t = crate::tcp::check_header(l4)?;
            s.src_port = get_u16(t, tcp::SRC_PORT);
            s.dst_port = get_u16(t, tcp::DST_PORT);
            s.tcp_flags = t[tcp::FLAGS];
        }
        PROTO_UDP => {
            let Some(u) = l4.first_chunk::<{ udp::HEADER_LEN }>() else {
                return Err(WireError::UdpTruncated);
            };
            let len = get_u16(u, udp::LEN);
            let too_long = matches!(frag, Frag::None) && usize::from(len) > l4.len();
            if usize::from(len) < udp::HEADER_LEN || too_long {
                return Err(WireError::BadUdpLength {
                    len,
                    available: l4.len(),
                });
            }
            s.src_port = get_u16(u, udp::SRC_PORT);
            s.dst_port = get_u16(u, udp::DST_PORT);
        }
        PROTO_ICMP => {
            if l4.len() < icmp::HEADER_LEN {
                return Err(WireError::IcmpTruncated);
            }
            let icmp_type = l4[icmp::TYPE];
            if icmp::is_echo_type(icmp_type) {
                let id = get_u16(l4, icmp::ECHO_ID);
                s.src_port = id;
                s.dst_port = id;
                s.icmp = Some(IcmpKind::Echo {
                    request: icmp_type == icmp::ECHO_REQUEST,
                    id,
                });
            } else if icmp::is_error_type(icmp_type) {
                let inner = parse_inner(&l4[icmp::HEADER_LEN..], hl + icmp::HEADER_LEN)?;
                s.icmp = Some(IcmpKind::Error {
                    icmp_type,
                    code: l4[icmp::CODE],
                    inner,
                });
            }
        }
        PROTO_ESP if l4.len() < esp::HEADER_LEN => return Err(WireError::EspTruncated),
        _ => {}
    }
    Ok(s)
}

/// Parse the packet quoted by an ICMP error. `q` starts at the quoted IPv4 header, which is at
/// `base` in the whole packet.
fn parse_inner(q: &[u8], base: usize) -> Result<InnerSummary, WireError> {
    if q.len() < ipv4::MIN_HEADER_LEN {
        return Err(WireError::IcmpInnerTruncated);
    }
    let ver_ihl = q[ipv4::VER_IHL];
    if ipv4::version(ver_ihl) != ipv4::VERSION || ipv4::ihl(ver_ihl) < ipv4::MIN_IHL {
        return Err(WireError::IcmpInnerBadHeader);
    }
    let ihl = ipv4::header_len(ver_ihl);
    if ihl > q.len() {
        return Err(WireError::IcmpInnerTruncated);
    }
    let proto = q[ipv4::PROTOCOL];
    let mut inner = InnerSummary {
        proto,
        src: get_u32(q, ipv4::SRC),
        dst: get_u32(q, ipv4::DST),
        src_port: 0,
        dst_port: 0,
        // base <= 60 + 8 and ihl <= 60: no overflow.
        inner_ip_offset: base as u16,
        inner_l4_offset: (base + ihl) as u16,
        has_ports: false,
    };
    let non_first = get_u16(q, ipv4::FLAGS_FRAG) & ipv4::FRAG_MASK != 0;
    if non_first || !matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_ICMP) {
        return Ok(inner);
    }
    let l4 = &q[ihl..];
    if l4.len() < icmp::QUOTED_L4_LEN {
        return Err(WireError::IcmpInnerTruncated);
    }
    match proto {
        PROTO_ICMP => {
            if icmp::is_echo_type(l4[icmp::TYPE]) {
                let id = get_u16(l4, icmp::ECHO_ID);
                inner.src_port = id;
                inner.dst_port = id;
                inner.has_ports = true;
            }
        }
        // TCP and UDP: the ports lead both headers.
        _ => {
            inner.src_port = get_u16(l4, udp::SRC_PORT);
            inner.dst_port = get_u16(l4, udp::DST_PORT);
            inner.has_ports = true;
        }
    }
    Ok(inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    /// Where the transport header starts in the samples (no IPv4 options).
    const L4: usize = ipv4::MIN_HEADER_LEN;
    use crate::field::set_u16;
    use crate::testutil::{self, addr, Ipv4Spec, TcpSpec};
    use crate::TcpFlags;

    const PRIV: u32 = 0x0a00_0004;
    const PUB: u32 = 0xc633_6401;
    const REMOTE: u32 = 0x5db8_d822;

    fn ip(src: u32, dst: u32) -> Ipv4Spec {
        Ipv4Spec::between(src, dst)
    }

    #[test]
    fn tcp_syn() {
        let b = testutil::tcp_syn(PRIV, 40000, REMOTE, 443);
        let s = parse(&b).unwrap();
        assert_eq!(s.proto, PROTO_TCP);
        assert_eq!(
            (s.src, s.dst, s.src_port, s.dst_port),
            (PRIV, REMOTE, 40000, 443)
        );
        assert_eq!(s.tcp_flags, TcpFlags::SYN);
        assert_eq!((s.l3_len, usize::from(s.total_len)), (20, b.len()));
        assert_eq!(s.frag, Frag::None);
        assert_eq!(s.icmp, None);
        assert!(s.has_ports() && !s.is_fragment());
        assert_eq!(s.l4_offset(), 20);
        assert_eq!(s.l4_len(), b.len() - 20);
    }

    #[test]
    fn options_and_trailing_padding() {
        let spec = Ipv4Spec {
            options: vec![0x94, 0x04, 0, 0, 1, 1, 1, 0],
            ..ip(PRIV, REMOTE)
        };
        let mut b = testutil::build_udp(&spec, 1000, 53, b"x");
        let tl = b.len();
        b.extend_from_slice(&[0u8; 10]);
        let s = parse(&b).unwrap();
        assert_eq!(s.l3_len, 28);
        assert_eq!(usize::from(s.total_len), tl);
        assert_eq!((s.src_port, s.dst_port), (1000, 53));
    }

    #[test]
    fn icmp_echo_identifier_in_both_ports() {
        let b = testutil::build_icmp_echo(&ip(PRIV, REMOTE), true, 0x4242, 1, b"abc");
        let s = parse(&b).unwrap();
        assert_eq!((s.src_port, s.dst_port), (0x4242, 0x4242));
        assert_eq!(
            s.icmp,
            Some(IcmpKind::Echo {
                request: true,
                id: 0x4242
            })
        );
        assert!(s.has_ports());
    }

    #[test]
    fn esp_and_other_protocols() {
        let b = testutil::build_esp(&ip(PRIV, REMOTE), 1, 2, &[0; 16]);
        let s = parse(&b).unwrap();
        assert_eq!(
            (s.proto, s.src_port, s.dst_port, s.icmp),
            (PROTO_ESP, 0, 0, None)
        );
        assert!(!s.has_ports());
        let gre = testutil::build_ipv4(&ip(PRIV, REMOTE), 47, &[1, 2]);
        let s = parse(&gre).unwrap();
        assert_eq!((s.proto, s.src_port), (47, 0));
        let esp_short = testutil::build_ipv4(&ip(PRIV, REMOTE), PROTO_ESP, &[0; 7]);
        assert_eq!(parse(&esp_short), Err(WireError::EspTruncated));
        // Informational ICMP other than echo: no kind, no ports.
        let ts = testutil::build_icmp(&ip(PRIV, REMOTE), 13, 0, [0, 1, 0, 2], &[0; 12]);
        let s = parse(&ts).unwrap();
        assert_eq!((s.icmp, s.src_port), (None, 0));
    }

    #[test]
    fn fragments() {
        let full = testutil::build_tcp(&ip(PRIV, REMOTE), &TcpSpec::default(), &[5u8; 100]);
        let frags = testutil::fragment(&full, 48);
        let first = parse(&frags[0]).unwrap();
        let ident = first.frag_ident();
        assert_eq!(first.frag, Frag::First { ident, more: true });
        assert_eq!(first.src_port, TcpSpec::default().src_port);
        assert!(first.has_ports());
        let second = parse(&frags[1]).unwrap();
        assert_eq!(
            second.frag,
            Frag::NonFirst {
                ident,
                offset: 48,
                more: true
            }
        );
        assert_eq!(
            (second.src_port, second.dst_port, second.tcp_flags),
            (0, 0, 0)
        );
        assert!(!second.has_ports());
        let last = parse(frags.last().unwrap()).unwrap();
        assert!(matches!(last.frag, Frag::NonFirst { more: false, .. }));
        // A non-first fragment is not parsed beyond the IP header, even if tiny.
        let mut tiny = frags[1][..20].to_vec();
        set_u16(&mut tiny, ipv4::TOTAL_LEN, 20);
        assert!(parse(&tiny).is_ok());
    }

    impl Summary {
        fn frag_ident(&self) -> u16 {
            match self.frag {
                Frag::First { ident, .. } | Frag::NonFirst { ident, .. } => ident,
                Frag::None => 0,
            }
        }
    }

    #[test]
    fn udp_first_fragment_length_covers_whole_datagram() {
        let full = testutil::build_udp(&ip(PRIV, REMOTE), 1000, 53, &[1u8; 200]);
        let frags = testutil::fragment(&full, 64);
        let s = parse(&frags[0]).unwrap();
        assert_eq!((s.src_port, s.dst_port), (1000, 53));
        // The same length would be an error in an unfragmented packet.
        let mut cut = frags[0].clone();
        set_u16(&mut cut, ipv4::FLAGS_FRAG, 0);
        let mut p = crate::Ipv4Packet::new_unchecked(&mut cut[..]);
        p.fill_checksum();
        assert!(matches!(parse(&cut), Err(WireError::BadUdpLength { .. })));
    }

    #[test]
    fn error_truncated_tcp_header() {
        let b = testutil::tcp_syn(PRIV, 40000, REMOTE, 443);
        // Cut the TCP header to 19 bytes by shrinking total length.
        let mut t = b[..39].to_vec();
        set_u16(&mut t, ipv4::TOTAL_LEN, 39);
        assert_eq!(parse(&t), Err(WireError::TcpTruncated));
        // Data offset points past the segment.
        let mut t = b.clone();
        t[L4 + tcp::DATA_OFF] = 0xf0;
        assert_eq!(parse(&t), Err(WireError::TcpTruncated));
        let mut t = b.clone();
        t[L4 + tcp::DATA_OFF] = 0x40;
        assert_eq!(parse(&t), Err(WireError::BadTcpDataOffset(4)));
        // A first fragment holding half a TCP header is an error too.
        let full = testutil::build_tcp(&ip(PRIV, REMOTE), &TcpSpec::default(), &[0; 64]);
        let frags = testutil::fragment(&full, 16);
        assert_eq!(parse(&frags[0]), Err(WireError::TcpTruncated));
        assert!(parse(&frags[1]).is_ok());
    }

    #[test]
    fn error_udp_length_mismatch() {
        let b = testutil::build_udp(&ip(PRIV, REMOTE), 1, 2, b"abcd");
        let mut t = b.clone();
        set_u16(&mut t, L4 + udp::LEN, 13);
        assert_eq!(
            parse(&t),
            Err(WireError::BadUdpLength {
                len: 13,
                available: 12
            })
        );
        let mut t = b.clone();
        set_u16(&mut t, L4 + udp::LEN, 4);
        assert!(matches!(
            parse(&t),
            Err(WireError::BadUdpLength { len: 4, .. })
        ));
        // Shorter UDP length than the IP payload is fine.
        let mut t = b.clone();
        set_u16(&mut t, L4 + udp::LEN, 8);
        assert!(parse(&t).is_ok());
        let short = testutil::build_ipv4(&ip(PRIV, REMOTE), PROTO_UDP, &[0; 7]);
        assert_eq!(parse(&short), Err(WireError::UdpTruncated));
    }

    #[test]
    fn error_icmp_truncated() {
        let short = testutil::build_ipv4(&ip(PRIV, REMOTE), PROTO_ICMP, &[8, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse(&short), Err(WireError::IcmpTruncated));
    }

    #[test]
    fn icmp_error_inner_tcp() {
        let inner = testutil::tcp_syn(PUB, 1024, REMOTE, 443);
        let b = testutil::build_icmp_dest_unreachable(
            &ip(REMOTE, PUB),
            crate::ICMP_CODE_PORT_UNREACHABLE,
            &inner,
            28,
        );
        let s = parse(&b).unwrap();
        assert_eq!((s.src, s.dst, s.src_port, s.dst_port), (REMOTE, PUB, 0, 0));
        let Some(IcmpKind::Error {
            icmp_type,
            code,
            inner: i,
        }) = s.icmp
        else {
            panic!("not an error: {s:?}");
        };
        assert_eq!((icmp_type, code), (3, 3));
        assert_eq!(
            i,
            InnerSummary {
                proto: PROTO_TCP,
                src: PUB,
                dst: REMOTE,
                src_port: 1024,
                dst_port: 443,
                inner_ip_offset: 28,
                inner_l4_offset: 48,
                has_ports: true,
            }
        );
    }

    #[test]
    fn icmp_error_inner_with_options_and_echo() {
        let spec = Ipv4Spec {
            options: vec![1; 8],
            ..ip(PUB, REMOTE)
        };
        let inner = testutil::build_icmp_echo(&spec, true, 777, 1, &[0; 32]);
        let b = testutil::build_icmp_time_exceeded(&ip(addr(192, 0, 2, 1), PUB), &inner, 36);
        let s = parse(&b).unwrap();
        let Some(IcmpKind::Error { inner: i, .. }) = s.icmp else {
            panic!()
        };
        assert_eq!((i.inner_ip_offset, i.inner_l4_offset), (28, 56));
        assert_eq!(
            (i.proto, i.src_port, i.dst_port, i.has_ports),
            (PROTO_ICMP, 777, 777, true)
        );
    }

    #[test]
    fn icmp_error_inner_esp_and_fragment_without_ports() {
        let esp = testutil::build_esp(&ip(PUB, REMOTE), 5, 6, &[0; 8]);
        let b = testutil::build_icmp_dest_unreachable(&ip(REMOTE, PUB), 1, &esp, 20);
        let Some(IcmpKind::Error { inner: i, .. }) = parse(&b).unwrap().icmp else {
            panic!()
        };
        assert_eq!((i.proto, i.has_ports, i.src_port), (PROTO_ESP, false, 0));
        let full = testutil::build_udp(&ip(PUB, REMOTE), 1, 2, &[0; 64]);
        let frags = testutil::fragment(&full, 32);
        let b = testutil::build_icmp_time_exceeded(&ip(REMOTE, PUB), &frags[1], 20);
        let Some(IcmpKind::Error { inner: i, .. }) = parse(&b).unwrap().icmp else {
            panic!()
        };
        assert!(!i.has_ports);
    }

    #[test]
    fn error_icmp_error_with_truncated_inner() {
        let inner = testutil::build_udp(&ip(PUB, REMOTE), 1, 2, &[0; 8]);
        let outer = ip(REMOTE, PUB);
        // Quoted IPv4 header cut short.
        let b = testutil::build_icmp_dest_unreachable(&outer, 3, &inner, 19);
        assert_eq!(parse(&b), Err(WireError::IcmpInnerTruncated));
        // Header present but only 7 bytes of UDP.
        let b = testutil::build_icmp_dest_unreachable(&outer, 3, &inner, 27);
        assert_eq!(parse(&b), Err(WireError::IcmpInnerTruncated));
        // Quoted header with options cut inside the options.
        let spec = Ipv4Spec {
            options: vec![1; 12],
            ..ip(PUB, REMOTE)
        };
        let inner_opt = testutil::build_udp(&spec, 1, 2, &[0; 8]);
        let b = testutil::build_icmp_dest_unreachable(&outer, 3, &inner_opt, 28);
        assert_eq!(parse(&b), Err(WireError::IcmpInnerTruncated));
        // Bad quoted version / IHL.
        let mut bad = inner.clone();
        bad[ipv4::VER_IHL] = 0x65;
        let b = testutil::build_icmp_dest_unreachable(&outer, 3, &bad, 28);
        assert_eq!(parse(&b), Err(WireError::IcmpInnerBadHeader));
        bad[ipv4::VER_IHL] = 0x43;
        let b = testutil::build_icmp_dest_unreachable(&outer, 3, &bad, 28);
        assert_eq!(parse(&b), Err(WireError::IcmpInnerBadHeader));
        // Exactly header + 8 bytes is fine.
        let b = testutil::build_icmp_dest_unreachable(&outer, 3, &inner, 28);
        assert!(parse(&b).is_ok());
    }
}
