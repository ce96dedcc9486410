//! Interrupt types the function offers (MSI-X only) and VFIO_USER_DEVICE_SET_IRQS.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use vfio_user::vfio::*;
use vfio_user::{IrqInfo, IrqSet};

use crate::core::Core;
use crate::error::Refusal;
use crate::regs::MSIX_VECTORS;

pub fn irq_info(index: u32) -> Result<IrqInfo, Refusal> {
    let (flags, count) = match index {
        VFIO_PCI_MSIX_IRQ_INDEX => (
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
            u32::from(MSIX_VECTORS),
        ),
        i if i < VFIO_PCI_NUM_IRQS => (0, 0),
        _ => return Err(Refusal::inval(format!("no IRQ index {index}"))),
    };
    Ok(IrqInfo {
        argsz: IrqInfo::SIZE,
        flags,
        index,
        count,
    })
}

pub fn set_irqs(core: &mut Core, set: &IrqSet, fds: Vec<OwnedFd>) -> Result<(), Refusal> {
    let info = irq_info(set.index)?;
    let data = set.flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
    let action = set.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
    let known = VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK;
    if data.count_ones() != 1 || action.count_ones() != 1 || set.flags & !known != 0 {
        return Err(Refusal::inval(format!("SET_IRQS flags {:#x}", set.flags)));
    }
    if data != VFIO_IRQ_SET_DATA_EVENTFD && !fds.is_empty() {
        return Err(Refusal::inval("fds sent without DATA_EVENTFD"));
    }
    let bools_ok = if data == VFIO_IRQ_SET_DATA_BOOL {
        set.data.len() == set.count as usize
    } else {
        set.data.is_empty()
    };
    if !bools_ok {
        return Err(Refusal::inval(
            "SET_IRQS data does not match its flags and count",
        ));
    }
    if action != VFIO_IRQ_SET_ACTION_TRIGGER {
        return Err(Refusal::inval(
            "interrupts are not maskable through SET_IRQS",
        ));
    }
    if set.count == 0 {
        if data != VFIO_IRQ_SET_DATA_NONE || set.start != 0 {
            return Err(Refusal::inval(
                "count 0 is only valid as DATA_NONE disable-all",
            ));
        }
        if set.index == VFIO_PCI_MSIX_IRQ_INDEX {
            core.msix.clear_triggers();
        }
        return Ok(());
    }
    if set
        .start
        .checked_add(set.count)
        .is_none_or(|end| end > info.count)
    {
        return Err(Refusal::inval(format!(
            "interrupts {}+{} beyond the {} of index {}",
            set.start, set.count, info.count, set.index
        )));
    }
    let vectors = set.start as usize..(set.start + set.count) as usize;
    match data {
        VFIO_IRQ_SET_DATA_NONE => vectors.for_each(|v| core.msix.fire(v)),
        VFIO_IRQ_SET_DATA_BOOL => {
            for (v, &b) in vectors.zip(&set.data) {
                if b != 0 {
                    core.msix.fire(v);
                }
            }
        }
        _ => attach_eventfds(core, vectors, fds)?,
    }
    Ok(())
}

/// No fds detaches the vectors; otherwise one eventfd per vector.
fn attach_eventfds(
    core: &mut Core,
    vectors: std::ops::Range<usize>,
    fds: Vec<OwnedFd>,
) -> Result<(), Refusal> {
    if fds.is_empty() {
        vectors.for_each(|v| core.msix.set_trigger(v, None));
        return Ok(());
    }
    if fds.len() != vectors.len() {
        return Err(Refusal::inval(format!(
            "{} eventfds for {} interrupts",
            fds.len(),
            vectors.len()
        )));
    }
    // Check all before attaching any, so a bad set changes nothing.
    if let Some(bad) = fds.iter().find(|fd| !is_eventfd(fd)) {
        return Err(Refusal::inval(format!(
            "fd {} is not an eventfd",
            bad.as_raw_fd()
        )));
    }
    for (v, fd) in vectors.zip(fds) {
        core.msix.set_trigger(v, Some(File::from(fd)));
    }
    Ok(())
}

/// Writing 8 bytes into anything else (a pipe, a file) could block or corrupt data.
fn is_eventfd(fd: &OwnedFd) -> bool {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    link.is_ok_and(|p| p.as_os_str() == "anon_inode:[eventfd]")
}
