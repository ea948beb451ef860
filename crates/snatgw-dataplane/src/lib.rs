//! snatgw-dataplane: the one entry point of the data plane, [`Gateway::process`].
//!
//! It parses a raw IPv4 packet with `snatgw-wire`, asks the `snatgw-core` engine for a verdict,
//! and rewrites the packet in place with incremental checksums. It adds what only makes sense
//! with bytes in hand:
//!
//! - **ICMP errors (SPEC R3.6).** An error from the internet about a translated flow quotes the
//!   packet the instance sent *after* translation; the gateway finds the flow by that quoted
//!   public 5-tuple and rewrites both the outer destination and the quoted source back to the
//!   private address and port, so path MTU discovery and port-unreachable work. An error an
//!   instance sends about an inbound packet (ILPIP, or return traffic of a flow) is translated the
//!   mirror way. Errors match existing flows only: they never create or refresh a flow.
//!   ICMP echo through PAT is dropped and counted as `icmp_echo_via_pat` (decision: the seeds
//!   list TCP and UDP for PAT, R1.2/R1.3); through an ILPIP it is translated (R1.1).
//! - **IPv4 fragments (decision).** The first fragment carries the ports: it gets its verdict
//!   like any packet, and its translation (new address) is remembered for 30 s under
//!   (protocol, source, destination, identification). Later fragments with the same key get
//!   the same address rewrite. A later fragment with no remembered first fragment — out of
//!   order, or after the 30 s — is dropped as `fragment_unmatched`, so nothing leaves with a
//!   private source address. The table holds at most 65 536 datagrams (oldest evicted).
//! - **Malformed packets** are dropped as `malformed`, counted by the wire error's reason too.
//! - **Fail fast (SPEC R9.5).** With `gateway.on_exhaustion = "reset"`, an instance's new
//!   flow refused for want of a port (R2.6) or over a flow limit (R9.2) is answered:
//!   [`Gateway::process_in`] rewrites the refused packet, in the caller's buffer, into a TCP
//!   RST (for a SYN) or an ICMP destination unreachable, code 13 (for a UDP datagram), from
//!   the destination to the instance, and returns [`Outcome::Answer`]: the caller sends it
//!   back out of the side it came from, where the kernel routes it to the instance. The
//!   engine decides and rate-limits per instance (`Engine::fail_fast`); the refusal is
//!   counted under its drop reason either way. [`Gateway::process`], which has no room to
//!   grow a packet, never answers.
//!
//! It does not do packet I/O (that is `snatgw-io`), routing, reassembly, or TTL handling (the
//! kernel routes what the gateway writes back).
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use hashbrown::HashMap;
pub use snatgw_core::packet::Answer;
use snatgw_core::{
    proto, ApplyReport, ConfigError, Direction, DropReason, Engine, Packet, Time, Topology, Verdict,
};
use snatgw_wire::{
    parse, rewrite_dst, rewrite_icmp_error_inbound, rewrite_icmp_error_outbound, rewrite_src, Frag,
    IcmpKind, Summary, WireError,
};

mod answer;
// The fuzz harness: feature `fuzzing`, off by default (the fuzz target, tests, benches).
#[cfg(feature = "fuzzing")]
pub mod fuzzing;

/// How long a first fragment's translation is remembered (as Linux's `ipfrag_time`).
pub const FRAGMENT_TTL: Time = 30;
/// Most datagrams whose fragments are tracked at once.
pub const FRAGMENT_CAP: usize = 65_536;

/// Data-plane counters (the engine keeps its own, [`Engine::global_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataplaneStats {
    /// Packets translated.
    pub translated: u64,
    /// Packets passed unchanged (R1.7).
    pub passed: u64,
    /// Packets dropped, by [`DropReason`] (all reasons, engine's included).
    pub drops: [u64; DropReason::COUNT],
    /// Malformed packets by wire error label.
    pub malformed: std::collections::BTreeMap<&'static str, u64>,
    /// ICMP errors translated (R3.6).
    pub icmp_errors: u64,
    /// Later fragments translated by a remembered first fragment.
    pub fragments: u64,
    /// Refusals the engine would have answered (SPEC R9.5) but whose answer did not fit the
    /// caller's buffer (an ICMP answer needs the quoted header + 36 bytes): dropped
    /// unanswered, and not counted as answered or suppressed by the engine.
    pub fail_fast_no_room: u64,
}

/// Whether this gateway may open new outbound flows for the instance at a private address
/// ([`Gateway::set_admission`]). Called only for packets that would open a flow.
pub use snatgw_core::Admission;

