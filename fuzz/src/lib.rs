//! What the fuzz targets share: the allocation meter that turns memory amplification into a
//! failure, and the fixed programs continuations and portable values are decoded against.
//!
//! libFuzzer's own caps (`-rss_limit_mb`, `-malloc_limit_mb`) catch an input that makes a
//! decoder take hundreds of MiB. The meter here is finer: every target runs its decoder inside
//! [`bounded`], which fails the input if the heap held at any moment of the decode grows by more
//! than a fixed factor of the input's length (plus a constant, see [`SLACK`]). A decoder that
//! reserves memory for lengths the input only claims is caught even when the pages are never
//! touched (and so never count towards the RSS).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use agent_lang::{HostEnv, Limits, Program};

/// Counts the bytes live on the heap and the most live since the last [`bounded`] began.
struct Meter;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call goes to `System` unchanged; the counters do not allocate.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static METER: Meter = Meter;

/// What any decode may hold beyond its factor of the input: serde's `Vec` visitor reserves up to
/// 1 MiB for a sequence whose claimed length it has not seen yet (`size_hint::cautious`), a
/// frame's body buffer starts at 64 KiB, Rhai's scopes and error messages cost a few KiB.
pub const SLACK: usize = 4 << 20;

/// Runs `decode` on an input of `len` bytes and panics (a finding) if the heap it held at any
/// moment grew by more than `factor * len + SLACK` bytes.
pub fn bounded<R>(what: &str, len: usize, factor: usize, decode: impl FnOnce() -> R) -> R {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = decode();
    let held = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    let bound = factor.saturating_mul(len).saturating_add(SLACK);
    assert!(
        held <= bound,
        "{what}: {len} input bytes made the decoder hold {held} heap bytes at once \
         (bound {factor} x input + {SLACK})"
    );
    out
}

/// Limits of the fixed programs: a small operation budget per slice, so that resuming a
/// decoded continuation stays cheap, and small sizes for what the agent builds.
pub fn limits() -> Limits {
    Limits::default()
        .with_max_operations(20_000)
        .with_max_string_size(1 << 16)
        .with_max_array_size(1 << 12)
        .with_max_map_size(1 << 12)
        .with_max_continuation_bytes(1 << 20)
}

/// Rhai's hashing seed in the fuzz targets and their seeds. Rhai names a closure
/// `anon$<hash of its parameters and body>`, hashed with keys that are random per process
/// unless a seed is set (ahash `runtime-rng`, on by default), or fixed ones when built with
/// `--cfg fuzzing`: without one seed for both, a continuation or message holding a closure
/// that the seeds program wrote would not decode here.
pub const RHAI_HASHING_SEED: [u64; 4] = [0x7465_726e, 0x6675_7a7a, 1, 2];

fn pin_hashing() {
    // Set once; a second call finds it set (to the same value).
    let _ = agent_lang::rhai::config::hashing::set_hashing_seed(Some(RHAI_HASHING_SEED));
}

/// The source of the `continuation` target's program.
pub const TRAVELLER: &str = include_str!("../programs/traveller.rhai");
/// The source of the `portable_value` target's program.
pub const RECEIVER: &str = include_str!("../programs/receiver.rhai");

/// The compiled [`TRAVELLER`].
pub fn traveller() -> &'static Program {
    static P: OnceLock<Program> = OnceLock::new();
    P.get_or_init(|| {
        pin_hashing();
        Program::compile(TRAVELLER, &limits()).expect("traveller compiles")
    })
}

/// The compiled [`RECEIVER`].
pub fn receiver() -> &'static Program {
    static P: OnceLock<Program> = OnceLock::new();
    P.get_or_init(|| {
        pin_hashing();
        Program::compile(RECEIVER, &limits()).expect("receiver compiles")
    })
}

/// What the host tells a resumed agent: three nodes, output dropped.
pub fn env() -> HostEnv {
    HostEnv {
        resources: agent_lang::no_resources(),
        here: "node-1".into(),
        home: "node-0".into(),
        nodes: (0..3).map(|i| format!("node-{i}")).collect(),
        agent_id: "agent-fuzz".into(),
        hops: 1,
        printer: Arc::new(|_| {}),
    }
}
