//! Connection handling of the API server (issue #20): idle and header-read timeouts, the
//! connection cap with eviction of the longest-idle connection, the canned 503 when every
//! connection is busy, and the body budget. The real server on 127.0.0.1:0 over a
//! `GatewayBackend` and a real `Gateway`, driven by raw TCP clients so that the tests control
//! exactly what is sent and when.
//!
//! The tests run one at a time (a process-wide lock): client and server sockets share this
//! process's open-file limit.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use snatgw_control::api::MAX_BODY;
use snatgw_control::server::{open_file_limit, serve_with, ServerLimits, MAX_CONNECTIONS};
use snatgw_control::{MemoryStore, ServerHandle};
use snatgw_core::{ConfigFile, Topology};

mod common;
use common::{localhost, read_answer, Answer, Plane};

const TOKEN: &str = "s3cret-token";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const TOPOLOGY: &str = r#"
[gateway]
seed = 1
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100", "192.0.2.101"]

[[public_ip]]
name = "pip-ilpip"
address = "203.0.113.10"

[[instance]]
name = "vm-ilpip"
private_ip = "10.0.1.10"
public_ip = "pip-ilpip"

[[instance]]
name = "vm-a"
private_ip = "10.0.3.10"
"#;

/// Starts the control plane as `tests/api.rs` does; `None` limits: [`serve`] (the defaults).
fn start(limits: Option<ServerLimits>) -> ServerHandle {
    let plane = Plane::seed(TOPOLOGY, Arc::new(MemoryStore::new()));
    let backend = Arc::new(plane.backend());
    match limits {
        Some(l) => serve_with(localhost(), plane.control(backend, Some(TOKEN)), l).expect("serve"),
        None => plane.serve(backend, Some(TOKEN)),
    }
}

fn limits(max_connections: usize, header_read_timeout: Duration) -> ServerLimits {
    ServerLimits {
        max_connections,
        header_read_timeout,
        ..ServerLimits::default()
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    s
}

/// Sends a request on a fresh connection and reads the answer. A body goes with
/// `Expect: 100-continue`: it is only sent once the server asks for it, so an early answer
/// (413, 503) is read instead.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: bool,
    body: Option<&[u8]>,
) -> std::io::Result<Answer> {
    let mut s = connect(addr);
    send(&mut s, method, path, token, body)
}

fn send(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    token: bool,
    body: Option<&[u8]>,
) -> std::io::Result<Answer> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    if token {
        head.push_str(&format!("Authorization: Bearer {TOKEN}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if let Some(b) = body {
        let first = read_answer(s)?;
        if first.status != 100 {
            return Ok(first);
        }
        s.write_all(b)?;
    }
    read_answer(s)
}

/// Waits until the server closes `s` (EOF or reset): the time it took, or `None` if it was
/// still open after `max`.
fn wait_closed(s: &mut TcpStream, max: Duration) -> Option<Duration> {
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    while t.elapsed() < max {
        match s.read(&mut buf) {
            Ok(0) => return Some(t.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(t.elapsed()),
        }
    }
    None
}

/// Whether the server has closed `s`, without waiting.
fn is_closed(s: &TcpStream) -> bool {
    s.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 64];
    let r = match (&*s).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).expect("blocking");
    r
}

/// Opens `n` connections that send nothing; prints the slowest connect.
fn open_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut slowest = Duration::ZERO;
    let mut slow = 0;
    let v = (0..n)
        .map(|_| {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            slowest = slowest.max(t.elapsed());
            slow += usize::from(t.elapsed() > Duration::from_millis(200));
            s
        })
        .collect();
    println!("{n} connects: slowest {slowest:?}, {slow} over 200 ms");
    v
}

