//! `snatgw keepalive-check` (SPEC R7.1, issue #21): does a connection held idle by an
//! application survive the gateway's idle timeout (R3.4) with this host's TCP keepalive
//! settings?
//!
//! Inputs: the keepalive settings — this host's `net.ipv4.tcp_keepalive_{time,intvl,probes}`
//! (`/proc/sys/net/ipv4`), values given with `--time/--intvl/--probes` (each one given
//! replaces the host's), or a Windows registry export (`--windows-reg FILE`: the
//! `Tcpip\Parameters` key's `KeepAliveTime`, `KeepAliveInterval` in milliseconds and
//! `TcpMaxDataRetransmissions`) — and the gateway's idle timeout: `--idle-timeout S`, a
//! configuration file's `gateway.idle_timeout_secs` (`--config`), the running gateway's
//! (`--api`, `GET /api/v1/gateway`, token found as for the other API commands), else the
//! default 240 s.
//!
//! Verdict: an idle connection's only packets are keepalive probes. The first goes after
//! `time` seconds of silence and, answered, restarts that wait; an unanswered one is repeated
//! every `intvl` seconds. The gateway forgets a flow after `idle` seconds without a packet
//! (R3.4), and a packet due exactly then is already too late. So the connection survives iff
//! `time < idle` and `intvl < idle` (a lost probe is then followed by another before the
//! flow is forgotten). The output says which setting to change, prints the SPEC R7.1 values
//! (seed 002: Linux time 120, intvl 30, probes 8; Windows KeepAliveTime 120000 ms,
//! KeepAliveInterval 30000 ms, TcpMaxDataRetransmissions 8) as `sysctl` / `reg add` lines, or
//! values below a shorter idle timeout when those do not fit, and recalls that the settings
//! are only defaults: each application must enable `SO_KEEPALIVE`.
//!
//! With `--api`, also the symptom per instance from the running gateway (`snatgw ports`'
//! `idle_ended_then_sent`): flows that ended by idle timeout while the instance still sent
//! on them later.
//!
//! Exit code: 0 the connection survives, 1 it does not, 2 no verdict (bad arguments, a file
//! or the API could not be read).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;
use snatgw_control::store::DEFAULT_STATE_DIR;
use snatgw_control::Client;

use crate::api_cli::ApiOpts;

/// The gateway's default idle timeout (SPEC R3.4, `gateway.idle_timeout_secs`).
pub const DEFAULT_IDLE_SECS: u32 = 240;
/// SPEC R7.1 (seed 002), Linux: `net.ipv4.tcp_keepalive_time`, `_intvl`, `_probes`.
pub const SEED_LINUX: (u32, u32, u32) = (120, 30, 8);
/// Where Linux keeps the keepalive sysctls.
pub const PROC_IPV4: &str = "/proc/sys/net/ipv4";
/// The registry key of the Windows settings.
pub const WINDOWS_KEY: &str =
    r"HKEY_LOCAL_MACHINE\SYSTEM\CurrentControlSet\Services\Tcpip\Parameters";
/// Windows' values when the key holds none: KeepAliveTime 2 h, KeepAliveInterval 1 s,
/// TcpMaxDataRetransmissions 5 (milliseconds, milliseconds, count).
pub const WINDOWS_DEFAULTS: (u64, u64, u32) = (7_200_000, 1_000, 5);

