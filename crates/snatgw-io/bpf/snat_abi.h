/* SPDX-License-Identifier: GPL-2.0-only OR MIT */
/*
 * The fast path's ABI (issue #16): every struct and constant shared by the tc program
 * (snat_tc.c) and its userspace loader (crates/snatgw-io/src/fastpath.rs), defined once, here.
 *
 * The Rust side keeps `#[repr(C)]` mirrors and consts, checked against this header by every
 * build: build.rs compiles bpf/abi_check.c (which includes this header) for the host, runs
 * it, and turns what it prints (each struct's size and alignment, each field's type, offset
 * and size, each constant's value, each STATS index with its name) into compile-time
 * assertions that fastpath.rs includes. A mirror that disagrees does not compile.
 *
 * The lists below are X-macros so that abi_check.c walks exactly what is declared: a field,
 * constant, config slot or stat added here is checked without anyone remembering to list it,
 * and fails the Rust build until the mirror has it.
 *
 * Layout rules: fixed-width types only, explicit padding fields, no implicit padding (asserted
 * below), so the layout is the same for -target bpf and any 64-bit host, and every byte the
 * loader copies to the kernel is initialised (what aya::Pod requires).
 *
 * Licence: as snat_tc.c (see there): this header is compiled into the BPF object.
 */
#ifndef SNAT_ABI_H
#define SNAT_ABI_H

#include <linux/types.h>

/* Named constants: K(name, value). */
#define SNAT_CONSTANTS(K)                                                                   \
	K(DIR_OUT, 0)           /* key direction: arrived on the private side (snat_out) */ \
	K(DIR_IN, 1)            /* key direction: arrived on the public side (snat_in) */   \
	K(COUNTERS_PER_SLOT, 4) /* COUNTERS entries per instance slot: {TCP,UDP} x {out,in} */ \
	K(MODE_TRANSLATE, 0)    /* CONFIG[CFG_MODE]: look flows up and translate them */    \
	K(MODE_FLOOR, 1)        /* CONFIG[CFG_MODE]: benchmark floor, redirect without NAT */ \
	K(TCPF_FIN, 0x01)       /* tcp_event.flags: the TCP flags byte as on the wire */ \
	K(TCPF_SYN, 0x02)                                                                   \
	K(TCPF_RST, 0x04)                                                                   \
	K(TCPF_ACK, 0x10)                                                                   \
	K(EVENTS_BYTES, 1 << 20) /* default size of the EVENTS ring (the loader may set another) */ \
	K(STEER_PORT_BASE, 1024) /* fleet steering (#19): first port of the PAT chunks */ \
	K(STEER_CHUNK_PORTS, 32) /* ports per chunk (snatgw_core's CHUNK) */ \
	K(STEER_HDR_VERSION, 1)  /* version byte of the fleet link's 4-byte header "SG" */ \
	K(STEER_ENCAP_LEN, 32)   /* outer IPv4 (20) + UDP (8) + the link header (4) */ \
	K(STASH_PORTS, 64)       /* ports in a stash slot's ring (stash_slot.ports) */ \
	K(STASH_SLOTS, 4096)     /* default entries of STASH and STASH_KEYS (the loader sets them) */ \
	K(EV_TCP, 0)             /* tcp_event.kind: a FIN or RST translated here */ \
	K(EV_OPENED, 1)          /* tcp_event.kind: a flow opened here from a stash */ \
	K(EV_RETURNED, 2)        /* tcp_event.kind: a port popped from a stash, not used */

/* Slots of the CONFIG array, in order: C(name). */
#define SNAT_CONFIG_SLOTS(C)                                                       \
	C(CFG_MODE)             /* MODE_TRANSLATE or MODE_FLOOR */                 \
	C(CFG_FLOOR_EGRESS_OUT) /* floor mode: egress ifindex of snat_out's packets */ \
	C(CFG_FLOOR_EGRESS_IN)  /* floor mode: egress ifindex of snat_in's packets */ \
	C(CFG_STEER_EPOCH)      /* fleet steering (#19): entries of this epoch count; 0: off */ \
	C(CFG_LINK_ADDR)        /* this node's fleet link address, network order */ \
	C(CFG_LINK_PORT)        /* this node's fleet link UDP port, network order (low 16 bits) */ \
	C(CFG_LINK_IFINDEX)     /* the interface holding the fleet link address */

