//! Golden tests: each generator and mitigation against numbers derived by hand from the SPEC
//! (the derivation is next to each expected value). Conventions used throughout:
//! - the engine decides in whole seconds: an event at t = 102.4 s happens in second 102;
//! - a FIN both ways in second s releases the port in second s + 240 (R3.2), and a port due
//!   at second x is free for a new flow in second x ("flows due at now count as free");
//! - every flow to one destination needs its own port (R2.3), so the ports an instance can
//!   use for one destination are its preallocation (R2.8 tiers: 1–50 → 1024, 51–100 → 512,
//!   101–200 → 256, 201–400 → 128, 401–800 → 64, 801–1000 → 32);
//! - idle timeout 240 s (R3.4): a TCP flow whose last packet was in second s is gone from
//!   second s + 240, and a later packet of it is dropped (R3.1) — the flow is *broken*.

use std::fmt::Write as _;

use snatgw_core::config::ConfigFile;
use snatgw_planner::{
    replay, what_if, what_if_table, EvKind, Generator, Mitigation, NotApplicable, Options,
    PlanError, Report,
};

const DST: &str = "198.51.100.10:443";

/// One ARM VM outside any availability set: its own pool of 1 → 1024 ports (R1.3, R2.8).
fn alone() -> ConfigFile {
    ConfigFile::from_toml(
        r#"
[gateway]
seed = 1
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.20"]
[[instance]]
name = "vm1"
private_ip = "10.0.1.10"
"#,
    )
    .unwrap()
}

/// An availability set of `n` VMs `b0..` on one default-SNAT address.
fn set_of(n: u32) -> ConfigFile {
    let mut c = String::from(
        "[gateway]\nseed = 1\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"192.0.2.20\"]\n[[availability_set]]\nname = \"big\"\n",
    );
    for i in 0..n {
        let _ = write!(
            c,
            "[[instance]]\nname = \"b{i}\"\nprivate_ip = \"10.0.{}.{}\"\navailability_set = \"big\"\n",
            10 + i / 200,
            10 + i % 200
        );
    }
    ConfigFile::from_toml(&c).unwrap()
}

/// A load balancer with one frontend and one rule for a backend pool of `n` VMs `m0..`.
fn lb_of(n: u32) -> ConfigFile {
    let mut c = String::from(
        "[gateway]\nseed = 1\nvnet_prefixes = [\"10.0.0.0/16\"]\n[[public_ip]]\nname = \"pip-fe\"\naddress = \"203.0.113.20\"\n",
    );
    let mut members = Vec::new();
    for i in 0..n {
        let _ = write!(
            c,
            "[[instance]]\nname = \"m{i}\"\nprivate_ip = \"10.0.{}.{}\"\n",
            10 + i / 200,
            10 + i % 200
        );
        members.push(format!("\"m{i}\""));
    }
    let _ = write!(
        c,
        "[[load_balancer]]\nname = \"lb\"\nfrontends = [ {{ name = \"fe\", public_ip = \"pip-fe\" }} ]\n\
         backend_pools = [ {{ name = \"bp\", members = [{}] }} ]\n\
         rules = [ {{ name = \"web\", frontend = \"fe\", protocol = \"tcp\", frontend_port = 80, backend_pool = \"bp\", backend_port = 80 }} ]\n",
        members.join(", ")
    );
    ConfigFile::from_toml(&c).unwrap()
}

fn run(cfg: &ConfigFile, g: &str) -> Report {
    let w = Generator::parse(g).unwrap().workload();
    replay(cfg, &w, &Options::default()).unwrap()
}

