//! The node lock: at most one live daemon per node id. A daemon holds the
//! server's named lock `blockrepl.node.<hash of its id>` on its connection for as
//! long as the connection lasts; the server lets go of it when the session ends,
//! however the process ended. A second daemon with the same id finds it held and
//! is refused, so two appliances cloned with one name can never both own jobs
//! under it.
//!
//! Deciding what to do when the lock is held (refuse to start, or try again
//! later) is the caller's.

use std::time::Duration;

use diesel::dsl::sql;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Nullable, Text, Unsigned};

use super::DbError;

/// The lock's name: the id is hashed, because lock names are limited to 64
/// characters and node ids are not.
pub fn lock_name(node: &str) -> String {
    format!("blockrepl.node.{:016x}", xxhash_rust::xxh3::xxh3_64(node.as_bytes()))
}

/// This session's connection id.
fn connection_id(conn: &mut MysqlConnection) -> Result<u64, DbError> {
    diesel::select(sql::<Unsigned<diesel::sql_types::BigInt>>("CONNECTION_ID()"))
        .get_result(conn)
        .map_err(DbError::query("reading the connection id"))
}

/// `GET_LOCK(name, wait)`: whether this session got it.
fn get_lock(conn: &mut MysqlConnection, name: &str, wait: Duration) -> Result<bool, DbError> {
    let seconds = i32::try_from(wait.as_secs()).unwrap_or(i32::MAX);
    let got: Option<i32> = diesel::select(
        sql::<Nullable<Integer>>("GET_LOCK(").bind::<Text, _>(name).sql(", ").bind::<Integer, _>(seconds).sql(")"),
    )
    .get_result(conn)
    .map_err(DbError::query("taking the node lock"))?;
    Ok(got == Some(1))
}

/// Takes the lock of `node` on this connection, waiting up to `wait` for a
/// daemon that just died (the server may take a moment to end its session).
/// `previous` is the connection id of this process's own earlier session: when
/// the daemon cut a connection that hung, the server may not have noticed yet,
/// and that session, which still holds the lock, is killed. Returns this
/// session's connection id, to pass as `previous` next time.
pub fn lock_node(
    conn: &mut MysqlConnection,
    node: &str,
    previous: Option<u64>,
    wait: Duration,
) -> Result<u64, DbError> {
    let name = lock_name(node);
    let me = connection_id(conn)?;
    if get_lock(conn, &name, Duration::ZERO)? {
        return Ok(me);
    }
    let holder: Option<u64> = diesel::select(
        sql::<Nullable<Unsigned<diesel::sql_types::BigInt>>>("IS_USED_LOCK(").bind::<Text, _>(&name).sql(")"),
    )
    .get_result(conn)
    .map_err(DbError::query("looking up the node lock"))?;
    if let (Some(holder), Some(previous)) = (holder, previous)
        && holder == previous
    {
        tracing::info!(
            connection = holder,
            "ending this daemon's earlier database session, which still holds the node lock"
        );
        // A user may always kill its own sessions; if it ended meanwhile, so much the better.
        let _ = diesel::sql_query(format!("KILL CONNECTION {holder}")).execute(conn);
    }
    if get_lock(conn, &name, wait)? { Ok(me) } else { Err(DbError::NodeInUse { node: node.to_string(), lock: name }) }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{connect_to, mariadb};
    use super::*;

    #[test]
    fn lock_names_are_short_and_distinct() {
        let long = "a".repeat(255);
        assert!(lock_name(&long).len() <= 64);
        assert_ne!(lock_name("node-a"), lock_name("node-b"));
        assert_eq!(lock_name("node-a"), lock_name("node-a"));
    }

    #[test]
    fn one_live_session_per_node_id() {
        let db = mariadb::server().fresh_database("node_lock");
        let mut a = connect_to(&db);
        let mut b = connect_to(&db);
        let a_id = lock_node(&mut a, "node-x", None, Duration::ZERO).unwrap();
        let err = lock_node(&mut b, "node-x", None, Duration::ZERO).unwrap_err();
        assert!(matches!(err, DbError::NodeInUse { .. }), "{err}");
        assert!(err.to_string().starts_with("node id 'node-x' is in use by another running blockrepl daemon"), "{err}");
        assert!(!err.to_string().contains('\n'));
        lock_node(&mut b, "node-y", None, Duration::ZERO).unwrap();
        // Our own earlier session (cut, not yet noticed by the server) is ended.
        lock_node(&mut b, "node-x", Some(a_id), Duration::from_secs(5)).unwrap();
        assert!(super::super::ping(&mut a).is_err(), "the earlier session was killed");
        // The lock goes with its session.
        drop(b);
        let mut c = connect_to(&db);
        lock_node(&mut c, "node-x", None, Duration::from_secs(5)).unwrap();
    }
}
