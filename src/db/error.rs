//! `DbError`: every way the database layer fails, as one line that names what
//! failed. Connection errors show the URL with its password replaced, and the
//! driver's message with the password removed, so an error can be logged as is.
//! Deciding what to do about an error (retry, reconnect, give up) is the caller's.

use diesel::result::{DatabaseErrorKind, Error as DieselError};

use crate::state::JobStatus;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL: {reason}")]
    InvalidUrl { reason: String },

    /// `url` has its password replaced by `***`.
    #[error("cannot connect to database {url}: {error}")]
    Connect { url: String, error: String },

    #[error("database error while {what}: {error}")]
    Query { what: String, error: DieselError },

    #[error("cannot apply database migrations: {error}")]
    Migration { error: String },

    /// An existing column blockrepl cannot work with (see `adopt::compatible`);
    /// `more` counts the other conflicting columns. Nothing was changed.
    #[error(
        "cannot adopt the database: column {table}.{column} is {found}, blockrepl needs {expected}{}; \
         nothing was changed",
        more_conflicts(.more)
    )]
    SchemaConflict { table: String, column: String, found: String, expected: String, more: usize },

    /// The daemon's own database plumbing failed (its database thread is gone, or
    /// answered with the wrong kind of reply): a bug, not the database's fault.
    #[error("internal error in the database writer: {error}")]
    Internal { error: String },

    /// A flush that could not complete; `error` is why the last write failed.
    #[error("writes not flushed: {error}")]
    Unflushed { error: String },

    #[error("timed out after {seconds} s waiting for the database lock '{lock}'")]
    LockTimeout { lock: &'static str, seconds: i32 },

    #[error("job '{job}' not found")]
    NotFound { job: String },

    #[error("disk '{disk}' of job '{job}' not found")]
    DiskNotFound { job: String, disk: String },

    #[error("job '{job}' already exists")]
    Conflict { job: String },

    #[error("job '{job}' cannot become {to} from its current status")]
    IllegalTransition { job: String, to: JobStatus },

    #[error("job '{job}' has already finished as {status}")]
    AlreadyFinished { job: String, status: JobStatus },

    #[error("job '{job}' is not owned by node '{node}'")]
    NotOwner { job: String, node: String },

    /// Another live daemon holds this node id's database lock.
    #[error(
        "node id '{node}' is in use by another running blockrepl daemon (it holds the database lock '{lock}'); \
         give each appliance its own node.id"
    )]
    NodeInUse { node: String, lock: String },

    /// The database did not answer a call within its deadline; the daemon cut
    /// the connection.
    #[error("the database did not answer within {seconds} s while {what}")]
    Timeout { what: String, seconds: u64 },

    #[error("job '{job}' has an unknown status '{status}'")]
    UnknownStatus { job: String, status: String },

    /// A guarded update matched no row, yet every guard holds when checked
    /// afterwards: another writer changed the row in between.
    #[error("job '{job}' changed concurrently; try again")]
    Concurrent { job: String },
}

/// The tail of [`DbError::SchemaConflict`]'s line when more columns conflict.
fn more_conflicts(more: &usize) -> String {
    if *more > 0 { format!(" (and {more} more conflicting columns)") } else { String::new() }
}

impl DbError {
    /// Wraps a diesel error with what was being done, e.g. "claiming job 'job-1'".
    pub(super) fn query(what: impl Into<String>) -> impl FnOnce(DieselError) -> DbError {
        let what = what.into();
        move |error| DbError::Query { what, error }
    }

    /// True when the database could not be reached or the connection broke, so
    /// that reconnecting later may help (as opposed to a refused statement).
    pub fn is_unavailable(&self) -> bool {
        match self {
            // A node lock held by another daemon may be our own earlier session
            // that the server has not let go of yet: worth trying again later (at
            // start-up the daemon refuses to run instead).
            DbError::Connect { .. } | DbError::LockTimeout { .. } | DbError::NodeInUse { .. } => true,
            DbError::Timeout { .. } => true,
            DbError::Query { error: DieselError::BrokenTransactionManager, .. } => true,
            // Diesel classifies a lost MySQL connection as `Unknown`, and the client
            // library's error number is not passed on: only the message tells.
            DbError::Query { error: DieselError::DatabaseError(kind, info), .. } => {
                let message = info.message().to_ascii_lowercase();
                matches!(kind, DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand)
                    || CONNECTION_LOST.iter().any(|m| message.contains(m))
            }
            _ => false,
        }
    }
}

/// Lower-case fragments of the messages of MariaDB Connector/C, libmysqlclient
/// and the server that mean the connection is gone (CR_SERVER_GONE_ERROR,
/// CR_SERVER_LOST, CR_CONNECTION_ERROR, ER_CONNECTION_KILLED, ER_SERVER_SHUTDOWN).
const CONNECTION_LOST: [&str; 6] =
    ["gone away", "lost connection", "can't connect", "connection was killed", "shutdown in progress", "not connected"];

/// Only for `Connection::transaction`, whose closure must return an error that
/// BEGIN/COMMIT failures convert into; statements inside map their own errors.
impl From<DieselError> for DbError {
    fn from(error: DieselError) -> Self {
        DbError::Query { what: "running a transaction".into(), error }
    }
}

/// Whether `url` is a `mysql://` URL with a host: only then do we know where a
/// password in it would be.
pub(super) fn is_mysql_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| u.scheme() == "mysql" && u.has_host())
}

/// The URL with its password (if any) replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if is_mysql_url(url) => {
            if parsed.password().is_some() {
                // Cannot fail for a URL that already has a password (it has a host).
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        _ => "(not a mysql:// URL)".to_string(),
    }
}

/// `message` on one line with every spelling of the URL's password removed.
pub(super) fn scrub(message: &str, url: &str) -> String {
    let mut out = message.replace(['\r', '\n'], " ");
    if let Ok(parsed) = url::Url::parse(url)
        && let Some(raw) = parsed.password()
        && !raw.is_empty()
    {
        let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy().into_owned();
        for secret in [raw.to_string(), decoded] {
            if !secret.is_empty() {
                out = out.replace(&secret, "***");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_only_the_password() {
        assert_eq!(
            redact_url("mysql://app:s3cr%40t@db.example:3306/blockrepl"),
            "mysql://app:***@db.example:3306/blockrepl"
        );
        assert_eq!(
            redact_url("mysql://app@localhost/x?unix_socket=/run/m.sock"),
            "mysql://app@localhost/x?unix_socket=/run/m.sock"
        );
        assert_eq!(redact_url("not a url :pw@"), "(not a mysql:// URL)");
        assert_eq!(redact_url("app:pw@db"), "(not a mysql:// URL)");
    }

    #[test]
    fn scrub_removes_encoded_and_decoded_passwords_and_newlines() {
        let url = "mysql://app:s3cr%40t+x@db/x";
        assert_eq!(scrub("bad s3cr@t+x and s3cr%40t+x\nsecond line", url), "bad *** and *** second line");
        assert_eq!(scrub("nothing secret", "mysql://app@db/x"), "nothing secret");
    }
}
