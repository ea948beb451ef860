//! Port reserves: the owner's side of "ports of flows whose state did not arrive are held"
//! (SPEC R10.4, R3.2; issue #19).
//!
//! A fleet node streams its flows to each owned instance's runner-up (`snatgw_fleet::replica`),
//! but the last records before a `kill -9` (or a host crash, or a stalled link) can be lost.
//! The runner-up cannot know those flows, and a remote endpoint of such a flow that stays
//! silent through the takeover window (`Engine::hold_after_takeover`) is not detected: its
//! public port could go to a new flow toward that same endpoint, which would then see a
//! reused 5-tuple. Port reserves close that gap:
//!
//! - **The owner allocates only from acknowledged reserves.** For each instance it owns that
//!   has a replication target, [`ReserveKeeper::step`] fences the engine
//!   (`Engine::set_port_fence`): new flows (TCP and UDP) may take only ports of a *reserve*,
//!   a window of [`reserve_size`] ports of the instance's block that the target has
//!   acknowledged (`Replicator::reserve` / `is_acked`: the reserve was queued after the
//!   instance's snapshot on the same connection, so the ack also means the target has the
//!   snapshot and every record sent before the reserve).
//! - **Rotation.** When half a reserve's size of new flows has been opened since it became
//!   usable, or a new flow was refused by the fence (`DropReason::PortReserve`), the next
//!   window of the block is sent as a new reserve; *at that moment* the older of the two
//!   usable reserves stops being usable. The new one becomes usable when it is acknowledged.
//!   So at any instant the owner allocates from at most the two newest reserves it has sent,
//!   and only from acknowledged ones.
//! - **The taker holds the last two reserves it received** (`ReplicaStore::take_reserves`,
//!   then `Engine::hold_ports` for the FIN timeout, in `fleet::import_taken`). A flow whose
//!   record did not arrive was opened on a port of a reserve the taker acknowledged, and after
//!   the taker's newest received reserve R_n was sent the owner used only R_{n-1} and R_n
//!   (R_{n+1} was never acknowledged): every such port is held, against every destination.
//! - **Connection and target changes.** An acknowledgement counts on the connection it came
//!   on. When that connection is gone (a reconnect, an overflow of the replication buffer, a
//!   dead runner-up) or the instance has a new runner-up, the owner keeps allocating from the
//!   newest acknowledged reserve only, sends it again on the current connection as soon as
//!   the instance's snapshot is queued there, and rotates no more until that is acknowledged:
//!   new flows are limited to that reserve (refused as `port_reserve`, never as exhaustion,
//!   once it has no free port for their destination) for at most the time the member loop
//!   takes to name a new runner-up (the lease TTL). Any later reserve a target received then
//!   repeats those ports, so its last two still contain every port in use since.
//! - **Gained instances** (a takeover, a move, a first join) are fenced to no port at all
//!   before the admission lets their flows open ([`ReserveKeeper::fence_gained`]), until their
//!   runner-up acknowledges a first reserve (after the instance's snapshot: tens of ms), or
//!   the next step finds they have no runner-up.
//! - **A runner-up that takes nothing.** An instance with no usable reserve whose runner-up
//!   has not taken one (queued after the snapshot) within [`GIVE_UP_AFTER`] (2 s) is not
//!   fenced any more, until a reserve is queued again: that runner-up (unreachable since the
//!   instance came here, or a node of an older build whose replication refuses this one, in a
//!   rolling upgrade) has neither the instance's snapshot nor a reserve, so it could keep
//!   none of its flows if this node died, and holding them back would protect nothing.
//!
//! **Cost.** Nothing without `--fleet-link`, nothing for an instance with no runner-up (a
//! fleet of one live node), nothing on established flows. A fenced instance's new flow pays
//! the fence's bit mask in the allocator. The keeper runs every [`STEP_EVERY`] on the
//! replication thread and takes the gateway lock for one pass over the owned instances.
//!
//! **What it does not do.** It does not hold anything itself (the taker does, at import), and
//! it does not cover a planned move (a node joined): there the old owner stops opening flows
//! for the instance before it exports it to the new owner, so the hand-over is complete when
//! its snapshot arrives; `fleet::hand_over` waits for that acknowledgement (two empty
//! reserves after the snapshot, up to 500 ms) and logs a hand-over that was not confirmed.
//! What a runner-up has not received at all is not covered: a fleet of one live node has no
//! runner-up and no reserves, and a new runner-up that has not yet acknowledged the re-sent
//! reserve (it may not have the snapshot either) knows neither the flows nor their ports if
//! the owner dies in that window; the takeover windows still catch the peers that talk. A new flow refused by the fence is not a port exhaustion: no
//! exhaustion event, not a failed connection in the SNAT metrics; the drop is counted as
//! `port_reserve`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use snatgw_core::Engine;
use snatgw_fleet::{PortReserve, ReserveTicket};

