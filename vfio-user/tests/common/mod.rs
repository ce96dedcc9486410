//! A fake server on one end of a socketpair, for driving the client into each corner.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vfio_user::{
    Capabilities, Client, ClientOptions, Command, Header, MAX_MSG_SIZE, Message, Version,
    recv_message, send_message,
};

pub const TIMEOUT: Duration = Duration::from_millis(400);

pub fn recv(s: &UnixStream) -> Message {
    recv_message(s, MAX_MSG_SIZE, 16, None)
        .expect("fake server recv")
        .expect("client closed")
}

pub fn reply(s: &UnixStream, req: &Header, payload: &[u8]) {
    let h = Header::reply_to(req, payload.len()).unwrap();
    send_message(s, &h, payload, &[]).unwrap();
}

pub fn answer_version(s: &UnixStream, major: u16, caps: Capabilities) {
    let m = recv(s);
    assert_eq!(m.header.command_kind(), Some(Command::Version));
    let v = Version {
        major,
        minor: 1,
        caps,
    };
    reply(s, &m.header, &v.encode());
}

pub fn good_caps() -> Capabilities {
    Capabilities {
        max_msg_fds: Some(4),
        max_data_xfer_size: Some(4096),
        ..Default::default()
    }
}

/// Starts a fake server running `script` after a normal version exchange.
pub fn fake<F>(script: F) -> (Client, JoinHandle<()>)
where
    F: FnOnce(UnixStream) + Send + 'static,
{
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || {
        answer_version(&b, 0, good_caps());
        script(b);
    });
    let opts = ClientOptions { timeout: TIMEOUT };
    let c = Client::from_stream(a, opts).expect("negotiation");
    (c, t)
}
