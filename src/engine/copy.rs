//! The copy executor: connects to both servers, plans, and moves the planned bytes
//! with many requests in flight over one or more connection pairs.
//!
//! Shape: the calling thread plans, then starts one worker thread per connection
//! pair and watches them. Each worker runs an event loop over its source and target
//! handles: it takes chunks from a shared [`Dispatcher`], reads them, splits the data
//! into data and zero runs, writes those, and flushes its target connection when
//! the watching thread asks (every checkpoint interval) and at the end. A chunk
//! counts as *durable* only once a flush issued after its writes completed has
//! succeeded, with no failed flush in between; the dispatcher keeps every chunk
//! that is not yet durable, so the lowest of them is the durable watermark.
//! Anything that may have been lost (a failed flush, a lost connection) puts the
//! chunks written since the last good flush back into the queue: they are read
//! and written again, and their bytes stop counting as done until then.
//!
//! Every request to the target is issued in one of two places: `Worker::write_with`
//! (data and zero requests) and `Worker::flush`.
//!
//! Nothing here knows about actors, databases or sockets: progress is read through
//! [`Progress`], rare events go to a callback, and cancellation is a flag.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::{CopyError, Role};
use super::fence::Fence;
use super::nbd::{self, BlockSize, ConnectOptions, Handle, NbdError, Returned};
use super::plan::{self, Action, Area, Extent, Plan};
use super::progress::{Progress, Stage, Tally};
use super::retry::{RetryLog, RetryPolicy, sleep_unless};
use super::verify;
use super::zero;

/// The NBD protocol's practical ceiling for one request's payload.
pub const MAX_REQUEST: usize = 32 * 1024 * 1024;
/// Zero requests carry no payload, so they may be larger.
const MAX_ZERO_REQUEST: u64 = 1 << 30;
/// Block-status queries are made in pieces of this size.
const EXTENTS_STEP: u64 = 1 << 30;
/// Block-status queries in flight at once while planning.
const EXTENTS_IN_FLIGHT: usize = 8;
/// Attempts at a `base:allocation` query before its range is read as data: a
/// wrong guess costs reading holes, not correctness, so it is not worth the whole
/// retry budget.
const EXTENTS_ATTEMPTS: u32 = 3;
/// How often a worker looks at cancellation and timers while waiting.
const TICK: Duration = Duration::from_millis(100);
/// After a cancellation, in-flight work may finish and be flushed for this long.
const CANCEL_GRACE: Duration = Duration::from_millis(800);
/// A connection with requests in flight and no reply for this long is reported
/// (in [`Progress`]) as waited on.
const HANG_AFTER: Duration = Duration::from_secs(2);

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
    /// interval as a count (see [`RetryLog`]).
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
}

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

/// What a finished copy did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub disk_size: u64,
    pub planned_bytes: u64,
    pub bytes_transferred: u64,
    pub bytes_written: u64,
    pub zeroed_bytes: u64,
    pub skipped_bytes: u64,
    /// Changed ranges (incremental) or data extents (full).
    pub blocks: u64,
    pub retries: u64,
    pub seconds: f64,
    pub throughput_bps: u64,
    pub verified: Option<bool>,
    /// The durable watermark the copy ended at: the end of the disk.
    pub watermark: u64,
    /// Bytes planned as data because the source could not say what is allocated.
    pub unmapped_bytes: u64,
    /// Whether the target was flushed (false only for an allowed target without
    /// flush).
    pub flushed: bool,
}

/// What planning found, before anything is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanInfo {
    pub disk_size: u64,
    /// Bytes to read (the progress denominator).
    pub planned_bytes: u64,
    /// Changed ranges (incremental) or data extents (full).
    pub blocks: u64,
    /// Bytes to zero on the target without reading.
    pub zero_bytes: u64,
    /// Bytes left alone because the target already reads as zeros.
    pub skipped_bytes: u64,
    /// Planned bytes below the resume point, already done by an earlier run.
    pub done_bytes: u64,
    /// Bytes planned as data because the source could not say what is allocated.
    pub unmapped_bytes: u64,
}

/// A plan and, until parked or used, the connections it was made on.
struct Prepared {
    plan: Plan,
    /// Where this run starts: the resume offset, in whole blocks.
    resume: u64,
    unmapped_bytes: u64,
    conns: Option<(Handle, Handle, Servers)>,
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

/// One request, as messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Request {
    /// "read", "write", "zero request", "flush", "connection", "block status".
    op: &'static str,
    offset: u64,
    length: u64,
}

