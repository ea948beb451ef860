//! The API client subcommands (`snatgw get|apply|put|delete|redeploy|settle|ports|flows|events`)
//! against a real control-plane server started in the test process on 127.0.0.1:0, over a
//! real `Gateway` built from `examples/reference.toml`. The `snatgw` binary runs as a
//! subprocess with `--api http://<addr>`; packets go through `Gateway::process` directly.
//! Expected numbers come from the SPEC (tier table R2.8, redeploy R2.11, R1.5), not the code.
//! No root needed.

use std::collections::BTreeSet;
use std::io::BufRead as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use snatgw_control::{
    serve, ControlPlane, EventLog, EventRecord, FlowPage, GatewayBackend, InstancePorts,
    MemoryStore, ServerHandle,
};
use snatgw_core::{ConfigFile, Direction, Engine, Event, EventKind, Topology, Verdict, L4};
use snatgw_dataplane::Gateway;
use snatgw_wire::testutil;

const TOKEN: &str = "cli-test-token";

fn reference_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/reference.toml")
}

fn reference_text() -> String {
    std::fs::read_to_string(reference_path()).expect("examples/reference.toml")
}

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<Ipv4Addr>().expect("ip"))
}

/// What one run of the binary gave.
struct Out {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    /// The standard output of a run that must succeed.
    fn ok(self) -> String {
        assert!(
            self.ok,
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self.stdout
    }

    /// The standard error of a run that must fail (exit 1, not a usage error).
    fn failed(self) -> String {
        assert!(
            !self.ok,
            "expected a failure, got success:\n{}",
            self.stdout
        );
        assert_eq!(self.code, Some(1), "stderr: {}", self.stderr);
        assert!(self.stderr.starts_with("error: "), "{}", self.stderr);
        self.stderr
    }

    /// The JSON standard output of a run that must succeed.
    fn json<T: serde::de::DeserializeOwned>(self) -> T {
        let text = self.ok();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
    }
}

/// The control plane over a real gateway, and the binary pointed at it.
struct Server {
    handle: Option<ServerHandle>,
    url: String,
    gateway: Arc<Mutex<Gateway>>,
    log: Arc<EventLog>,
    now: Arc<AtomicU32>,
    dir: tempfile::TempDir,
    token_file: Option<PathBuf>,
}

impl Server {
    fn start(token: Option<&str>) -> Server {
        let file = ConfigFile::from_toml(&reference_text()).expect("reference parses");
        let store = Arc::new(MemoryStore::new());
        let seeded = snatgw_control::seed(&*store, &file).expect("seed");
        let topo = Topology::from_config(seeded.stored.config.clone()).expect("valid");
        let gateway = Arc::new(Mutex::new(Gateway::new(
            Engine::new(topo, 0).expect("engine"),
        )));
        let log = Arc::new(EventLog::new());
        let now = Arc::new(AtomicU32::new(0));
        let clock = now.clone();
        let backend = Arc::new(GatewayBackend::new(
            gateway.clone(),
            log.clone(),
            move || clock.load(Ordering::SeqCst),
        ));
        let plane = ControlPlane::new(backend, store, token.map(str::to_string), seeded.stored);
        let handle = serve("127.0.0.1:0".parse().expect("addr"), plane).expect("serve");
        let dir = tempfile::tempdir().expect("tempdir");
        let token_file = token.map(|t| {
            let p = dir.path().join("token");
            std::fs::write(&p, format!("{t}\n")).expect("token file");
            p
        });
        Server {
            url: format!("http://{}", handle.local_addr()),
            handle: Some(handle),
            gateway,
            log,
            now,
            dir,
            token_file,
        }
    }

    /// Runs `snatgw ARGS --api URL [--token-file F]` (the token file if the server has one).
    fn cli(&self, args: &[&str]) -> Out {
        self.cli_token(args, self.token_file.as_deref())
    }

