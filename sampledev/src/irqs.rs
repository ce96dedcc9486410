//! Interrupt types the function offers (MSI-X, or INTx with `--irq intx`) and
//! VFIO_USER_DEVICE_SET_IRQS.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use vfio_user::vfio::*;
use vfio_user::{IrqInfo, IrqSet};

use crate::core::Core;
use crate::error::Refusal;
use crate::options::IrqMode;
use crate::regs::MSIX_VECTORS;

pub fn irq_info(index: u32, irq: IrqMode) -> Result<IrqInfo, Refusal> {
    let (flags, count) = match (index, irq) {
        (VFIO_PCI_MSIX_IRQ_INDEX, IrqMode::Msix) => (
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
            u32::from(MSIX_VECTORS),
        ),
        // What the kernel's vfio-pci reports for a function with an interrupt pin.
        (VFIO_PCI_INTX_IRQ_INDEX, IrqMode::Intx) => (
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
            1,
        ),
        (i, _) if i < VFIO_PCI_NUM_IRQS => (0, 0),
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
    let info = irq_info(set.index, core.irq())?;
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
    let maskable = info.flags & VFIO_IRQ_INFO_MASKABLE != 0;
    if action != VFIO_IRQ_SET_ACTION_TRIGGER && !maskable {
        return Err(Refusal::inval(format!(
            "interrupts of index {} are not maskable through SET_IRQS",
            set.index
        )));
    }
    if set.count == 0 {
        if data != VFIO_IRQ_SET_DATA_NONE || set.start != 0 || action != VFIO_IRQ_SET_ACTION_TRIGGER
        {
            return Err(Refusal::inval(
                "count 0 is only valid as DATA_NONE|ACTION_TRIGGER disable-all",
            ));
        }
        match set.index {
            VFIO_PCI_MSIX_IRQ_INDEX => core.msix.clear_triggers(),
            VFIO_PCI_INTX_IRQ_INDEX => core.intx.disable(),
            _ => {}
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
    // Which interrupts of the range the request acts on now (DATA_NONE: all of them).
    let chosen: Vec<usize> = match data {
        VFIO_IRQ_SET_DATA_BOOL => vectors
            .clone()
            .zip(&set.data)
            .filter(|&(_, &b)| b != 0)
            .map(|(v, _)| v)
            .collect(),
        _ => vectors.clone().collect(),
    };
    let eventfd = data == VFIO_IRQ_SET_DATA_EVENTFD;
    match (set.index, action) {
        (VFIO_PCI_INTX_IRQ_INDEX, _) if eventfd => intx_eventfd(core, action, fds),
        (VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER) => {
            // Software trigger: signals (and automasks) whatever the line says.
            if !chosen.is_empty() {
                core.intx.fire();
            }
            Ok(())
        }
        (VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_MASK) => {
            if !chosen.is_empty() {
                core.intx.mask();
            }
            Ok(())
        }
        (VFIO_PCI_INTX_IRQ_INDEX, _) => {
            if !chosen.is_empty() {
                core.unmask_intx();
            }
            Ok(())
        }
        _ if eventfd => attach_eventfds(core, vectors, fds),
        _ => {
            chosen.into_iter().for_each(|v| core.msix.fire(v));
            Ok(())
        }
    }
}

/// INTx with DATA_EVENTFD: TRIGGER attaches the trigger, UNMASK the unmask eventfd (the
/// resample eventfd of a KVM irqfd); no fd detaches. vfio-pci has no mask eventfd.
fn intx_eventfd(core: &mut Core, action: u32, fds: Vec<OwnedFd>) -> Result<(), Refusal> {
    if fds.len() > 1 {
        return Err(Refusal::inval(format!(
            "{} eventfds for 1 interrupt",
            fds.len()
        )));
    }
    if let Some(bad) = fds.iter().find(|fd| !is_eventfd(fd)) {
        return Err(Refusal::inval(format!(
            "fd {} is not an eventfd",
            bad.as_raw_fd()
        )));
    }
    let fd = fds.into_iter().next().map(File::from);
    match action {
        VFIO_IRQ_SET_ACTION_TRIGGER => {
            let level = core.intx_level();
            core.intx.set_trigger(fd, level);
        }
        VFIO_IRQ_SET_ACTION_UNMASK => core.intx.set_unmask(fd),
        _ => return Err(Refusal::inval("INTx has no mask eventfd")),
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