/// How often the keeper looks at the owned instances (acknowledgements, rotation).
pub const STEP_EVERY: Duration = Duration::from_millis(10);

/// How long an instance with no usable reserve waits for its runner-up to take one (the
/// reserve queued after the snapshot) before the keeper stops holding its new flows back.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(2);

/// Ports per reserve for a block of `block` ports: an eighth of the block, at least 4 (or the
/// whole block when it is smaller) and at most 128. A takeover holds two reserves: at most a
/// quarter of the block for the FIN timeout.
pub fn reserve_size(block: usize) -> usize {
    (block / 8).clamp(4, 128).min(block)
}

/// Where reserves go: the replication (`snatgw_fleet::Replicator`), or a model in tests.
pub trait ReserveLink {
    /// The instance's replication target now, if it has one.
    fn target(&self, instance: u32) -> Option<SocketAddr>;
    /// Queues a reserve (see `Replicator::reserve`).
    fn reserve(&self, r: &PortReserve) -> Option<ReserveTicket>;
    /// Whether it was acknowledged on the connection it was queued on (`Replicator::is_acked`).
    fn is_acked(&self, t: &ReserveTicket) -> bool;
    /// Whether it can no longer be acknowledged (`Replicator::is_lost`).
    fn is_lost(&self, t: &ReserveTicket) -> bool;
}

impl ReserveLink for snatgw_fleet::Replicator {
    fn target(&self, instance: u32) -> Option<SocketAddr> {
        snatgw_fleet::Replicator::target(self, instance)
    }
    fn reserve(&self, r: &PortReserve) -> Option<ReserveTicket> {
        snatgw_fleet::Replicator::reserve(self, r)
    }
    fn is_acked(&self, t: &ReserveTicket) -> bool {
        snatgw_fleet::Replicator::is_acked(self, t)
    }
    fn is_lost(&self, t: &ReserveTicket) -> bool {
        snatgw_fleet::Replicator::is_lost(self, t)
    }
}

#[derive(Debug, Clone)]
struct Sent {
    /// None: acknowledged by an earlier connection or target, to be sent again on the
    /// current one before any new reserve.
    ticket: Option<ReserveTicket>,
    ports: Vec<u16>,
}

#[derive(Debug)]
struct Inst {
    target: SocketAddr,
    public: u32,
    /// Acknowledged reserves the owner may allocate from, oldest first (at most two).
    usable: Vec<Sent>,
    /// The newest reserve, sent and not yet acknowledged.
    pending: Option<Sent>,
    /// Where the next window starts in the block's port list.
    cursor: usize,
    /// The instance's allocation count when the newest usable reserve became usable.
    allocs_at: u64,
    /// The fence's refusal count at the last step.
    refusals_at: u64,
    /// The ports the engine's fence allows now (to skip unchanged updates).
    fence: Vec<u16>,
    /// Since when the instance has had no usable reserve and none queued.
    waiting_since: Option<Instant>,
}

/// What one step did (for logs and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Reserves sent.
    pub sent: u32,
    /// Reserves that became usable (acknowledged).
    pub acked: u32,
    /// Instances whose connection or target changed (new runner-up, reconnect, overflow).
    pub resync: u32,
}

