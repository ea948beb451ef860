//! The fleet on a real etcd (Debian `etcd-server` 3.4, one fresh server per test): the
//! coordination protocol of R10.1/R10.2 on `EtcdCoordinator`, what a node sees with etcd down
//! (R10.5), and `EtcdStore` as the control plane's `Store` with a watch every node follows.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::EtcdServer;
use snatgw_control::{seed, SeedSource, Store, StoreError, Stored};
use snatgw_core::ConfigFile;
use snatgw_fleet::rendezvous;
use snatgw_fleet::{
    Coordinator, EtcdCoordinator, EtcdOptions, EtcdStore, FleetError, LeaseConfig, LocalView,
    Member, MonotonicClock, NodeId, Resource, Revision,
};

const RPC_TIMEOUT: Duration = Duration::from_secs(2);

fn opts(srv: &EtcdServer, ttl_s: u64) -> EtcdOptions {
    let mut o = EtcdOptions::new(vec![srv.endpoint()]);
    o.lease = LeaseConfig::new(Duration::from_secs(ttl_s)).expect("lease");
    o.prefix = "/test".into();
    // Generous for a loaded test machine; the bound of a call is checked against it below.
    o.rpc_timeout = RPC_TIMEOUT;
    o
}

fn node(srv: &EtcdServer, name: &str, ttl_s: u64) -> EtcdCoordinator {
    EtcdCoordinator::connect(NodeId::new(name).expect("id"), opts(srv, ttl_s)).expect("connect")
}

fn id(s: &str) -> NodeId {
    NodeId::new(s).expect("id")
}

/// Retries `f` until it succeeds or `limit` passes (a client reconnecting after a restart).
fn retry<T>(limit: Duration, mut f: impl FnMut() -> Result<T, FleetError>) -> T {
    let end = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() < end => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("still failing after {limit:?}: {e}"),
        }
    }
}

#[test]
fn r10_1_etcd_membership_join_renew_leave_and_rendezvous_owner() {
    let Some(srv) = EtcdServer::start() else {
        return;
    };
    let clock = MonotonicClock::new();
    let a = node(&srv, "gw-a", 10);
    let b = node(&srv, "gw-b", 10);
    let c = node(&srv, "gw-c", 10);
    assert!(matches!(
        a.renew(clock.now()),
        Err(FleetError::NotJoined(_))
    ));
    for n in [&a, &b, &c] {
        let t = clock.now();
        let l = n.join(t).expect("join");
        assert_eq!(
            l.valid_until,
            t + Duration::from_secs(8),
            "sent + TTL - margin"
        );
    }
    assert_eq!(
        a.live_nodes(clock.now()).expect("nodes"),
        vec![id("gw-a"), id("gw-b"), id("gw-c")]
    );
    let t = clock.now();
    let l = a.renew(t).expect("renew");
    assert_eq!(l.valid_until, t + Duration::from_secs(8));
    // Every node computes the same owner from the same live set.
    for k in 0..20 {
        let r = Resource::Instance(format!("vm{k}"));
        let o = a.owner_of(&r, clock.now()).expect("owner");
        assert_eq!(o, c.owner_of(&r, clock.now()).expect("owner"));
        let live = b.live_nodes(clock.now()).expect("nodes");
        assert_eq!(o.as_ref(), rendezvous::owner(&r.rendezvous_key(), &live));
    }
    b.leave(clock.now()).expect("leave");
    assert_eq!(
        c.live_nodes(clock.now()).expect("nodes"),
        vec![id("gw-a"), id("gw-c")]
    );
    assert!(matches!(
        b.renew(clock.now()),
        Err(FleetError::NotJoined(_))
    ));
}

