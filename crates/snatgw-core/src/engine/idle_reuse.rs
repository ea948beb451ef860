//! The symptom of missing keepalives (SPEC R3.4, R7.1): flows the engine removed by idle
//! timeout on which the instance later sent again.
//!
//! When a flow ends by idle timeout, its private 5-tuple is remembered in a small bounded set
//! per protocol ([`IDLE_RECENT_CAP`] entries each, oldest forgotten first). An outbound packet
//! that misses the flow table looks there, and only there:
//! - a TCP segment that is not a SYN (dropped as `tcp_not_syn`, R3.1): the application still
//!   held the connection the gateway forgot — it breaks;
//! - a UDP datagram (it starts a new flow, R3.5, maybe on another public port: legitimate,
//!   but the peer sees a new source).
//!
//! Each hit counts once in the sender's [`super::InstanceStats::idle_ended_then_sent`] and
//! forgets the entry (a TCP segment's retransmissions do not count again). A TCP SYN on a
//! remembered 5-tuple is a new connection: the entry is forgotten uncounted, so is a flow's
//! that ended by FIN or RST (never remembered). A UDP flow is remembered only if it carried
//! packets in more than one second (an association, not a single request and its answer):
//! clients that pick a random source port per DNS query would otherwise match old queries'
//! entries by chance. TCP needs no such filter: a non-SYN segment on a forgotten 5-tuple is
//! never a new connection.
//!
//! Cost: nothing on a packet that finds its flow (the hot path is unchanged); one hash lookup
//! per new flow and per `tcp_not_syn` drop while the set is not empty; one insert per flow
//! ending by idle timeout. Memory is bounded by [`IDLE_RECENT_CAP`] entries per protocol,
//! allocated as they come.

use std::collections::VecDeque;

use super::flows::Flow;
use super::stats::stats_bucket;
use super::Engine;
use crate::packet::{proto, Packet};

/// Idle-ended 5-tuples remembered per protocol (TCP and UDP each); the oldest is forgotten
/// first. A busy UDP mix cannot push TCP evidence out: the two sets are apart.
pub const IDLE_RECENT_CAP: usize = 4096;

/// A private 5-tuple without the protocol (each protocol has its own set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
}

/// One protocol's recently idle-ended 5-tuples: a map for lookups and a ring for the age
/// order. Each remembered key has one live ring entry (same sequence number); ring entries
/// of keys taken or remembered again since are stale and skipped when they fall out.
#[derive(Default)]
pub(super) struct RecentSet {
    map: hashbrown::HashMap<Key, u64>,
    ring: VecDeque<(Key, u64)>,
    seq: u64,
}

impl RecentSet {
    fn remember(&mut self, k: Key) {
        if self.ring.len() >= IDLE_RECENT_CAP {
            if let Some((old, s)) = self.ring.pop_front() {
                if self.map.get(&old) == Some(&s) {
                    self.map.remove(&old);
                }
            }
        }
        self.seq += 1;
        self.map.insert(k, self.seq);
        self.ring.push_back((k, self.seq));
    }

    /// Forgets `k`; returns whether it was remembered.
    fn take(&mut self, k: &Key) -> bool {
        self.map.remove(k).is_some()
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn ring_len(&self) -> usize {
        self.ring.len()
    }
}

/// The two sets: `[tcp, udp]`.
#[derive(Default)]
pub(super) struct IdleRecent {
    pub(super) sets: [RecentSet; 2],
}

fn set_index(p: u8) -> Option<usize> {
    match p {
        proto::TCP => Some(0),
        proto::UDP => Some(1),
        _ => None,
    }
}

fn key_of(f: &Flow) -> Key {
    Key {
        src: f.src,
        dst: f.dst,
        sport: f.sport,
        dport: f.dport,
    }
}

impl Engine {
    /// A flow ended by idle timeout (from `remove_flow`): remembers its 5-tuple (a UDP flow
    /// only if it carried packets in more than one second, see the module documentation).
    #[inline]
    pub(super) fn idle_recent_remember(&mut self, f: &Flow) {
        let Some(s) = set_index(f.proto) else {
            return;
        };
        // `born` is the low 16 bits of the first second: a flow idle-ended within 18 h of
        // its start (every UDP flow whose last packet came in its first second) compares
        // exactly; an older one's wrap only makes it remembered.
        if f.proto == proto::UDP && f.last_seen as u16 == f.born {
            return;
        }
        self.idle_recent.sets[s].remember(key_of(f));
    }

    /// A new flow (from `insert_flow`): a UDP flow on a remembered 5-tuple counts as sent
    /// after its idle end; a TCP SYN only forgets the old entry (a new connection).
    #[inline]
    pub(super) fn idle_recent_new_flow(&mut self, f: &Flow) {
        let Some(s) = set_index(f.proto) else {
            return;
        };
        let set = &mut self.idle_recent.sets[s];
        if set.map.is_empty() || !set.take(&key_of(f)) {
            return;
        }
        if f.proto == proto::UDP {
            self.count_idle_then_sent(f.slot(), f.proto);
        }
    }

    /// An outbound TCP segment that is not a SYN and matches no flow (R3.1, from
    /// `outbound_new`, before it is dropped as `tcp_not_syn`): counts once if the flow of its
    /// 5-tuple ended by idle timeout.
    pub(super) fn idle_recent_not_syn(&mut self, slot: u32, p: &Packet) {
        let set = &mut self.idle_recent.sets[0];
        if set.map.is_empty() {
            return;
        }
        let k = Key {
            src: p.src,
            dst: p.dst,
            sport: p.src_port,
            dport: p.dst_port,
        };
        if set.take(&k) {
            self.count_idle_then_sent(slot, p.proto);
        }
    }

    fn count_idle_then_sent(&mut self, slot: u32, p: u8) {
        if let Some(i) = self.insts[slot as usize].as_mut() {
            i.stats[stats_bucket(p)].idle_ended_then_sent += 1;
        }
    }

    /// Idle-ended 5-tuples remembered now, `[tcp, udp]` (each at most [`IDLE_RECENT_CAP`]).
    pub fn idle_recent_len(&self) -> [usize; 2] {
        [
            self.idle_recent.sets[0].len(),
            self.idle_recent.sets[1].len(),
        ]
    }
}
