//! Lab tests in kernel-NAT mode, and tear-down guarantees. Root only: without root each
//! test prints "skipped: needs root" and passes.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use snatgw_lab::{list_namespaces, GatewayMode, KernelNat, Lab, LabSpec, SnatRule, GW_INET_IP};

const SERVER: &str = env!("CARGO_BIN_EXE_snatgw-lab-server");
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
const PUB_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const PUB_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 3);

macro_rules! require_root {
    () => {
        if !snatgw_lab::root_or_skip() {
            return;
        }
    };
}

/// A prefix unique to this test and process, so parallel runs never collide.
fn prefix(tag: &str) -> String {
    format!("sg{tag}{}-", std::process::id() % 100_000)
}

fn server() -> &'static Path {
    Path::new(SERVER)
}

fn kernel_spec(p: &str) -> LabSpec {
    LabSpec::new(p)
        .with_instance("a", IP_A)
        .with_instance("b", IP_B)
        .with_mode(GatewayMode::Kernel(KernelNat::Snat(vec![
            SnatRule {
                private: IP_A,
                public: PUB_A,
                ports: Some((1024, 65535)),
            },
            SnatRule {
                private: IP_B,
                public: PUB_B,
                ports: None,
            },
        ])))
}

#[test]
fn kernel_mode_two_instances_see_their_public_ips() {
    require_root!();
    let p = prefix("k");
    let mut lab = Lab::up(kernel_spec(&p)).expect("lab up");
    assert_eq!(list_namespaces(&p).unwrap().len(), 4);
    let _servers = lab.start_servers(server(), "snatgw.test").expect("servers");

    // HTTP "which IP am I" from each instance (R6.4).
    for (inst, public) in [("a", PUB_A), ("b", PUB_B)] {
        let r = lab
            .client(
                inst,
                server(),
                &["myip-http", "203.0.113.100:80", "--count", "3"],
                CLIENT_TIMEOUT,
            )
            .unwrap();
        assert!(r.all_ok(), "{inst}: {r:?}");
        assert_eq!(r.seen_ips(), vec![public; 3], "{inst}: {r:?}");
        assert!(r
            .local
            .iter()
            .all(|l| l.starts_with(&format!("{}:", lab.instance_ip(inst).unwrap()))));
    }
    // Port range given for a is honoured.
    let r = lab
        .client(
            "a",
            server(),
            &["myip-http", "203.0.113.101"],
            CLIENT_TIMEOUT,
        )
        .unwrap();
    assert!(r.seen_ports().iter().all(|&p| p >= 1024), "{r:?}");

    // DNS responder: A is the public IP, TXT is ip:port.
    let r = lab
        .client(
            "a",
            server(),
            &["dns", "192.0.2.53", "--name", "myip.snatgw.test"],
            CLIENT_TIMEOUT,
        )
        .unwrap();
    assert!(r.all_ok(), "{r:?}");
    assert_eq!(r.a.as_deref(), Some("203.0.113.10"), "{r:?}");
    assert_eq!(r.seen_ips(), vec![PUB_A], "{r:?}");
    let r = lab
        .client(
            "b",
            server(),
            &["dns", "192.0.2.53", "--qtype", "txt"],
            CLIENT_TIMEOUT,
        )
        .unwrap();
    assert_eq!(r.seen_ips(), vec![PUB_B], "{r:?}");

    // UDP and TCP echo.
    let r = lab
        .client(
            "b",
            server(),
            &["udp-echo", "203.0.113.101:7", "--count", "5"],
            CLIENT_TIMEOUT,
        )
        .unwrap();
    assert_eq!((r.ok, r.failed), (5, 0), "{r:?}");
    let r = lab
        .client(
            "a",
            server(),
            &[
                "tcp-echo",
                "192.0.2.53:7",
                "--count",
                "3",
                "--size",
                "20000",
            ],
            CLIENT_TIMEOUT,
        )
        .unwrap();
    assert_eq!((r.ok, r.failed), (3, 0), "{r:?}");

    // Hold: 100 concurrent connections, 100 distinct SNAT ports on a's public IP.
    let r = lab
        .client(
            "a",
            server(),
            &["hold", "203.0.113.100:9000", "--count", "100"],
            CLIENT_TIMEOUT,
        )
        .unwrap();
    assert_eq!((r.ok, r.failed), (100, 0), "{r:?}");
    assert!(r.seen_ips().iter().all(|&ip| ip == PUB_A));
    let mut ports = r.seen_ports();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 100);

    // A background holder reports while its connections stay open (for exhaustion tests).
    let holder = lab
        .spawn(
            &lab.ns_name("b"),
            &[
                SERVER,
                "client",
                "hold",
                "203.0.113.100:9000",
                "--count",
                "10",
                "--hold",
                "60",
            ],
        )
        .unwrap();
    let r = holder.read_report(Duration::from_secs(20)).unwrap();
    assert_eq!((r.ok, r.failed), (10, 0), "{r:?}");
    assert!(r.seen_ips().iter().all(|&ip| ip == PUB_B));
    assert!(holder.try_wait().unwrap().is_none(), "still holding");
    holder.kill().unwrap();

    // Unsolicited inbound traffic to a public IP is dropped (blackhole), not answered.
    let out = lab
        .exec(
            &lab.inet_ns(),
            &[
                SERVER,
                "client",
                "tcp-echo",
                "203.0.113.10:7",
                "--timeout",
                "0.5",
            ],
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"failed\":1"), "{stdout}");

    lab.down().expect("down");
    assert!(list_namespaces(&p).unwrap().is_empty());
    let all = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!all.lines().any(|l| l.starts_with(&p)), "{all}");
}

