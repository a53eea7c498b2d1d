//! Copies of resources that an agent carries (the `copy` binding): a dataset's files, a table's
//! entries or a value, held in the handle itself. The copy is part of the agent's state: it is
//! counted in its memory, encoded in its continuation, and answers the handle's calls at any
//! node, with no request to a node at all. A table copy is the agent's own: `set` and `remove`
//! change the copy, never the table it was taken from.
//!
//! A dataset copy answers as the node's dataset it was taken from does (platform's
//! `resources::dataset`; a test there checks both on the same files): lines end at `\n`, a `\r`
//! before it is dropped, a file's last line needs no `\n`, and each file starts a new line.

use std::sync::Arc;

use rhai::{Array, Blob, Dynamic, ImmutableString, Map};

use crate::resources::{ResourceCall, ResourceError, ResourceKind};

/// Longest table key, in bytes (node tables and table copies alike).
pub const MAX_TABLE_KEY: usize = 1024;

/// Largest table value, encoded, in bytes (node tables and table copies alike).
pub const MAX_TABLE_VALUE: usize = 4 << 20;

/// One in this many lines of a dataset copy has its start in the copy's index.
const INDEX_EVERY: u64 = 1024;

/// What an agent's copy of a resource holds.
#[derive(Debug, Clone)]
pub enum Copied {
    /// A dataset's files, in order.
    Dataset(CopiedDataset),
    /// A table's entries, by key (in key order, as a node's table lists them).
    Table(Map),
    /// A value.
    Value(Dynamic),
}

/// A dataset's files, and where every [`INDEX_EVERY`]-th line starts (worked out when the copy
/// is made or decoded, never encoded).
#[derive(Debug, Clone)]
pub struct CopiedDataset {
    files: Vec<Blob>,
    lines: u64,
    /// `(file, offset)` of lines 0, 1024, 2048, ...
    marks: Vec<(usize, usize)>,
}

impl CopiedDataset {
    /// A copy of a dataset of these files, in order.
    pub fn new(files: Vec<Blob>) -> CopiedDataset {
        let mut marks = Vec::new();
        let mut lines = 0u64;
        for (i, file) in files.iter().enumerate() {
            let mut start = 0;
            while start < file.len() {
                if lines % INDEX_EVERY == 0 {
                    marks.push((i, start));
                }
                lines += 1;
                start = memchr::memchr(b'\n', &file[start..]).map_or(file.len(), |n| start + n + 1);
            }
        }
        CopiedDataset {
            files,
            lines,
            marks,
        }
    }

    /// Its files.
    pub fn files(&self) -> &[Blob] {
        &self.files
    }

    /// Its length in bytes.
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.len() as u64).sum()
    }

    /// Its number of lines.
    pub fn line_count(&self) -> u64 {
        self.lines
    }

    /// `lines(start, count)`: up to `count` lines from line `start`, each at most `max_line`
    /// bytes, the agent's memory budget asked for each before it is kept.
    ///
    /// # Errors
    ///
    /// A line is too long, or over the budget.
    pub fn lines(&self, start: u64, count: u64, max_line: usize) -> Result<Array, ResourceError> {
        let mut out = Array::new();
        if start >= self.lines || count == 0 {
            return Ok(out);
        }
        let wanted = count.min(self.lines - start);
        let (mut file, mut at) = self.marks[(start / INDEX_EVERY) as usize];
        let mut line = start - start % INDEX_EVERY;
        while (out.len() as u64) < wanted {
            let Some(data) = self.files.get(file) else {
                break;
            };
            if at >= data.len() {
                file += 1;
                at = 0;
                continue;
            }
            let rest = &data[at..];
            let (mut text, used) = match memchr::memchr(b'\n', rest) {
                Some(n) => (&rest[..n], n + 1),
                None => (rest, rest.len()),
            };
            at += used;
            if line >= start {
                if rest.get(text.len()) == Some(&b'\n') {
                    text = text.strip_suffix(b"\r").unwrap_or(text);
                }
                if text.len() > max_line {
                    return Err(ResourceError::Failed(format!(
                        "lines: line {line} is longer than {max_line} bytes"
                    )));
                }
                let bytes = text.len() as u64 + 40;
                if !crate::memory_admits(bytes) {
                    return Err(ResourceError::OverMemory { bytes });
                }
                out.push(Dynamic::from(ImmutableString::from(
                    String::from_utf8_lossy(text).into_owned(),
                )));
            }
            line += 1;
        }
        Ok(out)
    }

    /// `read(offset, len)`: up to `len` bytes from byte `offset` (fewer at the end).
    pub fn read(&self, offset: u64, len: u64) -> Blob {
        let end = offset.saturating_add(len).min(self.size());
        let mut out = Blob::new();
        let mut file_start = 0u64;
        for file in &self.files {
            let file_end = file_start + file.len() as u64;
            let from = offset.max(file_start);
            let upto = end.min(file_end);
            if from < upto {
                out.extend_from_slice(
                    &file[(from - file_start) as usize..(upto - file_start) as usize],
                );
            }
            file_start = file_end;
        }
        out
    }
}

