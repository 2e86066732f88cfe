//! The admin listener (`relay.admin_listen`, loopback by default, never the
//! aggregate port): health and readiness, event publishing (`POST
//! /events/{topic}`) and a topic's poller count (`GET /events/{topic}`);
//! metrics and the status page hang off the same router. Every `GET`
//! endpoint also answers `HEAD`; a wrong method gets `405` with `Allow`. Low traffic, so it
//! is served with hyper rather than the relay's own HTTP/1 path.
//!
//! Nothing here authenticates: the listener belongs on loopback (a warning
//! at start says so when it is not). Requests from web pages (with
//! `Origin`) are refused, so a page a browser on the same host visits cannot
//! reload or publish; request heads get `limits.head_timeout`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::error::{ErrorKind, RelayError};
use crate::listener::AcceptBackoff;
use crate::{status, Shared};

/// The response type of every admin endpoint.
pub type AdminResponse = Response<Full<Bytes>>;

/// Serves the admin listener until the relay stops.
///
/// Each connection gets `limits.head_timeout` (as configured when it opens)
/// for every request head, counted from when the connection waits for it:
/// a half-sent head, or an idle keep-alive connection, is closed then. A
/// failing `accept` backs off as the aggregate port's does.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    if let Ok(addr) = listener.local_addr() {
        if let Some(warning) = exposure_warning(addr) {
            tracing::warn!(admin = %addr, "{warning}");
        }
    }
    let mut backoff = AcceptBackoff::new("admin");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => {
                backoff.accepted();
                a
            }
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        let head_timeout = shared.config().limits.head_timeout;
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, &shared).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(client = %peer, error = %e, "admin connection ended");
            }
        });
    }
}

/// The warning for an admin listener bound to `addr` when it is reachable
/// from other hosts (any address but loopback): nothing on it asks who is
/// calling.
fn exposure_warning(addr: SocketAddr) -> Option<String> {
    if addr.ip().to_canonical().is_loopback() {
        return None;
    }
    Some(format!(
        "relay.admin_listen {addr} is not a loopback address: anyone who can reach it can \
         reload the configuration (POST /reload) and publish events (POST /events/...) \
         without authentication, and read metrics and the status page; keep it on \
         127.0.0.1 or firewall it"
    ))
}

/// The answer to an admin request from a web page: a browser sends `Origin`
/// with every cross-origin request and every `POST` (even a same-origin one,
/// as after DNS rebinding); curl, scripts and internal servers do not. A
/// page could otherwise make a visitor's browser reload the relay or
/// publish events (a cross-origin `text/plain` `POST` needs no preflight).
fn refuse_from_web_page(req: &Request<Incoming>) -> Option<AdminResponse> {
    let origin = req.headers().get(http::header::ORIGIN)?;
    tracing::warn!(
        ?origin,
        method = %req.method(),
        path = req.uri().path(),
        "admin request from a web page refused"
    );
    Some(text(
        StatusCode::FORBIDDEN,
        "403 Forbidden: admin requests from web pages are refused (the request carries Origin)\n",
    ))
}

/// The methods an admin endpoint takes, for `Allow` (`HEAD` wherever `GET`
/// is, RFC 9110 section 9.3.2); `None` for a path that is no endpoint.
fn allowed(path: &str) -> Option<&'static str> {
    match path {
        "/healthz" | "/readyz" | "/metrics" | "/status" => Some("GET, HEAD"),
        "/reload" => Some("POST"),
        p if p.starts_with("/events/") => Some("GET, HEAD, POST"),
        _ => None,
    }
}

/// Dispatches one admin request: one from a web page is `403`
/// ([`refuse_from_web_page`]), an unknown path is `404`, a known one
/// with a method it does not take `405` with `Allow` (RFC 9110 section
/// 15.5.6), and a `HEAD` gets the `GET`'s answer without its body.
async fn route(req: Request<Incoming>, shared: &Shared) -> AdminResponse {
    if let Some(refused) = refuse_from_web_page(&req) {
        return refused;
    }
    let path = req.uri().path().to_string();
    let head_only = req.method() == Method::HEAD;
    let answer = match allowed(&path) {
        None => text(
            StatusCode::NOT_FOUND,
            "404 Not Found: no such admin endpoint\n",
        ),
        Some(allow) => answer(req, &path, allow, shared).await,
    };
    if head_only {
        without_body(answer)
    } else {
        answer
    }
}

