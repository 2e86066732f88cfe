//! Configuration: raw (serde, as written), then validated into the typed
//! runtime [`Config`]. Every problem names the key it is about.
//!
//! Sources, later ones winning: the TOML file (or the embedded
//! `conf/relay.toml`), then the environment (`PORTHOLE__RELAY__LISTEN=...`).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{Auth, RawAuth};
use crate::routes::{RouteTable, Target};
use crate::rules::{self, RawRule, Rules};
use crate::secret::Secret;
use crate::tls::{ClientTls, RawTls, RelayTls, Tls};

/// The example configuration shipped in `conf/relay.toml`; used when no
/// `--config` is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../conf/relay.toml");

// ---------------------------------------------------------------- raw form

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// `[relay]`: the aggregate port and the relay's identity.
    #[serde(default)]
    relay: RawRelay,
    /// `[[route]]`: the internal services this relay may reach.
    #[serde(default)]
    route: Vec<RawRoute>,
    /// `[limits]`: protective limits for every client connection.
    #[serde(default)]
    limits: RawLimits,
    /// `[tls]`: TLS on the aggregate port.
    #[serde(default)]
    tls: RawTls,
    /// `[auth]`: users and groups.
    #[serde(default)]
    auth: RawAuth,
    /// `[[rule]]`: access rules, first match wins.
    #[serde(default)]
    rule: Vec<RawRule>,
    /// `[log]`: where the access log goes.
    #[serde(default)]
    log: RawLog,
    /// `[uplink]`: dial out to an outside relay and offer services through it.
    #[serde(default)]
    uplink: Option<RawUplink>,
    /// `[[accept_uplink]]`: inside relays allowed to uplink to this one.
    #[serde(default)]
    accept_uplink: Vec<RawAcceptUplink>,
    /// `[events]`: event notifications (store, retention, limits).
    #[serde(default)]
    events: RawEvents,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    /// The outside relay's aggregate port, `host:port`.
    to: String,
    /// This relay's uplink id, as the outside relay's `[[accept_uplink]]` names it.
    id: String,
    /// File holding the shared secret (first line).
    secret_file: String,
    /// Which of this relay's route hosts to offer outside.
    #[serde(default)]
    offer: Vec<String>,
    /// Outbound HTTP proxy (`host:port`) to reach `to` through, with CONNECT.
    #[serde(default)]
    proxy: Option<String>,
    /// Speak TLS to the outside relay (inside the proxy's tunnel when
    /// `proxy` is set), on the control and every data connection.
    #[serde(default)]
    tls: bool,
    /// PEM CA certificates for the outside relay's certificate; default:
    /// the system roots. Needs `tls = true`.
    ca: Option<String>,
    /// The name the outside relay's certificate must carry (and SNI);
    /// default: the host of `to`. Needs `tls = true`.
    server_name: Option<String>,
    /// A client certificate chain (PEM) for an outside relay that asks for
    /// one (`[tls] client_ca`), with `key`. Needs `tls = true`.
    cert: Option<String>,
    key: Option<String>,
    /// Keepalive: ping after this much silence.
    #[serde(default = "default_idle_ping")]
    idle_ping: String,
    /// Keepalive: probe this long after data stopped arriving.
    #[serde(default = "default_gap_probe")]
    gap_probe: String,
    /// Keepalive: no answer within this means the control connection is dead.
    #[serde(default = "default_ping_timeout")]
    ping_timeout: String,
    /// Idle data connections kept open to the outside relay for the next
    /// sessions (0: dial one per session).
    #[serde(default)]
    pool: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcceptUplink {
    /// The uplink id the inside relay presents.
    id: String,
    /// A line from `porthole-relay passwd ID` (the secret on stdin).
    secret_hash: String,
    /// Host patterns this uplink may offer (`erp.plant3`, `*.plant3`).
    #[serde(default)]
    may_offer: Vec<String>,
    /// How long a client waits for the inside relay to claim its session (504 past it).
    #[serde(default = "default_session_timeout")]
    session_timeout: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    /// Access-log file (one line per request or tunnel), reopened on SIGUSR1;
    /// without it access lines go to the ordinary log.
    #[serde(default)]
    access: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    /// The aggregate port, `ip:port`.
    #[serde(default = "default_listen")]
    listen: String,
    /// The relay's pseudonym: used in `Via`; requests for this host are the relay's own.
    #[serde(default = "default_name")]
    name: String,
    /// How long in-flight requests and tunnels may run on after `SIGTERM`.
    #[serde(default = "default_drain_timeout")]
    drain_timeout: String,
    /// Admin listener (health, metrics, status, event publishing); `""` turns it off.
    /// Never the aggregate port.
    #[serde(default = "default_admin_listen")]
    admin_listen: String,
    /// Threads serving connections on the aggregate port; 0: one per CPU core.
    #[serde(default)]
    workers: usize,
}

