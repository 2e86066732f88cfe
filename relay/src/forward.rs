//! HTTP relay: one request from a client connection to the internal server of
//! its route and the response back, streamed both ways (JP4570628B2 figures 6-7).
//!
//! Order: decide the route, rewrite the head, take a pooled connection or dial,
//! send the head, honour `Expect: 100-continue`, stream the request body, read
//! the response head (relaying interim `1xx`), rewrite it, stream the response
//! body (re-framed, or gunzipped for routes with `decompress`), and give the
//! upstream connection back to the pool when it can carry another request.

use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::access_log::Access;
use crate::codec::{
    self, read_response_head, write_data, write_end, BodyError, BodyReader, Conn, FieldName,
    Framing, HeadError, Io, Item, OutFraming, RequestHead, ResponseHead,
};
use crate::deadline::{Deadline, Stall};
use crate::dispatch::RelayTarget;
use crate::error::{ErrorKind, Fault, RelayError};
use crate::rewrite::{self, RequestRewrite, ResponseBody, ResponseRewrite};
use crate::routes::{Decision, Refusal};
use crate::secret::Secret;
use crate::upstream::{self, display_addr, Upstream};
use crate::{splice, tunnel, ConnCtx};

/// How long to wait for an upstream's `100 Continue` before sending the body anyway.
const CONTINUE_WAIT: Duration = Duration::from_secs(1);
/// How long a server that stopped taking the request body has to show its
/// answer (already sent, as a rule) before the relay calls it a failure.
const EARLY_ANSWER_WAIT: Duration = Duration::from_millis(500);
/// Largest response head accepted from an internal server.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most header fields accepted in a response head from an internal server.
pub const MAX_RESPONSE_FIELDS: usize = 200;

/// An HTTP/2 header list as large as an HTTP/1 head of `head_bytes` with
/// `fields` fields (SETTINGS_MAX_HEADER_LIST_SIZE counts 32 bytes per field
/// besides name and value, RFC 9113 section 6.5.2).
pub fn h2_header_list_size(head_bytes: usize, fields: usize) -> u32 {
    u32::try_from(head_bytes.saturating_add(fields.saturating_mul(32))).unwrap_or(u32::MAX)
}

/// What the connection loop does after a relayed request.
pub enum After {
    /// Read the next request on this connection.
    KeepAlive,
    Close,
    /// `101`: tunnel the client connection to this upstream connection.
    Upgrade(Conn<Upstream>),
}

/// Turns a route refusal into the error the client sees.
pub fn refusal_error(refusal: Refusal, host: &str) -> RelayError {
    match refusal {
        Refusal::NoRoute => RelayError::new(ErrorKind::NoRoute {
            host: host.to_string(),
        }),
        Refusal::PortNotAllowed { route, port } => {
            RelayError::on_route(ErrorKind::PortNotAllowed { port }, &route)
        }
    }
}

/// Logs an error at the level its side deserves.
pub fn log_error(ctx: &ConnCtx, err: &RelayError) {
    let route = err.route.as_deref().unwrap_or("-");
    if let Some(cause) = err.connect_failure() {
        let labels = crate::metrics::FailureLabels {
            route: route.into(),
            cause,
        };
        ctx.shared
            .metrics
            .upstream_failures
            .get_or_create(&labels)
            .inc();
    }
    match err.fault() {
        Fault::Client => {
            tracing::debug!(client = %ctx.peer, route, error = %err, "request refused")
        }
        Fault::Upstream => {
            tracing::warn!(client = %ctx.peer, route, error = %err, "upstream failed")
        }
        Fault::Internal => {
            tracing::error!(client = %ctx.peer, route, error = %err, "internal error")
        }
    }
}

/// The request as the connection loop hands it over.
pub struct Request<'a> {
    pub head: &'a RequestHead,
    /// The configuration snapshot the request started with.
    pub config: &'a crate::Config,
    pub target: RelayTarget,
    pub framing: Framing,
    /// The client wants the connection kept open after the response.
    pub keep_alive: bool,
}

