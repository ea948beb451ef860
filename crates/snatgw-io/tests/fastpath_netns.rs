//! The fast path's loader, in a private network namespace (root only; fails instead of
//! skipping under SNATGW_REQUIRE_ROOT=1): the verifier accepts both programs, they attach to
//! tc ingress of two interfaces, and the maps take and give back entries. Real packets through
//! the fast path are the lab tests' (crates/snatgw/tests/lab_fastpath.rs).

mod common;

use common::{fp_config, in_private_netns, veth_pair};
use snatgw_io::fastpath::{
    BpfFlowKey, BpfFlowVal, FastPathConfig, TcFastPath, DIR_IN, DIR_OUT, STAT_NAMES,
};

#[test]
fn loads_attaches_and_holds_entries() {
    require_root!();
    in_private_netns(|| {
        veth_pair();
        let cfg = fp_config();
        let (fp, mut map, counters) = TcFastPath::load(&cfg).expect("load and attach");
        assert_ne!(fp.private_ifindex, fp.public_ifindex);
        let k = BpfFlowKey {
            src: u32::from_ne_bytes([10, 0, 3, 20]),
            dst: u32::from_ne_bytes([198, 51, 100, 7]),
            sport: 5000u16.to_be(),
            dport: 53u16.to_be(),
            proto: 17,
            dir: DIR_OUT,
            pad: 0,
        };
        let v = BpfFlowVal {
            addr: u32::from_ne_bytes([192, 0, 2, 100]),
            port: 1024u16.to_be(),
            ifindex: fp.public_ifindex,
            counter: 2,
            ..Default::default()
        };
        map.insert(&k, &v).expect("insert");
        assert_eq!(map.get(&k), Some(v));
        let mut k2 = k;
        k2.dir = DIR_IN;
        assert_eq!(map.get(&k2), None, "the direction is part of the key");
        // 8 flows = 16 entries: the 17th is refused (the loader sized the map).
        for i in 1..16u16 {
            let mut ki = k;
            ki.sport = (5000 + i).to_be();
            map.insert(&ki, &v).expect("room for 16 entries");
        }
        let mut full = k;
        full.sport = 6000u16.to_be();
        assert!(map.insert(&full, &v).is_err(), "map holds 2 x max_flows");
        assert_eq!(map.len(), 16);
        map.remove(&k).expect("remove");
        map.remove(&k).expect("removing a missing entry is fine");
        assert_eq!(map.get(&k), None);
        assert_eq!(counters.instance_counters(4), vec![0; 16]);
        assert_eq!(
            counters.instance_counters(100).len(),
            16,
            "capped at the slots"
        );
        assert_eq!(counters.stats().len(), STAT_NAMES.len());
        drop(fp);
    });
}

/// Issue #16: runs of entries go to the kernel as one `BPF_MAP_UPDATE_BATCH` /
/// `BPF_MAP_DELETE_BATCH` each, in slice order, and what the kernel refuses is reported entry
/// by entry: a missing key does not stop a removal run, a full map refuses exactly the entries
/// past its size, a key removed and then installed again (a released public port's inbound key,
/// given to a new flow, R2.2) ends with the new value, and a reader on its own descriptor sees
/// the same map.
#[test]
fn batches_apply_in_order_and_report_each_refused_entry() {
    require_root!();
    in_private_netns(|| exercise_runs(true));
}

/// The same with batches off: the per-entry fallback of kernels without batch operations on
/// hash maps gives the same results.
#[test]
fn the_per_entry_fallback_gives_the_same_results() {
    require_root!();
    in_private_netns(|| exercise_runs(false));
}

