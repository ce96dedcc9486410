//! Fault injection for the failure-safety tests: `MINIVMM_FAULT=<point>` makes this process
//! die abruptly (exit 1, socket closed by the kernel, no goodbye) when it reaches `<point>`,
//! or, for `corrupt-<point>`, write a garbage frame to the peer there; a few points change a
//! behaviour instead ([`active`]). Points are named where they are checked; the tests cover
//! each phase of the protocol with them.

use std::io::Write;

fn wanted() -> Option<String> {
    std::env::var("MINIVMM_FAULT").ok()
}

/// Dies here if asked to.
pub fn crash_point(point: &str) {
    if wanted().as_deref() == Some(point) {
        eprintln!("minivmm: fault injected at {point}");
        std::process::exit(1);
    }
}

/// Writes a frame with a bad magic to `peer` if asked to (then carries on as if nothing
/// happened; the peer must refuse it cleanly).
pub fn corrupt_point(point: &str, peer: &mut impl Write) {
    if wanted().is_some_and(|w| w.strip_prefix("corrupt-") == Some(point)) {
        log::info!("fault injected: corrupt frame at {point}");
        let _ = peer.write_all(&[0xde; 64]);
        let _ = peer.flush();
    }
}

/// Whether the behaviour fault `point` (no crash, no frame: e.g. `skip-dma-log`;
/// `stall-ready`, a destination that never says Ready; `stall-go`, one that never confirms
/// Go; `stall-precopy`, a source silent for 5 s after pre-copy) is asked for.
pub fn active(point: &str) -> bool {
    wanted().as_deref() == Some(point)
}
