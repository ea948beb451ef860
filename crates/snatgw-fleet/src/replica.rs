//! Flow-state replication between fleet nodes (SPEC R10.4 "takeover keeps flows"): each node
//! streams the flows of the instances it owns to each instance's rendezvous runner-up (the node
//! that would take it over, [`crate::rendezvous::ranking`]`[1]`), so that on takeover the new
//! owner imports them with [`snatgw_core::Engine::import_state`] and keeps translating them
//! with the same public IP:port (R2.2) and timers, and keeps the port-reuse history (R2.3).
//!
//! # What it does
//!
//! - **[`Replicator`]** (sender, std threads only): the gateway hands it every batch of the
//!   engine's journal ([`Replicator::offer`], under the gateway lock). Each `Opened`/`Closed`
//!   of an instance that has a target ([`Replicator::set_targets`]) gets the next sequence
//!   number and is appended, encoded, to that target's buffer; if the target's connection is
//!   idle, `offer` makes **one non-blocking write** of the buffer right there. In the common
//!   case the record is therefore in the kernel's socket buffer before the batch's packets
//!   leave the gateway, and a `kill -9` of the process after that usually loses nothing:
//!   the kernel delivers a dead process's queued bytes and closes the connection with a FIN.
//!   Not always: the receiver writes acks of port reserves (below), and a process that dies
//!   with an ack it had not read yet closes with a reset, which discards what its kernel
//!   still had queued. A `kill -9` can also lose what a slow link left in the process's own
//!   buffer (written by the target's sender thread), and a host crash loses the kernel's
//!   buffer too. That is acceptable because of port reserves: a flow whose record was lost
//!   lies on a port of an acknowledged reserve, which the taker holds. A target's buffer is
//!   bounded ([`SEND_BUFFER_LIMIT`]): on overflow the buffer is dropped, counted, and its
//!   instances need a snapshot. `offer` never blocks on the network: connecting (with
//!   timeouts and a 100 ms..2 s backoff) and writing what the non-blocking write left are a
//!   per-target thread's job.
//! - **Port reserves** ([`Replicator::reserve`], [`Replicator::is_acked`]; the owner's
//!   rotation is the caller's, issue #19). The owner of an instance gives new flows only ports
//!   of a reserve its target acknowledged; `reserve` queues one on the target's current
//!   connection, only once the instance's snapshot was queued on it, and returns a
//!   [`ReserveTicket`] (target, connection generation, sequence number). The receiver answers
//!   each `Reserve` with an ack once it applied it, and every frame before it on the same
//!   connection; the sender's connection thread (and `is_acked`) reads the acks. An ack
//!   counts only on the generation it came on: a reconnect or an overflow (which drops queued
//!   bytes) starts a new one, so earlier tickets are no longer acknowledged.
//! - **Snapshots.** An instance needs one when it gets a new target, when its target's
//!   connection (re)connects, after an overflow, or when the caller asks
//!   ([`Replicator::request_snapshot`], e.g. after a topology change moved blocks).
//!   [`Replicator::needs_snapshot`] tells the caller; it reads [`Replicator::seq`], exports
//!   the engine's state (in bounded steps, the engine running in between: a fuzzy cut) and
//!   hands it to [`Replicator::offer_snapshot`], which sends each target the layouts, flows
//!   and releases of its pending instances.
//! - **[`ReplicaStore`]** (receiver's state, `Send + Sync`, cheap to clone): per instance
//!   (private address) its flows by private 5-tuple, its block layout, its recent port
//!   releases (at most [`RELEASE_HISTORY_SECS`] worth and [`RELEASES_PER_INSTANCE`]), and
//!   which node sent it and when. [`ReplicaStore::take`] hands a taken-over instance set to
//!   the new owner as a [`FlowState`] ready for `Engine::import_state` (which skips records
//!   that do not fit and holds the ports of those that do).
//! - **[`ReplicaServer`]**: accepts the fleet link's replication connections (a thread per
//!   connection, read timeouts so [`ReplicaServer::stop`] ends them promptly) and applies
//!   what arrives to the store, answering each `Reserve` with an ack. A malformed frame closes
//!   that connection and is counted, never a panic; an ack whose write does not complete
//!   within 1 s closes it too (counted as an I/O error).
//! - **Reserves at the receiver.** [`ReplicaStore`] keeps, per instance, the last
//!   [`RESERVES_PER_INSTANCE`] (two) reserves that arrived, from any sender (a repeated one
//!   counts again). They go only by [`ReplicaStore::take_reserves`] (the taker holds their
//!   ports against every destination for the FIN timeout), by a `Forget` of the instance from
//!   the same sender incarnation numbered above them, or pushed out by newer ones: not by
//!   snapshots (also not a newer incarnation's) and not by [`ReplicaStore::take`]. An instance
//!   with only reserves is listed by [`ReplicaStore::instances`].
//!
//! # The protocol
//!
//! A TCP connection carries frames: a little-endian `u32` length (of what follows, at most
//! [`MAX_FRAME`]), a kind byte, a body ([`Message`]); integers are little-endian. The sender
//! sends every message but one; the receiver writes only `Ack` frames (version 2; version 1
//! had no reserves and no acks, and a hello of another version is refused). The first frame
//! is a hello (kind 1): magic `SNATREPL`, [`PROTOCOL_VERSION`], the sender's node id and
//! incarnation (a number that grows with each start of the sender process). Then:
//! - `Opened{seq, key, at}`: a flow opened at engine second `at`; the receiver keeps it as a
//!   [`FlowRecord`] with `last_seen = at`, `close_at = 0`, `tcp_state = 0`, `born = at`.
//! - `Closed{seq, key, at}`: the flow's port was released at `at`; the receiver removes the
//!   flow (if it holds that exact translation) and remembers the release as a
//!   [`ReleaseRecord`] for R2.3's reuse history.
//! - `Snapshot{seq_at_start, instances, state}`: the whole state of the listed instances
//!   (their layouts, flows and releases as a [`FlowState`] in its own checksummed format).
//! - `Forget{seq, instances}`: the sender no longer replicates these instances here (their
//!   target moved); the receiver drops what that sender gave it for them numbered below `seq`.
//!   (A `Forget` takes a number of its own, so that if the instances come back to this
//!   receiver over a new connection, whose snapshot is numbered at least `seq`, a `Forget`
//!   that arrives late on the old connection does not drop the new data.) It also drops that
//!   sender incarnation's reserves of these instances numbered below `seq`.
//! - `Reserve{seq, instance, public, ports}` (kind 6, body `seq: u64, instance: u32,
//!   public: u32, n: u32, n × port: u16`, `n` ≤ [`MAX_RESERVE_PORTS`]): a port reserve, with a
//!   number from the same counter as the deltas (a connection's deltas and reserves are
//!   numbered increasingly). A reserve numbered below the sender's `Forget` of the instance is
//!   late and ignored (still acknowledged).
//! - `Ack{seq}` (kind 7, body `seq: u64`; receiver to sender): the receiver applied the
//!   `Reserve` numbered `seq` and every frame before it on this connection.
//!
//! Sequence numbers count the changes a [`Replicator`] sent (one counter per sender
//! incarnation, so they order changes across its connections too) and grow on every
//! connection; the receiver compares them only between messages of the same sender
//! incarnation.
//!
//! **Snapshot merge rule (the fuzzy cut).** The caller reads `s = seq()` before exporting;
//! every change numbered `≤ s` is in the engine when the export starts, changes numbered
//! `> s` happen while it runs and may or may not be in it, and they are all sent as deltas,
//! before or after the snapshot. For each covered instance the receiver's flows become the
//! snapshot's flows, minus those a `Closed` numbered `> s` removed (matched by the whole
//! translation), plus those an `Opened` numbered `> s` added and no later `Closed` removed.
//! The receiver implements this with stamps: each flow it holds carries the number of the
//! message that gave it, and each remembered release carries its `Closed`'s number (a
//! tombstone); a snapshot keeps, of the old data of the same sender incarnation, only the
//! flows stamped `> s` and applies only the tombstones stamped `> s`.
//!
//! **Late messages.** A receiver serves each connection on its own thread, so what an older
//! connection of a sender still delivers (a retired target flushing, or one whose backlog the
//! receiver had not read yet) can be applied after what a newer connection sent. Every
//! message of the older connection is numbered below the newer one's, so for each instance
//! the receiver ignores (counting them as superseded): deltas numbered `≤ s` of the snapshot
//! it rests on, a snapshot older than that one, and anything numbered below a `Forget` of it
//! from the same sender; an `Opened` applied twice keeps its newer stamp.
//!
//! **Incarnations.** A snapshot from a newer incarnation of a node also drops what older
//! incarnations of that node sent for instances it does not cover, and a connection from an
//! older incarnation than one already seen is refused, as is an open connection of an older
//! incarnation at its next frame (a paused earlier process). The incarnation must therefore
//! grow with every start of a node (its start time in microseconds, say).
//!
//! **Bounded history.** If tombstones the merge needed were already evicted from the bounded
//! release history, the snapshot's flows are kept (counted as a merge gap): a flow kept too
//! long only holds a port until its idle timeout, one dropped too early could give its port
//! to a second flow (R2.2).
//!
//! # What it does not do
//!
//! - It does not decide targets or when to take over: the caller computes each owned
//!   instance's runner-up ([`crate::rendezvous::ranking`]) and its fleet-link address
//!   ([`crate::EtcdCoordinator::links`]), and calls [`ReplicaStore::take`] for the instances
//!   it was granted, importing before it opens new flows for them.
//! - It sees no packets: a replica's `last_seen` is the flow's open time (or the snapshot's
//!   value). [`ReplicaStore::take`] therefore dates every flow's `last_seen` to at least the
//!   latest engine time its sender reported (the flow was still open then: the sender would
//!   have sent its `Closed`), which can hold a port up to one idle timeout (R3.4) longer than
//!   the dead node would have, never shorter.
//! - Times are the sender's engine seconds. Nodes whose engine clocks have different origins
//!   must shift them (per sender, see [`ReplicaStore::instances`]) before importing.
//! - Acknowledgements exist for port reserves only: deltas, snapshots and forgets are not
//!   acknowledged, retransmitted or waited for (an ack of a reserve vouches for what preceded
//!   it on its connection). No encryption or authentication (the fleet link is a trusted
//!   network), no heartbeat: a sender's time advances at the receiver only with its deltas
//!   and snapshots.
//! - It does not choose reserves or rotate them, nor hold their ports: the owner's caller
//!   does both (and must compare a ticket's target with the instance's target now:
//!   [`Replicator::is_acked`] does not).
//! - Acks are read by the sender's connection thread between its writes and by
//!   [`Replicator::is_acked`]; while a write blocks on a slow link they wait in the kernel.
//!   Reserves are few, so this never fills a socket buffer in practice; if it did, the
//!   receiver's ack write would time out after 1 s and close the connection (a reconnect and a
//!   snapshot follow).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snatgw_core::engine::persist::{BlockLayout, FlowRecord, FlowState, ReleaseRecord, StateError};
use snatgw_core::{FlowChange, FlowKey, Time};

