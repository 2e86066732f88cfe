//! `porthole-shim events watch TOPIC`: long-polls the relay's
//! `GET /events/TOPIC?after=N&wait=S` (by the relay's name, on its aggregate
//! port, one plain HTTP/1.1 connection kept alive between polls), prints
//! each event as one JSON line on stdout, and keeps the last printed id in a
//! state file so that a restarted watcher resumes exactly after it.
//!
//! The pure part (state file, the next `after`, the lines printed, what an
//! answer means) is separate from [`run`], the loop with its connection,
//! backoff and signals.
//!
//! Delivery is at least once across a crash: the state file is replaced
//! (temp file, fsync, rename) after each printed batch, so a watcher killed
//! between the two prints that batch again; a clean stop (SIGINT, SIGTERM)
//! never interrupts a batch, and nothing is ever skipped.

use std::ffi::OsString;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use porthole_relay::secret::Secret;
use porthole_relay::tls::RelayTls;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::link::Backoff;

/// `--wait` when none is given: seconds a poll may be held by the relay
/// (which caps it with its `events.max_wait`).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Largest poll answer accepted (the relay sends at most 1 MiB of event data).
const MAX_ANSWER: usize = 16 << 20;
/// A poll is given up this long after its `wait` would have ended.
const ANSWER_GRACE: Duration = Duration::from_secs(10);
/// Longest `Retry-After` honoured as such.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// An empty answer sooner than this (a relay with a tiny `max_wait`, or
/// draining) is followed by a pause of this long, so polls never spin.
const MIN_POLL: Duration = Duration::from_millis(500);

/// What `events watch` needs.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// `HOST:PORT` of the relay's aggregate port, dialled as given.
    pub relay: String,
    /// TLS to the relay (ALPN `http/1.1`); `None` for plain TCP.
    pub tls: Option<RelayTls>,
    /// The relay's `name`: the host of the poll's URI and `Host`.
    pub relay_name: String,
    /// `Proxy-Authorization` for each poll (the shim's `credentials_file`).
    pub authorization: Option<Secret>,
    /// A valid topic name (see [`porthole_relay::events::valid_topic`]).
    pub topic: String,
    /// The state file: the last printed id.
    pub state: PathBuf,
    /// How long each poll may wait for an event.
    pub wait: Duration,
    /// Dialling the relay.
    pub connect_timeout: Duration,
}

// ---------------------------------------------------------------- state file

/// `$XDG_STATE_HOME/porthole/TOPIC.last` (an absolute `XDG_STATE_HOME`
/// only, as the XDG spec says), else `$HOME/.local/state/porthole/TOPIC.last`.
pub fn default_state_path(
    topic: &str,
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, String> {
    let file = format!("{topic}.last");
    if let Some(dir) = xdg_state_home
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
    {
        return Ok(dir.join("porthole").join(file));
    }
    match home.map(PathBuf::from).filter(|h| h.is_absolute()) {
        Some(home) => Ok(home.join(".local/state/porthole").join(file)),
        None => Err("neither XDG_STATE_HOME nor HOME is set: give --state FILE".into()),
    }
}

/// The last printed id; `0` (from the start) when the file does not exist.
/// A file that exists but does not hold an id is an error: guessing would
/// print events twice or skip some.
pub fn load_state(path: &Path) -> Result<u64, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            format!(
                "state file {}: `{}` is not an event id (remove the file to start from the oldest retained event)",
                path.display(),
                text.trim()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("cannot read state file {}: {e}", path.display())),
    }
}

/// Replaces the state file with `id`, atomically: a temporary file in the
/// same directory, written and fsync'd, renamed over the old one, then the
/// directory fsync'd. Creates the directory if needed.
pub fn store_state(path: &Path, id: u64) -> Result<(), String> {
    let context =
        |what: &str, e: std::io::Error| format!("state file {}: {what}: {e}", path.display());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| context("cannot create its directory", e))?;
    let name = path
        .file_name()
        .ok_or_else(|| format!("state file {}: not a file name", path.display()))?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(context("cannot write the temporary file", e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(context("cannot rename the temporary file over it", e));
    }
    // The rename itself is durable once the directory is synced.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| context("cannot sync its directory", e))
}

// ---------------------------------------------------------------- answers

