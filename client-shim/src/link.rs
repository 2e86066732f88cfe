//! The ONE HTTP/2 connection to the relay, as an actor with a handle.
//!
//! The actor dials the relay, checks it answers, publishes the connection's
//! [`SendRequest`] (every local request and tunnel is one stream on it), and
//! watches it with the adaptive [`keepalive`]. When the session ends (closed,
//! or no answer to a probe) it reconnects under exponential backoff, which
//! resets after a healthy session. Local listeners never notice: a request
//! that arrives meanwhile cuts the backoff to a second at most, waits for the
//! link up to `link_wait`, then gets `502` with the reason. Dropping the last [`LinkHandle`] stops the actor.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use porthole_relay::h2::{Body, CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW};
use porthole_relay::secret::Secret;
use porthole_relay::tls::RelayTls;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::ShimConfig;
use crate::keepalive::{Action, Keepalive, Settings};
use crate::meter::{Meter, Metered};
use crate::AbortOnDrop;

/// First wait before reconnecting; doubles per failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// With a request waiting for the link, the backoff is cut to this at most:
/// a user waits for the next try only while nobody needs the link does it
/// grow to [`BACKOFF_MAX`].
const WANTED_RETRY: Duration = Duration::from_secs(1);
/// A session that lasted this long was healthy: the next reconnect starts
/// from [`BACKOFF_MIN`] again.
const HEALTHY: Duration = Duration::from_secs(5);

/// What the link is doing, as the handle sees it.
#[derive(Clone)]
pub enum LinkState {
    /// (Re)connecting; the reason the last attempt or session ended.
    Connecting { last_error: Option<String> },
    /// Up: requests go out on this connection.
    Up {
        sender: SendRequest<Body>,
        session: u64,
    },
}

impl LinkState {
    pub fn is_up(&self) -> bool {
        matches!(self, LinkState::Up { sender, .. } if !sender.is_closed())
    }
}

/// Why a request could not use the link; the text goes into a `502`.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("relay {relay} unreachable: {reason}")]
    Unavailable { relay: String, reason: String },
    #[error("link to relay {relay} lost: {reason}")]
    Lost { relay: String, reason: String },
    /// The relay reset this one stream; the link itself is fine.
    #[error("relay {relay} refused the stream ({reason})")]
    Refused { relay: String, reason: h2::Reason },
}

/// The HTTP/2 error under `e`, if that is what it is.
fn h2_error(e: &hyper::Error) -> Option<&h2::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = err.source();
    }
    None
}

/// `e` with the errors under it: `connection error: received fatal alert:
/// CertificateRequired` where hyper alone says `connection error`.
fn with_causes(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        let cause = err.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
        source = err.source();
    }
    text
}

/// The reason of a stream reset by the relay, when that is what `e` is.
fn reset_by_relay(e: &hyper::Error) -> Option<h2::Reason> {
    h2_error(e)
        .filter(|h2| h2.is_reset() && h2.is_remote())
        .and_then(h2::Error::reason)
}

