//! The messages the actors exchange, in one place so the conversation between
//! them can be read top to bottom. Each says who sends it and what the reply
//! means. Messages carry plain data (engine snapshots, db rows); nothing here does
//! I/O.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::db::{
    CbtRecord, DbError, Disk, DiskUpdate, Job, JobEvent, JobUpdate, LeftSnapshot, NewDisk, NewJob, NewJobEvent, Owner,
};
use crate::engine::{Event, Snapshot, Summary, copy::PlanInfo};
use crate::state::JobStatus;

// ---------------------------------------------------------------- DbWriter --

/// JobAggregator → DbWriter: the job's latest figures, as its owner (node and
/// run; the update names them). Throttled and coalesced: written when the
/// percentage moved enough, when enough time passed, or at once when the status
/// or the operation changed.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct PersistJob(pub JobUpdate);

/// JobAggregator → DbWriter: one disk's latest figures, its durable watermark
/// (`resume_offset`, never lowered) included, written only while `owner` holds
/// the job. Throttled and coalesced like [`PersistJob`].
#[derive(Message, Debug, Clone, PartialEq)]
#[rtype(result = "()")]
pub struct PersistDisk {
    pub owner: Owner,
    pub update: DiskUpdate,
}

/// JobAggregator → DbWriter: an append-only record (a job event or the CBT row),
/// written in order with the next batch, only while `owner` holds the job.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Record {
    pub owner: Owner,
    pub entry: Entry,
}

#[derive(Debug, Clone)]
pub enum Entry {
    Event(NewJobEvent),
    Cbt(CbtRecord),
}

impl Record {
    pub fn job_id(&self) -> &str {
        match &self.entry {
            Entry::Event(e) => &e.job_id,
            Entry::Cbt(c) => &c.job_id,
        }
    }
}

/// Shutdown → DbWriter: write everything pending now, ignoring the throttle.
/// Replies once written, or with the error that stopped it.
#[derive(Message, Debug)]
#[rtype(result = "Result<(), DbError>")]
pub struct Flush;

/// JobAggregator → DbWriter, as its job ends: replies once nothing of the job
/// waits to be written (its rows, its lease release), or with the error that
/// stopped the writer.
#[derive(Message, Debug)]
#[rtype(result = "Result<(), DbError>")]
pub struct JobWritten {
    pub job_id: String,
}

/// DiscoveryActor → DbWriter: claim up to `limit` ready jobs and load them.
/// Each claim is a new run of its job, with an owner of its own.
#[derive(Message, Debug)]
#[rtype(result = "Result<Vec<Claimed>, DbError>")]
pub struct ClaimJobs {
    pub node: String,
    pub lease: Duration,
    pub limit: i64,
    pub exclude: Vec<String>,
}

/// A claimed job, its disks, and the owner (node and run) that claimed it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job: Job,
    pub disks: Vec<Disk>,
    pub owner: Owner,
    /// For an incremental job: the change ID of each disk's last successful
    /// sync in an earlier job (`db::last_change_ids`); empty for a full one.
    pub chain: BTreeMap<String, Option<String>>,
}

/// JobAggregator → DbWriter: extend our lease. `Renewal::Lost`: stop, the job
/// is no longer ours (another node or run owns it, or it finished elsewhere).
/// Renewals wait for the writer's next batch (a tick at most) and share its
/// statements.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Renewal, DbError>")]
pub struct RenewLease {
    pub job_id: String,
    pub owner: Owner,
    pub lease: Duration,
}

/// The answer to a [`RenewLease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Lost,
    /// Still ours; the row's `max_rate` as it is now, so that an
    /// orchestrator's change reaches the running job.
    Held {
        max_rate: Option<i64>,
    },
}

/// JobAggregator → DbWriter: give the job up (shutdown, or it ended). Written
/// after everything queued for the job.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ReleaseLease {
    pub job_id: String,
    pub owner: Owner,
}

/// The keepalive (systemd's watchdog) → DiscoveryActor, DbWriter: answer, to
/// show that the actor still handles its messages.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Ping;

