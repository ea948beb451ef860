#![allow(missing_docs)]
//! Memory per live flow, counted with an allocator wrapper (not a criterion benchmark: it prints
//! bytes, not time). Run: `cargo bench -p snatgw-core --bench memory`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

#[path = "fixture.rs"]
mod fixture;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY-free: this forwards to the system allocator; unsafe is required by the trait.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with layout `l`.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn main() {
    // Criterion passes --bench; ignore arguments.
    for per in [100usize, 1000] {
        let e0 = snatgw_core::Engine::new(fixture::topology(), 0).expect("engine");
        let base = LIVE.load(Ordering::Relaxed);
        drop(e0);
        let e = fixture::loaded(per);
        let used = LIVE.load(Ordering::Relaxed) - base;
        let flows = e.live_flows();
        println!(
            "memory: {flows} live flows ({per} per instance, {} per destination): {:.1} bytes per flow (heap {:.1} MiB beyond the empty engine)",
            per.div_ceil(250),
            used as f64 / flows as f64,
            used as f64 / (1 << 20) as f64
        );
        drop(e);
    }
}
