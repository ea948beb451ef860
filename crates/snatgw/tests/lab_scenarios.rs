//! Real sockets through `snatgw run` in the lab built from `examples/lab.toml`: the source
//! address each scenario gets (R1.1-R1.3, R1.6, with the R6.4 responders), port sharing
//! across destinations (R2.3), return traffic and dropped unsolicited inbound (R3.8).
//! Root only (skipped with a message otherwise).

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::*;
use snatgw_core::{Engine, Scenario, Topology};

/// (instance, scenario, port block) as the engine decides them offline.
type Expected = (String, Scenario, Vec<(u16, u16)>);

fn expected() -> Vec<Expected> {
    let e = Engine::new(Topology::from_toml(&lab_toml()).unwrap(), 0).unwrap();
    e.instances()
        .into_iter()
        .map(|r| (r.name.to_string(), r.scenario, r.block))
        .collect()
}

#[test]
fn r1_1_r1_2_r1_3_r1_6_r2_3_r3_8_source_address_per_scenario_sharing_and_unsolicited_inbound() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start("sc", &lab_toml(), None);
    let fe = [
        Ipv4Addr::new(203, 0, 113, 20),
        Ipv4Addr::new(203, 0, 113, 21),
    ];
    let pool = [Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11)];
    let mut lb_ips = BTreeSet::new();
    for (name, scenario, block) in expected() {
        let want = Ipv4Addr::from(scenario.addr());
        // R6.4: HTTP path and DNS name both answer with the source the internet saw.
        let r = g.client(&name, &["myip-http", &SERVER_A.to_string(), "--count", "2"]);
        assert!(r.all_ok(), "{name}: {r:?}");
        let d = g.client(&name, &["dns", &SERVER_DNS.to_string(), "--qtype", "any"]);
        assert!(d.all_ok(), "{name}: {d:?}");
        assert_eq!(
            d.a.as_deref(),
            Some(want.to_string().as_str()),
            "{name} dns A"
        );
        assert_eq!(
            d.txt.as_deref().and_then(|t| t.split(':').next()),
            Some(want.to_string().as_str())
        );
        let u = g.client(&name, &["udp-echo", &SERVER_B.to_string(), "--count", "3"]);
        assert_eq!((u.ok, u.failed), (3, 0), "{name} udp: {u:?}");
        for (seen, local) in r.seen_addrs().iter().zip(&r.local) {
            assert_eq!(*seen.ip(), want, "{name}: {r:?}");
            let local: SocketAddr = local.parse().unwrap();
            match scenario {
                // R1.1: stateless 1:1, the port is kept.
                Scenario::Ilpip { .. } => {
                    assert_eq!(want, Ipv4Addr::new(203, 0, 113, 10));
                    assert_eq!(seen.port(), local.port(), "{name}: ILPIP keeps ports");
                }
                // R1.2/R1.6: one of the LB's frontends, the one the seeded engine chose.
                Scenario::LoadBalanced { candidates, .. } => {
                    assert_eq!(candidates, 2);
                    assert!(fe.contains(&want));
                    lb_ips.insert(want);
                    assert!(block.iter().any(|(a, b)| (*a..=*b).contains(&seen.port())));
                }
                // R1.3: default SNAT pool address, port from the instance's block.
                Scenario::DefaultSnat { .. } => {
                    assert!(pool.contains(&want), "{name}: {want}");
                    assert!(block.iter().any(|(a, b)| (*a..=*b).contains(&seen.port())));
                }
                other => panic!("{name}: scenario {other:?} not expected here"),
            }
        }
    }
    // With seed 7 the two LB members landed on different frontends (R1.6).
    assert_eq!(lb_ips.len(), 2, "{lb_ips:?}");
    // R1.3: one IP per availability set; as1's members share it.
    let snap = g.snapshot();
    let ip_of = |n: &str| {
        snap["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == n)
            .unwrap()["public_ip"]
            .clone()
    };
    assert_eq!(ip_of("vm-as1"), ip_of("vm-as2"));

    // R2.3: 4 held connections to each of two destinations at once use the same 4 ports.
    let hold = |dst: Ipv4Addr| {
        g.spawn_client(
            "vm-as1",
            &[
                "hold",
                &format!("{dst}:9000"),
                "--count",
                "4",
                "--hold",
                "2",
            ],
        )
    };
    let ca = hold(SERVER_A);
    let ra = ca.read_report(T).unwrap();
    let cb = hold(SERVER_B);
    let rb = cb.read_report(T).unwrap();
    assert_eq!((ra.ok, rb.ok), (4, 4), "{ra:?} {rb:?}");
    let pa: BTreeSet<u16> = ra.seen_ports().into_iter().collect();
    let pb: BTreeSet<u16> = rb.seen_ports().into_iter().collect();
    assert_eq!(pa.len(), 4);
    assert_eq!(pa, pb, "flows to different destinations share SNAT ports");
    // "Used" = distinct ports held by a flow (stats are written every 200 ms).
    assert!(
        g.wait(Duration::from_secs(3), |s| s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "vm-as1" && u(&i["used"]["tcp"]) == 4)),
        "used = distinct ports: {}",
        g.inst("vm-as1")
    );
    let _ = ca.wait_timeout(Duration::from_secs(10));
    let _ = cb.wait_timeout(Duration::from_secs(10));

    // R3.8: unsolicited inbound to a PAT address (a port in use by a flow of vm-as1, but
    // from another source) is dropped and counted; so is a new connection attempt.
    let before = u(&g.snapshot()["dataplane"]["drops"]["unsolicited_inbound"]);
    let pat_ip = ip_of("vm-as1").as_str().unwrap().to_string();
    let port = *pa.iter().next().unwrap();
    let (udp_got, tcp_res) = g.in_ns(&g.lab.inet_ns(), move || {
        let s = UdpSocket::bind("203.0.113.100:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let dst: SocketAddr = format!("{pat_ip}:{port}").parse().unwrap();
        for _ in 0..3 {
            s.send_to(b"hello?", dst).unwrap();
        }
        let mut buf = [0u8; 64];
        let udp_got = s.recv_from(&mut buf).is_ok();
        let tcp = TcpStream::connect_timeout(&dst, Duration::from_millis(700)).map(|_| ());
        (udp_got, tcp)
    });
    assert!(!udp_got);
    assert!(
        tcp_res.is_err(),
        "an unsolicited TCP connection must not get through"
    );
    assert!(
        g.wait(Duration::from_secs(3), |s| u(
            &s["dataplane"]["drops"]["unsolicited_inbound"]
        ) >= before + 4),
        "unsolicited inbound counted: {}",
        g.snapshot()["dataplane"]
    );
    g.finish();
}