/// Counters for logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeeperStats {
    /// Reserves sent since the start.
    pub sent: u64,
    /// Reserves acknowledged since the start.
    pub acked: u64,
    /// Connection or target changes (new runner-up, reconnect, overflow).
    pub resyncs: u64,
    /// Instances fenced now.
    pub fenced: usize,
    /// Fenced instances with no usable reserve now: their new flows wait.
    pub waiting: usize,
    /// Instances not fenced because their runner-up took no reserve within
    /// [`GIVE_UP_AFTER`] (it is unreachable, or speaks an older protocol).
    pub given_up: usize,
}

/// The owner's reserves per instance (see the module documentation).
#[derive(Debug, Default)]
pub struct ReserveKeeper {
    insts: HashMap<u32, Inst>,
    /// Instances whose engine fence is set.
    fenced: HashSet<u32>,
    stats: KeeperStats,
}

impl ReserveKeeper {
    /// An empty keeper.
    pub fn new() -> ReserveKeeper {
        ReserveKeeper::default()
    }

    /// Counters.
    pub fn stats(&self) -> KeeperStats {
        KeeperStats {
            fenced: self.fenced.len(),
            waiting: self
                .fenced
                .iter()
                .filter(|ip| self.insts.get(ip).is_none_or(|i| i.usable.is_empty()))
                .count(),
            given_up: self
                .insts
                .iter()
                .filter(|(ip, i)| !self.fenced.contains(ip) && i.usable.is_empty())
                .count(),
            ..self.stats
        }
    }

    /// The ports the engine's fence allows for `instance` now (None: not fenced).
    #[cfg(test)]
    pub fn allowed(&self, instance: u32) -> Option<&[u16]> {
        if !self.fenced.contains(&instance) {
            return None;
        }
        Some(self.insts.get(&instance).map_or(&[][..], |i| &i.fence[..]))
    }

    /// Fences instances this node just gained (a takeover, a move, a first join) to no port at
    /// all, before the data path may admit them: until their new runner-up has the snapshot
    /// and acknowledges a reserve, a new flow of theirs would be one the next taker cannot
    /// know. The next [`ReserveKeeper::step`] lifts the fence of an instance with no runner-up
    /// (a fleet of one live node).
    pub fn fence_gained(&mut self, engine: &mut Engine, gained: &HashSet<u32>) {
        for &ip in gained {
            let Some(public) = engine.port_fence_stats(ip).map(|s| s.public) else {
                continue;
            };
            if engine.set_port_fence(ip, Some((public, &[]))) {
                self.fenced.insert(ip);
                // Whatever was acknowledged before (an instance that comes back) starts over.
                self.insts.remove(&ip);
            }
        }
    }

