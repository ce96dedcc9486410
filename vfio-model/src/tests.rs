//! The model driven the way vfio-ioctls and minivmm drive it, through a fake process
//! (`Fake`): buffers are this test's memory, fds are numbers, eventfds are recorded.

use std::collections::{HashMap, HashSet};

use crate::Errno;
use crate::config::parse;
use crate::fsm;
use crate::model::*;
use crate::sys::{FileId, Sys};

#[derive(Default)]
struct Fake {
    next: i32,
    fds: HashMap<i32, FileId>,
    closed: HashSet<FileId>,
    signals: Vec<i32>,
    refs: HashSet<i32>,
}

impl Sys for Fake {
    fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        if addr == 0 {
            return Err(Errno::FAULT);
        }
        // SAFETY: tests pass addresses of their own live buffers, at least this long.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
    fn write_mem(&self, addr: u64, buf: &[u8]) -> Result<(), Errno> {
        if addr == 0 {
            return Err(Errno::FAULT);
        }
        // SAFETY: as read_mem.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), addr as *mut u8, buf.len()) };
        Ok(())
    }
    fn new_fd(&mut self, _what: &str) -> Result<(i32, FileId), Errno> {
        self.next += 1;
        let fd = self.next;
        let id = (7, fd as u64);
        self.fds.insert(fd, id);
        Ok((fd, id))
    }
    fn file_id(&self, fd: i32) -> Result<FileId, Errno> {
        self.fds.get(&fd).copied().ok_or(Errno::BADF)
    }
    fn eventfd_ref(&mut self, fd: i32) -> Result<i32, Errno> {
        if fd < 100 {
            return Err(Errno::INVAL);
        }
        self.refs.insert(fd + 1000);
        Ok(fd + 1000)
    }
    fn eventfd_put(&mut self, fd: i32) {
        assert!(self.refs.remove(&fd), "put of an unknown eventfd reference");
    }
    fn signal(&mut self, fd: i32) {
        self.signals.push(fd);
    }
    fn open_count(&self, files: &[FileId]) -> usize {
        files.iter().filter(|f| !self.closed.contains(f)).count()
    }
    fn log(&mut self, _line: &str) {}
}

fn addr<T>(v: &mut T) -> u64 {
    v as *mut T as u64
}

struct T {
    m: Model<Fake>,
    container: FileId,
    group: FileId,
    device: FileId,
}

impl T {
    fn new(spec: &str) -> T {
        let mut m = Model::new(parse(spec).unwrap(), Fake::default());
        let cfd = m.open("/dev/vfio/vfio").unwrap().unwrap();
        let gfd = m.open("/dev/vfio/42").unwrap().unwrap();
        let (container, group) = (m.sys.file_id(cfd).unwrap(), m.sys.file_id(gfd).unwrap());
        assert_eq!(m.open("/dev/vfio/43").unwrap(), Err(Errno::NOENT));
        assert_eq!(
            m.open("/dev/vfio/42").unwrap(),
            Err(Errno::BUSY),
            "group opened twice"
        );
        assert!(m.open("/dev/kvm").is_none());
        assert_eq!(m.ioctl(container, GET_API_VERSION, 0), Some(Ok(0)));
        assert_eq!(m.ioctl(container, CHECK_EXTENSION, 3), Some(Ok(1)));
        assert_eq!(m.ioctl(container, CHECK_EXTENSION, 8), Some(Ok(0)));
        assert_eq!(
            m.ioctl(container, SET_IOMMU, 3),
            Some(Err(Errno::INVAL)),
            "no group yet"
        );
        let mut status = [8u32, 0];
        assert_eq!(
            m.ioctl(group, GROUP_GET_STATUS, addr(&mut status)),
            Some(Ok(0))
        );
        assert_eq!(status[1], 1, "viable, no container");
        let mut name = *b"mdev\0";
        assert_eq!(
            m.ioctl(group, GROUP_GET_DEVICE_FD, addr(&mut name)),
            Some(Err(Errno::INVAL)),
            "no IOMMU yet"
        );
        let mut c = cfd;
        assert_eq!(
            m.ioctl(group, GROUP_SET_CONTAINER, addr(&mut c)),
            Some(Ok(0))
        );
        assert_eq!(m.ioctl(container, SET_IOMMU, 3), Some(Ok(0)));
        assert_eq!(m.ioctl(container, SET_IOMMU, 3), Some(Err(Errno::BUSY)));
        let mut wrong = *b"other\0";
        assert_eq!(
            m.ioctl(group, GROUP_GET_DEVICE_FD, addr(&mut wrong)),
            Some(Err(Errno::NODEV))
        );
        let dfd = m
            .ioctl(group, GROUP_GET_DEVICE_FD, addr(&mut name))
            .unwrap()
            .unwrap();
        let device = m.sys.file_id(dfd as i32).unwrap();
        T {
            m,
            container,
            group,
            device,
        }
    }

