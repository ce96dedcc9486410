//! The 16-byte message header, command numbers and the limits every message is held to.

use crate::error::{Error, Result, malformed};

pub const HEADER_SIZE: usize = 16;

/// Largest `count` of one region/DMA data transfer we send or accept (the spec's default
/// `max_data_xfer_size`).
pub const MAX_DATA_XFER_SIZE: usize = 1 << 20;

/// Largest whole message (header included) we accept. Room for one maximal data transfer plus
/// its fixed fields, with slack for capability lists and (later) dirty bitmaps.
pub const MAX_MSG_SIZE: usize = MAX_DATA_XFER_SIZE + 4096;

/// Most file descriptors accepted with one message; extra ones are closed and the message refused.
pub const MAX_MSG_FDS: usize = 16;

/// Command numbers from the "Commands" table of the spec. 14 (the old DIRTY_PAGES) is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    DeviceGetRegionIoFds = 6,
    DeviceGetIrqInfo = 7,
    DeviceSetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DmaRead = 11,
    DmaWrite = 12,
    DeviceReset = 13,
    RegionWriteMulti = 15,
    DeviceFeature = 16,
    MigDataRead = 17,
    MigDataWrite = 18,
}

impl Command {
    pub const ALL: [Command; 17] = [
        Command::Version,
        Command::DmaMap,
        Command::DmaUnmap,
        Command::DeviceGetInfo,
        Command::DeviceGetRegionInfo,
        Command::DeviceGetRegionIoFds,
        Command::DeviceGetIrqInfo,
        Command::DeviceSetIrqs,
        Command::RegionRead,
        Command::RegionWrite,
        Command::DmaRead,
        Command::DmaWrite,
        Command::DeviceReset,
        Command::RegionWriteMulti,
        Command::DeviceFeature,
        Command::MigDataRead,
        Command::MigDataWrite,
    ];

