//! The DbWriter's throttle: which pending row is written now, and how pending
//! updates of one row merge.
//!
//! [`Throttle`] holds the progress-write rules (README.md, "Running the daemon") per row (job or disk);
//! the merges put a newer update on top of an older one not yet written, so that
//! a row waits as one latest state rather than as a queue. Plain data: no actor,
//! no database, no clock of its own (the caller passes `now`).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::messages::PersistDisk;
use crate::db::{DiskUpdate, JobUpdate};

/// Which row a progress write is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Job(String),
    Disk(String, String),
}

/// What decides whether a row is written now.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub percent: f64,
    /// Status and operation, as one comparable string.
    pub state: String,
    pub terminal: bool,
}

/// The progress-write rules, per row: write when the percentage moved
/// by at least `step` points, or `interval` passed since the last write and
/// something changed, or the status or operation changed; terminal states at once.
#[derive(Debug)]
pub struct Throttle {
    pub step: f64,
    pub interval: Duration,
    rows: HashMap<Key, Row>,
}

#[derive(Debug, Default)]
struct Row {
    /// What was last written, and when.
    written: Option<(Mark, Instant)>,
    /// A change arrived that must be written without waiting.
    urgent: bool,
}

impl Throttle {
    pub fn new(step: f64, interval: Duration) -> Self {
        Self { step, interval, rows: HashMap::new() }
    }

    /// A new state for `key` arrived (it is now pending).
    pub fn offer(&mut self, key: &Key, mark: &Mark) {
        let row = self.rows.entry(key.clone()).or_default();
        let urgent = match &row.written {
            None => true,
            Some((w, _)) => {
                mark.terminal || mark.state != w.state || (mark.percent - w.percent).abs() >= self.step - 1e-9
            }
        };
        row.urgent |= urgent;
    }

    /// Whether the pending state of `key` should be written at `now`.
    pub fn due(&self, key: &Key, now: Instant) -> bool {
        match self.rows.get(key) {
            None => true,
            Some(r) => r.urgent || r.written.as_ref().is_none_or(|(_, at)| now.duration_since(*at) >= self.interval),
        }
    }

    /// The state of `key` was handed to the database at `now`.
    pub fn wrote(&mut self, key: &Key, mark: Mark, now: Instant) {
        let row = self.rows.entry(key.clone()).or_default();
        row.written = Some((mark, now));
        row.urgent = false;
    }

    /// A write of `key` failed: try it again without waiting for a change.
    pub fn retry(&mut self, key: &Key) {
        self.rows.entry(key.clone()).or_default().urgent = true;
    }

    pub fn forget(&mut self, key: &Key) {
        self.rows.remove(key);
    }
}

/// The throttle's view of a job update. The aggregator always sends the full
/// state (status, operation, figures), so a missing field means "unchanged".
pub fn job_mark(u: &JobUpdate) -> Mark {
    Mark {
        percent: u.progress_percent.unwrap_or(0.0),
        state: format!(
            "{}/{}",
            u.status.map(|s| s.as_db()).unwrap_or(""),
            u.current_operation.map(|o| o.as_str()).unwrap_or("")
        ),
        terminal: u.status.is_some_and(|s| s.is_terminal()),
    }
}

pub fn disk_mark(u: &DiskUpdate) -> Mark {
    Mark {
        percent: u.sync_progress_percent.unwrap_or(0.0),
        state: u.sync_status.map(|s| s.as_db().to_string()).unwrap_or_default(),
        terminal: u.sync_status.is_some_and(|s| s.is_terminal()),
    }
}

/// `newer` on top of `older`: every field `newer` sets wins.
pub fn merge_job(older: JobUpdate, newer: JobUpdate) -> JobUpdate {
    JobUpdate {
        id: newer.id,
        owner: newer.owner.or(older.owner),
        status: newer.status.or(older.status),
        current_operation: newer.current_operation.or(older.current_operation),
        progress_percent: newer.progress_percent.or(older.progress_percent),
        bytes_transferred: newer.bytes_transferred.or(older.bytes_transferred),
        total_bytes: newer.total_bytes.or(older.total_bytes),
        transfer_speed_bps: newer.transfer_speed_bps.or(older.transfer_speed_bps),
        eta_seconds: newer.eta_seconds.or(older.eta_seconds),
        error_message: newer.error_message.or(older.error_message),
        last_progress_at: newer.last_progress_at.or(older.last_progress_at),
        started_at: newer.started_at.or(older.started_at),
        completed_at: newer.completed_at.or(older.completed_at),
    }
}

