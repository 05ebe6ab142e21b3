//! The figures and state of one job, as plain data: [`DiskTrack`] per disk and
//! [`JobTracker`] over them. Figures are sums of bytes over the disks, never
//! averages of percentages, and the percentage only counts once every disk is
//! planned, so it never goes down when a late disk adds to the total. A disk that
//! plans while it copies counts the part it has not planned yet as if it were
//! all data ([`DiskTrack::unplanned`]), so its growing plan never lowers the
//! percentage either (the engine's `Snapshot::percent` does the same). A resumed
//! run starts from the figures its rows show (see [`DiskTrack::floor`]), so the
//! percentage does not drop when a run restarts from a checkpoint below them.
//!
//! `JobTracker::new` is also the one place that decides whether a claimed row
//! can be run. What the job does next (which status follows, what is written,
//! when it ends) is decided by `JobRun` (`job_run.rs`), around this tracker; no
//! actor, database or clock here.

use crate::db::{Disk, DiskUpdate, Job, JobUpdate, Owner};
use crate::engine::{Snapshot, Stage};
use crate::state::{DiskStatus, JobStatus, Operation, ReplicationType};

/// One disk as the job sees it.
#[derive(Debug, Clone)]
pub struct DiskTrack {
    pub disk_id: String,
    pub label: Option<String>,
    /// The virtual disk's device key, in a VMware job.
    pub vmware_key: Option<i32>,
    pub change_id: Option<String>,
    pub previous_change_id: Option<String>,
    pub status: DiskStatus,
    pub capacity: u64,
    pub planned: u64,
    /// `planned` may be used for the percentage: this run planned the disk, or
    /// an earlier run did (its figures in the row), until this run's plan arrives.
    pub planned_known: bool,
    /// This run's plan arrived (the transfer waits for every disk's), or its
    /// planning started in a copy that plans while it copies.
    pub planned_now: bool,
    /// Bytes of the disk this run's plan has not reached yet (0 once planned):
    /// counted in the percentage's denominator as if all were data.
    pub unplanned: u64,
    pub blocks: u64,
    /// Planned bytes done in this run's count (below its checkpoint included).
    pub done: u64,
    /// What the row showed as done when the job was claimed: the shown figures
    /// never go below it while the plan is the same.
    pub floor: u64,
    /// The planned bytes the row showed when the job was claimed (see
    /// [`DiskTrack::row_planned`]).
    pub claimed_plan: u64,
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
    /// The bandwidth limit holds the copy back (`Snapshot::limited`).
    pub limited: bool,
    /// The request the engine has long waited on, if any (for the watchdog's message).
    pub waiting_on: Option<String>,
    /// How long this run's copy of the disk ran, once it finished (for its
    /// CBT history row).
    pub copy_seconds: Option<f64>,
}

impl DiskTrack {
    /// The disk as its row shows it; `status` is the row's, checked known.
    fn from_row(d: &Disk, status: DiskStatus) -> Self {
        let completed = status == DiskStatus::Completed;
        let planned = d.planned_bytes.max(0) as u64;
        Self {
            disk_id: d.disk_id.clone(),
            label: d.label.clone(),
            vmware_key: d.vmware_disk_key,
            change_id: d.change_id.clone(),
            previous_change_id: d.previous_change_id.clone(),
            // A disk that did not complete starts over (from its checkpoint).
            status: if completed { DiskStatus::Completed } else { DiskStatus::Pending },
            capacity: d.capacity_bytes.max(0) as u64,
            planned,
            planned_known: completed || planned > 0,
            planned_now: completed,
            unplanned: 0,
            blocks: 0,
            done: if completed { planned } else { 0 },
            floor: if completed { planned } else { (d.bytes_synced.max(0) as u64).min(planned) },
            claimed_plan: planned,
            skipped: d.skipped_bytes.max(0) as u64,
            zeroed: 0,
            verified: 0,
            throughput: 0,
            limited: false,
            watermark: d.resume_offset.max(0) as u64,
            stage: None,
            copying: false,
            error: None,
            retries: 0,
            waiting_on: None,
            copy_seconds: None,
        }
    }

    /// The planned bytes shown as done: this run's count, or what the row showed
    /// if that is more, never more than planned.
    pub fn shown_done(&self) -> u64 {
        self.done.max(self.floor).min(self.planned)
    }

