//! The API client subcommands of `snatgw` (issue #8): `get`, `apply`, `put`, `delete`,
//! `redeploy`, `settle`, `ports`, `flows`, `events`.
//!
//! Each one speaks to a running gateway's management API (`snatgw run --api`) through the
//! blocking [`snatgw_control::Client`]: `--api URL` (default `http://127.0.0.1:7070`) and the
//! bearer token, found without flags: `--token-file PATH`, else the file named by
//! `SNATGW_TOKEN_FILE`, else `<--state-dir>/api-token` (default `/var/lib/snatgw`, where
//! `snatgw run` generates it; if that file is not readable the request goes without a token
//! and a 401 says where the token lives). Output is a table by
//! default ([`crate::api_render`]) and the server's JSON with `--json`. A refused request
//! exits non-zero with the server's message, the field and the SPEC rule
//! (`error: HTTP 400: ... (field instance[r].public_ip, SPEC R1.5)`); a server that cannot be
//! reached is named by its URL.
//!
//! What it does not do: validate topologies (the server does, with the engine's plan: a
//! TOML file is only parsed here), retry, or keep state between runs.

use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;
use snatgw_control::api::Resource;
use snatgw_control::client::DEFAULT_URL;
use snatgw_control::store::{DEFAULT_STATE_DIR, TOKEN_FILE};
use snatgw_control::{
    ApiError, Client, ClientError, EventRecord, FlowPage, FlowQuery, InstancePorts, ResourceKind,
    Tagged,
};
use snatgw_core::config::{
    AvailabilitySetCfg, DeploymentCfg, InstanceCfg, LoadBalancerCfg, NsgCfg, PublicIpCfg,
};
use snatgw_core::ConfigFile;

use crate::api_render::{self, Rows};

/// Largest page of flows or events the server returns (`limit` 1..=1000).
const MAX_PAGE: usize = 1000;
/// How long one `events --follow` request waits on the server for a new event (its maximum).
const FOLLOW_WAIT_SECS: u64 = 30;

/// Why an API subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server answered with an error status and its `{error, field, rule}` body.
    #[error("{}", api_message(*.status, .body, .token.as_ref()))]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's error body.
        body: ApiError,
        /// Where the token sent came from, or was looked for (for a 401's hint).
        token: Option<TokenSource>,
    },
    /// The server could not be reached, or its answer did not arrive.
    #[error("cannot reach the API at {url}: {detail} (is `snatgw run --api` listening there?)")]
    Unreachable {
        /// The base URL asked for.
        url: String,
        /// What the transport said.
        detail: String,
    },
    /// The server's answer is not what the route returns (another program on that port?).
    #[error("unexpected answer from the API at {url}: {detail}")]
    Decode {
        /// The base URL asked for.
        url: String,
        /// What did not decode.
        detail: String,
    },
    /// A local file (`-f`, `--token-file`) could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file (`-` for standard input).
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The token file could not be read or is empty.
    #[error(transparent)]
    Token(snatgw_control::ControlError),
    /// The arguments do not make a request (such as a name for `gateway`).
    #[error("{0}")]
    Usage(String),
    /// Writing to standard output failed.
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// The reason phrase of the statuses the API returns.
fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        412 => "Precondition Failed",
        500 => "Internal Server Error",
        _ => "",
    }
}

/// `HTTP 409 Conflict: <message> (field F, SPEC R2.8)`, plus a hint for 401 (where the
/// token was found, or looked for) and 412.
fn api_message(status: u16, body: &ApiError, token: Option<&TokenSource>) -> String {
    let mut s = format!("HTTP {status}");
    let phrase = reason(status);
    if !phrase.is_empty() {
        s.push(' ');
        s.push_str(phrase);
    }
    s.push_str(": ");
    s.push_str(&body.error);
    let mut tail = Vec::new();
    if let Some(f) = &body.field {
        tail.push(format!("field {f}"));
    }
    if let Some(r) = &body.rule {
        tail.push(format!("SPEC {r}"));
    }
    if !tail.is_empty() {
        s.push_str(&format!(" ({})", tail.join(", ")));
    }
    match status {
        401 => s.push_str(&match token {
            Some(t) => t.hint(),
            None => "; pass --token-file with the server's token".into(),
        }),
        412 => s.push_str("; it changed since you read it: get it again and retry"),
        _ => {}
    }
    s
}

