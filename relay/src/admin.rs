//! The admin listener (`relay.admin_listen`, loopback by default, never the
//! aggregate port): health and readiness now; metrics, the status page and
//! event publishing hang off the same router. Low traffic, so it is served
//! with hyper rather than the relay's own HTTP/1 path.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{status, Shared};

/// The response type of every admin endpoint.
pub type AdminResponse = Response<Full<Bytes>>;

/// Serves the admin listener until the relay stops.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, &shared).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(client = %peer, error = %e, "admin connection ended");
            }
        });
    }
}

/// Dispatches one admin request.
async fn route(req: Request<Incoming>, shared: &Shared) -> AdminResponse {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") | (&Method::GET, "/readyz") => health(shared),
        (&Method::GET, "/metrics") => {
            let mut resp = text(StatusCode::OK, shared.metrics.encode());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        (&Method::GET, "/status") => {
            let mut resp = text(StatusCode::OK, status::render(shared));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
        (&Method::POST, "/reload") => match shared.reload() {
            Ok(()) => text(StatusCode::OK, "reloaded\n"),
            Err(e) => text(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("reload refused: {e}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "404 Not Found: no such admin endpoint\n",
        ),
    }
}

/// `200 ok` while serving; `503 draining` once shutdown has begun.
fn health(shared: &Shared) -> AdminResponse {
    if shared.shutdown.is_cancelled() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        text(StatusCode::OK, "ok\n")
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
