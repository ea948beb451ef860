// SPDX-License-Identifier: GPL-2.0-only OR MIT
//
// Licence (issue #16): this program, and snat_abi.h which it includes, are dual-licensed GPL-2.0
// (only) or MIT, and say so to the kernel with LICENSE = "Dual MIT/GPL", one of the strings the
// kernel takes as GPL-compatible (include/linux/license.h). It has to be GPL-compatible: the
// verifier refuses GPL-only helpers to other programs, and bpf_check_mtu is GPL-only
// (gpl_only = true in net/core/filter.c; the other helpers used here, bpf_redirect_neigh,
// bpf_ktime_get_ns, the checksum/store/pull/adjust_room/change_tail/csum_diff and map helpers,
// are not). The rest of snatgw is Apache-2.0; MIT is the permissive choice that sits with it, GPL-2.0 the one the kernel needs.
// build.rs checks that the SPDX lines of both files and the LICENSE string agree.
//
// snatgw's kernel fast path (issue #9): a tc (tcx) ingress classifier that translates packets
// of flows the userspace engine has installed in FLOWS, and passes everything else up.
//
// What it does, per packet arriving on the interface it is attached to:
//   - IPv4 without options, not a fragment, TCP or UDP, TTL > 1, whose key (addresses, ports,
//     protocol, direction) is in FLOWS: rewrite the source (outbound, attached to the private
//     side) or the destination (inbound, public side) address and port with the kernel's
//     checksum helpers (RFC 1624 incremental updates; a GSO or CHECKSUM_PARTIAL skb stays
//     whole and correct, a zero UDP checksum stays zero), decrement the TTL as a router does,
//     record last-seen time and per-instance packet counters, and redirect to the egress
//     interface with bpf_redirect_neigh (FIB and neighbour lookup). TCP flags do not matter
//     here (issue #17): a SYN-ACK, FIN or RST of an installed flow is translated like any
//     segment, except a SYN without ACK, which goes up (R3.1: an outbound one may be a client
//     reusing the 5-tuple, which the engine must see) unless a stash opens its flow here:
//   - new outbound TCP flows (issue #17, new connections/s at least the kernel's NAT): the
//     engine decides ports ahead, per (instance, destination): STASH_KEYS maps {private
//     address, remote address, remote port} to a slot of STASH, a ring of public ports with
//     the public address, egress interfaces and counters of the flows to open (struct
//     stash_slot; userspace pushes ports through an mmap of the map, the program pops them).
//     An outbound SYN without ACK whose 5-tuple is not in FLOWS and whose key has a slot, TTL >
//     1 and not too big for the slot's egress: the program reserves an EVENTS record (none:
//     up, ST_EVENT_FULL, nothing popped), pops a port (compare-and-swap on the ring's consumer
//     index; empty: the record discarded, up, ST_STASH_EMPTY), installs both FLOWS entries
//     (BPF_NOEXIST, inbound first), translates the SYN as any packet of the flow and reports
//     it as EV_OPENED (ST_STASH_OPENED): the engine then owns the flow exactly as if it had
//     opened it. If an entry is in the way (another flow has the remote's packets to that
//     public port, or another CPU opened the 5-tuple meanwhile), nothing of the attempt stays
//     in FLOWS, the port is reported back as EV_RETURNED (ST_STASH_RETURNED) and the SYN goes
//     up. Once a port is popped its record is always submitted: no port is ever lost. A SYN
//     whose 5-tuple is in FLOWS goes up without popping (R3.1).
//   - a FIN or RST translated here is also reported to userspace in the EVENTS ring buffer
//     (struct tcp_event: the flow as the engine knows it, the flags, which way, and the same
//     bpf_ktime_get_ns() the entry's last_seen gets), so the engine starts the FIN/RST timer
//     at the second the kernel saw the packet (R3.2, R3.3). The record is reserved before the
//     packet is touched: when the ring has no room, the packet is not translated but passed
//     up (ST_EVENT_FULL), and the engine sees the FIN/RST itself, as before issue #17. So a
//     FIN or RST is never lost: either its event is in the ring or its packet reached the
//     engine (a packet the helpers fail to rewrite is dropped, its record discarded, and the
//     peer retransmits it). Submitted without a wakeup: userspace polls the ring.
//   - anything else (first packets of flows, SYN without ACK not opened from a stash, ICMP,
//     fragments, options, a packet too big for the egress MTU, unknown flows, FIN/RST or a
//     stash's SYN without room in EVENTS):
//     TC_ACT_OK, i.e. on to the kernel's stack and, by the operator's policy routing, to the
//     userspace engine (the TUN). The engine stays the only authority: it installs and
//     removes every entry (SPEC R2.2, R3.1-R3.5), except the two a stash's SYN installs here
//     from ports the engine decided, which it learns of from EV_OPENED and owns from then on.
//   - in "floor" mode (CONFIG[CFG_MODE] = MODE_FLOOR, for benchmarks only): parse, decrement
//     the TTL and redirect to CONFIG[CFG_FLOOR_EGRESS_OUT + dir] without any lookup or
//     rewrite: the cost of the mechanism.
//   - fleet steering (issue #19, SPEC R10.3), only while CONFIG[CFG_STEER_EPOCH] is not 0: a
//     packet this node would pass up because no flow here has it (an outbound SYN, a miss)
//     and that belongs to another node (outbound: its source address is in STEER_INST, an
//     instance another node owns; inbound: its destination address and port fall in a chunk
//     of STEER_BLOCK, a port block of another node's instance), with the entry's epoch the
//     current one, is sent unchanged to that node's fleet link: encapsulated in IPv4/UDP from
//     this node's link address and port (CONFIG) with the 4-byte link header ("SG", version,
//     direction), exactly the datagram userspace's steering sends (crates/snatgw/src/
//     fleet_link.rs), out of the link's interface (CONFIG[CFG_LINK_IFINDEX]) with
//     bpf_redirect_neigh, which routes the owner's link address and resolves its neighbour. A
//     GSO packet, or one too big for the link's MTU once encapsulated, is passed up
//     (ST_STEER_UP), and userspace steers it from the TUN (fragmented if need be). The TTL is not touched:
//     the owner decides the packet as if it had arrived there.
//   - receiving steered packets (issue #19): snat_link, attached to the fleet link's ingress,
//     takes a datagram from a live node's link (STEER_PEERS, current epoch) to this node's link
//     address and port whose inner packet belongs to a flow this node installed in FLOWS,
//     unwraps it and translates it exactly as snat_out/snat_in would (the header's direction
//     byte says which), so an established flow costs no userspace pass on either node. Not
//     the first packet of a flow, nor a miss: those stay wrapped and go on to the link's
//     socket, where userspace injects them into the engine. An unwrapped packet that cannot be
//     translated after all (ring full for its FIN/RST, TTL, MTU) is dropped and counted
//     (ST_LINK_DROP), never passed to the stack, which could route it out untranslated.
// What it does not do: decide ports (it only takes the ones the engine stashed), end flows or
// time them, look at ICMP errors, decide who owns what (userspace fills STEER_* from the
// fleet's view and flips the epoch).

