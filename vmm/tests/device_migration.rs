//! Live migration of a guest that owns a passthrough device: the dmatest guest keeps DMA
//! running into its RAM while it moves between two minivmm processes, each with its own
//! sampledev, and checks after the switchover every buffer the device wrote, the device's
//! counter and internal state, and that interrupts keep coming.
//!
//! Strict mode: every sampledev runs with `RUST_LOG=info`, its log in a file, and each test
//! asserts that neither device refused an arc the uAPI does not allow (sampledev logs every
//! such refusal with its INVALID_ARCS count). That needs no VMM change and covers both ends,
//! including a source that has exited.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);
const GUEST: &str = "rounds=0 bufs=16 buf_kb=4";
/// The same with the device's INTx (`sampledev --irq intx`) instead of MSI-X.
const GUEST_INTX: &str = "rounds=0 bufs=16 buf_kb=4 irq=intx";
/// DMA operations (and interrupts) per dmatest round: one FILL per buffer. Many small
/// buffers put DMA writes into even a short migration window.
const OPS_PER_ROUND: u64 = 16;

/// A sampledev process whose log is kept for the strictness check.
struct Dev {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dev {
    fn spawn(args: &[&str]) -> Dev {
        Self::spawn_log(args, "info")
    }

    /// With `RUST_LOG` = `filter` (which must include info for the strictness checks).
    fn spawn_log(args: &[&str], filter: &str) -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sd.sock");
        let log = dir.path().join("sd.log");
        let child = Command::new(sampledev_bin())
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn sampledev");
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "no sampledev");
            std::thread::sleep(Duration::from_millis(10));
        }
        Dev {
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

    /// The device refused no arc as invalid.
    fn assert_strict(&self) {
        let log = self.log();
        assert!(!log.contains("invalid arcs:"), "invalid arcs:\n{log}");
    }

    /// Every DMA_LOGGING_START was followed by a STOP (sampledev refuses a second START).
    fn assert_logging_off(&self) {
        let log = self.log();
        let started = log.matches("DMA logging started").count();
        assert!(started > 0, "DMA logging never started:\n{log}");
        assert_eq!(started, log.matches("DMA logging stopped").count(), "{log}");
    }

    /// The arcs it walked, in order.
    fn arcs(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split_once("migration arc ").map(|(_, a)| a.to_owned()))
            .filter(|a| !a.contains("failed") && !a.contains("refused"))
            .collect()
    }

    fn wait_log(&self, what: &str) {
        let start = Instant::now();
        while !self.log().contains(what) {
            assert!(start.elapsed() < LIMIT, "no {what:?} in:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn destination(addr: &str, dev: &Dev, env: &[(&str, &str)]) -> Vm {
    let d = Vm::spawn_env(
        &["receive", "--listen", addr, "--vfio-user", dev.path()],
        env,
    );
    wait_listening(addr);
    d
}

/// dmatest on `dev`, once it has finished its first round.
fn source(dev: &Dev, env: &[(&str, &str)]) -> Vm {
    source_with(dev, GUEST, env)
}

/// dmatest with command line `guest` on `dev`, once it has finished its first round.
fn source_with(dev: &Dev, guest: &str, env: &[(&str, &str)]) -> Vm {
    let vm = Vm::spawn_env(&dmatest_args(dev.path(), guest), env);
    vm.wait_line(|l| l.starts_with("DMATEST round 1 ok"), LIMIT);
    vm
}

/// (round, irqs, counter) of each completed round (a line still being written is not).
fn rounds(lines: &[String]) -> Vec<(u64, u64, u64)> {
    let field = |l: &str, k: &str| -> u64 {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX)
    };
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("DMATEST round "))
        .filter(|l| l.contains(" sum="))
        .map(|l| {
            let round = l.split_whitespace().next().and_then(|r| r.parse().ok());
            (
                round.unwrap_or(u64::MAX),
                field(l, "irqs="),
                field(l, "counter="),
            )
        })
        .collect()
}

/// The last round `vm`'s guest completed.
fn last_round(vm: &Vm) -> u64 {
    rounds(&vm.lines()).last().map_or(0, |r| r.0)
}

/// Waits for `more` rounds after round `after`, then checks every round so far: one after
/// the other, with the interrupt count and the device's COUNTER where they must be.
fn assert_rounds_continue(vm: &Vm, after: u64, more: u64) -> u64 {
    let last = after;
    let want = format!("DMATEST round {} ok", last + more);
    vm.wait_line(|l| l.starts_with(&want), LIMIT);
    let lines = vm.lines();
    no_bad(&lines);
    check_rounds(&rounds(&lines));
    last + more
}