#[test]
fn http_without_reuse_r2_3_r2_8_r3_2() {
    let r = run(
        &alone(),
        &format!("http:inst=vm1,dst={DST},rate=10,duration=300,request=0.05"),
    );
    let i = &r.instances[0];
    // R2.8: a pool of 1 → 1024 ports.
    assert_eq!(i.allocated, 1024);
    // 3000 requests: 10 per second for 300 s, request i at 0.1·i s.
    assert_eq!(i.attempts, 3000);
    // No port is released before second 240 (FIN in second 0, +240, R3.2), so the first
    // 1024 requests take all 1024 ports; request 1024 (at 102.4 s) is the first refused.
    assert_eq!(i.first_exhaustion_s, Some(102.4));
    assert_eq!(i.peak_used[0], 1024);
    // Failed: second 102 has 10 requests of which 4 fit (1020 + 4 = 1024): 6; seconds
    // 103..=239 all fail: 137 × 10 = 1370. From second 240 on, second s−240's 10 ports come
    // free each second and the 10 requests of second s take them: no more failures.
    // 6 + 1370 = 1376.
    assert_eq!(i.failed, 1376);
    assert_eq!(
        i.lost, 1376,
        "no retry policy: every refused request is lost"
    );
    assert_eq!(i.ok, 3000 - 1376);
    assert_eq!(r.dests[0].peak_used, 1024);
    assert_eq!(r.dests[0].failed, 1376);
    assert_eq!(i.broken, 0);
}

#[test]
fn pool_of_reused_connections_uses_its_size() {
    let r = run(
        &alone(),
        &format!("pool:inst=vm1,dst={DST},conns=8,rate=100,duration=300"),
    );
    let i = &r.instances[0];
    // 8 connections opened at 0 → 8 ports (R2.3); requests are packets on them, each
    // connection sees one every 80 ms, far below the idle timeout (R3.4): none breaks.
    assert_eq!(i.peak_used[0], 8);
    assert_eq!(i.attempts, 8);
    assert_eq!((i.failed, i.broken, i.first_exhaustion_s), (0, 0, None));
}

/// 801 instances → 32 ports (R2.8). One request per second, each holding its port for 240 s
/// after its FIN (R3.2): requests 0..=31 (seconds 0..=31) take the 32 ports, requests 32..=39
/// are refused and retried.
#[test]
fn retry_storm_without_backoff_gives_up() {
    let r = run(
        &set_of(801),
        &format!("retry:inst=b0,dst={DST},rate=1,duration=40,retries=8,delay=1,factor=1"),
    );
    let i = &r.instances[0];
    assert_eq!(i.allocated, 32);
    assert_eq!(i.first_exhaustion_s, Some(32.0));
    // Each of requests 32..=39 tries at i, i+1, ..., i+8 (9 attempts), all before second 240
    // when the first port comes free: 8 × 9 = 72 refused, 8 given up.
    assert_eq!(i.failed, 72);
    assert_eq!(i.gave_up, 8);
    assert_eq!(i.lost, 8);
    assert_eq!(i.attempts, 32 + 72);
}

#[test]
fn retry_storm_with_backoff_gets_through() {
    let r = run(
        &set_of(801),
        &format!("retry:inst=b0,dst={DST},rate=1,duration=40,retries=8,delay=1,factor=2"),
    );
    let i = &r.instances[0];
    // Delays 1, 2, 4, ..., 128: request i tries at i + 0, 1, 3, 7, 15, 31, 63, 127, 255. The
    // first 8 attempts (≤ i + 127 ≤ 166 s) find no port: 8 × 8 = 64 refused. The 9th, at
    // 287..=294 s, comes after requests 0..=31 released their ports (seconds 240..=271): all 8
    // succeed, none is given up.
    assert_eq!(i.failed, 64);
    assert_eq!(i.gave_up, 0);
    assert_eq!(i.lost, 0);
    assert_eq!(i.ok, 40);
}

#[test]
fn idle_flows_without_keepalive_break_r3_4() {
    let r = run(
        &alone(),
        &format!("idle:inst=vm1,dst={DST},flows=10,duration=900,every=300"),
    );
    let i = &r.instances[0];
    // 10 flows opened in second 0, first message at 300 s: each was gone from second 240
    // (R3.4), so its message is dropped (R3.1): 10 broken flows, each counted once.
    assert_eq!(i.peak_used[0], 10);
    assert_eq!(i.broken, 10);
    assert_eq!(i.failed, 0);
}

