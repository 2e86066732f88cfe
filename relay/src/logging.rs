//! Process logging for both binaries: `tracing` lines (access lines
//! included) to standard error through a bounded queue and a writer thread
//! of their own. A reader of standard error that falls behind or stops (a
//! full pipe, a throttled journal) therefore never stalls a connection
//! worker, which would stop serving after a pipe's worth of lines. Past the
//! queue, lines are dropped and counted: `porthole_log_lines_dropped_total`
//! on `/metrics`, and a warning once the count has grown.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines queued for the writer thread before new ones are dropped (at most
/// some 20 MB of access lines).
const QUEUE_LINES: usize = 64 * 1024;
/// How often the count of dropped lines is looked at for the warning.
const DROP_CHECK: Duration = Duration::from_secs(10);

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Keeps the writer thread; dropping it writes out what is queued.
#[must_use = "dropping it stops the log writer"]
pub struct Logging {
    _guard: WorkerGuard,
}

/// Installs the process's `tracing` subscriber, filtered by `RUST_LOG`
/// (`info` when unset or invalid). Call once, before the first line.
pub fn init(format: Format) -> Logging {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("porthole-log")
        .finish(std::io::stderr());
    let counter = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        Format::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        Format::Json => builder.json().init(),
    }
    if DROPPED.set(counter.clone()).is_ok() {
        let watch = std::thread::Builder::new()
            .name("porthole-logdrop".into())
            .spawn(move || warn_on_drops(&counter));
        if let Err(e) = watch {
            tracing::warn!(error = %e, "cannot start the dropped-log-lines watch");
        }
    }
    Logging { _guard: guard }
}

/// Lets something through at most once every `secs` seconds, across
/// threads: the warning a flood would otherwise repeat on every event.
pub struct Every {
    secs: u64,
    /// Seconds since the Unix epoch of the last time it was due.
    last: std::sync::atomic::AtomicU64,
}

impl Every {
    pub const fn new(secs: u64) -> Every {
        Every {
            secs,
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether it is due now (and if so, not again for `secs`).
    pub fn due(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Relaxed);
        now >= last.saturating_add(self.secs)
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }
}

/// Log lines dropped so far because the writer could not keep up (0 when
/// [`init`] was not called, as in tests that embed the relay).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Says so, once the writer has room again, whenever lines were dropped.
fn warn_on_drops(counter: &ErrorCounter) {
    let mut reported = 0;
    loop {
        std::thread::sleep(DROP_CHECK);
        let dropped = counter.dropped_lines();
        if dropped > reported {
            tracing::warn!(
                dropped = dropped - reported,
                total = dropped,
                "log lines dropped: standard error is not read fast enough"
            );
            reported = dropped;
        }
    }
}
