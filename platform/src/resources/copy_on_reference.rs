//! Copy-on-reference, after Accent's lazy copy: a handle bound at another node reads from that
//! node only what the agent touches, one chunk at a time, and keeps each chunk at the node the
//! agent is on, so that reading it again there costs no request. The chunks are the agent's own
//! (`store::resource_cache`): the store quota bounds them (a chunk that does not fit is used
//! and not kept), and they go when the agent leaves the node or ends.
//!
//! A dataset is cut into chunks of [`BYTES_CHUNK`] bytes for `read`, and of [`LINES_CHUNK`]
//! lines for `lines` (the owner's sparse index marks every 1,024th line, so a chunk costs it
//! one seek); its size and line count are a chunk each, and so is a value. Only resources that
//! do not change are copied so (datasets and values): a kept chunk of a table would go stale.

use agent_lang::rhai::{Array, Blob, Dynamic};
use agent_lang::ResourceError;

use super::binding::method;
use crate::node::StoreQuota;
use crate::store::Store;
use crate::wire::ResourceOp;

/// Bytes of a dataset in one chunk.
pub const BYTES_CHUNK: u64 = 1 << 20;

/// Lines of a dataset in one chunk.
pub const LINES_CHUNK: u64 = 1024;

/// One agent's chunks of one resource of another node, at the node it is on.
pub(super) struct ChunkCache<'a> {
    pub(super) store: &'a Store,
    pub(super) quota: &'a StoreQuota,
    pub(super) agent: &'a str,
    pub(super) owner: &'a str,
    pub(super) name: &'a str,
}

/// Which chunks: each kind of read has its own numbering.
#[derive(Clone, Copy)]
enum Part {
    Size,
    LineCount,
    Value,
    Bytes,
    Lines,
}

impl Part {
    fn as_str(self) -> &'static str {
        match self {
            Part::Size => "size",
            Part::LineCount => "line_count",
            Part::Value => "value",
            Part::Bytes => "bytes",
            Part::Lines => "lines",
        }
    }
}

impl ChunkCache<'_> {
    /// Answers `op`, from the chunks kept here, asking `fetch` (a request to the owner) for
    /// each chunk that is not. `decode` reads a kept chunk back as the agent's value. When the
    /// chunks cannot serve it (one holds a line longer than the agent's strings may be, or is
    /// over its memory budget, though the part asked for is not), `op` is asked of the owner
    /// as it is, as a `remote` binding would.
    pub(super) fn serve(
        &self,
        op: ResourceOp,
        fetch: &dyn Fn(ResourceOp) -> Result<Dynamic, ResourceError>,
        decode: &dyn Fn(&[u8]) -> Result<Dynamic, String>,
    ) -> Result<Dynamic, ResourceError> {
        self.serve_in_chunks(op.clone(), fetch, decode)
            .or_else(|_| fetch(op))
    }

    fn serve_in_chunks(
        &self,
        op: ResourceOp,
        fetch: &dyn Fn(ResourceOp) -> Result<Dynamic, ResourceError>,
        decode: &dyn Fn(&[u8]) -> Result<Dynamic, String>,
    ) -> Result<Dynamic, ResourceError> {
        let what = method(&op);
        let chunk = |part: Part, n: u64, op: ResourceOp| self.chunk(part, n, op, fetch, decode);
        match op {
            ResourceOp::Size => chunk(Part::Size, 0, ResourceOp::Size),
            ResourceOp::LineCount => chunk(Part::LineCount, 0, ResourceOp::LineCount),
            ResourceOp::Value => chunk(Part::Value, 0, ResourceOp::Value),
            ResourceOp::Read { offset, len } => {
                let end = offset.saturating_add(len);
                let mut out = Blob::new();
                let mut n = offset / BYTES_CHUNK;
                while n.saturating_mul(BYTES_CHUNK) < end {
                    let at = n * BYTES_CHUNK;
                    let read = ResourceOp::Read {
                        offset: at,
                        len: BYTES_CHUNK,
                    };
                    let Some(bytes) = chunk(Part::Bytes, n, read)?.try_cast::<Blob>() else {
                        return Err(odd(what));
                    };
                    let from = (offset.max(at) - at) as usize;
                    let to = ((end - at) as usize).min(bytes.len());
                    if from < to {
                        out.extend_from_slice(&bytes[from..to]);
                    }
                    if (bytes.len() as u64) < BYTES_CHUNK {
                        break;
                    }
                    n += 1;
                }
                Ok(Dynamic::from_blob(out))
            }
            ResourceOp::Lines { start, count } => {
                let end = start.saturating_add(count);
                let mut out = Array::new();
                let mut n = start / LINES_CHUNK;
                while n.saturating_mul(LINES_CHUNK) < end {
                    let first = n * LINES_CHUNK;
                    let lines = ResourceOp::Lines {
                        start: first,
                        count: LINES_CHUNK,
                    };
                    let Some(lines) = chunk(Part::Lines, n, lines)?.try_cast::<Array>() else {
                        return Err(odd(what));
                    };
                    let got = lines.len() as u64;
                    let skip = (start.max(first) - first) as usize;
                    let take = (end - first).min(got) as usize;
                    out.extend(lines.into_iter().take(take).skip(skip));
                    if got < LINES_CHUNK {
                        break;
                    }
                    n += 1;
                }
                Ok(out.into())
            }
            // (Tables are not copied by reference: see the module's documentation.)
            other => fetch(other),
        }
    }

    /// Chunk `n` of `part`: kept here, or fetched with `op` and kept (if the store has room).
    fn chunk(
        &self,
        part: Part,
        n: u64,
        op: ResourceOp,
        fetch: &dyn Fn(ResourceOp) -> Result<Dynamic, ResourceError>,
        decode: &dyn Fn(&[u8]) -> Result<Dynamic, String>,
    ) -> Result<Dynamic, ResourceError> {
        let what = method(&op);
        let key = format!("{}\0{}\0{}", self.owner, self.name, part.as_str());
        let failed = |e: &dyn std::fmt::Display| ResourceError::Failed(format!("{what}: {e}"));
        if let Some(bytes) = self
            .store
            .cached_chunk(self.agent, &key, n)
            .map_err(|e| failed(&e))?
        {
            return Ok(decode(&bytes)?);
        }
        let value = fetch(op)?;
        let bytes = agent_lang::encode_portable(&value).map_err(|e| failed(&e))?;
        // (A chunk the quota has no room for is used, not kept: the next read asks again.)
        if self
            .quota
            .room_for((key.len() + bytes.len()) as u64)
            .is_ok()
        {
            self.store
                .batch(|b| b.cache_chunk(self.agent, &key, n, &bytes))
                .map_err(|e| failed(&e))?;
        }
        Ok(value)
    }
}

fn odd(what: &str) -> ResourceError {
    ResourceError::Failed(format!("{what}: the owner answered with the wrong type"))
}
