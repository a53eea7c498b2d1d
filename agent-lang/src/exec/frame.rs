//! What a walked call stack is made of: one [`Frame`] per body being run, each with the
//! [`Cursor`]s of the constructs it is inside. This is the state a continuation saves (the codec
//! writes it, the layout check vets it), so it is plain data, with no Rust stack and no Rhai
//! iterator in it. Also the few operations on the top frame the rest of the walker builds on.

use rhai::{Dynamic, EvalAltResult, Position, Scope};

use super::loops::LoopState;
use super::{internal, Execution, StepErr};
use crate::compile::{BlockId, BodyId, NodeId};

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

impl Frame {
    /// A frame of `body` about to run its first statement: `block` is the body's block, `scope`
    /// holds its parameters.
    pub(super) fn new(
        body: BodyId,
        block: BlockId,
        scope: Scope<'static>,
        call_pos: Position,
    ) -> Frame {
        Frame {
            body,
            scope,
            cursors: vec![Cursor::block_start(block, 0)],
            call_pos,
            pending: None,
        }
    }
}

/// A position inside a frame: one entry per walked construct being executed.
#[derive(Debug)]
pub(crate) enum Cursor {
    Block {
        block: BlockId,
        /// The index in the block of the next statement to run.
        next: u32,
        /// The scope's length when the block was entered: rewound to when it ends.
        scope_len: u32,
        /// The value of the statement run last: the block's value if it ends now.
        value: Dynamic,
    },
    Loop {
        node: NodeId,
        /// The scope's length without the loop's variables.
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
    /// [`Call::Block`](crate::compile::Call::Block)): when it ends, the statement completes with
    /// the block's value.
    Value { node: NodeId },
}

impl Cursor {
    /// The scope's length when the construct was entered (`None` for a `Value` cursor, which
    /// adds no variables of its own).
    pub(crate) fn scope_len(&self) -> Option<usize> {
        match self {
            Cursor::Block { scope_len, .. }
            | Cursor::Loop { scope_len, .. }
            | Cursor::Try { scope_len, .. } => Some(*scope_len as usize),
            Cursor::Value { .. } => None,
        }
    }

    /// The cursor of `block` about to run its first statement, entered with a scope
    /// `scope_len` long.
    pub(super) fn block_start(block: BlockId, scope_len: u32) -> Cursor {
        Cursor::Block {
            block,
            next: 0,
            scope_len,
            value: Dynamic::UNIT,
        }
    }
}

/// The error a running `catch` block handles, kept for a bare `throw;` that re-throws it.
#[derive(Debug)]
pub(crate) struct Caught(pub(crate) Box<EvalAltResult>);

impl Execution {
    pub(super) fn top_frame(&mut self) -> Result<&mut Frame, StepErr> {
        self.frames.last_mut().ok_or_else(|| internal("no frame"))
    }

    /// Gives the statement just run, of the block on top, its value.
    pub(super) fn set_value(&mut self, value: Dynamic) -> Result<(), StepErr> {
        match self.top_frame()?.cursors.last_mut() {
            Some(Cursor::Block { value: v, .. }) => {
                *v = value;
                Ok(())
            }
            _ => Err(internal("statement outside a block")),
        }
    }

    pub(super) fn push_block(&mut self, block: BlockId) -> Result<(), StepErr> {
        let frame = self.top_frame()?;
        let scope_len = frame.scope.len() as u32;
        frame.cursors.push(Cursor::block_start(block, scope_len));
        Ok(())
    }

    /// Enters a block (or gives `()` for an empty one).
    pub(super) fn enter(&mut self, block: BlockId) -> Result<(), StepErr> {
        if self.program.inner.plan.blocks[block as usize].is_empty() {
            self.set_value(Dynamic::UNIT)
        } else {
            self.push_block(block)
        }
    }
}
