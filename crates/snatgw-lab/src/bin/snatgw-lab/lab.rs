//! `snatgw-lab lab up|down|demo` (run by users as `snatgw lab ...`): the reference lab (the
//! `snatgw-lab` library) with the gateway running.
//!
//! What it does: derives the lab (instance namespaces, public IPs) from a snatgw configuration
//! file (`examples/lab.toml` by default) so the two cannot drift, starts the lab's servers
//! (this same binary, `snatgw-lab lab-server serve`) in the internet namespace and `snatgw run`
//! (the binary [`crate::gateway_bin`] finds) in the gateway namespace. `up` leaves it running (until `down`); `demo` drives real
//! connections from every instance, prints what the internet saw, shows ports shared
//! across destinations and an exhaustion happening (with the `/metrics` lines that show it)
//! and clearing, makes one live change through the management API (an ILPIP for the
//! exhausted instance, SPEC R1.4) and shows its new public address, shows inbound load
//! balancing and a health probe going down (`lab_inbound`, R5.1, R5.2, R4.5), then removes
//! everything.
//!
//! What it does not do: touch anything outside the lab's namespaces (see `snatgw-lab`).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use snatgw_control::{Client, ClientError};
use snatgw_core::config::{InstanceCfg, PublicIpCfg};
use snatgw_lab::gateway::{
    spec_from_config, start_gateway, stop_gateway, GatewayOptions, DEFAULT_API,
};
use snatgw_lab::{ClientReport, Lab, LabChild};

use snatgw_runtime::fastpath::FastPathMode;
use snatgw_runtime::stats;

fn parse_fast_path(s: &str) -> Result<FastPathMode, String> {
    s.parse()
        .map_err(|e: snatgw_runtime::fastpath::UnknownMode| e.to_string())
}

/// `snatgw lab ...` (`snatgw-lab lab ...`).
#[derive(Subcommand, Debug)]
pub enum LabCmd {
    /// Build the lab, start the servers and the gateway, and leave them running.
    Up(UpArgs),
    /// Remove a lab: kill its processes and delete its namespaces.
    Down {
        /// The lab's namespace prefix.
        #[arg(long, default_value = "sgl-")]
        prefix: String,
    },
    /// Build the lab, show every scenario, port sharing, an exhaustion, one live change
    /// through the management API, inbound load balancing and a probe going down, remove it.
    Demo(UpArgs),
}

/// Options shared by `lab up` and `lab demo`.
#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Gateway configuration; the lab is derived from it.
    #[arg(long, short, default_value = "examples/lab.toml")]
    pub config: PathBuf,
    /// Namespace prefix (`[a-z0-9]+-`).
    #[arg(long, default_value = "sgl-")]
    pub prefix: String,
    /// Gateway queues (worker threads).
    #[arg(long, default_value_t = 2)]
    pub queues: usize,
    /// Turn veth offloads on (default off).
    #[arg(long)]
    pub veth_offloads: bool,
    /// TUN virtio-net offload on.
    #[arg(long)]
    pub tun_offload: bool,
    /// The gateway's kernel fast path (`snatgw run --fast-path`), attached to the lab's bridge
    /// and internet link; `auto` uses it when this build and kernel can.
    #[arg(long, default_value = "auto", value_parser = parse_fast_path)]
    pub fast_path: FastPathMode,
}

/// Zone of the lab's DNS "which IP am I" responder.
pub const ZONE: &str = "snatgw.test";
/// First internet server (HTTP/DNS/echo/hold).
pub const SERVER_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
/// Second internet server.
pub const SERVER_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 101);
/// DNS server address.
pub const SERVER_DNS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

/// A lab with servers and the gateway running.
pub struct Running {
    /// The lab (dropping it removes everything).
    pub lab: Lab,
    /// The gateway process.
    pub gw: LabChild,
    /// Directory with the stats file and the gateway's log.
    pub dir: PathBuf,
    /// The stats file.
    pub stats: PathBuf,
    /// This binary (the lab's servers and clients: `<exe> lab-server ...`).
    pub exe: PathBuf,
    /// The `snatgw` binary running as the gateway.
    pub gateway: PathBuf,
    /// The gateway's API bearer token (generated in its state directory).
    pub token: Option<String>,
    /// The file holding it.
    pub token_file: PathBuf,
}

