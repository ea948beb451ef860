//! [`LabSpec`]: what the lab looks like, and its validation.
//!
//! What it does: describes the namespaces (instances, gateway, internet), the gateway mode
//! (userspace snatgw behind a TUN, or the kernel's own NAT as a baseline), the server
//! addresses and the public addresses the gateway translates to; checks that every address
//! lies in the lab's reserved ranges and that names fit Linux limits.
//!
//! What it does not do: touch the system (see [`Lab`](crate::Lab)).
//!
//! Address plan (documentation ranges only, never routed outside the lab namespaces):
//! - private side: `10.0.0.0/16`, gateway `10.0.0.1` on `br-priv`;
//! - gateway ↔ internet link: `198.51.100.0/24` (`.1` gateway, `.2` internet);
//! - public: `203.0.113.0/24` and `192.0.2.0/24`, split into *server* addresses (on `lo`
//!   of the internet namespace, e.g. [`DEFAULT_SERVERS`]) and *gateway public IPs* (the
//!   addresses snatgw translates to, routed by the internet namespace to the gateway, e.g.
//!   [`DEFAULT_PUBLIC_IPS`]). The two sets must be disjoint. Convention: gateway public IPs
//!   in `203.0.113.1–99` and `192.0.2.1–49`, servers above.

use std::net::Ipv4Addr;

use crate::LabError;

/// The private network (instances and the gateway's bridge).
pub const PRIVATE_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 0, 0, 0), 16);
/// The gateway's address on `br-priv`, the instances' default route.
pub const GW_PRIVATE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The gateway's address on the link to the internet namespace.
pub const GW_INET_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The internet namespace's address on that link (the gateway's default route).
pub const INET_GW_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Public ranges routed by the internet namespace towards the gateway.
pub const PUBLIC_NETS: [(Ipv4Addr, u8); 2] = [
    (Ipv4Addr::new(203, 0, 113, 0), 24),
    (Ipv4Addr::new(192, 0, 2, 0), 24),
];
/// Default server addresses (on `lo` in the internet namespace).
pub const DEFAULT_SERVERS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(203, 0, 113, 100),
    Ipv4Addr::new(203, 0, 113, 101),
    Ipv4Addr::new(192, 0, 2, 53),
];
/// Default public IPs for the gateway to translate to.
pub const DEFAULT_PUBLIC_IPS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(203, 0, 113, 10),
    Ipv4Addr::new(203, 0, 113, 11),
    Ipv4Addr::new(203, 0, 113, 12),
    Ipv4Addr::new(192, 0, 2, 10),
];
/// Name of the bridge in the gateway namespace.
pub const BRIDGE: &str = "br-priv";
/// Name of the gateway's veth towards the internet namespace.
pub const GW_INET_IF: &str = "gw-inet";
/// Name of the internet namespace's veth towards the gateway.
pub const INET_GW_IF: &str = "inet-gw";
/// Name of an instance's interface inside its own namespace.
pub const INSTANCE_IF: &str = "eth0";
/// Routing table that sends traffic from the private side (`br-priv`) to the private TUN in
/// [`GatewayMode::Snatgw`].
pub const TUN_TABLE_PRIVATE: u32 = 100;
/// Routing table that sends traffic from the internet side (`gw-inet`) to the public TUN.
pub const TUN_TABLE_PUBLIC: u32 = 101;
/// Default name of the gateway's private-side TUN (packets read from it are outbound, R9.1).
pub const TUN_PRIVATE: &str = "snat-priv";
/// Default name of the gateway's public-side TUN (packets read from it are inbound, R9.1).
pub const TUN_PUBLIC: &str = "snat-pub";
/// Longest accepted namespace prefix.
pub const MAX_PREFIX_LEN: usize = 16;
/// Longest accepted instance name (its gateway-side veth is `v-<name>`, ≤ 15 bytes).
pub const MAX_INSTANCE_NAME_LEN: usize = 13;

/// One private instance: a namespace with one interface on the private network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Short name (`[a-z0-9]`, `-` inside; at most [`MAX_INSTANCE_NAME_LEN`] bytes); the
    /// namespace is `<prefix>i-<name>`.
    pub name: String,
    /// Private address in `10.0.0.0/16` (not `10.0.0.0`, `10.0.0.1` or `10.0.255.255`).
    pub ip: Ipv4Addr,
}

