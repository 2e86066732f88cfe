//! What went wrong with a request, whose fault it was, and — in exactly one
//! place, [`RelayError::status`] — which status code the client gets.

use std::fmt;
use std::io;

use crate::rules::Denial;

/// Who caused a failure; decides the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Internal,
}

#[derive(Debug)]
pub enum ErrorKind {
    /// No route for the host.
    NoRoute { host: String },
    /// The route exists but the port is not among its `ports`.
    PortNotAllowed { port: u16 },
    /// The request already passed through this relay.
    Loop,
    /// The request head exceeded `max_head_bytes` or `max_headers`.
    HeadTooLarge,
    /// The request line alone exceeded `max_head_bytes`: the target is too long.
    UriTooLong,
    /// A request body in a transfer coding the relay does not handle
    /// (anything but `chunked`); its body is unread, so the connection closes.
    UnsupportedCoding,
    /// The request head did not arrive within `head_timeout`.
    HeadTimeout,
    /// The client's request body stalled: no byte for `body_timeout`.
    BodyTimeout,
    /// The request is malformed or ambiguous.
    BadRequest(&'static str),
    /// The relay's own endpoints have nothing at this path.
    NotFound,
    /// The upstream name did not resolve.
    Resolve { upstream: String, cause: io::Error },
    /// Dialling the upstream failed.
    Connect { upstream: String, cause: io::Error },
    /// Dialling the upstream took longer than `connect_timeout`.
    ConnectTimeout { upstream: String },
    /// No response head within `response_timeout`.
    ResponseTimeout { upstream: String },
    /// The upstream took no byte of the request body for `response_timeout`.
    SendTimeout { upstream: String },
    /// The upstream sent something that is not a valid HTTP/1 response, or closed early.
    BadResponse { upstream: String, cause: String },
    /// The relay's own endpoint exists but not for this method.
    MethodNotAllowed { allow: &'static str },
    /// A topic name outside `[A-Za-z0-9._-]{1,128}`.
    BadTopic,
    /// A bad poll parameter (`after`, `wait`, `Last-Event-ID`).
    BadPoll(&'static str),
    /// A published body that is not one JSON value; the parser's reason.
    NotJson(String),
    /// A published body over `events.max_event_bytes`.
    EventTooLarge { limit: usize },
    /// `events.max_pollers_per_topic` or `events.max_pollers` reached.
    PollersFull { topic: String, limit: &'static str },
    /// The event store failed (its error names the store and the topic);
    /// nothing was stored, a retry is safe.
    EventStore(crate::events::StoreError),
    /// A publication reached the event store and got no answer: the event
    /// may be stored, so a blind retry could store it twice.
    EventOutcomeUnknown(crate::events::StoreError),
    /// The TLS handshake with the upstream failed (verification, protocol).
    UpstreamTls { upstream: String, cause: String },
    /// No valid `Proxy-Authorization` where one is needed.
    ProxyAuthRequired { realm: String, why: &'static str },
    /// An access rule refused the request.
    Forbidden(Denial),
    /// Over `max_requests_per_second_per_client`; retry after this many seconds.
    TooManyRequests { retry_after: u64 },
    /// Plain HTTP on a port with `[tls] require = true`.
    TlsRequired,
    /// A request this relay does not carry this way (UDP through an uplink
    /// or a next hop).
    NotImplemented(&'static str),
}

/// A failed request: the kind, and the route it was for when one was chosen.
#[derive(Debug)]
pub struct RelayError {
    pub kind: ErrorKind,
    pub route: Option<String>,
}

impl RelayError {
    pub fn new(kind: ErrorKind) -> Self {
        RelayError { kind, route: None }
    }

    pub fn on_route(kind: ErrorKind, route: &str) -> Self {
        RelayError {
            kind,
            route: Some(route.to_string()),
        }
    }

    /// The status code the client gets. The only place that chooses one for an error.
    pub fn status(&self) -> u16 {
        use ErrorKind::*;
        match self.kind {
            NoRoute { .. } | PortNotAllowed { .. } | Forbidden(_) => 403,
            Loop => 508,
            HeadTooLarge => 431,
            UriTooLong => 414,
            UnsupportedCoding => 501,
            HeadTimeout | BodyTimeout => 408,
            BadRequest(_) | TlsRequired => 400,
            NotImplemented(_) => 501,
            NotFound => 404,
            ProxyAuthRequired { .. } => 407,
            TooManyRequests { .. } => 429,
            Resolve { .. }
            | Connect { .. }
            | ConnectTimeout { .. }
            | BadResponse { .. }
            | UpstreamTls { .. } => 502,
            ResponseTimeout { .. } | SendTimeout { .. } | EventOutcomeUnknown(_) => 504,
            MethodNotAllowed { .. } => 405,
            BadTopic | BadPoll(_) | NotJson(_) => 400,
            EventTooLarge { .. } => 413,
            PollersFull { .. } | EventStore(_) => 503,
        }
    }

    /// `Retry-After` for refusals that pass: the client may try again shortly.
    pub fn retry_after(&self) -> Option<&'static str> {
        match self.kind {
            ErrorKind::PollersFull { .. } | ErrorKind::EventStore(_) => Some("1"),
            _ => None,
        }
    }

    /// Header fields the status needs (`Proxy-Authenticate` with `407`,
    /// `Retry-After` with `429`); chosen here, beside the status.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match &self.kind {
            ErrorKind::ProxyAuthRequired { realm, .. } => {
                vec![("Proxy-Authenticate", format!("Basic realm=\"{realm}\""))]
            }
            ErrorKind::TooManyRequests { retry_after } => {
                vec![("Retry-After", retry_after.to_string())]
            }
            ErrorKind::MethodNotAllowed { allow } => vec![("Allow", allow.to_string())],
            _ => match self.retry_after() {
                Some(secs) => vec![("Retry-After", secs.to_string())],
                None => Vec::new(),
            },
        }
    }

    pub fn fault(&self) -> Fault {
        use ErrorKind::*;
        match self.kind {
            NoRoute { .. }
            | PortNotAllowed { .. }
            | Loop
            | HeadTooLarge
            | UriTooLong
            | UnsupportedCoding
            | HeadTimeout
            | BodyTimeout
            | BadRequest(_)
            | NotFound
            | MethodNotAllowed { .. }
            | BadTopic
            | BadPoll(_)
            | NotJson(_)
            | EventTooLarge { .. }
            | PollersFull { .. } => Fault::Client,
            EventStore(_) | EventOutcomeUnknown(_) => Fault::Internal,
            ProxyAuthRequired { .. }
            | Forbidden(_)
            | TooManyRequests { .. }
            | TlsRequired
            | NotImplemented(_) => Fault::Client,
            Resolve { .. }
            | Connect { .. }
            | ConnectTimeout { .. }
            | ResponseTimeout { .. }
            | SendTimeout { .. }
            | BadResponse { .. }
            | UpstreamTls { .. } => Fault::Upstream,
        }
    }

    /// For failures to reach the internal server: the cause, as a metric label.
    pub fn connect_failure(&self) -> Option<&'static str> {
        match &self.kind {
            ErrorKind::Resolve { .. } => Some("resolve"),
            ErrorKind::Connect { cause, .. }
                if cause.kind() == io::ErrorKind::ConnectionRefused =>
            {
                Some("refused")
            }
            ErrorKind::Connect { .. } => Some("connect"),
            ErrorKind::ConnectTimeout { .. } => Some("timeout"),
            _ => None,
        }
    }

    /// Whether the client connection must close after the error response.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::HeadTooLarge
                | ErrorKind::UriTooLong
                | ErrorKind::UnsupportedCoding
                | ErrorKind::HeadTimeout
                | ErrorKind::BodyTimeout
                | ErrorKind::SendTimeout { .. }
                | ErrorKind::BadRequest(_)
        )
    }

