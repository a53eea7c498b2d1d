//! The resumable executor: runs a [`Program`] as an explicit stack of frames that can stop at a
//! suspension primitive, be encoded, and carry on elsewhere from the very next statement.
//!
//! Each frame holds its Rhai [`Scope`], built exactly as Rhai's own evaluator would build it
//! (parameters, then each `let` in order, loop variables pushed and popped as Rhai does, rewinds
//! at block exits), because Rhai's compiled variable references are offsets from the end of the
//! scope. Its position is a stack of [`Cursor`]s: the blocks, loops and `try`s it is inside.
//! Delegated snippets run through Rhai natively with the frame's scope.

use std::panic::{catch_unwind, AssertUnwindSafe};

use rhai::{
    Array, BinaryExpr, Caches, Dynamic, EvalAltResult, Expr, GlobalRuntimeState, Position, Scope,
    Stmt, INT,
};

use crate::compile::{
    BlockId, BodyId, Call, Completion, Node, NodeId, Primitive, Program, ProgramInner, MAIN_BODY,
};
use crate::engine::{exit_value, HostEnv, HostGuard};
use crate::error::{AgentError, AgentErrorKind};

type Err = Box<EvalAltResult>;

/// Why [`Execution::resume`] returned.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// The agent finished with this value.
    Finished(Dynamic),
    /// The agent called `migrate(to)`: move it, then resume it with `Resume::Value(())`, or resume
    /// it where it is with `Resume::Error(..)` if the hop failed.
    Migrate {
        /// Where the agent asked to go.
        to: String,
    },
    /// The agent called `receive()` (no timeout) or `receive(timeout_ms)`: resume it with the
    /// message, or with `()` when the timeout expires.
    Receive {
        /// How long to wait, if the agent said.
        timeout_ms: Option<u64>,
    },
    /// The agent called `send(to, value)`: deliver the message, then resume it with `()`, or
    /// with `Resume::Error(..)` if it cannot be delivered.
    Send {
        /// The receiving agent's id.
        to: String,
        /// The message.
        value: Dynamic,
    },
    /// The agent failed; it cannot be resumed.
    Failed(AgentError),
}

/// What a suspended agent is resumed with.
#[derive(Debug, Clone)]
pub enum Resume {
    /// Start a new execution (the first resume), or continue one whose primitive returns `()`.
    Start,
    /// The primitive returns this value.
    Value(Dynamic),
    /// The primitive throws this message (catchable by the agent).
    Error(String),
}

/// One activation of a body.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) body: BodyId,
    pub(crate) scope: Scope<'static>,
    pub(crate) cursors: Vec<Cursor>,
    /// Where the caller called this frame (for errors).
    pub(crate) call_pos: Position,
    /// The suspending statement of this frame that waits for a callee or a primitive.
    pub(crate) pending: Option<NodeId>,
}

/// A position inside a frame: one entry per walked construct being executed.
#[derive(Debug)]
pub(crate) enum Cursor {
    Block {
        block: BlockId,
        next: u32,
        scope_len: u32,
        value: Dynamic,
    },
    Loop {
        node: NodeId,
        scope_len: u32,
        state: LoopState,
    },
    /// `caught`: the value the catch variable got, while the catch block runs.
    Try {
        node: NodeId,
        scope_len: u32,
        caught: Option<Caught>,
    },
    /// The block above computes the value of the suspending statement `node` (a
    /// [`Call::Block`]): when it ends, the statement completes with the block's value.
    Value { node: NodeId },
}

/// The error a running `catch` block handles, kept for a bare `throw;` that re-throws it.
#[derive(Debug)]
pub(crate) struct Caught(pub(crate) Err);

#[derive(Debug)]
pub(crate) enum LoopState {
    While,
    Do { started: bool },
    For { index: INT, iter: ForIter },
}

