//! Inbound load balancing (SPEC R5.1, R3.7) and health-probe state (R5.2, R4.5).
//!
//! - **New inbound flow (R5.1).** A TCP SYN (no ACK) or a UDP datagram to a rule's frontend
//!   IP:port picks a healthy member of the rule's pool by a keyed hash of its 5-tuple,
//!   passes the member's NSGs inbound (source: the client; destination: the member's private
//!   address and backend port, R4.1), and becomes a sticky entry: the packet's destination is
//!   rewritten to member:backend port, and the member's return traffic from that address and
//!   port to the client has its source rewritten back to frontend:port. No SNAT port is used.
//!   No healthy member: dropped as `no_healthy_backend`; NSG denies: `nsg_denied`.
//! - **Lifetime (R3.7).** An entry ends after the rule's idle timeout (4–30 min) with no
//!   packet in either direction, or, for TCP, the gateway's FIN/RST delays (R3.2, R3.3).
//!   Exact to the second like PAT flows: an entry due at `now` never translates. Deadlines
//!   sit in an ordered queue and are re-checked lazily when they come due, in bounded steps
//!   (R9.4).
//! - **Probes (R5.2).** The engine keeps, per (probe, member), whether the member is up and
//!   how many probes failed in a row; a caller that performs probes (the prober of
//!   `snatgw run`) feeds results to [`Engine::probe_result`]. `unhealthy_threshold`
//!   consecutive failures mark a member down, one success marks it up. Decision: a member
//!   starts up, so a configuration change does not black-hole a pool until probes run. A
//!   member that goes down gets no new flows; its existing flows and its outbound traffic
//!   are untouched (R1.2, R4.5). A rule without a probe treats every member as healthy.
//!
//! It does not send probes (sans-IO), evaluate NSG rules (that is `nsg`) or touch the PAT
//! flow table, ports or timer wheel.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::Engine;
use crate::config::{NsgDirection, ProbeProtocol};
use crate::error::InvariantError;
use crate::hash::KeyedHash;
use crate::packet::{proto, tcp_flags, DropReason, Packet, Verdict};
use crate::policy::Query;
use crate::units::Time;

/// (protocol, address, port, address, port).
type Key5 = (u8, u32, u16, u32, u16);

/// A rule's member: name, private address, and its probe state's (probe, member) index.
type MemberRt = (Arc<str>, u32, Option<(usize, usize)>);

const FIN_IN: u8 = 1;
const FIN_OUT: u8 = 2;

/// One sticky inbound flow.
#[derive(Clone, Copy, Debug)]
struct LbFlow {
    proto: u8,
    client: u32,
    cport: u16,
    frontend: u32,
    fport: u16,
    member: u32,
    bport: u16,
    rule: u32,
    last_seen: Time,
    close_at: Time,
    state: u8,
    gen: u32,
    live: bool,
}

impl LbFlow {
    fn front(&self) -> Key5 {
        (
            self.proto,
            self.client,
            self.cport,
            self.frontend,
            self.fport,
        )
    }
    fn back(&self) -> Key5 {
        (self.proto, self.member, self.bport, self.client, self.cport)
    }
}

/// Health of one member for one probe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Health {
    down: bool,
    fails: u32,
    probes: u64,
    failures: u64,
    changed: Option<Time>,
}

/// Per-rule counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundRuleStats {
    /// Inbound flows created.
    pub flows: u64,
    /// New flows dropped: no healthy member.
    pub no_healthy: u64,
    /// New flows dropped by the chosen member's NSG.
    pub nsg_denied: u64,
}

/// Inbound-LB state of the engine. See the module documentation.
#[derive(Default)]
pub(super) struct InboundRt {
    hasher: Option<KeyedHash>,
    slab: Vec<LbFlow>,
    free: Vec<u32>,
    live: u32,
    by_front: hashbrown::HashMap<Key5, u32>,
    by_back: hashbrown::HashMap<Key5, u32>,
    /// Live entries per member address (R9.2: a member holds at most its instance's
    /// `max_flows` inbound entries).
    per_member: hashbrown::HashMap<u32, u32>,
    timers: BTreeMap<Time, Vec<(u32, u32)>>,
    /// (protocol, frontend, port) → rule index.
    rule_at: hashbrown::HashMap<(u8, u32, u16), u32>,
    /// Per rule: its members' addresses with their probe-state index.
    members: Vec<Vec<MemberRt>>,
    /// Per probe, per member (as `Policy::probes[k].members`).
    health: Vec<Vec<Health>>,
    stats: Vec<InboundRuleStats>,
    /// The policy the indexes were built from (to carry state over by names on apply).
    prev: Option<crate::policy::Policy>,
}