/// Whether the relay said it did not process the stream (RFC 9113 8.7): a
/// `REFUSED_STREAM` reset, or a graceful GOAWAY whose last stream id is
/// below it (h2 reports only those streams with the GOAWAY's `NO_ERROR`;
/// the streams it kept end normally or with a broken pipe). Either way the
/// request can go again; for a GOAWAY, on the next session.
fn unprocessed(e: &hyper::Error) -> Option<Unprocessed> {
    let h2 = h2_error(e).filter(|h2| h2.is_remote())?;
    match h2.reason()? {
        h2::Reason::REFUSED_STREAM if h2.is_reset() => Some(Unprocessed::Refused),
        h2::Reason::NO_ERROR if h2.is_go_away() => Some(Unprocessed::GoneAway),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unprocessed {
    /// The relay refused this stream; its connection goes on.
    Refused,
    /// The relay closed the connection before this stream.
    GoneAway,
}

/// The handle shared by every local connection; cheap to clone.
#[derive(Clone)]
pub struct LinkHandle {
    state: watch::Receiver<LinkState>,
    relay: Arc<str>,
    relay_name: Arc<str>,
    /// Whether the link runs over TLS: the `:scheme` of the shim's own
    /// requests to the relay as an origin (CONNECT-UDP, the PAC file).
    tls: bool,
    wait: Duration,
    /// The shim's own `Proxy-Authorization` (`credentials_file`): it replaces
    /// a client's on every request and stream sent over the link.
    authorization: Option<HeaderValue>,
    /// Rung by a request that finds the link down: the actor tries again
    /// within [`WANTED_RETRY`] instead of its whole backoff.
    wanted: Arc<Notify>,
    _stop: Arc<DropGuard>,
}

/// What the actor needs from the configuration.
#[derive(Clone)]
struct Session {
    relay: String,
    tls: Option<RelayTls>,
    relay_name: String,
    connect_timeout: Duration,
    keepalive: Settings,
    /// For the probes: the relay authenticates requests to itself too.
    authorization: Option<HeaderValue>,
}

impl LinkHandle {
    /// Starts the actor; the link comes up in the background.
    pub fn spawn(config: &ShimConfig) -> LinkHandle {
        let (tx, rx) = watch::channel(LinkState::Connecting { last_error: None });
        let stop = CancellationToken::new();
        let authorization = authorization_value(config.authorization.as_ref());
        let session = Session {
            relay: config.relay.clone(),
            tls: config.tls.as_ref().map(|t| t.link.clone()),
            relay_name: config.relay_name.clone(),
            connect_timeout: config.connect_timeout,
            keepalive: config.keepalive,
            authorization: authorization.clone(),
        };
        let wanted = Arc::new(Notify::new());
        tokio::spawn(run(session, tx, wanted.clone(), stop.clone()));
        LinkHandle {
            state: rx,
            relay: config.relay.as_str().into(),
            relay_name: config.relay_name.as_str().into(),
            tls: config.tls.is_some(),
            wait: config.link_wait,
            authorization,
            wanted,
            _stop: Arc::new(stop.drop_guard()),
        }
    }

    /// Follows the link's state (tests and the status endpoint).
    pub fn watch(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    pub fn is_up(&self) -> bool {
        self.state.borrow().is_up()
    }

    /// The relay's name: the authority of the shim's own requests to it.
    pub fn relay_name(&self) -> &str {
        &self.relay_name
    }

    /// The `:scheme` of a request to the relay as an origin (CONNECT-UDP,
    /// the PAC file, the keepalive probe): `https` when the link runs over
    /// TLS, `http` over cleartext (RFC 9298 3.4: that of the URI template,
    /// whose authority is the relay).
    pub fn scheme(&self) -> &'static str {
        scheme(self.tls)
    }

    /// The connection to send on and its session, waiting up to `link_wait`
    /// for one (other than session `not`, which could not take a request).
    async fn sender(&self, not: Option<u64>) -> Result<(SendRequest<Body>, u64), LinkError> {
        let mut state = self.state.clone();
        let usable = |s: &LinkState| match s {
            LinkState::Up { session, .. } => s.is_up() && Some(*session) != not,
            LinkState::Connecting { .. } => false,
        };
        if !usable(&state.borrow()) {
            self.wanted.notify_one();
        }
        let waited = tokio::time::timeout(self.wait, async {
            match &*state.wait_for(usable).await.ok()? {
                LinkState::Up { sender, session } => Some((sender.clone(), *session)),
                LinkState::Connecting { .. } => None,
            }
        })
        .await;
        if let Ok(Some(up)) = waited {
            return Ok(up);
        }
        let reason = match &*state.borrow() {
            LinkState::Connecting {
                last_error: Some(e),
            } => format!("{e} (waited {:?} for the link)", self.wait),
            _ => format!("no link after {:?}", self.wait),
        };
        Err(LinkError::Unavailable {
            relay: self.relay.to_string(),
            reason,
        })
    }

    /// Sends one request (one stream) over the link.
    ///
    /// A request the connection never took (the relay sent GOAWAY as it
    /// drains, so the connection takes no new stream) goes once more, on the
    /// next session. So does a request without a body that the relay says it
    /// did not process ([`unprocessed`]), from a copy of its head. One that
    /// went out and failed otherwise is not repeated: the relay may have
    /// passed it on.
    ///
    /// With the shim's own credentials, the request carries them, whatever
    /// `Proxy-Authorization` it came with.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Incoming>, LinkError> {
        if let Some(value) = &self.authorization {
            req.headers_mut()
                .insert(header::PROXY_AUTHORIZATION, value.clone());
        }
        let lost = |e: &hyper::Error| match reset_by_relay(e) {
            Some(reason) => LinkError::Refused {
                relay: self.relay.to_string(),
                reason,
            },
            None => LinkError::Lost {
                relay: self.relay.to_string(),
                reason: e.to_string(),
            },
        };
        let mut again = req.body().is_end_stream().then(|| Head::of(&req));
        let mut not = None;
        let mut retried = false;
        loop {
            let (mut sender, session) = self.sender(not).await?;
            // An HTTP/2 sender is ready unless its connection is closing;
            // then the request comes back here, unsent.
            let mut e = match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(e) if retried => return Err(lost(e.error())),
                Err(e) => e,
            };
            retried = true;
            if let Some(unsent) = e.take_message() {
                tracing::debug!(session, error = %e.error(), "request not taken; next session");
                req = unsent;
                not = Some(session);
                continue;
            }
            match (unprocessed(e.error()), again.take()) {
                (Some(why), Some(head)) => {
                    tracing::debug!(session, ?why, error = %e.error(), "request not processed by the relay; sending it again");
                    req = head.request();
                    // A refused stream can go again on the same connection.
                    not = (why == Unprocessed::GoneAway).then_some(session);
                }
                _ => return Err(lost(e.error())),
            }
        }
    }
}

