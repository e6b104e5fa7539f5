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
//!
//! Anything else is `404`; other methods on these paths `405`. State changes need
//! `Authorization: Bearer <admin.token>` (`401` without it, `403` when no token is
//! configured); `x-altroute-who` names the admin for the audit log. The policy endpoints
//! are answered by [`crate::reload::handle_api`] (see docs/reload.md).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use altroute_queue::Spool;

use crate::metrics::Metrics;
use crate::reload::{ApiRequest, Reloader, handle_api, is_api_path};

/// Largest request body (a candidate policy): 4 MiB.
const MAX_BODY: usize = 4 << 20;

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
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("policy_version", &(self.policy_version)())
            .finish_non_exhaustive()
    }
}

/// Serve the admin endpoint on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req, peer).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, %peer, "admin connection ended with an error");
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
    let (authorization, who) = (header("authorization"), header("x-altroute-who"));
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    let body = match http_body_util::BodyExt::collect(limited).await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "application/json",
                serde_json::json!({ "error": format!("request body: {e}") }).to_string() + "\n",
            );
        }
    };
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
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(Some(&state.spool)),
        ),
        _ => {
            let version = (state.policy_version)();
            let body = serde_json::json!({ "version": version }).to_string() + "\n";
            text(StatusCode::OK, "application/json", body)
        }
    }
}
