//! VfioPciDevice over the vfio-user backend against a minimal in-process server on a
//! socketpair: the adaptor speaks the real protocol code of the `vfio_user` crate.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;

use vfio_user::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{
    Capabilities, Client, ClientOptions, Command, DeviceInfo, DmaMap, DmaUnmap, IrqInfo, IrqSet,
    RegionAccess, RegionInfo, RegionInfoRequest, Request, ServerConn, Version,
};

use super::device::PciDevice;
use super::testing::FakeRouting;
use super::vfio::VfioPciDevice;
use super::vfio_backend::DmaRegion;
use super::vfio_user::VfioUserBackend;

#[derive(Default)]
struct Seen {
    irq_sets: Vec<(u32, u32, usize)>,
    dma: Vec<(u64, u64, usize)>,
    bar0: Vec<u8>,
}

fn config() -> Vec<u8> {
    let mut c = vec![0u8; 256];
    c[0..4].copy_from_slice(&0x0001_4e58u32.to_le_bytes());
    c[0x06] = 0x10;
    c[0x34] = 0x40;
    // MSI-X: 2 vectors, table at BAR0+0x800, PBA at BAR0+0xc00.
    c[0x40..0x44].copy_from_slice(&0x0001_0011u32.to_le_bytes());
    c[0x44..0x48].copy_from_slice(&0x800u32.to_le_bytes());
    c[0x48..0x4c].copy_from_slice(&0xc00u32.to_le_bytes());
    c
}

fn region(index: u32) -> Vec<u8> {
    match index {
        0 => vec![0; 0x1000],
        7 => config(),
        _ => Vec::new(),
    }
}

fn answer(req: &Request, regions: &mut BTreeMap<u32, Vec<u8>>, seen: &Mutex<Seen>) -> Vec<u8> {
    let p = &req.payload;
    match req.command() {
        Some(Command::Version) => Version {
            major: 0,
            minor: 1,
            caps: Capabilities {
                max_msg_fds: Some(8),
                max_data_xfer_size: Some(1 << 20),
                ..Default::default()
            },
        }
        .encode(),
        Some(Command::DeviceGetInfo) => DeviceInfo {
            argsz: DeviceInfo::SIZE,
            flags: VFIO_DEVICE_FLAGS_PCI,
            num_regions: 9,
            num_irqs: 5,
        }
        .encode(),
        Some(Command::DeviceGetRegionInfo) => {
            let r = RegionInfoRequest::decode(p).unwrap();
            let size = regions
                .entry(r.index)
                .or_insert_with(|| region(r.index))
                .len();
            RegionInfo {
                index: r.index,
                flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
                size: size as u64,
                offset: 0,
                caps: Vec::new(),
                fd: None,
            }
            .encode()
        }
        Some(Command::DeviceGetIrqInfo) => {
            let i = IrqInfo::decode(p).unwrap();
            let count = if i.index == 2 { 2 } else { 0 };
            IrqInfo { count, ..i }.encode()
        }
        Some(Command::RegionRead) => {
            let (a, _) = RegionAccess::decode(p, false).unwrap();
            let buf = regions.entry(a.region).or_insert_with(|| region(a.region));
            let at = a.offset as usize;
            a.encode(&buf[at..at + a.count as usize])
        }
        Some(Command::RegionWrite) => {
            let (a, data) = RegionAccess::decode(p, true).unwrap();
            let buf = regions.entry(a.region).or_insert_with(|| region(a.region));
            let at = a.offset as usize;
            buf[at..at + data.len()].copy_from_slice(data);
            seen.lock().unwrap().bar0 = regions.get(&0).cloned().unwrap_or_default();
            a.encode(&[])
        }
        Some(Command::DeviceSetIrqs) => {
            let s = IrqSet::decode(p).unwrap();
            seen.lock()
                .unwrap()
                .irq_sets
                .push((s.index, s.count, req.fds.len()));
            Vec::new()
        }
        Some(Command::DmaMap) => {
            let m = DmaMap::decode(p).unwrap();
            seen.lock()
                .unwrap()
                .dma
                .push((m.address, m.size, req.fds.len()));
            Vec::new()
        }
        Some(Command::DmaUnmap) => DmaUnmap::decode(p).unwrap().encode(),
        other => panic!("unexpected {other:?}"),
    }
}

fn serve(stream: UnixStream, seen: Arc<Mutex<Seen>>) {
    let mut conn = ServerConn::new(stream);
    let mut regions = BTreeMap::new();
    while let Ok(Some(req)) = conn.recv_request() {
        let reply = answer(&req, &mut regions, &seen);
        conn.send_reply(&req.header, &reply, &[]).unwrap();
    }
}

#[test]
fn passthrough_over_vfio_user() {
    let (a, b) = UnixStream::pair().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let server = {
        let seen = seen.clone();
        thread::spawn(move || serve(b, seen))
    };
    let client = Client::from_stream(a, ClientOptions::default()).unwrap();
    let backend = Box::new(VfioUserBackend::from_client(client));
    let routing = Arc::new(FakeRouting::default());
    let mut d = VfioPciDevice::new("user", backend, routing.clone(), None).unwrap();

    let mut v = [0u8; 4];
    d.read_config(0, &mut v);
    assert_eq!(u32::from_le_bytes(v), 0x0001_4e58);
    d.write_bar(0, 0x10, &[0xab]);
    assert_eq!(seen.lock().unwrap().bar0[0x10], 0xab);
    // Enable MSI-X: both vectors' eventfds go to the server with the request.
    d.write_config(0x43, &[0x80]);
    assert_eq!(seen.lock().unwrap().irq_sets, vec![(2, 2, 2)]);

    let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let file = tmp.as_file().try_clone().unwrap();
    file.set_len(0x10000).unwrap();
    let mut ram = vec![0u8; 0x10000];
    // SAFETY: the server in this test never touches the memory; it only records the map.
    let r = unsafe { DmaRegion::new(0, 0x10000, ram.as_mut_ptr(), Some((Arc::new(file), 0))) };
    d.dma_map(std::slice::from_ref(&r)).unwrap();
    assert_eq!(seen.lock().unwrap().dma, vec![(0, 0x10000, 1)]);
    d.dma_unmap(&[r]).unwrap();
    // SAFETY: as above.
    let anon = unsafe { DmaRegion::new(0, 0x1000, ram.as_mut_ptr(), None) };
    assert!(
        d.dma_map(&[anon]).is_err(),
        "vfio-user needs file-backed RAM"
    );

    drop(d);
    server.join().unwrap();
}
