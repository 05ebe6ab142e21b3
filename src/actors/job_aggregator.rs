//! The JobAggregator: one per running job. It starts a DiskCopier per unfinished
//! disk, sums their progress into the job's figures, moves the job through its
//! states, renews its lease, and reports to the DbWriter and the TimeoutWatchdog.
//!
//! The arithmetic and the state are [`JobTracker`], a plain struct that unit tests
//! drive; the actor is the plumbing around it. Figures are sums of bytes over the
//! disks, never averages of percentages, and the percentage only counts once every
//! disk is planned, so it never goes down when a late disk adds to the total. A
//! resumed run starts from the figures its rows show (see [`DiskTrack::floor`]),
//! so the percentage does not drop when a run restarts from a checkpoint below them.
//!
//! The aggregator writes as its job's owner (node and run) and only while its
//! lease holds: the engine's write fence of every disk is the lease's deadline on
//! this machine's monotonic clock, extended only by a renewal the database
//! confirmed. When it expires, the copies stop sending to their targets at once,
//! and the aggregator stops without writing another row of the job.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use chrono::Utc;

use super::db_writer::DbWriter;
use super::disk_copier::{DiskCopier, DiskSlots};
use super::messages::*;
use super::timeout_watchdog::TimeoutWatchdog;
use crate::config::Settings;
use crate::db::{CbtRecord, Disk, DiskUpdate, Job, JobUpdate, NewJobEvent, Owner};
use crate::engine::{Changes, Copier, CopySpec, Event, Fence, Snapshot, Stage, Summary, plan};
use crate::state::{DiskStatus, JobStatus, Operation, ReplicationType};

/// What a job needs from the rest of the daemon.
#[derive(Clone)]
pub struct JobDeps {
    pub db: Addr<DbWriter>,
    pub watchdog: Addr<TimeoutWatchdog>,
    pub slots: DiskSlots,
    pub settings: Arc<Settings>,
    pub node: String,
}

/// One disk as the job sees it.
#[derive(Debug, Clone)]
pub struct DiskTrack {
    pub disk_id: String,
    pub label: Option<String>,
    pub change_id: Option<String>,
    pub previous_change_id: Option<String>,
    pub status: DiskStatus,
    pub capacity: u64,
    pub planned: u64,
    /// `planned` may be used for the percentage: this run planned the disk, or
    /// an earlier run did (its figures in the row), until this run's plan arrives.
    pub planned_known: bool,
    /// This run's plan arrived (the transfer waits for every disk's).
    pub planned_now: bool,
    pub blocks: u64,
    /// Planned bytes done in this run's count (below its checkpoint included).
    pub done: u64,
    /// What the row showed as done when the job was claimed: the shown figures
    /// never go below it while the plan is the same.
    pub floor: u64,
    pub skipped: u64,
    pub zeroed: u64,
    pub verified: u64,
    pub throughput: u64,
    pub watermark: u64,
    pub stage: Option<Stage>,
    /// Holds a copy slot (its connections are open).
    pub copying: bool,
    pub error: Option<String>,
    /// Transient failures the engine retried in this run (for /metrics).
    pub retries: u64,
    /// The request the engine has long waited on, if any (for the watchdog's message).
    pub waiting_on: Option<String>,
}

impl DiskTrack {
    /// The disk as its row shows it; `status` is the row's, checked known.
    fn from_row(d: &Disk, status: DiskStatus) -> Self {
        let completed = status == DiskStatus::Completed;
        let planned = d.planned_bytes.max(0) as u64;
        Self {
            disk_id: d.disk_id.clone(),
            label: d.label.clone(),
            change_id: d.change_id.clone(),
            previous_change_id: d.previous_change_id.clone(),
            // A disk that did not complete starts over (from its checkpoint).
            status: if completed { DiskStatus::Completed } else { DiskStatus::Pending },
            capacity: d.capacity_bytes.max(0) as u64,
            planned,
            planned_known: completed || planned > 0,
            planned_now: completed,
            blocks: 0,
            done: if completed { planned } else { 0 },
            floor: if completed { planned } else { (d.bytes_synced.max(0) as u64).min(planned) },
            skipped: d.skipped_bytes.max(0) as u64,
            zeroed: 0,
            verified: 0,
            throughput: 0,
            watermark: d.resume_offset.max(0) as u64,
            stage: None,
            copying: false,
            error: None,
            retries: 0,
            waiting_on: None,
        }
    }

    /// The planned bytes shown as done: this run's count, or what the row showed
    /// if that is more, never more than planned.
    pub fn shown_done(&self) -> u64 {
        self.done.max(self.floor).min(self.planned)
    }

    pub fn percent(&self) -> f64 {
        if self.planned_known { crate::engine::progress::percent(self.shown_done(), self.planned) } else { 0.0 }
    }

    /// This run's plan: the figures of an earlier run stand only if it planned
    /// the same bytes.
    fn set_plan(&mut self, planned: u64, done: u64) {
        if planned != self.planned {
            self.floor = 0;
        }
        self.planned = planned;
        self.done = done;
        self.planned_known = true;
        self.planned_now = true;
    }

    /// Past copying: verifying, done, or finished.
    fn copied(&self) -> bool {
        self.status.is_terminal() || matches!(self.stage, Some(Stage::Verifying | Stage::Done))
    }

    fn apply(&mut self, s: &Snapshot) {
        if self.status.is_terminal() {
            return;
        }
        self.done = s.bytes_done;
        self.skipped = s.skipped_bytes;
        self.zeroed = s.zeroed_bytes;
        self.verified = s.verified_bytes;
        self.retries = s.retries;
        self.throughput = if self.copying { s.throughput_bps } else { 0 };
        self.watermark = self.watermark.max(s.durable_watermark);
        self.waiting_on = s.waiting_on.clone();
        self.stage = Some(s.stage);
        if s.planned_bytes > 0 || s.disk_size > 0 {
            if s.planned_bytes != self.planned {
                self.floor = 0;
            }
            self.planned = s.planned_bytes;
            self.capacity = s.disk_size;
        }
    }
}

