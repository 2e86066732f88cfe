//! The adaptive keepalive decision of JP5535757B2, as a pure function of the
//! time and of when bytes last crossed the link:
//!
//! - Timer 1 (`idle_ping`, ~30 s): after this much silence, probe;
//! - Timer 2 (`gap_probe`, ~1 s): data arrived and then stopped, or data was
//!   sent and nothing came back: probe soon, a dead path shows up quickly
//!   right when it matters;
//! - Timer 3 (`ping_timeout`, ~3 s): nothing received within this after a
//!   probe means the link is dead.
//!
//! Any byte received after a probe answers it: traffic proves the link alive,
//! so while data flows no probe is sent at all. The clock is a parameter, so
//! the tests drive it by hand.

use std::time::Duration;

use tokio::time::Instant;

/// The three timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub idle_ping: Duration,
    pub gap_probe: Duration,
    pub ping_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            idle_ping: Duration::from_secs(30),
            gap_probe: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(3),
        }
    }
}

/// When bytes last crossed the link (the session start if never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    pub last_rx: Instant,
    pub last_tx: Instant,
}

/// Why a probe is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Timer 1: silence both ways.
    Idle,
    /// Timer 2: data arrived, then stopped.
    Gap,
    /// Timer 2: data was sent and nothing has come back.
    Unanswered,
}

/// What the link should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until this time (or until new bytes are sent).
    Wait(Instant),
    /// Send a probe now.
    Probe(Why),
    /// Timer 3 expired: the link is dead.
    Dead,
}

/// The keepalive state of one link session.
#[derive(Debug, Clone)]
pub struct Keepalive {
    settings: Settings,
    /// Received bytes up to this time are accounted for (answered a probe,
    /// or predate the session): they do not arm Timer 2 again.
    settled: Instant,
    /// When the outstanding probe was sent.
    probe: Option<Instant>,
}

impl Keepalive {
    pub fn new(settings: Settings, now: Instant) -> Keepalive {
        Keepalive {
            settings,
            settled: now,
            probe: None,
        }
    }

    /// Decides what to do at `now`; a `Probe` answer records the probe as sent.
    pub fn poll(&mut self, now: Instant, seen: Activity) -> Action {
        let s = self.settings;
        if let Some(sent) = self.probe {
            if seen.last_rx > sent {
                // Answered (by the probe's reply or by any other traffic).
                self.probe = None;
                self.settled = seen.last_rx;
            } else if now >= sent + s.ping_timeout {
                return Action::Dead;
            } else {
                return Action::Wait(sent + s.ping_timeout);
            }
        }
        let quiet_since = seen.last_rx.max(self.settled);
        let mut due = (quiet_since + s.idle_ping, Why::Idle);
        let mut consider = |at: Instant, why: Why| {
            if at < due.0 {
                due = (at, why);
            }
        };
        if seen.last_rx > self.settled {
            consider(seen.last_rx + s.gap_probe, Why::Gap);
        }
        if seen.last_tx > quiet_since {
            consider(seen.last_tx + s.gap_probe, Why::Unanswered);
        }
        if now >= due.0 {
            self.probe = Some(now);
            Action::Probe(due.1)
        } else {
            Action::Wait(due.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-driven clock: every event is at a whole number of milliseconds
    /// after a fixed start.
    struct Clock(Instant);
    impl Clock {
        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    enum Step {
        /// At `t`, with bytes last received at `rx` and sent at `tx`, expect `want`.
        Poll {
            t: u64,
            rx: u64,
            tx: u64,
            want: Want,
        },
    }
    #[derive(Debug, PartialEq)]
    enum Want {
        Wait(u64),
        Probe(Why),
        Dead,
    }

    fn run(name: &str, steps: &[Step]) {
        let clock = Clock(Instant::now());
        let settings = Settings::default(); // 30 s, 1 s, 3 s
        let mut ka = Keepalive::new(settings, clock.at(0));
        for (i, Step::Poll { t, rx, tx, want }) in steps.iter().enumerate() {
            let seen = Activity {
                last_rx: clock.at(*rx),
                last_tx: clock.at(*tx),
            };
            let got = match ka.poll(clock.at(*t), seen) {
                Action::Wait(at) => Want::Wait(at.duration_since(clock.0).as_millis() as u64),
                Action::Probe(why) => Want::Probe(why),
                Action::Dead => Want::Dead,
            };
            assert_eq!(&got, want, "{name}, step {i} at t={t}ms");
        }
    }

    fn p(t: u64, rx: u64, tx: u64, want: Want) -> Step {
        Step::Poll { t, rx, tx, want }
    }

    #[test]
    fn decisions_by_table() {
        use Want::*;
        run(
            "idle link: Timer 1, answered, then Timer 1 again from the answer",
            &[
                p(0, 0, 0, Wait(30_000)),
                p(29_999, 0, 0, Wait(30_000)),
                p(30_000, 0, 0, Probe(Why::Idle)),
                p(30_000, 0, 30_000, Wait(33_000)),
                p(30_040, 30_040, 30_000, Wait(60_040)),
            ],
        );
        run(
            "data arrives then stops: Timer 2 probe after the gap",
            &[
                p(5_000, 5_000, 4_990, Wait(6_000)),
                p(5_500, 5_500, 4_990, Wait(6_500)),
                p(6_500, 5_500, 4_990, Probe(Why::Gap)),
                // The answer settles it: no new gap probe, Timer 1 from the answer.
                p(6_520, 6_520, 6_500, Wait(36_520)),
            ],
        );
        run(
            "steady traffic proves the link alive: no probe at all",
            &[
                p(900, 900, 900, Wait(1_900)),
                p(1_800, 1_800, 1_790, Wait(2_800)),
                p(2_700, 2_700, 2_690, Wait(3_700)),
                p(30_000, 29_900, 29_900, Wait(30_900)),
            ],
        );
        run(
            "sent and nothing back: Timer 2, then Timer 3 declares it dead",
            &[
                p(10_000, 0, 10_000, Wait(11_000)),
                p(11_000, 0, 10_000, Probe(Why::Unanswered)),
                p(12_000, 0, 11_000, Wait(14_000)),
                p(13_999, 0, 11_000, Wait(14_000)),
                p(14_000, 0, 11_000, Dead),
            ],
        );
        run(
            "any traffic after the probe answers it",
            &[
                p(30_000, 0, 0, Probe(Why::Idle)),
                p(31_000, 30_500, 30_000, Wait(60_500)),
            ],
        );
    }

    #[test]
    fn short_timers_follow_the_settings() {
        let start = Instant::now();
        let settings = Settings {
            idle_ping: Duration::from_secs(60),
            gap_probe: Duration::from_millis(200),
            ping_timeout: Duration::from_millis(500),
        };
        let mut ka = Keepalive::new(settings, start);
        let ms = |n| start + Duration::from_millis(n);
        let seen = Activity {
            last_rx: ms(0),
            last_tx: ms(100),
        };
        assert_eq!(ka.poll(ms(150), seen), Action::Wait(ms(300)));
        assert_eq!(ka.poll(ms(300), seen), Action::Probe(Why::Unanswered));
        assert_eq!(ka.poll(ms(799), seen), Action::Wait(ms(800)));
        assert_eq!(ka.poll(ms(800), seen), Action::Dead);
    }
}
