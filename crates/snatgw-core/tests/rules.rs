//! One test (or more) per SPEC rule of §1–§3; the rule id is in each test's name.

mod common;

use common::*;
use snatgw_core::config::{BackendPoolCfg, FrontendCfg, LoadBalancerCfg, PublicIpCfg};
use snatgw_core::{
    proto, tier_ports, ConfigError, DropReason, Engine, EventKind, Packet, Scenario, Topology,
    Verdict, L4,
};

const SERVER: &str = "198.51.100.7";

fn scenario(e: &Engine, name: &str) -> Scenario {
    e.instance(name).expect("instance").scenario
}

// ---------------------------------------------------------------- §1 which address

#[test]
fn r1_1_ilpip_is_stateless_one_to_one_for_all_protocols() {
    let mut e = reference();
    let (src, pub_) = (ip("10.0.1.10"), ip("203.0.113.10"));
    let dst = ip(SERVER);
    // TCP and UDP keep their ports; ICMP and ESP are translated too.
    assert_eq!(
        out(&mut e, 1, Packet::tcp(src, 40000, dst, 443, SYN)),
        Verdict::Translate {
            addr: pub_,
            port: 40000
        }
    );
    assert_eq!(
        out(&mut e, 1, Packet::udp(src, 5353, dst, 53)),
        Verdict::Translate {
            addr: pub_,
            port: 5353
        }
    );
    assert!(
        matches!(out(&mut e, 1, Packet::other(proto::ICMP, src, dst)), Verdict::Translate { addr, .. } if addr == pub_)
    );
    assert!(
        matches!(out(&mut e, 1, Packet::other(proto::ESP, src, dst)), Verdict::Translate { addr, .. } if addr == pub_)
    );
    // Even a non-SYN passes: stateless, no flow table.
    assert_eq!(
        out(&mut e, 1, Packet::tcp(src, 40001, dst, 443, ACK)),
        Verdict::Translate {
            addr: pub_,
            port: 40001
        }
    );
    assert_eq!(e.live_flows(), 0);
    // Inbound to the ILPIP reaches the instance.
    assert_eq!(
        inb(&mut e, 2, Packet::tcp(dst, 443, pub_, 40000, ACK)),
        Verdict::Translate {
            addr: src,
            port: 40000
        }
    );
    assert!(
        matches!(inb(&mut e, 2, Packet::other(proto::ESP, dst, pub_)), Verdict::Translate { addr, .. } if addr == src)
    );
    let r = e.instance("vm-ilpip").expect("instance");
    assert_eq!(r.allocated, 65535);
    assert_eq!(r.scenario.rule(), "R1.1");
}

#[test]
fn r1_1_ilpip_never_exhausts() {
    let mut e = reference();
    let src = ip("10.0.1.10");
    for port in 1024..=65535u16 {
        assert!(matches!(
            out(&mut e, 1, Packet::tcp(src, port, ip(SERVER), 443, SYN)),
            Verdict::Translate { .. }
        ));
    }
    assert_eq!(
        e.global_stats().drops[DropReason::PortsExhausted as usize],
        0
    );
}

#[test]
fn r1_2_lb_member_with_rule_uses_a_frontend() {
    let mut e = reference();
    let fe = [ip("203.0.113.20"), ip("203.0.113.21")];
    for name in ["vm-lb1", "vm-lb2"] {
        match scenario(&e, name) {
            Scenario::LoadBalanced {
                addr, candidates, ..
            } => {
                assert!(fe.contains(&addr));
                assert_eq!(candidates, 2);
            }
            s => panic!("{name}: {s:?}"),
        }
    }
    let (a, _) = syn(&mut e, 1, ip("10.0.2.10"), 33000, ip(SERVER), 443);
    assert_eq!(a, scenario(&e, "vm-lb1").addr());
}

#[test]
fn r1_2_arm_pool_without_rule_falls_back_to_default_snat() {
    let text = REFERENCE.replace("rules = [", "rules_unused = [");
    let text = text.split("rules_unused").next().expect("cut").to_string();
    let mut e = engine(&text);
    assert!(matches!(
        scenario(&e, "vm-lb1"),
        Scenario::DefaultSnat { .. }
    ));
    let (a, _) = syn(&mut e, 1, ip("10.0.2.10"), 33000, ip(SERVER), 443);
    assert!([ip("192.0.2.100"), ip("192.0.2.101")].contains(&a));
}

#[test]
fn r1_2_classic_pool_needs_no_rule() {
    let e = Engine::new(
        Topology::from_config(classic_config(3, None)).expect("valid"),
        0,
    )
    .expect("engine");
    for i in 0..3 {
        assert_eq!(
            scenario(&e, &format!("role-{i}")).addr(),
            ip("198.51.100.10")
        );
        assert_eq!(scenario(&e, &format!("role-{i}")).rule(), "R1.2");
    }
}

#[test]
fn r1_2_pat_carries_tcp_and_udp_only() {
    let mut e = reference();
    let src = ip("10.0.2.10");
    assert!(matches!(
        out(&mut e, 1, Packet::udp(src, 5000, ip(SERVER), 53)),
        Verdict::Translate { .. }
    ));
    assert_eq!(
        out(&mut e, 1, Packet::other(proto::ESP, src, ip(SERVER))),
        Verdict::Drop(DropReason::ProtocolNotTranslated)
    );
    assert_eq!(
        out(
            &mut e,
            1,
            Packet::icmp(src, ip(SERVER), snatgw_wire::ICMP_ECHO_REQUEST)
        ),
        Verdict::Drop(DropReason::IcmpEchoViaPat)
    );
    assert_eq!(
        out(
            &mut e,
            1,
            Packet::icmp(src, ip(SERVER), snatgw_wire::ICMP_DEST_UNREACHABLE)
        ),
        Verdict::Drop(DropReason::ProtocolNotTranslated)
    );
    let r = e.instance("vm-lb1").expect("instance");
    assert_eq!(r.stats[2].drops[DropReason::IcmpEchoViaPat as usize], 1);
}

#[test]
fn r1_3_default_snat_one_address_per_availability_set_and_deployment() {
    let e = reference();
    let a1 = scenario(&e, "vm-as1").addr();
    assert_eq!(
        a1,
        scenario(&e, "vm-as2").addr(),
        "one IP per availability set"
    );
    assert!(matches!(
        scenario(&e, "vm-as1"),
        Scenario::DefaultSnat { .. }
    ));
    assert_eq!(scenario(&e, "vm-as1").rule(), "R1.3");
    // The web/worker role is alone in its deployment and not load-balanced: default SNAT.
    assert!(matches!(
        scenario(&e, "role-0"),
        Scenario::DefaultSnat { .. }
    ));
    // Designation spreads groups over the operator's pool (least loaded first).
    let pool = [ip("192.0.2.100"), ip("192.0.2.101")];
    for n in ["vm-as1", "vm-alone", "role-0"] {
        assert!(pool.contains(&scenario(&e, n).addr()));
    }
    assert_ne!(
        scenario(&e, "vm-as1").addr(),
        scenario(&e, "vm-alone").addr()
    );
}

#[test]
fn r1_3_instance_outside_a_set_is_its_own_set() {
    let mut c = pool_config(0);
    c.gateway.default_snat_pool = vec!["192.0.2.1".into(), "192.0.2.2".into()];
    c.instance.push(vm(0, None));
    c.instance.push(vm(1, None));
    let e = Engine::new(Topology::from_config(c).expect("valid"), 0).expect("engine");
    let (a, b) = (
        e.instance("vm-0").expect("vm"),
        e.instance("vm-1").expect("vm"),
    );
    assert_ne!(a.scenario.addr(), b.scenario.addr());
    assert_eq!(a.pool_size, 1);
}

