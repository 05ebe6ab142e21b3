//! Jobs: inserting, finding and listing them, the leases through which one
//! appliance at a time owns a job, and guarded updates that enforce the state
//! machine of `crate::state` in SQL (`WHERE status IN (predecessors)`), so that
//! two writers racing can never move a terminal job or skip the rules.
//!
//! Lease times are the server's `UTC_TIMESTAMP(6)`, never this machine's clock:
//! appliances sharing a database may disagree about the time, the database does not.
//! Disks, checkpoints and CBT history are in `disks`.

use std::collections::BTreeMap;
use std::time::Duration;

use diesel::dsl::{count_star, sql};
use diesel::expression::SqlLiteral;
use diesel::mysql::{Mysql, MysqlConnection};
use diesel::prelude::*;
use diesel::query_builder::{QueryFragment, QueryId};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Bool, Datetime, Nullable};

use super::DbError;
use super::models::{
    Disk, Job, JobUpdate, NewDisk, NewJob, live_statuses, percent_to_decimal, status_values, to_micros,
};
use super::schema::replication_jobs as j;
use super::schema::vm_disks as d;
use crate::state::JobStatus;

/// `UTC_TIMESTAMP(6)`, the server's current time in UTC.
fn utc_now() -> SqlLiteral<Datetime> {
    sql("UTC_TIMESTAMP(6)")
}

/// The server's time `lease` from now. A lease too long to express is capped at
/// ten years, which is forever for a job.
fn lease_expiry(lease: Duration) -> SqlLiteral<Nullable<Datetime>, impl QueryFragment<Mysql> + QueryId + Send> {
    const TEN_YEARS_US: i64 = 10 * 366 * 24 * 3600 * 1_000_000;
    let micros = i64::try_from(lease.as_micros()).unwrap_or(TEN_YEARS_US).min(TEN_YEARS_US);
    sql::<Nullable<Datetime>>("UTC_TIMESTAMP(6) + INTERVAL ").bind::<BigInt, _>(micros).sql(" MICROSECOND")
}

type Predicate<'a> = Box<dyn BoxableExpression<j::table, Mysql, SqlType = Nullable<Bool>> + 'a>;

/// The job may be claimed by `node`: nobody owns it, `node` already does (a
/// restarted daemon), or its owner's lease ran out. An owner without a lease has
/// nothing to honour and counts as gone.
fn claimable_by(node: &str) -> Predicate<'_> {
    Box::new(
        j::owner_node
            .is_null()
            .or(j::owner_node.eq(node))
            .or(j::lease_expires_at.is_null())
            .or(j::lease_expires_at.lt(utc_now().nullable())),
    )
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
                j::status.eq(JobStatus::Pending.as_db()),
                j::nbd_export_name.eq(&job.nbd_export_name),
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
                    d::source_uri.eq(&disk.source_uri),
                    d::target_uri.eq(&disk.target_uri),
                    d::destination_is_zero.eq(disk.destination_is_zero),
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

/// Claims up to `limit` ready jobs for `node` for `lease`, oldest first, skipping
/// `exclude` (the jobs `node` is running already), and returns the ids it claimed.
///
/// Ready: a live status (`replicating` counts as `pending` and is left as it is:
/// the daemon moves it forward itself), at least one disk, and every disk with a
/// source and a target. Each claim is a guarded UPDATE that re-checks ownership,
/// and only rows it actually changed count, so two daemons racing for the same
/// job cannot both get it.
pub fn claim_jobs(
    conn: &mut MysqlConnection,
    node: &str,
    lease: Duration,
    limit: i64,
    exclude: &[String],
) -> Result<Vec<String>, DbError> {
    let ready = status_values(&live_statuses());
    let incomplete_disks = d::table.select(d::job_id).filter(d::source_uri.eq("").or(d::target_uri.eq("")));
    let candidates: Vec<String> = j::table
        .select(j::id)
        .filter(j::status.eq_any(&ready))
        .filter(claimable_by(node))
        .filter(j::id.ne_all(exclude))
        .filter(j::id.eq_any(d::table.select(d::job_id)))
        .filter(j::id.ne_all(incomplete_disks))
        .order((j::created_at.asc(), j::id.asc()))
        .limit(limit)
        .load(conn)
        .map_err(DbError::query("finding jobs to claim"))?;

    let mut claimed = Vec::with_capacity(candidates.len());
    for id in candidates {
        let updated = diesel::update(j::table)
            .filter(j::id.eq(&id))
            .filter(j::status.eq_any(&ready))
            .filter(claimable_by(node))
            .set((j::owner_node.eq(node), j::lease_expires_at.eq(lease_expiry(lease))))
            .execute(conn)
            .map_err(DbError::query(format!("claiming job '{id}'")))?;
        if updated == 1 {
            claimed.push(id);
        }
    }
    Ok(claimed)
}

