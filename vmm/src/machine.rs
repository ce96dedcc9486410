//! A running VM: build it, load the kernel, start the vCPUs (the vmm-reference boot path).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::LegacyError;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

use crate::boot::{self, BootError, BootSpec, KernelImage};
use crate::cli::{ReceiveArgs, RunArgs};
use crate::devices_setup::{DeviceSetupError, Devices, Passthrough};
use crate::event_loop;
use crate::exit::ExitSignal;
use crate::migrate::{self, MigrateError, SharedInfo, dest};
use crate::vstate::cpuid::{self, CpuidEntry};
use crate::vstate::memory::{MemoryError, Ram};
use crate::vstate::runner::{ExitContext, RunnerError, Vcpus};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};
use devices::serial::SerialOutput;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error(transparent)]
    Devices(#[from] DeviceSetupError),
    #[error(transparent)]
    Exit(#[from] LegacyError),
    #[error("{0} vCPUs requested, but this host allows 1 to {1}")]
    VcpuCount(u16, usize),
    #[error("no embedded guest named '{0}' (see `minivmm guests`)")]
    UnknownGuest(String),
    #[error("KVM {what} failed: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("control socket: {0}")]
    Api(std::io::Error),
}

/// Everything a live VM consists of. Held behind a mutex shared by the event loop, the
/// control API and the migration thread.
/// Fields drop in order: vCPU threads stop first, then devices (passthrough devices withdraw
/// their DMA mappings), then the guest RAM those mappings pointed into, then the VM.
pub struct Machine {
    pub vcpus: Vcpus,
    pub devices: Devices,
    pub ram: Ram,
    pub vm: Vm,
    pub exit: ExitSignal,
    pub started: Instant,
    /// The CPUID vCPU 0 was configured with (what a destination must match).
    pub cpuid: Vec<CpuidEntry>,
    /// The outgoing migration's progress, for the control API.
    pub migration: SharedInfo,
}

pub type SharedMachine = Arc<Mutex<Machine>>;

/// `minivmm run`: boot, serve the event loop until the guest or a request ends the VM.
pub fn run(args: &RunArgs) -> Result<i32, MachineError> {
    let machine = Machine::boot(args)?;
    let info = machine.migration.clone();
    let shared = Arc::new(Mutex::new(machine));
    if let Some(to) = &args.migrate_to {
        let opts = migrate::options(to, &args.tuning);
        let after = Duration::from_secs_f64(args.migrate_after.max(0.0));
        migrate::spawn(shared.clone(), opts, info, after);
    }
    serve(shared, &args.serial, args.api_sock.as_deref())
}

/// `minivmm receive`: take one incoming migration, then be that VM.
pub fn receive(args: &ReceiveArgs) -> Result<i32, MigrateError> {
    let passthrough = crate::cli::passthrough(&args.vfio, &args.vfio_user);
    let opts = dest::ReceiveOptions::from_args(args);
    let (machine, stats) = dest::receive(&opts, &args.serial, &passthrough)?;
    println!("{}", stats.to_json());
    Ok(serve(
        Arc::new(Mutex::new(machine)),
        &args.serial,
        args.api_sock.as_deref(),
    )?)
}

/// Runs the event loop of a live machine until it ends; returns the exit code.
fn serve(
    shared: SharedMachine,
    serial: &SerialOutput,
    api_sock: Option<&std::path::Path>,
) -> Result<i32, MachineError> {
    let (exit, serial_dev) = {
        let m = shared.lock().unwrap_or_else(|e| e.into_inner());
        (m.exit.clone(), m.devices.serial.clone())
    };
    let stdin = *serial == SerialOutput::Stdout;
    let code = event_loop::run(&shared, &exit, serial_dev, stdin, api_sock)?;
    shutdown(shared);
    Ok(code)
}

/// Stops the vCPU threads of a machine nobody else holds any more.
pub fn shutdown(shared: SharedMachine) {
    match Arc::try_unwrap(shared) {
        Ok(m) => m
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .vcpus
            .shutdown(),
        Err(_) => log::warn!("machine still referenced at exit; vCPU threads end with the process"),
    }
}

impl Machine {
    /// `minivmm run`: a new VM with the kernel loaded and vCPU 0 at its entry point.
    pub fn boot(args: &RunArgs) -> Result<Self, MachineError> {
        let kernel = match (&args.kernel, &args.guest) {
            (Some(path), _) => KernelImage::Path(path.clone()),
            (None, Some(name)) => KernelImage::Embedded(
                guests::find(name)
                    .ok_or_else(|| MachineError::UnknownGuest(name.clone()))?
                    .elf,
            ),
            (None, None) => return Err(MachineError::UnknownGuest(String::new())),
        };
        let spec = BootSpec {
            kernel,
            initramfs: args.initramfs.clone(),
            cmdline: args.cmdline.clone(),
            vcpus: 0,
            mem_size: args.memory,
        };
        let passthrough = crate::cli::passthrough(&args.vfio, &args.vfio_user);
        Self::assemble(
            args.memory,
            args.vcpus,
            &args.serial,
            &passthrough,
            Some(spec),
        )
    }

    /// `minivmm receive`: the same VM without a kernel, vCPUs parked until the state arrives.
    pub fn for_incoming(
        memory: u64,
        vcpus: u16,
        serial: &SerialOutput,
        passthrough: &[Passthrough],
    ) -> Result<Self, MachineError> {
        Self::assemble(memory, vcpus, serial, passthrough, None)
    }

    fn assemble(
        memory: u64,
        vcpus: u16,
        serial: &SerialOutput,
        passthrough: &[Passthrough],
        boot_spec: Option<BootSpec>,
    ) -> Result<Self, MachineError> {
        let vm = Vm::new()?;
        let max = vm.max_vcpus().min(boot::MAX_VCPUS as usize);
        if vcpus == 0 || vcpus as usize > max {
            return Err(MachineError::VcpuCount(vcpus, max));
        }
        let count = vcpus as u8;
        let ram = Ram::new(memory)?;
        vm.set_ram_slots(&ram)?;
        let exit = ExitSignal::new()?;
        let mut devices = Devices::new(&vm, memory, serial, &exit)?;
        for p in passthrough {
            devices.add_passthrough(&vm, &ram.mem, p)?;
        }
        let (vcpus, cpuid) = create_vcpus(&vm, count)?;
        let incoming = boot_spec.is_none();
        if let Some(spec) = boot_spec {
            let info = boot::load(
                &ram.mem,
                &BootSpec {
                    vcpus: count,
                    ..spec
                },
            )?;
            set_boot_registers(&vcpus[0], info.entry.0)?;
        }
        let ctx = ExitContext {
            pio: devices.pio.clone(),
            mmio: devices.mmio.clone(),
            exit: exit.clone(),
        };
        let vcpus = Vcpus::start(vcpus, ctx, incoming)?;
        Ok(Machine {
            vm,
            ram,
            vcpus,
            devices,
            exit,
            started: Instant::now(),
            cpuid,
            migration: SharedInfo::default(),
        })
    }
}

/// Creates and configures `count` vCPUs (CPUID, MSRs, LAPIC); the secondaries then wait
/// for INIT/SIPI in the in-kernel LAPIC. Also returns vCPU 0's CPUID.
pub fn create_vcpus(vm: &Vm, count: u8) -> Result<(Vec<Vcpu>, Vec<CpuidEntry>), MachineError> {
    let supported = vm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|err| MachineError::Kvm {
            what: "get supported CPUID",
            err,
        })?;
    let cpuid = cpuid::to_entries(&cpuid::for_vcpu(&supported, 0, count as u32));
    let vcpus = (0..count)
        .map(|index| {
            let fd = vm
                .fd
                .create_vcpu(index as u64)
                .map_err(|err| MachineError::Kvm {
                    what: "create vCPU",
                    err,
                })?;
            let vcpu = Vcpu { index, fd };
            vcpu.configure(&supported, count)?;
            Ok(vcpu)
        })
        .collect::<Result<_, MachineError>>()?;
    Ok((vcpus, cpuid))
}

fn set_boot_registers(bsp: &Vcpu, entry: u64) -> Result<(), MachineError> {
    let kvm = |what| move |err| MachineError::Kvm { what, err };
    let mut sregs = bsp.fd.get_sregs().map_err(kvm("get sregs"))?;
    boot::long_mode_sregs(&mut sregs);
    bsp.fd.set_sregs(&sregs).map_err(kvm("set sregs"))?;
    bsp.fd
        .set_regs(&boot::boot_regs(vm_memory::GuestAddress(entry)))
        .map_err(kvm("set regs"))?;
    bsp.fd.set_fpu(&boot::boot_fpu()).map_err(kvm("set FPU"))?;
    Ok(())
}