    /// One pass over `owned` (the private addresses of the instances this node holds grants
    /// for), under the gateway lock: acknowledgements make reserves usable, used-up reserves
    /// rotate, instances with a new target start over, and the engine's fences follow.
    /// Instances not owned, or without a target, are not fenced.
    pub fn step(
        &mut self,
        engine: &mut Engine,
        link: &dyn ReserveLink,
        owned: &HashSet<u32>,
        now: Instant,
    ) -> StepReport {
        let mut rep = StepReport::default();
        let mut keep: HashSet<u32> = HashSet::new();
        for &ip in owned {
            let Some(target) = link.target(ip) else {
                continue;
            };
            let Some(stats) = engine.port_fence_stats(ip) else {
                continue;
            };
            let (public, block) = (stats.public, stats.block_ports as usize);
            if block == 0 {
                continue;
            }
            keep.insert(ip);
            let size = reserve_size(block);
            let st = self.insts.entry(ip).or_insert_with(|| Inst {
                target,
                public,
                usable: Vec::new(),
                pending: None,
                cursor: 0,
                allocs_at: stats.allocations,
                refusals_at: stats.refusals,
                fence: Vec::new(),
                waiting_since: None,
            });
            if st.public != public {
                // Other ports altogether: start over (nothing usable until acknowledged).
                st.public = public;
                st.usable.clear();
                st.pending = None;
            }
            // A new target, or the connection the reserves were acknowledged on is gone
            // (reconnect, overflow, dead runner-up): keep allocating from the newest reserve
            // only, send it again on the current connection once the instance's snapshot is
            // there, and rotate no more until that is acknowledged. Until then the new flows
            // are limited to that reserve (refused as `port_reserve` once it has no free port
            // for their destination).
            let stale = st.target != target
                || st
                    .usable
                    .iter()
                    .any(|u| u.ticket.is_some_and(|t| !link.is_acked(&t)))
                || st
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.ticket.is_some_and(|t| link.is_lost(&t)));
            if stale {
                rep.resync += 1;
                self.stats.resyncs += 1;
                st.target = target;
                st.pending = None;
                if let Some(newest) = st.usable.pop() {
                    st.usable.clear();
                    st.usable.push(Sent {
                        ticket: None,
                        ports: newest.ports,
                    });
                }
            }
            if let Some(t) = st.pending.as_ref().and_then(|p| p.ticket) {
                if link.is_acked(&t) {
                    let p = st.pending.take().expect("pending checked");
                    if st
                        .usable
                        .last()
                        .is_some_and(|u| u.ticket.is_none() && u.ports == p.ports)
                    {
                        // The newest, sent again and acknowledged on this connection.
                        st.usable.clear();
                    } else {
                        st.allocs_at = stats.allocations;
                    }
                    st.usable.push(p);
                    while st.usable.len() > 2 {
                        st.usable.remove(0);
                    }
                    // Refusals before it was usable say nothing about it.
                    st.refusals_at = stats.refusals;
                    rep.acked += 1;
                    self.stats.acked += 1;
                }
            }
            let refused = stats.refusals > st.refusals_at;
            st.refusals_at = stats.refusals;
            let half_used =
                stats.allocations.saturating_sub(st.allocs_at) >= (size as u64 / 2).max(1);
            if st.pending.is_none() {
                // The newest reserve again on a new connection or target, else the next
                // window of the block when this one is half used or refused a flow.
                let resend = st
                    .usable
                    .last()
                    .filter(|u| u.ticket.is_none())
                    .map(|u| u.ports.clone());
                let rotate = resend.is_none() && (st.usable.is_empty() || half_used || refused);
                let start = st.cursor % block;
                let ports = match resend {
                    Some(again) => Some(again),
                    None if rotate => engine
                        .pat_ports(ip)
                        .map(|(_, all)| (0..size).map(|k| all[(start + k) % all.len()]).collect()),
                    None => None,
                };
                let sent = ports.and_then(|ports| {
                    let r = PortReserve {
                        instance: ip,
                        public,
                        ports,
                    };
                    link.reserve(&r).map(|t| Sent {
                        ticket: Some(t),
                        ports: r.ports,
                    })
                });
                if let Some(sent) = sent {
                    if rotate {
                        st.cursor = (start + size) % block;
                        // From now on at most the newest usable reserve and this one: the
                        // taker holds the last two it received.
                        while st.usable.len() > 1 {
                            st.usable.remove(0);
                        }
                    }
                    st.pending = Some(sent);
                    rep.sent += 1;
                    self.stats.sent += 1;
                }
            }
            // A runner-up that takes no reserve at all (unreachable since the instance came
            // here, or an older protocol that refuses this one) has neither the snapshot nor a
            // reserve: it could not keep this instance's flows if this node died, so holding
            // the new flows back for it protects nothing. After GIVE_UP_AFTER they go
            // unfenced, until a reserve is queued again (then fenced to what is acknowledged).
            if st.usable.is_empty() && st.pending.is_none() {
                let since = *st.waiting_since.get_or_insert(now);
                if now.duration_since(since) >= GIVE_UP_AFTER {
                    if self.fenced.remove(&ip) {
                        engine.set_port_fence(ip, None);
                        st.fence.clear();
                    }
                    continue;
                }
            } else {
                st.waiting_since = None;
            }
            let mut allow: Vec<u16> = st
                .usable
                .iter()
                .flat_map(|s| s.ports.iter().copied())
                .collect();
            allow.sort_unstable();
            allow.dedup();
            if !self.fenced.contains(&ip) || allow != st.fence {
                engine.set_port_fence(ip, Some((public, &allow)));
                st.fence = allow;
                self.fenced.insert(ip);
            }
        }
        // Instances no longer owned or without a target: no fence, no state.
        self.insts.retain(|ip, _| keep.contains(ip));
        let lift: Vec<u32> = self
            .fenced
            .iter()
            .filter(|ip| !keep.contains(ip))
            .copied()
            .collect();
        for ip in lift {
            engine.set_port_fence(ip, None);
            self.fenced.remove(&ip);
        }
        rep
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use snatgw_core::{proto, tcp_flags, Direction, DropReason, Packet, Verdict};

