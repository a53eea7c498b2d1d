//! Delegated statements, run natively by Rhai in the top frame's scope: the one place the walker
//! hands control to Rhai's evaluator, and so the place that keeps Rhai's runtime state (call
//! level, scope level, operation count) as Rhai's own evaluator would have it at that point.

use rhai::{Dynamic, EvalAltResult, Position, Stmt};

use super::{internal, Ctx, Execution, StepErr};

impl Execution {
    /// Evaluates a snippet in the top frame's scope.
    ///
    /// Rhai's `Engine::eval_statements_raw` (`src/api/deprecated.rs`, `internals` feature) is the
    /// only entry point that runs statements against a caller's `GlobalRuntimeState` and `Scope`
    /// without rewinding the scope afterwards, so a snippet's `let`s stay for the statements after
    /// it. Before the call, two counters Rhai's evaluator keeps on its own are set from the walked
    /// stack, because snippets rely on them:
    /// - `level`, which Rhai's `Engine::call_script_fn` (`src/func/script.rs`) compares with
    ///   `max_call_levels`, counts the walked frames below the top one, so the calls a snippet
    ///   makes count the walked calls below it towards that limit;
    /// - `scope_level`, which Rhai's `Engine::eval_stmt_block` (`src/eval/stmt.rs`) raises for
    ///   every nested block, is zero only at the main body's top level, because there Rhai's
    ///   `Stmt::Var` makes a `const` visible to script functions.
    pub(super) fn eval(&mut self, ctx: &mut Ctx, snippet: &[Stmt]) -> Result<Dynamic, StepErr> {
        let depth = self.frames.len();
        let frame = self.frames.last_mut().ok_or_else(|| internal("no frame"))?;
        ctx.global.level = depth - 1;
        ctx.global.scope_level = if depth == 1 {
            frame.cursors.len().saturating_sub(1)
        } else {
            frame.cursors.len() + depth
        };
        #[allow(deprecated)]
        let r = ctx.prog.engine.eval_statements_raw(
            &mut ctx.global,
            &mut ctx.caches,
            &mut frame.scope,
            snippet,
        );
        r.map_err(|err| {
            // Some native failures (e.g. division by zero) carry no position; Rhai's `catch`
            // sees none either, but a report of the failure names the statement.
            ctx.fallback_pos = snippet_pos(snippet);
            StepErr::Eval(err)
        })
    }

    /// Evaluates a condition, failing as Rhai does (`ErrorMismatchDataType`) when it is not a
    /// `bool`.
    pub(super) fn eval_bool(&mut self, ctx: &mut Ctx, snippet: &[Stmt]) -> Result<bool, StepErr> {
        let v = self.eval(ctx, snippet)?;
        v.as_bool().map_err(|typ| {
            let pos = snippet_pos(snippet);
            StepErr::Eval(
                EvalAltResult::ErrorMismatchDataType("bool".into(), typ.into(), pos).into(),
            )
        })
    }

    /// Counts one operation of a walked statement, as Rhai's `Engine::track_operation`
    /// (`src/eval/data_check.rs`) counts each statement it evaluates, so walked and delegated
    /// statements draw on the same `max_operations` budget. (Its progress callback is the
    /// memory meter's check, made here too.)
    pub(super) fn track(&mut self, ctx: &mut Ctx, pos: Position) -> Result<(), StepErr> {
        ctx.global.num_operations += 1;
        let max = ctx.prog.engine.max_operations();
        if max > 0 && ctx.global.num_operations > max {
            return Err(StepErr::Eval(
                EvalAltResult::ErrorTooManyOperations(pos).into(),
            ));
        }
        match crate::meter::check(ctx.global.num_operations, max) {
            None => Ok(()),
            Some(exceeded) => {
                let mut err = exceeded.into_error();
                err.set_position(pos);
                Err(StepErr::Eval(err))
            }
        }
    }
}

/// Where a snippet starts, for errors about it.
pub(super) fn snippet_pos(snippet: &[Stmt]) -> Position {
    match snippet.first() {
        Some(Stmt::Expr(e)) => e.position(),
        Some(s) => s.position(),
        None => Position::NONE,
    }
}
