//! HTTP/2 on the aggregate port (h2c prior knowledge, or ALPN `h2` over TLS),
//! served with the same routing, `403/502/504`, `Via` and access lines as
//! HTTP/1:
//!
//! - a request is translated to HTTP/1.1 and served by the relay's one HTTP
//!   path ([`http1::serve`]) over an in-memory pipe: it becomes
//!   `METHOD http://authority/path HTTP/1.1` with `Host: <relay name>`, the
//!   shim's form (JP4570628B2 figures 6-7), which the HTTP path restores to
//!   what the application wrote;
//! - `CONNECT host:port` (`:authority`) goes through the same gate and the
//!   same dial as an HTTP/1 `CONNECT` ([`gate::admit`], [`tunnel::open`]) and
//!   is answered on the stream; the stream's upgraded body is then the
//!   client end of the tunnel, half-closes passed on. One connection from the
//!   shim carries every tunnel, one stream each.
//!
//! The flow-control windows and stream limit are the link's, shared with the shim.
//!
//! The internal HTTP/1 legs are kept alive between streams ([`Legs`]): a
//! stream without a request body takes an idle leg of its connection instead
//! of making a pipe, two tasks and a handshake, and gives it back once its
//! response body has ended, as the relay's upstream pool does with servers.

use std::borrow::Cow;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::Instrument;

use crate::access_log::{Access, Pending};
use crate::codec::{Conn, Io, Rewind};
use crate::dispatch::connect_target;
use crate::error::{ErrorKind, RelayError};
use crate::rewrite::strip_hop_by_hop_map;
use crate::tunnel::{self, Standing};
use crate::{gate, http1, ConnCtx};

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
/// Idle internal HTTP/1 legs kept per connection; more concurrent streams
/// than this make legs that end with their stream.
const MAX_IDLE_LEGS: usize = 64;
/// An idle leg older than this is dropped rather than reused (with its
/// buffers), whatever the HTTP path's own idle timeout.
const LEG_IDLE_FOR: Duration = Duration::from_secs(30);
/// Largest DATA frame either end of the link accepts (SETTINGS_MAX_FRAME_SIZE;
/// RFC 9113's default is 16 KiB). h2 writes each frame with one `writev`, so
/// a bulk tunnel costs a syscall per frame: larger frames, fewer syscalls.
pub const MAX_FRAME_SIZE: u32 = 64 << 10;
/// Copy buffer, each way, between a tunnel's two ends when they cannot be
/// spliced ([`tunnel::relay_bytes`]). tokio's default is 8 KiB, which made
/// every 8 KiB one read, one DATA frame and one `writev`. Allocated only
/// while a burst of bytes lasts: an idle tunnel holds none.
pub const TUNNEL_BUF: usize = 64 << 10;

/// A response body on an HTTP/2 stream.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Serves an HTTP/2 connection whose first bytes (the preface) were already
/// read into `conn`; returns when it closes or after a graceful drain.
pub async fn serve<S: Io>(conn: Conn<S>, ctx: ConnCtx) {
    let io = TokioIo::new(Rewind::from(conn));
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // The same head limit as HTTP/1 (hyper's own is 16 KiB): a request that
    // passes over one passes over the other.
    let limits = &ctx.shared.config().limits;
    let max_head = crate::forward::h2_header_list_size(limits.max_head_bytes, limits.max_headers);
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(max_head)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .max_frame_size(MAX_FRAME_SIZE)
        .enable_connect_protocol()
        .keep_alive_interval(Some(PEER_PING_INTERVAL))
        .keep_alive_timeout(PEER_PING_TIMEOUT);
    let stream_ctx = ctx.clone();
    let legs = Legs::default();
    let streams = Arc::new(Streams::new());
    let counted = streams.clone();
    let service = service_fn(move |req| {
        let ctx = stream_ctx.clone();
        let legs = legs.clone();
        let busy = counted.open();
        async move { Ok::<_, Infallible>(stream(req, ctx, legs, busy).await) }
    });
    let served = builder.serve_connection(io, service);
    tokio::pin!(served);
    let result = loop {
        let idle = ctx.shared.config().limits.idle_timeout;
        tokio::select! {
            r = served.as_mut() => break r,
            () = ctx.shared.until_draining() => {
                // GOAWAY: open streams finish, no new ones start.
                served.as_mut().graceful_shutdown();
                break served.await;
            }
            () = tokio::time::sleep_until(streams.idle_deadline(idle)) => {
                if streams.idle_for(idle) {
                    // As an idle HTTP/1 keep-alive connection: closed (GOAWAY)
                    // after `limits.idle_timeout` without a stream.
                    tracing::debug!(?idle, "h2 connection idle; closing");
                    served.as_mut().graceful_shutdown();
                    break served.await;
                }
            }
        }
    };
    match result {
        Ok(()) => tracing::debug!("h2 connection closed"),
        Err(e) => tracing::debug!(error = %e, "h2 connection ended"),
    }
}

