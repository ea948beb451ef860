//! Rule tests of SPEC §4 (network security groups), §5 (inbound load balancing, health
//! probes) and R3.7 (inbound idle timeout); the rule id is in each test's name. Expected
//! values come from the SPEC: priorities 100–4096 and lower wins (R4.1), the default rules
//! and their priorities (R4.2), the 4-minute default and the 4–30 minute range (R3.7).

mod common;

use common::*;
use snatgw_core::config::{NsgAccess, NsgDirection};
use snatgw_core::policy::PROBE_SOURCE;
use snatgw_core::{ConfigError, DropReason, Engine, Packet, Topology, Verdict};

const CLIENT: &str = "198.51.100.50";
const SERVER: &str = "198.51.100.7";

/// An ILPIP VM, two LB members behind frontend 203.0.113.20:80 → :8080 with an HTTP probe,
/// and a PAT VM on default SNAT. `extra` is appended (NSGs).
fn config(extra: &str) -> String {
    format!(
        r#"
[gateway]
seed = 7
vnet_prefixes = ["10.0.0.0/16"]
default_snat_pool = ["192.0.2.100"]

[[public_ip]]
name = "pip-ilpip"
address = "203.0.113.10"
[[public_ip]]
name = "pip-fe"
address = "203.0.113.20"

[[instance]]
name = "vm-ilpip"
private_ip = "10.0.1.10"
public_ip = "pip-ilpip"
[[instance]]
name = "web1"
private_ip = "10.0.2.10"
[[instance]]
name = "web2"
private_ip = "10.0.2.11"
[[instance]]
name = "vm-pat"
private_ip = "10.0.3.10"

[[load_balancer]]
name = "lb"
frontends = [ {{ name = "fe", public_ip = "pip-fe" }} ]
backend_pools = [ {{ name = "web", members = ["web1", "web2"] }} ]
probes = [ {{ name = "hp", protocol = "http", port = 8080, path = "/health", interval_secs = 5, unhealthy_threshold = 2 }} ]
rules = [ {{ name = "http", frontend = "fe", protocol = "tcp", frontend_port = 80, backend_pool = "web", backend_port = 8080, probe = "hp" }} ]
{extra}
"#
    )
}

fn eng(extra: &str) -> Engine {
    engine(&config(extra))
}

fn err(extra: &str) -> ConfigError {
    Topology::from_toml(&config(extra)).expect_err("config must be refused")
}

fn hits(e: &Engine, nsg: &str, rule: &str) -> u64 {
    e.nsg_hits()
        .into_iter()
        .find(|h| h.nsg == nsg && h.rule == rule)
        .unwrap_or_else(|| panic!("no rule {nsg}/{rule}"))
        .hits
}

fn nsg_drops(e: &Engine, inst: &str) -> u64 {
    let r = e.instance(inst).expect("instance");
    r.stats
        .iter()
        .map(|s| s.drops[DropReason::NsgDenied as usize])
        .sum()
}

const FE: &str = "203.0.113.20";

// ---------------------------------------------------------------- R4.1

