//! Uplinks: offering services from behind a firewall that accepts no inbound
//! connection (PRODUCT section 7; the server agent and relay proxy of Century
//! Systems 2000-177093; the socket management server of JP4873743B2).
//!
//! The inside relay (I) only ever dials out, to the outside relay's (O)
//! aggregate port, with ordinary HTTP requests that upgrade the connection,
//! so it passes outbound HTTP filters and proxies. With `[uplink] tls` every
//! connection it dials is TLS (ALPN `http/1.1`, inside the proxy's tunnel when
//! there is one); O serves it as any TLS client connection of its aggregate
//! port, so everything below runs unchanged inside TLS.
//!
//! ## Control protocol
//!
//! After the upgrade the control connection carries JSON messages, one per
//! line (`{"type":"register",...}\n`):
//!
//! | step | direction | message |
//! |---|---|---|
//! | S1 | I → O | `GET /.porthole/uplink HTTP/1.1`, `Upgrade: porthole-uplink/1`, `Authorization: Basic base64(id:secret)` |
//! | S2 | O → I | `101 Switching Protocols` (authenticated), or `403` with the reason, then close. If the id's control connection is up, O first sends it a `ping` (seq 0): answered within 2 s, the new one gets `409` naming the first one's address (two inside relays share the id); unanswered, the old one was half-open and the new one replaces it |
//! | S3 | I → O | `register` `{offers: [names]}` |
//! | S4 | O → I | `registered` `{accepted: [names], refused: [{name, reason}], pool_key}` (pool_key: 128 random bits, hex, valid while this control connection lives) |
//! | S4p | I → O | only with `[uplink] pool = N`: N NEW connections, each `GET /.porthole/uplink/data`, `Upgrade: porthole-uplink-data/1`, `Porthole-Uplink: id`, `Porthole-Pool: pool_key`; O answers `101` and parks it (`403` for a wrong id or key, `503` past [`MAX_PARKED`] per uplink). I sends nothing more on a parked connection |
//! | S4k | O → I | on each parked connection, every [`PARKED_PING`]: `ping` `{seq}`, never answered (keeps middleboxes' idle timers fresh; a write error drops it) |
//! | S5-S6 | client → O | a request or `CONNECT` for an offered name; O holds it |
//! | S7p | O → I | when a parked connection of the uplink is left: `open` `{session, host, port}` as one JSON line on that connection, directly followed by the held request (S11) without waiting for an answer; I replaces it with a new parked connection (S4p). No S7-S10 round trip. If writing fails O takes the next parked connection, and with none left falls back to S7 |
//! | S7 | O → I | `open` `{session, host, port}` (session: 128 random bits, hex) |
//! | S8 | I → O | `failed` `{session, reason}` only if I cannot take the session |
//! | S9-S10 | I → O | a NEW connection: `GET /.porthole/uplink/data`, `Upgrade: porthole-uplink-data/1`, `Porthole-Uplink: id`, `Porthole-Session: session`; O answers `101` |
//! | S11-S12 | O ↔ I | O sends the held request over the data connection (origin form, or `CONNECT`); I serves it as any client connection: its own route table, its own internal server, keep-alive |
//! | S13r | O → I | after a complete keep-alive response O keeps the data connection in its upstream pool and sends a later request for the same name and port of the same uplink down it, with no new session; never after `CONNECT` or an upgrade |
//! | keepalive | I → O, O → I | `ping` `{seq}` / `pong` `{seq}`, adaptive as in [`crate::keepalive`] |
//! | S14-S20 | either | closing any leg closes the next: client, O, data connection, I, internal server |
//!
//! A session I does not claim within `session_timeout` gives the client
//! `504`; a data connection naming an unknown or already-claimed session is
//! closed. While I's control connection is down, O answers requests for its
//! names with `502` naming the uplink; I reconnects with backoff and registers
//! again.
//!
//! A data connection idle in O's pool belongs to the control connection it was
//! opened under: O closes it when that control connection ends (so a later
//! request gets `502` naming the uplink, or a new session once it is back) and
//! never keeps one of an older control connection. I closes an idle data
//! connection after its `idle_timeout`; O notices the close when it next takes
//! it (or retries once on a new session when the request meets the close). In
//! `/services` an uplink's `sessions` are the data connections carrying a
//! request or a tunnel now; idle pooled ones are not counted.
//!
//! A parked connection that closes, or sends anything, is dropped on both sides;
//! I dials a replacement (with backoff when dialling or parking fails). When the
//! control connection ends, O closes that uplink's parked connections and I
//! closes its own; the new control connection gets a new `pool_key`. A claimed
//! parked connection whose session I has no route for is answered `502` by I on
//! that connection. Parked connections hold a connection slot on O like any
//! client connection (`max_connections`, `max_connections_per_client`).