#[test]
fn r1_3_empty_default_pool_is_refused() {
    let text = REFERENCE.replace(r#"default_snat_pool = ["192.0.2.100", "192.0.2.101"]"#, "");
    match Topology::from_toml(&text) {
        Err(ConfigError::EmptyDefaultPool { count, .. }) => assert_eq!(count, 4),
        r => panic!("{r:?}"),
    }
}

#[test]
fn r1_4_precedence_is_reevaluated_on_change() {
    let mut e = reference();
    let src = ip("10.0.2.10");
    let (lb_addr, _) = syn(&mut e, 1, src, 33000, ip(SERVER), 443);
    assert_eq!(e.live_flows(), 1);
    // Give vm-lb1 an ILPIP: R1.1 wins over R1.2; its PAT block is reclaimed and its flows dropped.
    let text = REFERENCE.replace(
        "name = \"vm-lb1\"\nprivate_ip = \"10.0.2.10\"",
        "name = \"vm-lb1\"\nprivate_ip = \"10.0.2.10\"\npublic_ip = \"pip-new\"",
    ) + "\n[[public_ip]]\nname = \"pip-new\"\naddress = \"203.0.113.30\"\n";
    let rep = e
        .apply(10, Topology::from_toml(&text).expect("valid"))
        .expect("apply");
    assert_eq!(rep.rescoped, 1);
    assert_eq!(rep.flows_reclaimed, 1);
    assert_eq!(e.live_flows(), 0);
    assert_eq!(
        out(&mut e, 11, Packet::tcp(src, 33000, ip(SERVER), 443, ACK)),
        Verdict::Translate {
            addr: ip("203.0.113.30"),
            port: 33000
        }
    );
    // Old return traffic is not delivered any more.
    assert!(matches!(
        inb(&mut e, 11, Packet::tcp(ip(SERVER), 443, lb_addr, 1024, ACK)),
        Verdict::Drop(_)
    ));
    // And back: without the ILPIP, R1.2 applies again.
    e.apply(20, Topology::from_toml(REFERENCE).expect("valid"))
        .expect("apply");
    assert_eq!(scenario(&e, "vm-lb1").rule(), "R1.2");
    let ev = e.drain_events();
    assert!(ev.iter().any(|x| matches!(
        &x.kind,
        EventKind::PortsReclaimed {
            reason: snatgw_core::ReclaimReason::ScenarioChange,
            flows: 1,
            ..
        }
    )));
}

#[test]
fn r1_4_ilpip_wins_over_load_balancer_at_start() {
    let text = REFERENCE.replace(
        "members = [\"vm-lb1\", \"vm-lb2\"]",
        "members = [\"vm-lb1\", \"vm-lb2\", \"vm-ilpip\"]",
    );
    let e = engine(&text);
    assert_eq!(
        scenario(&e, "vm-ilpip"),
        Scenario::Ilpip {
            addr: ip("203.0.113.10")
        }
    );
}

#[test]
fn r1_5_web_worker_role_cannot_have_ilpip_and_nothing_changes() {
    let mut e = reference();
    syn(&mut e, 1, ip("10.0.4.10"), 40000, ip(SERVER), 80);
    let before = e.instances();
    let text = REFERENCE.replace(
        "deployment = \"cs1\"\nprivate_ip",
        "deployment = \"cs1\"\npublic_ip = \"pip-ilpip\"\nprivate_ip",
    );
    let err = Topology::from_toml(&text).expect_err("must be refused");
    assert!(
        matches!(err, ConfigError::WebWorkerRoleIlpip { ref field } if field == "instance[role-0].public_ip"),
        "{err}"
    );
    assert!(err.to_string().contains("R1.5"));
    assert_eq!(e.instances(), before);
    assert_eq!(e.live_flows(), 1);
}

#[test]
fn r1_6_frontend_choice_is_random_but_reproducible() {
    // 40 instances, two candidate frontends: both get used, and the same seed gives the same choice.
    let mut c = pool_config(0);
    c.public_ip.push(PublicIpCfg {
        name: "a".into(),
        address: "203.0.113.1".into(),
    });
    c.public_ip.push(PublicIpCfg {
        name: "b".into(),
        address: "203.0.113.2".into(),
    });
    let members: Vec<String> = (0..40).map(|i| format!("vm-{i}")).collect();
    for i in 0..40 {
        c.instance.push(vm(i, None));
    }
    c.load_balancer.push(LoadBalancerCfg {
        name: "lb".into(),
        model: Default::default(),
        frontends: vec![
            FrontendCfg {
                name: "a".into(),
                public_ip: "a".into(),
            },
            FrontendCfg {
                name: "b".into(),
                public_ip: "b".into(),
            },
        ],
        backend_pools: vec![BackendPoolCfg {
            name: "p".into(),
            members,
        }],
        rules: vec![lb_rule("r1", "a", "p", 80), lb_rule("r2", "b", "p", 443)],
        probes: vec![],
    });
    let choices = |seed: u64| -> Vec<u32> {
        let mut c = c.clone();
        c.gateway.seed = seed;
        let e = Engine::new(Topology::from_config(c).expect("valid"), 0).expect("engine");
        (0..40)
            .map(|i| scenario(&e, &format!("vm-{i}")).addr())
            .collect()
    };
    let one = choices(1);
    assert_eq!(one, choices(1));
    assert_ne!(one, choices(2));
    let on_a = one.iter().filter(|&&a| a == ip("203.0.113.1")).count();
    assert!((5..=35).contains(&on_a), "{on_a} of 40 on frontend a");
    // Each frontend's pool is the 40 candidates: tier 1-50.
    let e = Engine::new(Topology::from_config(c).expect("valid"), 0).expect("engine");
    assert_eq!(e.instance("vm-0").expect("vm").allocated, 1024);
}

#[test]
fn r1_7_vnet_destinations_are_not_translated() {
    let mut e = reference();
    assert_eq!(
        out(
            &mut e,
            1,
            Packet::tcp(ip("10.0.2.10"), 5000, ip("10.0.3.10"), 22, SYN)
        ),
        Verdict::Pass
    );
    assert_eq!(
        out(
            &mut e,
            1,
            Packet::udp(ip("10.0.1.10"), 5000, ip("10.0.3.10"), 53)
        ),
        Verdict::Pass
    );
    assert_eq!(e.live_flows(), 0);
    assert_eq!(e.global_stats().passed, 2);
}

// ---------------------------------------------------------------- §2 PAT and ports

#[test]
fn r2_1_pat_rewrites_source_and_return_traffic_back() {
    let mut e = reference();
    let (src, dst) = (ip("10.0.3.10"), ip(SERVER));
    let (pa, pp) = syn(&mut e, 1, src, 45000, dst, 443);
    assert_eq!(pa, scenario(&e, "vm-as1").addr());
    assert_eq!(
        inb(&mut e, 1, Packet::tcp(dst, 443, pa, pp, SYN | ACK)),
        Verdict::Translate {
            addr: src,
            port: 45000
        }
    );
    assert_eq!(
        out(&mut e, 2, Packet::tcp(src, 45000, dst, 443, ACK)),
        Verdict::Translate { addr: pa, port: pp }
    );
}

#[test]
fn r2_2_public_five_tuple_belongs_to_one_flow() {
    let mut e = reference();
    // Two instances on the same address (one availability set) to one destination.
    let mut seen = std::collections::HashSet::new();
    for (k, src) in [ip("10.0.3.10"), ip("10.0.3.11")].into_iter().enumerate() {
        for i in 0..300u16 {
            let t = syn(&mut e, 1, src, 20000 + i + k as u16 * 1000, ip(SERVER), 443);
            assert!(seen.insert(t), "public tuple {t:?} reused");
        }
    }
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_3_flows_to_different_destinations_share_a_port() {
    let mut e = reference();
    let src = ip("10.0.3.10");
    let (_, p1) = syn(&mut e, 1, src, 40000, ip("198.51.100.7"), 443);
    let (_, p2) = syn(&mut e, 1, src, 40001, ip("198.51.100.8"), 443);
    let (_, p3) = syn(&mut e, 1, src, 40002, ip("198.51.100.7"), 80);
    assert_eq!(p1, p2);
    assert_eq!(p1, p3);
    assert_eq!(e.instance("vm-as1").expect("vm").used, [1, 0]);
}

#[test]
fn r2_3_flows_to_one_destination_each_take_a_port() {
    let mut e = reference();
    let src = ip("10.0.3.10");
    let ports: std::collections::HashSet<u16> = (0..10)
        .map(|i| syn(&mut e, 1, src, 40000 + i, ip(SERVER), 443).1)
        .collect();
    assert_eq!(ports.len(), 10);
    assert_eq!(e.instance("vm-as1").expect("vm").used, [10, 0]);
}

#[test]
fn r2_3_never_takes_a_new_port_while_a_used_one_is_free_for_the_destination() {
    let mut e = reference();
    let src = ip("10.0.3.10");
    // Five flows to five destinations share one port; then to D1 again: a second port is needed;
    // a flow to D6 must reuse one of the two used ports, not a third.
    for d in 0..5u32 {
        syn(&mut e, 1, src, 40000 + d as u16, ip(SERVER) + d, 443);
    }
    syn(&mut e, 1, src, 41000, ip(SERVER), 443);
    assert_eq!(e.instance("vm-as1").expect("vm").used[0], 2);
    for d in 5..50u32 {
        syn(&mut e, 1, src, 42000 + d as u16, ip(SERVER) + d, 443);
    }
    assert_eq!(e.instance("vm-as1").expect("vm").used[0], 2);
}

#[test]
fn r2_3_port_released_for_a_destination_is_reused_for_it_last() {
    // Decision under R2.3: among free ports, the one released longest ago for the destination.
    let mut c = pool_config(60); // 512 ports each
    c.gateway.fin_timeout_secs = 1;
    let mut e = Engine::new(Topology::from_config(c).expect("valid"), 0).expect("engine");
    let src = private_u32(0);
    let dst = ip(SERVER);
    let mut order = Vec::new();
    // Open and close 600 connections one after another: with 512 ports, every port is used
    // once before any is reused, and reuse follows release order.
    for i in 0..600u32 {
        let t = i * 2;
        let (pa, pp) = syn(&mut e, t, src, 10000 + i as u16, dst, 443);
        out(
            &mut e,
            t,
            Packet::tcp(src, 10000 + i as u16, dst, 443, FIN_ACK),
        );
        inb(&mut e, t, Packet::tcp(dst, 443, pa, pp, FIN_ACK));
        order.push(pp);
    }
    let first: std::collections::HashSet<u16> = order[..512].iter().copied().collect();
    assert_eq!(
        first.len(),
        512,
        "no port handed out twice before all were used"
    );
    assert_eq!(&order[512..600], &order[..88], "reuse in release order");
}

#[test]
fn r2_4_blocks_are_disjoint_and_one_instance_cannot_exhaust_another() {
    let mut e =
        Engine::new(Topology::from_config(pool_config(60)).expect("valid"), 0).expect("engine");
    let mut all = std::collections::HashSet::new();
    for i in 0..60 {
        let r = e.instance(&format!("vm-{i}")).expect("vm");
        assert_eq!(r.allocated, 512);
        for &(lo, hi) in &r.block {
            assert!(lo >= 1024);
            for p in lo..=hi {
                assert!(all.insert(p), "port {p} in two blocks");
            }
        }
    }
    // vm-0 exhausts its ports to one destination; vm-1 is unaffected.
    let dst = ip(SERVER);
    for i in 0..512u16 {
        syn(&mut e, 1, private_u32(0), 2000 + i, dst, 443);
    }
    assert_eq!(
        out(&mut e, 1, Packet::tcp(private_u32(0), 9999, dst, 443, SYN)),
        Verdict::Drop(DropReason::PortsExhausted)
    );
    let (_, p) = syn(&mut e, 1, private_u32(1), 2000, dst, 443);
    let r1 = e.instance("vm-1").expect("vm");
    assert!(r1.block.iter().any(|&(lo, hi)| (lo..=hi).contains(&p)));
    e.check_invariants().expect("invariants");
}

/// R2.4 / R10.3: the chunks a fleet node's kernel steers by are exactly the instances'
/// blocks: every chunk lies in its instance's reported block, and each instance of a pool of
/// 60 has its 512 ports (R2.8) in 16 chunks of 32.
#[test]
fn r2_4_r10_3_pat_chunks_are_the_instances_blocks() {
    let e = Engine::new(Topology::from_config(pool_config(60)).expect("valid"), 0).expect("engine");
    let chunks = e.pat_chunks();
    let mut per: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for &(public, c, private) in &chunks {
        assert_eq!(public, ip("192.0.2.1"));
        *per.entry(private).or_default() += 1;
        let lo = 1024 + 32 * c;
        let i = (0..60)
            .find(|&i| private_u32(i) == private)
            .expect("a pool instance");
        let r = e.instance(&format!("vm-{i}")).expect("vm");
        assert!(
            r.block.iter().any(|&(a, b)| a <= lo && lo + 31 <= b),
            "chunk {c} ({lo}..) outside vm-{i}'s block {:?}",
            r.block
        );
    }
    assert_eq!(per.len(), 60);
    assert!(per.values().all(|&n| n == 512 / 32));
}

#[test]
fn r2_5_tcp_and_udp_ports_are_consumed_separately() {
    let mut e =
        Engine::new(Topology::from_config(pool_config(60)).expect("valid"), 0).expect("engine");
    let (src, dst) = (private_u32(0), ip(SERVER));
    for i in 0..512u16 {
        syn(&mut e, 1, src, 2000 + i, dst, 53);
    }
    assert_eq!(
        out(&mut e, 1, Packet::tcp(src, 9999, dst, 53, SYN)),
        Verdict::Drop(DropReason::PortsExhausted)
    );
    for i in 0..512u16 {
        assert!(matches!(
            out(&mut e, 1, Packet::udp(src, 2000 + i, dst, 53)),
            Verdict::Translate { .. }
        ));
    }
    let r = e.instance("vm-0").expect("vm");
    assert_eq!(r.used, [512, 512]);
    assert_eq!(r.stats[0].conn_fail, 1);
    assert_eq!(r.stats[1].conn_fail, 0);
}

#[test]
fn r2_6_exhaustion_drops_only_the_new_flow_and_records_an_event() {
    let mut e =
        Engine::new(Topology::from_config(pool_config(60)).expect("valid"), 0).expect("engine");
    let (src, dst) = (private_u32(0), ip(SERVER));
    let held: Vec<(u32, u16)> = (0..512u16)
        .map(|i| syn(&mut e, 1, src, 2000 + i, dst, 443))
        .collect();
    assert_eq!(
        out(&mut e, 5, Packet::tcp(src, 9999, dst, 443, SYN)),
        Verdict::Drop(DropReason::PortsExhausted)
    );
    // Nothing else is disturbed: existing flows still translate both ways; other destinations work.
    for (i, &(pa, pp)) in held.iter().enumerate() {
        assert_eq!(
            inb(&mut e, 5, Packet::tcp(dst, 443, pa, pp, ACK)),
            Verdict::Translate {
                addr: src,
                port: 2000 + i as u16
            }
        );
    }
    syn(&mut e, 5, src, 9999, dst, 80);
    let ev = e.drain_events();
    let ex: Vec<_> = ev
        .iter()
        .filter(|x| matches!(x.kind, EventKind::Exhaustion { .. }))
        .collect();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].time, 5);
    match &ex[0].kind {
        EventKind::Exhaustion {
            instance,
            public_ip,
            l4,
            dst: d,
            dst_port,
            allocated,
        } => {
            assert_eq!(&**instance, "vm-0");
            assert_eq!(*public_ip, ip("192.0.2.1"));
            assert_eq!(*l4, L4::Tcp);
            assert_eq!((*d, *dst_port, *allocated), (dst, 443, 512));
        }
        k => panic!("{k:?}"),
    }
    let r = e.instance("vm-0").expect("vm");
    assert_eq!(r.stats[0].conn_fail, 1);
    assert_eq!(r.stats[0].drops[DropReason::PortsExhausted as usize], 1);
}

