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
//! - Failures: redis runs a command it has received even after the relay
//!   gave up waiting (a paused or overloaded server runs it later), so a
//!   publish that got no answer may be stored. Only a publish that never
//!   reached redis (no connection) or that redis refused with an error reply
//!   is "not stored" (503, retry safe); one sent and not answered within
//!   [`TIMEOUT`], or whose connection broke before the answer, is "outcome
//!   unknown" (504). Hence one connection of our own, not redis-rs's
//!   `ConnectionManager`, which reconnects inside the command call.

use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Script, Value};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::waiters::Waiters;
use super::{to_ms, Batch, Event, Retention, Store, StoreError, StoreFuture};

const KIND: &str = "redis";
const NOTIFY_PREFIX: &str = "porthole:notify:";
/// Connecting and each command. Past it, a poll fails with 503; so does a
/// publish that found no connection, while a publish whose command was sent
/// gets 504, its outcome unknown (see [`RedisStore::append`]).
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
    /// The shared (multiplexed) connection with its generation, made on
    /// first use, so a relay starts even while redis is down, and made again
    /// after it broke. Kept here rather than in a redis `ConnectionManager`,
    /// which reconnects inside the command call: a failed publish must tell
    /// "never sent" (a failed connect) from "sent, no answer".
    conn: tokio::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
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
            conn: tokio::sync::Mutex::new(None),
            retention,
            append: Script::new(APPEND),
            read: Script::new(READ),
            _listener: stop.drop_guard(),
        })
    }

    /// The connection, made when there is none; a poll or publish waits at
    /// most [`TIMEOUT`] for it (the next one tries again). Nothing has been
    /// sent to redis when this fails. Returns the connection's generation,
    /// for [`RedisStore::forget`].
    async fn conn(&self, topic: &str) -> Result<(u64, MultiplexedConnection), StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(TIMEOUT)
            .set_response_timeout(TIMEOUT);
        let connect = async {
            let mut slot = self.conn.lock().await;
            if let Some(conn) = slot.as_ref() {
                return Ok(conn.clone());
            }
            let conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *slot = Some((generation, conn.clone()));
            Ok::<_, RedisError>((generation, conn))
        };
        match tokio::time::timeout(TIMEOUT, connect).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(StoreError::new(KIND, topic, e)),
            Err(_) => Err(StoreError::new(
                KIND,
                topic,
                format!("no connection to redis within {TIMEOUT:?}"),
            )),
        }
    }

    /// Drops the connection of `generation` after it broke, so that the
    /// next call connects again (a newer one is kept).
    async fn forget(&self, generation: u64, e: &RedisError) {
        if e.is_unrecoverable_error() {
            let mut slot = self.conn.lock().await;
            if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
                tracing::warn!(error = %e, "redis connection lost; reconnecting on next use");
                *slot = None;
            }
        }
    }
}

/// Generations of connections, to drop only the one that broke.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether a failed append certainly stored nothing: redis itself refused it
/// with an error reply (`LOADING`, `READONLY`, `OOM`, a script error: the
/// append script cannot fail after its `XADD`, as `PEXPIRE` and `PUBLISH` do
/// not). Anything else (no answer within [`TIMEOUT`], the connection broke,
/// an answer that could not be read) came after the command was sent, and
/// the script may have run.
fn refused_by_redis(e: &RedisError) -> bool {
    use redis::ErrorKind::*;
    matches!(
        e.kind(),
        ResponseError
            | ExecAbortError
            | BusyLoadingError
            | NoScriptError
            | Moved
            | Ask
            | TryAgain
            | ClusterDown
            | CrossSlot
            | MasterDown
            | ReadOnly
            | NotBusy
            | ExtensionError
    )
}

/// A command's failure, in words a client can act on.
fn command_error(e: &RedisError) -> String {
    if e.is_timeout() {
        format!("no answer from redis within {TIMEOUT:?}")
    } else {
        e.to_string()
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
            // Failing here, nothing was sent: the publisher may retry (503).
            let (generation, mut conn) = self.conn(topic).await?;
            let ttl = u64::try_from(self.retention.age.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            let appended = self
                .append
                .key(stream_key(topic))
                .key(counter_key(topic))
                .arg(to_ms(time))
                .arg(data)
                .arg(self.retention.count)
                .arg(ttl)
                .arg(format!("{NOTIFY_PREFIX}{topic}"))
                .invoke_async::<u64>(&mut conn)
                .await;
            match appended {
                Ok(id) => Ok(id),
                Err(e) if refused_by_redis(&e) => Err(StoreError::new(KIND, topic, e)),
                Err(e) => {
                    // Sent: redis may have run the script, or run it later
                    // (a paused or slow server does), so a retry could store
                    // the event twice.
                    self.forget(generation, &e).await;
                    Err(StoreError::outcome_unknown(KIND, topic, command_error(&e)))
                }
            }
        })
    }

    fn read<'a>(&'a self, topic: &'a str, after: u64, limit: usize) -> StoreFuture<'a, Batch> {
        Box::pin(async move {
            let (generation, mut conn) = self.conn(topic).await?;
            let cutoff = to_ms(self.retention.cutoff(SystemTime::now()));
            let values: Result<Vec<Value>, RedisError> = self
                .read
                .key(stream_key(topic))
                .key(counter_key(topic))
                // Lua numbers are doubles: keep `after` where they are exact.
                .arg(after.min(1 << 52))
                .arg(limit)
                .arg(cutoff)
                .invoke_async(&mut conn)
                .await;
            // A read changes nothing a retry could duplicate: always 503.
            let values = match values {
                Ok(values) => values,
                Err(e) => {
                    self.forget(generation, &e).await;
                    return Err(StoreError::new(KIND, topic, command_error(&e)));
                }
            };
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