/// The streams open on one HTTP/2 connection, and since when none is.
struct Streams {
    open: std::sync::atomic::AtomicUsize,
    /// When the last stream ended (or the connection began), in ms since `base`.
    idle_since: std::sync::atomic::AtomicU64,
    base: tokio::time::Instant,
}

impl Streams {
    fn new() -> Self {
        Streams {
            open: Default::default(),
            idle_since: Default::default(),
            base: tokio::time::Instant::now(),
        }
    }

    /// Counts a stream open until the guard is dropped (with its response
    /// body, or with its tunnel).
    fn open(self: &Arc<Self>) -> Busy {
        self.open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Busy(self.clone())
    }

    /// Whether no stream has been open for `idle`.
    fn idle_for(&self, idle: Duration) -> bool {
        self.open.load(std::sync::atomic::Ordering::Acquire) == 0
            && tokio::time::Instant::now() >= self.idle_deadline(idle)
    }

    /// When the connection will have been idle for `idle`, if no stream
    /// starts; with streams open, one `idle` from now (checked again then).
    /// (`open` is read with Acquire: a count seen at 0 comes with the
    /// `idle_since` the last stream stored before it let go.)
    fn idle_deadline(&self, idle: Duration) -> tokio::time::Instant {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        if self.open.load(Acquire) > 0 {
            return tokio::time::Instant::now() + idle;
        }
        self.base + Duration::from_millis(self.idle_since.load(Relaxed)) + idle
    }
}

/// One open stream of a connection ([`Streams`]).
struct Busy(Arc<Streams>);

impl Drop for Busy {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        let since = self.0.base.elapsed().as_millis();
        self.0
            .idle_since
            .store(u64::try_from(since).unwrap_or(u64::MAX), Relaxed);
        self.0.open.fetch_sub(1, Release);
    }
}

/// Serves one stream: a `CONNECT` tunnel, or a request through the HTTP/1
/// path. The stream counts as open until its response body is done, or its
/// tunnel.
async fn stream(
    mut req: Request<Incoming>,
    ctx: ConnCtx,
    legs: Legs<Incoming>,
    busy: Busy,
) -> Response<Body> {
    if req.method() == Method::CONNECT {
        if let Some(protocol) = req.extensions_mut().remove::<hyper::ext::Protocol>() {
            return upgrade(req, protocol, ctx, busy).await;
        }
        return connect(req, ctx, busy).await;
    }
    relay(req, ctx, legs, busy).await
}

