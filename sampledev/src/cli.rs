//! Command line of the `sampledev` binary.

use std::path::PathBuf;

use clap::Parser;

/// Largest --state-size accepted.
const MAX_STATE_SIZE: u64 = 16 << 30;

/// Sample vfio-user PCI device: BAR0 registers, a DMA engine with MSI-X completion, and
/// internal state of configurable size.
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
}
