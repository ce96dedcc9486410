//! migration crate
