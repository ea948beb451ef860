//! The fleet link's packet side (issue #19, SPEC R10.3 "any node, any packet"): forwarding
//! packets this node may not decide to the node that owns them, and taking such packets from
//! the other nodes.
//!
//! **What is steered.** The engine refuses two kinds of packets a fleet node may receive but
//! another node decides, and leaves them unchanged:
//! - outbound, [`DropReason::NotOwned`]: a new flow (or a packet of a flow this node does not
//!   know) of an instance whose grant another node holds (R10.2 admission). Its owner is the
//!   instance's, by the private source address.
//! - inbound, [`DropReason::UnsolicitedInbound`]: a packet to a shared public address that
//!   matches no flow of this node. Its owner is the instance whose port block holds the
//!   destination port ([`Engine::instance_of_public_port`]: every node computes the same
//!   blocks from the same topology, R2.4).
//!
//! [`Steering::target`] (under the gateway lock, lookups only) names the owner's link from a
//! route table the fleet's member loop refreshes after every tick (the rendezvous owner among
//! the live nodes, R10.1); the runtime then sends the packet, outside the lock, as one UDP
//! datagram to the owner's `--fleet-link` address: a 4-byte header (`SG`, version, direction)
//! and the packet as it arrived. The receiving node's thread ([`Steering::spawn_receiver`])
//! accepts datagrams only from the live nodes' link addresses and injects each into its own
//! runtime on the side the header names; there it is decided like a packet of its own queue,
//! and a refused injected packet is dropped, never steered again (no ping-pong while two
//! nodes' route tables disagree for a moment). An injected inbound packet reaches an instance
//! only through a flow or rule of the owner's engine, exactly as one from its own queue
//! (nothing from the internet reaches an instance unless a flow or rule allows it).
//!
//! **The kernel does most of it.** With the fast path running, the fleet gives the tc
//! program the same owners (`snatgw_io::fastpath::FastPathSteer`, filled by
//! `crate::fleet::kernel_table`), and it sends those packets as exactly this datagram itself
//! (same header, from this link's address and port), so the receiver cannot tell the two
//! apart; what the kernel cannot send (GSO, too big for the link once wrapped, an instance
//! still granted here) comes up and is steered here. The receiver is always this module.
//!
//! **What it does not do.** ICMP errors are not steered (their flow is in the quoted header; they are
//! dropped as `icmp_error_no_flow` on a node that does not have the flow). Fragments after
//! the first are not steered. The link is not encrypted or authenticated beyond the source
//! address check: put it on the fleet's management network.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use snatgw_core::{proto, Direction, DropReason, Engine};
use snatgw_runtime::Injector;

const MAGIC: [u8; 2] = *b"SG";
const VERSION: u8 = 1;
const HEADER: usize = 4;

/// How long datagrams from a node that left the live set are still accepted (R10.3): a node
/// cut from etcd (R10.5, its lease ended) that the routers keep in their ECMP routes goes on
/// steering the packets that reach it to their owners; refusing them would black-hole its
/// share of every other instance's packets for as long as the cut lasts.
pub const FORMER_PEER_GRACE: Duration = Duration::from_secs(600);

/// Where steered packets go: the owner's link per instance private address.
#[derive(Default)]
struct Routes {
    /// Instance private address → index into `peers`.
    owner: HashMap<u32, u32>,
    /// The live nodes' link addresses (other than this node).
    peers: Vec<SocketAddr>,
    /// Their IP addresses, for the receiver's source check.
    allowed: HashSet<IpAddr>,
    /// Link addresses of nodes that left the live set, and since when: still accepted for
    /// [`FORMER_PEER_GRACE`].
    former: HashMap<IpAddr, Instant>,
}

/// Counters of the steering link.
#[derive(Debug, Default)]
pub struct SteerCounters {
    /// Packets sent to another node.
    pub sent: AtomicU64,
    /// Packets that could not be sent (the socket refused them).
    pub send_failed: AtomicU64,
    /// Packets received from another node and injected.
    pub received: AtomicU64,
    /// Datagrams refused: unknown sender, bad header, or the runtime's inbox full.
    pub refused: AtomicU64,
}

