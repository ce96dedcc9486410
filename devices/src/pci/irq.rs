//! Message-signalled interrupts as KVM delivers them: each vector is an eventfd registered as
//! an irqfd on its own GSI, and the GSI's route (`KVM_SET_GSI_ROUTING`, type MSI) carries the
//! address/data the guest programmed. Masking a vector detaches its irqfd, so signals that
//! arrive meanwhile stay counted in the eventfd; KVM delivers them when the irqfd is attached
//! again (it polls the eventfd on KVM_IRQFD), which is the pending-bit behaviour MSI-X asks for.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES, KvmIrqRouting,
    kvm_irq_routing_entry,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// GSIs the in-kernel IOAPIC owns; MSI routes are allocated above them.
pub const IOAPIC_PINS: u32 = 24;
const PIC_PINS: u32 = 16;
const KVM_IRQCHIP_PIC_MASTER: u32 = 0;
const KVM_IRQCHIP_PIC_SLAVE: u32 = 1;
const KVM_IRQCHIP_IOAPIC: u32 = 2;

/// An MSI as the guest programs it (x86: address 0xFEEx_xxxx, data holds vector and mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// A change to one vector of a device: deliver `msg` from now on, or nothing (`None`: masked
/// or disabled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VectorRoute {
    pub vector: u16,
    pub msg: Option<MsiMessage>,
}

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("no free GSI left for MSI routes")]
    NoGsi,
    #[error("GSI {0} is not an allocated MSI GSI")]
    UnknownGsi(u32),
    #[error("KVM_SET_GSI_ROUTING failed: {0}")]
    SetRouting(#[source] kvm_ioctls::Error),
    #[error("cannot build the routing table: {0}")]
    RoutingTable(String),
    #[error("KVM_IRQFD on GSI {gsi} failed: {err}")]
    Irqfd {
        gsi: u32,
        #[source]
        err: kvm_ioctls::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("vector {0} is out of range")]
    Vector(u16),
    #[error("level-triggered (resample) irqfds are not available")]
    NoResample,
}

/// How MSI/MSI-X vectors reach the guest. The VMM implements it with KVM ([`KvmMsiRouting`]);
/// tests use a recording fake.
pub trait MsiRouting: Send + Sync {
    fn allocate_gsi(&self) -> Result<u32, IrqError>;
    fn free_gsi(&self, gsi: u32);
    /// Points `gsi` at `msg`, or removes its route.
    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError>;
    /// Several routes in one commit (one `KVM_SET_GSI_ROUTING` instead of one per vector).
    fn set_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> Result<(), IrqError> {
        routes.iter().try_for_each(|&(g, m)| self.set_route(g, m))
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError>;
    /// Detaches an irqfd, with or without a resample fd.
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError>;
    /// A level-triggered line (INTx on an IOAPIC pin `gsi`): `fd` asserts it, and KVM signals
    /// `resample` when the guest EOIs, so the device can re-assert if still pending.
    fn register_resample_irqfd(
        &self,
        _fd: &EventFd,
        _resample: &EventFd,
        _gsi: u32,
    ) -> Result<(), IrqError> {
        Err(IrqError::NoResample)
    }
}

/// The whole GSI routing table. KVM replaces its table on every `KVM_SET_GSI_ROUTING`, so the
/// in-kernel irqchip's default routes (which KVM installs at `KVM_CREATE_IRQCHIP`) must be part
/// of every commit, or legacy interrupts such as the serial port's GSI 4 stop working.
struct RouteTable {
    legacy: Vec<kvm_irq_routing_entry>,
    msi: BTreeMap<u32, Option<MsiMessage>>,
    free: Vec<u32>,
    next: u32,
    limit: u32,
}

impl RouteTable {
    fn new(in_kernel_irqchip: bool) -> Self {
        let legacy = if in_kernel_irqchip {
            irqchip_default_routes()
        } else {
            Vec::new()
        };
        // The kernel bounds both the GSI numbers and the entry count by KVM_MAX_IRQ_ROUTES.
        let room = (KVM_MAX_IRQ_ROUTES - legacy.len()) as u32;
        RouteTable {
            legacy,
            msi: BTreeMap::new(),
            free: Vec::new(),
            next: IOAPIC_PINS,
            limit: (IOAPIC_PINS + room).min(KVM_MAX_IRQ_ROUTES as u32),
        }
    }

