//! Control socket: a UNIX socket carrying one JSON request per line and one JSON reply per
//! line. `minivmm ctl` is its client. A bad request gets an error reply, never a crash.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::{Value, json};
use vmm_sys_util::epoll::EventSet;

use crate::cli::MigrationTuning;
use crate::exit::ExitSignal;
use crate::machine::{Machine, MachineError, SharedMachine};
use crate::migrate;

/// A request line longer than this is refused (and the connection closed).
const MAX_REQUEST: usize = 64 * 1024;

pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    machine: SharedMachine,
    exit: ExitSignal,
}

impl ApiServer {
    pub fn bind(path: &Path, machine: SharedMachine, exit: ExitSignal) -> std::io::Result<Self> {
        // A stale socket file from a dead minivmm would make bind fail.
        if path.exists() && UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        listener.set_nonblocking(true)?;
        Ok(ApiServer {
            listener,
            path: path.to_owned(),
            conns: HashMap::new(),
            machine,
            exit,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if ops
                .add(Events::new(&stream, EventSet::IN | EventSet::READ_HANG_UP))
                .is_ok()
            {
                self.conns.insert(stream.as_raw_fd(), (stream, Vec::new()));
            }
        }
    }

    /// Reads what is there; answers every complete line. Returns false to drop the connection.
    fn serve(&mut self, fd: RawFd) -> bool {
        let Some((stream, buf)) = self.conns.get_mut(&fd) else {
            return false;
        };
        let mut chunk = [0u8; 4096];
        let open = loop {
            match stream.read(&mut chunk) {
                Ok(0) => break false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
                Err(_) => break false,
            }
        };
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let reply = handle_line(&line, &self.machine, &self.exit);
            if write_line(stream, &reply).is_err() {
                return false;
            }
        }
        if buf.len() > MAX_REQUEST {
            let _ = write_line(stream, &error("request too long"));
            return false;
        }
        open
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if !self.serve(events.fd()) {
            let _ = ops.remove(events);
            self.conns.remove(&events.fd());
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("cannot watch the control socket: {e:?}");
        }
    }
}

fn write_line(stream: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut s = v.to_string();
    s.push('\n');
    stream.set_nonblocking(false)?;
    stream.write_all(s.as_bytes())?;
    stream.set_nonblocking(true)
}

fn error(msg: impl std::fmt::Display) -> Value {
    json!({ "ok": false, "error": msg.to_string() })
}

fn handle_line(line: &[u8], machine: &SharedMachine, exit: &ExitSignal) -> Value {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error(format!("bad request: {e}")),
    };
    match req.get("cmd").and_then(Value::as_str) {
        Some(cmd) => handle(cmd, &req, machine, exit),
        None => error("bad request: no \"cmd\" string"),
    }
}

fn handle(cmd: &str, req: &Value, machine: &SharedMachine, exit: &ExitSignal) -> Value {
    let mut m = machine.lock().unwrap_or_else(|e| e.into_inner());
    match cmd {
        "status" => json!({
            "ok": true,
            "state": if exit.code().is_some() { "exiting" } else if m.vcpus.is_paused() { "paused" } else { "running" },
            "vcpus": m.vcpus.count(),
            "memory": m.ram.size,
            "uptime_ms": m.started.elapsed().as_millis() as u64,
        }),
        "pause" => match m.vcpus.pause() {
            Ok(()) => json!({ "ok": true, "state": "paused" }),
            Err(e) => error(e),
        },
        "resume" => match m.vcpus.resume() {
            Ok(()) => json!({ "ok": true, "state": "running" }),
            Err(e) => error(e),
        },
        "migrate" => start_migration(&m, machine, req),
        "migration-status" => {
            let i = m.migration.lock().unwrap_or_else(|e| e.into_inner());
            json!({
                "ok": true,
                "running": i.running,
                "progress": i.progress,
                "stats": serde_json::to_value(&i.stats).unwrap_or(Value::Null),
            })
        }
        "shutdown" => {
            exit.request(0);
            json!({ "ok": true, "state": "exiting" })
        }
        other => error(format!("unknown command '{other}'")),
    }
}