impl Request {
    fn new(op: &'static str, offset: u64, length: u64) -> Self {
        Self { op, offset, length }
    }
    fn whole(op: &'static str) -> Self {
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

/// Bytes of the disk the source could not describe (read as data), and why.
type Unmapped = (u64, String);

/// Retries are folded by server, kind of request and error.
type RetryKey = (Role, &'static str, String);

/// Where retries are reported: the caller's event callback, through a
/// [`RetryLog`] so that a failing server gives a few lines, not thousands.
struct Reporter<'a> {
    events: &'a (dyn Fn(Event) + Sync),
    log: &'a Mutex<RetryLog<RetryKey>>,
    progress: &'a Progress,
}

impl Reporter<'_> {
    fn retry(&self, role: Role, req: Request, attempt: u32, error: &NbdError) {
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
    fn flush(&self, all: bool) {
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

/// Runs one [`CopySpec`]; `progress()` and `cancel_token()` may be taken before
/// `run` and used from other threads while it runs.
pub struct Copier {
    spec: CopySpec,
    progress: Progress,
    cancel: CancelToken,
    prepared: Mutex<Option<Prepared>>,
    retry_log: Mutex<RetryLog<RetryKey>>,
    fence: Fence,
}

impl Copier {
    pub fn new(spec: CopySpec) -> Self {
        let retry_log = Mutex::new(RetryLog::new(spec.tuning.retry_report_interval));
        Self {
            spec,
            progress: Progress::new(),
            cancel: CancelToken::default(),
            prepared: Mutex::new(None),
            retry_log,
            fence: Fence::default(),
        }
    }

    /// Sends nothing more to the target once `fence` expires, and fails the copy
    /// with [`CopyError::Fenced`] (see `fence`).
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    fn reporter<'a>(&'a self, events: &'a (dyn Fn(Event) + Sync)) -> Reporter<'a> {
        Reporter { events, log: &self.retry_log, progress: &self.progress }
    }

    /// Connects to both servers, checks them and plans the copy (the "Discover"
    /// stage). The plan and the connections are kept for [`Copier::run`].
    pub fn prepare(&self, events: &(dyn Fn(Event) + Sync)) -> Result<PlanInfo, CopyError> {
        let result = self.prepare_inner(events);
        self.reporter(events).flush(result.is_err());
        result
    }

    fn prepare_inner(&self, events: &(dyn Fn(Event) + Sync)) -> Result<PlanInfo, CopyError> {
        let spec = &self.spec;
        let (mut src, dst, servers) = self.connect_pair(events)?;
        if !servers.can_flush {
            events(Event::NoFlush);
        }
        self.set_stage(Stage::Planning, events);
        let (plan, unmapped) = self.plan(&mut src, &servers, events)?;
        if spec.resume_from > plan.disk_size {
            return Err(CopyError::Internal(format!(
                "resume offset {} is beyond the end of the disk ({} bytes)",
                spec.resume_from, plan.disk_size
            )));
        }
        // A watermark is a chunk's start, so whole blocks, unless an earlier run
        // had other servers: then the block it falls in is copied again.
        let resume = spec.resume_from / servers.min_block * servers.min_block;
        let unmapped_bytes = unmapped.as_ref().map_or(0, |u| u.0);
        if let Some((bytes, error)) = unmapped {
            events(Event::Unmapped { bytes, error });
        }
        let info = PlanInfo {
            disk_size: plan.disk_size,
            planned_bytes: plan.planned_bytes(),
            blocks: plan.blocks,
            zero_bytes: plan.bytes(Action::Zero),
            skipped_bytes: plan.bytes(Action::Skip),
            done_bytes: plan.planned_below(resume),
            unmapped_bytes,
        };
        self.progress.set_plan(info.disk_size, info.planned_bytes, info.done_bytes, info.skipped_bytes);
        self.progress.set_watermark(resume);
        events(Event::Planned { disk_size: info.disk_size, planned_bytes: info.planned_bytes, blocks: info.blocks });
        *self.lock_prepared() = Some(Prepared { plan, resume, unmapped_bytes, conns: Some((src, dst, servers)) });
        Ok(info)
    }

    /// Closes the connections a prepared copy holds (while it waits its turn, say);
    /// `run` opens new ones.
    pub fn park(&self) {
        if let Some(p) = self.lock_prepared().as_mut() {
            p.conns = None;
        }
    }

    fn lock_prepared(&self) -> std::sync::MutexGuard<'_, Option<Prepared>> {
        self.prepared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_stage(&self, s: Stage, events: &(dyn Fn(Event) + Sync)) {
        self.progress.set_stage(s);
        events(Event::Stage(s));
    }

    /// Validates the URIs, connects to both servers and checks that they fit.
    fn connect_pair(&self, events: &(dyn Fn(Event) + Sync)) -> Result<(Handle, Handle, Servers), CopyError> {
        let spec = &self.spec;
        self.set_stage(Stage::Connecting, events);
        validate_uri(Role::Source, &spec.source)?;
        validate_uri(Role::Target, &spec.target)?;
        let stop = || self.cancel.is_cancelled();
        let contexts: Vec<String> = match &spec.changes {
            Changes::Full => vec!["base:allocation".into()],
            Changes::DirtyBitmap(name) => vec![format!("qemu:dirty-bitmap:{name}")],
            Changes::ChangedAreas(_) => vec![],
        };
        let reporter = self.reporter(events);
        let connect = |role: Role, uri: &str, contexts: &[String]| {
            let opts = ConnectOptions { name: role_name(role), meta_contexts: contexts };
            let policy = spec.tuning.retry;
            let mut failures = 0;
            loop {
                let error = match Handle::connect(uri, &opts, spec.tuning.connect_timeout, &stop) {
                    Ok(h) => return Ok(h),
                    Err(error) => error,
                };
                failures += 1;
                // Nobody listening (yet) is worth waiting for; a refused export or
                // a failed TLS handshake is not.
                let absent = error.is_transient() || error.errno == libc::ENOENT;
                if !spec.tuning.retry_first_connect || !absent || !policy.allows(failures) || stop() {
                    return Err(self.cancelled_or(CopyError::Connect { role, uri: uri.into(), error }));
                }
                reporter.retry(role, Request::whole("connection"), failures, &error);
                reporter.flush(false);
                sleep_unless(policy.delay(failures), &stop);
            }
        };
        let src = connect(Role::Source, &spec.source, &contexts)?;
        let dst = connect(Role::Target, &spec.target, &[])?;
        let servers = Servers::inspect(spec, &src, &dst)?;
        Ok((src, dst, servers))
    }

    /// Copies, blocking the calling thread until done, failed or cancelled.
    /// Prepares first unless [`Copier::prepare`] already did.
    pub fn run(&self, events: &(dyn Fn(Event) + Sync)) -> Result<Summary, CopyError> {
        let result = self.run_inner(events);
        self.reporter(events).flush(true);
        result
    }

    fn run_inner(&self, events: &(dyn Fn(Event) + Sync)) -> Result<Summary, CopyError> {
        let started = Instant::now();
        let spec = &self.spec;
        if self.lock_prepared().is_none() {
            self.prepare(events)?;
        }
        let Some(Prepared { plan, resume, unmapped_bytes, conns }) = self.lock_prepared().take() else {
            return Err(CopyError::Internal("copy run twice".into()));
        };
        let (src, dst, servers) = match conns {
            Some(c) => c,
            None => self.connect_pair(events)?,
        };
        let ranges: Vec<plan::Range> =
            plan.remaining_from(resume).into_iter().filter(|r| r.action != Action::Skip).collect();
        let planned = plan.planned_bytes();

        let t = &spec.tuning;
        let connections = if servers.multi_conn { t.connections.max(1) } else { 1 };
        let request_size = servers.request_size(t.request_size);
        let per_conn_bufs = (t.buffer_bytes / request_size / connections).max(1);
        let slots = t.requests.max(1).min(per_conn_bufs);
        self.set_stage(Stage::Copying, events);
        let zero_max = if servers.can_zero { MAX_ZERO_REQUEST } else { request_size as u64 };
        let ctx = Ctx {
            spec,
            progress: &self.progress,
            cancel: &self.cancel,
            fence: &self.fence,
            events,
            reporter: self.reporter(events),
            dispatcher: Mutex::new(Dispatcher::new(ranges, plan.disk_size, request_size as u64, zero_max)),
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
            fast_zero: AtomicBool::new(servers.can_fast_zero),
            can_zero: servers.can_zero,
            can_flush: servers.can_flush,
            multi_conn: servers.multi_conn,
            flush_epoch: AtomicU64::new(0),
            flush_round: AtomicU64::new(0),
            completions: AtomicU64::new(0),
            flushed_through: AtomicU64::new(0),
            running: AtomicUsize::new(connections),
            unfinished: AtomicUsize::new(connections),
            request_size,
            min_block: servers.min_block as usize,
            slots,
        };
        let watermark = execute(&ctx, connections, src, dst)?;
        let copied = Instant::now();

        let verified = if spec.verify {
            self.set_stage(Stage::Verifying, events);
            let ranges: Vec<(u64, u64)> =
                plan.ranges.iter().filter(|r| r.action == Action::Copy).map(|r| (r.offset, r.length)).collect();
            verify::run(
                &verify::VerifySpec {
                    disk_size: plan.disk_size,
                    source: &spec.source,
                    target: &spec.target,
                    ranges: &ranges,
                    connections,
                    request_size,
                    slots,
                    tuning: t,
                },
                &self.progress,
                &self.cancel,
            )?;
            Some(true)
        } else {
            None
        };

        self.set_stage(Stage::Done, events);
        let s = self.progress.snapshot();
        let seconds = started.elapsed().as_secs_f64();
        let copy_seconds = copied.duration_since(started).as_secs_f64().max(1e-6);
        let this_run = s.bytes_done - plan.planned_below(resume);
        Ok(Summary {
            disk_size: plan.disk_size,
            planned_bytes: planned,
            bytes_transferred: s.bytes_done,
            bytes_written: s.bytes_written,
            zeroed_bytes: s.zeroed_bytes,
            skipped_bytes: s.skipped_bytes,
            blocks: plan.blocks,
            retries: s.retries,
            seconds,
            throughput_bps: (this_run as f64 / copy_seconds) as u64,
            verified,
            watermark,
            unmapped_bytes,
            flushed: servers.can_flush,
        })
    }

    fn cancelled_or(&self, e: CopyError) -> CopyError {
        if self.cancel.is_cancelled() { CopyError::Cancelled { watermark: self.spec.resume_from } } else { e }
    }

    /// Asks the source which ranges to read and builds the plan, in whole blocks
    /// of the servers' minimum block size; also says how many bytes the source
    /// could not describe (read as data), and why.
    fn plan(
        &self,
        src: &mut Handle,
        servers: &Servers,
        events: &(dyn Fn(Event) + Sync),
    ) -> Result<(Plan, Option<Unmapped>), CopyError> {
        let (plan, unmapped) = self.plan_ranges(src, servers, events)?;
        Ok((plan.aligned(servers.min_block), unmapped))
    }

    fn plan_ranges(
        &self,
        src: &mut Handle,
        servers: &Servers,
        events: &(dyn Fn(Event) + Sync),
    ) -> Result<(Plan, Option<Unmapped>), CopyError> {
        let spec = &self.spec;
        let size = servers.source_size;
        match &spec.changes {
            Changes::Full => {
                if !servers.base_allocation {
                    // The server cannot tell holes from data: everything is data.
                    let why = "the source does not offer base:allocation".to_string();
                    let unmapped = (size > 0).then_some((size, why));
                    return Ok((plan::full(size, &[], spec.destination_is_zero), unmapped));
                }
                let (extents, unmapped) = self.extents(src, "base:allocation", size, events)?;
                Ok((plan::full(size, &extents, spec.destination_is_zero), unmapped))
            }
            Changes::DirtyBitmap(name) => {
                let ctx = format!("qemu:dirty-bitmap:{name}");
                let (extents, _) = self.extents(src, &ctx, size, events)?;
                Ok((plan::incremental(size, &plan::dirty_areas(&extents, size)), None))
            }
            Changes::ChangedAreas(areas) => Ok((plan::incremental(size, &plan::normalize_areas(areas, size)?), None)),
        }
    }

    /// All extents of meta context `ctx` over the disk, retrying transient errors.
    /// Several queries are in flight at once: servers answer them in parallel
    /// (nbdkit runs a connection's requests on several threads), and planning is
    /// time in which nothing is copied.
    ///
    /// For `base:allocation` a range the source cannot describe after a few
    /// attempts is left out (the plan reads what is not described as data), and
    /// the second value says how many bytes that was and why. A failing dirty
    /// bitmap is an error: an incremental copy never guesses.
    fn extents(
        &self,
        src: &mut Handle,
        ctx: &str,
        size: u64,
        events: &(dyn Fn(Event) + Sync),
    ) -> Result<(Vec<Extent>, Option<Unmapped>), CopyError> {
        let spec = &self.spec;
        let reporter = self.reporter(events);
        let may_guess = ctx == "base:allocation";
        let policy = spec.tuning.retry;
        let attempts = if may_guess { policy.max_attempts.min(EXTENTS_ATTEMPTS) } else { policy.max_attempts };
        let timeout =
            spec.tuning.stall_timeout.map_or(spec.tuning.request_timeout, |s| s.min(spec.tuning.request_timeout));
        let io = |offset: u64, length: u64, attempts: u32, error: NbdError| CopyError::Io {
            role: Role::Source,
            uri: spec.source.clone(),
            op: "block status",
            offset,
            length,
            attempts,
            error,
        };
        // Segments still to ask about (start, end, failures, not before); an answer
        // may cover only a prefix of its segment, and the rest is asked again.
        let now = Instant::now();
        let mut todo: VecDeque<(u64, u64, u32, Instant)> =
            (0..size).step_by(EXTENTS_STEP as usize).map(|p| (p, (p + EXTENTS_STEP).min(size), 0, now)).collect();
        let mut asked: HashMap<u64, (u64, u64, u32)> = HashMap::new();
        let mut found: BTreeMap<u64, Extent> = BTreeMap::new();
        let mut unmapped: Option<Unmapped> = None;
        let mut last_reply = Instant::now();
        while !(todo.is_empty() && asked.is_empty()) {
            if self.cancel.is_cancelled() {
                return Err(CopyError::Cancelled { watermark: spec.resume_from });
            }
            let now = Instant::now();
            let mut failed: Vec<(u64, u64, u32, NbdError)> = Vec::new();
            while asked.len() < EXTENTS_IN_FLIGHT {
                let Some(i) = todo.iter().position(|t| t.3 <= now) else { break };
                let Some((start, end, failures, _)) = todo.remove(i) else { break };
                if asked.is_empty() {
                    last_reply = now;
                }
                match src.aio_block_status(end - start, start) {
                    Ok(cookie) => {
                        asked.insert(cookie, (start, end, failures));
                    }
                    Err(error) => failed.push((start, end, failures, error)),
                }
            }
            let next_due = todo.iter().map(|t| t.3.saturating_duration_since(now)).min().unwrap_or(TICK);
            nbd::poll(&mut [&mut *src], next_due.min(TICK)).map_err(|e| io(0, size, 1, e))?;
            while let Some(c) = src.next_completed() {
                let Some((start, end, failures)) = asked.remove(&c.cookie) else {
                    return Err(CopyError::Internal(format!(
                        "a block-status reply for a query not asked (cookie {})",
                        c.cookie
                    )));
                };
                last_reply = Instant::now();
                match (c.result, c.buffer) {
                    (Ok(()), Returned::Extents(replies)) => {
                        let advanced = take_extents(&replies, ctx, start, end, &mut found);
                        if advanced <= start {
                            let error =
                                NbdError { message: format!("server returned no extents at offset {start}"), errno: 0 };
                            failed.push((start, end, failures, error));
                        } else if advanced < end {
                            todo.push_front((advanced, end, 0, Instant::now()));
                        }
                    }
                    (Err(error), _) => failed.push((start, end, failures, error)),
                    (Ok(()), _) => return Err(CopyError::Internal("block status without extents".into())),
                }
            }
            for (start, end, failures, error) in failed {
                let failures = failures + 1;
                if src.is_dead() {
                    return Err(io(start, end - start, failures, error));
                }
                if error.is_transient() && failures < attempts {
                    reporter.retry(Role::Source, Request::new("block status", start, end - start), failures, &error);
                    todo.push_front((start, end, failures, Instant::now() + policy.delay(failures)));
                } else if may_guess {
                    let u = unmapped.get_or_insert_with(|| (0, error.to_string()));
                    u.0 += end - start;
                } else {
                    return Err(io(start, end - start, failures, error));
                }
            }
            reporter.flush(false);
            if !asked.is_empty() && last_reply.elapsed() > timeout {
                let error = NbdError {
                    message: format!("no reply to a block-status query for {} s", timeout.as_secs()),
                    errno: libc::ETIMEDOUT,
                };
                return Err(io(0, size, 1, error));
            }
        }
        Ok((found.into_values().collect(), unmapped))
    }
}

/// Adds the extents of `ctx` in `replies` that fall inside `[start, end)` to
/// `found`, clipped to it, and returns where they stop (`start` when none do).
fn take_extents(
    replies: &[nbd::ExtentReply],
    ctx: &str,
    start: u64,
    end: u64,
    found: &mut BTreeMap<u64, Extent>,
) -> u64 {
    let mut advanced = start;
    for reply in replies.iter().filter(|r| r.context == ctx) {
        let mut at = reply.offset;
        for pair in reply.entries.chunks_exact(2) {
            let (offset, length) = (at, u64::from(pair[0]));
            at += length;
            if length == 0 || offset < start || offset >= end {
                continue;
            }
            let length = (offset + length).min(end) - offset;
            advanced = advanced.max(offset + length);
            found.insert(offset, Extent { offset, length, flags: pair[1] });
        }
    }
    advanced
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Target => "target",
    }
}

/// Refuses URIs libnbd would reject with a less helpful message, or that name a
/// transport we do not support.
pub fn validate_uri(role: Role, uri: &str) -> Result<(), CopyError> {
    let bad = |reason: &str| Err(CopyError::BadUri { role, uri: uri.into(), reason: reason.into() });
    let Some((scheme, rest)) = uri.split_once("://") else {
        return bad("expected nbd://, nbds://, nbd+unix:// or nbds+unix://");
    };
    match scheme {
        "nbd" | "nbds" => {
            let host = rest.split(['/', '?']).next().unwrap_or("");
            if host.is_empty() {
                return bad("no host");
            }
        }
        "nbd+unix" | "nbds+unix" => {
            let query = rest.split_once('?').map(|(_, q)| q).unwrap_or("");
            if !query.split('&').any(|kv| kv.starts_with("socket=") && kv.len() > "socket=".len()) {
                return bad("a Unix socket URI needs ?socket=PATH");
            }
        }
        _ => return bad("expected nbd://, nbds://, nbd+unix:// or nbds+unix://"),
    }
    Ok(())
}

/// What the two servers told us at connection time, checked for fitness.
struct Servers {
    source_size: u64,
    base_allocation: bool,
    multi_conn: bool,
    can_zero: bool,
    can_fast_zero: bool,
    can_flush: bool,
    /// Largest request both servers accept (0 = no limit advertised).
    max_block: u64,
    /// Alignment both servers want (at least 1): every request starts and ends
    /// on a multiple of it.
    min_block: u64,
    /// The larger of the servers' preferred request sizes (0 = none advertised).
    preferred: u64,
}

impl Servers {
    fn inspect(spec: &CopySpec, src: &Handle, dst: &Handle) -> Result<Self, CopyError> {
        let q = |role: Role, what: &'static str| {
            let uri = if role == Role::Source { &spec.source } else { &spec.target };
            move |error: NbdError| CopyError::Query { role, uri: uri.clone(), what, error }
        };
        let source_size = src.size().map_err(q(Role::Source, "size"))?;
        let target_size = dst.size().map_err(q(Role::Target, "size"))?;
        if target_size < source_size {
            return Err(CopyError::TargetTooSmall { uri: spec.target.clone(), target_size, source_size });
        }
        if dst.is_read_only().map_err(q(Role::Target, "flags"))? {
            return Err(CopyError::TargetReadOnly { uri: spec.target.clone() });
        }
        let base_allocation = match &spec.changes {
            Changes::Full => src.can_meta_context("base:allocation").map_err(q(Role::Source, "meta contexts"))?,
            Changes::DirtyBitmap(name) => {
                let ctx = format!("qemu:dirty-bitmap:{name}");
                if !src.can_meta_context(&ctx).map_err(q(Role::Source, "meta contexts"))? {
                    return Err(CopyError::NoSuchBitmap { uri: spec.source.clone(), name: name.clone() });
                }
                false
            }
            Changes::ChangedAreas(_) => false,
        };
        let max = |h: &Handle, role| h.block_size(BlockSize::Maximum).map_err(q(role, "block size"));
        let min = |h: &Handle, role| h.block_size(BlockSize::Minimum).map_err(q(role, "block size"));
        let max_block = match (max(src, Role::Source)?, max(dst, Role::Target)?) {
            (0, b) | (b, 0) => b,
            (a, b) => a.min(b),
        };
        let min_block = min(src, Role::Source)?.max(min(dst, Role::Target)?).max(1);
        let pref = |h: &Handle, role| h.block_size(BlockSize::Preferred).map_err(q(role, "block size"));
        let preferred = pref(src, Role::Source)?.max(pref(dst, Role::Target)?);
        let can_flush = dst.can_flush().map_err(q(Role::Target, "flags"))?;
        if !can_flush && !spec.allow_no_flush {
            return Err(CopyError::NoFlush { uri: spec.target.clone() });
        }
        Ok(Self {
            source_size,
            base_allocation,
            multi_conn: src.can_multi_conn().map_err(q(Role::Source, "flags"))?
                && dst.can_multi_conn().map_err(q(Role::Target, "flags"))?,
            can_zero: dst.can_zero().map_err(q(Role::Target, "flags"))?,
            can_fast_zero: dst.can_fast_zero().map_err(q(Role::Target, "flags"))?,
            can_flush,
            max_block,
            min_block,
            preferred,
        })
    }

    /// The request size to use: the wish, at least the servers' preferred size,
    /// within their maximum, a multiple of their alignment and of the
    /// zero-detection block where possible.
    fn request_size(&self, wanted: usize) -> usize {
        let mut size = wanted.clamp(zero::BLOCK, MAX_REQUEST) as u64;
        size = size.max(self.preferred.min(MAX_REQUEST as u64));
        if self.max_block > 0 {
            size = size.min(self.max_block);
        }
        let align = self.min_block.max(if size >= zero::BLOCK as u64 { zero::BLOCK as u64 } else { 1 });
        ((size / align) * align).max(self.min_block) as usize
    }
}

/// A piece of the plan handed to one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    offset: u64,
    length: u64,
    action: Action,
    /// Failed attempts so far.
    failures: u32,
}

/// Hands out chunks in plan order and remembers which are not yet durable.
struct Dispatcher {
    ranges: Vec<plan::Range>,
    idx: usize,
    pos: u64,
    end: u64,
    copy_max: u64,
    zero_max: u64,
    /// Offsets of chunks handed out and not yet durable.
    outstanding: BTreeSet<u64>,
}

impl Dispatcher {
    fn new(ranges: Vec<plan::Range>, end: u64, copy_max: u64, zero_max: u64) -> Self {
        let pos = ranges.first().map_or(end, |r| r.offset);
        Self { ranges, idx: 0, pos, end, copy_max, zero_max, outstanding: BTreeSet::new() }
    }