/// A kernel SNAT rule: traffic from `private` leaving towards the internet gets source `public`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnatRule {
    /// Private source address (an instance's IP).
    pub private: Ipv4Addr,
    /// Public address to translate to.
    pub public: Ipv4Addr,
    /// Source port range to translate to (`None`: the kernel's default, which keeps the
    /// original port when free).
    pub ports: Option<(u16, u16)>,
}

/// The kernel's NAT configuration in [`GatewayMode::Kernel`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelNat {
    /// One `snat` rule per instance, as the snatgw configuration would assign.
    Snat(Vec<SnatRule>),
    /// `masquerade` of all of `10.0.0.0/16` to the gateway's link address `198.51.100.1`.
    Masquerade,
}

/// Which NAT the gateway namespace runs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GatewayMode {
    /// The userspace gateway creates two TUNs inside the gateway namespace, one per side
    /// (SPEC R9.1: direction by interface); policy routing sends the private TUN everything
    /// from `br-priv` not for `10.0.0.0/16` (table 100) and the public TUN everything from
    /// `gw-inet` (table 101). Call [`Lab::configure_tun`](crate::Lab::configure_tun) once they exist.
    Snatgw {
        /// Private-side TUN name (e.g. `snat-priv`).
        tun_private: String,
        /// Public-side TUN name (e.g. `snat-pub`).
        tun_public: String,
    },
    /// The kernel's own NAT (nftables), for side-by-side comparison.
    Kernel(KernelNat),
}

impl GatewayMode {
    /// [`GatewayMode::Snatgw`] with the default TUN names [`TUN_PRIVATE`] and [`TUN_PUBLIC`].
    pub fn snatgw() -> Self {
        GatewayMode::Snatgw {
            tun_private: TUN_PRIVATE.into(),
            tun_public: TUN_PUBLIC.into(),
        }
    }
}

/// Description of a lab; build it with [`LabSpec::new`] and the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSpec {
    /// Namespace name prefix, unique per lab (e.g. `sg1-`): `[a-z0-9]+-`, at most 16 bytes
    /// (see [`valid_prefix`]).
    pub prefix: String,
    /// Private instances.
    pub instances: Vec<InstanceSpec>,
    /// Gateway mode.
    pub mode: GatewayMode,
    /// Server addresses on `lo` of the internet namespace.
    pub servers: Vec<Ipv4Addr>,
    /// Public IPs the gateway translates to (in [`GatewayMode::Kernel`] each gets a blackhole
    /// route in the gateway namespace, so unsolicited traffic to it is dropped).
    pub public_ips: Vec<Ipv4Addr>,
    /// Leave veth offloads (tx checksum, TSO, GSO, GRO) on; default off, because veth
    /// checksum offload hands partially checksummed packets to whoever reads them raw.
    pub offloads: bool,
}

impl LabSpec {
    /// A lab with no instances, snatgw mode with TUN `snat0`, the default servers and public
    /// IPs, offloads off.
    pub fn new(prefix: impl Into<String>) -> Self {
        LabSpec {
            prefix: prefix.into(),
            instances: Vec::new(),
            mode: GatewayMode::snatgw(),
            servers: DEFAULT_SERVERS.to_vec(),
            public_ips: DEFAULT_PUBLIC_IPS.to_vec(),
            offloads: false,
        }
    }

    /// Adds an instance.
    pub fn with_instance(mut self, name: impl Into<String>, ip: Ipv4Addr) -> Self {
        self.instances.push(InstanceSpec {
            name: name.into(),
            ip,
        });
        self
    }

    /// Sets the gateway mode.
    pub fn with_mode(mut self, mode: GatewayMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the veth offload knob.
    pub fn with_offloads(mut self, on: bool) -> Self {
        self.offloads = on;
        self
    }

    /// Namespace of the gateway: `<prefix>gw`.
    pub fn gw_ns(&self) -> String {
        format!("{}gw", self.prefix)
    }

    /// Namespace of the internet: `<prefix>inet`.
    pub fn inet_ns(&self) -> String {
        format!("{}inet", self.prefix)
    }

    /// Namespace of instance `name`: `<prefix>i-<name>`.
    pub fn instance_ns(&self, name: &str) -> String {
        format!("{}i-{}", self.prefix, name)
    }

    /// Every namespace of the lab.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.gw_ns(), self.inet_ns()];
        v.extend(self.instances.iter().map(|i| self.instance_ns(&i.name)));
        v
    }

