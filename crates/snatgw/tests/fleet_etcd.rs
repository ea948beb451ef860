//! Two `snatgw run --fleet` processes on a real etcd (issue #19, SPEC R10.1, R10.5, R10.6),
//! with the real binary: no lab namespaces (the API on 127.0.0.1, TUN devices with names
//! unique to the test, no fast path, no pins, no flow state), etcd started per test as the
//! fleet crate's tests do (its helper, `crates/snatgw-fleet/tests/common`).
//!
//! - a PUT through node 1's API is seen through node 2's within 1 s, and applied by its engine;
//! - both nodes joined: `snatgw fleet --json` lists them with their leases, every instance
//!   owned by exactly one, and each node's `/metrics` has its fleet gauges;
//! - etcd killed: a PUT answers 503 naming etcd (rule R10.5) and nothing changes; etcd back: a
//!   PUT through node 2 is seen on node 1 within 1 s.
//!
//! Root only (TUN devices); fails instead of skipping when `SNATGW_REQUIRE_ROOT=1`, as does a
//! missing etcd.

#[path = "../../snatgw-fleet/tests/common/mod.rs"]
mod etcd;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd::EtcdServer;
use snatgw_control::{Client, ClientError};
use snatgw_core::config::InstanceCfg;

const BIN: &str = env!("CARGO_BIN_EXE_snatgw");

const TOPOLOGY: &str = r#"
[gateway]
seed = 1
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100", "192.0.2.101"]

[[public_ip]]
name = "pip-a"
address = "203.0.113.10"

[[instance]]
name = "vm1"
private_ip = "10.0.1.10"
[[instance]]
name = "vm2"
private_ip = "10.0.1.11"
[[instance]]
name = "vm3"
private_ip = "10.0.1.12"
[[instance]]
name = "vm4"
private_ip = "10.0.1.13"
"#;

fn root_or_skip() -> bool {
    // The effective uid, from /proc/self/status.
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        });
    if euid.as_deref() == Some("0") {
        return true;
    }
    if std::env::var(etcd::REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!(
            "this test needs root (TUN devices) and {}=1 is set",
            etcd::REQUIRE_ENV
        );
    }
    eprintln!("skipped: needs root");
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One `snatgw run --fleet` process.
struct Node {
    child: Child,
    api: String,
    client: Client,
    log: std::path::PathBuf,
}

