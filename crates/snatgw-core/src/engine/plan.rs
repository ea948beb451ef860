//! Configuration changes: scenario resolution and tiers planned, then committed (SPEC R1.x,
//! R2.8–R2.11).
//!
//! [`Engine::apply`](super::Engine::apply) first *plans* a topology without changing anything
//! (`Engine::plan`): each instance's scenario by precedence ILPIP > load-balanced >
//! default SNAT (R1.1–R1.4), a seeded frontend choice (R1.6), default-SNAT designations that
//! keep earlier ones and stay within 1000 instances per address (R1.3, R2.8), and each PAT
//! address's pool size for the tier, inflated by redeploy reports (R2.11). Errors come out of
//! the plan, so a rejected configuration changes nothing. `Engine::commit` then reclaims blocks
//! of instances that leave or change scenario (R1.4) and chunks above a smaller tier (R2.9),
//! sets the new tiers ([`tier_ports`], R2.8), adds and removes instances and grows blocks
//! (R2.4, R2.10).
//!
//! Which chunks are handed out or taken, and the flows dropped with them, is `ports`'; this
//! module decides only who gets how many.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::block::PortBlock;
use super::events::{EventKind, ReclaimReason};
use super::instance::{InstRt, Scenario};
use super::ports::{PipRt, CHUNK, CHUNKS, SLOTS};
use super::report::ApplyReport;
use super::{timers, Engine, NONE};
use crate::error::ConfigError;
use crate::topology::{SnatGroup, Topology, MAX_POOL};

/// SNAT ports per instance for a pool of `n` instances (SPEC R2.8). Pools above 1000 (only
/// reachable through a redeploy report, R2.11) get the last tier.
pub fn tier_ports(n: u32) -> u16 {
    match n {
        0..=50 => 1024,
        51..=100 => 512,
        101..=200 => 256,
        201..=400 => 128,
        401..=800 => 64,
        _ => 32,
    }
}

/// The planned outcome of a configuration, computed before anything changes.
pub(super) struct Plan {
    scenarios: Vec<Scenario>,
    pub(super) designation: BTreeMap<SnatGroup, u32>,
    lb_choice: HashMap<Arc<str>, u32>,
    /// Public address -> (pool size for the tier, default SNAT?)
    pip_sizes: BTreeMap<u32, (u32, bool)>,
}

impl Engine {
    pub(super) fn plan(&self, topo: &Topology) -> Result<Plan, ConfigError> {
        // Default-SNAT designation (R1.3): keep earlier designations; new groups go to the
        // least-loaded pool address that stays within 1000 instances (R2.8).
        let mut group_size: BTreeMap<SnatGroup, u32> = BTreeMap::new();
        let mut lb_choice = HashMap::new();
        let mut pre: Vec<Option<Scenario>> = Vec::with_capacity(topo.instances.len());
        for inst in &topo.instances {
            if let Some(addr) = inst.ilpip {
                pre.push(Some(Scenario::Ilpip { addr }));
                continue;
            }
            if let Some(m) = inst.lb.as_ref().filter(|m| !m.candidates.is_empty()) {
                let addr = match self.lb_choice.get(&inst.name) {
                    Some(a) if m.candidates.contains(a) => *a,
                    _ => {
                        // R1.6: one candidate at random, seeded from the config (reproducible).
                        let mut s = topo.params.seed ^ name_hash(&inst.name);
                        let r = crate::hash::splitmix64(&mut s);
                        m.candidates[(r % m.candidates.len() as u64) as usize]
                    }
                };
                lb_choice.insert(inst.name.clone(), addr);
                pre.push(Some(Scenario::LoadBalanced {
                    lb: m.lb.clone(),
                    addr,
                    candidates: m.candidates.len(),
                }));
                continue;
            }
            *group_size.entry(inst.group.clone()).or_default() += 1;
            pre.push(None);
        }
        let mut designation = BTreeMap::new();
        let mut load: BTreeMap<u32, u32> = topo.default_pool.iter().map(|&a| (a, 0)).collect();
        for (g, n) in &group_size {
            if let Some(&a) = self.designation.get(g) {
                if let Some(l) = load.get_mut(&a) {
                    *l += n;
                    designation.insert(g.clone(), a);
                }
            }
        }
        for (g, n) in &group_size {
            if designation.contains_key(g) {
                continue;
            }
            let best = topo
                .default_pool
                .iter()
                .map(|a| (load[a], *a))
                .filter(|(l, _)| (*l + n) as usize <= MAX_POOL)
                .min();
            let Some((_, a)) = best else {
                return Err(ConfigError::PoolTooLarge {
                    field: "gateway.default_snat_pool".into(),
                    address: format!("(no default-SNAT address has room for {g})"),
                    size: *n as usize,
                });
            };
            *load.get_mut(&a).expect("pool address") += n;
            designation.insert(g.clone(), a);
        }
        for (a, l) in &load {
            if *l as usize > MAX_POOL {
                return Err(ConfigError::PoolTooLarge {
                    field: "gateway.default_snat_pool".into(),
                    address: crate::packet::ip(*a).to_string(),
                    size: *l as usize,
                });
            }
        }
        let scenarios: Vec<Scenario> = topo
            .instances
            .iter()
            .zip(pre)
            .map(|(inst, s)| {
                s.unwrap_or_else(|| Scenario::DefaultSnat {
                    group: inst.group.clone(),
                    addr: designation[&inst.group],
                })
            })
            .collect();

        // Pool sizes per PAT address, inflated by redeploy reports (R2.11).
        let redeploy: HashMap<&str, (u32, u32)> = topo
            .deployments
            .iter()
            .filter_map(|d| d.reported.map(|r| (d.name.as_str(), (d.actual.max(1), r))))
            .collect();
        let mut per: BTreeMap<u32, (BTreeMap<Option<&str>, u32>, bool)> = BTreeMap::new();
        for (inst, s) in topo.instances.iter().zip(&scenarios) {
            let dep = match &inst.group {
                SnatGroup::Deployment(d) => Some(d.as_str()),
                _ => None,
            };
            match s {
                Scenario::Ilpip { .. } => {}
                Scenario::DefaultSnat { addr, .. } => {
                    let e = per.entry(*addr).or_insert_with(|| (BTreeMap::new(), true));
                    *e.0.entry(dep).or_default() += 1;
                }
                Scenario::LoadBalanced { .. } => {
                    // Every instance for which a frontend is a candidate counts in its pool.
                    for &a in &inst.lb.as_ref().expect("lb").candidates {
                        let e = per.entry(a).or_insert_with(|| (BTreeMap::new(), false));
                        *e.0.entry(dep).or_default() += 1;
                    }
                }
            }
        }
        let pip_sizes = per
            .into_iter()
            .map(|(a, (by_dep, def))| {
                let n: u32 = by_dep
                    .iter()
                    .map(|(d, &m)| match d.and_then(|d| redeploy.get(d)) {
                        Some(&(actual, reported)) => {
                            (m as u64 * reported as u64).div_ceil(actual as u64) as u32
                        }
                        None => m,
                    })
                    .sum();
                (a, (n, def))
            })
            .collect();
        Ok(Plan {
            scenarios,
            designation,
            lb_choice,
            pip_sizes,
        })
    }

