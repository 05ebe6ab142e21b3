//! Brings a database to `schema.sql`, safely when several daemons start at once,
//! whatever it held before: nothing (a new database), the tables a DBA made
//! from `schema.sql`, or the tables of the older system blockrepl replaces,
//! with the orchestrator's own columns and rows.
//!
//! How: under a server-wide named lock, read the live tables, columns and
//! indexes from `information_schema`, let `adopt::plan` decide what is missing
//! and whether every existing column's type is one blockrepl can work with,
//! and apply the plan one DDL statement at a time (MariaDB commits DDL
//! implicitly, so each step stands alone and a step that is done is never
//! tried again). A conflicting column stops everything before the first
//! change. The same code serves MySQL 8, which has no `ADD COLUMN IF NOT
//! EXISTS`, and MariaDB: the check against `information_schema` is what makes
//! every step idempotent.
//!
//! The diesel migrations in `migrations/` describe the same changes as steps
//! (a test keeps their sum equal to `schema.sql`, and each one idempotent, for
//! a DBA or diesel's CLI to run). The daemon records every migration it has
//! not yet recorded in diesel's bookkeeping table (`__diesel_schema_migrations`)
//! once the plan is applied, without running its SQL: the schema already is
//! what it describes. So a restart finds nothing to do, and a database whose
//! migrations were applied by diesel is recognised as up to date.

use std::collections::BTreeMap;

use diesel::connection::BoxableConnection;
use diesel::dsl::sql;
use diesel::migration::{Migration, MigrationMetadata, MigrationName};
use diesel::mysql::{Mysql, MysqlConnection};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Unsigned};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::DbError;
use super::adopt::{self, Found, Live, Rows, Schema};

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

const LOCK: &str = "blockrepl.migrations";
const LOCK_TIMEOUT_SECONDS: i32 = 60;

/// Brings the database to `schema.sql` and returns the migration versions it
/// recorded (empty when the database was up to date). The schema changes it
/// made, and the differences it accepted, are logged.
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

    let applied = adopt_schema(conn).and_then(|()| record_migrations(conn));

    let released = diesel::select(sql::<Nullable<Integer>>("RELEASE_LOCK(").bind::<Text, _>(LOCK).sql(")"))
        .get_result::<Option<i32>>(conn)
        .map_err(DbError::query("releasing the migration lock"));
    // A migration error matters more than a failure to release (which ending the
    // session would fix anyway).
    let applied = applied?;
    released?;
    Ok(applied)
}

/// Plans against the live database and applies the plan, or refuses with the
/// first conflict (and how many more there are) before changing anything.
fn adopt_schema(conn: &mut MysqlConnection) -> Result<(), DbError> {
    let schema = Schema::ours();
    let live = read_live(conn)?;
    let mut rows = RowFacts { conn, error: None };
    let planned = adopt::plan(&schema, &live, &mut rows);
    if let Some(e) = rows.error {
        return Err(e);
    }
    let plan = planned.map_err(|conflicts| {
        let more = conflicts.len().saturating_sub(1);
        match conflicts.into_iter().next() {
            Some(first) => DbError::SchemaConflict {
                table: first.table,
                column: first.column,
                found: first.found,
                expected: first.expected,
                more,
            },
            None => DbError::Internal { error: "a schema plan refused without naming a conflict".into() },
        }
    })?;
    for note in &plan.notes {
        tracing::warn!(note = %note, "database schema differs from schema.sql; accepted");
    }
    for step in &plan.steps {
        diesel::sql_query(&step.sql).execute(conn).map_err(|e| DbError::Migration {
            error: format!("{} failed: {}", step.what, e.to_string().replace('\n', " ")),
        })?;
        tracing::info!(change = %step.what, "database schema changed");
    }
    Ok(())
}

/// The columns and index names of every table of this database.
fn read_live(conn: &mut MysqlConnection) -> Result<Live, DbError> {
    #[derive(QueryableByName)]
    struct Col {
        #[diesel(sql_type = Text)]
        table_name: String,
        #[diesel(sql_type = Text)]
        column_name: String,
        #[diesel(sql_type = Text)]
        data_type: String,
        #[diesel(sql_type = Text)]
        column_type: String,
        #[diesel(sql_type = Nullable<Unsigned<BigInt>>)]
        max_length: Option<u64>,
        #[diesel(sql_type = Nullable<Unsigned<BigInt>>)]
        precision: Option<u64>,
        #[diesel(sql_type = Nullable<Unsigned<BigInt>>)]
        scale: Option<u64>,
        #[diesel(sql_type = Text)]
        nullable: String,
    }
    #[derive(QueryableByName)]
    struct Idx {
        #[diesel(sql_type = Text)]
        table_name: String,
        #[diesel(sql_type = Text)]
        index_name: String,
    }
    // CASTs: information_schema's column types differ between MySQL and MariaDB.
    let cols: Vec<Col> = diesel::sql_query(
        "SELECT CAST(TABLE_NAME AS CHAR) AS table_name, CAST(COLUMN_NAME AS CHAR) AS column_name, \
           CAST(LOWER(DATA_TYPE) AS CHAR) AS data_type, CAST(LOWER(COLUMN_TYPE) AS CHAR) AS column_type, \
           CAST(CHARACTER_MAXIMUM_LENGTH AS UNSIGNED) AS max_length, \
           CAST(NUMERIC_PRECISION AS UNSIGNED) AS `precision`, CAST(NUMERIC_SCALE AS UNSIGNED) AS scale, \
           CAST(IS_NULLABLE AS CHAR) AS nullable \
         FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()",
    )
    .load(conn)
    .map_err(DbError::query("reading the database's columns"))?;
    let idx: Vec<Idx> = diesel::sql_query(
        "SELECT DISTINCT CAST(TABLE_NAME AS CHAR) AS table_name, CAST(INDEX_NAME AS CHAR) AS index_name \
         FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE()",
    )
    .load(conn)
    .map_err(DbError::query("reading the database's indexes"))?;
    let mut live = Live::default();
    for c in cols {
        let found = Found {
            data_type: c.data_type,
            column_type: c.column_type,
            max_length: c.max_length,
            precision: c.precision,
            scale: c.scale,
            nullable: c.nullable == "YES",
        };
        live.columns.entry(c.table_name).or_insert_with(BTreeMap::new).insert(c.column_name, found);
    }
    for i in idx {
        live.indexes.entry(i.table_name).or_default().push(i.index_name);
    }
    Ok(live)
}

