//! Start-up of `snatgw run` on a state directory that already holds a topology (issue #20),
//! in the lab with the real binary:
//!
//! - the configuration file differs from the stored topology: the store's runs, and a warning
//!   names every change (`instance[vm-as2] changed`, `public_ip[pip9] added`, ...) and how to
//!   apply the file; with `--config-wins` the file runs and is saved as generation + 1, the
//!   default-SNAT designation of a group that remains is kept; started again with the same
//!   file and flag, nothing changes;
//! - the API always needs a token: the one generated in the state directory, which the CLI
//!   finds there by itself (`--state-dir`), and whose place a 401 names when it cannot;
//! - event sequence numbers keep growing across the restarts.
//!
//! Root only (fails instead of skipping when `SNATGW_REQUIRE_ROOT=1`).

mod common;

use std::time::Duration;

use common::*;
use snatgw_control::{Client, ClientError, EventRecord};
use snatgw_core::config::InstanceCfg;
use snatgw_core::ConfigFile;

const POOL: [&str; 2] = ["192.0.2.20", "192.0.2.21"];

/// Topology A: two default-SNAT addresses, set `as1` with two instances.
fn config_a() -> String {
    format!(
        "[gateway]\nseed = 1\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"{}\", \"{}\"]\n\
         idle_timeout_secs = 120\nfin_timeout_secs = 2\nrst_timeout_secs = 2\nport_reuse_history_secs = 2\n\n\
         [[public_ip]]\nname = \"pip1\"\naddress = \"203.0.113.31\"\n\n\
         [[availability_set]]\nname = \"as1\"\n\n\
         [[instance]]\nname = \"vm-as1\"\nprivate_ip = \"10.0.3.10\"\navailability_set = \"as1\"\n\n\
         [[instance]]\nname = \"vm-as2\"\nprivate_ip = \"10.0.3.11\"\navailability_set = \"as1\"\n",
        POOL[0], POOL[1]
    )
}

/// Topology B: A with another idle timeout, a public IP added, vm-as2 changed (address), and
/// an instance added.
fn config_b() -> String {
    config_a()
        .replace("idle_timeout_secs = 120", "idle_timeout_secs = 90")
        .replace(
            "[[availability_set]]",
            "[[public_ip]]\nname = \"pip9\"\naddress = \"203.0.113.39\"\n\n[[availability_set]]",
        )
        .replace("10.0.3.11", "10.0.3.12")
        + "\n[[instance]]\nname = \"vm-b\"\nprivate_ip = \"10.0.3.20\"\n"
}

/// Adds and removes an instance through the API (a `scenario_changed` event; the topology is
/// the same afterwards, two generations on) and returns the events it produced.
fn an_event(g: &GwLab, after: u64) -> Vec<EventRecord> {
    g.api(move |c: &Client| -> Result<Vec<EventRecord>, ClientError> {
        let inst = InstanceCfg {
            name: "vm-tmp".into(),
            kind: Default::default(),
            model: Default::default(),
            private_ip: "10.0.3.99".into(),
            public_ip: None,
            availability_set: None,
            deployment: None,
            max_flows: None,
        };
        c.put(&inst, None)?;
        c.delete::<InstanceCfg>("vm-tmp", None)?;
        c.events(after, 1000, 5)
    })
    .expect("PUT + DELETE /instances/vm-tmp, GET /events")
}

