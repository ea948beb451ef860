//! The kernel fast path (issue #9) with real sockets, forced on (`--fast-path tc`) whatever
//! `SNATGW_FAST_PATH` says (the other lab tests run with it on and off). Root only.
//!
//! Shown here: established flows are translated by the kernel (the data plane's count stays
//! put while the program's grows) and correctly (every UDP echo and every byte of a TCP
//! bulk transfer comes back intact, offloads on so the TCP path carries GSO packets);
//! per-instance packet counters include the kernel's packets (R6.1); TCP keepalives that
//! travel only through the fast path keep an idle flow past several idle timeouts, and once
//! they stop the port is released one idle timeout after the last one (R3.4), to the second
//! of the gateway's own clock; a flow the engine ended is gone from the kernel too (the next
//! segment is dropped by the engine, R3.1).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::socket::{setsockopt, sockopt};
use serde_json::Value;

const CONFIG: &str = r#"
[gateway]
seed = 9
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.40"]
idle_timeout_secs = 4
port_reuse_history_secs = 1

[[instance]]
name = "f-udp"
private_ip = "10.0.6.10"
[[instance]]
name = "f-bulk"
private_ip = "10.0.6.11"
[[instance]]
name = "f-ka"
private_ip = "10.0.6.12"
"#;

fn fp(s: &Value) -> Value {
    s["fast_path"].clone()
}

fn fp_packets(s: &Value, what: &str) -> u64 {
    u(&s["fast_path"]["packets"][what])
}

fn start(tag: &str) -> GwLab {
    GwLab::start_with(tag, CONFIG, None, |o, _| {
        o.fast_path = "tc".into();
        o.offload = true;
    })
}

#[test]
fn i9_established_flows_go_through_the_kernel_and_count_for_their_instance() {
    if !root_or_skip() {
        return;
    }
    let g = start("fp");
    let s0 = g.snapshot();
    assert_eq!(fp(&s0)["mode"], "tc", "fast path not running: {}", g.log());

    // UDP: 500 datagrams on one flow, each echoed.
    let echo: SocketAddr = format!("{SERVER_A}:7").parse().unwrap();
    let n = 500u64;
    let got = g.in_instance("f-udp", move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(echo).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut ok = 0u64;
        for i in 0..n {
            let msg = format!("datagram {i}");
            s.send(msg.as_bytes()).unwrap();
            let mut b = [0u8; 64];
            if let Ok(k) = s.recv(&mut b) {
                if &b[..k] == msg.as_bytes() {
                    ok += 1;
                }
            }
        }
        ok
    });
    assert_eq!(got, n, "every datagram echoed intact");

    // TCP bulk: 32 MiB to the echo server and back, checked byte for byte.
    let total = 32usize << 20;
    let bulk = g.in_instance("f-bulk", move || {
        let s = TcpStream::connect_timeout(&echo, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
            let mut sent = 0;
            while sent < total {
                w.write_all(&chunk).unwrap();
                sent += chunk.len();
            }
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut r = s;
        let mut buf = vec![0u8; 65536];
        let (mut got, mut bad) = (0usize, 0usize);
        loop {
            let k = r.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            for (j, b) in buf[..k].iter().enumerate() {
                if *b != (((got + j) % 65536) as u32 * 7 + 3) as u8 {
                    bad += 1;
                }
            }
            got += k;
        }
        writer.join().unwrap();
        (got, bad)
    });
    assert_eq!(
        bulk,
        (total, 0),
        "the bulk transfer came back whole and intact"
    );

    // The kernel's per-instance counters are credited once a second.
    let ok = g.wait(Duration::from_secs(4), |s| {
        let udp = inst_of(s, "f-udp");
        fp_packets(s, "translated_out") >= n
            && fp_packets(s, "translated_in") >= n
            && u(&udp["packets_out"]) >= n
            && u(&udp["packets_in"]) >= n
    });
    let s = g.snapshot();
    assert!(
        ok,
        "the kernel translated the established packets: {}",
        fp(&s)
    );
    // The data plane (TUN) saw the first packets and the control segments only.
    let tun = u(&s["dataplane"]["translated"]);
    let kernel = fp_packets(&s, "translated_out") + fp_packets(&s, "translated_in");
    assert!(
        tun < 100 && kernel > 1000,
        "TUN {tun} packets, kernel {kernel}: {}",
        fp(&s)
    );
    assert!(u(&fp(&s)["installed"]) >= 2, "{}", fp(&s));
    // R6.1: the instance's counters include what the kernel translated for it.
    let udp = inst_of(&s, "f-udp");
    assert!(
        u(&udp["packets_out"]) >= n && u(&udp["packets_in"]) >= n,
        "f-udp counters include fast-path packets: {udp}"
    );
    g.finish();
}

