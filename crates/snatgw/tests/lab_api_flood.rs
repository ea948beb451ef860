//! The management API flooded with idle connections, on a real `snatgw run` in the lab
//! (issue #20): 20,000 connections opened to the API by two processes in the gateway's
//! namespace (no token needed to open a socket) used to make the API unreachable and stop
//! the stats file. Now the API keeps answering, and the data path and the stats file do not
//! depend on the API's health. Root only (fails instead of skipping when
//! `SNATGW_REQUIRE_ROOT=1`).

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const HOLD_A: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(SERVER_A), 9000);
const CONNECT: Duration = Duration::from_secs(3);
/// Connections each flooding process opens (two processes: 20,000 in all).
const PER_PROCESS: usize = 10_000;
/// How long the flooders hold their sockets open, seconds.
const HOLD_SECS: u32 = 25;

/// Opens `n` TCP connections to `host:port` without sending anything, writes how many it
/// opened to `out`, and holds them for `hold` seconds (bounded in count and time).
const FLOODER: &str = r#"
import socket, sys, time
host, port, n, hold, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
socks, failed = [], 0
deadline = time.time() + 60
for i in range(n):
    if time.time() > deadline:
        break
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect_ex((host, port))
        socks.append(s)
    except OSError:
        failed += 1
        s.close()
with open(out + ".tmp", "w") as f:
    f.write("%d %d\n" % (len(socks), failed))
import os
os.rename(out + ".tmp", out)
time.sleep(hold)
"#;

/// One `GET` on a fresh connection: status and how long the answer took.
fn timed_get(api: SocketAddr, path: &str, token: Option<&str>) -> (u16, Duration) {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&api, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: api\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, t.elapsed())
}

/// Reads a flooder's report once it is there (bounded wait).
fn flooder_report(path: &Path) -> Option<(usize, usize)> {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if let Ok(t) = std::fs::read_to_string(path) {
            let mut it = t.split_whitespace().filter_map(|x| x.parse().ok());
            if let (Some(a), Some(b)) = (it.next(), it.next()) {
                return Some((a, b));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[test]
fn i20_twenty_thousand_idle_api_connections_leave_api_data_path_and_stats_working() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start("af", &lab_toml(), Some(&["vm-as1"]));
    let api: SocketAddr = g.opts.api.parse().expect("API address");
    let token = g.token.clone();
    // Before the flood: connections through the gateway work.
    let (before, failed) = g.hold_conns("vm-as1", HOLD_A, 20, CONNECT);
    assert_eq!((before.len(), failed), (20, 0));

    // The flood: two processes in the gateway namespace, 10,000 idle connections each.
    let gw_ns = g.lab.gw_ns();
    let reports: Vec<_> = (0..2)
        .map(|i| g.dir.join(format!("flood-{i}.txt")))
        .collect();
    let mut flooders = Vec::new();
    for r in &reports {
        let _ = std::fs::remove_file(r);
        let argv = [
            "python3",
            "-c",
            FLOODER,
            &api.ip().to_string(),
            &api.port().to_string(),
            &PER_PROCESS.to_string(),
            &HOLD_SECS.to_string(),
            r.to_str().expect("path"),
        ];
        flooders.push(g.lab.spawn(&gw_ns, &argv).expect("flooder started"));
    }
    let mut opened = 0;
    for r in &reports {
        let (ok, failed) = flooder_report(r).expect("a flooder did not report");
        println!(
            "flooder {}: {ok} connections opened, {failed} failed",
            r.display()
        );
        opened += ok;
    }
    assert!(
        opened >= 2 * PER_PROCESS * 9 / 10,
        "the flood opened only {opened} connections"
    );
    let stats_before = g.snapshot()["uptime_ms"].as_u64().expect("uptime");

    // While the flood holds its sockets: the API answers, authenticated or not.
    let mut latencies = Vec::new();
    for i in 0..20 {
        let path = if i % 2 == 0 {
            "/healthz"
        } else {
            "/api/v1/topology"
        };
        let tok = token.clone();
        let (status, took) = g.in_ns(&gw_ns, move || timed_get(api, path, tok.as_deref()));
        assert_eq!(status, 200, "{path} during the flood");
        latencies.push(took);
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    println!(
        "API during the flood: min {:?}, median {median:?}, max {:?}",
        latencies[0],
        latencies[latencies.len() - 1]
    );
    assert!(
        median < Duration::from_millis(100),
        "the API's median answer took {median:?} under the flood"
    );

    // The data path: held connections still carry data, new ones open.
    let dead = probe(&before, &Default::default());
    assert!(
        dead.is_empty(),
        "connections broke during the flood: {dead:?}"
    );
    let (during, failed) = g.hold_conns("vm-as1", HOLD_A, 50, CONNECT);
    assert_eq!(
        (during.len(), failed),
        (50, 0),
        "new connections during the flood"
    );

    // The stats file keeps being written.
    std::thread::sleep(Duration::from_millis(1500));
    let stats_after = g.snapshot()["uptime_ms"].as_u64().expect("uptime");
    assert!(
        stats_after > stats_before,
        "the stats file stopped during the flood ({stats_before} then {stats_after})"
    );
    for f in &flooders {
        let _ = f.kill();
        let _ = f.wait_timeout(Duration::from_secs(5));
    }
    assert_eq!(close_confirmed(before), 20);
    assert_eq!(close_confirmed(during), 50);
    g.finish();
}
