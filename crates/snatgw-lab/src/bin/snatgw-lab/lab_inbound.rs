//! Step of `snatgw lab demo`: inbound load balancing and a health probe going down
//! (SPEC R5.1, R5.2, R4.5), made live through the management API.
//!
//! What it does: starts a small HTTP server on port 8080 in each member's namespace (threads
//! of this process, stopped when the step ends and by themselves after a minute), gives the
//! load balancer an HTTP probe and points its `http` rule (frontend port 80) at backend port
//! 8080 (`PUT /api/v1/loadBalancers/lb`), spreads connections from the internet over both
//! members, then associates an NSG with the second member that blocks tag
//! `AzureLoadBalancer` (`PUT /api/v1/networkSecurityGroups/...`): its probe goes down within
//! the threshold, new connections all go to the first member, and its own outbound traffic
//! still works. What it does not do: change anything outside the lab.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snatgw_core::config::{
    LoadBalancerCfg, NsgAccess, NsgCfg, NsgDirection, NsgProtocol, NsgRuleCfg, ProbeCfg,
    ProbeProtocol,
};

use crate::lab::{Running, SERVER_A};

/// Backend port of the members' HTTP servers.
const BACKEND: u16 = 8080;
/// Longest a member server lives.
const LIFETIME: Duration = Duration::from_secs(60);