    fn allocate(&mut self) -> Result<u32, IrqError> {
        let gsi = match self.free.pop() {
            Some(g) => g,
            None if self.next < self.limit => {
                self.next += 1;
                self.next - 1
            }
            None => return Err(IrqError::NoGsi),
        };
        self.msi.insert(gsi, None);
        Ok(gsi)
    }

    fn release(&mut self, gsi: u32) -> bool {
        let known = self.msi.remove(&gsi).is_some();
        if known {
            self.free.push(gsi);
        }
        known
    }

    /// Sets a route and returns the previous one, for rollback.
    fn set(&mut self, gsi: u32, msg: Option<MsiMessage>) -> Result<Option<MsiMessage>, IrqError> {
        let slot = self.msi.get_mut(&gsi).ok_or(IrqError::UnknownGsi(gsi))?;
        Ok(std::mem::replace(slot, msg))
    }

    fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let msi = self
            .msi
            .iter()
            .filter_map(|(&gsi, m)| m.map(|m| msi_entry(gsi, m)));
        self.legacy.iter().copied().chain(msi).collect()
    }
}

/// KVM's own default table (arch/x86/kvm/irq_comm.c `default_routing`): GSI 0-15 to the
/// IOAPIC pin and the PIC pin, GSI 16-23 to the IOAPIC only.
fn irqchip_default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < PIC_PINS {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip_entry(gsi, chip, gsi % 8));
        }
    }
    v
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_entry(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = m.address as u32;
    e.u.msi.address_hi = (m.address >> 32) as u32;
    e.u.msi.data = m.data;
    e
}

/// [`MsiRouting`] on a KVM VM: owns the VM's whole GSI routing table.
pub struct KvmMsiRouting {
    vm: Arc<VmFd>,
    table: Mutex<RouteTable>,
}

impl KvmMsiRouting {
    /// `in_kernel_irqchip`: whether the VM has `KVM_CREATE_IRQCHIP`'s PIC and IOAPIC, whose
    /// default routes are then kept in every commit.
    pub fn new(vm: Arc<VmFd>, in_kernel_irqchip: bool) -> Self {
        KvmMsiRouting {
            vm,
            table: Mutex::new(RouteTable::new(in_kernel_irqchip)),
        }
    }

    fn table(&self) -> MutexGuard<'_, RouteTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    // The table lock is held across the ioctl so that commits reach KVM in table order.
    fn commit(&self, table: &RouteTable) -> Result<(), IrqError> {
        let routing = KvmIrqRouting::from_entries(&table.entries())
            .map_err(|e| IrqError::RoutingTable(format!("{e:?}")))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(IrqError::SetRouting)
    }
}

impl MsiRouting for KvmMsiRouting {
    fn allocate_gsi(&self) -> Result<u32, IrqError> {
        self.table().allocate()
    }

    fn free_gsi(&self, gsi: u32) {
        let mut t = self.table();
        let routed = t.msi.get(&gsi).is_some_and(Option::is_some);
        if t.release(gsi)
            && routed
            && let Err(e) = self.commit(&t)
        {
            log::warn!("dropping the route of GSI {gsi}: {e}");
        }
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
        self.set_routes(&[(gsi, msg)])
    }

