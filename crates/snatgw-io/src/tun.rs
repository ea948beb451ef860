//! Linux TUN backend ([`TunIo`]), built on `tun-rs` (sync API).
//!
//! What it does: creates a named layer-3 TUN device (`IFF_TUN | IFF_NO_PI`) **in the
//! calling thread's network namespace**, sets its MTU (and optionally its tx queue length),
//! brings it up, and returns one [`TunIo`] per queue (`IFF_MULTI_QUEUE` when more than one
//! queue is asked for; the kernel spreads flows over the queues by flow hash). Every queue
//! descriptor is non-blocking; [`PacketIo::recv_batch`] drains up to a batch of packets
//! and, when none is waiting, blocks in `poll(2)` for at most the timeout or until the
//! shared [`Waker`] is woken.
//!
//! Offload (`TunConfig::offload`, **off by default**): when on, the device is opened with
//! `IFF_VNET_HDR` and `TUNSETOFFLOAD` (TCP TSO, and UDP USO when the kernel supports it,
//! Linux ≥ 6.2). The kernel then hands over GSO super-packets with a `virtio_net_hdr`;
//! `recv_batch` splits them into MTU-sized packets with full checksums (tun-rs's
//! `recv_multiple`), and `send_batch` coalesces consecutive TCP/UDP segments of one flow
//! back into super-packets (tun-rs's GRO) before writing. With offload off, the kernel
//! segments and checksums everything before it reaches the TUN, so every packet read is a
//! complete IP packet of at most MTU bytes and every packet written must carry valid
//! checksums.
//!
//! What it does not do: assign addresses or routes (the lab or the operator does that:
//! see `snatgw-lab`), create the TUN in another namespace (start the process inside the
//! namespace, e.g. with `ip netns exec`), or parse packets.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tun_rs::{DeviceBuilder, ExpandBuffer, GROTable, InterruptEvent, SyncDevice};

use crate::batch::{PacketBatch, Slot, HEADROOM};
use crate::{IoStats, PacketIo};

/// Linux limit on interface names, without the trailing NUL.
pub const IFNAME_MAX: usize = 15;

/// With offload on, a receive is only attempted while at least this many slots are free
/// (or the whole batch, if smaller), so one super-packet's segments fit in the batch.
pub const OFFLOAD_MIN_FREE_SLOTS: usize = 64;

/// Largest packet the kernel can hand over with offload on (64 KiB super-packet).
const MAX_SUPER_PACKET: usize = 65_535;

/// Errors opening or configuring a TUN device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunError {
    /// The configuration is unusable (empty or too long name, zero queues, MTU too small).
    #[error("invalid TUN configuration: {0}")]
    InvalidConfig(String),
    /// Creating the device (first queue) failed: no `/dev/net/tun`, no `CAP_NET_ADMIN`, or
    /// an existing device of that name with other flags.
    #[error("cannot create TUN device {name}: {source}")]
    Open {
        /// Device name asked for.
        name: String,
        /// Underlying error.
        source: io::Error,
    },
    /// Attaching an additional queue failed.
    #[error("cannot open queue {queue} of TUN device {name}: {source}")]
    Queue {
        /// Device name.
        name: String,
        /// Index of the queue that failed.
        queue: usize,
        /// Underlying error.
        source: io::Error,
    },
    /// A setting (non-blocking mode, the wake-up event) could not be applied.
    #[error("cannot configure TUN device {name} ({what}): {source}")]
    Configure {
        /// Device name.
        name: String,
        /// What was being configured.
        what: &'static str,
        /// Underlying error.
        source: io::Error,
    },
}

/// How to create a TUN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    /// Interface name (at most [`IFNAME_MAX`] bytes), e.g. `snat0`.
    pub name: String,
    /// MTU in bytes (default 1500).
    pub mtu: u16,
    /// Number of queues, one per worker (default 1). More than 1 uses `IFF_MULTI_QUEUE`.
    pub queues: usize,
    /// Enable virtio-net offload (GSO/GRO); default off. See the module docs.
    pub offload: bool,
    /// Transmit queue length of the interface, if it should be changed (kernel default 500).
    pub tx_queue_len: Option<u32>,
}

