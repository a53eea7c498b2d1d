//! How the binaries allocate: jemalloc, configured for large hops.
//!
//! A node allocates and frees many small objects per hop (frames, records, futures), and a large
//! hop moves its continuation through several buffers of its whole size (the encoded
//! continuation, the bytes read off the stream, the store's pages, the decoded values), each
//! allocated where we do not control it (redb, Rhai). Fresh memory is slow: each 2 MiB huge
//! page is zeroed on its first touch, and on a virtual machine that hands freed memory back to
//! its host (free page reporting, as on the benchmark machine) the host must supply it again.
//! Profiled, a 100 MB hop spent a third of its CPU time zeroing fresh pages. So jemalloc:
//!
//! - backs its memory with huge pages (`thp:always`);
//! - keeps the pages it frees (`dirty_decay_ms:-1`, `muzzy_decay_ms:-1`), so the next large
//!   buffer reuses them. Any finite decay (30 s or 10 min alike) left the 100 MB hop faulting in
//!   200–250 fresh huge pages per hop; never decaying, ~50.
//!   The memory goes back to the system every [`KEEP_FREED_FOR`] in which no large hop ended
//!   ([`return_freed_memory_when_idle`]), and before and after each large hop once the
//!   process's resident memory is more than [`keep_freed_up_to`] above what it was when its
//!   first node started ([`DEFAULT_KEEP_FREED`] unless a node's `[limits] keep_freed_bytes`
//!   says more). Kept pages are not always reused (a continuation a little larger than the last
//!   does not fit in the pages it left): an agent holding 1 MB blobs across hops took each node
//!   430–590 MiB above idle under a 64 MiB budget (the default then) (`bench_mesh hostile`), 210–270
//!   MiB once bounded, and 179–189 MiB with the store's page cache halved as well. A node that moves large agents may keep more, and its large hops
//!   are faster for it: a 100 MB hop took 330–340 ms with the default bound and 250–260 ms
//!   without;
//! - serves large buffers from its ordinary arenas (`oversize_threshold:0`: its dedicated arena
//!   for large allocations returns them at once) and keeps one arena (`narenas:1`), so that a
//!   buffer freed by one thread is reused by the next that allocates one (the 200-agent
//!   throughput did not change within noise).
//!
//! Measured in interleaved runs against the previous configuration (30 s decays, default arenas):
//! 100 MB hop / raw transfer 0.92–1.00 against 0.52–0.89 (the raw transfer itself unchanged);
//! latency and throughput unchanged within noise.
//!
//! A binary opts in with [`jemalloc_for_large_hops!`](crate::jemalloc_for_large_hops) at its
//! top level (`tern` and the benchmarks do; tests keep the system allocator, metered). Either
//! way the allocator is [`Metered`]: that is how agents' memory budgets are counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

pub use agent_lang::Metered;
#[cfg(not(target_env = "msvc"))]
#[doc(hidden)]
pub use tikv_jemallocator;

/// Makes jemalloc, with [`JEMALLOC_CONF`], the allocator of the binary it is used in (once, at
/// the binary's top level; the system allocator on MSVC targets, where jemalloc does not
/// build), [`Metered`] so that agents' memory budgets hold.
#[macro_export]
macro_rules! jemalloc_for_large_hops {
    () => {
        #[cfg(not(target_env = "msvc"))]
        #[global_allocator]
        static ALLOC: $crate::memory::Metered<$crate::memory::tikv_jemallocator::Jemalloc> =
            $crate::memory::Metered($crate::memory::tikv_jemallocator::Jemalloc);

        #[cfg(target_env = "msvc")]
        #[global_allocator]
        static ALLOC: $crate::memory::Metered<std::alloc::System> =
            $crate::memory::Metered(std::alloc::System);

        /// Read by jemalloc when it starts.
        #[cfg(not(target_env = "msvc"))]
        #[allow(non_upper_case_globals)]
        #[export_name = "_rjem_malloc_conf"]
        pub static malloc_conf: &[u8; $crate::memory::JEMALLOC_CONF.len()] =
            $crate::memory::JEMALLOC_CONF;
    };
}

/// jemalloc's configuration for tern's binaries (a C string; see the module docs).
pub const JEMALLOC_CONF: &[u8; 78] =
    b"thp:always,dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0,narenas:1\0";

/// How long freed memory is kept after a large hop, for the next one; also how often, with no
/// large hop in that time, it is returned to the system.
pub const KEEP_FREED_FOR: Duration = Duration::from_secs(30);

/// When the last large hop ended: milliseconds since [`started`] (0: none yet).
static LAST_LARGE_HOP_MS: AtomicU64 = AtomicU64::new(0);

/// How far above its idle resident memory a process keeps freed memory for the next large hop,
/// unless a node is configured for more: 64 MiB, a little more than the default agent memory
/// budget, so that an agent under the default limits cannot make a node keep much more than
/// it holds.
pub const DEFAULT_KEEP_FREED: u64 = 64 << 20;

