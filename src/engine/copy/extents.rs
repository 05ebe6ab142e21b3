//! Asking the source which blocks are allocated (`base:allocation`) or changed
//! (a dirty bitmap) while planning: block-status queries over the disk, several
//! in flight, answers clipped to what was asked, failures retried, and, for
//! allocation only, a range that cannot be described left to be read as data.
//! Answers are handed on in offset order as soon as everything before them is
//! known, so that a full copy can start on the first extents while the rest is
//! still being asked about.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use super::report::Request;
use super::servers::role_name;
use super::{Copier, Event, TICK};
use crate::engine::error::{CopyError, Role};
use crate::engine::nbd::{self, Handle, NbdError, Returned};
use crate::engine::plan::Extent;
use crate::engine::retry::sleep_unless;

/// Block-status queries are made in pieces of this size.
const EXTENTS_STEP: u64 = 1 << 30;
/// Block-status queries in flight at once while planning.
const EXTENTS_IN_FLIGHT: usize = 8;
/// The smallest piece the rest of a segment is split into (see `rest_in_pieces`).
const MIN_PIECE: u64 = 64 << 10;
/// Attempts at a `base:allocation` query before its range is read as data: a
/// wrong guess costs reading holes, not correctness, so it is not worth the whole
/// retry budget.
const EXTENTS_ATTEMPTS: u32 = 3;

/// Bytes of the disk the source could not describe (read as data), and why.
pub(super) type Unmapped = (u64, String);

impl Copier {
    /// All extents of meta context `ctx` over the disk, retrying transient errors.
    /// Several queries are in flight at once: servers answer them in parallel
    /// (nbdkit runs a connection's requests on several threads), and planning is
    /// time in which nothing is copied.
    ///
    /// For `base:allocation` a range the source cannot describe after a few
    /// attempts is left out (the plan reads what is not described as data), and
    /// the second value says how many bytes that was and why. A failing dirty
    /// bitmap is an error: an incremental copy never guesses.
    pub(super) fn extents(
        &self,
        src: &mut Handle,
        ctx: &str,
        size: u64,
        events: &(dyn Fn(Event) + Sync),
    ) -> Result<(Vec<Extent>, Option<Unmapped>), CopyError> {
        let mut all = Vec::new();
        let unmapped = self.extents_in_order(src, ctx, size, events, &|| false, &mut |_, mut e| all.append(&mut e))?;
        Ok((all, unmapped))
    }

