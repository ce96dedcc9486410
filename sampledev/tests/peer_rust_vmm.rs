//! Interop with an independent vfio-user implementation: the rust-vmm `vfio_user` crate from
//! crates.io (0.1.7; renamed `rust_vmm_vfio_user` here because our protocol crate has the same
//! name). Until now minivmm's client and sampledev were only ever tested against each other, so
//! a shared misreading of the spec would have passed unnoticed.
//!
//! - `rust_vmm_server_*`: the crate's `Server` + `ServerBackend` host `TestDevice`, a small PCI
//!   function defined below, on a thread; minivmm's `vfio_user::Client` drives it over a real
//!   UNIX socket.
//! - `rust_vmm_client_*`: the crate's `Client` drives the real sampledev binary, started as a
//!   separate process the way the other sampledev tests start it.
//!
//! What the rust-vmm crate (0.1.7) lacks, and so what these tests leave undriven:
//! - Its `Command` enum stops at 14 (the old DIRTY_PAGES): there is no
//!   VFIO_USER_REGION_WRITE_MULTI (15), VFIO_USER_DEVICE_FEATURE (16),
//!   VFIO_USER_MIG_DATA_READ (17) or VFIO_USER_MIG_DATA_WRITE (18). Its client cannot send them
//!   and its server answers them as unknown commands (without reading their payload, which then
//!   desynchronises the stream), so migration v2 (device state arcs, the data stream) and DMA
//!   dirty-page logging are not exercised against it at all. Nothing here fakes them.
//! - GET_REGION_IO_FDS and DMA_READ/DMA_WRITE: its server refuses them and its client has no
//!   request for them. (minivmm's client refuses server-initiated DMA_READ/WRITE anyway.)
//! - Its client keeps DEVICE_GET_INFO's counts and the negotiated version private (only
//!   `region()` and `resettable()` are public), so the sampledev tests check those indirectly:
//!   every region came back, and sampledev (which serves nothing before VERSION) answered.
//! - Its client never looks at the error bit of a reply; it reads the size a success would have.
//!   A refused request would leave it blocked or out of step, so the tests against sampledev
//!   issue only requests that must succeed, under a watchdog that kills sampledev (turning a
//!   block into a failed read) if one does not come back.
//! - Its `Client::resettable()` tests `flags & RESET != RESET`, i.e. the inverse of the flag, so
//!   it is not asserted; DEVICE_RESET itself is.
//! - Its server only puts EINVAL in the error field for the requests it refuses itself; an error
//!   from the backend goes out with the error bit set and errno 0.
//! - Its server refuses SET_IRQS with DATA_BOOL (again without reading the bools), and passes a
//!   region's mmap fd only together with a capability list, so BAR2/BAR4 here have sparse areas.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{Server, eventfd, memfd, read_mem, wait_event};
use rust_vmm_vfio_user as rv;
use sampledev::config::{CMD_BUS_MASTER, CMD_MEMORY, DEVICE_ID, MSIX_CAP, VENDOR_ID};
use sampledev::mig::v1::{V1_REGION_INDEX, V1_REGION_SIZE};
use sampledev::pattern::fill_byte;
use sampledev::regs::*;
use vfio_bindings::bindings::vfio as vb;
use vfio_user::vfio::*;
use vfio_user::{Client, DmaProt, Error, RegionCap, SparseArea};

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Part 1: the rust-vmm server hosts TestDevice; minivmm's client drives it.
// ---------------------------------------------------------------------------------------------

const TEST_VENDOR: u16 = 0x1d0f;
const TEST_DEVICE: u16 = 0xbeef;
const CONFIG_BYTES: usize = 256;
const PCI_COMMAND: usize = 0x04;

/// BAR0: four 64-bit registers.
const BAR0_BYTES: u64 = 0x100;
/// Read-only identification value.
const T_ID: u64 = 0x00;
const T_ID_VALUE: u64 = 0x7e57_de71_ce00_0001;
/// Two read/write scratch registers.
const T_SCRATCH0: u64 = 0x08;
const T_SCRATCH1: u64 = 0x10;
/// Writing N signals the eventfd of MSI-X vector N (from the server thread, before the reply).
const T_DOORBELL: u64 = 0x18;
/// Reads the first 8 bytes of the most recent DMA mapping, through the fd the server got.
const T_DMA_PEEK: u64 = 0x20;

/// BAR2: memory backed by a memfd the server hands out; only its second page is mmappable.
const BAR2_INDEX: u32 = 2;
const BAR2_BYTES: u64 = 0x2000;
const BAR2_SPARSE: (u64, u64) = (0x1000, 0x1000);

/// BAR4: mmappable in so many small pieces that its region info does not fit the 512 bytes
/// minivmm's client offers first, so the client has to ask again with the size the reply names.
const BAR4_INDEX: u32 = 4;
const BAR4_BYTES: u64 = 2 * BAR4_AREAS * BAR4_AREA_BYTES;
const BAR4_AREAS: u64 = 40;
const BAR4_AREA_BYTES: u64 = 0x100;

const MSIX_COUNT: u32 = 2;

