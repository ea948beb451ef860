//! Port stashes: public ports the engine chooses ahead of time for one instance's new TCP
//! flows to one destination endpoint, so a kernel fast path can open those flows itself
//! (issue #17: new connections per second; SPEC R2.2, R2.3, R2.6, R9.2, R3.1–R3.4).
//!
//! **What it does.**
//! - [`Engine::stash_take`] takes ports for a [`StashKey`] (instance private address,
//!   destination address, destination port; TCP only). Each port is the one the allocator
//!   (`Engine::alloc`) would give a new flow to that destination at that moment (R2.3 order:
//!   the stash calls the allocator itself, once per port), and from then on it is *stashed*:
//!   held as in use for that destination (the allocator never gives it to another flow toward
//!   it, R2.2), a used port of the block (`PortBlock::hold`, R2.3 "used SNAT ports"), and
//!   counted toward the instance's and the gateway's flow limits (R9.2: live flows plus
//!   stashed ports never exceed either limit, and [`Engine::process`] counts stashed ports
//!   when it checks a SYN against them). Stashes are per destination: one port may sit in
//!   the stashes of two destinations and carry a flow to a third (R2.3 sharing). A take
//!   leaves at least `max(8, block size / 8)` ports free for the destination, so a SYN that
//!   reaches the engine still finds one (R2.6).
//! - [`Engine::stash_opened`] applies a flow the fast path opened from a stash at the
//!   kernel's second: the flow is made exactly as [`Engine::process`] would have made it for
//!   its SYN then (counters, `last_seen`, first second, idle timer from that second, R3.4),
//!   the port passes from the stash to the flow, and the journal's
//!   [`FlowChange::Opened`](super::FlowChange::Opened) says `by_fast_path: true` (the
//!   kernel holds the entries already). A port not in the stash (a restart, a voided stash)
//!   is adopted if the instance's block owns it and it is free for the destination right
//!   now; otherwise the flow is refused and a `Closed` (cause `reclaimed`) for it is
//!   journaled, with no `Opened` before it, so the fast path removes its entries.
//! - [`Engine::stash_return`] takes back ports the fast path did not use: they are released
//!   without a new release-history entry (they were never on the wire); a port the allocator
//!   had taken from the destination's release history gets that entry back (R2.3 decision).
//! - The engine *voids* a stash whose ports it takes away (instance removed, scenario change
//!   R1.4, chunks revoked R2.9, fleet admission set, a port fence, port hold or takeover
//!   window set for the instance, R10.4, or a new configuration after which the stash would
//!   not be granted: NSG, VNet, flow limits): its ports are released at once (as by
//!   [`Engine::stash_return`]) and its key is reported by [`Engine::stash_voided`]; the same
//!   key is not granted again before [`RETAKE_AFTER`] seconds have passed, so ports of the
//!   voided stash the runtime hands back late never land in a new one.
//! - [`Engine::stash_demand`] reports destinations whose new TCP flows the engine decided
//!   (SYNs through [`Engine::process`]) while tracking is on ([`Engine::set_stash_enabled`]).
//!
//! **Eligibility.** A stash is granted only to a PAT instance (R1.1: an ILPIP has no block),
//! for a destination outside the VNet (R1.7), while no fleet admission hook is set (R10.2),
//! no port fence, port hold, takeover window or takeover hold toward the destination applies
//! (R10.4), and the instance's outbound NSGs allow TCP to the destination whatever the source
//! port (R4.3: evaluated without counting hits; a decision that depends on the source port
//! counts as a denial), and no live inbound load-balancing flow of the instance comes from the
//! destination (R5.1: its return path would take the instance's packets to it from a rule's
//! backend port). [`Engine::stash_opened`] checks the NSGs (counting hits, as the SYN would
//! have) and the inbound return path again with the flow's real source port.
//!
//! **Cost.** Nothing on an established flow's packet. A new flow pays one `is_empty` check
//! in the allocator while no stash exists; demand tracking costs one branch on a bool while
//! off.
//!
//! **What it does not do.** It does not talk to a kernel (the runtime moves ports to and from
//! the fast path's rings), does not stash UDP ports (a UDP flow's first datagram reaches the
//! engine), and stashes are not exported ([`Engine::export_state`]): a restart starts with no
//! stash; flows the kernel opened meanwhile are adopted or refused by
//! [`Engine::stash_opened`]. The release times the allocator took stashed ports from the
//! history with are exported as releases, so a restart keeps R2.3's order for them.

use super::block::PortBlock;
use super::events::EndCause;
use super::flows::Flow;
use super::journal::FlowKey;
use super::ports::CHUNK;
use super::stats::stats_bucket;
use super::{Engine, NONE};
use crate::bits::Bits;
use crate::error::InvariantError;
use crate::packet::{proto, tcp_flags, Packet, L4};
use crate::units::Time;

