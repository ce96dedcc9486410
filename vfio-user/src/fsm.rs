//! The VFIO migration v2 state machine (`enum vfio_device_mig_state` in `<linux/vfio.h>`):
//! states, which of them a feature set offers, the direct arcs a device implements, and the
//! next hop toward a requested state, as the kernel's `vfio_mig_get_next_state()` computes it.
//! Devices walk these hops themselves; a client issues one SET with the final state.

use crate::vfio::{VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MigState {
    Error = 0,
    Stop = 1,
    Running = 2,
    StopCopy = 3,
    Resuming = 4,
    RunningP2p = 5,
    PreCopy = 6,
    PreCopyP2p = 7,
}

use MigState::*;

impl MigState {
    pub const ALL: [MigState; 8] = [
        Error, Stop, Running, StopCopy, Resuming, RunningP2p, PreCopy, PreCopyP2p,
    ];

    pub fn from_u32(v: u32) -> Option<MigState> {
        Self::ALL.into_iter().find(|s| *s as u32 == v)
    }

    /// The uAPI name without its `VFIO_DEVICE_STATE_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            Error => "ERROR",
            Stop => "STOP",
            Running => "RUNNING",
            StopCopy => "STOP_COPY",
            Resuming => "RESUMING",
            RunningP2p => "RUNNING_P2P",
            PreCopy => "PRE_COPY",
            PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// Parses a name as [`MigState::name`] prints it (case-insensitive).
    pub fn from_name(s: &str) -> Option<MigState> {
        Self::ALL
            .into_iter()
            .find(|st| st.name().eq_ignore_ascii_case(s.trim()))
    }

    /// The migration flags a device must advertise to have this state.
    pub fn required_flags(self) -> u64 {
        match self {
            Error | Running => 0,
            Stop | StopCopy | Resuming => VFIO_MIGRATION_STOP_COPY,
            RunningP2p => VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
            PreCopy => VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
            PreCopyP2p => VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY,
        }
    }

    /// Whether a device advertising `flags` offers this state.
    pub fn supported(self, flags: u64) -> bool {
        let need = self.required_flags();
        flags & need == need
    }

    /// PRE_COPY, PRE_COPY_P2P and STOP_COPY share one data session.
    pub fn is_saving(self) -> bool {
        matches!(self, PreCopy | PreCopyP2p | StopCopy)
    }

    /// States in which the device may start DMA and raise interrupts.
    pub fn is_running(self) -> bool {
        matches!(self, Running | PreCopy)
    }
}

impl std::fmt::Display for MigState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `vfio_from_fsm_table` with every optional state present: row = current, column = target.
/// ERROR in a cell means the request is refused (blocked or from ERROR).
const NEXT: [[MigState; 8]; 8] = [
    // from ERROR
    [Error, Error, Error, Error, Error, Error, Error, Error],
    // from STOP:  ERROR  STOP  RUNNING     STOP_COPY  RESUMING  RUN_P2P     PRE_COPY    PRE_COPY_P2P
    [
        Error, Stop, RunningP2p, StopCopy, Resuming, RunningP2p, RunningP2p, RunningP2p,
    ],
    // from RUNNING
    [
        Error, RunningP2p, Running, RunningP2p, RunningP2p, RunningP2p, PreCopy, RunningP2p,
    ],
    // from STOP_COPY
    [Error, Stop, Stop, StopCopy, Stop, Stop, Error, Error],
    // from RESUMING
    [Error, Stop, Stop, Stop, Resuming, Stop, Stop, Stop],
    // from RUNNING_P2P
    [
        Error, Stop, Running, Stop, Stop, RunningP2p, Running, PreCopyP2p,
    ],
    // from PRE_COPY
    [
        Error, Running, Running, PreCopyP2p, Running, Running, PreCopy, PreCopyP2p,
    ],
    // from PRE_COPY_P2P
    [
        Error, RunningP2p, RunningP2p, StopCopy, RunningP2p, RunningP2p, PreCopy, PreCopyP2p,
    ],
];

/// The first arc from `cur` toward `target` for a device advertising `flags`, skipping states
/// it lacks the way the kernel does. `None` when the request is refused: `target` is ERROR or
/// unsupported, `cur` is ERROR or unsupported, or the path is blocked (STOP_COPY → PRE_COPY*).
/// `Some(cur)` when `cur == target`.
pub fn next_state(cur: MigState, target: MigState, flags: u64) -> Option<MigState> {
    if !cur.supported(flags) || !target.supported(flags) || cur == Error || target == Error {
        return None;
    }
    let mut next = NEXT[cur as usize][target as usize];
    // Each skip moves strictly closer to the target in the full table, so this ends.
    while next != Error && !next.supported(flags) {
        next = NEXT[next as usize][target as usize];
    }
    (next != Error).then_some(next)
}

/// Whether `from → to` is one of the arcs a device with `flags` implements directly (the list
/// in the comment above `vfio_mig_get_next_state()`).
pub fn is_direct_arc(from: MigState, to: MigState, flags: u64) -> bool {
    if from == to || !from.supported(flags) || !to.supported(flags) {
        return false;
    }
    let p2p = flags & VFIO_MIGRATION_P2P != 0;
    let pre = flags & VFIO_MIGRATION_PRE_COPY != 0;
    match (from, to) {
        (Resuming, Stop) | (Stop, Resuming) | (Stop, StopCopy) | (StopCopy, Stop) => true,
        (Running, RunningP2p) | (RunningP2p, Running) => p2p,
        (RunningP2p, Stop) | (Stop, RunningP2p) => p2p,
        (Running, Stop) | (Stop, Running) => !p2p,
        (Running, PreCopy) | (PreCopy, Running) => pre,
        (PreCopy, StopCopy) => pre && !p2p,
        (PreCopy, PreCopyP2p) | (PreCopyP2p, PreCopy) => pre && p2p,
        (PreCopyP2p, RunningP2p) | (PreCopyP2p, StopCopy) | (RunningP2p, PreCopyP2p) => pre && p2p,
        _ => false,
    }
}

/// The whole walk from `cur` to `target` (excluding `cur`); `None` if refused.
pub fn path(cur: MigState, target: MigState, flags: u64) -> Option<Vec<MigState>> {
    let mut hops = Vec::new();
    let mut at = cur;
    while at != target {
        at = next_state(at, target, flags)?;
        hops.push(at);
        // No path in the table is longer than 5 arcs; more means a broken table.
        if hops.len() > 8 {
            return None;
        }
    }
    Some(hops)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_FLAGS: u64 = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY;
    const FLAG_SETS: [u64; 4] = [
        VFIO_MIGRATION_STOP_COPY,
        VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
        VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
        ALL_FLAGS,
    ];

    #[test]
    fn names_round_trip() {
        for s in MigState::ALL {
            assert_eq!(MigState::from_name(s.name()), Some(s));
            assert_eq!(MigState::from_u32(s as u32), Some(s));
        }
        assert_eq!(MigState::from_name("running_p2p"), Some(RunningP2p));
        assert_eq!(MigState::from_u32(8), None);
    }

    #[test]
    fn every_walk_uses_direct_arcs_and_no_interior_saving_state() {
        for flags in FLAG_SETS {
            for cur in MigState::ALL.into_iter().filter(|s| s.supported(flags)) {
                for target in MigState::ALL.into_iter().filter(|s| s.supported(flags)) {
                    let Some(hops) = path(cur, target, flags) else {
                        continue;
                    };
                    let mut at = cur;
                    for (i, &h) in hops.iter().enumerate() {
                        assert!(is_direct_arc(at, h, flags), "{at}->{h} flags {flags}");
                        // Interior saving states only while staying inside the group: a
                        // walk never opens a data session just to close it again.
                        if i + 1 < hops.len() && h.is_saving() {
                            let inside = at.is_saving() && hops[i + 1].is_saving();
                            assert!(inside, "{cur}->{target} passes {h}");
                        }
                        at = h;
                    }
                }
            }
        }
    }

    #[test]
    fn refusals() {
        assert_eq!(next_state(StopCopy, PreCopy, ALL_FLAGS), None);
        assert_eq!(next_state(StopCopy, PreCopyP2p, ALL_FLAGS), None);
        assert_eq!(next_state(Running, Error, ALL_FLAGS), None);
        assert_eq!(next_state(Error, Running, ALL_FLAGS), None);
        let base = VFIO_MIGRATION_STOP_COPY;
        assert_eq!(next_state(Running, RunningP2p, base), None);
        assert_eq!(next_state(Running, PreCopy, base), None);
        // STOP_COPY -> PRE_COPY stays blocked without P2P too.
        let pre = base | VFIO_MIGRATION_PRE_COPY;
        assert_eq!(next_state(StopCopy, PreCopy, pre), None);
    }

    #[test]
    fn kernel_documented_paths() {
        assert_eq!(
            path(Running, StopCopy, ALL_FLAGS).unwrap(),
            [RunningP2p, Stop, StopCopy]
        );
        assert_eq!(
            path(PreCopy, Resuming, ALL_FLAGS).unwrap(),
            [Running, RunningP2p, Stop, Resuming]
        );
        assert_eq!(
            path(Resuming, PreCopy, ALL_FLAGS).unwrap(),
            [Stop, RunningP2p, Running, PreCopy]
        );
        assert_eq!(
            path(PreCopy, StopCopy, ALL_FLAGS).unwrap(),
            [PreCopyP2p, StopCopy]
        );
        let base = VFIO_MIGRATION_STOP_COPY;
        assert_eq!(path(Running, StopCopy, base).unwrap(), [Stop, StopCopy]);
        assert_eq!(path(Resuming, Running, base).unwrap(), [Stop, Running]);
        let pre = base | VFIO_MIGRATION_PRE_COPY;
        assert_eq!(path(PreCopy, StopCopy, pre).unwrap(), [StopCopy]);
        assert_eq!(path(PreCopy, Stop, pre).unwrap(), [Running, Stop]);
    }
}
