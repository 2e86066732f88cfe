//! The `file` store: one append-only log per topic in `events.path`
//! (`<topic>.log`), each publication written and `fdatasync`'d before its id
//! is answered, so everything acknowledged survives `kill -9` or a crash.
//!
//! A log line is `E <id> <time_ms> <compact json>` or, at the head of a
//! compacted log, `L <last_id>` (which keeps ids from being reused once the
//! events that carried them are gone). Lines never contain a line break
//! inside: the data is compact JSON. On open, a torn last line (the process
//! died mid-write) is cut off. The retained window is also kept in memory, so
//! polls never touch the disk; the log is rewritten (write, fsync, rename)
//! once it holds about twice what is retained.
//!
//! One relay per directory: two relays appending to the same logs would give
//! out the same ids, so the store holds an exclusive `flock` on `.lock` in
//! the directory while it is open, and a second relay stops at start.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use super::memory::Window;
use super::{to_ms, valid_topic, Batch, Event, Retention, Store, StoreError, StoreFuture};

const KIND: &str = "file";

/// The `file` store.
pub struct FileStore {
    dir: PathBuf,
    /// This store's hold on the directory, released when it is dropped.
    _lock: nix::fcntl::Flock<File>,
    retention: Retention,
    // A plain mutex: only map look-ups and inserts, never held across await.
    topics: Mutex<HashMap<String, Arc<TopicLog>>>,
}

struct TopicLog {
    /// Serialises appends; held (in a blocking thread) across write and fsync.
    writer: Mutex<Writer>,
    /// What polls read; locked only briefly.
    window: Mutex<Window>,
}

struct Writer {
    path: PathBuf,
    file: Option<File>,
    /// Bytes of whole lines in the log: a failed write is cut back to this.
    len: u64,
    lines: usize,
    last_id: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FileStore {
    /// Creates `dir` if needed and loads every topic log in it.
    pub fn open(dir: &Path, retention: Retention) -> Result<FileStore, StoreError> {
        let err = |topic: &str, e: io::Error| {
            StoreError::new(KIND, topic, format!("{}: {e}", dir.display()))
        };
        fs::create_dir_all(dir).map_err(|e| err("-", e))?;
        let lock = lock_dir(dir).map_err(|e| {
            let cause = format!("cannot lock {}: {e}", dir.join(".lock").display());
            StoreError::new(KIND, "-", cause)
        })?;
        let mut topics = HashMap::new();
        for entry in fs::read_dir(dir).map_err(|e| err("-", e))? {
            let entry = entry.map_err(|e| err("-", e))?;
            let name = entry.file_name();
            let Some(topic) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
                continue;
            };
            if !valid_topic(topic) {
                continue;
            }
            let log = load(&entry.path(), retention).map_err(|e| err(topic, e))?;
            topics.insert(topic.to_string(), Arc::new(log));
        }
        tracing::info!(dir = %dir.display(), topics = topics.len(), "file event store loaded");
        Ok(FileStore {
            dir: dir.to_path_buf(),
            _lock: lock,
            retention,
            topics: Mutex::new(topics),
        })
    }

    fn topic(&self, topic: &str) -> Option<Arc<TopicLog>> {
        lock(&self.topics).get(topic).cloned()
    }

    fn topic_or_new(&self, topic: &str) -> Arc<TopicLog> {
        lock(&self.topics)
            .entry(topic.to_string())
            .or_insert_with(|| {
                Arc::new(TopicLog {
                    writer: Mutex::new(Writer {
                        path: self.dir.join(format!("{topic}.log")),
                        file: None,
                        len: 0,
                        lines: 0,
                        last_id: 0,
                    }),
                    window: Mutex::default(),
                })
            })
            .clone()
    }
}

/// Takes the directory's `.lock` (exclusive, without waiting) and writes
/// this process's id into it; fails with the holder's id if another relay
/// has it.
fn lock_dir(dir: &Path) -> io::Result<nix::fcntl::Flock<File>> {
    use nix::fcntl::{Flock, FlockArg};
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let holder = if holder.is_empty() { "?" } else { holder };
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "in use by another relay (process {holder} holds it); one relay per directory"
                ),
            ));
        }
        Err((_, errno)) => return Err(io::Error::from(errno)),
    };
    // The pid is for the operator (and the next relay's message) only.
    let noted = locked
        .set_len(0)
        .and_then(|()| writeln!(&mut *locked, "{}", std::process::id()));
    if let Err(e) = noted {
        tracing::warn!(lock = %path.display(), error = %e, "cannot write this process's id into the lock file");
    }
    Ok(locked)
}

