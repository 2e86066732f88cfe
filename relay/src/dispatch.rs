//! Dispatch on one port. Two decisions, both pure:
//!
//! 1. [`classify_bytes`]: what protocol the first bytes of a connection speak
//!    (TLS, HTTP/2 prior knowledge, HTTP/1, or nothing we serve);
//! 2. [`classify_request`]: what a request head asks for: a `CONNECT` tunnel,
//!    the relay's own endpoints, or an HTTP relay to a route's host.
//!
//! Dispatch never dials and never writes; it only decides.

use std::net::SocketAddr;

use crate::codec::{FieldName, RequestHead};
use crate::routes::{parse_authority, split_host_port};

/// What a connection speaks, judged by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// A TLS record (`0x16`): a ClientHello.
    Tls,
    /// The HTTP/2 connection preface (`PRI * HTTP/2.0`).
    H2PriorKnowledge,
    /// An HTTP/1 request line.
    Http1,
    /// More bytes are needed to decide.
    NeedMore,
    /// Not a protocol this port serves.
    Unknown,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Classifies the first bytes of a connection.
pub fn classify_bytes(first: &[u8]) -> Protocol {
    match first.first() {
        None => Protocol::NeedMore,
        Some(0x16) => Protocol::Tls,
        Some(b'P') if H2_PREFACE.starts_with(&first[..first.len().min(H2_PREFACE.len())]) => {
            if first.len() >= H2_PREFACE.len() {
                Protocol::H2PriorKnowledge
            } else if first.len() >= 4 && !first.starts_with(b"PRI ") {
                Protocol::Http1
            } else {
                Protocol::NeedMore
            }
        }
        // Request lines start with a method token (RFC 9110 section 9);
        // leading CRLFs are tolerated by the head reader.
        Some(b) if b.is_ascii_alphabetic() || *b == b'\r' || *b == b'\n' => Protocol::Http1,
        Some(_) => Protocol::Unknown,
    }
}

/// Where an HTTP relay goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// Lower-cased host, no port.
    pub host: String,
    pub port: u16,
    /// For absolute-form requests, the authority to put in `Host`; `None` keeps the client's `Host`.
    pub authority: Option<String>,
    /// The origin-form target to send.
    pub path: String,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    Connect {
        host: String,
        port: u16,
    },
    /// The relay's own endpoints, with the origin-form target.
    Own {
        path: String,
    },
    /// An inside relay's uplink connection: control, or data for a session.
    Uplink {
        data: bool,
    },
    /// CONNECT-UDP (RFC 9298) to `host:port`, asked of the relay itself.
    Udp {
        host: String,
        port: u16,
    },
    Relay(RelayTarget),
}

/// Who the relay is: requests for these hosts are its own.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// The relay's `name` (lower case).
    pub name: &'a str,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// An uplink's data connection (`ConnCtx::uplink_session`): a
    /// CONNECT-UDP is this relay's whatever its `Host` says.
    pub uplink_session: bool,
}

impl Identity<'_> {
    /// Whether `host:port` names this relay (the shim asks the same of itself).
    pub fn is_own(&self, host: &str, port: u16) -> bool {
        // A fully qualified `name.` is the same name, as for routes.
        let host = host.strip_suffix('.').unwrap_or(host);
        if host == self.name {
            return true;
        }
        port == self.local.port()
            && (host.parse::<std::net::IpAddr>().ok() == Some(self.local.ip())
                || (host == "localhost" && self.local.ip().is_loopback()))
    }
}

/// The `host:port` of a `CONNECT` (HTTP/1 request target or HTTP/2
/// `:authority`); `Err` is the reason for a `400`.
pub fn connect_target(target: &str) -> Result<(String, u16), &'static str> {
    const BAD: &str = "CONNECT target must be host:port";
    if !matches!(split_host_port(target), Some((_, Some(_)))) || target.contains('/') {
        return Err(BAD);
    }
    parse_authority(target, 0).ok_or(BAD)
}

