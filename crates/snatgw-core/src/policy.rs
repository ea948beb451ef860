//! The validated inbound/security policy of a configuration: network security groups
//! (SPEC §4) and the inbound side of load balancers — rules and health probes (§5, R3.7).
//!
//! [`Policy::from_config`] checks every `[[nsg]]` and every load balancer's rules and probes
//! as far as they concern inbound traffic, naming field and rule on error, and
//! [`Nsg::evaluate`] decides one packet against one NSG (R4.1, R4.2). This module is pure: it
//! keeps no state, counts nothing and sees no packets flow; the engine's `nsg` and `inbound`
//! modules do that (hit counters, stateful return traffic R4.4, sticky LB flows R5.1, probe
//! state R5.2).
//!
//! Decisions (docs/DESIGN.md "Security groups and inbound load balancing"):
//! - Rules see the instance's **private** address as its side of the packet (as in the cloud:
//!   an ILPIP or LB frontend is translated before the NSG is evaluated).
//! - Service tags: `VirtualNetwork` = `gateway.vnet_prefixes`; `AzureLoadBalancer` = the
//!   probe source [`PROBE_SOURCE`] (168.63.129.16, the cloud's address); `Internet` =
//!   everything else.
//! - ICMP and ESP have no ports: a rule's port ranges do not restrict them.
//! - A frontend port of an inbound rule on a public IP that instances use for outbound PAT
//!   must lie below the SNAT range (1–1023, SPEC R2.4 decision), so inbound rules and SNAT
//!   ports can never claim the same public 5-tuple (R2.2).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::config::{
    ConfigFile, LbRuleCfg, LoadBalancerCfg, NsgAccess, NsgCfg, NsgDirection, NsgProtocol,
    NsgRuleCfg, ProbeCfg, ProbeProtocol, RuleProtocol,
};
use crate::error::{ConfigError, Rule};
use crate::packet::proto;
use crate::topology::{check_unique, parse_ipv4, parse_prefix, Instance, Prefix};
use crate::units::PORT_BASE;

/// The source address the NSG sees for health probes, and that tag `AzureLoadBalancer`
/// stands for: 168.63.129.16, as in the cloud. The prober really connects from the
/// gateway's private-side address; the NSG decision is made for this address.
pub const PROBE_SOURCE: u32 = u32::from_be_bytes([168, 63, 129, 16]);

/// Lowest and highest priority of a user rule (SPEC R4.1).
pub const PRIORITY_MIN: u32 = 100;
/// See [`PRIORITY_MIN`].
pub const PRIORITY_MAX: u32 = 4096;

/// An address match of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddrMatch {
    /// `*`.
    Any,
    /// A prefix (an address is a /32).
    Prefix(Prefix),
    /// Tag `VirtualNetwork`.
    VirtualNetwork,
    /// Tag `Internet`.
    Internet,
    /// Tag `AzureLoadBalancer`.
    AzureLoadBalancer,
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port.
    pub hi: u16,
}

/// A validated security rule (user or default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsgRule {
    /// Name.
    pub name: String,
    /// Priority (user 100–4096, default 65000 and up).
    pub priority: u32,
    /// Direction.
    pub direction: NsgDirection,
    /// Allow or deny.
    pub access: NsgAccess,
    /// IP protocol number, `None` = any.
    pub proto: Option<u8>,
    /// Source matches (any of them).
    pub src: Vec<AddrMatch>,
    /// Source port ranges (any of them; empty = any).
    pub src_ports: Vec<PortRange>,
    /// Destination matches.
    pub dst: Vec<AddrMatch>,
    /// Destination port ranges (empty = any).
    pub dst_ports: Vec<PortRange>,
    /// Whether it is one of the default rules (R4.2).
    pub default: bool,
}

/// A validated NSG: user rules then the default rules, each direction sorted by priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nsg {
    /// Name.
    pub name: String,
    /// All rules, sorted by (direction, priority); the last rule of each direction is a deny-all.
    pub rules: Vec<NsgRule>,
}