#[test]
fn idle_flows_with_seed_002_keepalive_survive_r7_1() {
    let r = run(
        &alone(),
        &format!("idle:inst=vm1,dst={DST},flows=10,duration=900,every=300,keepalive=120"),
    );
    let i = &r.instances[0];
    // A probe after 120 s of silence (R7.1): gaps are at most 120 s < 240 s (R3.4).
    assert_eq!(i.broken, 0);
    assert_eq!(i.peak_used[0], 10);
    // At the end (900 s) the FINs were sent; the 10 ports are held until 1140 s (R3.2), so
    // still used when the replay stops at 900 s.
    assert_eq!(i.used_at_end[0], 10);
}

#[test]
fn keepalive_longer_than_idle_timeout_does_not_help() {
    // Linux's default tcp_keepalive_time is 7200 s > 240 s: the flows break as without.
    let cfg = alone();
    let w = Generator::parse(&format!(
        "idle:inst=vm1,dst={DST},flows=10,duration=900,every=300"
    ))
    .unwrap()
    .workload();
    let rows = what_if(
        &cfg,
        &w,
        &[Mitigation::Keepalive(120), Mitigation::Keepalive(7200)],
        &Options::default(),
    )
    .unwrap();
    let broken: Vec<u64> = rows
        .iter()
        .map(|r| r.outcome.as_ref().unwrap().broken())
        .collect();
    // baseline 10 (above), keepalive 120: 0, keepalive 7200: 10.
    assert_eq!(broken, vec![10, 0, 10]);
}

/// Baseline of the mitigation tests: b0 of an 801-instance set (32 ports, R2.8), one request
/// per second for 300 s. Requests 0..=31 take the 32 ports; 32..=239 are refused (208);
/// requests 240..=271 take the ports that requests 0..=31 release in seconds 240..=271 (FIN
/// plus 240 s); 272..=299 find none (the next releases are at 480..): 28 more, 236 in all.
/// First exhaustion at 32 s.
fn mitigations_on_set() -> Vec<(String, Result<Report, PlanError>)> {
    let cfg = set_of(801);
    let w = Generator::parse(&format!("http:inst=b0,dst={DST},rate=1,duration=300"))
        .unwrap()
        .workload();
    let ms = [
        Mitigation::Reuse,
        Mitigation::Pool(4),
        Mitigation::Backoff,
        Mitigation::Ilpip,
        Mitigation::Frontends(2),
        Mitigation::SmallerPool(50),
        Mitigation::SmallerPool(400),
        Mitigation::Keepalive(120),
    ];
    let rows = what_if(&cfg, &w, &ms, &Options::default()).unwrap();
    println!("{}", what_if_table(&rows));
    rows.into_iter().map(|r| (r.label, r.outcome)).collect()
}

