//! Portable values: the subset of Rhai values with a stable encoding that may travel in a
//! continuation, their CBOR form, and their JSON form for results.
//!
//! CBOR mapping (independent of Rhai's internal layout): unit → null, bool → bool, integer →
//! integer, float → float, string → text, blob → byte string, array → array, map → map with text
//! keys, char → tag [`TAG_CHAR`] over its code point, function pointer without captures → tag
//! [`TAG_FN_PTR`] over its name, byte (the `u8` items a `for` over a blob gives) → tag
//! [`TAG_BYTE`] over its value, resource handle → tag [`TAG_RESOURCE`] over `[name, type code,
//! node bound at]`, with a fourth item for a handle that carries a copy (a dataset's files as an
//! array of byte strings, a table's entries as a map, a value as itself). Anything else is
//! refused, naming where it was found.

use ciborium_ll::{simple, Encoder, Header};
use rhai::{Array, Blob, Dynamic, FnPtr, ImmutableString, Map};

use std::sync::Arc;

use crate::closures::ClosureNames;
use crate::compile::ProgramInner;
use crate::copies::{Copied, CopiedDataset};
use crate::resources::{is_valid_resource_name, Resource, ResourceKind};

/// CBOR tag of a `char` (its Unicode scalar value follows).
pub const TAG_CHAR: u64 = 0x7465_726E_0001;
/// CBOR tag of a function pointer (its function name follows).
pub const TAG_FN_PTR: u64 = 0x7465_726E_0002;
/// CBOR tag of a byte, Rhai's `u8` (its value follows): what `for x in blob` gives as `x`.
pub const TAG_BYTE: u64 = 0x7465_726E_0003;
/// CBOR tag of a resource handle (`[name, type code, node bound at]` follows).
pub const TAG_RESOURCE: u64 = 0x7465_726E_0004;

/// Deepest nesting of arrays and maps that is encoded or decoded.
pub(crate) const MAX_DEPTH: usize = 128;

/// Why a value cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// A value of a type that cannot travel.
    #[error("{what} holds a value of type '{type_name}', which cannot travel between nodes (portable: (), bool, int, float, char, string, blob, array, map, Fn pointers without captures, resource handles)")]
    NotPortable {
        /// Where the value was found (e.g. "variable 'x' in function 'f'").
        what: String,
        /// Rhai's name for its type.
        type_name: String,
    },
    /// Arrays or maps nested deeper than [`MAX_DEPTH`].
    #[error("{what} is nested too deeply")]
    TooDeep {
        /// Where the value was found.
        what: String,
    },
}

/// A CBOR writer into a growing byte vector, writing the shortest (canonical) head of every item.
///
/// It writes heads itself rather than through ciborium-ll's `Encoder`: an array of numbers is
/// one head per element, and a fixed-size copy followed by a truncation is several times faster
/// than the variable-length copy behind `io::Write` (floats, rare, still go through ciborium-ll
/// so they keep its choice of the shortest exact width). The output is the same canonical CBOR.
pub(crate) struct Enc {
    out: Vec<u8>,
    /// Where [`Enc::int_run`] assembles heads: allocated (and zeroed) once per encoding, on the
    /// first array of numbers, rather than a stack buffer zeroed on every run.
    scratch: Vec<u8>,
}

impl Enc {
    /// An encoder appending to `out`.
    pub(crate) fn from_vec(out: Vec<u8>) -> Self {
        Enc {
            out,
            scratch: Vec::new(),
        }
    }

    /// Bytes written so far.
    pub(crate) fn len(&self) -> usize {
        self.out.len()
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.out
    }

    /// Makes room for `additional` more bytes (a size estimate; writing more still works).
    fn reserve(&mut self, additional: usize) {
        self.out.reserve(additional);
    }

    /// The head of an item of major type `major` (already shifted into the top 3 bits) with
    /// argument `arg`, in its shortest form.
    #[inline(always)]
    fn head(&mut self, major: u8, arg: u64) {
        let (initial, arg_bytes, len) = head_parts(major, arg);
        let end = self.out.len() + len;
        self.out.push(initial);
        self.out.extend_from_slice(&arg_bytes);
        self.out.truncate(end);
    }

