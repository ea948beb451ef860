//! Translation on real bytes: a test per rule (R1.1 ESP/ICMP on ILPIP, R3.6 inner-header
//! rewrite), fragments, malformed input, and the out-and-back property.

use proptest::prelude::*;
use snatgw_core::{Direction, DropReason, Verdict};
use snatgw_dataplane::fuzzing::gateway;
use snatgw_dataplane::Gateway;
use snatgw_wire::testutil::*;
use snatgw_wire::{parse, PROTO_TCP, PROTO_UDP};

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<std::net::Ipv4Addr>().expect("addr"))
}

const PAT_VM: &str = "10.0.3.10"; // vm-as1, default SNAT 192.0.2.100
const ILPIP_VM: &str = "10.0.1.10"; // vm-ilpip, 203.0.113.10
const REMOTE: &str = "198.51.100.7";

fn spec(src: u32, dst: u32) -> Ipv4Spec {
    Ipv4Spec {
        src,
        dst,
        ..Ipv4Spec::default()
    }
}

fn translate(g: &mut Gateway, now: u32, pkt: &mut [u8], dir: Direction) -> (u32, u16) {
    match g.process(now, pkt, dir) {
        Verdict::Translate { addr, port } => {
            verify_checksums(pkt).expect("checksums valid after rewrite");
            (addr, port)
        }
        v => panic!("expected translation, got {v:?}"),
    }
}

#[test]
fn r1_1_ilpip_translates_esp_and_icmp_echo_both_ways() {
    let mut g = gateway();
    let (vm, pubip, remote) = (ip(ILPIP_VM), ip("203.0.113.10"), ip(REMOTE));
    let mut esp = build_esp(&spec(vm, remote), 0x1234, 7, &[9; 40]);
    translate(&mut g, 1, &mut esp, Direction::Outbound);
    assert_eq!(esp, build_esp(&spec(pubip, remote), 0x1234, 7, &[9; 40]));
    let mut esp_in = build_esp(&spec(remote, pubip), 0x99, 1, &[1; 16]);
    translate(&mut g, 1, &mut esp_in, Direction::Inbound);
    assert_eq!(esp_in, build_esp(&spec(remote, vm), 0x99, 1, &[1; 16]));
    let mut ping = build_icmp_echo(&spec(vm, remote), true, 77, 1, b"ping");
    translate(&mut g, 1, &mut ping, Direction::Outbound);
    assert_eq!(
        ping,
        build_icmp_echo(&spec(pubip, remote), true, 77, 1, b"ping"),
        "identifier kept (no PAT)"
    );
    let mut pong = build_icmp_echo(&spec(remote, pubip), false, 77, 1, b"ping");
    translate(&mut g, 1, &mut pong, Direction::Inbound);
    assert_eq!(
        pong,
        build_icmp_echo(&spec(remote, vm), false, 77, 1, b"ping")
    );
}

#[test]
fn r3_6_icmp_echo_through_pat_is_dropped_and_counted() {
    let mut g = gateway();
    let mut ping = build_icmp_echo(&spec(ip(PAT_VM), ip(REMOTE)), true, 5, 1, b"x");
    assert_eq!(
        g.process(1, &mut ping, Direction::Outbound),
        Verdict::Drop(DropReason::IcmpEchoViaPat)
    );
    assert_eq!(g.stats().drops[DropReason::IcmpEchoViaPat as usize], 1);
}

/// The instance sends `original`; the internet answers with an ICMP error built by `error`
/// from the translated packet; after the gateway, the error must be byte-identical to the one
/// the remote would have sent had there been no NAT.
fn check_icmp_error(original: Vec<u8>, error: impl Fn(&Ipv4Spec, &[u8]) -> Vec<u8>) {
    let mut g = gateway();
    let (vm, remote) = (ip(PAT_VM), ip(REMOTE));
    let mut out = original.clone();
    let (pubip, _) = translate(&mut g, 1, &mut out, Direction::Outbound);
    let mut err = error(&spec(remote, pubip), &out);
    translate(&mut g, 2, &mut err, Direction::Inbound);
    assert_eq!(
        err,
        error(&spec(remote, vm), &original),
        "outer destination and quoted packet restored"
    );
    assert_eq!(g.stats().icmp_errors, 1);
}

