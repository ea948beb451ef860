//! The lab and the snatgw gateway together: a [`LabSpec`] derived from a snatgw
//! configuration file, and starting/stopping `snatgw run` inside the gateway namespace.
//!
//! What it does: [`spec_from_config`] takes instance names and private IPs from the
//! configuration's `[[instance]]` entries (optionally only a subset, so a configuration may
//! describe 801 instances while the lab materialises three) and the gateway's public IPs
//! from every `[[public_ip]]` address plus `gateway.default_snat_pool`, so the lab and the
//! gateway's configuration cannot drift. [`start_gateway`] runs `snatgw run` in
//! `<prefix>gw`, waits for its ready line and points the lab's routing at its two TUNs.
//!
//! What it does not do: interpret the configuration beyond addresses (the engine does).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use snatgw_core::ConfigFile;

use crate::{GatewayMode, Lab, LabChild, LabError, LabSpec};

/// Builds the lab spec for `cfg`: one instance namespace per configured instance (or per
/// instance named in `only`), public IPs = all configured public IP addresses and the
/// default SNAT pool, [`GatewayMode::Snatgw`] with the default TUN names. Validated.
pub fn spec_from_config(
    prefix: &str,
    cfg: &ConfigFile,
    only: Option<&[&str]>,
) -> Result<LabSpec, LabError> {
    let bad = |m: String| LabError::InvalidSpec(m);
    let mut spec = LabSpec::new(prefix).with_mode(GatewayMode::snatgw());
    if let Some(names) = only {
        for n in names {
            if !cfg.instance.iter().any(|i| i.name == *n) {
                return Err(bad(format!("instance {n:?} is not in the configuration")));
            }
        }
    }
    for i in &cfg.instance {
        if only.is_some_and(|names| !names.contains(&i.name.as_str())) {
            continue;
        }
        let ip: Ipv4Addr = i.private_ip.parse().map_err(|_| {
            bad(format!(
                "instance {}: bad private_ip {:?}",
                i.name, i.private_ip
            ))
        })?;
        spec = spec.with_instance(i.name.clone(), ip);
    }
    let mut publics: Vec<Ipv4Addr> = Vec::new();
    let addrs = cfg
        .public_ip
        .iter()
        .map(|p| p.address.as_str())
        .chain(cfg.gateway.default_snat_pool.iter().map(String::as_str));
    for a in addrs {
        let ip: Ipv4Addr = a
            .parse()
            .map_err(|_| bad(format!("public address {a:?} is not an IPv4 address")))?;
        if !publics.contains(&ip) {
            publics.push(ip);
        }
    }
    spec.public_ips = publics;
    spec.validate()?;
    Ok(spec)
}

/// How to start `snatgw run` in the lab.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// The `snatgw` binary.
    pub bin: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// TUN queues (= worker threads).
    pub queues: usize,
    /// TUN virtio-net offload.
    pub offload: bool,
    /// Where the gateway writes its JSON stats snapshot every second.
    pub stats_file: PathBuf,
    /// Where its log (stderr) goes; `None`: inherited.
    pub log_file: Option<PathBuf>,
    /// The gateway's store directory (`--state-dir`): the topology survives a restart there.
    pub state_dir: PathBuf,
    /// Start with an empty store (remove `state_dir` first), so the configuration file is the
    /// topology; `false` keeps what an earlier gateway stored (a restart).
    pub fresh_state: bool,
    /// Management API address inside the gateway namespace (`--api`; its loopback is the
    /// namespace's own, so every lab can use the default `127.0.0.1:7070`).
    pub api: String,
    /// `--fast-path` (`off`, `tc` or `auto`); the lab's interfaces are the attach points
    /// (the bridge for the private side, the link to the internet for the public side).
    /// [`GatewayOptions::new`] takes it from `SNATGW_FAST_PATH` (default `off`), so every lab
    /// test runs with the fast path on when the suite is run with `SNATGW_FAST_PATH=tc`.
    pub fast_path: String,
    /// Extra arguments for `snatgw run`.
    pub extra: Vec<String>,
}

/// The fast-path mode lab gateways start with: `SNATGW_FAST_PATH`, default `off`.
pub fn fast_path_from_env() -> String {
    std::env::var("SNATGW_FAST_PATH").unwrap_or_else(|_| "off".into())
}

impl GatewayOptions {
    /// Options with the defaults: state under the stats file's directory (`state/`), fresh,
    /// API on `127.0.0.1:7070`, no offload, one log file beside the stats file.
    pub fn new(bin: PathBuf, config: PathBuf, queues: usize, stats_file: PathBuf) -> Self {
        let dir = stats_file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        GatewayOptions {
            bin,
            config,
            queues,
            offload: false,
            log_file: Some(dir.join("gateway.log")),
            state_dir: dir.join("state"),
            fresh_state: true,
            api: DEFAULT_API.into(),
            stats_file,
            fast_path: fast_path_from_env(),
            extra: Vec::new(),
        }
    }
}

/// The API address `snatgw run` listens on in the lab (inside the gateway namespace).
pub const DEFAULT_API: &str = "127.0.0.1:7070";

/// The token file `snatgw run` generates in its state directory when it is not given
/// `--token-file` (`snatgw_control::store::TOKEN_FILE`; this crate does not depend on it).
pub const TOKEN_FILE: &str = "api-token";

