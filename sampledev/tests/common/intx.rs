//! A sampledev process in `--irq intx` mode set up as a VMM leaves it: guest RAM mapped for
//! DMA, bus mastering on, the INTx trigger eventfd and the unmask eventfd (what KVM's
//! resample eventfd would be) attached.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use sampledev::config::{CMD_BUS_MASTER, CMD_MEMORY, STATUS_INTERRUPT};
use sampledev::regs::*;
use vfio_user::vfio::*;
use vfio_user::{Client, DmaProt, IrqSet};
use vmm_sys_util::eventfd::EventFd;

use super::rig::{RAM_IOVA, RAM_SIZE, WAIT};
use super::{Server, eventfd, rd, wait_event, wait_idle, wr};

pub struct IntxRig {
    pub c: Client,
    pub ram: File,
    pub trigger: EventFd,
    pub unmask: EventFd,
    // Last, so the client disconnects before the server is killed.
    pub srv: Server,
}

/// One SET_IRQS on the INTx index, `flags` = data type | action.
pub fn intx_set(c: &Client, flags: u32, count: u32, data: Vec<u8>, fds: &[BorrowedFd<'_>]) {
    try_intx_set(c, flags, count, data, fds).unwrap();
}

pub fn try_intx_set(
    c: &Client,
    flags: u32,
    count: u32,
    data: Vec<u8>,
    fds: &[BorrowedFd<'_>],
) -> vfio_user::Result<()> {
    let set = IrqSet {
        flags,
        index: VFIO_PCI_INTX_IRQ_INDEX,
        start: 0,
        count,
        data,
    };
    c.set_irqs_raw(&set, fds)
}

impl IntxRig {
    pub fn new(state_size: &str, args: &[&str]) -> IntxRig {
        let mut all = vec!["--irq", "intx"];
        all.extend_from_slice(args);
        let srv = Server::start_with(state_size, &all);
        let c = srv.connect();
        let ram = super::memfd(RAM_SIZE);
        c.dma_map(RAM_IOVA, RAM_SIZE, ram.as_fd(), 0, DmaProt::READ_WRITE)
            .unwrap();
        let (trigger, unmask) = (eventfd(), eventfd());
        c.set_irq_eventfds(VFIO_PCI_INTX_IRQ_INDEX, 0, &[&trigger])
            .unwrap();
        // SAFETY: `unmask` owns its descriptor and outlives the call.
        let fd = unsafe { BorrowedFd::borrow_raw(unmask.as_raw_fd()) };
        intx_set(
            &c,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
            1,
            vec![],
            &[fd],
        );
        let r = IntxRig {
            c,
            ram,
            trigger,
            unmask,
            srv,
        };
        r.set_command(CMD_MEMORY | CMD_BUS_MASTER);
        r
    }

    pub fn set_command(&self, cmd: u16) {
        self.c
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &cmd.to_le_bytes())
            .unwrap();
    }

    /// PCI STATUS bit 3: INTx pending.
    pub fn interrupt_status(&self) -> bool {
        let mut b = [0u8; 2];
        self.c
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 6, &mut b)
            .unwrap();
        u16::from_le_bytes(b) & STATUS_INTERRUPT != 0
    }

    /// Starts a FILL of `len` bytes at RAM offset `off` with `seed` and waits until it is done
    /// (the completion, interrupt included, has happened then).
    pub fn fill_done(&self, off: u64, len: u64, seed: u64) -> u64 {
        wr(&self.c, REG_DMA_DST, RAM_IOVA + off);
        wr(&self.c, REG_DMA_LEN, len);
        wr(&self.c, REG_DMA_PATTERN, seed);
        wr(&self.c, REG_DMA_CMD, CMD_FILL);
        wait_idle(&self.c)
    }

    /// How often the trigger was signalled since last asked (0: not at all). Exact whenever
    /// the signal, if any, came from a request that has been answered.
    pub fn triggers(&self) -> u64 {
        self.trigger.read().unwrap_or(0)
    }

    /// Waits (bounded) for the trigger; true if it came.
    pub fn wait_trigger(&self) -> bool {
        wait_event(&self.trigger, WAIT)
    }

    /// What a guest's handler does: read STATUS, write back DONE/ERROR to clear them.
    pub fn ack(&self) -> u64 {
        let s = rd(&self.c, REG_STATUS);
        wr(&self.c, REG_STATUS, s & (STATUS_DONE | STATUS_ERROR));
        s
    }

    /// What KVM does when the guest EOIs.
    pub fn eoi(&self) {
        self.unmask.write(1).unwrap();
    }
}
