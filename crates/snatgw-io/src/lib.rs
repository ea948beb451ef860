//! snatgw-io: packet I/O for the snatgw dataplane.
//!
//! What it does:
//! - [`PacketIo`]: the batch receive/send trait a dataplane worker drives, so other backends
//!   (AF_XDP later) can be swapped in without touching the translation code.
//! - [`PacketBatch`]: reusable packet buffers (allocated once, rewritten in place).
//! - [`TunIo`]: the Linux TUN backend (multi-queue, optional virtio-net offload).
//! - [`MemIo`]: an in-memory backend for tests (no privileges needed).
//! - [`fastpath`]: the kernel fast path (a tc/tcx eBPF program built from `bpf/snat_tc.c`),
//!   its loader and its maps (issue #9).
//! - [`pin`]: the fast path's pins on a bpffs, which keep it translating installed flows
//!   while no gateway process runs (SPEC R11.1, issue #18).
//!
//! What it does not do: parse or translate packets (`snatgw-wire`, `snatgw-dataplane`),
//! configure addresses, routes or namespaces (`snatgw-lab` or the operator).
//!
//! This is the only workspace crate allowed `unsafe`; it uses it in the opt-in huge-page
//! allocator ([`HugePageAlloc`]) and in [`fastpath`]: the map types' `Pod` marker, three libc
//! calls (`clock_gettime`, `if_nametoindex`, `sysconf`), the copy of an EVENTS ring record into
//! its `#[repr(C)]` mirror (`FastPathEvents::drain`, issue #17) and the raw `bpf()` system call behind
//! `FlowMap::insert_batch`/`remove_batch` (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`: aya
//! has no batch call; one call per run of same-kind flow changes, per-entry fallback), the
//! `mmap`/`munmap` of the port stash array and its atomics (`FastPathStash`, issue #17), and in
//! [`pin`] (one `statfs` that checks the pin directory is a bpffs); each block with a
//! `// SAFETY:` comment.
//!
//! # Worker loop
//! ```no_run
//! use std::time::Duration;
//! use snatgw_io::{PacketIo, TunConfig, TunIo};
//!
//! let mut queues = TunIo::open(&TunConfig::new("snat0"))?;
//! let mut io = queues.remove(0);
//! let mut batch = io.new_batch(snatgw_io::DEFAULT_BATCH);
//! loop {
//!     if io.recv_batch(&mut batch, Duration::from_millis(100))? == 0 {
//!         continue; // timeout or woken: check the shutdown flag here
//!     }
//!     for i in 0..batch.len() {
//!         let pkt = batch.packet_mut(i);
//!         // translate `pkt` in place, or `batch.drop_packet(i)`
//!         # let _ = pkt;
//!     }
//!     io.send_batch(&mut batch)?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod batch;
pub mod fastpath;
mod hugepage;
mod mem;
pub mod pin;
mod tun;

use std::io;
use std::time::Duration;

pub use batch::{PacketBatch, HEADROOM};
pub use hugepage::{HugePageAlloc, HUGE_MIN};
pub use mem::{MemIo, MemIoHandle};
pub use tun::{TunConfig, TunError, TunIo, Waker, IFNAME_MAX, OFFLOAD_MIN_FREE_SLOTS};

/// A good default batch size (tun-rs's `IDEAL_BATCH_SIZE`, 128).
pub const DEFAULT_BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;

/// Counters kept by a [`PacketIo`] backend (monotonic since it was opened).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct IoStats {
    /// Packets received (after GSO splitting).
    pub rx_packets: u64,
    /// Bytes received (IP packets, no headers added by the backend).
    pub rx_bytes: u64,
    /// Receive errors: packets read but unusable (truncated, unsplittable) or failed reads.
    pub rx_errors: u64,
    /// GSO super-packets split into several packets (TUN offload only).
    pub rx_super_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets (or, with TUN offload, write batches) the kernel refused.
    pub tx_errors: u64,
}

/// Batched packet I/O: raw IP packets without a link-layer header.
///
/// One value per queue; each worker thread owns one and no locking is involved.
pub trait PacketIo: Send {
    /// Clears `batch` and fills it with up to `batch.capacity()` received packets, returning
    /// how many (also `batch.len()`).
    ///
    /// Returns immediately when packets are waiting; otherwise blocks at most `timeout`
    /// (so the caller can check a shutdown flag) and returns `Ok(0)` on timeout or when the
    /// backend's waker was woken. An `Err` means the backend is unusable.
    fn recv_batch(&mut self, batch: &mut PacketBatch, timeout: Duration) -> io::Result<usize>;

    /// Sends every non-empty packet of `batch` (dropped, i.e. empty, packets are skipped),
    /// then clears the batch. Returns how many packets were sent.
    ///
    /// A packet the kernel refuses is counted in [`IoStats::tx_errors`] and skipped; an `Err`
    /// means the backend is unusable.
    fn send_batch(&mut self, batch: &mut PacketBatch) -> io::Result<usize>;

    /// Counters since the backend was opened.
    fn stats(&self) -> IoStats;

    /// A batch of `capacity` slots sized for this backend (default: slots of 64 KiB, the
    /// largest IPv4 packet).
    fn new_batch(&self, capacity: usize) -> PacketBatch {
        PacketBatch::new(capacity, usize::from(u16::MAX))
    }
}