/// What [`Nsg::evaluate`] is asked about. `sport: None` matches any source port range (a
/// health probe, whose source port is not known before it is sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// Inbound (towards the instance) or outbound.
    pub direction: NsgDirection,
    /// IP protocol number.
    pub proto: u8,
    /// Source address.
    pub src: u32,
    /// Source port.
    pub sport: Option<u16>,
    /// Destination address.
    pub dst: u32,
    /// Destination port.
    pub dport: u16,
}

fn addr_matches(m: &AddrMatch, a: u32, vnet: &[Prefix]) -> bool {
    match m {
        AddrMatch::Any => true,
        AddrMatch::Prefix(p) => p.contains(a),
        AddrMatch::VirtualNetwork => vnet.iter().any(|p| p.contains(a)),
        AddrMatch::AzureLoadBalancer => a == PROBE_SOURCE,
        AddrMatch::Internet => a != PROBE_SOURCE && !vnet.iter().any(|p| p.contains(a)),
    }
}

fn ports_match(r: &[PortRange], port: Option<u16>, ported: bool) -> bool {
    if r.is_empty() || !ported {
        return true;
    }
    match port {
        None => true,
        Some(p) => r.iter().any(|x| x.lo <= p && p <= x.hi),
    }
}

impl NsgRule {
    /// Whether the rule matches `q` (its direction included).
    pub fn matches(&self, q: &Query, vnet: &[Prefix]) -> bool {
        let ported = q.proto == proto::TCP || q.proto == proto::UDP;
        self.direction == q.direction
            && self.proto.is_none_or(|p| p == q.proto)
            && self.src.iter().any(|m| addr_matches(m, q.src, vnet))
            && self.dst.iter().any(|m| addr_matches(m, q.dst, vnet))
            && ports_match(&self.src_ports, q.sport, ported)
            && ports_match(&self.dst_ports, Some(q.dport), ported)
    }
}

impl Nsg {
    /// The index in [`Nsg::rules`] of the rule that decides `q`: the matching rule of lowest
    /// priority (R4.1). A default deny-all always matches last (R4.2).
    pub fn evaluate(&self, q: &Query, vnet: &[Prefix]) -> usize {
        self.rules
            .iter()
            .position(|r| r.matches(q, vnet))
            .unwrap_or(self.rules.len() - 1)
    }
}

/// The default rules of every NSG (SPEC R4.2).
pub fn default_rules() -> Vec<NsgRule> {
    let r = |name: &str, priority, direction, access, src, dst| NsgRule {
        name: name.into(),
        priority,
        direction,
        access,
        proto: None,
        src: vec![src],
        src_ports: Vec::new(),
        dst: vec![dst],
        dst_ports: Vec::new(),
        default: true,
    };
    use AddrMatch::*;
    use NsgAccess::*;
    use NsgDirection::*;
    vec![
        r(
            "AllowVnetInBound",
            65000,
            Inbound,
            Allow,
            VirtualNetwork,
            VirtualNetwork,
        ),
        r(
            "AllowAzureLoadBalancerInBound",
            65001,
            Inbound,
            Allow,
            AzureLoadBalancer,
            Any,
        ),
        r("DenyAllInBound", 65500, Inbound, Deny, Any, Any),
        r(
            "AllowVnetOutBound",
            65000,
            Outbound,
            Allow,
            VirtualNetwork,
            VirtualNetwork,
        ),
        r(
            "AllowInternetOutBound",
            65001,
            Outbound,
            Allow,
            Any,
            Internet,
        ),
        r("DenyAllOutBound", 65500, Outbound, Deny, Any, Any),
    ]
}

