//! The built-ins whose arguments, rather than their inputs, choose how much they allocate
//! (`blob(n)`, `pad`, `replace` with an empty or short pattern), registered over Rhai's own so
//! that they ask the memory meter before they allocate; and those that make an array many times
//! the size of their input in one call (`split` of a string into empty strings, `to_chars`, a
//! blob's `to_array`, a map's `keys` and `values`: 40 MB became 3.5 GB in one `split`), which
//! collect their items asking the meter every [`CHECK_EVERY`] items.
//!
//! Rhai checked these against its per-object size limits. tern counts memory at the allocator
//! instead ([`crate::meter`]), which sees an allocation once it is made: one such call asking
//! for a terabyte would make the allocator fail, and the process abort. Each behaves as Rhai's
//! does (`src/packages/{blob_basic,array_basic,string_more}.rs` in Rhai 1.25), except that
//! `pad` with an empty padding string returns at once where Rhai's never returns.

use rhai::{
    Array, Blob, Dynamic, Engine, EvalAltResult, FuncRegistration, ImmutableString, Map, Position,
    INT,
};

use crate::meter::{self, Exceeded};

type Checked<T> = Result<T, Box<EvalAltResult>>;

/// Registers the checked built-ins on `engine`, over Rhai's.
pub(crate) fn register(engine: &mut Engine) {
    engine.register_fn("blob", |len: INT| blob(len, 0));
    engine.register_fn("blob", blob);
    engine.register_fn("pad", pad_blob);
    engine.register_fn("pad", pad_array);
    engine.register_fn("pad", pad_with_char);
    engine.register_fn("pad", pad_with_string);
    engine.register_fn(
        "replace",
        |s: &mut ImmutableString, find: &str, by: &str| replace(s, find, by),
    );
    engine.register_fn(
        "replace",
        |s: &mut ImmutableString, find: &str, by: char| {
            replace(s, find, by.encode_utf8(&mut [0; 4]))
        },
    );
    engine.register_fn(
        "replace",
        |s: &mut ImmutableString, find: char, by: &str| {
            replace(s, find.encode_utf8(&mut [0; 4]), by)
        },
    );
    register_amplifiers(engine);
}

/// Items an amplifying built-in collects between two questions to the meter.
pub(crate) const CHECK_EVERY: usize = 1024;

/// Collects `items`, asking the meter every [`CHECK_EVERY`] of them: an agent over its budget
/// stops within that many items of it.
fn collect_admitted(items: impl Iterator<Item = Dynamic>) -> Checked<Array> {
    let mut out = Array::new();
    for (i, item) in items.enumerate() {
        if i % CHECK_EVERY == 0 {
            admit(0)?;
        }
        out.push(item);
    }
    Ok(out)
}

/// Rhai's result of splitting `string`: the string whole when there is nothing to split
/// (`whole`), else `pieces`, collected with [`collect_admitted`].
fn split<'a>(
    string: &ImmutableString,
    whole: bool,
    pieces: impl Iterator<Item = &'a str>,
) -> Checked<Array> {
    if whole {
        return Ok(vec![string.clone().into()]);
    }
    collect_admitted(pieces.map(Into::<Dynamic>::into))
}

/// Whether Rhai's `split` by a string returns `string` whole.
fn lacks(string: &str, by: &str) -> bool {
    string.is_empty() || (!by.is_empty() && !string.contains(by))
}

/// Whether Rhai's `split` by a character returns `string` whole.
fn lacks_char(string: &str, by: char) -> bool {
    string.is_empty() || !string.contains(by)
}

fn segments(n: INT) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Rhai's `to_chars`, `split`, `split_rev`, blob `to_array` and map `keys` and `values`
/// (`src/packages/{string_more,blob_basic,map_basic}.rs` in Rhai 1.25), collected with
/// [`collect_admitted`]. Pure, as Rhai's are: they may be called on constants.
fn register_amplifiers(engine: &mut Engine) {
    let pure = |name: &str| FuncRegistration::new(name).with_purity(true);
    pure("to_chars").register_into_engine(engine, |s: &mut ImmutableString| {
        collect_admitted(s.chars().map(Dynamic::from))
    });
    pure("split").register_into_engine(engine, |s: &mut ImmutableString| {
        split(s, s.is_empty(), s.split_whitespace())
    });
    pure("split").register_into_engine(engine, |s: &mut ImmutableString, by: &str| {
        split(s, lacks(s, by), s.split(by))
    });
    pure("split").register_into_engine(engine, |s: &mut ImmutableString, by: &str, n: INT| {
        split(s, n <= 1 || lacks(s, by), s.splitn(segments(n), by))
    });
    pure("split").register_into_engine(engine, |s: &mut ImmutableString, by: char| {
        split(s, lacks_char(s, by), s.split(by))
    });
    pure("split").register_into_engine(engine, |s: &mut ImmutableString, by: char, n: INT| {
        split(s, n <= 1 || lacks_char(s, by), s.splitn(segments(n), by))
    });
    pure("split_rev").register_into_engine(engine, |s: &mut ImmutableString, by: &str| {
        split(s, lacks(s, by), s.rsplit(by))
    });
    pure("split_rev").register_into_engine(engine, |s: &mut ImmutableString, by: &str, n: INT| {
        split(s, n <= 1 || lacks(s, by), s.rsplitn(segments(n), by))
    });
    pure("split_rev").register_into_engine(engine, |s: &mut ImmutableString, by: char| {
        split(s, lacks_char(s, by), s.rsplit(by))
    });
    pure("split_rev").register_into_engine(engine, |s: &mut ImmutableString, by: char, n: INT| {
        split(s, n <= 1 || lacks_char(s, by), s.rsplitn(segments(n), by))
    });
    pure("to_array").register_into_engine(engine, |b: &mut Blob| {
        collect_admitted(b.iter().map(|&byte| Dynamic::from_int(INT::from(byte))))
    });
    pure("keys").register_into_engine(engine, |m: &mut Map| {
        collect_admitted(
            m.keys()
                .map(|k| Dynamic::from(ImmutableString::from(k.as_str()))),
        )
    });
    pure("values")
        .register_into_engine(engine, |m: &mut Map| collect_admitted(m.values().cloned()));
}

