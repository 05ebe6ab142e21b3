//! The decisions of one job's run, as plain data: [`JobRun`] takes what happened
//! (the claim's rows, a disk's report, a lost lease, a cancel, a stall, a
//! shutdown) and returns what to do as [`Effect`]s, in order: rows to write, log
//! lines, copies to start or cancel, and at last whether to release the lease.
//! The JobAggregator carries them out and does nothing else of its own.
//!
//! Which status follows is decided here and nowhere else: `preparing` on the
//! claim, `streaming` once every disk is planned, `finalizing` only when every
//! disk is past copying (the job cannot move back), and one outcome, written
//! once, when the last copy stopped: `completed` when every disk did, `failed`
//! or `cancelled` (with the unfinished disks), or, on shutdown, the figures as
//! they are, resumable. A job that is no longer ours (the database refused a
//! renewal, or the write fence expired on this machine's clock) gets not one
//! more row: every write passes [`JobRun::may_write`] when it is decided.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::job_tracker::JobTracker;
use super::messages::{CopyFailure, DiskReportKind};
use crate::config::Settings;
use crate::db::{CbtRecord, Disk, DiskUpdate, JobUpdate, NewJobEvent, Owner};
use crate::engine::{Changes, CopySpec, Event, Fence, Stage, Summary, plan};
use crate::state::{DiskStatus, JobStatus, Operation, ReplicationType};

/// How long after a renewal (or the claim) was sent the job's write fence stays
/// open: the lease minus a quarter of it. The database's lease runs from when it
/// executed the statement, later than it was sent, so this deadline always comes
/// first; the quarter covers clock-rate differences and requests still on their
/// way to a target when the fence closes.
pub fn fence_deadline(sent: Instant, lease: Duration) -> Instant {
    sent + lease - lease / 4
}

/// Why the job is stopping before its disks completed.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
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
    pub fn gone(&self) -> bool {
        matches!(self, Ending::Lost | Ending::Expired)
    }
}

/// How loud a log line is (and the `level` of its event row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// One thing the actor does, in the order given.
#[derive(Debug)]
pub enum Effect {
    /// A line for the log, always (a job that is no longer ours still says why
    /// it stopped); its row, if it may be written, is a separate [`Effect::Event`].
    Log { disk: Option<String>, level: Level, message: String },
    /// A `job_events` row, written as the job's owner.
    Event(NewJobEvent),
    /// The job's full row state (it carries its owner).
    Job(JobUpdate),
    /// A disk's row state, written as the job's owner.
    Disk(DiskUpdate),
    /// A `cbt_history` row, written as the job's owner.
    Cbt(CbtRecord),
    /// Start a DiskCopier for the disk, behind the job's write fence.
    StartCopy { disk_id: String, spec: CopySpec },
    /// Every disk is planned: tell every copier to copy.
    StartTransfer,
    /// Tell every copier still running to stop.
    CancelCopies,
    /// The job's work counter grew (for the watchdog).
    Heartbeat(u64),
    /// The job is over: stop watching it, release its lease if `release` (after
    /// its last rows), tell discovery, answer whoever waits, stop the actor.
    Stop { release: bool },
}

/// The job's run: its tracker, its owner and fence, and how far it got.
#[derive(Debug)]
pub struct JobRun {
    /// The job's figures and state.
    pub t: JobTracker,
    /// Who writes the job's rows: this node, this run.
    owner: Owner,
    /// The engine's write fence for every disk of this run.
    fence: Fence,
    ending: Option<Ending>,
    /// The disks whose copier runs (started, not yet finished).
    running: BTreeSet<String>,
    transfer_started: bool,
    /// The outcome was decided: it is written once.
    finished: bool,
    /// The work counter last reported to the watchdog.
    last_work: u64,
    out: Vec<Effect>,
}

impl JobRun {
    /// The run of a claimed job: `t` its tracker (whose correlation id is the
    /// run of `owner`), `fence` open until the claim's lease deadline.
    pub fn new(t: JobTracker, owner: Owner, fence: Fence) -> Self {
        Self {
            t,
            owner,
            fence,
            ending: None,
            running: BTreeSet::new(),
            transfer_started: false,
            finished: false,
            last_work: 0,
            out: Vec::new(),
        }
    }

    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    pub fn ending(&self) -> Option<&Ending> {
        self.ending.as_ref()
    }

    /// Whether the transfer was started (every disk planned).
    pub fn transfer_started(&self) -> bool {
        self.transfer_started
    }

