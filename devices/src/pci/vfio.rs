//! A PCI function passed through from a VFIO backend. Configuration space is the device's
//! own, read from its config region, except what the VMM must own: the BARs (their sizes come
//! from region info; the guest's addresses never reach the device), the ROM BAR (hidden), the
//! interrupt line and pin, the IO/MEM/bus-master decode bits of COMMAND (also passed on), and
//! the MSI and MSI-X capability registers (emulated, and passed on so the device sees its own
//! enable bits). BAR accesses trap here and are forwarded as region reads and writes; the
//! MSI-X table is emulated (reads come from the VMM's copy, writes go to both, so a device that
//! gates its own signalling on the mask bits agrees with KVM's routes), and the PBA is read
//! from the device. Extended configuration space reads as zeros.

use std::collections::BTreeMap;
use std::sync::Arc;

use migration::state::{StateError, decode, encode};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::bar_mmap::{BarMemoryMapper, mappable_ranges};
use super::config::{
    BAR0, BarKind, BarRegion, CAP_ID_MSI, CAP_ID_MSIX, COMMAND, CONFIG_SPACE_SIZE, ConfigError,
    INTERRUPT_LINE, INTERRUPT_PIN, NUM_BARS, PciConfigState, PciConfiguration, PciHeader, ROM_BAR,
    capabilities,
};
use super::device::PciDevice;
use super::irq::MsiRouting;
use super::msi::{MSI_CONTROL, MsiCapability};
use super::msix::{MSIX_CAP_SIZE, MSIX_CONTROL, MsixCapability};
use super::vfio_backend::{
    BackendError, DmaRegion, VFIO_DEVICE_FLAGS_PCI, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX, VfioBackend, VfioRegionInfo,
};
use super::vfio_interrupts::{InterruptError, InterruptState, VfioInterrupts};

/// COMMAND bits the VMM keeps for itself: I/O and memory decode, bus master.
const COMMAND_EMULATED_BITS: u8 = 0x7;

#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Interrupts(#[from] InterruptError),
    #[error("configuration space: {0}")]
    Config(#[from] ConfigError),
    #[error("not a PCI device (VFIO device flags {0:#x})")]
    NotPci(u32),
    #[error("the device has no usable configuration region")]
    NoConfigRegion,
    #[error("BAR {bar} region of {size:#x} bytes cannot be a {kind:?} BAR")]
    BarSize {
        bar: usize,
        size: u64,
        kind: BarKind,
    },
}

/// Where a configuration byte's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Device,
    Shadow,
    Command,
    Msi(usize),
    MsixControl(usize),
}

#[derive(Serialize, Deserialize)]
struct VfioPciState {
    config: PciConfigState,
    interrupts: InterruptState,
}

pub struct VfioPciDevice {
    id: String,
    /// The emulated registers (see the module comment); other bytes of it are unused.
    shadow: PciConfiguration,
    /// Region info of each BAR, by BAR index.
    regions: Vec<Option<VfioRegionInfo>>,
    irqs: VfioInterrupts,
    mapper: Option<Arc<dyn BarMemoryMapper>>,
    /// Handles of the BAR memory mapped into the guest, by BAR index.
    bar_maps: BTreeMap<usize, Vec<u64>>,
    /// The backend is gone (vfio-user server died): BAR reads see all ones, writes are dropped.
    lost: bool,
    /// Bytes of configuration space the device's region has (mtty: 255); beyond them up to
    /// 256, reads are 0 and writes are dropped, as QEMU reads MIN(config size, region size).
    config_len: usize,
    /// Last, so it drops after everything holding its files (region mmap fds): a kernel
    /// device fd that outlives the device keeps its group busy.
    backend: Box<dyn VfioBackend>,
}

