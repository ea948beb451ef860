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

use crate::config::{
    BackendPoolCfg, ConfigFile, GatewayCfg, InstanceCfg, InstanceKind, LoadBalancerCfg, Model,
};
use crate::error::{ConfigError, Rule};

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
    /// What a refused new flow gets (R9.5).
    pub on_exhaustion: crate::config::OnExhaustion,
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
#[non_exhaustive]
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
            rule: None,
        })
}

/// Parses `a.b.c.d/len`, naming `field` on error. Host bits must be zero.
pub fn parse_prefix(field: &str, s: &str) -> Result<Prefix, ConfigError> {
    let bad = |reason: &str| ConfigError::Invalid {
        field: field.into(),
        value: s.into(),
        reason: reason.into(),
        rule: None,
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

/// Refuses an empty name or a name given twice among `names`, naming `field`.
pub(crate) fn check_unique<'a>(
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
                rule: None,
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
            rule: None,
        });
    }
    Ok(())
}

/// A flow limit (R9.2): 1 to [`MAX_FLOWS_LIMIT`].
fn check_flows(field: &str, v: u64) -> Result<u32, ConfigError> {
    if v == 0 || v > u64::from(MAX_FLOWS_LIMIT) {
        return Err(ConfigError::Invalid {
            field: field.into(),
            value: v.to_string(),
            reason: format!("a flow limit is between 1 and {MAX_FLOWS_LIMIT} (SPEC R9.2)"),
            rule: Some(Rule::new(9, 2)),
        });
    }
    Ok(v as u32)
}

/// The timers, seed and flow limits of `[gateway]`.
fn gateway_params(g: &GatewayCfg) -> Result<Params, ConfigError> {
    check_secs("gateway.idle_timeout_secs", g.idle_timeout_secs, 1)?;
    check_secs("gateway.fin_timeout_secs", g.fin_timeout_secs, 1)?;
    check_secs("gateway.rst_timeout_secs", g.rst_timeout_secs, 1)?;
    check_secs(
        "gateway.port_reuse_history_secs",
        g.port_reuse_history_secs,
        0,
    )?;
    check_secs("gateway.event_interval_secs", g.event_interval_secs, 1)?;
    if g.flow_memory_mib == 0 {
        return Err(ConfigError::Invalid {
            field: "gateway.flow_memory_mib".into(),
            value: "0".into(),
            reason: "the flow table needs a memory budget of at least 1 MiB (SPEC R9.2)".into(),
            rule: Some(Rule::new(9, 2)),
        });
    }
    let max_flows = match g.max_flows {
        Some(n) => check_flows("gateway.max_flows", u64::from(n))?,
        None => (u64::from(g.flow_memory_mib) * (1 << 20) / crate::config::BYTES_PER_FLOW_BUDGET)
            .clamp(1, u64::from(MAX_FLOWS_LIMIT)) as u32,
    };
    check_flows(
        "gateway.max_flows_per_instance",
        u64::from(g.max_flows_per_instance),
    )?;
    Ok(Params {
        seed: g.seed,
        idle_timeout: g.idle_timeout_secs,
        fin_timeout: g.fin_timeout_secs,
        rst_timeout: g.rst_timeout_secs,
        reuse_history: g.port_reuse_history_secs,
        max_flows,
        event_interval: g.event_interval_secs,
        on_exhaustion: g.on_exhaustion,
    })
}

/// The VNet address space (R1.7): at least one prefix.
fn vnet_prefixes(g: &GatewayCfg) -> Result<Vec<Prefix>, ConfigError> {
    let mut vnet = Vec::new();
    for (i, p) in g.vnet_prefixes.iter().enumerate() {
        vnet.push(parse_prefix(&format!("gateway.vnet_prefixes[{i}]"), p)?);
    }
    if vnet.is_empty() {
        return Err(ConfigError::Invalid {
            field: "gateway.vnet_prefixes".into(),
            value: "[]".into(),
            reason: "the virtual network needs at least one prefix (SPEC R1.7)".into(),
            rule: Some(Rule::new(1, 7)),
        });
    }
    Ok(vnet)
}

/// The path of field `x` of instance `ic`.
fn inst_field(ic: &InstanceCfg, x: &str) -> String {
    format!("instance[{}].{x}", ic.name)
}