#[derive(Debug)]
struct Mapping {
    flags: u32,
    offset: u64,
    iova: u64,
    size: u64,
    fd: Option<File>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SetIrqsCall {
    index: u32,
    flags: u32,
    start: u32,
    count: u32,
    fds: usize,
}

/// Everything the device saw, shared with the test.
#[derive(Debug)]
struct DeviceState {
    config: [u8; CONFIG_BYTES],
    scratch: [u64; 2],
    msix: Vec<Option<File>>,
    set_irqs: Vec<SetIrqsCall>,
    maps: Vec<Mapping>,
    unmaps: Vec<(u32, u64, u64)>,
    resets: u32,
}

impl DeviceState {
    fn new() -> DeviceState {
        let mut config = [0u8; CONFIG_BYTES];
        config[0..2].copy_from_slice(&TEST_VENDOR.to_le_bytes());
        config[2..4].copy_from_slice(&TEST_DEVICE.to_le_bytes());
        config[0x0b] = 0xff; // class: unassigned
        DeviceState {
            config,
            scratch: [0; 2],
            msix: (0..MSIX_COUNT).map(|_| None).collect(),
            set_irqs: Vec::new(),
            maps: Vec::new(),
            unmaps: Vec::new(),
            resets: 0,
        }
    }
}

fn einval(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string())
}

fn in_bounds(offset: u64, len: usize, size: u64) -> bool {
    len > 0
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
}

struct TestDevice {
    state: Arc<Mutex<DeviceState>>,
    bar2: File,
}

impl TestDevice {
    fn state(&self) -> MutexGuard<'_, DeviceState> {
        self.state.lock().expect("device state lock")
    }

    fn bar0_value(&self, slot: u64) -> std::io::Result<u64> {
        let s = self.state();
        Ok(match slot {
            T_ID => T_ID_VALUE,
            T_SCRATCH0 => s.scratch[0],
            T_SCRATCH1 => s.scratch[1],
            T_DOORBELL => 0,
            T_DMA_PEEK => {
                let m = s.maps.last().ok_or_else(|| einval("nothing mapped"))?;
                let fd = m.fd.as_ref().ok_or_else(|| einval("mapping without fd"))?;
                let mut b = [0u8; 8];
                fd.read_exact_at(&mut b, m.offset)?;
                u64::from_le_bytes(b)
            }
            _ => 0,
        })
    }
}