use crate::coordinator::NodeId;

/// The magic number a hello starts with.
pub const MAGIC: [u8; 8] = *b"SNATREPL";
/// The protocol version this build speaks (a hello of another version is refused).
pub const PROTOCOL_VERSION: u16 = 2;
/// The largest frame accepted (length field, bytes after it).
pub const MAX_FRAME: u32 = 256 << 20;
/// A target's send buffer beyond which it is dropped and its instances need a snapshot (a
/// snapshot being sent is allowed on top of it).
pub const SEND_BUFFER_LIMIT: usize = 8 << 20;
/// Snapshot frames are split by instance at about this size.
pub const SNAPSHOT_FRAME_TARGET: usize = 8 << 20;
/// Releases older than this (sender's engine seconds, behind the newest of the instance) are
/// forgotten: R2.3's reuse history is at most this long by default.
pub const RELEASE_HISTORY_SECS: Time = 240;
/// At most this many releases are remembered per instance.
pub const RELEASES_PER_INSTANCE: usize = 16_384;
/// The most ports a `Reserve` may carry ([`Replicator::reserve`] refuses a larger reserve, a
/// receiver closes a connection that sends one).
pub const MAX_RESERVE_PORTS: usize = 1024;
/// How many port reserves a receiver keeps per instance (the newest by arrival).
pub const RESERVES_PER_INSTANCE: usize = 2;

const KIND_HELLO: u8 = 1;
const KIND_OPENED: u8 = 2;
const KIND_CLOSED: u8 = 3;
const KIND_SNAPSHOT: u8 = 4;
const KIND_FORGET: u8 = 5;
const KIND_RESERVE: u8 = 6;
const KIND_ACK: u8 = 7;
/// An ack frame: length field, kind, sequence number.
const ACK_FRAME: usize = 4 + 1 + 8;
const DELTA_BODY: usize = 8 + 1 + 4 + 2 + 4 + 2 + 4 + 2 + 4;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A receiver's ack write that does not complete within this closes the connection.
const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// A sender's read of acks is non-blocking; this only bounds a read if it ever were not.
const ACK_READ_GUARD: Duration = Duration::from_millis(20);
const READ_POLL: Duration = Duration::from_millis(100);
const ACCEPT_POLL: Duration = Duration::from_millis(20);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------------------------

/// Why bytes are not a valid frame or message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A frame's length field is zero or above [`MAX_FRAME`].
    #[error("frame length {0} outside 1..={MAX_FRAME}")]
    FrameLength(u32),
    /// A kind byte this protocol does not have.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// A body shorter or longer than its kind needs.
    #[error("{kind} message with a body of {len} bytes")]
    Length {
        /// The message kind.
        kind: &'static str,
        /// The body's length.
        len: usize,
    },
    /// A hello without the protocol's magic number.
    #[error("not a snatgw replication hello (bad magic)")]
    Magic,
    /// A hello of a protocol version this build does not speak.
    #[error("replication protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    Version(u16),
    /// A hello whose node id is not a valid [`NodeId`].
    #[error("invalid node id {0:?} in hello")]
    NodeId(String),
    /// A snapshot whose flow state does not decode.
    #[error("snapshot flow state: {0}")]
    State(#[from] StateError),
    /// A message where the protocol has another (no hello first, a second hello).
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol needs here.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// A reserve with more ports than [`MAX_RESERVE_PORTS`].
    #[error("reserve with {0} ports (at most {MAX_RESERVE_PORTS})")]
    ReservePorts(u32),
    /// A delta or reserve whose sequence number is not above the previous one on the
    /// connection.
    #[error("sequence number {got} after {previous}")]
    Sequence {
        /// The previous delta's number.
        previous: u64,
        /// This delta's number.
        got: u64,
    },
}

/// One message of the replication protocol (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// The first frame of a connection: who is sending.
    Hello {
        /// The sender.
        node: NodeId,
        /// The sender's incarnation (grows with each start of the sender).
        incarnation: u64,
    },
    /// A flow opened.
    Opened {
        /// Sequence number.
        seq: u64,
        /// The translation.
        key: FlowKey,
        /// When (sender's engine seconds).
        at: Time,
    },
    /// A flow ended and its port was released.
    Closed {
        /// Sequence number.
        seq: u64,
        /// The translation.
        key: FlowKey,
        /// When the port was released.
        at: Time,
    },
    /// The state of some instances, a fuzzy cut started at `seq_at_start`.
    Snapshot {
        /// [`Replicator::seq`] read before the export started.
        seq_at_start: u64,
        /// The instances covered (private addresses), also those without flows.
        instances: Vec<u32>,
        /// Their layouts, flows and releases.
        state: FlowState,
    },
    /// The sender no longer replicates these instances to this receiver.
    Forget {
        /// A number above every change it sent them here.
        seq: u64,
        /// The instances (private addresses).
        instances: Vec<u32>,
    },
    /// A port reserve of an instance: the receiver keeps the last two per instance and
    /// answers with an [`Message::Ack`].
    Reserve {
        /// Sequence number (from the same counter as the deltas).
        seq: u64,
        /// The instance (private address).
        instance: u32,
        /// The public address of the ports.
        public: u32,
        /// The ports (at most [`MAX_RESERVE_PORTS`]).
        ports: Vec<u16>,
    },
    /// Receiver to sender, the only message in that direction: every frame up to and
    /// including the `Reserve` numbered `seq` on this connection was applied.
    Ack {
        /// The `Reserve`'s sequence number.
        seq: u64,
    },
}

impl Message {
    fn kind_name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Opened { .. } => "opened",
            Message::Closed { .. } => "closed",
            Message::Snapshot { .. } => "snapshot",
            Message::Forget { .. } => "forget",
            Message::Reserve { .. } => "reserve",
            Message::Ack { .. } => "ack",
        }
    }

    /// Appends the message as one frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello { node, incarnation } => encode_hello(node, *incarnation, out),
            Message::Opened { seq, key, at } => encode_delta(KIND_OPENED, *seq, key, *at, out),
            Message::Closed { seq, key, at } => encode_delta(KIND_CLOSED, *seq, key, *at, out),
            Message::Snapshot {
                seq_at_start,
                instances,
                state,
            } => encode_snapshot(*seq_at_start, instances, state, out),
            Message::Forget { seq, instances } => encode_forget(*seq, instances, out),
            Message::Reserve {
                seq,
                instance,
                public,
                ports,
            } => encode_reserve(*seq, *instance, *public, ports, out),
            Message::Ack { seq } => encode_ack(*seq, out),
        }
    }

    /// Reads a frame's content: `frame` is what follows the length field (kind and body).
    pub fn decode(frame: &[u8]) -> Result<Message, WireError> {
        let (&kind, body) = frame.split_first().ok_or(WireError::FrameLength(0))?;
        let mut r = Cursor(body);
        match kind {
            KIND_HELLO => {
                let bad = || WireError::Length {
                    kind: "hello",
                    len: body.len(),
                };
                if body.len() < 8 || body[..8] != MAGIC {
                    return Err(if body.len() < 8 {
                        bad()
                    } else {
                        WireError::Magic
                    });
                }
                r.skip(8);
                let version = r.u16().ok_or_else(bad)?;
                if version != PROTOCOL_VERSION {
                    return Err(WireError::Version(version));
                }
                let n = r.u8().ok_or_else(bad)? as usize;
                let id = r.bytes(n).ok_or_else(bad)?;
                let incarnation = r.u64().ok_or_else(bad)?;
                if !r.0.is_empty() {
                    return Err(bad());
                }
                let id = String::from_utf8_lossy(id).into_owned();
                let node = NodeId::new(id.clone()).map_err(|_| WireError::NodeId(id))?;
                Ok(Message::Hello { node, incarnation })
            }
            KIND_OPENED | KIND_CLOSED => {
                let name = if kind == KIND_OPENED {
                    "opened"
                } else {
                    "closed"
                };
                if body.len() != DELTA_BODY {
                    return Err(WireError::Length {
                        kind: name,
                        len: body.len(),
                    });
                }
                let (seq, key, at) = decode_delta(&mut r).ok_or(WireError::Length {
                    kind: name,
                    len: body.len(),
                })?;
                Ok(if kind == KIND_OPENED {
                    Message::Opened { seq, key, at }
                } else {
                    Message::Closed { seq, key, at }
                })
            }
            KIND_SNAPSHOT => {
                let bad = || WireError::Length {
                    kind: "snapshot",
                    len: body.len(),
                };
                let seq_at_start = r.u64().ok_or_else(bad)?;
                let instances = r.u32_list().ok_or_else(bad)?;
                let state = FlowState::decode(r.0)?;
                Ok(Message::Snapshot {
                    seq_at_start,
                    instances,
                    state,
                })
            }
            KIND_FORGET => {
                let bad = || WireError::Length {
                    kind: "forget",
                    len: body.len(),
                };
                let seq = r.u64().ok_or_else(bad)?;
                let instances = r.u32_list().ok_or_else(bad)?;
                if !r.0.is_empty() {
                    return Err(bad());
                }
                Ok(Message::Forget { seq, instances })
            }
            KIND_RESERVE => {
                let bad = || WireError::Length {
                    kind: "reserve",
                    len: body.len(),
                };
                let seq = r.u64().ok_or_else(bad)?;
                let instance = r.u32().ok_or_else(bad)?;
                let public = r.u32().ok_or_else(bad)?;
                let n = r.u32().ok_or_else(bad)?;
                if n as usize > MAX_RESERVE_PORTS {
                    return Err(WireError::ReservePorts(n));
                }
                if r.0.len() != 2 * n as usize {
                    return Err(bad());
                }
                let ports = (0..n).map(|_| r.u16()).collect::<Option<Vec<u16>>>();
                let ports = ports.ok_or_else(bad)?;
                Ok(Message::Reserve {
                    seq,
                    instance,
                    public,
                    ports,
                })
            }
            KIND_ACK => {
                if body.len() != 8 {
                    return Err(WireError::Length {
                        kind: "ack",
                        len: body.len(),
                    });
                }
                let seq = r.u64().ok_or(WireError::Length {
                    kind: "ack",
                    len: 8,
                })?;
                Ok(Message::Ack { seq })
            }
            k => Err(WireError::Kind(k)),
        }
    }
}

