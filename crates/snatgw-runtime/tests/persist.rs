//! The state file a restart restores flows from (SPEC R11.1, issue #18), without root.
//!
//! - a crash in the middle of writing (SIGKILL at random points, 20 rounds) leaves the old
//!   or the new file, never a mix;
//! - the snapshotter's file holds the engine's flows, and a last snapshot at a clean stop
//!   holds every one;
//! - a restore under a changed topology applies the change after the import.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snatgw_core::engine::persist::FlowState;
use snatgw_core::{tcp_flags, Direction, Engine, FlowKey, Packet, Topology, Verdict};
use snatgw_dataplane::Gateway;
use snatgw_runtime::persist::{restore_engine, SavedState, Snapshotter, StateFile};

const CHILD_ENV: &str = "SNATGW_PERSIST_TEST_WRITER";

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<Ipv4Addr>().expect("ip"))
}

fn topology(n: usize) -> Topology {
    let mut t = String::from(
        "[gateway]\nseed = 7\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"192.0.2.1\"]\n\
         idle_timeout_secs = 240\n\n[[availability_set]]\nname = \"as1\"\n",
    );
    for i in 0..n {
        t += &format!(
            "\n[[instance]]\nname = \"vm{i}\"\nprivate_ip = \"10.0.1.{}\"\navailability_set = \"as1\"\n",
            i + 1
        );
    }
    Topology::from_toml(&t).expect("topology")
}

fn open_flows(e: &mut Engine, now: u32, n: u16) {
    for sp in 0..n {
        let p = Packet::tcp(
            ip("10.0.1.1"),
            10_000 + sp,
            ip("198.51.100.7"),
            443,
            tcp_flags::SYN,
        );
        assert!(matches!(
            e.process(now, Direction::Outbound, &p),
            Verdict::Translate { .. }
        ));
    }
}

/// A state whose every part says which version it is: version `k` has `k` flows and time
/// `k`, so a file mixing two versions cannot pass as either.
fn version(k: u32) -> SavedState {
    let key = |i: u32| FlowKey {
        proto: 6,
        src: ip("10.0.1.1"),
        sport: 1 + i as u16,
        dst: ip("198.51.100.7"),
        dport: 443,
        public: ip("192.0.2.1"),
        pport: 1024 + i as u16,
    };
    SavedState {
        boot_id: format!("boot-{k}"),
        origin_ns: u64::from(k),
        config: topology(1).source,
        designations: Vec::new(),
        flows: FlowState {
            time: k,
            layouts: Vec::new(),
            flows: (0..k)
                .map(|i| snatgw_core::engine::persist::FlowRecord {
                    key: key(i),
                    last_seen: k,
                    close_at: 0,
                    tcp_state: 0,
                    born: 0,
                })
                .collect(),
            releases: Vec::new(),
        },
    }
}

/// Child process: writes versions 1, 2, 3, ... of the state file until killed.
#[test]
fn writer_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let f = StateFile::in_dir(std::path::Path::new(&dir));
    for k in 1.. {
        // Large enough that a write takes a while (about 2 MB).
        f.write(&version(40_000 + k % 3000)).expect("write");
    }
}

#[test]
fn r11_1_sigkill_while_writing_leaves_the_old_or_the_new_state_never_a_mix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = StateFile::in_dir(dir.path());
    let exe = std::env::current_exe().expect("test binary");
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..20u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        // Wait for a first complete file (from this or an earlier round), then kill at a
        // pseudo-random point in the next 0-150 ms.
        let t = Instant::now();
        while !f.path().exists() && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let jitter = (round * 7919 + 13) % 150;
        std::thread::sleep(Duration::from_millis(jitter));
        // SIGKILL: no destructor, no flush, as a crash.
        child.kill().expect("kill");
        let _ = child.wait();
        let s = f
            .read()
            .expect("the file is always whole after a crash")
            .expect("a file exists");
        let k = s.flows.time;
        assert_eq!(
            s.flows.flows.len() as u32,
            k,
            "round {round}: a mix of versions"
        );
        assert_eq!(s.boot_id, format!("boot-{k}"));
        assert_eq!(s, version(k), "round {round}");
        seen.insert(k);
        // No temporary file survives a read.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(left.is_empty(), "round {round}: leftover {left:?}");
    }
    assert!(seen.len() > 1, "kills landed on one version only: {seen:?}");
}

#[test]
fn r11_1_torn_state_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = StateFile::in_dir(dir.path());
    let b = version(50).encode();
    for cut in [3, 20, b.len() / 2, b.len() - 1] {
        std::fs::write(f.path(), &b[..cut]).expect("write");
        assert!(f.read().is_err(), "cut at {cut}");
    }
    let mut flipped = b.clone();
    flipped[b.len() / 2] ^= 1;
    std::fs::write(f.path(), &flipped).expect("write");
    assert!(f.read().is_err());
    std::fs::write(f.path(), &b).expect("write");
    assert_eq!(f.read().expect("read"), Some(version(50)));
}

#[test]
fn r11_1_snapshotter_writes_the_engines_flows_and_a_last_one_at_a_clean_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = StateFile::in_dir(dir.path());
    let mut e = Engine::new(topology(2), 0).expect("engine");
    open_flows(&mut e, 1, 300);
    let gw = Arc::new(Mutex::new(Gateway::new(e)));
    let snap = Snapshotter::start(gw.clone(), file.clone(), 123, Duration::from_millis(50));
    let c = snap.counters();
    let t = Instant::now();
    while c.written.load(std::sync::atomic::Ordering::Relaxed) < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "no snapshot written");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Flows opened after the last periodic snapshot are in the one a clean stop writes.
    open_flows(gw.lock().expect("lock").engine_mut(), 2, 400);
    snap.finish().expect("last snapshot");
    let s = file.read().expect("read").expect("file");
    assert_eq!(s.origin_ns, 123);
    let want = gw.lock().expect("lock").engine().export_state();
    assert_eq!(s.flows.flows.len(), 400);
    assert_eq!(s.flows, want);
    assert_eq!(s.config, topology(2).source);
}

#[test]
fn r11_1_restore_under_a_changed_topology_applies_the_change_after_the_import() {
    let mut e = Engine::new(topology(2), 0).expect("engine");
    open_flows(&mut e, 1, 50);
    let saved = SavedState {
        boot_id: "b".into(),
        origin_ns: 0,
        config: e.topology().source.clone(),
        designations: e.designations(),
        flows: e.export_state(),
    };
    // Same topology: all 50 come back.
    let (r, rep) = restore_engine(&saved, topology(2), 5, 99).expect("restore");
    assert_eq!((rep.flows, r.live_flows()), (50, 50));
    // vm0 removed (R1.4): its flows end, as on a live change.
    let mut t = topology(2).source;
    t.instance.remove(0);
    let (r, rep) =
        restore_engine(&saved, Topology::from_config(t).expect("t"), 5, 99).expect("restore");
    assert_eq!(rep.flows, 50);
    assert_eq!(r.live_flows(), 0);
    r.check_invariants().expect("invariants");
}
