//! The control plane (issue #8) against a running `snatgw run` in the lab, with real
//! sockets: every change goes through the REST API (`/api/v1`, a blocking client on a thread
//! inside the gateway namespace, where the API listens on loopback) while TCP connections
//! held by this process cross the gateway.
//!
//! - tier changes (R2.8–R2.10): an availability set of 50 grows to 51 through `PUT
//!   /instances/{name}` while 600 connections are open: 1024 → 512 ports, exactly the
//!   connections on reclaimed ports die, the others keep working, new ones fill the new
//!   block and no more; `DELETE` brings 1024 back without touching a connection;
//! - a Classic redeploy (R2.11): `POST /redeploy` with a reported size across a tier gives
//!   fewer ports (the 65th connection fails), `POST /settle` gives them back;
//! - a scenario change (R1.4): an ILPIP added to a PAT instance with open flows: new flows
//!   leave with the ILPIP (seen by the R6.4 responder), the PAT block and its flows are
//!   reclaimed, the neighbour on the same public IP is untouched;
//! - restart persistence: a topology changed through the API survives SIGTERM and a start
//!   with the original configuration file (the store wins), in the API and in traffic;
//! - write atomicity: SIGKILL during a stream of whole-topology PUTs; after the restart the
//!   topology equals one written version exactly, with its generation, and no acknowledged
//!   write is lost;
//! - metrics during exhaustion (R6.1): `/metrics` at 32 of 32 ports for one destination;
//! - bearer-token auth: 401 without or with a wrong token, 200 with it; a group-readable
//!   `--token-file` is warned about; without `--token-file` the gateway generates a token
//!   in its state directory (mode 0600, reused by the next start) and needs it on any
//!   address (issue #20).
//!
//! Expected numbers come from the SPEC's tier table (R2.8: 1–50 → 1024, 51–100 → 512,
//! 101–200 → 256, 201–400 → 128, 401–800 → 64, 801–1000 → 32). Root only (fails instead of
//! skipping when `SNATGW_REQUIRE_ROOT=1`).

mod common;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use snatgw_control::{ClientError, EventRecord, FlowQuery, InstancePorts};
use snatgw_core::config::{InstanceCfg, PublicIpCfg};
use snatgw_core::ConfigFile;

const POOL_IP: &str = "192.0.2.20";
const NEW_PIP: &str = "203.0.113.30";
const HOLD_A: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(SERVER_A), 9000);
const CONNECT: Duration = Duration::from_secs(3);
/// Connect timeout for an attempt that is expected to fail (its SYN is dropped).
const FAIL_FAST: Duration = Duration::from_secs(1);

/// Private address of the `i`-th instance of a generated set.
fn private_ip(i: u32) -> String {
    format!("10.0.{}.{}", 10 + i / 200, 10 + i % 200)
}

/// `[gateway]` with one default-SNAT address and short timers, as the lab tests use.
fn gateway_section() -> String {
    format!(
        "[gateway]\nseed = 1\nvnet_prefixes = [\"10.0.0.0/16\"]\ndefault_snat_pool = [\"{POOL_IP}\"]\n\
         idle_timeout_secs = 120\nfin_timeout_secs = 2\nrst_timeout_secs = 2\nport_reuse_history_secs = 2\n\n"
    )
}

/// An ARM availability set `big` of `n` instances `a0..a{n-1}` on default SNAT.
fn set_config(n: u32) -> String {
    let mut c = gateway_section();
    c.push_str("[[availability_set]]\nname = \"big\"\n");
    for i in 0..n {
        let _ = write!(
            c,
            "\n[[instance]]\nname = \"a{i}\"\nprivate_ip = \"{}\"\navailability_set = \"big\"\n",
            private_ip(i)
        );
    }
    c
}

/// Instance `a{i}` of set `big`, as the API takes it.
fn set_member(i: u32) -> InstanceCfg {
    InstanceCfg {
        name: format!("a{i}"),
        kind: Default::default(),
        model: Default::default(),
        private_ip: private_ip(i),
        public_ip: None,
        availability_set: Some("big".into()),
        deployment: None,
        max_flows: None,
    }
}

fn ports(g: &GwLab, name: &str) -> InstancePorts {
    let n = name.to_string();
    g.api(move |c| c.instance_ports(&n))
        .unwrap_or_else(|e| panic!("GET /instances/{name}/ports: {e}"))
}

