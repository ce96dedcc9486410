//! Fakes shared by the PCI unit tests: an [`MsiRouting`] that records what KVM would be told,
//! a plain PCI function with BARs, and an in-memory VFIO backend.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use migration::state::{StateError, decode, encode};
use vmm_sys_util::eventfd::EventFd;

use super::bar_mmap::{BarMapError, BarMemoryMapper};
use super::config::{BarKind, BarRegion, PciConfigState, PciConfiguration, PciHeader};
use super::device::PciDevice;
use super::irq::{IrqError, MsiMessage, MsiRouting};
use super::vfio_backend::{
    BackendError, DmaRegion, Result as BackendResult, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    VfioBackend, VfioDeviceInfo, VfioIrqInfo, VfioRegionInfo,
};

#[derive(Default)]
pub struct FakeRouting {
    pub state: Mutex<FakeRoutingState>,
}

#[derive(Default)]
pub struct FakeRoutingState {
    pub next: u32,
    pub allocated: BTreeSet<u32>,
    pub routes: BTreeMap<u32, MsiMessage>,
    pub irqfds: BTreeSet<u32>,
    /// Number of route commits, to check batching.
    pub commits: usize,
}

impl FakeRouting {
    pub fn routes(&self) -> BTreeMap<u32, MsiMessage> {
        self.state.lock().unwrap().routes.clone()
    }

    pub fn irqfds(&self) -> BTreeSet<u32> {
        self.state.lock().unwrap().irqfds.clone()
    }
}

impl MsiRouting for FakeRouting {
    fn allocate_gsi(&self) -> Result<u32, IrqError> {
        let mut s = self.state.lock().unwrap();
        let g = 24 + s.next;
        s.next += 1;
        s.allocated.insert(g);
        Ok(g)
    }

    fn free_gsi(&self, gsi: u32) {
        let mut s = self.state.lock().unwrap();
        s.allocated.remove(&gsi);
        s.routes.remove(&gsi);
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
        self.set_routes(&[(gsi, msg)])
    }

    fn set_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> Result<(), IrqError> {
        let mut s = self.state.lock().unwrap();
        for &(gsi, msg) in routes {
            if !s.allocated.contains(&gsi) {
                return Err(IrqError::UnknownGsi(gsi));
            }
            match msg {
                Some(m) => s.routes.insert(gsi, m),
                None => s.routes.remove(&gsi),
            };
        }
        s.commits += 1;
        Ok(())
    }

    fn register_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        let mut s = self.state.lock().unwrap();
        assert!(
            s.routes.contains_key(&gsi),
            "irqfd attached before its route"
        );
        assert!(s.irqfds.insert(gsi), "irqfd attached twice");
        Ok(())
    }

    fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        assert!(
            self.state.lock().unwrap().irqfds.remove(&gsi),
            "irqfd not attached"
        );
        Ok(())
    }

    fn register_resample_irqfd(
        &self,
        _fd: &EventFd,
        _resample: &EventFd,
        gsi: u32,
    ) -> Result<(), IrqError> {
        let mut s = self.state.lock().unwrap();
        assert!(s.irqfds.insert(gsi), "irqfd attached twice");
        Ok(())
    }
}

/// A PCI function with declared BARs whose BAR accesses are recorded.
pub struct TestDevice {
    pub config: PciConfiguration,
    pub bar_writes: Vec<(usize, u64, Vec<u8>)>,
    pub mapped: Vec<(usize, Option<u64>)>,
}

impl TestDevice {
    pub fn new(bars: &[(usize, u64, BarKind)]) -> Self {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class: (0xff, 0, 0),
            ..Default::default()
        });
        for &(i, size, kind) in bars {
            config.add_bar(i, size, kind).unwrap();
        }
        TestDevice {
            config,
            bar_writes: Vec::new(),
            mapped: Vec::new(),
        }
    }
}

impl PciDevice for TestDevice {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn bars(&self) -> Vec<BarRegion> {
        self.config.bars()
    }

