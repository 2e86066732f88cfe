//! Test and benchmark support for Porthole: real servers on ephemeral
//! 127.0.0.1 ports, the relay under test (in process or as the built binary),
//! and the real `curl`. Nothing here sleeps blindly: readiness is "the port
//! accepts connections".
//!
//! - [`Origin`]: an internal HTTP/1.1 server that records every request it
//!   receives (raw head, fields, body, trailers) and answers with a [`Reply`];
//! - [`EchoServer`]: a TCP server for tunnels: echoes, and reports half-closes;
//! - [`UdpEcho`]: a UDP server that answers `echo:` + each datagram, and
//!   records the addresses it heard from;
//! - [`Relay`]: the relay started through `porthole_relay::run`;
//! - [`RelayProcess`]: the `porthole-relay` binary with a config file;
//! - [`Curl`]: one run of the real `curl` binary;
//! - [`LinkProxy`]: a TCP proxy that counts connections and can blackhole them.
//! - [`RedisServer`]: a private `redis-server` on a free port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use porthole_relay::codec::{self, BodyReader, Conn, FieldName, Framing, Item};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

// ---------------------------------------------------------------- origin

/// One request as the internal server received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The head exactly as it arrived (request line and fields, with CRLFs).
    pub raw_head: String,
    pub method: String,
    pub target: String,
    /// HTTP/1.x minor version.
    pub minor: u8,
    /// Fields in arrival order, names as written.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Raw trailer lines, if the body was chunked and had any.
    pub trailers: String,
    /// Which accepted connection carried it (0, 1, ...).
    pub conn: usize,
}

impl Received {
    /// Every value of a field (case-insensitive name).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    /// The first value of a field.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }
}

/// What the origin answers.
pub enum Reply {
    /// Write these bytes (a whole response, framed by the test) and keep the connection.
    Raw(Vec<u8>),
    /// Write these bytes and close the connection (close-delimited bodies).
    RawThenClose(Vec<u8>),
    /// Never answer (and keep the connection open).
    Silent,
    /// `200` with a `Content-Length` body of `len` bytes generated on the fly.
    Generated { len: u64 },
    /// `101 Switching Protocols`, then echo every byte back.
    UpgradeEcho,
}

type Handler = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// An internal HTTP/1.1 server on 127.0.0.1 that records what it receives.
pub struct Origin {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl Origin {
    /// Answers every request with `200` and body `ok <target>`.
    pub async fn ok() -> Origin {
        Origin::start(|r| {
            let body = format!("ok {}", r.target);
            Reply::Raw(response(
                200,
                &[("Content-Type", "text/plain")],
                body.as_bytes(),
            ))
        })
        .await
    }

    /// Starts a server whose answers come from `handler`.
    pub async fn start(handler: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let handler: Handler = Arc::new(handler);
        let (stop, mut stopped) = oneshot::channel::<()>();
        let (rec, count) = (received.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = &mut stopped => return,
                    a = listener.accept() => a,
                };
                let Ok((stream, _)) = accepted else { continue };
                let id = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_origin(stream, id, handler.clone(), rec.clone()));
            }
        });
        Origin {
            addr,
            received,
            connections,
            _stop: stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("origin lock").clone()
    }

    /// The only request received; panics if there is not exactly one.
    pub fn single(&self) -> Received {
        let all = self.received();
        assert_eq!(all.len(), 1, "expected exactly one request, got {all:#?}");
        all.into_iter().next().expect("one request")
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Builds a response with `Content-Length`.
pub fn response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} X\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

