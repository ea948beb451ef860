//! The lab's destination servers (run in the internet namespace by `snatgw-lab-server serve`).
//!
//! What it does, on each given address (std threads, bounded):
//! - TCP echo (port 7): echoes until the client closes; at most `max_conn_threads`
//!   concurrent connections per address (more are closed at once), 60 s idle limit;
//! - UDP echo (port 7): sends every datagram back to its sender;
//! - HTTP "which IP am I" (port 80): `GET /myip` answers `ip:port\n` of the peer it saw
//!   (R6.4), anything else 404; one request per connection;
//! - DNS (UDP 53): `myip.<zone>` type A answers the source IP it saw, with a TXT record
//!   `ip:port` in the additional section; type TXT answers the TXT; ANY both. Other names in
//!   the zone get NXDOMAIN, names outside REFUSED;
//! - TCP hold (port 9000): accepts, writes `ip:port\n` (the peer it saw), then keeps the
//!   connection open until the client closes it (one sweeper thread polls all held
//!   sockets, so thousands of connections cost no threads); at most `max_held` per address.
//!
//! What it does not do: stop (the process is killed by the lab), TLS, HTTP keep-alive,
//! DNS over TCP.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::dns;

/// Ports the servers listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// TCP and UDP echo.
    pub echo: u16,
    /// HTTP "which IP am I".
    pub http: u16,
    /// DNS (UDP).
    pub dns: u16,
    /// TCP hold.
    pub hold: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            echo: 7,
            http: 80,
            dns: 53,
            hold: 9000,
        }
    }
}

/// Server settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Addresses to listen on (must be local in the namespace).
    pub addrs: Vec<Ipv4Addr>,
    /// DNS zone: the responder answers `myip.<zone>`.
    pub zone: String,
    /// Ports.
    pub ports: Ports,
    /// Concurrent TCP echo / HTTP connection threads per address and service.
    pub max_conn_threads: usize,
    /// Held connections per address.
    pub max_held: usize,
    /// Log each request to stderr.
    pub verbose: bool,
}

impl ServerConfig {
    /// Defaults for `addrs`: zone `snatgw.test`, default ports, 256 threads, 100 000 held.
    pub fn new(addrs: Vec<Ipv4Addr>) -> Self {
        ServerConfig {
            addrs,
            zone: "snatgw.test".into(),
            ports: Ports::default(),
            max_conn_threads: 256,
            max_held: 100_000,
            verbose: false,
        }
    }
}