impl TunConfig {
    /// A single-queue, offload-off, MTU-1500 configuration for `name`.
    pub fn new(name: impl Into<String>) -> Self {
        TunConfig {
            name: name.into(),
            mtu: 1500,
            queues: 1,
            offload: false,
            tx_queue_len: None,
        }
    }

    fn validate(&self) -> Result<(), TunError> {
        if self.name.is_empty() || self.name.len() > IFNAME_MAX {
            return Err(TunError::InvalidConfig(format!(
                "name {:?} must be 1..={IFNAME_MAX} bytes",
                self.name
            )));
        }
        if self.name.contains(['/', ' ', '\0']) {
            return Err(TunError::InvalidConfig(format!(
                "name {:?} contains '/', ' ' or NUL",
                self.name
            )));
        }
        if self.queues == 0 {
            return Err(TunError::InvalidConfig("queues must be >= 1".into()));
        }
        if self.mtu < 68 {
            return Err(TunError::InvalidConfig(format!(
                "mtu {} is below the IPv4 minimum of 68",
                self.mtu
            )));
        }
        Ok(())
    }
}

/// Wakes every [`TunIo`] queue of one device out of a blocking `recv_batch`.
///
/// Waking is sticky: once woken, `recv_batch` on those queues no longer blocks (it still
/// returns packets already waiting). Meant for shutdown: set your stop flag, then `wake()`.
#[derive(Clone)]
pub struct Waker(Arc<InterruptEvent>);

impl Waker {
    /// Wakes all queues (idempotent).
    pub fn wake(&self) -> io::Result<()> {
        self.0.trigger()
    }

    /// Whether [`wake`](Self::wake) has been called.
    pub fn is_woken(&self) -> bool {
        self.0.is_trigger()
    }
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker")
            .field("woken", &self.is_woken())
            .finish()
    }
}

/// One queue of a TUN device; implements [`PacketIo`].
///
/// Create all queues at once with [`TunIo::open`] and move each to its own worker thread.
pub struct TunIo {
    dev: SyncDevice,
    name: String,
    queue: usize,
    mtu: u16,
    offload: bool,
    waker: Waker,
    /// Offload only: the raw read buffer (`virtio_net_hdr` + super-packet).
    raw: Vec<u8>,
    /// Offload only: segment sizes returned by the split.
    sizes: Vec<usize>,
    /// Offload only: GRO state for writes.
    gro: Option<Box<GROTable>>,
    stats: IoStats,
}

impl std::fmt::Debug for TunIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunIo")
            .field("name", &self.name)
            .field("queue", &self.queue)
            .field("mtu", &self.mtu)
            .field("offload", &self.offload)
            .field("stats", &self.stats)
            .finish()
    }
}

