//! Compilation of an agent: parse with the sandboxed engine, find the functions that can suspend,
//! and plan every body into statements Rhai runs natively and statements the executor walks.
//!
//! A statement is *delegated* when it cannot suspend and does not jump out of itself (`return`,
//! or a `break`/`continue` aimed at a loop outside it). Consecutive delegated statements are
//! merged into one snippet that Rhai evaluates in one call. Everything else becomes a walked
//! [`Node`]. Forms that cannot be resumed are refused here, naming line and column.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;

use rhai::{
    ASTFlags, ASTNode, BinaryExpr, Engine, Expr, FnCallExpr, Ident, ImmutableString, OpAssignment,
    Position, Shared, Stmt, AST, INT,
};

use crate::closures::ClosureNames;
use crate::engine::{agent_engine, PRIMITIVES, RESERVED_FUNCTIONS};
use crate::limits::Limits;

pub(crate) type NodeId = u32;
pub(crate) type BlockId = u32;
pub(crate) type BodyId = u32;

/// Statements Rhai evaluates in one call, in the scope of the frame that runs them.
pub(crate) type Snippet = Box<[Stmt]>;

/// The id of the main body in [`Plan::bodies`].
pub(crate) const MAIN_BODY: BodyId = 0;

/// The suspension primitives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Primitive {
    Migrate,
    Receive,
    Send,
}

/// What a suspending statement calls.
#[derive(Debug)]
pub(crate) enum Call {
    /// A primitive, with its arguments as one array expression (None: no arguments).
    Primitive(Primitive, Option<Snippet>),
    /// A mobile script function, with its arguments as one array expression.
    Mobile(BodyId, Option<Snippet>),
    /// A walked block used as a value: `let x = if c { migrate(..); 1 } else { 2 };`, the same
    /// with `loop`/`while`/`do`/`for` (their `break` value), `switch`, `try` or a plain `{ .. }`.
    /// The completion gets the block's value.
    Block(BlockId),
}

/// What a suspending statement does with the value its call produces.
#[derive(Debug)]
pub(crate) enum Completion {
    /// `let x = call;` / `const x = call;`: the template of the `Stmt::Var`.
    Let(Box<(Ident, Option<NonZeroUsize>)>, ASTFlags, Position),
    /// `lhs op= call;`
    Assign(Box<(OpAssignment, Expr)>),
    /// `call;`: the value becomes the block's value.
    Value,
    /// `return call;`
    Return,
}

/// A walked statement.
#[derive(Debug)]
pub(crate) enum Node {
    Delegated(Snippet),
    Suspend {
        call: Call,
        then: Completion,
        pos: Position,
    },
    Block(BlockId),
    If {
        cond: Snippet,
        then: BlockId,
        otherwise: BlockId,
    },
    /// `a ?? b ?? last` whose last operand is walked (`x ?? return v`, `x ?? break v`,
    /// `x ?? f()` with `f` mobile): `first` is the others, as one expression; when its value is
    /// `()`, `last` is entered and its value is the value.
    Coalesce {
        first: Snippet,
        last: BlockId,
    },
    /// `selector` is the switch with each arm replaced by its index.
    Switch {
        selector: Snippet,
        arms: Vec<BlockId>,
    },
    While {
        cond: Option<Snippet>,
        body: BlockId,
    },
    Do {
        cond: Snippet,
        body: BlockId,
        is_while: bool,
    },
    For {
        var: ImmutableString,
        counter: Option<ImmutableString>,
        iterable: Snippet,
        /// When the iterable is Rhai's `range(from, to, step)`: its arguments as one array
        /// expression, and the call itself. The executor then iterates integer steps lazily
        /// (like Rhai's `StepRange`) instead of materializing the range.
        stepped: Option<Box<(Snippet, FnCallExpr)>>,
        body: BlockId,
        pos: Position,
    },
    Break {
        is_break: bool,
        value: Option<Snippet>,
    },
    Return {
        value: Option<Snippet>,
    },
    Try {
        body: BlockId,
        catch_var: Option<ImmutableString>,
        catch: BlockId,
    },
}

/// A body the executor can run a frame of: main, or a mobile function.
#[derive(Debug)]
pub(crate) struct Body {
    pub(crate) name: ImmutableString,
    pub(crate) params: Vec<ImmutableString>,
    pub(crate) block: BlockId,
}

