//! The inside relay's side of uplinks: an actor that keeps the control
//! connection to the outside relay (dialled out, through an outbound HTTP
//! proxy when configured, over TLS with `tls = true`), registers the offered
//! names, keeps the link alive adaptively, reconnects with backoff, and opens
//! a new outbound data connection for every session, served like any client
//! connection (kept alive between requests, which the outside relay reuses it
//! for, until `limits.idle_timeout`). With `pool = N` it keeps N data
//! connections parked at the outside relay ahead of the sessions (S4p) and
//! replaces each one a session takes (S7p).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use base64::Engine;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    receive, send, Message, CONTROL_PATH, CONTROL_PROTOCOL, DATA_PATH, DATA_PROTOCOL, PARKED_PING,
};
use crate::codec::{read_response_head, Conn};
use crate::config::UplinkSettings;
use crate::keepalive::{Action, Activity, Keepalive};
use crate::upstream::Upstream;
use crate::{ConnCtx, Shared};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that stayed up this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// A parked connection silent this long (no ping from the outside relay,
/// S4k) is taken for dead and replaced.
const PARKED_SILENCE: Duration = Duration::from_secs(PARKED_PING.as_secs() * 4);
/// A parked connection that lived less than this before it closed counts as
/// a failure for the pool's backoff.
const PARKED_SHORT: Duration = Duration::from_secs(1);

/// Runs the uplink until the relay shuts down.
pub async fn run(shared: Arc<Shared>) {
    // As configured at start: a reload does not change the uplink (it says
    // so, [`crate::needs_restart`]).
    let Some(settings) = shared.config().uplink.clone() else {
        return;
    };
    let mut backoff = BACKOFF_START;
    loop {
        let started = Instant::now();
        let ended = tokio::select! {
            ended = session(&shared, &settings) => ended,
            () = shared.until_draining() => return,
        };
        if started.elapsed() >= HEALTHY_AFTER {
            backoff = BACKOFF_START;
        }
        tracing::warn!(uplink = %settings.id, to = %settings.to, reason = %ended, retry_in = ?backoff, "uplink down; reconnecting");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shared.until_draining() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A connection dialled to the outside relay: its addresses, and the
/// connection itself, plain TCP or TLS in an [`Upstream`] (whose plain form
/// tunnels still splice).
struct Dialled {
    conn: Conn<Upstream>,
    /// The outside relay (or the proxy), as seen from here.
    peer: SocketAddr,
    local: SocketAddr,
}

/// Dials the outside relay, directly or through `proxy` with CONNECT, then
/// the TLS handshake when `[uplink] tls` is set (inside the proxy's tunnel).
async fn dial(u: &UplinkSettings) -> Result<Dialled, String> {
    let target = u.proxy.as_deref().unwrap_or(&u.to);
    let stream = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| format!("dialling {target} timed out"))?
        .map_err(|e| format!("dialling {target}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let local = stream.local_addr().unwrap_or(peer);
    let mut conn = Conn::new(stream);
    if let Some(proxy) = &u.proxy {
        let req = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", u.to);
        conn.io
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("proxy {proxy}: {e}"))?;
        let head = read_response_head(&mut conn, 64 * 1024, 100)
            .await
            .map_err(|e| format!("proxy {proxy}: {e:?}"))?;
        if head.status != 200 {
            return Err(format!(
                "proxy {proxy} answered {} to CONNECT {}",
                head.status, u.to
            ));
        }
    }
    let Some(tls) = &u.tls else {
        let Conn { io, buf } = conn;
        return Ok(Dialled {
            conn: Conn {
                io: Upstream::Tcp(io),
                buf,
            },
            peer,
            local,
        });
    };
    // The relay speaks only after the ClientHello: bytes already here came
    // from the proxy, after its answer.
    if !conn.buf.is_empty() {
        return Err(format!(
            "proxy {} sent bytes after its 200 to CONNECT {}",
            u.proxy.as_deref().unwrap_or("-"),
            u.to
        ));
    }
    let stream = tls.connect(conn.io, &u.to, DIAL_TIMEOUT).await?;
    Ok(Dialled {
        conn: Conn::new(Upstream::Tls(Box::new(stream))),
        peer,
        local,
    })
}

/// Sends an upgrade request and expects `101`.
/// `extra` carries further header lines; the control connection sends the
/// credentials, a data connection its session id (a one-time capability).
async fn upgrade(
    conn: &mut Conn<Upstream>,
    u: &UplinkSettings,
    path: &str,
    protocol: &str,
    extra: &str,
) -> Result<(), String> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\nPorthole-Uplink: {id}\r\n{extra}\r\n",
        to = u.to,
        id = u.id
    );
    conn.io
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("sending the upgrade: {e}"))?;
    let head = tokio::time::timeout(DIAL_TIMEOUT, read_response_head(conn, 64 * 1024, 100))
        .await
        .map_err(|_| "no answer to the upgrade".to_string())?
        .map_err(|e| format!("answer to the upgrade: {e:?}"))?;
    if head.status == 101 {
        return Ok(());
    }
    // The refusal's body says why (it names no secret).
    let mut why = String::from_utf8_lossy(&conn.buf).trim().to_string();
    if why.is_empty() {
        why = format!("status {}", head.status);
    }
    Err(format!("refused by {}: {why}", u.to))
}

