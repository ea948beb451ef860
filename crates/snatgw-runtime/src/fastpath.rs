//! `snatgw run --fast-path`: the kernel fast path joined to the engine (issue #9).
//!
//! What it does: sets up `snatgw-io`'s tc program on the interfaces the operator names
//! (`--private-if`, `--public-if`: where the instances' and the internet's packets arrive,
//! SPEC R9.1), and gives the engine a [`TcOffload`] (`snatgw_core::Offload`): every flow the
//! engine opens is installed as two map entries (outbound by private 5-tuple, inbound by
//! public 5-tuple), every flow it ends is removed before the call that ended it returns, so
//! the kernel never translates with a released port (R2.2). Before the engine removes a flow
//! as idle it asks the map when the flow's last packet went through the kernel, so keepalives
//! that never leave the fast path keep it alive to the second (R3.4, R3.5). FIN, RST and SYN
//! always go up to the engine, so R3.1–R3.3 stay its own. Packet counts the kernel made are
//! credited per instance and protocol every second ([`FastPath::harvest`], R6.1).
//!
//! Modes: `off` (TUN only), `tc` (fast path or fail to start), `auto` (fast path when
//! possible, else the TUN path with one warning saying why). Flows that do not fit the map
//! (`--fast-path-flows`) or whose instance slot has no counters stay on the TUN path, counted.
//!
//! What it does not do: ILPIP traffic (stateless, R1.1) and ICMP stay on the TUN path; the
//! first packets of a UDP flow go up while its entry is written, so the first datagram can be
//! overtaken by the second (UDP permits reordering; TCP's first packets carry SYN and go up).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use snatgw_core::{proto, Engine, FlowKey, Offload, Time};

use snatgw_io::fastpath::{
    counter_index, BpfFlowKey, BpfFlowVal, FastPathConfig, FastPathCounters, FlowMap, TcFastPath,
    DIR_IN, DIR_OUT, STAT_NAMES,
};

/// `--fast-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FastPathMode {
    /// The fast path when the kernel, the build and the options allow it, else the TUN path.
    Auto,
    /// The fast path, or refuse to start.
    Tc,
    /// The TUN path only.
    Off,
}

impl FastPathMode {
    /// The spellings `--fast-path` takes.
    pub const NAMES: [&'static str; 3] = ["auto", "tc", "off"];

    /// Its spelling.
    pub fn name(self) -> &'static str {
        match self {
            FastPathMode::Auto => "auto",
            FastPathMode::Tc => "tc",
            FastPathMode::Off => "off",
        }
    }
}

impl std::str::FromStr for FastPathMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(FastPathMode::Auto),
            "tc" => Ok(FastPathMode::Tc),
            "off" => Ok(FastPathMode::Off),
            _ => Err(format!("`{s}`: expected one of auto, tc, off")),
        }
    }
}