    /// Writes the leading integers of `items`, at most [`INT_RUN`] of them, and returns how
    /// many it wrote (0 if the first item is not an integer).
    ///
    /// The heads are assembled in a scratch buffer and appended with one copy: appending each
    /// to the vector on its own costs a capacity check and a length update in memory per
    /// number, which dominates encoding an array of numbers.
    fn int_run(&mut self, items: &[Dynamic]) -> usize {
        if self.scratch.is_empty() {
            self.scratch = vec![0; INT_RUN * 9];
        }
        let buf = &mut self.scratch[..];
        let mut at = 0;
        let mut count = 0;
        for item in items.iter().take(INT_RUN) {
            let Ok(n) = item.as_int() else { break };
            let (major, arg) = if n >= 0 {
                (0x00, n as u64)
            } else {
                (0x20, !(n as u64))
            };
            let (initial, arg_bytes, len) = head_parts(major, arg);
            if let Some(slot) = buf.get_mut(at..at + 9) {
                slot[0] = initial;
                slot[1..].copy_from_slice(&arg_bytes);
            }
            at += len;
            count += 1;
        }
        self.out.extend_from_slice(&buf[..at]);
        count
    }

    pub(crate) fn uint(&mut self, n: u64) {
        self.head(0x00, n);
    }

    #[inline(always)]
    pub(crate) fn int(&mut self, n: i64) {
        if n >= 0 {
            self.head(0x00, n as u64);
        } else {
            self.head(0x20, !(n as u64));
        }
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.head(0x40, b.len() as u64);
        self.out.extend_from_slice(b);
    }