/// What [`Gateway::process_in`] did with a packet, and what the caller sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Send the packet on, same length: translated (the buffer holds the translation) or
    /// passed unchanged. Holds [`Verdict::Translate`] or [`Verdict::Pass`].
    Forward(Verdict),
    /// Send nothing; counted under the reason.
    Drop(DropReason),
    /// SPEC R9.5: the packet was refused (counted under `reason`, exactly as a drop) and the
    /// buffer now holds `answer`, `len` bytes from its start, addressed to the instance: send
    /// it back out of the side the packet came from.
    Answer {
        /// Why the packet was refused (`ports_exhausted` or `flow_limit`).
        reason: DropReason,
        /// The answer written.
        answer: Answer,
        /// Its length in bytes.
        len: usize,
    },
}

impl Outcome {
    /// The verdict on the packet itself (an answered refusal is a [`Verdict::Drop`]).
    #[inline(always)]
    pub fn verdict(&self) -> Verdict {
        match *self {
            Outcome::Forward(v) => v,
            Outcome::Drop(r) | Outcome::Answer { reason: r, .. } => Verdict::Drop(r),
        }
    }
}

type FragKey = (u8, u32, u32, u16);

/// The data plane: an [`Engine`] plus fragment tracking and byte rewriting.
pub struct Gateway {
    engine: Engine,
    frags: HashMap<FragKey, (u32, Time)>,
    frag_q: VecDeque<(Time, FragKey)>,
    stats: DataplaneStats,
    /// The parse of the last packet `process` refused for exhaustion or a flow limit, taken
    /// by `process_in` to answer it (R9.5).
    refused: Option<Summary>,
}

impl Gateway {
    /// Wraps an engine.
    pub fn new(engine: Engine) -> Gateway {
        Gateway {
            engine,
            frags: HashMap::new(),
            frag_q: VecDeque::new(),
            stats: DataplaneStats::default(),
            refused: None,
        }
    }