/// Destinations [`Engine::stash_demand`] keeps between two calls; further ones are counted in
/// [`StashStats::demand_dropped`].
pub const STASH_DEMAND_CAP: usize = 4096;

/// Seconds after a stash is voided before its key is granted ports again.
pub const RETAKE_AFTER: Time = 2;

/// The destination a stash serves: new TCP flows from the instance at private address `src`
/// to (`dst`, `dport`). Host byte order, like [`FlowKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StashKey {
    /// The instance's private address.
    pub src: u32,
    /// Destination address.
    pub dst: u32,
    /// Destination port.
    pub dport: u16,
}

/// What [`Engine::stash_take`] gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StashGrant {
    /// The instance's slot (as [`FlowChange::Opened`](super::FlowChange::Opened) carries it).
    pub slot: u32,
    /// The public address the ports belong to.
    pub public: u32,
    /// The public ports, in the order the allocator chose them (R2.3).
    pub pports: Vec<u16>,
}

/// Stash counters ([`Engine::stash_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StashStats {
    /// Stashes holding ports now.
    pub stashes: u32,
    /// Ports stashed now (all stashes).
    pub ports_stashed: u32,
    /// Ports taken into stashes ([`Engine::stash_take`]).
    pub taken: u64,
    /// Flows opened on a stashed port ([`StashOpen::Opened`]).
    pub opened: u64,
    /// Stashed ports given back unused ([`Engine::stash_return`]).
    pub returned: u64,
    /// Flows opened on a port that was not stashed for them and was adopted
    /// ([`StashOpen::Adopted`]).
    pub adopted: u64,
    /// Flows the fast path opened that the engine refused ([`StashOpen::Refused`]).
    pub refused: u64,
    /// Stashes voided by the engine ([`Engine::stash_voided`]).
    pub voided: u64,
    /// Destinations not kept by [`Engine::stash_demand`] because [`STASH_DEMAND_CAP`] were.
    pub demand_dropped: u64,
}

/// What [`Engine::stash_opened`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StashOpen {
    /// The flow was made on a port of its destination's stash.
    Opened,
    /// The port was not stashed for the destination but free for it: the flow was made.
    Adopted,
    /// No flow was made (a `Closed` is journaled for the fast path's entries, except for a
    /// repeated report of a flow the engine has with the same public side).
    Refused,
}

/// One stashed port.
#[derive(Debug, Clone, Copy)]
struct Stashed {
    /// Local port index in the block.
    idx: u16,
    /// The release for the destination the allocator took the port from (R2.3 history), to
    /// restore if the port comes back unused.
    hist: Option<Time>,
}

/// The ports stashed for one key.
struct Stash {
    /// The instance's private address (the key's `src`).
    src: u32,
    /// The public address at the take.
    public: u32,
    /// The stashed local ports, as a set (the allocator's check).
    bits: Bits,
    /// The same ports in the order they were taken.
    ports: Vec<Stashed>,
}

/// (instance slot, destination address, destination port).
type Slot3 = (u32, u32, u16);

/// Stash state of the engine (see the module documentation).
#[derive(Default)]
pub(super) struct StashRt {
    /// Whether demand is tracked.
    enabled: bool,
    /// Stashes by (instance slot, destination); never empty.
    stashes: hashbrown::HashMap<Slot3, Stash>,
    /// Ports stashed, all stashes (the gateway's flow limit, R9.2).
    pub(super) total: u32,
    /// Stashes holding each port, by instance slot and local port (the allocator's "held by
    /// a flow" test, `stash_only`).
    holds: hashbrown::HashMap<u32, hashbrown::HashMap<u16, u16>>,
    /// Keys voided since the last [`Engine::stash_voided`].
    voided: hashbrown::HashSet<StashKey>,
    /// Voided keys: the first second they may be granted again.
    retake: hashbrown::HashMap<StashKey, Time>,
    /// New TCP flows the engine decided, by destination, since the last
    /// [`Engine::stash_demand`].
    demand: hashbrown::HashMap<StashKey, u32>,
    /// Counters (`stashes` and `ports_stashed` are computed).
    stats: StashStats,
}

impl Engine {
    /// Turns demand tracking ([`Engine::stash_demand`]) on or off (off by default: one branch
    /// on a new TCP flow). Turning it off forgets the demand kept. Stashes are not affected.
    pub fn set_stash_enabled(&mut self, on: bool) {
        self.stash.enabled = on;
        if !on {
            self.stash.demand = Default::default();
        }
    }

