//! TUN backend tests. Root only (skipped with a message otherwise).
//!
//! Every test runs its body on a thread that first calls `unshare(CLONE_NEWNET)`: that
//! thread (and the `ip` commands it spawns) lives in a fresh, anonymous network namespace,
//! so the TUN device and its addresses never touch the host's interfaces, and everything
//! disappears when the thread ends (no named namespace to leak, even on a crash).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use snatgw_io::{PacketBatch, PacketIo, TunConfig, TunIo};

mod common;
use common::{in_private_netns, ip};

fn sum16(data: &[u8], mut acc: u32) -> u32 {
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
    acc as u16
}

/// Checks the IPv4 header and UDP checksums of `pkt`; returns (src, dst, sport, dport, payload).
fn parse_udp(pkt: &[u8]) -> (SocketAddrV4, SocketAddrV4, &[u8]) {
    assert_eq!(pkt[0] >> 4, 4, "IPv4");
    let ihl = usize::from(pkt[0] & 0xf) * 4;
    assert_eq!(pkt[9], 17, "UDP");
    assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), pkt.len());
    assert_eq!(fold(sum16(&pkt[..ihl], 0)), 0xffff, "IPv4 header checksum");
    let udp = &pkt[ihl..];
    assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), udp.len());
    let mut pseudo = sum16(&pkt[12..20], 0);
    pseudo += 17 + udp.len() as u32;
    assert_eq!(fold(sum16(udp, pseudo)), 0xffff, "UDP checksum");
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    (
        SocketAddrV4::new(src, sport),
        SocketAddrV4::new(dst, dport),
        &udp[8..],
    )
}

/// Swaps source and destination addresses and ports: a reply with checksums still valid
/// (the one's-complement sums do not depend on the order of the words).
fn reflect(pkt: &mut [u8]) {
    let ihl = usize::from(pkt[0] & 0xf) * 4;
    for i in 0..4 {
        pkt.swap(12 + i, 16 + i);
    }
    pkt.swap(ihl, ihl + 2);
    pkt.swap(ihl + 1, ihl + 3);
}

const PEER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

fn setup_addr(name: &str) {
    ip(&["addr", "add", "10.99.0.1/24", "dev", name]);
    ip(&["link", "set", "lo", "up"]);
}

