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

    /// The job ended or was released here: its row and its disks' rows go.
    pub fn forget_job(&mut self, job_id: &str) {
        self.rows.retain(|k, _| match k {
            Key::Job(j) | Key::Disk(j, _) => j != job_id,
        });
    }

    /// How many rows it remembers.
    #[cfg(test)]
    pub fn remembered(&self) -> usize {
        self.rows.len()
    }
}

/// What was last handed to the database, per row. The aggregator sends a row's
/// full state with every report, also while nothing changes (a stalled copy);
/// a pending state that changes none of the values last written is dropped, so
/// a row (and its `updated_at`) is rewritten only when one of its values
/// changed. The throttle decides how often a changed row is written; this
/// decides whether there is anything to write.
#[derive(Debug, Default)]
pub struct Written {
    jobs: HashMap<String, JobUpdate>,
    disks: HashMap<(String, String), PersistDisk>,
}

impl Written {
    /// `u` on top of what was last written for its job: the row's new state if
    /// `u` changes any value in it (or nothing was written yet), else `None`.
    pub fn job_change(&self, u: &JobUpdate) -> Option<JobUpdate> {
        match self.jobs.get(&u.id) {
            None => Some(u.clone()),
            Some(w) => Some(merge_job(w.clone(), u.clone())).filter(|state| state != w),
        }
    }

    /// [`Written::job_change`] for a disk (its owner included: a new run's
    /// first state is always written).
    pub fn disk_change(&self, u: &PersistDisk) -> Option<PersistDisk> {
        match self.disks.get(&(u.update.job_id.clone(), u.update.disk_id.clone())) {
            None => Some(u.clone()),
            Some(w) => Some(merge_disk(w.clone(), u.clone())).filter(|state| state != w),
        }
    }

    /// `state` (from [`Written::job_change`]) was handed to the database.
    pub fn wrote_job(&mut self, state: JobUpdate) {
        self.jobs.insert(state.id.clone(), state);
    }

    pub fn wrote_disk(&mut self, state: PersistDisk) {
        self.disks.insert((state.update.job_id.clone(), state.update.disk_id.clone()), state);
    }

    /// The database may not hold what was last handed over (the write failed):
    /// the next state of the row is written whatever it is.
    pub fn forget(&mut self, key: &Key) {
        match key {
            Key::Job(j) => {
                self.jobs.remove(j);
            }
            Key::Disk(j, d) => {
                self.disks.remove(&(j.clone(), d.clone()));
            }
        }
    }

    /// The job ended or was released here: nothing more of it to compare.
    pub fn forget_job(&mut self, job_id: &str) {
        self.jobs.remove(job_id);
        self.disks.retain(|(j, _), _| j != job_id);
    }

    /// How many rows it remembers.
    #[cfg(test)]
    pub fn remembered(&self) -> usize {
        self.jobs.len() + self.disks.len()
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
        vmware_snapshot: newer.vmware_snapshot.or(older.vmware_snapshot),
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
        change_id: newer.change_id.or(older.change_id),
        // A restart (a copy that starts over) sets its offset as it is; later
        // offsets of the same run only grow from there.
        resume_offset: if newer.restart { newer.resume_offset } else { newer.resume_offset.max(older.resume_offset) },
        restart: newer.restart || older.restart,
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

    fn figures(percent: f64, speed: i64) -> JobUpdate {
        JobUpdate {
            id: "j".into(),
            status: Some(JobStatus::Streaming),
            current_operation: Some(Operation::Transfer),
            progress_percent: Some(percent),
            transfer_speed_bps: Some(speed),
            ..JobUpdate::default()
        }
    }

    #[test]
    fn a_state_that_changes_no_value_is_not_written_again() {
        let mut w = Written::default();
        let first = w.job_change(&figures(10.0, 5)).expect("the first state is written");
        w.wrote_job(first);
        // A stalled copy repeats its state: nothing to write, however often.
        assert_eq!(w.job_change(&figures(10.0, 5)), None);
        assert_eq!(w.job_change(&JobUpdate { id: "j".into(), ..JobUpdate::default() }), None, "an empty update");
        // Any value that moves is a change, and the state to remember is the merge.
        let moved = w.job_change(&JobUpdate { transfer_speed_bps: Some(0), ..figures(10.0, 5) }).unwrap();
        assert_eq!((moved.progress_percent, moved.transfer_speed_bps), (Some(10.0), Some(0)));
        w.wrote_job(moved);
        assert_eq!(w.job_change(&figures(10.0, 0)), None);
        // After a failed write (or the job's end) the next state is written whatever it is.
        w.forget(&Key::Job("j".into()));
        assert!(w.job_change(&figures(10.0, 0)).is_some());
    }

    #[test]
    fn a_disk_state_is_compared_with_its_owner() {
        let owner = |run: &str| crate::db::Owner { node: "n".into(), run: run.into() };
        let disk = |run: &str, done: i64| PersistDisk {
            owner: owner(run),
            update: DiskUpdate {
                job_id: "j".into(),
                disk_id: "d".into(),
                bytes_synced: Some(done),
                ..DiskUpdate::default()
            },
        };
        let mut w = Written::default();
        w.wrote_disk(w.disk_change(&disk("r1", 5)).unwrap());
        assert_eq!(w.disk_change(&disk("r1", 5)), None);
        assert!(w.disk_change(&disk("r1", 6)).is_some());
        assert!(w.disk_change(&disk("r2", 5)).is_some(), "a new run writes its first state");
        w.forget_job("j");
        assert!(w.disk_change(&disk("r1", 5)).is_some());
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
