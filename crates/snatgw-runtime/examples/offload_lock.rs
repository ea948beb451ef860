//! Lock time per flow with the kernel fast path on (issue #16, docs/PERFORMANCE.md "Offload
//! through one channel"): the runtime's real workers over in-memory queues (`MemIo`), the real
//! tc fast path (`FastPath::setup`, map writes and deletes in the kernel), a manual clock.
//! Opens FLOWS new UDP flows (one packet each, in worker batches of 64) and reads the time the
//! workers held the gateway lock from the stats snapshot (`lock.held_ns`, which includes the
//! offload's map writes); then moves the clock past the idle timeout and times the housekeeping
//! tick that releases them all (timer steps under the lock, with the offload's map deletes).
//!
//! Root, in a network namespace with two interfaces to attach to:
//! ```sh
//! cargo build --release -p snatgw-runtime --example offload_lock
//! unshare -n sh -c 'ip link add ol-a type veth peer name ol-b && ip link set ol-a up &&
//!   ip link set ol-b up && target/release/examples/offload_lock ol-a ol-b 20000 5'
//! ```
//! Uses only APIs that exist before and after issue #16's change, so the same file measures
//! both commits.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snatgw_control::EventLog;
use snatgw_core::{Engine, Topology};
use snatgw_io::MemIo;
use snatgw_runtime::fastpath::{FastPath, FastPathMode, FastPathOptions};
use snatgw_runtime::{Clock, Parts, Runtime, RuntimeOptions};
use snatgw_wire::testutil;

const IDLE: u32 = 30;

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<Ipv4Addr>().expect("ip"))
}

fn topology() -> Topology {
    Topology::from_toml(&format!(
        r#"
[gateway]
seed = 7
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100"]
idle_timeout_secs = {IDLE}

[[availability_set]]
name = "as1"

[[instance]]
name = "vm1"
private_ip = "10.0.1.10"
availability_set = "as1"
"#
    ))
    .expect("topology")
}

/// One round: (ns under the lock per opened flow, ns of the releasing tick per flow, installed).
fn round(private_if: &str, public_if: &str, flows: u32) -> (f64, f64, u64) {
    let mut engine = Engine::new(topology(), 0).expect("engine");
    let start_ns = snatgw_io::fastpath::monotonic_ns();
    let fp = FastPath::setup(
        &FastPathOptions {
            mode: FastPathMode::Tc,
            private_if: Some(private_if.into()),
            public_if: Some(public_if.into()),
            max_flows: flows * 2,
            floor: false,
            start_ns,
            pin_dir: None,
            event_ring_bytes: 0,
            events_hold: None,
            link_if: None,
            stash: false,
        },
        &mut engine,
    )
    .expect("fast path")
    .expect("fast path runs");
    let (priv_io, private) = MemIo::new();
    let (pub_io, _public) = MemIo::new();
    let time = Arc::new(AtomicU32::new(0));
    let parts = Parts {
        engine,
        clock: Clock::Manual(time.clone()),
        events: Arc::new(EventLog::new()),
        fast_path: Some(fp),
        recorder: None,
        wakers: Vec::new(),
    };
    let opts = RuntimeOptions {
        batch: 64,
        probes: false,
        ..RuntimeOptions::default()
    };
    let mut rt = Runtime::start(parts, vec![priv_io], vec![pub_io], opts).expect("runtime");
    rt.housekeep();
    let before = rt.snapshot().lock.held_ns;
    // Distinct destination ports: every packet opens a flow (1024 ports per destination).
    for i in 0..flows {
        let dport = 1000 + (i / 1000) as u16;
        let sport = 10_000 + (i % 1000) as u16;
        private.inject(&testutil::udp(
            ip("10.0.1.10"),
            sport,
            ip("198.51.100.7"),
            dport,
            b"x",
        ));
    }
    let sent = private.wait_sent(flows as usize, Duration::from_secs(60));
    assert_eq!(sent.len(), flows as usize, "every flow's packet went out");
    // The worker publishes after its batch; held_ns is updated before the batch is sent.
    let s = rt.snapshot();
    let open_ns = (s.lock.held_ns - before) as f64 / f64::from(flows);
    let installed = s.fast_path.as_ref().map_or(0, |f| f.installed);
    time.store(IDLE, Ordering::SeqCst);
    let t = Instant::now();
    let live = |rt: &Runtime| rt.gateway().lock().expect("gw").engine().live_flows();
    while live(&rt) > 0 {
        rt.housekeep();
    }
    let close_ns = t.elapsed().as_nanos() as f64 / f64::from(flows);
    rt.shutdown().expect("shutdown");
    (open_ns, close_ns, installed)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (pi, pu) = (&a[1], &a[2]);
    let flows: u32 = a.get(3).map_or(20_000, |s| s.parse().expect("flows"));
    let rounds: u32 = a.get(4).map_or(3, |s| s.parse().expect("rounds"));
    for r in 0..rounds {
        let (o, c, n) = round(pi, pu, flows);
        println!("round {r}: flows {flows} installed {n} open_lock_ns_per_flow {o:.0} close_tick_ns_per_flow {c:.0}");
    }
}
