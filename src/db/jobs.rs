//! Jobs: inserting, finding and listing them, the leases through which one
//! appliance at a time owns a job, and guarded updates that enforce the state
//! machine of `crate::state` in SQL (`WHERE status IN (predecessors)`), so that
//! two writers racing can never move a terminal job or skip the rules.
//!
//! Ownership: a claim sets `owner_node` and a fresh `owner_run` (one per claim),
//! and every write the daemon makes to a job's rows afterwards names both in its
//! `WHERE` ([`Owner`]), so a node that lost the job, or an older run of the same
//! node, changes nothing. Status words are compared case-sensitively (`BINARY`):
//! MariaDB's default collation would let `PENDING` pass for `pending`, and a word
//! the daemon does not know is never claimed.
//!
//! Lease times are the server's `UTC_TIMESTAMP(6)`, never this machine's clock:
//! appliances sharing a database may disagree about the time, the database does not.
//! Disks, checkpoints and CBT history are in `disks`.

use std::collections::BTreeMap;
use std::time::Duration;

use diesel::dsl::sql;
use diesel::expression::SqlLiteral;
use diesel::mysql::{Mysql, MysqlConnection};
use diesel::prelude::*;
use diesel::query_builder::{QueryFragment, QueryId};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Bool, Datetime, Nullable};

use super::DbError;
use super::models::{Disk, Job, JobUpdate, LeftSnapshot, NewDisk, NewJob, Owner, Word, live_statuses, status_values};
use super::schema::replication_jobs as j;
use super::schema::vm_disks as d;
use crate::state::JobStatus;

/// A pending job whose disks are still missing or incomplete this long after it
/// was created is claimed anyway, and fails with a message saying what is
/// missing, instead of waiting forever. Before that, an orchestrator that inserts
/// the job row and its disks in separate statements is given time to finish.
pub const INCOMPLETE_GRACE: Duration = Duration::from_secs(120);

/// `UTC_TIMESTAMP(6)`, the server's current time in UTC.
fn utc_now() -> SqlLiteral<Datetime> {
    sql("UTC_TIMESTAMP(6)")
}

/// The server's time `lease` from now. A lease too long to express is capped at
/// ten years, which is forever for a job.
fn lease_expiry(lease: Duration) -> SqlLiteral<Nullable<Datetime>, impl QueryFragment<Mysql> + QueryId + Send> {
    sql::<Nullable<Datetime>>("UTC_TIMESTAMP(6) + INTERVAL ").bind::<BigInt, _>(lease_micros(lease)).sql(" MICROSECOND")
}

/// [`lease_expiry`] as SQL text (an integer, so formatting it in is safe).
pub(super) fn lease_expiry_sql(lease: Duration) -> String {
    format!("UTC_TIMESTAMP(6) + INTERVAL {} MICROSECOND", lease_micros(lease))
}

fn lease_micros(lease: Duration) -> i64 {
    const TEN_YEARS_US: i64 = 10 * 366 * 24 * 3600 * 1_000_000;
    i64::try_from(lease.as_micros()).unwrap_or(TEN_YEARS_US).min(TEN_YEARS_US)
}

/// `replication_jobs.status` is exactly one of `statuses` (`pending` also
/// matching `replicating`), compared case-sensitively. The plain `IN` lets the
/// status indexes serve; `BINARY` makes the comparison exact.
fn status_is(statuses: &[JobStatus]) -> SqlLiteral<Bool> {
    sql(&status_in("replication_jobs.status", statuses))
}

/// [`status_is`] as SQL text, for `column`.
pub(super) fn status_in(column: &str, statuses: &[JobStatus]) -> String {
    // The values are the daemon's own status words (lower-case ASCII letters),
    // never input, so writing them into the statement is safe.
    let list = status_values(statuses).iter().map(|v| format!("'{v}'")).collect::<Vec<_>>().join(", ");
    format!("({column} IN ({list}) AND BINARY {column} IN ({list}))")
}

/// The job's rows belong to `owner` (node and run).
pub(super) fn owned_by(owner: &Owner) -> Box<dyn BoxableExpression<j::table, Mysql, SqlType = Nullable<Bool>> + '_> {
    Box::new(j::owner_node.eq(&owner.node).and(j::owner_run.eq(&owner.run)))
}

/// The job may be claimed: nobody holds a lease on it (no owner, or an owner
/// without a lease, which has nothing to honour), or its owner's lease ran out.
/// A node's own name buys nothing: an earlier run of this node may still be
/// writing (a paused process), so its jobs wait for their leases like anyone's.
/// Only `pending` jobs are new work; a job in a later live status is taken over
/// only if a daemon ran it before (`owner_run` is set): one that an orchestrator
/// marked `preparing` or `snapshotting` itself is not ready for us.
fn claimable() -> SqlLiteral<Bool> {
    sql("(replication_jobs.owner_node IS NULL OR replication_jobs.lease_expires_at IS NULL \
         OR replication_jobs.lease_expires_at < UTC_TIMESTAMP(6))")
}

/// New work, or a job a daemon ran before (see [`claimable`]).
fn pending_or_run_before() -> SqlLiteral<Bool> {
    let list = status_values(&[JobStatus::Pending]).iter().map(|v| format!("'{v}'")).collect::<Vec<_>>().join(", ");
    sql(&format!("(BINARY replication_jobs.status IN ({list}) OR replication_jobs.owner_run IS NOT NULL)"))
}

/// A job a daemon ran before that is `pending` again: the orchestrator queued it
/// again after it ended, and its claim starts a new attempt (`attempt + 1`, the
/// last attempt's error and completion time cleared). A run that crashed or was
/// stopped left its job in a later status (`preparing` at least: a run writes it
/// first), and resuming it continues the same attempt.
fn queued_again() -> String {
    let list = status_values(&[JobStatus::Pending]).iter().map(|v| format!("'{v}'")).collect::<Vec<_>>().join(", ");
    format!("(BINARY replication_jobs.status IN ({list}) AND replication_jobs.owner_run IS NOT NULL)")
}

/// Ready to run: at least one disk, each with a source (in a VMware job: a
/// device key; the daemon serves the disk itself) and a target; or incomplete
/// for longer than [`INCOMPLETE_GRACE`] (claimed so that it fails with a
/// message, see the aggregator's validation), unless it is not blockrepl's.
///
/// Not blockrepl's, so never claimed, not even to be failed: a job with a disk
/// that has neither a `source_uri` nor a `target_uri` (a disk row written for
/// another program: an older system's rows in an adopted database get empty
/// ones), and a `replicating` job without disks (older orchestrators write
/// `replicating` only once the target exports exist, so one without disks is
/// the older system's own). See docs/orchestrator.md, "Older status words".
fn ready_or_overdue() -> SqlLiteral<Bool> {
    let missing = |column: &str| format!("(vm_disks.{column} IS NULL OR vm_disks.{column} = '')");
    let no_source = format!(
        "IF(replication_jobs.vmware_vcenter IS NULL, {}, vm_disks.vmware_disk_key IS NULL)",
        missing("source_uri")
    );
    sql(&format!(
        "((EXISTS (SELECT 1 FROM vm_disks WHERE vm_disks.job_id = replication_jobs.id) \
           AND NOT EXISTS (SELECT 1 FROM vm_disks WHERE vm_disks.job_id = replication_jobs.id \
             AND ({no_source} OR {target}))) \
          OR (replication_jobs.created_at < UTC_TIMESTAMP(6) - INTERVAL {grace} SECOND \
              AND NOT EXISTS (SELECT 1 FROM vm_disks WHERE vm_disks.job_id = replication_jobs.id \
                AND {source} AND {target}) \
              AND (BINARY replication_jobs.status = '{pending}' \
                   OR EXISTS (SELECT 1 FROM vm_disks WHERE vm_disks.job_id = replication_jobs.id))))",
        source = missing("source_uri"),
        target = missing("target_uri"),
        grace = INCOMPLETE_GRACE.as_secs(),
        pending = JobStatus::Pending.as_db(),
    ))
}