/// Where the API is and how to authenticate (every client subcommand takes these).
#[derive(Args, Debug, Clone)]
pub struct ApiOpts {
    /// Base URL of the management API (`snatgw run --api`).
    #[arg(long, value_name = "URL", default_value = DEFAULT_URL)]
    pub api: String,
    /// File holding the bearer token (the one `snatgw run --token-file` was given). Default:
    /// `$SNATGW_TOKEN_FILE`, else `<--state-dir>/api-token`.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The gateway's state directory (`snatgw run --state-dir`), where it keeps the token it
    /// generated (`api-token`), read when neither --token-file nor SNATGW_TOKEN_FILE is given.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// The environment variable naming the token file when `--token-file` is not given.
pub const TOKEN_FILE_ENV: &str = "SNATGW_TOKEN_FILE";

/// Where the CLI's token came from, or where it was looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `--token-file PATH`.
    Flag(PathBuf),
    /// `SNATGW_TOKEN_FILE`.
    Env(PathBuf),
    /// `<state-dir>/api-token`, read.
    StateDir(PathBuf),
    /// `<state-dir>/api-token` could not be read (why): no token was sent.
    Unreadable(PathBuf, String),
}

impl TokenSource {
    /// The hint a 401 ends with.
    fn hint(&self) -> String {
        let other = "pass --token-file with the server's token (or set SNATGW_TOKEN_FILE)";
        match self {
            TokenSource::Flag(p) => format!(
                "; the token in {} (--token-file) is not the server's: {other}",
                p.display()
            ),
            TokenSource::Env(p) => format!(
                "; the token in {} (SNATGW_TOKEN_FILE) is not the server's: {other}",
                p.display()
            ),
            TokenSource::StateDir(p) => format!(
                "; the token in {} is not this server's: give the gateway's --state-dir, or {other}",
                p.display()
            ),
            TokenSource::Unreadable(p, why) => format!(
                "; no token sent: the gateway keeps its token in {} (`snatgw run --state-dir`, default {DEFAULT_STATE_DIR}), which could not be read ({why}): run as a user who can read it, give the gateway's --state-dir, or {other}",
                p.display()
            ),
        }
    }
}

/// Finds the CLI's token: `flag` (`--token-file`), else `env` (`SNATGW_TOKEN_FILE`), else
/// `<state_dir>/api-token`. A file named by the flag or the variable must be readable; the
/// state directory's may not be (the request then goes without a token).
pub fn find_token(
    flag: Option<&Path>,
    env: Option<std::ffi::OsString>,
    state_dir: &Path,
) -> Result<(Option<String>, TokenSource), CliError> {
    let env = env.filter(|v| !v.is_empty()).map(PathBuf::from);
    let named = match (flag, env) {
        (Some(p), _) => Some((p.to_path_buf(), TokenSource::Flag(p.to_path_buf()))),
        (None, Some(p)) => Some((p.clone(), TokenSource::Env(p))),
        (None, None) => None,
    };
    if let Some((p, src)) = named {
        let t = snatgw_control::read_token_file(&p).map_err(CliError::Token)?;
        return Ok((Some(t), src));
    }
    let p = state_dir.join(TOKEN_FILE);
    match snatgw_control::read_token_file(&p) {
        Ok(t) => Ok((Some(t), TokenSource::StateDir(p))),
        Err(e) => {
            let why = match e {
                snatgw_control::ControlError::Token { message, .. } => message,
                other => other.to_string(),
            };
            Ok((None, TokenSource::Unreadable(p, why)))
        }
    }
}

impl ApiOpts {
    /// The base URL, with `http://` added when no scheme is given.
    fn url(&self) -> String {
        if self.api.contains("://") {
            self.api.clone()
        } else {
            format!("http://{}", self.api)
        }
    }

    /// A client of the API, with the token [`find_token`] finds.
    pub(crate) fn client(&self) -> Result<Api, CliError> {
        let (token, source) = find_token(
            self.token_file.as_deref(),
            std::env::var_os(TOKEN_FILE_ENV),
            &self.state_dir,
        )?;
        let url = self.url();
        Ok(Api {
            client: Client::new(&url, token),
            url,
            token: source,
        })
    }
}

