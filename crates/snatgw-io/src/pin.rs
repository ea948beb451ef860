//! Pins of the fast path on a bpffs: the maps and the tcx links of `snat_out`/`snat_in`, so
//! the programs stay attached and keep translating installed flows while no gateway process
//! runs (a crash, an upgrade: SPEC R11.1, issue #18).
//!
//! Layout: `<pin dir>/<ABI_TAG>/` holds one pin per map (`FLOWS`, `COUNTERS`, `STATS`,
//! `CONFIG`, `EVENTS`, `STASH_KEYS`, `STASH`) and one per link (`link_snat_out_<pid>_<time>`, `link_snat_in_...`; bpffs refuses dots in names). The ABI tag names the
//! layout of `bpf/snat_abi.h`: a build with another layout never takes over maps it cannot
//! read (it starts fresh in its own directory and removes the old links once its own are
//! pinned). A load that finds pins takes the maps over (aya reuses a pinned map by path), pins
//! its new links beside the old ones, then unpins the old ones, which detaches them: both
//! programs share the maps and decide alike, so no packet meets neither.
//!
//! It does not decide when to pin or unpin: `snatgw run` does (`--bpf-pin-dir`,
//! `--detach-on-exit`).

use std::fs;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData};
use aya::programs::links::{FdLink, PinnedLink};

use crate::fastpath::{BpfFlowKey, BpfFlowVal, FastPathError};

/// The maps that are pinned.
/// The stashes (`STASH_KEYS`, `STASH`, issue #17) are pinned so a restarted gateway finds
/// them; the program keeps opening flows from what they hold while none runs (their records
/// wait in `EVENTS`), and the runtime clears them at start (`FastPathStash::clear`).
pub(crate) const MAPS: [&str; 7] = [
    "FLOWS",
    "COUNTERS",
    "STATS",
    "CONFIG",
    "EVENTS",
    "STASH_KEYS",
    "STASH",
];

/// The layout version of `bpf/snat_abi.h` the pins are made with. Bump it with every change of
/// the header (a unit test holds the header's checksum to this tag).
pub const ABI_TAG: &str = "abi-4";

/// Older ABI tags whose flow map has this build's layout (`struct flow_key` and `flow_val`
/// unchanged: `abi-3` only added the fleet steering maps, CONFIG slots and STATS entries,
/// `abi-4` the stashes, STATS entries and `tcp_event.kind`), newest first. A
/// restart after an upgrade from such a build cannot take its maps over, but reads what its
/// flow map kept translating ([`read_pinned_flows`]), so no flow the kernel carried looks
/// idle to the new engine (R11.1).
pub const FLOWS_COMPATIBLE_TAGS: [&str; 2] = ["abi-3", "abi-2"];

/// `BPF_FS_MAGIC` (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `dir` is on a bpffs.
pub fn is_bpffs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    #[allow(unsafe_code)]
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statfs, both outliving
    // the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn pin_err(dir: &Path, why: impl std::fmt::Display) -> FastPathError {
    FastPathError::Pin {
        dir: dir.to_path_buf(),
        why: why.to_string(),
    }
}

/// The pin directory of this build's ABI under a root on a bpffs.
pub(crate) struct PinDir {
    dir: PathBuf,
}

