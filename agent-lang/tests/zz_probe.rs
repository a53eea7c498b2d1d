mod support;
use std::panic::{catch_unwind, AssertUnwindSafe};
use support::*;
#[test]
fn probe() {
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(|| {
            let src = std::fs::read_to_string("/tmp/probe/cases.txt").unwrap();
            for (i, case) in src.split("\n----\n").enumerate() {
                let r = catch_unwind(AssertUnwindSafe(|| check(case)));
                match r {
                    Ok((v, t)) => eprintln!("#{i} OK {v:?} hops={}", t.hops),
                    Err(e) => eprintln!(
                        "#{i} MISMATCH {}",
                        e.downcast_ref::<String>().cloned().unwrap_or_default()
                    ),
                }
            }
        })
        .unwrap()
        .join()
        .unwrap();
}