#[derive(Debug)]
pub(crate) enum ForIter {
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
    Items {
        items: Array,
        pos: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunState {
    NotStarted,
    Suspended(Primitive),
    Done,
}

/// A running agent: its program and its execution state.
#[derive(Debug)]
pub struct Execution {
    pub(crate) program: Program,
    pub(crate) frames: Vec<Frame>,
    pub(crate) state: RunState,
}

/// Per-slice evaluation context.
struct Ctx<'p> {
    prog: &'p ProgramInner,
    global: GlobalRuntimeState,
    caches: Caches,
    /// Where the last failed snippet starts, for errors that carry no position.
    fallback_pos: Position,
}

/// What stops the stepping loop.
enum Stop {
    Outcome(Outcome),
}

impl Execution {
    /// A new execution of `program`, not started yet: call [`Execution::resume`] with
    /// [`Resume::Start`].
    pub fn new(program: &Program) -> Execution {
        Execution {
            program: program.clone(),
            frames: Vec::new(),
            state: RunState::NotStarted,
        }
    }

    /// The program this execution runs.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Is the agent finished (or failed)?
    pub fn is_done(&self) -> bool {
        self.state == RunState::Done
    }

    /// Depth of the walked call stack (1 = only the main body).
    pub fn depth(&self) -> usize {
        self.frames.len()
    }

