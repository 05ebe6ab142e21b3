//! Disks of a job: their progress and status, their durable checkpoints, and
//! the CBT history that records what each copy made the target consistent with.
//!
//! Every write here names the job's [`Owner`] (node and run): a disk row or a
//! history row changes only while that owner holds the job (see `jobs`).
//! Checkpoints and progress figures only move forward (`GREATEST`), so a late or
//! repeated write from a slower path, or the first figures of a resumed run, can
//! never send a resumed copy back over data it has not re-read, nor forward past
//! data that is not durable (the engine reports only flushed watermarks), nor a
//! percentage down. Disk status transitions are the JobAggregator's business and
//! are not guarded here; job status transitions are (see `jobs`).

use std::collections::BTreeMap;

use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Double, Integer, Nullable, Text};

use super::DbError;
use super::models::{CbtRecord, DiskUpdate, Owner};
use super::schema::cbt_history as c;

/// Applies `update` to one disk, if `owner` holds its job.
pub fn update_disk(conn: &mut MysqlConnection, owner: &Owner, update: &DiskUpdate) -> Result<(), DbError> {
    match super::batch::update_disks(conn, &[(owner, update)])?.pop() {
        Some((_, why)) => Err(why),
        None => Ok(()),
    }
}

/// Writes the CBT history row of one disk for one attempt of its job, if
/// `owner` holds the job, replacing a row the same attempt wrote before: an
/// attempt never has two rows for a disk, a new attempt adds one. Returns
/// whether `owner` held the job.
pub fn record_cbt(conn: &mut MysqlConnection, owner: &Owner, record: &CbtRecord) -> Result<bool, DbError> {
    // INSERT ... SELECT from the job's row: nothing is inserted unless the owner
    // holds it, in the same statement.
    let written = diesel::sql_query(
        "INSERT INTO cbt_history (job_id, disk_id, attempt, change_id, previous_change_id, sync_type, \
           blocks_changed, bytes_transferred, sync_duration_seconds, sync_success) \
         SELECT id, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM replication_jobs \
           WHERE id = ? AND owner_node = ? AND owner_run = ? \
         ON DUPLICATE KEY UPDATE change_id = VALUES(change_id), previous_change_id = VALUES(previous_change_id), \
           sync_type = VALUES(sync_type), blocks_changed = VALUES(blocks_changed), \
           bytes_transferred = VALUES(bytes_transferred), sync_duration_seconds = VALUES(sync_duration_seconds), \
           sync_success = VALUES(sync_success)",
    )
    .bind::<Text, _>(&record.disk_id)
    .bind::<Integer, _>(record.attempt)
    .bind::<Nullable<Text>, _>(&record.change_id)
    .bind::<Nullable<Text>, _>(&record.previous_change_id)
    .bind::<Text, _>(record.sync_type.as_str())
    .bind::<BigInt, _>(record.blocks_changed)
    .bind::<BigInt, _>(record.bytes_transferred)
    .bind::<Double, _>(record.sync_duration_seconds)
    .bind::<Bool, _>(record.sync_success)
    .bind::<Text, _>(&record.job_id)
    .bind::<Text, _>(&owner.node)
    .bind::<Text, _>(&owner.run)
    .execute(conn)
    .map_err(DbError::query(format!(
        "recording CBT history of disk '{}' of job '{}'",
        record.disk_id, record.job_id
    )))?;
    Ok(written > 0)
}

/// The base of each disk's change-ID chain: for every disk of job `job`, the
/// `change_id` of the last successful sync (`sync_success = 1`, newest
/// `created_at`) that `cbt_history` records for the same disk id of a job of the
/// same VM (`replication_jobs.vm_name`), other than `job` itself. A disk without
/// such a row is absent; a row without a change ID maps to `None`.
pub fn last_change_ids(
    conn: &mut MysqlConnection,
    job: &str,
    vm_name: &str,
) -> Result<BTreeMap<String, Option<String>>, DbError> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        disk_id: String,
        #[diesel(sql_type = Nullable<Text>)]
        change_id: Option<String>,
    }
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT c.disk_id, c.change_id FROM cbt_history c JOIN replication_jobs j ON j.id = c.job_id \
         WHERE j.vm_name = ? AND c.job_id <> ? AND c.sync_success \
           AND c.disk_id IN (SELECT disk_id FROM vm_disks WHERE job_id = ?) \
         ORDER BY c.created_at DESC, c.id DESC",
    )
    .bind::<Text, _>(vm_name)
    .bind::<Text, _>(job)
    .bind::<Text, _>(job)
    .load(conn)
    .map_err(DbError::query(format!("reading the change-ID chain of the disks of job '{job}'")))?;
    let mut last = BTreeMap::new();
    for Row { disk_id, change_id } in rows {
        // Newest first: the first row of a disk is its last sync.
        last.entry(disk_id).or_insert(change_id);
    }
    Ok(last)
}

