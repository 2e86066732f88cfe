//! A byte stream that records when bytes last crossed it each way, for the
//! keepalive decision (traffic itself proves the link alive), and that can be
//! killed: hyper drives an HTTP/2 connection in a task of its own, and a
//! graceful close over a dead path would wait forever, so the link ends a
//! session by failing its IO, which fails every stream still open on it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::keepalive::Activity;

/// When bytes last moved, as nanoseconds since `base` (0: not yet).
#[derive(Debug)]
pub struct Meter {
    base: Instant,
    rx: AtomicU64,
    tx: AtomicU64,
    /// Woken when bytes are sent after the last ones received: the keepalive
    /// may have to probe sooner than it planned.
    sent_unanswered: Notify,
    killed: AtomicBool,
    /// Tasks blocked on the stream, woken by [`Meter::kill`]. A plain mutex:
    /// held only to swap a waker, never across an await.
    wakers: Mutex<[Option<Waker>; 2]>,
}

impl Meter {
    pub fn new() -> Arc<Meter> {
        Arc::new(Meter {
            base: Instant::now(),
            rx: AtomicU64::new(0),
            tx: AtomicU64::new(0),
            sent_unanswered: Notify::new(),
            killed: AtomicBool::new(false),
            wakers: Mutex::new([None, None]),
        })
    }

    fn stamp(&self) -> u64 {
        // +1 so that a stamp is never the "not yet" zero.
        self.base.elapsed().as_nanos() as u64 + 1
    }

    fn instant(&self, stamp: u64) -> Instant {
        self.base + std::time::Duration::from_nanos(stamp.saturating_sub(1))
    }

    pub fn activity(&self) -> Activity {
        Activity {
            last_rx: self.instant(self.rx.load(Ordering::Relaxed)),
            last_tx: self.instant(self.tx.load(Ordering::Relaxed)),
        }
    }

    /// Completes after bytes were sent with nothing received since.
    pub async fn sent_unanswered(&self) {
        self.sent_unanswered.notified().await
    }

    /// Fails every later read and write, and wakes the tasks waiting on them.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.lock_wakers());
        for waker in wakers.into_iter().flatten() {
            waker.wake();
        }
    }

    /// `Err` once killed; otherwise remembers who to wake (0: reader, 1: writer).
    fn check(&self, slot: usize, cx: &Context<'_>) -> io::Result<()> {
        {
            let mut wakers = self.lock_wakers();
            match &wakers[slot] {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => wakers[slot] = Some(cx.waker().clone()),
            }
        }
        // Checked after registering, so a kill in between still wakes us.
        if self.killed.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "link session ended",
            ));
        }
        Ok(())
    }

    fn lock_wakers(&self) -> std::sync::MutexGuard<'_, [Option<Waker>; 2]> {
        self.wakers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_read(&self) {
        self.rx.store(self.stamp(), Ordering::Relaxed);
    }

    fn on_write(&self) {
        let now = self.stamp();
        let before = self.tx.swap(now, Ordering::Relaxed);
        // Only the first write after a read changes the plan; later ones would
        // wake the keepalive task for nothing.
        if before <= self.rx.load(Ordering::Relaxed) {
            self.sent_unanswered.notify_one();
        }
    }
}

/// `S` with its traffic recorded in a [`Meter`].
pub struct Metered<S> {
    inner: S,
    meter: Arc<Meter>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, meter: Arc<Meter>) -> Metered<S> {
        Metered { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.meter.check(0, cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.meter.on_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.meter.check(1, cx) {
            return Poll::Ready(Err(e));
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.meter.on_write();
        }
        polled
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.meter.check(1, cx) {
            return Poll::Ready(Err(e));
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.meter.on_write();
        }
        polled
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