impl Default for RawRelay {
    fn default() -> Self {
        RawRelay {
            listen: default_listen(),
            name: default_name(),
            drain_timeout: default_drain_timeout(),
            admin_listen: default_admin_listen(),
            workers: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    /// Exact host name, or `*.suffix` for every name under `suffix`.
    host: String,
    /// Internal address or name; with a port, every request goes to that
    /// port. Not with `via`: the next hop is asked for the requested host.
    to: Option<String>,
    /// Ports a request may name.
    #[serde(default = "default_ports")]
    ports: Vec<u16>,
    /// Dialling the internal server (502 past it).
    #[serde(default = "default_connect_timeout")]
    connect_timeout: String,
    /// Waiting for the response head (504 past it).
    #[serde(default = "default_response_timeout")]
    response_timeout: String,
    /// Strip Porthole's own `Via` entries before the request reaches the server.
    #[serde(default)]
    transparent: bool,
    /// Decode gzip responses for clients that did not offer gzip.
    #[serde(default)]
    decompress: bool,
    /// Allow CONNECT-UDP (RFC 9298) to this route's host and ports.
    #[serde(default)]
    udp: bool,
    /// Speak TLS to the internal server (also implied by `to = "https://..."`).
    #[serde(default)]
    tls: bool,
    /// PEM CA certificates for the internal server's certificate; default: system roots.
    ca: Option<String>,
    /// The next hop (`HOST:PORT` of another relay or any HTTP proxy) that
    /// HTTP and CONNECT for this route go through.
    via: Option<String>,
    /// A file holding `user:password` for the next hop (Basic).
    via_credentials_file: Option<String>,
    /// Speak TLS to the next hop (implied by `via_ca` or `via_cert`).
    #[serde(default)]
    via_tls: bool,
    /// PEM CA certificates for the next hop's certificate; default: system roots.
    via_ca: Option<String>,
    /// A client certificate chain (PEM) for the next hop, with `via_key`.
    via_cert: Option<String>,
    via_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    /// Largest request head (request line plus headers), bytes; 431 past it.
    #[serde(default = "default_max_head_bytes")]
    max_head_bytes: usize,
    /// Most header fields in one head; 431 past it.
    #[serde(default = "default_max_headers")]
    max_headers: usize,
    /// Time allowed for a whole request head; 408 past it.
    #[serde(default = "default_head_timeout")]
    head_timeout: String,
    /// How long a client may leave a body stalled: its upload (408 past
    /// it) or its reading of a response (the connection closes).
    #[serde(default = "default_body_timeout")]
    body_timeout: String,
    /// Keep-alive connections and tunnels with no traffic are closed after this.
    #[serde(default = "default_idle_timeout")]
    idle_timeout: String,
    /// Open client connections in total.
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    /// Open client connections from one client address.
    #[serde(default = "default_max_connections_per_client")]
    max_connections_per_client: usize,
    /// Requests per second from one client address (429 past it); omitted: no limit.
    max_requests_per_second_per_client: Option<u32>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_head_bytes: default_max_head_bytes(),
            max_headers: default_max_headers(),
            head_timeout: default_head_timeout(),
            body_timeout: default_body_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_client: default_max_connections_per_client(),
            max_requests_per_second_per_client: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvents {
    /// Where events are kept: `memory`, `file` or `redis`.
    #[serde(default = "default_store")]
    store: String,
    /// Directory of the `file` store (one log per topic); required for it.
    #[serde(default)]
    path: String,
    /// Server of the `redis` store, `redis://host:port/db`; required for it.
    #[serde(default)]
    redis_url: String,
    /// Most events kept per topic.
    #[serde(default = "default_retain")]
    retain: usize,
    /// Events older than this are dropped.
    #[serde(default = "default_retain_for")]
    retain_for: String,
    /// Largest published body, bytes; 413 past it.
    #[serde(default = "default_max_event_bytes")]
    max_event_bytes: usize,
    /// Most pollers (long polls and event streams) on one topic; 503 past it.
    #[serde(default = "default_max_pollers_per_topic")]
    max_pollers_per_topic: usize,
    /// Most pollers on the relay in total; 503 past it.
    #[serde(default = "default_max_pollers")]
    max_pollers: usize,
    /// The longest a long poll is held, whatever its `wait` asks.
    #[serde(default = "default_max_wait")]
    max_wait: String,
    /// Users (names, `group:NAME`, `*`) who may also publish on the
    /// aggregate port, authenticated; absent: the admin listener only.
    #[serde(default)]
    publishers: Option<Vec<String>>,
}

impl Default for RawEvents {
    fn default() -> Self {
        RawEvents {
            store: default_store(),
            path: String::new(),
            redis_url: String::new(),
            retain: default_retain(),
            retain_for: default_retain_for(),
            max_event_bytes: default_max_event_bytes(),
            max_pollers_per_topic: default_max_pollers_per_topic(),
            max_pollers: default_max_pollers(),
            max_wait: default_max_wait(),
            publishers: None,
        }
    }
}

fn default_store() -> String {
    "memory".into()
}
fn default_retain() -> usize {
    1000
}
fn default_retain_for() -> String {
    "24h".into()
}
fn default_max_event_bytes() -> usize {
    64 * 1024
}
fn default_max_pollers_per_topic() -> usize {
    10_000
}
fn default_max_pollers() -> usize {
    20_000
}
fn default_max_wait() -> String {
    "60s".into()
}

fn default_listen() -> String {
    "0.0.0.0:8080".into()
}
fn default_name() -> String {
    "porthole".into()
}
fn default_drain_timeout() -> String {
    "30s".into()
}
fn default_idle_ping() -> String {
    "30s".into()
}
fn default_gap_probe() -> String {
    "1s".into()
}
fn default_ping_timeout() -> String {
    "3s".into()
}
fn default_session_timeout() -> String {
    "10s".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_ports() -> Vec<u16> {
    vec![80, 443]
}
fn default_connect_timeout() -> String {
    "5s".into()
}
fn default_response_timeout() -> String {
    "60s".into()
}
/// The most `limits.max_head_bytes` may be (1 MiB).
pub const MAX_HEAD_BYTES: usize = 1 << 20;
/// The most `limits.max_headers` may be.
pub const MAX_HEADERS: usize = 1600;

fn default_max_head_bytes() -> usize {
    64 * 1024
}
fn default_max_headers() -> usize {
    100
}
fn default_head_timeout() -> String {
    "10s".into()
}
fn default_body_timeout() -> String {
    "60s".into()
}
fn default_idle_timeout() -> String {
    "5m".into()
}
fn default_max_connections() -> usize {
    20_000
}
fn default_max_connections_per_client() -> usize {
    2_000
}

// ---------------------------------------------------------------- typed form

/// Where a configuration came from; a reload reads it again from there.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    /// TOML text (the embedded default, or a test's), with the environment
    /// overrides it was loaded with (`None`: the process environment).
    Text {
        text: String,
        env: Option<HashMap<String, String>>,
    },
}

impl Source {
    /// Loads and validates the configuration again.
    pub fn load(&self) -> Result<Config, ConfigError> {
        match self {
            Source::File(path) => Config::load_file(&path.to_string_lossy()),
            Source::Text { text, env } => Config::from_toml_with_env(text, env.clone()),
        }
    }

    /// A short description for logs, the status page and `check`: where
    /// the file is, and which keys `PORTHOLE__...` variables set over it (an
    /// operator editing the file would otherwise wonder why an edit of such
    /// a key does nothing).
    pub fn describe(&self) -> String {
        let (name, env) = match self {
            Source::File(path) => (path.display().to_string(), None),
            Source::Text { env, .. } => ("embedded configuration".to_string(), env.as_ref()),
        };
        let keys = match env {
            Some(map) => env_keys(map.keys()),
            None => env_keys(std::env::vars().map(|(name, _)| name)),
        };
        match keys.is_empty() {
            true => name,
            false => format!("{name} (set by the environment: {})", keys.join(", ")),
        }
    }
}

/// The configuration keys `PORTHOLE__...` variable names set
/// (`PORTHOLE__RELAY__LISTEN` -> `relay.listen`), sorted.
fn env_keys<S: AsRef<str>>(names: impl Iterator<Item = S>) -> Vec<String> {
    let mut keys: Vec<String> = names
        .filter_map(|n| {
            n.as_ref()
                .strip_prefix("PORTHOLE__")
                .map(|k| k.to_ascii_lowercase().replace("__", "."))
        })
        .collect();
    keys.sort();
    keys
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub relay: RelaySettings,
    pub routes: RouteTable,
    pub limits: Limits,
    /// TLS on the aggregate port; `None` without `[tls] cert`.
    pub tls: Option<Tls>,
    pub auth: Auth,
    pub rules: Rules,
    /// Access-log file; `None`: access lines go through `tracing`.
    pub access_log: Option<PathBuf>,
    /// This relay dials out to an outside relay.
    pub uplink: Option<UplinkSettings>,
    /// Inside relays that may uplink to this one, by id.
    pub accept_uplinks: Vec<AcceptUplink>,
    pub events: EventSettings,
}

/// `[uplink]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct UplinkSettings {
    /// `host:port` of the outside relay.
    pub to: String,
    pub id: String,
    pub secret: Secret,
    pub offer: Vec<String>,
    pub proxy: Option<String>,
    /// TLS to the outside relay; `None` for plain TCP.
    pub tls: Option<RelayTls>,
    pub keepalive: Keepalive,
    /// Idle pre-opened data connections to keep (0..=[`MAX_UPLINK_POOL`]).
    pub pool: usize,
}

/// Most idle data connections an uplink may keep open; the outside relay
/// parks no more than this per uplink either.
pub const MAX_UPLINK_POOL: usize = 64;

/// The most `limits.max_connections` may be (the connection semaphore's limit
/// is far above; this keeps a typo from meaning "unlimited").
pub const MAX_CONNECTIONS: usize = 10_000_000;

/// Adaptive keepalive timers (JP5535757B2: timers 1, 2 and 3).
pub type Keepalive = crate::keepalive::Settings;

/// `[[accept_uplink]]`, validated.
#[derive(Debug, Clone)]
pub struct AcceptUplink {
    pub id: String,
    /// PHC string of the secret's argon2 hash.
    pub secret_hash: String,
    pub may_offer: Vec<String>,
    pub session_timeout: Duration,
}

impl AcceptUplink {
    /// Whether this uplink may offer `name` (exact, or under a `*.suffix` pattern).
    pub fn may_offer(&self, name: &str) -> bool {
        self.may_offer
            .iter()
            .any(|p| crate::routes::pattern_matches(p, name))
    }
}

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub listen: SocketAddr,
    /// Lower-cased pseudonym.
    pub name: String,
    pub drain_timeout: Duration,
    /// `None` when turned off.
    pub admin_listen: Option<SocketAddr>,
    /// Connection worker threads (`relay.workers`; 0 became the number of cores).
    pub workers: usize,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub head_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// `None`: no request-rate limit.
    pub max_requests_per_second_per_client: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        // The defaults always validate; this mirrors RawLimits::default().
        Limits {
            max_head_bytes: default_max_head_bytes(),
            max_headers: default_max_headers(),
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(300),
            max_connections: default_max_connections(),
            max_connections_per_client: default_max_connections_per_client(),
            max_requests_per_second_per_client: None,
        }
    }
}