// Direction is decided by the attach point (SPEC R9.1): snat_out is attached to the private
// side's ingress, snat_in to the public side's, and the direction is part of the key.

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// The structs, constants, CONFIG slots and STATS indexes shared with the loader.
#include "snat_abi.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct flow_key);
	__type(value, struct flow_val);
	__uint(max_entries, 1 << 20); // the loader sets the real size
} FLOWS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1 << 18); // the loader sets the real size
} COUNTERS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, ST_COUNT);
} STATS SEC(".maps");

// FIN/RST translated here, for the engine (struct tcp_event); the loader sets the size.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENTS_BYTES);
} EVENTS SEC(".maps");

// Fleet steering (issue #19): owner's link by instance private address (network order) and by
// public port chunk (struct steer_block_key); filled by userspace, sized by the loader.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct steer_val);
	__uint(max_entries, 1 << 16);
} STEER_INST SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct steer_block_key);
	__type(value, struct steer_val);
	__uint(max_entries, 1 << 16);
} STEER_BLOCK SEC(".maps");

// The live nodes' fleet links steered packets are taken from (by link address, network
// order), with the epoch of the table they belong to; filled by userspace with STEER_*.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct steer_val);
	__uint(max_entries, 1 << 10);
} STEER_PEERS SEC(".maps");