/// Inserts a job and its disks in one transaction; a job id that exists already
/// is a [`DbError::Conflict`].
pub fn insert_job(conn: &mut MysqlConnection, job: &NewJob, disks: &[NewDisk]) -> Result<(), DbError> {
    conn.transaction(|conn| {
        diesel::insert_into(j::table)
            .values((
                j::id.eq(&job.id),
                j::vm_name.eq(&job.vm_name),
                j::vm_path.eq(&job.vm_path),
                j::replication_type.eq(job.replication_type.as_str()),
                j::skip_change_check.eq(job.skip_change_check),
                j::max_rate.eq(job.max_rate),
                j::status.eq(JobStatus::Pending.as_db()),
                j::nbd_export_name.eq(&job.nbd_export_name),
                j::vmware_vcenter.eq(&job.vmware_vcenter),
                j::vmware_vm.eq(&job.vmware_vm),
            ))
            .execute(conn)
            .map_err(|e| match e {
                DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
                    DbError::Conflict { job: job.id.clone() }
                }
                e => DbError::query(format!("inserting job '{}'", job.id))(e),
            })?;
        let rows: Vec<_> = disks
            .iter()
            .map(|disk| {
                (
                    d::job_id.eq(&job.id),
                    d::disk_id.eq(&disk.disk_id),
                    d::label.eq(&disk.label),
                    d::vmware_disk_key.eq(disk.vmware_disk_key),
                    d::source_uri.eq(&disk.source_uri),
                    d::target_uri.eq(&disk.target_uri),
                    d::destination_is_zero.eq(disk.destination_is_zero),
                    d::keep_allocated.eq(disk.keep_allocated),
                    d::dirty_bitmap.eq(&disk.dirty_bitmap),
                    d::changed_areas.eq(&disk.changed_areas),
                    d::previous_change_id.eq(&disk.previous_change_id),
                    d::change_id.eq(&disk.change_id),
                )
            })
            .collect();
        if !rows.is_empty() {
            diesel::insert_into(d::table)
                .values(rows)
                .execute(conn)
                .map_err(DbError::query(format!("inserting the disks of job '{}'", job.id)))?;
        }
        Ok(())
    })
}

/// Claims up to `limit` jobs for `node` for `lease`, oldest first, skipping
/// `exclude` (the jobs `node` is running already), and returns each claimed id
/// with its new [`Owner`] (a fresh run id).
///
/// Claimable: a live status, matched exactly (`replicating` counts as `pending`
/// and is left as it is: the daemon moves it forward itself; `initializing` and
/// any word the daemon does not know are never claimed); no live lease (see
/// [`claimable`]); and ready, or incomplete for too long (see
/// [`ready_or_overdue`]). Whether a claimed row can actually be run (a known
/// replication type, disks in a known state, ...) is decided by its caller, which
/// fails it alone when it cannot. Each claim is a guarded UPDATE that re-checks
/// everything, and only rows it actually changed count, so two daemons racing for
/// the same job cannot both get it.
pub fn claim_jobs(
    conn: &mut MysqlConnection,
    node: &str,
    lease: Duration,
    limit: i64,
    exclude: &[String],
) -> Result<Vec<(String, Owner)>, DbError> {
    let live = live_statuses();
    let candidates: Vec<String> = j::table
        .select(j::id)
        .filter(status_is(&live))
        .filter(claimable())
        .filter(pending_or_run_before())
        .filter(ready_or_overdue())
        .filter(j::id.ne_all(exclude))
        .order((j::created_at.asc(), j::id.asc()))
        .limit(limit)
        .load(conn)
        .map_err(DbError::query("finding jobs to claim"))?;

    let mut claimed = Vec::with_capacity(candidates.len());
    for id in candidates {
        let owner = Owner { node: node.to_string(), run: uuid::Uuid::new_v4().simple().to_string() };
        let updated = diesel::update(j::table)
            .filter(j::id.eq(&id))
            .filter(status_is(&live))
            .filter(claimable())
            .filter(pending_or_run_before())
            // MariaDB assigns left to right, each expression seeing the columns
            // as assigned so far: the new-attempt test reads the old `owner_run`,
            // so these come before it.
            .set((
                j::attempt
                    .eq(sql::<diesel::sql_types::Integer>(&format!("IF({}, attempt + 1, attempt)", queued_again()))),
                j::error_message.eq(sql::<Nullable<diesel::sql_types::Text>>(&format!(
                    "IF({}, NULL, error_message)",
                    queued_again()
                ))),
                j::completed_at.eq(sql::<Nullable<Datetime>>(&format!("IF({}, NULL, completed_at)", queued_again()))),
                j::owner_node.eq(&owner.node),
                j::owner_run.eq(&owner.run),
                j::lease_expires_at.eq(lease_expiry(lease)),
            ))
            .execute(conn)
            .map_err(DbError::query(format!("claiming job '{id}'")))?;
        if updated == 1 {
            claimed.push((id, owner));
        }
    }
    Ok(claimed)
}

/// Extends `owner`'s lease on a live job. `false` means stop working on it:
/// another node or run owns it now, or it has finished (e.g. an operator
/// cancelled it through another appliance).
pub fn renew_lease(conn: &mut MysqlConnection, id: &str, owner: &Owner, lease: Duration) -> Result<bool, DbError> {
    Ok(super::batch::renew_leases(conn, &[(id, owner)], lease)?.pop().flatten().is_some())
}

/// The `max_rate` of each of `ids` as it is now (a job without a row is left
/// out): a running job follows its column within a second (Discovery reads
/// them every second, in statements of at most 500 ids).
pub fn job_max_rates(conn: &mut MysqlConnection, ids: &[String]) -> Result<Vec<(String, Option<i64>)>, DbError> {
    let mut rates = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let rows = j::table
            .filter(j::id.eq_any(chunk))
            .select((j::id, j::max_rate))
            .load::<(String, Option<i64>)>(conn)
            .map_err(DbError::query(format!("reading the limits of {} jobs", chunk.len())))?;
        rates.extend(rows);
    }
    Ok(rates)
}

/// Sets a job's bandwidth limit in bytes/s; 0 (none) is stored as NULL. An
/// operator's command, like the orchestrator's own writes of the column: not
/// guarded by an owner, and the running job follows it.
pub fn set_max_rate(conn: &mut MysqlConnection, id: &str, max_rate: u64) -> Result<(), DbError> {
    let value = i64::try_from(max_rate).ok().filter(|&r| r > 0);
    diesel::update(j::table)
        .filter(j::id.eq(id))
        .set(j::max_rate.eq(value))
        .execute(conn)
        .map_err(DbError::query(format!("setting the limit of job '{id}'")))?;
    Ok(())
}

