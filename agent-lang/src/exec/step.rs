//! The walker: moves the top frame's top cursor one statement at a time, starting each walked
//! statement (or handing a delegated one to Rhai) and passing a finished block's value to the
//! cursor below it. Loops, suspensions and early exits have their own modules; this one decides
//! which applies.

use rhai::Dynamic;

use super::snippet::snippet_pos;
use super::{internal, Ctx, Cursor, Execution, StepErr, Stop};
use crate::compile::{Node, NodeId};

impl Execution {
    /// Steps until the agent stops. Only returns through `Err(Stop)`.
    pub(super) fn run(&mut self, ctx: &mut Ctx) -> Result<(), Stop> {
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
                    crate::nested::rewind(&mut frame.scope, scope_len as usize);
                    self.deliver(ctx, value)
                }
            }
            Cursor::Loop { .. } => self.loop_step(ctx),
            Cursor::Try { .. } => Err(internal("try without a body")),
            Cursor::Value { .. } => Err(internal("value cursor without a block")),
        }
    }

    /// Runs statement `id` of the block on top, or starts walking it.
    fn exec_node(&mut self, ctx: &mut Ctx, id: NodeId) -> Result<(), StepErr> {
        let prog = ctx.prog;
        match &prog.plan.nodes[id as usize] {
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
                self.enter(if c { *then } else { *otherwise })
            }
            Node::Coalesce { first, last } => {
                self.track(ctx, snippet_pos(first))?;
                let v = self.eval(ctx, first)?;
                if v.is_unit() {
                    self.enter(*last)
                } else {
                    self.set_value(v)
                }
            }
            Node::Switch { selector, arms } => {
                let v = self.eval(ctx, selector)?;
                match v.as_int().ok().and_then(|i| arms.get(i as usize)) {
                    Some(&arm) => self.enter(arm),
                    None => self.set_value(Dynamic::UNIT),
                }
            }
            Node::While { .. } | Node::Do { .. } | Node::For { .. } => self.enter_loop(ctx, id),
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
                if prog.plan.blocks[*body as usize].is_empty() {
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
            Node::Suspend { .. } => self.suspend(ctx, id),
        }
    }

    /// Delivers the value of a finished block to what is below it.
    pub(super) fn deliver(&mut self, ctx: &mut Ctx, value: Dynamic) -> Result<(), StepErr> {
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
                crate::nested::rewind(&mut frame.scope, scope_len as usize);
                let value = if caught.is_some() {
                    Dynamic::UNIT
                } else {
                    value
                };
                self.deliver(ctx, value)
            }
        }
    }
}
