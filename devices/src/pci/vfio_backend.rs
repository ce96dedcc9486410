//! The device side of VFIO passthrough, as [`super::vfio::VfioPciDevice`] sees it: regions,
//! interrupts, reset and DMA mappings. Two implementations: kernel VFIO (`vfio_kernel.rs`) and
//! vfio-user (`vfio_user.rs`); tests use an in-memory fake.
//!
//! VFIO migration v2 (features, device state, data stream, pre-copy info, DMA logging) is part
//! of the trait with "unsupported" defaults; both real backends pass it through to the device,
//! and the migration driver (a later issue) drives it.

use std::fs::File;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_EVENTFD,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_ROM_REGION_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("kernel VFIO: {0}")]
    Kernel(#[from] vfio_ioctls::VfioError),
    #[error("vfio-user: {0}")]
    User(#[from] vfio_user::Error),
    #[error("{op} at {offset:#x} of region {index}: {err}")]
    RegionIo {
        op: &'static str,
        index: u32,
        offset: u64,
        #[source]
        err: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0} is not supported by this device or backend")]
    Unsupported(&'static str),
    /// PRE_COPY with nothing to read at the moment (the kernel's ENOMSG); more may come.
    #[error("no migration data available now")]
    NoMigrationDataNow,
    #[error("invalid request: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, BackendError>;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioDeviceInfo {
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// Part of a region that may be mapped into the guest, relative to the region start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapArea {
    pub offset: u64,
    pub size: u64,
}

#[derive(Clone, Debug, Default)]
pub struct VfioRegionInfo {
    pub flags: u32,
    pub size: u64,
    /// Mappable parts (all of the region when it is mmappable without a sparse capability).
    pub mmap_areas: Vec<MmapArea>,
    /// The file to mmap and the file offset of the region's start, when mmappable.
    pub mmap_fd: Option<(Arc<File>, u64)>,
}

impl VfioRegionInfo {
    /// Mappable areas for a region whose flags and sparse-mmap capability say so: the
    /// sparse areas if listed, else the whole region.
    pub fn areas_from(flags: u32, size: u64, sparse: Option<Vec<MmapArea>>) -> Vec<MmapArea> {
        if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Vec::new();
        }
        let areas = sparse.unwrap_or_else(|| vec![MmapArea { offset: 0, size }]);
        // A server's or driver's list is trusted no further than the region's bounds.
        areas
            .into_iter()
            .filter(|a| a.size > 0 && a.offset.checked_add(a.size).is_some_and(|e| e <= size))
            .collect()
    }

    pub fn readable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_READ != 0
    }

    pub fn writable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_WRITE != 0
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioIrqInfo {
    pub flags: u32,
    pub count: u32,
}

/// VFIO v2 device states (`enum vfio_device_mig_state`): one definition for both backends.
pub use vfio_user::MigState as MigrationState;

/// The state a device reports, checked: a value outside the enum is the device's error.
pub fn migration_state_from(v: u32) -> Result<MigrationState> {
    MigrationState::from_u32(v).ok_or_else(|| BackendError::Invalid(format!("device state {v}")))
}

/// A range of guest RAM to make reachable by the device's DMA at `iova` (= its guest-physical
/// address: there is no vIOMMU). Kernel VFIO pins `host_addr`; vfio-user servers mmap `file`.
#[derive(Clone, Debug)]
pub struct DmaRegion {
    pub iova: u64,
    pub size: u64,
    host_addr: u64,
    file: Option<(Arc<File>, u64)>,
}

impl DmaRegion {
    /// # Safety
    ///
    /// `host_addr..host_addr+size` must be mapped memory of this process that stays mapped
    /// until the region is unmapped from every device it was mapped into; the device will
    /// read and write it at any time.
    pub unsafe fn new(
        iova: u64,
        size: u64,
        host_addr: *mut u8,
        file: Option<(Arc<File>, u64)>,
    ) -> Self {
        DmaRegion {
            iova,
            size,
            host_addr: host_addr as u64,
            file,
        }
    }

    /// One region per RAM region of `mem`. The VMM keeps guest memory mapped for the life of
    /// the VM and unmaps devices before dropping it, which is what makes this safe to call.
    pub fn from_guest_memory<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> Vec<DmaRegion> {
        mem.iter()
            .map(|r| DmaRegion {
                iova: r.start_addr().0,
                size: r.len(),
                host_addr: r.as_ptr() as u64,
                file: r.file_offset().map(|f| (f.arc().clone(), f.start())),
            })
            .collect()
    }

    pub fn host_addr(&self) -> *mut u8 {
        self.host_addr as *mut u8
    }

    /// The file backing the range and the offset of `iova` in it (shared memory only).
    pub fn file(&self) -> Option<(&Arc<File>, u64)> {
        self.file.as_ref().map(|(f, o)| (f, *o))
    }
}

/// A VFIO device as one backend exposes it. Region and IRQ indices are VFIO's
/// (`VFIO_PCI_*_REGION_INDEX`, `VFIO_PCI_*_IRQ_INDEX`).
pub trait VfioBackend: Send {
    fn device_info(&mut self) -> Result<VfioDeviceInfo>;
    fn region_info(&mut self, index: u32) -> Result<VfioRegionInfo>;
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<()>;
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()>;
    fn irq_info(&mut self, index: u32) -> Result<VfioIrqInfo>;
    /// Signals interrupt `i` of IRQ `index` on `fds[i]` from now on, replacing earlier fds.
    fn set_irq_eventfds(&mut self, index: u32, fds: &[&EventFd]) -> Result<()>;
    /// Stops every interrupt of IRQ `index`.
    fn disable_irq(&mut self, index: u32) -> Result<()>;
    /// INTx only: unmask the (level, auto-masked) line whenever `fd` is signalled — KVM's
    /// resample eventfd, so the device re-asserts after the guest's EOI.
    fn set_irq_unmask_eventfd(&mut self, index: u32, fd: &EventFd) -> Result<()>;
    /// INTx only: unmask the line once, now (for devices that refuse an unmask eventfd).
    fn unmask_irq(&mut self, index: u32) -> Result<()>;
    fn reset(&mut self) -> Result<()>;
    fn dma_map(&mut self, region: &DmaRegion) -> Result<()>;
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()>;

    /// `VFIO_MIGRATION_*` flags, or `None` when the device cannot migrate.
    fn migration_features(&mut self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// The deprecated v1 migration region (type capability 3 / subtype 1) as (region index,
    /// size), found by its capability; `None` when the device has none.
    fn migration_region_v1(&mut self) -> Result<Option<(u32, u64)>> {
        Ok(None)
    }

    /// Moves the device to `state` (the device walks the intermediate arcs).
    fn set_migration_state(&mut self, _state: MigrationState) -> Result<()> {
        Err(BackendError::Unsupported("device migration"))
    }

    fn migration_state(&mut self) -> Result<MigrationState> {
        Err(BackendError::Unsupported("device migration"))
    }

    /// Reads the next chunk of the device's migration stream; 0 means its end, and
    /// [`BackendError::NoMigrationDataNow`] that PRE_COPY has nothing at the moment.
    fn read_migration_data(&mut self, _buf: &mut [u8]) -> Result<usize> {
        Err(BackendError::Unsupported("device migration"))
    }

    /// PRE_COPY estimates: (initial bytes, dirty bytes) still to read.
    fn precopy_info(&mut self) -> Result<(u64, u64)> {
        Err(BackendError::Unsupported("pre-copy info"))
    }

    /// The device's estimate of its STOP_COPY data size.
    fn stop_copy_size(&mut self) -> Result<u64> {
        Err(BackendError::Unsupported("migration data size"))
    }

    fn write_migration_data(&mut self, _data: &[u8]) -> Result<()> {
        Err(BackendError::Unsupported("device migration"))
    }

    /// Starts logging the device's DMA writes in `ranges` (iova, length); returns the page
    /// size the device settled on.
    fn dma_logging_start(&mut self, _page_size: u64, _ranges: &[(u64, u64)]) -> Result<u64> {
        Err(BackendError::Unsupported("DMA logging"))
    }

    /// Dirty bitmap of `[iova, iova+length)`: bit i%64 of word i/64 is page i.
    fn dma_logging_report(
        &mut self,
        _iova: u64,
        _length: u64,
        _page_size: u64,
    ) -> Result<Vec<u64>> {
        Err(BackendError::Unsupported("DMA logging"))
    }

    fn dma_logging_stop(&mut self) -> Result<()> {
        Err(BackendError::Unsupported("DMA logging"))
    }

    /// Withdraws the DMA mappings still in place, before the guest RAM behind them is
    /// freed. The default does nothing: a vfio-user server's mappings are its own mmaps of
    /// the RAM file, dropped when the connection closes (and a server may refuse DMA_UNMAP
    /// in the STOP state a migrated-away device is left in).
    fn release_dma(&mut self) {}

    /// Whether the device can log its DMA writes at `page_size` (Ok), or why not. Backends
    /// without a probe call start logging over `ranges` and stop it again.
    fn dma_logging_probe(&mut self, page_size: u64, ranges: &[(u64, u64)]) -> Result<()> {
        let page = self.dma_logging_start(page_size, ranges)?;
        self.dma_logging_stop()?;
        if page != page_size {
            return Err(BackendError::Invalid(format!(
                "device logs {page}-byte pages, not {page_size}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_states_round_trip() {
        for v in 0..8 {
            assert_eq!(migration_state_from(v).unwrap() as u32, v);
        }
        assert!(migration_state_from(8).is_err());
    }
}