/// Gives up `owner`'s lease so that any appliance may claim the job at once (a
/// graceful stop). `owner_run` stays, as the mark that a daemon ran the job.
/// Returns whether `owner` held it.
pub fn release_lease(conn: &mut MysqlConnection, id: &str, owner: &Owner) -> Result<bool, DbError> {
    let updated = diesel::update(j::table)
        .filter(j::id.eq(id))
        .filter(owned_by(owner))
        .set((j::owner_node.eq(None::<String>), j::lease_expires_at.eq(None::<chrono::NaiveDateTime>)))
        .execute(conn)
        .map_err(DbError::query(format!("releasing the lease on job '{id}'")))?;
    Ok(updated == 1)
}

/// A job and its disks (in insertion order), read in one snapshot.
pub fn load_job(conn: &mut MysqlConnection, id: &str) -> Result<(Job, Vec<Disk>), DbError> {
    conn.transaction(|conn| {
        let job = j::table
            .find(id)
            .select(Job::as_select())
            .first(conn)
            .optional()
            .map_err(DbError::query(format!("loading job '{id}'")))?
            .ok_or_else(|| DbError::NotFound { job: id.to_string() })?;
        let disks = d::table
            .filter(d::job_id.eq(id))
            .order(d::id.asc())
            .select(Disk::as_select())
            .load(conn)
            .map_err(DbError::query(format!("loading the disks of job '{id}'")))?;
        Ok((job, disks))
    })
}

/// A job by id, or else the most recent job whose primary target export is
/// `key` (the orchestrator knows jobs by `nbd_export_name` too).
pub fn find_job(conn: &mut MysqlConnection, key: &str) -> Result<Option<(Job, Vec<Disk>)>, DbError> {
    let by_id = j::table.find(key).select(j::id);
    let by_export =
        j::table.filter(j::nbd_export_name.eq(key)).order((j::created_at.desc(), j::id.desc())).select(j::id);
    let id = match by_id.first::<String>(conn).optional().map_err(DbError::query(format!("finding job '{key}'")))? {
        Some(id) => Some(id),
        None => {
            by_export.first::<String>(conn).optional().map_err(DbError::query(format!("finding export '{key}'")))?
        }
    };
    match id {
        None => Ok(None),
        // Deleted in between: as good as never found.
        Some(id) => match load_job(conn, &id) {
            Ok(found) => Ok(Some(found)),
            Err(DbError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        },
    }
}

/// Up to `limit` jobs, newest first, optionally of one status (matched exactly).
/// Rows whose status or type the daemon does not know are listed as they are.
pub fn list_jobs(conn: &mut MysqlConnection, status: Option<JobStatus>, limit: i64) -> Result<Vec<Job>, DbError> {
    let mut query =
        j::table.select(Job::as_select()).order((j::created_at.desc(), j::id.desc())).limit(limit).into_boxed();
    if let Some(status) = status {
        query = query.filter(status_is(&[status]));
    }
    query.load(conn).map_err(DbError::query("listing jobs"))
}

/// The number of jobs in each status, as database words: every status the
/// daemon knows is present (zero when none), in the order of `JobStatus::ALL`
/// (`replicating` counted as `pending`), then any other word as it is stored.
pub fn count_jobs_by_status(conn: &mut MysqlConnection) -> Result<Vec<(String, i64)>, DbError> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::Text)]
        status: String,
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    // Grouped on the exact bytes, so that `PENDING` is not counted as `pending`
    // (MIN of equal values: the word itself, in a form every SQL mode accepts).
    let rows: Vec<Count> =
        diesel::sql_query("SELECT MIN(status) AS status, COUNT(*) AS n FROM replication_jobs GROUP BY BINARY status")
            .load(conn)
            .map_err(DbError::query("counting jobs by status"))?;
    let mut known: BTreeMap<JobStatus, i64> = JobStatus::ALL.into_iter().map(|s| (s, 0)).collect();
    let mut other: BTreeMap<String, i64> = BTreeMap::new();
    for Count { status, n } in rows {
        let status = JobStatus::from_db(&status).map_or(Word::Unknown(status), Word::Known);
        match status {
            Word::Known(s) => *known.entry(s).or_default() += n,
            Word::Unknown(w) => *other.entry(w).or_default() += n,
        }
    }
    Ok(known.into_iter().map(|(s, n)| (s.as_db().to_string(), n)).chain(other).collect())
}

/// Applies `update`. A status change happens only if the current status may
/// become the new one; without a status change, the job must still be live.
/// With an owner, only while that owner (node and run) holds the job. The
/// percentage and the bytes transferred never go down. When refused, nothing
/// changes and the error says why.
pub fn update_job(conn: &mut MysqlConnection, update: &JobUpdate) -> Result<(), DbError> {
    match super::batch::update_jobs(conn, std::slice::from_ref(update))?.pop() {
        Some((_, why)) => Err(why),
        None => Ok(()),
    }
}

/// The snapshots VMware jobs left behind: jobs that ended, hold no live lease,
/// and still name a snapshot (see [`LeftSnapshot`]).
pub fn left_snapshots(conn: &mut MysqlConnection) -> Result<Vec<LeftSnapshot>, DbError> {
    let ended = [JobStatus::Completed, JobStatus::Failed, JobStatus::Cancelled];
    // id, vCenter, VM, snapshot, run
    type Row = (String, Option<String>, Option<String>, Option<String>, Option<String>);
    let rows: Vec<Row> = j::table
        .select((j::id, j::vmware_vcenter, j::vmware_vm, j::vmware_snapshot, j::owner_run))
        .filter(status_is(&ended))
        .filter(j::vmware_snapshot.is_not_null())
        .filter(claimable())
        .order(j::id.asc())
        .load(conn)
        .map_err(DbError::query("finding snapshots left behind"))?;
    Ok(rows
        .into_iter()
        .filter_map(|(job_id, vc, vm, snap, run)| {
            Some(LeftSnapshot { job_id, vcenter: vc?, vm: vm?, snapshot: snap?, owner_run: run? })
        })
        .collect())
}

/// Forgets a left snapshot once it was removed: only while the job is still
/// ended, unowned, last run by the same run, and names the same snapshot (the
/// write's fence; the job has no live owner). Returns whether it did.
pub fn forget_snapshot(conn: &mut MysqlConnection, left: &LeftSnapshot) -> Result<bool, DbError> {
    let ended = [JobStatus::Completed, JobStatus::Failed, JobStatus::Cancelled];
    let updated = diesel::update(j::table)
        .filter(j::id.eq(&left.job_id))
        .filter(status_is(&ended))
        .filter(claimable())
        .filter(j::owner_run.eq(&left.owner_run))
        .filter(j::vmware_snapshot.eq(&left.snapshot))
        .set((j::vmware_snapshot.eq(None::<String>), j::updated_at.eq(utc_now())))
        .execute(conn)
        .map_err(DbError::query(format!("forgetting the snapshot of job '{}'", left.job_id)))?;
    Ok(updated == 1)
}

