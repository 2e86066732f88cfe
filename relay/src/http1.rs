//! The HTTP/1 server side of a client connection: reads each request head
//! within the limits, asks [`dispatch`](crate::dispatch) what it is for, and
//! hands it to the tunnel, the relay's own endpoints or the HTTP relay; loops
//! while the connection is kept alive.

use std::borrow::Cow;
use std::pin::Pin;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::access_log::{Access, Pending};
use crate::codec::{self, read_request_head, Conn, FieldName, Framing, HeadError, Io, RequestHead};
use crate::deadline::Deadline;
use crate::dispatch::{classify_request, Identity, RequestKind};
use crate::error::{reason_phrase, ErrorKind, RelayError};
use crate::forward::{self, After};
use crate::{gate, local, tunnel, uplink, ConnCtx};

/// Serves HTTP/1 requests on a client connection until it closes.
pub async fn serve<S: Io>(conn: Conn<S>, ctx: ConnCtx) {
    if let Some((conn, standing)) = serve_until_tunnel(conn, &ctx).await {
        tunnel::run(conn, standing, &ctx).await;
    }
}

/// Serves HTTP/1 requests until the connection closes (`None`) or turns into
/// a tunnel, which is returned standing for the caller to run.
///
/// Each request is handled by a boxed future that lives only as long as the
/// request: between requests the connection's own task holds just the
/// connection, and after a while of quiet not even a read buffer, so an
/// idle keep-alive connection costs little memory.
pub async fn serve_until_tunnel<S: Io>(
    mut conn: Conn<S>,
    ctx: &ConnCtx,
) -> Option<(Conn<S>, tunnel::Standing)> {
    let mut first = true;
    let mut timer = {
        let limits = &ctx.shared.config().limits;
        Deadline::new(limits.head_timeout.min(limits.idle_timeout))
    };
    // One wait for shutdown per connection, not one registration per request.
    let mut draining = Box::pin(ctx.shared.until_draining_owned());
    loop {
        if !first
            && conn.buf.is_empty()
            && !next_arrives(&mut conn, ctx, &mut timer, draining.as_mut()).await
        {
            return None;
        }
        let next = next_request(&mut conn, ctx, first, &mut timer);
        match Box::pin(next).await {
            Next::KeepAlive => first = false,
            Next::Close => {
                linger(conn).await;
                return None;
            }
            Next::Tunnel(t) => return Some((conn, t)),
            Next::Uplink { head, data: false } => {
                Box::pin(uplink::outside::serve_control(conn, head, ctx.clone())).await;
                return None;
            }
            Next::Uplink { head, data: true } => {
                Box::pin(uplink::outside::claim_data(conn, head, ctx.clone())).await;
                return None;
            }
        }
    }
}