/// A copy of a bodyless request's head, to send it again.
struct Head {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    extensions: http::Extensions,
}

impl Head {
    fn of(req: &Request<Body>) -> Head {
        Head {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            extensions: req.extensions().clone(),
        }
    }

    fn request(self) -> Request<Body> {
        let mut req = Request::new(empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        *req.extensions_mut() = self.extensions;
        req
    }
}

/// A `Proxy-Authorization` value marked sensitive (HPACK never indexes it,
/// `Debug` does not show it). A value a header cannot hold is left out: it
/// cannot come from [`basic_credentials_file`](porthole_relay::secret::basic_credentials_file),
/// whose values are `Basic` and base64.
pub fn authorization_value(secret: Option<&Secret>) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(secret?.expose()).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// The first line of a refusal's body (the relay says which route and what
/// failed), read for at most 2 s and 4 KiB; empty if none came.
pub async fn refusal_reason(resp: Response<Incoming>) -> String {
    use http_body_util::{BodyExt, Limited};
    const MAX_REASON: usize = 4096;
    const REASON_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
    match tokio::time::timeout(
        REASON_WAIT,
        Limited::new(resp.into_body(), MAX_REASON).collect(),
    )
    .await
    {
        Ok(Ok(body)) => {
            let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
            text.lines().next().unwrap_or("").trim().to_string()
        }
        _ => String::new(),
    }
}

/// The scheme of the relay's URIs over a link with or without TLS.
pub fn scheme(tls: bool) -> &'static str {
    if tls {
        "https"
    } else {
        "http"
    }
}

/// A `CONNECT host:port` stream request.
pub fn connect_request(authority: &str) -> Result<Request<Body>, http::Error> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(empty())
}

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The wait before the next connection attempt: doubles per failure up to
/// [`BACKOFF_MAX`], and starts again from [`BACKOFF_MIN`] after a session
/// that stayed up for [`HEALTHY`] (a pure decision, tested by table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// A session that lasted `lasted` just ended: how long to wait now.
    pub fn after(&mut self, lasted: Duration) -> Duration {
        if lasted >= HEALTHY {
            self.next = BACKOFF_MIN;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }
}

