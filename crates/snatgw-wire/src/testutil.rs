//! Builders for valid IPv4 packets with correct checksums, for tests and fuzz seed corpora.
//!
//! Available in this crate's tests and, for other crates, with the `testutil` cargo feature.
//! Everything is computed with this crate's [`checksum`] module and plain
//! byte writes; no extra dependency. The builders favour clarity over speed, allocate, and
//! panic on impossible requests (options longer than 40 bytes, packets longer than 65535).
//!
//! What it does not do: build malformed packets (mutate the output for that) or IPv6.

use crate::checksum;
use crate::field::ipv4::{PROTO_ESP, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::field::{esp, icmp, ipv4, tcp, udp};
use crate::field::{get_u16, set_u16 as put16, set_u32 as put32};

/// An IPv4 address from its four octets, host order (`addr(10, 0, 0, 4)` = 10.0.0.4).
pub const fn addr(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

/// The IPv4 header fields a test chooses; the rest (version, IHL, total length, protocol,
/// checksum, fragment fields) is filled in by the builders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4Spec {
    /// Source address.
    pub src: u32,
    /// Destination address.
    pub dst: u32,
    /// Time to live.
    pub ttl: u8,
    /// Identification.
    pub ident: u16,
    /// Don't-fragment flag.
    pub dont_frag: bool,
    /// Type of service byte.
    pub tos: u8,
    /// Raw option bytes (at most 40), zero-padded to a multiple of 4.
    pub options: Vec<u8>,
}

impl Default for Ipv4Spec {
    /// 10.0.0.4 -> 93.184.216.34, TTL 64, ident 0x1c46, no options.
    fn default() -> Self {
        Self {
            src: addr(10, 0, 0, 4),
            dst: addr(93, 184, 216, 34),
            ttl: 64,
            ident: 0x1c46,
            dont_frag: false,
            tos: 0,
            options: Vec::new(),
        }
    }
}

impl Ipv4Spec {
    /// The [default](Ipv4Spec::default) header from `src` to `dst`.
    pub fn between(src: u32, dst: u32) -> Self {
        Self {
            src,
            dst,
            ..Self::default()
        }
    }
}

/// The TCP header fields a test chooses; data offset and checksum are filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSpec {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Raw flag byte (see [`TcpFlags`](crate::TcpFlags) constants).
    pub flags: u8,
    /// Window.
    pub window: u16,
    /// Urgent pointer.
    pub urgent: u16,
    /// Raw option bytes (at most 40), zero-padded to a multiple of 4.
    pub options: Vec<u8>,
}

impl Default for TcpSpec {
    /// Port 40000 -> 443, seq 1, ack 1, ACK|PSH, window 64240, no options.
    fn default() -> Self {
        Self {
            src_port: 40000,
            dst_port: 443,
            seq: 1,
            ack: 1,
            flags: crate::TcpFlags::ACK | crate::TcpFlags::PSH,
            window: 64240,
            urgent: 0,
            options: Vec::new(),
        }
    }
}

fn padded(options: &[u8]) -> Vec<u8> {
    assert!(options.len() <= 40, "at most 40 bytes of options");
    let mut o = options.to_vec();
    o.resize(options.len().div_ceil(4) * 4, 0);
    o
}

fn len16(len: usize) -> u16 {
    u16::try_from(len).expect("packet longer than 65535 bytes")
}

/// An IPv4 packet carrying `payload` as protocol `proto`, with a correct header checksum.
/// The payload is copied as is (its own checksums are the caller's business).
pub fn build_ipv4(ip: &Ipv4Spec, proto: u8, payload: &[u8]) -> Vec<u8> {
    let options = padded(&ip.options);
    let hl = ipv4::MIN_HEADER_LEN + options.len();
    let mut b = vec![0u8; hl];
    b[ipv4::VER_IHL] = ipv4::ver_ihl(hl);
    b[ipv4::TOS] = ip.tos;
    put16(&mut b, ipv4::TOTAL_LEN, len16(hl + payload.len()));
    put16(&mut b, ipv4::IDENT, ip.ident);
    let df = if ip.dont_frag { ipv4::FLAG_DF } else { 0 };
    put16(&mut b, ipv4::FLAGS_FRAG, df);
    b[ipv4::TTL] = ip.ttl;
    b[ipv4::PROTOCOL] = proto;
    put32(&mut b, ipv4::SRC, ip.src);
    put32(&mut b, ipv4::DST, ip.dst);
    b[ipv4::MIN_HEADER_LEN..].copy_from_slice(&options);
    let c = checksum::internet_checksum(&b);
    put16(&mut b, ipv4::CHECKSUM, c);
    b.extend_from_slice(payload);
    b
}