/// Every event so far (the API's log; the housekeeping loop fills it every 100 ms, so wait
/// for the one that must be there).
fn wait_event(g: &GwLab, f: impl Fn(&EventRecord) -> bool) -> Vec<EventRecord> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let evs = g.api(|c| c.events(0, 1000, 0)).expect("GET /events");
        if evs.iter().any(&f) || Instant::now() >= deadline {
            return evs;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Live translations of `instance` to the hold server A (R6.3).
fn flows_to_a(g: &GwLab, instance: &str) -> Vec<snatgw_control::FlowRecord> {
    let q = FlowQuery {
        instance: Some(instance.into()),
        destination: Some(HOLD_A.to_string()),
        protocol: Some("tcp".into()),
        limit: 1000,
        ..FlowQuery::default()
    };
    g.api(move |c| c.all_flows(&q)).expect("GET /flows")
}

fn seen_ports(conns: &[Held]) -> BTreeSet<u16> {
    conns.iter().map(Held::port).collect()
}

#[test]
fn r2_8_r2_9_r2_10_tier_change_through_the_api_with_connections_open() {
    if !root_or_skip() {
        return;
    }
    snatgw_lab::raise_nofile_limit();
    let g = GwLab::start("tier", &set_config(50), Some(&["a0"]));
    let p50 = ports(&g, "a0");
    assert_eq!(
        (p50.allocated, p50.pool_size, p50.public_ip.as_str()),
        (1024, 50, POOL_IP),
        "R2.8: 1-50 instances -> 1024 ports"
    );
    let block1024 = block_ports(&p50.block);
    assert_eq!(block1024.len(), 1024);

    // 600 concurrent connections to one destination: 600 distinct SNAT ports of the block.
    let (conns, failed) = g.hold_conns("a0", HOLD_A, 600, CONNECT);
    assert_eq!((conns.len(), failed), (600, 0));
    let used = seen_ports(&conns);
    assert_eq!(
        used.len(),
        600,
        "R2.3: one port per flow to one destination"
    );
    assert!(used.is_subset(&block1024), "R2.4: ports from the own block");

    // Grow the set to 51 through the API: 512 ports per instance (R2.8, R2.9).
    let put = g
        .api(|c| c.put(&set_member(50), None))
        .expect("PUT /instances/a50");
    assert_eq!(put.value, set_member(50));
    let p51 = ports(&g, "a0");
    assert_eq!(
        (p51.allocated, p51.pool_size),
        (512, 51),
        "R2.8/R2.9: 51 instances -> 512 ports"
    );
    let block512 = block_ports(&p51.block);
    assert_eq!(block512.len(), 512);
    assert!(
        block512.is_subset(&block1024),
        "R2.9: the block is halved, not moved"
    );
    assert_eq!(ports(&g, "a50").allocated, 512, "the new member gets 512");
    let expect_dead: BTreeSet<usize> = conns
        .iter()
        .enumerate()
        .filter(|(_, h)| !block512.contains(&h.port()))
        .map(|(i, _)| i)
        .collect();
    // 600 ports cannot fit in 512: at least 88 were reclaimed.
    assert!(expect_dead.len() >= 88, "{}", expect_dead.len());
    let kept = conns.len() - expect_dead.len();
    eprintln!(
        "600 connections: {kept} on kept ports, {} on reclaimed ports",
        expect_dead.len()
    );
    // The gateway lists exactly the flows on kept ports (R6.3)...
    let listed = flows_to_a(&g, "a0");
    assert_eq!(listed.len(), kept);
    assert!(listed.iter().all(|f| {
        let port: u16 = f.public.rsplit_once(':').unwrap().1.parse().unwrap();
        block512.contains(&port) && f.public.starts_with(POOL_IP)
    }));
    // ... and on the wire exactly the connections on reclaimed ports are dead (R2.9).
    let dead = probe(&conns, &expect_dead);
    assert_eq!(
        dead, expect_dead,
        "dead connections = connections on reclaimed ports"
    );
    let evs = wait_event(&g, |e| {
        e.kind == "ports_reclaimed" && e.instance.as_deref() == Some("a0")
    });
    assert!(
        evs.iter().any(|e| e.kind == "tier_changed"
            && e.public_ip.as_deref() == Some(POOL_IP)
            && e.detail.contains("1024 -> 512")),
        "{evs:#?}"
    );
    let reclaimed = evs
        .iter()
        .find(|e| e.kind == "ports_reclaimed" && e.instance.as_deref() == Some("a0"))
        .expect("ports_reclaimed event for a0");
    assert!(
        reclaimed
            .detail
            .contains(&format!("512 ports, {} flows dropped", expect_dead.len())),
        "{reclaimed:?}"
    );
    let mut alive: Vec<Held> = conns
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !dead.contains(i))
        .map(|(_, h)| h)
        .collect();

    // Ports are shared across destinations (R2.3): a new connection elsewhere works.
    let (other, failed) = g.hold_conns("a0", SocketAddr::from((SERVER_B, 9000)), 1, CONNECT);
    assert_eq!((other.len(), failed), (1, 0));
    assert!(block512.contains(&other[0].port()));
    assert_eq!(close_confirmed(other), 1);
    // Free ports of the new block for this destination: close 50 of the survivors (they
    // still work both ways) and wait for the FIN delay (2 s) to release their ports...
    let closing: Vec<Held> = alive.drain(..50).collect();
    assert_eq!(close_confirmed(closing), 50);
    let in_use = alive.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while ports(&g, "a0").used.tcp != in_use && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ports(&g, "a0").used.tcp, in_use);
    // ... then new connections succeed while free ports remain (R2.9): exactly 512 minus
    // those in use, and the next one fails (R2.6 at the new size).
    let free = 512 - alive.len();
    let (more, failed) = g.hold_conns("a0", HOLD_A, free, CONNECT);
    assert_eq!((more.len(), failed), (free, 0));
    assert!(seen_ports(&more).is_subset(&block512));
    alive.extend(more);
    assert_eq!(seen_ports(&alive), block512, "the whole new block in use");
    let (none, failed) = g.hold_conns("a0", HOLD_A, 1, FAIL_FAST);
    assert_eq!(
        (none.len(), failed),
        (0, 1),
        "R2.6: connection #513 finds no port"
    );
    let p = ports(&g, "a0");
    assert_eq!(p.used.tcp, 512);
    assert!(p.connections_failed.tcp >= 1);

    // Shrink back to 50 (R2.10): 1024 ports, the 512 in use untouched.
    g.api(|c| c.delete::<InstanceCfg>("a50", None))
        .expect("DELETE /instances/a50");
    let back = ports(&g, "a0");
    assert_eq!(
        (back.allocated, back.pool_size),
        (1024, 50),
        "R2.10: back to 1024"
    );
    let block_back = block_ports(&back.block);
    assert_eq!(block_back.len(), 1024);
    assert!(
        block512.is_subset(&block_back),
        "R2.10: existing ports are kept"
    );
    assert_eq!(
        g.api(|c| c.instance_ports("a50"))
            .expect_err("a50 is gone")
            .status(),
        Some(404)
    );
    let dead = probe(&alive, &BTreeSet::new());
    assert!(
        dead.is_empty(),
        "R2.10: {} existing connections died",
        dead.len()
    );
    // New connections get the grown part of the block (the old half is all in use).
    let (extra, failed) = g.hold_conns("a0", HOLD_A, 100, CONNECT);
    assert_eq!((extra.len(), failed), (100, 0));
    let extra_ports = seen_ports(&extra);
    assert!(extra_ports.is_subset(&block_back));
    assert!(extra_ports.is_disjoint(&block512));
    alive.extend(extra);
    let n = alive.len();
    assert_eq!(n, 612, "512 + 100 open");
    assert_eq!(
        close_confirmed(alive),
        n,
        "every surviving connection still works both ways"
    );
    g.finish();
}

