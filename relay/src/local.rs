//! The relay's own endpoints on the aggregate port: requests whose host is the
//! relay's `name` or the address the client connected to. `GET
//! /events/{topic}` polls events, `POST /events/{topic}` publishes one for
//! `[events] publishers`, `GET /proxy.pac` is the PAC file, `GET /services`
//! lists services. Each also answers `HEAD` and `OPTIONS`, and another
//! method with `405` and the same `Allow`; every other path is `404`.

use crate::access_log::Access;
use crate::codec::{BodyReader, Conn, Framing, Io, Item, RequestHead};
use crate::error::{ErrorKind, RelayError};
use crate::events;
use crate::forward::After;
use crate::http1::{write_error, write_simple};
use crate::pac::CONTENT_TYPE as PAC_TYPE;
use crate::ConnCtx;

/// Most request body the relay reads and discards to keep a connection usable.
const MAX_DISCARD: u64 = 64 * 1024;

/// What the relay's own endpoints take.
const READ_ONLY: &str = "GET, HEAD, OPTIONS";
/// What `/events/{topic}` takes when `[events] publishers` is set.
const WITH_PUBLISH: &str = "GET, HEAD, POST, OPTIONS";

/// The methods the own endpoint at `path` takes, for `Allow` in a `405` and
/// in the answer to `OPTIONS` (`*`: the relay as a whole); `None` for a path
/// that is no endpoint.
fn allowed(path: &str, publishing: bool) -> Option<&'static str> {
    match path {
        "/proxy.pac" | "/services" => Some(READ_ONLY),
        p if p == "*" || p.starts_with("/events/") => {
            Some(if publishing { WITH_PUBLISH } else { READ_ONLY })
        }
        _ => None,
    }
}

/// Serves one request for the relay itself. Takes the head: a long poll lets
/// it go (and the read buffer it shares) while it waits.
pub async fn serve<S: Io>(
    conn: &mut Conn<S>,
    head: RequestHead,
    path: &str,
    framing: Framing,
    keep_alive: bool,
    ctx: &ConnCtx,
    access: &mut Access,
) -> After {
    let (path_only, query) = path.split_once('?').unwrap_or((path, ""));
    let publishing = ctx.shared.config().rules.publishing();
    let allow = allowed(path_only, publishing);
    let publish_request = head.method() == "POST" && publishing;
    if let Some(topic) = path_only
        .strip_prefix("/events/")
        .filter(|_| publish_request)
    {
        drop(head);
        return publish(conn, topic, framing, keep_alive, ctx, access).await;
    }
    let body_read = matches!(
        read_body(conn, framing, MAX_DISCARD, false).await,
        Body::Read(_)
    );
    let keep_alive = keep_alive && body_read;
    if let Some(topic) = path_only.strip_prefix("/events/") {
        if matches!(head.method(), "GET" | "HEAD") {
            return events::poll::serve(conn, head, topic, query, keep_alive, ctx, access).await;
        }
    }
    // A HEAD gets the GET's head without its body (RFC 9110 section 9.3.2).
    let head_only = head.method() == "HEAD";
    let close = !keep_alive;
    let written = if let Some(pac) = crate::pac::for_request(&head, path, ctx) {
        access.status = 200;
        let pac = pac.as_bytes();
        write_simple(&mut conn.io, 200, PAC_TYPE, pac, close, &[], head_only).await
    } else if matches!(head.method(), "GET" | "HEAD") && path_only == "/services" {
        access.status = 200;
        let body = services_json(ctx);
        let json = "application/json";
        write_simple(
            &mut conn.io,
            200,
            json,
            body.as_bytes(),
            close,
            &[],
            head_only,
        )
        .await
    } else if let (Some(allow), "OPTIONS") = (allow, head.method()) {
        // What the endpoint takes (RFC 9110 section 9.3.7).
        access.status = 200;
        let allow = [("Allow", allow)];
        write_simple(&mut conn.io, 200, "text/plain", b"", close, &allow, false).await
    } else {
        // RFC 9110 section 15.5.6: a `405` says what the endpoint takes.
        let err = match allow {
            Some(allow) => RelayError::new(ErrorKind::MethodNotAllowed { allow }),
            None => RelayError::new(ErrorKind::NotFound),
        };
        access.status = err.status();
        write_error(&mut conn.io, &err, close, head_only).await
    };
    finish(written, keep_alive, access)
}

/// Answers an `OPTIONS` or `TRACE` whose `Max-Forwards` is 0 (RFC 9110
/// sections 7.6.2, 9.3.7, 9.3.8): `200`, for a `TRACE` with the request as
/// received (`message/http`), its credentials and cookies left out.
pub async fn final_recipient<S: Io>(
    conn: &mut Conn<S>,
    head: &RequestHead,
    framing: Framing,
    keep_alive: bool,
    access: &mut Access,
) -> After {
    let body_read = matches!(
        read_body(conn, framing, MAX_DISCARD, false).await,
        Body::Read(_)
    );
    let close = !(keep_alive && body_read);
    access.status = 200;
    let written = if head.method() == "TRACE" {
        let mut echo = format!("TRACE {} HTTP/1.{}\r\n", head.target(), head.minor).into_bytes();
        for (name, value) in head.fields.iter() {
            let secret = ["authorization", "proxy-authorization", "cookie"]
                .iter()
                .any(|s| name.eq_ignore_ascii_case(s.as_bytes()));
            if !secret {
                echo.extend_from_slice(name);
                echo.extend_from_slice(b": ");
                echo.extend_from_slice(value);
                echo.extend_from_slice(b"\r\n");
            }
        }
        echo.extend_from_slice(b"\r\n");
        write_simple(&mut conn.io, 200, "message/http", &echo, close, &[], false).await
    } else {
        write_simple(&mut conn.io, 200, "text/plain", b"", close, &[], false).await
    };
    finish(written, !close, access)
}