/// The planned program: arenas of nodes and blocks, indexed by stable ids (the continuation
/// refers to them, so the same source always gives the same ids).
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub(crate) nodes: Vec<Node>,
    pub(crate) blocks: Vec<Vec<NodeId>>,
    pub(crate) bodies: Vec<Body>,
}

impl Plan {
    /// Appends to `scope` the variables statement `node` leaves in its frame's scope once it has
    /// completed, in order: the top-level `let`s and `const`s of a delegated snippet and the
    /// variable of a suspending `let`. A `let` that re-declares a variable of the same block
    /// pushes nothing (Rhai's parser gave it that variable's slot, and the executor evaluates
    /// the same statement), and whatever else a statement declares is rewound when it ends.
    pub(crate) fn declared<'a>(&'a self, node: NodeId, scope: &mut Vec<&'a str>) {
        match self.nodes.get(node as usize) {
            Some(Node::Delegated(snippet)) => {
                scope.extend(snippet.iter().filter_map(|stmt| match stmt {
                    Stmt::Var(x, ..) if x.2.is_none() => Some(x.0.name.as_str()),
                    _ => None,
                }));
            }
            Some(Node::Suspend {
                then: Completion::Let(x, ..),
                ..
            }) if x.1.is_none() => scope.push(x.0.name.as_str()),
            _ => {}
        }
    }
}

/// The hash a continuation is bound to: blake3 of the program's source and the language version.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProgramHash(pub [u8; 32]);

impl fmt::Display for ProgramHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ProgramHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProgramHash({self})")
    }
}

/// Why a script could not be compiled into an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompileError {
    /// The source is not valid Rhai (or uses something the sandbox forbids).
    #[error("syntax error at line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A form the executor cannot suspend and resume.
    #[error("cannot resume at line {line}, column {column}: {message}; {hint}")]
    Unresumable {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
        /// How to rewrite it.
        hint: String,
    },
}

impl CompileError {
    /// Line and column of the problem.
    pub fn position(&self) -> (usize, usize) {
        match self {
            CompileError::Syntax { line, column, .. }
            | CompileError::Unresumable { line, column, .. } => (*line, *column),
        }
    }
}

fn line_col(pos: Position) -> (usize, usize) {
    (pos.line().unwrap_or(0), pos.position().unwrap_or(0))
}

fn unresumable(pos: Position, message: impl Into<String>, hint: impl Into<String>) -> CompileError {
    let (line, column) = line_col(pos);
    CompileError::Unresumable {
        line,
        column,
        message: message.into(),
        hint: hint.into(),
    }
}

/// A compiled agent program: cheap to clone, shared by every execution of it.
#[derive(Clone)]
pub struct Program {
    pub(crate) inner: Arc<ProgramInner>,
}

pub(crate) struct ProgramInner {
    pub(crate) engine: Engine,
    pub(crate) ast: AST,
    pub(crate) plan: Plan,
    pub(crate) hash: ProgramHash,
    pub(crate) limits: Limits,
    pub(crate) source: String,
    /// Its closures' names as they travel.
    pub(crate) closures: ClosureNames,
    /// `fn collect(v) { let a = []; for x in v { a.push(x) } a }`: materializes any iterable
    /// a walked `for` loop meets that is not an integer range or an array.
    pub(crate) collector: AST,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("hash", &self.inner.hash)
            .finish_non_exhaustive()
    }
}