/// An extended `CONNECT` (RFC 8441: `:protocol`, such as `websocket`), the
/// HTTP/2 form of an HTTP/1 `Upgrade` request. It goes through the HTTP path
/// as `GET` with `Connection: upgrade` and `Upgrade: <protocol>`, on a leg of
/// its own, which the upgrade turns into the tunnel: admission, routing,
/// refusals, `Via` and the access line are the HTTP/1 upgrade's. The
/// server's `101` is answered `200` on the stream, whose body then carries
/// the upgraded bytes both ways; a refusal is passed on as it is. A `2xx`
/// that did not switch protocols (a server ignoring `Upgrade`) would read as
/// a tunnel established, so it is a `502`.
///
/// A WebSocket request without `Sec-WebSocket-Key` (RFC 8441 has none) gets
/// a fresh one for the server, whose `Sec-WebSocket-Accept` the relay then
/// checks as the WebSocket client it is on that side (RFC 6455 4.1). The
/// shim sends its application's key, whose accept goes back on the `200`
/// for the application to check.
async fn upgrade(
    mut req: Request<Incoming>,
    protocol: hyper::ext::Protocol,
    ctx: ConnCtx,
    busy: Busy,
) -> Response<Body> {
    let downstream = hyper::upgrade::on(&mut req);
    let target = req.uri().to_string();
    let own = |status, why: &str| own_answer(&ctx, "GET", &target, status, why);
    let (mut parts, _) = req.into_parts();
    parts.method = Method::GET;
    let name = ctx.shared.config().relay.name.clone();
    let mut h1 = match to_http1(
        Request::from_parts(parts, Empty::<Bytes>::new()),
        &name,
        ctx.tls,
    ) {
        Ok(r) => r,
        Err(why) => return own(StatusCode::BAD_REQUEST, why),
    };
    let Ok(token) = HeaderValue::from_str(protocol.as_str()) else {
        return own(StatusCode::BAD_REQUEST, "invalid :protocol");
    };
    // An HTTP/2 request carries no connection-specific fields (RFC 9113
    // 8.2.2): nothing to strip, and `Proxy-Authorization` is for the gate.
    let headers = h1.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, token);
    let mut own_key = None;
    if protocol.as_str().eq_ignore_ascii_case("websocket")
        && !headers.contains_key(header::SEC_WEBSOCKET_KEY)
    {
        let Some(key) = websocket_key() else {
            return own(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no randomness for a WebSocket key",
            );
        };
        own_key = Some(websocket_accept(key.as_bytes()));
        headers.insert(header::SEC_WEBSOCKET_KEY, key);
    }
    // The HTTP path checks the server's answer on the leg, so that the
    // access line has the 502 it makes of a wrong one.
    let must_switch = Arc::new(MustSwitch {
        accept: own_key.clone(),
    });
    let leg_ctx = ConnCtx {
        must_switch: Some(must_switch.clone()),
        ..ctx.clone()
    };
    let sent = match open_leg(&leg_ctx).await {
        Ok(mut leg) => leg.send_request(h1).await.map_err(|e| e.to_string()),
        Err(e) => Err(format!("cannot open a leg: {e}")),
    };
    let mut resp = match sent {
        Ok(resp) => resp,
        Err(why) => {
            tracing::warn!(error = %why, "h2 upgrade: internal HTTP/1 leg failed");
            return own(StatusCode::BAD_GATEWAY, "relay internal error");
        }
    };
    let status = resp.status();
    let accept = resp.headers().get(header::SEC_WEBSOCKET_ACCEPT);
    // Only an answer the relay made itself (its own endpoints) can still be
    // wrong here: the HTTP path checked the server's, and logged its 502.
    if let Some(why) = must_switch.refuses(status.as_u16(), accept.map(HeaderValue::as_bytes)) {
        tracing::warn!(%target, %status, "h2 upgrade: {why}; answered 502");
        return own(StatusCode::BAD_GATEWAY, &format!("{target}: {why}"));
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop_map(&mut parts.headers);
        return Response::from_parts(parts, LegBody::<Incoming>::new(body, None, busy).boxed());
    }
    let mut fields = std::mem::take(resp.headers_mut());
    strip_hop_by_hop_map(&mut fields);
    fields.remove(header::CONTENT_LENGTH);
    if own_key.is_some() {
        // The accept answered the relay's key: no use to the client.
        fields.remove(header::SEC_WEBSOCKET_ACCEPT);
    }
    let upstream = hyper::upgrade::on(&mut resp);
    let mut answer = Response::new(empty());
    *answer.headers_mut() = fields;
    let idle = ctx.shared.config().limits.idle_timeout;
    tokio::spawn(
        async move {
            splice(downstream, upstream, idle).await;
            drop(busy);
        }
        .in_current_span(),
    );
    answer
}

