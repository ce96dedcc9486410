//! Kernel VFIO backend on vfio-ioctls: a type-1 container shared by the VM's devices (and
//! registered with KVM's VFIO pseudo-device), groups opened through it, and one device fd per
//! function. mdev devices (e.g. the mtty sample) open the same way through their sysfs path.
//!
//! The build machines have no `/dev/vfio`: there the ioctl paths run against `vfio-model`, an
//! LD_PRELOAD model of the kernel side serving mtty (`vmm/tests/kernel_vfio_model.rs`), and
//! against the real kernel only through `scripts/mtty-vfio.sh` on a host with VFIO.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED, VFIO_REGION_TYPE_MIGRATION_DEPRECATED, VFIO_TYPE,
    vfio_device_feature, vfio_device_info,
};
use vfio_ioctls::{DmaLoggingRange, VfioContainer, VfioDevice, VfioDeviceFd, VfioError};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use super::vfio_backend::{
    BackendError, DmaRegion, MigrationState, Result, VFIO_DEVICE_FLAGS_RESET, VfioBackend,
    VfioDeviceInfo, VfioIrqInfo, VfioRegionInfo, migration_state_from,
};
use super::vfio_regions::{self, KernelRegion};

ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);
ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE as u32, VFIO_BASE + 17);

/// The VM's VFIO container. Guest RAM is mapped into it once however many devices share it:
/// each backend's `dma_map` takes a reference on the range, the last `dma_unmap` drops it.
pub struct KernelVfioContainer {
    container: Arc<VfioContainer>,
    mapped: Mutex<BTreeMap<(u64, u64), usize>>,
}

impl KernelVfioContainer {
    /// Opens `/dev/vfio/vfio` and ties it to the VM's KVM VFIO device, through which KVM learns
    /// about the groups (needed for coherent DMA and, on some hosts, for mdev devices).
    pub fn new(vm: &VmFd) -> Result<Arc<Self>> {
        let mut dev = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let kvm_vfio = vm
            .create_device(&mut dev)
            .map_err(|e| BackendError::Invalid(format!("KVM_CREATE_DEVICE(VFIO): {e}")))?;
        let handle = Arc::new(VfioDeviceFd::new_from_kvm(kvm_vfio));
        let container = VfioContainer::new(Some(handle))?;
        Ok(Arc::new(KernelVfioContainer {
            container: Arc::new(container),
            mapped: Mutex::new(BTreeMap::new()),
        }))
    }

    fn map(&self, r: &DmaRegion) -> Result<()> {
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        let key = (r.iova, r.size);
        if let Some(n) = mapped.get_mut(&key) {
            *n += 1;
            return Ok(());
        }
        let size = usize::try_from(r.size).map_err(|_| BackendError::Invalid("DMA size".into()))?;
        // SAFETY: a DmaRegion is only built over memory that stays mapped until it is unmapped
        // from every device (its constructors' contract), and the last unmap below happens
        // before that.
        let res = unsafe { self.container.vfio_dma_map(r.iova, size, r.host_addr()) };
        // EEXIST is an error too: a range mapped behind the container's back is not ours to
        // count or to unmap later.
        res?;
        mapped.insert(key, 1);
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<()> {
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        let n = mapped
            .get_mut(&(iova, size))
            .ok_or_else(|| BackendError::Invalid(format!("{iova:#x}+{size:#x} is not mapped")))?;
        *n -= 1;
        if *n == 0 {
            mapped.remove(&(iova, size));
            let len =
                usize::try_from(size).map_err(|_| BackendError::Invalid("DMA size".into()))?;
            self.container.vfio_dma_unmap(iova, len)?;
        }
        Ok(())
    }
}

pub struct KernelVfioBackend {
    /// A duplicate of the device fd for positioned I/O (with errors, which vfio-ioctls'
    /// region_read/write only log) and for mmapping BARs. Declared before `device` so it is
    /// closed first: while any copy of the device fd is open, vfio-ioctls' release of the
    /// group on `device`'s drop fails with EBUSY.
    file: Arc<File>,
    device: VfioDevice,
    container: Arc<KernelVfioContainer>,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
    /// Region info by index, read here rather than from vfio-ioctls (see vfio_regions).
    regions: BTreeMap<u32, KernelRegion>,
    /// The container references this device holds (iova, size), withdrawn by release_dma.
    dma: Vec<(u64, u64)>,
}

impl KernelVfioBackend {
    /// Opens the device at `sysfs_path` (`/sys/bus/pci/devices/BDF` or
    /// `/sys/bus/mdev/devices/UUID`), adding its IOMMU group to `container`.
    pub fn open(sysfs_path: &Path, container: Arc<KernelVfioContainer>) -> Result<Self> {
        let device = VfioDevice::new(sysfs_path, container.container.clone(), false)?;
        // SAFETY: the fd belongs to `device`, which is alive here; it is only borrowed long
        // enough to duplicate it.
        let fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
        let file = Arc::new(File::from(fd.try_clone_to_owned()?));
        let mut info = vfio_device_info {
            argsz: std::mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_GET_INFO writes at most `argsz` bytes into `info`, which is a
        // properly sized and aligned vfio_device_info.
        let ret = unsafe { ioctl_with_mut_ref(&*file, VFIO_DEVICE_GET_INFO(), &mut info) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let regions =
            vfio_regions::region_table(info.num_regions, |i| vfio_regions::query(&file, i))?;
        Ok(KernelVfioBackend {
            device,
            container,
            file,
            flags: info.flags,
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
            regions,
            dma: Vec::new(),
        })
    }

    /// Byte range `offset..offset+len` of region `index` as a device-file offset, if inside.
    fn file_offset(&self, index: u32, offset: u64, len: usize) -> Result<u64> {
        let (size, base) = self
            .regions
            .get(&index)
            .map_or((0, 0), |r| (r.size, r.offset));
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(base + offset),
            _ => Err(BackendError::Invalid(format!(
                "{len} bytes at {offset:#x} of region {index} ({size:#x} bytes)"
            ))),
        }
    }
}

impl VfioBackend for KernelVfioBackend {
    fn device_info(&mut self) -> Result<VfioDeviceInfo> {
        Ok(VfioDeviceInfo {
            flags: self.flags,
            num_regions: self.num_regions,
            num_irqs: self.num_irqs,
        })
    }

