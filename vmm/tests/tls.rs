//! Mutual TLS on the migration channel, with real minivmm processes and certificates from
//! `minivmm certs`: a migration that works, and every peer that must be refused (plaintext to
//! TLS and back, another CA, expired certificates), after which the destination still waits
//! and the source's guest still runs. (A source presenting no certificate at all is refused in
//! the migration crate's TLS tests: minivmm itself always presents one.)

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(90);

/// `minivmm certs DIR` (with `extra` flags); returns DIR.
fn certs(dir: &Path, extra: &[&str]) -> PathBuf {
    let d = dir.to_str().expect("utf-8 path");
    let out = run_to_end(&[&["certs", d][..], extra].concat(), LIMIT);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    dir.to_owned()
}

fn side(dir: &Path, side: &str) -> String {
    dir.join(side).to_str().expect("utf-8 path").to_owned()
}

fn destination(addr: &str, tls: Option<&str>) -> Vm {
    let mut args = vec!["receive", "--listen", addr];
    if let Some(d) = tls {
        args.extend(["--tls-dir", d]);
    }
    let d = Vm::spawn(&args);
    wait_listening(addr);
    d
}

fn dirtier() -> Vm {
    let vm = Vm::spawn(&[
        "run",
        "--guest",
        "dirtier",
        "--memory",
        "128M",
        "--cmdline",
        "hb_ms=20 share=50",
    ]);
    vm.wait_line(|l| l == "HB 3", LIMIT);
    vm
}

/// A migration request with `tls_dir` (None: plaintext).
fn request(src: &Vm, addr: &str, tls: Option<&str>) {
    let extra = tls.map_or(String::new(), |d| format!(r#","tls_dir":"{d}""#));
    migrate_request(src, addr, &extra);
}

/// Asserts the attempt failed with `what` in its one error line and the guest runs on.
fn refused(src: &Vm, what: &str) {
    let stats = wait_migration_end(src);
    assert_eq!(stats["status"], "failed", "{stats}");
    let err = stats["error-desc"].as_str().unwrap_or_default();
    assert!(err.contains(what), "wanted {what:?} in: {err}");
    let hb = heartbeats(&src.lines()).len();
    src.wait_line(|l| l == format!("HB {}", hb + 3), LIMIT);
    assert_eq!(src.ctl(r#"{"cmd":"status"}"#)["state"], "running");
}

/// Finishes a migration that must succeed: the guest runs on the destination with every
/// page and heartbeat in order.
fn completes(mut src: Vm, mut dst: Vm) {
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    runs_on_at_destination(&src, &mut dst, LIMIT);
}

#[test]
fn mutual_tls_migration_keeps_the_guest_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = certs(tmp.path(), &[]);
    let addr = free_addr();
    let dst = destination(&addr, Some(&side(&ca, "destination")));
    let src = dirtier();
    request(&src, &addr, Some(&side(&ca, "source")));
    completes(src, dst);
}

#[test]
fn refused_peers_leave_the_tls_destination_waiting() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ours = certs(&tmp.path().join("ours"), &[]);
    let other = certs(&tmp.path().join("other"), &[]);
    let ca = ours.to_str().expect("utf-8 path");
    let expired = certs(&tmp.path().join("expired"), &["--expired", "--ca", ca]);
    let addr = free_addr();
    let mut dst = destination(&addr, Some(&side(&ours, "destination")));
    let src = dirtier();
    request(&src, &addr, None);
    refused(&src, "the peer speaks TLS");
    request(&src, &addr, Some(&side(&other, "source")));
    refused(&src, "invalid peer certificate");
    request(&src, &addr, Some(&side(&expired, "source")));
    refused(&src, "CertificateExpired");
    assert!(
        dst.child.try_wait().expect("wait").is_none(),
        "{}",
        dst.stderr()
    );
    request(&src, &addr, Some(&side(&ours, "source")));
    completes(src, dst);
}

#[test]
fn tls_to_a_plaintext_destination_is_refused_and_it_keeps_waiting() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = certs(tmp.path(), &[]);
    let addr = free_addr();
    let mut dst = destination(&addr, None);
    let src = dirtier();
    request(&src, &addr, Some(&side(&ca, "source")));
    refused(&src, "does not speak TLS");
    assert!(
        dst.child.try_wait().expect("wait").is_none(),
        "{}",
        dst.stderr()
    );
    request(&src, &addr, None);
    completes(src, dst);
}