/// The CBT history of a job, one record per disk and attempt, in disk id and
/// attempt order.
pub fn load_cbt(conn: &mut MysqlConnection, job: &str) -> Result<Vec<CbtRecord>, DbError> {
    c::table
        .filter(c::job_id.eq(job))
        .order((c::disk_id.asc(), c::attempt.asc()))
        .select(CbtRecord::as_select())
        .load(conn)
        .map_err(DbError::query(format!("loading CBT history of job '{job}'")))
}

#[cfg(test)]
mod tests {
    use super::super::testing::fresh;
    use super::super::{NewDisk, NewJob, insert_job, load_job};
    use super::*;
    use crate::state::{DiskStatus, ReplicationType};

    fn owner() -> Owner {
        Owner { node: "n".into(), run: "r1".into() }
    }

    /// A database with job `j` (owned by [`owner`]) and its disks `disk-1` and `disk-2`.
    fn setup(prefix: &str) -> (super::super::testing::mariadb::TestDb, MysqlConnection) {
        let (db, mut conn) = fresh(prefix);
        let job = NewJob {
            id: "j".into(),
            vm_name: "vm".into(),
            vm_path: None,
            replication_type: ReplicationType::Incremental,
            nbd_export_name: None,
            vmware_vcenter: None,
            vmware_vm: None,
            skip_change_check: false,
            max_rate: None,
        };
        let disk = |id: &str| NewDisk {
            disk_id: id.into(),
            source_uri: "nbd://src/x".into(),
            target_uri: "nbd://dst/x".into(),
            ..NewDisk::default()
        };
        insert_job(&mut conn, &job, &[disk("disk-1"), disk("disk-2")]).unwrap();
        db.execute("UPDATE replication_jobs SET owner_node = 'n', owner_run = 'r1'");
        (db, conn)
    }

    fn resume_offset(conn: &mut MysqlConnection, disk: &str) -> i64 {
        load_job(conn, "j").unwrap().1.into_iter().find(|d| d.disk_id == disk).unwrap().resume_offset
    }

    #[test]
    fn checkpoints_only_move_forward() {
        let (_db, mut conn) = setup("checkpoints");
        for (offset, expected) in
            [(1 << 20, 1 << 20), (4096, 1 << 20), (1 << 20, 1 << 20), (3 << 30, 3 << 30), (0, 3 << 30)]
        {
            let u = DiskUpdate {
                job_id: "j".into(),
                disk_id: "disk-1".into(),
                resume_offset: Some(offset),
                ..DiskUpdate::default()
            };
            update_disk(&mut conn, &owner(), &u).unwrap();
            assert_eq!(resume_offset(&mut conn, "disk-1"), expected, "after {offset}");
        }
        assert_eq!(resume_offset(&mut conn, "disk-2"), 0, "the other disk moved");
        let u = DiskUpdate {
            job_id: "j".into(),
            disk_id: "disk-9".into(),
            resume_offset: Some(1),
            ..DiskUpdate::default()
        };
        let err = update_disk(&mut conn, &owner(), &u).unwrap_err();
        assert_eq!(err.to_string(), "disk 'disk-9' of job 'j' not found");
    }

