//! Forwarded ports ("pseudo sockets"): a local listener per forward; every
//! accepted connection becomes one `CONNECT` stream to the forward's target
//! over the link. Forwards are added and removed while the shim runs;
//! removing one closes its listener (connections already open carry on).
//! [`Table`] and [`Kind`] are shared with the UDP forwards ([`crate::udp`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use hyper_util::rt::TokioIo;
use porthole_relay::codec::Conn;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::config::ForwardSpec;
use crate::link::{connect_request, LinkHandle};
use crate::AbortOnDrop;

/// The two kinds of forward; each has its own [`Table`] (a TCP and a UDP
/// forward may share a local address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Udp,
}

impl Kind {
    /// How messages name a forward of this kind.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Tcp => "forward",
            Kind::Udp => "UDP forward",
        }
    }
}

/// Forwards by local address, TCP or UDP: the bookkeeping both kinds share.
/// An entry's tasks stop when it is removed (dropped).
pub struct Table<E> {
    // A plain mutex: sections are map updates and never await.
    inner: Arc<Mutex<BTreeMap<SocketAddr, E>>>,
    kind: Kind,
}

impl<E> Clone for Table<E> {
    fn clone(&self) -> Self {
        Table {
            inner: self.inner.clone(),
            kind: self.kind,
        }
    }
}

/// An entry of a [`Table`]: what it forwards.
pub trait Forwarded {
    fn spec(&self) -> &ForwardSpec;
}

impl<E: Forwarded> Table<E> {
    pub fn new(kind: Kind) -> Table<E> {
        Table {
            inner: Arc::default(),
            kind,
        }
    }

    /// `Err` if `listen` is forwarded already.
    pub fn check_free(&self, listen: SocketAddr) -> Result<(), String> {
        match self.lock().contains_key(&listen) {
            true => Err(format!("{listen} is already a {}", self.kind.label())),
            false => Ok(()),
        }
    }

    /// Adds a started forward (checked again: another may have been added
    /// meanwhile, then this one is dropped, which stops it).
    pub fn insert(&self, entry: E) -> Result<ForwardSpec, String> {
        let spec = entry.spec().clone();
        let mut map = self.lock();
        if map.contains_key(&spec.listen) {
            return Err(format!(
                "{} is already a {}",
                spec.listen,
                self.kind.label()
            ));
        }
        map.insert(spec.listen, entry);
        tracing::info!(forward = %spec, "{} added", self.kind.label());
        Ok(spec)
    }

    /// Stops a forward; `false` if there was none.
    pub fn remove(&self, listen: SocketAddr) -> bool {
        let removed = self.lock().remove(&listen);
        if let Some(entry) = &removed {
            tracing::info!(forward = %entry.spec(), "{} removed", self.kind.label());
        }
        removed.is_some()
    }

    /// Stops every forward.
    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn list(&self) -> Vec<ForwardSpec> {
        self.lock().values().map(|e| e.spec().clone()).collect()
    }

    /// Each entry, as `f` sees it.
    pub fn map<T>(&self, f: impl Fn(&E) -> T) -> Vec<T> {
        self.lock().values().map(f).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SocketAddr, E>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The forwards in force; cheap to clone.
#[derive(Clone)]
pub struct Forwards {
    table: Table<Entry>,
    link: LinkHandle,
}

pub struct Entry {
    spec: ForwardSpec,
    /// Dropping it stops the accept loop, which closes the listener.
    _accept: AbortOnDrop,
}

impl Forwarded for Entry {
    fn spec(&self) -> &ForwardSpec {
        &self.spec
    }
}

impl Forwards {
    pub fn new(link: LinkHandle) -> Forwards {
        Forwards {
            table: Table::new(Kind::Tcp),
            link,
        }
    }

    /// Binds the listener and starts forwarding; returns the spec with the
    /// bound address (a port 0 is replaced by the one chosen).
    pub async fn add(&self, mut spec: ForwardSpec) -> Result<ForwardSpec, String> {
        self.table.check_free(spec.listen)?;
        let listener = TcpListener::bind(spec.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", spec.listen))?;
        spec.listen = listener.local_addr().map_err(|e| e.to_string())?;
        let span = tracing::info_span!("forward", listen = %spec.listen, to = %spec.authority());
        let task =
            tokio::spawn(accept_loop(listener, spec.clone(), self.link.clone()).instrument(span));
        self.table.insert(Entry {
            spec,
            _accept: AbortOnDrop(task.abort_handle()),
        })
    }
}

/// `remove` (which closes the listener), `clear` and `list` are the table's.
impl std::ops::Deref for Forwards {
    type Target = Table<Entry>;
    fn deref(&self) -> &Table<Entry> {
        &self.table
    }
}

async fn accept_loop(listener: TcpListener, spec: ForwardSpec, link: LinkHandle) {
    let target = spec.authority();
    let mut backoff = std::time::Duration::from_millis(5);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => {
                backoff = std::time::Duration::from_millis(5);
                a
            }
            Err(e) => {
                // EMFILE and friends: wait and try again, keep the port.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let span = tracing::info_span!("conn", client = %peer);
        tokio::spawn(tunnel(stream, target.clone(), link.clone()).instrument(span));
    }
}

/// One forwarded connection: a `CONNECT` stream, then bytes both ways. A
/// failure closes the local connection (a raw TCP client has no status to read).
async fn tunnel(local: TcpStream, target: String, link: LinkHandle) {
    let req = match connect_request(&target) {
        Ok(r) => r,
        Err(e) => return tracing::warn!(error = %e, "bad forward target"),
    };
    let resp = match link.send(req).await {
        Ok(r) => r,
        Err(e) => return tracing::warn!(error = %e, "forwarded connection refused"),
    };
    if resp.status() != StatusCode::OK {
        let status = resp.status();
        let reason = crate::link::refusal_reason(resp).await;
        return tracing::warn!(%target, %status, %reason, "the relay refused the tunnel");
    }
    let upgraded = match hyper::upgrade::on(resp).await {
        Ok(u) => u,
        Err(e) => return tracing::warn!(error = %e, "tunnel upgrade failed"),
    };
    let moved = porthole_relay::tunnel::relay_bytes(
        Conn::new(local),
        Conn::new(TokioIo::new(upgraded)),
        crate::proxy::TUNNEL_IDLE,
        &porthole_relay::tunnel::Counts::default(),
    )
    .await;
    tracing::debug!(
        up = moved.up,
        down = moved.down,
        "forwarded connection closed"
    );
}