async fn serve_origin(
    stream: TcpStream,
    id: usize,
    handler: Handler,
    rec: Arc<Mutex<Vec<Received>>>,
) {
    let mut conn = Conn::new(stream);
    loop {
        let Ok(head) = codec::read_request_head(&mut conn, 1 << 20, 200).await else {
            return;
        };
        let raw_head = String::from_utf8_lossy(&head_bytes(&head)).into_owned();
        let headers: Vec<(String, String)> = head
            .fields
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        let framing = codec::request_framing(&head).unwrap_or(Framing::Empty);
        let expects =
            framing != Framing::Empty && head.fields.has_token(FieldName::Expect, "100-continue");
        if expects
            && conn
                .io
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        let mut body = Vec::new();
        let mut trailers = String::new();
        let mut reader = BodyReader::new(framing);
        loop {
            match reader.next(&mut conn).await {
                Ok(Item::Data(d)) => body.extend_from_slice(&d),
                Ok(Item::Trailers(t)) => trailers = String::from_utf8_lossy(&t).into_owned(),
                Ok(Item::End) => break,
                Err(_) => return,
            }
        }
        let received = Received {
            raw_head,
            method: head.method().to_string(),
            target: head.target().to_string(),
            minor: head.minor,
            headers,
            body,
            trailers,
            conn: id,
        };
        let reply = handler(&received);
        rec.lock().expect("origin lock").push(received);
        match reply {
            Reply::Raw(mut bytes) => {
                if head.method() == "HEAD" {
                    // A HEAD response has no body, whatever its Content-Length says.
                    if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                        bytes.truncate(end + 4);
                    }
                }
                if conn.io.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Reply::RawThenClose(bytes) => {
                let _ = conn.io.write_all(&bytes).await;
                let _ = conn.io.shutdown().await;
                return;
            }
            Reply::Silent => {
                let _ = conn.io.read(&mut [0u8; 1]).await;
                return;
            }
            Reply::Generated { len } => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                if conn.io.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let block = vec![b'x'; 256 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    if conn.io.write_all(&block[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            }
            Reply::UpgradeEcho => {
                // RFC 6455's answer to the key, and the first subprotocol offered.
                let mut fields = String::new();
                if let Some(key) = head.fields.get_other("sec-websocket-key") {
                    let accept = porthole_relay::h2::websocket_accept(key);
                    fields.push_str(&format!("Sec-WebSocket-Accept: {accept}\r\n"));
                }
                if let Some(offered) = head.fields.get_other("sec-websocket-protocol") {
                    let first = String::from_utf8_lossy(offered);
                    let first = first.split(',').next().unwrap_or("").trim();
                    fields.push_str(&format!("Sec-WebSocket-Protocol: {first}\r\n"));
                }
                let head = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{fields}\r\n");
                if conn.io.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let leftover = conn.buf.split().freeze();
                if conn.io.write_all(&leftover).await.is_err() {
                    return;
                }
                let (mut r, mut w) = conn.io.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                return;
            }
        }
    }
}

fn head_bytes(head: &codec::RequestHead) -> Vec<u8> {
    // Rebuild the raw head from the parsed parts, exactly as they arrived.
    let mut out = format!(
        "{} {} HTTP/1.{}\r\n",
        head.method(),
        head.target(),
        head.minor
    )
    .into_bytes();
    for (n, v) in head.fields.iter() {
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

// ---------------------------------------------------------------- echo

/// A TCP server for tunnel tests: echoes what it reads; on the client's
/// half-close it writes `bye\n`, closes, and counts the half-close.
pub struct EchoServer {
    pub addr: SocketAddr,
    half_closes: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl EchoServer {
    pub async fn start() -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        let half_closes = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let hc = half_closes.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = &mut stopped => return,
                    a = listener.accept() => a,
                };
                let Ok((mut s, _)) = accepted else { continue };
                let hc = hc.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => {
                                hc.fetch_add(1, Ordering::SeqCst);
                                let _ = s.write_all(b"bye\n").await;
                                let _ = s.shutdown().await;
                                return;
                            }
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        EchoServer {
            addr,
            half_closes,
            _stop: stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn half_closes(&self) -> usize {
        self.half_closes.load(Ordering::SeqCst)
    }
}

/// A UDP server on 127.0.0.1: answers each datagram with `echo:` and the
/// datagram, to its sender, and records each distinct sender.
pub struct UdpEcho {
    pub addr: SocketAddr,
    senders: Arc<Mutex<Vec<SocketAddr>>>,
    _stop: oneshot::Sender<()>,
}

impl UdpEcho {
    pub async fn start() -> UdpEcho {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind UDP echo");
        let addr = socket.local_addr().expect("UDP echo addr");
        let senders = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let seen = senders.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            loop {
                let received = tokio::select! {
                    _ = &mut stopped => return,
                    r = socket.recv_from(&mut buf) => r,
                };
                let Ok((n, from)) = received else { continue };
                {
                    let mut seen = seen.lock().expect("UDP echo lock");
                    if !seen.contains(&from) {
                        seen.push(from);
                    }
                }
                let mut out = b"echo:".to_vec();
                out.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&out, from).await;
            }
        });
        UdpEcho {
            addr,
            senders,
            _stop: stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The distinct addresses datagrams came from, in order of first arrival.
    pub fn senders(&self) -> Vec<SocketAddr> {
        self.senders.lock().expect("UDP echo lock").clone()
    }
}

// ---------------------------------------------------------------- relay

/// The relay under test, started in process through `porthole_relay::run`
/// on an ephemeral port. Stops when dropped.
pub struct Relay {
    pub addr: SocketAddr,
    /// The admin listener (health, metrics, publishing).
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay from TOML text; both listeners are bound on 127.0.0.1:0.
    pub async fn start(toml_text: &str) -> Relay {
        let config = porthole_relay::Config::from_toml(toml_text).expect("test config is valid");
        Relay::start_config(config).await
    }

    pub async fn start_config(config: porthole_relay::Config) -> Relay {
        let aggregate = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        Relay::start_on(config, aggregate).await
    }

    /// Starts a relay from TOML text on `addr` as soon as that address is
    /// free (a predecessor releases it when its drain begins); waits up to 5 s.
    pub async fn start_at(toml_text: &str, addr: SocketAddr) -> Relay {
        let config = porthole_relay::Config::from_toml(toml_text).expect("test config is valid");
        let start = Instant::now();
        let aggregate = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(5),
                        "{addr} still taken: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        Relay::start_on(config, aggregate).await
    }

    /// Starts a relay on a listener the test bound (to know its port first).
    pub async fn start_on(config: porthole_relay::Config, aggregate: TcpListener) -> Relay {
        init_tracing();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let addr = aggregate.local_addr().expect("relay addr");
        let admin = admin_listener.local_addr().expect("admin addr");
        let listeners = porthole_relay::Listeners {
            aggregate,
            admin: Some(admin_listener),
            claim: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let _ = porthole_relay::run(listeners, config, async {
                let _ = stopped.await;
            })
            .await;
        });
        Relay {
            addr,
            admin,
            stop: Some(stop),
            done: Some(done),
        }
    }

    /// `http://127.0.0.1:PORT` of the admin listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// `http://127.0.0.1:PORT`, for `curl -x`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts draining (as SIGTERM does) and waits until the relay has stopped.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Logs of in-process relays go to the test output (shown for failing tests).
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    });
}

/// A route table entry for test configs.
pub fn route(host: &str, to: &str, ports: &[u16], extra: &str) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "[[route]]\nhost = \"{host}\"\nto = \"{to}\"\nports = [{}]\n{extra}\n",
        ports.join(", ")
    )
}

