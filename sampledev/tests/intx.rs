//! `--irq intx` over the real socket: the function offers a level-triggered INTx instead of
//! MSI-X, asserts it through the trigger eventfd when a DMA completes, masks it until the
//! unmask (resample) eventfd or SET_IRQS UNMASK, asserts it again then if the interrupt is
//! still pending, and honours COMMAND.INTX_DISABLE and migration quiescing.
//!
//! The trigger is signalled synchronously with the request that raises the line (a DMA's
//! completion happens before BUSY reads clear), so "not signalled" is checked exactly after
//! the request; only the unmask eventfd, served by a thread of sampledev, needs a bounded
//! wait, and only for an event that must come.

mod common;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use common::intx::{IntxRig, intx_set, try_intx_set};
use common::migrate::migrate_plain;
use common::rig::{RAM_IOVA, Rig, WAIT};
use common::{eventfd, rd, read_mem, wait_event, wr};
use sampledev::config::{CMD_BUS_MASTER, CMD_INTX_DISABLE, CMD_MEMORY, INTERRUPT_PIN, PIN_INTA};
use sampledev::regs::*;
use vfio_user::MigState;
use vfio_user::vfio::*;

const NONE_TRIGGER: u32 = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
const NONE_MASK: u32 = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK;
const NONE_UNMASK: u32 = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK;

fn errno(r: vfio_user::Result<()>) -> i32 {
    r.expect_err("request should have been refused")
        .errno()
        .expect("an error reply from the server")
}

#[test]
fn intx_function_has_a_pin_no_msix_and_one_intx_interrupt() {
    let r = IntxRig::new("4K", &[]);
    let mut cfg = [0u8; 256];
    r.c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut cfg)
        .unwrap();
    assert_eq!(cfg[INTERRUPT_PIN], PIN_INTA);
    assert_eq!(cfg[0x34], 0, "no capability list");
    assert_eq!(cfg[6] & 0x10, 0, "STATUS.CAP_LIST clear");
    let intx = r.c.irq_info(VFIO_PCI_INTX_IRQ_INDEX).unwrap();
    assert_eq!(intx.count, 1);
    let flags = VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED;
    assert_eq!(intx.flags, flags);
    let msix = r.c.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    assert_eq!((msix.count, msix.flags), (0, 0));
    let e = eventfd();
    let refused = r.c.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, &[&e]);
    assert_eq!(errno(refused), libc::EINVAL);
    // The log says what the device is.
    assert!(r.srv.log().contains("interrupt Intx"), "{}", r.srv.log());
}

#[test]
fn msix_function_still_has_no_intx() {
    let r = Rig::new("4K", &[]);
    let mut pin = [0u8; 1];
    r.c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, INTERRUPT_PIN as u64, &mut pin)
        .unwrap();
    assert_eq!(pin[0], 0);
    assert_eq!(r.c.irq_info(VFIO_PCI_INTX_IRQ_INDEX).unwrap().count, 0);
    let e = eventfd();
    let refused = r.c.set_irq_eventfds(VFIO_PCI_INTX_IRQ_INDEX, 0, &[&e]);
    assert_eq!(errno(refused), libc::EINVAL);
    // MSI-X vectors still are not maskable through SET_IRQS.
    let mask = vfio_user::IrqSet {
        flags: NONE_MASK,
        index: VFIO_PCI_MSIX_IRQ_INDEX,
        start: 0,
        count: 1,
        data: vec![],
    };
    assert_eq!(errno(r.c.set_irqs_raw(&mask, &[])), libc::EINVAL);
}

