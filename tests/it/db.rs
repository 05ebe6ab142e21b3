//! The database schema as other programs see it, through plain SQL on the test
//! MariaDB: `schema.sql` and `migrations/` describe the same tables, every
//! migration can be undone, and the orchestrator's own INSERTs work.
//!
//! The daemon's database functions (`src/db/`) are tested by unit tests next to
//! them, on the same harness: this crate is a binary with no library target, so
//! they cannot be called from here.

use std::path::{Path, PathBuf};

use diesel::{Connection, MysqlConnection};

use crate::mariadb::{TestDb, server};

const TABLES: [&str; 4] = ["cbt_history", "job_events", "replication_jobs", "vm_disks"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The migration directories, in the order diesel applies them.
fn migrations() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("migrations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("up.sql").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn with_schema_sql(prefix: &str) -> TestDb {
    let db = server().fresh_database(prefix);
    db.execute(&read(&root().join("schema.sql")));
    db
}

#[test]
fn each_migration_makes_one_schema_change_and_together_they_are_schema_sql() {
    let from_schema = with_schema_sql("it_schema_sql");
    let from_migrations = server().fresh_database("it_up_sql");
    let dirs = migrations();
    assert!(dirs.len() >= TABLES.len());
    for dir in &dirs {
        let up = read(&dir.join("up.sql"));
        // MariaDB commits DDL implicitly, so a second statement could be left half-applied.
        let statements =
            up.split(';').filter(|s| s.lines().any(|l| !l.trim().is_empty() && !l.trim().starts_with("--")));
        assert_eq!(statements.count(), 1, "{} holds more than one statement", dir.display());
        from_migrations.execute(&up);
    }
    assert_eq!(from_schema.tables(), TABLES);
    assert_eq!(from_migrations.tables(), TABLES);
    for table in TABLES {
        assert_eq!(from_schema.show_create_table(table), from_migrations.show_create_table(table), "{table}");
    }
}

#[test]
fn every_migration_can_be_undone_and_redone() {
    let db = server().fresh_database("it_down_sql");
    let dirs = migrations();
    let mut after_each_up = Vec::new();
    for dir in &dirs {
        db.execute(&read(&dir.join("up.sql")));
        after_each_up.push(db.tables());
    }
    for (i, dir) in dirs.iter().enumerate().rev() {
        db.execute(&read(&dir.join("down.sql")));
        let expected = if i == 0 { Vec::new() } else { after_each_up[i - 1].clone() };
        assert_eq!(db.tables(), expected, "after {}/down.sql", dir.display());
    }
    for dir in &dirs {
        db.execute(&read(&dir.join("up.sql")));
    }
    assert_eq!(db.tables(), TABLES);
}

/// The attempt and change-check migrations (issue 12) find a database that has
/// their columns and keys already (one a DBA made from `schema.sql`, or a second
/// run) and change nothing.
#[test]
fn the_attempt_and_change_check_migrations_are_idempotent() {
    let db = with_schema_sql("it_idempotent");
    let before: Vec<String> = TABLES.iter().map(|t| db.show_create_table(t)).collect();
    for dir in migrations().iter().filter(|d| {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        name.starts_with("2025-09-01-000008_") || name.starts_with("2025-09-01-000009_")
    }) {
        db.execute(&read(&dir.join("up.sql")));
        db.execute(&read(&dir.join("up.sql")));
    }
    let after: Vec<String> = TABLES.iter().map(|t| db.show_create_table(t)).collect();
    assert_eq!(after, before);
}

#[test]
fn every_migration_is_idempotent_on_a_database_made_from_schema_sql() {
    let db = with_schema_sql("it_idempotent");
    let made: Vec<String> = TABLES.iter().map(|t| db.show_create_table(t)).collect();
    for _ in 0..2 {
        for dir in migrations() {
            db.execute(&read(&dir.join("up.sql")));
        }
    }
    let now: Vec<String> = TABLES.iter().map(|t| db.show_create_table(t)).collect();
    assert_eq!(now, made);
}

#[test]
fn the_orchestrators_insert_gets_the_documented_defaults() {
    let db = with_schema_sql("it_orchestrator");
    db.execute(
        "INSERT INTO replication_jobs (id, vm_name, replication_type, status, nbd_export_name)
           VALUES ('job-1', 'vm1', 'full', 'replicating', 'migration-vol-1');
         INSERT INTO vm_disks (job_id, disk_id, label, source_uri, target_uri)
           VALUES ('job-1', 'disk-2000', 'Hard disk 1', 'nbd+unix:///?socket=/tmp/s.sock', 'nbd+unix:///?socket=/tmp/d.sock');",
    );
    let job = db.column(
        "SELECT CONCAT_WS('|', status, progress_percent, setup_progress_percent, bytes_transferred, total_bytes,
                transfer_speed_bps, IFNULL(owner_node, '-'), IFNULL(eta_seconds, '-'), created_at IS NOT NULL,
                updated_at IS NOT NULL, IFNULL(completed_at, '-')) AS v
         FROM replication_jobs",
    );
    assert_eq!(job, [Some("replicating|0.00|0.00|0|0|0|-|-|1|1|-".to_string())]);
    let disk = db.column(
        "SELECT CONCAT_WS('|', sync_status, sync_progress_percent, destination_is_zero, capacity_bytes, planned_bytes,
                bytes_synced, resume_offset, IFNULL(disk_change_id, '-'), updated_at IS NOT NULL) AS v
         FROM vm_disks",
    );
    assert_eq!(disk, [Some("pending|0.00|0|0|0|0|0|-|1".to_string())]);

    // Deleting a job takes its rows in the other tables with it.
    db.execute(
        "INSERT INTO job_events (job_id, correlation_id, level, stage, message) VALUES ('job-1', 'c', 'info', 'Discover', 'm');
         INSERT INTO cbt_history (job_id, disk_id, sync_type) VALUES ('job-1', 'disk-2000', 'full');
         DELETE FROM replication_jobs;",
    );
    for table in TABLES {
        assert_eq!(db.column(&format!("SELECT CAST(COUNT(*) AS CHAR) AS v FROM {table}")), [Some("0".to_string())]);
    }
}

#[test]
fn test_databases_are_separate_and_the_server_checks_passwords() {
    let a = server().fresh_database("it_separate");
    let b = server().fresh_database("it_separate");
    assert_ne!(a.name, b.name);
    a.execute("CREATE TABLE only_in_a (x INT)");
    assert_eq!(a.tables(), ["only_in_a"]);
    assert!(b.tables().is_empty());

    let mut wrong = url::Url::parse(&a.url).unwrap();
    wrong.set_password(Some("not-the-password")).unwrap();
    assert!(MysqlConnection::establish(wrong.as_str()).is_err(), "the server let a wrong password in");
}