/// The job's state and arithmetic.
#[derive(Debug, Clone)]
pub struct JobTracker {
    pub job_id: String,
    pub correlation_id: String,
    pub replication_type: ReplicationType,
    pub status: JobStatus,
    pub operation: Operation,
    pub disks: Vec<DiskTrack>,
    pub started_at: Option<chrono::NaiveDateTime>,
    pub last_progress_at: Option<chrono::NaiveDateTime>,
    /// Last 10 % milestone announced.
    milestone: u32,
    /// Grows while disks wait for a copy slot (waiting is not stalling).
    waiting: u64,
}

impl JobTracker {
    /// The tracker of a claimed job, or why the job cannot be run: a status or a
    /// replication type the daemon does not know, no disks, a disk in a status
    /// it does not know or without a source or a target. Such a job fails alone,
    /// with this message; the others are not held up by it.
    pub fn new(job: &Job, disks: &[Disk], correlation_id: String) -> Result<Self, String> {
        let status = job
            .status
            .known()
            .filter(|s| !s.is_terminal())
            .ok_or_else(|| format!("cannot run a job in status '{}'", job.status.shown(JobStatus::as_db)))?;
        let replication_type = job.replication_type.known().ok_or_else(|| {
            format!(
                "unknown replication type '{}' (expected full or incremental)",
                job.replication_type.shown(ReplicationType::as_str)
            )
        })?;
        if disks.is_empty() {
            return Err("the job has no disks".into());
        }
        let mut tracks = Vec::with_capacity(disks.len());
        for d in disks {
            let Some(st) = d.sync_status.known() else {
                let word = d.sync_status.shown(DiskStatus::as_db);
                return Err(format!("disk '{}' has an unknown sync_status '{word}'", d.disk_id));
            };
            if st != DiskStatus::Completed {
                if d.source_uri.trim().is_empty() {
                    return Err(format!("disk '{}' has no source URI", d.disk_id));
                }
                if d.target_uri.trim().is_empty() {
                    return Err(format!("disk '{}' has no target URI", d.disk_id));
                }
            }
            tracks.push(DiskTrack::from_row(d, st));
        }
        let operation = match replication_type {
            ReplicationType::Full => Operation::Discover,
            ReplicationType::Incremental => Operation::QueryCbt,
        };
        let mut t = Self {
            job_id: job.id.clone(),
            correlation_id,
            replication_type,
            status,
            operation,
            disks: tracks,
            started_at: job.started_at,
            last_progress_at: job.last_progress_at,
            milestone: 0,
            waiting: 0,
        };
        t.milestone = (t.percent() / 10.0).floor() as u32;
        Ok(t)
    }

    pub fn all_planned(&self) -> bool {
        self.disks.iter().all(|d| d.planned_known || d.status.is_terminal())
    }

    /// Every disk still to copy has this run's plan: the transfer may start.
    pub fn planned_now(&self) -> bool {
        self.disks.iter().all(|d| d.planned_now || d.status.is_terminal())
    }

    /// Every disk is past copying (verifying or finished): the job may move to
    /// `finalizing`, which no disk may leave again.
    pub fn all_copied(&self) -> bool {
        self.disks.iter().all(DiskTrack::copied)
    }

    pub fn planned(&self) -> u64 {
        self.disks.iter().map(|d| d.planned).sum()
    }

    pub fn done(&self) -> u64 {
        self.disks.iter().map(DiskTrack::shown_done).sum()
    }

    pub fn throughput(&self) -> u64 {
        self.disks.iter().filter(|d| !d.status.is_terminal()).map(|d| d.throughput).sum()
    }

    /// Sum of bytes over all disks, counted only once every disk is planned.
    pub fn percent(&self) -> f64 {
        if !self.all_planned() {
            return 0.0;
        }
        if self.planned() == 0 {
            // Nothing to read: done only if every disk is (a disk that failed
            // before planning planned nothing, and did nothing).
            let all_done = self.disks.iter().all(|d| d.status == DiskStatus::Completed);
            return if all_done { 100.0 } else { 0.0 };
        }
        crate::engine::progress::percent(self.done(), self.planned())
    }

    pub fn eta_seconds(&self) -> Option<u64> {
        let remaining = self.planned().saturating_sub(self.done());
        match self.throughput() {
            _ if !self.all_planned() => None,
            _ if remaining == 0 => Some(0),
            0 => None,
            bps => Some(remaining.div_ceil(bps)),
        }
    }

    /// Everything the job has done; grows while it makes progress of any kind.
    pub fn work(&self) -> u64 {
        let bytes: u64 = self.disks.iter().map(|d| d.done + d.zeroed + d.skipped + d.verified).sum();
        let steps: u64 = self
            .disks
            .iter()
            .map(|d| d.planned_known as u64 + d.stage.map_or(0, |s| s as u64 + 1) + d.status.is_terminal() as u64)
            .sum();
        bytes + steps + self.waiting
    }

    /// The next 10 % milestone crossed and not yet announced, if any (call until
    /// `None`: a fast disk may cross several between two reports).
    pub fn take_milestone(&mut self) -> Option<u32> {
        let reached = (self.percent() / 10.0).floor() as u32;
        (reached > self.milestone).then(|| {
            self.milestone += 1;
            self.milestone * 10
        })
    }

    pub fn disk_mut(&mut self, id: &str) -> Option<&mut DiskTrack> {
        self.disks.iter_mut().find(|d| d.disk_id == id)
    }

    pub fn unfinished(&self) -> impl Iterator<Item = &DiskTrack> {
        self.disks.iter().filter(|d| !d.status.is_terminal())
    }