    pub fn from_u16(v: u16) -> Option<Command> {
        Self::ALL.into_iter().find(|c| *c as u16 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Command::Version => "VFIO_USER_VERSION",
            Command::DmaMap => "VFIO_USER_DMA_MAP",
            Command::DmaUnmap => "VFIO_USER_DMA_UNMAP",
            Command::DeviceGetInfo => "VFIO_USER_DEVICE_GET_INFO",
            Command::DeviceGetRegionInfo => "VFIO_USER_DEVICE_GET_REGION_INFO",
            Command::DeviceGetRegionIoFds => "VFIO_USER_DEVICE_GET_REGION_IO_FDS",
            Command::DeviceGetIrqInfo => "VFIO_USER_DEVICE_GET_IRQ_INFO",
            Command::DeviceSetIrqs => "VFIO_USER_DEVICE_SET_IRQS",
            Command::RegionRead => "VFIO_USER_REGION_READ",
            Command::RegionWrite => "VFIO_USER_REGION_WRITE",
            Command::DmaRead => "VFIO_USER_DMA_READ",
            Command::DmaWrite => "VFIO_USER_DMA_WRITE",
            Command::DeviceReset => "VFIO_USER_DEVICE_RESET",
            Command::RegionWriteMulti => "VFIO_USER_REGION_WRITE_MULTI",
            Command::DeviceFeature => "VFIO_USER_DEVICE_FEATURE",
            Command::MigDataRead => "VFIO_USER_MIG_DATA_READ",
            Command::MigDataWrite => "VFIO_USER_MIG_DATA_WRITE",
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The Type field (flags bits 0-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    Command,
    Reply,
}

const FLAG_TYPE_MASK: u32 = 0xf;
const FLAG_TYPE_REPLY: u32 = 0x1;
const FLAG_NO_REPLY: u32 = 1 << 4;
const FLAG_ERROR: u32 = 1 << 5;
const FLAGS_KNOWN: u32 = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR;

/// A decoded header. `command` stays a raw number so that a request for a command we do not
/// implement can still be answered with an error carrying the same command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    pub msg_type: MsgType,
    pub no_reply: bool,
    pub error: bool,
    pub errno: u32,
}

impl Header {
    pub fn request(id: u16, command: Command, payload_len: usize) -> Result<Header> {
        Ok(Header {
            id,
            command: command as u16,
            size: message_size(payload_len)?,
            msg_type: MsgType::Command,
            no_reply: false,
            error: false,
            errno: 0,
        })
    }

    /// The reply to `req`, carrying `payload_len` bytes.
    pub fn reply_to(req: &Header, payload_len: usize) -> Result<Header> {
        Ok(Header {
            id: req.id,
            command: req.command,
            size: message_size(payload_len)?,
            msg_type: MsgType::Reply,
            no_reply: false,
            error: false,
            errno: 0,
        })
    }

    /// An error reply to `req`; per the spec it carries no payload.
    pub fn error_reply_to(req: &Header, errno: i32) -> Header {
        Header {
            id: req.id,
            command: req.command,
            size: HEADER_SIZE as u32,
            msg_type: MsgType::Reply,
            no_reply: false,
            error: true,
            errno: errno.max(0) as u32,
        }
    }

    pub fn payload_len(&self) -> usize {
        self.size as usize - HEADER_SIZE
    }

    pub fn command_kind(&self) -> Option<Command> {
        Command::from_u16(self.command)
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut flags = match self.msg_type {
            MsgType::Command => 0,
            MsgType::Reply => FLAG_TYPE_REPLY,
        };
        if self.no_reply {
            flags |= FLAG_NO_REPLY;
        }
        if self.error {
            flags |= FLAG_ERROR;
        }
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.errno.to_le_bytes());
        b
    }

    /// Decodes and validates a header; `max_size` bounds the message size it announces.
    pub fn decode(b: &[u8; HEADER_SIZE], max_size: usize) -> Result<Header> {
        let id = u16::from_le_bytes([b[0], b[1]]);
        let command = u16::from_le_bytes([b[2], b[3]]);
        let size = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let flags = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let errno = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        if (size as usize) < HEADER_SIZE {
            return Err(malformed(format!(
                "message size {size} is smaller than the {HEADER_SIZE}-byte header"
            )));
        }
        if size as usize > max_size {
            return Err(Error::TooLarge {
                size: size.into(),
                max: max_size as u64,
            });
        }
        if flags & !FLAGS_KNOWN != 0 {
            return Err(malformed(format!("unknown header flags {flags:#x}")));
        }
        let msg_type = match flags & FLAG_TYPE_MASK {
            0 => MsgType::Command,
            FLAG_TYPE_REPLY => MsgType::Reply,
            t => return Err(malformed(format!("unknown message type {t}"))),
        };
        Ok(Header {
            id,
            command,
            size,
            msg_type,
            no_reply: flags & FLAG_NO_REPLY != 0,
            error: flags & FLAG_ERROR != 0,
            errno,
        })
    }
}

fn message_size(payload_len: usize) -> Result<u32> {
    let size = payload_len.saturating_add(HEADER_SIZE);
    if size > MAX_MSG_SIZE {
        return Err(Error::TooLarge {
            size: size as u64,
            max: MAX_MSG_SIZE as u64,
        });
    }
    // MAX_MSG_SIZE fits in u32, so this cannot truncate.
    Ok(size as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_numbers_match_spec() {
        assert_eq!(Command::DeviceReset as u16, 13);
        assert_eq!(Command::DeviceFeature as u16, 16);
        assert_eq!(Command::MigDataWrite as u16, 18);
        assert_eq!(Command::from_u16(14), None);
        for c in Command::ALL {
            assert_eq!(Command::from_u16(c as u16), Some(c));
        }
    }

    #[test]
    fn header_round_trip() {
        let mut h = Header::request(0xbeef, Command::RegionWrite, 24).unwrap();
        h.no_reply = true;
        let d = Header::decode(&h.encode(), MAX_MSG_SIZE).unwrap();
        assert_eq!(d, h);
        let e = Header::error_reply_to(&h, libc::EINVAL);
        let d = Header::decode(&e.encode(), MAX_MSG_SIZE).unwrap();
        assert_eq!(d, e);
        assert!(d.error && d.msg_type == MsgType::Reply && d.errno == libc::EINVAL as u32);
    }

    #[test]
    fn header_refuses_bad_sizes_and_flags() {
        let mut b = Header::request(1, Command::Version, 0).unwrap().encode();
        b[4..8].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(
            Header::decode(&b, MAX_MSG_SIZE),
            Err(Error::Malformed(_))
        ));
        b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Header::decode(&b, MAX_MSG_SIZE),
            Err(Error::TooLarge { .. })
        ));
        b[4..8].copy_from_slice(&16u32.to_le_bytes());
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            Header::decode(&b, MAX_MSG_SIZE),
            Err(Error::Malformed(_))
        ));
        b[8..12].copy_from_slice(&(1u32 << 9).to_le_bytes());
        assert!(matches!(
            Header::decode(&b, MAX_MSG_SIZE),
            Err(Error::Malformed(_))
        ));
        assert!(Header::request(1, Command::RegionWrite, MAX_MSG_SIZE).is_err());
    }
}