    fn pread(&mut self, index: u64, off: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let mut b = vec![0u8; len];
        let r = self.m.region_io(
            self.device,
            b.as_mut_ptr() as u64,
            len,
            (index << 40) + off,
            false,
        );
        r.unwrap().map(|_| b)
    }

    fn pwrite(&mut self, index: u64, off: u64, data: &[u8]) -> Result<isize, Errno> {
        let a = data.as_ptr() as u64;
        self.m
            .region_io(self.device, a, data.len(), (index << 40) + off, true)
            .unwrap()
    }

    fn feature(&mut self, flags: u32, payload: &mut [u32]) -> Result<i64, Errno> {
        let mut buf = vec![(8 + 4 * payload.len()) as u32, flags];
        buf.extend_from_slice(payload);
        let r = self
            .m
            .ioctl(self.device, DEVICE_FEATURE, buf.as_mut_ptr() as u64)
            .unwrap();
        payload.copy_from_slice(&buf[2..]);
        r
    }

    /// SET MIG_DEVICE_STATE; the data_fd's file id when one came back.
    fn set_state(&mut self, state: u32) -> Result<Option<FileId>, Errno> {
        let mut p = [state, 0];
        self.feature(0x20000 | 2, &mut p)?;
        Ok((p[1] as i32 >= 0).then(|| self.m.sys.file_id(p[1] as i32).unwrap()))
    }

    fn state(&mut self) -> u32 {
        let mut p = [0, 0];
        self.feature(0x10000 | 2, &mut p).unwrap();
        p[0]
    }

    fn read_all(&mut self, f: FileId) -> Vec<u8> {
        let mut out = vec![];
        loop {
            let mut b = [0u8; 7];
            let n = self
                .m
                .read(f, b.as_mut_ptr() as u64, b.len())
                .unwrap()
                .unwrap() as usize;
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&b[..n]);
        }
    }

    fn set_irq(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        data: &[u32],
    ) -> Result<i64, Errno> {
        let mut b = vec![20 + 4 * data.len() as u32, flags, index, start, count];
        b.extend_from_slice(data);
        self.m
            .ioctl(self.device, DEVICE_SET_IRQS, b.as_mut_ptr() as u64)
            .unwrap()
    }
}

const GET: u32 = 0x10000;
const SET: u32 = 0x20000;
const PROBE: u32 = 0x40000;