/// A relay config with name `relay.test` and the given routes.
pub fn config_with(routes: &str, extra: &str) -> String {
    format!("[relay]\nlisten = \"127.0.0.1:0\"\nname = \"relay.test\"\ndrain_timeout = \"5s\"\n{extra}\n{routes}")
}

// ---------------------------------------------------------------- binary

/// Path of a binary built by this workspace (`cargo build` puts it beside the test binary).
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test binary path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The workspace root (where `conf/` is).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A port that was free a moment ago.
/// Never the same port twice in one test process: tests run in parallel, and
/// two of them handed the same just-freed port would start their servers on
/// one address (the second bind fails and its test talks to the first).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut given = GIVEN.lock().expect("free_port lock");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Starts the relay binary with `config` on `listen`, where it must refuse
/// to start: waits for it to exit (10 s at most), checks it failed, and
/// returns its log.
pub async fn start_refused(config: &Path, listen: SocketAddr) -> String {
    let admin = format!("127.0.0.1:{}", free_port());
    let run = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(binary("porthole-relay"))
            .arg("--config")
            .arg(config)
            .env("PORTHOLE__RELAY__LISTEN", listen.to_string())
            .env("PORTHOLE__RELAY__ADMIN_LISTEN", &admin)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the relay did not exit")
    .unwrap();
    let log = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(!run.status.success(), "{log}");
    log
}

