//! `GET /events/{topic}` on the aggregate port: a long poll
//! (`?after=N&wait=S`) answered with JSON, or, with `Accept:
//! text/event-stream`, a server-sent event stream resumable with
//! `Last-Event-ID`. A waiting poller costs one task and one watch receiver;
//! it never blocks other connections and holds no lock while it waits.
//!
//! `HEAD` gets the head a `GET` would get without waiting (RFC 9110 section
//! 9.3.2): a plain poll's (`wait` ignored, `Content-Length` of the answer
//! now), or an event stream's, which then ends. Nothing counts as delivered.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::hub::PollAnswer;
use super::waiters::{Full, Slot};
use super::{valid_topic, Hub};
use crate::access_log::Access;
use crate::codec::{write_data, write_end, Conn, FieldName, Io, OutFraming, RequestHead};
use crate::error::{ErrorKind, RelayError};
use crate::forward::{log_error, After};
use crate::http1::{write_error, write_simple};
use crate::metrics::{GaugeGuard, Name, TopicLabels};
use crate::ConnCtx;

/// A comment line on an idle event stream, so proxies and clients see it alive.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// What the client asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct PollRequest {
    pub after: u64,
    pub wait: Duration,
    pub stream: bool,
    /// A `HEAD`: the answer's head only, at once (`wait` is zero).
    pub head_only: bool,
}

/// Reads `after`, `wait` (seconds, fractions allowed), `Accept` and
/// `Last-Event-ID` (which wins over `after`); a `HEAD` never waits. `Err` is
/// the reason for a 400.
pub fn parse_request(query: &str, head: &RequestHead) -> Result<PollRequest, &'static str> {
    let mut req = PollRequest {
        after: 0,
        wait: Duration::ZERO,
        stream: head
            .fields
            .get_all(FieldName::Accept)
            .any(|v| contains(v, b"text/event-stream")),
        head_only: head.method() == "HEAD",
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "after" => req.after = event_id(value).ok_or("after must be an event id")?,
            "wait" => {
                // Plain decimal seconds: no sign, exponent, `inf` or `NaN`.
                let decimal = !value.is_empty()
                    && value.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                    && value.bytes().filter(|b| *b == b'.').count() <= 1;
                let secs: f64 = match value.parse() {
                    Ok(secs) if decimal => secs,
                    _ => return Err("wait must be seconds"),
                };
                req.wait = Duration::from_secs_f64(secs.min(1e9));
            }
            _ => {}
        }
    }
    if let Some(v) = head.fields.get(FieldName::LastEventId) {
        let text = std::str::from_utf8(crate::codec::trim(v)).unwrap_or("");
        req.after = event_id(text).ok_or("Last-Event-ID must be an event id")?;
    }
    if req.head_only {
        req.wait = Duration::ZERO;
    }
    Ok(req)
}

