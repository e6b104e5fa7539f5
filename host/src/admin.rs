//! The admin HTTP endpoint (HTTP/1.1 on hyper, localhost by default).
//!
//! | Request | Answer |
//! |---|---|
//! | `GET /health` | `200 ok` while serving |
//! | `GET /metrics` | Prometheus text exposition of [`Metrics`] (spool gauges refreshed) |
//! | `GET /policy` | the policy status as JSON: `version` (active), `active`, `history`, `last_rejection`, `shadow`, `audit` |
//! | `POST /policy` | activate the candidate in the body (TOML or compiled JSON); token |
//! | `POST /policy/rollback` | back to the previous version; token |
//! | `POST /policy/shadow` | run the candidate in the body in shadow mode; token |
//! | `DELETE /policy/shadow` | stop shadow mode; token |
//! | `GET /queue` | every queued message (summary) as JSON; token if one is set |
//! | `GET /queue/ID` | one message with each recipient's state; token if one is set |
//! | `POST /queue/ID/retry` | make its deferred recipients due now; token |
//! | `POST /queue/retry` | the same for every message; token |
//! | `POST /queue/ID/bounce` | bounce its open recipients, DSN to the sender; token |
//!
//! Anything else is `404`; other methods on these paths `405`. State changes need
//! `Authorization: Bearer <admin.token>` (`401` without it, `403` when no token is
//! configured); `x-altroute-who` names the admin for the audit log. The policy endpoints
//! are answered by [`crate::reload::handle_api`] (see docs/reload.md). Reading the queue
//! shows addresses, so it needs the token too when one is configured (without one the
//! endpoint is on loopback: the configuration refuses anything else). Queue answers are
//! JSON; an unknown id is `404`, a malformed one `400`, a message being delivered right
//! now `409` (for bounce). See docs/operations.md for the fields.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use altroute_queue::{MessageId, QueueEntry, RecipientState, Selector, Spool};

use crate::metrics::Metrics;
use crate::reload::{ApiRequest, Reloader, handle_api, is_api_path};

/// Largest request body (a candidate policy): 64 MiB, room for the largest policies
/// docs/policy.md speaks of (10 MB of compiled JSON) several times over.
const MAX_BODY: usize = 64 << 20;

/// Reports the active policy version (the policy engine's, or the compiled file's).
pub type PolicyVersion = Arc<dyn Fn() -> String + Send + Sync>;

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    /// The shared metrics.
    pub metrics: Arc<Metrics>,
    /// The spool, for queue gauges.
    pub spool: Spool,
    /// The active policy version.
    pub policy_version: PolicyVersion,
    /// The policy reloader; `None`: `GET /policy` reports only the version and changes
    /// are not offered.
    pub reloader: Option<Arc<Reloader>>,
    /// `admin.token`: bearer token for state-changing calls.
    pub token: Option<String>,
    /// `server.hostname`: the reporting MTA of DSNs made by `POST /queue/ID/bounce`.
    pub hostname: String,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("policy_version", &(self.policy_version)())
            .finish_non_exhaustive()
    }
}

/// One queue listing at a time (`GET /queue`): each walks and writes out the whole queue.
static QUEUE_LISTING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// At most this many admin connections at once; more are closed as they come (an audit
/// held 20,000 and starved the SMTP port of file descriptors).
pub const MAX_CONNECTIONS: usize = 64;