fn exercise_runs(batches: bool) {
    veth_pair();
    let cfg = fp_config();
    let (_fp, mut map, _counters) = TcFastPath::load(&cfg).expect("load and attach");
    map.set_batches(batches);
    let reader = map.reader().expect("a second descriptor");
    let key = |i: u16| BpfFlowKey {
        src: u32::from_ne_bytes([198, 51, 100, 7]),
        dst: u32::from_ne_bytes([192, 0, 2, 100]),
        sport: 53u16.to_be(),
        dport: (1024 + i).to_be(),
        proto: 17,
        dir: DIR_IN,
        pad: 0,
    };
    let val = |sport: u16| BpfFlowVal {
        addr: u32::from_ne_bytes([10, 0, 3, 20]),
        port: sport.to_be(),
        ifindex: 1,
        counter: 3,
        ..Default::default()
    };
    // Ten entries in one call.
    let keys: Vec<_> = (0..10).map(key).collect();
    let vals: Vec<_> = (0..10).map(|i| val(5000 + i)).collect();
    let mut failed = Vec::new();
    let calls = map.batch_syscalls();
    map.insert_batch(&keys, &vals, &mut failed);
    assert!(failed.is_empty(), "{failed:?}");
    if batches {
        assert!(
            map.batches(),
            "this kernel (≥ 5.6) takes batches on hash maps"
        );
        assert_eq!(
            map.batch_syscalls() - calls,
            1,
            "one system call for the run"
        );
    } else {
        assert_eq!(map.batch_syscalls() - calls, 10, "one per entry");
    }
    assert_eq!(map.len(), 10);
    assert_eq!(reader.get(&key(3)), Some(val(5003)));

    // Remove 0..5 with a key that is not there in the middle: all present ones go.
    let calls = map.batch_syscalls();
    let gone = [key(0), key(1), key(99), key(2), key(3), key(4)];
    assert_eq!(map.remove_batch(&gone), 0, "a missing key is not an error");
    assert_eq!(map.len(), 5);
    assert!(gone.iter().all(|k| map.get(k).is_none()));
    assert_eq!(
        map.batch_syscalls() - calls,
        if batches { 2 } else { 6 },
        "the run resumes after the missing key"
    );

    // R2.2's order: the old owner's entry removed, then the same key installed for the
    // new owner, as two consecutive runs: the new value is what stays.
    assert_eq!(map.remove_batch(&[key(5)]), 0);
    map.insert_batch(&[key(5)], &[val(9999)], &mut failed);
    assert!(failed.is_empty());
    assert_eq!(map.get(&key(5)), Some(val(9999)));
    assert_eq!(reader.get(&key(5)), Some(val(9999)));

    // 5 entries in, room for 11 more: a run of 14 new ones has its last 3 refused, and
    // replacing existing keys still works when the map is full.
    let more: Vec<_> = (100..114).map(key).collect();
    let more_vals: Vec<_> = (0..14).map(|i| val(6000 + i)).collect();
    map.insert_batch(&more, &more_vals, &mut failed);
    assert_eq!(failed, vec![11, 12, 13]);
    assert_eq!(map.len(), 16);
    assert_eq!(map.get(&key(110)), Some(val(6010)));
    assert_eq!(map.get(&key(111)), None);
    failed.clear();
    map.insert_batch(&[key(5), key(100)], &[val(1), val(2)], &mut failed);
    assert!(failed.is_empty(), "replacing in a full map: {failed:?}");
    assert_eq!(map.get(&key(100)), Some(val(2)));

    // Resynchronisation empties the map.
    assert_eq!(map.clear(), 0);
    assert!(map.is_empty());
    assert_eq!(reader.get(&key(5)), None);
    assert_eq!(map.batches(), batches);
}

/// Sends `frame` (an Ethernet frame) out of interface `ifindex` with a packet socket: it
/// arrives at the veth peer's ingress, where a program is attached.
fn send_frame(ifindex: u32, frame: &[u8]) {
    // SAFETY: plain libc calls on a socket this function owns and closes; `sll` is a fully
    // initialised sockaddr_ll and `frame` a valid buffer, both outliving the calls.
    #[allow(unsafe_code)]
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let r = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::addr_of!(sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(r, frame.len() as isize, "sendto: {e}");
    }
}

