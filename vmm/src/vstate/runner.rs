//! vCPU threads: one per vCPU running KVM_RUN, and the pause/resume primitive migration uses.
//!
//! Pause sets a shared flag, raises `immediate_exit` in each vCPU's kvm_run and sends a
//! signal, so a vCPU inside KVM_RUN returns EINTR and one about to enter returns at once.
//! A parked vCPU thread serves requests (save/restore state) until told to resume, so KVM
//! vCPU ioctls always run on the vCPU's own thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::Bus;
use kvm_ioctls::VcpuExit;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use super::vcpu::Vcpu;
use crate::exit::ExitSignal;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("cannot start vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("vCPU {0} did not stop within {1:?}")]
    PauseTimeout(u8, Duration),
    #[error("vCPU {0} thread is gone")]
    Gone(u8),
}

pub type VcpuJob = Box<dyn FnOnce(&mut Vcpu) + Send>;

enum Request {
    Resume,
    Run(VcpuJob),
    Exit,
}

/// The buses and exit signal every vCPU thread dispatches to.
#[derive(Clone)]
pub struct ExitContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: ExitSignal,
}

/// The `immediate_exit` byte of one vCPU's kvm_run page, settable from other threads.
struct ImmediateExit(*const AtomicU8);
// SAFETY: the pointer targets the vCPU's kvm_run mmap, which lives as long as the vCPU
// thread that owns the VcpuFd; handles are dropped only after that thread is joined.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above; the byte is only accessed atomically.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    fn set(&self) {
        // SAFETY: see the Send impl: the mapping outlives every handle.
        unsafe { (*self.0).store(1, Ordering::SeqCst) }
    }
}

struct Handle {
    index: u8,
    thread: JoinHandle<()>,
    requests: Sender<Request>,
    immediate_exit: ImmediateExit,
}

/// All vCPU threads of a VM.
pub struct Vcpus {
    handles: Vec<Handle>,
    pause: Arc<AtomicBool>,
    parked: Receiver<u8>,
    paused: bool,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler for the kick signal (idempotent).
pub fn install_kick_handler() -> Result<(), RunnerError> {
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(RunnerError::Signal)
}

impl Vcpus {
    /// Starts one thread per vCPU. With `start_paused` they park before entering the guest.
    pub fn start(
        vcpus: Vec<Vcpu>,
        ctx: ExitContext,
        start_paused: bool,
    ) -> Result<Self, RunnerError> {
        install_kick_handler()?;
        let pause = Arc::new(AtomicBool::new(start_paused));
        let (parked_tx, parked) = channel();
        let mut handles = Vec::new();
        for mut vcpu in vcpus {
            let index = vcpu.index;
            let run = vcpu.fd.get_kvm_run();
            // SAFETY: immediate_exit is a byte inside the vCPU's kvm_run mapping, valid and
            // aligned for as long as the VcpuFd lives (see ImmediateExit).
            let immediate_exit =
                ImmediateExit(unsafe { AtomicU8::from_ptr(&mut run.immediate_exit) });
            let (requests, rx) = channel();
            let (ctx, pause, parked_tx) = (ctx.clone(), pause.clone(), parked_tx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu_loop(&mut vcpu, &ctx, &pause, &rx, &parked_tx))
                .map_err(RunnerError::Spawn)?;
            handles.push(Handle {
                index,
                thread,
                requests,
                immediate_exit,
            });
        }
        let mut me = Vcpus {
            handles,
            pause,
            parked,
            paused: false,
        };
        if start_paused {
            me.wait_parked(Duration::from_secs(5))?;
            me.paused = true;
        }
        Ok(me)
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops every vCPU outside KVM_RUN; returns when all are parked.
    pub fn pause(&mut self) -> Result<(), RunnerError> {
        if self.paused {
            return Ok(());
        }
        self.pause.store(true, Ordering::SeqCst);
        self.kick_all();
        self.wait_parked(Duration::from_secs(5))?;
        self.paused = true;
        Ok(())
    }

    fn kick_all(&self) {
        for h in &self.handles {
            h.immediate_exit.set();
            if let Err(e) = h.thread.kill(SIGRTMIN()) {
                log::debug!("kick vCPU {}: {e}", h.index);
            }
        }
    }

    fn wait_parked(&self, limit: Duration) -> Result<(), RunnerError> {
        for h in &self.handles {
            match self.parked.recv_timeout(limit) {
                Ok(_) => {}
                Err(_) => return Err(RunnerError::PauseTimeout(h.index, limit)),
            }
        }
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), RunnerError> {
        if !self.paused {
            return Ok(());
        }
        self.pause.store(false, Ordering::SeqCst);
        for h in &self.handles {
            h.requests
                .send(Request::Resume)
                .map_err(|_| RunnerError::Gone(h.index))?;
        }
        self.paused = false;
        Ok(())
    }

    /// Runs `job(vcpu)` on each parked vCPU's own thread and collects the results in order.
    pub fn on_each<T: Send + 'static>(
        &self,
        job: impl Fn(&mut Vcpu) -> T + Send + Sync + Clone + 'static,
    ) -> Result<Vec<T>, RunnerError> {
        let mut out = Vec::new();
        for h in &self.handles {
            let (tx, rx) = channel();
            let job = job.clone();
            let run: VcpuJob = Box::new(move |v| {
                let _ = tx.send(job(v));
            });
            h.requests
                .send(Request::Run(run))
                .map_err(|_| RunnerError::Gone(h.index))?;
            out.push(rx.recv().map_err(|_| RunnerError::Gone(h.index))?);
        }
        Ok(out)
    }