#[test]
fn r3_4_keepalives_only_through_the_fast_path_keep_the_flow_then_it_goes_on_time() {
    if !root_or_skip() {
        return;
    }
    let g = start("fk");
    let hold: SocketAddr = format!("{SERVER_A}:9000").parse().unwrap();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (late_tx, late_rx) = mpsc::channel::<()>();
    let ka = g
        .lab
        .spawn_thread_in(&g.lab.ns_name("f-ka"), move || {
            let mut s = TcpStream::connect_timeout(&hold, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut greet = [0u8; 64];
            let _ = s.read(&mut greet).unwrap();
            // A probe after 1 s idle, then every second: pure ACKs, the fast path's.
            setsockopt(&s, sockopt::KeepAlive, &true).unwrap();
            setsockopt(&s, sockopt::TcpKeepIdle, &1).unwrap();
            setsockopt(&s, sockopt::TcpKeepInterval, &1).unwrap();
            stop_rx.recv().unwrap();
            setsockopt(&s, sockopt::KeepAlive, &false).unwrap();
            done_tx.send(()).unwrap();
            late_rx.recv().unwrap();
            // The flow has ended: this segment is no SYN and matches nothing (R3.1).
            let _ = s.write_all(b"late");
            std::thread::sleep(Duration::from_millis(300));
        })
        .unwrap();
    assert!(g.wait(Duration::from_secs(3), |s| u(
        &inst_of(s, "f-ka")["used"]["tcp"]
    ) == 1));
    std::thread::sleep(Duration::from_millis(1500));
    let s0 = g.snapshot();
    let (tun0, k0) = (
        u(&s0["dataplane"]["translated"]),
        fp_packets(&s0, "translated_out") + fp_packets(&s0, "translated_in"),
    );
    // Three idle timeouts (12 s) on keepalives alone.
    std::thread::sleep(Duration::from_secs(12));
    let s1 = g.snapshot();
    assert_eq!(
        u(&inst_of(&s1, "f-ka")["used"]["tcp"]),
        1,
        "keepalives keep the flow (R3.4)"
    );
    let k1 = fp_packets(&s1, "translated_out") + fp_packets(&s1, "translated_in");
    assert_eq!(
        u(&s1["dataplane"]["translated"]),
        tun0,
        "no keepalive went through the TUN"
    );
    assert!(
        k1 >= k0 + 20,
        "the kernel carried the probes and their answers: {k0} -> {k1}"
    );
    // Keepalives stop: the flow goes one idle timeout (4 s) after the last probe.
    stop_tx.send(()).unwrap();
    done_rx.recv().unwrap();
    let t_stop = Instant::now();
    let gone = g.wait(Duration::from_secs(8), |s| {
        u(&inst_of(s, "f-ka")["used"]["tcp"]) == 0
    });
    let after = t_stop.elapsed();
    assert!(
        gone,
        "the flow never went: {}",
        inst_of(&g.snapshot(), "f-ka")
    );
    // The last probe was at most 1 s before the stop; whole-second clock: 2-5.5 s.
    assert!(
        after >= Duration::from_secs(2) && after <= Duration::from_millis(5500),
        "released {after:?} after the last keepalive (idle timeout 4 s)"
    );
    let s2 = g.snapshot();
    assert!(u(&fp(&s2)["removed"]) >= 1, "{}", fp(&s2));
    late_tx.send(()).unwrap();
    ka.join().unwrap();
    assert!(
        g.wait(Duration::from_secs(3), |s| u(
            &inst_of(s, "f-ka")["drops"]["tcp_not_syn"]
        ) >= 1),
        "the ended flow's segment reached the engine (no stale kernel entry): {}",
        inst_of(&g.snapshot(), "f-ka")
    );
    g.finish();
}

/// `snatgw run` in a namespace of its own (no lab): `--fast-path tc` that cannot attach
/// refuses to start and says why; `auto` falls back to the TUN path with one warning.
#[test]
fn i9_fast_path_modes_refuse_or_fall_back_with_a_clear_line() {
    if !root_or_skip() {
        return;
    }
    let ns = format!("sgfb{}", std::process::id() % 100_000);
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .status();
    assert!(std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    let _del = Del(ns.clone());
    let dir = std::env::temp_dir().join(format!("snatgw-test-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("gw.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let run = |mode: &str, secs: &str| {
        std::process::Command::new("ip")
            .args([
                "netns", "exec", &ns, "timeout", secs, BIN, "run", "--config",
            ])
            .arg(&cfg)
            .args(["--api", "off", "--state-dir"])
            .arg(dir.join(format!("state-{mode}")))
            .args([
                "--fast-path",
                mode,
                "--private-if",
                "no-such-if",
                "--public-if",
                "lo",
            ])
            .output()
            .unwrap()
    };
    let tc = run("tc", "10");
    let err = String::from_utf8_lossy(&tc.stderr);
    assert_eq!(tc.status.code(), Some(1), "tc must refuse: {err}");
    assert!(
        err.contains("--fast-path tc") && err.contains("no-such-if"),
        "names the mode and the interface: {err}"
    );
    // auto: starts on the TUN path (ready line says fast_path false), warns once; `timeout`
    // ends it after 3 s (exit 124).
    let auto = run("auto", "3");
    let out = String::from_utf8_lossy(&auto.stdout);
    let err = String::from_utf8_lossy(&auto.stderr);
    assert_eq!(auto.status.code(), Some(124), "auto runs: {err}");
    assert!(out.contains("\"fast_path\":false"), "{out}");
    assert_eq!(
        err.matches("falling back to the TUN path").count(),
        1,
        "one warning saying why: {err}"
    );
    assert!(err.contains("no-such-if"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
