//! The real sampledev binary driven through vfio_user::Client: DMA into a memfd, MSI-X by
//! eventfd, internal state through the BAR window, and the error paths a guest can hit.

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::*;
use sampledev::config::{CMD_BUS_MASTER, CMD_MEMORY, DEVICE_ID, MSIX_CAP, VENDOR_ID};
use sampledev::pattern::fill_byte;
use sampledev::regs::*;
use sampledev::state::InternalState;
use vfio_user::vfio::*;
use vfio_user::{Client, DmaProt};

const RAM_IOVA: u64 = 0x10_0000;
const RAM_SIZE: u64 = 2 << 20;
const STATE_SIZE: u64 = 64 << 10;
const WAIT: Duration = Duration::from_secs(5);

fn config_write(c: &Client, off: u64, data: &[u8]) {
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, off, data)
        .unwrap();
}

/// Memory decoding, bus mastering and MSI-X on, as a guest driver would set them.
fn enable_function(c: &Client) {
    config_write(c, 0x04, &(CMD_MEMORY | CMD_BUS_MASTER).to_le_bytes());
    config_write(c, MSIX_CAP as u64 + 2, &(1u16 << 15).to_le_bytes());
}

fn set_vector_mask(c: &Client, vector: u64, masked: bool) {
    let off = MSIX_TABLE_OFFSET + vector * MSIX_ENTRY_SIZE + 12;
    c.region_write(
        VFIO_PCI_BAR0_REGION_INDEX,
        off,
        &u32::from(masked).to_le_bytes(),
    )
    .unwrap();
}

/// A sampledev with 64 KiB of state, connected, and RAM_SIZE of memfd RAM mapped for its
/// DMA at RAM_IOVA. The server is returned to be kept alive.
fn device_with_ram() -> (Server, Client, std::fs::File) {
    let srv = Server::start("64K");
    let c = srv.connect();
    let ram = memfd(RAM_SIZE);
    c.dma_map(RAM_IOVA, RAM_SIZE, ram.as_fd(), 0, DmaProt::READ_WRITE)
        .unwrap();
    (srv, c, ram)
}

fn start(c: &Client, cmd: u64, src: u64, dst: u64, len: u64, seed: u64) {
    wr(c, REG_DMA_SRC, src);
    wr(c, REG_DMA_DST, dst);
    wr(c, REG_DMA_LEN, len);
    wr(c, REG_DMA_PATTERN, seed);
    wr(c, REG_DMA_CMD, cmd);
}

#[test]
fn describes_a_pci_function() {
    let srv = Server::start("64K");
    let c = srv.connect();
    let info = c.device_info().unwrap();
    assert_eq!(info.flags, VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI);
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));
    let bar0 = c.region_info(VFIO_PCI_BAR0_REGION_INDEX).unwrap();
    assert_eq!(bar0.size, BAR0_SIZE);
    assert!(bar0.readable() && bar0.writable() && !bar0.mmappable());
    assert_eq!(
        c.region_info(VFIO_PCI_CONFIG_REGION_INDEX).unwrap().size,
        256
    );
    assert_eq!(c.region_info(1).unwrap().size, 0);
    let msix = c.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    assert_eq!(msix.count, 4);
    assert!(msix.flags & VFIO_IRQ_INFO_EVENTFD != 0);
    let mut id = [0u8; 4];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .unwrap();
    assert_eq!(id[..2], VENDOR_ID.to_le_bytes());
    assert_eq!(id[2..], DEVICE_ID.to_le_bytes());
    assert_eq!(rd(&c, REG_ID) as u32, ID_MAGIC);
    assert_eq!(rd(&c, REG_STATE_SIZE), STATE_SIZE);
}

