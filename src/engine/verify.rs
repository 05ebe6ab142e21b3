//! Verification after a copy: reads the planned ranges from both servers, hashes
//! each block on both sides (XXH3-128) and compares. A mismatch is located to the
//! first differing 4 KiB block before it is reported.
//!
//! Uses its own connections (the copy's are closed by then) and the same pipelining
//! idea as the copy, with a simpler error policy: a transient failure (or a server
//! that stops answering for the request timeout) re-reads the block pair on fresh
//! connections, within the retry budget. Every wait looks at cancellation at least
//! every 100 ms.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_128;

use super::error::{CopyError, Role};
use super::limit::Limit;
use super::nbd::{self, ConnectOptions, Handle, NbdError, Returned};
use super::progress::Progress;
use super::retry::sleep_unless;
use super::spec::{CancelToken, Tuning};
use super::zero;

pub struct VerifySpec<'a> {
    pub disk_size: u64,
    pub source: &'a str,
    pub target: &'a str,
    /// (offset, length) of the planned ranges.
    pub ranges: &'a [(u64, u64)],
    pub connections: usize,
    pub request_size: usize,
    pub slots: usize,
    pub tuning: &'a Tuning,
    /// The copy's bandwidth limit: the second read of the source counts too.
    pub limit: Option<&'a Limit>,
}

struct Cursor {
    idx: usize,
    pos: u64,
}

struct Shared<'a> {
    spec: &'a VerifySpec<'a>,
    cursor: Mutex<Cursor>,
    progress: &'a Progress,
    cancel: &'a CancelToken,
    stop: AtomicBool,
    failure: Mutex<Option<CopyError>>,
}

impl Shared<'_> {
    fn next(&self) -> Option<(u64, u64)> {
        let mut c = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(off, len)) = self.spec.ranges.get(c.idx) {
            c.pos = c.pos.max(off);
            if c.pos >= off + len {
                c.idx += 1;
                continue;
            }
            let n = (off + len - c.pos).min(self.spec.request_size as u64);
            let block = (c.pos, n);
            c.pos += n;
            return Some(block);
        }
        None
    }

    fn fail(&self, e: CopyError) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(e);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.cancel.is_cancelled()
    }
}

