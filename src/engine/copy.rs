//! The copy executor: connects to both servers, plans, and moves the planned bytes
//! with many requests in flight over one or more connection pairs.
//!
//! Shape: the calling thread plans, then starts one worker thread per connection
//! pair and watches them. Each worker runs an event loop over its source and target
//! handles: it takes chunks from a shared [`Dispatcher`], reads them, splits the data
//! into data and zero runs, writes those, and flushes its target connection now and
//! then. A chunk counts as *durable* only once a flush issued after its writes has
//! completed; the dispatcher keeps every chunk that is not yet durable, so the
//! lowest of them is the durable watermark. Losing a connection puts the chunks that
//! depended on it back into the queue, including written but unflushed ones.
//!
//! Nothing here knows about actors, databases or sockets: progress is read through
//! [`Progress`], rare events go to a callback, and cancellation is a flag.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::{CopyError, Role};
use super::fence::Fence;
use super::nbd::{self, BlockSize, ConnectOptions, Handle, NbdError, Returned};
use super::plan::{self, Action, Area, Extent, Plan};
use super::progress::{Progress, Stage, Tally};
use super::retry::RetryPolicy;
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
/// How often a worker looks at cancellation and timers while waiting.
const TICK: Duration = Duration::from_millis(100);
/// After a cancellation, in-flight work may finish and be flushed for this long.
const CANCEL_GRACE: Duration = Duration::from_millis(800);

/// How hard to push the servers.
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
    /// How often each connection flushes so that the durable watermark moves.
    pub checkpoint_interval: Duration,
    /// Give up on a connection attempt after this long.
    pub connect_timeout: Duration,
    /// A connection with requests in flight and no reply for this long is replaced.
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
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
            retry: RetryPolicy::default(),
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
    Retry {
        role: Role,
        offset: u64,
        attempt: u32,
        error: String,
    },
    Reconnected {
        role: Role,
    },
    /// Everything planned below `watermark` is written and flushed.
    Checkpoint {
        watermark: u64,
    },
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
}

/// A plan and, until parked or used, the connections it was made on.
struct Prepared {
    plan: Plan,
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

/// Runs one [`CopySpec`]; `progress()` and `cancel_token()` may be taken before
/// `run` and used from other threads while it runs.
pub struct Copier {
    spec: CopySpec,
    progress: Progress,
    cancel: CancelToken,
    prepared: Mutex<Option<Prepared>>,
    fence: Fence,
}

impl Copier {
    pub fn new(spec: CopySpec) -> Self {
        Self {
            spec,
            progress: Progress::new(),
            cancel: CancelToken::default(),
            prepared: Mutex::new(None),
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

    /// Connects to both servers, checks them and plans the copy (the "Discover"
    /// stage). The plan and the connections are kept for [`Copier::run`].
    pub fn prepare(&self, events: &(dyn Fn(Event) + Sync)) -> Result<PlanInfo, CopyError> {
        let spec = &self.spec;
        let (mut src, dst, servers) = self.connect_pair(events)?;
        self.set_stage(Stage::Planning, events);
        let plan = self.plan(&mut src, &servers)?;
        if spec.resume_from > plan.disk_size {
            return Err(CopyError::Internal(format!(
                "resume offset {} is beyond the end of the disk ({} bytes)",
                spec.resume_from, plan.disk_size
            )));
        }
        let info = PlanInfo {
            disk_size: plan.disk_size,
            planned_bytes: plan.planned_bytes(),
            blocks: plan.blocks,
            zero_bytes: plan.bytes(Action::Zero),
            skipped_bytes: plan.bytes(Action::Skip),
            done_bytes: plan.planned_below(spec.resume_from),
        };
        self.progress.set_plan(info.disk_size, info.planned_bytes, info.done_bytes, info.skipped_bytes);
        self.progress.set_watermark(spec.resume_from);
        events(Event::Planned { disk_size: info.disk_size, planned_bytes: info.planned_bytes, blocks: info.blocks });
        *self.lock_prepared() = Some(Prepared { plan, conns: Some((src, dst, servers)) });
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
                self.progress.add_retry();
                events(Event::Retry { role, offset: 0, attempt: failures, error: format!("connect: {error}") });
                let until = Instant::now() + policy.delay(failures);
                while Instant::now() < until && !stop() {
                    std::thread::sleep(TICK);
                }
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
        let started = Instant::now();
        let spec = &self.spec;
        if self.lock_prepared().is_none() {
            self.prepare(events)?;
        }
        let Some(Prepared { plan, conns }) = self.lock_prepared().take() else {
            return Err(CopyError::Internal("copy run twice".into()));
        };
        let (src, dst, servers) = match conns {
            Some(c) => c,
            None => self.connect_pair(events)?,
        };
        let ranges: Vec<plan::Range> =
            plan.remaining_from(spec.resume_from).into_iter().filter(|r| r.action != Action::Skip).collect();
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
            dispatcher: Mutex::new(Dispatcher::new(ranges, plan.disk_size, request_size as u64, zero_max)),
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
            fast_zero: AtomicBool::new(servers.can_fast_zero),
            can_zero: servers.can_zero,
            can_flush: servers.can_flush,
            request_size,
            slots,
        };
        execute(&ctx, connections, src, dst)?;
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
        let this_run = s.bytes_done - plan.planned_below(spec.resume_from);
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
        })
    }