    /// Runs the agent until it finishes, fails or reaches a suspension primitive.
    ///
    /// `env` is what the host functions report during this slice. The slice may run at most
    /// [`Limits::max_operations`](crate::Limits) operations.
    pub fn resume(&mut self, env: &HostEnv, input: Resume) -> Outcome {
        let _host = HostGuard::install(env);
        let program = self.program.clone();
        let result = catch_unwind(AssertUnwindSafe(|| self.run_slice(&program.inner, input)));
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Outcome::Failed(AgentError::new(
                    AgentErrorKind::Internal,
                    format!("internal error in the executor: {what}"),
                    None,
                ))
            }
        };
        if matches!(outcome, Outcome::Finished(_) | Outcome::Failed(_)) {
            self.state = RunState::Done;
            self.frames.clear();
        }
        outcome
    }

    fn run_slice(&mut self, prog: &ProgramInner, input: Resume) -> Outcome {
        let mut global = prog.engine.new_global_runtime_state();
        global.lib.push(prog.ast.shared_lib().clone());
        let mut ctx = Ctx {
            prog,
            global,
            caches: Caches::new(),
            fallback_pos: Position::NONE,
        };
        let first = match (self.state, input) {
            (RunState::Done, _) => {
                return Outcome::Failed(AgentError::new(
                    AgentErrorKind::Internal,
                    "the agent has already finished".into(),
                    None,
                ))
            }
            (RunState::NotStarted, _) => {
                let block = prog.plan.bodies[MAIN_BODY as usize].block;
                self.frames.push(Frame {
                    body: MAIN_BODY,
                    scope: Scope::new(),
                    cursors: vec![Cursor::Block {
                        block,
                        next: 0,
                        scope_len: 0,
                        value: Dynamic::UNIT,
                    }],
                    call_pos: Position::NONE,
                    pending: None,
                });
                Ok(())
            }
            (RunState::Suspended(_), Resume::Start) => self.complete(&mut ctx, Dynamic::UNIT),
            (RunState::Suspended(_), Resume::Value(v)) => self.complete(&mut ctx, v),
            (RunState::Suspended(_), Resume::Error(msg)) => {
                let pos = self.pending_pos(prog);
                Err(EvalAltResult::ErrorRuntime(msg.into(), pos).into())
            }
        };
        self.state = RunState::NotStarted;
        let step = match first {
            Ok(()) => self.run(&mut ctx),
            Err(err) => self.raise(&mut ctx, err).and_then(|()| self.run(&mut ctx)),
        };
        match step {
            Ok(()) => unreachable_outcome(),
            Err(Stop::Outcome(o)) => o,
        }
    }

    fn pending_pos(&self, prog: &ProgramInner) -> Position {
        self.frames
            .last()
            .and_then(|f| f.pending)
            .and_then(|id| match &prog.plan.nodes[id as usize] {
                Node::Suspend { pos, .. } => Some(*pos),
                _ => None,
            })
            .unwrap_or(Position::NONE)
    }

    /// Steps until the agent stops. Only returns through `Err(Stop)`.
    fn run(&mut self, ctx: &mut Ctx) -> Result<(), Stop> {
        loop {
            if let Err(err) = self.step(ctx) {
                match err {
                    StepErr::Stop(stop) => return Err(stop),
                    StepErr::Eval(err) => self.raise(ctx, err)?,
                }
            }
        }
    }

    fn step(&mut self, ctx: &mut Ctx) -> Result<(), StepErr> {
        let prog = ctx.prog;
        let frame = self
            .frames
            .last_mut()
            .ok_or_else(|| internal("no frame to run"))?;
        let top = frame
            .cursors
            .last_mut()
            .ok_or_else(|| internal("frame without position"))?;
        match top {
            Cursor::Block { block, next, .. } => {
                let nodes = &prog.plan.blocks[*block as usize];
                if let Some(&id) = nodes.get(*next as usize) {
                    *next += 1;
                    self.exec_node(ctx, id)
                } else {
                    let Some(Cursor::Block {
                        scope_len, value, ..
                    }) = frame.cursors.pop()
                    else {
                        return Err(internal("block cursor vanished"));
                    };
                    frame.scope.rewind(scope_len as usize);
                    self.deliver(ctx, value)
                }
            }
            Cursor::Loop { .. } => self.loop_step(ctx),
            Cursor::Try { .. } => Err(internal("try without a body")),
            Cursor::Value { .. } => Err(internal("value cursor without a block")),
        }
    }

    fn top_frame(&mut self) -> Result<&mut Frame, StepErr> {
        self.frames.last_mut().ok_or_else(|| internal("no frame"))
    }

    /// Evaluates a snippet in the top frame's scope.
    fn eval(&mut self, ctx: &mut Ctx, snippet: &[Stmt]) -> Result<Dynamic, StepErr> {
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

    fn eval_bool(&mut self, ctx: &mut Ctx, snippet: &[Stmt]) -> Result<bool, StepErr> {
        let v = self.eval(ctx, snippet)?;
        v.as_bool().map_err(|typ| {
            let pos = snippet_pos(snippet);
            StepErr::Eval(
                EvalAltResult::ErrorMismatchDataType("bool".into(), typ.into(), pos).into(),
            )
        })
    }

    fn track(&mut self, ctx: &mut Ctx, pos: Position) -> Result<(), StepErr> {
        ctx.global.num_operations += 1;
        let max = ctx.prog.engine.max_operations();
        if max > 0 && ctx.global.num_operations > max {
            return Err(StepErr::Eval(
                EvalAltResult::ErrorTooManyOperations(pos).into(),
            ));
        }
        Ok(())
    }

    fn set_value(&mut self, value: Dynamic) -> Result<(), StepErr> {
        match self.top_frame()?.cursors.last_mut() {
            Some(Cursor::Block { value: v, .. }) => {
                *v = value;
                Ok(())
            }
            _ => Err(internal("statement outside a block")),
        }
    }

    fn push_block(&mut self, block: BlockId) -> Result<(), StepErr> {
        let frame = self.top_frame()?;
        let scope_len = frame.scope.len() as u32;
        frame.cursors.push(Cursor::Block {
            block,
            next: 0,
            scope_len,
            value: Dynamic::UNIT,
        });
        Ok(())
    }

    fn exec_node(&mut self, ctx: &mut Ctx, id: NodeId) -> Result<(), StepErr> {
        let prog = ctx.prog;
        let node = &prog.plan.nodes[id as usize];
        let blocks = &prog.plan.blocks;
        match node {
            Node::Delegated(snippet) => {
                let v = self.eval(ctx, snippet)?;
                self.set_value(v)
            }
            Node::Block(b) => self.enter(*b),
            Node::If {
                cond,
                then,
                otherwise,
            } => {
                self.track(ctx, snippet_pos(cond))?;
                let c = self.eval_bool(ctx, cond)?;
                let chosen = if c { *then } else { *otherwise };
                if blocks[chosen as usize].is_empty() {
                    self.set_value(Dynamic::UNIT)
                } else {
                    self.push_block(chosen)
                }
            }
            Node::Switch { selector, arms } => {
                let v = self.eval(ctx, selector)?;
                match v.as_int().ok().and_then(|i| arms.get(i as usize)) {
                    Some(&arm) => self.enter(arm),
                    None => self.set_value(Dynamic::UNIT),
                }
            }
            Node::While { .. } | Node::Do { .. } => {
                let state = if matches!(node, Node::While { .. }) {
                    LoopState::While
                } else {
                    LoopState::Do { started: false }
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
                let frame = self.top_frame()?;
                let scope_len = frame.scope.len() as u32;
                frame.cursors.push(Cursor::Loop {
                    node: id,
                    scope_len,
                    state: LoopState::For { index: -1, iter },
                });
                Ok(())
            }
            Node::Break { is_break, value } => {
                let v = match value {
                    Some(s) => self.eval(ctx, s)?,
                    None => Dynamic::UNIT,
                };
                self.unwind_loop(*is_break, v)
            }
            Node::Return { value } => {
                let v = match value {
                    Some(s) => self.eval(ctx, s)?.flatten(),
                    None => Dynamic::UNIT,
                };
                self.return_from_frame(ctx, v)
            }
            Node::Try { body, .. } => {
                if blocks[*body as usize].is_empty() {
                    return self.set_value(Dynamic::UNIT);
                }
                let frame = self.top_frame()?;
                let scope_len = frame.scope.len() as u32;
                frame.cursors.push(Cursor::Try {
                    node: id,
                    scope_len,
                    caught: None,
                });
                self.push_block(*body)
            }
            Node::Suspend {
                call: Call::Block(block),
                pos,
                ..
            } => {
                self.track(ctx, *pos)?;
                if blocks[*block as usize].is_empty() {
                    return self
                        .complete_node(ctx, id, Dynamic::UNIT)
                        .map_err(StepErr::Eval);
                }
                self.top_frame()?.cursors.push(Cursor::Value { node: id });
                self.push_block(*block)
            }
            Node::Suspend { call, pos, .. } => {
                self.track(ctx, *pos)?;
                let args = match call {
                    Call::Primitive(_, Some(a)) | Call::Mobile(_, Some(a)) => self
                        .eval(ctx, a)?
                        .into_array()
                        .map_err(|t| internal(&format!("arguments evaluated to {t}")))?,
                    _ => Array::new(),
                };
                self.top_frame()?.pending = Some(id);
                match call {
                    Call::Primitive(p, _) => self.primitive(*p, args, *pos),
                    Call::Mobile(body, _) => self.call_mobile(ctx, *body, args, *pos),
                    Call::Block(_) => Err(internal("block value handled above")),
                }
            }
        }
    }

    /// Enters a block (or gives `()` for an empty one).
    fn enter(&mut self, block: BlockId) -> Result<(), StepErr> {
        if self.program.inner.plan.blocks[block as usize].is_empty() {
            self.set_value(Dynamic::UNIT)
        } else {
            self.push_block(block)
        }
    }

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
                    Ok(s) => Outcome::Send {
                        to: s.to_string(),
                        value: value.flatten(),
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
        self.frames.push(Frame {
            body,
            scope,
            cursors: vec![Cursor::Block {
                block: b.block,
                next: 0,
                scope_len: 0,
                value: Dynamic::UNIT,
            }],
            call_pos: pos,
            pending: None,
        });
        Ok(())
    }

    /// Delivers the value of a finished block to what is below it.
    fn deliver(&mut self, ctx: &mut Ctx, value: Dynamic) -> Result<(), StepErr> {
        let frame = self.top_frame()?;
        match frame.cursors.last_mut() {
            None => self.return_from_frame(ctx, value),
            Some(Cursor::Block { value: v, .. }) => {
                *v = value;
                Ok(())
            }
            Some(Cursor::Loop { .. }) => Ok(()),
            Some(Cursor::Value { node }) => {
                let node = *node;
                frame.cursors.pop();
                self.complete_node(ctx, node, value).map_err(StepErr::Eval)
            }
            Some(Cursor::Try { .. }) => {
                let Some(Cursor::Try {
                    scope_len, caught, ..
                }) = frame.cursors.pop()
                else {
                    return Err(internal("try cursor vanished"));
                };
                frame.scope.rewind(scope_len as usize);
                let value = if caught.is_some() {
                    Dynamic::UNIT
                } else {
                    value
                };
                self.deliver(ctx, value)
            }
        }
    }

    /// One step of the loop on top: decide whether to run the body again.
    fn loop_step(&mut self, ctx: &mut Ctx) -> Result<(), StepErr> {
        let prog = ctx.prog;
        let (node_id, scope_len) = match self.top_frame()?.cursors.last() {
            Some(Cursor::Loop {
                node, scope_len, ..
            }) => (*node, *scope_len),
            _ => return Err(internal("loop cursor expected")),
        };
        let node = &prog.plan.nodes[node_id as usize];
        let again = match node {
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
                let item = match iter {
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
                        if more {
                            let v = *next;
                            match next.checked_add(1) {
                                Some(n) => *next = n,
                                None => {
                                    // i64::MAX reached: this was the last item.
                                    *end = *next;
                                    *inclusive = false;
                                }
                            }
                            Some(Dynamic::from_int(v))
                        } else {
                            None
                        }
                    }
                    ForIter::Step {
                        from,
                        to,
                        step,
                        dir,
                    } => {
                        if *dir == 0 {
                            None
                        } else {
                            let v = *from;
                            match from.checked_add(*step) {
                                // Like `StepRange::next`: an overflowing step ends the range
                                // without yielding the current value.
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
                    }
                    ForIter::Items { items, pos } => {
                        let v = items.get_mut(*pos).map(std::mem::take);
                        *pos += 1;
                        v
                    }
                };
                match item {
                    Some(item) => {
                        *index += 1;
                        let i = *index;
                        frame.scope.rewind(scope_len as usize);
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
                frame.scope.rewind(scope_len as usize);
                self.deliver(ctx, Dynamic::UNIT)
            }
        }
    }

    /// The iterator of `for x in range(from, to, step)`: lazy over integers, as Rhai's
    /// `StepRange::new` builds it; anything else (floats, a zero step and its error) goes
    /// through Rhai's own `range` with the arguments already evaluated (once).
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

    /// `break` (is_break) or `continue` out to the nearest loop of the frame.
    fn unwind_loop(&mut self, is_break: bool, value: Dynamic) -> Result<(), StepErr> {
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
                        frame.scope.rewind(scope_len as usize);
                        return self.deliver_loop_value(value);
                    }
                    if let Node::Do { body, .. } = &prog.plan.nodes[node as usize] {
                        // Rhai's `continue` in a `do` loop skips the condition.
                        let body = *body;
                        return self.push_block(body);
                    }
                    return Ok(());
                }
                Some(Cursor::Block { scope_len, .. }) | Some(Cursor::Try { scope_len, .. }) => {
                    let l = *scope_len as usize;
                    frame.cursors.pop();
                    frame.scope.rewind(l);
                }
                Some(Cursor::Value { .. }) => {
                    frame.cursors.pop();
                }
            }
        }
    }

    fn deliver_loop_value(&mut self, value: Dynamic) -> Result<(), StepErr> {
        // A loop is always directly inside a block (or a try, whose body is a block).
        match self.top_frame()?.cursors.last_mut() {
            Some(Cursor::Block { value: v, .. }) => {
                *v = value;
                Ok(())
            }
            _ => Err(internal("loop outside a block")),
        }
    }

    fn return_from_frame(&mut self, ctx: &mut Ctx, value: Dynamic) -> Result<(), StepErr> {
        self.frames.pop();
        if self.frames.is_empty() {
            return Err(StepErr::Stop(Stop::Outcome(Outcome::Finished(value))));
        }
        self.complete(ctx, value).map_err(StepErr::Eval)
    }

    /// Completes the top frame's pending suspending statement with `value`.
    fn complete(&mut self, ctx: &mut Ctx, value: Dynamic) -> Result<(), Err> {
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
    fn complete_node(&mut self, ctx: &mut Ctx, id: NodeId, value: Dynamic) -> Result<(), Err> {
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

    /// Throws `err` at the current position: unwinds to the nearest `try`, across frames.
    fn raise(&mut self, ctx: &mut Ctx, mut err: Err) -> Result<(), Stop> {
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
                        frame.scope.rewind(scope_len as usize);
                    }
                    Cursor::Try {
                        scope_len,
                        caught: Some(caught),
                        ..
                    } => {
                        frame.scope.rewind(scope_len as usize);
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
                        frame.scope.rewind(scope_len as usize);
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
                        frame.cursors.push(Cursor::Block {
                            block: *catch,
                            next: 0,
                            scope_len,
                            value: Dynamic::UNIT,
                        });
                        return Ok(());
                    }
                    Cursor::Try { scope_len, .. } => {
                        frame.scope.rewind(scope_len as usize);
                    }
                    Cursor::Value { .. } => {}
                }
            }
            // The error leaves this frame.
            let Some(frame) = self.frames.pop() else {
                continue;
            };
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

