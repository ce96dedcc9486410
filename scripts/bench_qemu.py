"""QEMU side of scripts/bench: the embedded test guests under QEMU, live-migrated over QMP.

bench_lib.run_qemu_migration migrates an idle firmware-only QEMU; this module runs the same
guest ELF that minivmm runs (multiboot, guests/README.md "Booting under QEMU") with its serial
port in a file, so that bench_lib.SerialTail stamps the guest's heartbeats on the host exactly as
for minivmm and bench_lib.heartbeat_report() measures the guest-seen downtime the same way.

Python 3 standard library only.
"""

import os
import shutil
import subprocess
import time

import bench_lib as bl


def ensure_qemu():
    """qemu-system-x86_64 on PATH, installed with apt-get (Debian's package) if missing."""
    if shutil.which("qemu-system-x86_64"):
        return
    bl.log("qemu-system-x86_64 not found: installing Debian's qemu-system-x86 with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                 "qemu-system-x86"]):
        r = subprocess.run(sudo + cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise bl.BenchError(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")
    if not shutil.which("qemu-system-x86_64"):
        raise bl.BenchError("qemu-system-x86 installed but qemu-system-x86_64 is not on PATH")


def extract_guests(minivmm, directory):
    """The embedded guest ELFs as files (`minivmm guests --extract`), for QEMU's -kernel."""
    os.makedirs(directory, exist_ok=True)
    r = subprocess.run([minivmm, "guests", "--extract", directory], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise bl.BenchError(f"minivmm guests --extract failed: {r.stderr[-1000:]}")
    return {name[:-4]: os.path.join(directory, name)
            for name in os.listdir(directory) if name.endswith(".elf")}


def guest_argv(*, image, append, memory_mib, serial_log, qmp_path, accel, vcpus=1,
               incoming=None):
    """QEMU with the guest ELF as a multiboot kernel, exit port, serial in a file, QMP."""
    argv = ["qemu-system-x86_64", "-m", f"{memory_mib}M",
            # SeaBIOS's MP table lists one CPU per package: one socket per vCPU.
            "-smp", f"{vcpus},sockets={vcpus}",
            "-nographic", "-nodefaults", "-monitor", "none",
            "-serial", f"file:{serial_log}",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel", image, "-append", append]
    argv += ["-enable-kvm"] if accel == "kvm" else ["-accel", "tcg"]
    if incoming:
        argv += ["-incoming", incoming]
    return argv


def run_qemu_guest_migration(procs, *, image, memory_mib, cmdline, accel="kvm",
                             ready=r"^HB 0$", warmup_s=2.0, settle_until=None, settle_s=1.0,
                             min_settle_s=0.3, downtime_ms=300, max_bandwidth=100 * bl.GIB,
                             timeout_s=120.0, hb_ms=20, vcpus=1):
    """One QEMU live migration of a test guest over loopback TCP, shaped like
    bench_lib.run_minivmm_migration: the destination (-incoming) starts first, the source boots
    the guest; `warmup_s` after the first source line matching `ready` the source gets
    migrate-set-parameters (max-bandwidth, downtime-limit) and migrate; when query-migrate says
    completed, the destination runs on until `settle_until` matches there or `settle_s` passes.

    Returns one sample with the same keys as bench_lib.run_minivmm_migration where QEMU has the
    number (query-migrate on the source), the host-stamped heartbeat facts and the checks."""
    work = procs.workdir
    port = bl.free_port()
    src_log = os.path.join(work, "src-serial.log")
    dst_log = os.path.join(work, "dst-serial.log")
    src_qmp = os.path.join(work, "qsrc.qmp")
    dst_qmp = os.path.join(work, "qdst.qmp")
    common = {"image": image, "append": cmdline, "memory_mib": memory_mib, "accel": accel,
              "vcpus": vcpus}
    deadline = time.monotonic() + timeout_s
    qs = qd = None
    with bl.SerialTail([src_log, dst_log]) as tail:
        dst = procs.start("qdst", guest_argv(serial_log=dst_log, qmp_path=dst_qmp,
                                             incoming=f"tcp:127.0.0.1:{port}", **common))
        try:
            qd = bl.QMP(dst_qmp)
            bl.wait_for("the QEMU destination to listen", lambda: bl.tcp_listening(port), 30,
                        [dst])
            src = procs.start("qsrc", guest_argv(serial_log=src_log, qmp_path=src_qmp,
                                                 **common))
            qs = bl.QMP(src_qmp)
            t_ready, _ = bl.wait_for(f"serial line /{ready}/ on the QEMU source",
                                     lambda: tail.find(src_log, ready),
                                     max(1.0, deadline - time.monotonic()), [src, dst])
            qs.cmd("migrate-set-parameters", **{"max-bandwidth": max_bandwidth,
                                                "downtime-limit": downtime_ms})
            time.sleep(max(0.0, t_ready + warmup_s - time.monotonic()))
            if src.poll() is not None:
                raise bl.BenchError(f"QEMU source exited with code {src.returncode} "
                                    "before the migration")
            t_request = time.monotonic()
            qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            while True:
                info = qs.cmd("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise bl.BenchError(f"QEMU migration {status}: {info}")
                if time.monotonic() > deadline:
                    qs.cmd("migrate_cancel")
                    raise bl.BenchError(
                        f"QEMU migration did not complete within the row timeout "
                        f"({timeout_s:.0f} s; status {status}, iterations "
                        f"{info.get('ram', {}).get('dirty-sync-count')})")
                time.sleep(0.005)
            t_done = time.monotonic()
            bl.wait_for("the QEMU destination to run",
                        lambda: qd.cmd("query-status").get("status") == "running", 30, [dst])
            dst_alive = bl.settle(dst, tail, dst_log, t_done, min(deadline, t_done + settle_s),
                                  min_settle_s, settle_until)
            dst_status = qd.cmd("query-status").get("status") if dst_alive else None
        finally:
            for q in (qs, qd):
                if q:
                    try:
                        q.cmd("quit")
                    except (bl.BenchError, OSError):
                        pass
                    q.close()
            for p in procs.procs:
                bl.wait_exit(p, time.monotonic() + 5)
                procs.kill(p)
        tail.stop()
        lines = bl.join_streams(tail.snapshot(src_log),
                                tail.partial[src_log].decode(errors="replace"),
                                tail.snapshot(dst_log))
        dst_lines = tail.snapshot(dst_log)
    hb = bl.heartbeat_report(lines, t_request, hb_ms)
    after = [l for t, l in dst_lines if t >= t_done]
    ok = (not hb["bad_lines"] and hb["contiguous"] and dst_alive and hb["dst_hb_count"] > 0
          and dst_status == "running")
    row = bl.sample_row(info, hb, after, info.get("downtime"), ok, dst_alive, dst_status)
    row.update({
        "host_request_to_completed_ms": round((t_done - t_request) * 1000.0, 3),
        "accel": accel,
    })
    return row
