//! [`Lab`]: brings the reference topology up in network namespaces and tears it down.
//!
//! What it does: creates `<prefix>gw`, `<prefix>inet` and one `<prefix>i-<name>` namespace
//! per instance with `ip netns add`, wires them with veths and a bridge, sets sysctls inside
//! them, installs the gateway mode's routing (policy routing to a TUN, or nftables NAT),
//! runs commands and processes inside them, and removes all of it again: [`Lab::down`]
//! kills the processes it started (through their handles), then every process still inside
//! a namespace with the lab's prefix (by PID, never this process), then deletes those
//! namespaces. `Drop` calls `down`, so a panicking test cleans up too.
//!
//! Safety rules kept here: every command that changes anything names a lab namespace
//! (`ip -n NS ...` or `ip netns exec NS ...`, checked to start with the prefix); nothing
//! runs against the host's own interfaces, routes or firewall; no namespace gets a route
//! towards the host's networks (the only routes are the lab's documentation ranges).
//!
//! What it does not do: run the gateway (the caller starts it, e.g. with [`Lab::spawn`] in
//! [`Lab::gw_ns`]), or choose the gateway's public IPs (the snatgw configuration does).
//!
//! Routing in [`GatewayMode::Snatgw`] (gateway namespace) is the operator's, applied by
//! running `scripts/gateway-routing.sh up --netns <gw>` (built in, [`GATEWAY_ROUTING_SH`])
//! from [`Lab::configure_tun`] once the gateway's TUNs exist; until then forwarding is off:
//! - `ip rule pref 1000 iif br-priv to 10.0.0.0/16 lookup main` (R1.7: no NAT inside the VNet)
//! - `ip rule pref 1001 iif br-priv lookup 100` and `pref 1002 iif gw-inet lookup 101`
//! - table 100: `default dev <private tun>`, table 101: `default dev <public tun>` and, in
//!   both, `blackhole default metric 4294967295`, so once the gateway is gone nothing leaks
//!   untranslated. The gateway tells outbound from inbound by the TUN a packet came from
//!   (SPEC R9.1), never by its addresses.
//! - packets the gateway writes into a TUN arrive with `iif <tun>`, match no rule and use
//!   the main table: public destinations via `198.51.100.2` on `gw-inet`, `10.0.0.0/16` on
//!   `br-priv`. `rp_filter` is 0 everywhere (the TUN's sources are not routed back to it).
//!   The public IPs are assigned to no interface, so the kernel never answers for them.
//!
//! Routing in [`GatewayMode::Kernel`]: no policy routing; an nftables `snat`/`masquerade`
//! rule in postrouting for traffic leaving on `gw-inet`, then a filter hook after NAT that
//! drops anything still carrying a private source (fail closed). Replies are translated back
//! by conntrack in prerouting, before routing, so the public IPs need not be local; each gets
//! a `blackhole /32` so unsolicited inbound traffic is dropped (R3.8) rather than bounced
//! back to the internet by the default route.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::ClientReport;
use crate::cmd::{describe, run, run_ok, SETUP_TIMEOUT};
use crate::spec::*;
use crate::LabError;

/// Default limit for [`Lab::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// A running lab; see the module docs. Dropping it tears it down.
#[derive(Debug)]
pub struct Lab {
    spec: LabSpec,
    children: Mutex<Vec<LabChild>>,
    is_down: bool,
    /// Arguments inserted between the server binary and `serve`/`client` (e.g.
    /// `lab-server` when the binary is the lab tool `snatgw-lab`).
    server_sub: Vec<String>,
}

impl Lab {
    /// Builds the lab described by `spec`.
    ///
    /// Namespaces left over with the same prefix (from a crashed run) are removed first. On
    /// error, everything created so far is removed again.
    pub fn up(spec: LabSpec) -> Result<Lab, LabError> {
        spec.validate()?;
        check_tools()?;
        down_prefix(&spec.prefix)?;
        let lab = Lab {
            spec,
            children: Mutex::new(Vec::new()),
            is_down: false,
            server_sub: Vec::new(),
        };
        // If build fails, `lab` is dropped here and Drop removes what was created.
        lab.build()?;
        Ok(lab)
    }