/// Waits (bounded) until `cond` holds.
fn eventually(max: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < max {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A fresh client's `GET /healthz` and authenticated `GET /api/v1/topology`: both must
/// answer 200; returns their latencies.
fn fresh_client_is_served(addr: SocketAddr) -> (Duration, Duration) {
    let t = Instant::now();
    let a = request(addr, "GET", "/healthz", false, None).expect("healthz answers");
    let health = t.elapsed();
    assert_eq!(a.status, 200, "{a:?}");
    let t = Instant::now();
    let a = request(addr, "GET", "/api/v1/topology", true, None).expect("topology answers");
    let topo = t.elapsed();
    assert_eq!(a.status, 200, "{a:?}");
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("topology JSON");
    assert!(v.get("instance").is_some(), "{v}");
    (health, topo)
}

#[test]
fn idle_and_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let _g = serial();
    let server = start(Some(limits(100, Duration::from_secs(1))));
    let addr = server.local_addr();

    // A connection that never sends anything.
    let mut silent = connect(addr);
    // A keep-alive connection after one answered request.
    let mut kept = connect(addr);
    let a = send(&mut kept, "GET", "/healthz", false, None).expect("healthz");
    assert_eq!(a.status, 200);
    assert_ne!(a.header("connection"), Some("close"), "kept alive");

    let t = wait_closed(&mut kept, Duration::from_secs(5)).expect("idle keep-alive closed");
    println!("keep-alive connection closed after {t:?} idle");
    assert!(t >= Duration::from_millis(700), "closed too early: {t:?}");
    let t = wait_closed(&mut silent, Duration::from_secs(5)).expect("silent closed");
    assert!(t <= Duration::from_secs(3), "{t:?}");
    assert!(eventually(Duration::from_secs(2), || server
        .open_connections()
        == 0));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn a_half_sent_head_is_closed_after_the_header_read_timeout() {
    let _g = serial();
    let server = start(Some(limits(100, Duration::from_secs(1))));
    let addr = server.local_addr();
    let mut s = connect(addr);
    let t = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    // Trickling more header lines does not extend the deadline.
    let mut closed = None;
    for i in 0..20 {
        if s.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
            .is_err()
        {
            closed = Some(t.elapsed());
            break;
        }
        if wait_closed(&mut s, Duration::from_millis(250)).is_some() {
            closed = Some(t.elapsed());
            break;
        }
    }
    let closed = closed.expect("the slow head was cut");
    println!("half-sent head closed after {closed:?}");
    assert!(closed >= Duration::from_millis(700), "{closed:?}");
    assert!(closed <= Duration::from_secs(3), "{closed:?}");

    // A request in flight is not timed by it: a 3 s long-poll with a 1 s header timeout.
    let t = Instant::now();
    let a = request(addr, "GET", "/api/v1/events?wait=3", true, None).expect("long-poll");
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    server.shutdown().expect("clean shutdown");
}

#[test]
fn at_the_cap_a_fresh_client_is_served_by_evicting_the_longest_idle() {
    let _g = serial();
    let cap = 200;
    let server = start(Some(limits(cap, Duration::from_secs(30))));
    let addr = server.local_addr();
    assert_eq!(server.connection_cap(), cap);
    let idle = open_idle(addr, 2 * cap);
    assert!(
        eventually(Duration::from_secs(5), || {
            idle.iter().filter(|s| is_closed(s)).count() >= cap
        }),
        "the {cap} oldest idle connections are closed to make room"
    );
    // The oldest ones went first.
    assert!(idle[..cap / 2].iter().all(is_closed));
    assert!(server.open_connections() <= cap);
    let (health, topo) = fresh_client_is_served(addr);
    println!(
        "cap {cap}, {} idle clients: /healthz {health:?}, /api/v1/topology {topo:?}",
        2 * cap
    );
    assert!(health < Duration::from_secs(2) && topo < Duration::from_secs(2));
    assert!(server.open_connections() <= cap);
    drop(idle);
    server.shutdown().expect("clean shutdown");
}

#[test]
fn a_long_poll_in_flight_is_not_evicted_at_the_cap() {
    let _g = serial();
    let cap = 50;
    let server = start(Some(limits(cap, Duration::from_secs(30))));
    let addr = server.local_addr();
    let poll = std::thread::spawn(move || {
        let t = Instant::now();
        let a = request(addr, "GET", "/api/v1/events?wait=3", true, None);
        (a, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300)); // the long-poll is the oldest connection
    let idle = open_idle(addr, 4 * cap);
    assert!(eventually(Duration::from_secs(5), || {
        idle.iter().filter(|s| is_closed(s)).count() >= 3 * cap
    }));
    let (health, topo) = fresh_client_is_served(addr);
    println!("long-poll in flight at the cap: /healthz {health:?}, /api/v1/topology {topo:?}");
    let (a, took) = poll.join().expect("long-poll thread");
    let a = a.expect("the long-poll was answered, not cut");
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body, "[]");
    assert!(took >= Duration::from_millis(2500), "{took:?}");
    drop(idle);
    server.shutdown().expect("clean shutdown");
}

#[test]
fn when_every_connection_is_busy_a_new_one_gets_a_json_503() {
    let _g = serial();
    let cap = 3;
    let server = start(Some(limits(cap, Duration::from_secs(30))));
    let addr = server.local_addr();
    let polls: Vec<_> = (0..cap)
        .map(|_| {
            std::thread::spawn(move || {
                request(addr, "GET", "/api/v1/events?wait=2", true, None).map(|a| a.status)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    let a = request(addr, "GET", "/healthz", false, None).expect("an answer");
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.header("connection"), Some("close"));
    assert_eq!(a.header("retry-after"), Some("1"));
    let e = a.error();
    assert!(e.error.contains("connection limit"), "{e:?}");
    assert_eq!((e.field, e.rule), (None, None));
    for p in polls {
        assert_eq!(p.join().expect("thread").expect("long-poll answered"), 200);
    }
    assert!(eventually(Duration::from_secs(3), || {
        request(addr, "GET", "/healthz", false, None).is_ok_and(|a| a.status == 200)
    }));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn ten_thousand_idle_connections_against_the_default_limits() {
    let _g = serial();
    let server = start(None);
    let addr = server.local_addr();
    let cap = server.connection_cap();
    let soft = open_file_limit().unwrap_or(u64::MAX);
    assert_eq!(cap as u64, (MAX_CONNECTIONS as u64).min(soft / 2));
    // Client and server share this process's descriptors: keep 500 spare.
    let room = usize::try_from(soft).unwrap_or(usize::MAX) - cap - 500;
    let n = room.min(10_000);
    if n < 2 * cap {
        println!("skipped: ulimit -n {soft} leaves room for {n} clients only");
        return;
    }
    let t = Instant::now();
    let idle = open_idle(addr, n);
    println!("{n} idle connections opened in {:?}", t.elapsed());
    assert!(eventually(Duration::from_secs(10), || {
        idle.iter().filter(|s| is_closed(s)).count() >= n - cap
    }));
    assert!(server.open_connections() <= cap);
    let (health, topo) = fresh_client_is_served(addr);
    println!(
        "cap {cap} (ulimit -n {soft}), {n} idle clients: /healthz {health:?}, \
         /api/v1/topology {topo:?}"
    );
    assert!(health < Duration::from_secs(2) && topo < Duration::from_secs(2));
    drop(idle);
    server.shutdown().expect("clean shutdown");
}

fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    l.split_whitespace().next()?.parse().ok()
}

/// A topology body of just under `size` bytes that is valid JSON and parses in full, but is
/// refused (instances outside `vnet_prefixes`).
fn big_topology_body(size: usize) -> Vec<u8> {
    let file = ConfigFile::from_toml(TOPOLOGY).expect("parse");
    let mut v = serde_json::to_value(&file).expect("to JSON");
    let proto = v["instance"][1].clone();
    let list = v["instance"].as_array_mut().expect("instances");
    let mut i = 0u32;
    let mut len = serde_json::to_vec(&list).expect("len").len();
    while len + (64 << 10) < size {
        let mut inst = proto.clone();
        inst["name"] = format!("vm-big-{i}").into();
        inst["private_ip"] = format!("172.16.{}.{}", (i >> 8) & 255, i & 255).into();
        len += serde_json::to_vec(&inst).expect("len").len() + 1;
        list.push(inst);
        i += 1;
    }
    let mut body = serde_json::to_vec(&v).expect("body");
    assert!(body.len() < size, "{} >= {size}", body.len());
    body.resize(size - 1, b' ');
    body
}

#[test]
fn concurrent_large_bodies_get_json_answers_within_the_budget() {
    let _g = serial();
    let server = start(None);
    let addr = server.local_addr();
    let body = Arc::new(big_topology_body(MAX_BODY));
    // Reset the peak RSS, so VmHWM is this test's peak.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = vm_hwm_kib();
    let t = Instant::now();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || request(addr, "PUT", "/api/v1/topology", true, Some(&body)))
        })
        .collect();
    let mut statuses = Vec::new();
    for th in threads {
        let a = th.join().expect("thread").expect("an answer, not a hang");
        assert!(
            matches!(a.status, 400 | 409 | 413 | 503),
            "status {}: {}",
            a.status,
            a.body
        );
        a.error();
        if a.status == 503 {
            assert_eq!(a.header("retry-after"), Some("1"));
        }
        statuses.push(a.status);
    }
    let took = t.elapsed();
    let after = vm_hwm_kib();
    statuses.sort_unstable();
    println!(
        "16 x {} B bodies in {took:?}: statuses {statuses:?}; VmHWM {before:?} -> {after:?} KiB \
         (body itself {} KiB)",
        body.len(),
        body.len() >> 10
    );
    assert!(statuses.contains(&400), "some bodies were read and refused");
    assert!(took < Duration::from_secs(60));

    // Over the cap: 413 with the JSON body, before the body is sent.
    let over = vec![b' '; MAX_BODY + 1];
    let a = request(addr, "PUT", "/api/v1/topology", true, Some(&over)).expect("answer");
    assert_eq!(a.status, 413, "{a:?}");
    let e = a.error();
    assert!(e.error.contains("larger than"), "{e:?}");
    assert_eq!((e.field, e.rule), (None, None));
    // And the API still works.
    fresh_client_is_served(addr);
    server.shutdown().expect("clean shutdown");
}

#[test]
fn a_1000_instance_topology_is_far_below_the_body_cap() {
    let mut t = String::from(TOPOLOGY);
    for i in 0..1000u32 {
        t.push_str(&format!(
            "\n[[instance]]\nname = \"web-{i}\"\nprivate_ip = \"10.0.{}.{}\"\n",
            10 + i / 250,
            1 + i % 250
        ));
    }
    let file = ConfigFile::from_toml(&t).expect("parse");
    Topology::from_config(file.clone()).expect("a valid topology");
    let len = serde_json::to_vec(&file).expect("JSON").len();
    println!("a 1000-instance topology is {len} bytes of JSON; MAX_BODY is {MAX_BODY}");
    assert!(len * 8 < MAX_BODY, "{len}");
}

const EMFILE_CHILD: &str = "SNATGW_TEST_EMFILE_CHILD";
/// Descriptors the child leaves free for the server's connections.
const EMFILE_FREE: usize = 8;

/// Not a test by itself: the server process of
/// `accept_errors_back_off_without_spinning_and_recover` (started with `ulimit -n 64` and
/// the `EMFILE_CHILD` variable); returns at once otherwise.
#[test]
fn emfile_server_child() {
    if std::env::var_os(EMFILE_CHILD).is_none() {
        return;
    }
    let server = start(None);
    println!("PORT {}", server.local_addr().port());
    // Take every descriptor but EMFILE_FREE.
    let mut held = Vec::new();
    while held.len() < 100_000 {
        match std::fs::File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(_) => break,
        }
    }
    held.truncate(held.len().saturating_sub(EMFILE_FREE));
    println!("READY {} held, cap {}", held.len(), server.connection_cap());
    // Serve until the parent closes our stdin (bounded).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read(&mut [0u8; 1]);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(60));
    drop(held);
    server.shutdown().expect("clean shutdown");
}

/// utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest: Vec<&str> = s
        .rsplit_once(')')
        .expect("comm")
        .1
        .split_whitespace()
        .collect();
    rest[11].parse::<u64>().expect("utime") + rest[12].parse::<u64>().expect("stime")
}

