//! Checks a decoded call stack against the program's plan, so that a continuation that parses
//! but was corrupted (or forged) is refused at decode time instead of reaching Rhai.
//!
//! Rhai reads a variable at a position computed by its parser (`scope.len() - offset`) without
//! checking the name, and indexes out of range when the scope is shorter than the parser
//! assumed. The executor builds every frame's scope exactly as Rhai would, so a frame the
//! executor could have built is safe to run; this module accepts exactly those frames. For each
//! frame it follows the cursors from the body's block up to the waiting statement, requiring
//! every cursor to be the construct of the statement in progress below it (a branch of that
//! `if`, the loop of that `while`, ...), derives the variables the scope must hold there
//! (parameters, the `let`s of completed statements, loop and catch variables) and compares them,
//! names and count, with the decoded scope, and every recorded scope length with the derived one.

use crate::compile::{Call, Node, NodeId, Plan, Primitive};
use crate::exec::{Cursor, Frame};

/// Why a decoded call stack is not one the executor could have built.
pub(crate) type LayoutError = &'static str;

/// Checks how the frames chain: every frame but the top waits for a call of the body of the
/// frame above it, and the top frame waits for the primitive the execution stopped at. (The
/// bottom frame being the main body is checked by the decoder.)
pub(crate) fn check_calls(
    plan: &Plan,
    frames: &[Frame],
    primitive: Primitive,
) -> Result<(), LayoutError> {
    for (i, frame) in frames.iter().enumerate() {
        let waits_for = frame
            .pending
            .and_then(|id| plan.nodes.get(id as usize))
            .ok_or("a frame is not waiting at a suspending statement")?;
        match (waits_for, frames.get(i + 1)) {
            (
                Node::Suspend {
                    call: Call::Mobile(body, _),
                    ..
                },
                Some(callee),
            ) if *body == callee.body => {}
            (
                Node::Suspend {
                    call: Call::Primitive(p, _),
                    ..
                },
                None,
            ) if *p == primitive => {}
            (_, Some(_)) => return Err("a frame does not wait for the call of the frame above it"),
            (_, None) => return Err("the top frame does not wait at the primitive it stopped at"),
        }
    }
    Ok(())
}

/// Checks one frame: its cursors follow the plan from the body's block to the statement the
/// frame waits at, and its scope holds exactly the variables the executor has there.
pub(crate) fn check_frame(plan: &Plan, frame: &Frame) -> Result<(), LayoutError> {
    const OFF_PLAN: &str = "a frame's position does not follow the program";
    let body = plan.bodies.get(frame.body as usize).ok_or("unknown body")?;
    // The variables the frame's scope must hold, oldest first.
    let mut expected: Vec<&str> = body.params.iter().map(|p| p.as_str()).collect();
    let mut cursors = frame.cursors.iter();
    // The executor starts every frame with its body's block recorded at scope length 0 (for a
    // function, the parameters are dropped with the frame, not by a rewind).
    let mut block_cursor = match cursors.next() {
        Some(
            c @ Cursor::Block {
                block,
                scope_len: 0,
                ..
            },
        ) if *block == body.block => c,
        _ => return Err("a frame must start in its body's block"),
    };
    loop {
        let Cursor::Block { block, next, .. } = block_cursor else {
            return Err(OFF_PLAN);
        };
        let nodes = plan.blocks.get(*block as usize).ok_or("unknown block")?;
        // `next` was advanced past the statement in progress.
        let done = (*next as usize)
            .checked_sub(1)
            .filter(|&d| d < nodes.len())
            .ok_or("statement index out of its block")?;
        for &id in &nodes[..done] {
            plan.declared(id, &mut expected);
        }
        let current: NodeId = nodes[done];
        let Some(child) = cursors.next() else {
            // The top cursor: its statement in progress is the call the frame waits for.
            if frame.pending != Some(current) {
                return Err("a frame does not wait at its position");
            }
            break;
        };
        let node = plan.nodes.get(current as usize).ok_or("unknown node")?;
        let len = expected.len();
        // What the block above `child` must be, and the scope length recorded for it.
        let (inner, inner_len) = match (node, child) {
            (Node::Block(b), Cursor::Block { block, .. }) if block == b => (*b, len),
            (
                Node::If {
                    then, otherwise, ..
                },
                Cursor::Block { block, .. },
            ) if block == then || block == otherwise => (*block, len),
            (Node::Coalesce { last, .. }, Cursor::Block { block, .. }) if block == last => {
                (*block, len)
            }
            (Node::Switch { arms, .. }, Cursor::Block { block, .. }) if arms.contains(block) => {
                (*block, len)
            }
            (
                Node::While { body, .. } | Node::Do { body, .. },
                Cursor::Loop {
                    node, scope_len, ..
                },
            ) if *node == current && *scope_len as usize == len => (*body, len),
            (
                Node::For {
                    var, counter, body, ..
                },
                Cursor::Loop {
                    node, scope_len, ..
                },
            ) if *node == current && *scope_len as usize == len => {
                // Each iteration pushes the counter (if any), then the item.
                expected.extend(counter.as_ref().map(|c| c.as_str()));
                expected.push(var.as_str());
                (*body, expected.len())
            }
            (
                Node::Try {
                    body,
                    catch_var,
                    catch,
                },
                Cursor::Try {
                    node,
                    scope_len,
                    caught,
                },
            ) if *node == current && *scope_len as usize == len => match caught {
                None => (*body, len),
                Some(_) => {
                    expected.extend(catch_var.as_ref().map(|c| c.as_str()));
                    (*catch, expected.len())
                }
            },
            (
                Node::Suspend {
                    call: Call::Block(b),
                    ..
                },
                Cursor::Value { node },
            ) if *node == current => (*b, len),
            _ => return Err(OFF_PLAN),
        };
        // A block reached through a loop, a `try` or a block value is the next cursor; a branch
        // or a plain block is `child` itself.
        let inner_cursor = match child {
            Cursor::Block { .. } => child,
            _ => cursors.next().ok_or(OFF_PLAN)?,
        };
        match inner_cursor {
            Cursor::Block {
                block, scope_len, ..
            } if *block == inner && *scope_len as usize == inner_len => {
                block_cursor = inner_cursor;
            }
            _ => return Err(OFF_PLAN),
        }
    }
    let names = frame.scope.iter_raw().map(|(name, ..)| name);
    if frame.scope.len() != expected.len() || !names.eq(expected.iter().rev().copied()) {
        return Err("a frame's variables do not match its position");
    }
    Ok(())
}