/// An event id as written: decimal digits only (no sign, no spaces).
fn event_id(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Serves one poll or event stream for `topic`.
pub async fn serve<S: Io>(
    conn: &mut Conn<S>,
    head: RequestHead,
    topic: &str,
    query: &str,
    keep_alive: bool,
    ctx: &ConnCtx,
    access: &mut Access,
) -> After {
    let hub = &ctx.shared.events;
    let config = ctx.shared.config();
    let head_only = head.method() == "HEAD";
    let request = if valid_topic(topic) {
        crate::gate::admit_topic(ctx, &config, access.user.as_deref(), topic).and_then(|()| {
            parse_request(query, &head).map_err(|why| RelayError::new(ErrorKind::BadPoll(why)))
        })
    } else {
        Err(RelayError::new(ErrorKind::BadTopic))
    };
    let slot = request.and_then(|r| join(hub, topic).map(|slot| (r, slot)));
    let (request, slot) = match slot {
        Ok(ok) => ok,
        Err(err) => return refuse(conn, ctx, access, err, keep_alive, head_only).await,
    };
    // A waiting poll or an event stream holds neither its head nor a read
    // buffer (the head shares the buffer's allocation): 4 KiB per poller.
    let minor = head.minor;
    drop(head);
    conn.release_if_empty();
    if request.stream {
        stream(conn, minor, topic, request, slot, ctx, access).await
    } else {
        long_poll(conn, topic, request, slot, keep_alive, ctx, access).await
    }
}

fn join(hub: &Hub, topic: &str) -> Result<Slot, RelayError> {
    hub.join(topic).map_err(|full| {
        let limit = match full {
            Full::Topic => "events.max_pollers_per_topic",
            Full::Total => "events.max_pollers",
        };
        tracing::warn!(topic, limit, "poller refused: limit reached");
        RelayError::new(ErrorKind::PollersFull {
            topic: topic.to_string(),
            limit,
        })
    })
}

async fn refuse<S: Io>(
    conn: &mut Conn<S>,
    ctx: &ConnCtx,
    access: &mut Access,
    err: RelayError,
    keep_alive: bool,
    head_only: bool,
) -> After {
    log_error(ctx, &err);
    access.status = err.status();
    match write_error(&mut conn.io, &err, !keep_alive, head_only).await {
        Ok(n) if keep_alive => {
            access.bytes_out += n;
            After::KeepAlive
        }
        _ => After::Close,
    }
}

/// Waits until the topic has something after `after`, the wait ends, or
/// the relay drains; `None` if the client went away meanwhile.
async fn next_answer<S: Io>(
    conn: &mut Conn<S>,
    topic: &str,
    after: u64,
    deadline: Option<Instant>,
    slot: &mut Slot,
    ctx: &ConnCtx,
) -> Option<Result<PollAnswer, RelayError>> {
    let mut watch_client = true;
    loop {
        let answer = match ctx.shared.events.read(topic, after).await {
            Ok(a) => a,
            Err(e) => return Some(Err(RelayError::new(ErrorKind::EventStore(e)))),
        };
        let expired = deadline.is_some_and(|d| Instant::now() >= d);
        if !answer.nothing_new(after) || expired || ctx.shared.is_draining() {
            return Some(Ok(answer));
        }
        // Counted as a waiting long-poll only while it actually waits.
        let _waiting = GaugeGuard::new(ctx.shared.metrics.open_long_polls.clone());
        let keepalive = Instant::now() + KEEPALIVE;
        tokio::select! {
            () = slot.woken() => {}
            () = tokio::time::sleep_until(deadline.unwrap_or(keepalive)) => {
                if deadline.is_none() {
                    // Event streams: the caller writes a keep-alive comment.
                    return Some(Ok(answer));
                }
            }
            () = ctx.shared.until_draining() => {}
            read = conn.fill_lean(), if watch_client => match read {
                Ok(0) | Err(_) => return None,
                // A pipelined request: kept in the buffer for after this one.
                Ok(_) => watch_client = false,
            },
        }
    }
}

/// Counts events sent to a poller.
fn delivered(ctx: &ConnCtx, topic: &str, answer: &PollAnswer) {
    if !answer.events.is_empty() {
        let labels = TopicLabels {
            topic: Name::from(topic),
        };
        let delivered = ctx.shared.metrics.events_delivered.get_or_create(&labels);
        delivered.inc_by(answer.events.len() as u64);
    }
}

async fn long_poll<S: Io>(
    conn: &mut Conn<S>,
    topic: &str,
    request: PollRequest,
    mut slot: Slot,
    keep_alive: bool,
    ctx: &ConnCtx,
    access: &mut Access,
) -> After {
    let hub = &ctx.shared.events;
    let deadline = Instant::now() + hub.cap_wait(request.wait);
    let answer = next_answer(conn, topic, request.after, Some(deadline), &mut slot, ctx).await;
    drop(slot);
    let answer = match answer {
        None => {
            access.status = 499; // nginx's "client closed request", for the log only
            return After::Close;
        }
        Some(Err(err)) => {
            return refuse(conn, ctx, access, err, keep_alive, request.head_only).await
        }
        Some(Ok(a)) => a,
    };
    if !request.head_only {
        delivered(ctx, topic, &answer);
    }
    let close = !keep_alive || ctx.shared.is_draining();
    let body = answer.to_json();
    access.status = 200;
    let written = write_simple(
        &mut conn.io,
        200,
        "application/json",
        body.as_bytes(),
        close,
        &[],
        request.head_only,
    )
    .await;
    match written {
        Ok(n) if !close => {
            access.bytes_out += n;
            After::KeepAlive
        }
        Ok(n) => {
            access.bytes_out += n;
            After::Close
        }
        Err(_) => After::Close,
    }
}

/// A server-sent event stream: `id:` and `data:` per event, an `event:
/// missed` when the client fell behind (with `"reset":true` when its
/// `Last-Event-ID` is beyond the store's last id), a comment every 15 s of
/// quiet. Ends
/// when the client leaves or the relay drains (the client resumes elsewhere
/// with `Last-Event-ID`). To a `HEAD`, only the head.
async fn stream<S: Io>(
    conn: &mut Conn<S>,
    minor: u8,
    topic: &str,
    request: PollRequest,
    mut slot: Slot,
    ctx: &ConnCtx,
    access: &mut Access,
) -> After {
    // HTTP/1.0 has no chunked coding: the stream ends with the connection.
    let framing = if minor == 0 {
        OutFraming::Plain
    } else {
        OutFraming::Chunked
    };
    // Dated and marked like the relay's other own answers (RFC 9110 6.6.1).
    let mut out = b"HTTP/1.1 200 OK\r\n".to_vec();
    crate::rewrite::date_line(&mut out);
    out.extend_from_slice(
        b"Content-Type: text/event-stream\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n",
    );
    if framing == OutFraming::Chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    access.status = 200;
    let written = conn.io.write_all(&out).await;
    if written.and(conn.io.flush().await).is_err() {
        return After::Close;
    }
    access.bytes_out += out.len() as u64;
    if request.head_only {
        return After::Close;
    }
    let mut after = request.after;
    let mut pending = String::from("retry: 2000\n\n");
    loop {
        if !pending.is_empty() {
            let sent = write_data(&mut conn.io, framing, pending.as_bytes()).await;
            if sent.and(conn.io.flush().await).is_err() {
                return After::Close;
            }
            access.bytes_out += pending.len() as u64;
            pending.clear();
        }
        if ctx.shared.is_draining() {
            break;
        }
        let answer = match next_answer(conn, topic, after, None, &mut slot, ctx).await {
            None => return After::Close,
            Some(Ok(a)) => a,
            Some(Err(err)) => {
                log_error(ctx, &err);
                pending = format!(": {err}\n\n");
                let _ = write_data(&mut conn.io, framing, pending.as_bytes()).await;
                break;
            }
        };
        if answer.nothing_new(after) {
            pending.push_str(": keep-alive\n\n");
            continue;
        }
        delivered(ctx, topic, &answer);
        if answer.reset {
            // Last-Event-ID beyond the store's last id: the store started
            // again and the ids that follow start from its oldest event.
            pending.push_str(&format!(
                "event: missed\ndata: {{\"missed\":{},\"reset\":true}}\n\n",
                answer.missed
            ));
        } else if answer.missed > 0 {
            pending.push_str(&format!(
                "event: missed\ndata: {{\"missed\":{}}}\n\n",
                answer.missed
            ));
        }
        for e in &answer.events {
            pending.push_str(&format!("id: {}\ndata: ", e.id));
            e.write_json(&mut pending);
            pending.push_str("\n\n");
        }
        after = answer.next;
    }
    let _ = write_end(&mut conn.io, framing, None).await;
    After::Close
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::parse_request_head;
    use bytes::Bytes;

    fn parse(query: &str, headers: &str) -> Result<PollRequest, &'static str> {
        let text = format!("GET /events/t HTTP/1.1\r\nHost: r\r\n{headers}\r\n");
        let head = parse_request_head(Bytes::from(text), 100).unwrap();
        parse_request(query, &head)
    }

    #[test]
    fn poll_requests_by_table() {
        let req = |after, wait_ms, stream| {
            Ok(PollRequest {
                after,
                wait: Duration::from_millis(wait_ms),
                stream,
                head_only: false,
            })
        };
        let cases: &[(&str, &str, Result<PollRequest, &str>)] = &[
            ("", "", req(0, 0, false)),
            ("after=5&wait=25", "", req(5, 25_000, false)),
            ("wait=0.5&x=1&after=2", "", req(2, 500, false)),
            ("after=5", "Accept: text/event-stream\r\n", req(5, 0, true)),
            (
                "after=5",
                "Accept: text/html, Text/Event-Stream\r\nLast-Event-ID: 9\r\n",
                req(9, 0, true),
            ),
            ("after=-1", "", Err("after must be an event id")),
            ("after=", "", Err("after must be an event id")),
            ("wait=soon", "", Err("wait must be seconds")),
            ("wait=-1", "", Err("wait must be seconds")),
            ("wait=inf", "", Err("wait must be seconds")),
            // Signs and exponents as other parsers take them: refused, as
            // a percent-encoded digit is (the audit's note: +3 was taken).
            ("after=+3", "", Err("after must be an event id")),
            ("after=%31", "", Err("after must be an event id")),
            ("wait=+1", "", Err("wait must be seconds")),
            ("wait=1e3", "", Err("wait must be seconds")),
            ("wait=1.", "", req(0, 1_000, false)),
            (
                "",
                "Last-Event-ID: +9\r\n",
                Err("Last-Event-ID must be an event id"),
            ),
            (
                "",
                "Last-Event-ID: x\r\n",
                Err("Last-Event-ID must be an event id"),
            ),
        ];
        for (query, headers, want) in cases {
            assert_eq!(&parse(query, headers), want, "{query:?} {headers:?}");
        }
    }

    #[test]
    fn a_head_never_waits() {
        let text = "HEAD /events/t HTTP/1.1\r\nHost: r\r\n\r\n";
        let head = parse_request_head(Bytes::from(text), 100).unwrap();
        let want = PollRequest {
            after: 3,
            wait: Duration::ZERO,
            stream: false,
            head_only: true,
        };
        assert_eq!(parse_request("after=3&wait=25", &head), Ok(want));
    }
}
