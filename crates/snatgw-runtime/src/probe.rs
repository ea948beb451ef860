//! The health prober of `snatgw run` (SPEC R5.2, R4.5): performs the load balancers' probes
//! for real and feeds the results to the engine, which decides up/down.
//!
//! What it does: one thread re-reads the engine's probe targets every second (so API changes
//! take effect) and, per (probe, member), every `interval_secs`:
//! 1. asks the engine whether the member's NSGs let a probe from tag `AzureLoadBalancer`
//!    (source 168.63.129.16, `snatgw_core::policy::PROBE_SOURCE`) reach the probe port. The
//!    gateway enforces NSGs, not the instance's kernel, so a denied probe is not sent and
//!    counts as a failure — as the cloud host drops it;
//! 2. otherwise runs the probe from the gateway host (its own private-side address, not
//!    through the TUN): a TCP connect, or `GET <path>` answered by status `200`, with a
//!    timeout of the interval capped at 5 s;
//! 3. feeds the result to [`snatgw_core::Engine::probe_result`]; a member's change of state
//!    is an engine event (`probe_down` / `probe_up`), logged and listed like the others.
//!
//! Each probe runs on its own short-lived thread, at most one in flight per (probe, member),
//! so a member that does not answer never delays the others. What it does not do: decide
//! health (the engine does, with the threshold) or touch packets.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snatgw_core::config::ProbeProtocol;
use snatgw_core::engine::ProbeTarget;
use snatgw_dataplane::Gateway;

/// Identity of a probed member: (load balancer, probe, member).
type Key = (String, String, Arc<str>);

/// Starts the prober thread. `now` gives engine time; the thread ends when `stopped` is true.
pub fn spawn(
    gw: Arc<Mutex<Gateway>>,
    now: impl Fn() -> u32 + Send + 'static,
    stopped: impl Fn() -> bool + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("prober".into())
        .spawn(move || run(&gw, &now, &stopped))
}

fn lock(gw: &Mutex<Gateway>) -> std::sync::MutexGuard<'_, Gateway> {
    gw.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(gw: &Mutex<Gateway>, now: &dyn Fn() -> u32, stopped: &dyn Fn() -> bool) {
    let (tx, rx) = mpsc::channel::<(Key, bool)>();
    let mut due: HashMap<Key, Instant> = HashMap::new();
    let mut in_flight: HashMap<Key, ()> = HashMap::new();
    let mut targets: Vec<ProbeTarget> = Vec::new();
    let mut refreshed: Option<Instant> = None;
    while !stopped() {
        if refreshed.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            refreshed = Some(Instant::now());
            targets = lock(gw).engine().probe_targets();
            due.retain(|k, _| targets.iter().any(|t| key(t) == *k));
        }
        for t in &targets {
            let k = key(t);
            if in_flight.contains_key(&k) {
                continue;
            }
            let at = *due.entry(k.clone()).or_insert_with(Instant::now);
            if at > Instant::now() {
                continue;
            }
            due.insert(k.clone(), at + Duration::from_secs(u64::from(t.interval)));
            // R4.5: the NSG decides first; a blocked probe is a failure that is never sent.
            let permitted = lock(gw).engine_mut().probe_permitted(t.addr, t.port);
            if !permitted {
                let _ = tx.send((k, false));
                continue;
            }
            in_flight.insert(k.clone(), ());
            let (tx2, t, k2) = (tx.clone(), t.clone(), k.clone());
            let spawned = std::thread::Builder::new()
                .name("probe".into())
                .spawn(move || {
                    let ok = probe_once(&t);
                    let _ = tx2.send((k2, ok));
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a probe thread; probe counted as failed");
                in_flight.remove(&k);
                let _ = tx.send((k, false));
            }
        }
        let first = rx.recv_timeout(Duration::from_millis(100)).ok();
        let results: Vec<(Key, bool)> = first.into_iter().chain(rx.try_iter()).collect();
        for (k, ok) in results {
            in_flight.remove(&k);
            // A change of state becomes an engine event (`probe_up` / `probe_down`), which
            // the housekeeping loop logs and the API lists (R6.2).
            let _ = lock(gw)
                .engine_mut()
                .probe_result(now(), &k.0, &k.1, &k.2, ok);
        }
    }
}

fn key(t: &ProbeTarget) -> Key {
    (t.lb.clone(), t.probe.clone(), t.member.clone())
}