/// Reads a topic log, cutting off a torn or corrupt tail.
fn load(path: &Path, retention: Retention) -> io::Result<TopicLog> {
    let bytes = fs::read(path)?;
    let now = SystemTime::now();
    let mut window = Window::default();
    let (mut good, mut lines) = (0usize, 0usize);
    while let Some(end) = memchr::memchr(b'\n', &bytes[good..]).map(|i| good + i) {
        let Some(event) = parse_line(&bytes[good..end], window.last_id()) else {
            break;
        };
        match event {
            Line::Last(id) => window = Window::starting_after(id.max(window.last_id())),
            Line::Event(e) => window.push(e, retention, now),
        }
        good = end + 1;
        lines += 1;
    }
    if good < bytes.len() {
        tracing::warn!(
            log = %path.display(),
            dropped_bytes = bytes.len() - good,
            "event log ends in a torn or corrupt line; cutting it off"
        );
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(good as u64)?;
        file.sync_all()?;
    }
    let file = OpenOptions::new().append(true).open(path)?;
    Ok(TopicLog {
        writer: Mutex::new(Writer {
            path: path.to_path_buf(),
            file: Some(file),
            len: good as u64,
            lines,
            last_id: window.last_id(),
        }),
        window: Mutex::new(window),
    })
}

enum Line {
    Event(Event),
    Last(u64),
}

/// One log line; `None` if it is not a well-formed line continuing after `last_id`.
fn parse_line(line: &[u8], last_id: u64) -> Option<Line> {
    let text = std::str::from_utf8(line).ok()?;
    if let Some(id) = text.strip_prefix("L ") {
        return id.parse().ok().map(Line::Last);
    }
    let mut parts = text.strip_prefix("E ")?.splitn(3, ' ');
    let id: u64 = parts.next()?.parse().ok()?;
    let time_ms: u64 = parts.next()?.parse().ok()?;
    let data = parts.next()?;
    if id <= last_id || serde_json::from_str::<serde::de::IgnoredAny>(data).is_err() {
        return None;
    }
    Some(Line::Event(Event {
        id,
        time_ms,
        data: Arc::from(data),
    }))
}

fn event_line(e: &Event) -> String {
    format!("E {} {} {}\n", e.id, e.time_ms, e.data)
}

/// Appends one event durably; runs in a blocking thread.
/// Appends one event; its id. `Err` says whether the event was stored
/// nonetheless (`true`: written and synced, only the new file's directory
/// entry could not be synced).
fn append_blocking(
    log: &TopicLog,
    time: SystemTime,
    data: &str,
    retention: Retention,
) -> Result<u64, (io::Error, bool)> {
    let not_stored = |e: io::Error| (e, false);
    let mut w = lock(&log.writer);
    let created = w.file.is_none();
    if created {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&w.path)
            .map_err(not_stored)?;
        w.len = file.metadata().map_err(not_stored)?.len();
        w.file = Some(file);
    }
    let event = Event {
        id: w.last_id + 1,
        time_ms: to_ms(time),
        data: Arc::from(data),
    };
    let line = event_line(&event);
    let (len, path) = (w.len, w.path.clone());
    let file = w
        .file
        .as_mut()
        .ok_or_else(|| not_stored(io::Error::other("log not open")))?;
    let written = file
        .write_all(line.as_bytes())
        .and_then(|()| file.sync_data());
    if let Err(e) = written {
        // Nothing partial stays behind: the next append starts on a line boundary.
        let _ = file.set_len(len);
        return Err(not_stored(e));
    }
    // Written and synced: the event is stored, whatever follows (its id is
    // never given out again).
    w.len += line.len() as u64;
    w.lines += 1;
    w.last_id = event.id;
    let id = event.id;
    lock(&log.window).push(event, retention, SystemTime::now());
    if w.lines > 2 * retention.count + 64 {
        // Housekeeping: a failure leaves the longer log, which loads as well.
        if let Err(e) = compact(&mut w, log, retention) {
            tracing::warn!(path = %path.display(), error = %e, "compacting the event log failed; it stays as it is");
        }
    }
    if created {
        sync_dir(&path).map_err(|e| (e, true))?;
    }
    Ok(id)
}