/// The steering side of the fleet link (see the module documentation).
pub struct Steering {
    sock: UdpSocket,
    routes: RwLock<Routes>,
    counters: SteerCounters,
}

impl Steering {
    /// Binds the link's UDP socket on `addr` (the node's `--fleet-link`).
    pub fn bind(addr: SocketAddr) -> io::Result<Arc<Steering>> {
        let sock = UdpSocket::bind(addr)?;
        Ok(Arc::new(Steering {
            sock,
            routes: RwLock::new(Routes::default()),
            counters: SteerCounters::default(),
        }))
    }

    /// Its counters.
    pub fn counters(&self) -> &SteerCounters {
        &self.counters
    }

    /// Replaces the route table: the owner's link for each instance another live node owns
    /// (instances this node owns, or whose owner has no link, are absent), and the link
    /// addresses datagrams are accepted from: the live nodes', and for
    /// [`FORMER_PEER_GRACE`] those of nodes that left (a node cut from etcd still forwards
    /// what the routers send it; what it steers here is decided here like any packet).
    pub fn set_routes(&self, owner: &HashMap<u32, SocketAddr>, peers: &[SocketAddr]) {
        self.set_routes_at(owner, peers, Instant::now());
    }

    fn set_routes_at(&self, owner: &HashMap<u32, SocketAddr>, peers: &[SocketAddr], now: Instant) {
        let mut r = Routes::default();
        for p in peers {
            if !r.peers.contains(p) {
                r.peers.push(*p);
            }
            r.allowed.insert(p.ip());
        }
        for (&inst, link) in owner {
            let i = match r.peers.iter().position(|p| p == link) {
                Some(i) => i,
                None => {
                    r.peers.push(*link);
                    r.allowed.insert(link.ip());
                    r.peers.len() - 1
                }
            };
            r.owner.insert(inst, i as u32);
        }
        let mut w = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::take(&mut *w);
        r.former = old.former;
        for ip in old.allowed {
            r.former.entry(ip).or_insert(now);
        }
        r.former.retain(|ip, since| {
            !r.allowed.contains(ip) && now.duration_since(*since) < FORMER_PEER_GRACE
        });
        *w = r;
    }

    /// Starts the thread that injects the other nodes' steered packets into this node's
    /// runtime, until `stop`.
    pub fn spawn_receiver(
        self: &Arc<Self>,
        injector: Injector,
        stop: Arc<AtomicBool>,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        let me = self.clone();
        let sock = self.sock.try_clone()?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        std::thread::Builder::new()
            .name("snatgw-fleet-steer".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    let (n, from) = match sock.recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) =>
                        {
                            continue
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "fleet link: receive failed");
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    match me.accept(&buf[..n], from) {
                        Some((dir, pkt)) if injector.inject(dir, pkt) => {
                            me.counters.received.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            me.counters.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
    }

    /// A datagram's direction and packet, if it comes from a live node's link (or one that
    /// left less than [`FORMER_PEER_GRACE`] ago) and is well formed.
    fn accept<'a>(&self, d: &'a [u8], from: SocketAddr) -> Option<(Direction, &'a [u8])> {
        {
            let r = self.routes.read().unwrap_or_else(|p| p.into_inner());
            if !r.allowed.contains(&from.ip()) && !r.former.contains_key(&from.ip()) {
                return None;
            }
        }
        if d.len() <= HEADER || d[..2] != MAGIC || d[2] != VERSION {
            return None;
        }
        let dir = match d[3] {
            0 => Direction::Outbound,
            1 => Direction::Inbound,
            _ => return None,
        };
        Some((dir, &d[HEADER..]))
    }
}

/// The instance a refused packet belongs to, if it is one this module steers.
fn instance_of(engine: &Engine, dir: Direction, reason: DropReason, pkt: &[u8]) -> Option<u32> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(pkt.get(at..at + 4)?.try_into().ok()?))
    };
    match (dir, reason) {
        (Direction::Outbound, DropReason::NotOwned) => word(12),
        (Direction::Inbound, DropReason::UnsolicitedInbound) => {
            let ihl = usize::from(*pkt.first()? & 0x0f) * 4;
            let p = *pkt.get(9)?;
            // A later fragment carries no ports.
            let frag = u16::from_be_bytes(pkt.get(6..8)?.try_into().ok()?) & 0x1fff;
            if (p != proto::TCP && p != proto::UDP) || frag != 0 {
                return None;
            }
            let port = u16::from_be_bytes(pkt.get(ihl + 2..ihl + 4)?.try_into().ok()?);
            engine.instance_of_public_port(word(16)?, port)
        }
        _ => None,
    }
}

