//! HTTP/2 on the aggregate port (h2c prior knowledge; ALPN `h2` once TLS
//! lands). Each stream is translated to HTTP/1.1 and served by the relay's one
//! HTTP path ([`http1::serve`]) over an in-memory pipe, so routing, `403/502/504`,
//! `Via` and access lines are the same for both protocols:
//!
//! - a request becomes `METHOD http://authority/path HTTP/1.1` with
//!   `Host: <relay name>`, the shim's form (JP4570628B2 figures 6-7), which the
//!   HTTP path restores to what the application wrote;
//! - `CONNECT host:port` (`:authority`) becomes an HTTP/1 `CONNECT`; on `200`
//!   both upgraded ends are spliced, half-closes passed on. One connection from
//!   the shim carries every tunnel, one stream each.
//!
//! The flow-control windows and stream limit are the link's, shared with the shim.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::Instrument;

use crate::codec::{Conn, Io, Rewind};
use crate::rewrite::strip_hop_by_hop_map;
use crate::{http1, ConnCtx};

/// Per-stream flow-control window: large enough that one tunnel is not
/// throttled by round trips on a long link.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Connection flow-control window shared by all streams.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Concurrent streams a peer may open (every tunnel through the shim is one).
pub const MAX_STREAMS: u32 = 4096;
/// The relay pings an idle peer this often and drops it if no answer comes in
/// [`PEER_PING_TIMEOUT`]; the shim probes on its own, more eagerly.
const PEER_PING_INTERVAL: Duration = Duration::from_secs(60);
const PEER_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Buffer of the in-memory pipe between a stream and the HTTP/1 path.
const PIPE_BUF: usize = 64 * 1024;
/// Largest DATA frame either end of the link accepts (SETTINGS_MAX_FRAME_SIZE;
/// RFC 9113's default is 16 KiB). h2 writes each frame with one `writev`, so
/// a bulk tunnel costs a syscall per frame: larger frames, fewer syscalls.
pub const MAX_FRAME_SIZE: u32 = 64 << 10;
/// Copy buffer, each way, between a tunnel's two ends. tokio's default is
/// 8 KiB, which made every 8 KiB one read, one DATA frame and one `writev`.
/// Allocated per open tunnel (untouched pages cost no RSS until used).
pub const TUNNEL_BUF: usize = 64 << 10;

/// A response body on an HTTP/2 stream.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Serves an HTTP/2 connection whose first bytes (the preface) were already
/// read into `conn`; returns when it closes or after a graceful drain.
pub async fn serve<S: Io>(conn: Conn<S>, ctx: ConnCtx) {
    let io = TokioIo::new(Rewind::from(conn));
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .max_frame_size(MAX_FRAME_SIZE)
        .keep_alive_interval(Some(PEER_PING_INTERVAL))
        .keep_alive_timeout(PEER_PING_TIMEOUT);
    let stream_ctx = ctx.clone();
    let service = service_fn(move |req| {
        let ctx = stream_ctx.clone();
        async move { Ok::<_, Infallible>(stream(req, ctx).await) }
    });
    let served = builder.serve_connection(io, service);
    tokio::pin!(served);
    let result = tokio::select! {
        r = served.as_mut() => r,
        () = ctx.shared.until_draining() => {
            // GOAWAY: open streams finish, no new ones start.
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    match result {
        Ok(()) => tracing::debug!("h2 connection closed"),
        Err(e) => tracing::debug!(error = %e, "h2 connection ended"),
    }
}

/// Serves one stream through the HTTP/1 path.
async fn stream(mut req: Request<Incoming>, ctx: ConnCtx) -> Response<Body> {
    let name = ctx.shared.config().relay.name.clone();
    let downstream = (req.method() == Method::CONNECT).then(|| hyper::upgrade::on(&mut req));
    let h1 = match to_http1(req, &name) {
        Ok(r) => r,
        Err(why) => return plain(StatusCode::BAD_REQUEST, why),
    };

    let (near, far) = tokio::io::duplex(PIPE_BUF);
    let span = tracing::Span::current();
    tokio::spawn(http1::serve(Conn::new(far), ctx).instrument(span.clone()));
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(near)).await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(error = %e, "h2 stream: internal HTTP/1 leg failed");
            return plain(StatusCode::BAD_GATEWAY, "relay internal error");
        }
    };
    tokio::spawn(
        async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "h2 stream: HTTP/1 leg ended");
            }
        }
        .instrument(span.clone()),
    );
    let resp = match sender.send_request(h1).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "h2 stream: no response from the HTTP/1 leg");
            return plain(StatusCode::BAD_GATEWAY, "relay internal error");
        }
    };
    if let Some(downstream) = downstream {
        if resp.status() == StatusCode::OK {
            let upstream = hyper::upgrade::on(resp);
            tokio::spawn(splice(downstream, upstream).instrument(span));
            return Response::new(empty());
        }
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop_map(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

/// Translates an HTTP/2 request into the HTTP/1.1 request the relay's HTTP
/// path understands. `Err` is the reason for a `400`.
pub fn to_http1<B>(req: Request<B>, relay_name: &str) -> Result<Request<B>, &'static str> {
    let (parts, body) = req.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            let host = parts.headers.get(header::HOST)?;
            host.to_str().ok().map(str::to_string)
        })
        .ok_or("missing :authority")?;
    let (uri, host) = if parts.method == Method::CONNECT {
        (authority.clone(), authority)
    } else {
        let scheme = parts.uri.scheme_str().unwrap_or("http");
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        (
            format!("{scheme}://{authority}{path}"),
            relay_name.to_string(),
        )
    };
    let mut out = Request::builder()
        .method(parts.method)
        .uri(uri)
        .version(Version::HTTP_11)
        .body(body)
        .map_err(|_| "invalid :authority or :path")?;
    let headers = out.headers_mut();
    let mut cookies: Vec<&str> = Vec::new();
    for (name, value) in &parts.headers {
        if name == header::HOST {
            continue;
        }
        // HTTP/2 may split Cookie into several fields; HTTP/1 wants one (RFC 9113 8.2.3).
        if name == header::COOKIE {
            if let Ok(v) = value.to_str() {
                cookies.push(v);
                continue;
            }
        }
        headers.append(name, value.clone());
    }
    if !cookies.is_empty() {
        let joined = HeaderValue::from_str(&cookies.join("; ")).map_err(|_| "invalid cookie")?;
        headers.insert(header::COOKIE, joined);
    }
    let host = HeaderValue::from_str(&host).map_err(|_| "invalid :authority")?;
    headers.insert(header::HOST, host);
    Ok(out)
}