#[test]
fn multiqueue_recv_reflect_mtu_and_wake() {
    require_root!();
    in_private_netns(|| {
        let mut cfg = TunConfig::new("tst0");
        cfg.mtu = 1400;
        cfg.queues = 2;
        cfg.tx_queue_len = Some(1000);
        let mut queues = TunIo::open(&cfg).expect("open tun");
        assert_eq!(queues.len(), 2);
        assert!(!queues[0].offload());
        setup_addr("tst0");
        let link = ip(&["link", "show", "tst0"]);
        assert!(link.contains("mtu 1400"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        assert!(link.contains("qlen 1000"), "{link}");

        // 32 flows (distinct source ports) so the kernel's flow hash uses both queues.
        let socks: Vec<UdpSocket> = (0..32)
            .map(|_| {
                let s = UdpSocket::bind("10.99.0.1:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s
            })
            .collect();
        for (i, s) in socks.iter().enumerate() {
            s.send_to(format!("hello {i}").as_bytes(), (PEER, 9000))
                .unwrap();
        }

        let mut batch = PacketBatch::new(64, 1400);
        let mut per_queue = [0usize; 2];
        let deadline = Instant::now() + Duration::from_secs(5);
        while per_queue.iter().sum::<usize>() < socks.len() && Instant::now() < deadline {
            for (q, io) in queues.iter_mut().enumerate() {
                let n = io
                    .recv_batch(&mut batch, Duration::from_millis(20))
                    .unwrap();
                assert_eq!(n, batch.len());
                for i in 0..n {
                    if batch.packet(i)[0] >> 4 != 4 {
                        batch.drop_packet(i); // IPv6 noise (router solicitation, MLD)
                        continue;
                    }
                    let (src, dst, payload) = parse_udp(batch.packet(i));
                    assert_eq!(*src.ip(), Ipv4Addr::new(10, 99, 0, 1));
                    assert_eq!(dst, SocketAddrV4::new(PEER, 9000));
                    assert!(payload.starts_with(b"hello "));
                    reflect(batch.packet_mut(i));
                }
                let v4 = batch.iter().filter(|p| !p.is_empty()).count();
                per_queue[q] += v4;
                // Echo them back through the same queue.
                assert_eq!(io.send_batch(&mut batch).unwrap(), v4);
                assert!(batch.is_empty());
            }
        }
        assert_eq!(
            per_queue.iter().sum::<usize>(),
            socks.len(),
            "{per_queue:?}"
        );
        assert!(
            per_queue.iter().all(|&n| n > 0),
            "both queues used: {per_queue:?}"
        );

        let mut buf = [0u8; 64];
        for (i, s) in socks.iter().enumerate() {
            let (n, from) = s.recv_from(&mut buf).expect("reflected datagram");
            assert_eq!(from, (PEER, 9000).into());
            assert_eq!(&buf[..n], format!("hello {i}").as_bytes());
        }
        let st = queues[0].stats();
        assert!(st.rx_packets >= per_queue[0] as u64);
        assert_eq!(st.tx_packets, per_queue[0] as u64);
        assert_eq!(st.rx_errors + st.tx_errors, 0);

        // Dropped packets are not sent.
        let io = &mut queues[0];
        // (A flow hashes to one queue; send from several sockets until queue 0 gets one.)
        let mut dropped = 0;
        for s in &socks {
            s.send_to(b"drop me", (PEER, 9000)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        while io
            .recv_batch(&mut batch, Duration::from_millis(50))
            .unwrap()
            > 0
        {
            for i in 0..batch.len() {
                batch.drop_packet(i);
                dropped += 1;
            }
            assert_eq!(io.send_batch(&mut batch).unwrap(), 0);
        }
        assert!(dropped > 0);
        let mut buf = [0u8; 64];
        socks[0]
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(
            socks[0].recv_from(&mut buf).is_err(),
            "dropped packets are not sent"
        );

        // Timeout with nothing to read.
        let t = Instant::now();
        assert_eq!(
            io.recv_batch(&mut batch, Duration::from_millis(100))
                .unwrap(),
            0
        );
        assert!(t.elapsed() >= Duration::from_millis(90));

        // Waking interrupts a long wait on another thread.
        let waker = io.waker();
        let mut q1 = queues.pop().unwrap();
        while q1
            .recv_batch(&mut batch, Duration::from_millis(20))
            .unwrap()
            > 0
        {}
        let t = Instant::now();
        let h = std::thread::spawn(move || {
            let mut b = PacketBatch::new(4, 1400);
            q1.recv_batch(&mut b, Duration::from_secs(30)).unwrap()
        });
        std::thread::sleep(Duration::from_millis(50));
        waker.wake().unwrap();
        assert!(waker.is_woken());
        assert_eq!(h.join().unwrap(), 0);
        assert!(t.elapsed() < Duration::from_secs(10));
    });
}

#[test]
fn offload_splits_udp_gso_and_coalesces_back() {
    require_root!();
    in_private_netns(|| {
        let mut cfg = TunConfig::new("tst1");
        cfg.offload = true;
        let mut queues = TunIo::open(&cfg).expect("open tun with offload");
        let mut io = queues.pop().unwrap();
        assert!(io.offload());
        if !io.udp_offload() {
            eprintln!("skipped: kernel without TUN UDP segmentation offload (< 6.2)");
            return;
        }
        setup_addr("tst1");

        let sock = UdpSocket::bind("10.99.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::UdpGsoSegment, &1000)
            .expect("UDP_SEGMENT");
        let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        sock.send_to(&payload, (PEER, 9001)).unwrap();

        let mut batch = io.new_batch(snatgw_io::DEFAULT_BATCH);
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 5 && Instant::now() < deadline {
            let n = io
                .recv_batch(&mut batch, Duration::from_millis(50))
                .unwrap();
            let mut v4 = 0;
            for i in 0..n {
                if batch.packet(i)[0] >> 4 != 4 {
                    batch.drop_packet(i); // IPv6 noise
                    continue;
                }
                v4 += 1;
                let (_, dst, seg) = parse_udp(batch.packet(i));
                assert_eq!(dst, SocketAddrV4::new(PEER, 9001));
                assert_eq!(seg.len(), 1000, "segments are MTU-sized");
                got.extend_from_slice(seg);
                reflect(batch.packet_mut(i));
            }
            if v4 > 0 {
                // Written back with GRO: one super-packet, split again by the kernel.
                assert_eq!(io.send_batch(&mut batch).unwrap(), v4);
            }
        }
        assert_eq!(got, payload, "5 segments carrying the original payload");
        assert!(io.stats().rx_super_packets >= 1, "{:?}", io.stats());

        let mut buf = [0u8; 9000];
        let mut back = Vec::new();
        while back.len() < payload.len() {
            let (n, from) = sock.recv_from(&mut buf).expect("reflected segment");
            assert_eq!(from, (PEER, 9001).into());
            back.extend_from_slice(&buf[..n]);
        }
        assert_eq!(back, payload);
        assert_eq!(io.stats().rx_errors + io.stats().tx_errors, 0);
    });
}

#[test]
fn open_rejects_bad_config_without_root_effects() {
    // No device is created for an invalid configuration, so this runs unprivileged too.
    let err = TunIo::open(&TunConfig::new("this-name-is-too-long")).unwrap_err();
    assert!(
        err.to_string().contains("invalid TUN configuration"),
        "{err}"
    );
}