// Stashes (issue #17): the slot of STASH that serves outbound SYNs from a private address to a
// remote address and port (struct stash_key); filled by userspace, sized by the loader.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct stash_key);
	__type(value, __u32);
	__uint(max_entries, STASH_SLOTS);
} STASH_KEYS SEC(".maps");

// The stash slots (struct stash_slot): rings of public ports the engine decided ahead, shared
// with userspace through mmap (it pushes, the program pops). Same size as STASH_KEYS.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct stash_slot);
	__uint(max_entries, STASH_SLOTS);
	__uint(map_flags, BPF_F_MMAPABLE);
} STASH SEC(".maps");

// Indexed by the CFG_* slots of snat_abi.h; written by the loader before the programs load.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, CFG_COUNT);
} CONFIG SEC(".maps");

#define IP_OFF ETH_HLEN
#define IP_CSUM_OFF (IP_OFF + offsetof(struct iphdr, check))
#define IP_TTL_OFF (IP_OFF + offsetof(struct iphdr, ttl))
#define IP_SRC_OFF (IP_OFF + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (IP_OFF + offsetof(struct iphdr, daddr))
#define L4_OFF (IP_OFF + sizeof(struct iphdr))

// A plain load the compiler neither merges nor repeats (memory userspace writes meanwhile).
#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))
// Compare-and-swap attempts of a stash pop before the SYN goes up as if the stash were empty
// (another CPU won every race: only under a burst of SYNs of one key).
#define STASH_POP_TRIES 8

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&STATS, &idx);
	if (c)
		*c += 1;
}

static __always_inline int pass(__u32 why)
{
	count(why);
	return TC_ACT_OK;
}

static __always_inline int up(bool link, __u32 why)
{
	if (link) {
		count(ST_LINK_DROP);
		return TC_ACT_SHOT;
	}
	return pass(why);
}

static __always_inline __u32 config(__u32 idx)
{
	__u32 *v = bpf_map_lookup_elem(&CONFIG, &idx);
	return v ? *v : 0;
}

// Decrements the TTL (caller checked ttl > 1), fixing the header checksum.
static __always_inline int dec_ttl(struct __sk_buff *skb, __u8 ttl, __u8 proto)
{
	__u16 old = bpf_htons(((__u16)ttl << 8) | proto);
	__u16 new = bpf_htons(((__u16)(ttl - 1) << 8) | proto);
	__u8 nttl = ttl - 1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, 2))
		return -1;
	return bpf_skb_store_bytes(skb, IP_TTL_OFF, &nttl, 1, 0);
}

// The owner's link of a packet another node decides (see the top of the file), or NULL.
// Addresses and ports as on the wire.
static __always_inline struct steer_val *owner(__u8 dir, __u32 src, __u32 dst, __u16 dport)
{
	__u32 epoch = config(CFG_STEER_EPOCH);
	if (!epoch)
		return NULL;
	struct steer_val *o;
	if (dir == DIR_OUT) {
		o = bpf_map_lookup_elem(&STEER_INST, &src);
	} else {
		__u16 port = bpf_ntohs(dport);
		if (port < STEER_PORT_BASE)
			return NULL;
		struct steer_block_key bk = {
			.addr = dst,
			.chunk = (port - STEER_PORT_BASE) / STEER_CHUNK_PORTS,
			.pad = 0,
		};
		o = bpf_map_lookup_elem(&STEER_BLOCK, &bk);
	}
	if (!o || o->epoch != epoch)
		return NULL;
	return o;
}

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