    fn next(&mut self) -> Option<Chunk> {
        while let Some(r) = self.ranges.get(self.idx) {
            self.pos = self.pos.max(r.offset);
            if self.pos >= r.end() {
                self.idx += 1;
                continue;
            }
            let max = if r.action == Action::Zero { self.zero_max } else { self.copy_max };
            // Chunk boundaries fall on multiples of the chunk size, so requests stay
            // aligned whatever the extents look like.
            let end = ((self.pos / max + 1) * max).min(r.end());
            let chunk = Chunk { offset: self.pos, length: end - self.pos, action: r.action, failures: 0 };
            self.pos = end;
            self.outstanding.insert(chunk.offset);
            return Some(chunk);
        }
        None
    }

    fn durable(&mut self, offset: u64) {
        self.outstanding.remove(&offset);
    }

    /// The lowest offset not yet durable, when anything is left: the copy may end
    /// in success only when this is `None`.
    fn unfinished(&self) -> Option<u64> {
        let w = self.watermark();
        (w < self.end || !self.outstanding.is_empty()).then_some(w)
    }

    /// Everything planned below this offset is durable.
    fn watermark(&self) -> u64 {
        let next = match self.ranges[self.idx.min(self.ranges.len())..].iter().find(|r| r.end() > self.pos) {
            Some(r) => self.pos.max(r.offset),
            None => self.end,
        };
        self.outstanding.first().map_or(next, |&o| o.min(next))
    }
}

/// What the workers share.
struct Ctx<'a> {
    spec: &'a CopySpec,
    progress: &'a Progress,
    cancel: &'a CancelToken,
    /// No request may go to the target once it expires.
    fence: &'a Fence,
    events: &'a (dyn Fn(Event) + Sync),
    reporter: Reporter<'a>,
    dispatcher: Mutex<Dispatcher>,
    /// Set when any worker failed: the others wind down.
    stop: AtomicBool,
    failure: Mutex<Option<CopyError>>,
    /// Cleared for everyone once the target refuses a fast zero.
    fast_zero: AtomicBool,
    can_zero: bool,
    can_flush: bool,
    /// The servers advertise multi-conn: a flush on any connection covers the
    /// writes completed on all of them.
    multi_conn: bool,
    /// Grows with every failed flush, on any connection: writes issued before it
    /// may be lost and are written again.
    flush_epoch: AtomicU64,
    /// Grows every checkpoint interval; each worker flushes when it sees it move.
    flush_round: AtomicU64,
    /// Counts chunks whose writes completed; a flush covers those counted before
    /// it was issued.
    completions: AtomicU64,
    /// With multi-conn: every chunk counted up to here is flushed.
    flushed_through: AtomicU64,
    /// Workers still running, and those of them with chunks to copy.
    running: AtomicUsize,
    unfinished: AtomicUsize,
    request_size: usize,
    /// Zero blocks are found in pieces of this size (the servers' minimum block
    /// size, at least 4 KiB), so that zero requests stay aligned.
    min_block: usize,
    /// Requests in flight per worker (each read holds one buffer).
    slots: usize,
}