/// What the answer to an extended `CONNECT`'s upgrade must be: `101` (a
/// `2xx` would read as a tunnel established), with the `Sec-WebSocket-Accept`
/// that answers the key, when the relay made the key (RFC 6455 4.1).
#[derive(Debug)]
pub struct MustSwitch {
    pub accept: Option<String>,
}

impl MustSwitch {
    /// Why an answer with `status` and `accept` does not complete the
    /// upgrade, if it does not; other refusals (`4xx`, `5xx`) pass as they are.
    pub fn refuses(&self, status: u16, accept: Option<&[u8]>) -> Option<String> {
        match status {
            101 => match &self.accept {
                Some(expected) if accept != Some(expected.as_bytes()) => {
                    Some("the server's Sec-WebSocket-Accept does not answer the key".into())
                }
                _ => None,
            },
            200..=299 => Some(format!(
                "the server did not switch protocols (it answered {})",
                StatusCode::from_u16(status).map_or_else(|_| status.to_string(), |s| s.to_string())
            )),
            _ => None,
        }
    }
}

/// An answer the relay makes itself to a stream it could not pass on, with
/// its access line.
fn own_answer(
    ctx: &ConnCtx,
    method: &str,
    target: &str,
    status: StatusCode,
    why: &str,
) -> Response<Body> {
    let mut access = Access::new(
        Cow::Owned(method.to_string()),
        target,
        0,
        Access::logged(ctx),
    );
    access.status = status.as_u16();
    access.finish(ctx);
    plain(status, why)
}

/// A `Sec-WebSocket-Key`: 16 random bytes in base64 (RFC 6455 4.1).
fn websocket_key() -> Option<HeaderValue> {
    use base64::Engine;
    let nonce = crate::secret::random::<16>().ok()?;
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    HeaderValue::from_str(&key).ok()
}

/// The `Sec-WebSocket-Accept` that answers `key` (RFC 6455 4.2.2):
/// base64(SHA-1(key + the protocol's GUID)).
pub fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    let mut hash = Sha1::new();
    hash.update(key);
    hash.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(hash.finalize())
}