    fn set_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> Result<(), IrqError> {
        let mut t = self.table();
        let mut old = Vec::with_capacity(routes.len());
        for &(gsi, msg) in routes {
            match t.set(gsi, msg) {
                Ok(prev) => old.push((gsi, prev)),
                Err(e) => {
                    rollback(&mut t, &old);
                    return Err(e);
                }
            }
        }
        self.commit(&t).inspect_err(|_| rollback(&mut t, &old))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(|err| IrqError::Irqfd { gsi, err })
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.vm
            .unregister_irqfd(fd, gsi)
            .map_err(|err| IrqError::Irqfd { gsi, err })
    }

    fn register_resample_irqfd(
        &self,
        fd: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> Result<(), IrqError> {
        self.vm
            .register_irqfd_with_resample(fd, resample, gsi)
            .map_err(|err| IrqError::Irqfd { gsi, err })
    }
}

fn rollback(t: &mut RouteTable, old: &[(u32, Option<MsiMessage>)]) {
    for &(gsi, prev) in old.iter().rev() {
        // Only GSIs that were just set successfully are in `old`, so this cannot fail.
        let _ = t.set(gsi, prev);
    }
}

struct Vector {
    gsi: u32,
    eventfd: EventFd,
    attached: bool,
}

/// One device's vectors: an eventfd per vector (what the device signals) on a GSI of its own
/// (what KVM routes). Dropping it detaches and frees everything.
pub struct MsiVectors {
    routing: Arc<dyn MsiRouting>,
    vectors: Vec<Vector>,
}

impl MsiVectors {
    /// Allocates `count` GSIs and eventfds; nothing is routed until [`MsiVectors::apply`].
    pub fn new(routing: Arc<dyn MsiRouting>, count: usize) -> Result<Self, IrqError> {
        let mut v = MsiVectors {
            routing,
            vectors: Vec::with_capacity(count),
        };
        for _ in 0..count {
            let eventfd = EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?;
            let gsi = v.routing.allocate_gsi()?;
            v.vectors.push(Vector {
                gsi,
                eventfd,
                attached: false,
            });
        }
        Ok(v)
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// The eventfds in vector order, to hand to the device (VFIO `SET_IRQS`).
    pub fn eventfds(&self) -> Vec<&EventFd> {
        self.vectors.iter().map(|v| &v.eventfd).collect()
    }

    pub fn gsi(&self, vector: u16) -> Option<u32> {
        self.vectors.get(usize::from(vector)).map(|v| v.gsi)
    }

    /// Applies route changes: detach irqfds of vectors going quiet, commit all routes at once,
    /// then attach irqfds of vectors coming live (after their route exists, so a signal that
    /// was pending is delivered to the new message).
    pub fn apply(&mut self, routes: &[VectorRoute]) -> Result<(), IrqError> {
        if let Some(r) = routes
            .iter()
            .find(|r| usize::from(r.vector) >= self.vectors.len())
        {
            return Err(IrqError::Vector(r.vector));
        }
        for r in routes.iter().filter(|r| r.msg.is_none()) {
            let v = &mut self.vectors[usize::from(r.vector)];
            if v.attached {
                self.routing.unregister_irqfd(&v.eventfd, v.gsi)?;
                v.attached = false;
            }
        }
        let gsis: Vec<_> = routes
            .iter()
            .map(|r| (self.vectors[usize::from(r.vector)].gsi, r.msg))
            .collect();
        self.routing.set_routes(&gsis)?;
        for r in routes.iter().filter(|r| r.msg.is_some()) {
            let v = &mut self.vectors[usize::from(r.vector)];
            if !v.attached {
                self.routing.register_irqfd(&v.eventfd, v.gsi)?;
                v.attached = true;
            }
        }
        Ok(())
    }
}

impl Drop for MsiVectors {
    fn drop(&mut self) {
        for v in &self.vectors {
            if v.attached
                && let Err(e) = self.routing.unregister_irqfd(&v.eventfd, v.gsi)
            {
                log::warn!("detaching vector on GSI {}: {e}", v.gsi);
            }
            self.routing.free_gsi(v.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::testing::FakeRouting;

    fn msg(n: u32) -> Option<MsiMessage> {
        Some(MsiMessage {
            address: 0xfee0_0000,
            data: n,
        })
    }

    #[test]
    fn table_keeps_irqchip_routes_in_every_commit() {
        let mut t = RouteTable::new(true);
        assert_eq!(t.entries().len(), 40);
        let a = t.allocate().unwrap();
        let b = t.allocate().unwrap();
        assert_eq!((a, b), (24, 25));
        assert_eq!(t.entries().len(), 40, "unrouted GSIs are not committed");
        t.set(b, msg(0x31)).unwrap();
        let e = t.entries();
        assert_eq!(e.len(), 41);
        let serial: Vec<_> = e.iter().filter(|e| e.gsi == 4).collect();
        assert_eq!(serial.len(), 2, "GSI 4 on both IOAPIC and PIC");
        let last = e[40];
        assert_eq!((last.gsi, last.type_), (25, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was built as an MSI entry just above.
        assert_eq!(unsafe { last.u.msi.data }, 0x31);
        assert!(t.release(b));
        assert_eq!(t.entries().len(), 40);
        assert_eq!(t.allocate().unwrap(), 25, "freed GSI reused");
        assert!(matches!(t.set(99, None), Err(IrqError::UnknownGsi(99))));
    }

    #[test]
    fn table_is_bounded_by_kvm_max_routes() {
        let mut t = RouteTable::new(true);
        let mut n = 0;
        while t.allocate().is_ok() {
            n += 1;
        }
        assert_eq!(n, KVM_MAX_IRQ_ROUTES - 40);
        for g in IOAPIC_PINS..IOAPIC_PINS + n as u32 {
            t.set(g, msg(1)).unwrap();
        }
        assert!(KvmIrqRouting::from_entries(&t.entries()).is_ok());
        assert_eq!(RouteTable::new(false).entries().len(), 0);
    }

    #[test]
    fn vectors_attach_after_route_and_detach_before() {
        let r = Arc::new(FakeRouting::default());
        let mut v = MsiVectors::new(r.clone(), 3).unwrap();
        assert_eq!(v.eventfds().len(), 3);
        let g1 = v.gsi(1).unwrap();
        v.apply(&[
            VectorRoute {
                vector: 0,
                msg: msg(1),
            },
            VectorRoute {
                vector: 1,
                msg: msg(2),
            },
        ])
        .unwrap();
        assert_eq!(r.irqfds().len(), 2);
        assert_eq!(r.state.lock().unwrap().commits, 1, "one commit per batch");
        v.apply(&[VectorRoute {
            vector: 1,
            msg: None,
        }])
        .unwrap();
        assert!(!r.irqfds().contains(&g1));
        assert!(!r.routes().contains_key(&g1));
        assert!(matches!(
            v.apply(&[VectorRoute {
                vector: 3,
                msg: None
            }]),
            Err(IrqError::Vector(3))
        ));
        drop(v);
        let s = r.state.lock().unwrap();
        assert!(s.irqfds.is_empty() && s.allocated.is_empty() && s.routes.is_empty());
    }

    #[test]
    fn kvm_routing_commits_on_a_real_vm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let r: Arc<dyn MsiRouting> = Arc::new(KvmMsiRouting::new(vm.clone(), true));
        let mut v = MsiVectors::new(r.clone(), 2).unwrap();
        v.apply(&[VectorRoute {
            vector: 0,
            msg: msg(0x41),
        }])
        .unwrap();
        v.eventfds()[0].write(1).unwrap();
        v.apply(&[
            VectorRoute {
                vector: 0,
                msg: None,
            },
            VectorRoute {
                vector: 1,
                msg: msg(0x42),
            },
        ])
        .unwrap();
        // A GSI this table never handed out is refused before KVM is asked.
        assert!(r.set_route(5000, msg(1)).is_err());
        drop(v);
        vm.set_irq_line(4, true).unwrap();
    }
}
