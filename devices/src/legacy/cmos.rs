//! The MC146818 CMOS RTC at ports 0x70 (index) / 0x71 (data). Linux reads the wall clock from it
//! at boot; it shows the host's UTC time, so after a migration the guest reads the destination
//! host's clock, which is what a real machine's battery-backed clock would show. Clock writes are
//! ignored (the guest cannot set the host clock), and no RTC interrupts are generated. The rest
//! of the 128-byte RAM is plain storage.

use std::time::{SystemTime, UNIX_EPOCH};

use migration::state::{Persist, StateError};
use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;

pub const CMOS_BASE: u64 = 0x70;
pub const CMOS_LEN: u64 = 2;

const ID: &str = "cmos";
const RAM_SIZE: usize = 128;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const DAY_OF_WEEK: u8 = 0x06;
const DAY_OF_MONTH: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// Update-in-progress: never set, because each read computes the time at once.
const REG_A_UIP: u8 = 0x80;
/// 32.768 kHz time base, 1024 Hz periodic rate: the power-on value.
const REG_A_DEFAULT: u8 = 0x26;
const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
const HOURS_PM: u8 = 0x80;
/// Valid RAM and time: the battery is good.
const REG_D_VRT: u8 = 0x80;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    pub index: u8,
    pub nmi_disabled: bool,
    /// All 128 bytes; the clock registers in it are unused because the clock is read live.
    pub ram: Vec<u8>,
}