#[test]
fn r2_7_released_port_lets_the_next_flow_succeed() {
    let mut e =
        Engine::new(Topology::from_config(pool_config(60)).expect("valid"), 0).expect("engine");
    let (src, dst) = (private_u32(0), ip(SERVER));
    let held: Vec<(u32, u16)> = (0..512u16)
        .map(|i| syn(&mut e, 1, src, 2000 + i, dst, 443))
        .collect();
    assert!(matches!(
        out(&mut e, 2, Packet::tcp(src, 9999, dst, 443, SYN)),
        Verdict::Drop(_)
    ));
    let (pa, pp) = held[7];
    inb(&mut e, 3, Packet::tcp(dst, 443, pa, pp, RST));
    // Released 15 s after the RST (R3.3): still exhausted at 17, free at 18.
    assert!(matches!(
        out(&mut e, 17, Packet::tcp(src, 9999, dst, 443, SYN)),
        Verdict::Drop(_)
    ));
    assert_eq!(
        out(&mut e, 18, Packet::tcp(src, 9999, dst, 443, SYN)),
        Verdict::Translate { addr: pa, port: pp }
    );
}

#[test]
fn r2_8_tier_table() {
    for (n, p) in [
        (1, 1024),
        (50, 1024),
        (51, 512),
        (100, 512),
        (101, 256),
        (200, 256),
        (201, 128),
        (400, 128),
        (401, 64),
        (800, 64),
        (801, 32),
        (1000, 32),
    ] {
        assert_eq!(tier_ports(n), p, "pool of {n}");
    }
    for n in [1usize, 50, 51, 100, 101, 200, 201, 400, 401, 800, 801, 1000] {
        let e =
            Engine::new(Topology::from_config(pool_config(n)).expect("valid"), 0).expect("engine");
        let r = e.instance("vm-0").expect("vm");
        assert_eq!(r.allocated, tier_ports(n as u32) as u32, "pool of {n}");
        assert_eq!(r.pool_size, n as u32);
    }
}

