//! Jobs as an orchestrator queues them (plain SQL, as docs/orchestrator.md shows) and
//! their rows as the daemon leaves them: shared by the daemon's integration
//! tests and the chaos suite.

use std::time::{Duration, Instant};

use crate::harness::Daemon;
use crate::mariadb::TestDb;

/// Longest any job here may take.
pub const JOB_DEADLINE: Duration = Duration::from_secs(120);

pub fn one(db: &TestDb, sql: &str) -> Option<String> {
    db.column(sql).into_iter().next().flatten()
}

pub fn job(db: &TestDb, id: &str, field: &str) -> Option<String> {
    one(db, &format!("SELECT CAST({field} AS CHAR) AS v FROM replication_jobs WHERE id = '{id}'"))
}

pub fn disk(db: &TestDb, id: &str, disk: &str, field: &str) -> Option<String> {
    one(db, &format!("SELECT CAST({field} AS CHAR) AS v FROM vm_disks WHERE job_id = '{id}' AND disk_id = '{disk}'"))
}

pub fn num(v: Option<String>) -> f64 {
    v.and_then(|s| s.parse().ok()).unwrap_or(0.0)
}

/// Queues a job as docs/orchestrator.md shows (in `replicating`, the word of
/// older orchestrators), one disk per
/// (disk_id, source, target).
pub fn queue(db: &TestDb, id: &str, disks: &[(&str, String, String)]) {
    db.execute(&format!("START TRANSACTION; {} COMMIT;", queue_sql(id, disks)));
}

/// The statements [`queue`] runs, for callers that add to the transaction
/// (e.g. change ids).
pub fn queue_sql(id: &str, disks: &[(&str, String, String)]) -> String {
    let mut sql = format!(
        "INSERT INTO replication_jobs (id, vm_name, replication_type, status, nbd_export_name) \
         VALUES ('{id}', 'vm1', 'full', 'replicating', 'migration-vol-1');"
    );
    for (i, (disk_id, s, t)) in disks.iter().enumerate() {
        sql.push_str(&format!(
            "INSERT INTO vm_disks (job_id, disk_id, label, source_uri, target_uri) \
             VALUES ('{id}', '{disk_id}', 'Hard disk {}', '{s}', '{t}');",
            i + 1
        ));
    }
    sql
}

/// Every column of a job's rows, its disks, events and CBT history, as text:
/// what a node that no longer owns the job must leave alone.
pub fn rows_of(db: &TestDb, id: &str) -> Vec<String> {
    let mut rows = Vec::new();
    for (table, key) in
        [("replication_jobs", "id"), ("vm_disks", "job_id"), ("cbt_history", "job_id"), ("job_events", "job_id")]
    {
        let columns: Vec<String> = db
            .column(&format!(
                "SELECT CAST(column_name AS CHAR) AS v FROM information_schema.columns
                 WHERE table_schema = DATABASE() AND table_name = '{table}' ORDER BY ordinal_position"
            ))
            .into_iter()
            .flatten()
            .map(|c| format!("IFNULL(CAST(`{c}` AS CHAR), '-')"))
            .collect();
        rows.extend(
            db.column(&format!(
                "SELECT CONCAT_WS('|', {}) AS v FROM {table} WHERE {key} = '{id}' ORDER BY 1",
                columns.join(", ")
            ))
            .into_iter()
            .flatten(),
        );
    }
    rows
}

pub fn wait_status(db: &TestDb, id: &str, want: &str, d: &Daemon) {
    let end = Instant::now() + JOB_DEADLINE;
    loop {
        let st = job(db, id, "status").unwrap_or_default();
        if st == want {
            return;
        }
        assert!(
            !(["completed", "failed", "cancelled"].contains(&st.as_str())),
            "job ended {st} ({:?}), expected {want}\n{}",
            job(db, id, "error_message"),
            d.log_text()
        );
        assert!(Instant::now() < end, "job still {st} after {JOB_DEADLINE:?}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn sparse(size: &str, seed: u32, percent: u32) -> Vec<String> {
    [
        "sparse-random",
        &format!("size={size}"),
        &format!("seed={seed}"),
        &format!("percent={percent}"),
        "runlength=1048576",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
