//! Device migration: the v2 state machine (strict: a request the uAPI does not allow is
//! refused and counted), the data session of the saving and resuming states, and the v1
//! region built on the same machine.

pub mod loader;
pub mod saver;
pub mod snapshot;
pub mod stream;
pub mod v1;

use vfio_user::{MigState, PrecopyInfo, is_direct_arc, next_state};

use crate::core::{Core, RunMode};
use crate::engine::DmaJob;
use crate::error::Refusal;
use crate::options::{DeviceOptions, FailArc, MigMode};
use loader::Loader;
use saver::Saver;

enum Session {
    Idle,
    Save(Saver),
    // Boxed: the loader holds a whole staged device record.
    Load(Box<Loader>),
}

pub struct Migration {
    mode: MigMode,
    /// The `VFIO_MIGRATION_*` flags the state machine walks with.
    flags: u64,
    state: MigState,
    session: Session,
    fail: Option<FailArc>,
    corrupt: bool,
    v1: v1::V1Area,
}

impl Migration {
    pub fn new(o: &DeviceOptions) -> Migration {
        Migration {
            mode: o.mode,
            flags: o.fsm_flags(),
            // Drivers start in RUNNING (the uAPI leaves it unsaid; libvfio-user#779).
            state: MigState::Running,
            session: Session::Idle,
            fail: o.fail_arc,
            corrupt: o.corrupt_stream,
            v1: v1::V1Area::default(),
        }
    }

    pub fn state(&self) -> MigState {
        self.state
    }

    /// Shows the state in the MIG_STATE register (v1: its device_state bits).
    pub fn publish(&self, core: &mut Core) {
        core.mig.state = match self.mode {
            MigMode::V1 => u64::from(v1::bits(self.state)),
            _ => self.state as u64,
        };
    }

    /// DEVICE_RESET: back to RUNNING, any session gone (the core was reset already).
    pub fn reset(&mut self, core: &mut Core) {
        self.end_session(core);
        self.v1 = v1::V1Area::default();
        self.state = MigState::Running;
        self.publish(core);
    }

    fn end_session(&mut self, core: &mut Core) {
        if matches!(self.session, Session::Save(_)) {
            core.state.stop_tracking();
        }
        self.session = Session::Idle;
    }

    fn invalid(&self, core: &mut Core, to: MigState) -> Refusal {
        core.mig.invalid_arcs += 1;
        let n = core.mig.invalid_arcs;
        log::warn!(
            "invalid migration arc {} -> {to} refused (invalid arcs: {n})",
            self.state
        );
        Refusal::inval(format!(
            "migration arc {} -> {to} is not allowed",
            self.state
        ))
    }

    /// A SET with a number that is no state at all.
    pub fn invalid_raw(&self, core: &mut Core, raw: u32) -> Refusal {
        core.mig.invalid_arcs += 1;
        let n = core.mig.invalid_arcs;
        log::warn!(
            "migration state {raw} requested in {}: refused (invalid arcs: {n})",
            self.state
        );
        Refusal::inval(format!("{raw} is not a migration state"))
    }

    /// Walks to `target` one direct arc at a time, as `vfio_mig_get_next_state` would.
    /// A DMA that waited for RUNNING is handed to `submit` when an arc resumes the device.
    /// On failure the device stays where the failing arc started, or goes to ERROR.
    pub fn set_state(
        &mut self,
        core: &mut Core,
        target: MigState,
        submit: &mut dyn FnMut(DmaJob),
    ) -> Result<(), Refusal> {
        while self.state != target {
            let cur = self.state;
            let next = match next_state(cur, target, self.flags) {
                Some(n) if is_direct_arc(cur, n, self.flags) => n,
                _ => return Err(self.invalid(core, target)),
            };
            let r = self
                .inject(cur, next)
                .and_then(|()| self.arc(core, cur, next, submit));
            if let Err(e) = r {
                core.mig.failed_arcs += 1;
                log::warn!(
                    "migration arc {cur} -> {next} failed: {e}; now {}",
                    self.state
                );
                self.publish(core);
                return Err(e);
            }
            log::info!("migration arc {cur} -> {next}");
            self.state = next;
            self.publish(core);
        }
        Ok(())
    }

    /// `--fail-arc`: fail this arc while failures are left.
    fn inject(&mut self, from: MigState, to: MigState) -> Result<(), Refusal> {
        let Some(f) = &mut self.fail else {
            return Ok(());
        };
        if (f.from, f.to) != (from, to) || f.count == Some(0) {
            return Ok(());
        }
        if let Some(n) = &mut f.count {
            *n -= 1;
        }
        Err(Refusal::new(
            libc::EIO,
            format!("injected failure of arc {from} -> {to}"),
        ))
    }

