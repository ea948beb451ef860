//! The operator's TOML configuration file, as written: plain `serde` structs.
//!
//! This module only describes and parses the file format (documented in `docs/CONFIG.md`);
//! it does not check references, addresses or SPEC rules. [`crate::topology::Topology::from_config`]
//! does that and turns a [`ConfigFile`] into a validated model.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Gateway-wide settings.
    #[serde(default)]
    pub gateway: GatewayCfg,
    /// Public IPv4 addresses the tenant owns (used as ILPIPs and LB frontends).
    #[serde(default)]
    pub public_ip: Vec<PublicIpCfg>,
    /// ARM availability sets (each shares one default-SNAT address, SPEC R1.3).
    #[serde(default)]
    pub availability_set: Vec<AvailabilitySetCfg>,
    /// Classic deployments (cloud services).
    #[serde(default)]
    pub deployment: Vec<DeploymentCfg>,
    /// Instances: ARM NIC IP configurations or Classic role instances / VMs.
    #[serde(default)]
    pub instance: Vec<InstanceCfg>,
    /// Public load balancers.
    #[serde(default)]
    pub load_balancer: Vec<LoadBalancerCfg>,
    /// Network security groups (SPEC §4), with their NIC and subnet associations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nsg: Vec<NsgCfg>,
}

/// `[gateway]`: settings that are the operator's, not the tenant's.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GatewayCfg {
    /// Seed of every random choice (SPEC R1.6 decision: a run is reproducible), 0 to
    /// 9223372036854775807 (`i64::MAX`: the TOML config file cannot hold a larger number, and
    /// the API refuses one).
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)
    )]
    pub seed: u64,
    /// Idle timeout of outbound flows in seconds, 1–86400 (SPEC R3.4; default 240).
    #[serde(default = "default_idle")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86_400))]
    pub idle_timeout_secs: u32,
    /// Delay between a FIN seen in both directions and the port's release, in seconds,
    /// 1–86400 (SPEC R3.2; default 240).
    #[serde(default = "default_fin")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86_400))]
    pub fin_timeout_secs: u32,
    /// Delay between a RST and the port's release, in seconds, 1–86400 (SPEC R3.3; default 15).
    #[serde(default = "default_rst")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86_400))]
    pub rst_timeout_secs: u32,
    /// How long a port released for a destination counts as "recently used" for it
    /// (SPEC R2.3 decision), in seconds, 0–86400 (0: no history); default 240, the longest
    /// TIME_WAIT a server may hold.
    #[serde(default = "default_history")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 86_400))]
    pub port_reuse_history_secs: u32,
    /// The virtual network's address space: destinations inside it are not translated (SPEC R1.7).
    /// At least one prefix `a.b.c.d/len` (len 0–32) without host bits set (`10.0.0.0/16`, not
    /// `10.0.0.1/16`); absent, the RFC 1918 space (`10.0.0.0/8`, `172.16.0.0/12`,
    /// `192.168.0.0/16`). Every instance's `private_ip` lies inside it.
    #[serde(default = "default_vnet")]
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub vnet_prefixes: Vec<String>,
    /// The provider's default-SNAT address pool (SPEC R1.3), chosen by the operator: IPv4
    /// addresses outside `vnet_prefixes`, each used once.
    #[serde(default)]
    pub default_snat_pool: Vec<String>,
    /// Live flows one instance may hold, 1–2147483648 (SPEC R9.2; default 500 000, the figure
    /// clouds document per VM). `[[instance]] max_flows` overrides it for one instance.
    #[serde(default = "default_max_flows_per_instance")]
    #[cfg_attr(
        feature = "openapi",
        schema(format = Int64, minimum = 1, maximum = 2_147_483_648_i64)
    )]
    pub max_flows_per_instance: u32,
    /// Live flows the whole gateway may hold, 1–2147483648 (SPEC R9.2). Default: derived from
    /// `flow_memory_mib` at [`BYTES_PER_FLOW_BUDGET`] bytes per flow.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(format = Int64, minimum = 1, maximum = 2_147_483_648_i64)
    )]
    pub max_flows: Option<u32>,
    /// Memory budget for the flow table, MiB, from which the default `max_flows` is derived:
    /// at least 1, any 32-bit unsigned number (the derived `max_flows` is capped at
    /// 2147483648); default 1024.
    #[serde(default = "default_flow_memory_mib")]
    #[cfg_attr(
        feature = "openapi",
        schema(format = Int64, minimum = 1, maximum = 4_294_967_295_i64)
    )]
    pub flow_memory_mib: u32,
    /// Interval over which repeated events of one kind for one (instance, public IP,
    /// protocol, destination) are aggregated into one summary, in seconds, 1–86400
    /// (SPEC R9.3; default 10).
    #[serde(default = "default_event_interval")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86_400))]
    pub event_interval_secs: u32,
    /// Operator override of every inbound rule's idle timeout, in seconds (1–86400). Absent
    /// (the default): each rule's `idle_timeout_minutes` (4–30, SPEC R3.7) holds. As with
    /// `idle_timeout_secs` (R3.4 decision), the operator may set another value; lab tests use
    /// seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86_400))]
    pub inbound_idle_timeout_secs: Option<u32>,
    /// What a refused new flow of an instance gets (SPEC R9.5): `drop` (the default, the
    /// seeds' behaviour: the attempt times out) or `reset` (a refused TCP SYN is answered
    /// with a TCP RST, a refused UDP flow with ICMP destination unreachable, code 13, rate
    /// limited per instance). Refusals are port exhaustion (R2.6) and flow limits (R9.2).
    #[serde(default)]
    pub on_exhaustion: OnExhaustion,
}

