//! The admin interface: HTTP/1.1 with JSON bodies on a Unix socket, versioned
//! under `/api/v1`, for the `blockrepl` CLI and `curl --unix-socket`.
//!
//! - `wire`: every type that crosses the socket, defined once and used by both sides
//! - `submit`: validation of a submitted job, from the wire request to database rows
//! - `view`: database rows and live aggregator views turned into wire responses
//! - `metrics`: the Prometheus text exposition of `/metrics`
//! - `server`: the actix-web server (lock file, socket mode and group, peer
//!   credentials, routes), answered through the actors' messages
//! - `client`: a small blocking HTTP/1.1 client for the CLI
//!
//! [`AdminError`] is the one error of this boundary: every variant has a stable
//! snake_case code and an HTTP status, and reaches the client as
//! `{"error": {"code": ..., "message": ...}}`.
//!
//! Nothing here touches the database or the engine directly: reads and commands
//! go through the DbWriter and the DiscoveryActor, and the only validation taken
//! from the engine is its URI and changed-areas parsing.

pub mod client;
pub mod metrics;
pub mod server;
pub mod submit;
pub mod view;
pub mod wire;

use crate::db::DbError;

/// Largest request body the server reads (a job with many changed areas is big,
/// but not bigger than this).
pub const MAX_BODY: usize = 16 << 20;

/// Everything the admin API answers with an error, each with a stable code.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),

    #[error("request body has an unknown field: {0}")]
    UnknownField(String),

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("unknown replication type '{0}' (expected full or incremental)")]
    UnknownReplicationType(String),

    #[error("invalid job id '{0}': use 1 to 64 letters, digits, '-', '_', '.' or ':'")]
    InvalidJobId(String),

    #[error("{0}")]
    InvalidUri(String),

    #[error("a job needs at least one disk")]
    NoDisks,

    #[error("disk '{0}' appears more than once")]
    DuplicateDisk(String),

    #[error("disk '{0}' of an incremental job needs dirty_bitmap or changed_areas")]
    MissingChangeSource(String),

    #[error("disk '{0}' has both dirty_bitmap and changed_areas; give exactly one")]
    ConflictingChangeSources(String),

    #[error("disk '{0}' of a full job cannot have dirty_bitmap or changed_areas (use replication_type incremental)")]
    UnexpectedChangeSource(String),

    #[error("disk '{disk}' has bad changed_areas: {reason}")]
    InvalidChangedAreas { disk: String, reason: String },

    #[error("unknown job status '{0}'")]
    InvalidStatus(String),

    #[error("max_rate: {0}")]
    InvalidRate(String),

    #[error("job '{0}' not found")]
    JobNotFound(String),

    #[error("no such endpoint: {method} {path}")]
    UnknownRoute { method: String, path: String },

    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },

    #[error("job '{0}' already exists")]
    DuplicateJob(String),

    #[error("job '{job}' has already finished as {status}")]
    JobFinished { job: String, status: String },

    #[error("request body is larger than {} MiB", MAX_BODY >> 20)]
    PayloadTooLarge,

    #[error("permission denied: uid {uid} is neither root nor in group '{group}'")]
    Forbidden { uid: u32, group: String },

    #[error("database unavailable: {0}")]
    DatabaseUnavailable(String),

    #[error("database error: {0}")]
    Database(String),

    #[error("internal error: {0}")]
    Internal(String),
}

