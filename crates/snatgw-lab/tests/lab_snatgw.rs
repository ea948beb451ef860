//! Lab test in snatgw (TUN) mode, without the real gateway: two threads join the gateway
//! namespace, each opens one of the two TUNs with `snatgw-io` and runs its half of a
//! stateless 1:1 NAT (10.0.0.2 <-> 203.0.113.10, full checksum recompute): the private TUN
//! rewrites sources, the public TUN destinations (direction by interface, R9.1). This checks
//! the lab's policy routing end to end: private -> private TUN, TUN -> internet, internet ->
//! public TUN, TUN -> private, VNet traffic bypassing the TUNs (R1.7), and fail-closed
//! behaviour before the TUN routes exist. Root only.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use snatgw_io::{PacketIo, TunConfig, TunIo};
use snatgw_lab::{
    list_namespaces, root_or_skip, GatewayMode, Lab, LabSpec, TUN_PRIVATE, TUN_PUBLIC,
};

const SERVER: &str = env!("CARGO_BIN_EXE_snatgw-lab-server");
const T: Duration = Duration::from_secs(30);
const PRIV: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 3);

fn sum16(data: &[u8]) -> u32 {
    let mut acc = 0u32;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u32::from(*b) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Recomputes the IPv4 header checksum and the TCP/UDP checksum from scratch.
fn fix_checksums(p: &mut [u8]) {
    let ihl = usize::from(p[0] & 0xf) * 4;
    p[10..12].fill(0);
    let c = fold(sum16(&p[..ihl]));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let proto = p[9];
    let off = match proto {
        6 => 16,
        17 => 6,
        _ => return,
    };
    if u16::from_be_bytes([p[6], p[7]]) & 0x1fff != 0 {
        return; // non-first fragment
    }
    let l4len = p.len() - ihl;
    if proto == 17 && p[ihl + 6..ihl + 8] == [0, 0] {
        return; // UDP without checksum
    }
    p[ihl + off..ihl + off + 2].fill(0);
    let pseudo = sum16(&p[12..20]) + u32::from(proto) + l4len as u32;
    let mut c = fold(pseudo + sum16(&p[ihl..]));
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    p[ihl + off..ihl + off + 2].copy_from_slice(&c.to_be_bytes());
}

/// Stateless 1:1 NAT of one packet read from the private TUN (`outbound`) or the public one;
/// false = drop.
fn nat11(p: &mut [u8], outbound: bool) -> bool {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return false;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    if outbound && src == PRIV {
        p[12..16].copy_from_slice(&PUBLIC.octets());
    } else if !outbound && dst == PUBLIC {
        p[16..20].copy_from_slice(&PRIV.octets());
    } else {
        return false;
    }
    fix_checksums(p);
    true
}

#[test]
fn snatgw_mode_routes_through_the_tun() {
    if !root_or_skip() {
        return;
    }
    run_lab("t", false);
}

#[test]
fn snatgw_mode_with_veth_offloads_on() {
    if !root_or_skip() {
        return;
    }
    // Veth checksum offload on: the kernel completes partial checksums before the TUN.
    run_lab("o", true);
}

fn run_lab(tag: &str, offloads: bool) {
    let p = format!("sg{tag}{}-", std::process::id() % 100_000);
    let mut lab = Lab::up(
        LabSpec::new(&p)
            .with_instance("a", PRIV)
            .with_instance("b", IP_B)
            .with_offloads(offloads)
            .with_mode(GatewayMode::snatgw()),
    )
    .expect("lab up");
    let server = Path::new(SERVER);
    let _servers = lab.start_servers(server, "snatgw.test").expect("servers");

    // Before the TUN route exists, nothing leaks: the blackhole in table 100 drops it.
    let r = lab
        .client(
            "a",
            server,
            &["myip-http", "203.0.113.100", "--timeout", "0.5"],
            T,
        )
        .unwrap();
    assert_eq!((r.ok, r.failed), (0, 1), "{r:?}");

    // The "gateway": a 1:1 NAT on the two TUNs, one thread each inside the gateway namespace.
    let stop = Arc::new(AtomicBool::new(false));
    let mut nats = Vec::new();
    let mut wakers = Vec::new();
    for (tun, outbound) in [(TUN_PRIVATE, true), (TUN_PUBLIC, false)] {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
        let nat = lab
            .spawn_thread_in(&lab.gw_ns(), move || {
                let mut queues = TunIo::open(&TunConfig::new(tun)).expect("open tun");
                let mut io = queues.remove(0);
                tx.send(io.waker()).unwrap();
                let mut batch = io.new_batch(64);
                let mut translated = 0u64;
                while !stop2.load(Ordering::Relaxed) {
                    let n = io
                        .recv_batch(&mut batch, Duration::from_millis(100))
                        .unwrap();
                    for i in 0..n {
                        if nat11(batch.packet_mut(i), outbound) {
                            translated += 1;
                        } else {
                            batch.drop_packet(i);
                        }
                    }
                    io.send_batch(&mut batch).unwrap();
                }
                translated
            })
            .unwrap();
        wakers.push(
            rx.recv_timeout(Duration::from_secs(10))
                .expect("TUN opened"),
        );
        lab.wait_for_link(&lab.gw_ns(), tun, Duration::from_secs(5))
            .unwrap();
        nats.push(nat);
    }
    lab.configure_tun().expect("configure tun");

    let r = lab
        .client(
            "a",
            server,
            &["myip-http", "203.0.113.100", "--count", "3"],
            T,
        )
        .unwrap();
    assert!(r.all_ok(), "{r:?}");
    assert_eq!(r.seen_ips(), vec![PUBLIC; 3]);
    // 1:1 NAT keeps ports: the server saw a's own source port.
    let local_ports: Vec<u16> = r
        .local
        .iter()
        .map(|l| l.rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(r.seen_ports(), local_ports);

    let r = lab.client("a", server, &["dns", "192.0.2.53"], T).unwrap();
    assert_eq!(r.a.as_deref(), Some("203.0.113.10"), "{r:?}");
    let r = lab
        .client(
            "a",
            server,
            &["udp-echo", "203.0.113.101", "--count", "5"],
            T,
        )
        .unwrap();
    assert_eq!((r.ok, r.failed), (5, 0), "{r:?}");
    let r = lab
        .client(
            "a",
            server,
            &["tcp-echo", "203.0.113.101", "--size", "100000"],
            T,
        )
        .unwrap();
    assert_eq!((r.ok, r.failed), (1, 0), "{r:?}");

    // b has no translation in this toy NAT: its packets reach the TUN and are dropped.
    let r = lab
        .client(
            "b",
            server,
            &["myip-http", "203.0.113.100", "--timeout", "0.5"],
            T,
        )
        .unwrap();
    assert_eq!(r.ok, 0, "{r:?}");

    // R1.7: traffic inside 10.0.0.0/16 bypasses the TUN (a server in b sees a's private IP).
    let _b_server = lab
        .spawn(&lab.ns_name("b"), &[SERVER, "serve", "--addr", "10.0.1.3"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = lab
        .client("a", server, &["myip-http", "10.0.1.3"], T)
        .unwrap();
    assert_eq!(r.seen_ips(), vec![PRIV], "{r:?}");

    stop.store(true, Ordering::Relaxed);
    for w in &wakers {
        w.wake().unwrap();
    }
    for nat in nats {
        let translated = nat.join().expect("nat thread");
        assert!(translated > 10, "{translated}");
    }

    lab.down().unwrap();
    assert!(list_namespaces(&p).unwrap().is_empty());
}