/// `[events]` as the relay uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventSettings {
    pub store: StoreKind,
    pub retain: usize,
    pub retain_for: Duration,
    pub max_event_bytes: usize,
    pub max_pollers_per_topic: usize,
    pub max_pollers: usize,
    pub max_wait: Duration,
}

impl Default for EventSettings {
    fn default() -> Self {
        // The defaults always validate; this mirrors RawEvents::default().
        EventSettings {
            store: StoreKind::Memory,
            retain: default_retain(),
            retain_for: Duration::from_secs(24 * 3600),
            max_event_bytes: default_max_event_bytes(),
            max_pollers_per_topic: default_max_pollers_per_topic(),
            max_pollers: default_max_pollers(),
            max_wait: Duration::from_secs(60),
        }
    }
}

/// Which event store, with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    File { path: std::path::PathBuf },
    Redis { url: RedisUrl },
}

/// A Redis URL; may hold a password, so `Debug` masks everything after the scheme.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL itself, for the client only: never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.0.split("://").next().unwrap_or("redis");
        write!(f, "{scheme}://***")
    }
}

/// One route as the relay uses it.
#[derive(Debug, Clone)]
pub struct Route {
    /// The `host` pattern as configured (lower case); names the route in errors and logs.
    pub host: String,
    pub to: Target,
    pub ports: Vec<u16>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub transparent: bool,
    pub decompress: bool,
    /// TLS to the internal server; `None`: plain TCP.
    pub tls: Option<ClientTls>,
    /// CONNECT-UDP is allowed (off unless configured: UDP is not implied by
    /// the TCP ports).
    pub udp: bool,
    /// The next hop this route's requests and tunnels go through.
    pub via: Option<Via>,
}

/// A next hop: another relay or any HTTP proxy (PRODUCT 8, chaining).
#[derive(Debug, Clone)]
pub struct Via {
    pub host: String,
    pub port: u16,
    /// The `Proxy-Authorization` value for the hop (`Basic ...`).
    pub authorization: Option<Secret>,
    /// TLS to the hop (with a client certificate when configured).
    pub tls: Option<ClientTls>,
}

impl Via {
    /// The hop's `Proxy-Authorization` from a file of one `user:password` line.
    fn credentials(path: &str) -> Result<Secret, String> {
        crate::secret::basic_credentials_file(path)
    }

    /// The fields a tunnel request (`CONNECT`, CONNECT-UDP) carries to the
    /// hop: the `Via` it arrived with plus this relay's (`name`), so that a
    /// chain that comes back here is a loop, and this relay's credentials.
    pub fn request_fields(&self, arrived_via: &str, name: &str) -> String {
        let mut fields = crate::rewrite::hop_via(arrived_via, name);
        if let Some(credentials) = &self.authorization {
            fields.push_str("Proxy-Authorization: ");
            fields.push_str(credentials.expose());
            fields.push_str("\r\n");
        }
        fields
    }

    /// `host:port`, for errors and logs.
    pub fn addr(&self) -> String {
        crate::upstream::display_addr(&self.host, self.port)
    }
}

// ---------------------------------------------------------------- errors

/// One thing wrong with a configuration, tied to its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    /// The environment variable that overrides this problem's key
    /// (`relay.listen`: `PORTHOLE__RELAY__LISTEN`); a value it sets wins
    /// over the file's.
    pub fn env_var(&self) -> String {
        format!(
            "PORTHOLE__{}",
            self.key.replace('.', "__").to_ascii_uppercase()
        )
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

/// One line (a log record, a reload's answer): a problem whose message
/// spans lines (a TOML syntax error with its excerpt) has them joined by ` | `.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self
            .problems
            .iter()
            .map(|p| {
                p.to_string()
                    .lines()
                    .map(str::trim_end)
                    .filter(|l| !l.trim().is_empty())
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .collect();
        write!(f, "invalid configuration: {}", lines.join("; "))
    }
}

impl ConfigError {
    fn one(key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                key: key.into(),
                message: message.into(),
            }],
        }
    }
}

// ---------------------------------------------------------------- loading