/// A validated health probe (SPEC R5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Load balancer.
    pub lb: String,
    /// Name.
    pub name: String,
    /// TCP connect or HTTP GET.
    pub protocol: ProbeProtocol,
    /// Port probed on each member.
    pub port: u16,
    /// HTTP path.
    pub path: String,
    /// Seconds between probes.
    pub interval: u32,
    /// Consecutive failures that mark a member down.
    pub threshold: u32,
    /// Members probed (instances of the pools of the rules using it), in configured order.
    pub members: Vec<Arc<str>>,
}

/// A validated inbound load-balancing rule (SPEC R5.1, R3.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRule {
    /// Load balancer.
    pub lb: String,
    /// Rule name.
    pub name: String,
    /// Frontend address.
    pub frontend: u32,
    /// Carries TCP.
    pub tcp: bool,
    /// Carries UDP.
    pub udp: bool,
    /// Frontend port.
    pub frontend_port: u16,
    /// Backend port.
    pub backend_port: u16,
    /// Pool members, in configured order.
    pub members: Vec<Arc<str>>,
    /// Index into [`Policy::probes`].
    pub probe: Option<usize>,
    /// Inbound idle timeout, seconds (R3.7).
    pub idle_timeout: u32,
}

/// The validated policy: NSGs with associations, inbound rules and probes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// NSGs, in configured order.
    pub nsgs: Vec<Nsg>,
    /// NIC association: instance name → index into `nsgs`.
    pub nic: BTreeMap<Arc<str>, usize>,
    /// Subnet associations: prefix → index into `nsgs` (prefixes never overlap).
    pub subnets: Vec<(Prefix, usize)>,
    /// Inbound load-balancing rules.
    pub rules: Vec<InboundRule>,
    /// Health probes.
    pub probes: Vec<Probe>,
}

fn invalid(
    field: String,
    value: impl ToString,
    reason: impl Into<String>,
    rule: Option<Rule>,
) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
        rule,
    }
}

fn parse_addr_match(field: &str, s: &str) -> Result<AddrMatch, ConfigError> {
    let t = s.trim();
    Ok(match t.to_ascii_lowercase().as_str() {
        "*" | "any" => AddrMatch::Any,
        "virtualnetwork" => AddrMatch::VirtualNetwork,
        "internet" => AddrMatch::Internet,
        "azureloadbalancer" => AddrMatch::AzureLoadBalancer,
        _ if t.contains('/') => AddrMatch::Prefix(parse_prefix(field, t)?),
        _ => match t.parse::<Ipv4Addr>() {
            Ok(a) => AddrMatch::Prefix(Prefix {
                addr: u32::from(a),
                len: 32,
            }),
            Err(_) => {
                return Err(invalid(
                    field.into(),
                    s,
                    "expected `*`, a prefix a.b.c.d/len, an address or a service tag (VirtualNetwork, Internet, AzureLoadBalancer) (SPEC R4.1)", Some(Rule::new(4, 1)),
                ))
            }
        },
    })
}

fn parse_ports(field: &str, list: &[String]) -> Result<Vec<PortRange>, ConfigError> {
    let mut out = Vec::new();
    if list.is_empty() {
        return Err(invalid(
            field.into(),
            "[]",
            "at least one port range (or `*`) (SPEC R4.1)",
            Some(Rule::new(4, 1)),
        ));
    }
    for (i, s) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let t = s.trim();
        if t == "*" {
            return Ok(Vec::new());
        }
        let bad = || {
            invalid(
                f.clone(),
                s,
                "expected `*`, a port 1-65535 or a range lo-hi (SPEC R4.1)",
                Some(Rule::new(4, 1)),
            )
        };
        let (lo, hi) = match t.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (t, t),
        };
        let lo: u16 = lo.parse().map_err(|_| bad())?;
        let hi: u16 = hi.parse().map_err(|_| bad())?;
        if lo == 0 || hi < lo {
            return Err(bad());
        }
        out.push(PortRange { lo, hi });
    }
    Ok(out)
}

