//! Network security groups at run time (SPEC §4): evaluation order, hit counters and the
//! stateful entries of ILPIP instances.
//!
//! - **Order (R4.1).** Inbound: the subnet's NSG, then the NIC's; outbound: the NIC's, then
//!   the subnet's. Both must allow; a level without an NSG allows. Each evaluated NSG counts a
//!   hit on the rule that decided (what flow logs give).
//! - **Where it is asked.** Outbound, only for a packet that would start a flow, after the
//!   checks that would drop it anyway and before a port is taken (R4.3); inbound, for a new
//!   inbound LB flow (`inbound`) and for traffic to an ILPIP. Intra-VNet traffic passes
//!   untranslated and unevaluated (R1.7 decision: the gateway only sees it as a router).
//! - **Stateful (R4.4).** Packets of an existing PAT or LB flow are never re-evaluated (the
//!   flow tables find them first). An ILPIP is stateless 1:1 (R1.1), so for an ILPIP
//!   instance with an NSG this module keeps one entry per allowed 5-tuple (either direction
//!   started it), refreshed by every packet and forgotten after the gateway's idle timeout
//!   (R3.4); return traffic matching an entry passes without evaluation.
//!
//! It does not parse rules (that is [`crate::policy`]) and never decides ports or flows.

use std::collections::VecDeque;

use super::Engine;
use crate::config::{NsgAccess, NsgDirection};
use crate::packet::Packet;
use crate::policy::{Query, PROBE_SOURCE};
use crate::units::Time;

/// (protocol, private address, private port, remote address, remote port).
type ConnKey = (u8, u32, u16, u32, u16);

/// The NSGs of one instance, in evaluation order per direction (indices into `Policy::nsgs`).
#[derive(Clone, Copy, Default)]
struct Assoc {
    inbound: [Option<usize>; 2],
    outbound: [Option<usize>; 2],
}

/// NSG state of the engine. See the module documentation.
#[derive(Default)]
pub(super) struct NsgRt {
    /// Hits per NSG per rule, indexed like `Policy::nsgs[k].rules[j]`.
    hits: Vec<Vec<u64>>,
    /// Instances with at least one NSG, by private address.
    by_ip: hashbrown::HashMap<u32, Assoc>,
    /// Stateful entries of ILPIP instances (R4.4): key → last packet.
    conns: hashbrown::HashMap<ConnKey, Time>,
    /// Entries by the time they may expire (lazily re-checked).
    conn_q: VecDeque<(Time, ConnKey)>,
}

/// One rule's hit counter, for metrics and the API (what flow logs give).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsgHit {
    /// NSG name.
    pub nsg: String,
    /// Rule name.
    pub rule: String,
    /// Priority.
    pub priority: u32,
    /// `inbound` / `outbound`.
    pub direction: NsgDirection,
    /// Allow or deny.
    pub access: NsgAccess,
    /// Whether it is a default rule (R4.2).
    pub default: bool,
    /// Packets it decided.
    pub hits: u64,
}

impl Engine {
    /// Rebuilds the NSG state for the running topology, keeping the hit counters of rules
    /// that still exist (same NSG and rule name) and the stateful entries.
    pub(super) fn nsg_rebuild(&mut self) {
        let pol = &self.topo.policy;
        let mut old = std::collections::HashMap::new();
        for h in self.nsg_hits() {
            old.insert((h.nsg, h.rule), h.hits);
        }
        self.nsg.hits = pol
            .nsgs
            .iter()
            .map(|n| {
                n.rules
                    .iter()
                    .map(|r| {
                        old.get(&(n.name.clone(), r.name.clone()))
                            .copied()
                            .unwrap_or(0)
                    })
                    .collect()
            })
            .collect();
        self.nsg.by_ip.clear();
        for i in &self.topo.instances {
            let (a, b) = pol.nsgs_for(&i.name, i.private_ip, NsgDirection::Inbound);
            let (c, d) = pol.nsgs_for(&i.name, i.private_ip, NsgDirection::Outbound);
            if a.is_some() || b.is_some() {
                self.nsg.by_ip.insert(
                    i.private_ip,
                    Assoc {
                        inbound: [a, b],
                        outbound: [c, d],
                    },
                );
            }
        }
    }

    /// Whether the NSGs of the instance at `private` allow `q`, counting a hit on every
    /// deciding rule. An instance without NSG allows everything.
    pub(super) fn nsg_allows(&mut self, private: u32, q: &Query) -> bool {
        let Some(a) = self.nsg.by_ip.get(&private).copied() else {
            return true;
        };
        let order = match q.direction {
            NsgDirection::Inbound => a.inbound,
            NsgDirection::Outbound => a.outbound,
        };
        for k in order.into_iter().flatten() {
            let nsg = &self.topo.policy.nsgs[k];
            let j = nsg.evaluate(q, &self.topo.vnet);
            self.nsg.hits[k][j] += 1;
            if nsg.rules[j].access == NsgAccess::Deny {
                return false;
            }
        }
        true
    }

    /// Outbound NSG check of packet `p` from the instance at `p.src`, before it may start a
    /// flow (R4.3). `stateful`: the instance is an ILPIP (no flow table): an allowed packet
    /// records its 5-tuple, and a packet matching a recorded one passes unevaluated (R4.4).
    pub(super) fn nsg_outbound(&mut self, p: &Packet, stateful: bool) -> bool {
        if !self.nsg.by_ip.contains_key(&p.src) {
            return true;
        }
        let key = (p.proto, p.src, p.src_port, p.dst, p.dst_port);
        if stateful && self.nsg_conn_fresh(key) {
            return true;
        }
        let q = Query {
            direction: NsgDirection::Outbound,
            proto: p.proto,
            src: p.src,
            sport: Some(p.src_port),
            dst: p.dst,
            dport: p.dst_port,
        };
        let ok = self.nsg_allows(p.src, &q);
        if ok && stateful {
            self.nsg_conn_record(key);
        }
        ok
    }

