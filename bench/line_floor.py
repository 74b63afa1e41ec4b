"""The TB-GW harness's line floor: how many polls a Modbus master that does no work at all could
make on its stress workload, with the t3.5 silence the spec requires between frames.

It starts the harness's own slave (`workload/modbus_slave.py`, in the harness's `venv-work`) on
a socat pty pair, as the harness does, and plays a master that costs nothing: it writes a
20-register FC3 read, spins on `select` for the 45-byte answer, spins out the 1.75 ms silence
from the answer's last byte, and goes to the next unit. It prints the slave's round trip
(write to last byte, percentiles) and what that leaves per 60 s window: the most polls any
gateway can serve there without cutting the silence. gatewayd's and TB-GW's `served` figures
compare with it (TB-GW waits no silence at all, so it is not bound by this floor).

    flock /tmp/gatewayd-bench.lock .venv/bin/python bench/line_floor.py [--polls 3000]
    flock /tmp/gatewayd-bench.lock .venv/bin/python bench/line_floor.py --cpu 60

`--cpu S` measures the other floor, the CPU of the default preset's line traffic: for S seconds
it polls 20 units once a second, in one burst per second as gatewayd does, and sleeps as a real
master must (epoll for the answer, a timerfd for what is left of the silence, epoll to the next
second), doing nothing else. Its CPU (user and kernel, getrusage) is what the wake-ups and
system calls of that traffic cost in Python on this machine: gatewayd's default CPU compares
with it (the rest is decoding, the durable queue and the delivery).

`--cpu S --gatewayd INTERVAL` runs this checkout's daemon (.venv/bin/gatewayd) on the same line
instead: the same 20 units at INTERVAL ("1000ms" is the default preset, "100ms" ten times its
rate), no uplink, status page on, 10 s of warm-up, then S seconds measured (/proc/PID/stat; the
polls from the slave's log). Its CPU per poll against the no-work master's is gatewayd's own
cost of a poll: the driver, the sampler, the durable queue and the recent-values store.

Needs a first run of bench/tbgw_run.py (it creates the harness's venvs) and socat.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tty
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drivers.modbus import crc16  # noqa: E402

HARNESS = Path(os.environ.get("TBGW_HARNESS", ROOT.parent / "shared" / "bench" / "tbgw"))
BASE = Path(os.environ.get("TMPDIR", "/tmp")) / "gw-bench"
SILENCE_S = 0.00175  # t3.5 above 19200 baud (Modbus over serial line V1.02, 2.5.1.1)
ANSWER = 5 + 2 * 20  # unit, fc, byte count, 20 registers, CRC


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--polls", type=int, default=3000)
    ap.add_argument("--units", type=int, default=50, help="the stress preset's N")
    ap.add_argument("--cpu", type=float, metavar="S",
                    help="measure the CPU of S seconds of the default preset's traffic instead")
    ap.add_argument("--gatewayd", metavar="INTERVAL",
                    help="with --cpu: measure gatewayd (no uplink) polling at INTERVAL instead")
    args = ap.parse_args()
    if args.gatewayd and not args.cpu:
        ap.error("--gatewayd needs --cpu S (the seconds to measure)")
    if args.cpu:
        args.units = 20
    python = BASE / "venv-work" / "bin" / "python"
    if not python.exists():
        ap.error(f"{python} not found: run bench/tbgw_run.py once first (it creates the venvs)")
    with tempfile.TemporaryDirectory() as tmp:
        a, b, ready = f"{tmp}/a", f"{tmp}/b", Path(tmp) / "ready"
        socat = subprocess.Popen(["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"])
        slave = None
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(b):
                if time.monotonic() > deadline:
                    raise SystemExit("socat made no pty pair within 10 s")
                time.sleep(0.05)
            slave = subprocess.Popen([str(python), str(HARNESS / "workload" / "modbus_slave.py"),
                                      "--port", b, "--units", str(args.units), "--log",
                                      f"{tmp}/log.json", "--ready", str(ready),
                                      "--max-seconds", "300"])
            while not ready.exists():
                if slave.poll() is not None or time.monotonic() > deadline + 20:
                    raise SystemExit("the harness's slave did not start")
                time.sleep(0.05)
            if args.cpu and args.gatewayd:
                cpu, elapsed, window = measure_gatewayd(a, args.cpu, args.units, args.gatewayd,
                                                        Path(tmp))
            elif args.cpu:
                cpu, polls, wakes, elapsed = measure_cpu(a, args.cpu, args.units)
            else:
                rtts = measure(a, args.polls, args.units)
        finally:
            for p in (slave, socat):
                if p is not None:
                    stop(p)
        if args.cpu and args.gatewayd:  # the slave writes its log as it stops
            served = json.loads(Path(f"{tmp}/log.json").read_text())["served"]
            polls = sum(1 for _, _, ms in served if window[0] <= ms < window[1])
    if args.cpu and args.gatewayd:
        print(f"gatewayd without an uplink ({args.units} units at {args.gatewayd}, {polls} polls "
              f"in {elapsed:.0f} s): CPU {100 * cpu / elapsed:.2f} % of a core, "
              f"{1e3 * cpu / max(polls, 1):.3f} ms per poll")
        return 0
    if args.cpu:
        print(f"line traffic alone, default preset ({args.units} units at 1 s, {polls} polls in "
              f"{elapsed:.0f} s): CPU {100 * cpu / elapsed:.2f} % of a core, "
              f"{1e3 * cpu / polls:.3f} ms per poll, {wakes / elapsed:.0f} wake-ups/s")
        return 0
    q = statistics.quantiles(rtts, n=100)
    p50 = q[49]
    cycle = p50 + SILENCE_S
    print(f"slave round trip over the socat pty ({len(rtts)} polls, {args.units} units): "
          f"p10 {q[9] * 1e3:.2f} ms, p50 {p50 * 1e3:.2f} ms, p90 {q[89] * 1e3:.2f} ms")
    print(f"floor per poll with the t3.5 silence: {cycle * 1e3:.2f} ms -> at most "
          f"{60 / cycle:,.0f} polls in a 60 s window")
    return 0


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s: one stuck process must not leave the other running."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(path: str, polls: int, units: int) -> list[float]:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd)
        rtts: list[float] = []
        for i in range(polls):
            body = struct.pack(">BBHH", i % units + 1, 3, 0, 20)
            frame = body + crc16(body).to_bytes(2, "little")
            t0 = time.perf_counter()
            os.write(fd, frame)
            got = b""
            while len(got) < ANSWER:
                if not select.select([fd], [], [], 1.0)[0]:
                    raise SystemExit(f"poll {i}: no answer within 1 s")
                got += os.read(fd, 256)
            t1 = time.perf_counter()
            rtts.append(t1 - t0)
            while time.perf_counter() < t1 + SILENCE_S:  # spun: no timer rounding
                pass
        return rtts
    finally:
        os.close(fd)


def measure_gatewayd(path: str, seconds: float, units: int, interval: str,
                     tmp: Path) -> tuple[float, float, tuple[float, float]]:
    """(CPU seconds, elapsed seconds, the window in epoch ms) of gatewayd polling the line."""
    lines = [f'[gateway]\nid = "line-floor"\nstate_dir = "{tmp}/state"\n',
             '[health]\nlisten = "127.0.0.1:0"\n']
    for u in range(1, units + 1):
        lines.append(f'[[devices]]\nname = "unit-{u:03d}"\ndriver = "modbus"\n'
                     f'interval = "{interval}"\nport = "{path}"\nbaudrate = 115200\nunit = {u}\n')
        lines += [f'points.r{r} = {{ address = {r}, function = "holding", type = "uint16" }}\n'
                  for r in range(20)]
    config = tmp / "gatewayd.toml"
    config.write_text("".join(lines))
    log = (tmp / "gatewayd.log").open("w")
    gw = subprocess.Popen([str(ROOT / ".venv" / "bin" / "gatewayd"), "run", "-c", str(config)],
                          stdout=log, stderr=subprocess.STDOUT)
    hz = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = Path(f"/proc/{gw.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / hz

    try:
        try:
            gw.wait(timeout=10)  # warm-up; it must not exit
            raise SystemExit(f"gatewayd exited ({gw.returncode}): see {tmp}/gatewayd.log")
        except subprocess.TimeoutExpired:
            pass
        w0, c0, t0 = time.time(), cpu(), time.monotonic()
        time.sleep(seconds)
        w1, c1, t1 = time.time(), cpu(), time.monotonic()
        return c1 - c0, t1 - t0, (w0 * 1000, w1 * 1000)
    finally:
        stop(gw)
        log.close()


class TimerFd:
    """A CLOCK_MONOTONIC timerfd armed at absolute times (as gatewayd's serial port has one)."""

    def __init__(self) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._spec = (ctypes.c_long * 4)()
        self._ref = ctypes.byref(self._spec)

    def arm(self, when: float) -> None:
        self._spec[2], self._spec[3] = divmod(int(when * 1e9), 1_000_000_000)
        if self._libc.timerfd_settime(self.fd, 1, self._ref, None) != 0:
            raise OSError("timerfd_settime failed")


def measure_cpu(path: str, seconds: float, units: int) -> tuple[float, int, int, float]:
    """(CPU seconds, polls, wake-ups, elapsed seconds) of `seconds` of bursts: every unit once a
    second."""
    import resource
    import select as sel

    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    timer = TimerFd()
    ep = sel.epoll()
    frames = []
    for u in range(1, units + 1):
        body = struct.pack(">BBHH", u, 3, 0, 20)
        frames.append(body + crc16(body).to_bytes(2, "little"))
    try:
        tty.setraw(fd)
        ep.register(fd, sel.EPOLLIN)
        ep.register(timer.fd, sel.EPOLLIN)
        polls = wakes = 0
        last_rx = 0.0
        start = time.monotonic()
        tick = float(int(start) + 1)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        def ready(wanted: int) -> None:
            """Block (epoll) until `wanted` is readable; no answer within 1 s ends the run."""
            nonlocal wakes
            give_up = time.monotonic() + 1.0
            while True:
                events = ep.poll(max(0.0, give_up - time.monotonic()))
                wakes += 1
                if any(f == wanted for f, _ in events):
                    return
                if time.monotonic() >= give_up:
                    raise SystemExit(f"poll {polls}: nothing on fd {wanted} within 1 s")

        while tick < start + seconds + 1:
            time.sleep(max(0.0, tick - time.monotonic()))  # to the second, as the samplers do
            wakes += 1
            for frame in frames:
                if time.monotonic() < last_rx + SILENCE_S:  # what is left of the silence
                    timer.arm(last_rx + SILENCE_S)
                    ready(timer.fd)
                    os.read(timer.fd, 8)
                os.write(fd, frame)
                got = 0
                while got < ANSWER:
                    ready(fd)
                    got += len(os.read(fd, 256))
                last_rx = time.monotonic()
                polls += 1
            tick += 1.0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return cpu, polls, wakes, time.monotonic() - t0
    finally:
        ep.close()
        os.close(timer.fd)
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
