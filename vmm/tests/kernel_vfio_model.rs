//! minivmm's real kernel-VFIO backend (`--vfio`, vfio-ioctls) against `vfio-model`, an
//! LD_PRELOAD model of the kernel side of VFIO serving one mtty device. What passes here is
//! minivmm's side of the uAPI; the kernel's side has only been read, never run (README
//! "Passthrough devices"). The `mtty` guest reads the device's config space, counts INTx
//! loopback interrupts and leaves UART state that must be read back after a migration to a
//! second minivmm with its own model instance.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(90);

/// libvfio_model.so next to minivmm, (re)built once per test process so that it matches
/// the sources.
fn model_so() -> PathBuf {
    static SO: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SO.get_or_init(build_model).clone()
}

fn build_model() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_minivmm"))
        .parent()
        .expect("target dir")
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "vfio-model"]);
    if dir.ends_with("release") {
        build.arg("--release");
    }
    let st = build.status().expect("cargo build");
    assert!(st.success(), "building vfio-model failed");
    let so = dir.join("libvfio_model.so");
    assert!(so.exists(), "{so:?} missing after the build");
    so
}

/// A fake sysfs device directory (its `iommu_group` a symlink ending in the group number,
/// which is all vfio-ioctls reads) and the environment that gives a process its own model.
struct FakeDevice {
    dir: tempfile::TempDir,
    path: String,
    spec: String,
    so: String,
}

impl FakeDevice {
    fn new(group: u32, name: &str, options: &str) -> FakeDevice {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = dir.path().join("devices").join(name);
        std::fs::create_dir_all(&dev).unwrap();
        std::os::unix::fs::symlink(
            format!("../../../kernel/iommu_groups/{group}"),
            dev.join("iommu_group"),
        )
        .unwrap();
        let log = dir.path().join("model.log");
        let spec = format!("group={group},device={name},log={}{options}", log.display());
        FakeDevice {
            path: dev.to_str().unwrap().to_owned(),
            spec,
            so: model_so().to_str().unwrap().to_owned(),
            dir,
        }
    }

    fn env(&self) -> [(&str, &str); 2] {
        [("LD_PRELOAD", &self.so), ("VFIO_MODEL", &self.spec)]
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("model.log")).unwrap_or_default()
    }

    /// The model saw nothing it refuses except what minivmm probes for on purpose.
    fn assert_no_refused_access(&self) {
        let log = self.log();
        assert!(
            log.contains("a userspace MODEL of mtty"),
            "model not loaded:\n{log}"
        );
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("region ") || l.contains("EFAULT") || l.contains("Errno(14)"))
            .collect();
        assert!(bad.is_empty(), "refused accesses: {bad:#?}");
    }
}

fn line_with<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in {lines:#?}"))
}

/// The value of `key=` in a guest line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn num(line: &str, key: &str) -> u64 {
    field(line, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key}= in {line:?}"))
}

/// What the guest must print about the device's config space, whichever VM it runs in.
fn assert_config_read(lines: &[String]) {
    let ids = line_with(lines, "MTTY ids ");
    assert_eq!(
        ids,
        "MTTY ids vendor=0x4348 device=0x3253 class=0x70002 rev=0x10 subsys=0x4348:0x3253 pin=1 line=16",
        "config space as the guest read it"
    );
    assert_eq!(line_with(lines, "MTTY tag "), "MTTY tag PCI Serial/UART");
    // The BARs are minivmm's (placed in the I/O window), the rest is the device's.
    let cfg: Vec<&str> = line_with(lines, "MTTY cfg ").split(' ').skip(2).collect();
    assert_eq!(cfg.len(), 28, "{cfg:?}");
    assert_eq!(cfg[0], "0x32534348");
    assert_eq!(cfg[11], "0x32534348", "subsystem ids");
    assert_eq!(
        &cfg[24..],
        ["0x20494350", "0x69726553", "0x552f6c61", "0x545241"]
    );
}

fn assert_intx_rounds(line: &str, rounds: u64) {
    assert_eq!(num(line, "rounds"), rounds, "{line}");
    // Exactly one interrupt per loopback byte: none lost for good, none doubled.
    assert_eq!(num(line, "irqs"), rounds, "{line}");
    assert!(
        num(line, "retries") <= rounds / 2,
        "too many lost interrupts: {line}"
    );
}

