//! What the copy tells whoever runs it: the [`Event`]s, the names of requests
//! in messages ([`Request`]), and the [`Reporter`] that folds repeated retries
//! into a few reports. Progress is not here: it is read from `Progress`.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::engine::error::Role;
use crate::engine::nbd::NbdError;
use crate::engine::progress::{Progress, Stage};
use crate::engine::retry::RetryLog;

/// Rare things worth telling whoever runs the copy. Progress is not an event: read
/// it from [`Progress`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Stage(Stage),
    Planned {
        disk_size: u64,
        planned_bytes: u64,
        blocks: u64,
    },
    /// The first failure of its kind (server and error) in a while; it is tried
    /// again. `what` is the request, e.g. "read of 1048576 bytes at offset 0".
    Retry {
        role: Role,
        what: String,
        attempt: u32,
        error: String,
    },
    /// More failures of one kind since the last report, folded into one.
    Retrying {
        role: Role,
        failures: u64,
        over: Duration,
        /// The last of them.
        what: String,
        error: String,
    },
    Reconnected {
        role: Role,
    },
    /// Everything planned below `watermark` is written and flushed.
    Checkpoint {
        watermark: u64,
    },
    /// The target cannot flush and that was allowed: its writes count as durable
    /// once acknowledged.
    NoFlush,
    /// The source could not say what is allocated in `bytes` bytes of the disk;
    /// they are read as data (zero blocks still become zero requests).
    Unmapped {
        bytes: u64,
        error: String,
    },
}

impl Event {
    /// One line for a person, for the events that deserve one.
    pub fn describe(&self) -> Option<String> {
        Some(match self {
            Event::Retry { role, what, attempt, error } => {
                format!("retrying the {role}: {what} failed (attempt {attempt}): {error}")
            }
            Event::Retrying { role, failures, over, what, error } => format!(
                "retrying the {role}: {failures} more failed attempt(s) in {} s, the last: {what}: {error}",
                over.as_secs()
            ),
            Event::Reconnected { role } => format!("reconnected to the {role}"),
            Event::NoFlush => "the target cannot flush: its writes count as durable once acknowledged, \
                               which it does not promise"
                .into(),
            Event::Unmapped { bytes, error } => format!(
                "the source could not say which blocks are allocated in {bytes} bytes ({error}); \
                 they are read as data"
            ),
            Event::Stage(_) | Event::Planned { .. } | Event::Checkpoint { .. } => return None,
        })
    }

    /// Whether [`Event::describe`] is a warning (something is not as it should be).
    pub fn is_warning(&self) -> bool {
        matches!(self, Event::Retry { .. } | Event::Retrying { .. } | Event::NoFlush | Event::Unmapped { .. })
    }
}

/// One request, as messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Request {
    /// "read", "write", "zero request", "flush", "connection", "block status".
    pub(super) op: &'static str,
    pub(super) offset: u64,
    pub(super) length: u64,
}

impl Request {
    pub(super) fn new(op: &'static str, offset: u64, length: u64) -> Self {
        Self { op, offset, length }
    }
    pub(super) fn whole(op: &'static str) -> Self {
        Self { op, offset: 0, length: 0 }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            "flush" | "connection" => f.write_str(self.op),
            op => write!(f, "{op} of {} bytes at offset {}", self.length, self.offset),
        }
    }
}

/// Retries are folded by server, kind of request and error.
pub(super) type RetryKey = (Role, &'static str, String);

/// Where retries are reported: the caller's event callback, through a
/// [`RetryLog`] so that a failing server gives a few lines, not thousands.
pub(super) struct Reporter<'a> {
    pub(super) events: &'a (dyn Fn(Event) + Sync),
    pub(super) log: &'a Mutex<RetryLog<RetryKey>>,
    pub(super) progress: &'a Progress,
}

impl Reporter<'_> {
    pub(super) fn retry(&self, role: Role, req: Request, attempt: u32, error: &NbdError) {
        self.progress.add_retry();
        let report = {
            let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            let key = (role, req.op, error.to_string());
            log.note(Instant::now(), key, req.to_string(), attempt, error.to_string())
        };
        if let Some(r) = report {
            let attempt = u32::try_from(r.count).unwrap_or(u32::MAX);
            (self.events)(Event::Retry { role, what: r.what, attempt, error: r.error });
        }
    }

    /// Reports the folded retries that are due, or (`all`) every one left.
    pub(super) fn flush(&self, all: bool) {
        let reports = {
            let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            if all { log.drain(Instant::now()) } else { log.due(Instant::now()) }
        };
        for r in reports {
            let (role, _, _) = r.key;
            (self.events)(Event::Retrying { role, failures: r.count, over: r.over, what: r.what, error: r.error });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_named_for_what_they_are() {
        assert_eq!(Request::new("zero request", 4096, 512).to_string(), "zero request of 512 bytes at offset 4096");
        assert_eq!(Request::whole("flush").to_string(), "flush");
        let e = Event::Retry { role: Role::Target, what: "flush".into(), attempt: 2, error: "EIO".into() };
        assert_eq!(e.describe().as_deref(), Some("retrying the target: flush failed (attempt 2): EIO"));
        assert!(e.is_warning());
        assert_eq!(Event::Checkpoint { watermark: 1 }.describe(), None);
    }
}
