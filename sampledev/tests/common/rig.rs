//! A sampledev process set up as a guest driver would leave it: guest RAM mapped for DMA,
//! MSI-X enabled with every vector unmasked and routed to an eventfd; plus DMA helpers and a
//! register-level view of the whole device for comparing two of them.

use std::fs::File;
use std::os::fd::AsFd;
use std::time::Duration;

use sampledev::config::{CMD_BUS_MASTER, CMD_MEMORY, MSIX_CAP};
use sampledev::regs::*;
use vfio_user::vfio::*;
use vfio_user::{Client, DmaProt};
use vmm_sys_util::eventfd::EventFd;

use super::{Server, eventfd, rd, wait_event, wait_idle, wr};

pub const RAM_IOVA: u64 = 0x10_0000;
pub const RAM_SIZE: u64 = 2 << 20;
pub const WAIT: Duration = Duration::from_secs(5);

pub struct Rig {
    pub c: Client,
    pub ram: File,
    pub irqs: Vec<EventFd>,
    // Last, so the client disconnects before the server is killed.
    pub srv: Server,
}

impl Rig {
    pub fn new(state_size: &str, args: &[&str]) -> Rig {
        let srv = Server::start_with(state_size, args);
        let c = srv.connect();
        let ram = super::memfd(RAM_SIZE);
        c.dma_map(RAM_IOVA, RAM_SIZE, ram.as_fd(), 0, DmaProt::READ_WRITE)
            .unwrap();
        let irqs: Vec<EventFd> = (0..4).map(|_| eventfd()).collect();
        let refs: Vec<&EventFd> = irqs.iter().collect();
        c.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, &refs)
            .unwrap();
        let r = Rig { c, ram, irqs, srv };
        r.enable();
        r
    }

    /// What a guest driver does after a reset: bus mastering, MSI-X on, vectors unmasked.
    pub fn enable(&self) {
        let c = &self.c;
        let cmd = CMD_MEMORY | CMD_BUS_MASTER;
        c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &cmd.to_le_bytes())
            .unwrap();
        let ctrl = 1u16 << 15;
        c.region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            MSIX_CAP as u64 + 2,
            &ctrl.to_le_bytes(),
        )
        .unwrap();
        for v in 0..4 {
            let off = MSIX_TABLE_OFFSET + v * MSIX_ENTRY_SIZE + 12;
            c.region_write(VFIO_PCI_BAR0_REGION_INDEX, off, &0u32.to_le_bytes())
                .unwrap();
        }
    }

    /// Starts a FILL of `len` bytes at RAM offset `off` with `seed`, completing on `vector`.
    pub fn start_fill(&self, off: u64, len: u64, seed: u64, vector: u64) {
        wr(&self.c, REG_DMA_VECTOR, vector);
        wr(&self.c, REG_DMA_DST, RAM_IOVA + off);
        wr(&self.c, REG_DMA_LEN, len);
        wr(&self.c, REG_DMA_PATTERN, seed);
        wr(&self.c, REG_DMA_CMD, CMD_FILL);
    }

    /// A FILL that must complete with its interrupt and DONE.
    pub fn fill(&self, off: u64, len: u64, seed: u64) {
        let before = rd(&self.c, REG_COUNTER);
        self.start_fill(off, len, seed, 0);
        assert!(wait_event(&self.irqs[0], WAIT), "no completion interrupt");
        assert_eq!(wait_idle(&self.c), STATUS_DONE);
        assert_eq!(rd(&self.c, REG_COUNTER), before + 1);
        let data = super::read_mem(&self.ram, off, len as usize);
        let want = (0..len).map(|i| sampledev::pattern::fill_byte(seed, i));
        assert!(data.into_iter().eq(want), "FILL data wrong");
    }

    pub fn rd(&self, reg: u64) -> u64 {
        rd(&self.c, reg)
    }

    pub fn invalid_arcs(&self) -> u64 {
        rd(&self.c, REG_INVALID_ARCS)
    }

    pub fn failed_arcs(&self) -> u64 {
        rd(&self.c, REG_FAILED_ARCS)
    }
}

/// Everything a guest could observe of the device, register by register.
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceView {
    pub regs: Vec<(u64, u64)>,
    pub config: Vec<u8>,
    pub msix: Vec<u8>,
}

/// Registers that are device state (not the per-process migration diagnostics).
const STATE_REGS: [u64; 16] = [
    REG_ID,
    REG_STATUS,
    REG_DMA_SRC,
    REG_DMA_DST,
    REG_DMA_LEN,
    REG_DMA_PATTERN,
    REG_DMA_CMD,
    REG_DMA_VECTOR,
    REG_COUNTER,
    REG_STATE_SIZE,
    REG_STATE_WINDOW_OFFSET,
    REG_STATE_WINDOW_DATA,
    REG_STATE_SEED,
    REG_ERROR_COUNT,
    REG_SCRATCH,
    REG_STATE_DIGEST,
];

pub fn view(c: &Client) -> DeviceView {
    let regs = STATE_REGS.iter().map(|&r| (r, rd(c, r))).collect();
    let mut config = vec![0u8; 256];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut config)
        .unwrap();
    let mut msix = vec![0u8; 64 + 8];
    for (i, chunk) in msix[..64].chunks_mut(8).enumerate() {
        c.region_read(
            VFIO_PCI_BAR0_REGION_INDEX,
            MSIX_TABLE_OFFSET + i as u64 * 8,
            chunk,
        )
        .unwrap();
    }
    c.region_read(VFIO_PCI_BAR0_REGION_INDEX, MSIX_PBA_OFFSET, &mut msix[64..])
        .unwrap();
    DeviceView { regs, config, msix }
}

/// Makes the device differ from power-on in every way a guest can, so that a restore that
/// relied on a reset would show.
pub fn scribble(r: &Rig) {
    r.fill(0x1000, 64, 0xdead);
    wr(&r.c, REG_SCRATCH, 0x5c5c);
    wr(&r.c, REG_STATE_SEED, 0x1111);
    wr(&r.c, REG_STATE_WINDOW_OFFSET, 16);
    wr(&r.c, REG_STATE_WINDOW_DATA, 0x2222);
    wr(&r.c, REG_DMA_VECTOR, 5); // refused: ERROR_COUNT and STATUS change
}
