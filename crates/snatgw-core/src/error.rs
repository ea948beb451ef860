//! Typed errors of the engine's configuration.
//!
//! Every variant names the offending field (as a path such as `instance[vm1].public_ip`) and,
//! where a SPEC rule is the reason, the rule. Refusing a configuration never changes the
//! running state (see [`crate::Engine::apply`]).

/// A SPEC rule, such as `R2.8` (section 2, rule 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    /// The section (`2` in R2.8).
    pub section: u8,
    /// The rule within it (`8` in R2.8).
    pub number: u8,
}

impl Rule {
    /// Rule R`section`.`number`.
    pub const fn new(section: u8, number: u8) -> Rule {
        Rule { section, number }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "R{}.{}", self.section, self.number)
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML text could not be parsed.
    #[error("config file: {0}")]
    Parse(String),
    /// A field holds a value that is not allowed.
    #[error("{field}: invalid value `{value}`: {reason}")]
    Invalid {
        /// Path of the field.
        field: String,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        reason: String,
        /// The SPEC rule that refuses it, if one does.
        rule: Option<Rule>,
    },
    /// Two objects of one kind share a name.
    #[error("{field}: duplicate name `{name}`")]
    DuplicateName {
        /// Path of the field.
        field: String,
        /// The duplicated name.
        name: String,
    },
    /// An address is used twice or overlaps another range.
    #[error("{field}: address {address} is already used by {other}")]
    DuplicateAddress {
        /// Path of the field.
        field: String,
        /// The address.
        address: String,
        /// Who already uses it.
        other: String,
        /// The SPEC rule that makes it unique, if one does.
        rule: Option<Rule>,
    },
    /// A reference names nothing that exists.
    #[error("{field}: unknown {what} `{name}`")]
    UnknownReference {
        /// Path of the field.
        field: String,
        /// What kind of object was expected.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// SPEC R1.5: a web/worker role instance cannot have an instance-level public IP.
    #[error(
        "{field}: a web_worker_role instance cannot have an instance-level public IP (SPEC R1.5)"
    )]
    WebWorkerRoleIlpip {
        /// Path of the field.
        field: String,
    },
    /// SPEC R2.8: a pool sharing one public IP holds more than 1000 instances.
    #[error(
        "{field}: {size} instances share public IP {address}; at most 1000 are allowed (SPEC R2.8)"
    )]
    PoolTooLarge {
        /// Path of the field.
        field: String,
        /// The shared public address.
        address: String,
        /// How many instances would share it.
        size: usize,
    },
    /// SPEC R1.3: instances need default SNAT but the operator's pool is empty.
    #[error("gateway.default_snat_pool: empty, but {count} instance(s) need default SNAT, e.g. `{example}` (SPEC R1.3)")]
    EmptyDefaultPool {
        /// How many instances need it.
        count: usize,
        /// One of them.
        example: String,
    },
    /// A combination of fields that the cloud model does not allow.
    #[error("{field}: {reason}")]
    Model {
        /// Path of the field.
        field: String,
        /// The rule that is broken.
        reason: String,
        /// The SPEC rule, if the model's rule is one.
        rule: Option<Rule>,
    },
}

impl ConfigError {
    /// The SPEC rule that refused the configuration, if any: fixed for the variants that are
    /// one rule, else the one the construction site named.
    pub fn rule(&self) -> Option<Rule> {
        match self {
            ConfigError::WebWorkerRoleIlpip { .. } => Some(Rule::new(1, 5)),
            ConfigError::PoolTooLarge { .. } => Some(Rule::new(2, 8)),
            ConfigError::EmptyDefaultPool { .. } => Some(Rule::new(1, 3)),
            ConfigError::Invalid { rule, .. }
            | ConfigError::Model { rule, .. }
            | ConfigError::DuplicateAddress { rule, .. } => *rule,
            ConfigError::Parse(_)
            | ConfigError::DuplicateName { .. }
            | ConfigError::UnknownReference { .. } => None,
        }
    }
}

/// An internal invariant of the engine that does not hold ([`crate::Engine::check_invariants`],
/// [`crate::Engine::check_inbound_invariants`]; for tests and the soak): which family of
/// invariants, and the figures that disagree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvariantError {
    /// Two live flows hold the same public 5-tuple (SPEC R2.2).
    #[error("public 5-tuple held twice: {0}")]
    DuplicateTuple(String),
    /// A flow's instance, public address or port disagrees with its owner's blocks (R2.4).
    #[error("{0}")]
    FlowPort(String),
    /// A port block's used set, reference counts or free list disagree with the flows (R2.3).
    #[error("{0}")]
    Block(String),
    /// Port blocks exceed the tier, overlap, or disagree with the owner map (R2.4, R2.8).
    #[error("{0}")]
    Tier(String),
    /// Counters do not add up (R6.1).
    #[error("{0}")]
    Counter(String),
    /// A cache disagrees with what it caches (hot destinations, idle-ended sets).
    #[error("{0}")]
    Cache(String),
    /// The inbound LB state's indexes, counts or members disagree with its entries.
    #[error("{0}")]
    Inbound(String),
}