    /// The planned bytes the row shows. While this run still plans, its plan
    /// is partial and may be below what an earlier run planned and copied: the
    /// row keeps the earlier plan until this one is larger or complete, as its
    /// bytes synced never go down (the database keeps the larger figure) and
    /// must not exceed its planned bytes.
    pub fn row_planned(&self) -> u64 {
        if self.unplanned > 0 { self.planned.max(self.claimed_plan) } else { self.planned }
    }

    pub fn percent(&self) -> f64 {
        if self.planned_known {
            crate::engine::progress::percent(self.shown_done(), self.planned + self.unplanned)
        } else {
            0.0
        }
    }

    /// This run's plan: the figures of an earlier run stand only if it planned
    /// the same bytes.
    pub(super) fn set_plan(&mut self, planned: u64, done: u64, unplanned: u64) {
        if planned != self.planned {
            self.floor = 0;
        }
        self.planned = planned;
        self.unplanned = unplanned;
        self.done = done;
        self.planned_known = true;
        self.planned_now = true;
    }

    /// Past copying: verifying, done, or finished.
    pub(super) fn copied(&self) -> bool {
        self.status.is_terminal() || matches!(self.stage, Some(Stage::Verifying | Stage::Done))
    }

    pub(super) fn apply(&mut self, s: &Snapshot) {
        if self.status.is_terminal() {
            return;
        }
        self.done = s.bytes_done;
        self.skipped = s.skipped_bytes;
        self.zeroed = s.zeroed_bytes;
        self.verified = s.verified_bytes;
        self.retries = s.retries;
        self.throughput = if self.copying { s.throughput_bps } else { 0 };
        self.limited = self.copying && s.limited;
        self.watermark = self.watermark.max(s.durable_watermark);
        self.waiting_on = s.waiting_on.clone();
        self.stage = Some(s.stage);
        self.unplanned = s.unplanned_bytes;
        if s.planned_bytes > 0 || s.disk_size > 0 {
            if s.planned_bytes != self.planned {
                self.floor = 0;
            }
            self.planned = s.planned_bytes;
            self.capacity = s.disk_size;
        }
    }
}

/// What a VMware job names: the vCenter (a `[vmware.NAME]` section), the VM,
/// and the snapshot the daemon made for it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmwareJob {
    pub vcenter: String,
    /// Inventory path or instance UUID.
    pub vm: String,
    /// The snapshot's managed object id, from the row (an earlier run's) or
    /// taken by this run; `None` once removed.
    pub snapshot: Option<String>,
}

/// The job's state and arithmetic.
#[derive(Debug, Clone)]
pub struct JobTracker {
    pub job_id: String,
    pub correlation_id: String,
    /// The VM the job copies (its disks' change-ID chains are the VM's).
    pub vm_name: String,
    /// Which attempt of the job this run belongs to (for CBT history).
    pub attempt: i32,
    /// The orchestrator allowed incremental disks whose chain is broken.
    pub skip_change_check: bool,
    /// The job's bandwidth limit from its row, bytes/s (0: none).
    pub max_rate: u64,
    pub replication_type: ReplicationType,
    pub status: JobStatus,
    pub operation: Operation,
    pub disks: Vec<DiskTrack>,
    /// A VMware job: the daemon drives vSphere and serves the disks itself.
    pub vmware: Option<VmwareJob>,
    pub started_at: Option<chrono::NaiveDateTime>,
    pub last_progress_at: Option<chrono::NaiveDateTime>,
    /// Last 10 % milestone announced.
    milestone: u32,
    /// Grows while disks wait for a copy slot (waiting is not stalling).
    pub(super) waiting: u64,
}

