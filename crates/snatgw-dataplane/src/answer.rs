//! Fail-fast answers (SPEC R9.5): a refused packet rewritten, in its own buffer, into the
//! answer the instance gets. The engine decides whether to answer (`Engine::fail_fast`, with
//! its rate limit); this module only writes bytes.
//!
//! Both answers come from the destination the instance tried to reach and go to the
//! instance, with fresh IPv4 headers (no options, identification 0, TTL 64) and full
//! checksums:
//! - [`Answer::TcpReset`] for a refused SYN, per RFC 9293 §3.10.7.1 (an incoming segment
//!   without ACK in CLOSED): `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`, where SEG.LEN counts
//!   the SYN, a FIN and any data (TCP Fast Open); ports swapped, window 0, no options, DF
//!   set. 40 bytes: it always fits where the SYN was. Not written for a fragment (SEG.LEN is
//!   unknown).
//! - [`Answer::IcmpAdminProhibited`]: ICMP type 3 code 13 (RFC 1812 §5.2.7.1), the four
//!   unused bytes zero, quoting the refused packet's IPv4 header (options included) and the
//!   first 8 bytes of its payload (RFC 792), unchanged; precedence "internetwork control"
//!   (TOS 0xc0) as Linux sends its errors. 28 bytes more than the quote: for a small
//!   datagram it is longer than the packet it replaces, so the caller's buffer needs room.
//!
//! Never panics: lengths come from a successful `snatgw_wire::parse` of the same bytes and
//! are checked again here; nothing allocates.

use snatgw_core::packet::{Answer, ICMP_CODE_ADMIN_PROHIBITED, ICMP_DEST_UNREACHABLE};
use snatgw_core::{proto, tcp_flags};
use snatgw_wire::{Frag, Summary};

/// IPv4 header length of an answer (no options).
const IP_LEN: usize = 20;
/// TCP header length of a RST (no options).
const TCP_LEN: usize = 20;
/// ICMP header length (type, code, checksum, 4 unused bytes).
const ICMP_LEN: usize = 8;
/// Payload bytes an ICMP error quotes after the IP header (RFC 792: 64 bits).
const QUOTE_PAYLOAD: usize = 8;
/// TTL of answers.
const TTL: u8 = 64;

/// Bytes `answer` to the packet `pkt` (summarised by `s`) needs in the buffer, or `None`
/// when it cannot be written for this packet.
pub(crate) fn room(answer: Answer, pkt: &[u8], s: &Summary) -> Option<usize> {
    let l3 = usize::from(s.l3_len);
    let total = usize::from(s.total_len);
    if total > pkt.len() || l3 < IP_LEN || l3 > total {
        return None;
    }
    match answer {
        Answer::TcpReset => {
            if s.proto != proto::TCP || s.frag != Frag::None || total < l3 + TCP_LEN {
                return None;
            }
            let doff = usize::from(pkt[l3 + 12] >> 4) * 4;
            (doff >= TCP_LEN && l3 + doff <= total).then_some(IP_LEN + TCP_LEN)
        }
        Answer::IcmpAdminProhibited => {
            if matches!(s.frag, Frag::NonFirst { .. }) {
                return None;
            }
            Some(IP_LEN + ICMP_LEN + quote_len(s))
        }
    }
}

/// Bytes of the refused packet an ICMP answer quotes.
fn quote_len(s: &Summary) -> usize {
    let l3 = usize::from(s.l3_len);
    l3 + usize::from(s.total_len)
        .saturating_sub(l3)
        .min(QUOTE_PAYLOAD)
}

/// Writes `answer` over the packet at the start of `buf` (summarised by `s`); returns its
/// length. Call only after [`room`] returned `Some(n)` with `n <= buf.len()`; otherwise
/// writes nothing and returns 0.
pub(crate) fn write(answer: Answer, buf: &mut [u8], s: &Summary) -> usize {
    match room(answer, buf, s) {
        Some(n) if n <= buf.len() => {}
        _ => return 0,
    }
    match answer {
        Answer::TcpReset => write_rst(buf, s),
        Answer::IcmpAdminProhibited => write_icmp(buf, s),
    }
}

