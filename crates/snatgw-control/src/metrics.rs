//! Prometheus text for `GET /metrics`, built from a [`MetricsSnapshot`] (SPEC R6.1).
//!
//! A fresh `prometheus_client` registry is filled from the snapshot at every scrape and
//! encoded in the Prometheus text format 0.0.4, so the gateway keeps no metric objects of its
//! own: its counters stay where the engine keeps them. Names follow the cloud's metrics:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `snatgw_allocated_snat_ports` ("Allocated SNAT Ports", R2.4/R2.8) | gauge | instance, public_ip, protocol |
//! | `snatgw_used_snat_ports` ("Used SNAT Ports", R2.3) | gauge | instance, public_ip, protocol |
//! | `snatgw_snat_connection_count_total` ("SNAT Connection Count") | counter | + result = successful / failed (R2.6) |
//! | `snatgw_flows` (live flows) | gauge | instance, public_ip, protocol |
//! | `snatgw_dropped_packets_total` | counter | instance, public_ip, protocol (tcp, udp, other), reason |
//! | `snatgw_idle_ended_then_sent_total` (flows ended by idle timeout, then sent on again: keepalives missing, R7.1) | counter | instance, public_ip, protocol |
//! | `snatgw_fail_fast_answers_total` (refused new flows answered with RST/ICMP 3/13, or suppressed by the rate limit, R9.5) | counter | instance, public_ip, protocol, result |
//! | `snatgw_gateway_dropped_packets_total` (all drops of the gateway) | counter | reason |
//! | `snatgw_destination_used_snat_ports`, `snatgw_destination_used_snat_ports_ratio` | gauge | instance, public_ip, protocol, destination |
//! | `snatgw_live_flows`, `snatgw_max_flows` (R9.2) | gauge | — |
//! | `snatgw_inbound_flows` (live inbound LB flows, R5.1) | gauge | — |
//! | `snatgw_lb_probe_up` (1 up, 0 down, R5.2/R4.5) | gauge | lb, probe, member |
//! | `snatgw_lb_probe_consecutive_failures` | gauge | lb, probe, member |
//! | `snatgw_lb_probe_results_total` | counter | lb, probe, member, result = ok / failed |
//! | `snatgw_lb_inbound_flows_total` | counter | lb, rule, result = created / no_healthy_backend / nsg_denied |
//! | `snatgw_nsg_rule_hits_total` (what flow logs give, R4.1/R4.2) | counter | nsg, rule, direction, access, priority |
//! | `snatgw_packets_received_total`, `snatgw_packets_sent_total` (TUN queues, summed) | counter | side = private / public |
//! | `snatgw_lock_acquisitions_total`, `snatgw_lock_contended_total` (the gateway lock) | counter | — |
//! | `snatgw_lock_wait_seconds_total`, `snatgw_lock_held_seconds_total` | counter | — |
//! | `snatgw_fastpath_flows_installed_total`, `_removed_total`, `_skipped_total`, `snatgw_fastpath_install_failures_total` | counter | — |
//! | `snatgw_fastpath_packets_total` (translated in the kernel) | counter | direction = outbound / inbound |
//! | `snatgw_fastpath_steered_packets_total` (sent to their fleet owner by the kernel, R10.3) | counter | direction = outbound / inbound |
//! | `snatgw_fastpath_steer_passed_up_total` (another node's, passed up to the TUN path) | counter | — |
//! | `snatgw_fastpath_link_packets_total` (steered here by other nodes, R10.3) | counter | result = translated / passed_up / dropped |
//!
//! | `snatgw_fleet_nodes_live`, `snatgw_fleet_instances_owned`, `snatgw_fleet_lease_valid_seconds` (a fleet node's view, issue #19) | gauge | node |
//! | `snatgw_fleet_takeover_windows_open`, `snatgw_fleet_takeover_holds`, `snatgw_fleet_takeover_ports_held` (R10.4, with the fleet gauges) | gauge | — |
//! | `snatgw_fleet_port_reserve_waiting_instances` (R10.4: owned instances without an acknowledged port reserve) | gauge | node |
//! | `snatgw_fleet_takeover_holds_made_total`, `_refused_total`, `snatgw_fleet_lost_flow_packets_total` | counter | — |
//!
//! The fleet gauges are exported only when the node runs in a fleet ([`MetricsSnapshot::fleet`]).
//! The runtime's counters (the last three rows' block) are exported only when the backend has
//! a source for them ([`MetricsSnapshot::runtime`]), the fast path's only when it runs.
//!
//! Label cardinality is bounded: per instance two protocols, the drop reasons that occurred,
//! and at most five destinations (the busiest by ports used), so users alert on the ratio of
//! ports used for one destination. This module does not read the engine (the backend copies
//! the snapshot out) and serves nothing (the `api` module does).

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::backend::{FleetGauges, MetricsSnapshot, RuntimeCounters, TakeoverHoldMetrics};

