//! Destination side: listen until one peer completes the handshake with a description this
//! side accepts (stray, slow or hostile connections before that are logged and dropped, and
//! a second one during a migration is refused), build the VM from it, load memory and state
//! as they arrive, resume after `Go`, then be the VM.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use migration::MigrationError;
use migration::description::VmDescription;
use migration::protocol::{
    Channel, DestTimings, DevicePhase, Message, Nonce, ProtocolError, RunState, features,
};
use migration::recv::MemoryReceiver;
use migration::session::{abandon, dest_answer, dest_confirm, dest_hello, dest_ready};
use migration::stats::{MigrationStats, Status};
use migration::transport::{MigStream, TlsDir, TlsError};

use super::fault;
use super::listener::Listener;
use super::passthrough::{self, DeviceError};
use super::passthrough_dest::DestDevices;
use super::populate::Prefault;
use super::snapshot::{self, Snapshot, SnapshotError};
use crate::cli::ReceiveArgs;
use crate::devices_setup::Passthrough;
use crate::machine::{Machine, MachineError};
use devices::serial::SerialOutput;

#[derive(Debug, thiserror::Error)]
pub enum DestError {
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("source abandoned the migration: {0}")]
    Abandoned(String),
    #[error("vCPU state index {0} out of range or repeated")]
    BadVcpu(u32),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the handshake did not finish within {} s (--handshake-timeout)", .0.as_secs_f64())]
    HandshakeTimeout(Duration),
    #[error("no migration arrived within {} s (--accept-timeout)", .0.as_secs_f64())]
    AcceptTimeout(Duration),
    #[error("refused the VM: {0}")]
    RefusedVm(String),
    #[error("the listener thread stopped")]
    ListenerGone,
}

/// What `minivmm receive` was told about its peers and the VM it may take.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    pub listen: String,
    pub tls_dir: Option<PathBuf>,
    /// Bound of every blocking read and write once the handshake is done.
    pub peer_timeout: Duration,
    /// Bound of a peer's whole handshake (TLS, Hello, Description), however it trickles.
    pub handshake_timeout: Duration,
    /// Give up when no migration was accepted within this long.
    pub accept_timeout: Option<Duration>,
    pub limits: Limits,
}

impl ReceiveOptions {
    pub fn from_args(a: &ReceiveArgs) -> Self {
        ReceiveOptions {
            listen: a.listen.clone(),
            tls_dir: a.tls_dir.clone(),
            peer_timeout: Duration::from_secs(a.peer_timeout),
            handshake_timeout: Duration::from_secs(a.handshake_timeout),
            accept_timeout: a.accept_timeout.map(Duration::from_secs),
            limits: Limits {
                max_memory: a.max_memory.or_else(default_max_memory),
                memory: a.memory,
                vcpus: a.vcpus,
            },
        }
    }
}

/// The shape of VM this destination takes, checked before anything is built.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// Most guest RAM; none when the host's free memory could not be read.
    pub max_memory: Option<u64>,
    /// `--memory`/`--vcpus` of `receive`: the description must match them exactly.
    pub memory: Option<u64>,
    pub vcpus: Option<u16>,
}

impl Limits {
    /// The Refuse reason for a description outside the limits. The memory limit itself is
    /// the host's business: only logged, never told to the peer.
    pub fn check(&self, desc: &VmDescription) -> Result<(), String> {
        let ram = desc.ram_bytes();
        if let Some(m) = self.memory
            && m != ram
        {
            return Err(format!(
                "the VM has {} of RAM but this destination was started with --memory {}",
                size(ram),
                size(m)
            ));
        }
        if let Some(v) = self.vcpus
            && u32::from(v) != desc.vcpus
        {
            return Err(format!(
                "the VM has {} vCPUs but this destination was started with --vcpus {v}",
                desc.vcpus
            ));
        }
        if let Some(max) = self.max_memory
            && ram > max
        {
            log::warn!(
                "a VM of {} of RAM is over the limit of {}",
                size(ram),
                size(max)
            );
            return Err(format!(
                "the VM's {} of RAM is more than this destination takes (--max-memory)",
                size(ram)
            ));
        }
        Ok(())
    }
}