/* Entries of the STATS array, in order: S(index name, name in Rust's STAT_NAMES). */
#define SNAT_STATS(S)                                                                    \
	S(ST_TRANSLATED_OUT, translated_out)                                             \
	S(ST_TRANSLATED_IN, translated_in)                                               \
	S(ST_MISS, miss)         /* no entry: passed up */                               \
	S(ST_CONTROL, control)   /* TCP SYN without ACK: passed up (R3.1: the engine decides) */ \
	S(ST_NOT_FAST, not_fast) /* not IPv4 TCP/UDP, options, fragment: passed up */    \
	S(ST_TTL, ttl)           /* TTL <= 1: passed up (the kernel answers time exceeded) */ \
	S(ST_MTU, mtu)           /* too big for the egress interface: passed up */       \
	S(ST_FLOOR, floor)       /* floor mode redirects */                              \
	S(ST_NOT_IPV4, not_ipv4) /* not IPv4 (ARP and others): passed up */              \
	S(ST_EVENTS, events)     /* FIN/RST translated here, reported in EVENTS */       \
	S(ST_EVENT_FULL, event_full) /* FIN/RST of a flow passed up: no room in EVENTS */ \
	S(ST_STEERED_OUT, steered_out) /* another node's instance: sent to it over the fleet link */ \
	S(ST_STEERED_IN, steered_in)   /* a port block of another node's: sent to it likewise */ \
	S(ST_STEER_UP, steer_up) /* another node's, but not sendable here (GSO, MTU): passed up */ \
	S(ST_LINK_IN, link_in)   /* steered to this node: unwrapped here to be translated */ \
	S(ST_LINK_UP, link_up)   /* steered to this node: left to the link's socket (SYN, no flow) */ \
	S(ST_LINK_DROP, link_drop) /* unwrapped, then not translatable (ring full, MTU, TTL): dropped */ \
	S(ST_STASH_OPENED, stash_opened) /* outbound SYN: flow opened here from a stash (EV_OPENED) */ \
	S(ST_STASH_EMPTY, stash_empty)   /* outbound SYN: its stash was empty: passed up */ \
	S(ST_STASH_RETURNED, stash_returned) /* a port popped, not used (EV_RETURNED): passed up */

/* Key of FLOWS: F(type, name). Addresses and ports as on the wire (network order). */
#define SNAT_FLOW_KEY_FIELDS(F, A)                       \
	F(__u32, src)   /* source address */             \
	F(__u32, dst)   /* destination address */        \
	F(__u16, sport) /* source port */                \
	F(__u16, dport) /* destination port */           \
	F(__u8, proto)  /* IP protocol */                \
	F(__u8, dir)    /* DIR_OUT or DIR_IN */          \
	F(__u16, pad)   /* zero */

/* Value of FLOWS: F(type, name). */
#define SNAT_FLOW_VAL_FIELDS(F, A)                                                          \
	F(__u32, addr)      /* new address (outbound: source; inbound: destination), network order */ \
	F(__u16, port)      /* new port, network order */                                   \
	F(__u16, pad)       /* zero */                                                      \
	F(__u32, ifindex)   /* egress interface */                                          \
	F(__u32, counter)   /* COUNTERS index of this flow's instance, protocol, direction */ \
	F(__u64, last_seen) /* bpf_ktime_get_ns() of the last packet translated here */