    fn cli_token(&self, args: &[&str], token_file: Option<&Path>) -> Out {
        let mut c = Command::new(env!("CARGO_BIN_EXE_snatgw"));
        c.args(args).args(["--api", &self.url]);
        if let Some(t) = token_file {
            c.arg("--token-file").arg(t);
        }
        let o = c.output().expect("run snatgw");
        Out {
            ok: o.status.success(),
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Writes a file in the test's directory; returns its path as text.
    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    }

    /// Sends one packet from the private side at the current time.
    fn outbound(&self, pkt: &mut [u8]) -> Verdict {
        let now = self.now.load(Ordering::SeqCst);
        self.gateway
            .lock()
            .expect("lock")
            .process(now, pkt, Direction::Outbound)
    }

    /// The ETag of `get ARGS` (its table's last line: `ETag "...", generation N`).
    fn etag(&self, args: &[&str]) -> String {
        let text = self.cli(args).ok();
        let last = text.lines().last().unwrap_or_default().to_string();
        let tag = last
            .strip_prefix("ETag ")
            .and_then(|r| r.split(", generation").next())
            .unwrap_or_else(|| panic!("no ETag line in:\n{text}"));
        assert!(tag.starts_with('"') && tag.ends_with('"'), "{tag}");
        tag.to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.shutdown();
        }
    }
}

/// The table row whose first cell is `name`.
fn row<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row for {name} in:\n{text}"))
}

fn block_size(p: &InstancePorts) -> u32 {
    p.block
        .iter()
        .map(|r| u32::from(r.last) - u32::from(r.first) + 1)
        .sum()
}

fn exhaustion(time: u32) -> Event {
    Event {
        time,
        kind: EventKind::Exhaustion {
            instance: "vm-as1".into(),
            public_ip: ip("192.0.2.100"),
            l4: L4::Tcp,
            dst: ip("198.51.100.7"),
            dst_port: 443,
            allocated: 1024,
        },
        count: 1,
        since: time,
        summary: false,
    }
}

#[test]
fn get_every_kind_as_table_and_json() {
    let s = Server::start(None);
    let reference = ConfigFile::from_toml(&reference_text()).expect("parse");

    // topology: every section; --json is the config file's structure.
    let t = s.cli(&["get", "topology"]).ok();
    for want in [
        "gateway:",
        "public-ips: 3",
        "availability-sets: 1",
        "deployments: 1",
        "instances: 7",
        "load-balancers: 1",
        "generation 1",
    ] {
        assert!(t.contains(want), "{want} missing:\n{t}");
    }
    let topo: ConfigFile = s.cli(&["get", "topology", "--json"]).json();
    assert_eq!(topo, reference);

    // gateway: one row per setting.
    let t = s.cli(&["get", "gateway"]).ok();
    assert!(
        row(&t, "default_snat_pool").contains("192.0.2.100,192.0.2.101"),
        "{t}"
    );
    assert!(row(&t, "seed").ends_with(" 7"), "{t}");
    let g: serde_json::Value = s.cli(&["get", "gateway", "--json"]).json();
    assert_eq!(g["vnet_prefixes"][0], "10.0.0.0/16");

    // Collections: a row per resource, and the JSON array.
    for (kind, name, cells) in [
        ("public-ips", "pip-fe1", vec!["203.0.113.20"]),
        ("availability-sets", "as1", vec![]),
        ("deployments", "cs1", vec!["settled"]),
        (
            "instances",
            "role-0",
            vec!["web_worker_role", "classic", "10.0.4.10", "cs1"],
        ),
        (
            "load-balancers",
            "lb",
            vec![
                "fe1=pip-fe1",
                "web[vm-lb1,vm-lb2]",
                "http tcp fe1:80->web:80",
            ],
        ),
    ] {
        let t = s.cli(&["get", kind]).ok();
        let r = row(&t, name);
        for c in cells {
            assert!(r.contains(c), "{kind}: {c} missing in {r}");
        }
        let list: Vec<serde_json::Value> = s.cli(&["get", kind, "--json"]).json();
        assert!(list.iter().any(|v| v["name"] == name), "{kind}: {list:?}");
        // One resource: the same row alone, and its JSON object.
        let one = s.cli(&["get", kind, name]).ok();
        assert_eq!(one.lines().count(), 3, "header, row, ETag:\n{one}");
        assert_eq!(
            row(&one, name).split_whitespace().collect::<Vec<_>>(),
            r.split_whitespace().collect::<Vec<_>>()
        );
        let v: serde_json::Value = s.cli(&["get", kind, name, "--json"]).json();
        assert_eq!(v["name"], name);
    }
    let t = s.cli(&["get", "instances"]).ok();
    assert_eq!(t.lines().count(), 1 + 7 + 1, "{t}");
    assert!(row(&t, "vm-ilpip").contains("pip-ilpip"));
    // Singular and API names work as kinds.
    assert!(s
        .cli(&["get", "instance", "vm-lb1"])
        .ok()
        .contains("10.0.2.10"));
    assert!(s
        .cli(&["get", "publicIPAddresses"])
        .ok()
        .contains("pip-ilpip"));

    let e = s.cli(&["get", "instances", "nope"]).failed();
    assert!(
        e.contains("HTTP 404") && e.contains("instance[nope]"),
        "{e}"
    );
    let e = s.cli(&["get", "gateway", "x"]).failed();
    assert!(e.contains("gateway takes no name"), "{e}");
}

