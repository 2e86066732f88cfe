//! The relay's own endpoints on the aggregate port: requests whose host is the
//! relay's `name` or the address the client connected to. `GET
//! /events/{topic}` polls events, `GET /services` lists services; every
//! other path is `404`.

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
    let body_read = discard_body(conn, framing).await;
    let keep_alive = keep_alive && body_read;
    let (path_only, query) = path.split_once('?').unwrap_or((path, ""));
    if let Some(topic) = path_only.strip_prefix("/events/") {
        if head.method() == "GET" {
            return events::poll::serve(conn, head, topic, query, keep_alive, ctx, access).await;
        }
    }
    let written = if let Some(pac) = crate::pac::for_request(&head, path, ctx) {
        access.status = 200;
        write_simple(
            &mut conn.io,
            200,
            PAC_TYPE,
            pac.as_bytes(),
            !keep_alive,
            &[],
        )
        .await
    } else if (head.method(), path_only) == ("GET", "/services") {
        access.status = 200;
        let body = services_json(ctx);
        write_simple(
            &mut conn.io,
            200,
            "application/json",
            body.as_bytes(),
            !keep_alive,
            &[],
        )
        .await
    } else {
        let err = if path_only.starts_with("/events/") {
            RelayError::new(ErrorKind::MethodNotAllowed { allow: "GET" })
        } else {
            RelayError::new(ErrorKind::NotFound)
        };
        access.status = err.status();
        write_error(&mut conn.io, &err, !keep_alive).await
    };
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

/// Reads and drops a small request body; `false` if it was too large or broken.
async fn discard_body<S: Io>(conn: &mut Conn<S>, framing: Framing) -> bool {
    let mut reader = BodyReader::new(framing);
    let mut seen = 0u64;
    loop {
        match reader.next(conn).await {
            Ok(Item::Data(d)) => {
                seen += d.len() as u64;
                if seen > MAX_DISCARD {
                    return false;
                }
            }
            Ok(Item::Trailers(_)) => {}
            Ok(Item::End) => return true,
            Err(_) => return false,
        }
    }
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
        services.push(serde_json::json!({
            "name": o.name, "kind": "uplink", "uplink": o.uplink, "state": o.state, "sessions": o.sessions, "parked": o.parked,
        }));
    }
    serde_json::json!({"relay": config.relay.name, "services": services}).to_string()
}
