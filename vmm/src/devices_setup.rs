//! Puts the emulated devices on the buses and wires their interrupts to KVM.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::legacy::{
    CMOS_BASE, CMOS_LEN, Cmos, EXIT_PORT_BASE, EXIT_PORT_LEN, ExitPort, ExitSignal, I8042,
    I8042_BASE, I8042_LEN, POST_BASE, POST_LEN, PostCode,
};
use devices::serial::{COM1_BASE, COM1_GSI, COM1_LEN, SerialDevice, SerialError, SerialOutput};
use migration::state::Migratable;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

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
}

impl Devices {
    pub fn new(
        vm: &Vm,
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
        let pio = Bus::new();
        pio.insert(COM1_BASE, COM1_LEN, serial.clone())?;
        pio.insert(I8042_BASE, I8042_LEN, i8042.clone())?;
        pio.insert(EXIT_PORT_BASE, EXIT_PORT_LEN, exit_port.clone())?;
        pio.insert(CMOS_BASE, CMOS_LEN, cmos.clone())?;
        pio.insert(POST_BASE, POST_LEN, post.clone())?;
        Ok(Devices {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            serial,
            i8042,
            exit_port,
            cmos,
            post,
        })
    }

    /// Every emulated device, for the migration engine to walk uniformly.
    pub fn migratable(&self) -> Vec<Arc<Mutex<dyn Migratable + Send>>> {
        vec![
            self.serial.clone(),
            self.i8042.clone(),
            self.exit_port.clone(),
            self.cmos.clone(),
            self.post.clone(),
        ]
    }
}
