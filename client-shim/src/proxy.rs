//! The local system-proxy listener. An application's request, in proxy form
//! (`GET http://app/x`) or in origin form with `Host: app` (an application
//! pointed at the shim as if it were the server), goes to the relay as one
//! HTTP/2 stream in absolute form: `:authority` is the application's target,
//! which the relay restores as `Host` (JP4570628B2 figures 6-7). `CONNECT` is
//! passed on as an HTTP/2 `CONNECT` stream. Requests for the shim itself go
//! to [`control`](crate::control).

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use porthole_relay::dispatch::Identity;
use porthole_relay::h2::Body;
use porthole_relay::rewrite::strip_hop_by_hop_map;
use porthole_relay::routes::parse_authority;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::link::{connect_request, LinkError, LinkHandle};
use crate::{control, plain, Ctx};

/// Appends the shim's `Via` entry to a message it forwards, requests and
/// responses alike (RFC 9110 7.6.3), naming the protocol it was received
/// with: a request's from the application, a response's HTTP/2 from the
/// relay. Marked as a Porthole hop so a `transparent` route hides it from
/// the internal server.
fn add_via(headers: &mut http::HeaderMap, received: http::Version) {
    let entry = match received {
        http::Version::HTTP_09 => "0.9 porthole-shim (porthole)",
        http::Version::HTTP_10 => "1.0 porthole-shim (porthole)",
        http::Version::HTTP_2 => "2 porthole-shim (porthole)",
        http::Version::HTTP_3 => "3 porthole-shim (porthole)",
        _ => "1.1 porthole-shim (porthole)",
    };
    headers.append(header::VIA, HeaderValue::from_static(entry));
}

/// The application's own `Proxy-Authorization` fields, kept across the
/// hop-by-hop strip: without the shim's `credentials_file` they are the
/// relay's to check (passed through, as Squid's `login=PASSTHRU`); with it,
/// [`LinkHandle::send`] puts the shim's in their place.
fn client_credentials(headers: &http::HeaderMap) -> Vec<HeaderValue> {
    headers
        .get_all(header::PROXY_AUTHORIZATION)
        .iter()
        .map(|v| {
            let mut v = v.clone();
            v.set_sensitive(true);
            v
        })
        .collect()
}

fn put_credentials(headers: &mut http::HeaderMap, credentials: Vec<HeaderValue>) {
    for value in credentials {
        headers.append(header::PROXY_AUTHORIZATION, value);
    }
}

/// A tunnel idle this long is closed on the shim's side: a backstop only.
/// The relay closes idle tunnels at its `idle_timeout`, which ends them here
/// too, so this is longer than any such setting is likely to be.
pub(crate) const TUNNEL_IDLE: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// A host name that always means the shim itself (besides its listen address).
pub const SHIM_NAME: &str = "porthole-shim";

/// What a local request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A tunnel to `host:port`.
    Connect(String),
    /// A request for the relay to relay: `http://authority/path`.
    Relay { authority: String, path: String },
    /// The shim's own endpoints, with the path.
    Local(String),
}

/// Decides what a request is for (pure). `Err` is the reason for a `400`.
pub fn classify(
    method: &Method,
    uri: &Uri,
    host: Option<&str>,
    me: Identity<'_>,
) -> Result<Kind, &'static str> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    if method == Method::CONNECT {
        let authority = uri.authority().ok_or("CONNECT target must be host:port")?;
        return match parse_authority(authority.as_str(), 0) {
            Some((_, port)) if port != 0 => Ok(Kind::Connect(authority.to_string())),
            _ => Err("CONNECT target must be host:port"),
        };
    }
    let authority = match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(a)) => a.as_str().to_string(),
        (Some(_), _) => return Err("only http:// is relayed in proxy form; use CONNECT"),
        (None, _) => host.ok_or("missing Host header")?.trim().to_string(),
    };
    let (name, port) = parse_authority(&authority, 80).ok_or("invalid Host")?;
    if me.is_own(&name, port) {
        return Ok(Kind::Local(path));
    }
    Ok(Kind::Relay { authority, path })
}

/// Accepts local connections until `stop`; each is served as HTTP/1.
pub async fn serve(listener: TcpListener, ctx: Ctx, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let span = tracing::info_span!("local", client = %peer);
        tokio::spawn(connection(stream, peer, ctx.clone()).instrument(span));
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, ctx: Ctx) {
    let local = stream.local_addr().unwrap_or(ctx.listen);
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(req, peer, local, ctx).await) }
    });
    // With a timer, hyper bounds the wait for a request head (30 s by default).
    // A client that shuts its write side after the request (`printf | nc -N`,
    // a health check) still gets the answer (RFC 9112 section 9.6).
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = served.await {
        tracing::debug!(error = %e, "local connection ended");
    }
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    ctx: Ctx,
) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let me = Identity {
        name: SHIM_NAME,
        local,
        uplink_session: false,
    };
    match classify(req.method(), req.uri(), host.as_deref(), me) {
        Err(why) => plain(StatusCode::BAD_REQUEST, why),
        Ok(Kind::Local(path)) => control::serve(req, &path, peer, local, &ctx).await,
        Ok(Kind::Connect(authority)) => connect(req, &authority, &ctx.link).await,
        Ok(Kind::Relay { authority, path }) => relay(req, &authority, &path, &ctx.link).await,
    }
}