impl TunIo {
    /// Creates the TUN device described by `config` in the current network namespace,
    /// brings it up, and returns its `config.queues` queues (index 0 first).
    ///
    /// The device disappears when every returned queue has been dropped.
    pub fn open(config: &TunConfig) -> Result<Vec<TunIo>, TunError> {
        config.validate()?;
        let name = config.name.clone();
        let mut builder = DeviceBuilder::new()
            .name(&name)
            .mtu(config.mtu)
            .packet_information(false)
            .multi_queue(config.queues > 1)
            .offload(config.offload)
            .enable(true);
        if let Some(len) = config.tx_queue_len {
            builder = builder.tx_queue_len(len);
        }
        let first = builder.build_sync().map_err(|source| TunError::Open {
            name: name.clone(),
            source,
        })?;
        let offload = first.tcp_gso();
        if config.offload && !offload {
            return Err(TunError::Open {
                name,
                source: io::Error::new(io::ErrorKind::Unsupported, "offload not enabled"),
            });
        }
        let event = InterruptEvent::new().map_err(|source| TunError::Configure {
            name: name.clone(),
            what: "wake-up event",
            source,
        })?;
        let waker = Waker(Arc::new(event));

        let mut devs = Vec::with_capacity(config.queues);
        for queue in 1..config.queues {
            let d = first.try_clone().map_err(|source| TunError::Queue {
                name: name.clone(),
                queue,
                source,
            })?;
            devs.push(d);
        }
        devs.insert(0, first);

        devs.into_iter()
            .enumerate()
            .map(|(queue, dev)| {
                dev.set_nonblocking(true)
                    .map_err(|source| TunError::Configure {
                        name: name.clone(),
                        what: "non-blocking mode",
                        source,
                    })?;
                Ok(TunIo {
                    dev,
                    name: name.clone(),
                    queue,
                    mtu: config.mtu,
                    offload,
                    waker: waker.clone(),
                    raw: if offload {
                        vec![0; tun_rs::VIRTIO_NET_HDR_LEN + MAX_SUPER_PACKET]
                    } else {
                        Vec::new()
                    },
                    sizes: Vec::new(),
                    gro: offload.then(|| Box::new(GROTable::new())),
                    stats: IoStats::default(),
                })
            })
            .collect()
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queue index (0-based).
    pub fn queue(&self) -> usize {
        self.queue
    }

    /// MTU the device was created with.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Whether virtio-net offload is on.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Whether UDP segmentation offload (USO) is on as well (offload on and kernel ≥ 6.2).
    pub fn udp_offload(&self) -> bool {
        self.dev.udp_gso()
    }

    /// The waker shared by all queues of this device.
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// A batch sized for this device: slots of MTU bytes, or 64 KiB with offload on (room
    /// for the GRO coalescing done by `send_batch`).
    pub fn new_batch(&self, capacity: usize) -> PacketBatch {
        let max = if self.offload {
            MAX_SUPER_PACKET
        } else {
            usize::from(self.mtu)
        };
        PacketBatch::new(capacity, max)
    }

    /// Non-blocking reads until the batch is full or nothing is waiting.
    fn drain(&mut self, batch: &mut PacketBatch) -> io::Result<usize> {
        if self.offload {
            self.drain_offload(batch)
        } else {
            self.drain_plain(batch)
        }
    }

    fn drain_plain(&mut self, batch: &mut PacketBatch) -> io::Result<usize> {
        let cap = batch.capacity();
        let mut n = 0;
        while n < cap {
            let slot = &mut batch.slots[n];
            let room = slot.buf.len() - HEADROOM;
            match self.dev.recv(&mut slot.buf[HEADROOM..]) {
                Ok(len) if len == 0 || len > room => {
                    // Empty or truncated (larger than the slot): not a usable packet.
                    self.stats.rx_errors += 1;
                }
                Ok(len) => {
                    slot.end = HEADROOM + len;
                    self.stats.rx_packets += 1;
                    self.stats.rx_bytes += len as u64;
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.stats.rx_errors += 1;
                    if n > 0 {
                        break;
                    }
                    return Err(e);
                }
            }
        }
        batch.set_count(n);
        Ok(n)
    }

    fn drain_offload(&mut self, batch: &mut PacketBatch) -> io::Result<usize> {
        let cap = batch.capacity();
        let min_free = OFFLOAD_MIN_FREE_SLOTS.min(cap);
        if self.sizes.len() < cap {
            self.sizes.resize(cap, 0);
        }
        let mut n = 0;
        while cap - n >= min_free {
            let free = &mut batch.slots[n..];
            for s in free.iter_mut() {
                s.end = s.buf.len();
            }
            let res =
                self.dev
                    .recv_multiple(&mut self.raw, free, &mut self.sizes[..cap - n], HEADROOM);
            match res {
                Ok(k) => {
                    for (slot, &size) in batch.slots[n..n + k].iter_mut().zip(&self.sizes) {
                        slot.end = HEADROOM + size;
                        self.stats.rx_bytes += size as u64;
                    }
                    self.stats.rx_packets += k as u64;
                    if k > 1 {
                        self.stats.rx_super_packets += 1;
                    }
                    n += k;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A syscall error: the descriptor is unusable or the device went away.
                Err(e) if e.raw_os_error().is_some() => {
                    self.stats.rx_errors += 1;
                    if n > 0 {
                        break;
                    }
                    batch.set_count(0);
                    return Err(e);
                }
                // A packet was read but could not be split (malformed header, or more
                // segments than free slots): it is lost; count it and go on.
                Err(_) => self.stats.rx_errors += 1,
            }
        }
        batch.set_count(n);
        Ok(n)
    }

    fn send_plain(&mut self, batch: &mut PacketBatch) -> io::Result<usize> {
        let mut sent = 0;
        for slot in &batch.slots[..batch.count] {
            let len = slot.len();
            if len == 0 {
                continue;
            }
            loop {
                match self.dev.send(&slot.buf[HEADROOM..slot.end]) {
                    Ok(_) => {
                        sent += 1;
                        self.stats.tx_packets += 1;
                        self.stats.tx_bytes += len as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if is_fatal(&e) => {
                        batch.clear();
                        return Err(e);
                    }
                    // EINVAL (malformed packet), EIO (link down), ENOBUFS, EAGAIN: drop it.
                    Err(_) => self.stats.tx_errors += 1,
                }
                break;
            }
        }
        batch.clear();
        Ok(sent)
    }

    fn send_offload(&mut self, batch: &mut PacketBatch) -> io::Result<usize> {
        let n = batch.compact();
        if n == 0 {
            return Ok(0);
        }
        let bytes: u64 = batch.slots[..n].iter().map(|s| s.len() as u64).sum();
        let gro = self.gro.get_or_insert_with(|| Box::new(GROTable::new()));
        let res = self.dev.send_multiple(gro, &mut batch.slots[..n], HEADROOM);
        batch.clear();
        match res {
            Ok(_) => {
                self.stats.tx_packets += n as u64;
                self.stats.tx_bytes += bytes;
                Ok(n)
            }
            Err(e) if is_fatal(&e) => Err(e),
            Err(_) => {
                // tun-rs tries every write and reports the last error; we cannot tell
                // which packets failed, so count one error and report none sent.
                self.stats.tx_errors += 1;
                Ok(0)
            }
        }
    }
}

/// Errors after which the descriptor is unusable.
fn is_fatal(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBADF | libc::EBADFD))
}

impl PacketIo for TunIo {
    fn new_batch(&self, capacity: usize) -> PacketBatch {
        TunIo::new_batch(self, capacity)
    }

