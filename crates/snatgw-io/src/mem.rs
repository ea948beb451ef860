//! [`MemIo`]: an in-memory [`PacketIo`] for tests of the dataplane without privileges.
//!
//! What it does: packets injected through a [`MemIoHandle`] are returned by `recv_batch`
//! (blocking on a condition variable up to the timeout); packets sent with `send_batch`
//! are collected and can be taken or awaited through the handle.
//!
//! What it does not do: model a kernel (no routing, checksum checks, MTU or drops), or aim
//! for speed (it allocates per packet).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{IoStats, PacketBatch, PacketIo};

#[derive(Default)]
struct State {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
    woken: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when packets are injected or the backend is woken.
    rx_cv: Condvar,
    /// Signalled when packets are sent.
    tx_cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// In-memory packet I/O; see the module docs. Create with [`MemIo::new`].
pub struct MemIo {
    shared: Arc<Shared>,
    stats: IoStats,
}

/// The test's side of a [`MemIo`]: inject packets, collect what was sent. Cloneable.
#[derive(Clone)]
pub struct MemIoHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemIo").field("stats", &self.stats).finish()
    }
}

impl std::fmt::Debug for MemIoHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemIoHandle").finish_non_exhaustive()
    }
}

impl MemIo {
    /// A new backend and its handle.
    pub fn new() -> (MemIo, MemIoHandle) {
        let shared = Arc::new(Shared::default());
        (
            MemIo {
                shared: shared.clone(),
                stats: IoStats::default(),
            },
            MemIoHandle { shared },
        )
    }
}

impl MemIoHandle {
    /// Queues `packet` to be returned by a later `recv_batch`.
    pub fn inject(&self, packet: &[u8]) {
        self.shared.lock().rx.push_back(packet.to_vec());
        self.shared.rx_cv.notify_all();
    }

    /// Takes every packet sent so far.
    pub fn take_sent(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.shared.lock().tx)
    }

    /// Waits until at least `n` packets have been sent (or `timeout` passes), then takes
    /// every packet sent so far.
    pub fn wait_sent(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while st.tx.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .shared
                .tx_cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        std::mem::take(&mut st.tx)
    }

    /// Makes `recv_batch` stop blocking (sticky), like `Waker::wake` for TUN.
    pub fn wake(&self) {
        self.shared.lock().woken = true;
        self.shared.rx_cv.notify_all();
    }
}

impl PacketIo for MemIo {
    fn recv_batch(&mut self, batch: &mut PacketBatch, timeout: Duration) -> io::Result<usize> {
        batch.clear();
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while st.rx.is_empty() && !st.woken {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .shared
                .rx_cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        while !batch.is_full() {
            let Some(pkt) = st.rx.pop_front() else { break };
            if batch.push(&pkt) {
                self.stats.rx_packets += 1;
                self.stats.rx_bytes += pkt.len() as u64;
            } else {
                self.stats.rx_errors += 1; // longer than max_packet
            }
        }
        Ok(batch.len())
    }

    fn send_batch(&mut self, batch: &mut PacketBatch) -> io::Result<usize> {
        let mut sent = 0;
        {
            let mut st = self.shared.lock();
            for pkt in batch.iter().filter(|p| !p.is_empty()) {
                st.tx.push(pkt.to_vec());
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += pkt.len() as u64;
                sent += 1;
            }
        }
        self.shared.tx_cv.notify_all();
        batch.clear();
        Ok(sent)
    }

    fn stats(&self) -> IoStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inject_recv_send_collect() {
        let (mut io, h) = MemIo::new();
        let mut b = PacketBatch::new(2, 64);
        assert_eq!(io.recv_batch(&mut b, Duration::from_millis(5)).unwrap(), 0);
        h.inject(&[1, 2]);
        h.inject(&[3]);
        h.inject(&[4]);
        assert_eq!(io.recv_batch(&mut b, Duration::ZERO).unwrap(), 2);
        b.packet_mut(0)[0] = 7;
        b.drop_packet(1);
        assert_eq!(io.send_batch(&mut b).unwrap(), 1);
        assert!(b.is_empty());
        assert_eq!(h.take_sent(), vec![vec![7, 2]]);
        assert_eq!(io.recv_batch(&mut b, Duration::ZERO).unwrap(), 1);
        assert_eq!(b.packet(0), &[4]);
        let s = io.stats();
        assert_eq!((s.rx_packets, s.tx_packets, s.tx_bytes), (3, 1, 2));
    }

    #[test]
    fn wake_unblocks_and_wait_sent() {
        let (mut io, h) = MemIo::new();
        let h2 = h.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            h2.wake();
        });
        let mut b = PacketBatch::new(4, 64);
        let start = Instant::now();
        assert_eq!(io.recv_batch(&mut b, Duration::from_secs(10)).unwrap(), 0);
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
        assert!(b.push(&[9]));
        io.send_batch(&mut b).unwrap();
        assert_eq!(h.wait_sent(1, Duration::from_secs(1)), vec![vec![9]]);
    }
}