/// `snatgw keepalive-check`.
#[derive(Args, Debug, Clone, Default)]
pub struct KeepaliveArgs {
    /// Seconds of silence before the first probe (`net.ipv4.tcp_keepalive_time`, TCP_KEEPIDLE);
    /// default: this host's.
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u32).range(1..))]
    pub time: Option<u32>,
    /// Seconds between unanswered probes (`net.ipv4.tcp_keepalive_intvl`, TCP_KEEPINTVL);
    /// default: this host's.
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u32).range(1..))]
    pub intvl: Option<u32>,
    /// Unanswered probes before the connection is dropped (`net.ipv4.tcp_keepalive_probes`,
    /// TCP_KEEPCNT); default: this host's.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub probes: Option<u32>,
    /// A Windows registry export (`reg export` / regedit, UTF-16 or ASCII) of
    /// HKLM\SYSTEM\CurrentControlSet\Services\Tcpip\Parameters: KeepAliveTime and
    /// KeepAliveInterval (milliseconds, dword), TcpMaxDataRetransmissions.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["time", "intvl", "probes"])]
    pub windows_reg: Option<PathBuf>,
    /// The gateway's idle timeout in seconds (SPEC R3.4).
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u32).range(1..),
          conflicts_with_all = ["config", "api"])]
    pub idle_timeout: Option<u32>,
    /// The gateway's configuration file: its `gateway.idle_timeout_secs` (default 240).
    #[arg(long, short, value_name = "FILE", conflicts_with = "api")]
    pub config: Option<PathBuf>,
    /// A running gateway's management API: its idle timeout, and per instance the flows
    /// that ended idle and were used again.
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// File holding the API's bearer token (default: `$SNATGW_TOKEN_FILE`, else
    /// `<--state-dir>/api-token`).
    #[arg(long, value_name = "PATH", requires = "api")]
    pub token_file: Option<PathBuf>,
    /// The gateway's state directory, where it keeps the token it generated.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Which system the settings are for (they are applied differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    /// sysctls, seconds.
    Linux,
    /// Registry values, milliseconds.
    Windows,
}

/// Keepalive settings, in milliseconds (Windows' unit; Linux's seconds × 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// Linux or Windows.
    pub os: Os,
    /// Silence before the first probe.
    pub time_ms: u64,
    /// Between unanswered probes.
    pub intvl_ms: u64,
    /// Unanswered probes before the connection is dropped.
    pub probes: u32,
}

impl Settings {
    /// Linux settings in seconds.
    pub fn linux(time: u32, intvl: u32, probes: u32) -> Settings {
        Settings {
            os: Os::Linux,
            time_ms: u64::from(time) * 1000,
            intvl_ms: u64::from(intvl) * 1000,
            probes,
        }
    }

    /// The names of the three settings on this system.
    fn names(&self) -> [&'static str; 3] {
        match self.os {
            Os::Linux => [
                "net.ipv4.tcp_keepalive_time",
                "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes",
            ],
            Os::Windows => [
                "KeepAliveTime",
                "KeepAliveInterval",
                "TcpMaxDataRetransmissions",
            ],
        }
    }

    /// A duration in the system's unit: `7200 s` or `7200000 ms`.
    fn show(&self, ms: u64) -> String {
        match self.os {
            Os::Linux if ms.is_multiple_of(1000) => format!("{} s", ms / 1000),
            Os::Linux => format!("{:.3} s", ms as f64 / 1000.0),
            Os::Windows => format!("{ms} ms"),
        }
    }

    /// The value of a duration as the system's setting takes it (seconds or milliseconds).
    fn raw(&self, ms: u64) -> u64 {
        match self.os {
            Os::Linux => ms.div_ceil(1000),
            Os::Windows => ms,
        }
    }
}

/// One setting to change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Its name (`net.ipv4.tcp_keepalive_time`, `KeepAliveTime`...).
    pub setting: String,
    /// Its value now, in the system's unit.
    pub from: u64,
    /// The value to set.
    pub to: u64,
    /// Why.
    pub why: String,
}

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Whether a connection idle at the application keeps its flow.
    pub survives: bool,
    /// The gateway's idle timeout, seconds.
    pub idle_timeout_secs: u32,
    /// The settings checked.
    pub settings: Settings,
    /// What is wrong, one sentence each (empty when it survives).
    pub problems: Vec<String>,
    /// Probes in a row that may be lost while the flow still survives (0 when it does not).
    pub lost_probes_tolerated: u64,
    /// After how long an unreachable peer is given up, seconds (`time + intvl × probes`).
    pub dead_peer_after_secs: u64,
    /// The settings to change.
    pub changes: Vec<Change>,
    /// The values recommended: SPEC R7.1's when they fit the idle timeout, else shorter ones
    /// (`None` when no whole-second value fits, an idle timeout of 1 s).
    pub recommended: Option<Settings>,
}

/// The values recommended for an idle timeout: SPEC R7.1's (seed 002) when they fit, else a
/// probe after half the idle timeout and, unanswered, every quarter of it.
pub fn recommended(os: Os, idle_secs: u32) -> Option<Settings> {
    let (t, i, p) = SEED_LINUX;
    let s = if t < idle_secs && i < idle_secs {
        Settings::linux(t, i, p)
    } else {
        let t = (idle_secs / 2).max(1);
        let i = (idle_secs / 4).clamp(1, 30);
        if t >= idle_secs {
            return None;
        }
        Settings::linux(t, i, p)
    };
    Some(Settings { os, ..s })
}