/// `Content-Type` of the text this module renders.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;

fn gauge_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

fn counter_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn set(f: &Family<Labels, Gauge>, labels: Labels, v: u64) {
    f.get_or_create(&labels)
        .set(i64::try_from(v).unwrap_or(i64::MAX));
}

fn add(f: &Family<Labels, Counter>, labels: Labels, v: u64) {
    f.get_or_create(&labels).inc_by(v);
}

/// Renders the snapshot as Prometheus text (format 0.0.4).
pub fn render(s: &MetricsSnapshot) -> String {
    let mut reg = Registry::default();
    let allocated = gauge_family(
        &mut reg,
        "snatgw_allocated_snat_ports",
        "Allocated SNAT Ports: ports preallocated to the instance per protocol (SPEC R2.4, R2.8)",
    );
    let used = gauge_family(
        &mut reg,
        "snatgw_used_snat_ports",
        "Used SNAT Ports: distinct ports held by at least one flow (SPEC R2.3)",
    );
    let conns = counter_family(
        &mut reg,
        "snatgw_snat_connection_count",
        "SNAT Connection Count: new flows that got a port (successful) or found none (failed, SPEC R2.6)",
    );
    let flows = gauge_family(&mut reg, "snatgw_flows", "Live flows of the instance");
    let drops = counter_family(
        &mut reg,
        "snatgw_dropped_packets",
        "Dropped packets of the instance by reason (SPEC R6.1)",
    );
    let idle_then_sent = counter_family(
        &mut reg,
        "snatgw_idle_ended_then_sent",
        "Flows ended by idle timeout on which the instance later sent again (TCP: the segment is dropped, the connection breaks; UDP: a new flow): enable TCP keepalives below the idle timeout (SPEC R3.4, R7.1)",
    );
    let fail_fast = counter_family(
        &mut reg,
        "snatgw_fail_fast_answers",
        "Refused new flows of the instance (exhaustion, flow limit) with gateway.on_exhaustion = reset: answered with a RST or ICMP 3/13, or suppressed by the per-instance rate limit (SPEC R9.5)",
    );
    let gw_drops = counter_family(
        &mut reg,
        "snatgw_gateway_dropped_packets",
        "Dropped packets of the whole gateway by reason",
    );
    let dest_used = gauge_family(
        &mut reg,
        "snatgw_destination_used_snat_ports",
        "SNAT ports the instance uses for one destination endpoint, for its 5 busiest destinations (SPEC R2.3)",
    );
    let dest_ratio = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    reg.register(
        "snatgw_destination_used_snat_ports_ratio",
        "Used / allocated SNAT ports for one destination endpoint, for the instance's 5 busiest destinations (1 = exhausted, SPEC R2.6)",
        dest_ratio.clone(),
    );
    let live = Gauge::<i64>::default();
    reg.register(
        "snatgw_live_flows",
        "Flows in the gateway's table",
        live.clone(),
    );
    let max = Gauge::<i64>::default();
    reg.register(
        "snatgw_max_flows",
        "Flows the gateway may hold (SPEC R9.2)",
        max.clone(),
    );

    let inbound = Gauge::<i64>::default();
    reg.register(
        "snatgw_inbound_flows",
        "Live inbound load-balancing flows (SPEC R5.1)",
        inbound.clone(),
    );
    let probe_up = gauge_family(
        &mut reg,
        "snatgw_lb_probe_up",
        "1 when the member gets new inbound flows, 0 when its health probe marked it down (SPEC R5.2, R4.5)",
    );
    let probe_fails = gauge_family(
        &mut reg,
        "snatgw_lb_probe_consecutive_failures",
        "Failed health probes in a row (down at the probe's unhealthy_threshold, SPEC R5.2)",
    );
    let probe_results = counter_family(
        &mut reg,
        "snatgw_lb_probe_results",
        "Health-probe results; probes the member's NSG blocks count as failed (SPEC R4.5)",
    );
    let lb_flows = counter_family(
        &mut reg,
        "snatgw_lb_inbound_flows",
        "New inbound flows of a load-balancing rule: created, or dropped (SPEC R5.1)",
    );
    let nsg_hits = counter_family(
        &mut reg,
        "snatgw_nsg_rule_hits",
        "Packets an NSG rule decided, default rules included (SPEC R4.1, R4.2)",
    );
    inbound.set(i64::try_from(s.inbound_flows).unwrap_or(i64::MAX));
    for p in &s.probes {
        let l: Labels = vec![
            ("lb", p.lb.clone()),
            ("probe", p.probe.clone()),
            ("member", p.member.clone()),
        ];
        set(&probe_up, l.clone(), u64::from(p.up));
        set(&probe_fails, l.clone(), p.consecutive_failures.into());
        for (result, v) in [
            ("ok", p.probes - p.failures.min(p.probes)),
            ("failed", p.failures),
        ] {
            let mut l = l.clone();
            l.push(("result", result.into()));
            add(&probe_results, l, v);
        }
    }
    for r in &s.inbound_rules {
        for (result, v) in [
            ("created", r.flows),
            ("no_healthy_backend", r.no_healthy_backend),
            ("nsg_denied", r.nsg_denied),
        ] {
            let l: Labels = vec![
                ("lb", r.lb.clone()),
                ("rule", r.rule.clone()),
                ("result", result.into()),
            ];
            add(&lb_flows, l, v);
        }
    }
    for h in &s.nsg_rules {
        let l: Labels = vec![
            ("nsg", h.nsg.clone()),
            ("rule", h.rule.clone()),
            ("direction", h.direction.clone()),
            ("access", h.access.clone()),
            ("priority", h.priority.to_string()),
        ];
        add(&nsg_hits, l, h.hits);
    }

    for i in &s.instances {
        let base = |protocol: &str| -> Labels {
            vec![
                ("instance", i.instance.clone()),
                ("public_ip", i.public_ip.clone()),
                ("protocol", protocol.to_string()),
            ]
        };
        for p in &i.per_protocol {
            set(&allocated, base(&p.protocol), p.allocated_ports.into());
            set(&used, base(&p.protocol), p.used_ports.into());
            set(&flows, base(&p.protocol), p.flows);
            add(&idle_then_sent, base(&p.protocol), p.idle_ended_then_sent);
            for (result, v) in [
                ("answered", p.fail_fast_answered),
                ("suppressed", p.fail_fast_suppressed),
            ] {
                let mut l = base(&p.protocol);
                l.push(("result", result.to_string()));
                add(&fail_fast, l, v);
            }
            for (result, v) in [
                ("successful", p.connections_ok),
                ("failed", p.connections_failed),
            ] {
                let mut l = base(&p.protocol);
                l.push(("result", result.into()));
                add(&conns, l, v);
            }
            for (reason, v) in &p.drops {
                let mut l = base(&p.protocol);
                l.push(("reason", reason.clone()));
                add(&drops, l, *v);
            }
        }
        for (reason, v) in &i.other_protocol_drops {
            let mut l = base("other");
            l.push(("reason", reason.clone()));
            add(&drops, l, *v);
        }
        for d in &i.busiest {
            let mut l = base(&d.protocol);
            l.push(("destination", d.destination.clone()));
            set(&dest_used, l.clone(), d.ports_used.into());
            let ratio = if d.allocated == 0 {
                0.0
            } else {
                f64::from(d.ports_used) / f64::from(d.allocated)
            };
            dest_ratio.get_or_create(&l).set(ratio);
        }
    }
    for (reason, v) in &s.drops {
        add(&gw_drops, vec![("reason", reason.clone())], *v);
    }
    live.set(i64::try_from(s.live_flows).unwrap_or(i64::MAX));
    max.set(i64::try_from(s.max_flows).unwrap_or(i64::MAX));

    if let Some(rt) = &s.runtime {
        register_runtime(&mut reg, rt);
    }
    if let Some(f) = &s.fleet {
        register_fleet(&mut reg, f);
        register_takeover(&mut reg, &s.takeover);
    }

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &reg);
    out
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

