//! `snatgw plan`: the exhaustion planner's command line (issue #11, docs/PLANNER.md).
//!
//! Loads a topology — a configuration file (`--config`) or the running gateway's desired
//! topology from its API (`--api`, `GET /api/v1/topology`) — and a workload: traces
//! (`--trace`, the format `snatgw run --record` writes) and/or generators (`--generate`),
//! merged. Replays it with `snatgw-planner` in virtual time and prints the per instance and
//! destination table; with `--what-if` the same workload under each mitigation, side by side;
//! `--plot FILE.svg` draws used ports over time against the preallocation. `--write-trace`
//! saves the (merged, generated) workload as a trace. Nothing here touches the network
//! except the one API request of `--api`.

use std::path::PathBuf;

use snatgw_planner::{
    plot, replay, what_if, what_if_table, Generator, Mitigation, Options, Workload,
};

/// Options of `snatgw plan`.
#[derive(clap::Args, Debug, Clone)]
pub struct PlanArgs {
    /// Topology: a configuration file (TOML, docs/CONFIG.md).
    #[arg(long, short, conflicts_with = "api")]
    pub config: Option<PathBuf>,
    /// Topology: the running gateway's, from its management API (e.g. http://127.0.0.1:7070).
    #[arg(long)]
    pub api: Option<String>,
    /// Bearer token file for --api (default: `$SNATGW_TOKEN_FILE`, else
    /// `/var/lib/snatgw/api-token` if readable).
    #[arg(long, requires = "api")]
    pub token_file: Option<PathBuf>,
    /// A trace file (JSON Lines, docs/PLANNER.md); repeatable.
    #[arg(long)]
    pub trace: Vec<PathBuf>,
    /// A generator, e.g. `http:inst=vm1,dst=198.51.100.10:443,rate=10,duration=300`
    /// (http, pool, retry, idle; docs/PLANNER.md); repeatable.
    #[arg(long, short)]
    pub generate: Vec<String>,
    /// Mitigations to compare: `all`, or a list such as `reuse,pool:16,ilpip,keepalive:120`.
    #[arg(long)]
    pub what_if: Option<String>,
    /// Write an SVG plot of used ports over time here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Stop the replay at this time (seconds); default: the last event.
    #[arg(long)]
    pub until: Option<f64>,
    /// Write the workload as a trace here.
    #[arg(long)]
    pub write_trace: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn topology(a: &PlanArgs) -> Result<snatgw_core::ConfigFile, String> {
    match (&a.config, &a.api) {
        (Some(p), None) => Ok(snatgw_runtime::config::load_topology(p)
            .map_err(|e| e.to_string())?
            .source),
        (None, Some(url)) => {
            // As the API subcommands find it: --token-file, SNATGW_TOKEN_FILE, or the token
            // `snatgw run` generated in the default state directory.
            let (token, _) = crate::api_cli::find_token(
                a.token_file.as_deref(),
                std::env::var_os(crate::api_cli::TOKEN_FILE_ENV),
                std::path::Path::new(snatgw_control::store::DEFAULT_STATE_DIR),
            )
            .map_err(|e| e.to_string())?;
            snatgw_control::Client::new(url, token)
                .topology()
                .map(|t| t.value)
                .map_err(|e| format!("GET {url}/api/v1/topology: {e}"))
        }
        _ => Err("give the topology: --config FILE or --api URL".into()),
    }
}

fn workload(a: &PlanArgs) -> Result<Workload, String> {
    if a.trace.is_empty() && a.generate.is_empty() {
        return Err("give a workload: --trace FILE and/or --generate SPEC".into());
    }
    let mut w = Workload::new();
    for p in &a.trace {
        let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let t = Workload::from_reader(std::io::BufReader::new(f))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        w.merge(&t);
    }
    for g in &a.generate {
        w.merge(&Generator::parse(g).map_err(|e| e.to_string())?.workload());
    }
    Ok(w)
}

/// `snatgw plan`.
pub fn run(a: &PlanArgs) -> Result<(), String> {
    let cfg = topology(a)?;
    let w = workload(a)?;
    if let Some(p) = &a.write_trace {
        std::fs::write(p, w.to_trace()).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if let Some(u) = a.until {
        if !(u.is_finite() && u >= 0.0) {
            return Err(format!("--until: `{u}` is not a time in seconds >= 0"));
        }
    }
    let opts = Options {
        until_ms: a.until.map(|u| (u * 1000.0).round() as u64),
        timeline: a.plot.is_some(),
    };
    let title = |what: &str| {
        let inst = w.instances.first().cloned().unwrap_or_default();
        format!("{what} — used SNAT ports of {inst}")
    };
    match &a.what_if {
        None => {
            let r = replay(&cfg, &w, &opts).map_err(|e| e.to_string())?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", r.table());
            }
            if let Some(p) = &a.plot {
                let svg = plot::plot_report(&r, &title("replay")).map_err(|e| e.to_string())?;
                std::fs::write(p, svg).map_err(|e| format!("{}: {e}", p.display()))?;
            }
        }
        Some(list) => {
            let ms = Mitigation::parse_list(list).map_err(|e| e.to_string())?;
            let rows = what_if(&cfg, &w, &ms, &opts).map_err(|e| e.to_string())?;
            if a.json {
                let v: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| match &r.outcome {
                        Ok(rep) => serde_json::json!({"scenario": r.label, "report": rep}),
                        Err(e) => {
                            serde_json::json!({"scenario": r.label, "not_applicable": e.to_string()})
                        }
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
                );
            } else {
                if let Some(Ok(base)) = rows.first().map(|r| &r.outcome) {
                    print!("{}", base.table());
                    println!();
                }
                print!("{}", what_if_table(&rows));
            }
            if let Some(p) = &a.plot {
                let svg =
                    plot::plot_what_if(&rows, &title("what-if")).map_err(|e| e.to_string())?;
                std::fs::write(p, svg).map_err(|e| format!("{}: {e}", p.display()))?;
            }
        }
    }
    Ok(())
}
