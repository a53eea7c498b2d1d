//! Loops as cursors: entering a walked `while`, `do` or `for`, and deciding at each turn whether
//! its body runs again. A loop may suspend mid-way and resume on another node, so a `for` keeps
//! its iteration as plain data ([`ForIter`]) that the codec can save; Rhai's own iterators are
//! boxed Rust iterators that cannot be.

use rhai::{Array, Dynamic, EvalAltResult, Expr, Position, Scope, Stmt, INT};

use super::{internal, Ctx, Cursor, Execution, StepErr};
use crate::compile::{Node, NodeId};

/// Where a loop is in its iteration.
#[derive(Debug)]
pub(crate) enum LoopState {
    While,
    /// `started`: the body has run once, so the condition decides from now on.
    Do {
        started: bool,
    },
    /// `index`: the value of the `for`'s counter variable, -1 before the first item.
    For {
        index: INT,
        iter: ForIter,
    },
}

/// The items a `for` has left to give.
#[derive(Debug)]
pub(crate) enum ForIter {
    /// `next..end` or `next..=end` over integers: the iterators Rhai registers for
    /// `Range<INT>` and `RangeInclusive<INT>` are std's, whose `next` this copies.
    Range {
        next: INT,
        end: INT,
        inclusive: bool,
    },
    /// Rhai's `range(from, to, step)` over integers, iterated exactly as its `StepRange`:
    /// `dir` > 0 forward, < 0 backward, 0 done.
    Step {
        from: INT,
        to: INT,
        step: INT,
        dir: i8,
    },
    /// An array's items, or any other iterable's, materialized when the loop starts; `pos` is the
    /// next item's index.
    Items { items: Array, pos: usize },
}

impl ForIter {
    /// The next item, or `None` once there are no more.
    fn next_item(&mut self) -> Option<Dynamic> {
        match self {
            ForIter::Range {
                next,
                end,
                inclusive,
            } => {
                let more = if *inclusive {
                    *next <= *end
                } else {
                    *next < *end
                };
                if !more {
                    return None;
                }
                let v = *next;
                match next.checked_add(1) {
                    Some(n) => *next = n,
                    None => {
                        // INT::MAX reached: this was the last item.
                        *end = *next;
                        *inclusive = false;
                    }
                }
                Some(Dynamic::from_int(v))
            }
            // Rhai's `StepRange::next` (`src/packages/iter_basic.rs`).
            ForIter::Step {
                from,
                to,
                step,
                dir,
            } => {
                if *dir == 0 {
                    return None;
                }
                let v = *from;
                match from.checked_add(*step) {
                    // Like `StepRange::next`: an overflowing step ends the range without
                    // yielding the current value.
                    None => {
                        *dir = 0;
                        None
                    }
                    Some(n) => {
                        *from = n;
                        if (*dir > 0 && n >= *to) || (*dir < 0 && n <= *to) {
                            *dir = 0;
                        }
                        Some(Dynamic::from_int(v))
                    }
                }
            }
            ForIter::Items { items, pos } => {
                let v = items.get_mut(*pos).map(std::mem::take);
                *pos += 1;
                v
            }
        }
    }
}

impl Execution {
    /// Starts the loop statement `id` by pushing its cursor (a `for` evaluates its iterable
    /// here, once); the next step decides whether the body runs.
    pub(super) fn enter_loop(&mut self, ctx: &mut Ctx, id: NodeId) -> Result<(), StepErr> {
        let prog = ctx.prog;
        let state = match &prog.plan.nodes[id as usize] {
            Node::While { .. } => LoopState::While,
            Node::Do { .. } => LoopState::Do { started: false },
            Node::For {
                iterable,
                stepped,
                pos,
                ..
            } => {
                let iter = match stepped {
                    Some(x) => self.stepped_iter(ctx, &x.0, &x.1, *pos)?,
                    None => {
                        let value = self.eval(ctx, iterable)?.flatten();
                        self.make_iter(ctx, value, *pos)?
                    }
                };
                LoopState::For { index: -1, iter }
            }
            _ => return Err(internal("loop node expected")),
        };
        let frame = self.top_frame()?;
        let scope_len = frame.scope.len() as u32;
        frame.cursors.push(Cursor::Loop {
            node: id,
            scope_len,
            state,
        });
        Ok(())
    }