impl std::fmt::Display for FastPathMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why `--fast-path tc` cannot run (with `auto` the same reasons are logged and the TUN
/// path is used instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The interfaces to attach to were not named.
    #[error("--fast-path tc: --private-if and --public-if name the interfaces the fast path attaches to")]
    NoInterfaces,
    /// The program could not be built, loaded or attached.
    #[error("--fast-path tc: {0}")]
    Load(#[from] snatgw_io::fastpath::FastPathError),
}

/// Instance slots with fast-path counters; flows of instances in higher slots stay on the
/// TUN path (counted as `skipped`).
pub const COUNTER_SLOTS: u32 = 16_384;

/// What the offload counts (shared with the stats snapshot).
#[derive(Default)]
pub struct OffloadCounters {
    installed: AtomicU64,
    removed: AtomicU64,
    install_failed: AtomicU64,
    skipped: AtomicU64,
}

/// The engine's view of the kernel's flow map.
pub struct TcOffload {
    map: FlowMap,
    private_ifindex: u32,
    public_ifindex: u32,
    /// `CLOCK_MONOTONIC` nanoseconds at engine time 0.
    start_ns: u64,
    counter_slots: u32,
    counters: Arc<OffloadCounters>,
}

/// The two keys of a flow, as the program reads them off the wire: outbound (private
/// 5-tuple), inbound (the remote's packet to the public address and SNAT port).
fn keys(k: &FlowKey) -> [BpfFlowKey; 2] {
    [
        BpfFlowKey {
            src: k.src.to_be(),
            dst: k.dst.to_be(),
            sport: k.sport.to_be(),
            dport: k.dport.to_be(),
            proto: k.proto,
            dir: DIR_OUT,
            pad: 0,
        },
        BpfFlowKey {
            src: k.dst.to_be(),
            dst: k.public.to_be(),
            sport: k.dport.to_be(),
            dport: k.pport.to_be(),
            proto: k.proto,
            dir: DIR_IN,
            pad: 0,
        },
    ]
}

/// The two entries of a flow: (outbound key, value), (inbound key, value).
fn entries(
    slot: u32,
    k: &FlowKey,
    public_if: u32,
    private_if: u32,
) -> [(BpfFlowKey, BpfFlowVal); 2] {
    let udp = k.proto == proto::UDP;
    let [out, inb] = keys(k);
    [
        (
            out,
            BpfFlowVal {
                addr: k.public.to_be(),
                port: k.pport.to_be(),
                ifindex: public_if,
                counter: counter_index(slot, udp, DIR_OUT),
                ..Default::default()
            },
        ),
        (
            inb,
            BpfFlowVal {
                addr: k.src.to_be(),
                port: k.sport.to_be(),
                ifindex: private_if,
                counter: counter_index(slot, udp, DIR_IN),
                ..Default::default()
            },
        ),
    ]
}

impl Offload for TcOffload {
    fn install(&mut self, slot: u32, key: &FlowKey) {
        if slot >= self.counter_slots {
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let [(ko, vo), (ki, vi)] = entries(slot, key, self.public_ifindex, self.private_ifindex);
        if self.map.insert(&ko, &vo).is_err() {
            self.counters.install_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.map.insert(&ki, &vi).is_err() {
            let _ = self.map.remove(&ko);
            self.counters.install_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.counters.installed.fetch_add(1, Ordering::Relaxed);
    }

    fn remove(&mut self, key: &FlowKey) {
        let [ko, ki] = keys(key);
        // Both, whatever happened at install: a missing entry is not an error.
        let a = self.map.remove(&ko);
        let b = self.map.remove(&ki);
        if a.is_err() || b.is_err() {
            tracing::error!(?key, "fast path: removing a flow's entries failed");
        }
        self.counters.removed.fetch_add(1, Ordering::Relaxed);
    }

    fn last_seen(&mut self, key: &FlowKey) -> Option<Time> {
        let ns = keys(key)
            .iter()
            .filter_map(|k| self.map.get(k))
            .map(|v| v.last_seen)
            .max()?;
        if ns == 0 || ns < self.start_ns {
            return None;
        }
        Some(u32::try_from((ns - self.start_ns) / 1_000_000_000).unwrap_or(u32::MAX))
    }
}

/// The running fast path: keeps the programs attached and reads their counters.
pub struct FastPath {
    _fp: TcFastPath,
    counters: FastPathCounters,
    offload: Arc<OffloadCounters>,
    /// Per-instance counter sums already credited to the engine.
    credited: Vec<u64>,
    floor: bool,
    private_if: String,
    public_if: String,
}

/// The fast path's part of the stats snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FastPathSnap {
    /// `tc`, or `floor` (redirect without NAT, benchmarks only).
    pub mode: String,
    /// Interface the program translating outbound packets is attached to.
    pub private_if: String,
    /// Interface the program translating inbound packets is attached to.
    pub public_if: String,
    /// Flows installed in the map.
    pub installed: u64,
    /// Flows removed from the map.
    pub removed: u64,
    /// Flows the map had no room for (they stay on the TUN path).
    pub install_failed: u64,
    /// Flows of instance slots without counters (they stay on the TUN path).
    pub skipped: u64,
    /// The program's counters: translated_out, translated_in, and why packets went up.
    pub packets: std::collections::BTreeMap<String, u64>,
}

impl FastPath {
    /// Sets the fast path up per `mode` and, when it runs, gives `engine` its offload.
    /// `start_ns` is the `CLOCK_MONOTONIC` time of engine time 0. Returns `None` for the TUN
    /// path (mode `off`, or `auto` when it cannot run, logged); `Err` only in mode `tc`.
    pub fn setup(
        mode: FastPathMode,
        private_if: Option<&str>,
        public_if: Option<&str>,
        max_flows: u32,
        floor: bool,
        start_ns: u64,
        engine: &mut Engine,
    ) -> Result<Option<FastPath>, SetupError> {
        if mode == FastPathMode::Off {
            tracing::info!("fast path off (--fast-path off): every packet goes through the TUN");
            return Ok(None);
        }
        let (Some(private_if), Some(public_if)) = (private_if, public_if) else {
            let why = "--private-if and --public-if name the interfaces the fast path attaches to";
            if mode == FastPathMode::Tc {
                return Err(SetupError::NoInterfaces);
            }
            tracing::warn!("fast path not used, every packet goes through the TUN: {why}");
            return Ok(None);
        };
        let cfg = FastPathConfig {
            private_if: private_if.into(),
            public_if: public_if.into(),
            max_flows,
            counter_slots: COUNTER_SLOTS,
            floor,
        };
        let (fp, map, counters) = match TcFastPath::load(&cfg) {
            Ok(x) => x,
            Err(e) if mode == FastPathMode::Tc => return Err(SetupError::Load(e)),
            Err(e) => {
                tracing::warn!(error = %e, "fast path unavailable, falling back to the TUN path for every packet");
                return Ok(None);
            }
        };
        let offload = Arc::new(OffloadCounters::default());
        if !floor {
            engine.set_offload(Some(Box::new(TcOffload {
                map,
                private_ifindex: fp.private_ifindex,
                public_ifindex: fp.public_ifindex,
                start_ns,
                counter_slots: COUNTER_SLOTS,
                counters: offload.clone(),
            })));
        }
        tracing::info!(
            private_if,
            public_if,
            max_flows,
            floor,
            "fast path attached at tc ingress: established flows are translated in the kernel"
        );
        Ok(Some(FastPath {
            _fp: fp,
            counters,
            offload,
            credited: Vec::new(),
            floor,
            private_if: private_if.into(),
            public_if: public_if.into(),
        }))
    }

    /// The packets the kernel translated since the last call, per instance slot and protocol,
    /// for the first `slots` slots: `(slot, protocol, out, in)`, to credit to the engine
    /// (`Engine::credit_packets`, R6.1). Reads the kernel's counters (four per slot), so the
    /// caller does it without holding the gateway lock.
    pub fn harvest(&mut self, slots: u32) -> Vec<(u32, u8, u64, u64)> {
        let now = self.counters.instance_counters(slots);
        if self.credited.len() < now.len() {
            self.credited.resize(now.len(), 0);
        }
        let mut out = Vec::new();
        for slot in 0..(now.len() / 4) as u32 {
            for (p, udp) in [(proto::TCP, false), (proto::UDP, true)] {
                let (o, i) = (
                    counter_index(slot, udp, DIR_OUT) as usize,
                    counter_index(slot, udp, DIR_IN) as usize,
                );
                let dout = now[o].saturating_sub(self.credited[o]);
                let din = now[i].saturating_sub(self.credited[i]);
                if dout + din > 0 {
                    out.push((slot, p, dout, din));
                }
                self.credited[o] = now[o];
                self.credited[i] = now[i];
            }
        }
        out
    }

    /// The stats snapshot's part.
    pub fn snap(&self) -> FastPathSnap {
        let o = &self.offload;
        FastPathSnap {
            mode: if self.floor { "floor" } else { "tc" }.into(),
            private_if: self.private_if.clone(),
            public_if: self.public_if.clone(),
            installed: o.installed.load(Ordering::Relaxed),
            removed: o.removed.load(Ordering::Relaxed),
            install_failed: o.install_failed.load(Ordering::Relaxed),
            skipped: o.skipped.load(Ordering::Relaxed),
            packets: STAT_NAMES
                .iter()
                .zip(self.counters.stats())
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_the_wire_view_of_both_directions() {
        // 10.0.3.20:5000 -> 198.51.100.7:53 leaves as 192.0.2.100:1024 (UDP).
        let k = FlowKey {
            proto: proto::UDP,
            src: u32::from(std::net::Ipv4Addr::new(10, 0, 3, 20)),
            sport: 5000,
            dst: u32::from(std::net::Ipv4Addr::new(198, 51, 100, 7)),
            dport: 53,
            public: u32::from(std::net::Ipv4Addr::new(192, 0, 2, 100)),
            pport: 1024,
        };
        let [(ko, vo), (ki, vi)] = entries(3, &k, 7, 9);
        // Keys hold the bytes as they are on the wire.
        assert_eq!(ko.src.to_ne_bytes(), [10, 0, 3, 20]);
        assert_eq!(ko.dst.to_ne_bytes(), [198, 51, 100, 7]);
        assert_eq!(ko.sport.to_ne_bytes(), 5000u16.to_be_bytes());
        assert_eq!((ko.proto, ko.dir), (17, DIR_OUT));
        assert_eq!(vo.addr.to_ne_bytes(), [192, 0, 2, 100]);
        assert_eq!(vo.port.to_ne_bytes(), 1024u16.to_be_bytes());
        assert_eq!((vo.ifindex, vo.counter), (7, 3 * 4 + 2));
        // The reply: remote -> public:pport, rewritten to the private endpoint.
        assert_eq!(ki.src.to_ne_bytes(), [198, 51, 100, 7]);
        assert_eq!(ki.dst.to_ne_bytes(), [192, 0, 2, 100]);
        assert_eq!(ki.sport.to_ne_bytes(), 53u16.to_be_bytes());
        assert_eq!(ki.dport.to_ne_bytes(), 1024u16.to_be_bytes());
        assert_eq!(ki.dir, DIR_IN);
        assert_eq!(vi.addr.to_ne_bytes(), [10, 0, 3, 20]);
        assert_eq!(vi.port.to_ne_bytes(), 5000u16.to_be_bytes());
        assert_eq!((vi.ifindex, vi.counter), (9, 3 * 4 + 3));
    }
}