fn failure(mut err: Err, fallback: Position) -> AgentError {
    if err.position().is_none() {
        err.set_position(fallback);
    }
    AgentError::from_rhai(&err)
}

/// The value `catch (e)` binds for `err`: what Rhai's own `try`/`catch` gives.
fn catch_value(err: &EvalAltResult) -> Dynamic {
    use rhai::Map;
    type E = EvalAltResult;
    if let E::ErrorRuntime(v, _) = err.unwrap_inner() {
        return v.clone();
    }
    let mut map = Map::new();
    map.insert(
        "message".into(),
        crate::error::message_without_position(err).into(),
    );
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

fn snippet_pos(snippet: &[Stmt]) -> Position {
    match snippet.first() {
        Some(Stmt::Expr(e)) => e.position(),
        Some(s) => s.position(),
        None => Position::NONE,
    }
}

enum StepErr {
    Stop(Stop),
    Eval(Err),
}

impl From<Stop> for StepErr {
    fn from(s: Stop) -> Self {
        StepErr::Stop(s)
    }
}

fn step_to_err(e: StepErr) -> Err {
    match e {
        StepErr::Eval(e) => e,
        StepErr::Stop(Stop::Outcome(Outcome::Finished(v))) => EvalAltResult::ErrorTerminated(
            Dynamic::from(crate::engine::ExitValue(v)),
            Position::NONE,
        )
        .into(),
        StepErr::Stop(Stop::Outcome(_)) => internal_err("unexpected suspension while completing"),
    }
}

fn internal(what: &str) -> StepErr {
    StepErr::Eval(internal_err(what))
}

fn internal_err(what: &str) -> Err {
    EvalAltResult::ErrorSystem("executor".into(), format!("internal error: {what}").into()).into()
}

fn internal_error(what: &str) -> AgentError {
    AgentError::new(
        AgentErrorKind::Internal,
        format!("internal error: {what}"),
        None,
    )
}

fn unreachable_outcome() -> Outcome {
    Outcome::Failed(internal_error("the executor stopped without an outcome"))
}