#[test]
fn accept_errors_back_off_without_spinning_and_recover() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let _g = serial();
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(
            r#"ulimit -n 64 && exec "$0" --exact emfile_server_child --nocapture --test-threads=1"#,
        )
        .arg(&exe)
        .env(EMFILE_CHILD, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the server process");
    let pid = child.id();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut port = None;
    // Generous: on a loaded 2-CPU machine the child's start was once slower than 30 s.
    let deadline = Instant::now() + Duration::from_secs(90);
    let ready = loop {
        let Ok(l) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            break None;
        };
        // libtest may have written `test emfile_server_child ... ` on the same line.
        if let Some((_, p)) = l.split_once("PORT ") {
            port = p.trim().parse::<u16>().ok();
        }
        if l.contains("READY") {
            break Some(l);
        }
    };
    let result = std::panic::catch_unwind(|| {
        let ready = ready.expect("the server process is ready");
        println!("server process: {ready}");
        let addr = SocketAddr::from(([127, 0, 0, 1], port.expect("port")));
        // Requests in flight on every free descriptor: nothing idle to evict.
        let polls: Vec<_> = (0..EMFILE_FREE)
            .map(|_| {
                std::thread::spawn(move || {
                    request(addr, "GET", "/api/v1/events?wait=3", true, None).map(|a| a.status)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let healths: Vec<_> = (0..20)
            .map(|_| {
                std::thread::spawn(move || {
                    request(addr, "GET", "/healthz", false, None).map(|a| a.status)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let c0 = cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs(1));
        let spent = cpu_ticks(pid) - c0;
        println!("server CPU while accept() fails with EMFILE: {spent} ticks in 1 s");
        assert!(spent < 30, "the accept loop spins: {spent} ticks in 1 s");
        let early: Vec<_> = healths.iter().map(|h| h.is_finished()).collect();
        let polls: Vec<_> = polls.into_iter().map(|p| p.join()).collect();
        let healths: Vec<_> = healths.into_iter().map(|p| p.join()).collect();
        assert!(
            early.iter().all(|&f| !f),
            "no descriptor was free, the new connections had to wait in the backlog: \
             finished early {early:?}; long-polls {polls:?}; healthz {healths:?}"
        );
        for p in polls {
            assert_eq!(p.expect("thread").expect("long-poll answered"), 200);
        }
        for h in healths {
            assert_eq!(h.expect("thread").expect("healthz answered"), 200);
        }
        println!(
            "all 20 waiting clients served {:?} after they connected",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(10));
    });
    drop(child.stdin.take()); // the server process shuts down
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().expect("wait").is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the server process did not shut down");
    }
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
