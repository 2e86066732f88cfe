//! Rewriting heads as they cross the relay (RFC 9110 sections 7.6, 7.6.3):
//! origin-form request line, `Host` from the requested authority, hop-by-hop
//! fields removed, bodies re-framed, and the relay's `Via` entry appended.
//! Everything else is copied byte for byte, names in the case the peer wrote.

use crate::codec::{content_length, trim, FieldName, Fields, Framing, RequestHead, ResponseHead};

/// The comment that marks `Via` entries written by Porthole hops.
pub const VIA_MARK: &str = "(porthole)";

/// Fields that describe one connection only (RFC 9110 section 7.6.1), plus
/// the proxy credentials this relay consumes.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Whether a field goes no further than this hop: `known` is hop-by-hop, or
/// `name` is one the head's `Connection` lists besides
/// ([`Fields::connection_listed`]). (`Content-Length` is never copied
/// either: the relay writes its own, see [`BodyHeader`].)
fn is_hop_by_hop(known: FieldName, name: &[u8], listed: &[&[u8]]) -> bool {
    known.is_hop_by_hop() || listed.iter().any(|l| name.eq_ignore_ascii_case(l))
}

/// Removes hop-by-hop fields (and every name `Connection` lists) from a
/// header map: what an HTTP/2 hop may not carry. Used where heads cross
/// between HTTP/1 and HTTP/2 (the relay's h2 streams, the shim's link).
pub fn strip_hop_by_hop_map(headers: &mut http::HeaderMap) {
    let listed: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(listed.iter().map(String::as_str))
    {
        headers.remove(name);
    }
}

/// Whether `name` (our pseudonym) is already a `received-by` in `Via`: a loop.
pub fn via_contains(fields: &Fields, name: &str) -> bool {
    via_values_contain(fields.get_all(FieldName::Via), name)
}

/// The `Via` a tunnel request (`CONNECT`, CONNECT-UDP) carries to a next
/// hop: the entries it arrived with, then this relay's, so that a chain that
/// comes back to a relay is a loop it can see (`508`).
/// `arrived` is [`arrived_via`]'s.
pub fn hop_via(arrived: &str, name: &str) -> String {
    let mut out = String::from("Via: ");
    if !arrived.is_empty() {
        out.push_str(arrived);
        out.push_str(", ");
    }
    out.push_str("1.1 ");
    out.push_str(name);
    out.push_str(" (porthole)\r\n");
    out
}

/// The values of the `Via` fields a request arrived with, joined (`""` for
/// none): what a tunnel request carries on to a next hop.
pub fn arrived_via<'a>(values: impl Iterator<Item = &'a [u8]>) -> String {
    let values: Vec<String> = values
        .map(|v| String::from_utf8_lossy(v).trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    values.join(", ")
}

/// [`via_contains`] over the values of the `Via` fields (HTTP/2's too).
pub fn via_values_contain<'a>(values: impl Iterator<Item = &'a [u8]>, name: &str) -> bool {
    values
        .flat_map(|v| v.split(|b| *b == b','))
        .filter_map(|entry| {
            let mut words = trim(entry)
                .split(|b| *b == b' ' || *b == b'\t')
                .filter(|w| !w.is_empty());
            words.nth(1)
        })
        .any(|by| {
            let host = by.split(|b| *b == b':').next().unwrap_or(by);
            host.eq_ignore_ascii_case(name.as_bytes())
        })
}

/// A `Via` value without the entries Porthole hops added; `None` when nothing is left.
fn strip_porthole_via(value: &[u8]) -> Option<Vec<u8>> {
    let kept: Vec<&[u8]> = value
        .split(|b| *b == b',')
        .map(trim)
        .filter(|e| !e.is_empty() && !contains(e, VIA_MARK.as_bytes()))
        .collect();
    if kept.is_empty() {
        return None;
    }
    Some(kept.join(&b", "[..]))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How the relay will send the request body upstream. The framing fields
/// are always the relay's own: `Content-Length` written once as the value
/// it parsed, never copied, so that no `Connection` token can remove it and
/// no list form reaches a server that might read it otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyHeader {
    /// No body and no `Content-Length`.
    None,
    /// `Content-Length` (the client's, as parsed; 0 for an empty body the
    /// client framed so).
    Length(u64),
    /// Send `Transfer-Encoding: chunked`.
    Chunked,
}