/// Sends the request over the link and returns the relay's answer as it is
/// (`403` and the relay's other errors unchanged).
async fn relay(
    mut req: Request<Incoming>,
    authority: &str,
    path: &str,
    link: &LinkHandle,
) -> Response<Body> {
    let upgrade = upgrade_to(req.method(), req.headers());
    if upgrade.is_some() && !req.body().is_end_stream() {
        return plain(StatusCode::BAD_REQUEST, "an Upgrade request with a body");
    }
    let local = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let uri = match format!("http://{authority}{path}").parse::<Uri>() {
        Ok(u) => u,
        Err(_) => return plain(StatusCode::BAD_REQUEST, "invalid request target"),
    };
    let credentials = client_credentials(&parts.headers);
    strip_hop_by_hop_map(&mut parts.headers);
    put_credentials(&mut parts.headers, credentials);
    // The target travels as :authority; the relay writes Host back from it.
    parts.headers.remove(header::HOST);
    add_via(&mut parts.headers, parts.version);
    parts.uri = uri;
    parts.version = http::Version::HTTP_2;
    let body = match &upgrade {
        // RFC 8441: the upgrade travels as an extended CONNECT, whose stream
        // becomes the tunnel once the relay answers 200.
        Some(protocol) => {
            parts.method = Method::CONNECT;
            parts.headers.remove(header::CONTENT_LENGTH);
            parts
                .extensions
                .insert(hyper::ext::Protocol::from(protocol.as_str()));
            crate::link::empty()
        }
        None => body.boxed(),
    };
    let out = Request::from_parts(parts, body);
    match link.send(out).await {
        Ok(resp) => match (local, upgrade) {
            (Some(local), Some(protocol)) if resp.status() == StatusCode::OK => {
                switched(local, resp, &protocol)
            }
            _ => {
                let (mut parts, body) = resp.into_parts();
                add_via(&mut parts.headers, parts.version);
                Response::from_parts(parts, body.boxed())
            }
        },
        Err(e @ LinkError::Refused { reason, .. })
            if upgrade.is_some() && reason == h2::Reason::PROTOCOL_ERROR =>
        {
            tracing::warn!(error = %e, "upgrade not relayed");
            let why = format!("{e}: a relay older than this shim takes no upgrade (RFC 8441 extended CONNECT) over its link");
            plain(StatusCode::BAD_GATEWAY, &why)
        }
        Err(e) => {
            tracing::warn!(error = %e, "request not relayed");
            plain(StatusCode::BAD_GATEWAY, &e.to_string())
        }
    }
}

/// The one protocol an HTTP/1 `Upgrade` request asks for (`Connection:
/// upgrade` and `Upgrade: websocket`), when it is a `GET` that HTTP/2 can
/// carry as an extended `CONNECT` (RFC 8441). Several protocols offered at
/// once, or `h2c` (a protocol of this hop only), are not passed on: such a
/// request goes as a plain request, its `Upgrade` dropped as hop-by-hop.
fn upgrade_to(method: &Method, headers: &http::HeaderMap) -> Option<String> {
    if method != Method::GET {
        return None;
    }
    let words = |name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    };
    if !words(header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade")) {
        return None;
    }
    let mut offered = words(header::UPGRADE);
    let protocol = offered.next()?;
    if offered.next().is_some() || protocol.eq_ignore_ascii_case("h2c") {
        return None;
    }
    // It goes back in the `101`'s `Upgrade` field.
    HeaderValue::from_str(protocol).ok()?;
    Some(protocol.to_string())
}

/// The relay's `200` to an upgrade: answered `101 Switching Protocols` with
/// the relay's fields (the server's `Sec-WebSocket-Accept` among them), and
/// the application's connection spliced to the stream.
fn switched(
    local: hyper::upgrade::OnUpgrade,
    mut resp: Response<Incoming>,
    protocol: &str,
) -> Response<Body> {
    let remote = hyper::upgrade::on(&mut resp);
    let received = resp.version();
    let mut answer = Response::new(crate::link::empty());
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = answer.headers_mut();
    *headers = std::mem::take(resp.headers_mut());
    strip_hop_by_hop_map(headers);
    headers.remove(header::CONTENT_LENGTH);
    add_via(headers, received);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(token) = HeaderValue::from_str(protocol) {
        // Always: `upgrade_to` took it from a header value.
        headers.insert(header::UPGRADE, token);
    }
    tokio::spawn(porthole_relay::h2::splice(local, remote, TUNNEL_IDLE).in_current_span());
    answer
}

