//! Workload generators for the classic patterns of SNAT exhaustion (seeds 000/001, "Managing
//! SNAT exhaustion"; seed 002 for keepalives).
//!
//! - `http`: HTTP without connection reuse — request *i* opens a connection at *i / rate*,
//!   which closes with FIN both ways `request` seconds later (each request holds a port for
//!   the FIN delay, R3.2).
//! - `pool`: a pool of `conns` connections opened at the start and reused: requests at `rate`
//!   go round-robin over them as packets; the connections close with FIN at the end.
//! - `retry`: as `http`, and a refused attempt is retried after `delay` seconds, up to
//!   `retries` times, each next delay times `factor` (1: a retry storm without backoff, 2:
//!   exponential backoff).
//! - `idle`: `flows` long-lived connections opened in the first second, the application
//!   sending a message every `every` seconds; with `keepalive=K` the OS also sends a probe
//!   after K seconds of silence, then every K seconds (seed 002: K = 120), so the gateway's
//!   idle timeout (R3.4) never fires. They close with FIN at `duration`.
//!
//! A generator is written as `kind:key=value,...`, e.g.
//! `http:inst=vm1,dst=198.51.100.10:443,rate=10,duration=300`. This module only builds
//! [`Workload`]s; it does not replay them.

use std::net::SocketAddrV4;

use crate::error::PlanError;
use crate::mitigate::add_keepalives;
use crate::trace::{Dest, End, EvKind, FlowSpec, Retry, Workload};

/// A workload generator (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Generator {
    /// HTTP without connection reuse.
    Http {
        /// Instance.
        inst: String,
        /// Destination.
        dst: Dest,
        /// Requests per second.
        rate: f64,
        /// Seconds of requests.
        duration: f64,
        /// Seconds from a connection's open to its FIN both ways.
        request: f64,
    },
    /// A pool of reused connections.
    Pool {
        /// Instance.
        inst: String,
        /// Destination.
        dst: Dest,
        /// Connections in the pool.
        conns: u32,
        /// Requests per second.
        rate: f64,
        /// Seconds of requests.
        duration: f64,
        /// Seconds of one request.
        request: f64,
    },
    /// Requests without reuse whose refused attempts are retried.
    Retry {
        /// Instance.
        inst: String,
        /// Destination.
        dst: Dest,
        /// Requests per second.
        rate: f64,
        /// Seconds of requests.
        duration: f64,
        /// Seconds from open to FIN.
        request: f64,
        /// Retries after the first attempt.
        retries: u32,
        /// First retry delay, seconds.
        delay: f64,
        /// Delay multiplier (1: no backoff).
        factor: f64,
    },
    /// Long-lived, mostly idle connections.
    Idle {
        /// Instance.
        inst: String,
        /// Destination.
        dst: Dest,
        /// Connections.
        flows: u32,
        /// Seconds until they close.
        duration: f64,
        /// Seconds between application messages.
        every: f64,
        /// OS keepalive after this many idle seconds (seed 002: 120), if enabled.
        keepalive: Option<f64>,
    },
}

fn ms(s: f64) -> u64 {
    (s * 1000.0).round().max(0.0) as u64
}

/// Request times at `rate` per second for `duration` seconds, milliseconds: `floor(i·1000/rate)`.
fn request_times(rate: f64, duration: f64) -> impl Iterator<Item = u64> {
    let n = (rate * duration).round() as u64;
    (0..n).map(move |i| ((i as f64) * 1000.0 / rate).floor() as u64)
}

impl Generator {
    /// Builds the workload.
    pub fn workload(&self) -> Workload {
        let mut w = Workload::new();
        match self {
            Generator::Http {
                inst,
                dst,
                rate,
                duration,
                request,
            } => {
                let (i, d) = (w.instance(inst), w.dest(*dst));
                for t in request_times(*rate, *duration) {
                    let f = w.flow(spec(i, d, None));
                    w.push(t, f, EvKind::Open);
                    w.push(t + ms(*request), f, EvKind::Close(End::Fin));
                }
            }
            Generator::Retry {
                inst,
                dst,
                rate,
                duration,
                request,
                retries,
                delay,
                factor,
            } => {
                let (i, d) = (w.instance(inst), w.dest(*dst));
                let r = Retry {
                    max: *retries,
                    delay: *delay,
                    factor: *factor,
                };
                for t in request_times(*rate, *duration) {
                    let f = w.flow(spec(i, d, Some(r)));
                    w.push(t, f, EvKind::Open);
                    w.push(t + ms(*request), f, EvKind::Close(End::Fin));
                }
            }
            Generator::Pool {
                inst,
                dst,
                conns,
                rate,
                duration,
                request,
            } => {
                let (i, d) = (w.instance(inst), w.dest(*dst));
                let flows: Vec<u32> = (0..*conns).map(|_| w.flow(spec(i, d, None))).collect();
                for &f in &flows {
                    w.push(0, f, EvKind::Open);
                }
                for (k, t) in request_times(*rate, *duration).enumerate() {
                    let f = flows[k % flows.len()];
                    w.push(t, f, EvKind::Data);
                    w.push(t + ms(*request), f, EvKind::Data);
                }
                for &f in &flows {
                    w.push(ms(*duration), f, EvKind::Close(End::Fin));
                }
            }
            Generator::Idle {
                inst,
                dst,
                flows,
                duration,
                every,
                ..
            } => {
                let (i, d) = (w.instance(inst), w.dest(*dst));
                let end = ms(*duration);
                let step = ms(*every).max(1);
                for k in 0..*flows {
                    let f = w.flow(spec(i, d, None));
                    // Opened in the first second, spread evenly.
                    let t0 = u64::from(k) * 1000 / u64::from((*flows).max(1));
                    w.push(t0, f, EvKind::Open);
                    let mut t = t0 + step;
                    while t < end {
                        w.push(t, f, EvKind::Data);
                        t += step;
                    }
                    w.push(end, f, EvKind::Close(End::Fin));
                }
            }
        }
        w.sort();
        match self {
            Generator::Idle {
                keepalive: Some(k), ..
            } => add_keepalives(&w, ms(*k)),
            _ => w,
        }
    }

