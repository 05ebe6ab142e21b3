//! From vCenter's `QueryChangedDiskAreas` answers to the copy engine's input.
//!
//! A VMware disk is never planned from NBD block status: vCenter already said
//! which areas matter, so the engine's changed-areas path
//! ([`Changes::ChangedAreas`]) is the plan and the areas' bytes are the planned
//! bytes, the progress denominator:
//! - a full copy asks for `"*"`, the allocated areas, so its planned bytes are
//!   the disk's allocated bytes (an empty 2 TB disk plans nothing);
//! - an incremental copy asks with the previous change ID, so it plans exactly
//!   the changed areas.
//!
//! A full copy that may only write the allocated areas also needs the rest of
//! the target to read as zeros. That holds when the target is known to be zero
//! (`destination_is_zero`, a fresh volume). Otherwise the engine must zero the
//! gaps, which its changed-areas input does not do: such a copy is planned from
//! the source's allocation instead ([`Changes::Full`]: data extents are read,
//! holes zeroed), so the target never keeps stale data. [`allocated_extents`]
//! turns the areas into the extents `engine::plan::full` takes, for when the
//! engine accepts a plan from given extents.
//!
//! Pure: no I/O.

use crate::engine::Changes;
use crate::engine::plan::{self, Area, AreasError, Extent};

/// Full (everything allocated) or incremental (changed since a change ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Full,
    Incremental,
}

/// One disk's areas from vCenter, checked and merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskAreas {
    pub kind: CopyKind,
    pub capacity: u64,
    /// Sorted, merged, inside the disk.
    pub areas: Vec<Area>,
}

impl DiskAreas {
    /// Checks vCenter's areas against the disk (an area beyond its end is an
    /// error, never silently cut) and merges overlapping or touching ones.
    pub fn new(kind: CopyKind, capacity: u64, raw: &[Area]) -> Result<Self, AreasError> {
        Ok(Self { kind, capacity, areas: plan::normalize_areas(raw, capacity)? })
    }

    /// Bytes the copy reads: the allocated (full) or changed (incremental) bytes.
    pub fn planned_bytes(&self) -> u64 {
        self.areas.iter().map(|a| a.length).sum()
    }

    /// What the engine runs for this disk.
    pub fn changes(&self, destination_is_zero: bool) -> Changes {
        match self.kind {
            CopyKind::Incremental => Changes::ChangedAreas(self.areas.clone()),
            CopyKind::Full if destination_is_zero => Changes::ChangedAreas(self.areas.clone()),
            CopyKind::Full => Changes::Full,
        }
    }
}

/// The areas as `base:allocation`-style extents covering the whole disk: areas
/// are data, gaps read as zeros (`engine::plan::full` takes these).
pub fn allocated_extents(areas: &[Area], capacity: u64) -> Vec<Extent> {
    let mut out = Vec::with_capacity(areas.len() * 2 + 1);
    let mut pos = 0;
    for a in areas {
        if a.start > pos {
            out.push(Extent { offset: pos, length: a.start - pos, flags: plan::STATE_ZERO });
        }
        out.push(Extent { offset: a.start, length: a.length, flags: 0 });
        pos = a.start + a.length;
    }
    if pos < capacity {
        out.push(Extent { offset: pos, length: capacity - pos, flags: plan::STATE_ZERO });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::plan::{Action, Range};

    fn a(start: u64, length: u64) -> Area {
        Area { start, length }
    }

    #[test]
    fn areas_are_merged_and_counted() {
        let d = DiskAreas::new(CopyKind::Full, 1 << 20, &[a(65536, 65536), a(0, 65536), a(196608, 4096)]).unwrap();
        assert_eq!(d.areas, vec![a(0, 131072), a(196608, 4096)]);
        assert_eq!(d.planned_bytes(), 135168);
    }

    #[test]
    fn areas_outside_the_disk_are_refused() {
        let e = DiskAreas::new(CopyKind::Incremental, 1 << 20, &[a(0, 65536), a(1 << 20, 65536)]).unwrap_err();
        assert!(matches!(e, AreasError::OutOfBounds { index: 1, .. }), "{e}");
        assert!(DiskAreas::new(CopyKind::Incremental, 1 << 20, &[a(0, 0)]).is_err());
    }

    #[test]
    fn the_engine_reads_exactly_the_areas_unless_gaps_need_zeroing() {
        let raw = [a(0, 65536), a(262144, 65536)];
        let inc = DiskAreas::new(CopyKind::Incremental, 1 << 20, &raw).unwrap();
        assert_eq!(inc.changes(false), Changes::ChangedAreas(raw.to_vec()));
        assert_eq!(inc.changes(true), Changes::ChangedAreas(raw.to_vec()));
        let full = DiskAreas::new(CopyKind::Full, 1 << 20, &raw).unwrap();
        assert_eq!(full.changes(true), Changes::ChangedAreas(raw.to_vec()));
        assert_eq!(full.changes(false), Changes::Full, "stale target data must be zeroed, never kept");
        // An empty disk plans nothing.
        let empty = DiskAreas::new(CopyKind::Full, 1 << 20, &[]).unwrap();
        assert_eq!((empty.planned_bytes(), empty.changes(true)), (0, Changes::ChangedAreas(vec![])));
    }

    #[test]
    fn allocated_extents_make_a_full_plan_of_the_areas() {
        let areas = [a(65536, 65536), a(262144, 131072)];
        let size = 1 << 20;
        let ext = allocated_extents(&areas, size);
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), size, "the extents cover the disk");
        let p = plan::full(size, &ext, false);
        assert_eq!(
            p.ranges,
            vec![
                Range { offset: 0, length: 65536, action: Action::Zero },
                Range { offset: 65536, length: 65536, action: Action::Copy },
                Range { offset: 131072, length: 131072, action: Action::Zero },
                Range { offset: 262144, length: 131072, action: Action::Copy },
                Range { offset: 393216, length: size - 393216, action: Action::Zero },
            ]
        );
        assert_eq!(p.planned_bytes(), 196608, "planned bytes are the allocated areas");
        assert_eq!(allocated_extents(&[a(0, size)], size).len(), 1);
    }
}