    /// The job is no longer ours.
    pub fn gone(&self) -> bool {
        self.ending.as_ref().is_some_and(Ending::gone)
    }

    /// Whether the job's rows are still ours to write: the fence is open and the
    /// job was not lost. Every write goes through here.
    pub fn may_write(&self) -> bool {
        !self.fence.expired() && !self.gone()
    }

    // ------------------------------------------------------------ events ----

    /// The claim: `preparing`, and a copy for every disk not yet completed (or
    /// the end, if none is left or a disk cannot be copied).
    pub fn start(&mut self, rows: &[Disk], settings: &Settings) -> Vec<Effect> {
        if self.t.started_at.is_none() {
            self.t.started_at = Some(Utc::now().naive_utc());
        }
        let claimed = format!("claimed by {}; run {}", self.owner.node, self.owner.run);
        self.event(None, Level::Info, claimed);
        let first_op = self.t.operation;
        self.advance(JobStatus::Preparing, first_op);
        self.persist_job();
        for row in rows.iter().filter(|r| r.sync_status.known() != Some(DiskStatus::Completed)) {
            let spec = match spec_for(self.t.replication_type, row, settings) {
                Ok(s) => s,
                Err(e) => {
                    if let Some(d) = self.t.disk_mut(&row.disk_id) {
                        d.status = DiskStatus::Failed;
                        d.error = Some(e.clone());
                    }
                    self.persist_disk(&row.disk_id);
                    self.event(Some(&row.disk_id), Level::Error, e.clone());
                    self.end(Ending::Failed(format!("disk {}: {e}", row.disk_id)));
                    return self.take();
                }
            };
            if spec.resume_from > 0 {
                self.event(Some(&row.disk_id), Level::Info, format!("resuming from offset {}", spec.resume_from));
            }
            self.running.insert(row.disk_id.clone());
            self.out.push(Effect::StartCopy { disk_id: row.disk_id.clone(), spec });
        }
        if self.running.is_empty() {
            // Every disk had completed before (a resumed job that crashed at the end).
            self.finish();
        }
        self.take()
    }

    /// A disk's report. `copy_seconds`: how long its copy ran, if it started
    /// (for the CBT history of a finished disk).
    pub fn report(&mut self, disk_id: &str, kind: DiskReportKind, copy_seconds: Option<f64>) -> Vec<Effect> {
        match kind {
            DiskReportKind::Planned(info) => {
                if let Some(d) = self.t.disk_mut(disk_id) {
                    // Bytes below the checkpoint count as done from here on.
                    d.set_plan(info.planned_bytes, info.done_bytes);
                    d.capacity = info.disk_size;
                    d.blocks = info.blocks;
                    d.skipped = info.skipped_bytes;
                }
                self.event(
                    Some(disk_id),
                    Level::Info,
                    format!(
                        "planned: {} bytes to read in {} ranges, {} to zero, of {}",
                        info.planned_bytes, info.blocks, info.zero_bytes, info.disk_size
                    ),
                );
                self.persist_disk(disk_id);
                if self.t.planned_now() && !self.transfer_started && self.ending.is_none() {
                    self.transfer_started = true;
                    self.advance(JobStatus::Streaming, Operation::StartExports);
                    self.out.push(Effect::StartTransfer);
                }
                self.on_progress();
            }
            DiskReportKind::Started => {
                if let Some(d) = self.t.disk_mut(disk_id) {
                    d.copying = true;
                    d.status = DiskStatus::Streaming;
                }
                self.advance(JobStatus::Streaming, Operation::Transfer);
                self.persist_disk(disk_id);
            }
            DiskReportKind::Progress(s) => {
                let waiting = self.transfer_started
                    && self
                        .t
                        .disks
                        .iter()
                        .any(|d| d.disk_id == disk_id && d.planned_known && !d.copying && !d.status.is_terminal());
                if waiting {
                    self.t.waiting += 1;
                }
                if let Some(d) = self.t.disk_mut(disk_id) {
                    d.apply(&s);
                }
                if s.stage == Stage::Verifying {
                    self.finalizing_if_copied();
                }
                self.persist_disk(disk_id);
                self.on_progress();
            }
            DiskReportKind::Engine(Event::Checkpoint { watermark }) => {
                if let Some(d) = self.t.disk_mut(disk_id) {
                    d.watermark = d.watermark.max(watermark);
                }
                self.persist_disk(disk_id);
            }
            DiskReportKind::Engine(e) => {
                // Retries (a few rows per kind and minute: the engine folds them),
                // reconnections, a target without flush, a source without extents.
                if let Some(line) = e.describe() {
                    self.event(Some(disk_id), if e.is_warning() { Level::Warn } else { Level::Info }, line);
                }
            }
            DiskReportKind::Finished(result) => self.on_finished(disk_id, result, copy_seconds),
        }
        self.take()
    }