/// Admin, Discovery → DbWriter: reads and commands answered straight from the
/// database. Reads ([`Query::is_read`]) are answered by the reader threads, on
/// connections of their own; commands keep their place in the writer's queue.
#[derive(Message, Debug)]
#[rtype(result = "Result<QueryResult, DbError>")]
pub enum Query {
    Ping,
    ListJobs {
        status: Option<JobStatus>,
        limit: i64,
    },
    /// By id, or else the newest job with this `nbd_export_name`.
    FindJob {
        key: String,
    },
    CountJobs,
    Submit {
        job: NewJob,
        disks: Vec<NewDisk>,
    },
    /// Cancel a job that no actor of ours is running.
    Cancel {
        job_id: String,
    },
    /// The newest `limit` events of a job.
    Events {
        job_id: String,
        limit: i64,
    },
    /// Discovery's sweep: snapshots VMware jobs left behind.
    LeftSnapshots,
    /// Discovery's sweep: the snapshot was removed; clear the job's column.
    ForgetSnapshot(LeftSnapshot),
    /// The CBT history rows of a job.
    History {
        job_id: String,
    },
    /// The `max_rate` columns of running jobs.
    Limits {
        job_ids: Vec<String>,
    },
    /// Set a job's `max_rate` (0: none, stored as NULL).
    SetMaxRate {
        job_id: String,
        max_rate: u64,
    },
}

impl Query {
    /// Whether the query only reads, so that it need not wait behind the
    /// writer's queue (submit, cancel, setting a limit and forgetting a snapshot
    /// change rows).
    pub fn is_read(&self) -> bool {
        !matches!(
            self,
            Query::Submit { .. } | Query::Cancel { .. } | Query::SetMaxRate { .. } | Query::ForgetSnapshot(_)
        )
    }
}

// Sent one at a time; boxing the loaded job would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum QueryResult {
    Done,
    Jobs(Vec<Job>),
    Job(Option<(Job, Vec<Disk>)>),
    /// Database status words (see `db::count_jobs_by_status`).
    Counts(Vec<(String, i64)>),
    Status(JobStatus),
    Events(Vec<JobEvent>),
    Snapshots(Vec<LeftSnapshot>),
    History(Vec<CbtRecord>),
    /// (job id, `max_rate`) per job found.
    Limits(Vec<(String, Option<i64>)>),
}

/// Anyone → DbWriter: counters for /metrics.
#[derive(Message, Debug)]
#[rtype(result = "DbStats")]
pub struct GetDbStats;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DbStats {
    pub job_updates: u64,
    pub disk_updates: u64,
    pub records: u64,
    pub failures: u64,
    /// Writes waiting (the database is slow or away), with those of the batch
    /// in flight: the writer's backlog.
    pub pending: u64,
    pub available: bool,
}

// ---------------------------------------------------------- DiskCopier ----

/// DiskCopier → JobAggregator: what its engine is doing.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DiskReport {
    pub disk_id: String,
    pub kind: DiskReportKind,
}

#[derive(Debug)]
pub enum DiskReportKind {
    /// Planning is done; the copier waits for [`StartTransfer`].
    Planned(PlanInfo),
    /// It holds a copy slot and is copying.
    Started,
    /// A few times a second while running.
    Progress(Snapshot),
    /// A rare engine event (retry, reconnect, checkpoint, stage).
    Engine(Event),
    /// The engine stopped. `Err` carries the error text, and whether it was a
    /// cancellation we asked for.
    Finished(Result<Summary, CopyFailure>),
}

// ----------------------------------------------------------------- vSphere --

/// JobAggregator → its job's vSphere worker (a thread, over a channel): one
/// step of a VMware job, decided by `JobRun`. Steps run in order; each answers
/// with one [`VsphereDone`].
#[derive(Debug, Clone, PartialEq)]
pub enum VsphereStep {
    /// Log in, find the VM, turn CBT on if it is off.
    Open,
    /// The job's snapshot: `keep` (an earlier run's, from the row) if it still
    /// exists, else a new one; other snapshots this job left behind are removed.
    Snapshot { keep: Option<String> },
    /// The areas to copy of each disk: `"*"` (`since` = `None`, a full copy) or
    /// changed since the disk's previous change ID.
    Query { disks: Vec<AreaQuery> },
    /// Start an NBD server for each disk (`disk_id`, device key) on the
    /// snapshot, on a Unix socket of its own.
    Export { disks: Vec<(String, i32)> },
    /// Stop the NBD servers and remove the job's snapshot: the one this worker
    /// took or kept, else `snapshot` (the row's, from an earlier run).
    Cleanup { snapshot: Option<String> },
}

