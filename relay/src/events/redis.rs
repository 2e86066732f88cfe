//! The `redis` store: one Redis Stream per topic, so several relays sharing a
//! redis-server serve the same topics with the same ids.
//!
//! - Ids: a per-topic counter (`INCR`) and `XADD <id>-0`, in one Lua script,
//!   so concurrent publishers on different relays get 1, 2, 3... with no gap
//!   and no reuse; the counter outlives the stream, which expires when idle.
//! - Retention: `XADD MAXLEN = retain` (exact, so `missed` is exact), and the
//!   read script drops entries older than `retain_for` before reading.
//! - Wake-up across relays: the append script also `PUBLISH`es the id on
//!   `porthole:notify:<topic>`; every relay keeps ONE pub/sub connection
//!   (`PSUBSCRIBE porthole:notify:*`) and wakes its local pollers. Chosen over
//!   `XREAD BLOCK`, which would hold one redis connection per waiting topic,
//!   and over short polling, which costs latency and load per poller.
//!   Pub/sub is at most once: after every (re)subscription all local pollers
//!   re-read their topic, so a notification lost in a reconnect delays no one.

use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tokio::sync::OnceCell;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::waiters::Waiters;
use super::{to_ms, Batch, Event, Retention, Store, StoreError, StoreFuture};

const KIND: &str = "redis";
const NOTIFY_PREFIX: &str = "porthole:notify:";
/// Connecting and each command; a poll or publish fails with 503 past it.
const TIMEOUT: Duration = Duration::from_secs(3);

const APPEND: &str = r"
-- KEYS[1] stream, KEYS[2] id counter; ARGV time_ms, data, maxlen, ttl_ms, channel
if redis.call('EXISTS', KEYS[2]) == 0 then
  -- The counter was lost: continue after the stream's newest id, never reuse.
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #top > 0 then redis.call('SET', KEYS[2], string.match(top[1][1], '^(%d+)')) end
end
local id = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], string.format('%d-0', id), 't', ARGV[1], 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[5], id)
return id
";

const READ: &str = r"
-- KEYS[1] stream, KEYS[2] id counter; ARGV after, limit, cutoff_ms
-- Returns last, first, then id, time_ms, data for each event.
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local cutoff = tonumber(ARGV[3])
while true do
  local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #head == 0 or tonumber(head[1][2][2]) >= cutoff then break end
  redis.call('XDEL', KEYS[1], head[1][1])
