//! Porthole relay: one aggregate port that relays HTTP to internal servers by
//! absolute URI or `Host`, tunnels `CONNECT`, and serves the relay's own
//! endpoints.
//!
//! Layout, in the order a connection meets them:
//!
//! - [`workers`]: one thread and runtime per core, each with its accept loop;
//! - [`listener`]: accept loop, connection limits, first-bytes detection;
//! - [`tls`]: TLS on the aggregate port (client certificates), and the one
//!   client side for internal servers, the shim's link and uplinks;
//! - [`dispatch`]: pure decisions: which protocol, and what a request head asks for;
//! - [`http1`]: the HTTP/1 server side of a client connection (request loop);
//! - [`deadline`]: per-connection timeouts without a timer operation per request;
//! - [`h2`]: HTTP/2 connections, each stream served through [`http1`];
//! - [`gate`]: per-client request rate, authentication and access rules;
//! - [`auth`]: users (password file, client certificates) and `Proxy-Authorization`;
//! - [`rules`]: the access rules (`[[rule]]`), pure decisions;
//! - [`ratelimit`]: requests per second per client address;
//! - [`forward`]: the HTTP relay of one request to its route's internal server;
//! - [`tunnel`]: `CONNECT` and upgraded connections, bytes both ways;
//! - [`splice`]: the zero-copy data path of TCP-to-TCP tunnels (Linux `splice(2)`);
//! - [`local`]: the relay's own endpoints on the aggregate port;
//! - [`pac`]: the proxy auto-config file generated from the routes;
//! - [`events`]: the event hub: publish, long poll and event streams, stores;
//! - [`admin`]: the admin listener (health, metrics, reload; publishing);
//! - [`status`]: the HTML status page on the admin listener;
//! - [`upstream`]: dialling internal servers and the keep-alive pool;
//! - [`uplink`]: offering services from behind a firewall (control protocol, both sides);
//! - [`keepalive`]: the adaptive keepalive decision for long-lived links;
//! - [`routes`]: the route table and its matching rules;
//! - [`rewrite`]: head rewriting (hop-by-hop fields, `Host`, `Via`);
//! - [`codec`]: HTTP/1 heads and bodies on the wire;
//! - [`config`]: raw, validated and typed configuration;
//! - [`error`]: what failed, whose fault, which status;
//! - [`secret`]: argon2 secret hashes and masked secrets;
//! - [`access_log`]: one line per request or tunnel;
//! - [`metrics`]: Prometheus metrics for the admin listener;
//! - `props` (tests and the `props` feature only): properties of the parsers
//!   of peer bytes, shared by the fuzz targets (`fuzz/`) and the property tests.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod codec;
pub mod config;
pub mod deadline;
pub mod dispatch;
pub mod error;
pub mod events;
pub mod forward;
pub mod gate;
pub mod h2;
pub mod http1;
pub mod keepalive;
pub mod listener;
pub mod local;
pub mod logging;
pub mod metrics;
pub mod pac;
#[cfg(any(test, feature = "props"))]
pub mod props;
pub mod ratelimit;
pub mod rewrite;
pub mod routes;
pub mod rules;
pub mod secret;
pub mod splice;
pub mod status;
pub mod tls;
pub mod tunnel;
pub mod udp;
pub mod uplink;
pub mod upstream;
pub mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::{
    CancellationToken, WaitForCancellationFuture, WaitForCancellationFutureOwned,
};
use tokio_util::task::TaskTracker;

pub use config::Config;