/// Reserves the length field; [`end_frame`] fills it in.
fn begin_frame(kind: u8, out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    at
}

fn end_frame(at: usize, out: &mut [u8]) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

fn encode_hello(node: &NodeId, incarnation: u64, out: &mut Vec<u8>) {
    let f = begin_frame(KIND_HELLO, out);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    let id = node.as_str().as_bytes();
    // Node ids are at most 64 bytes (NodeId checks).
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(&incarnation.to_le_bytes());
    end_frame(f, out);
}

fn encode_delta(kind: u8, seq: u64, k: &FlowKey, at: Time, out: &mut Vec<u8>) {
    let f = begin_frame(kind, out);
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(k.proto);
    out.extend_from_slice(&k.src.to_le_bytes());
    out.extend_from_slice(&k.sport.to_le_bytes());
    out.extend_from_slice(&k.dst.to_le_bytes());
    out.extend_from_slice(&k.dport.to_le_bytes());
    out.extend_from_slice(&k.public.to_le_bytes());
    out.extend_from_slice(&k.pport.to_le_bytes());
    out.extend_from_slice(&at.to_le_bytes());
    end_frame(f, out);
}

fn decode_delta(r: &mut Cursor<'_>) -> Option<(u64, FlowKey, Time)> {
    let seq = r.u64()?;
    let key = FlowKey {
        proto: r.u8()?,
        src: r.u32()?,
        sport: r.u16()?,
        dst: r.u32()?,
        dport: r.u16()?,
        public: r.u32()?,
        pport: r.u16()?,
    };
    Some((seq, key, r.u32()?))
}

fn encode_snapshot(seq_at_start: u64, instances: &[u32], st: &FlowState, out: &mut Vec<u8>) {
    let f = begin_frame(KIND_SNAPSHOT, out);
    out.extend_from_slice(&seq_at_start.to_le_bytes());
    out.extend_from_slice(&(instances.len() as u32).to_le_bytes());
    for i in instances {
        out.extend_from_slice(&i.to_le_bytes());
    }
    st.encode(out);
    end_frame(f, out);
}

fn encode_forget(seq: u64, instances: &[u32], out: &mut Vec<u8>) {
    let f = begin_frame(KIND_FORGET, out);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(instances.len() as u32).to_le_bytes());
    for i in instances {
        out.extend_from_slice(&i.to_le_bytes());
    }
    end_frame(f, out);
}

fn encode_reserve(seq: u64, instance: u32, public: u32, ports: &[u16], out: &mut Vec<u8>) {
    let f = begin_frame(KIND_RESERVE, out);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&instance.to_le_bytes());
    out.extend_from_slice(&public.to_le_bytes());
    out.extend_from_slice(&(ports.len() as u32).to_le_bytes());
    for p in ports {
        out.extend_from_slice(&p.to_le_bytes());
    }
    end_frame(f, out);
}

fn encode_ack(seq: u64, out: &mut Vec<u8>) {
    let f = begin_frame(KIND_ACK, out);
    out.extend_from_slice(&seq.to_le_bytes());
    end_frame(f, out);
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn skip(&mut self, n: usize) {
        let _ = self.bytes(n);
    }
    fn arr<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N).and_then(|b| b.try_into().ok())
    }
    fn u8(&mut self) -> Option<u8> {
        self.arr::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.arr().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.arr().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.arr().map(u64::from_le_bytes)
    }
    fn u32_list(&mut self) -> Option<Vec<u32>> {
        let n = self.u32()? as usize;
        if self.0.len() / 4 < n {
            return None;
        }
        (0..n).map(|_| self.u32()).collect()
    }
}

/// A port reserve of one instance: public ports of its block that its owner may give new
/// flows once the receiver acknowledged the reserve (see the module documentation). Fleet
/// seconds are not involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortReserve {
    /// The instance (private address).
    pub instance: u32,
    /// The public address of the ports.
    pub public: u32,
    /// The ports (at most [`MAX_RESERVE_PORTS`]).
    pub ports: Vec<u16>,
}

// ---------------------------------------------------------------------------------------------
// Receiver: the store
// ---------------------------------------------------------------------------------------------

/// Why a replication connection was closed by the receiver (kept as text in
/// [`ReplicaStats::last_error`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// Reading from the connection failed.
    #[error("fleet link I/O: {0}")]
    Io(String),
    /// The connection ended inside a frame (the sender stopped mid-write); the frames before
    /// it were applied.
    #[error("connection ended inside a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes of the frame received.
        have: usize,
        /// Bytes the frame needed (0 when even its length field was incomplete).
        want: usize,
    },
    /// A malformed frame or message.
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
    /// The sender's incarnation is older than one already seen from that node (a paused
    /// earlier process): its data would be older than what the newer one sent.
    #[error(
        "node {node} incarnation {incarnation} is older than incarnation {newest} already seen"
    )]
    StaleIncarnation {
        /// The sender.
        node: NodeId,
        /// Its incarnation.
        incarnation: u64,
        /// The newest incarnation seen from that node.
        newest: u64,
    },
    /// No hello within the time allowed after connecting.
    #[error("no hello within {0:?}")]
    HelloTimeout(Duration),
    /// The server already serves its maximum of connections.
    #[error("too many replication connections (at most {0})")]
    TooManyConnections(usize),
}

/// The receiver's counters and sizes ([`ReplicaStore::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Instances with replicated data (flow state, port reserves or both).
    pub instances: usize,
    /// Flows held.
    pub flows: usize,
    /// Releases held.
    pub releases: usize,
    /// Connections open now.
    pub connections: usize,
    /// Connections accepted so far.
    pub accepted: u64,
    /// Frames applied.
    pub frames: u64,
    /// `Opened` messages applied.
    pub opened: u64,
    /// `Closed` messages applied.
    pub closed: u64,
    /// Snapshot frames applied.
    pub snapshots: u64,
    /// `Forget` messages applied.
    pub forgets: u64,
    /// Port reserves held now (at most [`RESERVES_PER_INSTANCE`] per instance).
    pub reserves: usize,
    /// `Reserve` messages received (applied or superseded).
    pub reserves_received: u64,
    /// Acks written back to senders.
    pub acks_sent: u64,
    /// Late messages ignored: deltas, snapshots and reserves a newer snapshot or `Forget` of
    /// the same sender already superseded (see the module documentation).
    pub superseded: u64,
    /// Snapshot merges that may have missed a `Closed` (evicted from the bounded history):
    /// their flows were kept.
    pub merge_gaps: u64,
    /// Connections closed for a malformed frame.
    pub malformed: u64,
    /// Connections closed for an I/O error or a frame cut short.
    pub io_errors: u64,
    /// Connections refused (stale incarnation, no hello, too many connections).
    pub refused: u64,
    /// The last error that closed a connection.
    pub last_error: Option<String>,
}

/// One instance's replica as [`ReplicaStore::instances`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceReplica {
    /// The instance's private address.
    pub private_ip: u32,
    /// The node whose snapshot (or first delta) this data rests on.
    pub origin: NodeId,
    /// That node's incarnation.
    pub incarnation: u64,
    /// The `seq_at_start` of the last snapshot applied (0: deltas only).
    pub base_seq: u64,
    /// Flows held.
    pub flows: usize,
    /// Releases held.
    pub releases: usize,
    /// Whether a block layout is held (from a snapshot).
    pub layout: bool,
    /// Port reserves held ([`ReplicaStore::reserves`]); an instance with only reserves is
    /// listed too (its flow data fields are then those of the newest reserve's sender, with
    /// `base_seq` 0 and no flows).
    pub reserves: usize,
    /// The latest engine time the origin reported (its engine seconds).
    pub origin_time: Time,
    /// When the data last changed (this process's clock).
    pub updated: Instant,
}

type Fwd = (u8, u32, u16, u32, u16);

fn fwd(k: &FlowKey) -> Fwd {
    (k.proto, k.src, k.sport, k.dst, k.dport)
}

#[derive(Clone, Copy)]
struct Entry {
    rec: FlowRecord,
    origin: u32,
    seq: u64,
}

#[derive(Clone, Copy)]
struct Release {
    rec: ReleaseRecord,
    /// The closed translation, for a release a `Closed` gave (a tombstone).
    key: Option<FlowKey>,
    origin: u32,
    seq: u64,
}

struct Replica {
    origin: u32,
    base: u64,
    layout: Option<BlockLayout>,
    flows: HashMap<Fwd, Entry>,
    releases: VecDeque<Release>,
    /// The latest release time in `releases`.
    newest: Time,
    /// The highest number of a tombstone of `origin` evicted from `releases`.
    tomb_floor: u64,
    updated: Instant,
}

impl Replica {
    fn new(origin: u32) -> Replica {
        Replica {
            origin,
            base: 0,
            layout: None,
            flows: HashMap::new(),
            releases: VecDeque::new(),
            newest: 0,
            tomb_floor: 0,
            updated: Instant::now(),
        }
    }

    fn push_release(&mut self, x: Release) {
        self.newest = self.newest.max(x.rec.at);
        self.releases.push_back(x);
    }

    /// Forgets releases beyond the history's length and count.
    fn trim(&mut self) {
        while let Some(front) = self.releases.front() {
            let old = front.rec.at.saturating_add(RELEASE_HISTORY_SECS) <= self.newest;
            if !old && self.releases.len() <= RELEASES_PER_INSTANCE {
                break;
            }
            if front.key.is_some() && front.origin == self.origin {
                self.tomb_floor = self.tomb_floor.max(front.seq);
            }
            self.releases.pop_front();
        }
    }
}