pub mod inside;
pub mod outside;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::codec::{read_line, BodyError, Conn};

/// Path of the control connection's upgrade request.
pub const CONTROL_PATH: &str = "/.porthole/uplink";
/// Path of a data connection's upgrade request.
pub const DATA_PATH: &str = "/.porthole/uplink/data";
pub const CONTROL_PROTOCOL: &str = "porthole-uplink/1";
pub const DATA_PROTOCOL: &str = "porthole-uplink-data/1";
/// Header naming the pool key on a data connection offered for parking (S4p).
pub const POOL_HEADER: &str = "porthole-pool";
/// Most parked data connections the outside relay keeps per uplink.
pub const MAX_PARKED: usize = crate::config::MAX_UPLINK_POOL;
/// How often the outside relay pings a parked connection (S4k).
pub const PARKED_PING: std::time::Duration = std::time::Duration::from_secs(25);
/// Longest control message accepted.
const MAX_MESSAGE: usize = 64 * 1024;

/// A name an uplink offered that the outside relay refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub name: String,
    pub reason: String,
}

/// The control messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Register {
        offers: Vec<String>,
    },
    Registered {
        accepted: Vec<String>,
        refused: Vec<Refused>,
        /// Proof for parking data connections (S4p); absent from outside
        /// relays without pools.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool_key: Option<String>,
    },
    Open {
        session: String,
        host: String,
        port: u16,
    },
    Failed {
        session: String,
        reason: String,
    },
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
}

/// Writes one message as a JSON line.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

/// Reads one message; `Ok(None)` when the peer closed cleanly.
pub async fn receive<S: AsyncRead + Unpin>(conn: &mut Conn<S>) -> Result<Option<Message>, String> {
    if conn.buf.is_empty() && conn.fill().await.map_err(|e| e.to_string())? == 0 {
        return Ok(None);
    }
    let line = match read_line(conn, MAX_MESSAGE, "control message too long").await {
        Ok(line) => line,
        Err(BodyError::Truncated) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| format!("bad control message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json_lines() {
        let m = Message::Open {
            session: "ab".into(),
            host: "erp.plant3".into(),
            port: 80,
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(
            text,
            r#"{"type":"open","session":"ab","host":"erp.plant3","port":80}"#
        );
        assert_eq!(serde_json::from_str::<Message>(&text).unwrap(), m);
    }

    #[test]
    fn the_pool_key_is_optional_in_registered() {
        let old = r#"{"type":"registered","accepted":["a"],"refused":[]}"#;
        assert_eq!(
            serde_json::from_str::<Message>(old).unwrap(),
            Message::Registered {
                accepted: vec!["a".into()],
                refused: vec![],
                pool_key: None,
            }
        );
        let m = Message::Registered {
            accepted: vec![],
            refused: vec![],
            pool_key: Some("k".into()),
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(
            text,
            r#"{"type":"registered","accepted":[],"refused":[],"pool_key":"k"}"#
        );
    }

    #[tokio::test]
    async fn receive_reads_line_by_line() {
        let wire = b"{\"type\":\"ping\",\"seq\":1}\n{\"type\":\"pong\",\"seq\":1}\n";
        let mut conn = Conn::new(tokio_test::io::Builder::new().read(wire).build());
        assert_eq!(
            receive(&mut conn).await.unwrap(),
            Some(Message::Ping { seq: 1 })
        );
        assert_eq!(
            receive(&mut conn).await.unwrap(),
            Some(Message::Pong { seq: 1 })
        );
        assert_eq!(receive(&mut conn).await.unwrap(), None);
        let mut bad = Conn::new(tokio_test::io::Builder::new().read(b"nonsense\n").build());
        assert!(receive(&mut bad).await.is_err());
    }
}