/// The verdict for `s` against a gateway idle timeout of `idle_secs` (see the module doc).
pub fn check(s: Settings, idle_secs: u32) -> Verdict {
    let idle_ms = u64::from(idle_secs) * 1000;
    let rec = recommended(s.os, idle_secs);
    let [n_time, n_intvl, _] = s.names();
    let mut problems = Vec::new();
    let mut changes = Vec::new();
    if s.time_ms >= idle_ms {
        problems.push(format!(
            "{n_time} {} is not below the gateway's idle timeout of {idle_secs} s: the gateway forgets the flow before the first probe (R3.4), and the next segment is dropped",
            s.show(s.time_ms)
        ));
        if let Some(r) = rec {
            changes.push(Change {
                setting: n_time.into(),
                from: s.raw(s.time_ms),
                to: r.raw(r.time_ms),
                why: format!(
                    "a first probe after {} of silence, below {idle_secs} s",
                    r.show(r.time_ms)
                ),
            });
        }
    }
    if s.intvl_ms >= idle_ms {
        problems.push(format!(
            "{n_intvl} {} is not below the gateway's idle timeout of {idle_secs} s: one lost probe and the flow is forgotten before the next",
            s.show(s.intvl_ms)
        ));
        if let Some(r) = rec {
            changes.push(Change {
                setting: n_intvl.into(),
                from: s.raw(s.intvl_ms),
                to: r.raw(r.intvl_ms),
                why: format!(
                    "an unanswered probe repeated after {}, below {idle_secs} s",
                    r.show(r.intvl_ms)
                ),
            });
        }
    }
    let survives = problems.is_empty();
    let lost_probes_tolerated = if survives {
        ((idle_ms - 1 - s.time_ms) / s.intvl_ms).min(u64::from(s.probes.saturating_sub(1)))
    } else {
        0
    };
    Verdict {
        survives,
        idle_timeout_secs: idle_secs,
        settings: s,
        problems,
        lost_probes_tolerated,
        dead_peer_after_secs: (s.time_ms + s.intvl_ms * u64::from(s.probes)).div_ceil(1000),
        changes,
        recommended: rec,
    }
}

/// Reads this host's keepalive sysctls from `dir` (`/proc/sys/net/ipv4`).
pub fn read_linux(dir: &Path) -> Result<Settings, String> {
    let read = |name: &str| -> Result<u32, String> {
        let p = dir.join(name);
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        text.trim()
            .parse::<u32>()
            .map_err(|e| format!("{}: {:?}: {e}", p.display(), text.trim()))
    };
    Ok(Settings::linux(
        read("tcp_keepalive_time")?,
        read("tcp_keepalive_intvl")?,
        read("tcp_keepalive_probes")?,
    ))
}

/// The text of a `.reg` file: UTF-16LE with a byte-order mark (what regedit and `reg export`
/// write), UTF-16BE with one, else UTF-8 (a BOM skipped).
fn reg_text(bytes: &[u8]) -> Result<String, String> {
    let utf16 = |le: bool| -> Result<String, String> {
        let units: Vec<u16> = bytes[2..]
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| {
                if le {
                    u16::from_le_bytes([c[0], c[1]])
                } else {
                    u16::from_be_bytes([c[0], c[1]])
                }
            })
            .collect();
        String::from_utf16(&units).map_err(|e| format!("not UTF-16: {e}"))
    };
    match bytes {
        [0xff, 0xfe, ..] => utf16(true),
        [0xfe, 0xff, ..] => utf16(false),
        [0xef, 0xbb, 0xbf, rest @ ..] => {
            String::from_utf8(rest.to_vec()).map_err(|e| format!("not UTF-8: {e}"))
        }
        _ => String::from_utf8(bytes.to_vec()).map_err(|e| format!("not UTF-8 or UTF-16: {e}")),
    }
}

