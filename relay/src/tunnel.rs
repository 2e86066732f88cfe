//! Opaque byte tunnels: `CONNECT` (JP4570628B2 figures 8-10) and upgraded
//! connections after `101`. The relay dials first, answers `200` only once the
//! internal connection stands, then moves bytes both ways untouched; a
//! half-close is passed on, and the tunnel ends when both directions have
//! ended, either side fails, or nothing moves for `idle_timeout`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::access_log::Access;
use crate::codec::{Conn, Io};
use crate::error::{ErrorKind, RelayError};
use crate::http1::{write_error, write_refusal};
use crate::metrics::{GaugeGuard, Name, RouteLabels};
use crate::upstream::Upstream;
use crate::ConnCtx;

/// Copy buffer per direction, allocated only while a burst lasts: the same
/// size as the HTTP/2 tunnels' (16 KiB made one uplink stream 25% slower).
const COPY_BUF: usize = crate::h2::TUNNEL_BUF;

/// Bytes moved by a tunnel, counted as they move.
#[derive(Debug, Default)]
pub struct Counts {
    /// Client to upstream.
    pub up: AtomicU64,
    /// Upstream to client.
    pub down: AtomicU64,
}

/// Bytes moved by a tunnel.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    /// Client to upstream.
    pub up: u64,
    /// Upstream to client.
    pub down: u64,
}

/// A tunnel that stands: the upstream end, and what is logged and counted
/// while bytes flow. The client end stays with the caller.
pub struct Standing {
    server: Conn<Upstream>,
    idle: Duration,
    access: Access,
    open: GaugeGuard,
}

impl Standing {
    /// Counts the tunnel open on its route until [`run`] ends.
    pub fn new(ctx: &ConnCtx, server: Conn<Upstream>, idle: Duration, mut access: Access) -> Self {
        access.tunnel = true;
        let open = open_tunnel(ctx, access.route_name());
        Standing {
            server,
            idle,
            access,
            open,
        }
    }
}

impl Standing {
    /// With plain TCP at both ends: the tunnel as a [`Spliced`] one (no copy
    /// through user space, and the least state); otherwise both back (boxed:
    /// the rarer case).
    pub fn into_spliced(
        self,
        client: Conn<TcpStream>,
    ) -> Result<Spliced, Box<(Conn<TcpStream>, Standing)>> {
        let Conn { io, buf } = self.server;
        let server = match io {
            Upstream::Tcp(tcp) => tcp,
            other => {
                let server = Conn { io: other, buf };
                let standing = Standing { server, ..self };
                return Err(Box::new((client, standing)));
            }
        };
        let Conn {
            io: client,
            buf: client_buf,
        } = client;
        let tunnel = crate::splice::Tunnel::new(
            client,
            server,
            read_ahead(client_buf),
            read_ahead(buf),
            self.idle,
        );
        Ok(Spliced {
            tunnel,
            access: self.access,
            open: Some(self.open),
        })
    }
}

/// A standing TCP-to-TCP tunnel with everything it needs until it ends: the
/// listener runs it as a task of its own, so an idle tunnel costs only this
/// (a few hundred bytes) and its two sockets.
pub struct Spliced {
    tunnel: crate::splice::Tunnel,
    access: Access,
    open: Option<GaugeGuard>,
}

impl Spliced {
    /// Moves bytes until the tunnel ends, then writes the access line (also
    /// when the task is dropped: a tunnel the drain timeout cuts is logged).
    /// Takes `&mut self` so that the future holds a reference, not a copy.
    pub async fn run(&mut self, ctx: &ConnCtx) {
        let ending = SplicedEnds { spliced: self, ctx };
        if let Err(e) = (&mut ending.spliced.tunnel).await {
            tracing::debug!(error = %e, "tunnel ended");
        }
    }
}

/// Writes a spliced tunnel's access line when its run ends or is dropped.
struct SplicedEnds<'a> {
    spliced: &'a mut Spliced,
    ctx: &'a ConnCtx,
}

impl Drop for SplicedEnds<'_> {
    fn drop(&mut self) {
        let s = &mut *self.spliced;
        let (up, down) = s.tunnel.moved();
        closed(&mut s.access, s.open.take(), up, down, self.ctx);
    }
}

