//! Migration statistics, named after QEMU's `query-migrate` where a name fits, and the
//! one-line progress text shown while pre-copy runs.

use std::time::Duration;

use serde::Serialize;

use crate::ranges::PAGE_SIZE;
use crate::send::SendCounters;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    #[default]
    None,
    Setup,
    Active,
    /// Paused, moving the final delta and device/vCPU state.
    Device,
    Completed,
    Failed,
    Cancelled,
}

/// The parts of the downtime, in microseconds (a ~1 ms downtime needs the resolution).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DowntimeBreakdown {
    /// Last dirty collection and memory pass, after the pause.
    pub final_memory: u64,
    /// Reading vCPU, VM and device state on the source (device stop-copy included).
    pub state_save: u64,
    /// Sending that state.
    pub state_transfer: u64,
    /// Loading it on the destination (reported back with `Resumed`).
    pub state_load: u64,
    /// From `Go` to the destination's vCPUs running.
    pub resume: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes put on the wire for memory, headers included.
    pub transferred: u64,
    /// Dirty bytes still to send at the last collection.
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Zero pages, sent as ranges.
    pub duplicate: u64,
    /// Pages sent as bytes.
    pub normal: u64,
    pub normal_bytes: u64,
    pub dirty_pages_rate: u64,
    /// Megabits per second, as QEMU reports bandwidth.
    pub mbps: f64,
    pub pages_per_second: u64,
    /// Dirty-log collections, i.e. pre-copy iterations.
    pub dirty_sync_count: u64,
    pub page_size: u64,
    /// Bytes sent while the guest ran.
    pub precopy_bytes: u64,
    /// Bytes sent while it was paused.
    pub downtime_bytes: u64,
}

impl RamStats {
    /// Adds a pass; `paused` says whether it ran inside the downtime window.
    pub fn add_pass(&mut self, c: &SendCounters, paused: bool) {
        self.transferred += c.wire_bytes;
        self.duplicate += c.zero_pages;
        self.normal += c.normal_pages;
        self.normal_bytes += c.normal_bytes;
        if paused {
            self.downtime_bytes += c.wire_bytes;
        } else {
            self.precopy_bytes += c.wire_bytes;
        }
    }

    /// Fills the rate fields from the totals over `elapsed` of transfer.
    pub fn set_rates(&mut self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if secs > 0.0 {
            self.mbps = self.transferred as f64 * 8.0 / 1e6 / secs;
            self.pages_per_second = ((self.normal + self.duplicate) as f64 / secs) as u64;
        }
    }
}

/// Bytes of device migration data (QEMU's `vfio.transferred`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VfioStats {
    pub transferred: u64,
}

/// The one JSON object printed when a migration ends. Times are milliseconds unless the
/// name says otherwise.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    pub status: Status,
    pub setup_time: u64,
    pub total_time: u64,
    pub downtime: u64,
    pub downtime_us: u64,
    pub expected_downtime: u64,
    pub downtime_breakdown_us: DowntimeBreakdown,
    pub ram: RamStats,
    pub vfio: VfioStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
}

impl MigrationStats {
    pub fn new(total_ram: u64) -> Self {
        Self {
            ram: RamStats {
                total: total_ram,
                page_size: PAGE_SIZE,
                ..RamStats::default()
            },
            ..Self::default()
        }
    }

    /// Sets `downtime` (ms) and `downtime-us` from the measured window.
    pub fn set_downtime(&mut self, downtime: Duration) {
        self.downtime_us = downtime.as_micros() as u64;
        self.downtime = downtime.as_millis() as u64;
    }

    /// One line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error-desc\":\"{e}\"}}"))
    }
}

/// What the progress line shows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub iteration: u64,
    pub transferred: u64,
    pub total_ram: u64,
    pub remaining: u64,
    pub bandwidth: Option<f64>,
    pub dirty_pages_rate: f64,
    pub expected_downtime: Option<Duration>,
    pub elapsed: Duration,
}

/// Renders e.g. `[#####-----]  iter 3  1.20 GiB sent  2.31 GiB/s  dirty 14.2 MiB/s  remaining
/// 4.00 MiB  est. downtime 12 ms  1.4 s` (no newline; the caller redraws with `\r`).
pub fn progress_line(p: &Progress) -> String {
    const WIDTH: u64 = 20;
    let done = p.total_ram.saturating_sub(p.remaining);
    let filled = (done * WIDTH)
        .checked_div(p.total_ram)
        .unwrap_or(0)
        .min(WIDTH) as usize;
    let bar = format!(
        "{}{}",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled)
    );
    let bw = p.bandwidth.map_or_else(
        || "-".to_string(),
        |b| format!("{}/s", human_bytes(b as u64)),
    );
    let dirty = human_bytes((p.dirty_pages_rate * PAGE_SIZE as f64) as u64);
    let est = p
        .expected_downtime
        .map_or_else(|| "-".to_string(), |d| format!("{} ms", d.as_millis()));
    format!(
        "[{bar}]  iter {}  {} sent  {bw}  dirty {dirty}/s  remaining {}  est. downtime {est}  {:.1} s",
        p.iteration,
        human_bytes(p.transferred),
        human_bytes(p.remaining),
        p.elapsed.as_secs_f64()
    )
}

/// Binary units with two decimals: "512 B", "4.00 KiB", "1.20 GiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_uses_query_migrate_names() {
        let mut s = MigrationStats::new(1 << 30);
        s.status = Status::Completed;
        s.set_downtime(Duration::from_micros(1500));
        s.ram.add_pass(
            &SendCounters {
                normal_pages: 10,
                normal_bytes: 40960,
                zero_pages: 5,
                wire_bytes: 41000,
            },
            false,
        );
        s.ram.dirty_sync_count = 3;
        s.ram.set_rates(Duration::from_secs(1));
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(v["status"], "completed");
        assert_eq!(v["downtime"], 1);
        assert_eq!(v["downtime-us"], 1500);
        assert_eq!(v["ram"]["duplicate"], 5);
        assert_eq!(v["ram"]["normal-bytes"], 40960);
        assert_eq!(v["ram"]["dirty-sync-count"], 3);
        assert_eq!(v["ram"]["pages-per-second"], 15);
        assert_eq!(v["ram"]["precopy-bytes"], 41000);
        assert!(v["downtime-breakdown-us"]["state-transfer"].is_u64());
        assert!(v["setup-time"].is_u64() && v["expected-downtime"].is_u64());
        assert!(v.get("error-desc").is_none());
    }

    #[test]
    fn progress_line_shows_the_essentials() {
        let line = progress_line(&Progress {
            iteration: 3,
            transferred: 3 << 29,
            total_ram: 1 << 30,
            remaining: 1 << 28,
            bandwidth: Some((1u64 << 30) as f64),
            dirty_pages_rate: 256.0,
            expected_downtime: Some(Duration::from_millis(12)),
            elapsed: Duration::from_millis(1400),
        });
        assert!(line.starts_with("[###############-----]"), "{line}");
        for part in [
            "iter 3",
            "1.50 GiB sent",
            "1.00 GiB/s",
            "dirty 1.00 MiB/s",
            "12 ms",
            "1.4 s",
        ] {
            assert!(line.contains(part), "{part} missing from {line}");
        }
        assert_eq!(human_bytes(1023), "1023 B");
    }
}
