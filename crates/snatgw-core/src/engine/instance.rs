//! Instances at run time: the outbound [`Scenario`] (SPEC R1.1–R1.3) and the runtime record.
//!
//! [`Scenario`] is what scenario resolution (`plan`, R1.1–R1.4, R1.6) decided for an
//! instance; `InstRt` is what the engine keeps per instance slot: identity, scenario, the
//! block's chunk base ports (R2.4) and counters. This module holds no behaviour beyond small
//! accessors: creating, updating and removing instances is `plan`'s, giving and taking chunks
//! `ports`'.

use std::sync::Arc;

use super::ports::{CHUNK, SLOTS};
use super::stats::InstanceStats;
use crate::config::{InstanceKind, Model};
use crate::topology::SnatGroup;

/// Which rule decided an instance's outbound address.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scenario {
    /// R1.1: instance-level public IP, stateless 1:1.
    Ilpip {
        /// The ILPIP.
        addr: u32,
    },
    /// R1.2: PAT on a load balancer frontend.
    LoadBalanced {
        /// LB name.
        lb: String,
        /// Chosen frontend address (R1.6).
        addr: u32,
        /// Number of candidate frontends.
        candidates: usize,
    },
    /// R1.3: PAT on a designated default-SNAT address.
    DefaultSnat {
        /// The sharing group.
        group: SnatGroup,
        /// Designated address.
        addr: u32,
    },
}

impl Scenario {
    /// The public address.
    pub fn addr(&self) -> u32 {
        match self {
            Scenario::Ilpip { addr }
            | Scenario::LoadBalanced { addr, .. }
            | Scenario::DefaultSnat { addr, .. } => *addr,
        }
    }
    /// The SPEC rule id.
    pub fn rule(&self) -> &'static str {
        match self {
            Scenario::Ilpip { .. } => "R1.1",
            Scenario::LoadBalanced { .. } => "R1.2",
            Scenario::DefaultSnat { .. } => "R1.3",
        }
    }
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Ilpip { .. } => "ilpip",
            Scenario::LoadBalanced { .. } => "load_balanced",
            Scenario::DefaultSnat { .. } => "default_snat",
        }
    }
    /// Whether the scenario uses PAT (and so a block of ports), i.e. is not an ILPIP.
    pub(super) fn is_pat(&self) -> bool {
        !matches!(self, Scenario::Ilpip { .. })
    }
    /// The scenario as event text: its name and address.
    pub(super) fn describe(&self) -> String {
        match self {
            Scenario::Ilpip { addr } => format!("ilpip {}", crate::packet::ip(*addr)),
            Scenario::LoadBalanced { lb, addr, .. } => {
                format!("load_balanced {lb} {}", crate::packet::ip(*addr))
            }
            Scenario::DefaultSnat { group, addr } => {
                format!("default_snat ({group}) {}", crate::packet::ip(*addr))
            }
        }
    }
}

/// What the engine keeps per instance slot.
pub(super) struct InstRt {
    pub(super) name: Arc<str>,
    pub(super) kind: InstanceKind,
    pub(super) model: Model,
    pub(super) private_ip: u32,
    pub(super) scenario: Scenario,
    /// Chunk base ports by slot (0 = empty), for PAT scenarios.
    pub(super) chunks: [u16; SLOTS],
    /// Counters `[tcp, udp, other]`.
    pub(super) stats: [InstanceStats; 3],
    /// Live flows (TCP and UDP), for the flow limit (R9.2).
    pub(super) live: u32,
    /// Ports stashed for a fast path's new TCP flows (`stash`), which count toward the flow
    /// limit like live flows (R9.2).
    pub(super) stashed: u32,
    /// Live flows it may hold (R9.2).
    pub(super) max_flows: u32,
    /// Token bucket of fail-fast answers (R9.5, `failfast`).
    pub(super) answers: super::failfast::Bucket,
}

impl InstRt {
    /// The public port of local port index `idx` of the block.
    pub(super) fn port_of(&self, idx: u16) -> u16 {
        self.chunks[(idx / CHUNK) as usize] + idx % CHUNK
    }
    /// Chunks the block holds.
    pub(super) fn n_chunks(&self) -> usize {
        self.chunks.iter().filter(|&&c| c != 0).count()
    }
}
