//! Invariants of a replay over random workloads (proptest): whatever the trace, the counts
//! add up and never exceed what the SPEC allows.
//! - every attempt is translated, refused (R2.6), limited (R9.2) or dropped: ok + failed +
//!   limited + dropped = attempts;
//! - an instance never holds more ports than its preallocation (R2.4), a destination never
//!   more than the instance (R2.3: ports are shared across destinations, so the instance's
//!   count is at least any destination's);
//! - a trace written and read back replays the same (the format loses nothing);
//! - exhaustion is reported iff some attempt failed for want of a port.

use proptest::prelude::*;
use snatgw_core::config::ConfigFile;
use snatgw_planner::{replay, Dest, End, EvKind, FlowSpec, Options, Retry, Workload};

fn config() -> ConfigFile {
    // vm0 alone (1024 ports), vm1/vm2 in a set of 801 → 32 ports (R2.8), vm3 with an ILPIP.
    let mut c = String::from(
        "[gateway]\nseed = 3\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"192.0.2.20\", \"192.0.2.21\"]\nfin_timeout_secs = 20\nidle_timeout_secs = 30\nrst_timeout_secs = 5\n\
         [[public_ip]]\nname = \"pip\"\naddress = \"203.0.113.9\"\n\
         [[instance]]\nname = \"vm0\"\nprivate_ip = \"10.0.0.5\"\n\
         [[instance]]\nname = \"vm3\"\nprivate_ip = \"10.0.0.6\"\npublic_ip = \"pip\"\n\
         [[availability_set]]\nname = \"big\"\n",
    );
    for i in 0..801u32 {
        c.push_str(&format!(
            "[[instance]]\nname = \"vm{}\"\nprivate_ip = \"10.0.{}.{}\"\navailability_set = \"big\"\n",
            if i < 2 { (i + 1).to_string() } else { format!("f{i}") },
            1 + i / 200,
            10 + i % 200
        ));
    }
    ConfigFile::from_toml(&c).unwrap()
}

#[derive(Debug, Clone)]
struct F {
    inst: usize,
    dest: usize,
    udp: bool,
    open_ms: u64,
    data: Vec<u64>,
    end: Option<(u64, u8)>,
    retry: Option<(u32, u32, bool)>,
}

fn flow() -> impl Strategy<Value = F> {
    (
        0usize..4,
        0usize..3,
        prop::bool::weighted(0.2),
        0u64..120_000,
        prop::collection::vec(0u64..60_000, 0..3),
        prop::option::weighted(0.8, (0u64..90_000, 0u8..4)),
        prop::option::weighted(0.2, (1u32..4, 1u32..5, any::<bool>())),
    )
        .prop_map(|(inst, dest, udp, open_ms, data, end, retry)| F {
            inst,
            dest,
            udp,
            open_ms,
            data,
            end,
            retry,
        })
}

fn workload(fs: &[F]) -> Workload {
    let mut w = Workload::new();
    for f in fs {
        let inst = w.instance(&format!("vm{}", f.inst));
        let ip = format!("198.51.100.{}", 10 + f.dest).parse().unwrap();
        let d = if f.udp {
            Dest::udp(ip, 53)
        } else {
            Dest::tcp(ip, 443)
        };
        let dest = w.dest(d);
        let id = w.flow(FlowSpec {
            inst,
            dest,
            sport: None,
            retry: f.retry.map(|(max, delay, backoff)| Retry {
                max,
                delay: f64::from(delay),
                factor: if backoff { 2.0 } else { 1.0 },
            }),
            refused: false,
        });
        w.push(f.open_ms, id, EvKind::Open);
        let mut t = f.open_ms;
        for d in &f.data {
            t += d;
            w.push(t, id, EvKind::Data);
        }
        if let Some((dt, e)) = f.end {
            let end = [End::Fin, End::Rst, End::Idle, End::Reclaimed][e as usize];
            w.push(t + dt, id, EvKind::Close(end));
        }
    }
    w.sort();
    w
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn replay_counts_add_up(fs in prop::collection::vec(flow(), 1..120)) {
        let cfg = config();
        let w = workload(&fs);
        let r = replay(&cfg, &w, &Options { timeline: true, ..Default::default() }).unwrap();
        for i in &r.instances {
            prop_assert_eq!(i.ok + i.failed + i.limited + i.dropped, i.attempts, "{:?}", i);
            prop_assert_eq!(i.first_exhaustion_s.is_some(), i.failed > 0);
            if i.scenario != "ilpip" {
                prop_assert!(i.peak_used[0] <= i.allocated && i.peak_used[1] <= i.allocated, "{:?}", i);
            } else {
                prop_assert_eq!(i.peak_used, [0, 0]);
                prop_assert_eq!(i.failed, 0);
            }
            for d in r.dests.iter().filter(|d| d.instance == i.name) {
                let b = usize::from(d.dest.l4 == snatgw_core::L4::Udp);
                prop_assert!(d.peak_used <= i.peak_used[b], "{:?} {:?}", d, i);
            }
        }
        prop_assert_eq!(r.sport_collisions, 0);
        let back = Workload::from_trace_str(&w.to_trace()).unwrap();
        let r2 = replay(&cfg, &back, &Options { timeline: true, ..Default::default() }).unwrap();
        prop_assert_eq!(r, r2);
    }
}
