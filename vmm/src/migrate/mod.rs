//! Live migration glue: drives the `migration` crate's engine with this VMM's KVM dirty log,
//! vCPU/VM/device state and pause/resume, and migrates passthrough devices through the VFIO
//! migration protocol (`driver`/`v1`: v2 and the v1 region behind one trait; `passthrough*`:
//! the source and destination sequences; `dma_log`: the devices' DMA writes as dirty pages;
//! `listener`: the destination's socket, which drops stray peers and refuses a second one).

pub mod dest;
pub mod dirty_kvm;
pub mod dma_log;
pub mod driver;
pub mod fault;
mod listener;
pub mod passthrough;
pub mod passthrough_dest;
pub mod passthrough_source;
pub mod populate;
pub mod snapshot;
pub mod source;
pub mod v1;

#[cfg(test)]
mod fake_backend;
#[cfg(test)]
mod passthrough_tests;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use migration::stats::{MigrationStats, Status};

/// What `--migrate-to`, `minivmm migrate` and the `migrate` request ask for.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    pub to: String,
    pub downtime: Duration,
    pub max_bandwidth: Option<u64>,
    pub timeout: Duration,
    /// Migrate passthrough devices that cannot log their DMA writes, treating all the RAM
    /// they can reach as dirty on every pass.
    pub force_dirty_dma: bool,
    /// Mutual TLS with this side's identity (`ca.pem`, `cert.pem`, `key.pem`); plain TCP
    /// without it.
    pub tls_dir: Option<std::path::PathBuf>,
    /// Bound of every blocking read and write of the migration stream (`--peer-timeout`).
    pub peer_timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            to: String::new(),
            downtime: Duration::from_millis(300),
            max_bandwidth: None,
            timeout: Duration::from_secs(600),
            force_dirty_dma: false,
            tls_dir: None,
            peer_timeout: PEER_TIMEOUT,
        }
    }
}

/// The migration as the control API sees it: the statistics so far (status included) and the
/// latest progress line.
#[derive(Default)]
pub struct MigrationInfo {
    pub stats: MigrationStats,
    pub progress: String,
    pub running: bool,
    /// The last switchover sent Go and got no confirmation: the destination may be running
    /// the guest, so this side refuses to resume or migrate it again unless forced.
    pub outcome_unknown: bool,
    /// Set by `migrate-cancel`: pre-copy ends after the pass in progress, the guest runs on.
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
}

pub type SharedInfo = Arc<Mutex<MigrationInfo>>;

/// How long one side waits for the other before declaring the peer gone, unless
/// `--peer-timeout` says otherwise.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Any failure of `minivmm receive` or of a migration, for `main`'s one-line error.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Dest(#[from] dest::DestError),
    #[error(transparent)]
    Machine(#[from] crate::machine::MachineError),
}

pub fn options(to: &str, t: &crate::cli::MigrationTuning) -> MigrateOptions {
    MigrateOptions {
        to: to.to_owned(),
        downtime: Duration::from_millis(t.downtime_ms),
        max_bandwidth: t.max_bandwidth,
        timeout: Duration::from_secs(t.timeout),
        force_dirty_dma: t.force_dirty_dma,
        tls_dir: t.tls_dir.clone(),
        peer_timeout: Duration::from_secs(t.peer_timeout),
    }
}

/// Runs a migration on its own thread after `delay`; prints the statistics (one JSON line on
/// stdout) when it ends, and the error (one line on stderr) if it failed.
pub fn spawn(
    shared: crate::machine::SharedMachine,
    opts: MigrateOptions,
    info: SharedInfo,
    delay: Duration,
) {
    {
        let mut i = info.lock().unwrap_or_else(|e| e.into_inner());
        i.running = true;
        i.cancel = Arc::default();
        i.stats = MigrationStats::default();
        i.stats.status = Status::Setup;
    }
    let run = move || {
        std::thread::sleep(delay);
        let exit = shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .exit
            .clone();
        let result = source::migrate(&shared, &opts, &info);
        // The VM must be ownable by the main thread again when it shuts down.
        drop(shared);
        match result {
            Ok(stats) => {
                println!("{}", stats.to_json());
                // The guest now runs on the destination: this VM is done.
                exit.request(0);
            }
            Err(e) => {
                // Early failures (connect, handshake) end before the engine reports.
                let stats = {
                    let mut i = info.lock().unwrap_or_else(|e| e.into_inner());
                    i.running = false;
                    i.outcome_unknown |= source::after_go(&e);
                    if !matches!(i.stats.status, Status::Failed | Status::Cancelled) {
                        i.stats.status = Status::Failed;
                    }
                    i.stats.error_desc.get_or_insert_with(|| e.to_string());
                    i.stats.clone()
                };
                println!("{}", stats.to_json());
                eprintln!("minivmm: migration failed: {e}");
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("migration".into())
        .spawn(run)
    {
        eprintln!("minivmm: cannot start the migration thread: {e}");
    }
}
