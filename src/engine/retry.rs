//! The retry budget for transient failures: how many attempts, and how long to
//! wait before each (exponential backoff, capped). Pure; callers do the waiting.

use std::time::Duration;

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
}