/// A poll answer: `{"events":[...],"next":M}` plus `"missed":K`. The events
/// are kept as the relay wrote them, to be printed unchanged.
#[derive(Debug, Deserialize)]
pub struct Answer {
    pub events: Vec<Box<RawValue>>,
    pub next: u64,
    #[serde(default)]
    pub missed: u64,
    /// The relay's store started again behind the `after` asked for (a
    /// `memory` relay restarted): its events are new, whatever their ids.
    #[serde(default)]
    pub reset: bool,
}

#[derive(Deserialize)]
struct EventId {
    id: u64,
}

/// Parses a `200` answer's body.
pub fn parse_answer(body: &[u8]) -> Result<Answer, String> {
    serde_json::from_slice(body).map_err(|e| format!("not a poll answer: {e}"))
}

/// What to do with one answer, for a watcher that printed everything up to `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Lines to print, oldest first, each one event object.
    pub lines: Vec<String>,
    /// The `after` of the next poll (what the state file records).
    pub next: u64,
    /// Events the watcher will never see (reported on stderr).
    pub missed: u64,
    /// The relay's topic is behind the state (a `memory` relay restarted):
    /// `next` < `after`.
    pub rewound: bool,
}

/// The next-`after` decision. Events at or below the last printed id are
/// never printed again. With events, `next` is the last one printed (never
/// beyond it, so nothing is skipped); without, it is the relay's `next`,
/// which moves on past events no longer retained, or back when the relay's
/// store starts again.
pub fn step(after: u64, answer: &Answer) -> Result<Step, String> {
    // After a reset the ids start again: none of them was printed.
    let mut last = if answer.reset { 0 } else { after };
    let mut lines = Vec::with_capacity(answer.events.len());
    for event in &answer.events {
        let id = serde_json::from_str::<EventId>(event.get())
            .map_err(|e| format!("an event without an id: {e}"))?
            .id;
        if id <= last {
            continue;
        }
        lines.push(event_line(event));
        last = id;
    }
    let next = if lines.is_empty() { answer.next } else { last };
    Ok(Step {
        lines,
        next,
        missed: answer.missed,
        rewound: answer.reset || next < after,
    })
}

/// One event as one line: the relay's JSON unchanged. JSON needs no line
/// break outside strings and has none inside them (they are escaped), so a
/// line break can only be white space and becomes a space.
pub fn event_line(event: &RawValue) -> String {
    let text = event.get();
    if text.contains(['\n', '\r']) {
        text.replace(['\n', '\r'], " ")
    } else {
        text.to_string()
    }
}

/// The poll's request target, in origin form: the relay is the origin of
/// its event endpoints, reached directly (its name goes in `Host`), and the
/// same target serves a link with TLS or without (an `http://` URI over TLS
/// would name the wrong scheme, and an `https://` one reads as a request to
/// relay elsewhere).
pub fn poll_uri(topic: &str, after: u64, wait: Duration) -> String {
    let wait = wait.as_secs_f64();
    format!("/events/{topic}?after={after}&wait={wait}")
}

/// `Retry-After` as a wait: delta-seconds or an HTTP date, capped.
pub fn retry_after(value: Option<&HeaderValue>, now: SystemTime) -> Option<Duration> {
    let text = value?.to_str().ok()?.trim();
    let wait = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(text)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// What a poll's response means.
#[derive(Debug)]
pub enum Outcome {
    Answer(Answer),
    /// Try again: after the relay's `Retry-After` if it gave one, else with backoff.
    Retry {
        after: Option<Duration>,
        why: String,
    },
    /// The relay refused the request itself (a `4xx`): asking again cannot help.
    Fatal(String),
}

/// Classifies a response by status, `Retry-After` and body.
pub fn classify(status: StatusCode, retry: Option<Duration>, body: &[u8]) -> Outcome {
    let text = || String::from_utf8_lossy(body).trim().to_string();
    if status == StatusCode::OK {
        return match parse_answer(body) {
            Ok(a) => Outcome::Answer(a),
            Err(e) => Outcome::Retry {
                after: None,
                why: format!("the relay answered 200 but {e}"),
            },
        };
    }
    let transient = matches!(
        status,
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
    );
    if status.is_client_error() && !transient {
        let hint = match status {
            StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => " (is relay_name the relay's name?)",
            StatusCode::PROXY_AUTHENTICATION_REQUIRED => {
                " (the relay wants a user: set credentials_file, or check the one set)"
            }
            _ => "",
        };
        return Outcome::Fatal(format!("the relay refused the poll: {}{hint}", text()));
    }
    Outcome::Retry {
        after: retry,
        why: format!("the relay answered {status}: {}", text()),
    }
}

// ---------------------------------------------------------------- the loop

type Sender = SendRequest<Empty<Bytes>>;

async fn connect(config: &WatchConfig) -> Result<Sender, String> {
    let relay = &config.relay;
    let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(relay))
        .await
        .map_err(|_| {
            format!(
                "relay {relay} unreachable: no connection within {:?}",
                config.connect_timeout
            )
        })?
        .map_err(|e| format!("relay {relay} unreachable: cannot connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    match &config.tls {
        None => handshake(stream, relay).await,
        Some(tls) => {
            let stream = tls
                .connect(stream, relay, config.connect_timeout)
                .await
                .map_err(|e| format!("relay {relay} unreachable: {e}"))?;
            handshake(stream, relay).await
        }
    }
}

/// HTTP/1.1 over a dialled connection (plain TCP or TLS).
async fn handshake<S>(io: S, relay: &str) -> Result<Sender, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("relay {relay}: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "poll connection ended");
        }
    });
    Ok(sender)
}