/// Closes the connection gracefully (RFC 9112 section 9.6): the write side
/// first, then what the client still sends (a request body the relay did not
/// read, a pipelined request) is read and dropped until it closes too, for at
/// most a second and 64 KiB. Closing with unread bytes would send a reset,
/// which can destroy the answer (an error page) before the client reads it.
async fn linger<S: Io>(mut conn: Conn<S>) {
    const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
    const LINGER_BYTES: usize = 64 * 1024;
    let drain = async {
        if conn.io.shutdown().await.is_err() {
            return;
        }
        let mut dropped = 0;
        while dropped < LINGER_BYTES {
            conn.buf.clear();
            match conn.fill().await {
                Ok(n) if n > 0 => dropped += n,
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// What a connection does after one request.
enum Next {
    KeepAlive,
    Close,
    /// A `CONNECT` or an upgrade that stands: bytes flow both ways from now.
    Tunnel(tunnel::Standing),
    /// An uplink's control or data connection (authenticated by the uplink code).
    Uplink {
        head: RequestHead,
        data: bool,
    },
}

/// Between requests: waits for the first byte of the next one, up to the
/// idle timeout; `false` when the connection is to close (timed out, the
/// client left, or the relay drains: it closes idle connections at once).
/// No request's state exists meanwhile, and after `limits.head_timeout` of
/// quiet (10 s by default; busy connections keep theirs) no read buffer
/// either. That is the connection timer's period, so the first wait moves
/// no timer in the runtime's wheel ([`Deadline`]).
async fn next_arrives<S: Io>(
    conn: &mut Conn<S>,
    ctx: &ConnCtx,
    timer: &mut Deadline,
    mut draining: Pin<&mut WaitForCancellationFutureOwned>,
) -> bool {
    let limits = &ctx.shared.config().limits;
    let idle = limits.idle_timeout;
    let quick = idle.min(limits.head_timeout);
    tokio::select! {
        read = timer.limit(quick, conn.fill()) => match read {
            Ok(Ok(n)) => return n > 0,
            Ok(Err(_)) => return false,
            Err(_) if quick >= idle => return false,
            Err(_) => {}
        },
        () = draining.as_mut() => return false,
    }
    conn.release_if_empty();
    tokio::select! {
        read = timer.limit(idle - quick, conn.fill_lean()) => matches!(read, Ok(Ok(n)) if n > 0),
        () = draining => false,
    }
}

/// Reads one request and answers it (or sets up its tunnel).
async fn next_request<S: Io>(
    conn: &mut Conn<S>,
    ctx: &ConnCtx,
    first: bool,
    timer: &mut Deadline,
) -> Next {
    let config = ctx.shared.config();
    let limits = &config.limits;

    let head = timer
        .limit(
            limits.head_timeout,
            read_request_head(conn, limits.max_head_bytes, limits.max_headers),
        )
        .await;
    let head = match head {
        Ok(Ok(head)) => head,
        Ok(Err(HeadError::Eof { .. } | HeadError::Io(_))) => return Next::Close,
        Err(_) if conn.buf.is_empty() && first => return Next::Close, // connected, never spoke
        Err(_) => return refuse(conn, ctx, RelayError::new(ErrorKind::HeadTimeout)).await,
        Ok(Err(HeadError::TooLarge)) => {
            return refuse(conn, ctx, RelayError::new(ErrorKind::HeadTooLarge)).await
        }
        // RFC 9112 section 3: a request target longer than the server parses.
        Ok(Err(HeadError::LineTooLong)) => {
            return refuse(conn, ctx, RelayError::new(ErrorKind::UriTooLong)).await
        }
        Ok(Err(HeadError::Malformed(why))) => {
            return refuse(conn, ctx, RelayError::new(ErrorKind::BadRequest(why))).await
        }
    };

    // Logged also if the request is dropped before it ends (the drain
    // timeout closing a download): with the status sent, if any.
    let mut access = Pending::new(
        Access::new(
            head.method_text(),
            head.target(),
            head.wire_len(),
            Access::logged(ctx),
        ),
        ctx,
    );
    let me = Identity {
        name: &config.relay.name,
        local: ctx.local,
        uplink_session: ctx.uplink_session,
    };
    let kind = match classify_request(&head, me) {
        Ok(kind) => kind,
        Err(why) => {
            let err = RelayError::new(ErrorKind::BadRequest(why));
            return answer_error(conn, ctx, err, access).await;
        }
    };
    let target = match &kind {
        RequestKind::Connect { host, port } => Some((host.as_str(), *port)),
        RequestKind::Relay(t) => Some((t.host.as_str(), t.port)),
        RequestKind::Udp { host, port } => Some((host.as_str(), *port)),
        RequestKind::Own { .. } | RequestKind::Uplink { .. } => None,
    };
    // Uplink control and data connections authenticate with their own
    // secrets, not as users.
    if !matches!(kind, RequestKind::Uplink { .. }) {
        // One set of credentials: with two, which one a later hop or log
        // would take is anyone's guess.
        let mut credentials = head.fields.get_all(FieldName::ProxyAuthorization);
        let authorization = credentials.next();
        if credentials.next().is_some() {
            let err = RelayError::new(ErrorKind::BadRequest("more than one Proxy-Authorization"));
            return answer_error(conn, ctx, err, access).await;
        }
        if let Err(err) = gate::admit(ctx, &config, authorization, target, &mut access).await {
            return answer_error(conn, ctx, err, access).await;
        }
    }
    // A tunnel that came back through a chain of relays (`via`) is a loop,
    // as an HTTP request is (that one is checked on its route).
    if matches!(kind, RequestKind::Connect { .. } | RequestKind::Udp { .. })
        && crate::rewrite::via_contains(&head.fields, &config.relay.name)
    {
        let err = RelayError::new(ErrorKind::Loop);
        return answer_error(conn, ctx, err, access).await;
    }
    match kind {
        RequestKind::Connect { host, port } => {
            // The head shares the read buffer's allocation: both go before
            // the tunnel, which may idle for long.
            let via = crate::rewrite::arrived_via(head.fields.get_all(FieldName::Via));
            drop(head);
            return match tunnel::establish(conn, host, port, &via, ctx, access.take()).await {
                Some(standing) => Next::Tunnel(standing),
                None => Next::Close,
            };
        }
        RequestKind::Uplink { data } => {
            // Uplink connections are not requests: no access line.
            drop(access.take());
            return Next::Uplink { head, data };
        }
        RequestKind::Udp { host, port } => {
            let via = crate::rewrite::arrived_via(head.fields.get_all(FieldName::Via));
            drop(head);
            return udp(conn, &host, port, &via, ctx, access).await;
        }
        _ => {}
    }
    let framing = match codec::request_framing(&head) {
        Ok(f) => f,
        Err(why) => {
            let kind = match why {
                codec::UNSUPPORTED_CODING => ErrorKind::UnsupportedCoding,
                why => ErrorKind::BadRequest(why),
            };
            return answer_error(conn, ctx, RelayError::new(kind), access).await;
        }
    };
    let keep_alive = wants_keep_alive(&head);

    let after = match kind {
        RequestKind::Connect { .. } | RequestKind::Uplink { .. } | RequestKind::Udp { .. } => {
            return Next::Close
        }
        // An HTTP/2 extended CONNECT (WebSocket) to the relay's own
        // endpoints: none of them switches protocols.
        RequestKind::Own { .. } if ctx.must_switch.is_some() => {
            let err = RelayError::new(ErrorKind::NotImplemented(
                "the relay's own endpoints do not switch protocols",
            ));
            return answer_error(conn, ctx, err, access).await;
        }
        RequestKind::Own { path } => {
            local::serve(conn, head, &path, framing, keep_alive, ctx, &mut access).await
        }
        // Max-Forwards: 0 on an OPTIONS or TRACE: this relay is the final
        // recipient (RFC 9110 section 7.6.2).
        RequestKind::Relay(_) if crate::rewrite::max_forwards(&head) == Some(0) => {
            local::final_recipient(conn, &head, framing, keep_alive, &mut access).await
        }
        RequestKind::Relay(target) => {
            let req = forward::Request {
                head: &head,
                config: &config,
                target,
                framing,
                keep_alive,
            };
            match forward::relay(conn, req, ctx, &mut access, timer).await {
                Ok(after) => after,
                Err(err) => {
                    forward::log_error(ctx, &err);
                    // The body was not read: the connection cannot be reused.
                    let close = err.closes_connection() || framing != Framing::Empty || !keep_alive;
                    access.status = err.status();
                    let head = access.method == "HEAD";
                    access.bytes_out += write_error(&mut conn.io, &err, close, head)
                        .await
                        .unwrap_or(0);
                    access.take().finish(ctx);
                    return if close { Next::Close } else { Next::KeepAlive };
                }
            }
        }
    };
    match after {
        After::KeepAlive => {
            access.take().finish(ctx);
            Next::KeepAlive
        }
        After::Close => {
            access.take().finish(ctx);
            Next::Close
        }
        After::Upgrade(server) => Next::Tunnel(tunnel::Standing::new(
            ctx,
            server,
            limits.idle_timeout,
            access.take(),
        )),
    }
}

/// A CONNECT-UDP session: carried here with this relay's UDP socket, or a
/// tunnel to the next hop that answered its own.
async fn udp<S: Io>(
    conn: &mut Conn<S>,
    host: &str,
    port: u16,
    via: &str,
    ctx: &ConnCtx,
    mut access: Pending<'_>,
) -> Next {
    use crate::udp::{Failure, Session};
    match crate::udp::open(host, port, via, ctx, &mut access).await {
        Ok(Session::Socket(socket)) => {
            crate::udp::run(conn, socket, ctx, access).await;
            Next::Close
        }
        Ok(Session::Hop(server)) => {
            let head = crate::udp::switched(&ctx.shared.config().relay.name);
            access.status = 101;
            if forward::write_flush(&mut conn.io, head.as_bytes())
                .await
                .is_err()
            {
                return Next::Close;
            }
            access.bytes_out += head.len() as u64;
            let idle = ctx.shared.config().limits.idle_timeout;
            Next::Tunnel(tunnel::Standing::new(ctx, server, idle, access.take()))
        }
        Err(Failure::Error(err)) => answer_error(conn, ctx, err, access).await,
        Err(Failure::Refused(refusal)) => {
            access.status = refusal.status;
            access.bytes_out += write_refusal(&mut conn.io, &refusal).await.unwrap_or(0);
            access.take().finish(ctx);
            Next::Close
        }
    }
}

/// Whether the client asks to keep the connection (RFC 9112 section 9.3).
fn wants_keep_alive(head: &RequestHead) -> bool {
    if head.fields.has_token(FieldName::Connection, "close") {
        return false;
    }
    head.minor == 1
        || head.fields.has_token(FieldName::Connection, "keep-alive")
        || head
            .fields
            .has_token(FieldName::ProxyConnection, "keep-alive")
}

/// Answers an unreadable request and closes. It gets an access line and
/// counts in the metrics like any request (nginx logs its 400s and 408s),
/// with `-` for the method and target no one could read.
async fn refuse<S: Io>(conn: &mut Conn<S>, ctx: &ConnCtx, err: RelayError) -> Next {
    forward::log_error(ctx, &err);
    let mut access = Access::new(Cow::Borrowed("-"), "-", conn.buf.len(), Access::logged(ctx));
    access.status = err.status();
    access.bytes_out = write_error(&mut conn.io, &err, true, false)
        .await
        .unwrap_or(0);
    access.finish(ctx);
    Next::Close
}

/// Answers a request with an error and closes the connection.
async fn answer_error<S: Io>(
    conn: &mut Conn<S>,
    ctx: &ConnCtx,
    err: RelayError,
    mut access: Pending<'_>,
) -> Next {
    forward::log_error(ctx, &err);
    access.status = err.status();
    let head = access.method == "HEAD";
    access.bytes_out += write_error(&mut conn.io, &err, true, head)
        .await
        .unwrap_or(0);
    access.take().finish(ctx);
    Next::Close
}

/// Writes an error response; returns the bytes written. To a `HEAD`
/// (`head`), without the body (RFC 9110 section 9.3.2), its `Content-Length`
/// still the body's.
pub async fn write_error<W: AsyncWrite + Unpin>(
    w: &mut W,
    err: &RelayError,
    close: bool,
    head: bool,
) -> std::io::Result<u64> {
    let headers = err.headers();
    let extra: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let body = err.body();
    write_simple(
        w,
        err.status(),
        "text/plain; charset=utf-8",
        body.as_bytes(),
        close,
        &extra,
        head,
    )
    .await
}

/// Writes an inside relay's refusal of a `CONNECT` (its status, end-to-end
/// fields and body) and closes; returns the bytes written.
pub async fn write_refusal<W: AsyncWrite + Unpin>(
    w: &mut W,
    refusal: &crate::tunnel::Refusal,
) -> std::io::Result<u64> {
    let length = refusal.body.len().to_string();
    let fields = refusal
        .fields
        .iter()
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
        .chain([(&b"Content-Length"[..], length.as_bytes())]);
    write_response(w, refusal.status, fields, &refusal.body, true).await
}

/// Writes a complete response with a `Content-Length` body; to a `HEAD`
/// (`head`), without the body.
pub async fn write_simple<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
    extra: &[(&str, &str)],
    head: bool,
) -> std::io::Result<u64> {
    let length = body.len().to_string();
    let own = [
        ("Content-Type", content_type),
        ("Content-Length", length.as_str()),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
    ];
    let fields = own
        .iter()
        .chain(extra)
        .map(|(name, value)| (name.as_bytes(), value.as_bytes()));
    let body = if head { &[][..] } else { body };
    write_response(w, status, fields, body, close).await
}

/// Writes a status line, `fields` (with the body's `Content-Length`),
/// `Connection: close` when closing, and `body`, in one write; returns the
/// bytes written.
async fn write_response<'a, W: AsyncWrite + Unpin>(
    w: &mut W,
    status: u16,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    body: &[u8],
    close: bool,
) -> std::io::Result<u64> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).into_bytes();
    crate::rewrite::date_line(&mut out);
    for (name, value) in fields {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(out.len() as u64)
}