impl rv::ServerBackend for TestDevice {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        match region {
            VFIO_PCI_BAR0_REGION_INDEX => {
                let at = (offset & 7) as usize;
                if !in_bounds(offset, data.len(), BAR0_BYTES) || at + data.len() > 8 {
                    return Err(einval("BAR0 access outside one register"));
                }
                let v = self.bar0_value(offset & !7)?.to_le_bytes();
                data.copy_from_slice(&v[at..at + data.len()]);
            }
            BAR2_INDEX if in_bounds(offset, data.len(), BAR2_BYTES) => {
                self.bar2.read_exact_at(data, offset)?;
            }
            VFIO_PCI_CONFIG_REGION_INDEX if in_bounds(offset, data.len(), CONFIG_BYTES as u64) => {
                let o = offset as usize;
                data.copy_from_slice(&self.state().config[o..o + data.len()]);
            }
            _ => return Err(einval("read outside the device's regions")),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        match region {
            VFIO_PCI_BAR0_REGION_INDEX => {
                let at = (offset & 7) as usize;
                if !in_bounds(offset, data.len(), BAR0_BYTES) || at + data.len() > 8 {
                    return Err(einval("BAR0 access outside one register"));
                }
                let slot = offset & !7;
                let mut b = self.bar0_value(slot)?.to_le_bytes();
                b[at..at + data.len()].copy_from_slice(data);
                let v = u64::from_le_bytes(b);
                let mut s = self.state();
                match slot {
                    T_SCRATCH0 => s.scratch[0] = v,
                    T_SCRATCH1 => s.scratch[1] = v,
                    T_DOORBELL => {
                        let fd = s
                            .msix
                            .get_mut(v as usize)
                            .ok_or_else(|| einval("no such vector"))?
                            .as_mut()
                            .ok_or_else(|| einval("vector has no eventfd"))?;
                        fd.write_all(&1u64.to_ne_bytes())?;
                    }
                    // ID and DMA_PEEK are read-only.
                    _ => {}
                }
            }
            BAR2_INDEX if in_bounds(offset, data.len(), BAR2_BYTES) => {
                self.bar2.write_all_at(data, offset)?;
            }
            VFIO_PCI_CONFIG_REGION_INDEX if in_bounds(offset, data.len(), CONFIG_BYTES as u64) => {
                // Only the command register is writable.
                let mut s = self.state();
                for (i, &byte) in data.iter().enumerate() {
                    let o = offset as usize + i;
                    if (PCI_COMMAND..PCI_COMMAND + 2).contains(&o) {
                        s.config[o] = byte;
                    }
                }
            }
            _ => return Err(einval("write outside the device's regions")),
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: rv::DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        self.state().maps.push(Mapping {
            flags: flags.bits(),
            offset,
            iova: address,
            size,
            fd,
        });
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        flags: rv::DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> std::io::Result<()> {
        let mut s = self.state();
        s.unmaps.push((flags.bits(), address, size));
        let before = s.maps.len();
        s.maps.retain(|m| (m.iova, m.size) != (address, size));
        if s.maps.len() == before {
            return Err(einval("no such mapping"));
        }
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        let mut s = self.state();
        s.resets += 1;
        s.scratch = [0; 2];
        s.config[PCI_COMMAND..PCI_COMMAND + 2].fill(0);
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        let mut s = self.state();
        s.set_irqs.push(SetIrqsCall {
            index,
            flags,
            start,
            count,
            fds: fds.len(),
        });
        if index != vb::VFIO_PCI_MSIX_IRQ_INDEX {
            return Err(einval("only MSI-X has vectors"));
        }
        let data = flags & vb::VFIO_IRQ_SET_DATA_TYPE_MASK;
        if data == vb::VFIO_IRQ_SET_DATA_NONE && count == 0 {
            s.msix.iter_mut().for_each(|v| *v = None);
            return Ok(());
        }
        let end = start
            .checked_add(count)
            .filter(|&e| e <= MSIX_COUNT)
            .ok_or_else(|| einval("vectors out of range"))?;
        if data != vb::VFIO_IRQ_SET_DATA_EVENTFD {
            return Err(einval("only eventfds are supported"));
        }
        if fds.is_empty() {
            (start..end).for_each(|v| s.msix[v as usize] = None);
        } else if fds.len() == count as usize {
            for (v, fd) in (start..end).zip(fds) {
                s.msix[v as usize] = Some(fd);
            }
        } else {
            return Err(einval("fd count differs from the vector count"));
        }
        Ok(())
    }
}

fn region(index: u32, size: u64, flags: u32) -> rv::ServerRegion {
    rv::ServerRegion {
        region_info: vb::vfio_region_info {
            argsz: std::mem::size_of::<vb::vfio_region_info>() as u32,
            flags,
            index,
            cap_offset: 0,
            size,
            offset: 0,
        },
        sparse_areas: Vec::new(),
        mmap_fd: None,
    }
}

/// The rust-vmm server on its thread, with the device state it records into.
struct RustVmmServer {
    state: Arc<Mutex<DeviceState>>,
    /// The server's end of BAR2 and BAR4 (the memfds it passes to clients).
    bar2: File,
    bar4: File,
    socket: PathBuf,
    thread: Option<JoinHandle<Result<(), rv::Error>>>,
    _dir: tempfile::TempDir,
}

impl RustVmmServer {
    fn start() -> RustVmmServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("rust-vmm.sock");
        let bar2 = memfd(BAR2_BYTES);
        let rw = vb::VFIO_REGION_INFO_FLAG_READ | vb::VFIO_REGION_INFO_FLAG_WRITE;
        let mut regions: Vec<rv::ServerRegion> = (0..vb::VFIO_PCI_NUM_REGIONS)
            .map(|i| region(i, 0, 0))
            .collect();
        regions[vb::VFIO_PCI_BAR0_REGION_INDEX as usize] =
            region(vb::VFIO_PCI_BAR0_REGION_INDEX, BAR0_BYTES, rw);
        let mut bar2_region = region(BAR2_INDEX, BAR2_BYTES, rw | vb::VFIO_REGION_INFO_FLAG_MMAP);
        bar2_region.sparse_areas = vec![rv::SparseArea {
            area: vb::vfio_region_sparse_mmap_area {
                offset: BAR2_SPARSE.0,
                size: BAR2_SPARSE.1,
            },
        }];
        bar2_region.mmap_fd = Some(bar2.as_raw_fd());
        regions[BAR2_INDEX as usize] = bar2_region;
        let bar4 = memfd(BAR4_BYTES);
        let mut bar4_region = region(BAR4_INDEX, BAR4_BYTES, rw | vb::VFIO_REGION_INFO_FLAG_MMAP);
        bar4_region.sparse_areas = (0..BAR4_AREAS)
            .map(|i| rv::SparseArea {
                area: vb::vfio_region_sparse_mmap_area {
                    offset: 2 * i * BAR4_AREA_BYTES,
                    size: BAR4_AREA_BYTES,
                },
            })
            .collect();
        bar4_region.mmap_fd = Some(bar4.as_raw_fd());
        regions[BAR4_INDEX as usize] = bar4_region;
        regions[vb::VFIO_PCI_CONFIG_REGION_INDEX as usize] =
            region(vb::VFIO_PCI_CONFIG_REGION_INDEX, CONFIG_BYTES as u64, rw);
        let irqs = (0..vb::VFIO_PCI_NUM_IRQS)
            .map(|index| match index {
                vb::VFIO_PCI_MSIX_IRQ_INDEX => rv::IrqInfo {
                    index,
                    flags: vb::VFIO_IRQ_INFO_EVENTFD | vb::VFIO_IRQ_INFO_NORESIZE,
                    count: MSIX_COUNT,
                },
                _ => rv::IrqInfo {
                    index,
                    flags: 0,
                    count: 0,
                },
            })
            .collect();
        let server = rv::Server::new(&socket, true, irqs, regions).expect("rust-vmm Server::new");
        let state = Arc::new(Mutex::new(DeviceState::new()));
        let mut device = TestDevice {
            state: state.clone(),
            bar2: bar2.try_clone().expect("dup BAR2 memfd"),
        };
        let thread = thread::Builder::new()
            .name("rust-vmm-server".into())
            .spawn(move || server.run(&mut device))
            .expect("spawn server thread");
        RustVmmServer {
            state,
            bar2,
            bar4,
            socket,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn connect(&self) -> Client {
        Client::connect(&self.socket).expect("minivmm client connects to the rust-vmm server")
    }

    fn state(&self) -> MutexGuard<'_, DeviceState> {
        self.state.lock().expect("device state lock")
    }