/// Moves bytes between the client and a standing tunnel until it ends, then
/// writes the access line (also when the task is dropped, as above).
pub async fn run<S: Io>(client: Conn<S>, tunnel: Standing, ctx: &ConnCtx) {
    let Standing {
        server,
        idle,
        access,
        open,
    } = tunnel;
    let ending = RunEnds {
        access,
        open: Some(open),
        counts: Counts::default(),
        ctx,
    };
    relay_bytes(client, server, idle, &ending.counts).await;
}

/// Writes a tunnel's access line when [`run`] ends or is dropped.
struct RunEnds<'a> {
    access: Access,
    open: Option<GaugeGuard>,
    counts: Counts,
    ctx: &'a ConnCtx,
}

impl Drop for RunEnds<'_> {
    fn drop(&mut self) {
        let (up, down) = (
            self.counts.up.load(Ordering::Relaxed),
            self.counts.down.load(Ordering::Relaxed),
        );
        closed(&mut self.access, self.open.take(), up, down, self.ctx);
    }
}

/// A tunnel has closed: no longer counted open, and its access line.
fn closed(access: &mut Access, open: Option<GaugeGuard>, up: u64, down: u64, ctx: &ConnCtx) {
    drop(open);
    access.bytes_in += up;
    access.bytes_out += down;
    tracing::debug!(elapsed = ?access.started.elapsed(), "tunnel closed");
    access.finish(ctx);
}

/// Handles `CONNECT host:port`: chooses the route, dials it and answers the
/// client; the tunnel that stands, or `None` once the client has had its
/// error (and the access line is written).
pub async fn establish<S: Io>(
    client: &mut Conn<S>,
    host: String,
    port: u16,
    via: &str,
    ctx: &ConnCtx,
    mut access: Access,
) -> Option<Standing> {
    match dial(client, &host, port, via, ctx, &mut access).await {
        Some((server, idle)) => Some(Standing::new(ctx, server, idle, access)),
        None => {
            access.finish(ctx);
            None
        }
    }
}

async fn dial<S: Io>(
    client: &mut Conn<S>,
    host: &str,
    port: u16,
    via: &str,
    ctx: &ConnCtx,
    access: &mut Access,
) -> Option<(Conn<Upstream>, Duration)> {
    match open(host, port, via, ctx, access).await {
        Ok(mut opened) if !opened.stands() => {
            // Through an uplink: the inside relay's refusal, passed on; no tunnel.
            let refusal = opened.refusal().await;
            access.bytes_out += write_refusal(&mut client.io, &refusal).await.unwrap_or(0);
            None
        }
        Ok(opened) => {
            let answer = opened.answer();
            if client.io.write_all(answer).await.is_err() || client.io.flush().await.is_err() {
                return None;
            }
            access.bytes_out += answer.len() as u64;
            Some((opened.server, opened.idle))
        }
        Err(err) => {
            access.status = err.status();
            access.bytes_out += write_error(&mut client.io, &err, true, false)
                .await
                .unwrap_or(0);
            None
        }
    }
}

/// The server side of a `CONNECT`, dialled: the answer for the client is
/// `200` from this relay, or through an uplink the inside relay's own.
pub struct Opened {
    pub server: Conn<Upstream>,
    /// The tunnel's idle timeout.
    pub idle: Duration,
    /// Through an uplink or a next hop: the far side's answer, parsed.
    pub inside: Option<crate::codec::ResponseHead>,
    /// A next hop's `2xx` is answered with this relay's own `200` (the
    /// hop's head may carry fields meant for this relay).
    own_answer: bool,
}

