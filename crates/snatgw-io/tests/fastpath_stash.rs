//! Issue #17, new outbound TCP flows opened by the kernel from stashes, with the real program in
//! a private network namespace (root only; fails instead of skipping under
//! SNATGW_REQUIRE_ROOT=1).
//!
//! Topology (all in the test's namespace): `fp-a`/`fp-b` carry the program as in the other
//! fast-path tests (outbound frames are sent out of `fp-b` and arrive at `fp-a`'s ingress,
//! `snat_out`; inbound ones the other way, `snat_in`); the flows' egress interfaces are two
//! more veth pairs, so what the program sends is captured on the far side without coming back
//! to it: `net-a` towards the server (captured on `net-b`), `vm-a` towards the instance
//! (captured on `vm-b`), each with a route and a permanent neighbour for `bpf_redirect_neigh`.

mod common;
#[path = "common/frames.rs"]
mod frames;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{fp_config, in_private_netns, ip, veth_pair};
use frames::{ip_header_sum, mac_of, mac_str, send_frame, tcp_frame, tcp_sum, Capture, Sender};
use snatgw_io::fastpath::{
    counter_index, monotonic_ns, BpfFlowKey, BpfFlowVal, BpfStashKey, BpfTcpEvent, FastPathConfig,
    FastPathCounters, FastPathEvents, FastPathStash, FlowMap, StashParams, TcFastPath, DIR_IN,
    DIR_OUT, EV_OPENED, EV_RETURNED, EV_TCP, STASH_PORTS, STAT_NAMES, TCPF_ACK, TCPF_FIN, TCPF_SYN,
};

const VM: [u8; 4] = [10, 0, 3, 20];
const SERVER: [u8; 4] = [198, 51, 100, 7];
const PUBLIC: [u8; 4] = [192, 0, 2, 100];
/// The stash slot the tests use (any but 0, to catch an index mix-up).
const SLOT: u32 = 3;

