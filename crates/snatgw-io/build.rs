//! Compiles the tc fast path (bpf/snat_tc.c) with clang `-target bpf` (issue #9: built from
//! source by every build, no prebuilt object). Without clang the crate still builds, with an
//! empty object: `snatgw run --fast-path tc` then refuses with a clear message and `auto`
//! falls back to the TUN path (docs/RUNNING.md). `SNATGW_CLANG` names another clang.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/snat_tc.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=SNATGW_CLANG");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("snat_tc.o");
    let clang = std::env::var("SNATGW_CLANG").unwrap_or_else(|_| "clang".into());
    // Debian keeps asm/ under the multiarch directory, which `-target bpf` does not search.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .args(["-c", src, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed on {src} ({s}); install clang and libbpf-dev"),
        Err(e) => {
            println!(
                "cargo:warning=no fast path in this build: cannot run {clang} ({e}); install clang and libbpf-dev"
            );
            std::fs::write(&out, b"").expect("writing the empty object");
        }
    }
}
