//! Flow-state export and import: what a restarted gateway (SPEC R11.1) or a fleet node taking
//! over another's instances (R10.4) needs to carry on with the same ports and timers.
//!
//! **What is carried.** A [`FlowState`] holds, in a versioned binary format
//! ([`FLOW_STATE_VERSION`], [`FlowState::encode`]/[`FlowState::decode`], checksummed):
//! - each PAT instance's block layout (which chunk of its public IP sits in which slot of the
//!   block, R2.4), so every exported port maps back to the same local port;
//! - every live flow: its translation, `last_seen`, TCP FIN/RST state and close time
//!   (R3.2–R3.4), and its first second;
//! - the per-destination port releases still inside `port_reuse_history_secs` (R2.3
//!   decision), so a port is not handed straight back to a server that may hold TIME_WAIT.
//!
//! Instances are named by their private address, the key a packet and a kernel map entry
//! carry, so flows read back from a fast path's map (which knows no names) fit the same record.
//!
//! **Import** ([`Engine::import_state`]) is for a freshly built engine with the topology that
//! was running when the state was exported, or for a running one taking over instances whose
//! blocks hold no flows yet (a fleet node, R10.4): it moves each such block to the exported
//! layout (a block that already has flows keeps its own), then
//! inserts the flows with their own `last_seen`, close times and state, holds their ports, and
//! queues their timers at their real deadlines, so a flow whose timer ran out while nobody ran
//! it is released at the next timer step with that deadline as its release time (R3.2–R3.4
//! exact to the second). A record that does not fit — unknown instance, other public address,
//! a port outside the block, a private or public 5-tuple already taken (R2.2) — is skipped and
//! counted in [`ImportReport`], never forced. A changed topology is applied afterwards with
//! [`Engine::apply`], as a live change, so R1.4/R2.9/R2.10 reclaim what they must.
//!
//! **Export** ([`Engine::export_step`]) works in bounded steps (about [`EXPORT_STEP`] units of
//! work each), so a caller holding the gateway lock per step keeps R9.4's latency bound; the
//! result is a fuzzy cut (each record is consistent, the set is the union of the steps'
//! views), which import tolerates by the checks above.
//!
//! This module does not read or write files, and does not talk to a kernel: the runtime does
//! both and merges what the kernel's map saw ([`FlowState::merge_seen`]).
//!
//! Not carried: port stashes of a kernel fast path (`stash`: a restart starts with none;
//! the releases the allocator took stashed ports from are carried as releases, and flows the
//! kernel opened from a stash meanwhile reach the new engine through
//! [`Engine::stash_opened`]), counters (Prometheus counters restart from zero, as after any restart), the
//! event log and aggregation state, NSG and inbound load-balancing state, the idle-reuse set
//! of `idle_reuse` (a symptom counter), takeover windows and port holds (`takeover`: they do
//! not survive a restart of the node that took over), port fences and port holds of all
//! destinations (`fence`: the fleet glue sets them again), and the order in which ports outside
//! the release history were last released (a preference, not a rule: R2.3 only orders within
//! the history).

use std::collections::HashMap;

use super::flows::Flow;
use super::journal::FlowKey;
use super::ports::{CHUNK, SLOTS};
use super::{timers, Engine, NONE};
use crate::packet::proto;
use crate::units::{Time, PORT_BASE};

/// The version [`FlowState::encode`] writes. [`FlowState::decode`] reads this version only; a
/// later version that adds fields will read older ones too.
pub const FLOW_STATE_VERSION: u16 = 1;

const MAGIC: [u8; 8] = *b"SNATFLOW";
const HEADER: usize = 8 + 2 + 2 + 4 + 4 + 4 + 4;
const LAYOUT_BYTES: usize = 4 + 4 + 2 * SLOTS;
const FLOW_BYTES: usize = 40;
const RELEASE_BYTES: usize = 24;

/// Units of work (flows or releases copied) one [`Engine::export_step`] does at most.
pub const EXPORT_STEP: usize = 16_384;

/// One live flow as exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    /// The translation.
    pub key: FlowKey,
    /// Last packet either way (engine seconds).
    pub last_seen: Time,
    /// When its FIN-both or RST closes it (0: not closing), R3.2, R3.3.
    pub close_at: Time,
    /// TCP FIN/RST bits (bit 0 FIN out, bit 1 FIN in, bit 2 RST).
    pub tcp_state: u8,
    /// The low 16 bits of its first second.
    pub born: u16,
}

