//! Retry schedule: exponential backoff bounded by a queue lifetime.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// When to try a deferred recipient again, and when to give up.
///
/// After the `n`-th failed attempt (n >= 1) the next attempt waits
/// `min(initial * factor^(n-1), max)`. With the defaults that is 5 min, 10 min, 20 min,
/// 40 min, then every hour. A message older than `lifetime` is not retried: its deferred
/// recipients expire (and the relay sends a DSN). The last retry is pulled in to the
/// expiry time, so a message always gets one attempt at the end of its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RetrySchedule {
    /// Delay after the first failure. Defaults to 5 minutes (Postfix `minimal_backoff_time` is 300 s).
    pub initial: Duration,
    /// Growth per failure. Defaults to 2.
    pub factor: u32,
    /// Longest delay. Defaults to 1 hour.
    pub max: Duration,
    /// Queue lifetime counted from reception. Defaults to 5 days (Postfix `maximal_queue_lifetime`).
    pub lifetime: Duration,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        RetrySchedule {
            initial: Duration::from_secs(300),
            factor: 2,
            max: Duration::from_secs(3600),
            lifetime: Duration::from_secs(5 * 24 * 3600),
        }
    }
}

impl RetrySchedule {
    /// A schedule with the given parameters.
    pub fn new(initial: Duration, factor: u32, max: Duration, lifetime: Duration) -> Self {
        RetrySchedule {
            initial,
            factor,
            max,
            lifetime,
        }
    }

    /// The wait after `attempts` failed attempts (`attempts` 0 is treated as 1).
    pub fn delay(&self, attempts: u32) -> Duration {
        let mut d = self.initial;
        for _ in 1..attempts.max(1) {
            d = d.saturating_mul(self.factor.max(1));
            if d >= self.max {
                return self.max;
            }
        }
        d.min(self.max)
    }

    /// When a message received at `first_received` expires.
    pub fn expires_at(&self, first_received: Timestamp) -> Timestamp {
        first_received.saturating_add(self.lifetime.as_secs())
    }

    /// The next attempt after `attempts` failures observed at `now`, or `None` when the
    /// queue lifetime is used up (the recipient expires).
    pub fn next_attempt(
        &self,
        attempts: u32,
        first_received: Timestamp,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let expiry = self.expires_at(first_received);
        if now >= expiry {
            return None;
        }
        Some(
            now.saturating_add(self.delay(attempts).as_secs())
                .min(expiry),
        )
    }
}