impl Config {
    /// Loads a configuration file, then applies `PORTHOLE__...` overrides from
    /// the process environment.
    pub fn load_file(path: &str) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one("--config", format!("cannot read {path}: {e}")))?;
        let mut config = Config::from_toml_with_env(&text, None)?;
        config.source = Source::File(PathBuf::from(path));
        Ok(config)
    }

    /// Parses TOML text, then applies environment overrides: from `env` when
    /// given (tests pass a map), otherwise from the process environment.
    pub fn from_toml_with_env(
        text: &str,
        env: Option<HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let source = Source::Text {
            text: text.to_string(),
            env: env.clone(),
        };
        let environment = config::Environment::with_prefix("PORTHOLE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(env);
        let merged: serde_json::Value = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(environment)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::one("config", e.to_string()))?;
        let (raw, mut problems) = deserialize_all::<RawConfig>(merged);
        let Some(raw) = raw else {
            return Err(ConfigError { problems });
        };
        match raw.validate(source) {
            Ok(config) if problems.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError { problems }),
            Err(e) => {
                // A key taken out for its type is said once, not also as
                // missing (nor a list as empty when an element was taken out:
                // `ports[0]` said, `ports` is not said again).
                let said: HashSet<String> = problems.iter().map(|p| p.key.clone()).collect();
                let within = |key: &str| {
                    said.iter().any(|s| {
                        s == key
                            || s.strip_prefix(key)
                                .is_some_and(|rest| rest.starts_with('[') || rest.starts_with('.'))
                    })
                };
                problems.extend(e.problems.into_iter().filter(|p| !within(&p.key)));
                Err(ConfigError { problems })
            }
        }
    }

    /// Parses TOML text alone (no environment).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(text, Some(HashMap::new()))
    }
}

/// Deserializes the merged configuration, reporting every unknown key and
/// every value of the wrong type, not only the first: each one found is
/// noted with its key and taken out, and the rest deserialized again. The
/// configuration, if what is left deserializes (for the remaining checks).
/// (The shim's configuration is read the same way.)
pub fn deserialize_all<T: serde::de::DeserializeOwned>(
    mut merged: serde_json::Value,
) -> (Option<T>, Vec<Problem>) {
    let mut problems: Vec<Problem> = Vec::new();
    // Bounded: each round removes one key of the file.
    for _ in 0..100 {
        let e = match serde_path_to_error::deserialize::<_, T>(&merged) {
            Ok(raw) => return (Some(raw), problems),
            Err(e) => e,
        };
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let missing = message.starts_with("missing field");
        // A required key this loop took out for its type: said already.
        let said = problems.iter().any(|p| {
            message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split_once('`'))
                .is_some_and(|(field, _)| p.key == format!("{path}.{field}"))
        });
        if !said {
            // The path already ends in the offending key (unknown ones included).
            let key = if path == "." {
                "config".to_string()
            } else {
                path
            };
            problems.push(Problem { key, message });
        }
        // A missing key's path is its parent's: nothing to take out, and
        // what follows cannot be read without it.
        if said || missing || !remove_at(&mut merged, e.path()) {
            break;
        }
    }
    (None, problems)
}

/// Takes the value at `path` out of `tree`; whether there was one.
fn remove_at(tree: &mut serde_json::Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = tree;
    for segment in parents {
        let next = match (segment, node) {
            (Segment::Map { key }, serde_json::Value::Object(map)) => map.get_mut(key),
            (Segment::Seq { index }, serde_json::Value::Array(list)) => list.get_mut(*index),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    match (last, node) {
        (Segment::Map { key }, serde_json::Value::Object(map)) => map.remove(key).is_some(),
        (Segment::Seq { index }, serde_json::Value::Array(list)) if *index < list.len() => {
            list.remove(*index);
            true
        }
        _ => false,
    }
}

/// Parses a duration such as `"10s"`, `"250ms"`, `"5m"`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value.trim())
        .map_err(|e| format!("`{value}` is not a duration like \"10s\" ({e})"))
}

pub(crate) struct Collector {
    problems: Vec<Problem>,
}

impl Collector {
    pub(crate) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, value: &str) -> Duration {
        match parse_duration(value) {
            Ok(d) if d.is_zero() => {
                self.push(key, "must be greater than zero");
                Duration::from_secs(1)
            }
            Ok(d) => d,
            Err(e) => {
                self.push(key, e);
                Duration::from_secs(1)
            }
        }
    }

    fn at_most(&mut self, key: &str, value: usize, most: usize) -> usize {
        if value > most {
            self.push(key, format!("{value} is more than the most, {most}"));
            return most;
        }
        value
    }

    fn positive(&mut self, key: &str, value: usize) -> usize {
        if value == 0 {
            self.push(key, "must be at least 1");
            return 1;
        }
        value
    }
}