/// Relays one request. Errors before anything was sent to the client are
/// returned for the caller to answer; later failures close the connection.
pub async fn relay<S: Io>(
    client: &mut Conn<S>,
    req: Request<'_>,
    ctx: &ConnCtx,
    access: &mut Access,
    timer: &mut Deadline,
) -> Result<After, RelayError> {
    let config = req.config;
    let name = config.relay.name.as_str();
    let decision = choose(ctx, config, &req.target.host, req.target.port, access)?;
    let route = &decision.route;

    if !route.transparent && rewrite::via_contains(&req.head.fields, name) {
        return Err(RelayError::on_route(ErrorKind::Loop, &route.host));
    }
    // An HTTP/1.0 request's Upgrade is ignored (RFC 9110 7.8), and so dropped.
    let upgrade = req.head.minor >= 1
        && req.head.fields.get(FieldName::Upgrade).is_some()
        && req.head.fields.has_token(FieldName::Connection, "upgrade");
    if let Some(via) = &route.via {
        // The hop's own endpoints are not a route's target: this relay's
        // credentials would open them to the client. Nor is CONNECT-UDP
        // relayed as a request: it is asked of a relay itself, and goes to
        // the hop as its own (see udp.rs).
        let to_hop = decision.upstream_port == via.port
            && decision.upstream_host().eq_ignore_ascii_case(&via.host);
        if to_hop
            || (upgrade
                && req
                    .head
                    .fields
                    .has_token(FieldName::Upgrade, crate::udp::PROTOCOL))
        {
            return Err(RelayError::on_route(
                ErrorKind::BadRequest("not relayed to the next hop itself: ask this relay"),
                &route.host,
            ));
        }
    }
    let body_header = rewrite::body_header(req.head, req.framing);
    // Through a next hop: the absolute form, and this relay's credentials
    // for the hop.
    let absolute;
    let (path, proxy_authorization) = match &route.via {
        Some(via) => {
            let authority =
                upstream::http_authority(decision.upstream_host(), decision.upstream_port);
            // `OPTIONS *` is the authority alone in absolute form (RFC 9112 3.2.4).
            absolute = match req.target.path.as_str() {
                "*" => format!("http://{authority}"),
                path => format!("http://{authority}{path}"),
            };
            (
                absolute.as_str(),
                via.authorization.as_ref().map(Secret::expose),
            )
        }
        None => (req.target.path.as_ref(), None),
    };
    let head_out = rewrite::request_head(
        req.head,
        &RequestRewrite {
            name,
            path,
            host: req.target.authority.as_deref(),
            body: body_header,
            upgrade,
            transparent: route.transparent,
            proxy_authorization,
        },
    );

    let (uh, up) = decision.dial();
    // Only errors name the upstream: no string is built for a request that succeeds.
    let upstream_name = || display_addr(uh, up);
    let bad_response = |cause: String| {
        RelayError::on_route(
            ErrorKind::BadResponse {
                upstream: upstream_name(),
                cause,
            },
            &route.host,
        )
    };

    // Send the head: on a pooled connection first, retrying once on a fresh
    // one if the pooled connection turns out closed before any response.
    // Through an uplink, pooled data connections are those of the uplink's
    // current control connection; a fresh one is a new session.
    let has_body = req.framing != Framing::Empty;
    // Once the head is out, a close may come after the server acted on it:
    // only a request whose repetition does no harm is sent again (RFC 9112
    // 9.3.1: a proxy must not retry a non-idempotent one).
    let may_resend = !has_body && idempotent(req.head.method());
    let scope = match &decision.uplink {
        Some(id) => ctx
            .shared
            .uplinks
            .generation(id)
            .map(|generation| upstream::Scope::Uplink {
                id: id.clone(),
                generation,
            }),
        None => Some(upstream::Scope::of_route(route)),
    };
    let pooled = scope.and_then(|scope| ctx.shared.pool.take(uh, up, &scope));
    let (mut server, mut reused) = match pooled {
        Some(mut pooled) => match write_flush(&mut pooled.io, &head_out).await {
            Ok(()) => (pooled, true),
            Err(_) => (send_fresh(ctx, &decision, &head_out).await?, false),
        },
        None => (send_fresh(ctx, &decision, &head_out).await?, false),
    };

    // Expect: 100-continue — give the server a moment to answer first.
    // Interim responses before its answer are passed on as they come (a
    // `103 Early Hints` may precede the `100`); a final one means the body
    // is not wanted.
    let mut early: Option<ResponseHead> = None;
    // Not when the client sent its body without waiting (some of it is
    // here already), nor for HTTP/1.0, whose expectation is ignored (RFC
    // 9110 10.1.1).
    let expects_continue = has_body
        && req.head.minor >= 1
        && client.buf.is_empty()
        && req.head.fields.has_token(FieldName::Expect, "100-continue");
    if expects_continue {
        let until = tokio::time::Instant::now() + CONTINUE_WAIT;
        while let Ok(result) = tokio::time::timeout_at(
            until,
            read_response_head(&mut server, MAX_RESPONSE_HEAD, MAX_RESPONSE_FIELDS),
        )
        .await
        {
            let head = result.map_err(|e| bad_response(head_error_text(&e)))?;
            if !is_interim(head.status) {
                early = Some(head);
                break;
            }
            pass_interim(&mut client.io, &head, name, req.head.minor)
                .await
                .map_err(|_| bad_response("client went away".into()))?;
            if head.status == 100 {
                break;
            }
        }
    }

    // Stream the request body, unless the server already answered finally.
    let mut request_done = true;
    if has_body && early.is_none() {
        let out = match req.framing {
            Framing::Chunked => OutFraming::Chunked,
            _ => OutFraming::Plain,
        };
        // The client's upload may stall for `body_timeout`; the server may
        // stop taking it for its `response_timeout`.
        let mut stall = Stall {
            timer: &mut *timer,
            read: config.limits.body_timeout,
            write: route.response_timeout,
        };
        match copy_body(
            &mut BodyReader::new(req.framing),
            client,
            &mut server.io,
            out,
            None,
            &mut stall,
        )
        .await
        {
            Ok(n) => access.bytes_in += n,
            Err(CopyError::Read(BodyError::Malformed(why))) => {
                return Err(RelayError::new(ErrorKind::BadRequest(why)));
            }
            Err(CopyError::Read(BodyError::Io(e))) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(RelayError::on_route(ErrorKind::BodyTimeout, &route.host));
            }
            Err(CopyError::Read(_)) => return Ok(After::Close), // the client went away
            Err(CopyError::Write(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(RelayError::on_route(
                    ErrorKind::SendTimeout {
                        upstream: upstream_name(),
                    },
                    &route.host,
                ));
            }
            Err(CopyError::Write(e)) => {
                // A server that answered early (a 413 for a body too large)
                // and closed without reading the rest: its answer is the
                // client's, not a 502 (RFC 9112 9.5).
                let answer = tokio::time::timeout(
                    EARLY_ANSWER_WAIT,
                    read_response_head(&mut server, MAX_RESPONSE_HEAD, MAX_RESPONSE_FIELDS),
                )
                .await;
                match answer {
                    Ok(Ok(head)) if !is_interim(head.status) && head.status != 101 => {
                        tracing::debug!(route = %route.host, upstream = %upstream_name(), status = head.status, error = %e, "the server answered before taking the whole body");
                        early = Some(head);
                        request_done = false;
                    }
                    _ => return Err(bad_response(format!("sending the body: {e}"))),
                }
            }
        }
    } else if has_body {
        request_done = false;
    }
    // The server's time to answer counts from the end of the request (an
    // upload may take longer than `response_timeout` by itself).
    timer.set(route.response_timeout);

    // The final response head, relaying interim responses.
    let resp =
        loop {
            let head = match early.take() {
                Some(h) => h,
                None => {
                    match timer
                        .run(read_response_head(
                            &mut server,
                            MAX_RESPONSE_HEAD,
                            MAX_RESPONSE_FIELDS,
                        ))
                        .await
                    {
                        Err(_) => {
                            return Err(RelayError::on_route(
                                ErrorKind::ResponseTimeout {
                                    upstream: upstream_name(),
                                },
                                &route.host,
                            ))
                        }
                        // A pooled connection the server closed meanwhile: one
                        // retry on a fresh connection, for a bodyless
                        // idempotent request.
                        Ok(Err(HeadError::Eof { partial: false } | HeadError::Io(_)))
                            if reused && may_resend =>
                        {
                            reused = false;
                            server = send_fresh(ctx, &decision, &head_out).await?;
                            continue;
                        }
                        Ok(Err(e)) => return Err(bad_response(head_error_text(&e))),
                        Ok(Ok(h)) => h,
                    }
                }
            };
            match head.status {
                101 if upgrade => break head,
                // A client that went away shows when the final response is written.
                status if is_interim(status) => {
                    let _ = pass_interim(&mut client.io, &head, name, req.head.minor).await;
                }
                101 => return Err(bad_response("101 without an upgrade request".into())),
                // The hop's challenge is for this relay, not for its client.
                407 if route.via.is_some() => return Err(bad_response(
                    "the next hop refused this relay's credentials (407); see via_credentials_file"
                        .into(),
                )),
                _ => break head,
            }
        };
    if let Some(why) = ctx
        .must_switch
        .as_ref()
        .and_then(|must| must.refuses(resp.status, resp.fields.get(FieldName::SecWebsocketAccept)))
    {
        return Err(bad_response(why));
    }
    access.status = resp.status;

    if resp.status == 101 {
        let head_back = rewrite::response_head(
            &resp,
            &ResponseRewrite {
                name,
                body: ResponseBody::Length(None),
                decoded: false,
                upgrade: true,
                keep_alive: true,
                client_minor: req.head.minor,
            },
        );
        write_flush(&mut client.io, &head_back)
            .await
            .map_err(|_| bad_response("client went away".into()))?;
        access.bytes_out += head_back.len() as u64;
        return Ok(After::Upgrade(server));
    }

    let in_framing = codec::response_framing(req.head.method(), &resp)
        .map_err(|why| bad_response(why.into()))?;
    let decode = route.decompress
        && in_framing != Framing::Empty
        && matches!(resp.fields.list(FieldName::ContentEncoding)[..], [c] if c.eq_ignore_ascii_case(b"gzip"))
        && !rewrite::accepts_gzip(&req.head.fields);
    let (body, out) = match in_framing {
        // (decode implies a body to read.)
        Framing::Empty | Framing::Length(_) if !decode => (
            ResponseBody::Length(rewrite::response_length(&resp, in_framing)),
            OutFraming::Plain,
        ),
        _ if req.head.minor == 1 => (ResponseBody::Chunked, OutFraming::Chunked),
        _ => (ResponseBody::Close, OutFraming::Plain),
    };
    let keep_alive =
        req.keep_alive && request_done && body != ResponseBody::Close && !ctx.shared.is_draining();
    // A small body that already arrived with the head goes out in the same
    // write: one system call per response instead of two.
    let mut in_framing = in_framing;
    let with_body = match in_framing {
        Framing::Length(n) if n <= 16 * 1024 && server.buf.len() as u64 >= n && !decode => {
            in_framing = Framing::Empty;
            n as usize
        }
        _ => 0,
    };
    let mut head_back = Vec::with_capacity(rewrite::response_head_capacity(&resp) + with_body);
    rewrite::response_head_into(
        &mut head_back,
        &resp,
        &ResponseRewrite {
            name,
            body,
            decoded: decode,
            upgrade: false,
            keep_alive,
            client_minor: req.head.minor,
        },
    );
    head_back.extend_from_slice(&server.buf.split_to(with_body));
    if client.io.write_all(&head_back).await.is_err() {
        return Ok(After::Close);
    }
    access.bytes_out += head_back.len() as u64;

    let mut gunzip = decode.then(Gunzip::new);
    // The server may pause its body for its `response_timeout`; the client
    // may stop reading for `body_timeout`.
    let mut stall = Stall {
        timer,
        read: route.response_timeout,
        write: config.limits.body_timeout,
    };
    match copy_body(
        &mut BodyReader::new(in_framing),
        &mut server,
        &mut client.io,
        out,
        gunzip.as_mut(),
        &mut stall,
    )
    .await
    {
        Ok(n) => access.bytes_out += n,
        // The client went away mid-body: its choice, not worth a warning.
        Err(CopyError::Write(e)) => {
            tracing::debug!(route = %route.host, client = %ctx.peer, error = %e, "client left during the response body");
            return Ok(After::Close);
        }
        Err(e) => {
            tracing::warn!(route = %route.host, upstream = %upstream_name(), error = %e, "response body failed");
            return Ok(After::Close);
        }
    }

    let server_keeps = in_framing != Framing::Close
        && resp.minor == 1
        && !resp.fields.has_token(FieldName::Connection, "close")
        && request_done
        && !(resp.fields.get(FieldName::TransferEncoding).is_some()
            && resp.fields.get(FieldName::ContentLength).is_some());
    if server_keeps {
        match decision.uplink {
            // Only while the uplink's control connection still lives.
            Some(_) => ctx
                .shared
                .pool
                .put_uplink(uh, up, &ctx.shared.uplinks, server),
            None => ctx.shared.pool.put(uh, up, route, server),
        }
    }
    Ok(if keep_alive {
        After::KeepAlive
    } else {
        After::Close
    })
}

