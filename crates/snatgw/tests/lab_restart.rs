//! Restart without losing flows (SPEC R11.1, issue #18), with real sockets: TCP connections
//! held by this process cross `snatgw run`, which is killed with SIGKILL (a crash) or stopped
//! with SIGTERM (an upgrade) and started again on the same state directory. Every held
//! connection must exchange data afterwards and close cleanly both ways: a connection whose
//! public port changed would be answered with a reset by the server, or not at all, so
//! [`probe`] and [`close_confirmed`] passing is the proof that the same public IP:port
//! carries it. New connections work too, and never take a port a restored flow holds to the
//! same destination (the server sees distinct public ports).
//!
//! What this does not show: traffic carried while the gateway is down (the kernel fast path
//! is not yet pinned across the process's death; the TCP stacks retransmit through the gap).
//! Root only (fails instead of skipping when `SNATGW_REQUIRE_ROOT=1`).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const HOLD_A: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(SERVER_A), 9000);
const CONNECT: Duration = Duration::from_secs(3);

const CONFIG: &str = r#"
[gateway]
seed = 5
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.40"]
idle_timeout_secs = 240

[[availability_set]]
name = "as1"

[[instance]]
name = "r0"
private_ip = "10.0.7.10"
availability_set = "as1"

[[instance]]
name = "r1"
private_ip = "10.0.7.11"
availability_set = "as1"
"#;

fn ports(conns: &[Held]) -> BTreeSet<(std::net::Ipv4Addr, u16)> {
    conns.iter().map(|h| (*h.seen.ip(), h.port())).collect()
}

fn restart_keeps_connections(tag: &str, kill: bool) {
    if !root_or_skip() {
        return;
    }
    snatgw_lab::raise_nofile_limit();
    let mut g = GwLab::start(tag, CONFIG, None);
    let mut held = Vec::new();
    for inst in ["r0", "r1"] {
        let (c, failed) = g.hold_conns(inst, HOLD_A, 250, CONNECT);
        assert_eq!(
            (c.len(), failed),
            (250, 0),
            "{inst}: connections before the restart"
        );
        held.extend(c);
    }
    let before = ports(&held);
    assert_eq!(
        before.len(),
        500,
        "R2.3: one public port per connection to one server"
    );
    if kill {
        // Let a periodic snapshot (every second by default) include every connection.
        std::thread::sleep(Duration::from_millis(2500));
        g.gw.kill().expect("SIGKILL");
    } else {
        // A clean stop writes a last snapshot: connections opened just before it are kept
        // too, whatever the period.
        let (c, failed) = g.hold_conns("r0", HOLD_A, 20, CONNECT);
        assert_eq!((c.len(), failed), (20, 0));
        held.extend(c);
        assert!(
            snatgw_lab::gateway::stop_gateway(&g.gw, Duration::from_secs(10)),
            "gateway did not exit cleanly on SIGTERM"
        );
    }
    let _ = g.gw.wait_timeout(Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    g.restart();
    let log = g.log();
    assert!(
        log.contains("restored the flow state"),
        "the restart did not restore flows:\n{log}"
    );
    let dead = probe(&held, &BTreeSet::new());
    assert!(
        dead.is_empty(),
        "{} of {} held connections broken by the restart: {:?}",
        dead.len(),
        held.len(),
        dead.iter().take(10).collect::<Vec<_>>()
    );
    // New connections after the restart work and avoid the restored flows' ports (R2.2).
    let (more, failed) = g.hold_conns("r1", HOLD_A, 50, CONNECT);
    assert_eq!((more.len(), failed), (50, 0));
    let all: BTreeSet<_> = ports(&held).union(&ports(&more)).copied().collect();
    assert_eq!(
        all.len(),
        held.len() + 50,
        "a new connection reused a held one's public port"
    );
    let n = held.len();
    assert_eq!(
        close_confirmed(held),
        n,
        "held connections closing both ways"
    );
    assert_eq!(close_confirmed(more), 50);
    g.finish();
}

#[test]
fn r11_1_sigkill_and_restart_keeps_500_tcp_connections_on_their_ports() {
    restart_keeps_connections("rk", true);
}

#[test]
fn r11_1_clean_stop_and_restart_keeps_every_connection() {
    restart_keeps_connections("rs", false);
}