/// Binds every service on every address, calls `on_ready`, then serves until the process
/// ends. Returns only on a bind error (before `on_ready`).
pub fn serve(cfg: &ServerConfig, on_ready: impl FnOnce()) -> io::Result<()> {
    crate::raise_nofile_limit();
    let mut threads = Vec::new();
    let zone = cfg.zone.trim_end_matches('.').to_ascii_lowercase();
    for &addr in &cfg.addrs {
        let p = cfg.ports;
        let echo_tcp = TcpListener::bind((addr, p.echo))?;
        let echo_udp = UdpSocket::bind((addr, p.echo))?;
        let http = TcpListener::bind((addr, p.http))?;
        let dns_sock = UdpSocket::bind((addr, p.dns))?;
        let hold = TcpListener::bind((addr, p.hold))?;
        let (max, verbose) = (cfg.max_conn_threads, cfg.verbose);
        threads.push(spawn_named("echo-tcp", move || {
            accept_loop(echo_tcp, max, verbose, handle_echo)
        })?);
        threads.push(spawn_named("echo-udp", move || {
            udp_echo(echo_udp, verbose)
        })?);
        threads.push(spawn_named("http", move || {
            accept_loop(http, max, verbose, handle_http)
        })?);
        let z = zone.clone();
        threads.push(spawn_named("dns", move || dns_loop(dns_sock, &z, verbose))?);
        let held = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
        let h2 = held.clone();
        let max_held = cfg.max_held;
        threads.push(spawn_named("hold", move || {
            hold_accept(hold, h2, max_held, verbose)
        })?);
        threads.push(spawn_named("hold-sweep", move || hold_sweep(held))?);
    }
    on_ready();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn spawn_named(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
}

/// Decrements the live-connection count when a connection thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn accept_loop(l: TcpListener, max: usize, verbose: bool, handler: fn(TcpStream, SocketAddr)) {
    let live = Arc::new(AtomicUsize::new(0));
    loop {
        let (s, peer) = match l.accept() {
            Ok(x) => x,
            Err(e) => {
                if verbose {
                    eprintln!("accept: {e}");
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if live.fetch_add(1, Ordering::Relaxed) >= max {
            live.fetch_sub(1, Ordering::Relaxed);
            drop(s); // over the limit: close at once
            continue;
        }
        if verbose {
            eprintln!(
                "{} from {peer}",
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            );
        }
        let slot = Slot(live.clone());
        let spawned = std::thread::Builder::new().spawn(move || {
            let _slot = slot;
            handler(s, peer);
        });
        if spawned.is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn handle_echo(mut s: TcpStream, _peer: SocketAddr) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn handle_http(mut s: TcpStream, peer: SocketAddr) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let mut req = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&req);
    let mut parts = line.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method == "GET" && (path == "/myip" || path.starts_with("/myip?")) {
        ("200 OK", format!("{peer}\n"))
    } else {
        ("404 Not Found", "not found; try GET /myip\n".to_string())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes());
}

fn udp_echo(s: UdpSocket, verbose: bool) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match s.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if verbose {
                    eprintln!("udp echo {n} bytes from {peer}");
                }
                let _ = s.send_to(&buf[..n], peer);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Answers one DNS query from `peer`; `None` if nothing should be sent.
pub fn dns_answer(query: &[u8], peer: SocketAddr, zone: &str) -> Option<Vec<u8>> {
    let q = match dns::parse_query(query) {
        Ok(q) => q,
        Err(_) => return dns::build_error(query, dns::RCODE_FORMERR),
    };
    if (q.flags >> 11) & 0xf != 0 {
        return Some(dns::build_response(&q, query, dns::RCODE_NOTIMP, &[], &[]));
    }
    let myip = format!("myip.{zone}");
    let in_zone = q.name == zone || q.name.ends_with(&format!(".{zone}"));
    if q.name != myip {
        let rcode = if in_zone {
            dns::RCODE_NXDOMAIN
        } else {
            dns::RCODE_REFUSED
        };
        return Some(dns::build_response(&q, query, rcode, &[], &[]));
    }
    let ip = match peer.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => return None,
    };
    let a = dns::RData::A(ip);
    let txt = dns::RData::Txt(peer.to_string());
    let (answers, additional) = match (q.qclass, q.qtype) {
        (dns::CLASS_IN, dns::TYPE_A) => (vec![a], vec![txt]),
        (dns::CLASS_IN, dns::TYPE_TXT) => (vec![txt], vec![]),
        (dns::CLASS_IN, dns::TYPE_ANY) => (vec![a, txt], vec![]),
        _ => (vec![], vec![]),
    };
    Some(dns::build_response(
        &q,
        query,
        dns::RCODE_NOERROR,
        &answers,
        &additional,
    ))
}

fn dns_loop(s: UdpSocket, zone: &str, verbose: bool) {
    let mut buf = [0u8; 1500];
    loop {
        match s.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if verbose {
                    eprintln!("dns query from {peer}");
                }
                if let Some(resp) = dns_answer(&buf[..n], peer, zone) {
                    let _ = s.send_to(&resp, peer);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn hold_accept(l: TcpListener, held: Arc<Mutex<Vec<TcpStream>>>, max: usize, verbose: bool) {
    loop {
        let (mut s, peer) = match l.accept() {
            Ok(x) => x,
            Err(e) => {
                if verbose {
                    eprintln!("hold accept: {e}");
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
        if s.write_all(format!("{peer}\n").as_bytes()).is_err() || s.set_nonblocking(true).is_err()
        {
            continue;
        }
        let mut v = held.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() < max {
            v.push(s);
        } // else: over the limit, `s` is closed (after its greeting)
    }
}

fn hold_sweep(held: Arc<Mutex<Vec<TcpStream>>>) {
    let mut buf = [0u8; 512];
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let mut v = held.lock().unwrap_or_else(|e| e.into_inner());
        v.retain_mut(|s| loop {
            match s.read(&mut buf) {
                Ok(0) => return false, // closed by the client
                Ok(_) => continue,     // discard data
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false, // reset
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_answers() {
        let peer: SocketAddr = "203.0.113.10:4242".parse().unwrap();
        let mut q = Vec::new();
        dns::build_query(7, "myip.snatgw.test", dns::TYPE_A, &mut q).unwrap();
        let r = dns::parse_response(&dns_answer(&q, peer, "snatgw.test").unwrap()).unwrap();
        assert_eq!(r.rcode, 0);
        assert_eq!(
            r.records,
            vec![
                dns::RData::A(Ipv4Addr::new(203, 0, 113, 10)),
                dns::RData::Txt("203.0.113.10:4242".into())
            ]
        );
        dns::build_query(8, "other.snatgw.test", dns::TYPE_A, &mut q).unwrap();
        let r = dns::parse_response(&dns_answer(&q, peer, "snatgw.test").unwrap()).unwrap();
        assert_eq!(r.rcode, dns::RCODE_NXDOMAIN);
        dns::build_query(9, "example.com", dns::TYPE_A, &mut q).unwrap();
        let r = dns::parse_response(&dns_answer(&q, peer, "snatgw.test").unwrap()).unwrap();
        assert_eq!(r.rcode, dns::RCODE_REFUSED);
        let r = dns::parse_response(&dns_answer(&[1, 2, 3], peer, "snatgw.test").unwrap()).unwrap();
        assert_eq!(r.rcode, dns::RCODE_FORMERR);
    }

    #[test]
    fn servers_on_loopback() {
        // Unprivileged ports on 127.0.0.1 (host loopback, no configuration change).
        let cfg = ServerConfig {
            ports: Ports {
                echo: 47007,
                http: 47080,
                dns: 47053,
                hold: 47900,
            },
            ..ServerConfig::new(vec![Ipv4Addr::LOCALHOST])
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || serve(&cfg, move || tx.send(()).unwrap()));
        if rx.recv_timeout(Duration::from_secs(5)).is_err() {
            eprintln!("skipped: test ports busy");
            return;
        }
        let t = Duration::from_secs(2);
        let r = crate::client::myip_http("127.0.0.1:47080".parse().unwrap(), 1, t);
        assert_eq!(r.ok, 1, "{r:?}");
        assert!(r.seen[0].starts_with("127.0.0.1:"));
        assert_eq!(r.seen, r.local, "no NAT on loopback");
        let r = crate::client::tcp_echo("127.0.0.1:47007".parse().unwrap(), 3, 1000, t);
        assert_eq!((r.ok, r.failed), (3, 0), "{r:?}");
        let r = crate::client::udp_echo("127.0.0.1:47007".parse().unwrap(), 3, 100, t);
        assert_eq!((r.ok, r.failed), (3, 0), "{r:?}");
        let r = crate::client::dns_myip(
            "127.0.0.1:47053".parse().unwrap(),
            "myip.snatgw.test",
            dns::TYPE_A,
            1,
            t,
        );
        assert_eq!(r.ok, 1, "{r:?}");
        assert_eq!(r.a.as_deref(), Some("127.0.0.1"));
        let r = crate::client::hold(
            "127.0.0.1:47900".parse().unwrap(),
            20,
            t,
            Duration::ZERO,
            |_| {},
        );
        assert_eq!(r.ok, 20, "{r:?}");
        assert_eq!(r.seen.len(), 20);
    }
}