    /// Parses `kind:key=value,...` (see the module documentation).
    pub fn parse(s: &str) -> Result<Generator, PlanError> {
        let err = |m: String| PlanError::Generator(format!("`{s}`: {m}"));
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        let mut kv: Vec<(&str, &str)> = Vec::new();
        for part in rest.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| err(format!("`{part}` is not key=value")))?;
            kv.push((k.trim(), v.trim()));
        }
        let get = |k: &str| kv.iter().find(|(a, _)| *a == k).map(|(_, v)| *v);
        let num = |k: &str, def: Option<f64>| -> Result<f64, PlanError> {
            match get(k) {
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| err(format!("{k}: `{v}` is not a number >= 0"))),
                None => def.ok_or_else(|| err(format!("{k}: required"))),
            }
        };
        let allowed: &[&str] = match kind {
            "http" => &["inst", "dst", "proto", "rate", "duration", "request"],
            "pool" => &[
                "inst", "dst", "proto", "conns", "rate", "duration", "request",
            ],
            "retry" => &[
                "inst", "dst", "proto", "rate", "duration", "request", "retries", "delay", "factor",
            ],
            "idle" => &[
                "inst",
                "dst",
                "proto",
                "flows",
                "duration",
                "every",
                "keepalive",
            ],
            k => {
                return Err(err(format!(
                    "`{k}` is not a generator (http, pool, retry, idle)"
                )))
            }
        };
        if let Some((k, _)) = kv.iter().find(|(k, _)| !allowed.contains(k)) {
            return Err(err(format!(
                "{k}: not a parameter of `{kind}` (allowed: {})",
                allowed.join(", ")
            )));
        }
        let inst = get("inst")
            .ok_or_else(|| err("inst: required".into()))?
            .to_string();
        let dv = get("dst").ok_or_else(|| err("dst: required (ip:port)".into()))?;
        let sa: SocketAddrV4 = dv
            .parse()
            .map_err(|_| err(format!("dst: `{dv}` is not an IPv4 ip:port")))?;
        let dst = match get("proto").unwrap_or("tcp") {
            "tcp" => Dest::tcp(*sa.ip(), sa.port()),
            "udp" if kind == "idle" => {
                return Err(err(
                    "proto: idle flows are TCP (keepalives are TCP's)".into()
                ))
            }
            "udp" => Dest::udp(*sa.ip(), sa.port()),
            p => return Err(err(format!("proto: `{p}` is not tcp or udp"))),
        };
        let positive = |k: &str, v: f64| {
            if v > 0.0 {
                Ok(v)
            } else {
                Err(err(format!("{k}: must be > 0")))
            }
        };
        Ok(match kind {
            "http" => Generator::Http {
                inst,
                dst,
                rate: positive("rate", num("rate", None)?)?,
                duration: num("duration", None)?,
                request: num("request", Some(0.05))?,
            },
            "pool" => Generator::Pool {
                inst,
                dst,
                conns: positive("conns", num("conns", None)?)? as u32,
                rate: positive("rate", num("rate", None)?)?,
                duration: num("duration", None)?,
                request: num("request", Some(0.05))?,
            },
            "retry" => Generator::Retry {
                inst,
                dst,
                rate: positive("rate", num("rate", None)?)?,
                duration: num("duration", None)?,
                request: num("request", Some(0.05))?,
                retries: num("retries", Some(5.0))? as u32,
                delay: num("delay", Some(1.0))?,
                factor: {
                    let f = num("factor", Some(1.0))?;
                    if f < 1.0 {
                        return Err(err("factor: must be >= 1".into()));
                    }
                    f
                },
            },
            _ => Generator::Idle {
                inst,
                dst,
                flows: positive("flows", num("flows", None)?)? as u32,
                duration: num("duration", None)?,
                every: positive("every", num("every", Some(300.0))?)?,
                keepalive: match get("keepalive") {
                    Some(_) => Some(positive("keepalive", num("keepalive", None)?)?),
                    None => None,
                },
            },
        })
    }
}

fn spec(inst: u32, dest: u32, retry: Option<Retry>) -> FlowSpec {
    FlowSpec {
        inst,
        dest,
        sport: None,
        retry,
        refused: false,
    }
}
