//! The [`Dispatcher`]: hands the plan out to the workers in [`Chunk`]s on
//! aligned boundaries, remembers which chunks are not yet durable, and so knows
//! the durable watermark. Pure: no I/O, no threads (the workers share it behind
//! a lock).
//!
//! The plan may still be growing while chunks are handed out (a full copy plans
//! while it copies): the planner [`Dispatcher::push`]es ranges in offset order
//! and says when the plan is [`Dispatcher::complete`]. Until then an empty queue
//! means "wait", not "done", and the watermark never passes what is planned: a
//! checkpoint covers only offsets that are both planned and durable.

use std::collections::BTreeSet;

use crate::engine::plan::{self, Action};

/// A piece of the plan handed to one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Chunk {
    pub(super) offset: u64,
    pub(super) length: u64,
    pub(super) action: Action,
    /// Failed attempts so far.
    pub(super) failures: u32,
}

/// Hands out chunks in plan order and remembers which are not yet durable.
pub(super) struct Dispatcher {
    ranges: Vec<plan::Range>,
    idx: usize,
    pos: u64,
    end: u64,
    copy_max: u64,
    zero_max: u64,
    /// Offsets of chunks handed out and not yet durable.
    outstanding: BTreeSet<u64>,
    /// Everything below this offset is planned (`end` once complete).
    planned_through: u64,
    /// No range will be pushed any more.
    complete: bool,
}

impl Dispatcher {
    /// A dispatcher over a complete plan.
    pub(super) fn new(ranges: Vec<plan::Range>, end: u64, copy_max: u64, zero_max: u64) -> Self {
        let pos = ranges.first().map_or(end, |r| r.offset);
        Self {
            ranges,
            idx: 0,
            pos,
            end,
            copy_max,
            zero_max,
            outstanding: BTreeSet::new(),
            planned_through: end,
            complete: true,
        }
    }

    /// A dispatcher whose plan is still to come, from `start` (the resume
    /// point: everything below it is durable already) to `end`.
    pub(super) fn streaming(start: u64, end: u64, copy_max: u64, zero_max: u64) -> Self {
        let mut d = Self::new(Vec::new(), end, copy_max, zero_max);
        d.pos = start;
        d.planned_through = start;
        d.complete = false;
        d
    }

    /// More of the plan: `ranges` (in order, at or after what was pushed
    /// before) and everything below `through` is planned.
    pub(super) fn push(&mut self, ranges: impl IntoIterator<Item = plan::Range>, through: u64) {
        self.ranges.extend(ranges);
        self.planned_through = self.planned_through.max(through.min(self.end));
    }

    /// The plan is whole: an empty queue now means the end.
    pub(super) fn complete(&mut self) {
        self.complete = true;
        self.planned_through = self.end;
    }

    pub(super) fn is_complete(&self) -> bool {
        self.complete
    }

    pub(super) fn next(&mut self) -> Option<Chunk> {
        while let Some(r) = self.ranges.get(self.idx) {
            self.pos = self.pos.max(r.offset);
            if self.pos >= r.end() {
                self.idx += 1;
                continue;
            }
            let max = if r.action == Action::Zero { self.zero_max } else { self.copy_max };
            // Chunk boundaries fall on multiples of the chunk size, so requests stay
            // aligned whatever the extents look like.
            let end = ((self.pos / max + 1) * max).min(r.end());
            let chunk = Chunk { offset: self.pos, length: end - self.pos, action: r.action, failures: 0 };
            self.pos = end;
            self.outstanding.insert(chunk.offset);
            return Some(chunk);
        }
        None
    }

    pub(super) fn durable(&mut self, offset: u64) {
        self.outstanding.remove(&offset);
    }

    /// The lowest offset not yet durable, when anything is left: the copy may end
    /// in success only when this is `None`.
    pub(super) fn unfinished(&self) -> Option<u64> {
        let w = self.watermark();
        (!self.complete || w < self.end || !self.outstanding.is_empty()).then_some(w)
    }

    /// Everything below this offset is planned, and everything planned below it
    /// is durable.
    pub(super) fn watermark(&self) -> u64 {
        let next = match self.ranges[self.idx.min(self.ranges.len())..].iter().find(|r| r.end() > self.pos) {
            Some(r) => self.pos.max(r.offset),
            None => self.planned_through,
        };
        self.outstanding.first().map_or(next, |&o| o.min(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, length: u64, action: Action) -> plan::Range {
        plan::Range { offset, length, action }
    }

    #[test]
    fn dispatcher_splits_on_aligned_boundaries() {
        let mut d = Dispatcher::new(vec![r(100, 250, Action::Copy), r(1000, 300, Action::Zero)], 2000, 100, 1000);
        let got: Vec<(u64, u64)> = std::iter::from_fn(|| d.next()).map(|c| (c.offset, c.length)).collect();
        assert_eq!(got, vec![(100, 100), (200, 100), (300, 50), (1000, 300)]);
    }

    #[test]
    fn watermark_is_the_lowest_chunk_not_yet_durable() {
        let mut d = Dispatcher::new(vec![r(0, 300, Action::Copy), r(500, 100, Action::Copy)], 1000, 100, 100);
        assert_eq!(d.watermark(), 0);
        let a = d.next().unwrap();
        let b = d.next().unwrap();
        assert_eq!(d.watermark(), 0);
        d.durable(b.offset);
        assert_eq!(d.watermark(), 0, "a gap below keeps the watermark down");
        d.durable(a.offset);
        assert_eq!(d.watermark(), 200, "the next chunk not yet handed out");
        let c = d.next().unwrap();
        d.durable(c.offset);
        assert_eq!(d.watermark(), 500, "the gap between ranges needs nothing");
        let e = d.next().unwrap();
        assert!(d.next().is_none());
        assert_eq!(d.watermark(), 500);
        d.durable(e.offset);
        assert_eq!(d.watermark(), 1000, "all done: the end of the disk");
    }

    #[test]
    fn a_growing_plan_holds_the_watermark_at_what_is_planned() {
        let mut d = Dispatcher::streaming(100, 1000, 100, 100);
        assert_eq!((d.next(), d.watermark(), d.unfinished()), (None, 100, Some(100)), "nothing planned: wait");
        d.push([r(100, 150, Action::Copy)], 300);
        let a = d.next().unwrap();
        let b = d.next().unwrap();
        assert_eq!((a.offset, b.offset, b.length), (100, 200, 50));
        assert!(d.next().is_none() && !d.is_complete(), "more may come");
        d.durable(a.offset);
        d.durable(b.offset);
        assert_eq!(d.watermark(), 300, "durable up to what is planned, never past it");
        d.push([r(600, 100, Action::Zero)], 700);
        assert_eq!(d.watermark(), 600, "the gap needs nothing");
        let c = d.next().unwrap();
        d.durable(c.offset);
        assert_eq!((d.watermark(), d.unfinished()), (700, Some(700)));
        d.complete();
        assert_eq!((d.next(), d.watermark(), d.unfinished()), (None, 1000, None), "all done");
    }
}
