//! The destination's listening socket: it accepts on its own thread and hands connections
//! to the receive loop one at a time, so that a connection arriving while a migration is in
//! progress is refused at once (with a reason) instead of waiting in the backlog.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use migration::protocol::{Channel, Message};

use super::dest::DestError;

pub(super) type Conn = (TcpStream, SocketAddr);

/// The listening socket, accepting on its own thread so that a connection arriving during a
/// migration is refused at once instead of waiting in the backlog.
pub(super) struct Listener {
    rx: Receiver<Conn>,
    /// Where the accepting thread hands connections; none once a migration is in progress.
    gate: Arc<Mutex<Option<Sender<Conn>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the accepting thread looks at its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// How long a refused connection may take to read its Refuse.
const REFUSE_WAIT: Duration = Duration::from_millis(200);
const BUSY: &str = "this destination is already receiving a migration";

impl Listener {
    pub(super) fn bind(listen: &str) -> Result<Self, DestError> {
        let err = |e| DestError::Listen(listen.into(), e);
        let sock = TcpListener::bind(listen).map_err(err)?;
        sock.set_nonblocking(true).map_err(err)?;
        let (tx, rx) = mpsc::channel();
        let gate = Arc::new(Mutex::new(Some(tx)));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (gate.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("migration-listen".into())
            .spawn(move || accept_loop(&sock, &g, &s))?;
        Ok(Listener {
            rx,
            gate,
            stop,
            thread: Some(thread),
        })
    }

    /// The next connection, or the accept timeout (deadline, its length) passing first.
    pub(super) fn next(&self, deadline: Option<(Instant, Duration)>) -> Result<Conn, DestError> {
        let got = match deadline {
            None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some((at, _)) => self
                .rx
                .recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        got.map_err(|e| match (e, deadline) {
            (RecvTimeoutError::Timeout, Some((_, t))) => DestError::AcceptTimeout(t),
            _ => DestError::ListenerGone,
        })
    }

    /// A migration is in progress: every connection from now on, and any still queued, is
    /// refused.
    pub(super) fn busy(&self) {
        lock(&self.gate).take();
        while let Ok((tcp, peer)) = self.rx.try_recv() {
            refuse_busy(tcp, peer);
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::warn!("the migration listener thread panicked");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(sock: &TcpListener, gate: &Mutex<Option<Sender<Conn>>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match sock.accept() {
            Ok((tcp, peer)) => {
                let g = lock(gate);
                let Some(tx) = g.as_ref() else {
                    drop(g);
                    refuse_busy(tcp, peer);
                    continue;
                };
                if tx.send((tcp, peer)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                // Out of fds, a connection reset in the backlog: keep listening.
                log::warn!("accepting a migration connection: {e}");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// Tells a second peer this side is busy and closes, without reading it or touching the
/// migration in progress.
fn refuse_busy(tcp: TcpStream, peer: SocketAddr) {
    log::warn!("refused the connection from {peer}: {BUSY}");
    let refuse = |tcp: &TcpStream| -> io::Result<()> {
        tcp.set_nonblocking(false)?;
        tcp.set_write_timeout(Some(REFUSE_WAIT))?;
        tcp.set_read_timeout(Some(REFUSE_WAIT))?;
        Channel::new(tcp)
            .send(&Message::Refuse {
                reason: BUSY.into(),
            })
            .map_err(io::Error::other)?;
        tcp.shutdown(Shutdown::Write)?;
        // Take what it already sent, so the close does not reset the connection before the
        // peer has read the Refuse.
        io::copy(&mut tcp.take(64 << 10), &mut io::sink())?;
        Ok(())
    };
    if let Err(e) = refuse(&tcp) {
        log::debug!("refusing {peer}: {e}");
    }
}