/// Rewrites the log with only the retained events, atomically (write a copy,
/// fsync, rename over, fsync the directory).
fn compact(w: &mut Writer, log: &TopicLog, retention: Retention) -> io::Result<()> {
    let mut text = format!("L {}\n", w.last_id);
    let kept = {
        let mut window = lock(&log.window);
        window.expire(retention, SystemTime::now());
        window.iter().map(event_line).collect::<Vec<_>>()
    };
    for line in &kept {
        text.push_str(line);
    }
    let tmp = w.path.with_extension("log.tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, &w.path)?;
    sync_dir(&w.path)?;
    w.file = Some(OpenOptions::new().append(true).open(&w.path)?);
    w.len = text.len() as u64;
    w.lines = kept.len() + 1;
    Ok(())
}

/// Makes a new or renamed file's directory entry durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

impl Store for FileStore {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn append<'a>(
        &'a self,
        topic: &'a str,
        time: SystemTime,
        data: &'a str,
    ) -> StoreFuture<'a, u64> {
        let log = self.topic_or_new(topic);
        let retention = self.retention;
        let data = data.to_string();
        Box::pin(async move {
            // fsync blocks for milliseconds: keep it off the async workers.
            tokio::task::spawn_blocking(move || append_blocking(&log, time, &data, retention))
                .await
                .map_err(|e| StoreError::new(KIND, topic, e))?
                .map_err(|(e, stored)| match stored {
                    // Readable now; whether it survives a power loss is not known.
                    true => StoreError::outcome_unknown(
                        KIND,
                        topic,
                        format!(
                            "the event was written, its new log's directory entry not synced: {e}"
                        ),
                    ),
                    false => StoreError::new(KIND, topic, e),
                })
        })
    }

    fn read<'a>(&'a self, topic: &'a str, after: u64, limit: usize) -> StoreFuture<'a, Batch> {
        let batch = match self.topic(topic) {
            Some(log) => {
                let mut window = lock(&log.window);
                window.expire(self.retention, SystemTime::now());
                window.read(after, limit)
            }
            None => Batch {
                events: Vec::new(),
                first_id: 1,
                last_id: 0,
            },
        };
        Box::pin(async move { Ok(batch) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::conformance;
    use std::time::Duration;

    const KEEP: Retention = Retention {
        count: 3,
        age: Duration::from_secs(3600),
    };

    #[tokio::test]
    async fn file_store_conformance() {
        for case in conformance::CASES {
            let dir = tempfile::tempdir().unwrap();
            let store = FileStore::open(dir.path(), case.retention()).unwrap();
            conformance::run_case(&store, case).await;
        }
    }

    #[tokio::test]
    async fn reopening_keeps_events_and_ids_continue() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), KEEP).unwrap();
        for i in 1..=5 {
            let id = store
                .append("t", SystemTime::now(), &format!("{{\"k\":{i}}}"))
                .await
                .unwrap();
            assert_eq!(id, i);
        }
        drop(store);
        let store = FileStore::open(dir.path(), KEEP).unwrap();
        let b = store.read("t", 0, 10).await.unwrap();
        assert_eq!(
            b.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!((b.first_id, b.last_id, b.missed(0)), (3, 5, 2));
        assert_eq!(store.append("t", SystemTime::now(), "1").await.unwrap(), 6);
    }

    #[test]
    fn a_second_store_on_the_same_directory_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let first = FileStore::open(dir.path(), KEEP).unwrap();
        let err = FileStore::open(dir.path(), KEEP).err().expect("refused");
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "cannot lock {}: in use by another relay (process {} holds it)",
                dir.path().join(".lock").display(),
                std::process::id(),
            )),
            "{text}"
        );
        drop(first);
        FileStore::open(dir.path(), KEEP).expect("free once the first is closed");
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), KEEP).unwrap();
        store
            .append("t", SystemTime::now(), "{\"a\":1}")
            .await
            .unwrap();
        drop(store);
        let path = dir.path().join("t.log");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"E 2 17000 {\"a\":").unwrap();
        drop(f);
        let store = FileStore::open(dir.path(), KEEP).unwrap();
        assert_eq!(store.read("t", 0, 10).await.unwrap().last_id, 1);
        assert_eq!(store.append("t", SystemTime::now(), "2").await.unwrap(), 2);
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with("2\n") && text.lines().count() == 2,
            "{text:?}"
        );
    }

    #[tokio::test]
    async fn compaction_keeps_the_last_id_when_everything_expired() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), KEEP).unwrap();
        let old = SystemTime::now() - Duration::from_secs(7200);
        for _ in 0..100 {
            store.append("t", old, "0").await.unwrap();
        }
        let lines = fs::read_to_string(dir.path().join("t.log"))
            .unwrap()
            .lines()
            .count();
        assert!(lines < 80, "log was not compacted: {lines} lines");
        drop(store);
        let store = FileStore::open(dir.path(), KEEP).unwrap();
        let b = store.read("t", 0, 10).await.unwrap();
        assert_eq!((b.events.len(), b.last_id, b.missed(0)), (0, 100, 100));
        assert_eq!(
            store.append("t", SystemTime::now(), "0").await.unwrap(),
            101
        );
    }
}
