//! The kernel fast path (issue #9): loads `bpf/snat_tc.c` (compiled by `build.rs` with clang
//! `-target bpf`), attaches it at tc ingress (tcx on kernels ≥ 6.6, else a clsact qdisc) of
//! the gateway's private and public interfaces, and gives typed access to its maps.
//!
//! What it does: [`TcFastPath::load`] loads and attaches the two programs (`snat_out` on the
//! private side, `snat_in` on the public side: direction by interface, SPEC R9.1) and hands
//! out the flow map ([`FlowMap`], written by whoever the engine tells of flows) and the
//! counters ([`FastPathCounters`]: per-instance packet counts for R6.1, and why packets were
//! passed up). The programs stay attached while the [`TcFastPath`] lives; dropping it, or the
//! process ending, detaches them (tcx links are owned by file descriptors), so a dead gateway
//! never leaves translations behind.
//!
//! What it does not do: decide anything. Which flows exist, their ports and their ends are
//! the engine's: its journal says which flows to install and remove (`snatgw-runtime` applies it
//! with [`FlowMap::insert_batch`] and [`FlowMap::remove_batch`]), and its `ActivitySource` reads
//! last-seen times through a [`FlowMapReader`].
//!
//! FIN and RST of installed flows are translated in the kernel too (issue #17; a SYN without
//! ACK still goes up, R3.1): each leaves a record in the program's EVENTS ring buffer, which
//! [`TcFastPath::take_events`] hands out as [`FastPathEvents`] ([`BpfTcpEvent`]: the flow's
//! outbound 5-tuple and public side, flags, direction, kernel time), for the engine to apply
//! at the kernel's time. A FIN/RST that finds the ring full is passed up untranslated
//! (`event_full`), so the engine sees it itself: none is ever lost.
//!
//! New outbound TCP flows can be opened by the kernel too (issue #17): the engine decides
//! public ports ahead per (instance, destination) and hands them to the program through
//! [`FastPathStash`] ([`TcFastPath::take_stash`]); a SYN that finds ports there is translated
//! at once, its two flow-map entries installed by the program, and the flow reported in the
//! same ring ([`EV_OPENED`]; a port popped but not usable comes back as [`EV_RETURNED`]).
//!
//! Keys and values are `#[repr(C)]` copies of the C structs, addresses and ports in network
//! byte order as the program reads them off the wire.
//!
//! # One ABI, checked by the build (issue #16)
//!
//! Everything the program and this loader share (the flow key and value, the directions, the
//! counters per instance slot, the CONFIG slots and modes, the STATS entries and their order)
//! is defined once, in `bpf/snat_abi.h`, which `snat_tc.c` includes. This module keeps a
//! Rust mirror of it, under the header's own names ([`BpfFlowKey`] is `struct flow_key`,
//! [`BpfFlowVal`] is `struct flow_val`, [`STAT_NAMES`] lists the STATS entries), and the build
//! proves the mirror right: `build.rs` compiles `bpf/abi_check.c` for the host, which walks the
//! header's lists (X-macros, so nothing declared there can be skipped) and prints each
//! struct's size and alignment, each field's type, offset and size, each constant's and slot's
//! value and each STATS index with its name; `build.rs` turns that into `const` assertions
//! (`offset_of!`, `size_of`, the field's type, `STAT_NAMES[i]`), included in the private `abi`
//! module below. A disagreement is a compile error naming the item, so a wrong mirror can
//! never be built, tested or shipped: the loudest failure there is, and it needs no test run.
//! The header itself asserts that its structs have no implicit padding, so their layout is
//! the same for `-target bpf` as for the host compiler that measured it. Without any C
//! compiler the fast path is not built either and the check is skipped with a warning
//! (`abi::ABI_CHECKED` is then false; a unit test insists on it whenever the program is built).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};

/// The compiled program (empty when the build had no clang).
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/snat_tc.o"));

/// Direction byte of a key: packets arriving on the private side (`DIR_OUT` of
/// `bpf/snat_abi.h`).
pub const DIR_OUT: u8 = 0;
/// Direction byte of a key: packets arriving on the public side (`DIR_IN`).
pub const DIR_IN: u8 = 1;

/// Per-instance packet counters per instance slot: {TCP, UDP} × {out, in}
/// (`COUNTERS_PER_SLOT`).
pub const COUNTERS_PER_SLOT: u32 = 4;

/// `CONFIG[CFG_MODE]`: look flows up and translate them.
const MODE_TRANSLATE: u32 = 0;
/// `CONFIG[CFG_MODE]`: the benchmark floor (redirect without NAT).
const MODE_FLOOR: u32 = 1;
/// CONFIG slot: the mode.
const CFG_MODE: u32 = 0;
/// CONFIG slot: floor mode's egress interface of `snat_out`'s packets.
const CFG_FLOOR_EGRESS_OUT: u32 = 1;
/// CONFIG slot: floor mode's egress interface of `snat_in`'s packets.
const CFG_FLOOR_EGRESS_IN: u32 = 2;
/// CONFIG slot: the fleet steering epoch (0: no steering).
const CFG_STEER_EPOCH: u32 = 3;
/// CONFIG slot: this node's fleet link address, network order.
const CFG_LINK_ADDR: u32 = 4;
/// CONFIG slot: this node's fleet link UDP port, network order.
const CFG_LINK_PORT: u32 = 5;
/// CONFIG slot: the interface holding the fleet link address.
const CFG_LINK_IFINDEX: u32 = 6;
/// CONFIG slots.
const CFG_COUNT: u32 = 7;
/// STATS entries.
const ST_COUNT: usize = 20;
/// First port of the PAT chunks the steering's block map is keyed by (`snatgw_core`'s
/// `PORT_BASE`).
pub const STEER_PORT_BASE: u16 = 1024;
/// Ports per chunk (`snatgw_core`'s `CHUNK`).
pub const STEER_CHUNK_PORTS: u16 = 32;
/// Version byte of the fleet link's header (`SG`, version, direction).
pub const STEER_HDR_VERSION: u8 = 1;
/// Bytes a steered packet grows by: outer IPv4, UDP and the link header.
pub const STEER_ENCAP_LEN: u32 = 32;
/// TCP flags in [`BpfTcpEvent::flags`] (the flags byte as on the wire): FIN.
pub const TCPF_FIN: u8 = 0x01;
/// SYN.
pub const TCPF_SYN: u8 = 0x02;
/// RST.
pub const TCPF_RST: u8 = 0x04;
/// ACK.
pub const TCPF_ACK: u8 = 0x10;
/// Default size of the EVENTS ring in bytes (32 bytes a record with its header: 32 768
/// records).
pub const EVENTS_BYTES: u32 = 1 << 20;
/// Ports in a stash slot's ring ([`BpfStashSlot::ports`], issue #17).
pub const STASH_PORTS: u32 = 64;
/// Stash slots (entries of STASH and of STASH_KEYS) the loader creates: at most this many
/// (instance, destination) keys are served by the kernel at once.
pub const STASH_SLOTS: u32 = 4096;
/// [`BpfTcpEvent::kind`]: a FIN or RST the program translated.
pub const EV_TCP: u8 = 0;
/// [`BpfTcpEvent::kind`]: the program opened this flow from a stash (the record is the
/// outbound SYN, with the public address and the port it popped); the engine owns it now.
pub const EV_OPENED: u8 = 1;
/// [`BpfTcpEvent::kind`]: a port popped from a stash but not used (`pport`; `src`, `dst`,
/// `dport` the stash key, `sport` 0): the engine's again. The SYN went up.
pub const EV_RETURNED: u8 = 2;
/// `BPF_F_MMAPABLE` (include/uapi/linux/bpf.h): the flag of the STASH array.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Index into the per-instance packet counters of instance slot `slot`, protocol UDP or TCP,
/// direction [`DIR_OUT`] or [`DIR_IN`]: [`COUNTERS_PER_SLOT`] counters per slot. The one
/// definition of the layout, used for the map entries' `counter` and for reading the counters
/// back.
pub fn counter_index(slot: u32, udp: bool, dir: u8) -> u32 {
    slot * COUNTERS_PER_SLOT + u32::from(udp) * 2 + u32::from(dir)
}

