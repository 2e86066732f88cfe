//! The accept loop on the aggregate port: connection limits (total and per
//! client address), accept-error back-off, one task and one tracing span per
//! connection, and the first-bytes detection that picks the protocol.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::codec::Conn;
use crate::dispatch::{classify_bytes, Protocol};
use crate::error::{ErrorKind, RelayError};
use crate::h2;
use crate::http1::{self, write_simple};
use crate::metrics::GaugeGuard;
use crate::{tls, tunnel, ConnCtx, Shared};

/// The connection limits, counted across every worker's accept loop.
pub struct Admission {
    /// `limits.max_connections`.
    total: Arc<Semaphore>,
    /// Open connections per client address.
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// `limits.max_connections_per_client`.
    per_client_max: usize,
}

impl Admission {
    /// The limits as configured at start (changing them needs a restart).
    pub fn new(limits: &crate::config::Limits) -> Admission {
        Admission {
            total: Arc::new(Semaphore::new(limits.max_connections)),
            per_client: Arc::default(),
            per_client_max: limits.max_connections_per_client,
        }
    }
}

/// Accepts connections until shutdown; every connection task joins `tracker`.
/// Each worker runs one ([`crate::workers`]).
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    admission: Arc<Admission>,
) {
    let local = listener.local_addr().ok();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            () = shared.until_draining() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // EMFILE and friends: wait and try again, never give up the port.
                tracing::warn!(error = %e, ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        shared.metrics.accepted.inc();
        // A listener bound to one address: that is every connection's local
        // address, no getsockname per connection (only a wildcard asks).
        let local = match local {
            Some(l) if !l.ip().is_unspecified() => l,
            _ => stream.local_addr().ok().or(local).unwrap_or(peer),
        };
        let Ok(permit) = admission.total.clone().try_acquire_owned() else {
            note_turned_away(&shared, "max_connections", peer);
            tracker.spawn(turn_away(stream, "the relay has too many connections"));
            continue;
        };
        let Some(slot) =
            ClientSlot::take(&admission.per_client, peer.ip(), admission.per_client_max)
        else {
            note_turned_away(&shared, "max_connections_per_client", peer);
            tracker.spawn(turn_away(stream, "too many connections from your address"));
            continue;
        };
        let ctx = ConnCtx {
            shared: shared.clone(),
            peer,
            local,
            cert_user: None,
            tls: false,
            must_switch: None,
            uplink_session: false,
        };
        let span = tracing::info_span!("conn", client = %peer);
        let open = GaugeGuard::new(shared.metrics.open_connections.clone());
        let tunnels = tracker.clone();
        tracker.spawn(
            async move {
                if let Some((client, standing, ctx)) = serve_connection(stream, ctx).await {
                    match standing.into_spliced(client) {
                        // A plain TCP tunnel gets a task of its own, sized for
                        // moving bytes only; this one ends, and what serving
                        // requests needed is freed (P5: memory per idle tunnel).
                        Ok(mut spliced) => {
                            tunnels.spawn(
                                async move {
                                    spliced.run(&ctx).await;
                                    drop((open, slot, permit));
                                }
                                .instrument(tracing::Span::current()),
                            );
                            return;
                        }
                        Err(ends) => {
                            let (client, standing) = *ends;
                            tunnel::run(client, standing, &ctx).await
                        }
                    }
                }
                drop(open);
                drop(slot);
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// A plain HTTP/1 connection that turned into a tunnel: the client end, the
/// standing tunnel, and the connection's context.
type Tunnelled = (Conn<TcpStream>, tunnel::Standing, ConnCtx);

/// Reads the first bytes, decides the protocol, and serves it; returns a plain
/// connection's tunnel for the caller to run.
async fn serve_connection(stream: TcpStream, ctx: ConnCtx) -> Option<Tunnelled> {
    let config = ctx.shared.config();
    let head_timeout = config.limits.head_timeout;
    let mut conn = Conn::new(stream);
    let detect = async {
        loop {
            match classify_bytes(&conn.buf) {
                Protocol::NeedMore => match conn.fill().await {
                    Ok(n) if n > 0 => {}
                    _ => return None,
                },
                decided => return Some(decided),
            }
        }
    };
    let protocol = match tokio::time::timeout(head_timeout, detect).await {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(_) if conn.buf.is_empty() => return None,
        Err(_) => Protocol::Http1, // a slow request line: the HTTP reader answers 408
    };
    match (protocol, &config.tls) {
        (Protocol::Http1, Some(tls)) if tls.require => {
            let err = RelayError::new(ErrorKind::TlsRequired);
            let _ = http1::write_error(&mut conn.io, &err, true, false).await;
        }
        (Protocol::Http1, _) => {
            let tunnel = http1::serve_until_tunnel(conn, &ctx).await;
            return tunnel.map(|(conn, standing)| (conn, standing, ctx));
        }
        // TLS and HTTP/2 state machines are large; boxed, they leave every plain
        // HTTP/1 connection's task (and so each idle tunnel) small.
        (Protocol::Tls, Some(tls)) => Box::pin(tls::serve(conn, ctx, tls)).await,
        (Protocol::Tls, None) => {
            tracing::debug!("TLS ClientHello on a port without [tls]; closing");
        }
        // Cleartext HTTP/2 is plain text too: `require` refuses it, without
        // an HTTP/2 error frame (a closed connection says enough).
        (Protocol::H2PriorKnowledge, Some(tls)) if tls.require => {
            tracing::debug!("HTTP/2 prior knowledge on a port that requires TLS; closing");
        }
        (Protocol::H2PriorKnowledge, _) => Box::pin(h2::serve(conn, ctx)).await,
        (Protocol::NeedMore | Protocol::Unknown, _) => {
            let err = RelayError::new(ErrorKind::BadRequest("not an HTTP request"));
            let _ = http1::write_error(&mut conn.io, &err, true, false).await;
        }
    }
    None
}

/// Counts a connection turned away by `limit`, and says so in the log at
/// most once every 10 s with the count so far: a flood of connections is
/// not to become a flood of lines.
fn note_turned_away(shared: &Shared, limit: &'static str, peer: SocketAddr) {
    static WARN: crate::logging::Every = crate::logging::Every::new(10);
    let counter = shared
        .metrics
        .turned_away
        .get_or_create(&crate::metrics::LimitLabels { limit });
    counter.inc();
    if WARN.due() {
        tracing::warn!(client = %peer, limit, turned_away = counter.get(), "connections turned away with 503 (one such line per 10 s at most; porthole_connections_turned_away_total counts them all)");
    }
}

/// Answers a connection over a limit with `503` and closes it.
async fn turn_away(mut stream: TcpStream, why: &str) {
    let body = format!("503 Service Unavailable: {why}\n");
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        write_simple(
            &mut stream,
            503,
            "text/plain; charset=utf-8",
            body.as_bytes(),
            true,
            &[("Retry-After", "1")],
            false,
        ),
    )
    .await;
}

/// One client address's share of `max_connections_per_client`, given back on drop.
struct ClientSlot {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl ClientSlot {
    fn take(
        map: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        ip: IpAddr,
        max: usize,
    ) -> Option<ClientSlot> {
        // A plain mutex: the section is a map update and never awaits.
        let mut counts = map.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}
