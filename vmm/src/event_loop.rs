//! The main thread's event loop (event-manager): guest exit, serial input from stdin, and
//! the control socket.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::serial::SerialDevice;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;

use crate::api::ApiServer;
use crate::exit::ExitSignal;
use crate::machine::{MachineError, SharedMachine};

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes the loop when the VM must end.
struct ExitWatcher(ExitSignal);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.wait_fd().read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.wait_fd(), EventSet::IN)) {
            log::error!("cannot watch the exit event: {e:?}");
        }
    }
}

/// Feeds bytes typed on stdin to the guest's UART.
struct StdinInput(Arc<Mutex<SerialDevice>>);

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf) {
            Ok(0) | Err(_) => {
                // EOF or a broken stdin: stop watching it rather than spin.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                let mut serial = self.0.lock().unwrap_or_else(|e| e.into_inner());
                if serial.enqueue_input(&buf[..n]) < n {
                    log::debug!("serial input FIFO full; dropped typed bytes");
                }
            }
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        // /dev/null and regular files cannot be polled; then there simply is no input.
        if ops
            .add(Events::new_raw(stdin.as_raw_fd(), EventSet::IN))
            .is_err()
        {
            log::debug!("stdin is not pollable; serial input disabled");
        }
    }
}

/// Unmasks a passthrough device's INTx after each guest EOI, for devices that take no unmask
/// eventfd: KVM signals the resample eventfd, and the VMM tells the device.
struct IntxEoi {
    fd: vmm_sys_util::eventfd::EventFd,
    dev: Arc<Mutex<devices::pci::VfioPciDevice>>,
}

impl MutEventSubscriber for IntxEoi {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .intx_eoi();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch an INTx resample event: {e:?}");
        }
    }
}

/// Runs until the guest, a vCPU error or a control request ends the VM; returns the exit code.
pub fn run(
    shared: &SharedMachine,
    exit: &ExitSignal,
    serial: Arc<Mutex<SerialDevice>>,
    stdin_to_serial: bool,
    api_sock: Option<&Path>,
) -> Result<i32, MachineError> {
    let mut em = EventManager::<Subscriber>::new()
        .map_err(|e| MachineError::Api(std::io::Error::other(format!("event manager: {e:?}"))))?;
    em.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit.clone()))));
    if stdin_to_serial {
        em.add_subscriber(Arc::new(Mutex::new(StdinInput(serial))));
    }
    let passthrough: Vec<_> = {
        let m = shared.lock().unwrap_or_else(|e| e.into_inner());
        m.devices
            .passthrough
            .iter()
            .map(|p| p.dev.clone())
            .collect()
    };
    for dev in passthrough {
        let fd = dev.lock().unwrap_or_else(|e| e.into_inner()).intx_eoi_fd();
        if let Some(fd) = fd {
            em.add_subscriber(Arc::new(Mutex::new(IntxEoi { fd, dev })));
        }
    }
    if let Some(path) = api_sock {
        let api = ApiServer::bind(path, shared.clone(), exit.clone()).map_err(MachineError::Api)?;
        em.add_subscriber(Arc::new(Mutex::new(api)));
    }
    loop {
        if let Some(code) = exit.code() {
            return Ok(code);
        }
        if let Err(e) = em.run_with_timeout(200) {
            log::warn!("event loop: {e:?}");
        }
    }
}