/// Entries of the program's STATS array, in order (the `SNAT_STATS` list of
/// `bpf/snat_abi.h`; checked by the build).
pub const STAT_NAMES: [&str; ST_COUNT] = [
    "translated_out",
    "translated_in",
    "miss",
    "control",
    "not_fast",
    "ttl",
    "mtu",
    "floor",
    "not_ipv4",
    "events",
    "event_full",
    "steered_out",
    "steered_in",
    "steer_up",
    "link_in",
    "link_up",
    "link_drop",
    "stash_opened",
    "stash_empty",
    "stash_returned",
];

/// Key of the flow map: the packet's addresses and ports as on the wire, and its direction.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BpfFlowKey {
    /// Source address, network order.
    pub src: u32,
    /// Destination address, network order.
    pub dst: u32,
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`DIR_OUT`] or [`DIR_IN`].
    pub dir: u8,
    /// Zero.
    pub pad: u16,
}

/// Value of the flow map: the rewrite, where to send the packet, and what the program records.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BpfFlowVal {
    /// New address (outbound: source; inbound: destination), network order.
    pub addr: u32,
    /// New port, network order.
    pub port: u16,
    /// Zero.
    pub pad: u16,
    /// Egress interface index.
    pub ifindex: u32,
    /// Index into the per-instance packet counters.
    pub counter: u32,
    /// `CLOCK_MONOTONIC` nanoseconds of the last packet translated here (0: none yet).
    pub last_seen: u64,
}

/// A record of the EVENTS ring (issue #17), network order as in the map, of one of three
/// kinds ([`BpfTcpEvent::kind`]):
/// - [`EV_TCP`]: a FIN or RST the program translated, with the flow as the engine knows it
///   (outbound 5-tuple and public side, whichever way the packet went);
/// - [`EV_OPENED`]: an outbound SYN whose flow the program opened from a stash
///   ([`FastPathStash`]): the outbound 5-tuple, the slot's public address and the port it
///   popped, `dir` [`DIR_OUT`], `flags` the SYN's, `ts` its time (the entries' `last_seen`).
///   Both flow-map entries are installed; the engine owns the flow and them from now on;
/// - [`EV_RETURNED`]: a port popped from a stash but not used (a flow-map entry was in the
///   way), the SYN passed up: `pport` the port, `public` the slot's address, `src`, `dst`,
///   `dport` the stash key, `sport` 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BpfTcpEvent {
    /// `CLOCK_MONOTONIC` nanoseconds when the program saw the packet (`bpf_ktime_get_ns`).
    pub ts: u64,
    /// Private address.
    pub src: u32,
    /// Remote address.
    pub dst: u32,
    /// Public address.
    pub public: u32,
    /// Private port.
    pub sport: u16,
    /// Remote port.
    pub dport: u16,
    /// Public (SNAT) port.
    pub pport: u16,
    /// The TCP flags byte ([`TCPF_FIN`], [`TCPF_RST`], ...).
    pub flags: u8,
    /// [`DIR_OUT`] or [`DIR_IN`]: which way the packet travelled.
    pub dir: u8,
    /// [`EV_TCP`], [`EV_OPENED`] or [`EV_RETURNED`].
    pub kind: u8,
    /// Zero.
    pub pad1: u8,
    /// Zero.
    pub pad2: u16,
}

/// Key of the stash map (issue #17, `struct stash_key`): the outbound TCP SYNs a stash slot
/// serves, from a private address to a remote address and port. Network order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BpfStashKey {
    /// Private (source) address, network order.
    pub src: u32,
    /// Remote (destination) address, network order.
    pub dst: u32,
    /// Remote port, network order.
    pub dport: u16,
    /// Zero.
    pub pad: u16,
}

/// A stash slot as the program sees it (`struct stash_slot`), for the record: userspace reaches
/// it only through [`FastPathStash`], which maps the array and uses atomics on it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfStashSlot {
    /// Ports ever pushed (free-running; userspace writes it).
    pub prod: u32,
    /// Ports ever popped (free-running; the program advances it with a compare-and-swap).
    pub cons: u32,
    /// Public address of the flows opened from here, network order.
    pub public: u32,
    /// Egress interface of the outbound entry.
    pub out_ifindex: u32,
    /// Egress interface of the inbound entry.
    pub in_ifindex: u32,
    /// Per-instance counter of the outbound entry ([`counter_index`]).
    pub counter_out: u32,
    /// Per-instance counter of the inbound entry.
    pub counter_in: u32,
    /// Zero.
    pub pad: u32,
    /// The ring: entry `i` is `ports[i % STASH_PORTS]`, network order.
    pub ports: [u16; STASH_PORTS as usize],
}

/// What the program needs to open a flow from a stash slot (network order for the address):
/// the rest of both flow-map entries ([`BpfFlowVal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StashParams {
    /// The public address, network order.
    pub public: u32,
    /// Egress interface of the outbound entry (the public side).
    pub out_ifindex: u32,
    /// Egress interface of the inbound entry (the private side).
    pub in_ifindex: u32,
    /// Per-instance counter of the outbound entry ([`counter_index`]).
    pub counter_out: u32,
    /// Per-instance counter of the inbound entry.
    pub counter_in: u32,
}

/// Value of the steering maps (issue #19, SPEC R10.3): the owner's fleet link and the epoch
/// the entry was written in (`struct steer_val`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BpfSteerVal {
    /// The owner's link address, network order.
    pub addr: u32,
    /// The owner's link UDP port, network order.
    pub port: u16,
    /// Zero.
    pub pad: u16,
    /// The epoch it belongs to.
    pub epoch: u32,
    /// Zero.
    pub pad2: u32,
}

/// Key of the steering's block map: a public address and a chunk of
/// [`STEER_CHUNK_PORTS`] ports from [`STEER_PORT_BASE`] (`struct steer_block_key`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BpfSteerBlockKey {
    /// Public address, network order.
    pub addr: u32,
    /// `(port - STEER_PORT_BASE) / STEER_CHUNK_PORTS`, host order.
    pub chunk: u16,
    /// Zero.
    pub pad: u16,
}

// SAFETY: both are `#[repr(C)]` structs of plain integers with explicit padding fields, so
// every bit pattern is valid and there are no uninitialised padding bytes: the header asserts
// that `struct flow_key`/`flow_val` have no implicit padding, and the `abi` checks below prove
// these mirrors have the same size and every field at the same offset with the same type, so
// the fields cover every byte; this is what `aya::Pod` requires to copy them to and from the
// kernel.
#[allow(unsafe_code)]
unsafe impl aya::Pod for BpfFlowKey {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl aya::Pod for BpfFlowVal {}
// SAFETY: as above (`struct steer_val`, checked by the same build assertions).
#[allow(unsafe_code)]
unsafe impl aya::Pod for BpfSteerVal {}
// SAFETY: as above (`struct steer_block_key`).
#[allow(unsafe_code)]
unsafe impl aya::Pod for BpfSteerBlockKey {}
// SAFETY: as above (`struct stash_key`).
#[allow(unsafe_code)]
unsafe impl aya::Pod for BpfStashKey {}

/// The build's check of this module against `bpf/snat_abi.h` (see the module doc): the
/// header's names for the mirrors, and the assertions `build.rs` generated.
#[allow(non_camel_case_types, dead_code)]
mod abi {
    use super::*;

    /// `struct flow_key`.
    type flow_key = BpfFlowKey;
    /// `struct flow_val`.
    type flow_val = BpfFlowVal;
    /// `struct tcp_event`.
    type tcp_event = BpfTcpEvent;
    /// `struct steer_val`.
    type steer_val = BpfSteerVal;
    /// `struct steer_block_key`.
    type steer_block_key = BpfSteerBlockKey;
    /// `struct stash_key`.
    type stash_key = BpfStashKey;
    /// `struct stash_slot`.
    type stash_slot = BpfStashSlot;

    /// `a == b`, in const context.
    const fn str_eq(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }

    include!(concat!(env!("OUT_DIR"), "/snat_abi_check.rs"));
}

/// Why the fast path could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FastPathError {
    /// This build has no BPF object (clang was missing when it was compiled).
    #[error("this build has no fast-path program: clang was not found when snatgw-io was compiled (install clang and libbpf-dev, then rebuild)")]
    NotBuilt,
    /// An interface name could not be resolved in this network namespace.
    #[error("interface {0:?} not found")]
    NoInterface(String),
    /// The kernel refused to load the object or create its maps.
    #[error("loading the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// Loading or attaching a program failed.
    #[error("{what}: {source}")]
    Program {
        /// What was being done.
        what: String,
        /// The error.
        source: aya::programs::ProgramError,
    },
    /// The pin directory is not usable (not on a bpffs, or the kernel attaches through a
    /// clsact qdisc, whose filters cannot be pinned: tcx, Linux 6.6, is needed).
    #[error("pinning in {dir}: {why}")]
    Pin {
        /// The directory.
        dir: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A stash slot cannot take what was asked (issue #17).
    #[error("stash slot {slot}: {why}")]
    Stash {
        /// The slot.
        slot: u32,
        /// What is wrong.
        why: &'static str,
    },
    /// A map is missing or of the wrong shape.
    #[error("map {name}: {source}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// The error.
        source: aya::maps::MapError,
    },
}

/// How to set the fast path up.
#[derive(Debug, Clone)]
pub struct FastPathConfig {
    /// Interface the instances' packets arrive on (outbound, R9.1).
    pub private_if: String,
    /// Interface the internet's packets arrive on (inbound, R9.1).
    pub public_if: String,
    /// Flows the map holds (two entries each); further flows stay on the slow path.
    pub max_flows: u32,
    /// Instance slots with counters (four counters each); flows of higher slots stay on the
    /// slow path.
    pub counter_slots: u32,
    /// Benchmark floor: redirect every IPv4 packet to the other interface without lookup or
    /// rewrite (no NAT at all; only for `snatgw race`).
    pub floor: bool,
    /// Pin the maps and the program links in this directory (on a bpffs), so the programs
    /// stay attached and keep translating installed flows while no process runs (SPEC R11.1);
    /// a later load with the same directory takes the maps over and replaces the links
    /// without a gap. `None`: the programs detach when the [`TcFastPath`] is dropped.
    pub pin_dir: Option<std::path::PathBuf>,
    /// Size of the EVENTS ring in bytes (a power of two, at least a page; 0: [`EVENTS_BYTES`]).
    /// Records take 32 bytes each; a FIN/RST that finds the ring full goes up to the engine.
    pub event_ring_bytes: u32,
    /// A fleet node's link interface (issue #19): `snat_link` is attached to its ingress and
    /// translates packets other nodes steered here for flows installed here (it acts only
    /// once [`FastPathSteer::apply`] turned steering on). Never pinned: while no gateway runs,
    /// steered packets wait for its socket like any other. `None`: not a fleet node.
    pub link_if: Option<String>,
}

/// The attached fast path. Dropping it detaches the programs.
pub struct TcFastPath {
    _ebpf: Ebpf,
    /// Index of the private interface.
    pub private_ifindex: u32,
    /// Index of the public interface.
    pub public_ifindex: u32,
    /// The pinned links (with [`FastPathConfig::pin_dir`]); dropping them closes this
    /// process's descriptors, the pins keep the programs attached.
    pinned: Vec<aya::programs::links::PinnedLink>,
    /// The pin directory, if any.
    pin_dir: Option<std::path::PathBuf>,
    /// Whether the maps were taken over from pins an earlier load left (a restart).
    pub reused: bool,
}

/// The flow map.
///
/// Single entries go through aya; runs of entries through [`FlowMap::insert_batch`] and
/// [`FlowMap::remove_batch`], one `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` system call
/// per run (aya 0.14 has no wrapper for them), falling back to one call per entry on a kernel
/// that refuses batches on hash maps (before 5.6). Both apply entries in slice order and stop
/// at nothing: an entry the kernel refuses is reported and the rest still go in.
pub struct FlowMap {
    map: HashMap<MapData, BpfFlowKey, BpfFlowVal>,
    /// A second descriptor of the same map, for the batch system calls (aya keeps its own
    /// private).
    fd: OwnedFd,
    /// Whether batch calls are (still) tried: cleared once the kernel refused one as an
    /// unsupported operation.
    batch: bool,
    /// System calls made on the map by the batch methods (for measurements and tests).
    syscalls: u64,
}

/// A read-only handle on the flow map (its own descriptor): what the engine's activity
/// question (`snatgw_core::ActivitySource`) reads while the [`FlowMap`] is owned elsewhere.
pub struct FlowMapReader {
    map: HashMap<MapData, BpfFlowKey, BpfFlowVal>,
}

impl FlowMapReader {
    /// The entry for `k`, if present.
    pub fn get(&self, k: &BpfFlowKey) -> Option<BpfFlowVal> {
        self.map.get(k, 0).ok()
    }
}

/// `BPF_MAP_UPDATE_BATCH` (`enum bpf_cmd`, include/uapi/linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// `BPF_MAP_DELETE_BATCH`.
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's internal "operation not supported" (`ENOTSUPP`), which leaks to user space from
/// some BPF paths.
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h, stable since 5.6): the
/// kernel reads this many bytes and zero-fills the rest of the union.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Whether `e`, from a batch call that processed nothing, says the kernel has no batch
/// operation for this map (rather than refusing the first entry).
fn batch_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(ENOTSUPP)
    )
}

/// The program's counters.
pub struct FastPathCounters {
    counters: PerCpuArray<MapData, u64>,
    stats: PerCpuArray<MapData, u64>,
    slots: u32,
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of `bpf_ktime_get_ns`, and of
/// `std::time::Instant` on Linux.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    #[allow(unsafe_code)]
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(r, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The index of interface `name` in this network namespace.
pub fn ifindex(name: &str) -> Result<u32, FastPathError> {
    let c = CString::new(name).map_err(|_| FastPathError::NoInterface(name.into()))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    #[allow(unsafe_code)]
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(FastPathError::NoInterface(name.into()))
    } else {
        Ok(i)
    }
}

/// The index of the interface that holds IPv4 address `addr` in this network namespace.
pub fn ifindex_of_addr(addr: std::net::Ipv4Addr) -> Result<u32, FastPathError> {
    ifindex(&ifname_of_addr(addr)?)
}

/// The name of the interface that holds IPv4 address `addr` in this network namespace.
pub fn ifname_of_addr(addr: std::net::Ipv4Addr) -> Result<String, FastPathError> {
    let mut found: Option<CString> = None;
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list it allocated (freed below, once);
    // each node's `ifa_addr` is null or points to a sockaddr of the family it names, and an
    // AF_INET one is a sockaddr_in; `ifa_name` is a NUL-terminated string. Nothing is used
    // after freeifaddrs.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return Err(FastPathError::NoInterface(format!("with address {addr}")));
        }
        let mut p = list;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                let sin = &*a.cast::<libc::sockaddr_in>();
                if u32::from_be(sin.sin_addr.s_addr) == u32::from(addr) {
                    found = Some(std::ffi::CStr::from_ptr((*p).ifa_name).to_owned());
                    break;
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    let name = found.ok_or_else(|| FastPathError::NoInterface(format!("with address {addr}")))?;
    Ok(name.to_string_lossy().into_owned())
}

/// Whether this build carries the program.
pub fn built() -> bool {
    !PROGRAM.is_empty()
}

/// The error for map `name` missing from the object.
fn missing(name: &'static str) -> FastPathError {
    FastPathError::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    }
}

/// Wraps a map error of map `name`.
fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> FastPathError {
    move |source| FastPathError::Map { name, source }
}

/// The error of duplicating the flow map's descriptor.
fn dup_error(io_error: std::io::Error) -> FastPathError {
    FastPathError::Map {
        name: "FLOWS",
        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "dup",
            io_error,
        }),
    }
}