/// What the steps of [`Topology::from_config`] found so far, for the steps after them.
/// Each step is one method, called in the order of the checks (so that of several errors
/// the same one is reported).
struct Validation<'a> {
    cfg: &'a ConfigFile,
    vnet: &'a [Prefix],
    /// Every public address, with who uses it, to refuse duplicates and overlaps.
    public_owner: HashMap<u32, String>,
    pip_by_name: HashMap<&'a str, u32>,
    avsets: HashSet<&'a str>,
    deployment_names: HashSet<&'a str>,
    instances: Vec<Instance>,
    inst_idx: HashMap<&'a str, usize>,
    ilpip_owner: HashMap<u32, &'a str>,
    deployment_count: BTreeMap<&'a str, u32>,
    /// Every LB frontend address, with the field that names it.
    frontend_owner: HashMap<u32, String>,
}

impl<'a> Validation<'a> {
    fn new(cfg: &'a ConfigFile, vnet: &'a [Prefix]) -> Self {
        Validation {
            cfg,
            vnet,
            public_owner: HashMap::new(),
            pip_by_name: HashMap::new(),
            avsets: HashSet::new(),
            deployment_names: HashSet::new(),
            instances: Vec::new(),
            inst_idx: HashMap::new(),
            ilpip_owner: HashMap::new(),
            deployment_count: BTreeMap::new(),
            frontend_owner: HashMap::new(),
        }
    }

