//! What the engine tells operators: instance reports and live translations (SPEC R6.1, R6.3).
//!
//! [`InstanceReport`] (scenario with its deciding rule, block as port ranges, pool size for the
//! tier R2.8/R2.11, used ports R2.3, counters R6.1), [`FlowView`] (one live translation, what
//! `conntrack -L` gives, R6.3) and [`ApplyReport`] (what a configuration change did). These are
//! read-only views built on request; nothing here changes engine state.

use std::sync::Arc;

use super::ports::CHUNK;
use super::{tcp, timers, Engine, InstanceStats, Scenario};
use crate::config::{InstanceKind, Model};
use crate::packet::{proto, L4};
use crate::units::Time;

/// Which live translations [`Engine::flows_page`] lists (R6.3); `None` matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// Only this instance's flows.
    pub instance: Option<String>,
    /// Only this protocol.
    pub l4: Option<L4>,
    /// Only flows to this destination address.
    pub dst: Option<u32>,
    /// Only flows to this destination port.
    pub dport: Option<u16>,
    /// Only flows in this state (`open`, `fin_out`, `fin_in`, `closing`, `reset`).
    pub state: Option<&'static str>,
}

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
    /// Used SNAT ports per protocol `[tcp, udp]` (R2.3: held by at least one flow; a port only
    /// stashed for a fast path's next flows, [`Engine::stash_take`](super::Engine::stash_take),
    /// is not counted).
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
        // Ports stashed for a fast path (`stash`, TCP) hold the block but are neither flows nor
        // used ports: R2.3 counts ports held by at least one flow; a stashed port is still the
        // tenant's to use (the kernel gives it to the instance's next flow to that destination).
        flows[0] = flows[0].saturating_sub(inst.stashed);
        let stash_only = if inst.stashed > 0 {
            self.stash_only_ports(slot * 2, tp)
        } else {
            0
        };
        InstanceReport {
            name: inst.name.clone(),
            kind: inst.kind,
            model: inst.model,
            private_ip: inst.private_ip,
            scenario: inst.scenario.clone(),
            allocated,
            block,
            pool_size,
            used: [tp.used.count() - stash_only, up.used.count()],
            flows,
            stats: inst.stats,
        }
    }

    /// Live translations, optionally only one instance's (SPEC R6.3). Scans the whole table:
    /// for tests and tools; a running gateway pages with [`Engine::flows_page`].
    pub fn flows(&self, instance: Option<&str>) -> Vec<FlowView> {
        let filter = FlowFilter {
            instance: instance.map(Into::into),
            ..FlowFilter::default()
        };
        self.flows_page(&filter, 0, u32::MAX, usize::MAX).0
    }

    /// One page of live translations matching `filter` (SPEC R6.3, bounded work): looks at
    /// most at `max_scan` flow-table slots from slot `cursor` on and returns at most `limit`
    /// flows, with the cursor to continue from (`None`: the end of the table). Flows past their
    /// deadline but not yet reaped (R9.4 backlog) are not listed.
    pub fn flows_page(
        &self,
        filter: &FlowFilter,
        cursor: u32,
        max_scan: u32,
        limit: usize,
    ) -> (Vec<FlowView>, Option<u32>) {
        let only = match &filter.instance {
            Some(n) => match self.by_name.get(n.as_str()) {
                Some(&s) => Some(s),
                None => return (Vec::new(), None),
            },
            None => None,
        };
        let idle = self.topo.params.idle_timeout;
        let now = self.now;
        let slots = self.flows.slots();
        let end = u64::from(cursor)
            .saturating_add(u64::from(max_scan))
            .min(u64::from(slots)) as u32;
        let mut out = Vec::new();
        let mut fi = cursor;
        while fi < end && out.len() < limit {
            let f = self.flows.get(fi);
            fi += 1;
            if f.block == super::NONE
                || only.is_some_and(|s| f.slot() != s)
                || filter
                    .l4
                    .is_some_and(|l| (f.block & 1) as usize != l as usize)
                || filter.dst.is_some_and(|d| f.dst != d)
                || filter.dport.is_some_and(|p| f.dport != p)
                || filter
                    .state
                    .is_some_and(|st| tcp::state_name(f.state) != st)
            {
                continue;
            }
            let exp = timers::deadline(f, idle).0;
            if exp <= now {
                continue;
            }
            let inst = self.insts[f.slot() as usize].as_ref().expect("instance");
            out.push(FlowView {
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
            });
        }
        (out, (fi < slots).then_some(fi))
    }

    /// Per instance, its busiest destinations: (instance, protocol, destination, port, ports
    /// busy for it), at most `per_instance` each, busiest first. Only destinations with at
    /// least 16 flows from one instance are tracked (the hot-destination cache; one with fewer
    /// uses at most 15 of the block's ports), so this is bounded by that cache, not by flows.
    pub fn busiest_destinations(&self, per_instance: usize) -> Vec<(Arc<str>, L4, u32, u16, u32)> {
        let mut all: Vec<(u32, u32, u32, u16)> = self
            .flows
            .hot_dests()
            .map(|hd| (hd.block, hd.n, hd.dst, hd.dport))
            .collect();
        // Busiest first within each instance slot.
        all.sort_unstable_by(|a, b| (a.0 >> 1, b.1).cmp(&(b.0 >> 1, a.1)));
        let mut out = Vec::new();
        let mut last = (u32::MAX, 0usize);
        for (block, n, dst, dport) in all {
            let slot = block >> 1;
            if last.0 != slot {
                last = (slot, 0);
            }
            if last.1 >= per_instance {
                continue;
            }
            last.1 += 1;
            let Some(inst) = self.insts[slot as usize].as_ref() else {
                continue;
            };
            let l4 = if block & 1 == 0 { L4::Tcp } else { L4::Udp };
            out.push((inst.name.clone(), l4, dst, dport, n));
        }
        out
    }
}
