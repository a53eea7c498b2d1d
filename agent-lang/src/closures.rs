//! Names for a program's closures that are the same in every process.
//!
//! Rhai names an anonymous function `anon$` + a hash of its parameters and body, computed with a
//! hasher seeded at random per process (and whose output also depends on the CPU's features).
//! The same package compiled on two nodes therefore gives its closures different names, and a
//! function pointer to a closure, written by name, would not resolve on the next node. A closure
//! is instead written as the place of its body in the source together with the program it belongs
//! to (`anon@LINE:COLUMN#PROGRAM`): the same for the same package everywhere, and never taken for
//! a closure of another program.

use std::collections::HashMap;

use rhai::{ImmutableString, ScriptFuncDef, Shared, AST};

use crate::compile::ProgramHash;

/// What portable closure names start with (not a valid Rhai function name, so never taken
/// for a named function).
const PORTABLE_PREFIX: &str = "anon@";

/// A program's closures under their local and their portable names.
#[derive(Default)]
pub(crate) struct ClosureNames {
    portable_of: HashMap<ImmutableString, String>,
    by_portable: HashMap<String, Shared<ScriptFuncDef>>,
}

impl ClosureNames {
    /// The names of the closures of `ast`, a program whose hash is `hash`.
    pub(crate) fn of(ast: &AST, hash: &ProgramHash) -> ClosureNames {
        let program: String = hash.0[..8].iter().map(|b| format!("{b:02x}")).collect();
        let mut names = ClosureNames::default();
        let mut seen: HashMap<String, usize> = HashMap::new();
        let closures: Vec<_> = ast
            .shared_lib()
            .iter_script_fn_info()
            .filter(|(.., name, _, _)| name.starts_with("anon$"))
            .map(|(.., f)| f.clone())
            .collect();
        for f in &closures {
            let pos = f.body.position();
            let (Some(line), Some(column)) = (pos.line(), pos.position()) else {
                continue;
            };
            let portable = format!("{PORTABLE_PREFIX}{line}:{column}#{program}");
            *seen.entry(portable.clone()).or_default() += 1;
            names.portable_of.insert(f.name.clone(), portable.clone());
            names.by_portable.insert(portable, f.clone());
        }
        // Two closures at one place (not made by Rhai's parser, but cheap to rule out): neither
        // gets a portable name, rather than one being taken for the other.
        for (portable, count) in seen {
            if count > 1 {
                names.by_portable.remove(&portable);
                names.portable_of.retain(|_, p| *p != portable);
            }
        }
        names
    }

    /// The name to write for a function pointer named `name`: a closure's portable name, any
    /// other name as it is.
    pub(crate) fn portable<'a>(&'a self, name: &'a str) -> &'a str {
        self.portable_of.get(name).map_or(name, String::as_str)
    }

    /// The closure a portable name written by [`ClosureNames::portable`] stands for.
    pub(crate) fn closure(&self, portable: &str) -> Option<&Shared<ScriptFuncDef>> {
        if !portable.starts_with(PORTABLE_PREFIX) {
            return None;
        }
        self.by_portable.get(portable)
    }
}
