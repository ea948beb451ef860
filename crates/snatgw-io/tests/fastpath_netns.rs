//! The fast path's loader, in a private network namespace (root only; fails instead of
//! skipping under SNATGW_REQUIRE_ROOT=1): the verifier accepts both programs, they attach to
//! tc ingress of two interfaces, and the maps take and give back entries. Real packets through
//! the fast path are the lab tests' (crates/snatgw/tests/lab_fastpath.rs).

mod common;

use common::{in_private_netns, ip};
use snatgw_io::fastpath::{
    BpfFlowKey, BpfFlowVal, FastPathConfig, TcFastPath, DIR_IN, DIR_OUT, STAT_NAMES,
};

#[test]
fn loads_attaches_and_holds_entries() {
    require_root!();
    in_private_netns(|| {
        ip(&[
            "link", "add", "fp-a", "type", "veth", "peer", "name", "fp-b",
        ]);
        ip(&["link", "set", "fp-a", "up"]);
        ip(&["link", "set", "fp-b", "up"]);
        let cfg = FastPathConfig {
            private_if: "fp-a".into(),
            public_if: "fp-b".into(),
            max_flows: 8,
            counter_slots: 4,
            floor: false,
        };
        let (fp, mut map, counters) = TcFastPath::load(&cfg).expect("load and attach");
        assert_ne!(fp.private_ifindex, fp.public_ifindex);
        let k = BpfFlowKey {
            src: u32::from_ne_bytes([10, 0, 3, 20]),
            dst: u32::from_ne_bytes([198, 51, 100, 7]),
            sport: 5000u16.to_be(),
            dport: 53u16.to_be(),
            proto: 17,
            dir: DIR_OUT,
            pad: 0,
        };
        let v = BpfFlowVal {
            addr: u32::from_ne_bytes([192, 0, 2, 100]),
            port: 1024u16.to_be(),
            ifindex: fp.public_ifindex,
            counter: 2,
            ..Default::default()
        };
        map.insert(&k, &v).expect("insert");
        assert_eq!(map.get(&k), Some(v));
        let mut k2 = k;
        k2.dir = DIR_IN;
        assert_eq!(map.get(&k2), None, "the direction is part of the key");
        // 8 flows = 16 entries: the 17th is refused (the loader sized the map).
        for i in 1..16u16 {
            let mut ki = k;
            ki.sport = (5000 + i).to_be();
            map.insert(&ki, &v).expect("room for 16 entries");
        }
        let mut full = k;
        full.sport = 6000u16.to_be();
        assert!(map.insert(&full, &v).is_err(), "map holds 2 x max_flows");
        assert_eq!(map.len(), 16);
        map.remove(&k).expect("remove");
        map.remove(&k).expect("removing a missing entry is fine");
        assert_eq!(map.get(&k), None);
        assert_eq!(counters.instance_counters(4), vec![0; 16]);
        assert_eq!(
            counters.instance_counters(100).len(),
            16,
            "capped at the slots"
        );
        assert_eq!(counters.stats().len(), STAT_NAMES.len());
        drop(fp);
    });
}