impl Program {
    /// Compiles `source` under `limits`.
    ///
    /// # Errors
    ///
    /// [`CompileError::Syntax`] for invalid Rhai, [`CompileError::Unresumable`] for a suspension
    /// the executor cannot resume (each naming line and column).
    pub fn compile(source: &str, limits: &Limits) -> Result<Program, CompileError> {
        let engine = agent_engine(limits);
        let ast = engine.compile(source).map_err(|e| {
            let (line, column) = line_col(e.1);
            CompileError::Syntax {
                line,
                column,
                message: e.0.to_string(),
            }
        })?;
        let plan = Planner::plan(&ast)?;
        let collector = engine
            .compile("fn collect(v) { let a = []; for x in v { a.push(x); } a }")
            .map_err(|e| CompileError::Syntax {
                line: 0,
                column: 0,
                message: e.to_string(),
            })?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"tern-program/v1\0rhai-1.25.0\0");
        hasher.update(source.as_bytes());
        let hash = ProgramHash(*hasher.finalize().as_bytes());
        let closures = ClosureNames::of(&ast, &hash);
        Ok(Program {
            inner: Arc::new(ProgramInner {
                engine,
                ast,
                plan,
                hash,
                limits: limits.clone(),
                source: source.to_string(),
                closures,
                collector,
            }),
        })
    }

    /// The hash continuations of this program are bound to.
    pub fn hash(&self) -> ProgramHash {
        self.inner.hash
    }

    /// The source the program was compiled from.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The limits the program runs under.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Names (with arities) of the script functions that can suspend, sorted.
    pub fn mobile_functions(&self) -> Vec<(String, usize)> {
        let mut v: Vec<_> = self.inner.plan.bodies[1..]
            .iter()
            .map(|b| (b.name.to_string(), b.params.len()))
            .collect();
        v.sort();
        v
    }
}

/// What a call expression refers to, if it can suspend.
enum Target {
    Primitive(Primitive),
    Mobile(BodyId),
}

struct Planner {
    plan: Plan,
    /// Mobile functions by (name, arity), with the body id they will get.
    mobile: HashMap<(ImmutableString, usize), BodyId>,
    mobile_names: HashSet<ImmutableString>,
    /// Every script function by (name, arity).
    script_fns: HashSet<(ImmutableString, usize)>,
}

