//! Progress of one copy, shared between the copy threads (which only add to atomic
//! counters) and any number of readers (which take snapshots).
//!
//! Readers pay for the rate estimate, never the copy: the moving window of samples
//! lives behind a mutex the copy threads never touch. The copy threads touch the
//! one other mutex, [`Progress::set_hang`], only when a server stops or starts
//! answering again.
//!
//! A full copy may copy while it still plans (see `copy/`): then the stage stays
//! [`Stage::Planning`] until the plan is complete, `planned_bytes` is what is
//! planned so far and `unplanned_bytes` the part of the disk not yet asked
//! about. [`Snapshot::percent`] divides by `planned_bytes + unplanned_bytes`,
//! the most the plan can still come to: planning only ever turns unplanned
//! bytes into planned bytes or into holes, so that denominator never grows while
//! bytes done never shrink (apart from bytes a failed flush takes back), and the
//! percentage never goes down. It is the true percentage once the plan is
//! complete; until then it is a lower bound, and the ETA is unknown.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How far back `Snapshot::limited` looks.
const HELD_WINDOW: Duration = Duration::from_secs(2);
/// Held back by the limit this share of the time (summed over the copy
/// threads) or more: the copy is limited.
const LIMITED_SHARE: f64 = 0.25;

/// Where a copy is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Connecting,
    Planning,
    Copying,
    Flushing,
    Verifying,
    Done,
}

impl Stage {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Connecting,
            1 => Self::Planning,
            2 => Self::Copying,
            3 => Self::Flushing,
            4 => Self::Verifying,
            _ => Self::Done,
        }
    }
}

/// A consistent-enough picture of a copy at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Snapshot {
    pub stage: Stage,
    pub disk_size: u64,
    /// Bytes the plan reads from the source (the denominator), so far while
    /// planning.
    pub planned_bytes: u64,
    /// Bytes of the disk the plan has not reached yet: 0 once the plan is
    /// complete. Each of them may still turn out to be data.
    pub unplanned_bytes: u64,
    /// Planned bytes read and written (as data or as zeros); reaches `planned_bytes`.
    pub bytes_done: u64,
    /// Bytes sent to the target as payload.
    pub bytes_written: u64,
    /// Bytes written as zero requests (zero extents and all-zero blocks of data).
    pub zeroed_bytes: u64,
    /// Bytes not written because the target already reads as zeros.
    pub skipped_bytes: u64,
    /// Bytes compared by verification.
    pub verified_bytes: u64,
    /// Offset below which everything planned is written and flushed.
    pub durable_watermark: u64,
    pub retries: u64,
    pub elapsed: Duration,
    /// Moving average over the last few seconds, in planned bytes per second.
    pub throughput_bps: u64,
    pub eta: Option<Duration>,
    /// The request that has waited longest for a server that does not answer,
    /// e.g. "read of 1048576 bytes at offset 0 on source nbd://h/e has had no
    /// reply for 12 s"; `None` while every server answers.
    pub waiting_on: Option<String>,
    /// The bandwidth limit held the copy back for a good part of the last few
    /// seconds: its rate is the limit's, not the servers'.
    pub limited: bool,
}

impl Snapshot {
    /// Whether the plan is still growing.
    pub fn planning(&self) -> bool {
        self.unplanned_bytes > 0
    }

    /// Bytes done as a percentage of the most the plan can come to (see the
    /// module's documentation): never goes down, exact once planned.
    pub fn percent(&self) -> f64 {
        percent(self.bytes_done, self.planned_bytes + self.unplanned_bytes)
    }
}

/// `done` of `total` as a percentage; an empty plan is 100 % done.
pub fn percent(done: u64, total: u64) -> f64 {
    if total == 0 { 100.0 } else { (done as f64 * 100.0 / total as f64).min(100.0) }
}

/// Per-chunk accounting, added when a chunk's writes complete and taken back if
/// the connection is lost before they were flushed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub done: u64,
    pub written: u64,
    pub zeroed: u64,
    pub skipped: u64,
}