    #[test]
    fn update_disk_writes_what_is_given_and_can_clear_the_error() {
        let (_db, mut conn) = setup("update_disk");
        let base = DiskUpdate { job_id: "j".into(), disk_id: "disk-2".into(), ..DiskUpdate::default() };
        update_disk(
            &mut conn,
            &owner(),
            &DiskUpdate {
                sync_status: Some(DiskStatus::Failed),
                capacity_bytes: Some(10 << 30),
                planned_bytes: Some(4 << 30),
                bytes_synced: Some(1 << 30),
                skipped_bytes: Some(6 << 30),
                sync_progress_percent: Some(25.0),
                throughput_bps: Some(123_456_789),
                error_message: Some(Some("EIO at offset 1073741824".into())),
                ..base.clone()
            },
        )
        .unwrap();
        let disks = load_job(&mut conn, "j").unwrap().1;
        let (untouched, d) = (&disks[0], &disks[1]);
        assert_eq!(d.sync_status, DiskStatus::Failed.into());
        assert_eq!(
            (d.capacity_bytes, d.planned_bytes, d.bytes_synced, d.skipped_bytes),
            (10 << 30, 4 << 30, 1 << 30, 6 << 30)
        );
        assert_eq!((d.sync_progress_percent, d.throughput_bps), (25.0, 123_456_789));
        assert_eq!(d.error_message.as_deref(), Some("EIO at offset 1073741824"));
        assert_eq!((untouched.sync_status.clone(), untouched.bytes_synced), (DiskStatus::Pending.into(), 0));

        // A retry: clear the error, leave the figures.
        let retry = DiskUpdate { sync_status: Some(DiskStatus::Streaming), error_message: Some(None), ..base.clone() };
        update_disk(&mut conn, &owner(), &retry).unwrap();
        let done = DiskUpdate {
            sync_status: Some(DiskStatus::Completed),
            disk_change_id: Some("52 aa-1/7".into()),
            ..base.clone()
        };
        update_disk(&mut conn, &owner(), &done).unwrap();
        let d = load_job(&mut conn, "j").unwrap().1.remove(1);
        assert_eq!((d.sync_status, d.error_message, d.bytes_synced), (DiskStatus::Completed.into(), None, 1 << 30));
        assert_eq!(d.disk_change_id.as_deref(), Some("52 aa-1/7"));

        let err = update_disk(&mut conn, &owner(), &DiskUpdate { disk_id: "nope".into(), ..base }).unwrap_err();
        assert!(matches!(err, DbError::DiskNotFound { .. }), "{err}");
    }

    #[test]
    fn recording_cbt_twice_in_one_attempt_leaves_one_row_with_the_latest_values() {
        let (db, mut conn) = setup("cbt");
        let first = CbtRecord {
            job_id: "j".into(),
            disk_id: "disk-1".into(),
            attempt: 1,
            change_id: Some("52 aa-1/7".into()),
            previous_change_id: Some("52 aa-1/6".into()),
            sync_type: ReplicationType::Incremental,
            blocks_changed: 12,
            bytes_transferred: 1 << 20,
            sync_duration_seconds: 1.5,
            sync_success: false,
        };
        record_cbt(&mut conn, &owner(), &first).unwrap();
        // The job was resumed and this time the disk finished.
        let second =
            CbtRecord { bytes_transferred: 3 << 20, sync_duration_seconds: 4.25, sync_success: true, ..first.clone() };
        record_cbt(&mut conn, &owner(), &second).unwrap();
        let other = CbtRecord { disk_id: "disk-2".into(), sync_type: ReplicationType::Full, ..first.clone() };
        record_cbt(&mut conn, &owner(), &other).unwrap();

        assert_eq!(load_cbt(&mut conn, "j").unwrap(), [second.clone(), other.clone()]);
        assert_eq!(db.column("SELECT CAST(COUNT(*) AS CHAR) AS v FROM cbt_history"), [Some("2".to_string())]);

        // An earlier run, or another node, writes nothing.
        let stale = CbtRecord { sync_success: false, bytes_transferred: 1, ..second.clone() };
        for who in [Owner { run: "r0".into(), ..owner() }, Owner { node: "m".into(), ..owner() }] {
            assert!(!record_cbt(&mut conn, &who, &stale).unwrap());
        }
        assert_eq!(load_cbt(&mut conn, "j").unwrap(), [second.clone(), other.clone()]);

        // The job queued again: its next attempt adds a row of its own.
        let retried = CbtRecord { attempt: 2, bytes_transferred: 5, ..second.clone() };
        record_cbt(&mut conn, &owner(), &retried).unwrap();
        assert_eq!(load_cbt(&mut conn, "j").unwrap(), [second, retried, other]);
    }