fn parse_addrs(field: &str, list: &[String]) -> Result<Vec<AddrMatch>, ConfigError> {
    if list.is_empty() {
        return Err(invalid(
            field.into(),
            "[]",
            "at least one address, prefix, tag or `*` (SPEC R4.1)",
            Some(Rule::new(4, 1)),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, s)| parse_addr_match(&format!("{field}[{i}]"), s))
        .collect()
}

fn rule_of(f: &dyn Fn(&str) -> String, r: &NsgRuleCfg) -> Result<NsgRule, ConfigError> {
    if !(PRIORITY_MIN..=PRIORITY_MAX).contains(&r.priority) {
        return Err(invalid(
            f("priority"),
            r.priority,
            format!("outside {PRIORITY_MIN}-{PRIORITY_MAX} (SPEC R4.1)"),
            Some(Rule::new(4, 1)),
        ));
    }
    let proto = match r.protocol {
        NsgProtocol::Tcp => Some(proto::TCP),
        NsgProtocol::Udp => Some(proto::UDP),
        NsgProtocol::Icmp => Some(proto::ICMP),
        NsgProtocol::Esp => Some(proto::ESP),
        NsgProtocol::Any => None,
    };
    Ok(NsgRule {
        name: r.name.clone(),
        priority: r.priority,
        direction: r.direction,
        access: r.access,
        proto,
        src: parse_addrs(&f("sources"), &r.sources)?,
        src_ports: parse_ports(&f("source_ports"), &r.source_ports)?,
        dst: parse_addrs(&f("destinations"), &r.destinations)?,
        dst_ports: parse_ports(&f("destination_ports"), &r.destination_ports)?,
        default: false,
    })
}

/// The rules of NSG `n`: its user rules (names not those of default rules, priorities unique
/// per direction) and the default rules, sorted by (direction, priority).
fn nsg_rules(n: &NsgCfg) -> Result<Vec<NsgRule>, ConfigError> {
    check_unique(
        &format!("nsg[{}].rules.name", n.name),
        n.rules.iter().map(|r| r.name.as_str()),
    )?;
    let defaults = default_rules();
    let mut rules = Vec::new();
    let mut prio: HashMap<(NsgDirection, u32), &str> = HashMap::new();
    for r in &n.rules {
        let f = |x: &str| format!("nsg[{}].rules[{}].{x}", n.name, r.name);
        if defaults
            .iter()
            .any(|d| d.name.eq_ignore_ascii_case(&r.name))
        {
            return Err(invalid(
                f("name"),
                &r.name,
                "the name of a default rule, which every NSG has (SPEC R4.2)",
                Some(Rule::new(4, 2)),
            ));
        }
        let rule = rule_of(&f, r)?;
        if let Some(other) = prio.insert((r.direction, r.priority), &r.name) {
            return Err(invalid(
                f("priority"),
                r.priority,
                format!(
                    "rule `{other}` has the same priority and direction; priorities are unique per direction (SPEC R4.1)"
                ), Some(Rule::new(4, 1)),
            ));
        }
        rules.push(rule);
    }
    rules.extend(defaults);
    rules.sort_by_key(|r| (r.direction, r.priority));
    Ok(rules)
}

/// A validated probe of `lb` (SPEC R5.2), without members.
fn probe_of(lb: &LoadBalancerCfg, p: &ProbeCfg) -> Result<Probe, ConfigError> {
    let f = |x: &str| format!("load_balancer[{}].probes[{}].{x}", lb.name, p.name);
    if p.port == 0 {
        return Err(invalid(
            f("port"),
            0,
            "a port must be 1-65535 (SPEC R5.2)",
            Some(Rule::new(5, 2)),
        ));
    }
    if !(1..=3600).contains(&p.interval_secs) {
        return Err(invalid(
            f("interval_secs"),
            p.interval_secs,
            "a probe interval is 1-3600 seconds (SPEC R5.2)",
            Some(Rule::new(5, 2)),
        ));
    }
    if !(1..=100).contains(&p.unhealthy_threshold) {
        return Err(invalid(
            f("unhealthy_threshold"),
            p.unhealthy_threshold,
            "an unhealthy threshold is 1-100 probes (SPEC R5.2)",
            Some(Rule::new(5, 2)),
        ));
    }
    let path = match (p.protocol, &p.path) {
        (ProbeProtocol::Tcp, Some(x)) => {
            return Err(invalid(
                f("path"),
                x,
                "a TCP probe has no path; use protocol = \"http\" (SPEC R5.2)",
                Some(Rule::new(5, 2)),
            ))
        }
        (ProbeProtocol::Tcp, None) => String::new(),
        (ProbeProtocol::Http, None) => "/".into(),
        (ProbeProtocol::Http, Some(x)) => {
            if !x.starts_with('/') || x.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    f("path"),
                    x,
                    "an HTTP path starts with `/` and has no spaces (SPEC R5.2)",
                    Some(Rule::new(5, 2)),
                ));
            }
            x.clone()
        }
    };
    Ok(Probe {
        lb: lb.name.clone(),
        name: p.name.clone(),
        protocol: p.protocol,
        port: p.port,
        path,
        interval: p.interval_secs,
        threshold: p.unhealthy_threshold,
        members: Vec::new(),
    })
}

