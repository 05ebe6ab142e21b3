//! Bandwidth limits that change while copies run: [`Limit`], a token bucket
//! behind an `Arc` that the workers of a copy share, in a tree (appliance → job
//! → disk) so that several disks share one job's limit and several jobs share
//! the appliance's.
//!
//! A worker asks [`Limit::take`] before it reads a chunk from the source (and
//! before it writes zeros as data to a target that cannot zero: bytes that were
//! never read); zero requests cost nothing. A byte read and then written counts
//! once, so a limit of 100M means the source is read at 100 MB/s and the target
//! written at most that fast. A new limit is a store into an atomic: the next
//! `take` of every running copy uses it.
//!
//! Fairness: each node of the tree that is limited, or has a limited ancestor,
//! keeps how many bytes each of its children took (a virtual time, as in
//! start-time fair queueing) and refuses a child that is more than a little
//! ahead of the slowest child still asking. A child that stopped asking (its
//! copy is busy elsewhere, or finished) no longer holds the others back after
//! [`ACTIVE`]; one that comes back starts level with the others, not with a
//! claim to what it did not use.
//!
//! Pure logic on an injected clock (`now` is a parameter), so the tests need
//! no servers and no sleeps. Knows nothing of the daemon: who sets a limit, and
//! from where, is the caller's business.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A child that asked within this long competes for its share.
const ACTIVE: Duration = Duration::from_millis(300);
/// A child refused for fairness asks again after this long.
const FAIR_RETRY: Duration = Duration::from_millis(5);
/// Tokens saved up while a copy did not ask: at most this much of the rate.
const BURST: f64 = 0.1;
/// A child's record is forgotten after it has not asked for this long.
const FORGET: Duration = Duration::from_secs(30);

/// Highest limit accepted anywhere: 1 TiB/s, far above any link, and low
/// enough that arithmetic on it never overflows.
pub const MAX_RATE: u64 = 1 << 40;

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// One node of the limit tree. `rate` 0 means no limit at this node.
pub struct Limit {
    rate: AtomicU64,
    parent: Option<Arc<Limit>>,
    /// How the parent tells this node from its siblings.
    key: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limit").field("rate", &self.rate()).field("in_force", &self.in_force()).finish()
    }
}

#[derive(Default)]
struct State {
    /// Bytes that may be taken now; negative: taken ahead of the rate.
    tokens: f64,
    at: Option<Instant>,
    children: Vec<Child>,
}

struct Child {
    key: u64,
    /// Bytes this child took here, shifted up when it comes back from idle.
    vtime: f64,
    asked: Instant,
    /// A limit of its own holds it back: it does not compete for now, and
    /// comes back level with the others.
    resting: bool,
}

impl Limit {
    /// A root: the appliance, or one `blockrepl copy`. `rate` in bytes/s, 0 = none.
    pub fn new(rate: u64) -> Arc<Self> {
        Arc::new(Self::node(rate, None))
    }

    /// A node below this one (a job below the appliance, a disk below its job),
    /// with its own limit (0 = only the ancestors' limits).
    pub fn child(self: &Arc<Self>, rate: u64) -> Arc<Self> {
        Arc::new(Self::node(rate, Some(self.clone())))
    }

    fn node(rate: u64, parent: Option<Arc<Limit>>) -> Self {
        Self {
            rate: AtomicU64::new(rate.min(MAX_RATE)),
            parent,
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(State::default()),
        }
    }

