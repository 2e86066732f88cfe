//! Properties of the parsers of peer bytes, checked on any input: the fuzz
//! targets (`fuzz/`, nightly) and the property tests below (stable, run by
//! `cargo test`) call the same functions. Each takes arbitrary bytes and
//! panics when a property fails; an input that is not a valid message only
//! has to be refused without a panic.
//!
//! The first byte of an input is a control byte (how the bytes arrive, which
//! rewrite options apply); the rest is what a peer sends. Readers run over
//! in-memory bytes, so their futures complete at once and need no runtime.
//!
//! Compiled for tests and with the `props` feature (the fuzz crate's).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, ReadBuf};

use crate::codec::{
    parse_chunk_size, parse_request_head, read_request_head, read_response_head, request_framing,
    response_framing, write_data, write_end, BodyReader, Conn, FieldName, Framing, Item,
    OutFraming, RequestHead, ResponseHead,
};
use crate::dispatch::{classify_bytes, classify_request, connect_target, Identity, RequestKind};
use crate::rewrite::{request_head, response_head, RequestRewrite, ResponseBody, ResponseRewrite};
use crate::udp::{capsule, datagram_capsule, get_varint, put_varint, target, Capsule, PATH_PREFIX};

/// Head limits as in the default configuration.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Over the 64 fields parsed on the stack, so the second parse runs too.
const MAX_HEADERS: usize = 100;
const NAME: &str = "relay.test";