    /// Restricts new outbound flows to the instances `admission` allows (a fleet node's
    /// self-fencing, R10.2): see [`Engine::set_admission`]. A refused packet comes back as
    /// [`Outcome::Drop`] with [`DropReason::NotOwned`], unchanged, for the caller to forward
    /// to the owner (R10.3). The check is the engine's, on its new-flow path: an established
    /// flow's packet never reaches it.
    pub fn set_admission(&mut self, admission: Option<Admission>) {
        self.engine.set_admission(admission);
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine, mutably (to advance time or read events).
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Counters.
    pub fn stats(&self) -> &DataplaneStats {
        &self.stats
    }

    /// Applies a new configuration (see [`Engine::apply`]); on error nothing changes.
    pub fn apply(&mut self, now: Time, topo: Topology) -> Result<ApplyReport, ConfigError> {
        self.engine.apply(now, topo)
    }

    fn drop(&mut self, r: DropReason) -> Verdict {
        self.stats.drops[r as usize] += 1;
        Verdict::Drop(r)
    }

    fn malformed(&mut self, e: WireError) -> Verdict {
        *self.stats.malformed.entry(e.reason()).or_default() += 1;
        self.drop(DropReason::Malformed)
    }

    /// Decides one raw IPv4 packet travelling `dir` at `now` and rewrites it in place.
    /// `dir` is the side the packet arrived on (SPEC R9.1): the caller knows it from the
    /// interface, never from the packet's addresses. `Translate`: the buffer holds the
    /// translated packet; `Pass`: unchanged; `Drop`: do not send it (the buffer may be left as
    /// it was). Never answers a refusal (SPEC R9.5: see [`Gateway::process_in`]).
    pub fn process(&mut self, now: Time, pkt: &mut [u8], dir: Direction) -> Verdict {
        let s = match parse(pkt) {
            Ok(s) => s,
            Err(e) => return self.malformed(e),
        };
        // R9.1: nothing from the internet may speak for an instance. (A private-side packet
        // from an address that is no instance is refused by the engine for new flows, and
        // below for the paths that bypass it.)
        if dir == Direction::Inbound && self.engine.topology().in_vnet(s.src) {
            return self.drop(DropReason::VnetSourceFromPublic);
        }
        if let Frag::NonFirst { ident, .. } = s.frag {
            return self.later_fragment(now, pkt, &s, dir, ident);
        }
        if let Some(IcmpKind::Error { .. }) = s.icmp {
            return self.icmp_error(now, pkt, &s, dir);
        }
        let flags = if s.proto == proto::ICMP {
            pkt.get(s.l3_len as usize).copied().unwrap_or(0)
        } else {
            s.tcp_flags
        };
        let has_ports = s.proto == proto::TCP || s.proto == proto::UDP;
        let facts = Packet {
            proto: s.proto,
            src: s.src,
            dst: s.dst,
            src_port: if has_ports { s.src_port } else { 0 },
            dst_port: if has_ports { s.dst_port } else { 0 },
            flags,
        };
        let v = self.engine.process(now, dir, &facts);
        match v {
            Verdict::Translate { addr, port } => {
                let new_port = (has_ports
                    && port
                        != if dir == Direction::Outbound {
                            s.src_port
                        } else {
                            s.dst_port
                        })
                .then_some(port);
                let r = match dir {
                    Direction::Outbound => rewrite_src(pkt, &s, addr, new_port),
                    Direction::Inbound => rewrite_dst(pkt, &s, addr, new_port),
                };
                if let Err(e) = r {
                    return self.malformed(e);
                }
                if let Frag::First { ident, .. } = s.frag {
                    self.remember_fragment(now, (s.proto, s.src, s.dst, ident), addr);
                }
                self.stats.translated += 1;
            }
            Verdict::Pass => self.stats.passed += 1,
            Verdict::Drop(r) => {
                self.stats.drops[r as usize] += 1;
                if matches!(r, DropReason::PortsExhausted | DropReason::FlowLimit) {
                    self.note_refused(&s);
                }
            }
        }
        v
    }

    /// [`Gateway::process`] for a packet of `len` bytes at the start of `buf`, a buffer with
    /// room behind it (a batch slot), so that a refused new flow can be answered in place
    /// (SPEC R9.5, `gateway.on_exhaustion = "reset"`): then the result is
    /// [`Outcome::Answer`] and `buf[..len]` holds the answer. An ICMP answer needs up to
    /// 96 bytes; with less room the refusal is only dropped (`fail_fast_no_room`). A `len`
    /// beyond `buf` is treated as `buf.len()`.
    #[inline]
    pub fn process_in(&mut self, now: Time, buf: &mut [u8], len: usize, dir: Direction) -> Outcome {
        let len = len.min(buf.len());
        match self.process(now, &mut buf[..len], dir) {
            Verdict::Drop(r @ (DropReason::PortsExhausted | DropReason::FlowLimit))
                if dir == Direction::Outbound =>
            {
                match self.answer(now, buf, len, r) {
                    Some((answer, len)) => Outcome::Answer {
                        reason: r,
                        answer,
                        len,
                    },
                    None => Outcome::Drop(r),
                }
            }
            Verdict::Drop(r) => Outcome::Drop(r),
            v => Outcome::Forward(v),
        }
    }

    /// Keeps the parse of a packet refused for exhaustion or a flow limit, for
    /// `process_in` to answer it (R9.5) without parsing again. Out of line: the hot path
    /// only passes a pointer.
    #[cold]
    #[inline(never)]
    fn note_refused(&mut self, s: &Summary) {
        self.refused = Some(*s);
    }

    /// SPEC R9.5: answers the refusal (for `reason`) of the packet `buf[..len]` if the
    /// engine says so, the answer fits and the instance's rate limit allows it. The packet is
    /// as it arrived ([`Gateway::process`] rewrites nothing it refuses) and `process` left
    /// its parse in `refused`. Measured with `examples/hotpath`: carrying the parse out of
    /// `process` in its return value, or parsing again here, cost every established packet
    /// 26 to 40 instructions (`parse` and the engine's verdict are inlined into `process`
    /// only while it is their one caller in this crate); sharing `facts` with `process`, 10.
    /// As it is, `process` runs the same 470 instructions per established packet as before.
    #[cold]
    #[inline(never)]
    fn answer(
        &mut self,
        now: Time,
        buf: &mut [u8],
        len: usize,
        reason: DropReason,
    ) -> Option<(Answer, usize)> {
        let s = self.refused.take()?;
        let facts = facts(&s, &buf[..len]);
        let a = self.engine.fail_fast(&facts, reason)?;
        let need = answer::room(a, buf, &s)?;
        if need > buf.len() {
            self.stats.fail_fast_no_room += 1;
            return None;
        }
        if !self.engine.fail_fast_admit(now, &facts, a) {
            return None;
        }
        Some((a, answer::write(a, buf, &s)))
    }

    fn remember_fragment(&mut self, now: Time, key: FragKey, addr: u32) {
        self.expire_fragments(now);
        if self.frags.len() >= FRAGMENT_CAP {
            if let Some((_, k)) = self.frag_q.pop_front() {
                self.frags.remove(&k);
            }
        }
        self.frags.insert(key, (addr, now + FRAGMENT_TTL));
        self.frag_q.push_back((now + FRAGMENT_TTL, key));
    }

    fn expire_fragments(&mut self, now: Time) {
        // Bounded per call (R9.4); a lookup checks the entry's own expiry anyway.
        let mut budget = 1024;
        while let Some(&(t, k)) = self.frag_q.front() {
            if t > now || budget == 0 {
                break;
            }
            budget -= 1;
            self.frag_q.pop_front();
            if self.frags.get(&k).is_some_and(|&(_, exp)| exp <= now) {
                self.frags.remove(&k);
            }
        }
    }

    fn later_fragment(
        &mut self,
        now: Time,
        pkt: &mut [u8],
        s: &Summary,
        dir: Direction,
        ident: u16,
    ) -> Verdict {
        self.expire_fragments(now);
        let Some(&(addr, _)) = self
            .frags
            .get(&(s.proto, s.src, s.dst, ident))
            .filter(|&&(_, exp)| exp > now)
        else {
            // Fragments inside the VNet are never translated (R1.7), but only an instance may
            // send them through (R9.1).
            if dir == Direction::Outbound && self.engine.topology().in_vnet(s.dst) {
                if !self.engine.is_instance(s.src) {
                    return self.drop(DropReason::UnknownSource);
                }
                self.stats.passed += 1;
                return Verdict::Pass;
            }
            return self.drop(DropReason::FragmentUnmatched);
        };
        let r = match dir {
            Direction::Outbound => rewrite_src(pkt, s, addr, None),
            Direction::Inbound => rewrite_dst(pkt, s, addr, None),
        };
        if let Err(e) = r {
            return self.malformed(e);
        }
        self.stats.fragments += 1;
        self.stats.translated += 1;
        Verdict::Translate { addr, port: 0 }
    }

    fn icmp_error(&mut self, now: Time, pkt: &mut [u8], s: &Summary, dir: Direction) -> Verdict {
        let Some(IcmpKind::Error { inner, .. }) = s.icmp else {
            return self.drop(DropReason::Malformed);
        };
        // Bounded (R9.4); the lookups below skip flows past their deadline.
        let budget = self.engine.expiry_budget();
        self.engine.advance_bounded(now, budget);
        if dir == Direction::Outbound && !self.engine.is_instance(s.src) {
            return self.drop(DropReason::UnknownSource);
        }
        if dir == Direction::Outbound && self.engine.topology().in_vnet(s.dst) {
            self.stats.passed += 1;
            return Verdict::Pass;
        }
        // The quoted packet crossed the gateway the other way, so its translated side is the
        // outer packet's side on the gateway: inbound, the quoted source is our public address;
        // outbound, the quoted destination is the instance.
        let (ours, our_port, remote, remote_port, outer_ours) = match dir {
            Direction::Inbound => (inner.src, inner.src_port, inner.dst, inner.dst_port, s.dst),
            Direction::Outbound => (inner.dst, inner.dst_port, inner.src, inner.src_port, s.src),
        };
        if ours != outer_ours {
            return self.drop(DropReason::IcmpErrorNoFlow);
        }
        let ported = inner.has_ports && (inner.proto == proto::TCP || inner.proto == proto::UDP);
        let found = match (dir, ported) {
            (Direction::Inbound, true) => {
                self.engine
                    .lookup_inbound(inner.proto, ours, our_port, remote, remote_port)
            }
            (Direction::Outbound, true) => {
                self.engine
                    .lookup_outbound(inner.proto, ours, our_port, remote, remote_port)
            }
            // Without TCP/UDP ports only an ILPIP (stateless 1:1) can be matched.
            (Direction::Inbound, false) => self.engine.ilpip_private(ours).map(|a| (a, our_port)),
            (Direction::Outbound, false) => self.engine.ilpip_public(ours).map(|a| (a, our_port)),
        };
        let Some((addr, port)) = found else {
            return self.drop(DropReason::IcmpErrorNoFlow);
        };
        let port = (inner.has_ports && port != our_port).then_some(port);
        let r = match dir {
            Direction::Inbound => rewrite_icmp_error_inbound(pkt, s, addr, addr, port),
            Direction::Outbound => rewrite_icmp_error_outbound(pkt, s, addr, addr, port),
        };
        if let Err(e) = r {
            return self.malformed(e);
        }
        self.stats.icmp_errors += 1;
        self.stats.translated += 1;
        Verdict::Translate {
            addr,
            port: port.unwrap_or(0),
        }
    }
}

/// What the engine is told about a parsed packet: its protocol, addresses, ports (TCP/UDP)
/// and TCP flags or ICMP type. The same as `Gateway::process` computes in line (see
/// `Gateway::answer` for why it does not call this).
#[inline(always)]
fn facts(s: &Summary, pkt: &[u8]) -> Packet {
    let flags = if s.proto == proto::ICMP {
        pkt.get(s.l3_len as usize).copied().unwrap_or(0)
    } else {
        s.tcp_flags
    };
    let has_ports = s.proto == proto::TCP || s.proto == proto::UDP;
    Packet {
        proto: s.proto,
        src: s.src,
        dst: s.dst,
        src_port: if has_ports { s.src_port } else { 0 },
        dst_port: if has_ports { s.dst_port } else { 0 },
        flags,
    }
}
