//! Puts the emulated devices on the buses and wires their interrupts to KVM.

use std::sync::{Arc, Mutex};

use std::path::PathBuf;

use devices::bus::{Bus, BusError};
use devices::legacy::{
    CMOS_BASE, CMOS_LEN, Cmos, EXIT_PORT_BASE, EXIT_PORT_LEN, ExitPort, ExitSignal, I8042,
    I8042_BASE, I8042_LEN, POST_BASE, POST_LEN, PostCode,
};
use devices::pci::{
    DmaRegion, HostBridge, KernelVfioBackend, KernelVfioContainer, KvmMsiRouting,
    PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN, PciConfigIo, PciConfigMmio, PciRoot, PciWindows,
    VfioBackend, VfioPciDevice, VfioUserBackend,
};
use devices::serial::{COM1_BASE, COM1_GSI, COM1_LEN, SerialDevice, SerialError, SerialOutput};
use migration::state::Migratable;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::layout::{
    PCI_ECAM_SIZE, PCI_ECAM_START, PCI_IO_SIZE, PCI_IO_START, PCI_MMIO_SIZE, PCI_MMIO_START,
    PCI_MMIO64_SIZE, intx_gsi, pci_mmio64_start,
};
use crate::vstate::memory::GuestMemory;
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot wire IRQ {gsi} to KVM: {err}")]
    Irqfd { gsi: u32, err: kvm_ioctls::Error },
    #[error("PCI: {0}")]
    Pci(String),
    #[error("passthrough device {what}: {err}")]
    Passthrough { what: String, err: String },
}

/// How a passthrough device is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PassthroughBackend {
    /// `--vfio /sys/bus/pci/devices/BDF`: kernel VFIO (container/group).
    Kernel(PathBuf),
    /// `--vfio-user SOCKET`: a vfio-user server such as sampledev.
    User(PathBuf),
}

/// A passthrough device on the command line: `PATH[,pre-copy=on|off]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Passthrough {
    pub backend: PassthroughBackend,
    /// `pre-copy=off`: migrate this device in stop-copy only, as QEMU's
    /// `x-allow-pre-copy=false`, for devices whose pre-copy stream is unusable.
    pub pre_copy: bool,
}

impl Passthrough {
    /// Parses the value of `--vfio` (`user` false) or `--vfio-user` (`user` true).
    pub fn parse(value: &str, user: bool) -> Result<Self, String> {
        let flag = if user { "--vfio-user" } else { "--vfio" };
        let mut parts = value.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| {
            format!("{flag} '{value}': no path (expected PATH[,pre-copy=on|off])")
        })?;
        let mut pre_copy = true;
        for opt in parts {
            pre_copy = match opt.split_once('=') {
                Some(("pre-copy", "on")) => true,
                Some(("pre-copy", "off")) => false,
                Some(("pre-copy", v)) => {
                    return Err(format!(
                        "{flag} '{value}': pre-copy={v}: expected pre-copy=on or pre-copy=off"
                    ));
                }
                _ => {
                    return Err(format!(
                        "{flag} '{value}': unknown option '{opt}' (known: pre-copy=on|off)"
                    ));
                }
            };
        }
        let path = PathBuf::from(path);
        let backend = if user {
            PassthroughBackend::User(path)
        } else {
            PassthroughBackend::Kernel(path)
        };
        Ok(Passthrough { backend, pre_copy })
    }

    /// As the user wrote it, for messages.
    pub fn describe(&self) -> String {
        let (flag, path) = match &self.backend {
            PassthroughBackend::Kernel(p) => ("--vfio", p),
            PassthroughBackend::User(p) => ("--vfio-user", p),
        };
        let opts = if self.pre_copy { "" } else { ",pre-copy=off" };
        format!("{flag} {}{opts}", path.display())
    }
}

/// A passthrough device on the PCI bus, with how it was given.
pub struct PassthroughDevice {
    pub spec: Passthrough,
    pub dev: Arc<Mutex<VfioPciDevice>>,
}

/// The emulated devices, each shared between its bus and the migration code.
pub struct Devices {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub exit_port: Arc<Mutex<ExitPort>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub post: Arc<Mutex<PostCode>>,
    pub pci: Arc<PciRoot>,
    pub pci_config: Arc<Mutex<PciConfigIo>>,
    pub routing: Arc<KvmMsiRouting>,
    /// Passthrough devices in command-line order (ids vfio0, vfio1, ...).
    pub passthrough: Vec<PassthroughDevice>,
    kernel_vfio: Option<Arc<KernelVfioContainer>>,
}

impl Drop for Devices {
    /// Passthrough devices may outlive this (their Arcs sit on the buses); their DMA
    /// mappings must not outlive the guest RAM, which the machine frees next.
    fn drop(&mut self) {
        for p in &self.passthrough {
            p.dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release_dma();
        }
    }
}