/// Parses a Windows registry export: the `Tcpip\Parameters` key's `KeepAliveTime`,
/// `KeepAliveInterval` (milliseconds) and `TcpMaxDataRetransmissions` dwords; a value the
/// key does not hold is Windows' default ([`WINDOWS_DEFAULTS`]). Returns the settings and
/// the names of the values defaulted.
pub fn parse_windows_reg(bytes: &[u8]) -> Result<(Settings, Vec<&'static str>), String> {
    let text = reg_text(bytes)?;
    let first = text.lines().map(str::trim).find(|l| !l.is_empty());
    if !matches!(
        first,
        Some("Windows Registry Editor Version 5.00" | "REGEDIT4")
    ) {
        return Err("not a registry export (it starts with neither `Windows Registry Editor Version 5.00` nor `REGEDIT4`)".into());
    }
    let key = |l: &str| -> bool {
        let k = l
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let k = k.replacen("hklm\\", "hkey_local_machine\\", 1);
        k == WINDOWS_KEY.to_ascii_lowercase()
    };
    let (mut time, mut intvl, mut probes) = (None, None, None);
    let mut found = false;
    let mut inside = false;
    for raw in text.lines() {
        let l = raw.trim();
        if l.starts_with('[') {
            inside = key(l);
            found |= inside;
            continue;
        }
        if !inside || l.is_empty() || l.starts_with(';') {
            continue;
        }
        let Some((name, value)) = l.split_once('=') else {
            continue;
        };
        let name = name.trim().trim_matches('"');
        let slot = match name.to_ascii_lowercase().as_str() {
            "keepalivetime" => &mut time,
            "keepaliveinterval" => &mut intvl,
            "tcpmaxdataretransmissions" => &mut probes,
            _ => continue,
        };
        let v = value.trim();
        let hex = v
            .strip_prefix("dword:")
            .ok_or_else(|| format!("{name}: {v:?} is not a dword (`dword:0001d4c0`)"))?;
        let n = u32::from_str_radix(hex, 16).map_err(|e| format!("{name}: {v:?}: {e}"))?;
        *slot = Some(n);
    }
    if !found {
        return Err(format!("no key [{WINDOWS_KEY}] in the export"));
    }
    let (dt, di, dp) = WINDOWS_DEFAULTS;
    let mut defaulted = Vec::new();
    let mut or = |v: Option<u32>, d: u64, name: &'static str| {
        v.map(u64::from).unwrap_or_else(|| {
            defaulted.push(name);
            d
        })
    };
    let time_ms = or(time, dt, "KeepAliveTime");
    let intvl_ms = or(intvl, di, "KeepAliveInterval");
    let probes = or(probes, u64::from(dp), "TcpMaxDataRetransmissions") as u32;
    if time_ms == 0 || intvl_ms == 0 {
        return Err("KeepAliveTime and KeepAliveInterval must be above 0".into());
    }
    Ok((
        Settings {
            os: Os::Windows,
            time_ms,
            intvl_ms,
            probes,
        },
        defaulted,
    ))
}

/// The commands that apply `s`.
pub fn fix_lines(s: &Settings) -> Vec<String> {
    match s.os {
        Os::Linux => {
            let (t, i, p) = (s.raw(s.time_ms), s.raw(s.intvl_ms), s.probes);
            vec![
                format!("sysctl -w net.ipv4.tcp_keepalive_time={t} net.ipv4.tcp_keepalive_intvl={i} net.ipv4.tcp_keepalive_probes={p}"),
                format!("printf 'net.ipv4.tcp_keepalive_time = {t}\\nnet.ipv4.tcp_keepalive_intvl = {i}\\nnet.ipv4.tcp_keepalive_probes = {p}\\n' > /etc/sysctl.d/60-keepalive.conf   # across reboots"),
            ]
        }
        Os::Windows => {
            let key = r"HKLM\SYSTEM\CurrentControlSet\Services\Tcpip\Parameters";
            vec![
                format!(
                    "reg add {key} /v KeepAliveTime /t REG_DWORD /d {} /f",
                    s.time_ms
                ),
                format!(
                    "reg add {key} /v KeepAliveInterval /t REG_DWORD /d {} /f",
                    s.intvl_ms
                ),
                format!(
                    "reg add {key} /v TcpMaxDataRetransmissions /t REG_DWORD /d {} /f",
                    s.probes
                ),
                "(then restart Windows: Tcpip reads these at boot)".into(),
            ]
        }
    }
}

/// Instances with flows that ended idle and were used again (from the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Symptom {
    /// Instance name.
    pub instance: String,
    /// TCP flows (their segments were dropped: the connections broke).
    pub tcp: u64,
    /// UDP flows (they became new flows).
    pub udp: u64,
}