/// A port release remembered for a destination (R2.3 decision).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReleaseRecord {
    /// The instance's private address.
    pub private_ip: u32,
    /// IP protocol.
    pub proto: u8,
    /// Destination address.
    pub dst: u32,
    /// Destination port.
    pub dport: u16,
    /// Public port released.
    pub pport: u16,
    /// When.
    pub at: Time,
}

/// An instance's block: chunk base port per slot (0 = empty), R2.4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    /// The instance's private address.
    pub private_ip: u32,
    /// The public address the chunks belong to.
    pub public: u32,
    /// Chunk base port per slot of the block.
    pub chunks: [u16; SLOTS],
}

/// Flow state of an engine, as exported (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Engine time of the export.
    pub time: Time,
    /// Block layouts of PAT instances.
    pub layouts: Vec<BlockLayout>,
    /// Live flows.
    pub flows: Vec<FlowRecord>,
    /// Releases within the reuse history.
    pub releases: Vec<ReleaseRecord>,
}

/// Why bytes are not a [`FlowState`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The bytes do not start with the format's magic number.
    #[error("not a snatgw flow state (bad magic)")]
    Magic,
    /// Written by a version this build does not read.
    #[error("flow state version {0} (this build reads version {FLOW_STATE_VERSION})")]
    Version(u16),
    /// Shorter or longer than its header says.
    #[error("flow state truncated or padded: {0} bytes where the header says {1}")]
    Length(usize, usize),
    /// The checksum does not match (a torn or corrupted write).
    #[error("flow state checksum mismatch")]
    Checksum,
}

/// What [`Engine::import_state`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Flows restored.
    pub flows: u64,
    /// Flows skipped: no such instance, another public address, or not a PAT instance.
    pub skipped_instance: u64,
    /// Flows skipped: the port is not in the instance's block.
    pub skipped_port: u64,
    /// Flows skipped: their private or public 5-tuple is already taken (R2.2).
    pub skipped_conflict: u64,
    /// Blocks moved to their exported layout.
    pub layouts: u64,
    /// Layout chunks that could not be given back (owned by another instance).
    pub layout_conflicts: u64,
    /// Releases put back into the reuse history.
    pub releases: u64,
}

/// Why an exported record does not fit this engine ([`ImportReport`] counts them apart).
pub(super) enum Misfit {
    /// No such PAT instance on that public address.
    Instance,
    /// The port is not in the instance's block.
    Port,
}

/// Where an export stands (see [`Engine::export_step`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportCursor {
    phase: u8,
    pos: u32,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (a, b) = self.0.split_at(N);
        self.0 = b;
        a.try_into().expect("length checked")
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
}