struct OriginInfo {
    node: NodeId,
    incarnation: u64,
    /// The latest engine time this sender reported.
    time: Time,
}

/// A port reserve as the store holds it.
struct HeldReserve {
    r: PortReserve,
    origin: u32,
    seq: u64,
    arrived: Instant,
}

#[derive(Default)]
struct StoreInner {
    instances: HashMap<u32, Replica>,
    /// Instance → its last [`RESERVES_PER_INSTANCE`] reserves, oldest first (from any sender,
    /// by arrival). Kept apart from `instances`: snapshots and `take` leave them.
    reserves: HashMap<u32, VecDeque<HeldReserve>>,
    origins: Vec<OriginInfo>,
    origin_ix: HashMap<(NodeId, u64), u32>,
    newest: HashMap<NodeId, u64>,
    /// (origin, instance) → the highest `Forget` number it sent for the instance: anything it
    /// numbered below arrives late (from an older connection) and is ignored.
    forgot: HashMap<(u32, u32), u64>,
    stats: ReplicaStats,
}

/// Replicated flow state received from other nodes, per instance (see the module
/// documentation). Cloning is cheap: clones share the data.
#[derive(Clone, Default)]
pub struct ReplicaStore {
    inner: Arc<Mutex<StoreInner>>,
}

impl std::fmt::Debug for ReplicaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaStore")
            .field("stats", &self.stats())
            .finish()
    }
}

impl StoreInner {
    fn intern(&mut self, node: &NodeId, incarnation: u64) -> u32 {
        if let Some(&i) = self.origin_ix.get(&(node.clone(), incarnation)) {
            return i;
        }
        let i = self.origins.len() as u32;
        self.origins.push(OriginInfo {
            node: node.clone(),
            incarnation,
            time: 0,
        });
        self.origin_ix.insert((node.clone(), incarnation), i);
        i
    }

    fn saw_time(&mut self, o: u32, at: Time) {
        let t = &mut self.origins[o as usize].time;
        *t = (*t).max(at);
    }

    /// The newer-incarnation check a connection makes at its hello and before every frame.
    fn current(&self, node: &NodeId, incarnation: u64) -> Result<(), ReplicaError> {
        match self.newest.get(node) {
            Some(&newest) if newest > incarnation => Err(ReplicaError::StaleIncarnation {
                node: node.clone(),
                incarnation,
                newest,
            }),
            _ => Ok(()),
        }
    }

    fn delta(&mut self, o: u32, seq: u64, key: FlowKey, at: Time, opened: bool) {
        self.saw_time(o, at);
        if self.forgot.get(&(o, key.src)).is_some_and(|&f| seq < f) {
            self.stats.superseded += 1;
            return;
        }
        let r = self
            .instances
            .entry(key.src)
            .or_insert_with(|| Replica::new(o));
        if r.origin == o && seq <= r.base {
            self.stats.superseded += 1;
            return;
        }
        r.updated = Instant::now();
        if opened {
            self.stats.opened += 1;
            // The same open seen again (over an older connection) keeps its newer stamp.
            let seq = match r.flows.get(&fwd(&key)) {
                Some(e) if e.rec.key == key && e.origin == o => e.seq.max(seq),
                _ => seq,
            };
            r.flows.insert(
                fwd(&key),
                Entry {
                    rec: FlowRecord {
                        key,
                        last_seen: at,
                        close_at: 0,
                        tcp_state: 0,
                        born: at as u16,
                    },
                    origin: o,
                    seq,
                },
            );
        } else {
            self.stats.closed += 1;
            if r.flows.get(&fwd(&key)).is_some_and(|e| e.rec.key == key) {
                r.flows.remove(&fwd(&key));
            }
            r.push_release(Release {
                rec: ReleaseRecord {
                    private_ip: key.src,
                    proto: key.proto,
                    dst: key.dst,
                    dport: key.dport,
                    pport: key.pport,
                    at,
                },
                key: Some(key),
                origin: o,
                seq,
            });
            r.trim();
        }
    }

    fn snapshot(&mut self, o: u32, s: u64, instances: &[u32], st: &FlowState) {
        self.stats.snapshots += 1;
        self.saw_time(o, st.time);
        let covered: HashSet<u32> = instances.iter().copied().collect();
        // A snapshot older than what an instance already rests on, or than the sender's
        // `Forget` of it, arrives late over an older connection: ignored for that instance.
        let stale = |i: u32| {
            self.instances
                .get(&i)
                .is_some_and(|r| r.origin == o && s < r.base)
                || self.forgot.get(&(o, i)).is_some_and(|&f| s < f)
        };
        let late: HashSet<u32> = covered.iter().copied().filter(|&i| stale(i)).collect();
        self.stats.superseded += late.len() as u64;
        let mut fresh: HashMap<u32, Replica> = covered
            .iter()
            .filter(|i| !late.contains(i))
            .map(|&i| {
                let mut r = Replica::new(o);
                r.base = s;
                (i, r)
            })
            .collect();
        for l in &st.layouts {
            if let Some(r) = fresh.get_mut(&l.private_ip) {
                r.layout = Some(*l);
            }
        }
        for f in &st.flows {
            if let Some(r) = fresh.get_mut(&f.key.src) {
                r.flows.insert(
                    fwd(&f.key),
                    Entry {
                        rec: *f,
                        origin: o,
                        seq: s,
                    },
                );
            }
        }
        let mut snap_releases: HashSet<(u32, u8, u32, u16, u16, Time)> = HashSet::new();
        for x in &st.releases {
            if let Some(r) = fresh.get_mut(&x.private_ip) {
                snap_releases.insert((x.private_ip, x.proto, x.dst, x.dport, x.pport, x.at));
                r.push_release(Release {
                    rec: *x,
                    key: None,
                    origin: o,
                    seq: s,
                });
            }
        }
        for (i, mut new) in fresh {
            if let Some(old) = self.instances.remove(&i) {
                if old.origin == o {
                    new.tomb_floor = old.tomb_floor;
                    if s < old.tomb_floor {
                        self.stats.merge_gaps += 1;
                    }
                }
                // Closes after the cut remove what the snapshot still saw...
                let mut later: Vec<Release> = old
                    .releases
                    .iter()
                    .filter(|x| x.origin == o && x.key.is_some() && x.seq > s)
                    .copied()
                    .collect();
                later.sort_by_key(|x| x.seq);
                for x in later {
                    if let Some(k) = x.key {
                        if new.flows.get(&fwd(&k)).is_some_and(|e| e.rec.key == k) {
                            new.flows.remove(&fwd(&k));
                        }
                    }
                    let r = &x.rec;
                    if !snap_releases.contains(&(
                        r.private_ip,
                        r.proto,
                        r.dst,
                        r.dport,
                        r.pport,
                        r.at,
                    )) {
                        new.push_release(x);
                    }
                }
                // ...and opens after the cut (still open) are added.
                for (f, e) in old.flows {
                    if e.origin == o && e.seq > s {
                        new.flows.insert(f, e);
                    }
                }
                new.trim();
            }
            self.instances.insert(i, new);
        }
        // A newer incarnation's snapshot replaces what older incarnations of the node sent.
        let (node, inc) = {
            let oi = &self.origins[o as usize];
            (oi.node.clone(), oi.incarnation)
        };
        let origins = &self.origins;
        let older = |x: u32| {
            let oi = &origins[x as usize];
            oi.node == node && oi.incarnation < inc
        };
        self.instances
            .retain(|i, r| covered.contains(i) || !older(r.origin));
        self.forgot.retain(|&(x, _), _| !older(x));
    }

    fn forget(&mut self, o: u32, seq: u64, instances: &[u32]) {
        self.stats.forgets += 1;
        let (node, inc) = {
            let oi = &self.origins[o as usize];
            (oi.node.clone(), oi.incarnation)
        };
        let origins = &self.origins;
        // What this node sent before `seq` (and what its older incarnations sent).
        let gone = |x_origin: u32, x_seq: u64| {
            let oi = &origins[x_origin as usize];
            oi.node == node && (oi.incarnation < inc || (x_origin == o && x_seq < seq))
        };
        for i in instances {
            let f = self.forgot.entry((o, *i)).or_insert(0);
            *f = (*f).max(seq);
            // Reserves only of this very sender numbered below: sequence numbers compare
            // only within one incarnation, and a reserve held too long only holds ports.
            if let Some(q) = self.reserves.get_mut(i) {
                q.retain(|h| !(h.origin == o && h.seq < seq));
                if q.is_empty() {
                    self.reserves.remove(i);
                }
            }
            let Some(r) = self.instances.get_mut(i) else {
                continue;
            };
            r.flows.retain(|_, e| !gone(e.origin, e.seq));
            r.releases.retain(|x| !gone(x.origin, x.seq));
            if gone(r.origin, r.base) {
                if r.flows.is_empty() && r.releases.is_empty() {
                    self.instances.remove(i);
                } else {
                    // Newer deltas of this node (a new target here again) wait for their
                    // snapshot; the old layout is not theirs to keep.
                    r.layout = None;
                    r.updated = Instant::now();
                }
            }
        }
    }

    fn reserve(&mut self, o: u32, seq: u64, r: PortReserve) {
        self.stats.reserves_received += 1;
        // Numbered below the sender's `Forget` of the instance: a late frame of an older
        // connection (the instance had left this receiver).
        if self.forgot.get(&(o, r.instance)).is_some_and(|&f| seq < f) {
            self.stats.superseded += 1;
            return;
        }
        let q = self.reserves.entry(r.instance).or_default();
        q.push_back(HeldReserve {
            r,
            origin: o,
            seq,
            arrived: Instant::now(),
        });
        while q.len() > RESERVES_PER_INSTANCE {
            q.pop_front();
        }
    }