/// Answers a request for an admin endpoint that takes the methods `allow`.
async fn answer(
    req: Request<Incoming>,
    path: &str,
    allow: &'static str,
    shared: &Shared,
) -> AdminResponse {
    let method = match *req.method() {
        Method::HEAD => Method::GET,
        ref m => m.clone(),
    };
    if let Some(topic) = path.strip_prefix("/events/") {
        return match method {
            Method::POST => publish(req, topic, shared).await,
            Method::GET => json(
                StatusCode::OK,
                format!("{{\"pollers\":{}}}\n", shared.events.pollers(topic)),
            ),
            _ => refusal(&RelayError::new(ErrorKind::MethodNotAllowed { allow })),
        };
    }
    match (&method, path) {
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
            Ok(later) if later.is_empty() => text(StatusCode::OK, "reloaded\n"),
            Ok(later) => text(
                StatusCode::OK,
                format!(
                    "reloaded; these changed settings take effect at the next restart: {}\n",
                    later.join(", ")
                ),
            ),
            Err(e) => text(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("reload refused: {e}\n"),
            ),
        },
        _ => refusal(&RelayError::new(ErrorKind::MethodNotAllowed { allow })),
    }
}

/// The answer to a `HEAD`: the `GET`'s status and fields, its
/// `Content-Length` still the body's, and no body.
fn without_body(resp: AdminResponse) -> AdminResponse {
    use hyper::body::Body;
    let (mut parts, body) = resp.into_parts();
    let length = body.size_hint().exact().unwrap_or(0);
    parts.headers.insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(length),
    );
    Response::from_parts(parts, Full::new(Bytes::new()))
}

/// `POST /events/{topic}`: one JSON value, at most `max_event_bytes`, stored
/// whole or not at all: `201 {"id":N}`.
async fn publish(req: Request<Incoming>, topic: &str, shared: &Shared) -> AdminResponse {
    let limit = shared.events.settings().max_event_bytes;
    let too_large = || RelayError::new(ErrorKind::EventTooLarge { limit });
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return refusal(&too_large());
    }
    // A stalled publisher is cut after body_timeout, as on the aggregate port.
    let body_timeout = shared.config().limits.body_timeout;
    let collect = Limited::new(req.into_body(), limit).collect();
    let Ok(collected) = tokio::time::timeout(body_timeout, collect).await else {
        return refusal(&RelayError::new(ErrorKind::BodyTimeout));
    };
    let body = match collected {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return refusal(&too_large()),
        Err(e) => {
            tracing::debug!(topic, error = %e, "publish body unreadable");
            return refusal(&RelayError::new(ErrorKind::BadRequest("unreadable body")));
        }
    };
    match crate::events::publish(shared, topic, &body).await {
        Ok(id) => json(StatusCode::CREATED, format!("{{\"id\":{id}}}\n")),
        Err(err) => refusal(&err),
    }
}

/// An error as plain text, with its status (and `Retry-After`, `Allow`).
fn refusal(err: &RelayError) -> AdminResponse {
    let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = text(status, err.body());
    let headers = resp.headers_mut();
    if let Some(secs) = err.retry_after() {
        headers.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static(secs),
        );
    }
    if let ErrorKind::MethodNotAllowed { allow } = err.kind {
        headers.insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    }
    resp
}

/// A JSON response.
fn json(status: StatusCode, body: String) -> AdminResponse {
    let mut resp = text(status, body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// `200 ok` while serving; `503 draining` once shutdown has begun.
fn health(shared: &Shared) -> AdminResponse {
    if shared.is_draining() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_non_loopback_admin_address_is_warned_about() {
        for quiet in [
            "127.0.0.1:9090",
            "127.1.2.3:9090",
            "[::1]:9090",
            "[::ffff:127.0.0.1]:9090",
        ] {
            let addr: SocketAddr = quiet.parse().unwrap();
            assert_eq!(exposure_warning(addr), None, "{quiet}");
        }
        for loud in ["0.0.0.0:9090", "10.1.2.3:9090", "[::]:9090"] {
            let addr: SocketAddr = loud.parse().unwrap();
            let warning = exposure_warning(addr).unwrap_or_default();
            assert!(
                warning.contains(&addr.to_string())
                    && warning.contains("POST /reload")
                    && warning.contains("without authentication"),
                "{loud}: {warning}"
            );
        }
    }
}
