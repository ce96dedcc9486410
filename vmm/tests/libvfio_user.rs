//! Interop with an independent vfio-user implementation: libvfio-user's sample servers (built
//! from `shared/peers/libvfio-user` by `scripts/test` and `.ci/run`) as passthrough devices
//! of real minivmm processes, booted and live-migrated. Their own quirks (listed in the peers'
//! README) are theirs; minivmm must work around none of them silently and fail cleanly on
//! each.
//!
//! The samples are looked for in `$LIBVFIO_USER_SAMPLES` or `.cache/libvfio-user`. Missing
//! samples fail the tests under CI (`CI` set) and skip them, loudly, elsewhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(90);
/// The sample server's STOP_COPY state: BAR1 (16 KiB) and BAR0 (an 8-byte deadline).
const SERVER_STATE_BYTES: u64 = 16384 + 8;

fn samples() -> Option<PathBuf> {
    let dir = std::env::var_os("LIBVFIO_USER_SAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/libvfio-user"));
    if dir.join("server").exists() && dir.join("gpio-pci-idio-16").exists() {
        return Some(dir);
    }
    let how = "build them with ../shared/peers/libvfio-user/build.sh .cache/libvfio-user";
    if std::env::var_os("CI").is_some() {
        panic!(
            "libvfio-user samples missing in {} under CI; {how}",
            dir.display()
        );
    }
    eprintln!(
        "SKIPPED: libvfio-user samples not in {}; {how}",
        dir.display()
    );
    None
}

/// One libvfio-user sample serving one client on a socket; its stderr kept in a file.
struct Peer {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Peer {
    fn spawn(samples: &Path, program: &str) -> Peer {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("peer.sock");
        let log = dir.path().join("peer.log");
        let mut cmd = Command::new(samples.join(program));
        if program == "gpio-pci-idio-16" {
            cmd.arg("-R"); // serve one client, then exit, like `server`
        }
        let child = cmd
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("peer.out")).expect("out"))
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn libvfio-user sample");
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{program} did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Peer {
            child,
            socket,
            log,
            _dir: dir,
        }
    }

    fn path(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sample logged nothing: without `-v` it logs errors only.
    fn assert_quiet(&self) {
        let log = self.log();
        assert!(log.trim().is_empty(), "the sample logged:\n{log}");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `minivmm run ARGS` at info level to its end; returns (exit code, stdout, stderr).
fn run_info(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = minivmm()
        .env("RUST_LOG", "info")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn minivmm");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("minivmm {args:?} did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn sample_server_with_two_io_bars_passes_through() {
    let Some(dir) = samples() else { return };
    let peer = Peer::spawn(&dir, "server");
    let (code, out, err) = run_info(&["run", "--guest", "hello", "--vfio-user", peer.path()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("hello: minivmm guest up"), "{out}");
    assert!(err.contains("vfio vfio0: dead:beef, 2 BARs"), "{err}");
    // Both I/O BARs placed in the port window, naturally aligned.
    assert!(err.contains("BAR 1: I/O, 0x4000 bytes at 0x4000"), "{err}");
    assert!(err.contains("BAR 0: I/O, 0x8 bytes at 0x1000"), "{err}");
    assert!(err.contains("INTx Some(16)"), "{err}");
    peer.assert_quiet();
}

#[test]
fn gpio_card_passes_through_to_hello() {
    let Some(dir) = samples() else { return };
    let peer = Peer::spawn(&dir, "gpio-pci-idio-16");
    let (code, out, err) = run_info(&["run", "--guest", "hello", "--vfio-user", peer.path()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("hello: minivmm guest up"), "{out}");
    assert!(err.contains("BAR 2: I/O, 0x100 bytes"), "{err}");
    assert!(err.contains("INTx Some(16)"), "{err}");
    peer.assert_quiet();
}

#[test]
fn gpio_card_is_driven_through_its_io_bar() {
    let Some(dir) = samples() else { return };
    let peer = Peer::spawn(&dir, "gpio-pci-idio-16");
    let args = [
        "run",
        "--guest",
        "gpio",
        "--vfio-user",
        peer.path(),
        "--cmdline",
        "rounds=7 ms=1",
    ];
    let (code, out, err) = run_info(&args);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("vfio vfio0: 494f:0dc8, 1 BARs"), "{err}");
    assert!(err.contains("BAR 2: I/O, 0x100 bytes"), "{err}");
    // Seven rounds of pulses, each checked against the inputs the device derives from them.
    assert!(out.contains("GPIO round 7 ok pulses=7"), "{out}");
    assert!(!out.contains("BAD"), "{out}");
    peer.assert_quiet();
}

/// A destination with its own sample server, listening on `addr`.
fn destination(addr: &str, peer: &Peer) -> Vm {
    let d = Vm::spawn(&["receive", "--listen", addr, "--vfio-user", peer.path()]);
    wait_listening(addr);
    d
}

/// The dirtier guest with the sample server at `dev`.
fn dirtier_with(dev: &str) -> Vm {
    let vm = Vm::spawn(&[
        "run",
        "--guest",
        "dirtier",
        "--memory",
        "128M",
        "--cmdline",
        "hb_ms=20 share=50",
        "--vfio-user",
        dev,
    ]);
    vm.wait_line(|l| l == "HB 5", LIMIT);
    vm
}

#[test]
fn sample_server_state_migrates_in_stop_copy() {
    let Some(dir) = samples() else { return };
    let (p1, p2) = (Peer::spawn(&dir, "server"), Peer::spawn(&dir, "server"));
    let addr = free_addr();
    let mut dst = destination(&addr, &p2);
    let mut src = dirtier_with(&format!("{},pre-copy=off", p1.path()));
    migrate_request(&src, &addr, "");
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    let stats: serde_json::Value =
        serde_json::from_str(src.stdout().trim()).expect("source stats JSON");
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(stats["vfio"]["transferred"], SERVER_STATE_BYTES, "{stats}");
    runs_on_at_destination(&src, &mut dst, LIMIT);
    p1.assert_quiet();
    p2.assert_quiet();
}

#[test]
fn sample_server_pre_copy_refusal_is_one_line_and_the_guest_stays() {
    // The sample streams BAR1 in PRE_COPY but its RESUMING takes exactly the STOP_COPY
    // bytes: with pre-copy on, its destination refuses the extra data.
    let Some(dir) = samples() else { return };
    let (p1, p2) = (Peer::spawn(&dir, "server"), Peer::spawn(&dir, "server"));
    let addr = free_addr();
    let mut dst = destination(&addr, &p2);
    let mut src = dirtier_with(p1.path());
    migrate_request(&src, &addr, "");
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "failed", "{stats}");
    let stderr = src.stderr();
    let failed: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("minivmm: migration failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{stderr}");
    assert!(
        failed[0].contains("device vfio0: writing migration data")
            && failed[0].contains("MIG_DATA_WRITE"),
        "{stderr}"
    );
    assert_ne!(dst.wait_exit(LIMIT).code(), Some(0));
    // The guest keeps running on the source, its pages intact.
    let hb = heartbeats(&src.lines()).len();
    let target = format!("HB {}", hb + 10);
    src.wait_line(|l| l == target, LIMIT);
    assert_eq!(src.ctl(r#"{"cmd":"status"}"#)["state"], "running");
    assert_eq!(src.ctl(r#"{"cmd":"shutdown"}"#)["ok"], true);
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0));
    let lines = src.lines();
    no_bad(&lines);
    assert_contiguous(&heartbeats(&lines));
}
