//! Clients for the lab's servers (run inside instance namespaces by `snatgw-lab-server
//! client ...`), each producing one machine-readable [`ClientReport`].
//!
//! What it does: "which IP am I" over HTTP and DNS, TCP and UDP echo, and opening many
//! concurrent held TCP connections (port-exhaustion tests). Every network operation has a
//! time limit; failures are counted by error text, never fatal.
//!
//! What it does not do: retry (a failure is a data point), or print anything itself (the
//! binary prints the report as one JSON line).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::dns;

/// The result of one client command, printed as one JSON line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReport {
    /// Command name (`myip-http`, `tcp-echo`, `udp-echo`, `dns`, `hold`).
    pub cmd: String,
    /// Target `ip:port`.
    pub target: String,
    /// Operations that succeeded (requests, connections, datagrams, queries).
    pub ok: u64,
    /// Operations that failed.
    pub failed: u64,
    /// `ip:port` of this client as the server saw it, one per successful operation that
    /// reports it (HTTP, DNS TXT, hold greeting).
    #[serde(default)]
    pub seen: Vec<String>,
    /// Local `ip:port` used, in the same order as `seen` (HTTP, hold).
    #[serde(default)]
    pub local: Vec<String>,
    /// DNS: the A record of the last successful answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a: Option<String>,
    /// DNS: the TXT record of the last successful answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txt: Option<String>,
    /// Error text → count.
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    /// Wall time of the whole command, in milliseconds.
    pub elapsed_ms: u64,
}

impl ClientReport {
    fn new(cmd: &str, target: impl ToString) -> Self {
        ClientReport {
            cmd: cmd.into(),
            target: target.to_string(),
            ..Default::default()
        }
    }

    fn fail(&mut self, e: impl std::fmt::Display) {
        self.failed += 1;
        *self.errors.entry(e.to_string()).or_default() += 1;
    }

    fn finish(mut self, start: Instant) -> Self {
        self.elapsed_ms = start.elapsed().as_millis() as u64;
        self
    }

    /// Whether nothing failed and something succeeded.
    pub fn all_ok(&self) -> bool {
        self.failed == 0 && self.ok > 0
    }

    /// Addresses in `seen`, parsed (unparsable entries skipped).
    pub fn seen_addrs(&self) -> Vec<SocketAddrV4> {
        self.seen.iter().filter_map(|s| s.parse().ok()).collect()
    }

    /// IPs in `seen`.
    pub fn seen_ips(&self) -> Vec<Ipv4Addr> {
        self.seen_addrs().iter().map(|a| *a.ip()).collect()
    }

    /// Ports in `seen`.
    pub fn seen_ports(&self) -> Vec<u16> {
        self.seen_addrs().iter().map(|a| a.port()).collect()
    }
}

/// `count` sequential `GET /myip` requests; `seen` holds the answers.
pub fn myip_http(addr: SocketAddr, count: u64, timeout: Duration) -> ClientReport {
    let start = Instant::now();
    let mut r = ClientReport::new("myip-http", addr);
    for _ in 0..count {
        match http_get_myip(addr, timeout) {
            Ok((local, seen)) => {
                r.ok += 1;
                r.local.push(local);
                r.seen.push(seen);
            }
            Err(e) => r.fail(e),
        }
    }
    r.finish(start)
}

fn http_get_myip(addr: SocketAddr, timeout: Duration) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let local = s.local_addr()?.to_string();
    write!(
        s,
        "GET /myip HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("malformed HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "HTTP status {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok((local, body.trim().to_string()))
}

/// `count` sequential TCP connections, each sending `size` bytes and reading them back.
pub fn tcp_echo(addr: SocketAddr, count: u64, size: usize, timeout: Duration) -> ClientReport {
    let start = Instant::now();
    let mut r = ClientReport::new("tcp-echo", addr);
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    for _ in 0..count {
        let res = (|| -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            s.write_all(&payload)?;
            let mut back = vec![0u8; size];
            s.read_exact(&mut back)?;
            if back != payload {
                return Err(std::io::Error::other("echo mismatch"));
            }
            Ok(())
        })();
        match res {
            Ok(()) => r.ok += 1,
            Err(e) => r.fail(e),
        }
    }
    r.finish(start)
}

/// `count` datagrams of `size` bytes (at least 8) from one socket, each awaited up to
/// `timeout`.
pub fn udp_echo(addr: SocketAddr, count: u64, size: usize, timeout: Duration) -> ClientReport {
    let start = Instant::now();
    let mut r = ClientReport::new("udp-echo", addr);
    let sock = match UdpSocket::bind("0.0.0.0:0").and_then(|s| {
        s.connect(addr)?;
        s.set_read_timeout(Some(timeout))?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            r.fail(e);
            return r.finish(start);
        }
    };
    let size = size.max(8);
    let mut buf = vec![0u8; 65_536];
    for seq in 0..count {
        let mut msg: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        msg[..8].copy_from_slice(&seq.to_be_bytes());
        if let Err(e) = sock.send(&msg) {
            r.fail(e);
            continue;
        }
        let deadline = Instant::now() + timeout;
        let res = loop {
            match sock.recv(&mut buf) {
                Ok(n) if buf[..n] == msg[..] => break Ok(()),
                Ok(_) => {} // a late reply to an earlier datagram
                Err(e) => break Err(e),
            }
            if Instant::now() >= deadline {
                break Err(std::io::ErrorKind::TimedOut.into());
            }
        };
        match res {
            Ok(()) => r.ok += 1,
            Err(e) => r.fail(e),
        }
    }
    r.finish(start)
}

