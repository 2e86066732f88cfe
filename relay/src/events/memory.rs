//! The `memory` store (default): each topic's retained events in a ring
//! bounded by `retain` (count) and `retain_for` (age). Gone on restart.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::{to_ms, Batch, Event, Retention, Store, StoreFuture};

/// One topic's retained events, shared with the `file` store (which keeps
/// the same window in memory and its log on disk).
#[derive(Debug, Default)]
pub struct Window {
    events: VecDeque<Event>,
    last_id: u64,
}

impl Window {
    /// A window that continues after `last_id` (ids never go back).
    pub fn starting_after(last_id: u64) -> Window {
        Window {
            events: VecDeque::new(),
            last_id,
        }
    }

    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Adds an event with the next id (or, for the file store's replay, the
    /// id it had) and drops what the retention no longer allows.
    pub fn push(&mut self, event: Event, retention: Retention, now: SystemTime) {
        self.last_id = self.last_id.max(event.id);
        self.events.push_back(event);
        self.expire(retention, now);
    }

    /// Drops events over the count or older than the age limit.
    pub fn expire(&mut self, retention: Retention, now: SystemTime) {
        while self.events.len() > retention.count {
            self.events.pop_front();
        }
        let cutoff = to_ms(retention.cutoff(now));
        while self.events.front().is_some_and(|e| e.time_ms < cutoff) {
            self.events.pop_front();
        }
    }

    /// The events after `after`, at most `limit`.
    pub fn read(&self, after: u64, limit: usize) -> Batch {
        let first_id = self.events.front().map_or(self.last_id + 1, |e| e.id);
        // Ids in the window are contiguous: index arithmetic finds `after`.
        let skip =
            usize::try_from(after.saturating_add(1).saturating_sub(first_id)).unwrap_or(usize::MAX);
        Batch {
            events: self.events.iter().skip(skip).take(limit).cloned().collect(),
            first_id,
            last_id: self.last_id,
        }
    }

    /// Every retained event, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }
}

/// The `memory` store.
pub struct MemoryStore {
    retention: Retention,
    // A plain mutex: sections copy a few events and never await.
    topics: Mutex<HashMap<String, Window>>,
}

impl MemoryStore {
    pub fn new(retention: Retention) -> MemoryStore {
        MemoryStore {
            retention,
            topics: Mutex::default(),
        }
    }

    fn append_now(&self, topic: &str, time: SystemTime, data: &str) -> u64 {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let window = topics.entry(topic.to_string()).or_default();
        let id = window.last_id() + 1;
        let event = Event {
            id,
            time_ms: to_ms(time),
            data: Arc::from(data),
        };
        window.push(event, self.retention, SystemTime::now());
        id
    }

    fn read_now(&self, topic: &str, after: u64, limit: usize) -> Batch {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        match topics.get_mut(topic) {
            Some(window) => {
                window.expire(self.retention, SystemTime::now());
                window.read(after, limit)
            }
            None => Batch {
                events: Vec::new(),
                first_id: 1,
                last_id: 0,
            },
        }
    }
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn append<'a>(
        &'a self,
        topic: &'a str,
        time: SystemTime,
        data: &'a str,
    ) -> StoreFuture<'a, u64> {
        let id = self.append_now(topic, time, data);
        Box::pin(async move { Ok(id) })
    }

    fn read<'a>(&'a self, topic: &'a str, after: u64, limit: usize) -> StoreFuture<'a, Batch> {
        let batch = self.read_now(topic, after, limit);
        Box::pin(async move { Ok(batch) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::conformance;

    #[tokio::test]
    async fn memory_store_conformance() {
        for case in conformance::CASES {
            let store = MemoryStore::new(case.retention());
            conformance::run_case(&store, case).await;
        }
    }
}