#[test]
fn boots_reads_config_space_and_gets_intx() {
    let dev = FakeDevice::new(42, "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001", "");
    let start = Instant::now();
    let mut vm = Vm::spawn_env(
        &[
            "run",
            "--guest",
            "mtty",
            "--memory",
            "64M",
            "--vfio",
            &dev.path,
            "--cmdline",
            "rounds=16 after=4",
        ],
        &dev.env(),
    );
    let st = vm.wait_exit(LIMIT);
    let lines = vm.lines();
    assert_eq!(st.code(), Some(0), "{}\n{}", lines.join("\n"), vm.stderr());
    eprintln!("boot run took {:?}", start.elapsed());
    no_bad(&lines);
    assert_config_read(&lines);
    assert_intx_rounds(line_with(&lines, "MTTY intx ok "), 16);
    assert!(line_with(&lines, "MTTY state ok ").contains("fifo0=12:minivmm-mtty fifo1=5:state"));
    assert_intx_rounds(line_with(&lines, "MTTY intx after ok "), 4);
    assert_eq!(num(line_with(&lines, "MTTY done "), "irqs"), 20);
    // mtty takes no unmask eventfd (ENOTTY): the interrupts above came through minivmm's
    // fallback, unmasking from userspace after each EOI.
    let log = dev.log();
    assert!(
        log.contains("DEVICE_SET_IRQS(flags 0x14) -> Err(Errno(25))"),
        "unmask eventfd not tried:\n{log}"
    );
    assert!(
        log.contains("DEVICE_SET_IRQS(flags 0x11) -> Ok(0)"),
        "no userspace unmask (DATA_NONE | ACTION_UNMASK):\n{log}"
    );
    // Teardown withdrew guest RAM from the container before freeing it.
    assert!(
        log.contains("IOMMU_UNMAP_DMA -> Ok(0)"),
        "DMA left mapped at exit:\n{log}"
    );
    dev.assert_no_refused_access();
}

/// Source and destination, each with its own model, the guest holding UART state while
/// it migrates; returns both logs' lines joined and the source's statistics.
fn migrate(
    src_opts: &str,
    dst_opts: &str,
    model_opts: &str,
    extra: &str,
) -> (Vec<String>, serde_json::Value, FakeDevice, FakeDevice) {
    let sdev = FakeDevice::new(42, "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001", model_opts);
    let ddev = FakeDevice::new(7, "c0ffee00-509f-382f-3c1e-e6bfe0fa1002", model_opts);
    let addr = free_addr();
    let dst_vfio = format!("{}{dst_opts}", ddev.path);
    let mut dst = Vm::spawn_env(
        &["receive", "--listen", &addr, "--vfio", &dst_vfio],
        &ddev.env(),
    );
    wait_listening(&addr);
    let src_vfio = format!("{}{src_opts}", sdev.path);
    let mut src = Vm::spawn_env(
        &[
            "run",
            "--guest",
            "mtty",
            "--memory",
            "64M",
            "--vfio",
            &src_vfio,
            "--cmdline",
            "rounds=8 after=8 hold_ms=6000 hb_ms=50",
        ],
        &sdev.env(),
    );
    src.wait_line(|l| l.starts_with("MTTY loaded "), LIMIT);
    let start = Instant::now();
    migrate_request(&src, &addr, extra);
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    eprintln!("migration took {:?}", start.elapsed());
    let stats: serde_json::Value =
        serde_json::from_str(src.stdout().trim()).expect("source stats JSON");
    assert_eq!(stats["status"], "completed", "{stats}");
    let st = dst.wait_exit(LIMIT);
    let all = joined_lines(&src, &dst);
    assert_eq!(st.code(), Some(0), "{}\n{}", all.join("\n"), dst.stderr());
    let src_lines = src.lines();
    let dst_lines = dst.lines();
    // The state was read back on the destination, from its own model.
    assert!(
        !src_lines.iter().any(|l| l.starts_with("MTTY state ")),
        "the hold ended before the migration: {src_lines:#?}"
    );
    assert_eq!(
        line_with(&dst_lines, "MTTY state "),
        "MTTY state ok fifo0=12:minivmm-mtty fifo1=5:state scr=0x5a,0xa5 lcr1=0x1b"
    );
    assert_intx_rounds(line_with(&dst_lines, "MTTY intx after ok "), 8);
    no_bad(&all);
    assert_config_read(&all);
    assert_intx_rounds(line_with(&all, "MTTY intx ok "), 8);
    assert_eq!(num(line_with(&dst_lines, "MTTY done "), "irqs"), 16);
    assert_contiguous(&heartbeats(&all));
    sdev.assert_no_refused_access();
    ddev.assert_no_refused_access();
    if let Ok(keep) = std::env::var("KEEP_MODEL_LOGS") {
        let _ = std::fs::write(format!("{keep}.src.log"), sdev.log());
        let _ = std::fs::write(format!("{keep}.dst.log"), ddev.log());
    }
    (all, stats, sdev, ddev)
}