/// An Ethernet + IPv4 + TCP frame (no payload) with TCP flags byte `flags`.
fn tcp_frame(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

/// Issue #17: with a flow installed, the kernel translates its SYN-ACK, FIN and RST (a SYN
/// without ACK still goes up, R3.1); each FIN or RST it translates leaves one record in the
/// EVENTS ring with the flow as the engine knows it (outbound 5-tuple and public side, also
/// for an inbound packet), its flags, direction and the kernel's time. With the ring full
/// (a one-page ring not drained), FIN/RST are passed up instead (`event_full`), never
/// translated without their record: records + passed up = sent, and after a drain the next
/// one is translated again.
#[test]
fn r3_2_r3_3_fin_and_rst_are_translated_with_an_event_or_passed_up_when_the_ring_is_full() {
    use snatgw_io::fastpath::{monotonic_ns, TCPF_ACK, TCPF_FIN, TCPF_RST, TCPF_SYN};
    require_root!();
    in_private_netns(|| {
        veth_pair();
        let cfg = FastPathConfig {
            event_ring_bytes: 4096,
            ..fp_config()
        };
        let (mut fp, mut map, counters) = TcFastPath::load(&cfg).expect("load and attach");
        let mut events = fp.take_events().expect("the EVENTS ring");
        assert!(fp.take_events().is_none(), "one reader");
        let (vm, server, public) = ([10, 0, 3, 20], [198, 51, 100, 7], [192, 0, 2, 100]);
        let ne = u32::from_ne_bytes;
        let out_key = BpfFlowKey {
            src: ne(vm),
            dst: ne(server),
            sport: 5000u16.to_be(),
            dport: 443u16.to_be(),
            proto: 6,
            dir: DIR_OUT,
            pad: 0,
        };
        let in_key = BpfFlowKey {
            src: ne(server),
            dst: ne(public),
            sport: 443u16.to_be(),
            dport: 1024u16.to_be(),
            proto: 6,
            dir: DIR_IN,
            pad: 0,
        };
        let val = |addr, port: u16, ifindex| BpfFlowVal {
            addr: ne(addr),
            port: port.to_be(),
            ifindex,
            counter: 0,
            ..Default::default()
        };
        map.insert(&out_key, &val(public, 1024, fp.public_ifindex))
            .unwrap();
        map.insert(&in_key, &val(vm, 5000, fp.private_ifindex))
            .unwrap();
        let stat = |name: &str| {
            let i = STAT_NAMES.iter().position(|n| *n == name).unwrap();
            counters.stats()[i]
        };
        // Outbound packets are sent out of fp-b and arrive at fp-a's ingress (snat_out);
        // inbound ones the other way.
        let out = |flags| send_frame(fp.public_ifindex, &tcp_frame(vm, 5000, server, 443, flags));
        let inb = |flags| {
            send_frame(
                fp.private_ifindex,
                &tcp_frame(server, 443, public, 1024, flags),
            )
        };

        out(TCPF_SYN);
        assert_eq!(
            (stat("control"), stat("translated_out")),
            (1, 0),
            "a SYN goes up"
        );
        inb(TCPF_SYN | TCPF_ACK);
        assert_eq!(stat("translated_in"), 1, "the SYN-ACK is the kernel's");
        let mut got = Vec::new();
        assert_eq!(events.drain(&mut got), 0, "no event for SYN-ACK");

        let t0 = monotonic_ns();
        out(TCPF_FIN | TCPF_ACK);
        inb(TCPF_RST);
        let t1 = monotonic_ns();
        assert_eq!((stat("translated_out"), stat("translated_in")), (1, 2));
        assert_eq!(stat("events"), 2);
        assert_eq!(events.drain(&mut got), 2);
        for (e, dir, flags) in [
            (got[0], DIR_OUT, TCPF_FIN | TCPF_ACK),
            (got[1], DIR_IN, TCPF_RST),
        ] {
            assert_eq!((e.dir, e.flags), (dir, flags));
            // The flow as the engine knows it, whichever way the packet went.
            assert_eq!((e.src, e.sport), (ne(vm), 5000u16.to_be()));
            assert_eq!((e.dst, e.dport), (ne(server), 443u16.to_be()));
            assert_eq!((e.public, e.pport), (ne(public), 1024u16.to_be()));
            assert!(
                e.ts >= t0 && e.ts <= t1,
                "kernel time {} in [{t0}, {t1}]",
                e.ts
            );
            assert_eq!(
                e.ts,
                {
                    let k = if dir == DIR_OUT { out_key } else { in_key };
                    map.get(&k).unwrap().last_seen
                },
                "the record's time is the entry's last_seen"
            );
        }

        // A one-page ring, not drained: RSTs fill it, then go up untranslated.
        let sent = 300u64;
        let (ev0, tr0) = (stat("events"), stat("translated_out"));
        for _ in 0..sent {
            out(TCPF_RST | TCPF_ACK);
        }
        let (held, full) = (stat("events") - ev0, stat("event_full"));
        assert!(full > 0 && held > 0, "held {held}, passed up {full}");
        assert_eq!(held + full, sent, "every RST has a record or went up");
        assert_eq!(
            stat("translated_out") - tr0,
            held,
            "none translated without its record"
        );
        got.clear();
        assert_eq!(events.drain(&mut got) as u64, held);
        assert!(got
            .iter()
            .all(|e| e.flags == TCPF_RST | TCPF_ACK && e.dir == DIR_OUT));
        assert!(got.windows(2).all(|w| w[0].ts <= w[1].ts), "oldest first");
        // Room again: the next one is translated with its record.
        out(TCPF_RST);
        assert_eq!((stat("event_full"), stat("events") - ev0), (full, held + 1));
        assert_eq!(events.drain(&mut got), 1);
        drop(fp);
    });
}

/// A packet socket on `ifname` that sees every frame arriving there (a capture).
struct Capture(i32);

impl Capture {
    fn open(ifname: &str) -> Capture {
        let ifindex = snatgw_io::fastpath::ifindex(ifname).expect("ifindex");
        // SAFETY: plain libc calls on a socket this struct owns (closed on drop); `sll` and
        // `tv` are fully initialised and outlive the calls.
        #[allow(unsafe_code)]
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            );
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = ifindex as i32;
            let r = libc::bind(
                fd,
                std::ptr::addr_of!(sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 300_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Capture(fd)
        }
    }

    /// The next frame `want` accepts (other frames skipped), or `None` after a quiet 300 ms.
    fn next_where(&self, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        loop {
            // SAFETY: `buf` is a writable buffer of the length passed, alive for the call.
            #[allow(unsafe_code)]
            let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return None;
            }
            let f = &buf[..n as usize];
            if want(f) {
                return Some(f.to_vec());
            }
        }
    }

    /// The next IPv4/UDP frame to `dport`, or `None` after a quiet 300 ms.
    fn next_udp(&self, dport: u16) -> Option<Vec<u8>> {
        self.next_where(|f| {
            f.len() >= 42
                && f[12..14] == [0x08, 0x00]
                && f[23] == 17
                && f[36..38] == dport.to_be_bytes()
        })
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SAFETY: closes the descriptor this struct owns, once.
        #[allow(unsafe_code)]
        unsafe {
            libc::close(self.0);
        }
    }
}

