//! devices crate