fn l4_checksum(ip: &Ipv4Spec, proto: u8, segment: &[u8]) -> u16 {
    let ph = checksum::pseudo_header_sum(ip.src, ip.dst, proto, len16(segment.len()));
    !checksum::fold(checksum::sum(segment, ph))
}

/// A TCP segment in an IPv4 packet, both checksums correct.
pub fn build_tcp(ip: &Ipv4Spec, spec: &TcpSpec, payload: &[u8]) -> Vec<u8> {
    let options = padded(&spec.options);
    let hl = tcp::MIN_HEADER_LEN + options.len();
    let mut t = vec![0u8; hl];
    put16(&mut t, tcp::SRC_PORT, spec.src_port);
    put16(&mut t, tcp::DST_PORT, spec.dst_port);
    put32(&mut t, tcp::SEQ, spec.seq);
    put32(&mut t, tcp::ACK, spec.ack);
    t[tcp::DATA_OFF] = tcp::data_off_byte(hl);
    t[tcp::FLAGS] = spec.flags;
    put16(&mut t, tcp::WINDOW, spec.window);
    put16(&mut t, tcp::URGENT, spec.urgent);
    t[tcp::MIN_HEADER_LEN..].copy_from_slice(&options);
    t.extend_from_slice(payload);
    let c = l4_checksum(ip, PROTO_TCP, &t);
    put16(&mut t, tcp::CHECKSUM, c);
    build_ipv4(ip, PROTO_TCP, &t)
}

fn udp_segment(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; udp::HEADER_LEN];
    put16(&mut u, udp::SRC_PORT, src_port);
    put16(&mut u, udp::DST_PORT, dst_port);
    put16(&mut u, udp::LEN, len16(udp::HEADER_LEN + payload.len()));
    u.extend_from_slice(payload);
    u
}

/// A UDP datagram in an IPv4 packet, both checksums correct (a computed 0 is sent as 0xffff).
pub fn build_udp(ip: &Ipv4Spec, src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = udp_segment(src_port, dst_port, payload);
    let c = match l4_checksum(ip, PROTO_UDP, &u) {
        0 => 0xffff,
        c => c,
    };
    put16(&mut u, udp::CHECKSUM, c);
    build_ipv4(ip, PROTO_UDP, &u)
}

/// A UDP datagram whose checksum field is 0 ("no checksum", RFC 768).
pub fn build_udp_no_checksum(
    ip: &Ipv4Spec,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    build_ipv4(ip, PROTO_UDP, &udp_segment(src_port, dst_port, payload))
}

/// Any ICMP message: type, code, the 4 rest-of-header bytes and a body; checksum correct.
pub fn build_icmp(ip: &Ipv4Spec, icmp_type: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; icmp::HEADER_LEN];
    m[icmp::TYPE] = icmp_type;
    m[icmp::CODE] = code;
    m[icmp::REST..icmp::HEADER_LEN].copy_from_slice(&rest);
    m.extend_from_slice(body);
    let c = checksum::internet_checksum(&m);
    put16(&mut m, icmp::CHECKSUM, c);
    build_ipv4(ip, PROTO_ICMP, &m)
}

/// An ICMP echo request (`request`) or reply.
pub fn build_icmp_echo(ip: &Ipv4Spec, request: bool, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let t = if request {
        icmp::ECHO_REQUEST
    } else {
        icmp::ECHO_REPLY
    };
    let [a, b] = id.to_be_bytes();
    let [c, d] = seq.to_be_bytes();
    build_icmp(ip, t, 0, [a, b, c, d], payload)
}

/// An ICMP error of any type quoting the first `quote_len` bytes of `original` (all of it if
/// shorter). `rest` is the rest-of-header word (e.g. the next-hop MTU in its low 16 bits).
pub fn build_icmp_error(
    ip: &Ipv4Spec,
    icmp_type: u8,
    code: u8,
    rest: u32,
    original: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let q = &original[..quote_len.min(original.len())];
    build_icmp(ip, icmp_type, code, rest.to_be_bytes(), q)
}