#[test]
fn r4_1_lowest_priority_matching_rule_decides() {
    let mut e = eng(r#"
[[nsg]]
name = "n"
nics = ["vm-pat"]
[[nsg.rules]]
name = "deny-net"
priority = 100
direction = "outbound"
access = "deny"
protocol = "any"
destinations = ["198.51.100.0/24"]
[[nsg.rules]]
name = "allow-443"
priority = 200
direction = "outbound"
access = "allow"
protocol = "tcp"
destinations = ["*"]
destination_ports = ["443", "8000-8100"]
[[nsg.rules]]
name = "deny-rest"
priority = 4096
direction = "outbound"
access = "deny"
protocol = "*"
"#);
    let src = ip("10.0.3.10");
    // 198.51.100.7:443 matches both 100 (deny) and 200 (allow): 100 wins.
    assert_eq!(
        out(&mut e, 1, Packet::tcp(src, 4000, ip(SERVER), 443, SYN)),
        Verdict::Drop(DropReason::NsgDenied)
    );
    // Elsewhere port 443 and the range 8000-8100 are allowed, 8101 and UDP 443 are not.
    assert!(matches!(
        out(
            &mut e,
            1,
            Packet::tcp(src, 4000, ip("203.0.113.77"), 443, SYN)
        ),
        Verdict::Translate { .. }
    ));
    assert!(matches!(
        out(
            &mut e,
            1,
            Packet::tcp(src, 4001, ip("203.0.113.77"), 8100, SYN)
        ),
        Verdict::Translate { .. }
    ));
    assert_eq!(
        out(
            &mut e,
            1,
            Packet::tcp(src, 4002, ip("203.0.113.77"), 8101, SYN)
        ),
        Verdict::Drop(DropReason::NsgDenied)
    );
    assert_eq!(
        out(&mut e, 1, Packet::udp(src, 4003, ip("203.0.113.77"), 443)),
        Verdict::Drop(DropReason::NsgDenied)
    );
    assert_eq!(hits(&e, "n", "deny-net"), 1);
    assert_eq!(hits(&e, "n", "allow-443"), 2);
    assert_eq!(hits(&e, "n", "deny-rest"), 2);
    // The default AllowInternetOutBound was never reached: user rules come first.
    assert_eq!(hits(&e, "n", "AllowInternetOutBound"), 0);
    assert_eq!(nsg_drops(&e, "vm-pat"), 3);
    assert_eq!(e.global_stats().drops[DropReason::NsgDenied as usize], 3);
}

#[test]
fn r4_1_inbound_to_an_ilpip_is_governed_by_the_nsg_one_port_only() {
    let mut e = eng(r#"
[[nsg]]
name = "n"
nics = ["vm-ilpip"]
rules = [ { name = "ssh", priority = 100, direction = "inbound", access = "allow", protocol = "tcp", sources = ["Internet"], destination_ports = ["22"] } ]
"#);
    let (pubip, private) = (ip("203.0.113.10"), ip("10.0.1.10"));
    assert_eq!(
        inb(&mut e, 1, Packet::tcp(ip(CLIENT), 5000, pubip, 22, SYN)),
        Verdict::Translate {
            addr: private,
            port: 22
        }
    );
    for port in [21, 23, 80, 443] {
        assert_eq!(
            inb(&mut e, 1, Packet::tcp(ip(CLIENT), 5000, pubip, port, SYN)),
            Verdict::Drop(DropReason::NsgDenied),
            "port {port}"
        );
    }
    assert_eq!(
        inb(&mut e, 1, Packet::udp(ip(CLIENT), 5000, pubip, 22)),
        Verdict::Drop(DropReason::NsgDenied)
    );
    assert_eq!(hits(&e, "n", "ssh"), 1);
    assert_eq!(hits(&e, "n", "DenyAllInBound"), 5);
}

#[test]
fn r4_1_inbound_subnet_then_nic_outbound_nic_then_subnet() {
    let mut e = eng(r#"
[[nsg]]
name = "subnet"
subnets = ["10.0.1.0/24"]
[[nsg.rules]]
name = "in-any"
priority = 100
direction = "inbound"
access = "allow"
protocol = "tcp"
[[nsg.rules]]
name = "out-any"
priority = 100
direction = "outbound"
access = "allow"
protocol = "tcp"
[[nsg]]
name = "nic"
nics = ["vm-ilpip"]
[[nsg.rules]]
name = "in-deny"
priority = 100
direction = "inbound"
access = "deny"
protocol = "tcp"
[[nsg.rules]]
name = "out-deny"
priority = 100
direction = "outbound"
access = "deny"
protocol = "tcp"
"#);
    let (pubip, private) = (ip("203.0.113.10"), ip("10.0.1.10"));
    // Inbound: the subnet's NSG allows, then the NIC's denies.
    assert_eq!(
        inb(&mut e, 1, Packet::tcp(ip(CLIENT), 5000, pubip, 22, SYN)),
        Verdict::Drop(DropReason::NsgDenied)
    );
    assert_eq!(hits(&e, "subnet", "in-any"), 1);
    assert_eq!(hits(&e, "nic", "in-deny"), 1);
    // Outbound: the NIC's NSG denies first, the subnet's is not evaluated.
    assert_eq!(
        out(&mut e, 1, Packet::tcp(private, 5000, ip(SERVER), 80, SYN)),
        Verdict::Drop(DropReason::NsgDenied)
    );
    assert_eq!(hits(&e, "nic", "out-deny"), 1);
    assert_eq!(hits(&e, "subnet", "out-any"), 0);
}

#[test]
fn r4_1_invalid_rules_are_refused_naming_field_and_rule() {
    let rule = |body: &str| {
        format!(
            "[[nsg]]\nname = \"n\"\nnics = [\"web1\"]\n[[nsg.rules]]\nname = \"r\"\ndirection = \"inbound\"\naccess = \"allow\"\nprotocol = \"tcp\"\n{body}\n"
        )
    };
    let e = err(&rule("priority = 4097"));
    let m = e.to_string();
    assert!(
        m.contains("nsg[n].rules[r].priority") && m.contains("4097") && m.contains("R4.1"),
        "{m}"
    );
    let m = err(&rule("priority = 99")).to_string();
    assert!(
        m.contains("nsg[n].rules[r].priority") && m.contains("100-4096"),
        "{m}"
    );
    let m = err(&rule("priority = 100\nsources = [\"Intranet\"]")).to_string();
    assert!(
        m.contains("nsg[n].rules[r].sources[0]") && m.contains("R4.1"),
        "{m}"
    );
    let m = err(&rule("priority = 100\ndestination_ports = [\"90-80\"]")).to_string();
    assert!(m.contains("nsg[n].rules[r].destination_ports[0]"), "{m}");
    let m = err(&rule("priority = 100\nsource_ports = [\"0\"]")).to_string();
    assert!(m.contains("nsg[n].rules[r].source_ports[0]"), "{m}");
    // Same priority and direction twice.
    let m = err(&format!(
        "{}[[nsg.rules]]\nname = \"r2\"\npriority = 100\ndirection = \"inbound\"\naccess = \"deny\"\nprotocol = \"udp\"\n",
        rule("priority = 100")
    ))
    .to_string();
    assert!(
        m.contains("nsg[n].rules[r2].priority") && m.contains("same priority"),
        "{m}"
    );
    // A NIC with two NSGs; an unknown NIC; a subnet outside the VNet; overlapping subnets.
    let m =
        err("[[nsg]]\nname = \"a\"\nnics = [\"web1\"]\n[[nsg]]\nname = \"b\"\nnics = [\"web1\"]\n")
            .to_string();
    assert!(
        m.contains("nsg[b].nics") && m.contains("at most one NSG"),
        "{m}"
    );
    let m = err("[[nsg]]\nname = \"a\"\nnics = [\"nobody\"]\n").to_string();
    assert!(m.contains("nsg[a].nics") && m.contains("nobody"), "{m}");
    let m = err("[[nsg]]\nname = \"a\"\nsubnets = [\"172.16.0.0/24\"]\n").to_string();
    assert!(m.contains("nsg[a].subnets[0]"), "{m}");
    let m = err("[[nsg]]\nname = \"a\"\nsubnets = [\"10.0.0.0/16\"]\n[[nsg]]\nname = \"b\"\nsubnets = [\"10.0.2.0/24\"]\n").to_string();
    assert!(m.contains("nsg[b].subnets[0]"), "{m}");
    // A default rule's name is reserved.
    let m = err("[[nsg]]\nname = \"a\"\nrules = [ { name = \"DenyAllInBound\", priority = 100, direction = \"inbound\", access = \"deny\", protocol = \"tcp\" } ]\n").to_string();
    assert!(
        m.contains("nsg[a].rules[DenyAllInBound].name") && m.contains("R4.2"),
        "{m}"
    );

    // A refused change leaves the running engine as it was.
    let mut e = eng("");
    let before = e.nsg_hits();
    let bad = Topology::from_toml(&config(&rule("priority = 5000")));
    assert!(bad.is_err());
    assert_eq!(e.nsg_hits(), before);
    assert!(matches!(
        out(
            &mut e,
            1,
            Packet::tcp(ip("10.0.2.10"), 4000, ip(SERVER), 80, SYN)
        ),
        Verdict::Translate { .. }
    ));
}

// ---------------------------------------------------------------- R4.2

#[test]
fn r4_2_default_rules_are_always_present() {
    let mut e = eng("[[nsg]]\nname = \"empty\"\nnics = [\"vm-ilpip\"]\n");
    let rules: Vec<(String, u32, NsgDirection, NsgAccess)> = e
        .nsg_hits()
        .into_iter()
        .map(|h| (h.rule, h.priority, h.direction, h.access))
        .collect();
    use NsgAccess::*;
    use NsgDirection::*;
    let expect = [
        ("AllowVnetInBound", 65000, Inbound, Allow),
        ("AllowAzureLoadBalancerInBound", 65001, Inbound, Allow),
        ("DenyAllInBound", 65500, Inbound, Deny),
        ("AllowVnetOutBound", 65000, Outbound, Allow),
        ("AllowInternetOutBound", 65001, Outbound, Allow),
        ("DenyAllOutBound", 65500, Outbound, Deny),
    ];
    assert_eq!(rules.len(), 6);
    for (r, x) in rules.iter().zip(expect) {
        assert_eq!((r.0.as_str(), r.1, r.2, r.3), x);
    }
    let (pubip, private) = (ip("203.0.113.10"), ip("10.0.1.10"));
    // Outbound to the internet: allowed by AllowInternetOutBound.
    assert!(matches!(
        out(&mut e, 1, Packet::tcp(private, 4000, ip(SERVER), 443, SYN)),
        Verdict::Translate { .. }
    ));
    assert_eq!(hits(&e, "empty", "AllowInternetOutBound"), 1);
    // Unsolicited inbound from the internet: DenyAllInBound.
    assert_eq!(
        inb(&mut e, 1, Packet::tcp(ip(CLIENT), 5000, pubip, 80, SYN)),
        Verdict::Drop(DropReason::NsgDenied)
    );
    assert_eq!(hits(&e, "empty", "DenyAllInBound"), 1);
    // A probe from tag AzureLoadBalancer: AllowAzureLoadBalancerInBound.
    assert!(e.probe_permitted(private, 80));
    assert_eq!(hits(&e, "empty", "AllowAzureLoadBalancerInBound"), 1);
    assert_eq!(PROBE_SOURCE, ip("168.63.129.16"));
}

// ---------------------------------------------------------------- R4.3

#[test]
fn r4_3_denied_outbound_uses_no_port() {
    let deny = r#"
[[nsg]]
name = "n"
nics = ["vm-pat"]
rules = [ { name = "no-server", priority = 100, direction = "outbound", access = "deny", protocol = "any", destinations = ["198.51.100.7/32"] } ]
"#;
    let mut e = eng(deny);
    let src = ip("10.0.3.10");
    for sport in 4000..4100 {
        assert_eq!(
            out(&mut e, 1, Packet::tcp(src, sport, ip(SERVER), 443, SYN)),
            Verdict::Drop(DropReason::NsgDenied)
        );
        assert_eq!(
            out(&mut e, 1, Packet::udp(src, sport, ip(SERVER), 53)),
            Verdict::Drop(DropReason::NsgDenied)
        );
    }
    let r = e.instance("vm-pat").unwrap();
    assert_eq!(r.used, [0, 0], "no SNAT port used");
    assert_eq!(r.flows, [0, 0]);
    assert_eq!(r.stats[0].conn_ok + r.stats[0].conn_fail, 0);
    assert_eq!(e.live_flows(), 0);
    assert_eq!(nsg_drops(&e, "vm-pat"), 200);
    // The first allowed flow gets exactly the port it would have got with no denied attempt.
    let got = syn(&mut e, 2, src, 5000, ip("198.51.100.8"), 443);
    let mut fresh = eng(deny);
    assert_eq!(got, syn(&mut fresh, 2, src, 5000, ip("198.51.100.8"), 443));
    e.check_invariants().unwrap();
}

// ---------------------------------------------------------------- R4.4

#[test]
fn r4_4_return_traffic_of_an_allowed_flow_is_allowed() {
    let mut e = eng(r#"
[[nsg]]
name = "n"
nics = ["vm-ilpip", "vm-pat"]
rules = [
  { name = "ssh-in", priority = 100, direction = "inbound", access = "allow", protocol = "tcp", destination_ports = ["22"] },
  { name = "web-out", priority = 100, direction = "outbound", access = "allow", protocol = "tcp", destination_ports = ["443"] },
  { name = "no-out", priority = 200, direction = "outbound", access = "deny", protocol = "any" },
]
"#);
    let (pubip, private) = (ip("203.0.113.10"), ip("10.0.1.10"));
    // ILPIP: outbound allowed; the server's answer passes although DenyAllInBound would
    // refuse it; the same port from another host does not.
    assert!(matches!(
        out(
            &mut e,
            10,
            Packet::tcp(private, 40000, ip(SERVER), 443, SYN)
        ),
        Verdict::Translate { .. }
    ));
    assert_eq!(
        inb(
            &mut e,
            10,
            Packet::tcp(ip(SERVER), 443, pubip, 40000, SYN | ACK)
        ),
        Verdict::Translate {
            addr: private,
            port: 40000
        }
    );
    assert_eq!(
        inb(
            &mut e,
            10,
            Packet::tcp(ip("198.51.100.66"), 443, pubip, 40000, SYN | ACK)
        ),
        Verdict::Drop(DropReason::NsgDenied)
    );
    // The entry lives while packets flow and is forgotten after the idle timeout (240 s).
    assert!(matches!(
        inb(&mut e, 249, Packet::tcp(ip(SERVER), 443, pubip, 40000, ACK)),
        Verdict::Translate { .. }
    ));
    assert_eq!(
        inb(&mut e, 489, Packet::tcp(ip(SERVER), 443, pubip, 40000, ACK)),
        Verdict::Drop(DropReason::NsgDenied)
    );
    // An allowed inbound connection's answers leave although "no-out" denies all outbound.
    assert!(matches!(
        inb(&mut e, 500, Packet::tcp(ip(CLIENT), 6000, pubip, 22, SYN)),
        Verdict::Translate { .. }
    ));
    assert_eq!(
        out(
            &mut e,
            500,
            Packet::tcp(private, 22, ip(CLIENT), 6000, SYN | ACK)
        ),
        Verdict::Translate {
            addr: pubip,
            port: 22
        }
    );
    assert_eq!(
        out(
            &mut e,
            500,
            Packet::tcp(private, 22, ip(CLIENT), 6001, SYN | ACK)
        ),
        Verdict::Drop(DropReason::NsgDenied)
    );
    // PAT: the flow table is the state; return traffic never meets DenyAllInBound.
    let (pa, pp) = syn(&mut e, 500, ip("10.0.3.10"), 4000, ip(SERVER), 443);
    let before = hits(&e, "n", "DenyAllInBound");
    assert!(matches!(
        inb(&mut e, 500, Packet::tcp(ip(SERVER), 443, pa, pp, SYN | ACK)),
        Verdict::Translate { .. }
    ));
    assert_eq!(hits(&e, "n", "DenyAllInBound"), before);
}

// ---------------------------------------------------------------- R4.5, R5.1, R5.2

/// Sends `n` new connections from distinct client ports to the frontend at `now`; returns
/// how many went to each member (web1, web2).
fn spread(e: &mut Engine, now: u32, ports: std::ops::Range<u16>) -> (usize, usize) {
    let (mut a, mut b) = (0, 0);
    for cp in ports {
        match inb(e, now, Packet::tcp(ip(CLIENT), cp, ip(FE), 80, SYN)) {
            Verdict::Translate { addr, port } => {
                assert_eq!(port, 8080);
                if addr == ip("10.0.2.10") {
                    a += 1;
                } else {
                    assert_eq!(addr, ip("10.0.2.11"));
                    b += 1;
                }
            }
            v => panic!("client port {cp}: {v:?}"),
        }
    }
    (a, b)
}

#[test]
fn r5_1_new_inbound_flow_goes_to_a_member_by_hash_and_sticks() {
    let mut e = eng("");
    let (a, b) = spread(&mut e, 1, 10000..10200);
    assert!(a > 50 && b > 50, "spread over both members: {a}/{b}");
    assert_eq!(e.inbound_flow_count(), 200);
    // Sticky: every later packet of a flow goes to the member its first one went to, and the
    // member's answers leave from the frontend address and port; no SNAT port is used.
    for cp in 10000..10200u16 {
        let first = e
            .inbound_flows()
            .into_iter()
            .find(|f| f.client == (ip(CLIENT), cp))
            .unwrap()
            .member;
        assert_eq!(
            inb(&mut e, 2, Packet::tcp(ip(CLIENT), cp, ip(FE), 80, ACK)),
            Verdict::Translate {
                addr: first.0,
                port: 8080
            }
        );
        assert_eq!(
            out(
                &mut e,
                2,
                Packet::tcp(first.0, 8080, ip(CLIENT), cp, SYN | ACK)
            ),
            Verdict::Translate {
                addr: ip(FE),
                port: 80
            }
        );
    }
    assert_eq!(e.instance("web1").unwrap().used, [0, 0]);
    // The choice is a function of the 5-tuple: a second engine chooses alike.
    let mut e2 = eng("");
    assert_eq!(spread(&mut e2, 1, 10000..10200), (a, b));
    // No entry and not a SYN: unsolicited (R3.8); other ports of the frontend likewise.
    assert_eq!(
        inb(&mut e, 3, Packet::tcp(ip(CLIENT), 9999, ip(FE), 80, ACK)),
        Verdict::Drop(DropReason::UnsolicitedInbound)
    );
    assert_eq!(
        inb(&mut e, 3, Packet::tcp(ip(CLIENT), 9999, ip(FE), 81, SYN)),
        Verdict::Drop(DropReason::UnsolicitedInbound)
    );
    // Members' outbound PAT on the frontend still works, with ports from the SNAT range.
    let (pa, pp) = syn(&mut e, 3, ip("10.0.2.10"), 4000, ip(SERVER), 443);
    assert_eq!(pa, ip(FE));
    assert!(pp >= 1024);
    e.check_invariants().unwrap();
}

#[test]
fn r5_1_inbound_nsg_of_the_member_applies_and_frontend_ports_stay_below_the_snat_range() {
    let mut e = eng(r#"
[[nsg]]
name = "n"
nics = ["web1", "web2"]
rules = [ { name = "only-doc", priority = 100, direction = "inbound", access = "allow", protocol = "tcp", sources = ["198.51.100.0/24"], destination_ports = ["8080"] } ]
"#);
    assert!(matches!(
        inb(&mut e, 1, Packet::tcp(ip(CLIENT), 1000, ip(FE), 80, SYN)),
        Verdict::Translate { .. }
    ));
    assert_eq!(
        inb(
            &mut e,
            1,
            Packet::tcp(ip("192.0.2.9"), 1000, ip(FE), 80, SYN)
        ),
        Verdict::Drop(DropReason::NsgDenied)
    );
    assert_eq!(hits(&e, "n", "only-doc"), 1);
    // The rule sees the backend port: allowing 80 (the frontend port) is not enough.
    let m =
        Topology::from_toml(&config("").replace("frontend_port = 80,", "frontend_port = 8443,"))
            .unwrap_err()
            .to_string();
    assert!(
        m.contains("load_balancer[lb].rules[http].frontend_port") && m.contains("R2.4"),
        "{m}"
    );
}

#[test]
fn r4_5_blocked_probe_marks_the_member_down_and_leaves_its_outbound_alone() {
    let mut e = eng(r#"
[[nsg]]
name = "block-probe"
nics = ["web2"]
rules = [
  { name = "no-lb", priority = 100, direction = "inbound", access = "deny", protocol = "any", sources = ["AzureLoadBalancer"] },
  { name = "web", priority = 200, direction = "inbound", access = "allow", protocol = "tcp", sources = ["Internet"], destination_ports = ["8080"] },
]
"#);
    // A flow that reached web2 before it went down.
    let old = (10000..10100u16)
        .find(|&cp| {
            inb(&mut e, 1, Packet::tcp(ip(CLIENT), cp, ip(FE), 80, SYN))
                == Verdict::Translate {
                    addr: ip("10.0.2.11"),
                    port: 8080,
                }
        })
        .expect("some flow hashes to web2");
    let (w1, w2) = (ip("10.0.2.10"), ip("10.0.2.11"));
    assert!(e.probe_permitted(w1, 8080));
    assert!(!e.probe_permitted(w2, 8080));
    assert_eq!(hits(&e, "block-probe", "no-lb"), 1);
    // The prober reports the blocked probe as a failure; threshold 2.
    assert_eq!(e.probe_result(5, "lb", "hp", "web2", false), None);
    assert_eq!(e.probe_result(10, "lb", "hp", "web2", false), Some(false));
    assert_eq!(e.probe_result(10, "lb", "hp", "web1", true), None);
    let st = e.probe_states();
    let s2 = st.iter().find(|s| &*s.member == "web2").unwrap();
    assert!(!s2.up && s2.consecutive_failures == 2 && s2.changed_at == Some(10));
    // The change is an event (R6.2).
    let evs: Vec<_> = e
        .drain_events()
        .into_iter()
        .filter(|ev| matches!(ev.kind, snatgw_core::EventKind::ProbeChanged { .. }))
        .collect();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].time, 10);
    assert_eq!(
        evs[0].kind,
        snatgw_core::EventKind::ProbeChanged {
            lb: "lb".into(),
            probe: "hp".into(),
            member: "web2".into(),
            up: false,
            failures: 2
        }
    );
    // No new flow goes to web2.
    assert_eq!(spread(&mut e, 11, 20000..20200), (200, 0));
    // Its existing flow continues, and its outbound connectivity is untouched.
    assert_eq!(
        inb(&mut e, 11, Packet::tcp(ip(CLIENT), old, ip(FE), 80, ACK)),
        Verdict::Translate {
            addr: w2,
            port: 8080
        }
    );
    let (pa, _) = syn(&mut e, 11, w2, 4000, ip(SERVER), 443);
    assert_eq!(pa, ip(FE));
    assert!(matches!(
        out(&mut e, 11, Packet::udp(w2, 4000, ip(SERVER), 53)),
        Verdict::Translate { .. }
    ));
    // Both down: new flows are dropped and counted.
    e.probe_result(15, "lb", "hp", "web1", false);
    e.probe_result(20, "lb", "hp", "web1", false);
    assert_eq!(
        inb(&mut e, 21, Packet::tcp(ip(CLIENT), 30000, ip(FE), 80, SYN)),
        Verdict::Drop(DropReason::NoHealthyBackend)
    );
    assert_eq!(
        e.global_stats().drops[DropReason::NoHealthyBackend as usize],
        1
    );
}

#[test]
fn r5_2_probes_threshold_and_recovery() {
    let mut e = engine(&config("").replace("unhealthy_threshold = 2", "unhealthy_threshold = 3"));
    let t = e.probe_targets();
    assert_eq!(t.len(), 2);
    assert!(t.iter().all(|x| x.port == 8080
        && x.path == "/health"
        && x.interval == 5
        && x.threshold == 3
        && x.protocol == snatgw_core::config::ProbeProtocol::Http));
    // Members start up (decision); two failures leave web1 up, the third marks it down.
    assert!(e.probe_states().iter().all(|s| s.up));
    assert_eq!(e.probe_result(5, "lb", "hp", "web1", false), None);
    assert_eq!(e.probe_result(10, "lb", "hp", "web1", false), None);
    assert_eq!(e.probe_result(15, "lb", "hp", "web1", false), Some(false));
    assert_eq!(spread(&mut e, 16, 1000..1100), (0, 100));
    // A success in between resets the count.
    assert_eq!(e.probe_result(20, "lb", "hp", "web1", true), Some(true));
    e.probe_result(25, "lb", "hp", "web1", false);
    e.probe_result(30, "lb", "hp", "web1", false);
    assert_eq!(e.probe_result(35, "lb", "hp", "web1", true), None);
    assert!(e.probe_states().iter().all(|s| s.up));
    // Unknown probe or member: ignored.
    assert_eq!(e.probe_result(40, "lb", "nope", "web1", false), None);
    assert_eq!(e.probe_result(40, "lb", "hp", "vm-pat", false), None);
    // Probe validation names field and rule.
    for (from, to, field) in [
        (
            "interval_secs = 5",
            "interval_secs = 0",
            "probes[hp].interval_secs",
        ),
        (
            "unhealthy_threshold = 2",
            "unhealthy_threshold = 0",
            "probes[hp].unhealthy_threshold",
        ),
        ("port = 8080, path", "port = 0, path", "probes[hp].port"),
        ("path = \"/health\"", "path = \"health\"", "probes[hp].path"),
        ("probe = \"hp\"", "probe = \"nope\"", "rules[http].probe"),
    ] {
        let m = Topology::from_toml(&config("").replace(from, to))
            .unwrap_err()
            .to_string();
        assert!(m.contains(field), "{m}");
    }
    // State survives an unrelated configuration change.
    for t in 40..43 {
        e.probe_result(t, "lb", "hp", "web2", false);
    }
    let t2 = Topology::from_toml(&config("[[nsg]]\nname = \"x\"\nnics = [\"vm-pat\"]\n")).unwrap();
    e.apply(43, t2).unwrap();
    let s2 = e
        .probe_states()
        .into_iter()
        .find(|s| &*s.member == "web2")
        .unwrap();
    assert!(!s2.up);
}

// ---------------------------------------------------------------- R3.7

#[test]
fn r3_7_inbound_idle_timeout_is_4_minutes_by_default_to_the_second() {
    let mut e = eng("");
    let cp = 10000;
    let v = inb(&mut e, 10, Packet::tcp(ip(CLIENT), cp, ip(FE), 80, SYN));
    let Verdict::Translate { addr: m, .. } = v else {
        panic!("{v:?}")
    };
    // 239 s idle: still there (and refreshed by the member's packet at 249).
    assert!(matches!(
        out(&mut e, 249, Packet::tcp(m, 8080, ip(CLIENT), cp, ACK)),
        Verdict::Translate { .. }
    ));
    assert!(matches!(
        inb(&mut e, 488, Packet::tcp(ip(CLIENT), cp, ip(FE), 80, ACK)),
        Verdict::Translate { .. }
    ));
    // 240 s idle after 488: gone in both directions.
    assert_eq!(
        inb(&mut e, 728, Packet::tcp(ip(CLIENT), cp, ip(FE), 80, ACK)),
        Verdict::Drop(DropReason::UnsolicitedInbound)
    );
    assert_eq!(
        out(&mut e, 728, Packet::tcp(m, 8080, ip(CLIENT), cp, ACK)),
        Verdict::Drop(DropReason::TcpNotSyn)
    );
    assert_eq!(e.inbound_flow_count(), 0);
}

#[test]
fn r3_7_inbound_idle_timeout_is_settable_from_4_to_30_minutes() {
    let with = |m: u32| {
        config("").replace(
            "probe = \"hp\"",
            &format!("probe = \"hp\", idle_timeout_minutes = {m}"),
        )
    };
    let mut e = engine(&with(30));
    assert!(
        matches!(
            inb(&mut e, 0, Packet::udp(ip(CLIENT), 7000, ip(FE), 80)),
            Verdict::Drop(DropReason::UnsolicitedInbound)
        ),
        "a TCP rule does not carry UDP"
    );
    inb(&mut e, 100, Packet::tcp(ip(CLIENT), 7000, ip(FE), 80, SYN));
    // The timer wheel of the engine spans only 240 s; the entry must still expire at 1800 s.
    e.advance(100 + 1799);
    assert_eq!(e.inbound_flow_count(), 1);
    assert!(matches!(
        inb(
            &mut e,
            100 + 1799,
            Packet::tcp(ip(CLIENT), 7000, ip(FE), 80, ACK)
        ),
        Verdict::Translate { .. }
    ));
    e.advance(100 + 1799 + 1799);
    assert_eq!(e.inbound_flow_count(), 1);
    e.advance(100 + 1799 + 1800);
    assert_eq!(
        e.inbound_flow_count(),
        0,
        "removed by the timers, without traffic"
    );
    assert_eq!(e.next_deadline(), None);
    for bad in [3, 31] {
        let m = Topology::from_toml(&with(bad)).unwrap_err().to_string();
        assert!(
            m.contains("load_balancer[lb].rules[http].idle_timeout_minutes") && m.contains("R3.7"),
            "{m}"
        );
    }
    // Within the range every value holds to the second.
    for minutes in [4, 17, 30] {
        let mut e = engine(&with(minutes));
        inb(&mut e, 0, Packet::tcp(ip(CLIENT), 7000, ip(FE), 80, SYN));
        let s = minutes * 60;
        e.advance(s - 1);
        assert_eq!(e.inbound_flow_count(), 1, "{minutes} min");
        e.advance(s);
        assert_eq!(e.inbound_flow_count(), 0, "{minutes} min");
    }
}

#[test]
fn r3_7_tcp_close_ends_an_inbound_flow_like_an_outbound_one() {
    let mut e = eng("");
    let Verdict::Translate { addr: m, .. } =
        inb(&mut e, 0, Packet::tcp(ip(CLIENT), 7000, ip(FE), 80, SYN))
    else {
        panic!()
    };
    inb(
        &mut e,
        1,
        Packet::tcp(ip(CLIENT), 7000, ip(FE), 80, FIN_ACK),
    );
    out(&mut e, 2, Packet::tcp(m, 8080, ip(CLIENT), 7000, FIN_ACK));
    // FIN both ways at 2: released 240 s later (R3.2).
    e.advance(241);
    assert_eq!(e.inbound_flow_count(), 1);
    e.advance(242);
    assert_eq!(e.inbound_flow_count(), 0);
    // RST: 15 s (R3.3).
    inb(&mut e, 300, Packet::tcp(ip(CLIENT), 7001, ip(FE), 80, SYN));
    inb(&mut e, 301, Packet::tcp(ip(CLIENT), 7001, ip(FE), 80, RST));
    e.advance(315);
    assert_eq!(e.inbound_flow_count(), 1);
    e.advance(316);
    assert_eq!(e.inbound_flow_count(), 0);
}

#[test]
fn r3_7_operator_override_of_the_inbound_idle_timeout_in_seconds() {
    let cfg = config("").replace(
        "default_snat_pool = [\"192.0.2.100\"]",
        "default_snat_pool = [\"192.0.2.100\"]\ninbound_idle_timeout_secs = 5",
    );
    let mut e = engine(&cfg);
    inb(&mut e, 0, Packet::tcp(ip(CLIENT), 7000, ip(FE), 80, SYN));
    e.advance(4);
    assert_eq!(e.inbound_flow_count(), 1);
    e.advance(5);
    assert_eq!(e.inbound_flow_count(), 0);
    let m = Topology::from_toml(&cfg.replace("= 5", "= 0"))
        .unwrap_err()
        .to_string();
    assert!(m.contains("gateway.inbound_idle_timeout_secs"), "{m}");
}

#[test]
fn r5_1_udp_and_all_rules_carry_datagrams_with_the_rules_idle_timeout() {
    let cfg = config("").replace(
        "protocol = \"tcp\", frontend_port = 80",
        "protocol = \"all\", frontend_port = 80",
    );
    let mut e = engine(&cfg);
    let Verdict::Translate { addr: m, port } =
        inb(&mut e, 0, Packet::udp(ip(CLIENT), 5353, ip(FE), 80))
    else {
        panic!("UDP to an `all` rule is load-balanced")
    };
    assert_eq!(port, 8080);
    assert_eq!(
        out(&mut e, 1, Packet::udp(m, 8080, ip(CLIENT), 5353)),
        Verdict::Translate {
            addr: ip(FE),
            port: 80
        }
    );
    // TCP on the same frontend port is a separate entry.
    assert!(matches!(
        inb(&mut e, 1, Packet::tcp(ip(CLIENT), 5353, ip(FE), 80, SYN)),
        Verdict::Translate { .. }
    ));
    assert_eq!(e.inbound_flow_count(), 2);
    // 240 s after the member's last datagram the UDP entry ends (R3.7 default).
    e.advance(240);
    assert_eq!(e.inbound_flow_count(), 2);
    e.advance(241);
    assert_eq!(e.inbound_flow_count(), 0);
    e.check_inbound_invariants().unwrap();
}

mod model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const IDLE: u32 = 30;

    #[derive(Debug, Clone)]
    enum Op {
        /// A new connection (SYN) from client port `cport`.
        Syn(u16),
        /// A packet of connection `pick` from the client (`true`) or the member.
        Pkt {
            pick: usize,
            from_client: bool,
            flags: u8,
        },
        /// A probe result for web1 / web2.
        Probe {
            second: bool,
            ok: bool,
        },
        Advance(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1000u16..1040).prop_map(Op::Syn),
            4 => (0usize..64, any::<bool>(), prop::sample::select(vec![ACK, ACK, FIN_ACK, RST]))
                .prop_map(|(pick, from_client, flags)| Op::Pkt { pick, from_client, flags }),
            1 => (any::<bool>(), any::<bool>()).prop_map(|(second, ok)| Op::Probe { second, ok }),
            2 => (0u32..20).prop_map(Op::Advance),
        ]
    }

    /// What the model knows of a connection: its member, last packet, and whether a FIN or
    /// RST was sent (then the model stops predicting it).
    struct Conn {
        member: u32,
        last: u32,
        closing: bool,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// R5.1 stickiness and R3.7 lifetime against a model; the indexes stay consistent.
        #[test]
        fn r5_1_r3_7_inbound_flows_stick_until_they_end(ops in prop::collection::vec(op(), 1..120)) {
            let cfg = config("").replace(
                "default_snat_pool = [\"192.0.2.100\"]",
                &format!("default_snat_pool = [\"192.0.2.100\"]\ninbound_idle_timeout_secs = {IDLE}"),
            );
            let mut e = engine(&cfg);
            let mut now = 1u32;
            let mut conns: HashMap<u16, Conn> = HashMap::new();
            let mut order: Vec<u16> = Vec::new();
            let mut down = [false, false];
            for op in ops {
                match op {
                    Op::Syn(cp) => {
                        let v = inb(&mut e, now, Packet::tcp(ip(CLIENT), cp, ip(FE), 80, SYN));
                        let alive = conns.get(&cp).is_some_and(|c| !c.closing && c.last + IDLE > now);
                        match v {
                            Verdict::Translate { addr, port } => {
                                prop_assert_eq!(port, 8080);
                                if alive {
                                    // A SYN on a live, open entry is part of it.
                                    prop_assert_eq!(addr, conns[&cp].member);
                                } else {
                                    let up = [ip("10.0.2.10"), ip("10.0.2.11")]
                                        .iter()
                                        .zip(down)
                                        .any(|(&a, d)| a == addr && !d);
                                    prop_assert!(up, "a new flow goes to a healthy member");
                                }
                                let c = conns.entry(cp).or_insert(Conn { member: addr, last: now, closing: false });
                                if !alive {
                                    *c = Conn { member: addr, last: now, closing: false };
                                }
                                c.last = now;
                                if !order.contains(&cp) {
                                    order.push(cp);
                                }
                            }
                            Verdict::Drop(DropReason::NoHealthyBackend) => {
                                prop_assert!(!alive && down == [true, true]);
                            }
                            v => prop_assert!(false, "unexpected {:?}", v),
                        }
                    }
                    Op::Pkt { pick, from_client, flags } => {
                        if order.is_empty() {
                            continue;
                        }
                        let cp = order[pick % order.len()];
                        let c = conns.get_mut(&cp).unwrap();
                        let alive = !c.closing && c.last + IDLE > now;
                        let v = if from_client {
                            inb(&mut e, now, Packet::tcp(ip(CLIENT), cp, ip(FE), 80, flags))
                        } else {
                            out(&mut e, now, Packet::tcp(c.member, 8080, ip(CLIENT), cp, flags))
                        };
                        if alive {
                            let want = if from_client {
                                Verdict::Translate { addr: c.member, port: 8080 }
                            } else {
                                Verdict::Translate { addr: ip(FE), port: 80 }
                            };
                            prop_assert_eq!(v, want, "a live flow sticks to its member");
                        } else if !c.closing {
                            prop_assert!(matches!(v, Verdict::Drop(_)), "an expired flow is gone: {:?}", v);
                        }
                        if matches!(v, Verdict::Translate { .. }) {
                            c.last = now;
                        }
                        if flags & (FIN_ACK | RST) & !ACK != 0 /* FIN or RST */ {
                            c.closing = true;
                        }
                    }
                    Op::Probe { second, ok } => {
                        let m = if second { "web2" } else { "web1" };
                        for _ in 0..2 {
                            e.probe_result(now, "lb", "hp", m, ok);
                        }
                        down[usize::from(second)] = !ok;
                    }
                    Op::Advance(s) => {
                        now += s;
                        e.advance(now);
                    }
                }
                e.check_inbound_invariants().map_err(|e| TestCaseError::fail(e.to_string()))?;
                e.check_invariants().map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
        }
    }
}

#[test]
fn r9_2_a_member_holds_at_most_its_max_flows_inbound_entries() {
    // web1 and web2 may hold 10 flows each (R9.2); a SYN flood of 100 client ports at the
    // frontend gets 10 entries per member, the other 80 SYNs are `flow_limit` drops counted
    // for the member they were sent to; its outbound PAT flows are counted apart.
    let cfg = config("")
        .replace(
            "name = \"web1\"\nprivate_ip = \"10.0.2.10\"",
            "name = \"web1\"\nprivate_ip = \"10.0.2.10\"\nmax_flows = 10",
        )
        .replace(
            "name = \"web2\"\nprivate_ip = \"10.0.2.11\"",
            "name = \"web2\"\nprivate_ip = \"10.0.2.11\"\nmax_flows = 10",
        );
    assert!(cfg.matches("max_flows = 10").count() == 2, "config changed");
    let mut e = engine(&cfg);
    let (client, fe) = (ip(CLIENT), ip(FE));
    let mut ok = 0;
    for port in 0..100u16 {
        match inb(&mut e, 1, Packet::tcp(client, 20000 + port, fe, 80, SYN)) {
            Verdict::Translate { port: 8080, .. } => ok += 1,
            Verdict::Drop(DropReason::FlowLimit) => {}
            v => panic!("{v:?}"),
        }
    }
    assert_eq!(ok, 20, "10 entries per member");
    assert_eq!(e.inbound_flow_count(), 20);
    e.check_inbound_invariants().unwrap();
    let drops = |e: &Engine, n: &str| -> u64 {
        e.instance(n)
            .unwrap()
            .stats
            .iter()
            .map(|s| s.drops[DropReason::FlowLimit as usize])
            .sum()
    };
    assert_eq!(drops(&e, "web1") + drops(&e, "web2"), 80);
    // The member's own outbound flows still start (its PAT flows are counted apart).
    assert!(matches!(
        out(
            &mut e,
            2,
            Packet::tcp(ip("10.0.2.10"), 40000, ip(SERVER), 443, SYN)
        ),
        Verdict::Translate { .. }
    ));
    // After the rule's idle timeout (4 min, R3.7) the entries are gone and room is back.
    e.advance(1 + 240);
    assert_eq!(e.inbound_flow_count(), 0);
    e.check_inbound_invariants().unwrap();
    assert!(matches!(
        inb(&mut e, 242, Packet::tcp(client, 30000, fe, 80, SYN)),
        Verdict::Translate { port: 8080, .. }
    ));
}
