//! The planning thread of a full copy that plans while it copies: it asks the
//! source for its allocation (`extents.rs`), turns the answers into aligned
//! ranges as soon as everything below them is known (`plan::Planner`), counts
//! them into the progress and pushes them into the dispatcher, where the
//! workers are already waiting. It decides nothing about the copy itself: the
//! workers, the flushes and the watermark are `execute.rs`'s.

use std::sync::atomic::Ordering;

use super::execute::Ctx;
use super::extents::Unmapped;
use super::servers::Servers;
use super::{Copier, Event};
use crate::engine::error::CopyError;
use crate::engine::nbd::Handle;
use crate::engine::plan::{Action, Extent, Plan, Planner, Range};
use crate::engine::progress::Stage;

/// Fails the copy unless the planning thread completed the dispatcher's plan:
/// without it the workers would wait for more forever (a panic included, as the
/// guard drops while unwinding).
struct Completes<'a, 'b>(&'a Ctx<'b>);

impl Drop for Completes<'_, '_> {
    fn drop(&mut self) {
        let stopped = self.0.cancel.is_cancelled() || self.0.stop.load(Ordering::SeqCst);
        if !stopped && !self.0.dispatcher().is_complete() {
            self.0.fail(CopyError::Internal("planning stopped before the plan was complete".into()));
        }
    }
}

impl Copier {
    /// Plans the whole disk on `src`, feeding the copy as it goes. Returns the
    /// whole plan and the bytes read as data because the source could not
    /// describe them, or `None` when it stopped because the copy failed, was
    /// cancelled, or planning failed (then the copy's failure says why).
    pub(super) fn plan_while_copying(
        &self,
        ctx: &Ctx<'_>,
        mut src: Handle,
        servers: &Servers,
        resume: u64,
    ) -> Option<(Plan, u64)> {
        let _guard = Completes(ctx);
        let size = servers.source_size;
        let mut planner = Planner::new(size, self.spec.destination_is_zero, servers.min_block);
        let halt = || ctx.stop.load(Ordering::SeqCst);
        let mut feed = |known: u64, extents: Vec<Extent>| {
            let ranges = planner.add(known, &extents);
            let through = planner.planned_through();
            let bytes = |a: Action| ranges.iter().filter(|r| r.action == a).map(|r| r.length).sum::<u64>();
            let below_resume: u64 = ranges
                .iter()
                .filter(|r| r.action == Action::Copy && r.offset < resume)
                .map(|r| r.end().min(resume) - r.offset)
                .sum();
            self.progress.extend_plan(bytes(Action::Copy), below_resume, bytes(Action::Skip), size - through);
            // Below the resume point everything is durable already; skipped
            // ranges need nothing.
            let todo = ranges.iter().filter(|r| r.action != Action::Skip && r.end() > resume).map(|r| {
                let start = r.offset.max(resume);
                Range { offset: start, length: r.end() - start, action: r.action }
            });
            ctx.dispatcher().push(todo, through.max(resume));
        };
        let result = self.extents_in_order(&mut src, "base:allocation", size, ctx.events, &halt, &mut feed);
        drop(src);
        let unmapped: Option<Unmapped> = match result {
            Ok(u) => u,
            Err(e) => {
                // Cancelled: the workers stop too, and the verdict says so with
                // the watermark they reached.
                if !e.is_cancelled() {
                    ctx.fail(e);
                }
                return None;
            }
        };
        let plan = planner.finish();
        ctx.dispatcher().complete();
        self.planned_now();
        self.progress.set_stage(Stage::Copying);
        (ctx.events)(Event::Stage(Stage::Copying));
        let unmapped_bytes = unmapped.as_ref().map_or(0, |u| u.0);
        if let Some((bytes, error)) = unmapped {
            (ctx.events)(Event::Unmapped { bytes, error });
        }
        (ctx.events)(Event::Planned { disk_size: size, planned_bytes: plan.planned_bytes(), blocks: plan.blocks });
        Some((plan, unmapped_bytes))
    }
}