/// `gateway.on_exhaustion` (SPEC R9.5): how a refused new flow is treated.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnExhaustion {
    /// Drop the packet; the application's attempt times out (the seeds' behaviour).
    #[default]
    Drop,
    /// Drop it and answer the instance at once: a TCP RST for a SYN, ICMP destination
    /// unreachable (code 13, administratively prohibited) for a UDP datagram; at most 100
    /// answers per second per instance.
    Reset,
}

/// Bytes of memory budgeted per live flow when `max_flows` is derived from
/// `flow_memory_mib`: the engine measures about 88 B per flow at 1M flows
/// (docs/PERFORMANCE.md); the budget doubles that and adds headroom for the tables growing
/// (a growing slab or hash table briefly holds its old and new arrays).
pub const BYTES_PER_FLOW_BUDGET: u64 = 192;

fn default_max_flows_per_instance() -> u32 {
    500_000
}
fn default_flow_memory_mib() -> u32 {
    1024
}
fn default_event_interval() -> u32 {
    10
}

fn default_idle() -> u32 {
    240
}
fn default_fin() -> u32 {
    240
}
fn default_rst() -> u32 {
    15
}
fn default_history() -> u32 {
    240
}
fn default_vnet() -> Vec<String> {
    vec![
        "10.0.0.0/8".into(),
        "172.16.0.0/12".into(),
        "192.168.0.0/16".into(),
    ]
}

impl Default for GatewayCfg {
    fn default() -> Self {
        GatewayCfg {
            seed: 0,
            idle_timeout_secs: default_idle(),
            fin_timeout_secs: default_fin(),
            rst_timeout_secs: default_rst(),
            port_reuse_history_secs: default_history(),
            vnet_prefixes: default_vnet(),
            default_snat_pool: Vec::new(),
            max_flows_per_instance: default_max_flows_per_instance(),
            max_flows: None,
            flow_memory_mib: default_flow_memory_mib(),
            event_interval_secs: default_event_interval(),
            inbound_idle_timeout_secs: None,
            on_exhaustion: OnExhaustion::Drop,
        }
    }
}

/// `[[public_ip]]`: a named public IPv4 address.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PublicIpCfg {
    /// Unique name, referenced by instances (`public_ip`) and LB frontends.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub name: String,
    /// The IPv4 address (dotted quad, outside `gateway.vnet_prefixes`, used once).
    #[cfg_attr(feature = "openapi", schema(format = Ipv4))]
    pub address: String,
}

/// `[[availability_set]]` (ARM).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AvailabilitySetCfg {
    /// Unique name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub name: String,
}

/// `[[deployment]]` (Classic cloud service).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeploymentCfg {
    /// Unique name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub name: String,
    /// While the deployment is being redeployed, the pool size the infrastructure reports
    /// (SPEC R2.11): between the actual size (the deployment's instances) and twice it, so 0
    /// or 1 for a deployment without instances; this range depends on the instances, so the
    /// schema states only the lower bound 0. Absent when settled.
    #[serde(default)]
    pub redeploy_reported_instances: Option<u32>,
}

/// Deployment model of an instance or load balancer.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Model {
    /// Azure Resource Manager.
    #[default]
    Arm,
    /// Classic (cloud services).
    Classic,
}

