//! `snatgw race`: the same lab through snatgw and through the kernel's nftables masquerade,
//! interleaved (snatgw, kernel, snatgw, kernel...), veth offloads off then on, measuring
//! 64-byte UDP packets/s (trafgen), TCP bulk throughput (iperf3) and new TCP connections/s,
//! and the CPU each side used. Prints a table with the ratios (snatgw / kernel).
//!
//! Workload, identical on both sides (see docs/PERFORMANCE.md):
//! - pps: `trafgen` in instance `c0` sends 64-byte frames (one UDP flow, fixed ports) to
//!   203.0.113.100:9 for `--secs`; the figure is packets received on the internet side
//!   (`inet-gw` rx counter delta / seconds).
//! - bulk: `iperf3 -c 203.0.113.100 -t SECS` from `c0` (one TCP stream).
//! - conn/s: one thread per client instance (`c0..c3`) connects and immediately resets
//!   (SO_LINGER 0) connections to 16 accept-and-close listeners (203.0.113.100:10000-10015)
//!   for `--secs`; the figure is completed connects per second. snatgw's configuration gives
//!   each instance 1024 ports per destination and releases a port 1 s after the RST, so the
//!   gateway is not port-bound at these rates.
//! - CPU: host-wide `/proc/stat` deltas during each measurement (softirq and system time; the
//!   host is shared, so other load shows up too) plus, for snatgw, the gateway process's own
//!   user+system time from `/proc/PID/stat`.
//!
//! Needs root, `iperf3` and `trafgen` (Debian: `apt-get install -y iperf3 netsniff-ng`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use snatgw_lab::gateway::{start_gateway, GatewayOptions};
use snatgw_lab::{GatewayMode, KernelNat, Lab, LabSpec};

/// Options of `snatgw race`.
#[derive(Args, Debug, Clone)]
pub struct RaceArgs {
    /// Rounds per side and offload setting (interleaved).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    /// Gateway queues (worker threads).
    #[arg(long, default_value_t = 2)]
    pub queues: usize,
    /// Namespace prefix.
    #[arg(long, default_value = "sgrace-")]
    pub prefix: String,
    /// Only these offload settings (`off`, `on`); default both.
    #[arg(long, value_delimiter = ',')]
    pub offloads: Vec<String>,
    /// Write the markdown table here too.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

const CLIENTS: usize = 4;
const LISTEN_PORTS: u16 = 16;
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
const POOL_IP: &str = "192.0.2.10";

fn client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, 10 + i as u8)
}

fn config() -> String {
    let mut c = format!(
        "[gateway]\nseed = 1\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"{POOL_IP}\"]\n\
         rst_timeout_secs = 1\nfin_timeout_secs = 2\nport_reuse_history_secs = 1\n"
    );
    for i in 0..CLIENTS {
        let _ = write!(
            c,
            "\n[[instance]]\nname = \"c{i}\"\nprivate_ip = \"{}\"\n",
            client_ip(i)
        );
    }
    c
}

#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    /// Host-wide softirq seconds.
    softirq: f64,
    /// Host-wide system seconds.
    system: f64,
    /// Gateway process user+system seconds (snatgw only).
    gateway: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    pps: f64,
    gbps: f64,
    cps: f64,
    cpu_pps: Cpu,
    cpu_bulk: Cpu,
    cpu_cps: Cpu,
}

fn clk_tck() -> f64 {
    100.0
}

/// (softirq, system) jiffies from /proc/stat.
fn proc_stat() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq
    (
        cpu.get(6).copied().unwrap_or(0.0),
        cpu.get(2).copied().unwrap_or(0.0),
    )
}

fn proc_cpu(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    ut + st
}

/// Measures the CPU used while `f` runs.
fn with_cpu<T>(gw: Option<u32>, f: impl FnOnce() -> T) -> (T, Cpu) {
    let (si0, sy0) = proc_stat();
    let g0 = proc_cpu(gw);
    let r = f();
    let (si1, sy1) = proc_stat();
    let g1 = proc_cpu(gw);
    let t = clk_tck();
    (
        r,
        Cpu {
            softirq: (si1 - si0) / t,
            system: (sy1 - sy0) / t,
            gateway: (g1 - g0) / t,
        },
    )
}