    /// Checks names and addresses (see the module docs).
    pub fn validate(&self) -> Result<(), LabError> {
        let bad = |m: String| Err(LabError::InvalidSpec(m));
        if !valid_prefix(&self.prefix) {
            return bad(format!(
                "prefix {:?}: use [a-z0-9]+ followed by one '-', at most {MAX_PREFIX_LEN} bytes",
                self.prefix
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut ips = std::collections::HashSet::new();
        for i in &self.instances {
            if !valid_name(&i.name, MAX_INSTANCE_NAME_LEN) || i.name.ends_with('-') {
                return bad(format!(
                    "instance name {:?}: use 1..={MAX_INSTANCE_NAME_LEN} of [a-z0-9-]",
                    i.name
                ));
            }
            if !names.insert(i.name.as_str()) {
                return bad(format!("duplicate instance name {:?}", i.name));
            }
            if !in_net(i.ip, PRIVATE_NET)
                || i.ip == GW_PRIVATE_IP
                || i.ip == PRIVATE_NET.0
                || i.ip == Ipv4Addr::new(10, 0, 255, 255)
            {
                return bad(format!(
                    "instance {} ip {} must be a host address in 10.0.0.0/16 other than 10.0.0.1",
                    i.name, i.ip
                ));
            }
            if !ips.insert(i.ip) {
                return bad(format!("duplicate instance ip {}", i.ip));
            }
        }
        for s in &self.servers {
            if !is_public(*s) {
                return bad(format!(
                    "server {s} must be in 203.0.113.0/24 or 192.0.2.0/24"
                ));
            }
        }
        let mut publics = self.public_ips.clone();
        if let GatewayMode::Kernel(KernelNat::Snat(rules)) = &self.mode {
            for r in rules {
                if !self.instances.iter().any(|i| i.ip == r.private) {
                    return bad(format!("snat rule for {} matches no instance", r.private));
                }
                if let Some((lo, hi)) = r.ports {
                    if lo == 0 || lo > hi {
                        return bad(format!("snat rule for {}: bad port range", r.private));
                    }
                }
                publics.push(r.public);
            }
        }
        if let GatewayMode::Snatgw {
            tun_private,
            tun_public,
        } = &self.mode
        {
            for tun in [tun_private, tun_public] {
                if tun.is_empty()
                    || tun.len() > 15
                    || !tun
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return bad(format!("tun name {tun:?}: 1..=15 of [A-Za-z0-9_-]"));
                }
            }
            if tun_private == tun_public {
                return bad(format!(
                    "the two TUNs need different names, both are {tun_private:?}"
                ));
            }
        }
        for p in &publics {
            if !is_public(*p) {
                return bad(format!(
                    "gateway public ip {p} must be in 203.0.113.0/24 or 192.0.2.0/24"
                ));
            }
            if self.servers.contains(p) {
                return bad(format!("{p} is both a server and a gateway public ip"));
            }
        }
        Ok(())
    }
}

/// Whether `prefix` is a valid lab prefix: `[a-z0-9]+-`, at most [`MAX_PREFIX_LEN`] bytes.
///
/// With a single `-`, at the end, no prefix is the beginning of another lab's namespace
/// names (`a-` cannot match `a-b-gw`, since `a-b-` is not a valid prefix).
pub fn valid_prefix(prefix: &str) -> bool {
    prefix.len() >= 2
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix.ends_with('-')
        && prefix[..prefix.len() - 1]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Whether namespace `ns` belongs to the lab with prefix `prefix` (its text up to and
/// including the first `-` is the prefix).
pub fn ns_has_prefix(ns: &str, prefix: &str) -> bool {
    ns.split_once('-')
        .is_some_and(|(head, _)| head.len() + 1 == prefix.len() && ns.starts_with(prefix))
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// Whether `ip` is inside `net`.
pub fn in_net(ip: Ipv4Addr, net: (Ipv4Addr, u8)) -> bool {
    let mask = if net.1 == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(net.1))
    };
    u32::from(ip) & mask == u32::from(net.0) & mask
}

/// Whether `ip` is in one of the lab's public ranges ([`PUBLIC_NETS`]).
pub fn is_public(ip: Ipv4Addr) -> bool {
    PUBLIC_NETS.iter().any(|n| in_net(ip, *n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_spec() -> LabSpec {
        LabSpec::new("t1-")
            .with_instance("a", Ipv4Addr::new(10, 0, 0, 2))
            .with_instance("b", Ipv4Addr::new(10, 0, 1, 2))
    }

    #[test]
    fn valid_and_names() {
        let s = ok_spec();
        s.validate().unwrap();
        assert_eq!(s.gw_ns(), "t1-gw");
        assert_eq!(s.inet_ns(), "t1-inet");
        assert_eq!(s.instance_ns("a"), "t1-i-a");
        assert_eq!(s.namespaces().len(), 4);
    }

    #[test]
    fn rejects_bad_specs() {
        let bad = |s: LabSpec| assert!(s.validate().is_err(), "{s:?}");
        bad(LabSpec::new(""));
        bad(LabSpec::new("Upper-"));
        bad(LabSpec::new("a/b"));
        bad(LabSpec::new("ab"));
        bad(LabSpec::new("a-b-"));
        bad(LabSpec::new("-"));
        bad(LabSpec::new("x-").with_instance("a", Ipv4Addr::new(10, 1, 0, 2)));
        bad(LabSpec::new("x-").with_instance("a", GW_PRIVATE_IP));
        bad(LabSpec::new("x-").with_instance("this-is-too-long", Ipv4Addr::new(10, 0, 0, 2)));
        bad(ok_spec().with_instance("a", Ipv4Addr::new(10, 0, 0, 9)));
        bad(ok_spec().with_instance("c", Ipv4Addr::new(10, 0, 0, 2)));
        let mut s = ok_spec();
        s.servers.push(Ipv4Addr::new(8, 8, 8, 8));
        bad(s);
        let mut s = ok_spec();
        s.public_ips.push(DEFAULT_SERVERS[0]);
        bad(s);
        bad(
            ok_spec().with_mode(GatewayMode::Kernel(KernelNat::Snat(vec![SnatRule {
                private: Ipv4Addr::new(10, 0, 0, 2),
                public: Ipv4Addr::new(198, 51, 100, 7),
                ports: None,
            }]))),
        );
        bad(
            ok_spec().with_mode(GatewayMode::Kernel(KernelNat::Snat(vec![SnatRule {
                private: Ipv4Addr::new(10, 0, 0, 77),
                public: DEFAULT_PUBLIC_IPS[0],
                ports: None,
            }]))),
        );
        bad(ok_spec().with_mode(GatewayMode::Snatgw {
            tun_private: "a-very-long-tun-name".into(),
            tun_public: "snat-pub".into(),
        }));
        bad(ok_spec().with_mode(GatewayMode::Snatgw {
            tun_private: "snat-x".into(),
            tun_public: "snat-x".into(),
        }));
    }

    #[test]
    fn prefixes() {
        assert!(valid_prefix("sg1-"));
        assert!(!valid_prefix("sg1"));
        assert!(!valid_prefix("sg-1-"));
        assert!(ns_has_prefix("sg1-gw", "sg1-"));
        assert!(ns_has_prefix("sg1-i-web-0", "sg1-"));
        assert!(!ns_has_prefix("sg10-gw", "sg1-"));
        assert!(!ns_has_prefix("sg1", "sg1-"));
        assert!(!ns_has_prefix("xsg1-gw", "sg1-"));
    }

    #[test]
    fn nets() {
        assert!(in_net(Ipv4Addr::new(10, 0, 200, 1), PRIVATE_NET));
        assert!(!in_net(Ipv4Addr::new(10, 1, 0, 1), PRIVATE_NET));
        assert!(is_public(Ipv4Addr::new(192, 0, 2, 1)));
        assert!(!is_public(Ipv4Addr::new(198, 51, 100, 1)));
    }
}
