//! The command dispatch table: one handler per vfio-user command, each decoding its payload,
//! calling the device and encoding the reply.

use vfio_user::{
    Capabilities, Command, DeviceFeature, DeviceInfo, DmaMap, DmaUnmap, IrqInfo, IrqSet,
    MAX_DATA_XFER_SIZE, MAX_MSG_FDS, MIG_DATA_HEADER_SIZE, MigDataRead, RegionAccess,
    RegionInfoRequest, Request, Version, decode_mig_data, encode_mig_data,
};

use crate::error::Refusal;
use crate::features;
use crate::options::MigMode;
use crate::session::{Reply, Session};

type Handler = fn(&mut Session<'_>, Request) -> Result<Reply, Refusal>;

const PROTOCOL_MAJOR: u16 = 0;
const PROTOCOL_MINOR: u16 = 1;
/// Fixed part of a region info reply, sent alone when the client's argsz is too small.
const REGION_INFO_FIXED: usize = 32;

const HANDLERS: &[(Command, Handler)] = &[
    (Command::Version, version),
    (Command::DmaMap, dma_map),
    (Command::DmaUnmap, dma_unmap),
    (Command::DeviceGetInfo, device_info),
    (Command::DeviceGetRegionInfo, region_info),
    (Command::DeviceGetIrqInfo, irq_info),
    (Command::DeviceSetIrqs, set_irqs),
    (Command::RegionRead, region_read),
    (Command::RegionWrite, region_write),
    (Command::DeviceReset, reset),
    (Command::DeviceFeature, device_feature),
    (Command::MigDataRead, mig_data_read),
    (Command::MigDataWrite, mig_data_write),
];

pub fn dispatch(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    let cmd = req.command();
    if s.client_caps.is_none() && cmd != Some(Command::Version) {
        return Err(Refusal::inval("VERSION must be negotiated first"));
    }
    let handler = HANDLERS
        .iter()
        .find(|(c, _)| Some(*c) == cmd)
        .map(|(_, h)| *h);
    match handler {
        Some(h) => h(s, req),
        None => Err(Refusal::notsup("command not supported by this device")),
    }
}

fn version(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    if s.client_caps.is_some() {
        return Err(Refusal::inval("VERSION already negotiated"));
    }
    let theirs = Version::decode(&req.payload)?;
    if theirs.major != PROTOCOL_MAJOR {
        return Err(Refusal::notsup(format!("protocol major {}", theirs.major)));
    }
    let ours = Version {
        major: PROTOCOL_MAJOR,
        minor: theirs.minor.min(PROTOCOL_MINOR),
        caps: Capabilities {
            max_msg_fds: Some(MAX_MSG_FDS as u64),
            max_data_xfer_size: Some(MAX_DATA_XFER_SIZE as u64),
            device_features: Some(vec![
                vfio_user::vfio::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
                vfio_user::vfio::VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2,
            ]),
            ..Default::default()
        },
    };
    log::info!(
        "client speaks {}.{}: {:?}",
        theirs.major,
        theirs.minor,
        theirs.caps
    );
    s.client_caps = Some(theirs.caps);
    Ok(Reply::with(ours.encode()))
}

fn dma_map(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    let m = DmaMap::decode(&req.payload)?;
    let mut fds = req.fds.into_iter();
    let fd = match (fds.next(), fds.next()) {
        (Some(fd), None) => fd,
        (None, _) => {
            return Err(Refusal::notsup(
                "DMA_MAP without an fd needs DMA_READ/WRITE messages, which this device lacks",
            ));
        }
        (Some(_), Some(_)) => return Err(Refusal::inval("DMA_MAP with more than one fd")),
    };
    s.device.dma_map(&m, fd)?;
    Ok(Reply::default())
}

fn dma_unmap(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    let u = DmaUnmap::decode(&req.payload)?;
    if u.flags != 0 {
        return Err(Refusal::notsup(format!("DMA_UNMAP flags {:#x}", u.flags)));
    }
    s.device.dma_unmap(u.address, u.size)?;
    Ok(Reply::with(DmaUnmap::new(u.address, u.size).encode()))
}

fn device_info(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    let q = DeviceInfo::decode(&req.payload)?;
    if q.argsz < DeviceInfo::SIZE || req.payload.len() != DeviceInfo::SIZE as usize {
        return Err(Refusal::inval("DEVICE_GET_INFO request of the wrong size"));
    }
    Ok(Reply::with(s.device.device_info().encode()))
}

fn region_info(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    let q = RegionInfoRequest::decode(&req.payload)?;
    let mut payload = s.device.region_info(q.index)?.encode();
    // A too-small argsz gets the fixed part, whose argsz field tells the needed size.
    if payload.len() > q.argsz as usize {
        payload.truncate(REGION_INFO_FIXED);
    }
    Ok(Reply::with(payload))
}

fn irq_info(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    let q = IrqInfo::decode(&req.payload)?;
    Ok(Reply::with(s.device.irq_info(q.index)?.encode()))
}

fn set_irqs(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    let set = IrqSet::decode(&req.payload)?;
    s.device.set_irqs(&set, req.fds)?;
    Ok(Reply::default())
}

fn region_read(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    let (a, _) = RegionAccess::decode(&req.payload, false)?;
    // decode() bounded count by MAX_DATA_XFER_SIZE.
    let mut data = vec![0u8; a.count as usize];
    s.device.region_read(a.region, a.offset, &mut data)?;
    Ok(Reply::with(a.encode(&data)))
}

fn region_write(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    let (a, data) = RegionAccess::decode(&req.payload, true)?;
    s.device.region_write(a.region, a.offset, data)?;
    Ok(Reply::with(a.encode(&[])))
}

fn reset(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    if !req.payload.is_empty() {
        return Err(Refusal::inval("DEVICE_RESET carries no payload"));
    }
    s.device.reset();
    Ok(Reply::default())
}

fn device_feature(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    let f = DeviceFeature::decode(&req.payload)?;
    let data = features::handle(s.device, &f)?;
    let reply = DeviceFeature {
        argsz: (DeviceFeature::HEADER_SIZE + data.len()) as u32,
        flags: f.flags,
        data,
    };
    Ok(Reply::with(reply.encode()))
}

/// The in-band data stream exists only with migration v2.
fn require_v2(s: &Session<'_>) -> Result<(), Refusal> {
    if s.device.mig_mode() == MigMode::V2 {
        Ok(())
    } else {
        Err(Refusal::notsup(
            "this device has no v2 migration data stream",
        ))
    }
}

fn mig_data_read(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    require_v2(s)?;
    let r = MigDataRead::decode(&req.payload)?;
    if r.size == 0 || (r.argsz as usize) < MIG_DATA_HEADER_SIZE + r.size as usize {
        return Err(Refusal::inval(format!(
            "MIG_DATA_READ of {} bytes with argsz {}",
            r.size, r.argsz
        )));
    }
    let data = s.device.mig_data_read(r.size as usize)?;
    Ok(Reply::with(encode_mig_data(&data)))
}

fn mig_data_write(s: &mut Session<'_>, req: Request) -> Result<Reply, Refusal> {
    require_v2(s)?;
    let data = decode_mig_data(&req.payload)?;
    s.device.mig_data_write(data)?;
    Ok(Reply::default())
}