fn ne(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

/// The egress veth pairs (see the module doc), their routes and neighbours.
fn topology() {
    veth_pair();
    for (a, b) in [("net-a", "net-b"), ("vm-a", "vm-b")] {
        ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
        ip(&["link", "set", a, "up"]);
        ip(&["link", "set", b, "up"]);
    }
    ip(&["route", "add", "198.51.100.0/24", "dev", "net-a"]);
    let net_b = mac_str(mac_of("net-b"));
    ip(&[
        "neigh",
        "add",
        "198.51.100.7",
        "lladdr",
        &net_b,
        "dev",
        "net-a",
        "nud",
        "permanent",
    ]);
    ip(&["route", "add", "10.0.3.0/24", "dev", "vm-a"]);
    let vm_b = mac_str(mac_of("vm-b"));
    ip(&[
        "neigh",
        "add",
        "10.0.3.20",
        "lladdr",
        &vm_b,
        "dev",
        "vm-a",
        "nud",
        "permanent",
    ]);
}

/// The loaded fast path with everything the tests look at.
struct Gw {
    fp: TcFastPath,
    map: FlowMap,
    counters: FastPathCounters,
    events: FastPathEvents,
    stash: FastPathStash,
    /// Egress towards the server (`net-a`).
    net_if: u32,
    /// Egress towards the instance (`vm-a`).
    vm_if: u32,
}

impl Gw {
    fn load(cfg: &FastPathConfig) -> Gw {
        let (mut fp, map, counters) = TcFastPath::load(cfg).expect("load and attach");
        let events = fp.take_events().expect("the EVENTS ring");
        let stash = fp.take_stash().expect("the stash maps");
        assert!(fp.take_stash().is_none(), "one writer");
        Gw {
            fp,
            map,
            counters,
            events,
            stash,
            net_if: snatgw_io::fastpath::ifindex("net-a").expect("net-a"),
            vm_if: snatgw_io::fastpath::ifindex("vm-a").expect("vm-a"),
        }
    }

    fn stat(&self, name: &str) -> u64 {
        let i = STAT_NAMES.iter().position(|n| *n == name).unwrap();
        self.counters.stats()[i]
    }

    /// The non-zero STATS entries, for failure messages.
    fn stats(&self) -> Vec<(&'static str, u64)> {
        STAT_NAMES
            .iter()
            .copied()
            .zip(self.counters.stats())
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    fn params(&self) -> StashParams {
        StashParams {
            public: ne(PUBLIC),
            out_ifindex: self.net_if,
            in_ifindex: self.vm_if,
            counter_out: counter_index(1, false, DIR_OUT),
            counter_in: counter_index(1, false, DIR_IN),
        }
    }

    /// An outbound TCP segment from the instance: out of `fp-b`, into `snat_out`.
    fn out(&self, sport: u16, flags: u8) {
        send_frame(
            self.fp.public_ifindex,
            &tcp_frame(VM, sport, SERVER, 443, flags),
        );
    }

    /// An inbound TCP segment from the server to the public side: into `snat_in`.
    fn inb(&self, pport: u16, flags: u8) {
        send_frame(
            self.fp.private_ifindex,
            &tcp_frame(SERVER, 443, PUBLIC, pport, flags),
        );
    }

    fn drain(&mut self) -> Vec<BpfTcpEvent> {
        let mut v = Vec::new();
        self.events.drain(&mut v);
        v
    }
}

/// The stash key of the instance's flows to the server's port 443.
fn key() -> BpfStashKey {
    BpfStashKey {
        src: ne(VM),
        dst: ne(SERVER),
        dport: 443u16.to_be(),
        pad: 0,
    }
}

/// Network order.
fn be(ports: &[u16]) -> Vec<u16> {
    ports.iter().map(|p| p.to_be()).collect()
}

fn out_key(sport: u16) -> BpfFlowKey {
    BpfFlowKey {
        src: ne(VM),
        dst: ne(SERVER),
        sport: sport.to_be(),
        dport: 443u16.to_be(),
        proto: 6,
        dir: DIR_OUT,
        pad: 0,
    }
}

fn in_key(pport: u16) -> BpfFlowKey {
    BpfFlowKey {
        src: ne(SERVER),
        dst: ne(PUBLIC),
        sport: 443u16.to_be(),
        dport: pport.to_be(),
        proto: 6,
        dir: DIR_IN,
        pad: 0,
    }
}

/// Checks `got` (an IPv4 packet the program sent) is a valid TCP segment from `src:sport` to
/// `dst:dport` with `flags`, TTL 63 (decremented once).
fn check_tcp(got: &[u8], src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8) {
    assert_eq!(got[12..16], src.0, "source address");
    assert_eq!(u16::from_be_bytes([got[20], got[21]]), src.1, "source port");
    assert_eq!(got[16..20], dst.0, "destination address");
    assert_eq!(
        u16::from_be_bytes([got[22], got[23]]),
        dst.1,
        "destination port"
    );
    assert_eq!(got[33], flags, "TCP flags");
    assert_eq!(got[8], 63, "TTL decremented as a router does");
    assert_eq!(ip_header_sum(&got[..20]), 0, "IP checksum");
    assert_eq!(tcp_sum(got), 0xffff, "TCP checksum");
}

/// A SYN to a bound stash key is translated by the program: the source becomes the slot's
/// public address and the ring's ports in order, both flow-map entries are installed with the
/// slot's interfaces and counters and the packet's time, an EV_OPENED record tells the engine,
/// and the flow's SYN-ACK comes back through the established path. An empty ring, a 5-tuple
/// already in the map and an unbound key pass the SYN up without popping; `reset` gives back
/// what was never taken; `bind` refuses a slot with ports queued.
#[test]
fn i17_a_syn_to_a_stash_is_opened_and_translated_by_the_kernel() {
    require_root!();
    in_private_netns(|| {
        topology();
        let mut gw = Gw::load(&fp_config());
        let net = Capture::open("net-b");
        let vm = Capture::open("vm-b");
        let params = gw.params();
        gw.stash.bind(SLOT, key(), params).expect("bind");
        assert_eq!(gw.stash.push(SLOT, &be(&[2000, 2001, 2002])), 3);
        assert_eq!((gw.stash.queued(SLOT), gw.stash.taken(SLOT)), (3, 0));

        let t0 = monotonic_ns();
        gw.out(5000, TCPF_SYN);
        let t1 = monotonic_ns();
        let got = net
            .next_tcp()
            .unwrap_or_else(|| panic!("nothing towards the server; stats {:?}", gw.stats()));
        check_tcp(&got, (PUBLIC, 2000), (SERVER, 443), TCPF_SYN);
        assert_eq!((gw.stat("stash_opened"), gw.stat("translated_out")), (1, 1));
        assert_eq!((gw.stat("control"), gw.stat("stash_empty")), (0, 0));
        assert_eq!((gw.stash.queued(SLOT), gw.stash.taken(SLOT)), (2, 1));

        // The record.
        let ev = gw.drain();
        assert_eq!(ev.len(), 1, "{ev:?}");
        let e = ev[0];
        assert_eq!((e.kind, e.flags, e.dir), (EV_OPENED, TCPF_SYN, DIR_OUT));
        assert_eq!((e.src, e.sport), (ne(VM), 5000u16.to_be()));
        assert_eq!((e.dst, e.dport), (ne(SERVER), 443u16.to_be()));
        assert_eq!((e.public, e.pport), (ne(PUBLIC), 2000u16.to_be()));
        assert_eq!((e.pad1, e.pad2), (0, 0));
        assert!(
            e.ts >= t0 && e.ts <= t1,
            "kernel time {} in [{t0}, {t1}]",
            e.ts
        );

        // Both entries, with the slot's interfaces and counters and the packet's time.
        assert_eq!(
            gw.map.get(&out_key(5000)),
            Some(BpfFlowVal {
                addr: ne(PUBLIC),
                port: 2000u16.to_be(),
                pad: 0,
                ifindex: gw.net_if,
                counter: params.counter_out,
                last_seen: e.ts,
            })
        );
        assert_eq!(
            gw.map.get(&in_key(2000)),
            Some(BpfFlowVal {
                addr: ne(VM),
                port: 5000u16.to_be(),
                pad: 0,
                ifindex: gw.vm_if,
                counter: params.counter_in,
                last_seen: e.ts,
            })
        );
        assert_eq!(gw.map.len(), 2);

        // The SYN-ACK: translated by the established path, to the instance.
        gw.inb(2000, TCPF_SYN | TCPF_ACK);
        let got = vm
            .next_tcp()
            .unwrap_or_else(|| panic!("nothing towards the instance; stats {:?}", gw.stats()));
        check_tcp(&got, (SERVER, 443), (VM, 5000), TCPF_SYN | TCPF_ACK);
        assert_eq!(gw.stat("translated_in"), 1);
        let c = gw.counters.instance_counters(4);
        assert_eq!(
            (
                c[params.counter_out as usize],
                c[params.counter_in as usize]
            ),
            (1, 1),
            "the slot's per-instance counters"
        );

        // The next SYNs take the next ports, in order.
        for (sport, pport) in [(5001, 2001), (5002, 2002)] {
            gw.out(sport, TCPF_SYN);
            let got = net.next_tcp().expect("translated");
            check_tcp(&got, (PUBLIC, pport), (SERVER, 443), TCPF_SYN);
            let ev = gw.drain();
            assert_eq!(ev.len(), 1);
            assert_eq!(
                (ev[0].kind, ev[0].sport, ev[0].pport),
                (EV_OPENED, sport.to_be(), pport.to_be())
            );
        }
        assert_eq!((gw.stash.queued(SLOT), gw.stash.taken(SLOT)), (0, 3));

        // Empty: up (control), counted, nothing popped, no record.
        gw.out(5003, TCPF_SYN);
        assert!(net.next_tcp().is_none(), "an empty stash opens nothing");
        assert_eq!((gw.stat("stash_empty"), gw.stat("control")), (1, 1));
        assert!(gw.drain().is_empty(), "the reserved record was discarded");
        assert_eq!(gw.stash.taken(SLOT), 3);
        assert!(gw.map.get(&out_key(5003)).is_none());

        // A 5-tuple already in the map (a retransmitted SYN, or the client reusing it): up
        // without popping (R3.1).
        assert_eq!(gw.stash.push(SLOT, &be(&[2003])), 1);
        gw.out(5000, TCPF_SYN);
        assert!(net.next_tcp().is_none());
        assert_eq!(gw.stat("control"), 2);
        assert_eq!((gw.stash.queued(SLOT), gw.stash.taken(SLOT)), (1, 3));
        assert!(gw.drain().is_empty());

        // bind refuses a slot with ports queued.
        assert!(gw.stash.bind(SLOT, key(), params).is_err());
        assert!(gw.stash.bind(gw.stash.slots(), key(), params).is_err());

        // Unbound: no more pops; reset gives back what was never taken.
        gw.stash.unbind(key()).expect("unbind");
        gw.stash
            .unbind(key())
            .expect("unbinding an absent key is fine");
        gw.out(5004, TCPF_SYN);
        assert!(net.next_tcp().is_none());
        assert_eq!(gw.stat("control"), 3);
        assert_eq!(gw.stash.taken(SLOT), 3);
        assert!(gw.drain().is_empty());
        assert_eq!(gw.stash.reset(SLOT), be(&[2003]));
        // The reset claimed the untaken port with the program's own swap: cons moved past it.
        assert_eq!((gw.stash.queued(SLOT), gw.stash.taken(SLOT)), (0, 4));
        assert_eq!(gw.stat("stash_opened"), 3);

        // Bound again (the ring empty now), wrapping around the ring's end.
        gw.stash.bind(SLOT, key(), params).expect("bind again");
        assert_eq!(gw.stash.push(SLOT, &be(&[2100; 80])), STASH_PORTS as usize);
        assert_eq!(gw.stash.push(SLOT, &be(&[2101])), 0, "the ring is full");
        assert_eq!(gw.stash.clear(), 1);
        assert_eq!(gw.stash.queued(SLOT), 0);
        drop(gw);
    });
}

/// The EVENTS ring full (a one-page ring filled with FIN records, never drained): a stash's SYN
/// goes up (`event_full`) without popping, so no port is taken that could not be reported;
/// once the ring is drained, the next one is opened.
#[test]
fn i17_with_the_events_ring_full_a_syn_goes_up_without_popping() {
    require_root!();
    in_private_netns(|| {
        topology();
        let cfg = FastPathConfig {
            event_ring_bytes: 4096,
            ..fp_config()
        };
        let mut gw = Gw::load(&cfg);
        // An established flow whose FINs fill the ring.
        let (k, v) = (
            out_key(6000),
            BpfFlowVal {
                addr: ne(PUBLIC),
                port: 1024u16.to_be(),
                ifindex: gw.net_if,
                ..Default::default()
            },
        );
        gw.map.insert(&k, &v).expect("insert");
        let mut fins = 0;
        while gw.stat("event_full") == 0 {
            assert!(fins < 1000, "the ring never filled; stats {:?}", gw.stats());
            gw.out(6000, TCPF_FIN | TCPF_ACK);
            fins += 1;
        }
        let params = gw.params();
        gw.stash.bind(SLOT, key(), params).expect("bind");
        gw.stash.push(SLOT, &be(&[2000]));
        let net = Capture::open("net-b");
        gw.out(5000, TCPF_SYN);
        assert!(net.next_tcp().is_none(), "not opened");
        assert_eq!(gw.stat("event_full"), 2);
        assert_eq!(gw.stat("stash_opened"), 0);
        assert_eq!(
            (gw.stash.queued(SLOT), gw.stash.taken(SLOT)),
            (1, 0),
            "nothing popped"
        );
        assert!(gw.map.get(&out_key(5000)).is_none());

        // Drained: every record a FIN's; the next SYN is opened.
        let ev = gw.drain();
        assert_eq!(ev.len() as u64, fins - 1, "one record per FIN translated");
        assert!(ev
            .iter()
            .all(|e| e.kind == EV_TCP && e.flags & TCPF_FIN != 0));
        gw.out(5000, TCPF_SYN);
        let got = net.next_tcp().expect("opened once the ring has room");
        check_tcp(&got, (PUBLIC, 2000), (SERVER, 443), TCPF_SYN);
        assert_eq!((gw.stash.queued(SLOT), gw.stash.taken(SLOT)), (0, 1));
        let ev = gw.drain();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, EV_OPENED);
        drop(gw);
    });
}

/// A port the engine stashed but that is in use after all (an inbound entry for the server's
/// packets to public:port exists): the program pops it, installs nothing, reports it back as
/// EV_RETURNED (the stash key, sport 0) and passes the SYN up; the entry in the way is left
/// alone. The next SYN takes the next port.
#[test]
fn i17_a_popped_port_in_use_is_returned_and_the_syn_goes_up() {
    require_root!();
    in_private_netns(|| {
        topology();
        let mut gw = Gw::load(&fp_config());
        let other = BpfFlowVal {
            addr: ne([10, 0, 3, 99]),
            port: 7000u16.to_be(),
            ifindex: gw.vm_if,
            counter: 9,
            ..Default::default()
        };
        gw.map.insert(&in_key(2000), &other).expect("insert");
        let params = gw.params();
        gw.stash.bind(SLOT, key(), params).expect("bind");
        gw.stash.push(SLOT, &be(&[2000, 2001]));
        let net = Capture::open("net-b");

        let t0 = monotonic_ns();
        gw.out(5000, TCPF_SYN);
        let t1 = monotonic_ns();
        assert!(net.next_tcp().is_none(), "the SYN went up");
        assert_eq!(
            (gw.stat("stash_returned"), gw.stat("control")),
            (1, 1),
            "{:?}",
            gw.stats()
        );
        assert_eq!(gw.stat("stash_opened"), 0);
        assert_eq!((gw.stash.queued(SLOT), gw.stash.taken(SLOT)), (1, 1));
        let ev = gw.drain();
        assert_eq!(ev.len(), 1, "{ev:?}");
        let e = ev[0];
        assert_eq!((e.kind, e.flags, e.dir), (EV_RETURNED, TCPF_SYN, DIR_OUT));
        assert_eq!((e.pport, e.public), (2000u16.to_be(), ne(PUBLIC)));
        assert_eq!(
            (e.src, e.sport, e.dst, e.dport),
            (ne(VM), 0, ne(SERVER), 443u16.to_be())
        );
        assert!(e.ts >= t0 && e.ts <= t1);
        assert_eq!(
            gw.map.get(&in_key(2000)),
            Some(other),
            "the entry in the way is untouched"
        );
        assert!(gw.map.get(&out_key(5000)).is_none(), "nothing installed");
        assert_eq!(gw.map.len(), 1);

        gw.out(5000, TCPF_SYN);
        let got = net.next_tcp().expect("opened with the next port");
        check_tcp(&got, (PUBLIC, 2001), (SERVER, 443), TCPF_SYN);
        let ev = gw.drain();
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].kind, ev[0].pport), (EV_OPENED, 2001u16.to_be()));
        drop(gw);
    });
}

