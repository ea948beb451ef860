//! Builds the tc fast path and checks its ABI and licence.
//!
//! 1. Compiles the tc fast path (bpf/snat_tc.c) with clang `-target bpf` (issue #9: built from
//!    source by every build, no prebuilt object). Without clang the crate still builds, with an
//!    empty object: `snatgw run --fast-path tc` then refuses with a clear message and `auto`
//!    falls back to the TUN path (docs/RUNNING.md). `SNATGW_CLANG` names another clang.
//! 2. Checks the Rust mirror of bpf/snat_abi.h (issue #16): compiles bpf/abi_check.c for the
//!    host (clang, else `cc`), runs it, and writes `OUT_DIR/snat_abi_check.rs`: one
//!    compile-time assertion per struct size and alignment, field type (an array's element
//!    type and length), offset and size, constant, and STATS name, which src/fastpath.rs
//!    includes, so a disagreeing mirror fails the build. When the BPF object was built the
//!    check is mandatory (a failure here panics); with no C compiler at all (and so no fast
//!    path) a stub says the ABI went unchecked.
//! 3. Checks that the SPDX lines of snat_tc.c and snat_abi.h and the program's LICENSE string
//!    agree, and that the string is one the kernel takes as GPL-compatible (snat_tc.c says why).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// SPDX expressions and the kernel `LICENSE` string that says the same thing. Only
/// GPL-compatible strings (include/linux/license.h): the program calls a GPL-only helper.
const LICENCES: &[(&str, &str)] = &[
    ("GPL-2.0-only OR MIT", "Dual MIT/GPL"),
    ("GPL-2.0-only OR BSD-2-Clause", "Dual BSD/GPL"),
    ("GPL-2.0-only", "GPL v2"),
];

fn main() {
    let src = "bpf/snat_tc.c";
    for f in [src, "bpf/snat_abi.h", "bpf/abi_check.c"] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=SNATGW_CLANG");
    println!("cargo:rerun-if-env-changed=HOST_CC");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let clang = std::env::var("SNATGW_CLANG").unwrap_or_else(|_| "clang".into());
    watch_for(&clang);

    check_licence(src, "bpf/snat_abi.h");
    let built = build_bpf(&clang, src, &out_dir);
    check_abi(&clang, built, &out_dir);
}

/// Makes cargo run this script again when `tool` appears or changes (issue #21): a build
/// made before clang was installed would otherwise be kept, without the fast path, until
/// the C file changed. A path is watched as it is (a missing file makes cargo rerun the
/// script on every build, cheap without clang); a bare name is watched where PATH finds it,
/// or, while it is found nowhere, through the PATH directories themselves, whose mtime
/// changes when a file is added to them.
fn watch_for(tool: &str) {
    if tool.contains('/') {
        println!("cargo:rerun-if-changed={tool}");
        return;
    }
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    match dirs.iter().map(|d| d.join(tool)).find(|p| p.is_file()) {
        Some(found) => println!("cargo:rerun-if-changed={}", found.display()),
        None => {
            for d in dirs.iter().filter(|d| d.is_dir()) {
                println!("cargo:rerun-if-changed={}", d.display());
            }
        }
    }
}

