//! The trace format and the in-memory workload the replayer runs.
//!
//! A trace is JSON Lines, one flow event per line (docs/PLANNER.md has the full description):
//!
//! ```text
//! {"snatgw_trace":1}
//! {"t":0.0,"ev":"open","id":1,"inst":"vm1","proto":"tcp","dst":"198.51.100.10:443"}
//! {"t":0.05,"ev":"close","id":1,"end":"fin"}
//! ```
//!
//! - `open`: a new flow (one connection *attempt*: a TCP SYN, or a UDP flow's first
//!   datagram) of instance `inst` to `dst`, optionally from private port `sport` and with a
//!   client `retry` policy (a refused attempt is tried again after `delay` seconds, each
//!   next delay multiplied by `factor`, at most `max` times). `refused: true` marks an attempt
//!   the recording gateway refused (information only: the replay decides anew).
//! - `data`: any packet of the flow, either direction, at `t` (resets the idle timer, R3.4).
//! - `close`: how the flow ends, at `t`: `fin` = FIN seen both ways at `t` (port released
//!   240 s later, R3.2), `rst` = a RST at `t` (15 s, R3.3), `idle` = the last packet was at
//!   `t`, then silence (released after the idle timeout, R3.4), `reclaimed` = the gateway
//!   took the port (R2.9; written by the recorder, nothing is sent on replay).
//! - `scale`: at `t` the pool sharing instance `inst`'s public IP has `size` instances
//!   (placeholder instances are added or removed), so tiers change (R2.8–R2.10).
//!
//! Times are seconds (fractions allowed, kept to the millisecond); the engine decides in
//! whole seconds, so events within one second are replayed in file order. This module parses
//! and writes the format and builds [`Workload`]s; it does not replay (see `replay`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};
use snatgw_core::L4;

use crate::error::PlanError;

/// The format version written in the header line.
pub const TRACE_VERSION: u32 = 1;

/// A destination endpoint (SPEC §0): protocol, address, port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dest {
    /// Protocol.
    pub l4: L4,
    /// Address (host order).
    pub ip: u32,
    /// Port.
    pub port: u16,
}

impl Dest {
    /// A TCP destination `ip:port`.
    pub fn tcp(ip: Ipv4Addr, port: u16) -> Dest {
        Dest {
            l4: L4::Tcp,
            ip: ip.into(),
            port,
        }
    }
    /// A UDP destination `ip:port`.
    pub fn udp(ip: Ipv4Addr, port: u16) -> Dest {
        Dest {
            l4: L4::Udp,
            ip: ip.into(),
            port,
        }
    }
    /// `tcp 198.51.100.10:443`.
    pub fn label(&self) -> String {
        format!(
            "{} {}:{}",
            self.l4.label(),
            Ipv4Addr::from(self.ip),
            self.port
        )
    }
}

/// A client's retry policy for refused attempts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Retries after the first attempt.
    pub max: u32,
    /// Delay before the first retry, seconds.
    pub delay: f64,
    /// Each next delay is the previous one times this (1: no backoff).
    #[serde(default = "one")]
    pub factor: f64,
}

fn one() -> f64 {
    1.0
}

impl Retry {
    /// Delay before retry number `k` (1-based), milliseconds.
    pub fn delay_ms(&self, k: u32) -> u64 {
        let d = self.delay * self.factor.powi(k.saturating_sub(1) as i32);
        (d * 1000.0).round().max(0.0) as u64
    }
}

/// How a flow ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum End {
    /// FIN seen in both directions (R3.2).
    Fin,
    /// A RST (R3.3).
    Rst,
    /// Last packet, then silence: the idle timeout ends it (R3.4).
    Idle,
    /// The gateway reclaimed its port (R2.9); recorded only, nothing to send.
    Reclaimed,
}

impl End {
    /// `fin`, `rst`, `idle`, `reclaimed`.
    pub fn label(self) -> &'static str {
        match self {
            End::Fin => "fin",
            End::Rst => "rst",
            End::Idle => "idle",
            End::Reclaimed => "reclaimed",
        }
    }
}

/// One flow of a workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowSpec {
    /// Index into [`Workload::instances`].
    pub inst: u32,
    /// Index into [`Workload::dests`].
    pub dest: u32,
    /// Private source port, if the trace gives one (the replayer picks one otherwise).
    pub sport: Option<u16>,
    /// Client retry policy.
    pub retry: Option<Retry>,
    /// The recording gateway refused this attempt (information only).
    pub refused: bool,
}