    /// Uses `server_bin SUBCOMMAND serve|client ...` in [`start_servers`](Self::start_servers)
    /// and [`client`](Self::client): for a binary that embeds the servers behind a
    /// subcommand, such as `snatgw-lab lab-server`. `None` (the default): `server_bin serve`.
    pub fn set_server_subcommand(&mut self, sub: Option<&str>) {
        self.server_sub = sub.map(|s| vec![s.to_string()]).unwrap_or_default();
    }

    /// Leaves the lab running after this value is dropped (for `lab up`): processes started
    /// with [`spawn`](Self::spawn) keep running; remove everything later with
    /// [`down_prefix`]. Returns the prefix.
    pub fn detach(mut self) -> String {
        self.is_down = true;
        lock(&self.children).clear();
        self.spec.prefix.clone()
    }

    /// The spec the lab was built from.
    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }

    /// Namespace of the gateway.
    pub fn gw_ns(&self) -> String {
        self.spec.gw_ns()
    }

    /// Namespace of the internet.
    pub fn inet_ns(&self) -> String {
        self.spec.inet_ns()
    }

    /// Namespace of instance `instance`.
    ///
    /// # Panics
    /// If the lab has no such instance (a test bug).
    pub fn ns_name(&self, instance: &str) -> String {
        assert!(
            self.spec.instances.iter().any(|i| i.name == instance),
            "lab has no instance {instance:?}"
        );
        self.spec.instance_ns(instance)
    }

    /// Private IP of instance `instance`, if it exists.
    pub fn instance_ip(&self, instance: &str) -> Option<Ipv4Addr> {
        self.spec
            .instances
            .iter()
            .find(|i| i.name == instance)
            .map(|i| i.ip)
    }

    fn check_ns(&self, ns: &str) -> Result<(), LabError> {
        if self.spec.namespaces().iter().any(|n| n == ns) {
            Ok(())
        } else {
            Err(LabError::NotInLab(ns.to_string()))
        }
    }

    /// Runs `argv` inside namespace `ns` (`ip netns exec`) and returns its output (any exit
    /// status), killing it after [`EXEC_TIMEOUT`].
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Result<Output, LabError> {
        self.exec_timeout(ns, argv, EXEC_TIMEOUT)
    }

    /// [`exec`](Self::exec) with an explicit time limit.
    pub fn exec_timeout(
        &self,
        ns: &str,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<Output, LabError> {
        self.check_ns(ns)?;
        if argv.is_empty() {
            return Err(LabError::InvalidSpec("empty command".into()));
        }
        run(&mut netns_exec(ns, argv), None, timeout)
    }

    /// Starts `argv` inside namespace `ns`: stdin null, stdout piped (read it with
    /// [`LabChild::read_line`] or take it), stderr inherited. The process is killed by
    /// [`down`](Self::down) if still running.
    pub fn spawn(&self, ns: &str, argv: &[&str]) -> Result<LabChild, LabError> {
        self.spawn_with(ns, argv, Stdio::piped(), Stdio::inherit())
    }

    /// [`spawn`](Self::spawn) with chosen stdout and stderr.
    pub fn spawn_with(
        &self,
        ns: &str,
        argv: &[&str],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<LabChild, LabError> {
        self.check_ns(ns)?;
        if argv.is_empty() {
            return Err(LabError::InvalidSpec("empty command".into()));
        }
        let mut cmd = netns_exec(ns, argv);
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        let what = describe(&cmd);
        // `ip netns exec` execs the command in place: the PID is the command's own.
        let child = cmd
            .spawn()
            .map_err(|source| LabError::Spawn { cmd: what, source })?;
        let lc = LabChild::new(child, ns.to_string());
        lock(&self.children).push(lc.clone());
        Ok(lc)
    }

    /// Starts `snatgw-lab-server serve` (binary at `server_bin`) in the internet namespace on
    /// every server address, answering `myip.<zone>`, and waits until it listens.
    pub fn start_servers(&self, server_bin: &Path, zone: &str) -> Result<LabChild, LabError> {
        let bin = server_bin.to_string_lossy().into_owned();
        let mut argv = vec![bin.as_str()];
        argv.extend(self.server_sub.iter().map(String::as_str));
        argv.extend(["serve", "--zone", zone]);
        let addrs: Vec<String> = self.spec.servers.iter().map(|a| a.to_string()).collect();
        for a in &addrs {
            argv.push("--addr");
            argv.push(a);
        }
        let child = self.spawn(&self.inet_ns(), &argv)?;
        match child.read_line(Duration::from_secs(10))? {
            Some(line) if line.contains("\"ready\"") => Ok(child),
            other => {
                let _ = child.kill();
                Err(LabError::BadOutput {
                    cmd: argv.join(" "),
                    reason: format!("expected the ready line, got {other:?}"),
                })
            }
        }
    }

    /// Runs `snatgw-lab-server client ARGS` in instance `instance` and parses its report.
    ///
    /// `args` are the client's arguments after `client`, e.g. `["myip-http",
    /// "203.0.113.100:80"]`. The client's own `--timeout` bounds each operation; `timeout`
    /// bounds the whole run.
    pub fn client(
        &self,
        instance: &str,
        server_bin: &Path,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ClientReport, LabError> {
        let ns = self.ns_name(instance);
        let bin = server_bin.to_string_lossy().into_owned();
        let mut argv = vec![bin.as_str()];
        argv.extend(self.server_sub.iter().map(String::as_str));
        argv.push("client");
        argv.extend_from_slice(args);
        let out = self.exec_timeout(&ns, &argv, timeout)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().rev().find(|l| l.starts_with('{'));
        match line {
            Some(l) => serde_json::from_str(l).map_err(|e| LabError::BadOutput {
                cmd: argv.join(" "),
                reason: format!("{e}: {l}"),
            }),
            None => Err(LabError::BadOutput {
                cmd: argv.join(" "),
                reason: format!(
                    "no report; status {}, stderr: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            }),
        }
    }

    /// Runs `f` on a new thread that first joins namespace `ns` (`setns(2)` on that thread
    /// only; the rest of the process stays where it is). Sockets and TUN devices the thread
    /// creates belong to `ns`. Join the thread before [`down`](Self::down).
    pub fn spawn_thread_in<T, F>(&self, ns: &str, f: F) -> Result<JoinHandle<T>, LabError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.check_ns(ns)?;
        let path = format!("/run/netns/{ns}");
        let file = std::fs::File::open(&path).map_err(|source| LabError::Spawn {
            cmd: format!("open {path}"),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(format!("in-{ns}"))
            .spawn(move || {
                let res = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET);
                let ok = res.is_ok();
                let _ = tx.send(res);
                if !ok {
                    // Never run `f` in the wrong namespace.
                    panic!("setns failed");
                }
                f()
            })
            .map_err(|source| LabError::Spawn {
                cmd: "thread".into(),
                source,
            })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(LabError::Spawn {
                    cmd: format!("setns {ns}"),
                    source: e.into(),
                })
            }
            Err(_) => Err(LabError::Spawn {
                cmd: format!("setns {ns}"),
                source: std::io::Error::other("thread died"),
            }),
        }
    }

    /// Waits until interface `ifname` exists in namespace `ns`.
    pub fn wait_for_link(&self, ns: &str, ifname: &str, timeout: Duration) -> Result<(), LabError> {
        self.check_ns(ns)?;
        let deadline = Instant::now() + timeout;
        loop {
            let out = run(
                Command::new("ip").args(["-n", ns, "link", "show", "dev", ifname]),
                None,
                SETUP_TIMEOUT,
            )?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout {
                    cmd: format!("wait for {ifname} in {ns}"),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`GatewayMode::Snatgw`] only: once the gateway has created its TUNs, applies
    /// `scripts/gateway-routing.sh up` in the gateway namespace ([`gateway_routing_up`]):
    /// the rules and blackhole fallbacks, forwarding on, the TUNs up with `rp_filter` 0,
    /// table 100 pointed at the private TUN and table 101 at the public one. Idempotent.
    pub fn configure_tun(&self) -> Result<(), LabError> {
        let GatewayMode::Snatgw {
            tun_private,
            tun_public,
        } = &self.spec.mode
        else {
            return Err(LabError::WrongMode(
                "configure_tun needs GatewayMode::Snatgw",
            ));
        };
        gateway_routing_up(&self.gw_ns(), tun_private, tun_public).map(|_| ())
    }

    /// Tears the lab down (see the module docs). Idempotent; also called by `Drop`.
    pub fn down(&mut self) -> Result<(), LabError> {
        if self.is_down {
            return Ok(());
        }
        self.is_down = true;
        let children = std::mem::take(&mut *lock(&self.children));
        for c in &children {
            let _ = c.kill();
        }
        down_prefix(&self.spec.prefix)
    }

    fn build(&self) -> Result<(), LabError> {
        let s = &self.spec;
        let gw = s.gw_ns();
        let inet = s.inet_ns();
        for ns in s.namespaces() {
            host(&["netns", "add", &ns])?;
            ipn(&ns, &["link", "set", "lo", "up"])?;
            let mut keys = vec![
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ];
            if ns == gw {
                // Snatgw mode: forwarding comes with the routing (`configure_tun`).
                if matches!(s.mode, GatewayMode::Kernel(_)) {
                    keys.push("net.ipv4.ip_forward=1");
                }
                keys.extend([
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.default.send_redirects=0",
                ]);
            }
            sysctl(&ns, &keys)?;
        }

        // Gateway: private bridge and link to the internet.
        ipn(
            &gw,
            &["link", "add", BRIDGE, "type", "bridge", "stp_state", "0"],
        )?;
        ipn(
            &gw,
            &["addr", "add", &format!("{GW_PRIVATE_IP}/16"), "dev", BRIDGE],
        )?;
        ipn(&gw, &["link", "set", BRIDGE, "up"])?;
        ipn(
            &gw,
            &[
                "link", "add", GW_INET_IF, "type", "veth", "peer", "name", INET_GW_IF, "netns",
                &inet,
            ],
        )?;
        ipn(
            &gw,
            &[
                "addr",
                "add",
                &format!("{GW_INET_IP}/24"),
                "dev",
                GW_INET_IF,
            ],
        )?;
        ipn(&gw, &["link", "set", GW_INET_IF, "up"])?;
        ipn(
            &gw,
            &["route", "add", "default", "via", &INET_GW_IP.to_string()],
        )?;
        self.offload(&gw, GW_INET_IF)?;

        // Internet: link, servers on lo, public ranges routed to the gateway.
        ipn(
            &inet,
            &[
                "addr",
                "add",
                &format!("{INET_GW_IP}/24"),
                "dev",
                INET_GW_IF,
            ],
        )?;
        ipn(&inet, &["link", "set", INET_GW_IF, "up"])?;
        self.offload(&inet, INET_GW_IF)?;
        for a in &s.servers {
            ipn(&inet, &["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
        }
        for (net, len) in PUBLIC_NETS {
            ipn(
                &inet,
                &[
                    "route",
                    "add",
                    &format!("{net}/{len}"),
                    "via",
                    &GW_INET_IP.to_string(),
                ],
            )?;
        }

        // Instances.
        for i in &s.instances {
            let ns = s.instance_ns(&i.name);
            let peer = format!("v-{}", i.name);
            ipn(
                &ns,
                &[
                    "link",
                    "add",
                    INSTANCE_IF,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &peer,
                    "netns",
                    &gw,
                ],
            )?;
            ipn(&gw, &["link", "set", &peer, "master", BRIDGE, "up"])?;
            ipn(
                &ns,
                &["addr", "add", &format!("{}/16", i.ip), "dev", INSTANCE_IF],
            )?;
            ipn(&ns, &["link", "set", INSTANCE_IF, "up"])?;
            ipn(
                &ns,
                &["route", "add", "default", "via", &GW_PRIVATE_IP.to_string()],
            )?;
            self.offload(&ns, INSTANCE_IF)?;
            self.offload(&gw, &peer)?;
        }

        match &s.mode {
            GatewayMode::Snatgw { .. } => {
                // The policy routing is `scripts/gateway-routing.sh`'s, applied by
                // `configure_tun` once the gateway's TUNs exist; until then forwarding is
                // off (the script turns it on after the rules and fallbacks), so nothing
                // leaves untranslated.
            }
            GatewayMode::Kernel(nat) => {
                let mut publics: Vec<Ipv4Addr> = s.public_ips.clone();
                if let KernelNat::Snat(rules) = nat {
                    publics.extend(rules.iter().map(|r| r.public));
                }
                let mut seen = HashSet::new();
                for p in publics.into_iter().filter(|p| seen.insert(*p)) {
                    ipn(&gw, &["route", "add", "blackhole", &format!("{p}/32")])?;
                }
                let rules = nft_ruleset(nat);
                run_ok(
                    &mut netns_exec(&gw, &["nft", "-f", "-"]),
                    Some(rules.as_bytes()),
                    SETUP_TIMEOUT,
                )?;
            }
        }
        Ok(())
    }

    fn offload(&self, ns: &str, ifname: &str) -> Result<(), LabError> {
        let v = if self.spec.offloads { "on" } else { "off" };
        run_ok(
            &mut netns_exec(
                ns,
                &[
                    "ethtool", "-K", ifname, "tx", v, "tso", v, "gso", v, "gro", v,
                ],
            ),
            None,
            SETUP_TIMEOUT,
        )
        .map(|_| ())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("snatgw-lab: tearing down {}*: {e}", self.spec.prefix);
        }
    }
}

/// The nftables ruleset for [`GatewayMode::Kernel`].
pub fn nft_ruleset(nat: &KernelNat) -> String {
    let mut r = String::from("table ip snatgw_lab {\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n");
    match nat {
        KernelNat::Masquerade => {
            r.push_str(&format!(
                "    oifname \"{GW_INET_IF}\" ip saddr {}/{} masquerade\n",
                PRIVATE_NET.0, PRIVATE_NET.1
            ));
        }
        KernelNat::Snat(rules) => {
            for rule in rules {
                // A port range needs a transport protocol match; other protocols (ICMP)
                // fall through to the address-only rule.
                if let Some((lo, hi)) = rule.ports {
                    r.push_str(&format!(
                        "    oifname \"{GW_INET_IF}\" ip saddr {} meta l4proto {{ tcp, udp }} snat to {}:{lo}-{hi}\n",
                        rule.private, rule.public
                    ));
                }
                r.push_str(&format!(
                    "    oifname \"{GW_INET_IF}\" ip saddr {} snat to {}\n",
                    rule.private, rule.public
                ));
            }
        }
    }
    r.push_str("  }\n");
    // After NAT (priority srcnat + 1): anything still private must not leave.
    r.push_str(&format!(
        "  chain leak {{\n    type filter hook postrouting priority srcnat + 1; policy accept;\n    oifname \"{GW_INET_IF}\" ip saddr {}/{} counter drop\n  }}\n}}\n",
        PRIVATE_NET.0, PRIVATE_NET.1
    ));
    r
}

/// `scripts/gateway-routing.sh`, the operator's policy routing for `snatgw run`
/// (docs/RUNNING.md), built into the lab so it applies exactly that routing wherever its
/// binary runs: the script is the one source of the gateway's routing.
pub const GATEWAY_ROUTING_SH: &str = include_str!("../../../scripts/gateway-routing.sh");

/// Runs [`GATEWAY_ROUTING_SH`] `up` in lab gateway namespace `gw_ns` (`--netns`: every
/// command is `ip -n NS` or `ip netns exec NS`) for the lab's sides (`br-priv`, `gw-inet`),
/// VNet `10.0.0.0/16`, tables 100 and 101 and TUNs `tun_private`, `tun_public`: blackhole
/// fallbacks, rules 1000–1002, `rp_filter` 0, forwarding on, then (once both TUNs exist,
/// waiting at most 5 s) the TUNs up with `rp_filter` 0 and each table's `default dev <tun>`.
/// Idempotent. For [`Lab::configure_tun`], or a gateway started in that namespace by other
/// means. Returns the script's output (the commands it ran and the resulting rules/tables).
pub fn gateway_routing_up(
    gw_ns: &str,
    tun_private: &str,
    tun_public: &str,
) -> Result<Output, LabError> {
    assert!(!gw_ns.is_empty());
    let vnet = format!("{}/{}", PRIVATE_NET.0, PRIVATE_NET.1);
    let (tp, tu) = (TUN_TABLE_PRIVATE.to_string(), TUN_TABLE_PUBLIC.to_string());
    // `bash -c '. /dev/stdin' NAME ARGS...`: the script, fed on stdin and read whole by `.`,
    // runs with $0 = its own name and the arguments as given; the command line stays short.
    let mut cmd = Command::new("bash");
    cmd.args([
        "-c",
        ". /dev/stdin",
        "gateway-routing.sh",
        "up",
        "--netns",
        gw_ns,
    ])
    .args(["--private-if", BRIDGE, "--public-if", GW_INET_IF])
    .args(["--tun-private", tun_private, "--tun-public", tun_public])
    .args([
        "--vnet",
        &vnet,
        "--table-private",
        &tp,
        "--table-public",
        &tu,
    ])
    .args(["--wait", "5"]);
    run_ok(&mut cmd, Some(GATEWAY_ROUTING_SH.as_bytes()), SETUP_TIMEOUT)
}

/// Namespaces of the lab with prefix `prefix` (`ip netns list`; see [`ns_has_prefix`]).
pub fn list_namespaces(prefix: &str) -> Result<Vec<String>, LabError> {
    if !valid_prefix(prefix) {
        return Err(LabError::InvalidSpec(format!("bad prefix {prefix:?}")));
    }
    let out = run_ok(
        Command::new("ip").args(["netns", "list"]),
        None,
        SETUP_TIMEOUT,
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| ns_has_prefix(n, prefix))
        .map(str::to_string)
        .collect())
}

/// Removes every namespace of the lab with prefix `prefix` (see [`ns_has_prefix`]), after
/// killing (SIGKILL, by PID) the processes inside it other than this one. Errors if one is
/// still listed afterwards, or if `prefix` is not a valid lab prefix.
pub fn down_prefix(prefix: &str) -> Result<(), LabError> {
    let me = std::process::id();
    for ns in list_namespaces(prefix)? {
        if let Ok(out) = run(
            Command::new("ip").args(["netns", "pids", &ns]),
            None,
            SETUP_TIMEOUT,
        ) {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .filter(|&p| p > 1 && p as u32 != me)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = run(
            Command::new("ip").args(["netns", "del", &ns]),
            None,
            SETUP_TIMEOUT,
        );
    }
    let left = list_namespaces(prefix)?;
    if left.is_empty() {
        Ok(())
    } else {
        Err(LabError::Cleanup(left.join(" ")))
    }
}

/// Checks the external tools are installed.
fn check_tools() -> Result<(), LabError> {
    for tool in ["ip", "nft", "ethtool", "sysctl"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false)
            || ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .any(|d| Path::new(d).join(tool).is_file());
        if !found {
            return Err(LabError::MissingTool(tool));
        }
    }
    Ok(())
}

/// `ip netns exec NS argv...`
fn netns_exec(ns: &str, argv: &[&str]) -> Command {
    assert!(!ns.is_empty());
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(argv);
    c
}

/// `ip -n NS args...` (always inside a lab namespace).
fn ipn(ns: &str, args: &[&str]) -> Result<(), LabError> {
    assert!(!ns.is_empty());
    run_ok(
        Command::new("ip").arg("-n").arg(ns).args(args),
        None,
        SETUP_TIMEOUT,
    )
    .map(|_| ())
}

/// `ip netns ...` namespace management (add/del/list/pids), the only host-level commands.
fn host(args: &[&str]) -> Result<(), LabError> {
    debug_assert_eq!(args.first(), Some(&"netns"));
    run_ok(Command::new("ip").args(args), None, SETUP_TIMEOUT).map(|_| ())
}

/// `sysctl -q -e -w k=v...` inside namespace `ns` (unknown keys ignored).
fn sysctl(ns: &str, keys: &[&str]) -> Result<(), LabError> {
    let mut argv = vec!["sysctl", "-q", "-e", "-w"];
    argv.extend_from_slice(keys);
    run_ok(&mut netns_exec(ns, &argv), None, SETUP_TIMEOUT).map(|_| ())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A process started in a lab namespace by [`Lab::spawn`]. Cloneable handle; the lab keeps
/// one and kills the process in [`Lab::down`] if it is still running.
#[derive(Debug, Clone)]
pub struct LabChild {
    inner: Arc<ChildInner>,
}

#[derive(Debug)]
struct ChildInner {
    child: Mutex<Child>,
    pid: u32,
    ns: String,
    lines: Mutex<Option<Receiver<String>>>,
}

impl LabChild {
    fn new(child: Child, ns: String) -> Self {
        let pid = child.id();
        LabChild {
            inner: Arc::new(ChildInner {
                child: Mutex::new(child),
                pid,
                ns,
                lines: Mutex::new(None),
            }),
        }
    }

    /// Process ID.
    pub fn id(&self) -> u32 {
        self.inner.pid
    }

    /// Namespace it runs in.
    pub fn ns(&self) -> &str {
        &self.inner.ns
    }

    /// Takes the stdout pipe (if piped and not yet taken or being read by `read_line`).
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        lock(&self.inner.child).stdout.take()
    }

    /// Takes the stderr pipe (if piped).
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        lock(&self.inner.child).stderr.take()
    }

    /// Reads the next line of stdout (without the newline), waiting at most `timeout`.
    /// `Ok(None)`: stdout closed. The first call starts a reader thread that owns stdout.
    pub fn read_line(&self, timeout: Duration) -> Result<Option<String>, LabError> {
        let mut lines = lock(&self.inner.lines);
        if lines.is_none() {
            let Some(out) = self.take_stdout() else {
                return Ok(None);
            };
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            *lines = Some(rx);
        }
        let rx = lines
            .as_ref()
            .ok_or_else(|| LabError::Cleanup("no reader".into()))?;
        match rx.recv_timeout(timeout) {
            Ok(l) => Ok(Some(l)),
            Err(RecvTimeoutError::Disconnected) => Ok(None),
            Err(RecvTimeoutError::Timeout) => Err(LabError::Timeout {
                cmd: format!("read from pid {}", self.inner.pid),
                timeout,
            }),
        }
    }

    /// Reads the next stdout line and parses it as a [`ClientReport`].
    pub fn read_report(&self, timeout: Duration) -> Result<ClientReport, LabError> {
        let line = self
            .read_line(timeout)?
            .ok_or_else(|| LabError::BadOutput {
                cmd: format!("pid {}", self.inner.pid),
                reason: "stdout closed before a report".into(),
            })?;
        serde_json::from_str(&line).map_err(|e| LabError::BadOutput {
            cmd: format!("pid {}", self.inner.pid),
            reason: format!("{e}: {line}"),
        })
    }

    /// Exit status if the process has exited.
    pub fn try_wait(&self) -> std::io::Result<Option<ExitStatus>> {
        lock(&self.inner.child).try_wait()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM if the process has not exited yet (a graceful stop request).
    pub fn terminate(&self) -> std::io::Result<()> {
        let mut c = lock(&self.inner.child);
        if c.try_wait()?.is_none() {
            // Not reaped yet, so the PID still names our child.
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.inner.pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .map_err(std::io::Error::from)?;
        }
        Ok(())
    }

    /// Kills (SIGKILL) the process if still running and reaps it.
    pub fn kill(&self) -> std::io::Result<()> {
        let mut c = lock(&self.inner.child);
        if c.try_wait()?.is_none() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}
