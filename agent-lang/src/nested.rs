//! Values nested deep, handled without recursion that deep.
//!
//! With memory counted at the allocator rather than by Rhai's per-object walks, a script can
//! nest arrays a million deep within its budget (`a = [a.take()]` in a loop: 40 bytes a level).
//! Everything Rust does to such a value recurses once per level: dropping it, cloning it,
//! comparing it, printing it. A stack overflow aborts the whole process, so each of these must
//! stay within the stack of the thread it runs on:
//!
//! - Dropping and cloning recurse in Rhai's own code, about 170 bytes of stack a level (release
//!   build): the host runs slices on threads whose stack is [`Limits::slice_stack_bytes`], sized
//!   for the deepest value the memory budget allows. Off those threads, an [`Execution`] is
//!   dropped by [`dismantle`], which takes nested values apart one level at a time. On them,
//!   the variables that go out of scope in the executor (a block or loop left, an error
//!   unwinding, a function returning) go by [`rewind`], the same way: a drop a million levels
//!   deep touches some 270 MB of the thread's stack, which the process keeps until the thread
//!   is replaced. (What Rhai drops itself, e.g. the old value of a variable assigned over inside
//!   a statement, still recurses.)
//! - Comparing (`==`, `!=`) and printing (`print`, `debug`, `to_string`, `to_debug`) arrays and
//!   maps go through Rhai's function dispatch at every level, 1 to 2 KB of stack each. They are
//!   registered over Rhai's here: the same results, with arrays and maps walked directly, and
//!   nesting deeper than [`MAX_WALKED_DEPTH`] is an error of the script.
//!
//! [`Limits::slice_stack_bytes`]: crate::Limits::slice_stack_bytes
//! [`Execution`]: crate::Execution

use std::fmt::Write as _;

use rhai::{Array, Dynamic, Engine, EvalAltResult, Map, NativeCallContext, Position, Scope};

/// How deep comparing or printing follows arrays and maps inside each other.
pub const MAX_WALKED_DEPTH: usize = 10_000;

type Checked<T> = Result<T, Box<EvalAltResult>>;

/// Registers comparison and printing of arrays and maps, over Rhai's.
pub(crate) fn register(engine: &mut Engine) {
    engine.register_fn("==", |ctx: NativeCallContext, a: &mut Array, b: Array| {
        arrays_equal(&ctx, a, &mut { b }, 0)
    });
    engine.register_fn("!=", |ctx: NativeCallContext, a: &mut Array, b: Array| {
        arrays_equal(&ctx, a, &mut { b }, 0).map(|e| !e)
    });
    engine.register_fn("==", |ctx: NativeCallContext, a: &mut Map, b: Map| {
        maps_equal(&ctx, a, &mut { b }, 0)
    });
    engine.register_fn("!=", |ctx: NativeCallContext, a: &mut Map, b: Map| {
        maps_equal(&ctx, a, &mut { b }, 0).map(|e| !e)
    });
    for name in ["print", "to_string", "debug", "to_debug"] {
        engine.register_fn(name, |ctx: NativeCallContext, a: &mut Array| {
            let mut out = String::new();
            write_array(&ctx, a, &mut out, 0).map(|()| out)
        });
        engine.register_fn(name, |ctx: NativeCallContext, m: &mut Map| {
            let mut out = String::new();
            write_map(&ctx, m, &mut out, 0).map(|()| out)
        });
    }
}

fn too_deep(doing: &str) -> Box<EvalAltResult> {
    EvalAltResult::ErrorRuntime(
        format!("cannot {doing} arrays or maps nested more than {MAX_WALKED_DEPTH} deep").into(),
        Position::NONE,
    )
    .into()
}

