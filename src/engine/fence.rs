//! A write fence: a deadline on the monotonic clock after which a copy must not
//! send one more request to its target. Whoever runs the copy moves the deadline
//! forward while it is entitled to write, and the copy checks it before every
//! request it issues to the target (write, zero, flush) and before letting the
//! connection's library send the rest of a request it had begun. What entitles a
//! writer (a lease, say) is the caller's business; the engine only obeys.
//!
//! The clock is `std::time::Instant`, which on Linux is `CLOCK_MONOTONIC`: it
//! keeps running while the process is paused (SIGSTOP) and does not jump with
//! the wall clock, so a paused copy that resumes after its deadline sees at once
//! that it has expired, before any other thread could tell it so.
//!
//! Cheap to clone and to check: one shared atomic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// See the module documentation. The default fence never expires.
#[derive(Debug, Clone, Default)]
pub struct Fence(Option<Arc<Inner>>);

#[derive(Debug)]
struct Inner {
    base: Instant,
    /// The deadline in nanoseconds after `base`; 0 once revoked.
    deadline: AtomicU64,
}

impl Inner {
    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.base))
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Fence {
    /// A fence that expires at `deadline` unless extended.
    pub fn until(deadline: Instant) -> Self {
        let base = Instant::now();
        let at = nanos(deadline.saturating_duration_since(base));
        Self(Some(Arc::new(Inner { base, deadline: AtomicU64::new(at) })))
    }

    /// Whether writing must stop: the deadline has passed, or the fence was revoked.
    pub fn expired(&self) -> bool {
        match &self.0 {
            None => false,
            Some(i) => i.now() >= i.deadline.load(Ordering::SeqCst),
        }
    }

    /// Moves the deadline to `to` if that is later. An expired fence stays
    /// expired: a copy that stopped writing must not be made to start again.
    /// Returns whether the fence is still open.
    pub fn extend(&self, to: Instant) -> bool {
        let Some(i) = &self.0 else { return true };
        let to = nanos(to.saturating_duration_since(i.base));
        let mut current = i.deadline.load(Ordering::SeqCst);
        loop {
            if i.now() >= current {
                return false;
            }
            if to <= current {
                return true;
            }
            match i.deadline.compare_exchange(current, to, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// Closes the fence now, for good.
    pub fn revoke(&self) {
        if let Some(i) = &self.0 {
            i.deadline.store(0, Ordering::SeqCst);
        }
    }

    /// How long until the fence expires (zero once it has); `None` for a fence
    /// that never does.
    pub fn remaining(&self) -> Option<Duration> {
        let i = self.0.as_ref()?;
        Some(Duration::from_nanos(i.deadline.load(Ordering::SeqCst).saturating_sub(i.now())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_fence_never_expires() {
        let f = Fence::default();
        assert!(!f.expired());
        assert!(f.extend(Instant::now()));
        assert_eq!(f.remaining(), None);
    }

    #[test]
    fn a_fence_expires_at_its_deadline_and_only_moves_forward() {
        let f = Fence::until(Instant::now() + Duration::from_secs(60));
        let clone = f.clone();
        assert!(!clone.expired());
        assert!(f.extend(Instant::now() + Duration::from_secs(120)));
        assert!(clone.remaining().unwrap() > Duration::from_secs(100), "clones share the deadline");
        assert!(f.extend(Instant::now() + Duration::from_secs(1)), "an earlier deadline does not shorten it");
        assert!(clone.remaining().unwrap() > Duration::from_secs(100));
        clone.revoke();
        assert!(f.expired());
        assert!(!f.extend(Instant::now() + Duration::from_secs(600)), "revoked for good");
        assert!(f.expired());
    }

    #[test]
    fn an_expired_fence_is_never_reopened() {
        let f = Fence::until(Instant::now() + Duration::from_millis(20));
        let end = Instant::now() + Duration::from_secs(10);
        while !f.expired() {
            assert!(Instant::now() < end);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(f.remaining(), Some(Duration::ZERO));
        assert!(!f.extend(Instant::now() + Duration::from_secs(60)));
        assert!(f.expired());
        assert!(Fence::until(Instant::now() - Duration::from_secs(1)).expired(), "a deadline in the past");
    }
}
