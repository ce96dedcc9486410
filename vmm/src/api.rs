//! Control socket: a UNIX socket carrying one JSON request per line and one JSON reply per
//! line. `minivmm ctl` is its client. A bad request gets an error reply, never a crash.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::{Value, json};
use vmm_sys_util::epoll::EventSet;

use crate::cli::MigrationTuning;
use crate::exit::ExitSignal;
use crate::machine::{Machine, MachineError, SharedMachine};
use crate::migrate;

/// A request line longer than this is refused (and the connection closed).
const MAX_REQUEST: usize = 64 * 1024;
/// Replies a client has not read yet, at most; a client over it is disconnected, so one that
/// sends requests but never reads cannot hold the event loop (replies are never written
/// blocking).
const MAX_PENDING_REPLIES: usize = 256 * 1024;
/// How long a request waits for the VM's lock (held by a migration's switchover) before it
/// is answered "busy"; `status` and `migration-status` do not wait at all.
const MACHINE_WAIT: Duration = Duration::from_millis(100);

/// One client: its unparsed request bytes and its unsent replies.
struct Conn {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
}

/// What requests are answered from: the VM, and what is known of it without its lock.
struct Context {
    machine: SharedMachine,
    info: migrate::SharedInfo,
    exit: ExitSignal,
    vcpus: usize,
    memory: u64,
    started: Instant,
}

pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<RawFd, Conn>,
    ctx: Context,
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
        let ctx = {
            let m = machine.lock().unwrap_or_else(|e| e.into_inner());
            Context {
                info: m.migration.clone(),
                vcpus: m.vcpus.count(),
                memory: m.ram.size,
                started: m.started,
                machine: machine.clone(),
                exit,
            }
        };
        Ok(ApiServer {
            listener,
            path: path.to_owned(),
            conns: HashMap::new(),
            ctx,
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
                let conn = Conn {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                };
                self.conns.insert(conn.stream.as_raw_fd(), conn);
            }
        }
    }

    /// Reads what is there, queues a reply to every complete line and writes what the
    /// client takes. Returns false to drop the connection.
    fn serve(&mut self, fd: RawFd, ops: &mut EventOps) -> bool {
        let Some(c) = self.conns.get_mut(&fd) else {
            return false;
        };
        let open = read_available(&mut c.stream, &mut c.input);
        while let Some(pos) = c.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = c.input.drain(..=pos).collect();
            queue(&mut c.output, &handle_line(&line, &self.ctx));
        }
        if c.input.len() > MAX_REQUEST {
            queue(&mut c.output, &error("request too long"));
            let _ = flush(&mut c.stream, &mut c.output);
            return false;
        }
        if flush(&mut c.stream, &mut c.output).is_err() || c.output.len() > MAX_PENDING_REPLIES {
            return false;
        }
        // Wake for writability only while replies wait.
        let mut want = EventSet::IN | EventSet::READ_HANG_UP;
        if !c.output.is_empty() {
            want |= EventSet::OUT;
        }
        let _ = ops.modify(Events::new(&c.stream, want));
        open || !c.output.is_empty()
    }
}