    /// Takes up to `n` more ports for `key`'s stash at the engine's time (see the module
    /// documentation): each the port the allocator would give a new TCP flow to the
    /// destination now (R2.3), then held for it (R2.2), used (R2.3) and counted toward the
    /// flow limits (R9.2). Stops early to leave `max(8, block size / 8)` ports free for the
    /// destination (R2.6) and within the instance's and the gateway's flow limits. Returns
    /// `None`, changing nothing, when no port can be granted: `n` is 0, the key is not
    /// eligible (module documentation), it was voided less than [`RETAKE_AFTER`] seconds
    /// ago, or no port can be spared.
    pub fn stash_take(&mut self, key: StashKey, n: u32) -> Option<StashGrant> {
        if n == 0 {
            return None;
        }
        if let Some(&t) = self.stash.retake.get(&key) {
            if self.now < t {
                return None;
            }
            self.stash.retake.remove(&key);
        }
        let (slot, public) = self.stash_eligible(key)?;
        let block_id = slot * 2;
        let (dst, dport) = (key.dst, key.dport);
        // R9.2: live flows plus stashed ports stay within both limits.
        let inst = self.insts[slot as usize].as_ref()?;
        let inst_room = inst
            .max_flows
            .saturating_sub(inst.live.saturating_add(inst.stashed));
        let gw_room = self
            .topo
            .params
            .max_flows
            .saturating_sub(self.flows.live().saturating_add(self.stash.total));
        // R2.6: leave ports free for SYNs that reach the engine.
        let dh = self.flows.dest_hash(block_id, dst, dport);
        let active = self.busy_toward(dh, block_id, dst, dport);
        let sk = (slot, dst, dport);
        let stashed = self.stash.stashes.get(&sk).map_or(Bits::EMPTY, |s| s.bits);
        let block = &self.blocks[block_id as usize];
        let size = block.owned.count();
        let free = block.owned.minus(&active).minus(&stashed).count();
        let reserve = (size / 8).max(8);
        let want = n
            .min(inst_room)
            .min(gw_room)
            .min(free.saturating_sub(reserve));
        if want == 0 {
            return None;
        }
        let mut pports = Vec::with_capacity(want as usize);
        for _ in 0..want {
            // The allocator sees the ports stashed so far as in use for the destination; the
            // destination's due flows were reaped above (`busy_toward`), once.
            let Ok((idx, hist)) = self.alloc_inner(block_id, dst, dport, false) else {
                break;
            };
            let st = self.stash.stashes.entry(sk).or_insert_with(|| Stash {
                src: key.src,
                public,
                bits: Bits::EMPTY,
                ports: Vec::new(),
            });
            st.bits.set(idx);
            st.ports.push(Stashed { idx, hist });
            *self
                .stash
                .holds
                .entry(slot)
                .or_default()
                .entry(idx)
                .or_default() += 1;
            let inst = self.insts[slot as usize].as_ref().expect("instance");
            pports.push(inst.port_of(idx));
        }
        let got = pports.len() as u32;
        if got == 0 {
            return None;
        }
        self.stash.total += got;
        self.stash.stats.taken += u64::from(got);
        if let Some(i) = self.insts[slot as usize].as_mut() {
            i.stashed += got;
        }
        Some(StashGrant {
            slot,
            public,
            pports,
        })
    }

    /// The instance slot and public address for a stash of `key`, if one may be granted now
    /// (module documentation: eligibility; not the retake delay nor the limits).
    fn stash_eligible(&self, key: StashKey) -> Option<(u32, u32)> {
        if self.admission.is_some() {
            return None;
        }
        let &slot = self.by_private.get(&key.src)?;
        let inst = self.insts[slot as usize].as_ref()?;
        if !inst.scenario.is_pat() || self.topo.in_vnet(key.dst) {
            return None;
        }
        if self.takeover_window_open(slot)
            || self.fence_applies(slot)
            || self.takeover_held(slot * 2, key.dst, key.dport).is_some()
            || self.lb_return_toward(key.src, key.dst, key.dport)
        {
            return None;
        }
        if !self.nsg_outbound_any_sport(key.src, key.dst, key.dport) {
            return None;
        }
        Some((slot, inst.scenario.addr()))
    }

