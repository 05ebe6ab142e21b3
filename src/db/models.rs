//! The rows the daemon reads ([`Job`], [`Disk`], [`JobEvent`], [`CbtRecord`]) and
//! the values it writes ([`NewJob`], [`NewDisk`], [`NewJobEvent`], [`JobUpdate`],
//! [`DiskUpdate`]), plus the conversions between database values and the typed
//! states of `crate::state`.
//!
//! DECIMAL(5,2) percentages travel through `BigDecimal` (diesel's `numeric`
//! feature) and are handed out as `f64`: callers compute with floats, and the
//! database keeps two exact decimals. Status and type words are read as a
//! [`Word`]: one the daemon knows, or the exact text an orchestrator wrote, kept
//! so that it can be shown as it is. A row with a word the daemon does not know
//! still lists and loads; it is never guessed at, and never run (see `jobs`).
//! What the functions do with these types lives in `jobs`, `disks` and `events`.

use bigdecimal::num_bigint::BigInt;
use bigdecimal::{BigDecimal, ToPrimitive};
use chrono::{NaiveDateTime, SubsecRound};
use diesel::deserialize::{self, Queryable};
use diesel::mysql::Mysql;
use diesel::prelude::*;
use diesel::sql_types::{Decimal, Text};

use super::schema::{cbt_history, job_events, replication_jobs, vm_disks};
use crate::state::{DiskStatus, JobStatus, Operation, ReplicationType};

/// One `replication_jobs` row.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = replication_jobs, check_for_backend(Mysql))]
pub struct Job {
    pub id: String,
    pub vm_name: String,
    pub vm_path: Option<String>,
    /// A VMware job: the `[vmware.NAME]` section of the configuration naming
    /// the vCenter. `None`: the disks name their NBD sources themselves.
    pub vmware_vcenter: Option<String>,
    /// The VM of a VMware job: its inventory path or instance UUID.
    pub vmware_vm: Option<String>,
    /// The snapshot (managed object id, `snapshot-42`) the daemon made for the
    /// job; cleared once it is removed.
    pub vmware_snapshot: Option<String>,
    pub replication_type: Word<ReplicationType>,
    /// Run incremental disks even when their `previous_change_id` does not
    /// continue the recorded chain (the orchestrator's explicit choice).
    pub skip_change_check: bool,
    /// The job's bandwidth limit in bytes/s; `None` or 0: none (see `engine::limit`).
    pub max_rate: Option<i64>,
    /// `replicating` in the row reads as `Pending`.
    pub status: Word<JobStatus>,
    /// Kept as text: the orchestrator writes its own stages here too (see
    /// `Operation` for the daemon's).
    pub current_operation: Option<String>,
    #[diesel(deserialize_as = Percent)]
    pub progress_percent: f64,
    /// The orchestrator's; the daemon never writes it.
    #[diesel(deserialize_as = Percent)]
    pub setup_progress_percent: f64,
    pub bytes_transferred: i64,
    /// Planned bytes of all disks: the progress denominator.
    pub total_bytes: i64,
    pub transfer_speed_bps: i64,
    pub eta_seconds: Option<i64>,
    pub nbd_export_name: Option<String>,
    pub error_message: Option<String>,
    /// The appliance that runs the job, while its lease lasts.
    pub owner_node: Option<String>,
    pub lease_expires_at: Option<NaiveDateTime>,
    /// The run (claim) that holds the lease, or last held it.
    pub owner_run: Option<String>,
    /// Which attempt of the job this is (1 for a new job; a job queued again
    /// after it ended is a new attempt, a resumed run is not).
    pub attempt: i32,
    pub last_progress_at: Option<NaiveDateTime>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub started_at: Option<NaiveDateTime>,
    pub completed_at: Option<NaiveDateTime>,
}

