//! Replay speed (issue #11 target: ≥ 10M events per second on one core). Each case replays a
//! whole generated workload through the engine; throughput is trace events per second
//! (opens, packets, closes; the engine's timer work for them is included).
//! `cargo bench -p snatgw-planner --bench replay`; results in docs/PERFORMANCE.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use snatgw_core::config::ConfigFile;
use snatgw_planner::{replay, Generator, Options, Workload};

fn alone(n: u32) -> ConfigFile {
    let mut c = String::from(
        "[gateway]\nseed = 1\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"192.0.2.20\"]\n",
    );
    for i in 0..n {
        c.push_str(&format!(
            "[[instance]]\nname = \"vm{i}\"\nprivate_ip = \"10.0.{}.{}\"\n",
            1 + i / 200,
            10 + i % 200
        ));
    }
    ConfigFile::from_toml(&c).unwrap()
}

fn gen(specs: &[String]) -> Workload {
    let mut w = Workload::new();
    for s in specs {
        w.merge(&Generator::parse(s).unwrap().workload());
    }
    w
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("replay");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    let cases: Vec<(&str, ConfigFile, Workload)> = vec![
        (
            // Data-heavy: 64 pooled connections, 50 000 requests/s (2 packets each), 20 s.
            "pool_64_conns_2M_packets",
            alone(1),
            gen(&["pool:inst=vm0,dst=198.51.100.10:443,conns=64,rate=50000,duration=20".into()]),
        ),
        (
            // Exhaustion: HTTP without reuse at 20 000 requests/s for 20 s on 1024 ports:
            // almost every open is refused (R2.6).
            "http_no_reuse_exhausting",
            alone(1),
            gen(&["http:inst=vm0,dst=198.51.100.10:443,rate=20000,duration=20".into()]),
        ),
        (
            // Churn without exhaustion: 16 instances × 16 destinations × 60 requests/s for
            // 15 s: every open gets a port, every FIN releases one 240 s later.
            "http_churn_256_pairs",
            alone(16),
            gen(&(0..16)
                .flat_map(|i| {
                    (0..16).map(move |d| {
                        format!(
                            "http:inst=vm{i},dst=198.51.100.{}:443,rate=60,duration=15",
                            10 + d
                        )
                    })
                })
                .collect::<Vec<_>>()),
        ),
    ];
    for (name, cfg, w) in &cases {
        g.throughput(Throughput::Elements(w.events.len() as u64));
        g.bench_function(*name, |b| {
            b.iter(|| black_box(replay(cfg, w, &Options::default()).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
