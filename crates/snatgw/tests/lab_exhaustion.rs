//! Port exhaustion with real sockets (R2.4, R2.6, R2.7): an availability set of 801
//! instances (only three get a namespace) gives 32 ports per instance (R2.8), so exactly 32
//! concurrent connections to one destination succeed and the 33rd fails, while the same
//! instance reaches other destinations and its neighbours on the same public IP reach the
//! same destination; once the connections close and their ports are released, new ones
//! succeed again. Root only.

mod common;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::*;

const POOL_IP: &str = "192.0.2.20";

fn config() -> String {
    let mut c = format!(
        "[gateway]\nseed = 1\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"{POOL_IP}\"]\n\
         idle_timeout_secs = 30\nfin_timeout_secs = 2\nrst_timeout_secs = 2\nport_reuse_history_secs = 2\n\n\
         [[availability_set]]\nname = \"big\"\n"
    );
    for i in 0..801u32 {
        let _ = write!(
            c,
            "\n[[instance]]\nname = \"b{i}\"\nprivate_ip = \"10.0.{}.{}\"\navailability_set = \"big\"\n",
            10 + i / 200,
            10 + i % 200
        );
    }
    c
}

#[test]
fn r2_4_r2_6_r2_7_exhaustion_exactly_at_preallocation_and_recovery() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start("ex", &config(), Some(&["b0", "b1"]));
    let b0 = g.inst("b0");
    assert_eq!(u(&b0["allocated"]), 32, "R2.8: 801 instances -> 32 ports");
    assert_eq!(b0["public_ip"], POOL_IP);
    let a9000 = format!("{SERVER_A}:9000");

    // Exactly the preallocation: 32 concurrent connections to one destination succeed...
    let held = g.spawn_client("b0", &["hold", &a9000, "--count", "32", "--hold", "5"]);
    let r = held.read_report(T).unwrap();
    assert_eq!((r.ok, r.failed), (32, 0), "{r:?}");
    let ports: BTreeSet<u16> = r.seen_ports().into_iter().collect();
    assert_eq!(
        ports.len(),
        32,
        "each flow to one destination has its own port"
    );
    // ... all inside b0's block (R2.4)...
    let engine =
        snatgw_core::Engine::new(snatgw_core::Topology::from_toml(&config()).unwrap(), 0).unwrap();
    let block = engine.instance("b0").unwrap().block;
    assert!(ports
        .iter()
        .all(|p| block.iter().any(|(a, b)| (*a..=*b).contains(p))));
    // ... and the next one fails (R2.6).
    let t = Instant::now();
    let one = g.client("b0", &["hold", &a9000, "--count", "1", "--timeout", "1"]);
    assert_eq!((one.ok, one.failed), (0, 1), "{one:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // Nothing else is disturbed: another destination from b0, the same destination from b1
    // (same public IP, its own block).
    let other_dst = g.client("b0", &["hold", &format!("{SERVER_B}:9000"), "--count", "1"]);
    assert!(other_dst.all_ok(), "{other_dst:?}");
    let other_inst = g.client("b1", &["hold", &a9000, "--count", "1"]);
    assert!(other_inst.all_ok(), "{other_inst:?}");
    assert_eq!(other_inst.seen_ips()[0].to_string(), POOL_IP);
    assert!(
        !ports.contains(&other_inst.seen_ports()[0]),
        "R2.4: blocks never overlap"
    );
    // Counted, with an event naming instance, public IP, protocol and destination (R2.6, R6.2).
    assert!(g.wait(Duration::from_secs(3), |s| {
        s["events"].as_array().unwrap().iter().any(|e| {
            e["kind"] == "exhaustion"
                && e["instance"] == "b0"
                && e["public_ip"] == POOL_IP
                && e["protocol"] == "tcp"
                && e["destination"] == a9000.as_str()
        })
    }));
    // 32 + the connection to the other destination (stats are written every 200 ms).
    assert!(
        g.wait(Duration::from_secs(3), |s| s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |i| i["name"] == "b0" && u(&i["connections_ok"]["tcp"]) == 33
            )),
        "{}",
        g.inst("b0")
    );
    let b0 = g.inst("b0");
    assert!(u(&b0["connections_failed"]["tcp"]) >= 1);
    assert!(u(&b0["drops"]["ports_exhausted"]) >= 1);
    // The gateway logged it as a structured warning.
    let log = std::fs::read_to_string(g.dir.join("gateway.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("exhaustion")
            && l.contains("instance=\"b0\"")
            || l.contains("WARN") && l.contains("exhaustion") && l.contains("instance=b0")),
        "{log}"
    );

    // R2.7: the held connections close (FIN both ways), the ports are released after the
    // FIN delay (2 s), and the next new flow to that destination succeeds.
    assert!(held
        .wait_timeout(Duration::from_secs(15))
        .unwrap()
        .is_some());
    assert!(
        g.wait(Duration::from_secs(8), |s| s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "b0" && u(&i["used"]["tcp"]) == 0)),
        "ports released: {}",
        g.inst("b0")
    );
    let again = g.client("b0", &["hold", &a9000, "--count", "32", "--timeout", "2"]);
    assert_eq!((again.ok, again.failed), (32, 0), "{again:?}");
    g.finish();
}
