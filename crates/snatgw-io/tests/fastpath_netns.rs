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
            pin_dir: None,
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

/// Issue #16: runs of entries go to the kernel as one `BPF_MAP_UPDATE_BATCH` /
/// `BPF_MAP_DELETE_BATCH` each, in slice order, and what the kernel refuses is reported entry
/// by entry: a missing key does not stop a removal run, a full map refuses exactly the entries
/// past its size, a key removed and then installed again (a released public port's inbound key,
/// given to a new flow, R2.2) ends with the new value, and a reader on its own descriptor sees
/// the same map.
#[test]
fn batches_apply_in_order_and_report_each_refused_entry() {
    require_root!();
    in_private_netns(|| exercise_runs(true));
}

/// The same with batches off: the per-entry fallback of kernels without batch operations on
/// hash maps gives the same results.
#[test]
fn the_per_entry_fallback_gives_the_same_results() {
    require_root!();
    in_private_netns(|| exercise_runs(false));
}

fn exercise_runs(batches: bool) {
    ip(&[
        "link", "add", "fp-a", "type", "veth", "peer", "name", "fp-b",
    ]);
    ip(&["link", "set", "fp-a", "up"]);
    ip(&["link", "set", "fp-b", "up"]);
    let cfg = FastPathConfig {
        private_if: "fp-a".into(),
        public_if: "fp-b".into(),
        max_flows: 8, // 16 entries
        counter_slots: 4,
        floor: false,
        pin_dir: None,
    };
    let (_fp, mut map, _counters) = TcFastPath::load(&cfg).expect("load and attach");
    map.set_batches(batches);
    let reader = map.reader().expect("a second descriptor");
    let key = |i: u16| BpfFlowKey {
        src: u32::from_ne_bytes([198, 51, 100, 7]),
        dst: u32::from_ne_bytes([192, 0, 2, 100]),
        sport: 53u16.to_be(),
        dport: (1024 + i).to_be(),
        proto: 17,
        dir: DIR_IN,
        pad: 0,
    };
    let val = |sport: u16| BpfFlowVal {
        addr: u32::from_ne_bytes([10, 0, 3, 20]),
        port: sport.to_be(),
        ifindex: 1,
        counter: 3,
        ..Default::default()
    };
    // Ten entries in one call.
    let keys: Vec<_> = (0..10).map(key).collect();
    let vals: Vec<_> = (0..10).map(|i| val(5000 + i)).collect();
    let mut failed = Vec::new();
    let calls = map.batch_syscalls();
    map.insert_batch(&keys, &vals, &mut failed);
    assert!(failed.is_empty(), "{failed:?}");
    if batches {
        assert!(
            map.batches(),
            "this kernel (≥ 5.6) takes batches on hash maps"
        );
        assert_eq!(
            map.batch_syscalls() - calls,
            1,
            "one system call for the run"
        );
    } else {
        assert_eq!(map.batch_syscalls() - calls, 10, "one per entry");
    }
    assert_eq!(map.len(), 10);
    assert_eq!(reader.get(&key(3)), Some(val(5003)));

    // Remove 0..5 with a key that is not there in the middle: all present ones go.
    let calls = map.batch_syscalls();
    let gone = [key(0), key(1), key(99), key(2), key(3), key(4)];
    assert_eq!(map.remove_batch(&gone), 0, "a missing key is not an error");
    assert_eq!(map.len(), 5);
    assert!(gone.iter().all(|k| map.get(k).is_none()));
    assert_eq!(
        map.batch_syscalls() - calls,
        if batches { 2 } else { 6 },
        "the run resumes after the missing key"
    );

    // R2.2's order: the old owner's entry removed, then the same key installed for the
    // new owner, as two consecutive runs: the new value is what stays.
    assert_eq!(map.remove_batch(&[key(5)]), 0);
    map.insert_batch(&[key(5)], &[val(9999)], &mut failed);
    assert!(failed.is_empty());
    assert_eq!(map.get(&key(5)), Some(val(9999)));
    assert_eq!(reader.get(&key(5)), Some(val(9999)));

    // 5 entries in, room for 11 more: a run of 14 new ones has its last 3 refused, and
    // replacing existing keys still works when the map is full.
    let more: Vec<_> = (100..114).map(key).collect();
    let more_vals: Vec<_> = (0..14).map(|i| val(6000 + i)).collect();
    map.insert_batch(&more, &more_vals, &mut failed);
    assert_eq!(failed, vec![11, 12, 13]);
    assert_eq!(map.len(), 16);
    assert_eq!(map.get(&key(110)), Some(val(6010)));
    assert_eq!(map.get(&key(111)), None);
    failed.clear();
    map.insert_batch(&[key(5), key(100)], &[val(1), val(2)], &mut failed);
    assert!(failed.is_empty(), "replacing in a full map: {failed:?}");
    assert_eq!(map.get(&key(100)), Some(val(2)));

    // Resynchronisation empties the map.
    assert_eq!(map.clear(), 0);
    assert!(map.is_empty());
    assert_eq!(reader.get(&key(5)), None);
    assert_eq!(map.batches(), batches);
}
