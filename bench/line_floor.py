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

Needs a first run of bench/tbgw_run.py (it creates the harness's venvs) and socat.
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
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
            rtts = measure(a, args.polls, args.units)
        finally:
            for p in (slave, socat):
                if p is not None:
                    stop(p)
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


if __name__ == "__main__":
    sys.exit(main())