fn seconds_counter(reg: &mut Registry, name: &str, help: &str, ns: u64) {
    let c = Counter::<f64, AtomicU64>::default();
    c.inc_by(ns as f64 / 1e9);
    reg.register(name, help, c);
}

/// One fleet node's gauges (issue #19), labelled with the node's id.
fn register_fleet(reg: &mut Registry, f: &FleetGauges) {
    let node = || vec![("node", f.node.clone())];
    let live = gauge_family(
        reg,
        "snatgw_fleet_nodes_live",
        "Fleet nodes with a live lease, as this node last listed them (SPEC R10.1)",
    );
    set(&live, node(), f.nodes_live);
    let owned = gauge_family(
        reg,
        "snatgw_fleet_instances_owned",
        "Instances this node may translate for now: granted to it under a valid lease (SPEC R10.1, R10.2)",
    );
    set(&owned, node(), f.instances_owned);
    let waiting = gauge_family(
        reg,
        "snatgw_fleet_port_reserve_waiting_instances",
        "Owned instances whose runner-up has acknowledged no port reserve now: their new flows are refused (drop reason port_reserve) until it does (SPEC R10.4)",
    );
    set(&waiting, node(), f.reserve_waiting_instances);
    let valid = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    reg.register(
        "snatgw_fleet_lease_valid_seconds",
        "Seconds until this node's lease view ends and it stops translating unless renewed (self-fencing, SPEC R10.2); 0 without a valid lease",
        valid.clone(),
    );
    valid
        .get_or_create(&node())
        .set(f.lease_valid_seconds.max(0.0));
}