    // Reads return the BAR index in every byte, so tests can tell BARs apart.
    fn read_bar(&mut self, bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(bar as u8 + 0xa0);
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.bar_writes.push((bar, offset, data.to_vec()));
    }

    fn bar_mapped(&mut self, bar: usize, addr: Option<u64>) {
        self.mapped.push((bar, addr));
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        encode(&self.config.state())
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let s: PciConfigState = decode(bytes)?;
        self.config
            .restore(&s)
            .map_err(|e| StateError::Decode(e.to_string()))
    }
}

/// What a [`FakeBackend`] holds and records; shared with the test through an `Arc`.
#[derive(Default)]
pub struct FakeDeviceState {
    pub flags: u32,
    pub config: Vec<u8>,
    /// Region contents by VFIO region index (0-5 BARs, 7 config is `config`).
    pub regions: BTreeMap<u32, Vec<u8>>,
    pub irq_counts: BTreeMap<u32, u32>,
    /// (IRQ index, number of eventfds) of each set, and `None` for a disable.
    pub irq_log: Vec<(u32, Option<usize>)>,
    pub unmask_fds: Vec<u32>,
    /// The device refuses an unmask eventfd (as mtty does, with ENOTTY).
    pub refuse_unmask_fd: bool,
    /// Unmasks done one at a time (`unmask_irq`), by IRQ index.
    pub unmasks: Vec<u32>,
    pub dma: Vec<(u64, u64)>,
    pub resets: usize,
    /// IRQ indexes with eventfds set at each reset (a reset must find none).
    pub live_at_reset: Vec<BTreeSet<u32>>,
    /// VFIO_DEVICE_RESET fails (EIO).
    pub fail_reset: bool,
    /// When set, BAR regions are mmappable whole, from this file at offset `index << 20`.
    pub mmap_file: Option<Arc<std::fs::File>>,
}

impl FakeDeviceState {
    /// IRQ indexes that have eventfds set now, from the log.
    pub fn live_irqs(&self) -> BTreeSet<u32> {
        self.irq_log.iter().fold(BTreeSet::new(), |mut s, &(i, n)| {
            match n {
                Some(_) => s.insert(i),
                None => s.remove(&i),
            };
            s
        })
    }
}

pub struct FakeBackend(pub Arc<Mutex<FakeDeviceState>>);

impl FakeBackend {
    fn st(&self) -> std::sync::MutexGuard<'_, FakeDeviceState> {
        self.0.lock().unwrap()
    }
}

fn slice_at(buf: &[u8], offset: u64, len: usize) -> BackendResult<std::ops::Range<usize>> {
    let start = offset as usize;
    (start + len <= buf.len())
        .then_some(start..start + len)
        .ok_or_else(|| BackendError::Invalid(format!("access at {offset:#x}+{len}")))
}

impl VfioBackend for FakeBackend {
    fn device_info(&mut self) -> BackendResult<VfioDeviceInfo> {
        Ok(VfioDeviceInfo {
            flags: self.st().flags,
            num_regions: 9,
            num_irqs: 5,
        })
    }

