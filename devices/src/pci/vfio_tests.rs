//! VfioPciDevice over an in-memory fake backend: configuration passthrough and emulation,
//! BAR trapping, interrupt setup, state, and the device on the root bus.

use std::sync::{Arc, Mutex};

use crate::bus::Bus;
use crate::pci::bus::{PciBdf, PciRoot, PciWindows};
use crate::pci::config::{
    BAR0, CAPABILITIES_POINTER, COMMAND, INTERRUPT_LINE, INTERRUPT_PIN, ROM_BAR, STATUS,
};
use crate::pci::device::PciDevice;
use crate::pci::testing::{FakeBackend, FakeDeviceState, FakeMapper, FakeRouting};
use crate::pci::vfio::{VfioPciDevice, VfioPciError};
use crate::pci::vfio_backend::{
    DmaRegion, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};

const MSIX_CAP: usize = 0x40;
const MSI_CAP: usize = 0x50;
const INTX: u32 = VFIO_PCI_INTX_IRQ_INDEX;
const MSIX: u32 = VFIO_PCI_MSIX_IRQ_INDEX;

fn put32(c: &mut [u8], o: usize, v: u32) {
    c[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// BAR0 4 KiB mem32, BAR2 16 KiB mem64 holding the MSI-X table (4 vectors) at 0x2000 and
/// the PBA at 0x3000, BAR4 32 ports; MSI-X then 64-bit MSI with 2 vectors; INTA#.
fn fake() -> Arc<Mutex<FakeDeviceState>> {
    let mut c = vec![0u8; 256];
    put32(&mut c, 0, 0x1041_1af4);
    put32(&mut c, 8, 0xff00_0001);
    put32(&mut c, 0x18, 0xc);
    put32(&mut c, 0x20, 0x1);
    c[STATUS] = 0x10;
    c[CAPABILITIES_POINTER] = MSIX_CAP as u8;
    put32(&mut c, MSIX_CAP, 0x0003_5011);
    put32(&mut c, MSIX_CAP + 4, 0x2000 | 2);
    put32(&mut c, MSIX_CAP + 8, 0x3000 | 2);
    put32(&mut c, MSI_CAP, 0x0082_0005);
    c[INTERRUPT_PIN] = 1;
    c[0x60] = 0xaa;
    let regions = [
        (0, vec![0; 0x1000]),
        (2, vec![0; 0x4000]),
        (4, vec![0; 0x20]),
    ];
    let irqs = [(INTX, 1), (VFIO_PCI_MSI_IRQ_INDEX, 2), (MSIX, 4)];
    Arc::new(Mutex::new(FakeDeviceState {
        flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
        config: c,
        regions: regions.into_iter().collect(),
        irq_counts: irqs.into_iter().collect(),
        ..Default::default()
    }))
}

fn open(st: &Arc<Mutex<FakeDeviceState>>, intx: Option<u32>) -> (VfioPciDevice, Arc<FakeRouting>) {
    let routing = Arc::new(FakeRouting::default());
    let backend = Box::new(FakeBackend(st.clone()));
    let d = VfioPciDevice::new("fake", backend, routing.clone(), intx).unwrap();
    (d, routing)
}
fn rd32(d: &mut VfioPciDevice, o: usize) -> u32 {
    let mut b = [0u8; 4];
    d.read_config(o, &mut b);
    u32::from_le_bytes(b)
}

fn wr(d: &mut VfioPciDevice, o: usize, v: &[u8]) {
    d.write_config(o, v);
}

#[test]
fn config_is_passed_through_except_emulated_parts() {
    let st = fake();
    let (mut d, _) = open(&st, None);
    assert_eq!(rd32(&mut d, 0), 0x1041_1af4);
    assert_eq!(rd32(&mut d, 0x60) & 0xff, 0xaa);
    wr(&mut d, 0x61, &[0x55]);
    assert_eq!(
        st.lock().unwrap().config[0x61],
        0x55,
        "device register written"
    );
    // BARs size from region info, and the device never sees guest addresses.
    for i in 0..6 {
        wr(&mut d, BAR0 + 4 * i, &[0xff; 4]);
    }
    assert_eq!(rd32(&mut d, BAR0), 0xffff_f000);
    assert_eq!(rd32(&mut d, BAR0 + 8), 0xffff_c00c);
    assert_eq!(rd32(&mut d, BAR0 + 12), 0xffff_ffff);
    assert_eq!(rd32(&mut d, BAR0 + 16), 0xffff_ffe1);
    assert_eq!(rd32(&mut d, ROM_BAR), 0, "ROM hidden");
    assert_eq!(st.lock().unwrap().config[BAR0..BAR0 + 4], [0; 4]);
    // COMMAND: passed on, with decode bits also kept here.
    wr(&mut d, COMMAND, &0x0406u16.to_le_bytes());
    assert_eq!(
        st.lock().unwrap().config[COMMAND..COMMAND + 2],
        [0x06, 0x04]
    );
    st.lock().unwrap().config[COMMAND] = 0;
    assert_eq!(rd32(&mut d, COMMAND) & 0xffff, 0x0406);
    assert_eq!(
        rd32(&mut d, INTERRUPT_LINE) >> 8 & 0xff,
        0,
        "pin hidden without INTx"
    );
    assert_eq!(rd32(&mut d, 0x100), 0, "extended space");
    assert_eq!(d.bars().len(), 3);
}

#[test]
fn bar_accesses_trap_to_the_region() {
    let st = fake();
    let (mut d, _) = open(&st, None);
    d.write_bar(0, 0x10, &[1, 2, 3, 4]);
    assert_eq!(st.lock().unwrap().regions[&0][0x10..0x14], [1, 2, 3, 4]);
    st.lock().unwrap().regions.get_mut(&4).unwrap()[3] = 0x77;
    let mut b = [0u8; 1];
    d.read_bar(4, 3, &mut b);
    assert_eq!(b, [0x77]);
    d.read_bar(0, 0x1000, &mut b);
    assert_eq!(b, [0xff], "outside the region");
    // MSI-X table writes reach the device too, but reads come from the emulation.
    d.write_bar(2, 0x2008, &0x1234u32.to_le_bytes());
    assert_eq!(st.lock().unwrap().regions[&2][0x2008], 0x34);
    st.lock().unwrap().regions.get_mut(&2).unwrap()[0x2008] = 0x99;
    let mut w = [0u8; 4];
    d.read_bar(2, 0x2008, &mut w);
    assert_eq!(u32::from_le_bytes(w), 0x1234);
    d.read_bar(2, 0x200c, &mut w);
    assert_eq!(u32::from_le_bytes(w), 1, "vectors start masked");
    // The PBA is the device's, and read-only.
    st.lock().unwrap().regions.get_mut(&2).unwrap()[0x3000] = 0x4;
    d.read_bar(2, 0x3000, &mut w);
    assert_eq!(w[0], 0x4);
    d.write_bar(2, 0x3000, &[0; 4]);
    assert_eq!(st.lock().unwrap().regions[&2][0x3000], 0x4);
}

fn program_vector(d: &mut VfioPciDevice, v: u64, data: u32) {
    let e = 0x2000 + 16 * v;
    d.write_bar(2, e, &0xfee0_0000u32.to_le_bytes());
    d.write_bar(2, e + 4, &0u32.to_le_bytes());
    d.write_bar(2, e + 8, &data.to_le_bytes());
    d.write_bar(2, e + 12, &0u32.to_le_bytes());
}

#[test]
fn msix_enable_hands_eventfds_to_the_device() {
    let st = fake();
    let (mut d, routing) = open(&st, None);
    program_vector(&mut d, 1, 0x41);
    assert!(st.lock().unwrap().irq_log.is_empty());
    wr(&mut d, MSIX_CAP + 3, &[0x80]);
    assert_eq!(st.lock().unwrap().irq_log, vec![(MSIX, Some(4))]);
    assert_eq!(rd32(&mut d, MSIX_CAP) >> 16, 0x8003);
    assert_eq!(
        st.lock().unwrap().config[MSIX_CAP + 3],
        0x80,
        "device sees enable"
    );
    let routes = routing.routes();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes.values().next().unwrap().data, 0x41);
    program_vector(&mut d, 2, 0x42);
    assert_eq!(routing.irqfds().len(), 2);
    // Function mask: nothing routed, but the device keeps its eventfds.
    wr(&mut d, MSIX_CAP + 3, &[0xc0]);
    assert!(routing.irqfds().is_empty());
    wr(&mut d, MSIX_CAP + 2, &0x0000u16.to_le_bytes());
    assert_eq!(st.lock().unwrap().irq_log.last(), Some(&(MSIX, None)));
    assert!(routing.routes().is_empty());
    assert!(routing.state.lock().unwrap().allocated.is_empty());
}

#[test]
fn intx_steps_aside_for_msix() {
    let st = fake();
    let (mut d, routing) = open(&st, Some(10));
    assert_eq!(rd32(&mut d, INTERRUPT_LINE) & 0xffff, 0x010a);
    assert_eq!(st.lock().unwrap().irq_log, vec![(INTX, Some(1))]);
    assert_eq!(st.lock().unwrap().unmask_fds, vec![INTX]);
    assert!(routing.irqfds().contains(&10));
    wr(&mut d, MSIX_CAP + 3, &[0x80]);
    wr(&mut d, MSIX_CAP + 3, &[0x00]);
    let log = st.lock().unwrap().irq_log.clone();
    assert_eq!(
        log,
        vec![
            (INTX, Some(1)),
            (INTX, None),
            (MSIX, Some(4)),
            (MSIX, None),
            (INTX, Some(1)),
        ]
    );
}

#[test]
fn msi_enable_uses_the_enabled_vector_count() {
    let st = fake();
    let (mut d, routing) = open(&st, None);
    wr(&mut d, MSI_CAP + 4, &0xfee0_0000u32.to_le_bytes());
    wr(&mut d, MSI_CAP + 12, &0x50u16.to_le_bytes());
    // Enable with MME = 1 (2 vectors).
    wr(&mut d, MSI_CAP + 2, &0x0011u16.to_le_bytes());
    assert_eq!(
        st.lock().unwrap().irq_log,
        vec![(VFIO_PCI_MSI_IRQ_INDEX, Some(2))]
    );
    let datas: Vec<u32> = routing.routes().values().map(|m| m.data).collect();
    assert_eq!(datas, vec![0x50, 0x51]);
    assert_eq!(rd32(&mut d, MSI_CAP) >> 16, 0x0093);
}

#[test]
fn state_moves_to_a_fresh_device() {
    let st = fake();
    let (mut d, _) = open(&st, None);
    wr(&mut d, BAR0, &0xc000_0000u32.to_le_bytes());
    wr(&mut d, COMMAND, &0x0006u16.to_le_bytes());
    program_vector(&mut d, 3, 0x63);
    wr(&mut d, MSIX_CAP + 3, &[0x80]);
    let blob = d.save_state().unwrap();
    let st2 = fake();
    let (mut d2, routing2) = open(&st2, None);
    d2.restore_state(&blob).unwrap();
    assert_eq!(rd32(&mut d2, BAR0), 0xc000_0000);
    assert_eq!(st2.lock().unwrap().config[COMMAND], 0x06);
    assert_eq!(st2.lock().unwrap().irq_log, vec![(MSIX, Some(4))]);
    assert_eq!(routing2.routes().values().next().unwrap().data, 0x63);
}

#[test]
fn refuses_non_pci_devices() {
    let st = fake();
    st.lock().unwrap().flags = 0;
    let r = VfioPciDevice::new(
        "x",
        Box::new(FakeBackend(st)),
        Arc::new(FakeRouting::default()),
        None,
    );
    assert!(matches!(r, Err(VfioPciError::NotPci(0))));
}

#[test]
fn dma_map_and_unmap() {
    let st = fake();
    let (mut d, _) = open(&st, None);
    let mut ram = vec![0u8; 0x2000];
    // SAFETY: `ram` outlives the fake backend's use of it (the fake only records ranges).
    let r = unsafe { DmaRegion::new(0, 0x2000, ram.as_mut_ptr(), None) };
    d.dma_map(std::slice::from_ref(&r)).unwrap();
    assert_eq!(st.lock().unwrap().dma, vec![(0, 0x2000)]);
    d.dma_unmap(&[r]).unwrap();
    assert!(st.lock().unwrap().dma.is_empty());
}

#[test]
fn passthrough_bar_on_the_mmio_bus() {
    let st = fake();
    let (d, _) = open(&st, None);
    let mmio = Arc::new(Bus::new());
    let pio = Arc::new(Bus::new());
    let windows = PciWindows {
        mmio32: (0xc000_0000, 0x2000_0000),
        mmio64: None,
        io: (0xc000, 0x4000),
    };
    let root = PciRoot::new(mmio.clone(), pio.clone(), windows);
    let slot = root.add_device(Arc::new(Mutex::new(d))).unwrap();
    let bars = root.mapped_bars(slot);
    let bar0 = bars.iter().find(|b| b.index == 0).unwrap().addr;
    assert!(mmio.write(bar0 + 0x20, &[9, 8]));
    assert_eq!(st.lock().unwrap().regions[&0][0x20..0x22], [9, 8]);
    let io = bars.iter().find(|b| b.index == 4).unwrap().addr;
    assert!(pio.write(io + 1, &[5]));
    assert_eq!(st.lock().unwrap().regions[&4][1], 5);
    let mut v = [0u8; 4];
    root.config_read(
        PciBdf {
            bus: 0,
            device: slot,
            function: 0,
        },
        0,
        &mut v,
    );
    assert_eq!(u32::from_le_bytes(v), 0x1041_1af4);
}

#[test]
fn mappable_bar_memory_follows_the_bar() {
    let st = fake();
    st.lock().unwrap().mmap_file = Some(Arc::new(
        vmm_sys_util::tempfile::TempFile::new()
            .unwrap()
            .as_file()
            .try_clone()
            .unwrap(),
    ));
    let (mut d, _) = open(&st, None);
    let mapper = Arc::new(FakeMapper::default());
    d.set_bar_mapper(mapper.clone());
    let dev = Arc::new(Mutex::new(d));
    let root = PciRoot::new(
        Arc::new(Bus::new()),
        Arc::new(Bus::new()),
        PciWindows {
            mmio32: (0xc000_0000, 0x2000_0000),
            mmio64: None,
            io: (0xc000, 0x4000),
        },
    );
    let slot = root.add_device(dev.clone()).unwrap();
    let bars = root.mapped_bars(slot);
    let addr = |i| bars.iter().find(|b| b.index == i).unwrap().addr;
    let mut maps: Vec<_> = mapper.maps.lock().unwrap().values().copied().collect();
    maps.sort();
    // BAR0 whole; BAR2 up to its MSI-X table page (table and PBA pages stay trapped); no
    // mapping for the I/O BAR.
    let mut want = vec![(addr(0), 0x1000, 0), (addr(2), 0x2000, 2 << 20)];
    want.sort();
    assert_eq!(maps, want);
    let bdf = PciBdf {
        bus: 0,
        device: slot,
        function: 0,
    };
    root.config_write(bdf, BAR0, &0xd000_0000u32.to_le_bytes());
    assert!(
        mapper
            .maps
            .lock()
            .unwrap()
            .values()
            .any(|m| m.0 == 0xd000_0000)
    );
    assert!(!mapper.maps.lock().unwrap().values().any(|m| m.0 == addr(0)));
    drop(root);
    drop(dev);
    assert!(mapper.maps.lock().unwrap().is_empty(), "unmapped on drop");
}

#[test]
fn config_region_smaller_than_256_bytes_is_used_as_far_as_it_goes() {
    // mtty reports a 255-byte configuration region.
    let st = fake();
    {
        let mut s = st.lock().unwrap();
        s.config.truncate(255);
        s.config[0xfc..0xff].copy_from_slice(&[1, 2, 3]);
    }
    let (mut d, _) = open(&st, None);
    assert_eq!(rd32(&mut d, 0), 0x1041_1af4);
    // The last byte the region lacks reads as 0; a write to it goes nowhere.
    assert_eq!(rd32(&mut d, 0xfc), 0x0003_0201);
    wr(&mut d, 0xfc, &[9, 9, 9, 9]);
    assert_eq!(st.lock().unwrap().config[0xfc..], [9, 9, 9]);
    assert_eq!(rd32(&mut d, 0xfc), 0x0009_0909);
    // A region too small for the standard header is still refused.
    st.lock().unwrap().config.truncate(63);
    let r = VfioPciDevice::new(
        "x",
        Box::new(FakeBackend(st)),
        Arc::new(FakeRouting::default()),
        None,
    );
    assert!(matches!(r, Err(VfioPciError::NoConfigRegion)));
}

#[test]
fn intx_without_an_unmask_eventfd_is_unmasked_by_the_vmm_after_eoi() {
    let st = fake();
    st.lock().unwrap().refuse_unmask_fd = true;
    let (mut d, routing) = open(&st, Some(11));
    assert!(routing.irqfds().contains(&11), "INTx still wired");
    let eoi = d
        .intx_eoi_fd()
        .expect("the VMM watches the resample eventfd");
    // Nothing signalled: nothing unmasked.
    d.intx_eoi();
    assert!(st.lock().unwrap().unmasks.is_empty());
    // KVM signals the resample eventfd at the guest's EOI.
    eoi.write(1).unwrap();
    d.intx_eoi();
    assert_eq!(st.lock().unwrap().unmasks, vec![INTX]);
    // A device that takes the unmask eventfd needs no help.
    let (d, _) = open(&fake(), Some(11));
    assert!(d.intx_eoi_fd().is_none());
}

#[test]
fn a_reset_finds_interrupts_off_and_restores_the_guests_wiring() {
    let st = fake();
    let (mut d, _) = open(&st, Some(10));
    program_vector(&mut d, 1, 0x41);
    wr(&mut d, MSIX_CAP + 3, &[0x80]);
    d.reset().unwrap();
    let s = st.lock().unwrap();
    assert_eq!(s.resets, 1);
    assert!(s.live_at_reset[0].is_empty(), "{:?}", s.live_at_reset);
    assert_eq!(s.live_irqs(), [MSIX].into(), "{:?}", s.irq_log);
    drop(s);
    // Guest back to INTx: a reset re-arms INTx, not MSI-X.
    wr(&mut d, MSIX_CAP + 3, &[0x00]);
    d.reset().unwrap();
    assert_eq!(st.lock().unwrap().live_irqs(), [INTX].into());
    assert!(!d.is_lost());
}

#[test]
fn a_failed_reset_leaves_the_device_lost() {
    let st = fake();
    let (mut d, _) = open(&st, Some(10));
    st.lock().unwrap().fail_reset = true;
    assert!(d.reset().is_err());
    assert!(d.is_lost());
    let mut b = [0u8; 4];
    d.read_bar(0, 0, &mut b);
    assert_eq!(b, [0xff; 4]);
}

#[test]
fn dropping_the_device_withdraws_its_dma_mappings() {
    let st = fake();
    let (mut d, _) = open(&st, None);
    let mut ram = vec![0u8; 0x2000];
    // SAFETY: `ram` outlives the fake backend's use of it (the fake only records ranges).
    let region = unsafe { DmaRegion::new(0x10_0000, 0x2000, ram.as_mut_ptr(), None) };
    d.dma_map(std::slice::from_ref(&region)).unwrap();
    assert_eq!(st.lock().unwrap().dma, vec![(0x10_0000, 0x2000)]);
    drop(d);
    assert!(st.lock().unwrap().dma.is_empty());
}