/// Decides what a request head asks for. `Err` is the reason for a `400`.
pub fn classify_request(head: &RequestHead, me: Identity<'_>) -> Result<RequestKind, &'static str> {
    let method = head.method();
    let target = head.target();
    // RFC 9112 section 3.2: no form of request target has a fragment, and
    // the asterisk form is for OPTIONS only.
    if target.contains('#') {
        return Err("a fragment (#) in the request target");
    }
    if target == "*" && method != "OPTIONS" {
        return Err("the request target * is for OPTIONS only");
    }

    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = connect_target(target)?;
        return Ok(RequestKind::Connect { host, port });
    }

    if let Some(rest) = strip_scheme(target, "http://") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..end];
        if authority.contains('@') {
            return Err("user information in the request target");
        }
        let (host, port) =
            parse_authority(authority, 80).ok_or("invalid authority in the request target")?;
        // The target's authority wins over Host (RFC 9112 3.2.2), but an
        // HTTP/1.1 request still needs exactly one (RFC 9112 3.2).
        let mut hosts = head.fields.get_all(FieldName::Host);
        match (hosts.next(), hosts.next()) {
            (_, Some(_)) => return Err("more than one Host header"),
            (None, _) if head.minor >= 1 => return Err("missing Host header"),
            _ => {}
        }
        let path = match &rest[end..] {
            "" if method.eq_ignore_ascii_case("OPTIONS") => "*".to_string(),
            "" => "/".to_string(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_string(),
        };
        if me.is_own(&host, port) {
            return Ok(own(head, &path));
        }
        return Ok(RequestKind::Relay(RelayTarget {
            host,
            port,
            authority: Some(authority.to_string()),
            path,
        }));
    }
    if strip_scheme(target, "https://").is_some() {
        return Err("https:// request targets are not relayed; use CONNECT");
    }

    // An uplink upgrade is for this relay whatever its Host says: an inside
    // relay may reach it through a proxy or a name the relay does not know.
    match own(head, target) {
        RequestKind::Uplink { data } => return Ok(RequestKind::Uplink { data }),
        udp @ RequestKind::Udp { .. } if me.uplink_session => return Ok(udp),
        _ => {}
    }
    if target.starts_with('/') || target == "*" {
        let mut hosts = head.fields.get_all(FieldName::Host);
        let host_value = hosts.next().ok_or("missing Host header")?;
        if hosts.next().is_some() {
            return Err("more than one Host header");
        }
        let host_text = std::str::from_utf8(host_value).map_err(|_| "invalid Host header")?;
        let (host, port) = parse_authority(host_text.trim(), 80).ok_or("invalid Host header")?;
        if me.is_own(&host, port) {
            return Ok(own(head, target));
        }
        return Ok(RequestKind::Relay(RelayTarget {
            host,
            port,
            authority: None,
            path: target.to_string(),
        }));
    }
    Err("invalid request target")
}

/// A request for the relay itself: an uplink upgrade, or an endpoint.
fn own(head: &RequestHead, path: &str) -> RequestKind {
    let upgrading = head.fields.has_token(FieldName::Connection, "upgrade");
    let protocol = |p: &str| upgrading && head.fields.has_token(FieldName::Upgrade, p);
    match path {
        crate::uplink::CONTROL_PATH if protocol(crate::uplink::CONTROL_PROTOCOL) => {
            RequestKind::Uplink { data: false }
        }
        crate::uplink::DATA_PATH if protocol(crate::uplink::DATA_PROTOCOL) => {
            RequestKind::Uplink { data: true }
        }
        // RFC 9298 section 3.2: a GET.
        _ if protocol(crate::udp::PROTOCOL) && head.method() == "GET" => {
            match crate::udp::target(path) {
                Some((host, port)) => RequestKind::Udp { host, port },
                None => RequestKind::Own {
                    path: path.to_string(),
                },
            }
        }
        _ => RequestKind::Own {
            path: path.to_string(),
        },
    }
}

