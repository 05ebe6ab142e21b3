//! The retry budget for transient failures: how many attempts, and how long to
//! wait before each (exponential backoff, capped); and [`RetryLog`], which decides
//! which retries are worth telling a person about. Pure; callers do the waiting
//! (with [`sleep_unless`], which wakes for cancellation).

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means no retries.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles for each further one.
    pub initial_delay: Duration,
    /// No wait is longer than this.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // About a minute of trying in all: enough to ride out a restarted server
        // or a tunnel that flaps, short enough that a dead one is reported.
        Self { max_attempts: 10, initial_delay: Duration::from_millis(250), max_delay: Duration::from_secs(15) }
    }
}

impl RetryPolicy {
    /// The wait before attempt number `attempt + 1`, after `attempt` failures
    /// (`attempt` ≥ 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1).min(31)).unwrap_or(u32::MAX);
        self.initial_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// Whether another attempt is allowed after `failures` failures.
    pub fn allows(&self, failures: u32) -> bool {
        failures < self.max_attempts
    }
}

/// How often a sleeping retry looks at its stop condition.
const SLEEP_STEP: Duration = Duration::from_millis(50);

/// Sleeps for `d`, or less if `stop` turns true (looked at every 50 ms). Returns
/// false when it was stopped.
pub fn sleep_unless(d: Duration, stop: &dyn Fn() -> bool) -> bool {
    let until = Instant::now() + d;
    loop {
        if stop() {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(SLEEP_STEP));
    }
}

/// One retry worth reporting: the first of its kind, or a summary of the ones
/// that followed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryReport<K> {
    pub key: K,
    /// What failed last, e.g. "read of 1048576 bytes at offset 0".
    pub what: String,
    pub error: String,
    /// The attempt number of `what` (the first report), or retries folded into
    /// this summary.
    pub count: u64,
    /// Zero for the first report; the time the summary covers otherwise.
    pub over: Duration,
}

/// Folds repeated retries into few reports: the first retry of each kind `K`
/// (say, the server and the error) is reported at once, later ones of that kind
/// at most once per `interval`, as a count with the last failure. A kind that
/// stayed quiet for a whole interval starts afresh.
#[derive(Debug)]
pub struct RetryLog<K> {
    interval: Duration,
    kinds: HashMap<K, Folded>,
}

#[derive(Debug)]
struct Folded {
    /// When the last report of this kind was made.
    reported: Instant,
    /// Retries since then, and the last of them.
    count: u64,
    what: String,
    error: String,
}

impl<K: std::hash::Hash + Eq + Clone> RetryLog<K> {
    pub fn new(interval: Duration) -> Self {
        Self { interval, kinds: HashMap::new() }
    }

    /// One retry of kind `key`; returns the report to make now, if any.
    pub fn note(&mut self, now: Instant, key: K, what: String, attempt: u32, error: String) -> Option<RetryReport<K>> {
        if let Some(f) = self.kinds.get_mut(&key) {
            f.count += 1;
            f.what = what;
            f.error = error;
            return self.due_one(now, &key);
        }
        self.kinds.insert(key.clone(), Folded { reported: now, count: 0, what: what.clone(), error: error.clone() });
        Some(RetryReport { key, what, error, count: u64::from(attempt), over: Duration::ZERO })
    }

    fn due_one(&mut self, now: Instant, key: &K) -> Option<RetryReport<K>> {
        let f = self.kinds.get_mut(key)?;
        let over = now.saturating_duration_since(f.reported);
        if f.count == 0 || over < self.interval {
            return None;
        }
        let report =
            RetryReport { key: key.clone(), what: f.what.clone(), error: f.error.clone(), count: f.count, over };
        f.count = 0;
        f.reported = now;
        Some(report)
    }

    /// Summaries whose interval has passed; kinds quiet for a whole interval are
    /// forgotten. Call now and then (every tick).
    pub fn due(&mut self, now: Instant) -> Vec<RetryReport<K>> {
        let interval = self.interval;
        self.kinds.retain(|_, f| f.count > 0 || now.saturating_duration_since(f.reported) < interval);
        let keys: Vec<K> = self.kinds.keys().cloned().collect();
        keys.iter().filter_map(|k| self.due_one(now, k)).collect()
    }

    /// Every retry not yet reported, regardless of the interval (at the end).
    pub fn drain(&mut self, now: Instant) -> Vec<RetryReport<K>> {
        self.kinds
            .drain()
            .filter(|(_, f)| f.count > 0)
            .map(|(key, f)| RetryReport {
                key,
                what: f.what,
                error: f.error,
                count: f.count,
                over: now.saturating_duration_since(f.reported),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let got: Vec<u128> = (1..=6).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.delay(200), Duration::from_secs(1));
    }

    #[test]
    fn budget_counts_the_first_attempt() {
        let p = RetryPolicy { max_attempts: 3, ..RetryPolicy::default() };
        assert!(p.allows(1) && p.allows(2));
        assert!(!p.allows(3));
    }

    #[test]
    fn repeated_retries_are_folded_into_few_reports() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut log = RetryLog::new(s(5));
        let mut reports = Vec::new();
        // 1,000 failing reads of one kind over 20 s, and one of another kind.
        for i in 0..1000u64 {
            let at = t0 + Duration::from_millis(i * 20);
            reports.extend(log.note(at, "source EIO", format!("read at offset {i}"), 1, "EIO".into()));
            reports.extend(log.due(at));
        }
        reports.extend(log.note(t0 + s(3), "target EIO", "write at offset 7".into(), 2, "EIO".into()));
        reports.extend(log.drain(t0 + s(21)));
        let source: Vec<_> = reports.iter().filter(|r| r.key == "source EIO").collect();
        // The first at once, then one summary per 5 s, then what was left.
        assert_eq!(source.len(), 5, "{source:?}");
        assert_eq!((source[0].count, source[0].over, source[0].what.as_str()), (1, Duration::ZERO, "read at offset 0"));
        assert_eq!(source[1].over, s(5));
        assert_eq!(source.iter().map(|r| r.count).sum::<u64>(), 1 + 999, "every retry is counted once");
        assert_eq!(source.last().map(|r| r.what.as_str()), Some("read at offset 999"));
        let target: Vec<_> = reports.iter().filter(|r| r.key == "target EIO").collect();
        assert_eq!(target.len(), 1);
        assert_eq!(target[0].count, 2, "the first report gives the attempt number");
    }

    #[test]
    fn a_kind_quiet_for_an_interval_starts_afresh() {
        let t0 = Instant::now();
        let mut log = RetryLog::new(Duration::from_secs(5));
        assert!(log.note(t0, 1, "a".into(), 1, "e".into()).is_some());
        assert!(log.note(t0 + Duration::from_secs(1), 1, "b".into(), 2, "e".into()).is_none());
        assert_eq!(log.due(t0 + Duration::from_secs(6)).len(), 1, "the summary of b");
        assert!(log.due(t0 + Duration::from_secs(12)).is_empty());
        let again = log.note(t0 + Duration::from_secs(13), 1, "c".into(), 1, "e".into());
        assert_eq!(again.map(|r| r.over), Some(Duration::ZERO), "reported at once, as a first retry");
    }

    #[test]
    fn sleeping_wakes_for_a_stop() {
        let t = Instant::now();
        assert!(!sleep_unless(Duration::from_secs(10), &|| t.elapsed() > Duration::from_millis(120)));
        assert!(t.elapsed() < Duration::from_millis(400));
        assert!(sleep_unless(Duration::from_millis(30), &|| false));
    }
}
