//! `snatgw show`: the first main job. Prints the engine's decision per instance; a bad file
//! exits non-zero with an error naming the field and the SPEC rule.

use std::process::Command;

fn snatgw() -> Command {
    Command::new(env!("CARGO_BIN_EXE_snatgw"))
}

fn reference() -> String {
    format!(
        "{}/../../examples/reference.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn show_prints_scenario_ip_ports_block_and_rule_per_instance() {
    let out = snatgw()
        .args(["show", "--config", &reference()])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{text}"))
            .to_string()
    };
    let ilpip = row("vm-ilpip");
    for want in ["ilpip", "R1.1", "203.0.113.10", "65535/65535", "all ports"] {
        assert!(ilpip.contains(want), "{want} missing in: {ilpip}");
    }
    let lb = row("vm-lb1");
    assert!(
        lb.contains("load_balanced") && lb.contains("R1.2") && lb.contains("1024/1024"),
        "{lb}"
    );
    let set = row("vm-as1");
    assert!(
        set.contains("default_snat")
            && set.contains("R1.3")
            && set.contains("192.0.2.100")
            && set.contains("1024-2047"),
        "{set}"
    );
    assert!(row("role-0").contains("web_worker_role"));
}

#[test]
fn show_json_is_machine_readable() {
    let out = snatgw()
        .args(["show", "--config", &reference(), "--json"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let items = v["instances"].as_array().expect("instances");
    assert_eq!(items.len(), 7);
    let as2 = items
        .iter()
        .find(|i| i["name"] == "vm-as2")
        .expect("vm-as2");
    assert_eq!(as2["rule"], "R1.3");
    assert_eq!(as2["ports"]["tcp"], 1024);
    assert_eq!(as2["block"][0][0], 2048);
}

#[test]
fn r1_5_show_refuses_a_bad_file_with_field_and_rule() {
    let text = std::fs::read_to_string(reference()).expect("read").replace(
        "deployment = \"cs1\"\nprivate_ip",
        "deployment = \"cs1\"\npublic_ip = \"pip-ilpip\"\nprivate_ip",
    );
    let dir = std::env::temp_dir().join(format!("snatgw-show-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, text).expect("write");
    let out = snatgw()
        .args(["show", "--config", bad.to_str().expect("path")])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("instance[role-0].public_ip") && err.contains("R1.5"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    // A file that is not there, and one that is not TOML.
    assert!(!snatgw()
        .args(["show", "--config", "/nonexistent.toml"])
        .status()
        .expect("run")
        .success());
    std::fs::write(&bad, "[[instance]\n").expect("write");
    let out = snatgw()
        .args(["show", "--config", bad.to_str().expect("path")])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config file"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn show_lists_nsgs_and_inbound_rules_with_their_probes() {
    let mut text = std::fs::read_to_string(reference()).unwrap();
    text.push_str(
        r#"
[[nsg]]
name = "n1"
nics = ["vm-as1"]
rules = [ { name = "no-web", priority = 100, direction = "outbound", access = "deny", protocol = "tcp", destinations = ["198.51.100.0/24"] } ]
"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("with-nsg.toml");
    std::fs::write(&path, text).unwrap();
    let out = snatgw()
        .args(["show", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    assert!(
        text.contains("nsg n1: nics vm-as1, subnets -; 1 rule(s) + 6 default (R4.1, R4.2)"),
        "{text}"
    );
    assert!(
        text.contains("inbound rule lb/http: tcp 203.0.113.20:80 -> pool web port 80, idle 4 min (R5.1, R3.7); no probe"),
        "{text}"
    );
    assert!(
        text.contains("inbound rule lb/https: tcp 203.0.113.21:443"),
        "{text}"
    );
}
