//! The copy engine's errors. Each names the server it concerns and, for I/O, the
//! offset; callers add the disk's name. Whether an error may be retried is decided
//! where it is raised (see `NbdError::is_transient`), not here.

use super::nbd::NbdError;
use super::plan::AreasError;
use std::fmt;

/// Which side of the copy an error concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Source,
    Target,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Target => "target",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("bad {role} URI '{uri}': {reason}")]
    BadUri { role: Role, uri: String, reason: String },

    #[error("cannot connect to {role} {uri}: {error}")]
    Connect { role: Role, uri: String, error: NbdError },

    #[error("cannot query {what} of {role} {uri}: {error}")]
    Query { role: Role, uri: String, what: &'static str, error: NbdError },

    #[error("target {uri} is smaller than the source ({target_size} < {source_size} bytes)")]
    TargetTooSmall { uri: String, target_size: u64, source_size: u64 },

    #[error("target {uri} is read-only")]
    TargetReadOnly { uri: String },

    #[error("source {uri} has no dirty bitmap '{name}' (the server does not offer qemu:dirty-bitmap:{name})")]
    NoSuchBitmap { uri: String, name: String },

    #[error("bad changed areas: {0}")]
    ChangedAreas(#[from] AreasError),

    #[error("{op} of {length} bytes at offset {offset} on {role} {uri} failed after {attempts} attempt(s): {error}")]
    Io { role: Role, uri: String, op: &'static str, offset: u64, length: u64, attempts: u32, error: NbdError },

    #[error("flush of target {uri} failed after {attempts} attempt(s): {error}")]
    Flush { uri: String, attempts: u32, error: NbdError },

    #[error(
        "target {uri} cannot flush (it does not offer NBD_CMD_FLUSH), so nothing written to it is known to be \
         durable; refused unless targets without flush are allowed explicitly"
    )]
    NoFlush { uri: String },

    #[error(
        "no progress for {}{}",
        humantime::format_duration(std::time::Duration::from_secs(idle.as_secs())),
        waiting.as_ref().map(|w| format!(": {w}")).unwrap_or_default()
    )]
    Stalled { idle: std::time::Duration, waiting: Option<String> },

    #[error("lost the connection to {role} {uri} and could not reconnect after {attempts} attempt(s): {error}")]
    Reconnect { role: Role, uri: String, attempts: u32, error: NbdError },

    #[error("verification failed: source and target differ in the {length} bytes at offset {offset}")]
    VerifyMismatch { offset: u64, length: u64 },

    #[error("cancelled; the target is consistent up to offset {watermark}")]
    Cancelled { watermark: u64 },

    /// The copy's write fence expired: nothing more was sent to the target, and
    /// its connection was cut.
    #[error("stopped writing to target {uri}: the write fence expired")]
    Fenced { uri: String },

    #[error("internal error: {0}")]
    Internal(String),
}

impl CopyError {
    /// The durable watermark a cancelled copy reached, if this is a cancellation.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, CopyError::Cancelled { .. })
    }

    /// Whether the copy stopped because its write fence expired.
    pub fn is_fenced(&self) -> bool {
        matches!(self, CopyError::Fenced { .. })
    }
}
