//! The packet path: outbound and inbound verdicts, and the lookups ICMP errors need.
//!
//! Outbound: a packet of a known flow gets its translation (R2.1) and refreshes it; otherwise
//! a VNet destination passes untranslated (R1.7), an ILPIP instance is translated 1:1 (R1.1),
//! and a TCP SYN (R3.1) or UDP datagram (R3.5) of a PAT instance starts a flow on a port from
//! the allocator (`ports`), or is dropped and counted with an exhaustion event (R2.6), or
//! without one when only a fleet node's port fence kept it from a port (`fence`, R10.4) or the
//! destination's port stash holds the ports left (`stash`). ICMP
//! echo through PAT is dropped and counted apart (R3.6 decision). A member's answer on an
//! inbound LB flow leaves from the frontend (`inbound`, R5.1), and a packet that may start a
//! flow first passes the instance's NSGs (`nsg`, R4.3: before a port is taken). Inbound: a
//! flow's return traffic by public 5-tuple (R2.1, R2.2), an inbound LB flow or rule (R5.1),
//! an ILPIP's traffic if its NSGs allow it (R1.1, R4.1), else dropped as unsolicited (R3.8)
//! or not ours. The `lookup_*` and `ilpip_*` methods serve the data plane's
//! ICMP-error translation (R3.6) without creating or refreshing anything.
//!
//! `outbound`, `inbound` and the flow-table probes they call are the hot path and stay
//! `#[inline]` (the data plane instantiates them). Packet bytes are not parsed here; TCP state
//! changes go to `tcp`.

use super::events::{EventKind, LimitScope};
use super::fence::NoPort;
use super::flows::Flow;
use super::instance::Scenario;
use super::ports::CHUNK;
use super::stats::stats_bucket;
use super::{Engine, FlowKey, NONE};
use crate::packet::{proto, tcp_flags, Direction, DropReason, Packet, Verdict, L4};
use crate::units::PORT_BASE;

impl Engine {
    /// Looks up the flow an ICMP error refers to (R3.6) without creating or refreshing it.
    /// `inner` is the embedded packet as the instance sent it after translation (outbound flow):
    /// its source is (public, SNAT port), its destination the remote. Returns the private
    /// (address, port) to restore. Also finds inbound LB flows (the quoted packet left from
    /// the frontend: the member is restored) and ILPIPs.
    pub fn lookup_inbound(
        &self,
        inner_proto: u8,
        public: u32,
        pport: u16,
        remote: u32,
        rport: u16,
    ) -> Option<(u32, u16)> {
        self.flows
            .find_rev(inner_proto, public, pport, remote, rport)
            .filter(|&fi| self.due(fi).is_none())
            .map(|fi| (self.flows.get(fi).src, self.flows.get(fi).sport))
            .or_else(|| self.lb_lookup_inbound(inner_proto, public, pport, remote, rport))
            .or_else(|| self.ilpip_private(public).map(|a| (a, pport)))
    }

    /// Whether `private` is a configured instance's address (R9.1).
    pub fn is_instance(&self, private: u32) -> bool {
        self.by_private.contains_key(&private)
    }

    /// Restricts new PAT flows to the instances `admission` allows, asked with the
    /// instance's private address (a fleet node's self-fencing, R10.2: it opens flows only
    /// for the instances whose grant it holds under a valid lease). A refused packet — an
    /// outbound TCP/UDP/ICMP packet of a PAT instance matching no live flow — is dropped as
    /// [`DropReason::NotOwned`], before the NSG, the flow limits and the TCP SYN check, and
    /// is left unchanged so the caller can forward it to the owner (R10.3). Existing flows,
    /// ILPIP instances (stateless, on the instance's own ports), load-balancing return
    /// traffic, inbound packets and ICMP errors are not asked. `None` (the default) admits
    /// everything; the check costs nothing on an established flow's packet. Setting a hook
    /// voids every port stash ([`Engine::stash_voided`]): a fleet node's instances get none.
    pub fn set_admission(&mut self, admission: Option<super::Admission>) {
        if admission.is_some() {
            self.stash_void_all();
        }
        self.admission = admission;
    }

