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
//!   200–250 fresh huge pages per hop (jemalloc returns large blocks early); never decaying, ~50. The memory goes back to the system
//!   only when [`after_large_hop`] finds that no large hop happened for [`KEEP_FREED_FOR`];
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
//! top level (`tern` and the benchmarks do; tests keep the system allocator).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[cfg(not(target_env = "msvc"))]
#[doc(hidden)]
pub use tikv_jemallocator;

/// Makes jemalloc, with [`JEMALLOC_CONF`], the allocator of the binary it is used in (once, at
/// the binary's top level; nothing on MSVC targets, where jemalloc does not build).
#[macro_export]
macro_rules! jemalloc_for_large_hops {
    () => {
        #[cfg(not(target_env = "msvc"))]
        #[global_allocator]
        static ALLOC: $crate::memory::tikv_jemallocator::Jemalloc =
            $crate::memory::tikv_jemallocator::Jemalloc;

        /// Read by jemalloc when it starts.
        #[cfg(not(target_env = "msvc"))]
        #[allow(non_upper_case_globals)]
        #[export_name = "_rjem_malloc_conf"]
        pub static malloc_conf: &[u8; 78] = $crate::memory::JEMALLOC_CONF;
    };
}

/// jemalloc's configuration for tern's binaries (a C string; see the module docs).
pub const JEMALLOC_CONF: &[u8; 78] =
    b"thp:always,dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0,narenas:1\0";

/// How long the memory freed after a large hop is kept for the next one.
pub const KEEP_FREED_FOR: Duration = Duration::from_secs(30);

/// Large hops so far, in this process.
static LARGE_HOPS: AtomicU64 = AtomicU64::new(0);

/// Called at the end of a hop of a large continuation (either side, from a tokio runtime): if
/// no other large hop comes within [`KEEP_FREED_FOR`], the memory jemalloc holds unused is
/// returned to the system then.
pub fn after_large_hop() {
    let this = LARGE_HOPS.fetch_add(1, Ordering::Relaxed) + 1;
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            tokio::time::sleep(KEEP_FREED_FOR).await;
            if LARGE_HOPS.load(Ordering::Relaxed) == this {
                return_freed_memory();
            }
        });
    }
}

/// Returns every jemalloc arena's unused pages to the system (nothing when the binary does not
/// allocate with jemalloc: its arenas then hold nothing).
fn return_freed_memory() {
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
        if failed != 0 {
            tracing::debug!("jemalloc did not purge its arenas (error {failed})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returning_freed_memory_works_whatever_the_allocator() {
        return_freed_memory();
    }

    #[test]
    fn the_configuration_is_one_c_string() {
        let (last, text) = JEMALLOC_CONF.split_last().unwrap();
        assert_eq!(*last, 0);
        assert!(!text.contains(&0));
        assert!(std::str::from_utf8(text).is_ok());
    }
}
