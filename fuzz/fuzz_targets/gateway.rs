//! Fuzzes `Gateway::process` through the shared harness (`snatgw_dataplane::fuzzing`): a
//! sequence of packets against the reference topology. `cargo test -p snatgw-dataplane`
//! replays the committed corpus with the same harness.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    snatgw_dataplane::fuzzing::run_input(data);
});