// The outer headers of a steered packet: what userspace's UDP socket would have sent.
struct steer_encap {
	struct iphdr ip;
	struct udphdr udp;
	__u8 hdr[4];
};
_Static_assert(sizeof(struct steer_encap) == STEER_ENCAP_LEN, "encapsulation length");

// Sends the packet, unchanged, to the owner's fleet link (see the top of the file); passes it
// up when it cannot.
static __always_inline int steer(struct __sk_buff *skb, __u8 dir, const struct steer_val *o,
				 __u32 inner)
{
	__u32 link_addr = config(CFG_LINK_ADDR);
	__u16 link_port = (__u16)config(CFG_LINK_PORT);
	__u32 to_addr = o->addr;
	__u16 to_port = o->port;
	if (skb->gso_size)
		return pass(ST_STEER_UP);
	// The link's interface (the one holding this node's link address): redirect_neigh routes
	// the outer destination through it and resolves the next hop's address.
	__u32 out_if = config(CFG_LINK_IFINDEX);
	__u32 mtu = 0;
	if (!out_if || bpf_check_mtu(skb, out_if, &mtu, STEER_ENCAP_LEN, 0))
		return pass(ST_STEER_UP);
	// `inner` is the IP header's total length: a frame longer than that carries link padding,
	// cut off here so the owner gets exactly the packet; a shorter one is truncated.
	if (skb->len < ETH_HLEN + inner || inner > 0xffff - STEER_ENCAP_LEN)
		return pass(ST_STEER_UP);
	if (skb->len > ETH_HLEN + inner && bpf_skb_change_tail(skb, ETH_HLEN + inner, 0))
		return pass(ST_STEER_UP);
	struct steer_encap h = {};
	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tot_len = bpf_htons(inner + STEER_ENCAP_LEN);
	h.ip.frag_off = bpf_htons(0x4000); // DF: never fragmented on the link
	h.ip.ttl = 64;
	h.ip.protocol = IPPROTO_UDP;
	h.ip.saddr = link_addr;
	h.ip.daddr = to_addr;
	h.ip.check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&h.ip, sizeof(h.ip), 0));
	h.udp.source = link_port;
	h.udp.dest = to_port;
	h.udp.len = bpf_htons(inner + STEER_ENCAP_LEN - sizeof(struct iphdr));
	h.udp.check = 0; // none (RFC 768 allows it over IPv4); the inner packet has its own
	h.hdr[0] = 'S';
	h.hdr[1] = 'G';
	h.hdr[2] = STEER_HDR_VERSION;
	h.hdr[3] = dir;
	if (bpf_skb_adjust_room(skb, STEER_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP))
		return pass(ST_STEER_UP);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0))
		return TC_ACT_SHOT; // room made, headers not written: never send half a packet
	count(dir == DIR_OUT ? ST_STEERED_OUT : ST_STEERED_IN);
	return bpf_redirect_neigh(out_if, NULL, 0, 0);
}