    fn cancelled_or(&self, e: CopyError) -> CopyError {
        if self.cancel.is_cancelled() { CopyError::Cancelled { watermark: self.spec.resume_from } } else { e }
    }

    /// Asks the source which ranges to read and builds the plan.
    fn plan(&self, src: &mut Handle, servers: &Servers) -> Result<Plan, CopyError> {
        let spec = &self.spec;
        let size = servers.source_size;
        match &spec.changes {
            Changes::Full => {
                if !servers.base_allocation {
                    // The server cannot tell holes from data: everything is data.
                    return Ok(plan::full(size, &[], spec.destination_is_zero));
                }
                let extents = self.extents(src, "base:allocation", size)?;
                Ok(plan::full(size, &extents, spec.destination_is_zero))
            }
            Changes::DirtyBitmap(name) => {
                let ctx = format!("qemu:dirty-bitmap:{name}");
                let extents = self.extents(src, &ctx, size)?;
                Ok(plan::incremental(size, &plan::dirty_areas(&extents, size)))
            }
            Changes::ChangedAreas(areas) => Ok(plan::incremental(size, &plan::normalize_areas(areas, size)?)),
        }
    }

    /// All extents of meta context `ctx` over the disk, retrying transient errors.
    /// Several queries are in flight at once: servers answer them in parallel
    /// (nbdkit runs a connection's requests on several threads), and planning is
    /// time in which nothing is copied.
    fn extents(&self, src: &mut Handle, ctx: &str, size: u64) -> Result<Vec<Extent>, CopyError> {
        let spec = &self.spec;
        let policy = spec.tuning.retry;
        let io = |offset: u64, length: u64, attempts: u32, error: NbdError| CopyError::Io {
            role: Role::Source,
            uri: spec.source.clone(),
            op: "block status",
            offset,
            length,
            attempts,
            error,
        };
        // Segments still to ask about; an answer may cover only a prefix of its
        // segment, and the rest is asked again.
        let mut todo: VecDeque<(u64, u64)> =
            (0..size).step_by(EXTENTS_STEP as usize).map(|p| (p, (p + EXTENTS_STEP).min(size))).collect();
        let mut asked: HashMap<u64, (u64, u64)> = HashMap::new();
        let mut found: BTreeMap<u64, Extent> = BTreeMap::new();
        let mut failures = 0;
        let mut last_reply = Instant::now();
        while !(todo.is_empty() && asked.is_empty()) {
            if self.cancel.is_cancelled() {
                return Err(CopyError::Cancelled { watermark: spec.resume_from });
            }
            while asked.len() < EXTENTS_IN_FLIGHT {
                let Some((start, end)) = todo.pop_front() else { break };
                match src.aio_block_status(end - start, start) {
                    Ok(cookie) => {
                        asked.insert(cookie, (start, end));
                    }
                    Err(error) => return Err(io(start, end - start, failures + 1, error)),
                }
            }
            nbd::poll(&mut [&mut *src], TICK).map_err(|e| io(0, size, failures + 1, e))?;
            while let Some(c) = src.next_completed() {
                let Some((start, end)) = asked.remove(&c.cookie) else { continue };
                last_reply = Instant::now();
                match (c.result, c.buffer) {
                    (Ok(()), Returned::Extents(replies)) => {
                        let advanced = take_extents(&replies, ctx, start, end, &mut found);
                        if advanced <= start {
                            return Err(CopyError::Query {
                                role: Role::Source,
                                uri: spec.source.clone(),
                                what: "extents",
                                error: NbdError {
                                    message: format!("server returned no extents at offset {start}"),
                                    errno: 0,
                                },
                            });
                        }
                        if advanced < end {
                            todo.push_front((advanced, end));
                        }
                    }
                    (Err(error), _) if error.is_transient() && policy.allows(failures + 1) && !src.is_dead() => {
                        failures += 1;
                        self.progress.add_retry();
                        std::thread::sleep(policy.delay(failures));
                        todo.push_front((start, end));
                    }
                    (Err(error), _) => return Err(io(start, end - start, failures + 1, error)),
                    (Ok(()), _) => return Err(CopyError::Internal("block status without extents".into())),
                }
            }
            if !asked.is_empty() && last_reply.elapsed() > spec.tuning.request_timeout {
                let error = NbdError { message: "no reply to a block-status query".into(), errno: libc::ETIMEDOUT };
                return Err(io(0, size, failures + 1, error));
            }
        }
        Ok(found.into_values().collect())
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
    /// Alignment both servers want (at least 1).
    min_block: u64,
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
        Ok(Self {
            source_size,
            base_allocation,
            multi_conn: src.can_multi_conn().map_err(q(Role::Source, "flags"))?
                && dst.can_multi_conn().map_err(q(Role::Target, "flags"))?,
            can_zero: dst.can_zero().map_err(q(Role::Target, "flags"))?,
            can_fast_zero: dst.can_fast_zero().map_err(q(Role::Target, "flags"))?,
            can_flush: dst.can_flush().map_err(q(Role::Target, "flags"))?,
            max_block,
            min_block,
        })
    }

