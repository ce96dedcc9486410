//! The INTx line (`--irq intx`) and the eventfds that carry it, as vfio-pci does it: the
//! trigger eventfd asserts the line; every assertion masks it (AUTOMASKED), and it stays
//! masked until the client unmasks it, through the unmask eventfd (which a VMM hands KVM as
//! the resample eventfd of a level-triggered irqfd, signalled when the guest EOIs) or a
//! SET_IRQS UNMASK. Unmasking with the interrupt still pending asserts it again, so one that
//! stayed pending (or came between the guest's ack and its EOI) is never lost.
//!
//! The level itself is the device's (`Core::intx_level`); this holds only what belongs to
//! the client's interrupt set-up and is not device state: the eventfds and the mask.

use std::fs::File;
use std::io::{self, Write};

#[derive(Default)]
pub struct Intx {
    trigger: Option<File>,
    unmask: Option<File>,
    masked: bool,
    /// Times the trigger was signalled, for the log.
    asserted: u64,
}

impl Intx {
    /// Attaches (or with `None` detaches) the trigger eventfd. A new trigger starts unmasked
    /// and sees the line as it is.
    pub fn set_trigger(&mut self, fd: Option<File>, level: bool) {
        self.trigger = fd;
        self.masked = false;
        self.update(level);
    }

    pub fn set_unmask(&mut self, fd: Option<File>) {
        self.unmask = fd;
    }

    /// SET_IRQS count 0: both eventfds go, the mask with them.
    pub fn disable(&mut self) {
        self.trigger = None;
        self.unmask = None;
        self.masked = false;
    }

    /// A second descriptor for the unmask eventfd, for the thread that waits on it: closing
    /// ours (a new SET_IRQS) then cannot pull it from under that wait.
    pub fn unmask_fd(&self) -> Option<io::Result<File>> {
        self.unmask.as_ref().map(File::try_clone)
    }

    pub fn is_masked(&self) -> bool {
        self.masked
    }

    /// The device's line is at `level`: a high line that is not masked is signalled, and
    /// masks itself.
    pub fn update(&mut self, level: bool) {
        if level && !self.masked && self.trigger.is_some() {
            self.fire();
        }
    }

    /// SET_IRQS MASK.
    pub fn mask(&mut self) {
        self.masked = true;
    }

    /// The unmask eventfd was signalled, or SET_IRQS UNMASK: a line still high fires again.
    pub fn unmask(&mut self, level: bool) {
        self.masked = false;
        self.update(level);
    }

    /// Signals the trigger (also SET_IRQS software trigger) and masks, as vfio-pci does.
    pub fn fire(&mut self) {
        let Some(f) = &mut self.trigger else {
            log::debug!("INTx raised with no eventfd attached");
            return;
        };
        self.masked = true;
        self.asserted += 1;
        log::debug!("INTx asserted ({} times)", self.asserted);
        if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
            log::warn!("INTx: eventfd write failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn eventfd() -> File {
        // SAFETY: eventfd(2) with valid flags; the new fd is owned by the File below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and nothing else owns it.
        File::from(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn count(f: &File) -> u64 {
        let mut b = [0u8; 8];
        match (&*f).read(&mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    #[test]
    fn automask_until_unmasked_and_level_refires() {
        let e = eventfd();
        let mut i = Intx::default();
        i.set_trigger(Some(e.try_clone().unwrap()), false);
        assert_eq!(count(&e), 0);
        i.update(true);
        i.update(true);
        assert_eq!(count(&e), 1, "masked after the first assertion");
        assert!(i.is_masked());
        i.unmask(true);
        assert_eq!(count(&e), 1, "still pending: asserted again");
        i.unmask(false);
        assert_eq!(count(&e), 0);
        assert!(!i.is_masked());
        i.mask();
        i.update(true);
        assert_eq!(count(&e), 0);
        // A new trigger sees the line as it is.
        i.set_trigger(Some(e.try_clone().unwrap()), true);
        assert_eq!(count(&e), 1);
        i.disable();
        i.update(true);
        assert_eq!(count(&e), 0);
    }
}