/// Destination unreachable (type 3) with `code` (3 = port unreachable, ...).
pub fn build_icmp_dest_unreachable(
    ip: &Ipv4Spec,
    code: u8,
    original: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    build_icmp_error(ip, icmp::DEST_UNREACHABLE, code, 0, original, quote_len)
}

/// Fragmentation needed (type 3 code 4) with the next-hop MTU (RFC 1191).
pub fn build_icmp_frag_needed(
    ip: &Ipv4Spec,
    mtu: u16,
    original: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    build_icmp_error(
        ip,
        icmp::DEST_UNREACHABLE,
        icmp::CODE_FRAG_NEEDED,
        u32::from(mtu),
        original,
        quote_len,
    )
}

/// Time exceeded in transit (type 11 code 0).
pub fn build_icmp_time_exceeded(ip: &Ipv4Spec, original: &[u8], quote_len: usize) -> Vec<u8> {
    build_icmp_error(ip, icmp::TIME_EXCEEDED, 0, 0, original, quote_len)
}

/// An ESP packet: SPI, sequence number, then `payload` (opaque ciphertext + ICV).
pub fn build_esp(ip: &Ipv4Spec, spi: u32, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; esp::HEADER_LEN];
    put32(&mut e, esp::SPI, spi);
    put32(&mut e, esp::SEQ, seq);
    e.extend_from_slice(payload);
    build_ipv4(ip, PROTO_ESP, &e)
}

/// Split a valid IPv4 packet into fragments carrying at most `max_payload` bytes each
/// (rounded down to a multiple of 8, at least 8). The header, options included, is copied
/// into every fragment (real routers copy only options with the copy bit); header checksums
/// are recomputed. A packet that fits is returned unchanged as the only element.
///
/// # Panics
/// If `packet` is not a valid IPv4 packet.
pub fn fragment(packet: &[u8], max_payload: usize) -> Vec<Vec<u8>> {
    let ip = crate::Ipv4Packet::new_checked(packet).expect("valid IPv4 packet");
    let unit = usize::from(ipv4::FRAG_UNIT);
    let step = (max_payload / unit).max(1) * unit;
    let hl = usize::from(ip.header_len());
    let payload = ip.payload();
    if payload.len() <= step {
        return vec![ip.packet_bytes().to_vec()];
    }
    let base = usize::from(ip.frag_offset());
    let last_more = ip.more_frags();
    let chunks: Vec<&[u8]> = payload.chunks(step).collect();
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut f = packet[..hl].to_vec();
            f.extend_from_slice(chunk);
            let total = len16(f.len());
            put16(&mut f, ipv4::TOTAL_LEN, total);
            let more = i + 1 < n || last_more;
            let off = ((base + i * step) / unit) as u16;
            let df = get_u16(&f, ipv4::FLAGS_FRAG) & ipv4::FLAG_DF;
            let mf = if more { ipv4::FLAG_MF } else { 0 };
            put16(&mut f, ipv4::FLAGS_FRAG, df | mf | off);
            put16(&mut f, ipv4::CHECKSUM, 0);
            let c = checksum::internet_checksum(&f[..hl]);
            put16(&mut f, ipv4::CHECKSUM, c);
            f
        })
        .collect()
}

fn spec(src: u32, dst: u32) -> Ipv4Spec {
    Ipv4Spec::between(src, dst)
}

/// A TCP SYN (no ACK, MSS option 1460) from `src:src_port` to `dst:dst_port`.
pub fn tcp_syn(src: u32, src_port: u16, dst: u32, dst_port: u16) -> Vec<u8> {
    let tcp = TcpSpec {
        src_port,
        dst_port,
        seq: 0x1000_0000,
        ack: 0,
        flags: crate::TcpFlags::SYN,
        options: vec![2, 4, 0x05, 0xb4],
        ..TcpSpec::default()
    };
    build_tcp(&spec(src, dst), &tcp, &[])
}

/// A TCP data segment (ACK|PSH) carrying `payload`.
pub fn tcp_data(src: u32, src_port: u16, dst: u32, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let tcp = TcpSpec {
        src_port,
        dst_port,
        ..TcpSpec::default()
    };
    build_tcp(&spec(src, dst), &tcp, payload)
}

