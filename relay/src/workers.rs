//! The connection workers: one thread per CPU core (`relay.workers`), each
//! running its own single-threaded tokio runtime and its own accept loop on
//! the aggregate port.
//!
//! A connection lives on the worker that accepted it, with everything it
//! touches: its request tasks, its timers, and the upstream connections it
//! dials and pools (the pool is kept per worker, [`current`]). No task waits
//! for another thread to poll its socket, and no wake-up crosses threads on
//! the request path, as in nginx's worker processes and HAProxy's threads. The
//! work-stealing runtime the relay used before paid a futex wake-up whenever
//! one worker's reactor had an event for another's task (P2, p99 latency).
//!
//! Each worker has its own listening socket in one `SO_REUSEPORT` group, so
//! the kernel spreads new connections over the workers and wakes only the one
//! it chose. A listener handed in without `SO_REUSEPORT` (an embedding program
//! or a test binding its own) is shared instead: every worker polls a
//! duplicate of it, and whoever accepts first serves the connection.
//!
//! The rest of the relay (admin listener, signals, the uplink's inside role)
//! stays on the runtime that called [`crate::run`]. The redis event store
//! connects on first use, so its connection lives on the runtime that first
//! needed it (often a worker); the others reach it through its handle.

use std::cell::Cell;
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::listener::{self, Admission};
use crate::Shared;

/// The most `relay.workers` may ask for.
pub const MAX_WORKERS: usize = 256;

/// Backlog of each worker's listening socket (nginx uses 511; std's bind 128).
const BACKLOG: u32 = 1024;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// This thread's worker number, from 1; 0 on any thread that is not a worker
/// (the runtime that called [`crate::run`], a test's runtime).
pub fn current() -> usize {
    INDEX.get()
}

/// Makes the calling thread count as worker `i` (unit tests of per-worker
/// behaviour).
#[cfg(test)]
pub fn act_as(i: usize) {
    INDEX.set(i);
}

/// The number of workers `relay.workers = configured` starts: 0 is one per CPU core.
pub fn count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS)),
        n => n,
    }
}