fn header_of(raw: &[u8; CONFIG_SPACE_SIZE], interrupt_pin: u8) -> PciHeader {
    let u16_at = |o: usize| u16::from_le_bytes([raw[o], raw[o + 1]]);
    PciHeader {
        vendor_id: u16_at(0x00),
        device_id: u16_at(0x02),
        revision_id: raw[0x08],
        class: (raw[0x0b], raw[0x0a], raw[0x09]),
        subsystem_vendor_id: u16_at(0x2c),
        subsystem_id: u16_at(0x2e),
        interrupt_pin,
    }
}

/// Declares in `shadow` one BAR per non-empty BAR region, typed as the device's own BAR
/// register says and sized from the region (rounded up to a power of two, as BARs must be).
fn declare_bars(
    backend: &mut dyn VfioBackend,
    raw: &[u8; CONFIG_SPACE_SIZE],
    shadow: &mut PciConfiguration,
) -> Result<Vec<Option<VfioRegionInfo>>, VfioPciError> {
    let mut regions = vec![None; NUM_BARS];
    let mut i = 0;
    while i < NUM_BARS {
        let info = backend.region_info(i as u32)?;
        let reg = BAR0 + 4 * i;
        let kind = BarKind::from_register(u32::from_le_bytes([
            raw[reg],
            raw[reg + 1],
            raw[reg + 2],
            raw[reg + 3],
        ]));
        let wide = matches!(kind, BarKind::Mem64 { .. });
        if info.size > 0 {
            let size = info.size.checked_next_power_of_two().unwrap_or(0);
            shadow
                .add_bar(i, size, kind)
                .map_err(|_| VfioPciError::BarSize {
                    bar: i,
                    size: info.size,
                    kind,
                })?;
            regions[i] = Some(info);
        }
        i += if wide { 2 } else { 1 };
    }
    Ok(regions)
}

/// The MSI-X capability, if the device has one whose table and PBA lie inside their BARs.
fn find_msix(
    raw: &[u8; CONFIG_SPACE_SIZE],
    regions: &[Option<VfioRegionInfo>],
) -> Option<(usize, MsixCapability)> {
    let (_, off) = capabilities(|o| raw[o])
        .into_iter()
        .find(|&(id, _)| id == CAP_ID_MSIX)?;
    let bytes: [u8; MSIX_CAP_SIZE] = raw.get(off..off + MSIX_CAP_SIZE)?.try_into().ok()?;
    let cap = MsixCapability::parse(&bytes);
    let fits = |bar: u8, offset: u32, len: u64| {
        let size = regions.get(usize::from(bar))?.as_ref()?.size;
        (u64::from(offset) + len <= size).then_some(())
    };
    let ok = fits(cap.table_bar, cap.table_offset, cap.table_len()).and(fits(
        cap.pba_bar,
        cap.pba_offset,
        cap.pba_len(),
    ));
    if ok.is_none() {
        log::warn!("MSI-X table or PBA outside its BAR: MSI-X capability ignored");
        return None;
    }
    Some((off, cap))
}

fn find_msi(raw: &[u8; CONFIG_SPACE_SIZE]) -> Option<(usize, MsiCapability)> {
    let (_, off) = capabilities(|o| raw[o])
        .into_iter()
        .find(|&(id, _)| id == CAP_ID_MSI)?;
    let control = u16::from_le_bytes([*raw.get(off + 2)?, *raw.get(off + 3)?]);
    let cap = MsiCapability::from_control(control);
    (off + cap.size() <= CONFIG_SPACE_SIZE).then_some((off, cap))
}

/// The standard header every function has; a config region smaller than this is unusable.
const CONFIG_HEADER_LEN: u64 = 64;

/// Checks that the backend is a PCI function and reads its configuration space: the first
/// 256 bytes or, when the region is smaller (mtty's is 255), all of it, the rest zero.
/// Returns the bytes and how many the region has.
fn read_config_header(
    backend: &mut dyn VfioBackend,
) -> Result<([u8; CONFIG_SPACE_SIZE], usize), VfioPciError> {
    let info = backend.device_info()?;
    if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
        return Err(VfioPciError::NotPci(info.flags));
    }
    if info.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX {
        return Err(VfioPciError::NoConfigRegion);
    }
    let size = backend.region_info(VFIO_PCI_CONFIG_REGION_INDEX)?.size;
    if size < CONFIG_HEADER_LEN {
        return Err(VfioPciError::NoConfigRegion);
    }
    let len = size.min(CONFIG_SPACE_SIZE as u64) as usize;
    let mut raw = [0u8; CONFIG_SPACE_SIZE];
    backend.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut raw[..len])?;
    Ok((raw, len))
}