impl RawConfig {
    fn validate(self, source: Source) -> Result<Config, ConfigError> {
        let mut c = Collector {
            problems: Vec::new(),
        };

        let listen = match self.relay.listen.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                c.push(
                    "relay.listen",
                    format!(
                        "`{}` is not an address like 0.0.0.0:8080",
                        self.relay.listen
                    ),
                );
                SocketAddr::from(([0, 0, 0, 0], 8080))
            }
        };
        let name = self.relay.name.trim().to_ascii_lowercase();
        if name.is_empty() || !name.bytes().all(is_name_byte) {
            c.push(
                "relay.name",
                format!("`{}` is not a host name", self.relay.name),
            );
        }
        let admin_listen = match self.relay.admin_listen.trim() {
            "" => None,
            text => match text.parse::<SocketAddr>() {
                Ok(a) if a == listen && a.port() != 0 => {
                    c.push("relay.admin_listen", "must not be the aggregate port");
                    None
                }
                Ok(a) => Some(a),
                Err(_) => {
                    c.push(
                        "relay.admin_listen",
                        format!("`{text}` is not an address like 127.0.0.1:9090"),
                    );
                    None
                }
            },
        };
        if self.relay.workers > crate::workers::MAX_WORKERS {
            c.push(
                "relay.workers",
                format!(
                    "{} is more than {} (0 means one per CPU core)",
                    self.relay.workers,
                    crate::workers::MAX_WORKERS
                ),
            );
        }
        let relay = RelaySettings {
            admin_listen,
            listen,
            name,
            drain_timeout: c.duration("relay.drain_timeout", &self.relay.drain_timeout),
            workers: crate::workers::count(self.relay.workers),
        };

        let l = &self.limits;
        let limits = Limits {
            // Caps against typos that would switch the protection off
            // (`1e12`): 16 times the defaults, far above what any client sends.
            max_head_bytes: {
                let n = c.positive("limits.max_head_bytes", l.max_head_bytes);
                c.at_most("limits.max_head_bytes", n, MAX_HEAD_BYTES)
            },
            max_headers: {
                let n = c.positive("limits.max_headers", l.max_headers);
                c.at_most("limits.max_headers", n, MAX_HEADERS)
            },
            head_timeout: c.duration("limits.head_timeout", &l.head_timeout),
            body_timeout: c.duration("limits.body_timeout", &l.body_timeout),
            idle_timeout: c.duration("limits.idle_timeout", &l.idle_timeout),
            max_connections: {
                let n = c.positive("limits.max_connections", l.max_connections);
                c.at_most("limits.max_connections", n, MAX_CONNECTIONS)
            },
            max_connections_per_client: c.positive(
                "limits.max_connections_per_client",
                l.max_connections_per_client,
            ),
            max_requests_per_second_per_client: l.max_requests_per_second_per_client.map(|n| {
                c.positive("limits.max_requests_per_second_per_client", n as usize) as u32
            }),
        };

        let publishers = self.events.publishers.clone();
        let events = self.events.validate(&mut c);

        let mut routes = Vec::new();
        let mut seen = HashSet::new();
        for (i, r) in self.route.into_iter().enumerate() {
            let key = |field: &str| format!("route[{i}].{field}");
            let valid = route_host(&r.host);
            let host = valid
                .clone()
                .unwrap_or_else(|| r.host.trim().to_ascii_lowercase());
            if valid.is_none() {
                c.push(
                    key("host"),
                    format!(
                        "`{}` is not a host name, IP address or *.suffix pattern",
                        r.host
                    ),
                );
            } else if !seen.insert(host.clone()) {
                c.push(key("host"), format!("`{host}` is routed twice"));
            }
            // `https://host` speaks TLS, to port 443 unless it names one.
            let to_text = match (&r.to, &r.via) {
                (Some(to), None) => to.trim(),
                (None, Some(_)) => "",
                (Some(_), Some(_)) => {
                    c.push(
                        key("to"),
                        "not with via: the next hop is asked for the requested host and port",
                    );
                    ""
                }
                (None, None) => {
                    c.push(key("to"), "missing: the internal server (or set via)");
                    ""
                }
            };
            let https = to_text
                .get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
            let to_text = if https { &to_text[8..] } else { to_text };
            let to = match Target::parse(to_text) {
                _ if to_text.is_empty() => Target::placeholder(),
                Ok(t) if https => Target {
                    port: t.port.or(Some(443)),
                    ..t
                },
                Ok(t) => t,
                Err(e) => {
                    c.push(key("to"), e);
                    Target::placeholder()
                }
            };
            let tls = if https || r.tls {
                match ClientTls::new(r.ca.as_deref()) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        c.push(key(if r.ca.is_some() { "ca" } else { "tls" }), e);
                        None
                    }
                }
            } else {
                if r.ca.is_some() {
                    c.push(key("ca"), "needs tls = true or an https:// target");
                }
                None
            };
            let via_tls =
                r.via_tls || r.via_ca.is_some() || r.via_cert.is_some() || r.via_key.is_some();
            let via = match &r.via {
                None => {
                    for (set, field) in [
                        (r.via_credentials_file.is_some(), "via_credentials_file"),
                        (via_tls, "via_tls"),
                    ] {
                        if set {
                            c.push(key(field), "needs via");
                        }
                    }
                    None
                }
                Some(text) => match Target::parse(text) {
                    Ok(Target {
                        host,
                        port: Some(port),
                    }) => {
                        if tls.is_some() {
                            c.push(key("via"), "TLS to the internal server through a next hop is not supported; remove tls/ca or via");
                        }
                        let authorization = r.via_credentials_file.as_deref().and_then(|path| {
                            Via::credentials(path)
                                .map_err(|e| c.push(key("via_credentials_file"), e))
                                .ok()
                        });
                        Some(Via {
                            host,
                            port,
                            authorization,
                            tls: None,
                        })
                    }
                    Ok(_) => {
                        c.push(key("via"), format!("`{text}` needs a port (HOST:PORT)"));
                        None
                    }
                    Err(e) => {
                        c.push(key("via"), e);
                        None
                    }
                },
            };
            // TLS to the next hop: the connection the relay dials is the
            // hop's, so it is the route's dialled TLS (the hop's name verified).
            let via = via.map(|mut via| {
                if via_tls {
                    let identity = crate::tls::identity_pair(
                        r.via_cert.as_deref(),
                        r.via_key.as_deref(),
                        ("via_cert", "via_key"),
                    )
                    .unwrap_or_else(|e| {
                        c.push(key("via_cert"), e);
                        None
                    });
                    match ClientTls::with_identity(r.via_ca.as_deref(), &[], identity) {
                        Ok(t) => via.tls = Some(t),
                        Err(e) => c.push(
                            key(if identity.is_some() {
                                "via_cert"
                            } else {
                                "via_ca"
                            }),
                            e,
                        ),
                    }
                }
                via
            });
            if r.ports.is_empty() {
                c.push(key("ports"), "must name at least one port");
            }
            if r.ports.contains(&0) {
                c.push(key("ports"), "port 0 is not a port");
            }
            routes.push(Route {
                connect_timeout: c.duration(&key("connect_timeout"), &r.connect_timeout),
                response_timeout: c.duration(&key("response_timeout"), &r.response_timeout),
                host,
                to,
                ports: r.ports,
                transparent: r.transparent,
                decompress: r.decompress,
                tls,
                udp: r.udp,
                via,
            });
        }

        let tls = self.tls.validate(&mut c);
        let auth = self.auth.validate(&mut c);
        let rules = rules::validate(self.rule, publishers, &self.auth.groups, &mut c);
        let certificates = tls
            .as_ref()
            .is_some_and(|t| t.client_auth != crate::tls::ClientAuth::None);
        if auth.required && !auth.has_users() && !certificates {
            c.push(
                "auth.required",
                "nobody could authenticate: set auth.users_file or tls.client_ca",
            );
        }

        if !c.problems.is_empty() {
            return Err(ConfigError {
                problems: c.problems,
            });
        }
        let uplink = self.uplink.map(|u| {
            let key = |f: &str| format!("uplink.{f}");
            if crate::routes::parse_authority(&u.to, 0).is_none_or(|(_, p)| p == 0) {
                c.push(key("to"), format!("`{}` is not host:port", u.to));
            }
            if u.id.is_empty() || u.id.contains([':', ' ']) {
                c.push(key("id"), format!("`{}` is not an uplink id", u.id));
            }
            let secret = match std::fs::read_to_string(&u.secret_file) {
                Ok(text) => match text.lines().next().map(str::trim) {
                    Some(s) if !s.is_empty() => Secret::new(s),
                    _ => {
                        c.push(key("secret_file"), format!("{} is empty", u.secret_file));
                        Secret::new("")
                    }
                },
                Err(e) => {
                    c.push(
                        key("secret_file"),
                        format!("cannot read {}: {e}", u.secret_file),
                    );
                    Secret::new("")
                }
            };
            let offer: Vec<String> = u
                .offer
                .iter()
                .map(|o| o.trim().to_ascii_lowercase())
                .collect();
            for (i, name) in offer.iter().enumerate() {
                if !routes
                    .iter()
                    .any(|r: &Route| crate::routes::pattern_matches(&r.host, name))
                {
                    c.push(
                        format!("uplink.offer[{i}]"),
                        format!("`{name}` is not one of this relay's routes"),
                    );
                }
            }
            if let Some(p) = &u.proxy {
                if crate::routes::parse_authority(p, 0).is_none_or(|(_, port)| port == 0) {
                    c.push(key("proxy"), format!("`{p}` is not host:port"));
                }
            }
            let tls = uplink_tls(&u, &mut c);
            if u.pool > MAX_UPLINK_POOL {
                c.push(
                    key("pool"),
                    format!("{} is more than the most, {MAX_UPLINK_POOL}", u.pool),
                );
            }
            UplinkSettings {
                to: u.to.trim().to_string(),
                id: u.id,
                secret,
                offer,
                proxy: u.proxy,
                tls,
                keepalive: Keepalive {
                    idle_ping: c.duration(&key("idle_ping"), &u.idle_ping),
                    gap_probe: c.duration(&key("gap_probe"), &u.gap_probe),
                    ping_timeout: c.duration(&key("ping_timeout"), &u.ping_timeout),
                },
                pool: u.pool.min(MAX_UPLINK_POOL),
            }
        });
        let mut accept_uplinks = Vec::new();
        let mut ids = HashSet::new();
        for (i, a) in self.accept_uplink.into_iter().enumerate() {
            let key = |f: &str| format!("accept_uplink[{i}].{f}");
            if !ids.insert(a.id.clone()) {
                c.push(key("id"), format!("`{}` is listed twice", a.id));
            }
            let secret_hash = crate::secret::parse_hash(a.secret_hash.trim()).unwrap_or_else(|e| {
                c.push(key("secret_hash"), e);
                String::new()
            });
            let may_offer: Vec<String> = a
                .may_offer
                .iter()
                .map(|p| p.trim().to_ascii_lowercase())
                .collect();
            for (j, p) in may_offer.iter().enumerate() {
                if !valid_host_pattern(p) {
                    c.push(
                        format!("accept_uplink[{i}].may_offer[{j}]"),
                        format!("`{p}` is not a host or *.suffix pattern"),
                    );
                }
            }
            accept_uplinks.push(AcceptUplink {
                session_timeout: c.duration(&key("session_timeout"), &a.session_timeout),
                id: a.id,
                secret_hash,
                may_offer,
            });
        }
        // Problems found in [uplink] and [[accept_uplink]] (checked after the
        // routes, which offers refer to).
        if !c.problems.is_empty() {
            return Err(ConfigError {
                problems: c.problems,
            });
        }
        let access_log = match self.log.access.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(path) => Some(PathBuf::from(path)),
        };
        Ok(Config {
            uplink,
            accept_uplinks,
            access_log,
            source,
            relay,
            routes: RouteTable::new(routes),
            limits,
            events,
            tls,
            auth,
            rules,
        })
    }
}