    use super::*;

    /// The replication as the keeper sees it: one target, a connection number, reserves
    /// numbered in order, acknowledged up to `acked` on connection `conn`.
    struct Model {
        target: Cell<Option<SocketAddr>>,
        conn: Cell<u64>,
        seq: Cell<u64>,
        acked: Cell<u64>,
        ready: Cell<bool>,
        sent: RefCell<Vec<(ReserveTicket, PortReserve)>>,
        /// Reserves the target acknowledged at some time, on whatever connection.
        acked_ever: RefCell<HashSet<u64>>,
    }

    impl Model {
        fn new() -> Model {
            Model {
                target: Cell::new(Some("10.9.0.3:7946".parse().expect("addr"))),
                conn: Cell::new(1),
                seq: Cell::new(0),
                acked: Cell::new(0),
                ready: Cell::new(true),
                sent: RefCell::new(Vec::new()),
                acked_ever: RefCell::new(HashSet::new()),
            }
        }
        /// The target acknowledges everything queued on the current connection.
        fn ack_all(&self) {
            self.acked.set(self.seq.get());
            let mut ever = self.acked_ever.borrow_mut();
            for (t, _) in self.sent.borrow().iter() {
                if t.conn == self.conn.get() {
                    ever.insert(t.seq);
                }
            }
        }
    }

    impl ReserveLink for Model {
        fn target(&self, _: u32) -> Option<SocketAddr> {
            self.target.get()
        }
        fn reserve(&self, r: &PortReserve) -> Option<ReserveTicket> {
            if !self.ready.get() {
                return None;
            }
            let t = ReserveTicket {
                target: self.target.get()?,
                conn: self.conn.get(),
                seq: self.seq.get() + 1,
            };
            self.seq.set(t.seq);
            self.sent.borrow_mut().push((t, r.clone()));
            Some(t)
        }
        fn is_acked(&self, t: &ReserveTicket) -> bool {
            Some(t.target) == self.target.get()
                && t.conn == self.conn.get()
                && t.seq <= self.acked.get()
        }
        fn is_lost(&self, t: &ReserveTicket) -> bool {
            Some(t.target) != self.target.get() || t.conn != self.conn.get()
        }
    }

    const VM1: u32 = 0x0a00_010a;

    fn syn(e: &mut Engine, now: u32, dst: u32, sport: u16) -> Verdict {
        e.process(
            now,
            Direction::Outbound,
            &Packet {
                proto: proto::TCP,
                src: VM1,
                dst,
                src_port: sport,
                dst_port: 443,
                flags: tcp_flags::SYN,
            },
        )
    }

    /// One instant for the tests that do not wait.
    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    fn owned() -> HashSet<u32> {
        [VM1].into_iter().collect()
    }

    #[test]
    fn r10_4_reserve_size_is_an_eighth_of_the_block_within_4_and_128() {
        assert_eq!(reserve_size(1024), 128);
        assert_eq!(reserve_size(512), 64);
        assert_eq!(reserve_size(64), 8);
        assert_eq!(reserve_size(32), 4);
        assert_eq!(reserve_size(3), 3);
    }