end
local first = last + 1
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #head > 0 then first = tonumber(string.match(head[1][1], '^(%d+)')) end
local out = {last, first}
local from = string.format('%d-0', tonumber(ARGV[1]) + 1)
for _, e in ipairs(redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', ARGV[2])) do
  table.insert(out, tonumber(string.match(e[1], '^(%d+)')))
  table.insert(out, e[2][2])
  table.insert(out, e[2][4])
end
return out
";

/// The `redis` store.
pub struct RedisStore {
    client: redis::Client,
    /// Connected on first use, so a relay starts even while redis is down.
    conn: OnceCell<ConnectionManager>,
    retention: Retention,
    append: Script,
    read: Script,
    /// Stops the notification listener when the store is dropped.
    _listener: DropGuard,
}

fn stream_key(topic: &str) -> String {
    // The hash tag keeps a topic's keys in one slot should redis be a cluster.
    format!("porthole:events:{{{topic}}}")
}

fn counter_key(topic: &str) -> String {
    format!("porthole:seq:{{{topic}}}")
}

impl RedisStore {
    /// Checks the URL and starts the notification listener (needs a runtime).
    pub fn open(
        url: &str,
        retention: Retention,
        waiters: Waiters,
    ) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::new(KIND, "-", e))?;
        let stop = CancellationToken::new();
        tokio::spawn(listen(client.clone(), waiters, stop.clone()));
        Ok(RedisStore {
            client,
            conn: OnceCell::new(),
            retention,
            append: Script::new(APPEND),
            read: Script::new(READ),
            _listener: stop.drop_guard(),
        })
    }

    /// The connection, made on first use; a poll or publish waits at most
    /// [`TIMEOUT`] for it (the next one tries again).
    async fn conn(&self, topic: &str) -> Result<ConnectionManager, StoreError> {
        // redis-rs hands `factor` to backon as a multiplier of a 1 s first
        // delay: its default of 100 made a refused first connection wait
        // about 100 s before the retry. One retry, after at most 1 s.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(TIMEOUT)
            .set_response_timeout(TIMEOUT)
            .set_number_of_retries(1)
            .set_factor(1)
            .set_max_delay(1_000);
        let connect = self
            .conn
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config));
        match tokio::time::timeout(TIMEOUT, connect).await {
            Ok(Ok(conn)) => Ok(conn.clone()),
            Ok(Err(e)) => Err(StoreError::new(KIND, topic, e)),
            Err(_) => Err(StoreError::new(
                KIND,
                topic,
                format!("no connection to redis within {TIMEOUT:?}"),
            )),
        }
    }
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn append<'a>(
        &'a self,
        topic: &'a str,
        time: SystemTime,
        data: &'a str,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let mut conn = self.conn(topic).await?;
            let ttl = u64::try_from(self.retention.age.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            self.append
                .key(stream_key(topic))
                .key(counter_key(topic))
                .arg(to_ms(time))
                .arg(data)
                .arg(self.retention.count)
                .arg(ttl)
                .arg(format!("{NOTIFY_PREFIX}{topic}"))
                .invoke_async::<u64>(&mut conn)
                .await
                .map_err(|e| StoreError::new(KIND, topic, e))
        })
    }

    fn read<'a>(&'a self, topic: &'a str, after: u64, limit: usize) -> StoreFuture<'a, Batch> {
        Box::pin(async move {
            let mut conn = self.conn(topic).await?;
            let cutoff = to_ms(self.retention.cutoff(SystemTime::now()));
            let values: Vec<Value> = self
                .read
                .key(stream_key(topic))
                .key(counter_key(topic))
                // Lua numbers are doubles: keep `after` where they are exact.
                .arg(after.min(1 << 52))
                .arg(limit)
                .arg(cutoff)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| StoreError::new(KIND, topic, e))?;
            decode(&values).map_err(|e| StoreError::new(KIND, topic, e))
        })
    }
}

/// Turns the read script's flat answer into a [`Batch`].
fn decode(values: &[Value]) -> Result<Batch, String> {
    let num = |v: &Value| redis::from_redis_value::<u64>(v).map_err(|e| e.to_string());
    let [last, first, rest @ ..] = values else {
        return Err("short answer from the read script".into());
    };
    if rest.len() % 3 != 0 {
        return Err("malformed answer from the read script".into());
    }
    let mut events = Vec::with_capacity(rest.len() / 3);
    for e in rest.chunks_exact(3) {
        let data: String = redis::from_redis_value(&e[2]).map_err(|e| e.to_string())?;
        events.push(Event {
            id: num(&e[0])?,
            time_ms: num(&e[1])?,
            data: data.into(),
        });
    }
    Ok(Batch {
        events,
        first_id: num(first)?,
        last_id: num(last)?,
    })
}

/// Keeps one pub/sub connection and wakes local pollers on every
/// notification; reconnects with back-off until `stop`.
async fn listen(client: redis::Client, waiters: Waiters, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = async {
            let mut pubsub = tokio::time::timeout(TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            pubsub
                .psubscribe(format!("{NOTIFY_PREFIX}*"))
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!("redis event notifications subscribed");
            // Anything published while unsubscribed: every poller re-reads.
            waiters.wake_all();
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let Some(topic) = msg.get_channel_name().strip_prefix(NOTIFY_PREFIX) else {
                    continue;
                };
                let id = msg.get_payload::<u64>().unwrap_or(0);
                waiters.wake(topic, id);
            }
            Err::<(), String>("subscription connection closed".into())
        };
        let started = std::time::Instant::now();
        let ended = tokio::select! {
            () = stop.cancelled() => return,
            ended = session => ended,
        };
        if let Err(e) = ended {
            tracing::warn!(error = %e, retry_in = ?backoff, "redis event notifications lost");
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