impl PinDir {
    /// Creates `<root>/<ABI_TAG>` if needed; refuses a root that is not on a bpffs.
    pub(crate) fn open(root: &Path) -> Result<PinDir, FastPathError> {
        fs::create_dir_all(root).map_err(|e| pin_err(root, e))?;
        if !is_bpffs(root) {
            return Err(pin_err(
                root,
                "not on a bpf filesystem (mount one: `mount -t bpf bpf /sys/fs/bpf`)",
            ));
        }
        let dir = root.join(ABI_TAG);
        fs::create_dir_all(&dir).map_err(|e| pin_err(&dir, e))?;
        Ok(PinDir { dir })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the map pins (and the directories) of other ABIs under the root, once this
    /// load's links replaced theirs: an upgrade's old maps would otherwise stay in kernel
    /// memory for good. Their flows were read before the load ([`read_pinned_flows`]).
    pub(crate) fn remove_other_abis(&self) {
        let Some(root) = self.dir.parent() else {
            return;
        };
        for d in fs::read_dir(root).into_iter().flatten().flatten() {
            let sub = d.path();
            let name = d.file_name().to_string_lossy().to_string();
            if !sub.is_dir() || name == ABI_TAG || !name.starts_with("abi-") {
                continue;
            }
            for e in fs::read_dir(&sub).into_iter().flatten().flatten() {
                let f = e.file_name().to_string_lossy().to_string();
                if !f.starts_with("link_") {
                    let _ = fs::remove_file(e.path());
                }
            }
            let _ = fs::remove_dir(&sub);
        }
    }

    /// Whether an earlier load left its maps here.
    pub(crate) fn has_maps(&self) -> bool {
        self.map_path("FLOWS").exists()
    }

    pub(crate) fn map_path(&self, m: &str) -> PathBuf {
        self.dir.join(m)
    }

    /// Pins `link` (program `prog`'s new tcx link), then unpins every older link of `prog`
    /// here and in sibling ABI directories, which detaches them.
    pub(crate) fn replace_link(
        &self,
        prog: &str,
        link: FdLink,
    ) -> Result<PinnedLink, FastPathError> {
        let stamp = crate::fastpath::monotonic_ns();
        let name = format!("link_{prog}_{}_{stamp}", std::process::id());
        let pinned = link
            .pin(self.dir.join(&name))
            .map_err(|e| pin_err(&self.dir, format!("pinning the link of {prog}: {e}")))?;
        let prefix = format!("link_{prog}_");
        let root = self.dir.parent().unwrap_or(&self.dir);
        for d in fs::read_dir(root).into_iter().flatten().flatten() {
            let sub = d.path();
            for e in fs::read_dir(&sub).into_iter().flatten().flatten() {
                let f = e.file_name().to_string_lossy().to_string();
                if f.starts_with(&prefix) && f != name {
                    if let Ok(old) = PinnedLink::from_pin(e.path()) {
                        // Unpinned, then dropped: the old link detaches.
                        let _ = old.unpin();
                    }
                }
            }
        }
        Ok(pinned)
    }
}

/// Removes every pin under `root` (links first, which detaches the programs, then maps), and
/// the directories. Nothing there is not an error.
pub fn remove_all(root: &Path) -> Result<(), FastPathError> {
    if !root.exists() {
        return Ok(());
    }
    for d in fs::read_dir(root).map_err(|e| pin_err(root, e))?.flatten() {
        let sub = d.path();
        if !sub.is_dir() {
            continue;
        }
        for e in fs::read_dir(&sub).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("link_") {
                if let Ok(l) = PinnedLink::from_pin(e.path()) {
                    let _ = l.unpin();
                }
            }
        }
        for e in fs::read_dir(&sub).into_iter().flatten().flatten() {
            let _ = fs::remove_file(e.path());
        }
        let _ = fs::remove_dir(&sub);
    }
    Ok(())
}

/// The entries of the flow map pinned under `root` by a build of this ABI, or else of one
/// with the same flow map layout ([`FLOWS_COMPATIBLE_TAGS`], an upgrade), if there is one:
/// what the kernel kept translating while no gateway ran (a restart merges their last-seen
/// times and the flows opened after its last snapshot, R11.1). A map whose key or value size
/// differs is refused, never misread.
pub fn read_pinned_flows(
    root: &Path,
) -> Result<Option<Vec<(BpfFlowKey, BpfFlowVal)>>, FastPathError> {
    let Some(path) = std::iter::once(ABI_TAG)
        .chain(FLOWS_COMPATIBLE_TAGS)
        .map(|t| root.join(t).join("FLOWS"))
        .find(|p| p.exists())
    else {
        return Ok(None);
    };
    let data =
        MapData::from_pin(&path).map_err(|e| pin_err(root, format!("opening FLOWS: {e}")))?;
    let map: HashMap<MapData, BpfFlowKey, BpfFlowVal> =
        HashMap::try_from(Map::HashMap(data)).map_err(|e| pin_err(root, format!("FLOWS: {e}")))?;
    Ok(Some(map.iter().filter_map(Result::ok).collect()))
}

#[cfg(test)]
mod tests {
    /// FNV-1a of the ABI header. When this fails, the header changed: bump [`super::ABI_TAG`]
    /// (pins of the old layout must not be taken over) and record the new value here.
    #[test]
    fn abi_tag_follows_the_header() {
        let h = include_bytes!("../bpf/snat_abi.h");
        let mut x: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in h {
            x = (x ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        assert_eq!(
            (super::ABI_TAG, x),
            ("abi-4", ABI_HEADER_FNV),
            "bpf/snat_abi.h changed: bump ABI_TAG and record its checksum"
        );
    }

    const ABI_HEADER_FNV: u64 = 3_125_605_300_341_359_902;
}
