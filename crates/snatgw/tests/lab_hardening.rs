//! The gateway under attack and overload, with real packets in the lab (SPEC §9):
//! spoofed VNet sources from the internet and non-instance sources from the private side
//! (R9.1, with `hping3`). Root only (fails instead of skipping when `SNATGW_REQUIRE_ROOT=1`).

mod common;

use std::time::Duration;

use common::*;

/// Runs `hping3` in namespace `ns` (bounded: `-c` packets at `-i u<gap>`), returns its exit
/// status (hping3 exits non-zero when nothing answers, which is what we expect here).
fn hping(g: &GwLab, ns: &str, args: &[&str]) {
    let mut argv = vec!["hping3", "-q"];
    argv.extend_from_slice(args);
    let out = g
        .lab
        .exec_timeout(ns, &argv, Duration::from_secs(60))
        .expect("hping3 ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("command not found") && !err.contains("Unknown option"),
        "hping3 failed: {err}"
    );
}

fn drops(v: &serde_json::Value, reason: &str) -> u64 {
    u(&v["dataplane"]["drops"][reason])
}

#[test]
fn r9_1_spoofed_vnet_sources_from_the_internet_create_no_flow() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start("sp", &lab_toml(), Some(&["vm-as1", "vm-as2"]));
    let inet = g.lab.inet_ns();
    // The attack that direction-by-address allowed: an internet host sends packets with an
    // instance's private source towards the gateway's public addresses. Before R9.1 each
    // became an outbound flow of that instance and used up its SNAT ports.
    hping(
        &g,
        &inet,
        &[
            "-S",
            "-p",
            "++80",
            "-c",
            "300",
            "-i",
            "u2000",
            "-a",
            "10.0.3.10",
            "192.0.2.10",
        ],
    );
    hping(
        &g,
        &inet,
        &[
            "-2",
            "-s",
            "5000",
            "-p",
            "53",
            "-c",
            "200",
            "-i",
            "u2000",
            "-a",
            "10.0.3.11",
            "203.0.113.20",
        ],
    );
    assert!(
        g.wait(Duration::from_secs(5), |s| drops(
            s,
            "vnet_source_from_public"
        ) == 500),
        "every spoofed packet is counted: {}",
        g.snapshot()["dataplane"]
    );
    let s = g.snapshot();
    assert_eq!(u(&s["live_flows"]), 0, "spoofed packets create no flow");
    assert_eq!(u(&s["engine"]["flows_created"]), 0);
    for name in ["vm-as1", "vm-as2"] {
        let i = g.inst(name);
        assert_eq!(u(&i["conn_ok"]["tcp"]) + u(&i["conn_ok"]["udp"]), 0, "{i}");
        assert_eq!(u(&i["used"]["tcp"]) + u(&i["used"]["udp"]), 0, "{i}");
    }

    // From the private side, a source that is no instance is refused too (R9.1).
    let ns = g.lab.ns_name("vm-as1");
    hping(
        &g,
        &ns,
        &[
            "-S",
            "-p",
            "80",
            "-c",
            "100",
            "-i",
            "u2000",
            "-a",
            "10.0.99.99",
            "203.0.113.100",
        ],
    );
    assert!(
        g.wait(Duration::from_secs(5), |s| drops(s, "unknown_source")
            == 100),
        "{}",
        g.snapshot()["dataplane"]
    );
    assert_eq!(u(&g.snapshot()["live_flows"]), 0);

    // The real instance still works, through the same gateway.
    let r = g.client("vm-as1", &["myip-http", &SERVER_A.to_string()]);
    assert!(r.all_ok(), "{r:?}");
    assert_eq!(
        r.seen_ips(),
        vec!["192.0.2.10".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    g.finish();
}
