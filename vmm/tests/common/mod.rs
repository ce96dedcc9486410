//! Helpers for integration tests: real minivmm processes, serial logs read from files,
//! control requests over the real socket.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub fn minivmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_minivmm"));
    c.env("RUST_LOG", "warn").stdin(Stdio::null());
    c
}

/// minivmm inside a network namespace (`ip netns exec` execs it, so the child is minivmm).
pub fn minivmm_in(netns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_minivmm")])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

/// Runs minivmm to completion with a time limit.
pub fn run_to_end(args: &[&str], limit: Duration) -> Output {
    let mut child = minivmm()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn minivmm");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("minivmm {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// A minivmm process in the background with its serial port in a file and a control socket.
pub struct Vm {
    pub child: Child,
    pub serial: PathBuf,
    pub api: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Vm {
    pub fn spawn(args: &[&str]) -> Vm {
        Self::spawn_env(args, &[])
    }

    /// Spawns with extra environment variables (fault injection); stdout and stderr go to
    /// files in the VM's directory.
    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Vm {
        Self::spawn_cmd(minivmm(), args, env)
    }

    pub fn spawn_in(netns: &str, args: &[&str]) -> Vm {
        Self::spawn_cmd(minivmm_in(netns), args, &[])
    }

    fn spawn_cmd(mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> Vm {
        let dir = tempfile::tempdir().expect("tempdir");
        let serial = dir.path().join("serial.log");
        let api = dir.path().join("api.sock");
        let out = std::fs::File::create(dir.path().join("stdout")).expect("stdout file");
        let err = std::fs::File::create(dir.path().join("stderr")).expect("stderr file");
        let child = cmd
            .args(args)
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .arg("--api-sock")
            .arg(&api)
            .envs(env.iter().copied())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn minivmm");
        Vm {
            child,
            serial,
            api,
            dir,
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Threads and open fds of the process, to check that a failed migration leaks neither.
    pub fn threads_and_fds(&self) -> (usize, usize) {
        let count = |d: &str| {
            std::fs::read_dir(format!("/proc/{}/{d}", self.child.id()))
                .map(|r| r.count())
                .unwrap_or(0)
        };
        (count("task"), count("fd"))
    }

    pub fn lines(&self) -> Vec<String> {
        serial_lines(&self.serial)
    }

    /// Waits until some serial line satisfies `pred`; panics with the log on timeout.
    pub fn wait_line(&self, pred: impl Fn(&str) -> bool, limit: Duration) -> String {
        wait_line(&self.serial, pred, limit)
    }

    pub fn ctl(&self, req: &str) -> serde_json::Value {
        ctl(&self.api, req)
    }

    /// Waits until the process's stderr contains `text`; panics with it on timeout.
    pub fn wait_stderr(&self, text: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let err = self.stderr();
            if err.contains(text) {
                return err;
            }
            assert!(
                start.elapsed() < limit,
                "no {text:?} on stderr within {limit:?}:\n{err}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "minivmm did not exit within {limit:?}; serial:\n{}",
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The complete lines of a serial log: a line the guest is still printing is left out, so a
/// caller never parses half a number.
/// `minivmm run` arguments for the dmatest guest (128 MiB) driving the sampledev at `dev`.
pub fn dmatest_args<'a>(dev: &'a str, cmdline: &'a str) -> [&'a str; 9] {
    [
        "run",
        "--guest",
        "dmatest",
        "--vfio-user",
        dev,
        "--memory",
        "128M",
        "--cmdline",
        cmdline,
    ]
}

pub fn serial_lines(path: &Path) -> Vec<String> {
    complete_lines(&std::fs::read_to_string(path).unwrap_or_default())
}

/// The serial output of a guest that migrated from `src` to `dst`, as one stream: a line
/// the guest was printing at the switchover starts in the source's log and ends in the
/// destination's.
pub fn joined_lines(src: &Vm, dst: &Vm) -> Vec<String> {
    let read = |vm: &Vm| std::fs::read_to_string(&vm.serial).unwrap_or_default();
    complete_lines(&(read(src) + &read(dst)))
}

fn complete_lines(text: &str) -> Vec<String> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| l.trim_end_matches(['\r', '\n']).to_owned())
        .collect()
}

pub fn wait_line(path: &Path, pred: impl Fn(&str) -> bool, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Some(l) = serial_lines(path).into_iter().find(|l| pred(l)) {
            return l;
        }
        if start.elapsed() > limit {
            panic!(
                "no matching serial line within {limit:?}; log:\n{}",
                serial_lines(path).join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one request line to a control socket (retrying while it is not there yet).
pub fn ctl(api: &Path, req: &str) -> serde_json::Value {
    let start = Instant::now();
    let mut stream = loop {
        match UnixStream::connect(api) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > Duration::from_secs(10) => panic!("connect {api:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
}

/// Heartbeat sequence numbers in the order they appear.
pub fn heartbeats(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("HB "))
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Asserts heartbeats count up by one from 0 with no gap or repeat.
pub fn assert_contiguous(hb: &[u64]) {
    for (i, &s) in hb.iter().enumerate() {
        assert_eq!(
            s, i as u64,
            "heartbeat sequence broken at position {i}: {hb:?}"
        );
    }
}

/// The sampledev binary next to minivmm's (built on demand when only minivmm was built).
pub fn sampledev_bin() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_minivmm"))
        .parent()
        .expect("target dir")
        .to_owned();
    let bin = dir.join("sampledev");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "sampledev"])
            .status()
            .expect("cargo build");
        assert!(st.success(), "building sampledev failed");
    }
    bin
}

/// A sampledev process serving one vfio-user socket; killed on drop.
pub struct SampleDev {
    pub child: Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl SampleDev {
    pub fn spawn(args: &[&str]) -> SampleDev {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sd.sock");
        let child = Command::new(sampledev_bin())
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn sampledev");
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "sampledev did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        SampleDev {
            child,
            socket,
            _dir: dir,
        }
    }

    pub fn path(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }
}

impl Drop for SampleDev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

pub fn wait_listening(addr: &str) {
    let start = Instant::now();
    // A probe connection would be taken as the migration; watch the listen table instead.
    let port = addr.rsplit(':').next().unwrap();
    let hex = format!(":{:04X} ", port.parse::<u16>().unwrap());
    while start.elapsed() < Duration::from_secs(10) {
        let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        if tcp
            .lines()
            .any(|l| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A"))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nobody listens on {addr}");
}

pub fn migrate_request(src: &Vm, addr: &str, extra: &str) {
    let r = src.ctl(&format!(r#"{{"cmd":"migrate","to":"{addr}"{extra}}}"#));
    assert_eq!(r["ok"], true, "{r}");
}

/// Waits until the source's migration attempt has ended; returns its statistics.
pub fn wait_migration_end(src: &Vm) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let st = src.ctl(r#"{"cmd":"migration-status"}"#);
        if st["running"] == false {
            return st["stats"].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "migration did not end: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After a completed migration of the dirtier: the guest runs two more full verify passes
/// on the destination, which then shuts down cleanly, and the joined serial logs show no
/// problem and every heartbeat in order.
pub fn runs_on_at_destination(src: &Vm, dst: &mut Vm, limit: Duration) {
    let passes = src
        .lines()
        .iter()
        .filter(|l| l.starts_with("PASS "))
        .count();
    let want = format!("PASS {} ok", passes + 2);
    dst.wait_line(|l| l.starts_with(&want), limit);
    assert_eq!(dst.ctl(r#"{"cmd":"shutdown"}"#)["ok"], true);
    assert_eq!(dst.wait_exit(limit).code(), Some(0), "{}", dst.stderr());
    let all = joined_lines(src, dst);
    no_bad(&all);
    assert_contiguous(&heartbeats(&all));
}

pub fn no_bad(lines: &[String]) {
    let bad: Vec<&String> = lines
        .iter()
        .filter(|l| {
            ["BAD", "PANIC", "error", "no-irq"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    assert!(bad.is_empty(), "guest found a problem: {bad:?}");
}

/// What a process printed on stderr less its log lines (`[time LEVEL target] ...`, such as
/// the plaintext-channel warning): the error lines it ends with.
pub fn error_text(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with('['))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs minivmm expecting failure; returns its one-line error (asserting it is one line).
pub fn error_line(args: &[&str]) -> String {
    let out = run_to_end(args, Duration::from_secs(60));
    assert_ne!(out.status.code(), Some(0), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(
        err.lines().count(),
        1,
        "one readable line expected, got: {err}"
    );
    err
}