/// What happens at an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EvKind {
    /// The flow's first packet (an attempt).
    Open,
    /// A packet of the flow (resets the idle timer).
    Data,
    /// The flow ends this way.
    Close(End),
    /// The pool of instance `Ev::flow` (an instance index here) has this many instances.
    Scale(u32),
}

/// One event of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ev {
    /// Milliseconds since the workload's start.
    pub t_ms: u64,
    /// Index into [`Workload::flows`] (for [`EvKind::Scale`]: into [`Workload::instances`]).
    pub flow: u32,
    /// What.
    pub kind: EvKind,
}

/// A workload: instances, destinations, flows and their events sorted by time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Workload {
    /// Instance names.
    pub instances: Vec<String>,
    /// Destination endpoints.
    pub dests: Vec<Dest>,
    /// Flows.
    pub flows: Vec<FlowSpec>,
    /// Events, sorted by time (stable: events of one millisecond keep their order).
    pub events: Vec<Ev>,
    inst_ix: HashMap<String, u32>,
    dest_ix: HashMap<Dest, u32>,
}

impl Workload {
    /// An empty workload.
    pub fn new() -> Workload {
        Workload::default()
    }

    /// The index of instance `name`, added if new.
    pub fn instance(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.inst_ix.get(name) {
            return i;
        }
        let i = self.instances.len() as u32;
        self.instances.push(name.to_string());
        self.inst_ix.insert(name.to_string(), i);
        i
    }

    /// The index of destination `d`, added if new.
    pub fn dest(&mut self, d: Dest) -> u32 {
        if let Some(&i) = self.dest_ix.get(&d) {
            return i;
        }
        let i = self.dests.len() as u32;
        self.dests.push(d);
        self.dest_ix.insert(d, i);
        i
    }

    /// Adds a flow and returns its index (its events are added with [`Workload::push`]).
    pub fn flow(&mut self, f: FlowSpec) -> u32 {
        self.flows.push(f);
        (self.flows.len() - 1) as u32
    }

    /// Adds an event (call [`Workload::sort`] when done if events were not added in order).
    pub fn push(&mut self, t_ms: u64, flow: u32, kind: EvKind) {
        self.events.push(Ev { t_ms, flow, kind });
    }

    /// Sorts the events by time, keeping the order of events of the same millisecond.
    pub fn sort(&mut self) {
        if !self.events.is_sorted_by_key(|e| e.t_ms) {
            self.events.sort_by_key(|e| e.t_ms);
        }
    }

    /// Adds all flows and events of `other` (instances and destinations are matched by
    /// name and endpoint).
    pub fn merge(&mut self, other: &Workload) {
        let imap: Vec<u32> = other.instances.iter().map(|n| self.instance(n)).collect();
        let dmap: Vec<u32> = other.dests.iter().map(|d| self.dest(*d)).collect();
        let base = self.flows.len() as u32;
        for f in &other.flows {
            self.flows.push(FlowSpec {
                inst: imap[f.inst as usize],
                dest: dmap[f.dest as usize],
                ..*f
            });
        }
        for e in &other.events {
            let flow = match e.kind {
                EvKind::Scale(_) => imap[e.flow as usize],
                _ => base + e.flow,
            };
            self.events.push(Ev { flow, ..*e });
        }
        self.sort();
    }

    /// Time of the last event, milliseconds.
    pub fn end_ms(&self) -> u64 {
        self.events.last().map_or(0, |e| e.t_ms)
    }

    /// Parses a trace (JSON Lines, see the module documentation).
    pub fn from_reader(r: impl BufRead) -> Result<Workload, PlanError> {
        let mut w = Workload::new();
        let mut ids: HashMap<u64, u32> = HashMap::new();
        for (n, line) in r.lines().enumerate() {
            let line_no = n + 1;
            let line = line.map_err(|e| PlanError::Io(format!("reading line {line_no}: {e}")))?;
            let s = line.trim();
            if s.is_empty() || s.starts_with('#') {
                continue;
            }
            if s.contains("\"snatgw_trace\"") {
                let h: Header = serde_json::from_str(s).map_err(|e| PlanError::Trace {
                    line: line_no,
                    msg: e.to_string(),
                })?;
                if h.snatgw_trace != TRACE_VERSION {
                    return Err(PlanError::Trace {
                        line: line_no,
                        msg: format!(
                            "snatgw_trace: version {} is not supported (this is version {TRACE_VERSION})",
                            h.snatgw_trace
                        ),
                    });
                }
                continue;
            }
            let rec: Record = serde_json::from_str(s).map_err(|e| PlanError::Trace {
                line: line_no,
                msg: e.to_string(),
            })?;
            w.add_record(line_no, &rec, &mut ids)?;
        }
        w.sort();
        Ok(w)
    }

