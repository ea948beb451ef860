//! Flow timers with real sockets and short configured timeouts (R3.2-R3.5): FIN seen both
//! ways (3 s), RST (2 s), idle (6 s), a TCP keepalive keeping an idle flow alive, and a UDP
//! flow that ends only by idle timeout. Each case runs in its own instance, all at once, and
//! is observed through the gateway's per-instance `used` ports. Root only.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::socket::{setsockopt, sockopt};

const CONFIG: &str = r#"
[gateway]
seed = 3
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.30"]
idle_timeout_secs = 6
fin_timeout_secs = 3
rst_timeout_secs = 2
port_reuse_history_secs = 1

[[instance]]
name = "t-fin"
private_ip = "10.0.5.10"
[[instance]]
name = "t-rst"
private_ip = "10.0.5.11"
[[instance]]
name = "t-idle"
private_ip = "10.0.5.12"
[[instance]]
name = "t-ka"
private_ip = "10.0.5.13"
[[instance]]
name = "t-udp"
private_ip = "10.0.5.14"
"#;

fn used(g: &GwLab, name: &str, proto: &str) -> u64 {
    u(&g.inst(name)["used"][proto])
}

/// Waits until `name`'s used `proto` ports equal `want`; returns the time it took.
fn wait_used(g: &GwLab, name: &str, proto: &str, want: u64, limit: Duration) -> Duration {
    let t = Instant::now();
    let ok = g.wait(limit, |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == name && u(&i["used"][proto]) == want)
    });
    assert!(
        ok,
        "{name}: used {proto} never became {want}: {}",
        g.inst(name)
    );
    t.elapsed()
}

fn echo_once(s: &mut TcpStream) {
    s.write_all(b"0123456789").unwrap();
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
}

#[test]
fn r3_2_r3_3_r3_4_r3_5_fin_rst_idle_keepalive_and_udp_timers() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start("tm", CONFIG, None);
    let echo: SocketAddr = format!("{SERVER_A}:7").parse().unwrap();
    let hold: SocketAddr = format!("{SERVER_A}:9000").parse().unwrap();
    let to = Some(Duration::from_secs(5));

    // Idle (R3.4) and keepalive: connections opened first, then left alone.
    let (idle_tx, idle_rx) = mpsc::channel::<()>();
    let idle = g
        .lab
        .spawn_thread_in(&g.lab.ns_name("t-idle"), move || {
            let mut s = TcpStream::connect_timeout(&hold, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(to).unwrap();
            let mut greet = [0u8; 64];
            let _ = s.read(&mut greet).unwrap();
            idle_rx.recv().unwrap();
            // The flow is gone: this segment is not a SYN and matches nothing (R3.1).
            let _ = s.write_all(b"late");
            std::thread::sleep(Duration::from_millis(300));
        })
        .unwrap();
    let (ka_tx, ka_rx) = mpsc::channel::<()>();
    let ka = g
        .lab
        .spawn_thread_in(&g.lab.ns_name("t-ka"), move || {
            let mut s = TcpStream::connect_timeout(&hold, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(to).unwrap();
            let mut greet = [0u8; 64];
            let _ = s.read(&mut greet).unwrap();
            setsockopt(&s, sockopt::KeepAlive, &true).unwrap();
            setsockopt(&s, sockopt::TcpKeepIdle, &1).unwrap();
            setsockopt(&s, sockopt::TcpKeepInterval, &1).unwrap();
            ka_rx.recv().unwrap();
            s.write_all(b"still here").is_ok()
        })
        .unwrap();
    // UDP (R3.5): one datagram and its echo.
    g.in_instance("t-udp", move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(echo).unwrap();
        s.set_read_timeout(to).unwrap();
        s.send(b"ping").unwrap();
        let mut b = [0u8; 16];
        assert_eq!(s.recv(&mut b).unwrap(), 4);
    });
    let t_udp = Instant::now();
    // FIN both ways (R3.2): the client shuts down its side, the echo server closes too.
    g.in_instance("t-fin", move || {
        let mut s = TcpStream::connect_timeout(&echo, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(to).unwrap();
        echo_once(&mut s);
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    });
    let t_fin = Instant::now();
    // RST (R3.3): SO_LINGER 0 makes close() send a RST.
    g.in_instance("t-rst", move || {
        let mut s = TcpStream::connect_timeout(&echo, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(to).unwrap();
        echo_once(&mut s);
        setsockopt(
            &s,
            sockopt::Linger,
            &nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .unwrap();
        drop(s);
    });
    let t_rst = Instant::now();

    // Right after closing, the ports are still held (closing flows count as used).
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        used(&g, "t-fin", "tcp"),
        1,
        "R3.2: held during the FIN delay"
    );
    assert_eq!(
        used(&g, "t-udp", "udp"),
        1,
        "R3.5: the first datagram started a flow"
    );
    assert_eq!(used(&g, "t-idle", "tcp"), 1);
    assert_eq!(used(&g, "t-ka", "tcp"), 1);

    // R3.3: released about 2 s after the RST (whole-second clock: 1-3 s), before the FIN one.
    wait_used(&g, "t-rst", "tcp", 0, Duration::from_secs(5));
    let rst_after = t_rst.elapsed();
    assert!(rst_after >= Duration::from_millis(900), "{rst_after:?}");
    // R3.2: released about 3 s after FIN both ways (2-4 s), not before.
    wait_used(&g, "t-fin", "tcp", 0, Duration::from_secs(6));
    let fin_after = t_fin.elapsed();
    assert!(fin_after >= Duration::from_millis(1900), "{fin_after:?}");
    assert!(fin_after < Duration::from_secs(6), "{fin_after:?}");
    // R3.5: UDP has no such end: still held past the FIN/RST delays.
    assert_eq!(used(&g, "t-udp", "udp"), 1);

    // R3.4: the idle TCP flow and the UDP flow go after the idle timeout (6 s; 5-7 s).
    wait_used(&g, "t-idle", "tcp", 0, Duration::from_secs(8));
    wait_used(&g, "t-udp", "udp", 0, Duration::from_secs(4));
    let udp_after = t_udp.elapsed();
    assert!(udp_after >= Duration::from_secs(5), "{udp_after:?}");
    let ended = g.snapshot()["engine"]["flows_ended"].clone();
    assert!(
        u(&ended["fin"]) >= 1 && u(&ended["rst"]) >= 1 && u(&ended["idle"]) >= 2,
        "{ended}"
    );
    // ... while keepalive probes (every second, either direction resets the timer) keep
    // the other idle connection's flow.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(used(&g, "t-ka", "tcp"), 1, "R3.4: keepalives keep the flow");

    // The expired flow's next segment is dropped (not a SYN, no flow); the kept one passes.
    idle_tx.send(()).unwrap();
    idle.join().unwrap();
    ka_tx.send(()).unwrap();
    assert!(ka.join().unwrap());
    assert!(g.wait(Duration::from_secs(3), |s| s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == "t-idle" && u(&i["drops"]["tcp_not_syn"]) >= 1)));
    assert_eq!(u(&g.inst("t-ka")["drops"]["tcp_not_syn"]), 0);
    g.finish();
}
