//! The JSON capability object carried by `VFIO_USER_VERSION`.

use serde::{Deserialize, Serialize};

use crate::error::{Result, malformed};
use crate::header::MAX_DATA_XFER_SIZE;

/// Spec default when a peer does not state `max_msg_fds`.
const DEFAULT_MAX_MSG_FDS: u64 = 1;

/// Capabilities one side states in its version message. Unknown names are ignored, so newer
/// peers stay compatible; numbers are u64 so that absurd values parse and are then clamped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msg_fds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_data_xfer_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsizes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_dma_maps: Option<u64>,
    /// Migration parameters; absent means the sender does not support migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<serde_json::Value>,
    /// minivmm's extension: DEVICE_FEATURE indices beyond the spec's (the kernel's 9,
    /// MIG_DATA_SIZE, and 12, PRECOPY_INFO) that the server answers. A client asks a server
    /// only for those it lists: servers written to the spec, such as libvfio-user's, log
    /// every unknown feature as an error.
    #[serde(
        rename = "x-device-features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub device_features: Option<Vec<u32>>,
}

#[derive(Serialize, Deserialize)]
struct VersionData {
    #[serde(default)]
    capabilities: Option<Capabilities>,
}

impl Capabilities {
    /// How many fds the peer accepts in one message.
    pub fn max_msg_fds(&self) -> usize {
        let n = self.max_msg_fds.unwrap_or(DEFAULT_MAX_MSG_FDS);
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// Largest data transfer the peer accepts in one message.
    pub fn max_data_xfer_size(&self) -> usize {
        let n = self.max_data_xfer_size.unwrap_or(MAX_DATA_XFER_SIZE as u64);
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// Whether the peer lists extension feature `index` in `x-device-features`.
    pub fn offers_feature(&self, index: u32) -> bool {
        self.device_features
            .as_ref()
            .is_some_and(|f| f.contains(&index))
    }

    /// The version-data bytes: JSON with its terminating NUL.
    pub fn to_version_data(&self) -> Vec<u8> {
        let data = VersionData {
            capabilities: Some(self.clone()),
        };
        // Serializing plain numbers and an already-parsed JSON value cannot fail.
        let mut v = serde_json::to_vec(&data).unwrap_or_else(|_| b"{}".to_vec());
        v.push(0);
        v
    }

    /// Parses version data; empty data means "no capabilities stated".
    pub fn from_version_data(data: &[u8]) -> Result<Capabilities> {
        let end = data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        let json = &data[..end];
        if json.is_empty() {
            return Ok(Capabilities::default());
        }
        if json.contains(&0) {
            return Err(malformed("version data has a NUL inside its JSON"));
        }
        let parsed: VersionData = serde_json::from_slice(json)
            .map_err(|e| malformed(format!("version capabilities are not valid JSON: {e}")))?;
        Ok(parsed.capabilities.unwrap_or_default())
    }
}

/// What a completed version negotiation agreed on.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionInfo {
    pub major: u16,
    pub minor: u16,
    /// The capabilities the server stated in its reply.
    pub server: Capabilities,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_defaults() {
        let caps = Capabilities {
            max_msg_fds: Some(8),
            max_data_xfer_size: Some(65536),
            ..Default::default()
        };
        let data = caps.to_version_data();
        assert_eq!(*data.last().unwrap(), 0);
        assert_eq!(Capabilities::from_version_data(&data).unwrap(), caps);
        let none = Capabilities::from_version_data(b"").unwrap();
        assert_eq!(none.max_msg_fds(), 1);
        assert_eq!(none.max_data_xfer_size(), MAX_DATA_XFER_SIZE);
    }

    #[test]
    fn tolerates_unknown_names_refuses_garbage() {
        let c = Capabilities::from_version_data(
            br#"{"capabilities":{"max_msg_fds":4,"twin_socket":{"supported":false}}}"#,
        )
        .unwrap();
        assert_eq!(c.max_msg_fds(), 4);
        assert!(Capabilities::from_version_data(b"{not json").is_err());
        assert!(Capabilities::from_version_data(b"{}\0{}\0").is_err());
        assert!(
            Capabilities::from_version_data(br#"{"capabilities":{"max_msg_fds":-1}}"#).is_err()
        );
    }
}
