//! Dialling internal servers, and the pool of idle keep-alive connections to them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::codec::{BoxIo, Conn};
use crate::error::{ErrorKind, RelayError};

/// Idle upstream connections kept per `host:port`.
const MAX_IDLE_PER_KEY: usize = 64;
/// An idle upstream connection older than this is not reused.
const IDLE_FOR: Duration = Duration::from_secs(60);

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

/// `host:port`, with brackets around IPv6 literals.
pub fn display_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A connection towards an internal server: dialled directly, or a data
/// connection an uplinked relay opened for one session.
pub enum Upstream {
    Tcp(TcpStream),
    Uplink(BoxIo),
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Uplink(s) => Pin::new(s).poll_read(cx, buf),
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
            Upstream::Uplink(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Upstream::Uplink(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Uplink(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

type Idle = Vec<(Conn<Upstream>, Instant)>;

/// Idle keep-alive connections, newest last. A plain mutex: every section is a
/// few pointer moves and never awaits.
#[derive(Default)]
pub struct Pool {
    /// port -> host -> idle connections: looked up by `&str`, no key allocation.
    idle: Mutex<HashMap<u16, HashMap<String, Idle>>>,
}

impl Pool {
    /// An idle connection to `host:port` that is still open, if any.
    pub fn take(&self, host: &str, port: u16) -> Option<Conn<Upstream>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&port)?.get_mut(host)?;
        while let Some((conn, since)) = list.pop() {
            if since.elapsed() < IDLE_FOR && still_open(&conn) {
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection whose last response was read completely.
    pub fn put(&self, host: &str, port: u16, conn: Conn<Upstream>) {
        if !conn.buf.is_empty() {
            return; // the server sent more than the response: not reusable
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let hosts = idle.entry(port).or_default();
        let list = match hosts.get_mut(host) {
            Some(list) => list,
            None => hosts.entry(host.to_string()).or_default(),
        };
        while list
            .first()
            .is_some_and(|(_, since)| since.elapsed() >= IDLE_FOR)
        {
            list.remove(0);
        }
        if list.len() >= MAX_IDLE_PER_KEY {
            list.remove(0);
        }
        list.push((conn, Instant::now()));
    }

    /// Number of idle connections (for tests and the status page).
    pub fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.values().flat_map(HashMap::values).map(Vec::len).sum()
    }
}

/// An idle connection is usable if reading would block: no EOF, no stray bytes.
/// Uplink data connections belong to one session and are never reused.
fn still_open(conn: &Conn<Upstream>) -> bool {
    let Upstream::Tcp(stream) = &conn.io else {
        return false;
    };
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}
