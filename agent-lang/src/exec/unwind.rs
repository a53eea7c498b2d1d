//! Leaving constructs early: `break` and `continue` out to the nearest loop, `return` out of a
//! frame, and a thrown error out to the nearest `catch`, across frames. Each pops cursors (and
//! rewinds the scope to what the construct it leaves found) until it reaches its target, as
//! Rhai's evaluator unwinds its Rust stack through `LoopBreak`, `Return` and error results.

use rhai::{Dynamic, EvalAltResult, Map, Position, INT};

use super::{
    internal, internal_error, Caught, Ctx, Cursor, Err, Execution, Outcome, StepErr, Stop,
};
use crate::compile::Node;
use crate::engine::exit_value;
use crate::error::{message_without_position, AgentError};

impl Execution {
    /// `break` (is_break) or `continue` out to the nearest loop of the frame.
    pub(super) fn unwind_loop(&mut self, is_break: bool, value: Dynamic) -> Result<(), StepErr> {
        let prog = self.program.inner.clone();
        let frame = self.top_frame()?;
        loop {
            match frame.cursors.last() {
                None => return Err(internal("break outside a loop")),
                Some(Cursor::Loop {
                    node, scope_len, ..
                }) => {
                    let (node, scope_len) = (*node, *scope_len);
                    if is_break {
                        frame.cursors.pop();
                        crate::nested::rewind(&mut frame.scope, scope_len as usize);
                        // A loop is always directly inside a block (or a try, whose body is a
                        // block): the `break` value becomes the loop statement's value.
                        return self.set_value(value);
                    }
                    if let Node::Do { body, .. } = &prog.plan.nodes[node as usize] {
                        // Rhai's `continue` in a `do` loop skips the condition (its `Stmt::Do`
                        // arm of `Engine::eval_stmt` goes straight back to the body).
                        let body = *body;
                        return self.push_block(body);
                    }
                    return Ok(());
                }
                Some(Cursor::Block { scope_len, .. }) | Some(Cursor::Try { scope_len, .. }) => {
                    let l = *scope_len as usize;
                    frame.cursors.pop();
                    crate::nested::rewind(&mut frame.scope, l);
                }
                Some(Cursor::Value { .. }) => {
                    frame.cursors.pop();
                }
            }
        }
    }

    /// Ends the top frame with `value`: the agent's result if it is the main body's, else the
    /// value of the call its caller waits on.
    pub(super) fn return_from_frame(
        &mut self,
        ctx: &mut Ctx,
        value: Dynamic,
    ) -> Result<(), StepErr> {
        if let Some(mut frame) = self.frames.pop() {
            crate::nested::rewind(&mut frame.scope, 0);
        }
        if self.frames.is_empty() {
            return Err(StepErr::Stop(Stop::Outcome(Outcome::Finished(value))));
        }
        self.complete(ctx, value).map_err(StepErr::Eval)
    }

    /// Throws `err` at the current position: unwinds to the nearest `try`, across frames.
    ///
    /// Copies two Rhai internals, so that a script catches what it would catch in Rhai and sees
    /// the same error: the `Stmt::TryCatch` arm of `Engine::eval_stmt` (`src/eval/stmt.rs`) for
    /// which errors a `catch` takes, what its variable holds and a bare `throw;` re-throwing the
    /// caught error; and `Engine::call_script_fn` (`src/func/script.rs`) for how an error
    /// leaving a function is reported: wrapped in `ErrorInFunctionCall`, or, if it is a system
    /// exception (or otherwise uncatchable), passed on at the call's position.
    pub(super) fn raise(&mut self, ctx: &mut Ctx, mut err: Err) -> Result<(), Stop> {
        if let Some(v) = exit_value(&err) {
            return Err(Stop::Outcome(Outcome::Finished(v)));
        }
        let prog = ctx.prog;
        let catchable = err.is_catchable() && !err.is_pseudo_error();
        loop {
            let Some(frame) = self.frames.last_mut() else {
                return Err(Stop::Outcome(Outcome::Failed(failure(
                    err,
                    ctx.fallback_pos,
                ))));
            };
            while let Some(cursor) = frame.cursors.pop() {
                match cursor {
                    Cursor::Block { scope_len, .. } | Cursor::Loop { scope_len, .. } => {
                        crate::nested::rewind(&mut frame.scope, scope_len as usize);
                    }
                    Cursor::Try {
                        scope_len,
                        caught: Some(caught),
                        ..
                    } => {
                        crate::nested::rewind(&mut frame.scope, scope_len as usize);
                        // A bare `throw;` in a catch block re-throws the caught error.
                        if let EvalAltResult::ErrorRuntime(v, pos) = &*err {
                            if v.is_unit() {
                                let pos = *pos;
                                err = caught.0;
                                err.set_position(pos);
                            }
                        }
                    }
                    Cursor::Try {
                        node,
                        scope_len,
                        caught: None,
                    } if catchable => {
                        crate::nested::rewind(&mut frame.scope, scope_len as usize);
                        let Node::Try {
                            catch_var, catch, ..
                        } = &prog.plan.nodes[node as usize]
                        else {
                            return Err(Stop::Outcome(Outcome::Failed(internal_error(
                                "try node expected",
                            ))));
                        };
                        let value = match catch_var {
                            Some(_) => catch_value(&err),
                            None => Dynamic::UNIT,
                        };
                        if let Some(name) = catch_var {
                            frame.scope.push_dynamic(name.clone(), value);
                        }
                        frame.cursors.push(Cursor::Try {
                            node,
                            scope_len,
                            caught: Some(Caught(err)),
                        });
                        if prog.plan.blocks[*catch as usize].is_empty() {
                            return self.deliver(ctx, Dynamic::UNIT).or_else(|e| match e {
                                StepErr::Stop(s) => Err(s),
                                StepErr::Eval(e) => self.raise(ctx, e),
                            });
                        }
                        let scope_len = frame.scope.len() as u32;
                        frame.cursors.push(Cursor::block_start(*catch, scope_len));
                        return Ok(());
                    }
                    Cursor::Try { scope_len, .. } => {
                        crate::nested::rewind(&mut frame.scope, scope_len as usize);
                    }
                    Cursor::Value { .. } => {}
                }
            }
            // The error leaves this frame.
            let Some(mut frame) = self.frames.pop() else {
                continue;
            };
            crate::nested::rewind(&mut frame.scope, 0);
            if self.frames.is_empty() {
                return Err(Stop::Outcome(Outcome::Failed(failure(
                    err,
                    ctx.fallback_pos,
                ))));
            }
            if let Some(caller) = self.frames.last_mut() {
                caller.pending = None;
            }
            let name = prog.plan.bodies[frame.body as usize].name.to_string();
            err = if err.is_system_exception() || !catchable {
                err.set_position(frame.call_pos);
                err
            } else {
                EvalAltResult::ErrorInFunctionCall(name, String::new(), err, frame.call_pos).into()
            };
        }
    }
}

