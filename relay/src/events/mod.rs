//! Event notifications (JP4570628B2 figure 11): internal servers publish on
//! the admin listener, outside clients poll through the aggregate port and
//! get either the events or "no event". Nothing is lost silently: a poller
//! that fell behind the retention learns exactly how many it missed.
//!
//! - [`Hub`]: the one entry point: publish, poll, and waking waiting pollers;
//! - [`Store`]: the storage interface, with three implementations:
//!   [`memory`] (default), [`file`] (an fsync'd log per topic, durable across
//!   `kill -9`) and [`redis`] (Redis Streams, shared by several relays);
//! - [`waiters`]: who is waiting on which topic, and the poller limits;
//! - [`poll`]: the aggregate-port side: long-poll answers and server-sent events;
//! - [`publish`]: one publication, from the admin listener or (for `[events]
//!   publishers`) the aggregate port, counted.
//!
//! Ids per topic start at 1 and increase by one; a store never reuses one.

pub mod conformance;
pub mod file;
mod hub;
pub mod memory;
pub mod poll;
pub mod redis;
pub mod waiters;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use hub::{Hub, PollAnswer, PublishError};

/// Publishes one event on `topic` and counts it: the id, or the error to
/// answer (`400`, `413`, `503` for a store that failed and stored nothing,
/// `504` for one that may have stored it).
pub async fn publish(
    shared: &crate::Shared,
    topic: &str,
    body: &[u8],
) -> Result<u64, crate::error::RelayError> {
    use crate::error::{ErrorKind, RelayError};
    match shared.events.publish(topic, body).await {
        Ok(id) => {
            let labels = crate::metrics::TopicLabels {
                topic: crate::metrics::Name::from(topic),
            };
            shared.metrics.events_published.get_or_create(&labels).inc();
            Ok(id)
        }
        Err(e) => {
            let kind = match e {
                PublishError::BadTopic => ErrorKind::BadTopic,
                PublishError::NotJson(why) => ErrorKind::NotJson(why),
                PublishError::TooLarge { limit } => ErrorKind::EventTooLarge { limit },
                PublishError::Store(e) if e.outcome_unknown => {
                    tracing::error!(topic, error = %e, "publish outcome unknown");
                    ErrorKind::EventOutcomeUnknown(e)
                }
                PublishError::Store(e) => {
                    tracing::error!(topic, error = %e, "publish failed");
                    ErrorKind::EventStore(e)
                }
            };
            Err(RelayError::new(kind))
        }
    }
}

/// What a store call returns: boxed so that [`Store`] can be a trait object.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The storage interface every store implements.
pub trait Store: Send + Sync + 'static {
    /// `memory`, `file` or `redis`: names the store in errors and logs.
    fn kind(&self) -> &'static str;

    /// Stores one event (`data` is compact JSON text) and returns its id.
    /// When it returns, the event is as durable as the store makes it.
    fn append<'a>(
        &'a self,
        topic: &'a str,
        time: SystemTime,
        data: &'a str,
    ) -> StoreFuture<'a, u64>;

    /// The retained events with id > `after`, oldest first, at most `limit`,
    /// with the topic's retained range.
    fn read<'a>(&'a self, topic: &'a str, after: u64, limit: usize) -> StoreFuture<'a, Batch>;
}

/// How much of each topic a store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most events kept per topic.
    pub count: usize,
    /// Events older than this are dropped.
    pub age: Duration,
}

impl Retention {
    /// The oldest publication time still retained at `now`.
    pub fn cutoff(&self, now: SystemTime) -> SystemTime {
        now.checked_sub(self.age).unwrap_or(UNIX_EPOCH)
    }
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: u64,
    /// Publication time, in whole milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The published JSON value, compact (no white space outside strings).
    pub data: Arc<str>,
}

impl Event {
    /// `{"id":N,"time":"RFC 3339","data":<json>}`, appended to `out`.
    pub fn write_json(&self, out: &mut String) {
        use std::fmt::Write;
        let time = UNIX_EPOCH + Duration::from_millis(self.time_ms);
        let _ = write!(
            out,
            "{{\"id\":{},\"time\":\"{}\",\"data\":{}}}",
            self.id,
            humantime::format_rfc3339_millis(time),
            self.data
        );
    }
}

/// What a read found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Events with id > `after`, oldest first.
    pub events: Vec<Event>,
    /// The lowest id still retained; `last_id + 1` when nothing is.
    pub first_id: u64,
    /// The highest id ever given out on this topic (0: none yet).
    pub last_id: u64,
}

