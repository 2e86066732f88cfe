//! The accept loop on the aggregate port: connection limits (total and per
//! client address), accept-error back-off, one task and one tracing span per
//! connection, and the first-bytes detection that picks the protocol.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// What an accept loop does when `accept` fails (EMFILE, ENFILE, ENOMEM,
/// ENOBUFS: the process or the system is out of something): wait and try
/// again, never give up the port, the wait doubling from 5 ms up to 1 s
/// while the failures go on. One warning when they start, then at most one
/// every [`AcceptBackoff::LOG_EVERY`] with the count since the last, and one
/// line when accepting works again: fd exhaustion does not flood the log.
/// Shared by the aggregate port's accept loops and the admin listener.
pub struct AcceptBackoff {
    /// Which listener, for the log lines.
    listener: &'static str,
    /// The next wait.
    delay: Duration,
    /// Failures since the last successful accept.
    failures: u64,
    /// Failures not yet reported in a log line.
    unlogged: u64,
    /// When the last warning was written.
    logged_at: Option<Instant>,
}

impl AcceptBackoff {
    /// The first wait after a failure.
    pub const FIRST: Duration = Duration::from_millis(5);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(1);
    /// At most one warning this often while failures go on.
    pub const LOG_EVERY: Duration = Duration::from_secs(10);

    pub fn new(listener: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            listener,
            delay: Self::FIRST,
            failures: 0,
            unlogged: 0,
            logged_at: None,
        }
    }

    /// A connection was accepted: the next failure starts afresh. A plain
    /// compare on the accept path unless failures came before.
    pub fn accepted(&mut self) {
        if self.failures != 0 {
            tracing::info!(
                listener = self.listener,
                failures = self.failures,
                "accepting again"
            );
            *self = AcceptBackoff::new(self.listener);
        }
    }

    /// `accept` failed with `error`: logs it if due, then waits.
    pub async fn failed(&mut self, error: &std::io::Error) {
        let (wait, log) = self.on_failure(Instant::now());
        if let Some(failures) = log {
            tracing::warn!(
                listener = self.listener,
                %error,
                failures,
                retry_in = ?wait,
                "accept failed; retrying with back-off (logged at most every {:?} while it goes on)",
                Self::LOG_EVERY
            );
        }
        tokio::time::sleep(wait).await;
    }

    /// Counts a failure at `now`: how long to wait, and the number of
    /// failures to report if a warning is due.
    fn on_failure(&mut self, now: Instant) -> (Duration, Option<u64>) {
        self.failures += 1;
        self.unlogged += 1;
        let due = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= Self::LOG_EVERY);
        let log = due.then(|| {
            self.logged_at = Some(now);
            std::mem::take(&mut self.unlogged)
        });
        let wait = self.delay;
        self.delay = (self.delay * 2).min(Self::MAX);
        (wait, log)
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
    let mut backoff = AcceptBackoff::new("aggregate");
    loop {
        let accepted = tokio::select! {
            () = shared.until_draining() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff.accepted();
                a
            }
            Err(e) => {
                backoff.failed(&e).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Under fd exhaustion the audit saw 27 warnings in 1.4 s from the admin
    /// listener (a fixed 50 ms retry, each logged): the waits now double to
    /// 1 s, and a minute of failures writes one warning per 10 s.
    #[test]
    fn accept_failures_back_off_and_are_not_each_logged() {
        let mut b = AcceptBackoff::new("test");
        let start = Instant::now();
        let mut now = start;
        let (mut waits, mut lines) = (Vec::new(), Vec::new());
        while now.duration_since(start) < Duration::from_secs(60) {
            let (wait, log) = b.on_failure(now);
            waits.push(wait);
            lines.extend(log);
            now += wait;
        }
        assert_eq!(
            &waits[..9],
            [5, 10, 20, 40, 80, 160, 320, 640, 1000].map(Duration::from_millis)
        );
        assert!(waits[9..].iter().all(|w| *w == AcceptBackoff::MAX));
        // 67 failures in 60 s (not 1,200), in 6 lines that count them (the
        // last ones wait for the next line).
        assert_eq!(waits.len(), 67);
        assert_eq!(lines, [1, 17, 10, 10, 10, 10]);
        assert_eq!(lines.iter().sum::<u64>() + b.unlogged, 67);

        // After an accept, the next failure waits 5 ms again and is logged.
        b.accepted();
        assert_eq!(b.on_failure(now), (AcceptBackoff::FIRST, Some(1)));
    }
}