impl Model {
    /// The label of the configuration, the API and the CLI: `arm` or `classic`.
    pub fn label(self) -> &'static str {
        match self {
            Model::Arm => "arm",
            Model::Classic => "classic",
        }
    }
}

/// Kind of instance (SPEC §0).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum InstanceKind {
    /// A virtual machine (ARM NIC IP configuration or Classic VM).
    #[default]
    Vm,
    /// A Classic web or worker role instance.
    WebWorkerRole,
}

impl InstanceKind {
    /// The label of the configuration, the API and the CLI: `vm` or `web_worker_role`.
    pub fn label(self) -> &'static str {
        match self {
            InstanceKind::Vm => "vm",
            InstanceKind::WebWorkerRole => "web_worker_role",
        }
    }
}

/// `[[instance]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InstanceCfg {
    /// Unique name (for ARM, conventionally `vm/nic/ipconfig`).
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub name: String,
    /// `vm` or `web_worker_role` (default `vm`); a `web_worker_role` is `classic` and has no
    /// `public_ip` (SPEC §0, R1.5).
    #[serde(default)]
    pub kind: InstanceKind,
    /// `arm` or `classic` (default `arm`).
    #[serde(default)]
    pub model: Model,
    /// Private IPv4 address (dotted quad), inside `gateway.vnet_prefixes` (SPEC R1.7), used by
    /// one instance.
    #[cfg_attr(feature = "openapi", schema(format = Ipv4))]
    pub private_ip: String,
    /// Name of an instance-level public IP (SPEC R1.1).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub public_ip: Option<String>,
    /// ARM availability set (SPEC R1.3); an `arm` instance only.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub availability_set: Option<String>,
    /// Classic deployment: required for a `classic` instance, absent for an `arm` one.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub deployment: Option<String>,
    /// Live flows this instance may hold, 1–2147483648 (SPEC R9.2); default
    /// `gateway.max_flows_per_instance`.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(format = Int64, minimum = 1, maximum = 2_147_483_648_i64)
    )]
    pub max_flows: Option<u32>,
}

/// `[[load_balancer]]`: a public load balancer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LoadBalancerCfg {
    /// Unique name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub name: String,
    /// `arm` or `classic`; members must have the same model.
    #[serde(default)]
    pub model: Model,
    /// Frontends, each a public IP.
    #[serde(default)]
    pub frontends: Vec<FrontendCfg>,
    /// Backend pools.
    #[serde(default)]
    pub backend_pools: Vec<BackendPoolCfg>,
    /// Load-balancing rules.
    #[serde(default)]
    pub rules: Vec<LbRuleCfg>,
    /// Health probes (SPEC R5.2), referenced by rules' `probe`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbeCfg>,
}

/// A frontend of a load balancer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FrontendCfg {
    /// Name, unique within the LB.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub name: String,
    /// Name of the public IP.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub public_ip: String,
}

/// A backend pool.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BackendPoolCfg {
    /// Name, unique within the LB.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub name: String,
    /// Names of member instances.
    #[serde(default)]
    pub members: Vec<String>,
}

/// Transport protocol of a load-balancing rule.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RuleProtocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// Both.
    All,
}

impl RuleProtocol {
    /// The label of the configuration, the API and the CLI: `tcp`, `udp` or `all`.
    pub fn label(self) -> &'static str {
        match self {
            RuleProtocol::Tcp => "tcp",
            RuleProtocol::Udp => "udp",
            RuleProtocol::All => "all",
        }
    }
}

/// A load-balancing rule.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LbRuleCfg {
    /// Name, unique within the LB.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub name: String,
    /// Frontend name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub frontend: String,
    /// `tcp`, `udp` or `all`.
    pub protocol: RuleProtocol,
    /// Frontend port, 1–65535; 1–1023 when the frontend's public IP is also used for outbound
    /// PAT, whose SNAT ports are 1024–65535 (SPEC R2.4, R2.2).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65_535))]
    pub frontend_port: u16,
    /// Backend pool name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub backend_pool: String,
    /// Backend port, 1–65535.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65_535))]
    pub backend_port: u16,
    /// Name of a health probe of the same load balancer (`probes`). Its verdict decides
    /// which members get new inbound flows (SPEC R4.5, R5.2) and never matters for outbound
    /// (R1.2). Without a probe every member counts as healthy.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub probe: Option<String>,
    /// Inbound idle timeout in minutes, 4–30 (SPEC R3.7; default 4).
    #[serde(default = "default_lb_idle")]
    #[cfg_attr(feature = "openapi", schema(minimum = 4, maximum = 30))]
    pub idle_timeout_minutes: u32,
}

