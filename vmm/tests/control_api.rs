//! The control socket under clients that misbehave: none may delay another.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// A client that sends requests and never reads the replies is disconnected once its unread
/// replies pass the bound, and meanwhile every other client (shutdown included) is answered.
#[test]
fn a_client_that_never_reads_cannot_freeze_the_others() {
    let mut vm = Vm::spawn(&["run", "--guest", "dirtier", "--memory", "64M"]);
    vm.wait_line(|l| l.starts_with("HB "), LIMIT);
    let mut greedy = UnixStream::connect(&vm.api).expect("connect");
    greedy.set_nonblocking(true).expect("nonblocking");
    let request = b"{\"cmd\":\"status\"}\n".repeat(1000);
    let start = Instant::now();
    let mut sent = 0usize;
    // Until the VM stops taking requests from it (its replies fill both socket buffers, and
    // then the VM's bound): the VM must hang up rather than block on it.
    let disconnected = loop {
        assert!(start.elapsed() < LIMIT, "greedy client never disconnected");
        match greedy.write(&request) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Another client is answered while this one's replies pile up.
                assert_eq!(vm.ctl(r#"{"cmd":"status"}"#)["ok"], true);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            disconnected.kind(),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
        ),
        "{disconnected:?} after {sent} bytes"
    );
    // What it did receive are complete, well-formed replies.
    greedy.set_nonblocking(false).expect("blocking");
    greedy
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::new();
    let _ = greedy.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    let first = text.lines().next().unwrap_or_default();
    assert!(first.contains(r#""ok":true"#), "{first}");
    assert_eq!(vm.ctl(r#"{"cmd":"shutdown"}"#)["ok"], true);
    assert_eq!(vm.wait_exit(LIMIT).code(), Some(0));
}

/// `minivmm migrate --cancel` ends a migration in pre-copy: the source's guest runs on with
/// every heartbeat, the destination discards what it got.
#[test]
fn a_cancelled_migration_leaves_the_guest_running_on_the_source() {
    let src = Vm::spawn(&[
        "run",
        "--guest",
        "dirtier",
        "--memory",
        "128M",
        "--cmdline",
        "hb_ms=20 share=50",
    ]);
    src.wait_line(|l| l == "HB 3", LIMIT);
    let addr = free_addr();
    let mut dst = Vm::spawn(&["receive", "--listen", &addr]);
    wait_listening(&addr);
    // 4 MiB/s: the first pass alone takes many seconds, so the cancel lands in pre-copy.
    migrate_request(&src, &addr, r#","max_bandwidth":4194304"#);
    let start = Instant::now();
    while src.ctl(r#"{"cmd":"migration-status"}"#)["stats"]["status"] != "active" {
        assert!(start.elapsed() < LIMIT, "pre-copy never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run_to_end(
        &[
            "migrate",
            "--api-sock",
            src.api.to_str().unwrap(),
            "--cancel",
        ],
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "cancelled", "{stats}");
    assert!(
        stats["error-desc"]
            .as_str()
            .unwrap_or_default()
            .contains("cancelled by the operator"),
        "{stats}"
    );
    assert_ne!(dst.wait_exit(LIMIT).code(), Some(0));
    let hb = heartbeats(&src.lines()).len();
    src.wait_line(|l| l == format!("HB {}", hb + 5), LIMIT);
    assert_eq!(src.ctl(r#"{"cmd":"status"}"#)["state"], "running");
    // Nothing left to cancel.
    assert_eq!(src.ctl(r#"{"cmd":"migrate-cancel"}"#)["ok"], false);
    let lines = src.lines();
    no_bad(&lines);
    assert_contiguous(&heartbeats(&lines));
}