    /// One step of the loop on top: decide whether to run the body again.
    ///
    /// Each turn gives what Rhai's `Stmt::While`, `Stmt::Do` and `Stmt::For` arms of
    /// `Engine::eval_stmt` (`src/eval/stmt.rs`) give: a `do` runs its body before the first
    /// test and ends when `condition ^ is_while`; a `for` counts from 0 and holds the counter
    /// then the loop variable above the loop's scope. Rhai pushes those two once and overwrites
    /// them; here they are rewound and pushed again each turn, which leaves the same scope.
    pub(super) fn loop_step(&mut self, ctx: &mut Ctx) -> Result<(), StepErr> {
        let prog = ctx.prog;
        let (node_id, scope_len) = match self.top_frame()?.cursors.last() {
            Some(Cursor::Loop {
                node, scope_len, ..
            }) => (*node, *scope_len),
            _ => return Err(internal("loop cursor expected")),
        };
        let again = match &prog.plan.nodes[node_id as usize] {
            Node::While { cond, body } => {
                self.track(ctx, Position::NONE)?;
                let go = match cond {
                    Some(c) => self.eval_bool(ctx, c)?,
                    None => true,
                };
                go.then_some(*body)
            }
            Node::Do {
                cond,
                body,
                is_while,
            } => {
                self.track(ctx, Position::NONE)?;
                let started = match self.top_frame()?.cursors.last_mut() {
                    Some(Cursor::Loop {
                        state: LoopState::Do { started },
                        ..
                    }) => std::mem::replace(started, true),
                    _ => return Err(internal("do cursor expected")),
                };
                if !started {
                    Some(*body)
                } else {
                    let c = self.eval_bool(ctx, cond)?;
                    (!(c ^ is_while)).then_some(*body)
                }
            }
            Node::For {
                var,
                counter,
                body,
                pos,
                ..
            } => {
                self.track(ctx, *pos)?;
                let frame = self.top_frame()?;
                let Some(Cursor::Loop {
                    state: LoopState::For { index, iter },
                    ..
                }) = frame.cursors.last_mut()
                else {
                    return Err(internal("for cursor expected"));
                };
                match iter.next_item() {
                    Some(item) => {
                        *index += 1;
                        let i = *index;
                        crate::nested::rewind(&mut frame.scope, scope_len as usize);
                        if let Some(c) = counter {
                            frame.scope.push(c.clone(), i);
                        }
                        frame.scope.push_dynamic(var.clone(), item.flatten());
                        Some(*body)
                    }
                    None => None,
                }
            }
            _ => return Err(internal("loop node expected")),
        };
        match again {
            Some(body) => self.push_block(body),
            None => {
                let frame = self.top_frame()?;
                frame.cursors.pop();
                crate::nested::rewind(&mut frame.scope, scope_len as usize);
                self.deliver(ctx, Dynamic::UNIT)
            }
        }
    }

    /// The iterator of `for x in range(from, to, step)`: lazy over integers, as Rhai's
    /// `StepRange::new` (`src/packages/iter_basic.rs`) builds it; anything else (floats, a zero
    /// step and its error) goes through Rhai's own `range` with the arguments already evaluated
    /// (once), the call rebuilt with those values as constants.
    fn stepped_iter(
        &mut self,
        ctx: &mut Ctx,
        args: &[Stmt],
        call: &rhai::FnCallExpr,
        pos: Position,
    ) -> Result<ForIter, StepErr> {
        let args = self
            .eval(ctx, args)?
            .into_array()
            .map_err(|t| internal(&format!("range arguments evaluated to {t}")))?;
        let ints: Vec<INT> = args.iter().filter_map(|a| a.as_int().ok()).collect();
        if let [from, to, step] = ints[..] {
            if step != 0 {
                let dir = match from.checked_add(step) {
                    Some(n) if from < to && n > from => 1,
                    Some(n) if from > to && n < from => -1,
                    _ => 0,
                };
                return Ok(ForIter::Step {
                    from,
                    to,
                    step,
                    dir,
                });
            }
        }
        let mut call = call.clone();
        call.args = args
            .into_iter()
            .map(|a| Expr::DynamicConstant(Box::new(a), pos))
            .collect();
        let stmt = Stmt::Expr(Box::new(Expr::FnCall(Box::new(call), pos)));
        let value = self.eval(ctx, std::slice::from_ref(&stmt))?.flatten();
        self.make_iter(ctx, value, pos)
    }

    /// The iteration of `value`, for the types Rhai's `Stmt::For` finds an iterator for.
    /// Arrays and integer ranges are iterated here; for anything else Rhai's own iterator
    /// materializes the items (through the program's `collect` helper), and a value with no
    /// iterator fails with Rhai's `ErrorFor`.
    fn make_iter(
        &mut self,
        ctx: &mut Ctx,
        value: Dynamic,
        pos: Position,
    ) -> Result<ForIter, StepErr> {
        if value.is_array() {
            let items = value.into_array().map_err(internal)?;
            return Ok(ForIter::Items { items, pos: 0 });
        }
        if let Some(r) = value.read_lock::<std::ops::Range<INT>>() {
            return Ok(ForIter::Range {
                next: r.start,
                end: r.end,
                inclusive: false,
            });
        }
        if let Some(r) = value.read_lock::<std::ops::RangeInclusive<INT>>() {
            return Ok(ForIter::Range {
                next: *r.start(),
                end: *r.end(),
                inclusive: true,
            });
        }
        // Anything else Rhai can iterate: let Rhai's own iterator materialize it.
        let collected = ctx.prog.engine.call_fn::<Array>(
            &mut Scope::new(),
            &ctx.prog.collector,
            "collect",
            (value,),
        );
        match collected {
            Ok(items) => Ok(ForIter::Items { items, pos: 0 }),
            Err(err) => match *err {
                EvalAltResult::ErrorInFunctionCall(_, _, inner, _)
                    if matches!(*inner, EvalAltResult::ErrorFor(..)) =>
                {
                    Err(StepErr::Eval(EvalAltResult::ErrorFor(pos).into()))
                }
                other => Err(StepErr::Eval(Box::new(other))),
            },
        }
    }
}