    /// As [`Copier::extents`], handing the extents to `sink` in offset order as
    /// soon as everything below them is known: `sink(known, extents)` says that
    /// the disk is described up to `known`, and `extents` are the new ones
    /// (a range the source could not describe comes as one data extent). Stops
    /// with [`CopyError::Cancelled`] when cancelled or when `halt` says so.
    pub(super) fn extents_in_order(
        &self,
        src: &mut Handle,
        ctx: &str,
        size: u64,
        events: &(dyn Fn(Event) + Sync),
        halt: &dyn Fn() -> bool,
        sink: &mut dyn FnMut(u64, Vec<Extent>),
    ) -> Result<Option<Unmapped>, CopyError> {
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
        // Segments still to ask about (start, end, failures, not before), in offset
        // order, so that the lowest are asked first and what is known from the
        // start of the disk grows steadily; an answer may cover only a prefix of
        // its segment, and the rest is asked again.
        let now = Instant::now();
        let mut todo: VecDeque<(u64, u64, u32, Instant)> =
            (0..size).step_by(EXTENTS_STEP as usize).map(|p| (p, (p + EXTENTS_STEP).min(size), 0, now)).collect();
        let mut asked: HashMap<u64, (u64, u64, u32)> = HashMap::new();
        let mut found: BTreeMap<u64, Extent> = BTreeMap::new();
        let mut unmapped: Option<Unmapped> = None;
        let mut last_reply = Instant::now();
        // Connections lost since the last answer: a server that dies at every
        // query must not be reconnected to forever.
        let mut lost = 0;
        // Everything below this offset was handed to `sink`.
        let mut known = 0;
        while !(todo.is_empty() && asked.is_empty()) {
            if self.cancel.is_cancelled() || halt() {
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
            // A segment waiting out its backoff is due at its time, unless every
            // slot is taken: then only a reply frees one, and the poll wakes for it.
            let next_due = if asked.len() < EXTENTS_IN_FLIGHT {
                todo.iter().map(|t| t.3.saturating_duration_since(now)).min().unwrap_or(TICK)
            } else {
                TICK
            };
            if let Err(e) = nbd::poll(&mut [&mut *src], next_due.min(TICK))
                && !src.is_dead()
            {
                return Err(io(0, size, 1, e));
            }
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
                        lost = 0;
                        let advanced = take_extents(&replies, ctx, start, end, &mut found);
                        if advanced <= start {
                            let error =
                                NbdError { message: format!("server returned no extents at offset {start}"), errno: 0 };
                            failed.push((start, end, failures, error));
                        } else if advanced < end {
                            let now = Instant::now();
                            for (from, to) in rest_in_pieces(start, advanced, end) {
                                ask_in_order(&mut todo, (from, to, 0, now));
                            }
                        }
                    }
                    (Err(error), _) => failed.push((start, end, failures, error)),
                    (Ok(()), _) => return Err(CopyError::Internal("block status without extents".into())),
                }
            }
            if src.is_dead() {
                // The queries in flight and those that failed with the
                // connection are asked again on a new one, at no cost to their
                // own attempts.
                let now = Instant::now();
                for (start, end, failures) in asked.drain().map(|(_, q)| q) {
                    ask_in_order(&mut todo, (start, end, failures, now));
                }
                for (start, end, failures, _) in failed.drain(..) {
                    ask_in_order(&mut todo, (start, end, failures, now));
                }
                lost += 1;
                *src = self.reconnect_planning(ctx, lost, halt, &reporter, events)?;
                last_reply = Instant::now();
            }
            for (start, end, failures, error) in failed {
                let failures = failures + 1;
                if error.is_transient() && failures < attempts {
                    reporter.retry(Role::Source, Request::new("block status", start, end - start), failures, &error);
                    ask_in_order(&mut todo, (start, end, failures, Instant::now() + policy.delay(failures)));
                } else if may_guess {
                    let u = unmapped.get_or_insert_with(|| (0, error.to_string()));
                    u.0 += end - start;
                    // Read as data: what a plan does with what nothing describes.
                    found.insert(start, Extent { offset: start, length: end - start, flags: 0 });
                } else {
                    return Err(io(start, end - start, failures, error));
                }
            }
            let ready = known_prefix(&mut found, &mut known);
            if !ready.is_empty() {
                sink(known, ready);
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
        if known < size {
            return Err(CopyError::Internal(format!(
                "planning ended with the disk described only up to offset {known}"
            )));
        }
        Ok(unmapped)
    }
}

impl Copier {
    /// A new connection to the source for planning, after the `lost`-th loss
    /// in a row of the last one: connects with the copy's retry policy (the
    /// same as the workers' connections), and fails as they do when the policy
    /// is spent.
    fn reconnect_planning(
        &self,
        ctx: &str,
        lost: u32,
        halt: &dyn Fn() -> bool,
        reporter: &super::report::Reporter<'_>,
        events: &(dyn Fn(Event) + Sync),
    ) -> Result<Handle, CopyError> {
        let spec = &self.spec;
        let policy = spec.tuning.retry;
        let uri = &spec.source;
        let stop = || self.cancel.is_cancelled() || halt();
        let contexts = [ctx.to_string()];
        let opts = nbd::ConnectOptions { name: role_name(Role::Source), meta_contexts: &contexts };
        let mut failures = lost;
        let mut error = NbdError { message: "the connection was lost".into(), errno: libc::ENOTCONN };
        loop {
            if stop() {
                return Err(CopyError::Cancelled { watermark: spec.resume_from });
            }
            if !policy.allows(failures) {
                return Err(CopyError::Reconnect { role: Role::Source, uri: uri.clone(), attempts: failures, error });
            }
            reporter.retry(Role::Source, Request::whole("connection"), failures, &error);
            reporter.flush(false);
            sleep_unless(policy.delay(failures), &stop);
            match Handle::connect(uri, &opts, spec.tuning.connect_timeout, &stop) {
                Ok(h) => {
                    events(Event::Reconnected { role: Role::Source });
                    return Ok(h);
                }
                Err(e) => {
                    failures += 1;
                    error = e;
                }
            }
        }
    }
}

