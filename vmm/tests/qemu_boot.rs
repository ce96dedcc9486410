//! The embedded test guests also boot under QEMU's `-kernel` (multiboot), as the side-by-side
//! benchmarks need (guests/README.md "Booting under QEMU"). Skipped, with a note, when
//! qemu-system-x86_64 is not installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

fn qemu_present() -> bool {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("note: qemu-system-x86_64 not found; skipping the QEMU boot test");
    }
    found
}

/// The guest images, written out by `minivmm guests --extract` (what the bench scripts use).
fn extract(dir: &Path) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .args(["guests", "--extract"])
        .arg(dir)
        .output()
        .expect("run minivmm guests --extract");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_path_buf()
}

/// Boots `guest` under QEMU with the exit port device and waits for it to end (KVM when
/// /dev/kvm can be opened, TCG otherwise: the guests need nothing KVM-specific).
fn qemu(image: &Path, memory: &str, smp: u32, append: &str) -> Output {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(if kvm {
        &["-enable-kvm"][..]
    } else {
        &["-accel", "tcg"][..]
    })
    .args(["-m", memory])
    // SeaBIOS's MP table lists one CPU per package: one socket per vCPU lists them all.
    .args(["-smp", &format!("{smp},sockets={smp}")])
    .args([
        "-nographic",
        "-nodefaults",
        "-serial",
        "stdio",
        "-monitor",
        "none",
    ])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .arg("-kernel")
    .arg(image)
    .args(["-append", append])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn qemu-system-x86_64");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "QEMU with {} did not finish within {LIMIT:?}; serial:\n{}",
                image.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// QEMU's exit status for a guest exit code written to isa-debug-exit.
fn qemu_status(guest_code: i32) -> Option<i32> {
    Some(guest_code << 1 | 1)
}

fn check(out: &Output, guest_code: i32, want: &[&str]) {
    let serial = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = serial.lines().collect();
    for w in want {
        assert!(
            lines.iter().any(|l| l == w),
            "no line {w:?} in the serial output:\n{serial}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        out.status.code(),
        qemu_status(guest_code),
        "serial:\n{serial}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn guests_boot_under_qemu_multiboot() {
    if !qemu_present() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let images = extract(dir.path());

    let out = qemu(&images.join("hello.elf"), "128M", 1, "a=1 b=2");
    // The image path QEMU puts first on the multiboot command line is dropped.
    check(
        &out,
        0,
        &["hello: minivmm guest up", "hello: cmdline=\"a=1 b=2\""],
    );

    let out = qemu(&images.join("dirtier.elf"), "256M", 1, "passes=1 hb_ms=50");
    check(
        &out,
        0,
        &["HB 0", "PASS 1 ok pages=32703", "VERIFY ok pages=32703"],
    );

    // A bad parameter: guest exit code 1.
    let out = qemu(&images.join("dirtier.elf"), "64M", 1, "share=abc");
    check(&out, 1, &["dirtier: bad share=abc (want 0..=100)"]);

    let out = qemu(&images.join("smp.elf"), "128M", 2, "");
    check(&out, 0, &["SMP all 2 up"]);
}
