//! Errors of the planner: bad traces, generator or mitigation specs, topologies; why a
//! mitigation does not apply ([`NotApplicable`]), why a topology change cannot be made
//! ([`TopoError`]), why a plot could not be drawn.

use snatgw_core::ConfigError;

/// What went wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A trace line is not a valid record (the message names the field).
    #[error("trace line {line}: {msg}")]
    Trace {
        /// 1-based line number.
        line: usize,
        /// What is wrong, naming the field.
        msg: String,
    },
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(String),
    /// The topology is invalid (the engine's error names the field and rule).
    #[error("topology: {0}")]
    Topology(#[from] ConfigError),
    /// The workload names an instance the topology does not have.
    #[error("the workload names instance `{0}`, which is not in the topology")]
    UnknownInstance(String),
    /// A generator specification is invalid.
    #[error("generator: {0}")]
    Generator(String),
    /// A `scale` event cannot be applied (the message says why).
    #[error("scale event {0}")]
    Scale(String),
    /// A mitigation specification is invalid, or cannot be applied to this topology.
    #[error("mitigation {0}")]
    Mitigation(String),
    /// A mitigation does not apply to this workload or topology (a what-if row, not a failure).
    #[error(transparent)]
    NotApplicable(#[from] NotApplicable),
    /// The SVG plot could not be drawn (the plotting library's message).
    #[error("plot: {0}")]
    Plot(String),
}

/// Why a mitigation does not apply ([`crate::Mitigation::apply`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotApplicable {
    /// `reuse`/`pool`: the workload has no request flows to put on shared connections.
    #[error("no request flows (TCP flows ending with FIN or RST)")]
    NoRequestFlows,
    /// `backoff`: no flow of the workload retries.
    #[error("the workload has no client retries")]
    NoRetries,
    /// `ilpip`: every workload instance already has one or may not have one (R1.5).
    #[error("no workload instance can get one (already ILPIP, or web/worker role: R1.5)")]
    NoIlpipCandidate,
    /// `frontends`: no workload instance is behind a load balancer.
    #[error("no load-balanced workload instance (default SNAT has one provider address per group, R1.3)")]
    NoLoadBalanced,
    /// `smaller-pool`: every workload instance is its own pool or has an ILPIP.
    #[error("no workload instance shares a pool")]
    NoSharedPool,
    /// The changed topology cannot be made (see [`TopoError`]).
    #[error(transparent)]
    Topo(#[from] TopoError),
    /// The engine refuses the (changed) topology.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Why a topology change of [`crate::topo`] cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopoError {
    /// The engine has no instance of this name.
    #[error("instance `{0}` is not in the topology")]
    UnknownInstance(String),
    /// The configuration has no instance of this name.
    #[error("instance `{0}` is not in the configuration")]
    NotConfigured(String),
    /// The instance has an ILPIP: no PAT, so no pool (R1.1).
    #[error("`{0}` has an ILPIP: no PAT, no pool (R1.1)")]
    Ilpip(String),
    /// The engine names a load balancer the configuration does not have.
    #[error("load balancer `{0}` missing")]
    MissingLoadBalancer(String),
    /// No backend pool with a rule of this load balancer holds the instance.
    #[error("no backend pool of `{lb}` with a rule holds `{instance}`")]
    NoRuledPool {
        /// The load balancer.
        lb: String,
        /// The instance.
        instance: String,
    },
    /// The engine resolved the instance by a scenario this planner does not know.
    #[error("`{0}` has an outbound scenario the planner does not know")]
    UnknownScenario(String),
    /// The instance is in no availability set or deployment: its own pool of 1 (R1.3).
    #[error("`{0}` is in no availability set: it is its own pool of 1 (R1.3)")]
    OwnPool(String),
    /// `gateway.vnet_prefixes` is empty, so placeholder instances get no address.
    #[error("gateway.vnet_prefixes is empty: no room for placeholder instances")]
    NoVnetPrefix,
    /// The VNet prefix is invalid.
    #[error(transparent)]
    Prefix(#[from] ConfigError),
    /// The VNet's first prefix has too few free addresses for the placeholders.
    #[error("no room in {prefix} for {count} placeholder instances")]
    NoRoom {
        /// The prefix.
        prefix: String,
        /// Placeholders needed.
        count: usize,
    },
    /// The pool cannot shrink: too few of its instances are outside the workload.
    #[error("the pool of `{instance}` cannot shrink to {size}: only {outside} of its {current} instances are outside the workload")]
    CannotShrink {
        /// The workload instance whose pool it is.
        instance: String,
        /// The size asked for.
        size: u32,
        /// Instances that may be removed.
        outside: usize,
        /// The pool's size now.
        current: u32,
    },
}
