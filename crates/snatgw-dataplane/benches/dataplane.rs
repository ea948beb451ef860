#![allow(missing_docs)]
//! The whole path on an established flow (parse + verdict + rewrite + checksums), next to a
//! floor measured in the same run: parse and the checksum update alone.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use snatgw_core::{Direction, Verdict};
use snatgw_dataplane::fuzzing::gateway;
use snatgw_wire::testutil::{tcp_data, tcp_syn};

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<std::net::Ipv4Addr>().expect("addr"))
}

fn path(c: &mut Criterion) {
    let mut g = c.benchmark_group("dataplane");
    g.measurement_time(Duration::from_secs(4)).sample_size(30);
    let mut gw = gateway();
    let (src, dst) = (ip("10.0.3.10"), ip("198.51.100.7"));
    let mut syn = tcp_syn(src, 40000, dst, 443);
    assert!(matches!(
        gw.process(0, &mut syn, Direction::Outbound),
        Verdict::Translate { .. }
    ));
    for (name, len) in [("64B", 64 - 40), ("1500B", 1500 - 40)] {
        let pkt = tcp_data(src, 40000, dst, 443, &vec![0xab; len]);
        g.throughput(Throughput::Elements(1));
        // Full path: parse + engine verdict + incremental rewrite. Each iteration starts from
        // the untranslated packet (copy included in both measurements, see floor below).
        let mut buf = pkt.clone();
        g.bench_function(format!("established_tcp_{name}_full_path"), |b| {
            b.iter(|| {
                buf.copy_from_slice(&pkt);
                black_box(gw.process(1, black_box(&mut buf), Direction::Outbound))
            })
        });
        // Floor: parse + the same rewrite without the engine.
        let mut buf2 = pkt.clone();
        g.bench_function(format!("established_tcp_{name}_floor_parse_rewrite"), |b| {
            b.iter(|| {
                buf2.copy_from_slice(&pkt);
                let s = snatgw_wire::parse(black_box(&buf2)).expect("parse");
                snatgw_wire::rewrite_src(&mut buf2, &s, 0xc000_0264, Some(1024)).expect("rewrite");
                black_box(&buf2);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, path);
criterion_main!(benches);
