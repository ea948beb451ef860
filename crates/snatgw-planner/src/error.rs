//! Errors of the planner: bad traces, generator or mitigation specs, topologies.

/// What went wrong.
#[derive(Debug, thiserror::Error)]
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
    Topology(#[from] snatgw_core::ConfigError),
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
}
