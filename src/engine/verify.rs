//! Verification after a copy: reads the planned ranges from both servers, hashes
//! each block on both sides (XXH3-128) and compares. A mismatch is located to the
//! first differing 4 KiB block before it is reported.
//!
//! Uses its own connections (the copy's are closed by then) and the same pipelining
//! idea as the copy, with a simpler error policy: a transient failure re-reads the
//! block pair on fresh connections, within the retry budget.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_128;

use super::copy::{CancelToken, Tuning};
use super::error::{CopyError, Role};
use super::nbd::{self, ConnectOptions, Handle, NbdError, Returned};
use super::progress::Progress;
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
    if let Some(e) = shared.failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    if cancel.is_cancelled() {
        // Verification runs after the copy is complete and flushed.
        return Err(CopyError::Cancelled { watermark: spec.disk_size });
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
    loop {
        if shared.stopped() {
            return Ok(());
        }
        let mut failed: Option<(u64, NbdError)> = None;
        while pairs.len() < slots && !exhausted && failed.is_none() {
            let Some((offset, length)) = shared.next() else {
                exhausted = true;
                break;
            };
            pairs.push(Pair { offset, length, hashes: [None, None], failures: 0 });
            failed = issue(&mut hs, &mut free, &mut reads, offset, length).err();
        }
        if exhausted && pairs.is_empty() {
            return Ok(());
        }
        {
            let [a, b] = &mut hs;
            let _ = nbd::poll(&mut [a, b], Duration::from_millis(100));
        }
        for (side, h) in hs.iter_mut().enumerate() {
            while let Some(c) = h.next_completed() {
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
        if let Some((offset, error)) = failed.or_else(|| dead(&hs)) {
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
            std::thread::sleep(policy.delay(failures));
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
                    return Err(locate_mismatch(&mut hs, p.offset, p.length));
                }
                shared.progress.add_verified(p.length);
                pairs.swap_remove(k);
            } else {
                k += 1;
            }
        }
    }
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
fn locate_mismatch(hs: &mut [Handle; 2], offset: u64, length: u64) -> CopyError {
    let whole = CopyError::VerifyMismatch { offset, length };
    let mut a = vec![0u8; length as usize];
    let mut b = vec![0u8; length as usize];
    let [s, t] = hs;
    // Fresh synchronous reads; if they fail, the whole block is reported.
    if s.pread(&mut a, offset).is_err() || t.pread(&mut b, offset).is_err() {
        return whole;
    }
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