/// A Classic cloud service: `n` web worker roles in deployment `cs`, all in the pool of its
/// load balancer (the cloud service's VIP, 203.0.113.30).
fn classic_config(n: u32) -> String {
    let mut c = gateway_section();
    let _ = write!(
        c,
        "[[public_ip]]\nname = \"vip\"\naddress = \"{NEW_PIP}\"\n\n[[deployment]]\nname = \"cs\"\n"
    );
    let mut members = Vec::new();
    for i in 0..n {
        let _ = write!(
            c,
            "\n[[instance]]\nname = \"role-{i}\"\nkind = \"web_worker_role\"\nmodel = \"classic\"\n\
             deployment = \"cs\"\nprivate_ip = \"{}\"\n",
            private_ip(i)
        );
        members.push(format!("\"role-{i}\""));
    }
    let _ = write!(
        c,
        "\n[[load_balancer]]\nname = \"cloudservice\"\nmodel = \"classic\"\n\
         frontends = [ {{ name = \"vip\", public_ip = \"vip\" }} ]\n\
         backend_pools = [ {{ name = \"roles\", members = [{}] }} ]\n",
        members.join(", ")
    );
    c
}

#[test]
fn r2_11_r2_10_redeploy_reports_a_bigger_pool_then_settles_through_the_api() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start("rdp", &classic_config(400), Some(&["role-0"]));
    let p = ports(&g, "role-0");
    assert_eq!(
        (
            p.scenario.as_str(),
            p.public_ip.as_str(),
            p.allocated,
            p.pool_size
        ),
        ("load_balanced", NEW_PIP, 128, 400),
        "R1.2, R2.8: 201-400 -> 128"
    );
    let before = block_ports(&p.block);

    // More than twice the actual size is refused and changes nothing (R2.11).
    let err = g
        .api(|c| c.redeploy("cs", 801, None))
        .expect_err("801 > 2 x 400");
    match &err {
        ClientError::Api { status, body } => {
            assert!(matches!(status, 400 | 409), "{err}");
            assert_eq!(body.rule.as_deref(), Some("R2.11"), "{err}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(ports(&g, "role-0").allocated, 128);

    // The redeploy reports 800: tiers follow the reported size, 401-800 -> 64 (R2.11).
    let d = g
        .api(|c| c.redeploy("cs", 800, None))
        .expect("POST /redeploy");
    assert_eq!(d.value.redeploy_reported_instances, Some(800));
    let p = ports(&g, "role-0");
    assert_eq!((p.allocated, p.pool_size), (64, 800));
    let reported_block = block_ports(&p.block);
    assert!(reported_block.is_subset(&before));
    let (mut held, failed) = g.hold_conns("role-0", HOLD_A, 64, CONNECT);
    assert_eq!((held.len(), failed), (64, 0));
    assert!(held.iter().all(|h| h.seen.ip().to_string() == NEW_PIP));
    assert!(seen_ports(&held).is_subset(&reported_block));
    let (none, failed) = g.hold_conns("role-0", HOLD_A, 1, FAIL_FAST);
    assert_eq!(
        (none.len(), failed),
        (0, 1),
        "connection #65 fails while the redeploy is reported"
    );

    // Settled: the actual size again (R2.10 growth), the 64 connections untouched.
    let d = g.api(|c| c.settle("cs", None)).expect("POST /settle");
    assert_eq!(d.value.redeploy_reported_instances, None);
    let p = ports(&g, "role-0");
    assert_eq!((p.allocated, p.pool_size), (128, 400));
    let settled = block_ports(&p.block);
    assert!(reported_block.is_subset(&settled));
    assert!(probe(&held, &BTreeSet::new()).is_empty());
    let (more, failed) = g.hold_conns("role-0", HOLD_A, 64, CONNECT);
    assert_eq!(
        (more.len(), failed),
        (64, 0),
        "connections #65-#128 succeed after settle"
    );
    let (none, failed) = g.hold_conns("role-0", HOLD_A, 1, FAIL_FAST);
    assert_eq!((none.len(), failed), (0, 1), "connection #129 fails");
    held.extend(more);
    assert_eq!(seen_ports(&held), settled);
    assert_eq!(close_confirmed(held), 128);
    g.finish();
}

fn pair_config() -> String {
    let mut c = gateway_section();
    c.push_str(
        "[[availability_set]]\nname = \"as1\"\n\n\
         [[instance]]\nname = \"vm-as1\"\nprivate_ip = \"10.0.3.10\"\navailability_set = \"as1\"\n\n\
         [[instance]]\nname = \"vm-as2\"\nprivate_ip = \"10.0.3.11\"\navailability_set = \"as1\"\n",
    );
    c
}

#[test]
fn r1_4_r1_1_ilpip_added_through_the_api_while_pat_flows_are_open() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start("scn", &pair_config(), None);
    let old = ports(&g, "vm-as1");
    assert_eq!(
        (old.scenario.as_str(), old.public_ip.as_str(), old.allocated),
        ("default_snat", POOL_IP, 1024)
    );
    let neighbour_before = ports(&g, "vm-as2");
    let (pat, failed) = g.hold_conns("vm-as1", HOLD_A, 8, CONNECT);
    assert_eq!((pat.len(), failed), (8, 0));
    assert!(pat.iter().all(|h| h.seen.ip().to_string() == POOL_IP));
    let (nb, failed) = g.hold_conns("vm-as2", HOLD_A, 4, CONNECT);
    assert_eq!((nb.len(), failed), (4, 0));

    // The ILPIP: a public IP, then the instance naming it (R1.1 takes precedence, R1.4).
    let pip = PublicIpCfg {
        name: "pip-new".into(),
        address: NEW_PIP.into(),
    };
    g.api(move |c| c.put(&pip, None))
        .expect("PUT /publicIPAddresses/pip-new");
    let mut inst = g
        .api(|c| c.get::<InstanceCfg>("vm-as1"))
        .expect("GET /instances/vm-as1")
        .value;
    inst.public_ip = Some("pip-new".into());
    let put = g
        .api(move |c| c.put(&inst, None))
        .expect("PUT /instances/vm-as1");
    assert_eq!(put.value.public_ip.as_deref(), Some("pip-new"));

    let now = ports(&g, "vm-as1");
    assert_eq!(
        (
            now.scenario.as_str(),
            now.rule.as_str(),
            now.public_ip.as_str()
        ),
        ("ilpip", "R1.1", NEW_PIP)
    );
    assert_eq!(now.allocated, 65535, "R1.1: all ports, no preallocation");
    assert!(now.block.is_empty(), "R1.4: the PAT block is reclaimed");
    // New flows leave with the ILPIP, source port kept (R1.1), as the R6.4 responder saw.
    let r = g.client(
        "vm-as1",
        &["myip-http", &SERVER_A.to_string(), "--count", "3"],
    );
    assert!(r.all_ok(), "{r:?}");
    for (seen, local) in r.seen.iter().zip(&r.local) {
        let (ip, port) = seen.rsplit_once(':').unwrap();
        assert_eq!(ip, NEW_PIP, "{r:?}");
        assert_eq!(port, local.rsplit_once(':').unwrap().1, "{r:?}");
    }
    // The old PAT flows were dropped with their block (R1.4 applies R2.9's rule): no flow of
    // vm-as1 on the pool address is left, and every old connection is dead on the wire.
    assert!(flows_to_a(&g, "vm-as1")
        .iter()
        .all(|f| !f.public.starts_with(POOL_IP)));
    let all: BTreeSet<usize> = (0..pat.len()).collect();
    assert_eq!(probe(&pat, &all), all);
    let evs = wait_event(&g, |e| {
        e.kind == "ports_reclaimed" && e.instance.as_deref() == Some("vm-as1")
    });
    for kind in ["scenario_changed", "ports_reclaimed"] {
        assert!(
            evs.iter()
                .any(|e| e.kind == kind && e.instance.as_deref() == Some("vm-as1")),
            "{kind}: {evs:#?}"
        );
    }
    // The neighbour on the pool address is untouched: same block, connections alive.
    let neighbour = ports(&g, "vm-as2");
    assert_eq!(
        (
            neighbour.allocated,
            &neighbour.block,
            neighbour.public_ip.as_str()
        ),
        (1024, &neighbour_before.block, POOL_IP)
    );
    assert!(probe(&nb, &BTreeSet::new()).is_empty());
    assert_eq!(close_confirmed(nb), 4);
    g.finish();
}

#[test]
fn store_topology_changed_through_the_api_survives_a_restart_with_the_original_config() {
    if !root_or_skip() {
        return;
    }
    let mut g = GwLab::start("rst", &set_config(400), Some(&["a0"]));
    assert_eq!(
        ports(&g, "a0").allocated,
        128,
        "R2.8: 201-400 -> 128 from the file"
    );
    // Two changes: one more instance (401 -> 64 ports) and a setting.
    g.api(|c| c.put(&set_member(400), None))
        .expect("PUT /instances/a400");
    let mut gw = g.api(|c| c.gateway()).expect("GET /gateway").value;
    gw.idle_timeout_secs = 90;
    let gw2 = gw.clone();
    g.api(move |c| c.put_gateway(&gw2, None))
        .expect("PUT /gateway");
    let changed = g.api(|c| c.topology()).expect("GET /topology");
    assert_eq!(changed.generation, Some(3), "seed + two writes");
    assert_eq!(ports(&g, "a0").allocated, 64);

    // SIGTERM, then start again on the same state directory with the ORIGINAL file.
    assert!(
        snatgw_lab::gateway::stop_gateway(&g.gw, Duration::from_secs(5)),
        "clean exit on SIGTERM"
    );
    let file = std::fs::read_to_string(&g.config).unwrap();
    assert_eq!(file, set_config(400), "the config file was not rewritten");
    g.restart();
    // The store wins; the warning names what the file would change (issue #20).
    assert!(
        g.log().contains(
            "the configuration file differs from the stored topology, which runs (the store wins at start): \
             gateway.idle_timeout_secs changed, instance[a400] removed;"
        ),
        "{}",
        g.log()
    );
    let back = g.api(|c| c.topology()).expect("GET /topology");
    assert_eq!(back.generation, changed.generation);
    assert_eq!(
        serde_json::to_value(&back.value).unwrap(),
        serde_json::to_value(&changed.value).unwrap(),
        "the whole topology comes back from the store"
    );
    assert_eq!(back.value.gateway.idle_timeout_secs, 90);
    assert_eq!(
        g.api(|c| c.get::<InstanceCfg>("a400"))
            .expect("a400 is back")
            .value,
        set_member(400)
    );
    let p = ports(&g, "a0");
    assert_eq!((p.allocated, p.pool_size), (64, 401));
    // In traffic too: 64 connections, the 65th fails.
    let (held, failed) = g.hold_conns("a0", HOLD_A, 64, CONNECT);
    assert_eq!((held.len(), failed), (64, 0));
    assert!(seen_ports(&held).is_subset(&block_ports(&p.block)));
    let (none, failed) = g.hold_conns("a0", HOLD_A, 1, FAIL_FAST);
    assert_eq!((none.len(), failed), (0, 1));
    assert_eq!(close_confirmed(held), 64);
    g.finish();
}

/// Version `k` of the streamed topology: several places change together (seed, a timer,
/// how many extra instances, their addresses, which set they are in), so a mix of two
/// versions would be a topology no writer sent.
fn version(base: &ConfigFile, k: u64) -> ConfigFile {
    let mut c = base.clone();
    c.gateway.seed = k;
    c.gateway.idle_timeout_secs = 100 + (k % 100) as u32;
    let set = format!("s{}", k % 2);
    c.availability_set
        .push(snatgw_core::config::AvailabilitySetCfg { name: set.clone() });
    for j in 0..=(k % 3) {
        c.instance.push(InstanceCfg {
            name: format!("w{j}"),
            kind: Default::default(),
            model: Default::default(),
            private_ip: format!("10.0.{}.{}", 20 + j, 10 + k % 200),
            public_ip: None,
            availability_set: Some(set.clone()),
            deployment: None,
            max_flows: None,
        });
    }
    c
}

/// What the writer sent: acknowledged versions (generation, topology) and the one in flight.
#[derive(Default)]
struct Written {
    acked: Vec<(u64, ConfigFile)>,
    in_flight: Option<(u64, ConfigFile)>,
}

#[test]
fn store_sigkill_during_a_stream_of_puts_leaves_exactly_one_written_version() {
    if !root_or_skip() {
        return;
    }
    let base = ConfigFile::from_toml(&set_config(2)).unwrap();
    let mut g = GwLab::start("kil", &set_config(2), Some(&["a0"]));
    let mut next_k = 1u64;
    for round in 0..3 {
        let start = g.api(|c| c.topology()).expect("GET /topology");
        let written = Arc::new(Mutex::new(Written::default()));
        let first_k = next_k;
        let writer = {
            let (w, base) = (written.clone(), base.clone());
            let mut gen = start.generation.expect("generation");
            g.spawn_api(move |c| {
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut k = first_k;
                while Instant::now() < deadline {
                    let v = version(&base, k);
                    w.lock().unwrap().in_flight = Some((gen + 1, v.clone()));
                    match c.put_topology(&v, None) {
                        Ok(t) => {
                            gen = t.generation.expect("generation");
                            let mut w = w.lock().unwrap();
                            w.in_flight = None;
                            w.acked.push((gen, v));
                        }
                        Err(ClientError::Transport(_)) => return k, // the gateway is gone
                        Err(e) => panic!("PUT /topology version {k}: {e}"),
                    }
                    k += 1;
                }
                k
            })
        };
        // Kill it mid-stream, at a different point each round.
        let want = 20 + 15 * round;
        let deadline = Instant::now() + Duration::from_secs(20);
        while written.lock().unwrap().acked.len() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        g.gw.kill().expect("SIGKILL");
        next_k = writer.join().expect("writer") + 1;
        let w = std::mem::take(&mut *written.lock().unwrap());
        assert!(
            w.acked.len() >= want,
            "only {} writes acknowledged",
            w.acked.len()
        );
        let (last_gen, last) = w.acked.last().cloned().unwrap();

        g.restart();
        let now = g
            .api(|c| c.topology())
            .expect("GET /topology after restart");
        let gen = now.generation.expect("generation");
        let got = serde_json::to_value(&now.value).unwrap();
        let candidates: Vec<(u64, &ConfigFile)> = std::iter::once((last_gen, &last))
            .chain(w.in_flight.as_ref().map(|(g, c)| (*g, c)))
            .collect();
        assert!(
            candidates
                .iter()
                .any(|(g, c)| *g == gen && serde_json::to_value(c).unwrap() == got),
            "round {round}: generation {gen} after the restart is neither the last \
             acknowledged write (generation {last_gen}) nor the one in flight"
        );
        eprintln!(
            "round {round}: {} writes acknowledged, restart at generation {gen} ({})",
            w.acked.len(),
            if gen == last_gen {
                "the last acknowledged"
            } else {
                "the one in flight"
            }
        );
        // The running engine has it too: its instances are the version's.
        let names: BTreeSet<String> = g
            .api(|c| c.all_instance_ports())
            .expect("ports")
            .into_iter()
            .map(|p| p.name)
            .collect();
        let want_names: BTreeSet<String> =
            now.value.instance.iter().map(|i| i.name.clone()).collect();
        assert_eq!(names, want_names);
    }
    let r = g.client("a0", &["myip-http", &SERVER_A.to_string()]);
    assert!(r.all_ok(), "{r:?}");
    g.finish();
}

#[test]
fn r6_1_metrics_during_exhaustion() {
    if !root_or_skip() {
        return;
    }
    let g = GwLab::start("met", &set_config(801), Some(&["a0", "a1"]));
    let (held, failed) = g.hold_conns("a0", HOLD_A, 32, CONNECT);
    assert_eq!((held.len(), failed), (32, 0), "R2.8: 801 instances -> 32");
    let (none, failed) = g.hold_conns("a0", HOLD_A, 1, FAIL_FAST);
    assert_eq!((none.len(), failed), (0, 1), "R2.6: the 33rd fails");

    let base = [
        ("instance", "a0"),
        ("public_ip", POOL_IP),
        ("protocol", "tcp"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        base.iter().chain(extra).copied().collect()
    };
    let dest = HOLD_A.to_string();
    let dest_labels: Vec<(&str, &str)> = base
        .iter()
        .copied()
        .chain([("destination", dest.as_str())])
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let t = g.api(|c| c.metrics_text()).expect("GET /metrics");
        let ratio = metric(&t, "snatgw_destination_used_snat_ports_ratio", &dest_labels);
        if ratio == Some(1.0) || Instant::now() >= deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let m = |name: &str, labels: &[(&str, &str)]| {
        metric(&text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
    };
    assert_eq!(m("snatgw_allocated_snat_ports", &base), 32.0);
    assert_eq!(m("snatgw_used_snat_ports", &base), 32.0);
    assert_eq!(m("snatgw_flows", &base), 32.0);
    assert_eq!(
        m(
            "snatgw_snat_connection_count_total",
            &with(&[("result", "successful")])
        ),
        32.0
    );
    assert!(
        m(
            "snatgw_snat_connection_count_total",
            &with(&[("result", "failed")])
        ) >= 1.0
    );
    assert!(
        m(
            "snatgw_dropped_packets_total",
            &with(&[("reason", "ports_exhausted")])
        ) >= 1.0
    );
    assert_eq!(m("snatgw_destination_used_snat_ports", &dest_labels), 32.0);
    assert_eq!(
        m("snatgw_destination_used_snat_ports_ratio", &dest_labels),
        1.0
    );
    // The neighbour: its own 32 ports, none used.
    let nb = [
        ("instance", "a1"),
        ("public_ip", POOL_IP),
        ("protocol", "tcp"),
    ];
    assert_eq!(m("snatgw_allocated_snat_ports", &nb), 32.0);
    assert_eq!(m("snatgw_used_snat_ports", &nb), 0.0);
    assert_eq!(m("snatgw_live_flows", &[]), 32.0);
    // The same numbers as the instance's report.
    let p = ports(&g, "a0");
    assert_eq!(
        (p.used.tcp, p.flows.tcp, p.connections_ok.tcp),
        (32, 32, 32)
    );
    assert!(p.connections_failed.tcp >= 1);
    // R11.1 for operators: the flow-state snapshots a restart would restore from (written
    // every second by default) are on /metrics, the last one holding the 32 flows.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (written, flows, failed) = loop {
        let t = g.api(|c| c.metrics_text()).expect("GET /metrics");
        let get = |name: &str, labels: &[(&str, &str)]| metric(&t, name, labels);
        let r = (
            get(
                "snatgw_flow_state_snapshots_total",
                &[("result", "written")],
            ),
            get("snatgw_flow_state_last_flows", &[]),
            get("snatgw_flow_state_snapshots_total", &[("result", "failed")]),
        );
        if r.0.unwrap_or(0.0) >= 1.0 && r.1 == Some(32.0) || Instant::now() >= deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(written.unwrap_or(0.0) >= 1.0, "{written:?}");
    assert_eq!((flows, failed), (Some(32.0), Some(0.0)));
    assert_eq!(close_confirmed(held), 32);
    g.finish();
}

#[test]
fn api_auth_bearer_token_in_the_lab() {
    if !root_or_skip() {
        return;
    }
    const TOKEN: &str = "lab-token-5e1f";
    let mut g = GwLab::start_with("aut", &pair_config(), Some(&["vm-as1"]), |o, dir| {
        let f = dir.join("token");
        std::fs::write(&f, format!("{TOKEN}\n")).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        o.extra
            .extend(["--token-file".into(), f.to_string_lossy().into_owned()]);
    });
    let status = |r: Result<(), ClientError>| r.err().and_then(|e| e.status());
    // No token, a wrong one: 401 on reads, writes and /metrics; /healthz needs none.
    for token in [None, Some("wrong".to_string())] {
        assert_eq!(
            g.api_as(token.clone(), |c| c.healthz()).expect("healthz"),
            "ok"
        );
        assert_eq!(
            status(g.api_as(token.clone(), |c| c.topology().map(drop))),
            Some(401)
        );
        assert_eq!(
            status(g.api_as(token.clone(), |c| c.metrics_text().map(drop))),
            Some(401)
        );
        let put = g.api_as(token, |c| {
            let gw = snatgw_core::config::GatewayCfg {
                idle_timeout_secs: 61,
                ..Default::default()
            };
            c.put_gateway(&gw, None).map(drop)
        });
        assert_eq!(status(put), Some(401));
    }
    // With the token: the topology is the file's, untouched by the refused write.
    g.token = Some(TOKEN.into());
    let t = g
        .api(|c| c.topology())
        .expect("GET /topology with the token");
    assert_eq!(t.generation, Some(1));
    assert_eq!(t.value, ConfigFile::from_toml(&pair_config()).unwrap());
    assert!(g
        .api(|c| c.metrics_text())
        .expect("metrics")
        .contains("snatgw_allocated_snat_ports"));
    assert!(g
        .client("vm-as1", &["myip-http", &SERVER_A.to_string()])
        .all_ok());
    assert!(snatgw_lab::gateway::stop_gateway(
        &g.gw,
        Duration::from_secs(5)
    ));

    // The token file is 0644: the gateway warned (without logging the token).
    let log = g.log();
    assert!(
        log.contains("the API token file is readable by group or others") && !log.contains(TOKEN),
        "{log}"
    );

    // No --token-file (issue #20): the API still needs a token, the one the gateway generates
    // in its state directory, on any address (here 0.0.0.0).
    g.opts
        .extra
        .retain(|a| a != "--token-file" && !a.ends_with("/token"));
    g.opts.api = "0.0.0.0:7070".into();
    g.restart();
    let file = g.opts.state_dir.join(snatgw_lab::gateway::TOKEN_FILE);
    assert_eq!(file, g.opts.token_file());
    assert_eq!(
        snatgw_lab::gateway::TOKEN_FILE,
        snatgw_control::store::TOKEN_FILE
    );
    let generated = g.token.clone().expect("a generated token");
    assert_eq!(generated.len(), 64, "32 random bytes in hex");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let log = g.log();
    assert!(
        log.contains("API bearer token generated") && log.contains(&*file.to_string_lossy()),
        "{log}"
    );
    assert!(!log.contains(&generated), "the token is never logged");
    assert!(!log.contains("readable by group or others"), "{log}");
    for token in [None, Some(TOKEN.to_string())] {
        assert_eq!(
            status(g.api_as(token, |c| c.topology().map(drop))),
            Some(401)
        );
    }
    let t = g
        .api(|c| c.topology())
        .expect("GET /topology with the generated token");
    assert_eq!(t.generation, Some(1));
    // The next start reuses it.
    assert!(snatgw_lab::gateway::stop_gateway(
        &g.gw,
        Duration::from_secs(5)
    ));
    g.restart();
    assert_eq!(g.token.as_deref(), Some(generated.as_str()));
    assert!(g
        .log()
        .contains("API bearer token read from the state directory"));
    assert!(g.api(|c| c.metrics_text()).is_ok());
    g.finish();
}
