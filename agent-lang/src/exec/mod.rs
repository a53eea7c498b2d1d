//! The resumable executor: runs a [`Program`] as an explicit stack of frames that can stop at a
//! suspension primitive, be encoded, and carry on elsewhere from the very next statement.
//!
//! Rhai's own evaluator keeps its place in a script on the Rust stack, which cannot be saved, so
//! the statements that can reach a suspension are walked here instead, with the place kept as
//! data. Each frame holds its Rhai [`Scope`], built exactly as Rhai's own evaluator would build it
//! (parameters, then each `let` in order, loop variables pushed and popped as Rhai does, rewinds
//! at block exits), because Rhai's compiled variable references are offsets from the end of the
//! scope. Its position is a stack of [`Cursor`]s: the blocks, loops and `try`s it is inside.
//! Delegated snippets run through Rhai natively with the frame's scope.
//!
//! # Layout
//!
//! - `frame`: what a walked call stack is made of (frames, cursors, a caught error) and the
//!   operations on the top frame.
//! - `step`: the walker: one step of the top cursor, one statement at a time.
//! - `snippet`: delegated statements run natively by Rhai in the top frame's scope.
//! - `loops`: `while`, `do` and `for` as cursors whose iteration state is plain data.
//! - `suspend`: suspending statements: the primitives, calls of mobile functions, and finishing
//!   the statement with the value that comes back.
//! - `unwind`: leaving constructs early: `break`, `continue`, `return`, and errors unwinding to a
//!   `catch` across frames.
//!
//! Where walking a construct must give what Rhai's evaluator gives, the walker copies the Rhai
//! 1.25.0 internal that does it; each copy names that internal and says why it is copied.

mod frame;
mod loops;
mod snippet;
mod step;
mod suspend;
mod unwind;

use std::panic::{catch_unwind, AssertUnwindSafe};

use rhai::{Caches, Dynamic, EvalAltResult, GlobalRuntimeState, Position, Scope};

use crate::compile::{Primitive, Program, ProgramInner, MAIN_BODY};
use crate::engine::{HostEnv, HostGuard};
use crate::error::{AgentError, AgentErrorKind};
use crate::meter::SliceMeter;

pub(crate) use frame::{Caught, Cursor, Frame};
pub(crate) use loops::{ForIter, LoopState};

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
        /// The value sent, encoded as a portable value ([`crate::decode_portable`] reads it).
        message: Vec<u8>,
    },
    /// The agent failed; it cannot be resumed.
    Failed(AgentError),
}

/// What a suspended agent is resumed with.
#[derive(Debug, Clone)]
pub enum Resume {
    /// Start a new execution (the first resume), or continue one whose primitive returns `()`.
    Start,
    /// The primitive returns this value. It is not counted in the agent's memory (it was
    /// built outside the agent): hosts hand over what agents send with [`Resume::Message`].
    Value(Dynamic),
    /// The primitive returns this portable value (what [`Outcome::Send`] gave, or
    /// [`crate::encode_portable`] made), decoded in the slice with the program's limits so
    /// that the agent's memory counts it; a malformed one is thrown as "receive: bad message".
    Message(Vec<u8>),
    /// The primitive throws this message (catchable by the agent).
    Error(String),
}

impl Resume {
    /// Heap bytes the input brings into the slice, which the slice frees or keeps.
    fn heap_bytes(&self) -> usize {
        match self {
            Resume::Message(bytes) => bytes.capacity(),
            Resume::Error(message) => message.capacity(),
            Resume::Start | Resume::Value(_) => 0,
        }
    }
}

impl Outcome {
    /// Heap bytes the outcome takes out of the slice, which the agent no longer holds.
    fn heap_bytes(&self) -> usize {
        match self {
            Outcome::Migrate { to } => to.capacity(),
            Outcome::Send { to, message } => to.capacity() + message.capacity(),
            Outcome::Finished(_) | Outcome::Receive { .. } | Outcome::Failed(_) => 0,
        }
    }
}

