//! An in-memory VFIO device for the migration drivers' unit tests: the v2 state machine as
//! the kernel walks it (next-hop table, optional states skipped, blocked arcs counted as
//! invalid), a checksummed stream, PRE_COPY, DMA logging, injected arc failures, and the v1
//! region mapped onto the same machine. It stands in for kernel VFIO, which the build hosts
//! lack, and for anything else behind `VfioBackend`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use devices::pci::irq::{IrqError, MsiMessage, MsiRouting};
use devices::pci::vfio_backend::{
    BackendError, DmaRegion, MigrationState, Result, VFIO_DEVICE_FLAGS_PCI,
    VFIO_PCI_CONFIG_REGION_INDEX, VfioBackend, VfioDeviceInfo, VfioIrqInfo, VfioRegionInfo,
};
use devices::pci::{VfioPciDevice, vfio_backend::VFIO_REGION_INFO_FLAG_READ};
use vmm_sys_util::eventfd::EventFd;

use super::driver::{MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};
use MigrationState::*;

pub const ALL_FLAGS: u64 = MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY;
const V1_INDEX: u32 = 9;
const V1_SECTION: u64 = 0x1000;
const V1_SECTION_LEN: u64 = 0x1000;

/// What the test sees of a fake after (or during) the run.
#[derive(Default)]
pub struct Observed {
    pub state: Option<MigrationState>,
    pub invalid_arcs: u32,
    pub resets: u32,
    pub logging: bool,
    /// The state a successful RESUMING → STOP loaded.
    pub loaded: Option<Vec<u8>>,
    /// Every state the device was in, in order.
    pub visited: Vec<MigrationState>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    V2(u64),
    V1,
    None,
}

pub struct FakeDevice {
    mode: Mode,
    state: MigrationState,
    /// The device's internal state, and the stream position of a saving session.
    data: Vec<u8>,
    pos: Option<usize>,
    incoming: Option<Vec<u8>>,
    /// The next walk's arc (from, to) fails once.
    pub fail_arc: Option<(MigrationState, MigrationState)>,
    pub dma_log: bool,
    /// A drained PRE_COPY stream reads 0 bytes (mtty, libvfio-user) instead of ENOMSG.
    pub precopy_drained_reads_zero: bool,
    pub dirty: BTreeSet<u64>,
    v1_chunk: Vec<u8>,
    v1_section: Vec<u8>,
    pub seen: Arc<Mutex<Observed>>,
}

fn hop(cur: MigrationState, tgt: MigrationState) -> Option<MigrationState> {
    let row: [MigrationState; 7] = match cur {
        Stop => [
            Stop, RunningP2p, StopCopy, Resuming, RunningP2p, RunningP2p, RunningP2p,
        ],
        Running => [
            RunningP2p, Running, RunningP2p, RunningP2p, RunningP2p, PreCopy, RunningP2p,
        ],
        StopCopy => [Stop, Stop, StopCopy, Stop, Stop, Error, Error],
        Resuming => [Stop, Stop, Stop, Resuming, Stop, Stop, Stop],
        RunningP2p => [Stop, Running, Stop, Stop, RunningP2p, Running, PreCopyP2p],
        PreCopy => [
            Running, Running, PreCopyP2p, Running, Running, PreCopy, PreCopyP2p,
        ],
        PreCopyP2p => [
            RunningP2p, RunningP2p, StopCopy, RunningP2p, RunningP2p, PreCopy, PreCopyP2p,
        ],
        Error => return None,
    };
    let col = [
        Stop, Running, StopCopy, Resuming, RunningP2p, PreCopy, PreCopyP2p,
    ]
    .iter()
    .position(|s| *s == tgt)?;
    Some(row[col]).filter(|s| *s != Error)
}

fn sum(b: &[u8]) -> u64 {
    b.iter()
        .fold(0u64, |a, &x| a.wrapping_mul(31).wrapping_add(u64::from(x)))
}

fn inval(why: impl Into<String>) -> BackendError {
    BackendError::Invalid(why.into())
}

impl FakeDevice {
    pub fn new(mode: Mode, state_len: usize, seed: u8) -> Self {
        FakeDevice {
            mode,
            state: Running,
            data: (0..state_len)
                .map(|i| (i as u8).wrapping_mul(seed))
                .collect(),
            pos: None,
            incoming: None,
            fail_arc: None,
            dma_log: true,
            precopy_drained_reads_zero: false,
            dirty: BTreeSet::new(),
            v1_chunk: Vec::new(),
            v1_section: vec![0; V1_SECTION_LEN as usize],
            seen: Arc::new(Mutex::new(Observed {
                visited: vec![Running],
                ..Observed::default()
            })),
        }
    }