impl GatewayOptions {
    /// The file holding the API's bearer token of a gateway started with these options: the
    /// `--token-file` among [`GatewayOptions::extra`], else `state_dir/api-token`.
    pub fn token_file(&self) -> PathBuf {
        self.extra
            .iter()
            .position(|a| a == "--token-file")
            .and_then(|i| self.extra.get(i + 1))
            .map_or_else(|| self.state_dir.join(TOKEN_FILE), PathBuf::from)
    }

    /// The API's bearer token (trimmed), read from [`GatewayOptions::token_file`]; `None` if
    /// it cannot be read (no API, or the gateway has not started yet).
    pub fn api_token(&self) -> Option<String> {
        let t = std::fs::read_to_string(self.token_file()).ok()?;
        let t = t.trim();
        (!t.is_empty()).then(|| t.to_string())
    }
}

/// Starts `snatgw run` in the gateway namespace of `lab` (which must be in
/// [`GatewayMode::Snatgw`]), waits for its ready line, then configures the lab's routing
/// into its TUNs. The process is killed by [`Lab::down`] if still running.
pub fn start_gateway(lab: &Lab, opts: &GatewayOptions) -> Result<LabChild, LabError> {
    let GatewayMode::Snatgw {
        tun_private,
        tun_public,
    } = &lab.spec().mode
    else {
        return Err(LabError::WrongMode(
            "start_gateway needs GatewayMode::Snatgw",
        ));
    };
    let bin = opts.bin.to_string_lossy().into_owned();
    let config = opts.config.to_string_lossy().into_owned();
    let stats = opts.stats_file.to_string_lossy().into_owned();
    let queues = opts.queues.to_string();
    if opts.fresh_state {
        match std::fs::remove_dir_all(&opts.state_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LabError::Spawn {
                    cmd: format!("remove {}", opts.state_dir.display()),
                    source,
                })
            }
        }
    }
    let state = opts.state_dir.to_string_lossy().into_owned();
    let mut argv = vec![
        bin.as_str(),
        "run",
        "--config",
        &config,
        "--tun-private",
        tun_private,
        "--tun-public",
        tun_public,
        "--queues",
        &queues,
        "--stats-file",
        &stats,
        "--state-dir",
        &state,
        "--api",
        &opts.api,
    ];
    if opts.offload {
        argv.push("--offload");
    }
    argv.extend([
        "--fast-path",
        &opts.fast_path,
        "--private-if",
        crate::spec::BRIDGE,
        "--public-if",
        crate::spec::GW_INET_IF,
    ]);
    argv.extend(opts.extra.iter().map(String::as_str));
    let stderr = match &opts.log_file {
        Some(p) => Stdio::from(std::fs::File::create(p).map_err(|source| LabError::Spawn {
            cmd: format!("create {}", p.display()),
            source,
        })?),
        None => Stdio::inherit(),
    };
    let child = lab.spawn_with(&lab.gw_ns(), &argv, Stdio::piped(), stderr)?;
    match child.read_line(Duration::from_secs(20))? {
        Some(line) if line.contains("\"ready\"") => {}
        other => {
            let _ = child.kill();
            return Err(LabError::BadOutput {
                cmd: argv.join(" "),
                reason: format!("expected the ready line, got {other:?}"),
            });
        }
    }
    for tun in [tun_private, tun_public] {
        lab.wait_for_link(&lab.gw_ns(), tun, Duration::from_secs(5))?;
    }
    lab.configure_tun()?;
    Ok(child)
}

/// Asks the gateway to stop (SIGTERM) and waits up to `timeout`; returns whether it exited
/// successfully (it is killed if it did not exit in time).
pub fn stop_gateway(child: &LabChild, timeout: Duration) -> bool {
    let _ = child.terminate();
    match child.wait_timeout(timeout) {
        Ok(Some(st)) => st.success(),
        _ => {
            let _ = child.kill();
            false
        }
    }
}

/// Reads a configuration file.
pub fn read_config(path: &Path) -> Result<ConfigFile, LabError> {
    let text = std::fs::read_to_string(path).map_err(|source| LabError::Spawn {
        cmd: format!("read {}", path.display()),
        source,
    })?;
    ConfigFile::from_toml(&text)
        .map_err(|e| LabError::InvalidSpec(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_file_is_the_flag_or_the_state_dirs() {
        let mut o =
            GatewayOptions::new("snatgw".into(), "gw.toml".into(), 1, "/t/stats.json".into());
        assert_eq!(o.token_file(), Path::new("/t/state/api-token"));
        o.extra = vec![
            "--stats-interval-ms".into(),
            "200".into(),
            "--token-file".into(),
            "/t/tok".into(),
        ];
        assert_eq!(o.token_file(), Path::new("/t/tok"));
    }

    #[test]
    fn lab_toml_derives_a_valid_spec() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/lab.toml");
        let cfg = read_config(&path).unwrap();
        let spec = spec_from_config("t2-", &cfg, None).unwrap();
        assert_eq!(spec.instances.len(), cfg.instance.len());
        assert!(spec.public_ips.len() >= 4);
        let sub = spec_from_config("t2-", &cfg, Some(&["vm-ilpip"])).unwrap();
        assert_eq!(sub.instances.len(), 1);
        assert!(spec_from_config("t2-", &cfg, Some(&["nope"])).is_err());
    }
}