/// The whole report (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where the settings came from.
    pub settings_source: String,
    /// Where the idle timeout came from.
    pub idle_timeout_source: String,
    /// Registry values not in the export, taken as Windows' defaults.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub defaulted: Vec<&'static str>,
    /// The verdict.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Commands applying the recommended values.
    pub fix: Vec<String>,
    /// What the settings do not do.
    pub note: String,
    /// With `--api`: per instance with any, flows ended idle and used again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<Symptom>>,
}

const NOTE_LINUX: &str = "these sysctls are only defaults: an application must enable SO_KEEPALIVE on its sockets (or set TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT itself); one side sending keepalives is enough (R3.4)";
const NOTE_WINDOWS: &str = "these registry values are only defaults: an application must enable SO_KEEPALIVE on its sockets (or set SIO_KEEPALIVE_VALS itself); one side sending keepalives is enough (R3.4)";

/// Renders the report for people.
pub fn render(r: &Report) -> String {
    let v = &r.verdict;
    let s = &v.settings;
    let [nt, ni, np] = s.names();
    let mut o = String::new();
    let os = match s.os {
        Os::Linux => "linux",
        Os::Windows => "windows",
    };
    let _ = writeln!(
        o,
        "keepalives ({os}, {}): {nt} {}, {ni} {}, {np} {}",
        r.settings_source,
        s.show(s.time_ms),
        s.show(s.intvl_ms),
        s.probes
    );
    if !r.defaulted.is_empty() {
        let _ = writeln!(
            o,
            "  not in the export, Windows' defaults taken: {}",
            r.defaulted.join(", ")
        );
    }
    let _ = writeln!(
        o,
        "gateway idle timeout: {} s ({})",
        v.idle_timeout_secs, r.idle_timeout_source
    );
    if v.survives {
        let _ = writeln!(
            o,
            "verdict: SURVIVES: an idle connection sends a probe after {} of silence, before the gateway's {} s idle timeout; {} lost probe(s) in a row tolerated; a dead peer is given up after {} s",
            s.show(s.time_ms),
            v.idle_timeout_secs,
            v.lost_probes_tolerated,
            v.dead_peer_after_secs
        );
    } else {
        let _ = writeln!(
            o,
            "verdict: DOES NOT SURVIVE: a connection idle at the application for {} s loses its flow at the gateway and breaks at its next segment",
            v.idle_timeout_secs
        );
        for p in &v.problems {
            let _ = writeln!(o, "  {p}");
        }
        for c in &v.changes {
            let _ = writeln!(
                o,
                "change: {} {} -> {} ({})",
                c.setting, c.from, c.to, c.why
            );
        }
    }
    match &v.recommended {
        Some(rec) => {
            let seed = recommended(rec.os, DEFAULT_IDLE_SECS) == Some(*rec);
            let _ = writeln!(
                o,
                "{}: {nt} {}, {ni} {}, {np} {}",
                if seed {
                    "SPEC R7.1 values (seed 002)"
                } else {
                    "SPEC R7.1's 120/30/8 do not fit this idle timeout; values that do"
                },
                rec.raw(rec.time_ms),
                rec.raw(rec.intvl_ms),
                rec.probes
            );
            for l in &r.fix {
                let _ = writeln!(o, "  {l}");
            }
        }
        None => {
            let _ = writeln!(
                o,
                "no keepalive setting in whole seconds fits an idle timeout of {} s: raise the gateway's idle timeout",
                v.idle_timeout_secs
            );
        }
    }
    let _ = writeln!(o, "note: {}", r.note);
    if let Some(list) = &r.instances {
        if list.is_empty() {
            let _ = writeln!(
                o,
                "gateway: no instance has used a flow after it ended idle"
            );
        }
        for i in list {
            let _ = writeln!(
                o,
                "{}",
                snatgw_runtime::stats::idle_then_sent_note(&i.instance, i.tcp, i.udp)
            );
        }
    }
    o
}