/// The actor: sessions one after the other, with backoff between them.
async fn run(
    session: Session,
    tx: watch::Sender<LinkState>,
    wanted: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::default();
    let mut id = 0u64;
    loop {
        id += 1;
        let started = Instant::now();
        let reason = tokio::select! {
            () = stop.cancelled() => return,
            reason = run_session(&session, &tx, id) => reason,
        };
        let wait = backoff.after(started.elapsed());
        tracing::warn!(relay = %session.relay, %reason, retry_in = ?wait, "link down");
        tx.send_replace(LinkState::Connecting {
            last_error: Some(reason),
        });
        let ended = tokio::time::Instant::now();
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            () = async {
                wanted.notified().await;
                tokio::time::sleep_until(ended + wait.min(WANTED_RETRY)).await;
            } => tracing::debug!(relay = %session.relay, "a request waits for the link: trying again now"),
        }
    }
}

/// One connection to the relay, from dialling to its end; returns why it ended.
async fn run_session(s: &Session, tx: &watch::Sender<LinkState>, id: u64) -> String {
    let dialled = tokio::time::timeout(s.connect_timeout, TcpStream::connect(&s.relay)).await;
    let tcp = match dialled {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return format!("cannot connect: {e}"),
        Err(_) => return format!("no connection within {:?}", s.connect_timeout),
    };
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &s.tls else {
        return serve_session(tcp, s, tx, id).await;
    };
    let stream = match tls.connect(tcp, &s.relay, s.connect_timeout).await {
        Ok(stream) => stream,
        Err(e) => return e,
    };
    // The link is HTTP/2: a relay that did not choose it cannot carry it.
    match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => serve_session(stream, s, tx, id).await,
        other => {
            let chose = other.map_or("nothing".into(), |p| {
                format!("`{}`", String::from_utf8_lossy(p))
            });
            format!(
                "TLS with {} failed: ALPN: the relay chose {chose}, not h2 (HTTP/2)",
                s.relay
            )
        }
    }
}