impl Planner {
    fn plan(ast: &AST) -> Result<Plan, CompileError> {
        let functions: Vec<Shared<rhai::ScriptFuncDef>> = ast
            .shared_lib()
            .iter_script_fn_info()
            .map(|(.., f)| f.clone())
            .collect();
        for f in &functions {
            if RESERVED_FUNCTIONS.contains(&f.name.as_str()) {
                let (line, column) = line_col(f.body.position());
                return Err(CompileError::Syntax {
                    line,
                    column,
                    message: format!("'{}' is a host function and cannot be redefined", f.name),
                });
            }
        }
        // Fixpoint over the call graph: a function is mobile when its body calls a primitive or
        // a mobile function. Closures (anonymous functions) are only ever called natively.
        let mut mobile: HashSet<(ImmutableString, usize)> = HashSet::new();
        loop {
            let before = mobile.len();
            for f in functions.iter().filter(|f| !f.name.starts_with("anon$")) {
                let key = (f.name.clone(), f.params.len());
                if mobile.contains(&key) {
                    continue;
                }
                let calls = f.body.statements().iter().any(|s| {
                    !walk(
                        ASTNode::Stmt(s),
                        &[],
                        &mut |path: &[ASTNode]| match path.last() {
                            Some(ASTNode::Expr(Expr::FnCall(fc, _)))
                            | Some(ASTNode::Stmt(Stmt::FnCall(fc, _))) => {
                                !(is_primitive(fc)
                                    || (fc.namespace.is_empty()
                                        && mobile.contains(&(fc.name.clone(), fc.args.len()))))
                            }
                            _ => true,
                        },
                    )
                });
                if calls {
                    mobile.insert(key);
                }
            }
            if mobile.len() == before {
                break;
            }
        }
        let mut keys: Vec<_> = mobile.into_iter().collect();
        keys.sort();
        let mut planner = Planner {
            plan: Plan::default(),
            mobile: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), (i + 1) as BodyId))
                .collect(),
            mobile_names: keys.iter().map(|k| k.0.clone()).collect(),
            script_fns: functions
                .iter()
                .map(|f| (f.name.clone(), f.params.len()))
                .collect(),
        };
        let main = planner.plan_block(ast.statements())?;
        planner.plan.bodies.push(Body {
            name: "".into(),
            params: Vec::new(),
            block: main,
        });
        for key in &keys {
            let Some(f) = functions
                .iter()
                .find(|f| f.name == key.0 && f.params.len() == key.1)
            else {
                continue;
            };
            let block = planner.plan_block(f.body.statements())?;
            planner.plan.bodies.push(Body {
                name: f.name.clone(),
                params: f.params.iter().cloned().collect(),
                block,
            });
        }
        Ok(planner.plan)
    }

    fn target(&self, fc: &FnCallExpr) -> Option<Target> {
        if !fc.namespace.is_empty() {
            return None;
        }
        if is_primitive(fc) {
            return Some(Target::Primitive(match fc.name.as_str() {
                "migrate" => Primitive::Migrate,
                "send" => Primitive::Send,
                _ => Primitive::Receive,
            }));
        }
        self.mobile
            .get(&(fc.name.clone(), fc.args.len()))
            .map(|&b| Target::Mobile(b))
    }

    /// Does `node` (somewhere below the root of `path`) force its root statement to be walked?
    fn forces_walk(&self, path: &[ASTNode]) -> bool {
        match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(fc, _))) | Some(ASTNode::Stmt(Stmt::FnCall(fc, _))) => {
                self.target(fc).is_some()
            }
            Some(ASTNode::Expr(Expr::MethodCall(fc, _))) => {
                self.mobile_names.contains(&fc.name)
                    || PRIMITIVES.iter().any(|(n, _)| *n == fc.name.as_str())
            }
            Some(ASTNode::Stmt(Stmt::Return(_, flags, _))) => !flags.intersects(ASTFlags::BREAK),
            Some(ASTNode::Stmt(Stmt::BreakLoop(..))) => !path[..path.len() - 1].iter().any(|n| {
                matches!(
                    n,
                    ASTNode::Stmt(Stmt::While(..) | Stmt::Do(..) | Stmt::For(..))
                )
            }),
            _ => false,
        }
    }

    /// The first place in `stmt` that forces it to be walked, if any.
    fn walk_reason(&self, stmt: &Stmt) -> Option<Position> {
        let mut found = None;
        walk(ASTNode::Stmt(stmt), &[], &mut |path: &[ASTNode]| {
            if self.forces_walk(path) {
                found = path.last().map(|n| n.position());
                false
            } else {
                true
            }
        });
        found
    }

    fn expr_walk_reason(&self, expr: &Expr) -> Option<Position> {
        let mut found = None;
        walk(ASTNode::Expr(expr), &[], &mut |path: &[ASTNode]| {
            if self.forces_walk(path) {
                found = path.last().map(|n| n.position());
                false
            } else {
                true
            }
        });
        found
    }

    fn push_node(&mut self, node: Node) -> NodeId {
        self.plan.nodes.push(node);
        (self.plan.nodes.len() - 1) as NodeId
    }

    fn push_block(&mut self, nodes: Vec<NodeId>) -> BlockId {
        self.plan.blocks.push(nodes);
        (self.plan.blocks.len() - 1) as BlockId
    }

    fn plan_block(&mut self, stmts: &[Stmt]) -> Result<BlockId, CompileError> {
        let mut out = Vec::new();
        let mut run: Vec<Stmt> = Vec::new();
        for stmt in stmts {
            if self.walk_reason(stmt).is_none() {
                run.push(stmt.clone());
                continue;
            }
            if !run.is_empty() {
                let snippet = std::mem::take(&mut run).into_boxed_slice();
                out.push(self.push_node(Node::Delegated(snippet)));
            }
            let node = self.plan_walked(stmt)?;
            out.push(self.push_node(node));
        }
        if !run.is_empty() {
            out.push(self.push_node(Node::Delegated(run.into_boxed_slice())));
        }
        Ok(self.push_block(out))
    }

    /// An expression that must not suspend or jump: a condition, an iterable, a value.
    fn plain_expr(&self, expr: &Expr, what: &str) -> Result<Snippet, CompileError> {
        if let Some(pos) = self.expr_walk_reason(expr) {
            return Err(unresumable(
                pos,
                format!("a call that can suspend (or a jump) inside {what}"),
                "assign the call's result to a variable first, e.g. `let x = f(..);`, and use the variable",
            ));
        }
        Ok(vec![Stmt::Expr(Box::new(expr.clone()))].into_boxed_slice())
    }

    /// `expr` as the whole right-hand side of a `let`, an assignment or a `return` that must be
    /// walked: a direct call, or a block expression (`if`, `switch`, loops, `{ .. }`) that
    /// contains something walked.
    fn value_source(&mut self, expr: &Expr) -> Result<Option<(Call, Position)>, CompileError> {
        match expr {
            Expr::Stmt(block) if self.expr_walk_reason(expr).is_some() => {
                let pos = expr.start_position();
                Ok(Some((
                    Call::Block(self.plan_block(block.statements())?),
                    pos,
                )))
            }
            Expr::Coalesce(..) if self.expr_walk_reason(expr).is_some() => {
                let pos = expr.start_position();
                let Some(node) = self.coalesce(expr)? else {
                    return Ok(None);
                };
                let node = self.push_node(node);
                Ok(Some((Call::Block(self.push_block(vec![node])), pos)))
            }
            _ => self.direct_call(expr),
        }
    }

    /// `a ?? .. ?? last` with only `last` walked, as a [`Node::Coalesce`]; None for any other
    /// expression. An operand before the last that must be walked is refused: the executor
    /// would have to carry how far along the chain it was.
    fn coalesce(&mut self, expr: &Expr) -> Result<Option<Node>, CompileError> {
        let Expr::Coalesce(operands, pos) = expr else {
            return Ok(None);
        };
        let Some((last, first)) = operands.split_last() else {
            return Ok(None);
        };
        let first = match first {
            [one] => one.clone(),
            more => Expr::Coalesce(Box::new(more.iter().cloned().collect()), *pos),
        };
        if let Some(p) = self.expr_walk_reason(&first) {
            return Err(unresumable(
                p,
                "a call that can suspend (or a jump) in an operand of `??` other than the last",
                "assign that operand to a variable first, or make it the last operand",
            ));
        }
        let last = match last {
            Expr::Stmt(block) => self.plan_block(block.statements())?,
            other => self.plan_block(&[Stmt::Expr(Box::new(other.clone()))])?,
        };
        Ok(Some(Node::Coalesce {
            first: self.plain_expr(&first, "an operand of `??`")?,
            last,
        }))
    }

    /// `expr` as the whole right-hand side of a suspending statement, if it is a direct call.
    fn direct_call(&self, expr: &Expr) -> Result<Option<(Call, Position)>, CompileError> {
        let (fc, pos) = match expr {
            Expr::FnCall(fc, pos) => (fc, *pos),
            _ => return Ok(None),
        };
        self.call_of(fc, pos)
    }

    fn call_of(
        &self,
        fc: &FnCallExpr,
        pos: Position,
    ) -> Result<Option<(Call, Position)>, CompileError> {
        let Some(target) = self.target(fc) else {
            return Ok(None);
        };
        for arg in fc.args.iter() {
            if let Some(p) = self.expr_walk_reason(arg) {
                return Err(unresumable(
                    p,
                    format!("a call that can suspend inside the arguments of `{}`", fc.name),
                    "assign the inner call's result to a variable first, e.g. `let x = f(..);`, and pass the variable",
                ));
            }
        }
        let args = if fc.args.is_empty() {
            None
        } else {
            let array = Expr::Array(fc.args.iter().cloned().collect(), pos);
            Some(vec![Stmt::Expr(Box::new(array))].into_boxed_slice())
        };
        Ok(Some((
            match target {
                Target::Primitive(p) => Call::Primitive(p, args),
                Target::Mobile(b) => Call::Mobile(b, args),
            },
            pos,
        )))
    }

    fn refuse_nested(&self, stmt: &Stmt) -> CompileError {
        let mut method = None;
        walk(ASTNode::Stmt(stmt), &[], &mut |path: &[ASTNode]| {
            if !self.forces_walk(path) {
                return true;
            }
            if let Some(ASTNode::Expr(Expr::MethodCall(fc, pos))) = path.last() {
                method = Some((fc.name.to_string(), *pos));
            }
            false
        });
        if let Some((name, pos)) = method {
            return unresumable(
                pos,
                format!("`{name}` can suspend, so it cannot be called as a method"),
                format!("call it as a function: `{name}(value, ..)`, as a statement of its own"),
            );
        }
        let pos = self.walk_reason(stmt).unwrap_or(stmt.position());
        unresumable(
            pos,
            "a call that can suspend (or a `return`/`break`) inside a larger expression",
            "make the call a statement of its own and assign its result to a variable first, e.g. `let x = f(..);`",
        )
    }

    fn plan_walked(&mut self, stmt: &Stmt) -> Result<Node, CompileError> {
        Ok(match stmt {
            Stmt::Var(x, flags, pos) => {
                let (ident, expr, index) = &**x;
                match self.value_source(expr)? {
                    Some((call, cpos)) => Node::Suspend {
                        call,
                        then: Completion::Let(Box::new((ident.clone(), *index)), *flags, *pos),
                        pos: cpos,
                    },
                    None => return Err(self.refuse_nested(stmt)),
                }
            }
            Stmt::Assignment(x) => {
                let (op, BinaryExpr { lhs, rhs }) = &**x;
                if let Some(p) = self.expr_walk_reason(lhs) {
                    return Err(unresumable(
                        p,
                        "a call that can suspend inside an assignment target",
                        "compute the index first into a variable",
                    ));
                }
                match self.value_source(rhs)? {
                    Some((call, cpos)) => Node::Suspend {
                        call,
                        then: Completion::Assign(Box::new((op.clone(), lhs.clone()))),
                        pos: cpos,
                    },
                    None => return Err(self.refuse_nested(stmt)),
                }
            }
            Stmt::FnCall(fc, pos) => match self.call_of(fc, *pos)? {
                Some((call, cpos)) => Node::Suspend {
                    call,
                    then: Completion::Value,
                    pos: cpos,
                },
                None => return Err(self.refuse_nested(stmt)),
            },
            Stmt::Expr(expr) => match self.direct_call(expr)? {
                Some((call, cpos)) => Node::Suspend {
                    call,
                    then: Completion::Value,
                    pos: cpos,
                },
                None => match &**expr {
                    Expr::Stmt(block) => Node::Block(self.plan_block(block.statements())?),
                    Expr::Coalesce(..) => match self.coalesce(expr)? {
                        Some(node) => node,
                        None => return Err(self.refuse_nested(stmt)),
                    },
                    Expr::MethodCall(fc, pos) => {
                        return Err(unresumable(
                            *pos,
                            format!(
                                "`{}` can suspend, so it cannot be called as a method",
                                fc.name
                            ),
                            format!("call it as a function: `{}(value, ..)`", fc.name),
                        ))
                    }
                    _ => return Err(self.refuse_nested(stmt)),
                },
            },
            Stmt::Block(block) => Node::Block(self.plan_block(block.statements())?),
            Stmt::If(fc, _) => Node::If {
                cond: self.plain_expr(&fc.expr, "an `if` condition")?,
                then: self.plan_block(fc.body.statements())?,
                otherwise: self.plan_block(fc.branch.statements())?,
            },
            Stmt::Switch(x, pos) => {
                let (value, cases) = &**x;
                if let Some(p) = self.expr_walk_reason(value) {
                    return Err(unresumable(
                        p,
                        "a call that can suspend in a `switch` value",
                        "assign it to a variable first",
                    ));
                }
                let mut selector_cases = cases.clone();
                let mut arms = Vec::with_capacity(cases.expressions.len());
                for (i, arm) in cases.expressions.iter().enumerate() {
                    if let Some(p) = self.expr_walk_reason(&arm.lhs) {
                        return Err(unresumable(
                            p,
                            "a call that can suspend in a `switch` condition",
                            "compute it into a variable before the switch",
                        ));
                    }
                    selector_cases.expressions[i].rhs = Expr::IntegerConstant(i as INT, *pos);
                    let block = match &arm.rhs {
                        Expr::Stmt(block) => self.plan_block(block.statements())?,
                        other => {
                            match self.direct_call(other)? {
                                Some((call, cpos)) => {
                                    let node = self.push_node(Node::Suspend {
                                        call,
                                        then: Completion::Value,
                                        pos: cpos,
                                    });
                                    self.push_block(vec![node])
                                }
                                None => {
                                    if let Some(p) = self.expr_walk_reason(other) {
                                        return Err(unresumable(p, "a call that can suspend inside a `switch` arm expression", "use a block arm: `value => { let x = f(..); x }`"));
                                    }
                                    let node = self.push_node(Node::Delegated(
                                        vec![Stmt::Expr(Box::new(other.clone()))]
                                            .into_boxed_slice(),
                                    ));
                                    self.push_block(vec![node])
                                }
                            }
                        }
                    };
                    arms.push(block);
                }
                let selector = Stmt::Switch(Box::new((value.clone(), selector_cases)), *pos);
                Node::Switch {
                    selector: vec![selector].into_boxed_slice(),
                    arms,
                }
            }
            Stmt::While(fc, _) => Node::While {
                cond: match fc.expr {
                    Expr::Unit(..) | Expr::BoolConstant(true, ..) => None,
                    ref e => Some(self.plain_expr(e, "a `while` condition")?),
                },
                body: self.plan_block(fc.body.statements())?,
            },
            Stmt::Do(fc, flags, _) => Node::Do {
                cond: self.plain_expr(&fc.expr, "a `do` loop condition")?,
                body: self.plan_block(fc.body.statements())?,
                is_while: !flags.intersects(ASTFlags::NEGATED),
            },
            Stmt::For(x, _) => {
                let (var, counter, fc) = &**x;
                let iterable = self.plain_expr(&fc.expr, "a `for` iterable")?;
                let stepped = match &fc.expr {
                    Expr::FnCall(call, pos)
                        if call.namespace.is_empty()
                            && call.name == "range"
                            && call.args.len() == 3
                            && !self.script_fns.contains(&("range".into(), 3)) =>
                    {
                        let args = Expr::Array(call.args.iter().cloned().collect(), *pos);
                        Some(Box::new((
                            vec![Stmt::Expr(Box::new(args))].into_boxed_slice(),
                            (**call).clone(),
                        )))
                    }
                    _ => None,
                };
                Node::For {
                    var: var.name.clone(),
                    counter: counter.as_ref().map(|c| c.name.clone()),
                    iterable,
                    stepped,
                    body: self.plan_block(fc.body.statements())?,
                    pos: fc.expr.start_position(),
                }
            }
            Stmt::BreakLoop(value, flags, _) => Node::Break {
                is_break: flags.intersects(ASTFlags::BREAK),
                value: match value {
                    Some(e) => Some(self.plain_expr(e, "a `break` value")?),
                    None => None,
                },
            },
            Stmt::Return(value, flags, pos) if !flags.intersects(ASTFlags::BREAK) => match value {
                None => Node::Return { value: None },
                Some(e) => match self.value_source(e)? {
                    Some((call, cpos)) => Node::Suspend {
                        call,
                        then: Completion::Return,
                        pos: cpos,
                    },
                    None => {
                        let _ = pos;
                        Node::Return {
                            value: Some(self.plain_expr(e, "a `return` value")?),
                        }
                    }
                },
            },
            Stmt::TryCatch(fc, _) => Node::Try {
                body: self.plan_block(fc.body.statements())?,
                catch_var: match &fc.expr {
                    Expr::Variable(v, ..) => Some(v.1.clone()),
                    _ => None,
                },
                catch: self.plan_block(fc.branch.statements())?,
            },
            other => return Err(self.refuse_nested(other)),
        })
    }
}