/// Ports pushed while the program pops (two threads sending 2000 SYNs of distinct source ports,
/// the test refilling the 64-port ring as it empties): the ports taken are exactly the first
/// `taken` pushed, each once, each in exactly one EV_OPENED record (as many as `taken`), and
/// `reset` returns exactly the rest. SYNs that found the ring empty went up.
#[test]
fn i17_ports_pushed_while_the_program_pops_are_each_taken_once() {
    const PER_THREAD: u16 = 1000;
    require_root!();
    in_private_netns(|| {
        topology();
        let cfg = FastPathConfig {
            max_flows: 4096,
            ..fp_config()
        };
        let mut gw = Gw::load(&cfg);
        let params = gw.params();
        let to_fp = gw.fp.public_ifindex;
        gw.stash.bind(SLOT, key(), params).expect("bind");
        // Senders keep at most a few SYNs ahead of the ports pushed, so the ring is refilled
        // while the program pops from it rather than run dry (a SYN that finds it empty goes
        // up: allowed, counted).
        let pushed_n = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicUsize::new(0));
        let senders: Vec<_> = [10_000u16, 20_000]
            .into_iter()
            .map(|base| {
                let (pushed_n, sent) = (pushed_n.clone(), sent.clone());
                std::thread::spawn(move || {
                    // One socket for all: closing a packet socket waits for an RCU grace
                    // period, some 10 ms.
                    let tx = Sender::open(to_fp);
                    for i in 0..PER_THREAD {
                        while sent.load(Ordering::Acquire) >= pushed_n.load(Ordering::Acquire) + 8 {
                            std::thread::yield_now();
                        }
                        sent.fetch_add(1, Ordering::AcqRel);
                        tx.send(&tcp_frame(VM, base + i, SERVER, 443, TCPF_SYN));
                    }
                })
            })
            .collect();
        let pushed: Vec<u16> = (30_000..30_000 + 2 * PER_THREAD + 200).collect();
        let mut next = 0;
        let mut ev = Vec::new();
        while senders.iter().any(|s| !s.is_finished()) {
            let room = (STASH_PORTS - gw.stash.queued(SLOT)) as usize;
            let end = (next + room).min(pushed.len());
            next += gw.stash.push(SLOT, &be(&pushed[next..end]));
            pushed_n.store(next, Ordering::Release);
            gw.events.drain(&mut ev);
            std::thread::yield_now();
        }
        for s in senders {
            s.join().expect("sender");
        }
        gw.events.drain(&mut ev);

        let taken = gw.stash.taken(SLOT) as usize;
        let opened: Vec<&BpfTcpEvent> = ev.iter().filter(|e| e.kind == EV_OPENED).collect();
        assert_eq!(opened.len(), ev.len(), "only EV_OPENED records: {ev:?}");
        assert_eq!(opened.len(), taken, "one record per port taken");
        assert_eq!(gw.stat("stash_opened") as usize, taken);
        assert_eq!(
            taken as u64 + gw.stat("stash_empty"),
            2 * u64::from(PER_THREAD),
            "every SYN opened or found the ring empty; stats {:?}",
            gw.stats()
        );
        assert_eq!(gw.stat("control"), gw.stat("stash_empty"));
        eprintln!(
            "{taken} SYNs opened, {} found the ring empty, {next} ports pushed",
            gw.stat("stash_empty")
        );
        assert!(
            taken > usize::from(PER_THREAD),
            "most SYNs found a port ({taken})"
        );
        // Each port pushed taken once: the first `taken` of the ring (records of pops on
        // different CPUs may come in either order: each reserves its record before popping).
        let mut got: Vec<u16> = opened.iter().map(|e| u16::from_be(e.pport)).collect();
        got.sort_unstable();
        let first_bad = got.iter().zip(&pushed).position(|(g, p)| g != p);
        assert!(
            first_bad.is_none(),
            "ports taken are not the first {taken} pushed, each once: at {first_bad:?}, {:?}",
            first_bad.map(|i| &got[i.saturating_sub(2)..(i + 3).min(got.len())])
        );
        let mut sports: Vec<u16> = opened.iter().map(|e| u16::from_be(e.sport)).collect();
        sports.sort_unstable();
        sports.dedup();
        assert_eq!(sports.len(), taken, "one flow per SYN");
        assert_eq!(gw.map.len(), 2 * taken, "two entries per flow");
        // The rest is returned by reset (after unbind; nothing pops now).
        gw.stash.unbind(key()).expect("unbind");
        let rest: Vec<u16> = gw.stash.reset(SLOT).into_iter().map(u16::from_be).collect();
        assert_eq!(rest, pushed[taken..next]);
        drop(gw);
    });
}