pub struct Cmos {
    index: u8,
    nmi_disabled: bool,
    ram: [u8; RAM_SIZE],
    clock: fn() -> u64,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

fn host_unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Calendar fields of a UTC instant.
#[derive(Debug, PartialEq, Eq)]
struct DateTime {
    year: u64,
    month: u8,
    day: u8,
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

/// Howard Hinnant's days-to-civil algorithm, restricted to dates from 1970 on.
fn date_time(unix_seconds: u64) -> DateTime {
    let days = unix_seconds / 86_400;
    let secs = unix_seconds % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    // All narrowings below are of values already reduced into small ranges.
    DateTime {
        year,
        month: month as u8,
        day: day as u8,
        // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
        weekday: ((days + 4) % 7 + 1) as u8,
        hour: (secs / 3_600) as u8,
        minute: (secs / 60 % 60) as u8,
        second: (secs % 60) as u8,
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

impl Cmos {
    pub fn new() -> Self {
        Self::with_clock(host_unix_seconds)
    }

    /// Reads the time from `clock` (seconds since the Unix epoch, UTC) instead of the host's
    /// clock, for deterministic guests and tests.
    pub fn with_clock(clock: fn() -> u64) -> Self {
        let mut ram = [0u8; RAM_SIZE];
        ram[usize::from(REG_A)] = REG_A_DEFAULT;
        // BCD and 24-hour mode, as PC firmware leaves it.
        ram[usize::from(REG_B)] = REG_B_24H;
        Cmos {
            index: 0,
            nmi_disabled: false,
            ram,
            clock,
        }
    }

    /// A clock field in the format register B asks for.
    fn clock_field(&self, value: u8) -> u8 {
        if self.ram[usize::from(REG_B)] & REG_B_BINARY != 0 {
            value
        } else {
            to_bcd(value)
        }
    }

    fn hours(&self, hour: u8) -> u8 {
        if self.ram[usize::from(REG_B)] & REG_B_24H != 0 {
            return self.clock_field(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        let pm = if hour >= 12 { HOURS_PM } else { 0 };
        self.clock_field(h12) | pm
    }

    fn read_data(&self) -> u8 {
        let now = || date_time((self.clock)());
        match self.index {
            SECONDS => self.clock_field(now().second),
            MINUTES => self.clock_field(now().minute),
            HOURS => self.hours(now().hour),
            DAY_OF_WEEK => self.clock_field(now().weekday),
            DAY_OF_MONTH => self.clock_field(now().day),
            MONTH => self.clock_field(now().month),
            // Both are below 100 for any year before 10000.
            YEAR => self.clock_field((now().year % 100) as u8),
            CENTURY => self.clock_field((now().year / 100 % 100) as u8),
            REG_A => self.ram[usize::from(REG_A)] & !REG_A_UIP,
            // No interrupt sources, so no flags; reading C would clear them anyway.
            REG_C => 0,
            REG_D => REG_D_VRT,
            i => self.ram[usize::from(i)],
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.index {
            SECONDS | MINUTES | HOURS | DAY_OF_WEEK | DAY_OF_MONTH | MONTH | YEAR | CENTURY => {
                log::debug!(
                    "cmos: guest write {v:#04x} to clock register {:#04x} ignored",
                    self.index
                );
            }
            REG_A => self.ram[usize::from(REG_A)] = v & !REG_A_UIP,
            REG_C | REG_D => {}
            i => self.ram[usize::from(i)] = v,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            // The index register is write-only on PC chipsets.
            0 => 0xff,
            1 => self.read_data(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            0 => {
                // Bit 7 of the index port gates NMIs on PCs; kept so it migrates, nothing else.
                self.nmi_disabled = v & 0x80 != 0;
                self.index = v & 0x7f;
            }
            1 => self.write_data(v),
            _ => {}
        }
    }
}

impl Persist for Cmos {
    type State = CmosState;
    const ID: &'static str = ID;

    fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            nmi_disabled: self.nmi_disabled,
            ram: self.ram.to_vec(),
        }
    }

    fn restore(&mut self, state: &CmosState) -> Result<(), StateError> {
        let incompatible = |reason: String| StateError::Incompatible {
            id: ID.to_string(),
            reason,
        };
        if usize::from(state.index) >= RAM_SIZE {
            return Err(incompatible(format!(
                "index {:#x} out of range",
                state.index
            )));
        }
        self.ram = state.ram.as_slice().try_into().map_err(|_| {
            incompatible(format!(
                "{} bytes of RAM, expected {RAM_SIZE}",
                state.ram.len()
            ))
        })?;
        self.index = state.index;
        self.nmi_disabled = state.nmi_disabled;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::state::{Migratable, encode};

    // 2024-02-29 13:05:09 UTC, a Thursday.
    const LEAP_DAY: u64 = 1_709_211_909;

    fn leap_day() -> u64 {
        LEAP_DAY
    }

    fn reg(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, &[index]);
        let mut b = [0u8];
        cmos.read(1, &mut b);
        b[0]
    }

    #[test]
    fn calendar_conversion() {
        assert_eq!(
            date_time(0),
            DateTime {
                year: 1970,
                month: 1,
                day: 1,
                weekday: 5,
                hour: 0,
                minute: 0,
                second: 0
            }
        );
        assert_eq!(
            date_time(LEAP_DAY),
            DateTime {
                year: 2024,
                month: 2,
                day: 29,
                weekday: 5,
                hour: 13,
                minute: 5,
                second: 9
            }
        );
        // 2000-03-01 (after a century leap day), a Wednesday.
        let d = date_time(951_868_800);
        assert_eq!((d.year, d.month, d.day, d.weekday), (2000, 3, 1, 4));
        // 2100-03-01: 2100 is not a leap year, so Feb 28 is followed by Mar 1.
        let d = date_time(4_107_542_400 - 86_400);
        assert_eq!((d.year, d.month, d.day), (2100, 2, 28));
        let d = date_time(4_107_542_400);
        assert_eq!((d.year, d.month, d.day), (2100, 3, 1));
    }

    #[test]
    fn clock_reads_in_bcd_24h_by_default() {
        let mut c = Cmos::with_clock(leap_day);
        assert_eq!(reg(&mut c, SECONDS), 0x09);
        assert_eq!(reg(&mut c, MINUTES), 0x05);
        assert_eq!(reg(&mut c, HOURS), 0x13);
        assert_eq!(reg(&mut c, DAY_OF_WEEK), 0x05);
        assert_eq!(reg(&mut c, DAY_OF_MONTH), 0x29);
        assert_eq!(reg(&mut c, MONTH), 0x02);
        assert_eq!(reg(&mut c, YEAR), 0x24);
        assert_eq!(reg(&mut c, CENTURY), 0x20);
        assert_eq!(reg(&mut c, REG_A) & REG_A_UIP, 0);
        assert_eq!(reg(&mut c, REG_D), REG_D_VRT);
    }

    #[test]
    fn binary_and_12h_modes_follow_register_b() {
        let mut c = Cmos::with_clock(leap_day);
        c.write(0, &[REG_B]);
        c.write(1, &[REG_B_BINARY]);
        assert_eq!(reg(&mut c, HOURS), 1 | HOURS_PM);
        assert_eq!(reg(&mut c, YEAR), 24);
        c.write(0, &[REG_B]);
        c.write(1, &[REG_B_24H | REG_B_BINARY]);
        assert_eq!(reg(&mut c, HOURS), 13);
    }

    #[test]
    fn clock_writes_ignored_ram_kept_and_index_masked() {
        let mut c = Cmos::with_clock(leap_day);
        c.write(0, &[SECONDS]);
        c.write(1, &[0x59]);
        assert_eq!(reg(&mut c, SECONDS), 0x09);
        // Index written with the NMI-disable bit still selects register 0x40.
        c.write(0, &[0x80 | 0x40]);
        c.write(1, &[0xab]);
        assert_eq!(reg(&mut c, 0x40), 0xab);
        let mut b = [0u8];
        c.read(0, &mut b);
        assert_eq!(b[0], 0xff);
    }

    #[test]
    fn state_round_trip_and_validation() {
        let mut c = Cmos::with_clock(leap_day);
        c.write(0, &[0x40]);
        c.write(1, &[0x77]);
        c.write(0, &[0x80 | 0x41]);
        let bytes = c.save_state().unwrap();

        let mut dst = Cmos::with_clock(leap_day);
        dst.restore_state(&bytes).unwrap();
        assert_eq!(dst.state(), c.state());
        assert!(dst.state().nmi_disabled);
        assert_eq!(reg(&mut dst, 0x40), 0x77);

        let mut bad = c.state();
        bad.ram.pop();
        assert!(dst.restore_state(&encode(&bad).unwrap()).is_err());
        let mut bad = c.state();
        bad.index = 0x80;
        assert!(dst.restore_state(&encode(&bad).unwrap()).is_err());
    }

    #[test]
    fn host_clock_is_plausible() {
        let mut c = Cmos::new();
        // Any host running this is past 2020.
        assert!(reg(&mut c, CENTURY) == 0x20 && reg(&mut c, YEAR) >= 0x20);
    }
}
