//! Command-line interface: `run`, `receive`, `migrate`, `ctl`, `guests`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use devices::serial::SerialOutput;

use crate::devices_setup::Passthrough;

#[derive(Parser, Debug)]
#[command(
    name = "minivmm",
    version,
    about = "A small KVM VMM that live-migrates guests with passthrough devices"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a kernel or an embedded test guest.
    Run(RunArgs),
    /// Send a request to a running minivmm's control socket and print the reply.
    Ctl {
        #[arg(long)]
        api_sock: PathBuf,
        /// status | pause | resume | shutdown | migrate | migration-status
        cmd: String,
        /// Extra key=value fields for the request (e.g. to=127.0.0.1:4444 for migrate).
        args: Vec<String>,
    },
    /// List the embedded test guests.
    Guests {
        /// Also write each guest's ELF image to DIR/NAME.elf (e.g. for QEMU's -kernel).
        #[arg(long, value_name = "DIR")]
        extract: Option<PathBuf>,
    },
    /// Write a test CA and a certificate for each side of a migration (DIR/source,
    /// DIR/destination: what --tls-dir takes), valid for HOSTS.
    Certs {
        dir: PathBuf,
        /// IP addresses and DNS names the certificates name, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
        hosts: Vec<String>,
        /// Certificates that expired long ago (for testing refusals).
        #[arg(long, hide = true)]
        expired: bool,
        /// Sign with the CA an earlier `minivmm certs CA_DIR` made instead of a new one.
        #[arg(long, value_name = "CA_DIR")]
        ca: Option<PathBuf>,
    },
    /// Wait for one live migration on HOST:PORT, then run the VM it brings.
    Receive(ReceiveArgs),
    /// Live-migrate the VM of a running minivmm (found by its control socket) to a destination.
    Migrate {
        #[arg(long)]
        api_sock: PathBuf,
        /// Destination HOST:PORT (a `minivmm receive --listen`).
        #[arg(long, required_unless_present = "cancel")]
        to: Option<String>,
        /// Cancel the migration in progress instead (the guest keeps running here).
        #[arg(long, conflicts_with = "to")]
        cancel: bool,
        #[command(flatten)]
        tuning: MigrationTuning,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ReceiveArgs {
    #[arg(long)]
    pub listen: String,
    /// The destination's own passthrough devices, matching the source's in order
    /// (`PATH[,pre-copy=on|off]`, as for `run`).
    #[arg(long, value_name = "PATH[,OPTS]", value_parser = parse_vfio)]
    pub vfio: Vec<Passthrough>,
    #[arg(long, value_name = "SOCKET[,OPTS]", value_parser = parse_vfio_user)]
    pub vfio_user: Vec<Passthrough>,

    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// stdio | file:PATH | null
    #[arg(long, default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialOutput,
    /// Mutual TLS: DIR holds ca.pem (the CA sources must be signed by), cert.pem and key.pem
    /// (this destination); without it the listener takes plaintext migrations.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Seconds a connecting peer has for its whole handshake (TLS, hello, description);
    /// a peer that does not make it is dropped and the next one is waited for.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Exit (non-zero) if no migration was accepted within SECS; waits forever by default.
    #[arg(long, value_name = "SECS")]
    pub accept_timeout: Option<u64>,
    /// Seconds any read or write of the migration may wait for the peer.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub peer_timeout: u64,
    /// Largest guest RAM a source may bring (e.g. 8G); by default the host's MemAvailable
    /// less 256 MiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Take only a VM with exactly this much RAM.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Take only a VM with exactly this many vCPUs.
    #[arg(long)]
    pub vcpus: Option<u16>,
}

#[derive(Args, Debug, Clone)]
pub struct MigrationTuning {
    /// Longest acceptable pause of the guest, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Bandwidth cap for pre-copy in bytes per second (e.g. 100M); unlimited by default.
    #[arg(long, value_parser = parse_size)]
    pub max_bandwidth: Option<u64>,
    /// Give up (the guest keeps running on the source) after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Migrate passthrough devices that cannot report their DMA writes anyway, treating all
    /// their DMA-mapped RAM as dirty on every pass (otherwise such a device blocks migration).
    #[arg(long)]
    pub force_dirty_dma: bool,
    /// Mutual TLS: DIR holds ca.pem (the CA both sides trust), cert.pem and key.pem (this
    /// side); without it the migration stream is plaintext (`minivmm certs` makes test ones).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Seconds any read or write of the migration may wait for the destination.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub peer_timeout: u64,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Kernel image: ELF vmlinux or bzImage.
    #[arg(long, conflicts_with = "guest", required_unless_present = "guest")]
    pub kernel: Option<PathBuf>,
    /// Name of an embedded test guest (see `minivmm guests`).
    #[arg(long)]
    pub guest: Option<String>,
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest RAM, e.g. 512M or 4G.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub memory: u64,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u16,
    /// stdio | file:PATH | null
    #[arg(long, default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialOutput,
    /// UNIX socket for the JSON-lines control API.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Pass a host PCI device through with kernel VFIO (/sys/bus/pci/devices/BDF); repeatable.
    /// Options after commas: pre-copy=off migrates the device in stop-copy only.
    #[arg(long, value_name = "PATH[,OPTS]", value_parser = parse_vfio)]
    pub vfio: Vec<Passthrough>,
    /// Pass through the device a vfio-user server (e.g. sampledev) serves on SOCKET; repeatable.
    /// Options after commas: pre-copy=off migrates the device in stop-copy only.
    #[arg(long, value_name = "SOCKET[,OPTS]", value_parser = parse_vfio_user)]
    pub vfio_user: Vec<Passthrough>,
    /// Live-migrate the VM to this HOST:PORT once it runs.
    #[arg(long)]
    pub migrate_to: Option<String>,
    /// Seconds to run before migrating.
    #[arg(long, default_value_t = 0.0, requires = "migrate_to")]
    pub migrate_after: f64,
    #[command(flatten)]
    pub tuning: MigrationTuning,
}

pub fn parse_serial(s: &str) -> Result<SerialOutput, String> {
    match s {
        "stdio" => Ok(SerialOutput::Stdout),
        "null" => Ok(SerialOutput::Null),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialOutput::File(PathBuf::from(p))),
            _ => Err(format!(
                "unknown serial target '{s}' (use stdio, file:PATH or null)"
            )),
        },
    }
}