/// State shared by every connection of a running relay.
pub struct Shared {
    config: RwLock<Arc<Config>>,
    /// What the relay took from its configuration at start: a reload is
    /// compared against it ([`needs_restart`]).
    at_start: AtStart,
    /// The outcome of the last reload, for the status page.
    last_reload: std::sync::Mutex<Option<ReloadOutcome>>,
    /// Idle keep-alive connections to internal servers.
    pub pool: upstream::Pool,
    /// The connection workers started (`relay.workers` at start; a reload
    /// does not change it).
    pub workers: usize,
    /// Request rate per client address (`limits.max_requests_per_second_per_client`).
    pub rate: ratelimit::RateLimiter,
    /// Cancelled when the relay starts draining ([`Shared::start_draining`]),
    /// for the tasks that wait for it.
    shutdown: CancellationToken,
    /// Set with `shutdown`: a plain load for the per-request checks
    /// (`CancellationToken::is_cancelled` takes a mutex every worker shares).
    draining: AtomicBool,
    pub metrics: metrics::Metrics,
    /// When the relay started (uptime on the status page).
    pub started: std::time::SystemTime,
    /// The addresses bound, by role (for the status page).
    pub bound: std::sync::Mutex<Vec<(&'static str, SocketAddr)>>,
    /// The access-log file, when `[log] access` names one.
    pub access_file: Option<access_log::FileSink>,
    /// Uplinked relays and the names they offer (outside role).
    pub uplinks: uplink::outside::Registry,
    /// Event notifications: publish, poll, the store.
    pub events: events::Hub,
}

impl Shared {
    /// Shared state for a configuration; fails if the access log cannot be opened.
    pub fn new(config: Config) -> std::io::Result<Shared> {
        let access_file = match &config.access_log {
            Some(path) => Some(access_log::FileSink::open(path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("log.access {}: {e}", path.display()))
            })?),
            None => None,
        };
        // The redis store starts a task: this runs inside the runtime.
        let events = events::Hub::open(&config.events)
            .map_err(|e| std::io::Error::other(format!("cannot open the event store: {e}")))?;
        let workers = config.relay.workers;
        let config = Arc::new(config);
        Ok(Shared {
            events,
            uplinks: uplink::outside::Registry::default(),
            access_file,
            at_start: AtStart::of(&config),
            config: RwLock::new(config),
            last_reload: std::sync::Mutex::new(None),
            pool: upstream::Pool::new(workers),
            workers,
            rate: ratelimit::RateLimiter::default(),
            shutdown: CancellationToken::new(),
            draining: AtomicBool::new(false),
            metrics: metrics::Metrics::new(),
            started: std::time::SystemTime::now(),
            bound: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Starts draining: no new connections, keep-alive connections close
    /// after their current request.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.shutdown.cancel();
    }

    /// Whether the relay is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Completes when the relay starts draining.
    pub fn until_draining(&self) -> WaitForCancellationFuture<'_> {
        self.shutdown.cancelled()
    }

    /// [`Shared::until_draining`], owning what it waits on (to keep across a
    /// connection's requests).
    pub fn until_draining_owned(&self) -> WaitForCancellationFutureOwned {
        self.shutdown.clone().cancelled_owned()
    }

