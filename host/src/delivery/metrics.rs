//! Delivery metrics (prometheus-client). [`DeliveryMetrics::register`] adds them to the
//! relay's registry so that `GET /metrics` shows them with the rest.
//!
//! Recipient outcomes share one naming scheme with the inbound side
//! (`altroute_recipients_<outcome>_total`); labels are `phase`, `route` and `result`
//! (TLS-RPT result types), all with a handful of values. See docs/operations.md.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Label pairs, e.g. `[("route", "alternate"), ("result", "starttls-not-supported")]`.
pub type Labels = Vec<(String, String)>;

/// Counters of the delivery engine. Cheap to clone (shared counters).
#[derive(Debug, Clone, Default)]
pub struct DeliveryMetrics {
    /// `altroute_decisions_total{phase,route,result}`.
    pub decisions: Family<Labels, Counter>,
    /// `altroute_tls_results_total{result}`: what was observed on each connection.
    pub tls_results: Family<Labels, Counter>,
    /// `altroute_recipients_delivered_total{route}`: recipients accepted by the next hop.
    pub deliveries: Family<Labels, Counter>,
    /// `altroute_recipients_deferred_total`: recipient attempts that failed temporarily.
    pub deferrals: Counter,
    /// `altroute_recipients_bounced_total`: recipients that failed for good.
    pub bounces: Counter,
    /// `altroute_recipients_expired_total`: recipients whose queue lifetime ran out.
    pub expirations: Counter,
    /// `altroute_dsn_messages_total`: delivery status notifications queued.
    pub dsns: Counter,
    /// `altroute_policy_faults_total`: decisions that failed in the module (deferred).
    pub policy_faults: Counter,
    /// `altroute_safety_floor_violations_total`: a verdict that would have sent mail
    /// requiring TLS over a connection that does not meet it (deferred instead).
    pub safety_floor_violations: Counter,
    /// `altroute_connection_failures_total`.
    pub connection_failures: Counter,
    /// `altroute_delivery_results_unrecorded_total`: recipient results (delivered,
    /// deferred, bounced, expired) that could not be written to the spool; the message
    /// is held back for a retry interval instead of being attempted again at once.
    pub unrecorded: Counter,
}

impl DeliveryMetrics {
    /// New counters, not registered anywhere.
    pub fn new() -> Self {
        DeliveryMetrics::default()
    }

    /// Registers every counter in `registry`, which is expected to carry the `altroute`
    /// prefix (as the relay's does): names become `altroute_<name>_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "decisions",
            "Routing decisions by phase, route and result type",
            self.decisions.clone(),
        );
        registry.register(
            "tls_results",
            "TLS results observed on outbound connections",
            self.tls_results.clone(),
        );
        registry.register(
            "recipients_delivered",
            "Recipients accepted by the next hop, by route",
            self.deliveries.clone(),
        );
        registry.register(
            "recipients_deferred",
            "Recipient delivery attempts that failed temporarily (retried later)",
            self.deferrals.clone(),
        );
        registry.register(
            "recipients_bounced",
            "Recipients that failed permanently (DSN to the sender)",
            self.bounces.clone(),
        );
        registry.register(
            "recipients_expired",
            "Recipients whose queue lifetime ran out",
            self.expirations.clone(),
        );
        registry.register(
            "dsn_messages",
            "Delivery status notifications queued to senders",
            self.dsns.clone(),
        );
        registry.register(
            "policy_faults",
            "Policy module failures (trap, deadline, bad decision); each deferred",
            self.policy_faults.clone(),
        );
        registry.register(
            "safety_floor_violations",
            "Verdicts refused by the relay's TLS safety floor",
            self.safety_floor_violations.clone(),
        );
        registry.register(
            "connection_failures",
            "Outbound connection attempts that failed",
            self.connection_failures.clone(),
        );
        registry.register(
            "delivery_results_unrecorded",
            "Recipient delivery results that could not be written to the spool",
            self.unrecorded.clone(),
        );
    }

    pub(crate) fn decision(&self, phase: &str, route: &str, result: &str) {
        self.decisions
            .get_or_create(&vec![
                ("phase".to_string(), phase.to_string()),
                ("route".to_string(), route.to_string()),
                ("result".to_string(), result.to_string()),
            ])
            .inc();
    }

    pub(crate) fn tls_result(&self, result: &str) {
        self.tls_results
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .inc();
    }

    pub(crate) fn delivered(&self, route: &str) {
        self.deliveries
            .get_or_create(&vec![("route".to_string(), route.to_string())])
            .inc();
    }

    /// Current value of a labelled counter (tests, the demo).
    pub fn count(family: &Family<Labels, Counter>, labels: &[(&str, &str)]) -> u64 {
        let key: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        family.get_or_create(&key).get()
    }
}
