//! Injectable time source.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch. All spool times use this unit.
pub type Timestamp = u64;

/// Where the spool gets "now" from. The relay uses [`SystemClock`]; tests use
/// [`ManualClock`] and move time forward by hand instead of waiting.
pub trait Clock: Send + Sync + Debug {
    /// The current time in seconds since the Unix epoch.
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        // A clock before 1970 is a broken host; treat it as the epoch rather than failing.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            now: AtomicU64::new(start),
        }
    }

    /// Jump to `t`.
    pub fn set(&self, t: Timestamp) {
        self.now.store(t, Ordering::SeqCst);
    }

    /// Move forward by `d` (whole seconds).
    pub fn advance(&self, d: Duration) {
        self.now.fetch_add(d.as_secs(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        self.now.load(Ordering::SeqCst)
    }
}