impl RawEvents {
    fn validate(self, c: &mut Collector) -> EventSettings {
        let store = match self.store.trim() {
            "memory" => StoreKind::Memory,
            "file" if self.path.trim().is_empty() => {
                c.push("events.path", "the file store needs a directory");
                StoreKind::Memory
            }
            "file" => StoreKind::File {
                path: self.path.trim().into(),
            },
            "redis" => {
                let url = self.redis_url.trim();
                let scheme_ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
                    .iter()
                    .any(|s| url.starts_with(s) && url.len() > s.len());
                if !scheme_ok {
                    c.push(
                        "events.redis_url",
                        "the redis store needs a URL like redis://127.0.0.1:6379/0",
                    );
                }
                StoreKind::Redis {
                    url: RedisUrl(url.to_string()),
                }
            }
            other => {
                c.push(
                    "events.store",
                    format!("`{other}` is not one of memory, file, redis"),
                );
                StoreKind::Memory
            }
        };
        let max_event_bytes = c.positive("events.max_event_bytes", self.max_event_bytes);
        EventSettings {
            store,
            retain: c.positive("events.retain", self.retain),
            retain_for: c.duration("events.retain_for", &self.retain_for),
            max_event_bytes,
            max_pollers_per_topic: c
                .positive("events.max_pollers_per_topic", self.max_pollers_per_topic),
            max_pollers: c.positive("events.max_pollers", self.max_pollers),
            max_wait: c.duration("events.max_wait", &self.max_wait),
        }
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'
}

/// `[uplink] tls`, `ca`, `server_name`, `cert` and `key`, checked; problems
/// name their key.
fn uplink_tls(u: &RawUplink, c: &mut Collector) -> Option<RelayTls> {
    if !u.tls {
        for (set, field) in [
            (u.ca.is_some(), "ca"),
            (u.server_name.is_some(), "server_name"),
            (u.cert.is_some(), "cert"),
            (u.key.is_some(), "key"),
        ] {
            if set {
                c.push(format!("uplink.{field}"), "needs uplink.tls = true");
            }
        }
        return None;
    }
    let host = crate::routes::parse_authority(u.to.trim(), 0).map(|(host, _)| host);
    let name = match (u.server_name.as_deref().map(str::trim), host) {
        (Some(name), _) => name.to_string(),
        (None, Some(host)) => host,
        // `to` itself is reported.
        (None, None) => return None,
    };
    let identity = crate::tls::identity_pair(u.cert.as_deref(), u.key.as_deref(), ("cert", "key"))
        .map_err(|e| c.push("uplink.cert", e))
        .ok()?;
    let key = match (identity, &u.ca) {
        (Some(_), _) => "uplink.cert",
        (None, Some(_)) => "uplink.ca",
        (None, None) => "uplink.tls",
    };
    let client = ClientTls::with_identity(u.ca.as_deref(), &[b"http/1.1"], identity)
        .map_err(|e| c.push(key, e))
        .ok()?;
    RelayTls::new(client, &name)
        .map_err(|e| c.push("uplink.server_name", e))
        .ok()
}

/// A route host as written (`wiki.corp`, `*.corp`, `10.0.0.5`, `[::1]` or
/// `::1`), in the form requests are matched in: lower case, an IPv6
/// literal without brackets and in its canonical text (as
/// [`crate::routes::parse_authority`] gives a request's). `None` for
/// anything else.
pub(crate) fn route_host(written: &str) -> Option<String> {
    let host = written.trim().to_ascii_lowercase();
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&host);
    if let Ok(v6) = bare.parse::<std::net::Ipv6Addr>() {
        return Some(v6.to_string());
    }
    valid_host_pattern(&host).then_some(host)
}