// Rewrites the source (DIR_OUT) or destination (DIR_IN) address and port of an IPv4 TCP or UDP
// packet without options from old_* to new_* with the kernel's checksum helpers (RFC 1624
// incremental updates; a GSO or CHECKSUM_PARTIAL skb stays whole and correct, a zero UDP
// checksum stays zero) and decrements its TTL (the caller checked ttl > 1). Non-zero when a
// helper failed: the packet may be half rewritten, and must be dropped. Packet pointers are
// invalid afterwards.
static __always_inline int rewrite(struct __sk_buff *skb, __u8 dir, __u8 proto, __u8 ttl,
				   __u32 old_addr, __u16 old_port, __u32 new_addr, __u16 new_port)
{
	__u32 csum_off = proto == IPPROTO_TCP ? L4_OFF + offsetof(struct tcphdr, check)
					      : L4_OFF + offsetof(struct udphdr, check);
	__u64 mangled = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__u32 addr_off = dir == DIR_OUT ? IP_SRC_OFF : IP_DST_OFF;
	__u32 port_off = dir == DIR_OUT ? L4_OFF + 0 : L4_OFF + 2; // source / dest port
	if (bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, BPF_F_PSEUDO_HDR | mangled | 4) ||
	    bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | 2) ||
	    bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, 4) ||
	    bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) ||
	    bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) || dec_ttl(skb, ttl, proto))
		return -1;
	return 0;
}