/// Methods whose repetition has the effect of one request (RFC 9110 9.2.2).
fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// Decides where a request for `host:port` goes: a route of this relay, or a
/// name an uplinked relay offers (routes win). The route goes on the
/// request's access record, also when it refuses the port.
pub fn choose(
    ctx: &ConnCtx,
    config: &crate::Config,
    host: &str,
    port: u16,
    access: &mut Access,
) -> Result<Decision, RelayError> {
    let decision = decide(ctx, config, host, port);
    access.route = match &decision {
        Ok(d) => Some(d.route.clone()),
        Err(_) => config.routes.lookup(host).cloned(),
    };
    decision
}

fn decide(
    ctx: &ConnCtx,
    config: &crate::Config,
    host: &str,
    port: u16,
) -> Result<Decision, RelayError> {
    match config.routes.decide(host, port) {
        Ok(d) => Ok(d),
        Err(Refusal::NoRoute) => {
            let Some(id) = ctx.shared.uplinks.offered_by(host) else {
                // A name an uplink may offer while none does (it is away, or
                // has not registered again since this relay started): the
                // gateway failing, not a name unknown for good.
                if let Some(a) = config.accept_uplinks.iter().find(|a| a.may_offer(host)) {
                    return Err(RelayError::on_route(
                        ErrorKind::Connect {
                            upstream: format!("uplink {}", a.id),
                            cause: std::io::Error::new(
                                std::io::ErrorKind::NotConnected,
                                "no connected uplink offers this name",
                            ),
                        },
                        &format!("{host} (uplink {})", a.id),
                    ));
                }
                return Err(refusal_error(Refusal::NoRoute, host));
            };
            let accept = config.accept_uplinks.iter().find(|a| a.id == id);
            let session_timeout = accept.map_or(Duration::from_secs(10), |a| a.session_timeout);
            // The inside relay applies its own route (ports, timeouts); this one only carries.
            let route = crate::config::Route {
                host: host.to_string(),
                to: crate::routes::Target {
                    host: format!("uplink {id}"),
                    port: None,
                },
                ports: vec![port],
                connect_timeout: session_timeout,
                response_timeout: Duration::from_secs(300),
                transparent: false,
                decompress: false,
                tls: None,
                // CONNECT-UDP goes on to the inside relay, whose route decides.
                udp: true,
                via: None,
            };
            Ok(Decision {
                route: std::sync::Arc::new(route),
                upstream_name: Some(host.to_string()),
                upstream_port: port,
                uplink: Some(id),
            })
        }
        Err(refusal) => Err(refusal_error(refusal, host)),
    }
}