    /// The request size to use: the wish, within the servers' limits, a multiple of
    /// their alignment and of the zero-detection block where possible.
    fn request_size(&self, wanted: usize) -> usize {
        let mut size = wanted.clamp(zero::BLOCK, MAX_REQUEST) as u64;
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
    dispatcher: Mutex<Dispatcher>,
    /// Set when any worker failed: the others wind down.
    stop: AtomicBool,
    failure: Mutex<Option<CopyError>>,
    /// Cleared for everyone once the target refuses a fast zero.
    fast_zero: AtomicBool,
    can_zero: bool,
    can_flush: bool,
    request_size: usize,
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
}

/// Runs the workers and watches the durable watermark until all are done.
fn execute(ctx: &Ctx<'_>, connections: usize, src: Handle, dst: Handle) -> Result<(), CopyError> {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut first = Some((src, dst));
    let results: Vec<std::thread::Result<()>> = std::thread::scope(|s| {
        let mut joins = Vec::with_capacity(connections);
        for i in 0..connections {
            let handles = first.take();
            let done = done_tx.clone();
            let builder = std::thread::Builder::new().name(format!("copy-{i}"));
            let spawned = builder.spawn_scoped(s, move || {
                if let Err(e) = Worker::new(ctx, handles).run() {
                    ctx.fail(e);
                }
                // The receiver outlives every worker; a send error cannot happen.
                let _ = done.send(());
            });
            match spawned {
                Ok(j) => joins.push(j),
                Err(e) => ctx.fail(CopyError::Internal(format!("cannot start a copy thread: {e}"))),
            }
        }
        drop(done_tx);
        let mut last = ctx.progress.snapshot().durable_watermark;
        let mut running = joins.len();
        while running > 0 {
            match done_rx.recv_timeout(TICK) {
                Ok(()) => running -= 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let w = ctx.dispatcher().watermark();
            if w > last {
                ctx.progress.set_watermark(w);
                (ctx.events)(Event::Checkpoint { watermark: w });
                last = w;
            }
        }
        joins.into_iter().map(|j| j.join()).collect()
    });
    if results.iter().any(|r| r.is_err()) {
        ctx.fail(CopyError::Internal("a copy thread panicked".into()));
    }
    let failure = ctx.failure.lock().unwrap_or_else(|e| e.into_inner()).take();
    let watermark = ctx.dispatcher().watermark();
    ctx.progress.set_watermark(watermark);
    match failure {
        Some(e) => Err(e),
        None if ctx.cancel.is_cancelled() => Err(CopyError::Cancelled { watermark }),
        None => Ok(()),
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
    error: Option<NbdError>,
    /// The target refused a fast zero: redo without it, at no cost to the budget.
    refused_fast_zero: bool,
    tally: Tally,
}

/// Chunks written but not yet flushed, and what they added to the progress.
type Written = Vec<(Chunk, Tally)>;

struct Worker<'a> {
    ctx: &'a Ctx<'a>,
    src: Conn,
    dst: Conn,
    /// Reads in flight: cookie → chunk.
    reads: Vec<(u64, Chunk)>,
    /// Writes in flight: cookie → (chunk offset, was a fast zero).
    writes: Vec<(u64, u64, bool)>,
    pending: Vec<Pending>,
    unflushed: Written,
    flushing: Option<(u64, Written)>,
    flush_failures: u32,
    last_flush: Instant,
    retry: Vec<(Instant, Chunk)>,
    free: Vec<Vec<u8>>,
    allocated: usize,
    zero_buf: Option<Arc<Vec<u8>>>,
    runs: Vec<zero::Run>,
    exhausted: bool,
}

impl<'a> Worker<'a> {
    /// A worker on the given connections, or on new ones made by its first loop.
    fn new(ctx: &'a Ctx<'a>, handles: Option<(Handle, Handle)>) -> Self {
        let (s, d) = match handles {
            Some((s, d)) => (Some(s), Some(d)),
            None => (None, None),
        };
        Self {
            ctx,
            src: Conn::new(s),
            dst: Conn::new(d),
            reads: Vec::new(),
            writes: Vec::new(),
            pending: Vec::new(),
            unflushed: Vec::new(),
            flushing: None,
            flush_failures: 0,
            last_flush: Instant::now(),
            retry: Vec::new(),
            free: Vec::new(),
            allocated: 0,
            zero_buf: None,
            runs: Vec::new(),
            exhausted: false,
        }
    }

    fn in_use(&self) -> usize {
        self.reads.len() + self.pending.len()
    }

    fn idle(&self) -> bool {
        self.reads.is_empty() && self.pending.is_empty()
    }

    fn run(mut self) -> Result<(), CopyError> {
        loop {
            if self.ctx.cancel.is_cancelled() || self.ctx.stop.load(Ordering::SeqCst) {
                self.wind_down();
                return Ok(());
            }
            self.connect_due()?;
            self.issue()?;
            let finished = self.exhausted && self.idle() && self.retry.is_empty();
            if finished && self.unflushed.is_empty() && self.flushing.is_none() {
                return Ok(());
            }
            let flush_due = self.last_flush.elapsed() >= self.ctx.spec.tuning.checkpoint_interval;
            if finished || flush_due {
                self.flush()?;
            }
            self.wait();
            self.reap()?;
            self.check_health()?;
        }
    }

    /// (Re)connects a missing connection when its backoff has passed.
    fn connect_due(&mut self) -> Result<(), CopyError> {
        for role in [Role::Source, Role::Target] {
            let conn = if role == Role::Source { &mut self.src } else { &mut self.dst };
            if conn.handle.is_some() || Instant::now() < conn.reconnect_at {
                continue;
            }
            let opts = ConnectOptions { name: role_name(role), meta_contexts: &[] };
            let uri = self.ctx.uri(role);
            let stop = || self.ctx.cancel.is_cancelled() || self.ctx.stop.load(Ordering::SeqCst);
            match Handle::connect(uri, &opts, self.ctx.spec.tuning.connect_timeout, &stop) {
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
                    self.ctx.progress.add_retry();
                    (self.ctx.events)(Event::Retry {
                        role,
                        offset: 0,
                        attempt: conn.failures,
                        error: format!("connect: {error}"),
                    });
                    conn.reconnect_at = Instant::now() + policy.delay(conn.failures);
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
                            self.failed(Role::Source, "read", chunk, e)?;
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
        let mut p = Pending {
            chunk,
            writes: 0,
            buf: None,
            error: None,
            refused_fast_zero: false,
            tally: Tally { zeroed: chunk.length, ..Tally::default() },
        };
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
        self.write_with(p, false, |h| h.aio_pwrite(buf, range, offset));
    }

    fn write_zeros(&mut self, p: &mut Pending, offset: u64, length: u64, fast: bool) {
        self.write_with(p, fast, |h| h.aio_zero(length, offset, fast));
    }

    /// Issues one write of `p` on the target connection, if it is up and the
    /// write fence is open.
    fn write_with(&mut self, p: &mut Pending, fast: bool, op: impl FnOnce(&mut Handle) -> Result<u64, NbdError>) {
        if self.fenced() {
            let e = NbdError { message: "write fence expired".into(), errno: libc::ECANCELED };
            self.track_write(p, Err(e), fast);
            return;
        }
        if self.dst.busy() == 0 {
            self.dst.last_activity = Instant::now();
        }
        let res = match self.dst.live() {
            Some(h) => op(h),
            None => Err(lost()),
        };
        self.track_write(p, res, fast);
    }

    fn track_write(&mut self, p: &mut Pending, res: Result<u64, NbdError>, fast: bool) {
        match res {
            Ok(cookie) => {
                self.writes.push((cookie, p.chunk.offset, fast));
                p.writes += 1;
            }
            Err(e) => {
                p.error.get_or_insert(e);
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
        if let Some(e) = p.error {
            return self.failed(Role::Target, "write", p.chunk, e);
        }
        if p.refused_fast_zero {
            self.retry.push((Instant::now(), p.chunk));
            return Ok(());
        }
        self.ctx.progress.add(p.tally);
        let wrote_something = p.tally.written + p.tally.zeroed > 0;
        if self.ctx.can_flush && wrote_something {
            self.unflushed.push((p.chunk, p.tally));
        } else {
            // Nothing to flush, or a server without flush: durable as it stands.
            self.ctx.dispatcher().durable(p.chunk.offset);
        }
        Ok(())
    }

    /// A read of `chunk` arrived: write its data runs and zero its zero runs.
    fn on_read(&mut self, chunk: Chunk, buf: Vec<u8>) -> Result<(), CopyError> {
        let len = chunk.length as usize;
        let mut runs = std::mem::take(&mut self.runs);
        runs.clear();
        zero::runs(&buf[..len], |r| runs.push(r));
        let buf = Arc::new(buf);
        let mut p = Pending {
            chunk,
            writes: 0,
            buf: None,
            error: None,
            refused_fast_zero: false,
            tally: Tally { done: chunk.length, ..Tally::default() },
        };
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
    fn flush(&mut self) -> Result<(), CopyError> {
        if self.flushing.is_some() || self.unflushed.is_empty() {
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
                self.flushing = Some((cookie, std::mem::take(&mut self.unflushed)));
                self.last_flush = Instant::now();
                Ok(())
            }
            Err(e) => self.flush_failed(e, Vec::new()),
        }
    }

    fn flush_failed(&mut self, error: NbdError, chunks: Written) -> Result<(), CopyError> {
        self.unflushed.extend(chunks);
        self.flush_failures += 1;
        let policy = self.ctx.spec.tuning.retry;
        if error.is_transient() && policy.allows(self.flush_failures) {
            self.ctx.progress.add_retry();
            Ok(())
        } else {
            let offset = self.unflushed.first().map_or(0, |(c, _)| c.offset);
            Err(CopyError::Io {
                role: Role::Target,
                uri: self.ctx.spec.target.clone(),
                op: "flush",
                offset,
                length: 0,
                attempts: self.flush_failures,
                error,
            })
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

    /// Handles every finished command on both connections.
    fn reap(&mut self) -> Result<(), CopyError> {
        while let Some(c) = self.src.handle.as_mut().and_then(Handle::next_completed) {
            self.src.last_activity = Instant::now();
            let Some(i) = self.reads.iter().position(|(k, _)| *k == c.cookie) else { continue };
            let (_, chunk) = self.reads.swap_remove(i);
            let Returned::Read(buf) = c.buffer else { continue };
            match c.result {
                Ok(()) => {
                    self.src.failures = 0;
                    self.on_read(chunk, buf)?;
                }
                Err(e) => {
                    self.free.push(buf);
                    self.failed(Role::Source, "read", chunk, e)?;
                }
            }
        }
        while let Some(c) = self.dst.handle.as_mut().and_then(Handle::next_completed) {
            self.dst.last_activity = Instant::now();
            if self.flushing.as_ref().is_some_and(|(k, _)| *k == c.cookie) {
                let Some((_, chunks)) = self.flushing.take() else { continue };
                match c.result {
                    Ok(()) => {
                        self.flush_failures = 0;
                        let mut d = self.ctx.dispatcher();
                        for (chunk, _) in &chunks {
                            d.durable(chunk.offset);
                        }
                    }
                    Err(e) => self.flush_failed(e, chunks)?,
                }
                continue;
            }
            let Some(i) = self.writes.iter().position(|(k, _, _)| *k == c.cookie) else { continue };
            let (_, offset, fast) = self.writes.swap_remove(i);
            let Some(pi) = self.pending.iter().position(|p| p.chunk.offset == offset) else { continue };
            let p = &mut self.pending[pi];
            p.writes -= 1;
            match c.result {
                Ok(()) => self.dst.failures = 0,
                Err(e) if fast && (e.errno == libc::ENOTSUP || e.errno == libc::EOPNOTSUPP) => {
                    self.ctx.fast_zero.store(false, Ordering::Relaxed);
                    p.refused_fast_zero = true;
                }
                Err(e) => {
                    p.error.get_or_insert(e);
                }
            }
            if p.writes == 0 {
                let p = self.pending.swap_remove(pi);
                self.finish(p)?;
            }
        }
        Ok(())
    }

    /// Counts a failure of `chunk` and schedules a retry, or gives up.
    fn failed(&mut self, role: Role, op: &'static str, mut chunk: Chunk, error: NbdError) -> Result<(), CopyError> {
        chunk.failures += 1;
        let policy = self.ctx.spec.tuning.retry;
        if !error.is_transient() || !policy.allows(chunk.failures) {
            return Err(CopyError::Io {
                role,
                uri: self.ctx.uri(role).into(),
                op,
                offset: chunk.offset,
                length: chunk.length,
                attempts: chunk.failures,
                error,
            });
        }
        self.ctx.progress.add_retry();
        (self.ctx.events)(Event::Retry {
            role,
            offset: chunk.offset,
            attempt: chunk.failures,
            error: format!("{op}: {error}"),
        });
        self.retry.push((Instant::now() + policy.delay(chunk.failures), chunk));
        Ok(())
    }

    /// Replaces dead or hung connections.
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
        Ok(())
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
                    self.failed(Role::Source, "read", chunk, why.clone())?;
                }
            }
            Role::Target => {
                self.writes.clear();
                for p in std::mem::take(&mut self.pending) {
                    self.recycle(p.buf);
                    self.failed(Role::Target, "write", p.chunk, why.clone())?;
                }
                // Written but never flushed: the server may have lost them.
                let mut lost_writes = std::mem::take(&mut self.unflushed);
                if let Some((_, w)) = self.flushing.take() {
                    lost_writes.extend(w);
                }
                let now = Instant::now();
                for (chunk, tally) in lost_writes {
                    self.ctx.progress.take_back(tally);
                    self.retry.push((now, chunk));
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
            if self.idle() && (self.flush().is_err() || self.flushing.is_none()) {
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