    /// The fake behind a PCI device, as the VMM holds passthrough devices.
    pub fn into_pci(self, id: &str) -> (Arc<Mutex<VfioPciDevice>>, Arc<Mutex<Observed>>) {
        let seen = self.seen.clone();
        let dev = VfioPciDevice::new(id, Box::new(self), Arc::new(NoRouting), None)
            .expect("fake PCI device");
        (Arc::new(Mutex::new(dev)), seen)
    }

    /// The internal state (what a destination must end up with).
    pub fn into_state(self) -> Vec<u8> {
        self.data
    }

    pub fn offers_precopy(&self) -> bool {
        self.offers(PreCopy)
    }

    fn flags(&self) -> u64 {
        match self.mode {
            Mode::V2(f) => f,
            Mode::V1 => MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
            Mode::None => 0,
        }
    }

    fn offers(&self, s: MigrationState) -> bool {
        let f = self.flags();
        match s {
            RunningP2p => f & MIGRATION_P2P != 0,
            PreCopy => f & MIGRATION_PRE_COPY != 0,
            PreCopyP2p => f & MIGRATION_P2P != 0 && f & MIGRATION_PRE_COPY != 0,
            Error => false,
            _ => true,
        }
    }

    fn invalid(&mut self, why: String) -> BackendError {
        self.seen.lock().unwrap().invalid_arcs += 1;
        inval(why)
    }

    fn publish(&self) {
        let mut seen = self.seen.lock().unwrap();
        seen.state = Some(self.state);
        if seen.visited.last() != Some(&self.state) {
            seen.visited.push(self.state);
        }
    }

    /// The stream: the state, then its checksum.
    fn stream(&self) -> Vec<u8> {
        let mut s = self.data.clone();
        s.extend_from_slice(&sum(&self.data).to_le_bytes());
        s
    }

    fn arc(&mut self, from: MigrationState, to: MigrationState) -> Result<()> {
        if self.fail_arc == Some((from, to)) {
            self.fail_arc = None;
            return Err(inval(format!("injected failure of {from:?} -> {to:?}")));
        }
        let saving = |s| matches!(s, PreCopy | PreCopyP2p | StopCopy);
        if !saving(from) && saving(to) {
            self.pos = Some(0);
        } else if saving(from) && !saving(to) {
            self.pos = None;
        }
        match (from, to) {
            (Stop, Resuming) => self.incoming = Some(Vec::new()),
            (Resuming, Stop) => self.load()?,
            _ => {}
        }
        Ok(())
    }

    fn load(&mut self) -> Result<()> {
        let got = self.incoming.take().unwrap_or_default();
        let n = got
            .len()
            .checked_sub(8)
            .ok_or_else(|| inval("short stream"))?;
        let want = u64::from_le_bytes(got[n..].try_into().unwrap_or([0; 8]));
        if n != self.data.len() || sum(&got[..n]) != want {
            self.state = Error;
            return Err(inval("stream refused"));
        }
        self.data = got[..n].to_vec();
        self.seen.lock().unwrap().loaded = Some(self.data.clone());
        Ok(())
    }

    fn walk(&mut self, target: MigrationState) -> Result<()> {
        if self.state == Error || !self.offers(target) {
            return Err(self.invalid(format!("{:?} -> {target:?}", self.state)));
        }
        while self.state != target {
            let mut next = hop(self.state, target);
            while let Some(n) = next.filter(|n| !self.offers(*n)) {
                next = hop(n, target);
            }
            let Some(next) = next else {
                return Err(self.invalid(format!("{:?} -> {target:?}", self.state)));
            };
            let r = self.arc(self.state, next);
            if self.state != Error {
                self.state = if r.is_ok() { next } else { self.state };
            }
            self.publish();
            r?;
        }
        Ok(())
    }

    fn remaining(&self) -> usize {
        self.pos
            .map_or(0, |p| self.stream().len().saturating_sub(p))
    }

    fn v1_bits(&self) -> u32 {
        match self.state {
            Running => 1,
            PreCopy => 3,
            StopCopy => 2,
            Resuming => 4,
            Error => 6,
            _ => 0,
        }
    }