impl Running {
    /// Runs a lab client in `instance` (arguments after `client`).
    pub fn client(&self, instance: &str, args: &[&str]) -> Result<ClientReport, String> {
        self.lab
            .client(instance, &self.exe, args, Duration::from_secs(60))
            .map_err(|e| e.to_string())
    }

    /// Starts a lab client in `instance` in the background (arguments after `client`).
    pub fn spawn_client(&self, instance: &str, args: &[&str]) -> Result<LabChild, String> {
        let exe = self.exe.to_string_lossy().into_owned();
        let mut argv = vec![exe.as_str(), "lab-server", "client"];
        argv.extend_from_slice(args);
        self.lab
            .spawn(&self.lab.ns_name(instance), &argv)
            .map_err(|e| e.to_string())
    }

    /// Reads the gateway's latest stats snapshot.
    pub fn snapshot(&self) -> Result<stats::Snapshot, String> {
        stats::read(&self.stats).map_err(|e| e.to_string())
    }

    /// Runs `f` with a client of the gateway's management API on a thread inside the
    /// gateway namespace (the API listens on that namespace's loopback, `127.0.0.1:7070`).
    pub fn api<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Client) -> Result<T, ClientError> + Send + 'static,
    ) -> Result<T, String> {
        let c = Client::new(&format!("http://{DEFAULT_API}"), self.token.clone());
        self.lab
            .spawn_thread_in(&self.lab.gw_ns(), move || f(&c))
            .map_err(|e| e.to_string())?
            .join()
            .map_err(|_| "the API client thread panicked".to_string())?
            .map_err(|e| format!("management API: {e}"))
    }
}

/// Builds the lab for `a` (only the instances in `only`, if given), starts the servers and
/// the gateway. Everything is removed again on error.
pub fn start(a: &UpArgs, only: Option<&[&str]>) -> Result<Running, String> {
    if !snatgw_lab::is_root() {
        return Err("the lab needs root (network namespaces)".into());
    }
    let cfg = snatgw_lab::gateway::read_config(&a.config).map_err(|e| e.to_string())?;
    // The engine must accept it too (and before anything is built).
    snatgw_runtime::config::load_engine(&a.config).map_err(|e| e.to_string())?;
    let spec = spec_from_config(&a.prefix, &cfg, only)
        .map_err(|e| e.to_string())?
        .with_offloads(a.veth_offloads);
    let exe = crate::this_bin()?;
    let gateway = crate::gateway_bin()?;
    let dir = std::env::temp_dir().join(format!("snatgw-lab-{}", a.prefix.trim_end_matches('-')));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let config =
        std::fs::canonicalize(&a.config).map_err(|e| format!("{}: {e}", a.config.display()))?;
    let mut lab = Lab::up(spec).map_err(|e| e.to_string())?;
    lab.set_server_subcommand(Some("lab-server"));
    lab.start_servers(&exe, ZONE).map_err(|e| e.to_string())?;
    let stats = dir.join("stats.json");
    let _ = std::fs::remove_file(&stats);
    let opts = GatewayOptions {
        offload: a.tun_offload,
        fast_path: a.fast_path.name().into(),
        ..GatewayOptions::new(gateway.clone(), config, a.queues, stats.clone())
    };
    let gw = start_gateway(&lab, &opts).map_err(|e| e.to_string())?;
    Ok(Running {
        lab,
        gw,
        dir,
        stats,
        exe,
        gateway,
        // The API always needs a token: the one the gateway generated in its state directory.
        token: opts.api_token(),
        token_file: opts.token_file(),
    })
}