impl snatgw_runtime::Steer for Steering {
    fn target(
        &self,
        engine: &Engine,
        dir: Direction,
        reason: DropReason,
        pkt: &[u8],
    ) -> Option<u32> {
        let inst = instance_of(engine, dir, reason, pkt)?;
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .owner
            .get(&inst)
            .copied()
    }

    fn send(&self, target: u32, dir: Direction, pkt: &[u8]) {
        let Some(to) = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .peers
            .get(target as usize)
            .copied()
        else {
            self.counters.send_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut d = Vec::with_capacity(HEADER + pkt.len());
        d.extend_from_slice(&MAGIC);
        d.push(VERSION);
        d.push(match dir {
            Direction::Outbound => 0,
            Direction::Inbound => 1,
        });
        d.extend_from_slice(pkt);
        match self.sock.send_to(&d, to) {
            Ok(_) => self.counters.sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.counters.send_failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn tcp_packet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[8] = 64;
        p[9] = proto::TCP;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[32] = 0x50;
        p[33] = 0x02;
        p
    }

    /// Two PAT instances, vm1 (10.0.1.10) and vm2 (10.0.1.11), on 192.0.2.100.
    pub(crate) fn engine() -> Engine {
        let cfg = r#"
[gateway]
seed = 1
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100"]
[[instance]]
name = "vm1"
private_ip = "10.0.1.10"
[[instance]]
name = "vm2"
private_ip = "10.0.1.11"
"#;
        let file = snatgw_core::ConfigFile::from_toml(cfg).expect("config");
        Engine::new(
            snatgw_core::Topology::from_config(file).expect("topology"),
            0,
        )
        .expect("engine")
    }

    /// R10.3: an outbound packet refused as not owned goes to its instance's owner; an
    /// inbound one to the owner of the instance whose block holds the port; other refusals,
    /// and instances without a route (this node's own), are not steered.
    #[test]
    fn r10_3_steering_targets_the_owner_of_the_instance_or_the_port_block() {
        let mut e = engine();
        let (vm1, vm2) = ([10, 0, 1, 10], [10, 0, 1, 11]);
        let remote = [198, 51, 100, 7];
        // Open a flow of vm2 to learn a port of its block (the oracle: the engine's own choice).
        let v = e.process(
            1,
            Direction::Outbound,
            &snatgw_core::Packet {
                proto: proto::TCP,
                src: u32::from_be_bytes(vm2),
                dst: u32::from_be_bytes(remote),
                src_port: 40000,
                dst_port: 443,
                flags: snatgw_core::tcp_flags::SYN,
            },
        );
        let snatgw_core::Verdict::Translate { addr, port } = v else {
            panic!("{v:?}")
        };
        let s = Steering::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let (n2, n3): (SocketAddr, SocketAddr) = (
            "127.0.0.2:7000".parse().expect("a"),
            "127.0.0.3:7000".parse().expect("a"),
        );
        let owner: HashMap<u32, SocketAddr> =
            [(u32::from_be_bytes(vm1), n2), (u32::from_be_bytes(vm2), n3)]
                .into_iter()
                .collect();
        s.set_routes(&owner, &[n2, n3]);
        use snatgw_runtime::Steer;
        let out = tcp_packet(vm1, 40001, remote, 443);
        let t = s.target(&e, Direction::Outbound, DropReason::NotOwned, &out);
        assert_eq!(
            t.map(|i| s.routes.read().expect("r").peers[i as usize]),
            Some(n2)
        );
        let back = tcp_packet(remote, 443, addr.to_be_bytes(), port);
        let t = s.target(
            &e,
            Direction::Inbound,
            DropReason::UnsolicitedInbound,
            &back,
        );
        assert_eq!(
            t.map(|i| s.routes.read().expect("r").peers[i as usize]),
            Some(n3)
        );
        // Not a steered refusal (a port-reserve refusal is this node's own instance waiting
        // for its runner-up, R10.4); a port below the blocks; truncated bytes.
        assert_eq!(
            s.target(&e, Direction::Outbound, DropReason::PortsExhausted, &out),
            None
        );
        assert_eq!(
            s.target(&e, Direction::Outbound, DropReason::PortReserve, &out),
            None
        );
        let low = tcp_packet(remote, 443, addr.to_be_bytes(), 80);
        assert_eq!(
            s.target(&e, Direction::Inbound, DropReason::UnsolicitedInbound, &low),
            None
        );
        assert_eq!(
            s.target(
                &e,
                Direction::Inbound,
                DropReason::UnsolicitedInbound,
                &back[..22]
            ),
            None
        );
        // This node's own instance has no route.
        s.set_routes(
            &[(u32::from_be_bytes(vm2), n3)].into_iter().collect(),
            &[n2, n3],
        );
        assert_eq!(
            s.target(&e, Direction::Outbound, DropReason::NotOwned, &out),
            None
        );
    }

    /// The receiver accepts only live nodes' links and well-formed headers.
    #[test]
    fn r10_3_link_accepts_only_known_nodes_and_well_formed_datagrams() {
        let s = Steering::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let peer: SocketAddr = "127.0.0.2:7000".parse().expect("a");
        s.set_routes(&HashMap::new(), &[peer]);
        let pkt = tcp_packet([10, 0, 1, 10], 1, [198, 51, 100, 7], 2);
        let mut d = b"SG\x01\x01".to_vec();
        d.extend_from_slice(&pkt);
        assert_eq!(
            s.accept(&d, peer).map(|(dir, p)| (dir, p.len())),
            Some((Direction::Inbound, pkt.len()))
        );
        let stranger: SocketAddr = "192.0.2.1:7000".parse().expect("a");
        assert!(s.accept(&d, stranger).is_none());
        let mut bad = d.clone();
        bad[2] = 9;
        assert!(s.accept(&bad, peer).is_none());
        bad = d.clone();
        bad[3] = 7;
        assert!(s.accept(&bad, peer).is_none());
        assert!(s.accept(b"SG\x01\x00", peer).is_none());
    }

    /// R10.3 with R10.5: a node that left the live set (cut from etcd, its lease ended) still
    /// forwards what the routers send it; its datagrams are accepted for FORMER_PEER_GRACE
    /// after it left, then refused; one that comes back is live again. Strangers never.
    #[test]
    fn r10_3_link_accepts_a_node_that_left_for_a_grace_period() {
        let s = Steering::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.2:7000".parse().expect("a"),
            "127.0.0.3:7000".parse().expect("b"),
        );
        let pkt = tcp_packet([10, 0, 1, 10], 1, [198, 51, 100, 7], 2);
        let mut d = b"SG\x01\x01".to_vec();
        d.extend_from_slice(&pkt);
        let t = Instant::now();
        s.set_routes_at(&HashMap::new(), &[a, b], t);
        // b leaves the live set.
        s.set_routes_at(&HashMap::new(), &[a], t + Duration::from_secs(1));
        assert!(
            s.accept(&d, b).is_some(),
            "a node that just left still forwards"
        );
        s.set_routes_at(&HashMap::new(), &[a], t + FORMER_PEER_GRACE);
        assert!(s.accept(&d, b).is_some(), "within the grace period");
        s.set_routes_at(
            &HashMap::new(),
            &[a],
            t + Duration::from_secs(1) + FORMER_PEER_GRACE,
        );
        assert!(s.accept(&d, b).is_none(), "grace period over");
        // It comes back: live again; it leaves again: a new grace period.
        s.set_routes_at(&HashMap::new(), &[a, b], t + FORMER_PEER_GRACE * 2);
        assert!(s.accept(&d, b).is_some());
        s.set_routes_at(&HashMap::new(), &[a], t + FORMER_PEER_GRACE * 3);
        assert!(s.accept(&d, b).is_some());
        let stranger: SocketAddr = "192.0.2.1:7000".parse().expect("a");
        assert!(s.accept(&d, stranger).is_none());
        assert!(s.accept(&d, a).is_some());
    }
}
