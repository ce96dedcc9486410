//! The source's view of the return path: a thread that reads the destination's messages
//! (acks, Ready, Resumed, Abandon) from a clone of the same full-duplex socket.
//!
//! Why a thread: the source spends its time blocked writing memory, and the destination's
//! replies must be drained while it does, or both sides could block on full socket buffers.
//! The migration loop polls the queue between chunks with `try_recv`, and waits with
//! `recv_timeout` in the two-phase end. The thread ends after a terminal message (Refuse,
//! Abandon, Resumed), at EOF, or on an error; to stop it earlier, shut the socket down.

use std::io::Read;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{Channel, Message, ProtocolError};

pub struct ReturnPath {
    rx: Receiver<Result<Message, ProtocolError>>,
    _thread: JoinHandle<()>,
}

impl ReturnPath {
    /// Starts the reader on `reader` (e.g. `tcp.try_clone()?`). A read timeout on the socket
    /// is tolerated: the thread just reads again.
    pub fn spawn<R: Read + Send + 'static>(reader: R) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("migration-rp".into())
            .spawn(move || read_loop(Channel::new(reader), tx))?;
        Ok(Self {
            rx,
            _thread: thread,
        })
    }

    /// The next message if one has arrived.
    pub fn try_recv(&self) -> Option<Result<Message, ProtocolError>> {
        match self.rx.try_recv() {
            Ok(m) => Some(m),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(ProtocolError::Closed)),
        }
    }

    /// Waits up to `timeout` for the next message.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Message, ProtocolError> {
        match self.rx.recv_timeout(timeout) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => Err(ProtocolError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(ProtocolError::Closed),
        }
    }
}

fn read_loop<R: Read>(mut ch: Channel<R>, tx: mpsc::Sender<Result<Message, ProtocolError>>) {
    loop {
        let msg = match ch.recv() {
            Err(ProtocolError::Timeout) => continue,
            Ok(Message::MemoryPages { .. }) => Err(ProtocolError::Unexpected {
                expected: "a return-path message",
                got: super::MessageType::MemoryPages,
            }),
            m => m,
        };
        let last = matches!(
            msg,
            Err(_)
                | Ok(Message::Refuse { .. })
                | Ok(Message::Abandon { .. })
                | Ok(Message::Resumed(_))
        );
        if tx.send(msg).is_err() || last {
            log::debug!("migration return path reader stopping");
            return;
        }
    }
}
