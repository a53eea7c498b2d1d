//! The continuation codec: an [`Execution`] as bytes that can travel, and back.
//!
//! Layout (CBOR, definite lengths only):
//! `["tern-continuation", VERSION, program-hash, state, [frame...]]` where a frame is
//! `[body, pending-node | null, [[name, const, value]...], [cursor...]]` and a cursor is
//! `[0, block, next, scope-len, value]` (block), `[1, node, scope-len, loop-state...]` (loop),
//! `[2, node, scope-len, caught | null]` (try) or `[3, node]` (a block computing the value of a
//! `let`, an assignment or a `return`). A loop state is `0` (while), `1, started` (do), or
//! `2, counter, iterator` (for) with the iterator `0, next, end, inclusive` (integer range),
//! `1, [item...]` (the items not consumed yet) or `2, from, to, step, dir` (`range(a, b, step)`).
//! Node, block and body ids index the program's plan, which is why a continuation is bound to the
//! program hash (and the layout version to the planner); every id is checked on decode, and every
//! frame is checked against the plan (see [`crate::layout`]): its position follows the program's
//! structure and its scope holds exactly the variables the executor has at that position.

use rhai::{Dynamic, EvalAltResult, Position, Scope};

use crate::compile::{Call, Node, Primitive, Program, ProgramHash, ProgramInner, MAIN_BODY};
use crate::exec::{Caught, Cursor, Execution, ForIter, Frame, LoopState, RunState};
use crate::layout;
use crate::value::{encode_value, len_hint, Enc, Malformed, Reader, ValueError};

/// Magic string that opens every continuation.
pub const MAGIC: &str = "tern-continuation";
/// Version of the layout this build writes and reads.
/// Version 2: block-valued statements (`[3, node]` cursors), lazy stepped ranges, and `for`
/// items without the consumed prefix.
pub const VERSION: u64 = 2;

/// Why an execution could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A value that cannot travel.
    #[error(transparent)]
    Value(#[from] ValueError),
    /// The encoding is larger than the limit.
    #[error("the continuation is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Only a suspended execution can be encoded.
    #[error("only a suspended agent can travel")]
    NotSuspended,
}

/// Why bytes could not be decoded into an execution.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Larger than the limit; nothing was parsed.
    #[error("continuation of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// Input size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not a tern continuation.
    #[error("not a tern continuation")]
    BadMagic,
    /// Written by another layout version.
    #[error("unsupported continuation version {0} (this build reads version {VERSION})")]
    Version(u64),
    /// Bound to another program.
    #[error("continuation belongs to program {found}, not {expected}")]
    WrongProgram {
        /// The program it was decoded against.
        expected: ProgramHash,
        /// The program it names.
        found: ProgramHash,
    },
    /// The state it holds takes more memory here than the agent's budget allows.
    #[error(
        "the agent's state takes {held} bytes of memory here, more than its memory budget of \
         {max} bytes"
    )]
    OverMemoryBudget {
        /// What the decoded state took.
        held: u64,
        /// [`Limits::max_memory_bytes`](crate::Limits).
        max: u64,
    },
    /// Malformed or inconsistent content.
    #[error("malformed continuation at byte {offset}: {what}")]
    Malformed {
        /// What is wrong.
        what: String,
        /// Byte offset where it was noticed.
        offset: usize,
    },
}

impl From<Malformed> for DecodeError {
    fn from(m: Malformed) -> Self {
        DecodeError::Malformed {
            what: m.0,
            offset: m.1,
        }
    }
}