/// `migrate`: {"cmd":"migrate","to":"HOST:PORT","downtime_ms":300,"max_bandwidth":N,"timeout":S,
/// "force_dirty_dma":false}
fn start_migration(m: &Machine, machine: &SharedMachine, req: &Value) -> Value {
    let Some(to) = req.get("to").and_then(Value::as_str) else {
        return error("migrate needs \"to\": \"HOST:PORT\"");
    };
    if m.migration
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .running
    {
        return error("a migration is already running");
    }
    let num = |k: &str, d: u64| req.get(k).and_then(Value::as_u64).unwrap_or(d);
    let tuning = MigrationTuning {
        downtime_ms: num("downtime_ms", 300),
        max_bandwidth: req.get("max_bandwidth").and_then(Value::as_u64),
        timeout: num("timeout", 600),
        // `minivmm ctl ... force_dirty_dma` sends the string "true".
        force_dirty_dma: matches!(req.get("force_dirty_dma"), Some(Value::Bool(true)))
            || req.get("force_dirty_dma").and_then(Value::as_str) == Some("true"),
    };
    migrate::spawn(
        machine.clone(),
        migrate::options(to, &tuning),
        m.migration.clone(),
        Duration::ZERO,
    );
    json!({ "ok": true, "status": "setup" })
}

/// `minivmm migrate`: starts a migration through the control socket and follows it, with a
/// progress line on a terminal, until it ends; prints the final statistics as JSON.
pub fn migrate_client(path: &Path, to: &str, t: &MigrationTuning) -> Result<i32, MachineError> {
    let mut args = vec![
        format!("to={to}"),
        format!("downtime_ms={}", t.downtime_ms),
        format!("timeout={}", t.timeout),
    ];
    if let Some(b) = t.max_bandwidth {
        args.push(format!("max_bandwidth={b}"));
    }
    if t.force_dirty_dma {
        args.push("force_dirty_dma=true".into());
    }
    let reply = request(path, "migrate", &args)?;
    if reply.get("ok").and_then(Value::as_bool) != Some(true) {
        println!("{reply}");
        return Ok(1);
    }
    let tty = std::io::stderr().is_terminal();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        // The source process exits once the destination runs the guest.
        let Ok(st) = request(path, "migration-status", &[]) else {
            eprintln!();
            println!("{{\"status\":\"completed\",\"note\":\"source exited after handing over\"}}");
            return Ok(0);
        };
        if st.get("running").and_then(Value::as_bool) == Some(true) {
            if tty {
                eprint!("\r{}\x1b[K", st["progress"].as_str().unwrap_or(""));
            }
            continue;
        }
        if tty {
            eprintln!();
        }
        println!("{}", st["stats"]);
        let ok = st["stats"]["status"] == "completed";
        return Ok(if ok { 0 } else { 1 });
    }
}

/// `minivmm ctl`: sends one request, prints the reply; exit code 0 when it says ok.
pub fn client(path: &Path, cmd: &str, args: &[String]) -> Result<i32, MachineError> {
    let reply = request(path, cmd, args)?;
    println!("{reply}");
    Ok(if reply.get("ok").and_then(Value::as_bool) == Some(true) {
        0
    } else {
        1
    })
}

/// One request (`cmd` plus key=value fields) and its parsed reply.
fn request(path: &Path, cmd: &str, args: &[String]) -> Result<Value, MachineError> {
    let mut req = serde_json::Map::new();
    req.insert("cmd".into(), Value::from(cmd));
    for a in args {
        let (k, v) = a.split_once('=').unwrap_or((a.as_str(), "true"));
        let v = v
            .parse::<u64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(v));
        req.insert(k.into(), v);
    }
    let io = |e: std::io::Error| {
        MachineError::Api(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    };
    let mut stream = UnixStream::connect(path).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = Value::Object(req).to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    serde_json::from_str(&reply).map_err(|e| io(std::io::Error::other(format!("bad reply: {e}"))))
}