    fn arc(
        &mut self,
        core: &mut Core,
        from: MigState,
        to: MigState,
        submit: &mut dyn FnMut(DmaJob),
    ) -> Result<(), Refusal> {
        use MigState::*;
        let nomem = |e: crate::state::NoMemory| Refusal::new(libc::ENOMEM, e.to_string());
        match (from, to) {
            (Running, RunningP2p) | (PreCopy, PreCopyP2p) | (Stop, RunningP2p) => {
                core.run = RunMode::Quiesced
            }
            (Running, Stop) | (RunningP2p, Stop) => core.run = RunMode::Stopped,
            (RunningP2p, Running) | (Stop, Running) | (PreCopyP2p, PreCopy) => {
                core.resume().into_iter().for_each(&mut *submit)
            }
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) => {
                self.session = Session::Save(Saver::new(core, false, self.corrupt).map_err(nomem)?)
            }
            (Stop, StopCopy) => {
                self.session = Session::Save(Saver::new(core, true, self.corrupt).map_err(nomem)?)
            }
            (PreCopy, StopCopy) | (PreCopyP2p, StopCopy) => {
                core.run = RunMode::Stopped;
                if let Session::Save(s) = &mut self.session {
                    s.stop();
                }
            }
            (PreCopy, Running) | (PreCopyP2p, RunningP2p) | (StopCopy, Stop) => {
                self.end_session(core)
            }
            (Stop, Resuming) => {
                self.session = Session::Load(Box::new(Loader::new(core.state.size(), core.irq())))
            }
            (Resuming, Stop) => self.load(core)?,
            _ => return Err(Refusal::inval(format!("no action for arc {from} -> {to}"))),
        }
        Ok(())
    }

    /// RESUMING → STOP: install the stream, or refuse it and go to ERROR (the uAPI allows
    /// either; ERROR makes the client reset, which a half-known device needs).
    fn load(&mut self, core: &mut Core) -> Result<(), Refusal> {
        let Session::Load(l) = std::mem::replace(&mut self.session, Session::Idle) else {
            return Err(Refusal::inval("RESUMING without a load session"));
        };
        match l.finish() {
            Ok((snap, state)) => {
                snap.apply(core, state);
                log::info!("migration stream loaded");
                Ok(())
            }
            Err(why) => {
                self.state = MigState::Error;
                core.run = RunMode::Stopped;
                Err(Refusal::inval(format!("migration stream refused: {why}")))
            }
        }
    }

    /// MIG_DATA_READ: empty means the end in STOP_COPY; in pre-copy "nothing now" is ENOMSG.
    pub fn read(&mut self, core: &mut Core, max: usize) -> Result<Vec<u8>, Refusal> {
        let Session::Save(s) = &mut self.session else {
            return Err(Refusal::inval(format!("no data to read in {}", self.state)));
        };
        let data = s.read(core, max);
        if data.is_empty() && self.state != MigState::StopCopy {
            return Err(Refusal::new(libc::ENOMSG, "no pre-copy data available now"));
        }
        Ok(data)
    }

    /// MIG_DATA_WRITE: only in RESUMING; a bad stream is refused at once and for good.
    pub fn write(&mut self, data: &[u8]) -> Result<(), Refusal> {
        let Session::Load(l) = &mut self.session else {
            return Err(Refusal::inval(format!(
                "cannot take data in {}",
                self.state
            )));
        };
        l.write(data).map_err(|why| {
            log::warn!("migration stream refused: {why}");
            Refusal::inval(format!("migration stream refused: {why}"))
        })
    }

    /// MIG_DATA_SIZE: what STOP_COPY would still produce.
    pub fn data_size(&self, core: &Core) -> u64 {
        match &self.session {
            Session::Save(s) => s.remaining(core),
            _ => Saver::full_size(core),
        }
    }

    /// Valid only in PRE_COPY and PRE_COPY_P2P, like the kernel ioctl.
    pub fn precopy_info(&self, core: &Core) -> Result<PrecopyInfo, Refusal> {
        match &self.session {
            Session::Save(s) if matches!(self.state, MigState::PreCopy | MigState::PreCopyP2p) => {
                Ok(s.precopy_info(core))
            }
            _ => Err(Refusal::inval(format!(
                "no pre-copy info in {}",
                self.state
            ))),
        }
    }
}
