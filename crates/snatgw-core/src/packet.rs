//! What the engine is told about a packet, and what it answers.
//!
//! The engine never sees packet bytes: the data plane (or a trace replayer) extracts a
//! [`Packet`] — protocol, addresses, ports, TCP flags — and applies the returned [`Verdict`].
//! [`DropReason`] is the one list of reasons a packet is dropped anywhere in snatgw, each with a
//! stable metric label.

use std::fmt;
use std::net::Ipv4Addr;

/// IP protocol numbers the engine distinguishes: `snatgw-wire`'s, under short names.
pub mod proto {
    pub use snatgw_wire::{
        PROTO_ESP as ESP, PROTO_ICMP as ICMP, PROTO_TCP as TCP, PROTO_UDP as UDP,
    };
}

/// TCP flag bits as in the TCP header's flag byte: `snatgw-wire`'s
/// [`TcpFlags`](snatgw_wire::TcpFlags) bits, as plain constants.
pub mod tcp_flags {
    use snatgw_wire::TcpFlags;

    /// FIN.
    pub const FIN: u8 = TcpFlags::FIN;
    /// SYN.
    pub const SYN: u8 = TcpFlags::SYN;
    /// RST.
    pub const RST: u8 = TcpFlags::RST;
    /// ACK.
    pub const ACK: u8 = TcpFlags::ACK;
}

/// Which way a packet travels through the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From an instance (private side) towards the internet.
    Outbound,
    /// From the internet towards a public address of the gateway.
    Inbound,
}

/// The facts of a packet the engine decides on. Addresses are host-order `u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Packet {
    /// IP protocol number.
    pub proto: u8,
    /// Source address.
    pub src: u32,
    /// Destination address.
    pub dst: u32,
    /// Source port (TCP/UDP; 0 otherwise).
    pub src_port: u16,
    /// Destination port (TCP/UDP; 0 otherwise).
    pub dst_port: u16,
    /// TCP: the flag byte. ICMP: the ICMP type ([`ICMP_ECHO_REQUEST`](snatgw_wire::ICMP_ECHO_REQUEST)
    /// = 8), so the engine can tell an echo from other ICMP (R3.6 decision). Other protocols: 0.
    pub flags: u8,
}

impl Packet {
    /// A TCP packet.
    pub fn tcp(
        src: impl Into<u32>,
        sport: u16,
        dst: impl Into<u32>,
        dport: u16,
        flags: u8,
    ) -> Self {
        Packet {
            proto: proto::TCP,
            src: src.into(),
            dst: dst.into(),
            src_port: sport,
            dst_port: dport,
            flags,
        }
    }
    /// A UDP datagram.
    pub fn udp(src: impl Into<u32>, sport: u16, dst: impl Into<u32>, dport: u16) -> Self {
        Packet {
            proto: proto::UDP,
            src: src.into(),
            dst: dst.into(),
            src_port: sport,
            dst_port: dport,
            flags: 0,
        }
    }
    /// An ICMP message of type `icmp_type` (no ports).
    pub fn icmp(src: impl Into<u32>, dst: impl Into<u32>, icmp_type: u8) -> Self {
        Packet {
            proto: proto::ICMP,
            src: src.into(),
            dst: dst.into(),
            src_port: 0,
            dst_port: 0,
            flags: icmp_type,
        }
    }
    /// A packet of another protocol (no ports).
    pub fn other(protocol: u8, src: impl Into<u32>, dst: impl Into<u32>) -> Self {
        Packet {
            proto: protocol,
            src: src.into(),
            dst: dst.into(),
            src_port: 0,
            dst_port: 0,
            flags: 0,
        }
    }
}

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward unchanged (intra-VNet traffic, SPEC R1.7).
    Pass,
    /// Rewrite and forward. Outbound: the source becomes (`addr`, `port`); inbound: the
    /// destination does. For an ILPIP (R1.1) the port is the packet's own.
    Translate {
        /// New address.
        addr: u32,
        /// New port.
        port: u16,
    },
    /// Drop, counted under the reason.
    Drop(DropReason),
}

/// How a refused new flow is answered to its instance (SPEC R9.5, `gateway.on_exhaustion =
/// "reset"`), decided by [`Engine::fail_fast`](crate::Engine::fail_fast); the data plane
/// writes the answer over the refused packet. Both answers come from the destination the
/// instance tried to reach and go to the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Answer {
    /// A TCP RST for a refused SYN (RFC 9293 §3.10.7.1, a segment without ACK in CLOSED):
    /// `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`, so the client's `connect()` fails with
    /// "connection refused".
    TcpReset,
    /// ICMP destination unreachable ([`ICMP_DEST_UNREACHABLE`] = 3), code
    /// [`ICMP_CODE_ADMIN_PROHIBITED`] = 13 (communication administratively prohibited,
    /// RFC 1812 §5.2.7.1), quoting the refused packet's IP header and first 8 bytes of
    /// payload (RFC 792), for a refused UDP flow.
    IcmpAdminProhibited,
}

impl Answer {
    /// `tcp_rst` / `icmp_admin_prohibited`.
    pub fn label(self) -> &'static str {
        match self {
            Answer::TcpReset => "tcp_rst",
            Answer::IcmpAdminProhibited => "icmp_admin_prohibited",
        }
    }
}

