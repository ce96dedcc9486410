//! VFIO_USER_DEVICE_FEATURE on this device: which features exist in which mode, the
//! GET/SET/PROBE rules of `vfio_check_feature()`, and each feature's data. A feature the
//! device lacks is ENOTTY, as in the kernel; a wrong operation on one it has is EINVAL.

use vfio_user::vfio::*;
use vfio_user::{
    DeviceFeature, DmaLoggingReport, DmaLoggingStart, MigStateData, PrecopyInfo, encode_u64,
};

use crate::device::Device;
use crate::error::Refusal;
use crate::options::MigMode;

const GET: u32 = VFIO_DEVICE_FEATURE_GET;
const SET: u32 = VFIO_DEVICE_FEATURE_SET;

/// The operations feature `index` supports on this device; `None` if it lacks the feature.
fn ops(device: &Device, index: u32) -> Option<u32> {
    let v2 = device.mig_mode() == MigMode::V2;
    let precopy = v2 && device.v2_flags() & VFIO_MIGRATION_PRE_COPY != 0;
    let log = device.dma_logging_offered();
    match index {
        VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE if v2 => Some(GET),
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE if v2 => Some(GET | SET),
        // GET is this crate's PRECOPY_INFO; SET is the kernel's opt-in, accepted as a no-op.
        VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2 if precopy => Some(GET | SET),
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP if log => {
            Some(SET)
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT if log => Some(GET),
        _ => None,
    }
}

/// Size of the reply data, known before anything runs, so that a too-small argsz is refused
/// before a SET acts or a REPORT clears bits.
fn reply_size(f: &DeviceFeature) -> usize {
    if f.set() || f.probe() {
        return f.data.len();
    }
    match f.index() {
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => DmaLoggingReport::decode(&f.data)
            .ok()
            .and_then(|(r, _)| r.bitmap_bytes())
            .map_or(0, |b| DmaLoggingReport::SIZE + b as usize),
        VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2 => PrecopyInfo::SIZE,
        _ => 8,
    }
}

/// Runs one DEVICE_FEATURE request; returns the reply's data.
pub fn handle(device: &Device, f: &DeviceFeature) -> Result<Vec<u8>, Refusal> {
    let index = f.index();
    let have = ops(device, index)
        .ok_or_else(|| Refusal::new(libc::ENOTTY, format!("no device feature {index}")))?;
    let want = f.flags & (GET | SET);
    if want & !have != 0 || (want == 0 && !f.probe()) {
        return Err(Refusal::inval(format!(
            "feature {index} does not support flags {:#x}",
            f.flags
        )));
    }
    if f.probe() {
        return Ok(f.data.clone());
    }
    if DeviceFeature::HEADER_SIZE + reply_size(f) > f.argsz as usize {
        return Err(Refusal::inval(format!("argsz {} too small", f.argsz)));
    }
    if f.get() {
        get(device, index, &f.data)
    } else {
        set(device, index, &f.data)
    }
}

fn get(device: &Device, index: u32, data: &[u8]) -> Result<Vec<u8>, Refusal> {
    Ok(match index {
        VFIO_DEVICE_FEATURE_MIGRATION => encode_u64(device.v2_flags()),
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => MigStateData {
            device_state: device.mig_state() as u32,
            data_fd: -1,
        }
        .encode(),
        VFIO_DEVICE_FEATURE_MIG_DATA_SIZE => encode_u64(device.mig_data_size()),
        VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2 => device.precopy_info()?.encode(),
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => {
            let (req, _) = DmaLoggingReport::decode(data)?;
            let bitmap = device.dma_logging_report(&req)?;
            let mut out = req.encode();
            bitmap
                .iter()
                .for_each(|w| out.extend_from_slice(&w.to_le_bytes()));
            out
        }
        _ => return Err(Refusal::inval(format!("GET of feature {index}"))),
    })
}

fn set(device: &Device, index: u32, data: &[u8]) -> Result<Vec<u8>, Refusal> {
    match index {
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => {
            let d = MigStateData::decode(data)?;
            device.set_mig_state(d.device_state)?;
            Ok(MigStateData {
                device_state: d.device_state,
                data_fd: -1,
            }
            .encode())
        }
        VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2 => Ok(data.to_vec()),
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START => {
            let req = DmaLoggingStart::decode(data)?;
            let page_size = device.dma_logging_start(&req)?;
            Ok(DmaLoggingStart { page_size, ..req }.encode())
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
            device.dma_logging_stop();
            Ok(data.to_vec())
        }
        _ => Err(Refusal::inval(format!("SET of feature {index}"))),
    }
}
