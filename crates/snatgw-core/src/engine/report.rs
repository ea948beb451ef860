//! What the engine tells operators: instance reports and live translations (SPEC R6.1, R6.3).
//!
//! [`InstanceReport`] (scenario with its deciding rule, block as port ranges, pool size for the
//! tier R2.8/R2.11, used ports R2.3, counters R6.1), [`FlowView`] (one live translation, what
//! `conntrack -L` gives, R6.3) and [`ApplyReport`] (what a configuration change did). These are
//! read-only views built on request; nothing here changes engine state.

use std::sync::Arc;

use super::ports::CHUNK;
use super::{tcp, timers, Engine, InstanceStats, Scenario, Time};
use crate::config::{InstanceKind, Model};
use crate::packet::{proto, L4};

/// One live translation (SPEC R6.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowView {
    /// Instance name.
    pub instance: Arc<str>,
    /// Protocol.
    pub l4: L4,
    /// Private source address and port.
    pub private: (u32, u16),
    /// Public address and SNAT port.
    pub public: (u32, u16),
    /// Destination address and port.
    pub remote: (u32, u16),
    /// Last packet, either direction.
    pub last_seen: Time,
    /// When the port is released if nothing else happens.
    pub expires_at: Time,
    /// `open`, `fin_out`, `fin_in`, `closing` (FIN both ways) or `reset`.
    pub state: &'static str,
}

/// What the engine says about one instance (for `snatgw show` and the API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceReport {
    /// Name.
    pub name: Arc<str>,
    /// Kind.
    pub kind: InstanceKind,
    /// Model.
    pub model: Model,
    /// Private address.
    pub private_ip: u32,
    /// Scenario, with the deciding rule ([`Scenario::rule`]).
    pub scenario: Scenario,
    /// Preallocated SNAT ports per protocol (65535 for an ILPIP: all ports, no PAT).
    pub allocated: u32,
    /// The block as port ranges, inclusive (empty for an ILPIP).
    pub block: Vec<(u16, u16)>,
    /// Pool size deciding the tier (R2.8, as reported during a redeploy R2.11); 1 for an ILPIP.
    pub pool_size: u32,
    /// Used SNAT ports per protocol `[tcp, udp]` (R2.3).
    pub used: [u32; 2],
    /// Live flows per protocol `[tcp, udp]`.
    pub flows: [u32; 2],
    /// Counters `[tcp, udp, other]`.
    pub stats: [InstanceStats; 3],
}

/// Outcome of [`Engine::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Instances added.
    pub added: usize,
    /// Instances removed.
    pub removed: usize,
    /// Instances whose scenario changed.
    pub rescoped: usize,
    /// Flows dropped because their ports were reclaimed.
    pub flows_reclaimed: usize,
}

impl Engine {
    /// One instance's report, by name.
    pub fn instance(&self, name: &str) -> Option<InstanceReport> {
        let &slot = self.by_name.get(name)?;
        Some(self.report(slot))
    }

    /// Reports for every instance, in configuration order.
    pub fn instances(&self) -> Vec<InstanceReport> {
        self.topo
            .instances
            .iter()
            .filter_map(|i| self.instance(&i.name))
            .collect()
    }

    fn report(&self, slot: u32) -> InstanceReport {
        let inst = self.insts[slot as usize].as_ref().expect("instance");
        let (allocated, block, pool_size) = if inst.scenario.is_pat() {
            let mut bases: Vec<u16> = inst.chunks.iter().copied().filter(|&c| c != 0).collect();
            bases.sort_unstable();
            let mut ranges: Vec<(u16, u16)> = Vec::new();
            for b in bases {
                match ranges.last_mut() {
                    Some(r) if r.1.wrapping_add(1) == b => r.1 = b + CHUNK - 1,
                    _ => ranges.push((b, b + CHUNK - 1)),
                }
            }
            let n = self
                .pips
                .get(&inst.scenario.addr())
                .map_or(0, |p| p.pool_size);
            (inst.n_chunks() as u32 * CHUNK as u32, ranges, n)
        } else {
            (65535, Vec::new(), 1)
        };
        let (tp, up) = (
            &self.blocks[slot as usize * 2],
            &self.blocks[slot as usize * 2 + 1],
        );
        let mut flows = [0u32; 2];
        for (l, b) in [tp, up].iter().enumerate() {
            flows[l] = u32::try_from(b.flows()).unwrap_or(u32::MAX);
        }
        InstanceReport {
            name: inst.name.clone(),
            kind: inst.kind,
            model: inst.model,
            private_ip: inst.private_ip,
            scenario: inst.scenario.clone(),
            allocated,
            block,
            pool_size,
            used: [tp.used.count(), up.used.count()],
            flows,
            stats: inst.stats,
        }
    }

    /// Live translations, optionally only one instance's (SPEC R6.3).
    pub fn flows(&self, instance: Option<&str>) -> Vec<FlowView> {
        let only = instance.and_then(|n| self.by_name.get(n).copied());
        if instance.is_some() && only.is_none() {
            return Vec::new();
        }
        let idle = self.topo.params.idle_timeout;
        let now = self.now;
        self.flows
            .iter_live()
            .map(|(_, f)| f)
            .filter(|f| only.is_none_or(|s| f.slot() == s))
            // Flows past their deadline but not yet reaped (R9.4 backlog) are not listed.
            .filter(|f| timers::deadline(f, idle).0 > now)
            .map(|f| {
                let inst = self.insts[f.slot() as usize].as_ref().expect("instance");
                let exp = timers::deadline(f, idle).0;
                FlowView {
                    instance: inst.name.clone(),
                    l4: if f.proto == proto::TCP {
                        L4::Tcp
                    } else {
                        L4::Udp
                    },
                    private: (f.src, f.sport),
                    public: (f.public, f.pport),
                    remote: (f.dst, f.dport),
                    last_seen: f.last_seen,
                    expires_at: exp,
                    state: tcp::state_name(f.state),
                }
            })
            .collect()
    }
}