/// Entry point of `snatgw-lab lab` (`snatgw lab`).
pub fn run(cmd: LabCmd) -> Result<(), String> {
    match cmd {
        LabCmd::Up(a) => up(&a),
        LabCmd::Down { prefix } => {
            snatgw_lab::down_prefix(&prefix).map_err(|e| e.to_string())?;
            println!("lab {prefix} removed");
            Ok(())
        }
        LabCmd::Demo(a) => demo(&a),
    }
}

fn up(a: &UpArgs) -> Result<(), String> {
    let r = start(a, None)?;
    let names: Vec<String> = r
        .lab
        .spec()
        .instances
        .iter()
        .map(|i| i.name.clone())
        .collect();
    println!("lab {} is up; gateway pid {}", a.prefix, r.gw.id());
    println!("  instances: {}", names.join(" "));
    println!("  servers: {SERVER_A}, {SERVER_B} (echo 7, HTTP 80 /myip, hold 9000), DNS {SERVER_DNS} (myip.{ZONE})");
    println!(
        "  try:   ip netns exec {} {} lab-server client myip-http {SERVER_A}",
        r.lab.ns_name(&names[0]),
        r.exe.display()
    );
    println!(
        "  stats: {} stats --file {}",
        r.gateway.display(),
        r.stats.display()
    );
    println!("  log:   {}", r.dir.join("gateway.log").display());
    println!(
        "  api:   ip netns exec {} {} get instances --token-file {}",
        r.lab.gw_ns(),
        r.gateway.display(),
        r.token_file.display()
    );
    println!(
        "  down:  {} lab down --prefix {}",
        r.gateway.display(),
        a.prefix
    );
    let Running { lab, .. } = r;
    lab.detach();
    Ok(())
}

fn ports(r: &ClientReport) -> BTreeSet<u16> {
    r.seen_ports().into_iter().collect()
}

