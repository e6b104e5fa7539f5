//! The relay's metrics registry (prometheus-client), shared by every module as
//! `Arc<Metrics>` and served as Prometheus text by the admin endpoint (`GET /metrics`).
//!
//! The inbound side's metrics are fields here. Other modules (delivery) register their own
//! with [`Metrics::register`]; everything ends up in one exposition. Spool gauges and
//! counters are refreshed from [`Spool::stats`] at every scrape ([`Metrics::encode`]), so
//! they are never stale.
//!
//! Names follow the Prometheus conventions: `altroute_` prefix, snake_case, base units
//! (`_bytes`, `_seconds`), counters end in `_total`, labels have few values (no message
//! ids, no addresses, no host names). docs/operations.md lists every metric with its type,
//! labels and meaning; the e2e test `queue::metrics_follow_prometheus_conventions` checks
//! a live scrape against these rules.
//!
//! Names here (all prefixed `altroute_`): `smtp_sessions_total`, `smtp_sessions_active`,
//! `smtp_sessions_refused_per_client_total`, `smtp_sessions_refused_outside_total`,
//! `smtp_auth_failures_total`,
//! `messages_accepted_total`, `messages_accepted_bytes_total`,
//! `recipients_rejected_total{reason}`, `messages_rejected_total{reason}`,
//! `spool_store_errors_total`, `spool_messages{state}`, `spool_recipients{state}`,
//! `spool_bytes`, `spool_oldest_message_age_seconds`, `spool_fsyncs_total{kind}`,
//! `spool_commit_batches_total`, `spool_corrupt_moved_total`, `policy_info{version}`,
//! `smtp_proxy_protocol_errors_total{reason}`.
//! Policy extensions register `extension_{decisions,faults,changes,floor_violations,
//! cooldowns,skips}_total{extension[,kind]}` (`crate::extensions::ExtensionMetrics`).

use std::sync::{Mutex, MutexGuard};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};

use altroute_queue::Spool;

/// One label pair set, e.g. `[("reason", "relay_denied")]`.
pub type Labels = Vec<(String, String)>;

/// The registry and the inbound side's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// SMTP sessions accepted since start.
    pub sessions: Counter,
    /// SMTP sessions in progress.
    pub sessions_active: Gauge,
    /// Connections refused with 421 because their client address had
    /// `server.max_sessions_per_client` sessions already.
    pub sessions_refused_per_client: Counter,
    /// Connections refused with 421 because clients outside `relay.allow_networks` held
    /// their share of the sessions (four fifths; the rest is kept for the relay's own).
    pub sessions_refused_outside: Counter,
    /// SMTP AUTH attempts whose credentials were wrong (each also logged at warn).
    pub auth_failures: Counter,
    /// Messages stored in the spool and answered with 250.
    pub accepted: Counter,
    /// Octets of accepted messages.
    pub accepted_bytes: Counter,
    /// Recipients refused, by reason (`relay_denied`, `bad_address`, `no_postmaster`).
    pub rcpt_rejected: Family<Labels, Counter>,
    /// Messages refused after DATA, by reason (`disk_full`, `store_error`).
    pub msg_rejected: Family<Labels, Counter>,
    /// Failed `Spool::store` calls.
    pub store_errors: Counter,
    /// Connections from a trusted proxy closed for want of a valid PROXY header, by
    /// reason (`invalid`, `timeout`, `closed`).
    pub proxy_protocol_errors: Family<Labels, Counter>,
    spool_messages: Family<Labels, Gauge>,
    spool_recipients: Family<Labels, Gauge>,
    spool_bytes: Gauge,
    spool_oldest_age: Gauge,
    spool_fsyncs: Family<Labels, Counter>,
    spool_batches: Counter,
    spool_corrupt: Counter,
    policy_info: Family<Labels, Gauge>,
    /// Serialises the refresh at scrape time (counters catch up by deltas) and holds the
    /// policy version last exported.
    observed: Mutex<String>,
    /// When the spool gauges were last refreshed: at most once a second, however often
    /// `/metrics` is scraped (a refresh walks every queued message under the spool's
    /// lock; an audit's scrape flood over 100,000 queued messages stalled SMTP).
    spool_observed: Mutex<Option<std::time::Instant>>,
}

/// The spool gauges are refreshed at most this often.
pub const SPOOL_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

