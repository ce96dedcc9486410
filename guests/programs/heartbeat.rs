//! `HB <seq>` lines at a fixed interval of guest time, fed with clamped TSC deltas
//! (`rt::Clock::step`), so that a stall or a migration gives one late heartbeat and never a
//! burst or a gap in the sequence.
//!
//! Included with `mod heartbeat;`.
#![allow(dead_code)]

pub struct Heartbeat {
    interval: u64,
    elapsed: u64,
    seq: u64,
}

impl Heartbeat {
    pub fn new(tsc_hz: u64, hb_ms: u64) -> Heartbeat {
        Heartbeat {
            interval: (tsc_hz * hb_ms / 1000).max(1),
            elapsed: 0,
            seq: 0,
        }
    }

    /// Prints the next heartbeat now.
    pub fn beat(&mut self) {
        crate::rt::line().s("HB ").u(self.seq);
        self.seq += 1;
    }

    /// Ticks of elapsed time until the next heartbeat is due (at least 1).
    pub fn until_next(&self) -> u64 {
        (self.interval - self.elapsed).max(1)
    }

    /// Adds `ticks` of elapsed time; prints at most one heartbeat per call, and forgets time
    /// beyond one interval, so that a long stall gives a single late heartbeat.
    pub fn advance(&mut self, ticks: u64) {
        self.elapsed += ticks;
        if self.elapsed >= self.interval {
            self.beat();
            self.elapsed -= self.interval;
            if self.elapsed >= self.interval {
                self.elapsed = 0;
            }
        }
    }
}