/// The one's-complement sum check of an IPv4 header: 0 when its checksum is right.
fn ip_header_sum(h: &[u8]) -> u16 {
    let s: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    !(((s & 0xffff) + (s >> 16)) as u16)
}

/// Issue #19, SPEC R10.3 in the kernel: a packet of an instance another fleet node owns
/// (outbound, by source address), or to a port chunk of another node's (inbound), with no
/// flow here, leaves on the fleet link to the owner, unchanged inside exactly the datagram
/// userspace's steering sends (IPv4/UDP from this node's link, header `SG` 1 and the
/// direction, no UDP checksum, link padding cut off); an installed flow is still translated
/// here; entries of an old epoch, this node's own instances, ports outside the chunks and a
/// packet too big for the link once wrapped go up to the engine instead (`steer_up` for the
/// last); with steering off nothing is steered.
#[test]
fn r10_3_kernel_steers_another_nodes_packets_to_its_link_unchanged() {
    use snatgw_io::fastpath::{SteerTable, STEER_CHUNK_PORTS, STEER_PORT_BASE, TCPF_ACK, TCPF_SYN};
    use std::net::{Ipv4Addr, SocketAddrV4};
    require_root!();
    in_private_netns(|| {
        veth_pair();
        // The fleet link: fl-a here (192.0.2.1); fl-b stands for the owner's side, 192.0.2.2
        // by a permanent neighbour entry, and captures what arrives.
        fleet_link_pair();
        common::ip(&[
            "neigh",
            "add",
            "192.0.2.2",
            "lladdr",
            &mac_str(mac_of("fl-b")),
            "dev",
            "fl-a",
            "nud",
            "permanent",
        ]);
        let (mut fp, mut map, counters) = TcFastPath::load(&fp_config()).expect("load and attach");
        let mut steer = fp.take_steer().expect("the steering maps");
        assert!(fp.take_steer().is_none(), "one writer");
        let cap = Capture::open("fl-b");
        let stat = |name: &str| {
            let i = STAT_NAMES.iter().position(|n| *n == name).unwrap();
            counters.stats()[i]
        };
        let (vm, mine, server, public) = (
            [10, 0, 3, 20],
            [10, 0, 3, 21],
            [198, 51, 100, 7],
            [203, 0, 113, 5],
        );
        let me = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 7400);
        let owner = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 7401);
        // Chunk 3 of the public address: ports 1120..1151.
        let chunk = 3u16;
        let in_chunk = STEER_PORT_BASE + chunk * STEER_CHUNK_PORTS + 5;
        let mut table = SteerTable {
            link: Some(me),
            ..Default::default()
        };
        table.inst.insert(Ipv4Addr::from(vm), owner);
        table.block.insert((Ipv4Addr::from(public), chunk), owner);
        assert_eq!(steer.epoch(), 0, "off until applied");
        assert!(steer.apply(&table).expect("apply"));
        assert!(
            !steer.apply(&table).expect("apply"),
            "same table: nothing to do"
        );
        let epoch = steer.epoch();
        assert_ne!(epoch, 0);
        assert_eq!(steer.len(), (1, 1));

        // Out of fp-b arrives at fp-a's ingress (snat_out); out of fp-a at fp-b's (snat_in).
        // Unicast, as a gateway receives them (bpf_redirect_neigh drops a multicast or
        // broadcast frame).
        let unicast = |f: &[u8]| {
            let mut f = f.to_vec();
            f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
            f
        };
        let out = |f: &[u8]| send_frame(fp.public_ifindex, &unicast(f));
        let inb = |f: &[u8]| send_frame(fp.private_ifindex, &unicast(f));
        let check = |got: Option<Vec<u8>>, sent: &[u8], dir: u8| {
            let got = got.unwrap_or_else(|| {
                panic!(
                    "no datagram on the link; stats {:?}",
                    STAT_NAMES
                        .iter()
                        .zip(counters.stats())
                        .filter(|(_, n)| *n > 0)
                        .collect::<Vec<_>>()
                )
            });
            let inner = &sent[14..14 + 40];
            let ip = &got[14..34];
            assert_eq!(ip[0], 0x45);
            assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, 20 + 8 + 4 + 40);
            assert_eq!(ip[6] & 0x40, 0x40, "DF");
            assert_eq!((ip[8], ip[9]), (64, 17), "TTL 64, UDP");
            assert_eq!(ip_header_sum(ip), 0, "outer header checksum");
            assert_eq!(ip[12..16], me.ip().octets(), "from this node's link");
            assert_eq!(ip[16..20], owner.ip().octets(), "to the owner's link");
            let udp = &got[34..42];
            assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), me.port());
            assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), owner.port());
            assert_eq!(u16::from_be_bytes([udp[4], udp[5]]) as usize, 8 + 4 + 40);
            assert_eq!(udp[6..8], [0, 0], "no UDP checksum");
            assert_eq!(got[42..46], [b'S', b'G', 1, dir], "the link header");
            assert_eq!(&got[46..], inner, "the packet unchanged, padding cut off");
        };

        // An outbound SYN of another node's instance, with 6 bytes of link padding.
        let mut syn = tcp_frame(vm, 5000, server, 443, TCPF_SYN);
        syn.extend_from_slice(&[0; 6]);
        out(&syn);
        check(cap.next_udp(owner.port()), &syn, DIR_OUT);
        // A later segment with no flow here goes too.
        let ack = tcp_frame(vm, 5000, server, 443, TCPF_ACK);
        out(&ack);
        check(cap.next_udp(owner.port()), &ack, DIR_OUT);
        assert_eq!(stat("steered_out"), 2);
        // This node's own instance: up to the engine.
        out(&tcp_frame(mine, 5000, server, 443, TCPF_SYN));
        assert!(cap.next_udp(owner.port()).is_none());
        assert_eq!(stat("control"), 1);
        // An installed flow is translated here, never steered.
        let (k, v) = out_flow(vm, 5000, server, 443, public, 1024, fp.public_ifindex);
        map.insert(&k, &v).expect("insert");
        out(&ack);
        assert_eq!((stat("translated_out"), stat("steered_out")), (1, 2));
        map.remove(&k).expect("remove");

        // Inbound to a port of the chunk: steered, direction byte 1; the next chunk and a port
        // below the chunks are not.
        let to_chunk = tcp_frame(server, 443, public, in_chunk, TCPF_SYN | TCPF_ACK);
        inb(&to_chunk);
        check(cap.next_udp(owner.port()), &to_chunk, DIR_IN);
        inb(&tcp_frame(
            server,
            443,
            public,
            in_chunk + STEER_CHUNK_PORTS,
            TCPF_ACK,
        ));
        inb(&tcp_frame(server, 443, public, 80, TCPF_ACK));
        assert!(cap.next_udp(owner.port()).is_none());
        assert_eq!((stat("steered_in"), stat("miss")), (1, 2));

        // Too big for the link once wrapped (1500 + 32 > 1500): up to the engine.
        let mut big = tcp_frame(vm, 5000, server, 443, TCPF_ACK);
        big[16..18].copy_from_slice(&1500u16.to_be_bytes());
        big[24..26].copy_from_slice(&[0, 0]);
        let sum = ip_header_sum(&big[14..34]);
        big[24..26].copy_from_slice(&sum.to_be_bytes());
        big.resize(14 + 1500, 0);
        out(&big);
        assert_eq!(stat("steer_up"), 1);
        assert!(cap.next_udp(owner.port()).is_none());

        // A new table without the instance: a new epoch, its entry gone, its packets go up.
        table.inst.clear();
        assert!(steer.apply(&table).expect("apply"));
        assert_ne!(steer.epoch(), epoch);
        assert_eq!(steer.len(), (0, 1));
        out(&tcp_frame(vm, 5001, server, 443, TCPF_SYN));
        assert!(cap.next_udp(owner.port()).is_none());
        assert_eq!((stat("control"), stat("steered_out")), (2, 2));

        // Off: nothing steered, the maps empty.
        steer.off().expect("off");
        assert_eq!((steer.epoch(), steer.len()), (0, (0, 0)));
        inb(&to_chunk);
        assert!(cap.next_udp(owner.port()).is_none());
        assert_eq!(stat("steered_in"), 1);
        drop(fp);
    });
}

