//! Topology changes the planner makes: resizing a pool, adding ILPIPs, splitting a backend
//! pool over more frontends (SPEC §8's mitigations, R2.8's tiers).
//!
//! Each function takes a configuration and returns a changed copy, or says why it does not
//! apply ([`TopoError`]); the engine validates the result as it would any configuration. Added
//! instances are placeholders named `plan-fill-N` (they send nothing; they only count in the
//! pool, R2.8); added public IPs are `plan-pip-N` with free addresses of the documentation
//! ranges. Nothing here runs the engine beyond reading a report.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use snatgw_core::config::{
    BackendPoolCfg, ConfigFile, FrontendCfg, InstanceCfg, InstanceKind, PublicIpCfg,
};
use snatgw_core::topology::parse_prefix;
use snatgw_core::{Engine, Scenario};

use crate::error::TopoError;

/// Which pool an instance's public IP is shared by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum PoolRef {
    /// Backend pool `pool` of load balancer `lb` (R1.2).
    Lb {
        /// Load balancer.
        lb: String,
        /// Backend pool.
        pool: String,
    },
    /// Availability set (R1.3).
    Set(String),
    /// Classic deployment (R1.3).
    Deployment(String),
}

/// The pool of instance `name` as the engine resolved it, or why it has none.
pub fn pool_of(cfg: &ConfigFile, engine: &Engine, name: &str) -> Result<PoolRef, TopoError> {
    let rep = engine
        .instance(name)
        .ok_or_else(|| TopoError::UnknownInstance(name.into()))?;
    let ic = cfg
        .instance
        .iter()
        .find(|i| i.name == name)
        .ok_or_else(|| TopoError::NotConfigured(name.into()))?;
    match rep.scenario {
        Scenario::Ilpip { .. } => Err(TopoError::Ilpip(name.into())),
        Scenario::LoadBalanced { ref lb, .. } => {
            let l = cfg
                .load_balancer
                .iter()
                .find(|l| &l.name == lb)
                .ok_or_else(|| TopoError::MissingLoadBalancer(lb.clone()))?;
            let pool = l
                .backend_pools
                .iter()
                .find(|p| {
                    p.members.iter().any(|m| m == name)
                        && l.rules.iter().any(|r| r.backend_pool == p.name)
                })
                .ok_or_else(|| TopoError::NoRuledPool {
                    lb: lb.clone(),
                    instance: name.into(),
                })?;
            Ok(PoolRef::Lb {
                lb: lb.clone(),
                pool: pool.name.clone(),
            })
        }
        Scenario::DefaultSnat { .. } => {
            if let Some(s) = &ic.availability_set {
                Ok(PoolRef::Set(s.clone()))
            } else if let Some(d) = &ic.deployment {
                Ok(PoolRef::Deployment(d.clone()))
            } else {
                Err(TopoError::OwnPool(name.into()))
            }
        }
        _ => Err(TopoError::UnknownScenario(name.into())),
    }
}

fn in_pool(cfg: &ConfigFile, p: &PoolRef, i: &InstanceCfg) -> bool {
    match p {
        PoolRef::Lb { lb, pool } => cfg.load_balancer.iter().any(|l| {
            &l.name == lb
                && l.backend_pools
                    .iter()
                    .any(|b| &b.name == pool && b.members.contains(&i.name))
        }),
        PoolRef::Set(s) => i.availability_set.as_deref() == Some(s) && i.public_ip.is_none(),
        PoolRef::Deployment(d) => i.deployment.as_deref() == Some(d) && i.public_ip.is_none(),
    }
}

/// Free private addresses of the VNet's first prefix (not used by any instance).
fn free_private(cfg: &ConfigFile) -> Result<impl Iterator<Item = Ipv4Addr>, TopoError> {
    let used: BTreeSet<String> = cfg.instance.iter().map(|i| i.private_ip.clone()).collect();
    let first = cfg
        .gateway
        .vnet_prefixes
        .first()
        .ok_or(TopoError::NoVnetPrefix)?;
    let p = parse_prefix("gateway.vnet_prefixes", first)?;
    let size = if p.len >= 32 {
        1u64
    } else {
        1u64 << (32 - p.len)
    };
    let base = p.addr;
    Ok((1..size.saturating_sub(1))
        .map(move |k| Ipv4Addr::from(base.wrapping_add(k as u32)))
        .filter(|a| a.octets()[3] != 0 && a.octets()[3] != 255)
        .filter(move |a| !used.contains(&a.to_string())))
}

