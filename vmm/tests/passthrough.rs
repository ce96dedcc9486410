//! Passthrough acceptance: the dmatest guest drives a real sampledev process through
//! minivmm's PCI bus, vfio-user client, MSI-X routing and DMA mapping.

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