impl Ctx<'_> {
    fn dispatcher(&self) -> std::sync::MutexGuard<'_, Dispatcher> {
        // A poisoned lock means a worker panicked; the data is still consistent
        // (every update is a single call) and the panic is reported separately.
        self.dispatcher.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn uri(&self, role: Role) -> &str {
        if role == Role::Source { &self.spec.source } else { &self.spec.target }
    }

    fn fail(&self, e: CopyError) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    fn epoch(&self) -> u64 {
        self.flush_epoch.load(Ordering::SeqCst)
    }
}

/// Runs the workers and watches them until all are done: moves the durable
/// watermark, asks for a flush on every connection each checkpoint interval,
/// fails a copy that stalls, and reports folded retries. Returns the watermark.
fn execute(ctx: &Ctx<'_>, connections: usize, src: Handle, dst: Handle) -> Result<u64, CopyError> {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut first = Some((src, dst));
    let results: Vec<std::thread::Result<()>> = std::thread::scope(|s| {
        let mut joins = Vec::with_capacity(connections);
        for i in 0..connections {
            let handles = first.take();
            let done = done_tx.clone();
            let builder = std::thread::Builder::new().name(format!("copy-{i}"));
            let spawned = builder.spawn_scoped(s, move || {
                if let Err(e) = Worker::new(ctx, i, handles).run() {
                    ctx.fail(e);
                }
                // The receiver outlives every worker; a send error cannot happen.
                let _ = done.send(());
            });
            match spawned {
                Ok(j) => joins.push(j),
                Err(e) => {
                    ctx.running.fetch_sub(1, Ordering::SeqCst);
                    ctx.fail(CopyError::Internal(format!("cannot start a copy thread: {e}")));
                }
            }
        }
        drop(done_tx);
        let tuning = &ctx.spec.tuning;
        let mut last = ctx.progress.snapshot().durable_watermark;
        let mut next_round = Instant::now() + tuning.checkpoint_interval;
        let mut moved = (ctx.progress.work(), Instant::now());
        let mut running = joins.len();
        while running > 0 {
            match done_rx.recv_timeout(TICK) {
                Ok(()) => running -= 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_round {
                ctx.flush_round.fetch_add(1, Ordering::SeqCst);
                next_round = now + tuning.checkpoint_interval;
            }
            let w = ctx.dispatcher().watermark();
            if w > last {
                ctx.progress.set_watermark(w);
                (ctx.events)(Event::Checkpoint { watermark: w });
                last = w;
            }
            let work = ctx.progress.work();
            if work != moved.0 {
                moved = (work, now);
            } else if let Some(limit) = tuning.stall_timeout
                && now.duration_since(moved.1) >= limit
                && !ctx.stop.load(Ordering::SeqCst)
            {
                let idle = now.duration_since(moved.1);
                ctx.fail(CopyError::Stalled { idle, waiting: ctx.progress.waiting_on() });
            }
            ctx.reporter.flush(false);
        }
        joins.into_iter().map(|j| j.join()).collect()
    });
    if results.iter().any(|r| r.is_err()) {
        ctx.fail(CopyError::Internal("a copy thread panicked".into()));
    }
    let failure = ctx.failure.lock().unwrap_or_else(|e| e.into_inner()).take();
    let (watermark, unfinished) = {
        let d = ctx.dispatcher();
        (d.watermark(), d.unfinished())
    };
    ctx.progress.set_watermark(watermark);
    verdict(failure, ctx.cancel.is_cancelled(), watermark, unfinished)
}

/// How a copy whose workers all stopped ended: their failure, a cancellation, or
/// success, which needs proof: every planned chunk durable. Anything else is a
/// bug, reported as one, never a success.
fn verdict(
    failure: Option<CopyError>,
    cancelled: bool,
    watermark: u64,
    unfinished: Option<u64>,
) -> Result<u64, CopyError> {
    match (failure, unfinished) {
        (Some(e), _) => Err(e),
        (None, _) if cancelled => Err(CopyError::Cancelled { watermark }),
        (None, None) => Ok(watermark),
        (None, Some(at)) => Err(CopyError::Internal(format!(
            "the copy stopped with the data at offset {at} not yet written and flushed"
        ))),
    }
}

/// One connection to a server and its health.
struct Conn {
    handle: Option<Handle>,
    /// Last time a reply arrived or the connection went from idle to busy.
    last_activity: Instant,
    /// Consecutive failed connection attempts.
    failures: u32,
    reconnect_at: Instant,
    last_error: Option<NbdError>,
}

impl Conn {
    fn new(handle: Option<Handle>) -> Self {
        let now = Instant::now();
        Self { handle, last_activity: now, failures: 0, reconnect_at: now, last_error: None }
    }

    fn live(&mut self) -> Option<&mut Handle> {
        self.handle.as_mut().filter(|h| !h.is_dead())
    }

    fn busy(&self) -> usize {
        self.handle.as_ref().map_or(0, |h| h.in_flight())
    }
}

/// A chunk whose writes are in flight.
struct Pending {
    chunk: Chunk,
    writes: u32,
    buf: Option<Arc<Vec<u8>>>,
    /// The first failed request of the chunk.
    error: Option<(Request, NbdError)>,
    /// The target refused a fast zero: redo without it, at no cost to the budget.
    refused_fast_zero: bool,
    tally: Tally,
    /// The flush epoch when the writes were issued.
    epoch: u64,
}

impl Pending {
    fn new(chunk: Chunk, tally: Tally, epoch: u64) -> Self {
        Self { chunk, writes: 0, buf: None, error: None, refused_fast_zero: false, tally, epoch }
    }
}

/// A target request in flight (a data write or a zero request).
struct InFlight {
    cookie: u64,
    /// Offset of the chunk it belongs to.
    chunk: u64,
    req: Request,
    fast_zero: bool,
}

/// A chunk written and not yet flushed.
struct Written {
    chunk: Chunk,
    /// What it added to the progress (taken back if it must be written again).
    tally: Tally,
    /// The flush epoch when its writes were issued.
    epoch: u64,
    /// Its number in `Ctx::completions`.
    seq: u64,
}

/// A flush in flight and the chunks it covers.
struct Flushing {
    cookie: u64,
    chunks: Vec<Written>,
    /// `Ctx::completions` when it was issued.
    through: u64,
}

struct Worker<'a> {
    ctx: &'a Ctx<'a>,
    /// Which worker this is, for the progress's list of waits.
    id: usize,
    src: Conn,
    dst: Conn,
    /// Reads in flight: cookie → chunk.
    reads: Vec<(u64, Chunk)>,
    writes: Vec<InFlight>,
    pending: Vec<Pending>,
    unflushed: Vec<Written>,
    flushing: Option<Flushing>,
    /// Failed flushes since the last good one.
    flush_failures: u32,
    /// The flush round, flush epoch and `flushed_through` last acted on.
    round: u64,
    epoch: u64,
    through: u64,
    retry: Vec<(Instant, Chunk)>,
    free: Vec<Vec<u8>>,
    allocated: usize,
    zero_buf: Option<Arc<Vec<u8>>>,
    runs: Vec<zero::Run>,
    exhausted: bool,
    /// Counted as finished in `Ctx::unfinished`.
    finished: bool,
    /// What this worker last reported as waited on.
    hang: Option<(Instant, String)>,
}

