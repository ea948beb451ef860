//! Seeded soak: thousands of instances, hours of simulated time, pool resizes, scenario changes
//! and redeploys, with the engine's invariants and counters checked along the way.

mod common;

use common::*;
use snatgw_core::config::{
    AvailabilitySetCfg, BackendPoolCfg, ConfigFile, DeploymentCfg, FrontendCfg, InstanceCfg,
    LoadBalancerCfg, PublicIpCfg,
};
use snatgw_core::{DropReason, Engine, InstanceKind, Model, Packet, Topology, Verdict};

/// The private IP of the instance that talks to 70 000 endpoints from one socket.
const CHATTY: &str = "10.0.250.250";

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        snatgw_core::hash::splitmix64(&mut self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A fleet: `lb_n` VMs behind an LB with two frontends, `set_n` VMs in 4 availability sets,
/// `classic_n` roles in one deployment (optionally redeploying), `ilpip_n` VMs with ILPIPs
/// taken from the first LB VMs.
fn fleet(lb_n: usize, set_n: usize, classic_n: usize, ilpip_n: usize, redeploy: bool) -> Topology {
    let mut c = ConfigFile::default();
    c.gateway.seed = 99;
    c.gateway.vnet_prefixes = vec!["10.0.0.0/16".into()];
    c.gateway.default_snat_pool = (1..=4).map(|i| format!("192.0.2.{i}")).collect();
    c.gateway.idle_timeout_secs = 240;
    for i in 0..4 {
        c.availability_set.push(AvailabilitySetCfg {
            name: format!("as{i}"),
        });
    }
    c.public_ip.push(PublicIpCfg {
        name: "fe1".into(),
        address: "203.0.113.1".into(),
    });
    c.public_ip.push(PublicIpCfg {
        name: "fe2".into(),
        address: "203.0.113.2".into(),
    });
    c.public_ip.push(PublicIpCfg {
        name: "vip".into(),
        address: "198.51.100.200".into(),
    });
    let mut k = 0;
    let mut lb_members = Vec::new();
    for i in 0..lb_n {
        let mut v = vm(k, None);
        v.name = format!("lb-{i}");
        if i < ilpip_n {
            c.public_ip.push(PublicIpCfg {
                name: format!("ilpip-{i}"),
                address: format!("203.0.113.{}", 10 + i),
            });
            v.public_ip = Some(format!("ilpip-{i}"));
        }
        lb_members.push(v.name.clone());
        c.instance.push(v);
        k += 1;
    }
    for i in 0..set_n {
        let mut v = vm(k, Some(&format!("as{}", i % 4)));
        v.name = format!("set-{i}");
        c.instance.push(v);
        k += 1;
    }
    // An instance alone (its own set) that only the #12 phase below talks from.
    let mut chatty = vm(0, None);
    chatty.name = "chatty".into();
    chatty.private_ip = CHATTY.into();
    c.instance.push(chatty);
    c.deployment.push(DeploymentCfg {
        name: "cs".into(),
        redeploy_reported_instances: if redeploy {
            Some(classic_n as u32 * 2)
        } else {
            None
        },
    });
    let mut roles = Vec::new();
    for i in 0..classic_n {
        c.instance.push(InstanceCfg {
            name: format!("role-{i}"),
            kind: InstanceKind::WebWorkerRole,
            model: Model::Classic,
            private_ip: private(k),
            public_ip: None,
            availability_set: None,
            deployment: Some("cs".into()),
            max_flows: None,
        });
        roles.push(format!("role-{i}"));
        k += 1;
    }
    c.load_balancer.push(LoadBalancerCfg {
        name: "lb".into(),
        model: Model::Arm,
        frontends: vec![
            FrontendCfg {
                name: "fe1".into(),
                public_ip: "fe1".into(),
            },
            FrontendCfg {
                name: "fe2".into(),
                public_ip: "fe2".into(),
            },
        ],
        backend_pools: vec![BackendPoolCfg {
            name: "web".into(),
            members: lb_members,
        }],
        rules: vec![
            lb_rule("a", "fe1", "web", 80),
            lb_rule("b", "fe2", "web", 443),
        ],
        probes: vec![],
    });
    c.load_balancer.push(LoadBalancerCfg {
        name: "cloud".into(),
        model: Model::Classic,
        frontends: vec![FrontendCfg {
            name: "vip".into(),
            public_ip: "vip".into(),
        }],
        backend_pools: vec![BackendPoolCfg {
            name: "roles".into(),
            members: roles,
        }],
        rules: vec![],
        probes: vec![],
    });
    Topology::from_config(c).expect("valid fleet")
}

#[test]
fn soak_thousands_of_instances_for_hours() {
    let mut rng = Rng(2024);
    let shapes = [
        (400usize, 1200usize, 300usize, 20usize, false),
        (900, 2000, 300, 0, true),
        (150, 600, 100, 60, false),
        (600, 3000, 400, 10, true),
    ];
    let (mut lb_n, mut set_n, mut cl_n, mut il_n, mut rd) = shapes[0];
    let mut e = Engine::new(fleet(lb_n, set_n, cl_n, il_n, rd), 0).expect("engine");
    let total = |a: usize, b: usize, c: usize| a + b + c;
    let servers: Vec<u32> = (0..40).map(|i| ip("198.51.100.1") + i).collect();
    let mut open: Vec<(u32, u16, u32, u16, u32, u16, u8)> = Vec::new();
    let (mut translated_n, mut exhausted) = (0u64, 0u64);
    let hours = 4;
    let mut max_live = 0;
    for t in 0..hours * 3600u32 {
        // Every 20 simulated minutes: a new shape (pool resizes across tiers, ILPIPs added and
        // removed — scenario changes — and redeploys starting or settling).
        if t > 0 && t % 1200 == 0 {
            let s = shapes[(t / 1200) as usize % shapes.len()];
            (lb_n, set_n, cl_n, il_n, rd) = s;
            e.apply(t, fleet(lb_n, set_n, cl_n, il_n, rd))
                .expect("apply");
            e.check_invariants().expect("invariants after apply");
        }
        let n = total(lb_n, set_n, cl_n);
        // New flows: a burst to one hot server now and then (exhaustion), else spread.
        let new = 20 + if t % 600 < 5 { 400 } else { 0 };
        for _ in 0..new {
            let burst = t % 600 < 5;
            // Bursts come from three instances of an availability set (default SNAT, small tier).
            let inst = if burst {
                lb_n + rng.below(3) as usize
            } else {
                rng.below(n as u64) as usize
            };
            let src = private_u32(inst);
            let dst = if t % 600 < 5 {
                servers[0]
            } else {
                servers[rng.below(40) as usize]
            };
            let sport = 1024 + (translated_n + exhausted) as u16 % 60000;
            let udp = rng.below(4) == 0;
            let dport = if udp { 53 } else { 443 };
            let p = if udp {
                Packet::udp(src, sport, dst, dport)
            } else {
                Packet::tcp(src, sport, dst, dport, SYN)
            };
            match out(&mut e, t, p) {
                Verdict::Translate { addr, port } => {
                    translated_n += 1;
                    open.push((src, sport, dst, dport, addr, port, if udp { 17 } else { 6 }));
                }
                Verdict::Drop(DropReason::PortsExhausted) => exhausted += 1,
                Verdict::Drop(r) => panic!("unexpected drop {r}"),
                Verdict::Pass => panic!("pass"),
            }
        }
        // Traffic on open flows: replies, keepalives, closes and resets from either side.
        for _ in 0..30 {
            if open.is_empty() {
                break;
            }
            let i = rng.below(open.len() as u64) as usize;
            let (src, sport, dst, dport, pa, pp, pr) = open[i];
            let roll = rng.below(10);
            let flags = match roll {
                0..=5 => ACK,
                6..=8 => FIN_ACK,
                _ => RST,
            };
            let inbound = rng.below(2) == 0;
            // The live mapping of this private 5-tuple, if the flow still exists (it may have
            // expired or been reclaimed by a tier or scenario change, and its public tuple may
            // then belong to a new flow).
            let live = e.lookup_outbound(pr, src, sport, dst, dport);
            if live != Some((pa, pp)) && (pr == 6 || live.is_none()) {
                open.swap_remove(i);
                continue;
            }
            let v = match (pr, inbound) {
                (6, false) => out(&mut e, t, Packet::tcp(src, sport, dst, dport, flags)),
                (6, true) => inb(&mut e, t, Packet::tcp(dst, dport, pa, pp, flags)),
                (_, false) => out(&mut e, t, Packet::udp(src, sport, dst, dport)),
                (_, true) => inb(&mut e, t, Packet::udp(dst, dport, pa, pp)),
            };
            match v {
                Verdict::Translate { addr, port } if inbound => {
                    assert_eq!((addr, port), (src, sport), "t={t}")
                }
                Verdict::Translate { addr, port } => {
                    assert_eq!(Some((addr, port)), live, "t={t}");
                    open[i] = (src, sport, dst, dport, addr, port, pr);
                }
                // A UDP flow that moved to a new address (ILPIP) does not take inbound on the old one.
                Verdict::Drop(DropReason::UnsolicitedInbound | DropReason::NotOurAddress)
                    if pr == 17 => {}
                v => panic!("t={t}: {v:?}"),
            }
            if pr == 6 && (6..=8).contains(&roll) {
                // The other side closes too: FIN both ways (R3.2).
                let v = if inbound {
                    out(&mut e, t, Packet::tcp(src, sport, dst, dport, FIN_ACK))
                } else {
                    inb(&mut e, t, Packet::tcp(dst, dport, pa, pp, FIN_ACK))
                };
                assert!(matches!(v, Verdict::Translate { .. }), "t={t}: {v:?}");
            }
            if pr == 6 && roll >= 6 {
                open.swap_remove(i);
            }
        }
        // Every 30 simulated minutes one instance's UDP socket talks to 70 000 endpoints in
        // one second: flows to different destinations share ports (R2.3), so more than
        // 65 535 flows sit on one SNAT port (issue #12), amid the tier and scenario changes.
        if t % 1800 == 900 {
            let (chatty, name) = (ip(CHATTY), "chatty");
            let before = e.instance(name).unwrap().flows[1];
            let mut ports = std::collections::BTreeSet::new();
            for k in 0..70_000u32 {
                let d = ip("203.0.113.128") + k / 40_000;
                let v = out(
                    &mut e,
                    t,
                    Packet::udp(chatty, 999, d, 20_000 + (k % 40_000) as u16),
                );
                ports.insert(translated(v).1);
            }
            translated_n += 70_000;
            let r = e.instance(name).unwrap();
            assert_eq!(ports.len(), 1, "t={t}: one port for every destination");
            assert_eq!(r.used[1], 1, "t={t}");
            assert_eq!(r.flows[1], before + 70_000, "t={t}: no wrap");
            e.check_invariants()
                .unwrap_or_else(|m| panic!("t={t} after 70k flows on one port: {m}"));
        }
        max_live = max_live.max(e.live_flows());
        if t % 900 == 0 {
            e.check_invariants()
                .unwrap_or_else(|m| panic!("t={t}: {m}"));
        }
    }
    e.check_invariants().expect("final invariants");
    let g = *e.global_stats();
    // Counters add up: every SNAT connection is created once and either live or ended.
    let per_inst: u64 = e
        .instances()
        .iter()
        .map(|r| r.stats[0].conn_fail + r.stats[1].conn_fail)
        .sum();
    assert!(
        exhausted >= per_inst,
        "exhaustion counters: {exhausted} seen, {per_inst} on live instances"
    );
    assert_eq!(g.drops[DropReason::PortsExhausted as usize], exhausted);
    assert!(translated_n > 200_000, "{translated_n} flows");
    assert!(
        exhausted > 0,
        "the hot-server bursts must exhaust some instance"
    );
    assert!(g.flows_ended[3] > 0, "tier changes must reclaim flows");
    assert!(
        g.flows_ended[0] > 0 && g.flows_ended[1] > 0 && g.flows_ended[2] > 0,
        "idle, FIN and RST all seen: {:?}",
        g.flows_ended
    );
    // Hours later with no traffic everything expires and every port comes back.
    e.advance(hours * 3600 + 240);
    assert_eq!(e.live_flows(), 0);
    for r in e.instances() {
        assert_eq!(r.used, [0, 0], "{}", r.name);
    }
    e.check_invariants().expect("after drain");
    eprintln!(
        "soak: {translated_n} flows, {exhausted} exhausted, max live {max_live}, ended {:?}",
        g.flows_ended
    );
}