/// One `vm_disks` row.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = vm_disks, check_for_backend(Mysql))]
pub struct Disk {
    pub id: i64,
    pub job_id: String,
    /// The orchestrator's name for the disk, e.g. `disk-2000`.
    pub disk_id: String,
    pub label: Option<String>,
    /// The virtual disk's device key (2000, ...) in a VMware job.
    pub vmware_disk_key: Option<i32>,
    /// Empty in a VMware job: the daemon serves the disk itself.
    pub source_uri: String,
    pub target_uri: String,
    /// The target reads as zeros (a fresh volume), so zero extents are skipped.
    pub destination_is_zero: bool,
    /// The target is thick-provisioned: zero requests must keep its blocks
    /// allocated (NBD's NO_HOLE flag).
    pub keep_allocated: bool,
    pub capacity_bytes: i64,
    pub planned_bytes: i64,
    pub bytes_synced: i64,
    pub skipped_bytes: i64,
    pub sync_status: Word<DiskStatus>,
    #[diesel(deserialize_as = Percent)]
    pub sync_progress_percent: f64,
    pub throughput_bps: i64,
    /// Incremental input: the source's `qemu:dirty-bitmap:NAME`.
    pub dirty_bitmap: Option<String>,
    /// Incremental input: JSON `[{"start":..,"length":..}]`, parsed by the engine.
    pub changed_areas: Option<String>,
    pub previous_change_id: Option<String>,
    /// The change ID this copy makes the target consistent with.
    pub change_id: Option<String>,
    /// Set to `change_id` only after a successful copy and flush.
    pub disk_change_id: Option<String>,
    /// The durable watermark: resuming from here is safe.
    pub resume_offset: i64,
    pub error_message: Option<String>,
    pub updated_at: NaiveDateTime,
}

/// A job to insert; it starts `pending`, unowned, with zero progress.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub id: String,
    pub vm_name: String,
    pub vm_path: Option<String>,
    pub replication_type: ReplicationType,
    pub nbd_export_name: Option<String>,
    /// A VMware job: the vCenter's section name and the VM.
    pub vmware_vcenter: Option<String>,
    pub vmware_vm: Option<String>,
    /// See [`Job::skip_change_check`].
    pub skip_change_check: bool,
    /// See [`Job::max_rate`].
    pub max_rate: Option<i64>,
}

/// A disk of a [`NewJob`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewDisk {
    pub disk_id: String,
    pub label: Option<String>,
    pub vmware_disk_key: Option<i32>,
    pub source_uri: String,
    pub target_uri: String,
    pub destination_is_zero: bool,
    pub keep_allocated: bool,
    pub dirty_bitmap: Option<String>,
    pub changed_areas: Option<String>,
    pub previous_change_id: Option<String>,
    pub change_id: Option<String>,
}

/// Who may write a job's rows: the node that holds its lease and the run (one
/// claim of the job) it holds it for. Every write of job state the daemon makes
/// names both in its `WHERE`, so a node that lost the job, or an older run of
/// the same node, changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Owner {
    pub node: String,
    pub run: String,
}

/// What to change in a job; `None` leaves a column alone.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobUpdate {
    pub id: String,
    /// When set, the update applies only while this owner holds the job. The
    /// daemon always sets it; `None` is for tests and operators' tools.
    pub owner: Option<Owner>,
    /// Refused (and nothing changed) unless the current status may become this.
    pub status: Option<JobStatus>,
    pub current_operation: Option<Operation>,
    /// Never lowers the stored percentage (`GREATEST`).
    pub progress_percent: Option<f64>,
    /// Never lowers the stored figure (`GREATEST`).
    pub bytes_transferred: Option<i64>,
    pub total_bytes: Option<i64>,
    pub transfer_speed_bps: Option<i64>,
    pub eta_seconds: Option<i64>,
    pub error_message: Option<String>,
    pub last_progress_at: Option<NaiveDateTime>,
    pub started_at: Option<NaiveDateTime>,
    pub completed_at: Option<NaiveDateTime>,
    /// A VMware job's snapshot: `Some(None)` clears it (removed).
    pub vmware_snapshot: Option<Option<String>>,
}