/// The running workers. Dropping this stops them (their connections close).
pub struct Workers {
    /// This relay's claim on the aggregate address, held while it accepts.
    claim: Option<Claim>,
    /// One per worker: its accept loop has ended.
    accepting: Vec<oneshot::Receiver<()>>,
    /// One per worker: its runtime is gone.
    gone: Vec<oneshot::Receiver<()>>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts the relay's workers (`shared.workers`) serving `listener`; their connection tasks join
    /// `tracker`. Each accept loop ends when the relay starts draining;
    /// the connections go on until [`Workers::stop`].
    pub fn start(
        listener: TcpListener,
        claim: Option<Claim>,
        shared: &Arc<Shared>,
        tracker: &TaskTracker,
    ) -> std::io::Result<Workers> {
        let n = shared.workers;
        let addr = listener.local_addr()?;
        let first = listener.into_std()?;
        let mut sockets = Vec::with_capacity(n);
        for _ in 1..n.max(1) {
            sockets.push(another_socket(addr, &first)?);
        }
        sockets.insert(0, first);
        let admission = Arc::new(Admission::new(&shared.config().limits));
        let stop = CancellationToken::new();
        let mut workers = Workers {
            claim,
            accepting: Vec::with_capacity(n),
            gone: Vec::with_capacity(n),
            stop: stop.clone(),
        };
        let (ready_tx, ready) = std::sync::mpsc::channel::<std::io::Result<()>>();
        for (i, socket) in sockets.into_iter().enumerate() {
            let (accepting_tx, accepting) = oneshot::channel();
            let (gone_tx, gone) = oneshot::channel();
            let (shared, tracker, admission, stop, ready_tx) = (
                shared.clone(),
                tracker.clone(),
                admission.clone(),
                stop.clone(),
                ready_tx.clone(),
            );
            std::thread::Builder::new()
                .name(format!("porthole-worker-{}", i + 1))
                .spawn(move || {
                    INDEX.set(i + 1);
                    let started = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .and_then(|runtime| {
                            let entered = runtime.enter();
                            let accept_on = TcpListener::from_std(socket)?;
                            drop(entered);
                            Ok((runtime, accept_on))
                        });
                    let (runtime, accept_on) = match started {
                        Ok(started) => {
                            let _ = ready_tx.send(Ok(()));
                            started
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let serve = async {
                            listener::accept_loop(accept_on, shared, tracker, admission).await;
                            let _ = accepting_tx.send(());
                            // Its connections go on until the drain is over.
                            std::future::pending::<()>().await;
                        };
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = serve => {}
                        }
                    });
                    drop(runtime);
                    let _ = gone_tx.send(());
                })?;
            workers.accepting.push(accepting);
            workers.gone.push(gone);
        }
        // Every worker serving, or none: a worker without its runtime would
        // leave its socket's share of the connections unanswered. (A short
        // blocking wait, once, at start.)
        drop(ready_tx);
        for _ in 0..workers.gone.len() {
            match ready.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("a connection worker cannot start its runtime: {e}"),
                    ))
                }
                Err(_) => return Err(std::io::Error::other("a connection worker ended at start")),
            }
        }
        Ok(workers)
    }

    /// Waits until every accept loop has ended (after [`Shared::start_draining`]).
    pub async fn accepting_ended(&mut self) {
        for ended in &mut self.accepting {
            let _ = ended.await;
        }
        // The port is free for a successor while this relay drains.
        self.claim = None;
    }

    /// Stops the workers: what is still open is closed. Returns when every
    /// worker's runtime is gone.
    pub async fn stop(mut self) {
        self.stop.cancel();
        for gone in std::mem::take(&mut self.gone) {
            let _ = gone.await;
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A further worker's listening socket on `addr`: its own in the
/// `SO_REUSEPORT` group when `first` is in one, else a duplicate of `first`.
fn another_socket(
    addr: SocketAddr,
    first: &std::net::TcpListener,
) -> std::io::Result<std::net::TcpListener> {
    group_socket(addr)
        .and_then(TcpListener::into_std)
        .or_else(|_| first.try_clone())
}

/// Binds the aggregate port as the first socket of the workers'
/// `SO_REUSEPORT` group. A port that another program holds fails with
/// "address in use", as it would without the option, even when that program
/// is another relay with its own group: a plain bind is tried first, so a
/// second relay started on the same port by mistake does not silently take
/// half of the first one's connections. (Only processes of the same user can
/// join a group.)
pub fn bind_aggregate(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let addr = std::net::TcpListener::bind(addr)?.local_addr()?;
    group_socket(addr)
}

/// The abstract Unix socket name a relay holds while it accepts on `addr`.
pub fn claim_name(addr: SocketAddr) -> String {
    format!("porthole-relay {addr}")
}

/// This relay's hold on its aggregate address (see [`claim`]); released when dropped.
pub struct Claim {
    _name: UnixListener,
}

/// Claims `addr` for this relay by binding [`claim_name`] in Linux's
/// abstract socket namespace (per network namespace, as ports are; the kernel
/// releases it when the relay exits). Taken before the port is bound, this
/// closes the window that the plain bind in [`bind_aggregate`] leaves: two
/// relays started in the same instant can both pass that bind and join one
/// `SO_REUSEPORT` group, but only one can hold the claim, and the other stops
/// with "address in use" before it binds.
///
/// Abstract names have no permissions, so a name held by a process of
/// another user (who could not join this user's `SO_REUSEPORT` group
/// anyway) does not stop the relay: it warns and goes on without a claim, as
/// it does where Unix sockets cannot be made at all.
pub fn claim(addr: SocketAddr) -> std::io::Result<Option<Claim>> {
    use std::os::linux::net::SocketAddrExt;
    let name = claim_name(addr);
    let abstract_addr = match std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, %addr, "cannot claim the aggregate address; relying on the bind check alone");
            return Ok(None);
        }
    };
    let e = match UnixListener::bind_addr(&abstract_addr) {
        Ok(name) => return Ok(Some(Claim { _name: name })),
        Err(e) => e,
    };
    if e.kind() != std::io::ErrorKind::AddrInUse {
        tracing::warn!(error = %e, %addr, "cannot claim the aggregate address; relying on the bind check alone");
        return Ok(None);
    }
    let holder = holder_uid(&abstract_addr);
    if holder == Some(nix::unistd::geteuid().as_raw()) {
        return Err(std::io::Error::new(
            e.kind(),
            format!("relay.listen {addr}: address in use by another porthole-relay (it holds \"@{name}\")"),
        ));
    }
    tracing::warn!(%addr, holder_uid = ?holder, claim = %name, "the claim on the aggregate address is held by a process of another user; going on without it");
    Ok(None)
}

/// The user of the process listening on the abstract socket `addr`, if it can be told.
fn holder_uid(addr: &std::os::unix::net::SocketAddr) -> Option<u32> {
    let stream = std::os::unix::net::UnixStream::connect_addr(addr).ok()?;
    let cred =
        nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    Some(cred.uid())
}

/// A listening socket on `addr` in its `SO_REUSEPORT` group.
fn group_socket(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unused_addr() -> SocketAddr {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    }

    #[test]
    fn a_claim_held_by_this_user_refuses_and_is_released_on_drop() {
        let addr = unused_addr();
        let first = claim(addr).unwrap().expect("the first claim");
        let err = claim(addr).err().expect("a second claim by the same user");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        assert_eq!(
            err.to_string(),
            format!("relay.listen {addr}: address in use by another porthole-relay (it holds \"@porthole-relay {addr}\")")
        );
        drop(first);
        assert!(claim(addr).unwrap().is_some(), "released with the first");
    }
}
