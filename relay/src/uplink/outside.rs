//! The outside relay's side of uplinks: authenticating control connections,
//! the registry of offered names, opening sessions for held client requests,
//! and claiming the data connections inside relays open for them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::{receive, send, Message, Refused, CONTROL_PROTOCOL, DATA_PROTOCOL};
use crate::codec::{BoxIo, Conn, Io, RequestHead};
use crate::error::{ErrorKind, RelayError};
use crate::http1::write_simple;
use crate::upstream::Upstream;
use crate::ConnCtx;

/// How long the outside relay waits for any message on a control connection
/// before calling it dead (inside relays ping at least every `idle_ping`).
const CONTROL_SILENCE: Duration = Duration::from_secs(120);

/// What the outside relay knows of one uplink id.
struct Link {
    /// Which control connection is current; a reconnect replaces the old one.
    generation: u64,
    connected: bool,
    sessions: Arc<AtomicUsize>,
    to_inside: mpsc::Sender<Message>,
    since: SystemTime,
}

type Waiting = oneshot::Sender<Result<Conn<BoxIo>, String>>;

#[derive(Default)]
struct State {
    links: HashMap<String, Link>,
    /// Offered name -> uplink id.
    names: HashMap<String, String>,
    /// Session id -> (uplink id, the held request waiting for its data connection).
    pending: HashMap<String, (String, Waiting)>,
    next_generation: u64,
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
    pub sessions: usize,
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
                })
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    /// Uplinks currently connected.
    pub fn connected(&self) -> usize {
        self.lock().links.values().filter(|l| l.connected).count()
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
        let session = crate::secret::random_id();
        let (tx, rx) = oneshot::channel();
        let sender = {
            let mut state = self.lock();
            let link = match state.links.get(id) {
                Some(l) if l.connected => l.to_inside.clone(),
                _ => {
                    return Err(RelayError::on_route(
                        ErrorKind::Connect {
                            upstream,
                            cause: std::io::Error::new(
                                std::io::ErrorKind::NotConnected,
                                "the uplink is not connected",
                            ),
                        },
                        &route,
                    ))
                }
            };
            state.pending.insert(session.clone(), (id.to_string(), tx));
            link
        };
        let msg = Message::Open {
            session: session.clone(),
            host: host.to_string(),
            port,
        };
        let outcome = if sender.send(msg).await.is_err() {
            Err("the control connection closed".to_string())
        } else {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err("the control connection closed".to_string()),
                Err(_) => {
                    self.lock().pending.remove(&session);
                    return Err(RelayError::on_route(
                        ErrorKind::ResponseTimeout { upstream },
                        &route,
                    ));
                }
            }
        };
        self.lock().pending.remove(&session);
        outcome
            .map(|conn| Conn {
                io: Upstream::Uplink(conn.io),
                buf: conn.buf,
            })
            .map_err(|why| {
                RelayError::on_route(
                    ErrorKind::Connect {
                        upstream,
                        cause: std::io::Error::other(why),
                    },
                    &route,
                )
            })
    }

    /// Registers a control connection's offers (S3-S4); returns its generation.
    fn register(
        &self,
        id: &str,
        offers: &[String],
        accept: &crate::config::AcceptUplink,
        tx: mpsc::Sender<Message>,
    ) -> (u64, Vec<String>, Vec<Refused>) {
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
                to_inside: tx,
                since: SystemTime::now(),
            },
        );
        (generation, accepted, refused)
    }

    /// Marks a control connection gone; its names answer 502 until it returns.
    fn disconnected(&self, id: &str, generation: u64) {
        let mut state = self.lock();
        if let Some(link) = state.links.get_mut(id) {
            if link.generation == generation {
                link.connected = false;
                link.since = SystemTime::now();
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

/// Counts an open session for its uplink while the data connection lives.
struct Counted<S> {
    inner: S,
    sessions: Arc<AtomicUsize>,
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        self.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// `id:secret` from `Authorization: Basic ...`.
fn basic_credentials(head: &RequestHead) -> Option<(String, String)> {
    let value = std::str::from_utf8(head.fields.get("authorization")?).ok()?;
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
    let registry = &ctx.shared.uplinks;
    let (generation, accepted, refused) = registry.register(&id, &offers, &accept, tx);
    for r in &refused {
        tracing::warn!(uplink = %id, name = %r.name, reason = %r.reason, "offer refused");
    }
    tracing::info!(uplink = %id, client = %ctx.peer, accepted = ?accepted, "uplink registered");
    if send(&mut conn.io, &Message::Registered { accepted, refused })
        .await
        .is_err()
    {
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
                Ok(Some(Message::Ping { seq })) => {
                    last_heard = Instant::now();
                    if send(&mut conn.io, &Message::Pong { seq }).await.is_err() {
                        break "write failed".to_string();
                    }
                }
                Ok(Some(Message::Failed { session, reason })) => {
                    last_heard = Instant::now();
                    registry.fail_session(&session, format!("uplink {id}: {reason}"));
                }
                Ok(Some(_)) => last_heard = Instant::now(),
                Ok(None) => break "closed by the inside relay".to_string(),
                Err(e) => break e,
            },
            outgoing = rx.recv() => match outgoing {
                Some(msg) => {
                    if let Err(e) = send(&mut conn.io, &msg).await {
                        break format!("write failed: {e}");
                    }
                }
                None => break "replaced by a newer control connection".to_string(),
            },
            () = tokio::time::sleep_until((last_heard + CONTROL_SILENCE).into()) => {
                break format!("silent for {CONTROL_SILENCE:?}");
            }
            () = ctx.shared.shutdown.cancelled() => break "relay shutting down".to_string(),
        }
    };
    registry.disconnected(&id, generation);
    ctx.shared
        .metrics
        .uplinks_connected
        .set(registry.connected() as i64);
    tracing::warn!(uplink = %id, reason = %end, "uplink control connection ended; its names answer 502 until it returns");
}

/// Claims a data connection for its session (S10-S11): answers `101` and hands
/// the connection to the held request, or closes it if nobody waits for it.
pub async fn claim_data<S: Io>(mut conn: Conn<S>, head: RequestHead, ctx: ConnCtx) {
    let session = head
        .fields
        .get("porthole-session")
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
    let sessions = ctx
        .shared
        .uplinks
        .lock()
        .links
        .get(&id)
        .map(|l| l.sessions.clone())
        .unwrap_or_default();
    sessions.fetch_add(1, Ordering::Relaxed);
    let io: BoxIo = Box::new(Counted {
        inner: conn.io,
        sessions,
    });
    if tx.send(Ok(Conn { io, buf: conn.buf })).is_err() {
        tracing::debug!(uplink = %id, %session, "session claimed after its client gave up");
    }
}