fn exec_ok(lab: &Lab, ns: &str, argv: &[&str], timeout: Duration) -> Result<String, String> {
    let out = lab
        .exec_timeout(ns, argv, timeout)
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read_counter(lab: &Lab, ns: &str, ifname: &str, what: &str) -> Result<u64, String> {
    let p = format!("/sys/class/net/{ifname}/statistics/{what}");
    // /sys is per network namespace only when mounted inside `ip netns exec`.
    let s = exec_ok(lab, ns, &["cat", &p], Duration::from_secs(5))?;
    s.trim()
        .parse()
        .map_err(|_| format!("bad counter {p}: {s}"))
}

fn mac(lab: &Lab, ns: &str, ifname: &str) -> Result<String, String> {
    let s = exec_ok(
        lab,
        ns,
        &["cat", &format!("/sys/class/net/{ifname}/address")],
        Duration::from_secs(5),
    )?;
    Ok(s.trim().to_string())
}

fn mac_bytes(m: &str) -> String {
    m.split(':')
        .map(|b| format!("0x{b}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// 64-byte UDP frames (60 without FCS) with trafgen for `secs`; packets/s received by the
/// internet namespace.
fn measure_pps(lab: &Lab, dir: &Path, secs: u64) -> Result<f64, String> {
    let ns = lab.ns_name("c0");
    let src = mac(lab, &ns, "eth0")?;
    let dst = mac(lab, &lab.gw_ns(), "br-priv")?;
    let conf = format!(
        "{{\n  {},\n  {},\n  0x08, 0x00,\n  0x45, 0x00, const16(46), 0x00, 0x00, 0x40, 0x00, 64, 17, csumip(14, 33),\n  {}, {},\n  const16(4000), const16(9), const16(26), csumudp(14, 34),\n  fill(0x00, 18),\n}}\n",
        mac_bytes(&dst),
        mac_bytes(&src),
        client_ip(0).octets().map(|b| b.to_string()).join(", "),
        SERVER.octets().map(|b| b.to_string()).join(", "),
    );
    let path = dir.join("trafgen.cfg");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    // Warm the flow (snatgw needs the first packet to create it; the kernel its conntrack).
    let cfg = path.to_string_lossy().into_owned();
    let _ = exec_ok(
        lab,
        &ns,
        &[
            "trafgen",
            "-o",
            "eth0",
            "-i",
            &cfg,
            "-n",
            "10",
            "-q",
            "--no-sock-mem",
        ],
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(200));
    let before = read_counter(lab, &lab.inet_ns(), "inet-gw", "rx_packets")?;
    let t = Instant::now();
    let secs_s = secs.to_string();
    let _ = lab.exec_timeout(
        &ns,
        &[
            "timeout",
            "-s",
            "INT",
            &secs_s,
            "trafgen",
            "-o",
            "eth0",
            "-i",
            &cfg,
            "-q",
            "-P",
            "1",
            "--no-sock-mem",
        ],
        Duration::from_secs(secs + 10),
    );
    let el = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let after = read_counter(lab, &lab.inet_ns(), "inet-gw", "rx_packets")?;
    Ok((after - before) as f64 / el.max(0.1))
}

fn measure_bulk(lab: &Lab, secs: u64) -> Result<f64, String> {
    let out = exec_ok(
        lab,
        &lab.ns_name("c0"),
        &[
            "iperf3",
            "-c",
            &SERVER.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ],
        Duration::from_secs(secs + 20),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| "iperf3: no result".into())
}

fn measure_cps(lab: &Lab, secs: u64) -> Result<f64, String> {
    let stop = Arc::new(AtomicBool::new(false));
    // Accept-and-close listeners in the internet namespace.
    let listeners = lab
        .spawn_thread_in(&lab.inet_ns(), {
            let stop = stop.clone();
            move || {
                let mut hs = Vec::new();
                for p in 0..LISTEN_PORTS {
                    let l = TcpListener::bind((SERVER, 10_000 + p)).expect("bind listener");
                    l.set_nonblocking(true).expect("nonblocking");
                    let stop = stop.clone();
                    hs.push(std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            match l.accept() {
                                Ok((s, _)) => drop(s),
                                Err(_) => std::thread::sleep(Duration::from_micros(200)),
                            }
                        }
                    }));
                }
                for h in hs {
                    let _ = h.join();
                }
            }
        })
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (done, failed) = (done.clone(), failed.clone());
        let h = lab
            .spawn_thread_in(&lab.ns_name(&format!("c{i}")), move || {
                let mut k = i as u16;
                while Instant::now() < deadline {
                    let dst = SocketAddr::from((SERVER, 10_000 + k % LISTEN_PORTS));
                    k = k.wrapping_add(1);
                    match TcpStream::connect_timeout(&dst, Duration::from_millis(500)) {
                        Ok(s) => {
                            let _ = nix::sys::socket::setsockopt(
                                &s,
                                nix::sys::socket::sockopt::Linger,
                                &nix::libc::linger {
                                    l_onoff: 1,
                                    l_linger: 0,
                                },
                            );
                            drop(s);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        clients.push(h);
    }
    let t = Instant::now();
    for h in clients {
        let _ = h.join();
    }
    let el = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = listeners.join();
    let n = done.load(Ordering::Relaxed) as f64;
    let f = failed.load(Ordering::Relaxed);
    if f > 0 {
        eprintln!("  conn/s: {f} connection attempts failed");
    }
    Ok(n / el.max(0.1))
}

fn one_side(a: &RaceArgs, snatgw: bool, offloads: bool, dir: &Path) -> Result<Figures, String> {
    let mut spec = LabSpec::new(&a.prefix).with_offloads(offloads);
    for i in 0..CLIENTS {
        spec = spec.with_instance(format!("c{i}"), client_ip(i));
    }
    spec.public_ips = vec![POOL_IP.parse().map_err(|_| "bad ip")?];
    spec = spec.with_mode(if snatgw {
        GatewayMode::snatgw()
    } else {
        GatewayMode::Kernel(KernelNat::Masquerade)
    });
    let mut lab = Lab::up(spec).map_err(|e| e.to_string())?;
    if offloads {
        // With TUN offload on, the gateway hands the kernel UDP-GSO super-packets (tun-rs
        // coalesces a flow's datagrams), and veth passes them whole: `rx_packets` on the far
        // side would count one per super-packet. Segmenting on the gateway's egress keeps the
        // pps figure a count of real 64-byte packets (the segmentation cost stays on the
        // gateway's side), while TCP keeps TSO.
        lab.exec(
            &lab.gw_ns(),
            &["ethtool", "-K", "gw-inet", "tx-udp-segmentation", "off"],
        )
        .map_err(|e| e.to_string())?;
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let res = (|| -> Result<Figures, String> {
        let _iperf = lab
            .spawn_with(
                &lab.inet_ns(),
                &["iperf3", "-s", "-B", &SERVER.to_string()],
                std::process::Stdio::null(),
                std::process::Stdio::null(),
            )
            .map_err(|e| e.to_string())?;
        let mut gw_pid = None;
        if snatgw {
            let cfg = dir.join("race.toml");
            std::fs::write(&cfg, config()).map_err(|e| e.to_string())?;
            let gw = start_gateway(
                &lab,
                &GatewayOptions {
                    offload: offloads,
                    extra: vec!["--tx-queue-len".into(), "10000".into()],
                    ..GatewayOptions::new(exe.clone(), cfg, a.queues, dir.join("stats.json"))
                },
            )
            .map_err(|e| e.to_string())?;
            gw_pid = Some(gw.id());
        }
        std::thread::sleep(Duration::from_millis(500));
        let (pps, cpu_pps) = with_cpu(gw_pid, || measure_pps(&lab, dir, a.secs));
        let (gbps, cpu_bulk) = with_cpu(gw_pid, || measure_bulk(&lab, a.secs));
        let (cps, cpu_cps) = with_cpu(gw_pid, || measure_cps(&lab, a.secs));
        Ok(Figures {
            pps: pps?,
            gbps: gbps?,
            cps: cps?,
            cpu_pps,
            cpu_bulk,
            cpu_cps,
        })
    })();
    lab.down().map_err(|e| e.to_string())?;
    res
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn cpu_str(c: &[Cpu], snatgw: bool) -> String {
    let n = c.len().max(1) as f64;
    let si = c.iter().map(|x| x.softirq).sum::<f64>() / n;
    let sy = c.iter().map(|x| x.system).sum::<f64>() / n;
    let g = c.iter().map(|x| x.gateway).sum::<f64>() / n;
    if snatgw {
        format!("gw {g:.1}s, softirq {si:.1}s, sys {sy:.1}s")
    } else {
        format!("softirq {si:.1}s, sys {sy:.1}s")
    }
}

/// `snatgw race`.
pub fn run(a: &RaceArgs) -> Result<(), String> {
    if !snatgw_lab::is_root() {
        return Err("the race needs root (network namespaces)".into());
    }
    for tool in ["iperf3", "trafgen"] {
        let found = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file());
        if !found {
            return Err(format!(
                "{tool} not found: apt-get install -y iperf3 netsniff-ng"
            ));
        }
    }
    let dir = std::env::temp_dir().join(format!("snatgw-race-{}", a.prefix.trim_end_matches('-')));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let settings: Vec<bool> = if a.offloads.is_empty() {
        vec![false, true]
    } else {
        a.offloads.iter().map(|s| s == "on").collect()
    };
    let t0 = Instant::now();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| offloads | figure | snatgw | kernel | ratio | CPU snatgw (per run) | CPU kernel (per run) |\n|---|---|---|---|---|---|---|"
    );
    for &off in &settings {
        let mut s = Vec::new();
        let mut k = Vec::new();
        for round in 0..a.rounds {
            for snatgw in [true, false] {
                let name = if snatgw { "snatgw" } else { "kernel" };
                print!(
                    "offloads {}, round {}, {name}: ",
                    if off { "on" } else { "off" },
                    round + 1
                );
                let _ = std::io::stdout().flush();
                let f = one_side(a, snatgw, off, &dir)?;
                println!("{:.0} pps, {:.2} Gb/s, {:.0} conn/s", f.pps, f.gbps, f.cps);
                if snatgw {
                    s.push(f);
                } else {
                    k.push(f);
                }
            }
        }
        let label = if off { "on" } else { "off" };
        type Pick = fn(&Figures) -> f64;
        type PickCpu = fn(&Figures) -> Cpu;
        let rows: [(&str, Pick, PickCpu, &str); 3] = [
            ("64-byte UDP pps", |f| f.pps, |f| f.cpu_pps, "pps"),
            ("TCP bulk Gb/s", |f| f.gbps, |f| f.cpu_bulk, "Gb/s"),
            ("new TCP conn/s", |f| f.cps, |f| f.cpu_cps, "conn/s"),
        ];
        for (what, pick, pick_cpu, _unit) in rows {
            let sv = median(s.iter().map(pick).collect());
            let kv = median(k.iter().map(pick).collect());
            let ratio = if kv > 0.0 { sv / kv } else { 0.0 };
            let _ = writeln!(
                md,
                "| {label} | {what} | {} | {} | {ratio:.2}x | {} | {} |",
                fmt_fig(sv),
                fmt_fig(kv),
                cpu_str(&s.iter().map(pick_cpu).collect::<Vec<_>>(), true),
                cpu_str(&k.iter().map(pick_cpu).collect::<Vec<_>>(), false),
            );
        }
    }
    println!(
        "\nmedians of {} round(s) per side, {} s per measurement, {:.0} s in all:\n",
        a.rounds,
        a.secs,
        t0.elapsed().as_secs_f64()
    );
    print!("{md}");
    if let Some(p) = &a.markdown {
        std::fs::write(p, &md).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn fmt_fig(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.2}")
    }
}
