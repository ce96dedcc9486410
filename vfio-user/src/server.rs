//! Server-side framing: receive a client's requests with their fds, answer with a reply or an
//! error. Device logic lives in the server, not here.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use crate::error::{Result, malformed};
use crate::header::{Command, Header, MAX_MSG_FDS, MAX_MSG_SIZE, MsgType};
use crate::transport::{recv_message, send_message};

/// One request from the client.
#[derive(Debug)]
pub struct Request {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Request {
    pub fn command(&self) -> Option<Command> {
        self.header.command_kind()
    }
}

pub struct ServerConn {
    stream: UnixStream,
}

impl ServerConn {
    pub fn new(stream: UnixStream) -> ServerConn {
        ServerConn { stream }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Waits for the next request; `None` when the client disconnected between messages.
    /// Errors mean the byte stream can no longer be trusted and the connection should close.
    pub fn recv_request(&mut self) -> Result<Option<Request>> {
        let Some(m) = recv_message(&self.stream, MAX_MSG_SIZE, MAX_MSG_FDS, None)? else {
            return Ok(None);
        };
        if m.header.msg_type != MsgType::Command {
            // This server never sends commands to the client, so no reply can be expected.
            return Err(malformed(format!(
                "unsolicited reply (id {}, command {}) from the client",
                m.header.id, m.header.command
            )));
        }
        Ok(Some(Request {
            header: m.header,
            payload: m.payload,
            fds: m.fds,
        }))
    }

    /// Replies to `req` with `payload` and `fds`, unless the client asked for no reply.
    pub fn send_reply(
        &mut self,
        req: &Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<()> {
        if req.no_reply {
            return Ok(());
        }
        let h = Header::reply_to(req, payload.len())?;
        send_message(&self.stream, &h, payload, fds)
    }

    /// Replies to `req` with the error bit and `errno`, unless the client asked for no reply.
    pub fn send_error(&mut self, req: &Header, errno: i32) -> Result<()> {
        if req.no_reply {
            log::debug!("no-reply request {} failed with errno {errno}", req.id);
            return Ok(());
        }
        send_message(&self.stream, &Header::error_reply_to(req, errno), &[], &[])
    }
}