/// This relay's own answer to a `CONNECT` whose tunnel stands.
const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Chooses the route for `CONNECT host:port` and dials it; through an uplink
/// the inside relay dials the internal server and answers the CONNECT
/// itself. Whatever protocol the client spoke: the caller answers it.
pub async fn open(
    host: &str,
    port: u16,
    via: &str,
    ctx: &ConnCtx,
    access: &mut Access,
) -> Result<Opened, RelayError> {
    let (config, decision) = crate::forward::choose_tunnel(ctx, host, port, access)?;
    let route = &decision.route;
    let mut server = crate::forward::open_upstream(ctx, &decision)
        .await
        .inspect_err(|err| crate::forward::log_error(ctx, err))?;
    // Through an uplink or a next hop, the CONNECT goes on and the far side
    // answers it.
    let through = match (&decision.uplink, &route.via) {
        (Some(id), _) => Some((format!("uplink {id}"), String::new())),
        (None, Some(hop)) => Some((
            format!("next hop {}", hop.addr()),
            hop.request_fields(via, &config.relay.name),
        )),
        (None, None) => None,
    };
    let inside = match &through {
        None => None,
        Some((name, fields)) => {
            forward_connect(&mut server, host, port, fields, route.response_timeout)
                .await
                .map(Some)
                .map_err(|err| {
                    crate::forward::log_error(ctx, &RelayError::on_route(err, &route.host));
                    RelayError::on_route(
                        ErrorKind::BadResponse {
                            upstream: name.clone(),
                            cause: "no answer to CONNECT".into(),
                        },
                        &route.host,
                    )
                })?
        }
    };
    let far = || {
        through
            .as_ref()
            .map_or("", |(name, _)| name.as_str())
            .to_string()
    };
    if let Some(answer) = inside
        .as_ref()
        .filter(|a| a.status < 200 || (a.status == 407 && route.via.is_some()))
    {
        // A CONNECT is answered with its final status at once; an interim
        // answer from the far side is not one. A next hop's challenge is for
        // this relay, not for its client.
        let cause = match answer.status {
            407 => "the next hop refused this relay's credentials (407); see via_credentials_file"
                .to_string(),
            status => format!("interim answer {status} to CONNECT"),
        };
        let err = ErrorKind::BadResponse {
            upstream: far(),
            cause,
        };
        let err = RelayError::on_route(err, &route.host);
        crate::forward::log_error(ctx, &err);
        return Err(err);
    }
    let opened = Opened {
        server,
        idle: config.limits.idle_timeout,
        inside,
        own_answer: route.via.is_some(),
    };
    access.status = opened.status();
    Ok(opened)
}

/// What an inside relay answered when it refused a forwarded `CONNECT`:
/// passed on to the client, whatever protocol it speaks.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    /// The end-to-end fields (`Retry-After`, `Proxy-Authenticate`, ...):
    /// hop-by-hop ones, the framing and `Date` stay behind.
    pub fields: http::HeaderMap,
    pub body: Bytes,
}

/// The most of a refusal's body that is passed on.
const REFUSAL_BODY_MAX: usize = 64 * 1024;

impl Opened {
    /// The answer's status: this relay's 200, or the inside relay's.
    pub fn status(&self) -> u16 {
        self.inside.as_ref().map_or(200, |answer| answer.status)
    }

    /// The answer as an HTTP/1 head, as the inside relay wrote it.
    pub fn answer(&self) -> &[u8] {
        match &self.inside {
            Some(answer) if !(self.own_answer && self.stands()) => answer.raw(),
            _ => ESTABLISHED,
        }
    }

    /// Whether the tunnel stands: any 2xx answer (RFC 9110 section 9.3.6).
    pub fn stands(&self) -> bool {
        (200..300).contains(&self.status())
    }

    /// The inside relay's refusal (the answer when the tunnel does not
    /// stand), with its body, read within a second.
    pub async fn refusal(&mut self) -> Refusal {
        let status = self.status();
        match self.inside.as_ref() {
            Some(head) => Refusal::read(&mut self.server, head).await,
            None => Refusal {
                status,
                fields: http::HeaderMap::new(),
                body: Bytes::new(),
            },
        }
    }
}

impl Refusal {
    /// The far side's refusal `head` (an inside relay's, a next hop's),
    /// with its body from `server`, read within a second.
    pub async fn read(server: &mut Conn<Upstream>, head: &crate::codec::ResponseHead) -> Refusal {
        let mut body = bytes::BytesMut::new();
        let read = refusal_body(server, head, &mut body);
        if tokio::time::timeout(Duration::from_secs(1), read)
            .await
            .is_err()
        {
            tracing::debug!(
                received = body.len(),
                "a refusal's body did not end within 1 s; passed on as far as it came"
            );
        }
        Refusal {
            status: head.status,
            fields: end_to_end_fields(&head.fields),
            body: body.freeze(),
        }
    }
}