impl FlowState {
    /// Appends the state, in format version [`FLOW_STATE_VERSION`], to `out`: a header
    /// (magic, version, counts), fixed-size little-endian records, and a checksum of all of it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.reserve(
            HEADER
                + 8
                + self.layouts.len() * LAYOUT_BYTES
                + self.flows.len() * FLOW_BYTES
                + self.releases.len() * RELEASE_BYTES,
        );
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FLOW_STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.time.to_le_bytes());
        out.extend_from_slice(&(self.layouts.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.flows.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.releases.len() as u32).to_le_bytes());
        for l in &self.layouts {
            out.extend_from_slice(&l.private_ip.to_le_bytes());
            out.extend_from_slice(&l.public.to_le_bytes());
            for c in l.chunks {
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
        for f in &self.flows {
            let k = &f.key;
            out.extend_from_slice(&k.src.to_le_bytes());
            out.extend_from_slice(&k.dst.to_le_bytes());
            out.extend_from_slice(&k.public.to_le_bytes());
            out.extend_from_slice(&k.sport.to_le_bytes());
            out.extend_from_slice(&k.dport.to_le_bytes());
            out.extend_from_slice(&k.pport.to_le_bytes());
            out.push(k.proto);
            out.push(f.tcp_state);
            out.extend_from_slice(&f.last_seen.to_le_bytes());
            out.extend_from_slice(&f.close_at.to_le_bytes());
            out.extend_from_slice(&f.born.to_le_bytes());
            out.extend_from_slice(&[0u8; 10]);
        }
        for r in &self.releases {
            out.extend_from_slice(&r.private_ip.to_le_bytes());
            out.extend_from_slice(&r.dst.to_le_bytes());
            out.extend_from_slice(&r.at.to_le_bytes());
            out.extend_from_slice(&r.dport.to_le_bytes());
            out.extend_from_slice(&r.pport.to_le_bytes());
            out.push(r.proto);
            out.extend_from_slice(&[0u8; 7]);
        }
        let sum = crate::hash::checksum64(&out[start..]);
        out.extend_from_slice(&sum.to_le_bytes());
    }

    /// Reads a state [`FlowState::encode`] wrote; refuses anything torn, padded or corrupted.
    pub fn decode(b: &[u8]) -> Result<FlowState, StateError> {
        if b.len() < 8 || b[..8] != MAGIC {
            return Err(StateError::Magic);
        }
        if b.len() < HEADER + 8 {
            return Err(StateError::Length(b.len(), HEADER + 8));
        }
        let mut r = Reader(&b[8..HEADER]);
        let version = r.u16();
        if version != FLOW_STATE_VERSION {
            return Err(StateError::Version(version));
        }
        let _flags = r.u16();
        let time = r.u32();
        let (nl, nf, nr) = (r.u32() as usize, r.u32() as usize, r.u32() as usize);
        let want = HEADER
            .saturating_add(nl.saturating_mul(LAYOUT_BYTES))
            .saturating_add(nf.saturating_mul(FLOW_BYTES))
            .saturating_add(nr.saturating_mul(RELEASE_BYTES))
            .saturating_add(8);
        if b.len() != want {
            return Err(StateError::Length(b.len(), want));
        }
        let (body, sum) = b.split_at(want - 8);
        if crate::hash::checksum64(body) != u64::from_le_bytes(sum.try_into().expect("8 bytes")) {
            return Err(StateError::Checksum);
        }
        let mut r = Reader(&body[HEADER..]);
        let mut st = FlowState {
            time,
            layouts: Vec::with_capacity(nl),
            flows: Vec::with_capacity(nf),
            releases: Vec::with_capacity(nr),
        };
        for _ in 0..nl {
            let private_ip = r.u32();
            let public = r.u32();
            let mut chunks = [0u16; SLOTS];
            for c in &mut chunks {
                *c = r.u16();
            }
            st.layouts.push(BlockLayout {
                private_ip,
                public,
                chunks,
            });
        }
        for _ in 0..nf {
            let (src, dst, public) = (r.u32(), r.u32(), r.u32());
            let (sport, dport, pport) = (r.u16(), r.u16(), r.u16());
            let proto = r.u8();
            let tcp_state = r.u8();
            let (last_seen, close_at) = (r.u32(), r.u32());
            let born = r.u16();
            r.take::<10>();
            st.flows.push(FlowRecord {
                key: FlowKey {
                    proto,
                    src,
                    sport,
                    dst,
                    dport,
                    public,
                    pport,
                },
                last_seen,
                close_at,
                tcp_state,
                born,
            });
        }
        for _ in 0..nr {
            let (private_ip, dst, at) = (r.u32(), r.u32(), r.u32());
            let (dport, pport) = (r.u16(), r.u16());
            let proto = r.u8();
            r.take::<7>();
            st.releases.push(ReleaseRecord {
                private_ip,
                proto,
                dst,
                dport,
                pport,
                at,
            });
        }
        Ok(st)
    }

    /// Merges what a fast path's map saw since the state was written: `(translation, last
    /// packet)` per flow installed there (engine seconds, `None` if the kernel saw no packet
    /// of it; the map knows no TCP state). A flow the state lacks and the kernel saw no packet
    /// of counts as seen at `unseen_at` (the restart's time: later than the truth, so its port
    /// is never released early). A flow
    /// the state has with the same translation gets the later `last_seen`; a flow the state
    /// has with another public side is replaced (the map is newer: the port was reused after
    /// the state was written); a flow the state lacks (opened since) is added as open. Map
    /// flows are put first, so on import they win any public 5-tuple conflict with a stale
    /// record of the state.
    pub fn merge_seen(
        &mut self,
        seen: impl IntoIterator<Item = (FlowKey, Option<Time>)>,
        unseen_at: Time,
    ) {
        type Fwd = (u8, u32, u16, u32, u16);
        let fwd = |k: &FlowKey| -> Fwd { (k.proto, k.src, k.sport, k.dst, k.dport) };
        let mut old: HashMap<Fwd, FlowRecord> =
            self.flows.drain(..).map(|f| (fwd(&f.key), f)).collect();
        let mut merged = Vec::with_capacity(old.len());
        for (key, t) in seen {
            let rec = match old.remove(&fwd(&key)) {
                Some(mut f) if f.key == key => {
                    if let Some(t) = t {
                        f.last_seen = f.last_seen.max(t);
                    }
                    f
                }
                _ => {
                    let t = t.unwrap_or(unseen_at);
                    FlowRecord {
                        key,
                        last_seen: t,
                        close_at: 0,
                        tcp_state: 0,
                        born: t as u16,
                    }
                }
            };
            merged.push(rec);
        }
        let mut rest: Vec<FlowRecord> = old.into_values().collect();
        rest.sort_unstable_by_key(|f| {
            (f.key.proto, f.key.src, f.key.sport, f.key.dst, f.key.dport)
        });
        merged.extend(rest);
        self.flows = merged;
    }
}