    /// Inserts job `id` of `vm` with `disks`, owned by [`owner`], and a history
    /// row `(disk, change_id, success)` for each of `synced`, in order.
    fn synced(db: &super::super::testing::mariadb::TestDb, id: &str, vm: &str, synced: &[(&str, Option<&str>, bool)]) {
        db.execute(&format!(
            "INSERT INTO replication_jobs (id, vm_name, owner_node, owner_run) VALUES ('{id}', '{vm}', 'n', 'r1')"
        ));
        for (disk, change_id, ok) in synced {
            let cid = change_id.map_or("NULL".to_string(), |c| format!("'{c}'"));
            db.execute(&format!(
                "INSERT IGNORE INTO vm_disks (job_id, disk_id, source_uri, target_uri) VALUES ('{id}', '{disk}', 's', 't');
                 INSERT INTO cbt_history (job_id, disk_id, attempt, change_id, sync_type, sync_success)
                   SELECT '{id}', '{disk}', COUNT(*) + 1, {cid}, 'full', {ok} FROM cbt_history WHERE job_id = '{id}' AND disk_id = '{disk}'"
            ));
        }
    }

    #[test]
    fn the_chain_base_is_the_last_successful_sync_of_the_same_vm_and_disk_in_another_job() {
        let (db, mut conn) = setup("chain");
        // Job `j` (vm, disk-1 and disk-2) is the one being checked.
        synced(&db, "old", "vm", &[("disk-1", Some("cid-1"), true), ("disk-2", Some("cid-x"), true)]);
        synced(&db, "newer", "vm", &[("disk-1", Some("cid-2"), true), ("disk-1", Some("cid-3"), false)]);
        synced(&db, "other-vm", "vm2", &[("disk-1", Some("cid-9"), true), ("disk-2", Some("cid-9"), true)]);
        synced(&db, "no-id", "vm", &[("disk-2", None, true)]);
        synced(&db, "elsewhere", "vm", &[("disk-3", Some("cid-7"), true)]);
        // The job's own rows (an earlier attempt) never count.
        db.execute("INSERT INTO cbt_history (job_id, disk_id, change_id, sync_type, sync_success) VALUES ('j', 'disk-1', 'cid-own', 'full', 1)");
        let expected: BTreeMap<String, Option<String>> =
            [("disk-1".to_string(), Some("cid-2".to_string())), ("disk-2".to_string(), None)].into();
        assert_eq!(last_change_ids(&mut conn, "j", "vm").unwrap(), expected);
        assert!(last_change_ids(&mut conn, "j", "vm3").unwrap().is_empty(), "no sync of this vm");
    }

    #[test]
    fn only_the_owner_writes_and_progress_never_goes_down() {
        let (_db, mut conn) = setup("disk_owner");
        let base = DiskUpdate { job_id: "j".into(), disk_id: "disk-1".into(), ..DiskUpdate::default() };
        let figures = |done: i64, pct: f64| DiskUpdate {
            bytes_synced: Some(done),
            sync_progress_percent: Some(pct),
            sync_status: Some(DiskStatus::Streaming),
            ..base.clone()
        };
        update_disk(&mut conn, &owner(), &figures(700, 70.0)).unwrap();
        // A restarted run starts from its checkpoint, below what was shown.
        update_disk(&mut conn, &owner(), &figures(580, 58.0)).unwrap();
        let d = load_job(&mut conn, "j").unwrap().1.remove(0);
        assert_eq!((d.bytes_synced, d.sync_progress_percent), (700, 70.0), "never lowered");

        for who in [Owner { run: "r0".into(), ..owner() }, Owner { node: "m".into(), ..owner() }] {
            let stale =
                DiskUpdate { sync_status: Some(DiskStatus::Pending), resume_offset: Some(1 << 40), ..base.clone() };
            let err = update_disk(&mut conn, &who, &stale).unwrap_err();
            assert!(matches!(err, DbError::NotOwner { .. }), "{err}");
        }
        let d = load_job(&mut conn, "j").unwrap().1.remove(0);
        assert_eq!(
            (d.sync_status, d.resume_offset),
            (DiskStatus::Streaming.into(), 0),
            "the stale writes changed nothing"
        );
        let ghost = DiskUpdate { job_id: "ghost".into(), ..base };
        assert!(matches!(update_disk(&mut conn, &owner(), &ghost), Err(DbError::NotFound { .. })));
    }
}