    fn region_info(&mut self, index: u32) -> BackendResult<VfioRegionInfo> {
        let st = self.st();
        let size = match index {
            VFIO_PCI_CONFIG_REGION_INDEX => st.config.len(),
            i => st.regions.get(&i).map_or(0, Vec::len),
        } as u64;
        let mut flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let mmap_fd = match &st.mmap_file {
            Some(f) if index < 6 && size > 0 => {
                flags |= VFIO_REGION_INFO_FLAG_MMAP;
                Some((f.clone(), u64::from(index) << 20))
            }
            _ => None,
        };
        Ok(VfioRegionInfo {
            flags,
            size,
            mmap_areas: VfioRegionInfo::areas_from(flags, size, None),
            mmap_fd,
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> BackendResult<()> {
        let st = self.st();
        let buf = match index {
            VFIO_PCI_CONFIG_REGION_INDEX => &st.config,
            i => st
                .regions
                .get(&i)
                .ok_or(BackendError::Unsupported("region"))?,
        };
        data.copy_from_slice(&buf[slice_at(buf, offset, data.len())?]);
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> BackendResult<()> {
        let mut st = self.st();
        let buf = match index {
            VFIO_PCI_CONFIG_REGION_INDEX => &mut st.config,
            i => st
                .regions
                .get_mut(&i)
                .ok_or(BackendError::Unsupported("region"))?,
        };
        let r = slice_at(buf, offset, data.len())?;
        buf[r].copy_from_slice(data);
        Ok(())
    }

    fn irq_info(&mut self, index: u32) -> BackendResult<VfioIrqInfo> {
        Ok(VfioIrqInfo {
            flags: 0,
            count: self.st().irq_counts.get(&index).copied().unwrap_or(0),
        })
    }

    fn set_irq_eventfds(&mut self, index: u32, fds: &[&EventFd]) -> BackendResult<()> {
        let mut st = self.st();
        // vfio-pci refuses a second interrupt type while one is set up.
        let live = st.live_irqs();
        if live.iter().any(|&i| i != index) {
            return Err(BackendError::Invalid(format!(
                "IRQ {index} while {live:?} live"
            )));
        }
        st.irq_log.push((index, Some(fds.len())));
        Ok(())
    }

    fn disable_irq(&mut self, index: u32) -> BackendResult<()> {
        self.st().irq_log.push((index, None));
        Ok(())
    }

    fn set_irq_unmask_eventfd(&mut self, index: u32, _fd: &EventFd) -> BackendResult<()> {
        let mut st = self.st();
        if st.refuse_unmask_fd {
            return Err(BackendError::Io(std::io::Error::from_raw_os_error(
                libc::ENOTTY,
            )));
        }
        st.unmask_fds.push(index);
        Ok(())
    }

    fn unmask_irq(&mut self, index: u32) -> BackendResult<()> {
        self.st().unmasks.push(index);
        Ok(())
    }

    fn reset(&mut self) -> BackendResult<()> {
        let mut st = self.st();
        if st.fail_reset {
            return Err(BackendError::Io(std::io::Error::from_raw_os_error(
                libc::EIO,
            )));
        }
        st.resets += 1;
        let live = st.live_irqs();
        st.live_at_reset.push(live);
        // The reset drops the device's eventfds.
        for i in st.live_irqs() {
            st.irq_log.push((i, None));
        }
        Ok(())
    }

    fn dma_map(&mut self, region: &DmaRegion) -> BackendResult<()> {
        self.st().dma.push((region.iova, region.size));
        Ok(())
    }

    fn release_dma(&mut self) {
        self.st().dma.clear();
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> BackendResult<()> {
        let mut st = self.st();
        let before = st.dma.len();
        st.dma.retain(|&r| r != (iova, size));
        if st.dma.len() == before {
            return Err(BackendError::Invalid("unmap of unmapped range".into()));
        }
        Ok(())
    }
}

/// A [`BarMemoryMapper`] that records what would be mapped: handle -> (gpa, size, file offset).
#[derive(Default)]
pub struct FakeMapper {
    pub maps: Mutex<BTreeMap<u64, (u64, u64, u64)>>,
    next: Mutex<u64>,
}

impl BarMemoryMapper for FakeMapper {
    fn map(
        &self,
        gpa: u64,
        size: u64,
        _file: &std::fs::File,
        file_offset: u64,
        _writable: bool,
    ) -> Result<u64, BarMapError> {
        let mut n = self.next.lock().unwrap();
        *n += 1;
        self.maps
            .lock()
            .unwrap()
            .insert(*n, (gpa, size, file_offset));
        Ok(*n)
    }

    fn unmap(&self, handle: u64) {
        assert!(self.maps.lock().unwrap().remove(&handle).is_some());
    }
}
