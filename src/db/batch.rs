//! Many rows in few statements: the DbWriter's batch (one transaction per tick,
//! see `actors::db_exec`) writes every job row that changed in one `UPDATE`,
//! every disk row in another, every event in one `INSERT ... SELECT`, and
//! renews every lease due in one `UPDATE` and one `SELECT`, instead of one
//! statement per row.
//!
//! Each keeps the rules of its one-row counterpart in `jobs`, `disks` and
//! `events`, row by row: a row is written only while the update's owner holds
//! the job, a job's status only along the state machine (`status IN
//! (predecessors)`), figures only forward (`GREATEST`). The per-row values are
//! `CASE` arms keyed by the row, and so are the per-row conditions in the
//! `WHERE`, after an `IN` list of the rows' keys; only the columns some row sets are named. The values are bound, never
//! formatted into the statement, except the daemon's own status words and
//! integers (as in `jobs`).
//!
//! A row that a statement leaves alone was refused (another owner holds the
//! job, the transition is illegal, the row is gone): the functions return those
//! rows with the reason, read afterwards, for the caller to log; the other rows
//! are written. An error of the statement itself fails the whole group.

use chrono::NaiveDateTime;
use diesel::mysql::{Mysql, MysqlConnection};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Datetime, Nullable, Numeric, Text};

use super::DbError;
use super::jobs::{lease_expiry_sql, refusal, status_in};
use super::models::{DiskUpdate, JobUpdate, NewJobEvent, Owner, live_statuses, percent_to_decimal, to_micros};
use crate::state::JobStatus;

/// Rows per statement, so that a statement stays far below the server's
/// `max_allowed_packet` and its bind limit.
pub const CHUNK: usize = 200;

/// One bound value.
enum Value {
    Text(Option<String>),
    Int(i64),
    Percent(f64),
    Time(Option<NaiveDateTime>),
}

/// A statement and its bound values, in order.
#[derive(Default)]
struct Statement {
    sql: String,
    values: Vec<Value>,
}

impl Statement {
    fn sql(&mut self, s: &str) -> &mut Self {
        self.sql.push_str(s);
        self
    }

    fn bind(&mut self, v: Value) -> &mut Self {
        self.sql.push('?');
        self.values.push(v);
        self
    }

    fn text(&mut self, s: &str) -> &mut Self {
        self.bind(Value::Text(Some(s.to_string())))
    }

    /// `id = ? AND owner_node = ? AND owner_run = ?`: job `job`'s row while
    /// `owner` holds it (the fence of every write of a job's rows).
    fn held(&mut self, job: &str, owner: &Owner) -> &mut Self {
        self.sql("id = ")
            .text(job)
            .sql(" AND owner_node = ")
            .text(&owner.node)
            .sql(" AND owner_run = ")
            .text(&owner.run)
    }

    fn query(self) -> diesel::query_builder::BoxedSqlQuery<'static, Mysql, diesel::query_builder::SqlQuery> {
        let mut q = diesel::sql_query(self.sql).into_boxed::<Mysql>();
        for v in self.values {
            q = match v {
                Value::Text(s) => q.bind::<Nullable<Text>, _>(s),
                Value::Int(i) => q.bind::<BigInt, _>(i),
                Value::Percent(p) => q.bind::<Numeric, _>(percent_to_decimal(p)),
                Value::Time(t) => q.bind::<Nullable<Datetime>, _>(t.map(to_micros)),
            };
        }
        q
    }

    fn execute(self, conn: &mut MysqlConnection, what: &str) -> Result<usize, DbError> {
        self.query().execute(conn).map_err(DbError::query(what.to_string()))
    }
}

/// Writes a row's part of a statement (a value, a key) into it; `Some` if the
/// row has one.
type Part<'r, R> = Box<dyn Fn(&R, &mut Statement) -> Option<()> + 'r>;
/// Writes a row's key values.
type Keys<'k, R> = &'k dyn Fn(&R, &mut Statement);
/// (id, status, owner node, owner run) of a job as it is.
type JobNow = (String, String, Option<String>, Option<String>);