    /// The full row state of the job (the DbWriter compares it with what it
    /// wrote last), written as `owner`.
    pub fn job_update(&self, owner: &Owner) -> JobUpdate {
        JobUpdate {
            id: self.job_id.clone(),
            owner: Some(owner.clone()),
            status: Some(self.status),
            current_operation: Some(self.operation),
            progress_percent: Some(self.percent()),
            bytes_transferred: Some(self.done() as i64),
            total_bytes: Some(self.planned() as i64),
            transfer_speed_bps: Some(self.throughput() as i64),
            eta_seconds: self.eta_seconds().map(|e| e as i64),
            error_message: None,
            last_progress_at: self.last_progress_at,
            started_at: self.started_at,
            completed_at: None,
        }
    }

    pub fn disk_update(&self, d: &DiskTrack) -> DiskUpdate {
        DiskUpdate {
            job_id: self.job_id.clone(),
            disk_id: d.disk_id.clone(),
            sync_status: Some(d.status),
            capacity_bytes: Some(d.capacity as i64),
            planned_bytes: Some(d.planned as i64),
            bytes_synced: Some(d.shown_done() as i64),
            skipped_bytes: Some(d.skipped as i64),
            sync_progress_percent: Some(d.percent()),
            throughput_bps: Some(d.throughput as i64),
            error_message: d.error.clone().map(Some),
            disk_change_id: None,
            resume_offset: Some(d.watermark as i64),
        }
    }
}

/// Why the job is stopping before its disks completed.
#[derive(Debug, Clone, PartialEq)]
enum Ending {
    Failed(String),
    Cancelled(String),
    /// Shutdown: leave it resumable.
    Suspended,
    /// Another node or run owns it now, or it finished elsewhere: touch nothing.
    Lost,
    /// The lease was not renewed by its deadline on this machine's clock: the
    /// copies stopped writing; touch nothing (another node may own it already).
    Expired,
}

impl Ending {
    /// The job is no longer ours: not one more write of its rows.
    fn gone(&self) -> bool {
        matches!(self, Ending::Lost | Ending::Expired)
    }
}

/// How long after a renewal (or the claim) was sent the job's write fence stays
/// open: the lease minus a quarter of it. The database's lease runs from when it
/// executed the statement, later than it was sent, so this deadline always comes
/// first; the quarter covers clock-rate differences and requests still on their
/// way to a target when the fence closes.
pub fn fence_deadline(sent: Instant, lease: std::time::Duration) -> Instant {
    sent + lease - lease / 4
}

/// `d` to the second, for messages.
fn round_s(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(d.as_secs())
}

/// How often the aggregator looks at its fence (the copies check it themselves
/// before every request; this stops the job's actors and rows).
const FENCE_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

pub struct JobAggregator {
    deps: JobDeps,
    discovery: Recipient<JobEnded>,
    t: JobTracker,
    /// Who writes the job's rows: this node, this run.
    owner: Owner,
    /// The engine's write fence for every disk of this run (see the module doc).
    fence: Fence,
    rows: Vec<Disk>,
    copiers: HashMap<String, Addr<DiskCopier>>,
    ending: Option<Ending>,
    transfer_started: bool,
    suspend_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    disk_started: HashMap<String, Instant>,
    last_work: u64,
    /// `finish` has run: the outcome is written once.
    finished: bool,
}

impl JobAggregator {
    /// The aggregator of a claimed job: `t` its tracker (whose correlation id is
    /// the run of `owner`), `rows` its disks, `fence` open until the claim's lease
    /// deadline.
    pub fn new(
        t: JobTracker,
        rows: Vec<Disk>,
        owner: Owner,
        fence: Fence,
        deps: JobDeps,
        discovery: Recipient<JobEnded>,
    ) -> Self {
        Self {
            deps,
            discovery,
            t,
            owner,
            fence,
            rows,
            copiers: HashMap::new(),
            ending: None,
            transfer_started: false,
            suspend_waiters: Vec::new(),
            disk_started: HashMap::new(),
            last_work: 0,
            finished: false,
        }
    }

    /// Whether the job's rows are still ours to write: the fence is open and the
    /// job was not lost. Every write goes through here.
    fn may_write(&self) -> bool {
        !self.fence.expired() && !self.ending.as_ref().is_some_and(Ending::gone)
    }

    fn event(&self, disk: Option<&str>, level: &str, message: impl Into<String>) {
        let message = message.into();
        let (job_id, cid) = (&self.t.job_id, &self.t.correlation_id);
        match level {
            "error" => tracing::error!(job_id = %job_id, disk_id = disk, correlation_id = %cid, "{message}"),
            "warn" => tracing::warn!(job_id = %job_id, disk_id = disk, correlation_id = %cid, "{message}"),
            _ => tracing::info!(job_id = %job_id, disk_id = disk, correlation_id = %cid, "{message}"),
        }
        self.record(Entry::Event(NewJobEvent {
            job_id: job_id.clone(),
            disk_id: disk.map(str::to_string),
            correlation_id: cid.clone(),
            level: level.to_string(),
            stage: self.t.operation.as_str().to_string(),
            message,
            created_at: Some(Utc::now().naive_utc()),
        }));
    }

    fn record(&self, entry: Entry) {
        if self.may_write() {
            self.deps.db.do_send(Record { owner: self.owner.clone(), entry });
        }
    }

    fn write_job(&self, u: JobUpdate) {
        if self.may_write() {
            self.deps.db.do_send(PersistJob(u));
        }
    }

    fn write_disk(&self, update: DiskUpdate) {
        if self.may_write() {
            self.deps.db.do_send(PersistDisk { owner: self.owner.clone(), update });
        }
    }

    fn persist_job(&self) {
        self.write_job(self.t.job_update(&self.owner));
    }

    fn persist_disk(&self, disk_id: &str) {
        if let Some(d) = self.t.disks.iter().find(|d| d.disk_id == disk_id) {
            self.write_disk(self.t.disk_update(d));
        }
    }