impl Engine {
    /// One bounded step of an export into `out` (at most about [`EXPORT_STEP`] flows or
    /// releases copied); returns whether the export is complete. Start with a default
    /// [`ExportCursor`] and an empty `out`; between steps the engine may run (see the module
    /// documentation: the result is a fuzzy cut that import tolerates).
    pub fn export_step(&self, cur: &mut ExportCursor, out: &mut FlowState) -> bool {
        out.time = out.time.max(self.now);
        loop {
            match cur.phase {
                0 => {
                    for i in self.insts.iter().flatten() {
                        if i.scenario.is_pat() && i.n_chunks() > 0 {
                            out.layouts.push(BlockLayout {
                                private_ip: i.private_ip,
                                public: i.scenario.addr(),
                                chunks: i.chunks,
                            });
                        }
                    }
                    // Stashes are not exported (`stash`); the releases the allocator took
                    // their ports from are, so a restart keeps R2.3's order for them.
                    let horizon = self.topo.params.reuse_history;
                    for (slot, dst, dport, idx, at) in self.stash_history() {
                        if horizon == 0 || at.saturating_add(horizon) <= self.now {
                            continue;
                        }
                        let Some(Some(inst)) = self.insts.get(slot as usize) else {
                            continue;
                        };
                        out.releases.push(ReleaseRecord {
                            private_ip: inst.private_ip,
                            proto: proto::TCP,
                            dst,
                            dport,
                            pport: inst.port_of(idx),
                            at,
                        });
                    }
                    *cur = ExportCursor { phase: 1, pos: 0 };
                }
                1 => {
                    let end = self.flows.slab_len();
                    let stop = cur.pos.saturating_add(EXPORT_STEP as u32).min(end);
                    for fi in cur.pos..stop {
                        let f = self.flows.get(fi);
                        if f.block == NONE {
                            continue;
                        }
                        out.flows.push(FlowRecord {
                            key: FlowKey::of(f),
                            last_seen: f.last_seen,
                            close_at: f.close_at,
                            tcp_state: f.state,
                            born: f.born,
                        });
                    }
                    *cur = if stop >= end {
                        ExportCursor { phase: 2, pos: 0 }
                    } else {
                        ExportCursor {
                            phase: 1,
                            pos: stop,
                        }
                    };
                    return false;
                }
                2 => {
                    // One shard of the release history per step.
                    let shard = cur.pos as usize;
                    if shard >= self.history.shards() {
                        *cur = ExportCursor { phase: 3, pos: 0 };
                        return true;
                    }
                    let horizon = self.topo.params.reuse_history;
                    for (block, dst, dport, idx, at) in self.history.shard_entries(shard) {
                        if horizon == 0 || at.saturating_add(horizon) <= self.now {
                            continue;
                        }
                        let slot = block >> 1;
                        let Some(Some(inst)) = self.insts.get(slot as usize) else {
                            continue;
                        };
                        if !inst.scenario.is_pat() || inst.chunks[(idx / CHUNK) as usize] == 0 {
                            continue;
                        }
                        out.releases.push(ReleaseRecord {
                            private_ip: inst.private_ip,
                            proto: if block & 1 == 1 {
                                proto::UDP
                            } else {
                                proto::TCP
                            },
                            dst,
                            dport,
                            pport: inst.port_of(idx),
                            at,
                        });
                    }
                    cur.pos += 1;
                    return false;
                }
                _ => return true,
            }
        }
    }

