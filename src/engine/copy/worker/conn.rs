//! A worker's connections: [`Conn`], one connection and its health; connecting
//! again after a loss with backoff; replacing a dead or hung connection and
//! putting back what depended on it; telling the progress what the worker has
//! long waited on.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{HANG_AFTER, Worker};
use crate::engine::copy::Event;
use crate::engine::copy::report::Request;
use crate::engine::copy::servers::role_name;
use crate::engine::error::{CopyError, Role};
use crate::engine::nbd::{ConnectOptions, Handle, NbdError};

/// One connection to a server and its health.
pub(super) struct Conn {
    pub(super) handle: Option<Handle>,
    /// Last time a reply arrived or the connection went from idle to busy.
    pub(super) last_activity: Instant,
    /// Consecutive failed connection attempts.
    pub(super) failures: u32,
    pub(super) reconnect_at: Instant,
    pub(super) last_error: Option<NbdError>,
}

impl Conn {
    pub(super) fn new(handle: Option<Handle>) -> Self {
        let now = Instant::now();
        Self { handle, last_activity: now, failures: 0, reconnect_at: now, last_error: None }
    }

    pub(super) fn live(&mut self) -> Option<&mut Handle> {
        self.handle.as_mut().filter(|h| !h.is_dead())
    }

    pub(super) fn busy(&self) -> usize {
        self.handle.as_ref().map_or(0, |h| h.in_flight())
    }
}

impl Worker<'_> {
    /// (Re)connects a missing connection when its backoff has passed.
    pub(super) fn connect_due(&mut self) -> Result<(), CopyError> {
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

    /// Replaces dead or hung connections, and tells the progress what this worker
    /// has waited on for a while.
    pub(super) fn check_health(&mut self) -> Result<(), CopyError> {
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
}

pub(super) fn lost() -> NbdError {
    NbdError { message: "connection lost".into(), errno: libc::ENOTCONN }
}