    /// Moves the job to `status`/`op` if that is a legal step, and says so.
    fn advance(&mut self, status: JobStatus, op: Operation) {
        if !self.t.status.can_become(status) {
            return;
        }
        let changed = self.t.status != status || self.t.operation != op;
        self.t.status = status;
        self.t.operation = op;
        if changed {
            self.event(None, "info", format!("{} ({})", status.as_api(), op.as_str()));
            self.persist_job();
        }
    }

    fn spec_for(&self, row: &Disk) -> Result<CopySpec, String> {
        let changes = match self.t.replication_type {
            ReplicationType::Full => Changes::Full,
            ReplicationType::Incremental => match (&row.dirty_bitmap, &row.changed_areas) {
                (Some(b), _) if !b.is_empty() => Changes::DirtyBitmap(b.clone()),
                (_, Some(a)) if !a.is_empty() => {
                    Changes::ChangedAreas(plan::parse_areas(a).map_err(|e| format!("bad changed_areas: {e}"))?)
                }
                // Never silently a full copy.
                _ => return Err("incremental copy needs dirty_bitmap or changed_areas; the disk has neither".into()),
            },
        };
        let s = &self.deps.settings;
        Ok(CopySpec {
            source: row.source_uri.clone(),
            target: row.target_uri.clone(),
            changes,
            destination_is_zero: row.destination_is_zero,
            allocated: row.keep_allocated,
            allow_no_flush: s.copy.allow_no_flush,
            resume_from: row.resume_offset.max(0) as u64,
            verify: s.copy.verify,
            tuning: s.tuning(),
        })
    }

    /// Ends the job early for `why`: cancels the copiers, finishing once they stopped.
    fn end(&mut self, why: Ending, ctx: &mut Context<Self>) {
        // A job that is no longer ours stays so, whatever ended it first.
        if self.ending.is_none() || why.gone() {
            self.ending = Some(why);
        }
        for c in self.copiers.values() {
            c.do_send(CancelCopy);
        }
        if self.copiers.is_empty() {
            self.finish(ctx);
        }
    }

    /// Writes the outcome and stops the actor; once.
    fn finish(&mut self, ctx: &mut Context<Self>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let now = Some(Utc::now().naive_utc());
        let mut final_update: Option<JobUpdate> = None;
        match self.ending.clone() {
            None => {
                // Every disk completed: its data is flushed and its change ID written.
                self.advance(JobStatus::Finalizing, Operation::Finalize);
                self.advance(JobStatus::Finalizing, Operation::PersistChangeIds);
                self.t.status = JobStatus::Completed;
                let mut u = self.t.job_update(&self.owner);
                u.completed_at = now;
                u.eta_seconds = Some(0);
                u.transfer_speed_bps = Some(0);
                self.event(None, "info", "Succeeded");
                final_update = Some(u);
            }
            Some(Ending::Failed(msg)) | Some(Ending::Cancelled(msg)) => {
                let failed = matches!(self.ending, Some(Ending::Failed(_)));
                let (js, ds) = if failed {
                    (JobStatus::Failed, DiskStatus::Failed)
                } else {
                    (JobStatus::Cancelled, DiskStatus::Cancelled)
                };
                let ids: Vec<String> = self.t.unfinished().map(|d| d.disk_id.clone()).collect();
                for id in ids {
                    if let Some(d) = self.t.disk_mut(&id) {
                        d.status = ds;
                        d.throughput = 0;
                        d.error.get_or_insert_with(|| msg.clone());
                    }
                    self.persist_disk(&id);
                }
                self.t.status = js;
                let mut u = self.t.job_update(&self.owner);
                u.error_message = Some(msg.clone());
                u.completed_at = now;
                u.transfer_speed_bps = Some(0);
                u.eta_seconds = None;
                self.event(None, if failed { "error" } else { "warn" }, format!("{}: {msg}", js.as_api()));
                final_update = Some(u);
            }
            Some(Ending::Suspended) => {
                for d in self.t.disks.iter_mut() {
                    d.throughput = 0;
                }
                let ids: Vec<String> = self.t.unfinished().map(|d| d.disk_id.clone()).collect();
                for id in ids {
                    self.persist_disk(&id);
                }
                self.event(None, "info", "suspended by shutdown; resumable from its checkpoints");
                self.persist_job();
            }
            Some(Ending::Lost) => {
                self.event(None, "warn", "job no longer ours (lease lost or finished elsewhere); stopped");
            }
            Some(Ending::Expired) => {
                self.event(
                    None,
                    "warn",
                    "lease not renewed in time; stopped writing to the targets and to the job's rows \
                     (resumable from its checkpoints once the lease has expired)",
                );
            }
        }
        if let Some(u) = final_update {
            self.write_job(u);
        }
        self.deps.watchdog.do_send(Unwatch { job_id: self.t.job_id.clone() });
        if self.may_write() {
            self.deps.db.do_send(ReleaseLease { job_id: self.t.job_id.clone(), owner: self.owner.clone() });
        }
        self.discovery.do_send(JobEnded { job_id: self.t.job_id.clone() });
        for w in self.suspend_waiters.drain(..) {
            let _ = w.send(());
        }
        ctx.stop();
    }