/// Reads the body of a refusal into `body`, whatever its framing (at most
/// [`REFUSAL_BODY_MAX`]; a body that ends early, or whose read is given up,
/// is passed on as far as it came).
async fn refusal_body<S: AsyncRead + Unpin>(
    conn: &mut Conn<S>,
    head: &crate::codec::ResponseHead,
    body: &mut bytes::BytesMut,
) {
    use crate::codec::{BodyReader, Framing, Item};
    let framing = crate::codec::response_framing("CONNECT", head).unwrap_or(Framing::Close);
    let mut reader = BodyReader::new(framing);
    while body.len() < REFUSAL_BODY_MAX {
        match reader.next(conn).await {
            Ok(Item::Data(data)) => body.extend_from_slice(&data),
            Ok(Item::Trailers(_) | Item::End) => break,
            Err(e) => {
                tracing::debug!(error = %e, "the inside relay's refusal body ended early");
                break;
            }
        }
    }
    body.truncate(REFUSAL_BODY_MAX);
}

/// The end-to-end fields of a head, as a header map (RFC 9110 section 7.6.1).
fn end_to_end_fields(fields: &crate::codec::Fields) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (name, value) in fields.iter() {
        let name = http::HeaderName::from_bytes(name);
        if let (Ok(name), Ok(value)) = (name, http::HeaderValue::from_bytes(value)) {
            map.append(name, value);
        }
    }
    crate::rewrite::strip_hop_by_hop_map(&mut map);
    map.remove(http::header::CONTENT_LENGTH);
    map.remove(http::header::DATE);
    map
}

/// Sends `CONNECT host:port` over an uplink session and reads the inside
/// relay's answer head.
async fn forward_connect(
    server: &mut Conn<crate::upstream::Upstream>,
    host: &str,
    port: u16,
    fields: &str,
    timeout: Duration,
) -> Result<crate::codec::ResponseHead, ErrorKind> {
    let authority = crate::upstream::display_addr(host, port);
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{fields}\r\n");
    ask(server, &req, format!("session for {authority}"), timeout).await
}

/// Sends a request head to the far side of a tunnel (an uplinked relay, a
/// next hop) and reads its answer head within `timeout`; `upstream` names it
/// in errors.
pub async fn ask(
    server: &mut Conn<crate::upstream::Upstream>,
    request: &str,
    upstream: String,
    timeout: Duration,
) -> Result<crate::codec::ResponseHead, ErrorKind> {
    if let Err(cause) = server.io.write_all(request.as_bytes()).await {
        return Err(ErrorKind::Connect { upstream, cause });
    }
    match tokio::time::timeout(
        timeout,
        crate::codec::read_response_head(&mut *server, 64 * 1024, 100),
    )
    .await
    {
        Ok(Ok(head)) => Ok(head),
        Ok(Err(e)) => Err(ErrorKind::BadResponse {
            upstream,
            cause: format!("{e:?}"),
        }),
        Err(_) => Err(ErrorKind::ResponseTimeout { upstream }),
    }
}

/// Counts an open tunnel for `route` while the guard lives.
pub fn open_tunnel(ctx: &ConnCtx, route: &str) -> GaugeGuard {
    let labels = RouteLabels {
        route: Name::from(route),
    };
    GaugeGuard::new(ctx.shared.metrics.open_tunnels.get_or_create_owned(&labels))
}