    /// The whole state at once (tests, the planner, small tables). A gateway exports with
    /// [`Engine::export_step`] so the lock is never held long.
    pub fn export_state(&self) -> FlowState {
        let mut cur = ExportCursor::default();
        let mut out = FlowState::default();
        while !self.export_step(&mut cur, &mut out) {}
        out
    }

    /// Restores exported flows into this engine (see the module documentation). Meant for an
    /// engine just built with the topology the state was exported under, before it decides
    /// any packet; the engine's time should be at least the export's (timers due in between
    /// run at the next step, with their real deadlines). A live flow already in the engine
    /// wins over a record of the same 5-tuple.
    pub fn import_state(&mut self, st: &FlowState) -> ImportReport {
        let mut rep = ImportReport::default();
        self.import_layouts(&st.layouts, &mut rep);
        for f in &st.flows {
            self.import_flow(f, &mut rep);
        }
        self.import_releases(&st.releases, &mut rep);
        rep
    }

    /// The slot and the local port index of `pport` for the PAT instance at `private_ip` on
    /// `public`, if the port is in its block (also `stash`'s lookup).
    pub(super) fn local_port(
        &self,
        private_ip: u32,
        public: u32,
        pport: u16,
    ) -> Result<(u32, u16), Misfit> {
        let &slot = self.by_private.get(&private_ip).ok_or(Misfit::Instance)?;
        let inst = self.insts[slot as usize].as_ref().ok_or(Misfit::Instance)?;
        if !inst.scenario.is_pat() || inst.scenario.addr() != public {
            return Err(Misfit::Instance);
        }
        if pport < PORT_BASE {
            return Err(Misfit::Port);
        }
        let base = pport - (pport - PORT_BASE) % CHUNK;
        let s = inst
            .chunks
            .iter()
            .position(|&c| c == base)
            .ok_or(Misfit::Port)?;
        Ok((slot, s as u16 * CHUNK + (pport - base)))
    }

