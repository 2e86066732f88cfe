//! Per-connection timeouts that cost no timer operation per request.
//!
//! `tokio::time::timeout` around each read registers a timer in the runtime's
//! wheel and removes it again: three times per keep-alive request (idle wait,
//! head, response), about 4% of the relay's CPU in a P1 profile. A
//! [`Deadline`] keeps one timer per connection instead. Moving the deadline
//! later only stores an instant; the timer fires at most every `period` and
//! re-arms itself for the current deadline when that has not passed yet.
//!
//! Precision: as long as every timeout set is at least `period`, the timer is
//! never behind the deadline (it was armed at most `period` ago); a shorter
//! timeout re-arms the timer at once.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The deadline passed before the operation completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired;

/// One connection's current deadline and its lazily re-armed timer.
pub struct Deadline {
    at: Instant,
    period: Duration,
    /// Boxed: `Sleep` is `!Unpin` and large; this keeps `Deadline` small and `Unpin`.
    timer: Pin<Box<Sleep>>,
}

impl Deadline {
    /// A deadline `period` from now; `period` should be the shortest timeout
    /// the connection usually sets.
    pub fn new(period: Duration) -> Deadline {
        let at = Instant::now() + period;
        Deadline {
            at,
            period,
            timer: Box::pin(tokio::time::sleep_until(at)),
        }
    }

    /// Moves the deadline to `after` from now.
    pub fn set(&mut self, after: Duration) {
        self.at = Instant::now() + after;
        if self.at < self.timer.deadline() {
            self.timer.as_mut().reset(self.at);
        }
    }

    /// Runs `fut` until it completes or the current deadline passes.
    pub async fn run<F: Future>(&mut self, fut: F) -> Result<F::Output, Expired> {
        let mut fut = pin!(fut);
        poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            self.poll_expired(cx).map(|()| Err(Expired))
        })
        .await
    }

    /// [`Deadline::set`], then [`Deadline::run`].
    pub async fn limit<F: Future>(
        &mut self,
        after: Duration,
        fut: F,
    ) -> Result<F::Output, Expired> {
        self.set(after);
        self.run(fut).await
    }

    /// Runs `fut` with a deadline `after` from the moment it first has to
    /// wait: an operation that completes at once reads no clock.
    pub async fn limit_wait<F: Future>(
        &mut self,
        after: Duration,
        fut: F,
    ) -> Result<F::Output, Expired> {
        let mut fut = pin!(fut);
        let mut armed = false;
        poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            if !armed {
                self.set(after);
                armed = true;
            }
            self.poll_expired(cx).map(|()| Err(Expired))
        })
        .await
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if now >= self.at {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(self.at.min(now + self.period));
        }
        Poll::Pending
    }
}

/// How long a body copy may wait for the sender's next bytes (`read`) and
/// for the receiver to take bytes (`write`), on the connection's deadline.
/// A stalled side past it ends the copy with an `io::ErrorKind::TimedOut`
/// error.
pub struct Stall<'a> {
    pub timer: &'a mut Deadline,
    pub read: Duration,
    pub write: Duration,
}

impl Stall<'_> {
    /// `fut`, a read from the sender, within `read` of waiting.
    pub async fn read<T, F: Future<Output = std::io::Result<T>>>(
        &mut self,
        fut: F,
    ) -> std::io::Result<T> {
        let after = self.read;
        self.within(after, "the sender", fut).await
    }

    /// `fut`, a write to the receiver, within `write` of waiting.
    pub async fn write<T, F: Future<Output = std::io::Result<T>>>(
        &mut self,
        fut: F,
    ) -> std::io::Result<T> {
        let after = self.write;
        self.within(after, "the receiver", fut).await
    }

    async fn within<T, F: Future<Output = std::io::Result<T>>>(
        &mut self,
        after: Duration,
        who: &str,
        fut: F,
    ) -> std::io::Result<T> {
        self.timer
            .limit_wait(after, fut)
            .await
            .unwrap_or_else(|Expired| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{who} moved no byte for {after:?}"),
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The (paused) clock moved by at least `from_ms` and less than `to_ms` since `start`.
    fn took_between(start: Instant, from_ms: u64, to_ms: u64) {
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(from_ms) && took < Duration::from_millis(to_ms),
            "{took:?}"
        );
    }

    /// `limit(after_ms)` on a sleep of `sleep_ms`.
    async fn sleep_within(d: &mut Deadline, after_ms: u64, sleep_ms: u64) -> Result<(), Expired> {
        let sleep = tokio::time::sleep(Duration::from_millis(sleep_ms));
        d.limit(Duration::from_millis(after_ms), sleep).await
    }

    /// `limit(after_ms)` on a future that never completes.
    async fn wait_forever(d: &mut Deadline, after_ms: u64) -> Result<(), Expired> {
        let never = std::future::pending::<()>();
        d.limit(Duration::from_millis(after_ms), never).await
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_the_latest_deadline_not_the_first() {
        let mut d = Deadline::new(Duration::from_secs(1));
        let start = Instant::now();
        // Moved later twice before it could fire.
        assert_eq!(sleep_within(&mut d, 3000, 1500).await, Ok(()));
        assert_eq!(wait_forever(&mut d, 3000).await, Err(Expired));
        took_between(start, 4500, 4600);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_shorter_than_the_period_is_kept() {
        let mut d = Deadline::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(wait_forever(&mut d, 200).await, Err(Expired));
        took_between(start, 200, 300);
    }

    #[tokio::test(start_paused = true)]
    async fn limit_wait_counts_from_the_first_wait() {
        let mut d = Deadline::new(Duration::from_secs(1));
        // Ready at once: the deadline is not moved (it stays 1 s out).
        let ready = d.limit_wait(Duration::from_secs(30), async {}).await;
        assert_eq!(ready, Ok(()));
        let start = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(
            d.limit_wait(Duration::from_millis(500), never).await,
            Err(Expired)
        );
        took_between(start, 500, 600);
        let mut stall = Stall {
            timer: &mut d,
            read: Duration::from_millis(200),
            write: Duration::from_secs(5),
        };
        let e = stall
            .read(std::future::pending::<std::io::Result<()>>())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("the sender moved no byte"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn usable_again_after_expiring() {
        let mut d = Deadline::new(Duration::from_secs(1));
        assert_eq!(wait_forever(&mut d, 1000).await, Err(Expired));
        let start = Instant::now();
        assert_eq!(sleep_within(&mut d, 2000, 1500).await, Ok(()));
        assert_eq!(wait_forever(&mut d, 2000).await, Err(Expired));
        took_between(start, 3500, 3600);
    }
}