    /// A flow the fast path opened at `at` (the kernel's second) on public port `key.pport`
    /// of `key.public` for the outbound TCP 5-tuple of `key`, from the stash of
    /// (`key.src`, `key.dst`, `key.dport`) (see the module documentation). The flow is made
    /// as [`Engine::process`] would have made it for its SYN at `at`: `conn_ok` and
    /// `packets_out` counted, `last_seen` and first second `at`, idle deadline
    /// `at + idle_timeout` (R3.4); a flow whose deadline is already past ends at it, as a late
    /// [`Engine::tcp_event_at`] does (after asking the offload's activity source). Its
    /// `Opened` is journaled with `by_fast_path: true`.
    ///
    /// [`StashOpen::Opened`]: the port was stashed for the destination and passes to the
    /// flow. [`StashOpen::Adopted`]: it was not, but the instance's block owns it and it is
    /// free for the destination now (not busy for it, not held, within any fence).
    /// [`StashOpen::Refused`]: no flow; a `Closed` with cause `reclaimed` is journaled for
    /// `key` so the fast path removes its entries, and counted. Refused are: an unknown
    /// instance, an ILPIP, another public address, a VNet destination, a protocol other than
    /// TCP, a port neither stashed nor free, a flow the admission hook (R10.2), the NSGs
    /// (R4.3, evaluated with the real source port, counting hits), an inbound
    /// load-balancing flow's return path (R5.1) or a flow limit (R9.2) does not allow, and a
    /// live flow with the same outbound 5-tuple and another public side (R3.1). A stashed
    /// port of a refused flow leaves the stash and is released with a release-history entry
    /// at `at` (its SYN was on the wire). A repeated report of a flow the engine has with
    /// the same public side is counted as refused but changes nothing and journals nothing
    /// (the kernel's entries are that flow's). A port adopted while it was in the
    /// destination's release history loses that entry, as when the allocator gives it (R2.3).
    /// `at` is normally at most the engine's time; a later one is taken as it is (as by
    /// [`Engine::tcp_event_at`]).
    pub fn stash_opened(&mut self, at: Time, key: &FlowKey) -> StashOpen {
        let k = *key;
        if k.proto != proto::TCP {
            return self.stash_refuse(at, None, k, None);
        }
        let live = self
            .flows
            .find_fwd(proto::TCP, k.src, k.sport, k.dst, k.dport)
            .filter(|&fi| !self.reap_if_due(fi));
        if let Some(fi) = live {
            let f = self.flows.get(fi);
            if f.public == k.public && f.pport == k.pport {
                self.stash.stats.refused += 1;
                return StashOpen::Refused;
            }
        }
        // An ILPIP, another public address, a port outside the block (R2.4).
        let (slot, idx) = match self.local_port(k.src, k.public, k.pport) {
            Ok(x) => x,
            Err(_) => {
                let slot = self.by_private.get(&k.src).copied();
                return self.stash_refuse(at, slot, k, None);
            }
        };
        let block_id = slot * 2;
        if !self.blocks[block_id as usize].owned.get(idx) {
            return self.stash_refuse(at, Some(slot), k, None);
        }
        // The port leaves the stash first (the fast path took it; the limits below then count
        // it as this flow's).
        let from_stash = self.stash_remove_port((slot, k.dst, k.dport), idx, k.public);
        let stash_port = from_stash.map(|_| idx);
        if live.is_some()
            || (from_stash.is_none() && !self.stash_port_free(block_id, k.dst, k.dport, idx))
        {
            return self.stash_refuse(at, Some(slot), k, stash_port);
        }
        let refused = self.topo.in_vnet(k.dst)
            || self.admission.as_ref().is_some_and(|a| !a(k.src))
            || self
                .lb_lookup_outbound(proto::TCP, k.src, k.sport, k.dst, k.dport)
                .is_some()
            || !self.nsg_outbound(
                &Packet::tcp(k.src, k.sport, k.dst, k.dport, tcp_flags::SYN),
                false,
            )
            || self.over_flow_limit(slot, k.public, L4::Tcp, k.dst, k.dport);
        if refused {
            return self.stash_refuse(at, Some(slot), k, stash_port);
        }
        let outcome = match from_stash {
            Some(_) => {
                self.stash.stats.opened += 1;
                StashOpen::Opened
            }
            None => {
                // As the allocator does when it takes a port from the history (R2.3).
                self.history.take(block_id, k.dst, k.dport, idx);
                self.blocks[block_id as usize].hold(idx);
                self.stash.stats.adopted += 1;
                StashOpen::Adopted
            }
        };
        let inst = self.insts[slot as usize].as_mut().expect("instance");
        // The SYN's packet is counted by the fast path's per-instance counter (R6.1), credited
        // with the others; not here too.
        inst.stats[stats_bucket(proto::TCP)].conn_ok += 1;
        let fi = self.insert_flow_at(
            Flow {
                src: k.src,
                dst: k.dst,
                public: k.public,
                block: block_id,
                gen: 0,
                prev: NONE,
                next: NONE,
                last_seen: at,
                close_at: 0,
                sport: k.sport,
                dport: k.dport,
                pport: k.pport,
                idx,
                proto: proto::TCP,
                state: 0,
                born: 0, // set by insert_flow_at
            },
            at,
            // An adopted flow (a restart: the kernel opened it while no gateway ran) may have
            // lost its entries to the start's clean-up of flows the engine did not know: the
            // runtime installs them again (the same values, harmless if they are there).
            from_stash.is_some(),
        );
        // Opened after its idle deadline (late): no verdict may use it.
        if let Some((mut t, mut cause)) = self.due(fi) {
            if cause == EndCause::Idle && self.offload.is_some() {
                (t, cause) = self.refresh_from_outside(fi);
            }
            if t <= self.now {
                self.remove_flow(fi, t, cause);
            }
        }
        outcome
    }