/// [`Rows`] over a connection; the first error is kept and ends the adoption
/// (the plan's answers after it are worthless, and nothing has been changed).
struct RowFacts<'a> {
    conn: &'a mut MysqlConnection,
    error: Option<DbError>,
}

impl RowFacts<'_> {
    fn count(&mut self, what: String, query: String) -> u64 {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        if self.error.is_some() {
            return 0;
        }
        match diesel::sql_query(query).get_result::<N>(self.conn) {
            Ok(N { n }) => u64::try_from(n).unwrap_or(0),
            Err(e) => {
                self.error = Some(DbError::query(what)(e));
                0
            }
        }
    }
}

/// Identifiers come from `schema.sql`, never from input; quoting keeps a word
/// like `key` a name.
fn quoted(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

impl Rows for RowFacts<'_> {
    fn nulls(&mut self, table: &str, column: &str) -> u64 {
        self.count(
            format!("counting NULLs in {table}.{column}"),
            format!("SELECT COUNT(*) AS n FROM {} WHERE {} IS NULL", quoted(table), quoted(column)),
        )
    }

    fn duplicates(&mut self, table: &str, columns: &[String]) -> bool {
        let query = if columns.is_empty() {
            format!("SELECT COUNT(*) AS n FROM (SELECT 1 FROM {} LIMIT 2) AS x", quoted(table))
        } else {
            let cols = columns.iter().map(|c| quoted(c)).collect::<Vec<_>>().join(", ");
            format!(
                "SELECT COUNT(*) + 1 AS n FROM (SELECT 1 FROM {} GROUP BY {cols} HAVING COUNT(*) > 1 LIMIT 1) AS x",
                quoted(table)
            )
        };
        self.count(format!("looking for duplicates in {table}"), query) > 1
    }
}

/// A migration recorded as applied without running its SQL: the adopted
/// schema already is what it describes.
struct Recorded(Box<dyn Migration<Mysql>>);

impl Migration<Mysql> for Recorded {
    fn run(&self, _: &mut dyn BoxableConnection<Mysql>) -> diesel::migration::Result<()> {
        Ok(())
    }

    fn revert(&self, conn: &mut dyn BoxableConnection<Mysql>) -> diesel::migration::Result<()> {
        self.0.revert(conn)
    }

    fn metadata(&self) -> &dyn MigrationMetadata {
        self.0.metadata()
    }

    fn name(&self) -> &dyn MigrationName {
        self.0.name()
    }
}

/// Records the migrations diesel's table does not list yet, in order.
fn record_migrations(conn: &mut MysqlConnection) -> Result<Vec<String>, DbError> {
    let to_error =
        |e: Box<dyn std::error::Error + Send + Sync>| DbError::Migration { error: e.to_string().replace('\n', " ") };
    let pending: Vec<Box<dyn Migration<Mysql>>> = conn
        .pending_migrations(MIGRATIONS)
        .map_err(to_error)?
        .into_iter()
        .map(|m| Box::new(Recorded(m)) as Box<dyn Migration<Mysql>>)
        .collect();
    let recorded = conn.run_migrations(&pending).map_err(to_error)?;
    Ok(recorded.iter().map(ToString::to_string).collect())
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
    fn a_database_whose_migrations_diesel_ran_is_up_to_date() {
        // As a daemon of an earlier version left it: diesel ran every up.sql.
        let db = mariadb::server().fresh_database("migrate_diesel");
        let mut conn = connect_to(&db);
        let ran = conn.run_pending_migrations(MIGRATIONS).unwrap();
        assert_eq!(ran.len(), version_count());
        let before: Vec<String> = ALL_TABLES.iter().map(|t| db.show_create_table(t)).collect();
        assert_eq!(migrate(&mut conn).unwrap(), Vec::<String>::new());
        let after: Vec<String> = ALL_TABLES.iter().map(|t| db.show_create_table(t)).collect();
        assert_eq!(after, before);
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