#[test]
fn mitigations_side_by_side_r1_1_r2_8() {
    let rows = mitigations_on_set();
    let get = |l: &str| {
        rows.iter()
            .find(|r| r.0 == l)
            .unwrap_or_else(|| panic!("{l}"))
            .1
            .clone()
    };
    let base = get("baseline").unwrap();
    assert_eq!(base.failed(), 236);
    assert_eq!(base.first_exhaustion_s(), Some(32.0));
    // reuse: a request lasts 50 ms and the next comes 1 s later: one connection serves all
    // (R2.3: one port).
    let reuse = get("reuse").unwrap();
    assert_eq!((reuse.failed(), reuse.instances[0].peak_used[0]), (0, 1));
    // pool:4 — the same: a free connection is always there, so one is used.
    let pool = get("pool:4").unwrap();
    assert_eq!((pool.failed(), pool.instances[0].peak_used[0]), (0, 1));
    // backoff: no retries in this workload.
    assert!(matches!(
        get("backoff"),
        Err(PlanError::NotApplicable(NotApplicable::NoRetries))
    ));
    // ilpip: stateless 1:1 NAT, no PAT, no exhaustion (R1.1).
    let ilpip = get("ilpip").unwrap();
    assert_eq!(ilpip.failed(), 0);
    assert_eq!(ilpip.instances[0].scenario, "ilpip");
    // frontends: default SNAT has no frontends to add (R1.3).
    assert!(matches!(
        get("frontends:2"),
        Err(PlanError::NotApplicable(NotApplicable::NoLoadBalanced))
    ));
    // smaller-pool:50 → 1024 ports (R2.8); at most 240 requests hold ports at once (one per
    // second, each released 240 s after its FIN): no failure, peak 240.
    let small = get("smaller-pool:50").unwrap();
    assert_eq!(small.instances[0].allocated, 1024);
    assert_eq!((small.failed(), small.instances[0].peak_used[0]), (0, 240));
    // smaller-pool:400 → 128 ports: requests 128..=239 refused = 112, first at 128 s; from
    // 240 on, requests 0..=59 release a port each second (240..=299) for that second's request.
    let s400 = get("smaller-pool:400").unwrap();
    assert_eq!(s400.instances[0].allocated, 128);
    assert_eq!(s400.failed(), 112);
    assert_eq!(s400.first_exhaustion_s(), Some(128.0));
    // keepalive: these flows are never idle; the outcome is the baseline's.
    assert_eq!(get("keepalive:120").unwrap().failed(), 236);
}

#[test]
fn more_frontends_split_the_pool_r2_8() {
    // 100 members → 512 ports (51–100). Four requests per second (0, 0.25, 0.5, 0.75 s),
    // each holding a port 240 s after its FIN: 512 / 4 = 128 seconds fill the block, so
    // the first refusal is at 128.0 s and seconds 128..=239 lose all 4: 112 × 4 = 448.
    let cfg = lb_of(100);
    let w = Generator::parse(&format!("http:inst=m0,dst={DST},rate=4,duration=300"))
        .unwrap()
        .workload();
    let rows = what_if(
        &cfg,
        &w,
        &[Mitigation::Frontends(2), Mitigation::SmallerPool(50)],
        &Options::default(),
    )
    .unwrap();
    let base = rows[0].outcome.as_ref().unwrap();
    assert_eq!(base.instances[0].allocated, 512);
    assert_eq!(base.first_exhaustion_s(), Some(128.0));
    assert_eq!(base.failed(), 448);
    // Two frontends with 50 members each → 1024 ports; 4 × 240 = 960 held at most: no failure.
    let fe = rows[1].outcome.as_ref().unwrap();
    assert_eq!(fe.instances[0].allocated, 1024);
    assert_eq!((fe.failed(), fe.instances[0].peak_used[0]), (0, 960));
    let small = rows[2].outcome.as_ref().unwrap();
    assert_eq!((small.failed(), small.instances[0].allocated), (0, 1024));
}

#[test]
fn growing_into_the_next_tier_reclaims_half_r2_9() {
    // 50 members → 1024 ports. 600 pooled connections opened at 0 with a request every
    // second on each; at 100 s the pool grows to 51 → 512 ports (R2.9: halved once), so 512
    // ports are reclaimed at once and the flows on them are dropped; at least 600 − 512 = 88
    // connections were on reclaimed ports, and their next packet is dropped (broken).
    let cfg = lb_of(50);
    let mut w = Generator::parse(&format!(
        "pool:inst=m0,dst={DST},conns=600,rate=600,duration=200"
    ))
    .unwrap()
    .workload();
    let m0 = w.instance("m0");
    w.push(100_000, m0, EvKind::Scale(51));
    w.sort();
    let r = replay(&cfg, &w, &Options::default()).unwrap();
    let i = &r.instances[0];
    assert_eq!(i.peak_used[0], 600);
    assert_eq!(i.allocated_min, 512);
    assert_eq!(i.reclaimed_ports, 512);
    assert!(i.reclaimed_flows >= 88, "{i:?}");
    assert_eq!(
        i.broken, i.reclaimed_flows,
        "each dropped flow breaks on its next packet"
    );
}