/// Fails unless the running agent may take `bytes` more.
fn admit(bytes: usize) -> Checked<()> {
    meter::admits(u64::try_from(bytes).unwrap_or(u64::MAX)).map_err(Exceeded::into_error)
}

fn blob(len: INT, value: INT) -> Checked<Blob> {
    let Ok(len) = usize::try_from(len) else {
        return Ok(Blob::new());
    };
    admit(len)?;
    Ok(vec![(value & 0xff) as u8; len])
}

fn pad_blob(blob: &mut Blob, len: INT, value: INT) -> Checked<()> {
    let len = usize::try_from(len).unwrap_or(0);
    if len > blob.len() {
        admit(len - blob.len())?;
        blob.resize(len, (value & 0xff) as u8);
    }
    Ok(())
}

fn pad_array(array: &mut Array, len: INT, item: Dynamic) -> Checked<()> {
    let len = usize::try_from(len).unwrap_or(0);
    if len <= array.len() {
        return Ok(());
    }
    let more = len - array.len();
    admit(more.saturating_mul(std::mem::size_of::<Dynamic>()))?;
    array.reserve_exact(more);
    if item.is_unit() || item.is_int() || item.is_float() || item.is_bool() || item.is_char() {
        array.resize(len, item);
        return Ok(());
    }
    // Each copy of a string, array, map or blob can be large: look again after each.
    while array.len() < len {
        array.push(item.clone());
        admit(0)?;
    }
    Ok(())
}

fn pad_with_char(string: &mut ImmutableString, len: INT, character: char) -> Checked<()> {
    let Some(more) = chars_short(string, len)? else {
        return Ok(());
    };
    let bytes = string
        .len()
        .saturating_add(more.saturating_mul(character.len_utf8()));
    admit(bytes)?;
    let mut padded = String::with_capacity(bytes);
    padded.push_str(string);
    padded.extend(std::iter::repeat_n(character, more));
    *string = padded.into();
    Ok(())
}

fn pad_with_string(string: &mut ImmutableString, len: INT, padding: &str) -> Checked<()> {
    let Some(more) = chars_short(string, len)? else {
        return Ok(());
    };
    let per = padding.chars().count();
    if per == 0 {
        return Ok(());
    }
    let tail: usize = padding.chars().take(more % per).map(char::len_utf8).sum();
    let bytes = (more / per)
        .saturating_mul(padding.len())
        .saturating_add(tail);
    let bytes = string.len().saturating_add(bytes);
    admit(bytes)?;
    // Built in a `String` sized once: Rhai's string grows by what each push needs, and the
    // reallocations would be quadratic.
    let mut padded = String::with_capacity(bytes);
    padded.push_str(string);
    for _ in 0..more / per {
        padded.push_str(padding);
    }
    padded.extend(padding.chars().take(more % per));
    *string = padded.into();
    Ok(())
}

/// How many characters `string` lacks to be `len` long, if any (Rhai's error for a length
/// beyond the address space).
fn chars_short(string: &ImmutableString, len: INT) -> Checked<Option<usize>> {
    if len <= 0 {
        return Ok(None);
    }
    let Ok(len) = usize::try_from(len) else {
        return Err(
            EvalAltResult::ErrorDataTooLarge("Length of string".into(), Position::NONE).into(),
        );
    };
    let have = string.chars().count();
    Ok((len > have).then(|| len - have))
}

fn replace(string: &mut ImmutableString, find: &str, by: &str) -> Checked<()> {
    if string.is_empty() {
        return Ok(());
    }
    if by.len() > find.len() {
        let found = if find.is_empty() {
            string.chars().count() + 1
        } else {
            string.matches(find).count()
        };
        admit(
            string
                .len()
                .saturating_add(found.saturating_mul(by.len() - find.len())),
        )?;
    }
    *string = string.replace(find, by).into();
    Ok(())
}
