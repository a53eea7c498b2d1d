//! The resource limits a node imposes on the agents it runs, so a runaway loop or a memory bomb
//! ends that agent with a clear error and nothing else.

/// The default of [`Limits::max_memory_bytes`]: 48 MiB. A value nested as deep as the budget
/// admits is dropped recursively by Rhai with about 4.25 bytes of stack per budget byte (see
/// [`Limits::slice_stack_bytes`]), so a node's peak under one agent nesting arrays until its
/// budget ends it is about 5.25 times the budget: 48 MiB keeps it under the 256 MiB above idle
/// a node promises under any one hostile script (64 MiB took it to 289 MiB).
pub const DEFAULT_MEMORY_BYTES: u64 = 48 << 20;

/// Limits applied to one agent. A node fills them from its policy; [`Limits::default`] is a
/// reasonable policy for a trusted single-user mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Rhai operations allowed in one run slice (from a resume to the next suspension).
    pub max_operations: u64,
    /// Rhai operations allowed in the agent's whole life, all its slices on every node
    /// together (the host keeps the count: see `Execution::resume_within`).
    pub max_total_operations: u64,
    /// Depth of nested function calls, walked and native together.
    pub max_call_depth: usize,
    /// Bytes of memory the agent's values may hold in all, on the node it is on: its variables,
    /// its frames, and whatever it allocated and still holds (counted at the allocator, see
    /// `agent_lang::Metered`).
    pub max_memory_bytes: u64,
    /// Longest string that may travel (in a continuation or a message), in bytes.
    pub max_string_size: usize,
    /// Longest array or blob that may travel, in elements.
    pub max_array_size: usize,
    /// Largest object map that may travel, in entries.
    pub max_map_size: usize,
    /// Largest encoded continuation, in bytes.
    pub max_continuation_bytes: usize,
    /// Messages the agent may send in its whole life, on every node together. The executor
    /// does not count them: the host that delivers them does (as it keeps the operation count).
    pub max_messages_sent: u64,
    /// Bytes of encoded messages the agent may send in its whole life, on every node together
    /// (counted by the host, as [`Limits::max_messages_sent`]).
    pub max_message_bytes_sent: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 100_000_000,
            max_total_operations: 10_000_000_000,
            max_call_depth: 64,
            max_memory_bytes: DEFAULT_MEMORY_BYTES,
            max_string_size: 64 << 20,
            max_array_size: 16 << 20,
            max_map_size: 1 << 20,
            max_continuation_bytes: 256 << 20,
            max_messages_sent: 10_000_000,
            max_message_bytes_sent: 1 << 30,
        }
    }
}

impl Limits {
    /// The stack a thread needs to run this agent's slices: Rhai drops and clones nested values
    /// recursively, about 170 bytes of stack a level in a release build (measured), and a level
    /// takes at least 40 bytes of the memory budget (an array of one), so the deepest value the
    /// budget admits needs about 4.25 stack bytes per budget byte; 5 of them, plus 64 MiB for
    /// Rhai's evaluation itself. See `crate::nested`.
    pub fn slice_stack_bytes(&self) -> usize {
        let per_budget_byte = 5;
        usize::try_from(self.max_memory_bytes)
            .unwrap_or(usize::MAX)
            .saturating_mul(per_budget_byte)
            .saturating_add(64 << 20)
    }

    /// Sets [`Limits::max_operations`].
    pub fn with_max_operations(mut self, n: u64) -> Self {
        self.max_operations = n;
        self
    }
    /// Sets [`Limits::max_total_operations`].
    pub fn with_max_total_operations(mut self, n: u64) -> Self {
        self.max_total_operations = n;
        self
    }
    /// Sets [`Limits::max_call_depth`].
    pub fn with_max_call_depth(mut self, n: usize) -> Self {
        self.max_call_depth = n;
        self
    }
    /// Sets [`Limits::max_memory_bytes`].
    pub fn with_max_memory_bytes(mut self, n: u64) -> Self {
        self.max_memory_bytes = n;
        self
    }
    /// Sets [`Limits::max_string_size`].
    pub fn with_max_string_size(mut self, n: usize) -> Self {
        self.max_string_size = n;
        self
    }
    /// Sets [`Limits::max_array_size`].
    pub fn with_max_array_size(mut self, n: usize) -> Self {
        self.max_array_size = n;
        self
    }
    /// Sets [`Limits::max_map_size`].
    pub fn with_max_map_size(mut self, n: usize) -> Self {
        self.max_map_size = n;
        self
    }
    /// Sets [`Limits::max_continuation_bytes`].
    pub fn with_max_continuation_bytes(mut self, n: usize) -> Self {
        self.max_continuation_bytes = n;
        self
    }
    /// Sets [`Limits::max_messages_sent`].
    pub fn with_max_messages_sent(mut self, n: u64) -> Self {
        self.max_messages_sent = n;
        self
    }
    /// Sets [`Limits::max_message_bytes_sent`].
    pub fn with_max_message_bytes_sent(mut self, n: u64) -> Self {
        self.max_message_bytes_sent = n;
        self
    }
}
