#![allow(missing_docs)]
//! R9.4 benchmark: one million flows expire in the same second. Measured as a histogram of
//! single engine calls (wall time of each call, `Instant`), driven the way `snatgw run`
//! drives the engine: bounded timer steps (`advance_bounded` with `EXPIRY_BUDGET`) with a
//! new-flow packet between steps, then the same for the release history falling out of its
//! horizon 240 s later. Next to it, in the same run, the unbounded `advance` the engine used
//! to do inside one `process` call. Three rounds; min / median / max of each figure.
//!
//! Run: `cargo bench -p snatgw-core --bench mass_expiry`. Exactness of the verdicts while the
//! backlog is worked off is proven by the rule test `r9_4_mass_expiry_is_done_in_bounded_steps_with_exact_verdicts`.

mod fixture;

use std::time::{Duration, Instant};

use fixture::{loaded, private, INSTANCES};
use snatgw_core::{Direction, Engine, Packet, Verdict, EXPIRY_BUDGET};

/// Durations of every call of one phase.
struct Phase {
    calls: Vec<Duration>,
}

impl Phase {
    fn pct(&self, p: f64) -> Duration {
        let mut v = self.calls.clone();
        v.sort_unstable();
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
    fn max(&self) -> Duration {
        self.calls.iter().copied().max().unwrap_or_default()
    }
}

/// Works the backlog at `now` off in bounded steps, one new-flow packet between steps.
/// Returns (timer steps, packet calls).
fn drain(e: &mut Engine, now: u32, round: usize) -> (Phase, Phase) {
    let (mut steps, mut packets) = (Vec::new(), Vec::new());
    let mut k = 0u16;
    loop {
        let t = Instant::now();
        let done = e.advance_bounded(now, EXPIRY_BUDGET);
        steps.push(t.elapsed());
        // A new flow from some instance to a fresh destination while the backlog lasts.
        let i = (k as usize * 7 + round) % INSTANCES;
        let p = Packet::udp(private(i), 40_000 + k, 0xcb00_7100 + u32::from(k), 53);
        k = k.wrapping_add(1);
        let t = Instant::now();
        let v = e.process(now, Direction::Outbound, &p);
        packets.push(t.elapsed());
        assert!(matches!(v, Verdict::Translate { .. }), "{v:?}");
        if done {
            break;
        }
        assert!(steps.len() < 100_000, "the backlog must shrink");
    }
    (Phase { calls: steps }, Phase { calls: packets })
}

/// The fixture; `SNATGW_BENCH_HISTORY=0` turns the release history off (to see its share).
fn engine() -> Engine {
    match std::env::var("SNATGW_BENCH_HISTORY") {
        Ok(v) => fixture::loaded_with(1000, fixture::topology_with_history(v.parse().unwrap())),
        Err(_) => loaded(1000),
    }
}

fn stats(name: &str, xs: &mut [f64], unit: &str) {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{name:<58} min {:>9.3}  median {:>9.3}  max {:>9.3} {unit}",
        xs[0],
        xs[xs.len() / 2],
        xs[xs.len() - 1]
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    // `cargo test --benches` runs benches with `--bench`-less args; keep that quick.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        println!("mass_expiry: benchmark, run with cargo bench");
        return;
    }
    let rounds = 3;
    let mut fig: Vec<(&str, Vec<f64>, &str)> = vec![
        ("flows expiring in the same second", vec![], "flows"),
        ("timer steps to work them off", vec![], "steps"),
        (
            "longest timer step (advance_bounded, EXPIRY_BUDGET)",
            vec![],
            "ms",
        ),
        ("p99 timer step", vec![], "ms"),
        ("longest process() call during the backlog", vec![], "ms"),
        ("p99 process() call during the backlog", vec![], "ms"),
        ("backlog worked off in (sum of steps)", vec![], "ms"),
        ("history horizon (+240 s): longest step", vec![], "ms"),
        ("history horizon (+240 s): steps", vec![], "steps"),
        (
            "unbounded advance(240), one call (the old process())",
            vec![],
            "ms",
        ),
    ];
    for round in 0..rounds {
        let mut e = engine();
        let n = e.live_flows();
        let (steps, packets) = drain(&mut e, 240, round);
        if std::env::var_os("SNATGW_BENCH_DEBUG").is_some() {
            let mut idx: Vec<_> = steps.calls.iter().enumerate().collect();
            idx.sort_by_key(|c| std::cmp::Reverse(*c.1));
            eprintln!("slowest steps: {:?}", &idx[..5]);
        }
        let total: Duration = steps.calls.iter().sum();
        // Only the flows made during the backlog remain.
        assert_eq!(e.live_flows(), packets.calls.len());
        let (hsteps, _) = drain(&mut e, 480, round + 1);
        let vals = [
            n as f64,
            steps.calls.len() as f64,
            ms(steps.max()),
            ms(steps.pct(0.99)),
            ms(packets.max()),
            ms(packets.pct(0.99)),
            ms(total),
            ms(hsteps.max()),
            hsteps.calls.len() as f64,
        ];
        for (f, v) in fig.iter_mut().zip(vals) {
            f.1.push(v);
        }
        drop(e);
        let mut e = engine();
        let t = Instant::now();
        e.advance(240);
        fig[9].1.push(ms(t.elapsed()));
        assert_eq!(e.live_flows(), 0);
        eprintln!("round {} done", round + 1);
    }
    println!(
        "R9.4 mass expiry, {rounds} rounds (1000 instances x 1000 flows, all made at 0, idle 240 s, EXPIRY_BUDGET {EXPIRY_BUDGET}):"
    );
    for (name, xs, unit) in fig.iter_mut() {
        stats(name, xs, unit);
    }
}
