//! vfio-user protocol (libvfio-user `docs/vfio-user.rst`), shared by the VMM-side client and the
//! device servers in this workspace.
//!
//! Everything read from a peer is bounded before it is allocated: message sizes by
//! [`MAX_MSG_SIZE`], passed file descriptors by [`MAX_MSG_FDS`], and each payload is checked against
//! the exact layout of its command before use.

mod caps;
mod client;
mod error;
mod fdpass;
mod header;
mod messages;
mod region;
mod server;
mod transport;
pub mod vfio;
mod wire;

pub use caps::{Capabilities, VersionInfo};
pub use client::{Client, ClientOptions, DEFAULT_TIMEOUT};
pub use error::{CommandName, Error, Result};
pub use fdpass::{recv_with_fds, send_with_fds};
pub use header::{
    Command, HEADER_SIZE, Header, MAX_DATA_XFER_SIZE, MAX_MSG_FDS, MAX_MSG_SIZE, MsgType,
};
pub use messages::{
    DeviceInfo, DmaMap, DmaProt, DmaUnmap, IrqInfo, IrqSet, REGION_ACCESS_HEADER_SIZE,
    RegionAccess, RegionInfoRequest, Version,
};
pub use region::{RegionCap, RegionInfo, SparseArea};
pub use server::{Request, ServerConn};
pub use transport::{Message, recv_message, send_message};