/* Record of the EVENTS ring (issue #17), of one of three kinds:
 *   EV_TCP: a FIN or RST the program translated, so the engine applies it at the kernel's
 *     time (R3.2, R3.3). The flow as the engine knows it: the outbound 5-tuple and the public
 *     side, whichever direction the packet travelled.
 *   EV_OPENED: an outbound SYN (flags) for which the program opened the flow itself from a
 *     stash (see struct stash_slot) and installed both FLOWS entries: the outbound 5-tuple,
 *     the slot's public address and the port popped (pport), dir DIR_OUT, ts the packet's
 *     time (the entries' last_seen). The engine now owns the flow and its entries.
 *   EV_RETURNED: a port popped from a stash but not used (a FLOWS entry was in the way): pport
 *     the port, public the slot's address, src/dst/dport the stash key, sport 0, flags the
 *     SYN's, dir DIR_OUT; the SYN itself went up. The port is the engine's again.
 * Network order, as in the map. */
#define SNAT_TCP_EVENT_FIELDS(F, A)                                                          \
	F(__u64, ts)     /* bpf_ktime_get_ns() of the packet (also the entry's last_seen) */ \
	F(__u32, src)    /* private address */                                           \
	F(__u32, dst)    /* remote address */                                            \
	F(__u32, public) /* public address */                                            \
	F(__u16, sport)  /* private port */                                              \
	F(__u16, dport)  /* remote port */                                               \
	F(__u16, pport)  /* public (SNAT) port */                                        \
	F(__u8, flags)   /* TCP flags byte (TCPF_*) */                                   \
	F(__u8, dir)     /* DIR_OUT or DIR_IN: which way the packet travelled */         \
	F(__u8, kind)    /* EV_TCP, EV_OPENED or EV_RETURNED */                          \
	F(__u8, pad1)    /* zero */                                                      \
	F(__u16, pad2)   /* zero */

/* Value of STEER_INST and STEER_BLOCK (issue #19, SPEC R10.3): the fleet link of the node that
 * owns an instance or a port chunk, and the epoch the entry was written in (it counts only
 * while CONFIG[CFG_STEER_EPOCH] is that epoch, so userspace swaps a whole table at once). */
#define SNAT_STEER_VAL_FIELDS(F, A)                                               \
	F(__u32, addr)  /* the owner's link address, network order */          \
	F(__u16, port)  /* the owner's link UDP port, network order */         \
	F(__u16, pad)   /* zero */                                             \
	F(__u32, epoch) /* CONFIG[CFG_STEER_EPOCH] when written */             \
	F(__u32, pad2)  /* zero */

/* Key of STEER_BLOCK: a public address and the chunk of STEER_CHUNK_PORTS ports from
 * STEER_PORT_BASE that holds the destination port (the engine's chunks, SPEC R2.4). */
#define SNAT_STEER_BLOCK_KEY_FIELDS(F, A)                                         \
	F(__u32, addr)  /* public address, network order */                    \
	F(__u16, chunk) /* (port - STEER_PORT_BASE) / STEER_CHUNK_PORTS, host order */ \
	F(__u16, pad)   /* zero */

/* Key of STASH_KEYS (issue #17): the outbound SYNs a stash serves, TCP only. Network order. */
#define SNAT_STASH_KEY_FIELDS(F, A)                                               \
	F(__u32, src)   /* private (source) address */                         \
	F(__u32, dst)   /* remote (destination) address */                     \
	F(__u16, dport) /* remote port */                                      \
	F(__u16, pad)   /* zero */

/* Value of STASH (an mmapable ARRAY indexed by STASH_KEYS' values, issue #17): public ports
 * the engine decided ahead for one (instance, destination), from which the program opens new
 * outbound TCP flows itself. ports[] is a ring of STASH_PORTS: entry i (a free-running u32
 * index) is ports[i % STASH_PORTS]; the ring holds [cons, prod). Userspace alone changes prod
 * (a release store after the ports it covers; the program reads it with a fully ordered
 * idempotent atomic, an acquire on any architecture), the params and ports[] outside [cons,
 * prod); the program alone advances cons, with a compare-and-swap, having read the port
 * first. Network order for addresses and ports. */