    /// Parses a trace from a string.
    pub fn from_trace_str(s: &str) -> Result<Workload, PlanError> {
        Workload::from_reader(s.as_bytes())
    }

    fn add_record(
        &mut self,
        line: usize,
        r: &Record,
        ids: &mut HashMap<u64, u32>,
    ) -> Result<(), PlanError> {
        let bad = |msg: String| PlanError::Trace { line, msg };
        if !r.t.is_finite() || r.t < 0.0 {
            return Err(bad(format!("t: {} is not a time in seconds >= 0", r.t)));
        }
        let t_ms = (r.t * 1000.0).round() as u64;
        let need = |v: &Option<String>, field: &str| {
            v.clone()
                .ok_or_else(|| bad(format!("{field}: required for `{}` records", r.ev.label())))
        };
        match r.ev {
            EvName::Open => {
                let id =
                    r.id.ok_or_else(|| bad("id: required for `open` records".into()))?;
                let inst = need(&r.inst, "inst")?;
                let proto = need(&r.proto, "proto")?;
                let l4 = match proto.as_str() {
                    "tcp" => L4::Tcp,
                    "udp" => L4::Udp,
                    p => {
                        return Err(bad(format!(
                        "proto: `{p}` is not `tcp` or `udp` (PAT carries TCP and UDP, R1.2/R1.3)"
                    )))
                    }
                };
                let dst = need(&r.dst, "dst")?;
                let sa: SocketAddrV4 = dst
                    .parse()
                    .map_err(|_| bad(format!("dst: `{dst}` is not an IPv4 ip:port")))?;
                if let Some(rt) = &r.retry {
                    let ok = rt.delay.is_finite()
                        && rt.delay >= 0.0
                        && rt.factor.is_finite()
                        && rt.factor >= 1.0;
                    if !ok {
                        return Err(bad(
                            "retry: delay must be >= 0 seconds and factor >= 1".into()
                        ));
                    }
                }
                let inst = self.instance(&inst);
                let dest = self.dest(Dest {
                    l4,
                    ip: (*sa.ip()).into(),
                    port: sa.port(),
                });
                if ids.contains_key(&id) {
                    return Err(bad(format!(
                        "id: {id} is opened twice (ids name one attempt each)"
                    )));
                }
                let f = self.flow(FlowSpec {
                    inst,
                    dest,
                    sport: r.sport,
                    retry: r.retry,
                    refused: r.refused.unwrap_or(false),
                });
                ids.insert(id, f);
                self.push(t_ms, f, EvKind::Open);
            }
            EvName::Data | EvName::Close => {
                let id = r
                    .id
                    .ok_or_else(|| bad(format!("id: required for `{}` records", r.ev.label())))?;
                let &f = ids
                    .get(&id)
                    .ok_or_else(|| bad(format!("id: {id} was not opened before")))?;
                let kind = if r.ev == EvName::Data {
                    EvKind::Data
                } else {
                    EvKind::Close(r.end.ok_or_else(|| {
                        bad("end: required for `close` records (fin, rst, idle, reclaimed)".into())
                    })?)
                };
                self.push(t_ms, f, kind);
            }
            EvName::Scale => {
                let inst = need(&r.inst, "inst")?;
                let size = r
                    .size
                    .ok_or_else(|| bad("size: required for `scale` records".into()))?;
                if size == 0 || size > 1000 {
                    return Err(bad(format!(
                        "size: {size} is not a pool size 1..=1000 (R2.8)"
                    )));
                }
                let i = self.instance(&inst);
                self.push(t_ms, i, EvKind::Scale(size));
            }
        }
        Ok(())
    }

    /// Writes the workload as a trace (JSON Lines with a header line). Flow ids are the flow
    /// indices.
    pub fn to_trace(&self) -> String {
        let mut s = String::with_capacity(self.events.len() * 64 + 32);
        let _ = writeln!(s, "{{\"snatgw_trace\":{TRACE_VERSION}}}");
        for e in &self.events {
            write_event(&mut s, self, e);
        }
        s
    }
}

