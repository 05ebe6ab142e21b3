//! What a copy is asked to do, and how: [`CopySpec`] (the servers, full or
//! incremental, resume point, bandwidth limit), [`Changes`], [`Tuning`] (connections, request
//! sizes, timeouts, retries) and the [`CancelToken`] that stops a copy or a
//! verification from another thread.
//!
//! Plain data, shared by `copy` and `verify` so that neither reaches into the
//! other for it; it does no I/O.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::limit::Limit;
use super::plan::Area;
use super::retry::RetryPolicy;

/// The NBD protocol's practical ceiling for one request's payload.
pub const MAX_REQUEST: usize = 32 * 1024 * 1024;

/// How hard to push the servers, and how long to wait for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// Most connections per server; more than one only when both servers advertise
    /// multi-conn. Default: one per CPU, at most 4 (more connections than CPUs only
    /// add contention, measured in `scripts/bench`).
    pub connections: usize,
    /// Most requests in flight per connection.
    pub requests: usize,
    /// Largest read or write, in bytes (further limited by the servers and 32 MiB).
    pub request_size: usize,
    /// Most buffer memory for one copy, in bytes.
    pub buffer_bytes: usize,
    /// How often every connection flushes so that the durable watermark moves.
    pub checkpoint_interval: Duration,
    /// Give up on a connection attempt after this long.
    pub connect_timeout: Duration,
    /// A connection with requests in flight and no reply for this long is replaced.
    pub request_timeout: Duration,
    /// No progress at all for this long fails the copy, naming the request that
    /// hung. `None`: the caller watches (the daemon's watchdog does).
    pub stall_timeout: Option<Duration>,
    pub retry: RetryPolicy,
    /// Retries of one kind are reported at once, then at most once per this
    /// interval as a count (see [`RetryLog`](super::retry::RetryLog)).
    pub retry_report_interval: Duration,
    /// Retry the first connection too (with `retry`), when the server refuses or
    /// is not there yet. The daemon does, to ride out a restarting server or a
    /// tunnel that is down; the CLI does not, so a typo fails at once.
    pub retry_first_connect: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            connections: default_connections(),
            requests: 16,
            request_size: 1024 * 1024,
            buffer_bytes: 64 * 1024 * 1024,
            checkpoint_interval: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(120),
            stall_timeout: None,
            retry: RetryPolicy::default(),
            retry_report_interval: Duration::from_secs(5),
            retry_first_connect: false,
        }
    }
}

/// One connection per CPU, at most 4.
pub fn default_connections() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get().clamp(1, 4))
}

/// Where the changed ranges of an incremental copy come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Full copy: every allocated byte.
    Full,
    /// The source's `qemu:dirty-bitmap:NAME` meta context.
    DirtyBitmap(String),
    /// An explicit list (VMware CBT shape); validated against the disk size.
    ChangedAreas(Vec<Area>),
}

/// One disk copy.
#[derive(Debug, Clone)]
pub struct CopySpec {
    pub source: String,
    pub target: String,
    pub changes: Changes,
    /// The target reads as zeros: holes and zero blocks need not be written.
    pub destination_is_zero: bool,
    /// Zero requests must keep the target's blocks allocated (NBD's NO_HOLE flag),
    /// for thick-provisioned volumes.
    pub allocated: bool,
    /// Copy to a target that cannot flush. Refused otherwise: nothing written to
    /// such a target is known to be durable.
    pub allow_no_flush: bool,
    /// Durable watermark of an earlier run; everything below it is skipped.
    pub resume_from: u64,
    pub verify: bool,
    pub tuning: Tuning,
    /// The bandwidth limit this copy obeys (with its ancestors'), changed by
    /// others while it runs; `None`: no limit.
    pub limit: Option<Arc<Limit>>,
}

/// Cancels a running copy from any thread.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