    /// Disconnects `client` and checks that the server saw a clean end of the connection.
    fn finish(mut self, client: Client) {
        drop(client);
        let thread = self.thread.take().expect("server thread");
        let deadline = Instant::now() + WAIT;
        while !thread.is_finished() {
            assert!(Instant::now() < deadline, "rust-vmm server did not end");
            thread::sleep(Duration::from_millis(5));
        }
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("rust-vmm server failed: {e}"),
            Err(_) => panic!("rust-vmm server thread panicked"),
        }
    }
}

fn rd64(c: &Client, region: u32, off: u64) -> u64 {
    let mut b = [0u8; 8];
    c.region_read(region, off, &mut b).expect("region read");
    u64::from_le_bytes(b)
}

fn wr64(c: &Client, region: u32, off: u64, v: u64) {
    c.region_write(region, off, &v.to_le_bytes())
        .expect("region write");
}

fn same_file(a: &File, b: &File) -> bool {
    let (ma, mb) = (a.metadata().expect("fstat"), b.metadata().expect("fstat"));
    (ma.dev(), ma.ino()) == (mb.dev(), mb.ino())
}

#[test]
fn rust_vmm_server_negotiates_and_describes_the_device() {
    let srv = RustVmmServer::start();
    let c = srv.connect();

    // rust-vmm answers 0.0 and states its (fixed) capabilities.
    let v = c.version();
    assert_eq!((v.major, v.minor), (0, 0));
    assert_eq!(v.server.max_msg_fds, Some(1));
    assert_eq!(v.server.max_data_xfer_size, Some(1 << 20));
    assert!(
        v.server.migration.is_some(),
        "rust-vmm states migration.pgsize"
    );
    assert_eq!(c.max_data_xfer_size(), 1 << 20);

    let info = c.device_info().expect("DEVICE_GET_INFO");
    assert_eq!(info.flags, VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET);
    assert_eq!(
        (info.num_regions, info.num_irqs),
        (VFIO_PCI_NUM_REGIONS, VFIO_PCI_NUM_IRQS)
    );

    let bar0 = c
        .region_info(VFIO_PCI_BAR0_REGION_INDEX)
        .expect("BAR0 info");
    assert_eq!((bar0.index, bar0.size), (0, BAR0_BYTES));
    assert!(bar0.readable() && bar0.writable() && !bar0.mmappable());
    assert!(bar0.caps.is_empty() && bar0.fd.is_none());

    // BAR2 comes with a sparse-mmap capability and the memfd behind it.
    let bar2 = c.region_info(BAR2_INDEX).expect("BAR2 info");
    assert_eq!(
        (bar2.index, bar2.size, bar2.offset),
        (BAR2_INDEX, BAR2_BYTES, 0)
    );
    assert!(bar2.flags & VFIO_REGION_INFO_FLAG_CAPS != 0);
    assert!(bar2.mmappable());
    assert_eq!(
        bar2.caps,
        vec![RegionCap::SparseMmap(vec![SparseArea {
            offset: BAR2_SPARSE.0,
            size: BAR2_SPARSE.1
        }])]
    );
    let fd = File::from(bar2.fd.expect("BAR2 fd"));
    assert!(
        same_file(&fd, &srv.bar2),
        "BAR2 fd is not the server's memfd"
    );
    srv.bar2
        .write_all_at(b"server side", BAR2_SPARSE.0)
        .expect("write BAR2");
    let mut seen = [0u8; 11];
    fd.read_exact_at(&mut seen, BAR2_SPARSE.0)
        .expect("read BAR2 fd");
    assert_eq!(&seen, b"server side");

    let config = c
        .region_info(VFIO_PCI_CONFIG_REGION_INDEX)
        .expect("config info");
    assert_eq!(config.size, CONFIG_BYTES as u64);
    // 40 sparse areas: 688 bytes of region info, more than the 512 minivmm asks for first.
    let bar4 = c.region_info(BAR4_INDEX).expect("BAR4 info");
    assert_eq!((bar4.index, bar4.size), (BAR4_INDEX, BAR4_BYTES));
    let want: Vec<SparseArea> = (0..BAR4_AREAS)
        .map(|i| SparseArea {
            offset: 2 * i * BAR4_AREA_BYTES,
            size: BAR4_AREA_BYTES,
        })
        .collect();
    assert_eq!(bar4.caps, vec![RegionCap::SparseMmap(want)]);
    let fd = File::from(bar4.fd.expect("BAR4 fd"));
    assert!(
        same_file(&fd, &srv.bar4),
        "BAR4 fd is not the server's memfd"
    );

    for absent in [1, 3, 5, 6, 8] {
        let r = c.region_info(absent).expect("absent region info");
        assert_eq!((r.index, r.size, r.flags), (absent, 0, 0));
    }

    let msix = c.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).expect("MSI-X info");
    assert_eq!(msix.count, MSIX_COUNT);
    assert_eq!(msix.flags, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE);
    let intx = c.irq_info(VFIO_PCI_INTX_IRQ_INDEX).expect("INTx info");
    assert_eq!((intx.index, intx.count), (VFIO_PCI_INTX_IRQ_INDEX, 0));

    srv.finish(c);
}

