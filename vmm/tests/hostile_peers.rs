//! A destination facing peers that are not a well-behaved source: stray connections, a
//! trickling sender, a second source during a migration, a description sized to exhaust the
//! host. Real minivmm processes and real TCP; crafted peers speak the migration crate's
//! protocol from the test.

mod common;

use std::io::{Cursor, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use migration::description::VmDescription;
use migration::protocol::{Channel, Header, Message, MessageType};
use migration::ranges::MemoryRange;

const LIMIT: Duration = Duration::from_secs(90);

fn destination(addr: &str, extra: &[&str]) -> Vm {
    let mut args = vec!["receive", "--listen", addr];
    args.extend_from_slice(extra);
    let d = Vm::spawn(&args);
    wait_listening(addr);
    d
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s
}

fn hello() -> Message {
    Message::Hello {
        version: 1,
        features: 0,
    }
}

/// Reads until the destination closes; returns the first message it sent, if any.
fn reply_then_close(s: TcpStream) -> Option<Message> {
    let mut ch = Channel::new(s);
    let first = ch.recv().ok();
    let mut rest = Vec::new();
    let _ = ch.get_mut().read_to_end(&mut rest);
    first
}

fn refusal(m: Option<Message>) -> String {
    match m {
        Some(Message::Refuse { reason }) => reason,
        other => panic!("expected Refuse, got {other:?}"),
    }
}

/// Hello, then `desc`: what the destination answers it.
fn offer(addr: &str, desc: VmDescription) -> Message {
    let mut ch = Channel::new(connect(addr));
    ch.send(&hello()).unwrap();
    let Message::HelloAck { session, .. } = ch.recv().unwrap() else {
        panic!("expected HelloAck")
    };
    ch.send(&Message::Description { session, desc }).unwrap();
    ch.recv().expect("an answer to the description")
}

fn description(ram: u64, vcpus: u32) -> VmDescription {
    VmDescription {
        ram: vec![MemoryRange::new(0, ram)],
        vcpus,
        ..Default::default()
    }
}

fn dirtier_args(cmdline: &str) -> Vec<String> {
    [
        "run",
        "--guest",
        "dirtier",
        "--memory",
        "128M",
        "--cmdline",
        cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The guest ran on at the destination, verified every page, and lost no heartbeat.
fn verify_migrated(src: &mut Vm, dst: &mut Vm) {
    let src_lines = src.lines();
    let last_pass = src_lines.iter().filter(|l| l.starts_with("PASS ")).count();
    let want = format!("PASS {} ok", last_pass + 2);
    dst.wait_line(|l| l.starts_with(&want), LIMIT);
    assert_eq!(dst.ctl(r#"{"cmd":"shutdown"}"#)["ok"], true);
    assert_eq!(dst.wait_exit(LIMIT).code(), Some(0), "{}", dst.stderr());
    no_bad(&src_lines);
    no_bad(&dst.lines());
    assert_contiguous(&heartbeats(&joined_lines(src, dst)));
    let dstats: serde_json::Value =
        serde_json::from_str(dst.stdout().lines().next().expect("stats")).unwrap();
    assert_eq!(dstats["status"], "completed", "{dstats}");
}

/// Sends a Hello one byte a second until the destination hangs up; returns once it has.
fn trickle_until_cut_off(addr: &str) {
    let s = connect(addr);
    let mut w = s.try_clone().unwrap();
    let msg = hello();
    let (head, tail) = migration::protocol::encode_frame(&msg).unwrap();
    let bytes: Vec<u8> = head.iter().chain(tail).copied().collect();
    let writer = std::thread::spawn(move || {
        for b in bytes {
            if w.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    // EOF (or a reset) is the destination dropping it; the whole Hello takes 26 s.
    let mut buf = [0u8; 64];
    let got = (&s).read(&mut buf);
    assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
    let _ = s.shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();
}

#[test]
fn stray_connections_before_a_valid_migration() {
    let addr = free_addr();
    let mut dst = destination(&addr, &["--handshake-timeout", "2"]);
    // Garbage: refused as not a migration stream.
    let mut s = connect(&addr);
    s.write_all(&[0xa5; 64]).unwrap();
    assert!(refusal(reply_then_close(s)).contains("magic"));
    // Connect and close.
    drop(connect(&addr));
    // A frame announcing a terabyte.
    let mut s = connect(&addr);
    let mut h = Header::new(MessageType::Hello, 0).to_bytes();
    h[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    s.write_all(&h).unwrap();
    assert!(refusal(reply_then_close(s)).contains("exceeds its limit"));
    // A Hello at one byte a second.
    trickle_until_cut_off(&addr);
    let err = dst.wait_stderr("handshake did not finish within 2 s", LIMIT);
    assert!(
        err.matches("dropped the connection from 127.0.0.1").count() >= 3,
        "{err}"
    );
    assert!(dst.running(), "{err}");

    let mut args = dirtier_args("hb_ms=20 share=50");
    args.extend(["--migrate-to".into(), addr.clone()]);
    args.extend(["--migrate-after".into(), "1".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut src = Vm::spawn(&args);
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    verify_migrated(&mut src, &mut dst);
}

#[test]
fn a_second_source_during_a_migration_is_refused() {
    let addr = free_addr();
    let mut dst = destination(&addr, &[]);
    // Slow enough to be caught in pre-copy: 64 MiB of data (one full pass written) at
    // 48 MiB/s, against 20 MB/s of dirtying.
    let args = dirtier_args("hb_ms=20 share=50 rate=5000");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut src = Vm::spawn(&args);
    src.wait_line(|l| l.starts_with("PASS 1 ok"), LIMIT);
    migrate_request(&src, &addr, r#","max_bandwidth":50331648"#);
    let start = std::time::Instant::now();
    loop {
        assert!(src.running(), "{}\n{}", src.stdout(), src.stderr());
        let st = src.ctl(r#"{"cmd":"migration-status"}"#);
        if st["stats"]["status"] == "active" {
            break;
        }
        assert!(
            start.elapsed() < LIMIT,
            "migration never became active: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut second = Channel::new(connect(&addr));
    second.send(&hello()).unwrap();
    let reason = refusal(reply_then_close(second.into_inner()));
    assert!(reason.contains("already receiving"), "{reason}");
    dst.wait_stderr("refused the connection from 127.0.0.1", LIMIT);
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    verify_migrated(&mut src, &mut dst);
}

#[test]
fn accept_timeout_ends_a_destination_nobody_migrates_to() {
    let addr = free_addr();
    let mut dst = destination(&addr, &["--accept-timeout", "1"]);
    // A stray peer does not count as a migration.
    drop(connect(&addr));
    assert_ne!(dst.wait_exit(LIMIT).code(), Some(0));
    let line = error_text(&dst.stderr()).trim().to_owned();
    assert!(
        line.starts_with("minivmm: ")
            && line.ends_with("no migration arrived within 1 s (--accept-timeout)"),
        "{line}"
    );
}

#[test]
fn descriptions_beyond_the_limits_are_refused_and_the_destination_waits_on() {
    let addr = free_addr();
    let mut dst = destination(&addr, &["--max-memory", "256M", "--vcpus", "1"]);
    let reason = refusal(Some(offer(&addr, description(1 << 40, 1))));
    assert!(reason.contains("1024 GiB"), "{reason}");
    assert!(
        !reason.contains("256"),
        "the limit is the host's business: {reason}"
    );
    let reason = refusal(Some(offer(&addr, description(128 << 20, 2))));
    assert!(
        reason.contains("2 vCPUs") && reason.contains("--vcpus 1"),
        "{reason}"
    );
    // Malformed: RAM that is not page-aligned, refused with the reason.
    let reason = refusal(Some(offer(&addr, description(100, 1))));
    assert!(reason.contains("page-aligned"), "{reason}");
    let err = dst.wait_stderr("is over the limit of 256 MiB", LIMIT);
    assert!(dst.running(), "{err}");
    // Still serving: the next peer gets its HelloAck.
    let mut ch = Channel::new(connect(&addr));
    ch.send(&hello()).unwrap();
    assert!(matches!(ch.recv().unwrap(), Message::HelloAck { .. }));
}

#[test]
fn a_source_bigger_than_max_memory_is_refused_and_keeps_running() {
    let addr = free_addr();
    let mut dst = destination(&addr, &["--max-memory", "64M"]);
    let args = dirtier_args("hb_ms=20 share=50");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let src = Vm::spawn(&args);
    src.wait_line(|l| l == "HB 3", LIMIT);
    migrate_request(&src, &addr, "");
    let stats = wait_migration_end(&src);
    let e = stats["error-desc"].as_str().unwrap_or_default();
    assert!(e.contains("more than this destination takes"), "{stats}");
    assert_eq!(src.ctl(r#"{"cmd":"status"}"#)["state"], "running");
    dst.wait_stderr("refused the VM", LIMIT);
    assert!(dst.running(), "{}", dst.stderr());
    let hb = heartbeats(&src.lines()).len();
    let target = format!("HB {}", hb + 5);
    src.wait_line(|l| l == target, LIMIT);
}

/// A TCP proxy for one connection to `to`, keeping every byte the client sent.
struct Recorder {
    addr: String,
    sent: Arc<Mutex<Vec<u8>>>,
    thread: JoinHandle<()>,
}

fn recorder(to: &str) -> Recorder {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let log = sent.clone();
    let to = to.to_owned();
    let thread = std::thread::spawn(move || {
        let (mut client, _) = listener.accept().expect("accept");
        let mut server = TcpStream::connect(&to).expect("connect");
        let (mut back_from, mut back_to) =
            (server.try_clone().unwrap(), client.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(Shutdown::Write);
        });
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n @ 1..) = client.read(&mut buf) {
            log.lock().unwrap().extend_from_slice(&buf[..n]);
            if server.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = server.shutdown(Shutdown::Write);
        back.join().unwrap();
    });
    Recorder { addr, sent, thread }
}

/// Resident memory of a process, guest RAM (shared memory) included.
fn rss_bytes(vm: &Vm) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.child.id())).unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS");
    kib << 10
}

/// A complete, successful migration of `dirtier` through a recorder: what the source sent.
fn recorded_migration() -> Vec<u8> {
    let addr = free_addr();
    let mut dst = destination(&addr, &[]);
    let rec = recorder(&addr);
    let mut args = dirtier_args("hb_ms=20 share=50");
    args.extend(["--migrate-to".into(), rec.addr.clone()]);
    args.extend(["--migrate-after".into(), "1".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut src = Vm::spawn(&args);
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    verify_migrated(&mut src, &mut dst);
    rec.thread.join().unwrap();
    Arc::try_unwrap(rec.sent).unwrap().into_inner().unwrap()
}

/// A recording of a real migration replayed into another destination is refused before a
/// VM is built (its Description carries the first destination's session nonce), and the
/// destination waits on. Its description, echoing the new nonce and claiming 1 GiB, is
/// accepted without the destination allocating that RAM ahead of any page; a peer that
/// then trickles a frame, each byte inside the read timeout, is still cut off, since the
/// whole frame is due within --peer-timeout.
#[test]
fn a_replayed_migration_is_refused_and_a_trickler_after_the_handshake_is_timed_out() {
    let recording = recorded_migration();
    let addr = free_addr();
    let mut dst = destination(&addr, &["--peer-timeout", "2"]);
    let mut s = connect(&addr);
    // The destination may hang up part-way through the recording.
    let _ = s.write_all(&recording);
    let mut ch = Channel::new(s);
    assert!(matches!(ch.recv().unwrap(), Message::HelloAck { .. }));
    let reason = refusal(ch.recv().ok());
    assert!(reason.contains("not bound to this session"), "{reason}");
    let err = dst.wait_stderr("dropped the connection from 127.0.0.1", LIMIT);
    assert!(dst.running(), "{err}");

    let mut old = Channel::new(Cursor::new(recording));
    assert!(matches!(old.recv().unwrap(), Message::Hello { .. }));
    let Message::Description { mut desc, .. } = old.recv().unwrap() else {
        panic!("the recording's second message is not its Description")
    };
    // A bigger VM than the one recorded: 1 GiB that no page will ever arrive for.
    desc.ram = vec![MemoryRange::new(0, 1 << 30)];
    let mut ch = Channel::new(connect(&addr));
    ch.send(&hello()).unwrap();
    let Message::HelloAck { session, .. } = ch.recv().unwrap() else {
        panic!("expected HelloAck")
    };
    ch.send(&Message::Description { session, desc }).unwrap();
    let answer = ch.recv().unwrap();
    assert!(matches!(answer, Message::Accept), "{answer:?}");
    // Prefaulting runs only a lead (256 MiB) ahead of the pages received.
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_bytes(&dst);
    assert!(
        rss < 400 << 20,
        "{} MiB resident for no page received",
        rss >> 20
    );
    let (head, _) =
        migration::protocol::encode_frame(&Message::MemoryPages { gpa: 0, len: 4096 }).unwrap();
    let mut w = ch.into_inner();
    w.write_all(&head).unwrap();
    // A byte a second, each read inside the 2 s timeout: cut off while still trickling.
    let cut_off = (0..30).any(|_| {
        std::thread::sleep(Duration::from_secs(1));
        w.write_all(&[0x5a]).is_err() || !dst.running()
    });
    assert!(cut_off, "a 30 s trickle was still being read");
    assert_ne!(dst.wait_exit(LIMIT).code(), Some(0));
    let err = error_text(&dst.stderr());
    assert!(err.contains("timed out after 2 s"), "{err}");
    assert!(!err.contains("os error"), "{err}");
}
