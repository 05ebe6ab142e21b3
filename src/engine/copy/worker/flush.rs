//! Flushes and flush epochs: when a written chunk counts as durable. A chunk is
//! durable once a flush issued after its writes completed has succeeded, with no
//! failed flush anywhere in between; with multi-conn a flush on one connection
//! covers the writes completed on all of them. Every flush to the target is
//! issued in `Worker::flush`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::Worker;
use crate::engine::copy::dispatcher::Chunk;
use crate::engine::copy::report::Request;
use crate::engine::error::{CopyError, Role};
use crate::engine::nbd::NbdError;
use crate::engine::progress::Tally;

/// A chunk written and not yet flushed.
pub(super) struct Written {
    pub(super) chunk: Chunk,
    /// What it added to the progress (taken back if it must be written again).
    pub(super) tally: Tally,
    /// The flush epoch when its writes were issued.
    pub(super) epoch: u64,
    /// Its number in `Ctx::completions`.
    pub(super) seq: u64,
}

/// A flush in flight and the chunks it covers.
pub(super) struct Flushing {
    pub(super) cookie: u64,
    pub(super) chunks: Vec<Written>,
    /// `Ctx::completions` when it was issued.
    pub(super) through: u64,
}

impl Worker<'_> {
    /// Starts a flush of this worker's target connection covering what it wrote.
    /// The only place a flush is issued.
    pub(super) fn flush(&mut self) -> Result<(), CopyError> {
        let through = self.ctx.completions.load(Ordering::SeqCst);
        // With multi-conn a flush here also covers the other connections' writes.
        let theirs = self.ctx.multi_conn && through > self.ctx.flushed_through.load(Ordering::SeqCst);
        // After a failed flush, the next waits out the backoff: with multi-conn
        // a worker done with its own chunks would otherwise flush again at
        // once for the others, and spend its retries in milliseconds.
        if self.flushing.is_some() || (self.unflushed.is_empty() && !theirs) || Instant::now() < self.flush_due {
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
    pub(super) fn flush_failed(&mut self, error: NbdError, chunks: Vec<Written>) -> Result<(), CopyError> {
        self.epoch = self.ctx.flush_epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.flush_failures += 1;
        let policy = self.ctx.spec.tuning.retry;
        if !error.is_transient() || !policy.allows(self.flush_failures) {
            return Err(CopyError::Flush { uri: self.ctx.spec.target.clone(), attempts: self.flush_failures, error });
        }
        self.ctx.reporter.retry(Role::Target, Request::whole("flush"), self.flush_failures, &error);
        let at = Instant::now() + policy.delay(self.flush_failures);
        self.flush_due = at;
        let unflushed = std::mem::take(&mut self.unflushed);
        for w in chunks.into_iter().chain(unflushed) {
            self.rewrite(w, at);
        }
        Ok(())
    }

    /// A flush covering `chunks` succeeded: they are durable, unless a flush
    /// failed somewhere since their writes were issued.
    pub(super) fn flushed(&mut self, chunks: Vec<Written>) {
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
    pub(super) fn rewrite(&mut self, w: Written, at: Instant) {
        self.ctx.progress.take_back(w.tally);
        self.retry.push((at, w.chunk));
    }

    /// Applies what the other connections learned: a failed flush anywhere (the
    /// writes issued before it may be lost) and, with multi-conn, a good flush
    /// anywhere (it covers the writes completed before it was issued).
    pub(super) fn absorb(&mut self) {
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
}
