//! `scripts/gateway-routing.sh`, the routing for `snatgw run` (docs/RUNNING.md, "Deploying
//! `snatgw run`"), applied to throwaway network namespaces. Root only: without root each
//! test prints `skipped: ...` and passes, unless `SNATGW_REQUIRE_ROOT=1` is set, in which
//! case it fails (`snatgw_lab::root_or_skip`, as the lab tests).
//!
//! Safety: every command names one of this test's own namespaces (`sgdep<PID>-*`,
//! `sgdep<PID>m-*`: `ip -n NS ...`, `ip netns exec NS ...`, `ip netns add|del NS`), the
//! script always gets `--netns`, and the host's interfaces, routes and sysctls are never
//! touched. Every command is bounded by a timeout. A `Drop` guard deletes the namespaces
//! by name, also when an assertion fails. The TUN devices are stand-ins made with
//! `ip tuntap add` (the script only needs them to exist); no gateway runs here.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/gateway-routing.sh"
);
/// Limit for every command but the script's `up`, which may wait for the TUNs.
const CMD_TIMEOUT: Duration = Duration::from_secs(20);
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(40);

const TUN_PRIV: &str = "snat-priv";
const TUN_PUB: &str = "snat-pub";
const PRIV_IF: &str = "gw-priv";
const PUB_IF: &str = "gw-pub";
const BLACKHOLE: &str = "blackhole default metric 4294967295";

// ---- commands with a timeout ------------------------------------------------------------

