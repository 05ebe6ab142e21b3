//! Copy planning: which byte ranges of a disk are read, which are zeroed on the
//! target and which are skipped, in offset order.
//!
//! Everything here is pure: extents and changed areas come in as plain values
//! (the copy module asks the servers for them), so every rule can be tested without
//! I/O. Planning never decides *how* a range is copied (request sizes, connections);
//! that is the executor's business.

use serde::Deserialize;

/// What to do with one range of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read from the source and write to the target (counted in planned bytes).
    Copy,
    /// Known to read as zeros: write a zero request to the target.
    Zero,
    /// Known to read as zeros and the target already does: nothing to do.
    Skip,
}

/// A contiguous range of the disk with one action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub length: u64,
    pub action: Action,
}

impl Range {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// The ordered, non-overlapping ranges to process and their totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub disk_size: u64,
    pub ranges: Vec<Range>,
    /// Number of changed ranges for an incremental plan (CBT "blocks changed"),
    /// number of data extents for a full one.
    pub blocks: u64,
}

impl Plan {
    /// Bytes the plan reads from the source: the progress denominator.
    pub fn planned_bytes(&self) -> u64 {
        self.bytes(Action::Copy)
    }

    pub fn bytes(&self, action: Action) -> u64 {
        self.ranges.iter().filter(|r| r.action == action).map(|r| r.length).sum()
    }

    /// Planned bytes that lie below `offset` (already done when resuming there).
    pub fn planned_below(&self, offset: u64) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.action == Action::Copy && r.offset < offset)
            .map(|r| r.end().min(offset) - r.offset)
            .sum()
    }

    /// The plan in whole blocks of `block` bytes (a power of two), for servers
    /// with a minimum block size: every range is widened to the blocks it touches,
    /// and a block shared by two ranges takes the stronger action (copy over zero
    /// over skip: a block with data and zeros is read and written as data). Planned
    /// bytes then count what is really read.
    pub fn aligned(&self, block: u64) -> Plan {
        if block <= 1 {
            return self.clone();
        }
        let rank = |a: Action| match a {
            Action::Copy => 2,
            Action::Zero => 1,
            Action::Skip => 0,
        };
        let mut out: Vec<Range> = Vec::with_capacity(self.ranges.len());
        for r in &self.ranges {
            let mut start = r.offset / block * block;
            let end = (r.end().div_ceil(block) * block).min(self.disk_size);
            // Only the block shared with the previous range can overlap.
            if let Some(last) = out.last_mut()
                && last.end() > start
            {
                if rank(r.action) > rank(last.action) {
                    last.length = start - last.offset;
                    if last.length == 0 {
                        out.pop();
                    }
                } else {
                    start = last.end();
                }
            }
            if end > start {
                push_merged(&mut out, Range { offset: start, length: end - start, action: r.action });
            }
        }
        Plan { disk_size: self.disk_size, ranges: out, blocks: self.blocks }
    }

    /// The part of the plan at or after `offset`, for resuming from a watermark.
    pub fn remaining_from(&self, offset: u64) -> Vec<Range> {
        self.ranges
            .iter()
            .filter(|r| r.end() > offset)
            .map(|r| {
                let start = r.offset.max(offset);
                Range { offset: start, length: r.end() - start, action: r.action }
            })
            .collect()
    }
}

/// One extent of the source's `base:allocation` context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// NBD_STATE_HOLE (1) | NBD_STATE_ZERO (2), as the server reported them.
    pub flags: u32,
}

pub const STATE_ZERO: u32 = 2;
/// In a `qemu:dirty-bitmap:` context, flag 1 means dirty.
pub const STATE_DIRTY: u32 = 1;

/// Appends `r` to `out`, merging it with the previous range when they touch and
/// share an action.
fn push_merged(out: &mut Vec<Range>, r: Range) {
    if r.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.action == r.action
        && last.end() == r.offset
    {
        last.length += r.length;
        return;
    }
    out.push(r);
}

/// Full copy: data extents are copied; extents that read as zero are zeroed on the
/// target, or skipped when the target is known to read as zeros.
pub fn full(disk_size: u64, extents: &[Extent], destination_is_zero: bool) -> Plan {
    let ranges = piece(0, disk_size, extents, zero_action(destination_is_zero));
    let blocks = ranges.iter().filter(|r| r.action == Action::Copy).count() as u64;
    Plan { disk_size, ranges, blocks }
}

