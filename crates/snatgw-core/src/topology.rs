//! The validated model of a configuration: instances, public IPs, load balancers, groups.
//!
//! [`Topology::from_config`] checks everything that can be checked without the engine's running
//! state: names and references, address syntax and overlaps, deployment-model rules
//! (SPEC §0, R1.5), pool sizes (R2.8), LB rule settings (R3.7), redeploy reports (R2.11) and the
//! need for a default-SNAT pool (R1.3); NSGs, inbound rules and probes are checked by
//! [`crate::policy::Policy::from_config`] (§4, §5). It also works out, per instance, which LB frontends are
//! candidates for outbound PAT (R1.2, R1.6). It does not decide scenarios or ports: that is the
//! engine's job, since it depends on earlier choices (see [`crate::Engine`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::config::{ConfigFile, InstanceKind, Model};
use crate::error::ConfigError;

/// Largest pool of instances that may share one public IP (SPEC R2.8).
pub const MAX_POOL: usize = 1000;

/// An IPv4 prefix such as `10.0.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// Network address (host bits cleared).
    pub addr: u32,
    /// Prefix length, 0–32.
    pub len: u8,
}

impl Prefix {
    /// Whether `ip` lies inside the prefix.
    pub fn contains(&self, ip: u32) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        };
        ip & mask == self.addr
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.addr), self.len)
    }
}

/// Timer and randomness settings (from `[gateway]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Seed of random choices (R1.6) and of the flow tables' keyed hash.
    pub seed: u64,
    /// Idle timeout, seconds (R3.4).
    pub idle_timeout: u32,
    /// FIN-both-ways release delay, seconds (R3.2).
    pub fin_timeout: u32,
    /// RST release delay, seconds (R3.3).
    pub rst_timeout: u32,
    /// Per-destination port history horizon, seconds (R2.3 decision).
    pub reuse_history: u32,
    /// Live flows the gateway may hold (R9.2).
    pub max_flows: u32,
    /// Event aggregation interval, seconds (R9.3).
    pub event_interval: u32,
}

/// Most flows the engine can index (slab indices are `u32` with one value reserved).
pub const MAX_FLOWS_LIMIT: u32 = 1 << 31;

/// A named public address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicIp {
    /// Name in the config.
    pub name: String,
    /// Address.
    pub addr: u32,
}

/// The group that shares one default-SNAT address (R1.3).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum SnatGroup {
    /// An ARM availability set.
    AvailabilitySet(String),
    /// An ARM instance outside any set: its own set.
    Alone(String),
    /// A Classic deployment.
    Deployment(String),
}

impl fmt::Display for SnatGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnatGroup::AvailabilitySet(n) => write!(f, "availability set {n}"),
            SnatGroup::Alone(n) => write!(f, "instance {n} (no availability set)"),
            SnatGroup::Deployment(n) => write!(f, "deployment {n}"),
        }
    }
}

/// Membership of an instance in a public load balancer's backend pools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbMembership {
    /// Load balancer name.
    pub lb: String,
    /// Frontend addresses that are candidates for outbound PAT, sorted; empty when no
    /// load-balancing rule references the instance's pools (ARM, R1.2: then R1.3 applies).
    pub candidates: Vec<u32>,
}

/// A validated instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Name.
    pub name: Arc<str>,
    /// Kind.
    pub kind: InstanceKind,
    /// Deployment model.
    pub model: Model,
    /// Private address.
    pub private_ip: u32,
    /// Instance-level public IP address, if any (R1.1).
    pub ilpip: Option<u32>,
    /// Group for default SNAT (R1.3).
    pub group: SnatGroup,
    /// LB membership (R1.2), if any.
    pub lb: Option<LbMembership>,
    /// Live flows it may hold (R9.2).
    pub max_flows: u32,
}