    fn import_layouts(&mut self, layouts: &[BlockLayout], rep: &mut ImportReport) {
        // The slots whose layout changes, and the chunks they want.
        let mut moves: Vec<(u32, [u16; SLOTS])> = Vec::new();
        for l in layouts {
            let Some(&slot) = self.by_private.get(&l.private_ip) else {
                continue;
            };
            let Some(inst) = self.insts[slot as usize].as_ref() else {
                continue;
            };
            if !inst.scenario.is_pat() || inst.scenario.addr() != l.public {
                continue;
            }
            if inst.chunks == l.chunks {
                continue;
            }
            if self.blocks[slot as usize * 2].flows() > 0
                || self.blocks[slot as usize * 2 + 1].flows() > 0
            {
                // A running engine's block with flows of its own (a fleet node taking an
                // instance back, R10.4) keeps its layout: records that do not fit it are
                // skipped as `skipped_port`.
                rep.layout_conflicts += 1;
                continue;
            }
            moves.push((slot, l.chunks));
        }
        // First give back every chunk of a block that moves (no flows hold them yet), then
        // take the exported ones, so two blocks can swap chunks.
        for &(slot, _) in &moves {
            for s in 0..SLOTS {
                self.free_chunk_slot(slot, s);
            }
        }
        for (slot, want) in moves {
            let addr = self.insts[slot as usize]
                .as_ref()
                .expect("instance")
                .scenario
                .addr();
            let Some(pip) = self.pips.get(&addr) else {
                continue;
            };
            let mut grants = Vec::new();
            let mut taken = Vec::new();
            for (s, &base) in want.iter().enumerate() {
                if base == 0 {
                    continue;
                }
                let valid = base >= PORT_BASE && (base - PORT_BASE).is_multiple_of(CHUNK);
                let c = ((base.wrapping_sub(PORT_BASE)) / CHUNK) as usize;
                if !valid || c >= pip.owner.len() || pip.owner[c] != NONE || taken.contains(&c) {
                    rep.layout_conflicts += 1;
                    continue;
                }
                taken.push(c);
                grants.push((s, base));
            }
            self.grant_chunks(slot, &grants);
            rep.layouts += 1;
        }
        if rep.layout_conflicts > 0 {
            // Blocks left short by a conflict grow back to their tier from free chunks.
            let pat: Vec<u32> = self
                .insts
                .iter()
                .enumerate()
                .filter_map(|(s, i)| i.as_ref().filter(|i| i.scenario.is_pat()).map(|_| s as u32))
                .collect();
            for s in pat {
                self.grow_block(s);
            }
        }
    }
    fn import_flow(&mut self, r: &FlowRecord, rep: &mut ImportReport) {
        let k = r.key;
        let l4 = match k.proto {
            proto::TCP => 0u32,
            proto::UDP => 1,
            _ => {
                rep.skipped_instance += 1;
                return;
            }
        };
        let (slot, idx) = match self.local_port(k.src, k.public, k.pport) {
            Ok(x) => x,
            Err(Misfit::Instance) => {
                rep.skipped_instance += 1;
                return;
            }
            Err(Misfit::Port) => {
                rep.skipped_port += 1;
                return;
            }
        };
        let block_id = slot * 2 + l4;
        if !self.blocks[block_id as usize].owned.get(idx)
            || self
                .flows
                .find_fwd(k.proto, k.src, k.sport, k.dst, k.dport)
                .is_some()
            || self
                .flows
                .find_rev(k.proto, k.public, k.pport, k.dst, k.dport)
                .is_some()
        {
            rep.skipped_conflict += 1;
            return;
        }
        // A stash holding the port for this destination gives way (`stash`, R2.2).
        self.stash_void_conflict(block_id, k.dst, k.dport, idx);
        self.blocks[block_id as usize].hold(idx);
        let f = Flow {
            src: k.src,
            dst: k.dst,
            public: k.public,
            block: block_id,
            gen: 0,
            prev: NONE,
            next: NONE,
            last_seen: r.last_seen,
            close_at: if k.proto == proto::TCP { r.close_at } else { 0 },
            sport: k.sport,
            dport: k.dport,
            pport: k.pport,
            idx,
            proto: k.proto,
            state: if k.proto == proto::TCP {
                r.tcp_state & 7
            } else {
                0
            },
            born: r.born,
        };
        if let Some(i) = self.insts[slot as usize].as_mut() {
            i.live += 1;
            i.stats[l4 as usize].restored += 1;
        }
        let (fi, gen) = self.flows.insert(f);
        let at = timers::deadline(&f, self.topo.params.idle_timeout).0;
        self.wheel.push(at, fi, gen);
        self.global.flows_restored += 1;
        self.journal_opened(fi, self.now, false);
        rep.flows += 1;
    }

    fn import_releases(&mut self, releases: &[ReleaseRecord], rep: &mut ImportReport) {
        let horizon = self.topo.params.reuse_history;
        if horizon == 0 {
            return;
        }
        let mut rs: Vec<&ReleaseRecord> = releases
            .iter()
            .filter(|r| r.at.saturating_add(horizon) > self.now)
            .collect();
        rs.sort_by_key(|r| r.at);
        for r in rs {
            let l4 = match r.proto {
                proto::TCP => 0u32,
                proto::UDP => 1,
                _ => continue,
            };
            let Some(&slot) = self.by_private.get(&r.private_ip) else {
                continue;
            };
            let Some(public) = self.insts[slot as usize]
                .as_ref()
                .map(|i| i.scenario.addr())
            else {
                continue;
            };
            let Ok((slot, idx)) = self.local_port(r.private_ip, public, r.pport) else {
                continue;
            };
            let block_id = slot * 2 + l4;
            self.history
                .record(block_id, r.dst, r.dport, idx, r.at, horizon);
            self.blocks[block_id as usize].requeue_released(idx);
            rep.releases += 1;
        }
    }
}