/// Rhai's array `==`: same length, and each pair equal by `==` (a pair of different types for
/// which there is no `==` is unequal).
fn arrays_equal(
    ctx: &NativeCallContext,
    a: &mut Array,
    b: &mut Array,
    depth: usize,
) -> Checked<bool> {
    if a.len() != b.len() {
        return Ok(false);
    }
    for (x, y) in a.iter_mut().zip(b.iter_mut()) {
        if !values_equal(ctx, x, y, depth, true)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Rhai's map `==`: the same keys, and the values of each equal by `==`.
fn maps_equal(ctx: &NativeCallContext, a: &mut Map, b: &mut Map, depth: usize) -> Checked<bool> {
    if a.len() != b.len() {
        return Ok(false);
    }
    for (key, x) in a.iter_mut() {
        let Some(y) = b.get_mut(key) else {
            return Ok(false);
        };
        if !values_equal(ctx, x, y, depth, false)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `x == y` for two items of arrays (`in_array`) or values of maps at `depth`: pairs of arrays
/// and pairs of maps are walked here, anything else goes to Rhai's `==` as Rhai's own array
/// and map `==` send it.
fn values_equal(
    ctx: &NativeCallContext,
    x: &mut Dynamic,
    y: &mut Dynamic,
    depth: usize,
    in_array: bool,
) -> Checked<bool> {
    if x.is_array() && y.is_array() || x.is_map() && y.is_map() {
        if depth >= MAX_WALKED_DEPTH {
            return Err(too_deep("compare"));
        }
        if let (Ok(mut a), Ok(mut b)) = (x.as_array_mut(), y.as_array_mut()) {
            return arrays_equal(ctx, &mut a, &mut b, depth + 1);
        }
        if let (Ok(mut a), Ok(mut b)) = (x.as_map_mut(), y.as_map_mut()) {
            return maps_equal(ctx, &mut a, &mut b, depth + 1);
        }
    }
    let different_types = x.type_id() != y.type_id();
    match ctx.call_native_fn_raw("==", true, &mut [x, y]) {
        Ok(equal) => Ok(equal.as_bool().unwrap_or(false)),
        Err(err)
            if in_array
                && different_types
                && matches!(&*err, EvalAltResult::ErrorFunctionNotFound(sig, ..) if sig.starts_with("==")) =>
        {
            Ok(false)
        }
        Err(err) => Err(err),
    }
}

/// Rhai's text of an array: `[` items in debug form `, ` `]`.
fn write_array(
    ctx: &NativeCallContext,
    a: &mut Array,
    out: &mut String,
    depth: usize,
) -> Checked<()> {
    out.push('[');
    let last = a.len().saturating_sub(1);
    for (i, item) in a.iter_mut().enumerate() {
        write_item(ctx, item, out, depth)?;
        if i < last {
            out.push_str(", ");
        }
    }
    out.push(']');
    Ok(())
}

/// Rhai's text of a map: `#{` `"key": value` in debug form `, ` `}`.
fn write_map(ctx: &NativeCallContext, m: &mut Map, out: &mut String, depth: usize) -> Checked<()> {
    out.push_str("#{");
    let last = m.len().saturating_sub(1);
    for (i, (key, value)) in m.iter_mut().enumerate() {
        let _ = write!(out, "{key:?}: ");
        write_item(ctx, value, out, depth)?;
        if i < last {
            out.push_str(", ");
        }
    }
    out.push('}');
    Ok(())
}

/// An item of an array or map at `depth`, in debug form: nested arrays and maps here, anything
/// else by Rhai's `to_debug` as Rhai's own printing calls it.
fn write_item(
    ctx: &NativeCallContext,
    item: &mut Dynamic,
    out: &mut String,
    depth: usize,
) -> Checked<()> {
    if item.is_array() || item.is_map() {
        if depth >= MAX_WALKED_DEPTH {
            return Err(too_deep("print"));
        }
        if let Ok(mut a) = item.as_array_mut() {
            return write_array(ctx, &mut a, out, depth + 1);
        }
        if let Ok(mut m) = item.as_map_mut() {
            return write_map(ctx, &mut m, out, depth + 1);
        }
    }
    match ctx.call_native_fn_raw("to_debug", true, &mut [item]) {
        Ok(text) if text.is_string() => {
            out.push_str(&text.into_immutable_string().unwrap_or_default())
        }
        Ok(other) => out.push_str(ctx.engine().map_type_name(other.type_name())),
        Err(_) => {
            let text = format!("{item:?}");
            out.push_str(ctx.engine().map_type_name(&text));
        }
    }
    Ok(())
}

/// Rewinds `scope` to its first `len` variables, as `Scope::rewind` does, but with the arrays,
/// maps and function pointers among those that go taken apart one level at a time. A shared
/// cell (a variable a closure captured) is left whole: the closure may live on.
pub(crate) fn rewind(scope: &mut Scope, len: usize) {
    let holds_values = |v: &Dynamic| !v.is_shared() && nests(v);
    // (`iter_raw` goes from the last variable to the first.)
    let going = scope.len().saturating_sub(len);
    if !scope
        .iter_raw()
        .take(going)
        .any(|(_, constant, v)| !constant && holds_values(v))
    {
        scope.rewind(len);
        return;
    }
    let names: Vec<String> = scope
        .iter_raw()
        .take(going)
        .map(|(n, ..)| n.to_string())
        .collect();
    let mut values = Vec::new();
    for name in &names {
        // The last variable of that name is the last of the scope (`get_mut` looks from the
        // end); a constant stays as it is.
        if let Some(value) = scope.get_mut(name) {
            if holds_values(value) {
                values.push(std::mem::take(value));
            }
        }
        scope.pop();
    }
    take_apart(values, false);
}

/// Whether dropping `value` may recurse: it holds other values (or may, through a shared
/// cell). Any other value is dropped as it is, outside [`dismantle`].
pub(crate) fn nests(value: &Dynamic) -> bool {
    value.is_shared() || value.is_array() || value.is_map() || value.is_fnptr()
}

/// Drops `values` one level at a time: the arrays, maps, function pointers and shared cells
/// inside are emptied onto a list rather than dropped inside each other, so no depth of
/// nesting recurses.
pub(crate) fn dismantle(values: impl IntoIterator<Item = Dynamic>) {
    take_apart(values, true);
}

/// [`dismantle`], opening shared cells only if `open_shared` (when their other holders go too).
fn take_apart(values: impl IntoIterator<Item = Dynamic>, open_shared: bool) {
    let mut pending: Vec<Dynamic> = values.into_iter().collect();
    while let Some(mut value) = pending.pop() {
        if value.is_shared() {
            // Other holders of the cell are parts of the same state, going too.
            if open_shared {
                if let Some(mut inner) = value.write_lock::<Dynamic>() {
                    pending.push(std::mem::take(&mut *inner));
                }
            }
        } else if value.is_array() {
            if let Ok(mut array) = value.as_array_mut() {
                pending.append(&mut array);
            }
        } else if value.is_map() {
            if let Ok(mut map) = value.as_map_mut() {
                pending.extend(std::mem::take(&mut *map).into_values());
            }
        } else if let Some(mut f) = value.write_lock::<rhai::FnPtr>() {
            let curried: Vec<Dynamic> = f.iter_curry_mut().map(std::mem::take).collect();
            pending.extend(curried);
        }
    }
}
