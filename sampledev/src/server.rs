//! The listening socket: serve the first client, turn away any other while it is connected,
//! and end when it leaves.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use crate::device::Device;
use crate::session::Session;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("accept failed: {0}")]
    Accept(io::Error),
    #[error("cannot start the device: {0}")]
    Device(io::Error),
    #[error("bad options: {0}")]
    Options(String),
    #[error("client connection dropped: {0}")]
    Protocol(#[from] vfio_user::Error),
}

/// Serves one client on `listener`; returns when it disconnects.
pub fn serve_one(listener: UnixListener, device: &Device) -> Result<(), ServeError> {
    let (stream, _) = listener.accept().map_err(ServeError::Accept)?;
    log::info!("client connected");
    match listener.try_clone() {
        Ok(l) => {
            thread::Builder::new()
                .name("refuse-clients".into())
                .spawn(move || refuse_others(l))
                .map_err(ServeError::Accept)?;
        }
        Err(e) => log::warn!("cannot watch for further clients: {e}"),
    }
    let result = Session::new(stream, device).run();
    device.client_gone();
    match result {
        Ok(()) => log::info!("client disconnected"),
        // Gone while we answered: still a disconnect, not a protocol violation.
        Err(vfio_user::Error::DeviceLost) => log::info!("client disconnected mid-request"),
        Err(e) => {
            log::error!("dropping the client after a protocol error: {e}");
            return Err(e.into());
        }
    }
    Ok(())
}

/// The device has one owner at a time: later clients are closed at once.
fn refuse_others(listener: UnixListener) {
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                log::warn!("refusing a second client: the device is in use");
                drop(s);
            }
            Err(e) => {
                log::warn!("accept: {e}");
                // Out of fds, say: do not spin.
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