    pub(super) fn commit(&mut self, topo: Topology, plan: Plan) -> ApplyReport {
        let mut report = ApplyReport::default();
        let new_names: HashMap<&str, usize> = topo
            .instances
            .iter()
            .enumerate()
            .map(|(i, x)| (&*x.name, i))
            .collect();
        // Which PAT instances lose their whole block, and which chunk slots others lose.
        let mut revoke: Vec<(u32, [bool; SLOTS], ReclaimReason)> = Vec::new();
        let mut remove_slots = Vec::new();
        for slot in 0..self.insts.len() as u32 {
            let Some(inst) = self.insts[slot as usize].as_ref() else {
                continue;
            };
            let keep = new_names
                .get(&*inst.name)
                .map(|&i| (&topo.instances[i], &plan.scenarios[i]));
            match keep {
                Some((ni, ns))
                    if ni.private_ip == inst.private_ip
                        && ni.kind == inst.kind
                        && ni.model == inst.model =>
                {
                    if *ns != inst.scenario
                        && (ns.addr() != inst.scenario.addr()
                            || !ns.is_pat()
                            || !inst.scenario.is_pat())
                    {
                        if inst.scenario.is_pat() {
                            revoke.push((slot, [true; SLOTS], ReclaimReason::ScenarioChange));
                        }
                        report.rescoped += 1;
                    }
                }
                _ => {
                    if inst.scenario.is_pat() {
                        revoke.push((slot, [true; SLOTS], ReclaimReason::InstanceRemoved));
                    }
                    remove_slots.push(slot);
                    report.removed += 1;
                }
            }
        }
        // Tier-up shrink (R2.9): keep the lowest-port chunks up to the new size.
        for slot in 0..self.insts.len() as u32 {
            let Some(inst) = self.insts[slot as usize].as_ref() else {
                continue;
            };
            if !inst.scenario.is_pat() || revoke.iter().any(|r| r.0 == slot) {
                continue;
            }
            let Some(&(n, _)) = plan.pip_sizes.get(&inst.scenario.addr()) else {
                continue;
            };
            let want = (tier_ports(n) / CHUNK) as usize;
            if inst.n_chunks() > want {
                let mut slots: Vec<usize> = (0..SLOTS).filter(|&s| inst.chunks[s] != 0).collect();
                slots.sort_by_key(|&s| inst.chunks[s]);
                let mut mask = [false; SLOTS];
                for &s in &slots[want..] {
                    mask[s] = true;
                }
                revoke.push((slot, mask, ReclaimReason::TierUp));
            }
        }
        report.flows_reclaimed = self.revoke_chunks(&revoke);
        for slot in remove_slots {
            self.remove_instance(slot);
        }

        // Timers: the wheel must span the longest timeout.
        let old_params = self.topo.params;
        let span = timers::span(&topo.params);
        self.topo = topo;
        self.agg.set_interval(self.topo.params.event_interval);
        self.history.set_cap(self.topo.params.max_flows as usize);
        self.designation = plan.designation;
        self.lb_choice = plan.lb_choice;
        if span + 1 >= self.wheel.len() || old_params != self.topo.params {
            self.rebuild_wheel(span);
        }

        // Tiers per public IP.
        let mut tier_events = Vec::new();
        for (&addr, &(n, def)) in &plan.pip_sizes {
            let ports = tier_ports(n);
            let pip = self.pips.entry(addr).or_insert_with(|| PipRt {
                owner: vec![NONE; CHUNKS],
                pool_size: 0,
                ports,
                default_snat: def,
            });
            if pip.ports != ports {
                tier_events.push(EventKind::TierChanged {
                    public_ip: addr,
                    pool_size: n,
                    from: pip.ports,
                    to: ports,
                });
            }
            pip.pool_size = n;
            pip.ports = ports;
            pip.default_snat = def;
        }
        for k in tier_events {
            self.event(k);
        }

        // Instances: update kept ones, add new ones, then grow blocks (R2.4, R2.10).
        let topo_instances = self.topo.instances.clone();
        for (i, ni) in topo_instances.iter().enumerate() {
            let scen = plan.scenarios[i].clone();
            let slot = match self.by_name.get(&ni.name) {
                Some(&s) => s,
                None => {
                    report.added += 1;
                    let s = self.add_instance(ni, scen.clone());
                    self.event(EventKind::ScenarioChanged {
                        instance: ni.name.clone(),
                        from: "none".into(),
                        to: scen.describe(),
                    });
                    s
                }
            };
            let inst = self.insts[slot as usize].as_mut().expect("instance");
            // R9.2: a lowered limit refuses new flows only; existing ones stay.
            inst.max_flows = ni.max_flows;
            if inst.scenario != scen {
                let from = inst.scenario.describe();
                if let Scenario::Ilpip { addr } = inst.scenario {
                    self.ilpips.remove(&addr);
                }
                inst.scenario = scen.clone();
                if let Scenario::Ilpip { addr } = scen {
                    self.ilpips.insert(addr, slot);
                }
                let to = scen.describe();
                if from != to {
                    self.event(EventKind::ScenarioChanged {
                        instance: ni.name.clone(),
                        from,
                        to,
                    });
                }
            }
            if scen.is_pat() {
                self.grow_block(slot);
            }
        }
        // Public IPs nobody uses any more.
        let used: std::collections::HashSet<u32> = plan.pip_sizes.keys().copied().collect();
        self.pips.retain(|a, _| used.contains(a));
        report
    }

