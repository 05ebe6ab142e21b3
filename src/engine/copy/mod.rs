//! The copy executor: connects to both servers, plans, and moves the planned bytes
//! with many requests in flight over one or more connection pairs.
//!
//! Shape: the calling thread plans, then starts one worker thread per connection
//! pair and watches them. A full copy from a source that takes several
//! connections (it advertises multi-conn) plans *while* it copies instead: a
//! planning thread asks the source for its allocation on a connection of its
//! own and pushes the ranges into the dispatcher in offset order as soon as
//! they are known, and the workers start on the first ones (a worker that finds
//! the queue empty before the plan is complete waits for more). The watermark
//! never passes what is planned, so checkpoints and resumes keep their meaning;
//! a resumed run plans from the start of the disk again and copies from the
//! resume point. The stage stays `Planning` until the plan is complete, and the
//! percentage is kept from going down as `progress.rs` explains. Incremental
//! copies know their changes up front (or from a dirty bitmap, planned first):
//! they plan first, as does a source that allows one connection only. Each worker runs an event loop over its source and target
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
//! (data and zero requests, in `worker.rs`) and `Worker::flush` (in
//! `worker/flush.rs`).
//!
//! Nothing here knows about actors, databases or sockets: progress is read through
//! [`Progress`], rare events go to a callback, and cancellation is a flag.
//!
//! The files of this folder:
//! - `mod.rs`: [`Copier`] (`prepare`: connect, check, plan; `run`: copy, then
//!   verify) and what it returns ([`PlanInfo`], [`Summary`])
//! - `servers.rs`: URI checks, connecting to both servers, what they can do
//! - `extents.rs`: the block-status queries that planning asks the source
//! - `planning.rs`: the planning thread of a copy that plans while it copies
//! - `report.rs`: [`Event`]s, how requests are named, retries folded into a
//!   few reports
//! - `dispatcher.rs`: chunks handed out in plan order, the durable watermark
//! - `execute.rs`: what the workers share, the thread that watches them
//!   (checkpoints, flush rounds, stalls) and the verdict
//! - `worker.rs`: one worker's event loop over a connection pair; `worker/conn.rs`
//!   keeps its connections alive, `worker/flush.rs` decides when a chunk is durable

mod dispatcher;
mod execute;
mod extents;
mod planning;
mod report;
mod servers;
mod worker;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::time::{Duration, Instant};

use super::error::CopyError;
use super::fence::Fence;
use super::nbd::Handle;
use super::plan::{self, Action, Plan};
use super::progress::{Progress, Stage};
use super::retry::RetryLog;
use super::spec::{CancelToken, Changes, CopySpec};
use super::verify;
use dispatcher::Dispatcher;
use execute::{Ctx, execute};
use extents::Unmapped;
use report::{Reporter, RetryKey};
use servers::Servers;

pub use report::Event;
pub use servers::validate_uri;

/// Zero requests carry no payload, so they may be larger.
const MAX_ZERO_REQUEST: u64 = 1 << 30;

/// How often a worker looks at cancellation and timers while waiting.
const TICK: Duration = Duration::from_millis(100);

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
    /// Seconds from the first block-status query to the complete plan (0 when
    /// nothing was asked of the source); overlaps copying when the copy plans
    /// while it copies.
    pub planning_seconds: f64,
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
    /// Bytes of the disk not planned yet: the whole disk when the copy plans
    /// while it copies (the figures above are then zero and come through
    /// [`Progress`]), 0 when the plan is complete.
    pub unplanned_bytes: u64,
}