    /// The configuration in force; a request keeps the snapshot it started with.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the configuration again from where it came from. A valid one
    /// replaces routes, rules, users, TLS certificates and limits for new
    /// requests (open connections, tunnels and long-polls keep going); an
    /// invalid one is refused and the old one stays. The password cache
    /// belongs to the configuration, so it starts empty. What only a restart
    /// applies ([`needs_restart`]) is returned, logged and shown on the status
    /// page.
    pub fn reload(&self) -> Result<Vec<&'static str>, config::ConfigError> {
        let current = self.config();
        let outcome = match current.source.load() {
            Ok(new) => {
                let later = needs_restart(&self.at_start, &new);
                if !later.is_empty() {
                    tracing::warn!(
                        settings = %later.join(", "),
                        "changed settings take effect at the next restart; the rest is applied"
                    );
                }
                let routes = new.routes.routes().len();
                if routes == 0 && !current.routes.routes().is_empty() {
                    // Valid, but more often a file caught half-written.
                    tracing::warn!(
                        source = %current.source.describe(),
                        before = current.routes.routes().len(),
                        "the reloaded configuration has no routes: every relayed request is refused until one is added"
                    );
                }
                *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
                tracing::info!(source = %current.source.describe(), routes, "configuration reloaded");
                Ok(later)
            }
            Err(e) => {
                tracing::error!(source = %current.source.describe(), error = %e, "reload refused; the old configuration stays");
                Err(e)
            }
        };
        let result = if outcome.is_ok() { "ok" } else { "refused" };
        let later = match &outcome {
            Ok(later) => later.clone(),
            Err(_) => Vec::new(),
        };
        self.metrics
            .reloads
            .get_or_create(&metrics::ResultLabels { result })
            .inc();
        let record = ReloadOutcome {
            at: std::time::SystemTime::now(),
            error: outcome.as_ref().err().map(|e| e.to_string()),
            needs_restart: later,
        };
        *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
        outcome
    }

    /// The outcome of the last reload, if there was one.
    pub fn last_reload(&self) -> Option<ReloadOutcome> {
        self.last_reload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// When the configuration was last reloaded, and why not if it was refused.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    pub at: std::time::SystemTime,
    pub error: Option<String>,
    /// Changed settings that wait for a restart ([`needs_restart`]).
    pub needs_restart: Vec<&'static str>,
}

/// The settings a running relay takes once, at start: what it binds, opens
/// or starts (its sockets and workers, the connection limits' counters, the
/// access-log file, the event store, the uplink). A reload applies
/// everything else to new requests.
#[derive(Debug, Clone, PartialEq)]
pub struct AtStart {
    listen: SocketAddr,
    admin_listen: Option<SocketAddr>,
    workers: usize,
    max_connections: usize,
    max_connections_per_client: usize,
    access_log: Option<std::path::PathBuf>,
    events: config::EventSettings,
    uplink: Option<config::UplinkSettings>,
}

impl AtStart {
    pub fn of(c: &Config) -> AtStart {
        AtStart {
            listen: c.relay.listen,
            admin_listen: c.relay.admin_listen,
            workers: c.relay.workers,
            max_connections: c.limits.max_connections,
            max_connections_per_client: c.limits.max_connections_per_client,
            access_log: c.access_log.clone(),
            events: c.events.clone(),
            uplink: c.uplink.clone(),
        }
    }
}

/// The settings taken at start ([`AtStart`]) that `new` changes, by key.
pub fn needs_restart(running: &AtStart, new: &Config) -> Vec<&'static str> {
    let (old, new) = (running, &AtStart::of(new));
    let changes = [
        (old.listen != new.listen, "relay.listen"),
        (old.admin_listen != new.admin_listen, "relay.admin_listen"),
        (old.workers != new.workers, "relay.workers"),
        (
            old.max_connections != new.max_connections,
            "limits.max_connections",
        ),
        (
            old.max_connections_per_client != new.max_connections_per_client,
            "limits.max_connections_per_client",
        ),
        (old.access_log != new.access_log, "log.access"),
        (old.events != new.events, "[events]"),
        (old.uplink != new.uplink, "[uplink]"),
    ];
    changes
        .into_iter()
        .filter(|(changed, _)| *changed)
        .map(|(_, key)| key)
        .collect()
}

/// What a connection knows about itself.
#[derive(Clone)]
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The relay address the client connected to.
    pub local: SocketAddr,
    /// The subject common name of the client's verified TLS certificate.
    pub cert_user: Option<String>,
    /// Whether the client's connection is TLS (the relay terminated it).
    pub tls: bool,
    /// Set on the internal leg of an HTTP/2 extended `CONNECT`: the upgrade
    /// must be answered `101` ([`h2::MustSwitch`]).
    pub must_switch: Option<Arc<h2::MustSwitch>>,
    /// A data connection an uplink opened for the outside relay's session:
    /// a CONNECT-UDP on it is for this relay whatever its `Host` says
    /// (the outside relay cannot know this relay's name or address).
    pub uplink_session: bool,
}