/// The route for a tunnel to `host:port` (`CONNECT`, CONNECT-UDP), noted on
/// its access record, with the configuration it was chosen from.
pub fn choose_tunnel(
    ctx: &ConnCtx,
    host: &str,
    port: u16,
    access: &mut Access,
) -> Result<(std::sync::Arc<crate::Config>, Decision), RelayError> {
    let config = ctx.shared.config();
    let decision = choose(ctx, &config, host, port, access)?;
    Ok((config, decision))
}

/// A new connection towards the decision's server: dialled, or an uplink session.
pub async fn open_upstream(ctx: &ConnCtx, d: &Decision) -> Result<Conn<Upstream>, RelayError> {
    match &d.uplink {
        Some(id) => {
            ctx.shared
                .uplinks
                .open_session(
                    id,
                    d.upstream_host(),
                    d.upstream_port,
                    d.route.connect_timeout,
                )
                .await
        }
        // A next hop, in TLS when it is configured so.
        None if d.route.via.is_some() => {
            let (host, port) = d.dial();
            upstream::open(host, port, &d.route).await.map(Conn::new)
        }
        // A tunnel's internal server: plain TCP (the client speaks its own
        // TLS through the tunnel, whatever the route's `tls`).
        None => upstream::connect(
            d.dial().0,
            d.dial().1,
            d.route.connect_timeout,
            &d.route.host,
        )
        .await
        .map(|s| Conn::new(Upstream::Tcp(s))),
    }
}