/// The one's-complement sum of `b` (big-endian 16-bit words, an odd byte padded), folded.
fn ones_sum(b: &[u8], mut s: u32) -> u32 {
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

/// The TCP checksum sum of IPv4 packet `ip` (header without options), pseudo-header
/// included: 0xffff when the checksum field is right.
fn tcp_sum(ip: &[u8]) -> u16 {
    let len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let seg = &ip[20..len];
    let mut pseudo = ip[12..20].to_vec();
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((len - 20) as u16).to_be_bytes());
    ones_sum(seg, ones_sum(&pseudo, 0)) as u16
}

/// Issue #19, R10.3 received in the kernel: a datagram steered here by a live node (its link
/// in STEER_PEERS), to this node's link address and port, whose inner packet belongs to a flow
/// installed here, is unwrapped and translated by `snat_link` as `snat_out` would (source
/// rewritten, TTL decremented, both checksums right, sent out of the flow's interface); the
/// first packet of a flow, a packet of no flow here, a datagram from a node that is not a live
/// peer, and anything while steering is off are left wrapped for the link's socket.
#[test]
fn r10_3_kernel_translates_packets_other_nodes_steer_here() {
    use snatgw_io::fastpath::{SteerTable, TCPF_ACK, TCPF_SYN};
    use std::net::{Ipv4Addr, SocketAddrV4};
    require_root!();
    in_private_netns(|| {
        veth_pair();
        fleet_link_pair();
        // The translated packet leaves by fp-b towards the server (a route and a neighbour),
        // and arrives at fp-a, where it is captured.
        common::ip(&["route", "add", "198.51.100.0/24", "dev", "fp-b"]);
        common::ip(&[
            "neigh",
            "add",
            "198.51.100.7",
            "lladdr",
            &mac_str(mac_of("fp-a")),
            "dev",
            "fp-b",
            "nud",
            "permanent",
        ]);
        let cfg = FastPathConfig {
            link_if: Some("fl-a".into()),
            ..fp_config()
        };
        let (mut fp, mut map, counters) = TcFastPath::load(&cfg).expect("load and attach");
        let mut steer = fp.take_steer().expect("steering maps");
        let stat = |name: &str| {
            let i = STAT_NAMES.iter().position(|n| *n == name).unwrap();
            counters.stats()[i]
        };
        let me = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 7400);
        let peer = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 7401);
        let mut table = SteerTable {
            link: Some(me),
            ..Default::default()
        };
        table.peers.insert(peer);
        steer.apply(&table).expect("apply");
        let (vm, server, public) = ([10, 0, 3, 20], [198, 51, 100, 7], [192, 0, 2, 100]);
        let (k, v) = out_flow(vm, 5000, server, 443, public, 1024, fp.public_ifindex);
        map.insert(&k, &v).expect("insert");
        let cap = Capture::open("fp-a");
        let fla = mac_of("fl-a");
        let fl_b = snatgw_io::fastpath::ifindex("fl-b").expect("fl-b");
        // The datagram another node's kernel (or userspace) sends: the inner packet with a
        // right TCP checksum, wrapped as on the link.
        let wrapped = |from: [u8; 4], flags: u8, sport: u16| -> Vec<u8> {
            let mut inner = tcp_frame(vm, sport, server, 443, flags)[14..].to_vec();
            inner[36..38].copy_from_slice(&[0, 0]);
            let c = !tcp_sum(&inner);
            inner[36..38].copy_from_slice(&c.to_be_bytes());
            assert_eq!(tcp_sum(&inner), 0xffff);
            let mut f = fla.to_vec();
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 9, 0x08, 0x00]);
            let total = (20 + 8 + 4 + inner.len()) as u16;
            let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&from);
            ip.extend_from_slice(&me.ip().octets());
            let s = ip_header_sum(&ip);
            ip[10..12].copy_from_slice(&s.to_be_bytes());
            f.extend_from_slice(&ip);
            f.extend_from_slice(&peer.port().to_be_bytes());
            f.extend_from_slice(&me.port().to_be_bytes());
            f.extend_from_slice(&(total - 20).to_be_bytes());
            f.extend_from_slice(&[0, 0, b'S', b'G', 1, DIR_OUT]);
            f.extend_from_slice(&inner);
            f
        };
        // The capture's next frame from the vm's flow, translated (source public:1024).
        let translated = |cap: &Capture| -> Option<Vec<u8>> {
            cap.next_where(|f| {
                f.len() >= 54 && f[12..14] == [8, 0] && f[23] == 6 && f[30..34] == server
            })
            .map(|f| f[14..].to_vec())
        };

        send_frame(fl_b, &wrapped(peer.ip().octets(), TCPF_ACK, 5000));
        let got = translated(&cap).unwrap_or_else(|| {
            panic!(
                "nothing translated; stats {:?}",
                STAT_NAMES
                    .iter()
                    .zip(counters.stats())
                    .filter(|(_, n)| *n > 0)
                    .collect::<Vec<_>>()
            )
        });
        assert_eq!(got[12..16], public, "source: the public address");
        assert_eq!(u16::from_be_bytes([got[20], got[21]]), 1024, "source port");
        assert_eq!(got[8], 63, "TTL decremented as a router does");
        assert_eq!(ip_header_sum(&got[..20]), 0, "IP checksum");
        assert_eq!(tcp_sum(&got), 0xffff, "TCP checksum");
        assert_eq!(
            (stat("link_in"), stat("translated_out"), stat("link_drop")),
            (1, 1, 0)
        );

        // Left wrapped: the first packet of a flow, no flow here, not a live peer.
        send_frame(fl_b, &wrapped(peer.ip().octets(), TCPF_SYN, 5000));
        send_frame(fl_b, &wrapped(peer.ip().octets(), TCPF_ACK, 5001));
        send_frame(fl_b, &wrapped([192, 0, 2, 9], TCPF_ACK, 5000));
        assert!(translated(&cap).is_none());
        assert_eq!((stat("link_in"), stat("link_up")), (1, 3));
        // Steering off: snat_link leaves everything alone.
        steer.off().expect("off");
        send_frame(fl_b, &wrapped(peer.ip().octets(), TCPF_ACK, 5000));
        assert!(translated(&cap).is_none());
        assert_eq!((stat("link_in"), stat("link_up")), (1, 3));
        drop(fp);
    });
}