#[test]
fn dma_fill_copy_msix_counter_and_state() {
    let (_srv, c, ram) = device_with_ram();
    let irqs = [eventfd(), eventfd(), eventfd(), eventfd()];
    let refs: Vec<_> = irqs.iter().collect();
    c.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, &refs)
        .unwrap();
    enable_function(&c);
    set_vector_mask(&c, 1, false);
    wr(&c, REG_DMA_VECTOR, 1);

    // An odd length exercises the partial last word.
    let len = 0x3005;
    start(&c, CMD_FILL, 0, RAM_IOVA + 0x1000, len, 0x1234);
    assert!(wait_event(&irqs[1], WAIT), "no MSI-X for the fill");
    assert_eq!(rd(&c, REG_STATUS), STATUS_DONE);
    assert_eq!(rd(&c, REG_COUNTER), 1);
    let filled = read_mem(&ram, 0x1000, len as usize);
    assert!(
        filled
            .iter()
            .enumerate()
            .all(|(i, &b)| b == fill_byte(0x1234, i as u64))
    );
    assert_eq!(read_mem(&ram, 0x1000 + len, 8), vec![0; 8]);

    start(&c, CMD_COPY, RAM_IOVA + 0x1000, RAM_IOVA + 0x80000, len, 0);
    assert!(wait_event(&irqs[1], WAIT), "no MSI-X for the copy");
    assert_eq!(rd(&c, REG_COUNTER), 2);
    assert_eq!(read_mem(&ram, 0x80000, len as usize), filled);
    assert!(!wait_event(&irqs[0], Duration::ZERO), "wrong vector fired");

    check_state_after_ops(&c, 2);
}

/// The internal state read through the window must equal the model after `ops` DMAs.
fn check_state_after_ops(c: &Client, ops: u64) {
    let mut model = InternalState::new(STATE_SIZE, DEFAULT_STATE_SEED);
    let mut touched = Vec::new();
    for op in 1..=ops {
        model.mutate(op).unwrap();
        for k in 0..sampledev::pattern::MUTATIONS_PER_OP {
            let n = model.word_count();
            touched.push(sampledev::pattern::mutation_index(
                DEFAULT_STATE_SEED,
                op,
                k,
                n,
            ));
        }
    }
    let sample = (0..model.word_count()).step_by(97);
    for w in touched.iter().copied().chain(sample) {
        wr(c, REG_STATE_WINDOW_OFFSET, w * 8);
        assert_eq!(
            rd(c, REG_STATE_WINDOW_DATA),
            model.word(w),
            "state word {w}"
        );
    }
    let fresh = sampledev::pattern::state_word(DEFAULT_STATE_SEED, touched[0]);
    assert_ne!(
        model.word(touched[0]),
        fresh,
        "DMA did not change the state"
    );
}

#[test]
fn guest_errors_show_in_status() {
    let (_srv, c, ram) = device_with_ram();
    let irq = eventfd();
    c.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, &[&irq])
        .unwrap();
    enable_function(&c);
    set_vector_mask(&c, 0, false);

    // Entirely unmapped, then straddling the end of the mapping: nothing may be written.
    for dst in [0x1000, RAM_IOVA + RAM_SIZE - 8] {
        start(&c, CMD_FILL, 0, dst, 16, 1);
        assert!(wait_event(&irq, WAIT));
        assert_eq!(error_code(&c), ErrorCode::DmaFault as u64);
    }
    assert_eq!(read_mem(&ram, RAM_SIZE - 8, 8), vec![0; 8]);
    start(&c, CMD_COPY, 0x1000, RAM_IOVA, 16, 0);
    assert!(wait_event(&irq, WAIT));
    assert_eq!(error_code(&c), ErrorCode::DmaFault as u64);

    start(&c, 7, 0, RAM_IOVA, 16, 0);
    assert!(wait_event(&irq, WAIT));
    assert_eq!(error_code(&c), ErrorCode::BadCommand as u64);
    start(&c, CMD_FILL, 0, RAM_IOVA, 0, 0);
    assert!(wait_event(&irq, WAIT));
    assert_eq!(error_code(&c), ErrorCode::BadLength as u64);
    start(&c, CMD_COPY, RAM_IOVA, RAM_IOVA + 8, 16, 0);
    assert!(wait_event(&irq, WAIT));
    assert_eq!(error_code(&c), ErrorCode::Overlap as u64);

    wr(&c, REG_DMA_VECTOR, 4);
    assert_eq!(error_code(&c), ErrorCode::BadVector as u64);
    wr(&c, REG_STATE_WINDOW_OFFSET, STATE_SIZE);
    assert_eq!(error_code(&c), ErrorCode::BadStateOffset as u64);
    wr(&c, REG_COUNTER, 5);
    assert_eq!(error_code(&c), ErrorCode::ReadOnly as u64);
    assert_eq!(rd(&c, REG_ERROR_COUNT), 9);
    assert_eq!(rd(&c, REG_COUNTER), 0);

    // Clearing the error leaves a clean status; then a good fill still works.
    wr(&c, REG_STATUS, STATUS_ERROR);
    assert_eq!(rd(&c, REG_STATUS), 0);
    start(&c, CMD_FILL, 0, RAM_IOVA, 8, 3);
    assert!(wait_event(&irq, WAIT));
    assert_eq!(rd(&c, REG_STATUS), STATUS_DONE);
}