#[test]
fn r10_2_etcd_grants_are_fenced_by_revision_and_lease() {
    let Some(srv) = EtcdServer::start() else {
        return;
    };
    let clock = MonotonicClock::new();
    let a = node(&srv, "gw-a", 10);
    let b = node(&srv, "gw-b", 10);
    a.join(clock.now()).expect("join");
    b.join(clock.now()).expect("join");
    let res = Resource::Block {
        ip: Ipv4Addr::new(203, 0, 113, 9),
        first_port: 2048,
    };
    let read = a.read_grant(&res, clock.now()).expect("read");
    assert_eq!((read.holder.clone(), read.revision), (None, Revision(0)));
    let stale = b.read_grant(&res, clock.now()).expect("read");
    let g = a.grant(&read, clock.now()).expect("grant");
    assert!(g.revision > Revision(0));
    assert_eq!(g.holder.lease, a.lease_id().expect("lease"));
    // b's read is from before a's write: the revision no longer matches.
    match b.grant(&stale, clock.now()) {
        Err(FleetError::Conflict {
            expected, found, ..
        }) => {
            assert_eq!((expected, found), (Revision(0), g.revision));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Read again: a live lease holds it.
    let now_read = b.read_grant(&res, clock.now()).expect("read");
    assert_eq!(
        now_read.holder.as_ref().map(|h| h.node.clone()),
        Some(id("gw-a"))
    );
    assert!(matches!(
        b.grant(&now_read, clock.now()),
        Err(FleetError::Held { .. })
    ));
    // a gives it back; b takes it at a higher revision, and a's stale release fails.
    a.release(&g, clock.now()).expect("release");
    let r2 = b.read_grant(&res, clock.now()).expect("read");
    let g2 = b.grant(&r2, clock.now()).expect("grant");
    assert!(g2.revision > g.revision, "fencing tokens grow");
    assert!(matches!(
        a.release(&g, clock.now()),
        Err(FleetError::Conflict { .. })
    ));
    // The grant is bound to b's lease: b leaving frees it at once.
    b.leave(clock.now()).expect("leave");
    assert_eq!(a.read_grant(&res, clock.now()).expect("read").holder, None);
    // A node whose lease ended cannot grant itself anything (the lease compare fails).
    let other = node(&srv, "gw-d", 10);
    other.join(clock.now()).expect("join");
    let r = other
        .read_grant(&Resource::Instance("x".into()), clock.now())
        .expect("read");
    other.leave(clock.now()).expect("leave");
    assert!(matches!(
        other.grant(&r, clock.now()),
        Err(FleetError::NotJoined(_))
    ));
}

#[test]
fn r10_2_etcd_lease_end_frees_grants_only_after_the_local_fence() {
    let Some(srv) = EtcdServer::start() else {
        return;
    };
    let clock = MonotonicClock::new();
    let a = node(&srv, "gw-a", 2); // the minimum TTL: margin 400 ms, local validity 1.6 s
    let b = node(&srv, "gw-b", 2);
    let mut view_a = LocalView::new();
    view_a.set_lease(a.join(clock.now()).expect("join"));
    let res = Resource::Instance("vm1".into());
    view_a.add_grant(
        a.grant(&a.read_grant(&res, clock.now()).expect("read"), clock.now())
            .expect("grant"),
    );
    assert!(view_a.may_translate(&res, clock.now()));
    // b keeps its lease alive and polls; a stops renewing (paused or cut off).
    b.join(clock.now()).expect("join");
    let mut last_renew = clock.now();
    let freed_at = loop {
        let now = clock.now();
        assert!(
            now < Duration::from_secs(10),
            "a's lease never ended at etcd"
        );
        if now - last_renew > Duration::from_millis(400) {
            b.renew(now).expect("renew b");
            last_renew = now;
        }
        let r = b.read_grant(&res, now).expect("read");
        if r.holder.is_none() {
            let g = b.grant(&r, now).expect("b takes over");
            assert!(g.revision > Revision(0));
            break now;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // etcd freed the grant only after a had fenced itself on its own clock.
    let deadline = view_a.lease().expect("lease").valid_until;
    assert!(
        freed_at >= deadline,
        "freed at {freed_at:?}, a believed until {deadline:?}"
    );
    assert!(!view_a.may_translate(&res, freed_at));
    assert!(matches!(
        a.renew(clock.now()),
        Err(FleetError::LeaseExpired(_))
    ));
    // a joins again with a new lease; the grant stays b's.
    let l = a.join(clock.now()).expect("rejoin");
    view_a.set_lease(l);
    assert!(
        !view_a.may_translate(&res, clock.now()),
        "old grants are not inherited"
    );
    let r = a.read_grant(&res, clock.now()).expect("read");
    assert!(matches!(
        a.grant(&r, clock.now()),
        Err(FleetError::Held { .. })
    ));
}

#[test]
fn r10_5_etcd_down_is_unreachable_and_the_lease_survives_a_short_outage() {
    let Some(mut srv) = EtcdServer::start() else {
        return;
    };
    let clock = MonotonicClock::new();
    let a = node(&srv, "gw-a", 10);
    let mut view = LocalView::new();
    view.set_lease(a.join(clock.now()).expect("join"));
    let res = Resource::Instance("vm1".into());
    view.add_grant(
        a.grant(&a.read_grant(&res, clock.now()).expect("read"), clock.now())
            .expect("grant"),
    );
    srv.stop();
    let t0 = Instant::now();
    match a.renew(clock.now()) {
        Err(FleetError::Unreachable(_)) => {}
        other => panic!("expected unreachable, got {other:?}"),
    }
    assert!(
        t0.elapsed() < RPC_TIMEOUT + Duration::from_secs(1),
        "calls are bounded: {:?}",
        t0.elapsed()
    );
    // Every kind of call says the same thing while etcd is down, also after the first.
    for _ in 0..2 {
        assert!(matches!(
            a.renew(clock.now()),
            Err(FleetError::Unreachable(_))
        ));
        assert!(matches!(
            a.read_grant(&res, clock.now()),
            Err(FleetError::Unreachable(_))
        ));
        assert!(matches!(
            a.live_nodes(clock.now()),
            Err(FleetError::Unreachable(_))
        ));
        let read = snatgw_fleet::GrantRead {
            resource: Resource::Instance("vm2".into()),
            holder: None,
            revision: Revision(0),
        };
        assert!(matches!(
            a.grant(&read, clock.now()),
            Err(FleetError::Unreachable(_))
        ));
    }
    // The data path does not need etcd: the block is still this node's while the lease is.
    assert!(view.may_translate(&res, clock.now()));
    srv.restart();
    let l = retry(Duration::from_secs(5), || a.renew(clock.now()));
    view.set_lease(l);
    assert!(view.may_translate(&res, clock.now()));
    let r = a.read_grant(&res, clock.now()).expect("read");
    assert_eq!(r.holder.map(|h| h.node), Some(id("gw-a")));
}

fn state(g: u64) -> Stored {
    let mut config = ConfigFile::default();
    config.gateway.seed = g;
    Stored {
        generation: g,
        config,
        designations: Vec::new(),
    }
}

fn store(srv: &EtcdServer) -> EtcdStore {
    EtcdStore::connect(&opts(srv, 10)).expect("store")
}

#[test]
fn r10_1_etcd_store_keeps_generations_like_the_embedded_store() {
    let Some(srv) = EtcdServer::start() else {
        return;
    };
    let s = store(&srv);
    assert_eq!(s.load().expect("load"), None);
    let first = seed(&s, &ConfigFile::default()).expect("seed");
    assert_eq!(first.source, SeedSource::ConfigFile);
    assert_eq!(first.stored.generation, 1);
    assert_eq!(s.load().expect("load"), Some(first.stored.clone()));
    assert_eq!(
        seed(&s, &state(7).config).expect("seed").source,
        SeedSource::Store
    );
    s.save(&first.stored)
        .expect("the same record again is a no-op");
    // A save that does not raise the generation is refused and changes nothing.
    let err = s.save(&state(1)).expect_err("stale generation");
    assert!(err.to_string().contains("generation 1"), "{err}");
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                stored: 1,
                attempted: 1,
                ..
            }
        ),
        "{err:?}"
    );
    s.save(&state(2)).expect("save");
    assert_eq!(s.load().expect("load"), Some(state(2)));
    // A new connection (another process) reads the same.
    assert_eq!(store(&srv).load().expect("load"), Some(state(2)));
}

fn wait_for(
    rx: &tokio::sync::watch::Receiver<Option<Stored>>,
    g: u64,
    within: Duration,
) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if rx.borrow().as_ref().is_some_and(|s| s.generation >= g) {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!(
        "generation {g} not seen within {within:?}: {:?}",
        rx.borrow().as_ref().map(|s| s.generation)
    );
}

#[test]
fn r10_1_etcd_store_change_through_any_node_is_seen_by_every_node() {
    let Some(srv) = EtcdServer::start() else {
        return;
    };
    let nodes: Vec<EtcdStore> = (0..3).map(|_| store(&srv)).collect();
    let rxs: Vec<_> = nodes.iter().map(|n| n.subscribe()).collect();
    nodes[0].save(&state(1)).expect("save");
    for rx in &rxs {
        wait_for(rx, 1, Duration::from_secs(1));
    }
    nodes[1].save(&state(2)).expect("save");
    for rx in &rxs {
        wait_for(rx, 2, Duration::from_secs(1));
    }
    assert_eq!(rxs[2].borrow().clone(), Some(state(2)));
    // Two nodes write the next generation at once: exactly one wins.
    let mut a = state(3);
    a.config.gateway.seed = 100;
    let mut b = state(3);
    b.config.gateway.seed = 200;
    let (ra, rb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| nodes[0].save(&a));
        let hb = sc.spawn(|| nodes[2].save(&b));
        (ha.join().expect("thread"), hb.join().expect("thread"))
    });
    assert!(ra.is_ok() != rb.is_ok(), "{ra:?} {rb:?}");
    // The loser is told it lost to another node (the API answers 409), not that etcd failed.
    let lost = if ra.is_ok() { &rb } else { &ra };
    assert!(
        matches!(
            lost,
            Err(StoreError::Conflict {
                stored: 3,
                attempted: 3,
                ..
            })
        ),
        "{lost:?}"
    );
    let winner = if ra.is_ok() { a } else { b };
    for rx in &rxs {
        wait_for(rx, 3, Duration::from_secs(1));
        assert_eq!(rx.borrow().clone(), Some(winner.clone()));
    }
}