    /// Whether local port `idx` of block `block_id` is free for a new flow to (`dst`,
    /// `dport`) now, as the allocator decides it: not busy for it, not held toward it or
    /// toward every destination, within the instance's fence, not stashed for it.
    fn stash_port_free(&mut self, block_id: u32, dst: u32, dport: u16, idx: u16) -> bool {
        let dh = self.flows.dest_hash(block_id, dst, dport);
        if self.busy_toward(dh, block_id, dst, dport).get(idx) {
            return false;
        }
        if self
            .stash_held(block_id, dst, dport)
            .is_some_and(|b| b.get(idx))
            || self
                .takeover_held(block_id, dst, dport)
                .is_some_and(|b| b.get(idx))
        {
            return false;
        }
        let (port_held, fence) = self.fence_limits(block_id);
        !port_held.is_some_and(|b| b.get(idx)) && fence.is_none_or(|f| f.get(idx))
    }

    /// Refuses a flow the fast path opened (from [`Engine::stash_opened`]): journals a
    /// `Closed` for `key` (cause `reclaimed`, no `Opened` before it) and counts it. `port`:
    /// the local port it took from its stash, released with a release-history entry at `at`.
    fn stash_refuse(
        &mut self,
        at: Time,
        slot: Option<u32>,
        key: FlowKey,
        port: Option<u16>,
    ) -> StashOpen {
        if let (Some(slot), Some(idx)) = (slot, port) {
            // Released as a flow's port is (any cause but `reclaimed` keeps the history).
            self.release_port(slot * 2, key.dst, key.dport, idx, at, EndCause::Rst);
        }
        self.journal_closed_key(at, slot.unwrap_or(NONE), key, EndCause::Reclaimed);
        self.stash.stats.refused += 1;
        StashOpen::Refused
    }

    /// Removes local port `idx` from the stash of `sk` if it is there (on `public`), keeping
    /// the block's hold. Returns the history entry it carried (outer `None`: not stashed).
    fn stash_remove_port(&mut self, sk: Slot3, idx: u16, public: u32) -> Option<Option<Time>> {
        if self.stash.stashes.is_empty() {
            return None;
        }
        let st = self.stash.stashes.get_mut(&sk)?;
        if st.public != public || !st.bits.get(idx) {
            return None;
        }
        let pos = st.ports.iter().position(|p| p.idx == idx)?;
        st.bits.clear(idx);
        let p = st.ports.remove(pos);
        if st.ports.is_empty() {
            self.stash.stashes.remove(&sk);
        }
        self.stash_unhold(sk.0, idx);
        self.stash.total -= 1;
        if let Some(i) = self.insts[sk.0 as usize].as_mut() {
            i.stashed -= 1;
        }
        Some(p.hist)
    }

    /// Gives back ports of `key`'s stash the fast path did not use: each leaves the stash and
    /// is released with no new release-history entry (it was never on the wire); one the
    /// allocator took from the destination's history gets that entry back (R2.3). Ports not
    /// in the stash (another key's, a voided stash's, unknown) are ignored.
    pub fn stash_return(&mut self, key: StashKey, pports: &[u16]) {
        if self.stash.stashes.is_empty() {
            return;
        }
        let Some(public) = self
            .by_private
            .get(&key.src)
            .and_then(|&s| self.insts[s as usize].as_ref())
            .map(|i| i.scenario.addr())
        else {
            return;
        };
        for &pport in pports {
            let Ok((slot, idx)) = self.local_port(key.src, public, pport) else {
                continue;
            };
            if let Some(hist) = self.stash_remove_port((slot, key.dst, key.dport), idx, public) {
                self.stash_release(slot, key.dst, key.dport, Stashed { idx, hist });
                self.stash.stats.returned += 1;
            }
        }
    }

    /// Releases a port that left a stash unused: the block's hold goes, and the history entry
    /// the allocator took it from comes back.
    fn stash_release(&mut self, slot: u32, dst: u32, dport: u16, p: Stashed) {
        let block_id = slot * 2;
        self.blocks[block_id as usize].release(p.idx);
        let horizon = self.topo.params.reuse_history;
        if let Some(at) = p.hist {
            if horizon > 0 && at.saturating_add(horizon) > self.now {
                self.history
                    .restore(block_id, dst, dport, p.idx, at, horizon);
            }
        }
    }