pub(crate) fn valid_host_pattern(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    // Labels of 1 to 63 characters, not starting or ending with `-`
    // (RFC 1123 2.1): `a..corp` or `-bad-.corp` name no host.
    let label_ok =
        |l: &str| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-');
    name.len() <= 253
        && !name.contains('*')
        && name.bytes().all(is_name_byte)
        && name.split('.').all(label_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::from_toml(EMBEDDED_DEFAULT).expect("conf/relay.toml validates");
        assert!(!c.routes.is_empty());
    }

    #[test]
    fn host_patterns_are_host_names() {
        for good in [
            "wiki.corp",
            "*.corp",
            "a-b.c_d.corp",
            "127.0.0.1",
            "localhost",
        ] {
            assert!(valid_host_pattern(good), "{good}");
            assert_eq!(route_host(good).as_deref(), Some(good));
        }
        // IPv6 literals, with or without brackets, in canonical form.
        for (written, host) in [
            ("[::1]", "::1"),
            ("::1", "::1"),
            ("[2001:DB8:0:0::7]", "2001:db8::7"),
            (" WIKI.Corp ", "wiki.corp"),
        ] {
            assert_eq!(route_host(written).as_deref(), Some(host), "{written}");
        }
        for bad in ["[::1", "[wiki.corp]", "::g", "[::1]:80"] {
            assert_eq!(route_host(bad), None, "{bad}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "*.",
            "a..corp",
            "-bad-.corp",
            "corp.",
            "a.*.corp",
            "a b",
            &long,
        ] {
            assert!(!valid_host_pattern(bad), "{bad}");
        }
    }

    #[test]
    fn defaults_apply() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.relay.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.limits.max_head_bytes, 65536);
        assert_eq!(c.limits.head_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.body_timeout, Duration::from_secs(60));
    }

    fn problem_keys(text: &str) -> Vec<String> {
        match Config::from_toml(text) {
            Ok(_) => panic!("expected an error for {text}"),
            Err(e) => e.problems.into_iter().map(|p| p.key).collect(),
        }
    }

    #[test]
    fn the_description_names_keys_the_environment_sets() {
        let env = HashMap::from([
            (
                "PORTHOLE__RELAY__LISTEN".to_string(),
                "127.0.0.1:1".to_string(),
            ),
            ("PORTHOLE__EVENTS__STORE".to_string(), "memory".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ]);
        let c = Config::from_toml_with_env("", Some(env)).unwrap();
        assert_eq!(
            c.source.describe(),
            "embedded configuration (set by the environment: events.store, relay.listen)"
        );
        assert_eq!(
            Config::from_toml("").unwrap().source.describe(),
            "embedded configuration"
        );
    }

    #[test]
    fn a_syntax_error_is_one_line_in_the_error_text() {
        let e = Config::from_toml("[relay]\nlisten = \"127.0.0.1:1\"\nname = \n").unwrap_err();
        let problem = e.problems[0].to_string();
        assert!(problem.contains('\n'), "the excerpt spans lines: {problem}");
        let text = e.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.starts_with("invalid configuration: "), "{text}");
    }

    #[test]
    fn unknown_key_is_named() {
        let keys = problem_keys("[relay]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n");
        assert_eq!(keys, vec!["relay.listne"]);
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_named_with_the_other_problems() {
        let text = r#"
            [relay]
            listen = "127.0.0.1:1"
            bogus = 1
            [limits]
            idle_timeout = 5
            max_headers = 0
            [[route]]
            host = "a.test"
            to = "10.0.0.1"
            connect_timeout = 5
            colour = "red"
            ports = [80, "x"]
        "#;
        let mut keys = problem_keys(text);
        keys.sort();
        assert_eq!(
            keys,
            vec![
                "limits.idle_timeout",
                "limits.max_headers",
                "relay.bogus",
                "route[0].colour",
                "route[0].connect_timeout",
                "route[0].ports[1]",
            ]
        );
        // A required key of the wrong type is said once (not also "missing").
        let keys = problem_keys("[relay]\nbogus = 1\n[[route]]\nhost = \"a.test\"\nto = 7\n");
        assert_eq!(keys, vec!["relay.bogus", "route[0].to"]);
        // Limits past their caps (a typo that would switch the protection off).
        let keys = problem_keys("[limits]\nmax_head_bytes = 1000000000000\nmax_headers = 100000\n");
        assert_eq!(keys, vec!["limits.max_head_bytes", "limits.max_headers"]);
        // A list whose only element was taken out is not also "empty".
        let keys =
            problem_keys("[[route]]\nhost = \"a.test\"\nto = \"10.0.0.1\"\nports = [70000]\n");
        assert_eq!(keys, vec!["route[0].ports[0]"]);
    }

    #[test]
    fn via_routes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("cred");
        std::fs::write(&good, "edge:s3cret\n").unwrap();
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "no colon\n").unwrap();
        let ok = format!(
            "[[route]]\nhost = \"a.test\"\nvia = \"hop.test:8080\"\nvia_credentials_file = \"{}\"\n",
            good.display()
        );
        let c = Config::from_toml(&ok).unwrap();
        let via = c.routes.routes()[0].via.clone().unwrap();
        assert_eq!(
            (via.addr().as_str(), via.authorization.unwrap().expose()),
            ("hop.test:8080", "Basic ZWRnZTpzM2NyZXQ=")
        );
        let cases = [
            ("[[route]]\nhost = \"a.test\"\n".to_string(), "route[0].to"),
            ("[[route]]\nhost = \"a.test\"\nto = \"x\"\nvia = \"h:1\"\n".to_string(), "route[0].to"),
            ("[[route]]\nhost = \"a.test\"\nvia = \"h\"\n".to_string(), "route[0].via"),
            ("[[route]]\nhost = \"a.test\"\nto = \"x\"\nvia_credentials_file = \"/x\"\n".to_string(), "route[0].via_credentials_file"),
            (format!("[[route]]\nhost = \"a.test\"\nvia = \"h:1\"\nvia_credentials_file = \"{}\"\n", bad.display()), "route[0].via_credentials_file"),
            ("[[route]]\nhost = \"a.test\"\nvia = \"h:1\"\nvia_credentials_file = \"/nonexistent/x\"\n".to_string(), "route[0].via_credentials_file"),
            ("[[route]]\nhost = \"a.test\"\nvia = \"h:1\"\ntls = true\n".to_string(), "route[0].via"),
            ("[[route]]\nhost = \"a.test\"\nto = \"x\"\nvia_tls = true\n".to_string(), "route[0].via_tls"),
            ("[[route]]\nhost = \"a.test\"\nvia = \"h:1\"\nvia_ca = \"/nonexistent/ca.pem\"\n".to_string(), "route[0].via_ca"),
            (format!("[[route]]\nhost = \"a.test\"\nvia = \"h:1\"\nvia_cert = \"{}\"\n", good.display()), "route[0].via_cert"),
        ];
        for (text, key) in cases {
            assert_eq!(problem_keys(&text), vec![key], "{text}");
        }
    }

    #[test]
    fn bad_values_name_their_keys() {
        let text = r#"
            [relay]
            listen = "nowhere"
            [limits]
            head_timeout = "soon"
            [[route]]
            host = "a b"
            to = "10.0.0.1:99999"
            ports = []
        "#;
        let keys = problem_keys(text);
        assert_eq!(
            keys,
            vec![
                "relay.listen",
                "limits.head_timeout",
                "route[0].host",
                "route[0].to",
                "route[0].ports"
            ]
        );
    }

    #[test]
    fn needs_restart_names_what_a_reload_cannot_apply() {
        let base = "[relay]\nlisten = \"127.0.0.1:8080\"\n[[route]]\nhost = \"a.test\"\nto = \"10.0.0.1\"\n";
        let running = crate::AtStart::of(&Config::from_toml(base).unwrap());
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "0123456789abcdef0123\n").unwrap();
        let uplink = format!(
            "[uplink]\nto = \"o.test:8080\"\nid = \"plant\"\nsecret_file = \"{}\"\noffer = [\"a.test\"]\n",
            secret.path().display()
        );
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            // Applied by a reload: routes, per-request limits, rules.
            (
                "[[route]]\nhost = \"b.test\"\nto = \"10.0.0.2\"\n[limits]\nmax_headers = 50\n",
                &[],
            ),
            (
                "[limits]\nmax_connections = 10\n",
                &["limits.max_connections"],
            ),
            (
                "[limits]\nmax_connections_per_client = 10\n",
                &["limits.max_connections_per_client"],
            ),
            ("[events]\nmax_wait = \"5s\"\n", &["[events]"]),
            ("[log]\naccess = \"/tmp/a.log\"\n", &["log.access"]),
            (&uplink, &["[uplink]"]),
        ];
        for (extra, want) in cases {
            let new = Config::from_toml(&format!("{base}{extra}")).unwrap();
            assert_eq!(crate::needs_restart(&running, &new), *want, "{extra}");
        }
        let moved = Config::from_toml(&base.replace("8080", "8081")).unwrap();
        assert_eq!(crate::needs_restart(&running, &moved), ["relay.listen"]);
    }

    #[test]
    fn uplink_tls_keys_are_checked() {
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "0123456789abcdef0123\n").unwrap();
        let ca = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca.path(), "not a certificate\n").unwrap();
        let uplink = |extra: &str| {
            format!(
                "[[route]]\nhost = \"a.test\"\nto = \"10.0.0.1\"\n[uplink]\nto = \"o.test:8080\"\nid = \"plant\"\nsecret_file = \"{}\"\noffer = [\"a.test\"]\n{extra}",
                secret.path().display()
            )
        };
        let plain = Config::from_toml(&uplink("")).unwrap();
        assert!(plain.uplink.unwrap().tls.is_none());
        let ca_path = ca.path().display().to_string();
        let cases: &[(String, &str)] = &[
            (format!("ca = \"{ca_path}\"\n"), "uplink.ca"),
            ("server_name = \"o.test\"\n".into(), "uplink.server_name"),
            (
                "tls = true\nca = \"/nonexistent/ca.pem\"\n".into(),
                "uplink.ca",
            ),
            (format!("tls = true\nca = \"{ca_path}\"\n"), "uplink.ca"),
            (
                "tls = true\nserver_name = \"a b\"\n".into(),
                "uplink.server_name",
            ),
            (format!("cert = \"{ca_path}\"\n"), "uplink.cert"),
            ("key = \"/k.pem\"\n".into(), "uplink.key"),
            ("tls = true\ncert = \"/c.pem\"\n".into(), "uplink.cert"),
            (
                "tls = true\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n".into(),
                "uplink.cert",
            ),
        ];
        for (extra, key) in cases {
            let found = problem_keys(&uplink(extra));
            assert_eq!(found, vec![key.to_string()], "{extra}");
        }
        // The error names the file.
        let e =
            Config::from_toml(&uplink("tls = true\nca = \"/nonexistent/ca.pem\"\n")).unwrap_err();
        assert!(
            e.problems[0].message.contains("/nonexistent/ca.pem"),
            "{e:?}"
        );
    }

    #[test]
    fn workers_default_to_the_cores_and_are_bounded() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(Config::from_toml("").unwrap().relay.workers, cores);
        let c = Config::from_toml("[relay]\nworkers = 3\n").unwrap();
        assert_eq!(c.relay.workers, 3);
        assert_eq!(
            problem_keys("[relay]\nworkers = 257\n"),
            vec!["relay.workers"]
        );
    }

    #[test]
    fn duplicate_route_is_refused() {
        let text = "[[route]]\nhost=\"a.corp\"\nto=\"x\"\n[[route]]\nhost=\"A.corp\"\nto=\"y\"\n";
        assert_eq!(problem_keys(text), vec!["route[1].host"]);
    }

    #[test]
    fn events_defaults() {
        let e = Config::from_toml("").unwrap().events;
        assert_eq!(e.store, StoreKind::Memory);
        assert_eq!(e.retain, 1000);
        assert_eq!(e.retain_for, Duration::from_secs(24 * 3600));
        assert_eq!(e.max_event_bytes, 65536);
        assert_eq!(e.max_wait, Duration::from_secs(60));
    }

    #[test]
    fn events_stores_by_table() {
        let cases: &[(&str, Result<StoreKind, &str>)] = &[
            ("store = \"memory\"", Ok(StoreKind::Memory)),
            (
                "store = \"file\"\npath = \"/var/lib/porthole\"",
                Ok(StoreKind::File {
                    path: "/var/lib/porthole".into(),
                }),
            ),
            (
                "store = \"redis\"\nredis_url = \"redis://127.0.0.1:6379/0\"",
                Ok(StoreKind::Redis {
                    url: RedisUrl("redis://127.0.0.1:6379/0".into()),
                }),
            ),
            ("store = \"file\"", Err("events.path")),
            ("store = \"redis\"", Err("events.redis_url")),
            (
                "store = \"redis\"\nredis_url = \"http://x\"",
                Err("events.redis_url"),
            ),
            ("store = \"sqlite\"", Err("events.store")),
            ("retain = 0", Err("events.retain")),
            ("retain_for = \"forever\"", Err("events.retain_for")),
            ("max_event_bytes = 0", Err("events.max_event_bytes")),
            (
                "max_pollers_per_topic = 0",
                Err("events.max_pollers_per_topic"),
            ),
            ("max_pollers = 0", Err("events.max_pollers")),
            ("max_wait = \"0s\"", Err("events.max_wait")),
            ("retian = 3", Err("events.retian")),
        ];
        for (body, want) in cases {
            let text = format!("[events]\n{body}\n");
            match want {
                Ok(kind) => assert_eq!(&Config::from_toml(&text).unwrap().events.store, kind),
                Err(key) => assert_eq!(problem_keys(&text), vec![key.to_string()], "{body}"),
            }
        }
    }

    #[test]
    fn redis_url_is_masked_in_debug() {
        let url = RedisUrl("redis://:hunter2@10.0.0.1:6379".into());
        assert_eq!(format!("{url:?}"), "redis://***");
    }

    #[test]
    fn events_from_environment() {
        let env = HashMap::from([
            ("PORTHOLE__EVENTS__STORE".to_string(), "file".to_string()),
            ("PORTHOLE__EVENTS__PATH".to_string(), "/tmp/ev".to_string()),
            ("PORTHOLE__EVENTS__RETAIN".to_string(), "5".to_string()),
        ]);
        let e = Config::from_toml_with_env("", Some(env)).unwrap().events;
        assert_eq!(
            e.store,
            StoreKind::File {
                path: "/tmp/ev".into()
            }
        );
        assert_eq!(e.retain, 5);
    }

    #[test]
    fn environment_overrides_file() {
        let env = HashMap::from([
            (
                "PORTHOLE__RELAY__LISTEN".to_string(),
                "127.0.0.1:9999".to_string(),
            ),
            ("PORTHOLE__LIMITS__MAX_HEADERS".to_string(), "7".to_string()),
        ]);
        let c =
            Config::from_toml_with_env("[relay]\nlisten = \"127.0.0.1:1\"\n", Some(env)).unwrap();
        assert_eq!(c.relay.listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(c.limits.max_headers, 7);
    }
}
