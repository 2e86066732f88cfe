//! UDP through the relay: CONNECT-UDP (RFC 9298). A client asks the relay
//! itself for `/.well-known/masque/udp/{host}/{port}/` with `Upgrade:
//! connect-udp` (HTTP/1.1; over HTTP/2 an extended CONNECT with `:protocol
//! connect-udp`, which the HTTP/2 side serves through the same HTTP path).
//! The target is checked like a `CONNECT`'s (route, `ports`, rules); the
//! relay binds a UDP socket connected to it and answers `101`. From then on
//! the stream carries capsules (RFC 9297): each `DATAGRAM` capsule with
//! context 0 is one UDP payload, both ways. Unknown capsules are skipped.
//! The session ends when the client closes, or after `idle_timeout` without
//! a datagram either way; one access line for the whole session.
//!
//! For a route with `via`, or a name an uplinked relay offers, the relay asks
//! that relay for the same session (its own CONNECT-UDP) and carries the
//! capsules through untouched; on an uplink's data connection, the inside
//! relay takes the outside relay's CONNECT-UDP whatever its `Host` says.

use std::time::Duration;

use bytes::Buf;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::access_log::{Access, Pending};
use crate::codec::{Conn, Io};
use crate::error::{ErrorKind, RelayError};
use crate::forward::write_flush;
use crate::tunnel::Refusal;
use crate::upstream::{display_addr, Upstream};
use crate::ConnCtx;

/// The URI template's fixed part (RFC 9298 section 2, the default template).
pub const PATH_PREFIX: &str = "/.well-known/masque/udp/";

/// The `Upgrade` token.
pub const PROTOCOL: &str = "connect-udp";

/// The largest capsule accepted: a UDP payload and its framing.
const MAX_CAPSULE: u64 = 65_535 + 64;

/// The capsule type of an HTTP Datagram (RFC 9297 section 3.5).
const DATAGRAM: u64 = 0;

/// The target of a CONNECT-UDP path: `(host, port)`, host lower case, an
/// IPv6 literal percent-encoded (`2001%3Adb8%3A%3A1`) or in brackets.
pub fn target(path: &str) -> Option<(String, u16)> {
    let rest = path.strip_prefix(PATH_PREFIX)?;
    let (host, port) = rest.split_once('/')?;
    let port = port.strip_suffix('/').unwrap_or(port);
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host.replace("%3A", ":").replace("%3a", ":");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    valid.then(|| (host.to_ascii_lowercase(), port))
}

