//! The event hub: validates and stores publications, reads poll answers, and
//! wakes waiting pollers. Shared by every connection through a cheap clone.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::file::FileStore;
use super::memory::MemoryStore;
use super::redis::RedisStore;
use super::waiters::{Full, Slot, Waiters};
use super::{compact_json, valid_topic, Event, Retention, Store, StoreError};
use crate::config::{EventSettings, StoreKind};

/// Most events in one poll answer; the client asks again from `next`.
const MAX_BATCH: usize = 500;
/// Byte budget of one poll answer's event data (at least one event is sent).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// The event hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    store: Box<dyn Store>,
    waiters: Waiters,
    settings: EventSettings,
    /// Topics with at least one event published (here or, with the redis
    /// store, on another relay), with the last id this relay knows of (for
    /// the status page). Polling a topic that never had an event adds nothing:
    /// anyone could poll any name, and each would stay for good. A plain
    /// mutex: one map update, never held across an await.
    seen: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

/// Why a publication was refused.
#[derive(Debug)]
pub enum PublishError {
    BadTopic,
    /// Not one JSON value; the parser's reason.
    NotJson(String),
    TooLarge {
        limit: usize,
    },
    Store(StoreError),
}

/// One poll answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollAnswer {
    pub events: Vec<Event>,
    /// The `after` to use next.
    pub next: u64,
    /// Events after the poller's `after` that it will never see.
    pub missed: u64,
    /// The poller's `after` was beyond the last id the store ever gave out:
    /// the store started again (a `memory` relay restarted, a redis without
    /// persistence), and its ids start again at 1. The answer is from the
    /// store's oldest retained event (as for `after=0`); `missed` counts only
    /// what the new store no longer retains: how many the old one held after
    /// `after` is unknown.
    pub reset: bool,
}

impl PollAnswer {
    /// "No event": nothing to tell a poller that asked for ids after `after`.
    /// A poller ahead of a store that has no event yet has nothing to learn
    /// until one is published: it waits as any other, and the first event
    /// comes with `reset`.
    pub fn nothing_new(&self, after: u64) -> bool {
        self.events.is_empty() && self.missed == 0 && (self.next == after || self.reset)
    }

    /// `{"events":[...],"next":M}`, with `"missed":K` when K > 0 and
    /// `"reset":true` for a poller whose position the store no longer has.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(
            64 + self.events.iter().map(|e| e.data.len() + 64).sum::<usize>(),
        );
        out.push_str("{\"events\":[");
        for (i, e) in self.events.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            e.write_json(&mut out);
        }
        out.push_str("],\"next\":");
        out.push_str(&self.next.to_string());
        if self.missed > 0 {
            out.push_str(",\"missed\":");
            out.push_str(&self.missed.to_string());
        }
        if self.reset {
            out.push_str(",\"reset\":true");
        }
        out.push_str("}\n");
        out
    }
}

impl Hub {
    /// Opens the configured store. The `redis` store starts its notification
    /// listener, so this runs inside the tokio runtime.
    pub fn open(settings: &EventSettings) -> Result<Hub, StoreError> {
        let retention = Retention {
            count: settings.retain,
            age: settings.retain_for,
        };
        let waiters = Waiters::default();
        let store: Box<dyn Store> = match &settings.store {
            StoreKind::Memory => Box::new(MemoryStore::new(retention)),
            StoreKind::File { path } => Box::new(FileStore::open(path, retention)?),
            StoreKind::Redis { url } => {
                Box::new(RedisStore::open(url.expose(), retention, waiters.clone())?)
            }
        };
        tracing::info!(store = store.kind(), retain = settings.retain, retain_for = ?settings.retain_for, "event store ready");
        Ok(Hub {
            inner: Arc::new(Inner {
                store,
                waiters,
                settings: settings.clone(),
                seen: Default::default(),
            }),
        })
    }

    pub fn settings(&self) -> &EventSettings {
        &self.inner.settings
    }