fn is_primitive(fc: &FnCallExpr) -> bool {
    fc.namespace.is_empty()
        && PRIMITIVES
            .iter()
            .any(|(n, arity)| *n == fc.name.as_str() && *arity == fc.args.len())
}

/// Walks `node` (below `prefix`) like Rhai's own `walk`, calling `on_node` with the path to each
/// node, stopping when it returns false (then this returns false too). Rhai's `Stmt::walk` does
/// not visit the value of `break value;`, so a mobile call there would be missed (and then run
/// natively, failing at run time); this walks it as well.
fn walk<'a>(
    node: ASTNode<'a>,
    prefix: &[ASTNode<'a>],
    on_node: &mut dyn FnMut(&[ASTNode]) -> bool,
) -> bool {
    let mut path: Vec<ASTNode<'a>> = prefix.to_vec();
    let mut go_on = true;
    let mut visit = |p: &[ASTNode]| -> bool {
        if !on_node(p) {
            go_on = false;
            return false;
        }
        if let Some(ASTNode::Stmt(Stmt::BreakLoop(Some(value), ..))) = p.last() {
            if !walk(ASTNode::Expr(value), p, &mut *on_node) {
                go_on = false;
                return false;
            }
        }
        true
    };
    match node {
        ASTNode::Stmt(s) => s.walk(&mut path, &mut visit),
        ASTNode::Expr(e) => e.walk(&mut path, &mut visit),
        _ => true,
    };
    go_on
}