    fn recv_batch(&mut self, batch: &mut PacketBatch, timeout: Duration) -> io::Result<usize> {
        batch.clear();
        let n = self.drain(batch)?;
        if n > 0 {
            return Ok(n);
        }
        match self
            .dev
            .wait_readable_intr_timeout(&self.waker.0, Some(timeout))
        {
            Ok(()) => self.drain(batch),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    fn send_batch(&mut self, batch: &mut PacketBatch) -> io::Result<usize> {
        if self.offload {
            self.send_offload(batch)
        } else {
            self.send_plain(batch)
        }
    }

    fn stats(&self) -> IoStats {
        self.stats
    }
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.end]
    }
}

impl AsMut<[u8]> for Slot {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.end]
    }
}

impl ExpandBuffer for Slot {
    fn buf_capacity(&self) -> usize {
        self.buf.len()
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        if new_len > self.buf.len() {
            self.buf.resize(new_len, value);
        }
        if new_len > self.end {
            self.buf[self.end..new_len].fill(value);
        }
        self.end = new_len;
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let new_end = self.end + src.len();
        if new_end > self.buf.len() {
            self.buf.resize(new_end, 0);
        }
        self.buf[self.end..new_end].copy_from_slice(src);
        self.end = new_end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        assert!(TunConfig::new("snat0").validate().is_ok());
        assert!(TunConfig::new("").validate().is_err());
        assert!(TunConfig::new("a-very-long-name0").validate().is_err());
        assert!(TunConfig::new("a/b").validate().is_err());
        let mut c = TunConfig::new("snat0");
        c.queues = 0;
        assert!(c.validate().is_err());
        c.queues = 2;
        c.mtu = 60;
        assert!(c.validate().is_err());
    }

    #[test]
    fn slot_expand_buffer() {
        let mut s = Slot {
            buf: vec![0; HEADROOM + 4],
            end: HEADROOM,
        };
        s.buf_extend_from_slice(&[1, 2, 3]);
        assert_eq!(s.len(), 3);
        s.buf_extend_from_slice(&[4, 5, 6]); // grows past the initial buffer
        assert_eq!(&s.as_ref()[HEADROOM..], &[1, 2, 3, 4, 5, 6]);
        s.buf_resize(HEADROOM + 8, 9);
        assert_eq!(&s.as_ref()[HEADROOM..], &[1, 2, 3, 4, 5, 6, 9, 9]);
        s.buf_resize(HEADROOM + 2, 0);
        assert_eq!(&s.as_ref()[HEADROOM..], &[1, 2]);
        assert!(s.buf_capacity() >= HEADROOM + 8);
    }
}