/// `<kind>`: `topology`, `gateway`, `public-ips`, `availability-sets`, `deployments`,
/// `instances`, `load-balancers`, `nsgs` (singulars and the API's collection names work too).
fn parse_kind(s: &str) -> Result<ResourceKind, String> {
    s.parse()
}

/// `snatgw ...` subcommands that talk to a running gateway's API.
#[derive(Subcommand, Debug)]
pub enum ApiCmd {
    /// Show resources of the desired topology (a table, or the API's JSON with --json).
    Get {
        /// What to show.
        #[arg(value_parser = parse_kind)]
        kind: ResourceKind,
        /// One resource (without: the whole collection; topology and gateway take none).
        name: Option<String>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Replace the whole topology with a file: TOML (as `snatgw run --config`) or JSON.
    Apply {
        /// The file (`-`: standard input). JSON if it ends in `.json` or starts with `{`.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Apply only if the topology's ETag still is this one.
        #[arg(long, value_name = "ETAG")]
        if_match: Option<String>,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Create or replace one resource from a JSON file.
    Put {
        /// What to write.
        #[arg(value_parser = parse_kind)]
        kind: ResourceKind,
        /// Its name (wins over a `name` in the body, which must match; none for gateway).
        name: Option<String>,
        /// The JSON body (`-`: standard input).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Write only if the resource's ETag still is this one.
        #[arg(long, value_name = "ETAG")]
        if_match: Option<String>,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Delete one resource (refused while something references it).
    Delete {
        /// What to delete.
        #[arg(value_parser = parse_kind)]
        kind: ResourceKind,
        /// Its name.
        name: String,
        /// Delete only if the resource's ETag still is this one.
        #[arg(long, value_name = "ETAG")]
        if_match: Option<String>,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Start a redeploy of a Classic deployment: tiers follow the reported pool size (SPEC R2.11).
    Redeploy {
        /// The deployment.
        deployment: String,
        /// The pool size the infrastructure reports: between the actual size and twice it.
        #[arg(long, value_name = "N")]
        reported: u32,
        /// Only if the deployment's ETag still is this one.
        #[arg(long, value_name = "ETAG")]
        if_match: Option<String>,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// End a redeploy: tiers follow the actual pool size again (SPEC R2.11, R2.10).
    Settle {
        /// The deployment.
        deployment: String,
        /// Only if the deployment's ETag still is this one.
        #[arg(long, value_name = "ETAG")]
        if_match: Option<String>,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Live SNAT ports per instance: scenario, public IP, block, pool, used/free, flows,
    /// connections, drops (SPEC R6.1).
    Ports {
        /// One instance (without: every instance).
        instance: Option<String>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Health-probe state of a load balancer's members: up or down, failures in a row
    /// (SPEC R5.2, R4.5).
    Probes {
        /// The load balancer.
        lb: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Live inbound flows of a load balancer: client, frontend and the member each sticks to
    /// (SPEC R5.1, R6.3).
    InboundFlows {
        /// The load balancer.
        lb: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Hits per rule of a network security group, default rules included (SPEC R4.1, R4.2).
    NsgHits {
        /// The NSG.
        nsg: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// List live translations, filtered and paged (SPEC R6.3).
    Flows {
        /// Only this instance's flows.
        #[arg(long)]
        instance: Option<String>,
        /// Only flows to this destination: `IP` or `IP:PORT`.
        #[arg(long, value_name = "IP[:PORT]")]
        destination: Option<String>,
        /// Only this protocol.
        #[arg(long, value_parser = ["tcp", "udp"])]
        protocol: Option<String>,
        /// Only flows in this state.
        #[arg(long, value_parser = snatgw_control::backend::FLOW_STATES)]
        state: Option<String>,
        /// Flows per page, 1..=1000 (default 100; with --all 1000).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Continue from a previous page's cursor.
        #[arg(long, value_name = "C", default_value_t = 0)]
        cursor: u64,
        /// Follow the cursors to the end of the table.
        #[arg(long)]
        all: bool,
        /// Print the API's JSON (`{flows, next_cursor}`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiOpts,
    },
    /// Gateway events: exhaustion, flow limits, tier and scenario changes (SPEC R6.2).
    Events {
        /// Only events with a sequence number above this one.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
        /// Keep waiting for new events until interrupted.
        #[arg(long)]
        follow: bool,
        /// JSON: an array; with --follow one object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiOpts,
    },
}

/// Runs one API subcommand; prints `error: ...` and returns failure if it fails.
pub fn main(cmd: ApiCmd) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match run(cmd, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        // `snatgw flows --all | head`: the reader left, nothing to report.
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            drop(out);
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one API subcommand, writing its output to `out`.
pub fn run(cmd: ApiCmd, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        ApiCmd::Get {
            kind,
            name,
            json,
            api,
        } => api.client()?.get(out, kind, name.as_deref(), json),
        ApiCmd::Apply {
            file,
            if_match,
            api,
        } => {
            let config = read_topology(&file)?;
            let t = api
                .client()?
                .call(|c| c.put_topology(&config, if_match.as_deref()))?;
            writeln!(
                out,
                "topology applied: generation {}, ETag {}",
                show_opt(t.generation),
                show_opt(t.etag)
            )?;
            Ok(())
        }
        ApiCmd::Put {
            kind,
            name,
            file,
            if_match,
            api,
        } => {
            let body: serde_json::Value = serde_json::from_slice(&read_input(&file)?)
                .map_err(|e| file_error(&file, format!("not JSON: {e}")))?;
            let t = api
                .client()?
                .call(|c| c.put_json(kind, name.as_deref(), &body, if_match.as_deref()))?;
            writeln!(
                out,
                "{} stored: generation {}, ETag {}",
                what(kind, name.as_deref()),
                show_opt(t.generation),
                show_opt(t.etag)
            )?;
            Ok(())
        }
        ApiCmd::Delete {
            kind,
            name,
            if_match,
            api,
        } => {
            let etag = api
                .client()?
                .call(|c| c.delete_json(kind, &name, if_match.as_deref()))?;
            writeln!(
                out,
                "{} deleted: collection ETag {}",
                what(kind, Some(&name)),
                show_opt(etag)
            )?;
            Ok(())
        }
        ApiCmd::Redeploy {
            deployment,
            reported,
            if_match,
            api,
        } => {
            let api = api.client()?;
            let t = api.call(|c| c.redeploy(&deployment, reported, if_match.as_deref()))?;
            writeln!(
                out,
                "deployment {deployment}: redeploying, tiers follow the reported pool of {reported} instance(s) (SPEC R2.11); generation {}, ETag {}",
                show_opt(t.generation),
                show_opt(t.etag)
            )?;
            api.deployment_ports(out, &deployment)
        }
        ApiCmd::Settle {
            deployment,
            if_match,
            api,
        } => {
            let api = api.client()?;
            let t = api.call(|c| c.settle(&deployment, if_match.as_deref()))?;
            writeln!(
                out,
                "deployment {deployment}: settled, tiers follow the actual pool again (SPEC R2.11, R2.10); generation {}, ETag {}",
                show_opt(t.generation),
                show_opt(t.etag)
            )?;
            api.deployment_ports(out, &deployment)
        }
        ApiCmd::Ports {
            instance,
            json,
            api,
        } => api.client()?.ports(out, instance.as_deref(), json),
        ApiCmd::Probes { lb, json, api } => {
            let v = api.client()?.call(|c| c.lb_probes(&lb))?;
            let head = [
                "PROBE",
                "MEMBER",
                "STATE",
                "FAILED IN A ROW",
                "RESULTS",
                "FAILED",
            ];
            print_rows(out, json, &v, &head, |p| {
                vec![
                    p.probe.clone(),
                    p.member.clone(),
                    if p.up { "up" } else { "down" }.into(),
                    p.consecutive_failures.to_string(),
                    p.probes.to_string(),
                    p.failures.to_string(),
                ]
            })
        }
        ApiCmd::InboundFlows { lb, json, api } => {
            let v = api.client()?.call(|c| c.lb_inbound_flows(&lb))?;
            let head = ["RULE", "PROTO", "CLIENT", "FRONTEND", "MEMBER", "IDLE S"];
            print_rows(out, json, &v, &head, |f| {
                vec![
                    f.rule.clone(),
                    f.protocol.clone(),
                    f.client.clone(),
                    f.frontend.clone(),
                    f.member.clone(),
                    f.idle_secs.to_string(),
                ]
            })
        }
        ApiCmd::NsgHits { nsg, json, api } => {
            let v = api.client()?.call(|c| c.nsg_hits(&nsg))?;
            let head = ["DIRECTION", "PRIORITY", "RULE", "ACCESS", "HITS"];
            print_rows(out, json, &v, &head, |h| {
                vec![
                    h.direction.clone(),
                    h.priority.to_string(),
                    h.rule.clone(),
                    h.access.clone(),
                    h.hits.to_string(),
                ]
            })
        }
        ApiCmd::Flows {
            instance,
            destination,
            protocol,
            state,
            limit,
            cursor,
            all,
            json,
            api,
        } => {
            let q = FlowQuery {
                instance,
                destination,
                protocol,
                state,
                cursor,
                limit: limit.unwrap_or(if all { MAX_PAGE } else { 100 }),
            };
            api.client()?.flows(out, &q, all, json)
        }
        ApiCmd::Events {
            after,
            follow,
            json,
            api,
        } => api.client()?.events(out, after, follow, json),
    }
}

fn show_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// `instances/vm1`, `gateway`.
fn what(kind: ResourceKind, name: Option<&str>) -> String {
    let k = kind.cli_name();
    match name {
        Some(n) => format!("{k}/{n}"),
        None => k.to_string(),
    }
}

fn file_error(path: &Path, message: String) -> CliError {
    CliError::File {
        path: path.display().to_string(),
        message,
    }
}

/// The bytes of `path`, or of standard input for `-`.
fn read_input(path: &Path) -> Result<Vec<u8>, CliError> {
    if path == Path::new("-") {
        let mut b = Vec::new();
        std::io::stdin()
            .read_to_end(&mut b)
            .map_err(|e| file_error(path, e.to_string()))?;
        return Ok(b);
    }
    std::fs::read(path).map_err(|e| file_error(path, e.to_string()))
}

/// A topology file: JSON if it is named `*.json` or starts with `{`, else the TOML config
/// file format. Only parsed here; the server validates it.
fn read_topology(path: &Path) -> Result<ConfigFile, CliError> {
    let bytes = read_input(path)?;
    let text = String::from_utf8(bytes).map_err(|e| file_error(path, e.to_string()))?;
    let is_json =
        path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    if is_json {
        serde_json::from_str(&text).map_err(|e| file_error(path, format!("JSON topology: {e}")))
    } else {
        ConfigFile::from_toml(&text).map_err(|e| file_error(path, e.to_string()))
    }
}

/// A client and the URL it talks to (for error messages).
pub(crate) struct Api {
    client: Client,
    pub(crate) url: String,
    /// Where its token came from (for a 401's hint).
    token: TokenSource,
}

impl Api {
    /// Runs one client call, turning its error into a [`CliError`] naming the URL.
    pub(crate) fn call<T>(
        &self,
        f: impl FnOnce(&Client) -> Result<T, ClientError>,
    ) -> Result<T, CliError> {
        f(&self.client).map_err(|e| match e {
            ClientError::Api { status, body } => CliError::Api {
                status,
                body,
                token: Some(self.token.clone()),
            },
            ClientError::Transport(detail) => CliError::Unreachable {
                url: self.url.clone(),
                detail,
            },
            ClientError::Decode(detail) => CliError::Decode {
                url: self.url.clone(),
                detail,
            },
            ClientError::Request(m) => CliError::Usage(m),
            // A failure the client learned to report after this CLI was written: the
            // request went out, so say so with the client's own words.
            other => CliError::Unreachable {
                url: self.url.clone(),
                detail: other.to_string(),
            },
        })
    }

    /// `snatgw get`.
    fn get(
        &self,
        out: &mut dyn Write,
        rk: ResourceKind,
        name: Option<&str>,
        json: bool,
    ) -> Result<(), CliError> {
        if name.is_some() && !rk.is_named() {
            return Err(CliError::Usage(format!("{} takes no name", rk.cli_name())));
        }
        if json {
            let t = self.call(|c| c.get_json(rk, name))?;
            return print_json(out, &t.value);
        }
        let (text, etag, generation) = match rk {
            ResourceKind::Topology => {
                let t = self.call(Client::topology)?;
                (api_render::topology(&t.value), t.etag, t.generation)
            }
            ResourceKind::Gateway => {
                let t = self.call(Client::gateway)?;
                (api_render::gateway(&t.value).render(), t.etag, t.generation)
            }
            ResourceKind::PublicIps => self.rows::<PublicIpCfg>(name)?,
            ResourceKind::AvailabilitySets => self.rows::<AvailabilitySetCfg>(name)?,
            ResourceKind::Deployments => self.rows::<DeploymentCfg>(name)?,
            ResourceKind::Instances => self.rows::<InstanceCfg>(name)?,
            ResourceKind::LoadBalancers => self.rows::<LoadBalancerCfg>(name)?,
            ResourceKind::Nsgs => self.rows::<NsgCfg>(name)?,
            // A kind without a table view yet: its JSON.
            _ => {
                let t = self.call(|c| c.get_json(rk, name))?;
                return print_json(out, &t.value);
            }
        };
        out.write_all(text.as_bytes())?;
        writeln!(
            out,
            "ETag {}, generation {}",
            show_opt(etag),
            show_opt(generation)
        )?;
        Ok(())
    }

    /// The table of a named kind: the collection, or one resource.
    fn rows<R: Resource + Rows>(
        &self,
        name: Option<&str>,
    ) -> Result<(String, Option<String>, Option<u64>), CliError> {
        let t: Tagged<Vec<R>> = match name {
            Some(n) => {
                let t = self.call(|c| c.get::<R>(n))?;
                Tagged {
                    value: vec![t.value],
                    etag: t.etag,
                    generation: t.generation,
                }
            }
            None => self.call(Client::list::<R>)?,
        };
        Ok((api_render::table(&t.value).render(), t.etag, t.generation))
    }

    /// `snatgw ports`.
    fn ports(
        &self,
        out: &mut dyn Write,
        instance: Option<&str>,
        json: bool,
    ) -> Result<(), CliError> {
        match instance {
            Some(n) => {
                let p = self.call(|c| c.instance_ports(n))?;
                if json {
                    return print_json(out, &p);
                }
                write_ports(out, std::slice::from_ref(&p))
            }
            None => {
                let all = self.call(Client::all_instance_ports)?;
                if json {
                    return print_json(out, &all);
                }
                write_ports(out, &all)
            }
        }
    }

    /// The ports of a deployment's instances (after `redeploy` and `settle`). The change is
    /// made already: failing to read them is only a warning.
    fn deployment_ports(&self, out: &mut dyn Write, deployment: &str) -> Result<(), CliError> {
        let read = || -> Result<Vec<InstancePorts>, CliError> {
            let members: Vec<String> = self
                .call(Client::list::<InstanceCfg>)?
                .value
                .into_iter()
                .filter(|i| i.deployment.as_deref() == Some(deployment))
                .map(|i| i.name)
                .collect();
            members
                .iter()
                .map(|n| self.call(|c| c.instance_ports(n)))
                .collect()
        };
        match read() {
            Ok(list) if list.is_empty() => Ok(()),
            Ok(list) => write_ports(out, &list),
            Err(e) => {
                eprintln!(
                    "warning: the change is made, but reading the instances' ports failed: {e}"
                );
                Ok(())
            }
        }
    }

    /// `snatgw flows`.
    fn flows(
        &self,
        out: &mut dyn Write,
        q: &FlowQuery,
        all: bool,
        json: bool,
    ) -> Result<(), CliError> {
        let page = if all {
            FlowPage {
                flows: self.call(|c| c.all_flows(q))?,
                next_cursor: None,
            }
        } else {
            self.call(|c| c.flows(q))?
        };
        if json {
            return print_json(out, &page);
        }
        out.write_all(api_render::flows(&page.flows).render().as_bytes())?;
        match page.next_cursor {
            Some(c) => writeln!(
                out,
                "{} flow(s); next cursor: {c} (continue with --cursor {c}, or pass --all)",
                page.flows.len()
            )?,
            None => writeln!(out, "{} flow(s); end of the table", page.flows.len())?,
        }
        Ok(())
    }

    /// `snatgw events`: the events kept after `after`, then with `follow` the new ones as
    /// they come (long-polls of [`FOLLOW_WAIT_SECS`]).
    fn events(
        &self,
        out: &mut dyn Write,
        after: u64,
        follow: bool,
        json: bool,
    ) -> Result<(), CliError> {
        let mut last = after;
        let mut listed: Vec<EventRecord> = Vec::new();
        if !json {
            writeln!(out, "{}", api_render::event_header())?;
        }
        // What is kept already, page by page.
        loop {
            let page = self.call(|c| c.events(last, MAX_PAGE, 0))?;
            let n = page.len();
            if let Some(e) = page.last() {
                last = last.max(e.seq);
            }
            if json && !follow {
                listed.extend(page);
            } else {
                write_events(out, &page, json)?;
            }
            if n < MAX_PAGE {
                break;
            }
        }
        if !follow {
            return if json {
                print_json(out, &listed)
            } else {
                Ok(())
            };
        }
        // Until interrupted (or the server goes away: that error ends it).
        loop {
            let page = self.call(|c| c.events(last, MAX_PAGE, FOLLOW_WAIT_SECS))?;
            if let Some(e) = page.last() {
                last = last.max(e.seq);
            }
            write_events(out, &page, json)?;
        }
    }
}

fn write_ports(out: &mut dyn Write, list: &[InstancePorts]) -> Result<(), CliError> {
    out.write_all(api_render::ports(list).render().as_bytes())?;
    // The symptom of missing keepalives (SPEC R3.4, R7.1), under the table.
    for p in list {
        let n = &p.idle_ended_then_sent;
        if n.tcp + n.udp > 0 {
            writeln!(
                out,
                "{}",
                snatgw_runtime::stats::idle_then_sent_note(&p.name, n.tcp, n.udp)
            )?;
        }
    }
    Ok(())
}

/// Events as lines: fixed-width columns, or one JSON object per line; flushed at once.
fn write_events(out: &mut dyn Write, evs: &[EventRecord], json: bool) -> Result<(), CliError> {
    for e in evs {
        if json {
            let line = serde_json::to_string(e).map_err(std::io::Error::other)?;
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", api_render::event_line(e))?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Prints `v` as the API's JSON (`json`), or as a table with `head` and one `row` per item.
fn print_rows<T: Serialize>(
    out: &mut dyn Write,
    json: bool,
    v: &[T],
    head: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> Result<(), CliError> {
    if json {
        return print_json(out, v);
    }
    let mut t = api_render::Table::new(head);
    for x in v {
        t.row(row(x));
    }
    out.write_all(t.render().as_bytes())?;
    Ok(())
}

fn print_json<T: Serialize + ?Sized>(out: &mut dyn Write, v: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(v).map_err(std::io::Error::other)?;
    writeln!(out, "{text}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_name_status_field_and_rule() {
        let body = ApiError {
            error: "instance[r].public_ip: a web_worker_role instance cannot have an instance-level public IP (SPEC R1.5)".into(),
            field: Some("instance[r].public_ip".into()),
            rule: Some("R1.5".into()),
        };
        let m = CliError::Api {
            status: 400,
            body,
            token: None,
        }
        .to_string();
        assert!(
            m.starts_with("HTTP 400 Bad Request: instance[r].public_ip: "),
            "{m}"
        );
        assert!(
            m.ends_with("(field instance[r].public_ip, SPEC R1.5)"),
            "{m}"
        );
        let m = CliError::Api {
            status: 401,
            body: ApiError::msg("missing `Authorization: Bearer <token>`"),
            token: None,
        }
        .to_string();
        assert!(
            m.contains("HTTP 401 Unauthorized") && m.contains("--token-file"),
            "{m}"
        );
        let m = CliError::Api {
            status: 412,
            body: ApiError::field("If-Match \"1\" does not match", "If-Match"),
            token: None,
        }
        .to_string();
        assert!(
            m.contains("(field If-Match)") && m.contains("get it again"),
            "{m}"
        );
    }

    #[test]
    fn the_token_is_found_without_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        let flag = dir.path().join("flag-token");
        let env = dir.path().join("env-token");
        std::fs::write(&flag, "from-flag\n").expect("write");
        std::fs::write(&env, "from-env\n").expect("write");
        let generated = state.join(TOKEN_FILE);
        // Nothing given, nothing in the state directory: no token, and the 401 says where
        // the gateway keeps it.
        let (t, src) = find_token(None, None, &state).expect("none");
        assert_eq!(t, None);
        let TokenSource::Unreadable(p, why) = &src else {
            panic!("{src:?}")
        };
        assert_eq!(p, &generated);
        assert!(why.contains("No such file"), "{why}");
        let m = CliError::Api {
            status: 401,
            body: ApiError::msg("missing `Authorization: Bearer <token>`"),
            token: Some(src.clone()),
        }
        .to_string();
        assert!(
            m.contains(&format!(
                "the gateway keeps its token in {}",
                generated.display()
            )) && m.contains("--token-file"),
            "{m}"
        );
        // The state directory's token.
        std::fs::write(&generated, "from-state\n").expect("write");
        assert_eq!(
            find_token(None, None, &state).expect("state"),
            (
                Some("from-state".into()),
                TokenSource::StateDir(generated.clone())
            )
        );
        // SNATGW_TOKEN_FILE wins over the state directory (an empty variable counts as unset).
        assert_eq!(
            find_token(None, Some(env.clone().into()), &state).expect("env"),
            (Some("from-env".into()), TokenSource::Env(env.clone()))
        );
        assert_eq!(
            find_token(None, Some("".into()), &state)
                .expect("empty env")
                .1,
            TokenSource::StateDir(generated.clone())
        );
        // --token-file wins over both.
        assert_eq!(
            find_token(Some(&flag), Some(env.clone().into()), &state).expect("flag"),
            (Some("from-flag".into()), TokenSource::Flag(flag.clone()))
        );
        // A file named explicitly must be readable.
        let missing = dir.path().join("missing");
        assert!(matches!(
            find_token(Some(&missing), None, &state),
            Err(CliError::Token(_))
        ));
        assert!(matches!(
            find_token(None, Some(missing.into()), &state),
            Err(CliError::Token(_))
        ));
        let m = TokenSource::StateDir(generated).hint();
        assert!(
            m.contains("is not this server's") && m.contains("--state-dir"),
            "{m}"
        );
    }

    #[test]
    fn api_url_gets_a_scheme() {
        let o = |s: &str| ApiOpts {
            api: s.into(),
            token_file: None,
            state_dir: DEFAULT_STATE_DIR.into(),
        };
        assert_eq!(o("127.0.0.1:7070").url(), "http://127.0.0.1:7070");
        assert_eq!(o("http://[::1]:7070/").url(), "http://[::1]:7070/");
    }

    #[test]
    fn every_kind_parses_from_its_cli_name_and_singular() {
        for &k in ResourceKind::ALL {
            assert_eq!(parse_kind(k.cli_name()), Ok(k));
        }
        assert_eq!(parse_kind("public-ip"), Ok(ResourceKind::PublicIps));
        assert_eq!(parse_kind("networkSecurityGroups"), Ok(ResourceKind::Nsgs));
        assert!(parse_kind("widgets").unwrap_err().contains("public-ips"));
    }

    #[test]
    fn topology_files_are_toml_or_json() {
        let dir = std::env::temp_dir().join(format!("snatgw-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let toml = dir.join("t.toml");
        std::fs::write(
            &toml,
            "[[public_ip]]\nname = \"p\"\naddress = \"203.0.113.9\"\n",
        )
        .expect("write");
        assert_eq!(read_topology(&toml).expect("toml").public_ip[0].name, "p");
        let json = dir.join("t.txt");
        std::fs::write(
            &json,
            r#" {"public_ip":[{"name":"q","address":"203.0.113.8"}]}"#,
        )
        .expect("write");
        assert_eq!(read_topology(&json).expect("json").public_ip[0].name, "q");
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"colour":1}"#).expect("write");
        let e = read_topology(&bad).expect_err("unknown field").to_string();
        assert!(e.contains("bad.json") && e.contains("colour"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