    pub(crate) fn text(&mut self, s: &str) {
        self.head(0x60, s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }

    pub(crate) fn array(&mut self, n: usize) {
        self.head(0x80, n as u64);
    }

    pub(crate) fn map(&mut self, n: usize) {
        self.head(0xa0, n as u64);
    }

    pub(crate) fn tag(&mut self, t: u64) {
        self.head(0xc0, t);
    }

    pub(crate) fn bool(&mut self, b: bool) {
        self.out
            .push(0xe0 | if b { simple::TRUE } else { simple::FALSE });
    }

    pub(crate) fn null(&mut self) {
        self.out.push(0xe0 | simple::NULL);
    }

    pub(crate) fn float(&mut self, f: f64) {
        // Every NaN is written as the one quiet NaN: a NaN's sign and payload do not survive
        // the shortest-form encoding and the half-float decoding alike, and bytes decoded then
        // encoded again must not change on the second round (found by fuzzing).
        let f = if f.is_nan() { f64::NAN } else { f };
        // Writing into a Vec cannot fail.
        let _ = Encoder::from(&mut self.out).push(Header::Float(f));
    }
}

/// How many integers [`Enc::int_run`] writes at a time.
const INT_RUN: usize = 256;

/// A head in its shortest form: the initial byte (major type `major`, already shifted into the
/// top 3 bits, and the additional information), the argument's big-endian bytes with the
/// significant ones first, and the head's length (the initial byte and the bytes of the
/// argument that belong to it).
#[inline(always)]
fn head_parts(major: u8, arg: u64) -> (u8, [u8; 8], usize) {
    let (info, len) = if arg < 24 {
        (arg as u8, 1)
    } else if arg <= u8::MAX as u64 {
        (24, 2)
    } else if arg <= u16::MAX as u64 {
        (25, 3)
    } else if arg <= u32::MAX as u64 {
        (26, 5)
    } else {
        (27, 9)
    };
    // For a one-byte head the shift wraps to 0; none of those bytes belong to the head.
    let arg_bytes = arg.wrapping_shl(8 * (9 - len as u32)).to_be_bytes();
    (major | info, arg_bytes, len)
}

/// Encoded size of an integer.
fn int_len(n: i64) -> usize {
    let arg = if n >= 0 { n as u64 } else { !(n as u64) };
    match arg {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// Encodes `value`; `what` names it in errors.
/// A rough encoded size of `value` (see `Execution::encoded_len_hint`): an array longer than
/// `SAMPLED` counts as that many times its largest item among the first and last few, so the
/// hint stays cheap.
pub(crate) fn len_hint(value: &Dynamic, depth: usize) -> usize {
    const SAMPLED: usize = 16;
    if depth > MAX_DEPTH {
        return 9;
    }
    if let Some(s) = value.read_lock::<ImmutableString>() {
        s.len() + 9
    } else if let Some(b) = value.read_lock::<Blob>() {
        b.len() + 9
    } else if let Some(a) = value.read_lock::<Array>() {
        // The first and the last items (numbers that grow along the array are sized by the
        // largest ones).
        let half = SAMPLED / 2;
        let sample = if a.len() <= SAMPLED {
            a.iter().map(|v| len_hint(v, depth + 1)).sum::<usize>()
        } else {
            let ends = a[..half].iter().chain(&a[a.len() - half..]);
            let most = ends.map(|v| len_hint(v, depth + 1)).max().unwrap_or(1);
            most.saturating_mul(SAMPLED)
        };
        let sampled = a.len().clamp(1, SAMPLED);
        9 + sample.saturating_mul(a.len()) / sampled
    } else if let Some(m) = value.read_lock::<Map>() {
        m.iter().fold(9, |n, (k, v)| {
            n.saturating_add(k.len() + 9 + len_hint(v, depth + 1))
        })
    } else if let Ok(n) = value.as_int() {
        int_len(n)
    } else if let Some(r) = value.read_lock::<Resource>() {
        let copy = match r.copy.as_deref() {
            None => 0,
            Some(Copied::Dataset(data)) => data.files().iter().map(|f| f.len() + 9).sum(),
            Some(Copied::Table(entries)) => entries.iter().fold(9usize, |n, (k, v)| {
                n.saturating_add(k.len() + 9 + len_hint(v, depth + 1))
            }),
            Some(Copied::Value(v)) => len_hint(v, depth + 1),
        };
        r.name.len() + r.bound_at.len() + 24 + copy
    } else {
        9
    }
}

pub(crate) fn encode_value(
    enc: &mut Enc,
    closures: &ClosureNames,
    value: &Dynamic,
    what: &dyn Fn() -> String,
    depth: usize,
) -> Result<(), ValueError> {
    if depth > MAX_DEPTH {
        return Err(ValueError::TooDeep { what: what() });
    }
    if value.is_shared() {
        return encode_value(enc, closures, &value.flatten_clone(), what, depth);
    }
    if let Ok(n) = value.as_int() {
        enc.int(n);
    } else if value.is_unit() {
        enc.null();
    } else if let Ok(b) = value.as_bool() {
        enc.bool(b);
    } else if let Ok(f) = value.as_float() {
        enc.float(f);
    } else if let Ok(c) = value.as_char() {
        enc.tag(TAG_CHAR);
        enc.uint(c as u64);
    } else if let Some(s) = value.read_lock::<ImmutableString>() {
        enc.text(s.as_str());
    } else if let Some(b) = value.read_lock::<Blob>() {
        enc.bytes(&b);
    } else if let Some(a) = value.read_lock::<Array>() {
        enc.array(a.len());
        // Size estimate: every item as long as the first (exact for the common bulky state, an
        // array of numbers of one magnitude); the vector still grows if it was too small.
        let each = a.first().and_then(|v| v.as_int().ok()).map_or(1, int_len);
        enc.reserve(a.len().saturating_mul(each));
        let mut i = 0;
        while let Some(rest) = a.get(i..).filter(|r| !r.is_empty()) {
            let ints = enc.int_run(rest);
            i += ints;
            if ints == 0 {
                encode_value(
                    enc,
                    closures,
                    &rest[0],
                    &|| format!("{}[{i}]", what()),
                    depth + 1,
                )?;
                i += 1;
            }
        }
    } else if let Some(m) = value.read_lock::<Map>() {
        enc.map(m.len());
        for (k, v) in m.iter() {
            enc.text(k.as_str());
            encode_value(enc, closures, v, &|| format!("{}.{k}", what()), depth + 1)?;
        }
    } else if let Some(f) = value.read_lock::<FnPtr>() {
        if f.is_curried() {
            return Err(ValueError::NotPortable {
                what: what(),
                type_name: "closure with captured variables".into(),
            });
        }
        enc.tag(TAG_FN_PTR);
        enc.text(closures.portable(f.fn_name()));
    } else if let Some(b) = value.read_lock::<u8>() {
        enc.tag(TAG_BYTE);
        enc.uint(u64::from(*b));
    } else if let Some(r) = value.read_lock::<Resource>() {
        enc.tag(TAG_RESOURCE);
        enc.array(if r.copy.is_some() { 4 } else { 3 });
        enc.text(&r.name);
        enc.uint(r.kind.code());
        enc.text(&r.bound_at);
        match r.copy.as_deref() {
            None => {}
            Some(Copied::Dataset(data)) => {
                enc.array(data.files().len());
                for file in data.files() {
                    enc.bytes(file);
                }
            }
            Some(Copied::Table(entries)) => {
                enc.map(entries.len());
                for (k, v) in entries {
                    enc.text(k.as_str());
                    let what = || format!("{}.{k}", what());
                    encode_value(enc, closures, v, &what, depth + 1)?;
                }
            }
            Some(Copied::Value(v)) => encode_value(enc, closures, v, what, depth + 1)?,
        }
    } else {
        return Err(ValueError::NotPortable {
            what: what(),
            type_name: value.type_name().to_string(),
        });
    }
    Ok(())
}

/// A decoding error: what was wrong, at which byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed(pub(crate) String, pub(crate) usize);

/// A CBOR reader over a byte slice that never allocates more than the input could hold.
///
/// It parses item heads itself (into ciborium-ll's [`Header`]): per-item overhead is what bounds
/// decoding a state of many small values, and a direct slice cursor is several times faster than
/// going through an `io::Read`.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    pub(crate) fn offset(&mut self) -> usize {
        self.pos
    }

    fn remaining(&mut self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(crate) fn fail<T>(&mut self, what: impl Into<String>) -> Result<T, Malformed> {
        Err(Malformed(what.into(), self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        match self.bytes.get(self.pos..self.pos.saturating_add(n)) {
            Some(s) if self.pos.checked_add(n).is_some() => {
                self.pos += n;
                Ok(s)
            }
            _ => Err(Malformed("truncated".into(), self.pos)),
        }
    }

    /// The argument of an item head with additional information `info`.
    fn argument(&mut self, info: u8) -> Result<u64, Malformed> {
        Ok(match info {
            0..=23 => info as u64,
            24 => self.take(1)?[0] as u64,
            25 => u16::from_be_bytes([self.take(1)?[0], self.take(1)?[0]]) as u64,
            26 => {
                let b = self.take(4)?;
                u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64
            }
            27 => {
                let b = self.take(8)?;
                u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }
            _ => {
                return Err(Malformed(
                    "invalid or indefinite-length CBOR item".into(),
                    self.pos,
                ))
            }
        })
    }

    pub(crate) fn header(&mut self) -> Result<Header, Malformed> {
        let at = self.pos;
        let initial = self.take(1)?[0];
        let (major, info) = (initial >> 5, initial & 0x1f);
        let len =
            |n: u64| usize::try_from(n).map_err(|_| Malformed("length out of range".into(), at));
        Ok(match major {
            0 => Header::Positive(self.argument(info)?),
            1 => Header::Negative(self.argument(info)?),
            2 => Header::Bytes(Some(len(self.argument(info)?)?)),
            3 => Header::Text(Some(len(self.argument(info)?)?)),
            4 => Header::Array(Some(len(self.argument(info)?)?)),
            5 => Header::Map(Some(len(self.argument(info)?)?)),
            6 => Header::Tag(self.argument(info)?),
            _ => match info {
                0..=23 => Header::Simple(info),
                24 => Header::Simple(self.take(1)?[0]),
                25 => Header::Float(f16_to_f64(self.argument(25)? as u16)),
                26 => Header::Float(f32::from_bits(self.argument(26)? as u32) as f64),
                27 => Header::Float(f64::from_bits(self.argument(27)?)),
                _ => return Err(Malformed("invalid CBOR".into(), at)),
            },
        })
    }

    /// The `len` bytes of a string's payload, borrowed from the input.
    fn payload(&mut self, len: usize) -> Result<&'a [u8], Malformed> {
        if len > self.remaining() {
            return self.fail(format!("length {len} runs past the end of the input"));
        }
        self.take(len)
    }

    pub(crate) fn uint(&mut self) -> Result<u64, Malformed> {
        match self.header()? {
            Header::Positive(n) => Ok(n),
            _ => self.fail("expected an unsigned integer"),
        }
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Malformed> {
        let n = self.uint()?;
        u32::try_from(n).or_else(|_| self.fail("integer out of range"))
    }

    pub(crate) fn int(&mut self) -> Result<i64, Malformed> {
        match self.header()? {
            Header::Positive(n) if n <= i64::MAX as u64 => Ok(n as i64),
            Header::Negative(n) if n <= i64::MAX as u64 => Ok(!(n as i64)),
            _ => self.fail("expected an integer"),
        }
    }

    pub(crate) fn bool(&mut self) -> Result<bool, Malformed> {
        match self.header()? {
            Header::Simple(simple::TRUE) => Ok(true),
            Header::Simple(simple::FALSE) => Ok(false),
            _ => self.fail("expected a boolean"),
        }
    }

    pub(crate) fn text(&mut self) -> Result<String, Malformed> {
        self.str().map(String::from)
    }

    /// A resource handle's `[name, type code, node bound at]`, checked, and whether a copy
    /// follows (a fourth item).
    fn resource(&mut self) -> Result<(Resource, bool), Malformed> {
        let copy = match self.header()? {
            Header::Array(Some(3)) => false,
            Header::Array(Some(4)) => true,
            _ => return self.fail("a resource handle is an array of 3 or 4 items"),
        };
        let name = self.str()?;
        if !is_valid_resource_name(name) {
            return self.fail("invalid resource name");
        }
        let Some(kind) = ResourceKind::from_code(self.uint()?) else {
            return self.fail("unknown resource type");
        };
        let bound_at = self.str()?;
        if bound_at.is_empty() || bound_at.len() > 64 {
            return self.fail("invalid node name in a resource handle");
        }
        let handle = Resource {
            name: name.into(),
            kind,
            bound_at: bound_at.into(),
            copy: None,
        };
        Ok((handle, copy))
    }

    /// The copy of a resource of type `kind` that a handle carries: a dataset's files (an array
    /// of byte strings), a table's entries (a map) or a value. Built when `build`, otherwise
    /// only read past, accepting exactly the same bytes.
    fn copy(
        &mut self,
        kind: ResourceKind,
        prog: &ProgramInner,
        depth: usize,
        build: bool,
    ) -> Result<Option<Copied>, Malformed> {
        // The next item's CBOR major type, without reading it.
        let major = self.bytes.get(self.pos).map(|b| b >> 5);
        Ok(match kind {
            ResourceKind::Dataset => {
                let n = match self.header()? {
                    Header::Array(Some(n)) if n <= self.remaining() => n,
                    _ => return self.fail("a dataset copy is an array of byte strings"),
                };
                let mut files = Vec::with_capacity(if build { n } else { 0 });
                for _ in 0..n {
                    let file = match self.header()? {
                        Header::Bytes(Some(len)) => self.payload(len)?,
                        _ => return self.fail("a dataset copy is an array of byte strings"),
                    };
                    if build {
                        files.push(file.to_vec());
                    }
                }
                build.then(|| Copied::Dataset(CopiedDataset::new(files)))
            }
            ResourceKind::Table if major != Some(5) => {
                return self.fail("a table copy is a map");
            }
            ResourceKind::Table | ResourceKind::Value if !build => {
                self.skip_value(prog, depth + 1)?;
                None
            }
            ResourceKind::Table => {
                let entries = self.value(prog, depth + 1)?;
                Some(Copied::Table(entries.cast::<Map>()))
            }
            ResourceKind::Value => Some(Copied::Value(self.value(prog, depth + 1)?)),
        })
    }

    fn str(&mut self) -> Result<&'a str, Malformed> {
        match self.header()? {
            Header::Text(Some(len)) => self.text_payload(len),
            _ => self.fail("expected a text string"),
        }
    }

    fn text_payload(&mut self, len: usize) -> Result<&'a str, Malformed> {
        let at = self.pos;
        std::str::from_utf8(self.payload(len)?)
            .map_err(|_| Malformed("invalid UTF-8 in text".into(), at))
    }

    pub(crate) fn bytes(&mut self) -> Result<Vec<u8>, Malformed> {
        match self.header()? {
            Header::Bytes(Some(len)) => self.payload(len).map(<[u8]>::to_vec),
            _ => self.fail("expected a byte string"),
        }
    }

    /// An array header of definite length (each element takes at least one byte).
    pub(crate) fn array(&mut self) -> Result<usize, Malformed> {
        match self.header()? {
            Header::Array(Some(n)) if n <= self.remaining() => Ok(n),
            Header::Array(Some(n)) => {
                self.fail(format!("array of {n} items runs past the end of the input"))
            }
            _ => self.fail("expected an array"),
        }
    }

    /// Either null (None) or whatever `f` reads.
    pub(crate) fn nullable<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, Malformed>,
    ) -> Result<Option<T>, Malformed> {
        let at = self.pos;
        match self.header()? {
            Header::Simple(simple::NULL) => Ok(None),
            _ => {
                self.pos = at;
                f(self).map(Some)
            }
        }
    }

    /// The next item if it is an integer that fits an `i64` (consumed), else `None` with
    /// nothing consumed: the caller then reads the item the general way, which also reports
    /// what is wrong with it.
    #[inline(always)]
    fn int_item(&mut self) -> Option<i64> {
        let rest = self.bytes.get(self.pos..)?;
        let &initial = rest.first()?;
        if initial >= 0x40 {
            return None;
        }
        let (arg, len) = match initial & 0x1f {
            info @ 0..=23 => (info as u64, 1),
            24 => (*rest.get(1)? as u64, 2),
            25 => (
                u16::from_be_bytes(rest.get(1..3)?.try_into().ok()?) as u64,
                3,
            ),
            26 => (
                u32::from_be_bytes(rest.get(1..5)?.try_into().ok()?) as u64,
                5,
            ),
            27 => (u64::from_be_bytes(rest.get(1..9)?.try_into().ok()?), 9),
            _ => return None,
        };
        let n = i64::try_from(arg).ok()?;
        self.pos += len;
        Some(if initial >= 0x20 { !n } else { n })
    }

    /// The head of a portable value with a scalar's payload, checked as far as it can be
    /// without the items that follow (a length that fits the input, UTF-8, a char's code point).
    /// Shared by [`Reader::value`] and [`Reader::skip_value`], so both accept the same bytes.
    #[inline(always)]
    fn item(&mut self, depth: usize) -> Result<Item<'a>, Malformed> {
        if depth > MAX_DEPTH {
            return self.fail("values nested too deeply");
        }
        Ok(match self.header()? {
            Header::Simple(simple::NULL) => Item::Unit,
            Header::Simple(simple::TRUE) => Item::Bool(true),
            Header::Simple(simple::FALSE) => Item::Bool(false),
            Header::Positive(n) if n <= i64::MAX as u64 => Item::Int(n as i64),
            Header::Negative(n) if n <= i64::MAX as u64 => Item::Int(!(n as i64)),
            Header::Float(f) => Item::Float(f),
            Header::Text(Some(len)) => Item::Text(self.text_payload(len)?),
            Header::Bytes(Some(len)) => Item::Blob(self.payload(len)?),
            Header::Array(Some(n)) if n <= self.remaining() => Item::Array(n),
            Header::Array(Some(n)) => {
                return self.fail(format!("array of {n} items runs past the end of the input"))
            }
            Header::Map(Some(n)) if n.saturating_mul(2) <= self.remaining() => Item::Map(n),
            Header::Map(Some(n)) => {
                return self.fail(format!("map of {n} entries runs past the end of the input"))
            }
            Header::Tag(TAG_CHAR) => {
                let n = self.uint()?;
                match u32::try_from(n).ok().and_then(char::from_u32) {
                    Some(c) => Item::Char(c),
                    None => return self.fail("invalid char"),
                }
            }
            Header::Tag(TAG_FN_PTR) => Item::FnPtr(self.str()?),
            Header::Tag(TAG_BYTE) => match u8::try_from(self.uint()?) {
                Ok(b) => Item::Byte(b),
                Err(_) => return self.fail("invalid byte"),
            },
            Header::Tag(TAG_RESOURCE) => {
                let (handle, copy) = self.resource()?;
                Item::Resource(handle, copy)
            }
            _ => return self.fail("not a portable value"),
        })
    }

