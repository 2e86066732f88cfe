//! Dialling internal servers (in plain TCP or TLS), and the pool of idle
//! keep-alive connections to them.

// foldhash: a fast seeded hasher; SipHash was 2.5% of the instructions per request
// (route, pool and metrics lookups).
use foldhash::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::codec::Conn;
use crate::config::Route;
use crate::error::{ErrorKind, RelayError};
use crate::uplink::outside::{DataConn, Registry};

/// Idle upstream connections kept per `host:port`, shared out among the
/// workers (each keeps at least [`MIN_IDLE_PER_WORKER`]); the one list of
/// uplink data connections, which every worker draws from, keeps them all.
const MAX_IDLE_PER_KEY: usize = 64;
const MIN_IDLE_PER_WORKER: usize = 8;
/// An idle upstream connection older than this is not reused.
const IDLE_FOR: Duration = Duration::from_secs(60);
/// How often [`Pool::sweep`] runs ([`sweep_idle`]).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Sweeps `pool` every [`SWEEP_EVERY`] until the task is dropped.
pub async fn sweep_idle(pool: &Pool) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        pool.sweep(Instant::now());
    }
}

/// Dials `host:port` within `timeout`, trying each resolved address in turn.
pub async fn connect(
    host: &str,
    port: u16,
    timeout: Duration,
    route: &str,
) -> Result<TcpStream, RelayError> {
    let upstream = display_addr(host, port);
    let attempt = async {
        let addrs = tokio::net::lookup_host((host, port))
            .await
            .map_err(|cause| {
                RelayError::on_route(
                    ErrorKind::Resolve {
                        upstream: upstream.clone(),
                        cause,
                    },
                    route,
                )
            })?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last = Some(e),
            }
        }
        let cause = last.unwrap_or_else(|| std::io::Error::other("name has no addresses"));
        Err(RelayError::on_route(
            ErrorKind::Connect {
                upstream: upstream.clone(),
                cause,
            },
            route,
        ))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(RelayError::on_route(
            ErrorKind::ConnectTimeout {
                upstream: upstream.clone(),
            },
            route,
        )),
    }
}

/// Dials `host:port` for `route`, with the TLS handshake when the route has
/// `tls` (with `via`: when the next hop has, `host:port` being the hop).
pub async fn open(host: &str, port: u16, route: &Route) -> Result<Upstream, RelayError> {
    let tcp = connect(host, port, route.connect_timeout, &route.host).await?;
    let tls = match &route.via {
        Some(via) => via.tls.as_ref(),
        None => route.tls.as_ref(),
    };
    let Some(tls) = tls else {
        return Ok(Upstream::Tcp(tcp));
    };
    let failed = |cause: String| {
        RelayError::on_route(
            ErrorKind::UpstreamTls {
                upstream: display_addr(host, port),
                cause,
            },
            &route.host,
        )
    };
    match tokio::time::timeout(route.connect_timeout, tls.handshake(tcp, host)).await {
        Ok(Ok(stream)) => Ok(Upstream::Tls(Box::new(stream))),
        Ok(Err(cause)) => Err(failed(cause)),
        Err(_) => Err(failed("handshake timed out".into())),
    }
}

/// `host:port`, with brackets around IPv6 literals.
pub fn display_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `host:port` as the authority of an `http://` URI: port 80 left out, as a
/// client writes it (RFC 9110 section 4.2.3; a next hop sets `Host` from
/// it), an IPv6 address in brackets.
pub fn http_authority(host: &str, port: u16) -> String {
    match (port, host.contains(':')) {
        (80, true) => format!("[{host}]"),
        (80, false) => host.to_string(),
        _ => display_addr(host, port),
    }
}