impl Batch {
    /// How many events after `after` are gone for good: ids `after+1 ..
    /// first_id-1` were published and are no longer retained. Ids are
    /// contiguous and only the oldest are dropped, so this count is exact.
    pub fn missed(&self, after: u64) -> u64 {
        self.first_id.saturating_sub(after.saturating_add(1))
    }
}

/// A store failed: which store, which topic, and why.
#[derive(Debug)]
pub struct StoreError {
    pub store: &'static str,
    pub topic: String,
    pub cause: String,
    /// An append whose request reached the store (or may have) and got no
    /// answer: the event may be stored. `false`: nothing was stored.
    pub outcome_unknown: bool,
}

impl StoreError {
    /// A failure that changed nothing (for an append: the event is not stored).
    pub fn new(store: &'static str, topic: &str, cause: impl fmt::Display) -> StoreError {
        StoreError {
            store,
            topic: topic.to_string(),
            cause: cause.to_string(),
            outcome_unknown: false,
        }
    }

    /// An append that was sent and not answered: the event may be stored.
    pub fn outcome_unknown(
        store: &'static str,
        topic: &str,
        cause: impl fmt::Display,
    ) -> StoreError {
        StoreError {
            outcome_unknown: true,
            ..StoreError::new(store, topic, cause)
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.topic.as_str() {
            // The store as a whole (opening it): no topic to name.
            "-" | "" => write!(f, "{} event store: {}", self.store, self.cause),
            topic => write!(
                f,
                "{} event store, topic {topic}: {}",
                self.store, self.cause
            ),
        }
    }
}

impl std::error::Error for StoreError {}

/// Milliseconds since the Unix epoch.
pub fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Whether `topic` matches `[A-Za-z0-9._-]{1,128}`. Topic names also become
/// file names and Redis keys, so nothing else is allowed (no `/`, no `:`).
pub fn valid_topic(topic: &str) -> bool {
    (1..=128).contains(&topic.len())
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks that `body` is exactly one JSON value and returns it compact: the
/// white space outside strings removed, everything else byte for byte (numbers
/// keep their exact text). Compact data never contains a line break, which the
/// file log and the `data:` lines of server-sent events rely on.
pub fn compact_json(body: &[u8]) -> Result<String, String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(|e| e.to_string())?;
    let text = std::str::from_utf8(body).map_err(|e| e.to_string())?;
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_by_table() {
        let long = "a".repeat(128);
        let too_long = "a".repeat(129);
        let cases = [
            ("plant-3", true),
            ("A.b_c-9", true),
            ("..", true),
            (long.as_str(), true),
            ("", false),
            (too_long.as_str(), false),
            ("a/b", false),
            ("a:b", false),
            ("a b", false),
            ("é", false),
            ("a%2F", false),
        ];
        for (topic, ok) in cases {
            assert_eq!(valid_topic(topic), ok, "{topic:?}");
        }
    }

    #[test]
    fn json_is_checked_and_compacted() {
        let cases: &[(&str, Option<&str>)] = &[
            ("{\"temp\": 71}", Some("{\"temp\":71}")),
            (" [1, 2,\n 3] \n", Some("[1,2,3]")),
            ("\"a b \\\" c\"", Some("\"a b \\\" c\"")),
            (
                "{\"s\": \"x\\\\\", \"n\": 1.50e3}",
                Some("{\"s\":\"x\\\\\",\"n\":1.50e3}"),
            ),
            ("12345678901234567890123", Some("12345678901234567890123")),
            ("null", Some("null")),
            ("", None),
            ("{\"a\":1", None),
            ("{} {}", None),
            ("nope", None),
        ];
        for (body, want) in cases {
            assert_eq!(
                compact_json(body.as_bytes()).ok().as_deref(),
                *want,
                "{body:?}"
            );
        }
    }

    #[test]
    fn missed_is_the_gap_before_the_oldest_retained() {
        let b = Batch {
            events: vec![],
            first_id: 8,
            last_id: 10,
        };
        assert_eq!(b.missed(0), 7);
        assert_eq!(b.missed(6), 1);
        assert_eq!(b.missed(7), 0);
        assert_eq!(b.missed(10), 0);
        assert_eq!(b.missed(u64::MAX), 0);
    }

    #[test]
    fn event_json_shape() {
        let e = Event {
            id: 3,
            time_ms: 1_700_000_000_123,
            data: Arc::from("{\"a\":1}"),
        };
        let mut out = String::new();
        e.write_json(&mut out);
        assert_eq!(
            out,
            "{\"id\":3,\"time\":\"2023-11-14T22:13:20.123Z\",\"data\":{\"a\":1}}"
        );
    }
}
