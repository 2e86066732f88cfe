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
use crate::http1::write_error;
use crate::metrics::{GaugeGuard, Name, RouteLabels};
use crate::upstream::Upstream;
use crate::ConnCtx;

/// Copy buffer per direction, allocated only while a burst lasts: the same
/// size as the HTTP/2 tunnels' (16 KiB made one uplink stream 25% slower).
const COPY_BUF: usize = crate::h2::TUNNEL_BUF;

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
    /// Moves bytes until the tunnel ends, then writes the access line.
    /// Takes `&mut self` so that the future holds a reference, not a copy.
    pub async fn run(&mut self, ctx: &ConnCtx) {
        if let Err(e) = (&mut self.tunnel).await {
            tracing::debug!(error = %e, "tunnel ended");
        }
        let (up, down) = self.tunnel.moved();
        drop(self.open.take());
        self.access.bytes_in += up;
        self.access.bytes_out += down;
        tracing::debug!(elapsed = ?self.access.started.elapsed(), "tunnel closed");
        self.access.finish(ctx);
    }
}

/// Moves bytes between the client and a standing tunnel until it ends, then
/// writes the access line.
pub async fn run<S: Io>(client: Conn<S>, tunnel: Standing, ctx: &ConnCtx) {
    let Standing {
        server,
        idle,
        mut access,
        open,
    } = tunnel;
    let moved = relay_bytes(client, server, idle).await;
    drop(open);
    access.bytes_in += moved.up;
    access.bytes_out += moved.down;
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
    ctx: &ConnCtx,
    mut access: Access,
) -> Option<Standing> {
    match dial(client, &host, port, ctx, &mut access).await {
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
    ctx: &ConnCtx,
    access: &mut Access,
) -> Option<(Conn<Upstream>, Duration)> {
    match open(host, port, ctx, access).await {
        Ok(opened) => {
            let answer = &opened.head;
            if client.io.write_all(answer).await.is_err() || client.io.flush().await.is_err() {
                return None;
            }
            access.bytes_out += answer.len() as u64;
            Some((opened.server, opened.idle))
        }
        Err(err) => {
            access.status = err.status();
            let _ = write_error(&mut client.io, &err, true).await;
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
    /// The answer's status (also in `access`).
    pub status: u16,
    /// The answer as an HTTP/1 head.
    pub head: Bytes,
    /// Through an uplink: the inside relay's answer, parsed.
    pub inside: Option<crate::codec::ResponseHead>,
}

/// Chooses the route for `CONNECT host:port` and dials it; through an uplink
/// the inside relay dials the internal server and answers the CONNECT
/// itself. Whatever protocol the client spoke: the caller answers it.
pub async fn open(
    host: &str,
    port: u16,
    ctx: &ConnCtx,
    access: &mut Access,
) -> Result<Opened, RelayError> {
    let config = ctx.shared.config();
    let decision = crate::forward::choose(ctx, &config, host, port)?;
    let route = &decision.route;
    access.route = Some(route.clone());
    let mut server = crate::forward::open_upstream(ctx, &decision)
        .await
        .inspect_err(|err| crate::forward::log_error(ctx, err))?;
    let inside = match decision.uplink {
        None => None,
        Some(_) => forward_connect(&mut server, host, port, route.response_timeout)
            .await
            .map(Some)
            .map_err(|err| {
                crate::forward::log_error(ctx, &RelayError::on_route(err, &route.host));
                RelayError::on_route(
                    ErrorKind::BadResponse {
                        upstream: route.to.host.clone(),
                        cause: "no answer to CONNECT".into(),
                    },
                    &route.host,
                )
            })?,
    };
    let (status, head) = match &inside {
        None => (
            200,
            Bytes::from_static(b"HTTP/1.1 200 Connection established\r\n\r\n"),
        ),
        Some(answer) => (answer.status, answer.raw().clone()),
    };
    access.status = status;
    Ok(Opened {
        server,
        idle: config.limits.idle_timeout,
        status,
        head,
        inside,
    })
}

impl Opened {
    /// The text of a refusal the inside relay answered (status not `200`):
    /// its body, at most 8 KiB of it, read within a second.
    pub async fn refusal_text(&mut self) -> String {
        let framing = self
            .inside
            .as_ref()
            .map(|head| crate::codec::response_framing("CONNECT", head));
        let body_len = match framing {
            Some(Ok(crate::codec::Framing::Length(n))) => n,
            _ => 0,
        };
        let want = body_len.min(8 * 1024) as usize;
        let read = async {
            while self.server.buf.len() < want {
                match self.server.fill().await {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), read).await;
        let end = want.min(self.server.buf.len());
        String::from_utf8_lossy(&self.server.buf[..end]).into_owned()
    }
}

/// Sends `CONNECT host:port` over an uplink session and reads the inside
/// relay's answer head.
async fn forward_connect(
    server: &mut Conn<crate::upstream::Upstream>,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<crate::codec::ResponseHead, ErrorKind> {
    let authority = crate::upstream::display_addr(host, port);
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let upstream = format!("uplink session for {authority}");
    server
        .io
        .write_all(req.as_bytes())
        .await
        .map_err(|cause| ErrorKind::Connect {
            upstream: upstream.clone(),
            cause,
        })?;
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
pub async fn relay_bytes<A: Io, B: Io>(a: Conn<A>, b: Conn<B>, idle: Duration) -> Moved {
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let start = Instant::now();
    let last = AtomicU64::new(0);
    // Bytes read ahead are copied out and the read buffers freed here: an
    // idle tunnel keeps none.
    let (Conn { io: a, buf: a_buf }, Conn { io: b, buf: b_buf }) = (a, b);
    let (a_first, b_first) = (read_ahead(a_buf), read_ahead(b_buf));
    let result = match (into_tcp(a), into_tcp(b)) {
        // Both plain TCP: splice(2), no copy through user space.
        (Ok(a), Ok(b)) => {
            let mut tunnel = crate::splice::Tunnel::new(a, b, a_first, b_first, idle);
            let result = (&mut tunnel).await;
            let (a_to_b, b_to_a) = tunnel.moved();
            up.store(a_to_b, Ordering::Relaxed);
            down.store(b_to_a, Ordering::Relaxed);
            result
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
            let a_to_b = pump(ar, bw, a_first, &up, &last, start);
            let b_to_a = pump(br, aw, b_first, &down, &last, start);
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