/// A connection towards an internal server: dialled directly (in plain TCP
/// or TLS, as the route says), or a data connection an uplinked relay opened.
/// An inside relay's own connections to its outside relay are `Tcp` or `Tls`
/// too ([`crate::uplink::inside`]), so a plain one still splices.
pub enum Upstream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Uplink(Box<DataConn>),
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Upstream::Uplink(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Upstream::Uplink(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Upstream::Uplink(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Upstream::Uplink(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Whom a pooled connection may serve besides its `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Dialled in plain TCP.
    Plain,
    /// Dialled with TLS for this route, with the settings of this
    /// fingerprint ([`crate::tls::ClientTls::fingerprint`]): a connection is
    /// never reused under another route's trust, nor, after a reload, under
    /// another CA or client certificate than the one it was made with.
    Tls(String, crate::tls::Fingerprint),
    /// A data connection of this uplink, opened while its control connection
    /// of this generation lived.
    Uplink { id: String, generation: u64 },
}

impl Scope {
    /// The scope of a connection dialled for `route`.
    pub fn of_route(route: &Route) -> Scope {
        let tls = match &route.via {
            Some(via) => via.tls.as_ref(),
            None => route.tls.as_ref(),
        };
        match tls {
            Some(tls) => Scope::Tls(route.host.clone(), tls.fingerprint()),
            None => Scope::Plain,
        }
    }

    /// Kept in the one list every worker shares (uplink data connections
    /// arrive on whichever worker accepted them), not in a worker's own.
    fn shared(&self) -> bool {
        matches!(self, Scope::Uplink { .. })
    }
}

type Idle = Vec<(Conn<Upstream>, Instant)>;
/// The idle lists of one host: one per port and scope, found by a short
/// scan, so a lookup builds no key (no allocation per request).
type Slots = Vec<(u16, Scope, Idle)>;

type Shard = Mutex<HashMap<String, Slots>>;

/// Idle keep-alive connections, newest last, kept per connection worker: a
/// connection dialled on one worker's runtime is reused there, so its socket
/// is polled by the thread that uses it ([`crate::workers`]). Uplink data
/// connections are the exception: they arrive on whichever worker accepted
/// them and wait in the one shared list, where every worker finds them (no
/// new data connection is asked for while another worker's idles); a worker
/// takes one its own runtime polls first, when there is one. A plain mutex
/// per list: every section is a few pointer moves and never awaits.
pub struct Pool {
    /// Index 0 for uplink data connections and for threads that are not
    /// workers, then one per worker.
    shards: Box<[Shard]>,
    /// Idle connections kept per `host:port` in each shard.
    per_key: usize,
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new(0)
    }
}

impl Pool {
    /// A pool for `workers` connection workers.
    pub fn new(workers: usize) -> Pool {
        Pool {
            shards: (0..=workers).map(|_| Shard::default()).collect(),
            per_key: (MAX_IDLE_PER_KEY / workers.max(1)).max(MIN_IDLE_PER_WORKER),
        }
    }

    /// The idle connections in `scope` the calling worker may take.
    fn lock(&self, scope: &Scope) -> std::sync::MutexGuard<'_, HashMap<String, Slots>> {
        let at = if scope.shared() {
            0
        } else {
            crate::workers::current() % self.shards.len()
        };
        self.shards[at].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every worker's idle connections, one at a time.
    fn each_shard(
        &self,
    ) -> impl Iterator<Item = std::sync::MutexGuard<'_, HashMap<String, Slots>>> {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// An idle connection to `host:port` in `scope` that is still open, if any.
    /// An uplink data connection taken counts as an open session again.
    pub fn take(&self, host: &str, port: u16, scope: &Scope) -> Option<Conn<Upstream>> {
        let mut conn = {
            let mut idle = self.lock(scope);
            let (_, _, list) = idle
                .get_mut(host)?
                .iter_mut()
                .find(|(p, s, _)| *p == port && s == scope)?;
            loop {
                let (mut conn, since) = list.remove(Self::choose(list, scope)?);
                if since.elapsed() < IDLE_FOR && still_open(&mut conn.io) {
                    break conn;
                }
            }
        };
        if let Upstream::Uplink(data) = &mut conn.io {
            data.set_active();
        }
        Some(conn)
    }

    /// Which idle connection of `list` to take: the newest, and in the
    /// shared uplink list the newest whose socket the calling worker polls
    /// (its reads then wake no other thread), if there is one.
    fn choose(list: &Idle, scope: &Scope) -> Option<usize> {
        let newest = list.len().checked_sub(1)?;
        if !scope.shared() {
            return Some(newest);
        }
        let me = crate::workers::current();
        let here = list.iter().rposition(|(conn, _)| match &conn.io {
            Upstream::Uplink(data) => data.worker() == me,
            _ => false,
        });
        Some(here.unwrap_or(newest))
    }

    /// Returns a directly dialled connection whose last response was read
    /// completely.
    pub fn put(&self, host: &str, port: u16, route: &Route, conn: Conn<Upstream>) {
        self.keep(host, port, Scope::of_route(route), conn, || true);
    }

    /// Returns an uplink data connection whose last response was read
    /// completely, if its control connection still lives: checked under the
    /// pool's lock, so a [`Pool::drop_uplink`] for that control connection
    /// cannot miss it.
    pub fn put_uplink(&self, host: &str, port: u16, registry: &Registry, conn: Conn<Upstream>) {
        let Upstream::Uplink(data) = &conn.io else {
            return;
        };
        let (id, generation) = (data.uplink().to_string(), data.generation());
        let scope = Scope::Uplink {
            id: id.clone(),
            generation,
        };
        let current = || registry.generation(&id) == Some(generation);
        self.keep(host, port, scope, conn, current);
    }

    fn keep(
        &self,
        host: &str,
        port: u16,
        scope: Scope,
        mut conn: Conn<Upstream>,
        current: impl FnOnce() -> bool,
    ) {
        if !conn.buf.is_empty() {
            return; // the server sent more than the response: not reusable
        }
        let shared = scope.shared();
        let mut idle = self.lock(&scope);
        if !current() {
            return;
        }
        if let Upstream::Uplink(data) = &mut conn.io {
            data.set_idle();
        }
        let slots = match idle.get_mut(host) {
            Some(slots) => slots,
            None => idle.entry(host.to_string()).or_default(),
        };
        let at = match slots.iter().position(|(p, s, _)| *p == port && *s == scope) {
            Some(at) => at,
            None => {
                slots.push((port, scope, Vec::new()));
                slots.len() - 1
            }
        };
        let list = &mut slots[at].2;
        let now = Instant::now();
        drop_expired(list, now, IDLE_FOR);
        // The shared uplink list serves every worker: it keeps the whole
        // allowance, not one worker's share of it.
        let cap = if shared {
            MAX_IDLE_PER_KEY
        } else {
            self.per_key
        };
        if list.len() >= cap {
            list.remove(0);
        }
        list.push((conn, now));
    }

    /// Closes the idle data connections of uplink `id` that belong to its
    /// control connection `generation` or an older one.
    pub fn drop_uplink(&self, id: &str, generation: u64) {
        self.close_where(|scope, _, _| {
            matches!(scope, Scope::Uplink { id: i, generation: g } if i == id && *g <= generation)
        });
    }

    /// Closes the idle connections that expired (older than [`IDLE_FOR`] at
    /// `now`) or that the server closed, in every worker's list: without it
    /// a list is only trimmed when a connection goes back into it, and a
    /// worker that stops relaying to a host would keep its dead sockets.
    pub fn sweep(&self, now: Instant) {
        let closed = self.close_where(|_, conn, since| {
            now.duration_since(since) >= IDLE_FOR || !still_open(&mut conn.io)
        });
        if closed > 0 {
            tracing::debug!(closed, "idle upstream connections swept");
        }
    }

    /// Closes the idle connections `dead` picks (by scope, connection and
    /// idle-since), in every worker's list; returns how many. They are closed
    /// outside the locks.
    fn close_where(
        &self,
        mut dead: impl FnMut(&Scope, &mut Conn<Upstream>, Instant) -> bool,
    ) -> usize {
        let mut gone: Vec<Conn<Upstream>> = Vec::new();
        for mut idle in self.each_shard() {
            for slots in idle.values_mut() {
                for (_, scope, list) in slots.iter_mut() {
                    let mut at = 0;
                    while at < list.len() {
                        let (conn, since) = &mut list[at];
                        if dead(scope, conn, *since) {
                            gone.push(list.remove(at).0);
                        } else {
                            at += 1;
                        }
                    }
                }
                slots.retain(|(_, _, list)| !list.is_empty());
            }
            idle.retain(|_, slots| !slots.is_empty());
        }
        gone.len()
    }

    /// Number of idle connections (for tests and the status page).
    pub fn idle_count(&self) -> usize {
        self.each_shard()
            .map(|idle| {
                idle.values()
                    .flatten()
                    .map(|(_, _, list)| list.len())
                    .sum::<usize>()
            })
            .sum()
    }
}

/// Drops what has idled for `max` by `now` from an idle list kept oldest
/// first, where the expired entries are a prefix: one clock read per call,
/// not one per entry (a read per idle connection showed at 3.6% in a profile).
pub fn drop_expired<T>(list: &mut Vec<(T, Instant)>, now: Instant, max: Duration) {
    let expired = list
        .iter()
        .take_while(|(_, since)| now.duration_since(*since) >= max)
        .count();
    list.drain(..expired);
}

/// An idle connection is usable if reading would block: no EOF, no stray
/// bytes. Polled once with a waker that does nothing, through TLS when there
/// is TLS, so session tickets are consumed rather than taken for stray bytes.
/// An uplink data connection is polled the same way: the inside relay sends
/// nothing on it between responses, and its close shows as EOF.
fn still_open(io: &mut Upstream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut probe = [0u8; 1];
    let mut buf = ReadBuf::new(&mut probe);
    Pin::new(io).poll_read(&mut cx, &mut buf).is_pending()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn http_authorities_leave_out_port_80() {
        assert_eq!(http_authority("app.test", 80), "app.test");
        assert_eq!(http_authority("app.test", 8080), "app.test:8080");
        assert_eq!(http_authority("::1", 80), "[::1]");
        assert_eq!(http_authority("::1", 443), "[::1]:443");
    }

    /// A data connection of uplink `id` (generation `g`) and its far end.
    fn data(
        id: &str,
        g: u64,
        sessions: &Arc<AtomicUsize>,
    ) -> (Conn<Upstream>, tokio::io::DuplexStream) {
        data_on(id, g, sessions, 0)
    }

    /// As [`data`], accepted by worker `worker`.
    fn data_on(
        id: &str,
        g: u64,
        sessions: &Arc<AtomicUsize>,
        worker: usize,
    ) -> (Conn<Upstream>, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(64);
        let io = DataConn::new(Box::new(near), id, g, sessions.clone(), worker);
        (Conn::new(Upstream::Uplink(Box::new(io))), far)
    }

    fn worker_of(conn: &Conn<Upstream>) -> usize {
        match &conn.io {
            Upstream::Uplink(data) => data.worker(),
            _ => panic!("not an uplink data connection"),
        }
    }

    #[tokio::test]
    async fn a_worker_takes_the_uplink_connections_it_polls_first() {
        let pool = Pool::new(2);
        let sessions = Arc::new(AtomicUsize::new(0));
        let (on_1, _far_1) = data_on("a", 1, &sessions, 1);
        let (on_2, _far_2) = data_on("a", 1, &sessions, 2);
        pool.keep("erp", 80, uplink("a", 1), on_1, || true);
        pool.keep("erp", 80, uplink("a", 1), on_2, || true);
        crate::workers::act_as(1);
        let took = pool.take("erp", 80, &uplink("a", 1)).expect("one of two");
        assert_eq!(worker_of(&took), 1, "its own, not the newest (worker 2's)");
        // None of worker 1's is left: it takes another worker's.
        let took = pool.take("erp", 80, &uplink("a", 1)).expect("the other");
        assert_eq!(worker_of(&took), 2);
        assert!(pool.take("erp", 80, &uplink("a", 1)).is_none());
    }

    #[test]
    fn a_hop_with_another_client_certificate_is_another_scope() {
        // A reload that changes a route's via_cert: connections pooled under
        // the old identity serve only requests that started under it.
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for name in ["ca", "a", "b"] {
            let made = rcgen::generate_simple_self_signed(vec![format!("{name}.test")]).unwrap();
            let cert = dir.path().join(format!("{name}.pem"));
            let key = dir.path().join(format!("{name}.key"));
            std::fs::write(&cert, made.cert.pem()).unwrap();
            std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
            files.push((cert.display().to_string(), key.display().to_string()));
        }
        let scope_with = |(cert, key): &(String, String)| {
            let text = format!(
                "[[route]]\nhost = \"erp.corp\"\nvia = \"hop.test:8443\"\nvia_ca = \"{}\"\nvia_cert = \"{cert}\"\nvia_key = \"{key}\"\n",
                files[0].0
            );
            let config = crate::config::Config::from_toml(&text).unwrap();
            Scope::of_route(&config.routes.routes()[0])
        };
        assert_eq!(scope_with(&files[1]), scope_with(&files[1]));
        assert_ne!(scope_with(&files[1]), scope_with(&files[2]));
    }

    fn uplink(id: &str, generation: u64) -> Scope {
        Scope::Uplink {
            id: id.into(),
            generation,
        }
    }

    /// A pooled-to-be TCP connection and the server's end of it.
    async fn tcp_pair() -> (Conn<Upstream>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (far, _) = listener.accept().await.unwrap();
        (Conn::new(Upstream::Tcp(near)), far)
    }

    #[tokio::test]
    async fn the_shared_uplink_list_keeps_the_whole_allowance() {
        // Two workers: each keeps half of MAX_IDLE_PER_KEY plain connections
        // per host, but the one uplink list, which every worker draws from,
        // keeps all of it (a 50-connection load through an uplink closed and
        // reopened data connections when it kept only half).
        let pool = Pool::new(2);
        let sessions = Arc::new(AtomicUsize::new(0));
        let mut far_ends = Vec::new();
        for _ in 0..MAX_IDLE_PER_KEY + 5 {
            let (conn, far) = data("a", 1, &sessions);
            far_ends.push(far);
            pool.keep("erp", 80, uplink("a", 1), conn, || true);
            let (conn, far) = tcp_pair().await;
            pool.keep("erp", 80, Scope::Plain, conn, || true);
            drop(far);
        }
        let mut uplinks = 0;
        while pool.take("erp", 80, &uplink("a", 1)).is_some() {
            uplinks += 1;
        }
        assert_eq!(uplinks, MAX_IDLE_PER_KEY);
        let plain = pool.shards[0].lock().unwrap()["erp"]
            .iter()
            .find(|(_, s, _)| *s == Scope::Plain)
            .map_or(0, |(_, _, list)| list.len());
        assert_eq!(plain, MAX_IDLE_PER_KEY / 2);
    }

    #[tokio::test]
    async fn sweep_closes_expired_and_server_closed_idle_connections() {
        let pool = Pool::new(2);
        let (open, _open_far) = tcp_pair().await;
        let (closed, closed_far) = tcp_pair().await;
        pool.keep("erp", 80, Scope::Plain, open, || true);
        pool.keep("mes", 80, Scope::Plain, closed, || true);
        drop(closed_far);
        // The FIN reaches the idle socket; the sweep finds it closed.
        let swept = async {
            loop {
                pool.sweep(Instant::now());
                if pool.idle_count() == 1 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), swept)
            .await
            .expect("the server-closed connection was not swept");
        assert!(pool.take("mes", 80, &Scope::Plain).is_none());
        // The open one stays until it has idled for IDLE_FOR.
        pool.sweep(Instant::now());
        assert_eq!(pool.idle_count(), 1);
        pool.sweep(Instant::now() + IDLE_FOR);
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn uplink_connections_are_pooled_per_uplink_generation_and_name() {
        let pool = Pool::default();
        let sessions = Arc::new(AtomicUsize::new(0));
        let (conn, _far) = data("a", 1, &sessions);
        assert_eq!(sessions.load(Ordering::Relaxed), 1);
        pool.keep("erp", 80, uplink("a", 1), conn, || true);
        // Idle in the pool: not an open session.
        assert_eq!(sessions.load(Ordering::Relaxed), 0);
        for (host, port, scope) in [
            ("erp", 80, uplink("a", 2)),
            ("erp", 80, uplink("b", 1)),
            ("erp", 81, uplink("a", 1)),
            ("mes", 80, uplink("a", 1)),
            ("erp", 80, Scope::Plain),
        ] {
            assert!(
                pool.take(host, port, &scope).is_none(),
                "{host}:{port} {scope:?}"
            );
        }
        let taken = pool.take("erp", 80, &uplink("a", 1));
        assert!(taken.is_some());
        assert_eq!(sessions.load(Ordering::Relaxed), 1);
        drop(taken);
        assert_eq!(sessions.load(Ordering::Relaxed), 0);

        // A control connection that is no longer current keeps nothing.
        let (conn, _far) = data("a", 1, &sessions);
        pool.keep("erp", 80, uplink("a", 1), conn, || false);
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(sessions.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn closed_or_dropped_uplink_connections_are_not_taken() {
        let pool = Pool::default();
        let sessions = Arc::new(AtomicUsize::new(0));
        // The inside relay closed it while it idled: EOF, not taken.
        let (conn, far) = data("a", 1, &sessions);
        pool.keep("erp", 80, uplink("a", 1), conn, || true);
        drop(far);
        assert!(pool.take("erp", 80, &uplink("a", 1)).is_none());
        // Stray bytes: not taken either.
        let (conn, mut far) = data("a", 1, &sessions);
        pool.keep("erp", 80, uplink("a", 1), conn, || true);
        tokio::io::AsyncWriteExt::write_all(&mut far, b"x")
            .await
            .unwrap();
        assert!(pool.take("erp", 80, &uplink("a", 1)).is_none());
        assert_eq!(sessions.load(Ordering::Relaxed), 0);

        // drop_uplink closes that uplink's connections up to its generation only.
        let (a1, _f1) = data("a", 1, &sessions);
        let (a2, _f2) = data("a", 2, &sessions);
        let (b1, _f3) = data("b", 1, &sessions);
        pool.keep("erp", 80, uplink("a", 1), a1, || true);
        pool.keep("erp", 80, uplink("a", 2), a2, || true);
        pool.keep("erp", 80, uplink("b", 1), b1, || true);
        pool.drop_uplink("a", 1);
        assert_eq!(pool.idle_count(), 2);
        assert!(pool.take("erp", 80, &uplink("a", 1)).is_none());
        assert!(pool.take("erp", 80, &uplink("a", 2)).is_some());
        assert!(pool.take("erp", 80, &uplink("b", 1)).is_some());
        assert_eq!(sessions.load(Ordering::Relaxed), 0);
    }
}