#[test]
fn r2_8_pool_of_more_than_1000_is_refused() {
    match Topology::from_config(pool_config(1001)) {
        Err(e @ ConfigError::PoolTooLarge { size: 1001, .. }) => {
            assert!(e.to_string().contains("R2.8"))
        }
        r => panic!("{r:?}"),
    }
    let mut c = classic_config(1001, None);
    c.instance.truncate(1001);
    assert!(matches!(
        Topology::from_config(c),
        Err(ConfigError::PoolTooLarge { .. })
    ));
}

#[test]
fn r2_9_tier_up_reclaims_half_and_drops_flows_on_reclaimed_ports() {
    let mut e =
        Engine::new(Topology::from_config(pool_config(50)).expect("valid"), 0).expect("engine");
    let (src, dst) = (private_u32(0), ip(SERVER));
    let before = e.instance("vm-0").expect("vm");
    assert_eq!(before.allocated, 1024);
    let flows: Vec<(u16, (u32, u16))> = (0..1024u16)
        .map(|i| (2000 + i, syn(&mut e, 1, src, 2000 + i, dst, 443)))
        .collect();
    // The 51st instance joins: tier 51-100, 512 ports each.
    let rep = e
        .apply(10, Topology::from_config(pool_config(51)).expect("valid"))
        .expect("apply");
    let after = e.instance("vm-0").expect("vm");
    assert_eq!(after.allocated, 512);
    assert_eq!(rep.flows_reclaimed, 512);
    let kept = |p: u16| after.block.iter().any(|&(lo, hi)| (lo..=hi).contains(&p));
    let mut alive = 0;
    for &(sport, (pa, pp)) in &flows {
        let v = out(&mut e, 11, Packet::tcp(src, sport, dst, 443, ACK));
        if kept(pp) {
            assert_eq!(v, Verdict::Translate { addr: pa, port: pp });
            alive += 1;
        } else {
            // Reclaimed: the flow is gone and must be re-established.
            assert_eq!(v, Verdict::Drop(DropReason::TcpNotSyn));
        }
    }
    assert_eq!(alive, 512);
    // All 512 ports are in use, so a new flow to the same destination fails; to another one it works.
    assert!(matches!(
        out(&mut e, 12, Packet::tcp(src, 9000, dst, 443, SYN)),
        Verdict::Drop(DropReason::PortsExhausted)
    ));
    syn(&mut e, 12, src, 9000, ip("198.51.100.99"), 443);
    assert!(e.drain_events().iter().any(|x| matches!(
        x.kind,
        EventKind::TierChanged {
            from: 1024,
            to: 512,
            pool_size: 51,
            ..
        }
    )));
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_9_each_tier_crossed_halves_again() {
    let mut e =
        Engine::new(Topology::from_config(pool_config(40)).expect("valid"), 0).expect("engine");
    e.apply(1, Topology::from_config(pool_config(150)).expect("valid"))
        .expect("apply");
    assert_eq!(
        e.instance("vm-0").expect("vm").allocated,
        256,
        "two tiers crossed: a quarter"
    );
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_10_tier_down_grows_blocks_and_leaves_flows_alone() {
    let mut e =
        Engine::new(Topology::from_config(pool_config(120)).expect("valid"), 0).expect("engine");
    let (src, dst) = (private_u32(0), ip(SERVER));
    let flows: Vec<(u16, (u32, u16))> = (0..256u16)
        .map(|i| (3000 + i, syn(&mut e, 1, src, 3000 + i, dst, 443)))
        .collect();
    let old_block = e.instance("vm-0").expect("vm").block;
    let rep = e
        .apply(5, Topology::from_config(pool_config(40)).expect("valid"))
        .expect("apply");
    assert_eq!(rep.flows_reclaimed, 0);
    assert_eq!(rep.removed, 80);
    let r = e.instance("vm-0").expect("vm");
    assert_eq!(r.allocated, 1024);
    for &(lo, hi) in &old_block {
        assert!(
            r.block.iter().any(|&(l, h)| l <= lo && hi <= h),
            "old ports stay in the block"
        );
    }
    for &(sport, t) in &flows {
        assert_eq!(
            translated(out(&mut e, 6, Packet::tcp(src, sport, dst, 443, ACK))),
            t
        );
    }
    for i in 0..768u16 {
        syn(&mut e, 7, src, 10000 + i, dst, 443);
    }
    assert!(matches!(
        out(&mut e, 7, Packet::tcp(src, 20000, dst, 443, SYN)),
        Verdict::Drop(DropReason::PortsExhausted)
    ));
    e.check_invariants().expect("invariants");
}

#[test]
fn r2_11_redeploy_reports_up_to_twice_the_pool_then_settles() {
    let e0 = Engine::new(
        Topology::from_config(classic_config(40, None)).expect("valid"),
        0,
    )
    .expect("engine");
    assert_eq!(e0.instance("role-0").expect("role").allocated, 1024);
    let mut e = e0;
    // During the redeploy the infrastructure reports 80 instances: tier 51-100.
    e.apply(
        10,
        Topology::from_config(classic_config(40, Some(80))).expect("valid"),
    )
    .expect("apply");
    let r = e.instance("role-0").expect("role");
    assert_eq!((r.allocated, r.pool_size), (512, 80));
    // Settled: back to the actual size (R2.10 growth).
    e.apply(
        20,
        Topology::from_config(classic_config(40, None)).expect("valid"),
    )
    .expect("apply");
    assert_eq!(e.instance("role-0").expect("role").allocated, 1024);
    // More than twice is refused.
    assert!(matches!(
        Topology::from_config(classic_config(40, Some(81))),
        Err(ConfigError::Invalid { .. })
    ));
}

// ---------------------------------------------------------------- §3 lifetimes

#[test]
fn r3_1_tcp_flow_starts_with_a_syn_only() {
    let mut e = reference();
    let (src, dst) = (ip("10.0.3.10"), ip(SERVER));
    for flags in [ACK, SYN | ACK, FIN_ACK, RST, 0x18] {
        assert_eq!(
            out(&mut e, 1, Packet::tcp(src, 4000, dst, 443, flags)),
            Verdict::Drop(DropReason::TcpNotSyn),
            "flags {flags:#x}"
        );
    }
    assert_eq!(e.live_flows(), 0);
    syn(&mut e, 1, src, 4000, dst, 443);
    assert_eq!(e.live_flows(), 1);
    assert_eq!(e.global_stats().drops[DropReason::TcpNotSyn as usize], 5);
}

/// Opens a TCP flow from vm-as1 port 4000 to SERVER:443 at `t`: (src, sport, public, SNAT port).
fn open_flow(e: &mut Engine, t: u32) -> (u32, u16, u32, u16) {
    let src = ip("10.0.3.10");
    let (pa, pp) = syn(e, t, src, 4000, ip(SERVER), 443);
    (src, 4000, pa, pp)
}

#[test]
fn r3_2_fin_both_ways_releases_the_port_240_s_later() {
    let mut e = reference();
    let dst = ip(SERVER);
    let (src, sport, pa, pp) = open_flow(&mut e, 100);
    out(&mut e, 110, Packet::tcp(src, sport, dst, 443, FIN_ACK));
    // One FIN is not enough: still there long after.
    assert_eq!(e.flows(Some("vm-as1"))[0].state, "fin_out");
    inb(&mut e, 120, Packet::tcp(dst, 443, pa, pp, FIN_ACK));
    assert_eq!(e.flows(Some("vm-as1"))[0].expires_at, 360);
    // Packets in between are still translated (and do not extend the 240 s).
    assert_eq!(
        out(&mut e, 300, Packet::tcp(src, sport, dst, 443, ACK)),
        Verdict::Translate { addr: pa, port: pp }
    );
    e.advance(359);
    assert_eq!(e.live_flows(), 1);
    e.advance(360);
    assert_eq!(e.live_flows(), 0);
    assert_eq!(e.instance("vm-as1").expect("vm").used[0], 0);
    assert_eq!(e.global_stats().flows_ended, [0, 1, 0, 0]);
}

#[test]
fn r3_3_rst_releases_the_port_15_s_later() {
    for dir_in in [false, true] {
        let mut e = reference();
        let dst = ip(SERVER);
        let (src, sport, pa, pp) = open_flow(&mut e, 50);
        if dir_in {
            inb(&mut e, 60, Packet::tcp(dst, 443, pa, pp, RST));
        } else {
            out(&mut e, 60, Packet::tcp(src, sport, dst, 443, RST));
        }
        e.advance(74);
        assert_eq!(e.live_flows(), 1);
        e.advance(75);
        assert_eq!(e.live_flows(), 0, "inbound RST: {dir_in}");
        assert_eq!(e.global_stats().flows_ended, [0, 0, 1, 0]);
    }
}

#[test]
fn r3_4_idle_flow_is_removed_after_240_s() {
    let mut e = reference();
    let (src, _sport, pa, pp) = open_flow(&mut e, 10);
    e.advance(249);
    assert_eq!(e.live_flows(), 1);
    e.advance(250);
    assert_eq!(e.live_flows(), 0);
    // Its return traffic is no longer delivered (R3.8).
    assert_eq!(
        inb(&mut e, 251, Packet::tcp(ip(SERVER), 443, pa, pp, ACK)),
        Verdict::Drop(DropReason::UnsolicitedInbound)
    );
    let _ = src;
}

#[test]
fn r3_4_keepalives_from_one_side_keep_the_flow() {
    for inbound_side in [false, true] {
        let mut e = reference();
        let dst = ip(SERVER);
        let (src, sport, pa, pp) = open_flow(&mut e, 0);
        // A keepalive every 120 s (R7.1's Linux settings) for an hour, from one side only.
        let mut t = 0;
        while t < 3600 {
            t += 120;
            let v = if inbound_side {
                inb(&mut e, t, Packet::tcp(dst, 443, pa, pp, ACK))
            } else {
                out(&mut e, t, Packet::tcp(src, sport, dst, 443, ACK))
            };
            assert!(matches!(v, Verdict::Translate { .. }), "keepalive at {t}");
        }
        assert_eq!(e.live_flows(), 1);
        e.advance(t + 239);
        assert_eq!(e.live_flows(), 1);
        e.advance(t + 240);
        assert_eq!(e.live_flows(), 0);
    }
}

#[test]
fn r3_4_idle_timeout_is_configurable() {
    let text = REFERENCE.replace("seed = 7", "seed = 7\nidle_timeout_secs = 5");
    let mut e = engine(&text);
    open_flow(&mut e, 0);
    e.advance(4);
    assert_eq!(e.live_flows(), 1);
    e.advance(5);
    assert_eq!(e.live_flows(), 0);
}

#[test]
fn r3_5_udp_flow_starts_with_a_datagram_and_ends_only_by_idle_timeout() {
    let mut e = reference();
    let (src, dst) = (ip("10.0.3.10"), ip(SERVER));
    let (pa, pp) = translated(out(&mut e, 0, Packet::udp(src, 5000, dst, 53)));
    assert_eq!(
        inb(&mut e, 100, Packet::udp(dst, 53, pa, pp)),
        Verdict::Translate {
            addr: src,
            port: 5000
        }
    );
    e.advance(339);
    assert_eq!(e.live_flows(), 1);
    e.advance(340);
    assert_eq!(e.live_flows(), 0);
    assert_eq!(e.global_stats().flows_ended, [1, 0, 0, 0]);
}

#[test]
fn r3_8_unsolicited_inbound_is_dropped_and_counted() {
    let mut e = reference();
    let pat = scenario(&e, "vm-as1").addr();
    assert_eq!(
        inb(&mut e, 1, Packet::tcp(ip(SERVER), 443, pat, 1024, SYN)),
        Verdict::Drop(DropReason::UnsolicitedInbound)
    );
    assert_eq!(
        inb(&mut e, 1, Packet::udp(ip(SERVER), 53, pat, 1024)),
        Verdict::Drop(DropReason::UnsolicitedInbound)
    );
    assert_eq!(
        inb(&mut e, 1, Packet::other(proto::ICMP, ip(SERVER), pat)),
        Verdict::Drop(DropReason::UnsolicitedInbound)
    );
    // A flow to one destination does not open the port to another host.
    let (pa, pp) = syn(&mut e, 2, ip("10.0.3.10"), 4000, ip(SERVER), 443);
    assert_eq!(
        inb(
            &mut e,
            2,
            Packet::tcp(ip("198.51.100.66"), 443, pa, pp, ACK)
        ),
        Verdict::Drop(DropReason::UnsolicitedInbound)
    );
    assert_eq!(
        inb(&mut e, 2, Packet::tcp(ip(SERVER), 444, pa, pp, ACK)),
        Verdict::Drop(DropReason::UnsolicitedInbound)
    );
    assert_eq!(
        inb(
            &mut e,
            2,
            Packet::tcp(ip(SERVER), 443, ip("203.0.113.99"), pp, ACK)
        ),
        Verdict::Drop(DropReason::NotOurAddress)
    );
    assert_eq!(
        e.global_stats().drops[DropReason::UnsolicitedInbound as usize],
        5
    );
}

#[test]
fn unknown_source_is_dropped() {
    let mut e = reference();
    assert_eq!(
        out(
            &mut e,
            1,
            Packet::tcp(ip("10.0.9.9"), 1, ip(SERVER), 2, SYN)
        ),
        Verdict::Drop(DropReason::UnknownSource)
    );
}

#[test]
fn syn_on_a_closing_flow_starts_it_over() {
    let mut e = reference();
    let dst = ip(SERVER);
    let (src, sport, pa, pp) = open_flow(&mut e, 0);
    out(&mut e, 1, Packet::tcp(src, sport, dst, 443, FIN_ACK));
    inb(&mut e, 1, Packet::tcp(dst, 443, pa, pp, FIN_ACK));
    // The client reuses its port for a new connection within the 240 s.
    assert_eq!(
        out(&mut e, 100, Packet::tcp(src, sport, dst, 443, SYN)),
        Verdict::Translate { addr: pa, port: pp }
    );
    e.advance(241);
    assert_eq!(
        e.live_flows(),
        1,
        "the new connection is not cut by the old FIN timer"
    );
    assert_eq!(e.flows(None)[0].state, "open");
}

#[test]
fn r1_3_designations_survive_a_restart_when_the_store_keeps_them() {
    // Two default-SNAT addresses; set "as-b" joins first and takes the first address, then
    // "as-a" joins and takes the second (least loaded). Designations are kept across changes
    // (R1.3), so they depend on that order: computed afresh, "as-a" would come first.
    let toml = |sets: &[&str]| {
        let mut t = String::from(
            "[gateway]\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"192.0.2.1\", \"192.0.2.2\"]\n",
        );
        for (i, s) in sets.iter().enumerate() {
            t += &format!(
                "[[availability_set]]\nname = \"{s}\"\n[[instance]]\nname = \"vm-{s}\"\nprivate_ip = \"10.0.1.{}\"\navailability_set = \"{s}\"\n",
                i + 1
            );
        }
        Topology::from_toml(&t).unwrap()
    };
    let public = |e: &Engine, n: &str| e.instance(n).unwrap().scenario.addr();
    let mut live = Engine::new(toml(&["as-b"]), 0).unwrap();
    live.apply(1, toml(&["as-b", "as-a"])).unwrap();
    assert_eq!(public(&live, "vm-as-b"), ip("192.0.2.1"));
    assert_eq!(public(&live, "vm-as-a"), ip("192.0.2.2"));
    let fresh = Engine::new(toml(&["as-b", "as-a"]), 0).unwrap();
    assert_eq!(
        public(&fresh, "vm-as-a"),
        ip("192.0.2.1"),
        "afresh, the order differs"
    );
    // What the control plane stores with the topology, and passes back after a restart.
    let kept = live.designations();
    assert_eq!(kept, live.check(&toml(&["as-b", "as-a"])).unwrap());
    let restarted = Engine::with_designations(toml(&["as-b", "as-a"]), 0, 7, &kept).unwrap();
    assert_eq!(public(&restarted, "vm-as-a"), ip("192.0.2.2"));
    assert_eq!(public(&restarted, "vm-as-b"), ip("192.0.2.1"));
}

// ---------------------------------------------------------------- §9 fail fast (R9.5)
//
// The answers are bytes, which the data plane writes: these tests drive
// `snatgw_dataplane::Gateway` over the engine, with real packets.

mod fail_fast {
    use super::*;
    use snatgw_core::config::OnExhaustion;
    use snatgw_core::engine::{FAIL_FAST_BURST, FAIL_FAST_PER_SEC};
    use snatgw_core::packet::{Answer, ICMP_CODE_ADMIN_PROHIBITED, ICMP_DEST_UNREACHABLE};
    use snatgw_core::{ConfigFile, Direction};
    use snatgw_dataplane::{Gateway, Outcome};
    use snatgw_wire::testutil::{build_tcp, build_udp, tcp_syn, udp, Ipv4Spec, TcpSpec};
    use snatgw_wire::{parse, verify_checksums, IcmpKind, TcpFlags};

    /// A batch slot's worth of room behind a packet.
    const SLOT: usize = 1500;

    /// 801 instances on one default-SNAT address: 32 ports each (R2.8), so exhaustion is
    /// quick.
    fn config(reset: bool) -> ConfigFile {
        let mut c = pool_config(801);
        if reset {
            c.gateway.on_exhaustion = OnExhaustion::Reset;
        }
        c
    }

    fn gateway(c: ConfigFile) -> Gateway {
        Gateway::new(Engine::new(Topology::from_config(c).expect("valid"), 0).expect("engine"))
    }

    /// Sends `pkt` outbound through the data plane in a slot of `room` bytes; returns the
    /// outcome and the slot's first `len` bytes (the answer, if any).
    fn send_in(g: &mut Gateway, now: u32, pkt: &[u8], room: usize) -> (Outcome, Vec<u8>) {
        let mut buf = pkt.to_vec();
        buf.resize(room.max(pkt.len()), 0);
        let o = g.process_in(now, &mut buf, pkt.len(), Direction::Outbound);
        let len = match o {
            Outcome::Answer { len, .. } => len,
            _ => pkt.len(),
        };
        buf.truncate(len);
        (o, buf)
    }

    fn send(g: &mut Gateway, now: u32, pkt: &[u8]) -> (Outcome, Vec<u8>) {
        send_in(g, now, pkt, SLOT)
    }

    /// Fills instance `i`'s 32 TCP (or UDP) ports for `dst:dport`.
    fn exhaust(g: &mut Gateway, now: u32, i: usize, tcp: bool, dst: u32, dport: u16) {
        let src = private_u32(i);
        for k in 0..32u16 {
            let p = if tcp {
                tcp_syn(src, 2000 + k, dst, dport)
            } else {
                udp(src, 2000 + k, dst, dport, b"q")
            };
            let (o, _) = send(g, now, &p);
            assert!(
                matches!(o, Outcome::Forward(Verdict::Translate { .. })),
                "{o:?}"
            );
        }
    }

    fn syn_with(
        src: u32,
        sport: u16,
        dst: u32,
        dport: u16,
        seq: u32,
        flags: u8,
        data: &[u8],
    ) -> Vec<u8> {
        let tcp = TcpSpec {
            src_port: sport,
            dst_port: dport,
            seq,
            ack: 0,
            flags,
            options: vec![2, 4, 0x05, 0xb4, 4, 2, 1, 1],
            ..TcpSpec::default()
        };
        build_tcp(&Ipv4Spec::between(src, dst), &tcp, data)
    }

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// Checks a RST answer (RFC 9293 §3.10.7.1: `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`)
    /// from `server:sport` to `inst:iport`.
    fn assert_rst(a: &[u8], server: u32, sport: u16, inst: u32, iport: u16, ack: u32) {
        assert_eq!(
            a.len(),
            40,
            "20-byte IPv4 header + 20-byte TCP header: {a:02x?}"
        );
        verify_checksums(a).expect("valid checksums");
        let s = parse(a).expect("parses");
        assert_eq!(
            (s.proto, s.src, s.dst),
            (proto::TCP, server, inst),
            "from the destination to the instance"
        );
        assert_eq!((s.src_port, s.dst_port), (sport, iport));
        assert_eq!(s.tcp_flags, TcpFlags::RST | TcpFlags::ACK);
        assert_eq!(a[0], 0x45);
        assert_eq!(a[8], 64, "TTL");
        assert_eq!(be32(a, 24), 0, "SEQ = 0 (the SYN had no ACK)");
        assert_eq!(be32(a, 28), ack, "ACK = SEG.SEQ + SEG.LEN");
        assert_eq!(a[32] >> 4, 5, "no options");
        assert_eq!(&a[34..36], &[0, 0], "window 0");
    }

    #[test]
    fn r9_5_reset_answers_a_refused_syn_with_a_rst_to_the_instance() {
        let mut g = gateway(config(true));
        let (src, dst) = (private_u32(0), ip(SERVER));
        exhaust(&mut g, 1, 0, true, dst, 443);
        let syn = syn_with(src, 40000, dst, 443, 0x1234_5678, TcpFlags::SYN, &[]);
        let (o, a) = send(&mut g, 2, &syn);
        assert_eq!(
            o,
            Outcome::Answer {
                reason: DropReason::PortsExhausted,
                answer: Answer::TcpReset,
                len: 40
            }
        );
        assert_eq!(o.verdict(), Verdict::Drop(DropReason::PortsExhausted));
        assert_rst(&a, dst, 443, src, 40000, 0x1234_5679);
        // SEG.LEN counts data (TCP Fast Open) and a FIN besides the SYN; the sequence wraps.
        let tfo = syn_with(
            src,
            40001,
            dst,
            443,
            u32::MAX - 3,
            TcpFlags::SYN | TcpFlags::FIN,
            b"GET / HTTP",
        );
        let (o, a) = send(&mut g, 2, &tfo);
        assert!(
            matches!(
                o,
                Outcome::Answer {
                    answer: Answer::TcpReset,
                    ..
                }
            ),
            "{o:?}"
        );
        assert_rst(
            &a,
            dst,
            443,
            src,
            40001,
            (u32::MAX - 3).wrapping_add(10 + 2),
        );
        // The refusal is what it always was (R2.6, R6.1): dropped, counted, one event; no
        // flow, nothing else disturbed.
        let r = g.engine().instance("vm-0").expect("vm-0");
        assert_eq!(r.stats[0].drops[DropReason::PortsExhausted as usize], 2);
        assert_eq!(r.stats[0].conn_fail, 2);
        assert_eq!(r.stats[0].fail_fast_answered, 2);
        assert_eq!(r.stats[0].fail_fast_suppressed, 0);
        assert_eq!(r.flows, [32, 0]);
        let gs = g.engine().global_stats();
        assert_eq!(
            (gs.fail_fast_rst, gs.fail_fast_icmp, gs.fail_fast_suppressed),
            (2, 0, 0)
        );
        assert_eq!(g.stats().drops[DropReason::PortsExhausted as usize], 2);
        let ev = g.engine_mut().drain_events();
        assert_eq!(
            ev.iter()
                .filter(|x| matches!(x.kind, EventKind::Exhaustion { .. }))
                .count(),
            1
        );
        // Another destination still works, and only a SYN is ever answered.
        let (o, _) = send(&mut g, 2, &tcp_syn(src, 40002, dst, 80));
        assert!(
            matches!(o, Outcome::Forward(Verdict::Translate { .. })),
            "{o:?}"
        );
        let ack = syn_with(src, 40003, dst, 443, 7, TcpFlags::ACK, &[]);
        assert_eq!(
            send(&mut g, 2, &ack).0,
            Outcome::Drop(DropReason::TcpNotSyn)
        );
        // The packet-sized API has no room to answer in and never does.
        let mut p = syn.clone();
        assert_eq!(
            g.process(3, &mut p, Direction::Outbound),
            Verdict::Drop(DropReason::PortsExhausted)
        );
        assert_eq!(g.engine().global_stats().fail_fast_rst, 2);
    }

    #[test]
    fn r9_5_reset_answers_a_refused_udp_flow_with_icmp_admin_prohibited() {
        let mut g = gateway(config(true));
        let (src, dst) = (private_u32(0), ip(SERVER));
        exhaust(&mut g, 1, 0, false, dst, 53);
        // A 29-byte datagram: its answer (56 bytes) is longer, and grows into the slot.
        for ip_options in [vec![], vec![1, 1, 1, 0]] {
            let spec = Ipv4Spec {
                options: ip_options.clone(),
                ..Ipv4Spec::between(src, dst)
            };
            let d = build_udp(&spec, 5353, 53, b"q");
            let (o, a) = send(&mut g, 2, &d);
            let hl = 20 + ip_options.len();
            let quote = hl + 8;
            assert_eq!(
                o,
                Outcome::Answer {
                    reason: DropReason::PortsExhausted,
                    answer: Answer::IcmpAdminProhibited,
                    len: 28 + quote
                }
            );
            verify_checksums(&a).expect("valid checksums, the quoted header's too");
            let s = parse(&a).expect("parses");
            assert_eq!(
                (s.proto, s.src, s.dst),
                (proto::ICMP, dst, src),
                "from the destination to the instance"
            );
            assert_eq!(a[9], proto::ICMP);
            assert_eq!(usize::from(u16::from_be_bytes([a[2], a[3]])), a.len());
            // Type 3 code 13 (RFC 1812 §5.2.7.1), unused bytes zero, then the refused packet's
            // IP header (options included) and first 8 bytes of payload, unchanged (RFC 792).
            assert_eq!(
                (a[20], a[21]),
                (ICMP_DEST_UNREACHABLE, ICMP_CODE_ADMIN_PROHIBITED)
            );
            assert_eq!((a[20], a[21]), (3, 13));
            assert_eq!(&a[24..28], &[0; 4]);
            assert_eq!(&a[28..], &d[..quote], "quoted header + 8 bytes");
            match s.icmp {
                Some(IcmpKind::Error { inner, .. }) => {
                    assert_eq!(
                        (
                            inner.proto,
                            inner.src,
                            inner.src_port,
                            inner.dst,
                            inner.dst_port
                        ),
                        (proto::UDP, src, 5353, dst, 53)
                    );
                }
                k => panic!("not an ICMP error: {k:?}"),
            }
        }
        // A long datagram's answer quotes 8 bytes of payload only.
        let long = udp(src, 5354, dst, 53, &[0xab; 200]);
        let (o, a) = send(&mut g, 2, &long);
        assert!(matches!(o, Outcome::Answer { len: 56, .. }), "{o:?}");
        assert_eq!(&a[28..], &long[..28]);
        let r = g.engine().instance("vm-0").expect("vm-0");
        assert_eq!(r.stats[1].drops[DropReason::PortsExhausted as usize], 3);
        assert_eq!(r.stats[1].conn_fail, 3);
        assert_eq!(r.stats[1].fail_fast_answered, 3);
        assert_eq!(g.engine().global_stats().fail_fast_icmp, 3);
        // Without room in the buffer for the answer, the refusal is only dropped (and
        // neither answered nor suppressed).
        let short = udp(src, 5355, dst, 53, b"q");
        let (o, _) = send_in(&mut g, 2, &short, short.len());
        assert_eq!(o, Outcome::Drop(DropReason::PortsExhausted));
        assert_eq!(g.stats().fail_fast_no_room, 1);
        let gs = g.engine().global_stats();
        assert_eq!((gs.fail_fast_icmp, gs.fail_fast_suppressed), (3, 0));
        assert_eq!(gs.drops[DropReason::PortsExhausted as usize], 4);
    }

    #[test]
    fn r9_5_drop_is_the_default_and_answers_nothing() {
        assert_eq!(
            ConfigFile::default().gateway.on_exhaustion,
            OnExhaustion::Drop
        );
        let parsed = |v: &str| ConfigFile::from_toml(&format!("[gateway]\non_exhaustion = {v}\n"));
        assert_eq!(
            parsed("\"reset\"").expect("reset").gateway.on_exhaustion,
            OnExhaustion::Reset
        );
        assert_eq!(
            parsed("\"drop\"").expect("drop").gateway.on_exhaustion,
            OnExhaustion::Drop
        );
        for bad in ["\"rst\"", "\"Reset\"", "1", "true"] {
            assert!(parsed(bad).is_err(), "{bad} refused");
        }
        let mut g = gateway(config(false));
        let (src, dst) = (private_u32(0), ip(SERVER));
        exhaust(&mut g, 1, 0, true, dst, 443);
        exhaust(&mut g, 1, 0, false, dst, 53);
        let syn = tcp_syn(src, 40000, dst, 443);
        let (o, a) = send(&mut g, 2, &syn);
        assert_eq!(o, Outcome::Drop(DropReason::PortsExhausted));
        assert_eq!(a, syn, "nothing written");
        let (o, _) = send(&mut g, 2, &udp(src, 5353, dst, 53, b"q"));
        assert_eq!(o, Outcome::Drop(DropReason::PortsExhausted));
        let e = g.engine();
        assert_eq!(
            e.fail_fast(
                &Packet::tcp(src, 40000, dst, 443, SYN),
                DropReason::PortsExhausted
            ),
            None
        );
        let r = e.instance("vm-0").expect("vm-0");
        assert_eq!(r.stats[0].drops[DropReason::PortsExhausted as usize], 1);
        assert_eq!(r.stats[1].drops[DropReason::PortsExhausted as usize], 1);
        assert_eq!(
            r.stats[0].fail_fast_answered + r.stats[1].fail_fast_answered,
            0
        );
        let gs = e.global_stats();
        assert_eq!(
            (gs.fail_fast_rst, gs.fail_fast_icmp, gs.fail_fast_suppressed),
            (0, 0, 0)
        );
    }

    #[test]
    fn r9_5_answers_are_rate_limited_per_instance_and_counted() {
        let mut g = gateway(config(true));
        let dst = ip(SERVER);
        exhaust(&mut g, 1, 0, true, dst, 443);
        exhaust(&mut g, 1, 1, true, dst, 443);
        exhaust(&mut g, 1, 0, false, dst, 53);
        let refuse = |g: &mut Gateway, now: u32, i: usize, n: u16| -> u64 {
            (0..n)
                .filter(|k| {
                    let p = tcp_syn(private_u32(i), 10_000 + k, dst, 443);
                    match send(g, now, &p).0 {
                        Outcome::Answer { .. } => true,
                        Outcome::Drop(DropReason::PortsExhausted) => false,
                        o => panic!("{o:?}"),
                    }
                })
                .count() as u64
        };
        let (burst, rate) = (u64::from(FAIL_FAST_BURST), u64::from(FAIL_FAST_PER_SEC));
        assert_eq!((burst, rate), (100, 100), "the documented limit");
        // A tight retry loop: the first 100 in a second are answered, the rest only dropped.
        assert_eq!(refuse(&mut g, 10, 0, 150), burst);
        // The bucket is the instance's: another instance is answered in the same second...
        assert_eq!(refuse(&mut g, 10, 1, 20), 20);
        // ... and it covers UDP too (one bucket per instance).
        let d = udp(private_u32(0), 7000, dst, 53, b"q");
        assert_eq!(
            send(&mut g, 10, &d).0,
            Outcome::Drop(DropReason::PortsExhausted)
        );
        // The next second refills 100.
        assert_eq!(refuse(&mut g, 11, 0, 150), rate);
        // Counted either way (R9.5): every refusal under its reason, answers and suppressions
        // apart.
        let r = g.engine().instance("vm-0").expect("vm-0");
        assert_eq!(r.stats[0].drops[DropReason::PortsExhausted as usize], 300);
        assert_eq!(r.stats[0].conn_fail, 300);
        assert_eq!(r.stats[0].fail_fast_answered, 200);
        assert_eq!(r.stats[0].fail_fast_suppressed, 100);
        assert_eq!(r.stats[1].fail_fast_suppressed, 1);
        let r1 = g.engine().instance("vm-1").expect("vm-1");
        assert_eq!(
            (
                r1.stats[0].fail_fast_answered,
                r1.stats[0].fail_fast_suppressed
            ),
            (20, 0)
        );
        let gs = g.engine().global_stats();
        assert_eq!(
            (gs.fail_fast_rst, gs.fail_fast_icmp, gs.fail_fast_suppressed),
            (220, 0, 101)
        );
        assert_eq!(gs.drops[DropReason::PortsExhausted as usize], 321);
    }

    #[test]
    fn r9_5_flow_limit_refusals_are_answered_too() {
        let mut c = config(true);
        c.instance[0].max_flows = Some(1);
        let mut g = gateway(c);
        let (src, dst) = (private_u32(0), ip(SERVER));
        let (o, _) = send(&mut g, 1, &tcp_syn(src, 40000, dst, 443));
        assert!(
            matches!(o, Outcome::Forward(Verdict::Translate { .. })),
            "{o:?}"
        );
        // Over the instance's limit (R9.2): any new flow, ports to spare.
        let syn = syn_with(src, 40001, ip("198.51.100.8"), 80, 99, TcpFlags::SYN, &[]);
        let (o, a) = send(&mut g, 2, &syn);
        assert_eq!(
            o,
            Outcome::Answer {
                reason: DropReason::FlowLimit,
                answer: Answer::TcpReset,
                len: 40
            }
        );
        assert_rst(&a, ip("198.51.100.8"), 80, src, 40001, 100);
        let d = udp(src, 5353, dst, 53, b"query");
        let (o, a) = send(&mut g, 2, &d);
        assert!(
            matches!(
                o,
                Outcome::Answer {
                    reason: DropReason::FlowLimit,
                    answer: Answer::IcmpAdminProhibited,
                    len: 56
                }
            ),
            "{o:?}"
        );
        assert_eq!((a[20], a[21]), (3, 13));
        assert_eq!(&a[28..], &d[..28]);
        // Counted and recorded as the flow limit always is.
        let r = g.engine().instance("vm-0").expect("vm-0");
        assert_eq!(r.stats[0].drops[DropReason::FlowLimit as usize], 1);
        assert_eq!(r.stats[1].drops[DropReason::FlowLimit as usize], 1);
        assert_eq!(
            (r.stats[0].fail_fast_answered, r.stats[1].fail_fast_answered),
            (1, 1)
        );
        assert!(g
            .engine_mut()
            .drain_events()
            .iter()
            .any(|x| matches!(x.kind, EventKind::FlowLimit { .. })));
        // The gateway-wide limit too.
        let mut c = config(true);
        c.gateway.max_flows = Some(1);
        let mut g = gateway(c);
        send(&mut g, 1, &tcp_syn(src, 40000, dst, 443));
        let (o, _) = send(&mut g, 2, &tcp_syn(private_u32(5), 40000, dst, 443));
        assert!(
            matches!(
                o,
                Outcome::Answer {
                    reason: DropReason::FlowLimit,
                    answer: Answer::TcpReset,
                    ..
                }
            ),
            "{o:?}"
        );
        // Inbound refusals are never answered: answers go to instances only.
        let e = g.engine();
        let from_internet = Packet::tcp(dst, 443, ip("192.0.2.1"), 1024, SYN);
        assert_eq!(e.fail_fast(&from_internet, DropReason::FlowLimit), None);
        // Nor other reasons, ICMP errors, or group destinations.
        assert_eq!(
            e.fail_fast(&Packet::tcp(src, 1, dst, 2, SYN), DropReason::NsgDenied),
            None
        );
        assert_eq!(
            e.fail_fast(&Packet::icmp(src, dst, 3), DropReason::FlowLimit),
            None
        );
        assert_eq!(
            e.fail_fast(
                &Packet::udp(src, 1, ip("239.1.2.3"), 2),
                DropReason::FlowLimit
            ),
            None
        );
        assert_eq!(
            e.fail_fast(&Packet::udp(src, 1, dst, 2), DropReason::FlowLimit),
            Some(Answer::IcmpAdminProhibited)
        );
    }
}
