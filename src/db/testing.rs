//! Test-only: a fresh, migrated database on the shared test server.
//!
//! The server harness is `testkit::mariadb` (the `testkit/` crate, a
//! dev-dependency), shared with the integration tests and the benchmark. Each
//! test binary starts its own server once.

pub use testkit::mariadb;

use diesel::mysql::MysqlConnection;

/// A connection made by `db::connect` (UTC session) to `db`.
pub fn connect_to(db: &mariadb::TestDb) -> MysqlConnection {
    super::connect(&db.url).unwrap_or_else(|e| panic!("{e}"))
}

/// A new migrated database and a connection to it. Keep the `TestDb` alive for
/// the test's duration: dropping it drops the database.
pub fn fresh(prefix: &str) -> (mariadb::TestDb, MysqlConnection) {
    let db = mariadb::server().fresh_database(prefix);
    let mut conn = connect_to(&db);
    super::migrate(&mut conn).unwrap_or_else(|e| panic!("{e}"));
    (db, conn)
}
