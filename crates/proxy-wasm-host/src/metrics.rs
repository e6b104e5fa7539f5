//! Metrics defined by the guest (`proxy_define_metric` and friends), readable by the
//! embedder through [`Plugin::metrics`](crate::Plugin::metrics).

use std::sync::RwLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// The kind of a metric, as the guest declared it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Goes up and down, or is set.
    Gauge,
    /// Recorded values (the host keeps count and sum).
    Histogram,
}

/// A snapshot of one metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    /// Name as the guest defined it.
    pub name: String,
    /// Kind as the guest defined it.
    pub kind: MetricKind,
    /// Counter or gauge value (a counter past `i64::MAX` shows as `i64::MAX`; the guest's
    /// `proxy_get_metric` wraps at 2^64, as Envoy's); for a histogram, the sum of
    /// recorded values.
    pub value: i64,
    /// For a histogram, how many values were recorded; otherwise 0.
    pub count: u64,
}

struct Slot {
    name: String,
    kind: MetricKind,
    value: AtomicI64,
    count: AtomicU64,
}

/// Shared by every instance of one plugin. Definitions are rare (a write lock), updates
/// are frequent (a read lock and an atomic).
#[derive(Default)]
pub(crate) struct Registry {
    slots: RwLock<Vec<Slot>>,
}

/// Status codes of the ABI used here.
pub(crate) const OK: u32 = 0;
pub(crate) const NOT_FOUND: u32 = 1;
pub(crate) const BAD_ARGUMENT: u32 = 2;

/// Upper bound on distinct metrics per plugin, so a guest cannot grow host memory forever.
const MAX_METRICS: usize = 10_000;

impl Registry {
    /// Defines (or finds) a metric; the same name and kind give the same id, as in Envoy.
    pub(crate) fn define(&self, kind: u32, name: &str) -> Result<u32, u32> {
        let kind = match kind {
            0 => MetricKind::Counter,
            1 => MetricKind::Gauge,
            2 => MetricKind::Histogram,
            _ => return Err(BAD_ARGUMENT),
        };
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = slots.iter().position(|s| s.name == name && s.kind == kind) {
            return u32::try_from(i).map_err(|_| BAD_ARGUMENT);
        }
        if slots.len() >= MAX_METRICS {
            return Err(BAD_ARGUMENT);
        }
        slots.push(Slot {
            name: name.to_string(),
            kind,
            value: AtomicI64::new(0),
            count: AtomicU64::new(0),
        });
        u32::try_from(slots.len() - 1).map_err(|_| BAD_ARGUMENT)
    }

    fn with<R>(&self, id: u32, f: impl FnOnce(&Slot) -> R) -> Result<R, u32> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        // As Envoy: an id never defined is a bad argument.
        let slot = slots.get(id as usize).ok_or(BAD_ARGUMENT)?;
        Ok(f(slot))
    }

    pub(crate) fn increment(&self, id: u32, offset: i64) -> u32 {
        self.with(id, |s| match s.kind {
            // As Envoy: a counter takes only positive increments (the SDKs return
            // BAD_ARGUMENT as an error).
            MetricKind::Counter if offset <= 0 => BAD_ARGUMENT,
            MetricKind::Counter | MetricKind::Gauge => {
                s.value.fetch_add(offset, Ordering::Relaxed);
                OK
            }
            MetricKind::Histogram => BAD_ARGUMENT,
        })
        .unwrap_or_else(|e| e)
    }

    pub(crate) fn record(&self, id: u32, value: u64) -> u32 {
        self.with(id, |s| {
            match s.kind {
                // Envoy adds to a counter (a u64, wrapping: the same bits as a wrapping
                // add of the i64 kept here) and sets a gauge.
                MetricKind::Counter => {
                    s.value.fetch_add(value as i64, Ordering::Relaxed);
                }
                MetricKind::Gauge => s
                    .value
                    .store(i64::try_from(value).unwrap_or(i64::MAX), Ordering::Relaxed),
                MetricKind::Histogram => {
                    s.value
                        .fetch_add(i64::try_from(value).unwrap_or(i64::MAX), Ordering::Relaxed);
                    s.count.fetch_add(1, Ordering::Relaxed);
                }
            }
            OK
        })
        .unwrap_or_else(|e| e)
    }

    pub(crate) fn get(&self, id: u32) -> Result<u64, u32> {
        self.with(id, |s| match s.kind {
            MetricKind::Histogram => Err(BAD_ARGUMENT),
            _ => Ok(s.value.load(Ordering::Relaxed) as u64),
        })?
    }

    pub(crate) fn snapshot(&self) -> Vec<Metric> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .map(|s| Metric {
                name: s.name.clone(),
                kind: s.kind,
                value: match (s.kind, s.value.load(Ordering::Relaxed)) {
                    // A counter past i64::MAX (its u64 bits read as negative) shows as
                    // i64::MAX: a counter exported negative once went out as metrics.
                    (MetricKind::Counter, v) if v < 0 => i64::MAX,
                    (_, v) => v,
                },
                count: s.count.load(Ordering::Relaxed),
            })
            .collect()
    }
}