/// Moves bytes both ways between `a` and `b` (first replaying what each has
/// buffered) until both directions end, one fails, or the tunnel idles out.
pub async fn relay_bytes<A: Io, B: Io>(
    a: Conn<A>,
    b: Conn<B>,
    idle: Duration,
    counts: &Counts,
) -> Moved {
    let Counts { up, down } = counts;
    let start = Instant::now();
    let last = AtomicU64::new(0);
    // Bytes read ahead are copied out and the read buffers freed here: an
    // idle tunnel keeps none.
    let (Conn { io: a, buf: a_buf }, Conn { io: b, buf: b_buf }) = (a, b);
    let (a_first, b_first) = (read_ahead(a_buf), read_ahead(b_buf));
    let result = match (into_tcp(a), into_tcp(b)) {
        // Both plain TCP: splice(2), no copy through user space.
        (Ok(a), Ok(b)) => {
            let mut spliced = CountOnDrop {
                tunnel: crate::splice::Tunnel::new(a, b, a_first, b_first, idle),
                counts,
            };
            (&mut spliced.tunnel).await
        }
        // TLS or an uplink on one side: copies through user space. Boxed, so
        // the larger state of this path is not part of every plain tunnel.
        (a, b) => {
            let watchdog = async {
                loop {
                    let since = Duration::from_millis(last.load(Ordering::Relaxed));
                    let idle_for = start.elapsed().saturating_sub(since);
                    if idle_for >= idle {
                        return;
                    }
                    tokio::time::sleep(idle - idle_for).await;
                }
            };
            let (ar, aw) = tokio::io::split(a.map_or_else(Either::Other, Either::Tcp));
            let (br, bw) = tokio::io::split(b.map_or_else(Either::Other, Either::Tcp));
            let a_to_b = pump(ar, bw, a_first, up, &last, start);
            let b_to_a = pump(br, aw, b_first, down, &last, start);
            Box::pin(async {
                tokio::select! {
                    result = futures_util::future::try_join(a_to_b, b_to_a) => result.map(|_| ()),
                    () = watchdog => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle")),
                }
            })
            .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, ?idle, "tunnel ended");
    }
    Moved {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
    }
}

/// A spliced tunnel that leaves its byte counts in `counts` when it ends or
/// is dropped (a drain timeout cuts it: its access line has them).
struct CountOnDrop<'a> {
    tunnel: crate::splice::Tunnel,
    counts: &'a Counts,
}

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        let (a_to_b, b_to_a) = self.tunnel.moved();
        self.counts.up.store(a_to_b, Ordering::Relaxed);
        self.counts.down.store(b_to_a, Ordering::Relaxed);
    }
}

/// What a connection read ahead, in an allocation of its own size; the
/// read buffer itself is freed.
fn read_ahead(buf: bytes::BytesMut) -> Bytes {
    if buf.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&buf)
    }
}

/// The plain TCP socket under a connection, if that is what it is (a client
/// connection, or a dialled upstream); otherwise the connection back.
fn into_tcp<T: Io>(io: T) -> Result<TcpStream, T> {
    let mut slot = Some(io);
    let any = &mut slot as &mut dyn std::any::Any;
    if let Some(tcp) = any
        .downcast_mut::<Option<TcpStream>>()
        .and_then(Option::take)
    {
        return Ok(tcp);
    }
    if let Some(up) = any.downcast_mut::<Option<Upstream>>() {
        match up.take() {
            Some(Upstream::Tcp(tcp)) => return Ok(tcp),
            other => *up = other,
        }
    }
    // The slot is emptied only on the returns above.
    slot.ok_or(())
        .map_or_else(|()| unreachable!("slot emptied without a return"), Err)
}

/// The plain TCP socket under a connection, borrowed: what
/// [`crate::splice::copy_exact`] needs.
pub fn as_tcp<T: Io>(io: &T) -> Option<&TcpStream> {
    let any = io as &dyn std::any::Any;
    match any.downcast_ref::<Upstream>() {
        Some(Upstream::Tcp(tcp)) => Some(tcp),
        Some(_) => None,
        None => any.downcast_ref::<TcpStream>(),
    }
}

/// A connection that turned out plain TCP on one side only.
enum Either<T> {
    Tcp(TcpStream),
    Other(T),
}