fn zero_action(destination_is_zero: bool) -> Action {
    if destination_is_zero { Action::Skip } else { Action::Zero }
}

/// The ranges of `[start, end)` of a full plan, from the extents that describe it.
fn piece(start: u64, end: u64, extents: &[Extent], zero_action: Action) -> Vec<Range> {
    let mut ranges = Vec::new();
    let mut pos = start;
    for e in extents {
        // Extents arrive in order from the server; tolerate gaps or overlaps by
        // treating anything not described as data (the safe choice).
        let from = e.offset.max(pos).min(end);
        let to = (e.offset + e.length).min(end);
        if from > pos {
            push_merged(&mut ranges, Range { offset: pos, length: from - pos, action: Action::Copy });
        }
        if to > from {
            let action = if e.flags & STATE_ZERO != 0 { zero_action } else { Action::Copy };
            push_merged(&mut ranges, Range { offset: from, length: to - from, action });
            pos = to;
        }
    }
    if pos < end {
        push_merged(&mut ranges, Range { offset: pos, length: end - pos, action: Action::Copy });
    }
    ranges
}

/// A full plan made a piece at a time, while the source is still being asked
/// about the rest: extents go in, in offset order, and come out as aligned
/// ranges as soon as the whole blocks they cover are known. The pieces put
/// together are exactly `full(..).aligned(block)` of all the extents: a piece
/// ends on a block boundary (or at the end of the disk), so no block is shared
/// by two pieces and aligning each piece aligns the whole.
#[derive(Debug)]
pub struct Planner {
    disk_size: u64,
    block: u64,
    zero_action: Action,
    /// Extents known past `emitted`, not yet planned (they end in a part block).
    pending: Vec<Extent>,
    /// Everything below this offset is planned.
    emitted: u64,
    /// The source has been asked about everything below this offset.
    known: u64,
    /// The plan so far (aligned, merged).
    ranges: Vec<Range>,
    /// The last unaligned range, and the data extents counted so far (as `full`
    /// counts them).
    last_raw: Option<Range>,
    blocks: u64,
}

impl Planner {
    pub fn new(disk_size: u64, destination_is_zero: bool, block: u64) -> Self {
        Self {
            disk_size,
            block: block.max(1),
            zero_action: zero_action(destination_is_zero),
            pending: Vec::new(),
            emitted: 0,
            known: 0,
            ranges: Vec::new(),
            last_raw: None,
            blocks: 0,
        }
    }

    /// Everything below this offset is planned.
    pub fn planned_through(&self) -> u64 {
        self.emitted
    }

    /// The source described the disk up to `known` with `extents` (which start
    /// where the previous call's known part ended; a gap reads as data). Returns
    /// the ranges this plans, in whole blocks.
    pub fn add(&mut self, known: u64, extents: &[Extent]) -> Vec<Range> {
        self.pending.extend_from_slice(extents);
        self.known = self.known.max(known.min(self.disk_size));
        let cut = if self.known >= self.disk_size { self.disk_size } else { self.known / self.block * self.block };
        if cut <= self.emitted {
            return Vec::new();
        }
        let raw = piece(self.emitted, cut, &self.pending, self.zero_action);
        for r in &raw {
            match &mut self.last_raw {
                Some(last) if last.action == r.action && last.end() == r.offset => last.length += r.length,
                _ => {
                    self.blocks += u64::from(r.action == Action::Copy);
                    self.last_raw = Some(*r);
                }
            }
        }
        // What lies past the cut waits for the rest of its block.
        self.pending.retain(|e| e.offset + e.length > cut);
        for e in &mut self.pending {
            if e.offset < cut {
                e.length -= cut - e.offset;
                e.offset = cut;
            }
        }
        let aligned = Plan { disk_size: self.disk_size, ranges: raw, blocks: 0 }.aligned(self.block).ranges;
        for r in &aligned {
            push_merged(&mut self.ranges, *r);
        }
        self.emitted = cut;
        aligned
    }

    /// The whole plan, once `add` was told about the whole disk.
    pub fn finish(self) -> Plan {
        Plan { disk_size: self.disk_size, ranges: self.ranges, blocks: self.blocks }
    }
}

/// Incremental copy: every changed range is read (a range that now reads as zero
/// becomes a zero request when the data is seen); nothing else is touched.
pub fn incremental(disk_size: u64, changed: &[Area]) -> Plan {
    let mut ranges = Vec::new();
    for a in changed {
        push_merged(&mut ranges, Range { offset: a.start, length: a.length, action: Action::Copy });
    }
    Plan { disk_size, ranges, blocks: changed.len() as u64 }
}