/// A validated Classic deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// Name.
    pub name: String,
    /// Actual number of instances.
    pub actual: u32,
    /// Size reported while redeploying (R2.11), if redeploying.
    pub reported: Option<u32>,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// Settings.
    pub params: Params,
    /// VNet address space (R1.7).
    pub vnet: Vec<Prefix>,
    /// Default-SNAT pool (R1.3), in configured order.
    pub default_pool: Vec<u32>,
    /// Named public IPs.
    pub public_ips: Vec<PublicIp>,
    /// Instances, in configured order.
    pub instances: Vec<Instance>,
    /// Classic deployments.
    pub deployments: Vec<Deployment>,
    /// NSGs, inbound load-balancing rules and health probes (SPEC §4, §5).
    pub policy: crate::policy::Policy,
    /// The file it came from.
    pub source: ConfigFile,
}

/// Parses a dotted-quad IPv4 address, naming `field` on error.
pub fn parse_ipv4(field: &str, s: &str) -> Result<u32, ConfigError> {
    s.trim()
        .parse::<Ipv4Addr>()
        .map(u32::from)
        .map_err(|_| ConfigError::Invalid {
            field: field.into(),
            value: s.into(),
            reason: "not an IPv4 address".into(),
        })
}

/// Parses `a.b.c.d/len`, naming `field` on error. Host bits must be zero.
pub fn parse_prefix(field: &str, s: &str) -> Result<Prefix, ConfigError> {
    let bad = |reason: &str| ConfigError::Invalid {
        field: field.into(),
        value: s.into(),
        reason: reason.into(),
    };
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| bad("expected a.b.c.d/len"))?;
    let addr = parse_ipv4(field, a)?;
    let len: u8 = l.parse().map_err(|_| bad("prefix length must be 0-32"))?;
    if len > 32 {
        return Err(bad("prefix length must be 0-32"));
    }
    let p = Prefix { addr, len };
    if !p.contains(addr) {
        return Err(bad("host bits are set"));
    }
    Ok(p)
}

fn check_unique<'a>(
    field: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for n in names {
        if n.is_empty() {
            return Err(ConfigError::Invalid {
                field: field.into(),
                value: String::new(),
                reason: "a name must not be empty".into(),
            });
        }
        if !seen.insert(n) {
            return Err(ConfigError::DuplicateName {
                field: field.into(),
                name: n.into(),
            });
        }
    }
    Ok(())
}

fn check_secs(field: &str, v: u32, min: u32) -> Result<(), ConfigError> {
    if v < min || v > 86_400 {
        return Err(ConfigError::Invalid {
            field: field.into(),
            value: v.to_string(),
            reason: format!("must be between {min} and 86400 seconds"),
        });
    }
    Ok(())
}