#[test]
fn rust_vmm_server_region_reads_and_writes() {
    let srv = RustVmmServer::start();
    let c = srv.connect();
    let bar0 = VFIO_PCI_BAR0_REGION_INDEX;

    assert_eq!(rd64(&c, bar0, T_ID), T_ID_VALUE);
    let mut hi = [0u8; 4];
    c.region_read(bar0, T_ID + 4, &mut hi).expect("4-byte read");
    assert_eq!(u32::from_le_bytes(hi), (T_ID_VALUE >> 32) as u32);
    wr64(&c, bar0, T_ID, 0);
    assert_eq!(rd64(&c, bar0, T_ID), T_ID_VALUE, "ID is read-only");

    wr64(&c, bar0, T_SCRATCH0, 0x0123_4567_89ab_cdef);
    wr64(&c, bar0, T_SCRATCH1, 0xfeed_face_dead_beef);
    assert_eq!(rd64(&c, bar0, T_SCRATCH0), 0x0123_4567_89ab_cdef);
    assert_eq!(rd64(&c, bar0, T_SCRATCH1), 0xfeed_face_dead_beef);
    c.region_write(bar0, T_SCRATCH0 + 4, &0x5555_aaaau32.to_le_bytes())
        .expect("4-byte write");
    assert_eq!(rd64(&c, bar0, T_SCRATCH0), 0x5555_aaaa_89ab_cdef);
    assert_eq!(
        srv.state().scratch,
        [0x5555_aaaa_89ab_cdef, 0xfeed_face_dead_beef]
    );

    // Config space: IDs read back, only the command register takes writes.
    let mut ids = [0u8; 4];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut ids)
        .expect("config read");
    assert_eq!(ids[..2], TEST_VENDOR.to_le_bytes());
    assert_eq!(ids[2..], TEST_DEVICE.to_le_bytes());
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0, &[0; 4])
        .expect("config write");
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &0x0006u16.to_le_bytes())
        .expect("config write");
    let mut whole = vec![0u8; CONFIG_BYTES];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut whole)
        .expect("config read");
    assert_eq!(whole[..4], ids);
    assert_eq!(whole[4..6], [0x06, 0x00]);
    assert_eq!(whole[0x0b], 0xff);

    // BAR2 through messages lands in the memfd, and the other way round.
    let pattern: Vec<u8> = (0..BAR2_BYTES).map(|i| (i * 7 + 3) as u8).collect();
    c.region_write(BAR2_INDEX, 0, &pattern).expect("BAR2 write");
    assert_eq!(read_mem(&srv.bar2, 0, BAR2_BYTES as usize), pattern);
    srv.bar2.write_all_at(&[0xa5; 16], 0x1ff0).expect("write");
    let mut tail = [0u8; 16];
    c.region_read(BAR2_INDEX, 0x1ff0, &mut tail)
        .expect("BAR2 read");
    assert_eq!(tail, [0xa5; 16]);

    srv.finish(c);
}

#[test]
fn rust_vmm_server_dma_map_and_unmap() {
    let srv = RustVmmServer::start();
    let c = srv.connect();
    let ram = memfd(1 << 20);
    ram.write_all_at(&0x1122_3344_5566_7788u64.to_le_bytes(), 0x1000)
        .expect("write RAM");
    ram.write_all_at(b"guest data", 0x3000).expect("write RAM");

    const IOVA: u64 = 0x8000_0000;
    const SIZE: u64 = (1 << 20) - 0x1000;
    c.dma_map(IOVA, SIZE, ram.as_fd(), 0x1000, DmaProt::READ_WRITE)
        .expect("DMA_MAP");
    {
        let s = srv.state();
        assert_eq!(s.maps.len(), 1);
        let m = &s.maps[0];
        assert_eq!(
            (m.flags, m.offset, m.iova, m.size),
            (
                VFIO_USER_F_DMA_REGION_READ | VFIO_USER_F_DMA_REGION_WRITE,
                0x1000,
                IOVA,
                SIZE
            )
        );
        let fd = m.fd.as_ref().expect("DMA_MAP carried no fd");
        assert!(same_file(fd, &ram), "server got another file");
        let mut b = [0u8; 10];
        fd.read_exact_at(&mut b, 0x3000)
            .expect("read through the fd");
        assert_eq!(&b, b"guest data");
    }
    // The device itself reads guest memory through the fd it was given.
    assert_eq!(
        rd64(&c, VFIO_PCI_BAR0_REGION_INDEX, T_DMA_PEEK),
        0x1122_3344_5566_7788
    );

    c.dma_map(0x1_0000_0000, 0x1000, ram.as_fd(), 0, DmaProt::READ)
        .expect("read-only DMA_MAP");
    {
        let s = srv.state();
        assert_eq!(s.maps.len(), 2);
        assert_eq!(s.maps[1].flags, VFIO_USER_F_DMA_REGION_READ);
        assert_eq!((s.maps[1].iova, s.maps[1].size), (0x1_0000_0000, 0x1000));
    }

    // The reply echoes the request, which minivmm checks.
    c.dma_unmap(IOVA, SIZE).expect("DMA_UNMAP");
    {
        let s = srv.state();
        assert_eq!(s.unmaps, vec![(0, IOVA, SIZE)]);
        assert_eq!(s.maps.len(), 1);
        assert_eq!(s.maps[0].iova, 0x1_0000_0000);
    }
    // An unmap the backend refuses is an error reply, and the stream stays in step.
    assert!(matches!(c.dma_unmap(IOVA, SIZE), Err(Error::Remote { .. })));
    c.dma_unmap(0x1_0000_0000, 0x1000).expect("DMA_UNMAP");
    assert!(srv.state().maps.is_empty());

    srv.finish(c);
}