/// A member's HTTP server: answers every request `200 <name>`, counts `/health` requests.
struct Member {
    stop: Arc<AtomicBool>,
    health: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Member {
    fn start(r: &Running, inst: &str) -> Result<Member, String> {
        let ip = r
            .lab
            .instance_ip(inst)
            .ok_or(format!("no instance {inst}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let health = Arc::new(AtomicU64::new(0));
        let (st, he, name) = (stop.clone(), health.clone(), inst.to_string());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = r
            .lab
            .spawn_thread_in(&r.lab.ns_name(inst), move || {
                let l = match TcpListener::bind((ip, BACKEND)) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = l.set_nonblocking(true);
                let _ = tx.send(Ok(()));
                let end = Instant::now() + LIFETIME;
                while !st.load(Ordering::Relaxed) && Instant::now() < end {
                    match l.accept() {
                        Ok((s, _)) => answer(s, &name, &he),
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| format!("{inst}: server did not start"))?
            .map_err(|e| format!("{inst}: {e}"))?;
        Ok(Member {
            stop,
            health,
            thread: Some(thread),
        })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request per connection (HTTP/1.0).
fn answer(mut s: TcpStream, name: &str, health: &AtomicU64) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 1024];
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => return,
            Ok(k) => n += k,
        }
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    if req.split_whitespace().nth(1) == Some("/health") {
        health.fetch_add(1, Ordering::Relaxed);
    }
    let body = format!("{name}\n");
    let _ = write!(
        s,
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

/// `n` connections from the internet to `frontend:80`; which member answered, how often.
fn spread(r: &Running, frontend: Ipv4Addr, n: usize) -> Result<BTreeMap<String, usize>, String> {
    r.lab
        .spawn_thread_in(&r.lab.inet_ns(), move || {
            let mut per = BTreeMap::new();
            for _ in 0..n {
                let got = (|| {
                    let mut s = TcpStream::connect_timeout(
                        &SocketAddrV4::new(frontend, 80).into(),
                        Duration::from_secs(2),
                    )
                    .ok()?;
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
                    let mut t = String::new();
                    s.read_to_string(&mut t).ok()?;
                    t.rsplit("\r\n\r\n").next().map(|b| b.trim().to_string())
                })();
                *per.entry(got.unwrap_or_else(|| "FAILED".into()))
                    .or_insert(0) += 1;
            }
            per
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "client thread panicked".to_string())
}

fn show(per: &BTreeMap<String, usize>) -> String {
    per.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The demo step; `number` is its heading's number.
pub fn step(r: &Running, number: u32) -> Result<(), String> {
    println!(
        "\n{number}. Inbound load balancing and a health probe going down (R5.1, R5.2, R4.5, R3.7)"
    );
    let mut lb: LoadBalancerCfg = r.api(|c| c.get::<LoadBalancerCfg>("lb"))?.value;
    let pool = lb
        .backend_pools
        .first()
        .ok_or("the load balancer has no pool")?
        .clone();
    let [m1, m2] = match pool.members.as_slice() {
        [a, b, ..] => [a.clone(), b.clone()],
        _ => return Err("the demo needs two pool members".into()),
    };
    let rule = lb
        .rules
        .iter_mut()
        .find(|x| x.frontend_port == 80)
        .ok_or("no rule on frontend port 80")?;
    rule.backend_port = BACKEND;
    rule.probe = Some("hp".into());
    let fe_name = rule.frontend.clone();
    let idle = rule.idle_timeout_minutes;
    lb.probes = vec![ProbeCfg {
        name: "hp".into(),
        protocol: ProbeProtocol::Http,
        port: BACKEND,
        path: Some("/health".into()),
        interval_secs: 1,
        unhealthy_threshold: 2,
    }];
    let pip = lb
        .frontends
        .iter()
        .find(|f| f.name == fe_name)
        .map(|f| f.public_ip.clone())
        .ok_or("frontend missing")?;
    let topo = r.api(|c| c.topology())?.value;
    let frontend: Ipv4Addr = topo
        .public_ip
        .iter()
        .find(|p| p.name == pip)
        .and_then(|p| p.address.parse().ok())
        .ok_or("frontend address missing")?;
    let members = [Member::start(r, &m1)?, Member::start(r, &m2)?];
    let put = r.api(move |c| c.put(&lb, None))?;
    println!(
        "  PUT /api/v1/loadBalancers/lb: rule {frontend}:80 -> pool:{BACKEND}, HTTP probe GET /health every 1 s, down after 2 failures, inbound idle timeout {idle} min -> generation {}",
        put.generation.unwrap_or(0)
    );
    let up = |r: &Running| -> Result<BTreeMap<String, bool>, String> {
        Ok(r.api(|c| c.lb_probes("lb"))?
            .into_iter()
            .map(|p| (p.member, p.up))
            .collect())
    };
    std::thread::sleep(Duration::from_millis(2500));
    println!(
        "  probes: {} ({} and {} GET /health requests answered 200)",
        show_state(&up(r)?),
        members[0].health.load(Ordering::Relaxed),
        members[1].health.load(Ordering::Relaxed)
    );
    let before = spread(r, frontend, 20)?;
    println!(
        "  20 connections from the internet to {frontend}:80 answered by: {}",
        show(&before)
    );

    let nsg = NsgCfg {
        name: "block-probe".into(),
        nics: vec![m2.clone()],
        subnets: Vec::new(),
        rules: vec![
            rule_cfg(
                "no-lb-probe",
                100,
                NsgAccess::Deny,
                "AzureLoadBalancer",
                "*",
            ),
            rule_cfg(
                "web-in",
                200,
                NsgAccess::Allow,
                "Internet",
                &BACKEND.to_string(),
            ),
        ],
    };
    let t = Instant::now();
    let put = r.api(move |c| c.put(&nsg, None))?;
    println!(
        "  PUT /api/v1/networkSecurityGroups/block-probe on {m2}: deny inbound from AzureLoadBalancer (priority 100), allow Internet -> {BACKEND} (200) -> generation {}",
        put.generation.unwrap_or(0)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let down = loop {
        let s = up(r)?;
        if s.get(&m2) == Some(&false) || Instant::now() >= deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let health_m2 = members[1].health.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1500));
    println!(
        "  probes after {:.1} s: {} (no probe reached {m2} since: {} GET /health before, {} now)",
        t.elapsed().as_secs_f64(),
        show_state(&down),
        health_m2,
        members[1].health.load(Ordering::Relaxed)
    );
    let after = spread(r, frontend, 20)?;
    println!("  20 new connections answered by: {}", show(&after));
    let out = r.client(&m2, &["myip-http", &SERVER_A.to_string()])?;
    println!(
        "  {m2}'s own outbound connection (R1.2: the probe does not matter): HTTP /myip saw {}",
        out.seen.first().map_or("FAILED", String::as_str)
    );
    match r.api(|c| c.metrics_text()) {
        Ok(text) => {
            for l in text.lines().filter(|l| {
                l.starts_with("snatgw_lb_probe_up")
                    || (l.starts_with("snatgw_nsg_rule_hits_total{nsg=\"block-probe\"")
                        && !l.ends_with(" 0"))
            }) {
                println!("  GET /metrics: {l}");
            }
        }
        Err(e) => println!("  GET /metrics: FAILED ({e})"),
    }
    drop(members);
    let ok = before.len() == 2
        && !before.contains_key("FAILED")
        && down.get(&m2) == Some(&false)
        && after.keys().all(|k| *k == m1)
        && out.all_ok();
    if ok {
        Ok(())
    } else {
        Err("inbound load balancing or the probe did not behave as expected".into())
    }
}

fn show_state(s: &BTreeMap<String, bool>) -> String {
    s.iter()
        .map(|(m, up)| format!("{m} {}", if *up { "up" } else { "DOWN" }))
        .collect::<Vec<_>>()
        .join(", ")
}

fn rule_cfg(name: &str, priority: u32, access: NsgAccess, src: &str, ports: &str) -> NsgRuleCfg {
    NsgRuleCfg {
        name: name.into(),
        priority,
        direction: NsgDirection::Inbound,
        access,
        protocol: if ports == "*" {
            NsgProtocol::Any
        } else {
            NsgProtocol::Tcp
        },
        sources: vec![src.into()],
        source_ports: vec!["*".into()],
        destinations: vec!["*".into()],
        destination_ports: vec![ports.into()],
    }
}