    pub fn store_kind(&self) -> &'static str {
        self.inner.store.kind()
    }

    /// Validates and stores one publication; wakes the topic's pollers.
    pub async fn publish(&self, topic: &str, body: &[u8]) -> Result<u64, PublishError> {
        if !valid_topic(topic) {
            return Err(PublishError::BadTopic);
        }
        let limit = self.inner.settings.max_event_bytes;
        if body.len() > limit {
            return Err(PublishError::TooLarge { limit });
        }
        let data = compact_json(body).map_err(PublishError::NotJson)?;
        let id = self
            .inner
            .store
            .append(topic, SystemTime::now(), &data)
            .await
            .map_err(PublishError::Store)?;
        tracing::debug!(topic, id, bytes = data.len(), "event published");
        self.inner.waiters.wake(topic, id);
        self.note(topic, id);
        Ok(id)
    }

    /// Takes a poller slot on `topic`, within `max_pollers_per_topic` and `max_pollers`.
    pub fn join(&self, topic: &str) -> Result<Slot, Full> {
        let s = &self.inner.settings;
        self.inner
            .waiters
            .join(topic, s.max_pollers_per_topic, s.max_pollers)
    }

    /// Pollers waiting on `topic` now.
    pub fn pollers(&self, topic: &str) -> usize {
        self.inner.waiters.pollers(topic)
    }

    /// The answer for a poller that has seen everything up to `after`.
    pub async fn read(&self, topic: &str, after: u64) -> Result<PollAnswer, StoreError> {
        let mut batch = self.inner.store.read(topic, after, MAX_BATCH).await?;
        // A poller ahead of the store: the store started again (ids are
        // never reused otherwise), and what it holds now is all new to the
        // poller, ids 1, 2... below its `after` included. Read it from the
        // start, as for a new poller, and say so (`reset`); otherwise those
        // events would never be delivered, and nothing would tell.
        let reset = after > batch.last_id;
        let after = if reset {
            batch = self.inner.store.read(topic, 0, MAX_BATCH).await?;
            0
        } else {
            after
        };
        let missed = batch.missed(after);
        let mut events = batch.events;
        let mut bytes = 0;
        if let Some(keep) = events.iter().position(|e| {
            bytes += e.data.len();
            bytes > MAX_BATCH_BYTES
        }) {
            events.truncate(keep.max(1));
        }
        let next = match events.last() {
            Some(e) => e.id,
            // Past the events no longer retained; never beyond the last id.
            None => after
                .max(batch.first_id.saturating_sub(1))
                .min(batch.last_id),
        };
        if batch.last_id > 0 {
            self.note(topic, batch.last_id);
        }
        Ok(PollAnswer {
            events,
            next,
            missed,
            reset,
        })
    }

    fn note(&self, topic: &str, id: u64) {
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a relay with more topics than this shows the first ones.
        if seen.len() < 1000 || seen.contains_key(topic) {
            let last = seen.entry(topic.to_string()).or_insert(0);
            *last = (*last).max(id);
        }
    }

    /// Topics with events, with their last known id and waiting pollers,
    /// and topics with none that someone waits on now (last id 0), by name.
    /// A topic without events is listed only while it has waiters.
    pub fn topics(&self) -> Vec<(String, u64, usize)> {
        let seen = self
            .inner
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut topics: std::collections::BTreeMap<String, (u64, usize)> =
            seen.into_iter().map(|(t, id)| (t, (id, 0))).collect();
        for (topic, pollers) in self.inner.waiters.waiting() {
            topics.entry(topic).or_insert((0, 0)).1 = pollers;
        }
        topics
            .into_iter()
            .map(|(t, (id, pollers))| (t, id, pollers))
            .collect()
    }

    /// `wait` capped by `max_wait`.
    pub fn cap_wait(&self, wait: Duration) -> Duration {
        wait.min(self.inner.settings.max_wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polling names that never had an event leaves nothing behind (the
    /// audit's M1: every polled name stayed on the status page for good):
    /// a topic without events is listed only while someone waits on it.
    async fn polls_leave_no_topic_behind(settings: EventSettings) {
        let hub = Hub::open(&settings).expect("hub");
        for i in 0..50 {
            let topic = format!("ghost-{i}");
            let slot = hub.join(&topic).expect("slot");
            let answer = hub.read(&topic, 0).await.expect("read");
            assert!(answer.nothing_new(0), "{answer:?}");
            drop(slot);
        }
        assert_eq!(hub.topics(), vec![]);

        let waiting = hub.join("new").expect("slot");
        hub.read("new", 0).await.expect("read");
        assert_eq!(hub.topics(), vec![("new".to_string(), 0, 1)]);
        drop(waiting);
        assert_eq!(hub.topics(), vec![]);

        assert_eq!(hub.publish("real", b"1").await.expect("publish"), 1);
        hub.read("real", 0).await.expect("read");
        assert_eq!(hub.topics(), vec![("real".to_string(), 1, 0)]);
    }

    /// A poller ahead of the store (the audit's M4: its store started
    /// again) gets what the store holds from its oldest event, marked
    /// `reset`, instead of an empty answer that skips ids 1..after for good.
    #[tokio::test]
    async fn a_poller_ahead_of_the_store_reads_it_from_the_start() {
        let settings = EventSettings {
            retain: 2,
            ..EventSettings::default()
        };
        let hub = Hub::open(&settings).expect("hub");
        // Nothing published yet: nothing to tell until something is.
        let empty = hub.read("t", 5).await.expect("read");
        assert!(empty.reset && empty.nothing_new(5), "{empty:?}");
        assert_eq!(
            empty.to_json(),
            "{\"events\":[],\"next\":0,\"reset\":true}\n"
        );

        for n in 1..=3 {
            assert_eq!(hub.publish("t", b"{}").await.expect("publish"), n);
        }
        let answer = hub.read("t", 5).await.expect("read");
        let ids: Vec<u64> = answer.events.iter().map(|e| e.id).collect();
        // Id 1 is gone: missed counts what the new store no longer retains.
        assert_eq!((ids, answer.next, answer.missed), (vec![2, 3], 3, 1));
        assert!(answer.reset && !answer.nothing_new(5), "{answer:?}");
        // At the store's position or behind it: no reset.
        assert!(!hub.read("t", 3).await.expect("read").reset);
        assert!(hub.read("t", 3).await.expect("read").nothing_new(3));
        assert!(!hub.read("t", 0).await.expect("read").reset);
    }

    #[tokio::test]
    async fn memory_store_polls_leave_no_topic_behind() {
        polls_leave_no_topic_behind(EventSettings::default()).await;
    }

    #[tokio::test]
    async fn file_store_polls_leave_no_topic_and_no_file_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = EventSettings {
            store: crate::config::StoreKind::File {
                path: dir.path().to_path_buf(),
            },
            ..EventSettings::default()
        };
        polls_leave_no_topic_behind(settings).await;
        let mut logs: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with('.'))
            .collect();
        logs.sort();
        assert_eq!(logs, vec!["real.log".to_string()]);
    }
}