/// One poll on `sender`; `Err` is a transport failure (the connection is spent).
async fn poll(sender: &mut Sender, config: &WatchConfig, after: u64) -> Result<Outcome, String> {
    let relay = &config.relay;
    let uri = poll_uri(&config.topic, after, config.wait);
    let mut req = Request::get(uri)
        .header(header::HOST, &config.relay_name)
        .header(header::ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| format!("relay_name `{}`: {e}", config.relay_name))?;
    if let Some(value) = crate::link::authorization_value(config.authorization.as_ref()) {
        req.headers_mut().insert(header::PROXY_AUTHORIZATION, value);
    }
    sender
        .ready()
        .await
        .map_err(|e| format!("relay {relay}: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("relay {relay}: {e}"))?;
    let status = resp.status();
    let retry = retry_after(resp.headers().get(header::RETRY_AFTER), SystemTime::now());
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("relay {relay}: reading the answer: {e}"))?
        .to_bytes();
    Ok(classify(status, retry, &body))
}

/// Prints a step's lines and flushes.
fn print_lines(lines: &[String]) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}").map_err(|e| format!("cannot write to stdout: {e}"))?;
    }
    out.flush()
        .map_err(|e| format!("cannot write to stdout: {e}"))
}

/// Sleeps `wait`, or less if `shutdown` comes first; `false` then.
async fn pause<F: Future<Output = ()>>(
    wait: Duration,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = shutdown.as_mut() => false,
    }
}