/// The agent's failure for an error no `catch` took, placed at `fallback` if it has no position.
fn failure(mut err: Err, fallback: Position) -> AgentError {
    if err.position().is_none() {
        err.set_position(fallback);
    }
    AgentError::from_rhai(&err)
}

/// The value `catch (e)` binds for `err`: what Rhai's own `try`/`catch` gives.
///
/// A copy of the error map of Rhai's `Stmt::TryCatch` arm of `Engine::eval_stmt`
/// (`src/eval/stmt.rs`) and of `EvalAltResult::dump_fields` (`src/types/error.rs`), which fills
/// it: `dump_fields` is `pub(crate)` in Rhai, so it cannot be called from here.
fn catch_value(err: &EvalAltResult) -> Dynamic {
    type E = EvalAltResult;
    if let E::ErrorRuntime(v, _) = err.unwrap_inner() {
        return v.clone();
    }
    let mut map = Map::new();
    map.insert("message".into(), message_without_position(err).into());
    let pos = err.position();
    if let Some(line) = pos.line() {
        map.insert("line".into(), (line as INT).into());
        map.insert(
            "position".into(),
            (pos.position().unwrap_or(0) as INT).into(),
        );
    }
    let debug = format!("{err:?}");
    map.insert(
        "error".into(),
        debug.split('(').next().unwrap_or_default().into(),
    );
    let mut put = |k: &str, v: Dynamic| {
        map.insert(k.into(), v);
    };
    match err {
        E::ErrorFunctionNotFound(f, ..) | E::ErrorNonPureMethodCallOnConstant(f, ..) => {
            put("function", f.into())
        }
        E::ErrorInFunctionCall(f, s, ..) => {
            put("function", f.into());
            put("source", s.into());
        }
        E::ErrorMismatchDataType(r, a, ..) | E::ErrorMismatchOutputType(r, a, ..) => {
            put("requested", r.into());
            put("actual", a.into());
        }
        E::ErrorArrayBounds(n, i, ..)
        | E::ErrorStringBounds(n, i, ..)
        | E::ErrorBitFieldBounds(n, i, ..) => {
            put("length", (*n as INT).into());
            put("index", (*i as INT).into());
        }
        E::ErrorVariableExists(v, ..)
        | E::ErrorForbiddenVariable(v, ..)
        | E::ErrorVariableNotFound(v, ..)
        | E::ErrorPropertyNotFound(v, ..)
        | E::ErrorDataRace(v, ..)
        | E::ErrorAssignmentToConstant(v, ..) => put("variable", v.into()),
        E::ErrorIndexNotFound(v, ..) => put("index", v.clone()),
        E::ErrorInModule(m, ..) | E::ErrorModuleNotFound(m, ..) => put("module", m.into()),
        E::ErrorDotExpr(p, ..) => put("property", p.into()),
        E::ErrorIndexingType(t, ..) | E::ErrorDataTooLarge(t, ..) => put("type", t.into()),
        E::ErrorTerminated(t, ..) => put("token", t.clone()),
        _ => (),
    }
    map.into()
}
