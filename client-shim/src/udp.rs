//! Forwarded UDP ports (`forward_udp`): a local UDP socket per forward. Each
//! local source address (`ADDR:PORT` of the application's socket) is one
//! flow, and each flow is one CONNECT-UDP stream (RFC 9298) over the link:
//! an extended `CONNECT` with `:protocol connect-udp` for the relay's
//! `/.well-known/masque/udp/HOST/PORT/` (`:scheme https` over a TLS link,
//! `http` over h2c: the relay is the template's origin), opened on the
//! source's first datagram. The source's datagrams go up as `DATAGRAM`
//! capsules (context 0); capsules coming back are sent to that source from
//! the forward's socket, so the application sees its answers come from the
//! address it wrote to.
//!
//! Datagrams that arrive while the stream is being opened wait in the
//! flow's queue ([`QUEUE`] of them; more are dropped, with a debug line). A
//! flow ends after `udp_idle` without a datagram either way, or when the
//! relay ends the stream; the source's next datagram opens a new one. A
//! refusal (the relay's `403`, `502`, `501`, or no link) is logged with the
//! relay's reason and ends the flow after [`REFUSED_PAUSE`], dropping what
//! arrived meanwhile: a source that keeps sending retries once per pause,
//! not in a loop. The forward's `last_error` ([`UdpForwardState`]) keeps
//! the latest refusal or failure until a flow opens again.
//!
//! UDP forwards are added and removed while the shim runs, like TCP ones
//! (the control endpoint, [`crate::control`]). Removing one closes its
//! socket and ends its flows at once: a flow carrying datagrams ends its
//! stream, one waiting for the link or paused after a refusal just stops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{header::HeaderName, HeaderValue, Method, Request};
use hyper_util::rt::TokioIo;
use porthole_relay::udp::{capsule, datagram_capsule, Capsule, PATH_PREFIX, PROTOCOL};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::config::ForwardSpec;
use crate::forward::{Forwarded, Kind, Table};
use crate::link::{empty, LinkHandle};

/// Datagrams a flow holds while its stream is being opened (or written).
pub const QUEUE: usize = 64;
/// After a refusal, the flow stays (dropping datagrams) this long before
/// the source's next datagram may try again.
pub const REFUSED_PAUSE: Duration = Duration::from_secs(1);
/// The most flows (local sources, each a CONNECT-UDP stream) a forward
/// keeps open; datagrams from further sources are dropped, with a warning.
pub const MAX_FLOWS: usize = 256;
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// The UDP forwards in force; cheap to clone.
#[derive(Clone)]
pub struct UdpForwards {
    table: Table<Entry>,
    link: LinkHandle,
    idle: Duration,
}

pub struct Entry {
    spec: ForwardSpec,
    status: Arc<Status>,
    /// Dropping it (removing the forward) stops the receive loop and ends
    /// every flow: an open stream with its end (`END_STREAM`), one being
    /// opened or paused after a refusal at once. The socket closes with
    /// the last of them.
    _stop: DropGuard,
}

impl Forwarded for Entry {
    fn spec(&self) -> &ForwardSpec {
        &self.spec
    }
}

/// What a forward's tasks report.
#[derive(Default)]
struct Status {
    flows: AtomicUsize,
    last_error: Mutex<Option<String>>,
}

/// A UDP forward as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpForwardState {
    pub spec: ForwardSpec,
    /// Flows (local sources) open now.
    pub flows: usize,
    /// The last refusal or failure of a flow, with the relay's reason;
    /// `None` again once a flow opens (the target is reachable now).
    pub last_error: Option<String>,
}

impl UdpForwards {
    /// Forwards whose flows end after `idle` without a datagram.
    pub fn new(link: LinkHandle, idle: Duration) -> UdpForwards {
        UdpForwards {
            table: Table::new(Kind::Udp),
            link,
            idle,
        }
    }

