//! The VFIO migration v2 state machine as the kernel walks it for a driver
//! (`vfio_mig_get_next_state`): one SET names the final state and the core steps through
//! the shortest path, never through a saving-group state in the middle. The table is the
//! next hop with every optional feature (P2P, PRE_COPY) present, which mtty offers.

use crate::Errno;

pub const ERROR: u32 = 0;
pub const STOP: u32 = 1;
pub const RUNNING: u32 = 2;
pub const STOP_COPY: u32 = 3;
pub const RESUMING: u32 = 4;
pub const RUNNING_P2P: u32 = 5;
pub const PRE_COPY: u32 = 6;
pub const PRE_COPY_P2P: u32 = 7;

/// Next hop from `cur` (row) towards `target` (column), indexed by state number; ERROR
/// means the arc is blocked.
const NEXT: [[u32; 8]; 8] = {
    const E: u32 = ERROR;
    const S: u32 = STOP;
    const R: u32 = RUNNING;
    const SC: u32 = STOP_COPY;
    const RS: u32 = RESUMING;
    const RP: u32 = RUNNING_P2P;
    const PC: u32 = PRE_COPY;
    const PP: u32 = PRE_COPY_P2P;
    [
        //  ERROR STOP RUN STOP_COPY RESUMING RUN_P2P PRE_COPY PRE_COPY_P2P
        [E, E, E, E, E, E, E, E],        // ERROR
        [E, S, RP, SC, RS, RP, RP, RP],  // STOP
        [E, RP, R, RP, RP, RP, PC, RP],  // RUNNING
        [E, S, S, SC, S, S, E, E],       // STOP_COPY
        [E, S, S, S, RS, S, S, S],       // RESUMING
        [E, S, R, S, S, RP, R, PP],      // RUNNING_P2P
        [E, R, R, PP, R, R, PC, PP],     // PRE_COPY
        [E, RP, RP, SC, RP, RP, PC, PP], // PRE_COPY_P2P
    ]
};

/// The state to step to next, or EINVAL for an unknown state, ERROR as either end, or a
/// blocked arc (STOP_COPY → PRE_COPY).
pub fn next_state(cur: u32, target: u32) -> Result<u32, Errno> {
    let row = NEXT.get(cur as usize).ok_or(Errno::INVAL)?;
    let next = *row.get(target as usize).ok_or(Errno::INVAL)?;
    if next == ERROR {
        return Err(Errno::INVAL);
    }
    Ok(next)
}

pub fn name(state: u32) -> &'static str {
    match state {
        ERROR => "ERROR",
        STOP => "STOP",
        RUNNING => "RUNNING",
        STOP_COPY => "STOP_COPY",
        RESUMING => "RESUMING",
        RUNNING_P2P => "RUNNING_P2P",
        PRE_COPY => "PRE_COPY",
        PRE_COPY_P2P => "PRE_COPY_P2P",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(mut cur: u32, target: u32) -> Result<Vec<u32>, Errno> {
        let mut p = vec![];
        while cur != target {
            cur = next_state(cur, target)?;
            p.push(cur);
            assert!(p.len() < 8, "loop");
        }
        Ok(p)
    }

    #[test]
    fn migration_paths_are_the_kernels() {
        assert_eq!(
            path(RUNNING, STOP_COPY),
            Ok(vec![RUNNING_P2P, STOP, STOP_COPY])
        );
        assert_eq!(path(PRE_COPY, STOP_COPY), Ok(vec![PRE_COPY_P2P, STOP_COPY]));
        assert_eq!(
            path(RESUMING, RUNNING),
            Ok(vec![STOP, RUNNING_P2P, RUNNING])
        );
        assert_eq!(path(STOP_COPY, PRE_COPY), Err(Errno::INVAL));
        assert_eq!(path(RUNNING, ERROR), Err(Errno::INVAL));
        assert_eq!(path(ERROR, RUNNING), Err(Errno::INVAL));
        assert_eq!(path(RUNNING, 8), Err(Errno::INVAL));
        // Every state reaches every other state except the blocked ones.
        for a in 1..8 {
            for b in 1..8 {
                let blocked = a == STOP_COPY && (b == PRE_COPY || b == PRE_COPY_P2P);
                assert_eq!(path(a, b).is_err(), blocked, "{a} -> {b}");
            }
        }
    }

    #[test]
    fn saving_states_are_never_interior() {
        for a in 1..8 {
            for b in 1..8 {
                if let Ok(p) = path(a, b) {
                    for s in &p[..p.len().saturating_sub(1)] {
                        assert!(
                            ![STOP_COPY, PRE_COPY, PRE_COPY_P2P, RESUMING].contains(s)
                                || (*s == PRE_COPY_P2P && a == PRE_COPY && b == STOP_COPY),
                            "{a} -> {b} passes {s}"
                        );
                    }
                }
            }
        }
    }
}
