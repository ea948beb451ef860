//! Property tests. Packets are built with etherparse (an independent implementation), and
//! every expected result is built with etherparse too, so this crate's checksum code is never
//! checked against itself.

use crate::checksum;
use crate::field::{icmp, ipv4, set_u16, tcp, udp};
use crate::{
    parse, rewrite_dst, rewrite_icmp_error_inbound, rewrite_icmp_error_outbound, rewrite_src, Frag,
    IcmpKind, InnerSummary, Summary, TcpFlags, WireError, PROTO_ESP, PROTO_ICMP, PROTO_TCP,
    PROTO_UDP,
};
use etherparse::{
    icmpv4::{DestUnreachableHeader, TimeExceededCode},
    Icmpv4Header, Icmpv4Type, IpFragOffset, IpHeaders, IpNumber, Ipv4Header, Ipv4Options,
    PacketBuilder, TcpHeader, UdpHeader,
};
use proptest::collection::vec;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Independent references and etherparse builders.

/// Word-by-word RFC 1071 checksum, deliberately naive.
fn naive_checksum(data: &[u8]) -> u16 {
    let mut s: u64 = 0;
    let mut i = 0;
    while i < data.len() {
        let hi = u64::from(data[i]) << 8;
        let lo = data.get(i + 1).map_or(0, |&b| u64::from(b));
        s += hi | lo;
        i += 2;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[derive(Clone, Debug)]
struct IpP {
    src: u32,
    dst: u32,
    ttl: u8,
    ident: u16,
    dont_frag: bool,
    options: Vec<u8>,
}

fn ip_header(p: &IpP) -> Ipv4Header {
    let mut h = Ipv4Header {
        source: p.src.to_be_bytes(),
        destination: p.dst.to_be_bytes(),
        time_to_live: p.ttl,
        identification: p.ident,
        dont_fragment: p.dont_frag,
        ..Default::default()
    };
    h.options = Ipv4Options::try_from(&p.options[..]).expect("options");
    h
}

fn builder(p: &IpP) -> etherparse::PacketBuilderStep<IpHeaders> {
    PacketBuilder::ip(IpHeaders::Ipv4(ip_header(p), Default::default()))
}

#[derive(Clone, Debug)]
struct TcpP {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    options: Vec<u8>,
}

fn ep_tcp(ip: &IpP, t: &TcpP, payload: &[u8]) -> Vec<u8> {
    let mut h = TcpHeader::new(t.sport, t.dport, t.seq, t.window);
    h.acknowledgment_number = t.ack;
    h.fin = t.flags & TcpFlags::FIN != 0;
    h.syn = t.flags & TcpFlags::SYN != 0;
    h.rst = t.flags & TcpFlags::RST != 0;
    h.psh = t.flags & TcpFlags::PSH != 0;
    h.ack = t.flags & TcpFlags::ACK != 0;
    h.urg = t.flags & TcpFlags::URG != 0;
    h.set_options_raw(&t.options).expect("tcp options");
    let mut v = Vec::new();
    builder(ip).tcp_header(h).write(&mut v, payload).unwrap();
    v
}

fn ep_udp(ip: &IpP, sport: u16, dport: u16, payload: &[u8], zero_checksum: bool) -> Vec<u8> {
    let mut v = Vec::new();
    builder(ip)
        .udp(sport, dport)
        .write(&mut v, payload)
        .unwrap();
    if zero_checksum {
        let hl = ipv4::MIN_HEADER_LEN + ip.options.len();
        v[hl + udp::CHECKSUM..hl + udp::HEADER_LEN].fill(0);
    }
    v
}

fn ep_echo(ip: &IpP, request: bool, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let b = builder(ip);
    let b = if request {
        b.icmpv4_echo_request(id, seq)
    } else {
        b.icmpv4_echo_reply(id, seq)
    };
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

fn ep_esp(ip: &IpP, spi: u32, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut body = spi.to_be_bytes().to_vec();
    body.extend_from_slice(&seq.to_be_bytes());
    body.extend_from_slice(payload);
    ep_raw_ip(ip, IpNumber::ENCAPSULATING_SECURITY_PAYLOAD, &body)
}

fn ep_raw_ip(ip: &IpP, proto: IpNumber, body: &[u8]) -> Vec<u8> {
    let mut h = ip_header(ip);
    h.protocol = proto;
    h.set_payload_len(body.len()).unwrap();
    h.header_checksum = h.calc_header_checksum();
    let mut v = h.to_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

#[derive(Clone, Copy, Debug)]
enum ErrKind {
    PortUnreachable,
    FragNeeded(u16),
    TimeExceeded,
}

fn ep_icmp_error(ip: &IpP, kind: ErrKind, quote: &[u8]) -> Vec<u8> {
    let t = match kind {
        ErrKind::PortUnreachable => Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        ErrKind::FragNeeded(next_hop_mtu) => {
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu,
            })
        }
        ErrKind::TimeExceeded => Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
    };
    let mut v = Vec::new();
    builder(ip).icmpv4(t).write(&mut v, quote).unwrap();
    v
}

/// Split with etherparse-computed header checksums.
fn ep_fragment(packet: &[u8], step: usize) -> Vec<Vec<u8>> {
    let (h, rest) = Ipv4Header::from_slice(packet).unwrap();
    let payload = &rest[..usize::from(h.total_len) - h.header_len()];
    let n = payload.len().div_ceil(step);
    payload
        .chunks(step)
        .enumerate()
        .map(|(i, c)| {
            let mut f = h.clone();
            f.set_payload_len(c.len()).unwrap();
            f.more_fragments = i + 1 < n;
            f.fragment_offset = IpFragOffset::try_new((i * step / 8) as u16).unwrap();
            f.header_checksum = f.calc_header_checksum();
            let mut v = f.to_bytes().to_vec();
            v.extend_from_slice(c);
            v
        })
        .collect()
}

/// Checks every checksum etherparse can recompute for a full (unfragmented) packet.
fn ep_check(buf: &[u8]) -> Result<(), TestCaseError> {
    let (h, rest) = Ipv4Header::from_slice(buf).unwrap();
    prop_assert_eq!(h.header_checksum, h.calc_header_checksum(), "ipv4 header");
    let seg = &rest[..usize::from(h.total_len) - h.header_len()];
    match h.protocol {
        IpNumber::TCP => {
            let (t, payload) = TcpHeader::from_slice(seg).unwrap();
            prop_assert_eq!(
                t.checksum,
                t.calc_checksum_ipv4_raw(h.source, h.destination, payload)
                    .unwrap(),
                "tcp"
            );
        }
        IpNumber::UDP => {
            let (u, payload) = UdpHeader::from_slice(seg).unwrap();
            if u.checksum != 0 {
                prop_assert_eq!(
                    u.checksum,
                    u.calc_checksum_ipv4_raw(h.source, h.destination, payload)
                        .unwrap(),
                    "udp"
                );
            }
        }
        IpNumber::ICMP => {
            let (i, payload) = Icmpv4Header::from_slice(seg).unwrap();
            prop_assert_eq!(i.checksum, i.icmp_type.calc_checksum(payload), "icmp");
            if i.icmp_type.header_len() == 8 && payload.len() >= 20 {
                if let Ok((inner, _)) = Ipv4Header::from_slice(payload) {
                    if matches!(
                        i.icmp_type,
                        Icmpv4Type::DestinationUnreachable(_) | Icmpv4Type::TimeExceeded(_)
                    ) {
                        prop_assert_eq!(
                            inner.header_checksum,
                            inner.calc_header_checksum(),
                            "inner ipv4"
                        );
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strategies.

fn ip_strategy() -> impl Strategy<Value = IpP> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u8>(),
        any::<u16>(),
        any::<bool>(),
        (0usize..=10).prop_flat_map(|n| vec(any::<u8>(), n * 4)),
    )
        .prop_map(|(src, dst, ttl, ident, dont_frag, options)| IpP {
            src,
            dst,
            ttl,
            ident,
            dont_frag,
            options,
        })
}

fn tcp_strategy() -> impl Strategy<Value = TcpP> {
    (
        any::<u16>(),
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        0u8..0x40,
        any::<u16>(),
        (0usize..=10).prop_flat_map(|n| vec(any::<u8>(), n * 4)),
    )
        .prop_map(|(sport, dport, seq, ack, flags, window, options)| TcpP {
            sport,
            dport,
            seq,
            ack,
            flags,
            window,
            options,
        })
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..300)
}

fn err_kind() -> impl Strategy<Value = ErrKind> {
    prop_oneof![
        Just(ErrKind::PortUnreachable),
        (68u16..=1500).prop_map(ErrKind::FragNeeded),
        Just(ErrKind::TimeExceeded),
    ]
}

/// Any valid packet this crate handles, built with etherparse.
fn valid_packet() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (ip_strategy(), tcp_strategy(), payload()).prop_map(|(ip, t, p)| ep_tcp(&ip, &t, &p)),
        (ip_strategy(), any::<(u16, u16, bool)>(), payload())
            .prop_map(|(ip, (s, d, z), p)| ep_udp(&ip, s, d, &p, z)),
        (ip_strategy(), any::<(bool, u16, u16)>(), payload())
            .prop_map(|(ip, (r, id, seq), p)| ep_echo(&ip, r, id, seq, &p)),
        (ip_strategy(), any::<(u32, u32)>(), payload())
            .prop_map(|(ip, (spi, seq), p)| ep_esp(&ip, spi, seq, &p)),
        (
            ip_strategy(),
            ip_strategy(),
            tcp_strategy(),
            err_kind(),
            0usize..60
        )
            .prop_map(|(outer, inner, t, k, extra)| {
                let sent = ep_tcp(&inner, &t, b"payload bytes");
                let ihl = ipv4::MIN_HEADER_LEN + inner.options.len();
                let q = (ihl + icmp::QUOTED_L4_LEN + extra).min(sent.len());
                ep_icmp_error(&outer, k, &sent[..q])
            }),
        (ip_strategy(), payload(), 8usize..64).prop_map(|(ip, p, step)| {
            let full = ep_udp(&ip, 1, 2, &p, false);
            let frags = ep_fragment(&full, step / 8 * 8);
            frags[p.len() % frags.len()].clone()
        }),
    ]
}

fn frag_strategy() -> impl Strategy<Value = Frag> {
    prop_oneof![
        Just(Frag::None),
        (any::<u16>(), any::<bool>()).prop_map(|(ident, more)| Frag::First { ident, more }),
        any::<(u16, u16, bool)>().prop_map(|(ident, offset, more)| Frag::NonFirst {
            ident,
            offset,
            more
        }),
    ]
}

fn inner_strategy() -> impl Strategy<Value = InnerSummary> {
    (
        prop_oneof![
            Just(PROTO_TCP),
            Just(PROTO_UDP),
            Just(PROTO_ICMP),
            any::<u8>()
        ],
        any::<(u32, u32, u16, u16)>(),
        0u16..120,
        0u16..160,
        any::<bool>(),
    )
        .prop_map(
            |(proto, (src, dst, src_port, dst_port), ip_off, l4_off, has_ports)| InnerSummary {
                proto,
                src,
                dst,
                src_port,
                dst_port,
                inner_ip_offset: ip_off,
                inner_l4_offset: l4_off,
                has_ports,
            },
        )
}

fn summary_strategy() -> impl Strategy<Value = Summary> {
    (
        prop_oneof![
            Just(PROTO_TCP),
            Just(PROTO_UDP),
            Just(PROTO_ICMP),
            Just(PROTO_ESP),
            any::<u8>()
        ],
        any::<(u32, u32, u16, u16, u8)>(),
        0u16..100,
        0u16..400,
        frag_strategy(),
        prop_oneof![
            Just(None),
            any::<(bool, u16)>().prop_map(|(request, id)| Some(IcmpKind::Echo { request, id })),
            (any::<(u8, u8)>(), inner_strategy()).prop_map(|((t, c), inner)| Some(
                IcmpKind::Error {
                    icmp_type: t,
                    code: c,
                    inner
                }
            )),
        ],
    )
        .prop_map(
            |(proto, (src, dst, src_port, dst_port, tcp_flags), l3_len, total_len, frag, icmp)| {
                Summary {
                    proto,
                    src,
                    dst,
                    src_port,
                    dst_port,
                    tcp_flags,
                    l3_len,
                    total_len,
                    frag,
                    icmp,
                }
            },
        )
}

/// Apply every rewrite to copies of `buf`; the point is that none panics.
fn exercise_rewrites(buf: &[u8], s: &Summary, a: u32, p: Option<u16>) {
    let mut b = buf.to_vec();
    let _ = rewrite_src(&mut b, s, a, p);
    let mut b = buf.to_vec();
    let _ = rewrite_dst(&mut b, s, a, p);
    let mut b = buf.to_vec();
    let _ = rewrite_icmp_error_inbound(&mut b, s, a, !a, p);
    let mut b = buf.to_vec();
    let _ = rewrite_icmp_error_outbound(&mut b, s, a, !a, p);
}

fn with_ip(ip: &IpP, src: u32, dst: u32) -> IpP {
    IpP {
        src,
        dst,
        ..ip.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn sum_matches_naive(data in vec(any::<u8>(), 0..2000), init in any::<u32>()) {
        prop_assert_eq!(checksum::internet_checksum(&data), naive_checksum(&data));
        let mut with_init = init.to_be_bytes().to_vec();
        with_init.extend_from_slice(&data);
        // `init` is a sum, and adding it as two leading words gives the same value mod 0xffff.
        let got = checksum::fold(checksum::sum(&data, init));
        let want = !naive_checksum(&with_init);
        prop_assert!(got == want || (got == 0xffff && want == 0) || (got == 0 && want == 0xffff));
    }

    #[test]
    fn update_u16_equals_full_recompute(
        mut data in vec(any::<u8>(), 2..200).prop_map(|mut v| { v.truncate(v.len() / 2 * 2); v }),
        idx in any::<prop::sample::Index>(),
        new in any::<u16>(),
    ) {
        let i = idx.index(data.len() / 2) * 2;
        let old = u16::from_be_bytes([data[i], data[i + 1]]);
        let before = naive_checksum(&data);
        data[i..i + 2].copy_from_slice(&new.to_be_bytes());
        let after = naive_checksum(&data);
        let inc = checksum::update_u16(before, old, new);
        if data.iter().all(|&b| b == 0) || before == 0xffff {
            // All-zero data: +0 and -0 are the same checksum (RFC 1624 section 3).
            prop_assert!(inc == after || (inc ^ after) == 0xffff);
        } else {
            prop_assert_eq!(inc, after);
        }
    }

    #[test]
    fn update_u32_equals_full_recompute(
        mut data in vec(any::<u8>(), 4..200).prop_map(|mut v| { v.truncate(v.len() / 2 * 2); v }),
        idx in any::<prop::sample::Index>(),
        new in any::<u32>(),
    ) {
        let i = idx.index(data.len() / 2 - 1) * 2;
        let old = u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
        let before = naive_checksum(&data);
        data[i..i + 4].copy_from_slice(&new.to_be_bytes());
        let after = naive_checksum(&data);
        let inc = checksum::update_u32(before, old, new);
        if data.iter().all(|&b| b == 0) || before == 0xffff {
            prop_assert!(inc == after || (inc ^ after) == 0xffff);
        } else {
            prop_assert_eq!(inc, after);
        }
    }

    #[test]
    fn tcp_rewrite_src_and_back(
        ip in ip_strategy(), t in tcp_strategy(), p in payload(),
        new_src in any::<u32>(), new_port in any::<Option<u16>>(),
    ) {
        let orig = ep_tcp(&ip, &t, &p);
        let s = parse(&orig).unwrap();
        prop_assert_eq!((s.proto, s.src, s.dst), (PROTO_TCP, ip.src, ip.dst));
        prop_assert_eq!((s.src_port, s.dst_port, s.tcp_flags), (t.sport, t.dport, t.flags));
        prop_assert_eq!(usize::from(s.l3_len), 20 + ip.options.len());
        let mut b = orig.clone();
        rewrite_src(&mut b, &s, new_src, new_port).unwrap();
        let t2 = TcpP { sport: new_port.unwrap_or(t.sport), ..t.clone() };
        let expected = ep_tcp(&with_ip(&ip, new_src, ip.dst), &t2, &p);
        ep_check(&b)?;
        prop_assert_eq!(&b, &expected);
        let s2 = parse(&b).unwrap();
        rewrite_src(&mut b, &s2, ip.src, new_port.map(|_| t.sport)).unwrap();
        prop_assert_eq!(&b, &orig);
    }

    #[test]
    fn tcp_rewrite_dst_and_back(
        ip in ip_strategy(), t in tcp_strategy(), p in payload(),
        new_dst in any::<u32>(), new_port in any::<Option<u16>>(),
    ) {
        let orig = ep_tcp(&ip, &t, &p);
        let s = parse(&orig).unwrap();
        let mut b = orig.clone();
        rewrite_dst(&mut b, &s, new_dst, new_port).unwrap();
        let t2 = TcpP { dport: new_port.unwrap_or(t.dport), ..t.clone() };
        prop_assert_eq!(&b, &ep_tcp(&with_ip(&ip, ip.src, new_dst), &t2, &p));
        let s2 = parse(&b).unwrap();
        rewrite_dst(&mut b, &s2, ip.dst, new_port.map(|_| t.dport)).unwrap();
        prop_assert_eq!(&b, &orig);
    }

    #[test]
    fn udp_rewrite_and_back(
        ip in ip_strategy(), ports in any::<(u16, u16)>(), p in payload(), zero in any::<bool>(),
        new_addr in any::<u32>(), new_port in any::<Option<u16>>(), dst_side in any::<bool>(),
    ) {
        let (sp, dp) = ports;
        let orig = ep_udp(&ip, sp, dp, &p, zero);
        let s = parse(&orig).unwrap();
        prop_assert_eq!((s.proto, s.src_port, s.dst_port), (PROTO_UDP, sp, dp));
        let mut b = orig.clone();
        let expected = if dst_side {
            rewrite_dst(&mut b, &s, new_addr, new_port).unwrap();
            ep_udp(&with_ip(&ip, ip.src, new_addr), sp, new_port.unwrap_or(dp), &p, zero)
        } else {
            rewrite_src(&mut b, &s, new_addr, new_port).unwrap();
            ep_udp(&with_ip(&ip, new_addr, ip.dst), new_port.unwrap_or(sp), dp, &p, zero)
        };
        ep_check(&b)?;
        prop_assert_eq!(&b, &expected);
        let hl = usize::from(s.l3_len);
        if zero {
            prop_assert_eq!(&b[hl + udp::CHECKSUM..hl + udp::HEADER_LEN], &[0u8, 0][..]);
        }
        let s2 = parse(&b).unwrap();
        if dst_side {
            rewrite_dst(&mut b, &s2, ip.dst, new_port.map(|_| dp)).unwrap();
        } else {
            rewrite_src(&mut b, &s2, ip.src, new_port.map(|_| sp)).unwrap();
        }
        prop_assert_eq!(&b, &orig);
    }

    #[test]
    fn icmp_echo_rewrite_and_back(
        ip in ip_strategy(), (request, id, seq) in any::<(bool, u16, u16)>(), p in payload(),
        new_addr in any::<u32>(), new_id in any::<Option<u16>>(), dst_side in any::<bool>(),
    ) {
        let orig = ep_echo(&ip, request, id, seq, &p);
        let s = parse(&orig).unwrap();
        prop_assert_eq!((s.src_port, s.dst_port), (id, id));
        prop_assert_eq!(s.icmp, Some(IcmpKind::Echo { request, id }));
        let mut b = orig.clone();
        let ip2 = if dst_side {
            rewrite_dst(&mut b, &s, new_addr, new_id).unwrap();
            with_ip(&ip, ip.src, new_addr)
        } else {
            rewrite_src(&mut b, &s, new_addr, new_id).unwrap();
            with_ip(&ip, new_addr, ip.dst)
        };
        ep_check(&b)?;
        prop_assert_eq!(&b, &ep_echo(&ip2, request, new_id.unwrap_or(id), seq, &p));
        let s2 = parse(&b).unwrap();
        let back = new_id.map(|_| id);
        if dst_side {
            rewrite_dst(&mut b, &s2, ip.dst, back).unwrap();
        } else {
            rewrite_src(&mut b, &s2, ip.src, back).unwrap();
        }
        prop_assert_eq!(&b, &orig);
    }

    #[test]
    fn esp_rewrite_and_back(
        ip in ip_strategy(), (spi, seq) in any::<(u32, u32)>(), p in payload(),
        new_src in any::<u32>(), port in any::<Option<u16>>(),
    ) {
        let orig = ep_esp(&ip, spi, seq, &p);
        let s = parse(&orig).unwrap();
        prop_assert_eq!((s.proto, s.src_port, s.dst_port, s.icmp), (PROTO_ESP, 0, 0, None));
        let mut b = orig.clone();
        rewrite_src(&mut b, &s, new_src, port).unwrap();
        ep_check(&b)?;
        prop_assert_eq!(&b, &ep_esp(&with_ip(&ip, new_src, ip.dst), spi, seq, &p));
        let s2 = parse(&b).unwrap();
        rewrite_src(&mut b, &s2, ip.src, port).unwrap();
        prop_assert_eq!(&b, &orig);
    }

    #[test]
    fn fragments_rewrite(
        ip in ip_strategy(), t in tcp_strategy(), p in vec(any::<u8>(), 1..400),
        step8 in 8usize..40, use_udp in any::<bool>(),
        new_src in any::<u32>(), new_port in any::<u16>(),
    ) {
        let ip = IpP { dont_frag: false, ..ip };
        let (orig, expected) = if use_udp {
            (ep_udp(&ip, t.sport, t.dport, &p, false),
             ep_udp(&with_ip(&ip, new_src, ip.dst), new_port, t.dport, &p, false))
        } else {
            (ep_tcp(&ip, &t, &p),
             ep_tcp(&with_ip(&ip, new_src, ip.dst), &TcpP { sport: new_port, ..t.clone() }, &p))
        };
        let l4_hdr = if use_udp { 8 } else { 20 + t.options.len() };
        // The first fragment must hold the whole transport header.
        let step = (step8 * 8).max(l4_hdr.div_ceil(8) * 8);
        let frags = ep_fragment(&orig, step);
        let exp = ep_fragment(&expected, step);
        prop_assert_eq!(frags.len(), exp.len());
        for (i, (f, e)) in frags.iter().zip(&exp).enumerate() {
            let s = parse(f).unwrap();
            if i == 0 && frags.len() > 1 {
                let first = matches!(s.frag, Frag::First { more: true, .. });
                prop_assert!(first);
                prop_assert_eq!(s.src_port, t.sport);
            } else if i > 0 {
                let non_first = matches!(s.frag, Frag::NonFirst { .. });
                prop_assert!(non_first);
                prop_assert_eq!((s.src_port, s.dst_port), (0, 0));
            }
            let mut b = f.clone();
            rewrite_src(&mut b, &s, new_src, Some(new_port)).unwrap();
            prop_assert_eq!(&b, e);
        }
    }

    #[test]
    fn icmp_error_inbound_and_back(
        outer in ip_strategy(), inner in ip_strategy(), t in tcp_strategy(),
        p in vec(any::<u8>(), 0..64), kind in err_kind(), extra in 0usize..80,
        inner_kind in 0u8..4, priv_addr in any::<u32>(), priv_port in any::<Option<u16>>(),
    ) {
        // The instance priv_addr:priv_port sent `inner` after translation to (pub, t.sport).
        let pub_addr = inner.src;
        let (sent, private_view) = match inner_kind {
            0 => (ep_tcp(&inner, &t, &p),
                  ep_tcp(&with_ip(&inner, priv_addr, inner.dst),
                         &TcpP { sport: priv_port.unwrap_or(t.sport), ..t.clone() }, &p)),
            1 | 2 => {
                let zero = inner_kind == 2;
                (ep_udp(&inner, t.sport, t.dport, &p, zero),
                 ep_udp(&with_ip(&inner, priv_addr, inner.dst), priv_port.unwrap_or(t.sport),
                        t.dport, &p, zero))
            }
            _ => (ep_echo(&inner, true, t.sport, t.dport, &p),
                  ep_echo(&with_ip(&inner, priv_addr, inner.dst), true,
                          priv_port.unwrap_or(t.sport), t.dport, &p)),
        };
        let ihl = ipv4::MIN_HEADER_LEN + inner.options.len();
        let q = (ihl + icmp::QUOTED_L4_LEN + extra).min(sent.len());
        let router = with_ip(&outer, outer.src, pub_addr);
        let orig = ep_icmp_error(&router, kind, &sent[..q]);
        let s = parse(&orig).unwrap();
        let Some(IcmpKind::Error { inner: is, .. }) = s.icmp else {
            return Err(TestCaseError::fail("not an ICMP error"));
        };
        prop_assert_eq!((is.src, is.dst, is.src_port), (pub_addr, inner.dst, t.sport));
        let outer_hl = ipv4::MIN_HEADER_LEN + outer.options.len();
        prop_assert_eq!(usize::from(is.inner_ip_offset), outer_hl + icmp::HEADER_LEN);
        prop_assert_eq!(usize::from(is.inner_l4_offset), usize::from(is.inner_ip_offset) + ihl);

        let mut b = orig.clone();
        rewrite_icmp_error_inbound(&mut b, &s, priv_addr, priv_addr, priv_port).unwrap();

        let mut quote = private_view[..q].to_vec();
        if inner_kind == 0 && q == ihl + tcp::CHECKSUM + 1 {
            // Half a TCP checksum quoted: left as it was.
            quote[ihl + tcp::CHECKSUM] = sent[ihl + tcp::CHECKSUM];
        }
        let expected = ep_icmp_error(&with_ip(&router, router.src, priv_addr), kind, &quote);
        ep_check(&b)?;
        prop_assert_eq!(&b, &expected);

        let s2 = parse(&b).unwrap();
        rewrite_icmp_error_inbound(&mut b, &s2, pub_addr, pub_addr, priv_port.map(|_| t.sport))
            .unwrap();
        prop_assert_eq!(&b, &orig);
    }

    #[test]
    fn icmp_error_outbound_and_back(
        outer in ip_strategy(), inner in ip_strategy(), t in tcp_strategy(),
        p in vec(any::<u8>(), 0..64), kind in err_kind(), extra in 0usize..80,
        use_udp in any::<bool>(), pub_addr in any::<u32>(), pub_port in any::<Option<u16>>(),
    ) {
        // The instance (inner.dst) received `inner` from the remote and answers with an error.
        let priv_addr = inner.dst;
        let public_inner = with_ip(&inner, inner.src, pub_addr);
        let (received, public_view) = if use_udp {
            (ep_udp(&inner, t.sport, t.dport, &p, false),
             ep_udp(&public_inner, t.sport, pub_port.unwrap_or(t.dport), &p, false))
        } else {
            (ep_tcp(&inner, &t, &p),
             ep_tcp(&public_inner, &TcpP { dport: pub_port.unwrap_or(t.dport), ..t.clone() }, &p))
        };
        let ihl = ipv4::MIN_HEADER_LEN + inner.options.len();
        let q = (ihl + icmp::QUOTED_L4_LEN + extra).min(received.len());
        let instance = with_ip(&outer, priv_addr, inner.src);
        let orig = ep_icmp_error(&instance, kind, &received[..q]);
        let s = parse(&orig).unwrap();
        let mut b = orig.clone();
        rewrite_icmp_error_outbound(&mut b, &s, pub_addr, pub_addr, pub_port).unwrap();
        let mut quote = public_view[..q].to_vec();
        if !use_udp && q == ihl + tcp::CHECKSUM + 1 {
            quote[ihl + tcp::CHECKSUM] = received[ihl + tcp::CHECKSUM];
        }
        let expected = ep_icmp_error(&with_ip(&instance, pub_addr, inner.src), kind, &quote);
        ep_check(&b)?;
        prop_assert_eq!(&b, &expected);
        let s2 = parse(&b).unwrap();
        rewrite_icmp_error_outbound(&mut b, &s2, priv_addr, priv_addr, pub_port.map(|_| t.dport))
            .unwrap();
        prop_assert_eq!(&b, &orig);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(
        buf in vec(any::<u8>(), 0..1600), a in any::<u32>(), p in any::<Option<u16>>(),
    ) {
        if let Ok(s) = parse(&buf) {
            exercise_rewrites(&buf, &s, a, p);
        }
    }

    #[test]
    fn parse_never_panics_on_plausible_headers(
        mut buf in vec(any::<u8>(), 20..600), ihl in 5u8..=15, proto in prop_oneof![
            Just(PROTO_TCP), Just(PROTO_UDP), Just(PROTO_ICMP), Just(PROTO_ESP)],
        frag in prop_oneof![Just(0u16), Just(ipv4::FLAG_MF), any::<u16>()],
        icmp_type in prop_oneof![Just(icmp::DEST_UNREACHABLE), Just(icmp::TIME_EXCEEDED),
            Just(icmp::ECHO_REPLY), Just(icmp::ECHO_REQUEST), any::<u8>()],
        a in any::<u32>(), p in any::<Option<u16>>(),
    ) {
        let len = buf.len();
        let hl = usize::from(ihl) * ipv4::IHL_UNIT;
        buf[ipv4::VER_IHL] = ipv4::ver_ihl(hl);
        set_u16(&mut buf, ipv4::TOTAL_LEN, len as u16);
        set_u16(&mut buf, ipv4::FLAGS_FRAG, frag);
        buf[ipv4::PROTOCOL] = proto;
        if proto == PROTO_ICMP && hl + icmp::HEADER_LEN + ipv4::MIN_HEADER_LEN < len {
            buf[hl + icmp::TYPE] = icmp_type;
            // A plausible quoted header: version 4, IHL 5.
            buf[hl + icmp::HEADER_LEN] = ipv4::ver_ihl(ipv4::MIN_HEADER_LEN);
        }
        match parse(&buf) {
            Ok(s) => {
                prop_assert!(usize::from(s.l3_len) <= usize::from(s.total_len));
                prop_assert!(usize::from(s.total_len) <= buf.len());
                exercise_rewrites(&buf, &s, a, p);
            }
            Err(e) => prop_assert!(!e.reason().is_empty()),
        }
    }

    #[test]
    fn parse_never_panics_on_mutated_valid_packets(
        pkt in valid_packet(),
        muts in vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(), do_cut in any::<bool>(),
        a in any::<u32>(), p in any::<Option<u16>>(),
    ) {
        prop_assert!(parse(&pkt).is_ok());
        let mut b = pkt.clone();
        for (i, x) in &muts {
            let i = i.index(b.len());
            b[i] ^= x;
        }
        if do_cut {
            b.truncate(cut.index(b.len() + 1));
        }
        if let Ok(s) = parse(&b) {
            exercise_rewrites(&b, &s, a, p);
        }
    }

    #[test]
    fn rewrites_never_panic_on_arbitrary_summaries(
        buf in vec(any::<u8>(), 0..400), s in summary_strategy(),
        a in any::<u32>(), p in any::<Option<u16>>(),
    ) {
        let mut copy = buf.clone();
        for r in [
            rewrite_src(&mut copy, &s, a, p),
            rewrite_dst(&mut copy, &s, a, p),
            rewrite_icmp_error_inbound(&mut copy, &s, a, a, p),
            rewrite_icmp_error_outbound(&mut copy, &s, a, a, p),
        ] {
            if let Err(e) = r {
                let expected = matches!(e, WireError::SummaryMismatch | WireError::NotIcmpError);
                prop_assert!(expected, "{:?}", e);
            }
        }
    }

    #[test]
    fn failed_rewrite_leaves_buffer_unchanged(
        pkt in valid_packet(), s in summary_strategy(), a in any::<u32>(), p in any::<Option<u16>>(),
    ) {
        let mut b = pkt.clone();
        if rewrite_src(&mut b, &s, a, p).is_err() {
            prop_assert_eq!(&b, &pkt);
        }
        let mut b = pkt.clone();
        if rewrite_icmp_error_inbound(&mut b, &s, a, a, p).is_err() {
            prop_assert_eq!(&b, &pkt);
        }
    }

    #[test]
    fn valid_packets_parse_and_rewrites_keep_checksums(
        pkt in valid_packet(), a in any::<u32>(), p in any::<Option<u16>>(),
    ) {
        let s = parse(&pkt).unwrap();
        let mut b = pkt.clone();
        rewrite_src(&mut b, &s, a, p).unwrap();
        if s.frag == Frag::None {
            ep_check(&b)?;
            prop_assert_eq!(crate::testutil::verify_checksums(&b), Ok(()));
        }
        if matches!(s.icmp, Some(IcmpKind::Error { .. })) {
            let mut b = pkt.clone();
            rewrite_icmp_error_inbound(&mut b, &s, a, !a, p).unwrap();
            ep_check(&b)?;
            prop_assert_eq!(crate::testutil::verify_checksums(&b), Ok(()));
        }
    }
}