    fn add_instance(&mut self, ni: &crate::topology::Instance, scen: Scenario) -> u32 {
        let slot = match self.inst_free.pop() {
            Some(s) => s,
            None => {
                self.insts.push(None);
                self.blocks.push(PortBlock::new());
                self.blocks.push(PortBlock::new());
                (self.insts.len() - 1) as u32
            }
        };
        if let Scenario::Ilpip { addr } = scen {
            self.ilpips.insert(addr, slot);
        }
        self.insts[slot as usize] = Some(InstRt {
            name: ni.name.clone(),
            kind: ni.kind,
            model: ni.model,
            private_ip: ni.private_ip,
            scenario: scen,
            chunks: [0; SLOTS],
            stats: Default::default(),
            live: 0,
            stashed: 0,
            max_flows: ni.max_flows,
            answers: Default::default(),
        });
        self.by_name.insert(ni.name.clone(), slot);
        self.by_private.insert(ni.private_ip, slot);
        slot
    }

    fn remove_instance(&mut self, slot: u32) {
        // Its stashes go while its block still counts their ports (`stash`).
        self.stash_void_instance(slot);
        let Some(inst) = self.insts[slot as usize].take() else {
            return;
        };
        self.by_name.remove(&inst.name);
        self.by_private.remove(&inst.private_ip);
        if let Scenario::Ilpip { addr } = inst.scenario {
            self.ilpips.remove(&addr);
        }
        self.blocks[slot as usize * 2].reset();
        self.blocks[slot as usize * 2 + 1].reset();
        self.takeover_forget_instance(slot);
        self.fence_forget_instance(slot);
        self.inst_free.push(slot);
    }
}

fn name_hash(s: &str) -> u64 {
    // FNV-1a: stable across runs and platforms (R1.6 reproducibility).
    crate::hash::fnv1a64(s.as_bytes())
}