    /// A portable value.
    pub(crate) fn value(
        &mut self,
        prog: &ProgramInner,
        depth: usize,
    ) -> Result<Dynamic, Malformed> {
        Ok(match self.item(depth)? {
            Item::Unit => Dynamic::UNIT,
            Item::Bool(b) => Dynamic::from_bool(b),
            Item::Int(n) => Dynamic::from_int(n),
            Item::Float(f) => Dynamic::from_float(f),
            Item::Char(c) => Dynamic::from_char(c),
            Item::Byte(b) => Dynamic::from(b),
            Item::Text(s) => Dynamic::from(ImmutableString::from(s)),
            Item::Blob(b) => Dynamic::from_blob(b.to_vec()),
            Item::Array(n) => {
                // Built by `extend` over a counted range, which writes each item in place: a
                // `push` loop builds every 16-byte `Dynamic` on the stack first and copies it,
                // several times slower for an array of a million numbers. A failure stops the
                // reading; the rest of the array is filled with units and thrown away.
                let mut failed = None;
                let mut a = Array::with_capacity(n);
                a.extend((0..n).map(|_| {
                    if failed.is_some() {
                        return Dynamic::UNIT;
                    }
                    // Integers inline: arrays of numbers are the common bulky state.
                    match self.int_item() {
                        Some(i) => Dynamic::from_int(i),
                        None => self.value(prog, depth + 1).unwrap_or_else(|e| {
                            failed = Some(e);
                            Dynamic::UNIT
                        }),
                    }
                }));
                if let Some(e) = failed {
                    return Err(e);
                }
                Dynamic::from_array(a)
            }
            Item::Map(n) => {
                let mut m = Map::new();
                for _ in 0..n {
                    let k = self.str()?;
                    let v = self.value(prog, depth + 1)?;
                    m.insert(k.into(), v);
                }
                Dynamic::from_map(m)
            }
            Item::FnPtr(name) => match fn_ptr(prog, name) {
                Some(f) => Dynamic::from(f),
                None => return self.fail(unknown_fn(name)),
            },
            Item::Resource(mut r, copy) => {
                if copy {
                    r.copy = self.copy(r.kind, prog, depth, true)?.map(Arc::new);
                }
                Dynamic::from(r)
            }
        })
    }