    /// Binds the local UDP socket and starts forwarding; returns the spec
    /// with the bound address (a port 0 is replaced by the one chosen).
    pub async fn add(&self, mut spec: ForwardSpec) -> Result<ForwardSpec, String> {
        self.table.check_free(spec.listen)?;
        let socket = UdpSocket::bind(spec.listen)
            .await
            .map_err(|e| format!("cannot bind UDP {}: {e}", spec.listen))?;
        spec.listen = socket
            .local_addr()
            .map_err(|e| format!("UDP {}: {e}", spec.listen))?;
        let status = Arc::new(Status::default());
        let stop = CancellationToken::new();
        let forward = Forward {
            socket: Arc::new(socket),
            spec: spec.clone(),
            link: self.link.clone(),
            idle: self.idle,
            status: status.clone(),
            stop: stop.clone(),
        };
        let span =
            tracing::info_span!("udp_forward", listen = %spec.listen, to = %spec.authority());
        tokio::spawn(forward.serve().instrument(span));
        self.table.insert(Entry {
            spec,
            status,
            _stop: stop.drop_guard(),
        })
    }

    /// Each forward with its open flows and last error.
    pub fn states(&self) -> Vec<UdpForwardState> {
        self.table.map(|e| UdpForwardState {
            spec: e.spec.clone(),
            flows: e.status.flows.load(Relaxed),
            last_error: e
                .status
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        })
    }
}

/// `remove`, `clear` and `list` are the table's.
impl std::ops::Deref for UdpForwards {
    type Target = Table<Entry>;
    fn deref(&self) -> &Table<Entry> {
        &self.table
    }
}

/// One forward's receive loop and what its flows share.
#[derive(Clone)]
struct Forward {
    socket: Arc<UdpSocket>,
    spec: ForwardSpec,
    link: LinkHandle,
    idle: Duration,
    status: Arc<Status>,
    /// Cancelled when the forward is removed.
    stop: CancellationToken,
}

/// A flow as the receive loop sees it: its queue.
struct FlowQueue {
    id: u64,
    queue: mpsc::Sender<Bytes>,
    /// Datagrams dropped because the queue was full.
    dropped: u64,
}