/// A client has this long to send a request's headers, and, on a connection kept
/// alive, to start the next request (an audit held header-less connections open for
/// good).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body (a candidate policy) must arrive within this time.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest an admin connection lives, whatever it does: a client that pipelines
/// requests and never reads the answers once held its connection (and its slot) with
/// no timeout at all.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// Serve the admin endpoint on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::from_millis(10);
    let mut last_full_warning: Option<std::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: wait instead of spinning (an audit's flood
                    // logged 686,000 warnings in 45 s).
                    tracing::warn!(error = %e, retry_in = ?backoff, "admin accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(10);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if last_full_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                tracing::warn!(%peer, "admin endpoint full ({MAX_CONNECTIONS} connections): refusing connections (logged once a minute)");
                last_full_warning = Some(std::time::Instant::now());
            }
            drop(stream);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req, peer).await) }
            });
            let connection = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, %peer, "admin connection ended with an error");
                }
                Err(_) => tracing::debug!(%peer, "admin connection closed at its lifetime"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// The policy endpoints go to the reloader (on a blocking thread: a candidate compiles);
/// the rest to [`handle`].
async fn route(
    state: &AdminState,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/queue" || req.uri().path().starts_with("/queue/") {
        return handle_queue(state, req, peer).await;
    }
    let Some(reloader) = state.reloader.clone() else {
        return handle(state, req, peer);
    };
    if !is_api_path(req.uri().path()) {
        return handle(state, req, peer);
    }
    let (parts, body) = req.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    // The admin's name may be any UTF-8 (`jörg`): `to_str` takes visible ASCII only, and
    // an audit's non-ASCII name was recorded as `admin:anonymous`.
    let who = parts
        .headers
        .get("x-altroute-who")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let authorization = header("authorization");
    // A change is refused before its body is read: an audit's unauthenticated clients
    // made the relay hold 1.3 GB of unfinished bodies.
    if parts.method != Method::GET
        && let Err((status, error)) =
            crate::reload::authorize(state.token.as_deref(), authorization.as_deref())
    {
        let body = serde_json::json!({ "error": error }).to_string() + "\n";
        return text(
            StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED),
            "application/json",
            body,
        );
    }
    // Only POST takes a body, and only after authorization: an audit's unauthenticated
    // GETs with 63 MiB bodies took the relay to 4 GB.
    let body = if parts.method == Method::POST {
        Some(body)
    } else {
        let declared = header("content-length").is_some_and(|v| v.trim() != "0")
            || parts.headers.contains_key(hyper::header::TRANSFER_ENCODING);
        if declared {
            return text(
                StatusCode::BAD_REQUEST,
                "application/json",
                serde_json::json!({ "error": format!("{} takes no request body", parts.method) })
                    .to_string()
                    + "\n",
            );
        }
        drop(body);
        None
    };
    let too_large = || {
        let error = format!(
            "request body larger than {} MiB, the admin API's limit",
            MAX_BODY >> 20
        );
        let body = serde_json::json!({ "error": error }).to_string() + "\n";
        text(StatusCode::PAYLOAD_TOO_LARGE, "application/json", body)
    };
    // Refused before reading it when the length is declared.
    if header("content-length")
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY as u64)
    {
        return too_large();
    }
    let Some(body) = body else {
        return answer_api(
            state,
            reloader,
            parts,
            authorization,
            who,
            Bytes::new(),
            peer,
        )
        .await;
    };
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    let collected =
        tokio::time::timeout(BODY_TIMEOUT, http_body_util::BodyExt::collect(limited)).await;
    let body = match collected {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Err(_) => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                "application/json",
                serde_json::json!({ "error": format!("request body not received within {} s", BODY_TIMEOUT.as_secs()) }).to_string() + "\n",
            );
        }
        Ok(Err(e)) => {
            return text(
                StatusCode::BAD_REQUEST,
                "application/json",
                serde_json::json!({ "error": format!("request body: {e}") }).to_string() + "\n",
            );
        }
    };
    answer_api(state, reloader, parts, authorization, who, body, peer).await
}

/// Answers a policy API request (`handle_api`, on a blocking thread: a candidate
/// compiles) with its body read.
async fn answer_api(
    state: &AdminState,
    reloader: Arc<Reloader>,
    parts: hyper::http::request::Parts,
    authorization: Option<String>,
    who: Option<String>,
    body: Bytes,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let (method, path) = (parts.method.to_string(), parts.uri.path().to_string());
    let token = state.token.clone();
    tracing::debug!(%peer, %method, %path, "admin policy request");
    let answer = tokio::task::spawn_blocking(move || {
        handle_api(
            &reloader,
            token.as_deref(),
            ApiRequest {
                method: &method,
                path: &path,
                authorization: authorization.as_deref(),
                who: who.as_deref(),
                body: &body,
            },
        )
    })
    .await;
    match answer {
        Ok(a) => text(
            StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "application/json",
            a.body,
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "application/json",
            serde_json::json!({ "error": format!("reload task failed: {e}") }).to_string() + "\n",
        ),
    }
}

fn handle(state: &AdminState, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(path, "/health" | "/metrics" | "/policy");
    if !known {
        return text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    tracing::trace!(%peer, path, "admin request");
    match path {
        "/health" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/metrics" => {
            state
                .metrics
                .observe_policy_version(&(state.policy_version)());
            // The spool gauges refresh at most once a second (`metrics::SPOOL_REFRESH`).
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.encode(Some(&state.spool)),
            )
        }
        _ => {
            let version = (state.policy_version)();
            let body = serde_json::json!({ "version": version }).to_string() + "\n";
            text(StatusCode::OK, "application/json", body)
        }
    }
}

// ---------------------------------------------------------------------------------------
// The queue endpoints (`altroute queue list | show | retry | bounce`)

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    text(status, "application/json", value.to_string() + "\n")
}