#define SNAT_STASH_SLOT_FIELDS(F, A)                                                         \
	F(__u32, prod)        /* free-running: ports ever pushed (only userspace changes it) */ \
	F(__u32, cons)        /* free-running: ports ever popped (the program's CAS) */     \
	F(__u32, public)      /* public address of the flows opened from here */            \
	F(__u32, out_ifindex) /* egress of the outbound entry (flow_val.ifindex) */         \
	F(__u32, in_ifindex)  /* egress of the inbound entry */                             \
	F(__u32, counter_out) /* COUNTERS index of the outbound entry */                    \
	F(__u32, counter_in)  /* COUNTERS index of the inbound entry */                     \
	F(__u32, pad)         /* zero */                                                    \
	A(__u16, ports, STASH_PORTS) /* the ring, network order */

/* The struct of each list; abi_check.c walks this one too: T(struct name, fields macro).
 * A fields macro takes F(type, name) for a field and A(type, name, count) for an array. */
#define SNAT_STRUCTS(T)                          \
	T(flow_key, SNAT_FLOW_KEY_FIELDS)        \
	T(flow_val, SNAT_FLOW_VAL_FIELDS)        \
	T(tcp_event, SNAT_TCP_EVENT_FIELDS)      \
	T(steer_val, SNAT_STEER_VAL_FIELDS)      \
	T(steer_block_key, SNAT_STEER_BLOCK_KEY_FIELDS) \
	T(stash_key, SNAT_STASH_KEY_FIELDS)      \
	T(stash_slot, SNAT_STASH_SLOT_FIELDS)

/* ---- Declarations made from the lists. ---- */

#define SNAT_ABI_CONST_(name, value) name = (value),
enum { SNAT_CONSTANTS(SNAT_ABI_CONST_) };
#undef SNAT_ABI_CONST_

#define SNAT_ABI_SLOT_(name) name,
enum snat_config_slot { SNAT_CONFIG_SLOTS(SNAT_ABI_SLOT_) CFG_COUNT };
#undef SNAT_ABI_SLOT_

#define SNAT_ABI_STAT_(id, name) id,
enum snat_stat { SNAT_STATS(SNAT_ABI_STAT_) ST_COUNT };
#undef SNAT_ABI_STAT_

#define SNAT_ABI_FIELD_(type, name) type name;
#define SNAT_ABI_ARRAY_(type, name, count) type name[count];
#define SNAT_ABI_STRUCT_(name, fields) struct name { fields(SNAT_ABI_FIELD_, SNAT_ABI_ARRAY_) };
SNAT_STRUCTS(SNAT_ABI_STRUCT_)
#undef SNAT_ABI_STRUCT_
#undef SNAT_ABI_ARRAY_
#undef SNAT_ABI_FIELD_

/* No implicit padding anywhere: the size is the sum of the declared fields. */
#define SNAT_ABI_SIZE_(type, name) +sizeof(type)
#define SNAT_ABI_ASIZE_(type, name, count) +sizeof(type) * (count)
#define SNAT_ABI_NO_PADDING_(name, fields) \
	_Static_assert(sizeof(struct name) == 0 fields(SNAT_ABI_SIZE_, SNAT_ABI_ASIZE_), \
		       "struct " #name " has implicit padding: add explicit pad fields");
SNAT_STRUCTS(SNAT_ABI_NO_PADDING_)
#undef SNAT_ABI_NO_PADDING_
#undef SNAT_ABI_ASIZE_
#undef SNAT_ABI_SIZE_

/* The loader maps STASH and indexes it by round_up(sizeof(struct stash_slot), 8), the kernel's
 * element stride of an array map; keep the slot a multiple of 8 so the two agree trivially. */
_Static_assert(sizeof(struct stash_slot) % 8 == 0, "stash_slot size: a multiple of 8");
/* The ring's index arithmetic (i % STASH_PORTS on free-running u32 counters) needs a power of
 * two. */
_Static_assert((STASH_PORTS & (STASH_PORTS - 1)) == 0, "STASH_PORTS: a power of two");

/* The program picks the floor egress as CFG_FLOOR_EGRESS_OUT + dir. */
_Static_assert(CFG_FLOOR_EGRESS_OUT + DIR_IN == CFG_FLOOR_EGRESS_IN, "floor egress slots by dir");

#endif /* SNAT_ABI_H */