#[test]
fn r3_6_port_unreachable_reaches_the_instance_with_its_own_header_quoted() {
    let (vm, remote) = (ip(PAT_VM), ip(REMOTE));
    check_icmp_error(udp(vm, 5353, remote, 9, b"hello"), |s, o| {
        build_icmp_dest_unreachable(s, 3, o, 28)
    });
    // A router may quote the whole packet (RFC 1812): the inner UDP checksum is restored too.
    check_icmp_error(udp(vm, 5354, remote, 9, b"hello world"), |s, o| {
        build_icmp_dest_unreachable(s, 3, o, 576)
    });
}

#[test]
fn r3_6_fragmentation_needed_reaches_the_instance_so_pmtud_works() {
    let (vm, remote) = (ip(PAT_VM), ip(REMOTE));
    check_icmp_error(tcp_syn(vm, 40000, remote, 443), |s, o| {
        build_icmp_frag_needed(s, 1280, o, 28)
    });
    check_icmp_error(tcp_syn(vm, 40001, remote, 443), |s, o| {
        build_icmp_frag_needed(s, 1400, o, 60)
    });
    check_icmp_error(udp(vm, 4000, remote, 53, &[0; 100]), |s, o| {
        build_icmp_time_exceeded(s, o, 28)
    });
}

#[test]
fn r3_6_icmp_error_with_no_flow_is_dropped() {
    let mut g = gateway();
    let (vm_pub, remote) = (ip("192.0.2.100"), ip(REMOTE));
    let quoted = udp(vm_pub, 1024, remote, 9, b"x");
    let mut err = build_icmp_dest_unreachable(&spec(remote, vm_pub), 3, &quoted, 28);
    assert_eq!(
        g.process(1, &mut err, Direction::Inbound),
        Verdict::Drop(DropReason::IcmpErrorNoFlow)
    );
}

#[test]
fn r3_6_instance_icmp_error_about_inbound_traffic_leaves_translated() {
    // Someone sends UDP to the ILPIP's closed port; the instance answers port unreachable.
    let mut g = gateway();
    let (vm, pubip, remote) = (ip(ILPIP_VM), ip("203.0.113.10"), ip(REMOTE));
    let mut inbound = udp(remote, 5000, pubip, 9999, b"knock");
    translate(&mut g, 1, &mut inbound, Direction::Inbound);
    let mut err = build_icmp_dest_unreachable(&spec(vm, remote), 3, &inbound, 28);
    translate(&mut g, 1, &mut err, Direction::Outbound);
    let original = udp(remote, 5000, pubip, 9999, b"knock");
    assert_eq!(
        err,
        build_icmp_dest_unreachable(&spec(pubip, remote), 3, &original, 28)
    );
}

#[test]
fn fragments_follow_their_first_fragment_and_strays_are_dropped() {
    let mut g = gateway();
    let (vm, remote) = (ip(PAT_VM), ip(REMOTE));
    let big = udp(vm, 6000, remote, 53, &[7u8; 3000]);
    let frags = fragment(&big, 1000);
    assert!(frags.len() >= 3);
    // A later fragment before the first: nothing known, dropped (never leaks a private source).
    let mut early = frags[1].clone();
    assert_eq!(
        g.process(1, &mut early, Direction::Outbound),
        Verdict::Drop(DropReason::FragmentUnmatched)
    );
    let mut first = frags[0].clone();
    let (pubip, pport) = translate(&mut g, 1, &mut first, Direction::Outbound);
    for f in &frags[1..] {
        let mut f = f.clone();
        assert_eq!(
            g.process(2, &mut f, Direction::Outbound),
            Verdict::Translate {
                addr: pubip,
                port: 0
            }
        );
        let s = parse(&f).expect("parse");
        assert_eq!(s.src, pubip);
        verify_checksums(&f).expect("ip header checksum");
    }
    // The reply comes back fragmented too.
    let reply = udp(remote, 53, pubip, pport, &[8u8; 2500]);
    let rf = fragment(&reply, 1000);
    for (i, f) in rf.iter().enumerate() {
        let mut f = f.clone();
        assert!(
            matches!(g.process(3, &mut f, Direction::Inbound), Verdict::Translate { addr, .. } if addr == vm),
            "fragment {i}"
        );
    }
    // 30 s after the first fragment, stragglers are dropped.
    let mut late = frags[2].clone();
    assert_eq!(
        g.process(31, &mut late, Direction::Outbound),
        Verdict::Drop(DropReason::FragmentUnmatched)
    );
    assert_eq!(g.stats().drops[DropReason::FragmentUnmatched as usize], 2);
}