#[test]
fn device_describes_itself_as_mtty() {
    let mut t = T::new("group=42,device=mdev");
    let mut info = [16u32, 0, 0, 0];
    assert_eq!(
        t.m.ioctl(t.device, DEVICE_GET_INFO, addr(&mut info)),
        Some(Ok(0))
    );
    assert_eq!(info, [16, 2, 9, 5], "PCI, 9 regions, 5 irqs, no RESET flag");
    let mut region = [32u32, 0, 7, 0, 0, 0, 0, 0];
    assert_eq!(
        t.m.ioctl(t.device, DEVICE_GET_REGION_INFO, addr(&mut region)),
        Some(Ok(0))
    );
    assert_eq!(
        (region[1], region[4], region[7]),
        (3, 255, 7 << 8),
        "rw, 255 bytes, 7<<40"
    );
    region[2] = 9;
    assert_eq!(
        t.m.ioctl(t.device, DEVICE_GET_REGION_INFO, addr(&mut region)),
        Some(Err(Errno::INVAL))
    );
    let mut irq = [16u32, 0, 0, 0];
    t.m.ioctl(t.device, DEVICE_GET_IRQ_INFO, addr(&mut irq))
        .unwrap()
        .unwrap();
    assert_eq!(
        (irq[1], irq[3]),
        (7, 1),
        "INTx: eventfd, maskable, automasked"
    );
    irq[2] = 2;
    assert_eq!(
        t.m.ioctl(t.device, DEVICE_GET_IRQ_INFO, addr(&mut irq)),
        Some(Err(Errno::INVAL))
    );
    let cfg = t.pread(7, 0, 4).unwrap();
    assert_eq!(cfg, [0x48, 0x43, 0x53, 0x32]);
    assert_eq!(t.pread(7, 0xfc, 3).unwrap().len(), 3);
    assert_eq!(t.pread(7, 0xfc, 4), Err(Errno::INVAL), "past 255 bytes");
    assert_eq!(t.pread(6, 0, 4), Err(Errno::FAULT), "ROM");
    assert_eq!(t.pread(0, 8, 1), Err(Errno::INVAL));
    let mut f = [0u32; 2];
    t.feature(GET | 1, &mut f).unwrap();
    assert_eq!(f[0], 7, "STOP_COPY | P2P | PRE_COPY");
}

#[test]
fn intx_masks_itself_and_refuses_an_unmask_eventfd() {
    let mut t = T::new("group=42,device=mdev");
    assert_eq!(
        t.set_irq(1 | 32, 0, 0, 0, &[]),
        Err(Errno::INVAL),
        "disabling unset INTx"
    );
    assert_eq!(
        t.set_irq(4 | 32, 0, 0, 1, &[5]),
        Err(Errno::INVAL),
        "not an eventfd"
    );
    t.set_irq(4 | 32, 0, 0, 1, &[100]).unwrap();
    assert_eq!(
        t.set_irq(4 | 16, 0, 0, 1, &[101]),
        Err(Errno::NOTTY),
        "unmask eventfd"
    );
    assert_eq!(
        t.set_irq(4 | 32, 2, 0, 1, &[102]),
        Err(Errno::NOTTY),
        "no MSI-X"
    );
    t.pwrite(0, 2, &[0x07]).unwrap(); // FCR: FIFO on, cleared, trigger 1
    t.pwrite(0, 1, &[0x01]).unwrap(); // IER: receive data
    t.pwrite(0, 0, b"a").unwrap();
    assert_eq!(t.m.sys.signals, vec![1100]);
    t.pread(0, 0, 1).unwrap();
    t.pwrite(0, 0, b"b").unwrap();
    assert_eq!(t.m.sys.signals.len(), 1, "masked until unmasked");
    t.set_irq(1 | 16, 0, 0, 1, &[]).unwrap();
    t.pread(0, 0, 1).unwrap();
    t.pwrite(0, 0, b"c").unwrap();
    assert_eq!(t.m.sys.signals.len(), 2);
    t.set_irq(1 | 32, 0, 0, 0, &[]).unwrap();
    assert!(t.m.sys.refs.is_empty(), "disable drops the eventfd");
}

