//! Real sockets through `snatgw run`: network security groups (SPEC §4), inbound load
//! balancing (R5.1), health probes (R5.2, R4.5) and the inbound idle timeout (R3.7).
//! Root only (skipped with a message otherwise; SNATGW_REQUIRE_ROOT=1 makes it fail).
//!
//! The members' HTTP servers run on threads of this process inside the instances'
//! namespaces ([`Srv`]); they stop when dropped and by themselves after [`SRV_LIFETIME`], so
//! nothing outlives a failed test, and the lab (namespaces, gateway, lab servers) is torn
//! down by `Lab`'s drop.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const FE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const ILPIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Longest a member server thread lives, whatever happens.
const SRV_LIFETIME: Duration = Duration::from_secs(180);

/// ILPIP VM, two LB members (frontend 203.0.113.20:80 → 8080, HTTP probe every second,
/// threshold 3) and a PAT VM; `gateway_extra` goes into `[gateway]`, `extra` at the end.
fn config(gateway_extra: &str, extra: &str) -> String {
    format!(
        r#"
[gateway]
seed = 11
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.10"]
{gateway_extra}

[[public_ip]]
name = "pip-ilpip"
address = "203.0.113.10"
[[public_ip]]
name = "pip-fe"
address = "203.0.113.20"

[[instance]]
name = "ilpip"
private_ip = "10.0.1.10"
public_ip = "pip-ilpip"
[[instance]]
name = "web1"
private_ip = "10.0.2.10"
[[instance]]
name = "web2"
private_ip = "10.0.2.11"
[[instance]]
name = "pat"
private_ip = "10.0.3.10"

[[load_balancer]]
name = "lb"
frontends = [ {{ name = "fe", public_ip = "pip-fe" }} ]
backend_pools = [ {{ name = "web", members = ["web1", "web2"] }} ]
probes = [ {{ name = "hp", protocol = "http", port = 8080, path = "/health", interval_secs = 1, unhealthy_threshold = 3 }} ]
rules = [ {{ name = "http", frontend = "fe", protocol = "tcp", frontend_port = 80, backend_pool = "web", backend_port = 8080, probe = "hp" }} ]
{extra}
"#
    )
}

/// A small HTTP/1.1 server (keep-alive) on `ip:port` inside an instance's namespace: every
/// request is answered `200` with `<name> <peer ip>:<peer port>`; `/health` requests are
/// counted.
struct Srv {
    stop: Arc<AtomicBool>,
    health: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    h: Option<JoinHandle<()>>,
}

impl Srv {
    fn start(g: &GwLab, inst: &str, port: u16, name: &'static str) -> Srv {
        let ip = g.lab.instance_ip(inst).expect("instance ip");
        let stop = Arc::new(AtomicBool::new(false));
        let health = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let (st, he, rq) = (stop.clone(), health.clone(), requests.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let h = g
            .lab
            .spawn_thread_in(&g.lab.ns_name(inst), move || {
                let l = TcpListener::bind((ip, port)).expect("bind member server");
                l.set_nonblocking(true).unwrap();
                tx.send(()).unwrap();
                let end = Instant::now() + SRV_LIFETIME;
                let mut conns = Vec::new();
                while !st.load(Ordering::Relaxed) && Instant::now() < end {
                    match l.accept() {
                        Ok((s, peer)) => {
                            let (he, rq, st) = (he.clone(), rq.clone(), st.clone());
                            conns.push(std::thread::spawn(move || {
                                serve_conn(s, peer, name, &he, &rq, &st)
                            }));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                    conns.retain(|c: &JoinHandle<()>| !c.is_finished());
                }
                st.store(true, Ordering::Relaxed);
                for c in conns {
                    let _ = c.join();
                }
            })
            .expect("server thread");
        rx.recv_timeout(Duration::from_secs(5))
            .expect("member server listening");
        Srv {
            stop,
            health,
            requests,
            h: Some(h),
        }
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.h.take() {
            let _ = h.join();
        }
    }
}

fn serve_conn(
    s: TcpStream,
    peer: SocketAddr,
    name: &str,
    health: &AtomicU64,
    requests: &AtomicU64,
    stop: &AtomicBool,
) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let end = Instant::now() + SRV_LIFETIME;
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        // Request line, then headers up to the empty line.
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if !line.ends_with('\n') => continue,
            Ok(_) => {}
            Err(_) => continue,
        }
        if line.trim().is_empty() {
            line.clear();
            continue;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        line.clear();
        loop {
            let mut h = String::new();
            match r.read_line(&mut h) {
                Ok(0) => return,
                Ok(_) if h.trim().is_empty() && h.ends_with('\n') => break,
                Ok(_) => {}
                Err(_) if stop.load(Ordering::Relaxed) => return,
                Err(_) => {}
            }
        }
        if path == "/health" {
            health.fetch_add(1, Ordering::Relaxed);
        } else {
            requests.fetch_add(1, Ordering::Relaxed);
        }
        let body = format!("{name} {peer}\n");
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// One keep-alive HTTP client connection, opened from the internet namespace.
struct Conn {
    s: BufReader<TcpStream>,
}

impl Conn {
    fn open(dst: SocketAddrV4) -> std::io::Result<Conn> {
        let sock = TcpStream::connect_timeout(&SocketAddr::V4(dst), Duration::from_secs(2))?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Conn {
            s: BufReader::new(sock),
        })
    }
    /// `GET /` and the body, or `None` when no answer came.
    fn get(&mut self) -> Option<String> {
        self.s
            .get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: fe\r\n\r\n")
            .ok()?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if self.s.read_line(&mut h).ok()? == 0 {
                return None;
            }
            if h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().ok()?;
            }
        }
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).ok()?;
        Some(String::from_utf8_lossy(&body).trim().to_string())
    }
}