    fn in_vnet(&self, ip: u32) -> Option<&'a Prefix> {
        self.vnet.iter().find(|p| p.contains(ip))
    }

    /// Records that `who` uses public address `addr`, refusing VNet addresses and a second user.
    fn claim(&mut self, field: &str, addr: u32, who: String) -> Result<(), ConfigError> {
        if let Some(p) = self.in_vnet(addr) {
            return Err(ConfigError::DuplicateAddress {
                field: field.into(),
                address: Ipv4Addr::from(addr).to_string(),
                other: format!("the virtual network {p} (gateway.vnet_prefixes)"),
                rule: None,
            });
        }
        if let Some(other) = self.public_owner.get(&addr) {
            return Err(ConfigError::DuplicateAddress {
                field: field.into(),
                address: Ipv4Addr::from(addr).to_string(),
                other: other.clone(),
                rule: None,
            });
        }
        self.public_owner.insert(addr, who);
        Ok(())
    }

    /// The named public IPs.
    fn public_ips(&mut self) -> Result<Vec<PublicIp>, ConfigError> {
        let cfg = self.cfg;
        check_unique(
            "public_ip.name",
            cfg.public_ip.iter().map(|p| p.name.as_str()),
        )?;
        let mut public_ips = Vec::new();
        for p in &cfg.public_ip {
            let field = format!("public_ip[{}].address", p.name);
            let addr = parse_ipv4(&field, &p.address)?;
            self.claim(&field, addr, format!("public_ip[{}]", p.name))?;
            self.pip_by_name.insert(p.name.as_str(), addr);
            public_ips.push(PublicIp {
                name: p.name.clone(),
                addr,
            });
        }
        Ok(public_ips)
    }

    /// The default-SNAT pool (R1.3).
    fn default_pool(&mut self) -> Result<Vec<u32>, ConfigError> {
        let mut default_pool = Vec::new();
        for (i, a) in self.cfg.gateway.default_snat_pool.iter().enumerate() {
            let field = format!("gateway.default_snat_pool[{i}]");
            let addr = parse_ipv4(&field, a)?;
            self.claim(&field, addr, field.clone())?;
            default_pool.push(addr);
        }
        Ok(default_pool)
    }

    /// The names of availability sets and deployments, each unique.
    fn group_names(&mut self) -> Result<(), ConfigError> {
        let cfg = self.cfg;
        check_unique(
            "availability_set.name",
            cfg.availability_set.iter().map(|a| a.name.as_str()),
        )?;
        self.avsets = cfg
            .availability_set
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        check_unique(
            "deployment.name",
            cfg.deployment.iter().map(|d| d.name.as_str()),
        )?;
        self.deployment_names = cfg.deployment.iter().map(|d| d.name.as_str()).collect();
        Ok(())
    }

    /// The instances, in configured order (without LB membership yet).
    fn instances(&mut self) -> Result<(), ConfigError> {
        let cfg = self.cfg;
        check_unique(
            "instance.name",
            cfg.instance.iter().map(|i| i.name.as_str()),
        )?;
        let mut private_owner: HashMap<u32, &str> = HashMap::new();
        for ic in &cfg.instance {
            let private_ip = parse_ipv4(&inst_field(ic, "private_ip"), &ic.private_ip)?;
            if self.in_vnet(private_ip).is_none() {
                return Err(ConfigError::Invalid {
                    field: inst_field(ic, "private_ip"),
                    value: ic.private_ip.clone(),
                    reason: "not inside gateway.vnet_prefixes".into(),
                    rule: None,
                });
            }
            if let Some(other) = private_owner.insert(private_ip, &ic.name) {
                return Err(ConfigError::DuplicateAddress {
                    field: inst_field(ic, "private_ip"),
                    address: ic.private_ip.clone(),
                    other: format!("instance[{other}]"),
                    rule: None,
                });
            }
            if ic.kind == InstanceKind::WebWorkerRole && ic.model != Model::Classic {
                return Err(ConfigError::Model {
                    field: inst_field(ic, "kind"),
                    reason: "web_worker_role exists only in the Classic model (SPEC §0): set model = \"classic\"".into(),
                    rule: None,
                });
            }
            let ilpip = self.ilpip(ic)?;
            let group = match ic.model {
                Model::Arm => self.arm_group(ic)?,
                Model::Classic => self.classic_group(ic)?,
            };
            let max_flows = match ic.max_flows {
                Some(n) => check_flows(&inst_field(ic, "max_flows"), u64::from(n))?,
                None => cfg.gateway.max_flows_per_instance,
            };
            self.inst_idx.insert(ic.name.as_str(), self.instances.len());
            self.instances.push(Instance {
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
        Ok(())
    }

    /// The instance-level public IP of `ic` (R1.1): a named public IP, one instance each.
    fn ilpip(&mut self, ic: &'a InstanceCfg) -> Result<Option<u32>, ConfigError> {
        let Some(n) = &ic.public_ip else {
            return Ok(None);
        };
        if ic.kind == InstanceKind::WebWorkerRole {
            return Err(ConfigError::WebWorkerRoleIlpip {
                field: inst_field(ic, "public_ip"),
            });
        }
        let addr =
            *self
                .pip_by_name
                .get(n.as_str())
                .ok_or_else(|| ConfigError::UnknownReference {
                    field: inst_field(ic, "public_ip"),
                    what: "public_ip",
                    name: n.clone(),
                })?;
        if let Some(other) = self.ilpip_owner.insert(addr, &ic.name) {
            return Err(ConfigError::DuplicateAddress {
                field: inst_field(ic, "public_ip"),
                address: Ipv4Addr::from(addr).to_string(),
                other: format!("instance[{other}].public_ip (an ILPIP is 1:1, SPEC R1.1)"),
                rule: Some(Rule::new(1, 1)),
            });
        }
        Ok(Some(addr))
    }

    /// The default-SNAT group of an ARM instance: its availability set, else itself (R1.3).
    fn arm_group(&self, ic: &InstanceCfg) -> Result<SnatGroup, ConfigError> {
        if ic.deployment.is_some() {
            return Err(ConfigError::Model {
                field: inst_field(ic, "deployment"),
                reason: "deployments are Classic; an ARM instance uses availability_set".into(),
                rule: None,
            });
        }
        match &ic.availability_set {
            Some(a) if self.avsets.contains(a.as_str()) => {
                Ok(SnatGroup::AvailabilitySet(a.clone()))
            }
            Some(a) => Err(ConfigError::UnknownReference {
                field: inst_field(ic, "availability_set"),
                what: "availability_set",
                name: a.clone(),
            }),
            None => Ok(SnatGroup::Alone(ic.name.clone())),
        }
    }

    /// The default-SNAT group of a Classic instance: its deployment (R1.3), which it counts in.
    fn classic_group(&mut self, ic: &InstanceCfg) -> Result<SnatGroup, ConfigError> {
        if ic.availability_set.is_some() {
            return Err(ConfigError::Model {
                field: inst_field(ic, "availability_set"),
                reason: "availability sets are ARM; a Classic instance belongs to a deployment"
                    .into(),
                rule: None,
            });
        }
        match &ic.deployment {
            Some(d) => match self.deployment_names.get(d.as_str()) {
                Some(&name) => {
                    *self.deployment_count.entry(name).or_default() += 1;
                    Ok(SnatGroup::Deployment(d.clone()))
                }
                None => Err(ConfigError::UnknownReference {
                    field: inst_field(ic, "deployment"),
                    what: "deployment",
                    name: d.clone(),
                }),
            },
            None => Err(ConfigError::Model {
                field: inst_field(ic, "deployment"),
                reason: "a Classic instance must name its deployment (SPEC R1.3)".into(),
                rule: Some(Rule::new(1, 3)),
            }),
        }
    }

    /// The load balancers: frontends, pools and rules, and from them each member's outbound
    /// candidates (R1.2, R1.6), sorted.
    fn load_balancers(&mut self) -> Result<(), ConfigError> {
        let cfg = self.cfg;
        check_unique(
            "load_balancer.name",
            cfg.load_balancer.iter().map(|l| l.name.as_str()),
        )?;
        for lb in &cfg.load_balancer {
            self.load_balancer(lb)?;
        }
        for inst in &mut self.instances {
            if let Some(m) = inst.lb.as_mut() {
                m.candidates.sort_unstable();
                m.candidates.dedup();
            }
        }
        Ok(())
    }

    fn load_balancer(&mut self, lb: &'a LoadBalancerCfg) -> Result<(), ConfigError> {
        let lf = |x: &str| format!("load_balancer[{}].{x}", lb.name);
        check_unique(
            &lf("frontends.name"),
            lb.frontends.iter().map(|x| x.name.as_str()),
        )?;
        check_unique(
            &lf("backend_pools.name"),
            lb.backend_pools.iter().map(|x| x.name.as_str()),
        )?;
        check_unique(&lf("rules.name"), lb.rules.iter().map(|x| x.name.as_str()))?;
        let fe_addr = self.frontends(lb)?;
        let mut pool_members: HashMap<&str, Vec<usize>> = HashMap::new();
        for bp in &lb.backend_pools {
            pool_members.insert(bp.name.as_str(), self.backend_pool(lb, bp)?);
        }
        let rules_for_pool = lb_rules(lb, &fe_addr, &pool_members)?;
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
                if let Some(m) = self.instances[i].lb.as_mut() {
                    m.candidates.extend(&cands);
                }
            }
        }
        Ok(())
    }

    /// The frontend addresses of `lb` by frontend name: named public IPs, none an ILPIP, none
    /// used by another frontend.
    fn frontends(&mut self, lb: &'a LoadBalancerCfg) -> Result<HashMap<&'a str, u32>, ConfigError> {
        let mut fe_addr = HashMap::new();
        for fe in &lb.frontends {
            let field = format!(
                "load_balancer[{}].frontends[{}].public_ip",
                lb.name, fe.name
            );
            let addr = *self.pip_by_name.get(fe.public_ip.as_str()).ok_or_else(|| {
                ConfigError::UnknownReference {
                    field: field.clone(),
                    what: "public_ip",
                    name: fe.public_ip.clone(),
                }
            })?;
            if let Some(owner) = self.ilpip_owner.get(&addr) {
                return Err(ConfigError::DuplicateAddress {
                    field,
                    address: Ipv4Addr::from(addr).to_string(),
                    other: format!("instance[{owner}].public_ip"),
                    rule: None,
                });
            }
            if let Some(other) = self.frontend_owner.insert(addr, field.clone()) {
                return Err(ConfigError::DuplicateAddress {
                    field,
                    address: Ipv4Addr::from(addr).to_string(),
                    other,
                    rule: None,
                });
            }
            fe_addr.insert(fe.name.as_str(), addr);
        }
        Ok(fe_addr)
    }

    /// The members of backend pool `bp` of `lb` (instance indices), each made a member of `lb`:
    /// at most [`MAX_POOL`], known, listed once, of the LB's model, in no other public LB.
    fn backend_pool(
        &mut self,
        lb: &LoadBalancerCfg,
        bp: &BackendPoolCfg,
    ) -> Result<Vec<usize>, ConfigError> {
        let field = format!(
            "load_balancer[{}].backend_pools[{}].members",
            lb.name, bp.name
        );
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
                self.inst_idx
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
            let inst = &mut self.instances[i];
            if inst.model != lb.model {
                return Err(ConfigError::Model {
                    field: field.clone(),
                    reason: format!(
                        "instance `{m}` is {:?} but the load balancer is {:?}",
                        inst.model, lb.model
                    ),
                    rule: None,
                });
            }
            if let Some(other) = &inst.lb {
                if other.lb != lb.name {
                    return Err(ConfigError::Model {
                        field: field.clone(),
                        reason: format!(
                            "instance `{m}` is already in a pool of public load balancer `{}`; an instance belongs to one public load balancer",
                            other.lb
                        ),
                        rule: None,
                    });
                }
            }
            inst.lb = Some(LbMembership {
                lb: lb.name.clone(),
                candidates: Vec::new(),
            });
            v.push(i);
        }
        Ok(v)
    }

    /// R2.8 for frontends: how many instances (without an ILPIP) may use each frontend for
    /// PAT, at most [`MAX_POOL`].
    fn frontend_share(&self) -> Result<HashMap<u32, usize>, ConfigError> {
        let mut frontend_share: HashMap<u32, usize> = HashMap::new();
        for inst in self.instances.iter().filter(|i| i.ilpip.is_none()) {
            if let Some(m) = &inst.lb {
                for &a in &m.candidates {
                    *frontend_share.entry(a).or_default() += 1;
                }
            }
        }
        for (addr, n) in &frontend_share {
            if *n > MAX_POOL {
                return Err(ConfigError::PoolTooLarge {
                    field: self.frontend_owner.get(addr).cloned().unwrap_or_default(),
                    address: Ipv4Addr::from(*addr).to_string(),
                    size: *n,
                });
            }
        }
        Ok(frontend_share)
    }

    /// The Classic deployments with their actual size and, while redeploying, the reported one
    /// (R2.11).
    fn deployments(&self) -> Result<Vec<Deployment>, ConfigError> {
        let mut deployments = Vec::new();
        for d in &self.cfg.deployment {
            let actual = self
                .deployment_count
                .get(d.name.as_str())
                .copied()
                .unwrap_or(0);
            if let Some(r) = d.redeploy_reported_instances {
                if r < actual || r > actual.saturating_mul(2).max(1) {
                    return Err(ConfigError::Invalid {
                        field: format!("deployment[{}].redeploy_reported_instances", d.name),
                        value: r.to_string(),
                        reason: format!(
                            "while redeploying, the reported pool is between the actual size ({actual}) and twice it (SPEC R2.11)"
                        ),
                        rule: Some(Rule::new(2, 11)),
                    });
                }
            }
            deployments.push(Deployment {
                name: d.name.clone(),
                actual,
                reported: d.redeploy_reported_instances,
            });
        }
        Ok(deployments)
    }

    /// R1.3: the instances that need default SNAT need a pool, and no group of them may
    /// exceed [`MAX_POOL`].
    fn default_snat(&self, pool_empty: bool) -> Result<(), ConfigError> {
        let mut group_size: BTreeMap<&SnatGroup, usize> = BTreeMap::new();
        let mut need = Vec::new();
        for inst in &self.instances {
            let lb_ok = inst.lb.as_ref().is_some_and(|m| !m.candidates.is_empty());
            if inst.ilpip.is_none() && !lb_ok {
                need.push(inst.name.clone());
                *group_size.entry(&inst.group).or_default() += 1;
            }
        }
        if !need.is_empty() && pool_empty {
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
        Ok(())
    }
}

/// The rules of `lb` (references, ports, R3.7 idle timeout); returns the frontend addresses
/// of the rules that use each backend pool.
fn lb_rules<'a>(
    lb: &'a LoadBalancerCfg,
    fe_addr: &HashMap<&str, u32>,
    pool_members: &HashMap<&str, Vec<usize>>,
) -> Result<HashMap<&'a str, Vec<u32>>, ConfigError> {
    let mut rules_for_pool: HashMap<&str, Vec<u32>> = HashMap::new();
    for r in &lb.rules {
        let rf = |x: &str| format!("load_balancer[{}].rules[{}].{x}", lb.name, r.name);
        let fa =
            *fe_addr
                .get(r.frontend.as_str())
                .ok_or_else(|| ConfigError::UnknownReference {
                    field: rf("frontend"),
                    what: "frontend",
                    name: r.frontend.clone(),
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
                    rule: None,
                });
            }
        }
        if !(4..=30).contains(&r.idle_timeout_minutes) {
            return Err(ConfigError::Invalid {
                field: rf("idle_timeout_minutes"),
                value: r.idle_timeout_minutes.to_string(),
                reason: "an inbound idle timeout is settable from 4 to 30 minutes (SPEC R3.7)"
                    .into(),
                rule: Some(Rule::new(3, 7)),
            });
        }
        rules_for_pool
            .entry(r.backend_pool.as_str())
            .or_default()
            .push(fa);
    }
    Ok(rules_for_pool)
}

impl Topology {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_config(ConfigFile::from_toml(text)?)
    }

    /// Validates a parsed file: `[gateway]`, the public addresses, availability sets and
    /// deployments, instances, load balancers, the shares of frontends and default-SNAT groups
    /// (R2.8), then the policy (NSGs, inbound rules, probes), in that order; the first error
    /// found is returned.
    pub fn from_config(cfg: ConfigFile) -> Result<Self, ConfigError> {
        let params = gateway_params(&cfg.gateway)?;
        let vnet = vnet_prefixes(&cfg.gateway)?;
        let mut v = Validation::new(&cfg, &vnet);
        let public_ips = v.public_ips()?;
        let default_pool = v.default_pool()?;
        v.group_names()?;
        v.instances()?;
        v.load_balancers()?;
        let frontend_share = v.frontend_share()?;
        let deployments = v.deployments()?;
        v.default_snat(default_pool.is_empty())?;
        let instances = v.instances;

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