/// One changed area, in the shape of VMware's `QueryChangedDiskAreas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Area {
    pub start: u64,
    pub length: u64,
}

/// Why a list of changed areas cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AreasError {
    #[error("not a JSON list of {{\"start\",\"length\"}} objects: {0}")]
    Json(String),
    #[error("area {index} (start {start}, length {length}) ends beyond the disk ({disk_size} bytes)")]
    OutOfBounds { index: usize, start: u64, length: u64, disk_size: u64 },
    #[error("area {index} (start {start}) has length 0")]
    Empty { index: usize, start: u64 },
}

/// Parses a changed-areas JSON document without judging it against a disk.
pub fn parse_areas(json: &str) -> Result<Vec<Area>, AreasError> {
    serde_json::from_str::<Vec<Area>>(json).map_err(|e| AreasError::Json(e.to_string()))
}

/// Sorts and merges changed areas and checks that each lies inside the disk.
/// Overlapping or touching areas are merged; an empty area is an error (it
/// usually means the list was produced wrongly, so we refuse to guess).
pub fn normalize_areas(areas: &[Area], disk_size: u64) -> Result<Vec<Area>, AreasError> {
    for (index, a) in areas.iter().enumerate() {
        if a.length == 0 {
            return Err(AreasError::Empty { index, start: a.start });
        }
        match a.start.checked_add(a.length) {
            Some(end) if end <= disk_size => {}
            _ => {
                return Err(AreasError::OutOfBounds { index, start: a.start, length: a.length, disk_size });
            }
        }
    }
    let mut sorted = areas.to_vec();
    sorted.sort_by_key(|a| a.start);
    let mut out: Vec<Area> = Vec::with_capacity(sorted.len());
    for a in sorted {
        if let Some(last) = out.last_mut()
            && a.start <= last.start + last.length
        {
            let end = (a.start + a.length).max(last.start + last.length);
            last.length = end - last.start;
            continue;
        }
        out.push(a);
    }
    Ok(out)
}

