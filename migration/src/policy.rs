//! Pre-copy convergence: measure bandwidth and dirty rate, estimate the downtime a switchover
//! would cost now, and decide to keep iterating, switch over, or give up.
//!
//! Estimated downtime = (remaining dirty bytes + device stop-copy bytes) / bandwidth + a fixed
//! allowance for vCPU/VM/device state and resume (QEMU's and cloud-hypervisor's model plus the
//! non-memory part, which matters once device state is large).
//!
//! Fitting the limit is not the end: while one more pass would at least halve the memory left
//! for the downtime (the guest dirties less during a short pass than the pass removes), and
//! that memory still takes longer than `settle_floor` to send, pre-copy goes on. A guest
//! dirtying 20000 pages/s thus switches over with a few hundred pages left instead of the
//! thousands dirtied during the long first pass, for one or two extra passes of a few ms.

use std::time::Duration;

use crate::ranges::PAGE_SIZE;

/// What to do when the timeout passes without convergence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TimeoutAction {
    /// Give up; the source keeps running the guest (default, as cloud-hypervisor's `cancel`).
    #[default]
    Cancel,
    /// Switch over anyway and accept the longer downtime.
    SwitchOver,
}

#[derive(Clone, Copy, Debug)]
pub struct PolicyConfig {
    pub downtime_limit: Duration,
    pub timeout: Duration,
    pub on_timeout: TimeoutAction,
    /// Non-memory part of the downtime: state save, transfer and load, and resume.
    pub state_allowance: Duration,
    /// Weight of the newest bandwidth sample in the moving average.
    pub ewma_weight: f64,
    /// Passes that moved less than this are too short to say anything about bandwidth (they
    /// mostly measure the socket buffer).
    pub min_sample_bytes: u64,
    /// Memory that sends in less than this goes in the downtime without another pass.
    pub settle_floor: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            timeout: Duration::from_secs(3600),
            on_timeout: TimeoutAction::Cancel,
            state_allowance: Duration::from_millis(5),
            ewma_weight: 0.5,
            min_sample_bytes: 1 << 20,
            settle_floor: Duration::from_millis(2),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Continue,
    SwitchOver,
    GiveUp,
}

#[derive(Clone, Debug)]
pub struct Convergence {
    cfg: PolicyConfig,
    bandwidth: Option<f64>,
    /// Rate of the latest pass however small, used only while `bandwidth` is unknown: an idle
    /// guest's passes may never reach `min_sample_bytes`, and must still converge.
    small_sample: Option<f64>,
    dirty_rate: f64,
}

