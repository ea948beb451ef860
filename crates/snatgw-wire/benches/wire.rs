//! Benchmarks for snatgw-wire: parse, and parse + source rewrite with incremental checksums
//! (RFC 1624) against the same rewrite with full checksum recomputation (RFC 1071).
//!
//! Packets are built with etherparse. Each rewrite iteration alternates between two
//! translations so every iteration really changes the address and port.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etherparse::PacketBuilder;
use snatgw_wire::{checksum, parse, rewrite_icmp_error_inbound, rewrite_src};

const PRIV: [u8; 4] = [10, 0, 0, 4];
const REMOTE: [u8; 4] = [93, 184, 216, 34];
const PUB_A: u32 = 0xc633_6401;
const PUB_B: u32 = 0xc633_6402;

/// A TCP ACK|PSH data packet of exactly `total` bytes.
fn tcp_packet(total: usize) -> Vec<u8> {
    let builder = PacketBuilder::ipv4(PRIV, REMOTE, 64)
        .tcp(40000, 443, 0x1000, 64240)
        .ack(0x2000)
        .psh();
    let payload = vec![0xa5u8; total - 40];
    let mut v = Vec::with_capacity(total);
    builder.write(&mut v, &payload).unwrap();
    assert_eq!(v.len(), total);
    v
}

/// An ICMP "fragmentation needed" quoting a translated TCP segment's header + 8 bytes.
fn icmp_frag_needed() -> Vec<u8> {
    let sent = tcp_packet(1500);
    let builder = PacketBuilder::ipv4([203, 0, 113, 1], PUB_A.to_be_bytes(), 64).icmpv4(
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ),
    );
    let mut v = Vec::new();
    builder.write(&mut v, &sent[..28]).unwrap();
    v
}

/// The same translation as `rewrite_src`, with both checksums recomputed from scratch.
fn rewrite_src_full(buf: &mut [u8], addr: u32, port: u16) {
    let s = parse(buf).unwrap();
    let hl = usize::from(s.l3_len);
    let tl = usize::from(s.total_len);
    buf[12..16].copy_from_slice(&addr.to_be_bytes());
    buf[10..12].copy_from_slice(&[0, 0]);
    let c = checksum::internet_checksum(&buf[..hl]);
    buf[10..12].copy_from_slice(&c.to_be_bytes());
    buf[hl..hl + 2].copy_from_slice(&port.to_be_bytes());
    buf[hl + 16..hl + 18].copy_from_slice(&[0, 0]);
    let ph = checksum::pseudo_header_sum(addr, s.dst, s.proto, (tl - hl) as u16);
    let c = !checksum::fold(checksum::sum(&buf[hl..tl], ph));
    buf[hl + 16..hl + 18].copy_from_slice(&c.to_be_bytes());
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    let pkt = tcp_packet(1500);
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse/tcp_data_1500", |b| {
        b.iter(|| parse(black_box(&pkt)).unwrap())
    });

    for size in [64usize, 1500] {
        let mut buf = tcp_packet(size);
        let mut flip = false;
        g.bench_with_input(
            BenchmarkId::new("parse+rewrite_src/incremental", size),
            &size,
            |b, _| {
                b.iter(|| {
                    flip = !flip;
                    let (a, p) = if flip { (PUB_A, 1024) } else { (PUB_B, 2048) };
                    let s = parse(black_box(&buf)).unwrap();
                    rewrite_src(black_box(&mut buf), &s, a, Some(p)).unwrap();
                })
            },
        );
        let mut buf = tcp_packet(size);
        g.bench_with_input(
            BenchmarkId::new("parse+rewrite_src/full_recompute", size),
            &size,
            |b, _| {
                b.iter(|| {
                    flip = !flip;
                    let (a, p) = if flip { (PUB_A, 1024) } else { (PUB_B, 2048) };
                    rewrite_src_full(black_box(&mut buf), a, p);
                })
            },
        );
    }

    let mut buf = icmp_frag_needed();
    let mut flip = false;
    g.bench_function("parse+rewrite_icmp_error_inbound", |b| {
        b.iter(|| {
            flip = !flip;
            let (a, p) = if flip {
                (0x0a00_0004, 40000)
            } else {
                (PUB_A, 1024)
            };
            let s = parse(black_box(&buf)).unwrap();
            rewrite_icmp_error_inbound(black_box(&mut buf), &s, a, a, Some(p)).unwrap();
        })
    });

    let data = vec![0x5au8; 1500];
    g.throughput(Throughput::Bytes(1500));
    g.bench_function("checksum::sum/1500", |b| {
        b.iter(|| checksum::sum(black_box(&data), 0))
    });
    g.finish();
}

criterion_group!(wire, benches);
criterion_main!(wire);