#[test]
fn put_instance_then_ports_shows_its_block_then_delete() {
    let s = Server::start(None);
    let body = s.file(
        "vm-as3.json",
        r#"{"private_ip": "10.0.3.30", "availability_set": "as1"}"#,
    );
    let o = s.cli(&["put", "instances", "vm-as3", "-f", &body]).ok();
    assert!(
        o.starts_with("instances/vm-as3 stored: generation 2, ETag \""),
        "{o}"
    );

    // R1.3 default SNAT for as1, now 3 instances: tier 1-50, 1024 ports (R2.8).
    let p: InstancePorts = s.cli(&["ports", "vm-as3", "--json"]).json();
    assert_eq!(
        (p.scenario.as_str(), p.rule.as_str(), p.pool_size),
        ("default_snat", "R1.3", 3)
    );
    assert_eq!((p.allocated, block_size(&p)), (1024, 1024));
    assert_eq!((p.used.tcp, p.used.udp), (0, 0));
    let peer: InstancePorts = s.cli(&["ports", "vm-as1", "--json"]).json();
    assert_eq!(
        peer.public_ip, p.public_ip,
        "one address per availability set"
    );
    assert!(
        p.block[0].first > peer.block[0].last || p.block[0].last < peer.block[0].first,
        "blocks of one public IP never overlap (R2.4): {:?} {:?}",
        p.block,
        peer.block
    );

    let t = s.cli(&["ports"]).ok();
    let r = row(&t, "vm-as3");
    let range = format!("{}-{}", p.block[0].first, p.block[0].last);
    for want in [
        "default_snat",
        "R1.3",
        &p.public_ip,
        " 3 ",
        " 1024 ",
        &range,
    ] {
        assert!(r.contains(want), "{want} missing in {r}");
    }
    let cells: Vec<&str> = r.split_whitespace().collect();
    assert_eq!(cells[7..9], ["0/0", "1024/1024"], "used, free: {r}");
    let ilpip = row(&t, "vm-ilpip");
    assert!(
        ilpip.contains("65535") && ilpip.contains("all (1:1, no PAT)"),
        "{ilpip}"
    );
    let all: Vec<InstancePorts> = s.cli(&["ports", "--json"]).json();
    assert_eq!(all.len(), 8);

    // If-Match: a stale ETag is refused (412), the current one is accepted.
    let tag = s.etag(&["get", "instances", "vm-as3"]);
    let body2 = s.file(
        "vm-as3-flows.json",
        r#"{"name": "vm-as3", "private_ip": "10.0.3.30", "availability_set": "as1", "max_flows": 1000}"#,
    );
    let e = s
        .cli(&[
            "put",
            "instances",
            "vm-as3",
            "-f",
            &body2,
            "--if-match",
            "\"0000000000000000\"",
        ])
        .failed();
    assert!(
        e.contains("HTTP 412") && e.contains("field If-Match"),
        "{e}"
    );
    s.cli(&[
        "put",
        "instances",
        "vm-as3",
        "-f",
        &body2,
        "--if-match",
        &tag,
    ])
    .ok();
    assert!(row(&s.cli(&["get", "instances", "vm-as3"]).ok(), "vm-as3").contains("1000"));

    // Delete, then it is gone (404 on get, ports, and a second delete).
    let o = s.cli(&["delete", "instances", "vm-as3"]).ok();
    assert!(o.starts_with("instances/vm-as3 deleted"), "{o}");
    assert!(s
        .cli(&["get", "instances", "vm-as3"])
        .failed()
        .contains("HTTP 404"));
    assert!(s.cli(&["ports", "vm-as3"]).failed().contains("HTTP 404"));
    assert!(s
        .cli(&["delete", "instances", "vm-as3"])
        .failed()
        .contains("HTTP 404"));
    // Deleting what is still referenced is refused, naming the referencing field.
    let e = s.cli(&["delete", "public-ips", "pip-ilpip"]).failed();
    assert!(
        e.contains("HTTP 409") && e.contains("field instance[vm-ilpip].public_ip"),
        "{e}"
    );
    assert!(s.cli(&["get", "public-ips"]).ok().contains("pip-ilpip"));
    let e = s.cli(&["delete", "gateway", "x"]).failed();
    assert!(e.contains("cannot be deleted"), "{e}");
}

