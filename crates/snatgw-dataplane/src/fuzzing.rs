//! The fuzz harness, shared by the cargo-fuzz target and by `cargo test`, which replays the
//! committed corpus so a regression fails CI.
//!
//! An input is a sequence of records, each a big-endian `u16` length and that many bytes; in a
//! record, byte 0 picks the direction (bit 0) and a time step (bits 1–7, seconds), the rest is
//! the packet. Several packets per input let one create a flow that the next one hits. The gateway runs the reference topology (`examples/reference.toml`), and a
//! second copy of the packet is fed in the other direction too. Checked: nothing panics, a
//! translated packet still parses, and when the packet came in with valid checksums (IPv4
//! header, TCP/UDP/ICMP, and an ICMP error's quoted header and segment), the translated one
//! has valid checksums too: the incremental updates (RFC 1624) must equal a full recompute.
//! The gateway runs with `on_exhaustion = "reset"` (SPEC R9.5) and is given each packet in a
//! buffer with room behind it ([`Gateway::process_in`]), so refusals are answered: an answer
//! must parse, carry valid checksums and go to the refused packet's source.

use snatgw_core::config::OnExhaustion;
use snatgw_core::{ConfigFile, Direction, Engine, Topology, Verdict};

use crate::{Gateway, Outcome};

/// Room behind each packet, as in a batch slot (an ICMP answer needs up to 96 bytes).
const ROOM: usize = 128;

/// The configuration the harness runs.
pub const CONFIG: &str = include_str!("../../../examples/reference.toml");

/// A gateway on the reference topology, answering refusals (SPEC R9.5).
pub fn gateway() -> Gateway {
    let mut cfg = ConfigFile::from_toml(CONFIG).expect("reference config parses");
    cfg.gateway.on_exhaustion = OnExhaustion::Reset;
    let topo = Topology::from_config(cfg).expect("reference config is valid");
    Gateway::new(Engine::new(topo, 0).expect("engine"))
}

/// What a replay checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checked {
    /// Packets the gateway translated.
    pub translated: u64,
    /// Of those, packets whose checksums were valid before and were verified after.
    pub checksums_verified: u64,
    /// Refusals answered (SPEC R9.5), each verified.
    pub answers: u64,
}

/// Runs one input through `g`. Panics only on a real bug.
pub fn run_one(g: &mut Gateway, now: &mut u32, data: &[u8]) -> Checked {
    let mut checked = Checked::default();
    let Some((&ctl, pkt)) = data.split_first() else {
        return checked;
    };
    *now += (ctl >> 1) as u32;
    let dir = if ctl & 1 == 0 {
        Direction::Outbound
    } else {
        Direction::Inbound
    };
    let valid_before = snatgw_wire::verify_checksums(pkt).is_ok();
    let other = if dir == Direction::Outbound {
        Direction::Inbound
    } else {
        Direction::Outbound
    };
    for d in [dir, other] {
        let mut buf = pkt.to_vec();
        buf.resize(pkt.len() + ROOM, 0);
        let out = g.process_in(*now, &mut buf, pkt.len(), d);
        if let Outcome::Answer { len, .. } = out {
            checked.answers += 1;
            let a = &buf[..len];
            // `verify_checksums` parses too. (Not `parse` here: a third caller of it in
            // this crate changes how it is inlined into `Gateway::process`.)
            if let Err(what) = snatgw_wire::verify_checksums(a) {
                panic!("an answer does not parse or has a bad {what} checksum: {a:02x?}");
            }
            assert_eq!(
                (&a[12..16], &a[16..20]),
                (&pkt[16..20], &pkt[12..16]),
                "an answer goes back"
            );
            continue;
        }
        buf.truncate(pkt.len());
        if let Verdict::Translate { .. } = out.verdict() {
            checked.translated += 1;
            assert!(
                snatgw_wire::parse(&buf).is_ok(),
                "a translated packet must still parse"
            );
            if valid_before {
                if let Err(what) = snatgw_wire::verify_checksums(&buf) {
                    panic!("translation broke the {what} checksum ({d:?}): {buf:02x?}");
                }
                checked.checksums_verified += 1;
            }
        }
    }
    checked
}

/// Runs a whole input (a sequence of records, see the module docs) on a fresh gateway.
pub fn run_input(data: &[u8]) -> Checked {
    let mut g = gateway();
    let mut now = 0;
    let mut rest = data;
    let mut total = Checked::default();
    while rest.len() >= 2 {
        let n = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let c = run_one(&mut g, &mut now, &rest[2..2 + n]);
        total.translated += c.translated;
        total.checksums_verified += c.checksums_verified;
        total.answers += c.answers;
        rest = &rest[2 + n..];
    }
    total
}

/// Encodes packets as an input: `(direction is inbound, seconds to advance, packet)`.
pub fn encode(records: &[(bool, u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (inbound, dt, pkt) in records {
        let n = (pkt.len() + 1).min(u16::MAX as usize);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.push((dt.min(&127) << 1) | *inbound as u8);
        out.extend_from_slice(&pkt[..n - 1]);
    }
    out
}