/// Opens a `CONNECT` stream; on `200`, answers the application `200` and
/// splices the two upgraded streams.
async fn connect(req: Request<Incoming>, authority: &str, link: &LinkHandle) -> Response<Body> {
    let mut out = match connect_request(authority) {
        Ok(r) => r,
        Err(_) => return plain(StatusCode::BAD_REQUEST, "CONNECT target must be host:port"),
    };
    put_credentials(out.headers_mut(), client_credentials(req.headers()));
    let resp = match link.send(out).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "tunnel not opened");
            return plain(StatusCode::BAD_GATEWAY, &e.to_string());
        }
    };
    if resp.status() != StatusCode::OK {
        let (mut parts, body) = resp.into_parts();
        add_via(&mut parts.headers, parts.version);
        return Response::from_parts(parts, body.boxed());
    }
    let local = hyper::upgrade::on(req);
    let remote = hyper::upgrade::on(resp);
    tokio::spawn(porthole_relay::h2::splice(local, remote, TUNNEL_IDLE).in_current_span());
    Response::new(crate::link::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrades_carried_as_extended_connect_by_table() {
        type Case = (
            Method,
            &'static [(&'static str, &'static str)],
            Option<&'static str>,
        );
        let cases: &[Case] = &[
            (
                Method::GET,
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                Some("websocket"),
            ),
            (
                Method::GET,
                &[
                    ("connection", "keep-alive, upgrade"),
                    ("upgrade", "WebSocket"),
                ],
                Some("WebSocket"),
            ),
            (
                Method::GET,
                &[
                    ("connection", "keep-alive"),
                    ("connection", "Upgrade"),
                    ("upgrade", "websocket"),
                ],
                Some("websocket"),
            ),
            // Not an upgrade without the Connection token.
            (Method::GET, &[("upgrade", "websocket")], None),
            (Method::GET, &[("connection", "upgrade")], None),
            // One protocol only; h2c is this hop's own.
            (
                Method::GET,
                &[("connection", "upgrade"), ("upgrade", "websocket, foo/2")],
                None,
            ),
            (
                Method::GET,
                &[("connection", "upgrade"), ("upgrade", "h2c")],
                None,
            ),
            (
                Method::POST,
                &[("connection", "upgrade"), ("upgrade", "websocket")],
                None,
            ),
        ];
        for (method, fields, want) in cases {
            let mut headers = http::HeaderMap::new();
            for (n, v) in *fields {
                headers.append(*n, HeaderValue::from_static(v));
            }
            assert_eq!(
                upgrade_to(method, &headers).as_deref(),
                *want,
                "{method} {fields:?}"
            );
        }
    }

    #[test]
    fn request_forms_by_table() {
        let me = Identity {
            name: SHIM_NAME,
            local: "127.0.0.1:3128".parse().unwrap(),
            uplink_session: false,
        };
        let relay = |a: &str, p: &str| {
            Ok(Kind::Relay {
                authority: a.into(),
                path: p.into(),
            })
        };
        type Case = (
            Method,
            &'static str,
            Option<&'static str>,
            Result<Kind, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                Method::GET,
                "http://app-a.test:81/x?q",
                Some("app-a.test:81"),
                relay("app-a.test:81", "/x?q"),
            ),
            (
                Method::GET,
                "/x",
                Some("app-a.test:81"),
                relay("app-a.test:81", "/x"),
            ),
            (
                Method::POST,
                "/",
                Some("wiki.corp"),
                relay("wiki.corp", "/"),
            ),
            (
                Method::CONNECT,
                "db.test:5432",
                None,
                Ok(Kind::Connect("db.test:5432".into())),
            ),
            (
                Method::GET,
                "/proxy.pac",
                Some("127.0.0.1:3128"),
                Ok(Kind::Local("/proxy.pac".into())),
            ),
            (
                Method::GET,
                "/proxy.pac",
                Some("localhost:3128"),
                Ok(Kind::Local("/proxy.pac".into())),
            ),
            (
                Method::GET,
                "http://127.0.0.1:3128/x",
                None,
                Ok(Kind::Local("/x".into())),
            ),
            (
                Method::GET,
                "/",
                Some("porthole-shim"),
                Ok(Kind::Local("/".into())),
            ),
            (
                Method::GET,
                "/",
                Some("localhost:8000"),
                relay("localhost:8000", "/"),
            ),
            (Method::GET, "/x", None, Err("missing Host header")),
            (
                Method::GET,
                "https://a.test/",
                None,
                Err("only http:// is relayed in proxy form; use CONNECT"),
            ),
        ];
        for (method, uri, host, want) in cases {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(classify(&method, &uri, host, me), want, "{method} {uri}");
        }
    }
}
