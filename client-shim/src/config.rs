//! The shim's configuration: raw (TOML and command line), then validated
//! into [`ShimConfig`]. Errors name the key at fault, in the relay's
//! [`ConfigError`] form.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use porthole_relay::config::{deserialize_all, parse_duration, ConfigError, Problem};
use porthole_relay::routes::parse_authority;
use porthole_relay::secret::{basic_credentials_file, Secret};
use porthole_relay::tls::{identity_pair, ClientTls, RelayTls};
use serde::Deserialize;

use crate::keepalive;

/// The listen address when none is given: the usual system-proxy port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3128";

/// How long a UDP flow lives without a datagram either way, when `udp_idle`
/// is not set: longer than a DNS or STUN exchange, shorter than the relay's
/// own `idle_timeout` (5 min by default), so the shim ends its flows first.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);

/// `shim.toml` as written; every field is optional so the command line can
/// fill in or override what the file leaves out.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The relay's aggregate port, `HOST:PORT`; `https://HOST:PORT` is the
    /// same with `tls = true`.
    pub relay: Option<String>,
    /// Speak TLS to the relay (the link with ALPN `h2`, and `events watch`).
    #[serde(default)]
    pub tls: bool,
    /// PEM CA certificates for the relay's certificate; default: the system
    /// roots. Needs TLS.
    pub ca: Option<String>,
    /// The name the relay's certificate must carry (and SNI); default: the
    /// host of `relay`. Needs TLS.
    pub server_name: Option<String>,
    /// A client certificate chain (PEM) for a relay that asks for one
    /// (its `[tls] client_ca`), with `key`. Needs TLS.
    pub cert: Option<String>,
    /// The private key (PEM) of `cert`.
    pub key: Option<String>,
    /// The relay's `name` (its pseudonym): the host of the shim's own requests
    /// to the relay (PAC, probes). Default: the `relay` address.
    pub relay_name: Option<String>,
    /// The system-proxy listener (default `127.0.0.1:3128`).
    pub listen: Option<String>,
    /// A file of one `user:password` line: the shim's own credentials for
    /// the relay, sent as `Proxy-Authorization` on everything it sends there
    /// (instead of a client's own). Unset: a client's credentials pass through.
    pub credentials_file: Option<String>,
    /// Forwarded ports, `LISTEN=HOST:PORT`.
    #[serde(default)]
    pub forward: Vec<String>,
    /// Forwarded UDP ports, `LISTEN=HOST:PORT` (CONNECT-UDP through the link).
    #[serde(default)]
    pub forward_udp: Vec<String>,
    /// A UDP flow (one local source) ends after this long without a
    /// datagram either way (default `60s`).
    pub udp_idle: Option<String>,
    /// How long a new local connection waits for the link before `502` (default `10s`).
    pub link_wait: Option<String>,
    /// Dialling the relay, and its first answer on a new link (default `5s`).
    pub connect_timeout: Option<String>,
    /// Adaptive keepalive timers (JP5535757B2).
    #[serde(default)]
    pub keepalive: RawKeepalive,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeepalive {
    /// Probe after this much silence (Timer 1, default `30s`).
    pub idle_ping: Option<String>,
    /// Probe this long after data stopped arriving (Timer 2, default `1s`).
    pub gap_probe: Option<String>,
    /// No answer to a probe within this means the link is dead (Timer 3, default `3s`).
    pub ping_timeout: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct ShimConfig {
    /// `HOST:PORT` of the relay, dialled as given.
    pub relay: String,
    /// TLS to the relay; `None` for plain TCP (h2c on the link).
    pub tls: Option<ShimTls>,
    /// The authority of the shim's own requests to the relay.
    pub relay_name: String,
    /// The `Proxy-Authorization` value from `credentials_file`.
    pub authorization: Option<Secret>,
    pub listen: SocketAddr,
    pub forwards: Vec<ForwardSpec>,
    /// Forwarded UDP ports: a local UDP socket each, its datagrams carried
    /// over CONNECT-UDP streams.
    pub udp_forwards: Vec<ForwardSpec>,
    /// How long a UDP flow lives without a datagram either way.
    pub udp_idle: Duration,
    pub link_wait: Duration,
    pub connect_timeout: Duration,
    pub keepalive: keepalive::Settings,
}

/// TLS to the relay: the link offers only `h2` in ALPN (it is HTTP/2), the
/// event watcher only `http/1.1` (its polls are HTTP/1.1).
#[derive(Debug, Clone)]
pub struct ShimTls {
    pub link: RelayTls,
    pub watch: RelayTls,
}

/// A forwarded port: a local listener whose connections tunnel to `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    pub listen: SocketAddr,
    pub host: String,
    pub port: u16,
}