fn json_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

/// One recipient as the queue endpoints show it.
fn recipient_json(address: &str, state: &RecipientState) -> serde_json::Value {
    let (next_attempt, last_error, at, via) = match state {
        RecipientState::Deferred {
            next_attempt,
            reason,
            ..
        } => (Some(*next_attempt), Some(reason.as_str()), None, None),
        RecipientState::Delivered { at, via } => (None, None, Some(*at), Some(via.as_str())),
        RecipientState::Bounced { at, reason } | RecipientState::Expired { at, reason, .. } => {
            (None, Some(reason.as_str()), Some(*at), None)
        }
        _ => (None, None, None, None),
    };
    serde_json::json!({
        "address": address,
        "state": state.name(),
        "attempts": state.attempts(),
        "next_attempt": next_attempt,
        "last_error": last_error,
        "final_at": at,
        "via": via,
    })
}

/// The summary of one message (`GET /queue`), plus `recipients` in detail for
/// `GET /queue/ID`. Times are Unix seconds.
fn entry_json(spool: &Spool, entry: &QueueEntry, detail: bool) -> serde_json::Value {
    let open: Vec<&RecipientState> = entry.recipients.iter().filter(|s| !s.is_final()).collect();
    // The message's state: the least advanced of its recipients.
    let state = if open.iter().any(|s| matches!(s, RecipientState::Pending)) {
        "pending"
    } else if !open.is_empty() {
        "deferred"
    } else {
        "finished"
    };
    let last_error = entry.recipients.iter().rev().find_map(|s| match s {
        RecipientState::Deferred { reason, .. }
        | RecipientState::Bounced { reason, .. }
        | RecipientState::Expired { reason, .. } => Some(reason.as_str()),
        _ => None,
    });
    let mut v = serde_json::json!({
        "id": entry.id.as_str(),
        "sender": entry.envelope.mail_from,
        "recipients": entry.recipients.len(),
        "open_recipients": open.len(),
        "size": entry.size,
        "message_id": entry.message_id,
        "received_at": entry.envelope.received_at,
        "expires_at": entry.expires_at,
        "state": state,
        "in_flight": spool.is_in_flight(&entry.id),
        "attempts": entry.recipients.iter().map(RecipientState::attempts).max().unwrap_or(0),
        "next_attempt": entry.next_due(),
        "last_error": last_error,
        "requiretls": entry.envelope.requiretls,
    });
    if detail && let serde_json::Value::Object(map) = &mut v {
        let list: Vec<serde_json::Value> = entry
            .envelope
            .rcpt_to
            .iter()
            .zip(&entry.recipients)
            .map(|(a, s)| recipient_json(a, s))
            .collect();
        map.insert("recipients".into(), serde_json::Value::Array(list));
        map.insert(
            "received_from".into(),
            serde_json::json!(entry.envelope.received_from),
        );
    }
    v
}