    fn v1_read(&mut self, offset: u64, data: &mut [u8]) -> Result<()> {
        match offset {
            0 => data.copy_from_slice(&self.v1_bits().to_le_bytes()),
            8 => data.copy_from_slice(&(self.pending() as u64).to_le_bytes()),
            16 if self.pos.is_none() => data.copy_from_slice(&V1_SECTION.to_le_bytes()),
            16 => {
                let n = self.pending().min(V1_SECTION_LEN as usize);
                let mut buf = vec![0; n];
                self.read_migration_data(&mut buf).or_else(|e| match e {
                    BackendError::NoMigrationDataNow => Ok(0),
                    e => Err(e),
                })?;
                self.v1_chunk = buf;
                data.copy_from_slice(&V1_SECTION.to_le_bytes());
            }
            24 => data.copy_from_slice(&(self.v1_chunk.len() as u64).to_le_bytes()),
            o if o >= V1_SECTION => {
                let at = (o - V1_SECTION) as usize;
                data.copy_from_slice(&self.v1_chunk[at..at + data.len()]);
            }
            _ => return Err(inval("v1 read")),
        }
        Ok(())
    }

    /// pending_bytes: what a saving session has left (pre-copy: only the state itself).
    fn pending(&self) -> usize {
        match self.state {
            PreCopy => self.data.len().saturating_sub(self.pos.unwrap_or(0)),
            StopCopy => self.remaining(),
            _ => 0,
        }
    }

    fn v1_write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        match offset {
            0 => {
                let bits = u32::from_le_bytes(data.try_into().map_err(|_| inval("size"))?);
                let to = match bits {
                    1 => Running,
                    3 => PreCopy,
                    2 => StopCopy,
                    0 => Stop,
                    4 => Resuming,
                    b => return Err(self.invalid(format!("v1 bits {b:#b}"))),
                };
                self.walk(to)
            }
            24 => {
                let n = u64::from_le_bytes(data.try_into().map_err(|_| inval("size"))?) as usize;
                let section = self.v1_section[..n].to_vec();
                self.write_migration_data(&section)
            }
            o if o >= V1_SECTION => {
                let at = (o - V1_SECTION) as usize;
                self.v1_section[at..at + data.len()].copy_from_slice(data);
                Ok(())
            }
            _ => Err(inval("v1 write")),
        }
    }
}

impl VfioBackend for FakeDevice {
    fn device_info(&mut self) -> Result<VfioDeviceInfo> {
        Ok(VfioDeviceInfo {
            flags: VFIO_DEVICE_FLAGS_PCI,
            num_regions: if self.mode == Mode::V1 { 10 } else { 9 },
            num_irqs: 5,
        })
    }

