//! The daemon adopting an existing database, as a child
//! process on the test MariaDB: an empty database, one a DBA made from
//! `schema.sql` before the first start, and one holding the older system's
//! tables with their rows. Each time the daemon starts, leaves every older
//! column and row as it was, byte for byte, runs a job queued on it, and starts
//! again without changing anything. A column of a conflicting type stops it
//! with one line, before any change.

use crate::harness::*;
use crate::mariadb::{TestDb, server};
use testkit::jobs::*;

/// The older system's tables as an orchestrator created them (types as its ORM
/// makes them: VARCHAR(191), DOUBLE percentages, DATETIME(3), unsigned ids),
/// with rows in the older status words.
const LEGACY: &str = "
CREATE TABLE replication_jobs (
    id                     VARCHAR(191) NOT NULL,
    source_vm_name         VARCHAR(191) NULL,
    status                 VARCHAR(191) NOT NULL DEFAULT 'pending',
    current_operation      VARCHAR(191) NULL,
    progress_percent       DOUBLE       NOT NULL DEFAULT 0,
    bytes_transferred      BIGINT       NOT NULL DEFAULT 0,
    total_bytes            BIGINT       NOT NULL DEFAULT 0,
    transfer_speed_bps     BIGINT       NOT NULL DEFAULT 0,
    error_message          TEXT         NULL,
    nbd_export_name        VARCHAR(191) NULL,
    created_at             DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at             DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    completed_at           DATETIME(3)  NULL,
    setup_progress_percent DOUBLE       NOT NULL DEFAULT 0,
    vma_last_poll_at       DATETIME(3)  NULL,
    PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE vm_disks (
    id                    BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    job_id                VARCHAR(191) NULL,
    sync_status           VARCHAR(191) NOT NULL DEFAULT 'pending',
    sync_progress_percent DOUBLE       NOT NULL DEFAULT 0,
    bytes_synced          BIGINT       NOT NULL DEFAULT 0,
    disk_change_id        VARCHAR(191) NULL,
    vm_name_ref           VARCHAR(255) NULL,
    os_type               VARCHAR(64)  NULL,
    PRIMARY KEY (id),
    KEY idx_vm_disks_job (job_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE cbt_history (
    id                    BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    job_id                VARCHAR(191) NOT NULL,
    disk_id               VARCHAR(191) NOT NULL,
    change_id             VARCHAR(191) NULL,
    previous_change_id    VARCHAR(191) NULL,
    sync_type             VARCHAR(32)  NOT NULL,
    blocks_changed        BIGINT       NOT NULL DEFAULT 0,
    bytes_transferred     BIGINT       NOT NULL DEFAULT 0,
    sync_duration_seconds INT          NOT NULL DEFAULT 0,
    sync_success          TINYINT(1)   NOT NULL DEFAULT 0,
    created_at            DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
INSERT INTO replication_jobs (id, source_vm_name, status, current_operation, progress_percent, bytes_transferred,
    total_bytes, nbd_export_name, created_at, updated_at, completed_at, setup_progress_percent, vma_last_poll_at) VALUES
  ('old-init',    'vm-a', 'initializing', 'Discover', 0,    0,          0,          NULL,           '2025-08-01 10:00:00.123', '2025-08-01 10:00:00.123', NULL, 12.5, NULL),
  ('old-repl',    'vm-b', 'replicating',  'Transfer', 41.7, 4470000000, 10720000000, 'migration-vol-b', '2025-08-01 11:00:00', '2025-08-01 11:30:00', NULL, 100, '2025-08-01 11:29:59.5'),
  ('old-sync',    'vm-c', 'syncing',      'Transfer', 3,    1,          2,          'migration-vol-c', '2025-08-02 09:00:00', '2025-08-02 09:00:01', NULL, 100, NULL),
  ('old-active',  'vm-d', 'active',       NULL,       0,    0,          0,          NULL,           '2025-08-03 09:00:00', '2025-08-03 09:00:00', NULL, 0, NULL),
  ('old-done',    'vm-e', 'completed',    'Finalize', 100,  5,          5,          'migration-vol-e', '2025-08-04 09:00:00', '2025-08-04 10:00:00', '2025-08-04 10:00:00', 100, NULL),
  ('old-failed',  'vm-f', 'failed',       'Transfer', 7.25, 3,          40,         NULL,           '2025-08-05 09:00:00', '2025-08-05 09:05:00', NULL, 100, NULL);
INSERT INTO vm_disks (job_id, sync_status, sync_progress_percent, bytes_synced, disk_change_id, vm_name_ref, os_type) VALUES
  ('old-repl', 'syncing',   41.7, 4470000000, NULL,                 'vm-b', 'linux'),
  ('old-repl', 'pending',   0,    0,          NULL,                 'vm-b', 'linux'),
  ('old-done', 'completed', 100,  5,          '52 3c ec 1a/4711',   'vm-e', 'windows');
INSERT INTO cbt_history (job_id, disk_id, change_id, previous_change_id, sync_type, blocks_changed, bytes_transferred,
    sync_duration_seconds, sync_success, created_at) VALUES
  ('old-done', 'disk-2000', '52 3c ec 1a/4711', NULL, 'initial', 812, 5, 42, 1, '2025-08-04 10:00:00'),
  ('old-failed', 'disk-2000', NULL, NULL, 'initial', 0, 3, 300, 0, '2025-08-05 09:05:00');
";

/// Every column of the tables `LEGACY` made, as `information_schema` sees it:
/// one line per column, with its type, nullability, default and extra.
fn columns(db: &TestDb) -> Vec<String> {
    db.column(
        "SELECT CAST(CONCAT_WS('|', TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, IFNULL(COLUMN_DEFAULT, '-'),
                EXTRA, IFNULL(COLLATION_NAME, '-')) AS CHAR) AS v
         FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME, ORDINAL_POSITION",
    )
    .into_iter()
    .flatten()
    .collect()
}

/// The bytes of the older system's rows of `table` (its jobs are `old-*`), in
/// the columns `cols` (hex, NULL marked), ordered by id.
fn rows(db: &TestDb, table: &str, cols: &[String]) -> Vec<String> {
    let list = cols.iter().map(|c| format!("IFNULL(HEX(`{c}`), 'NULL')")).collect::<Vec<_>>().join(", ");
    let job = if table == "replication_jobs" { "id" } else { "job_id" };
    db.column(&format!(
        "SELECT CAST(CONCAT_WS('|', {list}) AS CHAR) AS v FROM {table} WHERE {job} LIKE 'old-%' ORDER BY id"
    ))
    .into_iter()
    .flatten()
    .collect()
}

/// Everything the older system had: its columns (definitions) and the bytes of
/// its rows in those columns.
#[derive(Debug, PartialEq)]
struct Snapshot {
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
}

const LEGACY_TABLES: [&str; 3] = ["replication_jobs", "vm_disks", "cbt_history"];

fn snapshot(db: &TestDb, of: &[String]) -> Snapshot {
    let rows = LEGACY_TABLES
        .iter()
        .map(|t| {
            let cols: Vec<String> = of
                .iter()
                .filter_map(|line| line.strip_prefix(&format!("{t}|")))
                .map(|rest| rest.split('|').next().unwrap().to_string())
                .collect();
            rows(db, t, &cols)
        })
        .collect();
    let now = columns(db);
    Snapshot { columns: of.iter().filter(|c| now.contains(c)).cloned().collect(), rows }
}

/// The whole schema: tables and their `SHOW CREATE TABLE`.
fn schema(db: &TestDb) -> Vec<String> {
    db.tables().iter().map(|t| db.show_create_table(t)).collect()
}

/// Starts the daemon on `db`, runs a one-disk job queued by SQL to the end and
/// checks its bytes (the target checks every byte written to it), then stops
/// the daemon, starts it again and checks that the second start changed no
/// table. Returns the daemon's log.
fn start_run_and_restart(db: &TestDb, job_id: &str) -> String {
    let d = tempdir();
    let image = sparse("64M", 71, 30);
    let src = Server::nbdkit(d.path(), "src", &refs(&image));
    let dst = Server::nbdkit(d.path(), "dst", &refs(&image));
    let mut daemon = Daemon::start(d.path(), &db.url, &[]);
    queue(db, job_id, &[("disk-2000", src.uri(), dst.uri())]);
    wait_status(db, job_id, "completed", &daemon);
    assert_eq!(disk(db, job_id, "disk-2000", "sync_status").as_deref(), Some("completed"));
    let data = data_bytes(&allocation_map(&src.uri()));
    assert_eq!(num(disk(db, job_id, "disk-2000", "bytes_synced")) as u64, data);
    assert_eq!(
        one(db, &format!("SELECT CAST(COUNT(*) AS CHAR) AS v FROM cbt_history WHERE job_id = '{job_id}'")).as_deref(),
        Some("1")
    );
    let (status, _) = daemon.terminate();
    assert!(status.success(), "{status}\n{}", daemon.log_text());

    let before = schema(db);
    let recorded = db.column("SELECT version AS v FROM __diesel_schema_migrations ORDER BY version");
    daemon.spawn();
    let (status, _) = daemon.terminate();
    assert!(status.success(), "{status}\n{}", daemon.log_text());
    assert_eq!(schema(db), before, "the second start changed the schema");
    assert_eq!(db.column("SELECT version AS v FROM __diesel_schema_migrations ORDER BY version"), recorded);
    // `spawn` returned: the second start reached READY too.
    daemon.log_text()
}

/// The migration versions in `migrations/`.
fn versions() -> Vec<Option<String>> {
    let mut v: Vec<Option<String>> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().replace('-', "").split('_').next().map(str::to_string))
        .collect();
    v.sort();
    v
}

#[test]
fn an_empty_database_is_created_runs_a_job_and_restarts_unchanged() {
    let db = server().fresh_database("adopt_empty");
    let log = start_run_and_restart(&db, "job-empty");
    assert!(log.contains("created table replication_jobs"), "{log}");
    assert_eq!(db.column("SELECT version AS v FROM __diesel_schema_migrations ORDER BY version"), versions());
}

#[test]
fn a_database_made_from_schema_sql_is_adopted_as_it_is() {
    let db = server().fresh_database("adopt_schema_sql");
    db.execute(include_str!("../../schema.sql"));
    let made = schema(&db);
    // The orchestrator queues a job before the daemon's first start.
    let d = tempdir();
    let image = sparse("32M", 72, 40);
    let src = Server::nbdkit(d.path(), "src", &refs(&image));
    let dst = Server::nbdkit(d.path(), "dst", &refs(&image));
    queue(&db, "job-early", &[("disk-2000", src.uri(), dst.uri())]);

    let log = start_run_and_restart(&db, "job-later");
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    wait_status(&db, "job-early", "completed", &daemon);
    assert!(!log.contains("database schema changed"), "a schema.sql database needs no change:\n{log}");
    let mut now = schema(&db);
    now.retain(|t| !t.contains("__diesel_schema_migrations"));
    assert_eq!(now, made);
    assert_eq!(db.column("SELECT version AS v FROM __diesel_schema_migrations ORDER BY version"), versions());
}

#[test]
fn the_older_systems_tables_are_adopted_without_touching_its_columns_or_rows() {
    let db = server().fresh_database("adopt_legacy");
    db.execute(LEGACY);
    let legacy_columns = columns(&db);
    let before = snapshot(&db, &legacy_columns);
    assert_eq!(before.rows.iter().map(Vec::len).collect::<Vec<_>>(), [6, 3, 2]);

    let log = start_run_and_restart(&db, "job-new");

    // Nothing of the older system changed: its columns are defined as they were,
    // and its rows hold the same bytes.
    assert_eq!(snapshot(&db, &legacy_columns), before);
    // Ours were added around them; its vm_disks rows share an empty disk_id, so
    // that unique key was left out and said so.
    for added in
        ["added column replication_jobs.vm_name", "added column vm_disks.source_uri", "created table job_events"]
    {
        assert!(log.contains(added), "no '{added}' in\n{log}");
    }
    assert!(log.contains("uq_disks_job_disk"), "{log}");
    // The older rows were never claimed: no owner, no run, no event.
    assert_eq!(
        db.column("SELECT id AS v FROM replication_jobs WHERE owner_run IS NULL ORDER BY id"),
        ["old-active", "old-done", "old-failed", "old-init", "old-repl", "old-sync"].map(|s| Some(s.to_string()))
    );
    assert_eq!(
        one(&db, "SELECT CAST(COUNT(*) AS CHAR) AS v FROM job_events WHERE job_id LIKE 'old-%'").as_deref(),
        Some("0")
    );
    // The new job's history row went into the older table, whose duration is INT.
    assert_eq!(
        one(&db, "SELECT CAST(sync_success AS CHAR) AS v FROM cbt_history WHERE job_id = 'job-new'").as_deref(),
        Some("1")
    );
    // And the admin API lists every job, older words as they are.
    let d = tempdir();
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    let listed = daemon.cli(&["jobs", "--json"]).assert_ok().json();
    let status = |id: &str| {
        let jobs = listed["jobs"].as_array().unwrap();
        jobs.iter().find(|j| j["id"] == id).map(|j| j["status"].as_str().unwrap().to_string())
    };
    for (id, word) in [
        ("old-init", "initializing"),
        ("old-repl", "Queued"), // `replicating` reads as `pending`
        ("old-sync", "syncing"),
        ("old-active", "active"),
        ("old-done", "Succeeded"),
        ("old-failed", "Failed"),
        ("job-new", "Succeeded"),
    ] {
        assert_eq!(status(id).as_deref(), Some(word), "{listed}");
    }
}

#[test]
fn a_conflicting_column_type_stops_the_daemon_with_one_line_and_changes_nothing() {
    let db = server().fresh_database("adopt_conflict");
    db.execute(&LEGACY.replace(
        "bytes_synced          BIGINT       NOT NULL DEFAULT 0",
        "bytes_synced          VARCHAR(32)  NOT NULL DEFAULT '0'",
    ));
    let before = schema(&db);
    let legacy_columns = columns(&db);
    let rows_before = snapshot(&db, &legacy_columns);

    let d = tempdir();
    let mut daemon = Daemon::configure(d.path(), &db.url, &[], &[]);
    daemon.launch();
    let status = daemon.wait_exit();
    let log = daemon.log_text();
    assert!(!status.success(), "exited {status}\n{log}");
    let line = "blockrepl: cannot adopt the database: column vm_disks.bytes_synced is varchar(32), \
                blockrepl needs BIGINT; nothing was changed";
    assert_eq!(log.lines().filter(|l| l.contains("cannot adopt")).collect::<Vec<_>>(), [line], "{log}");
    assert_eq!(schema(&db), before, "the schema changed");
    assert_eq!(snapshot(&db, &legacy_columns), rows_before);
}

/// A database an earlier blockrepl made (its migrations up to per-disk
/// `keep_allocated`, with one history row per job and disk) is brought up to
/// date: the new columns and keys are added and blockrepl's retired unique key
/// `uq_cbt_job_disk` is dropped, so that a second attempt gets its own row.
#[test]
fn a_database_an_earlier_blockrepl_made_keeps_one_history_row_per_attempt() {
    let db = server().fresh_database("adopt_earlier");
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"));
    let mut earlier: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    earlier.sort();
    earlier.truncate(6);
    assert!(earlier[5].to_string_lossy().ends_with("000006_add_keep_allocated"), "{earlier:?}");
    for m in &earlier {
        db.execute(&std::fs::read_to_string(m.join("up.sql")).unwrap());
    }
    let keys = |db: &TestDb| {
        db.column(
            "SELECT DISTINCT index_name AS v FROM information_schema.statistics
             WHERE table_schema = DATABASE() AND table_name = 'cbt_history' ORDER BY index_name",
        )
    };
    assert!(keys(&db).contains(&Some("uq_cbt_job_disk".to_string())), "the earlier schema: {:?}", keys(&db));

    let log = start_run_and_restart(&db, "job-earlier");
    assert!(log.contains("dropped blockrepl's retired key cbt_history.uq_cbt_job_disk"), "{log}");
    let now = keys(&db);
    assert!(!now.contains(&Some("uq_cbt_job_disk".to_string())), "{now:?}");
    assert!(now.contains(&Some("uq_cbt_job_disk_attempt".to_string())), "{now:?}");
    db.execute(
        "INSERT INTO cbt_history (job_id, disk_id, attempt, sync_type, sync_success)
         VALUES ('job-earlier', 'disk-2000', 2, 'full', 0)",
    );
    assert_eq!(
        one(&db, "SELECT CAST(COUNT(*) AS CHAR) AS v FROM cbt_history WHERE job_id = 'job-earlier'").as_deref(),
        Some("2")
    );
}