    fn on_finished(&mut self, disk_id: &str, result: Result<Summary, CopyFailure>, ctx: &mut Context<Self>) {
        if let Some(c) = self.copiers.remove(disk_id) {
            c.do_send(Dismiss);
        }
        let started = self.disk_started.remove(disk_id);
        match result {
            Ok(summary) => {
                let change_id = {
                    let Some(d) = self.t.disk_mut(disk_id) else { return };
                    d.status = DiskStatus::Completed;
                    d.done = summary.planned_bytes;
                    d.planned = summary.planned_bytes;
                    d.throughput = 0;
                    d.copying = false;
                    d.watermark = summary.watermark;
                    d.blocks = summary.blocks;
                    d.change_id.clone()
                };
                // The engine returned only after the final flush: now the change
                // ID may be recorded.
                if let Some(d) = self.t.disks.iter().find(|d| d.disk_id == disk_id) {
                    let mut u = self.t.disk_update(d);
                    u.disk_change_id = change_id.clone();
                    u.error_message = Some(None);
                    self.write_disk(u);
                    self.record(Entry::Cbt(CbtRecord {
                        job_id: self.t.job_id.clone(),
                        disk_id: disk_id.to_string(),
                        change_id,
                        previous_change_id: d.previous_change_id.clone(),
                        sync_type: self.t.replication_type,
                        blocks_changed: summary.blocks as i64,
                        bytes_transferred: summary.bytes_transferred as i64,
                        sync_duration_seconds: started.map_or(summary.seconds, |s| s.elapsed().as_secs_f64()),
                        sync_success: true,
                    }));
                }
                let verified = if summary.verified == Some(true) { ", verified" } else { "" };
                self.event(
                    Some(disk_id),
                    "info",
                    format!(
                        "disk copied: {} bytes planned, {} written{verified}",
                        summary.planned_bytes, summary.bytes_written
                    ),
                );
            }
            Err(f) if f.cancelled && self.ending.is_some() => {
                if let Some(d) = self.t.disk_mut(disk_id) {
                    d.copying = false;
                    d.throughput = 0;
                }
            }
            // Not the disk's fault: the job is no longer ours.
            Err(f) if f.fenced => {
                if let Some(d) = self.t.disk_mut(disk_id) {
                    d.copying = false;
                    d.throughput = 0;
                }
                self.end(Ending::Expired, ctx);
            }
            Err(f) => {
                let msg = format!("disk {disk_id}: {}", f.message);
                if let Some(d) = self.t.disk_mut(disk_id) {
                    d.status = DiskStatus::Failed;
                    d.error = Some(f.message.clone());
                    d.copying = false;
                    d.throughput = 0;
                }
                self.persist_disk(disk_id);
                self.event(Some(disk_id), "error", f.message);
                self.end(Ending::Failed(msg), ctx);
            }
        }
        if self.ending.is_some() {
            if self.copiers.is_empty() {
                self.finish(ctx);
            }
        } else if self.t.unfinished().next().is_none() {
            self.finish(ctx);
        } else {
            self.finalizing_if_copied();
            self.on_progress();
        }
    }

    /// Moves the job to `finalizing` once no disk is copying any more (the rest
    /// verify): never while one still streams, because the job cannot move back.
    fn finalizing_if_copied(&mut self) {
        if self.ending.is_none() && self.t.all_copied() {
            self.advance(JobStatus::Finalizing, Operation::Finalize);
        }
    }

    /// Sends a lease renewal; a confirmed one moves the write fence forward,
    /// counting from when it was sent.
    fn renew(&mut self, ctx: &mut Context<Self>) {
        let lease = self.deps.settings.discovery.lease;
        let sent = Instant::now();
        let msg = RenewLease { job_id: self.t.job_id.clone(), owner: self.owner.clone(), lease };
        // No answer by the next renewal counts as no renewal.
        let wait = lease / 3;
        let reply = tokio::time::timeout(wait, self.deps.db.send(msg));
        reply
            .into_actor(self)
            .map(move |res, act, ctx| match res {
                Ok(Ok(Ok(true))) => {
                    act.fence.extend(fence_deadline(sent, lease));
                }
                Ok(Ok(Ok(false))) => {
                    act.fence.revoke();
                    act.end(Ending::Lost, ctx);
                }
                Ok(Ok(Err(e))) => tracing::warn!(
                    job_id = %act.t.job_id,
                    error = %e,
                    "cannot renew the lease; the copies stop in {} unless a renewal succeeds",
                    humantime::format_duration(round_s(act.fence.remaining().unwrap_or_default()))
                ),
                Ok(Err(_)) => {}
                Err(_) => tracing::warn!(
                    job_id = %act.t.job_id,
                    "no answer to a lease renewal within {}; the copies stop in {} unless a renewal succeeds",
                    humantime::format_duration(wait),
                    humantime::format_duration(round_s(act.fence.remaining().unwrap_or_default()))
                ),
            })
            .spawn(ctx);
    }

    /// After any change of figures: persist (throttled), heartbeat, milestones.
    fn on_progress(&mut self) {
        let work = self.t.work();
        if work > self.last_work {
            self.last_work = work;
            self.t.last_progress_at = Some(Utc::now().naive_utc());
            self.deps.watchdog.do_send(Heartbeat { job_id: self.t.job_id.clone(), work });
        }
        while let Some(m) = self.t.take_milestone() {
            self.event(None, "info", format!("{m}% transferred"));
        }
        self.persist_job();
    }
}

