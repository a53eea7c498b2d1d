//! `check_portable` allocates nothing in proportion to its input: its own test binary, so the
//! counting allocator sees only this test (and counts per thread, so the harness's threads do
//! not count).
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use agent_lang::{check_portable, Limits, Program};

struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the counter is a const-initialised thread-local
// without a destructor, so touching it never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.with(|n| n.set(n.get() + layout.size()));
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.with(|n| n.set(n.get() + new_size));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes allocated on this thread while `f` runs.
fn allocated_by(f: impl FnOnce()) -> usize {
    let before = ALLOCATED.with(Cell::get);
    f();
    ALLOCATED.with(Cell::get) - before
}

/// 16 MiB of nested empty arrays (an array of n items, each an empty array) is well formed and
/// passes the check without allocating; decoding it would take about a gigabyte.
#[test]
fn sixteen_megabytes_of_empty_arrays_pass_without_allocating() {
    let program = Program::compile("1", &Limits::default()).unwrap();
    let n = 16u32 << 20;
    let mut bytes = vec![0x9a];
    bytes.extend_from_slice(&n.to_be_bytes());
    bytes.resize(5 + n as usize, 0x80);
    let mut result = None;
    let allocated = allocated_by(|| result = Some(check_portable(&program, &bytes)));
    assert_eq!(result, Some(Ok(())));
    assert_eq!(allocated, 0);
    // The same nested as deep as allowed, with a long string and blob inside: still nothing.
    let mut deep = vec![0x81; 127];
    deep.extend_from_slice(&[0x83, 0x80, 0x5a]);
    deep.extend_from_slice(&(1u32 << 20).to_be_bytes());
    deep.resize(deep.len() + (1 << 20), 7);
    deep.push(0x7a);
    deep.extend_from_slice(&(1u32 << 20).to_be_bytes());
    deep.resize(deep.len() + (1 << 20), b'a');
    let allocated = allocated_by(|| result = Some(check_portable(&program, &deep)));
    assert_eq!(result, Some(Ok(())));
    assert_eq!(allocated, 0);
}
