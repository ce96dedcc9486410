use std::os::unix::net::UnixListener;
use std::process::ExitCode;

use clap::Parser;
use sampledev::cli::Cli;
use sampledev::device::Device;
use sampledev::server::{ServeError, serve_one};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), ServeError> {
    let opts = cli.device_options().map_err(ServeError::Options)?;
    let device = Device::new(&opts).map_err(ServeError::Device)?;
    let listener = UnixListener::bind(&cli.socket).map_err(|source| ServeError::Bind {
        path: cli.socket.clone(),
        source,
    })?;
    log::info!(
        "listening on {} (state size {} bytes, interrupt {:?}, migration {:?}, flags {:#x}, \
         dirty log {})",
        cli.socket.display(),
        cli.state_size,
        opts.irq,
        opts.mode,
        opts.v2_flags,
        opts.dma_logging()
    );
    let result = serve_one(listener, &device);
    // We created the socket file; leave nothing behind.
    if let Err(e) = std::fs::remove_file(&cli.socket) {
        log::warn!("cannot remove {}: {e}", cli.socket.display());
    }
    result
}