/// Dirty extents of a `qemu:dirty-bitmap:` context as changed areas.
pub fn dirty_areas(extents: &[Extent], disk_size: u64) -> Vec<Area> {
    let mut out: Vec<Area> = Vec::new();
    for e in extents.iter().filter(|e| e.flags & STATE_DIRTY != 0) {
        let end = (e.offset + e.length).min(disk_size);
        if end <= e.offset {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.start + last.length == e.offset => last.length = end - last.start,
            _ => out.push(Area { start: e.offset, length: end - e.offset }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE_HOLE: u32 = 1;

    fn ext(offset: u64, length: u64, flags: u32) -> Extent {
        Extent { offset, length, flags }
    }
    fn r(offset: u64, length: u64, action: Action) -> Range {
        Range { offset, length, action }
    }

    fn check_full(size: u64, extents: &[Extent], dz: bool, expected: &[Range]) {
        let plan = full(size, extents, dz);
        assert_eq!(plan.ranges, expected, "extents {extents:?} dz={dz}");
        let covered: u64 = plan.ranges.iter().map(|r| r.length).sum();
        assert_eq!(covered, size, "a full plan covers the whole disk");
    }

    #[test]
    fn full_plan_reads_data_and_zeroes_holes() {
        use Action::*;
        check_full(
            100,
            &[ext(0, 10, 0), ext(10, 20, STATE_HOLE | STATE_ZERO), ext(30, 70, 0)],
            false,
            &[r(0, 10, Copy), r(10, 20, Zero), r(30, 70, Copy)],
        );
        check_full(
            100,
            &[ext(0, 10, 0), ext(10, 20, STATE_HOLE | STATE_ZERO), ext(30, 70, 0)],
            true,
            &[r(0, 10, Copy), r(10, 20, Skip), r(30, 70, Copy)],
        );
    }

    #[test]
    fn full_plan_reads_holes_that_are_not_known_zero() {
        // A hole without the zero flag may read as anything: it must be copied.
        check_full(50, &[ext(0, 50, STATE_HOLE)], true, &[r(0, 50, Action::Copy)]);
    }

    #[test]
    fn full_plan_merges_and_fills_gaps() {
        use Action::*;
        check_full(
            100,
            &[ext(0, 10, 0), ext(10, 10, 0), ext(40, 20, STATE_ZERO), ext(60, 20, STATE_ZERO)],
            false,
            &[r(0, 40, Copy), r(40, 40, Zero), r(80, 20, Copy)],
        );
        // Extents beyond the disk are clipped; no extents at all means all data.
        check_full(10, &[ext(0, 64, STATE_ZERO)], true, &[r(0, 10, Skip)]);
        check_full(10, &[], true, &[r(0, 10, Copy)]);
    }

    #[test]
    fn planned_bytes_count_only_reads() {
        let plan = full(100, &[ext(0, 10, 0), ext(10, 80, STATE_ZERO), ext(90, 10, 0)], false);
        assert_eq!(plan.planned_bytes(), 20);
        assert_eq!(plan.bytes(Action::Zero), 80);
        assert_eq!(plan.blocks, 2);
    }

    #[test]
    fn resume_trims_the_plan_and_counts_done_bytes() {
        let plan = full(100, &[ext(0, 10, 0), ext(10, 80, STATE_ZERO), ext(90, 10, 0)], false);
        assert_eq!(plan.planned_below(5), 5);
        assert_eq!(plan.planned_below(50), 10);
        assert_eq!(plan.planned_below(95), 15);
        assert_eq!(plan.remaining_from(50), vec![r(50, 40, Action::Zero), r(90, 10, Action::Copy)]);
        assert_eq!(plan.remaining_from(100), vec![]);
    }

    fn check_aligned(ranges: &[Range], size: u64, block: u64, expected: &[Range]) {
        let plan = Plan { disk_size: size, ranges: ranges.to_vec(), blocks: 1 };
        let got = plan.aligned(block);
        assert_eq!(got.ranges, expected, "{ranges:?} in blocks of {block}");
        for r in &got.ranges {
            assert!(r.offset % block == 0 && (r.end() % block == 0 || r.end() == size), "{r:?}");
        }
    }

    #[test]
    fn aligned_plans_use_whole_blocks_and_data_wins() {
        use Action::*;
        // Data at 4 KiB granularity in a 64 KiB world.
        check_aligned(
            &[r(0, 4096, Zero), r(4096, 8192, Copy), r(12288, 131072 - 12288, Zero), r(131072, 65536, Copy)],
            196608,
            65536,
            &[r(0, 65536, Copy), r(65536, 65536, Zero), r(131072, 65536, Copy)],
        );
        // Skip yields to zero, zero to copy; a tiny range in one block.
        check_aligned(
            &[r(0, 100, Skip), r(100, 100, Zero), r(200, 10000, Skip)],
            10200,
            4096,
            &[r(0, 4096, Zero), r(4096, 6104, Skip)],
        );
        check_aligned(&[r(0, 100, Copy), r(100, 100, Zero), r(200, 4896, Copy)], 5096, 4096, &[r(0, 5096, Copy)]);
        // Gaps of an incremental plan stay gaps; touching blocks merge.
        check_aligned(&[r(100, 10, Copy), r(5000, 10, Copy), r(9000, 10, Copy)], 16384, 4096, &[r(0, 12288, Copy)]);
        check_aligned(&[r(100, 10, Copy), r(9000, 10, Copy)], 16384, 4096, &[r(0, 4096, Copy), r(8192, 4096, Copy)]);
        check_aligned(&[r(3, 5, Copy)], 100, 1, &[r(3, 5, Copy)]);
    }

    #[test]
    fn aligned_planned_bytes_are_what_is_read() {
        let plan = full(131072, &[ext(0, 4096, STATE_ZERO), ext(4096, 4096, 0), ext(8192, 122880, STATE_ZERO)], false);
        assert_eq!(plan.planned_bytes(), 4096);
        assert_eq!(plan.aligned(65536).planned_bytes(), 65536);
    }

    fn check_areas(input: &[(u64, u64)], size: u64, expected: Result<Vec<(u64, u64)>, AreasError>) {
        let areas: Vec<Area> = input.iter().map(|&(start, length)| Area { start, length }).collect();
        let got = normalize_areas(&areas, size).map(|v| v.iter().map(|a| (a.start, a.length)).collect::<Vec<_>>());
        assert_eq!(got, expected, "input {input:?}");
    }

    #[test]
    fn changed_areas_are_sorted_and_merged() {
        check_areas(&[(100, 10), (0, 10)], 1000, Ok(vec![(0, 10), (100, 10)]));
        check_areas(&[(0, 10), (5, 10), (15, 5)], 1000, Ok(vec![(0, 20)]));
        check_areas(&[(0, 100), (10, 10)], 1000, Ok(vec![(0, 100)]));
        check_areas(&[], 1000, Ok(vec![]));
    }

    #[test]
    fn changed_areas_outside_the_disk_are_refused() {
        check_areas(
            &[(0, 10), (995, 10)],
            1000,
            Err(AreasError::OutOfBounds { index: 1, start: 995, length: 10, disk_size: 1000 }),
        );
        check_areas(
            &[(u64::MAX, 2)],
            1000,
            Err(AreasError::OutOfBounds { index: 0, start: u64::MAX, length: 2, disk_size: 1000 }),
        );
        check_areas(&[(5, 0)], 1000, Err(AreasError::Empty { index: 0, start: 5 }));
    }

    #[test]
    fn changed_areas_json_is_strict() {
        assert_eq!(parse_areas(r#"[{"start":0,"length":4096}]"#), Ok(vec![Area { start: 0, length: 4096 }]));
        for bad in [
            r#"{"start":0}"#,
            r#"[{"start":-1,"length":1}]"#,
            r#"[{"start":0}]"#,
            "[",
            r#"[{"start":0,"length":1,"x":1}]"#,
        ] {
            assert!(matches!(parse_areas(bad), Err(AreasError::Json(_))), "{bad}");
        }
    }

    #[test]
    fn dirty_extents_become_areas() {
        let e =
            [ext(0, 65536, 0), ext(65536, 65536, 1), ext(131072, 65536, 1), ext(196608, 65536, 0), ext(262144, 100, 1)];
        assert_eq!(
            dirty_areas(&e, 262144 + 50),
            vec![Area { start: 65536, length: 131072 }, Area { start: 262144, length: 50 }]
        );
    }

    /// Feeds `extents` to a [`Planner`] in the pieces `cuts` says (offsets up
    /// to which the source has answered) and checks that the pieces come out in
    /// order, in whole blocks, and make exactly the plan of the whole disk.
    fn check_planner(size: u64, extents: &[Extent], dz: bool, block: u64, cuts: &[u64]) {
        let whole = full(size, extents, dz).aligned(block);
        let mut p = Planner::new(size, dz, block);
        let mut got: Vec<Range> = Vec::new();
        let mut fed = 0;
        for &cut in cuts.iter().chain([&size]) {
            let part: Vec<Extent> = extents[fed..].iter().take_while(|e| e.offset < cut).copied().collect();
            fed += part.len();
            let before = p.planned_through();
            let pieces = p.add(cut, &part);
            for r in &pieces {
                assert!(r.offset >= before && r.end() <= p.planned_through(), "{r:?} in order");
                assert!(r.offset % block == 0, "{r:?} aligned to {block}");
                push_merged(&mut got, *r);
            }
            assert!(p.planned_through() <= cut.min(size), "never past what is known");
        }
        assert_eq!(p.planned_through(), size);
        assert_eq!(got, whole.ranges, "pieces of {extents:?} cut at {cuts:?}");
        let plan = p.finish();
        assert_eq!(plan.ranges, whole.ranges);
        assert_eq!(plan.blocks, full(size, extents, dz).blocks);
    }

    #[test]
    fn a_plan_made_in_pieces_is_the_plan_of_the_whole() {
        let e = [ext(0, 4096, STATE_ZERO), ext(4096, 8192, 0), ext(12288, 20000, STATE_ZERO), ext(32288, 100, 0)];
        let size = 40000;
        for block in [1, 512, 4096, 65536] {
            for dz in [false, true] {
                check_planner(size, &e, dz, block, &[]);
                check_planner(size, &e, dz, block, &[4096, 12288, 32288]);
                check_planner(size, &e, dz, block, &[5000, 5001, 20000, 32300]);
            }
        }
        // Extents that stop short of a cut are gaps: read as data.
        check_planner(100, &[ext(0, 10, STATE_ZERO), ext(50, 50, STATE_ZERO)], false, 1, &[30, 60]);
    }

    #[test]
    fn incremental_plan_reads_only_changed_ranges() {
        let plan = incremental(
            1000,
            &[Area { start: 0, length: 10 }, Area { start: 10, length: 5 }, Area { start: 500, length: 100 }],
        );
        assert_eq!(plan.ranges, vec![r(0, 15, Action::Copy), r(500, 100, Action::Copy)]);
        assert_eq!(plan.planned_bytes(), 115);
        assert_eq!(plan.blocks, 3);
    }
}