/// Compiles the BPF object into `out_dir`; false (and an empty object) without clang.
fn build_bpf(clang: &str, src: &str, out_dir: &Path) -> bool {
    let out = out_dir.join("snat_tc.o");
    // Debian keeps asm/ under the multiarch directory, which `-target bpf` does not search.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let status = Command::new(clang)
        // -mcpu=v3: the BPF atomics (compare-and-swap, fetch-and-or) the stash pop uses (issue
        // #17), and 32-bit ALU/JMP32; the kernel takes v3 programs since 5.12 (atomics), and
        // the fast path needs 6.6 (tcx) to be pinned anyway.
        .args([
            "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
        ])
        .arg(format!("-I{multiarch}"))
        .args(["-c", src, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => true,
        Ok(s) => panic!(
            "{clang} failed on {src} ({s}): see its errors above (libbpf-dev provides bpf/bpf_helpers.h)"
        ),
        Err(e) => {
            println!(
                "cargo:warning=no fast path in this build: cannot run {clang} ({e}); install clang and libbpf-dev"
            );
            std::fs::write(&out, b"").expect("writing the empty object");
            false
        }
    }
}

/// The SPDX expression of `path` (from its `SPDX-License-Identifier:` line).
fn spdx(path: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let line = text
        .lines()
        .find_map(|l| l.split_once("SPDX-License-Identifier:").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("{path} has no SPDX-License-Identifier line"));
    line.trim().trim_end_matches("*/").trim().to_string()
}

/// Panics unless the SPDX lines of `prog` and `header` and `prog`'s LICENSE string agree.
fn check_licence(prog: &str, header: &str) {
    let text = std::fs::read_to_string(prog).unwrap_or_else(|e| panic!("reading {prog}: {e}"));
    let licence = text
        .lines()
        .find(|l| l.contains("SEC(\"license\")") && !l.trim_start().starts_with("//"))
        .and_then(|l| l.split_once('=').map(|(_, r)| r))
        .and_then(|r| r.trim().strip_suffix(';'))
        .map(|r| r.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("{prog} has no `char LICENSE[] SEC(\"license\") = \"...\";`"));
    let (p, h) = (spdx(prog), spdx(header));
    assert_eq!(
        p, h,
        "{prog} and {header} have different SPDX lines; the header is compiled into the program"
    );
    assert!(
        LICENCES.contains(&(p.as_str(), licence.as_str())),
        "{prog}: SPDX `{p}` and LICENSE \"{licence}\" do not agree; agreeing GPL-compatible pairs: {LICENCES:?}"
    );
}

/// The C compilers to try for the host program, in order.
fn host_compilers(clang: &str) -> Vec<String> {
    let mut v = vec![clang.to_string()];
    let cc = std::env::var("HOST_CC").unwrap_or_else(|_| "cc".into());
    if !v.contains(&cc) {
        v.push(cc);
    }
    v
}

/// Compiles and runs bpf/abi_check.c, and writes the Rust assertions (or the stub).
fn check_abi(clang: &str, built: bool, out_dir: &Path) {
    let rs = out_dir.join("snat_abi_check.rs");
    let exe = out_dir.join("abi_check");
    let mut errors = Vec::new();
    let mut compiled = false;
    for cc in host_compilers(clang) {
        let r = Command::new(&cc)
            .args([
                "-std=gnu11",
                "-Wall",
                "-Werror",
                "-Ibpf",
                "bpf/abi_check.c",
                "-o",
            ])
            .arg(&exe)
            .status();
        match r {
            Ok(s) if s.success() => {
                compiled = true;
                break;
            }
            Ok(s) => errors.push(format!("{cc}: {s}")),
            Err(e) => errors.push(format!("{cc}: {e}")),
        }
    }
    if !compiled {
        assert!(
            !built,
            "the fast path was built but its ABI check could not be: bpf/abi_check.c did not compile ({})",
            errors.join("; ")
        );
        println!(
            "cargo:warning=the fast path's ABI (bpf/snat_abi.h) is unchecked in this build: no host C compiler ({})",
            errors.join("; ")
        );
        std::fs::write(
            &rs,
            "// Generated by build.rs: no host C compiler, nothing checked.\n\
             pub(super) const ABI_CHECKED: bool = false;\n\
             pub(super) const ABI_ITEMS: usize = 0;\n",
        )
        .expect("writing the stub");
        return;
    }
    let out = Command::new(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    assert!(
        out.status.success(),
        "{} failed ({})",
        exe.display(),
        out.status
    );
    let layout = String::from_utf8(out.stdout).expect("abi_check prints UTF-8");
    // Alignment is the target's: compare it only when building for the host, whose C
    // compiler produced the numbers (sizes and offsets do not depend on it: no padding).
    let same_target = std::env::var("HOST").ok() == std::env::var("TARGET").ok();
    std::fs::write(&rs, generate(&layout, same_target)).expect("writing snat_abi_check.rs");
}

/// The Rust type of a C field type of the header.
fn rust_type(c: &str) -> &'static str {
    match c {
        "__u8" => "u8",
        "__u16" | "__be16" => "u16",
        "__u32" | "__be32" => "u32",
        "__u64" | "__be64" => "u64",
        "__s8" => "i8",
        "__s16" => "i16",
        "__s32" => "i32",
        "__s64" => "i64",
        other => panic!("bpf/snat_abi.h: field type {other} has no Rust mirror in build.rs"),
    }
}

/// Turns abi_check's lines into assertions, evaluated in `fastpath::abi`, where the header's
/// names resolve to their Rust mirrors.
fn generate(layout: &str, check_align: bool) -> String {
    const WHERE: &str = "bpf/snat_abi.h";
    const MIRROR: &str = "its Rust mirror in src/fastpath.rs differs";
    let mut s = String::from(
        "// Generated by build.rs from bpf/snat_abi.h (through bpf/abi_check.c). Do not edit:\n\
         // a failing assertion here means src/fastpath.rs disagrees with the header.\n\
         pub(super) const ABI_CHECKED: bool = true;\n",
    );
    let mut items = 0usize;
    for line in layout.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        items += 1;
        match w.as_slice() {
            ["const", name, value] => writeln!(
                s,
                "const _: () = assert!({name} as i128 == {value}, \"{WHERE}: {name} is {value}; {MIRROR}\");"
            ),
            ["stat", index, name] => writeln!(
                s,
                "const _: () = assert!(str_eq(STAT_NAMES[{index}], \"{name}\"), \
                 \"{WHERE}: STATS entry {index} is {name}; STAT_NAMES[{index}] in src/fastpath.rs differs\");"
            ),
            ["struct", name, size, align] => {
                let mut r = writeln!(
                    s,
                    "const _: () = assert!(core::mem::size_of::<{name}>() == {size}, \
                     \"{WHERE}: sizeof(struct {name}) is {size}; {MIRROR}\");"
                );
                if check_align {
                    r = r.and(writeln!(
                        s,
                        "const _: () = assert!(core::mem::align_of::<{name}>() == {align}, \
                         \"{WHERE}: alignof(struct {name}) is {align}; {MIRROR}\");"
                    ));
                }
                r
            }
            ["field", st, name, ty, offset, size] => writeln!(
                s,
                "// {st}.{name}: {ty} at {offset}\n\
                 const _: fn(&{st}) -> &{rt} = |s| &s.{name};\n\
                 const _: () = assert!(core::mem::offset_of!({st}, {name}) == {offset}, \
                 \"{WHERE}: offsetof(struct {st}, {name}) is {offset}; {MIRROR}\");\n\
                 const _: () = assert!(core::mem::size_of::<{rt}>() == {size}, \
                 \"{WHERE}: sizeof {st}.{name} is {size}\");",
                rt = rust_type(ty)
            ),
            ["array", st, name, ty, offset, size, count] => writeln!(
                s,
                "// {st}.{name}: {ty}[{count}] at {offset}\n\
                 const _: fn(&{st}) -> &[{rt}; {count}] = |s| &s.{name};\n\
                 const _: () = assert!(core::mem::offset_of!({st}, {name}) == {offset}, \
                 \"{WHERE}: offsetof(struct {st}, {name}) is {offset}; {MIRROR}\");\n\
                 const _: () = assert!(core::mem::size_of::<[{rt}; {count}]>() == {size}, \
                 \"{WHERE}: sizeof {st}.{name} is {size}\");",
                rt = rust_type(ty)
            ),
            _ => panic!("bpf/abi_check.c printed an unknown line: {line:?}"),
        }
        .expect("formatting");
    }
    assert!(items > 0, "bpf/abi_check.c printed nothing");
    writeln!(s, "pub(super) const ABI_ITEMS: usize = {items};").expect("formatting");
    s
}