/// Free public addresses (documentation ranges, from the top), not used by the
/// configuration or in `avoid`.
pub fn free_public(cfg: &ConfigFile, avoid: &[u32]) -> impl Iterator<Item = Ipv4Addr> {
    let mut used: BTreeSet<u32> = avoid.iter().copied().collect();
    for p in &cfg.public_ip {
        if let Ok(a) = p.address.parse::<Ipv4Addr>() {
            used.insert(a.into());
        }
    }
    for p in &cfg.gateway.default_snat_pool {
        if let Ok(a) = p.parse::<Ipv4Addr>() {
            used.insert(a.into());
        }
    }
    [[203u8, 0, 113], [198, 51, 100], [192, 0, 2]]
        .into_iter()
        .flat_map(|n| {
            (1..=254u8)
                .rev()
                .map(move |h| Ipv4Addr::new(n[0], n[1], n[2], h))
        })
        .filter(move |a| !used.contains(&u32::from(*a)))
}

fn fresh_name(cfg: &ConfigFile, prefix: &str, k: &mut usize, public: bool) -> String {
    loop {
        let n = format!("{prefix}{k}");
        *k += 1;
        let taken = if public {
            cfg.public_ip.iter().any(|p| p.name == n)
        } else {
            cfg.instance.iter().any(|i| i.name == n)
        };
        if !taken {
            return n;
        }
    }
}

/// `cfg` with the pool that shares instance `name`'s public IP resized to `size` instances:
/// placeholders are added, or instances not in `keep` removed (placeholders first).
pub fn resize_pool(
    cfg: &ConfigFile,
    engine: &Engine,
    name: &str,
    size: u32,
    keep: &[String],
) -> Result<ConfigFile, TopoError> {
    let pool = pool_of(cfg, engine, name)?;
    let current = engine.instance(name).map_or(0, |r| r.pool_size);
    let mut out = cfg.clone();
    let proto = cfg
        .instance
        .iter()
        .find(|i| i.name == name)
        .cloned()
        .ok_or_else(|| TopoError::NotConfigured(name.into()))?;
    if size > current {
        let add = (size - current) as usize;
        let addrs: Vec<Ipv4Addr> = free_private(cfg)?.take(add).collect();
        if addrs.len() < add {
            return Err(TopoError::NoRoom {
                prefix: cfg.gateway.vnet_prefixes[0].clone(),
                count: add,
            });
        }
        let mut k = 0;
        for a in addrs {
            let n = fresh_name(&out, "plan-fill-", &mut k, false);
            out.instance.push(InstanceCfg {
                name: n.clone(),
                private_ip: a.to_string(),
                public_ip: None,
                max_flows: None,
                ..proto.clone()
            });
            if let PoolRef::Lb { lb, pool } = &pool {
                if let Some(b) = out
                    .load_balancer
                    .iter_mut()
                    .filter(|l| &l.name == lb)
                    .flat_map(|l| l.backend_pools.iter_mut())
                    .find(|b| &b.name == pool)
                {
                    b.members.push(n);
                }
            }
        }
    } else if size < current {
        let remove = (current - size) as usize;
        let mut cands: Vec<String> = cfg
            .instance
            .iter()
            .filter(|i| in_pool(cfg, &pool, i) && !keep.contains(&i.name))
            .map(|i| i.name.clone())
            .collect();
        // Placeholders first, then the last configured.
        cands.sort_by_key(|n| !n.starts_with("plan-fill-"));
        if cands.len() < remove {
            return Err(TopoError::CannotShrink {
                instance: name.into(),
                size,
                outside: cands.len(),
                current,
            });
        }
        let gone: BTreeSet<String> = cands.into_iter().take(remove).collect();
        out.instance.retain(|i| !gone.contains(&i.name));
        for l in &mut out.load_balancer {
            for b in &mut l.backend_pools {
                b.members.retain(|m| !gone.contains(m));
            }
        }
    }
    Ok(out)
}