/// What follows an answer: counted, then the connection kept or closed.
fn finish(written: std::io::Result<u64>, keep_alive: bool, access: &mut Access) -> After {
    match written {
        Ok(n) => access.bytes_out += n,
        Err(_) => return After::Close,
    }
    if keep_alive {
        After::KeepAlive
    } else {
        After::Close
    }
}

/// A request body read whole, up to a limit.
enum Body {
    Read(Vec<u8>),
    TooLarge,
    Broken,
}

/// Reads a request body of at most `limit` bytes, keeping it when `keep`
/// (else dropping it as it comes).
async fn read_body<S: Io>(conn: &mut Conn<S>, framing: Framing, limit: u64, keep: bool) -> Body {
    let mut reader = BodyReader::new(framing);
    let mut seen = 0u64;
    let mut body = Vec::new();
    loop {
        match reader.next(conn).await {
            Ok(Item::Data(d)) => {
                seen += d.len() as u64;
                if seen > limit {
                    return Body::TooLarge;
                }
                if keep {
                    body.extend_from_slice(&d);
                }
            }
            Ok(Item::Trailers(_)) => {}
            Ok(Item::End) => return Body::Read(body),
            Err(_) => return Body::Broken,
        }
    }
}

/// `POST /events/{topic}` on the aggregate port, for `[events] publishers`
/// (authenticated as a user like any client, and allowed the topic by the
/// rules as a poller is): `201 {"id":N}`, as on the admin listener.
async fn publish<S: Io>(
    conn: &mut Conn<S>,
    topic: &str,
    framing: Framing,
    keep_alive: bool,
    ctx: &ConnCtx,
    access: &mut Access,
) -> After {
    let config = ctx.shared.config();
    let user = access.user.as_deref();
    let limit = ctx.shared.events.settings().max_event_bytes;
    // A refusal before the body is read closes the connection after it.
    let mut body_read = false;
    let outcome = async {
        if !config.rules.may_publish(user) {
            if user.is_none() && config.auth.has_users() {
                return Err(RelayError::new(ErrorKind::ProxyAuthRequired {
                    realm: config.auth.realm.clone(),
                    why: "publishing needs the credentials of one of [events] publishers",
                }));
            }
            return Err(RelayError::new(ErrorKind::Forbidden(
                crate::rules::Denial::NotPublisher,
            )));
        }
        if !events::valid_topic(topic) {
            return Err(RelayError::new(ErrorKind::BadTopic));
        }
        crate::gate::admit_topic(ctx, &config, user, topic)?;
        if matches!(framing, Framing::Length(n) if n > limit as u64) {
            return Err(RelayError::new(ErrorKind::EventTooLarge { limit }));
        }
        // A stalled publisher is cut after body_timeout (the whole body: it
        // is one event, at most max_event_bytes).
        let read = read_body(conn, framing, limit as u64, true);
        let Ok(read) = tokio::time::timeout(config.limits.body_timeout, read).await else {
            return Err(RelayError::new(ErrorKind::BodyTimeout));
        };
        let body = match read {
            Body::Read(body) => body,
            Body::TooLarge => return Err(RelayError::new(ErrorKind::EventTooLarge { limit })),
            Body::Broken => return Err(RelayError::new(ErrorKind::BadRequest("unreadable body"))),
        };
        body_read = true;
        events::publish(&ctx.shared, topic, &body).await
    }
    .await;
    let keep_alive = keep_alive && body_read;
    let written = match outcome {
        Ok(id) => {
            access.status = 201;
            let body = format!("{{\"id\":{id}}}\n");
            write_simple(
                &mut conn.io,
                201,
                "application/json",
                body.as_bytes(),
                !keep_alive,
                &[],
                false,
            )
            .await
        }
        Err(err) => {
            tracing::info!(client = %ctx.peer, user = user.unwrap_or("-"), topic, error = %err, "publish refused");
            access.status = err.status();
            write_error(&mut conn.io, &err, !keep_alive, false).await
        }
    };
    finish(written, keep_alive, access)
}

/// `GET /services`: every name this relay can reach: its own routes, and each
/// uplinked relay's offers with the uplink's state and open sessions. Internal
/// addresses are not shown.
fn services_json(ctx: &ConnCtx) -> String {
    let config = ctx.shared.config();
    let mut services: Vec<serde_json::Value> = config
        .routes
        .routes()
        .iter()
        .map(|r| serde_json::json!({"name": r.host, "kind": "route", "ports": r.ports}))
        .collect();
    for o in ctx.shared.uplinks.offered() {
        // A route of this relay for the name wins over the offer.
        let shadowed_by = config.routes.lookup(&o.name).map(|r| r.host.as_str());
        services.push(serde_json::json!({
            "name": o.name, "kind": "uplink", "uplink": o.uplink, "state": o.state, "sessions": o.sessions, "parked": o.parked,
            "shadowed_by_route": shadowed_by,
        }));
    }
    serde_json::json!({"relay": config.relay.name, "services": services}).to_string()
}
