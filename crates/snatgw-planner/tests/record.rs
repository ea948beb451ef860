//! The recorder's conversion against the engine itself: a simulated gateway (the engine with
//! its journal on, driven like `snatgw run` drives it, TCP clients retransmitting the SYNs of
//! refused connections) is recorded with `TraceRecorder`; replaying the trace must count what
//! the engine counted — failed and successful SNAT connections (R6.1), the first exhaustion
//! event (R2.6) and the peak of used ports — with flows ending by FIN, RST and idle timeout
//! (R3.2–R3.4), whose releases decide when the retransmitted SYNs get through.

use std::fmt::Write as _;

use snatgw_core::config::ConfigFile;
use snatgw_core::{tcp_flags, Direction, Engine, EventKind, FlowChange, Packet, Topology, Verdict};
use snatgw_planner::{replay, Options, TraceRecorder, Workload};

fn set_of(n: u32) -> ConfigFile {
    let mut c = String::from(
        "[gateway]\nseed = 1\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"192.0.2.20\"]\nfin_timeout_secs = 20\nidle_timeout_secs = 30\n[[availability_set]]\nname = \"big\"\n",
    );
    for i in 0..n {
        let _ = write!(
            c,
            "[[instance]]\nname = \"b{i}\"\nprivate_ip = \"10.0.{}.{}\"\navailability_set = \"big\"\n",
            10 + i / 200,
            10 + i % 200
        );
    }
    ConfigFile::from_toml(&c).unwrap()
}

struct Conn {
    sport: u16,
    syn_at: Vec<u32>,
    open: Option<(u32, u16)>,
    end_at: u32,
    end: u8,
}

#[test]
fn recorded_flows_replay_to_the_gateways_counts() {
    let cfg = set_of(801); // 32 ports (R2.8)
    let mut e = Engine::new(Topology::from_config(cfg.clone()).unwrap(), 0).unwrap();
    e.set_journal(true);
    let src = u32::from(std::net::Ipv4Addr::new(10, 0, 10, 10));
    let dst = u32::from(std::net::Ipv4Addr::new(203, 0, 113, 100));
    // Two connections per second for 60 s; each holds 8 s then ends by FIN (most), RST
    // (every 5th) or silence (every 7th: idle timeout). A refused SYN is retransmitted 1, 3
    // and 7 s later (Linux's doubling RTO), then given up.
    let mut conns: Vec<Conn> = (0..120u32)
        .map(|k| Conn {
            sport: 30000 + k as u16,
            syn_at: [0, 1, 3, 7].iter().map(|d| k / 2 + d).collect(),
            open: None,
            end_at: 0,
            end: if k % 7 == 0 {
                2
            } else if k % 5 == 0 {
                1
            } else {
                0
            },
        })
        .collect();
    let mut rec = TraceRecorder::new();
    let mut text = TraceRecorder::header();
    let mut journal: Vec<FlowChange> = Vec::new();
    let params = e.topology().params;
    for now in 0..200u32 {
        e.advance(now);
        for c in conns.iter_mut() {
            if c.open.is_none() && c.syn_at.first() == Some(&now) {
                c.syn_at.remove(0);
                let v = e.process(
                    now,
                    Direction::Outbound,
                    &Packet::tcp(src, c.sport, dst, 9000, tcp_flags::SYN),
                );
                if let Verdict::Translate { addr, port } = v {
                    c.open = Some((addr, port));
                    c.end_at = now + 8;
                    c.syn_at.clear();
                }
            } else if let Some((addr, port)) = c.open {
                if now == c.end_at {
                    match c.end {
                        0 => {
                            let f = tcp_flags::FIN | tcp_flags::ACK;
                            e.process(
                                now,
                                Direction::Outbound,
                                &Packet::tcp(src, c.sport, dst, 9000, f),
                            );
                            e.process(
                                now,
                                Direction::Inbound,
                                &Packet::tcp(dst, 9000, addr, port, f),
                            );
                        }
                        1 => {
                            e.process(
                                now,
                                Direction::Inbound,
                                &Packet::tcp(dst, 9000, addr, port, tcp_flags::RST),
                            );
                        }
                        _ => {
                            e.process(
                                now,
                                Direction::Outbound,
                                &Packet::tcp(src, c.sport, dst, 9000, tcp_flags::ACK),
                            );
                        }
                    }
                }
            }
        }
        // As `snatgw run` does: drain once per tick, record.
        e.drain_journal(&mut journal);
        rec.write(&journal, &params, &mut text);
        journal.clear();
    }
    let gw = e.instance("b0").unwrap();
    let events = e.drain_events();
    let first = events
        .iter()
        .find_map(|ev| match ev.kind {
            EventKind::Exhaustion { .. } => Some(ev.since),
            _ => None,
        })
        .expect("the workload exhausts the 32 ports");
    assert!(gw.stats[0].conn_fail > 0);
    assert_eq!(rec.unmatched, 0);

    let w = Workload::from_trace_str(&text).unwrap();
    let r = replay(&cfg, &w, &Options::default()).unwrap();
    let i = &r.instances[0];
    assert_eq!(
        i.failed, gw.stats[0].conn_fail,
        "failed SNAT connections (R6.1)"
    );
    assert_eq!(i.ok, gw.stats[0].conn_ok);
    assert_eq!(i.first_exhaustion_s, Some(f64::from(first)));
    assert_eq!(i.peak_used[0], 32);
}
