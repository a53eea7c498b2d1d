//! Errors an agent fails with at run time, and how Rhai's errors map onto them.

use std::fmt;

use rhai::EvalAltResult;

use crate::meter::Exceeded;

/// What kind of failure ended an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentErrorKind {
    /// A `throw` (or a thrown error from a host function) nobody caught.
    Thrown,
    /// The slice ran more operations than the node allows (a runaway loop).
    OperationLimit,
    /// The agent ran more operations in all than its lifetime budget
    /// ([`Limits::max_total_operations`](crate::Limits)).
    OperationBudget,
    /// A string, array, map, blob or the continuation grew past its limit.
    SizeLimit,
    /// The agent's values took more memory than its budget
    /// ([`Limits::max_memory_bytes`](crate::Limits)).
    MemoryBudget,
    /// The agent sent more messages, or bytes of messages, in all than its lifetime budgets
    /// ([`Limits::max_messages_sent`](crate::Limits), counted by the host).
    MessageBudget,
    /// Calls nested deeper than the node allows.
    StackOverflow,
    /// Any other run-time error: type mismatch, unknown function, bad index...
    Runtime,
    /// A value that cannot travel blocked a hop.
    NotPortable,
    /// A bug in tern, reported instead of a panic.
    Internal,
}

/// Why an agent failed: a kind, a message, and where in the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentError {
    /// What kind of failure.
    pub kind: AgentErrorKind,
    /// What happened, in Rhai's words where Rhai raised it.
    pub message: String,
    /// 1-based line and column of the innermost place the error was raised, when known.
    pub position: Option<(usize, usize)>,
}

impl AgentError {
    pub(crate) fn new(
        kind: AgentErrorKind,
        message: String,
        position: Option<(usize, usize)>,
    ) -> Self {
        AgentError {
            kind,
            message,
            position,
        }
    }

    /// Maps a Rhai error.
    pub fn from_rhai(err: &EvalAltResult) -> Self {
        let mut inner = err;
        let mut position = err.position();
        while let EvalAltResult::ErrorInFunctionCall(_, _, e, _) = inner {
            inner = e;
            if !e.position().is_none() {
                position = e.position();
            }
        }
        let exceeded = match inner {
            EvalAltResult::ErrorTerminated(token, _) => token.read_lock::<Exceeded>().map(|e| *e),
            _ => None,
        };
        let too_many = || {
            "too many operations: the agent ran past the node's operation limit for one slice (a runaway loop?)".to_string()
        };
        let (kind, message) = match exceeded {
            Some(Exceeded::Memory { held, max }) => (
                AgentErrorKind::MemoryBudget,
                format!(
                    "out of memory: the agent's values took {held} bytes, more than its memory \
                     budget of {max} bytes on this node"
                ),
            ),
            Some(Exceeded::Operations) => (AgentErrorKind::OperationLimit, too_many()),
            None => match Self::kind_of(inner) {
                AgentErrorKind::OperationLimit => (AgentErrorKind::OperationLimit, too_many()),
                kind => (kind, message_without_position(err)),
            },
        };
        AgentError {
            kind,
            message,
            position: line_and_column(position),
        }
    }

    fn kind_of(inner: &EvalAltResult) -> AgentErrorKind {
        match inner {
            EvalAltResult::ErrorRuntime(..) => AgentErrorKind::Thrown,
            EvalAltResult::ErrorTooManyOperations(..) => AgentErrorKind::OperationLimit,
            EvalAltResult::ErrorDataTooLarge(..) | EvalAltResult::ErrorTooManyVariables(..) => {
                AgentErrorKind::SizeLimit
            }
            EvalAltResult::ErrorStackOverflow(..) => AgentErrorKind::StackOverflow,
            EvalAltResult::ErrorSystem(..) => AgentErrorKind::Internal,
            _ => AgentErrorKind::Runtime,
        }
    }
}

fn line_and_column(position: rhai::Position) -> Option<(usize, usize)> {
    match (position.line(), position.position()) {
        (Some(l), c) => Some((l, c.unwrap_or(0))),
        _ => None,
    }
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((l, c)) => write!(f, "line {l}, column {c}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for AgentError {}

/// Rhai's message for `err` without the " (line L, position P)" it appends.
pub(crate) fn message_without_position(err: &EvalAltResult) -> String {
    let full = err.to_string();
    let pos = err.position();
    if pos.is_none() {
        return full;
    }
    let suffix = format!(" ({pos})");
    full.strip_suffix(&suffix)
        .map(str::to_string)
        .unwrap_or(full)
}