/// Queues a segment to ask about at its place in offset order.
fn ask_in_order(todo: &mut VecDeque<(u64, u64, u32, Instant)>, segment: (u64, u64, u32, Instant)) {
    let at = todo.partition_point(|t| t.0 < segment.0);
    todo.insert(at, segment);
}

/// The rest `[advanced, end)` of a segment whose answer stopped at `advanced`,
/// in the order to ask: pieces the size of what the answer covered (a server
/// that answers for little at a time will likely do so again), enough to keep
/// [`EXTENTS_IN_FLIGHT`] queries going, then the tail. A server that answers
/// slowly for 1 MiB at a time is so asked about 8 MiB at a time, not 1.
fn rest_in_pieces(start: u64, advanced: u64, end: u64) -> Vec<(u64, u64)> {
    let piece = (advanced - start).max(MIN_PIECE);
    let mut out = Vec::with_capacity(EXTENTS_IN_FLIGHT);
    let mut at = advanced;
    while out.len() + 1 < EXTENTS_IN_FLIGHT && end - at > piece {
        out.push((at, at + piece));
        at += piece;
    }
    out.push((at, end));
    out
}

/// Takes out of `found` the extents that continue, without a gap, from `known`,
/// and moves `known` to their end.
fn known_prefix(found: &mut BTreeMap<u64, Extent>, known: &mut u64) -> Vec<Extent> {
    let mut out = Vec::new();
    while let Some(entry) = found.first_entry() {
        let e = *entry.get();
        if e.offset > *known {
            break;
        }
        entry.remove();
        // Segments do not overlap, so this is only defensive.
        if e.offset + e.length > *known {
            out.push(e);
            *known = e.offset + e.length;
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_rest_of_a_short_answer_is_asked_in_pieces_of_its_size() {
        const M: u64 = 1 << 20;
        let got = rest_in_pieces(0, M, 1024 * M);
        assert_eq!(got.len(), EXTENTS_IN_FLIGHT);
        assert_eq!(got[..3], [(M, 2 * M), (2 * M, 3 * M), (3 * M, 4 * M)]);
        assert_eq!(got.last(), Some(&(8 * M, 1024 * M)), "then the tail, in one");
        assert_eq!(rest_in_pieces(0, M, 3 * M / 2), [(M, 3 * M / 2)]);
        assert_eq!(rest_in_pieces(0, 1, 3 * MIN_PIECE)[0], (1, 1 + MIN_PIECE), "never tiny pieces");
    }

    #[test]
    fn extents_are_handed_on_only_once_everything_below_is_known() {
        let e = |offset, length| Extent { offset, length, flags: 0 };
        let mut found: BTreeMap<u64, Extent> = [(100, e(100, 50)), (300, e(300, 10))].into();
        let mut known = 0;
        assert!(known_prefix(&mut found, &mut known).is_empty(), "0..100 is not known yet");
        found.insert(0, e(0, 100));
        assert_eq!(known_prefix(&mut found, &mut known), [e(0, 100), e(100, 50)]);
        assert_eq!((known, found.len()), (150, 1));
        found.insert(150, e(150, 150));
        assert_eq!(known_prefix(&mut found, &mut known), [e(150, 150), e(300, 10)]);
        assert_eq!((known, found.len()), (310, 0));
    }
}
