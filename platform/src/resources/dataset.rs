//! `dataset` resources: a read-only file, or a directory of files read as one, that agents read
//! in lines or byte ranges with bounded memory however large it is.
//!
//! The files and their lengths are fixed when the node opens the dataset: a read never goes
//! past them (a file that grew is read as it was; one that shrank is an error). A directory is
//! its regular files, in name order; a symbolic link or a subdirectory inside it is refused when
//! it is opened, so nothing outside it is ever read (agents give only line and byte positions,
//! never paths). A dataset that moved to this node with an agent has its files in the node's
//! store instead: the same reads go through a [`DatasetFiles`] of its own
//! (`store::moved_datasets`).
//!
//! Lines are what `\n` ends (a `\r` before it is dropped); a file's last line needs no `\n`, and
//! the next file starts a new line. To find line `n` without reading everything before it, the
//! first line operation builds a sparse index: where every [`INDEX_EVERY`]-th line starts (one
//! scan of the data, 16 bytes per 1,024 lines kept), after which `lines(n, k)` reads at most
//! 1,023 lines before the ones asked for.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One in this many lines has its start in the index.
const INDEX_EVERY: u64 = 1024;

/// How much is read from a file at a time while scanning it.
const SCAN_BUFFER: usize = 256 << 10;

/// How much is read from a file at a time while reading its lines.
const READ_BUFFER: usize = 64 << 10;

/// Why a dataset cannot be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// What could not be read.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something in a dataset directory that is not a regular file.
    #[error("{path}: a dataset directory holds only regular files (no links, no subdirectories)")]
    NotAFile {
        /// The entry refused.
        path: PathBuf,
    },
    /// A file shorter than when the dataset was opened.
    #[error("{path} changed since the node opened it")]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// A line longer than a read may return.
    #[error("line {line} is longer than {max} bytes")]
    LineTooLong {
        /// Its number (0-based).
        line: u64,
        /// The longest line returned.
        max: usize,
    },
}

/// Lines read by [`Dataset::lines`].
#[derive(Debug, PartialEq, Eq)]
pub struct Lines {
    /// The lines, in order.
    pub lines: Vec<String>,
    /// Bytes of the next line asked for, when `admits` refused it (the read stopped there).
    pub refused: Option<u64>,
}

/// Where the files of a dataset are kept.
pub trait DatasetFiles: Send + Sync + fmt::Debug {
    /// File `file` (0-based, in the dataset's order), opened for reading.
    ///
    /// # Errors
    ///
    /// It cannot be opened.
    fn open(&self, file: usize) -> Result<Box<dyn FileAt + '_>, DatasetError>;

    /// What to call file `file` in an error.
    fn name(&self, file: usize) -> PathBuf;
}

/// A file of a dataset, open for reading.
pub trait FileAt {
    /// Fills `buf` from byte `offset` of the file.
    ///
    /// # Errors
    ///
    /// The bytes cannot be read, or the file is shorter.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DatasetError>;
}

/// The files of a dataset of the node's configuration.
#[derive(Debug)]
struct OnDisk(Vec<PathBuf>);

impl DatasetFiles for OnDisk {
    fn open(&self, file: usize) -> Result<Box<dyn FileAt + '_>, DatasetError> {
        let path = self.name(file);
        // Not through a link: none was there when the dataset was opened, so one there now
        // was put in its place since (and could lead anywhere).
        let handle = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io(&path))?;
        Ok(Box::new(OpenFile { handle, path }))
    }

    fn name(&self, file: usize) -> PathBuf {
        self.0.get(file).cloned().unwrap_or_default()
    }
}

struct OpenFile {
    handle: File,
    path: PathBuf,
}

impl FileAt for OpenFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DatasetError> {
        self.handle
            .read_exact_at(buf, offset)
            .map_err(|_| DatasetError::Changed {
                path: self.path.clone(),
            })
    }
}

/// A file of a dataset and the length it had when the dataset was opened.
#[derive(Debug)]
struct DataFile {
    len: u64,
    /// Where it starts in the dataset's bytes.
    start: u64,
}

/// The bytes of one file from `at` to `end`, read through a [`FileAt`].
struct Section<'f> {
    file: &'f dyn FileAt,
    at: u64,
    end: u64,
}

impl Read for Section<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = usize::try_from(self.end - self.at).map_or(buf.len(), |left| left.min(buf.len()));
        self.file
            .read_exact_at(&mut buf[..n], self.at)
            .map_err(std::io::Error::other)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Where line `line` starts: file `file`, byte `offset`.