/// One control connection, from dial to its end; returns why it ended.
async fn session(shared: &Arc<Shared>, u: &UplinkSettings) -> String {
    let Dialled {
        mut conn,
        peer: outside,
        local,
    } = match dial(u).await {
        Ok(d) => d,
        Err(e) => return e,
    };
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", u.id, u.secret.expose()));
    let auth = format!("Authorization: Basic {credentials}\r\n");
    if let Err(e) = upgrade(&mut conn, u, CONTROL_PATH, CONTROL_PROTOCOL, &auth).await {
        tracing::error!(uplink = %u.id, error = %e, "uplink refused by the outside relay");
        return e;
    }
    if let Err(e) = send(
        &mut conn.io,
        &Message::Register {
            offers: u.offer.clone(),
        },
    )
    .await
    {
        return format!("registering: {e}");
    }
    let pool_key = match tokio::time::timeout(DIAL_TIMEOUT, receive(&mut conn)).await {
        Ok(Ok(Some(Message::Registered {
            accepted,
            refused,
            pool_key,
        }))) => {
            for r in &refused {
                tracing::error!(uplink = %u.id, name = %r.name, reason = %r.reason, "offer refused by the outside relay");
            }
            tracing::info!(uplink = %u.id, to = %u.to, accepted = ?accepted, "uplink registered");
            pool_key
        }
        other => return format!("no registration confirmation: {other:?}"),
    };
    // The parked connections belong to this control connection: they close with it.
    let pool_stop = CancellationToken::new();
    let _pool_guard = pool_stop.clone().drop_guard();
    match pool_key {
        Some(key) if u.pool > 0 => {
            tokio::spawn(keep_pool(shared.clone(), u.clone(), key, pool_stop.clone()));
        }
        None if u.pool > 0 => {
            tracing::warn!(uplink = %u.id, to = %u.to, "the outside relay parks no data connections; pool off")
        }
        _ => {}
    }

    let (report, mut reports) = mpsc::channel::<Message>(64);
    let now = Instant::now();
    let mut keepalive = Keepalive::new(u.keepalive, now);
    let mut seen = Activity {
        last_rx: now,
        last_tx: now,
    };
    let mut seq = 0u64;
    loop {
        let wake = match keepalive.poll(Instant::now(), seen) {
            Action::Dead => {
                return format!("keepalive: no answer within {:?}", u.keepalive.ping_timeout)
            }
            Action::Probe(why) => {
                seq += 1;
                tracing::debug!(uplink = %u.id, ?why, seq, "keepalive probe");
                if let Err(e) = send(&mut conn.io, &Message::Ping { seq }).await {
                    return format!("sending a ping: {e}");
                }
                continue;
            }
            Action::Wait(at) => at,
        };
        tokio::select! {
            incoming = receive(&mut conn) => {
                seen.last_rx = Instant::now();
                match incoming {
                    Ok(Some(Message::Open { session, host, port })) => {
                        let ctx = session_ctx(shared.clone(), outside, local);
                        tokio::spawn(open_data(ctx, u.clone(), session, host, port, report.clone()));
                    }
                    Ok(Some(Message::Pong { .. })) => {}
                    Ok(Some(Message::Ping { seq })) => {
                        if send(&mut conn.io, &Message::Pong { seq }).await.is_err() {
                            return "write failed".into();
                        }
                        seen.last_tx = Instant::now();
                    }
                    Ok(Some(other)) => tracing::debug!(?other, "unexpected control message"),
                    Ok(None) => return "closed by the outside relay".into(),
                    Err(e) => return e,
                }
            }
            Some(msg) = reports.recv() => {
                if let Err(e) = send(&mut conn.io, &msg).await {
                    return format!("write failed: {e}");
                }
                seen.last_tx = Instant::now();
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// How a parked data connection ended, for the pool keeper.
enum Parked {
    /// A session took it (S7p).
    Claimed,
    /// Dialling or parking failed.
    Failed(String),
    /// It was parked, then closed.
    Dropped { lived: Duration, why: String },
}

/// Keeps `u.pool` data connections parked at the outside relay (S4p) until
/// `stop`; replaces each one that a session takes or that dies, with backoff
/// while dialling or parking fails.
async fn keep_pool(shared: Arc<Shared>, u: UplinkSettings, key: String, stop: CancellationToken) {
    let (report, mut ended) = mpsc::channel::<Parked>(u.pool.max(1));
    let mut open = 0usize;
    let mut backoff = BACKOFF_START;
    tracing::debug!(uplink = %u.id, pool = u.pool, "keeping data connections parked");
    loop {
        while open < u.pool {
            open += 1;
            tokio::spawn(park(
                shared.clone(),
                u.clone(),
                key.clone(),
                stop.clone(),
                report.clone(),
            ));
        }
        let why = tokio::select! {
            () = stop.cancelled() => return,
            why = ended.recv() => why,
        };
        open = open.saturating_sub(1);
        let failure = match why {
            Some(Parked::Claimed) => None,
            Some(Parked::Dropped { lived, why }) if lived >= PARKED_SHORT => {
                tracing::debug!(uplink = %u.id, reason = %why, "parked data connection dropped; replacing it");
                None
            }
            Some(Parked::Dropped { why, .. }) | Some(Parked::Failed(why)) => Some(why),
            None => return,
        };
        let Some(why) = failure else {
            backoff = BACKOFF_START;
            continue;
        };
        tracing::warn!(uplink = %u.id, to = %u.to, reason = %why, retry_in = ?backoff, "parking a data connection failed");
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One parked data connection: dials, parks it with the pool key (S4p),
/// waits for `open` (S7p) while answering nothing to pings (S4k), then serves
/// the session like [`open_data`]. Closes on `stop` while still parked.
async fn park(
    shared: Arc<Shared>,
    u: UplinkSettings,
    key: String,
    stop: CancellationToken,
    report: mpsc::Sender<Parked>,
) {
    let parked = async {
        let mut dialled = dial(&u).await?;
        let extra = format!("Porthole-Pool: {key}\r\n");
        upgrade(&mut dialled.conn, &u, DATA_PATH, DATA_PROTOCOL, &extra).await?;
        Ok::<_, String>(dialled)
    };
    let Dialled {
        mut conn,
        peer: outside,
        local,
    } = tokio::select! {
        () = stop.cancelled() => return,
        parked = parked => match parked {
            Ok(conn) => conn,
            Err(why) => {
                let _ = report.send(Parked::Failed(why)).await;
                return;
            }
        },
    };
    let since = Instant::now();
    let dropped = |why: String| Parked::Dropped {
        lived: since.elapsed(),
        why,
    };
    let (session, host, port) = loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = tokio::time::timeout(PARKED_SILENCE, receive(&mut conn)) => next,
        };
        match next {
            Ok(Ok(Some(Message::Open {
                session,
                host,
                port,
            }))) => break (session, host, port),
            Ok(Ok(Some(Message::Ping { .. }))) => {}
            Ok(Ok(Some(other))) => {
                let why = format!("unexpected message on a parked connection: {other:?}");
                let _ = report.send(dropped(why)).await;
                return;
            }
            Ok(Ok(None)) => {
                let why = "closed by the outside relay".to_string();
                let _ = report.send(dropped(why)).await;
                return;
            }
            Ok(Err(why)) => {
                let _ = report.send(dropped(why)).await;
                return;
            }
            Err(_) => {
                let why = format!("silent for {PARKED_SILENCE:?}");
                let _ = report.send(dropped(why)).await;
                return;
            }
        }
    };
    // Replace it at once; this session goes on without the pool.
    let _ = report.send(Parked::Claimed).await;
    if shared.config().routes.lookup(&host).is_none() {
        // The held request follows on this connection: answer it here.
        let reason = format!("uplink {}: no route for {host} on the inside relay\n", u.id);
        tracing::warn!(uplink = %u.id, %session, %host, port, "session for a name without a route");
        let _ = crate::http1::write_simple(
            &mut conn.io,
            502,
            "text/plain; charset=utf-8",
            reason.as_bytes(),
            true,
            &[],
            false,
        )
        .await;
        return;
    }
    tracing::debug!(uplink = %u.id, %session, %host, port, "session on a parked data connection");
    crate::http1::serve(conn, session_ctx(shared, outside, local)).await;
}

/// The context of a data connection's requests: the outside relay's.
fn session_ctx(shared: Arc<Shared>, outside: SocketAddr, local: SocketAddr) -> ConnCtx {
    ConnCtx {
        shared,
        peer: outside,
        local,
        cert_user: None,
        tls: false,
        must_switch: None,
        uplink_session: true,
    }
}

/// Opens the data connection for one session (S9-S10) and serves it as a
/// client connection of this relay (S11-S12).
async fn open_data(
    ctx: ConnCtx,
    u: UplinkSettings,
    session: String,
    host: String,
    port: u16,
    report: mpsc::Sender<Message>,
) {
    if ctx.shared.config().routes.lookup(&host).is_none() {
        let reason = format!("no route for {host} on the inside relay");
        let _ = report.send(Message::Failed { session, reason }).await;
        return;
    }
    let mut conn = match dial(&u).await {
        Ok(d) => d.conn,
        Err(reason) => {
            let _ = report.send(Message::Failed { session, reason }).await;
            return;
        }
    };
    let extra = format!("Porthole-Session: {session}\r\n");
    if let Err(reason) = upgrade(&mut conn, &u, DATA_PATH, DATA_PROTOCOL, &extra).await {
        tracing::warn!(uplink = %u.id, %session, %host, port, error = %reason, "data connection refused");
        let _ = report.send(Message::Failed { session, reason }).await;
        return;
    }
    tracing::debug!(uplink = %u.id, %session, %host, port, "session data connection open");
    crate::http1::serve(conn, ctx).await;
}
