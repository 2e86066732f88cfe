//! The HTTP/1 server side of a client connection: reads each request head
//! within the limits, asks [`dispatch`](crate::dispatch) what it is for, and
//! hands it to the tunnel, the relay's own endpoints or the HTTP relay; loops
//! while the connection is kept alive.

use std::time::Instant;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::access_log::Access;
use crate::codec::{self, read_request_head, Conn, Framing, HeadError, Io, RequestHead};
use crate::dispatch::{classify_request, Identity, RequestKind};
use crate::error::{reason_phrase, ErrorKind, RelayError};
use crate::forward::{self, After};
use crate::{gate, local, tunnel, uplink, ConnCtx};

/// Serves HTTP/1 requests on a client connection until it closes.
pub async fn serve<S: Io>(mut conn: Conn<S>, ctx: ConnCtx) {
    let mut first = true;
    loop {
        let config = ctx.shared.config();
        let limits = &config.limits;

        // Between requests: wait for the first byte of the next one, up to the
        // idle timeout; a draining relay closes idle connections at once.
        if !first && conn.buf.is_empty() {
            tokio::select! {
                read = tokio::time::timeout(limits.idle_timeout, conn.fill()) => match read {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                },
                () = ctx.shared.shutdown.cancelled() => return,
            }
        }
        let head = tokio::time::timeout(
            limits.head_timeout,
            read_request_head(&mut conn, limits.max_head_bytes, limits.max_headers),
        )
        .await;
        let head = match head {
            Ok(Ok(head)) => head,
            Ok(Err(HeadError::Eof { .. } | HeadError::Io(_))) => return,
            Err(_) if conn.buf.is_empty() && first => return, // connected, never spoke
            Err(_) => return refuse(conn, &ctx, RelayError::new(ErrorKind::HeadTimeout)).await,
            Ok(Err(HeadError::TooLarge)) => {
                return refuse(conn, &ctx, RelayError::new(ErrorKind::HeadTooLarge)).await
            }
            Ok(Err(HeadError::Malformed(why))) => {
                return refuse(conn, &ctx, RelayError::new(ErrorKind::BadRequest(why))).await
            }
        };
        first = false;

        let mut access = Access::new(head.method(), head.target(), head.wire_len());
        let me = Identity {
            name: &config.relay.name,
            local: ctx.local,
        };
        let kind = match classify_request(&head, me) {
            Ok(kind) => kind,
            Err(why) => {
                let err = RelayError::new(ErrorKind::BadRequest(why));
                return answer_error(conn, &ctx, err, &mut access).await;
            }
        };
        let target = match &kind {
            RequestKind::Connect { host, port } => Some((host.as_str(), *port)),
            RequestKind::Relay(t) => Some((t.host.as_str(), t.port)),
            RequestKind::Own { .. } | RequestKind::Uplink { .. } => None,
        };
        // Uplink control and data connections authenticate with their own
        // secrets, not as users.
        if !matches!(kind, RequestKind::Uplink { .. }) {
            let authorization = head.fields.get("proxy-authorization");
            match gate::admit(&ctx, &config, authorization, target).await {
                Ok(user) => access.user = user,
                Err(err) => return answer_error(conn, &ctx, err, &mut access).await,
            }
        }
        match kind {
            RequestKind::Connect { host, port } => {
                return tunnel::connect(conn, host, port, &ctx, access).await
            }
            RequestKind::Uplink { data: false } => {
                return uplink::outside::serve_control(conn, head, ctx).await
            }
            RequestKind::Uplink { data: true } => {
                return uplink::outside::claim_data(conn, head, ctx).await
            }
            _ => {}
        }
        let framing = match codec::request_framing(&head) {
            Ok(f) => f,
            Err(why) => {
                let err = RelayError::new(ErrorKind::BadRequest(why));
                return answer_error(conn, &ctx, err, &mut access).await;
            }
        };
        let keep_alive = wants_keep_alive(&head);

        let after = match kind {
            RequestKind::Connect { .. } | RequestKind::Uplink { .. } => return,
            RequestKind::Own { path } => {
                local::serve(
                    &mut conn,
                    &head,
                    &path,
                    framing,
                    keep_alive,
                    &ctx,
                    &mut access,
                )
                .await
            }
            RequestKind::Relay(target) => {
                let req = forward::Request {
                    head: &head,
                    target,
                    framing,
                    keep_alive,
                };
                match forward::relay(&mut conn, req, &ctx, &mut access).await {
                    Ok(after) => after,
                    Err(err) => {
                        forward::log_error(&ctx, &err);
                        // The body was not read: the connection cannot be reused.
                        let close =
                            err.closes_connection() || framing != Framing::Empty || !keep_alive;
                        access.status = err.status();
                        access.bytes_out +=
                            write_error(&mut conn.io, &err, close).await.unwrap_or(0);
                        access.finish(&ctx);
                        if close {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        match after {
            After::KeepAlive => access.finish(&ctx),
            After::Close => {
                access.finish(&ctx);
                return;
            }
            After::Upgrade(server) => {
                let started = Instant::now();
                access.tunnel = true;
                let open = tunnel::open_tunnel(&ctx, access.route.as_deref().unwrap_or("-"));
                let moved = tunnel::relay_bytes(conn, server, limits.idle_timeout).await;
                drop(open);
                access.bytes_in += moved.up;
                access.bytes_out += moved.down;
                tracing::debug!(elapsed = ?started.elapsed(), "upgraded connection closed");
                access.finish(&ctx);
                return;
            }
        }
    }
}

/// Whether the client asks to keep the connection (RFC 9112 section 9.3).
fn wants_keep_alive(head: &RequestHead) -> bool {
    if head.fields.has_token("connection", "close") {
        return false;
    }
    head.minor == 1
        || head.fields.has_token("connection", "keep-alive")
        || head.fields.has_token("proxy-connection", "keep-alive")
}

/// Answers an unreadable request and closes (no access line: there was no request).
async fn refuse<S: Io>(mut conn: Conn<S>, ctx: &ConnCtx, err: RelayError) {
    forward::log_error(ctx, &err);
    let _ = write_error(&mut conn.io, &err, true).await;
}

/// Answers a request with an error and closes the connection.
async fn answer_error<S: Io>(
    mut conn: Conn<S>,
    ctx: &ConnCtx,
    err: RelayError,
    access: &mut Access,
) {
    forward::log_error(ctx, &err);
    access.status = err.status();
    access.bytes_out += write_error(&mut conn.io, &err, true).await.unwrap_or(0);
    access.finish(ctx);
}

/// Writes an error response; returns the bytes written.
pub async fn write_error<W: AsyncWrite + Unpin>(
    w: &mut W,
    err: &RelayError,
    close: bool,
) -> std::io::Result<u64> {
    let headers = err.headers();
    let extra: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    write_simple(
        w,
        err.status(),
        "text/plain; charset=utf-8",
        err.body().as_bytes(),
        close,
        &extra,
    )
    .await
}

/// Writes a complete response with a `Content-Length` body.
pub async fn write_simple<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
    extra: &[(&str, &str)],
) -> std::io::Result<u64> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
        reason_phrase(status),
        body.len()
    );
    for (name, value) in extra {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(bytes.len() as u64)
}