/// A plan and, until parked or used, the connections it was made on.
struct Prepared {
    /// The plan, or `None` when `run` plans while it copies.
    plan: Option<Plan>,
    /// Where this run starts: the resume offset, in whole blocks.
    resume: u64,
    unmapped_bytes: u64,
    conns: Option<(Handle, Handle, Servers)>,
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
    /// When planning started, and how long it took once complete.
    plan_clock: Mutex<(Option<Instant>, f64)>,
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
            plan_clock: Mutex::new((None, 0.0)),
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
        self.plan_clock.lock().unwrap_or_else(|e| e.into_inner()).0 = Some(Instant::now());
        if spec.resume_from > servers.source_size {
            return Err(CopyError::Internal(format!(
                "resume offset {} is beyond the end of the disk ({} bytes)",
                spec.resume_from, servers.source_size
            )));
        }
        // A watermark is a chunk's start, so whole blocks, unless an earlier run
        // had other servers: then the block it falls in is copied again.
        let resume = spec.resume_from / servers.min_block * servers.min_block;
        if self.plans_while_copying(&servers) {
            let info = PlanInfo {
                disk_size: servers.source_size,
                planned_bytes: 0,
                blocks: 0,
                zero_bytes: 0,
                skipped_bytes: 0,
                done_bytes: 0,
                unmapped_bytes: 0,
                unplanned_bytes: servers.source_size,
            };
            self.progress.start_plan(info.disk_size);
            self.progress.set_watermark(resume);
            *self.lock_prepared() =
                Some(Prepared { plan: None, resume, unmapped_bytes: 0, conns: Some((src, dst, servers)) });
            return Ok(info);
        }
        let (plan, unmapped) = self.plan(&mut src, &servers, events)?;
        self.planned_now();
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
            unplanned_bytes: 0,
        };
        self.progress.set_plan(info.disk_size, info.planned_bytes, info.done_bytes, info.skipped_bytes);
        self.progress.set_watermark(resume);
        events(Event::Planned { disk_size: info.disk_size, planned_bytes: info.planned_bytes, blocks: info.blocks });
        *self.lock_prepared() =
            Some(Prepared { plan: Some(plan), resume, unmapped_bytes, conns: Some((src, dst, servers)) });
        Ok(info)
    }

    /// The plan is complete: stops the planning clock.
    fn planned_now(&self) {
        let mut clock = self.plan_clock.lock().unwrap_or_else(|e| e.into_inner());
        clock.1 = clock.0.map_or(0.0, |t| t.elapsed().as_secs_f64());
    }

    /// Whether this copy plans while it copies: a full copy whose source describes
    /// its allocation and takes another connection for the planning (multi-conn;
    /// a server such as `qemu-nbd -e 1` would make it wait forever).
    fn plans_while_copying(&self, servers: &Servers) -> bool {
        matches!(self.spec.changes, Changes::Full) && servers.base_allocation && servers.source_multi_conn
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
        let t = &spec.tuning;
        let connections = if servers.multi_conn { t.connections.max(1) } else { 1 };
        let request_size = servers.request_size(t.request_size);
        let per_conn_bufs = (t.buffer_bytes / request_size / connections).max(1);
        let slots = t.requests.max(1).min(per_conn_bufs);
        let zero_max = if servers.can_zero { MAX_ZERO_REQUEST } else { request_size as u64 };
        let (copy_max, disk_size) = (request_size as u64, servers.source_size);
        let dispatcher = match &plan {
            Some(plan) => {
                let ranges = plan.remaining_from(resume).into_iter().filter(|r| r.action != Action::Skip).collect();
                self.set_stage(Stage::Copying, events);
                Dispatcher::new(ranges, plan.disk_size, copy_max, zero_max)
            }
            None => {
                // New connections (a parked copy) went through `Connecting`.
                self.set_stage(Stage::Planning, events);
                Dispatcher::streaming(resume, disk_size, copy_max, zero_max)
            }
        };
        let ctx = Ctx {
            spec,
            progress: &self.progress,
            cancel: &self.cancel,
            fence: &self.fence,
            events,
            reporter: self.reporter(events),
            dispatcher: Mutex::new(dispatcher),
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
        let (plan, unmapped_bytes, watermark) = match plan {
            Some(plan) => (plan, unmapped_bytes, execute(&ctx, connections, Some(src), dst)),
            // The planning thread keeps the first source connection; the workers
            // open their own.
            None => std::thread::scope(|s| {
                let planner = std::thread::Builder::new()
                    .name("plan".into())
                    .spawn_scoped(s, || self.plan_while_copying(&ctx, src, &servers, resume));
                let planner = match planner {
                    Ok(p) => p,
                    Err(e) => return Err(CopyError::Internal(format!("cannot start the planning thread: {e}"))),
                };
                let watermark = execute(&ctx, connections, None, dst);
                match (planner.join(), watermark) {
                    (Ok(Some((plan, unmapped))), w) => Ok((plan, unmapped, w)),
                    // Planning stopped because the copy failed or was cancelled
                    // (or failed it): the copy's error says why.
                    (Ok(None), Err(e)) => Err(e),
                    (Ok(None), Ok(_)) => Err(CopyError::Internal("the copy ended before its plan did".into())),
                    (Err(_), _) => Err(CopyError::Internal("the planning thread panicked".into())),
                }
            })?,
        };
        let watermark = watermark?;
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
                    limit: spec.limit.as_deref(),
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
            planned_bytes: plan.planned_bytes(),
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
            planning_seconds: self.plan_clock.lock().unwrap_or_else(|e| e.into_inner()).1,
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
}