/// What the inbound rules of all load balancers are checked against.
struct Inbound<'a> {
    /// Public IP addresses by name (the topology has checked them).
    pip: HashMap<&'a str, u32>,
    /// (protocol, frontend address, frontend port) → the rule field that claimed it (R5.1).
    front_owner: HashMap<(u8, u32, u16), String>,
    pat_frontends: &'a HashSet<u32>,
    idle_override: Option<u32>,
}

impl Inbound<'_> {
    /// Claims (protocol, `addr`, frontend port) of rule `r` for each protocol it carries
    /// (`(carries, protocol)`): one rule per frontend IP, protocol and port (R5.1).
    fn claim_frontend(
        &mut self,
        lb: &LoadBalancerCfg,
        r: &LbRuleCfg,
        addr: u32,
        protocols: [(bool, u8); 2],
    ) -> Result<(), ConfigError> {
        let field = format!("load_balancer[{}].rules[{}].frontend_port", lb.name, r.name);
        for (on, p) in protocols {
            if !on {
                continue;
            }
            if let Some(other) = self
                .front_owner
                .insert((p, addr, r.frontend_port), field.clone())
            {
                return Err(ConfigError::DuplicateAddress {
                    field,
                    address: format!("{}:{}", Ipv4Addr::from(addr), r.frontend_port),
                    other: format!(
                        "{other} (one rule per frontend IP, protocol and port, SPEC R5.1)"
                    ),
                    rule: Some(Rule::new(5, 1)),
                });
            }
        }
        Ok(())
    }

    /// Validates the inbound side of rule `r` of `lb` and adds it to `pol`, with its pool's
    /// members added to its probe's. A rule whose frontend the topology did not resolve is
    /// skipped (it cannot occur in a validated topology).
    fn add_rule(
        &mut self,
        pol: &mut Policy,
        lb: &LoadBalancerCfg,
        r: &LbRuleCfg,
        pools: &HashMap<&str, &Vec<String>>,
        probe_idx: &HashMap<&str, usize>,
    ) -> Result<(), ConfigError> {
        let rf = |x: &str| format!("load_balancer[{}].rules[{}].{x}", lb.name, r.name);
        let Some(fe) = lb.frontends.iter().find(|f| f.name == r.frontend) else {
            return Ok(());
        };
        let Some(&addr) = self.pip.get(fe.public_ip.as_str()) else {
            return Ok(());
        };
        let members: Vec<Arc<str>> = pools
            .get(r.backend_pool.as_str())
            .map(|m| m.iter().map(|n| Arc::from(n.as_str())).collect())
            .unwrap_or_default();
        let probe =
            match &r.probe {
                None => None,
                Some(n) => Some(*probe_idx.get(n.as_str()).ok_or_else(|| {
                    ConfigError::UnknownReference {
                        field: rf("probe"),
                        what: "probe",
                        name: n.clone(),
                    }
                })?),
            };
        if let Some(k) = probe {
            for m in &members {
                if !pol.probes[k].members.contains(m) {
                    pol.probes[k].members.push(m.clone());
                }
            }
        }
        if r.frontend_port >= PORT_BASE && self.pat_frontends.contains(&addr) {
            return Err(invalid(
                rf("frontend_port"),
                r.frontend_port,
                format!(
                    "public IP {} is used for outbound PAT, whose SNAT ports are {PORT_BASE}-65535 (SPEC R2.4); an inbound rule on it uses a frontend port 1-{} so the two never share a public 5-tuple (R2.2)",
                    Ipv4Addr::from(addr),
                    PORT_BASE - 1
                ), Some(Rule::new(2, 4)),
            ));
        }
        let (tcp, udp) = match r.protocol {
            RuleProtocol::Tcp => (true, false),
            RuleProtocol::Udp => (false, true),
            RuleProtocol::All => (true, true),
        };
        self.claim_frontend(lb, r, addr, [(tcp, proto::TCP), (udp, proto::UDP)])?;
        pol.rules.push(InboundRule {
            lb: lb.name.clone(),
            name: r.name.clone(),
            frontend: addr,
            tcp,
            udp,
            frontend_port: r.frontend_port,
            backend_port: r.backend_port,
            members,
            probe,
            idle_timeout: self.idle_override.unwrap_or(r.idle_timeout_minutes * 60),
        });
        Ok(())
    }
}