    /// New flows wait for the first acknowledgement, then take ports of the acknowledged
    /// reserve only; a rotation makes the older reserve unusable the moment the next is sent.
    #[test]
    fn r10_4_owner_allocates_only_from_acknowledged_reserves() {
        let mut e = crate::fleet_link::tests::engine();
        let m = Model::new();
        let mut k = ReserveKeeper::new();
        let (public, ports) = e.pat_ports(VM1).expect("vm1 is PAT");
        assert_eq!(
            ports.len(),
            1024,
            "one instance per public IP: 1024 ports (R2.8)"
        );
        let r = reserve_size(ports.len());
        let rep = k.step(&mut e, &m, &owned(), t0());
        assert_eq!(rep.sent, 1);
        let first = m.sent.borrow()[0].1.clone();
        assert_eq!(first.public, public);
        assert_eq!(first.ports, ports[..r].to_vec());
        assert_eq!(
            syn(&mut e, 1, 0xc633_6401, 1000),
            Verdict::Drop(DropReason::PortReserve),
            "nothing acknowledged yet"
        );
        m.ack_all();
        let rep = k.step(&mut e, &m, &owned(), t0());
        assert_eq!((rep.acked, rep.sent), (1, 0));
        let mut sport = 2000;
        // r/2 flows to one destination: each on a port of the first reserve.
        for _ in 0..r / 2 {
            sport += 1;
            match syn(&mut e, 1, 0xc633_6401, sport) {
                Verdict::Translate { port, .. } => assert!(first.ports.contains(&port)),
                v => panic!("{v:?}"),
            }
        }
        // Half used: the next window is sent; the first stays usable, alone, until its ack.
        let rep = k.step(&mut e, &m, &owned(), t0());
        assert_eq!(rep.sent, 1);
        let second = m.sent.borrow()[1].1.clone();
        assert_eq!(second.ports, ports[r..2 * r].to_vec());
        assert_eq!(k.allowed(VM1), Some(&first.ports[..]));
        m.ack_all();
        k.step(&mut e, &m, &owned(), t0());
        let mut both = first.ports.clone();
        both.extend(&second.ports);
        assert_eq!(k.allowed(VM1), Some(&both[..]));
        for _ in 0..r / 2 {
            sport += 1;
            assert!(matches!(
                syn(&mut e, 1, 0xc633_6401, sport),
                Verdict::Translate { .. }
            ));
        }
        // The third is sent: from then on only the second is usable.
        let rep = k.step(&mut e, &m, &owned(), t0());
        assert_eq!(rep.sent, 1);
        assert_eq!(k.allowed(VM1), Some(&second.ports[..]));
        sport += 1;
        match syn(&mut e, 1, 0xc633_6402, sport) {
            Verdict::Translate { port, .. } => assert!(second.ports.contains(&port)),
            v => panic!("{v:?}"),
        }
    }