/// Where an execution is between two slices.
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
    /// Operations the last slice ran, with its allocation charge (not part of the
    /// continuation).
    pub(crate) slice_operations: u64,
    /// Bytes of memory the agent holds, as the meter counts them (not part of the
    /// continuation: decoding measures it afresh).
    pub(crate) memory: u64,
    /// The most the agent held during the last slice (not part of the continuation).
    pub(crate) slice_peak_memory: u64,
}

impl Drop for Execution {
    /// The agent's values are taken apart one level at a time ([`crate::nested::dismantle`]):
    /// an execution may be dropped on a thread whose stack does not fit the deepest value its
    /// budget admits.
    fn drop(&mut self) {
        let mut values = Vec::new();
        for frame in &mut self.frames {
            let scope = std::mem::take(&mut frame.scope);
            values.extend(
                scope
                    .into_iter()
                    .map(|(_, value, _)| value)
                    .filter(crate::nested::nests),
            );
            for cursor in &mut frame.cursors {
                match cursor {
                    frame::Cursor::Block { value, .. } if crate::nested::nests(value) => {
                        values.push(std::mem::take(value))
                    }
                    frame::Cursor::Loop {
                        state:
                            loops::LoopState::For {
                                iter: loops::ForIter::Items { items, .. },
                                ..
                            },
                        ..
                    } => values.append(items),
                    frame::Cursor::Try {
                        caught: Some(frame::Caught(error)),
                        ..
                    } => {
                        if let EvalAltResult::ErrorRuntime(value, _) = &mut **error {
                            values.push(std::mem::take(value));
                        }
                    }
                    _ => {}
                }
            }
        }
        crate::nested::dismantle(values);
    }
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

/// Why a step did not simply move on: the agent stopped, or Rhai raised an error (to be thrown
/// at the current position).
enum StepErr {
    Stop(Stop),
    Eval(Err),
}

impl Execution {
    /// A new execution of `program`, not started yet: call [`Execution::resume`] with
    /// [`Resume::Start`].
    pub fn new(program: &Program) -> Execution {
        Execution {
            program: program.clone(),
            frames: Vec::new(),
            state: RunState::NotStarted,
            slice_operations: 0,
            memory: 0,
            slice_peak_memory: 0,
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

    /// How many operations the last slice ran (counted as Rhai counts them for
    /// [`Limits::max_operations`](crate::Limits)), plus one per
    /// [`BYTES_PER_OPERATION`](crate::BYTES_PER_OPERATION) bytes it allocated.
    pub fn slice_operations(&self) -> u64 {
        self.slice_operations
    }

    /// Bytes of memory the agent's state holds on this node, as far as the allocator is
    /// [`Metered`](crate::Metered): what decoding it took, and what its slices took since.
    pub fn memory(&self) -> u64 {
        self.memory
    }

    /// The most memory the agent held during the last slice, as far as the meter checked (at
    /// every operation).
    pub fn slice_peak_memory(&self) -> u64 {
        self.slice_peak_memory
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
        self.resume_within(env, input, u64::MAX)
    }

    /// [`Execution::resume`], running at most `budget` operations in this slice (what is left
    /// of the agent's lifetime budget) if that is fewer than
    /// [`Limits::max_operations`](crate::Limits). Past it the agent fails with
    /// [`AgentErrorKind::OperationBudget`]. [`Execution::slice_operations`] then says how many
    /// the slice ran.
    pub fn resume_within(&mut self, env: &HostEnv, input: Resume, budget: u64) -> Outcome {
        let max_memory = self.program.limits().max_memory_bytes;
        let held = self.memory.saturating_add(input.heap_bytes() as u64);
        let meter = SliceMeter::start(held, max_memory);
        let outcome = self.run_metered(env, input, budget);
        let reading = meter.reading();
        drop(meter);
        self.slice_operations = self
            .slice_operations
            .saturating_add(reading.allocated / crate::BYTES_PER_OPERATION);
        self.memory = reading.held.saturating_sub(outcome.heap_bytes() as u64);
        self.slice_peak_memory = reading.peak;
        outcome
    }

    /// [`Execution::resume_within`] inside the memory meter.
    fn run_metered(&mut self, env: &HostEnv, input: Resume, budget: u64) -> Outcome {
        let _host = HostGuard::install(env);
        let program = self.program.clone();
        self.slice_operations = 0;
        let result = catch_unwind(AssertUnwindSafe(|| {
            self.run_slice(&program.inner, input, budget)
        }));
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

    /// The constants `global::NAME` reads: Rhai collects them as the main body runs its
    /// top-level `const` statements, when the script has functions (`Stmt::Var` in
    /// `src/eval/stmt.rs`). They live in Rhai's runtime state, which is not part of a
    /// continuation, so every slice rebuilds them from the main frame: the constants among the
    /// variables of its top level (those before the first construct it is inside), in the order
    /// they were declared, a later one replacing an earlier one of the same name.
    fn global_constants(
        &self,
        global: &GlobalRuntimeState,
    ) -> Option<
        rhai::Shared<rhai::Locked<std::collections::BTreeMap<rhai::ImmutableString, Dynamic>>>,
    > {
        let main = self.frames.first()?;
        if global.lib.iter().all(|m| m.is_empty()) {
            return None;
        }
        let top_level = main
            .cursors
            .iter()
            .skip(1)
            .find_map(Cursor::scope_len)
            .unwrap_or(main.scope.len());
        // (`iter_raw` gives the latest variable first.)
        let variables: Vec<_> = main.scope.iter_raw().collect();
        let constants: std::collections::BTreeMap<_, _> = variables
            .into_iter()
            .rev()
            .take(top_level)
            .filter(|(_, constant, _)| *constant)
            .map(|(name, _, value)| (name.into(), value.clone()))
            .collect();
        (!constants.is_empty()).then(|| rhai::Shared::new(rhai::Locked::new(constants)))
    }

    fn run_slice(&mut self, prog: &ProgramInner, input: Resume, budget: u64) -> Outcome {
        let mut global = prog.engine.new_global_runtime_state();
        global.lib.push(prog.ast.shared_lib().clone());
        global.constants = self.global_constants(&global);
        // A budget below the per-slice limit: the slice starts with the difference counted,
        // so that Rhai's own check (and the walker's, `track`) stops it where the budget ends.
        let max = prog.engine.max_operations();
        let budgeted = max > 0 && budget < max;
        if budgeted {
            global.num_operations = max - budget;
        }
        let counted_from = global.num_operations;
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
                self.frames
                    .push(Frame::new(MAIN_BODY, block, Scope::new(), Position::NONE));
                Ok(())
            }
            (RunState::Suspended(_), Resume::Start) => self.complete(&mut ctx, Dynamic::UNIT),
            (RunState::Suspended(_), Resume::Value(v)) => self.complete(&mut ctx, v),
            (RunState::Suspended(_), Resume::Message(bytes)) => {
                match crate::value::decode_portable(&self.program, &bytes) {
                    Ok(v) => {
                        drop(bytes);
                        self.complete(&mut ctx, v)
                    }
                    Err(e) => {
                        let pos = self.pending_pos(prog);
                        let msg = format!("receive: bad message: {e}");
                        Err(EvalAltResult::ErrorRuntime(msg.into(), pos).into())
                    }
                }
            }
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
        self.slice_operations = ctx.global.num_operations.saturating_sub(counted_from);
        match step {
            Ok(()) => unreachable_outcome(),
            Err(Stop::Outcome(Outcome::Failed(e)))
                if budgeted && e.kind == AgentErrorKind::OperationLimit =>
            {
                Outcome::Failed(AgentError::new(
                    AgentErrorKind::OperationBudget,
                    "too many operations: the agent used up its operation budget (all its \
                     slices together, on every node)"
                        .into(),
                    e.position,
                ))
            }
            Err(Stop::Outcome(o)) => o,
        }
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