impl ForwardSpec {
    /// Parses `LISTEN=HOST:PORT`, where `LISTEN` is `ADDR:PORT` or a bare port (on 127.0.0.1).
    pub fn parse(text: &str) -> Result<ForwardSpec, String> {
        let (listen, target) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}` is not LISTEN=HOST:PORT"))?;
        let listen = ForwardSpec::parse_listen(listen)?;
        let (host, port) = parse_authority(target.trim(), 0)
            .filter(|(_, port)| *port != 0)
            .ok_or_else(|| format!("`{}` is not HOST:PORT", target.trim()))?;
        Ok(ForwardSpec { listen, host, port })
    }

    /// Parses `LISTEN`: `ADDR:PORT`, or a bare port on 127.0.0.1.
    pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
        let text = text.trim();
        match text.parse::<u16>() {
            Ok(port) => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
            Err(_) => text
                .parse()
                .map_err(|_| format!("`{text}` is not a local ADDR:PORT")),
        }
    }

    /// `HOST:PORT` for a `CONNECT` (IPv6 literals in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.listen, self.authority())
    }
}

impl RawConfig {
    /// Parses `shim.toml` text; unknown keys are errors that name the key.
    /// Every unknown key and every value of the wrong type is named, not
    /// only the first (as the relay's `check` does).
    pub fn from_toml(text: &str) -> Result<RawConfig, ConfigError> {
        let tree: serde_json::Value =
            toml::from_str(text).map_err(|e| one("config", e.message().to_string()))?;
        match deserialize_all::<RawConfig>(tree) {
            (Some(raw), problems) if problems.is_empty() => Ok(raw),
            (_, problems) => Err(ConfigError { problems }),
        }
    }

    /// Reads and parses a file.
    pub fn load_file(path: &str) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| one("--config", format!("cannot read {path}: {e}")))?;
        RawConfig::from_toml(&text)
    }

    /// Checks every key and returns the runtime form, or every problem found.
    pub fn validate(&self) -> Result<ShimConfig, ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(Problem {
                key: key.into(),
                message,
            })
        };
        let relay_text = self.relay.as_deref().map(str::trim);
        let https = relay_text.and_then(strip_https);
        let relay = match https.or(relay_text) {
            None | Some("") => {
                problem("relay", "required: the relay's HOST:PORT".into());
                String::new()
            }
            Some(r) => {
                if !matches!(parse_authority(r, 0), Some((_, port)) if port != 0) {
                    problem(
                        "relay",
                        format!("`{r}` is not HOST:PORT (or https://HOST:PORT)"),
                    );
                }
                r.to_string()
            }
        };
        let tls = self.tls(https.is_some(), &relay, &mut problem);
        let relay_name = match self.relay_name.as_deref().map(str::trim) {
            Some(n) if n.is_empty() || n.contains(['/', ' ', '@']) => {
                problem("relay_name", format!("`{n}` is not a host name"));
                String::new()
            }
            Some(n) => n.to_ascii_lowercase(),
            None => relay.clone(),
        };
        let authorization = self.credentials_file.as_deref().and_then(|path| {
            basic_credentials_file(path)
                .map_err(|e| problem("credentials_file", e))
                .ok()
        });
        let listen_text = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text.trim().parse().unwrap_or_else(|_| {
            problem("listen", format!("`{listen_text}` is not ADDR:PORT"));
            SocketAddr::from(([127, 0, 0, 1], 3128))
        });
        let mut forwards = Vec::new();
        for (i, text) in self.forward.iter().enumerate() {
            match ForwardSpec::parse(text) {
                Ok(spec) => forwards.push(spec),
                Err(e) => problem(&format!("forward[{i}]"), e),
            }
        }
        let mut udp_forwards: Vec<ForwardSpec> = Vec::new();
        for (i, text) in self.forward_udp.iter().enumerate() {
            match ForwardSpec::parse(text) {
                // Two sockets cannot share a local address (port 0 is any free port).
                Ok(spec)
                    if spec.listen.port() != 0
                        && udp_forwards.iter().any(|f| f.listen == spec.listen) =>
                {
                    problem(
                        &format!("forward_udp[{i}]"),
                        format!("{} is already a UDP forward", spec.listen),
                    )
                }
                Ok(spec) => udp_forwards.push(spec),
                Err(e) => problem(&format!("forward_udp[{i}]"), e),
            }
        }
        let mut duration = |key: &str, value: &Option<String>, default: Duration| match value {
            None => default,
            Some(v) => match parse_duration(v) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    problem(key, "must be more than zero".into());
                    default
                }
                Err(e) => {
                    problem(key, e);
                    default
                }
            },
        };
        let defaults = keepalive::Settings::default();
        let ka = &self.keepalive;
        let keepalive = keepalive::Settings {
            idle_ping: duration("keepalive.idle_ping", &ka.idle_ping, defaults.idle_ping),
            gap_probe: duration("keepalive.gap_probe", &ka.gap_probe, defaults.gap_probe),
            ping_timeout: duration(
                "keepalive.ping_timeout",
                &ka.ping_timeout,
                defaults.ping_timeout,
            ),
        };
        let link_wait = duration("link_wait", &self.link_wait, Duration::from_secs(10));
        let udp_idle = duration("udp_idle", &self.udp_idle, DEFAULT_UDP_IDLE);
        let connect_timeout = duration(
            "connect_timeout",
            &self.connect_timeout,
            Duration::from_secs(5),
        );
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(ShimConfig {
            relay,
            tls,
            relay_name,
            authorization,
            listen,
            forwards,
            udp_forwards,
            udp_idle,
            link_wait,
            connect_timeout,
            keepalive,
        })
    }
}

impl RawConfig {
    /// `tls`, `ca` and `server_name` (with `https` from the `relay` form),
    /// checked; the CA file is read here, so a bad one is a config error.
    fn tls(
        &self,
        https: bool,
        relay: &str,
        problem: &mut impl FnMut(&str, String),
    ) -> Option<ShimTls> {
        if !(self.tls || https) {
            for (set, key) in [
                (self.ca.is_some(), "ca"),
                (self.server_name.is_some(), "server_name"),
                (self.cert.is_some(), "cert"),
                (self.key.is_some(), "key"),
            ] {
                if set {
                    problem(
                        key,
                        "needs tls = true (or relay = \"https://HOST:PORT\")".into(),
                    );
                }
            }
            return None;
        }
        let name = match self.server_name.as_deref().map(str::trim) {
            Some(name) => name.to_string(),
            // A bad `relay` is reported on its own.
            None => parse_authority(relay, 0)?.0,
        };
        let identity =
            match identity_pair(self.cert.as_deref(), self.key.as_deref(), ("cert", "key")) {
                Ok(identity) => identity,
                Err(e) => {
                    problem("cert", e);
                    return None;
                }
            };
        let key = match (identity, &self.ca) {
            (Some(_), _) => "cert",
            (None, Some(_)) => "ca",
            (None, None) => "tls",
        };
        let build = |alpn: &[u8]| {
            let client = ClientTls::with_identity(self.ca.as_deref(), &[alpn], identity)
                .map_err(|e| (key, e))?;
            RelayTls::new(client, &name).map_err(|e| ("server_name", e))
        };
        match (build(b"h2"), build(b"http/1.1")) {
            (Ok(link), Ok(watch)) => Some(ShimTls { link, watch }),
            (Err((key, e)), _) | (_, Err((key, e))) => {
                problem(key, e);
                None
            }
        }
    }
}

/// `HOST:PORT` of `https://HOST:PORT` (scheme in any case, an optional `/`).
fn strip_https(relay: &str) -> Option<&str> {
    let scheme = relay.get(..8)?;
    scheme
        .eq_ignore_ascii_case("https://")
        .then(|| relay[8..].trim_end_matches('/'))
}

fn one(key: &str, message: String) -> ConfigError {
    ConfigError {
        problems: vec![Problem {
            key: key.into(),
            message,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<ShimConfig, String> {
        RawConfig::from_toml(text)
            .and_then(|r| r.validate())
            .map_err(|e| e.problems[0].key.clone())
    }

    #[test]
    fn valid_and_invalid_configs_by_table() {
        let ok = check(
            "relay = \"relay.corp:8080\"\nforward = [\"15432=db.corp:5432\"]\n[keepalive]\ngap_probe = \"250ms\"\n",
        )
        .unwrap();
        assert_eq!(ok.listen.to_string(), "127.0.0.1:3128");
        assert_eq!(ok.relay_name, "relay.corp:8080");
        assert_eq!(ok.forwards[0].to_string(), "127.0.0.1:15432=db.corp:5432");
        assert_eq!(ok.keepalive.gap_probe, Duration::from_millis(250));
        assert_eq!(ok.keepalive.idle_ping, Duration::from_secs(30));

        let bad: &[(&str, &str)] = &[
            ("listen = \"127.0.0.1:1\"\n", "relay"),
            ("relay = \"nohost\"\n", "relay"),
            ("relay = \"r:1\"\nlisten = \"x\"\n", "listen"),
            ("relay = \"r:1\"\nforward = [\"1=db\"]\n", "forward[0]"),
            ("relay = \"r:1\"\nforward = [\"x=db:1\"]\n", "forward[0]"),
            ("relay = \"r:1\"\nrelay_name = \"a b\"\n", "relay_name"),
            ("relay = \"r:1\"\nlink_wait = \"soon\"\n", "link_wait"),
            (
                "relay = \"r:1\"\n[keepalive]\nping_timeout = \"0s\"\n",
                "keepalive.ping_timeout",
            ),
            (
                "relay = \"r:1\"\n[keepalive]\nidle = \"1s\"\n",
                "keepalive.idle",
            ),
            ("relay = \"r:1\"\nlisten_on = \"x\"\n", "listen_on"),
            ("relay = 5\n", "relay"),
            ("relay = \"http://r:1\"\n", "relay"),
            ("relay = \"r:1\"\nca = \"ca.pem\"\n", "ca"),
            ("relay = \"r:1\"\nserver_name = \"r\"\n", "server_name"),
            (
                "relay = \"r:1\"\ntls = true\nca = \"/nonexistent/ca.pem\"\n",
                "ca",
            ),
            (
                "relay = \"https://r:1\"\nca = \"/nonexistent/ca.pem\"\n",
                "ca",
            ),
            (
                "relay = \"https://r:1\"\nserver_name = \"a b\"\n",
                "server_name",
            ),
            ("relay = \"r:1\"\ncert = \"c.pem\"\n", "cert"),
            ("relay = \"r:1\"\nkey = \"k.pem\"\n", "key"),
            ("relay = \"https://r:1\"\nkey = \"k.pem\"\n", "cert"),
            (
                "relay = \"https://r:1\"\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n",
                "cert",
            ),
        ];
        for (text, key) in bad {
            assert_eq!(check(text).err().as_deref(), Some(*key), "{text}");
        }
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_named() {
        let e = RawConfig::from_toml(
            "relay = \"r:1\"\nbogus = 1\nlisten = 5\n[keepalive]\nidle = \"1s\"\n",
        )
        .unwrap_err();
        let mut keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["bogus", "keepalive.idle", "listen"]);
        let e = RawConfig::from_toml("relay = ").unwrap_err();
        assert_eq!(e.problems[0].key, "config");
    }

    #[test]
    fn udp_forwards_and_their_idle_time_are_checked() {
        let ok = check(
            "relay = \"r:1\"\nforward_udp = [\"5353=dns.corp:53\", \"127.0.0.2:5353=[2001:db8::1]:53\"]\nudp_idle = \"20s\"\n",
        )
        .unwrap();
        let specs: Vec<String> = ok.udp_forwards.iter().map(|f| f.to_string()).collect();
        assert_eq!(
            specs,
            [
                "127.0.0.1:5353=dns.corp:53",
                "127.0.0.2:5353=[2001:db8::1]:53"
            ]
        );
        assert_eq!(ok.udp_idle, Duration::from_secs(20));
        assert!(ok.forwards.is_empty());
        let plain = check("relay = \"r:1\"\n").unwrap();
        assert!(plain.udp_forwards.is_empty());
        assert_eq!(plain.udp_idle, DEFAULT_UDP_IDLE);
        // The same port for TCP and UDP is two different sockets.
        let both = check(
            "relay = \"r:1\"\nforward = [\"5353=dns.corp:53\"]\nforward_udp = [\"5353=dns.corp:53\"]\n",
        )
        .unwrap();
        assert_eq!(both.udp_forwards.len(), 1);

        let bad: &[(&str, &str)] = &[
            ("forward_udp = [\"5353\"]\n", "forward_udp[0]"),
            ("forward_udp = [\"5353=dns.corp\"]\n", "forward_udp[0]"),
            ("forward_udp = [\"5353=dns.corp:0\"]\n", "forward_udp[0]"),
            ("forward_udp = [\"x=dns.corp:53\"]\n", "forward_udp[0]"),
            (
                "forward_udp = [\"5353=dns.corp:53\", \"=dns.corp:53\"]\n",
                "forward_udp[1]",
            ),
            (
                "forward_udp = [\"5353=a:53\", \"127.0.0.1:5353=b:53\"]\n",
                "forward_udp[1]",
            ),
            ("forward_udp = \"5353=dns.corp:53\"\n", "forward_udp"),
            ("udp_idle = \"0s\"\n", "udp_idle"),
            ("udp_idle = \"a while\"\n", "udp_idle"),
            ("udp_timeout = \"1s\"\n", "udp_timeout"),
        ];
        for (text, key) in bad {
            let text = format!("relay = \"r:1\"\n{text}");
            assert_eq!(check(&text).err().as_deref(), Some(*key), "{text}");
        }
        // The message says what is wrong with which entry.
        let e =
            RawConfig::from_toml("relay = \"r:1\"\nforward_udp = [\"5353=a:53\", \"5353=b:53\"]\n")
                .unwrap()
                .validate()
                .unwrap_err();
        assert!(e.problems[0].message.contains("127.0.0.1:5353"), "{e:?}");
    }

    #[test]
    fn credentials_file_is_read_and_its_errors_never_show_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("creds");
        std::fs::write(&good, "alice:pa:ss\n").unwrap();
        let c = check(&format!(
            "relay = \"r:1\"\ncredentials_file = \"{}\"\n",
            good.display()
        ))
        .unwrap();
        let auth = c.authorization.clone().unwrap();
        // base64("alice:pa:ss")
        assert_eq!(auth.expose(), "Basic YWxpY2U6cGE6c3M=");
        assert!(!format!("{c:?}").contains("YWxpY2U6cGE6c3M"));
        assert!(check("relay = \"r:1\"\n").unwrap().authorization.is_none());

        let bad = dir.path().join("bad");
        std::fs::write(&bad, "no-colon-hunter2\n").unwrap();
        for path in [bad.display().to_string(), "/nonexistent/creds".into()] {
            let e =
                RawConfig::from_toml(&format!("relay = \"r:1\"\ncredentials_file = \"{path}\"\n"))
                    .unwrap()
                    .validate()
                    .unwrap_err();
            assert_eq!(e.problems[0].key, "credentials_file");
            assert!(e.problems[0].message.contains(&path), "{e:?}");
            assert!(!e.problems[0].message.contains("hunter2"), "{e:?}");
        }
    }

    #[test]
    fn tls_to_the_relay_by_key_or_by_https_form() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        // Any certificate will do as a root here; the relay crate's own
        // test CA is not at hand, so one is made with rcgen.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let ca = ca.display();

        let plain = check("relay = \"r.test:1\"\n").unwrap();
        assert!(plain.tls.is_none());
        let keyed = check(&format!(
            "relay = \"r.test:1\"\ntls = true\nca = \"{ca}\"\n"
        ))
        .unwrap();
        let https = check(&format!("relay = \"HTTPS://r.test:1/\"\nca = \"{ca}\"\n")).unwrap();
        for c in [&keyed, &https] {
            assert_eq!(c.relay, "r.test:1");
            assert_eq!(c.relay_name, "r.test:1");
            let tls = c.tls.as_ref().unwrap();
            assert_eq!(tls.link.server_name, "r.test");
            assert_eq!(tls.watch.server_name, "r.test");
        }
        let named = check(&format!(
            "relay = \"10.0.0.5:8443\"\ntls = true\nca = \"{ca}\"\nserver_name = \"relay.corp\"\n"
        ))
        .unwrap();
        assert_eq!(named.tls.unwrap().link.server_name, "relay.corp");
        // The error names the file.
        let e = RawConfig::from_toml("relay = \"r:1\"\ntls = true\nca = \"/nonexistent/ca.pem\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            e.problems[0].message.contains("/nonexistent/ca.pem"),
            "{e:?}"
        );
    }
}