impl Copied {
    /// The type of resource it is a copy of.
    pub fn kind(&self) -> ResourceKind {
        match self {
            Copied::Dataset(_) => ResourceKind::Dataset,
            Copied::Table(_) => ResourceKind::Table,
            Copied::Value(_) => ResourceKind::Value,
        }
    }
}

/// Answers `call` from the copy `copy` (of the call's kind). A table copy's `set` and
/// `remove` change it, cloning it first if another handle shares it.
pub(crate) fn call(
    copy: &mut Arc<Copied>,
    call: ResourceCall<'_>,
    max_line: usize,
) -> Result<Dynamic, ResourceError> {
    let what = call.method();
    if matches!(call, ResourceCall::Set(..) | ResourceCall::Remove(_)) {
        let Copied::Table(entries) = Arc::make_mut(copy) else {
            return Err(not_a_method(&call, copy));
        };
        return match call {
            ResourceCall::Set(key, value) => {
                check_table_key(what, key)?;
                let encoded = crate::encode_portable(value)
                    .map_err(|e| ResourceError::Failed(format!("{what}: {e}")))?;
                if encoded.len() > MAX_TABLE_VALUE {
                    return Err(ResourceError::Failed(format!(
                        "{what}: a table value is at most {MAX_TABLE_VALUE} bytes encoded, this \
                         one is {}",
                        encoded.len()
                    )));
                }
                entries.insert(key.into(), value.clone());
                Ok(Dynamic::UNIT)
            }
            ResourceCall::Remove(key) => {
                check_table_key(what, key)?;
                Ok(entries.remove(key).unwrap_or(Dynamic::UNIT))
            }
            _ => Ok(Dynamic::UNIT),
        };
    }
    Ok(match (&**copy, call) {
        (Copied::Dataset(data), ResourceCall::Size) => Dynamic::from_int(data.size() as i64),
        (Copied::Dataset(data), ResourceCall::LineCount) => {
            Dynamic::from_int(data.line_count() as i64)
        }
        (Copied::Dataset(data), ResourceCall::Lines { start, count }) => {
            data.lines(start, count, max_line)?.into()
        }
        (Copied::Dataset(data), ResourceCall::Read { offset, len }) => {
            Dynamic::from_blob(data.read(offset, len))
        }
        (Copied::Table(entries), ResourceCall::Get(key)) => {
            entries.get(key).cloned().unwrap_or(Dynamic::UNIT)
        }
        (Copied::Table(entries), ResourceCall::Len) => Dynamic::from_int(entries.len() as i64),
        (Copied::Table(entries), ResourceCall::Keys { start, count }) => entries
            .keys()
            .skip(usize::try_from(start).unwrap_or(usize::MAX))
            .take(usize::try_from(count).unwrap_or(usize::MAX))
            .map(|k| Dynamic::from(ImmutableString::from(k.as_str())))
            .collect::<Array>()
            .into(),
        (Copied::Value(value), ResourceCall::Value) => value.clone(),
        (_, call) => return Err(not_a_method(&call, copy)),
    })
}

fn not_a_method(call: &ResourceCall<'_>, copy: &Copied) -> ResourceError {
    ResourceError::Failed(format!(
        "{}: not a method of a {}",
        call.method(),
        copy.kind()
    ))
}

/// A table key longer than [`MAX_TABLE_KEY`] is refused (by node tables and table copies
/// alike): the error names the method `what`.
///
/// # Errors
///
/// The key is too long.
pub fn check_table_key(what: &str, key: &str) -> Result<(), String> {
    if key.len() > MAX_TABLE_KEY {
        return Err(format!(
            "{what}: a table key is at most {MAX_TABLE_KEY} bytes, this one is {}",
            key.len()
        ));
    }
    Ok(())
}