/// Appends a QUIC variable-length integer (RFC 9000 section 16).
pub fn put_varint(out: &mut Vec<u8>, v: u64) {
    match v {
        0..=63 => out.push(v as u8),
        64..=16_383 => out.extend_from_slice(&(v as u16 | 0x4000).to_be_bytes()),
        16_384..=1_073_741_823 => out.extend_from_slice(&(v as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// Reads a QUIC variable-length integer: the value and its length, or `None`
/// when `buf` does not hold all of it yet.
pub fn get_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut v = u64::from(first & 0x3f);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

/// A `DATAGRAM` capsule with context 0 carrying `payload`.
pub fn datagram_capsule(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    put_varint(&mut out, DATAGRAM);
    put_varint(&mut out, payload.len() as u64 + 1);
    out.push(0); // context id 0: a UDP payload
    out.extend_from_slice(payload);
    out
}

/// One capsule at the start of `buf`.
#[derive(Debug, PartialEq, Eq)]
pub enum Capsule<'a> {
    /// More bytes are needed.
    Partial,
    /// A UDP payload (a `DATAGRAM` capsule with context 0), and the capsule's length.
    Datagram(&'a [u8], usize),
    /// Any other capsule, skipped: its length.
    Other(usize),
    /// Longer than [`MAX_CAPSULE`], or an unreadable one.
    Bad,
}

/// Parses the capsule at the start of `buf`.
pub fn capsule(buf: &[u8]) -> Capsule<'_> {
    let Some((kind, a)) = get_varint(buf) else {
        return Capsule::Partial;
    };
    let Some((len, b)) = get_varint(&buf[a..]) else {
        return Capsule::Partial;
    };
    if len > MAX_CAPSULE {
        return Capsule::Bad;
    }
    let start = a + b;
    let end = start + len as usize;
    let Some(value) = buf.get(start..end) else {
        return Capsule::Partial;
    };
    if kind != DATAGRAM {
        return Capsule::Other(end);
    }
    match get_varint(value) {
        Some((0, n)) => Capsule::Datagram(&value[n..], end),
        // Another context (not defined for UDP proxying): dropped.
        Some(_) => Capsule::Other(end),
        None => Capsule::Bad,
    }
}

/// Where a CONNECT-UDP session's datagrams go.
pub enum Session {
    /// A UDP socket of this relay's, connected to the target.
    Socket(UdpSocket),
    /// A route's next hop or an uplinked relay, which answered its own
    /// CONNECT-UDP with `101`: the capsules pass through it untouched, as a
    /// tunnel's bytes.
    Hop(Conn<Upstream>),
}

/// Why a CONNECT-UDP session did not open.
pub enum Failure {
    /// This relay's error.
    Error(RelayError),
    /// The next hop's refusal, passed on as it is.
    Refused(Refusal),
}

impl From<RelayError> for Failure {
    fn from(e: RelayError) -> Self {
        Failure::Error(e)
    }
}

/// Checks the target like a `CONNECT`'s, then binds a UDP socket connected
/// to it, or, for a route with `via` or a name an uplinked relay offers,
/// asks that relay for the same session. The route goes on the access record.
pub async fn open(
    host: &str,
    port: u16,
    via: &str,
    ctx: &ConnCtx,
    access: &mut Access,
) -> Result<Session, Failure> {
    let (config, decision) = crate::forward::choose_tunnel(ctx, host, port, access)?;
    let route = &decision.route;
    if !route.udp {
        return Err(RelayError::on_route(
            ErrorKind::Forbidden(crate::rules::Denial::NoUdp),
            &route.host,
        )
        .into());
    }
    // Through an uplink or a next hop, the far side runs the session.
    match (&decision.uplink, &route.via) {
        (Some(id), _) => {
            let far = Far {
                name: format!("uplink {id}"),
                host: id.clone(),
                fields: String::new(),
            };
            through(&decision, &far, ctx).await
        }
        (None, Some(hop)) => {
            let far = Far {
                name: hop.addr(),
                host: hop.addr(),
                fields: hop.request_fields(via, &config.relay.name),
            };
            through(&decision, &far, ctx).await
        }
        (None, None) => bind(&decision)
            .await
            .map(Session::Socket)
            .map_err(Failure::Error),
    }
}

/// The far side of a session that this relay only carries.
struct Far {
    /// For errors: the next hop's address, or `uplink ID`.
    name: String,
    /// The `Host` of the request to it.
    host: String,
    /// Header lines for it: `Via`, a next hop's credentials.
    fields: String,
}

/// Asks the far side (a route's next hop, or an uplinked relay over a new
/// session) for the same session: its own CONNECT-UDP (HTTP/1.1). Its
/// capsules then pass through this relay untouched, as a tunnel's bytes.
async fn through(
    decision: &crate::routes::Decision,
    far: &Far,
    ctx: &ConnCtx,
) -> Result<Session, Failure> {
    let route = &decision.route;
    let failed = |cause: String| {
        Failure::Error(RelayError::on_route(
            ErrorKind::BadResponse {
                upstream: far.name.clone(),
                cause,
            },
            &route.host,
        ))
    };
    let mut server = crate::forward::open_upstream(ctx, decision).await?;
    // The template's host: an IPv6 literal's colons percent-encoded.
    let target = decision.upstream_host().replace(':', "%3A");
    let req = format!(
        "GET {PATH_PREFIX}{target}/{}/ HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: {PROTOCOL}\r\nCapsule-Protocol: ?1\r\n{}\r\n",
        decision.upstream_port, far.host, far.fields
    );
    let head = crate::tunnel::ask(&mut server, &req, far.name.clone(), route.response_timeout)
        .await
        .map_err(|kind| Failure::Error(RelayError::on_route(kind, &route.host)))?;
    match head.status {
        101 => Ok(Session::Hop(server)),
        // Anything else that is not a refusal would read as a session.
        status if status < 400 => Err(failed(format!("answered {status} to CONNECT-UDP, not 101"))),
        // A next hop's challenge is for this relay, not for its client.
        407 if route.via.is_some() => Err(failed(
            "the next hop refused this relay's credentials (407); see via_credentials_file".into(),
        )),
        _ => Err(Failure::Refused(Refusal::read(&mut server, &head).await)),
    }
}

/// Binds a UDP socket connected to the decision's target.
async fn bind(decision: &crate::routes::Decision) -> Result<UdpSocket, RelayError> {
    let route = &decision.route;
    let (host, port) = decision.dial();
    let upstream = display_addr(host, port);
    let dial = async {
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|cause| ErrorKind::Resolve {
                upstream: upstream.clone(),
                cause,
            })?
            .next()
            .ok_or_else(|| ErrorKind::Resolve {
                upstream: upstream.clone(),
                cause: std::io::Error::other("name has no addresses"),
            })?;
        let local: std::net::SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let connect = |cause| ErrorKind::Connect {
            upstream: upstream.clone(),
            cause,
        };
        let socket = UdpSocket::bind(local).await.map_err(connect)?;
        socket.connect(addr).await.map_err(connect)?;
        Ok(socket)
    };
    match tokio::time::timeout(route.connect_timeout, dial).await {
        Ok(Ok(socket)) => Ok(socket),
        Ok(Err(kind)) => Err(RelayError::on_route(kind, &route.host)),
        Err(_) => Err(RelayError::on_route(
            ErrorKind::ConnectTimeout {
                upstream: upstream.clone(),
            },
            &route.host,
        )),
    }
}

/// This relay's `101` to a CONNECT-UDP request.
pub fn switched(name: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {PROTOCOL}\r\nCapsule-Protocol: ?1\r\nVia: 1.1 {name} (porthole)\r\n\r\n"
    )
}

/// Answers `101` and carries datagrams until the client closes or the
/// session idles for `idle_timeout`; then writes the access line.
pub async fn run<S: Io>(
    conn: &mut Conn<S>,
    socket: UdpSocket,
    ctx: &ConnCtx,
    mut access: Pending<'_>,
) {
    let head = switched(&ctx.shared.config().relay.name);
    let idle = ctx.shared.config().limits.idle_timeout;
    access.status = 101;
    access.tunnel = true;
    if write_flush(&mut conn.io, head.as_bytes()).await.is_err() {
        return;
    }
    access.bytes_out += head.len() as u64;
    let open = crate::tunnel::open_tunnel(ctx, access.route_name());
    // The access record counts as bytes move: a session the drain timeout
    // cuts is logged with them (the record's line is written when dropped).
    carry(conn, &socket, idle, &mut access).await;
    drop(open);
    access.take().finish(ctx);
}

/// Moves datagrams both ways, counting the capsule bytes read from and
/// written to the client on `access`.
async fn carry<S: Io>(conn: &mut Conn<S>, socket: &UdpSocket, idle: Duration, access: &mut Access) {
    let mut last = Instant::now();
    loop {
        // Every whole capsule read so far goes out as a datagram.
        loop {
            let used = match capsule(&conn.buf) {
                Capsule::Partial => break,
                Capsule::Bad => {
                    tracing::debug!("CONNECT-UDP: a capsule too long or unreadable; closing");
                    return;
                }
                Capsule::Other(used) => used,
                Capsule::Datagram(payload, used) => {
                    // A datagram the socket cannot take now is dropped, as UDP would.
                    let _ = socket.try_send(payload);
                    last = Instant::now();
                    used
                }
            };
            access.bytes_in += used as u64;
            conn.buf.advance(used);
        }
        tokio::select! {
            read = conn.fill() => match read {
                Ok(n) if n > 0 => {}
                _ => return,
            },
            ready = socket.readable() => {
                if ready.is_err() {
                    return;
                }
                // An ICMP error (the port is closed) is not the session's end.
                let Some(out) = received_capsule(socket) else { continue };
                if write_flush(&mut conn.io, &out).await.is_err() {
                    return;
                }
                access.bytes_out += out.len() as u64;
                last = Instant::now();
            }
            () = tokio::time::sleep_until(last + idle) => {
                tracing::debug!(?idle, "CONNECT-UDP session idle; closing");
                return;
            }
        }
    }
}

thread_local! {
    /// One receive buffer per worker thread, so that a session holds none
    /// of its own (64 KiB each, with thousands of sessions).
    static RECEIVE_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 65_535]);
}