impl Actor for JobAggregator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let addr = ctx.address();
        self.deps.watchdog.do_send(Watch { job_id: self.t.job_id.clone(), notify: addr.clone().recipient() });
        if self.t.started_at.is_none() {
            self.t.started_at = Some(Utc::now().naive_utc());
        }
        self.event(None, "info", format!("claimed by {}; run {}", self.owner.node, self.owner.run));
        let first_op = self.t.operation;
        self.advance(JobStatus::Preparing, first_op);
        self.persist_job();

        // Lease renewal; losing the job stops it without touching its rows, and so
        // does a fence that expires because no renewal got through in time.
        let lease = self.deps.settings.discovery.lease;
        ctx.run_interval(lease / 3, |act, ctx| act.renew(ctx));
        ctx.run_interval(FENCE_CHECK, |act, ctx| {
            if act.fence.expired() && !act.ending.as_ref().is_some_and(Ending::gone) {
                act.end(Ending::Expired, ctx);
            }
        });

        let rows = std::mem::take(&mut self.rows);
        for row in rows.iter().filter(|r| r.sync_status.known() != Some(DiskStatus::Completed)) {
            let spec = match self.spec_for(row) {
                Ok(s) => s,
                Err(e) => {
                    if let Some(d) = self.t.disk_mut(&row.disk_id) {
                        d.status = DiskStatus::Failed;
                        d.error = Some(e.clone());
                    }
                    self.persist_disk(&row.disk_id);
                    self.event(Some(&row.disk_id), "error", e.clone());
                    self.end(Ending::Failed(format!("disk {}: {e}", row.disk_id)), ctx);
                    return;
                }
            };
            if spec.resume_from > 0 {
                self.event(Some(&row.disk_id), "info", format!("resuming from offset {}", spec.resume_from));
            }
            let copier = DiskCopier::new(
                row.disk_id.clone(),
                Copier::new(spec).with_fence(self.fence.clone()),
                addr.clone().recipient(),
                self.deps.slots.clone(),
            );
            self.copiers.insert(row.disk_id.clone(), copier.start());
        }
        if self.copiers.is_empty() {
            // Every disk had completed before (a resumed job that crashed at the end).
            self.finish(ctx);
        }
    }
}

impl Handler<DiskReport> for JobAggregator {
    type Result = ();

    fn handle(&mut self, r: DiskReport, ctx: &mut Context<Self>) {
        match r.kind {
            DiskReportKind::Planned(info) => {
                if let Some(d) = self.t.disk_mut(&r.disk_id) {
                    // Bytes below the checkpoint count as done from here on.
                    d.set_plan(info.planned_bytes, info.done_bytes);
                    d.capacity = info.disk_size;
                    d.blocks = info.blocks;
                    d.skipped = info.skipped_bytes;
                }
                self.event(
                    Some(&r.disk_id),
                    "info",
                    format!(
                        "planned: {} bytes to read in {} ranges, {} to zero, of {}",
                        info.planned_bytes, info.blocks, info.zero_bytes, info.disk_size
                    ),
                );
                self.persist_disk(&r.disk_id);
                if self.t.planned_now() && !self.transfer_started && self.ending.is_none() {
                    self.transfer_started = true;
                    self.advance(JobStatus::Streaming, Operation::StartExports);
                    for c in self.copiers.values() {
                        c.do_send(StartTransfer);
                    }
                }
                self.on_progress();
            }
            DiskReportKind::Started => {
                if let Some(d) = self.t.disk_mut(&r.disk_id) {
                    d.copying = true;
                    d.status = DiskStatus::Streaming;
                }
                self.disk_started.insert(r.disk_id.clone(), Instant::now());
                self.advance(JobStatus::Streaming, Operation::Transfer);
                self.persist_disk(&r.disk_id);
            }
            DiskReportKind::Progress(s) => {
                let waiting =
                    self.transfer_started
                        && self.t.disks.iter().any(|d| {
                            d.disk_id == r.disk_id && d.planned_known && !d.copying && !d.status.is_terminal()
                        });
                if waiting {
                    self.t.waiting += 1;
                }
                if let Some(d) = self.t.disk_mut(&r.disk_id) {
                    d.apply(&s);
                }
                if s.stage == Stage::Verifying {
                    self.finalizing_if_copied();
                }
                self.persist_disk(&r.disk_id);
                self.on_progress();
            }
            DiskReportKind::Engine(Event::Checkpoint { watermark }) => {
                if let Some(d) = self.t.disk_mut(&r.disk_id) {
                    d.watermark = d.watermark.max(watermark);
                }
                self.persist_disk(&r.disk_id);
            }
            DiskReportKind::Engine(e) => {
                // Retries (a few rows per kind and minute: the engine folds them),
                // reconnections, a target without flush, a source without extents.
                if let Some(line) = e.describe() {
                    self.event(Some(&r.disk_id), if e.is_warning() { "warn" } else { "info" }, line);
                }
            }
            DiskReportKind::Finished(result) => self.on_finished(&r.disk_id, result, ctx),
        }
    }
}

impl Handler<Stalled> for JobAggregator {
    type Result = ();
    fn handle(&mut self, m: Stalled, ctx: &mut Context<Self>) {
        let secs = m.idle.as_secs();
        let shown = humantime::format_duration(std::time::Duration::from_secs(secs));
        // Name the disks and what they were waiting for.
        let waits: String = self
            .t
            .unfinished()
            .filter_map(|d| d.waiting_on.as_ref().map(|w| format!("; disk {}: {w}", d.disk_id)))
            .collect();
        self.end(
            Ending::Failed(format!("no progress was made for {shown}; the job was stopped by the watchdog{waits}")),
            ctx,
        );
    }
}

impl Handler<CancelJob> for JobAggregator {
    type Result = ();
    fn handle(&mut self, _: CancelJob, ctx: &mut Context<Self>) {
        self.end(Ending::Cancelled("cancelled by operator".into()), ctx);
    }
}