#[test]
fn masking_bus_master_reset_and_unmap() {
    let (_srv, c, _ram) = device_with_ram();
    let irq = eventfd();
    c.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 2, &[&irq])
        .unwrap();
    enable_function(&c);
    wr(&c, REG_DMA_VECTOR, 2);

    // Vectors start masked: the completion waits in the PBA until unmasked.
    start(&c, CMD_FILL, 0, RAM_IOVA, 64, 9);
    assert_eq!(wait_idle(&c), STATUS_DONE);
    assert!(!wait_event(&irq, Duration::from_millis(100)));
    let mut pba = [0u8; 8];
    c.region_read(VFIO_PCI_BAR0_REGION_INDEX, MSIX_PBA_OFFSET, &mut pba)
        .unwrap();
    assert_eq!(u64::from_le_bytes(pba), 1 << 2);
    set_vector_mask(&c, 2, false);
    assert!(
        wait_event(&irq, WAIT),
        "pending vector not delivered on unmask"
    );

    config_write(&c, 0x04, &CMD_MEMORY.to_le_bytes());
    start(&c, CMD_FILL, 0, RAM_IOVA, 64, 9);
    assert!(wait_event(&irq, WAIT));
    assert_eq!(error_code(&c), ErrorCode::NoBusMaster as u64);

    c.reset().unwrap();
    assert_eq!((rd(&c, REG_COUNTER), rd(&c, REG_STATUS)), (0, 0));
    assert_eq!(rd(&c, REG_ERROR_COUNT), 0);
    let mut cmd = [0u8; 2];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 4, &mut cmd)
        .unwrap();
    assert_eq!(cmd, [0, 0]);

    enable_function(&c);
    c.dma_unmap(RAM_IOVA, RAM_SIZE).unwrap();
    start(&c, CMD_FILL, 0, RAM_IOVA, 64, 9);
    wait_idle(&c);
    assert_eq!(error_code(&c), ErrorCode::DmaFault as u64);
}

#[test]
fn large_state_is_readable_anywhere() {
    let srv = Server::start("64M");
    let c = srv.connect();
    assert_eq!(rd(&c, REG_STATE_SIZE), 64 << 20);
    for w in [0u64, 1, (32 << 20) / 8, (64 << 20) / 8 - 1] {
        wr(&c, REG_STATE_WINDOW_OFFSET, w * 8);
        let want = sampledev::pattern::state_word(DEFAULT_STATE_SEED, w);
        assert_eq!(rd(&c, REG_STATE_WINDOW_DATA), want);
    }
    wr(&c, REG_STATE_SEED, 77);
    wr(&c, REG_STATE_WINDOW_OFFSET, 8);
    assert_eq!(
        rd(&c, REG_STATE_WINDOW_DATA),
        sampledev::pattern::state_word(77, 1)
    );
    wr(&c, REG_STATE_WINDOW_DATA, 0xabcd);
    assert_eq!(rd(&c, REG_STATE_WINDOW_DATA), 0xabcd);
}

/// RAM a client could shrink under the device's mappings (a SIGBUS there) and ranges that
/// are not whole pages are refused; the device serves on, and a sealed map still works.
#[test]
fn unsealed_or_unaligned_dma_maps_are_refused() {
    use std::os::fd::FromRawFd;
    let srv = Server::start("64K");
    let c = srv.connect();
    // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and nothing else owns it.
    let loose = unsafe { std::fs::File::from_raw_fd(fd) };
    loose.set_len(RAM_SIZE).unwrap();
    let e = c
        .dma_map(RAM_IOVA, RAM_SIZE, loose.as_fd(), 0, DmaProt::READ_WRITE)
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EPERM), "{e}");
    let ram = memfd(RAM_SIZE);
    for (iova, size) in [(RAM_IOVA + 0x800, 0x1000), (RAM_IOVA, 0x1800)] {
        let e = c
            .dma_map(iova, size, ram.as_fd(), 0, DmaProt::READ_WRITE)
            .unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINVAL), "{iova:#x}+{size:#x}: {e}");
    }
    c.dma_map(RAM_IOVA, RAM_SIZE, ram.as_fd(), 0, DmaProt::READ_WRITE)
        .unwrap();
    enable_function(&c);
    start(&c, CMD_FILL, 0, RAM_IOVA, 64, 9);
    wait_idle(&c);
    assert_eq!(error_code(&c), 0);
}
