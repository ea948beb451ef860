//! [`PacketBatch`]: a fixed set of reusable packet buffers passed to and from a [`PacketIo`].
//!
//! What it does: owns `capacity` slots, each with [`HEADROOM`] spare bytes in front of the
//! packet (room for a `virtio_net_hdr` when TUN offload is on, without moving the packet)
//! and room for at least `max_packet` bytes of packet. Slots are allocated once, when the
//! batch is created; receiving, rewriting, dropping and sending packets never allocates.
//! (The one exception: with TUN offload on, the kernel-bound GRO coalescing may grow the
//! first slot of a coalesced run once; the grown buffer is then kept and reused.)
//!
//! What it does not do: parse packets, or keep packets across `recv_batch` calls (a
//! receive starts by clearing the batch).
//!
//! [`PacketIo`]: crate::PacketIo

/// Spare bytes kept in front of every packet in a slot (at least `VIRTIO_NET_HDR_LEN`,
/// rounded up so the IP header starts 16-byte aligned within the buffer).
pub const HEADROOM: usize = 16;

/// One reusable packet buffer: `buf[HEADROOM..end]` is the packet.
///
/// Implements `tun_rs::ExpandBuffer` (in `tun.rs`) so the TUN offload path can hand slots
/// directly to tun-rs's GSO split / GRO coalesce code.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    /// Backing storage; `buf.len()` is the usable size (never shrinks).
    pub(crate) buf: Vec<u8>,
    /// End of the packet within `buf` (`HEADROOM` = empty packet).
    pub(crate) end: usize,
}

impl Slot {
    fn new(max_packet: usize) -> Self {
        Slot {
            buf: vec![0; HEADROOM + max_packet],
            end: HEADROOM,
        }
    }

    /// Packet length in bytes.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.end - HEADROOM
    }
}

/// A batch of up to [`capacity`](PacketBatch::capacity) packets in reusable buffers.
///
/// Packets are raw IPv4 (or IPv6) packets without a link-layer header. The batch holds
/// [`len`](PacketBatch::len) packets at indices `0..len`. A packet may be rewritten in place
/// ([`packet_mut`](PacketBatch::packet_mut)), shortened or lengthened up to
/// [`max_packet`](PacketBatch::max_packet) ([`set_packet_len`](PacketBatch::set_packet_len)),
/// or dropped ([`drop_packet`](PacketBatch::drop_packet): it becomes empty and
/// `send_batch` skips it), so a dataplane can receive a batch, translate it in place and
/// send the same batch back without copying.
#[derive(Debug, Clone)]
pub struct PacketBatch {
    pub(crate) slots: Vec<Slot>,
    pub(crate) count: usize,
    max_packet: usize,
}

impl PacketBatch {
    /// Creates a batch of `capacity` slots, each able to hold a packet of `max_packet` bytes.
    ///
    /// Use a `max_packet` of at least the device MTU (the TUN backend reads up to
    /// `max_packet` bytes per packet and truncates nothing: a larger packet is an error).
    ///
    /// # Panics
    /// If `capacity` or `max_packet` is 0.
    pub fn new(capacity: usize, max_packet: usize) -> Self {
        assert!(capacity > 0, "PacketBatch capacity must be > 0");
        assert!(max_packet > 0, "PacketBatch max_packet must be > 0");
        PacketBatch {
            slots: (0..capacity).map(|_| Slot::new(max_packet)).collect(),
            count: 0,
            max_packet,
        }
    }

    /// Number of slots.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Largest packet a slot is guaranteed to hold.
    #[inline]
    pub fn max_packet(&self) -> usize {
        self.max_packet
    }

