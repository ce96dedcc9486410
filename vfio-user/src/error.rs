//! Errors of the vfio-user codec, transport and client.

use std::time::Duration;

use crate::header::Command;

pub type Result<T> = std::result::Result<T, Error>;

/// Names a command number that may not be one we know (a peer can send anything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandName(pub u16);

impl std::fmt::Display for CommandName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match Command::from_u16(self.0) {
            Some(c) => write!(f, "{c}"),
            None => write!(f, "command {}", self.0),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer closed the connection or the socket broke: the device is gone.
    #[error("vfio-user device lost: the peer closed the connection")]
    DeviceLost,
    /// No (complete) reply arrived in time; the connection is unusable afterwards because a
    /// late reply would be mistaken for the answer to the next request.
    #[error("no reply to {command} within {after:?}")]
    Timeout {
        command: CommandName,
        after: Duration,
    },
    /// The server answered with the error bit set.
    #[error("{command} failed on the server: {}", errno_text(*.errno))]
    Remote { command: CommandName, errno: i32 },
    /// The reply's id or command is not the one of the request just sent.
    #[error("reply mismatch: sent id {sent_id} ({sent_cmd}), got id {got_id} ({got_cmd})")]
    ReplyMismatch {
        sent_id: u16,
        sent_cmd: CommandName,
        got_id: u16,
        got_cmd: CommandName,
    },
    /// A header or payload that does not follow the protocol.
    #[error("malformed vfio-user message: {0}")]
    Malformed(String),
    /// A message larger than this side accepts; refused before anything is allocated.
    #[error("vfio-user message of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    /// More file descriptors than accepted arrived with one message; all of them were closed.
    #[error("peer passed more than {max} file descriptors with one message")]
    TooManyFds { max: usize },
    /// The server does not speak a protocol version this client supports.
    #[error("unsupported vfio-user protocol version {major}.{minor}")]
    Version { major: u16, minor: u16 },
    /// An earlier failure left the connection in an unknown state.
    #[error("vfio-user connection unusable after an earlier failure: {0}")]
    Broken(String),
    /// An extension feature the server did not offer in its VERSION reply; nothing was sent.
    #[error("the server does not offer device feature {0} (not in its x-device-features)")]
    NotOffered(u32),
    /// The caller asked for something the protocol cannot express.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("vfio-user socket I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// True when the peer is gone or unresponsive, which a VMM reports as a lost device.
    pub fn is_device_lost(&self) -> bool {
        matches!(self, Error::DeviceLost | Error::Timeout { .. })
    }

    /// The errno of a failed server command, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Remote { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn errno_text(errno: i32) -> String {
    if errno == 0 {
        // The spec allows an error reply without an errno.
        return "error reply without errno".to_string();
    }
    format!(
        "{} (errno {errno})",
        std::io::Error::from_raw_os_error(errno)
    )
}

pub(crate) fn malformed(what: impl Into<String>) -> Error {
    Error::Malformed(what.into())
}