/// Waits until `addr` accepts connections (or panics after `limit`).
pub async fn wait_for_port(addr: SocketAddr, limit: Duration) {
    let start = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            start.elapsed() < limit,
            "{addr} did not start listening within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `porthole-relay` binary running with a config file. Killed on drop.
pub struct RelayProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl RelayProcess {
    /// Runs `porthole-relay --config FILE` with `env` added; the aggregate and
    /// admin ports are chosen free and passed as `PORTHOLE__RELAY__LISTEN` and
    /// `PORTHOLE__RELAY__ADMIN_LISTEN`.
    pub async fn spawn(config: &Path, env: &[(&str, &str)]) -> RelayProcess {
        RelayProcess::spawn_with_args(config, env, &[]).await
    }

    /// As [`RelayProcess::spawn`], with extra command-line arguments.
    pub async fn spawn_with_args(
        config: &Path,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> RelayProcess {
        // A port free a moment ago can be taken before the relay binds it (by
        // another test's ephemeral connection): then the relay exits, and
        // this tries again on other ports rather than talking to whatever
        // listens there.
        let mut last = String::new();
        for _ in 0..5 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            match RelayProcess::try_spawn_on(config, addr, admin, env, args).await {
                Ok(relay) => return relay,
                Err(log) => last = log,
            }
        }
        panic!("porthole-relay did not start in 5 tries; its last log:\n{last}");
    }

    /// As [`RelayProcess::spawn_with_args`], on the given ports: a relay
    /// started again where its clients expect it. The log file starts afresh.
    pub async fn spawn_on(
        config: &Path,
        addr: SocketAddr,
        admin: SocketAddr,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> RelayProcess {
        match RelayProcess::try_spawn_on(config, addr, admin, env, args).await {
            Ok(relay) => relay,
            Err(log) => panic!("porthole-relay did not start on {addr}; its log:\n{log}"),
        }
    }

    /// Starts the relay and waits for its `listening` line and its ports; its
    /// log if it exits first (a port taken meanwhile, a bad configuration).
    async fn try_spawn_on(
        config: &Path,
        addr: SocketAddr,
        admin: SocketAddr,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Result<RelayProcess, String> {
        // One file per start: a successor on the same port keeps its own.
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let start = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!(
            "porthole-relay-{}-{}-{start}.log",
            addr.port(),
            std::process::id()
        ));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = tokio::process::Command::new(binary("porthole-relay"));
        cmd.arg("--config")
            .arg(config)
            .args(args)
            .env("PORTHOLE__RELAY__LISTEN", addr.to_string())
            .env("PORTHOLE__RELAY__ADMIN_LISTEN", admin.to_string())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn porthole-relay");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("listening") {
                break;
            }
            if child.try_wait().ok().flatten().is_some() || std::time::Instant::now() > deadline {
                return Err(text);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        wait_for_port(addr, Duration::from_secs(10)).await;
        wait_for_port(admin, Duration::from_secs(10)).await;
        Ok(RelayProcess {
            addr,
            admin,
            child,
            log,
        })
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("relay still running")
    }

    /// The relay's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`"TERM"`, `"HUP"`, ...) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Peak resident memory (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// Current resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------- redis

/// A `redis-server` of the test's own on a free 127.0.0.1 port, with no
/// persistence; killed on drop.
pub struct RedisServer {
    pub addr: SocketAddr,
    child: tokio::process::Child,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        RedisServer::start_on(free_port()).await
    }

    /// A redis-server on `port` (a relay already points at it).
    pub async fn start_on(port: u16) -> RedisServer {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        wait_for_port(addr, Duration::from_secs(10)).await;
        RedisServer { addr, child }
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Sends a signal with kill(1): `"STOP"` pauses the server (its
    /// connections stay open, nothing is answered), `"CONT"` resumes it.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("redis-server still running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -{sig} {pid} failed");
    }
}

// ---------------------------------------------------------------- curl

/// What one curl run produced.
#[derive(Debug)]
pub struct CurlOutput {
    /// `%{http_code}`: the last response's status (0 if none).
    pub status: u16,
    /// The response head(s) as `-D` wrote them.
    pub head: String,
    pub body: Vec<u8>,
    pub stderr: String,
    /// curl's exit code.
    pub exit: i32,
    /// `%{size_download}`: body bytes received (also when the body was discarded).
    pub size_download: u64,
}

impl CurlOutput {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Every value of a response field in the last head (case-insensitive).
    pub fn header(&self, name: &str) -> Vec<String> {
        // -D also records interim heads and trailers: take the last status head.
        let last = self
            .head
            .split("\r\n\r\n")
            .filter(|h| h.starts_with("HTTP/"))
            .last()
            .unwrap_or("");
        last.lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }
}

/// One run of the real `curl` binary: `-sS --max-time`, no proxy from the
/// environment, status via `-w`. Killed if the test drops it.
pub struct Curl {
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
    max_time: u64,
    discard: bool,
}

static CURL_SEQ: AtomicUsize = AtomicUsize::new(0);

impl Curl {
    pub fn new(url: &str) -> Curl {
        Curl {
            args: vec![url.to_string()],
            stdin: None,
            max_time: 20,
            discard: false,
        }
    }

    /// `-x PROXY`.
    pub fn proxy(self, proxy: &str) -> Curl {
        self.args(&["-x", proxy])
    }

    pub fn arg(mut self, a: &str) -> Curl {
        self.args.push(a.to_string());
        self
    }

    pub fn args(mut self, a: &[&str]) -> Curl {
        self.args.extend(a.iter().map(|s| s.to_string()));
        self
    }

    pub fn header(self, h: &str) -> Curl {
        self.args(&["-H", h])
    }

    pub fn max_time(mut self, secs: u64) -> Curl {
        self.max_time = secs;
        self
    }

    /// Sends the body to /dev/null (large downloads); `size_download` still counts it.
    pub fn discard_body(mut self) -> Curl {
        self.discard = true;
        self
    }

    /// Data for `--data-binary @-`.
    pub fn stdin(mut self, data: Vec<u8>) -> Curl {
        self.stdin = Some(data);
        self
    }

    pub async fn run(self) -> CurlOutput {
        let seq = CURL_SEQ.fetch_add(1, Ordering::SeqCst);
        let base = std::env::temp_dir().join(format!("porthole-curl-{}-{seq}", std::process::id()));
        let head_path = base.with_extension("head");
        let body_path = if self.discard {
            PathBuf::from("/dev/null")
        } else {
            base.with_extension("body")
        };
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args([
            "-sS",
            "--noproxy",
            "",
            "--max-time",
            &self.max_time.to_string(),
        ])
        .arg("-D")
        .arg(&head_path)
        .arg("-o")
        .arg(&body_path)
        .args(["-w", "%{http_code} %{size_download}"])
        .args(&self.args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd
            .spawn()
            .expect("curl is installed (scripts/test.sh installs it)");
        if let Some(data) = self.stdin {
            if let Some(mut stdin) = child.stdin.take() {
                tokio::spawn(async move {
                    let _ = stdin.write_all(&data).await;
                });
            }
        }
        let out = child.wait_with_output().await.expect("curl ran");
        let head = std::fs::read_to_string(&head_path).unwrap_or_default();
        let body = if self.discard {
            Vec::new()
        } else {
            std::fs::read(&body_path).unwrap_or_default()
        };
        let _ = std::fs::remove_file(&head_path);
        if !self.discard {
            let _ = std::fs::remove_file(&body_path);
        }
        let written = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut figures = written.split_whitespace();
        CurlOutput {
            status: figures.next().and_then(|s| s.parse().ok()).unwrap_or(0),
            size_download: figures.next().and_then(|s| s.parse().ok()).unwrap_or(0),
            head,
            body,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            exit: out.status.code().unwrap_or(-1),
        }
    }
}

// ---------------------------------------------------------------- raw client

/// Sends raw bytes to `addr` and reads until the peer closes or `limit` passes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `request` on a fresh connection to `addr` and reads the answer until
/// the server closes (at most 5 s): its status, its head (to the blank line,
/// without it) and what follows. Panics when no status line came.
pub async fn exchange(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let answer = raw_exchange(addr, request.as_bytes(), Duration::from_secs(5)).await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no answer in time to {request:?}: {answer:?}"));
    (status, head.to_string(), body.to_string())
}

/// The value of the field `name` (any case) in a head from [`exchange`].
pub fn head_field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, value) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

// ---------------------------------------------------------------- link proxy

/// A TCP proxy to put between two test parties (shim and relay, inside and
/// outside relay): counts the connections it accepted, and can end the ones
/// open now in two ways while new connections still go through:
/// [`LinkProxy::cut`] closes them (both peers see the close), and
/// [`LinkProxy::blackhole`] stops moving bytes but keeps the sockets open, as
/// a dead NAT or a pulled cable does. Stops when dropped.
pub struct LinkProxy {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    cut: Arc<tokio::sync::Notify>,
    /// What the next cut does: hold the sockets open (true) or close them.
    hold: Arc<std::sync::atomic::AtomicBool>,
    _stop: oneshot::Sender<()>,
}

impl LinkProxy {
    pub async fn start(to: SocketAddr) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind link proxy");
        let addr = listener.local_addr().expect("link proxy addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let cut = Arc::new(tokio::sync::Notify::new());
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Blackholed sockets are kept here, open, until the proxy is dropped.
        let held: Arc<Mutex<Vec<(TcpStream, TcpStream)>>> = Arc::default();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let (count, cut2, hold2) = (accepted.clone(), cut.clone(), hold.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = &mut stopped => return,
                    a = listener.accept() => a,
                };
                let Ok((mut down, _)) = accepted else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let (cut, held, hold) = (cut2.clone(), held.clone(), hold2.clone());
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(to).await else {
                        return;
                    };
                    let ended = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => false,
                        () = cut.notified() => true,
                    };
                    if ended && hold.load(Ordering::SeqCst) {
                        held.lock().expect("held lock").push((down, up));
                    }
                });
            }
        });
        LinkProxy {
            addr,
            accepted,
            cut,
            hold,
            _stop: stop,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes every connection open now.
    pub fn cut(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    /// Blackholes every connection open now.
    pub fn blackhole(&self) {
        self.hold.store(true, Ordering::SeqCst);
        self.cut.notify_waiters();
    }
}

/// The lines of the file at `path` (an access log, say) that contain
/// `needle`; none while the file does not exist yet.
pub fn lines_with(path: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Asserts that `line` (an access line, say) contains every field in `fields`.
pub fn assert_fields(line: &str, fields: &[&str]) {
    for field in fields {
        assert!(line.contains(field), "{field} missing in {line}");
    }
}

/// Asserts that one of `lines` (access lines, say) contains every field in `fields`.
pub fn assert_some_line<S: AsRef<str>>(lines: &[S], fields: &[&str]) {
    assert!(
        lines
            .iter()
            .any(|l| fields.iter().all(|f| l.as_ref().contains(f))),
        "no line with all of {fields:?} in {:?}",
        lines.iter().map(AsRef::as_ref).collect::<Vec<_>>()
    );
}

/// Polls `check` every 20 ms until it returns true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `n` pollers wait on `topic` (the admin listener counts them).
pub async fn wait_pollers(admin: SocketAddr, topic: &str, n: usize) {
    let request = format!("GET /events/{topic} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let want = format!("{{\"pollers\":{n}}}");
    let start = Instant::now();
    while !raw_exchange(admin, request.as_bytes(), Duration::from_secs(2))
        .await
        .contains(&want)
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{n} pollers never waited on {topic}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `msg` on a tunnel, half-closes it, and reads everything back (at
/// most 20 s): what an echo server behind a relay answers.
pub async fn echo_round(mut s: tokio::net::TcpStream, msg: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), s.read_to_end(&mut back))
        .await
        .expect("echo answered in time")
        .unwrap();
    back
}

/// A CONNECT-UDP request (RFC 9298, HTTP/1.1) to the relay `relay.test` at
/// `relay` for `target` (`host:port`): the stream and the answer's head.
pub async fn connect_udp(relay: SocketAddr, target: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, port) = target.rsplit_once(':').expect("host:port");
    let mut s = tokio::net::TcpStream::connect(relay)
        .await
        .expect("connect");
    let req = format!("GET /.well-known/masque/udp/{host}/{port}/ HTTP/1.1\r\nHost: relay.test\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\nCapsule-Protocol: ?1\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if s.read(&mut b).await.expect("read") == 0 {
            break;
        }
        buf.push(b[0]);
    }
    (s, String::from_utf8_lossy(&buf).into_owned())
}

/// Sends each of `messages` as a datagram capsule on a CONNECT-UDP stream
/// to a [`UdpEcho`] and checks its echo (`echo:` + the message) comes back.
pub async fn echo_datagrams<S>(io: &mut S, buf: &mut Vec<u8>, messages: &[&[u8]])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    for msg in messages {
        io.write_all(&porthole_relay::udp::datagram_capsule(msg))
            .await
            .expect("send a capsule");
        assert_eq!(next_datagram(io, buf).await, [b"echo:", *msg].concat());
    }
}

/// Reads from `io` until a whole capsule arrived; its UDP payload.
pub async fn next_datagram<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> Vec<u8> {
    use porthole_relay::udp::{capsule, Capsule};
    loop {
        match capsule(buf) {
            Capsule::Datagram(payload, used) => {
                let payload = payload.to_vec();
                buf.drain(..used);
                return payload;
            }
            Capsule::Other(used) => {
                buf.drain(..used);
            }
            Capsule::Bad => panic!("bad capsule {buf:?}"),
            Capsule::Partial => {
                let mut more = [0u8; 4096];
                let n = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::io::AsyncReadExt::read(io, &mut more),
                )
                .await
                .expect("a datagram within 5 s")
                .unwrap();
                assert!(n > 0, "closed before a datagram");
                buf.extend_from_slice(&more[..n]);
            }
        }
    }
}

