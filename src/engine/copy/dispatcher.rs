//! The [`Dispatcher`]: hands the plan out to the workers in [`Chunk`]s on
//! aligned boundaries, remembers which chunks are not yet durable, and so knows
//! the durable watermark. Pure: no I/O, no threads (the workers share it behind
//! a lock).

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
}

impl Dispatcher {
    pub(super) fn new(ranges: Vec<plan::Range>, end: u64, copy_max: u64, zero_max: u64) -> Self {
        let pos = ranges.first().map_or(end, |r| r.offset);
        Self { ranges, idx: 0, pos, end, copy_max, zero_max, outstanding: BTreeSet::new() }
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
        (w < self.end || !self.outstanding.is_empty()).then_some(w)
    }

    /// Everything planned below this offset is durable.
    pub(super) fn watermark(&self) -> u64 {
        let next = match self.ranges[self.idx.min(self.ranges.len())..].iter().find(|r| r.end() > self.pos) {
            Some(r) => self.pos.max(r.offset),
            None => self.end,
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
}