/// One column's `CASE`: `column = CASE WHEN <key> THEN <value> ... ELSE column END`,
/// built from the rows that set it; nothing when none does.
struct Column<'r, R> {
    name: &'static str,
    /// The row's value: `Some(write)` where `write` binds the new value (or
    /// writes an expression of it) into the statement.
    value: Part<'r, R>,
}

/// `UPDATE <table> SET <cases>, updated_at = UTC_TIMESTAMP(6) WHERE <keys> IN
/// (...) AND CASE WHEN <key> THEN <conditions> ... END` for `rows`: `key` writes a row's key condition
/// (bound), `cond` its extra conditions (owner, status), `keys` names the
/// table's unique key and `key_values` binds a row's. The `IN` list makes every
/// row a point lookup on that key, so the statement locks only its own rows:
/// two daemons writing their own jobs never wait for each other (a scan of the
/// rows' conditions would lock every row it passes, and deadlock them).
fn update_rows<R>(
    table: &str,
    rows: &[R],
    columns: &[Column<'_, R>],
    (keys, key_values): (&str, Keys<'_, R>),
    key: impl Fn(&R, &mut Statement),
    cond: impl Fn(&R, &mut Statement),
) -> Statement {
    let mut st = Statement::default();
    st.sql("UPDATE ").sql(table).sql(" SET ");
    for c in columns {
        // Whether any row sets this column: a dry run into a scratch statement.
        if !rows.iter().any(|r| (c.value)(r, &mut Statement::default()).is_some()) {
            continue;
        }
        st.sql(c.name).sql(" = CASE");
        for r in rows {
            let mut arm = Statement::default();
            if (c.value)(r, &mut arm).is_some() {
                st.sql(" WHEN ");
                key(r, &mut st);
                st.sql(" THEN ").sql(&arm.sql);
                st.values.extend(arm.values);
            }
        }
        st.sql(" ELSE ").sql(c.name).sql(" END, ");
    }
    st.sql("updated_at = UTC_TIMESTAMP(6) WHERE ").sql(keys).sql(" IN (");
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            st.sql(", ");
        }
        key_values(r, &mut st);
    }
    // The rows' own conditions as one CASE, which the range optimizer leaves
    // alone: an OR of a few hundred conditions costs it far more than the
    // update itself.
    st.sql(") AND CASE");
    for r in rows {
        st.sql(" WHEN ");
        key(r, &mut st);
        st.sql(" THEN (TRUE");
        cond(r, &mut st);
        st.sql(")");
    }
    st.sql(" ELSE FALSE END");
    st
}

/// A column set to the bound value.
fn set<'r, R>(name: &'static str, get: impl Fn(&R) -> Option<Value> + 'r) -> Column<'r, R> {
    Column {
        name,
        value: Box::new(move |r, st| {
            let v = get(r)?;
            st.bind(v);
            Some(())
        }),
    }
}

/// A column that only grows: `GREATEST(column, value)`.
fn grow<'r, R>(name: &'static str, get: impl Fn(&R) -> Option<Value> + 'r) -> Column<'r, R> {
    Column {
        name,
        value: Box::new(move |r, st| {
            let v = get(r)?;
            st.sql("GREATEST(").sql(name).sql(", ").bind(v).sql(")");
            Some(())
        }),
    }
}

fn text(s: &Option<String>) -> Option<Value> {
    s.clone().map(|s| Value::Text(Some(s)))
}

fn time(t: Option<NaiveDateTime>) -> Option<Value> {
    t.map(|t| Value::Time(Some(t)))
}