/// Serves one request stream through the HTTP/1 path. An answer the relay
/// makes itself is sent at once: its stream counts as open until then.
async fn relay(
    req: Request<Incoming>,
    ctx: ConnCtx,
    legs: Legs<Incoming>,
    busy: Busy,
) -> Response<Body> {
    let name = ctx.shared.config().relay.name.clone();
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let own = |status, why: &str| own_answer(&ctx, method.as_str(), &uri.to_string(), status, why);
    let h1 = match to_http1(req, &name, ctx.tls) {
        Ok(r) => r,
        Err(why) => return own(StatusCode::BAD_REQUEST, why),
    };
    // Only a stream that sent its whole request with its head may share a
    // leg: an upload keeps its leg busy past the response head. A draining
    // relay is closing its idle legs: new ones serve the last streams.
    let reusable = h1.body().is_end_stream();
    let idle = if reusable && !ctx.shared.is_draining() {
        legs.take().await
    } else {
        None
    };
    let (sender, resp) = match send_on_leg(h1, idle, || open_leg(&ctx)).await {
        Ok(sent) => sent,
        Err(why) => {
            tracing::warn!(error = %why, "h2 stream: internal HTTP/1 leg failed");
            return own(StatusCode::BAD_GATEWAY, "relay internal error");
        }
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop_map(&mut parts.headers);
    let body = LegBody::new(body, reusable.then_some((sender, legs)), busy);
    Response::from_parts(parts, body.boxed())
}

/// Sends `req` on `idle` (a leg from the connection's idle list) or on a new
/// leg from `open`. A request that an idle leg closing at that moment (its
/// idle timeout, a drain) did not take goes once more, on a new leg.
async fn send_on_leg<B, F, Fut>(
    mut req: Request<B>,
    mut idle: Option<SendRequest<B>>,
    mut open: F,
) -> Result<(SendRequest<B>, Response<Incoming>), String>
where
    B: hyper::body::Body + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = hyper::Result<SendRequest<B>>>,
{
    loop {
        let reused = idle.is_some();
        let mut sender = match idle.take() {
            Some(sender) => sender,
            None => open()
                .await
                .map_err(|e| format!("cannot open a leg: {e}"))?,
        };
        match sender.try_send_request(req).await {
            Ok(resp) => return Ok((sender, resp)),
            Err(mut e) => match e.take_message() {
                Some(unsent) if reused => req = unsent,
                _ => return Err(format!("no response from the leg: {}", e.error())),
            },
        }
    }
}

/// `CONNECT host:port` on a stream: admitted, routed and dialled as on
/// HTTP/1 ([`gate::admit`], [`tunnel::open`]), answered on the stream, whose
/// upgraded body is then the client end of the tunnel. No internal leg: the
/// bytes go from the stream to the server's socket in one copy.
async fn connect(mut req: Request<Incoming>, ctx: ConnCtx, busy: Busy) -> Response<Body> {
    let authority = req.uri().authority().map_or("", |a| a.as_str()).to_string();
    let logged = Access::logged(&ctx);
    // A stream reset while the relay admits or dials drops this future: the
    // line is still written (status 499).
    let mut access = Pending::new(
        Access::new(Cow::Borrowed("CONNECT"), &authority, 0, logged),
        &ctx,
    );
    let (host, port) = match connect_target(&authority) {
        Ok(target) => target,
        Err(why) => {
            let err = RelayError::new(ErrorKind::BadRequest(why));
            return refused(&err, access.take(), &ctx);
        }
    };
    let config = ctx.shared.config();
    let vias = || {
        req.headers()
            .get_all(header::VIA)
            .iter()
            .map(HeaderValue::as_bytes)
    };
    if crate::rewrite::via_values_contain(vias(), &config.relay.name) {
        return refused(&RelayError::new(ErrorKind::Loop), access.take(), &ctx);
    }
    let mut credentials = req.headers().get_all(header::PROXY_AUTHORIZATION).iter();
    let authorization = credentials.next().map(HeaderValue::as_bytes);
    if credentials.next().is_some() {
        let err = RelayError::new(ErrorKind::BadRequest("more than one Proxy-Authorization"));
        return refused(&err, access.take(), &ctx);
    }
    if let Err(err) = gate::admit(
        &ctx,
        &config,
        authorization,
        Some((&host, port)),
        &mut access,
    )
    .await
    {
        return refused(&err, access.take(), &ctx);
    }
    let via = crate::rewrite::arrived_via(vias());
    let mut opened = match tunnel::open(&host, port, &via, &ctx, &mut access).await {
        Ok(opened) => opened,
        Err(err) => return refused(&err, access.take(), &ctx),
    };
    if !opened.stands() {
        // Through an uplink: the inside relay's refusal, passed on.
        let refusal = opened.refusal().await;
        let mut access = access.take();
        access.bytes_out += refusal.body.len() as u64;
        access.finish(&ctx);
        return passed_on(refusal);
    }
    let access = access.take();
    let downstream = hyper::upgrade::on(&mut req);
    let span = tracing::Span::current();
    tokio::spawn(
        async move {
            match downstream.await {
                Ok(client) => {
                    let standing = Standing::new(&ctx, opened.server, opened.idle, access);
                    tunnel::run(Conn::new(TokioIo::new(client)), standing, &ctx).await;
                    drop(busy);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "h2 tunnel: the stream ended before it stood");
                    let mut access = access;
                    access.status = crate::access_log::CLIENT_GONE;
                    access.finish(&ctx);
                }
            }
        }
        .instrument(span),
    );
    Response::new(empty())
}

/// A refusal the inside relay answered, as an HTTP/2 response.
fn passed_on(refusal: tunnel::Refusal) -> Response<Body> {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = text(status, refusal.body);
    // The inside relay's fields replace the relay's own defaults.
    for name in refusal.fields.keys() {
        resp.headers_mut().remove(name);
    }
    resp.headers_mut().extend(refusal.fields);
    resp
}

/// The answer to a stream the relay refused, with its access line.
fn refused(err: &RelayError, mut access: Access, ctx: &ConnCtx) -> Response<Body> {
    access.status = err.status();
    access.finish(ctx);
    let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = text(status, err.body());
    for (name, value) in err.headers() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, value);
        }
    }
    resp
}