/// `count` DNS queries for `name` (type `qtype`) from fresh sockets; `a`/`txt` hold the last
/// answer, `seen` the TXT records (`ip:port`).
pub fn dns_myip(
    server: SocketAddr,
    name: &str,
    qtype: u16,
    count: u64,
    timeout: Duration,
) -> ClientReport {
    let start = Instant::now();
    let mut r = ClientReport::new("dns", server);
    let mut q = Vec::new();
    let mut buf = [0u8; 1500];
    for i in 0..count {
        let id = (start.elapsed().as_nanos() as u16) ^ (i as u16).wrapping_mul(7919);
        let res = (|| -> std::io::Result<dns::Response> {
            dns::build_query(id, name, qtype, &mut q).map_err(std::io::Error::other)?;
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(server)?;
            s.set_read_timeout(Some(timeout))?;
            s.send(&q)?;
            let deadline = Instant::now() + timeout;
            loop {
                let n = s.recv(&mut buf)?;
                match dns::parse_response(&buf[..n]) {
                    Ok(resp) if resp.id == id => return Ok(resp),
                    _ if Instant::now() >= deadline => {
                        return Err(std::io::Error::other("no matching answer"))
                    }
                    _ => {}
                }
            }
        })();
        match res {
            Ok(resp) if resp.rcode == dns::RCODE_NOERROR && !resp.records.is_empty() => {
                r.ok += 1;
                for rec in resp.records {
                    match rec {
                        dns::RData::A(ip) => r.a = Some(ip.to_string()),
                        dns::RData::Txt(t) => {
                            r.seen.push(t.clone());
                            r.txt = Some(t);
                        }
                    }
                }
            }
            Ok(resp) => r.fail(format!(
                "rcode {} with {} records",
                resp.rcode,
                resp.records.len()
            )),
            Err(e) => r.fail(e),
        }
    }
    r.finish(start)
}

/// A held connection: the stream, its local address, the greeting (`ip:port` seen).
type Held = (TcpStream, String, String);

/// Opens `count` TCP connections to a hold server (up to 64 connecting at once), reads each
/// greeting (`ip:port` the server saw), calls `report` with the result while all
/// successful connections are still open, keeps them open for `hold_for`, then closes them.
pub fn hold(
    addr: SocketAddr,
    count: u64,
    timeout: Duration,
    hold_for: Duration,
    report: impl FnOnce(&ClientReport),
) -> ClientReport {
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<std::io::Result<Held>>> = Mutex::new(Vec::with_capacity(count as usize));
    let workers = (count as usize).clamp(1, 64);
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| loop {
                if next.fetch_add(1, Ordering::Relaxed) >= count as usize {
                    return;
                }
                let res = (|| -> std::io::Result<Held> {
                    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
                    s.set_read_timeout(Some(timeout))?;
                    let local = s.local_addr()?.to_string();
                    let mut line = Vec::with_capacity(32);
                    let mut b = [0u8; 1];
                    while line.len() < 64 {
                        match s.read(&mut b)? {
                            0 => return Err(std::io::Error::other("closed before greeting")),
                            _ if b[0] == b'\n' => break,
                            _ => line.push(b[0]),
                        }
                    }
                    Ok((s, local, String::from_utf8_lossy(&line).into_owned()))
                })();
                results.lock().unwrap_or_else(|e| e.into_inner()).push(res);
            });
        }
    });
    let mut r = ClientReport::new("hold", addr);
    let mut streams = Vec::new();
    for res in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
        match res {
            Ok((s, local, seen)) => {
                r.ok += 1;
                r.local.push(local);
                r.seen.push(seen);
                streams.push(s);
            }
            Err(e) => r.fail(e),
        }
    }
    let r = r.finish(start);
    report(&r);
    std::thread::sleep(hold_for);
    drop(streams);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_json_roundtrip_and_helpers() {
        let mut r = ClientReport::new("hold", "203.0.113.100:9000");
        r.ok = 2;
        r.seen = vec!["203.0.113.10:1024".into(), "203.0.113.10:1025".into()];
        r.fail("timed out");
        r.fail("timed out");
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        let back: ClientReport = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.seen_ports(), vec![1024, 1025]);
        assert_eq!(back.seen_ips(), vec![Ipv4Addr::new(203, 0, 113, 10); 2]);
        assert_eq!(back.errors["timed out"], 2);
        assert!(!back.all_ok());
    }

    #[test]
    fn unreachable_target_fails_within_timeout() {
        // Nothing listens on port 1 of the loopback: the connection is refused at once.
        let t = Instant::now();
        let r = tcp_echo(
            "127.0.0.1:1".parse().unwrap(),
            1,
            10,
            Duration::from_millis(300),
        );
        assert_eq!((r.ok, r.failed), (0, 1));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