/// Moves bytes between the client's stream and the relay's tunnel until both
/// directions end; a half-close on one side is passed on to the other.
pub async fn splice(downstream: OnUpgrade, upstream: OnUpgrade) {
    let (down, up) = match tokio::join!(downstream, upstream) {
        (Ok(d), Ok(u)) => (d, u),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "h2 tunnel: upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    match tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, TUNNEL_BUF, TUNNEL_BUF).await
    {
        Ok((sent, received)) => tracing::debug!(sent, received, "h2 tunnel closed"),
        Err(e) => tracing::debug!(error = %e, "h2 tunnel ended by an error"),
    }
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// A short plain-text answer made by the relay or the shim itself.
pub fn plain(status: StatusCode, why: &str) -> Response<Body> {
    let text = format!("{} {why}\n", status.as_u16());
    let body = Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<String, &'static str> {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .version(Version::HTTP_2);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let req = to_http1(b.body(()).unwrap(), "relay.test")?;
        let mut fields: Vec<String> = req
            .headers()
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        fields.sort();
        Ok(format!(
            "{} {} | {}",
            req.method(),
            req.uri(),
            fields.join(", ")
        ))
    }

    #[test]
    fn streams_become_the_shims_http1_form() {
        type Case = (
            Method,
            &'static str,
            Vec<(&'static str, &'static str)>,
            Result<&'static str, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                Method::GET,
                "http://app-a.test:81/x?y=1",
                vec![("accept", "*/*")],
                Ok("GET http://app-a.test:81/x?y=1 | accept: */*, host: relay.test"),
            ),
            (
                Method::CONNECT,
                "db.test:5432",
                vec![],
                Ok("CONNECT db.test:5432 | host: db.test:5432"),
            ),
            (
                Method::GET,
                "/x",
                vec![("host", "legacy.test")],
                Ok("GET http://legacy.test/x | host: relay.test"),
            ),
            (
                Method::GET,
                "http://a.test/",
                vec![("cookie", "a=1"), ("cookie", "b=2")],
                Ok("GET http://a.test/ | cookie: a=1; b=2, host: relay.test"),
            ),
            (Method::GET, "/x", vec![], Err("missing :authority")),
        ];
        for (method, uri, headers, want) in cases {
            let got = translate(method.clone(), uri, &headers);
            assert_eq!(got.as_deref().map_err(|e| *e), want, "{method} {uri}");
        }
    }
}