impl Forward {
    /// Receives datagrams and hands each to its source's flow, opening one
    /// for a source without a flow.
    async fn serve(self) {
        let mut flows: HashMap<SocketAddr, FlowQueue> = HashMap::new();
        let (ended_tx, mut ended) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
        let mut next_id = 0u64;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut backoff = Duration::from_millis(5);
        let mut refused_sources = 0u64;
        loop {
            let (n, source) = tokio::select! {
                () = self.stop.cancelled() => return,
                Some((source, id)) = ended.recv() => {
                    // Only the flow that ended: a newer one may have its place.
                    if flows.get(&source).is_some_and(|f| f.id == id) {
                        flows.remove(&source);
                        self.status.flows.store(flows.len(), Relaxed);
                    }
                    continue;
                }
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok(r) => {
                        backoff = Duration::from_millis(5);
                        r
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "UDP receive failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            // Each flow is a stream on the link and a session on the relay:
            // a new source past the cap waits until a flow ends.
            if !flows.contains_key(&source) && flows.len() >= MAX_FLOWS {
                refused_sources += 1;
                if refused_sources.is_power_of_two() {
                    tracing::warn!(
                        %source,
                        refused = refused_sources,
                        "UDP forward has {MAX_FLOWS} flows open; datagram from a new source dropped"
                    );
                }
                continue;
            }
            let mut payload = Bytes::copy_from_slice(&buf[..n]);
            loop {
                let flow = flows.entry(source).or_insert_with(|| {
                    next_id += 1;
                    self.open(source, next_id, ended_tx.clone())
                });
                match flow.queue.try_send(payload) {
                    Ok(()) => break,
                    Err(TrySendError::Full(_)) => {
                        flow.dropped += 1;
                        tracing::debug!(
                            %source,
                            dropped = flow.dropped,
                            "UDP flow queue full ({QUEUE}); datagram dropped"
                        );
                        break;
                    }
                    // The flow ended and its notice is still on its way:
                    // the datagram opens the next one.
                    Err(TrySendError::Closed(back)) => {
                        payload = back;
                        flows.remove(&source);
                    }
                }
            }
            self.status.flows.store(flows.len(), Relaxed);
        }
    }

    /// Starts the flow task for `source`.
    fn open(
        &self,
        source: SocketAddr,
        id: u64,
        ended: mpsc::UnboundedSender<(SocketAddr, u64)>,
    ) -> FlowQueue {
        let (queue, datagrams) = mpsc::channel(QUEUE);
        let flow = self.clone();
        let span = tracing::info_span!("udp_flow", %source);
        tokio::spawn(
            async move {
                flow.flow(source, datagrams).await;
                let _ = ended.send((source, id));
            }
            .instrument(span),
        );
        FlowQueue {
            id,
            queue,
            dropped: 0,
        }
    }

    /// One flow, from opening its stream to its end.
    async fn flow(&self, source: SocketAddr, mut datagrams: mpsc::Receiver<Bytes>) {
        let opened = tokio::select! {
            opened = self.connect_udp() => opened,
            () = self.stop.cancelled() => return,
        };
        let stream = match opened {
            Ok(stream) => stream,
            Err(why) => {
                tracing::warn!(
                    forward = %self.spec,
                    error = %why,
                    retry_after = ?REFUSED_PAUSE,
                    "UDP flow not opened"
                );
                self.set_error(Some(why));
                tokio::select! {
                    () = tokio::time::sleep(REFUSED_PAUSE) => {}
                    () = self.stop.cancelled() => {}
                }
                datagrams.close();
                let mut dropped = 0u64;
                while datagrams.try_recv().is_ok() {
                    dropped += 1;
                }
                if dropped > 0 {
                    tracing::debug!(dropped, "datagrams of the refused UDP flow dropped");
                }
                return;
            }
        };
        tracing::debug!(forward = %self.spec, "UDP flow opened");
        // The target is reachable again: an earlier refusal no longer holds.
        self.set_error(None);
        let (end, up, down) = self.carry(stream, source, &mut datagrams).await;
        match end {
            Ok(why) => tracing::debug!(up, down, "UDP flow ended: {why}"),
            Err(why) => {
                tracing::warn!(forward = %self.spec, up, down, error = %why, "UDP flow failed");
                self.set_error(Some(why));
            }
        }
    }

    /// Opens the CONNECT-UDP stream; `Err` is why not, with the relay's reason.
    async fn connect_udp(&self) -> Result<hyper::upgrade::Upgraded, String> {
        let req = udp_request(
            self.link.scheme(),
            self.link.relay_name(),
            &self.spec.host,
            self.spec.port,
        )
        .map_err(|e| format!("CONNECT-UDP to {}: {e}", self.spec.authority()))?;
        let resp = self
            .link
            .send(req)
            .await
            .map_err(|e| format!("CONNECT-UDP to {}: {e}", self.spec.authority()))?;
        let status = resp.status();
        if !status.is_success() {
            let reason = crate::link::refusal_reason(resp).await;
            return Err(format!(
                "the relay refused CONNECT-UDP to {}: {status} {reason}",
                self.spec.authority()
            ));
        }
        hyper::upgrade::on(resp)
            .await
            .map_err(|e| format!("CONNECT-UDP to {}: {e}", self.spec.authority()))
    }

    /// Carries datagrams until the flow idles, the relay ends the stream or
    /// the forward goes; returns how it ended and the datagrams each way.
    async fn carry(
        &self,
        stream: hyper::upgrade::Upgraded,
        source: SocketAddr,
        datagrams: &mut mpsc::Receiver<Bytes>,
    ) -> (Result<&'static str, String>, u64, u64) {
        let (mut rd, mut wr) = tokio::io::split(TokioIo::new(stream));
        // Shared by the three futures below (a task must be `Send`, so no `Cell`).
        let last = Mutex::new(Instant::now());
        let touch = || *last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let deadline = || *last.lock().unwrap_or_else(|p| p.into_inner()) + self.idle;
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let target = self.spec.authority();
        let upward = async {
            while let Some(payload) = datagrams.recv().await {
                touch();
                wr.write_all(&datagram_capsule(&payload))
                    .await
                    .map_err(|e| format!("CONNECT-UDP stream to {target}: {e}"))?;
                up.fetch_add(1, Relaxed);
            }
            // The receive loop, which holds the queue, has ended.
            Ok("the forward was removed")
        };
        let downward = async {
            let mut buf = BytesMut::with_capacity(16 * 1024);
            loop {
                // Every whole capsule read so far goes to the source.
                loop {
                    let used = match capsule(&buf) {
                        Capsule::Partial => break,
                        Capsule::Bad => {
                            return Err(format!(
                                "CONNECT-UDP stream to {target}: a capsule too long or unreadable"
                            ))
                        }
                        Capsule::Other(used) => used,
                        Capsule::Datagram(payload, used) => {
                            // Lost like any UDP datagram if the socket cannot send it.
                            if let Err(e) = self.socket.send_to(payload, source).await {
                                tracing::debug!(error = %e, "UDP datagram to the source not sent");
                            }
                            touch();
                            down.fetch_add(1, Relaxed);
                            used
                        }
                    };
                    buf.advance(used);
                }
                buf.reserve(16 * 1024);
                let n = rd
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| format!("CONNECT-UDP stream to {target}: {e}"))?;
                if n == 0 {
                    return Ok("the relay ended the stream");
                }
            }
        };
        let idle = async {
            loop {
                tokio::time::sleep_until(deadline()).await;
                if Instant::now() >= deadline() {
                    return;
                }
            }
        };
        let end = tokio::select! {
            end = upward => end,
            end = downward => end,
            () = idle => Ok("idle"),
            () = self.stop.cancelled() => Ok("the forward was removed"),
        };
        // A clean end of the stream (END_STREAM) for the relay, if it still listens.
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
        (end, up.into_inner(), down.into_inner())
    }

    fn set_error(&self, why: Option<String>) {
        *self
            .status
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = why;
    }
}

/// The extended `CONNECT` for a CONNECT-UDP stream to `host:port`, for the
/// relay named `relay_name` (RFC 9298's default template; an IPv6 literal's
/// colons percent-encoded). `scheme` is the template's, [`LinkHandle::scheme`]:
/// `https` over a TLS link (RFC 9298 3.4, RFC 9220).
pub fn udp_request(
    scheme: &str,
    relay_name: &str,
    host: &str,
    port: u16,
) -> Result<Request<porthole_relay::h2::Body>, http::Error> {
    let host = host.replace(':', "%3A");
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .version(http::Version::HTTP_2)
        .uri(format!(
            "{scheme}://{relay_name}{PATH_PREFIX}{host}/{port}/"
        ))
        .header(
            HeaderName::from_static("capsule-protocol"),
            HeaderValue::from_static("?1"),
        )
        .body(empty())?;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static(PROTOCOL));
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_follow_the_default_template() {
        let req = udp_request("http", "relay.corp", "dns.corp", 53).unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(
            req.uri().to_string(),
            "http://relay.corp/.well-known/masque/udp/dns.corp/53/"
        );
        assert_eq!(req.headers()["capsule-protocol"], "?1");
        assert_eq!(
            req.extensions()
                .get::<hyper::ext::Protocol>()
                .map(|p| p.as_str()),
            Some("connect-udp")
        );
        // The relay reads back what the shim writes.
        let v6 = udp_request("http", "relay.corp:8080", "2001:db8::1", 5353).unwrap();
        assert_eq!(
            porthole_relay::udp::target(v6.uri().path()),
            Some(("2001:db8::1".to_string(), 5353))
        );
    }

    #[test]
    fn the_scheme_is_https_over_a_tls_link_and_http_over_cleartext() {
        for (tls, want) in [
            (
                true,
                "https://relay.corp/.well-known/masque/udp/dns.corp/53/",
            ),
            (
                false,
                "http://relay.corp/.well-known/masque/udp/dns.corp/53/",
            ),
        ] {
            let req = udp_request(crate::link::scheme(tls), "relay.corp", "dns.corp", 53).unwrap();
            assert_eq!(req.uri().to_string(), want, "tls={tls}");
        }
    }
}
