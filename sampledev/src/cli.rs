//! Command line of the `sampledev` binary.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use vfio_user::vfio::{VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY};
use vfio_user::{MigState, is_direct_arc};

use crate::options::{DeviceOptions, FailArc, IrqMode, MigMode};

/// Largest --state-size accepted.
const MAX_STATE_SIZE: u64 = 16 << 30;

/// Sample vfio-user PCI device: BAR0 registers, a DMA engine with MSI-X (or INTx) completion,
/// and internal state of configurable size, migratable with VFIO migration v2 or v1.
#[derive(Debug, Parser)]
#[command(name = "sampledev", version)]
pub struct Cli {
    /// UNIX socket to listen on (must not exist yet).
    #[arg(long)]
    pub socket: PathBuf,
    /// Size of the internal state: bytes with an optional K, M or G suffix (powers of 1024),
    /// a multiple of 8.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub state_size: u64,
    /// Interrupt the function offers: msix (4 vectors) or intx (pin INTA#, level-triggered,
    /// no MSI-X capability).
    #[arg(long, value_enum, default_value_t = IrqArg::Msix)]
    pub irq: IrqArg,
    /// Migration interface: v2 (DEVICE_FEATURE + MIG_DATA_READ/WRITE), v1 (migration region),
    /// or none.
    #[arg(long, value_enum, default_value_t = MigArg::V2)]
    pub migration: MigArg,
    /// v2: do not offer the P2P states (RUNNING_P2P, PRE_COPY_P2P).
    #[arg(long)]
    pub no_p2p: bool,
    /// v2: do not offer PRE_COPY.
    #[arg(long)]
    pub no_precopy: bool,
    /// Do not offer DMA logging of the device's writes.
    #[arg(long)]
    pub no_dirty_log: bool,
    /// Make the direct arc FROM:TO (state names, e.g. STOP:STOP_COPY) fail.
    #[arg(long, value_parser = parse_arc)]
    pub fail_arc: Option<(MigState, MigState)>,
    /// How often --fail-arc fails: a number of times, or "always".
    #[arg(long, default_value = "1", value_parser = parse_count)]
    pub fail_arc_count: Count,
    /// Flip one byte of the STOP_COPY data (after its checksum was computed).
    #[arg(long)]
    pub corrupt_stream: bool,
    /// Sleep this many milliseconds before each STOP_COPY data read.
    #[arg(long, value_name = "MS")]
    pub slow_stop_copy: Option<u64>,
    /// Sleep this many milliseconds before answering each BAR0 access.
    #[arg(long, value_name = "MS")]
    pub slow_bar: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IrqArg {
    Msix,
    Intx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MigArg {
    V2,
    V1,
    None,
}

/// `Some(n)`: n times; `None`: always.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub Option<u32>);

impl Cli {
    /// The device these arguments describe; refuses combinations that cannot work.
    pub fn device_options(&self) -> Result<DeviceOptions, String> {
        let mut o = DeviceOptions::new(self.state_size);
        o.irq = match self.irq {
            IrqArg::Msix => IrqMode::Msix,
            IrqArg::Intx => IrqMode::Intx,
        };
        o.mode = match self.migration {
            MigArg::V2 => MigMode::V2,
            MigArg::V1 => MigMode::V1,
            MigArg::None => MigMode::None,
        };
        if self.no_p2p {
            o.v2_flags &= !VFIO_MIGRATION_P2P;
        }
        if self.no_precopy {
            o.v2_flags &= !VFIO_MIGRATION_PRE_COPY;
        }
        o.dirty_log = !self.no_dirty_log;
        o.corrupt_stream = self.corrupt_stream;
        o.slow_stop_copy = self.slow_stop_copy.map(Duration::from_millis);
        o.slow_bar = self.slow_bar.map(Duration::from_millis);
        if let Some((from, to)) = self.fail_arc {
            if !is_direct_arc(from, to, o.fsm_flags()) {
                return Err(format!(
                    "--fail-arc {from}:{to} is not an arc this device has"
                ));
            }
            o.fail_arc = Some(FailArc {
                from,
                to,
                count: self.fail_arc_count.0,
            });
        }
        Ok(o)
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 4096, 64K, 64M or 1G"))?;
    let size = n
        .checked_mul(1 << shift)
        .filter(|&b| b <= MAX_STATE_SIZE)
        .ok_or_else(|| format!("'{s}' exceeds the {MAX_STATE_SIZE}-byte limit"))?;
    if size == 0 || !size.is_multiple_of(8) {
        return Err(format!("'{s}' must be a non-zero multiple of 8 bytes"));
    }
    Ok(size)
}

fn parse_state(s: &str) -> Result<MigState, String> {
    MigState::from_name(s).ok_or_else(|| format!("'{s}' is not a migration state name"))
}

pub fn parse_arc(s: &str) -> Result<(MigState, MigState), String> {
    let (from, to) = s
        .split_once(':')
        .ok_or_else(|| format!("'{s}' is not FROM:TO"))?;
    Ok((parse_state(from)?, parse_state(to)?))
}

pub fn parse_count(s: &str) -> Result<Count, String> {
    if s.eq_ignore_ascii_case("always") {
        return Ok(Count(None));
    }
    match s.parse::<u32>() {
        Ok(n) if n > 0 => Ok(Count(Some(n))),
        _ => Err(format!("'{s}' is not a positive count or 'always'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12").is_err());
        assert!(parse_size("1T").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert!(parse_size("M").is_err());
    }

    #[test]
    fn arcs_and_counts() {
        use MigState::*;
        assert_eq!(parse_arc("stop:stop_copy"), Ok((Stop, StopCopy)));
        assert!(parse_arc("STOP").is_err());
        assert!(parse_arc("STOP:NOPE").is_err());
        assert_eq!(parse_count("always"), Ok(Count(None)));
        assert_eq!(parse_count("3"), Ok(Count(Some(3))));
        assert!(parse_count("0").is_err());
        let cli = |args: &[&str]| {
            let mut v = vec!["sampledev", "--socket", "s"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v).unwrap().device_options()
        };
        assert!(cli(&["--fail-arc", "RUNNING:STOP_COPY"]).is_err());
        assert!(cli(&["--fail-arc", "RUNNING:STOP", "--no-p2p"]).is_ok());
        assert!(cli(&["--fail-arc", "RUNNING:STOP"]).is_err());
        let o = cli(&["--migration", "v1", "--fail-arc", "PRE_COPY:STOP_COPY"]).unwrap();
        assert_eq!(o.mode, MigMode::V1);
        assert_eq!(o.irq, IrqMode::Msix);
        assert_eq!(cli(&["--irq", "intx"]).unwrap().irq, IrqMode::Intx);
        assert!(Cli::try_parse_from(["sampledev", "--socket", "s", "--irq", "msi"]).is_err());
    }
}