impl Topology {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_config(ConfigFile::from_toml(text)?)
    }

    /// Validates a parsed file.
    pub fn from_config(cfg: ConfigFile) -> Result<Self, ConfigError> {
        let g = &cfg.gateway;
        check_secs("gateway.idle_timeout_secs", g.idle_timeout_secs, 1)?;
        check_secs("gateway.fin_timeout_secs", g.fin_timeout_secs, 1)?;
        check_secs("gateway.rst_timeout_secs", g.rst_timeout_secs, 1)?;
        check_secs(
            "gateway.port_reuse_history_secs",
            g.port_reuse_history_secs,
            0,
        )?;
        check_secs("gateway.event_interval_secs", g.event_interval_secs, 1)?;
        let check_flows = |field: &str, v: u64| -> Result<u32, ConfigError> {
            if v == 0 || v > u64::from(MAX_FLOWS_LIMIT) {
                return Err(ConfigError::Invalid {
                    field: field.into(),
                    value: v.to_string(),
                    reason: format!("a flow limit is between 1 and {MAX_FLOWS_LIMIT} (SPEC R9.2)"),
                });
            }
            Ok(v as u32)
        };
        if g.flow_memory_mib == 0 {
            return Err(ConfigError::Invalid {
                field: "gateway.flow_memory_mib".into(),
                value: "0".into(),
                reason: "the flow table needs a memory budget of at least 1 MiB (SPEC R9.2)".into(),
            });
        }
        let max_flows = match g.max_flows {
            Some(n) => check_flows("gateway.max_flows", u64::from(n))?,
            None => (u64::from(g.flow_memory_mib) * (1 << 20)
                / crate::config::BYTES_PER_FLOW_BUDGET)
                .clamp(1, u64::from(MAX_FLOWS_LIMIT)) as u32,
        };
        check_flows(
            "gateway.max_flows_per_instance",
            u64::from(g.max_flows_per_instance),
        )?;
        let params = Params {
            seed: g.seed,
            idle_timeout: g.idle_timeout_secs,
            fin_timeout: g.fin_timeout_secs,
            rst_timeout: g.rst_timeout_secs,
            reuse_history: g.port_reuse_history_secs,
            max_flows,
            event_interval: g.event_interval_secs,
        };

        let mut vnet = Vec::new();
        for (i, p) in g.vnet_prefixes.iter().enumerate() {
            vnet.push(parse_prefix(&format!("gateway.vnet_prefixes[{i}]"), p)?);
        }
        if vnet.is_empty() {
            return Err(ConfigError::Invalid {
                field: "gateway.vnet_prefixes".into(),
                value: "[]".into(),
                reason: "the virtual network needs at least one prefix (SPEC R1.7)".into(),
            });
        }
        let in_vnet = |ip: u32| vnet.iter().find(|p| p.contains(ip));

        // Every public address, with who uses it, to refuse duplicates and overlaps.
        let mut public_owner: HashMap<u32, String> = HashMap::new();
        let mut claim = |field: &str, addr: u32, who: String| -> Result<(), ConfigError> {
            if let Some(p) = in_vnet(addr) {
                return Err(ConfigError::DuplicateAddress {
                    field: field.into(),
                    address: Ipv4Addr::from(addr).to_string(),
                    other: format!("the virtual network {p} (gateway.vnet_prefixes)"),
                });
            }
            if let Some(other) = public_owner.get(&addr) {
                return Err(ConfigError::DuplicateAddress {
                    field: field.into(),
                    address: Ipv4Addr::from(addr).to_string(),
                    other: other.clone(),
                });
            }
            public_owner.insert(addr, who);
            Ok(())
        };

        check_unique(
            "public_ip.name",
            cfg.public_ip.iter().map(|p| p.name.as_str()),
        )?;
        let mut public_ips = Vec::new();
        let mut pip_by_name = HashMap::new();
        for p in &cfg.public_ip {
            let field = format!("public_ip[{}].address", p.name);
            let addr = parse_ipv4(&field, &p.address)?;
            claim(&field, addr, format!("public_ip[{}]", p.name))?;
            pip_by_name.insert(p.name.as_str(), addr);
            public_ips.push(PublicIp {
                name: p.name.clone(),
                addr,
            });
        }
        let mut default_pool = Vec::new();
        for (i, a) in g.default_snat_pool.iter().enumerate() {
            let field = format!("gateway.default_snat_pool[{i}]");
            let addr = parse_ipv4(&field, a)?;
            claim(&field, addr, field.clone())?;
            default_pool.push(addr);
        }

        check_unique(
            "availability_set.name",
            cfg.availability_set.iter().map(|a| a.name.as_str()),
        )?;
        let avsets: HashSet<&str> = cfg
            .availability_set
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        check_unique(
            "deployment.name",
            cfg.deployment.iter().map(|d| d.name.as_str()),
        )?;
        let deployment_names: HashSet<&str> =
            cfg.deployment.iter().map(|d| d.name.as_str()).collect();

        check_unique(
            "instance.name",
            cfg.instance.iter().map(|i| i.name.as_str()),
        )?;
        let mut instances = Vec::new();
        let mut inst_idx: HashMap<&str, usize> = HashMap::new();
        let mut private_owner: HashMap<u32, &str> = HashMap::new();
        let mut ilpip_owner: HashMap<u32, &str> = HashMap::new();
        let mut deployment_count: BTreeMap<&str, u32> = BTreeMap::new();
        for ic in &cfg.instance {
            let f = |x: &str| format!("instance[{}].{x}", ic.name);
            let private_ip = parse_ipv4(&f("private_ip"), &ic.private_ip)?;
            if in_vnet(private_ip).is_none() {
                return Err(ConfigError::Invalid {
                    field: f("private_ip"),
                    value: ic.private_ip.clone(),
                    reason: "not inside gateway.vnet_prefixes".into(),
                });
            }
            if let Some(other) = private_owner.insert(private_ip, &ic.name) {
                return Err(ConfigError::DuplicateAddress {
                    field: f("private_ip"),
                    address: ic.private_ip.clone(),
                    other: format!("instance[{other}]"),
                });
            }
            if ic.kind == InstanceKind::WebWorkerRole && ic.model != Model::Classic {
                return Err(ConfigError::Model {
                    field: f("kind"),
                    reason: "web_worker_role exists only in the Classic model (SPEC §0): set model = \"classic\"".into(),
                });
            }
            let ilpip = match &ic.public_ip {
                None => None,
                Some(_) if ic.kind == InstanceKind::WebWorkerRole => {
                    return Err(ConfigError::WebWorkerRoleIlpip {
                        field: f("public_ip"),
                    })
                }
                Some(n) => {
                    let addr = *pip_by_name.get(n.as_str()).ok_or_else(|| {
                        ConfigError::UnknownReference {
                            field: f("public_ip"),
                            what: "public_ip",
                            name: n.clone(),
                        }
                    })?;
                    if let Some(other) = ilpip_owner.insert(addr, &ic.name) {
                        return Err(ConfigError::DuplicateAddress {
                            field: f("public_ip"),
                            address: Ipv4Addr::from(addr).to_string(),
                            other: format!(
                                "instance[{other}].public_ip (an ILPIP is 1:1, SPEC R1.1)"
                            ),
                        });
                    }
                    Some(addr)
                }
            };
            let group = match ic.model {
                Model::Arm => {
                    if ic.deployment.is_some() {
                        return Err(ConfigError::Model {
                            field: f("deployment"),
                            reason:
                                "deployments are Classic; an ARM instance uses availability_set"
                                    .into(),
                        });
                    }
                    match &ic.availability_set {
                        Some(a) if avsets.contains(a.as_str()) => {
                            SnatGroup::AvailabilitySet(a.clone())
                        }
                        Some(a) => {
                            return Err(ConfigError::UnknownReference {
                                field: f("availability_set"),
                                what: "availability_set",
                                name: a.clone(),
                            })
                        }
                        None => SnatGroup::Alone(ic.name.clone()),
                    }
                }
                Model::Classic => {
                    if ic.availability_set.is_some() {
                        return Err(ConfigError::Model {
                            field: f("availability_set"),
                            reason: "availability sets are ARM; a Classic instance belongs to a deployment".into(),
                        });
                    }
                    match &ic.deployment {
                        Some(d) if deployment_names.contains(d.as_str()) => {
                            *deployment_count.entry(d.as_str()).or_default() += 1;
                            SnatGroup::Deployment(d.clone())
                        }
                        Some(d) => {
                            return Err(ConfigError::UnknownReference {
                                field: f("deployment"),
                                what: "deployment",
                                name: d.clone(),
                            })
                        }
                        None => {
                            return Err(ConfigError::Model {
                                field: f("deployment"),
                                reason: "a Classic instance must name its deployment (SPEC R1.3)"
                                    .into(),
                            })
                        }
                    }
                }
            };
            let max_flows = match ic.max_flows {
                Some(n) => check_flows(&f("max_flows"), u64::from(n))?,
                None => g.max_flows_per_instance,
            };
            inst_idx.insert(ic.name.as_str(), instances.len());
            instances.push(Instance {
                name: Arc::from(ic.name.as_str()),
                kind: ic.kind,
                model: ic.model,
                private_ip,
                ilpip,
                group,
                lb: None,
                max_flows,
            });
        }

        check_unique(
            "load_balancer.name",
            cfg.load_balancer.iter().map(|l| l.name.as_str()),
        )?;
        let mut frontend_owner: HashMap<u32, String> = HashMap::new();
        for lb in &cfg.load_balancer {
            let lf = |x: String| format!("load_balancer[{}].{x}", lb.name);
            check_unique(
                &lf("frontends.name".into()),
                lb.frontends.iter().map(|x| x.name.as_str()),
            )?;
            check_unique(
                &lf("backend_pools.name".into()),
                lb.backend_pools.iter().map(|x| x.name.as_str()),
            )?;
            check_unique(
                &lf("rules.name".into()),
                lb.rules.iter().map(|x| x.name.as_str()),
            )?;
            let mut fe_addr = HashMap::new();
            for fe in &lb.frontends {
                let field = lf(format!("frontends[{}].public_ip", fe.name));
                let addr = *pip_by_name.get(fe.public_ip.as_str()).ok_or_else(|| {
                    ConfigError::UnknownReference {
                        field: field.clone(),
                        what: "public_ip",
                        name: fe.public_ip.clone(),
                    }
                })?;
                if let Some(owner) = ilpip_owner.get(&addr) {
                    return Err(ConfigError::DuplicateAddress {
                        field,
                        address: Ipv4Addr::from(addr).to_string(),
                        other: format!("instance[{owner}].public_ip"),
                    });
                }
                if let Some(other) = frontend_owner.insert(addr, field.clone()) {
                    return Err(ConfigError::DuplicateAddress {
                        field,
                        address: Ipv4Addr::from(addr).to_string(),
                        other,
                    });
                }
                fe_addr.insert(fe.name.as_str(), addr);
            }
            let mut pool_members: HashMap<&str, Vec<usize>> = HashMap::new();
            for bp in &lb.backend_pools {
                let field = lf(format!("backend_pools[{}].members", bp.name));
                if bp.members.len() > MAX_POOL {
                    return Err(ConfigError::PoolTooLarge {
                        field,
                        address: "(backend pool)".into(),
                        size: bp.members.len(),
                    });
                }
                let mut v = Vec::new();
                let mut seen = HashSet::new();
                for m in &bp.members {
                    let &i =
                        inst_idx
                            .get(m.as_str())
                            .ok_or_else(|| ConfigError::UnknownReference {
                                field: field.clone(),
                                what: "instance",
                                name: m.clone(),
                            })?;
                    if !seen.insert(i) {
                        return Err(ConfigError::DuplicateName {
                            field: field.clone(),
                            name: m.clone(),
                        });
                    }
                    if instances[i].model != lb.model {
                        return Err(ConfigError::Model {
                            field: field.clone(),
                            reason: format!(
                                "instance `{m}` is {:?} but the load balancer is {:?}",
                                instances[i].model, lb.model
                            ),
                        });
                    }
                    if let Some(other) = &instances[i].lb {
                        if other.lb != lb.name {
                            return Err(ConfigError::Model {
                                field: field.clone(),
                                reason: format!(
                                    "instance `{m}` is already in a pool of public load balancer `{}`; an instance belongs to one public load balancer",
                                    other.lb
                                ),
                            });
                        }
                    }
                    instances[i].lb = Some(LbMembership {
                        lb: lb.name.clone(),
                        candidates: Vec::new(),
                    });
                    v.push(i);
                }
                pool_members.insert(bp.name.as_str(), v);
            }
            let mut rules_for_pool: HashMap<&str, Vec<u32>> = HashMap::new();
            for r in &lb.rules {
                let rf = |x: &str| lf(format!("rules[{}].{x}", r.name));
                let fa = *fe_addr.get(r.frontend.as_str()).ok_or_else(|| {
                    ConfigError::UnknownReference {
                        field: rf("frontend"),
                        what: "frontend",
                        name: r.frontend.clone(),
                    }
                })?;
                if !pool_members.contains_key(r.backend_pool.as_str()) {
                    return Err(ConfigError::UnknownReference {
                        field: rf("backend_pool"),
                        what: "backend pool",
                        name: r.backend_pool.clone(),
                    });
                }
                for (name, port) in [
                    ("frontend_port", r.frontend_port),
                    ("backend_port", r.backend_port),
                ] {
                    if port == 0 {
                        return Err(ConfigError::Invalid {
                            field: rf(name),
                            value: "0".into(),
                            reason: "a port must be 1-65535".into(),
                        });
                    }
                }
                if !(4..=30).contains(&r.idle_timeout_minutes) {
                    return Err(ConfigError::Invalid {
                        field: rf("idle_timeout_minutes"),
                        value: r.idle_timeout_minutes.to_string(),
                        reason:
                            "an inbound idle timeout is settable from 4 to 30 minutes (SPEC R3.7)"
                                .into(),
                    });
                }
                rules_for_pool
                    .entry(r.backend_pool.as_str())
                    .or_default()
                    .push(fa);
            }
            // Outbound candidates (R1.2, R1.6).
            let all_frontends: Vec<u32> = fe_addr.values().copied().collect();
            for (pool, members) in &pool_members {
                let cands: Vec<u32> = match lb.model {
                    // ARM: only frontends of rules that reference this pool.
                    Model::Arm => rules_for_pool.get(pool).cloned().unwrap_or_default(),
                    // Classic: the pool membership of a load-balanced endpoint is enough.
                    Model::Classic => all_frontends.clone(),
                };
                for &i in members {
                    if let Some(m) = instances[i].lb.as_mut() {
                        m.candidates.extend(&cands);
                    }
                }
            }
        }
        for inst in &mut instances {
            if let Some(m) = inst.lb.as_mut() {
                m.candidates.sort_unstable();
                m.candidates.dedup();
            }
        }

        // R2.8 for frontends: instances that may use a frontend for PAT.
        let mut frontend_share: HashMap<u32, usize> = HashMap::new();
        for inst in instances.iter().filter(|i| i.ilpip.is_none()) {
            if let Some(m) = &inst.lb {
                for &a in &m.candidates {
                    *frontend_share.entry(a).or_default() += 1;
                }
            }
        }
        for (addr, n) in &frontend_share {
            if *n > MAX_POOL {
                return Err(ConfigError::PoolTooLarge {
                    field: frontend_owner.get(addr).cloned().unwrap_or_default(),
                    address: Ipv4Addr::from(*addr).to_string(),
                    size: *n,
                });
            }
        }

        let mut deployments = Vec::new();
        for d in &cfg.deployment {
            let actual = deployment_count.get(d.name.as_str()).copied().unwrap_or(0);
            if let Some(r) = d.redeploy_reported_instances {
                if r < actual || r > actual.saturating_mul(2).max(1) {
                    return Err(ConfigError::Invalid {
                        field: format!("deployment[{}].redeploy_reported_instances", d.name),
                        value: r.to_string(),
                        reason: format!(
                            "while redeploying, the reported pool is between the actual size ({actual}) and twice it (SPEC R2.11)"
                        ),
                    });
                }
            }
            deployments.push(Deployment {
                name: d.name.clone(),
                actual,
                reported: d.redeploy_reported_instances,
            });
        }

        // R1.3: who needs default SNAT, and group sizes.
        let mut group_size: BTreeMap<&SnatGroup, usize> = BTreeMap::new();
        let mut need = Vec::new();
        for inst in &instances {
            let lb_ok = inst.lb.as_ref().is_some_and(|m| !m.candidates.is_empty());
            if inst.ilpip.is_none() && !lb_ok {
                need.push(inst.name.clone());
                *group_size.entry(&inst.group).or_default() += 1;
            }
        }
        if !need.is_empty() && default_pool.is_empty() {
            return Err(ConfigError::EmptyDefaultPool {
                count: need.len(),
                example: need[0].to_string(),
            });
        }
        for (grp, n) in group_size {
            if n > MAX_POOL {
                return Err(ConfigError::PoolTooLarge {
                    field: "gateway.default_snat_pool".into(),
                    address: format!("(default SNAT for {grp})"),
                    size: n,
                });
            }
        }

        let pat_frontends: HashSet<u32> = frontend_share.keys().copied().collect();
        let policy = crate::policy::Policy::from_config(&cfg, &instances, &vnet, &pat_frontends)?;

        Ok(Topology {
            params,
            vnet,
            default_pool,
            public_ips,
            instances,
            deployments,
            policy,
            source: cfg,
        })
    }

    /// Whether `ip` is inside the virtual network (R1.7).
    pub fn in_vnet(&self, ip: u32) -> bool {
        self.vnet.iter().any(|p| p.contains(ip))
    }
}
