//! Atomicity of `RedbStore::save` under a crash: a child process (this test binary, re-run
//! with an environment variable) saves generation after generation in a loop and is killed
//! with SIGKILL after a random short time; the parent reopens the store and must find one
//! complete generation, whose config equals what that generation wrote — never a mix, never
//! nothing, never an older generation than one already seen.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use snatgw_control::{RedbStore, Store, Stored};
use snatgw_core::config::{InstanceCfg, PublicIpCfg};
use snatgw_core::ConfigFile;

const ENV_DIR: &str = "SNATGW_STORE_CRASH_DIR";
const READY: &str = "ready";

/// What generation `g` writes: its size and every name depend on `g`, so a record mixing
/// two generations cannot equal either.
fn generation_config(g: u64) -> ConfigFile {
    let mut c = ConfigFile::default();
    c.gateway.seed = g;
    c.gateway.idle_timeout_secs = 1 + (g % 1000) as u32;
    for i in 0..(g % 40 + 1) {
        c.instance.push(InstanceCfg {
            name: format!("g{g}-vm{i}"),
            kind: Default::default(),
            model: Default::default(),
            private_ip: format!("10.0.{}.{}", i / 250, i % 250 + 1),
            public_ip: (i % 3 == 0).then(|| format!("g{g}-pip{i}")),
            availability_set: None,
            deployment: None,
            max_flows: Some(g as u32),
        });
        if i % 3 == 0 {
            c.public_ip.push(PublicIpCfg {
                name: format!("g{g}-pip{i}"),
                address: format!("203.0.113.{}", i % 250 + 1),
            });
        }
    }
    c
}

/// The child's loop; does nothing unless run as the child.
#[test]
fn crash_child_writer() {
    let Some(dir) = std::env::var_os(ENV_DIR) else {
        return;
    };
    let dir = Path::new(&dir);
    let store = RedbStore::open(dir).expect("child: open");
    let start = store
        .load()
        .expect("child: load")
        .map_or(1, |s| s.generation + 1);
    for g in start.. {
        store
            .save(&Stored {
                generation: g,
                config: generation_config(g),
                designations: Vec::new(),
            })
            .expect("child: save");
        if g == start {
            std::fs::write(dir.join(READY), g.to_string()).expect("child: ready");
        }
    }
}

fn random_below(n: u64) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() % n
}

#[test]
fn a_killed_writer_leaves_one_whole_generation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut last = 0u64;
    for round in 0..6 {
        let _ = std::fs::remove_file(dir.path().join(READY));
        let mut child = Command::new(&exe)
            .args(["crash_child_writer", "--exact", "--test-threads=1"])
            .env(ENV_DIR, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the child");
        let t0 = Instant::now();
        while !dir.path().join(READY).exists() {
            if let Some(st) = child.try_wait().expect("try_wait") {
                panic!("round {round}: the child exited early: {st}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "round {round}: the child never got ready"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // Kill it somewhere inside its loop of transactions.
        std::thread::sleep(Duration::from_millis(1 + random_below(150)));
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("wait");
        assert!(!status.success(), "round {round}: the child was not killed");

        let store = RedbStore::open(dir.path()).expect("reopen after SIGKILL");
        let s = store
            .load()
            .expect("load after SIGKILL")
            .expect("a generation is stored");
        assert!(
            s.generation > last,
            "round {round}: generation {} after {last}",
            s.generation
        );
        assert_eq!(
            s.config,
            generation_config(s.generation),
            "round {round}: generation {} is not what it wrote",
            s.generation
        );
        eprintln!(
            "round {round}: generation {} survived the kill",
            s.generation
        );
        last = s.generation;
        drop(store);
    }
    assert!(last >= 6, "each round commits at least one generation");
}
