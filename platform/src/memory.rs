//! The process's allocator: the system's, with large allocations backed by huge pages.
//!
//! A large hop moves its continuation through several buffers of its whole size (the encoded
//! continuation, the bytes read off the stream, the store's pages, the decoded values). Each is
//! fresh memory, and filling 100 MB of fresh 4 KiB pages costs 25,600 page faults (about 50 ms
//! on the benchmark machine), of 2 MiB pages 50. Those buffers are allocated in places we do not
//! own (redb's page cache, Rhai's blobs), so the advice is given where they all meet: the
//! allocator. Binaries opt in with `#[global_allocator]` (`tern` and the benchmarks do).

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations from this size on are advised for huge pages.
const HUGE_FROM: usize = 4 << 20;

/// [`System`], asking the kernel to back allocations of 4 MiB or more with huge pages where it
/// does so on request (Linux transparent huge pages in `madvise` mode; elsewhere, and when the
/// kernel declines, nothing changes).
///
/// ```no_run
/// #[global_allocator]
/// static ALLOC: platform::memory::HugePageAlloc = platform::memory::HugePageAlloc;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct HugePageAlloc;

// SAFETY: every method hands its arguments to `System` unchanged and returns what it returned;
// the advice only changes how the kernel backs pages of the returned block.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // (Large zeroed blocks come straight from mmap: advice before the first touch counts.)
        let p = System.alloc_zeroed(layout);
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        advise(p, new_size);
        p
    }
}

/// Advises `ptr..ptr + len` (a block just allocated) for huge pages if it is large.
#[allow(unused_variables)]
fn advise(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    if len >= HUGE_FROM && !ptr.is_null() {
        let p = ptr as usize;
        let start = p & !4095;
        // SAFETY: madvise only advises on how to back these pages: it changes no contents and no
        // mapping. The range is the block's own, widened to the page it starts in (advice on
        // a page shared with a neighbouring block is as harmless).
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                len + (p - start),
                libc::MADV_HUGEPAGE,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_and_small_blocks_hold_their_bytes() {
        for size in [16, 4096, HUGE_FROM, HUGE_FROM * 3 + 17] {
            let layout = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: the layout has a non-zero size; the block is used within it and freed
            // with the layout it was reallocated to.
            unsafe {
                let p = HugePageAlloc.alloc_zeroed(layout);
                assert!(!p.is_null());
                assert_eq!(*p.add(size - 1), 0);
                *p.add(size - 1) = 7;
                let q = HugePageAlloc.realloc(p, layout, size * 2);
                assert!(!q.is_null());
                assert_eq!(*q.add(size - 1), 7);
                HugePageAlloc.dealloc(q, Layout::from_size_align(size * 2, 8).unwrap());
            }
        }
    }
}
