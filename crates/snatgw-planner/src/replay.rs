//! The replayer: drives the gateway's own engine (`snatgw_core::Engine`) with synthetic
//! packets in virtual time, and measures what the workload does to the SNAT ports.
//!
//! Each trace event becomes what the gateway would see (SPEC §3): an `open` an outbound SYN
//! (TCP, R3.1) or datagram (UDP, R3.5); a `data` event an outbound ACK or datagram (it
//! refreshes the idle timer, R3.4); a `close` FIN|ACK both ways (R3.2), an outbound RST
//! (R3.3), an ACK at the last packet's time and then nothing (idle, R3.4), or nothing
//! (reclaimed). Time moves second by second with [`Engine::advance`], so ports are released
//! exactly when the gateway would release them. Used ports are counted from the engine's flow
//! journal ([`FlowChange`]): per destination, the flows holding a port for it (R2.3: each
//! needs its own port); per instance, the distinct ports held (the SPEC's "used SNAT ports").
//! A refused attempt (R2.6) is a failed flow; a client retry policy schedules the next
//! attempt (and shifts the flow's later events by the delay). A `data` packet of a TCP flow
//! the gateway has already removed (idle timeout) is dropped by the engine (R3.1): the flow
//! is counted as *broken*. `scale` events re-apply the topology with the pool resized
//! (R2.9/R2.10); reclaimed ports come from the engine's `PortsReclaimed` events.
//!
//! This module decides nothing about NAT itself — every verdict is the engine's — and does no
//! I/O.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use snatgw_core::config::ConfigFile;
use snatgw_core::{
    proto, tcp_flags, Direction, DropReason, Engine, EventKind, FlowChange, Packet, Topology,
    Verdict, L4,
};

use crate::error::PlanError;
use crate::report::{DestResult, InstanceResult, Report, Timeline};
use crate::topo;
use crate::trace::{Dest, End, EvKind, Workload};

/// Replay options.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Stop at this time (milliseconds); default: the last event's time.
    pub until_ms: Option<u64>,
    /// Keep the used-ports timeline of every instance (for plots).
    pub timeline: bool,
}

// State 0: not opened yet.
const OPEN: u8 = 1;
const CLOSED: u8 = 2;
const REFUSED: u8 = 3;
const RETRYING: u8 = 4;
const GAVE_UP: u8 = 5;
const BROKEN: u8 = 6;

#[derive(Clone, Copy, Default)]
struct FlowRt {
    state: u8,
    /// The engine keeps no flow for it (ILPIP, R1.1, or a VNet destination, R1.7): the
    /// replayer frees its source port itself when it closes.
    stateless: bool,
    /// The replayer chose the source port (so it frees it when the flow ends).
    chosen: bool,
    sport: u16,
    pport: u16,
    attempts: u32,
    public: u32,
    open_ms: u64,
    shift_ms: u64,
}

/// Private source ports of one instance the replayer handed out and the engine still holds.
struct Sports {
    bits: Vec<u64>,
    cursor: u32,
}

const SPORT_MIN: u32 = 1024;

impl Sports {
    fn new() -> Sports {
        Sports {
            bits: vec![0; 1024],
            cursor: SPORT_MIN,
        }
    }
    /// The first free port from the cursor on (wrapping), word by word.
    fn alloc(&mut self) -> Option<u16> {
        let words = self.bits.len();
        let first = (SPORT_MIN >> 6) as usize;
        let mut w = (self.cursor >> 6) as usize;
        // Bits below the cursor in its word count as taken on the first visit.
        let mut mask = !0u64 << (self.cursor & 63);
        for _ in 0..=(words - first) {
            let free = !self.bits[w] & mask;
            if free != 0 {
                let p = (w as u32) << 6 | free.trailing_zeros();
                self.bits[w] |= 1 << (p & 63);
                self.cursor = if p == 65535 { SPORT_MIN } else { p + 1 };
                return Some(p as u16);
            }
            w = if w + 1 == words { first } else { w + 1 };
            mask = !0;
        }
        None
    }
    fn free(&mut self, p: u16) {
        self.bits[(p >> 6) as usize] &= !(1u64 << (p & 63));
    }
}