#[test]
fn trace_round_trip_replays_the_same() {
    let w = Generator::parse(&format!("http:inst=vm1,dst={DST},rate=10,duration=300"))
        .unwrap()
        .workload();
    let back = snatgw_planner::Workload::from_trace_str(&w.to_trace()).unwrap();
    let a = replay(&alone(), &w, &Options::default()).unwrap();
    let b = replay(&alone(), &back, &Options::default()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn plots_are_svg_with_the_preallocation() {
    let w = Generator::parse(&format!("http:inst=b0,dst={DST},rate=1,duration=300"))
        .unwrap()
        .workload();
    let o = Options {
        timeline: true,
        ..Default::default()
    };
    let rows = what_if(&set_of(801), &w, &[Mitigation::Reuse], &o).unwrap();
    let svg = snatgw_planner::plot::plot_what_if(&rows, "b0").unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("preallocated"),
        "{svg:.200}"
    );
    let r = rows[0].outcome.as_ref().unwrap();
    // The timeline reaches the preallocation (32) at second 31 and stays there.
    let tl = &r.timeline[0];
    assert!(
        tl.points.iter().any(|p| p.0 == 31 && p.1[0] == 32),
        "{tl:?}"
    );
    let svg = snatgw_planner::plot::plot_report(r, "b0").unwrap();
    assert!(svg.contains("b0 used (tcp)"));
}

#[test]
fn readme_example_examples_planner_toml() {
    // examples/planner.toml: 100 VMs behind one frontend → 512 ports (R2.8, 51–100). Four
    // requests per second, each holding its port 240 s after its FIN (R3.2): the 512 ports
    // fill in 128 s (first refusal at 128 s); seconds 128..=239 lose 4 each (448); the
    // ports of seconds 0..=127 come back in 240..=367 for that span's requests; 368..=479
    // lose 448 again; 480..=599 reuse the ports of 240..=359. 896 in all.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/planner.toml");
    let cfg = ConfigFile::from_toml(&std::fs::read_to_string(path).unwrap()).unwrap();
    let r = run(
        &cfg,
        "http:inst=web-0,dst=198.51.100.10:443,rate=4,duration=600",
    );
    assert_eq!(r.instances[0].allocated, 512);
    assert_eq!(r.first_exhaustion_s(), Some(128.0));
    assert_eq!(r.failed(), 896);
}

#[test]
fn reuse_needs_the_concurrency_pool_caps_it() {
    // Ten requests per second, each 1 s long: at any moment 10 are in flight (Little's law),
    // so reuse keeps 10 connections (request i+10 starts at the instant request i ends and
    // takes its connection) → 10 ports (R2.3). A pool of 4 holds 4 ports; its requests wait.
    let cfg = alone();
    let w = Generator::parse(&format!(
        "http:inst=vm1,dst={DST},rate=10,duration=60,request=1"
    ))
    .unwrap()
    .workload();
    let rows = what_if(
        &cfg,
        &w,
        &[Mitigation::Reuse, Mitigation::Pool(4)],
        &Options::default(),
    )
    .unwrap();
    let peak = |k: usize| rows[k].outcome.as_ref().unwrap().instances[0].peak_used[0];
    // Baseline: 600 connections, each held 240 s after its FIN (R3.2), fewer than 1024.
    assert_eq!(peak(0), 600);
    assert_eq!(peak(1), 10);
    assert_eq!(peak(2), 4);
    assert!(rows
        .iter()
        .all(|r| r.outcome.as_ref().unwrap().failed() == 0));
}