/// A TCP FIN (FIN|ACK).
pub fn tcp_fin(src: u32, src_port: u16, dst: u32, dst_port: u16) -> Vec<u8> {
    let tcp = TcpSpec {
        src_port,
        dst_port,
        flags: crate::TcpFlags::FIN | crate::TcpFlags::ACK,
        ..TcpSpec::default()
    };
    build_tcp(&spec(src, dst), &tcp, &[])
}

/// A TCP RST (RST|ACK).
pub fn tcp_rst(src: u32, src_port: u16, dst: u32, dst_port: u16) -> Vec<u8> {
    let tcp = TcpSpec {
        src_port,
        dst_port,
        flags: crate::TcpFlags::RST | crate::TcpFlags::ACK,
        ..TcpSpec::default()
    };
    build_tcp(&spec(src, dst), &tcp, &[])
}

/// A UDP datagram with a checksum.
pub fn udp(src: u32, src_port: u16, dst: u32, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    build_udp(&spec(src, dst), src_port, dst_port, payload)
}

/// An ICMP echo request.
pub fn icmp_echo_request(src: u32, dst: u32, id: u16, seq: u16) -> Vec<u8> {
    build_icmp_echo(&spec(src, dst), true, id, seq, b"snatgw-ping")
}

pub use crate::verify::verify_checksums;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_produce_valid_packets() {
        let a = addr(10, 0, 0, 4);
        let b = addr(8, 8, 8, 8);
        let with_opts = Ipv4Spec {
            options: vec![0x94, 4, 0, 0, 1],
            ..spec(a, b)
        };
        let inner = tcp_data(b, 443, a, 40000, b"0123456789");
        let pkts = [
            tcp_syn(a, 1, b, 2),
            tcp_data(a, 1, b, 2, b"hello"),
            tcp_fin(a, 1, b, 2),
            tcp_rst(a, 1, b, 2),
            udp(a, 1, b, 2, b"x"),
            build_udp_no_checksum(&with_opts, 1, 2, b"abc"),
            icmp_echo_request(a, b, 7, 1),
            build_icmp_echo(&with_opts, false, 7, 1, b"odd"),
            build_esp(&with_opts, 1, 2, &[0; 9]),
            build_icmp_frag_needed(&spec(b, a), 1280, &inner, 28),
            build_icmp_time_exceeded(&spec(b, a), &inner, 1000),
            build_icmp_dest_unreachable(&spec(b, a), 3, &udp(a, 5, b, 53, b"q"), 1000),
            build_tcp(
                &with_opts,
                &TcpSpec {
                    options: vec![1, 1, 4, 2, 2, 4, 5, 0xb4],
                    ..TcpSpec::default()
                },
                &[0xff; 33],
            ),
        ];
        for (i, p) in pkts.iter().enumerate() {
            assert_eq!(verify_checksums(p), Ok(()), "packet {i}");
        }
        assert_eq!(
            crate::Ipv4Packet::new_checked(&pkts[5][..])
                .unwrap()
                .header_len(),
            28
        );
    }

    #[test]
    fn verify_checksums_detects_corruption() {
        let mut p = udp(1, 2, 3, 4, b"abc");
        p[ipv4::MIN_HEADER_LEN + udp::HEADER_LEN + 1] ^= 1;
        assert_eq!(verify_checksums(&p), Err("udp"));
        let mut p = tcp_syn(1, 2, 3, 4);
        p[ipv4::CHECKSUM] ^= 1;
        assert_eq!(verify_checksums(&p), Err("ipv4 header checksum"));
        let inner = udp(1, 2, 3, 4, b"abc");
        let mut p = build_icmp_time_exceeded(&spec(3, 1), &inner, 100);
        let last = p.len() - 1;
        p[last] ^= 1;
        assert_eq!(verify_checksums(&p), Err("icmp"));
    }

    #[test]
    fn fragment_reassembles_to_original_payload() {
        let full = udp(1, 2, 3, 4, &[0x5a; 100]);
        let frags = fragment(&full, 30);
        assert_eq!(frags.len(), 5); // 108 bytes of UDP in 24-byte pieces
        let mut payload = Vec::new();
        for f in &frags {
            let ip = crate::Ipv4Packet::new_checked(&f[..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(usize::from(ip.frag_offset()), payload.len());
            payload.extend_from_slice(ip.payload());
        }
        assert_eq!(payload, full[20..]);
        assert_eq!(fragment(&full, 2000), vec![full.clone()]);
    }
}