    /// This node's own limit in bytes/s, 0 = none.
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes this node's limit; copies below it see it at their next request.
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate.min(MAX_RATE), Ordering::Relaxed);
    }

    /// The lowest limit on the way to the root, if any: what holds this node back.
    pub fn in_force(&self) -> Option<u64> {
        self.chain().iter().map(|n| n.rate()).filter(|&r| r > 0).min()
    }

    fn chain(&self) -> Vec<&Limit> {
        let mut v = vec![self];
        while let Some(p) = v[v.len() - 1].parent.as_deref() {
            v.push(p);
        }
        v
    }

    /// Asks for `n` bytes at `now`, for this node and every ancestor. `Ok`:
    /// they are taken, go ahead. `Err(wait)`: nothing was taken; ask again
    /// after `wait` (or sooner; asking early costs a lock, nothing more).
    pub fn take(&self, n: u64, now: Instant) -> Result<(), Duration> {
        let chain = self.chain();
        let rates: Vec<u64> = chain.iter().map(|n| n.rate()).collect();
        // Locked from the leaf to the root, always in that order.
        let mut states: Vec<MutexGuard<'_, State>> =
            chain.iter().map(|n| n.state.lock().unwrap_or_else(|e| e.into_inner())).collect();
        // The tightest limit at or above each node: fairness matters there.
        let mut above = vec![0u64; chain.len()];
        let mut tightest = 0u64;
        for i in (0..chain.len()).rev() {
            if rates[i] > 0 && (tightest == 0 || rates[i] < tightest) {
                tightest = rates[i];
            }
            above[i] = tightest;
        }
        let mut wait = Duration::ZERO;
        // A limit below a node holds the asker back: it does not compete there
        // (else a job held to 2M by its own limit would hold its siblings to 2M).
        let mut held_below = false;
        for (i, s) in states.iter_mut().enumerate() {
            refill(s, rates[i], now);
            // Node i decides between its children; the asking one is chain[i - 1].
            if i > 0 && above[i] > 0 {
                let key = chain[i - 1].key;
                if held_below {
                    rest(s, key);
                } else if !fair(s, key, now, n as f64 + 0.1 * above[i] as f64) {
                    wait = wait.max(FAIR_RETRY);
                }
            }
            if rates[i] > 0 && s.tokens < 0.0 {
                wait = wait.max(Duration::from_secs_f64(-s.tokens / rates[i] as f64));
                held_below = true;
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for (i, s) in states.iter_mut().enumerate() {
            if rates[i] > 0 {
                s.tokens -= n as f64;
            }
            if i > 0
                && above[i] > 0
                && let Some(c) = s.children.iter_mut().find(|c| c.key == chain[i - 1].key)
            {
                c.vtime += n as f64;
            }
        }
        Ok(())
    }
}

/// Adds what the rate earned since the last look, up to a short burst.
fn refill(s: &mut State, rate: u64, now: Instant) {
    let elapsed = s.at.map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
    s.at = Some(s.at.map_or(now, |at| at.max(now)));
    if rate == 0 {
        s.tokens = 0.0;
        return;
    }
    let rate = rate as f64;
    s.tokens = (s.tokens + rate * elapsed).min(rate * BURST);
}

/// Child `key` is held back by a limit of its own (below this node).
fn rest(s: &mut State, key: u64) {
    if let Some(c) = s.children.iter_mut().find(|c| c.key == key) {
        c.resting = true;
    }
}

/// Records that child `key` asks at `now`; whether it is within `slack` bytes
/// of the child that took least among those competing.
fn fair(s: &mut State, key: u64, now: Instant, slack: f64) -> bool {
    let competing = |c: &Child| !c.resting && now.saturating_duration_since(c.asked) < ACTIVE;
    s.children.retain(|c| c.key == key || now.saturating_duration_since(c.asked) < FORGET);
    let least = s.children.iter().filter(|c| c.key != key && competing(c)).map(|c| c.vtime).reduce(f64::min);
    let me = match s.children.iter().position(|c| c.key == key) {
        Some(i) => i,
        None => {
            s.children.push(Child { key, vtime: least.unwrap_or(0.0), asked: now, resting: false });
            s.children.len() - 1
        }
    };
    let c = &mut s.children[me];
    // Back from idle or rest (or new): level with the others, no claim to the past.
    if !competing(c)
        && let Some(l) = least
    {
        c.vtime = c.vtime.max(l);
    }
    c.resting = false;
    c.asked = c.asked.max(now);
    least.is_none_or(|l| c.vtime <= l + slack)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    /// Drives `askers` (leaf nodes, each with `n`-byte requests) on a simulated
    /// clock in 1 ms steps for `secs` (from `t0`), each asking whenever its last refusal's
    /// wait is over; returns the bytes each got.
    fn run(askers: &[Arc<Limit>], n: u64, secs: u64) -> Vec<u64> {
        run_from(Instant::now(), askers, n, secs)
    }

    fn run_from(t0: Instant, askers: &[Arc<Limit>], n: u64, secs: u64) -> Vec<u64> {
        let mut got = vec![0u64; askers.len()];
        let mut next = vec![t0; askers.len()];
        for ms in 0..secs * 1000 {
            let now = t0 + Duration::from_millis(ms);
            for (i, a) in askers.iter().enumerate() {
                while next[i] <= now {
                    match a.take(n, now) {
                        Ok(()) => got[i] += n,
                        Err(w) => {
                            // Workers look again at least every tick.
                            next[i] = now + w.min(Duration::from_millis(100));
                        }
                    }
                }
            }
        }
        got
    }

    fn near(got: u64, want: u64, tolerance: f64) -> bool {
        (got as f64 - want as f64).abs() <= want as f64 * tolerance
    }

    #[test]
    fn one_copy_gets_its_limit() {
        let l = Limit::new(4 * MB);
        let got = run(&[l], 256 << 10, 30);
        assert!(near(got[0], 120 * MB, 0.02), "{} MiB in 30 s", got[0] / MB);
    }

    #[test]
    fn no_limit_never_waits() {
        let l = Limit::new(0);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(l.take(32 * MB, now), Ok(()));
        }
        assert_eq!(l.in_force(), None);
    }

    #[test]
    fn a_change_applies_to_the_next_request() {
        let l = Limit::new(MB);
        let t0 = Instant::now();
        assert_eq!(l.take(MB, t0), Ok(()));
        // In debt by one second's worth at 1M/s.
        let wait = l.take(MB, t0 + Duration::from_millis(10)).unwrap_err();
        assert!(wait.abs_diff(Duration::from_millis(990)) < Duration::from_micros(10), "{wait:?}");
        l.set_rate(100 * MB);
        // At 100M/s the debt is paid in 10 ms.
        assert_eq!(l.take(MB, t0 + Duration::from_millis(30)), Ok(()));
        l.set_rate(0);
        assert_eq!(l.take(MB, t0 + Duration::from_millis(31)), Ok(()));
        assert_eq!(l.in_force(), None);
    }

    #[test]
    fn disks_of_a_job_share_its_limit_fairly() {
        let job = Limit::new(10 * MB);
        let disks: Vec<_> = (0..3).map(|_| job.child(0)).collect();
        let got = run(&disks, MB, 30);
        let total: u64 = got.iter().sum();
        assert!(near(total, 300 * MB, 0.03), "{} MiB in all", total / MB);
        for g in &got {
            assert!(near(*g, 100 * MB, 0.05), "unfair shares: {got:?}");
        }
    }

    #[test]
    fn jobs_share_the_appliance_whatever_their_disks() {
        // Job a has three disks, job b one: each job gets half.
        let appliance = Limit::new(12 * MB);
        let (a, b) = (appliance.child(0), appliance.child(0));
        let askers = vec![a.child(0), a.child(0), a.child(0), b.child(0)];
        let got = run(&askers, 512 << 10, 30);
        let (ga, gb) = (got[0] + got[1] + got[2], got[3]);
        assert!(near(ga, 180 * MB, 0.05) && near(gb, 180 * MB, 0.05), "a {} MiB, b {} MiB", ga / MB, gb / MB);
    }

    #[test]
    fn a_job_limit_below_its_share_leaves_the_rest_to_others() {
        let appliance = Limit::new(12 * MB);
        let slow = appliance.child(2 * MB).child(0);
        let fast = appliance.child(0).child(0);
        let got = run(&[slow, fast.clone()], 256 << 10, 30);
        assert!(near(got[0], 60 * MB, 0.05), "slow {} MiB", got[0] / MB);
        assert!(near(got[1], 300 * MB, 0.05), "fast {} MiB", got[1] / MB);
        assert_eq!(fast.in_force(), Some(12 * MB));
    }

    #[test]
    fn an_idle_child_neither_blocks_others_nor_claims_its_past_share() {
        let job = Limit::new(10 * MB);
        let (a, b) = (job.child(0), job.child(0));
        // a alone for 10 s gets everything; then b comes and they split evenly.
        let t0 = Instant::now();
        let alone = run_from(t0, std::slice::from_ref(&a), MB, 10);
        assert!(near(alone[0], 100 * MB, 0.03), "{alone:?}");
        let both = run_from(t0 + Duration::from_secs(10), &[a, b], MB, 10);
        assert!(near(both[0], 50 * MB, 0.06) && near(both[1], 50 * MB, 0.06), "{both:?}");
    }
}