impl AdminError {
    /// The stable, machine-readable code (documented in README.md).
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::MalformedJson(_) => "malformed_json",
            AdminError::UnknownField(_) => "unknown_field",
            AdminError::InvalidRequest(_) => "invalid_request",
            AdminError::UnknownReplicationType(_) => "unknown_replication_type",
            AdminError::InvalidJobId(_) => "invalid_job_id",
            AdminError::InvalidUri(_) => "invalid_uri",
            AdminError::NoDisks => "no_disks",
            AdminError::DuplicateDisk(_) => "duplicate_disk",
            AdminError::MissingChangeSource(_) => "missing_change_source",
            AdminError::ConflictingChangeSources(_) => "conflicting_change_sources",
            AdminError::UnexpectedChangeSource(_) => "unexpected_change_source",
            AdminError::InvalidChangedAreas { .. } => "invalid_changed_areas",
            AdminError::InvalidStatus(_) => "invalid_status",
            AdminError::InvalidRate(_) => "invalid_rate",
            AdminError::JobNotFound(_) => "not_found",
            AdminError::UnknownRoute { .. } => "unknown_route",
            AdminError::MethodNotAllowed { .. } => "method_not_allowed",
            AdminError::DuplicateJob(_) => "duplicate_job",
            AdminError::JobFinished { .. } => "job_finished",
            AdminError::PayloadTooLarge => "payload_too_large",
            AdminError::Forbidden { .. } => "forbidden",
            AdminError::DatabaseUnavailable(_) => "database_unavailable",
            AdminError::Database(_) => "database_error",
            AdminError::Internal(_) => "internal",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            AdminError::Forbidden { .. } => 403,
            AdminError::JobNotFound(_) | AdminError::UnknownRoute { .. } => 404,
            AdminError::MethodNotAllowed { .. } => 405,
            AdminError::DuplicateJob(_) | AdminError::JobFinished { .. } => 409,
            AdminError::PayloadTooLarge => 413,
            AdminError::Database(_) | AdminError::Internal(_) => 500,
            AdminError::DatabaseUnavailable(_) => 503,
            _ => 400,
        }
    }

    /// The JSON body sent to the client.
    pub fn body(&self) -> wire::ErrorBody {
        wire::ErrorBody { error: wire::ErrorDetail { code: self.code().to_string(), message: self.to_string() } }
    }
}

impl From<DbError> for AdminError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::NotFound { job } => AdminError::JobNotFound(job),
            DbError::Conflict { job } => AdminError::DuplicateJob(job),
            DbError::AlreadyFinished { job, status } => {
                AdminError::JobFinished { job, status: status.as_api().to_string() }
            }
            e if e.is_unavailable() => AdminError::DatabaseUnavailable(e.to_string()),
            e => AdminError::Database(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_and_statuses_are_errors() {
        let all = [
            AdminError::MalformedJson("x".into()),
            AdminError::UnknownField("x".into()),
            AdminError::InvalidRequest("x".into()),
            AdminError::UnknownReplicationType("x".into()),
            AdminError::InvalidJobId("x".into()),
            AdminError::InvalidUri("x".into()),
            AdminError::NoDisks,
            AdminError::DuplicateDisk("x".into()),
            AdminError::MissingChangeSource("x".into()),
            AdminError::ConflictingChangeSources("x".into()),
            AdminError::UnexpectedChangeSource("x".into()),
            AdminError::InvalidChangedAreas { disk: "x".into(), reason: "y".into() },
            AdminError::InvalidStatus("x".into()),
            AdminError::JobNotFound("x".into()),
            AdminError::UnknownRoute { method: "GET".into(), path: "/x".into() },
            AdminError::MethodNotAllowed { method: "PUT".into(), path: "/x".into() },
            AdminError::DuplicateJob("x".into()),
            AdminError::JobFinished { job: "x".into(), status: "Failed".into() },
            AdminError::PayloadTooLarge,
            AdminError::Forbidden { uid: 65534, group: "blockrepl".into() },
            AdminError::DatabaseUnavailable("x".into()),
            AdminError::Database("x".into()),
            AdminError::Internal("x".into()),
        ];
        let mut codes: Vec<&str> = all.iter().map(AdminError::code).collect();
        for (e, code) in all.iter().zip(&codes) {
            assert!(code.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{code}");
            assert!((400..600).contains(&e.status()), "{code}");
            let msg = e.to_string();
            assert!(!msg.ends_with('.') && !msg.starts_with(char::is_uppercase), "{msg}");
        }
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), all.len(), "codes are unique");
    }

    #[test]
    fn database_errors_map_to_their_statuses() {
        let e = AdminError::from(DbError::NotFound { job: "j".into() });
        assert_eq!((e.code(), e.status()), ("not_found", 404));
        assert_eq!(e.to_string(), "job 'j' not found");
        let e = AdminError::from(DbError::Conflict { job: "j".into() });
        assert_eq!((e.code(), e.status()), ("duplicate_job", 409));
        let e =
            AdminError::from(DbError::AlreadyFinished { job: "j".into(), status: crate::state::JobStatus::Completed });
        assert_eq!((e.code(), e.status()), ("job_finished", 409));
        assert_eq!(e.to_string(), "job 'j' has already finished as Succeeded");
        let e = AdminError::from(DbError::Connect { url: "mysql://x".into(), error: "refused".into() });
        assert_eq!((e.code(), e.status()), ("database_unavailable", 503));
    }
}
