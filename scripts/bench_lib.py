"""Building blocks for minivmm's benchmarks (scripts/bench-migrate, scripts/bench).

Python 3 standard library only. Every function that starts processes takes a `Procs`, which
kills whatever it started when its `with` block ends, however it ends.

Pieces:
- machine_info(), build_minivmm(), build_example()
- Procs: start processes (own process group, output to files) and kill them all at the end
- SerialTail: a host-side reader of serial log files that timestamps every line on arrival
  (time.monotonic()), and heartbeat_report() for the guest-observed downtime and the
  correctness of the HB sequence across a migration
- api_request(): one request to a minivmm control socket
- run_minivmm_migration(): one minivmm live migration of an embedded test guest
- QMP, run_qemu_migration(), ensure_prefill_file(): the same for QEMU (idle firmware guest)
- run_raw_copy(): the loopback TCP copy limit (vmm/examples/raw_copy.rs)
- summarize(): min/median/max of samples
"""

import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIVMM = os.path.join(ROOT, "target", "release", "minivmm")
PAGE = 4096
GIB = 1 << 30
MIB = 1 << 20


class BenchError(Exception):
    """A benchmark step failed; the message says which and why."""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Machine and build


def _first_line(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return None


def machine_info():
    """What the numbers were measured on, and how busy it was when they started."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    nested = None
    try:
        with open("/proc/cpuinfo") as f:
            nested = " hypervisor" in f.read()
    except OSError:
        pass
    commit = _first_line(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True,
    ).stdout.strip() != ""
    return {
        "nproc": os.cpu_count(),
        "model_name": model,
        "mem_total_mib": mem_kib // 1024 if mem_kib else None,
        "under_hypervisor": nested,
        "kernel": platform.release(),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": commit,
        "git_tree_modified": dirty,
        "loadavg_at_start": list(os.getloadavg()),
    }


def cargo(args, what):
    log(f"building {what}: cargo {' '.join(args)}")
    r = subprocess.run(["cargo"] + args, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"cargo {' '.join(args)} failed:\n{r.stderr[-4000:]}")


def build_minivmm():
    cargo(["build", "--release", "-p", "minivmm"], "minivmm")
    return MINIVMM


def build_example(name):
    cargo(["build", "--release", "-p", "minivmm", "--example", name], f"example {name}")
    return os.path.join(ROOT, "target", "release", "examples", name)


# ---------------------------------------------------------------------------------------------
# Processes


class Procs:
    """Starts processes in their own process groups with output to files, and kills every one
    of them (SIGTERM, then SIGKILL) when the `with` block ends."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill_all()
        return False

    def start(self, name, argv):
        out = open(os.path.join(self.workdir, f"{name}.out"), "wb")
        err = open(os.path.join(self.workdir, f"{name}.err"), "wb")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                 cwd=self.workdir, start_new_session=True)
        finally:
            out.close()
            err.close()
        p.bench_name = name
        self.procs.append(p)
        return p

    def output(self, name, stream="out"):
        try:
            with open(os.path.join(self.workdir, f"{name}.{stream}"), "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    @staticmethod
    def _signal(p, sig):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self, p, grace=2.0):
        if p.poll() is None:
            self._signal(p, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(p, signal.SIGKILL)
                p.wait()

    def kill_all(self):
        for p in reversed(self.procs):
            self.kill(p)


def wait_exit(p, deadline):
    """Waits until `p` exits or the monotonic `deadline` passes; returns its code or None."""
    try:
        return p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_listening(port):
    """Whether something listens on `port` (from /proc/net/tcp, without connecting to it:
    a probe connection would be taken for the migration)."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(want) and fields[3] == "0A":
                        return True
        except (OSError, StopIteration):
            continue
    return False


def wait_for(what, cond, timeout, procs_alive=(), interval=0.01):
    """Polls `cond()` until true; fails after `timeout` s or if a process in `procs_alive` ended."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        for p in procs_alive:
            if p.poll() is not None:
                raise BenchError(f"{p.bench_name} exited with code {p.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Serial stream timestamping and heartbeats


class SerialTail:
    """Reads growing log files from a thread and stamps each complete line with the
    time.monotonic() at which the reader saw its newline. Use as a context manager.

    Resolution is the poll interval (1 ms by default) plus scheduling delay on a busy host;
    the files are written one byte at a time by the VMM, so a line is never seen late by more
    than that."""

    def __init__(self, paths, interval=0.001):
        self.paths = list(paths)
        self.interval = interval
        self.lines = {p: [] for p in self.paths}
        self.partial = {p: b"" for p in self.paths}
        self._fds = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serial-tail", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def stop(self):
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._poll()  # whatever arrived last
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _poll(self):
        now = time.monotonic()
        for p in self.paths:
            fd = self._fds.get(p)
            if fd is None:
                try:
                    fd = self._fds[p] = os.open(p, os.O_RDONLY)
                except FileNotFoundError:
                    continue
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                data = self.partial[p] + chunk
                *done, rest = data.split(b"\n")
                self.partial[p] = rest
                if done:
                    with self._lock:
                        self.lines[p].extend((now, l.decode(errors="replace")) for l in done)

    def _run(self):
        while not self._stop.is_set():
            self._poll()
            time.sleep(self.interval)

    def snapshot(self, path):
        """(timestamp, line) pairs of `path` so far."""
        with self._lock:
            return list(self.lines[path])

    def find(self, path, pattern, after=0.0):
        """The first (t, line) of `path` seen at or after `after` matching the regex, or None."""
        rx = re.compile(pattern)
        for t, l in self.snapshot(path):
            if t >= after and rx.search(l):
                return t, l
        return None


HB_RX = re.compile(r"^HB (\d+)$")
BAD_RX = re.compile(r"^(BAD |PANIC|DMATEST BAD)")


def join_streams(src_lines, src_partial, dst_lines):
    """One line stream from a guest that moved from source to destination. A line that the
    source began and the destination finished is joined, stamped when it was finished."""
    src = list(src_lines)
    dst = list(dst_lines)
    if src_partial:
        if dst:
            t, l = dst[0]
            dst[0] = (t, src_partial + l)
        else:
            src.append((float("nan"), src_partial))
    return [(t, l, "src") for t, l in src] + [(t, l, "dst") for t, l in dst]


def heartbeat_report(lines, window_start, hb_ms):
    """Heartbeat facts from a joined stream (see join_streams):

    - guest_downtime_ms: longest gap between consecutive HB lines, as seen by the host-side
      reader, among those that end between `window_start` (the migration request) and the
      destination's second HB; it includes one heartbeat interval (hb_ms), which
      guest_downtime_excess_ms takes off
    - later_max_gap_ms: longest gap on the destination after that (stalls after resume, or
      host noise)
    - switchover_gap_ms: from the source's last HB to the destination's first HB
    - precopy_max_gap_ms: longest gap after `window_start` among source HBs alone
    - contiguous: the HB numbers are 0, 1, 2, ... with no gap or repeat across both logs
    - bad_lines: BAD/PANIC lines from either log
    """
    hbs = []
    bad = []
    for t, l, side in lines:
        m = HB_RX.match(l)
        if m:
            hbs.append((t, int(m.group(1)), side))
        elif BAD_RX.match(l):
            bad.append(f"{side}: {l}")
    seqs = [s for _, s, _ in hbs]
    contiguous = bool(seqs) and seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[0] == 0
    src_hb = [(t, s) for t, s, side in hbs if side == "src"]
    dst_hb = [(t, s) for t, s, side in hbs if side == "dst"]
    # The window: pre-copy, the switchover, and the first interval after resume (to the
    # destination's second HB). Later gaps on the destination are reported apart.
    dst_seen = 0
    window_end = float("inf")
    for t, _, side in hbs:
        if side == "dst":
            dst_seen += 1
            if dst_seen == 2:
                window_end = t
                break
    gaps = []
    later = []
    longest = None
    for (t0, s0, side0), (t1, s1, side1) in zip(hbs, hbs[1:]):
        if t1 > window_end:
            later.append((t1 - t0) * 1000.0)
        elif t1 >= window_start:
            gap = (t1 - t0) * 1000.0
            gaps.append(gap)
            if longest is None or gap > longest["ms"]:
                longest = {"ms": round(gap, 3), "from_hb": s0, "to_hb": s1,
                           "where": side0 if side0 == side1 else "switchover",
                           "after_request_ms": round((t0 - window_start) * 1000.0, 3)}
    pre_gaps = [(b[0] - a[0]) * 1000.0 for a, b in zip(src_hb, src_hb[1:]) if b[0] >= window_start]
    switch = None
    if src_hb and dst_hb:
        switch = (dst_hb[0][0] - src_hb[-1][0]) * 1000.0
    return {
        "hb_ms": hb_ms,
        "guest_downtime_ms": round(max(gaps), 3) if gaps else None,
        "guest_downtime_excess_ms": round(max(gaps) - hb_ms, 3) if gaps else None,
        "later_max_gap_ms": round(max(later), 3) if later else None,
        "switchover_gap_ms": round(switch, 3) if switch is not None else None,
        "precopy_max_gap_ms": round(max(pre_gaps), 3) if pre_gaps else None,
        "longest_gap": longest,
        "contiguous": contiguous,
        "src_last_hb": src_hb[-1][1] if src_hb else None,
        "dst_first_hb": dst_hb[0][1] if dst_hb else None,
        "dst_hb_count": len(dst_hb),
        "bad_lines": bad,
    }


# ---------------------------------------------------------------------------------------------
# minivmm


def api_request(sock_path, cmd, timeout=30.0, **fields):
    """One request to a minivmm control socket (JSON lines); returns the parsed reply."""
    req = dict(fields, cmd=cmd)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf.decode())


def last_json_line(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def settle(dst, tail, dst_log, t_moved, end, min_settle_s, settle_until):
    """Watches the destination once the guest runs there (from `t_moved`): until a serial
    line matching `settle_until` after at least `min_settle_s`, or until `end`. Returns
    whether the destination process is still alive."""
    while time.monotonic() < end and dst.poll() is None:
        if (settle_until and time.monotonic() >= t_moved + min_settle_s
                and tail.find(dst_log, settle_until, after=t_moved)):
            break
        time.sleep(0.02)
    time.sleep(max(0.0, t_moved + min_settle_s - time.monotonic()))
    return dst.poll() is None


def run_minivmm_migration(procs, binary, *, memory, cmdline, ready=r"^HB 0$", warmup_s=2.0,
                          settle_until=None, settle_s=1.0, min_settle_s=0.3, downtime_ms=300,
                          max_bandwidth=None, timeout_s=120.0, hb_ms=20, guest="dirtier",
                          pause_source=False, tls_dir=None):
    """One live migration of an embedded guest between two minivmm processes on loopback.

    The destination (`minivmm receive`) starts first; the source (`minivmm run`, with a control
    socket) boots the guest. The migration is requested through the control socket `warmup_s`
    seconds after the first serial line matching `ready` (so that e.g. a guest that must first
    write all its RAM has done so); the source prints its statistics and exits when the guest
    runs on the destination. With `pause_source` the guest is paused (control socket) just
    before the request, which takes the source vCPU's CPU use out of the measurement (a
    diagnostic: the guest-seen downtime then means nothing and is left out). The destination
    then runs on until a line matching `settle_until`. With `tls_dir` (a `minivmm certs`
    directory) the migration runs over mutual TLS.
    (a regex, e.g. a complete verify sweep there) or for `settle_s`, at least `min_settle_s`.

    Returns one sample: the source's statistics (QEMU query-migrate names), the destination's,
    heartbeat facts from the host-side serial reader and correctness checks."""
    work = procs.workdir
    port = free_port()
    src_log = os.path.join(work, "src-serial.log")
    dst_log = os.path.join(work, "dst-serial.log")
    src_sock = os.path.join(work, "src.sock")
    dst_sock = os.path.join(work, "dst.sock")
    deadline = time.monotonic() + timeout_s
    with SerialTail([src_log, dst_log]) as tail:
        tls = ["--tls-dir", os.path.join(tls_dir, "destination")] if tls_dir else []
        dst = procs.start("dst", [binary, "receive", "--listen", f"127.0.0.1:{port}",
                                  "--serial", f"file:{dst_log}", "--api-sock", dst_sock] + tls)
        wait_for("the destination to listen", lambda: tcp_listening(port), 30, [dst])
        src = procs.start("src", [binary, "run", "--guest", guest, "--memory", str(memory),
                                  "--cmdline", cmdline, "--serial", f"file:{src_log}",
                                  "--api-sock", src_sock])
        t_ready, _ = wait_for(f"serial line /{ready}/ on the source",
                              lambda: tail.find(src_log, ready),
                              max(1.0, deadline - time.monotonic()), [src, dst])
        time.sleep(max(0.0, t_ready + warmup_s - time.monotonic()))
        if src.poll() is not None:
            raise BenchError(f"source exited with code {src.returncode} before the migration")
        fields = {"to": f"127.0.0.1:{port}", "downtime_ms": downtime_ms,
                  "timeout": int(max(1, deadline - time.monotonic()))}
        if max_bandwidth:
            fields["max_bandwidth"] = max_bandwidth
        if tls_dir:
            fields["tls_dir"] = os.path.join(tls_dir, "source")
        if pause_source:
            reply = api_request(src_sock, "pause")
            if reply.get("ok") is not True:
                raise BenchError(f"pause request refused: {reply}")
        t_request = time.monotonic()
        reply = api_request(src_sock, "migrate", **fields)
        if reply.get("ok") is not True:
            raise BenchError(f"migrate request refused: {reply}")
        src_rc = wait_exit(src, deadline)
        t_src_exit = time.monotonic()
        if src_rc is None:
            raise BenchError("the source did not finish the migration within the row timeout")
        src_stats = last_json_line(procs.output("src"))
        if src_rc != 0 or not src_stats or src_stats.get("status") != "completed":
            raise BenchError(f"migration failed: source exit {src_rc}, stats {src_stats}, "
                             f"stderr: {procs.output('src', 'err')[-2000:]}")
        dst_alive = settle(dst, tail, dst_log, t_src_exit, min(deadline, t_src_exit + settle_s),
                           min_settle_s, settle_until)
        if dst_alive:
            try:
                api_request(dst_sock, "shutdown", timeout=5)
            except OSError:
                pass
            wait_exit(dst, time.monotonic() + 10)
        procs.kill(dst)
        tail.stop()
        lines = join_streams(tail.snapshot(src_log), tail.partial[src_log].decode(errors="replace"),
                             tail.snapshot(dst_log))
        dst_lines = tail.snapshot(dst_log)
    dst_stats = last_json_line(procs.output("dst"))
    hb = heartbeat_report(lines, t_request, hb_ms)
    after = [l for t, l in dst_lines if t >= t_src_exit]
    ok = (not hb["bad_lines"] and hb["contiguous"] and dst_alive and hb["dst_hb_count"] > 0
          and dst_stats is not None and dst_stats.get("status") == "completed")
    if pause_source:
        for k in ("guest_downtime_ms", "guest_downtime_excess_ms", "switchover_gap_ms",
                  "precopy_max_gap_ms"):
            hb[k] = None
    breakdown = src_stats.get("downtime-breakdown-us") or {}
    row = sample_row(src_stats, hb, after, src_stats.get("downtime-us", 0) / 1000.0, ok,
                     dst_alive, dst_stats.get("status") if dst_stats else None)
    row.update({
        "downtime_breakdown_us": breakdown,
        # Downtime the breakdown does not name (e.g. the hand-over round trips).
        "downtime_unaccounted_us": src_stats.get("downtime-us", 0) - sum(breakdown.values()),
        "downtime_bytes": src_stats.get("ram", {}).get("downtime-bytes"),
        "host_request_to_source_exit_ms": round((t_src_exit - t_request) * 1000.0, 3),
        "source_paused_first": pause_source,
        "destination_stats": dst_stats,
    })
    return row


def sample_row(stats, hb, dst_lines_after, downtime_ms, correct, dst_alive, dst_status):
    """The fields every sample has, minivmm's or QEMU's: `stats` in query-migrate's names
    (which minivmm's statistics use too), the heartbeat report and the destination checks."""
    ram = stats.get("ram", {})
    return {
        "total_time_ms": stats.get("total-time"),
        "setup_time_ms": stats.get("setup-time"),
        "downtime_ms": downtime_ms,
        "guest_downtime_ms": hb["guest_downtime_ms"],
        "guest_downtime_excess_ms": hb["guest_downtime_excess_ms"],
        "switchover_gap_ms": hb["switchover_gap_ms"],
        "later_max_gap_ms": hb["later_max_gap_ms"],
        "precopy_max_gap_ms": hb["precopy_max_gap_ms"],
        "transferred_bytes": ram.get("transferred"),
        "normal_pages": ram.get("normal"),
        "zero_pages": ram.get("duplicate"),
        "iterations": ram.get("dirty-sync-count"),
        "dirty_pages_rate": ram.get("dirty-pages-rate"),
        "mbps": ram.get("mbps"),
        "correct": correct,
        "checks": {
            "heartbeats": hb,
            "destination_alive_after_settle": dst_alive,
            "destination_status": dst_status,
            "dst_pass_lines": sum(1 for l in dst_lines_after if l.startswith("PASS ")),
            "dst_verify_lines": sum(1 for l in dst_lines_after if l.startswith("VERIFY ok")),
        },
        "source_stats": stats,
    }


# ---------------------------------------------------------------------------------------------
# QEMU


class QMP:
    """A minimal QMP client: greeting, qmp_capabilities, commands; events are skipped."""

    def __init__(self, path, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise BenchError(f"no QMP socket at {path}")
                time.sleep(0.02)
        self.file = self.sock.makefile("rwb")
        self.greeting = self._read()
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise BenchError("QMP connection closed")
        return json.loads(line)

    def cmd(self, execute, **arguments):
        msg = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.file.write((json.dumps(msg) + "\n").encode())
        self.file.flush()
        while True:
            r = self._read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise BenchError(f"QMP {execute}: {r['error']}")

    def close(self):
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


def ensure_prefill_file(size, cache_dir=None):
    """A file of `size` bytes in which every 4 KiB page holds its index + 1 (as u64 LE words),
    so no page is zero; written once under .cache/ and reused, then read through to warm the
    page cache."""
    cache_dir = cache_dir or os.path.join(ROOT, ".cache")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"bench-prefill-{size // MIB}M.bin")

    def page(i):
        return struct.pack("<Q", i + 1) * (PAGE // 8)

    def valid():
        try:
            if os.path.getsize(path) != size:
                return False
            with open(path, "rb") as f:
                if f.read(PAGE) != page(0):
                    return False
                f.seek(size - PAGE)
                return f.read(PAGE) == page(size // PAGE - 1)
        except OSError:
            return False

    if not valid():
        log(f"writing {size // MIB} MiB prefill file {path}")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            per = 256
            for first in range(0, size // PAGE, per):
                f.write(b"".join(page(i) for i in range(first, min(first + per, size // PAGE))))
        os.replace(tmp, path)
    with open(path, "rb") as f:
        while f.read(16 * MIB):
            pass
    return path


def qemu_argv(memory_mib, qmp_path, accel, backend=None, incoming=None):
    argv = ["qemu-system-x86_64", "-m", f"{memory_mib}M", "-nographic", "-nodefaults",
            "-serial", "none", "-monitor", "none", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    argv += ["-enable-kvm"] if accel == "kvm" else ["-accel", "tcg"]
    if backend:
        argv += ["-object", backend, "-machine", "pc,memory-backend=m0"]
    if incoming:
        argv += ["-incoming", incoming]
    return argv


def qemu_accel(procs):
    """'kvm' if QEMU starts with -enable-kvm here and reports KVM enabled, else 'tcg'."""
    qmp_path = os.path.join(procs.workdir, "probe.qmp")
    p = procs.start("qemu-probe", qemu_argv(64, qmp_path, "kvm"))
    try:
        q = QMP(qmp_path, timeout=15)
        kvm = q.cmd("query-kvm")
        q.close()
        return "kvm" if kvm.get("enabled") else "tcg"
    except BenchError:
        log(f"QEMU with -enable-kvm failed here: {procs.output('qemu-probe', 'err')[-500:]}")
        return "tcg"
    finally:
        procs.kill(p)


# QEMU's tls-creds-x509 file names for each side of a `minivmm certs` directory.
QEMU_TLS_FILES = {
    "server": ("destination", {"ca.pem": "ca-cert.pem", "cert.pem": "server-cert.pem",
                               "key.pem": "server-key.pem"}),
    "client": ("source", {"ca.pem": "ca-cert.pem", "cert.pem": "client-cert.pem",
                          "key.pem": "client-key.pem"}),
}


def qemu_tls_object(minivmm_certs, work, endpoint):
    """`-object tls-creds-x509` for `endpoint` (server: the destination, verifying the
    client's certificate; client: the source), from the same CA and certificates that the
    minivmm TLS rows use, copied under QEMU's file names."""
    side, names = QEMU_TLS_FILES[endpoint]
    d = os.path.join(work, f"qemu-tls-{endpoint}")
    os.makedirs(d, exist_ok=True)
    for ours, theirs in names.items():
        shutil.copyfile(os.path.join(minivmm_certs, side, ours), os.path.join(d, theirs))
    verify = ",verify-peer=on" if endpoint == "server" else ""
    return ["-object", f"tls-creds-x509,id=tls0,dir={d},endpoint={endpoint}{verify}"]


def run_qemu_migration(procs, *, memory_mib, prefill=None, accel="kvm", downtime_ms=300,
                       max_bandwidth=100 * GIB, warmup_s=1.0, timeout_s=120.0, tls_dir=None):
    """One QEMU live migration of an idle firmware guest (no kernel) over loopback TCP.

    `prefill`: a file whose contents become the source's RAM (memory-backend-file, share=off:
    private copy-on-write, so every page is non-zero and the file is never written); the
    destination gets a plain RAM backend of the same size. `tls_dir` (a `minivmm certs`
    directory): the migration runs over QEMU's mutual TLS (tls-creds-x509, the destination
    verifying the source's certificate, the source checking 127.0.0.1 against the
    destination's). Timing comes from QEMU's own query-migrate on the source."""
    work = procs.workdir
    port = free_port()
    src_qmp = os.path.join(work, "qsrc.qmp")
    dst_qmp = os.path.join(work, "qdst.qmp")
    size = f"{memory_mib}M"
    src_backend = dst_backend = None
    if prefill:
        src_backend = f"memory-backend-file,id=m0,size={size},mem-path={prefill},share=off"
        dst_backend = f"memory-backend-ram,id=m0,size={size}"
    deadline = time.monotonic() + timeout_s
    uri = f"tcp:127.0.0.1:{port}"
    dst_argv = qemu_argv(memory_mib, dst_qmp, accel, dst_backend,
                         incoming="defer" if tls_dir else uri)
    src_argv = qemu_argv(memory_mib, src_qmp, accel, src_backend)
    if tls_dir:
        dst_argv += qemu_tls_object(tls_dir, work, "server")
        src_argv += qemu_tls_object(tls_dir, work, "client")
    dst = procs.start("qdst", dst_argv)
    src = procs.start("qsrc", src_argv)
    qs = qd = None
    try:
        qd = QMP(dst_qmp)
        qs = QMP(src_qmp)
        if tls_dir:
            qd.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
            qd.cmd("migrate-incoming", uri=uri)
            qs.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": "127.0.0.1"})
        wait_for("QEMU destination to listen", lambda: tcp_listening(port), 30, [dst])
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": max_bandwidth,
                                            "downtime-limit": downtime_ms})
        time.sleep(warmup_s)
        if qs.cmd("query-status").get("status") != "running":
            raise BenchError("QEMU source guest is not running")
        qs.cmd("migrate", uri=uri)
        while True:
            info = qs.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise BenchError(f"QEMU migration {status}: {info}")
            if time.monotonic() > deadline:
                raise BenchError(f"QEMU migration timed out: {info}")
            time.sleep(0.005)
        dst_status = wait_for("QEMU destination to run",
                              lambda: qd.cmd("query-status").get("status") == "running", 30, [dst])
        ram = info.get("ram", {})
        return {
            "total_time_ms": info.get("total-time"),
            "setup_time_ms": info.get("setup-time"),
            "downtime_ms": info.get("downtime"),
            "transferred_bytes": ram.get("transferred"),
            "normal_pages": ram.get("normal"),
            "zero_pages": ram.get("duplicate"),
            "iterations": ram.get("dirty-sync-count"),
            "dirty_pages_rate": ram.get("dirty-pages-rate"),
            "mbps": ram.get("mbps"),
            "accel": accel,
            "correct": bool(dst_status),
            "checks": {"destination_running": bool(dst_status)},
            "source_stats": info,
        }
    finally:
        for q in (qs, qd):
            if q:
                try:
                    q.cmd("quit")
                except (BenchError, OSError):
                    pass
                q.close()
        for p in (src, dst):
            wait_exit(p, time.monotonic() + 5)
            procs.kill(p)


# ---------------------------------------------------------------------------------------------
# Raw copy


def run_raw_copy(procs, binary, nbytes, timeout_s=120.0):
    """The loopback copy limit: `nbytes` over one TCP connection into fresh memory."""
    p = procs.start("raw_copy", [binary, "--bytes", str(nbytes)])
    rc = wait_exit(p, time.monotonic() + timeout_s)
    if rc != 0:
        raise BenchError(f"raw_copy exited {rc}: {procs.output('raw_copy', 'err')[-1000:]}")
    r = last_json_line(procs.output("raw_copy"))
    return {"seconds": r["seconds"], "total_time_ms": r["seconds"] * 1000.0,
            "gib_per_s": r["gib_per_s"], "bytes": r["bytes"], "correct": True}


# ---------------------------------------------------------------------------------------------
# Statistics


def summarize(values):
    """min/median/max/n of the numbers among `values` (None is skipped)."""
    v = [x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if not v:
        return None
    return {"min": min(v), "median": statistics.median(v), "max": max(v), "n": len(v)}


def temp_workdir(prefix):
    return tempfile.mkdtemp(prefix=prefix)