/// Takes map `name` out of `ebpf` as the typed map `f` makes of it.
fn take<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    f: impl FnOnce(Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, FastPathError> {
    let m = ebpf.take_map(name).ok_or_else(|| missing(name))?;
    f(m).map_err(map_error(name))
}

impl TcFastPath {
    /// Loads the program, sizes its maps, attaches it to both interfaces' ingress and returns
    /// it with its flow map and counters.
    pub fn load(
        cfg: &FastPathConfig,
    ) -> Result<(TcFastPath, FlowMap, FastPathCounters), FastPathError> {
        if !built() {
            return Err(FastPathError::NotBuilt);
        }
        let private_ifindex = ifindex(&cfg.private_if)?;
        let public_ifindex = ifindex(&cfg.public_if)?;
        let slots = cfg.counter_slots.max(1);
        let pins = match &cfg.pin_dir {
            Some(dir) => Some(crate::pin::PinDir::open(dir)?),
            None => None,
        };
        let reused = pins.as_ref().is_some_and(|p| p.has_maps());
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries("FLOWS", cfg.max_flows.max(1).saturating_mul(2))
            .map_max_entries("COUNTERS", slots.saturating_mul(COUNTERS_PER_SLOT))
            .map_max_entries("EVENTS", event_ring_bytes(cfg.event_ring_bytes))
            .map_max_entries("STASH_KEYS", STASH_SLOTS)
            .map_max_entries("STASH", STASH_SLOTS);
        let map_paths: Vec<(&'static str, std::path::PathBuf)> = match &pins {
            Some(p) => crate::pin::MAPS
                .iter()
                .map(|&m| (m, p.map_path(m)))
                .collect(),
            None => Vec::new(),
        };
        for (m, path) in &map_paths {
            loader.map_pin_path(m, path.as_path());
        }
        let mut ebpf = loader.load(PROGRAM)?;
        {
            // Set before the programs load (they hold the map from then on), so it stays in
            // `ebpf` rather than being taken out.
            let mut config: aya::maps::Array<&mut MapData, u32> = aya::maps::Array::try_from(
                ebpf.map_mut("CONFIG").ok_or_else(|| missing("CONFIG"))?,
            )
            .map_err(map_error("CONFIG"))?;
            let mode = if cfg.floor {
                MODE_FLOOR
            } else {
                MODE_TRANSLATE
            };
            // Every slot, by its name in the header (an added slot changes CFG_COUNT).
            let slots: [(u32, u32); CFG_COUNT as usize] = [
                (CFG_MODE, mode),
                (CFG_FLOOR_EGRESS_OUT, public_ifindex),
                (CFG_FLOOR_EGRESS_IN, private_ifindex),
                // Steering starts off; a fleet node turns it on (FastPathSteer).
                (CFG_STEER_EPOCH, 0),
                (CFG_LINK_ADDR, 0),
                (CFG_LINK_PORT, 0),
                (CFG_LINK_IFINDEX, 0),
            ];
            for (i, v) in slots {
                config.set(i, v, 0).map_err(map_error("CONFIG"))?;
            }
        }
        let mut pinned = Vec::new();
        for (prog, ifname) in [("snat_out", &cfg.private_if), ("snat_in", &cfg.public_if)] {
            let err = |what: String| move |source| FastPathError::Program { what, source };
            let p: &mut SchedClassifier = ebpf
                .program_mut(prog)
                .ok_or_else(|| FastPathError::Program {
                    what: format!("program {prog}"),
                    source: aya::programs::ProgramError::UnexpectedProgramType,
                })?
                .try_into()
                .map_err(err(format!("program {prog}")))?;
            p.load()
                .map_err(err(format!("loading {prog} (verifier)")))?;
            // tcx on kernels >= 6.6; older ones attach through a clsact qdisc, added on demand.
            let id = match p.attach(ifname, TcAttachType::Ingress) {
                Ok(id) => id,
                Err(_) if pins.is_none() => {
                    let _ = aya::programs::tc::qdisc_add_clsact(ifname);
                    p.attach(ifname, TcAttachType::Ingress)
                        .map_err(err(format!("attaching {prog} to {ifname} ingress")))?
                }
                Err(e) => {
                    return Err(err(format!("attaching {prog} to {ifname} ingress (tcx)"))(
                        e,
                    ))
                }
            };
            if let Some(pd) = &pins {
                // The new link runs beside the old one (same maps, same verdicts); the old
                // one is detached only once the new one is pinned: no packet meets neither.
                let link = p
                    .take_link(id)
                    .map_err(err(format!("taking the link of {prog}")))?;
                let fd: aya::programs::links::FdLink =
                    link.try_into().map_err(|e: aya::programs::links::LinkError| {
                        FastPathError::Pin {
                            dir: pd.dir().to_path_buf(),
                            why: format!("{prog} is not attached through tcx ({e}): pinning needs Linux 6.6 or later"),
                        }
                    })?;
                pinned.push(pd.replace_link(prog, fd)?);
            }
        }
        if let Some(pd) = &pins {
            // Both programs now run from this ABI's pins: an older ABI's maps go.
            pd.remove_other_abis();
        }
        if let Some(link_if) = &cfg.link_if {
            let err = |what: String| move |source| FastPathError::Program { what, source };
            let p: &mut SchedClassifier = ebpf
                .program_mut("snat_link")
                .ok_or_else(|| FastPathError::Program {
                    what: "program snat_link".into(),
                    source: aya::programs::ProgramError::UnexpectedProgramType,
                })?
                .try_into()
                .map_err(err("program snat_link".into()))?;
            p.load()
                .map_err(err("loading snat_link (verifier)".into()))?;
            if p.attach(link_if, TcAttachType::Ingress).is_err() {
                let _ = aya::programs::tc::qdisc_add_clsact(link_if);
                p.attach(link_if, TcAttachType::Ingress)
                    .map_err(err(format!("attaching snat_link to {link_if} ingress")))?;
            }
        }
        let map = ebpf.take_map("FLOWS").ok_or_else(|| missing("FLOWS"))?;
        let fd = match &map {
            Map::HashMap(data) => data
                .info()
                .and_then(|i| i.fd())
                .map_err(map_error("FLOWS"))?
                .as_fd()
                .try_clone_to_owned()
                .map_err(dup_error)?,
            _ => {
                return Err(FastPathError::Map {
                    name: "FLOWS",
                    source: aya::maps::MapError::InvalidName {
                        name: "FLOWS".into(),
                    },
                })
            }
        };
        let map = HashMap::try_from(map).map_err(map_error("FLOWS"))?;
        let counters = take(&mut ebpf, "COUNTERS", PerCpuArray::try_from)?;
        let stats = take(&mut ebpf, "STATS", PerCpuArray::try_from)?;
        Ok((
            TcFastPath {
                _ebpf: ebpf,
                private_ifindex,
                public_ifindex,
                pinned,
                pin_dir: pins.and(cfg.pin_dir.clone()),
                reused,
            },
            FlowMap {
                map,
                fd,
                batch: true,
                syscalls: 0,
            },
            FastPathCounters {
                counters,
                stats,
                slots,
            },
        ))
    }
}

/// The ring size the loader asks for: `want` rounded up to a power of two of at least one page.
fn event_ring_bytes(want: u32) -> u32 {
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = u32::try_from(page).unwrap_or(4096).max(4096);
    let want = if want == 0 { EVENTS_BYTES } else { want };
    want.max(page)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
}

/// The program's EVENTS ring (issue #17): the FINs and RSTs it translated, oldest first, for
/// the engine to apply at the kernel's times. One consumer: whoever holds this.
pub struct FastPathEvents {
    ring: aya::maps::RingBuf<MapData>,
}

impl FastPathEvents {
    /// Moves every record in the ring to the end of `out`, oldest first; returns how many.
    /// Reads shared memory only (no system call): cheap enough to call before every batch.
    pub fn drain(&mut self, out: &mut Vec<BpfTcpEvent>) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<BpfTcpEvent>() {
                // SAFETY: the record holds at least a `BpfTcpEvent`'s bytes, which the
                // program wrote as its `struct tcp_event` (same layout, checked by the build);
                // every bit pattern is a valid value of these plain integer fields, and
                // `read_unaligned` needs no alignment.
                #[allow(unsafe_code)]
                let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<BpfTcpEvent>()) };
                out.push(ev);
                n += 1;
            }
        }
        n
    }
}