/// The whole cycle a guest goes through: completion asserts, the handler acks, the EOI
/// unmasks; an EOI while still pending (no ack, or a completion between ack and EOI)
/// asserts again.
#[test]
fn completion_asserts_and_eoi_reasserts_while_pending() {
    let r = IntxRig::new("4K", &[]);
    assert!(!r.interrupt_status());
    assert_eq!(r.fill_done(0, 0x1000, 7), STATUS_DONE);
    assert_eq!(r.triggers(), 1, "one assertion per completion");
    assert!(r.interrupt_status());
    let data = read_mem(&r.ram, 0, 0x1000);
    assert!(
        data.iter()
            .enumerate()
            .all(|(i, &b)| b == sampledev::pattern::fill_byte(7, i as u64))
    );

    // EOI without an ack: the line is still high, so it fires again.
    r.eoi();
    assert!(r.wait_trigger(), "pending INTx not re-asserted on EOI");

    // Ack, then a second completion before the EOI: masked, so no signal yet...
    assert_eq!(r.ack() & STATUS_DONE, STATUS_DONE);
    assert!(!r.interrupt_status());
    assert_eq!(r.fill_done(0x1000, 64, 8), STATUS_DONE);
    assert_eq!(r.triggers(), 0, "masked until the EOI");
    // ...and the EOI delivers it: nothing is lost.
    r.eoi();
    assert!(r.wait_trigger(), "completion between ack and EOI lost");

    // Acked before the EOI: unmasking finds the line low and stays quiet.
    r.ack();
    intx_set(&r.c, NONE_UNMASK, 1, vec![], &[]);
    assert_eq!(r.triggers(), 0);
    assert_eq!(r.fill_done(0x2000, 64, 9), STATUS_DONE);
    assert_eq!(r.triggers(), 1);
    assert_eq!(rd(&r.c, REG_COUNTER), 3);
}

#[test]
fn dma_errors_interrupt_too() {
    let r = IntxRig::new("4K", &[]);
    // Beyond the mapped RAM: the DMA faults, ERROR is set, INTx asserted.
    wr(&r.c, REG_DMA_DST, RAM_IOVA + (64 << 20));
    wr(&r.c, REG_DMA_LEN, 64);
    wr(&r.c, REG_DMA_CMD, CMD_FILL);
    let s = common::wait_idle(&r.c);
    assert_eq!(s & STATUS_ERROR, STATUS_ERROR);
    assert_eq!((s & STATUS_ERROR_MASK) >> STATUS_ERROR_SHIFT, 3);
    assert_eq!(r.triggers(), 1);
    r.ack();
    assert!(!r.interrupt_status());
}

#[test]
fn intx_disable_holds_the_line_until_cleared() {
    let r = IntxRig::new("4K", &[]);
    r.set_command(CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE);
    assert_eq!(r.fill_done(0, 64, 1), STATUS_DONE);
    assert_eq!(r.triggers(), 0, "INTx disabled");
    // Interrupt Status shows the pending interrupt regardless.
    assert!(r.interrupt_status());
    r.set_command(CMD_MEMORY | CMD_BUS_MASTER);
    assert_eq!(r.triggers(), 1, "asserted when INTx Disable clears");
}

#[test]
fn set_irqs_mask_unmask_software_trigger_and_disable() {
    let r = IntxRig::new("4K", &[]);
    intx_set(&r.c, NONE_MASK, 1, vec![], &[]);
    assert_eq!(r.fill_done(0, 64, 1), STATUS_DONE);
    assert_eq!(r.triggers(), 0, "masked");
    intx_set(&r.c, NONE_UNMASK, 1, vec![], &[]);
    assert_eq!(r.triggers(), 1, "unmasking a pending line asserts it");
    r.ack();
    // Software trigger, DATA_NONE and DATA_BOOL (false does nothing).
    intx_set(&r.c, NONE_UNMASK, 1, vec![], &[]);
    intx_set(&r.c, NONE_TRIGGER, 1, vec![], &[]);
    assert_eq!(r.triggers(), 1);
    intx_set(&r.c, NONE_UNMASK, 1, vec![], &[]);
    let bool_trigger = VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER;
    intx_set(&r.c, bool_trigger, 1, vec![0], &[]);
    assert_eq!(r.triggers(), 0);
    intx_set(&r.c, bool_trigger, 1, vec![1], &[]);
    assert_eq!(r.triggers(), 1);

    // Disable-all detaches both eventfds: nothing fires, EOIs go nowhere.
    intx_set(&r.c, NONE_TRIGGER, 0, vec![], &[]);
    assert_eq!(r.fill_done(0, 64, 2), STATUS_DONE);
    assert_eq!(r.triggers(), 0);
    // A new trigger sees the line as it is: high.
    r.c.set_irq_eventfds(VFIO_PCI_INTX_IRQ_INDEX, 0, &[&r.trigger])
        .unwrap();
    assert_eq!(r.triggers(), 1);
    // No unmask eventfd now: signalling the old one does nothing; SET_IRQS UNMASK still works.
    r.eoi();
    intx_set(&r.c, NONE_UNMASK, 1, vec![], &[]);
    assert!(r.wait_trigger(), "UNMASK with INTx pending");
}