/// Performs one probe of `t`: TCP connect, or HTTP GET answered by `200`.
pub fn probe_once(t: &ProbeTarget) -> bool {
    let timeout = Duration::from_secs(u64::from(t.interval.clamp(1, 5)));
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(t.addr), t.port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    match t.protocol {
        ProbeProtocol::Tcp => true,
        ProbeProtocol::Http => {
            let _ = s.set_read_timeout(Some(timeout));
            let _ = s.set_write_timeout(Some(timeout));
            let req = format!(
                "GET {} HTTP/1.0\r\nHost: {}:{}\r\nUser-Agent: snatgw-probe\r\nConnection: close\r\n\r\n",
                t.path,
                Ipv4Addr::from(t.addr),
                t.port
            );
            if s.write_all(req.as_bytes()).is_err() {
                return false;
            }
            read_response(&mut s, Instant::now() + timeout)
        }
        // A protocol this prober cannot speak never answers healthy.
        _ => false,
    }
}

/// Most of a probe's answer read (status line, headers, body); the rest is not waited for.
const MAX_PROBE_ANSWER: usize = 64 << 10;

/// Reads an HTTP answer to its end (the server closes: `Connection: close`, HTTP/1.0), at
/// most [`MAX_PROBE_ANSWER`] bytes and until `deadline`, and says whether its status is
/// 200. Reading to the end before closing matters: closing a socket with unread data sends
/// a TCP reset, and the member's server logs every probe as a broken connection (issue #21).
fn read_response(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 4096];
    let mut total = 0usize;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || total >= MAX_PROBE_ANSWER {
            break;
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                total += k;
                if head.len() < 64 {
                    let take = k.min(64 - head.len());
                    head.extend_from_slice(&buf[..take]);
                }
            }
            Err(_) => break,
        }
    }
    // Our side is done: a FIN, not a reset, even if the server still had something to say.
    let _ = s.shutdown(std::net::Shutdown::Write);
    status_is_200(&head)
}

/// Whether a response starts with an HTTP status line of code 200.
fn status_is_200(head: &[u8]) -> bool {
    let s = String::from_utf8_lossy(head);
    let mut parts = s.split_ascii_whitespace();
    matches!(parts.next(), Some(v) if v.starts_with("HTTP/1.")) && parts.next() == Some("200")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A member's HTTP server that answers `status` with a 32 KiB body, then reads: a clean
    /// close by the prober is end-of-file there, a close with unread data a reset.
    fn member(status: &str) -> (ProbeTarget, std::thread::JoinHandle<std::io::Result<usize>>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let status = status.to_string();
        let h = std::thread::spawn(move || {
            let (mut c, _) = l.accept()?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut req = [0u8; 1024];
            let _ = c.read(&mut req)?;
            c.write_all(format!("HTTP/1.0 {status}\r\nContent-Length: 32768\r\n\r\n").as_bytes())?;
            std::thread::sleep(Duration::from_millis(50));
            c.write_all(&[b'x'; 32768])?;
            c.shutdown(std::net::Shutdown::Write)?;
            let mut rest = [0u8; 16];
            c.read(&mut rest)
        });
        let t = ProbeTarget {
            lb: "lb".into(),
            probe: "p".into(),
            member: Arc::from("m"),
            addr: u32::from(Ipv4Addr::LOCALHOST),
            protocol: ProbeProtocol::Http,
            port,
            path: "/health".into(),
            interval: 5,
            threshold: 2,
        };
        (t, h)
    }

    #[test]
    fn r5_2_http_probe_reads_the_answer_and_closes_without_a_reset() {
        let (t, server) = member("200 OK");
        assert!(probe_once(&t), "a 200 is healthy");
        let end = server.join().expect("server thread");
        assert_eq!(
            end.expect("the member saw a reset, not a clean close"),
            0,
            "the member should read end-of-file"
        );
        let (t, server) = member("503 Service Unavailable");
        assert!(!probe_once(&t), "a 503 is not healthy");
        assert_eq!(server.join().expect("server").expect("clean close"), 0);
    }

    #[test]
    fn r5_2_only_status_200_is_healthy() {
        assert!(status_is_200(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_is_200(b"HTTP/1.0 200 OK\r\n"));
        assert!(!status_is_200(b"HTTP/1.1 204 No Content\r\n"));
        assert!(!status_is_200(b"HTTP/1.1 500 x\r\n"));
        assert!(!status_is_200(b"SSH-2.0-OpenSSH\r\n"));
        assert!(!status_is_200(b""));
    }
}