#[derive(Debug)]
struct Ran {
    cmd: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(&self) -> bool {
        self.status.success()
    }
    fn show(&self) -> String {
        format!(
            "`{}` -> {}\n--- stdout\n{}--- stderr\n{}",
            self.cmd, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `argv` in its own process group; on timeout kills that group (by its id) and
/// returns an error.
fn try_run(argv: &[&str], timeout: Duration) -> Result<Ran, String> {
    let cmd = argv.join(" ");
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("spawning `{cmd}`: {e}"))?;
    let drain = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let pgid = format!("-{}", child.id());
                let _ = Command::new("kill").args(["-KILL", "--", &pgid]).status();
                let _ = child.kill();
                let _ = child.wait();
                // The readers are not joined: a grandchild might still hold the pipes.
                return Err(format!("`{cmd}` did not finish within {timeout:?}"));
            }
            Err(e) => return Err(format!("waiting for `{cmd}`: {e}")),
        }
    };
    Ok(Ran {
        cmd,
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

fn run(argv: &[&str]) -> Ran {
    try_run(argv, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `argv`, which must succeed; returns its stdout.
fn run_ok(argv: &[&str]) -> String {
    let r = run(argv);
    assert!(r.ok(), "command failed: {}", r.show());
    r.stdout
}

// ---- namespaces -------------------------------------------------------------------------

/// This test's namespaces `<prefix><suffix>`; deleted by name on drop.
struct Namespaces {
    prefix: String,
    names: Vec<String>,
}

impl Namespaces {
    /// `prefix` is `sgdep<PID><tag>-`.
    fn new(tag: &str) -> Namespaces {
        Namespaces {
            prefix: format!("sgdep{}{tag}-", std::process::id()),
            names: Vec::new(),
        }
    }

    /// Creates namespace `<prefix><suffix>` (deleting a stale one of that name first) with
    /// its loopback up and IPv6 off; returns its name.
    fn add(&mut self, suffix: &str) -> String {
        let name = format!("{}{suffix}", self.prefix);
        // Registered before it exists, so a failure half-way still deletes it.
        self.names.push(name.clone());
        let _ = try_run(&["ip", "netns", "del", &name], CMD_TIMEOUT);
        run_ok(&["ip", "netns", "add", &name]);
        run_ok(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        sysctl_w(&name, "net.ipv6.conf.all.disable_ipv6=1");
        name
    }

    fn listed(&self) -> Vec<String> {
        run_ok(&["ip", "netns", "list"])
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&self.prefix))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            match try_run(&["ip", "netns", "del", name], CMD_TIMEOUT) {
                Ok(r) if r.ok() => {}
                Ok(r) => eprintln!("deploy_script: deleting namespace {name}: {}", r.show()),
                Err(e) => eprintln!("deploy_script: deleting namespace {name}: {e}"),
            }
        }
    }
}

fn ipn(ns: &str, args: &[&str]) -> String {
    let mut argv = vec!["ip", "-n", ns];
    argv.extend_from_slice(args);
    run_ok(&argv)
}

fn sysctl_w(ns: &str, kv: &str) {
    run_ok(&["ip", "netns", "exec", ns, "sysctl", "-q", "-w", kv]);
}

fn sysctl(ns: &str, key: &str) -> String {
    run_ok(&["ip", "netns", "exec", ns, "sysctl", "-n", key])
        .trim()
        .to_owned()
}

/// `ip rule show` of `ns` at prefs 1000..=1002, each line with its whitespace normalised
/// ("1001: from all iif gw-priv lookup 100").
fn our_rules(ns: &str) -> Vec<String> {
    ipn(ns, &["rule", "show"])
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| ["1000:", "1001:", "1002:"].iter().any(|p| l.starts_with(p)))
        .collect()
}

/// Routes of table `t` in `ns`, whitespace normalised; empty when the table does not exist.
fn table(ns: &str, t: &str) -> Vec<String> {
    let r = run(&["ip", "-n", ns, "route", "show", "table", t]);
    r.stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// `ip -n ns route get DST from SRC iif IIF` (the input route of a packet arriving on IIF;
/// rp_filter included).
fn route_get(ns: &str, dst: &str, src: &str, iif: &str) -> Ran {
    run(&["ip", "-n", ns, "route", "get", dst, "from", src, "iif", iif])
}

fn add_tun(ns: &str, name: &str) {
    ipn(
        ns,
        &["tuntap", "add", "mode", "tun", "multi_queue", "name", name],
    );
}

/// The script with `action` and the arguments of this topology plus `extra`.
fn script(ns: &str, action: &str, vnet: &str, extra: &[&str], timeout: Duration) -> Ran {
    let mut argv = vec![
        "bash",
        SCRIPT,
        action,
        "--netns",
        ns,
        "--private-if",
        PRIV_IF,
        "--public-if",
        PUB_IF,
        "--tun-private",
        TUN_PRIV,
        "--tun-public",
        TUN_PUB,
        "--vnet",
        vnet,
    ];
    argv.extend_from_slice(extra);
    try_run(&argv, timeout).unwrap_or_else(|e| panic!("{e}"))
}

// ---- tests ------------------------------------------------------------------------------

/// Gateway namespace with `gw-priv` (10.0.0.1/16, veth to `<prefix>p`, an instance at
/// 10.0.0.4) and `gw-pub` (198.51.100.2/24, veth to `<prefix>u`, the upstream router at
/// 198.51.100.1, which routes the public IP 203.0.113.10 to the gateway; MTU 1400 on this
/// link). Strict `rp_filter` on `all`, `default` and the gateway's interfaces before the
/// script runs.
fn topology(nss: &mut Namespaces) -> String {
    let gw = nss.add("gw");
    let p = nss.add("p");
    let u = nss.add("u");
    ipn(
        &gw,
        &[
            "link", "add", PRIV_IF, "type", "veth", "peer", "name", "eth0", "netns", &p,
        ],
    );
    ipn(
        &gw,
        &[
            "link", "add", PUB_IF, "type", "veth", "peer", "name", "eth0", "netns", &u,
        ],
    );
    ipn(&gw, &["addr", "add", "10.0.0.1/16", "dev", PRIV_IF]);
    ipn(&gw, &["addr", "add", "198.51.100.2/24", "dev", PUB_IF]);
    for i in [PRIV_IF, PUB_IF] {
        ipn(&gw, &["link", "set", i, "up"]);
    }
    ipn(&gw, &["route", "add", "default", "via", "198.51.100.1"]);
    ipn(&gw, &["link", "set", PUB_IF, "mtu", "1400"]);
    ipn(&p, &["addr", "add", "10.0.0.4/16", "dev", "eth0"]);
    ipn(&p, &["link", "set", "eth0", "up"]);
    ipn(&p, &["route", "add", "default", "via", "10.0.0.1"]);
    ipn(&u, &["addr", "add", "198.51.100.1/24", "dev", "eth0"]);
    ipn(&u, &["link", "set", "eth0", "up"]);
    ipn(
        &u,
        &["route", "add", "203.0.113.10/32", "via", "198.51.100.2"],
    );
    for kv in [
        "net.ipv4.ip_forward=0",
        "net.ipv4.conf.all.rp_filter=1",
        "net.ipv4.conf.default.rp_filter=1",
        "net.ipv4.conf.gw-priv.rp_filter=1",
        "net.ipv4.conf.gw-pub.rp_filter=2",
    ] {
        sysctl_w(&gw, kv);
    }
    gw
}

const VNET: &str = "10.0.0.0/17,10.0.128.0/17";

fn expected_rules() -> Vec<String> {
    vec![
        "1000: from all to 10.0.0.0/17 iif gw-priv lookup main".into(),
        "1000: from all to 10.0.128.0/17 iif gw-priv lookup main".into(),
        "1001: from all iif gw-priv lookup 100".into(),
        "1002: from all iif gw-pub lookup 101".into(),
    ]
}

fn assert_tables_point_at_tuns(gw: &str) {
    for (t, tun) in [("100", TUN_PRIV), ("101", TUN_PUB)] {
        let routes = table(gw, t);
        assert_eq!(routes.len(), 2, "table {t}: {routes:?}");
        assert!(
            routes
                .iter()
                .any(|r| r.starts_with(&format!("default dev {tun} "))),
            "table {t} has no `default dev {tun}`: {routes:?}"
        );
        assert!(
            routes.iter().any(|r| r == BLACKHOLE),
            "table {t} has no `{BLACKHOLE}`: {routes:?}"
        );
    }
}

#[test]
fn r1_7_r9_1_gateway_routing_up_waits_for_tuns_is_idempotent_and_down_removes_it() {
    if !snatgw_lab::root_or_skip() {
        return;
    }
    let mut nss = Namespaces::new("");
    let gw = topology(&mut nss);
    assert!(our_rules(&gw).is_empty());

    // `up` before the TUNs exist: it waits (bounded) for them.
    let gw2 = gw.clone();
    let up = thread::spawn(move || script(&gw2, "up", VNET, &["--wait", "15"], SCRIPT_TIMEOUT));
    thread::sleep(Duration::from_millis(1500));
    assert!(
        !up.is_finished(),
        "`up` returned before the TUNs existed: {}",
        up.join().map(|r| r.show()).unwrap_or_default()
    );
    add_tun(&gw, TUN_PRIV);
    add_tun(&gw, TUN_PUB);
    let first = up.join().expect("script thread");
    assert!(first.ok(), "first up failed: {}", first.show());
    println!("first up:\n{}", first.stdout);
    assert!(
        first.stdout.contains("waiting up to 15 s"),
        "{}",
        first.show()
    );
    // TUN MTU 1500 over a 1400 link: warned about, with the fix.
    assert!(
        first
            .stderr
            .contains("warning: snat-priv has MTU 1500, more than the smaller MTU")
            && first.stderr.contains("pass --tun-mtu 1400"),
        "{}",
        first.show()
    );

    // Rules (R1.7: VNet traffic stays in the main table), tables, sysctls.
    assert_eq!(our_rules(&gw), expected_rules());
    assert_tables_point_at_tuns(&gw);
    assert_eq!(sysctl(&gw, "net.ipv4.ip_forward"), "1");
    assert_eq!(sysctl(&gw, "net.ipv4.conf.all.forwarding"), "1");
    assert_eq!(sysctl(&gw, "net.ipv4.conf.all.rp_filter"), "0");
    assert_eq!(sysctl(&gw, "net.ipv4.conf.snat-priv.rp_filter"), "0");
    assert_eq!(sysctl(&gw, "net.ipv4.conf.snat-pub.rp_filter"), "0");
    // The operator's own setting on P and U is kept.
    assert_eq!(sysctl(&gw, "net.ipv4.conf.gw-priv.rp_filter"), "1");
    assert_eq!(sysctl(&gw, "net.ipv4.conf.gw-pub.rp_filter"), "2");

    // What the kernel does with it (R9.1: each side into its own TUN).
    let out = route_get(&gw, "203.0.113.100", "10.0.0.4", PRIV_IF);
    assert!(
        out.ok() && out.stdout.contains("dev snat-priv") && out.stdout.contains("table 100"),
        "instance -> internet must go to the private TUN: {}",
        out.show()
    );
    let vnet = route_get(&gw, "10.0.200.9", "10.0.0.4", PRIV_IF);
    assert!(
        vnet.ok() && vnet.stdout.contains("dev gw-priv") && !vnet.stdout.contains("table"),
        "VNet traffic must stay in the main table (R1.7): {}",
        vnet.show()
    );
    let inbound = route_get(&gw, "203.0.113.10", "203.0.113.100", PUB_IF);
    assert!(
        inbound.ok()
            && inbound.stdout.contains("dev snat-pub")
            && inbound.stdout.contains("table 101"),
        "internet -> public IP must go to the public TUN: {}",
        inbound.show()
    );
    // Packets the gateway writes back into a TUN use the main table and pass rp_filter.
    let translated_out = route_get(&gw, "203.0.113.100", "203.0.113.10", TUN_PRIV);
    assert!(
        translated_out.ok()
            && translated_out
                .stdout
                .contains("via 198.51.100.1 dev gw-pub"),
        "translated outbound packet from the private TUN: {}",
        translated_out.show()
    );
    let translated_in = route_get(&gw, "10.0.0.4", "203.0.113.100", TUN_PUB);
    assert!(
        translated_in.ok() && translated_in.stdout.contains("dev gw-priv"),
        "translated inbound packet from the public TUN: {}",
        translated_in.show()
    );

    // `up` again: nothing added, nothing duplicated.
    let second = script(&gw, "up", VNET, &[], SCRIPT_TIMEOUT);
    assert!(second.ok(), "second up failed: {}", second.show());
    println!("second up:\n{}", second.stdout);
    assert!(
        !second.stdout.contains("rule add") && second.stdout.contains("already present"),
        "second up must not add rules: {}",
        second.show()
    );
    assert_eq!(
        our_rules(&gw),
        expected_rules(),
        "duplicate rules after a second up"
    );
    assert_tables_point_at_tuns(&gw);

    // `--tun-mtu`: both TUNs at the smaller MTU, no warning.
    let mtu = script(&gw, "up", VNET, &["--tun-mtu", "1400"], SCRIPT_TIMEOUT);
    assert!(mtu.ok(), "up --tun-mtu failed: {}", mtu.show());
    assert!(!mtu.stderr.contains("warning"), "{}", mtu.show());
    for tun in [TUN_PRIV, TUN_PUB] {
        let link = ipn(&gw, &["link", "show", "dev", tun]);
        assert!(link.contains(" mtu 1400 "), "{tun}: {link}");
    }
    assert_eq!(our_rules(&gw), expected_rules());

    // The gateway exits: its TUNs and the routes through them go, the fallback stays.
    for tun in [TUN_PRIV, TUN_PUB] {
        ipn(&gw, &["link", "del", tun]);
    }
    assert_eq!(table(&gw, "100"), vec![BLACKHOLE.to_owned()]);
    assert_eq!(table(&gw, "101"), vec![BLACKHOLE.to_owned()]);
    let dropped = route_get(&gw, "203.0.113.100", "10.0.0.4", PRIV_IF);
    assert!(
        !dropped.ok() && !dropped.stdout.contains("gw-pub"),
        "without the gateway a private source must not be forwarded: {}",
        dropped.show()
    );

    // `down`: rules and tables gone, forwarding off; a second `down` is a no-op.
    let down = script(&gw, "down", VNET, &[], SCRIPT_TIMEOUT);
    assert!(down.ok(), "down failed: {}", down.show());
    println!("down:\n{}", down.stdout);
    assert!(
        our_rules(&gw).is_empty(),
        "rules left: {:?}",
        our_rules(&gw)
    );
    assert!(table(&gw, "100").is_empty(), "{:?}", table(&gw, "100"));
    assert!(table(&gw, "101").is_empty(), "{:?}", table(&gw, "101"));
    assert_eq!(sysctl(&gw, "net.ipv4.ip_forward"), "0");
    let again = script(&gw, "down", VNET, &[], SCRIPT_TIMEOUT);
    assert!(again.ok(), "second down failed: {}", again.show());
    assert!(!again.stdout.contains("rule del"), "{}", again.show());

    let prefix = nss.prefix.clone();
    let listed = nss.listed();
    assert_eq!(listed.len(), 3, "{listed:?}");
    drop(nss);
    let left: Vec<String> = run_ok(&["ip", "netns", "list"])
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

#[test]
fn gateway_routing_refuses_missing_interface_or_argument_and_fails_closed_without_tuns() {
    if !snatgw_lab::root_or_skip() {
        return;
    }
    let mut nss = Namespaces::new("m");
    let gw = nss.add("gw");
    ipn(
        &gw,
        &[
            "link", "add", PRIV_IF, "type", "veth", "peer", "name", PUB_IF,
        ],
    );
    for i in [PRIV_IF, PUB_IF] {
        ipn(&gw, &["link", "set", i, "up"]);
    }
    sysctl_w(&gw, "net.ipv4.ip_forward=0");
    let untouched = |what: &str| {
        assert!(our_rules(&gw).is_empty(), "{what}: rules added");
        assert!(table(&gw, "100").is_empty(), "{what}: table 100 changed");
        assert_eq!(
            sysctl(&gw, "net.ipv4.ip_forward"),
            "0",
            "{what}: forwarding on"
        );
    };

    // A missing interface: exit 1, the message names it, nothing changed.
    let r = script(
        &gw,
        "up",
        "10.0.0.0/16",
        &["--private-if", "nosuch0"],
        SCRIPT_TIMEOUT,
    );
    println!("missing interface:\n{}", r.stderr);
    assert_eq!(r.status.code(), Some(1), "{}", r.show());
    assert!(
        r.stderr.contains("interface 'nosuch0' not found"),
        "{}",
        r.show()
    );
    untouched("missing interface");

    // A missing argument: exit 2 with the usage.
    let r = try_run(
        &[
            "bash",
            SCRIPT,
            "up",
            "--netns",
            &gw,
            "--private-if",
            PRIV_IF,
            "--public-if",
            PUB_IF,
            "--tun-private",
            TUN_PRIV,
            "--tun-public",
            TUN_PUB,
        ],
        SCRIPT_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status.code(), Some(2), "{}", r.show());
    assert!(
        r.stderr.contains("missing argument(s): --vnet") && r.stderr.contains("usage:"),
        "{}",
        r.show()
    );
    untouched("missing argument");

    // A public IP assigned to an interface: refused, nothing changed.
    ipn(&gw, &["addr", "add", "203.0.113.10/32", "dev", "lo"]);
    let r = script(
        &gw,
        "up",
        "10.0.0.0/16",
        &["--public-ip", "192.0.2.11,203.0.113.10"],
        SCRIPT_TIMEOUT,
    );
    assert_eq!(r.status.code(), Some(1), "{}", r.show());
    assert!(
        r.stderr.contains("public IP 203.0.113.10 is local"),
        "{}",
        r.show()
    );
    untouched("public IP on lo");
    ipn(&gw, &["addr", "del", "203.0.113.10/32", "dev", "lo"]);

    // The TUNs never appear: exit 1 naming them after the bounded wait, with the rules and
    // the blackhole fallbacks in place (fail closed) and no route into a TUN.
    let t0 = Instant::now();
    let r = script(&gw, "up", "10.0.0.0/16", &["--wait", "1"], SCRIPT_TIMEOUT);
    println!("no TUNs:\n{}", r.stderr);
    assert_eq!(r.status.code(), Some(1), "{}", r.show());
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    assert!(
        r.stderr.contains(TUN_PRIV) && r.stderr.contains(TUN_PUB),
        "{}",
        r.show()
    );
    assert_eq!(our_rules(&gw).len(), 3, "{:?}", our_rules(&gw));
    assert_eq!(table(&gw, "100"), vec![BLACKHOLE.to_owned()]);
    assert_eq!(table(&gw, "101"), vec![BLACKHOLE.to_owned()]);
}