impl TcFastPath {
    /// The EVENTS ring's reader (once; `None` afterwards, or if the map is missing).
    pub fn take_events(&mut self) -> Option<FastPathEvents> {
        let m = self._ebpf.take_map("EVENTS")?;
        let ring = aya::maps::RingBuf::try_from(m).ok()?;
        Some(FastPathEvents { ring })
    }

    /// The fleet steering maps and switch (issue #19), once; `None` afterwards or if the
    /// object lacks them. Steering stays off until [`FastPathSteer::apply`] turns it on.
    pub fn take_steer(&mut self) -> Option<FastPathSteer> {
        let inst = HashMap::try_from(self._ebpf.take_map("STEER_INST")?).ok()?;
        let peers = HashMap::try_from(self._ebpf.take_map("STEER_PEERS")?).ok()?;
        let block = HashMap::try_from(self._ebpf.take_map("STEER_BLOCK")?).ok()?;
        let config = aya::maps::Array::try_from(self._ebpf.take_map("CONFIG")?).ok()?;
        Some(FastPathSteer {
            inst,
            peers,
            block,
            config,
            epoch: 0,
            applied: None,
        })
    }

    /// The stashes (issue #17): the key map and a shared mapping of the slots, once; `None`
    /// afterwards, or if the object lacks the maps, or STASH cannot be mapped (not
    /// `BPF_F_MMAPABLE`, another value size). See [`FastPathStash`].
    pub fn take_stash(&mut self) -> Option<FastPathStash> {
        let keys = self._ebpf.take_map("STASH_KEYS")?;
        let slots = self._ebpf.take_map("STASH")?;
        let keys = HashMap::try_from(keys).ok()?;
        let Map::Array(data) = slots else {
            return None;
        };
        let ring = StashMem::map(&data).ok()?;
        Some(FastPathStash {
            keys,
            _slots: data,
            ring,
        })
    }

    /// Detaches the programs and removes the pins (`snatgw run --detach-on-exit`): the
    /// kernel stops translating when this returns, and a later start begins with empty maps.
    /// Without pins this is what dropping does.
    pub fn detach(mut self) -> Result<(), FastPathError> {
        let links = std::mem::take(&mut self.pinned);
        for l in links {
            // Unpinned and dropped: the last descriptor closes and the link detaches.
            let _ = l.unpin();
        }
        if let Some(dir) = self.pin_dir.take() {
            crate::pin::remove_all(&dir)?;
        }
        Ok(())
    }
}

impl FlowMap {
    /// Inserts or replaces an entry.
    pub fn insert(&mut self, k: &BpfFlowKey, v: &BpfFlowVal) -> Result<(), aya::maps::MapError> {
        self.map.insert(k, v, 0)
    }

    /// Removes an entry; a missing entry is not an error.
    pub fn remove(&mut self, k: &BpfFlowKey) -> Result<(), aya::maps::MapError> {
        match self.map.remove(k) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            r => r,
        }
    }

    /// The entry for `k`, if present.
    pub fn get(&self, k: &BpfFlowKey) -> Option<BpfFlowVal> {
        self.map.get(k, 0).ok()
    }

    /// Number of entries (walks the map: for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.map.keys().filter(Result::is_ok).count()
    }

    /// Whether the map is empty (walks the map).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every key in the map (walks it).
    pub fn keys(&self) -> Vec<BpfFlowKey> {
        self.map.keys().filter_map(Result::ok).collect()
    }

    /// A read-only handle on the same map with its own descriptor.
    pub fn reader(&self) -> Result<FlowMapReader, FastPathError> {
        let fd = self.fd.try_clone().map_err(dup_error)?;
        let data = MapData::from_fd(fd).map_err(map_error("FLOWS"))?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(map_error("FLOWS"))?;
        Ok(FlowMapReader { map })
    }

    /// Whether runs go to the kernel as batches (false once it refused one).
    pub fn batches(&self) -> bool {
        self.batch
    }

    /// Turns batch calls off (the per-entry fallback a kernel without batches on hash maps
    /// gets) or back on: for tests and measurements.
    pub fn set_batches(&mut self, on: bool) {
        self.batch = on;
    }

    /// System calls the batch methods made so far (one per batch, one per entry in the
    /// fallback, one per refused entry).
    pub fn batch_syscalls(&self) -> u64 {
        self.syscalls
    }

    /// Inserts or replaces `keys[i]` → `vals[i]`, in order, with one system call when nothing is
    /// refused. The indices of entries the kernel refused (the map full, `E2BIG`) are appended
    /// to `failed`; the others are in the map afterwards.
    ///
    /// # Panics
    /// If `keys` and `vals` differ in length.
    pub fn insert_batch(
        &mut self,
        keys: &[BpfFlowKey],
        vals: &[BpfFlowVal],
        failed: &mut Vec<usize>,
    ) {
        assert_eq!(keys.len(), vals.len(), "one value per key");
        let mut at = 0;
        while at < keys.len() {
            if !self.batch {
                for i in at..keys.len() {
                    self.syscalls += 1;
                    if self.map.insert(keys[i], vals[i], 0).is_err() {
                        failed.push(i);
                    }
                }
                return;
            }
            match self.batch_call(BPF_MAP_UPDATE_BATCH, &keys[at..], Some(&vals[at..])) {
                Ok(()) => return,
                Err((done, e)) => {
                    if done == 0 && batch_unsupported(&e) {
                        // Unsupported, or the first entry refused: one entry alone tells.
                        self.syscalls += 1;
                        match self.map.insert(keys[at], vals[at], 0) {
                            Ok(()) => self.batch = false,
                            Err(_) => failed.push(at),
                        }
                        at += 1;
                    } else {
                        // Entries before `at + done` are in; that one was refused.
                        failed.push(at + done);
                        at += done + 1;
                    }
                }
            }
        }
    }

    /// Removes `keys`, in order, with one system call when all are present; a missing key is
    /// not an error. Returns how many removals failed otherwise.
    pub fn remove_batch(&mut self, keys: &[BpfFlowKey]) -> usize {
        let mut errors = 0;
        let mut at = 0;
        while at < keys.len() {
            if !self.batch {
                for k in &keys[at..] {
                    self.syscalls += 1;
                    if self.remove(k).is_err() {
                        errors += 1;
                    }
                }
                return errors;
            }
            match self.batch_call(BPF_MAP_DELETE_BATCH, &keys[at..], None) {
                Ok(()) => return errors,
                Err((done, e)) => {
                    if e.raw_os_error() == Some(libc::ENOENT) {
                        // `keys[at + done]` is not in the map: nothing to remove there.
                        at += done + 1;
                    } else if done == 0 && batch_unsupported(&e) {
                        self.syscalls += 1;
                        match self.remove(&keys[at]) {
                            Ok(()) => self.batch = false,
                            Err(_) => errors += 1,
                        }
                        at += 1;
                    } else {
                        errors += 1;
                        at += done + 1;
                    }
                }
            }
        }
        errors
    }

    /// Removes every entry (resynchronisation). Returns how many removals failed.
    pub fn clear(&mut self) -> usize {
        let keys = self.keys();
        self.remove_batch(&keys)
    }

    /// One batch system call over `keys` (and `vals` for an update): `Err((entries done,
    /// error))` when the kernel stopped early or refused the call.
    fn batch_call(
        &mut self,
        cmd: libc::c_long,
        keys: &[BpfFlowKey],
        vals: Option<&[BpfFlowVal]>,
    ) -> Result<(), (usize, std::io::Error)> {
        let count = u32::try_from(keys.len()).unwrap_or(u32::MAX);
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: vals.map_or(0, |v| v.as_ptr() as u64),
            count,
            map_fd: self.fd.as_raw_fd() as u32,
            ..Default::default()
        };
        self.syscalls += 1;
        // SAFETY: `attr` is the `batch` member of `union bpf_attr`, fully initialised, and
        // outlives the call; `size_of::<BatchAttr>()` tells the kernel how much of it to read
        // (it zero-fills the rest of the union). `keys` points to `count` keys (and `values`,
        // for an update, to `count` values: `insert_batch` checked the lengths match) of the
        // map's key and value sizes (`#[repr(C)]` mirrors of the program's structs, checked
        // against its header by the build), which the kernel only reads. The kernel writes
        // back only `attr.count`, a field of our `attr`. `map_fd` is our open descriptor.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::addr_of_mut!(attr),
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            let e = std::io::Error::last_os_error();
            Err(((attr.count as usize).min(keys.len()), e))
        }
    }
}