    /// The private address of the PAT instance whose block holds public `port` of `public`
    /// (R2.4), if any: who owns an inbound packet's flow in a fleet (R10.3 steering by public
    /// port block). Blocks are computed from the whole topology, so every node of a fleet
    /// gives the same answer.
    pub fn instance_of_public_port(&self, public: u32, port: u16) -> Option<u32> {
        if port < PORT_BASE {
            return None;
        }
        let pip = self.pips.get(&public)?;
        let &slot = pip.owner.get(((port - PORT_BASE) / CHUNK) as usize)?;
        if slot == NONE {
            return None;
        }
        Some(self.insts.get(slot as usize)?.as_ref()?.private_ip)
    }

    /// Every chunk of [`super::CHUNK`] ports from [`crate::units::PORT_BASE`] that a
    /// PAT instance's block holds (R2.4): (public address, chunk index, the instance's private
    /// address), for a fleet node's kernel steering by public port block (R10.3); the same
    /// answer as [`Engine::instance_of_public_port`] for each port of the chunk.
    pub fn pat_chunks(&self) -> Vec<(u32, u16, u32)> {
        let mut out = Vec::new();
        for (&public, pip) in &self.pips {
            for (chunk, &slot) in pip.owner.iter().enumerate() {
                if slot == NONE {
                    continue;
                }
                if let Some(Some(i)) = self.insts.get(slot as usize) {
                    out.push((public, chunk as u16, i.private_ip));
                }
            }
        }
        out
    }

    /// The private address behind an ILPIP (R1.1), if `public` is one.
    pub fn ilpip_private(&self, public: u32) -> Option<u32> {
        let &s = self.ilpips.get(&public)?;
        Some(self.insts[s as usize].as_ref()?.private_ip)
    }

    /// The ILPIP of the instance at `private`, if it has one (R1.1).
    pub fn ilpip_public(&self, private: u32) -> Option<u32> {
        let &s = self.by_private.get(&private)?;
        match self.insts[s as usize].as_ref()?.scenario {
            Scenario::Ilpip { addr } => Some(addr),
            _ => None,
        }
    }

    /// Looks up the public side of an instance's existing flow or ILPIP without creating
    /// or refreshing anything (used for ICMP errors an instance sends, R3.6).
    pub fn lookup_outbound(
        &self,
        p: u8,
        src: u32,
        sport: u16,
        dst: u32,
        dport: u16,
    ) -> Option<(u32, u16)> {
        self.flows
            .find_fwd(p, src, sport, dst, dport)
            .filter(|&fi| self.due(fi).is_none())
            .map(|fi| (self.flows.get(fi).public, self.flows.get(fi).pport))
            .or_else(|| self.lb_lookup_outbound(p, src, sport, dst, dport))
            .or_else(|| self.ilpip_public(src).map(|a| (a, sport)))
    }

    pub(super) fn drop_global(&mut self, r: DropReason) -> Verdict {
        self.global.drops[r as usize] += 1;
        Verdict::Drop(r)
    }

    pub(super) fn drop_inst(&mut self, slot: u32, p: u8, r: DropReason) -> Verdict {
        if let Some(i) = self.insts[slot as usize].as_mut() {
            i.stats[stats_bucket(p)].drops[r as usize] += 1;
        }
        self.drop_global(r)
    }

