//! Which live node owns each instance (R10.1): rendezvous (highest random weight) hashing.
//!
//! Every node scores every key with a fixed hash of (node, key); the highest score owns the
//! key. The result depends only on the set of live nodes and the key, not on the order nodes
//! are listed in or joined in, so every node computes the same owner from the same node list.
//! When a node joins it takes exactly the keys it now scores highest on; when a node leaves
//! only its keys move, each to its runner-up. The hash is FNV-1a 64 finished by SplitMix64's
//! mixer, spelled out here so it never changes with a Rust release (std's hashers may).
//!
//! This module only computes; it does not know whether a node is live (the
//! [`crate::Coordinator`] says) and it grants nothing (grants are fenced in the store, R10.2).

use crate::coordinator::NodeId;

fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The weight of `node` for `key`: a stable 64-bit hash of both.
pub fn score(node: &NodeId, key: &str) -> u64 {
    let h = fnv1a(0xcbf2_9ce4_8422_2325, node.as_str().as_bytes());
    // A separator no node id contains, so ("a","bc") and ("ab","c") differ.
    let h = fnv1a(h, &[0xff]);
    mix(fnv1a(h, key.as_bytes()))
}

/// The owner of `key` among `nodes` (None when there are none). Ties, which need a 64-bit
/// collision, go to the smaller node id, so the answer never depends on the order given.
pub fn owner<'a>(key: &str, nodes: &'a [NodeId]) -> Option<&'a NodeId> {
    nodes
        .iter()
        .max_by(|a, b| score(a, key).cmp(&score(b, key)).then_with(|| b.cmp(a)))
}

/// The nodes in the order they would own `key` (owner first, then who takes over if it goes):
/// the node that should receive `key`'s replicated flow state is the second (R10.4).
pub fn ranking(key: &str, nodes: &[NodeId]) -> Vec<NodeId> {
    let mut v = nodes.to_vec();
    v.sort_by(|a, b| score(b, key).cmp(&score(a, key)).then_with(|| a.cmp(b)));
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn ids(n: &BTreeSet<u8>) -> Vec<NodeId> {
        n.iter()
            .map(|i| NodeId::new(format!("node-{i}")).expect("id"))
            .collect()
    }

    #[test]
    fn r10_1_owner_is_stable_across_releases() {
        // Pinned values: a change of the hash would move every instance of a running fleet
        // at an upgrade, so it must be a deliberate one.
        let a = NodeId::new("a").expect("id");
        assert_eq!(score(&a, "vm1"), score(&a, "vm1"));
        assert_ne!(
            score(&a, "vm1"),
            score(&NodeId::new("b").expect("id"), "vm1")
        );
        assert_eq!(
            score(&a, "vm1"),
            0xbd85_4e1b_c346_0bd1,
            "{:#x}",
            score(&a, "vm1")
        );
    }

    #[test]
    fn r10_1_no_nodes_no_owner_and_spread_is_fair() {
        assert_eq!(owner("vm1", &[]), None);
        let nodes: Vec<NodeId> = (0..3)
            .map(|i| NodeId::new(format!("n{i}")).expect("id"))
            .collect();
        let mut count = [0u32; 3];
        for k in 0..3000 {
            let o = owner(&format!("vm{k}"), &nodes).expect("owner");
            count[nodes.iter().position(|n| n == o).expect("pos")] += 1;
        }
        for c in count {
            assert!((850..1150).contains(&c), "{count:?}");
        }
    }

    proptest! {
        #[test]
        fn r10_1_owner_is_order_independent(
            nodes in proptest::collection::btree_set(any::<u8>(), 1..8),
            seed in any::<u64>(),
            key in "[a-z0-9]{1,12}",
        ) {
            let v = ids(&nodes);
            let mut shuffled = v.clone();
            let len = shuffled.len();
            shuffled.rotate_left((seed as usize) % len);
            shuffled.reverse();
            prop_assert_eq!(owner(&key, &v), owner(&key, &shuffled));
            prop_assert_eq!(ranking(&key, &v)[0].clone(), owner(&key, &v).expect("owner").clone());
        }

        #[test]
        fn r10_1_join_and_leave_move_only_what_they_must(
            nodes in proptest::collection::btree_set(any::<u8>(), 1..8),
            newcomer in any::<u8>(),
            keys in proptest::collection::vec("[a-z0-9]{1,10}", 1..60),
        ) {
            prop_assume!(!nodes.contains(&newcomer));
            let before = ids(&nodes);
            let mut grown = nodes.clone();
            grown.insert(newcomer);
            let after = ids(&grown);
            let new_id = NodeId::new(format!("node-{newcomer}")).expect("id");
            for k in &keys {
                let o1 = owner(k, &before).expect("owner");
                let o2 = owner(k, &after).expect("owner");
                // Join: a key moves only to the newcomer.
                prop_assert!(o1 == o2 || *o2 == new_id, "{k}: {o1} -> {o2}");
                // Leave (the reverse): only the leaver's keys move.
                if *o2 != new_id {
                    prop_assert_eq!(o1, o2);
                }
            }
            // Leave of an existing node: keys of the others stay put.
            let gone = before[0].clone();
            let rest: Vec<NodeId> = before[1..].to_vec();
            for k in &keys {
                let o1 = owner(k, &before).expect("owner");
                if *o1 != gone {
                    prop_assert_eq!(Some(o1), owner(k, &rest));
                } else if !rest.is_empty() {
                    // It goes to its runner-up.
                    prop_assert_eq!(owner(k, &rest), Some(&ranking(k, &before)[1]));
                }
            }
        }
    }
}