/// What a prober needs to probe one member (SPEC R5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// Load balancer.
    pub lb: String,
    /// Probe name.
    pub probe: String,
    /// Member instance.
    pub member: Arc<str>,
    /// Member's private address.
    pub addr: u32,
    /// TCP connect or HTTP GET 200.
    pub protocol: ProbeProtocol,
    /// Port.
    pub port: u16,
    /// HTTP path.
    pub path: String,
    /// Seconds between probes.
    pub interval: u32,
    /// Consecutive failures that mark the member down.
    pub threshold: u32,
}

/// The probe state of one member, for metrics and the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeView {
    /// Load balancer.
    pub lb: String,
    /// Probe name.
    pub probe: String,
    /// Member instance.
    pub member: Arc<str>,
    /// Whether it gets new inbound flows.
    pub up: bool,
    /// Failed probes in a row.
    pub consecutive_failures: u32,
    /// Probe results fed.
    pub probes: u64,
    /// Failed ones.
    pub failures: u64,
    /// When it last changed state (engine time), if ever.
    pub changed_at: Option<Time>,
}

/// One inbound LB flow, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundFlowView {
    /// Load balancer.
    pub lb: String,
    /// Rule.
    pub rule: String,
    /// IP protocol.
    pub proto: u8,
    /// Client address and port.
    pub client: (u32, u16),
    /// Frontend address and port.
    pub frontend: (u32, u16),
    /// Member private address and backend port.
    pub member: (u32, u16),
    /// Seconds since the last packet.
    pub idle: Time,
}