/// A fleet node's takeover windows and holds (issue #19, R10.4).
fn register_takeover(reg: &mut Registry, t: &TakeoverHoldMetrics) {
    let windows = gauge_family(
        reg,
        "snatgw_fleet_takeover_windows_open",
        "Instances this node took over less than a FIN timeout ago: unsolicited packets to their ports hold those ports (SPEC R10.4)",
    );
    set(&windows, Vec::new(), t.windows_open);
    let holds = gauge_family(
        reg,
        "snatgw_fleet_takeover_holds",
        "Public ports held against new flows toward one remote: a flow of the previous owner whose state did not arrive still gets packets there (SPEC R10.4, held for the FIN timeout, R3.2)",
    );
    set(&holds, Vec::new(), t.holds_active);
    let ports = gauge_family(
        reg,
        "snatgw_fleet_takeover_ports_held",
        "Public ports held against every destination after a takeover: the last two port reserves the previous owner had acknowledged here (SPEC R10.4, held for the FIN timeout, R3.2)",
    );
    set(&ports, Vec::new(), t.ports_held);
    counter(
        reg,
        "snatgw_fleet_takeover_holds_made",
        "Takeover holds made (SPEC R10.4)",
        t.holds_total,
    );
    counter(
        reg,
        "snatgw_fleet_takeover_holds_refused",
        "Takeover holds refused: the instance had as many as it may (4 per port of its block); the packet was dropped all the same",
        t.holds_refused_at_cap,
    );
    counter(
        reg,
        "snatgw_fleet_lost_flow_packets",
        "Outbound TCP segments without a flow from instances taken over less than a FIN timeout ago: a flow whose state did not arrive (dropped, R3.1)",
        t.lost_flow_packets,
    );
}