/// Cancels a job on an operator's request and returns its new status. An
/// appliance running it notices when its next lease renewal or update is refused.
pub fn cancel_job(conn: &mut MysqlConnection, id: &str) -> Result<JobStatus, DbError> {
    let to = JobStatus::Cancelled;
    let updated = diesel::update(j::table)
        .filter(j::id.eq(id))
        .filter(status_is(&JobStatus::predecessors(to)))
        .set((
            j::status.eq(to.as_db()),
            j::completed_at.eq(utc_now().nullable()),
            j::error_message.eq("cancelled by operator"),
            j::updated_at.eq(utc_now()),
        ))
        .execute(conn)
        .map_err(DbError::query(format!("cancelling job '{id}'")))?;
    if updated == 1 {
        return Ok(to);
    }
    // Asked without a target status, `refusal` reports a terminal job as
    // AlreadyFinished, which is the error an operator should see.
    Err(refusal(conn, id, None, None)?)
}

/// Why a guarded update of job `id` matched no row, as the error to return.
pub(super) fn refusal(
    conn: &mut MysqlConnection,
    id: &str,
    owner: Option<&Owner>,
    to: Option<JobStatus>,
) -> Result<DbError, DbError> {
    type Row = (String, Option<String>, Option<String>);
    let row: Option<Row> = j::table
        .find(id)
        .select((j::status, j::owner_node, j::owner_run))
        .first(conn)
        .optional()
        .map_err(DbError::query(format!("reading job '{id}'")))?;
    let Some((status, node, run)) = row else {
        return Ok(DbError::NotFound { job: id.to_string() });
    };
    let job = id.to_string();
    if let Some(owner) = owner
        && (node.as_deref() != Some(&owner.node) || run.as_deref() != Some(&owner.run))
    {
        return Ok(DbError::NotOwner { job, node: owner.node.clone() });
    }
    let Some(current) = JobStatus::from_db(&status) else {
        return Ok(DbError::UnknownStatus { job, status });
    };
    Ok(match to {
        Some(to) if current.can_become(to) => DbError::Concurrent { job },
        Some(to) => DbError::IllegalTransition { job, to },
        None if current.is_terminal() => DbError::AlreadyFinished { job, status: current },
        None => DbError::Concurrent { job },
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use chrono::{NaiveDateTime, SubsecRound, TimeDelta, Utc};

    use super::super::models::NewDisk;
    use super::super::testing::{connect_to, fresh};
    use super::*;
    use crate::state::{Operation, ReplicationType};

    const MINUTE: Duration = Duration::from_secs(60);

    /// Exactly what the orchestrator runs (see the spec); the schema's defaults fill the rest.
    const ORCHESTRATOR_INSERT: &str = "
        INSERT INTO replication_jobs (id, vm_name, replication_type, status, nbd_export_name)
          VALUES ('job-1', 'vm1', 'full', 'replicating', 'migration-vol-1');
        INSERT INTO vm_disks (job_id, disk_id, label, source_uri, target_uri)
          VALUES ('job-1', 'disk-2000', 'Hard disk 1', 'nbd+unix:///?socket=/tmp/s.sock', 'nbd+unix:///?socket=/tmp/d.sock');";

    fn new_job(id: &str) -> NewJob {
        NewJob {
            id: id.into(),
            vm_name: format!("vm-{id}"),
            vm_path: None,
            replication_type: ReplicationType::Full,
            nbd_export_name: Some(format!("migration-vol-{id}")),
            vmware_vcenter: None,
            vmware_vm: None,
            skip_change_check: false,
            max_rate: None,
        }
    }

    fn disk(n: u32) -> NewDisk {
        NewDisk {
            disk_id: format!("disk-{n}"),
            label: Some(format!("Hard disk {n}")),
            source_uri: format!("nbd+unix:///src{n}?socket=/tmp/s.sock"),
            target_uri: format!("nbd+unix:///dst{n}?socket=/tmp/d.sock"),
            ..NewDisk::default()
        }
    }

    fn now() -> NaiveDateTime {
        Utc::now().naive_utc()
    }

    /// `t` is within a minute of `expected`: far tighter than the five hours by
    /// which a time stored in the test server's +05:00 zone would be off.
    fn assert_near(t: NaiveDateTime, expected: NaiveDateTime) {
        assert!((t - expected).abs() < TimeDelta::minutes(1), "{t} is not near {expected} (UTC)");
    }

    fn update(id: &str) -> JobUpdate {
        JobUpdate { id: id.into(), ..JobUpdate::default() }
    }

    /// The ids `node` claims.
    fn claim(conn: &mut MysqlConnection, node: &str, limit: i64, exclude: &[String]) -> Vec<String> {
        claim_jobs(conn, node, MINUTE, limit, exclude).unwrap().into_iter().map(|(id, _)| id).collect()
    }

    /// `node` claims exactly job `id`; its owner.
    fn claim_one(conn: &mut MysqlConnection, node: &str, id: &str) -> Owner {
        let mut got = claim_jobs(conn, node, MINUTE, 10, &[]).unwrap();
        assert_eq!(got.iter().map(|(j, _)| j.as_str()).collect::<Vec<_>>(), [id]);
        let (_, owner) = got.remove(0);
        assert_eq!(owner.node, node);
        owner
    }

    /// Found by the chaos suite (two appliances, one SIGSTOPped): a daemon
    /// stopped between a statement of its batch and the COMMIT kept the job's
    /// row locked, and the other appliance's claim waited behind the lock for
    /// as long as the stopped process lived, long after the lease ran out.
    #[test]
    fn a_writer_stopped_inside_a_transaction_does_not_block_the_takeover() {
        use diesel::connection::SimpleConnection;
        let (db, mut conn) = fresh("idle_transaction");
        db.execute(ORCHESTRATOR_INSERT);
        claim_one(&mut conn, "node-a", "job-1");
        db.execute("UPDATE replication_jobs SET lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND");
        // node-a's writer changed the job's row inside a transaction, and stopped.
        let mut stopped = connect_to(&db);
        assert!(crate::db::limit_idle_transactions(&mut stopped, Duration::from_secs(1)).unwrap());
        stopped
            .batch_execute("START TRANSACTION; UPDATE replication_jobs SET bytes_transferred = 1 WHERE id = 'job-1'")
            .unwrap();
        // node-b would wait 8 s for the row, then fail, without the limit.
        conn.batch_execute("SET SESSION innodb_lock_wait_timeout = 8").unwrap();
        let t = std::time::Instant::now();
        claim_one(&mut conn, "node-b", "job-1");
        assert!(t.elapsed() < Duration::from_secs(5), "the takeover waited {:?}", t.elapsed());
        assert!(stopped.batch_execute("SELECT 1").is_err(), "the idle session was not ended");
        let (job, _) = load_job(&mut conn, "job-1").unwrap();
        assert_eq!(job.bytes_transferred, 0, "the stopped writer's change was committed");
    }

    #[test]
    fn the_orchestrators_insert_is_claimed_by_one_node_at_a_time() {
        let (db, mut conn) = fresh("orchestrator_claim");
        db.execute(ORCHESTRATOR_INSERT);

        let a = claim_one(&mut conn, "node-a", "job-1");
        let (job, disks) = load_job(&mut conn, "job-1").unwrap();
        assert_eq!(job.status, JobStatus::Pending.into());
        assert_eq!(job.replication_type, ReplicationType::Full.into());
        assert_eq!((job.owner_node.as_deref(), job.owner_run.as_deref()), (Some("node-a"), Some(a.run.as_str())));
        assert_near(job.lease_expires_at.unwrap(), now() + TimeDelta::seconds(60));
        assert_eq!((job.progress_percent, job.bytes_transferred, job.eta_seconds), (0.0, 0, None));
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].disk_id, "disk-2000");
        assert_eq!(disks[0].sync_status, crate::state::DiskStatus::Pending.into());
        assert_eq!((disks[0].resume_offset, disks[0].destination_is_zero), (0, false));
        // Claiming leaves the orchestrator's word alone; the daemon moves it on.
        assert_eq!(db.column("SELECT status AS v FROM replication_jobs"), [Some("replicating".to_string())]);

        assert!(claim(&mut conn, "node-b", 10, &[]).is_empty(), "stolen while leased");
        // node-a restarted: its own name buys nothing while the lease of its
        // earlier run lasts (that run may be a paused process, still writing).
        assert!(claim(&mut conn, "node-a", 10, &[]).is_empty(), "reclaimed while its earlier run holds it");

        // node-a dies; once its lease has run out, node-b takes over.
        db.execute("UPDATE replication_jobs SET lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND");
        let b = claim_one(&mut conn, "node-b", "job-1");
        assert_ne!(a.run, b.run);
        assert!(!renew_lease(&mut conn, "job-1", &a, MINUTE).unwrap());
        let late = JobUpdate { owner: Some(a.clone()), progress_percent: Some(50.0), ..update("job-1") };
        assert!(matches!(update_job(&mut conn, &late), Err(DbError::NotOwner { .. })));
        assert!(!release_lease(&mut conn, "job-1", &a).unwrap());
        assert!(renew_lease(&mut conn, "job-1", &b, MINUTE).unwrap());
        let (job, _) = load_job(&mut conn, "job-1").unwrap();
        assert_eq!((job.owner_node.as_deref(), job.progress_percent), (Some("node-b"), 0.0));

        // The same node under a new run is a different owner, too.
        db.execute("UPDATE replication_jobs SET lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND");
        let b2 = claim_one(&mut conn, "node-b", "job-1");
        assert!(!renew_lease(&mut conn, "job-1", &b, MINUTE).unwrap(), "an earlier run of node-b");
        assert!(renew_lease(&mut conn, "job-1", &b2, MINUTE).unwrap());
    }

    #[test]
    fn a_vmware_job_is_ready_with_device_keys_and_targets_and_no_sources() {
        let (_db, mut conn) = fresh("claim_vmware");
        let vm =
            |id: &str| NewJob { vmware_vcenter: Some("vc1".into()), vmware_vm: Some("/DC/vm/x".into()), ..new_job(id) };
        let keyed = |n: u32| NewDisk { source_uri: String::new(), vmware_disk_key: Some(2000 + n as i32), ..disk(n) };
        insert_job(&mut conn, &vm("vm-ready"), &[keyed(0), keyed(1)]).unwrap();
        insert_job(&mut conn, &vm("vm-no-key"), &[keyed(0), NewDisk { vmware_disk_key: None, ..keyed(1) }]).unwrap();
        insert_job(&mut conn, &vm("vm-no-target"), &[NewDisk { target_uri: String::new(), ..keyed(0) }]).unwrap();
        assert_eq!(claim(&mut conn, "n", 10, &[]), ["vm-ready"]);
        let (job, disks) = load_job(&mut conn, "vm-ready").unwrap();
        assert_eq!((job.vmware_vcenter.as_deref(), job.vmware_vm.as_deref()), (Some("vc1"), Some("/DC/vm/x")));
        assert_eq!(disks.iter().map(|d| d.vmware_disk_key).collect::<Vec<_>>(), [Some(2000), Some(2001)]);
    }

    #[test]
    fn snapshots_left_by_ended_jobs_are_listed_and_forgotten_once() {
        let (db, mut conn) = fresh("left_snapshots");
        let vm =
            |id: &str| NewJob { vmware_vcenter: Some("vc1".into()), vmware_vm: Some("/DC/vm/x".into()), ..new_job(id) };
        for id in ["ended", "running", "clean", "leased"] {
            insert_job(&mut conn, &vm(id), &[disk(1)]).unwrap();
        }
        db.execute(
            "UPDATE replication_jobs SET vmware_snapshot = 'snapshot-1', owner_run = 'r1', status = 'failed' WHERE id = 'ended';
             UPDATE replication_jobs SET vmware_snapshot = 'snapshot-2', owner_run = 'r2', status = 'streaming' WHERE id = 'running';
             UPDATE replication_jobs SET owner_run = 'r3', status = 'completed' WHERE id = 'clean';
             UPDATE replication_jobs SET vmware_snapshot = 'snapshot-4', owner_run = 'r4', status = 'cancelled',
               owner_node = 'other', lease_expires_at = UTC_TIMESTAMP(6) + INTERVAL 1 HOUR WHERE id = 'leased';",
        );
        let left = left_snapshots(&mut conn).unwrap();
        let want = LeftSnapshot {
            job_id: "ended".into(),
            vcenter: "vc1".into(),
            vm: "/DC/vm/x".into(),
            snapshot: "snapshot-1".into(),
            owner_run: "r1".into(),
        };
        assert_eq!(left, std::slice::from_ref(&want), "only ended, unowned jobs that still name a snapshot");
        let other_run = LeftSnapshot { owner_run: "r9".into(), ..want.clone() };
        assert!(!forget_snapshot(&mut conn, &other_run).unwrap(), "fenced by the job's last run");
        assert!(forget_snapshot(&mut conn, &want).unwrap());
        assert!(!forget_snapshot(&mut conn, &want).unwrap(), "once");
        assert!(left_snapshots(&mut conn).unwrap().is_empty());
    }

    #[test]
    fn a_lease_renewal_leaves_updated_at_alone() {
        let (db, mut conn) = fresh("renew_updated_at");
        db.execute(ORCHESTRATOR_INSERT);
        let a = claim_one(&mut conn, "node-a", "job-1");
        db.execute(
            "UPDATE replication_jobs SET updated_at = '2020-01-01 00:00:00', lease_expires_at = UTC_TIMESTAMP(6)",
        );
        assert!(renew_lease(&mut conn, "job-1", &a, MINUTE).unwrap());
        let (job, _) = load_job(&mut conn, "job-1").unwrap();
        assert_near(job.lease_expires_at.unwrap(), now() + TimeDelta::seconds(60));
        assert_eq!(job.updated_at.to_string(), "2020-01-01 00:00:00", "a renewal is no change of the job");
    }

    #[test]
    fn a_job_queued_again_after_it_ended_is_claimed_as_a_new_attempt() {
        let (db, mut conn) = fresh("attempts");
        db.execute(ORCHESTRATOR_INSERT);
        let attempt = |conn: &mut MysqlConnection| load_job(conn, "job-1").unwrap().0.attempt;
        claim_one(&mut conn, "node-a", "job-1");
        assert_eq!(attempt(&mut conn), 1, "a new job");
        // The run crashed mid-copy; another node resumes it: the same attempt.
        db.execute(
            "UPDATE replication_jobs SET status = 'streaming', lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND",
        );
        claim_one(&mut conn, "node-b", "job-1");
        assert_eq!(attempt(&mut conn), 1, "a resumed run");
        // It failed and was released; the orchestrator queues it again.
        for (n, word) in [(2, "pending"), (3, "replicating")] {
            db.execute(&format!(
                "UPDATE replication_jobs SET status = 'failed', error_message = 'boom', completed_at = UTC_TIMESTAMP(6),
                   owner_node = NULL, lease_expires_at = NULL;
                 UPDATE replication_jobs SET status = '{word}' WHERE id = 'job-1';"
            ));
            claim_one(&mut conn, "node-a", "job-1");
            let (job, _) = load_job(&mut conn, "job-1").unwrap();
            assert_eq!((job.attempt, job.error_message, job.completed_at), (n, None, None), "queued again as {word}");
            assert_eq!(job.owner_node.as_deref(), Some("node-a"));
        }
    }

    #[test]
    fn only_ready_jobs_are_claimed_oldest_first() {
        let (db, mut conn) = fresh("claim_ready");
        insert_job(&mut conn, &new_job("no-disks"), &[]).unwrap();
        insert_job(&mut conn, &new_job("no-target"), &[disk(1), NewDisk { target_uri: String::new(), ..disk(2) }])
            .unwrap();
        insert_job(&mut conn, &new_job("no-source"), &[NewDisk { source_uri: String::new(), ..disk(1) }]).unwrap();
        for id in ["done", "ready-new", "ready-old", "ready-mid", "streaming", "run-before"] {
            insert_job(&mut conn, &new_job(id), &[disk(1), disk(2)]).unwrap();
        }
        db.execute(
            "UPDATE replication_jobs SET status = 'completed' WHERE id = 'done';
             UPDATE replication_jobs SET status = 'streaming' WHERE id = 'streaming';
             UPDATE replication_jobs SET status = 'streaming', owner_run = 'r0' WHERE id = 'run-before';
             UPDATE replication_jobs SET created_at = created_at - INTERVAL 3 HOUR WHERE id = 'ready-old';
             UPDATE replication_jobs SET created_at = created_at - INTERVAL 2 HOUR WHERE id = 'ready-mid';
             UPDATE replication_jobs SET created_at = created_at - INTERVAL 1 HOUR WHERE id IN ('streaming', 'run-before');",
        );
        assert_eq!(claim(&mut conn, "n", 2, &[]), ["ready-old", "ready-mid"]);
        // A streaming job nobody ran (an orchestrator's own word) is not ready for
        // us; one a daemon ran and released is taken over.
        assert_eq!(claim(&mut conn, "n", 10, &["ready-old".into()]), ["run-before", "ready-new"]);
        assert_eq!(
            db.column("SELECT id AS v FROM replication_jobs WHERE owner_node IS NULL ORDER BY id"),
            ["done", "no-disks", "no-source", "no-target", "streaming"].map(|s| Some(s.to_string()))
        );
        // Incomplete for longer than the grace: claimed, so that it fails with a
        // message instead of waiting forever.
        db.execute(&format!(
            "UPDATE replication_jobs SET created_at = created_at - INTERVAL {} SECOND WHERE id LIKE 'no-%'",
            INCOMPLETE_GRACE.as_secs() + 1
        ));
        // Except rows that are not blockrepl's, however old: a disk with neither
        // URI (an older system's), or `replicating` without disks.
        insert_job(&mut conn, &new_job("not-ours"), &[NewDisk { source_uri: String::new(), ..disk(1) }, disk(2)])
            .unwrap();
        insert_job(&mut conn, &new_job("older-no-disks"), &[]).unwrap();
        db.execute(&format!(
            "UPDATE vm_disks SET target_uri = '' WHERE job_id = 'not-ours' AND disk_id = 'disk-1';
             UPDATE replication_jobs SET status = 'replicating' WHERE id = 'older-no-disks';
             UPDATE replication_jobs SET created_at = created_at - INTERVAL {} SECOND
               WHERE id IN ('not-ours', 'older-no-disks')",
            INCOMPLETE_GRACE.as_secs() + 1
        ));
        let mut overdue = claim(&mut conn, "n", 10, &[]);
        overdue.sort();
        assert_eq!(overdue, ["no-disks", "no-source", "no-target"]);
        let unowned = db.column("SELECT id AS v FROM replication_jobs WHERE owner_node IS NULL ORDER BY id");
        assert_eq!(unowned, ["done", "not-ours", "older-no-disks", "streaming"].map(|s| Some(s.to_string())));
    }

    #[test]
    fn only_exact_live_statuses_are_claimed() {
        let (db, mut conn) = fresh("claim_words");
        for (id, status) in [
            ("upper", "PENDING"),
            ("mixed", "Replicating"),
            ("init", "initializing"),
            ("syncing", "syncing"),
            ("empty", ""),
            ("preparing", "preparing"),
            ("snapshotting", "snapshotting"),
            ("good", "pending"),
            ("older", "replicating"),
        ] {
            insert_job(&mut conn, &new_job(id), &[disk(1)]).unwrap();
            db.execute(&format!("UPDATE replication_jobs SET status = '{status}' WHERE id = '{id}'"));
        }
        let mut got = claim(&mut conn, "n", 20, &[]);
        got.sort();
        assert_eq!(got, ["good", "older"], "neither other words, other cases, nor an orchestrator's own stages");
        // Everything else is untouched and still lists, as it is.
        let listed = list_jobs(&mut conn, None, 20).unwrap();
        assert_eq!(listed.len(), 9);
        let upper = listed.iter().find(|j| j.id == "upper").unwrap();
        assert_eq!(upper.status, Word::Unknown("PENDING".into()));
        assert_eq!(upper.owner_node, None);
        let pending: Vec<String> =
            list_jobs(&mut conn, Some(JobStatus::Pending), 20).unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(pending.len(), 2, "a status filter is exact too: {pending:?}");
    }

    #[test]
    fn racing_nodes_never_claim_the_same_job() {
        let (db, mut conn) = fresh("claim_race");
        for i in 0..40 {
            insert_job(&mut conn, &new_job(&format!("job-{i:02}")), &[disk(1)]).unwrap();
        }
        let nodes = ["node-a", "node-b", "node-c", "node-d"];
        let claims: Vec<Vec<String>> = std::thread::scope(|s| {
            let handles: Vec<_> = nodes
                .iter()
                .map(|node| {
                    let url = db.url.clone();
                    s.spawn(move || {
                        let mut conn = crate::db::connect(&url).unwrap();
                        // Small batches, so that the nodes interleave over the same candidates.
                        let mut mine = Vec::new();
                        loop {
                            let got = claim(&mut conn, node, 3, &mine);
                            if got.is_empty() {
                                break mine;
                            }
                            mine.extend(got);
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let total: usize = claims.iter().map(Vec::len).sum();
        let distinct: HashSet<&String> = claims.iter().flatten().collect();
        assert_eq!(distinct.len(), 40, "every job is claimed");
        assert_eq!(total, 40, "no job is claimed twice: {claims:?}");
        for (node, ids) in nodes.iter().zip(&claims) {
            for id in ids {
                let (job, _) = load_job(&mut conn, id).unwrap();
                assert_eq!(job.owner_node.as_deref(), Some(*node));
            }
        }
    }

    #[test]
    fn released_jobs_can_be_claimed_at_once() {
        let (_db, mut conn) = fresh("release");
        insert_job(&mut conn, &new_job("j"), &[disk(1)]).unwrap();
        let a = claim_one(&mut conn, "a", "j");
        let b = Owner { node: "b".into(), run: a.run.clone() };
        assert!(!release_lease(&mut conn, "j", &b).unwrap(), "b does not own it");
        assert!(claim(&mut conn, "b", 1, &[]).is_empty());
        assert!(release_lease(&mut conn, "j", &a).unwrap());
        let (job, _) = load_job(&mut conn, "j").unwrap();
        assert_eq!((job.owner_node, job.lease_expires_at), (None, None));
        assert_eq!(job.owner_run, Some(a.run), "the mark that a daemon ran it stays");
        assert_eq!(claim(&mut conn, "b", 1, &[]), ["j"]);
    }

    #[test]
    fn insert_job_fills_defaults_in_utc_and_refuses_duplicates() {
        let (_db, mut conn) = fresh("insert_job");
        let job = NewJob { vm_path: Some("/dc/vm/vm1".into()), ..new_job("job-20250905-171611") };
        let with_inputs = NewDisk {
            destination_is_zero: true,
            dirty_bitmap: Some("bitmap0".into()),
            changed_areas: Some(r#"[{"start":0,"length":4096}]"#.into()),
            previous_change_id: Some("52 aa-1/1".into()),
            change_id: Some("52 aa-1/2".into()),
            ..disk(2)
        };
        insert_job(&mut conn, &job, &[disk(1), with_inputs.clone()]).unwrap();

        let (row, disks) = load_job(&mut conn, &job.id).unwrap();
        assert_eq!((row.status, row.vm_path.as_deref()), (JobStatus::Pending.into(), Some("/dc/vm/vm1")));
        assert_eq!(row.nbd_export_name, job.nbd_export_name);
        assert_eq!((row.owner_node, row.started_at, row.completed_at), (None, None, None));
        assert_near(row.created_at, now());
        assert_near(row.updated_at, now());
        assert_eq!(disks.iter().map(|d| d.disk_id.as_str()).collect::<Vec<_>>(), ["disk-1", "disk-2"]);
        let d = &disks[1];
        assert!(d.destination_is_zero);
        assert_eq!(d.dirty_bitmap, with_inputs.dirty_bitmap);
        assert_eq!(d.changed_areas, with_inputs.changed_areas);
        assert_eq!((d.previous_change_id.as_deref(), d.change_id.as_deref()), (Some("52 aa-1/1"), Some("52 aa-1/2")));
        assert_eq!(d.disk_change_id, None);
        assert_near(d.updated_at, now());

        let err = insert_job(&mut conn, &new_job(&job.id), &[disk(9)]).unwrap_err();
        assert!(matches!(err, DbError::Conflict { .. }), "{err}");
        assert_eq!(err.to_string(), "job 'job-20250905-171611' already exists");
        // The transaction rolled back: the refused job's disk is not there.
        assert_eq!(load_job(&mut conn, &job.id).unwrap().1.len(), 2);

        // Two disks with one id: the job is not half-inserted either.
        let err = insert_job(&mut conn, &new_job("twins"), &[disk(1), disk(1)]).unwrap_err();
        assert!(err.to_string().starts_with("database error while inserting the disks of job 'twins'"), "{err}");
        assert!(matches!(load_job(&mut conn, "twins"), Err(DbError::NotFound { .. })));
    }

    #[test]
    fn update_job_writes_what_is_given_and_nothing_else() {
        let (_db, mut conn) = fresh("update_job");
        insert_job(&mut conn, &new_job("j"), &[disk(1)]).unwrap();
        let started = now() - TimeDelta::seconds(10);
        update_job(
            &mut conn,
            &JobUpdate {
                status: Some(JobStatus::Streaming),
                current_operation: Some(Operation::Transfer),
                progress_percent: Some(37.456),
                bytes_transferred: Some(456_789_012),
                total_bytes: Some(1_234_567_890),
                transfer_speed_bps: Some(98_765_432),
                eta_seconds: Some(8),
                last_progress_at: Some(started),
                started_at: Some(started),
                ..update("j")
            },
        )
        .unwrap();
        let (job, _) = load_job(&mut conn, "j").unwrap();
        assert_eq!(job.status, JobStatus::Streaming.into());
        assert_eq!(job.current_operation.as_deref(), Some("Transfer"));
        assert_eq!(job.progress_percent, 37.46);
        assert_eq!(
            (job.bytes_transferred, job.total_bytes, job.transfer_speed_bps),
            (456_789_012, 1_234_567_890, 98_765_432)
        );
        // Stored to the microsecond, truncated alike by MariaDB and MySQL.
        let stored = Some(started.trunc_subsecs(6));
        assert_eq!((job.eta_seconds, job.started_at, job.last_progress_at), (Some(8), stored, stored));
        assert_eq!((job.setup_progress_percent, job.completed_at, job.error_message.as_deref()), (0.0, None, None));

        // A progress-only update leaves everything else alone.
        update_job(&mut conn, &JobUpdate { progress_percent: Some(40.0), ..update("j") }).unwrap();
        let (after, _) = load_job(&mut conn, "j").unwrap();
        assert_eq!(after.progress_percent, 40.0);
        assert_eq!(Job { progress_percent: 37.46, updated_at: job.updated_at, ..after.clone() }, job);
        assert!(after.updated_at >= job.updated_at);

        assert!(matches!(update_job(&mut conn, &update("nope")), Err(DbError::NotFound { .. })));
    }

    #[test]
    fn illegal_transitions_are_refused_and_leave_the_row_unchanged() {
        let (db, mut conn) = fresh("transitions");
        db.execute(ORCHESTRATOR_INSERT);
        // `replicating` is `pending`: it may move forward.
        update_job(&mut conn, &JobUpdate { status: Some(JobStatus::Preparing), ..update("job-1") }).unwrap();
        update_job(&mut conn, &JobUpdate { status: Some(JobStatus::Streaming), ..update("job-1") }).unwrap();
        let before = load_job(&mut conn, "job-1").unwrap();

        let back = JobUpdate { status: Some(JobStatus::Preparing), progress_percent: Some(99.0), ..update("job-1") };
        let err = update_job(&mut conn, &back).unwrap_err();
        assert!(
            matches!(&err, DbError::IllegalTransition { job, to: JobStatus::Preparing } if job == "job-1"),
            "{err}"
        );
        assert_eq!(err.to_string(), "job 'job-1' cannot become preparing from its current status");
        assert_eq!(load_job(&mut conn, "job-1").unwrap(), before);
    }

    #[test]
    fn terminal_states_never_change() {
        let (_db, mut conn) = fresh("terminal");
        for (id, end) in [("c", JobStatus::Completed), ("f", JobStatus::Failed), ("x", JobStatus::Cancelled)] {
            insert_job(&mut conn, &new_job(id), &[disk(1)]).unwrap();
            let finish = JobUpdate { status: Some(end), completed_at: Some(now()), ..update(id) };
            update_job(&mut conn, &finish).unwrap();
            let before = load_job(&mut conn, id).unwrap();

            for to in JobStatus::ALL {
                let err = update_job(&mut conn, &JobUpdate { status: Some(to), ..update(id) }).unwrap_err();
                assert!(matches!(err, DbError::IllegalTransition { .. }), "{end} -> {to}: {err}");
            }
            let progress = JobUpdate { progress_percent: Some(1.0), error_message: Some("late".into()), ..update(id) };
            let err = update_job(&mut conn, &progress).unwrap_err();
            assert!(matches!(err, DbError::AlreadyFinished { status, .. } if status == end), "{err}");
            let err = cancel_job(&mut conn, id).unwrap_err();
            assert!(matches!(err, DbError::AlreadyFinished { status, .. } if status == end), "{err}");
            assert!(!renew_lease(&mut conn, id, &Owner { node: "n".into(), run: "r".into() }, MINUTE).unwrap());
            assert!(claim(&mut conn, "n", 10, &[]).is_empty());
            assert_eq!(load_job(&mut conn, id).unwrap(), before, "{end} changed");
        }
    }

    #[test]
    fn cancel_stops_a_live_job_and_refuses_unknown_ones() {
        let (_db, mut conn) = fresh("cancel");
        let err = cancel_job(&mut conn, "ghost").unwrap_err();
        assert_eq!(err.to_string(), "job 'ghost' not found");

        insert_job(&mut conn, &new_job("j"), &[disk(1)]).unwrap();
        let n = claim_one(&mut conn, "n", "j");
        assert_eq!(cancel_job(&mut conn, "j").unwrap(), JobStatus::Cancelled);
        let (job, _) = load_job(&mut conn, "j").unwrap();
        assert_eq!(
            (job.status, job.error_message.as_deref()),
            (JobStatus::Cancelled.into(), Some("cancelled by operator"))
        );
        assert_near(job.completed_at.unwrap(), now());
        // The owner learns of it when it next renews its lease.
        assert!(!renew_lease(&mut conn, "j", &n, MINUTE).unwrap());
        let err = cancel_job(&mut conn, "j").unwrap_err();
        assert_eq!(err.to_string(), "job 'j' has already finished as cancelled");
    }

    #[test]
    fn jobs_are_found_by_id_or_export_and_listed_newest_first() {
        let (db, mut conn) = fresh("find_list");
        db.execute(ORCHESTRATOR_INSERT);
        insert_job(&mut conn, &new_job("old"), &[disk(1)]).unwrap();
        insert_job(&mut conn, &NewJob { nbd_export_name: Some("migration-vol-old".into()), ..new_job("new") }, &[])
            .unwrap();
        insert_job(&mut conn, &new_job("gone"), &[]).unwrap();
        db.execute(
            "UPDATE replication_jobs SET created_at = created_at - INTERVAL 1 HOUR WHERE id = 'old';
             UPDATE replication_jobs SET created_at = created_at - INTERVAL 1 DAY, status = 'failed' WHERE id = 'gone';",
        );

        let (job, disks) = find_job(&mut conn, "job-1").unwrap().unwrap();
        assert_eq!((job.id.as_str(), disks.len()), ("job-1", 1));
        // Two jobs share the export: the newer wins.
        assert_eq!(find_job(&mut conn, "migration-vol-old").unwrap().unwrap().0.id, "new");
        assert_eq!(find_job(&mut conn, "migration-vol-1").unwrap().unwrap().0.id, "job-1");
        assert!(find_job(&mut conn, "nothing").unwrap().is_none());
        assert!(matches!(load_job(&mut conn, "nothing"), Err(DbError::NotFound { .. })));

        let ids = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
        let all = ids(list_jobs(&mut conn, None, 10).unwrap());
        assert_eq!(all.len(), 4);
        assert_eq!(all[2..], ["old", "gone"]);
        assert_eq!(ids(list_jobs(&mut conn, None, 1).unwrap()).len(), 1);
        // `replicating` (job-1) is listed as pending.
        let mut pending = ids(list_jobs(&mut conn, Some(JobStatus::Pending), 10).unwrap());
        pending.sort();
        assert_eq!(pending, ["job-1", "new", "old"]);
        assert_eq!(ids(list_jobs(&mut conn, Some(JobStatus::Failed), 10).unwrap()), ["gone"]);
        assert!(list_jobs(&mut conn, Some(JobStatus::Streaming), 10).unwrap().is_empty());

        let counts = count_jobs_by_status(&mut conn).unwrap();
        assert_eq!(counts.len(), JobStatus::ALL.len());
        assert!(counts.contains(&("pending".into(), 3)), "{counts:?}");
        assert!(counts.contains(&("failed".into(), 1)), "{counts:?}");
        assert_eq!(counts.iter().map(|(_, n)| n).sum::<i64>(), 4);
    }

    #[test]
    fn words_the_daemon_does_not_know_are_kept_as_they_are_and_never_claimed() {
        let (db, mut conn) = fresh("unknown_status");
        db.execute(ORCHESTRATOR_INSERT);
        db.execute(
            "UPDATE replication_jobs SET status = 'paused', replication_type = 'differential';
             UPDATE vm_disks SET sync_status = 'weird';",
        );
        let (job, disks) = load_job(&mut conn, "job-1").unwrap();
        assert_eq!(job.status, Word::Unknown("paused".into()));
        assert_eq!(job.replication_type, Word::Unknown("differential".into()));
        assert_eq!(disks[0].sync_status, Word::Unknown("weird".into()));
        assert_eq!(job.status.shown(JobStatus::as_api), "paused");
        let err = update_job(&mut conn, &JobUpdate { progress_percent: Some(1.0), ..update("job-1") }).unwrap_err();
        assert_eq!(err.to_string(), "job 'job-1' has an unknown status 'paused'");
        assert!(claim(&mut conn, "n", 10, &[]).is_empty());
        db.execute(
            "INSERT INTO replication_jobs (id, vm_name, status) VALUES ('j2', 'vm', 'PENDING'), ('j3', 'vm', 'paused')",
        );
        let counts = count_jobs_by_status(&mut conn).unwrap();
        assert!(counts.contains(&("paused".into(), 2)) && counts.contains(&("PENDING".into(), 1)), "{counts:?}");
        assert!(counts.contains(&("pending".into(), 0)), "{counts:?}");
    }

    #[test]
    fn progress_figures_never_go_down() {
        let (db, mut conn) = fresh("monotone");
        db.execute(ORCHESTRATOR_INSERT);
        let n = claim_one(&mut conn, "n", "job-1");
        let figures = |pct: f64, bytes: i64| JobUpdate {
            owner: Some(n.clone()),
            progress_percent: Some(pct),
            bytes_transferred: Some(bytes),
            ..update("job-1")
        };
        update_job(&mut conn, &figures(70.3, 703)).unwrap();
        // A restarted run knows only its checkpoint at first.
        update_job(&mut conn, &figures(58.2, 582)).unwrap();
        let (job, _) = load_job(&mut conn, "job-1").unwrap();
        assert_eq!((job.progress_percent, job.bytes_transferred), (70.3, 703));
        update_job(&mut conn, &figures(71.0, 710)).unwrap();
        let (job, _) = load_job(&mut conn, "job-1").unwrap();
        assert_eq!((job.progress_percent, job.bytes_transferred), (71.0, 710));
    }
}