    /// Reads past a portable value, accepting exactly what [`Reader::value`] accepts (with the
    /// same error), without building it: nothing is allocated but an error's message, and the
    /// recursion is as deep as the nesting (at most [`MAX_DEPTH`]).
    pub(crate) fn skip_value(
        &mut self,
        prog: &ProgramInner,
        depth: usize,
    ) -> Result<(), Malformed> {
        match self.item(depth)? {
            Item::Array(n) => {
                for _ in 0..n {
                    // Like `value`: an integer item is taken without the depth check.
                    if self.int_item().is_none() {
                        self.skip_value(prog, depth + 1)?;
                    }
                }
            }
            Item::Map(n) => {
                for _ in 0..n {
                    self.str()?;
                    self.skip_value(prog, depth + 1)?;
                }
            }
            Item::FnPtr(name) if !fn_ptr_resolves(prog, name) => {
                return self.fail(unknown_fn(name))
            }
            Item::Resource(r, true) => {
                self.copy(r.kind, prog, depth, false)?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// One portable item as [`Reader::item`] reads it: a scalar (its payload borrowed from the
/// input), or the length of an array or map whose items follow.
enum Item<'a> {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Char(char),
    Byte(u8),
    Text(&'a str),
    Blob(&'a [u8]),
    Array(usize),
    Map(usize),
    /// A function pointer's name, not yet resolved against the program.
    FnPtr(&'a str),
    /// A handle, and whether its copy follows.
    Resource(Resource, bool),
}

/// An IEEE 754 half-precision float (CBOR's shortest float form) as an f64.
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (1.0 + frac / 1024.0) * 2f64.powi(exp - 15),
    }
}

/// Rebuilds a function pointer by name against the program's functions.
fn fn_ptr(prog: &ProgramInner, name: &str) -> Option<FnPtr> {
    match anon_fn(prog, name) {
        Some(def) => Some(FnPtr::from(def.clone())),
        None => FnPtr::new(name).ok(),
    }
}

/// Whether [`fn_ptr`] rebuilds a pointer named `name`, without building it: a closure of the
/// program, or any name `FnPtr::new` takes (exactly the valid function names, in Rhai 1.25.0).
fn fn_ptr_resolves(prog: &ProgramInner, name: &str) -> bool {
    anon_fn(prog, name).is_some() || rhai::is_valid_function_name(name)
}

/// The program's closure named `name`: by its portable name, or by its name in this process.
fn anon_fn<'p>(
    prog: &'p ProgramInner,
    name: &str,
) -> Option<&'p rhai::Shared<rhai::ScriptFuncDef>> {
    if let Some(f) = prog.closures.closure(name) {
        return Some(f);
    }
    if !name.starts_with("anon$") {
        return None;
    }
    prog.ast
        .shared_lib()
        .iter_script_fn_info()
        .find(|(.., n, _, _)| *n == name)
        .map(|(.., f)| f)
}

/// The message for a function pointer [`fn_ptr`] cannot rebuild; a long name (it comes from
/// the peer) is cut short.
fn unknown_fn(name: &str) -> String {
    const SHOWN: usize = 64;
    match name.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("function pointer to unknown function '{}…'", &name[..cut]),
        None => format!("function pointer to unknown function '{name}'"),
    }
}

/// The JSON form of a result: unit → null, char → one-character string, blob → array of byte
/// values, map → object, function pointer → its name (with curried values: an array of its
/// name and them, as Rhai's serialisation), non-finite float → null.
///
/// # Errors
///
/// [`ValueError::TooDeep`] for arrays and maps nested deeper than a portable value may be (a
/// JSON value that deep would be read, printed and dropped recursively).
pub fn to_json(value: &Dynamic) -> Result<serde_json::Value, ValueError> {
    json_at(value, 0)
}

fn json_at(value: &Dynamic, depth: usize) -> Result<serde_json::Value, ValueError> {
    use serde_json::Value as J;
    if depth > MAX_DEPTH {
        return Err(ValueError::TooDeep {
            what: "the result".into(),
        });
    }
    if value.is_shared() {
        return json_at(
            &value
                .read_lock::<Dynamic>()
                .map_or(Dynamic::UNIT, |v| v.clone()),
            depth,
        );
    }
    Ok(if value.is_unit() {
        J::Null
    } else if let Ok(b) = value.as_bool() {
        J::Bool(b)
    } else if let Ok(n) = value.as_int() {
        J::from(n)
    } else if let Ok(f) = value.as_float() {
        serde_json::Number::from_f64(f).map_or(J::Null, J::Number)
    } else if let Ok(c) = value.as_char() {
        J::String(c.to_string())
    } else if let Some(s) = value.read_lock::<ImmutableString>() {
        J::String(s.to_string())
    } else if let Some(b) = value.read_lock::<Blob>() {
        J::Array(b.iter().map(|&x| J::from(x)).collect())
    } else if let Some(a) = value.read_lock::<Array>() {
        J::Array(
            a.iter()
                .map(|v| json_at(v, depth + 1))
                .collect::<Result<_, _>>()?,
        )
    } else if let Some(m) = value.read_lock::<Map>() {
        J::Object(
            m.iter()
                .map(|(k, v)| Ok((k.to_string(), json_at(v, depth + 1)?)))
                .collect::<Result<_, ValueError>>()?,
        )
    } else if let Some(f) = value.read_lock::<FnPtr>() {
        // As Rhai serialises one: its name, or with curried values `[name, value, ...]`.
        let name = J::String(f.fn_name().to_string());
        if f.is_curried() {
            let mut items = vec![name];
            for v in f.iter_curry() {
                items.push(json_at(v, depth + 1)?);
            }
            J::Array(items)
        } else {
            name
        }
    } else if let Some(b) = value.read_lock::<u8>() {
        J::from(*b)
    } else if let Some(r) = value.read_lock::<Resource>() {
        serde_json::json!({"resource": r.name.as_str(), "type": r.kind.as_str(),
            "bound_at": r.bound_at.as_str(), "copy": r.copy.is_some()})
    } else {
        J::String(value.to_string())
    })
}

/// Encodes one portable value on its own (a message between agents).
///
/// # Errors
///
/// The value, or something inside it, cannot travel.
pub fn encode_portable(value: &Dynamic) -> Result<Vec<u8>, ValueError> {
    encode_message(&ClosureNames::default(), value)
}

/// [`encode_portable`] by an agent of a program with these closures.
pub(crate) fn encode_message(
    closures: &ClosureNames,
    value: &Dynamic,
) -> Result<Vec<u8>, ValueError> {
    let mut enc = Enc::from_vec(Vec::with_capacity(64));
    encode_value(&mut enc, closures, value, &|| "the message".to_string(), 0)?;
    Ok(enc.into_bytes())
}

/// Decodes a value written by [`encode_portable`]; function pointers are resolved against
/// `program` (the receiving agent's).
///
/// # Errors
///
/// Malformed, truncated or trailing bytes, or a value that is not portable.
pub fn decode_portable(
    program: &crate::Program,
    bytes: &[u8],
) -> Result<Dynamic, crate::DecodeError> {
    let mut r = Reader::new(bytes);
    let v = r.value(&program.inner, 0)?;
    no_trailing_bytes(&mut r)?;
    Ok(v)
}

/// Checks that [`decode_portable`] would accept `bytes` for `program`, without decoding them.
///
/// A node calls it on a message from an untrusted peer before queueing it for an agent: it
/// builds no values and allocates nothing in proportion to the input (memory grows with the
/// nesting depth only), whereas decoding turns every byte of, say, an array of empty arrays into
/// a 16-byte value and a vector.
///
/// # Errors
///
/// The error [`decode_portable`] gives for the same bytes: malformed, truncated or trailing
/// bytes, nesting deeper than the limit, invalid UTF-8 or char, a function pointer `program`
/// cannot resolve, or a value that is not portable.
pub fn check_portable(program: &crate::Program, bytes: &[u8]) -> Result<(), crate::DecodeError> {
    let mut r = Reader::new(bytes);
    r.skip_value(&program.inner, 0)?;
    no_trailing_bytes(&mut r)
}

fn no_trailing_bytes(r: &mut Reader) -> Result<(), crate::DecodeError> {
    if r.remaining() != 0 {
        return Err(crate::DecodeError::Malformed {
            what: "trailing bytes".into(),
            offset: r.offset(),
        });
    }
    Ok(())
}

/// A JSON value as a Rhai value: null → (), numbers → integer when integral else float,
/// arrays and objects recursively.
pub fn from_json(value: &serde_json::Value) -> Dynamic {
    use serde_json::Value as J;
    match value {
        J::Null => Dynamic::UNIT,
        J::Bool(b) => Dynamic::from_bool(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Dynamic::from(ImmutableString::from(s.as_str())),
        J::Array(a) => Dynamic::from_array(a.iter().map(from_json).collect()),
        J::Object(m) => Dynamic::from_map(
            m.iter()
                .map(|(k, v)| (k.as_str().into(), from_json(v)))
                .collect(),
        ),
    }
}
