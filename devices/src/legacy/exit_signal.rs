//! How a guest ends the VM: one exit code plus an eventfd the VMM's event loop watches. Shared
//! (cloned) by every device that can end the VM; the first request wins, so a reset that races
//! an exit-port write cannot change the code the VMM already acted on.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error("cannot create the exit eventfd: {0}")]
    EventFd(#[source] io::Error),
}

// The code and the "requested" flag live in one word so that a reader never sees the flag
// without the code that came with it.
const REQUESTED: u64 = 1 << 32;

#[derive(Debug)]
struct Inner {
    evt: EventFd,
    code: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct ExitSignal(Arc<Inner>);

impl ExitSignal {
    pub fn new() -> Result<Self, LegacyError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(LegacyError::EventFd)?;
        Ok(ExitSignal(Arc::new(Inner {
            evt,
            code: AtomicU64::new(0),
        })))
    }

    /// Becomes readable once an exit was requested; add it to the event loop.
    pub fn wait_fd(&self) -> &EventFd {
        &self.0.evt
    }

    /// The exit code of the first request, or `None` while the guest has not asked to exit.
    pub fn code(&self) -> Option<i32> {
        let v = self.0.code.load(Ordering::Acquire);
        // Truncation keeps exactly the low 32 bits, where `request` put the code.
        (v & REQUESTED != 0).then_some(v as u32 as i32)
    }

    /// Asks the VMM to end the VM with `code`. Returns false (and changes nothing) when an earlier
    /// request already won.
    pub fn request(&self, code: i32) -> bool {
        let word = REQUESTED | u64::from(code as u32);
        if self
            .0
            .code
            .compare_exchange(0, word, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            log::debug!("exit with code {code} requested after an earlier request; ignored");
            return false;
        }
        if let Err(e) = self.0.evt.write(1) {
            // The code is recorded; a VMM that polls `code()` still sees it.
            log::error!("cannot signal the exit eventfd: {e}");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins_and_signals_once() {
        let exit = ExitSignal::new().unwrap();
        let other = exit.clone();
        assert_eq!(exit.code(), None);
        assert!(exit.wait_fd().read().is_err());

        assert!(other.request(-3));
        assert!(!exit.request(0));
        assert_eq!(exit.code(), Some(-3));
        assert_eq!(other.code(), Some(-3));
        assert_eq!(exit.wait_fd().read().unwrap(), 1);
        assert!(exit.wait_fd().read().is_err());
    }

    #[test]
    fn code_zero_is_distinct_from_no_request() {
        let exit = ExitSignal::new().unwrap();
        assert!(exit.request(0));
        assert_eq!(exit.code(), Some(0));
    }
}