#[test]
fn apply_redeploy_and_settle_follow_the_tier_table() {
    let s = Server::start(None);
    // The reference plus a Classic deployment cs2 of 26 roles and a third default-SNAT
    // address. Running designations are kept (R1.3) and a new group goes to the least-loaded
    // address, so cs2 gets 192.0.2.102 alone: its pool is its 26 instances (R2.8).
    let two = r#"default_snat_pool = ["192.0.2.100", "192.0.2.101"]"#;
    assert!(reference_text().contains(two));
    let mut big = reference_text().replace(
        two,
        r#"default_snat_pool = ["192.0.2.100", "192.0.2.101", "192.0.2.102"]"#,
    );
    big.push_str("\n[[deployment]]\nname = \"cs2\"\n");
    for i in 0..26 {
        big.push_str(&format!(
            "\n[[instance]]\nname = \"web-{i}\"\nkind = \"web_worker_role\"\nmodel = \"classic\"\ndeployment = \"cs2\"\nprivate_ip = \"10.0.5.{}\"\n",
            10 + i
        ));
    }
    let big = s.file("big.toml", &big);
    let o = s.cli(&["apply", "-f", &big]).ok();
    assert!(
        o.starts_with("topology applied: generation 2, ETag \""),
        "{o}"
    );
    let p: InstancePorts = s.cli(&["ports", "web-0", "--json"]).json();
    assert_eq!(p.public_ip, "192.0.2.102");
    assert_eq!((p.pool_size, p.allocated), (26, 1024), "tier 1-50 (R2.8)");

    // R2.11: reported as twice the actual size, 52: tier 51-100, 512 ports each.
    let o = s.cli(&["redeploy", "cs2", "--reported", "52"]).ok();
    assert!(
        o.contains("redeploying") && o.contains("generation 3"),
        "{o}"
    );
    assert!(
        row(&o, "web-25").contains(" 512 "),
        "the members' new ports:\n{o}"
    );
    assert_eq!(
        o.lines().filter(|l| l.starts_with("web-")).count(),
        26,
        "{o}"
    );
    for name in ["web-0", "web-25"] {
        let p: InstancePorts = s.cli(&["ports", name, "--json"]).json();
        assert_eq!((p.pool_size, p.allocated, block_size(&p)), (52, 512, 512));
    }
    let d = s.cli(&["get", "deployments"]).ok();
    assert!(row(&d, "cs2").contains("redeploying  52"), "{d}");
    assert!(row(&d, "cs1").contains("settled"), "{d}");
    // More than twice the actual size is refused (R2.11: 409, a conflict with the deployment's
    // size) and changes nothing.
    let e = s.cli(&["redeploy", "cs2", "--reported", "53"]).failed();
    assert!(
        e.contains("HTTP 409")
            && e.contains("(field deployment[cs2].redeploy_reported_instances, SPEC R2.11)"),
        "{e}"
    );
    let p: InstancePorts = s.cli(&["ports", "web-0", "--json"]).json();
    assert_eq!(p.allocated, 512);
    // Settled: tiers follow the actual size again (R2.10), 1024 ports.
    let tag = s.etag(&["get", "deployments", "cs2"]);
    let o = s.cli(&["settle", "cs2", "--if-match", &tag]).ok();
    assert!(
        o.contains("settled") && row(&o, "web-0").contains(" 1024 "),
        "{o}"
    );
    let p: InstancePorts = s.cli(&["ports", "web-0", "--json"]).json();
    assert_eq!((p.pool_size, p.allocated, block_size(&p)), (26, 1024, 1024));
    assert!(s.cli(&["settle", "nope"]).failed().contains("HTTP 404"));

    // Back to the reference file; then the JSON topology `get --json` printed applies too.
    let reference = reference_path().display().to_string();
    let o = s.cli(&["apply", "-f", &reference]).ok();
    assert!(o.contains("generation 5"), "{o}");
    let list: Vec<serde_json::Value> = s.cli(&["get", "instances", "--json"]).json();
    assert_eq!(list.len(), 7);
    assert!(s
        .cli(&["get", "deployments", "cs2"])
        .failed()
        .contains("HTTP 404"));
    let json = s.file("topology.json", &s.cli(&["get", "topology", "--json"]).ok());
    let o = s.cli(&["apply", "-f", &json]).ok();
    assert!(
        o.contains("generation 5"),
        "an identical topology is no new write: {o}"
    );
    let e = s
        .cli(&["apply", "-f", &json, "--if-match", "\"0000000000000000\""])
        .failed();
    assert!(e.contains("HTTP 412"), "{e}");
    // A file that does not parse is refused here, naming it.
    let bad = s.file("bad.toml", "[[instance]]\nname = \"x\"\ncolour = \"red\"\n");
    let e = s.cli(&["apply", "-f", &bad]).failed();
    assert!(e.contains("bad.toml") && e.contains("colour"), "{e}");
}