fn default_lb_idle() -> u32 {
    4
}

/// Protocol of a health probe (SPEC R5.2).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProbeProtocol {
    /// Healthy when a TCP connection to the port is accepted.
    Tcp,
    /// Healthy when `GET <path>` on the port answers `200`.
    Http,
}

/// `[[load_balancer.probes]]`: a health probe (SPEC R5.2).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProbeCfg {
    /// Name, unique within the LB.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub name: String,
    /// `tcp` or `http`.
    pub protocol: ProbeProtocol,
    /// Port probed on each member, 1–65535.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65_535))]
    pub port: u16,
    /// HTTP path (`http` only; default `/`): starts with `/`, no whitespace or control
    /// character. A `tcp` probe has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Seconds between probes of one member, 1–3600 (default 15).
    #[serde(default = "default_probe_interval")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3600))]
    pub interval_secs: u32,
    /// Consecutive failed probes that mark a member down, 1–100 (default 2).
    #[serde(default = "default_probe_threshold")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100))]
    pub unhealthy_threshold: u32,
}

fn default_probe_interval() -> u32 {
    15
}
fn default_probe_threshold() -> u32 {
    2
}

/// `[[nsg]]`: a network security group (SPEC §4).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NsgCfg {
    /// Unique name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub name: String,
    /// Instances (NICs) the NSG is associated with; a NIC has at most one NSG.
    #[serde(default)]
    pub nics: Vec<String>,
    /// Subnets (prefixes `a.b.c.d/len` without host bits set, inside `gateway.vnet_prefixes`)
    /// the NSG is associated with; an
    /// instance whose private IP is inside one is in that subnet. Subnets of different NSGs
    /// must not overlap.
    #[serde(default)]
    pub subnets: Vec<String>,
    /// Security rules (SPEC R4.1); the default rules (R4.2) are always added after them.
    #[serde(default)]
    pub rules: Vec<NsgRuleCfg>,
}

/// Direction of an NSG rule.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NsgDirection {
    /// Traffic towards the instance.
    Inbound,
    /// Traffic from the instance.
    Outbound,
}

/// Access of an NSG rule.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NsgAccess {
    /// Let matching traffic through.
    Allow,
    /// Drop matching traffic.
    Deny,
}

/// Protocol of an NSG rule (SPEC R4.1).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NsgProtocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
    /// ESP.
    Esp,
    /// Any protocol (`*` is accepted too).
    #[serde(alias = "*")]
    Any,
}

fn default_any() -> Vec<String> {
    vec!["*".into()]
}

/// `[[nsg.rules]]`: a security rule (SPEC R4.1).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NsgRuleCfg {
    /// Name, unique within the NSG, and not the name of a default rule (SPEC R4.2), in any case.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub name: String,
    /// 100–4096, unique per direction within the NSG; lower wins (SPEC R4.1).
    #[cfg_attr(feature = "openapi", schema(minimum = 100, maximum = 4096))]
    pub priority: u32,
    /// `inbound` or `outbound`.
    pub direction: NsgDirection,
    /// `allow` or `deny`.
    pub access: NsgAccess,
    /// `tcp`, `udp`, `icmp`, `esp` or `any` / `*`.
    pub protocol: NsgProtocol,
    /// Source prefixes (`a.b.c.d/len` without host bits set, or an address), service tags
    /// (`VirtualNetwork`, `Internet`, `AzureLoadBalancer`, any case), `*` or `any`: at least
    /// one (default `["*"]`).
    #[serde(default = "default_any")]
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub sources: Vec<String>,
    /// Source port ranges: `80`, `1000-2000` (1–65535, low ≤ high) or `*`: at least one
    /// (default `["*"]`).
    #[serde(default = "default_any")]
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub source_ports: Vec<String>,
    /// Destination prefixes or service tags, as `sources` (default `["*"]`).
    #[serde(default = "default_any")]
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub destinations: Vec<String>,
    /// Destination port ranges, as `source_ports` (default `["*"]`).
    #[serde(default = "default_any")]
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub destination_ports: Vec<String>,
}

impl ConfigFile {
    /// Parses TOML text. Unknown fields are refused.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Serialises back to TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}