/// Opens a new upstream connection (dialled, or a new uplink session) and
/// sends the request head on it.
async fn send_fresh(
    ctx: &ConnCtx,
    d: &Decision,
    head: &[u8],
) -> Result<Conn<Upstream>, RelayError> {
    let route = &d.route;
    let (host, port) = d.dial();
    let mut server = match &d.uplink {
        Some(_) => open_upstream(ctx, d).await?,
        None => Conn::new(upstream::open(host, port, route).await?),
    };
    write_flush(&mut server.io, head).await.map_err(|cause| {
        let kind = match &d.uplink {
            Some(_) => ErrorKind::BadResponse {
                upstream: display_addr(host, port),
                cause: format!("sending the request: {cause}"),
            },
            None => ErrorKind::Connect {
                upstream: display_addr(host, port),
                cause,
            },
        };
        RelayError::on_route(kind, &route.host)
    })?;
    Ok(server)
}

/// Bodies of at least this length are spliced when both sides are plain TCP;
/// below it the pipe's three system calls cost more than the copy.
const SPLICE_BODY_MIN: u64 = 64 * 1024;

/// Relays a body of `len` bytes between two plain TCP sockets (a response,
/// or a request body) without copying it through user space: the bytes read
/// ahead with the head are written as they are, the rest is spliced (Linux
/// `splice(2)`). `None` when either side is something else (TLS, an uplink).
async fn splice_body<R: Io, W: Io>(
    from: &mut Conn<R>,
    to: &mut W,
    len: u64,
    stall: &mut Stall<'_>,
) -> Option<Result<u64, CopyError>> {
    tunnel::as_tcp(&from.io)?;
    tunnel::as_tcp(to)?;
    let ahead = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(from.buf.len());
    if ahead > 0 {
        let first = from.buf.split_to(ahead);
        if let Err(e) = stall.write(to.write_all(&first)).await {
            return Some(Err(CopyError::Write(e)));
        }
    }
    let (from, to) = (tunnel::as_tcp(&from.io)?, tunnel::as_tcp(to)?);
    let moved = splice::copy_exact(from, to, len - ahead as u64, stall).await;
    Some(match moved {
        Ok(n) => Ok(n + ahead as u64),
        Err(splice::CopyFailed::Read(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(CopyError::Read(BodyError::Truncated))
        }
        Err(splice::CopyFailed::Read(e)) => Err(CopyError::Read(BodyError::Io(e))),
        Err(splice::CopyFailed::Write(e)) => Err(CopyError::Write(e)),
    })
}

/// An interim response: `1xx` other than `101`, which ends the exchange
/// with an upgrade.
fn is_interim(status: u16) -> bool {
    (100..200).contains(&status) && status != 101
}

/// Passes an interim response on to the client. A proxy forwards every
/// `1xx` it did not ask for itself (RFC 9110 15.2), so `100 Continue` goes
/// on whether or not the client sent `Expect` (the relay never adds one);
/// an HTTP/1.0 client gets none, as it cannot tell one from the final
/// response.
async fn pass_interim<W: AsyncWrite + Unpin>(
    client: &mut W,
    head: &ResponseHead,
    name: &str,
    client_minor: u8,
) -> std::io::Result<()> {
    if client_minor == 0 {
        return Ok(());
    }
    let interim = rewrite::response_head(
        head,
        &ResponseRewrite {
            name,
            body: ResponseBody::Length(None),
            decoded: false,
            upgrade: false,
            keep_alive: true,
            client_minor,
        },
    );
    write_flush(client, &interim).await
}

/// Writes and flushes: a TLS stream may otherwise hold the bytes while the
/// relay waits for an answer to them.
pub(crate) async fn write_flush<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

fn head_error_text(e: &HeadError) -> String {
    match e {
        HeadError::Eof { .. } => "connection closed before a response".into(),
        HeadError::TooLarge | HeadError::LineTooLong => "response head too large".into(),
        HeadError::Malformed(why) => (*why).into(),
        HeadError::Io(e) => e.to_string(),
    }
}

#[derive(Debug)]
pub enum CopyError {
    Read(BodyError),
    Write(std::io::Error),
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::Read(e) => write!(f, "reading: {e}"),
            CopyError::Write(e) => write!(f, "writing: {e}"),
        }
    }
}