impl<'a> Worker<'a> {
    /// A worker on the given connections, or on new ones made by its first loop.
    fn new(ctx: &'a Ctx<'a>, id: usize, handles: Option<(Handle, Handle)>) -> Self {
        let (s, d) = match handles {
            Some((s, d)) => (Some(s), Some(d)),
            None => (None, None),
        };
        Self {
            ctx,
            id,
            src: Conn::new(s),
            dst: Conn::new(d),
            reads: Vec::new(),
            writes: Vec::new(),
            pending: Vec::new(),
            unflushed: Vec::new(),
            flushing: None,
            flush_failures: 0,
            round: ctx.flush_round.load(Ordering::SeqCst),
            epoch: ctx.epoch(),
            through: 0,
            retry: Vec::new(),
            free: Vec::new(),
            allocated: 0,
            zero_buf: None,
            runs: Vec::new(),
            exhausted: false,
            finished: false,
            hang: None,
        }
    }

    fn in_use(&self) -> usize {
        self.reads.len() + self.pending.len()
    }

    fn idle(&self) -> bool {
        self.reads.is_empty() && self.pending.is_empty()
    }

    fn run(mut self) -> Result<(), CopyError> {
        let result = self.run_loop();
        self.ctx.progress.set_hang(self.id, None);
        self.set_finished(true);
        self.ctx.running.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn run_loop(&mut self) -> Result<(), CopyError> {
        loop {
            if self.ctx.cancel.is_cancelled() || self.ctx.stop.load(Ordering::SeqCst) {
                self.wind_down();
                return Ok(());
            }
            self.connect_due()?;
            self.issue()?;
            self.absorb();
            let finished = self.exhausted && self.idle() && self.retry.is_empty();
            self.set_finished(finished);
            // A flush of ours still in flight whose chunks other connections'
            // flushes already covered (multi-conn) need not be waited for.
            let covered = self.flushing.as_ref().is_none_or(|f| f.chunks.is_empty());
            let done = finished && self.unflushed.is_empty() && covered;
            if done && !self.helps() {
                return Ok(());
            }
            // Flush at each round, at the end of our own chunks, and, helping,
            // at once when every worker is at its end.
            let round = self.ctx.flush_round.load(Ordering::SeqCst);
            let all_finished = self.ctx.unfinished.load(Ordering::SeqCst) == 0;
            if round != self.round || (finished && !done) || (done && all_finished) {
                if self.flushing.is_none() {
                    self.round = round;
                }
                self.flush()?;
            }
            self.wait();
            self.reap()?;
            self.check_health()?;
        }
    }

    /// Whether this worker, done with its own chunks, stays to flush for the
    /// others: with multi-conn its flush covers their writes too, so one
    /// connection that flushes slowly does not hold the watermark back.
    fn helps(&self) -> bool {
        let c = self.ctx;
        let all_covered = c.unfinished.load(Ordering::SeqCst) == 0
            && c.completions.load(Ordering::SeqCst) <= c.flushed_through.load(Ordering::SeqCst);
        c.multi_conn && c.running.load(Ordering::SeqCst) > 1 && !all_covered
    }

    fn set_finished(&mut self, finished: bool) {
        if finished != self.finished {
            self.finished = finished;
            if finished {
                self.ctx.unfinished.fetch_sub(1, Ordering::SeqCst);
            } else {
                self.ctx.unfinished.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// (Re)connects a missing connection when its backoff has passed.
    fn connect_due(&mut self) -> Result<(), CopyError> {
        for role in [Role::Source, Role::Target] {
            let conn = if role == Role::Source { &self.src } else { &self.dst };
            if conn.handle.is_some() || Instant::now() < conn.reconnect_at {
                continue;
            }
            let opts = ConnectOptions { name: role_name(role), meta_contexts: &[] };
            let uri = self.ctx.uri(role);
            let stop = || self.ctx.cancel.is_cancelled() || self.ctx.stop.load(Ordering::SeqCst);
            self.ctx.progress.set_hang(self.id, Some((Instant::now(), format!("connection to {role} {uri}"))));
            let result = Handle::connect(uri, &opts, self.ctx.spec.tuning.connect_timeout, &stop);
            self.ctx.progress.set_hang(self.id, None);
            self.hang = None;
            let conn = if role == Role::Source { &mut self.src } else { &mut self.dst };
            match result {
                Ok(h) => {
                    let was_lost = conn.last_error.is_some();
                    conn.handle = Some(h);
                    conn.last_activity = Instant::now();
                    if was_lost {
                        (self.ctx.events)(Event::Reconnected { role });
                    }
                }
                Err(error) => {
                    conn.failures += 1;
                    let policy = self.ctx.spec.tuning.retry;
                    if stop() {
                        return Ok(());
                    }
                    if !policy.allows(conn.failures) {
                        return Err(CopyError::Reconnect { role, uri: uri.into(), attempts: conn.failures, error });
                    }
                    conn.reconnect_at = Instant::now() + policy.delay(conn.failures);
                    let failures = conn.failures;
                    self.ctx.reporter.retry(role, Request::whole("connection"), failures, &error);
                    let conn = if role == Role::Source { &mut self.src } else { &mut self.dst };
                    conn.last_error = Some(error);
                }
            }
        }
        Ok(())
    }

    fn take_buf(&mut self) -> Option<Vec<u8>> {
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        if self.allocated < self.ctx.slots {
            self.allocated += 1;
            return Some(vec![0u8; self.ctx.request_size]);
        }
        None
    }

    fn recycle(&mut self, buf: Option<Arc<Vec<u8>>>) {
        if let Some(arc) = buf {
            match Arc::try_unwrap(arc) {
                Ok(b) => self.free.push(b),
                // Still shared (cannot happen once every write is retired): let
                // it go and allow a new one.
                Err(_) => self.allocated -= 1,
            }
        }
    }

    /// Starts reads and zero requests until every slot is busy.
    fn issue(&mut self) -> Result<(), CopyError> {
        let now = Instant::now();
        while self.in_use() < self.ctx.slots && self.src.live().is_some() && self.dst.live().is_some() {
            let chunk = if let Some(i) = self.retry.iter().position(|(t, _)| *t <= now) {
                self.retry.swap_remove(i).1
            } else if self.exhausted {
                break;
            } else if let Some(c) = self.ctx.dispatcher().next() {
                c
            } else {
                self.exhausted = true;
                break;
            };
            match chunk.action {
                Action::Copy => {
                    let Some(buf) = self.take_buf() else {
                        self.retry.push((now, chunk));
                        break;
                    };
                    if self.src.busy() == 0 {
                        self.src.last_activity = now;
                    }
                    let Some(h) = self.src.live() else {
                        self.free.push(buf);
                        self.retry.push((now, chunk));
                        break;
                    };
                    match h.aio_pread(buf, chunk.length as usize, chunk.offset) {
                        Ok(cookie) => self.reads.push((cookie, chunk)),
                        Err((e, buf)) => {
                            self.free.push(buf);
                            self.failed(Role::Source, Request::new("read", chunk.offset, chunk.length), chunk, e)?;
                        }
                    }
                }
                Action::Zero => self.issue_zero(chunk)?,
                // Skipped ranges are filtered out of the plan before dispatch.
                Action::Skip => self.ctx.dispatcher().durable(chunk.offset),
            }
        }
        Ok(())
    }

    fn issue_zero(&mut self, chunk: Chunk) -> Result<(), CopyError> {
        let mut p = Pending::new(chunk, Tally { zeroed: chunk.length, ..Tally::default() }, self.ctx.epoch());
        if self.ctx.can_zero {
            let fast = self.ctx.fast_zero.load(Ordering::Relaxed);
            self.write_zeros(&mut p, chunk.offset, chunk.length, fast);
        } else {
            // The target cannot zero: send zeros as data (chunks are request-sized).
            let zb = self.zero_buf.get_or_insert_with(|| Arc::new(vec![0u8; self.ctx.request_size])).clone();
            self.write_data(&mut p, &zb, 0..chunk.length as usize, chunk.offset);
        }
        self.settle(p)
    }

    fn write_data(&mut self, p: &mut Pending, buf: &Arc<Vec<u8>>, range: std::ops::Range<usize>, offset: u64) {
        let req = Request::new("write", offset, range.len() as u64);
        self.write_with(p, req, false, |h| h.aio_pwrite(buf, range, offset));
    }

    fn write_zeros(&mut self, p: &mut Pending, offset: u64, length: u64, fast: bool) {
        let keep_allocated = self.ctx.spec.allocated;
        let req = Request::new("zero request", offset, length);
        self.write_with(p, req, fast, |h| h.aio_zero(length, offset, fast, keep_allocated));
    }

    /// Issues one write or zero request of `p` on the target connection, if it is
    /// up and the write fence is open. Every target request but the flush goes
    /// through here.
    fn write_with(
        &mut self,
        p: &mut Pending,
        req: Request,
        fast_zero: bool,
        op: impl FnOnce(&mut Handle) -> Result<u64, NbdError>,
    ) {
        if self.fenced() {
            let e = NbdError { message: "write fence expired".into(), errno: libc::ECANCELED };
            p.error.get_or_insert((req, e));
            return;
        }
        if self.dst.busy() == 0 {
            self.dst.last_activity = Instant::now();
        }
        let res = match self.dst.live() {
            Some(h) => op(h),
            None => Err(lost()),
        };
        match res {
            Ok(cookie) => {
                self.writes.push(InFlight { cookie, chunk: p.chunk.offset, req, fast_zero });
                p.writes += 1;
            }
            Err(e) => {
                p.error.get_or_insert((req, e));
            }
        }
    }

    /// Keeps `p` until its writes complete, or finishes it now if it has none.
    fn settle(&mut self, p: Pending) -> Result<(), CopyError> {
        if p.writes > 0 {
            self.pending.push(p);
            Ok(())
        } else {
            self.finish(p)
        }
    }

    /// A chunk's writes are all done (or it needed none).
    fn finish(&mut self, p: Pending) -> Result<(), CopyError> {
        self.recycle(p.buf);
        if let Some((req, e)) = p.error {
            return self.failed(Role::Target, req, p.chunk, e);
        }
        if p.refused_fast_zero {
            self.retry.push((Instant::now(), p.chunk));
            return Ok(());
        }
        let wrote_something = p.tally.written + p.tally.zeroed > 0;
        if !self.ctx.can_flush || !wrote_something {
            // Nothing to flush, or a server without flush (allowed explicitly):
            // durable as it stands.
            self.ctx.progress.add(p.tally);
            self.ctx.dispatcher().durable(p.chunk.offset);
            return Ok(());
        }
        if p.epoch != self.ctx.epoch() {
            // A flush failed while these writes were in flight: the server may
            // have dropped them.
            self.retry.push((Instant::now(), p.chunk));
            return Ok(());
        }
        self.ctx.progress.add(p.tally);
        let seq = self.ctx.completions.fetch_add(1, Ordering::SeqCst) + 1;
        self.unflushed.push(Written { chunk: p.chunk, tally: p.tally, epoch: p.epoch, seq });
        Ok(())
    }

    /// A read of `chunk` arrived: write its data runs and zero its zero runs.
    fn on_read(&mut self, chunk: Chunk, buf: Vec<u8>) -> Result<(), CopyError> {
        let len = chunk.length as usize;
        let mut runs = std::mem::take(&mut self.runs);
        runs.clear();
        zero::runs(&buf[..len], self.ctx.min_block, |r| runs.push(r));
        let buf = Arc::new(buf);
        let mut p = Pending::new(chunk, Tally { done: chunk.length, ..Tally::default() }, self.ctx.epoch());
        let fast = self.ctx.fast_zero.load(Ordering::Relaxed);
        for r in &runs {
            let offset = chunk.offset + r.start as u64;
            let n = (r.end - r.start) as u64;
            if !r.zero {
                p.tally.written += n;
                self.write_data(&mut p, &buf, r.start..r.end, offset);
            } else if self.ctx.spec.destination_is_zero {
                p.tally.skipped += n;
            } else {
                p.tally.zeroed += n;
                if self.ctx.can_zero {
                    self.write_zeros(&mut p, offset, n, fast);
                } else {
                    self.write_data(&mut p, &buf, r.start..r.end, offset);
                }
            }
            if p.error.is_some() {
                break;
            }
        }
        self.runs = runs;
        p.buf = Some(buf);
        self.settle(p)
    }

    /// Starts a flush of this worker's target connection covering what it wrote.
    /// The only place a flush is issued.
    fn flush(&mut self) -> Result<(), CopyError> {
        let through = self.ctx.completions.load(Ordering::SeqCst);
        // With multi-conn a flush here also covers the other connections' writes.
        let theirs = self.ctx.multi_conn && through > self.ctx.flushed_through.load(Ordering::SeqCst);
        if self.flushing.is_some() || (self.unflushed.is_empty() && !theirs) {
            return Ok(());
        }
        if self.fenced() {
            return Err(CopyError::Fenced { uri: self.ctx.spec.target.clone() });
        }
        let Some(h) = self.dst.live() else { return Ok(()) };
        match h.aio_flush() {
            Ok(cookie) => {
                if self.dst.busy() == 1 {
                    self.dst.last_activity = Instant::now();
                }
                self.flushing = Some(Flushing { cookie, chunks: std::mem::take(&mut self.unflushed), through });
                Ok(())
            }
            Err(e) => self.flush_failed(e, Vec::new()),
        }
    }

    /// A flush failed. As after a failed fsync, whatever was written since the
    /// last good flush may be gone: the chunks it covered, those written since,
    /// those in flight, and (multi-conn) those of the other connections. All are
    /// read and written again before they count, after the usual backoff.
    fn flush_failed(&mut self, error: NbdError, chunks: Vec<Written>) -> Result<(), CopyError> {
        self.epoch = self.ctx.flush_epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.flush_failures += 1;
        let policy = self.ctx.spec.tuning.retry;
        if !error.is_transient() || !policy.allows(self.flush_failures) {
            return Err(CopyError::Flush { uri: self.ctx.spec.target.clone(), attempts: self.flush_failures, error });
        }
        self.ctx.reporter.retry(Role::Target, Request::whole("flush"), self.flush_failures, &error);
        let at = Instant::now() + policy.delay(self.flush_failures);
        let unflushed = std::mem::take(&mut self.unflushed);
        for w in chunks.into_iter().chain(unflushed) {
            self.rewrite(w, at);
        }
        Ok(())
    }

    /// A flush covering `chunks` succeeded: they are durable, unless a flush
    /// failed somewhere since their writes were issued.
    fn flushed(&mut self, chunks: Vec<Written>) {
        let epoch = self.ctx.epoch();
        let mut lost = Vec::new();
        {
            let mut d = self.ctx.dispatcher();
            for w in chunks {
                if w.epoch == epoch {
                    d.durable(w.chunk.offset);
                } else {
                    lost.push(w);
                }
            }
        }
        let now = Instant::now();
        for w in lost {
            self.rewrite(w, now);
        }
    }

    /// Takes back what `w` added to the progress and queues it to be read and
    /// written again at `at`.
    fn rewrite(&mut self, w: Written, at: Instant) {
        self.ctx.progress.take_back(w.tally);
        self.retry.push((at, w.chunk));
    }

    /// Applies what the other connections learned: a failed flush anywhere (the
    /// writes issued before it may be lost) and, with multi-conn, a good flush
    /// anywhere (it covers the writes completed before it was issued).
    fn absorb(&mut self) {
        if !self.ctx.can_flush {
            return;
        }
        let epoch = self.ctx.epoch();
        if epoch != self.epoch {
            self.epoch = epoch;
            let (keep, lost): (Vec<Written>, Vec<Written>) =
                std::mem::take(&mut self.unflushed).into_iter().partition(|w| w.epoch == epoch);
            self.unflushed = keep;
            let now = Instant::now();
            for w in lost {
                self.rewrite(w, now);
            }
        }
        if self.ctx.multi_conn {
            let through = self.ctx.flushed_through.load(Ordering::SeqCst);
            if through > self.through {
                self.through = through;
                let covered = |chunks: &mut Vec<Written>| {
                    let (done, keep): (Vec<Written>, Vec<Written>) =
                        std::mem::take(chunks).into_iter().partition(|w| w.seq <= through);
                    *chunks = keep;
                    done
                };
                let mut done = covered(&mut self.unflushed);
                if let Some(f) = self.flushing.as_mut() {
                    done.extend(covered(&mut f.chunks));
                }
                self.flushed(done);
            }
        }
    }

    /// Cuts the target connection and fails the copy once the write fence has
    /// expired; true if it has. The cut is abrupt: a polite disconnect would let
    /// libnbd finish sending whatever request it had begun.
    fn fenced(&mut self) -> bool {
        if !self.ctx.fence.expired() {
            return false;
        }
        if let Some(h) = self.dst.handle.take() {
            h.abort();
        }
        self.ctx.fail(CopyError::Fenced { uri: self.ctx.spec.target.clone() });
        true
    }

    /// Waits for socket activity, a due retry or the next tick. Socket work on
    /// the target (which may send the rest of a queued or partly sent request)
    /// happens only while the write fence is open, checked again after the wait.
    fn wait(&mut self) {
        self.fenced();
        let now = Instant::now();
        let mut timeout = TICK;
        for (t, _) in &self.retry {
            timeout = timeout.min(t.saturating_duration_since(now));
        }
        for c in [&self.src, &self.dst] {
            if c.handle.is_none() {
                timeout = timeout.min(c.reconnect_at.saturating_duration_since(now));
            }
        }
        let target = self.dst.live().is_some();
        let mut hs: Vec<&mut Handle> = [self.src.live(), self.dst.live()].into_iter().flatten().collect();
        if hs.is_empty() {
            std::thread::sleep(timeout);
            return;
        }
        // A failing poll(2) leaves nothing to do but look again at the next tick.
        let fence = self.ctx.fence;
        let _ = nbd::poll_unless(&mut hs, timeout, &|| target && fence.expired());
        self.fenced();
    }

    /// Handles every finished command on both connections. A reply this worker
    /// cannot account for is a bug and fails the copy: skipping it could leave a
    /// chunk unwritten.
    fn reap(&mut self) -> Result<(), CopyError> {
        while let Some(c) = self.src.handle.as_mut().and_then(Handle::next_completed) {
            self.src.last_activity = Instant::now();
            let Some(i) = self.reads.iter().position(|(k, _)| *k == c.cookie) else {
                return Err(unknown_reply(Role::Source, c.cookie));
            };
            let (_, chunk) = self.reads.swap_remove(i);
            let buf = match c.buffer {
                Returned::Read(buf) => buf,
                _ => {
                    return Err(CopyError::Internal(format!(
                        "the read of {} bytes at offset {} completed without its buffer",
                        chunk.length, chunk.offset
                    )));
                }
            };
            match c.result {
                Ok(()) => {
                    self.src.failures = 0;
                    self.on_read(chunk, buf)?;
                }
                Err(e) => {
                    self.free.push(buf);
                    self.failed(Role::Source, Request::new("read", chunk.offset, chunk.length), chunk, e)?;
                }
            }
        }
        while let Some(c) = self.dst.handle.as_mut().and_then(Handle::next_completed) {
            self.dst.last_activity = Instant::now();
            if self.flushing.as_ref().is_some_and(|f| f.cookie == c.cookie) {
                let Some(f) = self.flushing.take() else { continue };
                match c.result {
                    Ok(()) => {
                        self.flush_failures = 0;
                        if self.ctx.multi_conn {
                            self.ctx.flushed_through.fetch_max(f.through, Ordering::SeqCst);
                        }
                        self.flushed(f.chunks);
                    }
                    Err(e) => self.flush_failed(e, f.chunks)?,
                }
                continue;
            }
            let Some(i) = self.writes.iter().position(|w| w.cookie == c.cookie) else {
                return Err(unknown_reply(Role::Target, c.cookie));
            };
            let w = self.writes.swap_remove(i);
            let Some(pi) = self.pending.iter().position(|p| p.chunk.offset == w.chunk) else {
                return Err(CopyError::Internal(format!("a reply to the {} for no chunk in flight", w.req)));
            };
            let p = &mut self.pending[pi];
            p.writes -= 1;
            match c.result {
                Ok(()) => self.dst.failures = 0,
                Err(e) if w.fast_zero && (e.errno == libc::ENOTSUP || e.errno == libc::EOPNOTSUPP) => {
                    self.ctx.fast_zero.store(false, Ordering::Relaxed);
                    p.refused_fast_zero = true;
                }
                Err(e) => {
                    p.error.get_or_insert((w.req, e));
                }
            }
            if p.writes == 0 {
                let p = self.pending.swap_remove(pi);
                self.finish(p)?;
            }
        }
        Ok(())
    }

    /// Counts a failure of `chunk` (in request `req`) and schedules a retry, or
    /// gives up.
    fn failed(&mut self, role: Role, req: Request, mut chunk: Chunk, error: NbdError) -> Result<(), CopyError> {
        chunk.failures += 1;
        let policy = self.ctx.spec.tuning.retry;
        if !error.is_transient() || !policy.allows(chunk.failures) {
            return Err(CopyError::Io {
                role,
                uri: self.ctx.uri(role).into(),
                op: req.op,
                offset: req.offset,
                length: req.length,
                attempts: chunk.failures,
                error,
            });
        }
        self.ctx.reporter.retry(role, req, chunk.failures, &error);
        self.retry.push((Instant::now() + policy.delay(chunk.failures), chunk));
        Ok(())
    }

    /// Replaces dead or hung connections, and tells the progress what this worker
    /// has waited on for a while.
    fn check_health(&mut self) -> Result<(), CopyError> {
        let timeout = self.ctx.spec.tuning.request_timeout;
        for role in [Role::Source, Role::Target] {
            let conn = if role == Role::Source { &self.src } else { &self.dst };
            let Some(h) = &conn.handle else { continue };
            let hung = h.in_flight() > 0 && conn.last_activity.elapsed() >= timeout;
            if h.is_dead() || hung {
                let why = if hung {
                    NbdError { message: format!("no reply for {} s", timeout.as_secs()), errno: libc::ETIMEDOUT }
                } else {
                    lost()
                };
                self.drop_connection(role, why)?;
            }
        }
        self.watch_hang();
        Ok(())
    }

    /// The oldest request in flight on the connection to `role`.
    fn oldest(&self, role: Role) -> Option<Request> {
        match role {
            Role::Source => {
                self.reads.iter().min_by_key(|(k, _)| *k).map(|(_, c)| Request::new("read", c.offset, c.length))
            }
            Role::Target => {
                let write = self.writes.iter().min_by_key(|w| w.cookie).map(|w| (w.cookie, w.req));
                let flush = self.flushing.as_ref().map(|f| (f.cookie, Request::whole("flush")));
                [write, flush].into_iter().flatten().min_by_key(|(k, _)| *k).map(|(_, r)| r)
            }
        }
    }

    fn watch_hang(&mut self) {
        let now = Instant::now();
        let mut worst: Option<(Instant, String)> = None;
        for role in [Role::Source, Role::Target] {
            let conn = if role == Role::Source { &self.src } else { &self.dst };
            if conn.busy() == 0 || now.duration_since(conn.last_activity) < HANG_AFTER {
                continue;
            }
            let Some(req) = self.oldest(role) else { continue };
            if worst.as_ref().is_none_or(|(since, _)| conn.last_activity < *since) {
                worst = Some((conn.last_activity, format!("{req} on {role} {}", self.ctx.uri(role))));
            }
        }
        if worst != self.hang {
            self.ctx.progress.set_hang(self.id, worst.clone());
            self.hang = worst;
        }
    }

    /// Closes a connection and puts back everything that depended on it.
    fn drop_connection(&mut self, role: Role, why: NbdError) -> Result<(), CopyError> {
        let conn = if role == Role::Source { &mut self.src } else { &mut self.dst };
        // Closing first: libnbd lets go of our buffers before we reuse them.
        drop(conn.handle.take());
        conn.reconnect_at = Instant::now();
        conn.last_error = Some(why.clone());
        match role {
            Role::Source => {
                // The read buffers went with the handle.
                self.allocated -= self.reads.len().min(self.allocated);
                for (_, chunk) in std::mem::take(&mut self.reads) {
                    self.failed(Role::Source, Request::new("read", chunk.offset, chunk.length), chunk, why.clone())?;
                }
            }
            Role::Target => {
                self.writes.clear();
                for p in std::mem::take(&mut self.pending) {
                    self.recycle(p.buf);
                    let req = Request::new("write", p.chunk.offset, p.chunk.length);
                    self.failed(Role::Target, req, p.chunk, why.clone())?;
                }
                // Written but never flushed: the server may have lost them.
                let mut lost_writes = std::mem::take(&mut self.unflushed);
                if let Some(f) = self.flushing.take() {
                    lost_writes.extend(f.chunks);
                }
                let now = Instant::now();
                for w in lost_writes {
                    self.rewrite(w, now);
                }
            }
        }
        Ok(())
    }

    /// After a cancellation or another worker's failure: let what is in flight
    /// finish for a moment and flush it, so the watermark is as high as it can be.
    fn wind_down(&mut self) {
        let deadline = Instant::now() + CANCEL_GRACE;
        while Instant::now() < deadline {
            // Reads from a source that stopped answering are not worth waiting for.
            let reads_over = self.reads.is_empty() || self.src.last_activity.elapsed() >= HANG_AFTER;
            if self.pending.is_empty() && reads_over && (self.flush().is_err() || self.flushing.is_none()) {
                return;
            }
            self.wait();
            if self.reap().is_err() {
                return;
            }
            if self.src.live().is_none() && self.dst.live().is_none() {
                return;
            }
        }
    }
}

fn lost() -> NbdError {
    NbdError { message: "connection lost".into(), errno: libc::ENOTCONN }
}

fn unknown_reply(role: Role, cookie: u64) -> CopyError {
    CopyError::Internal(format!("a reply from the {role} to a request not in flight (cookie {cookie})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, length: u64, action: Action) -> plan::Range {
        plan::Range { offset, length, action }
    }

    #[test]
    fn extents_are_taken_from_their_context_clipped_to_the_segment() {
        let reply = |context: &str, offset: u64, entries: &[u32]| nbd::ExtentReply {
            context: context.into(),
            offset,
            entries: entries.to_vec(),
        };
        let replies = [
            reply("qemu:dirty-bitmap:b", 100, &[50, 1]),
            // The server answers for more than was asked: clipped at the end.
            reply("base:allocation", 100, &[20, 0, 30, 3, 100, 0]),
        ];
        let mut found = BTreeMap::new();
        assert_eq!(take_extents(&replies, "base:allocation", 100, 160, &mut found), 160);
        let got: Vec<_> = found.values().map(|e| (e.offset, e.length, e.flags)).collect();
        assert_eq!(got, [(100, 20, 0), (120, 30, 3), (150, 10, 0)]);

        // A short answer says how far it got; nothing at all says so too.
        let mut found = BTreeMap::new();
        assert_eq!(take_extents(&[reply("base:allocation", 0, &[10, 0])], "base:allocation", 0, 64, &mut found), 10);
        assert_eq!(take_extents(&replies, "other", 100, 160, &mut found), 100);
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn dispatcher_splits_on_aligned_boundaries() {
        let mut d = Dispatcher::new(vec![r(100, 250, Action::Copy), r(1000, 300, Action::Zero)], 2000, 100, 1000);
        let got: Vec<(u64, u64)> = std::iter::from_fn(|| d.next()).map(|c| (c.offset, c.length)).collect();
        assert_eq!(got, vec![(100, 100), (200, 100), (300, 50), (1000, 300)]);
    }

    #[test]
    fn watermark_is_the_lowest_chunk_not_yet_durable() {
        let mut d = Dispatcher::new(vec![r(0, 300, Action::Copy), r(500, 100, Action::Copy)], 1000, 100, 100);
        assert_eq!(d.watermark(), 0);
        let a = d.next().unwrap();
        let b = d.next().unwrap();
        assert_eq!(d.watermark(), 0);
        d.durable(b.offset);
        assert_eq!(d.watermark(), 0, "a gap below keeps the watermark down");
        d.durable(a.offset);
        assert_eq!(d.watermark(), 200, "the next chunk not yet handed out");
        let c = d.next().unwrap();
        d.durable(c.offset);
        assert_eq!(d.watermark(), 500, "the gap between ranges needs nothing");
        let e = d.next().unwrap();
        assert!(d.next().is_none());
        assert_eq!(d.watermark(), 500);
        d.durable(e.offset);
        assert_eq!(d.watermark(), 1000, "all done: the end of the disk");
    }

    #[test]
    fn success_needs_every_planned_chunk_durable() {
        let check = |d: &Dispatcher| verdict(None, false, d.watermark(), d.unfinished());
        let mut d = Dispatcher::new(vec![r(0, 300, Action::Copy)], 300, 100, 100);
        assert!(check(&d).is_err(), "nothing was handed out yet");
        let (a, b, c) = (d.next().unwrap(), d.next().unwrap(), d.next().unwrap());
        d.durable(a.offset);
        d.durable(c.offset);
        let got = check(&d);
        assert!(
            matches!(&got, Err(CopyError::Internal(m)) if m.contains("offset 100 not yet written and flushed")),
            "a chunk that was skipped is a bug, never a success: {got:?}"
        );
        d.durable(b.offset);
        assert_eq!(check(&d).ok(), Some(300));
        assert!(verdict(None, true, 100, Some(100)).is_err_and(|e| e.is_cancelled()));
        let failed = verdict(Some(CopyError::Internal("x".into())), false, 300, None);
        assert!(matches!(failed, Err(CopyError::Internal(m)) if m == "x"));
    }

    #[test]
    fn requests_are_named_for_what_they_are() {
        assert_eq!(Request::new("zero request", 4096, 512).to_string(), "zero request of 512 bytes at offset 4096");
        assert_eq!(Request::whole("flush").to_string(), "flush");
        let e = Event::Retry { role: Role::Target, what: "flush".into(), attempt: 2, error: "EIO".into() };
        assert_eq!(e.describe().as_deref(), Some("retrying the target: flush failed (attempt 2): EIO"));
        assert!(e.is_warning());
        assert_eq!(Event::Checkpoint { watermark: 1 }.describe(), None);
    }

    #[test]
    fn uris_are_checked_before_connecting() {
        for ok in [
            "nbd://host/export",
            "nbd://h:10809",
            "nbds://h/e?tls-psk-file=/k",
            "nbd+unix:///e?socket=/s",
            "nbds+unix:///?socket=/s",
        ] {
            assert!(validate_uri(Role::Source, ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/dev/sda",
            "http://h/",
            "nbd:///export",
            "nbd+unix:///export",
            "nbd+unix:///?socket=",
            "nbd+vsock://1",
        ] {
            let e = validate_uri(Role::Target, bad).unwrap_err().to_string();
            assert!(e.starts_with("bad target URI"), "{bad}: {e}");
        }
    }

    #[test]
    fn request_size_respects_server_limits() {
        let s = |max_block, min_block| Servers {
            preferred: 0,
            source_size: 0,
            base_allocation: true,
            multi_conn: false,
            can_zero: true,
            can_fast_zero: false,
            can_flush: true,
            max_block,
            min_block,
        };
        assert_eq!(s(0, 1).request_size(1 << 20), 1 << 20);
        assert_eq!(s(0, 1).request_size(1 << 30), MAX_REQUEST);
        assert_eq!(s(65536, 512).request_size(1 << 20), 65536);
        assert_eq!(s(0, 1).request_size(5000), 4096);
        assert_eq!(s(0, 1).request_size(1), 4096);
    }
}