/// Extends `node`'s lease on a live job. `false` means stop working on it:
/// another node owns it now, or it has finished (e.g. an operator cancelled it
/// through another appliance).
pub fn renew_lease(conn: &mut MysqlConnection, id: &str, node: &str, lease: Duration) -> Result<bool, DbError> {
    let updated = diesel::update(j::table)
        .filter(j::id.eq(id))
        .filter(j::owner_node.eq(node))
        .filter(j::status.eq_any(status_values(&live_statuses())))
        .set(j::lease_expires_at.eq(lease_expiry(lease)))
        .execute(conn)
        .map_err(DbError::query(format!("renewing the lease on job '{id}'")))?;
    Ok(updated == 1)
}

/// Gives up `node`'s ownership so that any appliance may claim the job at once
/// (a graceful stop). Returns whether `node` owned it.
pub fn release_lease(conn: &mut MysqlConnection, id: &str, node: &str) -> Result<bool, DbError> {
    let updated = diesel::update(j::table)
        .filter(j::id.eq(id))
        .filter(j::owner_node.eq(node))
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

/// Up to `limit` jobs, newest first, optionally of one status.
pub fn list_jobs(conn: &mut MysqlConnection, status: Option<JobStatus>, limit: i64) -> Result<Vec<Job>, DbError> {
    let mut query =
        j::table.select(Job::as_select()).order((j::created_at.desc(), j::id.desc())).limit(limit).into_boxed();
    if let Some(status) = status {
        query = query.filter(j::status.eq_any(status_values(&[status])));
    }
    query.load(conn).map_err(DbError::query("listing jobs"))
}

/// The number of jobs in each status, every status present (zero when none), in
/// the order of `JobStatus::ALL`.
pub fn count_jobs_by_status(conn: &mut MysqlConnection) -> Result<Vec<(JobStatus, i64)>, DbError> {
    let rows: Vec<(JobStatus, i64)> = j::table
        .group_by(j::status)
        .select((j::status, count_star()))
        .load(conn)
        .map_err(DbError::query("counting jobs by status"))?;
    // `pending` and `replicating` are two rows of the same status.
    let mut counts: BTreeMap<JobStatus, i64> = JobStatus::ALL.into_iter().map(|s| (s, 0)).collect();
    for (status, n) in rows {
        *counts.entry(status).or_default() += n;
    }
    Ok(counts.into_iter().collect())
}

/// Applies `update`. A status change happens only if the current status may
/// become the new one; without a status change, the job must still be live.
/// When refused, nothing changes and the error says why.
pub fn update_job(conn: &mut MysqlConnection, update: &JobUpdate) -> Result<(), DbError> {
    let allowed = match update.status {
        Some(to) => JobStatus::predecessors(to),
        None => live_statuses(),
    };
    let changes = (
        update.status.map(|s| j::status.eq(s.as_db())),
        update.current_operation.map(|o| j::current_operation.eq(o.as_str())),
        update.progress_percent.map(|p| j::progress_percent.eq(percent_to_decimal(p))),
        update.bytes_transferred.map(|v| j::bytes_transferred.eq(v)),
        update.total_bytes.map(|v| j::total_bytes.eq(v)),
        update.transfer_speed_bps.map(|v| j::transfer_speed_bps.eq(v)),
        update.eta_seconds.map(|v| j::eta_seconds.eq(v)),
        update.error_message.as_deref().map(|m| j::error_message.eq(m)),
        update.last_progress_at.map(|t| j::last_progress_at.eq(to_micros(t))),
        update.started_at.map(|t| j::started_at.eq(to_micros(t))),
        update.completed_at.map(|t| j::completed_at.eq(to_micros(t))),
        // Always set, so an update is never empty and always marks the row touched.
        j::updated_at.eq(utc_now()),
    );
    let target = j::table.filter(j::id.eq(&update.id)).filter(j::status.eq_any(status_values(&allowed)));
    let updated = match &update.node {
        Some(node) => diesel::update(target.filter(j::owner_node.eq(node))).set(changes).execute(conn),
        None => diesel::update(target).set(changes).execute(conn),
    }
    .map_err(DbError::query(format!("updating job '{}'", update.id)))?;
    if updated == 1 { Ok(()) } else { Err(refusal(conn, &update.id, update.node.as_deref(), update.status)?) }
}

/// Cancels a job on an operator's request and returns its new status. An
/// appliance running it notices when its next lease renewal or update is refused.
pub fn cancel_job(conn: &mut MysqlConnection, id: &str) -> Result<JobStatus, DbError> {
    let to = JobStatus::Cancelled;
    let updated = diesel::update(j::table)
        .filter(j::id.eq(id))
        .filter(j::status.eq_any(status_values(&JobStatus::predecessors(to))))
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
fn refusal(
    conn: &mut MysqlConnection,
    id: &str,
    node: Option<&str>,
    to: Option<JobStatus>,
) -> Result<DbError, DbError> {
    type Row = (String, Option<String>);
    let row: Option<Row> = j::table
        .find(id)
        .select((j::status, j::owner_node))
        .first(conn)
        .optional()
        .map_err(DbError::query(format!("reading job '{id}'")))?;
    let Some((status, owner)) = row else {
        return Ok(DbError::NotFound { job: id.to_string() });
    };
    let job = id.to_string();
    if let Some(node) = node
        && owner.as_deref() != Some(node)
    {
        return Ok(DbError::NotOwner { job, node: node.to_string() });
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
    use super::super::testing::fresh;
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

    #[test]
    fn the_orchestrators_insert_is_claimed_by_one_node_at_a_time() {
        let (db, mut conn) = fresh("orchestrator_claim");
        db.execute(ORCHESTRATOR_INSERT);

        assert_eq!(claim_jobs(&mut conn, "node-a", MINUTE, 10, &[]).unwrap(), ["job-1"]);
        let (job, disks) = load_job(&mut conn, "job-1").unwrap();
        assert_eq!(job.status, JobStatus::Pending);
        assert_eq!(job.replication_type, ReplicationType::Full);
        assert_eq!(job.owner_node.as_deref(), Some("node-a"));
        assert_near(job.lease_expires_at.unwrap(), now() + TimeDelta::seconds(60));
        assert_eq!((job.progress_percent, job.bytes_transferred, job.eta_seconds), (0.0, 0, None));
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].disk_id, "disk-2000");
        assert_eq!(disks[0].sync_status, crate::state::DiskStatus::Pending);
        assert_eq!((disks[0].resume_offset, disks[0].destination_is_zero), (0, false));
        // Claiming leaves the orchestrator's word alone; the daemon moves it on.
        assert_eq!(db.column("SELECT status AS v FROM replication_jobs"), [Some("replicating".to_string())]);

        assert!(claim_jobs(&mut conn, "node-b", MINUTE, 10, &[]).unwrap().is_empty(), "stolen while leased");
        // node-a restarted: it gets its own job back, unless it is already running it.
        assert_eq!(claim_jobs(&mut conn, "node-a", MINUTE, 10, &[]).unwrap(), ["job-1"]);
        assert!(claim_jobs(&mut conn, "node-a", MINUTE, 10, &["job-1".into()]).unwrap().is_empty());

        // node-a dies; once its lease has run out, node-b takes over.
        db.execute("UPDATE replication_jobs SET lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND");
        assert_eq!(claim_jobs(&mut conn, "node-b", MINUTE, 10, &[]).unwrap(), ["job-1"]);
        assert!(!renew_lease(&mut conn, "job-1", "node-a", MINUTE).unwrap());
        let late = JobUpdate { node: Some("node-a".into()), progress_percent: Some(50.0), ..update("job-1") };
        assert!(matches!(update_job(&mut conn, &late), Err(DbError::NotOwner { .. })));
        assert!(renew_lease(&mut conn, "job-1", "node-b", MINUTE).unwrap());
        let (job, _) = load_job(&mut conn, "job-1").unwrap();
        assert_eq!((job.owner_node.as_deref(), job.progress_percent), (Some("node-b"), 0.0));
    }

    #[test]
    fn only_ready_jobs_are_claimed_oldest_first() {
        let (db, mut conn) = fresh("claim_ready");
        insert_job(&mut conn, &new_job("no-disks"), &[]).unwrap();
        insert_job(&mut conn, &new_job("no-target"), &[disk(1), NewDisk { target_uri: String::new(), ..disk(2) }])
            .unwrap();
        insert_job(&mut conn, &new_job("no-source"), &[NewDisk { source_uri: String::new(), ..disk(1) }]).unwrap();
        for id in ["done", "ready-new", "ready-old", "ready-mid", "streaming"] {
            insert_job(&mut conn, &new_job(id), &[disk(1), disk(2)]).unwrap();
        }
        db.execute(
            "UPDATE replication_jobs SET status = 'completed' WHERE id = 'done';
             UPDATE replication_jobs SET status = 'streaming' WHERE id = 'streaming';
             UPDATE replication_jobs SET created_at = created_at - INTERVAL 3 HOUR WHERE id = 'ready-old';
             UPDATE replication_jobs SET created_at = created_at - INTERVAL 2 HOUR WHERE id = 'ready-mid';
             UPDATE replication_jobs SET created_at = created_at - INTERVAL 1 HOUR WHERE id = 'streaming';",
        );
        assert_eq!(claim_jobs(&mut conn, "n", MINUTE, 2, &[]).unwrap(), ["ready-old", "ready-mid"]);
        assert_eq!(
            claim_jobs(&mut conn, "n", MINUTE, 10, &["ready-old".into()]).unwrap(),
            ["ready-mid", "streaming", "ready-new"]
        );
        assert_eq!(
            db.column("SELECT id AS v FROM replication_jobs WHERE owner_node IS NULL ORDER BY id"),
            ["done", "no-disks", "no-source", "no-target"].map(|s| Some(s.to_string()))
        );
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
                            let got = claim_jobs(&mut conn, node, MINUTE, 3, &mine).unwrap();
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
        assert_eq!(claim_jobs(&mut conn, "a", MINUTE, 1, &[]).unwrap(), ["j"]);
        assert!(!release_lease(&mut conn, "j", "b").unwrap(), "b does not own it");
        assert!(claim_jobs(&mut conn, "b", MINUTE, 1, &[]).unwrap().is_empty());
        assert!(release_lease(&mut conn, "j", "a").unwrap());
        let (job, _) = load_job(&mut conn, "j").unwrap();
        assert_eq!((job.owner_node, job.lease_expires_at), (None, None));
        assert_eq!(claim_jobs(&mut conn, "b", MINUTE, 1, &[]).unwrap(), ["j"]);
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
        assert_eq!((row.status, row.vm_path.as_deref()), (JobStatus::Pending, Some("/dc/vm/vm1")));
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
        assert_eq!(job.status, JobStatus::Streaming);
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
            assert!(!renew_lease(&mut conn, id, "n", MINUTE).unwrap());
            assert!(claim_jobs(&mut conn, "n", MINUTE, 10, &[]).unwrap().is_empty());
            assert_eq!(load_job(&mut conn, id).unwrap(), before, "{end} changed");
        }
    }

    #[test]
    fn cancel_stops_a_live_job_and_refuses_unknown_ones() {
        let (_db, mut conn) = fresh("cancel");
        let err = cancel_job(&mut conn, "ghost").unwrap_err();
        assert_eq!(err.to_string(), "job 'ghost' not found");

        insert_job(&mut conn, &new_job("j"), &[disk(1)]).unwrap();
        assert_eq!(claim_jobs(&mut conn, "n", MINUTE, 1, &[]).unwrap(), ["j"]);
        assert_eq!(cancel_job(&mut conn, "j").unwrap(), JobStatus::Cancelled);
        let (job, _) = load_job(&mut conn, "j").unwrap();
        assert_eq!((job.status, job.error_message.as_deref()), (JobStatus::Cancelled, Some("cancelled by operator")));
        assert_near(job.completed_at.unwrap(), now());
        // The owner learns of it when it next renews its lease.
        assert!(!renew_lease(&mut conn, "j", "n", MINUTE).unwrap());
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
        assert!(counts.contains(&(JobStatus::Pending, 3)), "{counts:?}");
        assert!(counts.contains(&(JobStatus::Failed, 1)), "{counts:?}");
        assert_eq!(counts.iter().map(|(_, n)| n).sum::<i64>(), 4);
    }

    #[test]
    fn a_status_the_daemon_does_not_know_is_an_error_not_a_guess() {
        let (db, mut conn) = fresh("unknown_status");
        db.execute(ORCHESTRATOR_INSERT);
        db.execute("UPDATE replication_jobs SET status = 'paused'");
        let err = load_job(&mut conn, "job-1").unwrap_err();
        assert!(err.to_string().contains("unknown job status 'paused'"), "{err}");
        let err = update_job(&mut conn, &JobUpdate { progress_percent: Some(1.0), ..update("job-1") }).unwrap_err();
        assert_eq!(err.to_string(), "job 'job-1' has an unknown status 'paused'");
        assert!(claim_jobs(&mut conn, "n", MINUTE, 10, &[]).unwrap().is_empty());
    }
}