    /// The watchdog saw no progress for `idle`: fail the job, naming what each
    /// disk was waiting for.
    pub fn stalled(&mut self, idle: Duration) -> Vec<Effect> {
        let shown = humantime::format_duration(Duration::from_secs(idle.as_secs()));
        let waits: String = self
            .t
            .unfinished()
            .filter_map(|d| d.waiting_on.as_ref().map(|w| format!("; disk {}: {w}", d.disk_id)))
            .collect();
        self.end(Ending::Failed(format!(
            "no progress was made for {shown}; the job was stopped by the watchdog{waits}"
        )));
        self.take()
    }

    /// The operator cancelled the job.
    pub fn cancel(&mut self) -> Vec<Effect> {
        self.end(Ending::Cancelled("cancelled by operator".into()));
        self.take()
    }

    /// Shutdown: stop, resumable.
    pub fn suspend(&mut self) -> Vec<Effect> {
        self.end(Ending::Suspended);
        self.take()
    }

    /// The database confirmed a renewal sent at `sent`: the fence moves on.
    pub fn renewed(&self, sent: Instant, lease: Duration) {
        self.fence.extend(fence_deadline(sent, lease));
    }

    /// The database refused a renewal: the job is no longer ours.
    pub fn lease_lost(&mut self) -> Vec<Effect> {
        self.fence.revoke();
        self.end(Ending::Lost);
        self.take()
    }

    /// A look at the fence: once expired, the job stops without another row.
    pub fn check_fence(&mut self) -> Vec<Effect> {
        if self.fence.expired() && !self.gone() {
            self.end(Ending::Expired);
        }
        self.take()
    }

    // --------------------------------------------------------- decisions ----

    fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.out)
    }

    fn on_finished(&mut self, disk_id: &str, result: Result<Summary, CopyFailure>, secs: Option<f64>) {
        self.running.remove(disk_id);
        match result {
            Ok(summary) => {
                if !self.disk_completed(disk_id, &summary, secs) {
                    return;
                }
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
                self.end(Ending::Expired);
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
                self.event(Some(disk_id), Level::Error, f.message);
                self.end(Ending::Failed(msg));
            }
        }
        if self.ending.is_some() {
            if self.running.is_empty() {
                self.finish();
            }
        } else if self.t.unfinished().next().is_none() {
            self.finish();
        } else {
            self.finalizing_if_copied();
            self.on_progress();
        }
    }

    /// A disk's copy succeeded (after the engine's final flush): its row, its
    /// change ID and its CBT history. False if the disk is not the job's.
    fn disk_completed(&mut self, disk_id: &str, summary: &Summary, secs: Option<f64>) -> bool {
        let Some(d) = self.t.disk_mut(disk_id) else { return false };
        d.status = DiskStatus::Completed;
        d.done = summary.planned_bytes;
        d.planned = summary.planned_bytes;
        d.throughput = 0;
        d.copying = false;
        d.watermark = summary.watermark;
        d.blocks = summary.blocks;
        let d = d.clone();
        // The engine returned only after the final flush: now the change ID may
        // be recorded.
        let mut u = self.t.disk_update(&d);
        u.disk_change_id = d.change_id.clone();
        u.error_message = Some(None);
        self.write(Effect::Disk(u));
        self.write(Effect::Cbt(CbtRecord {
            job_id: self.t.job_id.clone(),
            disk_id: disk_id.to_string(),
            change_id: d.change_id.clone(),
            previous_change_id: d.previous_change_id.clone(),
            sync_type: self.t.replication_type,
            blocks_changed: summary.blocks as i64,
            bytes_transferred: summary.bytes_transferred as i64,
            sync_duration_seconds: secs.unwrap_or(summary.seconds),
            sync_success: true,
        }));
        let verified = if summary.verified == Some(true) { ", verified" } else { "" };
        self.event(
            Some(disk_id),
            Level::Info,
            format!(
                "disk copied: {} bytes planned, {} written{verified}",
                summary.planned_bytes, summary.bytes_written
            ),
        );
        true
    }

    /// Ends the job early for `why`: cancels the copies, finishing once they stopped.
    fn end(&mut self, why: Ending) {
        // A job that is no longer ours stays so, whatever ended it first.
        if self.ending.is_none() || why.gone() {
            self.ending = Some(why);
        }
        if !self.running.is_empty() {
            self.out.push(Effect::CancelCopies);
        } else {
            self.finish();
        }
    }

    /// Decides and writes the outcome, and stops; once.
    fn finish(&mut self) {
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
                self.event(None, Level::Info, "Succeeded");
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
                let level = if failed { Level::Error } else { Level::Warn };
                self.event(None, level, format!("{}: {msg}", js.as_api()));
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
                self.event(None, Level::Info, "suspended by shutdown; resumable from its checkpoints");
                self.persist_job();
            }
            Some(Ending::Lost) => {
                self.event(None, Level::Warn, "job no longer ours (lease lost or finished elsewhere); stopped");
            }
            Some(Ending::Expired) => {
                self.event(
                    None,
                    Level::Warn,
                    "lease not renewed in time; stopped writing to the targets and to the job's rows \
                     (resumable from its checkpoints once the lease has expired)",
                );
            }
        }
        if let Some(u) = final_update {
            self.write(Effect::Job(u));
        }
        let release = self.may_write();
        self.out.push(Effect::Stop { release });
    }

    /// Moves the job to `finalizing` once no disk is copying any more (the rest
    /// verify): never while one still streams, because the job cannot move back.
    fn finalizing_if_copied(&mut self) {
        if self.ending.is_none() && self.t.all_copied() {
            self.advance(JobStatus::Finalizing, Operation::Finalize);
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
            self.event(None, Level::Info, format!("{} ({})", status.as_api(), op.as_str()));
            self.persist_job();
        }
    }

    /// After any change of figures: persist (throttled), heartbeat, milestones.
    fn on_progress(&mut self) {
        let work = self.t.work();
        // Not only upwards: bytes a failed flush took back and that are being
        // written again are work too (see `StallTracker::heartbeat`).
        if work != self.last_work {
            self.last_work = work;
            self.t.last_progress_at = Some(Utc::now().naive_utc());
            self.out.push(Effect::Heartbeat(work));
        }
        while let Some(m) = self.t.take_milestone() {
            self.event(None, Level::Info, format!("{m}% transferred"));
        }
        self.persist_job();
    }

    // ----------------------------------------------------------- writing ----

    /// `e`, a write of the job's rows, if they are still ours.
    fn write(&mut self, e: Effect) {
        if self.may_write() {
            self.out.push(e);
        }
    }

    fn event(&mut self, disk: Option<&str>, level: Level, message: impl Into<String>) {
        let message = message.into();
        self.out.push(Effect::Log { disk: disk.map(str::to_string), level, message: message.clone() });
        self.write(Effect::Event(NewJobEvent {
            job_id: self.t.job_id.clone(),
            disk_id: disk.map(str::to_string),
            correlation_id: self.t.correlation_id.clone(),
            level: level.as_str().to_string(),
            stage: self.t.operation.as_str().to_string(),
            message,
            created_at: Some(Utc::now().naive_utc()),
        }));
    }

    fn persist_job(&mut self) {
        let u = self.t.job_update(&self.owner);
        self.write(Effect::Job(u));
    }

    fn persist_disk(&mut self, disk_id: &str) {
        if let Some(d) = self.t.disks.iter().find(|d| d.disk_id == disk_id) {
            let u = self.t.disk_update(d);
            self.write(Effect::Disk(u));
        }
    }
}