#[derive(Default)]
struct Counters {
    stage: AtomicU8,
    disk_size: AtomicU64,
    planned: AtomicU64,
    /// The most the plan can come to: planned bytes plus the part of the disk
    /// not planned yet. One figure, so that a reader never adds a planned part
    /// to an unplanned part of another moment (the percentage could then dip).
    bound: AtomicU64,
    /// Planned bytes below the resume point: counted as done, but not by this
    /// run, so not as speed.
    credited: AtomicU64,
    done: AtomicU64,
    written: AtomicU64,
    zeroed: AtomicU64,
    skipped: AtomicU64,
    verified: AtomicU64,
    watermark: AtomicU64,
    retries: AtomicU64,
    /// Nanoseconds copy threads were held back by the bandwidth limit, summed.
    held: AtomicU64,
}

struct Shared {
    c: Counters,
    started: Instant,
    window: Mutex<RateWindow>,
    /// The share of time held back by the limit, over a short window.
    held_window: Mutex<RateWindow>,
    /// Per copy thread: what it waits for without an answer, and since when.
    hangs: Mutex<BTreeMap<usize, (Instant, String)>>,
}

/// Cheap to clone; all clones see the same copy.
#[derive(Clone)]
pub struct Progress(Arc<Shared>);

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        Self(Arc::new(Shared {
            c: Counters::default(),
            started: Instant::now(),
            window: Mutex::new(RateWindow::new(Duration::from_secs(10))),
            held_window: Mutex::new(RateWindow::new(HELD_WINDOW)),
            hangs: Mutex::new(BTreeMap::new()),
        }))
    }

    pub(crate) fn set_stage(&self, s: Stage) {
        self.0.c.stage.store(s as u8, Relaxed);
    }

    /// Records the plan: its size, its planned bytes and what is already done
    /// below the resume point.
    pub(crate) fn set_plan(&self, disk_size: u64, planned: u64, already_done: u64, skipped: u64) {
        let c = &self.0.c;
        c.disk_size.store(disk_size, Relaxed);
        c.planned.store(planned, Relaxed);
        c.bound.store(planned, Relaxed);
        c.credited.store(already_done, Relaxed);
        c.done.store(already_done, Relaxed);
        c.skipped.store(skipped, Relaxed);
        if let Ok(mut w) = self.0.window.lock() {
            w.reset(Instant::now(), 0);
        }
    }

    /// Starts a plan that grows while the copy runs: nothing planned yet, the
    /// whole disk still to be asked about.
    pub(crate) fn start_plan(&self, disk_size: u64) {
        self.set_plan(disk_size, 0, 0, 0);
        self.0.c.bound.store(disk_size, Relaxed);
    }

    /// More of a growing plan: `planned` bytes to read (`already_done` of them
    /// below the resume point), `skipped` bytes left alone, and `unplanned`
    /// bytes of the disk still to be asked about. Called by one thread.
    pub(crate) fn extend_plan(&self, planned: u64, already_done: u64, skipped: u64, unplanned: u64) {
        let c = &self.0.c;
        let total = c.planned.fetch_add(planned, Relaxed) + planned;
        c.bound.store(total + unplanned, Relaxed);
        c.credited.fetch_add(already_done, Relaxed);
        c.done.fetch_add(already_done, Relaxed);
        c.skipped.fetch_add(skipped, Relaxed);
    }

    pub(crate) fn add(&self, t: Tally) {
        let c = &self.0.c;
        c.done.fetch_add(t.done, Relaxed);
        c.written.fetch_add(t.written, Relaxed);
        c.zeroed.fetch_add(t.zeroed, Relaxed);
        c.skipped.fetch_add(t.skipped, Relaxed);
    }

    pub(crate) fn take_back(&self, t: Tally) {
        let c = &self.0.c;
        c.done.fetch_sub(t.done, Relaxed);
        c.written.fetch_sub(t.written, Relaxed);
        c.zeroed.fetch_sub(t.zeroed, Relaxed);
        c.skipped.fetch_sub(t.skipped, Relaxed);
    }

    pub(crate) fn add_verified(&self, n: u64) {
        self.0.c.verified.fetch_add(n, Relaxed);
    }

    /// A copy thread was held back by the bandwidth limit for `d`.
    pub(crate) fn add_held(&self, d: Duration) {
        self.0.c.held.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    pub(crate) fn add_retry(&self) {
        self.0.c.retries.fetch_add(1, Relaxed);
    }

    /// A figure that changes whenever the copy moves at all (bytes done,
    /// written, zeroed or skipped, the watermark, or planning) or waits for the bandwidth
    /// limit (a low limit may allow a request only every few minutes); for
    /// stall detection.
    pub(crate) fn work(&self) -> u64 {
        let c = &self.0.c;
        [&c.done, &c.written, &c.zeroed, &c.skipped, &c.watermark, &c.verified, &c.held, &c.bound]
            .iter()
            .fold(0u64, |acc, v| acc.wrapping_add(v.load(Relaxed)))
    }

    pub(crate) fn set_watermark(&self, w: u64) {
        self.0.c.watermark.store(w, Relaxed);
    }

    /// Copy thread `who` waits, since `since`, for an answer to `what` (a request
    /// and the server, e.g. "read of 4096 bytes at offset 0 on source nbd://h/"),
    /// or (`None`) no longer waits.
    pub(crate) fn set_hang(&self, who: usize, hang: Option<(Instant, String)>) {
        let mut h = self.0.hangs.lock().unwrap_or_else(|e| e.into_inner());
        match hang {
            Some(v) => h.insert(who, v),
            None => h.remove(&who),
        };
    }

    /// The longest wait for an answer, as a sentence, if any.
    pub fn waiting_on(&self) -> Option<String> {
        let h = self.0.hangs.lock().unwrap_or_else(|e| e.into_inner());
        let (since, what) = h.values().min_by_key(|(since, _)| *since)?;
        Some(format!("{what} has had no reply for {} s", since.elapsed().as_secs()))
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = &self.0.c;
        let now = Instant::now();
        let done = c.done.load(Relaxed);
        let planned = c.planned.load(Relaxed);
        // Planning only turns unplanned bytes into planned bytes or holes, so the
        // bound of any moment is at least the planned bytes of a later one.
        let unplanned = c.bound.load(Relaxed).saturating_sub(planned);
        let stage = Stage::from_u8(c.stage.load(Relaxed));
        let own = done.saturating_sub(c.credited.load(Relaxed));
        let rate = self.0.window.lock().map(|mut w| w.rate(now, own)).unwrap_or(0.0);
        let held = c.held.load(Relaxed);
        let limited = self.0.held_window.lock().is_ok_and(|mut w| limited(&mut w, now, held));
        let remaining = planned.saturating_sub(done);
        let eta = if unplanned > 0 {
            None
        } else if remaining == 0 {
            Some(Duration::ZERO)
        } else if rate >= 1.0 {
            Some(Duration::from_secs_f64(remaining as f64 / rate))
        } else {
            None
        };
        Snapshot {
            stage,
            disk_size: c.disk_size.load(Relaxed),
            planned_bytes: planned,
            unplanned_bytes: unplanned,
            bytes_done: done,
            bytes_written: c.written.load(Relaxed),
            zeroed_bytes: c.zeroed.load(Relaxed),
            skipped_bytes: c.skipped.load(Relaxed),
            verified_bytes: c.verified.load(Relaxed),
            durable_watermark: c.watermark.load(Relaxed),
            retries: c.retries.load(Relaxed),
            elapsed: now.duration_since(self.0.started),
            throughput_bps: rate as u64,
            eta,
            waiting_on: self.waiting_on(),
            limited,
        }
    }
}