fn queue_error(e: &altroute_queue::Error) -> Response<Full<Bytes>> {
    let status = match e {
        altroute_queue::Error::NotFound(_) => StatusCode::NOT_FOUND,
        altroute_queue::Error::InvalidId(_) => StatusCode::BAD_REQUEST,
        altroute_queue::Error::InFlight(_) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_error(status, &e.to_string())
}

/// `GET /queue`, `GET /queue/ID`, `POST /queue/retry`, `POST /queue/ID/retry`,
/// `POST /queue/ID/bounce` (see the module docs).
async fn handle_queue(
    state: &AdminState,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path
        .strip_prefix("/queue")
        .unwrap_or_default()
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    // (id, action): [] list, [id] show, ["retry"] retry all, [id, action].
    let (id, action) = match parts.as_slice() {
        [] => (None, None),
        ["retry"] => (None, Some("retry")),
        [id] => (Some(*id), None),
        [id, action @ ("retry" | "bounce")] => (Some(*id), Some(*action)),
        _ => return json_error(StatusCode::NOT_FOUND, "not found"),
    };
    let write = action.is_some();
    let expected_method = if write { Method::POST } else { Method::GET };
    if method != expected_method {
        return json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::reload::bearer_token);
    match (&state.token, write) {
        (None, true) => {
            return json_error(
                StatusCode::FORBIDDEN,
                "queue changes through the admin API are disabled: set [admin].token",
            );
        }
        (Some(expected), _)
            if !authorization.is_some_and(|g| crate::reload::same_secret(g, expected)) =>
        {
            return json_error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        }
        _ => {}
    }
    let who = req.headers().get("x-altroute-who").map_or_else(
        || "-".to_string(),
        |v| String::from_utf8_lossy(v.as_bytes()).into_owned(),
    );
    let spool = &state.spool;
    let id = match id.map(MessageId::parse).transpose() {
        Ok(id) => id,
        Err(e) => return queue_error(&e),
    };
    if write {
        tracing::info!(%peer, %who, %method, %path, "admin queue request");
    } else {
        tracing::debug!(%peer, %method, %path, "admin queue request");
    }
    match (id, action) {
        (None, None) => {
            // The whole queue, listed and written out one request at a time, off the
            // runtime's worker threads: an audit's 64 concurrent listings of 40,000
            // messages held the SMTP port's sessions for 39 s (and took 1 GB).
            let Ok(turn) = QUEUE_LISTING.acquire().await else {
                return json_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
            };
            let spool = spool.clone();
            // The turn goes with the listing: a client that hangs up does not end it, and
            // its turn must not pass to the next request before it ends.
            let listed = tokio::task::spawn_blocking(move || {
                let _turn = turn;
                let now = spool.clock().now();
                let list: Vec<serde_json::Value> = spool
                    .list()
                    .iter()
                    .map(|e| entry_json(&spool, e, false))
                    .collect();
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "now": now, "count": list.len(), "messages": list }),
                )
            })
            .await;
            match listed {
                Ok(response) => response,
                Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        (Some(id), None) => match spool.entry(&id) {
            Some(e) => json(StatusCode::OK, &entry_json(spool, &e, true)),
            None => queue_error(&altroute_queue::Error::NotFound(id)),
        },
        (None, Some(_)) => match spool.retry_now(&Selector::All).await {
            Ok(n) => json(StatusCode::OK, &serde_json::json!({ "retried": n })),
            Err(e) => queue_error(&e),
        },
        (Some(id), Some("retry")) => match spool.retry_now(&Selector::One(id.clone())).await {
            Ok(n) => {
                tracing::info!(queue_id = %id, recipients = n, %who, "retry requested by the operator");
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "id": id.as_str(), "retried": n }),
                )
            }
            Err(e) => queue_error(&e),
        },
        (Some(id), Some(_)) => {
            // The reason goes to the sender (the DSN) and so, perhaps, outside: it does
            // not name the operator, the log line below does.
            let reason = "550 5.0.0 bounced by the mail system administrator";
            match crate::delivery::operator_bounce(spool, &state.hostname, &id, reason).await {
                Ok(report) => {
                    tracing::info!(queue_id = %id, %who, "bounce requested by the operator");
                    let mut v = serde_json::to_value(&report).unwrap_or_default();
                    if let serde_json::Value::Object(map) = &mut v {
                        map.insert("id".into(), serde_json::json!(id.as_str()));
                    }
                    json(StatusCode::OK, &v)
                }
                Err(e) => queue_error(&e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client that pipelines requests and never reads the answers blocks the endpoint's
    /// writes, where no read timeout applies: the connection is closed at its lifetime,
    /// not held for good. Time is paused (tokio's test clock), so the two minutes pass
    /// as soon as nothing else is left to run.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_is_closed_at_the_connection_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(
            dir.path(),
            altroute_queue::SpoolConfig::default(),
            Arc::new(altroute_queue::SystemClock),
        )
        .unwrap();
        let state = AdminState {
            metrics: Arc::new(Metrics::new()),
            spool,
            policy_version: Arc::new(|| "v1".to_string()),
            reloader: None,
            token: None,
            hostname: "relay.test".into(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, async {
            let _ = stopped.await;
        }));

        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let client = socket.connect(addr).await.unwrap();
        let (mut reader, mut writer) = client.into_split();
        let start = tokio::time::Instant::now();
        // Requests until the endpoint stops reading them (its answers fill the buffers).
        let flood = tokio::spawn(async move {
            let request = b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n".repeat(64);
            while writer.write_all(&request).await.is_ok() {}
        });
        // Nothing read for longer than any read timeout of the endpoint.
        tokio::time::sleep(HEADER_TIMEOUT + BODY_TIMEOUT).await;
        // Then the answers are read to the end: the endpoint has closed the connection
        // by then, at its lifetime.
        let mut sink = vec![0u8; 1 << 16];
        let closed = tokio::time::timeout(CONNECTION_LIFETIME * 2, async {
            loop {
                match reader.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the connection outlived twice its lifetime");
        assert!(
            start.elapsed() >= CONNECTION_LIFETIME,
            "closed after {:?}, before its lifetime: by something else",
            start.elapsed()
        );
        flood.abort();
        let _ = stop.send(());
        server.await.unwrap();
    }
}
