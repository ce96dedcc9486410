//! Migration engine pieces that know nothing of KVM: wire protocol, dirty bitmaps, zero-page
//! handling, memory send/receive, pre-copy policy, statistics, and the plain-data state
//! encoding shared by every component.

pub mod bitmap;
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
pub mod zero;

pub use error::MigrationError;

#[cfg(test)]
mod tests;