    /// The plain-text body: status, route and cause. Never contains secrets:
    /// only names, addresses and OS error texts go in.
    pub fn body(&self) -> String {
        let reason = reason_phrase(self.status());
        match &self.route {
            Some(route) => format!("{} {reason}: route {route}: {self}\n", self.status()),
            None => format!("{} {reason}: {self}\n", self.status()),
        }
    }
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ErrorKind::*;
        match &self.kind {
            NoRoute { host } => write!(f, "no route for host {host}"),
            PortNotAllowed { port } => write!(f, "port {port} is not allowed"),
            Loop => write!(f, "request loop: this relay is already in Via"),
            HeadTooLarge => write!(f, "request head too large, or too many header fields"),
            UriTooLong => write!(f, "request target too long"),
            UnsupportedCoding => write!(f, "{}", crate::codec::UNSUPPORTED_CODING),
            HeadTimeout => write!(f, "request head not received in time"),
            BodyTimeout => write!(
                f,
                "request body stalled: no byte within limits.body_timeout"
            ),
            BadRequest(why) => write!(f, "bad request: {why}"),
            NotFound => write!(f, "no such endpoint on this relay"),
            Resolve { upstream, cause } => write!(f, "cannot resolve {upstream}: {cause}"),
            Connect { upstream, cause } => write!(f, "connect to {upstream} failed: {cause}"),
            ConnectTimeout { upstream } => write!(f, "connect to {upstream} timed out"),
            ResponseTimeout { upstream } => write!(f, "no response from {upstream} in time"),
            SendTimeout { upstream } => {
                write!(f, "{upstream} took no byte of the request body in time")
            }
            BadResponse { upstream, cause } => write!(f, "bad response from {upstream}: {cause}"),
            MethodNotAllowed { allow } => write!(f, "method not allowed here (allowed: {allow})"),
            BadTopic => write!(f, "topic names are 1 to 128 of A-Z a-z 0-9 . _ -"),
            BadPoll(why) => write!(f, "bad poll: {why}"),
            NotJson(why) => write!(f, "the body is not one JSON value: {why}"),
            EventTooLarge { limit } => {
                write!(f, "event over {limit} bytes (events.max_event_bytes)")
            }
            PollersFull { topic, limit } => write!(f, "too many pollers ({limit}), topic {topic}"),
            EventStore(e) => write!(f, "{e}"),
            EventOutcomeUnknown(e) => write!(
                f,
                "{e}; outcome unknown: the event may have been stored, poll the topic before publishing it again"
            ),
            UpstreamTls { upstream, cause } => write!(f, "TLS with {upstream} failed: {cause}"),
            ProxyAuthRequired { why, .. } => write!(f, "proxy authentication required: {why}"),
            Forbidden(denial) => write!(f, "{denial}"),
            TooManyRequests { retry_after } => write!(
                f,
                "too many requests from your address; retry in {retry_after} s"
            ),
            TlsRequired => write!(f, "this port requires TLS: use https:// for the proxy"),
            NotImplemented(what) => write!(f, "not implemented: {what}"),
        }
    }
}