impl Policy {
    /// Validates the NSGs and the inbound side of the load balancers of `cfg`, given the
    /// already validated `instances` and `vnet` (from [`crate::Topology::from_config`]).
    /// A frontend address that is an outbound PAT candidate of some instance
    /// (`pat_frontends`) accepts inbound rules on ports below the SNAT range only.
    /// Checked in this order: `gateway.inbound_idle_timeout_secs`, the NSGs (names, rules,
    /// NICs, subnets, one NSG after the other), then each load balancer's probes and rules.
    pub fn from_config(
        cfg: &ConfigFile,
        instances: &[Instance],
        vnet: &[Prefix],
        pat_frontends: &HashSet<u32>,
    ) -> Result<Policy, ConfigError> {
        let mut pol = Policy::default();
        let idle_override = cfg.gateway.inbound_idle_timeout_secs;
        if let Some(v) = idle_override {
            if !(1..=86_400).contains(&v) {
                return Err(invalid(
                    "gateway.inbound_idle_timeout_secs".into(),
                    v,
                    "must be between 1 and 86400 seconds (operator override of SPEC R3.7)",
                    Some(Rule::new(3, 7)),
                ));
            }
        }
        pol.add_nsgs(cfg, instances, vnet)?;
        // Load balancers: probes, then the inbound side of the rules. References to
        // frontends and pools were checked by the topology.
        let mut inbound = Inbound {
            pip: cfg
                .public_ip
                .iter()
                .filter_map(|p| Some((p.name.as_str(), parse_ipv4("", &p.address).ok()?)))
                .collect(),
            front_owner: HashMap::new(),
            pat_frontends,
            idle_override,
        };
        for lb in &cfg.load_balancer {
            let probe_idx = pol.add_probes(lb)?;
            let pools: HashMap<&str, &Vec<String>> = lb
                .backend_pools
                .iter()
                .map(|b| (b.name.as_str(), &b.members))
                .collect();
            for r in &lb.rules {
                inbound.add_rule(&mut pol, lb, r, &pools, &probe_idx)?;
            }
        }
        Ok(pol)
    }