/// What to change in one disk; `None` leaves a column alone.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DiskUpdate {
    pub job_id: String,
    pub disk_id: String,
    pub sync_status: Option<DiskStatus>,
    pub capacity_bytes: Option<i64>,
    pub planned_bytes: Option<i64>,
    /// Never lowers the stored figure (`GREATEST`).
    pub bytes_synced: Option<i64>,
    pub skipped_bytes: Option<i64>,
    /// Never lowers the stored percentage (`GREATEST`).
    pub sync_progress_percent: Option<f64>,
    pub throughput_bps: Option<i64>,
    /// `Some(None)` clears the message (a retried disk), `Some(Some(m))` sets it.
    pub error_message: Option<Option<String>>,
    pub disk_change_id: Option<String>,
    /// The change ID this copy makes the target consistent with (a VMware
    /// disk's, read from the job's snapshot).
    pub change_id: Option<String>,
    /// The durable watermark; never lowers the stored `resume_offset`...
    pub resume_offset: Option<i64>,
    /// ...unless this is set: a copy that starts over (a new snapshot) sets
    /// `resume_offset` as it is.
    pub restart: bool,
}

/// A snapshot a VMware job left behind: the job ended (its own cleanup failed,
/// or it was ended in the database while it ran) with `vmware_snapshot` set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftSnapshot {
    pub job_id: String,
    pub vcenter: String,
    pub vm: String,
    pub snapshot: String,
    /// The run that took it, and last owned the job.
    pub owner_run: String,
}

/// One `cbt_history` row: the audit record of one disk's copy in one attempt
/// of a job that ended (completed, failed or cancelled).
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = cbt_history, check_for_backend(Mysql))]
pub struct CbtRecord {
    pub job_id: String,
    pub disk_id: String,
    /// The job's attempt (`replication_jobs.attempt`) the copy belonged to.
    pub attempt: i32,
    pub change_id: Option<String>,
    pub previous_change_id: Option<String>,
    pub sync_type: ReplicationType,
    /// The number of ranges the copy reads after merging adjacent ones (changed
    /// ranges for an incremental copy, allocated data ranges for a full one), as
    /// planned; 0 when the disk ended before it was planned.
    pub blocks_changed: i64,
    /// Bytes of the planned ranges copied: all of them on success, so far otherwise.
    pub bytes_transferred: i64,
    pub sync_duration_seconds: f64,
    pub sync_success: bool,
}

/// One `job_events` row.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = job_events, check_for_backend(Mysql))]
pub struct JobEvent {
    pub id: i64,
    pub job_id: String,
    pub disk_id: Option<String>,
    /// One per run of a job, so the events of a resumed run can be told apart.
    pub correlation_id: String,
    pub level: String,
    pub stage: String,
    pub message: String,
    pub created_at: NaiveDateTime,
}

/// An event to insert.
#[derive(Debug, Clone, PartialEq, Insertable)]
#[diesel(table_name = job_events, check_for_backend(Mysql))]
pub struct NewJobEvent {
    pub job_id: String,
    pub disk_id: Option<String>,
    pub correlation_id: String,
    pub level: String,
    pub stage: String,
    pub message: String,
    /// When it happened, in UTC; `None` means when it is inserted. Events are
    /// written in batches, so the producer should set it.
    pub created_at: Option<NaiveDateTime>,
}

/// A word read from a status or type column: one the daemon knows, or anything
/// else, kept exactly as it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Word<T> {
    Known(T),
    Unknown(String),
}

impl<T: Copy> Word<T> {
    pub fn known(&self) -> Option<T> {
        match self {
            Word::Known(t) => Some(*t),
            Word::Unknown(_) => None,
        }
    }

    /// The word to show: `shown` of a known value, or the stored text as it is.
    pub fn shown(&self, shown: impl FnOnce(T) -> &'static str) -> String {
        match self {
            Word::Known(t) => shown(*t).to_string(),
            Word::Unknown(s) => s.clone(),
        }
    }
}

impl<T> From<T> for Word<T> {
    fn from(t: T) -> Self {
        Word::Known(t)
    }
}

