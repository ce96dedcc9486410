//! Fakes shared by the PCI unit tests: an [`MsiRouting`] that records what KVM would be told.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use super::irq::{IrqError, MsiMessage, MsiRouting};

#[derive(Default)]
pub struct FakeRouting {
    pub state: Mutex<FakeRoutingState>,
}

#[derive(Default)]
pub struct FakeRoutingState {
    pub next: u32,
    pub allocated: BTreeSet<u32>,
    pub routes: BTreeMap<u32, MsiMessage>,
    pub irqfds: BTreeSet<u32>,
    /// Number of route commits, to check batching.
    pub commits: usize,
}

impl FakeRouting {
    pub fn routes(&self) -> BTreeMap<u32, MsiMessage> {
        self.state.lock().unwrap().routes.clone()
    }

    pub fn irqfds(&self) -> BTreeSet<u32> {
        self.state.lock().unwrap().irqfds.clone()
    }
}

impl MsiRouting for FakeRouting {
    fn allocate_gsi(&self) -> Result<u32, IrqError> {
        let mut s = self.state.lock().unwrap();
        let g = 24 + s.next;
        s.next += 1;
        s.allocated.insert(g);
        Ok(g)
    }

    fn free_gsi(&self, gsi: u32) {
        let mut s = self.state.lock().unwrap();
        s.allocated.remove(&gsi);
        s.routes.remove(&gsi);
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
        self.set_routes(&[(gsi, msg)])
    }

    fn set_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> Result<(), IrqError> {
        let mut s = self.state.lock().unwrap();
        for &(gsi, msg) in routes {
            if !s.allocated.contains(&gsi) {
                return Err(IrqError::UnknownGsi(gsi));
            }
            match msg {
                Some(m) => s.routes.insert(gsi, m),
                None => s.routes.remove(&gsi),
            };
        }
        s.commits += 1;
        Ok(())
    }

    fn register_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        let mut s = self.state.lock().unwrap();
        assert!(
            s.routes.contains_key(&gsi),
            "irqfd attached before its route"
        );
        assert!(s.irqfds.insert(gsi), "irqfd attached twice");
        Ok(())
    }

    fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        assert!(
            self.state.lock().unwrap().irqfds.remove(&gsi),
            "irqfd not attached"
        );
        Ok(())
    }
}