impl std::error::Error for RelayError {}

/// Standard reason phrases for the codes the relay produces or commonly relays.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        508 => "Loop Detected",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_by_kind() {
        let up = || "10.0.0.1:80".to_string();
        let cases = [
            (ErrorKind::NoRoute { host: "x".into() }, 403),
            (ErrorKind::PortNotAllowed { port: 22 }, 403),
            (ErrorKind::Loop, 508),
            (ErrorKind::HeadTooLarge, 431),
            (ErrorKind::HeadTimeout, 408),
            (ErrorKind::BodyTimeout, 408),
            (ErrorKind::SendTimeout { upstream: up() }, 504),
            (ErrorKind::BadRequest("x"), 400),
            (ErrorKind::NotFound, 404),
            (
                ErrorKind::Connect {
                    upstream: up(),
                    cause: io::ErrorKind::ConnectionRefused.into(),
                },
                502,
            ),
            (ErrorKind::ConnectTimeout { upstream: up() }, 502),
            (ErrorKind::ResponseTimeout { upstream: up() }, 504),
            (ErrorKind::BadTopic, 400),
            (ErrorKind::NotJson("x".into()), 400),
            (ErrorKind::EventTooLarge { limit: 1 }, 413),
            (
                ErrorKind::PollersFull {
                    topic: "t".into(),
                    limit: "events.max_pollers",
                },
                503,
            ),
            (ErrorKind::MethodNotAllowed { allow: "GET" }, 405),
            (
                ErrorKind::UpstreamTls {
                    upstream: up(),
                    cause: "x".into(),
                },
                502,
            ),
            (
                ErrorKind::ProxyAuthRequired {
                    realm: "r".into(),
                    why: "x",
                },
                407,
            ),
            (ErrorKind::Forbidden(Denial::NoRule), 403),
            (ErrorKind::TooManyRequests { retry_after: 1 }, 429),
            (ErrorKind::TlsRequired, 400),
            (ErrorKind::NotImplemented("x"), 501),
        ];
        for (kind, status) in cases {
            assert_eq!(RelayError::new(kind).status(), status);
        }
    }

    #[test]
    fn headers_go_with_their_statuses() {
        let auth = RelayError::new(ErrorKind::ProxyAuthRequired {
            realm: "corp".into(),
            why: "credentials required",
        });
        assert_eq!(
            auth.headers(),
            vec![("Proxy-Authenticate", "Basic realm=\"corp\"".to_string())]
        );
        let slow = RelayError::new(ErrorKind::TooManyRequests { retry_after: 2 });
        assert_eq!(slow.headers(), vec![("Retry-After", "2".to_string())]);
        let rule = RelayError::new(ErrorKind::Forbidden(Denial::Rule(2)));
        assert_eq!(rule.body(), "403 Forbidden: access refused by rule[2]\n");
        assert!(rule.headers().is_empty());
    }

    /// A store that stored nothing: 503, retry after 1 s. A publication
    /// that may be stored: 504, no Retry-After, and the body says so.
    #[test]
    fn event_store_failures_tell_whether_a_retry_is_safe() {
        use crate::events::StoreError;
        let none = RelayError::new(ErrorKind::EventStore(StoreError::new(
            "redis",
            "r1",
            "Connection refused",
        )));
        assert_eq!((none.status(), none.retry_after()), (503, Some("1")));
        let maybe = RelayError::new(ErrorKind::EventOutcomeUnknown(StoreError::outcome_unknown(
            "redis",
            "r1",
            "no answer from redis within 3s",
        )));
        assert_eq!((maybe.status(), maybe.retry_after()), (504, None));
        assert!(maybe.headers().is_empty());
        assert_eq!(maybe.fault(), Fault::Internal);
        assert_eq!(
            maybe.body(),
            "504 Gateway Timeout: redis event store, topic r1: no answer from redis within 3s; \
             outcome unknown: the event may have been stored, poll the topic before publishing it again\n"
        );
    }

    #[test]
    fn body_names_route_and_cause() {
        let e = RelayError::on_route(
            ErrorKind::ConnectTimeout {
                upstream: "10.0.0.1:80".into(),
            },
            "wiki.corp",
        );
        assert_eq!(
            e.body(),
            "502 Bad Gateway: route wiki.corp: connect to 10.0.0.1:80 timed out\n"
        );
    }
}