pub fn merge_disk(older: PersistDisk, newer: PersistDisk) -> PersistDisk {
    let (older, owner, newer) = (older.update, newer.owner, newer.update);
    let update = DiskUpdate {
        job_id: newer.job_id,
        disk_id: newer.disk_id,
        sync_status: newer.sync_status.or(older.sync_status),
        capacity_bytes: newer.capacity_bytes.or(older.capacity_bytes),
        planned_bytes: newer.planned_bytes.or(older.planned_bytes),
        bytes_synced: newer.bytes_synced.or(older.bytes_synced),
        skipped_bytes: newer.skipped_bytes.or(older.skipped_bytes),
        sync_progress_percent: newer.sync_progress_percent.or(older.sync_progress_percent),
        throughput_bps: newer.throughput_bps.or(older.throughput_bps),
        error_message: newer.error_message.or(older.error_message),
        disk_change_id: newer.disk_change_id.or(older.disk_change_id),
        resume_offset: newer.resume_offset.max(older.resume_offset),
    };
    PersistDisk { owner, update }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{JobStatus, Operation};

    fn mark(percent: f64, state: &str) -> Mark {
        Mark { percent, state: state.into(), terminal: false }
    }

    /// Feeds `(seconds, percent, state)` updates and returns at which seconds a
    /// write happens, with a tick every 100 ms.
    fn writes(step: f64, interval: u64, updates: &[(f64, f64, &str)]) -> Vec<f64> {
        let t0 = Instant::now();
        let mut t = Throttle::new(step, Duration::from_secs(interval));
        let key = Key::Job("j".into());
        let mut pending: Option<Mark> = None;
        let mut out = Vec::new();
        let mut i = 0;
        let end = updates.last().map_or(0.0, |u| u.0) + 10.0;
        let mut now_s = 0.0;
        while now_s <= end {
            while i < updates.len() && updates[i].0 <= now_s + 1e-9 {
                let m = mark(updates[i].1, updates[i].2);
                t.offer(&key, &m);
                pending = Some(m);
                i += 1;
            }
            let now = t0 + Duration::from_secs_f64(now_s);
            if let Some(m) = pending.take() {
                if t.due(&key, now) {
                    t.wrote(&key, m, now);
                    out.push((now_s * 10.0f64).round() / 10.0);
                } else {
                    pending = Some(m);
                }
            }
            now_s += 0.1;
        }
        out
    }

    #[test]
    fn first_state_is_written_at_once() {
        assert_eq!(writes(1.0, 2, &[(0.0, 0.0, "a")]), vec![0.0]);
    }

    #[test]
    fn small_moves_wait_for_the_interval() {
        // 0.01 % every 100 ms for 5 s: written every 2 s, the last change included.
        let ups: Vec<(f64, f64, &str)> = (0..50).map(|i| (i as f64 * 0.1, i as f64 * 0.01, "a")).collect();
        assert_eq!(writes(1.0, 2, &ups), vec![0.0, 2.0, 4.0, 6.0]);
    }

    #[test]
    fn a_step_of_the_percentage_is_written_at_once() {
        let ups = [(0.0, 0.0, "a"), (0.5, 0.5, "a"), (0.7, 1.2, "a"), (0.9, 1.3, "a")];
        assert_eq!(writes(1.0, 2, &ups), vec![0.0, 0.7, 2.7]);
    }

    #[test]
    fn state_changes_are_written_at_once() {
        let ups = [(0.0, 0.0, "a"), (0.3, 0.0, "b"), (0.6, 0.1, "b"), (0.8, 0.1, "c")];
        assert_eq!(writes(1.0, 2, &ups), vec![0.0, 0.3, 0.8]);
    }

    #[test]
    fn nothing_changed_nothing_written() {
        assert_eq!(writes(1.0, 2, &[(0.0, 5.0, "a")]), vec![0.0]);
    }

    #[test]
    fn merging_keeps_the_newest_fields_and_the_oldest_unset_ones() {
        let a = JobUpdate {
            id: "j".into(),
            status: Some(JobStatus::Streaming),
            current_operation: Some(Operation::Transfer),
            progress_percent: Some(10.0),
            ..JobUpdate::default()
        };
        let b = JobUpdate { id: "j".into(), progress_percent: Some(12.0), ..JobUpdate::default() };
        let m = merge_job(a, b);
        assert_eq!(m.status, Some(JobStatus::Streaming));
        assert_eq!(m.current_operation, Some(Operation::Transfer));
        assert_eq!(m.progress_percent, Some(12.0));
    }

    #[test]
    fn terminal_marks_are_urgent() {
        let t0 = Instant::now();
        let mut t = Throttle::new(1.0, Duration::from_secs(2));
        let key = Key::Job("j".into());
        t.wrote(&key, mark(50.0, "streaming/Transfer"), t0);
        let m = Mark { percent: 50.0, state: "streaming/Transfer".into(), terminal: true };
        t.offer(&key, &m);
        assert!(t.due(&key, t0 + Duration::from_millis(1)));
    }
}