/// Streams a body from `from` to `to`, re-framed as `out`, optionally
/// gunzipped. Returns the bytes written. A large body of known length passed
/// as it is between two plain TCP sockets is spliced instead. A sender or
/// receiver that stalls past `stall` ends it with a `TimedOut` error.
pub async fn copy_body<R: Io, W: Io>(
    reader: &mut BodyReader,
    from: &mut Conn<R>,
    to: &mut W,
    out: OutFraming,
    mut gunzip: Option<&mut Gunzip>,
    stall: &mut Stall<'_>,
) -> Result<u64, CopyError> {
    if let (Some(len), OutFraming::Plain, None) = (reader.length_left(), out, &gunzip) {
        if len >= SPLICE_BODY_MIN {
            if let Some(spliced) = splice_body(from, to, len, stall).await {
                if spliced.is_ok() {
                    reader.finish();
                }
                return spliced;
            }
        }
    }
    let mut written = 0u64;
    loop {
        let item = match stall.read(async { Ok(reader.next(from).await) }).await {
            Ok(item) => item.map_err(CopyError::Read)?,
            Err(stalled) => return Err(CopyError::Read(BodyError::Io(stalled))),
        };
        match item {
            Item::Data(data) => match gunzip.as_deref_mut() {
                None => {
                    stall
                        .write(write_data(to, out, &data))
                        .await
                        .map_err(CopyError::Write)?;
                    written += data.len() as u64;
                }
                Some(g) => {
                    let mut input = &data[..];
                    loop {
                        let (used, plain) = g.step(input).map_err(CopyError::Read)?;
                        input = &input[used..];
                        let (len, more) = (plain.len(), plain.len() == Gunzip::OUT_LEN);
                        stall
                            .write(write_data(to, out, plain))
                            .await
                            .map_err(CopyError::Write)?;
                        written += len as u64;
                        if (input.is_empty() && !more) || (used == 0 && len == 0) {
                            break;
                        }
                    }
                }
            },
            Item::Trailers(t) => {
                let trailers = (out == OutFraming::Chunked).then_some(&t[..]);
                stall
                    .write(write_end(to, out, trailers))
                    .await
                    .map_err(CopyError::Write)?;
                return Ok(written);
            }
            Item::End => {
                stall
                    .write(write_end(to, out, None))
                    .await
                    .map_err(CopyError::Write)?;
                return Ok(written);
            }
        }
    }
}

