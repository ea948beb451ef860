//! The backend's `/metrics` snapshot carries the engine's takeover state (issue #19, R10.4):
//! windows, per-remote holds and the port holds of a takeover's reserves, read from the
//! engine under the gateway lock (a snapshot built field by field once left them out, and
//! every fleet node exported zeros).

use std::sync::Arc;

use snatgw_control::{Backend, MemoryStore};

mod common;
use common::Plane;

const TOPOLOGY: &str = r#"
[gateway]
seed = 1
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100"]

[[instance]]
name = "vm"
private_ip = "10.0.3.10"
"#;

#[test]
fn r10_4_metrics_snapshot_has_the_engines_takeover_windows_and_port_holds() {
    let plane = Plane::seed(TOPOLOGY, Arc::new(MemoryStore::new()));
    let vm = u32::from(std::net::Ipv4Addr::new(10, 0, 3, 10));
    let before = plane.backend().metrics().takeover;
    assert_eq!((before.windows_open, before.ports_held), (0, 0));
    {
        let mut g = plane.gateway.lock().expect("lock");
        let e = g.engine_mut();
        let now = e.now();
        assert!(e.hold_after_takeover(vm, now, 240));
        let (public, ports) = e.pat_ports(vm).expect("vm is PAT");
        // Ten ports of the block, and two that are not in it (ignored).
        let mut some: Vec<u16> = ports[..10].to_vec();
        some.extend([80, 443]);
        assert_eq!(e.hold_ports(vm, public, &some, now, 240), 10);
    }
    let after = plane.backend().metrics().takeover;
    assert_eq!(after.windows_open, 1);
    assert_eq!(after.ports_held, 10);
}