    /// Validates the `[[nsg]]` entries and their associations, in configured order.
    fn add_nsgs(
        &mut self,
        cfg: &ConfigFile,
        instances: &[Instance],
        vnet: &[Prefix],
    ) -> Result<(), ConfigError> {
        let inst: HashMap<&str, &Instance> = instances.iter().map(|i| (&*i.name, i)).collect();
        check_unique("nsg.name", cfg.nsg.iter().map(|n| n.name.as_str()))?;
        let mut nic_owner: HashMap<&str, &str> = HashMap::new();
        for (k, n) in cfg.nsg.iter().enumerate() {
            let rules = nsg_rules(n)?;
            for m in &n.nics {
                let field = || format!("nsg[{}].nics", n.name);
                if !inst.contains_key(m.as_str()) {
                    return Err(ConfigError::UnknownReference {
                        field: field(),
                        what: "instance",
                        name: m.clone(),
                    });
                }
                if let Some(other) = nic_owner.insert(m.as_str(), n.name.as_str()) {
                    return Err(ConfigError::Model {
                        field: field(),
                        reason: format!(
                            "instance `{m}` is already associated with NSG `{other}`; a NIC has at most one NSG (SPEC R4.1)"
                        ),
                        rule: Some(Rule::new(4, 1)),
                    });
                }
                self.nic.insert(Arc::from(m.as_str()), k);
            }
            self.add_subnets(cfg, n, k, vnet)?;
            self.nsgs.push(Nsg {
                name: n.name.clone(),
                rules,
            });
        }
        Ok(())
    }

    /// Associates the subnets of NSG `n` (index `k`): prefixes inside the VNet, overlapping
    /// no subnet of an earlier association.
    fn add_subnets(
        &mut self,
        cfg: &ConfigFile,
        n: &NsgCfg,
        k: usize,
        vnet: &[Prefix],
    ) -> Result<(), ConfigError> {
        for (i, s) in n.subnets.iter().enumerate() {
            let field = format!("nsg[{}].subnets[{i}]", n.name);
            let p = parse_prefix(&field, s)?;
            let inside = vnet.iter().any(|v| v.len <= p.len && v.contains(p.addr));
            if !inside {
                return Err(invalid(
                    field,
                    s,
                    "a subnet lies inside gateway.vnet_prefixes (SPEC R4.1)",
                    Some(Rule::new(4, 1)),
                ));
            }
            for (q, o) in &self.subnets {
                if q.contains(p.addr) || p.contains(q.addr) {
                    return Err(ConfigError::DuplicateAddress {
                        field,
                        address: s.clone(),
                        other: format!(
                            "subnet {q} of NSG `{}` (a subnet has at most one NSG)",
                            cfg.nsg[*o].name
                        ),
                        rule: None,
                    });
                }
            }
            self.subnets.push((p, k));
        }
        Ok(())
    }

    /// Validates the probes of `lb` and adds them (without members yet); returns their
    /// indices in [`Policy::probes`] by name.
    fn add_probes<'a>(
        &mut self,
        lb: &'a LoadBalancerCfg,
    ) -> Result<HashMap<&'a str, usize>, ConfigError> {
        check_unique(
            &format!("load_balancer[{}].probes.name", lb.name),
            lb.probes.iter().map(|p| p.name.as_str()),
        )?;
        let mut probe_idx = HashMap::new();
        for p in &lb.probes {
            probe_idx.insert(p.name.as_str(), self.probes.len());
            self.probes.push(probe_of(lb, p)?);
        }
        Ok(probe_idx)
    }
    /// The NSGs that apply to the instance `name` at `private_ip`, in evaluation order for
    /// `direction`: inbound subnet then NIC, outbound NIC then subnet (the cloud's order).
    pub fn nsgs_for(
        &self,
        name: &str,
        private_ip: u32,
        direction: NsgDirection,
    ) -> (Option<usize>, Option<usize>) {
        let nic = self.nic.get(name).copied();
        let subnet = self
            .subnets
            .iter()
            .find(|(p, _)| p.contains(private_ip))
            .map(|&(_, k)| k);
        match direction {
            NsgDirection::Inbound => (subnet, nic),
            NsgDirection::Outbound => (nic, subnet),
        }
    }
}