#[test]
fn an_unmask_eventfd_replaced_is_the_one_served() {
    let r = IntxRig::new("4K", &[]);
    let new = eventfd();
    // SAFETY: `new` owns its descriptor and outlives the call.
    let fd = unsafe { BorrowedFd::borrow_raw(new.as_raw_fd()) };
    let unmask_fd = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK;
    intx_set(&r.c, unmask_fd, 1, vec![], &[fd]);
    assert_eq!(r.fill_done(0, 64, 1), STATUS_DONE);
    assert_eq!(r.triggers(), 1);
    new.write(1).unwrap();
    assert!(
        wait_event(&r.trigger, WAIT),
        "the new unmask eventfd is not watched"
    );
}

#[test]
fn bad_intx_requests_are_refused() {
    let r = IntxRig::new("4K", &[]);
    let (a, b) = (eventfd(), eventfd());
    // SAFETY: both eventfds own their descriptors and outlive the calls.
    let fds = unsafe {
        [
            BorrowedFd::borrow_raw(a.as_raw_fd()),
            BorrowedFd::borrow_raw(b.as_raw_fd()),
        ]
    };
    let trigger_fd = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    assert_eq!(
        errno(try_intx_set(&r.c, trigger_fd, 2, vec![], &fds)),
        libc::EINVAL
    );
    assert_eq!(
        errno(try_intx_set(&r.c, trigger_fd, 1, vec![], &fds)),
        libc::EINVAL,
        "two fds for one interrupt"
    );
    let mask_fd = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_MASK;
    assert_eq!(
        errno(try_intx_set(&r.c, mask_fd, 1, vec![], &fds[..1])),
        libc::EINVAL,
        "no mask eventfd"
    );
    assert_eq!(
        errno(try_intx_set(&r.c, NONE_UNMASK, 0, vec![], &[])),
        libc::EINVAL,
        "count 0 only disables"
    );
    let ram = common::memfd(4096);
    assert_eq!(
        errno(try_intx_set(&r.c, trigger_fd, 1, vec![], &[ram.as_fd()])),
        libc::EINVAL,
        "not an eventfd"
    );
    // Still served, still wired.
    assert_eq!(r.fill_done(0, 64, 1), STATUS_DONE);
    assert_eq!(r.triggers(), 1);
}

/// Quiesced for migration, the device holds its interrupt; the destination, resumed with
/// the interrupt pending, asserts its own INTx; an MSI-X device refuses an INTx stream.
#[test]
fn pending_intx_migrates_and_is_asserted_on_the_destination() {
    let src = IntxRig::new("4K", &[]);
    let dst = IntxRig::new("4K", &[]);
    assert_eq!(src.fill_done(0, 64, 1), STATUS_DONE);
    assert_eq!(src.triggers(), 1);
    src.ack();
    src.eoi();
    // A DMA latched while quiesced completes on the destination.
    src.c.set_mig_state(MigState::RunningP2p).unwrap();
    wr(&src.c, REG_DMA_DST, RAM_IOVA);
    wr(&src.c, REG_DMA_LEN, 64);
    wr(&src.c, REG_DMA_PATTERN, 2);
    wr(&src.c, REG_DMA_CMD, CMD_FILL);
    assert_eq!(src.triggers(), 0, "no interrupt while quiesced");
    migrate_plain(&src.c, &dst.c);
    assert_eq!(common::wait_idle(&dst.c), STATUS_DONE);
    assert!(dst.wait_trigger(), "the destination did not assert INTx");
    assert_eq!(src.triggers(), 0);
    assert_eq!(rd(&dst.c, REG_COUNTER), 2);
    dst.ack();
    dst.eoi();

    // Pending at the switchover (completed, not acked): asserted again after RUNNING.
    let again = IntxRig::new("4K", &[]);
    assert_eq!(dst.fill_done(0x100, 64, 3), STATUS_DONE);
    assert_eq!(dst.triggers(), 1);
    migrate_plain(&dst.c, &again.c);
    assert_eq!(again.triggers(), 1, "pending INTx not asserted on RUNNING");
    assert!(again.interrupt_status());
    assert_eq!(again.ack() & STATUS_DONE, STATUS_DONE);

    // An MSI-X device is another kind of device.
    let msix = Rig::new("4K", &[]);
    let mut stream = Vec::new();
    common::migrate::stop_copy(&again.c, &mut stream);
    common::migrate::load(&msix.c, &stream, 1 << 20).unwrap_err();
    let log = msix.srv.log();
    assert!(
        log.contains("stream refused") && log.contains("config byte"),
        "{log}"
    );
}
