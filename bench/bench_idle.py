"""Idle cost: the daemon at a light load next to a bare asyncio process, in the same run.

Both run at the same time for the same window, so they share the machine's noise:
  gatewayd  `gatewayd run` with N `sim` devices at 1 Hz (one point each), the SQLite queue and
            a jsonl uplink, health server off (the spine bench's idle case)
  bare      a Python process running asyncio with N tasks, each sleeping one second in a loop
            (random phases): the floor any asyncio daemon with N one-second timers pays
  bare uv   the same on uvloop, where it is installed: the floor on the loop gatewayd picks
            (`[gateway] event_loop = "auto"`)
Printed: each one's CPU as % of one core (user + system over the window), RSS, and the ratios
gatewayd / bare (target <= 1.2) and gatewayd / bare uv.

Run: .venv/bin/python bench/bench_idle.py [--devices 20] [--seconds 60] [--rounds 1]
     [--py-spy FILE]   (record gatewayd in the last round's window; prints the top frames)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_queue import write_config  # noqa: E402

_BARE = """
import asyncio, random, sys
async def timer():
    await asyncio.sleep(random.random())
    while True:
        await asyncio.sleep(1.0)
async def main(n):
    await asyncio.gather(*[timer() for _ in range(n)])
if sys.argv[2:] == ["uvloop"]:
    import uvloop
    uvloop.run(main(int(sys.argv[1])))
else:
    asyncio.run(main(int(sys.argv[1])))
"""


def proc_cpu_s(pid: int) -> float:
    """CPU time of all the process's threads, in ns resolution (schedstat), as seconds.

    /proc/PID/stat counts in 10 ms ticks: too coarse for processes that use a fraction of a
    percent of a core."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just ended
    return total / 1e9


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(devices: int, seconds: float, warmup: float,
            spy: Path | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(Path(tmp), devices, "1s", 0)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        gw = subprocess.Popen([sys.executable, "-m", "gatewayd", "run", "-c", str(cfg)],
                              stdout=subprocess.DEVNULL, env=env)
        bare = subprocess.Popen([sys.executable, "-c", _BARE, str(devices)])
        procs = [gw, bare]
        bare_uv = None
        if importlib.util.find_spec("uvloop") is not None:
            bare_uv = subprocess.Popen([sys.executable, "-c", _BARE, str(devices), "uvloop"])
            procs.append(bare_uv)
        try:
            time.sleep(warmup)  # a benchmark's warm-up (imports, queue open), not synchronization
            if gw.poll() is not None:
                raise SystemExit(f"gatewayd exited with {gw.returncode}")
            recorder = None
            if spy is not None:  # samples with --nonblocking: gatewayd is never stopped
                recorder = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(gw.pid),
                     "-d", str(int(seconds)), "-r", "200", "--nonblocking", "-f", "raw",
                     "-o", str(spy)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            u0 = proc_cpu_s(bare_uv.pid) if bare_uv is not None else 0.0
            g0, b0, t0 = proc_cpu_s(gw.pid), proc_cpu_s(bare.pid), time.perf_counter()
            time.sleep(seconds)
            g1, b1, t1 = proc_cpu_s(gw.pid), proc_cpu_s(bare.pid), time.perf_counter()
            u1 = proc_cpu_s(bare_uv.pid) if bare_uv is not None else 0.0
            if recorder is not None:
                recorder.wait(60)
            out = {"devices": devices, "wall_s": round(t1 - t0, 2),
                   "gatewayd_cpu_pct": round((g1 - g0) / (t1 - t0) * 100, 3),
                   "bare_cpu_pct": round((b1 - b0) / (t1 - t0) * 100, 3),
                   "gatewayd_rss_mb": round(rss_mb(gw.pid), 1),
                   "bare_rss_mb": round(rss_mb(bare.pid), 1)}
            if bare_uv is not None:
                out["bare_uvloop_cpu_pct"] = round((u1 - u0) / (t1 - t0) * 100, 3)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
    bare_pct = out["bare_cpu_pct"]
    out["ratio"] = round(out["gatewayd_cpu_pct"] / bare_pct, 2) if bare_pct else float("inf")
    if out.get("bare_uvloop_cpu_pct"):
        out["ratio_uvloop"] = round(out["gatewayd_cpu_pct"] / out["bare_uvloop_cpu_pct"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--py-spy", type=Path, help="record gatewayd in the last round (raw stacks)")
    args = ap.parse_args()
    spy_bin = Path(sys.executable).parent / "py-spy"
    if args.py_spy and not spy_bin.exists():
        ap.error(f"--py-spy: {spy_bin} not found (install it: .venv/bin/pip install py-spy)")
    results = [measure(args.devices, args.seconds, args.warmup,
                       args.py_spy if i == args.rounds - 1 else None)
               for i in range(args.rounds)]
    for r in results:
        print(json.dumps(r))
    g = sum(r["gatewayd_cpu_pct"] for r in results) / len(results)
    b = sum(r["bare_cpu_pct"] for r in results) / len(results)
    print(f"# idle, {args.devices} devices at 1 Hz, {args.seconds:g} s x {len(results)}: gatewayd "
          f"{g:.2f} % of a core, bare asyncio with {args.devices} one-second timers {b:.2f} %, "
          f"ratio {g / b:.2f} (target <= 1.2); RSS {results[-1]['gatewayd_rss_mb']} vs "
          f"{results[-1]['bare_rss_mb']} MB")
    uv = [r["bare_uvloop_cpu_pct"] for r in results if r.get("bare_uvloop_cpu_pct")]
    if len(uv) == len(results):
        u = sum(uv) / len(uv)
        print(f"# bare uvloop with {args.devices} one-second timers {u:.2f} %, ratio {g / u:.2f}")
    if args.py_spy is not None and args.py_spy.exists():
        from tbgw_run import summarize_pyspy

        summarize_pyspy(args.py_spy)


if __name__ == "__main__":
    main()
