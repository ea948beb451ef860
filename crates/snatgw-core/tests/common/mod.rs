#![allow(dead_code)]
//! Shared helpers for the engine's tests.

use std::net::Ipv4Addr;

use snatgw_core::config::{
    AvailabilitySetCfg, BackendPoolCfg, ConfigFile, DeploymentCfg, FrontendCfg, InstanceCfg,
    LbRuleCfg, LoadBalancerCfg, PublicIpCfg, RuleProtocol,
};
use snatgw_core::{tcp_flags, Direction, Engine, Packet, Topology, Verdict};

pub const SYN: u8 = tcp_flags::SYN;
pub const ACK: u8 = tcp_flags::ACK;
pub const FIN_ACK: u8 = tcp_flags::FIN | tcp_flags::ACK;
pub const RST: u8 = tcp_flags::RST;

pub fn ip(s: &str) -> u32 {
    u32::from(s.parse::<Ipv4Addr>().expect("address"))
}

/// The reference topology: an ILPIP VM, two LB VMs (two frontends), an availability set on
/// default SNAT, an ARM VM alone, and a Classic web/worker role.
pub const REFERENCE: &str = r#"
[gateway]
seed = 7
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100", "192.0.2.101"]

[[public_ip]]
name = "pip-ilpip"
address = "203.0.113.10"
[[public_ip]]
name = "pip-fe1"
address = "203.0.113.20"
[[public_ip]]
name = "pip-fe2"
address = "203.0.113.21"

[[availability_set]]
name = "as1"

[[deployment]]
name = "cs1"

[[instance]]
name = "vm-ilpip"
private_ip = "10.0.1.10"
public_ip = "pip-ilpip"

[[instance]]
name = "vm-lb1"
private_ip = "10.0.2.10"

[[instance]]
name = "vm-lb2"
private_ip = "10.0.2.11"

[[instance]]
name = "vm-as1"
private_ip = "10.0.3.10"
availability_set = "as1"

[[instance]]
name = "vm-as2"
private_ip = "10.0.3.11"
availability_set = "as1"

[[instance]]
name = "vm-alone"
private_ip = "10.0.3.20"

[[instance]]
name = "role-0"
kind = "web_worker_role"
model = "classic"
deployment = "cs1"
private_ip = "10.0.4.10"

[[load_balancer]]
name = "lb"
frontends = [ { name = "fe1", public_ip = "pip-fe1" }, { name = "fe2", public_ip = "pip-fe2" } ]
backend_pools = [ { name = "web", members = ["vm-lb1", "vm-lb2"] } ]
rules = [
  { name = "http", frontend = "fe1", protocol = "tcp", frontend_port = 80, backend_pool = "web", backend_port = 80 },
  { name = "https", frontend = "fe2", protocol = "tcp", frontend_port = 443, backend_pool = "web", backend_port = 443 },
]
"#;

pub fn engine(toml: &str) -> Engine {
    Engine::new(Topology::from_toml(toml).expect("valid config"), 0).expect("engine")
}

pub fn reference() -> Engine {
    engine(REFERENCE)
}

/// `n` ARM instances `vm-0..` in one availability set on a single default-SNAT address,
/// plus `extra` instances alone (their own sets).
pub fn pool_config(n: usize) -> ConfigFile {
    let mut c = ConfigFile::default();
    c.gateway.vnet_prefixes = vec!["10.0.0.0/16".into()];
    c.gateway.default_snat_pool = vec!["192.0.2.1".into()];
    c.availability_set
        .push(AvailabilitySetCfg { name: "big".into() });
    for i in 0..n {
        c.instance.push(vm(i, Some("big")));
    }
    c
}

pub fn vm(i: usize, set: Option<&str>) -> InstanceCfg {
    InstanceCfg {
        name: format!("vm-{i}"),
        kind: Default::default(),
        model: Default::default(),
        private_ip: private(i),
        public_ip: None,
        availability_set: set.map(Into::into),
        deployment: None,
        max_flows: None,
    }
}

pub fn private(i: usize) -> String {
    format!("10.0.{}.{}", 1 + i / 250, 1 + i % 250)
}

pub fn private_u32(i: usize) -> u32 {
    ip(&private(i))
}

/// `n` Classic role instances in deployment `cs` behind a classic LB with one frontend.
pub fn classic_config(n: usize, reported: Option<u32>) -> ConfigFile {
    let mut c = ConfigFile::default();
    c.gateway.vnet_prefixes = vec!["10.0.0.0/16".into()];
    c.public_ip.push(PublicIpCfg {
        name: "vip".into(),
        address: "198.51.100.10".into(),
    });
    c.deployment.push(DeploymentCfg {
        name: "cs".into(),
        redeploy_reported_instances: reported,
    });
    let mut members = Vec::new();
    for i in 0..n {
        c.instance.push(InstanceCfg {
            name: format!("role-{i}"),
            kind: snatgw_core::InstanceKind::WebWorkerRole,
            model: snatgw_core::Model::Classic,
            private_ip: private(i),
            public_ip: None,
            availability_set: None,
            deployment: Some("cs".into()),
            max_flows: None,
        });
        members.push(format!("role-{i}"));
    }
    c.load_balancer.push(LoadBalancerCfg {
        name: "cloudservice".into(),
        model: snatgw_core::Model::Classic,
        frontends: vec![FrontendCfg {
            name: "vip".into(),
            public_ip: "vip".into(),
        }],
        backend_pools: vec![BackendPoolCfg {
            name: "roles".into(),
            members,
        }],
        rules: vec![],
        probes: vec![],
    });
    c
}

pub fn lb_rule(name: &str, frontend: &str, pool: &str, port: u16) -> LbRuleCfg {
    LbRuleCfg {
        name: name.into(),
        frontend: frontend.into(),
        protocol: RuleProtocol::Tcp,
        frontend_port: port,
        backend_pool: pool.into(),
        backend_port: port,
        probe: None,
        idle_timeout_minutes: 4,
    }
}

/// [`pool_config`] with an idle timeout long enough that no flow of a test ends by itself.
pub fn pool_config_long_idle(n: usize) -> ConfigFile {
    let mut c = pool_config(n);
    c.gateway.idle_timeout_secs = 3600;
    c
}

/// The engine of [`pool_config_long_idle`]: `n` instances on one default-SNAT address (R2.8:
/// 1024 ports each up to 50 instances, 32 from 801).
pub fn pool_long_idle(n: usize) -> Engine {
    Engine::new(
        Topology::from_config(pool_config_long_idle(n)).expect("valid"),
        0,
    )
    .expect("engine")
}

pub fn out(e: &mut Engine, now: u32, p: Packet) -> Verdict {
    e.process(now, Direction::Outbound, &p)
}

pub fn inb(e: &mut Engine, now: u32, p: Packet) -> Verdict {
    e.process(now, Direction::Inbound, &p)
}

/// Opens a TCP flow (outbound SYN) and returns its public (addr, port), panicking on drop.
pub fn syn(e: &mut Engine, now: u32, src: u32, sport: u16, dst: u32, dport: u16) -> (u32, u16) {
    match out(e, now, Packet::tcp(src, sport, dst, dport, SYN)) {
        Verdict::Translate { addr, port } => (addr, port),
        v => panic!("SYN {src}:{sport} -> {dst}:{dport} not translated: {v:?}"),
    }
}

pub fn translated(v: Verdict) -> (u32, u16) {
    match v {
        Verdict::Translate { addr, port } => (addr, port),
        v => panic!("expected a translation, got {v:?}"),
    }
}