/// Opens an internal HTTP/1 leg: an in-memory pipe whose far end is served
/// by the relay's HTTP path as a connection of this stream's client.
async fn open_leg<B>(ctx: &ConnCtx) -> hyper::Result<SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (near, far) = tokio::io::duplex(PIPE_BUF);
    let span = tracing::Span::current();
    tokio::spawn(http1::serve(Conn::new(far), ctx.clone()).instrument(span.clone()));
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near)).await?;
    tokio::spawn(
        async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "h2 stream: HTTP/1 leg ended");
            }
        }
        .instrument(span),
    );
    Ok(sender)
}

/// The idle internal HTTP/1 legs of one HTTP/2 connection, oldest first.
/// They end with it: dropping a leg's sender ends its client task, which
/// closes the pipe, which ends the HTTP path's side. A leg the HTTP path
/// closed (its idle timeout, a `Connection: close`, draining) is found closed
/// and dropped when taken; one idle for [`LEG_IDLE_FOR`] is dropped too.
struct Legs<B>(Arc<Mutex<Vec<IdleLeg<B>>>>);

/// An idle leg and since when it is idle.
type IdleLeg<B> = (SendRequest<B>, Instant);

impl<B> Default for Legs<B> {
    fn default() -> Self {
        Legs(Arc::default())
    }
}

impl<B> Clone for Legs<B> {
    fn clone(&self) -> Self {
        Legs(self.0.clone())
    }
}

impl<B> Legs<B> {
    /// An idle leg ready for a request, if one is left.
    async fn take(&self) -> Option<SendRequest<B>> {
        loop {
            let (mut sender, since) = self.0.lock().ok()?.pop()?;
            if sender.is_closed() || since.elapsed() >= LEG_IDLE_FOR {
                continue;
            }
            // Its last response ended; the client task marks it ready on its
            // next turn.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn put(&self, sender: SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.0.lock() {
            let now = Instant::now();
            crate::upstream::drop_expired(&mut idle, now, LEG_IDLE_FOR);
            if idle.len() < MAX_IDLE_LEGS {
                idle.push((sender, now));
            }
        }
    }
}

/// A response body from an internal leg: gives the leg back to its
/// connection's idle list once the body has ended, and drops it if the
/// stream ends first (the leg closes with it). Its stream counts as open
/// until it is dropped ([`Streams`]).
struct LegBody<B> {
    body: Incoming,
    ended: bool,
    leg: Option<(SendRequest<B>, Legs<B>)>,
    /// The stream counts as open until its body is dropped.
    _busy: Busy,
}

impl<B> LegBody<B> {
    fn new(body: Incoming, leg: Option<(SendRequest<B>, Legs<B>)>, busy: Busy) -> Self {
        LegBody {
            body,
            ended: false,
            leg,
            _busy: busy,
        }
    }
}

impl<B> hyper::body::Body for LegBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for LegBody<B> {
    fn drop(&mut self) {
        if self.ended || self.body.is_end_stream() {
            if let Some((sender, legs)) = self.leg.take() {
                legs.put(sender);
            }
        }
    }
}

/// Translates an HTTP/2 request (not a `CONNECT`, which [`connect`] serves)
/// into the HTTP/1.1 request the relay's HTTP path understands. `Err` is the
/// reason for a `400`.
pub fn to_http1<B>(
    req: Request<B>,
    relay_name: &str,
    tls: bool,
) -> Result<Request<B>, &'static str> {
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
    // Over TLS the client addresses the relay as the origin: `:scheme https`
    // there means what an HTTP/1 request in origin form over TLS means (RFC
    // 9112 3.3), and is relayed the same way, to the route for the authority.
    // Over cleartext it asks the relay to fetch an https URI, which is
    // refused as in HTTP/1 (use CONNECT).
    let scheme = match parts.uri.scheme_str() {
        Some("https") if tls => "http",
        Some(scheme) => scheme,
        None => "http",
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = format!("{scheme}://{authority}{path}");
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
    let host = HeaderValue::from_str(relay_name).map_err(|_| "invalid relay name")?;
    headers.insert(header::HOST, host);
    Ok(out)
}