/// Opens a `CONNECT target` tunnel through the proxy at `proxy` (a relay or
/// the shim): the connection, and the proxy's answer head, which must be a
/// `200`.
pub async fn connect_via(proxy: SocketAddr, target: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    (s, head)
}

/// An HTTP/2 client on a plain connection to `addr` (h2c, prior knowledge),
/// its connection driven by a task of its own.
pub async fn h2c(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// An RFC 8441 WebSocket request over HTTP/2 for `uri`: an extended CONNECT
/// (`:protocol websocket`), without `Sec-WebSocket-Key` as RFC 8441 sends it.
pub fn websocket_h2(uri: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    extended_connect(uri, "websocket", ("sec-websocket-version", "13"))
}

/// A CONNECT-UDP request over HTTP/2 (RFC 9298 section 3.4) for `uri`
/// (`http://relay.test/.well-known/masque/udp/HOST/PORT/`): an extended
/// CONNECT with `:protocol connect-udp` and `Capsule-Protocol: ?1`.
pub fn connect_udp_h2(uri: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    extended_connect(uri, "connect-udp", ("capsule-protocol", "?1"))
}

/// An extended CONNECT (RFC 8441) for `uri` with `:protocol` `protocol`
/// and the one field `field`.
fn extended_connect(
    uri: &str,
    protocol: &'static str,
    (name, value): (&str, &str),
) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let mut req = http::Request::connect(uri)
        .header(name, value)
        .body(http_body_util::Empty::new())
        .expect("request");
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static(protocol));
    req
}

/// Writes a masked WebSocket text frame ("hi") and expects it echoed back
/// (the test origin's upgrade echoes every byte).
pub async fn websocket_echo<S>(s: &mut S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let frame = [0x81u8, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
    s.write_all(&frame).await.expect("write a frame");
    let mut echoed = [0u8; 8];
    s.read_exact(&mut echoed).await.expect("the frame back");
    assert_eq!(echoed, frame);
}
