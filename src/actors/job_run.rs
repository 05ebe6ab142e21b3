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

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::Utc;

use super::chain;
use super::job_tracker::{DiskTrack, JobTracker};
use super::messages::{AreaQuery, AreasAnswer, CopyFailure, DiskReportKind, VsphereOutcome, VsphereStep};
use crate::config::Settings;
use crate::db::{CbtRecord, Disk, DiskUpdate, JobUpdate, NewJobEvent, Owner};
use crate::engine::{Changes, CopySpec, Event, Fence, Stage, Summary, plan};
use crate::state::{DiskStatus, JobStatus, Operation, ReplicationType};
use crate::vmware::{CopyKind, DiskAreas};

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
    /// A VMware job: hand a step to the job's vSphere worker (started with the
    /// first); its answer comes back to [`JobRun::vsphere`].
    Vsphere(VsphereStep),
    /// The job is over: stop watching it, release its lease if `release` (after
    /// its last rows), tell discovery, answer whoever waits, stop the actor.
    Stop { release: bool },
}

/// Where a VMware job's snapshot cleanup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Cleanup {
    #[default]
    NotYet,
    Running,
    Done,
}

/// A VMware job's run: the vSphere steps come first (EnableCBT, Snapshot,
/// QueryCBT, StartExports), then the copies; the snapshot is removed before
/// the outcome is written (Cleanup).
#[derive(Debug, Default)]
struct VmRun {
    /// The copy of each unfinished disk, its source and plan still to come.
    specs: BTreeMap<String, CopySpec>,
    areas: BTreeMap<String, DiskAreas>,
    cleanup: Cleanup,
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
    /// A VMware job (whose vCenter is configured): its vSphere side.
    vm: Option<VmRun>,
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
            vm: None,
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
    /// the end, if none is left or a disk cannot be copied). `chain`: for each
    /// disk, the change ID of its last successful sync in an earlier job (see
    /// `db::last_change_ids`); an incremental disk that does not continue it
    /// fails here, before any copy starts, unless the job skips the check.
    pub fn start(
        &mut self,
        rows: &[Disk],
        settings: &Settings,
        chain: &BTreeMap<String, Option<String>>,
    ) -> Vec<Effect> {
        if self.t.started_at.is_none() {
            self.t.started_at = Some(Utc::now().naive_utc());
        }
        let claimed = format!("claimed by {}; run {}", self.owner.node, self.owner.run);
        self.event(None, Level::Info, claimed);
        let first_op = self.t.operation;
        self.advance(JobStatus::Preparing, first_op);
        self.persist_job();
        // Every disk is checked before anything starts, so that a disk that
        // cannot be copied as its rows say (a broken change-ID chain, a missing
        // change source) fails the job before vSphere is asked or a target is
        // opened.
        let unfinished: Vec<&Disk> =
            rows.iter().filter(|r| r.sync_status.known() != Some(DiskStatus::Completed)).collect();
        let vmware = self.t.vmware.is_some();
        let mut specs = Vec::new();
        for row in &unfinished {
            // A VMware disk's change source is vCenter, asked later.
            let spec = if vmware { Ok(None) } else { spec_for(self.t.replication_type, row, settings).map(Some) };
            match spec.and_then(|spec| self.chain_continues(row, chain).map(|()| spec)) {
                Ok(spec) => specs.extend(spec.map(|s| (row.disk_id.clone(), s))),
                Err(e) => return self.fail_at_claim(&row.disk_id, e),
            }
        }
        if vmware {
            self.start_vmware(rows, settings);
            return self.take();
        }
        for (disk_id, spec) in specs {
            if spec.resume_from > 0 {
                self.event(Some(&disk_id), Level::Info, format!("resuming from offset {}", spec.resume_from));
            }
            self.running.insert(disk_id.clone());
            self.out.push(Effect::StartCopy { disk_id, spec });
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
                    d.set_plan(info.planned_bytes, info.done_bytes, info.unplanned_bytes);
                    d.capacity = info.disk_size;
                    d.blocks = info.blocks;
                    d.skipped = info.skipped_bytes;
                }
                let line = if info.unplanned_bytes > 0 {
                    format!(
                        "planning while copying: the source describes its {} bytes as the copy goes",
                        info.disk_size
                    )
                } else {
                    format!(
                        "planned: {} bytes to read in {} ranges, {} to zero, of {}",
                        info.planned_bytes, info.blocks, info.zero_bytes, info.disk_size
                    )
                };
                self.event(Some(disk_id), Level::Info, line);
                self.persist_disk(disk_id);
                if self.t.planned_now() && !self.transfer_started && self.ending.is_none() {
                    self.transfer_started = true;
                    self.advance(JobStatus::Streaming, self.copy_operation(Operation::StartExports));
                    self.out.push(Effect::StartTransfer);
                }
                self.on_progress();
            }
            DiskReportKind::Started => {
                if let Some(d) = self.t.disk_mut(disk_id) {
                    d.copying = true;
                    d.status = DiskStatus::Streaming;
                }
                self.advance(JobStatus::Streaming, self.copy_operation(Operation::Transfer));
                self.persist_disk(disk_id);
            }
            DiskReportKind::Progress(s) => {
                let waiting = self.transfer_started
                    && self
                        .t
                        .disks
                        .iter()
                        .any(|d| d.disk_id == disk_id && d.planned_known && !d.copying && !d.status.is_terminal());
                // Waiting for a copy slot, or held back by the bandwidth limit
                // (a low one may allow a request only every few minutes), is
                // not stalling.
                if waiting || s.limited {
                    self.t.waiting += 1;
                }
                if let Some(d) = self.t.disk_mut(disk_id) {
                    d.apply(&s);
                }
                if s.stage == Stage::Verifying {
                    self.finalizing_if_copied();
                }
                // The last plan completed while copying: Discover is over.
                if self.t.status == JobStatus::Streaming
                    && self.t.operation == Operation::Discover
                    && !self.t.planning()
                    && self.t.disks.iter().any(|d| d.copying)
                {
                    self.advance(JobStatus::Streaming, Operation::Transfer);
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
            DiskReportKind::Engine(Event::Planned { disk_size, planned_bytes, blocks }) => {
                // Also sent by a plan made first, which `Planned` already told.
                let Some(d) = self.t.disk_mut(disk_id) else { return self.take() };
                let late = d.blocks != blocks || d.planned != planned_bytes;
                d.blocks = blocks;
                if late {
                    let line = format!(
                        "planned while copying: {planned_bytes} bytes to read in {blocks} ranges, of {disk_size}"
                    );
                    self.event(Some(disk_id), Level::Info, line);
                }
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

    /// A VMware job's vSphere step ended: the next step, the copies, or the end.
    /// Answers that arrive after the job began to end are dropped (the cleanup
    /// takes care of what they made), except the cleanup's own.
    pub fn vsphere(&mut self, outcome: VsphereOutcome) -> Vec<Effect> {
        if let VsphereOutcome::CleanedUp(r) = outcome {
            self.cleaned_up(r);
            return self.take();
        }
        if self.ending.is_some() || self.vm.is_none() {
            return self.take();
        }
        match outcome {
            VsphereOutcome::Opened { vm, cbt_enabled_now } => {
                if cbt_enabled_now {
                    self.event(
                        None,
                        Level::Warn,
                        format!(
                            "CBT was off on VM {vm}: enabled it; vSphere tracks changes only from the VM's next \
                             stun (this job's snapshot, a power cycle or a vMotion) on"
                        ),
                    );
                }
                self.stage(JobStatus::Snapshotting, Operation::Snapshot);
                let keep = self.t.vmware.as_ref().and_then(|v| v.snapshot.clone());
                self.out.push(Effect::Vsphere(VsphereStep::Snapshot { keep }));
            }
            VsphereOutcome::Snapshotted { snapshot, reused, removed, disks } => {
                self.snapshotted(snapshot, reused, removed, &disks)
            }
            VsphereOutcome::Queried(answers) => self.queried(answers),
            VsphereOutcome::Exported(answers) => self.exported(answers),
            VsphereOutcome::Failed(message) => {
                self.event(None, Level::Error, message.clone());
                self.end(Ending::Failed(message));
            }
            VsphereOutcome::CleanedUp(_) => {}
        }
        if self.ending.is_none() {
            // A step done is progress: a long snapshot is not a stall.
            self.t.waiting += 1;
            self.on_progress();
        }
        self.take()
    }

    /// Whether an incremental disk's `previous_change_id` continues the chain
    /// recorded for its VM and disk (see `chain`), unless the job skips the check.
    fn chain_continues(&self, row: &Disk, chain: &BTreeMap<String, Option<String>>) -> Result<(), String> {
        if self.t.replication_type != ReplicationType::Incremental || self.t.skip_change_check {
            return Ok(());
        }
        let recorded = chain.get(&row.disk_id).map(Option::as_deref);
        chain::check(&self.t.vm_name, &row.disk_id, row.previous_change_id.as_deref(), recorded)
    }

    /// A disk that cannot be copied as its rows say fails the job at the claim,
    /// before anything is written to a target.
    fn fail_at_claim(&mut self, disk_id: &str, e: String) -> Vec<Effect> {
        if let Some(d) = self.t.disk_mut(disk_id) {
            d.status = DiskStatus::Failed;
            d.error = Some(e.clone());
        }
        self.persist_disk(disk_id);
        self.event(Some(disk_id), Level::Error, e.clone());
        self.end(Ending::Failed(format!("disk {disk_id}: {e}")));
        self.take()
    }

    /// The claim of a VMware job: its vCenter must be configured; the unfinished
    /// disks' copies wait for the vSphere steps, which start with EnableCBT.
    fn start_vmware(&mut self, rows: &[Disk], settings: &Settings) {
        let Some(vc) = self.t.vmware.as_ref().map(|v| v.vcenter.clone()) else { return };
        if !settings.vmware.contains_key(&vc) {
            let msg = format!("no [vmware.{vc}] section in the configuration");
            self.event(None, Level::Error, msg.clone());
            self.end(Ending::Failed(msg));
            return;
        }
        let mut vm = VmRun::default();
        for row in rows.iter().filter(|r| r.sync_status.known() != Some(DiskStatus::Completed)) {
            vm.specs.insert(row.disk_id.clone(), spec_of(row, Changes::Full, settings));
        }
        self.vm = Some(vm);
        self.stage(JobStatus::Preparing, Operation::EnableCbt);
        if self.vm.as_ref().is_some_and(|v| v.specs.is_empty()) {
            // Every disk had completed before: only the cleanup is left.
            self.finish();
            return;
        }
        self.out.push(Effect::Vsphere(VsphereStep::Open));
    }

    fn snapshotted(&mut self, snapshot: String, reused: bool, removed: Vec<String>, disks: &[(i32, Option<String>)]) {
        for r in removed {
            self.event(None, Level::Info, format!("removed snapshot {r}, left behind by an earlier run of this job"));
        }
        if let Some(v) = self.t.vmware.as_mut() {
            v.snapshot = Some(snapshot.clone());
        }
        let how = if reused { "kept from the interrupted run" } else { "taken" };
        self.event(None, Level::Info, format!("snapshot {snapshot} {how}"));
        let ids: Vec<String> = self.vm.as_ref().map(|v| v.specs.keys().cloned().collect()).unwrap_or_default();
        let mut queries = Vec::new();
        let mut failed = None;
        for id in ids {
            let Some(d) = self.t.disk_mut(&id) else { continue };
            let key = d.vmware_key.unwrap_or_default();
            d.change_id = disks.iter().find(|(k, _)| *k == key).and_then(|(_, c)| c.clone());
            let (change_id, previous) = (d.change_id.clone(), d.previous_change_id.clone());
            // A new snapshot: the checkpoints of an earlier run are of another
            // state of the disk; the copy starts over.
            let restart = !reused && d.watermark > 0;
            if restart {
                d.watermark = 0;
            }
            if let Some(spec) = self.vm.as_mut().and_then(|v| v.specs.get_mut(&id))
                && restart
            {
                spec.resume_from = 0;
            }
            let since = match (self.t.replication_type, previous) {
                (ReplicationType::Full, _) => Ok(None),
                (ReplicationType::Incremental, Some(p)) if !p.trim().is_empty() => Ok(Some(p)),
                // Never silently a full copy.
                (ReplicationType::Incremental, _) => {
                    Err("an incremental VMware copy needs the disk's previous_change_id".to_string())
                }
            };
            let since = match (change_id, since) {
                (None, _) => {
                    Err(format!("the snapshot {snapshot} gives disk key {key} no change ID (is CBT active on it?)"))
                }
                (Some(_), s) => s,
            };
            match since {
                Ok(since) => {
                    if restart && let Some(d) = self.t.disks.iter().find(|d| d.disk_id == id) {
                        let mut u = self.t.disk_update(d);
                        u.restart = true;
                        self.write(Effect::Disk(u));
                    } else {
                        self.persist_disk(&id);
                    }
                    queries.push(AreaQuery { disk_id: id, key, since })
                }
                Err(e) => {
                    self.fail_disk(&id, e.clone());
                    failed.get_or_insert(format!("disk {id}: {e}"));
                }
            }
        }
        // The snapshot's id is in this write: a restart finds it.
        self.stage(JobStatus::Snapshotting, Operation::QueryCbt);
        match failed {
            Some(msg) => self.end(Ending::Failed(msg)),
            None => self.out.push(Effect::Vsphere(VsphereStep::Query { disks: queries })),
        }
    }

    fn queried(&mut self, answers: Vec<(String, AreasAnswer)>) {
        let kind = match self.t.replication_type {
            ReplicationType::Full => CopyKind::Full,
            ReplicationType::Incremental => CopyKind::Incremental,
        };
        let mut exports = Vec::new();
        let mut failed = None;
        for (id, answer) in answers {
            match answer.and_then(|(cap, raw)| {
                DiskAreas::new(kind, cap, &raw).map_err(|e| format!("vCenter's changed areas: {e}"))
            }) {
                Ok(areas) => {
                    let key = self.t.disks.iter().find(|d| d.disk_id == id).and_then(|d| d.vmware_key);
                    exports.push((id.clone(), key.unwrap_or_default()));
                    if let Some(v) = self.vm.as_mut() {
                        v.areas.insert(id, areas);
                    }
                }
                Err(e) => {
                    self.fail_disk(&id, e.clone());
                    failed.get_or_insert(format!("disk {id}: {e}"));
                }
            }
        }
        if let Some(msg) = failed {
            self.end(Ending::Failed(msg));
            return;
        }
        self.stage(JobStatus::Snapshotting, Operation::StartExports);
        self.out.push(Effect::Vsphere(VsphereStep::Export { disks: exports }));
    }

    fn exported(&mut self, answers: Vec<(String, Result<String, String>)>) {
        let mut failed = None;
        for (id, answer) in answers {
            let spec = self.vm.as_mut().and_then(|v| {
                let areas = v.areas.get(&id)?;
                let mut spec = v.specs.get(&id)?.clone();
                spec.changes = areas.changes(spec.destination_is_zero);
                Some(spec)
            });
            match (answer, spec) {
                (Ok(uri), Some(mut spec)) => {
                    spec.source = uri;
                    if spec.resume_from > 0 {
                        self.event(Some(&id), Level::Info, format!("resuming from offset {}", spec.resume_from));
                    }
                    self.running.insert(id.clone());
                    self.out.push(Effect::StartCopy { disk_id: id, spec });
                }
                (Ok(_), None) => {}
                (Err(e), _) => {
                    self.fail_disk(&id, e.clone());
                    failed.get_or_insert(format!("disk {id}: {e}"));
                }
            }
        }
        if let Some(msg) = failed {
            self.end(Ending::Failed(msg));
        }
    }

    /// A VMware job removes its snapshot before its outcome is written (on a
    /// success, a failure or a cancel). Not on a shutdown (the resumed run keeps
    /// the snapshot), nor when the job is no longer ours. True: wait for it.
    fn cleanup_first(&mut self) -> bool {
        let gone = !self.may_write();
        let suspended = matches!(self.ending, Some(Ending::Suspended));
        let Some(vm) = self.vm.as_mut() else { return false };
        match vm.cleanup {
            Cleanup::Done => false,
            Cleanup::Running => !gone,
            Cleanup::NotYet if gone || suspended => false,
            Cleanup::NotYet => {
                vm.cleanup = Cleanup::Running;
                if self.ending.is_none() {
                    self.advance(JobStatus::Finalizing, Operation::Finalize);
                    self.advance(JobStatus::Finalizing, Operation::PersistChangeIds);
                }
                self.stage(self.t.status, Operation::Cleanup);
                let snapshot = self.t.vmware.as_ref().and_then(|v| v.snapshot.clone());
                self.out.push(Effect::Vsphere(VsphereStep::Cleanup { snapshot }));
                true
            }
        }
    }

    fn cleaned_up(&mut self, result: Result<Option<String>, String>) {
        let Some(vm) = self.vm.as_mut() else { return };
        if vm.cleanup != Cleanup::Running {
            return;
        }
        vm.cleanup = Cleanup::Done;
        match result {
            Ok(Some(s)) => {
                if let Some(v) = self.t.vmware.as_mut() {
                    v.snapshot = None;
                }
                self.event(None, Level::Info, format!("snapshot {s} removed"));
            }
            Ok(None) => {}
            Err(e) => self.event(
                None,
                Level::Warn,
                format!("cannot remove the job's snapshot ({e}); the daemon tries again when it starts"),
            ),
        }
        self.finish();
    }

    /// A disk that cannot be copied: its row says why (one line).
    fn fail_disk(&mut self, disk_id: &str, message: String) {
        if let Some(d) = self.t.disk_mut(disk_id) {
            d.status = DiskStatus::Failed;
            d.error = Some(message.clone());
            d.copying = false;
            d.throughput = 0;
        }
        self.persist_disk(disk_id);
        self.event(Some(disk_id), Level::Error, message);
    }

    // --------------------------------------------------------- decisions ----

    fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.out)
    }

    fn on_finished(&mut self, disk_id: &str, result: Result<Summary, CopyFailure>, secs: Option<f64>) {
        self.running.remove(disk_id);
        if let Some(d) = self.t.disk_mut(disk_id) {
            d.copy_seconds = secs;
        }
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
            attempt: self.t.attempt,
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
        if self.finished || self.cleanup_first() {
            return;
        }
        self.finished = true;
        let now = Some(Utc::now().naive_utc());
        let mut final_update: Option<JobUpdate> = None;
        match self.ending.clone() {
            None => {
                // Every disk completed: its data is flushed and its change ID written
                // (a VMware job said so before its cleanup).
                if self.t.operation != Operation::Cleanup {
                    self.advance(JobStatus::Finalizing, Operation::Finalize);
                    self.advance(JobStatus::Finalizing, Operation::PersistChangeIds);
                }
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
                // The attempt ended: one history row for every disk it did not
                // complete, with what it got done.
                let ended: Vec<CbtRecord> = self
                    .t
                    .disks
                    .iter()
                    .filter(|d| matches!(d.status, DiskStatus::Failed | DiskStatus::Cancelled))
                    .map(|d| self.unfinished_record(d))
                    .collect();
                for r in ended {
                    self.write(Effect::Cbt(r));
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

    /// The CBT history row of a disk whose attempt ended without completing it:
    /// the planned bytes it got done and how long its copy ran.
    fn unfinished_record(&self, d: &DiskTrack) -> CbtRecord {
        CbtRecord {
            job_id: self.t.job_id.clone(),
            disk_id: d.disk_id.clone(),
            attempt: self.t.attempt,
            change_id: d.change_id.clone(),
            previous_change_id: d.previous_change_id.clone(),
            sync_type: self.t.replication_type,
            blocks_changed: d.blocks as i64,
            bytes_transferred: d.shown_done() as i64,
            sync_duration_seconds: d.copy_seconds.unwrap_or(0.0),
            sync_success: false,
        }
    }

    /// Moves the job to `finalizing` once no disk is copying any more (the rest
    /// verify): never while one still streams, because the job cannot move back.
    fn finalizing_if_copied(&mut self) {
        if self.ending.is_none() && self.t.all_copied() {
            self.advance(JobStatus::Finalizing, Operation::Finalize);
        }
    }

    /// A VMware stage: `op`, with `status` unless the job is past it already (a
    /// resumed job that was streaming stays so while it looks at its snapshot).
    fn stage(&mut self, status: JobStatus, op: Operation) {
        let status = if self.t.status.can_become(status) { status } else { self.t.status };
        self.advance(status, op);
    }

    /// The operation of a streaming job: `Discover` while a disk still plans
    /// while it copies (the database's and the API's "planning"), else `op`.
    fn copy_operation(&self, op: Operation) -> Operation {
        if self.t.planning() { Operation::Discover } else { op }
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
    Ok(spec_of(row, changes, settings))
}

/// The copy of a disk row with `changes`; a VMware disk's source is set once
/// its NBD server runs.
fn spec_of(row: &Disk, changes: Changes, settings: &Settings) -> CopySpec {
    CopySpec {
        source: row.source_uri.clone(),
        target: row.target_uri.clone(),
        changes,
        destination_is_zero: row.destination_is_zero,
        allocated: row.keep_allocated,
        allow_no_flush: settings.copy.allow_no_flush,
        resume_from: row.resume_offset.max(0) as u64,
        verify: settings.copy.verify,
        tuning: settings.tuning(),
        // The DiskCopier puts the disk under its job's limit.
        limit: None,
    }
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
        let effects = run.start(rows, settings, &BTreeMap::new());
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
            unplanned_bytes: 0,
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
            planning_seconds: 0.0,
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
                Effect::Vsphere(step) => Some(format!("vsphere {}", step_name(step))),
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
    fn a_job_whose_disk_plans_while_copying_is_in_discover_until_the_plan_is_complete() {
        let rows = [disk("a", DiskStatus::Pending, 0)];
        let (mut run, _) = started(&rows, &Settings::defaults());
        let deferred = PlanInfo { planned_bytes: 0, unplanned_bytes: 1000, ..planned(0) };
        assert_eq!(actions(&run.report("a", DiskReportKind::Planned(deferred), None)), ["transfer"]);
        run.report("a", DiskReportKind::Started, None);
        let op = |run: &JobRun| (run.t.status, run.t.operation);
        assert_eq!(op(&run), (JobStatus::Streaming, Operation::Discover), "copying, still planning");
        let planning = Snapshot { stage: Stage::Planning, unplanned_bytes: 500, ..snap(100, 200, 0) };
        run.report("a", DiskReportKind::Progress(planning), None);
        assert_eq!(op(&run), (JobStatus::Streaming, Operation::Discover));
        // 100 done of at most 200 + 500: the unplanned part counts as data.
        assert_eq!(run.t.percent(), 100.0 * 100.0 / 700.0);
        assert_eq!(run.t.eta_seconds(), None);
        run.report("a", DiskReportKind::Progress(snap(150, 300, 10)), None);
        assert_eq!(op(&run), (JobStatus::Streaming, Operation::Transfer), "planned: Discover is over");
        assert_eq!(run.t.percent(), 50.0);
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
    fn a_copy_held_back_by_its_limit_is_not_stalled() {
        let rows = two_disks();
        let mut run = copying(&rows);
        let held = Snapshot { limited: true, ..snap(10, 100, 0) };
        run.report("a", DiskReportKind::Progress(held.clone()), None);
        // No byte moved, but the limit holds the copy: the watchdog hears of it.
        let again = run.report("a", DiskReportKind::Progress(held), None);
        assert!(again.iter().any(|e| matches!(e, Effect::Heartbeat(_))), "held is not stalled");
        let idle = run.report("a", DiskReportKind::Progress(snap(10, 100, 0)), None);
        assert!(!idle.iter().any(|e| matches!(e, Effect::Heartbeat(_))), "no bytes and no limit: no heartbeat");
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
        let effects = run.start(&rows, &Settings::defaults(), &BTreeMap::new());
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
    // ---- VMware jobs ----------------------------------------------------

    fn step_name(step: &VsphereStep) -> &'static str {
        match step {
            VsphereStep::Open => "open",
            VsphereStep::Snapshot { .. } => "snapshot",
            VsphereStep::Query { .. } => "query",
            VsphereStep::Export { .. } => "export",
            VsphereStep::Cleanup { .. } => "cleanup",
        }
    }

    fn vm_settings() -> Settings {
        let mut s = Settings::defaults();
        let vc = crate::config::Vcenter {
            url: "https://vc.example/sdk".into(),
            user: "u".into(),
            password_file: "/etc/pw".into(),
            thumbprint: String::new(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            task_timeout: Duration::from_secs(1),
            nbd_command: None,
        };
        s.vmware.insert("vc".into(), vc);
        s
    }

    /// A VMware job of `kind` with one disk `a` (key 2000, a fresh target),
    /// claimed: its first step asked.
    fn vm_run(kind: ReplicationType, previous: Option<&str>) -> (JobRun, Vec<Effect>) {
        vm_run_with(kind, previous, false)
    }

    /// [`vm_run`], with the change-ID chain recorded as `previous` continues it,
    /// and the job's `skip_change_check`.
    fn vm_run_with(kind: ReplicationType, previous: Option<&str>, skip: bool) -> (JobRun, Vec<Effect>) {
        let mut j = job(kind);
        j.skip_change_check = skip;
        j.vmware_vcenter = Some("vc".into());
        j.vmware_vm = Some("/DC0/vm/web".into());
        let mut d = disk("a", DiskStatus::Pending, 0);
        d.source_uri = String::new();
        d.vmware_disk_key = Some(2000);
        d.destination_is_zero = true;
        d.previous_change_id = previous.map(str::to_string);
        let rows = [d];
        let t = JobTracker::new(&j, &rows, "r1".into()).unwrap();
        let owner = Owner { node: "n1".into(), run: "r1".into() };
        let mut run = JobRun::new(t, owner, Fence::until(Instant::now() + HOUR));
        let chain = previous.map(|p| ("a".to_string(), Some(p.to_string()))).into_iter().collect();
        let effects = run.start(&rows, &vm_settings(), &chain);
        (run, effects)
    }

    fn snapshotted(reused: bool) -> VsphereOutcome {
        VsphereOutcome::Snapshotted {
            snapshot: "snapshot-7".into(),
            reused,
            removed: vec![],
            disks: vec![(2000, Some("52 aa/2".into()))],
        }
    }

    fn area(start: u64, length: u64) -> plan::Area {
        plan::Area { start, length }
    }

    /// A VMware job whose disk `a` is copying from its NBD server.
    fn vm_copying() -> JobRun {
        let (mut run, _) = vm_run(ReplicationType::Full, None);
        run.vsphere(VsphereOutcome::Opened { vm: "vm-42".into(), cbt_enabled_now: false });
        run.vsphere(snapshotted(false));
        run.vsphere(VsphereOutcome::Queried(vec![("a".into(), Ok((1 << 20, vec![area(0, 65536)])))]));
        run.vsphere(VsphereOutcome::Exported(vec![("a".into(), Ok("nbd+unix:///?socket=/s".into()))]));
        run.report("a", DiskReportKind::Planned(planned(65536)), None);
        run.report("a", DiskReportKind::Started, None);
        run
    }

    #[test]
    fn vmware_a_job_goes_through_the_vsphere_stages_copies_and_cleans_up_before_it_completes() {
        let (mut run, e) = vm_run(ReplicationType::Full, None);
        assert_eq!(actions(&e), ["vsphere open"]);
        assert_eq!((run.t.status, run.t.operation), (JobStatus::Preparing, Operation::EnableCbt));

        let e = run.vsphere(VsphereOutcome::Opened { vm: "vm-42".into(), cbt_enabled_now: true });
        assert!(logs(&e).iter().any(|l| l.contains("CBT was off on VM vm-42") && l.contains("next")), "{e:?}");
        assert_eq!(actions(&e), ["vsphere snapshot"]);
        assert_eq!((run.t.status, run.t.operation), (JobStatus::Snapshotting, Operation::Snapshot));

        let e = run.vsphere(snapshotted(false));
        assert_eq!(last_job(&e).and_then(|u| u.vmware_snapshot.clone()), Some(Some("snapshot-7".into())));
        let query = e
            .iter()
            .find_map(|e| if let Effect::Vsphere(VsphereStep::Query { disks }) = e { Some(disks) } else { None });
        assert_eq!(query, Some(&vec![AreaQuery { disk_id: "a".into(), key: 2000, since: None }]), "full: \"*\"");
        assert_eq!(run.t.operation, Operation::QueryCbt);
        assert_eq!(disk_rows(&e, "a").last().and_then(|u| u.change_id.clone()), Some("52 aa/2".into()));

        let e = run.vsphere(VsphereOutcome::Queried(vec![("a".into(), Ok((1 << 20, vec![area(0, 65536)])))]));
        assert_eq!(actions(&e), ["vsphere export"]);
        assert_eq!(run.t.operation, Operation::StartExports);

        let e = run.vsphere(VsphereOutcome::Exported(vec![("a".into(), Ok("nbd+unix:///?socket=/s".into()))]));
        let spec =
            e.iter().find_map(|e| if let Effect::StartCopy { spec, .. } = e { Some(spec) } else { None }).unwrap();
        assert_eq!(spec.source, "nbd+unix:///?socket=/s");
        assert_eq!(spec.changes, Changes::ChangedAreas(vec![area(0, 65536)]), "planned from vCenter's areas");

        run.report("a", DiskReportKind::Planned(planned(65536)), None);
        run.report("a", DiskReportKind::Started, None);
        let e = run.report("a", ok(65536), None);
        assert_eq!(disk_rows(&e, "a")[0].disk_change_id.as_deref(), Some("52 aa/2"), "after the flush");
        assert_eq!(actions(&e), ["vsphere cleanup"], "the snapshot goes before the outcome");
        assert_eq!((run.t.status, run.t.operation), (JobStatus::Finalizing, Operation::Cleanup));
        assert_eq!(outcome(&e).0, Some(JobStatus::Finalizing));

        let e = run.vsphere(VsphereOutcome::CleanedUp(Ok(Some("snapshot-7".into()))));
        assert_eq!(outcome(&e).0, Some(JobStatus::Completed));
        assert_eq!(last_job(&e).and_then(|u| u.vmware_snapshot.clone()), Some(None), "forgotten once removed");
        assert_eq!(actions(&e), ["stop, release"]);
    }

    #[test]
    fn vmware_an_invalid_change_id_fails_the_disk_and_the_snapshot_is_still_removed() {
        let (mut run, _) = vm_run(ReplicationType::Incremental, Some("52 aa/1"));
        run.vsphere(VsphereOutcome::Opened { vm: "vm-42".into(), cbt_enabled_now: false });
        let e = run.vsphere(snapshotted(false));
        let query = e
            .iter()
            .find_map(|e| if let Effect::Vsphere(VsphereStep::Query { disks }) = e { Some(disks) } else { None });
        assert_eq!(query.unwrap()[0].since.as_deref(), Some("52 aa/1"), "incremental: since the previous change ID");
        let line = "vCenter sim: change ID '52 aa/1' of disk Hard disk 1 (key 2000) is not valid any more";
        let e = run.vsphere(VsphereOutcome::Queried(vec![("a".into(), Err(line.into()))]));
        assert_eq!(disk_rows(&e, "a")[0].error_message, Some(Some(line.into())));
        assert_eq!(actions(&e), ["vsphere cleanup"], "no copy, never a full one");
        let e = run.vsphere(VsphereOutcome::CleanedUp(Ok(Some("snapshot-7".into()))));
        assert_eq!(outcome(&e), (Some(JobStatus::Failed), Some(format!("disk a: {line}").as_str())));
    }

    #[test]
    fn vmware_an_incremental_disk_without_a_previous_change_id_is_never_copied_in_full() {
        // The chain check refuses it at the claim, before vSphere is asked...
        let (_, e) = vm_run(ReplicationType::Incremental, None);
        assert_eq!(actions(&e), ["stop, release"]);
        assert!(outcome(&e).1.is_some_and(|m| m.contains("previous_change_id is not set")), "{e:?}");
        // ...and with the check skipped, the VMware path still does.
        let (mut run, _) = vm_run_with(ReplicationType::Incremental, None, true);
        run.vsphere(VsphereOutcome::Opened { vm: "vm-42".into(), cbt_enabled_now: false });
        let e = run.vsphere(snapshotted(false));
        assert_eq!(actions(&e), ["vsphere cleanup"]);
        assert!(logs(&e).iter().any(|l| l.contains("needs the disk's previous_change_id")), "{e:?}");
    }

    #[test]
    fn vmware_a_cancel_during_the_snapshot_removes_it_then_writes_cancelled() {
        let (mut run, _) = vm_run(ReplicationType::Full, None);
        run.vsphere(VsphereOutcome::Opened { vm: "vm-42".into(), cbt_enabled_now: false });
        let e = run.cancel();
        assert_eq!(actions(&e), ["vsphere cleanup"], "the worker removes what its snapshot step made");
        assert!(
            run.vsphere(snapshotted(false)).iter().all(|e| matches!(e, Effect::Log { .. })),
            "late answers are dropped"
        );
        let e = run.vsphere(VsphereOutcome::CleanedUp(Ok(Some("snapshot-7".into()))));
        assert_eq!(outcome(&e).0, Some(JobStatus::Cancelled));
        assert_eq!(actions(&e), ["stop, release"]);
    }

    #[test]
    fn vmware_a_job_naming_an_unconfigured_vcenter_fails_at_the_claim() {
        let mut j = job(ReplicationType::Full);
        j.vmware_vcenter = Some("elsewhere".into());
        j.vmware_vm = Some("/DC0/vm/web".into());
        let mut d = disk("a", DiskStatus::Pending, 0);
        d.vmware_disk_key = Some(2000);
        let t = JobTracker::new(&j, std::slice::from_ref(&d), "r1".into()).unwrap();
        let mut run =
            JobRun::new(t, Owner { node: "n1".into(), run: "r1".into() }, Fence::until(Instant::now() + HOUR));
        let e = run.start(&[d], &vm_settings(), &BTreeMap::new());
        assert_eq!(outcome(&e), (Some(JobStatus::Failed), Some("no [vmware.elsewhere] section in the configuration")));
        assert_eq!(actions(&e), ["stop, release"], "no vSphere step, nothing to clean up");
        // A VMware disk without a device key cannot be run at all.
        let mut keyless = disk("a", DiskStatus::Pending, 0);
        keyless.source_uri = String::new();
        let err = JobTracker::new(&j, &[keyless], "r1".into()).unwrap_err();
        assert_eq!(err, "disk 'a' of a VMware job has no vmware_disk_key");
    }

    #[test]
    fn vmware_a_shutdown_keeps_the_snapshot_for_the_resumed_run() {
        let mut run = vm_copying();
        assert_eq!(actions(&run.suspend()), ["cancel"]);
        let e = run.report("a", cancelled(), None);
        assert_eq!(actions(&e), ["stop, release"], "no cleanup");
        assert_eq!(last_job(&e).and_then(|u| u.vmware_snapshot.clone()), Some(Some("snapshot-7".into())));
    }

    #[test]
    fn vmware_a_resumed_job_keeps_its_checkpoint_only_on_its_own_snapshot() {
        for (reused, offset) in [(true, 4096), (false, 0)] {
            let (mut run, _) = vm_run(ReplicationType::Full, None);
            run.t.disk_mut("a").unwrap().watermark = 4096;
            if let Some(v) = run.vm.as_mut() {
                v.specs.get_mut("a").unwrap().resume_from = 4096;
            }
            run.vsphere(VsphereOutcome::Opened { vm: "vm-42".into(), cbt_enabled_now: false });
            let e = run.vsphere(snapshotted(reused));
            let restart = disk_rows(&e, "a").iter().any(|u| u.restart && u.resume_offset == Some(0));
            assert_eq!(restart, !reused, "a new snapshot resets the checkpoint");
            run.vsphere(VsphereOutcome::Queried(vec![("a".into(), Ok((1 << 20, vec![area(0, 65536)])))]));
            let e = run.vsphere(VsphereOutcome::Exported(vec![("a".into(), Ok("nbd+unix:///?socket=/s".into()))]));
            let spec =
                e.iter().find_map(|e| if let Effect::StartCopy { spec, .. } = e { Some(spec) } else { None }).unwrap();
            assert_eq!(spec.resume_from, offset, "reused: {reused}");
        }
    }

    /// The CBT history rows among `effects`.
    fn cbt_rows(effects: &[Effect]) -> Vec<&CbtRecord> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Cbt(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    /// An incremental disk `id` with changed areas, relative to `previous`.
    fn incremental(id: &str, previous: Option<&str>) -> Disk {
        Disk {
            changed_areas: Some(r#"[{"start": 0, "length": 4096}]"#.into()),
            previous_change_id: previous.map(str::to_string),
            change_id: Some("cid-2".into()),
            ..disk(id, DiskStatus::Pending, 0)
        }
    }

    fn chain(recorded: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        recorded.iter().map(|(d, c)| (d.to_string(), c.map(str::to_string))).collect()
    }

    #[test]
    fn an_incremental_disk_that_breaks_its_chain_fails_at_the_claim_without_a_copy() {
        let rows = [incremental("a", Some("cid-0")), incremental("b", Some("cid-1"))];
        let mut run = run_of(ReplicationType::Incremental, &rows);
        let effects = run.start(&rows, &Settings::defaults(), &chain(&[("a", Some("cid-1")), ("b", Some("cid-1"))]));
        assert_eq!(actions(&effects), ["stop, release"], "no copy started: nothing reaches a target");
        let (status, msg) = outcome(&effects);
        assert_eq!(status, Some(JobStatus::Failed));
        let msg = msg.unwrap();
        assert!(msg.starts_with("disk a: change ID chain broken: previous_change_id is 'cid-0'"), "{msg}");
        assert!(msg.contains("recorded change_id 'cid-1'"), "{msg}");
        // The attempt ended: rows for both disks, neither a success.
        let rows = cbt_rows(&effects);
        assert_eq!(
            rows.iter().map(|r| (r.disk_id.as_str(), r.sync_success)).collect::<Vec<_>>(),
            [("a", false), ("b", false)]
        );
        assert!(rows.iter().all(|r| r.bytes_transferred == 0 && r.attempt == 1));
        assert!(disk_rows(&effects, "a").iter().all(|u| u.disk_change_id.is_none()));
    }

    #[test]
    fn an_incremental_disk_without_a_recorded_base_fails_at_the_claim() {
        let rows = [incremental("a", Some("cid-1"))];
        let mut run = run_of(ReplicationType::Incremental, &rows);
        let effects = run.start(&rows, &Settings::defaults(), &BTreeMap::new());
        assert_eq!(actions(&effects), ["stop, release"]);
        assert!(outcome(&effects).1.unwrap().contains("no successful sync of vm 'vm1' disk 'a' is recorded"));
    }

    #[test]
    fn an_incremental_disk_that_continues_its_chain_is_copied() {
        let rows = [incremental("a", Some("cid-1"))];
        let mut run = run_of(ReplicationType::Incremental, &rows);
        let effects = run.start(&rows, &Settings::defaults(), &chain(&[("a", Some("cid-1"))]));
        assert_eq!(actions(&effects), ["start a"]);
    }

    #[test]
    fn skip_change_check_copies_despite_a_broken_chain() {
        let rows = [incremental("a", Some("cid-0"))];
        let mut run = run_of(ReplicationType::Incremental, &rows);
        run.t.skip_change_check = true;
        let effects = run.start(&rows, &Settings::defaults(), &chain(&[("a", Some("cid-1"))]));
        assert_eq!(actions(&effects), ["start a"]);
    }

    #[test]
    fn a_failed_attempt_records_each_disk_it_did_not_complete_with_its_bytes_so_far() {
        let mut run = copying(&[
            disk("a", DiskStatus::Pending, 0),
            disk("b", DiskStatus::Pending, 0),
            disk("c", DiskStatus::Pending, 0),
        ]);
        run.t.attempt = 2;
        let c = run.report("c", ok(100), Some(1.0));
        assert_eq!(cbt_rows(&c).len(), 1, "c's success row, at once");
        run.report("a", DiskReportKind::Progress(snap(40, 100, 0)), None);
        let a = run.report("a", failed("read at offset 40: I/O error", false, false), Some(3.5));
        assert!(cbt_rows(&a).is_empty(), "the attempt has not ended while b copies");
        run.report("b", DiskReportKind::Progress(snap(70, 100, 0)), None);
        let b = run.report("b", cancelled(), Some(4.0));
        let rows: Vec<_> = cbt_rows(&b)
            .iter()
            .map(|r| {
                (
                    r.disk_id.as_str(),
                    r.attempt,
                    r.sync_success,
                    r.bytes_transferred,
                    r.sync_duration_seconds,
                    r.blocks_changed,
                )
            })
            .collect();
        assert_eq!(rows, [("a", 2, false, 40, 3.5, 1), ("b", 2, false, 70, 4.0, 1)], "c completed: no second row");
        assert_eq!(outcome(&b).0, Some(JobStatus::Failed));
    }

    #[test]
    fn a_cancelled_attempt_records_its_disks_and_a_shutdown_records_none() {
        let mut run = copying(&two_disks());
        run.cancel();
        run.report("a", cancelled(), None);
        let b = run.report("b", cancelled(), None);
        assert_eq!(
            cbt_rows(&b).iter().map(|r| (r.disk_id.as_str(), r.sync_success)).collect::<Vec<_>>(),
            [("a", false), ("b", false)]
        );
        let mut run = copying(&two_disks());
        let mut all = run.suspend();
        all.extend(run.report("a", cancelled(), None));
        all.extend(run.report("b", cancelled(), None));
        assert!(cbt_rows(&all).is_empty(), "a stopped run resumes the same attempt: no row yet");
    }
}
