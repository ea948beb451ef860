//! Pinned fast path (SPEC R11.1, issue #18), in a private network namespace with a bpffs
//! mounted in a temporary directory for the test (root only; fails instead of skipping under
//! SNATGW_REQUIRE_ROOT=1): a load with a pin directory leaves maps and links pinned when the
//! loader is gone, a second load takes the maps over (the entries are still there) and
//! replaces the links (the old pins are gone, one link per program remains), and `detach`
//! removes everything so a third load starts empty. Real packets carried while no gateway runs
//! are the lab's (crates/snatgw/tests/lab_restart.rs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fp_config, in_private_netns, veth_pair};
use snatgw_io::fastpath::{BpfFlowKey, BpfFlowVal, FastPathConfig, TcFastPath, DIR_OUT};
use snatgw_io::pin::{is_bpffs, read_pinned_flows, ABI_TAG};

/// A bpffs mounted on a temporary directory, unmounted (and the pins with it) on drop.
struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    fn mount() -> Bpffs {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mounting a bpffs");
        Bpffs { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("snatgw")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = snatgw_io::pin::remove_all(&self.root());
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The flow-map entry the tests pin: UDP 10.0.3.20:5000 to 198.51.100.7:53, outbound, as
/// 192.0.2.100:1024.
fn udp_flow() -> (BpfFlowKey, BpfFlowVal) {
    (
        BpfFlowKey {
            src: u32::from_ne_bytes([10, 0, 3, 20]),
            dst: u32::from_ne_bytes([198, 51, 100, 7]),
            sport: 5000u16.to_be(),
            dport: 53u16.to_be(),
            proto: 17,
            dir: DIR_OUT,
            pad: 0,
        },
        BpfFlowVal {
            addr: u32::from_ne_bytes([192, 0, 2, 100]),
            port: 1024u16.to_be(),
            ifindex: 2,
            counter: 2,
            ..Default::default()
        },
    )
}

fn links(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join(ABI_TAG))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with("link_"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn r11_1_pinned_maps_and_links_outlive_the_loader_and_are_taken_over() {
    require_root!();
    let fs = Bpffs::mount();
    assert!(is_bpffs(fs.dir.path()));
    let root = fs.root();
    in_private_netns(move || {
        veth_pair();
        let cfg = FastPathConfig {
            pin_dir: Some(root.clone()),
            ..fp_config()
        };
        let (k, v) = udp_flow();
        // First load: fresh maps, two link pins.
        let (fp, mut map, _c) = TcFastPath::load(&cfg).expect("load with pins");
        assert!(!fp.reused);
        map.insert(&k, &v).expect("insert");
        let first = links(&root);
        assert_eq!(first.len(), 2, "{first:?}");
        // The loader goes away (as a process would): the pins keep maps and links.
        drop((fp, map));
        assert_eq!(links(&root), first);
        let seen = read_pinned_flows(&root).expect("read").expect("pinned map");
        assert_eq!(seen, vec![(k, v)], "the kernel's map outlived the loader");
        // Second load: the maps are taken over, the links replaced.
        let (fp, map, _c) = TcFastPath::load(&cfg).expect("load again");
        assert!(fp.reused);
        assert_eq!(map.get(&k), Some(v), "the entry survived the handover");
        let second = links(&root);
        assert_eq!(second.len(), 2, "{second:?}");
        assert!(
            second.iter().all(|l| !first.contains(l)),
            "old links still pinned"
        );
        // Detach: nothing pinned is left, a third load starts empty.
        fp.detach().expect("detach");
        drop(map);
        assert!(read_pinned_flows(&root).expect("read").is_none());
        let (fp, map, _c) = TcFastPath::load(&cfg).expect("load after detach");
        assert!(!fp.reused);
        assert!(map.get(&k).is_none());
        fp.detach().expect("detach");
    });
}

#[test]
fn a_pin_dir_off_bpffs_is_refused_with_its_path() {
    require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("pins");
    let r = in_private_netns(move || {
        veth_pair();
        let cfg = FastPathConfig {
            pin_dir: Some(root),
            ..fp_config()
        };
        TcFastPath::load(&cfg).err().map(|e| e.to_string())
    });
    let e = r.expect("refused");
    assert!(e.contains("pins") && e.contains("bpf filesystem"), "{e}");
}

/// R11.1 across an upgrade that changes the ABI tag but not the flow map (abi-2 to abi-3): the
/// restart reads the older build's pinned flow map (its last-seen times and the flows opened
/// after the last snapshot) though it cannot take the maps over; the new load starts fresh maps
/// under its own tag, detaches the old links, and removes the old maps' pins, so they do not
/// stay in kernel memory.
#[test]
fn r11_1_an_upgrade_reads_the_older_abis_flow_map_then_removes_its_pins() {
    use snatgw_io::pin::FLOWS_COMPATIBLE_TAGS;
    require_root!();
    let fs = Bpffs::mount();
    let root = fs.root();
    in_private_netns(move || {
        veth_pair();
        let cfg = FastPathConfig {
            pin_dir: Some(root.clone()),
            ..fp_config()
        };
        let (k, mut v) = udp_flow();
        v.last_seen = 77;
        let (fp, mut map, _c) = TcFastPath::load(&cfg).expect("load with pins");
        map.insert(&k, &v).expect("insert");
        drop((fp, map));
        // What an older build with the same flow map leaves: its pins under its own tag.
        let old = root.join(FLOWS_COMPATIBLE_TAGS[0]);
        std::fs::rename(root.join(ABI_TAG), &old).expect("rename the pin directory");
        let old_links = || {
            std::fs::read_dir(&old).map_or(0, |rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
                    .count()
            })
        };
        assert_eq!(old_links(), 2, "the older build's programs stay attached");
        assert_eq!(
            read_pinned_flows(&root)
                .expect("read")
                .expect("the older map"),
            vec![(k, v)],
            "the restart reads what the older build's kernel map holds"
        );
        let (fp, map, _c) = TcFastPath::load(&cfg).expect("load the new build");
        assert!(!fp.reused, "another ABI's maps are never taken over");
        assert!(map.get(&k).is_none());
        assert_eq!(old_links(), 0, "the older build's links are gone");
        assert!(!old.exists(), "the older ABI's pins are removed");
        let now = links(&root);
        assert_eq!(now.len(), 2, "only the new build's links: {now:?}");
        fp.detach().expect("detach");
    });
}