    fn collect(&mut self, instances: &HashSet<u32>, remove: bool) -> FlowState {
        let mut st = FlowState::default();
        let mut ips: Vec<u32> = instances.iter().copied().collect();
        ips.sort_unstable();
        for i in ips {
            let r = if remove {
                self.instances.remove(&i)
            } else {
                None
            };
            let Some(r) = r.as_ref().or_else(|| self.instances.get(&i)) else {
                continue;
            };
            st.time = st.time.max(self.origins[r.origin as usize].time);
            if let Some(l) = r.layout {
                st.layouts.push(l);
            }
            let mut flows: Vec<FlowRecord> = r
                .flows
                .values()
                .map(|e| {
                    let mut rec = e.rec;
                    let t = self.origins[e.origin as usize].time;
                    rec.last_seen = rec.last_seen.max(t);
                    st.time = st.time.max(t);
                    rec
                })
                .collect();
            flows.sort_unstable_by_key(|f| fwd(&f.key));
            st.flows.extend(flows);
            st.releases.extend(r.releases.iter().map(|x| x.rec));
        }
        st
    }
}

impl ReplicaStore {
    /// An empty store.
    pub fn new() -> ReplicaStore {
        ReplicaStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, StoreInner> {
        lock(&self.inner)
    }

    /// Removes and returns the replicated state of `instances` (private addresses), ready for
    /// [`snatgw_core::Engine::import_state`]: their block layouts, their flows (each
    /// `last_seen` dated to at least its sender's latest engine time, see the module
    /// documentation) and their releases. `time` is the latest sender time among them.
    pub fn take(&self, instances: &HashSet<u32>) -> FlowState {
        self.lock().collect(instances, true)
    }

    /// Removes and returns the port reserves held for `instances` (private addresses), each
    /// instance's oldest first: the taker holds their ports. [`ReplicaStore::take`] leaves
    /// them, so the caller takes both.
    pub fn take_reserves(&self, instances: &HashSet<u32>) -> Vec<PortReserve> {
        let mut g = self.lock();
        let mut ips: Vec<u32> = instances.iter().copied().collect();
        ips.sort_unstable();
        ips.into_iter()
            .filter_map(|i| g.reserves.remove(&i))
            .flat_map(|q| q.into_iter().map(|h| h.r))
            .collect()
    }

    /// The port reserves held for one instance, oldest first.
    pub fn reserves(&self, instance: u32) -> Vec<PortReserve> {
        self.lock()
            .reserves
            .get(&instance)
            .map(|q| q.iter().map(|h| h.r.clone()).collect())
            .unwrap_or_default()
    }

    /// What [`ReplicaStore::take`] would return, without removing anything.
    pub fn peek(&self, instances: &HashSet<u32>) -> FlowState {
        self.lock().collect(instances, false)
    }

    /// The instances with replicated data (flow state, port reserves or both), by private
    /// address.
    pub fn instances(&self) -> Vec<InstanceReplica> {
        let g = self.lock();
        let held = |ip: u32| g.reserves.get(&ip).map_or(0, VecDeque::len);
        let mut v: Vec<InstanceReplica> = g
            .instances
            .iter()
            .map(|(&ip, r)| {
                let oi = &g.origins[r.origin as usize];
                InstanceReplica {
                    private_ip: ip,
                    origin: oi.node.clone(),
                    incarnation: oi.incarnation,
                    base_seq: r.base,
                    flows: r.flows.len(),
                    releases: r.releases.len(),
                    layout: r.layout.is_some(),
                    reserves: held(ip),
                    origin_time: oi.time,
                    updated: r.updated,
                }
            })
            .collect();
        for (&ip, q) in &g.reserves {
            if g.instances.contains_key(&ip) {
                continue;
            }
            let Some(h) = q.back() else {
                continue;
            };
            let oi = &g.origins[h.origin as usize];
            v.push(InstanceReplica {
                private_ip: ip,
                origin: oi.node.clone(),
                incarnation: oi.incarnation,
                base_seq: 0,
                flows: 0,
                releases: 0,
                layout: false,
                reserves: q.len(),
                origin_time: oi.time,
                updated: h.arrived,
            });
        }
        v.sort_by_key(|r| r.private_ip);
        v
    }

    /// Counters and sizes.
    pub fn stats(&self) -> ReplicaStats {
        let g = self.lock();
        let mut s = g.stats.clone();
        s.instances = g.instances.len()
            + g.reserves
                .keys()
                .filter(|i| !g.instances.contains_key(i))
                .count();
        s.reserves = g.reserves.values().map(VecDeque::len).sum();
        s.flows = g.instances.values().map(|r| r.flows.len()).sum();
        s.releases = g.instances.values().map(|r| r.releases.len()).sum();
        s
    }

    fn closed_conn(&self, e: Option<&ReplicaError>) {
        let mut g = self.lock();
        g.stats.connections = g.stats.connections.saturating_sub(1);
        if let Some(e) = e {
            match e {
                ReplicaError::Wire(_) => g.stats.malformed += 1,
                ReplicaError::Io(_) | ReplicaError::Truncated { .. } => g.stats.io_errors += 1,
                _ => g.stats.refused += 1,
            }
            g.stats.last_error = Some(e.to_string());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Receiver: the server
// ---------------------------------------------------------------------------------------------

/// Accepts replication connections and applies them to a [`ReplicaStore`] (see the module
/// documentation). Stops on [`ReplicaServer::stop`] or drop.
pub struct ReplicaServer {
    addr: SocketAddr,
    store: ReplicaStore,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ReplicaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ReplicaServer {
    /// Listens on `addr` (port 0: any free port, see [`ReplicaServer::local_addr`]) and
    /// applies what arrives to `store`.
    pub fn bind(addr: SocketAddr, store: ReplicaStore) -> io::Result<ReplicaServer> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::Builder::new()
                .name("snatgw-replica-accept".into())
                .spawn(move || accept_loop(listener, store, stop))?
        };
        Ok(ReplicaServer {
            addr,
            store,
            stop,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The store it feeds.
    pub fn store(&self) -> &ReplicaStore {
        &self.store
    }

    /// Stops accepting and closes every connection (within about 100 ms); waits for its
    /// threads. The store keeps what arrived.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, store: ReplicaStore, stop: Arc<AtomicBool>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        conns.retain(|h| !h.is_finished());
        match listener.accept() {
            Ok((stream, _peer)) => {
                let mut g = store.lock();
                g.stats.accepted += 1;
                if conns.len() >= MAX_CONNECTIONS {
                    g.stats.refused += 1;
                    g.stats.last_error =
                        Some(ReplicaError::TooManyConnections(MAX_CONNECTIONS).to_string());
                    continue;
                }
                g.stats.connections += 1;
                drop(g);
                let (store, stop) = (store.clone(), stop.clone());
                let spawned = std::thread::Builder::new()
                    .name("snatgw-replica-conn".into())
                    .spawn({
                        let store = store.clone();
                        move || serve(stream, &store, &stop)
                    });
                match spawned {
                    Ok(h) => conns.push(h),
                    Err(e) => store.closed_conn(Some(&ReplicaError::Io(e.to_string()))),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
    for h in conns {
        let _ = h.join();
    }
}

/// Reads frames off a connection with a read timeout, so a stop is noticed between reads.
struct FrameReader {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
}

impl FrameReader {
    /// The next message; `Ok(None)` at a clean end (EOF between frames, or a stop).
    fn next(
        &mut self,
        stop: &AtomicBool,
        deadline: Option<Instant>,
    ) -> Result<Option<Message>, ReplicaError> {
        let mut tmp = [0u8; 64 * 1024];
        loop {
            let avail = &self.buf[self.start..];
            if avail.len() >= 4 {
                let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes"));
                if len == 0 || len > MAX_FRAME {
                    return Err(WireError::FrameLength(len).into());
                }
                let end = 4 + len as usize;
                if avail.len() >= end {
                    let m = Message::decode(&avail[4..end]);
                    self.start += end;
                    if self.start == self.buf.len() {
                        self.buf.clear();
                        self.start = 0;
                    } else if self.start > (1 << 20) {
                        self.buf.drain(..self.start);
                        self.start = 0;
                    }
                    return Ok(Some(m?));
                }
            }
            if stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            match self.stream.read(&mut tmp) {
                Ok(0) => {
                    let have = self.buf.len() - self.start;
                    if have == 0 {
                        return Ok(None);
                    }
                    let want = if have >= 4 {
                        4 + u32::from_le_bytes(
                            self.buf[self.start..self.start + 4]
                                .try_into()
                                .expect("4 bytes"),
                        ) as usize
                    } else {
                        0
                    };
                    return Err(ReplicaError::Truncated { have, want });
                }
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(ReplicaError::HelloTimeout(HELLO_TIMEOUT));
                    }
                }
                Err(e) => return Err(ReplicaError::Io(e.to_string())),
            }
        }
    }
}

fn serve(stream: TcpStream, store: &ReplicaStore, stop: &AtomicBool) {
    let r = serve_inner(stream, store, stop);
    store.closed_conn(r.as_ref().err());
}

fn serve_inner(
    stream: TcpStream,
    store: &ReplicaStore,
    stop: &AtomicBool,
) -> Result<(), ReplicaError> {
    let io = |e: io::Error| ReplicaError::Io(e.to_string());
    stream.set_nonblocking(false).map_err(io)?;
    stream.set_read_timeout(Some(READ_POLL)).map_err(io)?;
    stream
        .set_write_timeout(Some(ACK_WRITE_TIMEOUT))
        .map_err(io)?;
    let mut rd = FrameReader {
        stream,
        buf: Vec::new(),
        start: 0,
    };
    let (node, incarnation) = match rd.next(stop, Some(Instant::now() + HELLO_TIMEOUT))? {
        None => return Ok(()),
        Some(Message::Hello { node, incarnation }) => (node, incarnation),
        Some(m) => {
            return Err(WireError::Unexpected {
                expected: "hello",
                got: m.kind_name(),
            }
            .into())
        }
    };
    let o = {
        let mut g = store.lock();
        g.current(&node, incarnation)?;
        g.newest.insert(node.clone(), incarnation);
        g.intern(&node, incarnation)
    };
    let mut last_seq = 0u64;
    let mut ack = Vec::with_capacity(ACK_FRAME);
    while let Some(m) = rd.next(stop, None)? {
        let mut g = store.lock();
        g.current(&node, incarnation)?;
        let mut in_order = |seq: u64| {
            if seq <= last_seq {
                return Err(WireError::Sequence {
                    previous: last_seq,
                    got: seq,
                });
            }
            last_seq = seq;
            Ok(())
        };
        let mut acked = None;
        match m {
            Message::Hello { .. } | Message::Ack { .. } => {
                return Err(WireError::Unexpected {
                    expected: "a sender's message after the hello",
                    got: m.kind_name(),
                }
                .into())
            }
            Message::Opened { seq, key, at } | Message::Closed { seq, key, at } => {
                in_order(seq)?;
                let opened = matches!(m, Message::Opened { .. });
                g.delta(o, seq, key, at, opened);
            }
            Message::Snapshot {
                seq_at_start,
                instances,
                state,
            } => g.snapshot(o, seq_at_start, &instances, &state),
            Message::Forget { seq, instances } => g.forget(o, seq, &instances),
            Message::Reserve {
                seq,
                instance,
                public,
                ports,
            } => {
                in_order(seq)?;
                g.reserve(
                    o,
                    seq,
                    PortReserve {
                        instance,
                        public,
                        ports,
                    },
                );
                acked = Some(seq);
            }
        }
        g.stats.frames += 1;
        drop(g);
        // The ack follows the frame's application (and that of every frame before it on this
        // connection: they were applied in order on this thread). Written without the store's
        // lock; a write that does not complete in time closes the connection.
        if let Some(seq) = acked {
            ack.clear();
            encode_ack(seq, &mut ack);
            (&rd.stream)
                .write_all(&ack)
                .map_err(|e| ReplicaError::Io(format!("writing an ack: {e}")))?;
            store.lock().stats.acks_sent += 1;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sender
// ---------------------------------------------------------------------------------------------

/// The sender's counters ([`Replicator::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicatorStats {
    /// The sequence number of the last change sent.
    pub seq: u64,
    /// Flow changes (opens and closes) queued for a connected target.
    pub records: u64,
    /// Bytes written to targets (records, hellos, snapshots, forgets).
    pub bytes: u64,
    /// Records written by `offer`'s own non-blocking write (the common case).
    pub written_inline: u64,
    /// Changes of instances whose target was not connected (a snapshot follows the connect).
    pub dropped_disconnected: u64,
    /// Target buffers dropped because they reached [`SEND_BUFFER_LIMIT`].
    pub overflows: u64,
    /// Connections made.
    pub connects: u64,
    /// Connections made again after one was lost.
    pub reconnects: u64,
    /// Connection attempts that failed.
    pub connect_failures: u64,
    /// Connections lost: a write error or timeout, the receiver closed it, or it sent
    /// something other than acks.
    pub write_errors: u64,
    /// Snapshot frames queued.
    pub snapshots: u64,
    /// Instances covered by those snapshots.
    pub snapshot_instances: u64,
    /// Port reserves queued ([`Replicator::reserve`] returned a ticket).
    pub reserves_queued: u64,
    /// Acks read from targets.
    pub acks_received: u64,
    /// Targets (distinct addresses).
    pub targets: usize,
    /// Targets connected now.
    pub connected: usize,
    /// Instances waiting for a snapshot.
    pub pending: usize,
}

#[derive(Default)]
struct Counters {
    records: AtomicU64,
    bytes: AtomicU64,
    written_inline: AtomicU64,
    dropped_disconnected: AtomicU64,
    overflows: AtomicU64,
    connects: AtomicU64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    write_errors: AtomicU64,
    snapshots: AtomicU64,
    snapshot_instances: AtomicU64,
    reserves: AtomicU64,
    acks: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct LinkState {
    stream: Option<Arc<TcpStream>>,
    /// Connection generation: a new number of the replicator's (unique among all its links)
    /// at each connect and at each overflow, which drops queued bytes. A reserve's ticket
    /// counts only while the generation it was queued on is the current one.
    conn: u64,
    /// The highest `Reserve` number acked on this generation (0: none).
    acked: u64,
    /// Ack bytes read and not yet parsed (a frame cut by the read).
    rbuf: Vec<u8>,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    head: usize,
    /// Snapshot bytes queued since the buffer was last empty (allowed above the limit).
    allow: usize,
    /// The thread is writing a taken buffer (the stream is blocking meanwhile).
    writing: bool,
    /// No instance targets this link any more: flush and end.
    retire: bool,
    stop: bool,
}

struct Link {
    addr: SocketAddr,
    st: Mutex<LinkState>,
    cv: Condvar,
    connected: AtomicBool,
}

impl Link {
    /// Drops the connection and what was queued for it (the thread reconnects).
    fn disconnect(&self, st: &mut LinkState) {
        if let Some(s) = st.stream.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        st.buf.clear();
        st.head = 0;
        st.allow = 0;
        st.acked = 0;
        st.rbuf.clear();
        self.connected.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

struct Routes {
    targets: HashMap<u32, SocketAddr>,
    route: HashMap<u32, Arc<Link>>,
    links: HashMap<SocketAddr, Arc<Link>>,
    /// Instance → the sequence number when it started needing a snapshot: a snapshot whose
    /// `seq_at_start` is at least that covers every change not sent.
    pending: HashMap<u32, u64>,
    /// Instance → the generation of its target's connection on which its last snapshot was
    /// queued (removed when its target changes): a reserve may follow on that generation.
    synced: HashMap<u32, u64>,
    threads: Vec<(Arc<Link>, JoinHandle<()>)>,
}

struct Shared {
    node: NodeId,
    incarnation: u64,
    seq: AtomicU64,
    /// The last connection generation given (see [`LinkState::conn`]).
    gens: AtomicU64,
    routes: Mutex<Routes>,
    c: Counters,
}

impl Shared {
    /// One non-blocking write of what is queued, if the thread is not writing.
    fn write_now(&self, link: &Link, st: &mut LinkState) {
        if st.writing || st.head >= st.buf.len() {
            return;
        }
        let Some(stream) = st.stream.clone() else {
            return;
        };
        match (&*stream).write(&st.buf[st.head..]) {
            Ok(n) => {
                st.head += n;
                bump(&self.c.bytes, n as u64);
                if st.head >= st.buf.len() {
                    st.buf.clear();
                    st.head = 0;
                    st.allow = 0;
                } else {
                    link.cv.notify_all();
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                link.cv.notify_all();
            }
            Err(_) => {
                bump(&self.c.write_errors, 1);
                link.disconnect(st);
            }
        }
    }

    /// Marks every instance routed to `link` as needing a snapshot from now on.
    fn mark_link(&self, routes: &mut Routes, link: &Arc<Link>) {
        let m = self.seq.load(Ordering::SeqCst);
        let insts: Vec<u32> = routes
            .route
            .iter()
            .filter(|(_, l)| Arc::ptr_eq(l, link))
            .map(|(&i, _)| i)
            .collect();
        for i in insts {
            routes.pending.insert(i, m);
        }
    }

    fn next_gen(&self) -> u64 {
        self.gens.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Reads the acks that arrived on the link's connection, without blocking (the stream is
    /// non-blocking whenever the thread is not writing); a closed connection, or bytes that
    /// are not acks, drop it. Whether the connection is still up.
    fn read_acks(&self, link: &Link, st: &mut LinkState) -> bool {
        if st.writing {
            return true;
        }
        let Some(stream) = st.stream.clone() else {
            return false;
        };
        let mut tmp = [0u8; 4096];
        let ok = loop {
            match (&*stream).read(&mut tmp) {
                Ok(0) => break false,
                Ok(n) => {
                    st.rbuf.extend_from_slice(&tmp[..n]);
                    if !self.parse_acks(st) {
                        break false;
                    }
                    if n < tmp.len() {
                        break true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break true
                }
                Err(_) => break false,
            }
        };
        if !ok {
            bump(&self.c.write_errors, 1);
            link.disconnect(st);
        }
        ok
    }

    /// Applies the complete ack frames of `st.rbuf`; false on anything else.
    fn parse_acks(&self, st: &mut LinkState) -> bool {
        let mut at = 0;
        while st.rbuf.len() - at >= 4 {
            let len = u32::from_le_bytes([
                st.rbuf[at],
                st.rbuf[at + 1],
                st.rbuf[at + 2],
                st.rbuf[at + 3],
            ]) as usize;
            if len != ACK_FRAME - 4 {
                return false;
            }
            if st.rbuf.len() - at < ACK_FRAME {
                break;
            }
            match Message::decode(&st.rbuf[at + 4..at + ACK_FRAME]) {
                Ok(Message::Ack { seq }) => {
                    st.acked = st.acked.max(seq);
                    bump(&self.c.acks, 1);
                }
                _ => return false,
            }
            at += ACK_FRAME;
        }
        st.rbuf.drain(..at);
        true
    }
}

/// Where and under which number a port reserve was queued ([`Replicator::reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReserveTicket {
    /// The instance's target when it was queued.
    pub target: SocketAddr,
    /// The generation of the target's connection it was queued on (a number of the
    /// replicator's that grows with every new connection to any target and with every
    /// overflow of a target's buffer; the first connection is 1).
    pub conn: u64,
    /// The reserve's sequence number.
    pub seq: u64,
}

/// Streams the flows of the instances this node owns to their targets (see the module
/// documentation). Dropping it closes its connections at once (like a crash: nothing more is
/// flushed; use [`Replicator::flush`] first for a clean stop).
pub struct Replicator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("node", &self.shared.node)
            .field("incarnation", &self.shared.incarnation)
            .finish_non_exhaustive()
    }
}

impl Replicator {
    /// A sender for `node` in its `incarnation` (a number that must grow with each start of
    /// the process, such as the start's wall-clock time in microseconds: a receiver refuses
    /// an incarnation older than one it has seen). No targets yet.
    pub fn new(node: NodeId, incarnation: u64) -> Replicator {
        Replicator {
            shared: Arc::new(Shared {
                node,
                incarnation,
                seq: AtomicU64::new(0),
                gens: AtomicU64::new(0),
                routes: Mutex::new(Routes {
                    targets: HashMap::new(),
                    route: HashMap::new(),
                    links: HashMap::new(),
                    pending: HashMap::new(),
                    synced: HashMap::new(),
                    threads: Vec::new(),
                }),
                c: Counters::default(),
            }),
        }
    }

    /// This sender's node.
    pub fn node(&self) -> &NodeId {
        &self.shared.node
    }

    /// This sender's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.shared.incarnation
    }

    /// The last sequence number given (to a flow change or a change of targets): read it
    /// before exporting the state for [`Replicator::offer_snapshot`].
    pub fn seq(&self) -> u64 {
        self.shared.seq.load(Ordering::SeqCst)
    }

    /// Sets where each instance (private address) is replicated; instances absent are not.
    /// An instance whose target changed needs a snapshot, and its previous target is told to
    /// forget it; a target no instance uses any more is flushed and closed.
    pub fn set_targets(&self, targets: HashMap<u32, SocketAddr>) {
        let sh = &self.shared;
        let mut routes = lock(&sh.routes);
        let mut forgets: HashMap<SocketAddr, Vec<u32>> = HashMap::new();
        for (&i, &old) in &routes.targets {
            if targets.get(&i) != Some(&old) {
                forgets.entry(old).or_default().push(i);
            }
        }
        let changed: Vec<u32> = targets
            .iter()
            .filter(|(i, a)| routes.targets.get(i) != Some(a))
            .map(|(&i, _)| i)
            .collect();
        // A change of targets takes a number: above every change sent to the old targets,
        // at most every snapshot the new ones get.
        let now_seq = if forgets.is_empty() && changed.is_empty() {
            sh.seq.load(Ordering::SeqCst)
        } else {
            sh.seq.fetch_add(1, Ordering::SeqCst) + 1
        };
        routes.pending.retain(|i, _| targets.contains_key(i));
        routes.synced.retain(|i, _| targets.contains_key(i));
        for i in changed {
            routes.pending.insert(i, now_seq);
            routes.synced.remove(&i);
        }
        for addr in targets.values() {
            if !routes.links.contains_key(addr) {
                let link = Arc::new(Link {
                    addr: *addr,
                    st: Mutex::new(LinkState {
                        stream: None,
                        conn: 0,
                        acked: 0,
                        rbuf: Vec::new(),
                        buf: Vec::new(),
                        head: 0,
                        allow: 0,
                        writing: false,
                        retire: false,
                        stop: false,
                    }),
                    cv: Condvar::new(),
                    connected: AtomicBool::new(false),
                });
                let (shared, l) = (sh.clone(), link.clone());
                match std::thread::Builder::new()
                    .name("snatgw-replica-send".into())
                    .spawn(move || link_loop(&shared, &l))
                {
                    Ok(h) => routes.threads.push((link.clone(), h)),
                    // No thread, no connection: the instances stay pending (counted as
                    // connect failures) and a later call tries again.
                    Err(_) => {
                        bump(&sh.c.connect_failures, 1);
                        continue;
                    }
                }
                routes.links.insert(*addr, link);
            }
        }
        routes.route = targets
            .iter()
            .filter_map(|(&i, a)| routes.links.get(a).map(|l| (i, l.clone())))
            .collect();
        routes.targets = targets;
        for (addr, mut insts) in forgets {
            let Some(link) = routes.links.get(&addr).cloned() else {
                continue;
            };
            insts.sort_unstable();
            let mut st = lock(&link.st);
            if st.stream.is_some() {
                encode_forget(now_seq, &insts, &mut st.buf);
                sh.write_now(&link, &mut st);
            }
        }
        let used: HashSet<SocketAddr> = routes.targets.values().copied().collect();
        let unused: Vec<SocketAddr> = routes
            .links
            .keys()
            .filter(|a| !used.contains(a))
            .copied()
            .collect();
        for a in unused {
            if let Some(link) = routes.links.remove(&a) {
                let mut st = lock(&link.st);
                st.retire = true;
                link.cv.notify_all();
            }
        }
        routes.threads.retain(|(_, h)| !h.is_finished());
    }

    /// The current targets.
    pub fn targets(&self) -> HashMap<u32, SocketAddr> {
        lock(&self.shared.routes).targets.clone()
    }

    /// The replication target of one instance (private address), if it has one.
    pub fn target(&self, instance: u32) -> Option<SocketAddr> {
        lock(&self.shared.routes).targets.get(&instance).copied()
    }

    /// Queues the flow changes of instances that have a target (`Refused` is not sent) and,
    /// where a target's connection is idle, makes one non-blocking write. Called under the
    /// gateway's lock after every batch: it never waits on the network.
    pub fn offer(&self, changes: &[FlowChange]) {
        let sh = &self.shared;
        let mut routes = lock(&sh.routes);
        if routes.route.is_empty() {
            return;
        }
        let mut touched: Vec<Arc<Link>> = Vec::new();
        for c in changes {
            let (kind, key, at) = match c {
                FlowChange::Opened { at, key, .. } => (KIND_OPENED, key, *at),
                FlowChange::Closed { at, key, .. } => (KIND_CLOSED, key, *at),
                FlowChange::Refused { .. } => continue,
            };
            let Some(link) = routes.route.get(&key.src).cloned() else {
                continue;
            };
            let seq = sh.seq.fetch_add(1, Ordering::SeqCst) + 1;
            let mut st = lock(&link.st);
            if st.stream.is_none() {
                // The connect marks every instance of the link for a snapshot.
                bump(&sh.c.dropped_disconnected, 1);
                continue;
            }
            encode_delta(kind, seq, key, at, &mut st.buf);
            bump(&sh.c.records, 1);
            if st.buf.len() - st.head > SEND_BUFFER_LIMIT + st.allow {
                bump(&sh.c.overflows, 1);
                st.buf.clear();
                st.head = 0;
                st.allow = 0;
                // What was dropped may have held reserves: earlier tickets no longer count.
                st.conn = sh.next_gen();
                st.acked = 0;
                drop(st);
                sh.mark_link(&mut routes, &link);
                continue;
            }
            drop(st);
            if !touched.iter().any(|l| Arc::ptr_eq(l, &link)) {
                touched.push(link);
            }
        }
        for link in touched {
            let mut st = lock(&link.st);
            let before = st.head;
            let queued = st.buf.len();
            sh.write_now(&link, &mut st);
            if st.buf.is_empty() && queued > before {
                bump(&sh.c.written_inline, 1);
            }
        }
    }

    /// Whether some instance with a connected target needs a snapshot: the caller then reads
    /// [`Replicator::seq`], exports the engine's state and calls
    /// [`Replicator::offer_snapshot`].
    pub fn needs_snapshot(&self) -> bool {
        let routes = lock(&self.shared.routes);
        routes.pending.keys().any(|i| {
            routes
                .route
                .get(i)
                .is_some_and(|l| l.connected.load(Ordering::SeqCst))
        })
    }

    /// Marks every instance that has a target as needing a snapshot (after a topology change
    /// that moved blocks, or to refresh the replicas' timers).
    pub fn request_snapshot(&self) {
        let sh = &self.shared;
        let mut routes = lock(&sh.routes);
        let m = sh.seq.load(Ordering::SeqCst);
        let insts: Vec<u32> = routes.route.keys().copied().collect();
        for i in insts {
            routes.pending.insert(i, m);
        }
    }

    /// Sends each connected target a snapshot of its instances that need one: their layouts,
    /// flows and releases from `st`, an export started after [`Replicator::seq`] returned
    /// `seq_at_start`. Instances that started needing a snapshot after that (a reconnect or a
    /// new target during the export) stay pending. The snapshot is queued and written as
    /// deltas are; it is allowed above the buffer limit.
    pub fn offer_snapshot(&self, st: &FlowState, seq_at_start: u64) {
        let sh = &self.shared;
        // 1. Who gets what (short, under the lock).
        let plan: Vec<(Arc<Link>, u64, Vec<u32>)> = {
            let routes = lock(&sh.routes);
            let mut by_link: Vec<(Arc<Link>, u64, Vec<u32>)> = Vec::new();
            for (&i, &m) in &routes.pending {
                if m > seq_at_start {
                    continue;
                }
                let Some(link) = routes.route.get(&i) else {
                    continue;
                };
                let conn = {
                    let ls = lock(&link.st);
                    if ls.stream.is_none() {
                        continue;
                    }
                    ls.conn
                };
                match by_link.iter_mut().find(|(l, _, _)| Arc::ptr_eq(l, link)) {
                    Some(e) => e.2.push(i),
                    None => by_link.push((link.clone(), conn, vec![i])),
                }
            }
            by_link
        };
        if plan.is_empty() {
            return;
        }
        // 2. Split and encode without the lock (the gateway's `offer` keeps going).
        let wanted: HashSet<u32> = plan.iter().flat_map(|p| p.2.iter().copied()).collect();
        let parts = split_state(st, &wanted);
        let frames: Vec<(Vec<u8>, usize)> = plan
            .iter()
            .map(|(_, _, insts)| snapshot_frames(seq_at_start, insts, &parts, st.time))
            .collect();
        // 3. Queue where still valid.
        let mut routes = lock(&sh.routes);
        for ((link, conn, insts), (mut bytes, frames_n)) in plan.into_iter().zip(frames) {
            let valid: Vec<u32> = insts
                .iter()
                .copied()
                .filter(|i| {
                    routes.pending.get(i).is_some_and(|&m| m <= seq_at_start)
                        && routes.route.get(i).is_some_and(|l| Arc::ptr_eq(l, &link))
                })
                .collect();
            let mut frames_n = frames_n;
            if valid.len() != insts.len() {
                if valid.is_empty() {
                    continue;
                }
                (bytes, frames_n) = snapshot_frames(seq_at_start, &valid, &parts, st.time);
            }
            let mut ls = lock(&link.st);
            if ls.stream.is_none() || ls.conn != conn {
                continue;
            }
            ls.allow += bytes.len();
            ls.buf.extend_from_slice(&bytes);
            sh.write_now(&link, &mut ls);
            drop(ls);
            bump(&sh.c.snapshots, frames_n as u64);
            bump(&sh.c.snapshot_instances, valid.len() as u64);
            for i in valid {
                routes.pending.remove(&i);
                routes.synced.insert(i, conn);
            }
        }
    }

    /// Queues the port reserve `r` to its instance's current target, on the target's current
    /// connection, after everything queued there so far (see the module documentation).
    ///
    /// Returns `None`, queueing nothing, when the instance has no target, the target has no
    /// connection now, the instance's snapshot has not been queued on that connection (since
    /// it connected, since the last overflow of its buffer, or since the instance got this
    /// target) or `r` has more than [`MAX_RESERVE_PORTS`] ports. A snapshot the caller asked
    /// for ([`Replicator::request_snapshot`]) does not stop reserves: the earlier one is there.
    /// The ticket's acknowledgement ([`Replicator::is_acked`]) therefore means the target
    /// has the instance's snapshot and every change sent before the reserve.
    pub fn reserve(&self, r: &PortReserve) -> Option<ReserveTicket> {
        if r.ports.len() > MAX_RESERVE_PORTS {
            return None;
        }
        let sh = &self.shared;
        // The routes' lock orders the reserve's number and bytes with `offer`'s records.
        let routes = lock(&sh.routes);
        let link = routes.route.get(&r.instance)?;
        let synced = *routes.synced.get(&r.instance)?;
        let mut st = lock(&link.st);
        if st.stream.is_none() || st.conn != synced {
            return None;
        }
        let seq = sh.seq.fetch_add(1, Ordering::SeqCst) + 1;
        encode_reserve(seq, r.instance, r.public, &r.ports, &mut st.buf);
        sh.write_now(link, &mut st);
        bump(&sh.c.reserves, 1);
        Some(ReserveTicket {
            target: link.addr,
            conn: st.conn,
            seq,
        })
    }

    /// Whether the target acknowledged the ticket's reserve (or a later one) on the
    /// connection generation it was queued on, and that generation is still the target's
    /// current, connected one. Reads the acks that arrived (one non-blocking read when the
    /// answer is not known yet). It does not look at the instance's target now: a caller
    /// whose instance changed target since compares `t.target` itself.
    pub fn is_acked(&self, t: &ReserveTicket) -> bool {
        let sh = &self.shared;
        let Some(link) = lock(&sh.routes).links.get(&t.target).cloned() else {
            return false;
        };
        let mut st = lock(&link.st);
        let ok = |st: &LinkState| st.stream.is_some() && st.conn == t.conn && st.acked >= t.seq;
        if ok(&st) {
            return true;
        }
        if st.stream.is_none() || st.conn != t.conn {
            return false;
        }
        sh.read_acks(&link, &mut st);
        ok(&st)
    }

    /// Whether the ticket's reserve can no longer be acknowledged: its target is no longer a
    /// target, or the connection it was queued on is gone (a reconnect or an overflow started
    /// a new generation). A caller waiting for its acknowledgement starts over.
    pub fn is_lost(&self, t: &ReserveTicket) -> bool {
        let sh = &self.shared;
        let Some(link) = lock(&sh.routes).links.get(&t.target).cloned() else {
            return true;
        };
        let st = lock(&link.st);
        st.stream.is_none() || st.conn != t.conn
    }

    /// Waits until every connected target's queue is written to its socket (or `timeout`
    /// passes); whether it was. Instances waiting for a snapshot are not waited for.
    pub fn flush(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            let idle = {
                let routes = lock(&self.shared.routes);
                routes.links.values().all(|l| {
                    let st = lock(&l.st);
                    st.stream.is_none() || (!st.writing && st.head >= st.buf.len())
                })
            };
            if idle {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Counters and sizes.
    pub fn stats(&self) -> ReplicatorStats {
        let sh = &self.shared;
        let routes = lock(&sh.routes);
        let c = &sh.c;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReplicatorStats {
            seq: sh.seq.load(Ordering::SeqCst),
            records: get(&c.records),
            bytes: get(&c.bytes),
            written_inline: get(&c.written_inline),
            dropped_disconnected: get(&c.dropped_disconnected),
            overflows: get(&c.overflows),
            connects: get(&c.connects),
            reconnects: get(&c.reconnects),
            connect_failures: get(&c.connect_failures),
            write_errors: get(&c.write_errors),
            snapshots: get(&c.snapshots),
            snapshot_instances: get(&c.snapshot_instances),
            reserves_queued: get(&c.reserves),
            acks_received: get(&c.acks),
            targets: routes.links.len(),
            connected: routes
                .links
                .values()
                .filter(|l| l.connected.load(Ordering::SeqCst))
                .count(),
            pending: routes.pending.len(),
        }
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        let threads = {
            let mut routes = lock(&self.shared.routes);
            routes.links.clear();
            routes.route.clear();
            std::mem::take(&mut routes.threads)
        };
        for (link, _) in &threads {
            let mut st = lock(&link.st);
            st.stop = true;
            if let Some(s) = &st.stream {
                let _ = s.shutdown(Shutdown::Both);
            }
            link.cv.notify_all();
        }
        for (_, h) in threads {
            let _ = h.join();
        }
    }
}

/// Each wanted instance's part of a state: layouts, flows, releases.
type Parts = HashMap<u32, (Vec<BlockLayout>, Vec<FlowRecord>, Vec<ReleaseRecord>)>;

fn split_state(st: &FlowState, wanted: &HashSet<u32>) -> Parts {
    let mut parts: Parts = HashMap::new();
    for l in &st.layouts {
        if wanted.contains(&l.private_ip) {
            parts.entry(l.private_ip).or_default().0.push(*l);
        }
    }
    for f in &st.flows {
        if wanted.contains(&f.key.src) {
            parts.entry(f.key.src).or_default().1.push(*f);
        }
    }
    for r in &st.releases {
        if wanted.contains(&r.private_ip) {
            parts.entry(r.private_ip).or_default().2.push(*r);
        }
    }
    parts
}

/// Snapshot frames for `insts`, split by instance at about [`SNAPSHOT_FRAME_TARGET`] bytes;
/// the bytes and the number of frames.
fn snapshot_frames(seq: u64, insts: &[u32], parts: &Parts, time: Time) -> (Vec<u8>, usize) {
    let mut insts = insts.to_vec();
    insts.sort_unstable();
    let mut out = Vec::new();
    let mut n = 0;
    let mut cur = FlowState {
        time,
        ..FlowState::default()
    };
    let mut cur_insts: Vec<u32> = Vec::new();
    let mut size = 0usize;
    for i in insts {
        if let Some((l, f, r)) = parts.get(&i) {
            cur.layouts.extend_from_slice(l);
            cur.flows.extend_from_slice(f);
            cur.releases.extend_from_slice(r);
            size += l.len() * 72 + f.len() * 40 + r.len() * 24;
        }
        cur_insts.push(i);
        if size >= SNAPSHOT_FRAME_TARGET {
            encode_snapshot(seq, &cur_insts, &cur, &mut out);
            n += 1;
            cur = FlowState {
                time,
                ..FlowState::default()
            };
            cur_insts.clear();
            size = 0;
        }
    }
    if !cur_insts.is_empty() {
        encode_snapshot(seq, &cur_insts, &cur, &mut out);
        n += 1;
    }
    (out, n)
}

/// A target's thread: connects (with backoff), says hello, and writes what `offer` left.
fn link_loop(sh: &Shared, link: &Arc<Link>) {
    let mut backoff = BACKOFF_MIN;
    let mut connected_before = false;
    'outer: loop {
        // Connect when needed.
        let need = {
            let st = lock(&link.st);
            if st.stop {
                break;
            }
            if st.stream.is_none() && st.retire {
                break;
            }
            st.stream.is_none()
        };
        if need {
            match connect(link.addr) {
                Ok(s) => {
                    let s = Arc::new(s);
                    let mut routes = lock(&sh.routes);
                    let mut st = lock(&link.st);
                    if st.stop || st.retire {
                        let _ = s.shutdown(Shutdown::Both);
                        break;
                    }
                    st.conn = sh.next_gen();
                    st.stream = Some(s);
                    st.buf.clear();
                    st.head = 0;
                    st.allow = 0;
                    st.acked = 0;
                    st.rbuf.clear();
                    encode_hello(&sh.node, sh.incarnation, &mut st.buf);
                    link.connected.store(true, Ordering::SeqCst);
                    drop(st);
                    sh.mark_link(&mut routes, link);
                    drop(routes);
                    bump(&sh.c.connects, 1);
                    if connected_before {
                        bump(&sh.c.reconnects, 1);
                    }
                    connected_before = true;
                    backoff = BACKOFF_MIN;
                }
                Err(_) => {
                    bump(&sh.c.connect_failures, 1);
                    let st = lock(&link.st);
                    let (st, _) = link
                        .cv
                        .wait_timeout_while(st, backoff, |st| !st.stop && !st.retire)
                        .unwrap_or_else(|e| e.into_inner());
                    drop(st);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        // Write what is queued, or wait.
        let mut st = lock(&link.st);
        let (stream, data) = loop {
            if st.stop {
                break 'outer;
            }
            let Some(stream) = st.stream.clone() else {
                continue 'outer;
            };
            // Acks; and a closed connection is noticed here while idle (a restarted receiver),
            // not only at the next write.
            if !sh.read_acks(link, &mut st) {
                continue 'outer;
            }
            if st.head < st.buf.len() && !st.writing {
                let head = st.head;
                let mut data = std::mem::take(&mut st.buf);
                data.drain(..head);
                st.head = 0;
                st.allow = 0;
                st.writing = true;
                break (stream, data);
            }
            if st.retire {
                link.disconnect(&mut st);
                break 'outer;
            }
            st = link
                .cv
                .wait_timeout(st, Duration::from_millis(500))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        drop(st);
        let r = stream
            .set_nonblocking(false)
            .and_then(|()| (&*stream).write_all(&data));
        // Non-blocking again whatever happened: `read_acks` relies on it once `writing` is
        // false (and the read timeout bounds a read if this failed).
        let r = r.and(stream.set_nonblocking(true));
        let mut st = lock(&link.st);
        st.writing = false;
        match r {
            Ok(()) => {
                bump(&sh.c.bytes, data.len() as u64);
                if st.buf.is_empty() {
                    // Keep the allocation.
                    let mut data = data;
                    data.clear();
                    st.buf = data;
                }
            }
            Err(_) => {
                if st.stream.as_ref().is_some_and(|s| Arc::ptr_eq(s, &stream)) {
                    if !st.stop {
                        bump(&sh.c.write_errors, 1);
                    }
                    link.disconnect(&mut st);
                }
            }
        }
    }
    link.connected.store(false, Ordering::SeqCst);
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    s.set_read_timeout(Some(ACK_READ_GUARD))?;
    s.set_nonblocking(true)?;
    Ok(s)
}