/// The runtime's counters: packets per side, the gateway lock, the kernel fast path.
fn register_runtime(reg: &mut Registry, rt: &RuntimeCounters) {
    let rx = counter_family(
        reg,
        "snatgw_packets_received",
        "Packets received from the TUN queues of one side, summed over its queues (private: outbound, public: inbound, SPEC R9.1)",
    );
    let tx = counter_family(
        reg,
        "snatgw_packets_sent",
        "Packets written to the TUN queues of one side, summed over its queues",
    );
    for (side, r, t) in [
        ("private", rt.private_rx_packets, rt.private_tx_packets),
        ("public", rt.public_rx_packets, rt.public_tx_packets),
    ] {
        add(&rx, vec![("side", side.into())], r);
        add(&tx, vec![("side", side.into())], t);
    }
    counter(
        reg,
        "snatgw_lock_acquisitions",
        "Acquisitions of the gateway lock (one per received batch, plus housekeeping)",
        rt.lock_acquisitions,
    );
    counter(
        reg,
        "snatgw_lock_contended",
        "Acquisitions of the gateway lock that found it held and waited",
        rt.lock_contended,
    );
    seconds_counter(
        reg,
        "snatgw_lock_wait_seconds",
        "Seconds spent waiting for the gateway lock",
        rt.lock_wait_ns,
    );
    seconds_counter(
        reg,
        "snatgw_lock_held_seconds",
        "Seconds workers held the gateway lock deciding batches",
        rt.lock_held_ns,
    );
    if let Some(f) = &rt.flow_state {
        let snaps = counter_family(
            reg,
            "snatgw_flow_state_snapshots",
            "Flow-state snapshots a restart restores from (R11.1): written durably, or failed (a crash then loses the flows opened since the last written one)",
        );
        for (result, v) in [("written", f.written), ("failed", f.failed)] {
            add(&snaps, vec![("result", result.into())], v);
        }
        let flows: Gauge = Gauge::default();
        flows.set(i64::try_from(f.last_flows).unwrap_or(i64::MAX));
        reg.register(
            "snatgw_flow_state_last_flows",
            "Flows in the last flow-state snapshot written",
            flows,
        );
        let bytes: Gauge = Gauge::default();
        bytes.set(i64::try_from(f.last_bytes).unwrap_or(i64::MAX));
        reg.register(
            "snatgw_flow_state_last_bytes",
            "Bytes of the last flow-state snapshot written",
            bytes,
        );
        let took = Gauge::<f64, AtomicU64>::default();
        took.set(f.last_micros as f64 / 1e6);
        reg.register(
            "snatgw_flow_state_last_write_seconds",
            "Seconds the last flow-state snapshot took, first export step to durable file",
            took,
        );
    }
    if let Some(f) = &rt.fleet_link {
        let steered = counter_family(
            reg,
            "snatgw_fleet_steered_packets",
            "Packets this fleet node forwarded to the node that owns them, by the side they arrived on (R10.3)",
        );
        for (direction, v) in [("outbound", f.steered_out), ("inbound", f.steered_in)] {
            add(&steered, vec![("direction", direction.into())], v);
        }
        let injected = counter_family(
            reg,
            "snatgw_fleet_injected_packets",
            "Packets other fleet nodes forwarded here: decided, dropped unread (inbox full) or refused by the engine (R10.3)",
        );
        for (result, v) in [
            ("decided", f.injected),
            ("dropped", f.injected_dropped),
            ("refused", f.injected_refused),
        ] {
            add(&injected, vec![("result", result.into())], v);
        }
        counter(
            reg,
            "snatgw_fleet_replicated_changes",
            "Flow changes handed to the replication towards the nodes that would take this node's instances over (R10.4)",
            f.journal_tapped,
        );
        counter(
            reg,
            "snatgw_fleet_replication_lost_changes",
            "Flow changes lost to a journal overflow before the replication saw them (the next export resynchronises, R10.4)",
            f.journal_lost,
        );
    }
    let Some(fp) = &rt.fast_path else {
        return;
    };
    counter(
        reg,
        "snatgw_fastpath_flows_installed",
        "Flows installed in the kernel fast path's flow map",
        fp.installed,
    );
    counter(
        reg,
        "snatgw_fastpath_flows_removed",
        "Flows removed from the kernel fast path's flow map",
        fp.removed,
    );
    counter(
        reg,
        "snatgw_fastpath_install_failures",
        "Flows the kernel fast path's map had no room for: they stay on the TUN path (raise --fast-path-flows)",
        fp.install_failed,
    );
    counter(
        reg,
        "snatgw_fastpath_flows_skipped",
        "Flows of instance slots without kernel counters: they stay on the TUN path",
        fp.skipped,
    );
    let pkts = counter_family(
        reg,
        "snatgw_fastpath_packets",
        "Packets the kernel fast path translated, as of the last harvest (about once a second)",
    );
    for (direction, v) in [
        ("outbound", fp.translated_out),
        ("inbound", fp.translated_in),
    ] {
        add(&pkts, vec![("direction", direction.into())], v);
    }
    let steered = counter_family(
        reg,
        "snatgw_fastpath_steered_packets",
        "Packets of another fleet node's instances or port blocks the kernel fast path sent to that node over the fleet link, by the side they arrived on (R10.3); the TUN path's are snatgw_fleet_steered_packets",
    );
    for (direction, v) in [("outbound", fp.steered_out), ("inbound", fp.steered_in)] {
        add(&steered, vec![("direction", direction.into())], v);
    }
    counter(
        reg,
        "snatgw_fastpath_steer_passed_up",
        "Packets of another fleet node's the kernel could not send it (GSO, too big for the fleet link once wrapped): passed up and steered from the TUN (R10.3)",
        fp.steer_passed_up,
    );
    let link = counter_family(
        reg,
        "snatgw_fastpath_link_packets",
        "Packets other fleet nodes steered to this node: translated by the kernel (a flow installed here), passed up to the link's socket (a first packet, no flow here), or dropped after unwrapping (R10.3)",
    );
    for (result, v) in [
        ("translated", fp.link_translated),
        ("passed_up", fp.link_passed_up),
        ("dropped", fp.link_dropped),
    ] {
        add(&link, vec![("result", result.into())], v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{DestinationUse, InstanceMetrics, ProtoMetrics};

    #[test]
    fn renders_names_labels_and_values() {
        let s = MetricsSnapshot {
            instances: vec![InstanceMetrics {
                instance: "vm1".into(),
                public_ip: "203.0.113.1".into(),
                scenario: "default_snat".into(),
                per_protocol: vec![ProtoMetrics {
                    protocol: "tcp".into(),
                    allocated_ports: 1024,
                    used_ports: 3,
                    flows: 4,
                    connections_ok: 4,
                    connections_failed: 1,
                    drops: vec![("ports_exhausted".into(), 1)],
                    idle_ended_then_sent: 6,
                    fail_fast_answered: 7,
                    fail_fast_suppressed: 2,
                }],
                other_protocol_drops: vec![("icmp_echo_via_pat".into(), 2)],
                busiest: vec![DestinationUse {
                    protocol: "tcp".into(),
                    destination: "198.51.100.1:443".into(),
                    ports_used: 256,
                    allocated: 1024,
                }],
            }],
            drops: vec![("malformed".into(), 9)],
            live_flows: 4,
            max_flows: 100,
            inbound_flows: 2,
            probes: vec![crate::view::ProbeMetrics {
                lb: "lb".into(),
                probe: "hp".into(),
                member: "vm1".into(),
                up: false,
                consecutive_failures: 3,
                probes: 5,
                failures: 4,
            }],
            nsg_rules: vec![crate::view::NsgRuleMetrics {
                nsg: "n".into(),
                rule: "DenyAllInBound".into(),
                priority: 65500,
                direction: "inbound".into(),
                access: "deny".into(),
                default: true,
                hits: 7,
            }],
            inbound_rules: vec![crate::view::InboundRuleMetrics {
                lb: "lb".into(),
                rule: "http".into(),
                flows: 10,
                no_healthy_backend: 1,
                nsg_denied: 2,
            }],
            runtime: None,
            fleet: None,
            takeover: Default::default(),
        };
        let t = render(&s);
        let l = r#"instance="vm1",public_ip="203.0.113.1",protocol="tcp""#;
        for want in [
            format!("snatgw_allocated_snat_ports{{{l}}} 1024"),
            format!("snatgw_used_snat_ports{{{l}}} 3"),
            format!("snatgw_flows{{{l}}} 4"),
            format!("snatgw_snat_connection_count_total{{{l},result=\"successful\"}} 4"),
            format!("snatgw_snat_connection_count_total{{{l},result=\"failed\"}} 1"),
            format!("snatgw_dropped_packets_total{{{l},reason=\"ports_exhausted\"}} 1"),
            format!("snatgw_idle_ended_then_sent_total{{{l}}} 6"),
            format!("snatgw_fail_fast_answers_total{{{l},result=\"answered\"}} 7"),
            format!("snatgw_fail_fast_answers_total{{{l},result=\"suppressed\"}} 2"),
            "# TYPE snatgw_idle_ended_then_sent_total counter".into(),
            "snatgw_dropped_packets_total{instance=\"vm1\",public_ip=\"203.0.113.1\",protocol=\"other\",reason=\"icmp_echo_via_pat\"} 2".into(),
            format!("snatgw_destination_used_snat_ports{{{l},destination=\"198.51.100.1:443\"}} 256"),
            format!("snatgw_destination_used_snat_ports_ratio{{{l},destination=\"198.51.100.1:443\"}} 0.25"),
            "snatgw_gateway_dropped_packets_total{reason=\"malformed\"} 9".into(),
            "snatgw_live_flows 4".into(),
            "snatgw_max_flows 100".into(),
            "snatgw_inbound_flows 2".into(),
            "snatgw_lb_probe_up{lb=\"lb\",probe=\"hp\",member=\"vm1\"} 0".into(),
            "snatgw_lb_probe_consecutive_failures{lb=\"lb\",probe=\"hp\",member=\"vm1\"} 3".into(),
            "snatgw_lb_probe_results_total{lb=\"lb\",probe=\"hp\",member=\"vm1\",result=\"ok\"} 1".into(),
            "snatgw_lb_probe_results_total{lb=\"lb\",probe=\"hp\",member=\"vm1\",result=\"failed\"} 4".into(),
            "snatgw_lb_inbound_flows_total{lb=\"lb\",rule=\"http\",result=\"nsg_denied\"} 2".into(),
            "snatgw_nsg_rule_hits_total{nsg=\"n\",rule=\"DenyAllInBound\",direction=\"inbound\",access=\"deny\",priority=\"65500\"} 7".into(),
            "# TYPE snatgw_used_snat_ports gauge".into(),
            "# TYPE snatgw_snat_connection_count_total counter".into(),
        ] {
            assert!(t.lines().any(|x| x == want), "missing `{want}` in\n{t}");
        }
    }

    #[test]
    fn renders_fleet_gauges_only_in_a_fleet() {
        let none = render(&MetricsSnapshot::default());
        assert!(!none.contains("snatgw_fleet"), "{none}");
        let s = MetricsSnapshot {
            fleet: Some(FleetGauges {
                node: "gw-1".into(),
                nodes_live: 3,
                instances_owned: 4,
                lease_valid_seconds: 7.5,
                reserve_waiting_instances: 1,
            }),
            takeover: TakeoverHoldMetrics {
                windows_open: 2,
                holds_active: 5,
                holds_total: 9,
                holds_refused_at_cap: 1,
                lost_flow_packets: 3,
                ports_held: 256,
            },
            ..Default::default()
        };
        let t = render(&s);
        for want in [
            "snatgw_fleet_nodes_live{node=\"gw-1\"} 3",
            "snatgw_fleet_instances_owned{node=\"gw-1\"} 4",
            "snatgw_fleet_lease_valid_seconds{node=\"gw-1\"} 7.5",
            "# TYPE snatgw_fleet_lease_valid_seconds gauge",
            // R10.4's takeover holds, with the fleet gauges only.
            "snatgw_fleet_takeover_windows_open 2",
            "snatgw_fleet_takeover_holds 5",
            "snatgw_fleet_takeover_ports_held 256",
            "snatgw_fleet_port_reserve_waiting_instances{node=\"gw-1\"} 1",
            "snatgw_fleet_takeover_holds_made_total 9",
            "snatgw_fleet_takeover_holds_refused_total 1",
            "snatgw_fleet_lost_flow_packets_total 3",
        ] {
            assert!(t.lines().any(|x| x == want), "missing `{want}` in\n{t}");
        }
    }

    /// R11.1: the flow-state snapshots' counters, only when snapshots are written.
    #[test]
    fn r11_1_renders_flow_state_counters_only_when_snapshots_run() {
        let mut s = MetricsSnapshot {
            runtime: Some(RuntimeCounters::default()),
            ..Default::default()
        };
        assert!(!render(&s).contains("snatgw_flow_state_"));
        if let Some(rt) = s.runtime.as_mut() {
            rt.flow_state = Some(crate::backend::FlowStateCounters {
                written: 12,
                failed: 1,
                last_flows: 5000,
                last_bytes: 200_000,
                last_micros: 2_500,
            });
        }
        let t = render(&s);
        for want in [
            "snatgw_flow_state_snapshots_total{result=\"written\"} 12",
            "snatgw_flow_state_snapshots_total{result=\"failed\"} 1",
            "snatgw_flow_state_last_flows 5000",
            "snatgw_flow_state_last_bytes 200000",
            "snatgw_flow_state_last_write_seconds 0.0025",
        ] {
            assert!(t.lines().any(|x| x == want), "missing `{want}` in\n{t}");
        }
    }

    /// R10.3/R10.4 counters of a fleet node's link, only when it has one.
    #[test]
    fn r10_3_r10_4_renders_fleet_link_counters_only_with_a_link() {
        let mut s = MetricsSnapshot {
            runtime: Some(RuntimeCounters::default()),
            ..Default::default()
        };
        assert!(!render(&s).contains("snatgw_fleet_"));
        if let Some(rt) = s.runtime.as_mut() {
            rt.fleet_link = Some(crate::backend::FleetLinkCounters {
                steered_out: 3,
                steered_in: 4,
                injected: 5,
                injected_dropped: 1,
                injected_refused: 2,
                journal_tapped: 40,
                journal_lost: 0,
            });
        }
        let t = render(&s);
        for want in [
            "snatgw_fleet_steered_packets_total{direction=\"outbound\"} 3",
            "snatgw_fleet_steered_packets_total{direction=\"inbound\"} 4",
            "snatgw_fleet_injected_packets_total{result=\"decided\"} 5",
            "snatgw_fleet_injected_packets_total{result=\"dropped\"} 1",
            "snatgw_fleet_injected_packets_total{result=\"refused\"} 2",
            "snatgw_fleet_replicated_changes_total 40",
            "snatgw_fleet_replication_lost_changes_total 0",
        ] {
            assert!(t.lines().any(|x| x == want), "missing `{want}` in\n{t}");
        }
    }

    #[test]
    fn renders_runtime_counters_only_when_present() {
        let none = render(&MetricsSnapshot::default());
        assert!(!none.contains("snatgw_packets_received"), "{none}");
        let mut s = MetricsSnapshot {
            runtime: Some(RuntimeCounters {
                private_rx_packets: 10,
                private_tx_packets: 7,
                public_rx_packets: 8,
                public_tx_packets: 9,
                lock_acquisitions: 20,
                lock_contended: 3,
                lock_wait_ns: 1_500_000_000,
                lock_held_ns: 250_000_000,
                fast_path: None,
                fleet_link: None,
                flow_state: None,
            }),
            ..Default::default()
        };
        let t = render(&s);
        for want in [
            "snatgw_packets_received_total{side=\"private\"} 10",
            "snatgw_packets_received_total{side=\"public\"} 8",
            "snatgw_packets_sent_total{side=\"private\"} 7",
            "snatgw_packets_sent_total{side=\"public\"} 9",
            "snatgw_lock_acquisitions_total 20",
            "snatgw_lock_contended_total 3",
            "snatgw_lock_wait_seconds_total 1.5",
            "snatgw_lock_held_seconds_total 0.25",
            "# TYPE snatgw_lock_wait_seconds_total counter",
        ] {
            assert!(t.lines().any(|x| x == want), "missing `{want}` in\n{t}");
        }
        assert!(!t.contains("snatgw_fastpath"), "{t}");
        if let Some(rt) = s.runtime.as_mut() {
            rt.fast_path = Some(crate::backend::FastPathCounters {
                installed: 5,
                removed: 2,
                install_failed: 1,
                skipped: 4,
                translated_out: 100,
                translated_in: 90,
                steered_out: 7,
                steered_in: 6,
                steer_passed_up: 1,
                link_translated: 11,
                link_passed_up: 4,
                link_dropped: 0,
            });
        }
        let t = render(&s);
        for want in [
            "snatgw_fastpath_flows_installed_total 5",
            "snatgw_fastpath_flows_removed_total 2",
            "snatgw_fastpath_install_failures_total 1",
            "snatgw_fastpath_flows_skipped_total 4",
            "snatgw_fastpath_packets_total{direction=\"outbound\"} 100",
            "snatgw_fastpath_packets_total{direction=\"inbound\"} 90",
            "snatgw_fastpath_steered_packets_total{direction=\"outbound\"} 7",
            "snatgw_fastpath_steered_packets_total{direction=\"inbound\"} 6",
            "snatgw_fastpath_steer_passed_up_total 1",
            "snatgw_fastpath_link_packets_total{result=\"translated\"} 11",
            "snatgw_fastpath_link_packets_total{result=\"passed_up\"} 4",
            "snatgw_fastpath_link_packets_total{result=\"dropped\"} 0",
            "# TYPE snatgw_fastpath_install_failures_total counter",
        ] {
            assert!(t.lines().any(|x| x == want), "missing `{want}` in\n{t}");
        }
    }
}