/// The sockets a relay serves: the aggregate port and, optionally, the admin listener.
pub struct Listeners {
    pub aggregate: TcpListener,
    pub admin: Option<TcpListener>,
    /// The relay's claim on the aggregate address ([`workers::claim`]), taken
    /// before binding it; `None` for a listener bound by the caller.
    pub claim: Option<workers::Claim>,
}

impl Listeners {
    /// Binds the addresses the configuration names.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        // A port the kernel chooses cannot be raced for.
        let claim = match config.relay.listen.port() {
            0 => None,
            _ => workers::claim(config.relay.listen)?,
        };
        let aggregate = workers::bind_aggregate(config.relay.listen).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("relay.listen {}: {e}", config.relay.listen),
            )
        })?;
        let admin = match config.relay.admin_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("relay.admin_listen {addr}: {e}"))
            })?),
            None => None,
        };
        Ok(Listeners {
            aggregate,
            admin,
            claim,
        })
    }
}

/// Runs the relay until `shutdown` completes, then stops accepting and lets
/// in-flight requests and tunnels finish for up to `relay.drain_timeout`.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    run_until(listeners, config, shutdown, std::future::pending()).await
}

/// As [`run`], and `cut_short` (polled once the drain has begun) ends the
/// drain at once: what is still open is closed. `main` passes the first and
/// the second stop signal ([`StopSignals`]). The end of the drain is logged
/// with how long it took and how many connections it cut.
pub async fn run_until(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
    cut_short: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared::new(config)?);
    run_shared(listeners, shared, shutdown, cut_short).await
}

/// As [`run_until`], with the relay's state made beforehand: `main` opens
/// the access log and the event store ([`Shared::new`]) before it binds,
/// so a path that cannot be opened stops it with nothing bound.
pub async fn run_shared(
    listeners: Listeners,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
    cut_short: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let aggregate = listeners.aggregate.local_addr().ok();
    let admin_addr = listeners.admin.as_ref().and_then(|l| l.local_addr().ok());
    {
        let mut bound = shared.bound.lock().unwrap_or_else(|p| p.into_inner());
        bound.extend(aggregate.map(|a| ("aggregate", a)));
        bound.extend(admin_addr.map(|a| ("admin", a)));
    }
    // The signal handlers exist before `listening` is logged: the default
    // action of SIGHUP and SIGUSR1 would end the process.
    let hup = watch_signal(SignalKind::hangup(), "SIGHUP");
    let usr1 = watch_signal(SignalKind::user_defined1(), "SIGUSR1");
    let tracker = TaskTracker::new();
    let config = shared.config();
    let mut workers =
        workers::Workers::start(listeners.aggregate, listeners.claim, &shared, &tracker)?;
    let admin = listeners
        .admin
        .map(|l| tokio::spawn(admin::serve(l, shared.clone())));
    let reloader = tokio::spawn(reload_on_sighup(shared.clone(), hup));
    let uplink = config
        .uplink
        .is_some()
        .then(|| tokio::spawn(uplink::inside::run(shared.clone())));
    let reopener = tokio::spawn(reopen_on_sigusr1(shared.clone(), usr1));
    let sweeper = {
        let shared = shared.clone();
        tokio::spawn(async move { upstream::sweep_idle(&shared.pool).await })
    };
    let shown = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
    tracing::info!(
        aggregate = %shown(aggregate),
        admin = %shown(admin_addr),
        config = %config.source.describe(),
        routes = config.routes.routes().len(),
        workers = shared.workers,
        "listening"
    );
    drop(config);
    shutdown.await;
    let began = std::time::Instant::now();
    // As configured now: a reload applies to the next drain.
    let drain_timeout = shared.config().relay.drain_timeout;
    tracing::info!(
        ?drain_timeout,
        "shutting down: no new connections, draining (a second SIGTERM or SIGINT ends the drain now)"
    );
    shared.start_draining();
    workers.accepting_ended().await;
    tracker.close();
    let ended = tokio::select! {
        () = tracker.wait() => "finished",
        () = tokio::time::sleep(drain_timeout) => "drain_timeout",
        () = cut_short => "second signal",
    };
    // Connection tasks still running (a tunnel counts once).
    let cut = tracker.len();
    match ended {
        "drain_timeout" => tracing::warn!(
            open = cut,
            ?drain_timeout,
            "drain timeout: closing what is still open"
        ),
        "second signal" => tracing::warn!(
            open = cut,
            "second stop signal: ending the drain now, closing what is still open"
        ),
        _ => {}
    }
    tracing::info!(
        took_ms = began.elapsed().as_millis() as u64,
        cut,
        ended,
        "drain ended"
    );
    workers.stop().await;
    if let Some(admin) = admin {
        admin.abort();
    }
    reloader.abort();
    if let Some(uplink) = uplink {
        uplink.abort();
    }
    reopener.abort();
    sweeper.abort();
    Ok(())
}

