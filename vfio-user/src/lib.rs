//! vfio-user protocol (libvfio-user `docs/vfio-user.rst`), shared by the VMM-side client and the
//! device servers in this workspace.
//!
//! Everything read from a peer is bounded before it is allocated: message sizes by
//! [`MAX_MSG_SIZE`], passed file descriptors by [`MAX_MSG_FDS`], and each payload is checked against
//! the exact layout of its command before use.

mod caps;
mod client;
mod client_mig;
mod error;
mod fdpass;
mod fsm;
mod header;
mod messages;
mod migmsg;
mod region;
mod server;
mod transport;
mod v1;
pub mod vfio;
mod wire;

pub use caps::{Capabilities, VersionInfo};
pub use client::{Client, ClientOptions, DEFAULT_TIMEOUT};
pub use client_mig::MigData;
pub use error::{CommandName, Error, Result};
pub use fdpass::{recv_with_fds, send_with_fds};
pub use fsm::{MigState, is_direct_arc, next_state, path};
pub use header::{
    Command, HEADER_SIZE, Header, MAX_DATA_XFER_SIZE, MAX_MSG_FDS, MAX_MSG_SIZE, MsgType,
};
pub use messages::{
    DeviceInfo, DmaMap, DmaProt, DmaUnmap, IrqInfo, IrqSet, REGION_ACCESS_HEADER_SIZE,
    RegionAccess, RegionInfoRequest, Version,
};
pub use migmsg::{
    DeviceFeature, DmaLoggingReport, DmaLoggingStart, DmaRange, MIG_DATA_HEADER_SIZE, MigDataRead,
    MigStateData, PrecopyInfo, decode_mig_data, decode_mig_data_reply, decode_u64, encode_mig_data,
    encode_u64,
};
pub use region::{RegionCap, RegionInfo, SparseArea};
pub use server::{Request, ServerConn};
pub use transport::{Message, recv_message, send_message};
pub use v1::{
    V1_DATA_OFFSET, V1_DATA_SIZE, V1_DEVICE_STATE, V1_INFO_SIZE, V1_PENDING_BYTES, V1Region,
};