#[derive(Default)]
struct InstRt {
    name: Arc<str>,
    ip: u32,
    ilpip: bool,
    refs: [Vec<u32>; 2],
    used: [u32; 2],
    res: InstanceResult,
    last_point: Option<(u32, [u32; 2], u32)>,
    points: Vec<(u32, [u32; 2], u32)>,
}

/// Per (instance, destination): private source ports are unique per destination only (a
/// client may use one source port towards several destinations).
#[derive(Default)]
struct PairRt {
    live: u32,
    sports: Option<Sports>,
}

struct Replayer<'w> {
    w: &'w Workload,
    cfg: ConfigFile,
    engine: Engine,
    sec: u32,
    insts: Vec<InstRt>,
    slot_inst: Vec<u32>,
    flows: Vec<FlowRt>,
    /// (instance, protocol, destination address, port) → index into `pairs`.
    pair_by_key: hashbrown::HashMap<(u32, u8, u32, u16), u32>,
    /// Each flow's index into `pairs`.
    flow_pair: Vec<u32>,
    pairs: Vec<(PairRt, DestResult)>,
    journal: Vec<FlowChange>,
    heap: BinaryHeap<Reverse<(u64, u64, u32, u8)>>,
    seq: u64,
    deferred: HashMap<u32, Vec<(u64, u8)>>,
    timeline: bool,
    events: u64,
    collisions: u64,
    passed: u64,
}

fn encode(k: EvKind) -> u8 {
    match k {
        EvKind::Open => 0,
        EvKind::Data => 1,
        EvKind::Close(End::Fin) => 2,
        EvKind::Close(End::Rst) => 3,
        EvKind::Close(End::Idle) => 4,
        EvKind::Close(End::Reclaimed) => 5,
        EvKind::Scale(_) => 6,
    }
}

fn decode(k: u8) -> EvKind {
    match k {
        0 => EvKind::Open,
        1 => EvKind::Data,
        2 => EvKind::Close(End::Fin),
        3 => EvKind::Close(End::Rst),
        4 => EvKind::Close(End::Idle),
        _ => EvKind::Close(End::Reclaimed),
    }
}

/// Replays workload `w` against topology `cfg` and reports what happened.
pub fn replay(cfg: &ConfigFile, w: &Workload, opts: &Options) -> Result<Report, PlanError> {
    let topo = Topology::from_config(cfg.clone())?;
    let mut engine = Engine::new(topo, 0)?;
    engine.set_journal(true);
    // Growing the flow tables from empty costs a quarter of a churn replay (rehashes):
    // reserve for the flows of the workload, up to 256k (about 22 MiB).
    engine.reserve_flows(w.flows.len().min(1 << 18));
    let mut r = Replayer {
        w,
        cfg: cfg.clone(),
        engine,
        sec: 0,
        insts: Vec::with_capacity(w.instances.len()),
        slot_inst: Vec::new(),
        flows: vec![FlowRt::default(); w.flows.len()],
        pair_by_key: hashbrown::HashMap::new(),
        flow_pair: Vec::with_capacity(w.flows.len()),
        pairs: Vec::new(),
        journal: Vec::with_capacity(64),
        heap: BinaryHeap::new(),
        seq: 0,
        deferred: HashMap::new(),
        timeline: opts.timeline,
        events: 0,
        collisions: 0,
        passed: 0,
    };
    for name in &w.instances {
        let inst = r
            .engine
            .topology()
            .instances
            .iter()
            .find(|i| &*i.name == name.as_str())
            .ok_or_else(|| PlanError::UnknownInstance(name.clone()))?;
        let rt = InstRt {
            name: inst.name.clone(),
            ip: inst.private_ip,
            ..Default::default()
        };
        r.insts.push(rt);
    }
    let mut pair_ix: hashbrown::HashMap<(u32, u32), u32> = hashbrown::HashMap::new();
    for f in &w.flows {
        let key = (f.inst, f.dest);
        let p = *pair_ix.entry(key).or_insert_with(|| {
            let d = w.dests[f.dest as usize];
            let p = r.pairs.len() as u32;
            r.pair_by_key
                .insert((f.inst, d.l4.proto(), d.ip, d.port), p);
            r.pairs.push((
                PairRt::default(),
                DestResult {
                    instance: w.instances[f.inst as usize].clone(),
                    dest: d,
                    ..Default::default()
                },
            ));
            p
        });
        r.flow_pair.push(p);
    }
    r.refresh_instances();
    let until = opts.until_ms.unwrap_or(u64::MAX);
    let mut last_t = 0;
    let mut i = 0;
    let evs = &w.events;
    loop {
        let st = evs.get(i).filter(|e| e.t_ms <= until);
        let hp = r.heap.peek().map(|Reverse(x)| *x).filter(|x| x.0 <= until);
        let (t, flow, kind, from_heap) = match (st, hp) {
            (None, None) => break,
            (Some(e), Some(h)) if h.0 < e.t_ms => (h.0, h.2, decode(h.3), true),
            (Some(e), _) => (e.t_ms, e.flow, e.kind, false),
            (None, Some(h)) => (h.0, h.2, decode(h.3), true),
        };
        if from_heap {
            r.heap.pop();
        } else {
            i += 1;
        }
        let sec = (t / 1000) as u32;
        if sec > r.sec {
            r.advance_to(sec);
        }
        r.events += 1;
        last_t = t;
        r.step(t, flow, kind, from_heap)?;
    }
    let end = opts.until_ms.unwrap_or(last_t);
    r.advance_to((end / 1000) as u32);
    Ok(r.finish(end))
}

