//! Who is waiting on which topic: the poller limits (per topic and in total)
//! and the wake-up of every waiting poller when a topic gets a new event,
//! whether it was published here or (with the redis store) on another relay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Which poller limit was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `max_pollers_per_topic`.
    Topic,
    /// `max_pollers`.
    Total,
}

/// The waiting pollers of every topic. Cheap to clone.
#[derive(Clone, Default)]
pub struct Waiters {
    // A plain mutex: every section is a map update or a channel send and
    // never awaits, so contention is a few hundred nanoseconds at most.
    inner: Arc<Mutex<Map>>,
}

#[derive(Default)]
struct Map {
    topics: HashMap<String, Topic>,
    total: usize,
}

struct Topic {
    pollers: usize,
    /// Carries the newest id known; every send wakes every receiver.
    wake: watch::Sender<u64>,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, Map> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a poller on `topic` if the limits allow it. The slot is given
    /// back when dropped.
    pub fn join(&self, topic: &str, per_topic: usize, total: usize) -> Result<Slot, Full> {
        let mut map = self.lock();
        if map.total >= total {
            return Err(Full::Total);
        }
        let entry = map
            .topics
            .entry(topic.to_string())
            .or_insert_with(|| Topic {
                pollers: 0,
                wake: watch::channel(0).0,
            });
        if entry.pollers >= per_topic {
            return Err(Full::Topic);
        }
        entry.pollers += 1;
        let wake = entry.wake.subscribe();
        map.total += 1;
        Ok(Slot {
            waiters: self.clone(),
            topic: topic.to_string(),
            wake,
        })
    }

    /// Wakes every poller waiting on `topic` (no-op when none is).
    pub fn wake(&self, topic: &str, id: u64) {
        if let Some(t) = self.lock().topics.get(topic) {
            t.wake.send_replace(id);
        }
    }

    /// Wakes every waiting poller: they re-read their topic. Used when
    /// notifications from other relays may have been lost (a reconnect).
    pub fn wake_all(&self) {
        for t in self.lock().topics.values() {
            t.wake.send_modify(|_| {});
        }
    }

    /// Pollers waiting on `topic` now.
    pub fn pollers(&self, topic: &str) -> usize {
        self.lock().topics.get(topic).map_or(0, |t| t.pollers)
    }

    /// The topics someone waits on now, with their number of pollers. A
    /// topic's entry goes with its last poller.
    pub fn waiting(&self) -> Vec<(String, usize)> {
        let map = self.lock();
        map.topics
            .iter()
            .map(|(topic, t)| (topic.clone(), t.pollers))
            .collect()
    }

    /// Pollers waiting in total.
    pub fn total(&self) -> usize {
        self.lock().total
    }
}

/// One poller's place; holds the topic's wake-up receiver.
pub struct Slot {
    waiters: Waiters,
    topic: String,
    wake: watch::Receiver<u64>,
}

impl Slot {
    /// Completes when the topic is woken after this slot was taken or after
    /// the previous call returned. Publications between joining and the first
    /// read are not lost: the receiver remembers them.
    pub async fn woken(&mut self) {
        if self.wake.changed().await.is_err() {
            // The sender lives as long as any slot of the topic: unreachable,
            // but never spin if it happens.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        map.total = map.total.saturating_sub(1);
        if let Some(t) = map.topics.get_mut(&self.topic) {
            t.pollers = t.pollers.saturating_sub(1);
            if t.pollers == 0 {
                map.topics.remove(&self.topic);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn limits_per_topic_and_total() {
        let w = Waiters::default();
        let a1 = w.join("a", 2, 3).unwrap();
        let _a2 = w.join("a", 2, 3).unwrap();
        assert_eq!(w.join("a", 2, 3).err(), Some(Full::Topic));
        let _b1 = w.join("b", 2, 3).unwrap();
        assert_eq!(w.join("c", 2, 3).err(), Some(Full::Total));
        drop(a1);
        assert_eq!(w.pollers("a"), 1);
        let _c1 = w.join("c", 2, 3).unwrap();
        assert_eq!(w.total(), 3);
    }

    #[test]
    fn empty_topics_are_forgotten() {
        let w = Waiters::default();
        drop(w.join("a", 1, 1).unwrap());
        assert!(w.lock().topics.is_empty());
        assert_eq!(w.total(), 0);
    }

    #[tokio::test]
    async fn a_wake_before_waiting_is_not_lost() {
        let w = Waiters::default();
        let mut slot = w.join("a", 10, 10).unwrap();
        w.wake("a", 1);
        tokio::time::timeout(Duration::from_secs(1), slot.woken())
            .await
            .expect("woken");
        w.wake("other", 2);
        let again = tokio::time::timeout(Duration::from_millis(50), slot.woken()).await;
        assert!(again.is_err(), "woken by another topic");
        w.wake_all();
        tokio::time::timeout(Duration::from_secs(1), slot.woken())
            .await
            .expect("woken by wake_all");
    }
}
