//! Continuations of 4 KiB or more, kept apart from their agent records: in
//! `continuation_chunks`, as raw bytes, under the agent's id and chunk numbers 0, 1, ... with no
//! gap.
//!
//! - A large continuation is copied once into redb's pages when stored and once out of them
//!   when read (into a vector allocated once), never CBOR-encoded or decoded.
//! - Chunks fill 1 MiB pages. Whole, a 100 MB value would take a 128 MiB page (redb gives a
//!   value a page of a power-of-two size), zeroed and written in full; chunks waste at most a
//!   few bytes a page, and their pages are reused one by one as agents come and go.
//! - Every chunk is at least 4 KiB and nothing else is in their table, so each chunk has a leaf
//!   page of its own, and a write never copies a neighbour's chunk. (In one table with small
//!   values, a leaf holding a 100 MB value and a small one costs 100 MB of copying per write
//!   of the small one: 120 ms here.)

use redb::{ReadableTable, Table};

use super::StoreError;

/// Continuations this long or longer go to `continuation_chunks`, shorter ones inline. redb
/// gives a leaf holding one pair at least this long a page of its own, so no chunk shares a
/// leaf.
pub(super) const LARGE: usize = 4096;
/// The page a full chunk fills (redb allocates pages of 4 KiB times a power of two).
const CHUNK_PAGE: usize = 1 << 20;
/// What a leaf page holding one chunk needs besides the chunk and its agent id: the page header,
/// the key and value ends, the key's length prefix and chunk number (21 bytes), with room to
/// spare.
const CHUNK_OVERHEAD: usize = 64;

/// The chunk keys of agent `id`'s continuation, in order.
fn chunk_keys(id: &str) -> std::ops::RangeInclusive<(&str, u32)> {
    (id, 0)..=(id, u32::MAX)
}

/// Agent `id`'s chunked continuation, copied once out of the store's pages: each chunk
/// straight into its place in a vector allocated once.
pub(super) fn read_chunks(
    chunks: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
    id: &str,
) -> Result<Vec<u8>, StoreError> {
    // The guards borrow the pages (no copy yet); their total length sizes the vector.
    let mut guards = Vec::new();
    for (n, entry) in (0u32..).zip(chunks.range(chunk_keys(id))?) {
        let (k, v) = entry?;
        if k.value().1 != n {
            return Err(StoreError::Inconsistent {
                table: "continuation_chunks",
                key: id.to_owned(),
                what: "a chunk of the continuation is missing",
            });
        }
        guards.push(v);
    }
    if guards.is_empty() {
        return Err(StoreError::Inconsistent {
            table: "continuation_chunks",
            key: id.to_owned(),
            what: "the agent's continuation is missing",
        });
    }
    let mut out = Vec::with_capacity(guards.iter().map(|g| g.value().len()).sum());
    for g in &guards {
        out.extend_from_slice(g.value());
    }
    Ok(out)
}

/// Removes every chunk of agent `id`'s continuation (none is fine): the bytes they held.
pub(super) fn remove_chunks(
    chunks: &mut Table<'_, (&'static str, u32), &'static [u8]>,
    id: &str,
) -> Result<usize, StoreError> {
    let mut removed = 0;
    chunks.retain_in(chunk_keys(id), |_, chunk| {
        removed += chunk.len();
        false
    })?;
    Ok(removed)
}

/// The most bytes of agent `id`'s continuation one chunk holds: what fills a 1 MiB page.
fn chunk_capacity(id: &str) -> usize {
    // An id too long to leave half the page (never in practice) only costs space.
    CHUNK_PAGE
        .saturating_sub(CHUNK_OVERHEAD + id.len())
        .max(CHUNK_PAGE / 2)
}

/// The chunk lengths of a continuation of `len` bytes (at least [`LARGE`]) cut in chunks of at
/// most `capacity` bytes (at least twice [`LARGE`]): full chunks, then the rest, except that a
/// rest shorter than [`LARGE`] is shared with the last full chunk, so that every chunk is at
/// least [`LARGE`] long (and has a leaf page of its own).
fn chunk_lens(len: usize, capacity: usize) -> Vec<usize> {
    debug_assert!(len >= LARGE && capacity >= 2 * LARGE);
    let mut lens = vec![capacity; len / capacity];
    match len % capacity {
        0 => {}
        rest if rest >= LARGE || lens.is_empty() => lens.push(rest),
        rest => {
            let pair = capacity + rest;
            if let Some(last) = lens.last_mut() {
                *last = pair - pair / 2;
            }
            lens.push(pair / 2);
        }
    }
    lens
}

/// Stores `continuation` (at least [`LARGE`] long) as agent `id`'s chunks, which must be gone.
pub(super) fn insert_chunks(
    chunks: &mut Table<'_, (&'static str, u32), &'static [u8]>,
    id: &str,
    continuation: &[u8],
) -> Result<(), StoreError> {
    let mut rest = continuation;
    for (n, len) in (0u32..).zip(chunk_lens(continuation.len(), chunk_capacity(id))) {
        let (chunk, tail) = rest.split_at(len);
        chunks.insert((id, n), chunk)?;
        rest = tail;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fill_pages_and_none_is_short() {
        let cap = chunk_capacity("agent");
        assert!(cap + CHUNK_OVERHEAD + "agent".len() <= CHUNK_PAGE);
        for len in [
            LARGE,
            LARGE + 1,
            cap - 1,
            cap,
            cap + 1,
            cap + LARGE - 1,
            cap + LARGE,
            2 * cap,
            2 * cap + 1,
            100 * 1024 * 1024,
            100 * 1024 * 1024 + 17,
        ] {
            let lens = chunk_lens(len, cap);
            assert_eq!(lens.iter().sum::<usize>(), len, "{len}: {lens:?}");
            assert!(
                lens.iter().all(|&l| (LARGE..=cap).contains(&l)),
                "{len}: {lens:?}"
            );
            assert_eq!(lens.len(), len.div_ceil(cap), "{len}: {lens:?}");
        }
        // A very long id still leaves chunks no shorter than half a page.
        assert_eq!(chunk_capacity(&"x".repeat(CHUNK_PAGE)), CHUNK_PAGE / 2);
    }
}