/// Bytes that arrive `step` at a time, never waiting.
struct Pieces<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// Runs `read` over `data` arriving `step` bytes at a time; returns its
/// outcome and how many bytes it consumed.
fn over<'a, T, F, Fut>(data: &'a [u8], step: usize, read: F) -> (T, usize)
where
    F: FnOnce(Conn<Pieces<'a>>) -> Fut,
    Fut: Future<Output = (T, Conn<Pieces<'a>>)>,
{
    let conn = Conn::new(Pieces { data, step });
    let (out, conn) = read(conn)
        .now_or_never()
        .expect("in-memory reads never wait");
    (out, data.len() - conn.buf.len() - conn.io.data.len())
}

/// An outcome of reading; what was consumed matters when it is a success
/// (after a failure the connection closes).
trait Outcome: std::fmt::Debug {
    fn success(&self) -> bool;
}

impl<T: std::fmt::Debug> Outcome for Result<T, String> {
    fn success(&self) -> bool {
        self.is_ok()
    }
}

/// The same outcome whether the bytes arrive at once or `step` at a time,
/// and on success the same bytes consumed.
fn same_in_pieces<'a, T, F, Fut>(data: &'a [u8], step: usize, read: F) -> T
where
    T: Outcome,
    F: Fn(Conn<Pieces<'a>>) -> Fut,
    Fut: Future<Output = (T, Conn<Pieces<'a>>)>,
{
    let (whole, used) = over(data, usize::MAX, &read);
    let (pieces, used_in_pieces) = over(data, step, &read);
    let how = format!("read at once, then {step} bytes at a time");
    assert_eq!(format!("{whole:?}"), format!("{pieces:?}"), "{how}");
    if whole.success() {
        assert_eq!(used, used_in_pieces, "bytes consumed, {how}");
    }
    whole
}

async fn request_of(mut conn: Conn<Pieces<'_>>) -> (Result<RequestHead, String>, Conn<Pieces<'_>>) {
    let head = read_request_head(&mut conn, MAX_HEAD_BYTES, MAX_HEADERS).await;
    (head.map_err(|e| format!("{e:?}")), conn)
}

async fn response_of(
    mut conn: Conn<Pieces<'_>>,
) -> (Result<ResponseHead, String>, Conn<Pieces<'_>>) {
    let head = read_response_head(&mut conn, MAX_HEAD_BYTES, MAX_HEADERS).await;
    (head.map_err(|e| format!("{e:?}")), conn)
}

/// A head's fields, as received.
type FieldList = Vec<(Vec<u8>, Vec<u8>)>;

fn fields_of(fields: &crate::codec::Fields) -> FieldList {
    fields
        .iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect()
}

fn wire_fields(out: &mut Vec<u8>, fields: &FieldList) {
    for (name, value) in fields {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// What a request head says.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    target: String,
    minor: u8,
    fields: FieldList,
}

impl Request {
    fn of(head: &RequestHead) -> Self {
        Request {
            method: head.method().to_string(),
            target: head.target().to_string(),
            minor: head.minor,
            fields: fields_of(&head.fields),
        }
    }

    fn wire(&self) -> Vec<u8> {
        let mut out =
            format!("{} {} HTTP/1.{}\r\n", self.method, self.target, self.minor).into_bytes();
        wire_fields(&mut out, &self.fields);
        out
    }
}

/// What a response head says.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    reason: Vec<u8>,
    minor: u8,
    fields: FieldList,
}

impl Response {
    fn of(head: &ResponseHead) -> Self {
        Response {
            status: head.status,
            reason: head.reason().to_vec(),
            minor: head.minor,
            fields: fields_of(&head.fields),
        }
    }

    fn wire(&self) -> Vec<u8> {
        let mut out = format!("HTTP/1.{} {:03} ", self.minor, self.status).into_bytes();
        out.extend_from_slice(&self.reason);
        out.extend_from_slice(b"\r\n");
        wire_fields(&mut out, &self.fields);
        out
    }
}

/// How many bytes at a time the input arrives, from the control byte.
fn step(ctl: u8) -> usize {
    usize::from(ctl & 0x0f) + 1
}

/// Checks a framing decision against the framing fields it was made from.
fn framing_fits(framing: Framing, fields: &crate::codec::Fields) {
    let length = fields.get(FieldName::ContentLength).is_some();
    let chunked = fields.get(FieldName::TransferEncoding).is_some();
    match framing {
        Framing::Length(n) => assert!(n > 0 && length && !chunked, "{framing:?}"),
        Framing::Chunked => assert!(chunked, "{framing:?} without Transfer-Encoding"),
        Framing::Empty | Framing::Close => {}
    }
}

/// A request head from a client: read (at once and in pieces alike),
/// written again and parsed again to the same method, target and fields; its
/// framing is never ambiguous; classified; and for a relay, rewritten to a
/// head that parses with the same method and the same body framing.
pub fn request(data: &[u8]) {
    let Some((&ctl, wire)) = data.split_first() else {
        return;
    };
    let _ = classify_bytes(wire);
    let Ok(head) = same_in_pieces(wire, step(ctl), request_of) else {
        return;
    };
    let said = Request::of(&head);
    let again = parse_request_head(Bytes::from(said.wire()), MAX_HEADERS)
        .unwrap_or_else(|e| panic!("{said:?} written again does not parse: {e:?}"));
    assert_eq!(Request::of(&again), said, "written again and parsed again");

    let framing = request_framing(&head);
    let length = head.fields.get(FieldName::ContentLength).is_some();
    let chunked = head.fields.get(FieldName::TransferEncoding).is_some();
    if length && chunked {
        assert!(
            framing.is_err(),
            "both Content-Length and Transfer-Encoding: {framing:?}"
        );
    }
    if let Ok(framing) = framing {
        assert_ne!(
            framing,
            Framing::Close,
            "a request is never close-delimited"
        );
        assert_ne!(framing, Framing::Length(0), "an empty body is Empty");
        framing_fits(framing, &head.fields);
    }

    let me = Identity {
        name: NAME,
        local: ([127, 0, 0, 1], 8080).into(),
        uplink_session: ctl & 0x10 != 0,
    };
    let Ok(kind) = classify_request(&head, me) else {
        return;
    };
    match &kind {
        RequestKind::Connect { host, port } => {
            assert!(head.method().eq_ignore_ascii_case("CONNECT"));
            assert!(!host.is_empty() && *port != 0, "{kind:?}");
        }
        RequestKind::Udp { host, port } => {
            assert!(!host.is_empty() && *port != 0, "{kind:?}");
        }
        RequestKind::Relay(t) => {
            assert!(t.path.starts_with('/') || t.path == "*", "{kind:?}");
            assert!(!t.host.is_empty() && t.port != 0, "{kind:?}");
            assert_eq!(t.host, t.host.to_ascii_lowercase());
            if let Ok(framing) = framing {
                rewritten_request(&head, t, framing, ctl);
            }
        }
        RequestKind::Own { .. } | RequestKind::Uplink { .. } => {}
    }
}

/// The head the relay sends upstream for `head` (as `forward` builds it).
fn rewritten_request(
    head: &RequestHead,
    t: &crate::dispatch::RelayTarget,
    framing: Framing,
    ctl: u8,
) {
    let upgrade = head.fields.get(FieldName::Upgrade).is_some()
        && head.fields.has_token(FieldName::Connection, "upgrade");
    let rw = RequestRewrite {
        name: NAME,
        path: &t.path,
        host: t.authority.as_deref(),
        body: crate::rewrite::body_header(head, framing),
        upgrade,
        transparent: ctl & 0x20 != 0,
        proxy_authorization: (ctl & 0x40 != 0).then_some("Basic eDp5"),
    };
    // The rewrite adds up to four fields (Host, Transfer-Encoding,
    // Proxy-Authorization, Via).
    let out = parse_request_head(Bytes::from(request_head(head, &rw)), MAX_HEADERS + 4)
        .unwrap_or_else(|e| panic!("the rewritten head does not parse: {e:?}"));
    assert_eq!(out.method(), head.method());
    assert_eq!(out.target(), t.path);
    // What the upstream reads as the body is what the relay sends.
    assert_eq!(request_framing(&out), Ok(framing), "framing upstream");
    let hosts: Vec<&[u8]> = out.fields.get_all(FieldName::Host).collect();
    assert!(hosts.len() <= 1, "Host fields upstream: {hosts:?}");
    if let Some(authority) = &t.authority {
        assert_eq!(hosts, [authority.as_bytes()], "Host upstream");
    }
    for hop in [
        FieldName::ProxyConnection,
        FieldName::KeepAlive,
        FieldName::Te,
    ] {
        assert!(!out.fields.has(hop), "{hop:?} went upstream");
    }
    let credentials: Vec<&[u8]> = out.fields.get_all(FieldName::ProxyAuthorization).collect();
    assert_eq!(
        credentials,
        rw.proxy_authorization.map(str::as_bytes).as_slice()
    );
    assert_eq!(
        upgrade,
        out.fields.get(FieldName::Upgrade).is_some(),
        "Upgrade upstream"
    );
}

/// A response head from an upstream: read (at once and in pieces alike),
/// written again and read again to the same status, reason and fields; its
/// framing fits its fields; rewritten for the client, it reads with the
/// framing the relay sends the body in.
pub fn response(data: &[u8]) {
    let Some((&ctl, wire)) = data.split_first() else {
        return;
    };
    let Ok(head) = same_in_pieces(wire, step(ctl), response_of) else {
        return;
    };
    let said = Response::of(&head);
    let wire_again = said.wire();
    let (again, _) = over(&wire_again, usize::MAX, response_of);
    let again = again.unwrap_or_else(|e| panic!("{said:?} written again does not parse: {e}"));
    assert_eq!(Response::of(&again), said, "written again and read again");

    let method = if ctl & 0x10 != 0 { "HEAD" } else { "GET" };
    let Ok(framing) = response_framing(method, &head) else {
        return;
    };
    if method == "HEAD" || head.status < 200 || head.status == 204 || head.status == 304 {
        assert_eq!(framing, Framing::Empty, "no body");
    }
    if head.fields.get(FieldName::TransferEncoding).is_some() {
        assert!(matches!(
            framing,
            Framing::Chunked | Framing::Close | Framing::Empty
        ));
    }
    framing_fits(framing, &head.fields);

    // As `forward` frames the body for the client (without decoding).
    let client_minor = (ctl >> 5) & 1;
    let (body, want) = match framing {
        Framing::Empty | Framing::Length(_) => (
            ResponseBody::Length(crate::rewrite::response_length(&head, framing)),
            framing,
        ),
        _ if client_minor == 1 => (ResponseBody::Chunked, Framing::Chunked),
        _ => (ResponseBody::Close, Framing::Close),
    };
    let rw = ResponseRewrite {
        name: NAME,
        body,
        decoded: false,
        upgrade: head.status == 101,
        keep_alive: ctl & 0x40 != 0 && body != ResponseBody::Close,
        client_minor,
    };
    let out_wire = response_head(&head, &rw);
    let (out, _) = over(&out_wire, usize::MAX, response_of);
    let out = out.unwrap_or_else(|e| panic!("the rewritten head does not parse: {e}"));
    assert_eq!((out.status, out.reason()), (head.status, head.reason()));
    assert_eq!(
        response_framing(method, &out),
        Ok(want),
        "framing to the client"
    );
}

/// What a body reader made of some bytes: the body, the trailers, or why it failed.
#[derive(Debug, PartialEq, Eq)]
struct Body {
    data: Vec<u8>,
    trailers: Option<Bytes>,
}

async fn chunked_body(mut conn: Conn<Pieces<'_>>) -> (Result<Body, String>, Conn<Pieces<'_>>) {
    let mut reader = BodyReader::new(Framing::Chunked);
    let mut body = Body {
        data: Vec::new(),
        trailers: None,
    };
    let out = loop {
        match reader.next(&mut conn).await {
            Ok(Item::Data(d)) => body.data.extend_from_slice(&d),
            Ok(Item::Trailers(t)) => body.trailers = Some(t),
            Ok(Item::End) => break Ok(body),
            Err(e) => break Err(format!("{e:?}")),
        }
    };
    (out, conn)
}

/// A chunked body: read (at once and in pieces alike, consuming the same
/// bytes); what was read, chunked again by the relay's writer, reads back the
/// same; a chunk size that parses prints back to itself.
pub fn chunked(data: &[u8]) {
    let Some((&ctl, wire)) = data.split_first() else {
        return;
    };
    if let Some(line) = wire.split(|b| *b == b'\n').next() {
        if let Ok(n) = parse_chunk_size(line) {
            let text = format!("{n:x}");
            assert_eq!(parse_chunk_size(text.as_bytes()).ok(), Some(n), "{text}");
        }
    }
    let Ok(body) = same_in_pieces(wire, step(ctl), chunked_body) else {
        return;
    };
    // The relay's writer, in pieces of the input's step.
    let mut out = Vec::new();
    let write = async {
        for piece in body.data.chunks(step(ctl) * 7) {
            write_data(&mut out, OutFraming::Chunked, piece).await?;
        }
        write_end(&mut out, OutFraming::Chunked, body.trailers.as_deref()).await
    };
    write
        .now_or_never()
        .expect("writes to a Vec never wait")
        .expect("writes to a Vec never fail");
    let (again, used) = over(&out, usize::MAX, chunked_body);
    assert_eq!(again.as_ref(), Ok(&body), "written again and read again");
    assert_eq!(used, out.len(), "the whole body and nothing more");
}

/// QUIC varints and CONNECT-UDP capsules and paths: any capsule stream parses
/// with progress at each capsule; a datagram capsule the relay writes parses
/// back to its payload; `get_varint(put_varint(v)) == v`; a CONNECT-UDP path
/// or a `CONNECT` target that parses, written again, parses to the same.
pub fn capsules(data: &[u8]) {
    if let Some((v, n)) = get_varint(data) {
        assert!(matches!(n, 1 | 2 | 4 | 8) && v < 1 << 62, "{v} in {n}");
        varint_round_trip(v);
    }
    if let Some(eight) = data.get(..8) {
        let mut be = [0; 8];
        be.copy_from_slice(eight);
        varint_round_trip(u64::from_be_bytes(be) >> 2);
    }

    let mut rest = data;
    loop {
        let used = match capsule(rest) {
            Capsule::Partial | Capsule::Bad => break,
            Capsule::Other(used) => used,
            Capsule::Datagram(payload, used) => {
                assert!(rest[..used].ends_with(payload));
                used
            }
        };
        assert!(used > 0 && used <= rest.len(), "{used} of {}", rest.len());
        rest = &rest[used..];
    }

    let c = datagram_capsule(data);
    if data.len() <= 65_535 {
        assert_eq!(capsule(&c), Capsule::Datagram(data, c.len()));
        assert_eq!(capsule(&c[..c.len() - 1]), Capsule::Partial);
    }

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((host, port)) = target(text) {
        assert!(!host.is_empty() && port != 0);
        assert_eq!(host, host.to_ascii_lowercase());
        let path = format!("{PATH_PREFIX}{}/{port}/", host.replace(':', "%3A"));
        assert_eq!(target(&path), Some((host, port)), "{path}");
    }
    if let Ok((host, port)) = connect_target(text) {
        assert!(!host.is_empty() && port != 0);
        let again = crate::upstream::display_addr(&host, port);
        assert_eq!(connect_target(&again), Ok((host, port)), "{again}");
    }
}

fn varint_round_trip(v: u64) {
    let mut out = Vec::new();
    put_varint(&mut out, v);
    assert_eq!(get_varint(&out), Some((v, out.len())), "{v}");
}

/// Every control message on a connection, and the error that ended it.
type Messages = (Vec<crate::uplink::Message>, Option<String>);

impl Outcome for Messages {
    fn success(&self) -> bool {
        self.1.is_none()
    }
}

async fn messages(mut conn: Conn<Pieces<'_>>) -> (Messages, Conn<Pieces<'_>>) {
    let mut got = Vec::new();
    let end = loop {
        match crate::uplink::receive(&mut conn).await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    ((got, end), conn)
}

/// Uplink control messages: read line by line (at once and in pieces
/// alike); a message read, written again, reads back the same.
pub fn uplink(data: &[u8]) {
    let Some((&ctl, wire)) = data.split_first() else {
        return;
    };
    let (read, _) = same_in_pieces(wire, step(ctl), messages);
    for m in read {
        let mut line = Vec::new();
        crate::uplink::send(&mut line, &m)
            .now_or_never()
            .expect("writes to a Vec never wait")
            .expect("a message serialises");
        let (again, _) = over(&line, usize::MAX, messages);
        assert_eq!(again, (vec![m], None), "written again and read again");
    }
}

#[cfg(test)]
mod tests;