/// `cfg` with an ILPIP for each of `names` that can have one (R1.1; not a web/worker role,
/// R1.5). Returns the configuration and the names that got one.
pub fn add_ilpips(cfg: &ConfigFile, names: &[String], avoid: &[u32]) -> (ConfigFile, Vec<String>) {
    let mut out = cfg.clone();
    let mut addrs = free_public(cfg, avoid);
    let mut done = Vec::new();
    let mut k = 0;
    for n in names {
        let Some(idx) = out.instance.iter().position(|i| &i.name == n) else {
            continue;
        };
        if out.instance[idx].public_ip.is_some()
            || out.instance[idx].kind == InstanceKind::WebWorkerRole
        {
            continue;
        }
        let Some(a) = addrs.next() else { break };
        let pn = fresh_name(&out, "plan-pip-", &mut k, true);
        out.public_ip.push(PublicIpCfg {
            name: pn.clone(),
            address: a.to_string(),
        });
        out.instance[idx].public_ip = Some(pn);
        done.push(n.clone());
    }
    (out, done)
}

/// `cfg` with the backend pool of each load-balanced instance of `names` split into `k`
/// pools, each with its own new frontend (a new public IP) and copies of the pool's rules:
/// each frontend's pool is then about 1/k of the instances, so its tier (R2.8) may give more
/// ports. Returns the configuration and the pools split.
pub fn split_frontends(
    cfg: &ConfigFile,
    engine: &Engine,
    names: &[String],
    k: u32,
    avoid: &[u32],
) -> (ConfigFile, Vec<String>) {
    let mut pools = BTreeSet::new();
    for n in names {
        if let Ok(PoolRef::Lb { lb, pool }) = pool_of(cfg, engine, n) {
            pools.insert((lb, pool));
        }
    }
    let mut out = cfg.clone();
    let mut addrs = free_public(cfg, avoid);
    let mut kk = 0;
    let mut split = Vec::new();
    for (lb, pool) in pools {
        let Some(l) = out.load_balancer.iter().position(|l| l.name == lb) else {
            continue;
        };
        let Some(bi) = out.load_balancer[l]
            .backend_pools
            .iter()
            .position(|b| b.name == pool)
        else {
            continue;
        };
        let members = out.load_balancer[l].backend_pools[bi].members.clone();
        let rules: Vec<_> = out.load_balancer[l]
            .rules
            .iter()
            .filter(|r| r.backend_pool == pool)
            .cloned()
            .collect();
        let mut parts: Vec<Vec<String>> = vec![Vec::new(); k as usize];
        for (i, m) in members.into_iter().enumerate() {
            parts[i % k as usize].push(m);
        }
        out.load_balancer[l].backend_pools[bi].members = parts[0].clone();
        for (j, part) in parts.into_iter().enumerate().skip(1) {
            let Some(a) = addrs.next() else { break };
            let pn = fresh_name(&out, "plan-pip-", &mut kk, true);
            out.public_ip.push(PublicIpCfg {
                name: pn.clone(),
                address: a.to_string(),
            });
            let fe = format!("plan-fe-{j}");
            let bp = format!("{pool}-plan-{j}");
            let lbm = &mut out.load_balancer[l];
            lbm.frontends.push(FrontendCfg {
                name: fe.clone(),
                public_ip: pn,
            });
            lbm.backend_pools.push(BackendPoolCfg {
                name: bp.clone(),
                members: part,
            });
            for r in &rules {
                let mut r2 = r.clone();
                r2.name = format!("{}-plan-{j}", r.name);
                r2.frontend = fe.clone();
                r2.backend_pool = bp.clone();
                lbm.rules.push(r2);
            }
        }
        split.push(format!("{lb}/{pool}"));
    }
    (out, split)
}