#[test]
fn rust_vmm_server_irqs_by_eventfd() {
    let srv = RustVmmServer::start();
    let c = srv.connect();
    let info = c.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).expect("MSI-X info");
    assert_eq!(info.count, 2);

    let e = [eventfd(), eventfd()];
    c.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, &[&e[0], &e[1]])
        .expect("SET_IRQS");
    // The server said max_msg_fds=1, so minivmm sends one SET_IRQS per vector.
    let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    let call = |start, count, fds| SetIrqsCall {
        index: VFIO_PCI_MSIX_IRQ_INDEX,
        flags: trigger,
        start,
        count,
        fds,
    };
    assert_eq!(srv.state().set_irqs, vec![call(0, 1, 1), call(1, 1, 1)]);
    assert!(srv.state().msix.iter().all(Option::is_some));

    // The doorbell write makes the server thread signal the vector's eventfd.
    wr64(&c, VFIO_PCI_BAR0_REGION_INDEX, T_DOORBELL, 1);
    assert!(wait_event(&e[1], WAIT), "vector 1 did not fire");
    assert!(!wait_event(&e[0], Duration::ZERO), "vector 0 fired too");
    wr64(&c, VFIO_PCI_BAR0_REGION_INDEX, T_DOORBELL, 0);
    assert!(wait_event(&e[0], WAIT), "vector 0 did not fire");
    assert!(!wait_event(&e[1], Duration::ZERO), "vector 1 fired again");

    // Detaching vector 1 (eventfd flags, no fds), then disabling everything (DATA_NONE, 0).
    c.unset_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 1, 1).expect("unset");
    {
        let s = srv.state();
        assert!(s.msix[0].is_some() && s.msix[1].is_none());
    }
    c.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX).expect("disable");
    assert_eq!(
        srv.state().set_irqs[2..],
        [
            call(1, 1, 0),
            SetIrqsCall {
                index: VFIO_PCI_MSIX_IRQ_INDEX,
                flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                start: 0,
                count: 0,
                fds: 0,
            }
        ]
    );
    assert!(srv.state().msix.iter().all(Option::is_none));
    // The doorbell now has nothing to signal: the backend refuses the write.
    assert!(matches!(
        c.region_write(VFIO_PCI_BAR0_REGION_INDEX, T_DOORBELL, &0u64.to_le_bytes()),
        Err(Error::Remote { .. })
    ));
    assert!(!wait_event(&e[0], Duration::from_millis(50)));

    srv.finish(c);
}

#[test]
fn rust_vmm_server_counts_resets() {
    let srv = RustVmmServer::start();
    let c = srv.connect();
    wr64(&c, VFIO_PCI_BAR0_REGION_INDEX, T_SCRATCH1, 42);
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &0x0006u16.to_le_bytes())
        .expect("config write");

    c.reset().expect("DEVICE_RESET");
    assert_eq!(srv.state().resets, 1);
    assert_eq!(rd64(&c, VFIO_PCI_BAR0_REGION_INDEX, T_SCRATCH1), 0);
    let mut cmd = [0xffu8; 2];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 4, &mut cmd)
        .expect("config read");
    assert_eq!(cmd, [0, 0]);
    c.reset().expect("DEVICE_RESET");
    assert_eq!(srv.state().resets, 2);

    srv.finish(c);
}

#[test]
fn rust_vmm_server_refusals_leave_the_stream_in_step() {
    let srv = RustVmmServer::start();
    let c = srv.connect();
    let id = || rd64(&c, VFIO_PCI_BAR0_REGION_INDEX, T_ID);

    // Refused by the rust-vmm server itself: EINVAL.
    match c.region_info(VFIO_PCI_NUM_REGIONS) {
        Err(Error::Remote { errno, .. }) => assert_eq!(errno, libc::EINVAL),
        other => panic!("region {VFIO_PCI_NUM_REGIONS}: {other:?}"),
    }
    assert_eq!(id(), T_ID_VALUE);
    match c.irq_info(VFIO_PCI_NUM_IRQS) {
        Err(Error::Remote { errno, .. }) => assert_eq!(errno, libc::EINVAL),
        other => panic!("IRQ index {VFIO_PCI_NUM_IRQS}: {other:?}"),
    }
    assert_eq!(id(), T_ID_VALUE);
    let mut b = [0u8; 8];
    match c.region_read(VFIO_PCI_NUM_REGIONS + 3, 0, &mut b) {
        Err(Error::Remote { errno, .. }) => assert_eq!(errno, libc::EINVAL),
        other => panic!("read of a missing region: {other:?}"),
    }
    // Refused by the backend (rust-vmm sends errno 0 for those): still an error.
    assert!(matches!(
        c.region_read(VFIO_PCI_BAR0_REGION_INDEX, BAR0_BYTES, &mut b),
        Err(Error::Remote { .. })
    ));
    assert!(matches!(
        c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 255, &[0; 2]),
        Err(Error::Remote { .. })
    ));
    assert_eq!(id(), T_ID_VALUE);

    srv.finish(c);
}

// ---------------------------------------------------------------------------------------------
// Part 2: the rust-vmm client drives the real sampledev process.
// ---------------------------------------------------------------------------------------------

