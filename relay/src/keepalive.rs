//! Adaptive keepalive for long-lived links (JP5535757B2): a pure decision
//! driven by the caller's clock, so it can be tested without waiting.
//!
//! - Timer 1, `idle_ping`: nothing received for this long: send a ping.
//! - Timer 2, `gap_probe`: data was arriving and then stopped: probe this soon
//!   after the last data, once per gap (a dead peer shows up quickly while it
//!   matters, not 30 s later).
//! - Timer 3, `ping_timeout`: a ping or probe unanswered this long: the link
//!   is dead; the caller closes it and reconnects.
//!
//! Anything received proves the link alive, so no ping is sent while traffic flows.

use std::time::{Duration, Instant};

use crate::config::Keepalive;

/// What the link should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until this instant (or until something is received).
    WaitUntil(Instant),
    /// Send a ping now (then call [`Tracker::ping_sent`]).
    Ping,
    /// The peer did not answer in time.
    Dead,
}

/// The keepalive state of one link.
#[derive(Debug, Clone)]
pub struct Tracker {
    timers: Keepalive,
    last_received: Instant,
    /// When data (not a keepalive answer) last arrived, while a gap may need probing.
    data_gap_since: Option<Instant>,
    ping_outstanding: Option<Instant>,
}

impl Tracker {
    pub fn new(timers: Keepalive, now: Instant) -> Tracker {
        Tracker {
            timers,
            last_received: now,
            data_gap_since: None,
            ping_outstanding: None,
        }
    }

    /// Something arrived. `data` is true for payload, false for a keepalive answer.
    pub fn received(&mut self, now: Instant, data: bool) {
        self.last_received = now;
        self.ping_outstanding = None;
        self.data_gap_since = if data { Some(now) } else { None };
    }

    pub fn ping_sent(&mut self, now: Instant) {
        self.ping_outstanding = Some(now);
        // A probe answers for the current gap; the next gap starts with new data.
        self.data_gap_since = None;
    }

    /// The decision at `now`.
    pub fn next(&self, now: Instant) -> Action {
        if let Some(sent) = self.ping_outstanding {
            let deadline = sent + self.timers.ping_timeout;
            return if now >= deadline {
                Action::Dead
            } else {
                Action::WaitUntil(deadline)
            };
        }
        let idle_at = self.last_received + self.timers.idle_ping;
        let due = match self.data_gap_since {
            Some(last_data) => (last_data + self.timers.gap_probe).min(idle_at),
            None => idle_at,
        };
        if now >= due {
            Action::Ping
        } else {
            Action::WaitUntil(due)
        }
    }

    /// How long the link has been silent.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_received)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timers() -> Keepalive {
        Keepalive {
            idle_ping: Duration::from_secs(30),
            gap_probe: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(3),
        }
    }

    #[test]
    fn idle_link_pings_every_timer_1_and_dies_after_timer_3() {
        let t0 = Instant::now();
        let mut k = Tracker::new(timers(), t0);
        let s = Duration::from_secs;
        assert_eq!(k.next(t0), Action::WaitUntil(t0 + s(30)));
        assert_eq!(k.next(t0 + s(30)), Action::Ping);
        k.ping_sent(t0 + s(30));
        assert_eq!(k.next(t0 + s(31)), Action::WaitUntil(t0 + s(33)));
        assert_eq!(k.next(t0 + s(33)), Action::Dead);
    }

    #[test]
    fn an_answer_restarts_the_idle_timer() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut k = Tracker::new(timers(), t0);
        k.ping_sent(t0 + s(30));
        k.received(t0 + s(31), false);
        assert_eq!(k.next(t0 + s(32)), Action::WaitUntil(t0 + s(61)));
    }

    #[test]
    fn a_data_gap_is_probed_after_timer_2_once() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut k = Tracker::new(timers(), t0);
        // Traffic flowing: every arrival pushes the probe back; no ping while data proves the link.
        for i in 1..=10 {
            k.received(t0 + ms(100 * i), true);
            assert_eq!(
                k.next(t0 + ms(100 * i + 50)),
                Action::WaitUntil(t0 + ms(100 * i + 1000))
            );
        }
        // Data stops at 1.0 s: the probe goes out at 2.0 s, not at 31 s.
        assert_eq!(k.next(t0 + ms(2000)), Action::Ping);
        k.ping_sent(t0 + ms(2000));
        assert_eq!(k.next(t0 + ms(5000)), Action::Dead);
        // Answered instead: back to the idle timer, no second probe for the same gap.
        let mut k2 = k.clone();
        k2.received(t0 + ms(2100), false);
        assert_eq!(k2.next(t0 + ms(3000)), Action::WaitUntil(t0 + ms(32_100)));
    }
}
