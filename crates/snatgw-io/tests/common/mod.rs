//! Helpers shared by the root-only tests: a private network namespace per test thread.

#![allow(dead_code)]

use std::process::Command;

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Runs `f` on a thread in a new, private network namespace.
pub fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        // Belt and braces: a fresh namespace has nothing but a loopback device.
        let links = ip(&["-o", "link", "show"]);
        assert_eq!(
            links.lines().count(),
            1,
            "not in a fresh namespace, refusing to continue: {links}"
        );
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Runs `ip ARGS` (in the calling thread's namespace) and returns stdout; panics on failure.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// In the calling thread's namespace: the veth pair `fp-a` / `fp-b`, both up, the fast
/// path tests' private and public interfaces.
pub fn veth_pair() {
    ip(&[
        "link", "add", "fp-a", "type", "veth", "peer", "name", "fp-b",
    ]);
    ip(&["link", "set", "fp-a", "up"]);
    ip(&["link", "set", "fp-b", "up"]);
}

/// The fast path the tests load on [`veth_pair`]: 8 flows (16 map entries), 4 counter slots,
/// translating, no pins, the default EVENTS ring.
pub fn fp_config() -> snatgw_io::fastpath::FastPathConfig {
    snatgw_io::fastpath::FastPathConfig {
        private_if: "fp-a".into(),
        public_if: "fp-b".into(),
        max_flows: 8,
        counter_slots: 4,
        floor: false,
        pin_dir: None,
        event_ring_bytes: 0,
        link_if: None,
    }
}

/// Returns from the test when not root, unless SNATGW_REQUIRE_ROOT=1 (then it fails).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::is_root() {
            // CI sets SNATGW_REQUIRE_ROOT=1: a root-only test must fail there, never skip.
            assert!(
                std::env::var("SNATGW_REQUIRE_ROOT").map_or(true, |v| v != "1"),
                "this test needs root and SNATGW_REQUIRE_ROOT=1 is set: refusing to skip it"
            );
            eprintln!("skipped: needs root (set SNATGW_REQUIRE_ROOT=1 to make this a failure)");
            return;
        }
    };
}
