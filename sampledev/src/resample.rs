//! The thread that waits on the INTx unmask eventfd (KVM signals it as the resample eventfd
//! when the guest EOIs) and unmasks the line, which fires again if the device's interrupt is
//! still pending. It re-reads which eventfd to wait on whenever it is woken.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};

use crate::device::{Shared, lock};

pub struct Resampler {
    wake: Arc<File>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

impl Resampler {
    pub fn start(shared: Arc<Shared>) -> io::Result<Resampler> {
        let wake = Arc::new(new_eventfd()?);
        let stop = Arc::new(AtomicBool::new(false));
        let (w, s) = (wake.clone(), stop.clone());
        let worker = thread::Builder::new()
            .name("intx-resample".into())
            .spawn(move || worker(&shared, &w, &s))?;
        Ok(Resampler {
            wake,
            stop,
            worker: Some(worker),
        })
    }

    /// The unmask eventfd changed (SET_IRQS, the client left): wait on the current one.
    pub fn rearm(&self) {
        if let Err(e) = (&*self.wake).write_all(&1u64.to_ne_bytes()) {
            log::warn!("cannot wake the INTx resample thread: {e}");
        }
    }
}

impl Drop for Resampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.rearm();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn new_eventfd() -> io::Result<File> {
    // SAFETY: eventfd(2) takes no pointers; the flags are valid.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Consumes an eventfd's count; nothing to read (another reader was first) is fine.
fn drain(f: &File) {
    let mut b = [0u8; 8];
    match (&*f).read(&mut b) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => log::warn!("INTx resample: eventfd read failed: {e}"),
    }
}

enum Woken {
    Rearm,
    Resample,
}

/// Blocks until `wake` or `unmask` is readable.
fn wait(wake: &File, unmask: Option<&File>) -> io::Result<Woken> {
    let mut fds = [wake, unmask.unwrap_or(wake)].map(|f| libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    let n = if unmask.is_some() { 2 } else { 1 };
    loop {
        // SAFETY: `fds` holds `n` initialised pollfds of descriptors that outlive the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n, -1) };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // The unmask eventfd first: a rearm that comes with it must not swallow an EOI.
    if n == 2 && fds[1].revents != 0 {
        return Ok(Woken::Resample);
    }
    Ok(Woken::Rearm)
}

fn worker(shared: &Shared, wake: &File, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let unmask = match lock(&shared.core).intx.unmask_fd() {
            Some(Ok(f)) => Some(f),
            Some(Err(e)) => {
                log::warn!("INTx resample: cannot duplicate the unmask eventfd: {e}");
                None
            }
            None => None,
        };
        match wait(wake, unmask.as_ref()) {
            Ok(Woken::Rearm) => drain(wake),
            Ok(Woken::Resample) => {
                if let Some(f) = &unmask {
                    drain(f);
                }
                log::trace!("INTx unmask eventfd signalled");
                lock(&shared.core).unmask_intx();
            }
            Err(e) => {
                log::error!("INTx resample: poll failed: {e}; INTx will not re-fire");
                return;
            }
        }
    }
}