/// The database values a status filter must match: `pending` also matches the
/// `replicating` that older orchestrators write.
pub(super) fn status_values(statuses: &[JobStatus]) -> Vec<&'static str> {
    let mut values: Vec<&'static str> = statuses.iter().map(|s| s.as_db()).collect();
    if statuses.contains(&JobStatus::Pending) {
        values.push("replicating");
    }
    values
}

/// The statuses of a job that is still running or waiting to run.
pub(super) fn live_statuses() -> Vec<JobStatus> {
    JobStatus::ALL.into_iter().filter(|s| !s.is_terminal()).collect()
}

/// A percentage as DECIMAL(5,2): clamped to 0..=100 (NaN becomes 0) and rounded
/// to two decimals, so the database never rounds or rejects it.
pub(super) fn percent_to_decimal(p: f64) -> BigDecimal {
    // `as` saturates and maps NaN to 0, which is what a percentage wants here.
    let hundredths = (p.clamp(0.0, 100.0) * 100.0).round() as i64;
    BigDecimal::new(BigInt::from(hundredths), 2)
}

/// A time as DATETIME(6) stores it. MariaDB truncates the nanoseconds and MySQL
/// rounds them (possibly into the next second); truncating here makes both store
/// the same value and makes what is read back equal what was written.
pub(super) fn to_micros(t: NaiveDateTime) -> NaiveDateTime {
    t.trunc_subsecs(6)
}

/// Reads a DECIMAL column as `f64` (see the module doc).
pub struct Percent(f64);

impl From<Percent> for f64 {
    fn from(p: Percent) -> f64 {
        p.0
    }
}

impl Queryable<Decimal, Mysql> for Percent {
    type Row = BigDecimal;
    fn build(d: BigDecimal) -> deserialize::Result<Self> {
        d.to_f64().map(Percent).ok_or_else(|| format!("decimal {d} does not fit an f64").into())
    }
}

/// The types a [`Word`] can hold, with their exact (case-sensitive) parsers.
pub trait Parse: Sized {
    fn parse_word(s: &str) -> Option<Self>;
}

impl Parse for JobStatus {
    fn parse_word(s: &str) -> Option<Self> {
        JobStatus::from_db(s)
    }
}

impl Parse for DiskStatus {
    fn parse_word(s: &str) -> Option<Self> {
        DiskStatus::from_db(s)
    }
}

impl Parse for ReplicationType {
    fn parse_word(s: &str) -> Option<Self> {
        ReplicationType::parse(s)
    }
}

/// The CBT history is the daemon's own table: its `sync_type` is always known.
impl Queryable<Text, Mysql> for ReplicationType {
    type Row = String;
    fn build(s: String) -> deserialize::Result<Self> {
        ReplicationType::parse(&s).ok_or_else(|| format!("unknown replication type '{s}'").into())
    }
}

impl<T: Parse> Queryable<Text, Mysql> for Word<T> {
    type Row = String;
    fn build(s: String) -> deserialize::Result<Self> {
        Ok(T::parse_word(&s).map_or(Word::Unknown(s), Word::Known))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(p: f64, expected: &str) {
        let d = percent_to_decimal(p);
        assert_eq!(d, expected.parse::<BigDecimal>().unwrap(), "{p}");
        assert_eq!(d.as_bigint_and_exponent().1, 2, "{p}: not two decimals");
    }

    #[test]
    fn percentages_become_two_exact_decimals() {
        check(0.0, "0.00");
        check(37.0, "37.00");
        check(12.345, "12.35");
        check(99.994, "99.99");
        check(100.0, "100.00");
        check(250.0, "100.00");
        check(-3.0, "0.00");
        check(f64::NAN, "0.00");
    }

    #[test]
    fn pending_filters_also_match_replicating() {
        assert_eq!(status_values(&[JobStatus::Pending]), vec!["pending", "replicating"]);
        assert_eq!(status_values(&[JobStatus::Failed]), vec!["failed"]);
        assert_eq!(live_statuses().len(), 5);
    }
}
