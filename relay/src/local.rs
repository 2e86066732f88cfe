//! The relay's own endpoints on the aggregate port: requests whose host is the
//! relay's `name` or the address the client connected to.

use crate::access_log::Access;
use crate::codec::{BodyReader, Conn, Framing, Io, Item, RequestHead};
use crate::error::{ErrorKind, RelayError};
use crate::forward::After;
use crate::http1::{write_error, write_simple};
use crate::pac::CONTENT_TYPE as PAC_TYPE;
use crate::ConnCtx;

/// Most request body the relay reads and discards to keep a connection usable.
const MAX_DISCARD: u64 = 64 * 1024;

/// Serves one request for the relay itself.
pub async fn serve<S: Io>(
    conn: &mut Conn<S>,
    head: &RequestHead,
    path: &str,
    framing: Framing,
    keep_alive: bool,
    ctx: &ConnCtx,
    access: &mut Access,
) -> After {
    let body_read = discard_body(conn, framing).await;
    let keep_alive = keep_alive && body_read;
    if let Some(pac) = crate::pac::for_request(head, path, ctx) {
        access.status = 200;
        let body = pac.as_bytes();
        return match write_simple(&mut conn.io, 200, PAC_TYPE, body, !keep_alive, &[]).await {
            Ok(n) if keep_alive => {
                access.bytes_out += n;
                After::KeepAlive
            }
            _ => After::Close,
        };
    }
    let err = RelayError::new(ErrorKind::NotFound);
    access.status = err.status();
    match write_error(&mut conn.io, &err, !keep_alive).await {
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