fn fmt_t(t_ms: u64) -> String {
    if t_ms.is_multiple_of(1000) {
        format!("{}", t_ms / 1000)
    } else {
        let mut x = format!("{}.{:03}", t_ms / 1000, t_ms % 1000);
        while x.ends_with('0') {
            x.pop();
        }
        x
    }
}

fn write_event(s: &mut String, w: &Workload, e: &Ev) {
    let t = fmt_t(e.t_ms);
    match e.kind {
        EvKind::Open => {
            let f = &w.flows[e.flow as usize];
            let d = &w.dests[f.dest as usize];
            let _ = write!(
                s,
                "{{\"t\":{t},\"ev\":\"open\",\"id\":{},\"inst\":{},\"proto\":\"{}\",\"dst\":\"{}:{}\"",
                e.flow,
                serde_json::Value::String(w.instances[f.inst as usize].clone()),
                d.l4.label(),
                Ipv4Addr::from(d.ip),
                d.port
            );
            if let Some(p) = f.sport {
                let _ = write!(s, ",\"sport\":{p}");
            }
            if let Some(r) = &f.retry {
                let _ = write!(
                    s,
                    ",\"retry\":{{\"max\":{},\"delay\":{},\"factor\":{}}}",
                    r.max, r.delay, r.factor
                );
            }
            if f.refused {
                s.push_str(",\"refused\":true");
            }
            s.push_str("}\n");
        }
        EvKind::Data => {
            let _ = writeln!(s, "{{\"t\":{t},\"ev\":\"data\",\"id\":{}}}", e.flow);
        }
        EvKind::Close(end) => {
            let _ = writeln!(
                s,
                "{{\"t\":{t},\"ev\":\"close\",\"id\":{},\"end\":\"{}\"}}",
                e.flow,
                end.label()
            );
        }
        EvKind::Scale(n) => {
            let _ = writeln!(
                s,
                "{{\"t\":{t},\"ev\":\"scale\",\"inst\":{},\"size\":{n}}}",
                serde_json::Value::String(w.instances[e.flow as usize].clone())
            );
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    snatgw_trace: u32,
    #[serde(default)]
    #[allow(dead_code)]
    source: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
enum EvName {
    Open,
    Data,
    Close,
    Scale,
}

impl EvName {
    fn label(self) -> &'static str {
        match self {
            EvName::Open => "open",
            EvName::Data => "data",
            EvName::Close => "close",
            EvName::Scale => "scale",
        }
    }
}

/// One line of a trace, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    t: f64,
    ev: EvName,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    inst: Option<String>,
    #[serde(default)]
    proto: Option<String>,
    #[serde(default)]
    dst: Option<String>,
    #[serde(default)]
    sport: Option<u16>,
    #[serde(default)]
    end: Option<End>,
    #[serde(default)]
    retry: Option<Retry>,
    #[serde(default)]
    refused: Option<bool>,
    #[serde(default)]
    size: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let text = "{\"snatgw_trace\":1}\n\
            {\"t\":0.5,\"ev\":\"open\",\"id\":0,\"inst\":\"vm1\",\"proto\":\"tcp\",\"dst\":\"198.51.100.10:443\",\"sport\":40000,\"retry\":{\"max\":3,\"delay\":1,\"factor\":2}}\n\
            {\"t\":1,\"ev\":\"data\",\"id\":0}\n\
            {\"t\":2.25,\"ev\":\"close\",\"id\":0,\"end\":\"fin\"}\n\
            {\"t\":3,\"ev\":\"open\",\"id\":1,\"inst\":\"vm1\",\"proto\":\"udp\",\"dst\":\"198.51.100.10:53\",\"refused\":true}\n\
            {\"t\":4,\"ev\":\"scale\",\"inst\":\"vm1\",\"size\":60}\n";
        let w = Workload::from_trace_str(text).unwrap();
        assert_eq!(w.events.len(), 5);
        assert_eq!(w.to_trace(), text);
    }

    #[test]
    fn bad_records_name_the_line_and_field() {
        let e = Workload::from_trace_str(
            "{\"t\":1,\"ev\":\"open\",\"id\":1,\"inst\":\"a\",\"proto\":\"icmp\",\"dst\":\"1.2.3.4:5\"}",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 1") && e.contains("proto"), "{e}");
        let e = Workload::from_trace_str("{\"t\":1,\"ev\":\"close\",\"id\":9,\"end\":\"fin\"}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("id: 9"), "{e}");
        let e = Workload::from_trace_str("{\"t\":1,\"ev\":\"data\",\"id\":9,\"colour\":1}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
    }
}
