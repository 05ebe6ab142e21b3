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

    /// The server could not be reached, or is too busy for us: it may answer
    /// later. `url` has its password replaced by `***`.
    #[error("cannot connect to database {url}: {error}")]
    Connect { url: String, error: String },

    /// The server answered and turned the connection away for a reason that
    /// waiting does not change (unknown database, access denied); see
    /// [`rejects`]. `url` has its password replaced by `***`.
    #[error("database {url} refused the connection: {error}")]
    Rejected { url: String, error: String },

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

    /// True when connecting failed for a reason that waiting does not change:
    /// the URL itself is wrong, or the server turned us away. At start-up the
    /// daemon gives up on these at once; later (a password changed under a
    /// running daemon) they count as unavailable, so that no write is dropped.
    pub fn is_permanent(&self) -> bool {
        matches!(self, DbError::InvalidUrl { .. } | DbError::Rejected { .. })
    }

    /// True when the same write may succeed if tried again: the database is
    /// unavailable ([`DbError::is_unavailable`]), or the server gave up on the
    /// statement because of other transactions (a deadlock, which rolls the whole
    /// transaction back, or a lock wait that timed out).
    pub fn is_retryable(&self) -> bool {
        self.is_unavailable() || self.is_lock_conflict()
    }

    /// A deadlock or lock-wait timeout: another transaction held the rows, the
    /// database itself is fine.
    pub fn is_lock_conflict(&self) -> bool {
        matches!(self, DbError::Query { error: DieselError::DatabaseError(_, info), .. }
            if LOCKS.iter().any(|m| info.message().to_ascii_lowercase().contains(m)))
    }

    /// True when the database could not be reached or the connection broke, so
    /// that reconnecting later may help (as opposed to a refused statement).
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Rejected { .. } => true,
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

/// Lower-case fragments of the server's messages for ER_LOCK_DEADLOCK (1213)
/// and ER_LOCK_WAIT_TIMEOUT (1205).
const LOCKS: [&str; 2] = ["deadlock found", "lock wait timeout exceeded"];

/// Lower-case fragments of the messages of MariaDB Connector/C, libmysqlclient
/// and the server that mean the connection is gone (CR_SERVER_GONE_ERROR,
/// CR_SERVER_LOST, CR_CONNECTION_ERROR, ER_CONNECTION_KILLED, ER_SERVER_SHUTDOWN).
const CONNECTION_LOST: [&str; 6] =
    ["gone away", "lost connection", "can't connect", "connection was killed", "shutdown in progress", "not connected"];

/// Lower-case fragments of the client library's connection errors that mean
/// the server answered and refused us for good: ER_BAD_DB_ERROR (1049, "Unknown
/// database"), ER_ACCESS_DENIED_ERROR (1045), ER_DBACCESS_DENIED_ERROR (1044) and
/// ER_ACCESS_DENIED_NO_PASSWORD_ERROR (1698, all "Access denied for user"),
/// ER_HOST_NOT_PRIVILEGED (1130) and CR_AUTH_PLUGIN_CANNOT_LOAD (2059). diesel
/// passes on only the message of a failed connect, not its error number.
/// Everything else (can't connect 2002/2003, unknown host 2005, which may be
/// DNS that is not up yet, lost 2013/2006, too many connections 1040, a TLS
/// handshake) may heal, and is retried.
const REJECTED: [&str; 4] =
    ["unknown database", "access denied for user", "is not allowed to connect to this", "could not be loaded"];

/// Whether a connection error message of the client library means the server
/// turned us away for good (see [`REJECTED`]).
pub(super) fn rejects(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    REJECTED.iter().any(|m| message.contains(m))
}

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

/// The form of a database URL that [`check_url`] accepts, for its messages.
const URL_FORM: &str = "mysql://user:password@host[:port]/database[?unix_socket=PATH]";

