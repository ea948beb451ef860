//! Shared fixture: a fleet where 1000 instances each get 1024 ports (20 availability sets of
//! 50 on 20 default-SNAT addresses) and `per` flows each to 250 destinations on port 443.

use snatgw_core::config::{AvailabilitySetCfg, ConfigFile, InstanceCfg};
use snatgw_core::{tcp_flags, Direction, Engine, Packet, Topology, Verdict};

pub const INSTANCES: usize = 1000;

pub fn private(i: usize) -> u32 {
    u32::from(std::net::Ipv4Addr::new(
        10,
        0,
        (1 + i / 250) as u8,
        (1 + i % 250) as u8,
    ))
}

pub fn dst(k: usize) -> u32 {
    u32::from(std::net::Ipv4Addr::new(198, 51, 100, (k % 250) as u8))
}

pub fn topology() -> Topology {
    topology_with_history(240)
}

/// The fixture with `port_reuse_history_secs` set.
pub fn topology_with_history(secs: u32) -> Topology {
    let mut c = ConfigFile::default();
    c.gateway.port_reuse_history_secs = secs;
    c.gateway.vnet_prefixes = vec!["10.0.0.0/16".into()];
    c.gateway.default_snat_pool = (0..20).map(|i| format!("192.0.2.{}", 10 + i)).collect();
    for s in 0..20 {
        c.availability_set.push(AvailabilitySetCfg {
            name: format!("as{s}"),
        });
    }
    for i in 0..INSTANCES {
        c.instance.push(InstanceCfg {
            name: format!("vm-{i}"),
            kind: Default::default(),
            model: Default::default(),
            private_ip: std::net::Ipv4Addr::from(private(i)).to_string(),
            public_ip: None,
            availability_set: Some(format!("as{}", i % 20)),
            deployment: None,
            max_flows: None,
        });
    }
    Topology::from_config(c).expect("valid")
}

/// The `k`-th flow of instance `i` as an outbound SYN.
pub fn syn(i: usize, k: usize) -> Packet {
    Packet::tcp(private(i), 10_000 + k as u16, dst(k), 443, tcp_flags::SYN)
}

/// An engine holding `per` flows for each of the 1000 instances.
pub fn loaded(per: usize) -> Engine {
    loaded_with(per, topology())
}

/// The same on a given topology.
pub fn loaded_with(per: usize, topo: Topology) -> Engine {
    let mut e = Engine::new(topo, 0).expect("engine");
    e.reserve_flows(INSTANCES * per);
    for k in 0..per {
        for i in 0..INSTANCES {
            let v = e.process(0, Direction::Outbound, &syn(i, k));
            assert!(matches!(v, Verdict::Translate { .. }), "{v:?}");
        }
    }
    e
}
