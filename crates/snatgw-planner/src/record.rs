//! The recorder's conversion: the engine's flow journal ([`FlowChange`]) as trace records.
//!
//! A gateway with `snatgw run --record FILE` drains its journal and hands the changes here;
//! the records written are the trace format of `trace` (docs/PLANNER.md):
//! - `Opened` → an `open` record with a new id, the private source port and the destination;
//! - `Refused` (no port, R2.6; flow limit, R9.2) → an `open` record of its own, marked
//!   `"refused":true`: **every attempt is a record**. A TCP client retransmits the SYN of a
//!   refused connection (1 s, 3 s, 7 s ... later) and the gateway counts each as a failed SNAT
//!   connection (R6.1), so replaying every attempt counts what the gateway counted;
//! - `Closed` → a `close` record at the time the flow's *ending* began, which is what the
//!   replayer sends: FIN both ways at release − `fin_timeout` (R3.2), RST at release −
//!   `rst_timeout` (R3.3), last packet at release − `idle_timeout` (R3.4), or the reclaim
//!   itself (R2.9).
//!
//! Times are the gateway's whole seconds since it started. Records come out in journal order,
//! so close records are not in time order (a FIN is known only when its port is released);
//! the reader sorts. A close whose open was not journaled (the flow started before recording,
//! or the journal overflowed) is skipped and counted. This module does not write files.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use snatgw_core::topology::Params;
use snatgw_core::{EndCause, FlowChange, FlowKey};

use crate::trace::TRACE_VERSION;

/// Turns journal changes into trace lines (see the module documentation).
#[derive(Debug, Default)]
pub struct TraceRecorder {
    ids: HashMap<FlowKey, u64>,
    next: u64,
    /// Close records skipped because their open was not seen.
    pub unmatched: u64,
    /// Records written.
    pub records: u64,
}

impl TraceRecorder {
    /// A recorder with no flows seen yet.
    pub fn new() -> TraceRecorder {
        TraceRecorder::default()
    }

    /// The header line.
    pub fn header() -> String {
        format!("{{\"snatgw_trace\":{TRACE_VERSION},\"source\":\"snatgw run --record\"}}\n")
    }

    /// Appends the records of `changes` to `out`, with the timers of `params`.
    pub fn write(&mut self, changes: &[FlowChange], params: &Params, out: &mut String) {
        for c in changes {
            match c {
                FlowChange::Opened {
                    at, instance, key, ..
                } => {
                    let id = self.next;
                    self.next += 1;
                    self.ids.insert(*key, id);
                    open(out, *at, id, instance, key, false);
                    self.records += 1;
                }
                FlowChange::Refused {
                    at, instance, key, ..
                } => {
                    let id = self.next;
                    self.next += 1;
                    open(out, *at, id, instance, key, true);
                    self.records += 1;
                }
                FlowChange::Closed { at, key, cause, .. } => {
                    let Some(id) = self.ids.remove(key) else {
                        self.unmatched += 1;
                        continue;
                    };
                    // The trace's end is the flow's last packet: the release time less the
                    // cause's delay (a reclaim, or a cause this version does not know, has none).
                    let t = match cause {
                        EndCause::Fin => at.saturating_sub(params.fin_timeout),
                        EndCause::Rst => at.saturating_sub(params.rst_timeout),
                        EndCause::Idle => at.saturating_sub(params.idle_timeout),
                        _ => *at,
                    };
                    let end = cause.label();
                    let _ = writeln!(
                        out,
                        "{{\"t\":{t},\"ev\":\"close\",\"id\":{id},\"end\":\"{end}\"}}"
                    );
                    self.records += 1;
                }
            }
        }
    }
}

fn open(out: &mut String, at: u32, id: u64, inst: &str, k: &FlowKey, refused: bool) {
    let proto = match k.proto {
        6 => "tcp",
        _ => "udp",
    };
    let _ = write!(
        out,
        "{{\"t\":{at},\"ev\":\"open\",\"id\":{id},\"inst\":{},\"proto\":\"{proto}\",\"dst\":\"{}:{}\",\"sport\":{}",
        serde_json::Value::String(inst.to_string()),
        Ipv4Addr::from(k.dst),
        k.dport,
        k.sport
    );
    out.push_str(if refused {
        ",\"refused\":true}\n"
    } else {
        "}\n"
    });
}
