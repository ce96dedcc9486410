//! The VFIO PCI device over vfio-user against the real `sampledev` server process: config
//! space, BAR0 registers through the MMIO bus, MSI-X enable, DMA into file-backed guest RAM,
//! and the completion interrupt arriving on the vector's eventfd.
//!
//! Skipped (with a note) unless `target/debug/sampledev` exists: `cargo build -p sampledev`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::Bus;
use devices::pci::irq::{IrqError, MsiMessage, MsiRouting};
use devices::pci::{DmaRegion, PciBdf, PciRoot, PciWindows, VfioPciDevice, VfioUserBackend};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const REG_ID: u64 = 0x000;
const REG_STATUS: u64 = 0x008;
const REG_DMA_DST: u64 = 0x018;
const REG_DMA_LEN: u64 = 0x020;
const REG_DMA_PATTERN: u64 = 0x028;
const REG_DMA_CMD: u64 = 0x030;
const REG_DMA_VECTOR: u64 = 0x038;
const CMD_FILL: u64 = 1;
const STATUS_DONE: u64 = 2;
const STATUS_ERROR: u64 = 4;
const SEED: u64 = 0x1234_5678;
const MSIX_TABLE: u64 = 0x800;

/// sampledev's FILL data (its `pattern.rs`): word `w` of the destination.
fn fill_word(seed: u64, w: u64) -> u64 {
    let mut z = (seed ^ w.wrapping_mul(0xa076_1d64_78bd_642f)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Keeps a copy of every eventfd attached to a GSI, so the test can see interrupts.
#[derive(Default)]
struct Recorder {
    next: Mutex<u32>,
    irqfds: Mutex<BTreeMap<u32, EventFd>>,
    routes: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl MsiRouting for Recorder {
    fn allocate_gsi(&self) -> Result<u32, IrqError> {
        let mut n = self.next.lock().unwrap();
        *n += 1;
        Ok(23 + *n)
    }
    fn free_gsi(&self, _gsi: u32) {}
    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
        let mut r = self.routes.lock().unwrap();
        match msg {
            Some(m) => r.insert(gsi, m),
            None => r.remove(&gsi),
        };
        Ok(())
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        let fd = fd.try_clone().map_err(IrqError::EventFd)?;
        self.irqfds.lock().unwrap().insert(gsi, fd);
        Ok(())
    }
    fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.irqfds.lock().unwrap().remove(&gsi);
        Ok(())
    }
}

struct Server(Child, PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

fn start_sampledev() -> Option<Server> {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sampledev");
    if !bin.exists() {
        eprintln!(
            "{} missing (cargo build -p sampledev): skipped",
            bin.display()
        );
        return None;
    }
    let sock = std::env::temp_dir().join(format!("sampledev-e2e-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(&bin)
        .args(["--socket", sock.to_str()?, "--state-size", "4K"])
        .spawn()
        .ok()?;
    let server = Server(child, sock.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "sampledev did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(server)
}

fn rd64(bus: &Bus, addr: u64) -> u64 {
    let mut b = [0u8; 8];
    assert!(bus.read(addr, &mut b));
    u64::from_le_bytes(b)
}

fn wr64(bus: &Bus, addr: u64, v: u64) {
    assert!(bus.write(addr, &v.to_le_bytes()));
}

/// Guest RAM as a VMM hands it to devices: a memfd sealed against shrinking (sampledev
/// refuses anything else).
fn sealed_memfd(size: u64) -> std::fs::File {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
    let fd =
        unsafe { libc::memfd_create(c"ram".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and nothing else owns it.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    // SAFETY: F_ADD_SEALS only changes the seal set of the fd just created.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(r, 0);
    f
}

#[test]
fn sampledev_dma_and_msix() {
    let Some(server) = start_sampledev() else {
        return;
    };
    let routing = Arc::new(Recorder::default());
    let backend = Box::new(VfioUserBackend::connect(&server.1).unwrap());
    let dev = VfioPciDevice::new("sampledev", backend, routing.clone(), None).unwrap();
    let dev = Arc::new(Mutex::new(dev));
    let (mmio, pio) = (Arc::new(Bus::new()), Arc::new(Bus::new()));
    let windows = PciWindows {
        mmio32: (0xc000_0000, 0x2000_0000),
        mmio64: None,
        io: (0xc000, 0x4000),
    };
    let root = PciRoot::new(mmio.clone(), pio, windows);
    let slot = root.add_device(dev.clone()).unwrap();
    let bar0 = root.mapped_bars(slot)[0].addr;
    assert_eq!(rd64(&mmio, bar0 + REG_ID) as u32, 0x5344_5631);

    let file = sealed_memfd(0x10_0000);
    let ranges = [(GuestAddress(0), 0x10_0000, Some(FileOffset::new(file, 0)))];
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files(ranges).unwrap();
    let dma = DmaRegion::from_guest_memory(&mem);
    dev.lock().unwrap().dma_map(&dma).unwrap();

    let bdf = PciBdf {
        bus: 0,
        device: slot,
        function: 0,
    };
    root.config_write(bdf, 0x04, &0x0006u16.to_le_bytes());
    root.config_write(bdf, 0x43, &[0x80]);
    wr64(&mmio, bar0 + MSIX_TABLE, 0xfee0_0000);
    wr64(&mmio, bar0 + MSIX_TABLE + 8, 0x31);

    wr64(&mmio, bar0 + REG_DMA_DST, 0x2000);
    wr64(&mmio, bar0 + REG_DMA_LEN, 0x100);
    wr64(&mmio, bar0 + REG_DMA_PATTERN, SEED);
    wr64(&mmio, bar0 + REG_DMA_VECTOR, 0);
    wr64(&mmio, bar0 + REG_DMA_CMD, CMD_FILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rd64(&mmio, bar0 + REG_STATUS) & STATUS_DONE == 0 {
        assert!(Instant::now() < deadline, "DMA did not complete");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(rd64(&mmio, bar0 + REG_STATUS) & STATUS_ERROR, 0);
    for w in 0..0x20u64 {
        let got: u64 = mem.read_obj(GuestAddress(0x2000 + 8 * w)).unwrap();
        assert_eq!(got, fill_word(SEED, w), "DMA word {w} in guest RAM");
    }

    let routes = routing.routes.lock().unwrap().clone();
    assert_eq!(
        routes.values().map(|m| m.data).collect::<Vec<_>>(),
        vec![0x31]
    );
    let gsi = *routes.keys().next().unwrap();
    let irqfds = routing.irqfds.lock().unwrap();
    assert!(
        irqfds[&gsi].read().unwrap() >= 1,
        "completion interrupt on vector 0"
    );
    drop(irqfds);
    dev.lock().unwrap().dma_unmap(&dma).unwrap();
}