    fn region_info(&mut self, index: u32) -> Result<VfioRegionInfo> {
        let Some(r) = self.regions.get(&index) else {
            return Ok(VfioRegionInfo::default());
        };
        let (flags, size) = (r.flags, r.size);
        let mmap_areas = VfioRegionInfo::areas_from(flags, size, r.caps.sparse.clone());
        let mmap_fd = (!mmap_areas.is_empty()).then(|| (self.file.clone(), r.offset));
        Ok(VfioRegionInfo {
            flags,
            size,
            mmap_areas,
            mmap_fd,
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        let at = self.file_offset(index, offset, data.len())?;
        self.file
            .read_exact_at(data, at)
            .map_err(|err| BackendError::RegionIo {
                op: "read",
                index,
                offset,
                err,
            })
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let at = self.file_offset(index, offset, data.len())?;
        self.file
            .write_all_at(data, at)
            .map_err(|err| BackendError::RegionIo {
                op: "write",
                index,
                offset,
                err,
            })
    }

    fn irq_info(&mut self, index: u32) -> Result<VfioIrqInfo> {
        Ok(self
            .device
            .get_irq_info(index)
            .map(|i| VfioIrqInfo {
                flags: i.flags,
                count: i.count,
            })
            .unwrap_or_default())
    }

    fn set_irq_eventfds(&mut self, index: u32, fds: &[&EventFd]) -> Result<()> {
        if fds.is_empty() {
            return self.disable_irq(index);
        }
        Ok(self.device.enable_irq(index, fds.to_vec())?)
    }

    fn disable_irq(&mut self, index: u32) -> Result<()> {
        Ok(self.device.disable_irq(index)?)
    }

    fn set_irq_unmask_eventfd(&mut self, index: u32, fd: &EventFd) -> Result<()> {
        Ok(self.device.set_irq_resample_fd(index, vec![fd])?)
    }

    fn unmask_irq(&mut self, index: u32) -> Result<()> {
        Ok(self.device.unmask_irq(index)?)
    }

    fn reset(&mut self) -> Result<()> {
        // Without VFIO_DEVICE_FLAGS_RESET the function has no reset of its own, but a
        // migration driver still implements VFIO_DEVICE_RESET: the uAPI makes it the only way
        // out of ERROR or an aborted RESUMING, and QEMU's migration error path issues it
        // whatever the flag says. mtty sets no flag, so a destination aborting a resume
        // called its reset unsupported and lost the device. Outside a migration session it
        // stays unsupported (it would not reset such a function's registers).
        let session = || -> Result<bool> {
            Ok(self.device.query_migration_support()?.is_some()
                && self.device.get_migration_state()? != MigrationState::Running as u32)
        };
        if self.flags & VFIO_DEVICE_FLAGS_RESET == 0 && !session()? {
            return Err(BackendError::Unsupported("device reset"));
        }
        // Issued here because vfio-ioctls' reset() drops the ioctl's result.
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is this device's.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(&*self.file, VFIO_DEVICE_RESET()) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // The reset ends any migration session and leaves the device RUNNING; setting
        // RUNNING (a no-op arc) makes vfio-ioctls drop the session's cached data_fd, which
        // would otherwise be read or written by the next session.
        if self.device.query_migration_support()?.is_some() {
            self.device
                .set_migration_state(MigrationState::Running as u32)?;
        }
        Ok(())
    }

    fn dma_map(&mut self, region: &DmaRegion) -> Result<()> {
        self.container.map(region)?;
        self.dma.push((region.iova, region.size));
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        self.container.unmap(iova, size)?;
        if let Some(i) = self.dma.iter().position(|&m| m == (iova, size)) {
            self.dma.remove(i);
        }
        Ok(())
    }

    /// Container mappings pin guest RAM and outlive it unless withdrawn: drop this device's
    /// references (the container unmaps a range when its last user goes).
    fn release_dma(&mut self) {
        for (iova, size) in std::mem::take(&mut self.dma) {
            if let Err(e) = self.container.unmap(iova, size) {
                log::warn!("kernel VFIO: unmapping DMA {iova:#x}+{size:#x}: {e}");
            }
        }
    }

    fn migration_features(&mut self) -> Result<Option<u64>> {
        Ok(self.device.query_migration_support()?)
    }

    fn migration_region_v1(&mut self) -> Result<Option<(u32, u64)>> {
        let v1 = (
            VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
            VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
        );
        Ok(self
            .regions
            .iter()
            .find(|(_, r)| r.caps.type_ == Some(v1))
            .map(|(&i, r)| (i, r.size)))
    }

    fn set_migration_state(&mut self, state: MigrationState) -> Result<()> {
        Ok(self.device.set_migration_state(state as u32)?)
    }

    fn migration_state(&mut self) -> Result<MigrationState> {
        migration_state_from(self.device.get_migration_state()?)
    }

    fn read_migration_data(&mut self, buf: &mut [u8]) -> Result<usize> {
        match self.device.read_migration_data(buf) {
            // PRE_COPY's "nothing now" is read() failing with ENOMSG on the data_fd.
            Err(VfioError::VfioMigrationDataIo(e)) if e.raw_os_error() == Some(libc::ENOMSG) => {
                Err(BackendError::NoMigrationDataNow)
            }
            r => Ok(r?),
        }
    }

    fn precopy_info(&mut self) -> Result<(u64, u64)> {
        let p = self.device.mig_get_precopy_info()?;
        Ok((p.initial_bytes, p.dirty_bytes))
    }

    fn stop_copy_size(&mut self) -> Result<u64> {
        Ok(self.device.get_mig_data_size()?)
    }

    fn write_migration_data(&mut self, data: &[u8]) -> Result<()> {
        Ok(self.device.write_migration_data(data)?)
    }

    fn dma_logging_start(&mut self, page_size: u64, ranges: &[(u64, u64)]) -> Result<u64> {
        let ranges: Vec<_> = ranges
            .iter()
            .map(|&(iova, length)| DmaLoggingRange { iova, length })
            .collect();
        Ok(self.device.start_dma_logging(page_size, &ranges)?)
    }

    fn dma_logging_report(&mut self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>> {
        let range = DmaLoggingRange { iova, length };
        Ok(self.device.report_dma_logging(range, page_size)?)
    }

    fn dma_logging_stop(&mut self) -> Result<()> {
        Ok(self.device.stop_dma_logging()?)
    }

    /// VFIO_DEVICE_FEATURE_PROBE answers without starting anything (a START+STOP probe
    /// would leave a device that fails the STOP logging).
    fn dma_logging_probe(&mut self, _page_size: u64, _ranges: &[(u64, u64)]) -> Result<()> {
        let mut probe = vfio_device_feature {
            argsz: std::mem::size_of::<vfio_device_feature>() as u32,
            flags: VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            ..Default::default()
        };
        // SAFETY: a PROBE carries no payload; the kernel reads `argsz` bytes of `probe`.
        let ret = unsafe { ioctl_with_mut_ref(&*self.file, VFIO_DEVICE_FEATURE(), &mut probe) };
        if ret < 0 {
            return Err(BackendError::Io(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::vfio_backend::{MmapArea, VFIO_REGION_INFO_FLAG_MMAP};

    #[test]
    fn sparse_caps_become_areas_within_the_region() {
        let caps = vec![
            MmapArea {
                offset: 0,
                size: 0x1000,
            },
            MmapArea {
                offset: 0x3000,
                size: 0x2000,
            },
        ];
        let a = VfioRegionInfo::areas_from(VFIO_REGION_INFO_FLAG_MMAP, 0x4000, Some(caps));
        assert_eq!(
            a,
            vec![MmapArea {
                offset: 0,
                size: 0x1000
            }],
            "second area overruns"
        );
        let whole = VfioRegionInfo::areas_from(VFIO_REGION_INFO_FLAG_MMAP, 0x4000, None);
        assert_eq!(
            whole,
            vec![MmapArea {
                offset: 0,
                size: 0x4000
            }]
        );
        assert!(VfioRegionInfo::areas_from(0, 0x4000, None).is_empty());
    }

    #[test]
    fn container_needs_dev_vfio() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        match KernelVfioContainer::new(&vm) {
            // Hosts without VFIO: a clear error, not a panic.
            Err(e) => assert!(e.to_string().contains("vfio"), "{e}"),
            Ok(_) => eprintln!("host has /dev/vfio/vfio"),
        }
    }
}