    /// A reconnect (new connection number) or a new target: new flows keep to the newest
    /// acknowledged reserve, which is sent again on the new connection before any rotation;
    /// without a snapshot there yet, nothing is sent and nothing rotates. An instance without
    /// a target, or not owned, is not fenced; a gained one is fenced to nothing until its
    /// first acknowledgement.
    #[test]
    fn r10_4_reserves_resync_on_a_new_connection_or_target() {
        let mut e = crate::fleet_link::tests::engine();
        let m = Model::new();
        let mut k = ReserveKeeper::new();
        let r = reserve_size(1024);
        k.step(&mut e, &m, &owned(), t0());
        m.ack_all();
        k.step(&mut e, &m, &owned(), t0());
        for _ in 0..r / 2 {
            k.step(&mut e, &m, &owned(), t0());
            m.ack_all();
        }
        let mut sport = 0;
        let mut open = |e: &mut Engine| {
            sport += 1;
            syn(e, 1, 0xc633_6401, sport)
        };
        // Two usable reserves (the second after r/2 flows).
        for _ in 0..r / 2 {
            assert!(matches!(open(&mut e), Verdict::Translate { .. }));
        }
        k.step(&mut e, &m, &owned(), t0());
        m.ack_all();
        k.step(&mut e, &m, &owned(), t0());
        let sent: Vec<PortReserve> = m.sent.borrow().iter().map(|(_, r)| r.clone()).collect();
        assert_eq!(sent.len(), 2);
        assert_eq!(k.allowed(VM1).map(<[u16]>::len), Some(2 * r));
        // Reconnect, before the snapshot is on the new connection: the newest only, nothing sent.
        m.conn.set(2);
        m.ready.set(false);
        let rep = k.step(&mut e, &m, &owned(), t0());
        assert_eq!((rep.resync, rep.sent), (1, 0));
        assert_eq!(k.allowed(VM1), Some(&sent[1].ports[..]));
        for _ in 0..r {
            // Far more than half a reserve: no rotation while resyncing.
            if let Verdict::Translate { port, .. } = open(&mut e) {
                assert!(sent[1].ports.contains(&port));
            }
            k.step(&mut e, &m, &owned(), t0());
        }
        assert_eq!(m.sent.borrow().len(), 2);
        // The snapshot is there: the newest goes again, then rotation resumes after its ack.
        m.ready.set(true);
        let rep = k.step(&mut e, &m, &owned(), t0());
        assert_eq!(rep.sent, 1);
        assert_eq!(m.sent.borrow()[2].1, sent[1]);
        assert_eq!(m.sent.borrow()[2].0.conn, 2);
        m.ack_all();
        let rep = k.step(&mut e, &m, &owned(), t0());
        assert_eq!((rep.acked, rep.sent), (1, 1));
        assert_eq!(k.allowed(VM1), Some(&sent[1].ports[..]));
        // Used up meanwhile: it rotates in the step that saw the acknowledgement.
        let rep = k.step(&mut e, &m, &owned(), t0());
        assert_eq!(rep.sent, 0);
        assert_eq!(
            m.sent.borrow()[3].1.ports,
            e.pat_ports(VM1).expect("ports").1[2 * r..3 * r].to_vec()
        );
        // A new target: the same again.
        m.ack_all();
        k.step(&mut e, &m, &owned(), t0());
        m.target.set(Some("10.9.0.1:7946".parse().expect("addr")));
        let rep = k.step(&mut e, &m, &owned(), t0());
        assert_eq!(rep.resync, 1);
        let newest = m.sent.borrow()[3].1.clone();
        assert_eq!(
            m.sent.borrow().last().map(|(_, r)| r.clone()),
            Some(newest.clone()),
            "sent again to the new target"
        );
        assert_eq!(k.allowed(VM1), Some(&newest.ports[..]));
        // No runner-up: not fenced.
        m.target.set(None);
        k.step(&mut e, &m, &owned(), t0());
        assert_eq!(k.allowed(VM1), None);
        assert!(matches!(open(&mut e), Verdict::Translate { .. }));
        // Gained: fenced to nothing until the first acknowledgement.
        m.target.set(Some("10.9.0.2:7946".parse().expect("addr")));
        m.ready.set(false);
        k.fence_gained(&mut e, &owned());
        assert_eq!(open(&mut e), Verdict::Drop(DropReason::PortReserve));
        k.step(&mut e, &m, &owned(), t0());
        assert_eq!(
            k.allowed(VM1),
            Some(&[][..]),
            "snapshot not queued yet: still nothing"
        );
        // Not owned any more: the fence is lifted.
        k.step(&mut e, &m, &HashSet::new(), t0());
        assert_eq!(k.allowed(VM1), None);
        assert!(matches!(open(&mut e), Verdict::Translate { .. }));
    }