/// A streaming gzip decoder with a bounded output buffer: a small compressed
/// chunk that expands hugely is emitted piece by piece, never held whole.
pub struct Gunzip {
    header_left: Option<Vec<u8>>,
    inflate: flate2::Decompress,
    out: Vec<u8>,
    finished: bool,
}

impl Default for Gunzip {
    fn default() -> Self {
        Gunzip::new()
    }
}

impl Gunzip {
    /// Output produced per step at most; a full output means inflate may hold more.
    pub const OUT_LEN: usize = 32 * 1024;

    pub fn new() -> Gunzip {
        Gunzip {
            header_left: Some(Vec::new()),
            inflate: flate2::Decompress::new(false),
            out: vec![0; Gunzip::OUT_LEN],
            finished: false,
        }
    }

    /// Consumes some of `input`; returns how much was used and the plain bytes produced.
    pub fn step(&mut self, input: &[u8]) -> Result<(usize, &[u8]), BodyError> {
        if self.finished {
            return Ok((input.len(), &[]));
        }
        if let Some(header) = self.header_left.as_mut() {
            // Collect the gzip header (RFC 1952) before inflating.
            let before = header.len();
            header.extend_from_slice(input);
            match gzip_header_len(header)? {
                None => return Ok((input.len(), &[])),
                Some(len) => {
                    self.header_left = None;
                    return Ok((len - before, &[]));
                }
            }
        }
        let in_before = self.inflate.total_in();
        let out_before = self.inflate.total_out();
        let status = self
            .inflate
            .decompress(input, &mut self.out, flate2::FlushDecompress::None)
            .map_err(|_| BodyError::Malformed("invalid gzip data"))?;
        let used = (self.inflate.total_in() - in_before) as usize;
        let produced = (self.inflate.total_out() - out_before) as usize;
        if status == flate2::Status::StreamEnd {
            self.finished = true;
            return Ok((input.len(), &self.out[..produced]));
        }
        Ok((used, &self.out[..produced]))
    }
}