/// Compares source and target over `spec.ranges`.
pub fn run(spec: &VerifySpec<'_>, progress: &Progress, cancel: &CancelToken) -> Result<(), CopyError> {
    let shared = Shared {
        spec,
        cursor: Mutex::new(Cursor { idx: 0, pos: 0 }),
        progress,
        cancel,
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
    };
    let panicked = std::thread::scope(|s| {
        let joins: Vec<_> = (0..spec.connections.max(1))
            .map(|_| {
                s.spawn(|| {
                    if let Err(e) = verify_worker(&shared) {
                        shared.fail(e);
                    }
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join()).any(|r| r.is_err())
    });
    if panicked {
        shared.fail(CopyError::Internal("a verify thread panicked".into()));
    }
    if cancel.is_cancelled() {
        // Verification runs after the copy is complete and flushed. A cancel
        // wins over what it cut short (a reconnection, say).
        return Err(CopyError::Cancelled { watermark: spec.disk_size });
    }
    if let Some(e) = shared.failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    Ok(())
}

/// One block being compared: the hash of each side once its read arrived.
struct Pair {
    offset: u64,
    length: u64,
    hashes: [Option<u128>; 2],
    failures: u32,
}

fn connect(shared: &Shared<'_>, role: Role) -> Result<Handle, CopyError> {
    let uri = if role == Role::Source { shared.spec.source } else { shared.spec.target };
    let opts = ConnectOptions { name: "verify", meta_contexts: &[] };
    Handle::connect(uri, &opts, shared.spec.tuning.connect_timeout, &|| shared.stopped())
        .map_err(|error| CopyError::Connect { role, uri: uri.into(), error })
}

fn verify_worker(shared: &Shared<'_>) -> Result<(), CopyError> {
    let mut hs = [connect(shared, Role::Source)?, connect(shared, Role::Target)?];
    let slots = shared.spec.slots.max(1);
    let mut free: Vec<Vec<u8>> = (0..2 * slots).map(|_| vec![0u8; shared.spec.request_size]).collect();
    let mut pairs: Vec<Pair> = Vec::new();
    // cookie → (side, pair offset)
    let mut reads: Vec<(u64, usize, u64)> = Vec::new();
    let mut exhausted = false;
    let policy = shared.spec.tuning.retry;
    let tuning = shared.spec.tuning;
    let timeout = tuning.stall_timeout.map_or(tuning.request_timeout, |s| s.min(tuning.request_timeout));
    let mut last_reply = Instant::now();
    let mut moved = Instant::now();
    // The next block, once the limit lets it be read; when the hold began.
    let mut next: Option<(u64, u64)> = None;
    let mut held_since: Option<Instant> = None;
    loop {
        if shared.stopped() {
            return Ok(());
        }
        let mut failed: Option<(u64, NbdError)> = None;
        let mut wait = Duration::from_millis(100);
        while pairs.len() < slots && !exhausted && failed.is_none() {
            let Some((offset, length)) = next.take().or_else(|| shared.next()) else {
                exhausted = true;
                break;
            };
            let now = Instant::now();
            if let Some(Err(hold)) = shared.spec.limit.map(|l| l.take(length, now)) {
                // Held back by the limit, not stalled: asked again within 100 ms.
                if let Some(since) = held_since.replace(now) {
                    shared.progress.add_held(now.saturating_duration_since(since));
                }
                moved = now;
                next = Some((offset, length));
                wait = wait.min(hold);
                break;
            }
            if let Some(since) = held_since.take() {
                shared.progress.add_held(now.saturating_duration_since(since));
            }
            pairs.push(Pair { offset, length, hashes: [None, None], failures: 0 });
            failed = issue(&mut hs, &mut free, &mut reads, offset, length).err();
        }
        if exhausted && pairs.is_empty() {
            return Ok(());
        }
        {
            let [a, b] = &mut hs;
            let _ = nbd::poll(&mut [a, b], wait.max(Duration::from_millis(1)));
        }
        for (side, h) in hs.iter_mut().enumerate() {
            while let Some(c) = h.next_completed() {
                last_reply = Instant::now();
                let Some(i) = reads.iter().position(|(k, _, _)| *k == c.cookie) else { continue };
                let (_, _, offset) = reads.swap_remove(i);
                let Returned::Read(buf) = c.buffer else { continue };
                let Some(p) = pairs.iter_mut().find(|p| p.offset == offset) else {
                    free.push(buf);
                    continue;
                };
                match c.result {
                    Ok(()) => p.hashes[side] = Some(xxh3_128(&buf[..p.length as usize])),
                    Err(e) => {
                        failed.get_or_insert((offset, e));
                    }
                }
                free.push(buf);
            }
        }
        if reads.is_empty() {
            last_reply = Instant::now();
        }
        if let Some(limit) = tuning.stall_timeout
            && moved.elapsed() >= limit
        {
            let at = pairs.first().map_or(0, |p| p.offset);
            let waiting =
                Some(format!("verification at offset {at} of {} and {}", shared.spec.source, shared.spec.target));
            return Err(CopyError::Stalled { idle: moved.elapsed(), waiting });
        }
        let hung = (last_reply.elapsed() >= timeout).then(|| {
            let offset = pairs.first().map_or(0, |p| p.offset);
            let message = format!("no reply for {} s", timeout.as_secs());
            (offset, NbdError { message, errno: libc::ETIMEDOUT })
        });
        if let Some((offset, error)) = failed.or_else(|| dead(&hs)).or(hung) {
            // Start over on fresh connections: everything in flight is re-read.
            let i = pairs.iter().position(|p| p.offset == offset).unwrap_or(0);
            let failures = pairs.get_mut(i).map_or(1, |p| {
                p.failures += 1;
                p.failures
            });
            if !error.is_transient() || !policy.allows(failures) {
                return Err(CopyError::Io {
                    role: Role::Source,
                    uri: shared.spec.source.into(),
                    op: "verify read",
                    offset,
                    length: shared.spec.request_size as u64,
                    attempts: failures,
                    error,
                });
            }
            shared.progress.add_retry();
            if !sleep_unless(policy.delay(failures), &|| shared.stopped()) {
                return Ok(());
            }
            last_reply = Instant::now();
            drop(hs);
            hs = [connect(shared, Role::Source)?, connect(shared, Role::Target)?];
            free = (0..2 * slots).map(|_| vec![0u8; shared.spec.request_size]).collect();
            reads.clear();
            for p in &mut pairs {
                p.hashes = [None, None];
                // A failure here shows up again as a dead handle on the next turn.
                let _ = issue(&mut hs, &mut free, &mut reads, p.offset, p.length);
            }
            continue;
        }
        let mut k = 0;
        while k < pairs.len() {
            let p = &pairs[k];
            if let [Some(a), Some(b)] = p.hashes {
                if a != b {
                    return Err(locate_mismatch(&mut hs, p.offset, p.length, &|| shared.stopped()));
                }
                shared.progress.add_verified(p.length);
                moved = Instant::now();
                pairs.swap_remove(k);
            } else {
                k += 1;
            }
        }
    }
}

/// Reads the same block from both sides, waiting at most 100 ms at a time so that
/// `stop` is heard.
fn read_both(hs: &mut [Handle; 2], offset: u64, length: usize, stop: &dyn Fn() -> bool) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut cookies = [0u64; 2];
    for (h, cookie) in hs.iter_mut().zip(&mut cookies) {
        *cookie = h.aio_pread(vec![0u8; length], length, offset).ok()?;
    }
    let mut got: [Option<Vec<u8>>; 2] = [None, None];
    while got.iter().any(Option::is_none) {
        if stop() || hs.iter().any(Handle::is_dead) {
            return None;
        }
        {
            let [a, b] = &mut *hs;
            nbd::poll(&mut [a, b], Duration::from_millis(100)).ok()?;
        }
        for (side, h) in hs.iter_mut().enumerate() {
            while let Some(c) = h.next_completed() {
                match (c.result, c.buffer) {
                    (Ok(()), Returned::Read(buf)) if c.cookie == cookies[side] => got[side] = Some(buf),
                    (Err(_), _) if c.cookie == cookies[side] => return None,
                    _ => {}
                }
            }
        }
    }
    let [a, b] = got;
    Some((a?, b?))
}

fn dead(hs: &[Handle; 2]) -> Option<(u64, NbdError)> {
    hs.iter().any(Handle::is_dead).then(|| (0, NbdError { message: "connection lost".into(), errno: libc::ENOTCONN }))
}

/// Starts the reads of one block on both sides; a failure to queue is reported
/// like a failed read.
fn issue(
    hs: &mut [Handle; 2],
    free: &mut Vec<Vec<u8>>,
    reads: &mut Vec<(u64, usize, u64)>,
    offset: u64,
    length: u64,
) -> Result<(), (u64, NbdError)> {
    for (side, h) in hs.iter_mut().enumerate() {
        let buf = free.pop().unwrap_or_else(|| vec![0u8; length as usize]);
        match h.aio_pread(buf, length as usize, offset) {
            Ok(cookie) => reads.push((cookie, side, offset)),
            Err((error, buf)) => {
                free.push(buf);
                return Err((offset, error));
            }
        }
    }
    Ok(())
}

/// Narrows a mismatching block to its first differing 4 KiB block.
fn locate_mismatch(hs: &mut [Handle; 2], offset: u64, length: u64, stop: &dyn Fn() -> bool) -> CopyError {
    let whole = CopyError::VerifyMismatch { offset, length };
    // Fresh reads; if they fail (or the copy is cancelled), the whole block is
    // reported.
    let Some((a, b)) = read_both(hs, offset, length as usize, stop) else { return whole };
    let found = a.chunks(zero::BLOCK).zip(b.chunks(zero::BLOCK)).position(|(x, y)| x != y);
    match found {
        Some(i) => {
            let at = i * zero::BLOCK;
            CopyError::VerifyMismatch {
                offset: offset + at as u64,
                length: (length - at as u64).min(zero::BLOCK as u64),
            }
        }
        None => whole,
    }
}