/// Reads everything available without blocking; false when the peer has closed.
fn read_available(stream: &mut UnixStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

fn queue(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(v.to_string().as_bytes());
    out.push(b'\n');
}

/// Writes what the socket takes now, never blocking.
fn flush(stream: &mut UnixStream, out: &mut Vec<u8>) -> std::io::Result<()> {
    while !out.is_empty() {
        match stream.write(out) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                out.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
        } else if !self.serve(events.fd(), ops) {
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

fn error(msg: impl std::fmt::Display) -> Value {
    json!({ "ok": false, "error": msg.to_string() })
}

fn handle_line(line: &[u8], ctx: &Context) -> Value {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error(format!("bad request: {e}")),
    };
    match req.get("cmd").and_then(Value::as_str) {
        Some(cmd) => handle(cmd, &req, ctx),
        None => error("bad request: no \"cmd\" string"),
    }
}

/// The VM's lock if it comes within `wait` (a switchover holds it for its whole length).
fn lock_within(machine: &SharedMachine, wait: Duration) -> Option<MutexGuard<'_, Machine>> {
    let deadline = Instant::now() + wait;
    loop {
        match machine.try_lock() {
            Ok(m) => return Some(m),
            Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() >= deadline => return None,
            Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn info(ctx: &Context) -> MutexGuard<'_, migrate::MigrationInfo> {
    ctx.info.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the request says `force: true` (`minivmm ctl ... force=true` sends the string).
fn forced(req: &Value) -> bool {
    matches!(req.get("force"), Some(Value::Bool(true)))
        || req.get("force").and_then(Value::as_str) == Some("true")
}

fn handle(cmd: &str, req: &Value, ctx: &Context) -> Value {
    match cmd {
        "status" => status(ctx),
        "migration-status" => {
            let i = info(ctx);
            json!({
                "ok": true,
                "running": i.running,
                "outcome_unknown": i.outcome_unknown,
                "progress": i.progress,
                "stats": serde_json::to_value(&i.stats).unwrap_or(Value::Null),
            })
        }
        "shutdown" => {
            ctx.exit.request(0);
            json!({ "ok": true, "state": "exiting" })
        }
        "migrate-cancel" => {
            let i = info(ctx);
            if !i.running {
                return error("no migration is running");
            }
            i.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            json!({ "ok": true, "status": "cancelling" })
        }
        "pause" | "resume" | "migrate" => match lock_within(&ctx.machine, MACHINE_WAIT) {
            Some(mut m) => with_machine(cmd, req, ctx, &mut m),
            None => error(format!(
                "busy: a migration's switchover holds the VM; {cmd} again once it has ended"
            )),
        },
        other => error(format!("unknown command '{other}'")),
    }
}

/// `status`, at once in any phase: while a switchover holds the VM, its state is
/// "switchover" and the rest comes from what is known without the VM's lock.
fn status(ctx: &Context) -> Value {
    let state = if ctx.exit.code().is_some() {
        "exiting"
    } else {
        match lock_within(&ctx.machine, Duration::ZERO) {
            Some(m) if m.vcpus.is_paused() => "paused",
            Some(_) => "running",
            None => "switchover",
        }
    };
    json!({
        "ok": true,
        "state": state,
        "vcpus": ctx.vcpus,
        "memory": ctx.memory,
        "uptime_ms": ctx.started.elapsed().as_millis() as u64,
    })
}

fn with_machine(cmd: &str, req: &Value, ctx: &Context, m: &mut Machine) -> Value {
    match cmd {
        "pause" => match m.vcpus.pause() {
            Ok(()) => json!({ "ok": true, "state": "paused" }),
            Err(e) => error(e),
        },
        "resume" => {
            let unknown = info(ctx).outcome_unknown;
            if unknown && !forced(req) {
                return error(UNKNOWN_OUTCOME_RESUME);
            }
            match m.vcpus.resume() {
                Ok(()) => {
                    if unknown {
                        log::warn!("resumed with force: the operator says the destination is dead");
                        info(ctx).outcome_unknown = false;
                    }
                    json!({ "ok": true, "state": "running" })
                }
                Err(e) => error(e),
            }
        }
        _ => start_migration(m, &ctx.machine, req),
    }
}

const UNKNOWN_OUTCOME_RESUME: &str = "the last migration was told go but never confirmed: the \
    destination may be running this guest; resume with force=true only if it is dead";
const UNKNOWN_OUTCOME_MIGRATE: &str = "the last migration was told go but never confirmed: the \
    destination may be running this guest; migrate with force=true only if it is dead";

/// `migrate`: {"cmd":"migrate","to":"HOST:PORT","downtime_ms":300,"max_bandwidth":N,"timeout":S,
/// "force_dirty_dma":false}
fn start_migration(m: &Machine, machine: &SharedMachine, req: &Value) -> Value {
    let Some(to) = req.get("to").and_then(Value::as_str) else {
        return error("migrate needs \"to\": \"HOST:PORT\"");
    };
    {
        let mut i = m.migration.lock().unwrap_or_else(|e| e.into_inner());
        if i.running {
            return error("a migration is already running");
        }
        if i.outcome_unknown && !forced(req) {
            return error(UNKNOWN_OUTCOME_MIGRATE);
        }
        i.outcome_unknown = false;
    }
    let num = |k: &str, d: u64| req.get(k).and_then(Value::as_u64).unwrap_or(d);
    let tuning = MigrationTuning {
        downtime_ms: num("downtime_ms", 300),
        max_bandwidth: req.get("max_bandwidth").and_then(Value::as_u64),
        timeout: num("timeout", 600),
        // `minivmm ctl ... force_dirty_dma` sends the string "true".
        force_dirty_dma: matches!(req.get("force_dirty_dma"), Some(Value::Bool(true)))
            || req.get("force_dirty_dma").and_then(Value::as_str) == Some("true"),
        tls_dir: req
            .get("tls_dir")
            .or_else(|| req.get("tls-dir"))
            .and_then(Value::as_str)
            .map(PathBuf::from),
        peer_timeout: num("peer_timeout", 30),
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
        format!("peer_timeout={}", t.peer_timeout),
    ];
    if let Some(b) = t.max_bandwidth {
        args.push(format!("max_bandwidth={b}"));
    }
    if t.force_dirty_dma {
        args.push("force_dirty_dma=true".into());
    }
    if let Some(d) = &t.tls_dir {
        args.push(format!("tls_dir={}", d.display()));
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
