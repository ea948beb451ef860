//! What a replay found, per instance and per destination, and its text tables.
//!
//! Plain records filled by `replay` and rendered here as fixed-width tables (the what-if
//! table is `whatif`'s). Serialisable, so `snatgw plan --json` prints them as they are.

use std::fmt::Write as _;

use serde::Serialize;

use crate::trace::Dest;

/// Results of one instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InstanceResult {
    /// Instance name.
    pub name: String,
    /// Scenario at the end (`ilpip`, `load_balanced`, `default_snat`).
    pub scenario: String,
    /// Public IP at the end.
    pub public_ip: String,
    /// Preallocated SNAT ports per protocol at the end (R2.8; 65535 for an ILPIP).
    pub allocated: u32,
    /// Smallest preallocation seen during the replay (tier changes, R2.9).
    pub allocated_min: u32,
    /// Peak used SNAT ports (distinct ports held, R2.3), `[tcp, udp]`.
    pub peak_used: [u32; 2],
    /// Used SNAT ports when the replay ended, `[tcp, udp]`.
    pub used_at_end: [u32; 2],
    /// Connection attempts (opens and retries).
    pub attempts: u64,
    /// Attempts that got a translation.
    pub ok: u64,
    /// Attempts refused for want of a port (R2.6): what the gateway counts as failed SNAT
    /// connections (R6.1).
    pub failed: u64,
    /// Attempts refused by a flow limit (R9.2).
    pub limited: u64,
    /// Attempts dropped for another reason.
    pub dropped: u64,
    /// When the first attempt was refused for want of a port, seconds.
    pub first_exhaustion_s: Option<f64>,
    /// Flows the client still used after the gateway removed them (idle timeout, R3.4).
    pub broken: u64,
    /// Flows whose client gave up after its last retry.
    pub gave_up: u64,
    /// Flows that never got a translation: refused without a retry policy, or given up.
    pub lost: u64,
    /// Ports taken from the instance by tier changes (R2.9).
    pub reclaimed_ports: u64,
    /// Flows dropped with reclaimed ports (R2.9, R1.4).
    pub reclaimed_flows: u64,
}

/// Results of one (instance, destination endpoint).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DestResult {
    /// Instance name.
    pub instance: String,
    /// Destination endpoint.
    #[serde(serialize_with = "ser_dest")]
    pub dest: Dest,
    /// The instance's preallocation at the end.
    pub allocated: u32,
    /// Peak ports held for this destination (= flows to it, R2.3).
    pub peak_used: u32,
    /// Attempts.
    pub attempts: u64,
    /// Attempts translated.
    pub ok: u64,
    /// Attempts refused for want of a port (R2.6).
    pub failed: u64,
    /// Attempts refused by a flow limit (R9.2).
    pub limited: u64,
    /// Attempts dropped otherwise.
    pub dropped: u64,
    /// First refusal for want of a port, seconds.
    pub first_exhaustion_s: Option<f64>,
    /// Flows broken by the idle timeout.
    pub broken: u64,
    /// Flows given up after the last retry.
    pub gave_up: u64,
    /// Flows that never got a translation.
    pub lost: u64,
}

impl Default for DestResult {
    fn default() -> Self {
        DestResult {
            instance: String::new(),
            dest: Dest {
                l4: snatgw_core::L4::Tcp,
                ip: 0,
                port: 0,
            },
            allocated: 0,
            peak_used: 0,
            attempts: 0,
            ok: 0,
            failed: 0,
            limited: 0,
            dropped: 0,
            first_exhaustion_s: None,
            broken: 0,
            gave_up: 0,
            lost: 0,
        }
    }
}

fn ser_dest<S: serde::Serializer>(d: &Dest, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&d.label())
}

/// Used ports of one instance over time: `(second, [tcp, udp], allocated)` at every change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    /// Instance.
    pub instance: String,
    /// Preallocation at the end.
    pub allocated: u32,
    /// Points at each change.
    pub points: Vec<(u32, [u32; 2], u32)>,
}