// The end of a translated packet: counts it (its flow's per-instance counter and STATS) and
// redirects it to its egress interface.
static __always_inline int forward(__u8 dir, __u32 counter, __u32 ifindex)
{
	__u64 *c = bpf_map_lookup_elem(&COUNTERS, &counter);
	if (c)
		*c += 1;
	count(dir == DIR_OUT ? ST_TRANSLATED_OUT : ST_TRANSLATED_IN);
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

// An outbound SYN without ACK (`k` its key, TCP, DIR_OUT; not from the fleet link), issue #17:
// opened here from its stash when it has one with a port, else passed up (or steered) as
// before. See "new outbound TCP flows" at the top of the file.
static __always_inline int open_syn(struct __sk_buff *skb, struct flow_key *k, __u8 ttl,
				    __u8 tflags, __u32 tot_len)
{
	// A 5-tuple in use: the client reuses it, and the engine must see that (R3.1).
	if (bpf_map_lookup_elem(&FLOWS, k))
		return pass(ST_CONTROL);
	struct stash_key sk = {
		.src = k->src,
		.dst = k->dst,
		.dport = k->dport,
		.pad = 0,
	};
	struct stash_slot *s = NULL;
	__u32 *slot = bpf_map_lookup_elem(&STASH_KEYS, &sk);
	if (slot) {
		__u32 i = *slot;
		s = bpf_map_lookup_elem(&STASH, &i);
	}
	if (!s) {
		struct steer_val *o = owner(DIR_OUT, k->src, k->dst, k->dport);
		if (o)
			return steer(skb, DIR_OUT, o, tot_len);
		return pass(ST_CONTROL);
	}
	if (ttl <= 1)
		return pass(ST_TTL);
	__u32 out_if = s->out_ifindex;
	__u32 mtu = 0;
	if (bpf_check_mtu(skb, out_if, &mtu, 0, 0))
		return pass(ST_MTU);
	// The record first: nothing is popped that could not be reported.
	struct tcp_event *ev = bpf_ringbuf_reserve(&EVENTS, sizeof(*ev), 0);
	if (!ev)
		return pass(ST_EVENT_FULL);
	__u16 port = 0;
	bool got = false;
	for (int n = 0; n < STASH_POP_TRIES; n++) {
		__u32 c = READ_ONCE(s->cons);
		// prod with a fully ordered atomic (an idempotent fetch-or, never a lost update of
		// userspace's store): the ports it covers are read after it, on any architecture
		// (a plain load may pass the port's load on a weakly ordered one).
		__u32 p = __sync_fetch_and_or(&s->prod, 0);
		if (p == c)
			break;
		// More than a ring: `c` is stale (others popped, userspace refilled meanwhile), or
		// prod fell behind cons (a pop that raced userspace emptying the ring, which then
		// counts as empty): look again, never pop a stale entry.
		if (p - c > STASH_PORTS)
			continue;
		// Read before the CAS: once cons passes c, userspace may refill this ring entry.
		port = READ_ONCE(s->ports[c % STASH_PORTS]);
		if (__sync_val_compare_and_swap(&s->cons, c, c + 1) == c) {
			got = true;
			break;
		}
	}
	if (!got) {
		bpf_ringbuf_discard(ev, 0);
		count(ST_STASH_EMPTY);
		return pass(ST_CONTROL);
	}

	// A port popped: from here the record is submitted whatever happens, so the engine
	// learns where every popped port went.
	__u64 now = bpf_ktime_get_ns();
	__u32 public = s->public;
	ev->ts = now;
	ev->src = k->src;
	ev->dst = k->dst;
	ev->public = public;
	ev->sport = k->sport;
	ev->dport = k->dport;
	ev->pport = port;
	ev->flags = tflags;
	ev->dir = DIR_OUT;
	ev->kind = EV_OPENED;
	ev->pad1 = 0;
	ev->pad2 = 0;
	struct flow_key ik = {
		.src = k->dst,
		.dst = public,
		.sport = k->dport,
		.dport = port,
		.proto = IPPROTO_TCP,
		.dir = DIR_IN,
		.pad = 0,
	};
	struct flow_val iv = {
		.addr = k->src,
		.port = k->sport,
		.pad = 0,
		.ifindex = s->in_ifindex,
		.counter = s->counter_in,
		.last_seen = now,
	};
	struct flow_val ov = {
		.addr = public,
		.port = port,
		.pad = 0,
		.ifindex = out_if,
		.counter = s->counter_out,
		.last_seen = now,
	};
	// Inbound first: a remote's packets to public:port belong to another flow already (the
	// likelier refusal); outbound second: another CPU opened this 5-tuple meanwhile (a
	// retransmitted SYN). Either way nothing of this attempt stays in FLOWS.
	if (bpf_map_update_elem(&FLOWS, &ik, &iv, BPF_NOEXIST)) {
		ev->kind = EV_RETURNED;
		ev->sport = 0;
		bpf_ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
		count(ST_STASH_RETURNED);
		return pass(ST_CONTROL);
	}
	if (bpf_map_update_elem(&FLOWS, k, &ov, BPF_NOEXIST)) {
		bpf_map_delete_elem(&FLOWS, &ik);
		ev->kind = EV_RETURNED;
		ev->sport = 0;
		bpf_ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
		count(ST_STASH_RETURNED);
		return pass(ST_CONTROL);
	}
	// The flow is open and the engine's, whatever becomes of this packet (dropped if the
	// helpers fail, as any translated packet: the client retransmits its SYN, translated by
	// the entries then).
	int bad = rewrite(skb, DIR_OUT, IPPROTO_TCP, ttl, k->src, k->sport, public, port);
	bpf_ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
	count(ST_STASH_OPENED);
	if (bad)
		return TC_ACT_SHOT;
	return forward(DIR_OUT, ov.counter, out_if);
}

// Headers the program reads: Ethernet, IPv4 without options, a TCP header (the longest).
#define HDRS_LEN (L4_OFF + sizeof(struct tcphdr))

// `link`: the packet came over the fleet link and was unwrapped by snat_link (it checked
// what decides a pass below beforehand); anything that would pass it up is dropped instead,
// since the stack must never route an unwrapped packet untranslated, and it is not steered
// again (no ping-pong between nodes whose tables disagree for a moment).
static __always_inline int handle(struct __sk_buff *skb, __u8 dir, bool link)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + HDRS_LEN > data_end) {
		// Headers not all in the linear part (packet sockets, some drivers): pull them in,
		// as much of them as the packet has.
		__u32 want = skb->len < HDRS_LEN ? skb->len : HDRS_LEN;
		if (bpf_skb_pull_data(skb, want))
			return up(link, ST_NOT_FAST);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return up(link, ST_NOT_IPV4);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return up(link, ST_NOT_IPV4);
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return up(link, ST_NOT_FAST);
	if (ip->version != 4 || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return up(link, ST_NOT_FAST);
	__u8 proto = ip->protocol;
	__u8 ttl = ip->ttl;
	__u32 tot_len = bpf_ntohs(ip->tot_len);

	if (config(CFG_MODE) == MODE_FLOOR) {
		// Floor mode: the mechanism without the NAT.
		if (ttl <= 1)
			return up(link, ST_TTL);
		if (dec_ttl(skb, ttl, proto))
			return TC_ACT_SHOT;
		count(ST_FLOOR);
		return bpf_redirect_neigh(config(CFG_FLOOR_EGRESS_OUT + dir), NULL, 0, 0);
	}

	struct flow_key k = {
		.src = ip->saddr,
		.dst = ip->daddr,
		.proto = proto,
		.dir = dir,
	};
	__u8 tflags = 0;
	if (proto == IPPROTO_TCP) {
		struct tcphdr *t = (void *)(ip + 1);
		if ((void *)(t + 1) > data_end)
			return up(link, ST_NOT_FAST);
		k.sport = t->source;
		k.dport = t->dest;
		// The flags byte (after the data offset byte).
		tflags = ((__u8 *)t)[13];
		if ((tflags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN) {
			if (dir == DIR_OUT && !link)
				return open_syn(skb, &k, ttl, tflags, tot_len);
			struct steer_val *o = link ? NULL : owner(dir, k.src, k.dst, k.dport);
			if (o)
				return steer(skb, dir, o, tot_len);
			return up(link, ST_CONTROL);
		}
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *u = (void *)(ip + 1);
		if ((void *)(u + 1) > data_end)
			return up(link, ST_NOT_FAST);
		k.sport = u->source;
		k.dport = u->dest;
	} else {
		return up(link, ST_NOT_FAST);
	}

	struct flow_val *v = bpf_map_lookup_elem(&FLOWS, &k);
	if (!v) {
		struct steer_val *o = link ? NULL : owner(dir, k.src, k.dst, k.dport);
		if (o)
			return steer(skb, dir, o, tot_len);
		return up(link, ST_MISS);
	}
	if (ttl <= 1)
		return up(link, ST_TTL);
	__u32 mtu = 0;
	if (bpf_check_mtu(skb, v->ifindex, &mtu, 0, 0))
		return up(link, ST_MTU);

	__u32 new_addr = v->addr;
	__u16 new_port = v->port;
	__u64 now = bpf_ktime_get_ns();

	// A FIN or RST is translated only with its event reserved (see the top of the file).
	struct tcp_event *ev = NULL;
	if (tflags & (TCPF_FIN | TCPF_RST)) {
		ev = bpf_ringbuf_reserve(&EVENTS, sizeof(*ev), 0);
		if (!ev)
			return up(link, ST_EVENT_FULL);
		ev->ts = now;
		ev->flags = tflags;
		ev->dir = dir;
		ev->kind = EV_TCP;
		ev->pad1 = 0;
		ev->pad2 = 0;
		if (dir == DIR_OUT) {
			ev->src = k.src;
			ev->sport = k.sport;
			ev->dst = k.dst;
			ev->dport = k.dport;
			ev->public = new_addr;
			ev->pport = new_port;
		} else {
			ev->src = new_addr;
			ev->sport = new_port;
			ev->dst = k.src;
			ev->dport = k.sport;
			ev->public = k.dst;
			ev->pport = k.dport;
		}
	}
	__u32 old_addr = dir == DIR_OUT ? k.src : k.dst;
	__u16 old_port = dir == DIR_OUT ? k.sport : k.dport;
	if (rewrite(skb, dir, proto, ttl, old_addr, old_port, new_addr, new_port)) {
		if (ev)
			bpf_ringbuf_discard(ev, 0);
		return TC_ACT_SHOT;
	}
	if (ev) {
		bpf_ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
		count(ST_EVENTS);
	}

	v->last_seen = now;
	return forward(dir, v->counter, v->ifindex);
}

SEC("classifier")
int snat_out(struct __sk_buff *skb)
{
	return handle(skb, DIR_OUT, false);
}

SEC("classifier")
int snat_in(struct __sk_buff *skb)
{
	return handle(skb, DIR_IN, false);
}

// Headers snat_link reads: Ethernet, the link's wrapping, an inner IPv4 + TCP header.
#define LINK_HDRS (ETH_HLEN + STEER_ENCAP_LEN + sizeof(struct iphdr) + sizeof(struct tcphdr))

// Attached to the fleet link's ingress (issue #19): a packet another node steered here (see
// the top of the file) whose flow this node's engine installed is unwrapped and translated
// here, like a packet of this node's own interfaces; everything else on the link (the first
// packet of a flow, a miss, the replication stream, anything not from a live node's link) goes
// on to the stack and the link's socket unchanged, where userspace decides it.
SEC("classifier")
int snat_link(struct __sk_buff *skb)
{
	__u32 epoch = config(CFG_STEER_EPOCH);
	if (!epoch || config(CFG_MODE) != MODE_TRANSLATE || skb->gso_size)
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + LINK_HDRS > data_end) {
		__u32 want = skb->len < LINK_HDRS ? skb->len : LINK_HDRS;
		if (bpf_skb_pull_data(skb, want))
			return TC_ACT_OK;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *o = (void *)(eth + 1);
	if ((void *)(o + 1) > data_end)
		return TC_ACT_OK;
	if (o->version != 4 || o->ihl != 5 || (o->frag_off & bpf_htons(0x3fff)) ||
	    o->protocol != IPPROTO_UDP || o->daddr != config(CFG_LINK_ADDR))
		return TC_ACT_OK;
	struct udphdr *u = (void *)(o + 1);
	if ((void *)(u + 1) > data_end || u->dest != (__u16)config(CFG_LINK_PORT))
		return TC_ACT_OK;
	__u8 *h = (void *)(u + 1);
	struct iphdr *ip = (void *)(h + 4);
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	if (h[0] != 'S' || h[1] != 'G' || h[2] != STEER_HDR_VERSION || h[3] > DIR_IN)
		return pass(ST_LINK_UP);
	__u8 dir = h[3];
	__u32 peer = o->saddr;
	struct steer_val *p = bpf_map_lookup_elem(&STEER_PEERS, &peer);
	if (!p || p->epoch != epoch)
		return pass(ST_LINK_UP);
	// The inner packet: what snat_out/snat_in would translate, whole (its length is the
	// datagram's), and not a packet the engine must see.
	if (ip->version != 4 || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)) || ip->ttl <= 1 ||
	    bpf_ntohs(ip->tot_len) + 8 + 4 != bpf_ntohs(u->len))
		return pass(ST_LINK_UP);
	struct flow_key k = {
		.src = ip->saddr,
		.dst = ip->daddr,
		.proto = ip->protocol,
		.dir = dir,
	};
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *t = (void *)(ip + 1);
		if ((void *)(t + 1) > data_end)
			return pass(ST_LINK_UP);
		__u8 fl = ((__u8 *)t)[13];
		if ((fl & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN)
			return pass(ST_LINK_UP);
		k.sport = t->source;
		k.dport = t->dest;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *iu = (void *)(ip + 1);
		if ((void *)(iu + 1) > data_end)
			return pass(ST_LINK_UP);
		k.sport = iu->source;
		k.dport = iu->dest;
	} else {
		return pass(ST_LINK_UP);
	}
	if (!bpf_map_lookup_elem(&FLOWS, &k))
		return pass(ST_LINK_UP);
	if (bpf_skb_adjust_room(skb, -(__s32)STEER_ENCAP_LEN, BPF_ADJ_ROOM_MAC, 0))
		return pass(ST_LINK_UP);
	count(ST_LINK_IN);
	return handle(skb, dir, true);
}

// Must agree with the SPDX line at the top (checked by build.rs); see the licence note there.
char LICENSE[] SEC("license") = "Dual MIT/GPL";
