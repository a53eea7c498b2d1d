//! The memory an agent holds, counted at the allocator in O(1) per operation.
//!
//! Rhai bounds data by walking the whole value after every change (`check_data_size`), so a loop
//! that grows a collection is quadratic (a million `push`es did not finish in 30 s), and it
//! bounds each object on its own, so eight arrays at their limit took a node to 2 GB. Instead,
//! [`Metered`] wraps the process's allocator and counts, per thread, the bytes allocated and
//! freed. A slice runs on one thread from its start to its end, so the difference between two
//! readings on that thread is what the slice took or gave back, whatever Rhai did with it. The
//! executor keeps the agent's total across slices ([`Execution`](crate::Execution) holds it;
//! decoding a continuation measures it afresh), and the engine's progress hook compares it with
//! [`Limits::max_memory_bytes`](crate::Limits) at every operation: a few thread-local reads.
//!
//! The same reading charges work: a statement that copies a large value is one Rhai operation,
//! so `a = [a]` repeated ran for 72 s under a limit of a million operations. Every
//! [`BYTES_PER_OPERATION`] bytes a slice allocates count as one more operation.
//!
//! What the host moves across the slice's edge is accounted for by the executor: bytes it hands
//! in and the slice frees (a message, an error) and bytes the slice hands out (a message sent, a
//! destination). What the host does inside a slice on the agent's behalf (`print`) runs
//! [`outside_the_agent`]. A process whose allocator is not [`Metered`] enforces no memory budget
//! ([`is_installed`] tells).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

/// Bytes allocated that count as one operation.
pub const BYTES_PER_OPERATION: u64 = 64;

/// A global allocator that counts what each thread allocates and frees, and otherwise is `A`:
/// `#[global_allocator] static A: Metered<std::alloc::System> = Metered(std::alloc::System);`
#[derive(Debug, Default)]
pub struct Metered<A>(pub A);

/// This thread's counters, and the budget of the slice it runs, if any.
struct Counters {
    allocated: Cell<u64>,
    freed: Cell<u64>,
    /// Whether a slice is metered on this thread.
    active: Cell<bool>,
    /// `allocated` and `freed` when the slice started, moved on by what ran outside the agent.
    allocated_from: Cell<u64>,
    freed_from: Cell<u64>,
    /// Bytes the agent held when the slice started.
    held: Cell<u64>,
    /// The agent's memory budget.
    max_memory: Cell<u64>,
    /// The most the agent held at a check during the slice.
    peak: Cell<u64>,
}

thread_local! {
    // Const-initialised, without a destructor: touching it never allocates, so the allocator
    // may use it, on any thread, at any time.
    static COUNTERS: Counters = const {
        Counters {
            allocated: Cell::new(0),
            freed: Cell::new(0),
            active: Cell::new(false),
            allocated_from: Cell::new(0),
            freed_from: Cell::new(0),
            held: Cell::new(0),
            max_memory: Cell::new(0),
            peak: Cell::new(0),
        }
    };
}

fn count(allocated: usize, freed: usize) {
    let _ = COUNTERS.try_with(|c| {
        c.allocated
            .set(c.allocated.get().wrapping_add(allocated as u64));
        c.freed.set(c.freed.get().wrapping_add(freed as u64));
    });
}