/// The fleet link of the steering tests: the veth pair `fl-a` (this node's link, 192.0.2.1/24)
/// and `fl-b` (the other nodes' side), both up.
fn fleet_link_pair() {
    common::ip(&[
        "link", "add", "fl-a", "type", "veth", "peer", "name", "fl-b",
    ]);
    common::ip(&["link", "set", "fl-a", "up"]);
    common::ip(&["link", "set", "fl-b", "up"]);
    common::ip(&["addr", "add", "192.0.2.1/24", "dev", "fl-a"]);
}

/// The MAC address of `ifname` (from `ip`: /sys is the host's).
fn mac_of(ifname: &str) -> [u8; 6] {
    let l = common::ip(&["-o", "link", "show", ifname]);
    let m = l
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("MAC address");
    let v: Vec<u8> = m
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    v.try_into().expect("6 bytes")
}

/// `aa:bb:..` of a MAC address.
fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The outbound flow-map entry of a TCP flow from `vm:sport` to `server:dport`, translated to
/// `public:pport` and sent out of `ifindex`.
fn out_flow(
    vm: [u8; 4],
    sport: u16,
    server: [u8; 4],
    dport: u16,
    public: [u8; 4],
    pport: u16,
    ifindex: u32,
) -> (BpfFlowKey, BpfFlowVal) {
    (
        BpfFlowKey {
            src: u32::from_ne_bytes(vm),
            dst: u32::from_ne_bytes(server),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto: 6,
            dir: DIR_OUT,
            pad: 0,
        },
        BpfFlowVal {
            addr: u32::from_ne_bytes(public),
            port: pport.to_be(),
            ifindex,
            ..Default::default()
        },
    )
}