#[test]
fn refused_changes_name_field_and_rule_and_change_nothing() {
    let s = Server::start(None);
    let before = s.etag(&["get", "topology"]);
    // R1.5: a web_worker_role instance cannot have an ILPIP.
    let body = s.file(
        "role-0.json",
        r#"{"kind": "web_worker_role", "model": "classic", "deployment": "cs1",
            "private_ip": "10.0.4.10", "public_ip": "pip-ilpip"}"#,
    );
    let e = s.cli(&["put", "instances", "role-0", "-f", &body]).failed();
    assert!(e.contains("HTTP 400"), "{e}");
    assert!(
        e.contains("(field instance[role-0].public_ip, SPEC R1.5)"),
        "field and rule: {e}"
    );
    assert_eq!(s.etag(&["get", "topology"]), before, "nothing changed");
    let p: InstancePorts = s.cli(&["ports", "role-0", "--json"]).json();
    assert_eq!(p.scenario, "default_snat");

    // A body naming another resource than the path.
    let other = s.file(
        "other.json",
        r#"{"name": "pip-x", "address": "203.0.113.99"}"#,
    );
    let e = s
        .cli(&["put", "public-ips", "pip-y", "-f", &other])
        .failed();
    assert!(e.contains("field public_ip[pip-y].name"), "{e}");
    // Not JSON: refused before any request, naming the file.
    let junk = s.file("junk.json", "{not json");
    let e = s.cli(&["put", "public-ips", "pip-y", "-f", &junk]).failed();
    assert!(e.contains("junk.json") && e.contains("not JSON"), "{e}");
    assert_eq!(s.etag(&["get", "topology"]), before);

    // A server that is not there: the URL is named.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let o = Command::new(env!("CARGO_BIN_EXE_snatgw"))
        .args(["get", "instances", "--api", &url])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains(&format!("cannot reach the API at {url}")), "{e}");
}