    /// Number of packets currently in the batch (dropped ones included until sent).
    #[inline]
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch holds no packet.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether every slot is in use.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.count == self.slots.len()
    }

    /// Empties the batch (buffers are kept).
    #[inline]
    pub fn clear(&mut self) {
        self.count = 0;
    }

    /// The packet at `index`.
    ///
    /// # Panics
    /// If `index >= self.len()`.
    #[inline]
    pub fn packet(&self, index: usize) -> &[u8] {
        assert!(index < self.count, "packet index out of range");
        let s = &self.slots[index];
        &s.buf[HEADROOM..s.end]
    }

    /// The packet at `index`, for in-place rewriting.
    ///
    /// # Panics
    /// If `index >= self.len()`.
    #[inline]
    pub fn packet_mut(&mut self, index: usize) -> &mut [u8] {
        assert!(index < self.count, "packet index out of range");
        let s = &mut self.slots[index];
        &mut s.buf[HEADROOM..s.end]
    }

    /// The whole buffer of slot `index` (at least `max_packet` bytes), for building a packet
    /// larger than the current one; follow with [`set_packet_len`](Self::set_packet_len).
    ///
    /// # Panics
    /// If `index >= self.len()`.
    #[inline]
    pub fn slot_mut(&mut self, index: usize) -> &mut [u8] {
        assert!(index < self.count, "packet index out of range");
        &mut self.slots[index].buf[HEADROOM..]
    }

    /// Sets the length of the packet at `index` (0 drops it).
    ///
    /// # Panics
    /// If `index >= self.len()` or `len` exceeds the slot's buffer.
    #[inline]
    pub fn set_packet_len(&mut self, index: usize, len: usize) {
        assert!(index < self.count, "packet index out of range");
        let s = &mut self.slots[index];
        assert!(HEADROOM + len <= s.buf.len(), "packet longer than its slot");
        s.end = HEADROOM + len;
    }

    /// Drops the packet at `index`: it stays in place but is empty, and `send_batch` skips it.
    ///
    /// # Panics
    /// If `index >= self.len()`.
    #[inline]
    pub fn drop_packet(&mut self, index: usize) {
        self.set_packet_len(index, 0);
    }

    /// Appends a copy of `packet`; returns `false` (and copies nothing) if the batch is full
    /// or `packet` is longer than [`max_packet`](Self::max_packet).
    pub fn push(&mut self, packet: &[u8]) -> bool {
        if self.count == self.slots.len() || packet.len() > self.max_packet {
            return false;
        }
        let s = &mut self.slots[self.count];
        s.buf[HEADROOM..HEADROOM + packet.len()].copy_from_slice(packet);
        s.end = HEADROOM + packet.len();
        self.count += 1;
        true
    }

    /// Iterates over the packets (dropped ones appear as empty slices).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.slots[..self.count]
            .iter()
            .map(|s| &s.buf[HEADROOM..s.end])
    }

    /// Iterates mutably over the packets (dropped ones appear as empty slices).
    pub fn iter_mut(&mut self) -> impl ExactSizeIterator<Item = &mut [u8]> + '_ {
        self.slots[..self.count]
            .iter_mut()
            .map(|s| &mut s.buf[HEADROOM..s.end])
    }

    /// Moves non-empty packets to the front (keeping their order) and drops the empty ones;
    /// returns the new length. Swaps slot handles, never copies packet bytes.
    pub fn compact(&mut self) -> usize {
        let mut w = 0;
        for r in 0..self.count {
            if self.slots[r].len() > 0 {
                if r != w {
                    self.slots.swap(r, w);
                }
                w += 1;
            }
        }
        self.count = w;
        w
    }

    /// Marks slots `0..n` as received packets, with lengths set by the caller afterwards.
    #[inline]
    pub(crate) fn set_count(&mut self, n: usize) {
        debug_assert!(n <= self.slots.len());
        self.count = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_rewrite_drop_compact() {
        let mut b = PacketBatch::new(4, 100);
        assert!(b.is_empty());
        assert!(b.push(&[1, 2, 3]));
        assert!(b.push(&[4, 5]));
        assert!(b.push(&[6]));
        assert!(!b.push(&[0; 101]), "too long");
        assert_eq!(b.len(), 3);
        b.packet_mut(0)[0] = 9;
        assert_eq!(b.packet(0), &[9, 2, 3]);
        b.drop_packet(1);
        assert_eq!(b.packet(1), &[] as &[u8]);
        assert_eq!(b.compact(), 2);
        assert_eq!(
            b.iter().collect::<Vec<_>>(),
            vec![&[9u8, 2, 3][..], &[6][..]]
        );
        b.slot_mut(1)[..4].copy_from_slice(&[7, 7, 7, 7]);
        b.set_packet_len(1, 4);
        assert_eq!(b.packet(1), &[7, 7, 7, 7]);
        assert!(b.push(&[1]));
        assert!(b.push(&[2]));
        assert!(b.is_full());
        assert!(!b.push(&[3]));
        b.clear();
        assert_eq!(b.len(), 0);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn index_past_len_panics() {
        let b = PacketBatch::new(2, 10);
        let _ = b.packet(0);
    }
}
