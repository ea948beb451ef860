#![allow(missing_docs)]
//! R11.1 benchmark: restoring one million flows (issue #18, goal ≤ 1 s). The fixture's
//! 1000 instances with 1000 flows each are exported, encoded, decoded and imported into a
//! fresh engine with the same topology, as `snatgw run` does at start; each phase is timed
//! separately (wall time, `Instant`) over three rounds, min / median / max.
//!
//! Run: `cargo bench -p snatgw-core --bench restore`. Exactness of a restore is proven by
//! the rule tests in `tests/persist.rs` and `r11_1_restored_engine_keeps_every_invariant`.

mod fixture;

use std::time::{Duration, Instant};

use fixture::{loaded, topology};
use snatgw_core::engine::persist::FlowState;
use snatgw_core::Engine;

fn mmm(v: &mut [Duration]) -> String {
    v.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{:8.1} {:8.1} {:8.1}",
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    )
}

fn main() {
    let e = loaded(1000);
    let flows = e.live_flows();
    assert_eq!(flows, 1_000_000);
    let (mut export, mut encode, mut decode, mut import, mut total) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut bytes_len = 0;
    for round in 0..3u64 {
        let t = Instant::now();
        let st = e.export_state();
        export.push(t.elapsed());
        let t = Instant::now();
        let mut b = Vec::new();
        st.encode(&mut b);
        encode.push(t.elapsed());
        bytes_len = b.len();
        drop(st);
        // What a start does: read the bytes, build the engine, import.
        let t0 = Instant::now();
        let back = FlowState::decode(&b).expect("decode");
        decode.push(t0.elapsed());
        let t = Instant::now();
        let mut r = Engine::with_hash_key(topology(), e.now(), 0x1234 ^ round).expect("engine");
        r.reserve_flows(flows);
        let rep = r.import_state(&back);
        import.push(t.elapsed());
        total.push(t0.elapsed());
        assert_eq!(rep.flows as usize, flows);
        assert_eq!(r.live_flows(), flows);
    }
    println!(
        "restore of {flows} flows ({:.1} MB state), ms: min median max",
        bytes_len as f64 / 1e6
    );
    println!("export (under the lock, in steps)  {}", mmm(&mut export));
    println!("encode                             {}", mmm(&mut encode));
    println!("decode                             {}", mmm(&mut decode));
    println!("engine build + import              {}", mmm(&mut import));
    println!("restore total (decode + import)    {}", mmm(&mut total));
}
