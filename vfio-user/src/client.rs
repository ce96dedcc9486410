//! The VMM side of vfio-user: one request at a time on a UNIX socket, every reply checked
//! against the request that caused it.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::caps::{Capabilities, VersionInfo};
use crate::error::{CommandName, Error, Result, malformed};
use crate::header::{
    Command, HEADER_SIZE, Header, MAX_DATA_XFER_SIZE, MAX_MSG_FDS, MAX_MSG_SIZE, MsgType,
};
use crate::messages::{
    DeviceInfo, DmaMap, DmaProt, DmaUnmap, IrqInfo, IrqSet, REGION_ACCESS_HEADER_SIZE,
    RegionAccess, RegionInfoRequest, Version,
};
use crate::region::{REGION_INFO_SIZE, RegionInfo};
use crate::transport::{Message, is_timeout, recv_message, send_message};
use crate::vfio::{VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

const PROTOCOL_MAJOR: u16 = 0;
const PROTOCOL_MINOR: u16 = 1;
/// First guess at the room a region's capability list needs; the reply says if it needs more.
const REGION_INFO_FIRST_ARGSZ: u32 = 512;
/// Upper bound on a region-info reply we are willing to fetch.
const REGION_INFO_MAX_ARGSZ: u32 = 64 * 1024;
/// Sanity bounds on counts a device reports (vfio-pci has 9 regions and 5 IRQ types).
const MAX_REGIONS: u32 = 64;
const MAX_IRQ_TYPES: u32 = 16;
/// MSI-X allows at most 2048 vectors; no IRQ index can have more.
const MAX_IRQS_PER_INDEX: u32 = 2048;
/// Server-to-client commands tolerated while waiting for one reply.
const MAX_INTERLEAVED_REQUESTS: usize = 16;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long one request may wait for its reply before the device counts as lost.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A connected, version-negotiated vfio-user client. `Sync`: vCPU threads may share it; requests
/// are serialized by an internal mutex.
pub struct Client {
    inner: Mutex<Inner>,
    version: VersionInfo,
    timeout: Duration,
    /// Largest data transfer both sides accept.
    max_xfer: usize,
    /// Most fds the server accepts in one message.
    server_max_fds: usize,
}

struct Inner {
    stream: UnixStream,
    next_id: u16,
    failed: Option<Failure>,
}

enum Failure {
    Lost,
    Broken(String),
}

impl Client {
    /// Connects to the server socket at `path` and negotiates the protocol version.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        Self::connect_with(path, ClientOptions::default())
    }

    pub fn connect_with(path: impl AsRef<Path>, opts: ClientOptions) -> Result<Client> {
        let stream = UnixStream::connect(path.as_ref())?;
        Self::from_stream(stream, opts)
    }

    /// Negotiates over an already connected socket (e.g. one end of a socketpair).
    pub fn from_stream(stream: UnixStream, opts: ClientOptions) -> Result<Client> {
        if opts.timeout.is_zero() {
            return Err(Error::InvalidArgument("zero timeout".into()));
        }
        // A server that stops reading must not block a vCPU forever in sendmsg either.
        stream.set_write_timeout(Some(opts.timeout))?;
        let mut client = Client {
            inner: Mutex::new(Inner {
                stream,
                next_id: 0,
                failed: None,
            }),
            version: VersionInfo {
                major: PROTOCOL_MAJOR,
                minor: PROTOCOL_MINOR,
                server: Capabilities::default(),
            },
            timeout: opts.timeout,
            max_xfer: MAX_DATA_XFER_SIZE,
            server_max_fds: 1,
        };
        client.negotiate()?;
        Ok(client)
    }

    fn negotiate(&mut self) -> Result<()> {
        let ours = Version {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            caps: Capabilities {
                max_msg_fds: Some(MAX_MSG_FDS as u64),
                max_data_xfer_size: Some(MAX_DATA_XFER_SIZE as u64),
                ..Default::default()
            },
        };
        let m = self.request(Command::Version, &ours.encode(), &[], MAX_MSG_SIZE, 0)?;
        let theirs = Version::decode(&m.payload)?;
        if theirs.major != PROTOCOL_MAJOR || theirs.minor > PROTOCOL_MINOR {
            return Err(Error::Version {
                major: theirs.major,
                minor: theirs.minor,
            });
        }
        let (fds, xfer) = (theirs.caps.max_msg_fds(), theirs.caps.max_data_xfer_size());
        if fds == 0 || xfer == 0 {
            return Err(malformed(format!(
                "server capabilities max_msg_fds={fds} max_data_xfer_size={xfer} are unusable"
            )));
        }
        self.server_max_fds = fds.min(MAX_MSG_FDS);
        self.max_xfer = xfer.min(MAX_DATA_XFER_SIZE);
        self.version = VersionInfo {
            major: theirs.major,
            minor: theirs.minor,
            server: theirs.caps,
        };
        log::debug!("vfio-user: negotiated {:?}", self.version);
        Ok(())
    }

    /// The negotiated version and the server's stated capabilities.
    pub fn version(&self) -> &VersionInfo {
        &self.version
    }

    /// Largest data transfer per message, after negotiation.
    pub fn max_data_xfer_size(&self) -> usize {
        self.max_xfer
    }

    pub fn device_info(&self) -> Result<DeviceInfo> {
        let req = DeviceInfo::request().encode();
        let m = self.request(Command::DeviceGetInfo, &req, &[], 64, 0)?;
        let info = DeviceInfo::decode(&m.payload)?;
        if info.num_regions > MAX_REGIONS || info.num_irqs > MAX_IRQ_TYPES {
            return Err(malformed(format!(
                "device claims {} regions and {} IRQ types",
                info.num_regions, info.num_irqs
            )));
        }
        Ok(info)
    }

    /// Describes region `index`, with its capabilities and, if mmappable, its fd.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let mut argsz = REGION_INFO_FIRST_ARGSZ;
        // At most one retry: the first reply states the full size it needs.
        for _ in 0..2 {
            let req = RegionInfoRequest { argsz, index }.encode();
            let m = self.request(Command::DeviceGetRegionInfo, &req, &[], argsz as usize, 1)?;
            let p = &m.payload;
            if p.len() < REGION_INFO_SIZE {
                return Err(malformed(format!("{}-byte region info reply", p.len())));
            }
            let need = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
            if need as usize > p.len() {
                if need > REGION_INFO_MAX_ARGSZ {
                    return Err(malformed(format!("region info needs {need} bytes")));
                }
                argsz = need;
                continue;
            }
            let info = RegionInfo::decode(&p[..need.max(REGION_INFO_SIZE as u32) as usize], m.fds)?;
            if info.index != index {
                return Err(malformed(format!(
                    "asked for region {index}, reply describes region {}",
                    info.index
                )));
            }
            return Ok(info);
        }
        Err(malformed("region info reply keeps growing"))
    }

    pub fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        let req = IrqInfo::request(index).encode();
        let m = self.request(
            Command::DeviceGetIrqInfo,
            &req,
            &[],
            IrqInfo::SIZE as usize,
            0,
        )?;
        let info = IrqInfo::decode(&m.payload)?;
        if info.index != index || info.count > MAX_IRQS_PER_INDEX {
            return Err(malformed(format!(
                "IRQ info for index {index} came back as index {} with {} interrupts",
                info.index, info.count
            )));
        }
        Ok(info)
    }

    /// Reads `data.len()` bytes at `offset` of region `index`, split into transfers the server
    /// accepts.
    pub fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        check_range(offset, data.len())?;
        let mut done = 0;
        for chunk in data.chunks_mut(self.max_xfer) {
            let a = RegionAccess {
                offset: offset + done as u64,
                region: index,
                count: chunk.len() as u32,
            };
            let limit = REGION_ACCESS_HEADER_SIZE + chunk.len();
            let m = self.request(Command::RegionRead, &a.encode(&[]), &[], limit, 0)?;
            let (r, bytes) = RegionAccess::decode(&m.payload, true)?;
            if r != a {
                return Err(malformed(format!("read reply {r:?} does not match {a:?}")));
            }
            chunk.copy_from_slice(bytes);
            done += chunk.len();
        }
        Ok(())
    }

    /// Writes `data` at `offset` of region `index`.
    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len())?;
        let mut done = 0;
        for chunk in data.chunks(self.max_xfer) {
            let a = RegionAccess {
                offset: offset + done as u64,
                region: index,
                count: chunk.len() as u32,
            };
            let limit = REGION_ACCESS_HEADER_SIZE;
            let m = self.request(Command::RegionWrite, &a.encode(chunk), &[], limit, 0)?;
            let (r, _) = RegionAccess::decode(&m.payload, false)?;
            if r != a {
                return Err(malformed(format!("write reply {r:?} does not match {a:?}")));
            }
            done += chunk.len();
        }
        Ok(())
    }

    /// Lets the server DMA to `[iova, iova+size)` by mmapping `fd` at `file_offset`.
    pub fn dma_map(
        &self,
        iova: u64,
        size: u64,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        prot: DmaProt,
    ) -> Result<()> {
        if size == 0 || iova.checked_add(size).is_none() {
            return Err(Error::InvalidArgument(format!(
                "DMA range {iova:#x}+{size:#x}"
            )));
        }
        let map = DmaMap {
            prot,
            offset: file_offset,
            address: iova,
            size,
        };
        let m = self.request(Command::DmaMap, &map.encode(), &[fd], 0, 0)?;
        expect_empty(&m)
    }

    /// Withdraws a mapping made by `dma_map` (the range must match it exactly).
    pub fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        let u = DmaUnmap::new(iova, size);
        let limit = DmaUnmap::SIZE as usize;
        let m = self.request(Command::DmaUnmap, &u.encode(), &[], limit, 0)?;
        // The spec says the reply echoes the request; some servers send nothing.
        if !m.payload.is_empty() && DmaUnmap::decode(&m.payload)? != u {
            return Err(malformed("DMA_UNMAP reply does not echo the request"));
        }
        Ok(())
    }

    /// Routes interrupts `start..start+fds.len()` of IRQ `index` to `fds` (eventfds).
    pub fn set_irqs(&self, index: u32, start: u32, fds: &[BorrowedFd<'_>]) -> Result<()> {
        if fds.is_empty() {
            return Err(Error::InvalidArgument("no eventfds; use unset_irqs".into()));
        }
        for (i, chunk) in fds.chunks(self.server_max_fds).enumerate() {
            let first = (i * self.server_max_fds) as u32;
            let s = IrqSet {
                flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                index,
                start: start.checked_add(first).ok_or_else(|| {
                    Error::InvalidArgument(format!("IRQ start {start} overflows"))
                })?,
                count: chunk.len() as u32,
                data: Vec::new(),
            };
            self.set_irqs_raw(&s, chunk)?;
        }
        Ok(())
    }

    /// `set_irqs` for vmm-sys-util eventfds.
    pub fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[&EventFd]) -> Result<()> {
        let borrowed: Vec<BorrowedFd<'_>> = fds
            .iter()
            // SAFETY: each EventFd owns its fd and outlives `borrowed`, which is dropped at the
            // end of this function.
            .map(|e| unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) })
            .collect();
        self.set_irqs(index, start, &borrowed)
    }

    /// Detaches the eventfds of interrupts `start..start+count` of IRQ `index`.
    pub fn unset_irqs(&self, index: u32, start: u32, count: u32) -> Result<()> {
        let s = IrqSet {
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            count,
            data: Vec::new(),
        };
        self.set_irqs_raw(&s, &[])
    }

    /// Disables every interrupt of IRQ `index` (count 0 with DATA_NONE).
    pub fn disable_irqs(&self, index: u32) -> Result<()> {
        let s = IrqSet {
            flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: 0,
            data: Vec::new(),
        };
        self.set_irqs_raw(&s, &[])
    }

    /// Sends one `DEVICE_SET_IRQS` as given (mask/unmask/trigger variants).
    pub fn set_irqs_raw(&self, set: &IrqSet, fds: &[BorrowedFd<'_>]) -> Result<()> {
        if fds.len() > self.server_max_fds {
            return Err(Error::InvalidArgument(format!(
                "{} fds in one message; the server accepts {}",
                fds.len(),
                self.server_max_fds
            )));
        }
        let m = self.request(Command::DeviceSetIrqs, &set.encode(), fds, 0, 0)?;
        expect_empty(&m)
    }

    pub fn reset(&self) -> Result<()> {
        let m = self.request(Command::DeviceReset, &[], &[], 0, 0)?;
        expect_empty(&m)
    }

    /// Sends one request and returns its checked reply: same id and command, no error bit, at
    /// most `max_reply` payload bytes and `max_fds` fds. For commands without a typed wrapper.
    pub fn request(
        &self,
        cmd: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        max_reply: usize,
        max_fds: usize,
    ) -> Result<Message> {
        let mut inner = self.lock();
        match &inner.failed {
            Some(Failure::Lost) => return Err(Error::DeviceLost),
            Some(Failure::Broken(why)) => return Err(Error::Broken(why.clone())),
            None => {}
        }
        let id = inner.next_id;
        inner.next_id = id.wrapping_add(1);
        let hdr = Header::request(id, cmd, payload.len())?;
        let deadline = Instant::now() + self.timeout;
        let res = inner.exchange(&hdr, payload, fds, max_reply, max_fds, deadline);
        res.map_err(|e| {
            let e = if is_timeout(&e) {
                Error::Timeout {
                    command: CommandName(cmd as u16),
                    after: self.timeout,
                }
            } else {
                e
            };
            inner.note_failure(&e);
            e
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave Inner half-updated in a way that matters: the failure
        // state is set before any error is returned.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn exchange(
        &mut self,
        hdr: &Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        max_reply: usize,
        max_fds: usize,
        deadline: Instant,
    ) -> Result<Message> {
        send_message(&self.stream, hdr, payload, fds)?;
        for _ in 0..MAX_INTERLEAVED_REQUESTS {
            let Some(m) = recv_message(&self.stream, MAX_MSG_SIZE, max_fds, Some(deadline))? else {
                return Err(Error::DeviceLost);
            };
            if m.header.msg_type == MsgType::Command {
                self.refuse_server_command(&m.header)?;
                continue;
            }
            return check_reply(hdr, m, max_reply);
        }
        Err(malformed(
            "server keeps sending commands instead of a reply",
        ))
    }

    /// DMA_READ/WRITE from the server are not supported: guest memory is shared by fd.
    fn refuse_server_command(&mut self, h: &Header) -> Result<()> {
        log::warn!(
            "vfio-user: refusing {} from the server",
            CommandName(h.command)
        );
        if h.no_reply {
            return Ok(());
        }
        send_message(
            &self.stream,
            &Header::error_reply_to(h, libc::ENOTSUP),
            &[],
            &[],
        )
    }

    fn note_failure(&mut self, e: &Error) {
        self.failed = match e {
            // The request was refused or never sent; the stream is still in step.
            Error::Remote { .. } | Error::InvalidArgument(_) => return,
            Error::DeviceLost => Some(Failure::Lost),
            other => Some(Failure::Broken(other.to_string())),
        };
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn check_reply(sent: &Header, m: Message, max_reply: usize) -> Result<Message> {
    let h = &m.header;
    if h.id != sent.id || h.command != sent.command {
        return Err(Error::ReplyMismatch {
            sent_id: sent.id,
            sent_cmd: CommandName(sent.command),
            got_id: h.id,
            got_cmd: CommandName(h.command),
        });
    }
    if h.error {
        return Err(Error::Remote {
            command: CommandName(h.command),
            errno: h.errno as i32,
        });
    }
    if m.payload.len() > max_reply {
        return Err(Error::TooLarge {
            size: (HEADER_SIZE + m.payload.len()) as u64,
            max: (HEADER_SIZE + max_reply) as u64,
        });
    }
    Ok(m)
}

fn expect_empty(m: &Message) -> Result<()> {
    if m.payload.is_empty() {
        Ok(())
    } else {
        Err(malformed(format!(
            "{} reply carries {} unexpected bytes",
            CommandName(m.header.command),
            m.payload.len()
        )))
    }
}

fn check_range(offset: u64, len: usize) -> Result<()> {
    if offset.checked_add(len as u64).is_none() {
        return Err(Error::InvalidArgument(format!(
            "access of {len} bytes at {offset:#x} wraps"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_is_shareable_between_vcpu_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Client>();
    }
}
