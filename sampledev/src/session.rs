//! One client connection: receive a request, dispatch it, send its reply or error.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use vfio_user::{Capabilities, CommandName, ServerConn};

use crate::device::Device;
use crate::handlers;

/// A successful handler's answer.
#[derive(Default)]
pub struct Reply {
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    pub fn with(payload: Vec<u8>) -> Reply {
        Reply {
            payload,
            fds: Vec::new(),
        }
    }
}

pub struct Session<'a> {
    conn: ServerConn,
    pub device: &'a Device,
    /// The client's capabilities once VERSION succeeded; nothing else is served before.
    pub client_caps: Option<Capabilities>,
}

impl<'a> Session<'a> {
    pub fn new(stream: UnixStream, device: &'a Device) -> Session<'a> {
        Session {
            conn: ServerConn::new(stream),
            device,
            client_caps: None,
        }
    }

    /// Serves until the client disconnects (Ok) or breaks the framing (Err); a request
    /// that is merely wrong gets an error reply and the session goes on.
    pub fn run(&mut self) -> vfio_user::Result<()> {
        while let Some(req) = self.conn.recv_request()? {
            let hdr = req.header;
            let name = CommandName(hdr.command);
            log::trace!("request {} {name}", hdr.id);
            match handlers::dispatch(self, req) {
                Ok(reply) => {
                    let fds: Vec<BorrowedFd<'_>> = reply.fds.iter().map(|f| f.as_fd()).collect();
                    self.conn.send_reply(&hdr, &reply.payload, &fds)?;
                }
                Err(r) => {
                    // ENOMSG is pre-copy's routine "nothing to read now", polled for; ENOTTY
                    // answers a client probing for a feature this mode does not offer.
                    if r.errno == libc::ENOMSG || r.errno == libc::ENOTTY {
                        log::debug!("{name}: {r}");
                    } else {
                        log::warn!("{name} refused: {r}");
                    }
                    self.conn.send_error(&hdr, r.errno)?;
                }
            }
        }
        Ok(())
    }
}