// SAFETY: every call is forwarded to `A` unchanged; the counting touches only a const
// thread-local without a destructor, which neither allocates nor unwinds.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Metered<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 0);
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 0);
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(0, layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Only the change counts: a string grown a few bytes at a time (Rhai's `+=`) is
        // reallocated at every step, and counting each new size whole would charge a loop that
        // builds a string quadratically.
        let old_size = layout.size();
        count(
            new_size.saturating_sub(old_size),
            old_size.saturating_sub(new_size),
        );
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

/// Is the process's allocator [`Metered`]? Without it no memory budget is enforced.
pub fn is_installed() -> bool {
    let before = allocated_here();
    drop(std::hint::black_box(Box::new(0u64)));
    allocated_here() != before
}

fn allocated_here() -> u64 {
    COUNTERS.with(|c| c.allocated.get())
}

/// Bytes allocated minus bytes freed on this thread while `f` ran, and what it returned. For
/// measuring what a value built by `f` holds.
pub(crate) fn net_allocation<T>(f: impl FnOnce() -> T) -> (T, i64) {
    let before = COUNTERS.with(|c| (c.allocated.get(), c.freed.get()));
    let out = f();
    let after = COUNTERS.with(|c| (c.allocated.get(), c.freed.get()));
    (
        out,
        signed_net(
            after.0.wrapping_sub(before.0),
            after.1.wrapping_sub(before.1),
        ),
    )
}

fn signed_net(allocated: u64, freed: u64) -> i64 {
    (allocated as i64).wrapping_sub(freed as i64)
}

/// What a [`SliceMeter`] measured.
pub(crate) struct SliceReading {
    /// Bytes the agent holds now.
    pub(crate) held: u64,
    /// Bytes the slice allocated.
    pub(crate) allocated: u64,
    /// The most the agent held at one of the slice's checks (or now).
    pub(crate) peak: u64,
}

/// A slice being metered on this thread, from [`SliceMeter::start`] until it is dropped.
pub(crate) struct SliceMeter(());

impl SliceMeter {
    /// Starts metering a slice of an agent that holds `held` bytes, allowed `max_memory`.
    pub(crate) fn start(held: u64, max_memory: u64) -> SliceMeter {
        COUNTERS.with(|c| {
            c.active.set(true);
            c.allocated_from.set(c.allocated.get());
            c.freed_from.set(c.freed.get());
            c.held.set(held);
            c.max_memory.set(max_memory);
            c.peak.set(held);
        });
        SliceMeter(())
    }

    /// What the slice measured so far.
    pub(crate) fn reading(&self) -> SliceReading {
        COUNTERS.with(|c| {
            let held = held_now(c);
            SliceReading {
                held,
                allocated: allocated_since(c),
                peak: held.max(c.peak.get()),
            }
        })
    }
}

impl Drop for SliceMeter {
    fn drop(&mut self) {
        COUNTERS.with(|c| c.active.set(false));
    }
}

fn allocated_since(c: &Counters) -> u64 {
    c.allocated.get().wrapping_sub(c.allocated_from.get())
}

fn held_now(c: &Counters) -> u64 {
    let net = signed_net(
        allocated_since(c),
        c.freed.get().wrapping_sub(c.freed_from.get()),
    );
    (c.held.get() as i64).saturating_add(net).max(0) as u64
}

/// Why the progress hook stopped a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exceeded {
    /// The agent held more than its memory budget: what it held, and the budget.
    Memory { held: u64, max: u64 },
    /// Operations and allocation together passed the slice's operation limit.
    Operations,
}

impl Exceeded {
    /// The uncatchable error that ends the agent: what the progress hook's token becomes in
    /// Rhai (`ErrorTerminated`), made by hand where the meter is asked outside the hook.
    pub(crate) fn into_error(self) -> Box<rhai::EvalAltResult> {
        rhai::EvalAltResult::ErrorTerminated(rhai::Dynamic::from(self), rhai::Position::NONE).into()
    }
}

/// The check made at every operation of a metered slice: `operations` counted so far (as
/// Rhai counts them against `max_operations`) plus the allocation charge.
pub(crate) fn check(operations: u64, max_operations: u64) -> Option<Exceeded> {
    COUNTERS.with(|c| {
        if !c.active.get() {
            return None;
        }
        let held = held_now(c);
        c.peak.set(c.peak.get().max(held));
        if held > c.max_memory.get() {
            return Some(Exceeded::Memory {
                held,
                max: c.max_memory.get(),
            });
        }
        let charged = allocated_since(c) / BYTES_PER_OPERATION;
        (max_operations > 0 && operations.saturating_add(charged) > max_operations)
            .then_some(Exceeded::Operations)
    })
}

/// Whether the running slice may take `bytes` more: checked before a single operation
/// allocates an amount its arguments choose (`blob(n)`, `pad`).
pub(crate) fn admits(bytes: u64) -> Result<(), Exceeded> {
    COUNTERS.with(|c| {
        if !c.active.get() {
            return Ok(());
        }
        let held = held_now(c).saturating_add(bytes);
        if held > c.max_memory.get() {
            Err(Exceeded::Memory {
                held,
                max: c.max_memory.get(),
            })
        } else {
            Ok(())
        }
    })
}

/// Runs `f`, which the host runs on the agent's behalf, without charging the agent for what it
/// allocates or frees (a `print` that hands its line to a logger on another thread).
pub(crate) fn outside_the_agent<T>(f: impl FnOnce() -> T) -> T {
    let before = COUNTERS.with(|c| (c.allocated.get(), c.freed.get()));
    let out = f();
    COUNTERS.with(|c| {
        let allocated = c.allocated.get().wrapping_sub(before.0);
        let freed = c.freed.get().wrapping_sub(before.1);
        c.allocated_from
            .set(c.allocated_from.get().wrapping_add(allocated));
        c.freed_from.set(c.freed_from.get().wrapping_add(freed));
    });
    out
}