/// Moves bytes between two upgraded streams (the shim's: the application's
/// `CONNECT` and the link's stream) until both directions end; a half-close
/// on one side is passed on to the other. Copy buffers exist only while
/// bytes flow ([`tunnel::relay_bytes`]), so an idle tunnel holds none. The
/// relay ends a tunnel idle for its `idle_timeout`, which ends the stream;
/// `idle` is the backstop on this side.
pub async fn splice(downstream: OnUpgrade, upstream: OnUpgrade, idle: Duration) {
    let (down, up) = match tokio::join!(downstream, upstream) {
        (Ok(d), Ok(u)) => (d, u),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "h2 tunnel: upgrade failed");
            return;
        }
    };
    let moved = tunnel::relay_bytes(
        Conn::new(TokioIo::new(down)),
        Conn::new(TokioIo::new(up)),
        idle,
        &tunnel::Counts::default(),
    )
    .await;
    tracing::debug!(sent = moved.up, received = moved.down, "h2 tunnel closed");
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// A short plain-text answer made by the relay or the shim itself.
pub fn plain(status: StatusCode, why: &str) -> Response<Body> {
    text(status, format!("{} {why}\n", status.as_u16()))
}

/// A `text/plain` answer with this body, not to be stored (as the HTTP/1
/// error pages).
fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let body = Full::new(body.into())
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A leg to a scripted HTTP/1 server on an in-memory pipe: `/len`
    /// answers with a `Content-Length` body, `/chunked` with a chunked one,
    /// `/big` with 1 MiB, `/close` with `Connection: close` (then closes).
    async fn scripted_leg() -> SendRequest<Empty<Bytes>> {
        let (near, mut far) = tokio::io::duplex(PIPE_BUF);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    match far.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                buf.drain(..end + 4);
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                let reply: Vec<u8> = match path.as_str() {
                    "/len" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfixed".to_vec(),
                    "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nchu\r\n4\r\nnked\r\n0\r\n\r\n".to_vec(),
                    "/big" => {
                        let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n".to_vec();
                        r.resize(r.len() + (1 << 20), b'x');
                        r
                    }
                    _ => b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye".to_vec(),
                };
                if far.write_all(&reply).await.is_err() || path == "/close" {
                    return;
                }
            }
        });
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    fn get(path: &str) -> Request<Empty<Bytes>> {
        Request::get(path).body(Empty::new()).unwrap()
    }

    fn idle(legs: &Legs<Empty<Bytes>>) -> usize {
        legs.0.lock().unwrap().len()
    }

    /// Sends `path` on `sender` and reads the whole body through a `LegBody`.
    async fn fetch(
        mut sender: SendRequest<Empty<Bytes>>,
        legs: &Legs<Empty<Bytes>>,
        path: &str,
    ) -> Bytes {
        let resp = sender.send_request(get(path)).await.unwrap();
        let body = LegBody::new(resp.into_body(), Some((sender, legs.clone())), busy());
        body.collect().await.unwrap().to_bytes()
    }

    #[test]
    fn a_passed_on_refusal_keeps_the_inside_relays_fields_over_the_defaults() {
        let mut fields = http::HeaderMap::new();
        fields.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=5"));
        fields.append(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic"),
        );
        fields.append(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        let resp = passed_on(tunnel::Refusal {
            status: 407,
            fields,
            body: Bytes::from_static(b"who are you\n"),
        });
        assert_eq!(resp.status(), StatusCode::PROXY_AUTHENTICATION_REQUIRED);
        assert_eq!(resp.headers()["cache-control"], "max-age=5");
        assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
        let challenges: Vec<_> = resp
            .headers()
            .get_all("proxy-authenticate")
            .iter()
            .collect();
        assert_eq!(challenges, ["Basic", "Bearer"]);
        // The relay's own answers are not stored either.
        let own = plain(StatusCode::BAD_GATEWAY, "no");
        assert_eq!(own.headers()["cache-control"], "no-store");
    }

    /// A stream's count on a connection of its own.
    fn busy() -> Busy {
        Arc::new(Streams::new()).open()
    }

    #[tokio::test]
    async fn a_leg_goes_back_when_its_body_ends_and_serves_the_next_stream() {
        let legs = Legs::default();
        assert_eq!(fetch(scripted_leg().await, &legs, "/len").await, "fixed");
        assert_eq!(idle(&legs), 1, "a Content-Length body ended");
        let again = legs.take().await.expect("the idle leg");
        assert_eq!(idle(&legs), 0);
        assert_eq!(fetch(again, &legs, "/chunked").await, "chunked");
        assert_eq!(idle(&legs), 1, "a chunked body ended");
        let again = legs.take().await.expect("the same leg, a third time");
        assert_eq!(fetch(again, &legs, "/len").await, "fixed");
    }

    #[tokio::test]
    async fn a_request_an_idle_leg_did_not_take_goes_on_a_new_leg() {
        // An idle leg whose connection has just ended (the HTTP path closed it).
        let (near, _far) = tokio::io::duplex(PIPE_BUF);
        let (closed, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .unwrap();
        drop(conn);
        let opened = std::cell::Cell::new(0);
        let open = || {
            opened.set(opened.get() + 1);
            async { Ok(scripted_leg().await) }
        };
        let (_, resp) = send_on_leg(get("/len"), Some(closed), open).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "fixed");
        assert_eq!(opened.get(), 1, "one new leg");

        // A new leg that fails is not tried again: the stream gets its 502.
        let (near, _far) = tokio::io::duplex(PIPE_BUF);
        let (dead, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .unwrap();
        drop(conn);
        let mut dead = Some(dead);
        let once = || {
            let leg = dead.take().expect("opened once");
            async { Ok(leg) }
        };
        let err = send_on_leg(get("/len"), None, once).await.err();
        assert!(err.is_some_and(|e| e.starts_with("no response from the leg")));
    }

    #[tokio::test]
    async fn a_leg_whose_body_was_cut_short_is_not_reused() {
        let legs = Legs::default();
        let mut sender = scripted_leg().await;
        let resp = sender.send_request(get("/big")).await.unwrap();
        let mut body = LegBody::new(resp.into_body(), Some((sender, legs.clone())), busy());
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
        drop(body);
        assert_eq!(idle(&legs), 0, "the rest of the body is still in the leg");
    }

    #[tokio::test]
    async fn a_leg_the_server_closed_is_skipped() {
        let legs = Legs::default();
        assert_eq!(fetch(scripted_leg().await, &legs, "/close").await, "bye");
        assert!(
            legs.take().await.is_none(),
            "no leg after Connection: close"
        );
        // A good leg behind a closed one is still found.
        assert_eq!(fetch(scripted_leg().await, &legs, "/len").await, "fixed");
        assert_eq!(fetch(scripted_leg().await, &legs, "/close").await, "bye");
        assert!(legs.take().await.is_some());
    }

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
        let req = to_http1(b.body(()).unwrap(), "relay.test", false)?;
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
    fn websocket_accept_is_rfc_6455s() {
        // RFC 6455 1.3's example.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn an_upgrade_must_switch_with_the_accept_for_the_relays_key() {
        let made_key = MustSwitch {
            accept: Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into()),
        };
        let their_key = MustSwitch { accept: None };
        let right = Some(&b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="[..]);
        assert_eq!(made_key.refuses(101, right), None);
        for wrong in [None, Some(&b"x"[..])] {
            let why = made_key.refuses(101, wrong).unwrap();
            assert!(why.contains("does not answer the key"), "{why}");
        }
        // The application checks its own key's accept.
        assert_eq!(their_key.refuses(101, None), None);
        for (status, text) in [(200, "200 OK"), (204, "204 No Content")] {
            let why = their_key.refuses(status, None).unwrap();
            assert!(
                why.contains(&format!("did not switch protocols (it answered {text})")),
                "{why}"
            );
        }
        // Refusals pass as they are.
        for status in [301, 401, 403, 426, 502] {
            assert_eq!(made_key.refuses(status, None), None, "{status}");
        }
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