impl Devices {
    pub fn new(
        vm: &Vm,
        ram_size: u64,
        serial_out: &SerialOutput,
        exit: &ExitSignal,
    ) -> Result<Self, DeviceSetupError> {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceSetupError::EventFd)?;
        vm.fd
            .register_irqfd(&irq, COM1_GSI)
            .map_err(|err| DeviceSetupError::Irqfd { gsi: COM1_GSI, err })?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, serial_out.open()?)));
        let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
        let exit_port = Arc::new(Mutex::new(ExitPort::new(exit.clone())));
        let cmos = Arc::new(Mutex::new(Cmos::new()));
        let post = Arc::new(Mutex::new(PostCode::new()));
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        pio.insert(COM1_BASE, COM1_LEN, serial.clone())?;
        pio.insert(I8042_BASE, I8042_LEN, i8042.clone())?;
        pio.insert(EXIT_PORT_BASE, EXIT_PORT_LEN, exit_port.clone())?;
        pio.insert(CMOS_BASE, CMOS_LEN, cmos.clone())?;
        pio.insert(POST_BASE, POST_LEN, post.clone())?;
        let (pci, pci_config) = pci_root(&pio, &mmio, ram_size)?;
        Ok(Devices {
            pio,
            mmio,
            serial,
            i8042,
            exit_port,
            cmos,
            post,
            pci,
            pci_config,
            routing: Arc::new(KvmMsiRouting::new(vm.fd.clone(), true)),
            passthrough: Vec::new(),
            kernel_vfio: None,
        })
    }

    /// Opens a passthrough device, maps guest RAM for its DMA and puts it on the PCI bus.
    pub fn add_passthrough(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        spec: &Passthrough,
    ) -> Result<(), DeviceSetupError> {
        let err = |e: &dyn std::fmt::Display| DeviceSetupError::Passthrough {
            what: spec.describe(),
            err: e.to_string(),
        };
        let backend: Box<dyn VfioBackend> = match &spec.backend {
            PassthroughBackend::User(sock) => {
                Box::new(VfioUserBackend::connect(sock).map_err(|e| err(&e))?)
            }
            PassthroughBackend::Kernel(path) => {
                let container = match &self.kernel_vfio {
                    Some(c) => c.clone(),
                    None => KernelVfioContainer::new(&vm.fd).map_err(|e| err(&e))?,
                };
                self.kernel_vfio = Some(container.clone());
                Box::new(KernelVfioBackend::open(path, container).map_err(|e| err(&e))?)
            }
        };
        let n = self.passthrough.len();
        let id = format!("vfio{n}");
        let gsi = intx_gsi(n);
        let mut dev = VfioPciDevice::new(id, backend, self.routing.clone(), Some(gsi))
            .map_err(|e| err(&e))?;
        dev.dma_map(&DmaRegion::from_guest_memory(mem))
            .map_err(|e| err(&e))?;
        let dev = Arc::new(Mutex::new(dev));
        self.pci.add_device(dev.clone()).map_err(|e| err(&e))?;
        self.passthrough.push(PassthroughDevice {
            spec: spec.clone(),
            dev,
        });
        Ok(())
    }

    /// Every emulated device, for the migration engine to walk uniformly.
    pub fn migratable(&self) -> Vec<Arc<Mutex<dyn Migratable + Send>>> {
        vec![
            self.serial.clone(),
            self.i8042.clone(),
            self.exit_port.clone(),
            self.cmos.clone(),
            self.post.clone(),
            self.pci_config.clone(),
        ]
    }
}

/// The PCI root with its host bridge, reachable through 0xCF8/0xCFC and ECAM.
fn pci_root(
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
    ram_size: u64,
) -> Result<(Arc<PciRoot>, Arc<Mutex<PciConfigIo>>), DeviceSetupError> {
    let windows = PciWindows {
        mmio32: (PCI_MMIO_START, PCI_MMIO_SIZE),
        mmio64: Some((pci_mmio64_start(ram_size), PCI_MMIO64_SIZE)),
        io: (PCI_IO_START, PCI_IO_SIZE),
    };
    let bridge = HostBridge::with_ecam_hint(PCI_ECAM_START)
        .map_err(|e| DeviceSetupError::Pci(e.to_string()))?;
    let root = Arc::new(PciRoot::with_host_bridge(
        mmio.clone(),
        pio.clone(),
        windows,
        bridge,
    ));
    let cfg_io = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
    pio.insert(PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN, cfg_io.clone())?;
    mmio.insert(
        PCI_ECAM_START,
        PCI_ECAM_SIZE,
        Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
    )?;
    Ok((root, cfg_io))
}