/// What the request rewrite needs to know beyond the head itself.
#[derive(Debug, Clone, Copy)]
pub struct RequestRewrite<'a> {
    /// The relay's pseudonym.
    pub name: &'a str,
    /// The origin-form target to send (path and query).
    pub path: &'a str,
    /// Replace `Host` with this authority (absolute-form requests).
    pub host: Option<&'a str>,
    pub body: BodyHeader,
    /// Keep `Upgrade` and send `Connection: upgrade`.
    pub upgrade: bool,
    /// Strip Porthole's `Via` entries and add none.
    pub transparent: bool,
    /// This relay's `Proxy-Authorization` for the next hop (the client's
    /// never goes on: it is hop-by-hop).
    pub proxy_authorization: Option<&'a str>,
}

/// Builds the head the relay sends to the internal server.
pub fn request_head(req: &RequestHead, rw: &RequestRewrite<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(req.wire_len() + 64);
    out.extend_from_slice(req.method().as_bytes());
    out.push(b' ');
    out.extend_from_slice(rw.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");

    let listed = req.fields.connection_listed();
    let mut wrote_host = false;
    // This relay's `Via` entry goes on the last `Via` line there is, rather
    // than a line of its own, so that a head as many fields long as a hop's
    // `max_headers` still passes a chain of hops with the same limit.
    let via_at = (!rw.transparent)
        .then(|| last_via(&req.fields, &listed))
        .flatten();
    for (at, (known, name, value)) in req.fields.iter_known().enumerate() {
        if via_at == Some(at) {
            via_field(&mut out, name, value, req.minor, rw.name);
            continue;
        }
        if known == FieldName::Host {
            if wrote_host {
                continue;
            }
            wrote_host = true;
            match rw.host {
                Some(authority) => push_field(&mut out, name, authority.as_bytes()),
                None => push_field(&mut out, name, value),
            }
            continue;
        }
        if known == FieldName::Upgrade && rw.upgrade {
            push_field(&mut out, name, value);
            continue;
        }
        if is_hop_by_hop(known, name, &listed) || known == FieldName::ContentLength {
            continue;
        }
        if known == FieldName::MaxForwards {
            if let Some(n) = max_forwards(req) {
                // RFC 9110 section 7.6.2: one hop fewer (0 is answered here).
                push_field(&mut out, name, n.saturating_sub(1).to_string().as_bytes());
                continue;
            }
        }
        if known == FieldName::Via && rw.transparent {
            if let Some(kept) = strip_porthole_via(value) {
                if kept == value {
                    push_field(&mut out, name, value);
                } else {
                    push_field(&mut out, name, &kept);
                }
            }
            continue;
        }
        push_field(&mut out, name, value);
    }
    if !wrote_host {
        if let Some(authority) = rw.host {
            push_field(&mut out, b"Host", authority.as_bytes());
        }
    }
    if rw.upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    }
    match rw.body {
        BodyHeader::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        BodyHeader::Length(n) => length_line(&mut out, n),
        BodyHeader::None => {}
    }
    if let Some(credentials) = rw.proxy_authorization {
        push_field(&mut out, b"Proxy-Authorization", credentials.as_bytes());
    }
    if !rw.transparent && via_at.is_none() {
        via_line(&mut out, req.minor, rw.name);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The `Max-Forwards` of an `OPTIONS` or `TRACE` (the only methods it
/// applies to, RFC 9110 section 7.6.2), if it is a number.
pub fn max_forwards(req: &RequestHead) -> Option<u64> {
    if !matches!(req.method(), "OPTIONS" | "TRACE") {
        return None;
    }
    let value = trim(req.fields.get(FieldName::MaxForwards)?);
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// How the relay frames a request body it sends on, from the framing it read.
pub fn body_header(req: &RequestHead, framing: Framing) -> BodyHeader {
    match framing {
        Framing::Chunked => BodyHeader::Chunked,
        Framing::Length(n) => BodyHeader::Length(n),
        // An empty body the client framed with `Content-Length: 0` keeps it
        // (a server may want one on a POST); a GET or HEAD needs none.
        _ if !matches!(req.method(), "GET" | "HEAD")
            && req.fields.has(FieldName::ContentLength) =>
        {
            BodyHeader::Length(0)
        }
        _ => BodyHeader::None,
    }
}

/// The `Content-Length` a response goes on with when the relay does not
/// re-frame it: the length it read, or for a response without a body to
/// read (to a HEAD, a 304, a 0) the length it names.
pub fn response_length(resp: &ResponseHead, framing: Framing) -> Option<u64> {
    match framing {
        Framing::Length(n) => Some(n),
        Framing::Empty => content_length(&resp.fields).ok().flatten(),
        _ => None,
    }
}

/// `Content-Length: N`.
fn length_line(out: &mut Vec<u8>, n: u64) {
    {
        out.extend_from_slice(b"Content-Length: ");
        // The digits, without a String per message.
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = n;
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        out.extend_from_slice(&digits[at..]);
        out.extend_from_slice(b"\r\n");
    }
}

/// A `Date` field for now (RFC 9110 section 6.6.1: a relay forwards a
/// response without one with one added, and dates its own), formatted once a
/// second per thread.
pub fn date_line(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static NOW: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    NOW.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(b"Date: ");
        out.extend_from_slice(cached.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// A `Via` line with only this relay's entry.
fn via_line(out: &mut Vec<u8>, minor: u8, name: &str) {
    out.extend_from_slice(b"Via: ");
    via_entry(out, minor, name);
    out.extend_from_slice(b"\r\n");
}

/// `1.1 name (porthole)`: this relay's `Via` entry for a message of HTTP/1.`minor`.
fn via_entry(out: &mut Vec<u8>, minor: u8, name: &str) {
    out.extend_from_slice(if minor == 0 { b"1.0 " } else { b"1.1 " });
    out.extend_from_slice(name.as_bytes());
    out.push(b' ');
    out.extend_from_slice(VIA_MARK.as_bytes());
}

/// The index of the last `Via` field line in `fields` that goes on, if any
/// (`listed`: the names `Connection` lists, which do not).
fn last_via(fields: &Fields, listed: &[&[u8]]) -> Option<usize> {
    if !fields.has(FieldName::Via) || is_hop_by_hop(FieldName::Via, b"via", listed) {
        return None;
    }
    fields
        .iter_known()
        .rposition(|(known, _, _)| known == FieldName::Via)
}

/// A `Via` field line that arrived, with this relay's entry appended to its
/// list (RFC 9110 5.3: a list field's lines may be combined; 7.6.3: each
/// hop appends its entry).
fn via_field(out: &mut Vec<u8>, name: &[u8], value: &[u8], minor: u8, mine: &str) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    let value = trim(value);
    if !value.is_empty() {
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
    via_entry(out, minor, mine);
    out.extend_from_slice(b"\r\n");
}

/// How the relay frames the response body towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// As the server framed it: its `Content-Length` (as parsed; none on a
    /// `1xx` or `204`, RFC 9110 section 8.6), or none.
    Length(Option<u64>),
    /// Re-framed as chunked.
    Chunked,
    /// Delimited by closing the connection (HTTP/1.0 clients).
    Close,
}

#[derive(Debug, Clone, Copy)]
pub struct ResponseRewrite<'a> {
    pub name: &'a str,
    pub body: ResponseBody,
    /// The relay decodes the content coding: drop `Content-Encoding`.
    pub decoded: bool,
    /// `101 Switching Protocols`: keep `Upgrade`, send `Connection: upgrade`.
    pub upgrade: bool,
    /// The client connection stays open after this response.
    pub keep_alive: bool,
    /// The client spoke HTTP/1.0 (keep-alive must then be announced).
    pub client_minor: u8,
}

/// Builds the head the relay sends back to the client.
pub fn response_head(resp: &ResponseHead, rw: &ResponseRewrite<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(response_head_capacity(resp));
    response_head_into(&mut out, resp, rw);
    out
}

/// Room for the rewritten form of `resp`'s head: what the server sent plus
/// what the relay may add.
pub fn response_head_capacity(resp: &ResponseHead) -> usize {
    resp.wire_len() + 64
}

/// Appends the head the relay sends back to the client to `out` (which may
/// be sized to take a small body after it too).
pub fn response_head_into(out: &mut Vec<u8>, resp: &ResponseHead, rw: &ResponseRewrite<'_>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse accepts exactly three digits.
    let s = resp.status;
    out.extend_from_slice(&[
        b'0' + (s / 100 % 10) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(resp.reason());
    out.extend_from_slice(b"\r\n");
    let listed = resp.fields.connection_listed();
    let dated = resp.fields.has(FieldName::Date);
    let via_at = last_via(&resp.fields, &listed);

    for (at, (known, name, value)) in resp.fields.iter_known().enumerate() {
        if via_at == Some(at) {
            via_field(out, name, value, resp.minor, rw.name);
            continue;
        }
        if known == FieldName::Upgrade && rw.upgrade {
            push_field(out, name, value);
            continue;
        }
        if is_hop_by_hop(known, name, &listed) || known == FieldName::ContentLength {
            continue;
        }
        if known == FieldName::ContentEncoding && rw.decoded {
            continue;
        }
        push_field(out, name, value);
    }
    if rw.upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    } else if !rw.keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if rw.client_minor == 0 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    match rw.body {
        ResponseBody::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        ResponseBody::Length(Some(n)) if resp.status >= 200 && resp.status != 204 => {
            length_line(out, n)
        }
        _ => {}
    }
    if resp.status >= 200 && !dated {
        date_line(out);
    }
    if via_at.is_none() {
        via_line(out, resp.minor, rw.name);
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether a client's `Accept-Encoding` accepts gzip (RFC 9110 section 12.5.3).
pub fn accepts_gzip(fields: &Fields) -> bool {
    fields
        .get_all(FieldName::AcceptEncoding)
        .flat_map(|v| v.split(|b| *b == b','))
        .any(|item| {
            let mut parts = item.split(|b| *b == b';');
            let coding = trim(parts.next().unwrap_or(b""));
            let named = coding.eq_ignore_ascii_case(b"gzip")
                || coding.eq_ignore_ascii_case(b"x-gzip")
                || coding == b"*";
            let refused = parts.any(|p| {
                let p = trim(p);
                p.len() >= 2
                    && p[..2].eq_ignore_ascii_case(b"q=")
                    && trim(&p[2..]).iter().all(|b| *b == b'0' || *b == b'.')
            });
            named && !refused
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::parse_request_head;
    use bytes::Bytes;

    fn req(text: &str) -> RequestHead {
        parse_request_head(Bytes::copy_from_slice(text.as_bytes()), 100).unwrap()
    }

    fn rewrite(text: &str, rw: RequestRewrite<'_>) -> String {
        String::from_utf8(request_head(&req(text), &rw)).unwrap()
    }

    fn plain<'a>() -> RequestRewrite<'a> {
        RequestRewrite {
            name: "relay.test",
            path: "/x",
            host: Some("app.test:81"),
            body: BodyHeader::None,
            upgrade: false,
            transparent: false,
            proxy_authorization: None,
        }
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        let got = rewrite(
            "GET http://app.test:81/x HTTP/1.1\r\nHost: relay.test\r\nUser-Agent: t\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\n\r\n",
            plain(),
        );
        assert_eq!(
            got,
            "GET /x HTTP/1.1\r\nHost: app.test:81\r\nUser-Agent: t\r\nVia: 1.1 relay.test (porthole)\r\n\r\n"
        );
    }

    #[test]
    fn body_reframed_and_upgrade_kept() {
        let got = rewrite(
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            RequestRewrite {
                host: None,
                body: BodyHeader::Chunked,
                ..plain()
            },
        );
        assert_eq!(
            got,
            "POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nVia: 1.1 relay.test (porthole)\r\n\r\n"
        );
        let got = rewrite(
            "GET / HTTP/1.0\r\nhost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            RequestRewrite {
                host: None,
                upgrade: true,
                ..plain()
            },
        );
        assert_eq!(
            got,
            "GET /x HTTP/1.1\r\nhost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\nVia: 1.0 relay.test (porthole)\r\n\r\n"
        );
    }

    /// The framing fields are the relay's own, whatever the head says of
    /// them: a `Connection` token cannot take `Content-Length` away from a
    /// body that is sent (the audit's C1: the body became a second request
    /// on a pooled connection), and a list or a repeated field goes on as
    /// one value (C2).
    #[test]
    fn content_length_is_written_once_as_parsed() {
        let cases = [
            ("Connection: Content-Length\r\nContent-Length: 5\r\n", "5"),
            (
                "Connection: close, content-length\r\nContent-Length: 7\r\n",
                "7",
            ),
            ("Content-Length: 48, 48\r\n", "48"),
            ("Content-Length: 5\r\nContent-Length: 5\r\n", "5"),
            ("Content-Length: 0\r\n", "0"),
            ("Content-Length: 012\r\n", "12"),
        ];
        for (fields, length) in cases {
            let head = req(&format!("POST / HTTP/1.1\r\nHost: h\r\n{fields}\r\n"));
            let framing = crate::codec::request_framing(&head).unwrap();
            let rw = RequestRewrite {
                body: body_header(&head, framing),
                ..plain()
            };
            let got = String::from_utf8(request_head(&head, &rw)).unwrap();
            assert_eq!(
                got,
                format!("POST /x HTTP/1.1\r\nHost: app.test:81\r\nContent-Length: {length}\r\nVia: 1.1 relay.test (porthole)\r\n\r\n"),
                "{fields:?}"
            );
        }
        let got = rewrite("GET / HTTP/1.1\r\nHost: h\r\n\r\n", plain());
        assert!(
            !got.to_ascii_lowercase().contains("content-length"),
            "{got}"
        );

        let resp = |text: &str| {
            crate::codec::parse_response_head(Bytes::copy_from_slice(text.as_bytes()), 100).unwrap()
        };
        let out = |text: &str| {
            let head = resp(text);
            let framing = crate::codec::response_framing("GET", &head).unwrap();
            let rw = ResponseRewrite {
                name: "relay.test",
                body: ResponseBody::Length(response_length(&head, framing)),
                decoded: false,
                upgrade: false,
                keep_alive: true,
                client_minor: 1,
            };
            String::from_utf8(response_head(&head, &rw)).unwrap()
        };
        assert_eq!(
            out("HTTP/1.1 200 OK\r\nDate: d\r\nConnection: Content-Length\r\nContent-Length: 5, 5\r\n\r\n"),
            "HTTP/1.1 200 OK\r\nDate: d\r\nContent-Length: 5\r\nVia: 1.1 relay.test (porthole)\r\n\r\n"
        );
        // A 204 never has Content-Length (RFC 9110 section 8.6); a 304 keeps it.
        assert_eq!(
            out("HTTP/1.1 204 No Content\r\nDate: d\r\nContent-Length: 5\r\n\r\n"),
            "HTTP/1.1 204 No Content\r\nDate: d\r\nVia: 1.1 relay.test (porthole)\r\n\r\n"
        );
        assert_eq!(
            out("HTTP/1.1 304 Not Modified\r\nDate: d\r\nContent-Length: 9\r\n\r\n"),
            "HTTP/1.1 304 Not Modified\r\nDate: d\r\nContent-Length: 9\r\nVia: 1.1 relay.test (porthole)\r\n\r\n"
        );
        // A response without Date gets the relay's (RFC 9110 section 6.6.1).
        let dated = out("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let date = dated
            .lines()
            .find_map(|l| l.strip_prefix("Date: "))
            .unwrap_or_default();
        assert!(httpdate::parse_http_date(date).is_ok(), "{dated}");
    }

    #[test]
    fn transparent_strips_only_porthole_via() {
        let rw = RequestRewrite {
            host: None,
            transparent: true,
            proxy_authorization: None,
            ..plain()
        };
        let got = rewrite(
            "GET / HTTP/1.1\r\nHost: h\r\nVia: 1.1 app-proxy, 1.1 shim (porthole)\r\n\r\n",
            rw,
        );
        assert_eq!(
            got,
            "GET /x HTTP/1.1\r\nHost: h\r\nVia: 1.1 app-proxy\r\n\r\n"
        );
        let got = rewrite(
            "GET / HTTP/1.1\r\nHost: h\r\nVia: 1.1 shim (porthole)\r\nX: y\r\n\r\n",
            rw,
        );
        assert_eq!(got, "GET /x HTTP/1.1\r\nHost: h\r\nX: y\r\n\r\n");
    }

    #[test]
    fn loops_are_seen() {
        let r = req("GET / HTTP/1.1\r\nVia: 1.0 a, 1.1 Relay.Test:8080 (porthole)\r\n\r\n");
        assert!(via_contains(&r.fields, "relay.test"));
        assert!(!via_contains(&r.fields, "relay"));
        let r = req("GET / HTTP/1.1\r\nVia: 1.1 relay.test.other\r\n\r\n");
        assert!(!via_contains(&r.fields, "relay.test"));
    }

    #[test]
    fn gzip_acceptance() {
        let cases = [
            ("Accept-Encoding: gzip, br\r\n", true),
            ("Accept-Encoding: br\r\n", false),
            ("Accept-Encoding: gzip;q=0\r\n", false),
            ("Accept-Encoding: GZIP;q=0.5\r\n", true),
            ("Accept-Encoding: *\r\n", true),
            ("", false),
        ];
        for (line, want) in cases {
            let r = req(&format!("GET / HTTP/1.1\r\n{line}\r\n"));
            assert_eq!(accepts_gzip(&r.fields), want, "{line}");
        }
    }
}
