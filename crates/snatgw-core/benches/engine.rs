#![allow(missing_docs)]
//! Engine benchmarks (SPEC-independent speed targets of issue #2): see docs/PERFORMANCE.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use snatgw_core::{hash::splitmix64, tcp_flags, Direction, Engine, Packet, Verdict};

// Huge pages for the large tables, as the `snatgw` binary does. For the 4 KiB-page baseline:
// RUSTFLAGS="--cfg snatgw_bench_4k" cargo bench -p snatgw-core --bench engine
#[cfg(not(snatgw_bench_4k))]
#[global_allocator]
static ALLOC: snatgw_io::HugePageAlloc = snatgw_io::HugePageAlloc;

#[path = "fixture.rs"]
mod fixture;
use fixture::*;

fn established(c: &mut Criterion) {
    let mut g = c.benchmark_group("established");
    g.measurement_time(Duration::from_secs(5)).sample_size(20);
    let mut e = loaded(1000);
    assert_eq!(e.live_flows(), 1_000_000);
    // Packets of established flows, in random order (no cache-friendly locality).
    let mut s = 1u64;
    let pkts: Vec<Packet> = (0..65_536)
        .map(|_| {
            let r = splitmix64(&mut s) as usize;
            Packet::tcp(
                private(r % INSTANCES),
                10_000 + ((r >> 20) % 1000) as u16,
                dst((r >> 20) % 1000),
                443,
                tcp_flags::ACK,
            )
        })
        .collect();
    let (addr0, _) = match e.process(1, Direction::Outbound, &pkts[0]) {
        Verdict::Translate { addr, port } => (addr, port),
        v => panic!("{v:?}"),
    };
    black_box(addr0);
    g.throughput(Throughput::Elements(pkts.len() as u64));
    g.bench_function("outbound_verdict_1M_flows_random_order", |b| {
        b.iter(|| {
            for p in &pkts {
                black_box(e.process(1, Direction::Outbound, black_box(p)));
            }
        })
    });
    // Packets of 4096 hot flows (a burst of traffic on a working set that stays in cache), with
    // all 1M flows live: the engine's own cost per packet, without DRAM latency.
    let hot: Vec<Packet> = pkts
        .iter()
        .take(4096)
        .copied()
        .cycle()
        .take(65_536)
        .collect();
    g.bench_function("outbound_verdict_hot_4k_of_1M_flows", |b| {
        b.iter(|| {
            for p in &hot {
                black_box(e.process(1, Direction::Outbound, black_box(p)));
            }
        })
    });
    // Bursts: 32 packets of one flow back to back (as TCP sends a window), flows in random
    // order among the 1M: the first packet of a burst pays the cache misses.
    let bursts: Vec<Packet> = pkts
        .iter()
        .take(2048)
        .flat_map(|p| std::iter::repeat_n(*p, 32))
        .collect();
    g.bench_function("outbound_verdict_bursts_of_32_1M_flows", |b| {
        b.iter(|| {
            for p in &bursts {
                black_box(e.process(1, Direction::Outbound, black_box(p)));
            }
        })
    });
    // The same flows seen from the internet side.
    let inb: Vec<Packet> = pkts
        .iter()
        .map(|p| match e.process(1, Direction::Outbound, p) {
            Verdict::Translate { addr, port } => {
                Packet::tcp(p.dst, p.dst_port, addr, port, tcp_flags::ACK)
            }
            v => panic!("{v:?}"),
        })
        .collect();
    g.bench_function("inbound_verdict_1M_flows_random_order", |b| {
        b.iter(|| {
            for p in &inb {
                black_box(e.process(1, Direction::Inbound, black_box(p)));
            }
        })
    });
    g.finish();
}

fn new_flows(c: &mut Criterion) {
    let mut g = c.benchmark_group("new_flow");
    g.measurement_time(Duration::from_secs(8)).sample_size(10);
    const N: usize = 200_000;
    g.throughput(Throughput::Elements(N as u64));
    // 200 new flows per instance to 250 destinations: port allocation with sharing (R2.3).
    let pkts: Vec<Packet> = (0..N).map(|n| syn(n % INSTANCES, n / INSTANCES)).collect();
    g.bench_function("syn_with_port_allocation_spread", |b| {
        b.iter_batched(
            || {
                let mut e = Engine::new(topology(), 0).expect("engine");
                e.reserve_flows(N);
                e
            },
            |mut e| {
                for p in &pkts {
                    black_box(e.process(0, Direction::Outbound, p));
                }
                e
            },
            BatchSize::PerIteration,
        )
    });
    // The hard case: 1000 flows per instance to ONE destination endpoint (each needs its own
    // port, R2.3), 200 instances.
    let hot: Vec<Packet> = (0..N)
        .map(|n| {
            Packet::tcp(
                private(n % 200),
                10_000 + (n / 200) as u16,
                dst(0),
                443,
                tcp_flags::SYN,
            )
        })
        .collect();
    g.bench_function("syn_with_port_allocation_one_destination", |b| {
        b.iter_batched(
            || {
                let mut e = Engine::new(topology(), 0).expect("engine");
                e.reserve_flows(N);
                e
            },
            |mut e| {
                for p in &hot {
                    black_box(e.process(0, Direction::Outbound, p));
                }
                e
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn expiry(c: &mut Criterion) {
    let mut g = c.benchmark_group("expiry");
    g.measurement_time(Duration::from_secs(20)).sample_size(10);
    g.throughput(Throughput::Elements(1_000_000));
    g.bench_function("expire_1M_idle_flows", |b| {
        b.iter_batched(
            || loaded(1000),
            |mut e: Engine| {
                e.advance(240);
                assert_eq!(e.live_flows(), 0);
                e
            },
            BatchSize::PerIteration,
        )
    });
    // The same without the per-destination release history (R2.3 decision): its cost.
    g.bench_function("expire_1M_idle_flows_no_history", |b| {
        b.iter_batched(
            || loaded_with(1000, topology_with_history(0)),
            |mut e: Engine| {
                e.advance(240);
                assert_eq!(e.live_flows(), 0);
                e
            },
            BatchSize::PerIteration,
        )
    });
    // A tick with 1M live flows and nothing due: the cost of the timer check itself.
    let mut e = loaded(1000);
    let mut t = 1;
    g.throughput(Throughput::Elements(1));
    g.bench_function("tick_1M_flows_nothing_due", |b| {
        b.iter(|| {
            t = (t % 200) + 1;
            e.advance(black_box(t));
        })
    });
    g.finish();
}

criterion_group!(benches, established, new_flows, expiry);
criterion_main!(benches);
