//! Migration engine pieces that know nothing of KVM: wire protocol, dirty bitmaps, zero-page
//! handling, memory send/receive, pre-copy policy, statistics, and the plain-data state
//! encoding shared by every component.
//!
//! Driving a migration (the VMM keeps pausing, state and devices):
//!
//! Source: connect, `set_nodelay`, read timeout; `Channel::new(stream)`;
//! `session::source_handshake`; `ReturnPath::spawn(stream.try_clone())`; a `dirty::DirtyLog`
//! with KVM's source, `dirty::VmmWrites` and device logs; `precopy::run_precopy` (or a loop of
//! `collect` + `send::send_ranges` + `policy::Convergence::decide`); on `SwitchOver` pause,
//! `precopy::final_pass`, send device stop-copy data and `VcpuState`/`VmState`/`DeviceState`,
//! then `session::source_end` (sends `Complete`, waits for `Ready`, sends `Go` with the run
//! state found before the pause): `EndError::BeforeGo` → restore that run state here,
//! `EndError::AfterGo` → stay paused. On `GaveUp` or any error before Go: `session::abandon`.
//!
//! Destination: accept, same socket options; `session::dest_handshake` with a check that
//! compares the description and builds the paused VM; `recv::MemoryReceiver::new(mem, fresh)`
//! and `recv` until a non-memory message; store state messages until `Complete`; load;
//! `session::dest_ready` with `Complete`'s token (waits for Go); resume unless Go says the
//! guest was paused; `session::dest_confirm` with the timings.

pub mod bitmap;
pub mod certs;
pub mod description;
pub mod dirty;
pub mod error;
pub mod policy;
pub mod precopy;
pub mod protocol;
pub mod ranges;
pub mod recv;
pub mod send;
pub mod session;
pub mod sparse;
pub mod state;
pub mod stats;
pub mod throttle;
pub mod transport;
pub mod zero;

pub use error::MigrationError;

#[cfg(test)]
mod tests;