impl Handler<Suspend> for JobAggregator {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Suspend, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.suspend_waiters.push(tx);
        self.end(Ending::Suspended, ctx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<GetLive> for JobAggregator {
    type Result = MessageResult<GetLive>;
    fn handle(&mut self, _: GetLive, _: &mut Context<Self>) -> Self::Result {
        let t = &self.t;
        let now = Utc::now();
        MessageResult(LiveJob {
            job_id: t.job_id.clone(),
            replication_type: t.replication_type,
            status: t.status,
            operation: t.operation.as_str().to_string(),
            started_at: t.started_at,
            total_bytes: t.planned(),
            bytes_transferred: t.done(),
            throughput_bps: t.throughput(),
            percent: t.percent(),
            eta_seconds: t.eta_seconds(),
            retries: t.disks.iter().map(|d| d.retries).sum(),
            disks: t
                .disks
                .iter()
                .map(|d| LiveDisk {
                    disk_id: d.disk_id.clone(),
                    label: d.label.clone(),
                    status: d.status,
                    planned_bytes: d.planned,
                    bytes_transferred: d.done.min(d.planned),
                    throughput_bps: d.throughput,
                    percent: d.percent(),
                    connected: d.copying,
                    connected_at: self
                        .disk_started
                        .get(&d.disk_id)
                        .filter(|_| d.copying)
                        .and_then(|at| chrono::TimeDelta::from_std(at.elapsed()).ok())
                        .map(|ago| (now - ago).naive_utc()),
                    retries: d.retries,
                    previous_change_id: d.previous_change_id.clone(),
                    change_id: d.change_id.clone(),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(kind: ReplicationType) -> Job {
        let now = Utc::now().naive_utc();
        Job {
            id: "job-1".into(),
            vm_name: "vm1".into(),
            vm_path: None,
            replication_type: kind.into(),
            status: JobStatus::Pending.into(),
            current_operation: None,
            progress_percent: 0.0,
            setup_progress_percent: 0.0,
            bytes_transferred: 0,
            total_bytes: 0,
            transfer_speed_bps: 0,
            eta_seconds: None,
            nbd_export_name: None,
            error_message: None,
            owner_node: None,
            lease_expires_at: None,
            owner_run: None,
            last_progress_at: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            completed_at: None,
        }
    }

    fn disk(id: &str, status: DiskStatus, planned: i64) -> Disk {
        Disk {
            id: 0,
            job_id: "job-1".into(),
            disk_id: id.into(),
            label: None,
            source_uri: "nbd://s/".into(),
            target_uri: "nbd://t/".into(),
            destination_is_zero: false,
            keep_allocated: false,
            capacity_bytes: 0,
            planned_bytes: planned,
            bytes_synced: 0,
            skipped_bytes: 0,
            sync_status: status.into(),
            sync_progress_percent: 0.0,
            throughput_bps: 0,
            dirty_bitmap: None,
            changed_areas: None,
            previous_change_id: None,
            change_id: None,
            disk_change_id: None,
            resume_offset: 0,
            error_message: None,
            updated_at: Utc::now().naive_utc(),
        }
    }

    fn snap(done: u64, planned: u64, bps: u64) -> Snapshot {
        Snapshot {
            stage: Stage::Copying,
            disk_size: planned * 2,
            planned_bytes: planned,
            bytes_done: done,
            bytes_written: done,
            zeroed_bytes: 0,
            skipped_bytes: 0,
            verified_bytes: 0,
            durable_watermark: 0,
            retries: 0,
            elapsed: std::time::Duration::ZERO,
            throughput_bps: bps,
            eta: None,
            waiting_on: None,
        }
    }

    fn plan_all(t: &mut JobTracker, planned: &[u64]) {
        for (d, p) in t.disks.iter_mut().zip(planned) {
            d.planned = *p;
            d.planned_known = true;
            d.copying = true;
        }
    }

    #[test]
    fn job_figures_are_sums_of_bytes_not_averages_of_percentages() {
        let mut t = JobTracker::new(
            &job(ReplicationType::Full),
            &[disk("a", DiskStatus::Pending, 0), disk("b", DiskStatus::Pending, 0)],
            "c".into(),
        )
        .unwrap();
        plan_all(&mut t, &[100, 900]);
        t.disk_mut("a").unwrap().apply(&snap(100, 100, 10));
        t.disk_mut("b").unwrap().apply(&snap(0, 900, 30));
        // Averaging percentages would say 50 %; the job has moved 100 of 1000 bytes.
        assert_eq!(t.percent(), 10.0);
        assert_eq!(t.done(), 100);
        assert_eq!(t.throughput(), 40);
        assert_eq!(t.eta_seconds(), Some(900 / 40 + 1));
    }

    #[test]
    fn percent_waits_until_every_disk_is_planned() {
        let mut t = JobTracker::new(
            &job(ReplicationType::Full),
            &[disk("a", DiskStatus::Pending, 0), disk("b", DiskStatus::Pending, 0)],
            "c".into(),
        )
        .unwrap();
        t.disks[0].planned = 100;
        t.disks[0].planned_known = true;
        t.disks[0].done = 100;
        assert_eq!(t.percent(), 0.0, "b's size is unknown: no honest percentage yet");
        assert_eq!(t.eta_seconds(), None);
        t.disks[1].planned = 100;
        t.disks[1].planned_known = true;
        assert_eq!(t.percent(), 50.0);
    }

    #[test]
    fn completed_disks_of_a_resumed_job_count_as_done() {
        let t = JobTracker::new(
            &job(ReplicationType::Full),
            &[disk("a", DiskStatus::Completed, 400), disk("b", DiskStatus::Streaming, 600)],
            "c".into(),
        )
        .unwrap();
        assert_eq!(t.disks[0].done, 400);
        assert_eq!(t.disks[1].status, DiskStatus::Pending, "an interrupted disk starts over from its checkpoint");
        assert_eq!(t.unfinished().count(), 1);
    }

    #[test]
    fn milestones_are_announced_once_each() {
        let mut t =
            JobTracker::new(&job(ReplicationType::Full), &[disk("a", DiskStatus::Pending, 0)], "c".into()).unwrap();
        plan_all(&mut t, &[1000]);
        let mut seen = Vec::new();
        for done in [50, 99, 100, 250, 260, 999, 1000] {
            t.disk_mut("a").unwrap().apply(&snap(done, 1000, 1));
            while let Some(m) = t.take_milestone() {
                seen.push(m);
            }
        }
        assert_eq!(seen, vec![10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
    }

    #[test]
    fn a_job_that_planned_nothing_is_complete_only_when_its_disks_are() {
        let mut t =
            JobTracker::new(&job(ReplicationType::Full), &[disk("a", DiskStatus::Pending, 0)], "c".into()).unwrap();
        t.disks[0].status = DiskStatus::Failed;
        assert_eq!(t.percent(), 0.0, "failed at connect: nothing was done");
        t.disks[0].status = DiskStatus::Completed;
        assert_eq!(t.percent(), 100.0, "an incremental copy with no changes is done");
    }

    #[test]
    fn work_grows_with_any_kind_of_progress() {
        let mut t =
            JobTracker::new(&job(ReplicationType::Full), &[disk("a", DiskStatus::Pending, 0)], "c".into()).unwrap();
        let w0 = t.work();
        t.disks[0].planned_known = true;
        let w1 = t.work();
        assert!(w1 > w0);
        let mut s = snap(0, 1000, 0);
        s.zeroed_bytes = 4096;
        t.disk_mut("a").unwrap().apply(&s);
        assert!(t.work() > w1, "zeroing is progress even though no planned byte moved");
    }

    #[test]
    fn job_update_carries_the_full_state() {
        let mut t =
            JobTracker::new(&job(ReplicationType::Incremental), &[disk("a", DiskStatus::Pending, 0)], "c".into())
                .unwrap();
        assert_eq!(t.operation, Operation::QueryCbt);
        plan_all(&mut t, &[200]);
        t.disk_mut("a").unwrap().apply(&snap(50, 200, 5));
        let owner = Owner { node: "n1".into(), run: "r1".into() };
        let u = t.job_update(&owner);
        assert_eq!(u.status, Some(JobStatus::Pending));
        assert_eq!(u.progress_percent, Some(25.0));
        assert_eq!((u.bytes_transferred, u.total_bytes), (Some(50), Some(200)));
        assert_eq!(u.owner, Some(owner));
    }

    fn reason(job: &Job, disks: &[Disk]) -> String {
        JobTracker::new(job, disks, "c".into()).err().unwrap_or_default()
    }

    #[test]
    fn a_row_that_cannot_be_run_says_why() {
        let full = job(ReplicationType::Full);
        let ok = disk("a", DiskStatus::Pending, 0);
        assert!(JobTracker::new(&full, std::slice::from_ref(&ok), "c".into()).is_ok());
        let odd = Job { replication_type: crate::db::Word::Unknown("differential".into()), ..full.clone() };
        assert_eq!(
            reason(&odd, std::slice::from_ref(&ok)),
            "unknown replication type 'differential' (expected full or incremental)"
        );
        assert_eq!(reason(&full, &[]), "the job has no disks");
        let weird = Disk { sync_status: crate::db::Word::Unknown("weird".into()), ..ok.clone() };
        assert_eq!(reason(&full, &[ok.clone(), weird]), "disk 'a' has an unknown sync_status 'weird'");
        let no_source = Disk { source_uri: " ".into(), ..disk("b", DiskStatus::Pending, 0) };
        assert_eq!(reason(&full, &[ok.clone(), no_source]), "disk 'b' has no source URI");
        let no_target = Disk { target_uri: String::new(), ..ok.clone() };
        assert_eq!(reason(&full, &[no_target]), "disk 'a' has no target URI");
        let done_elsewhere = Job { status: JobStatus::Completed.into(), ..full.clone() };
        assert_eq!(reason(&done_elsewhere, std::slice::from_ref(&ok)), "cannot run a job in status 'completed'");
        // A completed disk needs no URIs any more.
        let completed = Disk { source_uri: String::new(), ..disk("c", DiskStatus::Completed, 5) };
        assert!(JobTracker::new(&full, &[ok, completed], "c".into()).is_ok());
    }

    #[test]
    fn a_resumed_run_starts_from_what_its_rows_showed() {
        // The rows of a killed run: 700 of 1000 bytes shown, a checkpoint at 580.
        let row = Disk { bytes_synced: 700, resume_offset: 580, ..disk("a", DiskStatus::Streaming, 1000) };
        let mut t = JobTracker::new(&job(ReplicationType::Full), &[row], "c".into()).unwrap();
        assert_eq!(t.percent(), 70.0, "from the first report, before planning");
        assert!(!t.planned_now(), "the transfer still waits for this run's plan");
        assert_eq!(t.take_milestone(), None, "milestones already announced are not repeated");
        // This run's plan: 580 bytes below the checkpoint are done.
        t.disk_mut("a").unwrap().set_plan(1000, 580);
        assert!(t.planned_now());
        assert_eq!((t.percent(), t.done()), (70.0, 700), "not below what was shown");
        t.disk_mut("a").unwrap().apply(&snap(750, 1000, 1));
        assert_eq!(t.percent(), 75.0);
        // Another plan (the source changed): the earlier figures mean nothing.
        t.disk_mut("a").unwrap().set_plan(2000, 0);
        assert_eq!(t.percent(), 0.0);
    }

    #[test]
    fn the_job_is_copied_only_when_every_disk_is() {
        let mut t = JobTracker::new(
            &job(ReplicationType::Full),
            &[disk("a", DiskStatus::Pending, 0), disk("b", DiskStatus::Pending, 0)],
            "c".into(),
        )
        .unwrap();
        plan_all(&mut t, &[100, 900]);
        let verifying = Snapshot { stage: Stage::Verifying, ..snap(100, 100, 0) };
        t.disk_mut("a").unwrap().apply(&verifying);
        t.disk_mut("b").unwrap().apply(&snap(300, 900, 5));
        assert!(!t.all_copied(), "b still streams: the job must not be finalizing");
        t.disk_mut("b").unwrap().status = DiskStatus::Completed;
        assert!(t.all_copied());
    }

    #[test]
    fn the_fence_closes_before_the_databases_lease_runs_out() {
        let sent = Instant::now();
        let lease = std::time::Duration::from_secs(120);
        let deadline = fence_deadline(sent, lease);
        assert_eq!(deadline - sent, std::time::Duration::from_secs(90));
        assert!(deadline < sent + lease);
    }
}