fn probe_of(s: &Value, member: &str) -> Value {
    s["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["member"] == member)
        .cloned()
        .unwrap_or_else(|| panic!("no probe state of {member}: {}", s["probes"]))
}

fn hits(s: &Value, nsg: &str, rule: &str) -> u64 {
    s["nsg_hits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["nsg"] == nsg && h["rule"] == rule)
        .map(|h| u(&h["hits"]))
        .unwrap_or_else(|| panic!("no rule {nsg}/{rule}"))
}

/// `n` new connections from the internet to the frontend, each with `per` requests; returns
/// the answers per connection.
fn spread(g: &GwLab, n: usize, per: usize) -> Vec<Vec<String>> {
    g.in_ns(&g.lab.inet_ns(), move || {
        (0..n)
            .map(|_| {
                let mut c = Conn::open(SocketAddrV4::new(FE, 80)).expect("connect to frontend");
                (0..per).map(|_| c.get().expect("answer")).collect()
            })
            .collect()
    })
}

#[test]
fn r4_1_r4_3_nsg_denies_an_outbound_destination_connect_fails_and_no_port_is_used() {
    if !root_or_skip() {
        return;
    }
    let cfg = config(
        "",
        r#"
[[nsg]]
name = "pat-nsg"
nics = ["pat"]
rules = [ { name = "no-server-b", priority = 100, direction = "outbound", access = "deny", protocol = "any", destinations = ["203.0.113.101"] } ]
"#,
    );
    let g = GwLab::start("ns", &cfg, Some(&["pat"]));
    let denied = g.client(
        "pat",
        &[
            "tcp-echo",
            &format!("{SERVER_B}:7"),
            "--count",
            "2",
            "--timeout",
            "1.5",
        ],
    );
    assert_eq!((denied.ok, denied.failed), (0, 2), "{denied:?}");
    assert!(
        g.wait(Duration::from_secs(3), |s| {
            let i = inst_of(s, "pat");
            u(&i["drops"]["nsg_denied"]) >= 2 && hits(s, "pat-nsg", "no-server-b") >= 2
        }),
        "denials counted: {}",
        g.inst("pat")
    );
    let i = g.inst("pat");
    assert_eq!(u(&i["used"]["tcp"]), 0, "no SNAT port used: {i}");
    assert_eq!(u(&i["flows"]["tcp"]), 0, "{i}");
    assert_eq!(u(&i["connections_ok"]["tcp"]), 0, "{i}");
    // Other destinations are allowed (AllowInternetOutBound) and do take a port.
    let ok = g.client(
        "pat",
        &["tcp-echo", &format!("{SERVER_A}:7"), "--count", "2"],
    );
    assert_eq!((ok.ok, ok.failed), (2, 0), "{ok:?}");
    assert!(g.wait(Duration::from_secs(3), |s| hits(
        s,
        "pat-nsg",
        "AllowInternetOutBound"
    ) >= 2));
    g.finish();
}

#[test]
fn r4_1_r4_4_nsg_allows_inbound_to_an_ilpip_on_one_port_only_nmap_sees_just_that_port() {
    if !root_or_skip() {
        return;
    }
    let cfg = config(
        "",
        r#"
[[nsg]]
name = "ilpip-nsg"
nics = ["ilpip"]
rules = [ { name = "ssh", priority = 100, direction = "inbound", access = "allow", protocol = "tcp", sources = ["Internet"], destination_ports = ["22"] } ]
"#,
    );
    let g = GwLab::start("nm", &cfg, Some(&["ilpip"]));
    let _servers: Vec<Srv> = [22, 80, 443, 8080]
        .into_iter()
        .map(|p| Srv::start(&g, "ilpip", p, "ilpip"))
        .collect();
    let out = g
        .lab
        .exec_timeout(
            &g.lab.inet_ns(),
            &[
                "nmap",
                "-Pn",
                "-n",
                "-sS",
                "-p",
                "22,80,443,8080",
                "--max-retries",
                "1",
                "--host-timeout",
                "60s",
                "-oG",
                "-",
                &ILPIP.to_string(),
            ],
            Duration::from_secs(90),
        )
        .expect("nmap ran (apt-get install nmap)");
    let text = String::from_utf8_lossy(&out.stdout);
    let ports = text
        .lines()
        .find_map(|l| l.split("Ports: ").nth(1))
        .unwrap_or_else(|| panic!("no Ports line in nmap output: {text}"))
        .to_string();
    let state = |p: u16| {
        ports
            .split(", ")
            .find(|e| e.starts_with(&format!("{p}/")))
            .and_then(|e| e.split('/').nth(1))
            .unwrap_or("?")
            .to_string()
    };
    assert_eq!(state(22), "open", "{ports}");
    for p in [80, 443, 8080] {
        assert_eq!(state(p), "filtered", "port {p}: {ports}");
    }
    // R4.4: the instance's own outbound connections get their answers through
    // DenyAllInBound.
    let r = g.client(
        "ilpip",
        &["myip-http", &SERVER_A.to_string(), "--count", "2"],
    );
    assert!(r.all_ok(), "{r:?}");
    let s = g.snapshot();
    assert!(hits(&s, "ilpip-nsg", "ssh") >= 1, "{}", s["nsg_hits"]);
    assert!(
        hits(&s, "ilpip-nsg", "DenyAllInBound") >= 3,
        "{}",
        s["nsg_hits"]
    );
    assert!(u(&inst_of(&s, "ilpip")["drops"]["nsg_denied"]) >= 3);
    g.finish();
}

#[test]
fn r5_1_r5_2_inbound_http_through_the_frontend_is_spread_over_two_members_and_sticky() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start("lb", &config("", ""), Some(&["web1", "web2"]));
    let w1 = Srv::start(&g, "web1", 8080, "web1");
    let w2 = Srv::start(&g, "web2", 8080, "web2");
    // The prober really probes both members (HTTP GET /health, 200); a probe sent before
    // the servers listened may have failed, below the threshold.
    let (h1, h2) = (w1.health.clone(), w2.health.clone());
    assert!(
        g.wait(Duration::from_secs(10), |s| {
            h1.load(Ordering::Relaxed) >= 2
                && h2.load(Ordering::Relaxed) >= 2
                && ["web1", "web2"].iter().all(|m| {
                    let p = probe_of(s, m);
                    p["up"] == true && u(&p["probes"]) >= 2 && u(&p["consecutive_failures"]) == 0
                })
        }),
        "both members probed up: {}",
        g.snapshot()["probes"]
    );
    let answers = spread(&g, 40, 3);
    let mut per = std::collections::BTreeMap::new();
    for conn in &answers {
        let member = conn[0].split(' ').next().unwrap().to_string();
        for a in conn {
            let mut it = a.split(' ');
            assert_eq!(
                it.next(),
                Some(member.as_str()),
                "sticky per connection: {conn:?}"
            );
            // The member sees the client's own address: no SNAT on inbound.
            let peer: SocketAddr = it.next().unwrap().parse().unwrap();
            assert!(!peer.ip().to_string().starts_with("10."), "{a}");
        }
        *per.entry(member).or_insert(0) += 1;
    }
    assert_eq!(per.len(), 2, "spread over both members: {per:?}");
    assert!(per.values().all(|&n| n >= 5), "{per:?}");
    assert_eq!(
        w1.requests.load(Ordering::Relaxed) + w2.requests.load(Ordering::Relaxed),
        120
    );
    let s = g.snapshot();
    for m in ["web1", "web2"] {
        assert_eq!(
            u(&inst_of(&s, m)["used"]["tcp"]),
            0,
            "inbound LB uses no SNAT port"
        );
    }
    drop((w1, w2));
    g.finish();
}

#[test]
fn r4_5_member_whose_nsg_blocks_the_probe_goes_down_gets_no_new_flows_outbound_still_works() {
    if !root_or_skip() {
        return;
    }
    let cfg = config(
        "",
        r#"
[[nsg]]
name = "web2-nsg"
nics = ["web2"]
rules = [
  { name = "no-probe", priority = 100, direction = "inbound", access = "deny", protocol = "any", sources = ["AzureLoadBalancer"] },
  { name = "http", priority = 200, direction = "inbound", access = "allow", protocol = "tcp", sources = ["Internet"], destination_ports = ["8080"] },
]
"#,
    );
    let g = GwLab::start("pr", &cfg, Some(&["web1", "web2"]));
    let started = Instant::now();
    let w1 = Srv::start(&g, "web1", 8080, "web1");
    let w2 = Srv::start(&g, "web2", 8080, "web2");
    // Threshold 3 at 1 s: down after the third blocked probe, about 2 s after start.
    let bound = Duration::from_secs(3 + 3);
    assert!(
        g.wait(bound, |s| probe_of(s, "web2")["up"] == false),
        "web2 down within the threshold: {}",
        g.snapshot()["probes"]
    );
    assert!(started.elapsed() <= bound + Duration::from_secs(1));
    let s = g.snapshot();
    assert!(u(&probe_of(&s, "web2")["consecutive_failures"]) >= 3);
    assert_eq!(probe_of(&s, "web1")["up"], true);
    assert!(hits(&s, "web2-nsg", "no-probe") >= 3);
    assert!(
        g.wait(Duration::from_secs(3), |s| s["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "probe_down" && e["instance"] == "web2")),
        "a probe_down event for web2: {}",
        g.snapshot()["events"]
    );
    // Blocked probes are never sent, as the cloud host drops them.
    assert_eq!(w2.health.load(Ordering::Relaxed), 0);
    assert!(w1.health.load(Ordering::Relaxed) >= 1);
    // No new inbound flow goes to web2.
    for conn in spread(&g, 30, 1) {
        assert!(conn[0].starts_with("web1 "), "{conn:?}");
    }
    assert_eq!(w2.requests.load(Ordering::Relaxed), 0);
    // Its outbound connectivity is untouched (R1.2: the probe does not matter for outbound).
    let r = g.client(
        "web2",
        &["tcp-echo", &format!("{SERVER_A}:7"), "--count", "3"],
    );
    assert_eq!((r.ok, r.failed), (3, 0), "{r:?}");
    let m = g.client("web2", &["myip-http", &SERVER_A.to_string()]);
    assert_eq!(
        m.seen_ips(),
        vec![FE],
        "web2 leaves from the frontend: {m:?}"
    );
    drop((w1, w2));
    g.finish();
}

#[test]
fn r3_7_inbound_idle_timeout_is_honoured() {
    if !root_or_skip() {
        return;
    }
    // The operator override in seconds (as for R3.4); the 4–30 minute values are checked to
    // the second by the engine's rule tests.
    let g = GwLab::start(
        "it",
        &config("inbound_idle_timeout_secs = 4", ""),
        Some(&["web1", "web2"]),
    );
    let _w1 = Srv::start(&g, "web1", 8080, "web1");
    let _w2 = Srv::start(&g, "web2", 8080, "web2");
    let (kept, expired) = g.in_ns(&g.lab.inet_ns(), || {
        let mut a = Conn::open(SocketAddrV4::new(FE, 80)).expect("connect");
        let mut b = Conn::open(SocketAddrV4::new(FE, 80)).expect("connect");
        let first = (a.get().expect("a"), b.get().expect("b"));
        // `a` stays active (2 s gaps < 4 s); `b` stays idle for 7 s.
        let mut kept = vec![first.0];
        for _ in 0..3 {
            std::thread::sleep(Duration::from_secs(2));
            kept.push(a.get().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_secs(1));
        (kept, b.get())
    });
    assert!(
        kept.iter()
            .all(|k| !k.is_empty() && k.split(' ').next() == kept[0].split(' ').next()),
        "{kept:?}"
    );
    assert_eq!(
        expired, None,
        "an idle connection past the inbound idle timeout is gone"
    );
    assert!(
        g.wait(Duration::from_secs(3), |s| u(
            &s["dataplane"]["drops"]["unsolicited_inbound"]
        ) >= 1),
        "its packets are dropped as unsolicited: {}",
        g.snapshot()["dataplane"]["drops"]
    );
    g.finish();
}