    /// Stops and joins every vCPU thread (what dropping does).
    pub fn shutdown(self) {}
}

impl Drop for Vcpus {
    /// Joins every vCPU thread, so no thread or vCPU fd outlives its VM.
    fn drop(&mut self) {
        self.pause.store(true, Ordering::SeqCst);
        self.kick_all();
        for h in self.handles.drain(..) {
            let _ = h.requests.send(Request::Exit);
            // A running vCPU parks on the pause flag, then reads Exit.
            if h.thread.join().is_err() {
                log::error!("vCPU {} thread panicked", h.index);
            }
        }
    }
}

fn vcpu_loop(
    vcpu: &mut Vcpu,
    ctx: &ExitContext,
    pause: &AtomicBool,
    requests: &Receiver<Request>,
    parked: &Sender<u8>,
) {
    let mut last_failed_rip = None;
    loop {
        if pause.load(Ordering::SeqCst) {
            let _ = parked.send(vcpu.index);
            if !serve_while_parked(vcpu, requests) {
                return;
            }
            continue;
        }
        let step = match vcpu.fd.run() {
            Ok(VcpuExit::InternalError) => Step::InternalError,
            Ok(exit) => match handle_exit(vcpu.index, exit, ctx) {
                Some(code) => Step::Stop(code),
                None => Step::Continue,
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Interrupted,
            Err(e) => {
                log::error!("vCPU {}: KVM_RUN failed: {e}", vcpu.index);
                Step::Stop(1)
            }
        };
        let code = match step {
            Step::Continue => {
                last_failed_rip = None;
                continue;
            }
            Step::Interrupted => {
                vcpu.fd.set_kvm_immediate_exit(0);
                continue;
            }
            Step::InternalError if retry_emulation(vcpu, &mut last_failed_rip) => continue,
            Step::InternalError => {
                log_internal_error(vcpu);
                1
            }
            Step::Stop(code) => code,
        };
        ctx.exit.request(code);
        park_until_exit(vcpu, requests, parked, pause);
        return;
    }
}

enum Step {
    Continue,
    Interrupted,
    InternalError,
    Stop(i32),
}

/// After the guest asked to stop, the thread stays alive (answering pause) until shutdown.
fn park_until_exit(
    vcpu: &mut Vcpu,
    requests: &Receiver<Request>,
    parked: &Sender<u8>,
    pause: &AtomicBool,
) {
    while !pause.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = parked.send(vcpu.index);
    serve_while_parked(vcpu, requests);
}

/// Returns false when the thread must exit.
fn serve_while_parked(vcpu: &mut Vcpu, requests: &Receiver<Request>) -> bool {
    loop {
        match requests.recv() {
            Ok(Request::Resume) => return true,
            Ok(Request::Run(job)) => job(vcpu),
            Ok(Request::Exit) | Err(_) => return false,
        }
    }
}

/// Nested KVM on PVM hosts emulates a batch of instructions after an I/O exit and gives up
/// on ones its emulator lacks (SSE), although the instruction runs fine natively. Re-enter
/// once per instruction; a second failure at the same place with no other exit in between
/// is a real error.
fn retry_emulation(vcpu: &mut Vcpu, last_failed_rip: &mut Option<u64>) -> bool {
    // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member is the valid one.
    let suberror = unsafe { vcpu.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
    let Ok(rip) = vcpu.fd.get_regs().map(|r| r.rip) else {
        return false;
    };
    if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION || *last_failed_rip == Some(rip) {
        return false;
    }
    *last_failed_rip = Some(rip);
    true
}

/// Says where the guest was when KVM could not emulate an instruction.
fn log_internal_error(vcpu: &mut Vcpu) {
    // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member of the union is the
    // one KVM filled in.
    let internal = unsafe { vcpu.fd.get_kvm_run().__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let rip = vcpu.fd.get_regs().map(|r| r.rip).unwrap_or(0);
    let (cr0, cr4) = vcpu
        .fd
        .get_sregs()
        .map(|s| (s.cr0, s.cr4))
        .unwrap_or_default();
    log::error!(
        "vCPU {}: internal error suberror {} at rip {rip:#x} (cr0 {cr0:#x} cr4 {cr4:#x}), data {:x?}",
        vcpu.index,
        internal.suberror,
        &internal.data[..n]
    );
}

/// Dispatches one exit; `Some(code)` ends the VM.
fn handle_exit(index: u8, exit: VcpuExit<'_>, ctx: &ExitContext) -> Option<i32> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.pio.read(port as u64, data);
        }
        VcpuExit::IoOut(port, data) => {
            ctx.pio.write(port as u64, data);
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.mmio.read(addr, data);
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio.write(addr, data);
        }
        VcpuExit::Hlt => {}
        VcpuExit::Shutdown => {
            log::warn!("vCPU {index}: guest shutdown (triple fault or reset)");
            return Some(0);
        }
        VcpuExit::SystemEvent(kind, _) => {
            log::info!("vCPU {index}: system event {kind}");
            return Some(0);
        }
        VcpuExit::FailEntry(reason, cpu) => {
            log::error!("vCPU {index}: VM entry failed, reason {reason:#x} on host CPU {cpu}");
            return Some(1);
        }
        other => {
            log::error!("vCPU {index}: unexpected exit {other:?}");
            return Some(1);
        }
    }
    None
}