/// ICMP type destination unreachable (RFC 792).
pub const ICMP_DEST_UNREACHABLE: u8 = snatgw_wire::ICMP_DEST_UNREACHABLE;
/// ICMP destination-unreachable code 13: communication administratively prohibited
/// (RFC 1812 §5.2.7.1).
pub const ICMP_CODE_ADMIN_PROHIBITED: u8 = 13;

/// Why a packet was dropped. `Copy`, with a stable metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
#[non_exhaustive]
pub enum DropReason {
    /// Arrived on the private side from an address that is no configured instance (SPEC R9.1).
    UnknownSource = 0,
    /// Outbound TCP that is not a SYN and matches no flow (SPEC R3.1).
    TcpNotSyn,
    /// No SNAT port free for the destination (SPEC R2.6).
    PortsExhausted,
    /// A protocol the instance's scenario does not translate (PAT carries TCP and UDP only, R1.2/R1.3).
    ProtocolNotTranslated,
    /// ICMP echo from an instance without an ILPIP (R3.6 decision: not translated through PAT).
    IcmpEchoViaPat,
    /// Inbound to a PAT address matching no flow and no rule (SPEC R3.8).
    UnsolicitedInbound,
    /// Inbound to an address that is not one of the gateway's public addresses.
    NotOurAddress,
    /// Packet bytes could not be parsed (data plane).
    Malformed,
    /// A fragment that matches no tracked first fragment (data plane).
    FragmentUnmatched,
    /// An ICMP error whose embedded packet matches no flow (data plane, R3.6).
    IcmpErrorNoFlow,
    /// A packet that may not be forwarded for another reason (e.g. private source leaving untranslated).
    Policy,
    /// Arrived on the public side with a VNet source address: spoofed, never an instance
    /// (SPEC R9.1). A packet from the private side whose source is no instance is
    /// [`DropReason::UnknownSource`].
    VnetSourceFromPublic,
    /// A new flow over the instance's or the gateway's flow limit (SPEC R9.2).
    FlowLimit,
    /// Denied by a network security group of the instance, before any port is taken
    /// (SPEC R4.1, R4.3).
    NsgDenied,
    /// A new inbound flow to a load-balancing rule whose pool has no healthy member
    /// (SPEC R4.5, R5.1).
    NoHealthyBackend,
    /// A new outbound flow of an instance this gateway may not open flows for: a fleet node
    /// that does not hold the instance's grant, or whose lease view ran out (SPEC R10.2,
    /// `Engine::set_admission`). The packet is left unchanged, so a fleet node can forward it
    /// to the owner (R10.3).
    NotOwned,
    /// A fleet node's new flow refused because the instance's acknowledged port reserve has
    /// no free port for the destination, while ports of its block outside the reserve would
    /// have been free (SPEC R10.4, issue #19; `Engine::set_port_fence`). Not an exhaustion
    /// (R2.6: no event, not a failed SNAT connection) and never answered (R9.5): the client's
    /// retransmission is served once the next reserve is acknowledged.
    PortReserve,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 17;
    /// All reasons, in label order.
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::UnknownSource,
        DropReason::TcpNotSyn,
        DropReason::PortsExhausted,
        DropReason::ProtocolNotTranslated,
        DropReason::IcmpEchoViaPat,
        DropReason::UnsolicitedInbound,
        DropReason::NotOurAddress,
        DropReason::Malformed,
        DropReason::FragmentUnmatched,
        DropReason::IcmpErrorNoFlow,
        DropReason::Policy,
        DropReason::VnetSourceFromPublic,
        DropReason::FlowLimit,
        DropReason::NsgDenied,
        DropReason::NoHealthyBackend,
        DropReason::NotOwned,
        DropReason::PortReserve,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::UnknownSource => "unknown_source",
            DropReason::TcpNotSyn => "tcp_not_syn",
            DropReason::PortsExhausted => "ports_exhausted",
            DropReason::ProtocolNotTranslated => "protocol_not_translated",
            DropReason::IcmpEchoViaPat => "icmp_echo_via_pat",
            DropReason::UnsolicitedInbound => "unsolicited_inbound",
            DropReason::NotOurAddress => "not_our_address",
            DropReason::Malformed => "malformed",
            DropReason::FragmentUnmatched => "fragment_unmatched",
            DropReason::IcmpErrorNoFlow => "icmp_error_no_flow",
            DropReason::Policy => "policy",
            DropReason::VnetSourceFromPublic => "vnet_source_from_public",
            DropReason::FlowLimit => "flow_limit",
            DropReason::NsgDenied => "nsg_denied",
            DropReason::NoHealthyBackend => "no_healthy_backend",
            DropReason::NotOwned => "not_owned",
            DropReason::PortReserve => "port_reserve",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Transport protocol of a PAT flow, with separate port spaces (SPEC R2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4 {
    /// TCP.
    Tcp = 0,
    /// UDP.
    Udp = 1,
}

impl L4 {
    /// From an IP protocol number.
    pub fn from_proto(p: u8) -> Option<L4> {
        match p {
            proto::TCP => Some(L4::Tcp),
            proto::UDP => Some(L4::Udp),
            _ => None,
        }
    }
    /// The IP protocol number.
    pub fn proto(self) -> u8 {
        match self {
            L4::Tcp => proto::TCP,
            L4::Udp => proto::UDP,
        }
    }
    /// `tcp` / `udp`.
    pub fn label(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
}

impl fmt::Display for L4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Formats a host-order address.
pub fn ip(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a)
}