/// A bpffs mounted on a temporary directory, unmounted (and the pins with it) on drop.
struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    fn mount() -> Bpffs {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mounting a bpffs");
        Bpffs { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("snatgw")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = snatgw_io::pin::remove_all(&self.root());
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The stashes are pinned with the other maps: a restarted gateway maps the same slots (its
/// keys and queued ports are there, and the program kept serving them meanwhile), and `clear`
/// empties them (what the runtime does at start), after which a SYN goes up.
#[test]
fn i17_stashes_are_pinned_and_a_restart_clears_them() {
    require_root!();
    let fs = Bpffs::mount();
    let root = fs.root();
    in_private_netns(move || {
        topology();
        let cfg = FastPathConfig {
            pin_dir: Some(root.clone()),
            ..fp_config()
        };
        let mut gw = Gw::load(&cfg);
        let params = gw.params();
        gw.stash.bind(SLOT, key(), params).expect("bind");
        gw.stash.push(SLOT, &be(&[2000, 2001, 2002]));
        drop(gw);
        for m in ["STASH", "STASH_KEYS"] {
            assert!(
                root.join(snatgw_io::pin::ABI_TAG).join(m).exists(),
                "{m} pinned"
            );
        }

        // No gateway: the pinned program still opens flows from the stash.
        let net = Capture::open("net-b");
        send_frame(
            snatgw_io::fastpath::ifindex("fp-b").expect("fp-b"),
            &tcp_frame(VM, 5000, SERVER, 443, TCPF_SYN),
        );
        let got = net.next_tcp().expect("opened while no gateway runs");
        check_tcp(&got, (PUBLIC, 2000), (SERVER, 443), TCPF_SYN);

        // The restart finds the slot as it was left, and the record of that flow.
        let mut gw = Gw::load(&cfg);
        assert!(gw.fp.reused);
        assert_eq!((gw.stash.queued(SLOT), gw.stash.taken(SLOT)), (2, 1));
        let ev = gw.drain();
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].kind, ev[0].pport), (EV_OPENED, 2000u16.to_be()));
        assert_eq!(gw.stash.clear(), 1, "one key");
        assert_eq!(gw.stash.queued(SLOT), 0);
        gw.out(5001, TCPF_SYN);
        assert!(net.next_tcp().is_none());
        // The clear claimed the two queued ports (cons 1 -> 3); the SYN took none.
        assert_eq!(gw.stash.taken(SLOT), 3);
        let Gw { fp, .. } = gw;
        fp.detach().expect("detach");
    });
}