/// The settings and where they came from.
fn settings_of(
    a: &KeepaliveArgs,
    proc_dir: &Path,
) -> Result<(Settings, String, Vec<&'static str>), String> {
    if let Some(f) = &a.windows_reg {
        let bytes = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let (s, d) = parse_windows_reg(&bytes).map_err(|e| format!("{}: {e}", f.display()))?;
        return Ok((s, f.display().to_string(), d));
    }
    if let (Some(t), Some(i), Some(p)) = (a.time, a.intvl, a.probes) {
        return Ok((Settings::linux(t, i, p), "given".into(), Vec::new()));
    }
    let host = read_linux(proc_dir)?;
    let given = a.time.is_some() || a.intvl.is_some() || a.probes.is_some();
    let s = Settings {
        time_ms: a.time.map_or(host.time_ms, |t| u64::from(t) * 1000),
        intvl_ms: a.intvl.map_or(host.intvl_ms, |t| u64::from(t) * 1000),
        probes: a.probes.unwrap_or(host.probes),
        ..host
    };
    let src = if given {
        format!("given, the rest from {}", proc_dir.display())
    } else {
        proc_dir.display().to_string()
    };
    Ok((s, src, Vec::new()))
}

/// Runs the check (host values read from `proc_dir`); `Err` when there is no verdict.
pub fn report(a: &KeepaliveArgs, proc_dir: &Path) -> Result<Report, String> {
    let (settings, settings_source, defaulted) = settings_of(a, proc_dir)?;
    let mut instances = None;
    let (idle, idle_source) = if let Some(i) = a.idle_timeout {
        (i, "given".to_string())
    } else if let Some(f) = &a.config {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let cfg = snatgw_core::ConfigFile::from_toml(&text)
            .map_err(|e| format!("{}: {e}", f.display()))?;
        (
            cfg.gateway.idle_timeout_secs,
            format!("gateway.idle_timeout_secs of {}", f.display()),
        )
    } else if let Some(url) = &a.api {
        let opts = ApiOpts {
            api: url.clone(),
            token_file: a.token_file.clone(),
            state_dir: a.state_dir.clone(),
        };
        let api = opts.client().map_err(|e| e.to_string())?;
        let g = api.call(Client::gateway).map_err(|e| e.to_string())?;
        let ports = api
            .call(Client::all_instance_ports)
            .map_err(|e| e.to_string())?;
        instances = Some(
            ports
                .iter()
                .filter(|p| p.idle_ended_then_sent.tcp + p.idle_ended_then_sent.udp > 0)
                .map(|p| Symptom {
                    instance: p.name.clone(),
                    tcp: p.idle_ended_then_sent.tcp,
                    udp: p.idle_ended_then_sent.udp,
                })
                .collect(),
        );
        (
            g.value.idle_timeout_secs,
            format!("the running gateway at {}", api.url),
        )
    } else {
        (
            DEFAULT_IDLE_SECS,
            "the default, SPEC R3.4; give --config, --api or --idle-timeout for your gateway's"
                .into(),
        )
    };
    if idle == 0 {
        return Err("the gateway's idle timeout is 0 s: not a valid configuration".into());
    }
    let verdict = check(settings, idle);
    let fix = verdict
        .recommended
        .as_ref()
        .map(fix_lines)
        .unwrap_or_default();
    let note = match settings.os {
        Os::Linux => NOTE_LINUX,
        Os::Windows => NOTE_WINDOWS,
    };
    Ok(Report {
        settings_source,
        idle_timeout_source: idle_source,
        defaulted,
        verdict,
        fix,
        note: note.into(),
        instances,
    })
}