#[test]
fn iommu_maps_are_checked() {
    let mut t = T::new("group=42,device=mdev");
    let map = |t: &mut T, iova: u64, size: u64| {
        let mut m = [
            32u32,
            3,
            0x1000,
            0,
            iova as u32,
            (iova >> 32) as u32,
            size as u32,
            0,
        ];
        t.m.ioctl(t.container, IOMMU_MAP_DMA, addr(&mut m)).unwrap()
    };
    assert_eq!(map(&mut t, 0, 0x10000), Ok(0));
    assert_eq!(map(&mut t, 0x8000, 0x10000), Err(Errno::EXIST));
    assert_eq!(map(&mut t, 0x10000, 0x1001), Err(Errno::INVAL));
    assert_eq!(
        map(&mut t, 0xfee0_0000, 0x1000),
        Err(Errno::INVAL),
        "MSI window"
    );
    assert_eq!(map(&mut t, 0x10000, 0x10000), Ok(0));
    let mut un = [24u32, 0, 0x8000, 0, 0x1000, 0];
    assert_eq!(
        t.m.ioctl(t.container, IOMMU_UNMAP_DMA, addr(&mut un)),
        Some(Err(Errno::INVAL)),
        "split"
    );
    let mut un = [24u32, 0, 0, 0, 0x20000, 0];
    assert_eq!(
        t.m.ioctl(t.container, IOMMU_UNMAP_DMA, addr(&mut un)),
        Some(Ok(0))
    );
    assert_eq!(un[4], 0x20000, "both unmapped");
    let mut info = [0u32; 32];
    info[0] = 128;
    t.m.ioctl(t.container, IOMMU_GET_INFO, addr(&mut info))
        .unwrap()
        .unwrap();
    assert_eq!(info[1], 3, "page sizes and caps");
    assert_eq!(info[4], 24, "caps after the info");
    assert_eq!(
        (info[6] & 0xffff, info[8]),
        (1, 2),
        "IOVA range cap with two ranges"
    );
    let mut small = [16u32, 0, 0, 0, 0, 0];
    t.m.ioctl(t.container, IOMMU_GET_INFO, addr(&mut small))
        .unwrap()
        .unwrap();
    assert_eq!(small[1], 1, "no room for caps: none announced");
    // Unset refuses while the device file is open.
    assert_eq!(
        t.m.ioctl(t.group, GROUP_UNSET_CONTAINER, 0),
        Some(Err(Errno::BUSY))
    );
    let d = t.device;
    t.m.sys.closed.insert(d);
    assert_eq!(t.m.ioctl(t.group, GROUP_UNSET_CONTAINER, 0), Some(Ok(0)));
}

#[test]
fn pre_copy_then_stop_copy_carries_the_ports() {
    let mut src = T::new("group=42,device=mdev");
    src.pwrite(0, 2, &[0x07]).unwrap();
    // One byte per access: a wider one is split by alignment, and its later bytes land on
    // the next registers (as with mtty).
    for b in b"xyz" {
        src.pwrite(0, 0, &[*b]).unwrap();
    }
    src.pwrite(1, 7, &[0x5a]).unwrap();
    let f = src.set_state(fsm::PRE_COPY).unwrap().expect("data_fd");
    let mut info = [24u32, 0, 0, 0, 0, 0];
    src.m
        .ioctl(f, MIG_GET_PRECOPY_INFO, addr(&mut info))
        .unwrap()
        .unwrap();
    assert_eq!(info[2], 24, "the header is the initial data");
    let mut stream = src.read_all(f);
    assert_eq!(stream.len(), 24, "then a 0-byte read: drained");
    assert_eq!(src.set_state(fsm::STOP_COPY), Ok(None), "same file goes on");
    assert_eq!(
        src.m.ioctl(f, MIG_GET_PRECOPY_INFO, addr(&mut info)),
        Some(Err(Errno::INVAL))
    );
    stream.extend(src.read_all(f));
    assert_eq!(stream.len(), 24 + 2 * 36);
    assert_eq!(
        src.set_state(fsm::PRE_COPY),
        Err(Errno::INVAL),
        "blocked arc"
    );
    src.set_state(fsm::STOP).unwrap();
    let mut b = [0u8; 4];
    assert_eq!(
        src.m.read(f, addr(&mut b), 4),
        Some(Err(Errno::NODEV)),
        "session over"
    );

    let mut dst = T::new("group=42,device=mdev");
    dst.set_state(fsm::STOP).unwrap();
    let r = dst.set_state(fsm::RESUMING).unwrap().unwrap();
    let w = |t: &mut T, d: &[u8]| t.m.write(r, d.as_ptr() as u64, d.len()).unwrap();
    assert_eq!(w(&mut dst, &stream[..10]), Ok(10));
    assert_eq!(w(&mut dst, &stream[10..]), Ok(stream.len() as isize - 10));
    assert_eq!(
        w(&mut dst, &[0]),
        Err(Errno::NOMEM),
        "past the stream's size"
    );
    assert_eq!(dst.set_state(fsm::RUNNING), Ok(None));
    assert_eq!(dst.state(), fsm::RUNNING);
    assert_eq!(dst.pread(0, 0, 1).unwrap(), b"x");
    assert_eq!(dst.pread(0, 0, 1).unwrap(), b"y");
    assert_eq!(dst.pread(1, 7, 1).unwrap(), [0x5a]);
}

