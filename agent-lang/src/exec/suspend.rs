//! Suspending statements: a statement whose call can reach a suspension primitive stops there
//! (a primitive hands the host an [`Outcome`]; a mobile function runs as a new frame; a block
//! used as a value is walked), waits as its frame's `pending` statement, and is completed later
//! with the value that comes back: from the host on resume, from the callee's return, or from
//! the block.

use rhai::{Array, BinaryExpr, Dynamic, EvalAltResult, Expr, Position, Scope, Stmt};

use super::{
    internal, internal_err, Ctx, Cursor, Err, Execution, Frame, Outcome, RunState, StepErr, Stop,
};
use crate::compile::{BodyId, Call, Completion, Node, NodeId, Primitive, ProgramInner};
use crate::engine::ExitValue;

impl Execution {
    /// Starts the suspending statement `id`: evaluates its call's arguments and makes the call.
    pub(super) fn suspend(&mut self, ctx: &mut Ctx, id: NodeId) -> Result<(), StepErr> {
        let prog = ctx.prog;
        let Node::Suspend { call, pos, .. } = &prog.plan.nodes[id as usize] else {
            return Err(internal("suspension expected"));
        };
        self.track(ctx, *pos)?;
        match call {
            Call::Block(block) => {
                if prog.plan.blocks[*block as usize].is_empty() {
                    return self
                        .complete_node(ctx, id, Dynamic::UNIT)
                        .map_err(StepErr::Eval);
                }
                self.top_frame()?.cursors.push(Cursor::Value { node: id });
                self.push_block(*block)
            }
            Call::Primitive(primitive, args) => {
                let args = self.call_args(ctx, args.as_deref())?;
                self.top_frame()?.pending = Some(id);
                self.primitive(*primitive, args, *pos)
            }
            Call::Mobile(body, args) => {
                let args = self.call_args(ctx, args.as_deref())?;
                self.top_frame()?.pending = Some(id);
                self.call_mobile(ctx, *body, args, *pos)
            }
        }
    }

    /// Evaluates a call's arguments (one array expression), or none.
    fn call_args(&mut self, ctx: &mut Ctx, args: Option<&[Stmt]>) -> Result<Array, StepErr> {
        match args {
            Some(a) => self
                .eval(ctx, a)?
                .into_array()
                .map_err(|t| internal(&format!("arguments evaluated to {t}"))),
            None => Ok(Array::new()),
        }
    }

    /// Stops the agent at primitive `p` with the outcome the host acts on.
    fn primitive(&mut self, p: Primitive, args: Array, pos: Position) -> Result<(), StepErr> {
        let outcome = match p {
            Primitive::Migrate => {
                let to = args.into_iter().next().unwrap_or_default();
                match to.clone().into_immutable_string() {
                    Ok(s) => Outcome::Migrate { to: s.to_string() },
                    Err(t) => {
                        return Err(StepErr::Eval(
                            EvalAltResult::ErrorFunctionNotFound(format!("migrate ({t})"), pos)
                                .into(),
                        ))
                    }
                }
            }
            Primitive::Send => {
                let mut args = args.into_iter();
                let to = args.next().unwrap_or_default();
                let value = args.next().unwrap_or_default();
                match to.into_immutable_string() {
                    Ok(s) => match crate::value::encode_message(
                        &self.program.inner.closures,
                        &value.flatten(),
                    ) {
                        Ok(message) => Outcome::Send {
                            to: s.to_string(),
                            message,
                        },
                        Err(e) => {
                            let msg = format!("send: {e}");
                            return Err(StepErr::Eval(
                                EvalAltResult::ErrorRuntime(msg.into(), pos).into(),
                            ));
                        }
                    },
                    Err(t) => {
                        return Err(StepErr::Eval(
                            EvalAltResult::ErrorFunctionNotFound(format!("send ({t}, ?)"), pos)
                                .into(),
                        ))
                    }
                }
            }
            Primitive::Receive => match args.into_iter().next() {
                None => Outcome::Receive { timeout_ms: None },
                Some(t) => match t.as_int() {
                    Ok(ms) => Outcome::Receive {
                        timeout_ms: Some(ms.max(0) as u64),
                    },
                    Err(typ) => {
                        return Err(StepErr::Eval(
                            EvalAltResult::ErrorFunctionNotFound(format!("receive ({typ})"), pos)
                                .into(),
                        ))
                    }
                },
            },
        };
        self.state = RunState::Suspended(p);
        Err(StepErr::Stop(Stop::Outcome(outcome)))
    }

