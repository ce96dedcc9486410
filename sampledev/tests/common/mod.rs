//! Runs the real `sampledev` binary on a temporary socket and gives tests a client, guest
//! memory (a memfd) and register helpers.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sampledev::regs::*;
use vfio_user::vfio::VFIO_PCI_BAR0_REGION_INDEX;
use vfio_user::{Client, ClientOptions};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub mod intx;
pub mod migrate;
pub mod rig;

pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn start(state_size: &str) -> Server {
        Self::start_with(state_size, &[])
    }

    /// Starts sampledev with extra command-line arguments.
    pub fn start_with(state_size: &str, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("dev.sock");
        let log = dir.path().join("sampledev.log");
        let child = Command::new(env!("CARGO_BIN_EXE_sampledev"))
            .arg("--socket")
            .arg(&socket)
            .arg("--state-size")
            .arg(state_size)
            .args(args)
            .env("RUST_LOG", "debug")
            .stderr(File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "sampledev did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        Server {
            child,
            socket,
            log,
            _dir: dir,
        }
    }

    pub fn connect(&self) -> Client {
        let opts = ClientOptions {
            timeout: Duration::from_secs(5),
        };
        // The socket file appears at bind(), a moment before listen().
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Client::connect_with(&self.socket, opts.clone()) {
                Err(vfio_user::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                r => return r.unwrap(),
            }
        }
    }

    /// A raw connection, for speaking broken protocol.
    pub fn raw(&self) -> std::os::unix::net::UnixStream {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::os::unix::net::UnixStream::connect(&self.socket) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                r => return r.unwrap(),
            }
        }
    }

    /// Waits up to `limit` for the server to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- sampledev log ---\n{}", self.log());
        }
    }
}

pub fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a valid C string; the new fd is owned by the File below.
    let fd = unsafe {
        libc::memfd_create(
            c"guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: fd was just created and nothing else owns it.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    // Sealed as a VMM's RAM must be for sampledev to take it.
    // SAFETY: F_ADD_SEALS only changes the seal set of the fd just created.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(r, 0);
    f
}

pub fn read_mem(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off).unwrap();
    v
}

pub fn rd(c: &Client, reg: u64) -> u64 {
    let mut b = [0u8; 8];
    c.region_read(VFIO_PCI_BAR0_REGION_INDEX, reg, &mut b)
        .unwrap();
    u64::from_le_bytes(b)
}

pub fn wr(c: &Client, reg: u64, v: u64) {
    c.region_write(VFIO_PCI_BAR0_REGION_INDEX, reg, &v.to_le_bytes())
        .unwrap();
}

pub fn error_code(c: &Client) -> u64 {
    (rd(c, REG_STATUS) & STATUS_ERROR_MASK) >> STATUS_ERROR_SHIFT
}

pub fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

/// True if `e` was signalled within `limit` (consuming the count).
pub fn wait_event(e: &EventFd, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if e.read().is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for STATUS.BUSY to clear.
pub fn wait_idle(c: &Client) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = rd(c, REG_STATUS);
        if s & STATUS_BUSY == 0 {
            return s;
        }
        assert!(Instant::now() < deadline, "DMA never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
}
