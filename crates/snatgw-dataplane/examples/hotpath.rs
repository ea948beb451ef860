//! Drives `Gateway::process` on one established flow, for instruction counting:
//! `valgrind --tool=callgrind --toggle-collect='*Gateway::process*' target/release/examples/hotpath`.
use snatgw_core::{Direction, Verdict};
use snatgw_dataplane::fuzzing::gateway;
use snatgw_wire::testutil::{tcp_data, tcp_syn};

fn main() {
    let mut g = gateway();
    let (src, dst) = (0x0a00_030a, 0xc633_6407);
    let mut syn = tcp_syn(src, 40000, dst, 443);
    assert!(matches!(
        g.process(0, &mut syn, Direction::Outbound),
        Verdict::Translate { .. }
    ));
    let pkt = tcp_data(src, 40000, dst, 443, &[0xab; 24]);
    let mut buf = pkt.clone();
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    for _ in 0..n {
        buf.copy_from_slice(&pkt);
        std::hint::black_box(g.process(1, std::hint::black_box(&mut buf), Direction::Outbound));
    }
}