/// A stream of `kind` signals, installed now; `None` (with a warning) if it cannot be.
fn watch_signal(kind: SignalKind, name: &str) -> Option<Signal> {
    match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, signal = name, "cannot watch the signal");
            None
        }
    }
}

/// `SIGHUP` reloads the configuration (see [`Shared::reload`]); without the
/// signal, `POST /reload` on the admin listener still does.
async fn reload_on_sighup(shared: Arc<Shared>, hup: Option<Signal>) {
    let Some(mut hup) = hup else { return };
    while hup.recv().await.is_some() {
        let _ = shared.reload();
    }
}

/// `SIGUSR1` reopens the access-log file (logrotate's `postrotate`); without
/// one, the signal is ignored.
async fn reopen_on_sigusr1(shared: Arc<Shared>, usr1: Option<Signal>) {
    let Some(mut usr1) = usr1 else { return };
    while usr1.recv().await.is_some() {
        if let Some(file) = shared.access_file.as_ref() {
            file.reopen();
        }
    }
}

/// SIGTERM and SIGINT, counted from when [`StopSignals::install`] is called
/// (inside the runtime, before the relay binds: a signal right after start
/// is counted too). The relay's `main` drains on the first and ends the
/// drain on the second ([`run_until`]), as an operator pressing Ctrl-C twice
/// or `kill` sent again expects.
pub struct StopSignals {
    count: tokio::sync::watch::Receiver<u32>,
}

impl StopSignals {
    /// Installs the handlers; a task counts the signals.
    pub fn install() -> StopSignals {
        let mut term = watch_signal(SignalKind::terminate(), "SIGTERM");
        let mut int = watch_signal(SignalKind::interrupt(), "SIGINT");
        let (counter, count) = tokio::sync::watch::channel(0u32);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = next_signal(&mut term) => {}
                    Some(()) = next_signal(&mut int) => {}
                    else => return,
                }
                counter.send_modify(|n| *n = n.saturating_add(1));
            }
        });
        StopSignals { count }
    }

    /// Completes on the `n`th signal (at once if it came already); never if
    /// no signal can be watched.
    pub fn nth(&self, n: u32) -> impl Future<Output = ()> + Send + 'static {
        let mut count = self.count.clone();
        async move {
            if count.wait_for(|c| *c >= n).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The next signal of a stream; never for a stream that could not be installed.
async fn next_signal(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Completes on SIGTERM or SIGINT (the shim's `main` stops on it; the
/// relay's counts them with [`StopSignals`]). The
/// SIGTERM handler is installed when this is called (inside the runtime), not
/// when the future is first polled, so a SIGTERM right after start drains too.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    let term = watch_signal(SignalKind::terminate(), "SIGTERM");
    async move {
        let Some(mut term) = term else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
}
