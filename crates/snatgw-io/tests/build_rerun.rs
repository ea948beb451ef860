//! The build picks clang up once it is installed (issue #21): a build made on a machine
//! without clang has no fast path; after clang appears on PATH, the next `cargo build` must
//! run the build script again and compile the BPF object, without any source change.
//!
//! The test builds this crate twice in its own target directory with a PATH that holds
//! everything `/usr/bin` has except clang, then adds clang to that PATH. It needs clang
//! (CI installs it): without it the test skips, and fails when `SNATGW_REQUIRE_ROOT=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The newest `snat_tc.o` the build script wrote under `target`.
fn bpf_object(target: &Path) -> Option<(PathBuf, u64)> {
    let build = target.join("debug").join("build");
    let mut best: Option<(std::time::SystemTime, PathBuf, u64)> = None;
    for e in std::fs::read_dir(build).ok()?.flatten() {
        if !e.file_name().to_string_lossy().starts_with("snatgw-io-") {
            continue;
        }
        let o = e.path().join("out").join("snat_tc.o");
        if let Ok(m) = std::fs::metadata(&o) {
            let t = m.modified().ok()?;
            if best.as_ref().is_none_or(|(bt, _, _)| t > *bt) {
                best = Some((t, o, m.len()));
            }
        }
    }
    best.map(|(_, p, n)| (p, n))
}

fn build(target: &Path, path_var: &str) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let out = Command::new(cargo)
        .args(["build", "--offline", "--locked", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", target)
        .env("PATH", path_var)
        .env_remove("SNATGW_CLANG")
        .env_remove("HOST_CC")
        .output()
        .expect("cargo build ran");
    assert!(
        out.status.success(),
        "cargo build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn i21_build_compiles_the_fast_path_once_clang_appears() {
    let clang = Path::new("/usr/bin/clang");
    if !clang.exists() {
        assert!(
            std::env::var("SNATGW_REQUIRE_ROOT").as_deref() != Ok("1"),
            "clang is not installed (scripts/test-all.sh installs it)"
        );
        eprintln!("skipped: no /usr/bin/clang");
        return;
    }
    // A PATH like the machine's without clang: /usr/bin's entries but clang*, and cargo's.
    let tools = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir("/usr/bin").expect("/usr/bin").flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with("clang") {
            continue;
        }
        let _ = std::os::unix::fs::symlink(e.path(), tools.path().join(&name));
    }
    let cargo_bin = std::env::var("CARGO")
        .ok()
        .and_then(|c| Path::new(&c).parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/usr/local/cargo/bin"));
    let rustup_bin = std::env::var("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin"))
        .unwrap_or_default();
    let path_var = format!(
        "{}:{}:{}",
        tools.path().display(),
        cargo_bin.display(),
        rustup_bin.display()
    );
    // Its own target directory, kept between runs so only the first run compiles the
    // dependencies; the build script runs again anyway because the PATH directory is new.
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/build-rerun-test");

    build(&target, &path_var);
    let (obj, len) = bpf_object(&target).expect("the build script wrote its object");
    assert_eq!(len, 0, "{} was built without clang on PATH", obj.display());

    // Install clang (into this PATH), change nothing else, build again.
    std::os::unix::fs::symlink(clang, tools.path().join("clang")).expect("symlink clang");
    build(&target, &path_var);
    let (obj, len) = bpf_object(&target).expect("object");
    assert!(
        len > 0,
        "{} is still empty: the build did not notice clang",
        obj.display()
    );
}
