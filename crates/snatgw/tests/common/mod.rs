//! Shared harness of the lab tests: a lab derived from a configuration, the lab's servers
//! and `snatgw run` in the gateway namespace, torn down on drop (also when an assertion
//! fails: `Lab`'s drop kills every process in the lab's namespaces, the gateway included,
//! and deletes them).
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use snatgw_lab::gateway::{spec_from_config, start_gateway, stop_gateway, GatewayOptions};
use snatgw_lab::{ClientReport, Lab, LabChild};

pub const BIN: &str = env!("CARGO_BIN_EXE_snatgw");
pub const SERVER_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
pub const SERVER_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 101);
pub const SERVER_DNS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
pub const T: Duration = Duration::from_secs(60);

/// Whether the test can run (root); fails instead of skipping when `SNATGW_REQUIRE_ROOT=1`.
pub fn root_or_skip() -> bool {
    snatgw_lab::root_or_skip()
}

pub fn lab_toml() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/lab.toml");
    std::fs::read_to_string(p).expect("examples/lab.toml")
}

pub struct GwLab {
    pub lab: Lab,
    pub gw: LabChild,
    pub dir: PathBuf,
    pub stats: PathBuf,
    pub config: PathBuf,
}

impl GwLab {
    /// Lab with prefix `sg<tag><pid>-`, instances of `config` (or those in `only`).
    pub fn start(tag: &str, config: &str, only: Option<&[&str]>) -> GwLab {
        let prefix = format!("sg{tag}{}-", std::process::id() % 100_000);
        let dir =
            std::env::temp_dir().join(format!("snatgw-test-{}", prefix.trim_end_matches('-')));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg_path = dir.join("gw.toml");
        std::fs::write(&cfg_path, config).unwrap();
        let cfg = snatgw_core::ConfigFile::from_toml(config).expect("config parses");
        let spec = spec_from_config(&prefix, &cfg, only).expect("spec");
        let mut lab = Lab::up(spec).expect("lab up");
        lab.set_server_subcommand(Some("lab-server"));
        lab.start_servers(Path::new(BIN), "snatgw.test")
            .expect("servers");
        let stats = dir.join("stats.json");
        let _ = std::fs::remove_file(&stats);
        let gw = start_gateway(
            &lab,
            &GatewayOptions {
                extra: vec!["--stats-interval-ms".into(), "200".into()],
                ..GatewayOptions::new(BIN.into(), cfg_path.clone(), 2, stats.clone())
            },
        )
        .expect("gateway started");
        GwLab {
            lab,
            gw,
            dir,
            stats,
            config: cfg_path,
        }
    }

    pub fn client(&self, instance: &str, args: &[&str]) -> ClientReport {
        self.lab
            .client(instance, Path::new(BIN), args, T)
            .expect("client ran")
    }

    pub fn spawn_client(&self, instance: &str, args: &[&str]) -> LabChild {
        let mut argv = vec![BIN, "lab-server", "client"];
        argv.extend_from_slice(args);
        self.lab
            .spawn(&self.lab.ns_name(instance), &argv)
            .expect("spawn client")
    }

    pub fn snapshot(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(t) = std::fs::read(&self.stats) {
                if let Ok(v) = serde_json::from_slice::<Value>(&t) {
                    return v;
                }
            }
            assert!(Instant::now() < deadline, "no stats file");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The instance's entry in the latest snapshot.
    pub fn inst(&self, name: &str) -> Value {
        inst_of(&self.snapshot(), name)
    }

    /// Waits (bounded) until `f(snapshot)`; returns whether it happened.
    pub fn wait(&self, timeout: Duration, f: impl Fn(&Value) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if f(&self.snapshot()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `f` on a thread inside instance `name`'s namespace and returns its result.
    pub fn in_instance<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        self.in_ns(&self.lab.ns_name(name), f)
    }

    pub fn in_ns<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.lab
            .spawn_thread_in(ns, f)
            .expect("thread in namespace")
            .join()
            .expect("namespace thread panicked")
    }

    /// Stops the gateway (SIGTERM), checks it exits 0 and wrote its final snapshot, and
    /// removes the lab.
    pub fn finish(mut self) {
        assert!(
            stop_gateway(&self.gw, Duration::from_secs(5)),
            "gateway did not exit cleanly on SIGTERM"
        );
        assert_eq!(self.snapshot()["final_snapshot"], true);
        let prefix = self.lab.spec().prefix.clone();
        self.lab.down().expect("lab down");
        assert!(snatgw_lab::list_namespaces(&prefix).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Instance `name`'s entry in snapshot `s`.
pub fn inst_of(s: &Value, name: &str) -> Value {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no instance {name} in stats"))
}

pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}
