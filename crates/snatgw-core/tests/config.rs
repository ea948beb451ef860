//! Configuration validation: every refusal is typed, names the field (and the SPEC rule where
//! one is the reason), and leaves a running engine untouched.

mod common;

use common::*;
use snatgw_core::{ConfigError, Engine, Topology};

fn refuse(toml: &str) -> ConfigError {
    Topology::from_toml(toml).expect_err("must be refused")
}

#[test]
fn unknown_references_name_the_field() {
    let e = refuse(&REFERENCE.replace("public_ip = \"pip-ilpip\"", "public_ip = \"nope\""));
    assert_eq!(
        e,
        ConfigError::UnknownReference {
            field: "instance[vm-ilpip].public_ip".into(),
            what: "public_ip",
            name: "nope".into()
        }
    );
    let e = refuse(&REFERENCE.replace(
        "availability_set = \"as1\"\n\n[[instance]]\nname = \"vm-as2\"",
        "availability_set = \"as9\"\n\n[[instance]]\nname = \"vm-as2\"",
    ));
    assert!(
        matches!(e, ConfigError::UnknownReference { ref field, what: "availability_set", .. } if field == "instance[vm-as1].availability_set"),
        "{e}"
    );
    let e = refuse(&REFERENCE.replace(
        "members = [\"vm-lb1\", \"vm-lb2\"]",
        "members = [\"vm-lb1\", \"ghost\"]",
    ));
    assert!(
        matches!(e, ConfigError::UnknownReference { ref field, what: "instance", .. } if field == "load_balancer[lb].backend_pools[web].members"),
        "{e}"
    );
    let e = refuse(&REFERENCE.replace("frontend = \"fe2\"", "frontend = \"fe3\""));
    assert!(
        matches!(e, ConfigError::UnknownReference { ref field, .. } if field == "load_balancer[lb].rules[https].frontend"),
        "{e}"
    );
    let e = refuse(&REFERENCE.replace(
        "deployment = \"cs1\"\nprivate_ip",
        "deployment = \"cs2\"\nprivate_ip",
    ));
    assert!(
        matches!(
            e,
            ConfigError::UnknownReference {
                what: "deployment",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn duplicate_and_overlapping_addresses_are_refused() {
    // Two instances, one private address.
    let e = refuse(&REFERENCE.replace("private_ip = \"10.0.2.11\"", "private_ip = \"10.0.2.10\""));
    assert!(
        matches!(e, ConfigError::DuplicateAddress { ref field, ref other, .. } if field == "instance[vm-lb2].private_ip" && other == "instance[vm-lb1]"),
        "{e}"
    );
    // A public IP that is also in the default pool.
    let e = refuse(&REFERENCE.replace(
        "\"192.0.2.100\", \"192.0.2.101\"",
        "\"192.0.2.100\", \"203.0.113.20\"",
    ));
    assert!(
        matches!(e, ConfigError::DuplicateAddress { ref field, .. } if field == "gateway.default_snat_pool[1]"),
        "{e}"
    );
    // A public address inside the virtual network.
    let e = refuse(&REFERENCE.replace("address = \"203.0.113.10\"", "address = \"10.0.200.1\""));
    assert!(
        matches!(e, ConfigError::DuplicateAddress { ref other, .. } if other.contains("virtual network")),
        "{e}"
    );
    // One ILPIP for two instances (1:1, R1.1).
    let e = refuse(&REFERENCE.replace(
        "name = \"vm-alone\"\nprivate_ip = \"10.0.3.20\"",
        "name = \"vm-alone\"\nprivate_ip = \"10.0.3.20\"\npublic_ip = \"pip-ilpip\"",
    ));
    assert!(e.to_string().contains("R1.1"), "{e}");
    // An ILPIP that is also a frontend.
    let e = refuse(&REFERENCE.replace("public_ip = \"pip-fe2\"", "public_ip = \"pip-ilpip\""));
    assert!(
        matches!(e, ConfigError::DuplicateAddress { ref other, .. } if other == "instance[vm-ilpip].public_ip"),
        "{e}"
    );
    // A private address outside the VNet, and duplicate names.
    assert!(matches!(
        refuse(&REFERENCE.replace("10.0.3.20", "172.16.0.1")),
        ConfigError::Invalid { .. }
    ));
    assert!(matches!(
        refuse(&REFERENCE.replace("name = \"vm-as2\"", "name = \"vm-as1\"")),
        ConfigError::DuplicateName { .. }
    ));
}

#[test]
fn model_rules_and_ranges_are_checked() {
    // A web/worker role must be Classic; Classic needs a deployment; LB timeout 4-30 (R3.7).
    let e = refuse(&REFERENCE.replace(
        "kind = \"web_worker_role\"\nmodel = \"classic\"",
        "kind = \"web_worker_role\"\nmodel = \"arm\"",
    ));
    assert!(matches!(e, ConfigError::Model { .. }), "{e}");
    let e = refuse(&REFERENCE.replace(
        "backend_port = 443 }",
        "backend_port = 443, idle_timeout_minutes = 31 }",
    ));
    assert!(e.to_string().contains("R3.7"), "{e}");
    let e = refuse(&REFERENCE.replace("seed = 7", "seed = 7\nidle_timeout_secs = 0"));
    assert!(
        matches!(e, ConfigError::Invalid { ref field, .. } if field == "gateway.idle_timeout_secs"),
        "{e}"
    );
    // Unknown fields are refused, not ignored.
    assert!(matches!(
        refuse(&REFERENCE.replace("seed = 7", "seed = 7\nidle_timout_secs = 5")),
        ConfigError::Parse(_)
    ));
}

#[test]
fn a_refused_apply_leaves_the_running_engine_untouched() {
    let mut e = reference();
    let (pa, pp) = syn(&mut e, 1, ip("10.0.3.10"), 4000, ip("198.51.100.7"), 443);
    let before = (e.instances(), e.flows(None), e.live_flows());
    // Valid on its own, but the engine cannot place it: 600 + 600 instances in two sets on one
    // default-SNAT address would exceed 1000 (R2.8) — refused at apply time.
    let mut c = pool_config(600);
    for i in 600..1200 {
        c.instance.push(vm(i, Some("other")));
    }
    c.availability_set
        .push(snatgw_core::config::AvailabilitySetCfg {
            name: "other".into(),
        });
    let topo = Topology::from_config(c).expect("each set fits on its own");
    let err = e.apply(2, topo).expect_err("no address has room");
    assert!(
        matches!(err, ConfigError::PoolTooLarge { ref field, .. } if field == "gateway.default_snat_pool"),
        "{err}"
    );
    assert_eq!((e.instances(), e.flows(None), e.live_flows()), before);
    assert_eq!(
        translated(inb(
            &mut e,
            3,
            snatgw_core::Packet::tcp(ip("198.51.100.7"), 443, pa, pp, ACK)
        )),
        (ip("10.0.3.10"), 4000)
    );
    let _ = Engine::new(Topology::from_toml(REFERENCE).expect("valid"), 0).expect("engine");
}
