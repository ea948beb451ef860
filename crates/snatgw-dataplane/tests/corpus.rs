//! The fuzz corpus (`fuzz/corpus/gateway`): replayed on every `cargo test`, so an input that
//! once crashed the gateway fails CI if it ever does again. The seed inputs are real packets
//! written by `write_seed_corpus` (run with `--ignored` to regenerate them).

use std::path::PathBuf;

use snatgw_dataplane::fuzzing::{encode, run_input};
use snatgw_wire::testutil::*;

/// A named seed: packets as `(inbound, seconds to advance, bytes)`.
type Seed = (&'static str, Vec<(bool, u8, Vec<u8>)>);

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/gateway")
}

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<std::net::Ipv4Addr>().expect("addr"))
}

#[test]
fn replay_committed_corpus() {
    let (mut n, mut translated, mut verified) = (0, 0, 0);
    for entry in std::fs::read_dir(corpus_dir()).expect("fuzz/corpus/gateway exists") {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("read");
        // Panics, naming the checksum, if a translation breaks one (see fuzzing::run_one).
        let c = run_input(&data);
        translated += c.translated;
        verified += c.checksums_verified;
        n += 1;
    }
    assert!(
        n >= 12,
        "the seed corpus has at least the 12 real-packet seeds, found {n}"
    );
    // The checksum check must really run: the real-packet seeds alone translate dozens of
    // packets with valid checksums (SYN, data, FIN, UDP both ways, ICMP errors, ESP, echo).
    assert!(
        verified >= 30 && verified <= translated,
        "checksums verified on {verified} of {translated} translated packets"
    );
    eprintln!("corpus: {n} inputs, {translated} translated, {verified} checksums verified");
}

#[test]
#[ignore = "writes the seed corpus; run once with --ignored"]
fn write_seed_corpus() {
    let (vm, ilpip_vm, remote) = (ip("10.0.3.10"), ip("10.0.1.10"), ip("198.51.100.7"));
    // vm-as1's first SNAT mapping in the reference topology.
    let (pubip, pport) = (ip("192.0.2.100"), 1024u16);
    let ilpip = ip("203.0.113.10");
    let sp = |src, dst| Ipv4Spec {
        src,
        dst,
        ..Ipv4Spec::default()
    };
    let syn = tcp_syn(vm, 40000, remote, 443);
    let udp_out = udp(vm, 5353, remote, 53, b"query");
    let translated_udp = udp(pubip, pport, remote, 53, b"query");
    // The seeds assume vm-as1's first mapping; check it so they keep hitting real flows.
    let mut g = snatgw_dataplane::fuzzing::gateway();
    let mut b = syn.clone();
    assert_eq!(
        g.process(0, &mut b, snatgw_core::Direction::Outbound),
        snatgw_core::Verdict::Translate {
            addr: pubip,
            port: pport
        }
    );
    let big = udp(vm, 6000, remote, 53, &[7u8; 3000]);
    let frags = fragment(&big, 1000);
    let opts = build_tcp(
        &Ipv4Spec {
            src: vm,
            dst: remote,
            options: vec![1, 1, 1, 0],
            ..Ipv4Spec::default()
        },
        &TcpSpec {
            src_port: 41000,
            dst_port: 80,
            flags: 0x02,
            options: vec![2, 4, 5, 0xb4],
            ..TcpSpec::default()
        },
        b"",
    );
    let seeds: Vec<Seed> = vec![
        ("tcp_syn", vec![(false, 0, syn.clone())]),
        (
            "tcp_handshake_data",
            vec![
                (false, 0, syn.clone()),
                (
                    true,
                    0,
                    build_tcp(
                        &sp(remote, pubip),
                        &TcpSpec {
                            src_port: 443,
                            dst_port: pport,
                            flags: 0x12,
                            ..TcpSpec::default()
                        },
                        b"",
                    ),
                ),
                (
                    false,
                    1,
                    tcp_data(vm, 40000, remote, 443, b"GET / HTTP/1.1\r\n\r\n"),
                ),
            ],
        ),
        (
            "tcp_fin_both",
            vec![
                (false, 0, syn.clone()),
                (false, 1, tcp_fin(vm, 40000, remote, 443)),
                (true, 1, tcp_fin(remote, 443, pubip, pport)),
            ],
        ),
        (
            "tcp_rst",
            vec![
                (false, 0, syn.clone()),
                (true, 2, tcp_rst(remote, 443, pubip, pport)),
            ],
        ),
        (
            "tcp_not_syn",
            vec![(false, 0, tcp_data(vm, 40001, remote, 443, b"x"))],
        ),
        (
            "udp_out_back",
            vec![
                (false, 0, udp_out.clone()),
                (true, 1, udp(remote, 53, pubip, pport, b"answer")),
            ],
        ),
        (
            "icmp_port_unreachable",
            vec![
                (false, 0, udp_out.clone()),
                (
                    true,
                    0,
                    build_icmp_dest_unreachable(&sp(remote, pubip), 3, &translated_udp, 28),
                ),
            ],
        ),
        (
            "icmp_frag_needed",
            vec![
                (false, 0, syn.clone()),
                (
                    true,
                    0,
                    build_icmp_frag_needed(
                        &sp(remote, pubip),
                        1280,
                        &tcp_syn(pubip, pport, remote, 443),
                        48,
                    ),
                ),
            ],
        ),
        (
            "icmp_time_exceeded",
            vec![
                (false, 0, udp_out.clone()),
                (
                    true,
                    0,
                    build_icmp_time_exceeded(&sp(remote, pubip), &translated_udp, 576),
                ),
            ],
        ),
        (
            "esp_ilpip",
            vec![
                (false, 0, build_esp(&sp(ilpip_vm, remote), 1, 1, &[0; 32])),
                (true, 0, build_esp(&sp(remote, ilpip), 2, 1, &[0; 32])),
            ],
        ),
        (
            "icmp_echo",
            vec![
                (false, 0, icmp_echo_request(ilpip_vm, remote, 9, 1)),
                (false, 0, icmp_echo_request(vm, remote, 9, 1)),
            ],
        ),
        // Out of order first (strays dropped), then in order (followed).
        (
            "fragments",
            frags
                .iter()
                .rev()
                .chain(frags.iter())
                .map(|f| (false, 0, f.clone()))
                .collect(),
        ),
        ("ipv4_tcp_options", vec![(false, 0, opts)]),
        (
            "idle_expiry",
            vec![
                (false, 0, udp_out.clone()),
                (false, 127, udp_out.clone()),
                (false, 127, udp_out.clone()),
                (true, 0, udp(remote, 53, pubip, pport, b"late")),
            ],
        ),
    ];
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (name, recs) in seeds {
        std::fs::write(dir.join(format!("seed_{name}")), encode(&recs)).expect("write");
    }
}
