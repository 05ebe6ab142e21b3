//! Applies the embedded diesel migrations (`migrations/`, the same DDL as
//! `schema.sql`) to a database, safely when several daemons start at once.
//!
//! MariaDB commits DDL implicitly, so a migration cannot be rolled back and two
//! daemons applying the same migration would collide half-way. Each migration is
//! therefore a single statement, and [`migrate`] runs them while holding a
//! server-wide named lock: whoever comes second finds nothing left to do. Diesel's
//! own bookkeeping table (`__diesel_schema_migrations`) records what was applied,
//! so a restart never re-runs a migration.

use diesel::dsl::sql;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Nullable, Text};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::DbError;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

const LOCK: &str = "blockrepl.migrations";
const LOCK_TIMEOUT_SECONDS: i32 = 60;

/// Runs the pending migrations and returns the versions it applied (empty when
/// the database was up to date).
pub fn migrate(conn: &mut MysqlConnection) -> Result<Vec<String>, DbError> {
    // GET_LOCK answers 1 (got it), 0 (timed out) or NULL (error); the lock belongs
    // to this session, so a daemon that dies while holding it releases it.
    let got: Option<i32> = diesel::select(
        sql::<Nullable<Integer>>("GET_LOCK(")
            .bind::<Text, _>(LOCK)
            .sql(", ")
            .bind::<Integer, _>(LOCK_TIMEOUT_SECONDS)
            .sql(")"),
    )
    .get_result(conn)
    .map_err(DbError::query("taking the migration lock"))?;
    if got != Some(1) {
        return Err(DbError::LockTimeout { lock: LOCK, seconds: LOCK_TIMEOUT_SECONDS });
    }

    let applied = conn
        .run_pending_migrations(MIGRATIONS)
        .map(|versions| versions.iter().map(ToString::to_string).collect())
        .map_err(|e| DbError::Migration { error: e.to_string().replace('\n', " ") });

    let released = diesel::select(sql::<Nullable<Integer>>("RELEASE_LOCK(").bind::<Text, _>(LOCK).sql(")"))
        .get_result::<Option<i32>>(conn)
        .map_err(DbError::query("releasing the migration lock"));
    // A migration error matters more than a failure to release (which ending the
    // session would fix anyway).
    let applied = applied?;
    released?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{connect_to, mariadb};
    use super::*;

    const ALL_TABLES: [&str; 4] = ["cbt_history", "job_events", "replication_jobs", "vm_disks"];

    fn version_count() -> usize {
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().join("up.sql").is_file())
            .count()
    }

    #[test]
    fn migrations_apply_to_an_empty_database_and_then_never_again() {
        let db = mariadb::server().fresh_database("migrate_once");
        let mut conn = connect_to(&db);
        let applied = migrate(&mut conn).unwrap();
        assert_eq!(applied.len(), version_count());
        assert!(applied.windows(2).all(|w| w[0] < w[1]), "applied out of order: {applied:?}");
        let mut tables = db.tables();
        tables.retain(|t| !t.starts_with("__diesel"));
        assert_eq!(tables, ALL_TABLES);

        // A restart: a new connection, nothing to do.
        assert_eq!(migrate(&mut connect_to(&db)).unwrap(), Vec::<String>::new());
        assert_eq!(migrate(&mut conn).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn concurrent_daemons_apply_each_migration_exactly_once() {
        let db = mariadb::server().fresh_database("migrate_race");
        let urls = vec![db.url.clone(); 6];
        let results: Vec<Vec<String>> = std::thread::scope(|s| {
            let handles: Vec<_> =
                urls.iter().map(|url| s.spawn(move || migrate(&mut super::super::connect(url).unwrap()))).collect();
            handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        let mut all: Vec<String> = results.into_iter().flatten().collect();
        let total = all.len();
        all.sort();
        all.dedup();
        assert_eq!(total, version_count(), "some migration ran twice or not at all");
        assert_eq!(all.len(), version_count());
        let recorded = db.column("SELECT CAST(COUNT(*) AS CHAR) AS v FROM __diesel_schema_migrations");
        assert_eq!(recorded, vec![Some(version_count().to_string())]);
    }

    #[test]
    fn schema_sql_and_the_migrations_build_identical_tables() {
        let from_schema = mariadb::server().fresh_database("schema_sql");
        from_schema.execute(include_str!("../../schema.sql"));
        let from_migrations = mariadb::server().fresh_database("schema_migr");
        migrate(&mut connect_to(&from_migrations)).unwrap();

        assert_eq!(from_schema.tables(), ALL_TABLES);
        for table in ALL_TABLES {
            assert_eq!(
                from_schema.show_create_table(table),
                from_migrations.show_create_table(table),
                "{table} differs between schema.sql and migrations/"
            );
        }
    }
}
