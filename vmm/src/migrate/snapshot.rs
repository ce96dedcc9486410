//! The non-memory state of a paused machine: every vCPU, the VM, every emulated device,
//! each as an encoded plain-data blob, saved and restored in a fixed order.

use migration::description::{DeviceDescription, MigrationCaps, VmDescription};
use migration::ranges::MemoryRange;
use migration::state::{StateError, decode, encode};

use crate::machine::Machine;
use crate::vstate::runner::RunnerError;
use crate::vstate::vcpu::{VcpuError, VcpuState};
use crate::vstate::vm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error("state for vCPU {0} is missing or duplicated")]
    VcpuSet(u32),
    #[error("no state received for device {0}")]
    MissingDevice(String),
    #[error("state received for unknown device {0}")]
    UnknownDevice(String),
}

/// Everything but RAM, encoded.
#[derive(Default)]
pub struct Snapshot {
    pub vcpus: Vec<Vec<u8>>,
    pub vm: Vec<u8>,
    pub devices: Vec<(String, Vec<u8>)>,
}

/// Describes the machine for the destination's compatibility check; `passthrough` are the
/// passthrough devices' descriptions, which only their migration drivers know.
pub fn describe(m: &Machine, passthrough: Vec<DeviceDescription>) -> VmDescription {
    VmDescription {
        ram: m
            .ram
            .ranges
            .iter()
            .map(|r| MemoryRange::new(r.gpa, r.len))
            .collect(),
        vcpus: m.vcpus.count() as u32,
        cpuid: m.cpuid.clone(),
        devices: m
            .devices
            .migratable()
            .iter()
            .map(|d| DeviceDescription {
                id: lock(d).id(),
                kind: "emulated".into(),
                caps: MigrationCaps {
                    stop_copy: true,
                    ..Default::default()
                },
            })
            .chain(passthrough)
            .collect(),
    }
}

fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Saves the state of a paused machine.
pub fn save(m: &Machine) -> Result<Snapshot, SnapshotError> {
    let candidates: Vec<u32> =
        m.vm.kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
    let list = m
        .vcpus
        .on_each(move |v| v.readable_msrs(&candidates))?
        .swap_remove(0);
    let vcpus = m
        .vcpus
        .on_each(move |v| {
            v.save(&list)
                .map_err(SnapshotError::from)
                .and_then(|s| Ok(encode(&s)?))
        })?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let vm = encode(&m.vm.save_state()?)?;
    let devices = m
        .devices
        .migratable()
        .iter()
        .map(|d| {
            let d = lock(d);
            Ok((d.id(), d.save_state()?))
        })
        .collect::<Result<Vec<_>, SnapshotError>>()?;
    Ok(Snapshot { vcpus, vm, devices })
}

/// Restores a snapshot into a paused machine built from the same description: VM (PIT,
/// clock, irqchip), then each vCPU, then each device.
pub fn restore(m: &Machine, s: &Snapshot) -> Result<(), SnapshotError> {
    if s.vcpus.len() != m.vcpus.count() {
        return Err(SnapshotError::VcpuSet(s.vcpus.len() as u32));
    }
    m.vm.restore_state(&decode(&s.vm)?)?;
    let states: Vec<VcpuState> = s
        .vcpus
        .iter()
        .map(|b| decode(b))
        .collect::<Result<_, _>>()?;
    let states = std::sync::Arc::new(states);
    m.vcpus
        .on_each(move |v| v.restore(&states[v.index as usize]))?
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
    let devices = m.devices.migratable();
    for (id, _) in &s.devices {
        if !devices.iter().any(|d| lock(d).id() == *id) {
            return Err(SnapshotError::UnknownDevice(id.clone()));
        }
    }
    for d in &devices {
        let mut d = lock(d);
        let id = d.id();
        let (_, blob) = s
            .devices
            .iter()
            .find(|(i, _)| *i == id)
            .ok_or_else(|| SnapshotError::MissingDevice(id.clone()))?;
        d.restore_state(blob)?;
    }
    Ok(())
}