/// Whether copy threads were held back by the limit (`held` nanoseconds so
/// far) for at least [`LIMITED_SHARE`] of the window ending at `now`.
fn limited(w: &mut RateWindow, now: Instant, held: u64) -> bool {
    w.rate(now, held) / 1e9 >= LIMITED_SHARE
}

/// A moving-window rate estimate: bytes over the last `span`, sampled whenever a
/// reader asks (at most every 200 ms).
pub struct RateWindow {
    span: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    pub fn new(span: Duration) -> Self {
        Self { span, samples: VecDeque::new() }
    }

    pub fn reset(&mut self, now: Instant, value: u64) {
        self.samples.clear();
        self.samples.push_back((now, value));
    }

    /// Rate in units per second over the window ending at `now`.
    pub fn rate(&mut self, now: Instant, value: u64) -> f64 {
        let Some(&(last_t, _)) = self.samples.back() else {
            self.samples.push_back((now, value));
            return 0.0;
        };
        if now.duration_since(last_t) >= Duration::from_millis(200) {
            self.samples.push_back((now, value));
        }
        // Keep one sample at or before the window's start so the window stays full.
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= self.span {
            self.samples.pop_front();
        }
        let (t0, v0) = self.samples[0];
        let dt = now.duration_since(t0).as_secs_f64();
        if dt < 0.05 { 0.0 } else { value.saturating_sub(v0) as f64 / dt }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_a_moving_average() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(10));
        w.reset(t0, 0);
        // 100 B/s for 20 s, then 1000 B/s for 10 s: the window sees only the latter.
        let mut v = 0;
        for s in 1..=20 {
            v += 100;
            w.rate(t0 + Duration::from_secs(s), v);
        }
        let r = w.rate(t0 + Duration::from_secs(20), v);
        assert!((r - 100.0).abs() < 1.0, "{r}");
        for s in 21..=30 {
            v += 1000;
            w.rate(t0 + Duration::from_secs(s), v);
        }
        let r = w.rate(t0 + Duration::from_secs(30), v);
        assert!((r - 1000.0).abs() < 1.0, "{r}");
    }

    #[test]
    fn resumed_bytes_do_not_count_as_speed() {
        let p = Progress::new();
        p.set_plan(1000, 1000, 600, 0);
        let s = p.snapshot();
        assert_eq!((s.bytes_done, s.throughput_bps), (600, 0));
        assert_eq!(percent(s.bytes_done, s.planned_bytes), 60.0);
        assert_eq!(s.eta, None);
    }

    #[test]
    fn taking_back_undoes_adding() {
        let p = Progress::new();
        p.set_plan(100, 100, 0, 0);
        let t = Tally { done: 10, written: 6, zeroed: 4, skipped: 0 };
        p.add(t);
        p.add(t);
        p.take_back(t);
        let s = p.snapshot();
        assert_eq!((s.bytes_done, s.bytes_written, s.zeroed_bytes), (10, 6, 4));
    }

    #[test]
    fn the_longest_wait_is_reported_until_it_ends() {
        let p = Progress::new();
        assert_eq!(p.snapshot().waiting_on, None);
        let now = Instant::now();
        p.set_hang(1, Some((now, "flush on target t".into())));
        p.set_hang(0, Some((now - Duration::from_secs(7), "read of 1 bytes at offset 0 on source s".into())));
        assert_eq!(
            p.snapshot().waiting_on.as_deref(),
            Some("read of 1 bytes at offset 0 on source s has had no reply for 7 s")
        );
        p.set_hang(0, None);
        assert!(p.snapshot().waiting_on.is_some_and(|w| w.starts_with("flush on target t")));
        p.set_hang(1, None);
        assert_eq!(p.snapshot().waiting_on, None);
    }

    #[test]
    fn limited_means_held_back_lately() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(HELD_WINDOW);
        w.reset(t0, 0);
        let s = |ms| t0 + Duration::from_millis(ms);
        // Two threads, each held a tenth of the time: not limited.
        assert!(!limited(&mut w, s(1000), 200_000_000));
        // Then both held half of the time for two seconds: limited.
        assert!(limited(&mut w, s(2000), 1_200_000_000));
        assert!(limited(&mut w, s(3000), 2_200_000_000));
        // Then no longer held: the window forgets.
        assert!(!limited(&mut w, s(5400), 2_200_000_000));
    }

    #[test]
    fn the_percentage_of_a_growing_plan_never_goes_down() {
        let p = Progress::new();
        p.start_plan(1000);
        let mut last = 0.0;
        let mut check = |p: &Progress, expected: f64| {
            let s = p.snapshot();
            assert_eq!(s.percent(), expected, "{s:?}");
            assert!(s.percent() >= last);
            last = s.percent();
        };
        check(&p, 0.0);
        // 0..200 planned: 100 data (50 of them below a resume point), 100 hole.
        p.extend_plan(100, 50, 0, 800);
        assert!(p.snapshot().planning() && p.snapshot().eta.is_none());
        check(&p, 50.0 / 900.0 * 100.0);
        p.add(Tally { done: 50, written: 50, ..Tally::default() });
        check(&p, 100.0 / 900.0 * 100.0);
        // The rest is a hole: the bound falls to the plan, the percentage rises.
        p.extend_plan(0, 0, 0, 0);
        assert!(!p.snapshot().planning());
        check(&p, 100.0);
        assert_eq!(p.snapshot().throughput_bps, 0, "resumed bytes are not speed");
    }

    #[test]
    fn empty_plan_is_complete() {
        assert_eq!(percent(0, 0), 100.0);
        assert_eq!(percent(1, 4), 25.0);
    }
}
