//! The admin HTTP endpoint (HTTP/1.1 on hyper, localhost by default).
//!
//! | Request | Answer |
//! |---|---|
//! | `GET /health` | `200 ok` while serving |
//! | `GET /metrics` | Prometheus text exposition of [`Metrics`] (spool gauges refreshed) |
//! | `GET /policy` | the active policy version, as JSON `{"version": "..."}` |
//!
//! Anything else is `404`; other methods on these paths `405`. Only read-only calls exist
//! here, so `admin.token` is not asked for yet.

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
                async move { Ok::<_, Infallible>(handle(&state, req, peer)) }
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