fn write_rst(buf: &mut [u8], s: &Summary) -> usize {
    let l3 = usize::from(s.l3_len);
    let t = &buf[l3..];
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let doff = usize::from(t[12] >> 4) * 4;
    let data = usize::from(s.total_len) - l3 - doff;
    // SEG.LEN: data, plus one for the SYN and one for a FIN (RFC 9293 §3.4). A TCP segment
    // holds less than 64 KiB, so the sum fits.
    let seg_len = data as u32
        + u32::from(s.tcp_flags & tcp_flags::SYN != 0)
        + u32::from(s.tcp_flags & tcp_flags::FIN != 0);
    let ack = seq.wrapping_add(seg_len);
    // From the destination to the instance.
    let (src, dst, sport, dport) = (s.dst, s.src, s.dst_port, s.src_port);
    let len = IP_LEN + TCP_LEN;
    let out = &mut buf[..len];
    out.fill(0);
    ip_header(out, 0, 0x4000, proto::TCP, src, dst);
    let t = &mut out[IP_LEN..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    // SEQ 0 (bytes 4..8 already zero).
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = ((TCP_LEN / 4) as u8) << 4;
    t[13] = tcp_flags::RST | tcp_flags::ACK;
    // Window, checksum and urgent pointer zero; then the checksum.
    let pseudo = (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff);
    let c = checksum(t, pseudo + u32::from(proto::TCP) + TCP_LEN as u32);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    len
}

fn write_icmp(buf: &mut [u8], s: &Summary) -> usize {
    let q = quote_len(s);
    let len = IP_LEN + ICMP_LEN + q;
    // The quote moves behind the new headers first (the regions may overlap).
    buf.copy_within(0..q, IP_LEN + ICMP_LEN);
    let (src, dst) = (s.dst, s.src);
    let out = &mut buf[..len];
    out[..IP_LEN + ICMP_LEN].fill(0);
    ip_header(out, 0xc0, 0, proto::ICMP, src, dst);
    let m = &mut out[IP_LEN..];
    m[0] = ICMP_DEST_UNREACHABLE;
    m[1] = ICMP_CODE_ADMIN_PROHIBITED;
    let c = checksum(m, 0);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    len
}

/// The Internet checksum (RFC 1071) of `data` with `initial` added (a pseudo-header sum).
/// Its own short loop, not `snatgw_wire::checksum`'s: answers are rare, and another caller
/// of those inlined functions in this crate changes how the compiler inlines them into
/// `Gateway::process`.
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut acc = u64::from(initial);
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Writes a 20-byte IPv4 header at the start of `out` (zeroed), for a packet of
/// `out.len()` bytes, with its checksum.
fn ip_header(out: &mut [u8], tos: u8, flags_frag: u16, protocol: u8, src: u32, dst: u32) {
    let total = out.len() as u16;
    let h = &mut out[..IP_LEN];
    h[0] = 0x45;
    h[1] = tos;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    // Identification 0 (bytes 4..6).
    h[6..8].copy_from_slice(&flags_frag.to_be_bytes());
    h[8] = TTL;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.to_be_bytes());
    h[16..20].copy_from_slice(&dst.to_be_bytes());
    let c = checksum(h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use snatgw_core::{Direction, Engine, Topology};
    use snatgw_wire::testutil::{build_tcp, build_udp, Ipv4Spec, TcpSpec};
    use snatgw_wire::{parse, verify_checksums};

    use crate::{Gateway, Outcome};

    const INSTANCE: u32 = 0x0a00_0101; // 10.0.1.1
    const SERVER: u32 = 0xc633_6407; // 198.51.100.7

    /// One instance, a gateway-wide limit of one flow already used: every new flow is
    /// refused (R9.2) and answered (R9.5).
    fn refusing_gateway() -> Gateway {
        let topo = Topology::from_toml(
            "[gateway]\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"192.0.2.1\"]\n\
             on_exhaustion = \"reset\"\nmax_flows = 1\n\
             [[instance]]\nname = \"a\"\nprivate_ip = \"10.0.1.1\"\n",
        )
        .expect("valid");
        let mut g = Gateway::new(Engine::new(topo, 0).expect("engine"));
        let mut first = build_udp(&Ipv4Spec::between(INSTANCE, SERVER), 1, 1, b"x");
        let v = g.process(0, &mut first, Direction::Outbound);
        assert!(matches!(v, snatgw_core::Verdict::Translate { .. }), "{v:?}");
        g
    }

    fn packet(
        tcp: bool,
        ip_options: Vec<u8>,
        tcp_options: Vec<u8>,
        flags: u8,
        seq: u32,
        payload: Vec<u8>,
    ) -> Vec<u8> {
        let ip = Ipv4Spec {
            options: ip_options,
            ..Ipv4Spec::between(INSTANCE, SERVER)
        };
        if tcp {
            let t = TcpSpec {
                src_port: 40000,
                dst_port: 443,
                seq,
                ack: 0,
                flags,
                options: tcp_options,
                ..TcpSpec::default()
            };
            build_tcp(&ip, &t, &payload)
        } else {
            build_udp(&ip, 40000, 53, &payload)
        }
    }

    proptest! {
        /// Whatever an instance sends, in whatever buffer: no panic, and every answer is a
        /// well-formed packet with valid checksums from the destination to the sender,
        /// that fits its buffer.
        #[test]
        fn answers_are_well_formed_whatever_the_packet_and_room(
            tcp in any::<bool>(),
            ip_options in proptest::collection::vec(any::<u8>(), 0..=40),
            tcp_options in proptest::collection::vec(any::<u8>(), 0..=40),
            flags in prop_oneof![Just(0x02u8), Just(0x03), any::<u8>()],
            seq in any::<u32>(),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            cut in any::<usize>(),
            room in 0usize..200,
        ) {
            let mut g = refusing_gateway();
            let mut pkt = packet(tcp, ip_options, tcp_options, flags, seq, payload);
            for (at, v) in flips {
                let n = pkt.len();
                pkt[at % n] = v;
            }
            if cut % 3 == 0 {
                pkt.truncate(cut % (pkt.len() + 1));
            }
            let original = pkt.clone();
            let mut buf = pkt;
            let len = buf.len();
            buf.resize(len + room, 0);
            let valid_before = verify_checksums(&original).is_ok();
            if let Outcome::Answer { answer, len: n, .. } = g.process_in(1, &mut buf, len, Direction::Outbound) {
                prop_assert!(n <= buf.len());
                let a = &buf[..n];
                let s = parse(a).expect("an answer parses");
                let o = parse(&original).expect("an answered packet parsed");
                prop_assert_eq!((s.src, s.dst), (o.dst, o.src));
                // The quoted header is the original's, so its checksum is as valid as it was.
                if valid_before || answer == crate::Answer::TcpReset {
                    prop_assert!(verify_checksums(a).is_ok(), "{:02x?}", a);
                }
                if answer == crate::Answer::IcmpAdminProhibited {
                    let q = n - 28;
                    prop_assert_eq!(&a[28..], &original[..q]);
                }
            }
        }
    }
}