impl Execution {
    /// Encodes the suspended execution.
    ///
    /// # Errors
    ///
    /// A variable (or temporary) holding a value that cannot travel, naming it; an encoding over
    /// the program's `max_continuation_bytes`; an execution that is not suspended.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        self.encode_into(Vec::with_capacity(256))
    }

    /// A rough size of [`Execution::encode`]'s output, to allocate for it once: exact for
    /// strings, blobs and arrays of numbers of one magnitude, sampled for long arrays of other
    /// values.
    pub fn encoded_len_hint(&self) -> usize {
        let mut len = 64usize;
        for frame in &self.frames {
            len = len.saturating_add(32);
            for (name, _, value) in frame.scope.iter_raw() {
                len = len
                    .saturating_add(name.len() + 8)
                    .saturating_add(len_hint(value, 0));
            }
            for cursor in &frame.cursors {
                len = len.saturating_add(match cursor {
                    Cursor::Block { value, .. } => 16 + len_hint(value, 0),
                    _ => 64,
                });
            }
        }
        len
    }

    /// [`Execution::encode`], appending to `out` (its capacity is used first): with a buffer
    /// of [`Execution::encoded_len_hint`] bytes the output is written once, into memory the
    /// caller chose.
    ///
    /// # Errors
    ///
    /// As [`Execution::encode`] (`out` is dropped).
    pub fn encode_into(&self, out: Vec<u8>) -> Result<Vec<u8>, EncodeError> {
        let primitive = match self.state {
            RunState::Suspended(p) => p,
            _ => return Err(EncodeError::NotSuspended),
        };
        let prog = &self.program.inner;
        let mut enc = Enc::from_vec(out);
        enc.array(5);
        enc.text(MAGIC);
        enc.uint(VERSION);
        enc.bytes(&prog.hash.0);
        enc.uint(match primitive {
            Primitive::Migrate => 1,
            Primitive::Receive => 2,
            Primitive::Send => 3,
        });
        enc.array(self.frames.len());
        for frame in &self.frames {
            let fname = &prog.plan.bodies[frame.body as usize].name;
            let place = move || {
                if fname.is_empty() {
                    "the main body".to_string()
                } else {
                    format!("function '{fname}'")
                }
            };
            enc.array(4);
            enc.uint(frame.body as u64);
            match frame.pending {
                Some(id) => enc.uint(id as u64),
                None => enc.null(),
            }
            enc.array(frame.scope.len());
            // `Scope::iter_raw` walks from the newest variable down; the layout is oldest first.
            let vars: Vec<_> = frame.scope.iter_raw().collect();
            for &(name, constant, value) in vars.iter().rev() {
                enc.array(3);
                enc.text(name);
                enc.bool(constant);
                encode_value(
                    &mut enc,
                    &prog.closures,
                    value,
                    &|| format!("variable '{name}' in {}", place()),
                    0,
                )?;
            }
            enc.array(frame.cursors.len());
            for cursor in &frame.cursors {
                let temp = || format!("a temporary value in {}", place());
                match cursor {
                    Cursor::Block {
                        block,
                        next,
                        scope_len,
                        value,
                    } => {
                        enc.array(5);
                        enc.uint(0);
                        enc.uint(*block as u64);
                        enc.uint(*next as u64);
                        enc.uint(*scope_len as u64);
                        encode_value(&mut enc, &prog.closures, value, &temp, 0)?;
                    }
                    Cursor::Loop {
                        node,
                        scope_len,
                        state,
                    } => {
                        let n = match state {
                            LoopState::While => 4,
                            LoopState::Do { .. } => 5,
                            LoopState::For {
                                iter: ForIter::Range { .. },
                                ..
                            } => 9,
                            LoopState::For {
                                iter: ForIter::Items { .. },
                                ..
                            } => 7,
                            LoopState::For {
                                iter: ForIter::Step { .. },
                                ..
                            } => 10,
                        };
                        enc.array(n);
                        enc.uint(1);
                        enc.uint(*node as u64);
                        enc.uint(*scope_len as u64);
                        match state {
                            LoopState::While => enc.uint(0),
                            LoopState::Do { started } => {
                                enc.uint(1);
                                enc.bool(*started);
                            }
                            LoopState::For { index, iter } => {
                                enc.uint(2);
                                enc.int(*index);
                                match iter {
                                    ForIter::Range {
                                        next,
                                        end,
                                        inclusive,
                                    } => {
                                        enc.uint(0);
                                        enc.int(*next);
                                        enc.int(*end);
                                        enc.bool(*inclusive);
                                    }
                                    ForIter::Step {
                                        from,
                                        to,
                                        step,
                                        dir,
                                    } => {
                                        enc.uint(2);
                                        enc.int(*from);
                                        enc.int(*to);
                                        enc.int(*step);
                                        enc.int((*dir).signum().into());
                                    }
                                    ForIter::Items { items, pos } => {
                                        enc.uint(1);
                                        // Items already consumed were taken out; only the rest
                                        // travels (the loop counter says how many went before).
                                        let rest = items.get(*pos..).unwrap_or(&[]);
                                        enc.array(rest.len());
                                        for (i, item) in rest.iter().enumerate() {
                                            encode_value(
                                                &mut enc,
                                                &prog.closures,
                                                item,
                                                &|| {
                                                    format!(
                                                        "item {} of a `for` loop in {}",
                                                        *index + 1 + i as i64,
                                                        place()
                                                    )
                                                },
                                                1,
                                            )?;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    Cursor::Value { node } => {
                        enc.array(2);
                        enc.uint(3);
                        enc.uint(*node as u64);
                    }
                    Cursor::Try {
                        node,
                        scope_len,
                        caught,
                    } => {
                        enc.array(4);
                        enc.uint(2);
                        enc.uint(*node as u64);
                        enc.uint(*scope_len as u64);
                        match caught {
                            None => enc.null(),
                            Some(Caught(err)) => {
                                // A caught error travels as the value it was caught as.
                                let v = match err.unwrap_inner() {
                                    EvalAltResult::ErrorRuntime(v, _) => v.clone(),
                                    other => other.to_string().into(),
                                };
                                encode_value(&mut enc, &prog.closures, &v, &temp, 0)?;
                            }
                        }
                    }
                }
            }
        }
        let limit = prog.limits.max_continuation_bytes;
        if enc.len() > limit {
            return Err(EncodeError::TooLarge {
                size: enc.len(),
                limit,
            });
        }
        Ok(enc.into_bytes())
    }

    /// Decodes a continuation of `program`.
    ///
    /// # Errors
    ///
    /// Oversized input (checked before parsing), wrong magic, version or program hash, and any
    /// malformed or inconsistent content, with the byte offset where it was noticed. Never panics.
    ///
    /// What the decoded state takes in memory is measured (where the allocator is
    /// [`Metered`](crate::Metered)) and counts against the agent's memory budget from here on;
    /// a state over the budget is refused.
    pub fn decode(program: &Program, bytes: &[u8]) -> Result<Execution, DecodeError> {
        let (decoded, held) = crate::meter::net_allocation(|| Self::decode_state(program, bytes));
        let mut exec = decoded?;
        exec.memory = held.max(0) as u64;
        let max = program.limits().max_memory_bytes;
        if exec.memory > max {
            return Err(DecodeError::OverMemoryBudget {
                held: exec.memory,
                max,
            });
        }
        Ok(exec)
    }

    fn decode_state(program: &Program, bytes: &[u8]) -> Result<Execution, DecodeError> {
        let prog = &program.inner;
        let limit = prog.limits.max_continuation_bytes;
        if bytes.len() > limit {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                limit,
            });
        }
        let mut r = Reader::new(bytes);
        if r.array().map_err(|_| DecodeError::BadMagic)? != 5
            || r.text().map_err(|_| DecodeError::BadMagic)? != MAGIC
        {
            return Err(DecodeError::BadMagic);
        }
        let version = r.uint()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let hash = r.bytes()?;
        let found: [u8; 32] = hash
            .as_slice()
            .try_into()
            .map_err(|_| DecodeError::Malformed {
                what: "program hash is not 32 bytes".into(),
                offset: 0,
            })?;
        if found != prog.hash.0 {
            return Err(DecodeError::WrongProgram {
                expected: prog.hash,
                found: ProgramHash(found),
            });
        }
        let primitive = match r.uint()? {
            1 => Primitive::Migrate,
            2 => Primitive::Receive,
            3 => Primitive::Send,
            _ => return bad(&mut r, "unknown suspension"),
        };
        let nframes = r.array()?;
        if nframes == 0 {
            return bad(&mut r, "no frames");
        }
        if nframes > prog.limits.max_call_depth + 1 {
            return bad(&mut r, "more frames than the call depth limit");
        }
        let mut frames: Vec<Frame> = Vec::with_capacity(nframes);
        for i in 0..nframes {
            let start = r.offset();
            let frame = decode_frame(&mut r, prog)?;
            // Well-formed is not enough: the frame must be one the executor could have built,
            // or Rhai would run it with a scope its compiled variable offsets do not fit.
            layout::check_frame(&prog.plan, &frame).map_err(|what| DecodeError::Malformed {
                what: what.into(),
                offset: start,
            })?;
            if (i == 0) != (frame.body == MAIN_BODY) {
                return bad(
                    &mut r,
                    "the bottom frame must be the main body, and only it",
                );
            }
            frames.push(frame);
        }
        // Every frame but the top waits for the one above it; the top waits for the primitive.
        let call_positions: Vec<Position> = frames
            .iter()
            .map(|f| {
                f.pending
                    .and_then(|id| match &prog.plan.nodes[id as usize] {
                        Node::Suspend { pos, .. } => Some(*pos),
                        _ => None,
                    })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| DecodeError::Malformed {
                what: "a frame is not waiting at a suspending statement".into(),
                offset: r.offset(),
            })?;
        for (i, frame) in frames.iter_mut().enumerate().skip(1) {
            frame.call_pos = call_positions[i - 1];
        }
        if r.offset() != bytes.len() {
            return Err(DecodeError::Malformed {
                what: "trailing bytes".into(),
                offset: r.offset(),
            });
        }
        layout::check_calls(&prog.plan, &frames, primitive).map_err(|what| {
            DecodeError::Malformed {
                what: what.into(),
                offset: r.offset(),
            }
        })?;
        Ok(Execution {
            program: program.clone(),
            frames,
            state: RunState::Suspended(primitive),
            slice_operations: 0,
            memory: 0,
            slice_peak_memory: 0,
        })
    }
}

fn bad<T>(r: &mut Reader, what: &str) -> Result<T, DecodeError> {
    Err(r
        .fail::<T>(what)
        .err()
        .map_or(DecodeError::BadMagic, DecodeError::from))
}

fn decode_frame(r: &mut Reader, prog: &ProgramInner) -> Result<Frame, DecodeError> {
    let plan = &prog.plan;
    if r.array()? != 4 {
        return bad(r, "a frame has 4 fields");
    }
    let body = r.u32()?;
    if body as usize >= plan.bodies.len() {
        return bad(r, "unknown body");
    }
    let pending = r.nullable(|r| r.u32())?;
    if let Some(id) = pending {
        if !matches!(plan.nodes.get(id as usize), Some(Node::Suspend { .. })) {
            return bad(r, "pending node is not a suspending statement");
        }
    }
    let nvars = r.array()?;
    let mut scope = Scope::with_capacity(nvars);
    for _ in 0..nvars {
        if r.array()? != 3 {
            return bad(r, "a variable has 3 fields");
        }
        let name = r.text()?;
        let constant = r.bool()?;
        let value = r.value(prog, 0)?;
        if constant {
            scope.push_constant_dynamic(name, value);
        } else {
            // `push_dynamic` walks the whole value to mark every element writable, which a
            // freshly decoded value already is; pushing a placeholder and filling it skips that
            // second pass over a large array. (`get_mut` finds the entry just pushed first.)
            scope.push_dynamic(name.as_str(), Dynamic::UNIT);
            if let Some(slot) = scope.get_mut(&name) {
                *slot = value;
            }
        }
    }
    let ncursors = r.array()?;
    if ncursors == 0 {
        return bad(r, "a frame without position");
    }
    let mut cursors = Vec::with_capacity(ncursors);
    for i in 0..ncursors {
        let n = r.array()?;
        let kind = r.uint()?;
        let cursor = match (kind, n) {
            (0, 5) => {
                let block = r.u32()?;
                let next = r.u32()?;
                let scope_len = r.u32()?;
                let value = r.value(prog, 0)?;
                if block as usize >= plan.blocks.len() {
                    return bad(r, "unknown block");
                }
                if i == 0 && block != plan.bodies[body as usize].block {
                    return bad(r, "a frame must start in its body's block");
                }
                Cursor::Block {
                    block,
                    next,
                    scope_len,
                    value,
                }
            }
            (1, 4..=10) => {
                let node = r.u32()?;
                let scope_len = r.u32()?;
                let state = match (r.uint()?, plan.nodes.get(node as usize)) {
                    (0, Some(Node::While { .. })) => LoopState::While,
                    (1, Some(Node::Do { .. })) => LoopState::Do { started: r.bool()? },
                    (2, Some(Node::For { .. })) => {
                        let index = r.int()?;
                        let iter = match r.uint()? {
                            0 => ForIter::Range {
                                next: r.int()?,
                                end: r.int()?,
                                inclusive: r.bool()?,
                            },
                            1 => {
                                // Only the items not yet consumed travel. (The position is not
                                // sent: materializing the consumed prefix would let a few
                                // hostile bytes allocate gigabytes.)
                                let count = r.array()?;
                                let mut items = rhai::Array::with_capacity(count);
                                for _ in 0..count {
                                    items.push(r.value(prog, 1)?);
                                }
                                ForIter::Items { items, pos: 0 }
                            }
                            2 => {
                                let from = r.int()?;
                                let to = r.int()?;
                                let step = r.int()?;
                                let dir = match r.int()? {
                                    d @ -1..=1 => d as i8,
                                    _ => return bad(r, "bad range direction"),
                                };
                                if step == 0 && dir != 0 {
                                    return bad(r, "zero range step");
                                }
                                ForIter::Step {
                                    from,
                                    to,
                                    step,
                                    dir,
                                }
                            }
                            _ => return bad(r, "unknown iterator"),
                        };
                        LoopState::For { index, iter }
                    }
                    _ => return bad(r, "loop state does not match its node"),
                };
                Cursor::Loop {
                    node,
                    scope_len,
                    state,
                }
            }
            (2, 4) => {
                let node = r.u32()?;
                let scope_len = r.u32()?;
                if !matches!(plan.nodes.get(node as usize), Some(Node::Try { .. })) {
                    return bad(r, "try cursor on a node that is not a try");
                }
                let caught = r
                    .nullable(|r| r.value(prog, 0))?
                    .map(|v| Caught(EvalAltResult::ErrorRuntime(v, Position::NONE).into()));
                Cursor::Try {
                    node,
                    scope_len,
                    caught,
                }
            }
            (3, 2) => {
                let node = r.u32()?;
                if !matches!(
                    plan.nodes.get(node as usize),
                    Some(Node::Suspend {
                        call: Call::Block(_),
                        ..
                    })
                ) {
                    return bad(r, "value cursor on a node that is not a block value");
                }
                Cursor::Value { node }
            }
            _ => return bad(r, "unknown cursor"),
        };
        if i == 0 && !matches!(cursor, Cursor::Block { .. }) {
            return bad(r, "a frame must start in its body's block");
        }
        cursors.push(cursor);
    }
    Ok(Frame {
        body,
        scope,
        cursors,
        call_pos: Position::NONE,
        pending,
    })
}