/// One disk of a [`VsphereStep::Query`].
#[derive(Debug, Clone, PartialEq)]
pub struct AreaQuery {
    pub disk_id: String,
    pub key: i32,
    pub since: Option<String>,
}

/// Discovery's sweep thread → DiscoveryActor: a snapshot a job left behind
/// was removed (or why not).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct SnapshotSwept {
    pub left: LeftSnapshot,
    pub result: Result<(), String>,
}

/// One disk's answer to [`VsphereStep::Query`]: its capacity and areas.
pub type AreasAnswer = Result<(u64, Vec<crate::engine::plan::Area>), String>;

/// The vSphere worker → JobAggregator: how a [`VsphereStep`] went.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct VsphereDone(pub VsphereOutcome);

#[derive(Debug, Clone, PartialEq)]
pub enum VsphereOutcome {
    /// Logged in, the VM found; `cbt_enabled_now`: CBT was off and was turned on.
    Opened { vm: String, cbt_enabled_now: bool },
    /// The snapshot (`reused`: an earlier run's), and each disk's device key
    /// with the change ID the snapshot gives it.
    Snapshotted { snapshot: String, reused: bool, removed: Vec<String>, disks: Vec<(i32, Option<String>)> },
    /// Per disk: its capacity and areas, or why not (one line).
    Queried(Vec<(String, AreasAnswer)>),
    /// Per disk: its NBD source URI, or why not (one line).
    Exported(Vec<(String, Result<String, String>)>),
    /// The snapshot that was removed (`None`: there was none), or why not.
    CleanedUp(Result<Option<String>, String>),
    /// A step failed as a whole (one line naming the vCenter and what failed).
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct CopyFailure {
    pub message: String,
    pub cancelled: bool,
    /// The engine stopped because the job's write fence expired (its lease was
    /// not renewed in time): the job is no longer ours to touch.
    pub fenced: bool,
}

/// JobAggregator → DiskCopier: every disk is planned; copy when a slot is free.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StartTransfer;

/// JobAggregator → DiskCopier: stop copying (within a second), keeping what is
/// durable. The copier still reports `Finished`.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct CancelCopy;

// ------------------------------------------------------- JobAggregator ----

/// TimeoutWatchdog → JobAggregator: no progress for `idle`.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Stalled {
    pub idle: Duration,
}

/// Admin (via DiscoveryActor) → JobAggregator: the operator cancels the job.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct CancelJob;

/// Admin, Discovery → JobAggregator: the job's bandwidth limit is now
/// `max_rate` bytes/s (0: none), as `by` set it; its row says so already.
/// Running copies follow at their next request.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SetLimit {
    pub max_rate: u64,
    pub by: &'static str,
}

/// Shutdown (via DiscoveryActor) → JobAggregator: stop, checkpoint, release the
/// lease and leave the job resumable. Replies when done.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Suspend;

/// Admin → JobAggregator: the live view of the job, fresher than its row.
#[derive(Message, Debug)]
#[rtype(result = "LiveJob")]
pub struct GetLive;

/// A running job as its aggregator sees it.
#[derive(Debug, Clone)]
pub struct LiveJob {
    pub job_id: String,
    pub replication_type: crate::state::ReplicationType,
    pub status: JobStatus,
    pub operation: String,
    /// UTC.
    pub started_at: Option<chrono::NaiveDateTime>,
    pub total_bytes: u64,
    pub bytes_transferred: u64,
    pub throughput_bps: u64,
    pub percent: f64,
    pub eta_seconds: Option<u64>,
    /// Transient failures retried by the engine, over all disks, in this run.
    pub retries: u64,
    /// The bandwidth limit in force (the job's or the appliance's, the lower), bytes/s.
    pub max_rate: Option<u64>,
    /// A disk is held back by the limit: the rate (and so the ETA) is the limit's.
    pub limited: bool,
    pub disks: Vec<LiveDisk>,
}

