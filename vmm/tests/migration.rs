//! Live migration acceptance: real minivmm processes, real TCP, the guest verifying itself.

mod common;

use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(90);

/// A destination waiting on `addr`.
fn destination(addr: &str, env: &[(&str, &str)]) -> Vm {
    let d = Vm::spawn_env(&["receive", "--listen", addr], env);
    wait_listening(addr);
    d
}

fn dirtier(vcpus: &str, extra: &str) -> Vec<String> {
    let cmdline = format!("hb_ms=20 share=50 {extra}");
    [
        "run",
        "--guest",
        "dirtier",
        "--memory",
        "128M",
        "--vcpus",
        vcpus,
        "--cmdline",
        &cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Migrates a running dirtier and checks, from inside the guest, that nothing was lost.
fn migrate_and_verify(vcpus: &str, extra: &str) {
    let addr = free_addr();
    let mut dst = destination(&addr, &[]);
    let mut args = dirtier(vcpus, extra);
    args.extend([
        "--migrate-to".into(),
        addr.clone(),
        "--migrate-after".into(),
        "1".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut src = Vm::spawn(&args);
    let status = src.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(0), "source: {}", src.stderr());
    let stats: serde_json::Value =
        serde_json::from_str(src.stdout().trim()).expect("source stats JSON");
    assert_eq!(stats["status"], "completed", "{stats}");
    assert!(stats["downtime-us"].as_u64().unwrap() > 0, "{stats}");
    let src_lines = src.lines();
    let last_pass = src_lines.iter().filter(|l| l.starts_with("PASS ")).count();
    // Two full passes on the destination re-verify every page the source wrote.
    let want = format!("PASS {} ok", last_pass + 2);
    dst.wait_line(|l| l.starts_with(&want), LIMIT);
    assert_eq!(dst.ctl(r#"{"cmd":"shutdown"}"#)["ok"], true);
    assert_eq!(dst.wait_exit(LIMIT).code(), Some(0), "{}", dst.stderr());
    let dst_lines = dst.lines();
    no_bad(&src_lines);
    no_bad(&dst_lines);
    let all = joined_lines(&src, &dst);
    assert_contiguous(&heartbeats(&all));
    let dstats: serde_json::Value =
        serde_json::from_str(dst.stdout().lines().next().unwrap()).unwrap();
    assert_eq!(dstats["status"], "completed", "{dstats}");
}

#[test]
fn dirtier_survives_loopback_migration() {
    migrate_and_verify("1", "");
}

#[test]
fn two_busy_vcpus_survive_migration() {
    migrate_and_verify("2", "cpus=all");
}

/// The source after a failed migration: still running, verification clean, and no thread or
/// fd left behind.
fn assert_source_unharmed(src: &mut Vm, before: (usize, usize)) {
    let hb = heartbeats(&src.lines()).len();
    let target = format!("HB {}", hb + 10);
    src.wait_line(|l| l == target, LIMIT);
    assert_eq!(src.ctl(r#"{"cmd":"status"}"#)["state"], "running");
    let start = Instant::now();
    while src.threads_and_fds() != before && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(src.threads_and_fds(), before, "threads/fds leaked");
    assert_eq!(src.ctl(r#"{"cmd":"shutdown"}"#)["ok"], true);
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0));
    let lines = src.lines();
    no_bad(&lines);
    assert_contiguous(&heartbeats(&lines));
}

fn running_source() -> (Vm, (usize, usize)) {
    let args = dirtier("1", "");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let src = Vm::spawn(&args);
    src.wait_line(|l| l == "HB 3", LIMIT);
    let before = src.threads_and_fds();
    (src, before)
}

/// The one error line of a stderr (log lines aside).
fn one_line(s: &str) -> String {
    let t = error_text(s).trim().to_owned();
    assert!(!t.is_empty(), "no error line");
    assert_eq!(t.lines().count(), 1, "one readable line expected: {t}");
    t
}

/// The destination fails at `fault`: it exits non-zero with one line, the source runs on.
fn destination_fault(fault: &str, expect: &str) {
    let (mut src, before) = running_source();
    let addr = free_addr();
    let mut dst = destination(&addr, &[("MINIVMM_FAULT", fault)]);
    migrate_request(&src, &addr, "");
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "failed", "{stats}");
    let code = dst.wait_exit(LIMIT).code();
    assert_ne!(code, Some(0));
    let line = one_line(&dst.stderr());
    assert!(line.contains(expect), "destination said: {line}");
    assert_source_unharmed(&mut src, before);
}

#[test]
fn destination_dies_after_accept() {
    destination_fault("accept", "fault injected at accept");
}

#[test]
fn destination_dies_after_description() {
    destination_fault("description", "fault injected at description");
}

#[test]
fn destination_dies_during_memory() {
    destination_fault("memory", "fault injected at memory");
}

#[test]
fn destination_dies_after_complete() {
    destination_fault("complete", "fault injected at complete");
}

#[test]
fn corrupt_frame_on_the_return_path() {
    // The source abandons; the destination learns it from the Abandon or a closed socket,
    // whichever it meets first.
    destination_fault("corrupt-memory", "");
}

#[test]
fn corrupt_frame_before_ready() {
    destination_fault("corrupt-ready", "");
}

#[test]
fn destination_refuses_a_vm_it_cannot_build() {
    let (mut src, before) = running_source();
    let addr = free_addr();
    let mut dst = destination(&addr, &[("MINIVMM_KVM_DEVICE", "/nonexistent/kvm")]);
    migrate_request(&src, &addr, "");
    let stats = wait_migration_end(&src);
    assert!(
        stats["error-desc"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/kvm"),
        "{stats}"
    );
    // A refused description is the peer's problem: the destination logs it and waits on.
    dst.wait_stderr("refused the VM", LIMIT);
    assert!(dst.running(), "{}", dst.stderr());
    assert_source_unharmed(&mut src, before);
}

#[test]
fn corrupt_frame_from_the_source() {
    let args = dirtier("1", "");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut src = Vm::spawn_env(&args, &[("MINIVMM_FAULT", "corrupt-precopy")]);
    src.wait_line(|l| l == "HB 3", LIMIT);
    let before = src.threads_and_fds();
    let addr = free_addr();
    let mut dst = destination(&addr, &[]);
    migrate_request(&src, &addr, "");
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "failed", "{stats}");
    assert_ne!(dst.wait_exit(LIMIT).code(), Some(0));
    let line = one_line(&dst.stderr());
    assert!(line.contains("magic") || line.contains("frame"), "{line}");
    assert_source_unharmed(&mut src, before);
}

#[test]
fn destination_killed_during_precopy() {
    let (mut src, before) = running_source();
    let addr = free_addr();
    let mut dst = destination(&addr, &[]);
    // 10 MB/s makes pre-copy of 256 MiB last long enough to kill the destination in it.
    migrate_request(&src, &addr, r#","max_bandwidth":10000000"#);
    std::thread::sleep(Duration::from_millis(700));
    dst.child.kill().unwrap();
    let _ = dst.child.wait();
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "failed", "{stats}");
    assert_source_unharmed(&mut src, before);
}

#[test]
fn unreachable_destination() {
    let (mut src, before) = running_source();
    let addr = free_addr();
    migrate_request(&src, &addr, "");
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "failed", "{stats}");
    assert!(
        stats["error-desc"]
            .as_str()
            .unwrap()
            .contains("cannot reach"),
        "{stats}"
    );
    assert_source_unharmed(&mut src, before);
}

#[test]
fn no_convergence_cancels_and_keeps_running() {
    let (mut src, before) = running_source();
    let addr = free_addr();
    let mut dst = destination(&addr, &[]);
    migrate_request(&src, &addr, r#","downtime_ms":0,"timeout":2"#);
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "cancelled", "{stats}");
    assert!(
        stats["error-desc"].as_str().unwrap().contains("converge"),
        "{stats}"
    );
    assert_ne!(dst.wait_exit(LIMIT).code(), Some(0));
    one_line(&dst.stderr());
    assert_source_unharmed(&mut src, before);
}

#[test]
fn lost_confirmation_after_go_leaves_the_source_paused() {
    let (mut src, _) = running_source();
    let addr = free_addr();
    let mut dst = destination(&addr, &[("MINIVMM_FAULT", "go")]);
    migrate_request(&src, &addr, "");
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "failed", "{stats}");
    assert!(
        stats["error-desc"].as_str().unwrap().contains("after go"),
        "{stats}"
    );
    assert_ne!(dst.wait_exit(LIMIT).code(), Some(0));
    // Never two running copies: the source must not resume on its own.
    assert_eq!(src.ctl(r#"{"cmd":"status"}"#)["state"], "paused");
    let hb = heartbeats(&src.lines()).len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(heartbeats(&src.lines()).len(), hb);
    // Nor may an operator's resume or a new migration run it, unless forced.
    let r = src.ctl(r#"{"cmd":"resume"}"#);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("force=true"), "{r}");
    let other = free_addr();
    let r = src.ctl(&format!(r#"{{"cmd":"migrate","to":"{other}"}}"#));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("never confirmed"),
        "{r}"
    );
    assert_eq!(
        src.ctl(r#"{"cmd":"migration-status"}"#)["outcome_unknown"],
        true
    );
    assert_eq!(src.ctl(r#"{"cmd":"status"}"#)["state"], "paused");
    // The operator's decision that the destination is dead.
    let r = src.ctl(r#"{"cmd":"resume","force":true}"#);
    assert_eq!(r["ok"], true, "{r}");
    src.wait_line(|l| l == format!("HB {}", hb + 5), LIMIT);
    let _ = src.child.kill();
}

#[test]
fn an_operator_pause_outlives_a_failed_migration() {
    let (mut src, _) = running_source();
    assert_eq!(src.ctl(r#"{"cmd":"pause"}"#)["ok"], true);
    let addr = free_addr();
    let mut dst = destination(&addr, &[("MINIVMM_FAULT", "complete")]);
    migrate_request(&src, &addr, "");
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "failed", "{stats}");
    assert_ne!(dst.wait_exit(LIMIT).code(), Some(0));
    assert_eq!(src.ctl(r#"{"cmd":"status"}"#)["state"], "paused");
    let hb = heartbeats(&src.lines()).len();
    assert_eq!(src.ctl(r#"{"cmd":"resume"}"#)["ok"], true);
    src.wait_line(|l| l == format!("HB {}", hb + 5), LIMIT);
    assert_eq!(src.ctl(r#"{"cmd":"shutdown"}"#)["ok"], true);
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0));
    let lines = src.lines();
    no_bad(&lines);
    assert_contiguous(&heartbeats(&lines));
}

#[test]
fn failed_source_can_migrate_again() {
    let (mut src, _) = running_source();
    let bad = free_addr();
    let _dead = destination(&bad, &[("MINIVMM_FAULT", "memory")]);
    migrate_request(&src, &bad, "");
    assert_eq!(wait_migration_end(&src)["status"], "failed");
    let good = free_addr();
    let mut dst = destination(&good, &[]);
    migrate_request(&src, &good, "");
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    let hb = heartbeats(&src.lines()).len();
    dst.wait_line(|l| l == format!("HB {}", hb + 20), LIMIT);
    dst.ctl(r#"{"cmd":"shutdown"}"#);
    dst.wait_exit(LIMIT);
    let all = joined_lines(&src, &dst);
    no_bad(&all);
    assert_contiguous(&heartbeats(&all));
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct NetnsPair {
    a: String,
    b: String,
    addr_b: String,
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("run ip (iproute2)");
    assert!(st.success(), "ip {args:?} failed");
}

impl NetnsPair {
    fn new() -> NetnsPair {
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("mvm{id}a"), format!("mvm{id}b"));
        let (va, vb) = (format!("mv{id}a"), format!("mv{id}b"));
        let net = format!("10.{}.{}", 100 + id % 100, id % 250);
        for ns in [&a, &b] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &a]);
        ip(&["link", "set", &vb, "netns", &b]);
        ip(&["-n", &a, "addr", "add", &format!("{net}.1/24"), "dev", &va]);
        ip(&["-n", &b, "addr", "add", &format!("{net}.2/24"), "dev", &vb]);
        ip(&["-n", &a, "link", "set", &va, "up"]);
        ip(&["-n", &b, "link", "set", &vb, "up"]);
        NetnsPair {
            a,
            b,
            addr_b: format!("{net}.2"),
        }
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

#[test]
fn migration_between_network_namespaces() {
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        panic!("iproute2 is required (CI installs it)");
    }
    let net = NetnsPair::new();
    let addr = format!("{}:4444", net.addr_b);
    let mut dst = Vm::spawn_in(&net.b, &["receive", "--listen", &addr]);
    // The listener lives in the other namespace: wait until its socket exists.
    let start = Instant::now();
    while !listening_in(&net.b, 4444) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "destination not listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut src = Vm::spawn_in(
        &net.a,
        &[
            "run",
            "--guest",
            "dirtier",
            "--memory",
            "128M",
            "--cmdline",
            "hb_ms=20 share=50",
            "--migrate-to",
            &addr,
            "--migrate-after",
            "1",
        ],
    );
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    let hb = heartbeats(&src.lines()).len();
    dst.wait_line(|l| l == format!("HB {}", hb + 20), LIMIT);
    dst.ctl(r#"{"cmd":"shutdown"}"#);
    assert_eq!(dst.wait_exit(LIMIT).code(), Some(0));
    let all = joined_lines(&src, &dst);
    no_bad(&all);
    assert_contiguous(&heartbeats(&all));
}

fn listening_in(netns: &str, port: u16) -> bool {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "cat", "/proc/net/tcp"])
        .output();
    let hex = format!(":{port:04X} ");
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A"))
    })
    .unwrap_or(false)
}

/// A destination that stays connected but never says Ready: the source times out within
/// its --peer-timeout, before Go, and resumes the guest; while it waits, `status` answers at
/// once (the switchover holds the VM, so it says so instead of waiting for it).
#[test]
fn a_stalled_destination_before_go_times_out_and_status_stays_responsive() {
    let (mut src, before) = running_source();
    let addr = free_addr();
    let _dst = destination(&addr, &[("MINIVMM_FAULT", "stall-ready")]);
    migrate_request(&src, &addr, r#","peer_timeout":3"#);
    let start = Instant::now();
    let mut saw_switchover = false;
    loop {
        let st = src.ctl(r#"{"cmd":"status"}"#);
        assert_eq!(st["ok"], true, "{st}");
        saw_switchover |= st["state"] == "switchover";
        let m = src.ctl(r#"{"cmd":"migration-status"}"#);
        if m["running"] == false {
            break;
        }
        assert!(start.elapsed() < LIMIT, "migration never ended: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(saw_switchover, "status never reported the switchover");
    let stats = src.ctl(r#"{"cmd":"migration-status"}"#)["stats"].clone();
    assert_eq!(stats["status"], "failed", "{stats}");
    let err = stats["error-desc"].as_str().unwrap_or_default();
    assert!(err.contains("timed out after 3 s"), "{err}");
    assert!(!err.contains("os error 11"), "{err}");
    assert_source_unharmed(&mut src, before);
}

/// A destination told Go that stays connected and never confirms: the source times out
/// within its --peer-timeout and stays paused, since the guest may run over there.
#[test]
fn a_stalled_destination_after_go_leaves_the_source_paused() {
    let (src, _) = running_source();
    let addr = free_addr();
    let _dst = destination(&addr, &[("MINIVMM_FAULT", "stall-go")]);
    migrate_request(&src, &addr, r#","peer_timeout":3"#);
    let stats = wait_migration_end(&src);
    assert_eq!(stats["status"], "failed", "{stats}");
    let err = stats["error-desc"].as_str().unwrap_or_default();
    assert!(
        err.contains("after go") && err.contains("timed out after 3 s"),
        "{err}"
    );
    assert_eq!(src.ctl(r#"{"cmd":"status"}"#)["state"], "paused");
    let hb = heartbeats(&src.lines()).len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(heartbeats(&src.lines()).len(), hb);
    assert_eq!(src.ctl(r#"{"cmd":"resume"}"#)["ok"], false);
}

/// A source that goes silent mid-migration, connection open: the destination gives up
/// within its --peer-timeout with one line; the source, back, finds it gone and runs on.
#[test]
fn a_stalled_source_before_go_is_timed_out_by_the_destination() {
    let args = dirtier("1", "");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut src = Vm::spawn_env(&args, &[("MINIVMM_FAULT", "stall-precopy")]);
    src.wait_line(|l| l == "HB 3", LIMIT);
    let before = src.threads_and_fds();
    let addr = free_addr();
    let mut dst = Vm::spawn(&["receive", "--listen", &addr, "--peer-timeout", "2"]);
    wait_listening(&addr);
    migrate_request(&src, &addr, "");
    assert_ne!(dst.wait_exit(LIMIT).code(), Some(0));
    let line = one_line(&dst.stderr());
    assert!(line.contains("timed out after 2 s"), "{line}");
    assert!(!line.contains("os error"), "{line}");
    assert_eq!(wait_migration_end(&src)["status"], "failed");
    assert_source_unharmed(&mut src, before);
}

/// An operator's pause travels with the guest: it stays paused on the destination until
/// resumed there, and then runs on with every page and heartbeat.
#[test]
fn a_paused_guest_stays_paused_on_the_destination() {
    let (mut src, _) = running_source();
    assert_eq!(src.ctl(r#"{"cmd":"pause"}"#)["ok"], true);
    let addr = free_addr();
    let mut dst = destination(&addr, &[]);
    migrate_request(&src, &addr, "");
    assert_eq!(src.wait_exit(LIMIT).code(), Some(0), "{}", src.stderr());
    assert_eq!(dst.ctl(r#"{"cmd":"status"}"#)["state"], "paused");
    let hb = heartbeats(&joined_lines(&src, &dst)).len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(heartbeats(&joined_lines(&src, &dst)).len(), hb);
    assert_eq!(dst.ctl(r#"{"cmd":"resume"}"#)["ok"], true);
    runs_on_at_destination(&src, &mut dst, LIMIT);
}