/// What the host can give a VM: MemAvailable less a margin for this process and the host.
fn default_max_memory() -> Option<u64> {
    const MARGIN: u64 = 256 << 20;
    let info = match std::fs::read_to_string("/proc/meminfo") {
        Ok(i) => i,
        Err(e) => {
            log::warn!("cannot read /proc/meminfo ({e}): no limit on a peer's RAM size");
            return None;
        }
    };
    let kib = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?;
    Some(kib.saturating_mul(1024).saturating_sub(MARGIN))
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

/// Text a peer chose (or that quotes it), fit for a log line: at most 200 characters,
/// control and non-ASCII characters escaped.
pub fn peer_text(s: &str) -> String {
    const MAX: usize = 200;
    let mut out = String::new();
    for c in s.chars().take(MAX) {
        if c.is_ascii() && !c.is_ascii_control() {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    if s.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

/// A migration whose description was accepted: from here on a failure ends the receive.
struct Incoming {
    ch: Channel<MigStream>,
    desc: VmDescription,
    machine: Machine,
    devs: DestDevices,
    start: Instant,
}

/// Listens on `opts.listen` until a peer's migration is accepted, then receives the VM.
/// Returns the running machine and the destination's statistics; any error before `Go`
/// means the VM is discarded and the source keeps the guest.
pub fn receive(
    opts: &ReceiveOptions,
    serial: &SerialOutput,
    passthrough: &[Passthrough],
) -> Result<(Machine, MigrationStats), DestError> {
    let cfg = opts
        .tls_dir
        .as_deref()
        .map(|d| TlsDir::load(d).and_then(|t| t.server_config()))
        .transpose()?;
    let accept_tls = cfg.map(|c| move |tcp| MigStream::accept_tls(tcp, c.clone()));
    let tls = accept_tls.as_ref().map(|f| f as &TlsAccept);
    let listener = Listener::bind(&opts.listen)?;
    log::info!("waiting for a migration on {}", opts.listen);
    let deadline = opts.accept_timeout.map(|t| (Instant::now() + t, t));
    let incoming = loop {
        let (tcp, peer) = listener.next(deadline)?;
        fault::crash_point("accept");
        match handshake(tcp, peer, tls, opts, serial, passthrough) {
            Ok(i) => {
                log::info!("migration from {peer}");
                break i;
            }
            Err(e) => log::warn!(
                "dropped the connection from {peer}: {}",
                peer_text(&e.to_string())
            ),
        }
    };
    listener.busy();
    fault::crash_point("description");
    migrate_in(incoming)
}

/// Completes the destination's side of mutual TLS on an accepted socket.
type TlsAccept = dyn Fn(TcpStream) -> Result<MigStream, TlsError>;

/// One connection's handshake: TLS (when on), `Hello`, `Description` within the handshake
/// deadline, then the limits and the build of the paused VM, answered `Accept` or `Refuse`.
fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<&TlsAccept>,
    opts: &ReceiveOptions,
    serial: &SerialOutput,
    passthrough: &[Passthrough],
) -> Result<Incoming, DestError> {
    let start = Instant::now();
    let until = start + opts.handshake_timeout;
    tcp.set_nonblocking(false)?;
    tcp.set_nodelay(true)?;
    let mut stream = match tls {
        Some(accept_tls) => {
            // rustls reads with the socket's timeouts: the handshake's whole budget.
            tcp.set_read_timeout(Some(opts.handshake_timeout))?;
            tcp.set_write_timeout(Some(opts.handshake_timeout))?;
            accept_tls(tcp)?
        }
        None => {
            log::warn!("migration from {peer} is plaintext: no --tls-dir, so nobody is verified");
            MigStream::Plain(tcp)
        }
    };
    let hello = dest_hello(
        &mut Channel::new(Deadline::new(&mut stream, until)),
        features::ALL,
    );
    let (desc, _) = hello.map_err(|e| match e {
        MigrationError::Protocol(p) if p.is_timeout() => {
            DestError::HandshakeTimeout(opts.handshake_timeout)
        }
        e => e.into(),
    })?;
    stream.set_timeouts(Some(opts.peer_timeout))?;
    let mut ch = Channel::new(stream).with_timeout(opts.peer_timeout);
    let mut built = None;
    let answer = dest_answer(&mut ch, &desc, |d| {
        opts.limits.check(d)?;
        built = Some(build(d, serial, passthrough)?);
        Ok(())
    });
    match (answer, built) {
        (Ok(()), Some((machine, devs))) => Ok(Incoming {
            ch,
            desc,
            machine,
            devs,
            start,
        }),
        (Err(e), Some((machine, mut devs))) => {
            devs.abort();
            drop(machine);
            Err(e.into())
        }
        (Err(MigrationError::Protocol(ProtocolError::Refused(r))), None) => {
            Err(DestError::RefusedVm(r))
        }
        (Err(e), None) => Err(e.into()),
        (Ok(()), None) => Err(ProtocolError::Refused("VM not built".into()).into()),
    }
}

/// A stream whose every read and write must end by `until`: one deadline for a whole
/// exchange, so a peer sending a byte at a time cannot stretch it.
struct Deadline<'a> {
    stream: &'a mut MigStream,
    until: Instant,
}

impl<'a> Deadline<'a> {
    fn new(stream: &'a mut MigStream, until: Instant) -> Self {
        Deadline { stream, until }
    }

    fn left(&self) -> io::Result<Duration> {
        match self.until.checked_duration_since(Instant::now()) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(io::ErrorKind::TimedOut.into()),
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.tcp().set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.tcp().set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Loads the accepted migration and resumes the VM; a failure discards it.
fn migrate_in(incoming: Incoming) -> Result<(Machine, MigrationStats), DestError> {
    let Incoming {
        mut ch,
        desc,
        machine: mut m,
        mut devs,
        start,
    } = incoming;
    let mut stats = MigrationStats::new(desc.ram_bytes());
    stats.setup_time = start.elapsed().as_millis() as u64;
    let result = load(&mut ch, &m, &mut devs, &mut stats)
        .and_then(|timings| resume(&mut ch, &mut m, &mut devs, timings));
    match result {
        Ok(()) => {
            stats.status = Status::Completed;
            stats.total_time = start.elapsed().as_millis() as u64;
            stats.ram.set_rates(start.elapsed());
            Ok((m, stats))
        }
        Err(e) => {
            if !matches!(e, DestError::Abandoned(_)) {
                abandon(&mut ch, &e.to_string());
            }
            devs.abort();
            // Dropping the machine joins its (parked) vCPU threads.
            drop(m);
            Err(e)
        }
    }
}

/// Builds the paused VM the description asks for, refusing what this host cannot match, and
/// takes its passthrough devices to RESUMING before any data arrives.
fn build(
    desc: &VmDescription,
    serial: &SerialOutput,
    passthrough: &[Passthrough],
) -> Result<(Machine, DestDevices), String> {
    desc.validate().map_err(|e| e.to_string())?;
    let vcpus =
        u16::try_from(desc.vcpus).map_err(|_| format!("{} vCPUs is too many", desc.vcpus))?;
    let m = Machine::for_incoming(desc.ram_bytes(), vcpus, serial, passthrough)
        .map_err(|e| e.to_string())?;
    let mut devs = DestDevices::probe(passthrough::of_machine(&m)).map_err(|e| e.to_string())?;
    desc.check_compatible(&snapshot::describe(&m, devs.descriptions()))
        .map_err(|e| e.to_string())?;
    if let Err(e) = devs.start_resuming() {
        devs.abort();
        return Err(e.to_string());
    }
    Ok((m, devs))
}

/// Takes memory and state messages until `Complete`, then restores the state.
fn load(
    ch: &mut Channel<MigStream>,
    m: &Machine,
    devs: &mut DestDevices,
    stats: &mut MigrationStats,
) -> Result<(DestTimings, Nonce), DestError> {
    let prefault = Prefault::start(&m.ram.mem);
    let mut rx = MemoryReceiver::new(&m.ram.mem, true);
    let mut snap = Snapshot {
        vcpus: vec![Vec::new(); m.vcpus.count()],
        ..Default::default()
    };
    let mut seen = vec![false; m.vcpus.count()];
    let mut first_memory = true;
    // Once state arrives the stream is in its last phase: no more memory or device data.
    let mut in_state = false;
    let mut vm_seen = false;
    let token = loop {
        let msg = ch.recv()?;
        if let Message::MemoryPages { len, .. } = msg {
            prefault.allow(len);
        }
        if first_memory && matches!(msg, Message::MemoryPages { .. }) {
            first_memory = false;
            fault::crash_point("memory");
            fault::corrupt_point("memory", ch.get_mut());
        }
        let state = matches!(
            msg,
            Message::VcpuState { .. } | Message::VmState { .. } | Message::DeviceState { .. }
        );
        if in_state && !state && !matches!(msg, Message::Complete { .. } | Message::Abandon { .. })
        {
            return Err(out_of_phase(&msg, "after the vCPU and device state").into());
        }
        in_state |= state;
        match rx.handle(&m.ram.mem, ch, msg)? {
            None => {}
            Some(Message::IterationEnd { iteration, .. }) => {
                stats.ram.dirty_sync_count = iteration + 1
            }
            Some(Message::VcpuState { index, data }) => {
                let i = index as usize;
                if i >= seen.len() || seen[i] {
                    return Err(DestError::BadVcpu(index));
                }
                seen[i] = true;
                snap.vcpus[i] = data;
            }
            Some(msg @ Message::VmState { .. }) if vm_seen => {
                return Err(out_of_phase(&msg, "a second VM state").into());
            }
            Some(Message::VmState { data }) => {
                vm_seen = true;
                snap.vm = data;
            }
            Some(msg @ Message::DeviceState { .. }) if repeated_device(&msg, &snap) => {
                return Err(out_of_phase(&msg, "a second state for the same device").into());
            }
            Some(Message::DeviceState { device, data }) => snap.devices.push((device, data)),
            Some(Message::DeviceData {
                device,
                phase,
                data,
            }) => device_data(ch, devs, device, phase, &data)?,
            Some(msg @ Message::Complete { .. }) if !vm_seen => {
                return Err(out_of_phase(&msg, "before the VM state").into());
            }
            Some(Message::Complete { token }) => {
                fault::crash_point("complete");
                break token;
            }
            Some(Message::Abandon { reason }) => {
                return Err(DestError::Abandoned(peer_text(&reason)));
            }
            Some(other) => return Err(ProtocolError::unexpected("memory or state", other).into()),
        }
    };
    let populated = prefault.finish();
    let c = rx.counters();
    stats.ram.normal = c.normal_pages;
    stats.ram.normal_bytes = c.normal_bytes;
    stats.ram.duplicate = c.zero_pages;
    stats.ram.transferred = ch.bytes_read();
    log::info!("prefaulted {populated} bytes during the transfer");
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(DestError::BadVcpu(i as u32));
    }
    let t = Instant::now();
    devs.finish_loading()?;
    // Config space and MSI-X go to a device that has its internal state back, and before it
    // may run.
    snapshot::restore(m, &snap)?;
    devs.ready()?;
    let timings = DestTimings {
        state_load_us: t.elapsed().as_micros() as u64,
        resume_us: 0,
    };
    Ok((timings, token))
}

fn out_of_phase(msg: &Message, reason: &str) -> ProtocolError {
    ProtocolError::OutOfPhase {
        got: msg.message_type(),
        reason: reason.into(),
    }
}

fn repeated_device(msg: &Message, snap: &Snapshot) -> bool {
    matches!(msg, Message::DeviceState { device, .. } if snap.devices.iter().any(|(d, _)| d == device))
}

/// Ready → wait for Go → run the vCPUs → confirm. After Go the guest is ours: a failure to
/// confirm is only logged (the source stays paused rather than run it too).
fn resume(
    ch: &mut Channel<MigStream>,
    m: &mut Machine,
    devs: &mut DestDevices,
    (mut timings, token): (DestTimings, Nonce),
) -> Result<(), DestError> {
    fault::corrupt_point("ready", ch.get_mut());
    if fault::active("stall-ready") {
        // A peer that stays connected and says nothing: the source must time out.
        std::thread::sleep(Duration::from_secs(3600));
    }
    let guest = dest_ready(ch, token)?;
    fault::crash_point("go");
    if fault::active("stall-go") {
        // Told Go, connected, never confirming: the source must time out and stay paused.
        std::thread::sleep(Duration::from_secs(3600));
    }
    let t = Instant::now();
    devs.run();
    // An operator's pause on the source is kept here.
    if guest == RunState::Running {
        m.vcpus.resume().map_err(MachineError::from)?;
    } else {
        log::info!("the guest was paused on the source; it stays paused here");
    }
    timings.resume_us = t.elapsed().as_micros() as u64;
    if let Err(e) = dest_confirm(ch, timings) {
        log::warn!("could not confirm the resume to the source: {e}");
    }
    Ok(())
}

/// A chunk of a device's stream goes to the device; an empty pre-copy chunk marks the end of
/// its initial data, which is then loaded (written): the source may switch over once it
/// hears so.
fn device_data(
    ch: &mut Channel<MigStream>,
    devs: &mut DestDevices,
    device: String,
    phase: DevicePhase,
    data: &[u8],
) -> Result<(), DestError> {
    if !data.is_empty() {
        return Ok(devs.write(&device, data)?);
    }
    if phase == DevicePhase::PreCopy {
        if !devs.knows(&device) {
            return Err(DeviceError::Unknown(device).into());
        }
        ch.send(&Message::DeviceAck { device })?;
    }
    Ok(())
}
