//! Loopback TCP throughput of a full memory pass (1 GiB), ignored by default. Run with
//! `cargo test -p migration --release -- --ignored throughput --nocapture --test-threads 1`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::GuestRegionMmap;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use crate::protocol::{Channel, Message};
use crate::ranges::{MemoryRange, PAGE_SIZE};
use crate::recv::MemoryReceiver;
use crate::send::{SendOptions, send_ranges};

type Mem = GuestMemoryMmap<AtomicBitmap>;
const SIZE: usize = 1 << 30;

fn anon() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), SIZE)]).unwrap()
}

fn memfd() -> Mem {
    // SAFETY: plain syscalls on a fresh fd that the File takes ownership of.
    let file = unsafe {
        let fd = libc::memfd_create(c"guest-ram".as_ptr(), 0);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, SIZE as i64), 0);
        File::from_raw_fd(fd)
    };
    let region =
        GuestRegionMmap::from_range(GuestAddress(0), SIZE, Some(FileOffset::new(file, 0))).unwrap();
    Mem::from_regions(vec![region]).unwrap()
}

fn fill(mem: &Mem, byte: u8) {
    let buf = vec![byte; 1 << 20];
    for off in (0..SIZE as u64).step_by(buf.len()) {
        mem.write_slice(&buf, GuestAddress(off)).unwrap();
    }
}

/// One full pass from `src` to a fresh memory over loopback TCP; returns the time until the
/// receiver has applied everything.
fn pass(name: &str, src: Mem) {
    pass_into(name, src, false)
}

fn pass_into(name: &str, src: Mem, prefault: bool) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let dst = anon();
        if prefault {
            fill(&dst, 0);
        }
        let mut rx = MemoryReceiver::new(&dst, true);
        let mut ch = Channel::new(sock);
        loop {
            let msg = ch.recv().unwrap();
            if let Some(Message::IterationEnd { .. }) = rx.handle(&dst, &mut ch, msg).unwrap() {
                return Instant::now();
            }
        }
    });
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_nodelay(true).unwrap();
    let mut ch = Channel::new(sock);
    let start = Instant::now();
    let all = [MemoryRange::new(0, SIZE as u64)];
    let c = send_ranges(&src, &all, &mut ch, &SendOptions::default(), None).unwrap();
    ch.send(&Message::IterationEnd {
        iteration: 0,
        pages: SIZE as u64 / PAGE_SIZE,
    })
    .unwrap();
    let sent = start.elapsed();
    let done = receiver.join().unwrap() - start;
    report(name, sent, done, c.wire_bytes);
}

fn report(name: &str, sent: Duration, done: Duration, wire: u64) {
    let gib = |d: Duration| SIZE as f64 / d.as_secs_f64() / (1u64 << 30) as f64;
    eprintln!(
        "{name}: sender {:.0} ms, received {:.0} ms ({:.2} GiB/s of guest RAM), {} wire bytes",
        sent.as_secs_f64() * 1e3,
        done.as_secs_f64() * 1e3,
        gib(done),
        wire
    );
}

#[test]
#[ignore]
fn throughput_raw_tcp_baseline() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        while n < SIZE {
            n += sock.read(&mut buf).unwrap();
        }
        Instant::now()
    });
    let mut sock = TcpStream::connect(addr).unwrap();
    let buf = vec![1u8; 1 << 20];
    let start = Instant::now();
    for _ in 0..SIZE / buf.len() {
        sock.write_all(&buf).unwrap();
    }
    let done = receiver.join().unwrap() - start;
    report("raw TCP 1 MiB buffers", start.elapsed(), done, SIZE as u64);
}

#[test]
#[ignore]
fn throughput_nonzero() {
    let src = anon();
    fill(&src, 0x5a);
    pass("non-zero anon 1 GiB", src);
}

#[test]
#[ignore]
fn throughput_zero_touched() {
    let src = anon();
    fill(&src, 0);
    pass("zero (touched) anon 1 GiB", src);
}

#[test]
#[ignore]
fn throughput_zero_untouched_memfd() {
    pass("zero (never touched) memfd 1 GiB", memfd());
}

#[test]
#[ignore]
fn throughput_sender_only_devnull() {
    let src = anon();
    fill(&src, 0x5a);
    let mut ch = Channel::new(File::create("/dev/null").unwrap());
    let start = Instant::now();
    let all = [MemoryRange::new(0, SIZE as u64)];
    let c = send_ranges(&src, &all, &mut ch, &SendOptions::default(), None).unwrap();
    report(
        "sender only, /dev/null",
        start.elapsed(),
        start.elapsed(),
        c.wire_bytes,
    );
    let opts = SendOptions {
        detect_zero: false,
        ..SendOptions::default()
    };
    let start = Instant::now();
    let c = send_ranges(&src, &all, &mut ch, &opts, None).unwrap();
    report(
        "sender only, /dev/null, no zero scan",
        start.elapsed(),
        start.elapsed(),
        c.wire_bytes,
    );
}

#[test]
#[ignore]
fn throughput_nonzero_prefaulted_dest() {
    let src = anon();
    fill(&src, 0x5a);
    pass_into("non-zero anon 1 GiB into prefaulted memory", src, true);
}

/// The copy limit with cold memory at both ends: plain read/write between two 1 GiB buffers.
#[test]
#[ignore]
fn throughput_raw_tcp_big_buffers() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; SIZE];
        let mut n = 0;
        while n < SIZE {
            n += sock.read(&mut buf[n..]).unwrap();
        }
        Instant::now()
    });
    let mut sock = TcpStream::connect(addr).unwrap();
    let buf = vec![1u8; SIZE];
    let start = Instant::now();
    for chunk in buf.chunks(4 << 20) {
        sock.write_all(chunk).unwrap();
    }
    let done = receiver.join().unwrap() - start;
    report(
        "raw TCP 1 GiB buffer to fresh 1 GiB buffer",
        start.elapsed(),
        done,
        SIZE as u64,
    );
    let mut dst = vec![0u8; SIZE];
    let start = Instant::now();
    dst.copy_from_slice(&buf);
    report(
        "memcpy 1 GiB into fresh memory",
        start.elapsed(),
        start.elapsed(),
        SIZE as u64,
    );
    let start = Instant::now();
    dst.copy_from_slice(&buf);
    report(
        "memcpy 1 GiB again (faulted)",
        start.elapsed(),
        start.elapsed(),
        SIZE as u64,
    );
}