#[test]
fn r10_5_etcd_store_refuses_writes_while_down_and_watches_resume_after() {
    let Some(mut srv) = EtcdServer::start() else {
        return;
    };
    let nodes: Vec<EtcdStore> = (0..3).map(|_| store(&srv)).collect();
    let rxs: Vec<_> = nodes.iter().map(|n| n.subscribe()).collect();
    nodes[0].save(&state(1)).expect("save");
    for rx in &rxs {
        wait_for(rx, 1, Duration::from_secs(1));
    }
    srv.stop();
    let err = nodes[1].save(&state(2)).expect_err("etcd is down");
    assert!(err.to_string().contains("etcd unreachable"), "{err}");
    assert!(
        matches!(&err, StoreError::Unreachable { store, .. } if store == "etcd"),
        "{err:?}"
    );
    // What the nodes run on stays what they had.
    assert_eq!(rxs[2].borrow().as_ref().map(|s| s.generation), Some(1));
    srv.restart();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match nodes[1].save(&state(2)) {
            Ok(()) => break,
            Err(e) if Instant::now() < end => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("save after etcd came back: {e}"),
        }
    }
    for (i, rx) in rxs.iter().enumerate() {
        let took = wait_for(rx, 2, Duration::from_secs(1));
        eprintln!("node {i} saw generation 2 after {took:?}");
    }
}

