//! The deprecated v1 migration region (index 9, type 3 / subtype 1): `device_state` bits,
//! `pending_bytes`, `data_offset` (reading it prepares the next chunk when saving) and
//! `data_size`, then a data section. Every device_state change runs through the v2 state
//! machine (RUNNING=001, PRE_COPY=011, STOP_COPY=010, STOP=000, RESUMING=100, ERROR=110),
//! so v1 gets the same arcs, refusals and fault injection.

use vfio_user::vfio::VFIO_DEVICE_STATE_V1_MASK;
use vfio_user::{
    MAX_DATA_XFER_SIZE, MigState, V1_DATA_OFFSET, V1_DATA_SIZE, V1_DEVICE_STATE, V1_PENDING_BYTES,
};

use crate::core::Core;
use crate::engine::DmaJob;
use crate::error::Refusal;
use crate::mig::{Migration, Session};

pub const V1_REGION_INDEX: u32 = 9;
/// Where the data section starts; page-aligned as a driver with an mmappable section would.
pub const V1_DATA_AREA: u64 = 0x1000;
pub const V1_DATA_CAPACITY: u64 = MAX_DATA_XFER_SIZE as u64;
pub const V1_REGION_SIZE: u64 = V1_DATA_AREA + V1_DATA_CAPACITY;

/// The data section and the data_size register.
#[derive(Default)]
pub struct V1Area {
    data: Vec<u8>,
    data_size: u64,
}

const MAP: [(u32, MigState); 6] = [
    (0b000, MigState::Stop),
    (0b001, MigState::Running),
    (0b010, MigState::StopCopy),
    (0b011, MigState::PreCopy),
    (0b100, MigState::Resuming),
    (0b110, MigState::Error),
];

pub fn bits(s: MigState) -> u32 {
    MAP.iter()
        .find(|(_, st)| *st == s)
        .map_or(0b110, |(b, _)| *b)
}

impl Migration {
    pub fn v1_read(&mut self, core: &mut Core, off: u64, buf: &mut [u8]) -> Result<(), Refusal> {
        let v: u64 = match (off, buf.len()) {
            (V1_DEVICE_STATE, 4) => u64::from(bits(self.state)),
            (4, 4) => 0,
            (V1_PENDING_BYTES, 8) => self.v1_pending(core),
            (V1_DATA_OFFSET, 8) => {
                self.v1_prepare(core);
                V1_DATA_AREA
            }
            (V1_DATA_SIZE, 8) => self.v1.data_size,
            (o, n) if o >= V1_DATA_AREA => {
                let at = (o - V1_DATA_AREA) as usize;
                buf.fill(0);
                let have = self.v1.data.len().saturating_sub(at).min(n);
                buf[..have].copy_from_slice(&self.v1.data[at..at + have]);
                return Ok(());
            }
            _ => {
                return Err(Refusal::inval(format!(
                    "v1 region read {off:#x}+{}",
                    buf.len()
                )));
            }
        };
        buf.copy_from_slice(&v.to_le_bytes()[..buf.len()]);
        Ok(())
    }

    fn v1_pending(&self, core: &Core) -> u64 {
        match self.state {
            MigState::PreCopy => self
                .precopy_info(core)
                .map_or(0, |i| i.initial_bytes + i.dirty_bytes),
            MigState::StopCopy => self.data_size(core),
            _ => 0,
        }
    }

    /// Reading data_offset while saving moves the next chunk into the data section.
    fn v1_prepare(&mut self, core: &mut Core) {
        if let Session::Save(s) = &mut self.session {
            self.v1.data = s.read(core, V1_DATA_CAPACITY as usize);
            self.v1.data_size = self.v1.data.len() as u64;
        }
    }

    pub fn v1_write(
        &mut self,
        core: &mut Core,
        off: u64,
        data: &[u8],
        submit: &mut dyn FnMut(DmaJob),
    ) -> Result<(), Refusal> {
        match (off, data.len()) {
            (V1_DEVICE_STATE, 4) => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                let target = MAP
                    .iter()
                    .find(|(b, st)| *b == v && *st != MigState::Error)
                    .map(|(_, st)| *st);
                let Some(target) = target.filter(|_| v & !VFIO_DEVICE_STATE_V1_MASK == 0) else {
                    return Err(self.invalid_v1(core, v));
                };
                self.v1 = V1Area::default();
                self.set_state(core, target, submit)
            }
            (V1_DATA_SIZE, 8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(data);
                self.v1_consume(u64::from_le_bytes(b))
            }
            (o, n) if o >= V1_DATA_AREA => {
                let at = (o - V1_DATA_AREA) as usize;
                if self.v1.data.len() < at + n {
                    self.v1.data.resize(at + n, 0);
                }
                self.v1.data[at..at + n].copy_from_slice(data);
                Ok(())
            }
            _ => Err(Refusal::inval(format!(
                "v1 region write {off:#x}+{}",
                data.len()
            ))),
        }
    }

    fn invalid_v1(&self, core: &mut Core, v: u32) -> Refusal {
        core.mig.invalid_arcs += 1;
        log::warn!(
            "invalid v1 device_state {v:#05b} requested in {:#05b} (invalid arcs: {})",
            bits(self.state),
            core.mig.invalid_arcs
        );
        Refusal::inval(format!("v1 device_state {v:#x} cannot be requested"))
    }

    /// Writing data_size while resuming hands that many bytes of the section to the loader.
    fn v1_consume(&mut self, n: u64) -> Result<(), Refusal> {
        if self.state != MigState::Resuming {
            return Err(Refusal::inval("data_size is written only while resuming"));
        }
        if n > self.v1.data.len() as u64 {
            return Err(Refusal::inval(format!(
                "data_size {n} but only {} bytes were written",
                self.v1.data.len()
            )));
        }
        let chunk = std::mem::take(&mut self.v1.data);
        self.v1.data_size = n;
        self.write(&chunk[..n as usize])
    }
}