impl Convergence {
    pub fn new(cfg: PolicyConfig) -> Self {
        Self {
            cfg,
            bandwidth: None,
            small_sample: None,
            dirty_rate: 0.0,
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Records a pass that put `bytes` on the wire in `elapsed`.
    pub fn record_pass(&mut self, bytes: u64, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if bytes == 0 || secs <= 0.0 {
            return;
        }
        let sample = bytes as f64 / secs;
        if !sample.is_finite() || sample <= 0.0 {
            return;
        }
        if bytes < self.cfg.min_sample_bytes {
            self.small_sample = Some(sample);
            return;
        }
        let w = self.cfg.ewma_weight.clamp(0.0, 1.0);
        self.bandwidth = Some(match self.bandwidth {
            Some(bw) => w * sample + (1.0 - w) * bw,
            None => sample,
        });
    }

    /// Records a dirty-log collection that found `pages` dirtied over `interval`.
    pub fn record_dirty(&mut self, pages: u64, interval: Duration) {
        let secs = interval.as_secs_f64();
        if secs > 0.0 {
            self.dirty_rate = pages as f64 / secs;
        }
    }

    /// Bytes per second, once a pass was long enough to measure.
    pub fn bandwidth(&self) -> Option<f64> {
        self.bandwidth
    }

    /// Pages dirtied per second, from the latest collection.
    pub fn dirty_rate(&self) -> f64 {
        self.dirty_rate
    }

    /// Downtime if the source paused now with `remaining` dirty bytes and `device_bytes` of
    /// device stop-copy data; `None` while bandwidth is unknown and there is data to move.
    pub fn estimate_downtime(&self, remaining: u64, device_bytes: u64) -> Option<Duration> {
        let bytes = remaining.saturating_add(device_bytes);
        let transfer = match (bytes, self.bandwidth.or(self.small_sample)) {
            (0, _) => Duration::ZERO,
            // A near-zero bandwidth gives an estimate too large for Duration: saturate.
            (_, Some(bw)) if bw > 0.0 => {
                Duration::try_from_secs_f64(bytes as f64 / bw).unwrap_or(Duration::MAX)
            }
            _ => return None,
        };
        Some(transfer.saturating_add(self.cfg.state_allowance))
    }

    /// The decision after a dirty collection. `devices_acked`: every device's initial
    /// pre-copy data has been loaded by the destination (switchover-ack).
    pub fn decide(
        &self,
        elapsed: Duration,
        remaining: u64,
        device_bytes: u64,
        devices_acked: bool,
    ) -> Decision {
        let fits = self
            .estimate_downtime(remaining, device_bytes)
            .is_some_and(|d| d <= self.cfg.downtime_limit);
        let late = elapsed >= self.cfg.timeout;
        if fits && devices_acked {
            if !late && self.another_pass_pays(remaining) {
                return Decision::Continue;
            }
            return Decision::SwitchOver;
        }
        if late {
            return match self.cfg.on_timeout {
                TimeoutAction::Cancel => Decision::GiveUp,
                TimeoutAction::SwitchOver => Decision::SwitchOver,
            };
        }
        Decision::Continue
    }

    /// Whether a pass over `remaining` bytes would leave at most half of them dirty again,
    /// at the measured bandwidth and dirty rate, and is long enough to be worth it.
    fn another_pass_pays(&self, remaining: u64) -> bool {
        let Some(bw) = self.bandwidth else {
            return false;
        };
        let pass = remaining as f64 / bw;
        let dirtied = self.dirty_rate * PAGE_SIZE as f64 * pass;
        pass > self.cfg.settle_floor.as_secs_f64() && dirtied <= remaining as f64 / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn conv() -> Convergence {
        Convergence::new(PolicyConfig::default())
    }

    #[test]
    fn bandwidth_is_an_ewma_of_long_enough_passes() {
        let mut c = conv();
        c.record_pass(1000, Duration::from_micros(1)); // too small for the average
        assert_eq!(c.bandwidth(), None);
        c.record_pass(1000 * MIB, Duration::from_secs(1));
        assert_eq!(c.bandwidth(), Some(1000.0 * MIB as f64));
        c.record_pass(500 * MIB, Duration::from_secs(1));
        assert_eq!(c.bandwidth(), Some(750.0 * MIB as f64));
    }

    #[test]
    fn idle_guest_converges_on_small_passes() {
        let mut c = conv();
        // An idle guest's pass: a few zero ranges, far below the averaging threshold.
        c.record_pass(4096, Duration::from_millis(1));
        assert_eq!(c.bandwidth(), None);
        let d = c.estimate_downtime(8192, 0).unwrap();
        assert!(d < Duration::from_millis(10), "{d:?}");
        assert_eq!(
            c.decide(Duration::ZERO, 8192, 0, true),
            Decision::SwitchOver
        );
    }

    #[test]
    fn estimate_includes_devices_and_state_allowance() {
        let mut c = conv();
        assert_eq!(c.estimate_downtime(0, 0), Some(Duration::from_millis(5)));
        assert_eq!(c.estimate_downtime(MIB, 0), None);
        c.record_pass(1000 * MIB, Duration::from_secs(1));
        // 100 MiB memory + 100 MiB device at 1000 MiB/s = 200 ms, + 5 ms.
        let d = c.estimate_downtime(100 * MIB, 100 * MIB).unwrap();
        assert_eq!(d.as_millis(), 205);
    }

    #[test]
    fn switches_over_when_under_the_limit_and_acked() {
        let mut c = conv();
        c.record_pass(1000 * MIB, Duration::from_secs(1));
        c.record_dirty(250_000, Duration::from_secs(1)); // a pass would not shrink it
        let t = Duration::from_secs(10);
        assert_eq!(c.decide(t, 200 * MIB, 0, true), Decision::SwitchOver);
        assert_eq!(c.decide(t, 400 * MIB, 0, true), Decision::Continue);
        assert_eq!(c.decide(t, 200 * MIB, 0, false), Decision::Continue);
        assert_eq!(c.decide(t, 200 * MIB, 200 * MIB, true), Decision::Continue);
    }

    #[test]
    fn timeout_cancels_or_forces_switchover() {
        let mut c = conv();
        c.record_pass(10 * MIB, Duration::from_secs(1));
        let late = Duration::from_secs(3600);
        assert_eq!(c.decide(late, 1 << 30, 0, true), Decision::GiveUp);
        let c = Convergence::new(PolicyConfig {
            on_timeout: TimeoutAction::SwitchOver,
            ..PolicyConfig::default()
        });
        assert_eq!(c.decide(late, 1 << 30, 0, true), Decision::SwitchOver);
    }

    #[test]
    fn tiny_bandwidth_saturates_instead_of_panicking() {
        let mut c = Convergence::new(PolicyConfig {
            min_sample_bytes: 0,
            ..PolicyConfig::default()
        });
        c.record_pass(0, Duration::from_secs(1)); // no information: ignored
        assert_eq!(c.bandwidth(), None);
        c.record_pass(1, Duration::from_secs(1_000_000_000));
        assert_eq!(c.estimate_downtime(u64::MAX, u64::MAX), Some(Duration::MAX));
    }

    #[test]
    fn goes_on_while_a_pass_would_halve_what_the_downtime_sends() {
        let mut c = conv();
        c.record_pass(1000 * MIB, Duration::from_secs(1));
        let t = Duration::from_secs(1);
        // 20000 pages/s = 78 MiB/s: a 10 ms pass over 10 MiB leaves ~0.8 MiB dirty.
        c.record_dirty(20_000, Duration::from_secs(1));
        assert_eq!(c.decide(t, 10 * MIB, 0, true), Decision::Continue);
        // Under the floor (1 MiB = 1 ms at this bandwidth): not worth a pass.
        assert_eq!(c.decide(t, MIB, 0, true), Decision::SwitchOver);
        // 200000 pages/s = 781 MiB/s: a pass would leave most of it dirty again.
        c.record_dirty(200_000, Duration::from_secs(1));
        assert_eq!(c.decide(t, 10 * MIB, 0, true), Decision::SwitchOver);
        // At the timeout a fitting migration switches over rather than polishing.
        c.record_dirty(0, Duration::from_secs(1));
        let late = Duration::from_secs(3600);
        assert_eq!(c.decide(late, 10 * MIB, 0, true), Decision::SwitchOver);
    }

    #[test]
    fn dirty_rate_is_pages_per_second() {
        let mut c = conv();
        c.record_dirty(5000, Duration::from_millis(500));
        assert_eq!(c.dirty_rate(), 10000.0);
    }
}