impl Node {
    fn start(dir: &Path, etcd: &EtcdServer, id: &str, tag: &str) -> Node {
        let state = dir.join(id);
        std::fs::create_dir_all(&state).expect("state dir");
        let config = dir.join("topology.toml");
        std::fs::write(&config, TOPOLOGY).expect("config");
        let token = dir.join("token");
        std::fs::write(&token, "fleet-test-token\n").expect("token");
        let log = dir.join(format!("{id}.log"));
        let api = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .args([
                "--tun-private",
                &format!("fp{tag}{id}"),
                "--tun-public",
                &format!("fu{tag}{id}"),
            ])
            .args(["--api", &api, "--token-file"])
            .arg(&token)
            .arg("--state-dir")
            .arg(&state)
            .args([
                "--fast-path",
                "off",
                "--bpf-pin-dir",
                "off",
                "--flow-state-interval-ms",
                "0",
            ])
            .args(["--fleet", &format!("etcd://127.0.0.1:{}", etcd.client_port)])
            .args(["--node-id", id, "--fleet-ttl-secs", "3"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("snatgw run");
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .expect("ready line");
        assert!(
            line.contains("\"event\":\"ready\""),
            "{id} did not start: {line}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let client = Client::new(&format!("http://{api}"), Some("fleet-test-token".into()));
        Node {
            child,
            api,
            client,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; the exit status (None: killed after 10 s, or already reaped).
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(_)) = self.child.try_wait() {
            return None;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- log of the node at {} ---\n{}", self.api, self.log());
        }
    }
}

fn instance(name: &str, ip: &str, public_ip: Option<&str>) -> InstanceCfg {
    InstanceCfg {
        name: name.into(),
        kind: Default::default(),
        model: Default::default(),
        private_ip: ip.into(),
        public_ip: public_ip.map(str::to_string),
        availability_set: None,
        deployment: None,
        max_flows: None,
    }
}

/// How long until `f` holds, polled every 5 ms; panics after `within`.
fn within(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f() {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("{what}: not within {within:?}");
}

fn generation(c: &Client) -> Option<u64> {
    c.topology().ok().and_then(|t| t.generation)
}

fn fleet_json(etcd: &EtcdServer) -> serde_json::Value {
    let o = Command::new(BIN)
        .args([
            "fleet",
            "--json",
            "--fleet",
            &format!("etcd://127.0.0.1:{}", etcd.client_port),
        ])
        .output()
        .expect("snatgw fleet");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("fleet JSON")
}

fn metrics(c: &Client) -> String {
    c.metrics_text().unwrap_or_default()
}

#[test]
fn r10_5_r10_1_two_nodes_share_changes_and_refuse_them_while_etcd_is_down() {
    if !root_or_skip() {
        return;
    }
    let Some(mut etcd) = EtcdServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = format!("{:x}", std::process::id() % 0xffff);
    let mut n1 = Node::start(dir.path(), &etcd, "gw1", &tag);
    let mut n2 = Node::start(dir.path(), &etcd, "gw2", &tag);
    // Node 1 seeded etcd from the file (generation 1); node 2 found it there.
    assert_eq!(generation(&n1.client), Some(1));
    assert_eq!(generation(&n2.client), Some(1));

    // Both joined; every instance is owned by exactly one of them (rendezvous, R10.1).
    within(
        "both nodes own their instances",
        Duration::from_secs(10),
        || {
            let st = fleet_json(&etcd);
            let nodes = st["nodes"].as_array().cloned().unwrap_or_default();
            let owned: usize = nodes
                .iter()
                .map(|n| n["instances"].as_array().map_or(0, Vec::len))
                .sum();
            nodes.len() == 2 && owned == 4
        },
    );
    let st = fleet_json(&etcd);
    for n in st["nodes"].as_array().expect("nodes") {
        let ttl = n["ttl_left_secs"].as_i64().expect("ttl");
        assert!((0..=3).contains(&ttl), "{n}");
    }
    let text = Command::new(BIN)
        .args([
            "fleet",
            "--fleet",
            &format!("etcd://127.0.0.1:{}", etcd.client_port),
        ])
        .output()
        .expect("snatgw fleet");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("gw1") && text.contains("gw2") && text.contains("ttl left"),
        "{text}"
    );
    for n in [&n1, &n2] {
        within("fleet gauges in /metrics", Duration::from_secs(5), || {
            let m = metrics(&n.client);
            m.contains("snatgw_fleet_nodes_live{node=")
                && m.lines()
                    .any(|l| l.starts_with("snatgw_fleet_nodes_live") && l.ends_with(" 2"))
                && m.contains("snatgw_fleet_lease_valid_seconds{node=")
        });
    }
    assert!(
        n1.log()
            .contains("no --fleet-link: packets of instances other nodes own are dropped"),
        "{}",
        n1.log()
    );

    // R10.1: a change through node 1 is seen and applied on node 2 within 1 s.
    n1.client
        .put(&instance("vm1", "10.0.1.10", Some("pip-a")), None)
        .expect("PUT on node 1");
    let took = within("node 2 has generation 2", Duration::from_secs(1), || {
        generation(&n2.client) == Some(2)
    });
    eprintln!("node 2 saw node 1's change after {took:?}");
    assert_eq!(
        n2.client
            .instance_ports("vm1")
            .expect("ports on node 2")
            .scenario,
        "ilpip",
        "node 2's engine runs it"
    );

    // R10.5: etcd down, a PUT answers 503 naming etcd; nothing changes.
    etcd.stop();
    match n2.client.put(&instance("vm5", "10.0.1.14", None), None) {
        Err(ClientError::Api { status, body }) => {
            assert_eq!(status, 503, "{body:?}");
            assert_eq!(body.rule.as_deref(), Some("R10.5"), "{body:?}");
            assert!(body.error.contains("etcd"), "{body:?}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    assert_eq!(generation(&n2.client), Some(2));
    assert!(n2.client.get::<InstanceCfg>("vm5").is_err());
    // The data path does not need etcd (R10.5): the nodes keep serving...
    assert_eq!(
        n1.client.instance_ports("vm1").expect("node 1").scenario,
        "ilpip"
    );
    // ...and open new flows for their instances until their lease view ends (TTL 3 s -
    // margin 0.6 s after the last renewal), then fence themselves (R10.2).
    let took = within("node 2 fenced itself", Duration::from_secs(4), || {
        let m = metrics(&n2.client);
        m.contains("snatgw_fleet_instances_owned{node=\"gw2\"} 0")
            && m.contains("snatgw_fleet_lease_valid_seconds{node=\"gw2\"} 0")
    });
    eprintln!("node 2 fenced itself {took:?} after etcd was killed");
    within("the fence logged", Duration::from_secs(5), || {
        n2.log().contains("lease view ended")
    });

    // etcd back: a PUT through node 2 works again and node 1 sees it within 1 s.
    etcd.restart();
    within("a PUT after etcd returned", Duration::from_secs(10), || {
        n2.client
            .put(&instance("vm5", "10.0.1.14", None), None)
            .is_ok()
    });
    let g = generation(&n2.client).expect("generation");
    assert_eq!(g, 3);
    let took = within("node 1 has generation 3", Duration::from_secs(1), || {
        generation(&n1.client) == Some(3)
    });
    eprintln!("node 1 saw node 2's change after etcd returned after {took:?}");
    assert_eq!(
        n1.client
            .instance_ports("vm5")
            .expect("vm5 on node 1")
            .scenario,
        "default_snat"
    );
    // Ownership comes back, the new instance included.
    within(
        "all five instances owned again",
        Duration::from_secs(10),
        || {
            let st = fleet_json(&etcd);
            let owned: usize = st["nodes"].as_array().map_or(0, |ns| {
                ns.iter()
                    .map(|n| n["instances"].as_array().map_or(0, Vec::len))
                    .sum()
            });
            owned == 5
        },
    );
    // A clean stop leaves the fleet (the lease is revoked): the other node takes everything.
    assert!(n1.stop().is_some_and(|st| st.success()), "{}", n1.log());
    within(
        "node 2 owns all after node 1 left",
        Duration::from_secs(5),
        || {
            let st = fleet_json(&etcd);
            let ns = st["nodes"].as_array().cloned().unwrap_or_default();
            ns.len() == 1 && ns[0]["instances"].as_array().map_or(0, Vec::len) == 5
        },
    );
    assert!(
        n1.log().contains("fleet: left (lease revoked)"),
        "{}",
        n1.log()
    );
    assert!(n2.stop().is_some_and(|st| st.success()), "{}", n2.log());
}