/// Checks a database URL without connecting: a `mysql://` URL with a host and a
/// database name, in the form diesel parses. The reason never echoes the URL: a
/// malformed URL may hold a password where no parser finds it.
pub fn check_url(url: &str) -> Result<(), DbError> {
    let bad = |why: &str| Err(DbError::InvalidUrl { reason: format!("{why} (expected {URL_FORM})") });
    if !is_mysql_url(url) {
        return bad("not a mysql:// URL with a host");
    }
    let Ok(parsed) = url::Url::parse(url) else { return bad("not a URL") };
    let segments: Vec<&str> = parsed.path_segments().map(Iterator::collect).unwrap_or_default();
    match segments.as_slice() {
        [name] if !name.is_empty() => {}
        [] | [""] => return bad("no database name"),
        _ => return bad("more than one path segment"),
    }
    let query: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
    if query.iter().any(|(k, _)| k == "database") {
        return bad("the database belongs in the path, not in the query");
    }
    if let Some((_, mode)) = query.iter().find(|(k, _)| k == "ssl_mode")
        && !["disabled", "preferred", "required", "verify_ca", "verify_identity"]
            .contains(&mode.to_ascii_lowercase().as_str())
    {
        return bad("unknown ssl_mode");
    }
    for part in [parsed.username(), parsed.password().unwrap_or("")] {
        match percent_encoding::percent_decode_str(part).decode_utf8() {
            Ok(decoded) if !decoded.contains('\0') => {}
            _ => return bad("a user or password that is not UTF-8 without NUL once decoded"),
        }
    }
    if query.iter().any(|(_, v)| v.contains('\0')) {
        return bad("a NUL character in the query");
    }
    Ok(())
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
    fn only_what_waiting_cannot_heal_is_a_rejection() {
        let check = |message: &str, expected: bool| assert_eq!(rejects(message), expected, "{message}");
        check("Unknown database 'blockrepl'", true);
        check("Access denied for user 'app'@'localhost' (using password: YES)", true);
        check("Access denied for user 'app'@'%' to database 'blockrepl'", true);
        check("Access denied for user 'app'@'localhost'", true);
        check("Host '10.0.0.9' is not allowed to connect to this MariaDB server", true);
        check("Plugin caching_sha2_password could not be loaded: no such file", true);
        check("Can't connect to local server through socket '/run/mysqld/mysqld.sock' (2)", false);
        check("Can't connect to server on '127.0.0.1' (111)", false);
        check("Unknown server host 'db.example' (-2)", false);
        check("Unknown MySQL server host 'db.example' (-3)", false);
        check("Lost connection to server at 'handshake: reading initial communication packet', system error: 0", false);
        check("Server has gone away", false);
        check("Too many connections", false);
    }

    #[test]
    fn a_url_is_checked_without_connecting_and_never_echoed() {
        let check = |url: &str, expected: Option<&str>| {
            let got = check_url(url).err().map(|e| e.to_string());
            match (&got, expected) {
                (None, None) => {}
                (Some(msg), Some(why)) => {
                    assert!(
                        msg.starts_with(&format!("invalid database URL: {why} (expected mysql://")),
                        "{url}: {msg}"
                    );
                    assert!(!msg.contains("pw"), "{url}: {msg}");
                }
                _ => panic!("{url}: got {got:?}, expected {expected:?}"),
            }
        };
        check("mysql://app:pw@db.example:3306/blockrepl", None);
        check("mysql://app:pw@localhost/blockrepl?unix_socket=/run/mysqld/mysqld.sock", None);
        check("mysql://app:pw@localhost/blockrepl?ssl_mode=VERIFY_IDENTITY", None);
        check("postgres://app:pw@db/blockrepl", Some("not a mysql:// URL with a host"));
        check("mysql://app:pw@/blockrepl", Some("not a mysql:// URL with a host"));
        check("mysql://app:pw@db:99999/blockrepl", Some("not a mysql:// URL with a host"));
        check("mysql://app:pw@db", Some("no database name"));
        check("mysql://app:pw@db/", Some("no database name"));
        check("mysql://app:pw@db/a/b", Some("more than one path segment"));
        check("mysql://app:pw@db/x?database=y", Some("the database belongs in the path, not in the query"));
        check("mysql://app:pw@db/x?ssl_mode=sometimes", Some("unknown ssl_mode"));
        check("mysql://app:pw%FF@db/x", Some("a user or password that is not UTF-8 without NUL once decoded"));
        check("mysql://app:pw@db/x?unix_socket=/a%00b", Some("a NUL character in the query"));
    }

    #[test]
    fn scrub_removes_encoded_and_decoded_passwords_and_newlines() {
        let url = "mysql://app:s3cr%40t+x@db/x";
        assert_eq!(scrub("bad s3cr@t+x and s3cr%40t+x\nsecond line", url), "bad *** and *** second line");
        assert_eq!(scrub("nothing secret", "mysql://app@db/x"), "nothing secret");
    }
}