#[derive(Debug, Clone)]
pub struct LiveDisk {
    pub disk_id: String,
    pub label: Option<String>,
    pub status: crate::state::DiskStatus,
    pub planned_bytes: u64,
    pub bytes_transferred: u64,
    pub throughput_bps: u64,
    pub percent: f64,
    /// Holds a copy slot, its connections to both servers open.
    pub connected: bool,
    /// When it started copying (UTC), while `connected`.
    pub connected_at: Option<chrono::NaiveDateTime>,
    /// Transient failures retried by the engine in this run.
    pub retries: u64,
    pub previous_change_id: Option<String>,
    pub change_id: Option<String>,
}

// -------------------------------------------------------- DiscoveryActor --

/// Admin → DiscoveryActor: look for jobs now instead of at the next tick.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DiscoverNow;

/// JobAggregator → DiscoveryActor: the job's actor is stopping.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct JobEnded {
    pub job_id: String,
}

/// Admin → DiscoveryActor: the aggregator of a job if this node runs it.
#[derive(Message, Debug)]
#[rtype(result = "Option<Addr<super::job_aggregator::JobAggregator>>")]
pub struct FindActive {
    pub job_id: String,
}

/// Admin → DiscoveryActor: ids of the jobs this node runs.
#[derive(Message, Debug)]
#[rtype(result = "Vec<String>")]
pub struct ListActive;

/// Shutdown → DiscoveryActor: claim nothing more, suspend every running job and
/// reply when all have stopped.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StopDiscovery;

/// Shutdown (SIGHUP) → actors: new settings take effect for what comes next.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Reconfigure(pub Arc<crate::config::Settings>);

// ------------------------------------------------------ TimeoutWatchdog ----

/// JobAggregator → TimeoutWatchdog: watch this job from now on.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Watch {
    pub job_id: String,
    pub notify: Recipient<Stalled>,
}

/// JobAggregator → TimeoutWatchdog: `work` (a counter of everything done, which
/// only grows while the job makes progress).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Heartbeat {
    pub job_id: String,
    pub work: u64,
}

/// JobAggregator → TimeoutWatchdog: stop watching.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Unwatch {
    pub job_id: String,
}

/// JobAggregator → DiskCopier: the disk's `Finished` report was handled; stop.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Dismiss;

/// Start-up → DbWriter: apply pending migrations (under the database's named
/// lock). Replies with the versions applied.
#[derive(Message, Debug)]
#[rtype(result = "Result<Vec<String>, DbError>")]
pub struct Migrate;

// ------------------------------------------- DbWriter → its executor ----

/// One write of a batch.
#[derive(Debug, Clone)]
pub enum Write {
    Disk(PersistDisk),
    Record(Record),
    Job(JobUpdate),
    Release(ReleaseLease),
    /// Answered in [`BatchDone::renewals`], in the batch's order.
    Renew(RenewLease),
}

/// DbWriter → executor: write these, in one transaction. The reply says what was done.
#[derive(Message)]
#[rtype(result = "BatchDone")]
pub struct Batch(pub Vec<Write>);

#[derive(Default)]
pub struct BatchDone {
    pub jobs: u64,
    pub disks: u64,
    pub records: u64,
    /// The answers to the batch's renewals, in order (empty when it failed).
    pub renewals: Vec<Renewal>,
    /// Writes not done because the database is unavailable or busy; to be tried again.
    pub unwritten: Vec<Write>,
    pub error: Option<DbError>,
}

impl BatchDone {
    pub fn failed(unwritten: Vec<Write>, error: DbError) -> Self {
        Self { unwritten, error: Some(error), ..Self::default() }
    }

    /// Adds what `other` did (its error aside).
    pub fn add(&mut self, other: BatchDone) {
        self.jobs += other.jobs;
        self.disks += other.disks;
        self.records += other.records;
        self.renewals.extend(other.renewals);
    }
}

/// DbWriter → executor: run a read or a command.
#[derive(Message)]
#[rtype(result = "Result<ExecReply, DbError>")]
pub enum Exec {
    Migrate,
    Query(Query),
    Claim(ClaimJobs),
}

// One reply at a time crosses back from the executor: boxing the larger
// variants would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum ExecReply {
    Migrated(Vec<String>),
    Query(QueryResult),
    Claimed(Vec<Claimed>),
}
