//! One worker: a thread with an event loop over a source and a target
//! connection. It takes chunks from the dispatcher, reads them, splits the data
//! into data and zero runs, writes those, and retries what failed. Every data
//! and zero request to the target is issued in `Worker::write_with`; flushes
//! are in `flush.rs`, the connections' upkeep in `conn.rs`.

mod conn;
mod flush;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::TICK;
use super::dispatcher::Chunk;
use super::execute::Ctx;
use super::report::Request;
use crate::engine::error::{CopyError, Role};
use crate::engine::nbd::{self, Handle, NbdError, Returned};
use crate::engine::plan::Action;
use crate::engine::progress::Tally;
use crate::engine::zero;
use conn::{Conn, lost};
use flush::{Flushing, Written};

/// After a cancellation, in-flight work may finish and be flushed for this long.
const CANCEL_GRACE: Duration = Duration::from_millis(800);
/// A connection with requests in flight and no reply for this long is reported
/// (in [`Progress`](crate::engine::Progress)) as waited on.
const HANG_AFTER: Duration = Duration::from_secs(2);

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

/// How long a worker waits before it looks again at what no socket of its own
/// signals: new chunks, when the queue was empty while the plan still grows, or
/// the other workers' progress, when it is done with its own chunks and stays
/// to flush for them (waiting a whole tick there would hold the end of every
/// copy back by up to a tick).
const LOOK_AGAIN: std::time::Duration = std::time::Duration::from_millis(5);

pub(super) struct Worker<'a> {
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
    /// No flush is issued before this: the backoff after a failed one.
    flush_due: Instant,
    /// The flush round, flush epoch and `flushed_through` last acted on.
    round: u64,
    epoch: u64,
    through: u64,
    retry: Vec<(Instant, Chunk)>,
    free: Vec<Vec<u8>>,
    allocated: usize,
    zero_buf: Option<Arc<Vec<u8>>>,
    runs: Vec<zero::Run>,
    /// No chunk left to take: the plan is complete and handed out.
    exhausted: bool,
    /// The queue was empty but the plan is still growing: more will come.
    starved: bool,
    /// Counted as finished in `Ctx::unfinished`.
    finished: bool,
    /// What this worker last reported as waited on.
    hang: Option<(Instant, String)>,
    /// Refused by the bandwidth limit: issue nothing before this.
    held_until: Option<Instant>,
    /// Since when the limit holds this worker back (for `Snapshot::limited`).
    held_since: Option<Instant>,
}

impl<'a> Worker<'a> {
    /// A worker on the given connections, or on new ones made by its first loop.
    pub(super) fn new(ctx: &'a Ctx<'a>, id: usize, s: Option<Handle>, d: Option<Handle>) -> Self {
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
            flush_due: Instant::now(),
            round: ctx.flush_round.load(Ordering::SeqCst),
            epoch: ctx.epoch(),
            through: 0,
            retry: Vec::new(),
            free: Vec::new(),
            allocated: 0,
            zero_buf: None,
            runs: Vec::new(),
            exhausted: false,
            starved: false,
            finished: false,
            hang: None,
            held_until: None,
            held_since: None,
        }
    }

    fn in_use(&self) -> usize {
        self.reads.len() + self.pending.len()
    }

    fn idle(&self) -> bool {
        self.reads.is_empty() && self.pending.is_empty()
    }

    pub(super) fn run(mut self) -> Result<(), CopyError> {
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

    /// Asks the bandwidth limit for the bytes of `chunk`; if refused, the
    /// chunk waits in `retry` and nothing more is issued until it is due.
    fn admit(&mut self, chunk: Chunk, now: Instant) -> bool {
        let Some(limit) = &self.ctx.spec.limit else { return true };
        match limit.take(chunk.length, now) {
            Ok(()) => {
                if let Some(since) = self.held_since.take() {
                    self.ctx.progress.add_held(now.saturating_duration_since(since));
                }
                true
            }
            Err(wait) => {
                // Counted as it goes, so that a long hold shows while it lasts.
                if let Some(since) = self.held_since.replace(now) {
                    self.ctx.progress.add_held(now.saturating_duration_since(since));
                }
                // Asking again at least every tick: a raised limit applies at once.
                let due = now + wait.min(TICK);
                self.held_until = Some(due);
                self.retry.push((due, chunk));
                false
            }
        }
    }

    /// Starts reads and zero requests until every slot is busy (or the
    /// bandwidth limit says wait). Only data costs bandwidth: reads, and zeros
    /// sent as data to a target that cannot zero; zero requests are free.
    fn issue(&mut self) -> Result<(), CopyError> {
        self.starved = false;
        let now = Instant::now();
        if self.held_until.is_some_and(|t| t > now) {
            return Ok(());
        }
        self.held_until = None;
        while self.in_use() < self.ctx.slots && self.src.live().is_some() && self.dst.live().is_some() {
            let chunk = if let Some(i) = self.retry.iter().position(|(t, _)| *t <= now) {
                self.retry.swap_remove(i).1
            } else if self.exhausted {
                break;
            } else {
                let mut d = self.ctx.dispatcher();
                match d.next() {
                    Some(c) => c,
                    None => {
                        // Asked under the same lock: nothing can be pushed in between.
                        self.exhausted = d.is_complete();
                        self.starved = !self.exhausted;
                        break;
                    }
                }
            };
            match chunk.action {
                Action::Copy => {
                    let Some(buf) = self.take_buf() else {
                        self.retry.push((now, chunk));
                        break;
                    };
                    if !self.admit(chunk, now) {
                        self.free.push(buf);
                        break;
                    }
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
                Action::Zero => {
                    if !self.ctx.can_zero && !self.admit(chunk, now) {
                        break;
                    }
                    self.issue_zero(chunk)?
                }
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
        // Waiting for the plan to grow, or done and helping: look again soon, as
        // neither the planning thread nor the other workers can wake a worker
        // that polls its sockets.
        let helping = self.finished && self.flushing.is_none();
        let mut timeout = if self.starved || helping { LOOK_AGAIN } else { TICK };
        for (t, _) in &self.retry {
            timeout = timeout.min(t.saturating_duration_since(now));
        }
        if self.flush_due > now {
            timeout = timeout.min(self.flush_due - now);
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

fn unknown_reply(role: Role, cookie: u64) -> CopyError {
    CopyError::Internal(format!("a reply from the {role} to a request not in flight (cookie {cookie})"))
}
