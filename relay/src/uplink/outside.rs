//! The outside relay's side of uplinks: authenticating control connections,
//! the registry of offered names, opening sessions for held client requests,
//! and claiming the data connections inside relays open for them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};

use super::{
    receive, send, Message, Refused, CONTROL_PROTOCOL, DATA_PROTOCOL, MAX_PARKED, PARKED_PING,
};
use crate::codec::{BoxIo, Conn, FieldName, Io, RequestHead};
use crate::error::{ErrorKind, RelayError};
use crate::http1::write_simple;
use crate::upstream::Upstream;
use crate::ConnCtx;

/// How long the outside relay waits for any message on a control connection
/// before calling it dead (inside relays ping at least every `idle_ping`).
const CONTROL_SILENCE: Duration = Duration::from_secs(120);

/// How long a connected control connection has to answer a ping when a
/// second one arrives for the same uplink id. Answered: the second is refused
/// (two inside relays share the id). Silent: it was half-open (the inside
/// relay lost it without the outside seeing a close) and the second replaces it.
const LIVENESS_PROBE: Duration = Duration::from_secs(2);

/// What the outside relay knows of one uplink id.
struct Link {
    /// Which control connection is current; a reconnect replaces the old one.
    generation: u64,
    connected: bool,
    sessions: Arc<AtomicUsize>,
    to_inside: mpsc::Sender<Message>,
    /// Woken by every message the control connection brings (the liveness probe).
    heard: Arc<Notify>,
    /// The inside relay's address, as seen here.
    peer: SocketAddr,
    since: SystemTime,
    /// Proof a data connection must show to be parked (S4p); new with every
    /// control connection.
    pool_key: String,
    /// Parked data connections (S4p), by park number; the newest is taken first.
    parked: Vec<(u64, oneshot::Sender<Claim>)>,
}

/// A data connection for a session, and the worker whose runtime polls its
/// socket (the one that accepted it).
type Arrived = (Conn<BoxIo>, usize);

type Waiting = oneshot::Sender<Result<Arrived, String>>;

/// A session handed to a parked data connection (S7p): the `open` line to
/// send, and where the connection goes once it is sent.
struct Claim {
    open: Message,
    reply: Waiting,
}

/// A control connection as the registry knows it: where to send it
/// messages, what wakes when it speaks, and who it is.
#[derive(Clone)]
struct Control {
    to_inside: mpsc::Sender<Message>,
    heard: Arc<Notify>,
    peer: SocketAddr,
}

impl Control {
    /// Whether the control connection answers a ping within `within`.
    async fn answers(&self, within: Duration) -> bool {
        let heard = self.heard.notified();
        tokio::pin!(heard);
        heard.as_mut().enable();
        tokio::time::timeout(within, async {
            self.to_inside.send(Message::Ping { seq: 0 }).await.is_ok() && {
                heard.await;
                true
            }
        })
        .await
        .unwrap_or(false)
    }
}

#[derive(Default)]
struct State {
    links: HashMap<String, Link>,
    /// Offered name -> uplink id.
    names: HashMap<String, String>,
    /// Session id -> (uplink id, the held request waiting for its data connection).
    pending: HashMap<String, (String, Waiting)>,
    next_generation: u64,
    next_park: u64,
}

/// The registry of uplinks (in `Shared`). A plain mutex: every section is a
/// few map operations and never awaits.
#[derive(Default)]
pub struct Registry {
    state: Mutex<State>,
}