    fn region_info(&mut self, index: u32) -> Result<VfioRegionInfo> {
        let size = match index {
            VFIO_PCI_CONFIG_REGION_INDEX => 256,
            V1_INDEX if self.mode == Mode::V1 => V1_SECTION + V1_SECTION_LEN,
            _ => 0,
        };
        Ok(VfioRegionInfo {
            flags: VFIO_REGION_INFO_FLAG_READ,
            size,
            ..Default::default()
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        match index {
            V1_INDEX if self.mode == Mode::V1 => self.v1_read(offset, data),
            _ => {
                // Vendor 0xfeed, nothing else: no BARs, no capabilities.
                data.fill(0);
                let id = [0xed, 0xfe, 0x01, 0x00];
                for (k, b) in data.iter_mut().enumerate() {
                    if let Some(v) = id.get(offset as usize + k) {
                        *b = *v;
                    }
                }
                Ok(())
            }
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        match index {
            V1_INDEX if self.mode == Mode::V1 => self.v1_write(offset, data),
            _ => Ok(()),
        }
    }

    fn irq_info(&mut self, _index: u32) -> Result<VfioIrqInfo> {
        Ok(VfioIrqInfo::default())
    }

    fn set_irq_eventfds(&mut self, _index: u32, _fds: &[&EventFd]) -> Result<()> {
        Ok(())
    }

    fn disable_irq(&mut self, _index: u32) -> Result<()> {
        Ok(())
    }

    fn set_irq_unmask_eventfd(&mut self, _index: u32, _fd: &EventFd) -> Result<()> {
        Ok(())
    }

    fn unmask_irq(&mut self, _index: u32) -> Result<()> {
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        self.state = Running;
        self.pos = None;
        self.incoming = None;
        self.seen.lock().unwrap().resets += 1;
        self.publish();
        Ok(())
    }

    fn dma_map(&mut self, _region: &DmaRegion) -> Result<()> {
        Ok(())
    }

    fn dma_unmap(&mut self, _iova: u64, _size: u64) -> Result<()> {
        Ok(())
    }

    fn migration_features(&mut self) -> Result<Option<u64>> {
        Ok(match self.mode {
            Mode::V2(f) => Some(f),
            _ => None,
        })
    }

    fn migration_region_v1(&mut self) -> Result<Option<(u32, u64)>> {
        Ok((self.mode == Mode::V1).then_some((V1_INDEX, V1_SECTION + V1_SECTION_LEN)))
    }

    fn set_migration_state(&mut self, state: MigrationState) -> Result<()> {
        self.walk(state)
    }

    fn migration_state(&mut self) -> Result<MigrationState> {
        Ok(self.state)
    }

    fn read_migration_data(&mut self, buf: &mut [u8]) -> Result<usize> {
        let pos = self
            .pos
            .ok_or_else(|| inval("read outside a saving state"))?;
        // Pre-copy offers the state alone; the checksum comes with STOP_COPY.
        let end = match self.state {
            StopCopy => self.data.len() + 8,
            _ => self.data.len(),
        };
        if pos >= end {
            return match self.state {
                StopCopy => Ok(0),
                _ if self.precopy_drained_reads_zero => Ok(0),
                _ => Err(BackendError::NoMigrationDataNow),
            };
        }
        let n = buf.len().min(end - pos);
        buf[..n].copy_from_slice(&self.stream()[pos..pos + n]);
        self.pos = Some(pos + n);
        Ok(n)
    }

    fn precopy_info(&mut self) -> Result<(u64, u64)> {
        match (self.state, self.pos) {
            (PreCopy | PreCopyP2p, Some(p)) => Ok((self.data.len().saturating_sub(p) as u64, 0)),
            _ => Err(self.invalid("pre-copy info outside PRE_COPY".into())),
        }
    }

    fn stop_copy_size(&mut self) -> Result<u64> {
        Ok(match self.pos {
            Some(_) => self.remaining() as u64,
            None => self.stream().len() as u64,
        })
    }

    fn write_migration_data(&mut self, data: &[u8]) -> Result<()> {
        match (&mut self.incoming, self.state) {
            (Some(buf), Resuming) => {
                buf.extend_from_slice(data);
                Ok(())
            }
            _ => Err(inval("write outside RESUMING")),
        }
    }

    fn dma_logging_start(&mut self, page_size: u64, _ranges: &[(u64, u64)]) -> Result<u64> {
        if !self.dma_log {
            return Err(BackendError::Unsupported("DMA logging"));
        }
        self.seen.lock().unwrap().logging = true;
        Ok(page_size)
    }

    fn dma_logging_report(&mut self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>> {
        let pages = length / page_size;
        let mut bm = vec![0u64; pages.div_ceil(64) as usize];
        let hit: Vec<u64> = self.dirty.range(iova..iova + length).copied().collect();
        for gpa in hit {
            let p = (gpa - iova) / page_size;
            bm[(p / 64) as usize] |= 1 << (p % 64);
            self.dirty.remove(&gpa);
        }
        Ok(bm)
    }

    fn dma_logging_stop(&mut self) -> Result<()> {
        self.seen.lock().unwrap().logging = false;
        Ok(())
    }
}

/// Interrupt routing that routes nothing (the fake has no interrupts).
pub struct NoRouting;

impl MsiRouting for NoRouting {
    fn allocate_gsi(&self) -> std::result::Result<u32, IrqError> {
        Ok(0)
    }
    fn free_gsi(&self, _gsi: u32) {}
    fn set_route(&self, _gsi: u32, _msg: Option<MsiMessage>) -> std::result::Result<(), IrqError> {
        Ok(())
    }
    fn register_irqfd(&self, _fd: &EventFd, _gsi: u32) -> std::result::Result<(), IrqError> {
        Ok(())
    }
    fn unregister_irqfd(&self, _fd: &EventFd, _gsi: u32) -> std::result::Result<(), IrqError> {
        Ok(())
    }
}
