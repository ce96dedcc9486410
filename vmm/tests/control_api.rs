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
