//! ICMP errors reach the instance through the gateway (R3.6), with real sockets:
//! - port unreachable: a connected UDP socket sending to a closed port of an internet server
//!   gets ECONNREFUSED (PAT and ILPIP instances);
//! - fragmentation needed: a router namespace (`<prefix>far`) sits behind the internet
//!   namespace on a 1280-byte-MTU link, so a 1400-byte DF datagram from an instance makes
//!   the internet namespace (upstream of the gateway) send "fragmentation needed, MTU 1280"
//!   to the translated source; it comes back through `gw-inet` into the TUN, the gateway
//!   rewrites the outer destination and the quoted packet, and the instance's kernel learns
//!   the path MTU (route cache and the socket's IP_MTU show 1280). Root only.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::socket::{getsockopt, sockopt};

const FAR_SERVER: &str = "203.0.113.200";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Adds `<prefix>far` behind the internet namespace over a 1280-byte-MTU link (removed with
/// the lab: it carries the lab's prefix).
fn add_far_router(g: &GwLab) {
    let inet = g.lab.inet_ns();
    let far = format!("{}far", g.lab.spec().prefix);
    ip(&["netns", "add", &far]);
    ip(&["-n", &far, "link", "set", "lo", "up"]);
    ip(&[
        "-n", &inet, "link", "add", "inet-far", "mtu", "1280", "type", "veth", "peer", "name",
        "far-inet", "mtu", "1280", "netns", &far,
    ]);
    ip(&[
        "-n",
        &inet,
        "addr",
        "add",
        "198.51.100.129/30",
        "dev",
        "inet-far",
    ]);
    ip(&["-n", &inet, "link", "set", "inet-far", "up"]);
    ip(&[
        "-n",
        &far,
        "addr",
        "add",
        "198.51.100.130/30",
        "dev",
        "far-inet",
    ]);
    ip(&["-n", &far, "link", "set", "far-inet", "up"]);
    ip(&[
        "-n",
        &far,
        "addr",
        "add",
        &format!("{FAR_SERVER}/32"),
        "dev",
        "lo",
    ]);
    ip(&[
        "-n",
        &far,
        "route",
        "add",
        "default",
        "via",
        "198.51.100.129",
    ]);
    ip(&[
        "-n",
        &inet,
        "route",
        "add",
        &format!("{FAR_SERVER}/32"),
        "via",
        "198.51.100.130",
    ]);
    let out = g
        .lab
        .exec(&inet, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn r3_6_icmp_port_unreachable_and_fragmentation_needed_reach_the_instance() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start("ic", &lab_toml(), Some(&["vm-as1", "vm-ilpip"]));
    add_far_router(&g);
    let closed: SocketAddr = format!("{SERVER_A}:9").parse().unwrap();
    for inst in ["vm-as1", "vm-ilpip"] {
        let err = g.in_instance(inst, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(closed).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send(b"anyone?").unwrap();
            let mut b = [0u8; 16];
            s.recv(&mut b).map(|_| ()).map_err(|e| e.kind())
        });
        assert_eq!(
            err,
            Err(std::io::ErrorKind::ConnectionRefused),
            "{inst}: port unreachable must reach the socket"
        );
    }

    let far: SocketAddr = format!("{FAR_SERVER}:7").parse().unwrap();
    for inst in ["vm-as1", "vm-ilpip"] {
        let mtu = g.in_instance(inst, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(far).unwrap();
            // Linux's default for UDP (IP_PMTUDISC_WANT) sets DF while the path MTU allows.
            let _ = s.send(&[0u8; 1400]);
            let mut mtu = 0;
            for _ in 0..30 {
                std::thread::sleep(Duration::from_millis(100));
                mtu = getsockopt(&s, sockopt::IpMtu).unwrap_or(0);
                if mtu == 1280 {
                    break;
                }
            }
            mtu
        });
        assert_eq!(mtu, 1280, "{inst}: the socket's path MTU after frag-needed");
        let out = g
            .lab
            .exec(&g.lab.ns_name(inst), &["ip", "route", "get", FAR_SERVER])
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("mtu 1280"), "{inst}: {text}");
    }
    // Two port-unreachable and two frag-needed errors translated (stats every 200 ms).
    assert!(
        g.wait(
            Duration::from_secs(3),
            |s| u(&s["dataplane"]["icmp_errors"]) >= 4
        ),
        "ICMP errors translated: {}",
        g.snapshot()["dataplane"]
    );
    g.finish();
}