    /// Calls mobile function `body` as a new frame on top, with its parameters in its scope.
    /// The stack-overflow check and the `()` of an empty body are those of Rhai's
    /// `Engine::call_script_fn` (`src/func/script.rs`), with the walked frames as the call level.
    fn call_mobile(
        &mut self,
        ctx: &mut Ctx,
        body: BodyId,
        args: Array,
        pos: Position,
    ) -> Result<(), StepErr> {
        let b = &ctx.prog.plan.bodies[body as usize];
        if self.frames.len() > ctx.prog.engine.max_call_levels() {
            return Err(StepErr::Eval(EvalAltResult::ErrorStackOverflow(pos).into()));
        }
        if ctx.prog.plan.blocks[b.block as usize].is_empty() {
            return self.complete(ctx, Dynamic::UNIT).map_err(StepErr::Eval);
        }
        let mut scope = Scope::new();
        for (name, value) in b.params.iter().zip(args) {
            scope.push_dynamic(name.clone(), value.flatten());
        }
        self.frames.push(Frame::new(body, b.block, scope, pos));
        Ok(())
    }

    /// Where the statement the top frame waits on is, for an error the host resumes it with.
    pub(super) fn pending_pos(&self, prog: &ProgramInner) -> Position {
        self.frames
            .last()
            .and_then(|f| f.pending)
            .and_then(|id| match &prog.plan.nodes[id as usize] {
                Node::Suspend { pos, .. } => Some(*pos),
                _ => None,
            })
            .unwrap_or(Position::NONE)
    }

    /// Completes the top frame's pending suspending statement with `value`.
    pub(super) fn complete(&mut self, ctx: &mut Ctx, value: Dynamic) -> Result<(), Err> {
        let frame = self
            .frames
            .last_mut()
            .ok_or_else(|| internal_err("no frame"))?;
        let id = frame
            .pending
            .take()
            .ok_or_else(|| internal_err("nothing pending"))?;
        self.complete_node(ctx, id, value)
    }

    /// Completes the suspending statement `id` of the top frame with `value`.
    ///
    /// A `let` or an assignment is finished by Rhai itself: the executor builds the statement
    /// again as a Rhai `Stmt::Var` or `Stmt::Assignment` (`src/ast/stmt.rs`, `internals`
    /// feature) with `value` as an `Expr::DynamicConstant` in place of the call, and evaluates
    /// it, so that Rhai's own arms of `Engine::eval_stmt` (`src/eval/stmt.rs`) bind the value
    /// exactly as for the original statement: the parser's slot for a re-declared variable,
    /// `const`, compound operators, indexed and property targets.
    pub(super) fn complete_node(
        &mut self,
        ctx: &mut Ctx,
        id: NodeId,
        value: Dynamic,
    ) -> Result<(), Err> {
        let prog = ctx.prog;
        let Node::Suspend { then, pos, .. } = &prog.plan.nodes[id as usize] else {
            return Err(internal_err("pending node is not a suspension"));
        };
        let value = value.flatten();
        let constant = |v: Dynamic| Expr::DynamicConstant(Box::new(v), *pos);
        let stmt = match then {
            Completion::Value => {
                return self.set_value(value).map_err(step_to_err);
            }
            Completion::Return => return self.return_from_frame(ctx, value).map_err(step_to_err),
            Completion::Let(x, flags, spos) => {
                let (ident, index) = &**x;
                Stmt::Var(
                    Box::new((ident.clone(), constant(value), *index)),
                    *flags,
                    *spos,
                )
            }
            Completion::Assign(x) => {
                let (op, lhs) = &**x;
                Stmt::Assignment(Box::new((
                    op.clone(),
                    BinaryExpr {
                        lhs: lhs.clone(),
                        rhs: constant(value),
                    },
                )))
            }
        };
        let _ = self
            .eval(ctx, std::slice::from_ref(&stmt))
            .map_err(step_to_err)?;
        self.set_value(Dynamic::UNIT).map_err(step_to_err)
    }
}

/// A step's failure as the Rhai error a completion reports. The agent finishing (its main body
/// returning) becomes the termination `exit(value)` raises, which the unwinder turns
/// back into [`Outcome::Finished`].
fn step_to_err(e: StepErr) -> Err {
    match e {
        StepErr::Eval(e) => e,
        StepErr::Stop(Stop::Outcome(Outcome::Finished(v))) => {
            EvalAltResult::ErrorTerminated(Dynamic::from(ExitValue(v)), Position::NONE).into()
        }
        StepErr::Stop(Stop::Outcome(_)) => internal_err("unexpected suspension while completing"),
    }
}