#[test]
fn malformed_packets_are_dropped_with_a_reason() {
    let mut g = gateway();
    for bad in [&[][..], &[0x45, 0, 0][..], &[0x60; 40][..]] {
        let mut b = bad.to_vec();
        assert_eq!(
            g.process(1, &mut b, Direction::Outbound),
            Verdict::Drop(DropReason::Malformed)
        );
    }
    let mut truncated = tcp_syn(ip(PAT_VM), 1, ip(REMOTE), 2);
    truncated.truncate(30);
    truncated[2..4].copy_from_slice(&30u16.to_be_bytes());
    assert_eq!(
        g.process(1, &mut truncated, Direction::Outbound),
        Verdict::Drop(DropReason::Malformed)
    );
    assert_eq!(g.stats().drops[DropReason::Malformed as usize], 4);
    assert_eq!(g.stats().malformed.values().sum::<u64>(), 4);
}

#[test]
fn r9_1_direction_is_the_side_not_the_address() {
    let mut g = gateway();
    // From the public side with a VNet source: spoofed, dropped, no flow (R9.1).
    let mut spoof = tcp_syn(ip(PAT_VM), 40000, ip(REMOTE), 80);
    assert_eq!(
        g.process(1, &mut spoof, Direction::Inbound),
        Verdict::Drop(DropReason::VnetSourceFromPublic)
    );
    let mut spoof_udp = udp(ip("10.0.9.9"), 53, ip("192.0.2.100"), 1024, b"x");
    assert_eq!(
        g.process(1, &mut spoof_udp, Direction::Inbound),
        Verdict::Drop(DropReason::VnetSourceFromPublic)
    );
    assert_eq!(g.engine().live_flows(), 0);
    assert_eq!(
        g.stats().drops[DropReason::VnetSourceFromPublic as usize],
        2
    );
    // From the private side with a source that is no instance: dropped, no flow, even
    // towards a VNet destination (R9.1; R1.7 passes only an instance's traffic).
    let mut stranger = udp(ip(REMOTE), 1, ip("198.51.100.9"), 2, b"");
    assert_eq!(
        g.process(1, &mut stranger, Direction::Outbound),
        Verdict::Drop(DropReason::UnknownSource)
    );
    let mut stranger_vnet = udp(ip("10.0.9.9"), 1, ip(PAT_VM), 2, b"");
    assert_eq!(
        g.process(1, &mut stranger_vnet, Direction::Outbound),
        Verdict::Drop(DropReason::UnknownSource)
    );
    assert_eq!(g.engine().live_flows(), 0);
    // The same instance packet from the private side creates its flow.
    let mut ok = tcp_syn(ip(PAT_VM), 40000, ip(REMOTE), 80);
    assert!(matches!(
        g.process(1, &mut ok, Direction::Outbound),
        Verdict::Translate { .. }
    ));
    assert_eq!(g.engine().live_flows(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    /// Incremental checksums equal a full recomputation (the expected packets are built from
    /// scratch), and translating out and back yields the original packet.
    #[test]
    fn out_and_back_yields_the_original(tcp in any::<bool>(), sport in 1u16.., dport in 1u16.., payload in prop::collection::vec(any::<u8>(), 0..300), opts in prop::collection::vec(any::<u8>(), 0..10), ident in any::<u16>()) {
        let mut g = gateway();
        let (vm, remote) = (ip(PAT_VM), ip(REMOTE));
        let mut options = opts;
        options.resize(options.len().div_ceil(4) * 4, 1); // NOPs, padded
        let sp = |src, dst| Ipv4Spec { src, dst, ident, options: options.clone(), ..Ipv4Spec::default() };
        let build = |src, sport, dst, dport, syn: bool| if tcp {
            build_tcp(&sp(src, dst), &TcpSpec { src_port: sport, dst_port: dport, flags: if syn { 0x02 } else { 0x10 }, ..TcpSpec::default() }, &payload)
        } else {
            build_udp(&sp(src, dst), sport, dport, &payload)
        };
        let mut out = build(vm, sport, remote, dport, true);
        let (pubip, pport) = translate(&mut g, 1, &mut out, Direction::Outbound);
        prop_assert_eq!(&out, &build(pubip, pport, remote, dport, true), "outbound = full recomputation");
        let mut back = build(remote, dport, pubip, pport, false);
        translate(&mut g, 2, &mut back, Direction::Inbound);
        prop_assert_eq!(&back, &build(remote, dport, vm, sport, false), "inbound restores the private side");
        let s = parse(&back).expect("parse");
        prop_assert!(s.proto == PROTO_TCP || s.proto == PROTO_UDP);
    }

    /// No input panics the gateway, in either direction, whatever it is.
    #[test]
    fn no_input_panics(data in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut g = gateway();
        let mut now = 0;
        snatgw_dataplane::fuzzing::run_one(&mut g, &mut now, &data);
    }
}

#[test]
fn r5_1_inbound_lb_flow_is_rewritten_to_the_member_and_back_on_real_bytes() {
    let cfg = snatgw_dataplane::fuzzing::CONFIG.replace(
        "frontend_port = 80, backend_pool = \"web\", backend_port = 80 }",
        "frontend_port = 80, backend_pool = \"web\", backend_port = 8080 }",
    );
    assert_ne!(
        cfg,
        snatgw_dataplane::fuzzing::CONFIG,
        "the reference rule changed"
    );
    let topo = snatgw_core::Topology::from_toml(&cfg).expect("config");
    let mut g = Gateway::new(snatgw_core::Engine::new(topo, 0).expect("engine"));
    let (client, fe) = (ip("198.51.100.50"), ip("203.0.113.20"));
    let tcp = |sp, dp, flags| TcpSpec {
        src_port: sp,
        dst_port: dp,
        flags,
        ..TcpSpec::default()
    };
    let mut syn = build_tcp(&spec(client, fe), &tcp(40000, 80, 0x02), b"");
    let (member, port) = translate(&mut g, 1, &mut syn, Direction::Inbound);
    assert_eq!(port, 8080);
    assert!(member == ip("10.0.2.10") || member == ip("10.0.2.11"));
    assert_eq!(
        syn,
        build_tcp(&spec(client, member), &tcp(40000, 8080, 0x02), b"")
    );
    let mut ack = build_tcp(&spec(member, client), &tcp(8080, 40000, 0x12), b"hello");
    assert_eq!(
        translate(&mut g, 1, &mut ack, Direction::Outbound),
        (fe, 80)
    );
    assert_eq!(
        ack,
        build_tcp(&spec(fe, client), &tcp(80, 40000, 0x12), b"hello")
    );
}

#[test]
fn r3_6_r5_1_icmp_errors_of_inbound_lb_flows_are_translated_both_ways() {
    let cfg = snatgw_dataplane::fuzzing::CONFIG.replace(
        "frontend_port = 80, backend_pool = \"web\", backend_port = 80 }",
        "frontend_port = 80, backend_pool = \"web\", backend_port = 8080 }",
    );
    let topo = snatgw_core::Topology::from_toml(&cfg).expect("config");
    let mut g = Gateway::new(snatgw_core::Engine::new(topo, 0).expect("engine"));
    let (client, fe, router) = (ip("198.51.100.50"), ip("203.0.113.20"), ip("198.51.100.1"));
    let tcp = |sp, dp, flags| TcpSpec {
        src_port: sp,
        dst_port: dp,
        flags,
        ..TcpSpec::default()
    };
    let client_syn = build_tcp(&spec(client, fe), &tcp(40000, 80, 0x02), b"");
    let mut syn = client_syn.clone();
    let (member, _) = translate(&mut g, 1, &mut syn, Direction::Inbound);
    // The member's answer leaves from the frontend; a router on the way asks for a smaller
    // MTU. After the gateway the error is the one the member would get without NAT: sent to
    // it, quoting its own packet (path MTU discovery works for inbound flows too).
    let answer = build_tcp(&spec(member, client), &tcp(8080, 40000, 0x12), &[7; 100]);
    let mut out = answer.clone();
    assert_eq!(
        translate(&mut g, 2, &mut out, Direction::Outbound),
        (fe, 80)
    );
    let mut err = build_icmp_frag_needed(&spec(router, fe), 1280, &out, 28);
    translate(&mut g, 3, &mut err, Direction::Inbound);
    assert_eq!(
        err,
        build_icmp_frag_needed(&spec(router, member), 1280, &answer, 28)
    );
    // The member refuses the client's segment with an ICMP error: it leaves from the frontend,
    // quoting what the client sent.
    let mut refuse = build_icmp_dest_unreachable(&spec(member, client), 3, &syn, 28);
    translate(&mut g, 4, &mut refuse, Direction::Outbound);
    assert_eq!(
        refuse,
        build_icmp_dest_unreachable(&spec(fe, client), 3, &client_syn, 28)
    );
    assert_eq!(g.stats().icmp_errors, 2);
    // About a client that has no inbound flow: no translation.
    let stray = build_tcp(&spec(fe, ip("198.51.100.60")), &tcp(80, 1, 0x12), b"");
    let mut err = build_icmp_frag_needed(&spec(router, fe), 1280, &stray, 28);
    assert_eq!(
        g.process(5, &mut err, Direction::Inbound),
        Verdict::Drop(DropReason::IcmpErrorNoFlow)
    );
}

/// A fleet node's self-fencing (R10.2, issue #19): with an admission that refuses an
/// instance, its new flows are dropped as `not_owned` and left unchanged (for a fleet node to
/// forward to the owner, R10.3) while its flows opened before keep being translated both ways;
/// other instances and ILPIPs are untouched, and allowing the instance again opens flows
/// again. Inbound, the owner of a public port is the instance whose block holds it (R2.4).
#[test]
fn r10_2_admission_refuses_new_flows_of_unowned_instances_and_keeps_existing_ones() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut g = gateway();
    let (vm, remote) = (ip(PAT_VM), ip(REMOTE));
    let mut buf = [0u8; 2048];
    let mut send = |g: &mut Gateway, pkt: Vec<u8>, dir: Direction| {
        buf[..pkt.len()].copy_from_slice(&pkt);
        let o = g.process_in(1, &mut buf, pkt.len(), dir);
        (o, buf[..pkt.len()].to_vec())
    };
    // A flow opened while the node owned the instance.
    let (o, out) = send(&mut g, tcp_syn(vm, 40000, remote, 443), Direction::Outbound);
    assert!(matches!(o.verdict(), Verdict::Translate { .. }), "{o:?}");
    let out = parse(&out).expect("translated");
    let owned = Arc::new(AtomicBool::new(false));
    let o2 = owned.clone();
    let pat_vm = vm;
    g.set_admission(Some(Arc::new(move |src| {
        src != pat_vm || o2.load(Ordering::SeqCst)
    })));
    // Not owned any more: a new TCP flow and a new UDP flow are refused, bytes untouched...
    let syn = tcp_syn(vm, 40001, remote, 443);
    let (o, bytes) = send(&mut g, syn.clone(), Direction::Outbound);
    assert_eq!(o.verdict(), Verdict::Drop(DropReason::NotOwned));
    assert_eq!(bytes, syn);
    let dgram = udp(vm, 5353, remote, 53, b"q");
    let (o, bytes) = send(&mut g, dgram.clone(), Direction::Outbound);
    assert_eq!(o.verdict(), Verdict::Drop(DropReason::NotOwned));
    assert_eq!(bytes, dgram);
    // ...and so is a mid-flow segment of a flow this node does not know (a flow another node
    // opened): the owner decides it, not this node's R3.1 check.
    let (o, _) = send(
        &mut g,
        tcp_data(vm, 40005, remote, 443, b"x"),
        Direction::Outbound,
    );
    assert_eq!(o.verdict(), Verdict::Drop(DropReason::NotOwned));
    assert_eq!(g.stats().drops[DropReason::NotOwned as usize], 3);
    // Inbound steering's question: whose block holds the flow's public port.
    assert_eq!(
        g.engine().instance_of_public_port(out.src, out.src_port),
        Some(vm)
    );
    assert_eq!(g.engine().instance_of_public_port(out.src, 80), None);
    // ...the existing flow goes on, out and back.
    let (o, _) = send(
        &mut g,
        tcp_data(vm, 40000, remote, 443, b"more"),
        Direction::Outbound,
    );
    assert!(matches!(o.verdict(), Verdict::Translate { .. }), "{o:?}");
    let back = tcp_data(remote, 443, out.src, out.src_port, b"reply");
    let (o, _) = send(&mut g, back, Direction::Inbound);
    assert!(matches!(o.verdict(), Verdict::Translate { .. }), "{o:?}");
    // The ILPIP instance is not fenced by this admission (it allows every other source).
    let (o, _) = send(
        &mut g,
        tcp_syn(ip(ILPIP_VM), 40000, remote, 443),
        Direction::Outbound,
    );
    assert!(matches!(o.verdict(), Verdict::Translate { .. }), "{o:?}");
    // Owned again: new flows open.
    owned.store(true, Ordering::SeqCst);
    let (o, _) = send(&mut g, tcp_syn(vm, 40002, remote, 443), Direction::Outbound);
    assert!(matches!(o.verdict(), Verdict::Translate { .. }), "{o:?}");
    assert_eq!(g.stats().drops[DropReason::NotOwned as usize], 3);
    // No admission: as before.
    g.set_admission(None);
    owned.store(false, Ordering::SeqCst);
    let (o, _) = send(&mut g, tcp_syn(vm, 40003, remote, 443), Direction::Outbound);
    assert!(matches!(o.verdict(), Verdict::Translate { .. }), "{o:?}");
}

/// R10.2 after a hand-over: a node keeps copies of the flows of an instance it handed over
/// (they end on their own timers). A client that reuses such a flow's 5-tuple for a new
/// connection (its SYN lands on the old owner by ECMP) opens a new connection: only the owner
/// may decide it, so the old owner refuses the SYN as `not_owned`, unchanged, for steering
/// (R10.3), while the copy's own segments still translate (found in a CI run: the old owner
/// translated such a SYN 1.3 s after its lease had ended, on a port the owner had given to
/// another flow).
#[test]
fn r10_2_a_syn_reusing_a_kept_flow_is_the_owners_to_decide() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut g = gateway();
    let (vm, remote) = (ip(PAT_VM), ip(REMOTE));
    let mut buf = [0u8; 2048];
    let mut send = |g: &mut Gateway, pkt: Vec<u8>, dir: Direction| {
        buf[..pkt.len()].copy_from_slice(&pkt);
        let o = g.process_in(1, &mut buf, pkt.len(), dir);
        (o, buf[..pkt.len()].to_vec())
    };
    let (o, _) = send(&mut g, tcp_syn(vm, 41000, remote, 443), Direction::Outbound);
    assert!(matches!(o.verdict(), Verdict::Translate { .. }), "{o:?}");
    let owned = Arc::new(AtomicBool::new(false));
    let o2 = owned.clone();
    g.set_admission(Some(Arc::new(move |src| {
        src != vm || o2.load(Ordering::SeqCst)
    })));
    // Handed over: a new connection on the same 5-tuple is refused, bytes untouched.
    let syn = tcp_syn(vm, 41000, remote, 443);
    let (o, bytes) = send(&mut g, syn.clone(), Direction::Outbound);
    assert_eq!(o.verdict(), Verdict::Drop(DropReason::NotOwned));
    assert_eq!(bytes, syn);
    // The kept flow's own segments still go through.
    let (o, _) = send(
        &mut g,
        tcp_data(vm, 41000, remote, 443, b"x"),
        Direction::Outbound,
    );
    assert!(matches!(o.verdict(), Verdict::Translate { .. }), "{o:?}");
    // Owned again: the SYN restarts the flow, as R3.1's reuse does.
    owned.store(true, Ordering::SeqCst);
    let (o, _) = send(&mut g, syn, Direction::Outbound);
    assert!(matches!(o.verdict(), Verdict::Translate { .. }), "{o:?}");
    assert_eq!(g.stats().drops[DropReason::NotOwned as usize], 1);
}
