//! A global allocator that asks for transparent huge pages for large allocations.
//!
//! The flow tables of a gateway with a million flows are tens of MiB touched at random; with
//! 4 KiB pages nearly every lookup also misses the TLB, and in a virtual machine a TLB miss is a
//! two-dimensional page walk. When the kernel's THP mode is `madvise` (Debian's default),
//! memory only gets huge pages if the program asks. This allocator forwards to the system
//! allocator and, for allocations of 4 MiB or more, aligns them to 2 MiB and calls
//! `madvise(MADV_HUGEPAGE)`. It changes nothing else, and is opt-in: a binary installs it with
//! `#[global_allocator] static A: snatgw_io::HugePageAlloc = snatgw_io::HugePageAlloc;`.

#![allow(unsafe_code)] // The one place in the workspace; every block has a SAFETY comment.

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations at least this large are huge-page backed.
pub const HUGE_MIN: usize = 4 << 20;
const HUGE_ALIGN: usize = 2 << 20;

/// See the module documentation.
#[derive(Debug, Default, Clone, Copy)]
pub struct HugePageAlloc;

fn huge_layout(l: Layout) -> Option<Layout> {
    if l.size() < HUGE_MIN {
        return None;
    }
    Layout::from_size_align(
        l.size().next_multiple_of(HUGE_ALIGN),
        l.align().max(HUGE_ALIGN),
    )
    .ok()
}

fn advise(p: *mut u8, len: usize) {
    if !p.is_null() {
        // SAFETY: `p` is the start of a live allocation of at least `len` bytes that we own; the
        // advice only changes how the kernel backs those pages, never their contents. Failure
        // (e.g. THP disabled) is harmless and ignored.
        unsafe {
            libc::madvise(p.cast(), len, libc::MADV_HUGEPAGE);
        }
    }
}

// SAFETY: every method forwards to `System` with a layout it accepts, and `dealloc`/`realloc`
// recompute the same adjusted layout from the caller's layout, so each block is freed with
// the layout it was allocated with.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        match huge_layout(l) {
            Some(h) => {
                // SAFETY: `h` has non-zero size (≥ HUGE_MIN) and a valid power-of-two alignment.
                let p = unsafe { System.alloc(h) };
                advise(p, h.size());
                p
            }
            // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
            None => unsafe { System.alloc(l) },
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        match huge_layout(l) {
            Some(h) => {
                // SAFETY: as in `alloc`.
                let p = unsafe { System.alloc_zeroed(h) };
                advise(p, h.size());
                p
            }
            // SAFETY: forwarded unchanged.
            None => unsafe { System.alloc_zeroed(l) },
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` with `l`, which used `huge_layout(l)` or `l` itself.
        unsafe { System.dealloc(p, huge_layout(l).unwrap_or(l)) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let new_l = match Layout::from_size_align(new_size, l.align()) {
            Ok(n) => n,
            Err(_) => return std::ptr::null_mut(),
        };
        if huge_layout(l).is_none() && huge_layout(new_l).is_none() {
            // SAFETY: both layouts are plain; forwarded unchanged.
            return unsafe { System.realloc(p, l, new_size) };
        }
        // SAFETY: allocate the new block through our own `alloc` (so it gets the right layout),
        // copy the smaller of the two sizes, then free the old block with its own layout.
        unsafe {
            let q = self.alloc(new_l);
            if !q.is_null() {
                std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                self.dealloc(p, l);
            }
            q
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_aligned_and_round_trip() {
        let a = HugePageAlloc;
        for size in [
            16usize,
            4096,
            HUGE_MIN - 1,
            HUGE_MIN,
            HUGE_MIN + 12345,
            64 << 20,
        ] {
            let l = Layout::from_size_align(size, 8).expect("layout");
            // SAFETY: test of the allocator itself; sizes are non-zero and freed with the same layout.
            unsafe {
                let p = a.alloc(l);
                assert!(!p.is_null());
                if size >= HUGE_MIN {
                    assert_eq!(p as usize % HUGE_ALIGN, 0);
                }
                p.write_bytes(0xa5, size);
                let q = a.realloc(p, l, size * 2);
                assert!(!q.is_null());
                assert_eq!(*q.add(size - 1), 0xa5);
                a.dealloc(q, Layout::from_size_align(size * 2, 8).expect("layout"));
            }
        }
    }
}
