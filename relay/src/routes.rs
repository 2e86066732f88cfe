//! The route table: which requested `host:port` may go where.
//!
//! A route's `host` is an exact name or `*.suffix` (every name under
//! `suffix`, not `suffix` itself). Exact names win over patterns, and a longer
//! suffix wins over a shorter one. Matching is case-insensitive.

// foldhash: a fast seeded hasher; SipHash was 2.5% of the instructions per request
// (route, pool and metrics lookups).
use foldhash::HashMap;
use std::sync::Arc;

use crate::config::Route;

/// Where a route sends traffic: a host and, optionally, a pinned port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: Option<u16>,
}

impl Target {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`.
    pub fn parse(text: &str) -> Result<Target, String> {
        let text = text.trim();
        let (host, port) =
            split_host_port(text).ok_or_else(|| format!("`{text}` is not a host or host:port"))?;
        if host.is_empty() || host.contains(['/', ' ', '@']) {
            return Err(format!("`{text}` is not a host or host:port"));
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(format!("`{p}` in `{text}` is not a port")),
                Ok(p) => Some(p),
            },
        };
        Ok(Target {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Stands in for an invalid target while validation collects problems.
    pub(crate) fn placeholder() -> Target {
        Target {
            host: "invalid".into(),
            port: None,
        }
    }
}

/// Splits an authority into host and optional port text. The host of an IPv6
/// literal is returned without brackets; anything else in brackets is no
/// host (RFC 3986 section 3.2.2).
pub fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let close = rest.find(']')?;
        let host = &rest[..close];
        host.parse::<std::net::Ipv6Addr>().ok()?;
        let after = &rest[close + 1..];
        return match after.strip_prefix(':') {
            Some(port) => Some((host, Some(port))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((h, _)) if h.contains(':') => None, // bare IPv6 without brackets
        Some((h, p)) => Some((h, Some(p))),
        None => Some((authority, None)),
    }
}

/// Parses an authority (`host[:port]`) with a default port. The host is a
/// name of letters, digits, `.`, `-`, `_` and `~`, or an IP literal: what a
/// route can name. Anything else (user information, spaces, other bytes) is
/// no authority (RFC 9112 section 3.2: an invalid `Host` is a `400`).
pub fn parse_authority(authority: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = split_host_port(authority)?;
    // (An IP literal in brackets was checked by split_host_port.)
    let valid = authority.starts_with('[')
        || (!host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~')));
    if !valid {
        return None;
    }
    let port = match port {
        None => default_port,
        // Digits only: `u16::from_str` would also take `+80`.
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u16>().ok().filter(|p| *p != 0)?
        }
        Some(_) => return None,
    };
    // An IPv6 literal in its canonical text, as route hosts are kept.
    let host = match authority.starts_with('[') {
        true => host
            .parse::<std::net::Ipv6Addr>()
            .map_or_else(|_| host.to_ascii_lowercase(), |v6| v6.to_string()),
        false => host.to_ascii_lowercase(),
    };
    Some((host, port))
}

/// Whether a route `host` pattern (`name` or `*.suffix`) covers `name`.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => name.len() > suffix.len() && name.ends_with(suffix),
        None => pattern == name,
    }
}

/// Why a request was not given a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NoRoute,
    PortNotAllowed { route: String, port: u16 },
}

/// A granted route: the route and the upstream address to dial.
#[derive(Debug, Clone)]
pub struct Decision {
    pub route: Arc<Route>,
    /// The server's name when it is not the route's `to` host (an uplink
    /// session names the requested host); `None` costs no copy per request.
    pub upstream_name: Option<String>,
    pub upstream_port: u16,
    /// Reached through this uplinked relay's session rather than dialled.
    pub uplink: Option<String>,
}

impl Decision {
    /// The internal server's host (named to the next hop or the uplinked
    /// relay when there is one).
    pub fn upstream_host(&self) -> &str {
        self.upstream_name.as_deref().unwrap_or(&self.route.to.host)
    }

    /// The address to dial: the route's next hop, or the internal server.
    pub fn dial(&self) -> (&str, u16) {
        match &self.route.via {
            Some(via) => (&via.host, via.port),
            None => (self.upstream_host(), self.upstream_port),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    exact: HashMap<String, Arc<Route>>,
    /// `(".suffix", route)`, longest suffix first.
    patterns: Vec<(String, Arc<Route>)>,
    all: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> RouteTable {
        let mut table = RouteTable::default();
        for r in routes {
            let r = Arc::new(r);
            table.all.push(r.clone());
            match r.host.strip_prefix('*') {
                Some(suffix) => table.patterns.push((suffix.to_string(), r.clone())),
                None => {
                    table.exact.insert(r.host.clone(), r.clone());
                }
            }
        }
        table.patterns.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        table
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.all
    }

    /// The route for a host name (already lower case, no port).
    pub fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        let host = host.strip_suffix('.').unwrap_or(host);
        if let Some(r) = self.exact.get(host) {
            return Some(r);
        }
        self.patterns
            .iter()
            .find(|(_, r)| pattern_matches(&r.host, host))
            .map(|(_, r)| r)
    }

    /// Decides whether `host:port` may be reached, and where it goes.
    pub fn decide(&self, host: &str, port: u16) -> Result<Decision, Refusal> {
        let route = self.lookup(host).ok_or(Refusal::NoRoute)?;
        if !route.ports.contains(&port) {
            return Err(Refusal::PortNotAllowed {
                route: route.host.clone(),
                port,
            });
        }
        // Through a next hop, the hop is asked for what the client asked.
        let upstream_name = route.via.as_ref().map(|_| host.to_string());
        Ok(Decision {
            route: route.clone(),
            upstream_name,
            upstream_port: route.to.port.unwrap_or(port),
            uplink: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn route(host: &str, to: &str, ports: &[u16]) -> Route {
        Route {
            host: host.into(),
            to: Target::parse(to).unwrap(),
            ports: ports.to_vec(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            transparent: false,
            decompress: false,
            udp: false,
            via: None,
            tls: None,
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(vec![
            route("wiki.corp", "10.1.2.3", &[80, 443]),
            route("*.corp", "10.9.9.9", &[80]),
            route("*.lab.corp", "10.7.7.7:8081", &[80, 8080]),
            route("legacy.corp", "10.1.2.9:8081", &[80]),
        ])
    }

    #[test]
    fn decisions_by_table() {
        let t = table();
        type Case<'a> = (&'a str, u16, Result<(&'a str, u16), Refusal>);
        let cases: &[Case] = &[
            ("wiki.corp", 80, Ok(("10.1.2.3", 80))),
            ("wiki.corp", 443, Ok(("10.1.2.3", 443))),
            ("wiki.corp.", 80, Ok(("10.1.2.3", 80))),
            (
                "wiki.corp",
                22,
                Err(Refusal::PortNotAllowed {
                    route: "wiki.corp".into(),
                    port: 22,
                }),
            ),
            ("other.corp", 80, Ok(("10.9.9.9", 80))),
            ("deep.other.corp", 80, Ok(("10.9.9.9", 80))),
            ("x.lab.corp", 8080, Ok(("10.7.7.7", 8081))),
            ("legacy.corp", 80, Ok(("10.1.2.9", 8081))),
            ("corp", 80, Err(Refusal::NoRoute)),
            ("evilcorp", 80, Err(Refusal::NoRoute)),
            ("example.com", 80, Err(Refusal::NoRoute)),
        ];
        for (host, port, want) in cases {
            let got = t
                .decide(host, *port)
                .map(|d| (d.upstream_host().to_string(), d.upstream_port));
            let want = want.clone().map(|(h, p)| (h.to_string(), p));
            assert_eq!(got, want, "{host}:{port}");
        }
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("10.0.0.1:81").unwrap(),
            Target {
                host: "10.0.0.1".into(),
                port: Some(81)
            }
        );
        assert_eq!(
            Target::parse("[::1]:81").unwrap(),
            Target {
                host: "::1".into(),
                port: Some(81)
            }
        );
        assert_eq!(Target::parse("Db.Corp").unwrap().host, "db.corp");
        assert!(Target::parse("a:0").is_err());
        assert!(Target::parse("a:x").is_err());
        assert!(Target::parse("").is_err());
        assert!(Target::parse("http://a").is_err());
    }

    #[test]
    fn authorities_parse() {
        assert_eq!(parse_authority("a.b:81", 80), Some(("a.b".into(), 81)));
        assert_eq!(parse_authority("A.B", 80), Some(("a.b".into(), 80)));
        assert_eq!(parse_authority("[::1]:9", 80), Some(("::1".into(), 9)));
        assert_eq!(parse_authority("a:", 80), None);
        assert_eq!(parse_authority(":80", 80), None);
        assert_eq!(parse_authority("a:99999", 80), None);
        // Found by the udp_capsules fuzz target: `[[\0\u{6}[...]:11` was a
        // host `[\0\u{6}[...` (brackets are for IPv6 literals only).
        assert_eq!(parse_authority("[[\0\u{6}[ppHH]:11", 80), None);
        assert_eq!(parse_authority("[app.test]:443", 80), None);
        assert_eq!(parse_authority("a.test:+80", 80), None);
        assert_eq!(
            parse_authority("[2001:db8::1]", 80),
            Some(("2001:db8::1".into(), 80))
        );
    }
}