fn show_ports(p: &BTreeSet<u16>) -> String {
    p.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// Waits until `f(snapshot)` holds (bounded).
fn wait_stats(
    r: &Running,
    timeout: Duration,
    f: impl Fn(&stats::Snapshot) -> bool,
) -> Option<stats::Snapshot> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = r.snapshot() {
            if f(&s) {
                return Some(s);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn demo(a: &UpArgs) -> Result<(), String> {
    let t0 = Instant::now();
    println!("== snatgw lab demo: {} ==", a.config.display());
    println!(
        "building the lab (namespaces {}*) and starting the gateway...",
        a.prefix
    );
    let mut r = start(a, None)?;
    let res = demo_steps(&r, t0);
    let stopped = stop_gateway(&r.gw, Duration::from_secs(5));
    r.lab.down().map_err(|e| e.to_string())?;
    println!(
        "\ngateway stopped {}; lab removed; total {:.1} s",
        if stopped {
            "cleanly (exit 0)"
        } else {
            "with an error"
        },
        t0.elapsed().as_secs_f64()
    );
    res
}

/// Address of the ILPIP the demo adds: the first of 203.0.113.30-99 the configuration does
/// not use (the lab routes all of 203.0.113.0/24 but its servers to the gateway).
fn free_public_ip(cfg: &snatgw_core::ConfigFile) -> Option<Ipv4Addr> {
    (30..100)
        .map(|d| Ipv4Addr::new(203, 0, 113, d))
        .find(|a| !cfg.public_ip.iter().any(|p| p.address == a.to_string()))
}

/// Step 4: one live change through the API, no restart: `victim` gets an ILPIP (R1.1
/// takes precedence, R1.4), its PAT block is reclaimed and its next connection is seen
/// from the new address.
fn live_change(r: &Running, victim: &str) -> Result<(), String> {
    println!("\n4. A live change through the management API (R1.4): {victim} gets an ILPIP");
    let name = victim.to_string();
    let before = r.api(move |c| c.instance_ports(&name))?;
    let block = |b: &[snatgw_control::PortRange]| {
        b.iter()
            .map(|p| format!("{}-{}", p.first, p.last))
            .collect::<Vec<_>>()
            .join(",")
    };
    println!(
        "  before: {} via {} ({}), {} ports per protocol, block {}",
        before.scenario,
        before.public_ip,
        before.rule,
        before.allocated,
        block(&before.block)
    );
    // The newest event so far, to show only what the change adds (the log keeps at most
    // 10,000 events, so this takes at most 10 pages).
    let mut seq = 0;
    for _ in 0..11 {
        let after = seq;
        match r.api(move |c| c.events(after, 1000, 0))?.last() {
            Some(e) => seq = e.seq,
            None => break,
        }
    }
    let topo = r.api(|c| c.topology())?.value;
    let addr = free_public_ip(&topo).ok_or("no free address in 203.0.113.30-99")?;
    let pip = PublicIpCfg {
        name: "pip-live".into(),
        address: addr.to_string(),
    };
    let put = r.api(move |c| c.put(&pip, None))?;
    println!(
        "  PUT /api/v1/publicIPAddresses/pip-live {{\"address\": \"{addr}\"}} -> generation {}",
        put.generation.unwrap_or(0)
    );
    let name = victim.to_string();
    let mut inst: InstanceCfg = r.api(move |c| c.get::<InstanceCfg>(&name))?.value;
    inst.public_ip = Some("pip-live".into());
    let put = r.api(move |c| c.put(&inst, None))?;
    println!(
        "  PUT /api/v1/instances/{victim} {{..., \"public_ip\": \"pip-live\"}} -> generation {}",
        put.generation.unwrap_or(0)
    );
    let name = victim.to_string();
    let after = r.api(move |c| c.instance_ports(&name))?;
    println!(
        "  after:  {} via {} ({}), {} ports, block {}",
        after.scenario,
        after.public_ip,
        after.rule,
        after.allocated,
        if after.block.is_empty() {
            "reclaimed".to_string()
        } else {
            block(&after.block)
        }
    );
    let http = r.client(victim, &["myip-http", &SERVER_A.to_string()])?;
    println!(
        "  HTTP /myip from {victim} now sees {} (local {}: no PAT, the port is kept)",
        http.seen.first().map_or("FAILED", String::as_str),
        http.local.first().map_or("-", String::as_str)
    );
    // The housekeeping loop moves engine events to the API's log every 100 ms.
    let deadline = Instant::now() + Duration::from_secs(3);
    let events = loop {
        let evs = r.api(move |c| c.events(seq, 1000, 0))?;
        let seen = evs
            .iter()
            .any(|e| e.kind == "ports_reclaimed" && e.instance.as_deref() == Some(victim));
        if seen || Instant::now() >= deadline {
            break evs;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for e in events.iter().filter(|e| {
        e.instance.as_deref() == Some(victim)
            && matches!(e.kind.as_str(), "scenario_changed" | "ports_reclaimed")
    }) {
        println!("  GET /api/v1/events: {} {}", e.kind, e.detail);
    }
    if after.scenario != "ilpip"
        || http.seen.first().and_then(|s| s.split(':').next()) != Some(&*addr.to_string())
    {
        return Err(format!("{victim} did not move to its ILPIP {addr}"));
    }
    Ok(())
}

fn demo_steps(r: &Running, t0: Instant) -> Result<(), String> {
    println!("lab ready in {:.1} s\n", t0.elapsed().as_secs_f64());
    let snap =
        wait_stats(r, Duration::from_secs(5), |_| true).ok_or("no stats from the gateway")?;

    println!("1. What the internet saw, per instance (R1.1-R1.3, R1.6; R6.4 responders)");
    let head = format!(
        "{:<10} {:<14} {:<5} {:<14} {:<22} {:<22} {:<8} {}",
        "INSTANCE",
        "SCENARIO",
        "RULE",
        "EXPECTED IP",
        "HTTP /myip SAW",
        "DNS myip SAW",
        "UDP ECHO",
        "OK"
    );
    println!("{head}");
    let mut all_ok = true;
    for inst in &snap.instances {
        let http = r.client(&inst.name, &["myip-http", &SERVER_A.to_string()])?;
        let dns = r.client(
            &inst.name,
            &[
                "dns",
                &SERVER_DNS.to_string(),
                "--name",
                &format!("myip.{ZONE}"),
                "--qtype",
                "any",
            ],
        )?;
        let udp = r.client(
            &inst.name,
            &["udp-echo", &SERVER_B.to_string(), "--count", "3"],
        )?;
        let h = http
            .seen
            .first()
            .cloned()
            .unwrap_or_else(|| "FAILED".into());
        let d = dns.txt.clone().unwrap_or_else(|| "FAILED".into());
        let ok = h.split(':').next() == Some(inst.public_ip.as_str())
            && d.split(':').next() == Some(inst.public_ip.as_str())
            && udp.all_ok();
        all_ok &= ok;
        println!(
            "{:<10} {:<14} {:<5} {:<14} {:<22} {:<22} {:<8} {}",
            inst.name,
            inst.scenario,
            inst.rule,
            inst.public_ip,
            h,
            d,
            format!("{}/{}", udp.ok, udp.ok + udp.failed),
            if ok { "yes" } else { "NO" }
        );
    }
    println!(
        "(ILPIP keeps the instance's own source port; PAT maps it into the instance's block.)\n"
    );

    println!(
        "2. Port sharing across destinations (R2.3): vm-as1 holds 4 connections to each server"
    );
    let hold = |dst: Ipv4Addr, n: u32, hold_s: &str, timeout: &str, inst: &str| {
        r.spawn_client(
            inst,
            &[
                "hold",
                &format!("{dst}:9000"),
                "--count",
                &n.to_string(),
                "--hold",
                hold_s,
                "--timeout",
                timeout,
            ],
        )
    };
    let ca = hold(SERVER_A, 4, "3", "3", "vm-as1")?;
    let ra = ca
        .read_report(Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let cb = hold(SERVER_B, 4, "3", "3", "vm-as1")?;
    let rb = cb
        .read_report(Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let (pa, pb) = (ports(&ra), ports(&rb));
    println!("  {SERVER_A}:9000 saw ports {}", show_ports(&pa));
    println!("  {SERVER_B}:9000 saw ports {}", show_ports(&pb));
    println!(
        "  shared: {} of {} ports serve both destinations at once\n",
        pa.intersection(&pb).count(),
        pa.len()
    );
    let _ = ca.wait_timeout(Duration::from_secs(10));
    let _ = cb.wait_timeout(Duration::from_secs(10));

    let victim = "vm-alone";
    let alloc = snap
        .instances
        .iter()
        .find(|i| i.name == victim)
        .map(|i| i.allocated)
        .ok_or("vm-alone is not in the configuration")?;
    let neighbour = snap
        .instances
        .iter()
        .find(|i| {
            i.name != victim
                && i.public_ip
                    == snap
                        .instances
                        .iter()
                        .find(|v| v.name == victim)
                        .map(|v| v.public_ip.clone())
                        .unwrap_or_default()
        })
        .map(|i| i.name.clone());
    println!("3. Exhaustion (R2.4, R2.6) and recovery (R2.7): {victim} has {alloc} ports per destination");
    let t = Instant::now();
    let big = hold(SERVER_A, alloc, "6", "3", victim)?;
    let rbig = big
        .read_report(Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    println!(
        "  {} of {alloc} concurrent connections to {SERVER_A}:9000 open ({:.1} s)",
        rbig.ok,
        t.elapsed().as_secs_f64()
    );
    let one = r.client(
        victim,
        &[
            "hold",
            &format!("{SERVER_A}:9000"),
            "--count",
            "1",
            "--timeout",
            "1",
        ],
    )?;
    println!(
        "  connection #{}: {}",
        alloc + 1,
        if one.ok == 1 {
            "succeeded (unexpected)".to_string()
        } else {
            format!(
                "failed as expected ({})",
                one.errors.keys().next().cloned().unwrap_or_default()
            )
        }
    );
    let other = r.client(victim, &["myip-http", &SERVER_B.to_string()])?;
    println!(
        "  same instance, other destination {SERVER_B}: {}",
        if other.all_ok() { "works" } else { "FAILED" }
    );
    if let Some(n) = &neighbour {
        let o = r.client(
            n,
            &[
                "hold",
                &format!("{SERVER_A}:9000"),
                "--count",
                "1",
                "--timeout",
                "2",
            ],
        )?;
        println!(
            "  {n} (same public IP, own block), same destination: {}",
            if o.all_ok() { "works" } else { "FAILED" }
        );
    }
    if let Some(s) = wait_stats(r, Duration::from_secs(3), |s| {
        s.events.iter().any(|e| e.kind == "exhaustion")
    }) {
        for e in s.events.iter().filter(|e| e.kind == "exhaustion").take(1) {
            println!(
                "  gateway event: t={} exhaustion instance={} public_ip={} protocol={} destination={} ({})",
                e.time,
                e.instance.as_deref().unwrap_or("-"),
                e.public_ip.as_deref().unwrap_or("-"),
                e.protocol.as_deref().unwrap_or("-"),
                e.destination.as_deref().unwrap_or("-"),
                e.detail
            );
        }
        if let Some(i) = s.instances.iter().find(|i| i.name == victim) {
            println!(
                "  counters: used tcp ports {}/{}, connections ok {} failed {}",
                i.used.tcp, i.allocated, i.connections_ok.tcp, i.connections_failed.tcp
            );
        }
    }
    // The same exhaustion as the metrics a monitoring system scrapes (R6.1).
    let metrics = r.api(|c| c.metrics_text());
    let dst = format!("destination=\"{SERVER_A}:9000\"");
    let inst = format!("instance=\"{victim}\"");
    match &metrics {
        Ok(text) => {
            for l in text.lines().filter(|l| {
                l.contains(&inst)
                    && l.contains("protocol=\"tcp\"")
                    && ((l.starts_with("snatgw_snat_connection_count_total")
                        && l.contains("result=\"failed\""))
                        || (l.starts_with("snatgw_destination_used_snat_ports_ratio")
                            && l.contains(&dst)))
            }) {
                println!("  GET /metrics: {l}");
            }
        }
        Err(e) => println!("  GET /metrics: FAILED ({e})"),
    }
    println!("  closing the {} connections...", rbig.ok);
    let _ = big.wait_timeout(Duration::from_secs(20));
    let t = Instant::now();
    let freed = wait_stats(r, Duration::from_secs(30), |s| {
        s.instances
            .iter()
            .any(|i| i.name == victim && i.used.tcp == 0)
    });
    println!(
        "  ports released {:.1} s after both FINs (FIN delay from the config, R3.2){}",
        t.elapsed().as_secs_f64(),
        if freed.is_some() {
            ""
        } else {
            " -- NOT within 30 s"
        }
    );
    let again = r.client(
        victim,
        &[
            "hold",
            &format!("{SERVER_A}:9000"),
            "--count",
            "1",
            "--timeout",
            "2",
        ],
    )?;
    println!(
        "  next connection to {SERVER_A}:9000: {}",
        if again.all_ok() {
            format!("succeeds, seen as {}", again.seen.join(","))
        } else {
            "FAILED".into()
        }
    );

    let live = live_change(r, victim);
    if let Err(e) = &live {
        println!("  FAILED: {e}");
    }
    // The stats file is written every second: wait for one taken after the change.
    let _ = wait_stats(r, Duration::from_secs(3), |s| {
        s.instances
            .iter()
            .any(|i| i.name == victim && i.scenario == "ilpip")
    });

    let inbound = crate::lab_inbound::step(r, 5);
    if let Err(e) = &inbound {
        println!("  FAILED: {e}");
    }

    println!(
        "\n6. Gateway counters (snatgw stats --file {}):",
        r.stats.display()
    );
    if let Ok(s) = r.snapshot() {
        print!("{}", stats::render(&s));
    }
    if !all_ok {
        return Err("some instance did not see its expected public IP".into());
    }
    metrics.map(drop)?;
    live?;
    inbound?;
    Ok(())
}