/// The next datagram waiting on `socket`, as a capsule; `None` when there is
/// none after all (a spurious wake-up) or an ICMP error was read.
fn received_capsule(socket: &UdpSocket) -> Option<Vec<u8>> {
    RECEIVE_BUF.with_borrow_mut(|buf| {
        let n = socket.try_recv(buf).ok()?;
        Some(datagram_capsule(&buf[..n]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_every_length() {
        for v in [
            0,
            63,
            64,
            16_383,
            16_384,
            1_073_741_823,
            1_073_741_824,
            (1 << 62) - 1,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(get_varint(&out), Some((v, out.len())), "{v}");
            assert_eq!(get_varint(&out[..out.len() - 1]), None, "{v} cut");
        }
        // RFC 9000 appendix A.1's examples.
        assert_eq!(get_varint(&[0x25]), Some((37, 1)));
        assert_eq!(get_varint(&[0x7b, 0xbd]), Some((15_293, 2)));
        assert_eq!(
            get_varint(&[0x9d, 0x7f, 0x3e, 0x7d]),
            Some((494_878_333, 4))
        );
    }

    #[test]
    fn capsules_parse_whole_partial_other_and_too_long() {
        let c = datagram_capsule(b"hello");
        assert_eq!(c, [0, 6, 0, b'h', b'e', b'l', b'l', b'o']);
        assert_eq!(capsule(&c), Capsule::Datagram(b"hello", 8));
        assert_eq!(capsule(&c[..5]), Capsule::Partial);
        assert_eq!(capsule(&[]), Capsule::Partial);
        // An unknown capsule type, skipped whole.
        assert_eq!(capsule(&[0x17, 2, 1, 2, 9]), Capsule::Other(4));
        // A datagram with another context id: dropped.
        assert_eq!(capsule(&[0, 2, 2, 7]), Capsule::Other(4));
        let mut long = vec![0];
        put_varint(&mut long, 1 << 20);
        assert_eq!(capsule(&long), Capsule::Bad);
    }

    #[test]
    fn targets_follow_the_default_template() {
        let t = |p: &str| target(p);
        assert_eq!(
            t("/.well-known/masque/udp/DNS.corp/53/"),
            Some(("dns.corp".into(), 53))
        );
        assert_eq!(
            t("/.well-known/masque/udp/192.0.2.6/443/"),
            Some(("192.0.2.6".into(), 443))
        );
        assert_eq!(
            t("/.well-known/masque/udp/2001%3Adb8%3A%3A42/53/"),
            Some(("2001:db8::42".into(), 53))
        );
        for bad in [
            "/.well-known/masque/udp/dns.corp/0/",
            "/.well-known/masque/udp/dns.corp/x/",
            "/.well-known/masque/udp//53/",
            "/.well-known/masque/udp/a b/53/",
            "/.well-known/masque/udp/dns.corp/53/extra/",
            "/.well-known/masque/ip/dns.corp/53/",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }
}