fn check_rounds(rs: &[(u64, u64, u64)]) {
    for (i, &(round, irqs, counter)) in rs.iter().enumerate() {
        let first = rs[0].0;
        assert_eq!(round, first + i as u64, "rounds out of order: {rs:?}");
        let ops = OPS_PER_ROUND * round;
        assert_eq!((irqs, counter), (ops, ops), "round {round}: {rs:?}");
    }
}

/// A successful migration with sampledev `args` at both ends (and `src_env` for the source
/// minivmm): the destination guest runs at least two whole rounds of DMA after the
/// switchover and finds every buffer, the counter and the state as the source left them.
/// Returns the source statistics and both devices.
fn migrate_ok(args: &[&str], extra: &str) -> (serde_json::Value, Dev, Dev) {
    let (stats, sd1, sd2, _) = migrate_ok_with(args, "info", GUEST, extra);
    (stats, sd1, sd2)
}

/// `migrate_ok` with sampledev logging `log` and dmatest command line `guest`; also returns
/// the guest's serial lines, source then destination.
fn migrate_ok_with(
    args: &[&str],
    log: &str,
    guest: &str,
    extra: &str,
) -> (serde_json::Value, Dev, Dev, Vec<String>) {
    let (sd1, sd2) = (Dev::spawn_log(args, log), Dev::spawn_log(args, log));
    let addr = free_addr();
    let mut dst = destination(&addr, &sd2, &[]);
    let mut src = source_with(&sd1, guest, &[]);
    migrate_request(&src, &addr, extra);
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    let stats: serde_json::Value =
        serde_json::from_str(src.stdout().trim()).expect("source stats JSON");
    assert_eq!(stats["status"], "completed", "{stats}");
    let src_lines = src.lines();
    no_bad(&src_lines);
    assert_rounds_continue(&dst, last_round(&src), 2);
    assert_eq!(dst.ctl(r#"{"cmd":"shutdown"}"#)["ok"], true);
    assert_eq!(dst.wait_exit(LIMIT).code(), Some(0), "{}", dst.stderr());
    let all = joined_lines(&src, &dst);
    check_rounds(&rounds(&all));
    assert_contiguous(&heartbeats(&all));
    sd1.assert_strict();
    sd2.assert_strict();
    sd1.assert_logging_off();
    (stats, sd1, sd2, all)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn dma_guest_migrates_with_precopy_and_p2p() {
    let (stats, sd1, sd2) = migrate_ok(&["--state-size", "4K"], "");
    assert!(
        stats["vfio"]["transferred"].as_u64().unwrap() >= 4096,
        "{stats}"
    );
    let src_arcs = strings(&[
        "RUNNING -> PRE_COPY",
        "PRE_COPY -> PRE_COPY_P2P",
        "PRE_COPY_P2P -> STOP_COPY",
        "STOP_COPY -> STOP",
    ]);
    assert_eq!(sd1.arcs(), src_arcs);
    let dst_arcs = strings(&[
        "RUNNING -> RUNNING_P2P",
        "RUNNING_P2P -> STOP",
        "STOP -> RESUMING",
        "RESUMING -> STOP",
        "STOP -> RUNNING_P2P",
        "RUNNING_P2P -> RUNNING",
    ]);
    assert_eq!(sd2.arcs(), dst_arcs);
}

/// The device's INTx instead of MSI-X: a level-triggered IOAPIC pin fed by an irqfd with
/// resample at both ends. After the switchover the destination's completions must still
/// interrupt the guest, one counted interrupt per DMA operation (`check_rounds`), and they
/// come from the destination's sampledev asserting its own INTx.
#[test]
fn dma_guest_with_intx_migrates_and_interrupts_keep_coming() {
    let args = ["--state-size", "4K", "--irq", "intx"];
    // sampledev logs each INTx assertion at debug.
    let log = "info,sampledev::intx=debug";
    let (stats, sd1, sd2, all) = migrate_ok_with(&args, log, GUEST_INTX, "");
    assert_eq!(stats["status"], "completed", "{stats}");
    // The guest took its interrupts through the IOAPIC pin that minivmm wired the INTx to.
    let setup = all.iter().find(|l| l.starts_with("dmatest: INTx "));
    let setup = setup.unwrap_or_else(|| panic!("no INTx set-up line: {all:?}"));
    assert!(setup.contains("pin=1 line=16"), "{setup}");
    for sd in [&sd1, &sd2] {
        assert!(sd.log().contains("interrupt Intx"), "{}", sd.log());
    }
    // The destination completed at least the last round (OPS_PER_ROUND operations) by
    // itself, each taken by the guest as an interrupt: every interrupt the guest takes
    // there is an assertion of the destination's INTx after it was resumed, except at most
    // two that the switchover can carry in the IOAPIC and LAPIC state.
    // (The arc into RUNNING is logged once done, after the assertion of an INTx that was
    // pending at the switchover; the stream was loaded before anything could assert.)
    let dst_log = sd2.log();
    let loaded = dst_log
        .find("migration stream loaded")
        .unwrap_or_else(|| panic!("destination never loaded the stream:\n{dst_log}"));
    let asserted = dst_log[loaded..].matches("INTx asserted").count() as u64;
    assert!(asserted + 2 >= OPS_PER_ROUND, "{asserted}:\n{dst_log}");
    assert!(!dst_log[..loaded].contains("INTx asserted"), "{dst_log}");
}

#[test]
fn device_state_of_256m_streams_during_precopy() {
    let (stats, _, _) = migrate_ok(&["--state-size", "256M"], "");
    let device = stats["vfio"]["transferred"].as_u64().unwrap();
    assert!(device >= 256 << 20, "{stats}");
}

#[test]
fn stop_copy_only_device_without_p2p() {
    let (_, sd1, sd2) = migrate_ok(&["--state-size", "1M", "--no-precopy", "--no-p2p"], "");
    assert_eq!(
        sd1.arcs(),
        strings(&["RUNNING -> STOP", "STOP -> STOP_COPY", "STOP_COPY -> STOP"])
    );
    assert!(sd2.arcs().contains(&"STOP -> RUNNING".to_owned()));
}

#[test]
fn v1_region_device() {
    let (stats, sd1, _) = migrate_ok(&["--state-size", "1M", "--migration", "v1"], "");
    assert!(
        stats["vfio"]["transferred"].as_u64().unwrap() >= 1 << 20,
        "{stats}"
    );
    assert!(sd1.arcs().contains(&"PRE_COPY -> STOP_COPY".to_owned()));
}

#[test]
fn device_without_dma_log_blocks_until_forced() {
    let args = ["--state-size", "4K", "--no-dirty-log"];
    let (sd1, sd2) = (Dev::spawn(&args), Dev::spawn(&args));
    let addr = free_addr();
    let mut dst = destination(&addr, &sd2, &[]);
    let src = source(&sd1, &[]);
    migrate_request(&src, &addr, "");
    let stats = wait_migration_end(&src);
    let err = stats["error-desc"].as_str().unwrap_or_default().to_owned();
    let who = format!("vfio0 (--vfio-user {})", sd1.path());
    assert!(
        err.starts_with(&who) && err.contains("DMA writes"),
        "{stats}"
    );
    // Nothing was sent: the destination still waits for its first connection.
    assert!(dst.child.try_wait().unwrap().is_none());
    assert_rounds_continue(&src, last_round(&src), 1);
    migrate_request(&src, &addr, r#","force_dirty_dma":true"#);
    let mut src = src;
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    assert_rounds_continue(&dst, last_round(&src), 2);
    assert_eq!(dst.ctl(r#"{"cmd":"shutdown"}"#)["ok"], true);
    sd1.assert_strict();
    sd2.assert_strict();
}

#[test]
fn unmigratable_device_blocks_before_anything_is_sent() {
    let sd1 = Dev::spawn(&["--state-size", "4K", "--migration", "none"]);
    let sd2 = Dev::spawn(&["--state-size", "4K"]);
    let addr = free_addr();
    let mut dst = destination(&addr, &sd2, &[]);
    let src = source(&sd1, &[]);
    migrate_request(&src, &addr, r#","force_dirty_dma":true"#);
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "failed", "{stats}");
    let err = stats["error-desc"].as_str().unwrap_or_default();
    let want = format!("vfio0 (--vfio-user {}) cannot migrate", sd1.path());
    assert!(err.starts_with(&want), "{stats}");
    assert!(dst.child.try_wait().unwrap().is_none());
    assert_rounds_continue(&src, last_round(&src), 2);
}

/// Without the device's DMA report the destination gets stale copies of the buffers the
/// device wrote during pre-copy, and the guest must notice: the checks can fail.
#[test]
fn skipping_the_dma_log_loses_pages_and_the_guest_notices() {
    // A 64 MiB state keeps pre-copy going across several DMA operations.
    let args = ["--state-size", "64M"];
    let (sd1, sd2) = (Dev::spawn(&args), Dev::spawn(&args));
    let addr = free_addr();
    let mut dst = destination(&addr, &sd2, &[]);
    let mut src = source(&sd1, &[("MINIVMM_FAULT", "skip-dma-log")]);
    migrate_request(&src, &addr, "");
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    let bad = dst.wait_line(|l| l.starts_with("DMATEST BAD"), LIMIT);
    assert!(bad.contains("buf="), "{bad}");
    // dmatest's exit code for a bad page.
    assert_eq!(dst.wait_exit(LIMIT).code(), Some(3));
}

/// A migration that fails: the source guest runs on with a working device (rounds, irqs and
/// COUNTER continue), the destination exits non-zero, neither device saw an invalid arc.
fn failed_migration(src_args: &[&str], dst_args: &[&str], dst_env: &[(&str, &str)]) -> String {
    let (sd1, sd2) = (Dev::spawn(src_args), Dev::spawn(dst_args));
    let addr = free_addr();
    let mut dst = destination(&addr, &sd2, dst_env);
    let mut src = source(&sd1, &[]);
    migrate_request(&src, &addr, "");
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "failed", "{stats}");
    assert_ne!(dst.wait_exit(LIMIT).code(), Some(0));
    let line = error_text(&dst.stderr());
    assert_eq!(
        line.trim().lines().count(),
        1,
        "one line from the destination: {line}"
    );
    assert_rounds_continue(&src, last_round(&src), 2);
    assert_eq!(src.ctl(r#"{"cmd":"shutdown"}"#)["ok"], true);
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0));
    assert_contiguous(&heartbeats(&src.lines()));
    sd1.assert_strict();
    sd2.assert_strict();
    sd1.assert_logging_off();
    // Back to RUNNING, or never left it.
    let arcs = sd1.arcs();
    let last = arcs.last();
    assert!(last.is_none_or(|a| a.ends_with("-> RUNNING")), "{arcs:?}");
    stats["error-desc"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn source_arc_failure_at_switchover_recovers() {
    let err = failed_migration(
        &["--state-size", "4K", "--fail-arc", "PRE_COPY_P2P:STOP_COPY"],
        &["--state-size", "4K"],
        &[],
    );
    assert!(err.contains("vfio0") && err.contains("StopCopy"), "{err}");
}

#[test]
fn source_arc_failure_entering_precopy_recovers() {
    let err = failed_migration(
        &["--state-size", "4K", "--fail-arc", "RUNNING:PRE_COPY"],
        &["--state-size", "4K"],
        &[],
    );
    assert!(err.contains("PreCopy"), "{err}");
}

#[test]
fn corrupt_stream_is_refused_and_the_source_recovers() {
    let err = failed_migration(
        &["--state-size", "1M", "--corrupt-stream"],
        &["--state-size", "1M"],
        &[],
    );
    assert!(err.contains("abandoned"), "{err}");
}

#[test]
fn destination_arc_failure_recovers_the_source() {
    let err = failed_migration(
        &["--state-size", "4K"],
        &["--state-size", "4K", "--fail-arc", "RESUMING:STOP"],
        &[],
    );
    assert!(err.contains("abandoned"), "{err}");
}

/// A slow stop-copy keeps the guest paused while the destination dies mid-stream: the source
/// must take its device back from STOP_COPY and run on.
#[test]
fn destination_dies_during_a_slow_stop_copy() {
    let args = [
        "--state-size",
        "16M",
        "--no-precopy",
        "--slow-stop-copy",
        "200",
    ];
    let (sd1, sd2) = (
        Dev::spawn(&args),
        Dev::spawn(&["--state-size", "16M", "--no-precopy"]),
    );
    let addr = free_addr();
    let mut dst = destination(&addr, &sd2, &[]);
    let mut src = source(&sd1, &[]);
    migrate_request(&src, &addr, r#","downtime_ms":10000"#);
    sd1.wait_log("-> STOP_COPY");
    std::thread::sleep(Duration::from_millis(300));
    dst.child.kill().unwrap();
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "failed", "{stats}");
    assert_rounds_continue(&src, last_round(&src), 2);
    assert_eq!(src.ctl(r#"{"cmd":"shutdown"}"#)["ok"], true);
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0));
    sd1.assert_strict();
    sd1.assert_logging_off();
    let arcs = sd1.arcs();
    assert!(arcs.contains(&"STOP_COPY -> STOP".to_owned()), "{arcs:?}");
    assert_eq!(
        arcs.last().map(String::as_str),
        Some("RUNNING_P2P -> RUNNING")
    );
}

#[test]
fn v1_arc_failure_recovers() {
    let err = failed_migration(
        &[
            "--state-size",
            "1M",
            "--migration",
            "v1",
            "--fail-arc",
            "PRE_COPY:STOP_COPY",
        ],
        &["--state-size", "1M", "--migration", "v1"],
        &[],
    );
    assert!(err.contains("the device is now PreCopy"), "{err}");
}
