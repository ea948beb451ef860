//! Replay speed (issue #11 target: ≥ 10M events per second on one core). Each case replays a
//! whole generated workload through the engine; throughput is trace events per second
//! (opens, packets, closes; the engine's timer work for them is included).
//! `cargo bench -p snatgw-planner --bench replay`; results in docs/PERFORMANCE.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use snatgw_core::config::ConfigFile;
use snatgw_core::{tcp_flags, Direction, Engine, Packet, Topology, Verdict};
use snatgw_planner::{replay, EvKind, Generator, Options, Workload};

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

/// Replays `w`'s opens, data and FIN closes as packets straight into an engine.
fn engine_alone(cfg: &ConfigFile, w: &Workload) -> u64 {
    let topo = Topology::from_config(cfg.clone()).unwrap();
    let mut e = Engine::new(topo, 0).unwrap();
    let ips: Vec<u32> = w
        .instances
        .iter()
        .map(|n| {
            e.topology()
                .instances
                .iter()
                .find(|i| &*i.name == n.as_str())
                .unwrap()
                .private_ip
        })
        .collect();
    let mut pubs: Vec<Option<(u32, u16)>> = vec![None; w.flows.len()];
    let mut sec = 0;
    let mut ok = 0;
    for ev in &w.events {
        let s = (ev.t_ms / 1000) as u32;
        while sec < s {
            sec += 1;
            e.advance(sec);
        }
        let f = &w.flows[ev.flow as usize];
        let d = w.dests[f.dest as usize];
        // One source port per flow index (unique within these workloads' live flows).
        let sport = 1024 + (ev.flow % 64_000) as u16;
        let src = ips[f.inst as usize];
        match ev.kind {
            EvKind::Open => {
                if let Verdict::Translate { addr, port } = e.process(
                    sec,
                    Direction::Outbound,
                    &Packet::tcp(src, sport, d.ip, d.port, tcp_flags::SYN),
                ) {
                    pubs[ev.flow as usize] = Some((addr, port));
                    ok += 1;
                }
            }
            EvKind::Data => {
                e.process(
                    sec,
                    Direction::Outbound,
                    &Packet::tcp(src, sport, d.ip, d.port, tcp_flags::ACK),
                );
            }
            EvKind::Close(_) => {
                if let Some((a, p)) = pubs[ev.flow as usize] {
                    let fl = tcp_flags::FIN | tcp_flags::ACK;
                    e.process(
                        sec,
                        Direction::Outbound,
                        &Packet::tcp(src, sport, d.ip, d.port, fl),
                    );
                    e.process(
                        sec,
                        Direction::Inbound,
                        &Packet::tcp(d.ip, d.port, a, p, fl),
                    );
                }
            }
            // Scale events, and kinds this bench does not drive.
            _ => {}
        }
    }
    ok
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
            // Exhaustion: HTTP without reuse at 4 000 requests/s for 300 s on 1024 ports:
            // almost every open is refused (R2.6); from 240 s on, ports are released.
            "http_no_reuse_exhausting",
            alone(1),
            gen(&["http:inst=vm0,dst=198.51.100.10:443,rate=4000,duration=300".into()]),
        ),
        (
            // Churn without exhaustion: 16 instances × 16 destinations × 4 requests/s for
            // 300 s (960 of 1024 ports per destination at most): every open gets a port,
            // every FIN releases it 240 s later; up to 245 760 flows live.
            "http_churn_256_pairs",
            alone(16),
            gen(&(0..16)
                .flat_map(|i| {
                    (0..16).map(move |d| {
                        format!(
                            "http:inst=vm{i},dst=198.51.100.{}:443,rate=4,duration=300",
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
        // The same packets straight into the engine, without the planner's bookkeeping or
        // the journal: the ceiling the engine sets.
        g.bench_function(format!("{name}/engine_alone"), |b| {
            b.iter(|| black_box(engine_alone(cfg, w)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