#[derive(Debug, Clone, Copy)]
struct Mark {
    line: u64,
    file: usize,
    offset: u64,
}

/// The sparse line index.
#[derive(Debug)]
struct LineIndex {
    lines: u64,
    marks: Vec<Mark>,
}

/// An opened dataset.
#[derive(Debug)]
pub struct Dataset {
    source: Box<dyn DatasetFiles>,
    files: Vec<DataFile>,
    size: u64,
    /// Built on the first line operation (one scan of the data), or why it could not be.
    index: OnceLock<Result<LineIndex, String>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Dataset {
    /// Opens the file or directory at `path`.
    ///
    /// # Errors
    ///
    /// It cannot be read, or a directory holds something other than regular files.
    pub fn open(path: &Path) -> Result<Dataset, DatasetError> {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        let mut paths = Vec::new();
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).map_err(io(path))? {
                let entry = entry.map_err(io(path))?;
                let kind = entry.file_type().map_err(io(&entry.path()))?;
                if !kind.is_file() {
                    return Err(DatasetError::NotAFile { path: entry.path() });
                }
                paths.push(entry.path());
            }
            paths.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        } else {
            // A link the operator configured is followed once, here.
            paths.push(std::fs::canonicalize(path).map_err(io(path))?);
        }
        let lens = paths
            .iter()
            .map(|path| Ok(std::fs::metadata(path).map_err(io(path))?.len()))
            .collect::<Result<Vec<u64>, DatasetError>>()?;
        Ok(Dataset::of(Box::new(OnDisk(paths)), &lens))
    }

    /// The dataset of files `source`, of lengths `lens`.
    pub fn of(source: Box<dyn DatasetFiles>, lens: &[u64]) -> Dataset {
        let mut files = Vec::with_capacity(lens.len());
        let mut size = 0u64;
        for &len in lens {
            files.push(DataFile { len, start: size });
            size = size.saturating_add(len);
        }
        Dataset {
            source,
            files,
            size,
            index: OnceLock::new(),
        }
    }

    /// The lengths of its files, in order.
    pub fn file_lens(&self) -> Vec<u64> {
        self.files.iter().map(|f| f.len).collect()
    }

    /// Its length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its number of lines.
    ///
    /// # Errors
    ///
    /// The data cannot be read.
    pub fn line_count(&self) -> Result<u64, DatasetError> {
        Ok(self.index()?.lines)
    }

    fn index(&self) -> Result<&LineIndex, DatasetError> {
        self.index
            .get_or_init(|| self.build_index().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| DatasetError::Io {
                path: self.source.name(0),
                source: std::io::Error::other(e.clone()),
            })
    }

    fn build_index(&self) -> Result<LineIndex, DatasetError> {
        let mut marks = Vec::new();
        let mut line = 0u64;
        let mut buffer = vec![0u8; SCAN_BUFFER];
        for (i, file) in self.files.iter().enumerate() {
            if file.len == 0 {
                continue;
            }
            let handle = self.source.open(i)?;
            // A line starts at the file's start, and after every `\n` but one that ends it.
            let mut line_start = Some(0u64);
            let mut at = 0u64;
            while at < file.len {
                let want = usize::try_from(file.len - at)
                    .map_or(buffer.len(), |left| left.min(buffer.len()));
                let chunk = &mut buffer[..want];
                handle.read_exact_at(chunk, at)?;
                let mut from = 0;
                loop {
                    if let Some(start) = line_start.take() {
                        if line % INDEX_EVERY == 0 {
                            marks.push(Mark {
                                line,
                                file: i,
                                offset: start,
                            });
                        }
                        line += 1;
                    }
                    match memchr::memchr(b'\n', &chunk[from..]) {
                        Some(n) => {
                            let next = at + (from + n) as u64 + 1;
                            if next < file.len {
                                line_start = Some(next);
                            }
                            from += n + 1;
                        }
                        None => break,
                    }
                }
                at += want as u64;
            }
        }
        Ok(LineIndex { lines: line, marks })
    }

    /// Up to `count` lines from line `start` (0-based), each at most `max_line` bytes, as text
    /// (invalid UTF-8 replaced). `admits(bytes)` is asked before each line is kept: when it says
    /// no, the read stops there ([`Lines::refused`]).
    ///
    /// # Errors
    ///
    /// The data cannot be read, or a line is too long.
    pub fn lines(
        &self,
        start: u64,
        count: u64,
        max_line: usize,
        mut admits: impl FnMut(u64) -> bool,
    ) -> Result<Lines, DatasetError> {
        let index = self.index()?;
        let mut out = Lines {
            lines: Vec::new(),
            refused: None,
        };
        if start >= index.lines || count == 0 {
            return Ok(out);
        }
        let Some(mark) = index.marks.get((start / INDEX_EVERY) as usize).copied() else {
            return Ok(out);
        };
        let wanted = count.min(index.lines - start);
        let mut line = mark.line;
        let mut buffer = Vec::new();
        for (i, file) in self.files.iter().enumerate().skip(mark.file) {
            let offset = if i == mark.file { mark.offset } else { 0 };
            if offset >= file.len {
                continue;
            }
            let handle = self.source.open(i)?;
            let path = self.source.name(i);
            let section = Section {
                file: handle.as_ref(),
                at: offset,
                end: file.len,
            };
            let mut reader = BufReader::with_capacity(READ_BUFFER, section);
            loop {
                if line < start {
                    if !skip_line(&mut reader).map_err(io(&path))? {
                        break;
                    }
                    line += 1;
                    continue;
                }
                buffer.clear();
                let read = (&mut reader)
                    .take(max_line as u64 + 2)
                    .read_until(b'\n', &mut buffer)
                    .map_err(io(&path))?;
                if read == 0 {
                    break;
                }
                if buffer.last() == Some(&b'\n') {
                    buffer.pop();
                    if buffer.last() == Some(&b'\r') {
                        buffer.pop();
                    }
                } else if buffer.len() > max_line {
                    return Err(DatasetError::LineTooLong {
                        line,
                        max: max_line,
                    });
                }
                if buffer.len() > max_line {
                    return Err(DatasetError::LineTooLong {
                        line,
                        max: max_line,
                    });
                }
                // A `String` and its place in the array the agent gets.
                let bytes = buffer.len() as u64 + 40;
                if !admits(bytes) {
                    out.refused = Some(bytes);
                    return Ok(out);
                }
                out.lines
                    .push(String::from_utf8_lossy(&buffer).into_owned());
                line += 1;
                if out.lines.len() as u64 == wanted {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// The bytes of each of its files, in order: a copy of it, `size` bytes in all.
    ///
    /// # Errors
    ///
    /// A file cannot be read, or is shorter than when the dataset was opened.
    pub fn read_files(&self) -> Result<Vec<Vec<u8>>, DatasetError> {
        self.files
            .iter()
            .enumerate()
            .map(|(i, file)| {
                let mut bytes = vec![0u8; file.len as usize];
                self.source.open(i)?.read_exact_at(&mut bytes, 0)?;
                Ok(bytes)
            })
            .collect()
    }

    /// Up to `len` bytes from byte `offset` (fewer at the end; none past it).
    ///
    /// # Errors
    ///
    /// The data cannot be read.
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, DatasetError> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let first = self.files.partition_point(|f| f.start + f.len <= offset);
        let mut at = offset;
        for (i, file) in self.files.iter().enumerate().skip(first) {
            if at >= end {
                break;
            }
            let from = at - file.start;
            let upto = (end - file.start).min(file.len);
            if from >= upto {
                continue;
            }
            let place = (at - offset) as usize;
            let slot = &mut out[place..place + (upto - from) as usize];
            self.source.open(i)?.read_exact_at(slot, from)?;
            at = file.start + upto;
        }
        Ok(out)
    }
}

/// Reads past the next line without keeping it: whether there was one.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<bool> {
    let mut any = false;
    loop {
        let (done, used) = {
            let available = reader.fill_buf()?;
            if available.is_empty() {
                return Ok(any);
            }
            any = true;
            match memchr::memchr(b'\n', available) {
                Some(n) => (true, n + 1),
                None => (false, available.len()),
            }
        };
        reader.consume(used);
        if done {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write");
    }

    /// Every way of reading a dataset against the obvious answer from its whole text.
    fn check(dataset: &Dataset, text: &str) {
        let expected = file_lines(text);
        assert_eq!(dataset.line_count().expect("count"), expected.len() as u64);
        for start in 0..expected.len() as u64 + 2 {
            for count in [0, 1, 2, 5, 3000] {
                let got = dataset
                    .lines(start, count, 1 << 20, |_| true)
                    .expect("lines")
                    .lines;
                let want: Vec<String> = expected
                    .iter()
                    .skip(start as usize)
                    .take(count as usize)
                    .cloned()
                    .collect();
                assert_eq!(got, want, "lines({start}, {count})");
            }
        }
        assert_eq!(dataset.size(), text.len() as u64);
        for offset in [
            0,
            1,
            7,
            text.len() as u64 / 2,
            text.len() as u64,
            text.len() as u64 + 5,
        ] {
            for len in [0, 1, 3, 100, 1 << 20] {
                let got = dataset.read(offset, len).expect("read");
                let from = (offset as usize).min(text.len());
                let to = (offset.saturating_add(len) as usize).min(text.len());
                assert_eq!(got, text.as_bytes()[from..to], "read({offset}, {len})");
            }
        }
    }

    /// The lines of one file's text.
    fn file_lines(text: &str) -> Vec<String> {
        if text.is_empty() {
            return Vec::new();
        }
        let body = text.strip_suffix('\n').unwrap_or(text);
        body.split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
            .collect()
    }

    #[test]
    fn a_file_reads_as_its_lines_and_bytes() {
        let dir = tempfile::tempdir().expect("dir");
        for (i, text) in ["", "one", "one\n", "a\r\nb\n\nc", "\n\n\n"]
            .iter()
            .enumerate()
        {
            let name = format!("f{i}");
            write(dir.path(), &name, text);
            check(&Dataset::open(&dir.path().join(name)).expect("open"), text);
        }
    }

    #[test]
    fn a_directory_reads_as_its_files_in_name_order_each_starting_a_line() {
        let dir = tempfile::tempdir().expect("dir");
        let parts = ["x\ny", "", "z\n", "last"];
        for (i, text) in parts.iter().enumerate() {
            write(dir.path(), &format!("part-{i}"), text);
        }
        let dataset = Dataset::open(dir.path()).expect("open");
        let lines: Vec<String> = parts.iter().flat_map(|p| file_lines(p)).collect();
        assert_eq!(lines, ["x", "y", "z", "last"]);
        assert_eq!(dataset.line_count().expect("count"), 4);
        assert_eq!(
            dataset.lines(1, 10, 100, |_| true).expect("lines").lines,
            lines[1..]
        );
        assert_eq!(dataset.read(0, 100).expect("read"), b"x\nyz\nlast");
        assert_eq!(dataset.read(2, 3).expect("read"), b"yz\n");
    }

    #[test]
    fn many_lines_are_found_through_the_index() {
        let dir = tempfile::tempdir().expect("dir");
        let text: String = (0..5000).map(|i| format!("line {i}\n")).collect();
        write(dir.path(), "a", &text);
        let dataset = Dataset::open(&dir.path().join("a")).expect("open");
        assert_eq!(dataset.line_count().expect("count"), 5000);
        for start in [0, 1023, 1024, 1025, 4095, 4999] {
            let got = dataset.lines(start, 2, 100, |_| true).expect("lines").lines;
            let want: Vec<String> = (start..5000.min(start + 2))
                .map(|i| format!("line {i}"))
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn links_and_subdirectories_in_a_dataset_directory_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        write(dir.path(), "ok", "fine");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("escape")).expect("link");
        let err = Dataset::open(dir.path()).expect_err("a link");
        assert!(err.to_string().contains("escape"), "{err}");
        std::fs::remove_file(dir.path().join("escape")).expect("rm");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        let err = Dataset::open(dir.path()).expect_err("a subdirectory");
        assert!(err.to_string().contains("sub"), "{err}");
    }

    /// A file of a dataset swapped for a link after the dataset was opened is not followed:
    /// reading it is an error naming it, never the link's target. A dataset configured as a
    /// link to a file reads that file.
    #[test]
    fn a_file_swapped_for_a_link_after_opening_is_not_followed() {
        let (dir, outside) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        write(dir.path(), "a", "inside\n");
        write(outside.path(), "secret", "SECRET\n");
        let secret = outside.path().join("secret");
        let swapped = |path: &Path| {
            std::fs::remove_file(path).expect("rm");
            std::os::unix::fs::symlink(&secret, path).expect("link");
        };
        let directory = Dataset::open(dir.path()).expect("a directory");
        swapped(&dir.path().join("a"));
        let err = directory
            .lines(0, 1, 100, |_| true)
            .expect_err("not followed");
        let named = dir.path().join("a").display().to_string();
        assert!(err.to_string().contains(&named), "{err}");
        assert!(directory.read(0, 7).is_err());

        write(dir.path(), "b", "inside\n");
        std::os::unix::fs::symlink(dir.path().join("b"), outside.path().join("link"))
            .expect("link");
        let linked = Dataset::open(&outside.path().join("link")).expect("a link to a file");
        assert_eq!(
            linked.lines(0, 1, 100, |_| true).expect("read").lines,
            ["inside"]
        );
        let single = Dataset::open(&dir.path().join("b")).expect("a file");
        swapped(&dir.path().join("b"));
        assert!(single.lines(0, 1, 100, |_| true).is_err());
    }

    #[test]
    fn long_lines_and_the_memory_budget_stop_a_read() {
        let dir = tempfile::tempdir().expect("dir");
        write(
            dir.path(),
            "a",
            &format!("short\n{}\nshort\n", "x".repeat(100)),
        );
        let dataset = Dataset::open(&dir.path().join("a")).expect("open");
        assert!(matches!(
            dataset.lines(0, 3, 50, |_| true),
            Err(DatasetError::LineTooLong { line: 1, max: 50 })
        ));
        assert_eq!(
            dataset.lines(2, 1, 50, |_| true).expect("skips it").lines,
            ["short"]
        );
        let mut budget = 100u64;
        let admits = |bytes: u64| {
            let fits = bytes <= budget;
            budget = budget.saturating_sub(bytes);
            fits
        };
        assert_eq!(
            dataset.lines(0, 3, 1000, admits).expect("a page"),
            Lines {
                lines: vec!["short".into()],
                refused: Some(140)
            }
        );
    }

    #[test]
    fn a_file_that_shrank_is_an_error_not_a_short_read() {
        let dir = tempfile::tempdir().expect("dir");
        write(dir.path(), "a", "0123456789");
        let dataset = Dataset::open(&dir.path().join("a")).expect("open");
        write(dir.path(), "a", "01");
        assert!(matches!(
            dataset.read(0, 10),
            Err(DatasetError::Changed { .. })
        ));
    }

    /// The same files as a dataset of the node and as an agent's copy of it
    /// (`agent_lang::CopiedDataset`), which must answer every call alike.
    fn compare_with_copy(files: &[Vec<u8>], calls: &[(u64, u64, usize)]) {
        let dir = tempfile::tempdir().expect("dir");
        for (i, bytes) in files.iter().enumerate() {
            std::fs::write(dir.path().join(format!("{i:03}")), bytes).expect("write");
        }
        let dataset = Dataset::open(dir.path()).expect("opens");
        let copy = agent_lang::CopiedDataset::new(dataset.read_files().expect("reads"));
        assert_eq!(copy.files(), files);
        assert_eq!(copy.size(), dataset.size());
        assert_eq!(copy.line_count(), dataset.line_count().expect("count"));
        for &(start, count, max_line) in calls {
            let node = dataset.lines(start, count, max_line, |_| true);
            let copied = copy.lines(start, count, max_line);
            match (node, copied) {
                (Ok(node), Ok(copied)) => {
                    let copied: Vec<String> = copied.into_iter().map(|l| l.to_string()).collect();
                    assert_eq!(node.lines, copied, "lines({start}, {count}) max {max_line}");
                }
                (Err(DatasetError::LineTooLong { line, .. }), Err(e)) => {
                    assert!(format!("{e:?}").contains(&format!("line {line} ")), "{e:?}");
                }
                (node, copied) => panic!("lines({start}, {count}): {node:?} vs {copied:?}"),
            }
            assert_eq!(
                dataset.read(start, count).expect("read"),
                copy.read(start, count),
                "read({start}, {count})"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn a_copy_answers_as_the_dataset_it_was_taken_from(
            files in proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(b"ab\r\n".to_vec()), 0..40),
                1..4,
            ),
            calls in proptest::collection::vec((0u64..50, 0u64..50, 0usize..8), 1..8),
        ) {
            compare_with_copy(&files, &calls);
        }
    }

    #[test]
    fn a_copy_of_many_lines_finds_them_through_its_index_as_the_dataset_does() {
        let file = |from: usize, n: usize| {
            (from..from + n)
                .map(|i| format!("line {i}\r\n"))
                .collect::<String>()
                .into_bytes()
        };
        let files = [
            file(0, 1500),
            Vec::new(),
            file(1500, 1100),
            b"last".to_vec(),
        ];
        let calls: Vec<_> = [
            0, 1, 1023, 1024, 1025, 1499, 1500, 2047, 2048, 2599, 2600, 2601,
        ]
        .into_iter()
        .flat_map(|start| [(start, 1, 64), (start, 3, 64), (start, 2000, 64)])
        .collect();
        compare_with_copy(&files, &calls);
    }
}
