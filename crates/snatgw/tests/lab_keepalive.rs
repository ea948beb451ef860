//! Keepalives (SPEC R3.4, R7.1) with real sockets and a 3 s idle timeout: a TCP connection
//! held idle without keepalives loses its flow, its next segment is dropped and it breaks,
//! and `snatgw_idle_ended_then_sent_total` counts it once; a connection with SO_KEEPALIVE
//! probes every second survives and counts nothing. Then `snatgw ports` and
//! `snatgw keepalive-check --api` against the running gateway (its idle timeout, the
//! instance's symptom, exit codes). Root only.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use nix::sys::socket::{setsockopt, sockopt};

const CONFIG: &str = r#"
[gateway]
seed = 21
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.30"]
idle_timeout_secs = 3
port_reuse_history_secs = 1

[[instance]]
name = "k-idle"
private_ip = "10.0.5.20"
[[instance]]
name = "k-ka"
private_ip = "10.0.5.21"
"#;

const METRIC: &str = "snatgw_idle_ended_then_sent_total";

/// The metric of `instance` for TCP, from `/metrics`.
fn idle_then_sent(g: &GwLab, instance: &str) -> Option<f64> {
    let name = instance.to_string();
    let pip = g
        .api(move |c| c.instance_ports(&name))
        .expect("ports")
        .public_ip;
    let text = g.api(|c| c.metrics_text()).expect("GET /metrics");
    metric(
        &text,
        METRIC,
        &[
            ("instance", instance),
            ("public_ip", &pip),
            ("protocol", "tcp"),
        ],
    )
}

/// Runs `snatgw ARGS` inside the gateway namespace (where the API listens).
fn snatgw(g: &GwLab, args: Vec<String>) -> Output {
    g.in_ns(&g.lab.gw_ns(), move || {
        Command::new(BIN).args(&args).output().expect("snatgw runs")
    })
}

#[test]
fn r7_1_idle_connection_breaks_and_is_counted_keepalives_keep_it() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start("ka", CONFIG, None);
    let hold: SocketAddr = format!("{SERVER_A}:9000").parse().unwrap();
    let t = Duration::from_secs(5);
    let (idle, failed) = g.hold_conns("k-idle", hold, 1, t);
    assert_eq!((idle.len(), failed), (1, 0));
    let (ka, failed) = g.hold_conns("k-ka", hold, 1, t);
    assert_eq!((ka.len(), failed), (1, 0));
    // Keepalives after 1 s of silence, every second (what R7.1's sysctls set by default,
    // scaled to the 3 s idle timeout).
    let s = &ka[0].stream;
    setsockopt(s, sockopt::KeepAlive, &true).unwrap();
    setsockopt(s, sockopt::TcpKeepIdle, &1).unwrap();
    setsockopt(s, sockopt::TcpKeepInterval, &1).unwrap();

    // Both flows are there (a snapshot taken after the connections)...
    assert!(g.wait(Duration::from_secs(3), |s| {
        u(&inst_of(s, "k-idle")["used"]["tcp"]) == 1 && u(&inst_of(s, "k-ka")["used"]["tcp"]) == 1
    }));
    // ... then the idle one goes after the idle timeout (R3.4); the kept one stays.
    let gone = g.wait(Duration::from_secs(8), |s| {
        u(&inst_of(s, "k-idle")["used"]["tcp"]) == 0
    });
    assert!(gone, "the idle flow never ended: {}", g.inst("k-idle"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        u(&g.inst("k-ka")["used"]["tcp"]),
        1,
        "keepalives keep the flow"
    );
    // An idle end alone is no symptom.
    assert_eq!(idle_then_sent(&g, "k-idle"), Some(0.0));

    // The application sends: the idle one's segment (and its retransmissions) is dropped
    // as tcp_not_syn and the connection breaks; the kept one is acknowledged.
    let broken = probe(&idle, &BTreeSet::from([0]));
    assert_eq!(
        broken,
        BTreeSet::from([0]),
        "the idle connection must break"
    );
    assert!(
        probe(&ka, &BTreeSet::new()).is_empty(),
        "keepalives keep it"
    );
    assert!(u(&g.inst("k-idle")["drops"]["tcp_not_syn"]) >= 1);
    // Counted once for the flow, whatever the retransmissions; nothing for the kept one.
    assert_eq!(idle_then_sent(&g, "k-idle"), Some(1.0));
    assert_eq!(idle_then_sent(&g, "k-ka"), Some(0.0));
    assert!(g.wait(Duration::from_secs(3), |s| {
        u(&inst_of(s, "k-idle")["idle_ended_then_sent"]["tcp"]) == 1
    }));
    assert_eq!(u(&g.inst("k-ka")["idle_ended_then_sent"]["tcp"]), 0);

    // The CLI: `snatgw ports` says it under the table...
    let token = g.dir.join("token");
    std::fs::write(&token, g.token.clone().unwrap_or_default()).unwrap();
    let api = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend([
            "--api".into(),
            g.api_url(),
            "--token-file".into(),
            token.display().to_string(),
        ]);
        v
    };
    let out = snatgw(&g, api(&["ports"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("instance k-idle: 1 flow(s) ended idle and were used again")
            && !text.contains("instance k-ka:"),
        "{text}"
    );
    // ... and `keepalive-check --api` takes the gateway's idle timeout (3 s): keepalives
    // after 1 s survive (exit 0), Linux's defaults do not (exit 1); both list the symptom.
    let out = snatgw(
        &g,
        api(&[
            "keepalive-check",
            "--time",
            "1",
            "--intvl",
            "1",
            "--probes",
            "3",
        ]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("gateway idle timeout: 3 s"), "{text}");
    assert!(text.contains("verdict: SURVIVES"), "{text}");
    assert!(
        text.contains("instance k-idle: 1 flow(s) ended idle"),
        "{text}"
    );
    let out = snatgw(
        &g,
        api(&[
            "keepalive-check",
            "--time",
            "7200",
            "--intvl",
            "75",
            "--probes",
            "9",
            "--json",
        ]),
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["survives"], false);
    assert_eq!(v["idle_timeout_secs"], 3);
    assert_eq!(v["instances"][0]["instance"], "k-idle");
    assert_eq!(v["instances"][0]["tcp"], 1);
    assert_eq!(v["instances"].as_array().map(Vec::len), Some(1));
    drop(idle);
    drop(ka);
    g.finish();
}