/// The length of a complete gzip header at the start of `h`, `None` if more is needed.
fn gzip_header_len(h: &[u8]) -> Result<Option<usize>, BodyError> {
    if h.len() < 10 {
        return Ok(None);
    }
    if h[0] != 0x1f || h[1] != 0x8b || h[2] != 8 {
        return Err(BodyError::Malformed("not gzip data"));
    }
    let flags = h[3];
    let mut at = 10;
    if flags & 0x04 != 0 {
        let Some(xlen) = h.get(at..at + 2) else {
            return Ok(None);
        };
        at += 2 + usize::from(u16::from_le_bytes([xlen[0], xlen[1]]));
    }
    for bit in [0x08, 0x10] {
        if flags & bit != 0 {
            match h.get(at..).and_then(|rest| memchr::memchr(0, rest)) {
                Some(i) => at += i + 1,
                None => return Ok(None),
            }
        }
    }
    if flags & 0x02 != 0 {
        at += 2;
    }
    Ok((h.len() >= at).then_some(at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gunzip_in_small_pieces() {
        let plain: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251) as u8..=(i % 251) as u8)
            .collect();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&plain).unwrap();
        let gz = enc.finish().unwrap();
        let mut g = Gunzip::new();
        let mut out = Vec::new();
        for piece in gz.chunks(7) {
            let mut input = piece;
            while !input.is_empty() {
                let (used, produced) = g.step(input).unwrap();
                out.extend_from_slice(produced);
                input = &input[used..];
                if used == 0 && produced.is_empty() {
                    break;
                }
            }
        }
        // Drain what inflate still holds.
        loop {
            let (_, produced) = g.step(&[]).unwrap();
            if produced.is_empty() {
                break;
            }
            out.extend_from_slice(produced);
        }
        assert_eq!(out, plain);
    }

    #[test]
    fn gunzip_refuses_garbage() {
        let mut g = Gunzip::new();
        assert!(g.step(b"this is not gzip at all").is_err());
    }
}