/// Watches from `after` until `shutdown` completes (`Ok`) or something that
/// retrying cannot mend happens (`Err`: the relay refused the poll, stdout
/// closed, the state file cannot be written). An unreachable relay, a failed
/// poll and a `5xx` are retried, with the relay's `Retry-After` or backoff.
pub async fn run(
    config: WatchConfig,
    mut after: u64,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = Backoff::default();
    let mut sender: Option<Sender> = None;
    // A warning was logged: say when polls work again.
    let mut failing = false;
    // The kept-alive connection failed and a fresh one is being tried at once.
    let mut redialled = false;
    tracing::info!(relay = %config.relay, topic = %config.topic, after, state = %config.state.display(), "watching");
    loop {
        let reused = sender.as_ref().is_some_and(|s| !s.is_closed());
        let started = Instant::now();
        let attempt = async {
            let mut s = match sender.take() {
                Some(s) if !s.is_closed() => s,
                _ => connect(&config).await?,
            };
            let limit = config.wait + ANSWER_GRACE;
            let outcome = tokio::time::timeout(limit, poll(&mut s, &config, after))
                .await
                .map_err(|_| format!("relay {}: no answer within {limit:?}", config.relay))??;
            Ok::<_, String>((s, outcome))
        };
        let result = tokio::select! {
            r = attempt => r,
            () = shutdown.as_mut() => break,
        };
        let outcome = match result {
            Ok((s, outcome)) => {
                sender = Some(s);
                outcome
            }
            // A kept-alive connection the relay closed meanwhile: dial again at once.
            Err(why) if reused && !redialled => {
                tracing::debug!(error = %why, "poll connection lost; dialling again");
                redialled = true;
                continue;
            }
            Err(why) => Outcome::Retry { after: None, why },
        };
        match outcome {
            Outcome::Answer(answer) => {
                if failing {
                    tracing::info!(relay = %config.relay, "polling again");
                }
                failing = false;
                redialled = false;
                backoff = Backoff::default();
                let step = step(after, &answer)?;
                if step.missed > 0 {
                    eprintln!(
                        "missed: {} (events on {} after id {after} are no longer retained by the relay)",
                        step.missed, config.topic
                    );
                }
                if step.rewound {
                    tracing::warn!(
                        topic = %config.topic,
                        state = after,
                        relay = step.next,
                        "the relay's topic is behind the state file (its store started again?): following the relay"
                    );
                }
                print_lines(&step.lines)?;
                if step.next != after {
                    store_state(&config.state, step.next)?;
                    after = step.next;
                }
                let nothing = step.lines.is_empty() && step.missed == 0;
                if nothing && started.elapsed() < MIN_POLL && !pause(MIN_POLL, &mut shutdown).await
                {
                    break;
                }
            }
            Outcome::Fatal(why) => return Err(why),
            Outcome::Retry { after: hint, why } => {
                failing = true;
                if hint.is_none() {
                    sender = None;
                }
                let wait = hint.unwrap_or_else(|| backoff.after(Duration::ZERO));
                tracing::warn!(error = %why, "poll failed; retrying in {wait:?}");
                if !pause(wait, &mut shutdown).await {
                    break;
                }
            }
        }
    }
    tracing::info!(topic = %config.topic, after, "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(json: &str) -> Answer {
        parse_answer(json.as_bytes()).unwrap()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("porthole-watch-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn state_file_round_trip_missing_and_corrupt() {
        let dir = temp_dir("state");
        let path = dir.join("nested/plant-3.last");
        assert_eq!(load_state(&path), Ok(0));
        store_state(&path, 41).unwrap();
        store_state(&path, 42).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "42\n");
        assert_eq!(load_state(&path), Ok(42));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("plant-3.last")]);

        std::fs::write(&path, "forty\n").unwrap();
        let err = load_state(&path).unwrap_err();
        assert!(
            err.contains("plant-3.last") && err.contains("`forty`"),
            "{err}"
        );
        // A directory where the file should be: an error with the path.
        let err = store_state(&dir.join("nested"), 1).unwrap_err();
        assert!(err.contains("nested"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn default_state_path_by_table() {
        let os = |s: &str| Some(OsString::from(s));
        let cases = [
            (
                os("/x/state"),
                os("/home/u"),
                Ok("/x/state/porthole/t.last"),
            ),
            (
                os("relative"),
                os("/home/u"),
                Ok("/home/u/.local/state/porthole/t.last"),
            ),
            (
                None,
                os("/home/u"),
                Ok("/home/u/.local/state/porthole/t.last"),
            ),
            (None, None, Err(())),
        ];
        for (xdg, home, want) in cases {
            let got = default_state_path("t", xdg.clone(), home.clone()).map_err(|_| ());
            assert_eq!(got, want.map(PathBuf::from), "{xdg:?} {home:?}");
        }
    }

    #[test]
    fn next_after_decision_by_table() {
        // (after, answer, lines' ids, next, missed, rewound)
        type Case<'a> = (u64, &'a str, &'a [u64], u64, u64, bool);
        let cases: &[Case] = &[
            // Events: print them, next is the last one.
            (
                0,
                r#"{"events":[{"id":1,"time":"t","data":1},{"id":2,"time":"t","data":2}],"next":2}"#,
                &[1, 2],
                2,
                0,
                false,
            ),
            // No event: same next.
            (5, r#"{"events":[],"next":5}"#, &[], 5, 0, false),
            // Behind the retention: the oldest retained, and the count missed.
            (
                2,
                r#"{"events":[{"id":8,"time":"t","data":{}}],"next":8,"missed":5}"#,
                &[8],
                8,
                5,
                false,
            ),
            // Everything expired: nothing to print, next moves on.
            (
                2,
                r#"{"events":[],"next":10,"missed":8}"#,
                &[],
                10,
                8,
                false,
            ),
            // The relay's store started again: follow it back.
            (9, r#"{"events":[],"next":3}"#, &[], 3, 0, true),
            // ...and print its new events, whatever their ids (audit 4).
            (
                9,
                r#"{"events":[{"id":1,"data":0},{"id":2,"data":0}],"next":2,"reset":true}"#,
                &[1, 2],
                2,
                0,
                true,
            ),
            // Never twice: ids at or below the last printed are dropped.
            (
                3,
                r#"{"events":[{"id":3,"data":0},{"id":4,"data":0},{"id":4,"data":0}],"next":4}"#,
                &[4],
                4,
                0,
                false,
            ),
            // Never skip: next is the last printed, even if the relay says more.
            (
                0,
                r#"{"events":[{"id":1,"data":0}],"next":7}"#,
                &[1],
                1,
                0,
                false,
            ),
        ];
        for (after, json, ids, next, missed, rewound) in cases {
            let s = step(*after, &answer(json)).unwrap();
            let got: Vec<u64> = s
                .lines
                .iter()
                .map(|l| serde_json::from_str::<EventId>(l).unwrap().id)
                .collect();
            assert_eq!(
                (got.as_slice(), s.next, s.missed, s.rewound),
                (*ids, *next, *missed, *rewound),
                "{json}"
            );
        }
        assert!(step(0, &answer(r#"{"events":[{"data":1}],"next":1}"#)).is_err());
    }

    #[test]
    fn events_print_as_the_relay_wrote_them_one_per_line() {
        let a = answer(
            "{\"events\":[{\"id\":1,\"time\":\"2025-01-01T12:00:00.000Z\",\"data\":{\"temp\":71,\"a\":\"x\\ny\"}},\n{\"id\":2,\n\"data\":[1,\r\n2]}],\"next\":2}",
        );
        let s = step(0, &a).unwrap();
        assert_eq!(
            s.lines,
            vec![
                r#"{"id":1,"time":"2025-01-01T12:00:00.000Z","data":{"temp":71,"a":"x\ny"}}"#,
                r#"{"id":2, "data":[1,  2]}"#,
            ]
        );
        for line in &s.lines {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        assert!(parse_answer(b"{\"next\":1}").is_err());
        assert!(parse_answer(b"<html>").is_err());
    }

    #[test]
    fn poll_uri_and_retry_after() {
        assert_eq!(
            poll_uri("plant-3", 7, Duration::from_secs(30)),
            "/events/plant-3?after=7&wait=30"
        );
        assert_eq!(
            poll_uri("t", 0, Duration::from_millis(1500)),
            "/events/t?after=0&wait=1.5"
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let hv = |s: &'static str| HeaderValue::from_static(s);
        let date = httpdate::fmt_http_date(now + Duration::from_secs(20));
        let date = HeaderValue::from_str(&date).unwrap();
        let cases = [
            (Some(hv("1")), Some(Duration::from_secs(1))),
            (Some(hv(" 0 ")), Some(Duration::ZERO)),
            (Some(hv("86400")), Some(MAX_RETRY_AFTER)),
            (Some(date), Some(Duration::from_secs(20))),
            (
                Some(hv("Thu, 01 Jan 1970 00:00:00 GMT")),
                Some(Duration::ZERO),
            ),
            (Some(hv("soon")), None),
            (None, None),
        ];
        for (value, want) in cases {
            assert_eq!(retry_after(value.as_ref(), now), want, "{value:?}");
        }
    }

    #[test]
    fn responses_are_classified_by_status() {
        let ok = classify(StatusCode::OK, None, br#"{"events":[],"next":0}"#);
        assert!(matches!(ok, Outcome::Answer(_)));
        let garbled = classify(StatusCode::OK, None, b"nope");
        assert!(matches!(garbled, Outcome::Retry { after: None, .. }));
        let full = classify(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(1)),
            b"503 full",
        );
        assert!(
            matches!(full, Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(1))
        );
        let bad_gateway = classify(StatusCode::BAD_GATEWAY, None, b"");
        assert!(matches!(bad_gateway, Outcome::Retry { after: None, .. }));
        let later = classify(StatusCode::TOO_MANY_REQUESTS, None, b"");
        assert!(matches!(later, Outcome::Retry { .. }));
        match classify(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            None,
            b"407 proxy authentication required\n",
        ) {
            Outcome::Fatal(why) => assert!(why.contains("credentials_file"), "{why}"),
            other => panic!("{other:?}"),
        }
        match classify(StatusCode::FORBIDDEN, None, b"403 no route\n") {
            Outcome::Fatal(why) => assert!(
                why.contains("403 no route") && why.contains("relay_name"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, None, b"400 bad topic"),
            Outcome::Fatal(_)
        ));
    }
}
