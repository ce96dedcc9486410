//! Migration engine pieces that know nothing of KVM: wire protocol, dirty bitmaps, pre-copy
//! policy, statistics, and the plain-data state encoding shared by every component.

pub mod state;