impl FastPathCounters {
    /// Instance slots with counters.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The per-instance packet counters of the first `slots` instance slots, summed over CPUs,
    /// indexed by [`counter_index`].
    pub fn instance_counters(&self, slots: u32) -> Vec<u64> {
        let n = slots.min(self.slots) * COUNTERS_PER_SLOT;
        (0..n)
            .map(|i| {
                self.counters
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// The program's own counters, in the order of [`STAT_NAMES`], summed over CPUs.
    pub fn stats(&self) -> [u64; STAT_NAMES.len()] {
        let mut out = [0; STAT_NAMES.len()];
        for (i, o) in out.iter_mut().enumerate() {
            *o = self
                .stats
                .get(&(i as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        // The C structs: 16-byte key, 24-byte value, no implicit padding.
        assert_eq!(std::mem::size_of::<BpfFlowKey>(), 16);
        assert_eq!(std::mem::size_of::<BpfFlowVal>(), 24);
        assert_eq!(std::mem::align_of::<BpfFlowVal>(), 8);
    }

    #[test]
    fn the_abi_was_checked_against_the_header() {
        // The checks themselves are compile-time assertions (module doc): this only makes
        // sure the build generated them, whenever it built the program (build.rs insists
        // too) and always under SNATGW_REQUIRE_ROOT=1 (CI, which installs clang).
        let required = built() || std::env::var("SNATGW_REQUIRE_ROOT").is_ok_and(|v| v == "1");
        // black_box: the values are constants, the question is which ones this build made.
        let (checked, items) = std::hint::black_box((abi::ABI_CHECKED, abi::ABI_ITEMS));
        if required {
            assert!(checked, "the fast path's ABI was not checked by this build");
            // Structs, fields, constants and slots, stats: some 30 items today.
            assert!(items >= 30, "only {items} ABI items checked");
        } else if !checked {
            eprintln!("skipped: no host C compiler at build time, ABI unchecked");
        }
    }

    #[test]
    fn the_build_carries_the_program() {
        // scripts/test-all.sh installs clang; under SNATGW_REQUIRE_ROOT=1 (CI) a build without
        // the program fails here instead of passing unnoticed.
        if !built() {
            assert!(
                std::env::var("SNATGW_REQUIRE_ROOT").map_or(true, |v| v != "1"),
                "snatgw-io was built without the fast-path object (no clang at build time)"
            );
            eprintln!("skipped: built without clang, no fast-path program");
        }
    }
}

/// What the kernel steers to other fleet nodes (issue #19, SPEC R10.3): this node's own link
/// (the outer source), and the owner's link of each instance (by private address) and of each
/// port chunk (public address, chunk of [`STEER_CHUNK_PORTS`] ports from [`STEER_PORT_BASE`])
/// that another node owns. Instances and chunks this node owns are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SteerTable {
    /// This node's fleet link (outer source address and UDP port).
    pub link: Option<std::net::SocketAddrV4>,
    /// Owner's link by instance private address.
    pub inst: std::collections::BTreeMap<std::net::Ipv4Addr, std::net::SocketAddrV4>,
    /// Owner's link by (public address, chunk).
    pub block: std::collections::BTreeMap<(std::net::Ipv4Addr, u16), std::net::SocketAddrV4>,
    /// The other live nodes' links: `snat_link` takes steered packets from these only.
    pub peers: std::collections::BTreeSet<std::net::SocketAddrV4>,
}

/// The fast path's fleet steering (issue #19): its two owner maps and the CONFIG slots that
/// switch it (epoch) and name this node's link. One writer: whoever holds this.
///
/// [`FastPathSteer::apply`] replaces the whole table at once: it writes every entry under a
/// new epoch, then makes that epoch current (one CONFIG write: the program counts only entries
/// of the current epoch, so no packet sees half of two tables), then deletes what the new table
/// does not have. An entry the program cannot use (not of the current epoch, or absent) means
/// the packet goes up to the engine, whose own steering (the TUN path) decides it: steering
/// in the kernel is an acceleration, never the only way.
pub struct FastPathSteer {
    inst: HashMap<MapData, u32, BpfSteerVal>,
    peers: HashMap<MapData, u32, BpfSteerVal>,
    block: HashMap<MapData, BpfSteerBlockKey, BpfSteerVal>,
    config: aya::maps::Array<MapData, u32>,
    epoch: u32,
    applied: Option<SteerTable>,
}

impl FastPathSteer {
    /// Makes `t` the table the kernel steers by (see the type's documentation); `Ok(false)`
    /// when it is the table already applied. On an error (a map full) steering is left off,
    /// so every such packet goes up to the engine, and the next call tries again.
    pub fn apply(&mut self, t: &SteerTable) -> Result<bool, FastPathError> {
        if self.applied.as_ref() == Some(t) {
            return Ok(false);
        }
        let Some(link) = t.link else {
            self.off()?;
            self.applied = Some(t.clone());
            return Ok(true);
        };
        let cfg_err = map_error("CONFIG");
        let epoch = match self.epoch.wrapping_add(1) {
            0 => 1,
            e => e,
        };
        let val = |a: &std::net::SocketAddrV4| BpfSteerVal {
            addr: u32::from_ne_bytes(a.ip().octets()),
            port: a.port().to_be(),
            pad: 0,
            epoch,
            pad2: 0,
        };
        let link_if = ifindex_of_addr(*link.ip());
        let result = (|| {
            self.config
                .set(CFG_LINK_IFINDEX, link_if?, 0)
                .map_err(map_error("CONFIG"))?;
            self.config
                .set(CFG_LINK_ADDR, u32::from_ne_bytes(link.ip().octets()), 0)
                .map_err(map_error("CONFIG"))?;
            self.config
                .set(CFG_LINK_PORT, u32::from(link.port().to_be()), 0)
                .map_err(map_error("CONFIG"))?;
            for (ip, to) in &t.inst {
                self.inst
                    .insert(u32::from_ne_bytes(ip.octets()), val(to), 0)
                    .map_err(map_error("STEER_INST"))?;
            }
            for ((ip, chunk), to) in &t.block {
                self.block
                    .insert(block_key(*ip, *chunk), val(to), 0)
                    .map_err(map_error("STEER_BLOCK"))?;
            }
            for p in &t.peers {
                self.peers
                    .insert(u32::from_ne_bytes(p.ip().octets()), val(p), 0)
                    .map_err(map_error("STEER_PEERS"))?;
            }
            self.config
                .set(CFG_STEER_EPOCH, epoch, 0)
                .map_err(map_error("CONFIG"))
        })();
        self.epoch = epoch;
        if let Err(e) = result {
            // Whatever was written is of an epoch that is not current (or steering is off).
            let _ = self.config.set(CFG_STEER_EPOCH, 0, 0).map_err(cfg_err);
            self.applied = None;
            return Err(e);
        }
        // Entries of the old table the new one lacks: no longer counted, now removed.
        if let Some(old) = self.applied.take() {
            for ip in old.inst.keys().filter(|ip| !t.inst.contains_key(ip)) {
                let _ = self.inst.remove(&u32::from_ne_bytes(ip.octets()));
            }
            for k in old.block.keys().filter(|k| !t.block.contains_key(k)) {
                let _ = self.block.remove(&block_key(k.0, k.1));
            }
            let now: std::collections::HashSet<std::net::Ipv4Addr> =
                t.peers.iter().map(|p| *p.ip()).collect();
            for p in old.peers.iter().filter(|p| !now.contains(p.ip())) {
                let _ = self.peers.remove(&u32::from_ne_bytes(p.ip().octets()));
            }
        }
        self.applied = Some(t.clone());
        Ok(true)
    }

    /// Turns steering off (every packet of another node's goes up to the engine) and empties
    /// the maps.
    pub fn off(&mut self) -> Result<(), FastPathError> {
        self.config
            .set(CFG_STEER_EPOCH, 0, 0)
            .map_err(map_error("CONFIG"))?;
        let keys: Vec<u32> = self.inst.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.inst.remove(&k);
        }
        let keys: Vec<BpfSteerBlockKey> = self.block.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.block.remove(&k);
        }
        let keys: Vec<u32> = self.peers.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.peers.remove(&k);
        }
        self.applied = Some(SteerTable::default());
        Ok(())
    }

    /// The current epoch (0: steering off).
    pub fn epoch(&self) -> u32 {
        self.config.get(&CFG_STEER_EPOCH, 0).unwrap_or(0)
    }

    /// The entries in the maps: (instances, chunks).
    pub fn len(&self) -> (usize, usize) {
        (self.inst.keys().count(), self.block.keys().count())
    }
}

fn block_key(ip: std::net::Ipv4Addr, chunk: u16) -> BpfSteerBlockKey {
    BpfSteerBlockKey {
        addr: u32::from_ne_bytes(ip.octets()),
        chunk,
        pad: 0,
    }
}

/// The stashes (issue #17): public ports the engine decided ahead, from which the program opens
/// new outbound TCP flows itself, so their SYN needs no trip through userspace.
///
/// A slot (`0..slots()`) is a ring of [`STASH_PORTS`] ports with what the program needs to
/// install both flow-map entries ([`StashParams`]); a key ([`BpfStashKey`]: private address,
/// remote address, remote port) points outbound SYNs at a slot. For such a SYN whose 5-tuple is
/// not in the flow map, the program pops the ring's oldest port, installs the two entries,
/// translates the SYN and reports the flow in the EVENTS ring ([`EV_OPENED`]); a port it
/// popped but could not use comes back there too ([`EV_RETURNED`]). Every popped port is in
/// one of those records: the ports the engine handed over are, at any time, exactly those
/// [`queued`](FastPathStash::queued) plus those the records told of.
///
/// One writer: whoever holds this. The ring is a single-producer (this, through a shared
/// mapping of the STASH array: ports stored, then `prod` published with a Release store),
/// multi-consumer (the program on every CPU: a compare-and-swap on `cons`, the port read
/// before it) queue of free-running `u32` indexes.
///
/// Taking a slot back: [`unbind`](FastPathStash::unbind) (the program stops finding it), wait
/// a grace period (a program already past its lookup may still pop: the lookup and the pop
/// happen within one packet's run of the program, inside an RCU read-side section with bottom
/// halves off, so microseconds; an RCU grace period is the exact bound, a few milliseconds
/// cover it in practice), drain EVENTS (the last pops' records), then
/// [`reset`](FastPathStash::reset), which returns the ports never taken. Pinned with the other maps (a restarted gateway finds them,
/// and the program kept opening flows from what was stashed while none ran: their records wait
/// in EVENTS); the runtime [`clear`](FastPathStash::clear)s them at start and at stop.
pub struct FastPathStash {
    keys: HashMap<MapData, BpfStashKey, u32>,
    /// Keeps the STASH map's descriptor (the mapping stands on its own, but this says which
    /// map it is for as long as it lives).
    _slots: MapData,
    ring: StashMem,
}

/// A shared, writable mapping of the STASH array (`BPF_F_MMAPABLE`): the kernel lays the
/// values out from offset 0, `round_up(value_size, 8)` bytes apart (kernel/bpf/arraymap.c,
/// `elem_size`), and maps exactly that many pages.
struct StashMem {
    base: std::ptr::NonNull<u8>,
    len: usize,
    stride: usize,
    slots: u32,
}

// SAFETY: the mapping is process-wide memory owned by this value (unmapped once, on drop),
// not tied to a thread; every access goes through atomics (see `StashMem::u32_at`), so moving
// it to or sharing it with another thread is sound.
#[allow(unsafe_code)]
unsafe impl Send for StashMem {}
// SAFETY: as above: `&self` methods only load atomically.
#[allow(unsafe_code)]
unsafe impl Sync for StashMem {}

/// Offsets in `struct stash_slot` (checked against the header by the build, through the
/// mirror).
const SLOT_PROD: usize = std::mem::offset_of!(BpfStashSlot, prod);
const SLOT_CONS: usize = std::mem::offset_of!(BpfStashSlot, cons);
const SLOT_PUBLIC: usize = std::mem::offset_of!(BpfStashSlot, public);
const SLOT_OUT_IF: usize = std::mem::offset_of!(BpfStashSlot, out_ifindex);
const SLOT_IN_IF: usize = std::mem::offset_of!(BpfStashSlot, in_ifindex);
const SLOT_COUNTER_OUT: usize = std::mem::offset_of!(BpfStashSlot, counter_out);
const SLOT_COUNTER_IN: usize = std::mem::offset_of!(BpfStashSlot, counter_in);
const SLOT_PAD: usize = std::mem::offset_of!(BpfStashSlot, pad);
const SLOT_PORTS: usize = std::mem::offset_of!(BpfStashSlot, ports);

impl StashMem {
    /// Maps the STASH array `data` (whole, read-write, shared).
    fn map(data: &MapData) -> Result<StashMem, std::io::Error> {
        let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
        let info = data.info().map_err(std::io::Error::other)?;
        if info.map_flags() & BPF_F_MMAPABLE == 0 {
            return Err(bad("STASH is not BPF_F_MMAPABLE"));
        }
        if info.value_size() as usize != std::mem::size_of::<BpfStashSlot>() {
            return Err(bad("STASH's value is not a struct stash_slot"));
        }
        let stride = (info.value_size() as usize).next_multiple_of(8);
        let slots = info.max_entries();
        // SAFETY: sysconf has no preconditions.
        #[allow(unsafe_code)]
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).unwrap_or(4096).max(4096);
        let len = (stride * slots as usize).next_multiple_of(page).max(page);
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of `len` bytes of the map's descriptor (open for the
        // call) at an address the kernel picks: nothing else is mapped over. The kernel
        // accepts exactly the array's page-rounded size for an mmapable array map; the
        // mapping stays valid after the descriptor closes, until `drop` unmaps it.
        #[allow(unsafe_code)]
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = std::ptr::NonNull::new(p.cast::<u8>()).ok_or_else(|| bad("mmap gave null"))?;
        Ok(StashMem {
            base,
            len,
            stride,
            slots,
        })
    }

    /// The `u32` at byte `off` of slot `slot`.
    ///
    /// # Panics
    /// If `slot` is not below the number of slots.
    fn u32_at(&self, slot: u32, off: usize) -> &AtomicU32 {
        assert!(slot < self.slots, "stash slot {slot} of {}", self.slots);
        let at = slot as usize * self.stride + off;
        debug_assert!(at + 4 <= self.len && at.is_multiple_of(4));
        // SAFETY: `at + 4 <= len` (slot < slots, off within the struct, stride * slots <= len),
        // so the four bytes are inside the mapping, which lives as long as `self`; `at` is a
        // multiple of 4 (the stride is a multiple of 8, the field offsets of u32 fields are
        // multiples of 4) on a page-aligned base. The memory is shared with the kernel and
        // the program, which access it atomically or with single aligned loads and stores,
        // so an `AtomicU32` (same layout as u32) is the right view of it.
        #[allow(unsafe_code)]
        unsafe {
            &*self.base.as_ptr().add(at).cast::<AtomicU32>()
        }
    }

    /// Entry `i` (a free-running ring index) of slot `slot`'s ring.
    fn port_at(&self, slot: u32, i: u32) -> &AtomicU16 {
        assert!(slot < self.slots, "stash slot {slot} of {}", self.slots);
        let at = slot as usize * self.stride + SLOT_PORTS + 2 * (i % STASH_PORTS) as usize;
        debug_assert!(at + 2 <= self.len && at.is_multiple_of(2));
        // SAFETY: as in `u32_at`: inside the mapping (ports[] ends within the slot's stride),
        // 2-aligned, accessed atomically by every side.
        #[allow(unsafe_code)]
        unsafe {
            &*self.base.as_ptr().add(at).cast::<AtomicU16>()
        }
    }

    fn prod(&self, slot: u32) -> &AtomicU32 {
        self.u32_at(slot, SLOT_PROD)
    }

    fn cons(&self, slot: u32) -> &AtomicU32 {
        self.u32_at(slot, SLOT_CONS)
    }

    /// `(prod, cons)` of `slot`, `prod` pulled up to `cons` first if it had fallen behind (only
    /// a pop that raced a [`FastPathStash::reset`] without a grace period does that; the
    /// program treats such a ring as empty).
    fn indexes(&self, slot: u32) -> (u32, u32) {
        let prod = self.prod(slot).load(Ordering::Relaxed);
        // Acquire: the program read the ports below `cons` before advancing it (its CAS is
        // fully ordered), so they may be overwritten once this load sees it.
        let cons = self.cons(slot).load(Ordering::Acquire);
        if prod.wrapping_sub(cons) > STASH_PORTS {
            self.prod(slot).store(cons, Ordering::Release);
            return (cons, cons);
        }
        (prod, cons)
    }
}

impl Drop for StashMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` made, once; no reference into it outlives
        // `self` (the views borrow `self`).
        #[allow(unsafe_code)]
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

impl FastPathStash {
    /// Slots (entries of the STASH array): valid slot numbers are `0..slots()`.
    pub fn slots(&self) -> u32 {
        self.ring.slots
    }

    /// Points `key` at `slot` with `params`: from then on, outbound SYNs of the key open their
    /// flows from the slot's ports ([`push`](FastPathStash::push)). The slot's ring must be
    /// empty (a slot taken back: [`reset`](FastPathStash::reset)). Writes the params into the
    /// slot, then inserts (or replaces) the key. A slot still pointed at by another key should
    /// be unbound there first (with the grace period), or flows of that key open with these
    /// params.
    pub fn bind(
        &mut self,
        slot: u32,
        key: BpfStashKey,
        params: StashParams,
    ) -> Result<(), FastPathError> {
        if slot >= self.ring.slots {
            return Err(FastPathError::Stash {
                slot,
                why: "no such slot",
            });
        }
        let (prod, cons) = self.ring.indexes(slot);
        if prod != cons {
            return Err(FastPathError::Stash {
                slot,
                why: "its ring is not empty (reset it first)",
            });
        }
        let m = &self.ring;
        for (off, v) in [
            (SLOT_PUBLIC, params.public),
            (SLOT_OUT_IF, params.out_ifindex),
            (SLOT_IN_IF, params.in_ifindex),
            (SLOT_COUNTER_OUT, params.counter_out),
            (SLOT_COUNTER_IN, params.counter_in),
            (SLOT_PAD, 0),
        ] {
            m.u32_at(slot, off).store(v, Ordering::Relaxed);
        }
        // The params before the key (the map update is a system call, ordered anyway) and
        // before any port `push` publishes (Release there too).
        std::sync::atomic::fence(Ordering::Release);
        self.keys
            .insert(key, slot, 0)
            .map_err(map_error("STASH_KEYS"))
    }

    /// Appends `ports_net` (network order) to `slot`'s ring, as many as fit
    /// ([`STASH_PORTS`] minus [`queued`](FastPathStash::queued)), oldest first: the program
    /// pops them in this order. Returns how many went in. Stores the ports, then publishes
    /// them with a Release store of `prod`.
    ///
    /// # Panics
    /// If `slot` is not below [`slots`](FastPathStash::slots).
    pub fn push(&mut self, slot: u32, ports_net: &[u16]) -> usize {
        let (prod, cons) = self.ring.indexes(slot);
        let room = STASH_PORTS - prod.wrapping_sub(cons);
        let n = ports_net.len().min(room as usize);
        for (i, &p) in ports_net[..n].iter().enumerate() {
            self.ring
                .port_at(slot, prod.wrapping_add(i as u32))
                .store(p, Ordering::Relaxed);
        }
        self.ring
            .prod(slot)
            .store(prod.wrapping_add(n as u32), Ordering::Release);
        n
    }

    /// Ports in `slot`'s ring the program has not taken yet.
    ///
    /// # Panics
    /// If `slot` is not below [`slots`](FastPathStash::slots).
    pub fn queued(&self, slot: u32) -> u32 {
        let m = &self.ring;
        let prod = m.prod(slot).load(Ordering::Relaxed);
        let q = prod.wrapping_sub(m.cons(slot).load(Ordering::Acquire));
        if q > STASH_PORTS {
            0
        } else {
            q
        }
    }

    /// Ports taken from `slot` so far (its free-running `cons`: wraps at 2³²): by the
    /// program, each one in an EVENTS record ([`EV_OPENED`] or [`EV_RETURNED`]), and by
    /// [`reset`](FastPathStash::reset), which returned them.
    ///
    /// # Panics
    /// If `slot` is not below [`slots`](FastPathStash::slots).
    pub fn taken(&self, slot: u32) -> u32 {
        self.ring.cons(slot).load(Ordering::Acquire)
    }

    /// Deletes `key` (absent is fine): the program stops finding its slot. A program already
    /// past its lookup may still pop for a few microseconds: [`reset`](FastPathStash::reset)
    /// the slot right after to take back what is left (exactly), and wait a grace period
    /// before binding the slot to another key.
    pub fn unbind(&mut self, key: BpfStashKey) -> Result<(), FastPathError> {
        match self.keys.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(map_error("STASH_KEYS")(e)),
        }
    }

    /// Takes back every port of `slot`'s ring the program has not taken (network order,
    /// oldest first) and leaves the ring empty. Exact whenever it is called: userspace claims
    /// the ports with the same compare-and-swap on `cons` the program pops with, so each ring
    /// entry goes to exactly one of them (a program that read the old `cons` fails its swap
    /// and finds the ring empty; a pop that won is not returned here, its record is in
    /// EVENTS). Call it after [`unbind`](FastPathStash::unbind), or the program may keep
    /// popping what is pushed later.
    ///
    /// # Panics
    /// If `slot` is not below [`slots`](FastPathStash::slots).
    pub fn reset(&mut self, slot: u32) -> Vec<u16> {
        let m = &self.ring;
        loop {
            let cons = m.cons(slot).load(Ordering::SeqCst);
            let prod = m.prod(slot).load(Ordering::SeqCst);
            let n = prod.wrapping_sub(cons);
            if n > STASH_PORTS {
                // prod behind cons (a pop raced an earlier reset): nothing queued; prod follows.
                m.prod(slot).store(cons, Ordering::SeqCst);
                if m.cons(slot).load(Ordering::SeqCst) == cons {
                    return Vec::new();
                }
                continue;
            }
            // Read before the swap, as the program does: once cons moves past an entry it may
            // be refilled.
            let ports: Vec<u16> = (0..n)
                .map(|i| {
                    m.port_at(slot, cons.wrapping_add(i))
                        .load(Ordering::Relaxed)
                })
                .collect();
            if m.cons(slot)
                .compare_exchange(cons, prod, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return ports;
            }
            // The program popped meanwhile: look again.
        }
    }

    /// Deletes every key and empties every ring (at start with pinned maps, and at stop): the
    /// program opens no more flows from stashes. Returns how many keys there were. The ports
    /// in the rings are dropped (a pop racing this is reported in EVENTS as usual).
    pub fn clear(&mut self) -> usize {
        let keys: Vec<BpfStashKey> = self.keys.keys().filter_map(Result::ok).collect();
        for k in &keys {
            let _ = self.unbind(*k);
        }
        for slot in 0..self.ring.slots {
            let _ = self.reset(slot);
        }
        keys.len()
    }
}