/// The HTTP/2 link over a dialled connection (plain TCP or TLS), until it ends.
async fn serve_session<S>(io: S, s: &Session, tx: &watch::Sender<LinkState>, id: u64) -> String
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let meter = Meter::new();
    let io = TokioIo::new(Metered::new(io, meter.clone()));
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        // Response heads as large as the relay reads from internal servers
        // (hyper's own limit is 16 KiB).
        .max_header_list_size(porthole_relay::forward::h2_header_list_size(
            porthole_relay::forward::MAX_RESPONSE_HEAD,
            porthole_relay::forward::MAX_RESPONSE_FIELDS,
        ))
        // HTTP/2 PINGs from hyper's own connection task: they outlive this
        // session, so a connection the relay closed (GOAWAY) whose streams
        // go on is still dropped if the relay stops answering.
        .keep_alive_interval(s.keepalive.idle_ping)
        .keep_alive_timeout(s.keepalive.ping_timeout)
        .keep_alive_while_idle(true);
    let (sender, conn) = match builder.handshake::<_, Body>(io).await {
        Ok(pair) => pair,
        Err(e) => return format!("HTTP/2 handshake failed: {e}"),
    };
    let conn = tokio::spawn(conn);
    // When the session fails: fail the socket's IO (hyper's own connection
    // task then ends and every open stream gets an error) and stop the
    // request dispatcher. When the relay closes it (GOAWAY, as it drains),
    // the streams still open (tunnels, downloads) go on to their end.
    let mut kill = KillOnDrop(Some(meter.clone()));
    let _close = AbortOnDrop(conn.abort_handle());
    tokio::pin!(conn);

    // The link is up only once the relay has answered over it.
    let scheme = scheme(s.tls.is_some());
    let first = tokio::time::timeout(
        s.connect_timeout,
        probe(
            sender.clone(),
            scheme,
            &s.relay_name,
            s.authorization.clone(),
        ),
    );
    match first.await {
        Ok(Ok(status)) => tracing::info!(relay = %s.relay, session = id, %status, "link up"),
        Ok(Err(e)) => {
            // The connection's own error says more (a TLS alert: the relay
            // wants a client certificate, or refused this one).
            let why = match tokio::time::timeout(Duration::from_millis(100), &mut conn).await {
                Ok(Ok(Err(conn_error))) => with_causes(&conn_error),
                _ => e,
            };
            return format!("no HTTP/2 answer: {why}");
        }
        Err(_) => return format!("no HTTP/2 answer within {:?}", s.connect_timeout),
    }
    tx.send_replace(LinkState::Up {
        sender: sender.clone(),
        session: id,
    });

    let mut keepalive = Keepalive::new(s.keepalive, Instant::now());
    // A probe's answer is looked at when it comes, not at its deadline: the
    // next idle probe is then due `idle_ping` after it.
    let answered = Arc::new(Notify::new());
    loop {
        let until = match keepalive.poll(Instant::now(), meter.activity()) {
            Action::Wait(until) => until,
            Action::Dead => {
                return format!(
                    "no answer to a keepalive probe within {:?}",
                    s.keepalive.ping_timeout
                )
            }
            Action::Probe(why) => {
                tracing::debug!(?why, "keepalive probe");
                // Any bytes back answer it; the result itself does not matter.
                let (sender, name) = (sender.clone(), s.relay_name.clone());
                let authorization = s.authorization.clone();
                let answered = answered.clone();
                tokio::spawn(async move {
                    let _ = probe(sender, scheme, &name, authorization).await;
                    answered.notify_one();
                });
                continue;
            }
        };
        tokio::select! {
            ended = &mut conn => {
                return match ended {
                    Ok(Ok(())) => {
                        kill.disarm();
                        "the relay closed the link".to_string()
                    }
                    Ok(Err(e)) => format!("link failed: {e}"),
                    Err(e) => format!("link task failed: {e}"),
                };
            }
            () = tokio::time::sleep_until(until) => {}
            () = meter.sent_unanswered() => {}
            () = answered.notified() => {}
        }
    }
}

struct KillOnDrop(Option<Arc<Meter>>);

impl KillOnDrop {
    /// The socket is left to hyper's connection task, which ends with it.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(meter) = &self.0 {
            meter.kill();
        }
    }
}

/// A tiny request to the relay itself (`HEAD https://<relay name>/` over
/// TLS, `http` over h2c, [`scheme`]): hyper does not let its user send
/// HTTP/2 PING frames, so this stands in for one. Its answer is one HEADERS
/// frame; any status proves the relay alive.
async fn probe(
    mut sender: SendRequest<Body>,
    scheme: &str,
    relay_name: &str,
    authorization: Option<HeaderValue>,
) -> Result<StatusCode, String> {
    let mut req = Request::builder()
        .method(Method::HEAD)
        .uri(format!("{scheme}://{relay_name}/"))
        .body(empty())
        .map_err(|e| format!("bad relay_name: {e}"))?;
    if let Some(value) = authorization {
        req.headers_mut().insert(header::PROXY_AUTHORIZATION, value);
    }
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets_after_a_healthy_session() {
        let ms = Duration::from_millis;
        let mut b = Backoff::default();
        // (how long the session lasted, wait expected)
        let steps = [
            (ms(0), ms(100)),
            (ms(10), ms(200)),
            (ms(10), ms(400)),
            (ms(4_999), ms(800)),
            (ms(5_000), ms(100)),
            (ms(0), ms(200)),
        ];
        for (i, (lasted, want)) in steps.into_iter().enumerate() {
            assert_eq!(b.after(lasted), want, "step {i}");
        }
        for _ in 0..20 {
            b.after(ms(0));
        }
        assert_eq!(b.after(ms(0)), BACKOFF_MAX);
    }
}