/// Applies `updates` (at most one per job) in one statement per [`CHUNK`];
/// returns the refused ones (index into `updates`) with the reason.
pub fn update_jobs(conn: &mut MysqlConnection, updates: &[JobUpdate]) -> Result<Vec<(usize, DbError)>, DbError> {
    let mut refused = Vec::new();
    for (n, chunk) in updates.chunks(CHUNK).enumerate() {
        let columns: [Column<'_, JobUpdate>; 12] = [
            set("status", |u: &JobUpdate| u.status.map(|s| Value::Text(Some(s.as_db().to_string())))),
            set("current_operation", |u: &JobUpdate| {
                u.current_operation.map(|o| Value::Text(Some(o.as_str().to_string())))
            }),
            grow("progress_percent", |u: &JobUpdate| u.progress_percent.map(Value::Percent)),
            grow("bytes_transferred", |u: &JobUpdate| u.bytes_transferred.map(Value::Int)),
            set("total_bytes", |u: &JobUpdate| u.total_bytes.map(Value::Int)),
            set("transfer_speed_bps", |u: &JobUpdate| u.transfer_speed_bps.map(Value::Int)),
            set("eta_seconds", |u: &JobUpdate| u.eta_seconds.map(Value::Int)),
            set("error_message", |u: &JobUpdate| text(&u.error_message)),
            set("last_progress_at", |u: &JobUpdate| time(u.last_progress_at)),
            set("started_at", |u: &JobUpdate| time(u.started_at)),
            set("completed_at", |u: &JobUpdate| time(u.completed_at)),
            set("vmware_snapshot", |u: &JobUpdate| u.vmware_snapshot.clone().map(Value::Text)),
        ];
        let st = update_rows(
            "replication_jobs",
            chunk,
            &columns,
            ("id", &|u: &JobUpdate, st: &mut Statement| {
                st.text(&u.id);
            }),
            |u, st| {
                st.sql("id = ").text(&u.id);
            },
            |u, st| {
                if let Some(owner) = &u.owner {
                    st.sql(" AND owner_node = ").text(&owner.node).sql(" AND owner_run = ").text(&owner.run);
                }
                let allowed = match u.status {
                    Some(to) => JobStatus::predecessors(to),
                    None => live_statuses(),
                };
                st.sql(" AND ").sql(&status_in("status", &allowed));
            },
        );
        let updated = st.execute(conn, &format!("updating {} jobs", chunk.len()))?;
        if updated == chunk.len() {
            continue;
        }
        // Which rows were left alone: after the statement, a row that was
        // written holds its owner and its new status (or a live one). A row that
        // holds a status which may not follow itself (a terminal one) either
        // became it now or was it already and was refused; the count decides.
        let now = current_jobs(conn, chunk.iter().map(|u| u.id.as_str()))?;
        let (mut sure, mut unsure) = (Vec::new(), Vec::new());
        for (i, u) in chunk.iter().enumerate() {
            let row = now.iter().find(|(id, ..)| id == &u.id);
            let written = row.is_some_and(|(_, status, node, run)| {
                u.owner.as_ref().is_none_or(|o| node.as_deref() == Some(&o.node) && run.as_deref() == Some(&o.run))
                    && match u.status {
                        Some(to) => status == to.as_db(),
                        None => JobStatus::from_db(status).is_some_and(|s| !s.is_terminal()),
                    }
            });
            match u.status {
                _ if !written => sure.push(i),
                Some(to) if !JobStatus::predecessors(to).contains(&to) => unsure.push(i),
                _ => {}
            }
        }
        let left_alone = chunk.len() - updated;
        if sure.len() < left_alone && unsure.len() == left_alone - sure.len() {
            sure.append(&mut unsure);
        }
        for i in sure {
            let u = &chunk[i];
            refused.push((n * CHUNK + i, refusal(conn, &u.id, u.owner.as_ref(), u.status)?));
        }
    }
    Ok(refused)
}

/// (id, status, owner node, owner run) of the jobs `ids`.
fn current_jobs<'a>(conn: &mut MysqlConnection, ids: impl Iterator<Item = &'a str>) -> Result<Vec<JobNow>, DbError> {
    use super::schema::replication_jobs as j;
    let ids: Vec<&str> = ids.collect();
    j::table
        .filter(j::id.eq_any(&ids))
        .select((j::id, j::status, j::owner_node, j::owner_run))
        .load(conn)
        .map_err(DbError::query(format!("reading {} jobs", ids.len())))
}