    /// Whether the outbound NSGs of the instance at `src` allow TCP to (`dst`, `dport`) from
    /// *every* source port (a port stash is granted before its flows' source ports are known,
    /// `stash`; R4.3). Conservative: a deciding rule that names source ports other than all
    /// of them makes the answer depend on the source port, which counts as a denial. Counts
    /// no hit (the flows' own checks do).
    pub(super) fn nsg_outbound_any_sport(&self, src: u32, dst: u32, dport: u16) -> bool {
        let Some(a) = self.nsg.by_ip.get(&src) else {
            return true;
        };
        let q = Query {
            direction: NsgDirection::Outbound,
            proto: crate::packet::proto::TCP,
            src,
            sport: None,
            dst,
            dport,
        };
        let vnet = &self.topo.vnet;
        for k in a.outbound.into_iter().flatten() {
            let nsg = &self.topo.policy.nsgs[k];
            // `sport: None` matches every rule some source port would match, in order: the
            // first one decides for every source port only if it names them all.
            let Some(r) = nsg
                .rules
                .iter()
                .find(|r| r.matches(&q, vnet))
                .or(nsg.rules.last())
            else {
                continue;
            };
            let all_ports =
                r.src_ports.is_empty() || r.src_ports.iter().any(|x| x.lo <= 1 && x.hi == 65535);
            if !all_ports || r.access == NsgAccess::Deny {
                return false;
            }
        }
        true
    }

    /// Inbound NSG check of packet `p` to the ILPIP of the instance at `private` (R1.1):
    /// return traffic of a recorded 5-tuple passes (R4.4), anything else is evaluated with
    /// the private address as destination, and recorded when allowed.
    pub(super) fn nsg_inbound_ilpip(&mut self, private: u32, p: &Packet) -> bool {
        if !self.nsg.by_ip.contains_key(&private) {
            return true;
        }
        let key = (p.proto, private, p.dst_port, p.src, p.src_port);
        if self.nsg_conn_fresh(key) {
            return true;
        }
        let q = Query {
            direction: NsgDirection::Inbound,
            proto: p.proto,
            src: p.src,
            sport: Some(p.src_port),
            dst: private,
            dport: p.dst_port,
        };
        let ok = self.nsg_allows(private, &q);
        if ok {
            self.nsg_conn_record(key);
        }
        ok
    }

    /// Whether the NSGs of the instance at `member` let a health probe from tag
    /// `AzureLoadBalancer` ([`PROBE_SOURCE`]) reach TCP port `port` (SPEC R4.5). Counts the
    /// hits, as a cloud host's flow log would show the blocked probe.
    pub fn probe_permitted(&mut self, member: u32, port: u16) -> bool {
        let q = Query {
            direction: NsgDirection::Inbound,
            proto: crate::packet::proto::TCP,
            src: PROBE_SOURCE,
            sport: None,
            dst: member,
            dport: port,
        };
        self.nsg_allows(member, &q)
    }

    /// Hit counters of every rule of every NSG, default rules included, in evaluation order.
    pub fn nsg_hits(&self) -> Vec<NsgHit> {
        let mut out = Vec::new();
        for (k, n) in self.topo.policy.nsgs.iter().enumerate() {
            for (j, r) in n.rules.iter().enumerate() {
                out.push(NsgHit {
                    nsg: n.name.clone(),
                    rule: r.name.clone(),
                    priority: r.priority,
                    direction: r.direction,
                    access: r.access,
                    default: r.default,
                    hits: self
                        .nsg
                        .hits
                        .get(k)
                        .and_then(|h| h.get(j))
                        .copied()
                        .unwrap_or(0),
                });
            }
        }
        out
    }

    /// Live stateful NSG entries of ILPIP instances (R4.4).
    pub fn nsg_tracked(&self) -> usize {
        self.nsg.conns.len()
    }

    fn nsg_conn_fresh(&mut self, key: ConnKey) -> bool {
        let (now, idle) = (self.now, self.topo.params.idle_timeout);
        match self.nsg.conns.get_mut(&key) {
            Some(t) if t.saturating_add(idle) > now => {
                *t = now;
                true
            }
            _ => false,
        }
    }

    fn nsg_conn_record(&mut self, key: ConnKey) {
        let now = self.now;
        if self.nsg.conns.insert(key, now).is_none() {
            let at = now.saturating_add(self.topo.params.idle_timeout);
            self.nsg.conn_q.push_back((at, key));
        }
    }

    /// Forgets stateful entries idle for the idle timeout, examining at most `budget`
    /// (R9.4). Returns the budget left.
    pub(super) fn nsg_expire(&mut self, now: Time, mut budget: u32) -> u32 {
        let idle = self.topo.params.idle_timeout;
        while budget > 0 {
            let Some(&(at, key)) = self.nsg.conn_q.front() else {
                break;
            };
            if at > now {
                break;
            }
            budget -= 1;
            self.nsg.conn_q.pop_front();
            match self.nsg.conns.get(&key) {
                Some(&t) if t.saturating_add(idle) > now => {
                    self.nsg.conn_q.push_back((t.saturating_add(idle), key));
                }
                Some(_) => {
                    self.nsg.conns.remove(&key);
                }
                None => {}
            }
        }
        budget
    }

    /// The first second with NSG timer work, if any.
    pub(super) fn nsg_next_deadline(&self) -> Option<Time> {
        self.nsg.conn_q.front().map(|&(t, _)| t)
    }
}