/// `snatgw ARGS` run in the gateway namespace (where the API listens): (success, stdout, stderr).
fn cli(g: &GwLab, args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new("ip")
        .args(["netns", "exec", &g.lab.gw_ns(), BIN])
        .args(args)
        .env_remove("SNATGW_TOKEN_FILE")
        .output()
        .expect("ip netns exec snatgw");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn stop(g: &GwLab) {
    assert!(
        snatgw_lab::gateway::stop_gateway(&g.gw, Duration::from_secs(5)),
        "gateway did not exit cleanly on SIGTERM"
    );
}

#[test]
fn i20_a_changed_config_file_is_named_and_only_wins_with_config_wins() {
    if !root_or_skip() {
        return;
    }
    let a = ConfigFile::from_toml(&config_a()).unwrap();
    let b = ConfigFile::from_toml(&config_b()).unwrap();
    let mut g = GwLab::start("stu", &config_a(), Some(&["vm-as1"]));
    let state = g.opts.state_dir.to_string_lossy().into_owned();

    // Run 1: the file seeded the store. The CLI finds the generated token by itself.
    let t = g.api(|c| c.topology()).expect("GET /topology");
    assert_eq!((t.generation, &t.value), (Some(1), &a));
    let (ok, out, err) = cli(&g, &["get", "topology", "--json", "--state-dir", &state]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<ConfigFile>(&out).unwrap(), a);
    let nowhere = g.dir.join("no-state");
    let (ok, _, err) = cli(
        &g,
        &[
            "get",
            "instances",
            "--state-dir",
            &nowhere.to_string_lossy(),
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("HTTP 401")
            && err.contains(&format!(
                "the gateway keeps its token in {}",
                nowhere.join("api-token").display()
            )),
        "{err}"
    );
    let ev1 = an_event(&g, 0);
    assert!(!ev1.is_empty(), "a scenario_changed event");
    let last1 = ev1.last().unwrap().seq;
    let gen_a = 3; // seed + PUT + DELETE, same topology
    let designated = g
        .api(|c| c.instance_ports("vm-as1"))
        .expect("ports")
        .public_ip;
    assert!(POOL.contains(&designated.as_str()), "{designated}");
    stop(&g);

    // Run 2: file B, no flag. The store's A runs; a warning names each change and the way out.
    std::fs::write(&g.config, config_b()).unwrap();
    g.restart();
    let t = g.api(|c| c.topology()).expect("GET /topology");
    assert_eq!(
        (t.generation, &t.value),
        (Some(gen_a), &a),
        "the store wins"
    );
    let log = g.log();
    let warn = log
        .lines()
        .find(|l| l.contains("the configuration file differs from the stored topology"))
        .unwrap_or_else(|| panic!("no warning in\n{log}"));
    eprintln!("run 2 logged: {warn}");
    assert!(warn.contains("WARN"), "{warn}");
    assert!(
        warn.contains(
            "gateway.idle_timeout_secs changed, public_ip[pip9] added, instance[vm-as2] changed, instance[vm-b] added;"
        ),
        "{warn}"
    );
    assert!(
        warn.contains(&format!("snatgw apply -f {}", g.config.display()))
            && warn.contains("--config-wins"),
        "{warn}"
    );
    let ports = g.api(|c| c.all_instance_ports()).expect("ports");
    assert!(ports.iter().all(|p| p.name != "vm-b"), "B is not running");
    stop(&g);

    // Run 3: file B with --config-wins: B runs, saved as the next generation; vm-as1's group
    // keeps its default-SNAT address.
    g.opts.extra.push("--config-wins".into());
    g.restart();
    let t = g.api(|c| c.topology()).expect("GET /topology");
    assert_eq!(
        (t.generation, &t.value),
        (Some(gen_a + 1), &b),
        "the file wins"
    );
    let log = g.log();
    assert!(
        log.contains("--config-wins: the configuration file replaces the stored topology")
            && !log.contains("differs from the stored topology"),
        "{log}"
    );
    let p = g.api(|c| c.instance_ports("vm-b")).expect("vm-b runs");
    assert_eq!(p.scenario, "default_snat");
    assert_eq!(
        g.api(|c| c.instance_ports("vm-as1"))
            .expect("ports")
            .public_ip,
        designated,
        "R1.3: the stored designation of set as1 is kept"
    );
    let r = g.client("vm-as1", &["myip-http", &SERVER_A.to_string()]);
    assert!(r.all_ok(), "{r:?}");
    // Event numbers keep growing across the restarts.
    let ev3 = an_event(&g, last1);
    assert!(!ev3.is_empty());
    assert!(ev3[0].seq > last1, "{} after {last1}", ev3[0].seq);
    assert!(
        g.api(move |c| c.events(0, 1000, 0))
            .expect("events")
            .iter()
            .all(|e| e.seq > last1),
        "the new run's log holds only new numbers"
    );
    stop(&g);

    // Run 4: the same file and flag again: the store equals the file, nothing is saved.
    g.restart();
    let t = g.api(|c| c.topology()).expect("GET /topology");
    assert_eq!((t.generation, &t.value), (Some(gen_a + 3), &b));
    assert!(g
        .log()
        .contains("running the topology from the store; it equals the configuration file"));
    g.finish();
}
