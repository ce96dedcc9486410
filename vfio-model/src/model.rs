//! The kernel side as one process sees it: type-1 containers, the configured IOMMU group and
//! its mtty device, the device's migration data files, and the KVM-VFIO pseudo-device's
//! group list. Every entry point takes the caller's arguments as addresses and copies them
//! in and out through `Sys`, with the argsz/minsz checks the VFIO core makes, so a wrong
//! size or layout on minivmm's side fails here as it would in the kernel.

use std::collections::{BTreeMap, HashMap};

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_FLAGS_PCI, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_VADDR,
    VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_UNMAP_FLAG_ALL, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    VFIO_DMA_UNMAP_FLAG_VADDR, VFIO_GROUP_FLAGS_CONTAINER_SET, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK,
    VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use crate::Errno;
use crate::config::Config;
use crate::fsm::{self, next_state};
use crate::mtty::{CONFIG_SIZE, HEADER_BYTES, Mtty};
use crate::sys::{FileId, Sys, c_read_string, read_u32, read_u64, write_u32, write_u64};

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`.
const fn vio(n: u64) -> u64 {
    (59 << 8) | (100 + n)
}
pub const GET_API_VERSION: u64 = vio(0);
pub const CHECK_EXTENSION: u64 = vio(1);
pub const SET_IOMMU: u64 = vio(2);
pub const GROUP_GET_STATUS: u64 = vio(3);
pub const GROUP_SET_CONTAINER: u64 = vio(4);
pub const GROUP_UNSET_CONTAINER: u64 = vio(5);
pub const GROUP_GET_DEVICE_FD: u64 = vio(6);
pub const DEVICE_GET_INFO: u64 = vio(7);
pub const DEVICE_GET_REGION_INFO: u64 = vio(8);
pub const DEVICE_GET_IRQ_INFO: u64 = vio(9);
pub const DEVICE_SET_IRQS: u64 = vio(10);
pub const DEVICE_RESET: u64 = vio(11);
pub const DEVICE_FEATURE: u64 = vio(17);
pub const MIG_GET_PRECOPY_INFO: u64 = vio(21);
pub const IOMMU_GET_INFO: u64 = vio(12);
pub const IOMMU_MAP_DMA: u64 = vio(13);
pub const IOMMU_UNMAP_DMA: u64 = vio(14);

const TYPE1_IOMMU: u64 = 1;
const TYPE1V2_IOMMU: u64 = 3;
const NUM_REGIONS: u32 = 9;
const NUM_IRQS: u32 = 5;
const CONFIG_REGION: u32 = 7;
const INTX: u32 = 0;
const MSI: u32 = 1;
/// mtty puts region `i` at `i << 40` in the device file.
const REGION_SHIFT: u32 = 40;
const PAGE: u64 = 4096;
/// What x86 hosts report: all of the IOVA space but the MSI window.
const IOVA_RANGES: [(u64, u64); 2] = [(0, 0xfedf_ffff), (0xfef0_0000, (1 << 48) - 1)];
const DMA_AVAIL: u32 = 65535;
const KVM_DEV_VFIO_FILE: u32 = 1;
const KVM_DEV_VFIO_FILE_ADD: u64 = 1;
const KVM_DEV_VFIO_FILE_DEL: u64 = 2;
/// Most ranges DMA_LOGGING_START takes (a page of `vfio_device_feature_dma_logging_range`).
const LOG_MAX_RANGES: u32 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handle {
    Container(usize),
    Group,
    Device,
    Save(u64),
    Resume(u64),
    KvmVfio(usize),
}

#[derive(Default)]
struct Container {
    has_group: bool,
    iommu: bool,
    /// iova → (size, vaddr)
    maps: BTreeMap<u64, (u64, u64)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Irq {
    None,
    Intx,
    Msi,
}

struct SaveFile {
    id: u64,
    data: Vec<u8>,
    pos: usize,
}

struct ResumeFile {
    id: u64,
    data: Vec<u8>,
}

struct Device {
    mtty: Mtty,
    irq: Irq,
    intx_fd: Option<i32>,
    msi_fd: Option<i32>,
    intx_masked: bool,
    state: u32,
    saving: Option<SaveFile>,
    resuming: Option<ResumeFile>,
    next_file: u64,
    /// Times the INTx or MSI eventfd was signalled (for the log and tests).
    triggers: u64,
}

pub struct Model<S: Sys> {
    pub sys: S,
    cfg: Config,
    files: HashMap<FileId, Handle>,
    containers: Vec<Container>,
    group_container: Option<usize>,
    group_files: Vec<FileId>,
    device_files: Vec<FileId>,
    /// Per KVM-VFIO device: whether the group is on its list.
    kvm_vfio: Vec<bool>,
    kvm_real_has_group: bool,
    dev: Device,
}

type R = Result<i64, Errno>;

impl<S: Sys> Model<S> {
    pub fn new(cfg: Config, sys: S) -> Self {
        let mut m = Model {
            sys,
            dev: Device {
                mtty: Mtty::new(cfg.ports),
                irq: Irq::None,
                intx_fd: None,
                msi_fd: None,
                intx_masked: false,
                state: fsm::RUNNING,
                saving: None,
                resuming: None,
                next_file: 1,
                triggers: 0,
            },
            cfg,
            files: HashMap::new(),
            containers: Vec::new(),
            group_container: None,
            group_files: Vec::new(),
            device_files: Vec::new(),
            kvm_vfio: Vec::new(),
            kvm_real_has_group: false,
        };
        let line = format!(
            "a userspace MODEL of mtty behind VFIO (not the kernel): group {} device {} ports {} dma-logging {}",
            m.cfg.group,
            m.cfg.device,
            m.cfg.ports,
            if m.cfg.dma_logging { "no-op" } else { "absent" }
        );
        m.sys.log(&line);
        m
    }

    pub fn is_ours(&self, id: FileId) -> bool {
        self.files.contains_key(&id)
    }

    fn new_file(&mut self, what: &str, h: Handle) -> Result<(i32, FileId), Errno> {
        let (fd, id) = self.sys.new_fd(what)?;
        self.files.insert(id, h);
        Ok((fd, id))
    }

    /// open() of a `/dev/vfio/...` path; None when the path is not the model's business.
    pub fn open(&mut self, path: &str) -> Option<Result<i32, Errno>> {
        let rest = path.strip_prefix("/dev/vfio/")?;
        let r = if rest == "vfio" {
            self.containers.push(Container::default());
            let i = self.containers.len() - 1;
            self.new_file("container", Handle::Container(i))
                .map(|(fd, _)| fd)
        } else if rest == self.cfg.group.to_string() {
            // A group is opened by one file at a time.
            if self.sys.open_count(&self.group_files) > 0 {
                Err(Errno::BUSY)
            } else {
                self.new_file("group", Handle::Group).map(|(fd, id)| {
                    self.group_files.push(id);
                    fd
                })
            }
        } else {
            Err(Errno::NOENT)
        };
        self.sys.log(&format!("open {path} -> {r:?}"));
        Some(r)
    }

    /// ioctl() on one of the model's files.
    pub fn ioctl(&mut self, id: FileId, req: u64, arg: u64) -> Option<R> {
        let h = *self.files.get(&id)?;
        let r = match h {
            Handle::Container(c) => self.container_ioctl(c, req, arg),
            Handle::Group => self.group_ioctl(req, arg),
            Handle::Device => self.device_ioctl(req, arg),
            Handle::Save(f) => self.save_ioctl(f, req, arg),
            Handle::Resume(_) => Err(Errno::NOTTY),
            Handle::KvmVfio(k) => self
                .kvm_vfio_ioctl(Some(k), req, arg)
                .unwrap_or(Err(Errno::NOTTY)),
        };
        if req != MIG_GET_PRECOPY_INFO || r.is_err() {
            let mut name = ioctl_name(req);
            if req == DEVICE_FEATURE || req == DEVICE_SET_IRQS {
                // Which feature or which IRQ action: the flags word.
                let flags = read_u32(&self.sys, arg + 4).unwrap_or(0);
                name = format!("{name}(flags {flags:#x})");
            }
            self.sys.log(&format!("ioctl {h:?} {name} -> {r:?}"));
        }
        Some(r)
    }

    /// KVM_SET_DEVICE_ATTR naming one of the model's groups, on a real or a model KVM-VFIO
    /// device (`k`). None: not about the model's files (the real KVM answers).
    pub fn kvm_vfio_ioctl(&mut self, k: Option<usize>, req: u64, arg: u64) -> Option<R> {
        const KVM_SET_DEVICE_ATTR: u64 = 0x4018_aee1;
        if req != KVM_SET_DEVICE_ATTR {
            return k.map(|_| Err(Errno::NOTTY));
        }
        let attr = (|| -> Result<(u32, u64, i32), Errno> {
            let group = read_u32(&self.sys, arg + 4)?;
            let attr = read_u64(&self.sys, arg + 8)?;
            let addr = read_u64(&self.sys, arg + 16)?;
            Ok((group, attr, read_u32(&self.sys, addr)? as i32))
        })();
        let (group, attr, fd) = match attr {
            Ok(a) => a,
            Err(e) => return k.map(|_| Err(e)),
        };
        let ours = self
            .sys
            .file_id(fd)
            .is_ok_and(|id| self.files.get(&id) == Some(&Handle::Group));
        if group != KVM_DEV_VFIO_FILE || !ours {
            // A model KVM-VFIO device knows no other files.
            return k.map(|_| Err(Errno::INVAL));
        }
        let on = match k {
            Some(k) => &mut self.kvm_vfio[k],
            None => &mut self.kvm_real_has_group,
        };
        let r = match attr {
            KVM_DEV_VFIO_FILE_ADD if *on => Err(Errno::EXIST),
            KVM_DEV_VFIO_FILE_ADD => {
                *on = true;
                Ok(0)
            }
            KVM_DEV_VFIO_FILE_DEL if *on => {
                *on = false;
                Ok(0)
            }
            KVM_DEV_VFIO_FILE_DEL => Err(Errno::NOENT),
            _ => Err(Errno::NXIO),
        };
        self.sys
            .log(&format!("KVM-VFIO group attr {attr} -> {r:?}"));
        Some(r)
    }

    /// A KVM-VFIO device of the model's, for a KVM without one.
    pub fn new_kvm_vfio(&mut self) -> Result<i32, Errno> {
        self.kvm_vfio.push(false);
        let k = self.kvm_vfio.len() - 1;
        self.sys
            .log("real KVM has no VFIO device: the model stands in for it");
        self.new_file("kvm-vfio", Handle::KvmVfio(k))
            .map(|(fd, _)| fd)
    }

    fn container_ioctl(&mut self, c: usize, req: u64, arg: u64) -> R {
        match req {
            GET_API_VERSION => Ok(0),
            CHECK_EXTENSION => Ok(i64::from(arg == TYPE1_IOMMU || arg == TYPE1V2_IOMMU)),
            SET_IOMMU => {
                let ct = &mut self.containers[c];
                if !ct.has_group {
                    Err(Errno::INVAL)
                } else if ct.iommu {
                    Err(Errno::BUSY)
                } else if arg != TYPE1_IOMMU && arg != TYPE1V2_IOMMU {
                    Err(Errno::NODEV)
                } else {
                    ct.iommu = true;
                    Ok(0)
                }
            }
            IOMMU_GET_INFO | IOMMU_MAP_DMA | IOMMU_UNMAP_DMA if !self.containers[c].iommu => {
                Err(Errno::INVAL)
            }
            IOMMU_GET_INFO => self.iommu_info(c, arg),
            IOMMU_MAP_DMA => self.map_dma(c, arg),
            IOMMU_UNMAP_DMA => self.unmap_dma(c, arg),
            _ => Err(Errno::NOTTY),
        }
    }

    fn iommu_info(&mut self, c: usize, arg: u64) -> R {
        const INFO: u32 = 24;
        let argsz = read_u32(&self.sys, arg)?;
        if argsz < 16 {
            return Err(Errno::INVAL);
        }
        let mut flags = VFIO_IOMMU_INFO_PGSIZES;
        let sys = &self.sys;
        write_u64(sys, arg + 8, PAGE | (2 << 20) | (1 << 30))?;
        if argsz >= 20 {
            // Capabilities, placed right after the 24-byte info: IOVA ranges, then DMA_AVAIL.
            let mut caps = Vec::new();
            let ranges_len = 16 + 16 * IOVA_RANGES.len() as u32;
            caps.extend_from_slice(&(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16).to_le_bytes());
            caps.extend_from_slice(&1u16.to_le_bytes());
            caps.extend_from_slice(&(INFO + ranges_len).to_le_bytes());
            caps.extend_from_slice(&(IOVA_RANGES.len() as u32).to_le_bytes());
            caps.extend_from_slice(&0u32.to_le_bytes());
            for (s, e) in IOVA_RANGES {
                caps.extend_from_slice(&s.to_le_bytes());
                caps.extend_from_slice(&e.to_le_bytes());
            }
            let avail = DMA_AVAIL.saturating_sub(self.containers[c].maps.len() as u32);
            caps.extend_from_slice(&3u16.to_le_bytes()); // VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL
            caps.extend_from_slice(&1u16.to_le_bytes());
            caps.extend_from_slice(&0u32.to_le_bytes());
            caps.extend_from_slice(&avail.to_le_bytes());
            caps.extend_from_slice(&0u32.to_le_bytes());
            flags |= VFIO_IOMMU_INFO_CAPS;
            let want = INFO + caps.len() as u32;
            if argsz < want {
                write_u32(sys, arg, want)?;
                write_u32(sys, arg + 16, 0)?;
            } else {
                sys.write_mem(arg + u64::from(INFO), &caps)?;
                write_u32(sys, arg + 16, INFO)?;
            }
        }
        write_u32(sys, arg + 4, flags)?;
        Ok(0)
    }

    fn map_dma(&mut self, c: usize, arg: u64) -> R {
        let sys = &self.sys;
        let argsz = read_u32(sys, arg)?;
        if argsz < 32 {
            return Err(Errno::INVAL);
        }
        let flags = read_u32(sys, arg + 4)?;
        let vaddr = read_u64(sys, arg + 8)?;
        let iova = read_u64(sys, arg + 16)?;
        let size = read_u64(sys, arg + 24)?;
        let known = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE | VFIO_DMA_MAP_FLAG_VADDR;
        // VADDR (re-pointing a live mapping) is not modelled.
        if flags & !known != 0 || flags & VFIO_DMA_MAP_FLAG_VADDR != 0 {
            return Err(Errno::INVAL);
        }
        if size == 0 || (size | iova | vaddr) & (PAGE - 1) != 0 {
            return Err(Errno::INVAL);
        }
        let end = iova.checked_add(size - 1).ok_or(Errno::INVAL)?;
        let ct = &mut self.containers[c];
        let overlaps = ct
            .maps
            .range(..=end)
            .next_back()
            .is_some_and(|(&i, &(s, _))| i + s > iova);
        if overlaps {
            return Err(Errno::EXIST);
        }
        if ct.maps.len() as u32 >= DMA_AVAIL {
            return Err(Errno::NOSPC);
        }
        if !IOVA_RANGES.iter().any(|&(s, e)| iova >= s && end <= e) {
            return Err(Errno::INVAL);
        }
        ct.maps.insert(iova, (size, vaddr));
        Ok(0)
    }

    fn unmap_dma(&mut self, c: usize, arg: u64) -> R {
        let sys = &self.sys;
        let argsz = read_u32(sys, arg)?;
        if argsz < 24 {
            return Err(Errno::INVAL);
        }
        let flags = read_u32(sys, arg + 4)?;
        let iova = read_u64(sys, arg + 8)?;
        let size = read_u64(sys, arg + 16)?;
        let known = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
            | VFIO_DMA_UNMAP_FLAG_ALL
            | VFIO_DMA_UNMAP_FLAG_VADDR;
        if flags & !known != 0 || flags & !VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            return Err(Errno::INVAL);
        }
        let ct = &mut self.containers[c];
        let (lo, hi) = if flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            if iova != 0 || size != 0 {
                return Err(Errno::INVAL);
            }
            (0, u64::MAX)
        } else {
            if size == 0 || (iova | size) & (PAGE - 1) != 0 {
                return Err(Errno::INVAL);
            }
            let end = iova.checked_add(size - 1).ok_or(Errno::INVAL)?;
            // Type1 v2 never splits a mapping: both ends must fall on mapping boundaries.
            let cut = |at: u64| {
                ct.maps
                    .range(..=at)
                    .next_back()
                    .is_some_and(|(&i, &(s, _))| i < at && i + s > at)
            };
            if cut(iova) || cut(end.wrapping_add(1)) && end != u64::MAX {
                return Err(Errno::INVAL);
            }
            (iova, end)
        };
        let gone: Vec<u64> = ct.maps.range(lo..=hi).map(|(&i, _)| i).collect();
        let mut unmapped = 0u64;
        for i in gone {
            if let Some((s, _)) = ct.maps.remove(&i) {
                unmapped += s;
            }
        }
        write_u64(sys, arg + 16, unmapped)?;
        Ok(0)
    }

    fn group_ioctl(&mut self, req: u64, arg: u64) -> R {
        match req {
            GROUP_GET_STATUS => {
                if read_u32(&self.sys, arg)? < 8 {
                    return Err(Errno::INVAL);
                }
                let mut flags = VFIO_GROUP_FLAGS_VIABLE;
                if self.group_container.is_some() {
                    flags |= VFIO_GROUP_FLAGS_CONTAINER_SET;
                }
                write_u32(&self.sys, arg + 4, flags)?;
                Ok(0)
            }
            GROUP_SET_CONTAINER => {
                let fd = read_u32(&self.sys, arg)? as i32;
                let id = self.sys.file_id(fd)?;
                let Some(&Handle::Container(c)) = self.files.get(&id) else {
                    return Err(Errno::INVAL);
                };
                if self.group_container.is_some() {
                    return Err(Errno::INVAL);
                }
                self.group_container = Some(c);
                self.containers[c].has_group = true;
                Ok(0)
            }
            GROUP_UNSET_CONTAINER => {
                let Some(c) = self.group_container else {
                    return Err(Errno::INVAL);
                };
                // The kernel refuses while any file of the group's devices is open.
                if self.sys.open_count(&self.device_files) > 0 {
                    return Err(Errno::BUSY);
                }
                self.group_container = None;
                // The last group leaving takes the IOMMU driver and its mappings with it.
                self.containers[c] = Container::default();
                Ok(0)
            }
            GROUP_GET_DEVICE_FD => {
                let name = c_read_string(&self.sys, arg, 256)?;
                let has_iommu = self
                    .group_container
                    .is_some_and(|c| self.containers[c].iommu);
                if !has_iommu {
                    return Err(Errno::INVAL);
                }
                if name != self.cfg.device {
                    return Err(Errno::NODEV);
                }
                let (fd, id) = self.new_file("device", Handle::Device)?;
                self.device_files.push(id);
                Ok(i64::from(fd))
            }
            _ => Err(Errno::NOTTY),
        }
    }

    fn device_ioctl(&mut self, req: u64, arg: u64) -> R {
        let sys = &self.sys;
        match req {
            DEVICE_GET_INFO => {
                if read_u32(sys, arg)? < 16 {
                    return Err(Errno::INVAL);
                }
                write_u32(sys, arg + 4, VFIO_DEVICE_FLAGS_PCI)?;
                write_u32(sys, arg + 8, NUM_REGIONS)?;
                write_u32(sys, arg + 12, NUM_IRQS)?;
                Ok(0)
            }
            DEVICE_GET_REGION_INFO => {
                if read_u32(sys, arg)? < 32 {
                    return Err(Errno::INVAL);
                }
                let index = read_u32(sys, arg + 8)?;
                if index >= NUM_REGIONS {
                    return Err(Errno::INVAL);
                }
                let size = match index {
                    CONFIG_REGION => CONFIG_SIZE as u64,
                    i => self.dev.mtty.bar_size(i),
                };
                let flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
                write_u32(sys, arg + 4, flags)?;
                write_u32(sys, arg + 12, 0)?;
                write_u64(sys, arg + 16, size)?;
                write_u64(sys, arg + 24, u64::from(index) << REGION_SHIFT)?;
                Ok(0)
            }
            DEVICE_GET_IRQ_INFO => {
                if read_u32(sys, arg)? < 16 {
                    return Err(Errno::INVAL);
                }
                let index = read_u32(sys, arg + 8)?;
                let flags = match index {
                    INTX => {
                        VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
                    }
                    MSI => VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
                    _ => return Err(Errno::INVAL),
                };
                write_u32(sys, arg + 4, flags)?;
                write_u32(sys, arg + 12, 1)?;
                Ok(0)
            }
            DEVICE_SET_IRQS => self.set_irqs(arg),
            DEVICE_RESET => {
                // mtty resets only its migration state: RUNNING, sessions ended.
                self.end_sessions();
                self.dev.state = fsm::RUNNING;
                Ok(0)
            }
            DEVICE_FEATURE => self.feature(arg),
            _ => Err(Errno::NOTTY),
        }
    }

    fn set_irqs(&mut self, arg: u64) -> R {
        let sys = &self.sys;
        let argsz = read_u32(sys, arg)?;
        let flags = read_u32(sys, arg + 4)?;
        let index = read_u32(sys, arg + 8)?;
        let start = read_u32(sys, arg + 12)?;
        let count = read_u32(sys, arg + 16)?;
        // The core's checks (vfio_set_irqs_validate_and_prepare).
        let known = VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if argsz < 20 || index >= NUM_IRQS || count >= u32::MAX - start || flags & !known != 0 {
            return Err(Errno::INVAL);
        }
        if start >= NUM_IRQS || start + count > NUM_IRQS {
            return Err(Errno::INVAL);
        }
        let elem = match flags & VFIO_IRQ_SET_DATA_TYPE_MASK {
            VFIO_IRQ_SET_DATA_NONE => 0,
            VFIO_IRQ_SET_DATA_BOOL => 1,
            VFIO_IRQ_SET_DATA_EVENTFD => 4,
            _ => return Err(Errno::INVAL),
        };
        if u64::from(argsz - 20) < u64::from(count) * elem {
            return Err(Errno::INVAL);
        }
        let data = arg + 20;
        let dtype = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        let dev = &mut self.dev;
        let first_bool = |sys: &S| -> Result<bool, Errno> {
            let mut b = [0u8];
            sys.read_mem(data, &mut b)?;
            Ok(b[0] != 0)
        };
        match index {
            INTX => match action {
                VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK => {
                    if dev.irq != Irq::Intx || start != 0 || count != 1 {
                        return Err(Errno::INVAL);
                    }
                    let mask = action == VFIO_IRQ_SET_ACTION_MASK;
                    match dtype {
                        VFIO_IRQ_SET_DATA_NONE => dev.intx_masked = mask,
                        VFIO_IRQ_SET_DATA_BOOL => {
                            if first_bool(sys)? {
                                dev.intx_masked = mask;
                            }
                        }
                        // mtty takes no mask or unmask eventfd.
                        _ => return Err(Errno::NOTTY),
                    }
                    Ok(0)
                }
                VFIO_IRQ_SET_ACTION_TRIGGER => {
                    if dev.irq == Irq::Intx && count == 0 && dtype == VFIO_IRQ_SET_DATA_NONE {
                        self.disable_intx();
                        return Ok(0);
                    }
                    if !(dev.irq == Irq::Intx || dev.irq == Irq::None) || start != 0 || count != 1 {
                        return Err(Errno::INVAL);
                    }
                    if dtype == VFIO_IRQ_SET_DATA_EVENTFD {
                        let fd = read_u32(sys, data)? as i32;
                        self.disable_intx();
                        if fd < 0 {
                            return Ok(0);
                        }
                        let r = self.sys.eventfd_ref(fd)?;
                        self.dev.intx_fd = Some(r);
                        self.dev.irq = Irq::Intx;
                        return Ok(0);
                    }
                    if dev.irq != Irq::Intx {
                        return Err(Errno::INVAL);
                    }
                    if dtype == VFIO_IRQ_SET_DATA_NONE || first_bool(sys)? {
                        self.trigger();
                    }
                    Ok(0)
                }
                _ => Ok(0),
            },
            MSI => match action {
                VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK => Err(Errno::NOTTY),
                VFIO_IRQ_SET_ACTION_TRIGGER => {
                    if dev.irq == Irq::Msi && count == 0 && dtype == VFIO_IRQ_SET_DATA_NONE {
                        self.disable_msi();
                        return Ok(0);
                    }
                    if !(dev.irq == Irq::Msi || dev.irq == Irq::None) || start != 0 || count != 1 {
                        return Err(Errno::INVAL);
                    }
                    if dtype == VFIO_IRQ_SET_DATA_EVENTFD {
                        let fd = read_u32(sys, data)? as i32;
                        self.disable_msi();
                        if fd < 0 {
                            return Ok(0);
                        }
                        let r = self.sys.eventfd_ref(fd)?;
                        self.dev.msi_fd = Some(r);
                        self.dev.irq = Irq::Msi;
                        return Ok(0);
                    }
                    if dev.irq != Irq::Msi {
                        return Err(Errno::INVAL);
                    }
                    if dtype == VFIO_IRQ_SET_DATA_NONE || first_bool(sys)? {
                        self.trigger();
                    }
                    Ok(0)
                }
                _ => Ok(0),
            },
            // MSI-X, ERR and REQ: mtty has none.
            _ => Err(Errno::NOTTY),
        }
    }

    fn disable_intx(&mut self) {
        if let Some(fd) = self.dev.intx_fd.take() {
            let n = self.dev.triggers;
            self.sys
                .log(&format!("INTx off ({n} interrupts signalled so far)"));
            self.sys.eventfd_put(fd);
            self.dev.intx_masked = false;
            self.dev.irq = Irq::None;
        }
    }

    fn disable_msi(&mut self) {
        if let Some(fd) = self.dev.msi_fd.take() {
            self.sys.eventfd_put(fd);
            self.dev.irq = Irq::None;
        }
    }

    /// mtty's interrupt: MSI if set, else INTx unless masked, which it then masks until
    /// someone unmasks it.
    fn trigger(&mut self) {
        let d = &mut self.dev;
        let fd = match d.irq {
            Irq::Msi => d.msi_fd,
            Irq::Intx if !d.intx_masked => {
                d.intx_masked = d.intx_fd.is_some();
                d.intx_fd
            }
            _ => None,
        };
        if let Some(fd) = fd {
            d.triggers += 1;
            self.sys.signal(fd);
        }
    }

    /// The core's vfio_check_feature: Ok(false) answers a PROBE (nothing to do).
    fn check_feature(flags: u32, payload: u32, ops: u32, minsz: u32) -> Result<bool, Errno> {
        if flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET) & !ops != 0 {
            return Err(Errno::INVAL);
        }
        if flags & VFIO_DEVICE_FEATURE_PROBE != 0 {
            return Ok(false);
        }
        if flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET) == 0 || payload < minsz {
            return Err(Errno::INVAL);
        }
        Ok(true)
    }

    fn feature(&mut self, arg: u64) -> R {
        let argsz = read_u32(&self.sys, arg)?;
        let flags = read_u32(&self.sys, arg + 4)?;
        let all = VFIO_DEVICE_FEATURE_MASK
            | VFIO_DEVICE_FEATURE_GET
            | VFIO_DEVICE_FEATURE_SET
            | VFIO_DEVICE_FEATURE_PROBE;
        let get_and_set = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET;
        if argsz < 8
            || flags & !all != 0
            || (flags & VFIO_DEVICE_FEATURE_PROBE == 0 && flags & get_and_set == get_and_set)
        {
            return Err(Errno::INVAL);
        }
        let payload = argsz - 8;
        let data = arg + 8;
        let get = flags & VFIO_DEVICE_FEATURE_GET != 0;
        const GET: u32 = VFIO_DEVICE_FEATURE_GET;
        const SET: u32 = VFIO_DEVICE_FEATURE_SET;
        match flags & VFIO_DEVICE_FEATURE_MASK {
            VFIO_DEVICE_FEATURE_MIGRATION => {
                if Self::check_feature(flags, payload, GET, 8)? {
                    let f = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY;
                    write_u64(&self.sys, data, u64::from(f))?;
                }
                Ok(0)
            }
            VFIO_DEVICE_FEATURE_MIG_DATA_SIZE => {
                if Self::check_feature(flags, payload, GET, 8)? {
                    write_u64(&self.sys, data, self.dev.mtty.data_size() as u64)?;
                }
                Ok(0)
            }
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => {
                if !Self::check_feature(flags, payload, GET | SET, 8)? {
                    return Ok(0);
                }
                if get {
                    write_u32(&self.sys, data, self.dev.state)?;
                    write_u32(&self.sys, data + 4, u32::MAX)?;
                    return Ok(0);
                }
                let target = read_u32(&self.sys, data)?;
                let from = self.dev.state;
                let r = self.set_state(target);
                self.sys.log(&format!(
                    "migration {} -> {}: {r:?} (now {})",
                    fsm::name(from),
                    fsm::name(target),
                    fsm::name(self.dev.state)
                ));
                let fd = r?;
                write_u32(&self.sys, data + 4, fd.unwrap_or(-1) as u32)?;
                Ok(0)
            }
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START
            | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
            | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT
                if !self.cfg.dma_logging =>
            {
                Err(Errno::NOTTY)
            }
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START => {
                if !Self::check_feature(flags, payload, SET, 24)? {
                    return Ok(0);
                }
                let page_size = read_u64(&self.sys, data)?;
                let n = read_u32(&self.sys, data + 8)?;
                let ranges = read_u64(&self.sys, data + 16)?;
                if n == 0 {
                    return Err(Errno::INVAL);
                }
                if n > LOG_MAX_RANGES {
                    return Err(Errno::TOOBIG);
                }
                if page_size == 0 || !page_size.is_power_of_two() {
                    return Err(Errno::INVAL);
                }
                let mut seen: Vec<(u64, u64)> = Vec::new();
                for i in 0..u64::from(n) {
                    let iova = read_u64(&self.sys, ranges + 16 * i)?;
                    let len = read_u64(&self.sys, ranges + 16 * i + 8)?;
                    if (iova | len) & (page_size - 1) != 0 {
                        return Err(Errno::INVAL);
                    }
                    let end = iova.checked_add(len).ok_or(Errno::OVERFLOW)?;
                    if seen.iter().any(|&(s, e)| iova < e && s < end) {
                        return Err(Errno::INVAL);
                    }
                    seen.push((iova, end));
                }
                // mtty's log ops do nothing: it never writes guest memory.
                Ok(0)
            }
            VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
                Self::check_feature(flags, payload, SET, 0)?;
                Ok(0)
            }
            VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => {
                if !Self::check_feature(flags, payload, GET, 32)? {
                    return Ok(0);
                }
                let iova = read_u64(&self.sys, data)?;
                let len = read_u64(&self.sys, data + 8)?;
                let page_size = read_u64(&self.sys, data + 16)?;
                if page_size < PAGE || !page_size.is_power_of_two() || len == 0 {
                    return Err(Errno::INVAL);
                }
                iova.checked_add(len).ok_or(Errno::OVERFLOW)?;
                // No bit is ever set: the bitmap is left as the caller gave it.
                Ok(0)
            }
            _ => Err(Errno::NOTTY),
        }
    }

    fn end_sessions(&mut self) {
        self.dev.saving = None;
        self.dev.resuming = None;
    }

    /// One SET: every hop of the kernel's path, stopping at the first that fails. Returns
    /// the data_fd the last hop opened, if any.
    fn set_state(&mut self, target: u32) -> Result<Option<i32>, Errno> {
        let mut fd = None;
        while self.dev.state != target {
            let next = next_state(self.dev.state, target)?;
            fd = self.step(next)?;
            self.dev.state = next;
            if fd.is_some() && next != target {
                return Err(Errno::INVAL);
            }
        }
        Ok(fd)
    }

    fn step(&mut self, new: u32) -> Result<Option<i32>, Errno> {
        use fsm::*;
        let cur = self.dev.state;
        match (cur, new) {
            (RUNNING, RUNNING_P2P)
            | (RUNNING_P2P, RUNNING)
            | (RUNNING_P2P, STOP)
            | (PRE_COPY, PRE_COPY_P2P)
            | (PRE_COPY_P2P, PRE_COPY)
            | (STOP, RUNNING_P2P) => Ok(None),
            (RESUMING, STOP) => {
                let data = self
                    .dev
                    .resuming
                    .as_ref()
                    .map(|r| r.data.clone())
                    .unwrap_or_default();
                self.dev.mtty.load(&data)?;
                self.end_sessions();
                Ok(None)
            }
            (PRE_COPY, RUNNING) | (PRE_COPY_P2P, RUNNING_P2P) | (STOP_COPY, STOP) => {
                self.end_sessions();
                Ok(None)
            }
            (RUNNING, PRE_COPY)
            | (RUNNING_P2P, PRE_COPY_P2P)
            | (STOP, STOP_COPY)
            | (PRE_COPY_P2P, STOP_COPY) => {
                // A session already open (pre-copy) goes on in the same file; STOP_COPY
                // adds the ports' state to what the header began.
                if let Some(s) = &mut self.dev.saving {
                    if new == STOP_COPY {
                        self.dev.mtty.save_ports(&mut s.data);
                    }
                    return Ok(None);
                }
                let id = self.dev.next_file;
                self.dev.next_file += 1;
                let mut data = self.dev.mtty.header();
                if new == STOP_COPY {
                    self.dev.mtty.save_ports(&mut data);
                }
                let (fd, _) = self.new_file("save", Handle::Save(id))?;
                self.dev.saving = Some(SaveFile { id, data, pos: 0 });
                Ok(Some(fd))
            }
            (STOP, RESUMING) => {
                let id = self.dev.next_file;
                self.dev.next_file += 1;
                let (fd, _) = self.new_file("resume", Handle::Resume(id))?;
                self.dev.resuming = Some(ResumeFile {
                    id,
                    data: Vec::new(),
                });
                Ok(Some(fd))
            }
            _ => Err(Errno::INVAL),
        }
    }

    fn save_ioctl(&mut self, f: u64, req: u64, arg: u64) -> R {
        if req != MIG_GET_PRECOPY_INFO {
            return Err(Errno::NOTTY);
        }
        if read_u32(&self.sys, arg)? < 24 {
            return Err(Errno::INVAL);
        }
        if self.dev.state != fsm::PRE_COPY && self.dev.state != fsm::PRE_COPY_P2P {
            return Err(Errno::INVAL);
        }
        let s = self
            .dev
            .saving
            .as_ref()
            .filter(|s| s.id == f)
            .ok_or(Errno::NODEV)?;
        let initial = (s.data.len() - s.pos) as u64;
        write_u64(&self.sys, arg + 8, initial)?;
        write_u64(&self.sys, arg + 16, 0)?;
        Ok(0)
    }

    /// read() on one of the model's files.
    pub fn read(&mut self, id: FileId, buf: u64, len: usize) -> Option<Result<isize, Errno>> {
        let h = *self.files.get(&id)?;
        let r = match h {
            Handle::Save(f) => match self.dev.saving.as_mut().filter(|s| s.id == f) {
                None => Err(Errno::NODEV),
                Some(s) => {
                    let n = len.min(s.data.len() - s.pos);
                    let r = self.sys.write_mem(buf, &s.data[s.pos..s.pos + n]);
                    r.map(|()| {
                        s.pos += n;
                        n as isize
                    })
                }
            },
            Handle::Resume(_) => Err(Errno::BADF),
            // The device file is read at offsets (pread); nothing else reads these files.
            _ => Err(Errno::INVAL),
        };
        self.sys.log(&format!("read {h:?} {len} -> {r:?}"));
        Some(r)
    }

    /// write() on one of the model's files.
    pub fn write(&mut self, id: FileId, buf: u64, len: usize) -> Option<Result<isize, Errno>> {
        let h = *self.files.get(&id)?;
        let size = self.dev.mtty.data_size();
        let r = match h {
            Handle::Resume(f) => self.resume_write(f, buf, len, size),
            Handle::Save(_) => Err(Errno::BADF),
            _ => Err(Errno::INVAL),
        };
        self.sys.log(&format!("write {h:?} {len} -> {r:?}"));
        Some(r)
    }

    fn resume_write(&mut self, f: u64, buf: u64, len: usize, size: usize) -> Result<isize, Errno> {
        let Some(r) = self.dev.resuming.as_mut().filter(|r| r.id == f) else {
            return Err(Errno::NODEV);
        };
        if r.data.len() + len > size {
            return Err(Errno::NOMEM);
        }
        let mut b = vec![0u8; len];
        self.sys.read_mem(buf, &mut b)?;
        let before = r.data.len();
        r.data.extend_from_slice(&b);
        let crossed = before < HEADER_BYTES && r.data.len() >= HEADER_BYTES;
        if crossed && !self.dev.mtty.header_ok(&r.data) {
            return Err(Errno::FAULT);
        }
        Ok(len as isize)
    }

    /// pread()/pwrite() on one of the model's files: region accesses on the device file.
    pub fn region_io(
        &mut self,
        id: FileId,
        buf: u64,
        len: usize,
        pos: u64,
        write: bool,
    ) -> Option<Result<isize, Errno>> {
        let h = *self.files.get(&id)?;
        if h != Handle::Device {
            // Migration files are streams.
            return Some(Err(Errno::SPIPE));
        }
        let mut data = vec![0u8; len];
        if write && let Err(e) = self.sys.read_mem(buf, &mut data) {
            return Some(Err(e));
        }
        // Split as mtty does: 4, 2 or 1 bytes by alignment.
        let mut done = 0;
        while done < len {
            let at = pos + done as u64;
            let left = len - done;
            let n = if left >= 4 && at.is_multiple_of(4) {
                4
            } else if left >= 2 && at.is_multiple_of(2) {
                2
            } else {
                1
            };
            if let Err(e) = self.access(at, &mut data[done..done + n], write) {
                let what = if write { "write" } else { "read" };
                self.sys
                    .log(&format!("region {what} of {len} at {pos:#x}: {e:?}"));
                return Some(Err(e));
            }
            done += n;
        }
        if !write && let Err(e) = self.sys.write_mem(buf, &data) {
            return Some(Err(e));
        }
        Some(Ok(len as isize))
    }

    fn access(&mut self, pos: u64, chunk: &mut [u8], write: bool) -> Result<(), Errno> {
        let index = (pos >> REGION_SHIFT) as u32;
        let offset = pos & ((1 << REGION_SHIFT) - 1);
        let m = &mut self.dev.mtty;
        match index {
            CONFIG_REGION => {
                // mtty itself does not bound this; the model refuses what would read past
                // its 255 bytes, so a VMM that does so is caught here.
                if offset + chunk.len() as u64 > CONFIG_SIZE as u64 {
                    return Err(Errno::INVAL);
                }
                if write {
                    m.config_write(offset as usize, chunk);
                } else {
                    m.config_read(offset as usize, chunk);
                }
                Ok(())
            }
            i if (i as usize) < m.ports.len() => {
                // Likewise: 8 registers per port.
                if offset >= crate::mtty::BAR_SIZE {
                    return Err(Errno::INVAL);
                }
                // mtty handles the first byte of an access at the register it names.
                let fx = if write {
                    m.bar_write(i as usize, offset, chunk[0])
                } else {
                    let (v, fx) = m.bar_read(i as usize, offset);
                    chunk.fill(0);
                    chunk[0] = v;
                    fx
                };
                if fx.trigger {
                    self.trigger();
                }
                Ok(())
            }
            // mtty fails every other region's access with EFAULT.
            _ => Err(Errno::FAULT),
        }
    }
}

fn ioctl_name(req: u64) -> String {
    let n = match req {
        GET_API_VERSION => "GET_API_VERSION",
        CHECK_EXTENSION => "CHECK_EXTENSION",
        SET_IOMMU => "SET_IOMMU",
        GROUP_GET_STATUS => "GROUP_GET_STATUS",
        GROUP_SET_CONTAINER => "GROUP_SET_CONTAINER",
        GROUP_UNSET_CONTAINER => "GROUP_UNSET_CONTAINER",
        GROUP_GET_DEVICE_FD => "GROUP_GET_DEVICE_FD",
        DEVICE_GET_INFO => "DEVICE_GET_INFO",
        DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
        DEVICE_RESET => "DEVICE_RESET",
        DEVICE_FEATURE => "DEVICE_FEATURE",
        MIG_GET_PRECOPY_INFO => "MIG_GET_PRECOPY_INFO",
        IOMMU_GET_INFO => "IOMMU_GET_INFO/GET_PCI_HOT_RESET_INFO",
        IOMMU_MAP_DMA => "IOMMU_MAP_DMA/PCI_HOT_RESET",
        IOMMU_UNMAP_DMA => "IOMMU_UNMAP_DMA",
        _ => return format!("{req:#x}"),
    };
    n.to_owned()
}
