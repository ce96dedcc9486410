//! Plain-data state of migratable components, and the compact binary encoding it travels in.
//!
//! Every component that migrates (vCPU, VM, emulated device, passthrough device) keeps its
//! state in a `State` struct of plain data (Firecracker's pattern) and implements
//! [`Migratable`], so the migration engine walks all of them the same way.

use bincode::Options;
use serde::{Serialize, de::DeserializeOwned};

/// Upper bound on one encoded state blob; decoding refuses anything larger before allocating.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state encoding failed: {0}")]
    Encode(String),
    #[error("state decoding failed: {0}")]
    Decode(String),
    #[error("state of {id} does not fit this component: {reason}")]
    Incompatible { id: String, reason: String },
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_little_endian()
        .with_fixint_encoding()
        .with_limit(MAX_STATE_BYTES)
        .reject_trailing_bytes()
}

/// Encodes a state struct (little-endian, fixed-width integers, explicit lengths).
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, StateError> {
    options()
        .serialize(state)
        .map_err(|e| StateError::Encode(e.to_string()))
}

/// Decodes a state struct; lengths inside are bounded by [`MAX_STATE_BYTES`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    options()
        .deserialize(bytes)
        .map_err(|e| StateError::Decode(e.to_string()))
}

/// A component whose state moves with the VM. `id` names it in the stream, so the destination
/// can match each blob to its own instance of the same component.
pub trait Migratable {
    fn id(&self) -> String;
    fn save_state(&self) -> Result<Vec<u8>, StateError>;
    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError>;
}

/// Firecracker's save/restore pair: a component hands out its state as plain data and takes it
/// back. Every `Persist` component is [`Migratable`] through the blanket impl below, so the
/// encoding lives in one place.
pub trait Persist {
    type State: Serialize + DeserializeOwned;
    /// The component's name in the migration stream.
    const ID: &'static str;
    fn state(&self) -> Self::State;
    fn restore(&mut self, state: &Self::State) -> Result<(), StateError>;
}

impl<T: Persist> Migratable for T {
    fn id(&self) -> String {
        T::ID.to_owned()
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        encode(&self.state())
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        self.restore(&decode(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct S {
        a: u32,
        b: Vec<u8>,
    }

    #[test]
    fn round_trip_and_trailing_bytes_refused() {
        let s = S {
            a: 7,
            b: vec![1, 2, 3],
        };
        let mut bytes = encode(&s).unwrap();
        assert_eq!(decode::<S>(&bytes).unwrap(), s);
        bytes.push(0);
        assert!(decode::<S>(&bytes).is_err());
    }

    #[test]
    fn huge_length_refused_without_allocating() {
        let mut bytes = 7u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<S>(&bytes).is_err());
    }
}