/// The outcome of one replay.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Per instance of the workload.
    pub instances: Vec<InstanceResult>,
    /// Per instance and destination.
    pub dests: Vec<DestResult>,
    /// Events replayed (trace events and retries).
    pub events: u64,
    /// Where the replay stopped, seconds.
    pub end_s: f64,
    /// Opens for which the replayer found no free private source port (more than 64 512
    /// flows of one instance to one destination at once): they reused one, so the result is
    /// approximate.
    pub sport_collisions: u64,
    /// Packets passed untranslated (VNet destinations, R1.7).
    pub passed: u64,
    /// Used ports over time (with `Options::timeline`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Timeline>,
}

impl Report {
    /// Failed attempts (R2.6) over all instances.
    pub fn failed(&self) -> u64 {
        self.instances.iter().map(|i| i.failed).sum()
    }
    /// Broken flows over all instances.
    pub fn broken(&self) -> u64 {
        self.instances.iter().map(|i| i.broken).sum()
    }
    /// Flows given up over all instances.
    pub fn gave_up(&self) -> u64 {
        self.instances.iter().map(|i| i.gave_up).sum()
    }
    /// Flows that never got a translation, over all instances.
    pub fn lost(&self) -> u64 {
        self.instances.iter().map(|i| i.lost).sum()
    }
    /// Ports reclaimed by tier changes over all instances.
    pub fn reclaimed_ports(&self) -> u64 {
        self.instances.iter().map(|i| i.reclaimed_ports).sum()
    }
    /// The earliest exhaustion, seconds.
    pub fn first_exhaustion_s(&self) -> Option<f64> {
        self.instances
            .iter()
            .filter_map(|i| i.first_exhaustion_s)
            .min_by(f64::total_cmp)
    }
    /// The instance with the highest peak relative to its preallocation.
    pub fn busiest(&self) -> Option<&InstanceResult> {
        self.instances.iter().max_by(|a, b| {
            let ra = a.peak_used[0].max(a.peak_used[1]) as f64 / a.allocated.max(1) as f64;
            let rb = b.peak_used[0].max(b.peak_used[1]) as f64 / b.allocated.max(1) as f64;
            ra.total_cmp(&rb)
        })
    }

    /// The per-instance-and-destination table.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "instance".to_string(),
            "destination".to_string(),
            "allocated".to_string(),
            "peak used".to_string(),
            "first exhaustion".to_string(),
            "attempts".to_string(),
            "failed".to_string(),
            "broken".to_string(),
            "reclaimed".to_string(),
        ]];
        for d in &self.dests {
            let inst = self.instances.iter().find(|i| i.name == d.instance);
            rows.push([
                d.instance.clone(),
                d.dest.label(),
                alloc_label(inst),
                d.peak_used.to_string(),
                fmt_time(d.first_exhaustion_s),
                d.attempts.to_string(),
                d.failed.to_string(),
                d.broken.to_string(),
                inst.map_or(0, |i| i.reclaimed_ports).to_string(),
            ]);
        }
        render(&rows)
    }
}

fn alloc_label(i: Option<&InstanceResult>) -> String {
    match i {
        Some(i) if i.scenario == "ilpip" => "65535 (ILPIP)".into(),
        Some(i) if i.allocated_min < i.allocated => {
            format!("{} (min {})", i.allocated, i.allocated_min)
        }
        Some(i) => i.allocated.to_string(),
        None => "-".into(),
    }
}

/// `12.3 s` or `never`.
pub fn fmt_time(t: Option<f64>) -> String {
    match t {
        Some(t) if t.fract() == 0.0 => format!("{t:.0} s"),
        Some(t) => format!("{t:.1} s"),
        None => "never".into(),
    }
}

/// Renders rows as a left-aligned table with a rule under the header.
pub fn render<const N: usize>(rows: &[[String; N]]) -> String {
    let mut w = [0usize; N];
    for r in rows {
        for (k, c) in r.iter().enumerate() {
            w[k] = w[k].max(c.chars().count());
        }
    }
    let mut s = String::new();
    for (n, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(k, c)| format!("{c:<width$}", width = w[k]))
            .collect();
        let _ = writeln!(s, "{}", line.join("  ").trim_end());
        if n == 0 {
            let rule: Vec<String> = w.iter().map(|&x| "-".repeat(x)).collect();
            let _ = writeln!(s, "{}", rule.join("  "));
        }
    }
    s
}