impl Replayer<'_> {
    /// Moves the engine to second `sec`, one second at a time (so the timeline sees every
    /// release), absorbing the journal and events on the way.
    fn advance_to(&mut self, sec: u32) {
        // A long silence: jump (nothing in between but releases, counted at the end).
        if sec > self.sec + 100_000 {
            self.sec = sec - 100_000;
        }
        while self.sec < sec {
            // The point of a second is the state at its end.
            if self.timeline {
                self.sample();
            }
            self.sec += 1;
            self.engine.advance(self.sec);
            self.absorb();
            self.absorb_events();
        }
    }

    fn sample(&mut self) {
        for i in &mut self.insts {
            let p = (self.sec, i.used, i.res.allocated);
            if i.last_point.is_none_or(|l| (l.1, l.2) != (p.1, p.2)) {
                i.points.push(p);
                i.last_point = Some(p);
            }
        }
    }

    /// Scenario, public IP and preallocation of every workload instance, and the slot map.
    fn refresh_instances(&mut self) {
        self.slot_inst.clear();
        for (k, i) in self.insts.iter_mut().enumerate() {
            if let Some(rep) = self.engine.instance(&i.name) {
                i.ilpip = matches!(rep.scenario, snatgw_core::Scenario::Ilpip { .. });
                i.res.allocated = rep.allocated;
                i.res.scenario = rep.scenario.name().to_string();
                i.res.public_ip = std::net::Ipv4Addr::from(rep.scenario.addr()).to_string();
                if i.res.allocated_min == 0 || rep.allocated < i.res.allocated_min {
                    i.res.allocated_min = rep.allocated;
                }
            }
            if let Some(s) = self.engine.instance_slot(&i.name) {
                let s = s as usize;
                if self.slot_inst.len() <= s {
                    self.slot_inst.resize(s + 1, u32::MAX);
                }
                self.slot_inst[s] = k as u32;
            }
        }
    }

    fn absorb_events(&mut self) {
        let evs = self.engine.drain_events();
        let mut changed = false;
        for e in evs {
            match e.kind {
                EventKind::PortsReclaimed {
                    instance,
                    ports,
                    flows,
                    reason,
                    ..
                } => {
                    changed = true;
                    if let Some(i) = self.insts.iter_mut().find(|i| i.name == instance) {
                        if reason == snatgw_core::ReclaimReason::TierUp {
                            i.res.reclaimed_ports += u64::from(ports);
                        }
                        i.res.reclaimed_flows += u64::from(flows);
                    }
                }
                EventKind::TierChanged { .. } | EventKind::ScenarioChanged { .. } => changed = true,
                _ => {}
            }
        }
        if changed {
            self.refresh_instances();
        }
    }

    /// Applies the flow journal to the used-port counts.
    fn absorb(&mut self) {
        self.engine.drain_journal(&mut self.journal);
        if self.journal.is_empty() {
            return;
        }
        let mut j = std::mem::take(&mut self.journal);
        for c in j.drain(..) {
            match c {
                FlowChange::Opened { slot, key, .. } => {
                    let Some(&ii) = self.slot_inst.get(slot as usize) else {
                        continue;
                    };
                    if ii == u32::MAX {
                        continue;
                    }
                    let b = usize::from(key.proto == proto::UDP);
                    let inst = &mut self.insts[ii as usize];
                    if inst.refs[b].is_empty() {
                        inst.refs[b] = vec![0; 65536];
                    }
                    let rc = &mut inst.refs[b][key.pport as usize];
                    *rc += 1;
                    if *rc == 1 {
                        inst.used[b] += 1;
                        inst.res.peak_used[b] = inst.res.peak_used[b].max(inst.used[b]);
                    }
                    if let Some(&p) = self.pair_by_key.get(&(ii, key.proto, key.dst, key.dport)) {
                        let (rt, res) = &mut self.pairs[p as usize];
                        rt.live += 1;
                        res.peak_used = res.peak_used.max(rt.live);
                    }
                }
                FlowChange::Closed { slot, key, .. } => {
                    let Some(&ii) = self.slot_inst.get(slot as usize) else {
                        continue;
                    };
                    if ii == u32::MAX {
                        continue;
                    }
                    let b = usize::from(key.proto == proto::UDP);
                    let inst = &mut self.insts[ii as usize];
                    if let Some(rc) = inst.refs[b].get_mut(key.pport as usize) {
                        if *rc > 0 {
                            *rc -= 1;
                            if *rc == 0 {
                                inst.used[b] -= 1;
                            }
                        }
                    }
                    if let Some(&p) = self.pair_by_key.get(&(ii, key.proto, key.dst, key.dport)) {
                        let rt = &mut self.pairs[p as usize].0;
                        rt.live = rt.live.saturating_sub(1);
                        if let Some(s) = rt.sports.as_mut() {
                            s.free(key.sport);
                        }
                    }
                }
                FlowChange::Refused { .. } => {}
            }
        }
        self.journal = j;
    }

    fn push_heap(&mut self, t: u64, flow: u32, k: u8) {
        self.seq += 1;
        self.heap.push(Reverse((t, self.seq, flow, k)));
    }

    fn step(&mut self, t: u64, f: u32, kind: EvKind, from_heap: bool) -> Result<(), PlanError> {
        if let EvKind::Scale(size) = kind {
            return self.scale(f, size);
        }
        let fu = f as usize;
        let st = self.flows[fu].state;
        if !from_heap && kind != EvKind::Open {
            if st == RETRYING {
                self.deferred.entry(f).or_default().push((t, encode(kind)));
                return Ok(());
            }
            if self.flows[fu].shift_ms > 0 {
                let s = self.flows[fu].shift_ms;
                self.push_heap(t + s, f, encode(kind));
                return Ok(());
            }
        }
        match kind {
            EvKind::Open => self.open(t, f, from_heap),
            EvKind::Data => {
                if st == OPEN {
                    self.packet(f, Pkt::Ack, t);
                }
            }
            EvKind::Close(end) => {
                if st == OPEN {
                    match end {
                        End::Fin => self.packet(f, Pkt::Fin, t),
                        End::Rst => self.packet(f, Pkt::Rst, t),
                        End::Idle => self.packet(f, Pkt::Ack, t),
                        End::Reclaimed => {}
                    }
                    let rt = &mut self.flows[fu];
                    if rt.state == OPEN {
                        rt.state = CLOSED;
                    }
                    if rt.stateless && rt.chosen {
                        let sp = rt.sport;
                        let p = self.flow_pair[fu] as usize;
                        if let Some(s) = self.pairs[p].0.sports.as_mut() {
                            s.free(sp);
                        }
                    }
                }
            }
            EvKind::Scale(_) => {}
        }
        Ok(())
    }

    fn open(&mut self, t: u64, f: u32, retry: bool) {
        let fu = f as usize;
        let spec = self.w.flows[fu];
        let ii = spec.inst as usize;
        let d: Dest = self.w.dests[spec.dest as usize];
        if !retry {
            self.flows[fu].open_ms = t;
        }
        let p = self.flow_pair[fu] as usize;
        let (sport, chosen) = match spec.sport {
            Some(p) => (p, false),
            None => {
                let s = self.pairs[p].0.sports.get_or_insert_with(Sports::new);
                match s.alloc() {
                    Some(p) => (p, true),
                    None => {
                        self.collisions += 1;
                        (s.cursor as u16, false)
                    }
                }
            }
        };
        let src = self.insts[ii].ip;
        let pkt = match d.l4 {
            L4::Tcp => Packet::tcp(src, sport, d.ip, d.port, tcp_flags::SYN),
            L4::Udp => Packet::udp(src, sport, d.ip, d.port),
        };
        let v = self.engine.process(self.sec, Direction::Outbound, &pkt);
        self.absorb();
        let ilpip = self.insts[ii].ilpip;
        let rt = &mut self.flows[fu];
        rt.sport = sport;
        rt.chosen = chosen;
        rt.attempts += 1;
        self.pairs[p].1.attempts += 1;
        self.insts[ii].res.attempts += 1;
        match v {
            Verdict::Translate { addr, port } => {
                rt.state = OPEN;
                rt.public = addr;
                rt.pport = port;
                rt.stateless = ilpip;
                self.pairs[p].1.ok += 1;
                self.insts[ii].res.ok += 1;
                if rt.attempts > 1 {
                    // Later events of the flow move with the retry's delay.
                    rt.shift_ms = t - rt.open_ms;
                    let shift = rt.shift_ms;
                    if let Some(list) = self.deferred.remove(&f) {
                        for (te, k) in list {
                            self.push_heap(te + shift, f, k);
                        }
                    }
                }
            }
            Verdict::Pass => {
                rt.state = OPEN;
                rt.stateless = true;
                self.passed += 1;
            }
            Verdict::Drop(reason) => {
                if chosen {
                    if let Some(s) = self.pairs[p].0.sports.as_mut() {
                        s.free(sport);
                    }
                }
                let (pr, ir) = (&mut self.pairs[p].1, &mut self.insts[ii].res);
                match reason {
                    DropReason::PortsExhausted => {
                        pr.failed += 1;
                        ir.failed += 1;
                        let ts = t as f64 / 1000.0;
                        pr.first_exhaustion_s.get_or_insert(ts);
                        ir.first_exhaustion_s.get_or_insert(ts);
                    }
                    DropReason::FlowLimit => {
                        pr.limited += 1;
                        ir.limited += 1;
                    }
                    _ => {
                        pr.dropped += 1;
                        ir.dropped += 1;
                    }
                }
                let attempts = rt.attempts;
                match spec.retry {
                    Some(r) if attempts <= r.max => {
                        rt.state = RETRYING;
                        let at = t + r.delay_ms(attempts);
                        self.push_heap(at, f, 0);
                    }
                    Some(_) => {
                        rt.state = GAVE_UP;
                        self.deferred.remove(&f);
                        pr.gave_up += 1;
                        ir.gave_up += 1;
                        pr.lost += 1;
                        ir.lost += 1;
                    }
                    None => {
                        rt.state = REFUSED;
                        pr.lost += 1;
                        ir.lost += 1;
                    }
                }
            }
        }
    }

    /// Sends the packets of a flow event (outbound, and for a FIN the peer's FIN too).
    fn packet(&mut self, f: u32, what: Pkt, t: u64) {
        let fu = f as usize;
        let spec = self.w.flows[fu];
        let d = self.w.dests[spec.dest as usize];
        let rt = self.flows[fu];
        let src = self.insts[spec.inst as usize].ip;
        let now = self.sec;
        let v = match d.l4 {
            L4::Udp => self.engine.process(
                now,
                Direction::Outbound,
                &Packet::udp(src, rt.sport, d.ip, d.port),
            ),
            L4::Tcp => {
                let flags = match what {
                    Pkt::Ack => tcp_flags::ACK,
                    Pkt::Fin => tcp_flags::FIN | tcp_flags::ACK,
                    Pkt::Rst => tcp_flags::RST,
                };
                let v = self.engine.process(
                    now,
                    Direction::Outbound,
                    &Packet::tcp(src, rt.sport, d.ip, d.port, flags),
                );
                if matches!(what, Pkt::Fin)
                    && matches!(v, Verdict::Translate { .. })
                    && !rt.stateless
                {
                    self.engine.process(
                        now,
                        Direction::Inbound,
                        &Packet::tcp(d.ip, d.port, rt.public, rt.pport, flags),
                    );
                }
                v
            }
        };
        self.absorb();
        if let Verdict::Drop(reason) = v {
            let p = self.flow_pair[fu] as usize;
            let ii = spec.inst as usize;
            match reason {
                // The gateway removed the flow (idle timeout) while the client still used
                // it: its packets are dropped (R3.1, R3.4).
                DropReason::TcpNotSyn => {
                    self.flows[fu].state = BROKEN;
                    self.pairs[p].1.broken += 1;
                    self.insts[ii].res.broken += 1;
                }
                // A UDP datagram after the idle timeout starts a new flow (R3.5), which may
                // find no port.
                DropReason::PortsExhausted => {
                    let ts = t as f64 / 1000.0;
                    let (pr, ir) = (&mut self.pairs[p].1, &mut self.insts[ii].res);
                    pr.failed += 1;
                    ir.failed += 1;
                    pr.first_exhaustion_s.get_or_insert(ts);
                    ir.first_exhaustion_s.get_or_insert(ts);
                }
                _ => {}
            }
        }
    }

    fn scale(&mut self, inst: u32, size: u32) -> Result<(), PlanError> {
        let name = self.w.instances[inst as usize].clone();
        let cfg = topo::resize_pool(&self.cfg, &self.engine, &name, size, &self.w.instances)
            .map_err(|e| PlanError::Scale(format!("at {} s: {e}", self.sec)))?;
        let topo = Topology::from_config(cfg.clone())?;
        self.engine.apply(self.sec, topo)?;
        self.cfg = cfg;
        self.absorb();
        self.refresh_instances();
        self.absorb_events();
        Ok(())
    }

    fn finish(mut self, until: u64) -> Report {
        self.absorb_events();
        if self.timeline {
            self.sample();
        }
        let horizon = self.sec;
        let mut instances = Vec::new();
        let mut timeline = Vec::new();
        for i in self.insts.iter_mut() {
            i.res.name = i.name.to_string();
            i.res.used_at_end = i.used;
            instances.push(i.res.clone());
            if self.timeline {
                let mut pts = std::mem::take(&mut i.points);
                if pts.last().is_some_and(|p| p.0 < horizon) {
                    // Closes the last step at the end.
                    pts.push((horizon, i.used, i.res.allocated));
                }
                timeline.push(Timeline {
                    instance: i.name.to_string(),
                    allocated: i.res.allocated,
                    points: pts,
                });
            }
        }
        let mut dests: Vec<DestResult> = self.pairs.into_iter().map(|(_, d)| d).collect();
        for d in &mut dests {
            if let Some(i) = instances.iter().find(|i| i.name == d.instance) {
                d.allocated = i.allocated;
            }
        }
        // A stable order whatever the order flows appeared in.
        instances.sort_by(|a, b| a.name.cmp(&b.name));
        timeline.sort_by(|a, b| a.instance.cmp(&b.instance));
        dests.sort_by(|a, b| (&a.instance, a.dest).cmp(&(&b.instance, b.dest)));
        Report {
            instances,
            dests,
            events: self.events,
            end_s: until as f64 / 1000.0,
            sport_collisions: self.collisions,
            passed: self.passed,
            timeline,
        }
    }
}

#[derive(Clone, Copy)]
enum Pkt {
    Ack,
    Fin,
    Rst,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ports_are_unique_until_freed() {
        let mut s = Sports::new();
        let mut seen = std::collections::BTreeSet::new();
        while let Some(p) = s.alloc() {
            assert!(p >= 1024 && seen.insert(p), "port {p} twice");
        }
        assert_eq!(seen.len(), 65536 - 1024);
        s.free(40000);
        assert_eq!(s.alloc(), Some(40000));
        assert_eq!(s.alloc(), None);
    }
}