/// `snatgw keepalive-check`: exit 0 survives, 1 does not, 2 no verdict.
pub fn main(a: &KeepaliveArgs) -> ExitCode {
    match report(a, Path::new(PROC_IPV4)) {
        Ok(r) => {
            if a.json {
                match serde_json::to_string_pretty(&r) {
                    Ok(t) => println!("{t}"),
                    Err(e) => {
                        eprintln!("snatgw: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print!("{}", render(&r));
            }
            if r.verdict.survives {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("snatgw: keepalive-check: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux(t: u32, i: u32, p: u32) -> Settings {
        Settings::linux(t, i, p)
    }

    #[test]
    fn seed_002_values_survive_the_default_idle_timeout() {
        let v = check(linux(120, 30, 8), 240);
        assert!(v.survives, "{v:?}");
        assert!(v.problems.is_empty() && v.changes.is_empty());
        // 120 + 3 × 30 = 210 < 240; a fourth lost probe would land at 240: too late.
        assert_eq!(v.lost_probes_tolerated, 3);
        assert_eq!(v.dead_peer_after_secs, 120 + 30 * 8);
        assert_eq!(v.recommended, Some(linux(120, 30, 8)));
    }

    #[test]
    fn linux_defaults_7200_s_do_not_survive() {
        // The kernel's defaults: 7200 s, 75 s, 9 probes.
        let v = check(linux(7200, 75, 9), 240);
        assert!(!v.survives);
        assert_eq!(v.lost_probes_tolerated, 0);
        assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
        assert!(v.problems[0].contains("net.ipv4.tcp_keepalive_time 7200 s"));
        assert_eq!(
            v.changes,
            vec![Change {
                setting: "net.ipv4.tcp_keepalive_time".into(),
                from: 7200,
                to: 120,
                why: "a first probe after 120 s of silence, below 240 s".into(),
            }]
        );
        let lines = fix_lines(&v.recommended.expect("seed values"));
        assert_eq!(
            lines[0],
            "sysctl -w net.ipv4.tcp_keepalive_time=120 net.ipv4.tcp_keepalive_intvl=30 net.ipv4.tcp_keepalive_probes=8"
        );
        assert!(lines[1].contains("net.ipv4.tcp_keepalive_time = 120\\n"));
    }

    #[test]
    fn custom_values_against_the_idle_timeout() {
        // A probe after 300 s: too late for 240 s; after 200 s: in time.
        assert!(!check(linux(300, 30, 8), 240).survives);
        let v = check(linux(200, 30, 8), 240);
        assert!(v.survives);
        assert_eq!(
            v.lost_probes_tolerated, 1,
            "200 + 30 < 240, 200 + 60 is not"
        );
        // Exactly the idle timeout is too late (the flow is gone in that second, R3.4).
        assert!(!check(linux(240, 30, 8), 240).survives);
        assert!(check(linux(239, 30, 8), 240).survives);
        // An interval at or above the idle timeout: one lost probe and the flow is gone.
        let v = check(linux(100, 300, 8), 240);
        assert!(!v.survives);
        assert_eq!(v.changes.len(), 1);
        assert_eq!(v.changes[0].setting, "net.ipv4.tcp_keepalive_intvl");
        assert_eq!((v.changes[0].from, v.changes[0].to), (300, 30));
        // A gateway with a 60 s idle timeout: the seed values are too long (120 > 60);
        // shorter ones are recommended.
        let v = check(linux(120, 30, 8), 60);
        assert!(!v.survives);
        assert_eq!(v.recommended, Some(linux(30, 15, 8)));
        assert_eq!((v.changes[0].from, v.changes[0].to), (120, 30));
        assert!(check(v.recommended.unwrap(), 60).survives);
        // 1 s: nothing in whole seconds fits.
        assert_eq!(recommended(Os::Linux, 1), None);
        assert!(check(linux(1, 1, 1), 2).survives);
        // Every recommendation survives its own idle timeout.
        for idle in 2..=1000 {
            let r = recommended(Os::Linux, idle).expect("fits");
            assert!(check(r, idle).survives, "{idle}: {r:?}");
        }
    }

    const REG: &str = "Windows Registry Editor Version 5.00\r\n\r\n\
        [HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Services\\Tcpip\\Parameters]\r\n\
        \"Hostname\"=\"web-0\"\r\n\
        \"KeepAliveTime\"=dword:0001d4c0\r\n\
        \"KeepAliveInterval\"=dword:00007530\r\n\
        \"TcpMaxDataRetransmissions\"=dword:00000008\r\n\r\n\
        [HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Services\\Tcpip\\Parameters\\Interfaces]\r\n\
        \"KeepAliveTime\"=dword:00000001\r\n";

    fn utf16le(s: &str) -> Vec<u8> {
        let mut b = vec![0xff, 0xfe];
        for u in s.encode_utf16() {
            b.extend_from_slice(&u.to_le_bytes());
        }
        b
    }

    #[test]
    fn windows_reg_exports_are_parsed() {
        // regedit / `reg export` write UTF-16LE with a BOM; ASCII works too.
        for bytes in [utf16le(REG), REG.as_bytes().to_vec()] {
            let (s, defaulted) = parse_windows_reg(&bytes).expect("parses");
            assert_eq!(
                s,
                Settings {
                    os: Os::Windows,
                    time_ms: 120_000,
                    intvl_ms: 30_000,
                    probes: 8,
                }
            );
            assert!(defaulted.is_empty());
            let v = check(s, 240);
            assert!(v.survives);
            assert_eq!(v.recommended, Some(s), "the SPEC R7.1 values");
            let lines = fix_lines(&s);
            assert!(lines[0].ends_with("/v KeepAliveTime /t REG_DWORD /d 120000 /f"));
            assert!(lines[1].ends_with("/v KeepAliveInterval /t REG_DWORD /d 30000 /f"));
            assert!(lines[2].ends_with("/v TcpMaxDataRetransmissions /t REG_DWORD /d 8 /f"));
        }
        // A key without the values: Windows' defaults (2 h), which do not survive.
        let bare = "REGEDIT4\n\n[HKLM\\SYSTEM\\CurrentControlSet\\Services\\Tcpip\\Parameters]\n\"Domain\"=\"\"\n";
        let (s, defaulted) = parse_windows_reg(bare.as_bytes()).expect("parses");
        assert_eq!((s.time_ms, s.intvl_ms, s.probes), (7_200_000, 1_000, 5));
        assert_eq!(
            defaulted,
            [
                "KeepAliveTime",
                "KeepAliveInterval",
                "TcpMaxDataRetransmissions"
            ]
        );
        let v = check(s, 240);
        assert!(!v.survives);
        assert_eq!(v.changes[0].setting, "KeepAliveTime");
        assert_eq!((v.changes[0].from, v.changes[0].to), (7_200_000, 120_000));
        // 300 s in milliseconds against 240 s.
        let custom = REG.replace("0001d4c0", "000493e0");
        assert!(!check(parse_windows_reg(custom.as_bytes()).unwrap().0, 240).survives);
        // Errors name what is wrong.
        let e = parse_windows_reg(b"KeepAliveTime=7200000").unwrap_err();
        assert!(e.contains("not a registry export"), "{e}");
        let e = parse_windows_reg(b"REGEDIT4\n[HKEY_CURRENT_USER\\x]\n").unwrap_err();
        assert!(e.contains("no key"), "{e}");
        let e =
            parse_windows_reg(REG.replace("dword:0001d4c0", "\"120000\"").as_bytes()).unwrap_err();
        assert!(e.contains("KeepAliveTime") && e.contains("dword"), "{e}");
    }

    #[test]
    fn host_values_given_values_and_the_idle_timeout_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (n, v) in [
            ("tcp_keepalive_time", "7200\n"),
            ("tcp_keepalive_intvl", "75\n"),
            ("tcp_keepalive_probes", "9\n"),
        ] {
            std::fs::write(dir.path().join(n), v).expect("write");
        }
        let a = KeepaliveArgs::default();
        let r = report(&a, dir.path()).expect("report");
        assert_eq!(r.verdict.settings, linux(7200, 75, 9));
        assert_eq!(r.verdict.idle_timeout_secs, 240);
        assert!(!r.verdict.survives);
        let text = render(&r);
        assert!(text.contains("DOES NOT SURVIVE"), "{text}");
        assert!(
            text.contains("change: net.ipv4.tcp_keepalive_time 7200 -> 120"),
            "{text}"
        );
        assert!(text.contains("SPEC R7.1 values (seed 002)"), "{text}");
        assert!(text.contains("SO_KEEPALIVE"), "{text}");
        // One value given: the others from the host.
        let a = KeepaliveArgs {
            time: Some(120),
            ..Default::default()
        };
        let r = report(&a, dir.path()).expect("report");
        assert_eq!(r.verdict.settings, linux(120, 75, 9));
        assert!(r.verdict.survives);
        // The idle timeout of a configuration file.
        let cfg = dir.path().join("gw.toml");
        std::fs::write(&cfg, "[gateway]\nidle_timeout_secs = 100\n").expect("write");
        let a = KeepaliveArgs {
            time: Some(120),
            intvl: Some(30),
            probes: Some(8),
            config: Some(cfg),
            ..Default::default()
        };
        let r = report(&a, Path::new("/nonexistent")).expect("no host read");
        assert_eq!(r.verdict.idle_timeout_secs, 100);
        assert!(!r.verdict.survives, "120 > 100");
        assert_eq!(r.verdict.recommended, Some(linux(50, 25, 8)));
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["survives"], false);
        assert_eq!(json["settings"]["time_ms"], 120_000);
        assert_eq!(json["changes"][0]["to"], 50);
        // Unreadable host values: no verdict.
        assert!(report(&KeepaliveArgs::default(), Path::new("/nonexistent")).is_err());
    }
}