/// Kills sampledev (pid of a child this test started) if it is not disarmed within `limit`:
/// the rust-vmm client ignores error replies and would otherwise block forever on one.
struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn arm(pid: u32, limit: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = thread::spawn(move || {
            if rx.recv_timeout(limit) == Err(RecvTimeoutError::Timeout) {
                eprintln!("watchdog: a rust-vmm client request got no reply; killing sampledev");
                // SAFETY: plain kill(2) of our own child, which is not reaped before this
                // watchdog is disarmed (it is dropped before the Server that waits for it).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        });
        Watchdog {
            disarm: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// sampledev with a rust-vmm client connected to it. Fields drop in order: the client
/// disconnects, the watchdog is disarmed, then the process is killed and reaped.
struct Sampledev {
    c: rv::Client,
    _watchdog: Watchdog,
    srv: Server,
}

impl Sampledev {
    fn start(args: &[&str]) -> Sampledev {
        let srv = Server::start_with("64K", args);
        let watchdog = Watchdog::arm(srv.child.id(), Duration::from_secs(30));
        let c = rust_vmm_connect(&srv.socket);
        Sampledev {
            c,
            _watchdog: watchdog,
            srv,
        }
    }

    fn rd(&mut self, reg: u64) -> u64 {
        let mut b = [0u8; 8];
        self.c
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, reg, &mut b)
            .expect("rust-vmm region_read");
        u64::from_le_bytes(b)
    }

    fn wr(&mut self, reg: u64, v: u64) {
        self.c
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, reg, &v.to_le_bytes())
            .expect("rust-vmm region_write");
    }

    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.c
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, off, data)
            .expect("rust-vmm config write");
    }

    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.c
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, off, data)
            .expect("rust-vmm config read");
    }

    fn error_code(&mut self) -> u64 {
        (self.rd(REG_STATUS) & STATUS_ERROR_MASK) >> STATUS_ERROR_SHIFT
    }

    fn wait_idle(&mut self) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.rd(REG_STATUS);
            if s & STATUS_BUSY == 0 {
                return s;
            }
            assert!(Instant::now() < deadline, "DMA never finished");
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// `rv::Client::new` connects, negotiates VERSION, and fetches DEVICE_GET_INFO and every
/// region's info. The socket appears at bind(), a moment before listen().
fn rust_vmm_connect(socket: &Path) -> rv::Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rv::Client::new(socket) {
            Err(rv::Error::Connect(e))
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("rust-vmm client cannot connect to sampledev: {e:?}"),
            Ok(c) => return c,
        }
    }
}

#[test]
fn rust_vmm_client_negotiates_and_reads_sampledev_regions() {
    let mut d = Sampledev::start(&[]);

    // sampledev answers nothing but VERSION before VERSION succeeded, so region info for
    // every region coming back means negotiation worked.
    assert!(
        d.srv.log().contains("client speaks 0.1"),
        "sampledev did not log the rust-vmm client's version"
    );
    let rw = vb::VFIO_REGION_INFO_FLAG_READ | vb::VFIO_REGION_INFO_FLAG_WRITE;
    let bar0 = d.c.region(VFIO_PCI_BAR0_REGION_INDEX).expect("BAR0");
    assert_eq!((bar0.size, bar0.flags), (BAR0_SIZE, rw));
    assert!(bar0.file_offset.is_none() && bar0.sparse_areas.is_empty());
    let config = d.c.region(VFIO_PCI_CONFIG_REGION_INDEX).expect("config");
    assert_eq!((config.size, config.flags), (256, rw));
    for absent in [1, 2, 3, 4, 5, 6, 8] {
        let r = d.c.region(absent).expect("every vfio-pci region index");
        assert_eq!((r.size, r.flags), (0, 0), "region {absent}");
    }
    assert!(
        d.c.region(V1_REGION_INDEX).is_none(),
        "no v1 migration region with migration v2"
    );

    let mut ids = [0u8; 4];
    d.config_read(0, &mut ids);
    assert_eq!(ids[..2], VENDOR_ID.to_le_bytes());
    assert_eq!(ids[2..], DEVICE_ID.to_le_bytes());

    assert_eq!(
        d.rd(REG_ID),
        (u64::from(ID_VERSION) << 32) | u64::from(ID_MAGIC)
    );
    let mut half = [0u8; 4];
    d.c.region_read(VFIO_PCI_BAR0_REGION_INDEX, REG_ID, &mut half)
        .expect("4-byte read");
    assert_eq!(u32::from_le_bytes(half), ID_MAGIC);
    d.c.region_read(VFIO_PCI_BAR0_REGION_INDEX, REG_ID + 4, &mut half)
        .expect("4-byte read");
    assert_eq!(u32::from_le_bytes(half), ID_VERSION);
    assert_eq!(d.rd(REG_STATE_SIZE), 64 << 10);

    d.wr(REG_SCRATCH, 0x0bad_cafe_1234_5678);
    assert_eq!(d.rd(REG_SCRATCH), 0x0bad_cafe_1234_5678);
    d.c.region_write(
        VFIO_PCI_BAR0_REGION_INDEX,
        REG_SCRATCH + 4,
        &0xfeedu32.to_le_bytes(),
    )
    .expect("4-byte write");
    assert_eq!(d.rd(REG_SCRATCH), 0x0000_feed_1234_5678);
    // None of these accesses was one the device counts as a guest error.
    assert_eq!(d.rd(REG_ERROR_COUNT), 0);
    assert_eq!(d.rd(REG_STATUS), 0);
}

