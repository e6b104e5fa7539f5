//! The HTTP face: one request = one routing question.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use policy::contract;
use policy::{Decision, Phase, Policy, Query, Route, decide_into};

use crate::raw::HeaderBlock;
use crate::{CONTINUE, Metrics, decision_headers, log};

/// What each routing question reuses (the module is single-threaded): after the first
/// plan and the first verdict, deciding allocates nothing (each allocation is a call into
/// the module's allocator; BENCHMARKS.md, decision latency).
struct Scratch {
    /// Where decision header values are encoded.
    buf: String,
    /// The facts, decoded over the last question's.
    query: Query,
    /// The decision, one per phase: a plan and a verdict usually differ in shape (a verdict
    /// names a host), so each keeps the room its own kind needs.
    decisions: [Decision; 2],
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch {
        buf: String::new(),
        query: Query::default(),
        decisions: [Decision::fault("", ""), Decision::fault("", "")],
    });
}

pub(crate) struct Request {
    policy: Option<Rc<Policy>>,
    metrics: Metrics,
}

impl Request {
    pub(crate) fn new(policy: Option<Rc<Policy>>, metrics: Metrics) -> Self {
        Request { policy, metrics }
    }

    /// Decide from the request's headers, read in one host call and indexed once; the
    /// facts are decoded over `query` and the decision written over one of `decisions`.
    fn decide<'s>(
        &self,
        index: Option<&contract::Index<'_, &[u8], &[u8]>>,
        query: &mut Query,
        decisions: &'s mut [Decision; 2],
    ) -> &'s Decision {
        let [first, second] = decisions;
        let Some(policy) = &self.policy else {
            *first = Decision::fault("none", "no policy is configured");
            return first;
        };
        let Some(index) = index else {
            *first = Decision::fault(&policy.version, "the request headers could not be read");
            return first;
        };
        match contract::decode_query_into(index, query) {
            Ok(()) => {
                let out = if query.phase == Phase::Verdict {
                    second
                } else {
                    first
                };
                decide_into(policy, query, out);
                out
            }
            Err(e) => {
                *first = Decision::fault(&policy.version, &e.to_string());
                first
            }
        }
    }

    /// Set `decision` on the request (and answer a defer or bounce with a local response).
    fn answer(
        &self,
        index: Option<&contract::Index<'_, &[u8], &[u8]>>,
        decision: &Decision,
        buf: &mut String,
    ) -> Action {
        self.metrics.count(decision);
        // A decision comes only from here: drop whatever the request brought (the index
        // knows which decision headers it has: no second pass over the names).
        let present = index
            .into_iter()
            .flat_map(contract::Index::decision_headers);
        for name in present {
            if let Err(e) = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name) {
                log(
                    proxy_wasm::types::LogLevel::Warn,
                    &format!("removing {name} failed: {e:?}"),
                );
            }
        }
        // With the request's decision headers known and removed above, each header is
        // added (the host appends it, Envoy's `addCopy`); without that knowledge (headers
        // unreadable) each one replaces whatever the request may have had.
        let known = index.is_some();
        // One scratch buffer for every value, kept across requests: no allocation here.
        contract::for_each_decision_header(decision, buf, |name, value| {
            let set = if known {
                hostcalls::add_map_value(MapType::HttpRequestHeaders, name, value)
            } else {
                hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value))
            };
            if let Err(e) = set {
                log(
                    proxy_wasm::types::LogLevel::Error,
                    &format!("setting {name} failed: {e:?}"),
                );
            }
        });
        // Envoy picks the route before filters run; it re-routes on the new headers only
        // after this. Hosts without it answer NOT_FOUND, which is fine.
        let _ = hostcalls::call_foreign_function("clear_route_cache", None);

        if matches!(decision.route, Route::Defer | Route::Bounce) {
            let status = if decision.route == Route::Defer {
                contract::DEFER_STATUS
            } else {
                contract::BOUNCE_STATUS
            };
            let headers = decision_headers(decision);
            let body = decision.reply.clone().unwrap_or_default();
            let response_headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            match hostcalls::send_http_response(status, response_headers, Some(body.as_bytes())) {
                Ok(()) => return Action::Pause,
                Err(e) => log(
                    proxy_wasm::types::LogLevel::Error,
                    &format!("sending the local response failed: {e:?}"),
                ),
            }
        }
        CONTINUE
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // One host call for every header: facts in, and which decision headers to drop.
        let block = HeaderBlock::request();
        let pairs = block.as_ref().and_then(HeaderBlock::pairs);
        let index = pairs.as_deref().map(contract::lookup);
        SCRATCH.with_borrow_mut(|scratch| {
            let Scratch {
                buf,
                query,
                decisions,
            } = scratch;
            let decision = self.decide(index.as_ref(), query, decisions);
            self.answer(index.as_ref(), decision, buf)
        })
    }
}