/// Applies `updates` (at most one per disk), each only while its owner holds
/// the disk's job, in one statement per [`CHUNK`]; returns the refused ones
/// (index into `updates`) with the reason.
pub fn update_disks(
    conn: &mut MysqlConnection,
    updates: &[(&Owner, &DiskUpdate)],
) -> Result<Vec<(usize, DbError)>, DbError> {
    let mut refused = Vec::new();
    for (n, chunk) in updates.chunks(CHUNK).enumerate() {
        type Row<'a> = (&'a Owner, &'a DiskUpdate);
        let columns: [Column<'_, Row<'_>>; 11] = [
            set("sync_status", |(_, u): &Row<'_>| u.sync_status.map(|s| Value::Text(Some(s.as_db().to_string())))),
            set("capacity_bytes", |(_, u): &Row<'_>| u.capacity_bytes.map(Value::Int)),
            set("planned_bytes", |(_, u): &Row<'_>| u.planned_bytes.map(Value::Int)),
            grow("bytes_synced", |(_, u): &Row<'_>| u.bytes_synced.map(Value::Int)),
            set("skipped_bytes", |(_, u): &Row<'_>| u.skipped_bytes.map(Value::Int)),
            grow("sync_progress_percent", |(_, u): &Row<'_>| u.sync_progress_percent.map(Value::Percent)),
            set("throughput_bps", |(_, u): &Row<'_>| u.throughput_bps.map(Value::Int)),
            set("error_message", |(_, u): &Row<'_>| u.error_message.clone().map(Value::Text)),
            set("disk_change_id", |(_, u): &Row<'_>| text(&u.disk_change_id)),
            set("change_id", |(_, u): &Row<'_>| text(&u.change_id)),
            Column {
                name: "resume_offset",
                value: Box::new(|(_, u), st| {
                    let o = u.resume_offset?;
                    // A restart sets the offset as it is; otherwise it only grows.
                    match u.restart {
                        true => st.bind(Value::Int(o)),
                        false => st.sql("GREATEST(resume_offset, ").bind(Value::Int(o)).sql(")"),
                    };
                    Some(())
                }),
            },
        ];
        let st = update_rows(
            "vm_disks",
            chunk,
            &columns,
            // The first column of the unique key (job, disk): a plain list.
            ("job_id", &|(_, u): &Row<'_>, st: &mut Statement| {
                st.text(&u.job_id);
            }),
            |(_, u), st| {
                st.sql("job_id = ").text(&u.job_id).sql(" AND disk_id = ").text(&u.disk_id);
            },
            |(owner, u), st| {
                st.sql(" AND job_id IN (SELECT id FROM replication_jobs WHERE ").held(&u.job_id, owner).sql(")");
            },
        );
        let updated = st.execute(conn, &format!("updating {} disks", chunk.len()))?;
        if updated == chunk.len() {
            continue;
        }
        for (i, (owner, u)) in chunk.iter().enumerate() {
            // The owner and the row decide; nothing a write changes.
            let mut st = Statement::default();
            st.sql("SELECT COUNT(*) AS n FROM vm_disks WHERE job_id = ")
                .text(&u.job_id)
                .sql(" AND disk_id = ")
                .text(&u.disk_id)
                .sql(" AND job_id IN (SELECT id FROM replication_jobs WHERE ")
                .held(&u.job_id, owner)
                .sql(")");
            let held: Count =
                st.query().get_result(conn).map_err(DbError::query("checking a disk's owner".to_string()))?;
            if held.n == 0 {
                let why = match refusal(conn, &u.job_id, Some(owner), None)? {
                    e @ (DbError::NotOwner { .. } | DbError::NotFound { .. }) => e,
                    _ => DbError::DiskNotFound { job: u.job_id.clone(), disk: u.disk_id.clone() },
                };
                refused.push((n * CHUNK + i, why));
            }
        }
    }
    Ok(refused)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Inserts `events`, each only while its owner holds its job, in one
/// `INSERT ... SELECT ... UNION ALL ...` per [`CHUNK`]; returns how many were.
pub fn insert_owned_events(conn: &mut MysqlConnection, events: &[(&Owner, &NewJobEvent)]) -> Result<usize, DbError> {
    let mut written = 0;
    for chunk in events.chunks(CHUNK) {
        let mut st = Statement::default();
        st.sql("INSERT INTO job_events (job_id, disk_id, correlation_id, level, stage, message, created_at) ");
        for (i, (owner, ev)) in chunk.iter().enumerate() {
            if i > 0 {
                st.sql(" UNION ALL ");
            }
            st.sql("SELECT id, ")
                .bind(Value::Text(ev.disk_id.clone()))
                .sql(", ")
                .text(&ev.correlation_id)
                .sql(", ")
                .text(&ev.level)
                .sql(", ")
                .text(&ev.stage)
                .sql(", ")
                .text(&ev.message)
                .sql(", COALESCE(")
                .bind(Value::Time(ev.created_at))
                .sql(", UTC_TIMESTAMP(6)) FROM replication_jobs WHERE ")
                .held(&ev.job_id, owner);
        }
        written += st.execute(conn, &format!("inserting {} events", chunk.len()))?;
    }
    Ok(written)
}

/// Renews the leases of `jobs` (id and owner) by `lease` in one `UPDATE` and
/// one `SELECT` per [`CHUNK`], with the rules of `jobs::renew_lease`; returns,
/// per job in order, `Some(max_rate)` if the owner still holds it (the row's
/// limit as it is now), `None` if not.
pub fn renew_leases(
    conn: &mut MysqlConnection,
    jobs: &[(&str, &Owner)],
    lease: std::time::Duration,
) -> Result<Vec<Option<Option<i64>>>, DbError> {
    let mut held = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(CHUNK) {
        let expiry = lease_expiry_sql(lease);
        let mut st = Statement::default();
        // Naming `updated_at` keeps its ON UPDATE from firing (see `jobs::renew_lease`).
        st.sql("UPDATE replication_jobs SET lease_expires_at = ")
            .sql(&expiry)
            .sql(", updated_at = updated_at WHERE ")
            .sql(&status_in("status", &live_statuses()))
            .sql(" AND id IN (");
        for (i, (id, _)) in chunk.iter().enumerate() {
            if i > 0 {
                st.sql(", ");
            }
            st.text(id);
        }
        st.sql(") AND CASE id");
        for (id, owner) in chunk {
            st.sql(" WHEN ")
                .text(id)
                .sql(" THEN owner_node = ")
                .text(&owner.node)
                .sql(" AND owner_run = ")
                .text(&owner.run);
        }
        st.sql(" ELSE FALSE END");
        st.execute(conn, &format!("renewing {} leases", chunk.len()))?;
        // Read back in the same transaction: a job this run holds and that is
        // live had its lease renewed just now.
        use super::schema::replication_jobs as j;
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| *id).collect();
        type Row = (String, String, Option<String>, Option<String>, Option<i64>);
        let rows: Vec<Row> = j::table
            .filter(j::id.eq_any(&ids))
            .select((j::id, j::status, j::owner_node, j::owner_run, j::max_rate))
            .load(conn)
            .map_err(DbError::query(format!("reading {} leases", ids.len())))?;
        for (id, owner) in chunk {
            let row = rows.iter().find(|(i, status, node, run, _)| {
                i == id
                    && node.as_deref() == Some(&owner.node)
                    && run.as_deref() == Some(&owner.run)
                    && JobStatus::from_db(status).is_some_and(|s| !s.is_terminal())
            });
            held.push(row.map(|r| r.4));
        }
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::models::{NewDisk, NewJob};
    use super::super::testing::fresh;
    use super::super::{claim_jobs, insert_job};
    use super::*;
    use crate::state::ReplicationType;

    const MINUTE: Duration = Duration::from_secs(60);

    /// `n` one-disk jobs, claimed by node `n`; their owners in order.
    fn claimed_jobs(conn: &mut MysqlConnection, n: usize) -> Vec<(String, Owner)> {
        for i in 0..n {
            let job = NewJob {
                id: format!("job-{i:03}"),
                vm_name: format!("vm-{i}"),
                vm_path: None,
                replication_type: ReplicationType::Full,
                nbd_export_name: None,
                vmware_vcenter: None,
                vmware_vm: None,
                skip_change_check: false,
                max_rate: None,
            };
            let disk = NewDisk {
                disk_id: "disk-1".into(),
                source_uri: "nbd://src".into(),
                target_uri: "nbd://dst".into(),
                ..NewDisk::default()
            };
            insert_job(conn, &job, &[disk]).unwrap();
        }
        let mut owners = claim_jobs(conn, "n", MINUTE, n as i64, &[]).unwrap();
        owners.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(owners.len(), n);
        owners
    }

    /// The connection's count of statements of one kind (`COM_UPDATE`, ...).
    fn statements(conn: &mut MysqlConnection, kind: &str) -> i64 {
        #[derive(QueryableByName)]
        struct V {
            #[diesel(sql_type = Text)]
            v: String,
        }
        let sql =
            format!("SELECT VARIABLE_VALUE AS v FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME = '{kind}'");
        diesel::sql_query(sql).get_result::<V>(conn).unwrap().v.parse().unwrap()
    }

    #[test]
    fn many_jobs_are_written_in_one_statement_per_chunk_and_each_row_keeps_its_rules() {
        let (db, mut conn) = fresh("batch_jobs");
        let n = CHUNK + 50;
        let jobs = claimed_jobs(&mut conn, n);
        // Job 0 was taken over by another run; job 1 cannot go back to pending.
        db.execute("UPDATE replication_jobs SET owner_run = 'other' WHERE id = 'job-000'");
        db.execute("UPDATE replication_jobs SET status = 'streaming' WHERE id = 'job-001'");
        let updates: Vec<JobUpdate> = jobs
            .iter()
            .enumerate()
            .map(|(i, (id, owner))| JobUpdate {
                id: id.clone(),
                owner: Some(owner.clone()),
                status: (i == 1).then_some(JobStatus::Pending),
                progress_percent: Some(i as f64 / 10.0),
                bytes_transferred: Some(i as i64 * 1000),
                eta_seconds: Some(7),
                ..JobUpdate::default()
            })
            .collect();
        let before = statements(&mut conn, "COM_UPDATE");
        let refused = update_jobs(&mut conn, &updates).unwrap();
        assert_eq!(statements(&mut conn, "COM_UPDATE") - before, 2, "one UPDATE per chunk of {CHUNK}");
        assert!(
            matches!(refused.as_slice(), [(0, DbError::NotOwner { .. }), (1, DbError::IllegalTransition { .. })]),
            "{refused:?}"
        );
        let bytes = db.column("SELECT CAST(bytes_transferred AS CHAR) AS v FROM replication_jobs ORDER BY id");
        let eta = db.column("SELECT CAST(eta_seconds AS CHAR) AS v FROM replication_jobs ORDER BY id");
        for i in 0..n {
            let (want_bytes, want_eta) = if i < 2 { (0, None) } else { (i * 1000, Some("7")) };
            assert_eq!(bytes[i].as_deref(), Some(want_bytes.to_string().as_str()), "job {i}");
            assert_eq!(eta[i].as_deref(), want_eta, "job {i}");
        }
        // Figures only grow: a late, lower write leaves them.
        let late = JobUpdate { bytes_transferred: Some(5), progress_percent: Some(0.0), ..updates[9].clone() };
        assert!(update_jobs(&mut conn, &[late]).unwrap().is_empty());
        assert_eq!(
            db.column("SELECT CAST(bytes_transferred AS CHAR) AS v FROM replication_jobs WHERE id = 'job-009'"),
            [Some("9000".to_string())]
        );
    }

    #[test]
    fn many_disks_are_written_in_one_statement_and_only_while_their_owner_holds_the_job() {
        let (db, mut conn) = fresh("batch_disks");
        let jobs = claimed_jobs(&mut conn, 30);
        db.execute("UPDATE replication_jobs SET owner_run = 'other' WHERE id = 'job-003'");
        db.execute("UPDATE vm_disks SET resume_offset = 4096");
        let updates: Vec<DiskUpdate> = jobs
            .iter()
            .enumerate()
            .map(|(i, (id, _))| DiskUpdate {
                job_id: id.clone(),
                disk_id: "disk-1".into(),
                bytes_synced: Some(i as i64),
                // Job 5 starts over: its offset is set as it is, lower or not.
                resume_offset: Some(if i == 5 { 512 } else { 1024 }),
                restart: i == 5,
                error_message: (i == 6).then(|| Some("bad".into())),
                ..DiskUpdate::default()
            })
            .collect();
        let rows: Vec<(&Owner, &DiskUpdate)> = jobs.iter().map(|(_, o)| o).zip(&updates).collect();
        let before = statements(&mut conn, "COM_UPDATE");
        let refused = update_disks(&mut conn, &rows).unwrap();
        assert_eq!(statements(&mut conn, "COM_UPDATE") - before, 1);
        assert!(matches!(refused.as_slice(), [(3, DbError::NotOwner { .. })]), "{refused:?}");
        let offsets = db.column("SELECT CAST(resume_offset AS CHAR) AS v FROM vm_disks ORDER BY job_id");
        assert_eq!(offsets[4].as_deref(), Some("4096"), "a checkpoint never goes back");
        assert_eq!(offsets[5].as_deref(), Some("512"), "unless the copy starts over");
        let synced = db.column("SELECT CAST(bytes_synced AS CHAR) AS v FROM vm_disks ORDER BY job_id");
        assert_eq!((synced[3].as_deref(), synced[29].as_deref()), (Some("0"), Some("29")));
        assert_eq!(db.column("SELECT error_message AS v FROM vm_disks WHERE job_id = 'job-006'"), [Some("bad".into())]);
    }

    #[test]
    fn leases_are_renewed_together_and_a_lost_job_says_so() {
        let (db, mut conn) = fresh("batch_leases");
        let jobs = claimed_jobs(&mut conn, 3);
        db.execute("UPDATE replication_jobs SET owner_run = 'other' WHERE id = 'job-002'");
        db.execute("UPDATE replication_jobs SET max_rate = 1000 WHERE id = 'job-001'");
        db.execute("UPDATE replication_jobs SET lease_expires_at = UTC_TIMESTAMP(6)");
        let ids: Vec<(&str, &Owner)> = jobs.iter().map(|(id, o)| (id.as_str(), o)).collect();
        let held = renew_leases(&mut conn, &ids, Duration::from_secs(3600)).unwrap();
        assert_eq!(held, [Some(None), Some(Some(1000)), None]);
        let later = "SELECT CAST(lease_expires_at > UTC_TIMESTAMP(6) + INTERVAL 59 MINUTE AS CHAR) AS v \
                     FROM replication_jobs ORDER BY id";
        assert_eq!(db.column(later), [Some("1".into()), Some("1".into()), Some("0".into())]);
    }

    #[test]
    fn events_are_inserted_together_and_only_for_jobs_their_owner_holds() {
        let (db, mut conn) = fresh("batch_events");
        let jobs = claimed_jobs(&mut conn, 2);
        db.execute("UPDATE replication_jobs SET owner_run = 'other' WHERE id = 'job-001'");
        let event = |job: &str, m: &str| NewJobEvent {
            job_id: job.into(),
            disk_id: None,
            correlation_id: "c".into(),
            level: "info".into(),
            stage: "transfer".into(),
            message: m.into(),
            created_at: None,
        };
        let (a, b, c) = (event("job-000", "one"), event("job-001", "lost"), event("job-000", "two"));
        let rows = [(&jobs[0].1, &a), (&jobs[1].1, &b), (&jobs[0].1, &c)];
        assert_eq!(insert_owned_events(&mut conn, &rows).unwrap(), 2);
        assert_eq!(
            db.column("SELECT message AS v FROM job_events ORDER BY id"),
            [Some("one".to_string()), Some("two".to_string())]
        );
    }
}