impl Engine {
    /// Rebuilds the inbound-LB state for the running topology: rule and member indexes,
    /// probe states (kept by load balancer, probe and member names) and counters (kept by
    /// load balancer and rule names). Flows whose rule, member or ports changed are removed.
    pub(super) fn inbound_rebuild(&mut self) {
        let prev = self.inb.prev.take();
        let pol = &self.topo.policy;
        let ib = &mut self.inb;
        if ib.hasher.is_none() {
            ib.hasher = Some(KeyedHash::new(self.topo.params.seed ^ 0x1b_5e1e_c7ed));
        }
        // Old health and stats by names.
        let mut old_health: HashMap<(String, String, Arc<str>), Health> = HashMap::new();
        let mut old_stats: HashMap<(String, String), InboundRuleStats> = HashMap::new();
        let mut old_rules: Vec<(String, String, u32, u16, u16)> = Vec::new();
        if let Some(prev) = prev {
            for (k, p) in prev.probes.iter().enumerate() {
                for (m, name) in p.members.iter().enumerate() {
                    if let Some(h) = ib.health.get(k).and_then(|v| v.get(m)) {
                        old_health.insert((p.lb.clone(), p.name.clone(), name.clone()), *h);
                    }
                }
            }
            for (k, r) in prev.rules.iter().enumerate() {
                if let Some(s) = ib.stats.get(k) {
                    old_stats.insert((r.lb.clone(), r.name.clone()), *s);
                }
                old_rules.push((
                    r.lb.clone(),
                    r.name.clone(),
                    r.frontend,
                    r.frontend_port,
                    r.backend_port,
                ));
            }
        }
        ib.health = pol
            .probes
            .iter()
            .map(|p| {
                p.members
                    .iter()
                    .map(|m| {
                        old_health
                            .get(&(p.lb.clone(), p.name.clone(), m.clone()))
                            .copied()
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .collect();
        ib.stats = pol
            .rules
            .iter()
            .map(|r| {
                old_stats
                    .get(&(r.lb.clone(), r.name.clone()))
                    .copied()
                    .unwrap_or_default()
            })
            .collect();
        ib.rule_at.clear();
        ib.members.clear();
        let addr_of: HashMap<&str, u32> = self
            .topo
            .instances
            .iter()
            .map(|i| (&*i.name, i.private_ip))
            .collect();
        for (k, r) in pol.rules.iter().enumerate() {
            for (on, p) in [(r.tcp, proto::TCP), (r.udp, proto::UDP)] {
                if on {
                    ib.rule_at
                        .insert((p, r.frontend, r.frontend_port), k as u32);
                }
            }
            let ms = r
                .members
                .iter()
                .filter_map(|m| {
                    let a = *addr_of.get(&**m)?;
                    let h = r.probe.and_then(|pk| {
                        pol.probes[pk]
                            .members
                            .iter()
                            .position(|x| x == m)
                            .map(|mi| (pk, mi))
                    });
                    Some((m.clone(), a, h))
                })
                .collect();
            ib.members.push(ms);
        }
        // Remap live flows to the new rule indices; drop those that no longer fit.
        let new_idx: HashMap<(&str, &str), usize> = pol
            .rules
            .iter()
            .enumerate()
            .map(|(k, r)| ((r.lb.as_str(), r.name.as_str()), k))
            .collect();
        let mut gone = Vec::new();
        for fi in 0..ib.slab.len() {
            let f = ib.slab[fi];
            if !f.live {
                continue;
            }
            let keep = old_rules
                .get(f.rule as usize)
                .and_then(|(lb, name, fe, fp, bp)| {
                    let &k = new_idx.get(&(lb.as_str(), name.as_str()))?;
                    let r = &pol.rules[k];
                    let member_ok = ib.members[k].iter().any(|(_, a, _)| *a == f.member);
                    (r.frontend == *fe
                        && r.frontend_port == *fp
                        && r.backend_port == *bp
                        && member_ok
                        && ib.rule_at.get(&(f.proto, f.frontend, f.fport)) == Some(&(k as u32)))
                    .then_some(k)
                });
            match keep {
                Some(k) => ib.slab[fi].rule = k as u32,
                None => gone.push(fi as u32),
            }
        }
        for fi in gone {
            self.inbound_remove(fi);
        }
        self.inb.prev = Some(self.topo.policy.clone());
    }

    fn inbound_remove(&mut self, fi: u32) {
        let ib = &mut self.inb;
        let f = ib.slab[fi as usize];
        ib.by_front.remove(&f.front());
        ib.by_back.remove(&f.back());
        let s = &mut ib.slab[fi as usize];
        s.live = false;
        s.gen = s.gen.wrapping_add(1);
        ib.free.push(fi);
        ib.live -= 1;
        if let hashbrown::hash_map::Entry::Occupied(mut e) = ib.per_member.entry(f.member) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// When entry `f` ends if nothing else happens.
    fn inbound_deadline(&self, f: &LbFlow) -> Time {
        let idle = self
            .topo
            .policy
            .rules
            .get(f.rule as usize)
            .map_or(240, |r| r.idle_timeout);
        let at = f.last_seen.saturating_add(idle);
        if f.close_at != 0 {
            at.min(f.close_at)
        } else {
            at
        }
    }

    /// The live entry `fi` found by a lookup, unless it is due at `now` (then removed).
    fn inbound_live(&mut self, fi: u32) -> bool {
        let f = self.inb.slab[fi as usize];
        if self.inbound_deadline(&f) <= self.now {
            self.inbound_remove(fi);
            false
        } else {
            true
        }
    }

    fn inbound_touch(&mut self, fi: u32, flags: u8, from_client: bool) {
        let now = self.now;
        let (fin, rst) = (self.topo.params.fin_timeout, self.topo.params.rst_timeout);
        let f = &mut self.inb.slab[fi as usize];
        f.last_seen = now;
        if f.proto != proto::TCP {
            return;
        }
        let mut close = None;
        if flags & tcp_flags::RST != 0 {
            close = Some(now.saturating_add(rst));
        } else if flags & tcp_flags::FIN != 0 {
            f.state |= if from_client { FIN_IN } else { FIN_OUT };
            if f.state & (FIN_IN | FIN_OUT) == FIN_IN | FIN_OUT {
                close = Some(now.saturating_add(fin));
            }
        }
        if let Some(at) = close {
            if f.close_at == 0 || at < f.close_at {
                f.close_at = at;
                let (fi2, gen) = (fi, f.gen);
                self.inb.timers.entry(at).or_default().push((fi2, gen));
            }
        }
    }

    /// Inbound packet `p` that matched no PAT flow: an inbound LB flow's packet, a new
    /// inbound LB flow, or `None` when no inbound rule concerns it.
    pub(super) fn inbound_lb(&mut self, p: &Packet) -> Option<Verdict> {
        if self.inb.rule_at.is_empty() && self.inb.live == 0 {
            return None;
        }
        if p.proto != proto::TCP && p.proto != proto::UDP {
            return None;
        }
        let key = (p.proto, p.src, p.src_port, p.dst, p.dst_port);
        let syn_only =
            p.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN;
        if let Some(&fi) = self.inb.by_front.get(&key) {
            if self.inbound_live(fi) {
                let f = self.inb.slab[fi as usize];
                // A new SYN on an entry that saw a FIN or RST starts the connection over
                // (as for PAT flows, R3.1 decision), choosing a member afresh (R5.1).
                let closing = f.close_at != 0 || f.state != 0;
                if !(p.proto == proto::TCP && syn_only && closing) {
                    self.inbound_touch(fi, p.flags, true);
                    return Some(Verdict::Translate {
                        addr: f.member,
                        port: f.bport,
                    });
                }
                self.inbound_remove(fi);
            }
        }
        let &rule = self.inb.rule_at.get(&(p.proto, p.dst, p.dst_port))?;
        if p.proto == proto::TCP && !syn_only {
            // Not the start of a connection and no entry: unsolicited (R3.8).
            return Some(self.drop_global(DropReason::UnsolicitedInbound));
        }
        Some(self.inbound_new(p, rule))
    }

    fn member_up(&self, h: Option<(usize, usize)>) -> bool {
        h.is_none_or(|(k, m)| !self.inb.health[k][m].down)
    }

    fn inbound_new(&mut self, p: &Packet, rule: u32) -> Verdict {
        let r = rule as usize;
        let healthy: Vec<(u32, usize)> = self.inb.members[r]
            .iter()
            .enumerate()
            .filter(|(_, (_, _, h))| self.member_up(*h))
            .map(|(i, (_, a, _))| (*a, i))
            .collect();
        if healthy.is_empty() {
            self.inb.stats[r].no_healthy += 1;
            return self.drop_global(DropReason::NoHealthyBackend);
        }
        let h = self.inb.hasher.expect("hasher set on apply").hash(
            ((p.src as u64) << 32) | p.dst as u64,
            ((p.src_port as u64) << 24) | ((p.dst_port as u64) << 8) | p.proto as u64,
        );
        let (member, _) = healthy[(h % healthy.len() as u64) as usize];
        let bport = self.topo.policy.rules[r].backend_port;
        let slot = self.by_private.get(&member).copied();
        let q = Query {
            direction: NsgDirection::Inbound,
            proto: p.proto,
            src: p.src,
            sport: Some(p.src_port),
            dst: member,
            dport: bport,
        };
        if !self.nsg_allows(member, &q) {
            self.inb.stats[r].nsg_denied += 1;
            return match slot {
                Some(s) => self.drop_inst(s, p.proto, DropReason::NsgDenied),
                None => self.drop_global(DropReason::NsgDenied),
            };
        }
        let back = (p.proto, member, bport, p.src, p.src_port);
        if self.inb.by_back.contains_key(&back) {
            // The same client endpoint already reaches this member:port through another
            // frontend; a second entry could not be told apart on the way back (R2.2).
            return self.drop_global(DropReason::Policy);
        }
        // R9.2: inbound entries count against the gateway's flow limit, and a member holds
        // at most its instance's `max_flows` of them, so a flood at one frontend stops there.
        if self.flows.live() + self.inb.live >= self.topo.params.max_flows {
            return self.drop_global(DropReason::FlowLimit);
        }
        if let Some(s) = slot {
            let cap = self.insts[s as usize]
                .as_ref()
                .map_or(u32::MAX, |i| i.max_flows);
            if self.inb.per_member.get(&member).copied().unwrap_or(0) >= cap {
                return self.drop_inst(s, p.proto, DropReason::FlowLimit);
            }
        }
        let now = self.now;
        let f = LbFlow {
            proto: p.proto,
            client: p.src,
            cport: p.src_port,
            frontend: p.dst,
            fport: p.dst_port,
            member,
            bport,
            rule,
            last_seen: now,
            close_at: 0,
            state: 0,
            gen: 0,
            live: true,
        };
        let ib = &mut self.inb;
        let fi = match ib.free.pop() {
            Some(fi) => {
                let gen = ib.slab[fi as usize].gen;
                ib.slab[fi as usize] = LbFlow { gen, ..f };
                fi
            }
            None => {
                ib.slab.push(f);
                (ib.slab.len() - 1) as u32
            }
        };
        ib.by_front.insert(f.front(), fi);
        ib.by_back.insert(back, fi);
        ib.live += 1;
        *ib.per_member.entry(member).or_insert(0) += 1;
        ib.stats[r].flows += 1;
        let gen = ib.slab[fi as usize].gen;
        let at = now.saturating_add(self.topo.policy.rules[r].idle_timeout);
        self.inb.timers.entry(at).or_default().push((fi, gen));
        if let Some(s) = slot {
            if let Some(i) = self.insts[s as usize].as_mut() {
                i.stats[super::stats::stats_bucket(p.proto)].packets_in += 1;
            }
        }
        Verdict::Translate {
            addr: member,
            port: bport,
        }
    }

    /// Outbound packet `p` from a member: return traffic of an inbound LB flow gets the
    /// frontend as its source; `None` when it is none.
    pub(super) fn outbound_lb(&mut self, p: &Packet) -> Option<Verdict> {
        if self.inb.live == 0 {
            return None;
        }
        let &fi = self
            .inb
            .by_back
            .get(&(p.proto, p.src, p.src_port, p.dst, p.dst_port))?;
        if !self.inbound_live(fi) {
            return None;
        }
        self.inbound_touch(fi, p.flags, false);
        let f = self.inb.slab[fi as usize];
        Some(Verdict::Translate {
            addr: f.frontend,
            port: f.fport,
        })
    }

    /// Whether the return path of a live inbound TCP flow (R5.1) would take an outbound TCP
    /// packet of `member` to (`client`, `cport`) from some source port: it can only be the
    /// backend port of a rule the member serves (`stash`: a port stash is granted before its
    /// flows' source ports are known). Costs nothing while no inbound flow exists.
    pub(super) fn lb_return_toward(&self, member: u32, client: u32, cport: u16) -> bool {
        if self.inb.live == 0 {
            return false;
        }
        self.inb.members.iter().enumerate().any(|(r, ms)| {
            let rule = &self.topo.policy.rules[r];
            rule.tcp
                && ms.iter().any(|(_, a, _)| *a == member)
                && self
                    .lb_lookup_outbound(proto::TCP, member, rule.backend_port, client, cport)
                    .is_some()
        })
    }

    /// For an ICMP error from the internet about a packet a member sent back through the
    /// frontend (R3.6): the quoted packet left as `frontend:fport` → `client:cport`. Returns
    /// the member's private (address, backend port) to restore. Creates and refreshes
    /// nothing; an entry past its deadline is not found.
    pub(super) fn lb_lookup_inbound(
        &self,
        proto: u8,
        frontend: u32,
        fport: u16,
        client: u32,
        cport: u16,
    ) -> Option<(u32, u16)> {
        let &fi = self
            .inb
            .by_front
            .get(&(proto, client, cport, frontend, fport))?;
        let f = &self.inb.slab[fi as usize];
        (self.inbound_deadline(f) > self.now).then_some((f.member, f.bport))
    }

    /// For an ICMP error a member sends about a packet of an inbound flow it received
    /// (R3.6): the quoted packet arrived as `client:cport` → `member:bport`. Returns the
    /// frontend (address, port) the client knows. Creates and refreshes nothing.
    pub(super) fn lb_lookup_outbound(
        &self,
        proto: u8,
        member: u32,
        bport: u16,
        client: u32,
        cport: u16,
    ) -> Option<(u32, u16)> {
        let &fi = self
            .inb
            .by_back
            .get(&(proto, member, bport, client, cport))?;
        let f = &self.inb.slab[fi as usize];
        (self.inbound_deadline(f) > self.now).then_some((f.frontend, f.fport))
    }

    /// Removes inbound entries that are due at `now`, examining at most `budget` timer
    /// entries (R9.4). Returns the budget left.
    pub(super) fn inbound_expire(&mut self, now: Time, mut budget: u32) -> u32 {
        while budget > 0 {
            let Some(mut e) = self.inb.timers.first_entry() else {
                break;
            };
            if *e.key() > now {
                break;
            }
            let Some((fi, gen)) = e.get_mut().pop() else {
                e.remove();
                continue;
            };
            if e.get().is_empty() {
                e.remove();
            }
            budget -= 1;
            let f = self.inb.slab[fi as usize];
            if !f.live || f.gen != gen {
                continue;
            }
            let at = self.inbound_deadline(&f);
            if at <= now {
                self.inbound_remove(fi);
            } else {
                self.inb.timers.entry(at).or_default().push((fi, gen));
            }
        }
        budget
    }

    /// The first second with inbound timer work, if any.
    pub(super) fn inbound_next_deadline(&self) -> Option<Time> {
        self.inb.timers.keys().next().copied()
    }

    /// Checks the inbound-LB state's invariants (tests): both indexes hold exactly the live
    /// entries with their own keys, the live count and the per-member counts match, every
    /// entry's rule exists and its member is one of the rule's members, and free slots are not
    /// live. Changes nothing.
    pub fn check_inbound_invariants(&self) -> Result<(), InvariantError> {
        let ib = &self.inb;
        let live: Vec<(u32, &LbFlow)> = ib
            .slab
            .iter()
            .enumerate()
            .filter(|(_, f)| f.live)
            .map(|(i, f)| (i as u32, f))
            .collect();
        if live.len() != ib.live as usize
            || ib.by_front.len() != live.len()
            || ib.by_back.len() != live.len()
        {
            return Err(InvariantError::Inbound(format!(
                "inbound: {} live entries, count {}, indexes {}/{}",
                live.len(),
                ib.live,
                ib.by_front.len(),
                ib.by_back.len()
            )));
        }
        for (fi, f) in &live {
            if ib.by_front.get(&f.front()) != Some(fi) || ib.by_back.get(&f.back()) != Some(fi) {
                return Err(InvariantError::Inbound(format!(
                    "inbound entry {fi} not indexed by its keys: {f:?}"
                )));
            }
            let members = ib.members.get(f.rule as usize).ok_or_else(|| {
                InvariantError::Inbound(format!("inbound entry {fi} of a missing rule {}", f.rule))
            })?;
            if !members.iter().any(|(_, a, _)| *a == f.member) {
                return Err(InvariantError::Inbound(format!(
                    "inbound entry {fi} on a non-member: {f:?}"
                )));
            }
        }
        if let Some(fi) = ib.free.iter().find(|&&fi| ib.slab[fi as usize].live) {
            return Err(InvariantError::Inbound(format!(
                "free inbound slot {fi} is live"
            )));
        }
        let mut per: hashbrown::HashMap<u32, u32> = hashbrown::HashMap::new();
        for (_, f) in &live {
            *per.entry(f.member).or_insert(0) += 1;
        }
        if per != ib.per_member {
            return Err(InvariantError::Inbound(format!(
                "inbound entries per member {:?}, counted {:?}",
                per, ib.per_member
            )));
        }
        Ok(())
    }

    /// Live inbound LB flows.
    pub fn inbound_flow_count(&self) -> usize {
        self.inb.live as usize
    }

    /// Live inbound LB flows, listed (R6.3).
    pub fn inbound_flows(&self) -> Vec<InboundFlowView> {
        self.inbound_flows_page(None, 0, u32::MAX, usize::MAX).0
    }

    /// One page of the live inbound LB flows (R6.3) of load balancer `lb` (all when `None`):
    /// examines at most `scan` slots from slot `cursor` on and returns at most `limit` flows,
    /// with the slot to continue from (`None`: the table was listed to its end). Bounded
    /// work per call, as for PAT flows (R9.4).
    pub fn inbound_flows_page(
        &self,
        lb: Option<&str>,
        cursor: u32,
        scan: u32,
        limit: usize,
    ) -> (Vec<InboundFlowView>, Option<u32>) {
        let pol = &self.topo.policy;
        let slab = &self.inb.slab;
        let mut out = Vec::new();
        let mut i = cursor as usize;
        let end = i.saturating_add(scan as usize).min(slab.len());
        while i < end && out.len() < limit {
            let f = &slab[i];
            i += 1;
            if !f.live || self.inbound_deadline(f) <= self.now {
                continue;
            }
            if lb.is_some_and(|l| *pol.rules[f.rule as usize].lb != *l) {
                continue;
            }
            out.push(self.inbound_view(f));
        }
        let next = (i < slab.len()).then_some(i as u32);
        (out, next)
    }

    fn inbound_view(&self, f: &LbFlow) -> InboundFlowView {
        let r = &self.topo.policy.rules[f.rule as usize];
        InboundFlowView {
            lb: r.lb.clone(),
            rule: r.name.clone(),
            proto: f.proto,
            client: (f.client, f.cport),
            frontend: (f.frontend, f.fport),
            member: (f.member, f.bport),
            idle: self.now.saturating_sub(f.last_seen),
        }
    }

    /// Counters per inbound rule: (load balancer, rule, counters).
    pub fn inbound_rule_stats(&self) -> Vec<(String, String, InboundRuleStats)> {
        self.topo
            .policy
            .rules
            .iter()
            .zip(&self.inb.stats)
            .map(|(r, s)| (r.lb.clone(), r.name.clone(), *s))
            .collect()
    }

    /// Every (probe, member) a prober must probe (SPEC R5.2).
    pub fn probe_targets(&self) -> Vec<ProbeTarget> {
        let addr_of: HashMap<&str, u32> = self
            .topo
            .instances
            .iter()
            .map(|i| (&*i.name, i.private_ip))
            .collect();
        let mut out = Vec::new();
        for p in &self.topo.policy.probes {
            for m in &p.members {
                if let Some(&addr) = addr_of.get(&**m) {
                    out.push(ProbeTarget {
                        lb: p.lb.clone(),
                        probe: p.name.clone(),
                        member: m.clone(),
                        addr,
                        protocol: p.protocol,
                        port: p.port,
                        path: p.path.clone(),
                        interval: p.interval,
                        threshold: p.threshold,
                    });
                }
            }
        }
        out
    }

    /// Feeds one probe result of `member` for probe `probe` of load balancer `lb` at `now`
    /// (R5.2): `unhealthy_threshold` failures in a row mark it down, a success marks it up.
    /// Returns `Some(up)` when the member changed state (and queues a `probe_changed` event,
    /// R6.2), `None` otherwise (or when no such probe or member exists, e.g. after a
    /// configuration change).
    pub fn probe_result(
        &mut self,
        now: Time,
        lb: &str,
        probe: &str,
        member: &str,
        ok: bool,
    ) -> Option<bool> {
        self.now = self.now.max(now);
        let pol = &self.topo.policy;
        let k = pol
            .probes
            .iter()
            .position(|p| p.lb == lb && p.name == probe)?;
        let m = pol.probes[k].members.iter().position(|x| &**x == member)?;
        let threshold = pol.probes[k].threshold;
        let now = self.now;
        let h = &mut self.inb.health[k][m];
        h.probes += 1;
        let was_down = h.down;
        if ok {
            h.fails = 0;
            h.down = false;
        } else {
            h.failures += 1;
            h.fails = h.fails.saturating_add(1);
            if h.fails >= threshold {
                h.down = true;
            }
        }
        if was_down == h.down {
            return None;
        }
        h.changed = Some(now);
        let (up, failures) = (!h.down, h.fails);
        let p = &self.topo.policy.probes[k];
        let kind = super::EventKind::ProbeChanged {
            lb: p.lb.clone(),
            probe: p.name.clone(),
            member: p.members[m].clone(),
            up,
            failures,
        };
        self.event(kind);
        Some(up)
    }

    /// The probe state of every (probe, member).
    pub fn probe_states(&self) -> Vec<ProbeView> {
        let mut out = Vec::new();
        for (k, p) in self.topo.policy.probes.iter().enumerate() {
            for (m, name) in p.members.iter().enumerate() {
                let h = self.inb.health[k][m];
                out.push(ProbeView {
                    lb: p.lb.clone(),
                    probe: p.name.clone(),
                    member: name.clone(),
                    up: !h.down,
                    consecutive_failures: h.fails,
                    probes: h.probes,
                    failures: h.failures,
                    changed_at: h.changed,
                });
            }
        }
        out
    }
}