    /// Outbound verdict: an existing flow's translation, else [`Engine::outbound_new`].
    #[inline]
    pub(super) fn outbound(&mut self, p: &Packet) -> Verdict {
        let now = self.now;
        if p.proto == proto::TCP || p.proto == proto::UDP {
            if let Some(fi) = self
                .flows
                .find_fwd(p.proto, p.src, p.src_port, p.dst, p.dst_port)
                .filter(|&fi| !self.reap_if_due(fi))
            {
                if p.proto == proto::TCP
                    && p.flags & (tcp_flags::FIN | tcp_flags::RST | tcp_flags::SYN) != 0
                {
                    // R10.2: a SYN without ACK opens a connection even on a 5-tuple this node
                    // has a flow for (the client reused its port; on a fleet node the flow
                    // may be a copy kept after a hand-over, which the new owner released long
                    // ago): only the owner under a valid lease opens it. Refused, it is left
                    // unchanged for steering to the owner (R10.3). Control segments only:
                    // nothing on an established flow's data path.
                    if p.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST)
                        == tcp_flags::SYN
                        && self.admission.as_ref().is_some_and(|admits| !admits(p.src))
                    {
                        let slot = self.flows.get(fi).slot();
                        return self.drop_inst(slot, p.proto, DropReason::NotOwned);
                    }
                    self.flows.get_mut(fi).last_seen = now;
                    self.tcp_event(fi, p.flags, Direction::Outbound);
                } else {
                    self.flows.get_mut(fi).last_seen = now;
                }
                let f = self.flows.get(fi);
                let v = Verdict::Translate {
                    addr: f.public,
                    port: f.pport,
                };
                let slot = f.slot() as usize;
                if let Some(i) = self.insts[slot].as_mut() {
                    i.stats[stats_bucket(p.proto)].packets_out += 1;
                }
                return v;
            }
        }
        self.outbound_new(p)
    }

    /// A packet of no known flow: pass (R1.7), ILPIP (R1.1), or a new PAT flow (R2.1, R3.1,
    /// R3.5), dropped and counted when it may not start one or no port is free (R2.6).
    fn outbound_new(&mut self, p: &Packet) -> Verdict {
        // R9.1: only an instance speaks from the private side, inside the VNet too.
        let Some(&slot) = self.by_private.get(&p.src) else {
            return self.drop_global(DropReason::UnknownSource);
        };
        // Return traffic of an inbound LB flow (R5.1) leaves from the frontend.
        if let Some(v) = self.outbound_lb(p) {
            return v;
        }
        if self.topo.in_vnet(p.dst) {
            self.global.passed += 1;
            return Verdict::Pass;
        }
        let inst = self.insts[slot as usize]
            .as_ref()
            .expect("indexed instance exists");
        let public = match inst.scenario {
            Scenario::Ilpip { addr } => {
                if !self.nsg_outbound(p, true) {
                    return self.drop_inst(slot, p.proto, DropReason::NsgDenied);
                }
                self.global.ilpip_packets += 1;
                if let Some(i) = self.insts[slot as usize].as_mut() {
                    i.stats[stats_bucket(p.proto)].packets_out += 1;
                }
                return Verdict::Translate {
                    addr,
                    port: p.src_port,
                };
            }
            ref s => s.addr(),
        };
        // R10.2: a fleet node opens flows only for the instances it owns under a valid lease.
        // Asked only here, for a packet of no flow from a PAT instance: established packets
        // never reach it. The packet is left as it came, for the caller to forward (R10.3).
        if let Some(admits) = &self.admission {
            if !admits(p.src) {
                return self.drop_inst(slot, p.proto, DropReason::NotOwned);
            }
        }
        let Some(l4) = L4::from_proto(p.proto) else {
            // R3.6 decision: ICMP echo is not translated through PAT (the seeds list TCP and
            // UDP only); it is counted apart so a tenant asking "why does ping fail" gets an answer.
            let r = if p.proto == proto::ICMP && p.flags == snatgw_wire::ICMP_ECHO_REQUEST {
                DropReason::IcmpEchoViaPat
            } else {
                DropReason::ProtocolNotTranslated
            };
            return self.drop_inst(slot, p.proto, r);
        };
        if l4 == L4::Tcp
            && p.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) != tcp_flags::SYN
        {
            // A flow ended by idle timeout still in use: counted (`idle_reuse`, R7.1).
            self.idle_recent_not_syn(slot, p);
            // A flow whose state did not arrive at a takeover (`takeover`, R10.4).
            self.takeover_not_syn(slot);
            return self.drop_inst(slot, p.proto, DropReason::TcpNotSyn);
        }
        // R4.3: the NSG decides before a port is taken.
        if !self.nsg_outbound(p, false) {
            return self.drop_inst(slot, p.proto, DropReason::NsgDenied);
        }
        // R9.2: a new flow over the instance's or the gateway's limit is refused before it
        // can take a port; nothing else changes.
        if self.over_flow_limit(slot, public, l4, p.dst, p.dst_port) {
            self.journal_refused(slot, refused_key(p, public), DropReason::FlowLimit);
            return self.drop_inst(slot, p.proto, DropReason::FlowLimit);
        }
        let block_id = slot * 2 + l4 as u32;
        match self.alloc(block_id, p.dst, p.dst_port) {
            Ok(idx) => {
                let inst = self.insts[slot as usize].as_mut().expect("instance");
                let pport = inst.port_of(idx);
                let st = &mut inst.stats[l4 as usize];
                st.conn_ok += 1;
                st.packets_out += 1;
                let fi = self.insert_flow(Flow {
                    src: p.src,
                    dst: p.dst,
                    public,
                    block: block_id,
                    gen: 0,
                    prev: NONE,
                    next: NONE,
                    last_seen: self.now,
                    close_at: 0,
                    sport: p.src_port,
                    dport: p.dst_port,
                    pport,
                    idx,
                    proto: p.proto,
                    state: 0,
                    born: 0, // set by insert_flow
                });
                if l4 == L4::Tcp {
                    if p.flags & tcp_flags::FIN != 0 {
                        self.tcp_event(fi, p.flags, Direction::Outbound);
                    }
                    // Destinations worth a port stash (`stash`); one branch while off.
                    if self.stash_tracking() {
                        self.stash_note_demand(p.src, p.dst, p.dst_port);
                    }
                }
                Verdict::Translate {
                    addr: public,
                    port: pport,
                }
            }
            Err(NoPort::Reserve) => {
                // R10.4: the fleet is waiting for its runner-up to acknowledge the next port
                // reserve (`fence`); not an exhaustion of the tenant's ports (no event, not a
                // failed connection). The client's retransmission is served then.
                self.fence_refused(slot);
                self.journal_refused(slot, refused_key(p, public), DropReason::PortReserve);
                self.drop_inst(slot, p.proto, DropReason::PortReserve)
            }
            Err(NoPort::Stashed) => {
                // The destination's port stash holds ports a fast path may be opening flows
                // on (`stash`): not an exhaustion (no event, not a failed connection, R2.6);
                // the client's retransmission finds the stash, or a port once its record is
                // applied. Not journaled either: it is no outcome of a connection (the
                // retransmission's is), and a flow trace that counted it would make the
                // planner see one attempt more (lab_plan with the fast path).
                self.drop_inst(slot, p.proto, DropReason::PortReserve)
            }
            Err(NoPort::Exhausted) => {
                let inst = self.insts[slot as usize].as_mut().expect("instance");
                inst.stats[l4 as usize].conn_fail += 1;
                let kind = EventKind::Exhaustion {
                    instance: inst.name.clone(),
                    public_ip: public,
                    l4,
                    dst: p.dst,
                    dst_port: p.dst_port,
                    allocated: self.blocks[block_id as usize].owned.count(),
                };
                self.event_aggregated(kind);
                self.journal_refused(slot, refused_key(p, public), DropReason::PortsExhausted);
                self.drop_inst(slot, p.proto, DropReason::PortsExhausted)
            }
        }
    }

    /// Whether a new flow of instance `slot` (on `public`, to `dst`:`dport`) would exceed
    /// the instance's or the gateway's flow limit (R9.2); if so, records the aggregated
    /// `flow_limit` event. Ports stashed for a fast path's new flows count as live flows
    /// (`stash`).
    #[inline]
    pub(super) fn over_flow_limit(
        &mut self,
        slot: u32,
        public: u32,
        l4: L4,
        dst: u32,
        dst_port: u16,
    ) -> bool {
        let inst = self.insts[slot as usize]
            .as_ref()
            .expect("indexed instance exists");
        let (inst_limit, gw_limit) = (inst.max_flows, self.topo.params.max_flows);
        let (scope, limit) = if inst.live.saturating_add(inst.stashed) >= inst_limit {
            (LimitScope::Instance, inst_limit)
        } else if self.flows.live().saturating_add(self.stash.total) >= gw_limit {
            (LimitScope::Gateway, gw_limit)
        } else {
            return false;
        };
        let kind = EventKind::FlowLimit {
            instance: inst.name.clone(),
            public_ip: public,
            l4,
            dst,
            dst_port,
            limit,
            scope,
        };
        self.event_aggregated(kind);
        true
    }

    /// Inbound verdict: a flow's return traffic (R2.1), an ILPIP's (R1.1), else dropped as
    /// unsolicited (R3.8) or not ours.
    #[inline]
    pub(super) fn inbound(&mut self, p: &Packet) -> Verdict {
        if p.proto == proto::TCP || p.proto == proto::UDP {
            // Public 5-tuple: (proto, public ip, SNAT port, remote ip, remote port).
            if let Some(fi) = self
                .flows
                .find_rev(p.proto, p.dst, p.dst_port, p.src, p.src_port)
                .filter(|&fi| !self.reap_if_due(fi))
            {
                let now = self.now;
                let f = self.flows.get_mut(fi);
                f.last_seen = now;
                if p.proto == proto::TCP && p.flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
                    self.tcp_event(fi, p.flags, Direction::Inbound);
                }
                let f = self.flows.get(fi);
                let v = Verdict::Translate {
                    addr: f.src,
                    port: f.sport,
                };
                if let Some(i) = self.insts[f.slot() as usize].as_mut() {
                    i.stats[stats_bucket(p.proto)].packets_in += 1;
                }
                return v;
            }
        }
        // R9.1: from the public side, a VNet source is spoofed (no flow has a VNet remote,
        // R1.7, so only the slow path needs the check).
        if self.topo.in_vnet(p.src) {
            return self.drop_global(DropReason::VnetSourceFromPublic);
        }
        // Inbound LB rules and their flows (R5.1).
        if let Some(v) = self.inbound_lb(p) {
            return v;
        }
        if let Some(&slot) = self.ilpips.get(&p.dst) {
            let private = self.insts[slot as usize]
                .as_ref()
                .expect("instance")
                .private_ip;
            if !self.nsg_inbound_ilpip(private, p) {
                return self.drop_inst(slot, p.proto, DropReason::NsgDenied);
            }
            let inst = self.insts[slot as usize].as_mut().expect("instance");
            inst.stats[stats_bucket(p.proto)].packets_in += 1;
            self.global.ilpip_packets += 1;
            return Verdict::Translate {
                addr: inst.private_ip,
                port: p.dst_port,
            };
        }
        if self.pips.contains_key(&p.dst) {
            // After a takeover, the remote side of a flow whose state did not arrive holds
            // its port against new flows toward it (`takeover`, R10.4).
            self.takeover_unsolicited(p);
            return self.drop_global(DropReason::UnsolicitedInbound);
        }
        self.drop_global(DropReason::NotOurAddress)
    }
}

/// The journal's key for a refused new flow (no public port).
fn refused_key(p: &Packet, public: u32) -> FlowKey {
    FlowKey {
        proto: p.proto,
        src: p.src,
        sport: p.src_port,
        dst: p.dst,
        dport: p.dst_port,
        public,
        pport: 0,
    }
}
