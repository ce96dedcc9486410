//! Token-bucket bandwidth limit for the pre-copy stream (`--max-bandwidth`), so a migration
//! does not starve the guest's own network traffic.

use std::time::{Duration, Instant};

pub struct Throttle {
    bytes_per_sec: f64,
    /// Bytes that may still go out now; negative while paying back a chunk sent on credit.
    tokens: f64,
    burst: f64,
    last: Instant,
}

impl Throttle {
    /// A limit of `bytes_per_sec` (> 0) allowing bursts of 50 ms worth of data.
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        Self {
            bytes_per_sec: rate,
            tokens: 0.0,
            burst: rate / 20.0,
            last: Instant::now(),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec as u64
    }

    /// Accounts for `bytes` about to be sent at `now`; returns how long to wait first. The
    /// chunk is sent on credit, so one big chunk does not stall forever at a low limit.
    pub fn delay_at(&mut self, bytes: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.bytes_per_sec).min(self.burst);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(-self.tokens / self.bytes_per_sec)
    }

    /// Sleeps as long as needed before sending `bytes`.
    pub fn consume(&mut self, bytes: u64) {
        let wait = self.delay_at(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_run_rate_matches_the_limit() {
        let mut t = Throttle::new(100 << 20);
        let mut now = Instant::now();
        t.last = now;
        let mut waited = Duration::ZERO;
        for _ in 0..100 {
            let d = t.delay_at(4 << 20, now);
            waited += d;
            now += d;
        }
        // 400 MiB at 100 MiB/s: about 4 s of waiting in total.
        let secs = waited.as_secs_f64();
        assert!((3.9..=4.1).contains(&secs), "{secs}");
    }

    #[test]
    fn idle_time_earns_only_a_bounded_burst() {
        let mut t = Throttle::new(1000);
        let start = Instant::now();
        t.last = start;
        // An hour idle earns at most 50 ms of credit (50 bytes).
        let later = start + Duration::from_secs(3600);
        assert_eq!(t.delay_at(50, later), Duration::ZERO);
        assert_eq!(t.delay_at(100, later), Duration::from_millis(100));
    }
}
