//! Differential tests: every agent of `tests/corpus` must give under tern the result plain Rhai
//! gives (with a `migrate` that only changes `here()`), or fail in both.
mod support;

use std::panic::{catch_unwind, AssertUnwindSafe};

use support::*;

/// Runs `f` on a thread with a big stack: recursive corpus agents recurse natively in the oracle.
fn big_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

#[test]
fn corpus_agrees_with_oracle() {
    big_stack(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .expect("corpus directory")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "rhai"))
            .collect();
        files.sort();
        assert!(
            files.len() >= 30,
            "the corpus has only {} agents",
            files.len()
        );
        let mut failures = Vec::new();
        for path in &files {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let source = std::fs::read_to_string(path).expect("read agent");
            // Both failing counts as agreement, so a typo must not pass silently: an agent that is
            // meant to fail says so on a line `// expect: error`.
            let expect_error = source.lines().any(|l| l.trim() == "// expect: error");
            match catch_unwind(AssertUnwindSafe(|| check(&source))) {
                Ok((result, trace)) => {
                    eprintln!(
                        "{name}: {result:?} ({} hops, {} bytes)",
                        trace.hops, trace.bytes
                    );
                    if matches!(result, RunResult::Error(_)) != expect_error {
                        eprintln!(
                            "{name}: FAILED: expected {}",
                            if expect_error { "an error" } else { "a value" }
                        );
                        failures.push(name);
                    }
                }
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    eprintln!("{name}: FAILED\n{msg}");
                    failures.push(name);
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} corpus agents disagree with the oracle: {failures:?}",
            failures.len(),
            files.len()
        );
    });
}