impl VfioPciDevice {
    /// Opens the function behind `backend`. With `intx_gsi`, a device that has an interrupt
    /// pin gets its INTx wired to that IOAPIC pin (and the interrupt line register says so);
    /// without it the pin is hidden and the guest must use MSI or MSI-X.
    pub fn new(
        id: impl Into<String>,
        mut backend: Box<dyn VfioBackend>,
        routing: Arc<dyn MsiRouting>,
        intx_gsi: Option<u32>,
    ) -> Result<Self, VfioPciError> {
        let (raw, config_len) = read_config_header(&mut *backend)?;
        // INTx only where the device has a pin and the backend can signal it.
        let intx_gsi = match intx_gsi {
            Some(g) if raw[INTERRUPT_PIN] != 0 => {
                (backend.irq_info(VFIO_PCI_INTX_IRQ_INDEX)?.count > 0).then_some(g)
            }
            _ => None,
        };
        let pin = intx_gsi.map_or(0, |_| raw[INTERRUPT_PIN]);
        let mut shadow = PciConfiguration::new(&header_of(&raw, pin));
        let regions = declare_bars(&mut *backend, &raw, &mut shadow)?;
        let msix = find_msix(&raw, &regions);
        let msi = find_msi(&raw);
        let mut irqs = VfioInterrupts::new(routing, msix, msi);
        if let Some(gsi) = intx_gsi {
            irqs.enable_intx(&mut *backend, gsi)?;
            shadow.set_u8(INTERRUPT_LINE, gsi as u8);
        }
        let id = id.into();
        log::info!(
            "vfio {id}: {:04x}:{:04x}, {} BARs, MSI-X {}, MSI {}, INTx {intx_gsi:?}",
            shadow.read_u16(0),
            shadow.read_u16(2),
            shadow.bars().len(),
            msix.is_some(),
            msi.is_some()
        );
        Ok(VfioPciDevice {
            id,
            backend,
            shadow,
            regions,
            irqs,
            mapper: None,
            bar_maps: BTreeMap::new(),
            lost: false,
            config_len,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// A copy of KVM's INTx resample eventfd when the device refused it as its unmask
    /// eventfd: the VMM watches it and calls [`Self::intx_eoi`].
    pub fn intx_eoi_fd(&self) -> Option<EventFd> {
        let fd = self.irqs.intx_resample_for_vmm()?;
        fd.try_clone()
            .inspect_err(|e| log::error!("vfio {}: INTx resample eventfd: {e}", self.id))
            .ok()
    }

    /// The guest EOIed this device's INTx: unmask it on the device (the fallback for devices
    /// that take no unmask eventfd).
    pub fn intx_eoi(&mut self) {
        if let Err(e) = self.irqs.intx_eoi(&mut *self.backend) {
            self.access_failed("INTx unmask", &e);
        }
    }

    /// Whether the device's backend has gone away.
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// A lost device is reported once, loudly; other failures per access.
    fn access_failed(&mut self, what: &str, e: &BackendError) {
        if matches!(e, BackendError::User(u) if u.is_device_lost()) {
            self.set_lost(&e.to_string());
        } else {
            log::warn!("vfio {}: {what}: {e}", self.id);
        }
    }

    /// Marks the device unusable (its BARs read as all ones from now on), reported once.
    pub fn set_lost(&mut self, why: &str) {
        if !self.lost {
            log::error!(
                "passthrough device {} lost ({why}); its BARs now read as all ones",
                self.id
            );
        }
        self.lost = true;
    }

    /// Resets the function: its interrupts off around VFIO_DEVICE_RESET, then the guest's
    /// view pushed back (command bits, MSI/MSI-X or INTx eventfds), since the reset cleared
    /// them on the device's side. A device whose reset fails is lost.
    pub fn reset(&mut self) -> Result<(), VfioPciError> {
        self.irqs.quiesce(&mut *self.backend)?;
        if let Err(e) = self.backend.reset() {
            self.set_lost(&format!("reset failed: {e}"));
            return Err(e.into());
        }
        let command = self.shadow.read_u16(COMMAND).to_le_bytes();
        self.device_config_write(COMMAND, &command);
        self.irqs.rearm(&mut *self.backend)?;
        Ok(())
    }

    pub fn backend_mut(&mut self) -> &mut dyn VfioBackend {
        &mut *self.backend
    }

    /// Makes guest RAM reachable by the device's DMA.
    pub fn dma_map(&mut self, regions: &[DmaRegion]) -> Result<(), VfioPciError> {
        for r in regions {
            self.backend.dma_map(r)?;
        }
        Ok(())
    }

    pub fn dma_unmap(&mut self, regions: &[DmaRegion]) -> Result<(), VfioPciError> {
        for r in regions {
            self.backend.dma_unmap(r.iova, r.size)?;
        }
        Ok(())
    }

    /// Withdraws the DMA mappings that would outlive the guest RAM behind them.
    pub fn release_dma(&mut self) {
        self.backend.release_dma();
    }

    /// Region info of BAR `bar` (size, mmap areas and fd).
    pub fn bar_region(&self, bar: usize) -> Option<&VfioRegionInfo> {
        self.regions.get(bar)?.as_ref()
    }

    /// Enables the mmap fast path: from now on, mappable BAR memory is installed in the guest
    /// through `mapper` wherever the root places the BAR (set it before adding the device).
    pub fn set_bar_mapper(&mut self, mapper: Arc<dyn BarMemoryMapper>) {
        self.mapper = Some(mapper);
    }

    fn unmap_bar(&mut self, bar: usize) {
        if let (Some(m), Some(handles)) = (&self.mapper, self.bar_maps.remove(&bar)) {
            handles.into_iter().for_each(|h| m.unmap(h));
        }
    }

    /// Maps what can be mapped of BAR `bar` at `addr`: the region's mmap areas less the
    /// pages of the emulated MSI-X table and PBA.
    fn map_bar(&mut self, bar: usize, addr: u64) {
        let (Some(mapper), Some(Some(region))) = (&self.mapper, self.regions.get(bar)) else {
            return;
        };
        let Some((file, file_offset)) = &region.mmap_fd else {
            return;
        };
        // Port I/O cannot be backed by memory.
        if self.shadow.bar(bar).is_none_or(|b| b.kind.is_io()) {
            return;
        }
        let mut holes = Vec::new();
        if let Some(m) = &self.irqs.msix {
            let c = m.config.capability();
            if usize::from(c.table_bar) == bar {
                holes.push((u64::from(c.table_offset), c.table_len()));
            }
            if usize::from(c.pba_bar) == bar {
                holes.push((u64::from(c.pba_offset), c.pba_len()));
            }
        }
        let mut handles = Vec::new();
        for (off, size) in mappable_ranges(&region.mmap_areas, &holes) {
            match mapper.map(addr + off, size, file, file_offset + off, region.writable()) {
                Ok(h) => handles.push(h),
                Err(e) => log::warn!("vfio {}: BAR {bar} +{off:#x} stays trapped: {e}", self.id),
            }
        }
        self.bar_maps.insert(bar, handles);
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        let bars: Vec<usize> = self.bar_maps.keys().copied().collect();
        bars.into_iter().for_each(|b| self.unmap_bar(b));
        self.release_dma();
    }
}

// Configuration space.
impl VfioPciDevice {
    fn source(&self, o: usize) -> Source {
        let in_range = |start: usize, len: usize| (start..start + len).contains(&o);
        if in_range(COMMAND, 2) {
            return Source::Command;
        }
        if in_range(BAR0, 4 * NUM_BARS)
            || in_range(ROM_BAR, 4)
            || o == INTERRUPT_LINE
            || o == INTERRUPT_PIN
        {
            return Source::Shadow;
        }
        if let Some(m) = &self.irqs.msi {
            let c = m.cap_offset;
            if in_range(c + MSI_CONTROL, m.config.capability().size() - MSI_CONTROL) {
                return Source::Msi(c);
            }
        }
        if let Some(m) = &self.irqs.msix
            && in_range(m.cap_offset + MSIX_CONTROL, 2)
        {
            return Source::MsixControl(m.cap_offset);
        }
        Source::Device
    }

    fn device_config_read(&mut self, offset: usize, data: &mut [u8]) {
        let n = data.len().min(self.config_len.saturating_sub(offset));
        let (inside, beyond) = data.split_at_mut(n);
        beyond.fill(0);
        if inside.is_empty() {
            return;
        }
        let r = self
            .backend
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, offset as u64, inside);
        if let Err(e) = r {
            log::warn!("vfio {}: config read at {offset:#x}: {e}", self.id);
            inside.fill(0xff);
        }
    }

    fn device_config_write(&mut self, offset: usize, data: &[u8]) {
        let data = &data[..data.len().min(self.config_len.saturating_sub(offset))];
        if data.is_empty() {
            return;
        }
        let r = self
            .backend
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, offset as u64, data);
        if let Err(e) = r {
            log::warn!("vfio {}: config write at {offset:#x}: {e}", self.id);
        }
    }

    fn emulated_byte(&self, o: usize, device: u8) -> u8 {
        match self.source(o) {
            Source::Device => device,
            Source::Shadow => self.shadow.read_u8(o),
            Source::Command if o == COMMAND => {
                (device & !COMMAND_EMULATED_BITS) | (self.shadow.read_u8(o) & COMMAND_EMULATED_BITS)
            }
            Source::Command => device,
            Source::Msi(c) => {
                let mut b = [0u8];
                if let Some(m) = &self.irqs.msi {
                    m.config.read(o - c, &mut b);
                }
                b[0]
            }
            Source::MsixControl(c) => {
                let control = self.irqs.msix.as_ref().map_or(0, |m| m.config.control());
                control.to_le_bytes()[o - c - MSIX_CONTROL]
            }
        }
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_SIZE {
            data.fill(0);
            return;
        }
        let n = data.len().min(CONFIG_SPACE_SIZE - offset);
        let data = &mut data[..n];
        let needs_device = (offset..offset + n)
            .any(|o| matches!(self.source(o), Source::Device | Source::Command));
        if needs_device {
            self.device_config_read(offset, data);
        }
        for (k, b) in data.iter_mut().enumerate() {
            *b = self.emulated_byte(offset + k, *b);
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let n = data.len().min(CONFIG_SPACE_SIZE.saturating_sub(offset));
        let mut to_device: Vec<(usize, u8)> = Vec::new();
        let mut msi: Vec<(usize, u8)> = Vec::new();
        let mut msix_control = None;
        for (k, &v) in data[..n].iter().enumerate() {
            let o = offset + k;
            match self.source(o) {
                Source::Shadow => self.shadow.write(o, &[v]),
                Source::Device => to_device.push((o, v)),
                Source::Command => {
                    self.shadow.write(o, &[v]);
                    to_device.push((o, v));
                }
                Source::Msi(c) => {
                    msi.push((o - c, v));
                    to_device.push((o, v));
                }
                Source::MsixControl(c) => {
                    let cur = msix_control.unwrap_or_else(|| {
                        self.irqs.msix.as_ref().map_or(0, |m| m.config.control())
                    });
                    let mut b = u16::to_le_bytes(cur);
                    b[o - c - MSIX_CONTROL] = v;
                    msix_control = Some(u16::from_le_bytes(b));
                    to_device.push((o, v));
                }
            }
        }
        // Interrupt plumbing first: a device that sees its enable bit must find its eventfds
        // already attached, or a vector it raises at once is lost.
        for (start, bytes) in runs(&msi) {
            if let Err(e) = self.irqs.write_msi(&mut *self.backend, start, &bytes) {
                log::error!("vfio {}: MSI update: {e}", self.id);
            }
        }
        if let Some(c) = msix_control
            && let Err(e) = self.irqs.write_msix_control(&mut *self.backend, c)
        {
            log::error!("vfio {}: MSI-X update: {e}", self.id);
        }
        for (start, bytes) in runs(&to_device) {
            self.device_config_write(start, &bytes);
        }
    }
}

/// Groups (offset, byte) pairs into runs of consecutive offsets.
fn runs(bytes: &[(usize, u8)]) -> Vec<(usize, Vec<u8>)> {
    let mut out: Vec<(usize, Vec<u8>)> = Vec::new();
    for &(o, v) in bytes {
        match out.last_mut() {
            Some((start, run)) if *start + run.len() == o => run.push(v),
            _ => out.push((o, vec![v])),
        }
    }
    out
}

// BARs.
impl VfioPciDevice {
    /// Whether `offset` of BAR `bar` falls in the MSI-X table (`Some(false)`: table,
    /// `Some(true)`: PBA), with the offset relative to that structure.
    fn msix_target(&self, bar: usize, offset: u64) -> Option<(bool, u64)> {
        let cap = self.irqs.msix.as_ref()?.config.capability();
        let hit = |b: u8, start: u32, len: u64| {
            let rel = offset.checked_sub(u64::from(start))?;
            (usize::from(b) == bar && rel < len).then_some(rel)
        };
        if let Some(rel) = hit(cap.table_bar, cap.table_offset, cap.table_len()) {
            return Some((false, rel));
        }
        hit(cap.pba_bar, cap.pba_offset, cap.pba_len()).map(|rel| (true, rel))
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config_read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_write(offset, data);
    }

    fn bars(&self) -> Vec<BarRegion> {
        self.shadow.bars()
    }

    fn bar_mapped(&mut self, bar: usize, addr: Option<u64>) {
        self.unmap_bar(bar);
        if let Some(a) = addr {
            self.map_bar(bar, a);
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let (Some((false, rel)), Some(m)) = (self.msix_target(bar, offset), &self.irqs.msix) {
            m.config.read_table(rel, data);
            return;
        }
        // The PBA included: the device knows what it has pending.
        if self.lost {
            data.fill(0xff);
        } else if let Err(e) = self.backend.region_read(bar as u32, offset, data) {
            self.access_failed(&format!("BAR {bar} read at {offset:#x}"), &e);
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let target = self.msix_target(bar, offset);
        if let Some((false, rel)) = target
            && let Err(e) = self.irqs.write_msix_table(&mut *self.backend, rel, data)
        {
            log::error!("vfio {}: MSI-X update: {e}", self.id);
        }
        // The PBA is read-only. Table writes also reach the device: a vfio-user device may gate
        // its own signalling on its copy of the mask bits, and vfio-pci drops them.
        if matches!(target, Some((true, _))) {
            return;
        }
        if self.lost {
            return;
        }
        if let Err(e) = self.backend.region_write(bar as u32, offset, data) {
            self.access_failed(&format!("BAR {bar} write at {offset:#x}"), &e);
        }
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        encode(&VfioPciState {
            config: self.shadow.state(),
            interrupts: self.irqs.state(),
        })
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let s: VfioPciState = decode(bytes)?;
        let id = self.id.clone();
        let incompatible = |reason: String| StateError::Incompatible { id, reason };
        if let Err(e) = self.shadow.restore(&s.config) {
            return Err(incompatible(e.to_string()));
        }
        // The device's own decode and bus-master bits follow the guest's, as after a write.
        let command = self.shadow.read_u16(COMMAND).to_le_bytes();
        self.device_config_write(COMMAND, &command);
        self.irqs
            .restore(&mut *self.backend, &s.interrupts)
            .map_err(|e| incompatible(e.to_string()))
    }
}