#[test]
fn migrates_with_device_state_in_pre_copy() {
    let (_, stats, sdev, ddev) = migrate("", "", "", "");
    let (s, d) = (sdev.log(), ddev.log());
    assert!(s.contains("migration RUNNING -> PRE_COPY: Ok"), "{s}");
    assert!(s.contains("-> STOP_COPY: Ok"), "{s}");
    assert!(d.contains("-> RESUMING: Ok"), "{d}");
    assert!(d.contains("migration RESUMING -> "), "{d}");
    // Header (24 bytes) in pre-copy, two ports of 36 in stop-copy.
    assert_eq!(stats["vfio"]["transferred"], 24 + 2 * 36, "{stats}");
}

#[test]
fn migrates_with_device_state_in_stop_copy_only_without_dma_logging() {
    let (_, stats, sdev, _) = migrate(
        ",pre-copy=off",
        "",
        ",dma-logging=off",
        r#","force_dirty_dma":true"#,
    );
    let s = sdev.log();
    assert!(!s.contains("PRE_COPY: Ok"), "{s}");
    assert!(
        s.contains("migration RUNNING_P2P -> STOP_COPY: Ok") || s.contains("-> STOP_COPY: Ok"),
        "{s}"
    );
    assert_eq!(stats["vfio"]["transferred"], 24 + 2 * 36, "{stats}");
}

/// A destination whose device refuses the stream (a one-port mtty for a two-port one: the
/// model, as mtty, rejects the header on write) fails the migration before Go; the guest
/// stays on the source with its device state, which it then reads back there.
#[test]
fn a_destination_device_refusing_the_state_leaves_the_guest_on_the_source() {
    let sdev = FakeDevice::new(42, "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001", "");
    let ddev = FakeDevice::new(7, "c0ffee00-509f-382f-3c1e-e6bfe0fa1002", ",ports=1");
    let addr = free_addr();
    let mut dst = Vm::spawn_env(
        &["receive", "--listen", &addr, "--vfio", &ddev.path],
        &ddev.env(),
    );
    wait_listening(&addr);
    let mut src = Vm::spawn_env(
        &[
            "run",
            "--guest",
            "mtty",
            "--memory",
            "64M",
            "--vfio",
            &sdev.path,
            "--cmdline",
            "rounds=4 after=4 hold_ms=4000 hb_ms=50",
        ],
        &sdev.env(),
    );
    src.wait_line(|l| l.starts_with("MTTY loaded "), LIMIT);
    migrate_request(&src, &addr, "");
    let stats = wait_migration_end(&src);
    assert_ne!(stats["status"], "completed", "{stats}");
    assert_ne!(dst.wait_exit(LIMIT).code(), Some(0));
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    let lines = src.lines();
    no_bad(&lines);
    assert_eq!(
        line_with(&lines, "MTTY state "),
        "MTTY state ok fifo0=12:minivmm-mtty fifo1=5:state scr=0x5a,0xa5 lcr1=0x1b"
    );
    assert_intx_rounds(line_with(&lines, "MTTY intx after ok "), 4);
    assert_contiguous(&heartbeats(&lines));
    // The destination ended its RESUMING session with VFIO_DEVICE_RESET, which mtty
    // implements though it sets no VFIO_DEVICE_FLAGS_RESET, rather than losing the device.
    let (d, derr) = (ddev.log(), dst.stderr());
    assert!(d.contains("write Resume(1) 24 -> Err(Errno(14))"), "{d}");
    assert!(d.contains("DEVICE_RESET -> Ok(0)"), "{d}");
    assert!(
        !derr.contains("lost") && !derr.contains("reset failed"),
        "{derr}"
    );
    let s = sdev.log();
    // The source's device went back to RUNNING (its session ended) and kept working.
    assert!(s.contains("-> RUNNING: Ok"), "{s}");
}
