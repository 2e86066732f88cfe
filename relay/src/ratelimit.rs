//! Requests per second per client address: one token bucket per address,
//! refilled at the configured rate, holding at most one second's worth.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked before idle (full) buckets are dropped.
const MAX_TRACKED: usize = 10_000;

#[derive(Default)]
pub struct RateLimiter {
    /// A plain mutex: each section is one map update and never awaits.
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// Takes one token for `ip` at `now`; `Err` says how long until one is free.
    pub fn check(&self, ip: IpAddr, per_second: u32, now: Instant) -> Result<(), Duration> {
        let ip = ip.to_canonical();
        let rate = f64::from(per_second.max(1));
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&ip) {
            // A full bucket is the same as no bucket: forget those.
            buckets.retain(|_, b| refill(*b, rate, now) < rate);
        }
        let bucket = buckets.entry(ip).or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        let tokens = refill(*bucket, rate, now);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *bucket = Bucket { tokens, at: now };
            Err(Duration::from_secs_f64((1.0 - tokens) / rate))
        }
    }
}

fn refill(b: Bucket, rate: f64, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * rate).min(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_by_table() {
        let limiter = RateLimiter::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // 2 per second: a burst of two, then one every 500 ms.
        let steps = [
            (a, 0, true),
            (a, 0, true),
            (a, 0, false),
            (b, 0, true),
            (a, 250, false),
            (a, 500, true),
            (a, 600, false),
            (a, 3000, true),
            (a, 3000, true),
            (a, 3000, false),
        ];
        for (i, (ip, at, ok)) in steps.into_iter().enumerate() {
            assert_eq!(limiter.check(ip, 2, ms(at)).is_ok(), ok, "step {i}");
        }
        let wait = limiter.check(a, 2, ms(3000)).unwrap_err();
        assert!(
            wait <= Duration::from_millis(500) && wait > Duration::ZERO,
            "{wait:?}"
        );
    }
}