/// What the engine is to do for a disk row of a job of `kind`, or why it cannot.
pub fn spec_for(kind: ReplicationType, row: &Disk, settings: &Settings) -> Result<CopySpec, String> {
    let changes = match kind {
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
    Ok(CopySpec {
        source: row.source_uri.clone(),
        target: row.target_uri.clone(),
        changes,
        destination_is_zero: row.destination_is_zero,
        allocated: row.keep_allocated,
        allow_no_flush: settings.copy.allow_no_flush,
        resume_from: row.resume_offset.max(0) as u64,
        verify: settings.copy.verify,
        tuning: settings.tuning(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::job_tracker::tests::{disk, job, snap, two_disks};
    use crate::engine::Snapshot;
    use crate::engine::copy::PlanInfo;

    const HOUR: Duration = Duration::from_secs(3600);

    fn run_of(kind: ReplicationType, rows: &[Disk]) -> JobRun {
        let t = JobTracker::new(&job(kind), rows, "r1".into()).unwrap();
        let owner = Owner { node: "n1".into(), run: "r1".into() };
        JobRun::new(t, owner, Fence::until(Instant::now() + HOUR))
    }

    /// A run of `rows` that was claimed and started its copies.
    fn started(rows: &[Disk], settings: &Settings) -> (JobRun, Vec<Effect>) {
        let mut run = run_of(ReplicationType::Full, rows);
        let effects = run.start(rows, settings);
        (run, effects)
    }

    /// A run of `rows` whose disks are planned (100 bytes each) and copying.
    fn copying(rows: &[Disk]) -> JobRun {
        let (mut run, _) = started(rows, &Settings::defaults());
        for r in rows {
            run.report(&r.disk_id, DiskReportKind::Planned(planned(100)), None);
        }
        for r in rows {
            run.report(&r.disk_id, DiskReportKind::Started, None);
        }
        assert_eq!(run.t.status, JobStatus::Streaming);
        run
    }

    fn planned(bytes: u64) -> PlanInfo {
        PlanInfo {
            disk_size: bytes * 2,
            planned_bytes: bytes,
            blocks: 1,
            zero_bytes: 0,
            skipped_bytes: 0,
            done_bytes: 0,
            unmapped_bytes: 0,
        }
    }

    fn summary(planned: u64) -> Summary {
        Summary {
            disk_size: planned * 2,
            planned_bytes: planned,
            bytes_transferred: planned,
            bytes_written: planned,
            zeroed_bytes: 0,
            skipped_bytes: 0,
            blocks: 1,
            retries: 0,
            seconds: 1.0,
            throughput_bps: planned,
            verified: None,
            watermark: planned * 2,
            unmapped_bytes: 0,
            flushed: true,
        }
    }

    fn ok(planned: u64) -> DiskReportKind {
        DiskReportKind::Finished(Ok(summary(planned)))
    }

    fn failed(message: &str, cancelled: bool, fenced: bool) -> DiskReportKind {
        DiskReportKind::Finished(Err(CopyFailure { message: message.into(), cancelled, fenced }))
    }

    fn cancelled() -> DiskReportKind {
        failed("cancelled", true, false)
    }

    /// The writes among `effects`, one short line each: what reaches the database.
    fn writes(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Job(u) => Some(format!("job {}", u.status.map_or("-", JobStatus::as_db))),
                Effect::Disk(u) => Some(format!("disk {} {}", u.disk_id, u.sync_status.map_or("-", DiskStatus::as_db))),
                Effect::Cbt(c) => Some(format!("cbt {}", c.disk_id)),
                Effect::Event(e) => Some(format!("event {}", e.message)),
                _ => None,
            })
            .collect()
    }

    /// The actions among `effects` other than writes and log lines.
    fn actions(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::StartCopy { disk_id, .. } => Some(format!("start {disk_id}")),
                Effect::StartTransfer => Some("transfer".into()),
                Effect::CancelCopies => Some("cancel".into()),
                Effect::Stop { release } => Some(if *release { "stop, release" } else { "stop, keep lease" }.into()),
                _ => None,
            })
            .collect()
    }

    /// The last job row among `effects`.
    fn last_job(effects: &[Effect]) -> Option<&JobUpdate> {
        effects.iter().rev().find_map(|e| match e {
            Effect::Job(u) => Some(u),
            _ => None,
        })
    }

    /// The status and error message of the last job row among `effects`.
    fn outcome(effects: &[Effect]) -> (Option<JobStatus>, Option<&str>) {
        last_job(effects).map_or((None, None), |u| (u.status, u.error_message.as_deref()))
    }

    fn disk_rows<'a>(effects: &'a [Effect], id: &str) -> Vec<&'a DiskUpdate> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Disk(u) if u.disk_id == id => Some(u),
                _ => None,
            })
            .collect()
    }

    fn logs(effects: &[Effect]) -> Vec<&str> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Log { message, .. } => Some(message.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_claim_prepares_the_job_and_starts_a_copy_per_unfinished_disk() {
        let rows = [disk("a", DiskStatus::Completed, 10), disk("b", DiskStatus::Pending, 0)];
        let (run, effects) = started(&rows, &Settings::defaults());
        assert_eq!(actions(&effects), ["start b"], "a completed in an earlier run");
        assert_eq!(run.t.status, JobStatus::Preparing);
        assert_eq!(last_job(&effects).and_then(|u| u.status), Some(JobStatus::Preparing));
        assert!(run.t.started_at.is_some());
        assert!(logs(&effects)[0].starts_with("claimed by n1; run r1"));
    }

    #[test]
    fn the_transfer_starts_once_every_disk_is_planned() {
        let rows = two_disks();
        let (mut run, _) = started(&rows, &Settings::defaults());
        let first = run.report("a", DiskReportKind::Planned(planned(100)), None);
        assert!(actions(&first).is_empty(), "b is not planned yet");
        let second = run.report("b", DiskReportKind::Planned(planned(100)), None);
        assert_eq!(actions(&second), ["transfer"]);
        assert_eq!(run.t.status, JobStatus::Streaming);
        assert!(second.iter().any(|e| matches!(e, Effect::Heartbeat(_))), "planning is progress");
    }

    #[test]
    fn a_job_whose_disks_all_copied_completes_and_releases_its_lease() {
        let rows = two_disks();
        let mut run = copying(&rows);
        let a = run.report("a", ok(100), Some(2.5));
        assert_eq!(writes(&a)[..2], ["disk a completed", "cbt a"], "the change ID only after the engine's flush");
        assert!(actions(&a).is_empty(), "b still copies");
        assert_eq!(run.t.status, JobStatus::Streaming);
        let cbt = a.iter().find_map(|e| if let Effect::Cbt(c) = e { Some(c) } else { None }).unwrap();
        assert_eq!(cbt.sync_duration_seconds, 2.5);
        let b = run.report("b", ok(100), None);
        assert_eq!(actions(&b), ["stop, release"]);
        let u = last_job(&b).unwrap();
        assert_eq!(u.status, Some(JobStatus::Completed));
        assert_eq!(u.progress_percent, Some(100.0));
        assert!(u.completed_at.is_some());
        assert!(writes(&b).contains(&"event Succeeded".to_string()));
    }

    #[test]
    fn a_resumed_job_whose_disks_had_all_completed_completes_at_once() {
        let rows = [disk("a", DiskStatus::Completed, 10)];
        let (_, effects) = started(&rows, &Settings::defaults());
        assert_eq!(actions(&effects), ["stop, release"]);
        assert_eq!(last_job(&effects).and_then(|u| u.status), Some(JobStatus::Completed));
    }

    #[test]
    fn a_failed_disk_fails_the_job_once_the_other_copies_stopped() {
        let mut run = copying(&two_disks());
        let a = run.report("a", failed("read at offset 0: I/O error", false, false), None);
        assert_eq!(writes(&a)[..2], ["disk a failed", "event read at offset 0: I/O error"]);
        assert_eq!(actions(&a), ["cancel"], "b must stop before the outcome is written");
        let b = run.report("b", cancelled(), None);
        assert_eq!(actions(&b), ["stop, release"]);
        assert_eq!(outcome(&b), (Some(JobStatus::Failed), Some("disk a: read at offset 0: I/O error")));
        let rows_b = disk_rows(&b, "b");
        assert_eq!(rows_b.last().map(|u| u.sync_status), Some(Some(DiskStatus::Failed)));
        assert_eq!(
            rows_b.last().and_then(|u| u.error_message.clone()),
            Some(Some("disk a: read at offset 0: I/O error".into()))
        );
        assert!(disk_rows(&b, "a").is_empty(), "a's own failure was written already");
    }

    #[test]
    fn a_disk_that_cannot_be_copied_fails_the_job_at_the_claim() {
        // Incremental with neither a dirty bitmap nor changed areas: never a full copy.
        let rows = two_disks();
        let mut run = run_of(ReplicationType::Incremental, &rows);
        let effects = run.start(&rows, &Settings::defaults());
        assert_eq!(actions(&effects), ["stop, release"], "nothing started, nothing to wait for");
        assert_eq!(
            outcome(&effects),
            (
                Some(JobStatus::Failed),
                Some("disk a: incremental copy needs dirty_bitmap or changed_areas; the disk has neither")
            )
        );
    }

    #[test]
    fn a_copy_cancelled_without_being_asked_fails_its_disk() {
        let mut run = copying(&[disk("a", DiskStatus::Pending, 0)]);
        let effects = run.report("a", cancelled(), None);
        assert_eq!(last_job(&effects).and_then(|u| u.status), Some(JobStatus::Failed));
    }

    #[test]
    fn a_cancel_stops_the_copies_and_marks_the_unfinished_disks_cancelled() {
        let mut run = copying(&two_disks());
        let c = run.cancel();
        assert_eq!(actions(&c), ["cancel"]);
        assert!(writes(&c).is_empty(), "the outcome waits for the copies to stop");
        assert!(actions(&run.report("a", cancelled(), None)).is_empty());
        let b = run.report("b", cancelled(), None);
        assert_eq!(actions(&b), ["stop, release"]);
        let u = last_job(&b).unwrap();
        assert_eq!(u.status, Some(JobStatus::Cancelled));
        assert_eq!(u.error_message.as_deref(), Some("cancelled by operator"));
        assert_eq!(u.transfer_speed_bps, Some(0));
        for id in ["a", "b"] {
            assert_eq!(disk_rows(&b, id).last().and_then(|u| u.sync_status), Some(DiskStatus::Cancelled), "{id}");
        }
    }

    #[test]
    fn a_disk_that_finishes_after_the_job_ended_keeps_its_completion() {
        let mut run = copying(&two_disks());
        run.cancel();
        // a's copy completed before it saw the cancel: its data is flushed.
        let a = run.report("a", ok(100), None);
        assert_eq!(writes(&a)[..2], ["disk a completed", "cbt a"]);
        assert!(actions(&a).is_empty(), "b still stops");
        let b = run.report("b", cancelled(), None);
        assert_eq!(last_job(&b).and_then(|u| u.status), Some(JobStatus::Cancelled));
        assert!(disk_rows(&b, "a").is_empty(), "a stays completed");
        assert_eq!(disk_rows(&b, "b").last().and_then(|u| u.sync_status), Some(DiskStatus::Cancelled));
        assert_eq!(run.t.disks[0].status, DiskStatus::Completed);
    }

    #[test]
    fn the_outcome_is_decided_once() {
        let mut run = copying(&[disk("a", DiskStatus::Pending, 0)]);
        run.cancel();
        let stopped = run.report("a", cancelled(), None);
        assert_eq!(actions(&stopped), ["stop, release"]);
        // A shutdown that arrives as the job stops changes nothing.
        let again = run.suspend();
        assert!(again.is_empty(), "{again:?}");
        assert_eq!(run.ending(), Some(&Ending::Cancelled("cancelled by operator".into())));
    }

    #[test]
    fn a_lost_lease_writes_nothing_more_and_keeps_the_lease_unreleased() {
        let mut run = copying(&two_disks());
        let lost = run.lease_lost();
        assert!(run.fence().expired(), "the copies stop writing to their targets at once");
        assert_eq!(actions(&lost), ["cancel"]);
        let mut after = lost;
        after.extend(run.report("a", ok(100), None));
        after.extend(run.report("b", failed("target gone", false, false), None));
        assert!(writes(&after).is_empty(), "not one row of a job that is not ours: {:?}", writes(&after));
        assert_eq!(actions(&after), ["cancel", "stop, keep lease"]);
        assert!(logs(&after).iter().any(|l| l.starts_with("job no longer ours")), "the log still says why");
    }

    #[test]
    fn a_lost_lease_overrides_an_ending_already_decided() {
        let mut run = copying(&[disk("a", DiskStatus::Pending, 0)]);
        run.cancel();
        let mut after = run.lease_lost();
        after.extend(run.report("a", cancelled(), None));
        assert!(writes(&after).is_empty(), "no 'cancelled' row for a job another node owns");
        assert_eq!(actions(&after), ["cancel", "stop, keep lease"]);
        assert_eq!(run.ending(), Some(&Ending::Lost));
    }

    #[test]
    fn an_expired_fence_stops_the_job_without_a_row() {
        let mut run = copying(&two_disks());
        assert!(run.check_fence().is_empty(), "an open fence changes nothing");
        // What the monotonic clock does at the deadline, without waiting for it.
        run.fence().revoke();
        let mut after = run.check_fence();
        assert_eq!(actions(&after), ["cancel"]);
        assert!(run.check_fence().is_empty(), "decided once");
        // The engine stopped each copy at the fence.
        after.extend(run.report("a", failed("write fence expired", false, true), None));
        after.extend(run.report("b", failed("write fence expired", false, true), None));
        assert!(writes(&after).is_empty(), "{:?}", writes(&after));
        assert_eq!(actions(&after).last().map(String::as_str), Some("stop, keep lease"));
        assert_eq!(run.ending(), Some(&Ending::Expired));
        assert!(run.t.disks.iter().all(|d| !d.status.is_terminal()), "resumable: no disk failed");
    }

    #[test]
    fn a_copy_stopped_by_its_fence_ends_the_job_as_expired() {
        let mut run = copying(&two_disks());
        // The engine saw the deadline before the aggregator's own look at the fence.
        run.fence().revoke();
        let a = run.report("a", failed("write fence expired", false, true), None);
        assert_eq!(actions(&a), ["cancel"]);
        assert!(writes(&a).is_empty());
        assert_eq!(run.ending(), Some(&Ending::Expired));
    }

    #[test]
    fn a_renewal_moves_the_fence_forward() {
        let mut run = copying(&[disk("a", DiskStatus::Pending, 0)]);
        let before = run.fence().remaining().unwrap();
        run.renewed(Instant::now(), 3 * HOUR);
        assert!(run.fence().remaining().unwrap() > before);
        assert!(run.check_fence().is_empty());
    }

    #[test]
    fn a_shutdown_leaves_the_job_resumable_and_releases_it() {
        let mut run = copying(&two_disks());
        run.report("a", DiskReportKind::Progress(snap(40, 100, 10)), None);
        let s = run.suspend();
        assert_eq!(actions(&s), ["cancel"]);
        run.report("a", cancelled(), None);
        let b = run.report("b", cancelled(), None);
        assert_eq!(actions(&b), ["stop, release"]);
        let u = last_job(&b).unwrap();
        assert_eq!(u.status, Some(JobStatus::Streaming), "not failed, not cancelled: resumable");
        assert_eq!((u.completed_at, u.error_message.clone()), (None, None));
        assert_eq!(u.progress_percent, Some(20.0), "the figures as they are");
        for id in ["a", "b"] {
            let row = disk_rows(&b, id).pop().unwrap();
            assert_eq!((row.sync_status, row.throughput_bps), (Some(DiskStatus::Streaming), Some(0)), "{id}");
        }
        assert!(writes(&b).iter().any(|w| w.starts_with("event suspended by shutdown")));
    }

    #[test]
    fn the_watchdog_fails_a_stalled_job_naming_what_it_waited_on() {
        let mut run = copying(&two_disks());
        let s = Snapshot { waiting_on: Some("read at offset 0 for 5m".into()), ..snap(10, 100, 0) };
        run.report("a", DiskReportKind::Progress(s), None);
        assert_eq!(actions(&run.stalled(Duration::from_secs(300))), ["cancel"]);
        run.report("a", cancelled(), None);
        let b = run.report("b", cancelled(), None);
        assert_eq!(
            outcome(&b),
            (
                Some(JobStatus::Failed),
                Some(
                    "no progress was made for 5m; the job was stopped by the watchdog; disk a: read at offset 0 for 5m"
                )
            )
        );
    }

    #[test]
    fn with_verify_the_job_is_finalizing_only_when_every_disk_is_copied() {
        let mut settings = Settings::defaults();
        settings.copy.verify = true;
        let rows = two_disks();
        let (mut run, effects) = started(&rows, &settings);
        assert!(effects.iter().all(|e| !matches!(e, Effect::StartCopy { spec, .. } if !spec.verify)));
        for r in &rows {
            run.report(&r.disk_id, DiskReportKind::Planned(planned(100)), None);
            run.report(&r.disk_id, DiskReportKind::Started, None);
        }
        let verifying = |done| Snapshot { stage: Stage::Verifying, ..snap(done, 100, 0) };
        run.report("a", DiskReportKind::Progress(verifying(100)), None);
        assert_eq!(run.t.status, JobStatus::Streaming, "b still streams");
        // b streams on: its updates are taken, the job stays streaming.
        let b = run.report("b", DiskReportKind::Progress(snap(60, 100, 5)), None);
        assert_eq!(last_job(&b).and_then(|u| u.status), Some(JobStatus::Streaming));
        run.report("a", ok(100), None);
        assert_eq!(run.t.status, JobStatus::Streaming, "a is done, b still streams");
        let b = run.report("b", DiskReportKind::Progress(verifying(100)), None);
        assert_eq!(run.t.status, JobStatus::Finalizing);
        assert!(writes(&b).contains(&"job finalizing".to_string()));
        let done = run.report("b", ok(100), None);
        assert_eq!(last_job(&done).and_then(|u| u.status), Some(JobStatus::Completed));
    }
}