    /// A runner-up that takes no reserve (unreachable, or an older protocol) holds a gained
    /// instance's new flows back for GIVE_UP_AFTER only; once a reserve is queued again the
    /// instance is fenced to what is acknowledged.
    #[test]
    fn r10_4_a_runner_up_that_takes_no_reserve_is_given_up_after_2s() {
        let mut e = crate::fleet_link::tests::engine();
        let m = Model::new();
        let mut k = ReserveKeeper::new();
        m.ready.set(false);
        k.fence_gained(&mut e, &owned());
        let t = t0();
        k.step(&mut e, &m, &owned(), t);
        assert_eq!(
            syn(&mut e, 1, 0xc633_6401, 1),
            Verdict::Drop(DropReason::PortReserve)
        );
        k.step(
            &mut e,
            &m,
            &owned(),
            t + GIVE_UP_AFTER - Duration::from_millis(10),
        );
        assert_eq!(
            syn(&mut e, 1, 0xc633_6401, 2),
            Verdict::Drop(DropReason::PortReserve)
        );
        assert_eq!(k.stats().waiting, 1);
        k.step(&mut e, &m, &owned(), t + GIVE_UP_AFTER);
        assert_eq!(k.allowed(VM1), None);
        assert_eq!((k.stats().waiting, k.stats().given_up), (0, 1));
        assert!(matches!(
            syn(&mut e, 1, 0xc633_6401, 3),
            Verdict::Translate { .. }
        ));
        // The runner-up takes a reserve: nothing until it acknowledges, then that reserve.
        m.ready.set(true);
        let rep = k.step(&mut e, &m, &owned(), t + GIVE_UP_AFTER * 2);
        assert_eq!(rep.sent, 1);
        assert_eq!(k.allowed(VM1), Some(&[][..]));
        assert_eq!(
            syn(&mut e, 1, 0xc633_6401, 4),
            Verdict::Drop(DropReason::PortReserve)
        );
        m.ack_all();
        k.step(&mut e, &m, &owned(), t + GIVE_UP_AFTER * 2);
        let first = m.sent.borrow()[0].1.clone();
        assert_eq!(k.allowed(VM1), Some(&first.ports[..]));
        assert_eq!(k.stats().given_up, 0);
    }

    /// The invariant the taker's holds rest on, under random acknowledgements, reconnects,
    /// steps and new flows: whatever the target received (every reserve it acknowledged, and
    /// any prefix of those sent after), the last two reserves it received contain the port of
    /// every new flow. (Between a reconnect and the keeper's next step the engine may still
    /// use reserves acknowledged on the old connection: the target received them, and the
    /// reconnect's snapshot, queued before the next reserve, carries the flows opened
    /// meanwhile.)
    #[test]
    fn r10_4_every_new_flow_lies_in_the_last_two_reserves_the_target_holds() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut e = crate::fleet_link::tests::engine();
        let m = Model::new();
        let mut k = ReserveKeeper::new();
        // As the member loop does before it admits a gained instance.
        k.fence_gained(&mut e, &owned());
        let (mut opened, mut refused, mut now) = (0u32, 0u32, 1u32);
        for step in 0..20_000u32 {
            match rnd(100) {
                0..=9 => {
                    k.step(&mut e, &m, &owned(), t0());
                }
                10..=14 => m.ack_all(),
                15 => m.conn.set(m.conn.get() + 1),
                16 => now += 1,
                _ => {
                    // Few destinations, so ports fill and the fence refuses at times.
                    let dst = 0xc633_6400 + rnd(3) as u32;
                    let v = syn(&mut e, now, dst, (step % 60000) as u16 + 1);
                    match v {
                        Verdict::Translate { port, .. } => {
                            opened += 1;
                            // What the target may have received: every reserve it
                            // acknowledged, then any prefix of those sent after the newest
                            // acknowledged one. It holds the last two of what it received;
                            // each such pair must contain the port.
                            let sent = m.sent.borrow();
                            let ever = m.acked_ever.borrow();
                            let hi = ever.iter().max().copied().unwrap_or(0);
                            let acked: Vec<&PortReserve> = sent
                                .iter()
                                .filter(|(t, _)| ever.contains(&t.seq))
                                .map(|(_, r)| r)
                                .collect();
                            let tail: Vec<&PortReserve> = sent
                                .iter()
                                .filter(|(t, _)| t.seq > hi)
                                .map(|(_, r)| r)
                                .collect();
                            for n in 0..=tail.len() {
                                let got: Vec<&&PortReserve> =
                                    acked.iter().chain(&tail[..n]).collect();
                                assert!(
                                    got.iter().rev().take(2).any(|r| r.ports.contains(&port)),
                                    "step {step}: port {port} outside the last two reserves of a target that received {} of the {} sent after its last acknowledgement",
                                    n,
                                    tail.len()
                                );
                            }
                        }
                        Verdict::Drop(DropReason::PortReserve) => refused += 1,
                        Verdict::Drop(DropReason::PortsExhausted) => {}
                        v => panic!("{v:?}"),
                    }
                }
            }
        }
        assert!(
            opened > 1000 && refused > 0,
            "opened {opened}, refused {refused}"
        );
    }
}
