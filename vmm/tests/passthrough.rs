//! Passthrough acceptance: the dmatest guest drives a real sampledev process through
//! minivmm's PCI bus, vfio-user client, MSI-X routing (or INTx through the IOAPIC) and DMA
//! mapping.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(90);

#[test]
fn dmatest_drives_sampledev_end_to_end() {
    let dev = SampleDev::spawn(&["--state-size", "1M"]);
    let out = run_to_end(&dmatest_args(dev.path(), "rounds=3 bufs=4"), LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The guest moved BAR0 and found the device only at the new address.
    assert!(
        stdout.contains("moved to") && stdout.contains("at new=0x53445631"),
        "{stdout}"
    );
    for r in 1..=3 {
        let irqs = 4 * r;
        assert!(
            stdout.contains(&format!(
                "DMATEST round {r} ok bufs=4 irqs={irqs} counter={irqs}"
            )),
            "round {r} missing:\n{stdout}"
        );
    }
    assert!(stdout.contains("DMATEST verify ok"), "{stdout}");
}

/// sampledev with INTx instead of MSI-X: minivmm wires the pin to IOAPIC GSI 16 through a
/// level-triggered irqfd with resample and writes 16 into INTERRUPT_LINE; the guest routes
/// that pin, acks the device in its handler and EOIs. Every completion must come as exactly
/// one interrupt that found DONE (a lost re-assertion after the EOI ends the guest in
/// `no-irq`, an extra counted one in `BAD irqs`).
#[test]
fn dmatest_takes_sampledev_intx_through_the_ioapic() {
    let dev = SampleDev::spawn(&["--state-size", "1M", "--irq", "intx"]);
    let out = run_to_end(&dmatest_args(dev.path(), "rounds=3 bufs=4 irq=intx"), LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("dmatest: INTx pin=1 line=16 "),
        "INTx not wired to GSI 16:\n{stdout}"
    );
    for r in 1..=3 {
        let irqs = 4 * r;
        let want = format!("DMATEST round {r} ok bufs=4 irqs={irqs} counter={irqs} ");
        let line = stdout.lines().find(|l| l.starts_with(&want));
        let line = line.unwrap_or_else(|| panic!("round {r} missing:\n{stdout}"));
        assert!(line.contains(" spurious="), "{line}");
    }
    assert!(stdout.contains("DMATEST verify ok"), "{stdout}");
}

/// The same guest without `irq=intx` on an INTx-only device finds no MSI-X and says so.
#[test]
fn dmatest_without_intx_refuses_an_intx_only_device() {
    let dev = SampleDev::spawn(&["--state-size", "4K", "--irq", "intx"]);
    let out = run_to_end(&dmatest_args(dev.path(), "rounds=1 bufs=1"), LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("dmatest: no MSI-X capability"), "{stdout}");
}

#[test]
fn device_process_dying_is_reported_without_hanging() {
    let mut dev = SampleDev::spawn(&["--state-size", "1M"]);
    let mut vm = Vm::spawn(&dmatest_args(dev.path(), "rounds=0 bufs=4"));
    vm.wait_line(|l| l.starts_with("DMATEST round 2 ok"), LIMIT);
    dev.child.kill().unwrap();
    let status = vm.wait_exit(LIMIT);
    // The guest sees all-ones status and stops with its device-error code.
    assert_eq!(status.code(), Some(6), "{:?}", vm.lines());
    let err = vm.stderr();
    assert!(err.contains("passthrough device vfio0 lost"), "{err}");
    assert_eq!(
        err.matches("passthrough device vfio0 lost").count(),
        1,
        "reported once: {err}"
    );
}

#[test]
fn missing_vfio_user_socket_is_a_clear_error() {
    let err = error_line(&[
        "run",
        "--guest",
        "hello",
        "--vfio-user",
        "/nonexistent/sd.sock",
    ]);
    assert!(err.contains("/nonexistent/sd.sock"), "{err}");
}

#[test]
fn kernel_vfio_without_dev_vfio_is_a_clear_error() {
    let err = error_line(&[
        "run",
        "--guest",
        "hello",
        "--vfio",
        "/sys/bus/pci/devices/0000:00:99.0",
    ]);
    assert!(err.contains("--vfio"), "{err}");
}

/// A device that answers every BAR access 15 ms late never errs, yet stalls the vCPU each
/// time: minivmm says so once, with the latency, and the guest still completes.
#[test]
fn a_consistently_slow_device_is_reported_once() {
    let dev = SampleDev::spawn(&["--state-size", "1M", "--slow-bar", "15"]);
    let out = run_to_end(&dmatest_args(dev.path(), "rounds=2 bufs=2"), LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("DMATEST verify ok"), "{stdout}");
    let reports: Vec<&str> = stderr.lines().filter(|l| l.contains("is slow")).collect();
    assert_eq!(reports.len(), 1, "{stderr}");
    assert!(
        reports[0].contains(dev.path()) && reports[0].contains("accesses in a row took over 10 ms"),
        "{}",
        reports[0]
    );
}

#[test]
fn a_device_at_normal_speed_is_not_reported_slow() {
    let dev = SampleDev::spawn(&["--state-size", "1M"]);
    let out = run_to_end(&dmatest_args(dev.path(), "rounds=2 bufs=2"), LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("is slow"), "{stderr}");
}