#[test]
fn rust_vmm_client_fetches_a_region_with_capabilities() {
    // With migration v1 sampledev has region 9, whose info carries a capability: the
    // rust-vmm client's first request (argsz 32) gets the fixed part and the size it
    // needs, and its second fetches the capability chain.
    let mut d = Sampledev::start(&["--migration", "v1"]);
    let mig = d.c.region(V1_REGION_INDEX).expect("v1 migration region");
    assert_eq!(mig.size, V1_REGION_SIZE);
    assert_eq!(mig.index, V1_REGION_INDEX);
    assert!(mig.flags & vb::VFIO_REGION_INFO_FLAG_CAPS != 0);
    assert!(mig.flags & vb::VFIO_REGION_INFO_FLAG_READ != 0);
    // The capability is a region type, which the rust-vmm client skips.
    assert!(mig.sparse_areas.is_empty());
    // The stream is still in step after the two-step fetch.
    assert_eq!(d.rd(REG_ID) as u32, ID_MAGIC);
    assert_eq!(d.rd(REG_MIG_CAPS) & 0xff, MIG_CAPS_MODE_V1);
}

#[test]
fn rust_vmm_client_dma_msix_and_reset_on_sampledev() {
    const RAM_IOVA: u64 = 0x20_0000;
    const RAM_SIZE: u64 = 1 << 20;
    let mut d = Sampledev::start(&[]);
    let ram = memfd(RAM_SIZE);
    d.c.dma_map(0, RAM_IOVA, RAM_SIZE, ram.as_raw_fd())
        .expect("rust-vmm dma_map");

    let msix = d.c.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).expect("IRQ info");
    assert_eq!((msix.index, msix.count), (VFIO_PCI_MSIX_IRQ_INDEX, 4));
    assert_eq!(
        msix.flags,
        vb::VFIO_IRQ_INFO_EVENTFD | vb::VFIO_IRQ_INFO_NORESIZE
    );
    let intx = d.c.get_irq_info(VFIO_PCI_INTX_IRQ_INDEX).expect("IRQ info");
    assert_eq!((intx.index, intx.count), (VFIO_PCI_INTX_IRQ_INDEX, 0));

    // All four vectors in one SET_IRQS (sampledev accepts 16 fds per message).
    let irqs = [eventfd(), eventfd(), eventfd(), eventfd()];
    let fds: Vec<_> = irqs.iter().map(|e| e.as_raw_fd()).collect();
    d.c.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        vb::VFIO_IRQ_SET_DATA_EVENTFD | vb::VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        4,
        &fds,
    )
    .expect("rust-vmm set_irqs");

    // What a guest driver does: memory + bus master, MSI-X on, vectors unmasked.
    d.config_write(0x04, &(CMD_MEMORY | CMD_BUS_MASTER).to_le_bytes());
    d.config_write(MSIX_CAP as u64 + 2, &(1u16 << 15).to_le_bytes());
    for v in 0..4 {
        let vector_ctrl = MSIX_TABLE_OFFSET + v * MSIX_ENTRY_SIZE + 12;
        d.c.region_write(VFIO_PCI_BAR0_REGION_INDEX, vector_ctrl, &0u32.to_le_bytes())
            .expect("unmask");
    }

    // A FILL into the memfd, completing on vector 2.
    let (off, len, seed) = (0x1000, 0x801, 0x77);
    d.wr(REG_DMA_VECTOR, 2);
    d.wr(REG_DMA_DST, RAM_IOVA + off);
    d.wr(REG_DMA_LEN, len);
    d.wr(REG_DMA_PATTERN, seed);
    d.wr(REG_DMA_CMD, CMD_FILL);
    assert!(wait_event(&irqs[2], WAIT), "no MSI-X on vector 2");
    for other in [0, 1, 3] {
        assert!(!wait_event(&irqs[other], Duration::ZERO), "vector {other}");
    }
    assert_eq!(d.wait_idle(), STATUS_DONE);
    assert_eq!(d.rd(REG_COUNTER), 1);
    let data = read_mem(&ram, off, len as usize);
    assert!(
        data.iter()
            .enumerate()
            .all(|(i, &b)| b == fill_byte(seed, i as u64)),
        "FILL data wrong"
    );
    assert_eq!(read_mem(&ram, off + len, 8), vec![0; 8]);

    // After DMA_UNMAP the same FILL faults and writes nothing.
    d.c.dma_unmap(RAM_IOVA, RAM_SIZE)
        .expect("rust-vmm dma_unmap");
    d.wr(REG_STATUS, STATUS_DONE);
    d.wr(REG_DMA_PATTERN, seed + 1);
    d.wr(REG_DMA_CMD, CMD_FILL);
    assert!(wait_event(&irqs[2], WAIT), "no MSI-X for the faulting FILL");
    d.wait_idle();
    assert_eq!(d.error_code(), ErrorCode::DmaFault as u64);
    assert_eq!(read_mem(&ram, off, len as usize), data);

    d.wr(REG_SCRATCH, 0x5c5c);
    d.c.reset().expect("rust-vmm reset");
    assert_eq!(d.rd(REG_SCRATCH), 0);
    assert_eq!((d.rd(REG_COUNTER), d.rd(REG_STATUS)), (0, 0));
    assert_eq!(d.rd(REG_ERROR_COUNT), 0);
    let mut cmd = [0xffu8; 2];
    d.config_read(0x04, &mut cmd);
    assert_eq!(cmd, [0, 0], "reset leaves bus mastering on");
    assert_eq!(d.rd(REG_STATE_SEED), DEFAULT_STATE_SEED);
}
