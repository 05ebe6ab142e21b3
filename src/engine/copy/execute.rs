//! Running the workers: [`Ctx`], what they share (the dispatcher, the flush
//! epoch and rounds, the first failure), and [`execute`], the thread that starts
//! one worker per connection pair and watches them: it moves the durable
//! watermark (checkpoints), asks for a flush every checkpoint interval, fails a
//! copy that stalls, and ends with the [`verdict`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use super::dispatcher::Dispatcher;
use super::report::Reporter;
use super::worker::Worker;
use super::{Event, TICK};
use crate::engine::error::{CopyError, Role};
use crate::engine::fence::Fence;
use crate::engine::nbd::Handle;
use crate::engine::progress::Progress;
use crate::engine::spec::{CancelToken, CopySpec};

/// What the workers share.
pub(super) struct Ctx<'a> {
    pub(super) spec: &'a CopySpec,
    pub(super) progress: &'a Progress,
    pub(super) cancel: &'a CancelToken,
    /// No request may go to the target once it expires.
    pub(super) fence: &'a Fence,
    pub(super) events: &'a (dyn Fn(Event) + Sync),
    pub(super) reporter: Reporter<'a>,
    pub(super) dispatcher: Mutex<Dispatcher>,
    /// Set when any worker failed: the others wind down.
    pub(super) stop: AtomicBool,
    pub(super) failure: Mutex<Option<CopyError>>,
    /// Cleared for everyone once the target refuses a fast zero.
    pub(super) fast_zero: AtomicBool,
    pub(super) can_zero: bool,
    pub(super) can_flush: bool,
    /// The servers advertise multi-conn: a flush on any connection covers the
    /// writes completed on all of them.
    pub(super) multi_conn: bool,
    /// Grows with every failed flush, on any connection: writes issued before it
    /// may be lost and are written again.
    pub(super) flush_epoch: AtomicU64,
    /// Grows every checkpoint interval; each worker flushes when it sees it move.
    pub(super) flush_round: AtomicU64,
    /// Counts chunks whose writes completed; a flush covers those counted before
    /// it was issued.
    pub(super) completions: AtomicU64,
    /// With multi-conn: every chunk counted up to here is flushed.
    pub(super) flushed_through: AtomicU64,
    /// Workers still running, and those of them with chunks to copy.
    pub(super) running: AtomicUsize,
    pub(super) unfinished: AtomicUsize,
    pub(super) request_size: usize,
    /// Zero blocks are found in pieces of this size (the servers' minimum block
    /// size, at least 4 KiB), so that zero requests stay aligned.
    pub(super) min_block: usize,
    /// Requests in flight per worker (each read holds one buffer).
    pub(super) slots: usize,
}

impl Ctx<'_> {
    pub(super) fn dispatcher(&self) -> std::sync::MutexGuard<'_, Dispatcher> {
        // A poisoned lock means a worker panicked; the data is still consistent
        // (every update is a single call) and the panic is reported separately.
        self.dispatcher.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn uri(&self, role: Role) -> &str {
        if role == Role::Source { &self.spec.source } else { &self.spec.target }
    }

    pub(super) fn fail(&self, e: CopyError) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    pub(super) fn epoch(&self) -> u64 {
        self.flush_epoch.load(Ordering::SeqCst)
    }
}

/// Runs the workers and watches them until all are done: moves the durable
/// watermark, asks for a flush on every connection each checkpoint interval,
/// fails a copy that stalls, and reports folded retries. Returns the watermark.
/// The first worker starts on `src` (when given) and `dst`; the others open
/// their own connections.
pub(super) fn execute(ctx: &Ctx<'_>, connections: usize, src: Option<Handle>, dst: Handle) -> Result<u64, CopyError> {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut first = Some((src, Some(dst)));
    let results: Vec<std::thread::Result<()>> = std::thread::scope(|s| {
        let mut joins = Vec::with_capacity(connections);
        for i in 0..connections {
            let (s_handle, d_handle) = first.take().unwrap_or((None, None));
            let done = done_tx.clone();
            let builder = std::thread::Builder::new().name(format!("copy-{i}"));
            let spawned = builder.spawn_scoped(s, move || {
                if let Err(e) = Worker::new(ctx, i, s_handle, d_handle).run() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::plan::{Action, Range};

    #[test]
    fn success_needs_every_planned_chunk_durable() {
        let check = |d: &Dispatcher| verdict(None, false, d.watermark(), d.unfinished());
        let mut d = Dispatcher::new(vec![Range { offset: 0, length: 300, action: Action::Copy }], 300, 100, 100);
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
}