#[test]
fn stop_copy_only_and_bad_streams() {
    let mut src = T::new("group=42,device=mdev,ports=1");
    src.set_state(fsm::STOP).unwrap();
    let f = src.set_state(fsm::STOP_COPY).unwrap().unwrap();
    let s = src.read_all(f);
    assert_eq!(s.len(), 24 + 36);
    let mut dst = T::new("group=42,device=mdev");
    let r = dst.set_state(fsm::RESUMING).unwrap().expect("data_fd");
    assert_eq!(
        dst.m.write(r, s.as_ptr() as u64, 24).unwrap(),
        Err(Errno::FAULT),
        "a one-port stream for a two-port device"
    );
    let mut t = T::new("group=42,device=mdev");
    let _ = t.set_state(fsm::RESUMING).unwrap();
    assert_eq!(t.set_state(fsm::STOP), Err(Errno::INVAL), "nothing to load");
    assert_eq!(t.state(), fsm::RESUMING);
    assert_eq!(t.m.ioctl(t.device, DEVICE_RESET, 0), Some(Ok(0)));
    assert_eq!(t.state(), fsm::RUNNING);
}

#[test]
fn dma_logging_is_mttys_no_op_or_absent() {
    let mut t = T::new("group=42,device=mdev");
    assert_eq!(t.feature(PROBE | 6, &mut []), Ok(0));
    assert_eq!(t.feature(PROBE | GET | 6, &mut []), Err(Errno::INVAL));
    let ranges = [0u64, 0x10_0000];
    let p = ranges.as_ptr() as u64;
    let mut ctl = [4096u32, 0, 1, 0, p as u32, (p >> 32) as u32];
    assert_eq!(t.feature(SET | 6, &mut ctl), Ok(0));
    ctl[2] = 0;
    assert_eq!(t.feature(SET | 6, &mut ctl), Err(Errno::INVAL));
    assert_eq!(t.feature(SET | 7, &mut []), Ok(0));
    let mut off = T::new("group=42,device=mdev,dma-logging=off");
    assert_eq!(off.feature(PROBE | 6, &mut []), Err(Errno::NOTTY));
    assert_eq!(off.feature(GET | SET | 2, &mut [0, 0]), Err(Errno::INVAL));
    assert_eq!(off.feature(GET | 99, &mut [0, 0]), Err(Errno::NOTTY));
}

#[test]
fn kvm_vfio_takes_the_group_once() {
    let mut t = T::new("group=42,device=mdev");
    let gfd =
        t.m.sys
            .fds
            .iter()
            .find(|(_, id)| **id == t.group)
            .map(|(fd, _)| *fd)
            .unwrap();
    let fd = std::cell::Cell::new(gfd);
    let mut attr = [0u32, 1, 1, 0, 0, 0];
    let a = fd.as_ptr() as u64;
    (attr[4], attr[5]) = (a as u32, (a >> 32) as u32);
    let set = 0x4018_aee1;
    assert_eq!(t.m.kvm_vfio_ioctl(None, set, addr(&mut attr)), Some(Ok(0)));
    assert_eq!(
        t.m.kvm_vfio_ioctl(None, set, addr(&mut attr)),
        Some(Err(Errno::EXIST))
    );
    attr[2] = 2;
    assert_eq!(t.m.kvm_vfio_ioctl(None, set, addr(&mut attr)), Some(Ok(0)));
    // The pointer in `attr` sees this: a file that is not the model's.
    fd.set(999);
    assert_eq!(
        t.m.kvm_vfio_ioctl(None, set, addr(&mut attr)),
        None,
        "not ours: real KVM's"
    );
    let _ = t.group;
}
