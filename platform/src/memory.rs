//! How the binaries allocate: jemalloc, configured for large hops.
//!
//! A node allocates and frees many small objects per hop (frames, records, futures), and a large
//! hop moves its continuation through several buffers of its whole size (the encoded
//! continuation, the bytes read off the stream, the store's pages, the decoded values), each
//! allocated where we do not control it (redb, Rhai). Fresh memory is slow here: filling 100 MB
//! of fresh 4 KiB pages costs 25,600 page faults (about 50 ms on the benchmark machine). So
//! jemalloc backs its memory with huge pages (`thp:always`) and keeps freed pages for 30 s
//! before returning them (`dirty_decay_ms`, `muzzy_decay_ms`), so the next large buffer comes
//! from memory already mapped. Measured in interleaved runs against the system allocator with
//! huge-page advice on large blocks: 200 agents hopping ~15 % faster and hop latency lower; the
//! 100 MB hop no different within this machine's noise; 40–60 MiB more resident memory with
//! 10,000 agents. jemalloc with its defaults, or either setting alone, made the 100 MB hop slower.
//!
//! A binary opts in with [`jemalloc_for_large_hops!`](crate::jemalloc_for_large_hops) at its
//! top level (`tern` and the benchmarks do; tests keep the system allocator).

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
        pub static malloc_conf: &[u8; 53] = $crate::memory::JEMALLOC_CONF;
    };
}

/// jemalloc's configuration for tern's binaries (a C string; see the module docs).
pub const JEMALLOC_CONF: &[u8; 53] = b"thp:always,dirty_decay_ms:30000,muzzy_decay_ms:30000\0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_is_one_c_string() {
        let (last, text) = JEMALLOC_CONF.split_last().unwrap();
        assert_eq!(*last, 0);
        assert!(!text.contains(&0));
        assert!(std::str::from_utf8(text).is_ok());
    }
}