/// A `max_rate` column as a limit: NULL, 0 or a negative value (which only a
/// hand-written UPDATE can store) mean none.
pub fn row_rate(v: Option<i64>) -> u64 {
    v.filter(|&r| r > 0).map_or(0, |r| (r as u64).min(crate::engine::limit::MAX_RATE))
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
        let vmware = match (job.vmware_vcenter.as_deref().map(str::trim), job.vmware_vm.as_deref().map(str::trim)) {
            (None | Some(""), _) => None,
            (Some(_), None | Some("")) => return Err("a VMware job needs vmware_vm (inventory path or UUID)".into()),
            (Some(vc), Some(vm)) => {
                Some(VmwareJob { vcenter: vc.to_string(), vm: vm.to_string(), snapshot: job.vmware_snapshot.clone() })
            }
        };
        let mut tracks = Vec::with_capacity(disks.len());
        for d in disks {
            let Some(st) = d.sync_status.known() else {
                let word = d.sync_status.shown(DiskStatus::as_db);
                return Err(format!("disk '{}' has an unknown sync_status '{word}'", d.disk_id));
            };
            if st != DiskStatus::Completed {
                if vmware.is_some() {
                    if d.vmware_disk_key.is_none() {
                        return Err(format!("disk '{}' of a VMware job has no vmware_disk_key", d.disk_id));
                    }
                } else if d.source_uri.trim().is_empty() {
                    return Err(format!("disk '{}' has no source URI", d.disk_id));
                }
                if d.target_uri.trim().is_empty() {
                    return Err(format!("disk '{}' has no target URI", d.disk_id));
                }
            }
            tracks.push(DiskTrack::from_row(d, st));
        }
        let operation = match replication_type {
            _ if vmware.is_some() => Operation::EnableCbt,
            ReplicationType::Full => Operation::Discover,
            ReplicationType::Incremental => Operation::QueryCbt,
        };
        let mut t = Self {
            job_id: job.id.clone(),
            correlation_id,
            vm_name: job.vm_name.clone(),
            attempt: job.attempt,
            skip_change_check: job.skip_change_check,
            max_rate: row_rate(job.max_rate),
            replication_type,
            status,
            operation,
            disks: tracks,
            vmware,
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

    /// A disk still plans while it copies.
    pub fn planning(&self) -> bool {
        self.disks.iter().any(|d| d.unplanned > 0 && !d.status.is_terminal())
    }

    fn unplanned(&self) -> u64 {
        self.disks.iter().filter(|d| !d.status.is_terminal()).map(|d| d.unplanned).sum()
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
        if self.planned() + self.unplanned() == 0 {
            // Nothing to read: done only if every disk is (a disk that failed
            // before planning planned nothing, and did nothing).
            let all_done = self.disks.iter().all(|d| d.status == DiskStatus::Completed);
            return if all_done { 100.0 } else { 0.0 };
        }
        crate::engine::progress::percent(self.done(), self.planned() + self.unplanned())
    }

    pub fn eta_seconds(&self) -> Option<u64> {
        let remaining = self.planned().saturating_sub(self.done());
        match self.throughput() {
            _ if !self.all_planned() || self.planning() => None,
            _ if remaining == 0 => Some(0),
            0 => None,
            bps => Some(remaining.div_ceil(bps)),
        }
    }

    /// Everything the job has done; grows while it makes progress of any kind.
    pub fn work(&self) -> u64 {
        // Planning moves too (a resumed run plans below its checkpoint before
        // it copies anything): the unplanned bytes shrink.
        let bytes: u64 = self.disks.iter().map(|d| d.done + d.zeroed + d.skipped + d.verified + d.unplanned).sum();
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
            total_bytes: Some(self.disks.iter().map(DiskTrack::row_planned).sum::<u64>() as i64),
            transfer_speed_bps: Some(self.throughput() as i64),
            eta_seconds: self.eta_seconds().map(|e| e as i64),
            error_message: None,
            last_progress_at: self.last_progress_at,
            started_at: self.started_at,
            completed_at: None,
            vmware_snapshot: self.vmware.as_ref().map(|v| v.snapshot.clone()),
        }
    }

    pub fn disk_update(&self, d: &DiskTrack) -> DiskUpdate {
        DiskUpdate {
            job_id: self.job_id.clone(),
            disk_id: d.disk_id.clone(),
            sync_status: Some(d.status),
            capacity_bytes: Some(d.capacity as i64),
            planned_bytes: Some(d.row_planned() as i64),
            bytes_synced: Some(d.shown_done() as i64),
            skipped_bytes: Some(d.skipped as i64),
            sync_progress_percent: Some(d.percent()),
            throughput_bps: Some(d.throughput as i64),
            error_message: d.error.clone().map(Some),
            disk_change_id: None,
            change_id: self.vmware.as_ref().and(d.change_id.clone()),
            resume_offset: Some(d.watermark as i64),
            restart: false,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use chrono::Utc;

    pub(in crate::actors) fn job(kind: ReplicationType) -> Job {
        let now = Utc::now().naive_utc();
        Job {
            id: "job-1".into(),
            vm_name: "vm1".into(),
            vm_path: None,
            vmware_vcenter: None,
            vmware_vm: None,
            vmware_snapshot: None,
            replication_type: kind.into(),
            skip_change_check: false,
            max_rate: None,
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
            attempt: 1,
            last_progress_at: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            completed_at: None,
        }
    }

    pub(in crate::actors) fn disk(id: &str, status: DiskStatus, planned: i64) -> Disk {
        Disk {
            id: 0,
            job_id: "job-1".into(),
            disk_id: id.into(),
            label: None,
            vmware_disk_key: None,
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

    /// Two pending disks, `a` and `b`, not yet planned.
    pub(in crate::actors) fn two_disks() -> Vec<Disk> {
        vec![disk("a", DiskStatus::Pending, 0), disk("b", DiskStatus::Pending, 0)]
    }

    pub(in crate::actors) fn snap(done: u64, planned: u64, bps: u64) -> Snapshot {
        Snapshot {
            stage: Stage::Copying,
            disk_size: planned * 2,
            planned_bytes: planned,
            unplanned_bytes: 0,
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
            limited: false,
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
        let mut t = JobTracker::new(&job(ReplicationType::Full), &two_disks(), "c".into()).unwrap();
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
        let mut t = JobTracker::new(&job(ReplicationType::Full), &two_disks(), "c".into()).unwrap();
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
        t.disk_mut("a").unwrap().set_plan(1000, 580, 0);
        assert!(t.planned_now());
        assert_eq!((t.percent(), t.done()), (70.0, 700), "not below what was shown");
        t.disk_mut("a").unwrap().apply(&snap(750, 1000, 1));
        assert_eq!(t.percent(), 75.0);
        // Another plan (the source changed): the earlier figures mean nothing.
        t.disk_mut("a").unwrap().set_plan(2000, 0, 0);
        assert_eq!(t.percent(), 0.0);
    }

    #[test]
    fn a_resumed_run_that_plans_while_it_copies_keeps_the_earlier_plan_in_its_rows() {
        // The rows of a killed run: 700 of 1000 bytes synced.
        let row = Disk { bytes_synced: 700, resume_offset: 580, ..disk("a", DiskStatus::Streaming, 1000) };
        let mut t = JobTracker::new(&job(ReplicationType::Full), &[row], "c".into()).unwrap();
        let owner = Owner { node: "n1".into(), run: "r1".into() };
        // This run has planned 200 bytes so far, 900 of the disk still unasked.
        let planning = Snapshot { stage: Stage::Planning, unplanned_bytes: 900, ..snap(150, 200, 5) };
        t.disk_mut("a").unwrap().apply(&planning);
        let d = t.disk_update(&t.disks[0]);
        assert_eq!(d.planned_bytes, Some(1000), "the row's 700 bytes synced stay within its planned bytes");
        assert_eq!(t.job_update(&owner).total_bytes, Some(1000));
        // The plan completes: its own figure from then on.
        t.disk_mut("a").unwrap().apply(&snap(800, 990, 5));
        assert_eq!(t.disk_update(&t.disks[0]).planned_bytes, Some(990));
        assert_eq!(t.job_update(&owner).total_bytes, Some(990));
        // A first run's growing plan is shown as it grows.
        let mut first = JobTracker::new(&job(ReplicationType::Full), &two_disks(), "c".into()).unwrap();
        first.disk_mut("a").unwrap().apply(&planning);
        assert_eq!(first.disk_update(&first.disks[0]).planned_bytes, Some(200));
    }

    #[test]
    fn the_job_is_copied_only_when_every_disk_is() {
        let mut t = JobTracker::new(&job(ReplicationType::Full), &two_disks(), "c".into()).unwrap();
        plan_all(&mut t, &[100, 900]);
        let verifying = Snapshot { stage: Stage::Verifying, ..snap(100, 100, 0) };
        t.disk_mut("a").unwrap().apply(&verifying);
        t.disk_mut("b").unwrap().apply(&snap(300, 900, 5));
        assert!(!t.all_copied(), "b still streams: the job must not be finalizing");
        t.disk_mut("b").unwrap().status = DiskStatus::Completed;
        assert!(t.all_copied());
    }
}