    /// Keys of the stashes the engine voided since the last call, sorted (see the module
    /// documentation): the runtime must stop the fast path from using them. Their ports are
    /// released already; returning them later is harmless (ignored).
    pub fn stash_voided(&mut self) -> Vec<StashKey> {
        let now = self.now;
        self.stash.retake.retain(|_, t| *t > now);
        let mut v: Vec<StashKey> = self.stash.voided.drain().collect();
        v.sort_unstable();
        v
    }

    /// Destinations of the new TCP flows the engine decided (SYNs through
    /// [`Engine::process`], not flows of a stash) since the last call, with how many, most
    /// first; only while tracking is on ([`Engine::set_stash_enabled`]). At most
    /// [`STASH_DEMAND_CAP`] destinations are kept between calls; flows to further ones are
    /// counted in [`StashStats::demand_dropped`].
    pub fn stash_demand(&mut self) -> Vec<(StashKey, u32)> {
        if self.stash.demand.is_empty() {
            return Vec::new();
        }
        let mut v: Vec<(StashKey, u32)> =
            std::mem::take(&mut self.stash.demand).into_iter().collect();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// The public ports stashed for `key` now, in the order they were taken.
    pub fn stash_ports(&self, key: StashKey) -> Vec<u16> {
        let Some(&slot) = self.by_private.get(&key.src) else {
            return Vec::new();
        };
        let (Some(st), Some(inst)) = (
            self.stash.stashes.get(&(slot, key.dst, key.dport)),
            self.insts[slot as usize].as_ref(),
        ) else {
            return Vec::new();
        };
        st.ports.iter().map(|p| inst.port_of(p.idx)).collect()
    }

    /// Stash counters.
    pub fn stash_stats(&self) -> StashStats {
        StashStats {
            stashes: self.stash.stashes.len() as u32,
            ports_stashed: self.stash.total,
            ..self.stash.stats
        }
    }

    /// A new TCP flow the engine decided (from `translate`, tracking on).
    pub(super) fn stash_note_demand(&mut self, src: u32, dst: u32, dport: u16) {
        let key = StashKey { src, dst, dport };
        let d = &mut self.stash.demand;
        if let Some(n) = d.get_mut(&key) {
            *n = n.saturating_add(1);
        } else if d.len() < STASH_DEMAND_CAP {
            d.insert(key, 1);
        } else {
            self.stash.stats.demand_dropped += 1;
        }
    }

    /// Whether demand is tracked (the branch on the new-flow path).
    #[inline]
    pub(super) fn stash_tracking(&self) -> bool {
        self.stash.enabled
    }

    /// The local ports of block `block_id` stashed for (`dst`, `dport`), if any stash exists
    /// at all (the allocator's check, like `takeover_held`). Costs one `is_empty` check while
    /// no stash exists.
    #[inline]
    pub(super) fn stash_held(&self, block_id: u32, dst: u32, dport: u16) -> Option<Bits> {
        if self.stash.stashes.is_empty() {
            return None;
        }
        self.stash_held_slow(block_id, dst, dport)
    }

    fn stash_held_slow(&self, block_id: u32, dst: u32, dport: u16) -> Option<Bits> {
        if block_id & 1 != 0 {
            return None;
        }
        self.stash
            .stashes
            .get(&(block_id >> 1, dst, dport))
            .map(|s| s.bits)
    }

    /// One stash fewer holds local port `idx` of instance `slot`.
    fn stash_unhold(&mut self, slot: u32, idx: u16) {
        if let Some(m) = self.stash.holds.get_mut(&slot) {
            if let Some(c) = m.get_mut(&idx) {
                *c -= 1;
                if *c == 0 {
                    m.remove(&idx);
                }
            }
            if m.is_empty() {
                self.stash.holds.remove(&slot);
            }
        }
    }

    /// The ports of block `block_id` held by stashes and by no flow, if any stash holds one
    /// of its ports (the allocator's check: R2.3 prefers ports a flow holds; one `is_empty`
    /// check while no stash exists).
    #[inline]
    pub(super) fn stash_only(&self, block_id: u32) -> Option<Bits> {
        if self.stash.holds.is_empty() || block_id & 1 != 0 {
            return None;
        }
        let m = self.stash.holds.get(&(block_id >> 1))?;
        let block = &self.blocks[block_id as usize];
        let mut b = Bits::EMPTY;
        for (&idx, &n) in m {
            if block.holders(idx) == u32::from(n) {
                b.set(idx);
            }
        }
        Some(b)
    }

    /// Voids the stash of `sk` (module documentation): its ports are released as by
    /// [`Engine::stash_return`], its key is reported by [`Engine::stash_voided`] and not
    /// granted again for [`RETAKE_AFTER`] seconds.
    fn stash_void(&mut self, sk: Slot3) {
        let Some(st) = self.stash.stashes.remove(&sk) else {
            return;
        };
        let (slot, dst, dport) = sk;
        let n = st.ports.len() as u32;
        for &p in &st.ports {
            self.stash_unhold(slot, p.idx);
            self.stash_release(slot, dst, dport, p);
        }
        self.stash.total -= n;
        if let Some(i) = self.insts[slot as usize].as_mut() {
            i.stashed -= n;
        }
        let key = StashKey {
            src: st.src,
            dst,
            dport,
        };
        self.stash.voided.insert(key);
        self.stash
            .retake
            .insert(key, self.now.saturating_add(RETAKE_AFTER));
        self.stash.stats.voided += 1;
    }

    /// Voids every stash for which `which` holds, given its (instance slot, destination) and
    /// its local ports, in key order.
    fn stash_void_where(&mut self, which: impl Fn(Slot3, &Bits) -> bool) {
        if self.stash.stashes.is_empty() {
            return;
        }
        let mut keys: Vec<Slot3> = self
            .stash
            .stashes
            .iter()
            .filter(|(&k, s)| which(k, &s.bits))
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        for k in keys {
            self.stash_void(k);
        }
    }

    /// Instance `slot`'s stashes are voided (it is removed, it gets a port fence, port holds
    /// or a takeover window, R10.4).
    pub(super) fn stash_void_instance(&mut self, slot: u32) {
        self.stash_void_where(|k, _| k.0 == slot);
    }

    /// Instance `slot` loses the chunks in slots `mask` of its block (from `ports`, R1.4,
    /// R2.9): its stashes with a port there are voided.
    pub(super) fn stash_void_chunks(&mut self, slot: u32, mask: &[bool]) {
        self.stash_void_where(|k, b| k.0 == slot && b.iter().any(|i| mask[(i / CHUNK) as usize]));
    }

    /// Every stash is voided (a fleet admission hook was set, R10.2).
    pub(super) fn stash_void_all(&mut self) {
        self.stash_void_where(|_, _| true);
    }

    /// A flow restored on local port `idx` of block `block_id` toward (`dst`, `dport`) (from
    /// `persist`): a stash holding that port for that destination is voided (R2.2).
    pub(super) fn stash_void_conflict(&mut self, block_id: u32, dst: u32, dport: u16, idx: u16) {
        if self
            .stash_held(block_id, dst, dport)
            .is_some_and(|b| b.get(idx))
        {
            self.stash_void((block_id >> 1, dst, dport));
        }
    }

    /// After a configuration change (from [`Engine::apply`]): voids the stashes that would
    /// not be granted now (instance, scenario, VNet, NSG, fence and holds) and, while an
    /// instance's live flows and stashed ports exceed its flow limit (R9.2, a lowered limit),
    /// its stashes; while the gateway's are exceeded, every stash.
    pub(super) fn stash_revalidate(&mut self) {
        if self.stash.stashes.is_empty() {
            return;
        }
        let mut keys: Vec<(Slot3, u32, u32)> = self
            .stash
            .stashes
            .iter()
            .map(|(k, s)| (*k, s.src, s.public))
            .collect();
        keys.sort_unstable();
        for (sk, src, public) in keys {
            let key = StashKey {
                src,
                dst: sk.1,
                dport: sk.2,
            };
            let ok = self.stash_eligible(key) == Some((sk.0, public));
            if !ok {
                self.stash_void(sk);
            }
        }
        let over: Vec<u32> = self
            .insts
            .iter()
            .enumerate()
            .filter_map(|(s, i)| {
                let i = i.as_ref()?;
                (i.stashed > 0 && i.live.saturating_add(i.stashed) > i.max_flows)
                    .then_some(s as u32)
            })
            .collect();
        self.stash_void_where(|k, _| over.contains(&k.0));
        if self.flows.live().saturating_add(self.stash.total) > self.topo.params.max_flows {
            self.stash_void_all();
        }
    }

    /// Ports of TCP block `block_id` (`block`) held only by stashes, no flow (reports: R2.3's
    /// used ports are those held by a flow).
    pub(super) fn stash_only_ports(&self, block_id: u32, block: &super::block::PortBlock) -> u32 {
        let mut holds: hashbrown::HashMap<u16, u32> = Default::default();
        for (k, s) in &self.stash.stashes {
            if k.0 * 2 == block_id {
                for p in &s.ports {
                    *holds.entry(p.idx).or_default() += 1;
                }
            }
        }
        holds
            .iter()
            .filter(|(&i, &n)| block.holders(i) == n)
            .count() as u32
    }

    /// Stashed ports per block (for the invariant check and reports): block id -> local port
    /// -> stashes holding it.
    pub(super) fn stash_holds(&self) -> hashbrown::HashMap<u32, hashbrown::HashMap<u16, u32>> {
        let mut m: hashbrown::HashMap<u32, hashbrown::HashMap<u16, u32>> = Default::default();
        for (k, s) in &self.stash.stashes {
            let e = m.entry(k.0 * 2).or_default();
            for p in &s.ports {
                *e.entry(p.idx).or_default() += 1;
            }
        }
        m
    }

    /// Releases the allocator took stashed ports from (for `persist`'s export): (instance
    /// slot, destination, destination port, local port, when).
    pub(super) fn stash_history(&self) -> Vec<(u32, u32, u16, u16, Time)> {
        let mut v = Vec::new();
        for (k, s) in &self.stash.stashes {
            for p in &s.ports {
                if let Some(at) = p.hist {
                    v.push((k.0, k.1, k.2, p.idx, at));
                }
            }
        }
        v.sort_unstable();
        v
    }

    /// Checks the stashes (from [`Engine::check_invariants`]): each is non-empty, its set and
    /// list agree without repeats, it belongs to a live PAT instance on its public address,
    /// its ports lie in the instance's block and are owned (R2.4), none carries a live flow to
    /// the stash's destination (R2.2), per-instance and total counts match, no stash exists
    /// while an admission hook is set, and the demand stays within its cap.
    pub(super) fn check_stash(&self) -> Result<(), InvariantError> {
        let s = &self.stash;
        let cache = |m: String| Err(InvariantError::Cache(format!("stash: {m}")));
        if s.demand.len() > STASH_DEMAND_CAP {
            return cache(format!("{} demand keys", s.demand.len()));
        }
        if self.admission.is_some() && !s.stashes.is_empty() {
            return cache("stashes while an admission hook is set".into());
        }
        // The per-port hold counts are the stashes' (the allocator's R2.3 order uses them).
        let mut holds: hashbrown::HashMap<u32, hashbrown::HashMap<u16, u16>> = Default::default();
        for (&(slot, _, _), st) in &s.stashes {
            for p in &st.ports {
                *holds.entry(slot).or_default().entry(p.idx).or_default() += 1;
            }
        }
        if holds != s.holds {
            return cache("per-port hold counts disagree with the stashes".into());
        }
        let mut per_slot: hashbrown::HashMap<u32, u32> = Default::default();
        let mut total = 0u32;
        for (&(slot, dst, dport), st) in &s.stashes {
            if st.ports.is_empty() {
                return cache(format!("empty stash of slot {slot}"));
            }
            let mut bits = Bits::EMPTY;
            for p in &st.ports {
                if bits.get(p.idx) {
                    return cache(format!("port {} stashed twice", p.idx));
                }
                bits.set(p.idx);
            }
            if bits != st.bits {
                return cache(format!("stash of slot {slot}: set and list disagree"));
            }
            let Some(Some(inst)) = self.insts.get(slot as usize) else {
                return Err(InvariantError::FlowPort(format!(
                    "stash of free slot {slot}"
                )));
            };
            if !inst.scenario.is_pat()
                || inst.scenario.addr() != st.public
                || inst.private_ip != st.src
            {
                return Err(InvariantError::FlowPort(format!(
                    "stash of {} on {} but the instance uses {}",
                    inst.name,
                    st.public,
                    inst.scenario.addr()
                )));
            }
            let block: &PortBlock = &self.blocks[slot as usize * 2];
            for p in &st.ports {
                if inst.chunks[(p.idx / CHUNK) as usize] == 0 || !block.owned.get(p.idx) {
                    return Err(InvariantError::FlowPort(format!(
                        "stashed port idx {} of {} outside its block",
                        p.idx, inst.name
                    )));
                }
            }
            if let Some(fi) = self
                .flows
                .chain(
                    self.flows.dest_hash(slot * 2, dst, dport),
                    slot * 2,
                    dst,
                    dport,
                )
                .into_iter()
                .find(|&fi| st.bits.get(self.flows.get(fi).idx))
            {
                return Err(InvariantError::DuplicateTuple(format!(
                    "stashed port of {} carries a flow to the stash's destination: {:?}",
                    inst.name,
                    self.flows.get(fi)
                )));
            }
            *per_slot.entry(slot).or_default() += st.ports.len() as u32;
            total += st.ports.len() as u32;
        }
        if total != s.total {
            return Err(InvariantError::Counter(format!(
                "stash total {} but {total} ports stashed",
                s.total
            )));
        }
        for (slot, inst) in self.insts.iter().enumerate() {
            let Some(inst) = inst else { continue };
            let n = per_slot.get(&(slot as u32)).copied().unwrap_or(0);
            if inst.stashed != n {
                return Err(InvariantError::Counter(format!(
                    "{}: {} stashed ports counted, {n} stashed",
                    inst.name, inst.stashed
                )));
            }
        }
        Ok(())
    }
}