/// Resident memory above the idle process's past which a large hop returns freed memory to
/// the system (see [`keep_freed_up_to`]).
static KEEP_FREED_UP_TO_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_KEEP_FREED);

/// The process's resident bytes when its first node started (0: unknown).
static IDLE_RESIDENT: AtomicU64 = AtomicU64::new(0);

/// Freed memory is kept for the next large hop as long as the process's resident memory is at
/// most `bytes` above its idle resident memory, or more if a node of the process asked for more
/// (nodes ask for their agents' memory budget when they start). Hops of agents under a larger
/// budget are faster for it (their buffers are not faulted in afresh), at the price of that
/// much memory held after them.
pub fn keep_freed_up_to(bytes: u64) {
    KEEP_FREED_UP_TO_BYTES.fetch_max(bytes, Ordering::Relaxed);
}

fn started() -> Instant {
    static STARTED: OnceLock<Instant> = OnceLock::new();
    *STARTED.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(started().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Called at the end of a hop of a large continuation (either side): the memory freed since
/// is kept for the next one for at least [`KEEP_FREED_FOR`], unless the process is more than
/// [`keep_freed_up_to`] above its idle resident memory, in which case it is returned now.
pub fn after_large_hop() {
    LAST_LARGE_HOP_MS.store(now_ms(), Ordering::Relaxed);
    bound_freed_memory();
}

/// Called before a hop of a large continuation starts (either side): the memory kept since the
/// last one is returned if the process is more than [`keep_freed_up_to`] above its idle resident
/// memory, so that what the hop allocates and what was kept do not add up.
pub fn before_large_hop() {
    bound_freed_memory();
}

/// Returns freed memory to the system if the process is more than [`keep_freed_up_to`] above
/// its idle resident memory.
fn bound_freed_memory() {
    let idle = IDLE_RESIDENT.load(Ordering::Relaxed);
    let bound = KEEP_FREED_UP_TO_BYTES.load(Ordering::Relaxed);
    if idle > 0 && resident_bytes().is_some_and(|now| now.saturating_sub(idle) > bound) {
        if let Err(code) = return_freed_memory() {
            tracing::debug!("jemalloc did not purge its arenas (error {code})");
        }
    }
}

/// The process's resident memory (Linux: `VmRSS` of `/proc/self/status`; None elsewhere).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Starts (once per process; nodes call it when they start) a thread that, every
/// [`KEEP_FREED_FOR`], returns the memory jemalloc holds unused to the system unless a large
/// hop ended within that time. So a node's resident memory falls back within a minute of its
/// last burst, whatever the size of its agents.
pub fn return_freed_memory_when_idle() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        started();
        IDLE_RESIDENT.store(resident_bytes().unwrap_or(0), Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name("tern-memory".into())
            .spawn(|| loop {
                std::thread::sleep(KEEP_FREED_FOR);
                let since_last = now_ms().saturating_sub(LAST_LARGE_HOP_MS.load(Ordering::Relaxed));
                if u128::from(since_last) >= KEEP_FREED_FOR.as_millis() {
                    if let Err(code) = return_freed_memory() {
                        tracing::debug!("jemalloc did not purge its arenas (error {code})");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("freed memory will not be returned to the system: {e}");
        }
    });
}

/// Returns every jemalloc arena's unused pages to the system (nothing when the binary does not
/// allocate with jemalloc: its arenas then hold nothing). `Err` holds jemalloc's error code.
fn return_freed_memory() -> Result<(), i32> {
    #[cfg(target_env = "msvc")]
    return Ok(());
    #[cfg(not(target_env = "msvc"))]
    {
        // "arena.<MALLCTL_ARENAS_ALL>.purge"; the control takes no old or new value.
        let name = b"arena.4096.purge\0";
        // SAFETY: `name` is NUL-terminated, and null old and new values are what this control
        // expects.
        let failed = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr().cast(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        match failed {
            0 => Ok(()),
            code => Err(code),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returning_freed_memory_works_whatever_the_allocator() {
        // jemalloc knows the control (a wrong name would be refused), even when it is not
        // the allocator.
        assert_eq!(return_freed_memory(), Ok(()));
    }

    #[test]
    fn resident_memory_is_read_where_linux_tells_it() {
        let resident = resident_bytes();
        if cfg!(target_os = "linux") {
            // More than a megabyte, less than a terabyte.
            assert!(
                resident.is_some_and(|b| (1 << 20..1 << 40).contains(&b)),
                "{resident:?}"
            );
        }
    }

    #[test]
    fn the_configuration_is_one_c_string() {
        let (last, text) = JEMALLOC_CONF.split_last().unwrap();
        assert_eq!(*last, 0);
        assert!(!text.contains(&0));
        assert!(std::str::from_utf8(text).is_ok());
    }
}