#[test]
fn flows_filter_page_and_follow_cursors() {
    let s = Server::start(None);
    let (as1, lb1) = (ip("10.0.3.10"), ip("10.0.2.10"));
    let (web, dns) = (ip("198.51.100.7"), ip("198.51.100.8"));
    let mut sent = 0;
    for sport in 0..5u16 {
        let mut p = testutil::tcp_syn(as1, 40000 + sport, web, 443);
        assert!(matches!(s.outbound(&mut p), Verdict::Translate { .. }));
        sent += 1;
    }
    for sport in 0..2u16 {
        let mut p = testutil::tcp_syn(lb1, 41000 + sport, web, 443);
        assert!(matches!(s.outbound(&mut p), Verdict::Translate { .. }));
        sent += 1;
    }
    for sport in 0..3u16 {
        let mut p = testutil::udp(lb1, 42000 + sport, dns, 53, b"q");
        assert!(matches!(s.outbound(&mut p), Verdict::Translate { .. }));
        sent += 1;
    }
    let all: FlowPage = s.cli(&["flows", "--json"]).json();
    assert_eq!((all.flows.len(), all.next_cursor), (sent, None));

    let count = |args: &[&str]| {
        let mut a = vec!["flows", "--json"];
        a.extend_from_slice(args);
        let p: FlowPage = s.cli(&a).json();
        assert_eq!(p.next_cursor, None);
        p.flows
    };
    let f = count(&["--instance", "vm-as1"]);
    assert_eq!(f.len(), 5);
    assert!(f
        .iter()
        .all(|x| x.instance == "vm-as1" && x.remote == "198.51.100.7:443" && x.protocol == "tcp"));
    assert_eq!(count(&["--protocol", "udp"]).len(), 3);
    assert_eq!(count(&["--destination", "198.51.100.7"]).len(), 7);
    assert_eq!(count(&["--destination", "198.51.100.8:53"]).len(), 3);
    assert_eq!(
        count(&[
            "--destination",
            "198.51.100.7:443",
            "--protocol",
            "tcp",
            "--state",
            "open"
        ])
        .len(),
        7
    );
    assert!(count(&["--state", "reset"]).is_empty());

    // Pages of 3 by cursor: every flow once.
    let mut seen = BTreeSet::new();
    let mut cursor = "0".to_string();
    let mut pages = 0;
    loop {
        let p: FlowPage = s
            .cli(&["flows", "--json", "--limit", "3", "--cursor", &cursor])
            .json();
        assert!(p.flows.len() <= 3);
        pages += 1;
        for f in &p.flows {
            assert!(
                seen.insert((f.protocol.clone(), f.private.clone())),
                "twice: {f:?}"
            );
        }
        match p.next_cursor {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
        assert!(pages < 20, "the cursors never end");
    }
    assert_eq!((seen.len(), pages >= 4), (sent, true));
    let p: FlowPage = s.cli(&["flows", "--json", "--all", "--limit", "3"]).json();
    assert_eq!((p.flows.len(), p.next_cursor), (sent, None));

    // Tables: a row per flow and what comes next.
    let t = s.cli(&["flows", "--instance", "vm-as1"]).ok();
    assert_eq!(
        t.lines().filter(|l| l.starts_with("vm-as1 ")).count(),
        5,
        "{t}"
    );
    assert!(t.ends_with("5 flow(s); end of the table\n"), "{t}");
    let t = s.cli(&["flows", "--limit", "3"]).ok();
    assert!(t.contains("3 flow(s); next cursor: "), "{t}");
    let t = s.cli(&["flows", "--all", "--limit", "3"]).ok();
    assert!(
        t.ends_with(&format!("{sent} flow(s); end of the table\n")),
        "{t}"
    );

    // Bad filters: the server names the parameter; clap refuses what it knows.
    let e = s.cli(&["flows", "--destination", "nowhere"]).failed();
    assert!(
        e.contains("HTTP 400") && e.contains("field destination"),
        "{e}"
    );
    let e = s.cli(&["flows", "--limit", "5000"]).failed();
    assert!(e.contains("field limit"), "{e}");
    let o = s.cli(&["flows", "--protocol", "icmp"]);
    assert_eq!(o.code, Some(2), "usage error: {}", o.stderr);

    // The tenant's view (R6.1): used, free, flows and connections per protocol.
    let t = s.cli(&["ports", "vm-as1"]).ok();
    let cells: Vec<&str> = row(&t, "vm-as1").split_whitespace().collect();
    assert_eq!(cells[5], "1024");
    assert_eq!(cells[7..11], ["5/0", "1019/1024", "5/0", "5/0"], "{t}");
    let p: InstancePorts = s.cli(&["ports", "vm-lb1", "--json"]).json();
    assert_eq!(
        (p.scenario.as_str(), p.rule.as_str()),
        ("load_balanced", "R1.2")
    );
    // R2.3: every flow to one destination endpoint holds its own port.
    assert_eq!((p.used.tcp, p.used.udp, p.flows.udp), (2, 3, 3));
}

#[test]
fn events_list_and_follow() {
    let s = Server::start(None);
    let first = s.log.push(&exhaustion(5));
    let evs: Vec<EventRecord> = s.cli(&["events", "--json"]).json();
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!((evs[0].seq, evs[0].kind.as_str()), (first, "exhaustion"));
    assert_eq!(evs[0].destination.as_deref(), Some("198.51.100.7:443"));
    let t = s.cli(&["events"]).ok();
    assert!(t
        .lines()
        .next()
        .is_some_and(|l| l.contains("SEQ") && l.contains("DETAIL")));
    assert!(
        t.lines()
            .any(|l| l.contains("exhaustion") && l.contains("vm-as1")),
        "{t}"
    );

    // --follow: the kept event first, then one pushed while it waits.
    let mut child = Command::new(env!("CARGO_BIN_EXE_snatgw"))
        .args(["events", "--follow", "--json", "--api", &s.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || -> EventRecord {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a line within 10 s");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    assert_eq!(next().seq, first);
    std::thread::sleep(Duration::from_millis(300));
    let second = s.log.push(&Event {
        time: 9,
        kind: EventKind::TierChanged {
            public_ip: ip("192.0.2.100"),
            pool_size: 51,
            from: 1024,
            to: 512,
        },
        count: 1,
        since: 9,
        summary: false,
    });
    let e = next();
    assert_eq!((e.seq, e.kind.as_str()), (second, "tier_changed"));
    assert!(e.detail.contains("1024 -> 512"), "{e:?}");
    child.kill().expect("kill");
    child.wait().expect("wait");
    reader.join().expect("reader");

    let evs: Vec<EventRecord> = s
        .cli(&["events", "--json", "--after", &first.to_string()])
        .json();
    assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![second]);
}

#[test]
fn a_token_protected_server_needs_the_token_file() {
    let s = Server::start(Some(TOKEN));
    let e = s.cli_token(&["get", "instances"], None).failed();
    assert!(e.contains("HTTP 401") && e.contains("--token-file"), "{e}");
    let t = s.cli(&["get", "instances"]).ok();
    assert!(t.contains("vm-ilpip"), "{t}");
    s.log.push(&exhaustion(1));
    let evs: Vec<EventRecord> = s.cli(&["events", "--json"]).json();
    assert_eq!(evs.len(), 1);
    let wrong = s.file("wrong", "not-the-token\n");
    let e = s.cli_token(&["ports"], Some(Path::new(&wrong))).failed();
    assert!(
        e.contains("HTTP 401") && e.contains("wrong bearer token"),
        "{e}"
    );
    let empty = s.file("empty", "\n");
    let e = s.cli_token(&["ports"], Some(Path::new(&empty))).failed();
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn r4_1_r5_2_nsgs_and_probes_through_the_cli() {
    let s = Server::start(None);
    let body = s.file(
        "nsg.json",
        r#"{"nics": ["vm-as1"], "rules": [{"name": "no-web", "priority": 100, "direction": "outbound", "access": "deny", "protocol": "tcp", "destinations": ["198.51.100.0/24"], "destination_ports": ["443"]}]}"#,
    );
    let o = s.cli(&["put", "nsgs", "n1", "-f", &body]).ok();
    assert!(o.starts_with("nsgs/n1 stored: generation 2"), "{o}");
    let t = s.cli(&["get", "nsgs"]).ok();
    let r = row(&t, "n1");
    assert!(
        r.contains("vm-as1") && r.contains("100 no-web outbound deny tcp"),
        "{r}"
    );
    // Refused with field and rule named, nothing stored.
    let bad = s.file(
        "bad.json",
        r#"{"rules": [{"name": "r", "priority": 50, "direction": "inbound", "access": "allow", "protocol": "tcp"}]}"#,
    );
    let e = s.cli(&["put", "nsg", "n2", "-f", &bad]).failed();
    assert!(
        e.contains("nsg[n2].rules[r].priority") && e.contains("R4.1"),
        "{e}"
    );
    // A denied SYN (R4.3) shows up in the rule's hits.
    let mut p = testutil::tcp_syn(ip("10.0.3.10"), 40000, ip("198.51.100.7"), 443);
    assert_eq!(
        s.outbound(&mut p),
        Verdict::Drop(snatgw_core::DropReason::NsgDenied)
    );
    let t = s.cli(&["nsg-hits", "n1"]).ok();
    let r = t.lines().find(|l| l.contains("no-web")).expect("rule row");
    assert!(r.split_whitespace().last() == Some("1"), "{t}");
    assert!(t.contains("DenyAllOutBound") && t.contains("65500"), "{t}");
    let hits: serde_json::Value = s.cli(&["nsg-hits", "n1", "--json"]).json();
    assert_eq!(hits.as_array().map(Vec::len), Some(7));
    // Probe state of a load balancer: the reference LB has no probe.
    let t = s.cli(&["probes", "lb"]).ok();
    assert!(t.starts_with("PROBE"), "{t}");
    let e = s.cli(&["probes", "nope"]).failed();
    assert!(e.contains("404") || e.contains("does not exist"), "{e}");
    // Inbound flows of a load balancer (R5.1, R6.3): none yet, a table with its header.
    let t = s.cli(&["inbound-flows", "lb"]).ok();
    assert!(t.starts_with("RULE") && t.contains("MEMBER"), "{t}");
    let v: serde_json::Value = s.cli(&["inbound-flows", "lb", "--json"]).json();
    assert_eq!(v, serde_json::json!([]));
    let e = s.cli(&["inbound-flows", "nope"]).failed();
    assert!(e.contains("404") || e.contains("does not exist"), "{e}");
}

/// `snatgw plan --api`: the planner replays against the running gateway's topology (issue
/// #11). vm-as1 shares its availability set's default-SNAT address with vm-as2: a pool of 2 →
/// 1024 ports (R2.8). One request per second for 300 s holds at most 240 ports (FIN + 240 s,
/// R3.2): no failure. After the API gives vm-as1 an ILPIP (R1.1), the same plan shows it.
#[test]
fn plan_replays_against_the_running_gateways_topology() {
    let s = Server::start(Some(TOKEN));
    let g = "http:inst=vm-as1,dst=198.51.100.10:443,rate=1,duration=300";
    let v: serde_json::Value = s.cli(&["plan", "--json", "-g", g]).json();
    let i = &v["instances"][0];
    assert_eq!(i["name"], "vm-as1");
    assert_eq!(i["scenario"], "default_snat");
    assert_eq!(i["allocated"], 1024);
    assert_eq!(i["failed"], 0);
    assert_eq!(i["peak_used"][0], 240);
    // Without the token the API refuses, and the planner says so.
    let o = s.cli_token(&["plan", "-g", g], None);
    assert!(!o.ok && o.stderr.contains("401"), "{}", o.stderr);
    // A live change through the API is what the next plan sees.
    let mut file = ConfigFile::from_toml(&reference_text()).unwrap();
    let inst = file
        .instance
        .iter_mut()
        .find(|i| i.name == "vm-as1")
        .unwrap();
    inst.public_ip = Some("pip-ilpip2".into());
    file.public_ip.push(snatgw_core::config::PublicIpCfg {
        name: "pip-ilpip2".into(),
        address: "203.0.113.11".into(),
    });
    let path = s.file("ilpip.toml", &file.to_toml());
    s.cli(&["apply", "-f", &path]).ok();
    let v: serde_json::Value = s.cli(&["plan", "--json", "-g", g]).json();
    assert_eq!(v["instances"][0]["scenario"], "ilpip");
}