impl<T: AsyncRead + Unpin> AsyncRead for Either<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Either::Other(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Either<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Either::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Either::Other(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Either::Other(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Either::Other(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One direction: replay `first`, then copy until EOF, then pass the half-close on.
/// The copy buffer lives only while bytes flow: a reader that has nothing
/// waits without one.
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut r: R,
    mut w: W,
    first: Bytes,
    count: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
) -> std::io::Result<()> {
    if !first.is_empty() {
        w.write_all(&first).await?;
        w.flush().await?;
        count.fetch_add(first.len() as u64, Ordering::Relaxed);
    }
    drop(first);
    let mut one = [0u8; 1];
    loop {
        // Wait for the first byte with a one-byte buffer, then move the burst.
        let n = r.read(&mut one).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&one).await?;
        count.fetch_add(1, Ordering::Relaxed);
        // A burst of one byte (a keystroke, a heartbeat) is traffic too.
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            let n = tokio::select! {
                biased;
                n = r.read(&mut buf) => n?,
                // Nothing more right now: give the buffer back while idle.
                () = tokio::task::yield_now() => break,
            };
            if n == 0 {
                w.shutdown().await?;
                return Ok(());
            }
            w.write_all(&buf[..n]).await?;
            count.fetch_add(n as u64, Ordering::Relaxed);
            last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        // The burst is over: a TLS stream holds records until flushed.
        w.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn refusal_of(raw: &'static [u8]) -> (Refusal, Conn<&'static [u8]>) {
        let mut conn = Conn::new(raw);
        let head = crate::codec::read_response_head(&mut conn, 64 * 1024, 100)
            .await
            .unwrap();
        let mut body = bytes::BytesMut::new();
        refusal_body(&mut conn, &head, &mut body).await;
        let refusal = Refusal {
            status: head.status,
            fields: end_to_end_fields(&head.fields),
            body: body.freeze(),
        };
        (refusal, conn)
    }

    #[tokio::test]
    async fn a_refusal_keeps_its_end_to_end_fields_and_its_chunked_body() {
        let (refusal, _) = refusal_of(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nRetry-After: 3\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nDate: Sat, 28 Nov 2026 01:00:00 GMT\r\nProxy-Authenticate: Basic\r\nProxy-Authenticate: Bearer\r\n\r\n5\r\nslow \r\n5\r\ndown\n\r\n0\r\n\r\n").await;
        assert_eq!(refusal.status, 429);
        assert_eq!(refusal.body, "slow down\n");
        let mut names: Vec<_> = refusal.fields.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "proxy-authenticate", "retry-after"]);
        assert_eq!(
            refusal.fields.get_all("proxy-authenticate").iter().count(),
            2
        );
    }

    #[tokio::test]
    async fn a_refusal_body_ends_at_its_length_or_at_the_close() {
        let (refusal, conn) =
            refusal_of(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnot!after").await;
        assert_eq!(refusal.body, "not!");
        assert_eq!(&conn.buf[..], b"after", "nothing read past the body");
        assert!(refusal.fields.is_empty(), "{:?}", refusal.fields);

        let (refusal, _) = refusal_of(b"HTTP/1.1 502 Bad Gateway\r\n\r\nuntil the end").await;
        assert_eq!(refusal.body, "until the end");
    }

    #[tokio::test]
    async fn a_refusal_body_given_up_on_keeps_what_came() {
        let (mut inside, ours) = tokio::io::duplex(4096);
        inside
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nonly part")
            .await
            .unwrap();
        let mut conn = Conn::new(ours);
        let head = crate::codec::read_response_head(&mut conn, 64 * 1024, 100)
            .await
            .unwrap();
        let mut body = bytes::BytesMut::new();
        let read = refusal_body(&mut conn, &head, &mut body);
        let given_up = tokio::time::timeout(Duration::from_millis(100), read).await;
        assert!(
            given_up.is_err(),
            "the body never ends: the read is given up"
        );
        assert_eq!(&body[..], b"only part");
    }

    #[tokio::test]
    async fn a_long_refusal_body_is_cut_at_its_bound() {
        let mut raw = b"HTTP/1.1 403 Forbidden\r\n\r\n".to_vec();
        raw.resize(raw.len() + REFUSAL_BODY_MAX + 1000, b'x');
        let raw: &'static [u8] = raw.leak();
        let (refusal, _) = refusal_of(raw).await;
        assert_eq!(refusal.body.len(), REFUSAL_BODY_MAX);
    }
}