fn labels(name: &str, value: &str) -> Labels {
    vec![(name.to_owned(), value.to_owned())]
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the inbound metrics registered.
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("altroute");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            sessions: Counter::default(),
            sessions_active: Gauge::default(),
            sessions_refused_per_client: Counter::default(),
            sessions_refused_outside: Counter::default(),
            auth_failures: Counter::default(),
            accepted: Counter::default(),
            accepted_bytes: Counter::default(),
            rcpt_rejected: Family::default(),
            msg_rejected: Family::default(),
            store_errors: Counter::default(),
            proxy_protocol_errors: Family::default(),
            spool_messages: Family::default(),
            spool_recipients: Family::default(),
            spool_bytes: Gauge::default(),
            spool_oldest_age: Gauge::default(),
            spool_fsyncs: Family::default(),
            spool_batches: Counter::default(),
            spool_corrupt: Counter::default(),
            policy_info: Family::default(),
            observed: Mutex::new(String::new()),
            spool_observed: Mutex::new(None),
        };
        r.register(
            "smtp_sessions",
            "SMTP sessions accepted",
            m.sessions.clone(),
        );
        r.register(
            "smtp_sessions_active",
            "SMTP sessions in progress",
            m.sessions_active.clone(),
        );
        r.register(
            "smtp_sessions_refused_per_client",
            "Connections refused (421) at server.max_sessions_per_client",
            m.sessions_refused_per_client.clone(),
        );
        r.register(
            "smtp_sessions_refused_outside",
            "Connections refused (421) because clients outside relay.allow_networks held their share of the sessions",
            m.sessions_refused_outside.clone(),
        );
        r.register(
            "smtp_auth_failures",
            "SMTP AUTH attempts with wrong credentials",
            m.auth_failures.clone(),
        );
        r.register(
            "messages_accepted",
            "Messages stored durably and acknowledged with 250",
            m.accepted.clone(),
        );
        r.register(
            "messages_accepted_bytes",
            "Octets of accepted messages",
            m.accepted_bytes.clone(),
        );
        r.register(
            "recipients_rejected",
            "Recipients refused, by reason",
            m.rcpt_rejected.clone(),
        );
        r.register(
            "messages_rejected",
            "Messages refused after DATA, by reason",
            m.msg_rejected.clone(),
        );
        r.register(
            "spool_store_errors",
            "Spool store failures (answered 4xx)",
            m.store_errors.clone(),
        );
        r.register(
            "smtp_proxy_protocol_errors",
            "Connections from a trusted proxy closed without a valid PROXY header, by reason",
            m.proxy_protocol_errors.clone(),
        );
        r.register(
            "spool_messages",
            "Messages in the spool, by state (queued, in_flight)",
            m.spool_messages.clone(),
        );
        r.register(
            "spool_recipients",
            "Recipients in the spool, by state",
            m.spool_recipients.clone(),
        );
        r.register(
            "spool_bytes",
            "Octets of messages in the spool",
            m.spool_bytes.clone(),
        );
        r.register(
            "spool_oldest_message_age_seconds",
            "Age of the oldest message in the spool (0 when empty)",
            m.spool_oldest_age.clone(),
        );
        r.register(
            "spool_fsyncs",
            "fsync calls of the spool, by kind (file, dir)",
            m.spool_fsyncs.clone(),
        );
        r.register(
            "spool_commit_batches",
            "Group commits of the spool (directory fsyncs shared by several operations)",
            m.spool_batches.clone(),
        );
        r.register(
            "spool_corrupt_moved",
            "Spool files moved to corrupt/ for the operator (unreadable at start, or corrupt at delivery)",
            m.spool_corrupt.clone(),
        );
        r.register(
            "policy_info",
            "The active policy version (value 1)",
            m.policy_info.clone(),
        );
        *m.lock() = r;
        m
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Registration and encoding leave the registry consistent even if a panic
        // interrupts them elsewhere, so a poisoned lock still guards valid data.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register another metric (name without the `altroute_` prefix; counters get `_total`
    /// appended by the encoder). Keep a clone of `metric` to update it.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.lock().register(name, help, metric);
    }

    /// Direct access to the registry, e.g. for sub-registries or collectors.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        f(&mut self.lock())
    }

    /// Count a connection from a trusted proxy closed without a valid PROXY header.
    pub fn proxy_protocol_error(&self, reason: &str) {
        self.proxy_protocol_errors
            .get_or_create(&labels("reason", reason))
            .inc();
    }

    /// Count a refused recipient.
    pub fn reject_rcpt(&self, reason: &str) {
        self.rcpt_rejected
            .get_or_create(&labels("reason", reason))
            .inc();
    }

    /// Count a refused message.
    pub fn reject_message(&self, reason: &str) {
        self.msg_rejected
            .get_or_create(&labels("reason", reason))
            .inc();
    }

    /// Copy the spool's statistics into the spool gauges and counters.
    pub fn observe_spool(&self, spool: &Spool) {
        let mut last = self
            .spool_observed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < SPOOL_REFRESH) {
            return;
        }
        *last = Some(std::time::Instant::now());
        let s = spool.stats();
        let set = |f: &Family<Labels, Gauge>, k: &str, v: &str, n: u64| {
            f.get_or_create(&labels(k, v)).set(gauge_value(n));
        };
        set(
            &self.spool_messages,
            "state",
            "queued",
            s.messages.saturating_sub(s.in_flight),
        );
        set(&self.spool_messages, "state", "in_flight", s.in_flight);
        for (state, n) in [
            ("pending", s.pending),
            ("deferred", s.deferred),
            ("delivered", s.delivered),
            ("bounced", s.bounced),
            ("expired", s.expired),
        ] {
            set(&self.spool_recipients, "state", state, n);
        }
        self.spool_bytes.set(gauge_value(s.bytes));
        let now = spool.clock().now();
        self.spool_oldest_age.set(gauge_value(
            s.oldest_received_at.map_or(0, |t| now.saturating_sub(t)),
        ));
        // The spool counts since it was opened, as the relay does: counters catch up by
        // the difference (never backwards).
        let catch_up = |c: &Counter, total: u64| {
            let seen = c.get();
            if total > seen {
                c.inc_by(total - seen);
            }
        };
        catch_up(
            &self.spool_fsyncs.get_or_create(&labels("kind", "file")),
            s.file_fsyncs,
        );
        catch_up(
            &self.spool_fsyncs.get_or_create(&labels("kind", "dir")),
            s.dir_fsyncs,
        );
        catch_up(&self.spool_batches, s.commit_batches);
        catch_up(&self.spool_corrupt, s.corrupt_moved);
    }

    /// Export the active policy version as `altroute_policy_info{version} 1` (the
    /// previous version's series is removed).
    pub fn observe_policy_version(&self, version: &str) {
        let mut last = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        if *last != version {
            if !last.is_empty() {
                self.policy_info.remove(&labels("version", &last));
            }
            *last = version.to_string();
        }
        self.policy_info
            .get_or_create(&labels("version", version))
            .set(1);
    }

    /// The Prometheus text exposition, spool gauges refreshed first when a spool is given.
    pub fn encode(&self, spool: Option<&Spool>) -> String {
        if let Some(spool) = spool {
            self.observe_spool(spool);
        }
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a metric.
        if let Err(e) = encode(&mut out, &self.lock()) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn exposition_names() {
        let m = Metrics::new();
        m.accepted.inc();
        m.reject_rcpt("relay_denied");
        let extra = Counter::<u64>::default();
        m.register("test_extra", "test", extra.clone());
        extra.inc();
        let text = m.encode(None);
        assert!(
            text.contains("altroute_messages_accepted_total 1"),
            "{text}"
        );
        assert!(
            text.contains("altroute_recipients_rejected_total{reason=\"relay_denied\"} 1"),
            "{text}"
        );
        assert!(text.contains("altroute_test_extra_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// The spool gauges are taken from the spool at most once per [`SPOOL_REFRESH`]: a
    /// scrape inside the interval shows the last figures, one after it the spool's. The
    /// time of the last look is set by hand, so the test does not depend on timing.
    #[test]
    fn spool_gauges_are_refreshed_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(
            dir.path(),
            altroute_queue::SpoolConfig::default(),
            std::sync::Arc::new(altroute_queue::SystemClock),
        )
        .unwrap();
        let m = Metrics::new();
        let queued = "altroute_spool_messages{state=\"queued\"}";
        assert!(m.encode(Some(&spool)).contains(&format!("{queued} 0")));

        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime
            .block_on(spool.store(
                altroute_queue::Envelope::new("a@x.example", vec!["b@y.example".into()]),
                b"Subject: t\r\n\r\nbody\r\n".to_vec(),
            ))
            .unwrap();
        // Looked at "now" (an instant in the future stands for "just now", whatever the
        // load): the stored message is not seen yet.
        *m.spool_observed.lock().unwrap() =
            Some(std::time::Instant::now() + std::time::Duration::from_secs(3600));
        assert!(m.encode(Some(&spool)).contains(&format!("{queued} 0")));
        // The last look one interval ago: the spool is read again.
        *m.spool_observed.lock().unwrap() = std::time::Instant::now().checked_sub(SPOOL_REFRESH);
        let text = m.encode(Some(&spool));
        assert!(text.contains(&format!("{queued} 1")), "{text}");
        assert!(
            text.contains("altroute_spool_recipients{state=\"pending\"} 1"),
            "{text}"
        );
    }
}