#[test]
fn r10_1_etcd_three_members_converge_and_take_over_a_crashed_one_within_ttl_plus_2s() {
    let Some(srv) = EtcdServer::start() else {
        return;
    };
    let clock = MonotonicClock::new();
    let res: Vec<Resource> = (0..12)
        .map(|i| Resource::Instance(format!("vm{i}")))
        .collect();
    let mut members: Vec<Option<Member<EtcdCoordinator>>> = (0..3)
        .map(|i| Some(Member::new(node(&srv, &format!("gw{i}"), 2))))
        .collect();
    // Ticks every 200 ms; at every step at most one member believes in each resource.
    let step = |members: &mut Vec<Option<Member<EtcdCoordinator>>>| {
        for m in members.iter_mut().flatten() {
            m.tick(clock.now(), &res);
        }
        let now = clock.now();
        for r in &res {
            let n = members
                .iter()
                .flatten()
                .filter(|m| m.may_translate(r, now))
                .count();
            assert!(n <= 1, "{r} believed by {n} members");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let held_by = |members: &Vec<Option<Member<EtcdCoordinator>>>, r: &Resource| -> Option<usize> {
        let now = clock.now();
        members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.may_translate(r, now)))
    };
    for _ in 0..5 {
        step(&mut members);
    }
    let live: Vec<NodeId> = (0..3).map(|i| id(&format!("gw{i}"))).collect();
    for r in &res {
        let owner = rendezvous::owner(&r.rendezvous_key(), &live).expect("owner");
        let i = held_by(&members, r).unwrap_or_else(|| panic!("{r} not held"));
        assert_eq!(live[i], *owner, "{r}");
    }
    let victim = 0;
    let lost: Vec<Resource> = res
        .iter()
        .filter(|r| held_by(&members, r) == Some(victim))
        .cloned()
        .collect();
    assert!(!lost.is_empty());
    // kill -9: no leave, no more renewals.
    members[victim] = None;
    let killed = Instant::now();
    while !lost.iter().all(|r| held_by(&members, r).is_some()) {
        assert!(
            killed.elapsed() < Duration::from_secs(4),
            "not taken over within TTL + 2 s"
        );
        step(&mut members);
    }
    let took = killed.elapsed();
    eprintln!("taken over after {took:?}");
    assert!(
        took >= Duration::from_millis(1600),
        "taken before the victim's lease could end: {took:?}"
    );
    // It restarts (same id, new lease): its instances come back to it, and only those.
    members[victim] = Some(Member::new(node(&srv, "gw0", 2)));
    let back = Instant::now();
    while !lost.iter().all(|r| held_by(&members, r) == Some(victim)) {
        assert!(back.elapsed() < Duration::from_secs(4), "not given back");
        step(&mut members);
    }
    for r in res.iter().filter(|r| !lost.contains(r)) {
        assert_ne!(held_by(&members, r), Some(victim), "{r}");
    }
}