/// One row of `/services` and the status page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Offered {
    pub name: String,
    pub uplink: String,
    pub state: &'static str,
    /// Data connections of the uplink carrying a request or a tunnel now
    /// (idle ones in the upstream pool are not sessions).
    pub sessions: usize,
    /// Data connections the uplink keeps parked here ahead of sessions (its `pool`).
    pub parked: usize,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The uplink id offering `host`, if any (exact names as registered).
    pub fn offered_by(&self, host: &str) -> Option<String> {
        self.lock().names.get(host).cloned()
    }

    /// Every offered name with its uplink's state.
    pub fn offered(&self) -> Vec<Offered> {
        let state = self.lock();
        let mut rows: Vec<Offered> = state
            .names
            .iter()
            .filter_map(|(name, id)| {
                let link = state.links.get(id)?;
                Some(Offered {
                    name: name.clone(),
                    uplink: id.clone(),
                    state: if link.connected {
                        "connected"
                    } else {
                        "disconnected"
                    },
                    sessions: link.sessions.load(Ordering::Relaxed),
                    parked: link.parked.len(),
                })
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    /// Parked data connections of uplink `id` (S4p).
    pub fn parked(&self, id: &str) -> usize {
        self.lock().links.get(id).map_or(0, |l| l.parked.len())
    }

    /// Uplinks currently connected.
    pub fn connected(&self) -> usize {
        self.lock().links.values().filter(|l| l.connected).count()
    }

    /// The generation of uplink `id`'s control connection while it is
    /// connected: pooled data connections of another generation are stale.
    pub fn generation(&self, id: &str) -> Option<u64> {
        self.lock()
            .links
            .get(id)
            .filter(|l| l.connected)
            .map(|l| l.generation)
    }

    /// Asks uplink `id` for a data connection to `host:port` (S7) and waits
    /// for it (S10) up to `timeout`.
    pub async fn open_session(
        &self,
        id: &str,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Conn<Upstream>, RelayError> {
        let upstream = format!("uplink {id}");
        let route = format!("{host} (uplink {id})");
        let not_connected = || {
            RelayError::on_route(
                ErrorKind::Connect {
                    upstream: upstream.clone(),
                    cause: std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        "the uplink is not connected",
                    ),
                },
                &route,
            )
        };
        let (generation, sessions) = {
            let state = self.lock();
            match state.links.get(id) {
                Some(l) if l.connected => (l.generation, l.sessions.clone()),
                _ => return Err(not_connected()),
            }
        };
        let data = |(conn, worker): Arrived| Conn {
            io: Upstream::Uplink(Box::new(DataConn::new(
                conn.io,
                id,
                generation,
                sessions.clone(),
                worker,
            ))),
            buf: conn.buf,
        };
        let session = crate::secret::random_id();
        let msg = Message::Open {
            session: session.clone(),
            host: host.to_string(),
            port,
        };
        if let Some(conn) = self.take_parked(id, &msg).await {
            tracing::debug!(uplink = %id, %session, %host, port, "session on a parked data connection");
            return Ok(data(conn));
        }
        let (tx, rx) = oneshot::channel();
        let sender = {
            let mut state = self.lock();
            let link = match state.links.get(id) {
                Some(l) if l.connected => l.to_inside.clone(),
                _ => return Err(not_connected()),
            };
            state.pending.insert(session.clone(), (id.to_string(), tx));
            link
        };
        // The entry goes however this ends: answered, timed out, or dropped
        // (an HTTP/2 client resetting its stream drops the whole request).
        let _pending = Unpend {
            registry: self,
            session: &session,
        };
        let outcome = if sender.send(msg).await.is_err() {
            Err("the control connection closed".to_string())
        } else {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err("the control connection closed".to_string()),
                Err(_) => {
                    return Err(RelayError::on_route(
                        ErrorKind::ResponseTimeout { upstream },
                        &route,
                    ));
                }
            }
        };
        outcome.map(data).map_err(|why| {
            RelayError::on_route(
                ErrorKind::Connect {
                    upstream: upstream.clone(),
                    cause: std::io::Error::other(why),
                },
                &route,
            )
        })
    }

    /// Sends `open` down a parked data connection of uplink `id` (S7p); tries
    /// the next one while sending fails. `None` when none is left.
    async fn take_parked(&self, id: &str, open: &Message) -> Option<Arrived> {
        loop {
            let parked = {
                let mut state = self.lock();
                let link = state.links.get_mut(id).filter(|l| l.connected)?;
                link.parked.pop()
            };
            let (_, to_parked) = parked?;
            let (reply, rx) = oneshot::channel();
            let claim = Claim {
                open: open.clone(),
                reply,
            };
            if to_parked.send(claim).is_err() {
                continue; // it died just now
            }
            match rx.await {
                Ok(Ok(conn)) => return Some(conn),
                Ok(Err(why)) => {
                    tracing::debug!(uplink = %id, reason = %why, "parked data connection failed; trying the next");
                }
                Err(_) => {
                    tracing::debug!(uplink = %id, "parked data connection gone; trying the next")
                }
            }
        }
    }

    /// Registers a control connection's offers (S3-S4); returns its generation.
    fn register(
        &self,
        id: &str,
        offers: &[String],
        accept: &crate::config::AcceptUplink,
        control: Control,
    ) -> (u64, String, Vec<String>, Vec<Refused>) {
        let pool_key = crate::secret::random_id();
        let mut state = self.lock();
        state.next_generation += 1;
        let generation = state.next_generation;
        let (mut accepted, mut refused) = (Vec::new(), Vec::new());
        for name in offers {
            let name = name.trim().to_ascii_lowercase();
            let owner = state.names.get(&name).cloned();
            let taken = owner
                .as_deref()
                .is_some_and(|o| o != id && state.links.get(o).is_some_and(|l| l.connected));
            if !accept.may_offer(&name) {
                refused.push(Refused {
                    name,
                    reason: format!("uplink {id} may not offer this name"),
                });
            } else if taken {
                let other = owner.unwrap_or_default();
                refused.push(Refused {
                    name,
                    reason: format!("already offered by uplink {other}"),
                });
            } else {
                accepted.push(name);
            }
        }
        // Names this id offered before and no longer offers are withdrawn.
        state.names.retain(|_, owner| owner != id);
        for name in &accepted {
            state.names.insert(name.clone(), id.to_string());
        }
        let sessions = state
            .links
            .get(id)
            .map(|l| l.sessions.clone())
            .unwrap_or_default();
        state.links.insert(
            id.to_string(),
            Link {
                generation,
                connected: true,
                sessions,
                to_inside: control.to_inside,
                heard: control.heard,
                peer: control.peer,
                since: SystemTime::now(),
                pool_key: pool_key.clone(),
                // A former control connection's parked connections close.
                parked: Vec::new(),
            },
        );
        (generation, pool_key, accepted, refused)
    }

    /// The connected control connection of uplink `id`, if any.
    fn current(&self, id: &str) -> Option<Control> {
        let state = self.lock();
        let link = state.links.get(id).filter(|l| l.connected)?;
        Some(Control {
            to_inside: link.to_inside.clone(),
            heard: link.heard.clone(),
            peer: link.peer,
        })
    }

    /// Marks a control connection gone; its names answer 502 until it returns.
    fn disconnected(&self, id: &str, generation: u64) {
        let mut state = self.lock();
        if let Some(link) = state.links.get_mut(id) {
            if link.generation == generation {
                link.connected = false;
                link.since = SystemTime::now();
                // Dropping the senders closes the parked connections.
                link.parked.clear();
            }
        }
        // Requests waiting on this uplink fail now rather than at their timeout.
        let waiting: Vec<String> = state
            .pending
            .iter()
            .filter(|(_, (owner, _))| owner == id)
            .map(|(s, _)| s.clone())
            .collect();
        for session in waiting {
            if let Some((_, tx)) = state.pending.remove(&session) {
                let _ = tx.send(Err(format!("uplink {id} disconnected")));
            }
        }
    }

    fn fail_session(&self, session: &str, reason: String) {
        if let Some((_, tx)) = self.lock().pending.remove(session) {
            let _ = tx.send(Err(reason));
        }
    }
}

/// A data connection on the outside relay, as an upstream connection: it
/// knows its uplink and the control connection (generation) it belongs to, so
/// the upstream pool keeps it only for that uplink and only while that control
/// connection lives. It counts as an open session of its uplink while it
/// carries a request or a tunnel, not while it idles in the pool.
pub struct DataConn {
    io: BoxIo,
    uplink: String,
    generation: u64,
    sessions: Arc<AtomicUsize>,
    active: bool,
    /// The worker whose runtime polls the socket ([`crate::workers::current`]).
    worker: usize,
}

impl DataConn {
    pub(crate) fn new(
        io: BoxIo,
        uplink: &str,
        generation: u64,
        sessions: Arc<AtomicUsize>,
        worker: usize,
    ) -> DataConn {
        sessions.fetch_add(1, Ordering::Relaxed);
        DataConn {
            io,
            uplink: uplink.to_string(),
            generation,
            sessions,
            active: true,
            worker,
        }
    }

    /// The worker whose runtime polls this connection's socket.
    pub fn worker(&self) -> usize {
        self.worker
    }

    pub fn uplink(&self) -> &str {
        &self.uplink
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Idle in the pool: no longer an open session.
    pub fn set_idle(&mut self) {
        if self.active {
            self.active = false;
            self.sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Taken from the pool for a request: an open session again.
    pub fn set_active(&mut self) {
        if !self.active {
            self.active = true;
            self.sessions.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for DataConn {
    fn drop(&mut self) {
        self.set_idle();
    }
}

impl AsyncRead for DataConn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for DataConn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// `id:secret` from `Authorization: Basic ...`.
fn basic_credentials(head: &RequestHead) -> Option<(String, String)> {
    let value =
        std::str::from_utf8(head.fields.get(crate::codec::FieldName::Authorization)?).ok()?;
    let encoded = value.trim().strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

async fn refuse<S: Io>(conn: &mut Conn<S>, status: u16, why: &str) {
    let body = format!("{status} uplink refused: {why}\n");
    let _ = write_simple(
        &mut conn.io,
        status,
        "text/plain; charset=utf-8",
        body.as_bytes(),
        true,
        &[],
        false,
    )
    .await;
}

/// Serves an uplink control connection (S1-S4, then S7 and keepalive) until it closes.
pub async fn serve_control<S: Io>(mut conn: Conn<S>, head: RequestHead, ctx: ConnCtx) {
    let config = ctx.shared.config();
    let Some((id, secret)) = basic_credentials(&head) else {
        tracing::warn!(client = %ctx.peer, "uplink without credentials refused");
        return refuse(&mut conn, 401, "missing Authorization: Basic id:secret").await;
    };
    let Some(accept) = config.accept_uplinks.iter().find(|a| a.id == id).cloned() else {
        tracing::warn!(client = %ctx.peer, uplink = %id, "unknown uplink id refused");
        return refuse(&mut conn, 403, &format!("uplink {id} is not accepted here")).await;
    };
    let hash = accept.secret_hash.clone();
    let verified = tokio::task::spawn_blocking(move || crate::secret::verify(&hash, &secret))
        .await
        .unwrap_or(false);
    if !verified {
        tracing::warn!(client = %ctx.peer, uplink = %id, "uplink authentication failed");
        return refuse(
            &mut conn,
            403,
            &format!("uplink {id}: authentication failed"),
        )
        .await;
    }
    let registry = &ctx.shared.uplinks;
    // One inside relay per id: a second one is refused while the first
    // answers; a first one that does not answer was half-open and is replaced.
    if let Some(current) = registry.current(&id) {
        if current.answers(LIVENESS_PROBE).await {
            tracing::warn!(uplink = %id, client = %ctx.peer, connected_from = %current.peer, "second control connection for a connected uplink refused: two inside relays share this id");
            return refuse(
                &mut conn,
                409,
                &format!(
                    "uplink {id} is already connected from {}; two inside relays cannot share an id",
                    current.peer
                ),
            )
            .await;
        }
        tracing::warn!(uplink = %id, client = %ctx.peer, connected_from = %current.peer, "the uplink's control connection did not answer a ping; the new one replaces it");
    }
    let switching = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: {CONTROL_PROTOCOL}\r\nConnection: upgrade\r\n\r\n");
    if conn.io.write_all(switching.as_bytes()).await.is_err() {
        return;
    }
    let offers = match tokio::time::timeout(Duration::from_secs(10), receive(&mut conn)).await {
        Ok(Ok(Some(Message::Register { offers }))) => offers,
        other => {
            tracing::warn!(uplink = %id, outcome = ?other.map(|r| r.map(|m| m.map(|_| "unexpected message"))), "uplink did not register");
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let heard = Arc::new(Notify::new());
    let control = Control {
        to_inside: tx,
        heard: heard.clone(),
        peer: ctx.peer,
    };
    let (generation, pool_key, accepted, refused) =
        registry.register(&id, &offers, &accept, control);
    for r in &refused {
        tracing::warn!(uplink = %id, name = %r.name, reason = %r.reason, "offer refused");
    }
    tracing::info!(uplink = %id, client = %ctx.peer, accepted = ?accepted, "uplink registered");
    // This relay's own routes win over offers (forward::choose): say so.
    let config = ctx.shared.config();
    for name in &accepted {
        if let Some(route) = config.routes.lookup(name) {
            tracing::warn!(uplink = %id, name = %name, route = %route.host, "offer shadowed by this relay's own route: requests for the name go to the route, not the uplink");
        }
    }
    let registered = Message::Registered {
        accepted,
        refused,
        pool_key: Some(pool_key),
    };
    if send(&mut conn.io, &registered).await.is_err() {
        registry.disconnected(&id, generation);
        return;
    }
    ctx.shared
        .metrics
        .uplinks_connected
        .set(registry.connected() as i64);

    let mut last_heard = Instant::now();
    let end = loop {
        tokio::select! {
            incoming = receive(&mut conn) => match incoming {
                Ok(Some(msg)) => {
                    last_heard = Instant::now();
                    heard.notify_waiters();
                    match msg {
                        Message::Ping { seq }
                            if send(&mut conn.io, &Message::Pong { seq }).await.is_err() =>
                        {
                            break "write failed".to_string();
                        }
                        Message::Failed { session, reason } => {
                            registry.fail_session(&session, format!("uplink {id}: {reason}"));
                        }
                        _ => {}
                    }
                }
                Ok(None) => break "closed by the inside relay".to_string(),
                Err(e) => break e,
            },
            outgoing = rx.recv() => match outgoing {
                Some(msg) => {
                    if let Err(e) = send(&mut conn.io, &msg).await {
                        break format!("write failed: {e}");
                    }
                }
                None => break "replaced by a newer control connection (this one did not answer a ping)".to_string(),
            },
            () = tokio::time::sleep_until((last_heard + CONTROL_SILENCE).into()) => {
                break format!("silent for {CONTROL_SILENCE:?}");
            }
            () = ctx.shared.until_draining() => break "relay shutting down".to_string(),
        }
    };
    registry.disconnected(&id, generation);
    // Idle data connections of this control connection close too: a request
    // from now on gets 502 naming the uplink (or, once it is back, a new
    // session), never a data connection of the gone control connection.
    ctx.shared.pool.drop_uplink(&id, generation);
    ctx.shared
        .metrics
        .uplinks_connected
        .set(registry.connected() as i64);
    tracing::warn!(uplink = %id, reason = %end, "uplink control connection ended; its names answer 502 until it returns");
}

/// Claims a data connection for its session (S10-S11): answers `101` and hands
/// the connection to the held request, or closes it if nobody waits for it.
pub async fn claim_data<S: Io>(mut conn: Conn<S>, head: RequestHead, ctx: ConnCtx) {
    if head.fields.has(FieldName::PortholePool) {
        return park(conn, head, ctx).await;
    }
    let session = head
        .fields
        .get(FieldName::PortholeSession)
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("")
        .trim()
        .to_string();
    let waiting = ctx.shared.uplinks.lock().pending.remove(&session);
    let Some((id, tx)) = waiting else {
        tracing::warn!(client = %ctx.peer, %session, "data connection for an unknown or claimed session closed");
        return refuse(&mut conn, 404, "no such session").await;
    };
    let switching = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: {DATA_PROTOCOL}\r\nConnection: upgrade\r\n\r\n");
    if conn.io.write_all(switching.as_bytes()).await.is_err() {
        let _ = tx.send(Err("data connection failed during the upgrade".into()));
        return;
    }
    let io: BoxIo = Box::new(conn.io);
    let worker = crate::workers::current();
    if tx.send(Ok((Conn { io, buf: conn.buf }, worker))).is_err() {
        tracing::debug!(uplink = %id, %session, "session claimed after its client gave up");
    }
}

/// Compares two secrets without an early exit on the first difference.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn header(head: &RequestHead, name: FieldName) -> &str {
    head.fields
        .get(name)
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("")
        .trim()
}

/// Removes a session's `pending` entry when dropped.
struct Unpend<'a> {
    registry: &'a Registry,
    session: &'a str,
}

impl Drop for Unpend<'_> {
    fn drop(&mut self) {
        self.registry.lock().pending.remove(self.session);
    }
}

/// Parks a data connection an inside relay opened ahead of its sessions
/// (S4p), pings it (S4k), and hands it to the first session that takes it
/// (S7p). Returns when it is claimed, dies, or its uplink goes away; while
/// parked it holds this connection's slot like any client connection.
async fn park<S: Io>(mut conn: Conn<S>, head: RequestHead, ctx: ConnCtx) {
    let id = header(&head, FieldName::PortholeUplink).to_string();
    let key = header(&head, FieldName::PortholePool);
    let registry = &ctx.shared.uplinks;
    let (tx, mut claims) = oneshot::channel::<Claim>();
    let admitted = {
        let mut state = registry.lock();
        state.next_park += 1;
        let number = state.next_park;
        match state.links.get_mut(&id) {
            Some(link) if link.connected && same_secret(&link.pool_key, key) => {
                if link.parked.len() >= MAX_PARKED {
                    Err((
                        503,
                        format!("uplink {id} has {MAX_PARKED} parked data connections already"),
                    ))
                } else {
                    link.parked.push((number, tx));
                    Ok((number, link.parked.len()))
                }
            }
            _ => Err((
                403,
                format!("uplink {id}: no connected uplink with this pool key"),
            )),
        }
    };
    let (number, parked) = match admitted {
        Ok(a) => a,
        Err((status, why)) => {
            tracing::warn!(client = %ctx.peer, uplink = %id, status, reason = %why, "data connection not parked");
            return refuse(&mut conn, status, &why).await;
        }
    };
    let unpark = || {
        if let Some(link) = registry.lock().links.get_mut(&id) {
            link.parked.retain(|(n, _)| *n != number);
        }
    };
    let switching = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: {DATA_PROTOCOL}\r\nConnection: upgrade\r\n\r\n");
    if conn.io.write_all(switching.as_bytes()).await.is_err() {
        unpark();
        return;
    }
    tracing::debug!(uplink = %id, client = %ctx.peer, parked, "data connection parked");
    let mut ping = tokio::time::interval(PARKED_PING);
    ping.tick().await; // the first tick is immediate
    let mut seq = 0u64;
    let ended = loop {
        tokio::select! {
            // A connection already known dead is never handed to a session.
            biased;
            read = conn.fill() => {
                unpark();
                break match read {
                    Ok(0) => "closed by the inside relay".to_string(),
                    Ok(_) => "the inside relay sent data on a parked connection".to_string(),
                    Err(e) => format!("read failed: {e}"),
                };
            }
            claim = &mut claims => {
                let Ok(Claim { open, reply }) = claim else {
                    break "its uplink went away".to_string();
                };
                let sent = tokio::time::timeout(Duration::from_secs(5), send(&mut conn.io, &open)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    let _ = reply.send(Err("writing open on a parked data connection failed".into()));
                    break "writing open failed".to_string();
                }
                let io: BoxIo = Box::new(conn.io);
                let worker = crate::workers::current();
                if reply.send(Ok((Conn { io, buf: conn.buf }, worker))).is_err() {
                    tracing::debug!(uplink = %id, "parked data connection claimed after its client gave up");
                }
                return;
            }
            _ = ping.tick() => {
                seq += 1;
                if let Err(e) = send(&mut conn.io, &Message::Ping { seq }).await {
                    unpark();
                    break format!("ping failed: {e}");
                }
            }
            () = ctx.shared.until_draining() => {
                unpark();
                break "relay shutting down".to_string();
            }
        }
    };
    tracing::debug!(uplink = %id, reason = %ended, "parked data connection dropped");
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn pool_keys_compare_whole() {
        assert!(same_secret("0a1b", "0a1b"));
        assert!(!same_secret("0a1b", "0a1c"));
        assert!(!same_secret("0a1b", "0a1"));
        assert!(!same_secret("", "0a1b"));
        assert!(same_secret("", ""));
    }
}