#[test]
fn masquerade_uses_the_gateway_link_address() {
    require_root!();
    let p = prefix("m");
    let lab = Lab::up(
        LabSpec::new(&p)
            .with_instance("a", IP_A)
            .with_mode(GatewayMode::Kernel(KernelNat::Masquerade))
            .with_offloads(true),
    )
    .expect("lab up");
    let _servers = lab.start_servers(server(), "snatgw.test").expect("servers");
    let r = lab
        .client(
            "a",
            server(),
            &["myip-http", "203.0.113.100"],
            CLIENT_TIMEOUT,
        )
        .unwrap();
    assert_eq!(r.seen_ips(), vec![GW_INET_IP], "{r:?}");
    drop(lab);
    assert!(list_namespaces(&p).unwrap().is_empty());
}

#[test]
fn drop_after_panic_cleans_up_namespaces_and_processes() {
    require_root!();
    let p = prefix("p");
    let spec = LabSpec::new(&p)
        .with_instance("a", IP_A)
        .with_mode(GatewayMode::Kernel(KernelNat::Masquerade));
    let (tx, rx) = std::sync::mpsc::channel();
    let res = std::panic::catch_unwind(move || {
        let lab = Lab::up(spec).expect("lab up");
        let child = lab.spawn(&lab.ns_name("a"), &["sleep", "1000"]).unwrap();
        tx.send(child.id()).unwrap();
        assert_eq!(list_namespaces(&lab.spec().prefix).unwrap().len(), 3);
        panic!("test panic inside a running lab");
    });
    assert!(res.is_err());
    let pid = rx.recv().unwrap();
    assert!(list_namespaces(&p).unwrap().is_empty(), "namespaces left");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "spawned process {pid} still exists"
    );
}

#[test]
fn stale_namespaces_with_the_prefix_are_replaced_and_foreign_ones_refused() {
    require_root!();
    let p = prefix("s");
    // A leftover from a "crashed" run.
    let st = std::process::Command::new("ip")
        .args(["netns", "add", &format!("{p}gw")])
        .status()
        .unwrap();
    assert!(st.success());
    let lab = Lab::up(
        LabSpec::new(&p)
            .with_instance("a", IP_A)
            .with_mode(GatewayMode::Kernel(KernelNat::Masquerade)),
    )
    .expect("lab up over a stale namespace");
    // Commands are only run in the lab's own namespaces.
    assert!(lab.exec("some-other-ns", &["true"]).is_err());
    let out = lab
        .exec(&lab.gw_ns(), &["ip", "-o", "link", "show", "br-priv"])
        .unwrap();
    assert!(out.status.success());
    drop(lab);
    assert!(list_namespaces(&p).unwrap().is_empty());
}