fn strip_scheme<'a>(target: &'a str, scheme: &str) -> Option<&'a str> {
    let head = target.get(..scheme.len())?;
    head.eq_ignore_ascii_case(scheme)
        .then(|| &target[scheme.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::parse_request_head;
    use bytes::Bytes;

    fn classify(text: &str) -> Result<RequestKind, &'static str> {
        classify_as(text, false)
    }

    fn classify_as(text: &str, uplink_session: bool) -> Result<RequestKind, &'static str> {
        let head = parse_request_head(Bytes::copy_from_slice(text.as_bytes()), 100).unwrap();
        let me = Identity {
            name: "relay.test",
            local: "127.0.0.1:8080".parse().unwrap(),
            uplink_session,
        };
        classify_request(&head, me)
    }

    fn relay(
        host: &str,
        port: u16,
        authority: Option<&str>,
        path: &str,
    ) -> Result<RequestKind, &'static str> {
        Ok(RequestKind::Relay(RelayTarget {
            host: host.into(),
            port,
            authority: authority.map(String::from),
            path: path.into(),
        }))
    }

    #[test]
    fn request_kinds_by_table() {
        let own = |p: &str| Ok(RequestKind::Own { path: p.into() });
        let cases: Vec<(&str, Result<RequestKind, &'static str>)> = vec![
            (
                "CONNECT db.test:5432 HTTP/1.1\r\n\r\n",
                Ok(RequestKind::Connect {
                    host: "db.test".into(),
                    port: 5432,
                }),
            ),
            (
                "CONNECT [::1]:22 HTTP/1.1\r\n\r\n",
                Ok(RequestKind::Connect {
                    host: "::1".into(),
                    port: 22,
                }),
            ),
            (
                "CONNECT db.test HTTP/1.1\r\n\r\n",
                Err("CONNECT target must be host:port"),
            ),
            (
                "GET http://App.Test:81/x?y HTTP/1.1\r\nHost: relay.test\r\n\r\n",
                relay("app.test", 81, Some("App.Test:81"), "/x?y"),
            ),
            (
                "GET http://app.test HTTP/1.1\r\nHost: h\r\n\r\n",
                relay("app.test", 80, Some("app.test"), "/"),
            ),
            (
                "GET http://app.test?q HTTP/1.1\r\nHost: h\r\n\r\n",
                relay("app.test", 80, Some("app.test"), "/?q"),
            ),
            (
                "OPTIONS http://app.test HTTP/1.1\r\nHost: h\r\n\r\n",
                relay("app.test", 80, Some("app.test"), "*"),
            ),
            (
                "GET http://u:p@app.test/ HTTP/1.1\r\nHost: h\r\n\r\n",
                Err("user information in the request target"),
            ),
            (
                "GET https://app.test/ HTTP/1.1\r\nHost: h\r\n\r\n",
                Err("https:// request targets are not relayed; use CONNECT"),
            ),
            (
                "GET /x HTTP/1.1\r\nHost: legacy.test\r\n\r\n",
                relay("legacy.test", 80, None, "/x"),
            ),
            ("GET /x HTTP/1.1\r\n\r\n", Err("missing Host header")),
            ("GET http://a.test/x HTTP/1.1\r\n\r\n", Err("missing Host header")),
            (
                "GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
                Err("more than one Host header"),
            ),
            ("GET http://a.test/x HTTP/1.0\r\n\r\n", relay("a.test", 80, Some("a.test"), "/x")),
            (
                "GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                Err("more than one Host header"),
            ),
            (
                "GET /events/t HTTP/1.1\r\nHost: relay.test\r\n\r\n",
                own("/events/t"),
            ),
            (
                "GET /events/t HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
                own("/events/t"),
            ),
            // The relay's name written fully qualified.
            (
                "GET /events/t HTTP/1.1\r\nHost: relay.test.\r\n\r\n",
                own("/events/t"),
            ),
            (
                "GET http://relay.test.:80/services HTTP/1.1\r\nHost: h\r\n\r\n",
                own("/services"),
            ),
            (
                "GET http://relay.test/services HTTP/1.1\r\nHost: h\r\n\r\n",
                own("/services"),
            ),
            ("GET http://127.0.0.1:8080/ HTTP/1.1\r\nHost: h\r\n\r\n", own("/")),
            (
                "GET http://127.0.0.1:8081/ HTTP/1.1\r\nHost: h\r\n\r\n",
                relay("127.0.0.1", 8081, Some("127.0.0.1:8081"), "/"),
            ),
            ("GET x HTTP/1.1\r\n\r\n", Err("invalid request target")),
            ("GET /.porthole/uplink HTTP/1.1\r\nHost: relay.test\r\nConnection: Upgrade\r\nUpgrade: porthole-uplink/1\r\n\r\n", Ok(RequestKind::Uplink { data: false })),
            ("GET /.porthole/uplink/data HTTP/1.1\r\nHost: elsewhere:1\r\nConnection: Upgrade\r\nUpgrade: porthole-uplink-data/1\r\n\r\n", Ok(RequestKind::Uplink { data: true })),
            ("GET /.porthole/uplink HTTP/1.1\r\nHost: relay.test\r\n\r\n", own("/.porthole/uplink")),
            // The audit's M1-M3: what no valid request has.
            ("GET /f#frag HTTP/1.1\r\nHost: a.test\r\n\r\n", Err("a fragment (#) in the request target")),
            ("GET http://a.test/f#frag HTTP/1.1\r\nHost: h\r\n\r\n", Err("a fragment (#) in the request target")),
            ("GET * HTTP/1.1\r\nHost: a.test\r\n\r\n", Err("the request target * is for OPTIONS only")),
            ("GET / HTTP/1.1\r\nHost: u@a.test:81\r\n\r\n", Err("invalid Host header")),
            ("GET / HTTP/1.1\r\nHost: <script>\r\n\r\n", Err("invalid Host header")),
            ("GET / HTTP/1.1\r\nHost: a.test :81\r\n\r\n", Err("invalid Host header")),
            ("GET http://<b>x</b>/ HTTP/1.1\r\nHost: h\r\n\r\n", Err("invalid authority in the request target")),
            ("GET http://[::1]:81/ HTTP/1.1\r\nHost: h\r\n\r\n", relay("::1", 81, Some("[::1]:81"), "/")),
            ("GET http://[nope]:81/ HTTP/1.1\r\nHost: h\r\n\r\n", Err("invalid authority in the request target")),
            ("GET / HTTP/1.1\r\nHost: under_score.test\r\n\r\n", relay("under_score.test", 80, None, "/")),
        ];
        for (text, want) in cases {
            assert_eq!(classify(text), want, "{text:?}");
        }
    }

    /// A CONNECT-UDP for another host is relayed as an upgrade, except on an
    /// uplink's data connection, where it is the outside relay's, for this relay.
    #[test]
    fn connect_udp_on_an_uplink_session_is_for_this_relay_whatever_its_host() {
        let udp = |host: &str| {
            format!("GET /.well-known/masque/udp/voice.corp/5060/ HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\n\r\n")
        };
        let session = Ok(RequestKind::Udp {
            host: "voice.corp".into(),
            port: 5060,
        });
        assert_eq!(classify(&udp("relay.test")), session);
        assert_eq!(
            classify(&udp("plant-3")),
            relay(
                "plant-3",
                80,
                None,
                "/.well-known/masque/udp/voice.corp/5060/"
            )
        );
        assert_eq!(classify_as(&udp("plant-3"), true), session);
        // Other requests on a session keep their Host.
        assert_eq!(
            classify_as("GET /x HTTP/1.1\r\nHost: erp.plant3\r\n\r\n", true),
            relay("erp.plant3", 80, None, "/x")
        );
    }

    #[test]
    fn first_bytes() {
        assert_eq!(classify_bytes(b""), Protocol::NeedMore);
        assert_eq!(classify_bytes(&[0x16, 3, 1]), Protocol::Tls);
        assert_eq!(classify_bytes(b"GET / HTTP/1.1"), Protocol::Http1);
        assert_eq!(
            classify_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Protocol::H2PriorKnowledge
        );
        assert_eq!(classify_bytes(b"PRI * HT"), Protocol::NeedMore);
        assert_eq!(classify_bytes(b"PUT /x"), Protocol::Http1);
        assert_eq!(classify_bytes(b"POST"), Protocol::Http1);
        assert_eq!(classify_bytes(b"\x00\x01"), Protocol::Unknown);
    }
}