/// Parses sizes like 4096, 64K, 512M, 4G, 1T (binary units; an optional "iB"/"B" suffix).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("cannot parse size '{s}' (examples: 512M, 4G, 65536)");
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(bad)
}

/// The passthrough devices of a command line, kernel VFIO first, each kind in order given.
/// `--vfio PATH[,pre-copy=on|off]`.
pub fn parse_vfio(s: &str) -> Result<Passthrough, String> {
    Passthrough::parse(s, false)
}

/// `--vfio-user SOCKET[,pre-copy=on|off]`.
pub fn parse_vfio_user(s: &str) -> Result<Passthrough, String> {
    Passthrough::parse(s, true)
}

/// Every passthrough device in id order: kernel VFIO ones first (vfio0, ...), then vfio-user.
pub fn passthrough(vfio: &[Passthrough], vfio_user: &[Passthrough]) -> Vec<Passthrough> {
    vfio.iter().chain(vfio_user).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_options() {
        use crate::devices_setup::PassthroughBackend;
        let p = parse_vfio_user("/tmp/s.sock,pre-copy=off").unwrap();
        assert_eq!(p.backend, PassthroughBackend::User("/tmp/s.sock".into()));
        assert!(!p.pre_copy);
        assert_eq!(p.describe(), "--vfio-user /tmp/s.sock,pre-copy=off");
        let p = parse_vfio("/sys/bus/pci/devices/0000:03:00.0").unwrap();
        assert!(p.pre_copy);
        assert!(parse_vfio("/x,pre-copy=on").unwrap().pre_copy);
        let e = parse_vfio_user("/tmp/s,precopy=off").unwrap_err();
        assert_eq!(
            e,
            "--vfio-user '/tmp/s,precopy=off': unknown option 'precopy=off' (known: \
             pre-copy=on|off)"
        );
        let e = parse_vfio("/x,pre-copy=maybe").unwrap_err();
        assert!(
            e.contains("pre-copy=maybe: expected pre-copy=on or pre-copy=off"),
            "{e}"
        );
        assert!(
            parse_vfio_user(",pre-copy=off")
                .unwrap_err()
                .contains("no path")
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn serial_targets() {
        assert_eq!(parse_serial("null"), Ok(SerialOutput::Null));
        assert_eq!(
            parse_serial("file:/tmp/x"),
            Ok(SerialOutput::File("/tmp/x".into()))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tty").is_err());
    }
}
